"""Sweep files: a base run config, a search space over config key paths, and Tune settings.

```yaml
name: quickstart
base:                      # any run-config key (lightning_modules/config.py)
  data: {name: digits}
search:                    # key path -> a list (grid) or {choice|uniform|loguniform|randint: ...}
  diffusion.schedule: [linear, cosine]
  sample.guidance: [0, 1, 3]        # sampling-time: evaluated from each checkpoint
tune:
  search_alg: grid         # grid | random | bayes (Optuna)
  scheduler: fifo          # fifo | asha
```

Everything is validated here, before Ray starts: errors name the file, the key path and what was
expected, with a "did you mean" for misspelt keys.
"""

from __future__ import annotations

import difflib
import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lightning_modules.config import ConfigError, ExperimentConfig, load_config, omegaconf_message

DISTRIBUTIONS = ("grid", "choice", "uniform", "loguniform", "randint")
SEARCH_ALGS = ("grid", "random", "bayes")
SCHEDULERS = ("fifo", "asha")
# What a training trial reports to Tune at each validation (ASHA and the searchers use these).
TRAINING_METRICS = ("val/loss_simple", "val/bpd", "train/loss")
SAMPLING_SECTION = "sample"  # every key under it is sampling-time: see is_sampling_time


def is_sampling_time(key: str) -> bool:
    """The one registry of sampling-time keys: the `sample` section of the run config (variance,
    guidance weight, steps, sampler, η, guidance rescale/interval, threshold, seed, ...)."""
    return key.split(".", 1)[0] == SAMPLING_SECTION


@dataclass
class TuneSettings:
    search_alg: str = "grid"
    scheduler: str = "fifo"
    metric: str = "val/loss_simple"
    mode: str = "min"
    num_samples: int = 1
    max_concurrent_trials: int = 2
    max_failures: int = 1  # retries per trial
    seed: int = 0
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    # Custom Ray resources per trial, e.g. {accelerator_type:A100: 0.01} or a label that `ray
    # start --resources` gave some nodes: trials then only run on nodes that have it.
    resources_per_trial: dict[str, float] = field(default_factory=dict)
    # Run the next trial in a finished trial's worker process (same resources): a fresh process
    # spends ~9 s importing torch, Lightning and MLflow (benchmarks/sweep_overhead.py).
    reuse_actors: bool = True
    grace_period: int = 1  # ASHA: reports before a trial can be stopped
    reduction_factor: int = 2


@dataclass
class SweepFile:
    name: str = "sweep"
    base: Any = field(default_factory=dict)
    search: Any = field(default_factory=dict)
    tune: TuneSettings = field(default_factory=TuneSettings)


@dataclass
class Axis:
    key: str
    kind: str  # one of DISTRIBUTIONS
    values: list  # grid/choice values, or [low, high]

    @property
    def sampling_time(self) -> bool:
        return is_sampling_time(self.key)


@dataclass
class Sweep:
    name: str
    source: str
    base: DictConfig  # the validated run config every trial starts from
    axes: list[Axis]
    tune: TuneSettings

    @property
    def training_axes(self) -> list[Axis]:
        return [a for a in self.axes if not a.sampling_time]

    @property
    def sampling_axes(self) -> list[Axis]:
        return [a for a in self.axes if a.sampling_time]


def _config_keys(node: Any, prefix: str = "") -> list[str]:
    if isinstance(node, (dict, DictConfig)):
        out = []
        for k, v in node.items():
            out += _config_keys(v, f"{prefix}.{k}" if prefix else str(k))
        return out or [prefix]
    return [prefix]


KNOWN_KEYS = _config_keys(OmegaConf.to_container(OmegaConf.structured(ExperimentConfig)))


def _check_key(where: str, key: str) -> None:
    if key in KNOWN_KEYS or key.startswith("network."):
        return
    close = difflib.get_close_matches(key, KNOWN_KEYS, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ConfigError(f"{where}: search.{key}: unknown config key{hint}")


def _parse_axis(where: str, key: str, spec: Any) -> Axis:
    _check_key(where, key)
    path = f"search.{key}"
    if isinstance(spec, (list, ListConfig)):
        kind, values = "grid", list(spec)
    elif isinstance(spec, (dict, DictConfig)) and len(spec) == 1:
        kind, values = next(iter(spec.items()))
        if kind not in DISTRIBUTIONS:
            raise ConfigError(
                f"{where}: {path}: unknown distribution {kind!r}; expected one of "
                f"{list(DISTRIBUTIONS)}"
            )
        values = list(values) if isinstance(values, (list, ListConfig)) else values
    else:
        raise ConfigError(
            f"{where}: {path} = {spec!r}: expected a list of values (a grid) or "
            f"one of {{{', '.join(DISTRIBUTIONS)}: ...}}"
        )
    if not isinstance(values, list) or not values:
        raise ConfigError(f"{where}: {path}.{kind}: expected a non-empty list, got {values!r}")
    if kind in ("uniform", "loguniform", "randint"):
        if len(values) != 2 or not all(isinstance(v, (int, float)) for v in values):
            raise ConfigError(f"{where}: {path}.{kind} = {values!r}: expected [low, high]")
        low, high = values
        if not low < high or (kind == "loguniform" and low <= 0):
            raise ConfigError(
                f"{where}: {path}.{kind} = {values!r}: expected low < high"
                + (" and low > 0" if kind == "loguniform" else "")
            )
    axis = Axis(
        key,
        kind,
        [
            OmegaConf.to_container(v) if isinstance(v, (DictConfig, ListConfig)) else v
            for v in values
        ],
    )
    if axis.sampling_time and kind not in ("grid", "choice"):
        raise ConfigError(
            f"{where}: {path}: sampling-time axes are evaluated from every "
            f"checkpoint, so they take a list of values, not {kind}"
        )
    return axis


def _check_tune(where: str, t: TuneSettings, base: DictConfig, axes: list[Axis]) -> None:
    def expect(ok, key, value, expected):
        if not ok:
            raise ConfigError(f"{where}: tune.{key} = {value!r} is invalid: expected {expected}")

    expect(t.search_alg in SEARCH_ALGS, "search_alg", t.search_alg, f"one of {list(SEARCH_ALGS)}")
    expect(t.scheduler in SCHEDULERS, "scheduler", t.scheduler, f"one of {list(SCHEDULERS)}")
    expect(t.mode in ("min", "max"), "mode", t.mode, "'min' or 'max'")
    reported = [m for m in TRAINING_METRICS if m != "val/bpd" or base.train.bpd_subset > 0]
    expect(
        t.metric in reported,
        "metric",
        t.metric,
        f"a metric the training trials report: one of {reported}",
    )
    expect(t.num_samples >= 1, "num_samples", t.num_samples, "an integer >= 1")
    expect(t.max_concurrent_trials >= 1, "max_concurrent_trials", t.max_concurrent_trials, ">= 1")
    expect(t.max_failures >= 0, "max_failures", t.max_failures, "an integer >= 0")
    expect(t.cpus_per_trial > 0, "cpus_per_trial", t.cpus_per_trial, "a number > 0")
    expect(t.gpus_per_trial >= 0, "gpus_per_trial", t.gpus_per_trial, "a number >= 0")
    for name, amount in t.resources_per_trial.items():
        expect(amount > 0, f"resources_per_trial.{name}", amount, "a number > 0")
        expect(
            name.upper() not in ("CPU", "GPU"),
            f"resources_per_trial.{name}",
            amount,
            "a custom resource name (use cpus_per_trial / gpus_per_trial for CPUs and GPUs)",
        )
    expect(t.grace_period >= 1, "grace_period", t.grace_period, "an integer >= 1")
    expect(t.reduction_factor >= 2, "reduction_factor", t.reduction_factor, "an integer >= 2")
    searched = [a for a in axes if not a.sampling_time and a.kind != "grid"]
    if t.search_alg == "grid" and searched:
        raise ConfigError(
            f"{where}: search.{searched[0].key}: tune.search_alg = 'grid' takes "
            "lists only; use search_alg 'random' or 'bayes' for distributions"
        )
    grids = [a for a in axes if not a.sampling_time and a.kind == "grid"]
    if t.search_alg == "bayes" and grids:
        raise ConfigError(
            f"{where}: search.{grids[0].key}: tune.search_alg = 'bayes' (Optuna) "
            "cannot expand a grid; write {choice: [...]} instead"
        )


def training_grid(sweep: Sweep) -> list[dict[str, Any]]:
    """Every combination of the training-time grid axes (one dict of overrides each)."""
    grid = [a for a in sweep.training_axes if a.kind == "grid"]
    return [
        dict(zip([a.key for a in grid], combo))
        for combo in itertools.product(*[a.values for a in grid])
    ]


def _check_combinations(sweep: Sweep) -> None:
    """Every grid combination must be a valid run config (so no trial fails on bad input)."""
    fixed = {a.key: a.values[0] for a in sweep.training_axes if a.kind != "grid"}
    for combo in training_grid(sweep):
        overrides = combo | fixed | sampling_overrides(sweep, union=True)
        try:
            load_config(sweep.base, [f"{k}={_yaml(v)}" for k, v in overrides.items()])
        except ConfigError as err:
            detail = str(err).split(": ", 1)[-1]
            raise ConfigError(f"{sweep.source}: with {overrides}: {detail}") from None


def sampling_overrides(sweep: Sweep, union: bool = False) -> dict[str, Any]:
    """List-valued sample keys (guidance, variance, steps) take the union of their axis values."""
    out = {}
    for a in sweep.sampling_axes:
        list_valued = isinstance(sweep.base.sample[a.key.split(".", 1)[1]], (list, ListConfig))
        if list_valued:
            out[a.key] = sorted({v for v in _flatten(a.values)}, key=_sort_key)
        elif union:
            out[a.key] = a.values[0]
    return out


def _flatten(values):
    for v in values:
        yield from (v if isinstance(v, list) else [v])


def _sort_key(v):
    return (0, v, "") if isinstance(v, (int, float)) else (1, 0, str(v))


def _yaml(v: Any) -> str:
    if isinstance(v, float) and not math.isfinite(v):
        return ".nan" if math.isnan(v) else (".inf" if v > 0 else "-.inf")
    return (
        OmegaConf.to_yaml({"v": v}).split(":", 1)[1].strip()
        if isinstance(v, (list, dict))
        else str(v)
    )


def load_sweep(path: str | Path, overrides: list[str] = (), name: str | None = None) -> Sweep:
    """Read and validate a sweep file; `overrides` are `key=value` on the sweep file itself
    (e.g. `base.train.max_steps=100`, `tune.max_concurrent_trials=1`)."""
    where = str(path)
    if not Path(path).is_file():
        raise ConfigError(f"{where}: no such sweep file")
    try:
        raw = OmegaConf.load(path)
        unknown = set(raw.keys()) - {"name", "base", "search", "tune"}
        if unknown:
            key = sorted(unknown)[0]
            close = difflib.get_close_matches(key, ["name", "base", "search", "tune"], n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(
                f"{where}: {key}: unknown top-level key{hint} (expected name, base, search, tune)"
            )
        spec = OmegaConf.merge(
            OmegaConf.structured(SweepFile), raw, OmegaConf.from_dotlist(list(overrides))
        )
    except OmegaConfBaseException as err:
        raise ConfigError(f"{where}: {omegaconf_message(err)}") from None
    base = load_config(OmegaConf.to_container(spec.base) if spec.base else None, where=where)
    axes = [_parse_axis(where, str(k), v) for k, v in (spec.search or {}).items()]
    tune = OmegaConf.to_object(spec.tune)
    _check_tune(where, tune, base, axes)
    sweep = Sweep(name or spec.name, where, base, axes, tune)
    _check_combinations(sweep)
    return sweep
