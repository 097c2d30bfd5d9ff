"""Bootstrap intervals for the sample-quality metrics, and paired comparisons between cells.

A metric of one cell is a number computed from its n samples; drawn again, the n samples would
give another. The bootstrap estimates that spread: draw n of the samples with replacement
(within each requested class, so every resample keeps the cell's class balance), compute the
metric on the resample, repeat B times. Each metric here is written as a function of *how often
each sample is drawn* (a (B, n) count matrix), so the B replicates come from the features and
distances the point estimate already computed, in a few batched tensor operations: no sample is
drawn again and no image goes through the classifier again.

- **Interval.** The percentile interval of the replicates, shifted by the bootstrap's own bias
  (mean of the replicates minus the estimate). FID needs the shift: a resample repeats about a
  third of its samples, which inflates its covariance spread and its FID, so unshifted
  percentiles can miss the estimate altogether. For the metrics that are means (precision,
  accuracy, coverage) the shift is ~0 and this is the plain percentile interval.
- **Paired.** Cells of one training, and of trainings sampled with the same ``sample.seed``,
  start from the same noise and the same labels, sample for sample; resampled with the same
  counts, the difference of two cells' replicates is the bootstrap of their difference, which
  shares the noise of the real reference and of the starting points, and is far tighter than
  two independent intervals.
- **Held fixed.** The real reference set (FID's real statistics, the real manifold of precision)
  and, for 2-D data, the reference draw from the true distribution: the intervals are for the
  cell's samples. Recall averages over the *real* points (the share of them inside the samples'
  manifold), so its replicates resample those, with the same counts for every cell.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

DEFAULT_RESAMPLES = 200
REAL_SEED_OFFSET = 7919  # the real points' resamples: a stream apart from the samples' own


def resample_counts(n: int, num_resamples: int, seed: int, strata: Tensor | None = None) -> Tensor:
    """(B, n) float64: how often each of n items is drawn in each of B resamples of n with
    replacement, within each stratum (a label per item) when ``strata`` is given. The same
    (n, strata, B, seed) give the same counts, which is what pairs two cells."""
    generator = torch.Generator().manual_seed(int(seed))
    counts = torch.zeros(num_resamples, n, dtype=torch.float64)
    groups = [torch.arange(n)] if strata is None else by_label(strata.cpu())
    for members in groups:
        draws = torch.randint(len(members), (num_resamples, len(members)), generator=generator)
        counts.scatter_add_(1, members[draws], torch.ones_like(draws, dtype=torch.float64))
    return counts


@dataclass
class Resamples:
    """The bootstrap's draws for the cells sampled with one seed: counts over their n samples
    (within each requested label) and, made on first use, over the n_real real points."""

    samples: Tensor  # (B, n) float64
    seed: int
    _real: dict[int, Tensor] = field(default_factory=dict, repr=False)

    @classmethod
    def draw(cls, n: int, num_resamples: int, seed: int, labels: Tensor | None = None) -> Resamples:
        return cls(resample_counts(n, num_resamples, seed, labels), seed)

    @property
    def num_resamples(self) -> int:
        return self.samples.shape[0]

    def real(self, n_real: int) -> Tensor:
        """(B, n_real) counts over the real points, the same for every cell of this seed."""
        if n_real not in self._real:
            seed = self.seed + REAL_SEED_OFFSET
            self._real[n_real] = resample_counts(n_real, self.num_resamples, seed)
        return self._real[n_real]


def by_label(labels: Tensor) -> list[Tensor]:
    """The positions of each label's items, by label in sorted order."""
    return [(labels == c).nonzero().flatten() for c in labels.unique(sorted=True)]


def weighted_mean(values: Tensor, counts: Tensor) -> Tensor:
    """(B,) replicates of the mean of per-item ``values`` (n,)."""
    counts = counts.to(values.device)
    return (counts @ values.double()) / counts.sum(dim=1)


def fid_replicates(
    features: Tensor, counts: Tensor, real_mean: Tensor, real_cov: Tensor, chunk: int = 32
) -> Tensor:
    """(B,) replicates of the Fréchet distance between the samples' features (n, D), each
    resample weighted by its counts, and the real statistics (mean (D,), covariance (D, D)).

    FID = |μ_f − μ_r|² + tr Σ_f + tr Σ_r − 2 tr (Σ_r^½ Σ_f Σ_r^½)^½; the last trace is the sum
    of the square roots of the symmetric matrix's eigenvalues, the same value as torchmetrics'
    tr (Σ_f Σ_r)^½ (whose eigenvalues it shares)."""
    f = features.double()
    real_mean, real_cov = real_mean.to(f), real_cov.to(f)
    evals, evecs = torch.linalg.eigh(real_cov)
    root = evecs @ torch.diag_embed(evals.clamp(min=0).sqrt()) @ evecs.T
    counts = counts.to(f)
    out = []
    for c in counts.split(chunk):
        n = c.sum(dim=1, keepdim=True)  # (b, 1)
        mean = c @ f / n  # (b, D)
        second = torch.einsum("bn,nd,ne->bde", c, f, f)
        cov = (second - n[:, :, None] * mean[:, :, None] * mean[:, None, :]) / (n[:, :, None] - 1)
        inner = root @ cov @ root
        trace_sqrt = torch.linalg.eigvalsh(inner).clamp(min=0).sqrt().sum(dim=1)
        diff = (mean - real_mean).square().sum(dim=1)
        fid = diff + cov.diagonal(dim1=1, dim2=2).sum(dim=1) + real_cov.trace() - 2 * trace_sqrt
        out.append(fid.clamp(min=0))
    return torch.cat(out).cpu()


def interval(
    estimate: float, replicates: Tensor | np.ndarray, confidence: float = 0.95
) -> tuple[float, float]:
    """The ``confidence`` interval of a metric from its bootstrap replicates: their percentiles,
    shifted by the bootstrap's bias so that the interval is about the estimate (module doc).
    The one definition, for the cells' own intervals and for the report's comparisons."""
    reps = np.asarray(replicates, dtype=np.float64).ravel()
    reps = reps[np.isfinite(reps)]
    if len(reps) < 2 or not math.isfinite(estimate):
        return math.nan, math.nan
    alpha = (1 - confidence) / 2
    low, high = np.quantile(reps, [alpha, 1 - alpha])
    shift = reps.mean() - estimate
    return float(low - shift), float(high - shift)


def with_intervals(
    metrics: dict[str, float], replicates: dict[str, Tensor], confidence: float = 0.95
) -> dict[str, float]:
    """``metrics`` with ``<metric>_ci_low`` and ``<metric>_ci_high`` beside each metric that
    has replicates."""
    out = dict(metrics)
    for key, reps in replicates.items():
        if key in metrics:
            out[f"{key}_ci_low"], out[f"{key}_ci_high"] = interval(metrics[key], reps, confidence)
    return out


def paired_difference(
    estimate_a: float,
    estimate_b: float,
    replicates_a: Tensor,
    replicates_b: Tensor,
    confidence: float = 0.95,
) -> tuple[float, float, float]:
    """(a − b, low, high): the difference of two cells' metric and its interval from replicates
    drawn with the same counts (paired). An interval holding 0: the cells cannot be told apart
    at this sample size."""
    diff = estimate_a - estimate_b
    low, high = interval(diff, replicates_a.double() - replicates_b.double(), confidence)
    return diff, low, high
