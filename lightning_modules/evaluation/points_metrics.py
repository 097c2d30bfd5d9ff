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

from .bootstrap import weighted_mean

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


def _projections(x: Tensor, num_projections: int, seed: int) -> Tensor:
    # Random unit directions from a fixed seed, so values are comparable across runs.
    generator = torch.Generator().manual_seed(seed)
    theta = torch.randn(num_projections, x.shape[1], generator=generator, dtype=torch.float64)
    return theta / theta.norm(dim=1, keepdim=True)


def sliced_wasserstein(x: Tensor, y: Tensor, num_projections: int = 256, seed: int = 0) -> float:
    """Sliced Wasserstein-2 distance between two point sets.

    SW2 = sqrt(E_θ W2²(θᵀx, θᵀy)) over random unit directions θ; in 1-D, W2 is the L2 distance
    between quantile functions. Directions come from a fixed seed so values are comparable
    across runs.
    """
    x, y = x.double(), y.double()
    theta = _projections(x, num_projections, seed)
    proj_x = (theta @ x.T).sort(dim=1).values
    proj_y = (theta @ y.T).sort(dim=1).values
    m = max(x.shape[0], y.shape[0])
    levels = (torch.arange(m, dtype=torch.float64) + 0.5) / m
    diff = _quantiles(proj_x, levels) - _quantiles(proj_y, levels)
    return diff.square().mean().sqrt().item()


# The replicates of sliced_wasserstein use the first 32 of its 256 directions (the same seed):
# on 2-D points 32 directions cover the half-circle, and the replicates' spread (what the
# interval is made of) comes from the samples: 32 give intervals within ~5 % of 256's width at
# an eighth of the cost. Their mean moves by the directions' own bias, which the interval's
# shift removes (bootstrap.interval).
BOOTSTRAP_PROJECTIONS = 32


def sliced_wasserstein_replicates(
    x: Tensor,
    y: Tensor,
    counts: Tensor,
    num_projections: int = 256,
    seed: int = 0,
    chunk: int = 8,
) -> Tensor:
    """(B,) bootstrap replicates of :func:`sliced_wasserstein` with ``x`` resampled by
    ``counts`` (B, n) and ``y`` held fixed, without sorting a resample.

    A resample's sorted projections are those of ``x``, each repeated as often as it was drawn:
    the i-th smallest projection of ``x`` fills the resample's ranks cum_{i−1} .. cum_i − 1
    (cum: the counts summed in sorted order). The quantile function reads rank r(l) at level l,
    so W2² sums (q_i − q_y,l)² over the levels whose rank falls in that range; with prefix sums
    over ranks of (levels per rank, Σ q_y,l) that is two lookups per point."""
    x, y = x.double(), y.double()
    n = x.shape[0]
    theta = _projections(x, num_projections, seed)
    proj_x, order = (theta @ x.T).sort(dim=1)
    proj_y = (theta @ y.T).sort(dim=1).values
    m = max(n, y.shape[0])
    levels = (torch.arange(m, dtype=torch.float64) + 0.5) / m
    rank = (levels * n).long().clamp(max=n - 1)  # the rank _quantiles reads at each level
    q_y = _quantiles(proj_y, levels)  # (P, m)
    zero = torch.zeros(num_projections, 1, dtype=torch.float64)
    per_rank = torch.zeros(num_projections, n, dtype=torch.float64)
    levels_before = torch.cat([zero[0], torch.bincount(rank, minlength=n).double().cumsum(0)])
    qy_before = torch.cat([zero, per_rank.index_add(1, rank, q_y).cumsum(dim=1)], dim=1)
    qy2_total = q_y.square().sum()  # Σ q_y² over every level: the same for any resample
    out = []
    for c in counts.double().split(chunk):
        drawn = c[:, order]  # (b, P, n): counts in each projection's sorted order
        end = drawn.cumsum(dim=-1).long()
        start = end - drawn.long()
        qy = qy_before.expand(len(c), -1, -1)
        k = levels_before[end] - levels_before[start]
        s1 = qy.gather(-1, end) - qy.gather(-1, start)
        total = (k * proj_x.square() - 2 * proj_x * s1).sum(dim=(1, 2)) + qy2_total
        out.append((total / (num_projections * m)).clamp(min=0).sqrt())
    return torch.cat(out)


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


def energy_distance_replicates(
    x: Tensor, y: Tensor, counts: Tensor, chunk_size: int = 1024
) -> Tensor:
    """(B,) bootstrap replicates of :func:`energy_distance` with ``x`` resampled by ``counts``
    (B, n) and ``y`` held fixed: E|X−Y| weighs each x by its count, E|X−X'| sums the distances
    of all pairs of drawn points (c' D c; a point drawn twice pairs with itself at distance 0)
    over n(n−1) pairs."""
    x, y = x.double(), y.double()
    c = counts.double()
    n = x.shape[0]
    to_y = torch.cat([torch.cdist(part, y).mean(dim=1) for part in x.split(chunk_size)])
    xy = c @ to_y / n
    xx = torch.zeros(len(c), dtype=torch.float64)
    for start in range(0, n, chunk_size):
        rows = torch.cdist(x[start : start + chunk_size], x)  # (k, n)
        xx += (c[:, start : start + chunk_size] * (c @ rows.T)).sum(dim=1)
    xx /= n * (n - 1)
    yy = _mean_pairwise_distance(y, y, True, chunk_size)
    return 2 * xy - xx - yy


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
    samples: Tensor, requested_labels: Tensor | None, truth: MixtureTruth, **options
) -> dict[str, float]:
    """All 2-D point metrics of one sample set against the known truth (``options``:
    :func:`point_metrics`'s `k`, `reference_multiplier`, `seed`).

    Distances compare against `reference_multiplier`× as many true samples (fixed `seed`).
    Keys: `sliced_wasserstein`, `energy_distance`, `modes_hit`, and when labels are given
    `mode_coverage` (mean over requested classes), `mode_coverage_class_{c}`, `label_accuracy`.
    """
    return point_metrics(samples, requested_labels, truth, **options)[0]


def point_metrics(
    samples: Tensor,
    requested_labels: Tensor | None,
    truth: MixtureTruth,
    k: float = 3.0,
    reference_multiplier: int = 4,
    seed: int = 0,
    counts: Tensor | None = None,
) -> tuple[dict[str, float], dict[str, Tensor]]:
    """(metrics as :func:`evaluate_points`, their bootstrap replicates): with ``counts``
    (B, n), B replicates of the distances, `modes_hit`, `mode_coverage` and `label_accuracy`,
    the samples resampled and the true reference held fixed (lightning_modules/evaluation/
    bootstrap.py)."""
    samples = samples.double().cpu()
    reference = _true_reference(truth, requested_labels, len(samples), reference_multiplier, seed)
    reference = reference.double().cpu()
    nearest = _nearest_mode(samples, truth)
    near = _within_mode(samples, truth.means.to(samples), nearest, k * truth.std)
    metrics = {
        "sliced_wasserstein": sliced_wasserstein(samples, reference, seed=seed),
        "energy_distance": energy_distance(samples, reference),
        "modes_hit": len(nearest[near].unique()) / len(truth.means),
    }
    labels = None if requested_labels is None else requested_labels.long().cpu()
    if labels is not None:
        per_class = mode_coverage_per_class(samples, labels, truth, k)
        requested = ~per_class.isnan()
        metrics["mode_coverage"] = per_class[requested].mean().item()
        for c in requested.nonzero().flatten().tolist():
            metrics[f"mode_coverage_class_{c}"] = per_class[c].item()
        metrics["label_accuracy"] = label_accuracy(samples, labels, truth)
    logger.debug("point metrics: %s", metrics)
    if counts is None:
        return metrics, {}
    num_modes = len(truth.means)
    found = torch.nn.functional.one_hot(nearest, num_modes).double() * near[:, None]
    replicates = {
        "sliced_wasserstein": sliced_wasserstein_replicates(
            samples, reference, counts, BOOTSTRAP_PROJECTIONS, seed
        ),
        "energy_distance": energy_distance_replicates(samples, reference, counts),
        "modes_hit": ((counts > 0).double() @ found > 0).double().mean(dim=1),
    }
    if labels is not None:
        asked = torch.nn.functional.one_hot(labels, num_modes).double()
        hit = _within_mode(samples, truth.means.to(samples), labels, k * truth.std).double()
        drawn = counts @ asked  # (B, M) samples drawn per requested class
        coverage = (counts @ (asked * hit[:, None])) / drawn
        replicates["mode_coverage"] = coverage[:, asked.sum(dim=0) > 0].nanmean(dim=1)
        replicates["label_accuracy"] = weighted_mean((nearest == labels).double(), counts)
    return metrics, replicates
