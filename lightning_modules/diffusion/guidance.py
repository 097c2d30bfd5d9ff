"""Classifier-free guidance (spec items 9-12), guidance rescale, guidance interval, thresholding.

Convention (the seed's, recorded with every run): ε̂ = ε_u + w(ε_c - ε_u), so **w = 0 is
unconditional, w = 1 is plain conditional, w > 1 extrapolates**. Ho & Salimans (2022) write
(1 + w')ε_c - w'ε_u; convert with :func:`to_ho_salimans` / :func:`from_ho_salimans`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

GUIDANCE_CONVENTION = "eps_hat = eps_u + w * (eps_c - eps_u); w=0 unconditional, w=1 conditional"

# A denoiser: model(x_t, t, y) with t the (training-chain) timesteps and y labels, null = ∅.
ModelFn = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def to_ho_salimans(w: float) -> float:
    """This project's w -> the w' of Ho & Salimans (2022): w' = w - 1."""
    return w - 1.0


def from_ho_salimans(w_prime: float) -> float:
    return w_prime + 1.0


def check_guidance_weight(w: float) -> float:
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
        raise ValueError(f"guidance weight w must be a finite number, got {w!r}")
    return float(w)


def cfg_combine(uncond: torch.Tensor, cond: torch.Tensor, w: float | torch.Tensor) -> torch.Tensor:
    """Item 9: ε̂ = ε_u + w (ε_c - ε_u).

    Exact for x0- and v-predictions too: each is affine in ε with the same x_t-term for both
    halves, so combining the raw outputs equals combining their ε (and item 10 follows).
    """
    return uncond + w * (cond - uncond)


def rescale_guidance(guided: torch.Tensor, cond: torch.Tensor, phi: float) -> torch.Tensor:
    """Guidance rescale (Lin et al. 2023, eq. 15-16): match the per-sample std of the guided
    prediction to the conditional one, then mix with weight φ (φ = 0 leaves it unchanged)."""
    if phi == 0:
        return guided
    dims = tuple(range(1, guided.ndim))
    rescaled = guided * (cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return phi * rescaled + (1 - phi) * guided


def in_guidance_interval(
    t: torch.Tensor, num_timesteps: int, interval: tuple[float, float] | None
) -> torch.Tensor:
    """Whether guidance applies at each training-chain timestep t (0-based).

    ``interval = (lo, hi)`` is given as fractions of T on the spec's 1-based time: guidance is
    applied when lo <= (t+1)/T <= hi (Kynkäänniemi et al. 2024); outside it the plain conditional
    prediction (w = 1) is used. None means everywhere.
    """
    if interval is None:
        return torch.ones_like(t, dtype=torch.bool)
    lo, hi = interval
    frac = (t.double() + 1) / num_timesteps
    return (frac >= lo) & (frac <= hi)


def check_interval(interval) -> tuple[float, float] | None:
    if interval is None:
        return None
    lo, hi = (float(v) for v in interval)
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(
            f"guidance interval must satisfy 0 <= lo <= hi <= 1, got {tuple(interval)!r}"
        )
    return lo, hi


def guidance_applies(t: int, num_timesteps: int, interval: tuple[float, float] | None) -> bool:
    """:func:`in_guidance_interval` for one training-chain timestep known on the host (a
    sampler's step: every sample of a batch is at the same t), so no device value is read."""
    if interval is None:
        return True
    lo, hi = interval
    return lo <= (t + 1) / num_timesteps <= hi


def guidance_mode(weights) -> str:
    """Which forward passes weights (host floats) need: 'cond' when every w is 1, 'uncond' when
    every w is 0, else 'both' (one batched pass over conditional and null labels)."""
    weights = set(weights)
    if weights <= {1.0}:
        return "cond"
    return "uncond" if weights <= {0.0} else "both"


def guided_forward(
    model: ModelFn,
    x_t: torch.Tensor,
    t: torch.Tensor,
    labels: torch.Tensor,
    w: float | torch.Tensor,
    mode: str,
    *,
    null_label: int,
    rescale: float = 0.0,
    pred_channels: int | None = None,
) -> torch.Tensor:
    """Item 11 with the passes decided on the host (:func:`guidance_mode`): ONE forward pass
    over [x_t; x_t] with labels [c; ∅] for 'both', combined with ``w`` (a float, or per-sample
    weights broadcastable against x_t).

    Only the first ``pred_channels`` channels (the ε/x0/v prediction) are guided; extra channels
    (the `learned_range` variance output) are taken from the conditional half, as in GLIDE.
    """
    if mode == "cond":
        return model(x_t, t, labels)
    null = torch.full_like(labels, null_label)
    if mode == "uncond":
        return model(x_t, t, null)
    out = model(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([labels, null]))
    cond, uncond = out.chunk(2)
    c = pred_channels or cond.shape[1]
    guided = rescale_guidance(cfg_combine(uncond[:, :c], cond[:, :c], w), cond[:, :c], rescale)
    return torch.cat([guided, cond[:, c:]], dim=1) if c < cond.shape[1] else guided


def guided_output(
    model: ModelFn,
    x_t: torch.Tensor,
    t: torch.Tensor,
    labels: torch.Tensor | None,
    w: float,
    *,
    null_label: int | None,
    num_timesteps: int,
    rescale: float = 0.0,
    interval: tuple[float, float] | None = None,
    pred_channels: int | None = None,
) -> torch.Tensor:
    """Item 11 for per-sample timesteps t: the guided model output, guidance applied where t is
    inside ``interval`` (plain conditional elsewhere). When w is 1 everywhere (or 0), a single
    conditional (or unconditional) pass is enough. With an interval, deciding that reads t on
    the host; the samplers, whose steps share one t, use :func:`guided_forward` instead."""
    w = check_guidance_weight(w)
    if labels is None or null_label is None:
        return model(x_t, t, labels)  # an unconditional model: nothing to guide
    if interval is None:
        w_b, mode = w, guidance_mode([w])
    else:
        w_t = torch.where(in_guidance_interval(t, num_timesteps, interval), w, 1.0).to(x_t.dtype)
        w_b, mode = w_t.reshape(-1, *([1] * (x_t.ndim - 1))), guidance_mode(w_t.unique().tolist())
    return guided_forward(
        model, x_t, t, labels, w_b, mode,
        null_label=null_label, rescale=rescale, pred_channels=pred_channels,
    )  # fmt: skip


def drop_labels(
    labels: torch.Tensor, p_uncond: float, null_label: int, generator=None
) -> torch.Tensor:
    """Item 12: replace each label by the null label with probability p_uncond (CFG training)."""
    if not 0.0 <= p_uncond <= 1.0:
        raise ValueError(f"p_uncond must be in [0, 1], got {p_uncond!r}")
    drop = torch.rand(labels.shape, generator=generator, device=labels.device) < p_uncond
    return torch.where(drop, torch.full_like(labels, null_label), labels)


# -- clipping / dynamic thresholding of x̂_0 ---------------------------------------------------
THRESHOLDS = ("none", "clip", "dynamic")


def threshold_x0(x0: torch.Tensor, method: str = "none", percentile: float = 0.995) -> torch.Tensor:
    """Clip x̂_0 to [-1, 1] (`clip`) or apply Imagen's dynamic thresholding (`dynamic`): per
    sample s = max(1, quantile_p |x̂_0|), then x̂_0 <- clamp(x̂_0, -s, s) / s."""
    if method == "none":
        return x0
    if method == "clip":
        return x0.clamp(-1, 1)
    if method == "dynamic":
        s = (
            torch.quantile(x0.abs().flatten(1).float(), percentile, dim=1)
            .clamp(min=1.0)
            .to(x0.dtype)
        )
        s = s.reshape(-1, *([1] * (x0.ndim - 1)))
        return x0.clamp(-s, s) / s
    raise ValueError(f"unknown x0 threshold {method!r}; expected one of {list(THRESHOLDS)}")
