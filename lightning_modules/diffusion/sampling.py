"""The reverse process (spec items 8, 10, 11, 15): reverse steps and the one sampler entry point.

A step takes the raw network output at (x_t, t) and returns x_{t-1}, like a diffusers scheduler;
the network never appears here except through the model callable of :func:`sample`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, fields

import torch

from .guidance import (
    ModelFn,
    check_guidance_weight,
    check_interval,
    guidance_applies,
    guidance_mode,
    guided_forward,
    threshold_x0,
)
from .process import GaussianDiffusion, Prediction, as_prediction
from .variance import VarianceChoice, get_variance, split_variance_output

SAMPLERS = ("ancestral", "ddim")


@dataclass
class ReverseMoments:
    mean: torch.Tensor
    log_variance: torch.Tensor
    eps: torch.Tensor
    x0: torch.Tensor


def p_mean_variance(
    process: GaussianDiffusion,
    output: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    *,
    prediction: str | Prediction = Prediction.EPS,
    variance: str | VarianceChoice = "fixed_small",
    threshold: str = "none",
) -> ReverseMoments:
    """Item 8: the moments of p_θ(x_{t-1} | x_t) from a raw network output.

    The mean is μ̃_t at x̂_0 (item 3), which for an ε-model equals the ε-form mean of item 5; when
    x̂_0 is clipped or thresholded, ε̂ is recomputed from it so the two stay consistent.
    """
    variance = get_variance(variance)
    pred, v = split_variance_output(output, variance, x_t.shape[1])
    eps, x0 = process.eps_x0_from_prediction(pred, prediction, x_t, t)
    if threshold != "none":
        x0 = threshold_x0(x0, threshold)
        eps = process.predict_eps_from_x0(x_t, t, x0)
    mean, _, _ = process.posterior_mean_variance(x0, x_t, t)
    return ReverseMoments(mean, variance.log_variance(process, t, x_t, v), eps, x0)


def _not_last(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return (t != 0).to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))


def ancestral_step(moments: ReverseMoments, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Item 8: x_{t-1} = μ_θ + σ_t z, with z = 0 at the last step."""
    return moments.mean + _not_last(t, noise) * (0.5 * moments.log_variance).exp() * noise


def ddim_step(
    process: GaussianDiffusion,
    moments: ReverseMoments,
    x_t: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
    eta: float,
) -> torch.Tensor:
    """DDIM (Song et al. 2021, eq. 12): x_{t-1} = √ᾱ_{t-1} x̂_0 + √(1-ᾱ_{t-1}-σ²) ε̂ + σ z with
    σ = η √((1-ᾱ_{t-1})/(1-ᾱ_t)) √(1-ᾱ_t/ᾱ_{t-1}); η = 1 gives σ² = β̃_t, the `fixed_small`
    ancestral sampler, and η = 0 the deterministic sampler."""
    ab = process.coef("alphas_cumprod", t, x_t)
    ab_prev = process.coef("alphas_cumprod_prev", t, x_t)
    sigma = eta * ((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)).sqrt()
    direction = (1 - ab_prev - sigma**2).clamp(min=0).sqrt() * moments.eps
    return ab_prev.sqrt() * moments.x0 + direction + _not_last(t, x_t) * sigma * noise


@dataclass(frozen=True)
class SamplingSpec:
    """One sampling configuration (one evaluation cell of a sweep): everything that decides what
    a sampler draws, beside the network, the labels and the noise. The fields are the run
    config's ``sample.*`` keys, one value each.

    ``guidance`` w (0 unconditional, 1 conditional, >1 extrapolates; needs a null label);
    ``variance`` 'fixed_small', 'fixed_large' or 'learned_range' (ancestral sampler only);
    ``steps`` K <= T sampling steps (respaced chain, item 15; None = all T); ``sampler``
    'ancestral' or 'ddim' with ``eta`` (η = 1 is the fixed_small ancestral sampler);
    ``guidance_rescale`` φ; ``guidance_interval`` (lo, hi) as fractions of T; ``threshold``
    'none', 'clip' or 'dynamic' for x̂_0 ('auto': the module decides by the data); ``seed`` of
    the initial noise and of every step's noise (the sampler itself takes a generator).
    """

    guidance: float = 1.0
    variance: str = "fixed_small"
    steps: int | None = None
    sampler: str = "ancestral"
    eta: float = 0.0
    guidance_rescale: float = 0.0
    guidance_interval: tuple[float, float] | None = None
    threshold: str = "none"
    seed: int = 0

    def __post_init__(self):
        if self.guidance_interval is not None:  # a list from a config is a tuple here
            object.__setattr__(self, "guidance_interval", tuple(self.guidance_interval))
        for name in ("guidance", "eta", "guidance_rescale"):  # `w: 3` from YAML is 3.0 here
            value = getattr(self, name)
            if isinstance(value, int) and not isinstance(value, bool):
                object.__setattr__(self, name, float(value))

    def check(self, process: GaussianDiffusion) -> SamplingSpec:
        """Raise ValueError for a value no sampler of ``process`` accepts."""
        check_guidance_weight(self.guidance)
        get_variance(self.variance)
        check_sampling_args(process, self.steps, self.sampler, self.eta)
        check_interval(self.guidance_interval)
        return self

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


SAMPLING_SPEC_KEYS = tuple(f.name for f in fields(SamplingSpec))


def check_sampling_args(process: GaussianDiffusion, steps, sampler: str, eta: float) -> None:
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; expected one of {list(SAMPLERS)}")
    if steps is not None and not (isinstance(steps, int) and 1 <= steps <= process.num_timesteps):
        raise ValueError(
            f"sampling steps must be an integer in [1, T={process.num_timesteps}], got {steps!r}"
        )
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"DDIM eta must be in [0, 1], got {eta!r}")


def batch_key(spec: SamplingSpec) -> tuple:
    """What specs must share to be drawn in one batch: everything but the guidance weight and
    the seed (:func:`sample_specs`)."""
    return tuple(v for k, v in spec.as_dict().items() if k not in ("guidance", "seed"))


def sample_progressive(
    model: ModelFn,
    process: GaussianDiffusion,
    shape: tuple[int, ...],
    spec: SamplingSpec | None = None,
    *,
    labels: torch.Tensor | None = None,
    prediction: str | Prediction = Prediction.EPS,
    null_label: int | None = None,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
    device: torch.device | str | None = None,
) -> Iterator[tuple[int, torch.Tensor, ReverseMoments]]:
    """Yield (t, x_{t-1}, moments) after every reverse step; see :func:`sample` for the args."""
    yield from _reverse_chain(
        model, process, shape, [spec or SamplingSpec()], labels=labels, prediction=prediction,
        null_label=null_label, generators=[generator], noise=noise, device=device,
    )  # fmt: skip


def _reverse_chain(
    model: ModelFn,
    process: GaussianDiffusion,
    shape: tuple[int, ...],
    specs: list[SamplingSpec],
    *,
    labels: torch.Tensor | None,
    prediction: str | Prediction,
    null_label: int | None,
    generators: list[torch.Generator | None],
    noise: torch.Tensor | None,
    device: torch.device | str | None,
) -> Iterator[tuple[int, torch.Tensor, ReverseMoments]]:
    """The reverse chain for k specs that differ only in guidance weight (and seed), as one
    batch of k x N samples: block j holds spec j's samples and draws its noise from its own
    generator, in the order a chain of spec j alone draws it.

    Every decision that depends on the step (guidance inside its interval or not, which
    forward passes) is made on the host from the step index, so a step never waits for the
    device."""
    specs = [spec.check(process) for spec in specs]
    spec = specs[0]
    if any(batch_key(s) != batch_key(spec) for s in specs):
        raise ValueError("specs sampled together may differ only in guidance and seed")
    variance, prediction = get_variance(spec.variance), as_prediction(prediction)
    n, k = shape[0], len(specs)
    if labels is not None and labels.shape != (n,):
        raise ValueError(f"labels must have shape ({n},), got {tuple(labels.shape)}")
    steps = spec.steps
    chain = process.respace(steps) if steps and steps < process.num_timesteps else process
    device = (
        torch.device(device)
        if device is not None
        else (noise.device if noise is not None else torch.device("cpu"))
    )
    if noise is not None and noise.shape != tuple(shape):
        raise ValueError(f"noise shape {tuple(noise.shape)} != requested shape {tuple(shape)}")

    def draw(dtype: torch.dtype | None = None) -> torch.Tensor:  # None: the default dtype
        return torch.cat(
            [torch.randn(shape, generator=g, device=device, dtype=dtype) for g in generators]
        )

    x = noise.repeat(k, *([1] * (noise.ndim - 1))) if noise is not None else draw()
    pred_channels = x.shape[1]
    guided = labels is not None and null_label is not None
    if guided:
        y = labels.to(device).repeat(k)
        w = torch.tensor([float(s.guidance) for s in specs], device=device, dtype=x.dtype)
        w = w.repeat_interleave(n).reshape(-1, *([1] * (x.ndim - 1)))
    else:
        y = labels
    T_train = int(process.timestep_map.max()) + 1
    for i in reversed(range(chain.num_timesteps)):
        t = torch.full((k * n,), i, device=device, dtype=torch.long)
        t_model = int(chain.timestep_map[i])  # a host tensor: no device read
        model_t = torch.full_like(t, t_model)
        if guided:
            on = guidance_applies(t_model, T_train, spec.guidance_interval)
            mode = guidance_mode([s.guidance if on else 1.0 for s in specs])
            out = guided_forward(
                model, x, model_t, y, w, mode, null_label=null_label,
                rescale=spec.guidance_rescale, pred_channels=pred_channels,
            )  # fmt: skip
        else:
            out = model(x, model_t, y)  # an unconditional model: nothing to guide
        moments = p_mean_variance(
            chain, out, x, t, prediction=prediction, variance=variance, threshold=spec.threshold
        )
        z = draw(x.dtype)
        if spec.sampler == "ancestral":
            x = ancestral_step(moments, t, z)
        else:
            x = ddim_step(chain, moments, x, t, z, spec.eta)
        yield i, x, moments


def sample(
    model: ModelFn,
    process: GaussianDiffusion,
    shape: tuple[int, ...],
    spec: SamplingSpec | None = None,
    **kwargs,
) -> torch.Tensor:
    """Draw samples x_0 of ``shape`` from any model callable ``model(x_t, t, y) -> output``, as
    ``spec`` says (:class:`SamplingSpec`: guidance, variance, steps, sampler, ...).

    Keyword args: ``labels`` (N,) class labels or None for an unconditional model;
    ``prediction`` 'eps', 'x0' or 'v' (what the model outputs); ``null_label`` (the label of
    ∅, needed for guidance); ``generator`` or ``noise`` (the starting x_T) for reproducibility;
    ``device``.
    """
    *_, (_, x0, _) = sample_progressive(model, process, shape, spec, **kwargs)
    return x0


def sample_specs(
    model: ModelFn,
    process: GaussianDiffusion,
    shape: tuple[int, ...],
    specs: list[SamplingSpec],
    *,
    generators: list[torch.Generator | None] | None = None,
    **kwargs,
) -> list[torch.Tensor]:
    """:func:`sample` for several specs that differ only in guidance weight and seed, drawn in
    one batch of len(specs) x N: a guided step is one forward pass over 2 k N samples instead of
    k passes over 2 N. Spec j's samples are the samples ``sample(..., spec_j, generator=
    generators[j])`` draws (equal up to floating-point reassociation in the network), so
    batching is an execution choice only. ``generators`` default to each spec's seed."""
    if not specs:
        return []
    device = torch.device(kwargs.get("device") or "cpu")
    if generators is None:
        generators = [torch.Generator(device=device).manual_seed(s.seed) for s in specs]
    if len(generators) != len(specs):
        raise ValueError(f"{len(specs)} specs but {len(generators)} generators")
    *_, (_, x0, _) = _reverse_chain(
        model, process, shape, list(specs), generators=list(generators),
        **({"labels": None, "prediction": Prediction.EPS, "null_label": None, "noise": None,
            "device": None} | kwargs),
    )  # fmt: skip
    return list(x0.chunk(len(specs)))
