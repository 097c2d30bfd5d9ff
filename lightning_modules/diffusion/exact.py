"""Exact denoisers for data whose posterior E[ε | x_t] is known in closed form.

They are real model callables ``model(x_t, t, y)`` (t = training-chain timesteps) and serve as
ground truth: the DDPM paper's two extremes of the variance choice are N(0, I) data, for which
`fixed_large` is exact, and point-mass data, for which `fixed_small` is exact.
"""

from __future__ import annotations

import torch

from .process import GaussianDiffusion


def gaussian_eps_model(process: GaussianDiffusion, std: float = 1.0):
    """E[ε | x_t] for x_0 ~ N(0, std² I): x_t ~ N(0, ᾱ std² + 1 - ᾱ), so
    E[ε | x_t] = √(1-ᾱ_t) x_t / (ᾱ_t std² + 1 - ᾱ_t)  (= √(1-ᾱ_t) x_t when std = 1)."""

    def model(x_t: torch.Tensor, t: torch.Tensor, y=None) -> torch.Tensor:
        ab = process.coef("alphas_cumprod", t, x_t)
        return (1 - ab).sqrt() * x_t / (ab * std**2 + 1 - ab)

    return model


def point_mass_eps_model(process: GaussianDiffusion, c: torch.Tensor):
    """E[ε | x_t] for x_0 = c with certainty: ε = (x_t - √ᾱ_t c) / √(1-ᾱ_t)."""

    def model(x_t: torch.Tensor, t: torch.Tensor, y=None) -> torch.Tensor:
        return process.predict_eps_from_x0(x_t, t, c.to(x_t).expand_as(x_t))

    return model
