"""Which configurations of a sweep can be told apart from the best, read back from MLflow.

A *configuration* is an eval run's settings without its seeds: runs that differ only in
``train.seed`` or ``sample.seed`` (or are Tune samples of one point) are replicates of one
configuration, summarised by their mean, spread and count instead of ranked as rivals.

Each eval run carries its metrics' bootstrap replicates (``bootstrap.json``, one value per
resample; lightning_modules/evaluation/bootstrap.py). The comparison of a configuration with the
best is a bootstrap of their difference: in resample b, the difference of the b-th replicates,
averaged over the replicates (seeds) of each configuration, with the seeds themselves resampled
too when there are several. Runs sampled with the same ``sample.seed`` start from the same
noise and labels and were resampled with the same counts, so replicate b of one and of the
other are *paired*: the difference's interval is much tighter than the two intervals apart. A
configuration whose difference interval holds 0 is *within noise* of the best.

A run whose own interval does not overlap the best's is told apart without its replicates: the
spread of a difference is at most the sum of the two spreads, whatever their correlation, so
the difference's interval would not hold 0 either. Only the others' ``bootstrap.json`` are
read.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


def interval(estimate: float, replicates: np.ndarray, confidence: float) -> tuple[float, float]:
    """lightning_modules/evaluation/bootstrap.py's `interval`, the percentile interval of the
    replicates shifted by their bias, again in NumPy alone: importing that module imports torch
    (its package does), which put 2.2 s on every `ddpm-sweep report` (benchmarks/
    tracking_scale.py). tests/test_compare.py holds the two equal."""
    reps = np.asarray(replicates, dtype=np.float64).ravel()
    reps = reps[np.isfinite(reps)]
    if len(reps) < 2 or not math.isfinite(estimate):
        return math.nan, math.nan
    tail = (1 - confidence) / 2
    low, high = np.quantile(reps, [tail, 1 - tail]) - (reps.mean() - estimate)
    return float(low), float(high)


log = logging.getLogger(__name__)

REPLICATE_KEYS = ("train.seed", "sample.seed")  # what replicates of a configuration differ in
REPLICATES_ARTIFACT = "bootstrap.json"  # each eval run's replicates (orchestrator/trial.py)
SEED_RESAMPLING_SEED = 0


def config_key(params: dict[str, str]) -> tuple:
    """What a configuration is: every param but the seeds."""
    return tuple(sorted((k, v) for k, v in params.items() if k not in REPLICATE_KEYS))


@dataclass
class Configuration:
    """The eval runs of one configuration (one, or several replicates) and how it compares."""

    runs: list
    metric: str
    mean: float = math.nan
    sd: float = math.nan  # between replicates; nan for one
    ci_low: float = math.nan  # of the mean
    ci_high: float = math.nan
    verdict: str = ""  # best | within noise | worse | "" (no intervals to tell)
    diff: float = math.nan  # mean minus the best's
    diff_low: float = math.nan
    diff_high: float = math.nan
    replicates: np.ndarray | None = field(default=None, repr=False)  # (n, B) by seed, once read

    @property
    def n(self) -> int:
        return len(self.runs)

    @property
    def best_run(self):
        """Its run with the best value (the one a registered model is taken from)."""
        return self.runs[0]

    def values(self) -> np.ndarray:
        return np.array([r.data.metrics[self.metric] for r in self.runs], dtype=np.float64)

    @property
    def seeds(self) -> list[tuple]:
        """Its replicates' seeds, in the order of its replicates' rows."""
        return [_replicate_order(r)[:-1] for r in sorted(self.runs, key=_replicate_order)]

    @property
    def tied(self) -> bool:
        return self.verdict == "within noise"


@dataclass
class Comparison:
    """Every configuration of a sweep, best first, with its verdict against the best."""

    metric: str
    lower: bool
    confidence: float
    configurations: list[Configuration]

    @property
    def best(self) -> Configuration | None:
        return self.configurations[0] if self.configurations else None

    @property
    def ties(self) -> list[Configuration]:
        return [c for c in self.configurations if c.tied]

    @property
    def has_replicates(self) -> bool:
        return any(c.n > 1 for c in self.configurations)

    def sentence(self, name=lambda c: c.best_run.info.run_name) -> str:
        """The comparison in words, for the summary, the report and the registered model."""
        best = self.best
        if best is None:
            return ""
        if best.verdict != "best":
            return (
                f"The runs carry no bootstrap intervals (eval.bootstrap = 0): which "
                f"configurations are within noise of the best by {self.metric} is not known."
            )
        pct = f"{100 * self.confidence:g} %"
        ties = self.ties
        if not ties:
            return (
                f"No other configuration is within noise of the best by {self.metric} "
                f"({pct} paired bootstrap)."
            )
        listed = ", ".join(name(c) for c in ties[:5]) + (", ..." if len(ties) > 5 else "")
        verb = "is" if len(ties) == 1 else "are"
        return (
            f"{len(ties)} configuration{'s' if len(ties) > 1 else ''} {verb} within noise of the "
            f"best by {self.metric} ({pct} paired bootstrap; the difference's interval holds 0): "
            f"{listed}. The best among them is not established at this sample size."
        )


def compare(evals: list, metric: str, lower: bool, load, confidence: float = 0.95) -> Comparison:
    """Group ``evals`` (MLflow eval runs that have ``metric``) into configurations, best mean
    first, and give each its verdict against the best. ``load(run) -> dict | None`` reads a
    run's ``bootstrap.json`` (:func:`artifact_loader`)."""
    sign = 1.0 if lower else -1.0
    groups: dict[tuple, list] = {}
    for run in evals:
        if metric in run.data.metrics:
            groups.setdefault(config_key(run.data.params), []).append(run)
    configs = []
    for runs in groups.values():
        runs.sort(key=lambda r: (sign * r.data.metrics[metric], _replicate_order(r)))
        c = Configuration(runs, metric)
        c.mean = float(c.values().mean())
        c.sd = float(c.values().std(ddof=1)) if c.n > 1 else math.nan
        configs.append(c)
    configs.sort(key=lambda c: sign * c.mean)
    comparison = Comparison(metric, lower, confidence, configs)
    if configs:
        _judge(comparison, load)
    return comparison


def _replicate_order(run) -> tuple:
    return tuple(run.data.params.get(k, "") for k in REPLICATE_KEYS) + (run.info.start_time,)


def _judge(comparison: Comparison, load) -> None:
    best, conf, metric = comparison.best, comparison.confidence, comparison.metric
    if not _read(best, load):
        _own_intervals_only(comparison)
        return
    best.ci_low, best.ci_high = _mean_interval(best, None, conf)
    best.verdict = "best"
    best.diff = best.diff_low = best.diff_high = 0.0
    for c in comparison.configurations[1:]:
        if c.n == 1 and _apart(c.runs[0], best, metric):
            c.ci_low, c.ci_high = _logged_interval(c.runs[0], metric)
            c.diff = c.mean - best.mean
            c.verdict = "worse"
            continue
        if not _read(c, load):
            c.verdict = ""
            continue
        c.ci_low, c.ci_high = _mean_interval(c, None, conf)
        c.diff = c.mean - best.mean
        c.diff_low, c.diff_high = _mean_interval(c, best, conf)
        c.verdict = "within noise" if c.diff_low <= 0 <= c.diff_high else "worse"


def _own_intervals_only(comparison: Comparison) -> None:
    """Without the best's replicates: each single run's logged interval, no verdicts."""
    for c in comparison.configurations:
        if c.n == 1:
            c.ci_low, c.ci_high = _logged_interval(c.runs[0], comparison.metric)


def _logged_interval(run, metric: str) -> tuple[float, float]:
    m = run.data.metrics
    return m.get(f"{metric}_ci_low", math.nan), m.get(f"{metric}_ci_high", math.nan)


def _apart(run, best: Configuration, metric: str) -> bool:
    """The run's own interval and the best's do not overlap."""
    low, high = _logged_interval(run, metric)
    if math.isnan(low) or math.isnan(best.ci_low):
        return False
    return high < best.ci_low or low > best.ci_high


def _read(c: Configuration, load) -> bool:
    """Read the configuration's replicates of its metric: (n, B); False if any run lacks them
    or they differ in length."""
    if c.replicates is not None:
        return True
    rows = []
    for run in sorted(c.runs, key=_replicate_order):  # row i: the same seed in every config
        data = load(run)
        reps = None if data is None else data.get("metrics", {}).get(c.metric)
        if reps is None:
            return False
        rows.append(np.asarray(reps, dtype=np.float64))
    if len({len(r) for r in rows}) != 1:
        return False
    c.replicates = np.stack(rows)
    return True


def _mean_interval(
    c: Configuration, minus: Configuration | None, confidence: float
) -> tuple[float, float]:
    """Interval of c's mean (minus ``minus``'s mean): in resample b, the b-th replicates
    averaged over seeds drawn with replacement (the same draw for both when they have the same
    seeds, which pairs them seed for seed)."""
    a = c.replicates
    estimate = c.mean - (minus.mean if minus else 0.0)
    b = None if minus is None else minus.replicates
    if b is not None and b.shape[1] != a.shape[1]:
        return math.nan, math.nan
    rng = np.random.default_rng(SEED_RESAMPLING_SEED)
    resamples = a.shape[1]
    reps = _seed_means(a, rng, resamples)
    if b is not None:
        # The same seeds in both: resample them together (paired, seed for seed); else apart.
        paired = minus.seeds == c.seeds
        other = np.random.default_rng(SEED_RESAMPLING_SEED) if paired else rng
        reps = reps - _seed_means(b, other, resamples)
    return interval(estimate, reps, confidence)


def _seed_means(replicates: np.ndarray, rng, resamples: int) -> np.ndarray:
    """(B,): replicate b averaged over n seeds drawn with replacement (one seed: itself)."""
    n = replicates.shape[0]
    if n == 1:
        return replicates[0]
    seeds = rng.integers(0, n, size=(resamples, n))
    return replicates[seeds, np.arange(resamples)[:, None]].mean(axis=1)


def artifact_loader(client):
    """``load(run)``: the run's ``bootstrap.json`` as a dict, None where it has none."""

    def load(run) -> dict | None:
        with tempfile.TemporaryDirectory() as tmp, _no_progress_bars():
            try:
                path = client.download_artifacts(run.info.run_id, REPLICATES_ARTIFACT, tmp)
            except Exception as err:  # noqa: BLE001 - absent (bootstrap off, an older run)
                log.debug("no %s in run %s: %s", REPLICATES_ARTIFACT, run.info.run_id, err)
                return None
            return json.loads(Path(path).read_text())

    return load


@contextlib.contextmanager
def _no_progress_bars():
    """MLflow draws a progress bar on stderr for every download: one per run read."""
    name = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    before = os.environ.get(name)
    os.environ[name] = "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


@dataclass
class Contrast:
    """One configuration against the one that differs from it only in ``key``, set to the
    baseline value: the difference of their means and its (paired) interval."""

    key: str
    baseline: str
    value: str
    setting: dict[str, str]  # the other keys that vary, as in both configurations
    config: Configuration
    reference: Configuration
    diff: float = math.nan
    low: float = math.nan
    high: float = math.nan

    @property
    def verdict(self) -> str:
        if math.isnan(self.low):
            return ""
        return "within noise" if self.low <= 0 <= self.high else "differs"


def contrasts(comparison: Comparison, key: str, baseline: str | None, load) -> list[Contrast]:
    """Every configuration against its twin at ``key`` = ``baseline`` (default: the key's
    smallest value): e.g. `sample.variance` gives fixed_large − fixed_small at every other
    setting. Raises ValueError for a key that does not vary."""
    configs = comparison.configurations
    values = sorted({c.best_run.data.params.get(key) for c in configs} - {None}, key=_natural)
    if len(values) < 2:
        raise ValueError(
            f"--contrast {key}: the sweep's runs do not vary in {key!r} "
            f"(values: {values or 'none'})"
        )
    if baseline is None:
        baseline = values[0]
    if baseline not in values:
        raise ValueError(f"--contrast {key}={baseline}: {key} takes {', '.join(values)}")

    def rest(c: Configuration) -> tuple:
        return tuple(kv for kv in config_key(c.best_run.data.params) if kv[0] != key)

    twins = {rest(c): c for c in configs if c.best_run.data.params.get(key) == baseline}
    varying = _varying([c.best_run.data.params for c in configs], exclude={key})
    out = []
    for c in configs:
        reference = twins.get(rest(c))
        value = c.best_run.data.params.get(key)
        if reference is None or value == baseline:
            continue
        params = c.best_run.data.params
        row = Contrast(key, baseline, value, {k: params.get(k, "") for k in varying}, c, reference)
        row.diff = c.mean - reference.mean
        if _read(c, load) and _read(reference, load):
            row.low, row.high = _mean_interval(c, reference, comparison.confidence)
        out.append(row)
    out.sort(key=lambda r: ([_natural(v) for v in r.setting.values()], _natural(r.value)))
    return out


def _natural(value: str) -> tuple:
    """Numbers by value, then strings: 2 < 10 < 'cosine'."""
    try:
        return (0, float(value), "")
    except (TypeError, ValueError):
        return (1, 0.0, str(value))


def _varying(params: list[dict], exclude: set[str]) -> list[str]:
    keys = sorted(set().union(*params)) if params else []
    return [
        k
        for k in keys
        if k not in exclude and k not in REPLICATE_KEYS and len({p.get(k) for p in params}) > 1
    ]
