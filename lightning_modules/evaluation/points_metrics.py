"""Sample quality for 2-D toy data, where the true distribution is known exactly.

The truth is any object with the duck type of the toy mixture datasets:
`means` (M, 2) tensor, `std` float, `sample(n, labels=None, generator=None) -> (x, y)` and
`mode_of(x) -> LongTensor` (index of the nearest mode). Points are float (N, 2).
"""

from __future__ import annotations

import logging
from typing import Protocol

import torch
from torch import Tensor

logger = logging.getLogger(__name__)


class MixtureTruth(Protocol):
    """What the point metrics need to know about the true distribution."""

    means: Tensor
    std: float

    def sample(
        self, n: int, labels: Tensor | None = None, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]: ...

    def mode_of(self, x: Tensor) -> Tensor: ...


def _quantiles(sorted_proj: Tensor, levels: Tensor) -> Tensor:
    # Empirical quantile function of each row, so sets of different sizes can be compared.
    n = sorted_proj.shape[1]
    idx = (levels * n).long().clamp(max=n - 1)
    return sorted_proj[:, idx]


def sliced_wasserstein(x: Tensor, y: Tensor, num_projections: int = 256, seed: int = 0) -> float:
    """Sliced Wasserstein-2 distance between two point sets.

    SW2 = sqrt(E_θ W2²(θᵀx, θᵀy)) over random unit directions θ; in 1-D, W2 is the L2 distance
    between quantile functions. Directions come from a fixed seed so values are comparable
    across runs.
    """
    x, y = x.double(), y.double()
    generator = torch.Generator().manual_seed(seed)
    theta = torch.randn(num_projections, x.shape[1], generator=generator, dtype=torch.float64)
    theta = theta / theta.norm(dim=1, keepdim=True)
    proj_x = (theta @ x.T).sort(dim=1).values
    proj_y = (theta @ y.T).sort(dim=1).values
    m = max(x.shape[0], y.shape[0])
    levels = (torch.arange(m, dtype=torch.float64) + 0.5) / m
    diff = _quantiles(proj_x, levels) - _quantiles(proj_y, levels)
    return diff.square().mean().sqrt().item()


def _mean_pairwise_distance(a: Tensor, b: Tensor, exclude_diagonal: bool, chunk: int) -> Tensor:
    total = torch.zeros((), dtype=torch.float64)
    for start in range(0, len(a), chunk):
        total += torch.cdist(a[start : start + chunk], b).sum()
    # The diagonal of a set with itself is all zeros, so excluding it only changes the count.
    count = len(a) * (len(b) - 1) if exclude_diagonal else len(a) * len(b)
    return total / count


def energy_distance(x: Tensor, y: Tensor, chunk_size: int = 2048) -> float:
    """Squared energy distance 2E|X−Y| − E|X−X'| − E|Y−Y'| (Székely & Rizzo).

    Within-set terms use the unbiased U-statistic, so the value is ~0 (possibly slightly
    negative) for two samples of the same distribution.
    """
    x, y = x.double(), y.double()
    xy = _mean_pairwise_distance(x, y, False, chunk_size)
    xx = _mean_pairwise_distance(x, x, True, chunk_size)
    yy = _mean_pairwise_distance(y, y, True, chunk_size)
    return (2 * xy - xx - yy).item()


def _nearest_mode(samples: Tensor, truth: MixtureTruth) -> Tensor:
    # The truth may keep float32 means; hand it points in its own dtype (cdist needs one dtype).
    return truth.mode_of(samples.to(truth.means.dtype)).long().to(samples.device)


def _within_mode(x: Tensor, means: Tensor, modes: Tensor, radius: float) -> Tensor:
    return (x - means[modes]).norm(dim=1) <= radius


def mode_coverage_per_class(
    samples: Tensor, requested_labels: Tensor, truth: MixtureTruth, k: float = 3.0
) -> Tensor:
    """For each class c, the fraction of samples requested as c within k·std of mode c.

    NaN for classes that were not requested. For an exact 2-D Gaussian mode, k=3 gives
    1 − exp(−k²/2) ≈ 0.989.
    """
    means = truth.means.to(samples)
    requested_labels = requested_labels.long().to(samples.device)
    hit = _within_mode(samples, means, requested_labels, k * truth.std).double()
    num_modes = len(means)
    counts = torch.bincount(requested_labels, minlength=num_modes).double()
    hits = torch.bincount(requested_labels, weights=hit, minlength=num_modes)
    return torch.where(counts > 0, hits / counts.clamp(min=1), torch.nan)


def fraction_of_modes_hit(samples: Tensor, truth: MixtureTruth, k: float = 3.0) -> float:
    """Fraction of modes with at least one sample within k·std of it, whatever was requested."""
    means = truth.means.to(samples)
    nearest = _nearest_mode(samples, truth)
    hit = _within_mode(samples, means, nearest, k * truth.std)
    return len(nearest[hit].unique()) / len(means)


def label_accuracy(samples: Tensor, requested_labels: Tensor, truth: MixtureTruth) -> float:
    """Fraction of samples whose nearest mode is the requested one."""
    hit = _nearest_mode(samples, truth) == requested_labels.to(samples.device)
    return hit.double().mean().item()


def _true_reference(
    truth: MixtureTruth, requested_labels: Tensor | None, n: int, multiplier: int, seed: int
) -> Tensor:
    # Samples for label c should follow the class-c mode, so the reference is drawn with the
    # same labels (repeated) rather than from the marginal mixture.
    generator = torch.Generator().manual_seed(seed)
    if requested_labels is None:
        return truth.sample(n * multiplier, generator=generator)[0]
    labels = requested_labels.repeat(multiplier)
    return truth.sample(len(labels), labels=labels, generator=generator)[0]


def evaluate_points(
    samples: Tensor,
    requested_labels: Tensor | None,
    truth: MixtureTruth,
    k: float = 3.0,
    reference_multiplier: int = 4,
    seed: int = 0,
) -> dict[str, float]:
    """All 2-D point metrics of one sample set against the known truth.

    Distances compare against `reference_multiplier`× as many true samples (fixed `seed`).
    Keys: `sliced_wasserstein`, `energy_distance`, `modes_hit`, and when labels are given
    `mode_coverage` (mean over requested classes), `mode_coverage_class_{c}`, `label_accuracy`.
    """
    samples = samples.double().cpu()
    reference = _true_reference(truth, requested_labels, len(samples), reference_multiplier, seed)
    reference = reference.double().cpu()
    metrics = {
        "sliced_wasserstein": sliced_wasserstein(samples, reference, seed=seed),
        "energy_distance": energy_distance(samples, reference),
        "modes_hit": fraction_of_modes_hit(samples, truth, k),
    }
    if requested_labels is not None:
        labels = requested_labels.long().cpu()
        per_class = mode_coverage_per_class(samples, labels, truth, k)
        requested = ~per_class.isnan()
        metrics["mode_coverage"] = per_class[requested].mean().item()
        for c in requested.nonzero().flatten().tolist():
            metrics[f"mode_coverage_class_{c}"] = per_class[c].item()
        metrics["label_accuracy"] = label_accuracy(samples, labels, truth)
    logger.debug("point metrics: %s", metrics)
    return metrics
