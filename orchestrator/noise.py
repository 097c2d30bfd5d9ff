"""What a plan's sample size can tell apart, before anything trains.

`ddpm-sweep plan` and `run` score real data the way a cell will be scored: draws of
``eval.num_samples`` real samples (training images with the cells' labels, or the true 2-D
distribution) against the cells' reference, ``eval.floor_draws`` times
(lightning_modules/evaluate.py's `noise_floor`). The spread of those scores is the noise in one
cell's value; two cells scored independently must differ by about z·√2·sd to be told apart.
(Cells of one training are compared paired, which does better; the plan cannot know by how
much before the samples exist.) With ``eval.min_effect`` set, the smallest difference the user
wants to see, the plan warns when that is below what n can resolve, and says which n would do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

from lightning_modules.evaluate import eval_labels, noise_floor, prepare_context

from .plan import Plan
from .report import QUALITY_METRICS


@dataclass(frozen=True)
class NoiseCheck:
    metric: str
    n: int  # eval.num_samples
    mean: float  # what real data of that size scores: the metric's floor
    sd: float  # and its spread between draws
    draws: int
    confidence: float
    min_effect: float | None

    @property
    def resolution(self) -> float:
        """The smallest difference between two independently scored cells that stands out of
        their noise at this confidence: z·√2·sd."""
        z = NormalDist().inv_cdf(1 - (1 - self.confidence) / 2)
        return z * math.sqrt(2) * self.sd

    def needed_samples(self) -> int | None:
        """The n that resolves ``min_effect`` (the spread falls as 1/√n): None if n does."""
        if self.min_effect is None or self.min_effect >= self.resolution:
            return None
        return math.ceil(self.n * (self.resolution / self.min_effect) ** 2)

    def lines(self) -> list[str]:
        pct = f"{100 * self.confidence:g} %"
        out = [
            f"noise: real data of eval.num_samples = {self.n} scores {self.metric} "
            f"{self.mean:.3g} ± {self.sd:.2g} (mean ± sd of {self.draws} draws): two cells "
            f"scored independently differ by chance up to ~{self.resolution:.2g} ({pct}); "
            "cells compared paired (same seed) tell smaller differences apart"
        ]
        needed = self.needed_samples()
        if needed is not None:
            out.append(
                f"warning: eval.num_samples = {self.n} is too small for eval.min_effect = "
                f"{self.min_effect:g}: differences of {self.min_effect:g} in {self.metric} are "
                f"within noise at this n; about eval.num_samples = {needed:,} would resolve "
                "them unpaired (the report's paired comparisons may do with fewer)"
            )
        return out


def noise_check(plan: Plan) -> NoiseCheck | None:
    """The plan's noise check (module doc), from its first training's data and eval settings;
    None when ``eval.floor_draws`` is 0."""
    cfg = plan.trainings[0].config
    e = cfg.eval
    if not e.floor_draws:
        return None
    from lightning_modules.data import build_datamodule

    datamodule = build_datamodule(cfg.data)
    ctx = prepare_context(datamodule, e)
    labels = eval_labels(datamodule.num_classes, e.num_samples, cfg.sample.per_class)
    n = e.num_samples if labels is None else len(labels)
    floor = noise_floor(ctx, labels, n, e.floor_draws)
    metric = next(m for m, _ in QUALITY_METRICS if f"{m}_floor" in floor)
    return NoiseCheck(
        metric,
        n,
        floor[f"{metric}_floor"],
        floor[f"{metric}_floor_sd"],
        e.floor_draws,
        e.confidence,
        e.min_effect,
    )
