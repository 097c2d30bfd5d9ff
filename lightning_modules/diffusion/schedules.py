"""Noise schedules (spec item 14): pure functions T -> β, float64 tensors of length T.

Every schedule here returns β_1..β_T (index 0 holds β_1; see ``lightning_modules.diffusion`` for
the indexing convention) strictly inside (0, 1), for any T >= 1.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

# Cosine and sigmoid schedules clip β at this value, as improved-diffusion does, to avoid the
# singularity of ᾱ_T -> 0 (item 14).
MAX_BETA = 0.999


def _check_T(T: int) -> int:
    if isinstance(T, bool) or not isinstance(T, int) or T < 1:
        raise ValueError(f"number of timesteps T must be an integer >= 1, got {T!r}")
    return T


def validate_betas(betas: torch.Tensor) -> torch.Tensor:
    """Return β as a 1-D float64 tensor, raising ValueError unless every β_t lies in (0, 1)."""
    betas = torch.as_tensor(betas, dtype=torch.float64)
    if betas.ndim != 1 or betas.numel() < 1:
        raise ValueError(
            f"betas must be a 1-D sequence of length T >= 1, got shape {tuple(betas.shape)}"
        )
    bad = ~((betas > 0) & (betas < 1))
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise ValueError(f"every beta must lie in (0, 1); beta[{i}] = {betas[i].item()!r}")
    return betas


def linear_betas(T: int) -> torch.Tensor:
    """Item 14, `linear`: β from 1e-4 to 0.02 at T = 1000; both ends scaled by 1000/T otherwise.

    For T < 50 the scaled end would exceed 1, so β is clipped at MAX_BETA like the other schedules.
    """
    scale = 1000.0 / _check_T(T)
    betas = torch.linspace(scale * 1e-4, scale * 0.02, T, dtype=torch.float64)
    return betas.clamp(max=MAX_BETA)


def betas_from_alpha_bar(alpha_bar: Callable[[torch.Tensor], torch.Tensor], T: int) -> torch.Tensor:
    """β_t = 1 - ᾱ(t/T) / ᾱ((t-1)/T), clipped at MAX_BETA, for a continuous ᾱ on [0, 1]."""
    s = torch.arange(T + 1, dtype=torch.float64) / T
    a = alpha_bar(s)
    return (1 - a[1:] / a[:-1]).clamp(min=1e-12, max=MAX_BETA)


def cosine_betas(T: int, s: float = 0.008) -> torch.Tensor:
    """Item 14, `cosine` (Nichol & Dhariwal 2021): ᾱ_t = f(t)/f(0),
    f(t) = cos²(((t/T) + s)/(1 + s) · π/2)."""

    def f(u: torch.Tensor) -> torch.Tensor:
        return torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2

    return betas_from_alpha_bar(lambda u: f(u) / f(torch.zeros(())), _check_T(T))


def sigmoid_betas(T: int, start: float = -3.0, end: float = 3.0, tau: float = 1.0) -> torch.Tensor:
    """`sigmoid` schedule (Chen 2023, "On the importance of noise scheduling"):
    ᾱ(u) = (σ(end/τ) - σ((u(end-start)+start)/τ)) / (σ(end/τ) - σ(start/τ))."""
    v_start, v_end = (
        torch.sigmoid(torch.tensor(start / tau)),
        torch.sigmoid(torch.tensor(end / tau)),
    )

    def alpha_bar(u: torch.Tensor) -> torch.Tensor:
        v = torch.sigmoid((u * (end - start) + start) / tau)
        return ((v_end - v) / (v_end - v_start)).to(torch.float64)

    return betas_from_alpha_bar(alpha_bar, _check_T(T))


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Zero-terminal-SNR rescaling (Lin et al. 2023, Algorithm 1).

    Shift √ᾱ so that √ᾱ_T becomes 0 and scale it so that √ᾱ_1 is unchanged. That makes β_T = 1;
    it is clipped at MAX_BETA instead (ᾱ_T = 0.001 ᾱ_{T-1}, an SNR below 3e-7 for the built-in
    schedules at T = 1000) so that β stays inside (0, 1) and ε-models remain usable (x̂_0 from ε
    divides by √ᾱ_t). Use v-prediction with it, as Lin et al. do.
    """
    betas = validate_betas(betas)
    if betas.numel() < 2:
        raise ValueError("zero-terminal-SNR rescaling needs T >= 2")
    sqrt_ab = torch.cumprod(1 - betas, 0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * first / (first - last)
    ab = sqrt_ab**2
    ab_prev = torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
    return validate_betas((1 - ab / ab_prev).clamp(max=MAX_BETA))


SCHEDULES: dict[str, Callable[[int], torch.Tensor]] = {
    "linear": linear_betas,
    "cosine": cosine_betas,
    "sigmoid": sigmoid_betas,
}


def get_betas(name: str, T: int, *, zero_terminal_snr: bool = False) -> torch.Tensor:
    """β_1..β_T (float64) for the schedule `name`, optionally rescaled to zero terminal SNR."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown noise schedule {name!r}; expected one of {sorted(SCHEDULES)}")
    betas = validate_betas(SCHEDULES[name](_check_T(T)))
    return rescale_zero_terminal_snr(betas) if zero_terminal_snr else betas
