"""The reverse-process variance choices (spec item 8), one small value type each.

Each choice gives log σ_t² for the reverse step p(x_{t-1} | x_t) = N(μ_θ, σ_t² I). The two fixed
choices are sampling-time choices (one ε-model can be sampled with either); `learned_range` needs
a network that outputs an extra interpolation value v ∈ [-1, 1] per element, trained with the
hybrid loss (item 13).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .process import GaussianDiffusion


@dataclass(frozen=True)
class FixedSmall:
    """σ_t² = β̃_t, the exact posterior variance: optimal when x_0 is a point mass."""

    name: str = "fixed_small"
    learned: bool = False

    def log_variance(self, process: GaussianDiffusion, t: torch.Tensor, x_t: torch.Tensor, v=None):
        # Clipped at t = 1 (β̃_1 = 0); no noise is added at that step, so only L_0 sees it.
        return process.coef("posterior_log_variance_clipped", t, x_t)


@dataclass(frozen=True)
class FixedLarge:
    """σ_t² = β_t, the upper bound: optimal when x_0 ~ N(0, I). β̃_2 stands in at t = 1."""

    name: str = "fixed_large"
    learned: bool = False

    def log_variance(self, process: GaussianDiffusion, t: torch.Tensor, x_t: torch.Tensor, v=None):
        return process.coef("log_betas_clipped", t, x_t)


@dataclass(frozen=True)
class LearnedRange:
    """log σ² = ((v+1)/2) log β_t + (1 - (v+1)/2) log β̃_t (Nichol & Dhariwal 2021).

    Uses the same clipped arrays as the fixed choices, so v = -1 is exactly `fixed_small` and
    v = +1 exactly `fixed_large` at every t (t = 1 included).
    """

    name: str = "learned_range"
    learned: bool = True

    def log_variance(self, process: GaussianDiffusion, t: torch.Tensor, x_t: torch.Tensor, v=None):
        if v is None:
            raise ValueError(
                "learned_range needs the network's variance output v (doubled channels)"
            )
        frac = (v + 1) / 2
        max_log = FixedLarge().log_variance(process, t, x_t)
        min_log = FixedSmall().log_variance(process, t, x_t)
        return frac * max_log + (1 - frac) * min_log


VARIANCES = {choice.name: choice for choice in (FixedSmall(), FixedLarge(), LearnedRange())}
VarianceChoice = FixedSmall | FixedLarge | LearnedRange


def get_variance(name: str | VarianceChoice) -> VarianceChoice:
    if not isinstance(name, str):
        return name
    if name not in VARIANCES:
        raise ValueError(f"unknown variance choice {name!r}; expected one of {sorted(VARIANCES)}")
    return VARIANCES[name]


def split_variance_output(output: torch.Tensor, variance: VarianceChoice, channels: int):
    """Split a network output into (prediction, v); v is None for the fixed choices.

    A network with doubled output channels (trained for `learned_range`) can still be sampled
    with a fixed variance: its v channels are then ignored.
    """
    if output.shape[1] == 2 * channels:
        pred, v = output.chunk(2, dim=1)
        return pred, (v if variance.learned else None)
    if variance.learned:
        raise ValueError(
            f"learned_range needs a network with doubled output channels ({2 * channels}), "
            f"got {output.shape[1]}"
        )
    return output, None
