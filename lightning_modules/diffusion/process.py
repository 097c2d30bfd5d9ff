"""The Gaussian diffusion process: schedule arrays and one method per identity of the spec.

Items 1-7 and 15 of ``docs/diffusion-math.md``. The process knows nothing about networks:
every method takes tensors and integer timesteps ``t`` (0-based, see the package docstring).
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import Enum

import torch

from .schedules import get_betas, validate_betas


class Prediction(str, Enum):
    """What the network predicts (item 7). All three are linear in one another."""

    EPS = "eps"
    X0 = "x0"
    V = "v"


def as_prediction(value: str | Prediction) -> Prediction:
    try:
        return Prediction(value)
    except ValueError:
        raise ValueError(
            f"unknown prediction type {value!r}; expected one of {[p.value for p in Prediction]}"
        ) from None


def broadcast_to_batch(coef: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Reshape a per-sample coefficient (N,) so it broadcasts against x (N, ...)."""
    return coef.reshape(coef.shape[0], *([1] * (x.ndim - 1)))


class GaussianDiffusion:
    """Owns β_1..β_T and every derived per-timestep array, built once in float64.

    Arrays are indexed by the 0-based code timestep t (index t holds the spec's quantity at t+1).
    ``timestep_map[t]`` is the timestep of the *training* chain that index t stands for: the
    identity for a chain built from a schedule, a subsequence after :meth:`respace`. Networks are
    always called with mapped timesteps.
    """

    def __init__(self, betas: torch.Tensor, timestep_map: torch.Tensor | None = None):
        self.betas = validate_betas(betas)
        T = self.num_timesteps = self.betas.numel()
        self.timestep_map = (
            torch.arange(T) if timestep_map is None else torch.as_tensor(timestep_map).long()
        )
        if self.timestep_map.shape != (T,):
            raise ValueError(
                f"timestep_map must have length {T}, got {tuple(self.timestep_map.shape)}"
            )
        b = self.betas
        self.alphas = 1.0 - b
        self.alphas_cumprod = torch.cumprod(self.alphas, 0)
        self.alphas_cumprod_prev = torch.cat(
            [torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]]
        )
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - self.alphas_cumprod).sqrt()
        # Item 3: β̃_t and the posterior-mean coefficients of x_0 and x_t.
        self.posterior_variance = (1.0 - self.alphas_cumprod_prev) * b / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef_x0 = (
            self.alphas_cumprod_prev.sqrt() * b / (1.0 - self.alphas_cumprod)
        )
        self.posterior_mean_coef_xt = (
            self.alphas.sqrt() * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        )
        # β̃_1 = 0: log β̃ is clipped by using β̃_2 at t = 1, as the reference implementations do
        # (with T = 1 there is no β̃_2, and β_1 stands in).
        first = self.posterior_variance[1:2] if T > 1 else b[:1]
        self.posterior_log_variance_clipped = torch.cat([first, self.posterior_variance[1:]]).log()
        # Item 8, `fixed_large`: σ² = β_t, with β̃_2 at t = 1 for the likelihood terms (as in
        # improved-diffusion; at t = 1 no noise is added when sampling, so only L_0 sees it).
        self.log_betas_clipped = torch.cat([first, b[1:]]).log()
        self._identity_map = bool((self.timestep_map == torch.arange(T)).all())
        self._device_cache: dict[tuple[str, torch.device], torch.Tensor] = {}

    @classmethod
    def from_schedule(
        cls, name: str, T: int, *, zero_terminal_snr: bool = False
    ) -> GaussianDiffusion:
        return cls(get_betas(name, T, zero_terminal_snr=zero_terminal_snr))

    # -- helpers --------------------------------------------------------------------------------
    def _on(self, name: str, device: torch.device) -> torch.Tensor:
        """The per-timestep array `name`, copied to ``device`` once and kept there."""
        key = (name, device)
        arr = self._device_cache.get(key)
        if arr is None:
            arr = self._device_cache[key] = getattr(self, name).to(device)
        return arr

    def coef(self, name: str, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Gather the per-timestep array `name` at t, in x's dtype, broadcast against x."""
        return broadcast_to_batch(self._on(name, t.device)[t].to(x.dtype), x)

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """The training-chain timesteps a network is called with at this chain's t (item 15):
        t itself for a chain built from a schedule, ``timestep_map[t]`` after :meth:`respace`."""
        return t if self._identity_map else self._on("timestep_map", t.device)[t]

    def _check_t(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if t.ndim != 1 or t.shape[0] != x.shape[0]:
            raise ValueError(
                f"t must have shape ({x.shape[0]},) (one timestep per sample), got {tuple(t.shape)}"
            )
        return t.long()

    # -- forward process ------------------------------------------------------------------------
    def q_step(self, x_prev: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Item 1: a draw from q(x_t | x_{t-1}) = N(√α_t x_{t-1}, β_t I)."""
        t = self._check_t(t, x_prev)
        return (
            self.coef("alphas", t, x_prev).sqrt() * x_prev
            + self.coef("betas", t, x_prev).sqrt() * noise
        )

    def q_mean_variance(self, x0: torch.Tensor, t: torch.Tensor):
        """Item 2: mean, variance and log-variance of q(x_t | x_0)."""
        t = self._check_t(t, x0)
        mean = self.coef("sqrt_alphas_cumprod", t, x0) * x0
        var = 1.0 - self.coef("alphas_cumprod", t, x0)
        return mean, var, var.log()

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Item 2: x_t = √ᾱ_t x_0 + √(1-ᾱ_t) ε in one step."""
        t = self._check_t(t, x0)
        return (
            self.coef("sqrt_alphas_cumprod", t, x0) * x0
            + self.coef("sqrt_one_minus_alphas_cumprod", t, x0) * noise
        )

    # -- posterior ------------------------------------------------------------------------------
    def posterior_mean_variance(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """Item 3: μ̃_t(x_t, x_0), β̃_t and the clipped log β̃_t of q(x_{t-1} | x_t, x_0)."""
        t = self._check_t(t, x_t)
        mean = (
            self.coef("posterior_mean_coef_x0", t, x_t) * x0
            + self.coef("posterior_mean_coef_xt", t, x_t) * x_t
        )
        return (
            mean,
            self.coef("posterior_variance", t, x_t),
            self.coef("posterior_log_variance_clipped", t, x_t),
        )

    # -- parameterisations ----------------------------------------------------------------------
    def predict_x0_from_eps(
        self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor
    ) -> torch.Tensor:
        """Item 4: x̂_0 = (x_t - √(1-ᾱ_t) ε) / √ᾱ_t."""
        t = self._check_t(t, x_t)
        return (x_t - self.coef("sqrt_one_minus_alphas_cumprod", t, x_t) * eps) / self.coef(
            "sqrt_alphas_cumprod", t, x_t
        )

    def predict_eps_from_x0(
        self, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor
    ) -> torch.Tensor:
        """Item 4 solved for ε: ε = (x_t - √ᾱ_t x_0) / √(1-ᾱ_t)."""
        t = self._check_t(t, x_t)
        return (x_t - self.coef("sqrt_alphas_cumprod", t, x_t) * x0) / self.coef(
            "sqrt_one_minus_alphas_cumprod", t, x_t
        )

    def eps_mean(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """Item 5: μ_θ = (1/√α_t)(x_t - β_t/√(1-ᾱ_t) · ε_θ)."""
        t = self._check_t(t, x_t)
        scale = self.coef("betas", t, x_t) / self.coef("sqrt_one_minus_alphas_cumprod", t, x_t)
        return (x_t - scale * eps) / self.coef("alphas", t, x_t).sqrt()

    def score_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """Item 6: s = -ε / √(1-ᾱ_t), the score ∇ log q(x_t | x_0) (or the model's, for ε_θ)."""
        t = self._check_t(t, x_t)
        return -eps / self.coef("sqrt_one_minus_alphas_cumprod", t, x_t)

    def v_from_x0_eps(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Item 7: v = √ᾱ_t ε - √(1-ᾱ_t) x_0."""
        t = self._check_t(t, x0)
        return (
            self.coef("sqrt_alphas_cumprod", t, x0) * eps
            - self.coef("sqrt_one_minus_alphas_cumprod", t, x0) * x0
        )

    def x0_from_v(self, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Item 7 inverted: x_0 = √ᾱ_t x_t - √(1-ᾱ_t) v (since ᾱ + (1-ᾱ) = 1)."""
        t = self._check_t(t, x_t)
        return (
            self.coef("sqrt_alphas_cumprod", t, x_t) * x_t
            - self.coef("sqrt_one_minus_alphas_cumprod", t, x_t) * v
        )

    def eps_x0_from_prediction(
        self, output: torch.Tensor, prediction: str | Prediction, x_t: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Item 7: the one helper that turns any model prediction into (ε̂, x̂_0)."""
        prediction = as_prediction(prediction)
        if output.shape != x_t.shape:
            raise ValueError(
                f"model output shape {tuple(output.shape)} != x_t shape {tuple(x_t.shape)}"
            )
        if prediction is Prediction.EPS:
            return output, self.predict_x0_from_eps(x_t, t, output)
        x0 = output if prediction is Prediction.X0 else self.x0_from_v(x_t, t, output)
        return self.predict_eps_from_x0(x_t, t, x0), x0

    def training_target(
        self, prediction: str | Prediction, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        """The regression target of L_simple (item 13) for each prediction type."""
        prediction = as_prediction(prediction)
        if prediction is Prediction.EPS:
            return eps
        return x0 if prediction is Prediction.X0 else self.v_from_x0_eps(x0, eps, t)

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """Signal-to-noise ratio ᾱ_t / (1 - ᾱ_t) per timestep, float64."""
        ab = self.alphas_cumprod.to(t.device)[t.long()]
        return ab / (1.0 - ab)

    # -- fewer sampling steps -------------------------------------------------------------------
    def respace(self, steps: int | Sequence[int]) -> GaussianDiffusion:
        """Item 15: the chain on a subsequence S of this chain's steps.

        ``steps`` is a count K (evenly spaced, always keeping the first and last step) or an
        explicit increasing sequence of 0-based indices. ᾱ'_i = ᾱ_{s_i}; β'_i = 1 - ᾱ'_i/ᾱ'_{i-1},
        computed as β_{s_i} itself where s_i = s_{i-1} + 1 (the same number, exactly), so that
        respacing with all T steps reproduces this chain bit for bit.
        """
        S = space_timesteps(self.num_timesteps, steps)
        ab = self.alphas_cumprod[S]
        ab_prev = torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
        betas = 1.0 - ab / ab_prev
        prev = torch.cat([torch.tensor([-1]), S[:-1]])
        consecutive = S - prev == 1
        betas[consecutive] = self.betas[S[consecutive]]
        return GaussianDiffusion(betas, timestep_map=self.timestep_map[S])


def space_timesteps(T: int, steps: int | Sequence[int]) -> torch.Tensor:
    """The 0-based subsequence of 0..T-1 that a respaced chain keeps (item 15)."""
    if isinstance(steps, int) and not isinstance(steps, bool):
        if not 1 <= steps <= T:
            raise ValueError(f"sampling steps must be between 1 and T={T}, got {steps}")
        if steps == 1:
            return torch.tensor([T - 1])
        return torch.linspace(0, T - 1, steps, dtype=torch.float64).round().long()
    S = torch.as_tensor(list(steps)).long()
    if S.ndim != 1 or S.numel() < 1 or bool((S[1:] <= S[:-1]).any()) or S[0] < 0 or S[-1] >= T:
        raise ValueError(
            f"explicit timesteps must be strictly increasing within [0, {T - 1}], got {steps!r}"
        )
    return S
