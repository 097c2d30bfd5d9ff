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

This module reads and checks the file itself (keys, axes, Tune settings); the plan
(``orchestrator/plan.py``) checks every training configuration and sampling cell it implies.
Errors name the file, the line and column, the key path as written (``base.train.lr``,
``search.sample.guidance[2]``) and what was expected, with a "did you mean" for misspelt keys.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lightning_modules.config import (
    CELL_LISTS,
    EXECUTION_KEYS,
    ConfigError,
    config_error,
    config_keys,
    did_you_mean,
    load_config,
)
from lightning_modules.data import describe_data
from lightning_modules.evaluate import quality_metrics

from .yaml_source import Source, get_yaml_loader, read_yaml

DISTRIBUTIONS = ("grid", "choice", "uniform", "loguniform", "randint")
SEARCH_ALGS = ("grid", "random", "bayes")
SCHEDULERS = ("fifo", "asha")
# What a training trial reports to Tune at each validation (ASHA and the searchers use these).
TRAINING_METRICS = ("val/loss_simple", "val/bpd", "train/loss")
SAMPLING_SECTION = "sample"  # every key under it is sampling-time: see is_sampling_time
TOP_LEVEL = ("name", "base", "search", "tune", "sample_search")
SEARCH_ALGORITHMS = ("tpe", "random")  # sample_search.algorithm: Optuna's samplers
PRUNERS = ("paired", "halving", "median", "none")  # sample_search.pruner
# What a distribution on a sampling-time key may be: by the key's type (the SamplingSpec field).
SEARCHABLE = {
    "guidance": ("uniform", "loguniform", "choice"),
    "guidance_rescale": ("uniform", "choice"),
    "eta": ("uniform", "loguniform", "choice"),
    "steps": ("randint", "choice"),
    "variance": ("choice",),
    "sampler": ("choice",),
    "threshold": ("choice",),
    "guidance_interval": ("choice",),
}
# A sweep name becomes an MLflow experiment, a registered model and a directory under the
# storage path: a plain name, never a path.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


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
class SampleSearch:
    """``sample_search:``: how each training searches its distributions on ``sample.*`` keys
    (orchestrator/sample_search.py). A study per grid combination of the sampling lists."""

    algorithm: str = "tpe"  # Optuna's sampler: tpe | random
    cells: int = 16  # evaluated cells per study (per training and grid combination)
    metric: str | None = None  # the objective; default: the data's quality metric (fid, ...)
    mode: str | None = None  # min | max; default: the metric's own direction
    seed: int = 0  # the sampler's seed (each grid combination's study: seed + its index)
    chunks: int = 4  # multi-fidelity: each cell's evaluation set drawn and measured in chunks
    pruner: str = "paired"  # paired | halving | median | none: stop cells clearly worse early


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

    def extremes(self) -> list:
        """The values that stand for every draw: each choice, or both bounds (inclusive)."""
        return list(self.values)

    def flat_values(self) -> list:
        """The values, a list value spread out (`sample.guidance: [[0, 1], 3]` is 0, 1, 3):
        what a cell list (guidance, variance, steps) takes, positions as in the file."""
        return [x for v in self.values for x in (v if isinstance(v, list) else [v])]


@dataclass
class Sweep:
    name: str
    source: str
    base: DictConfig  # the validated run config every trial starts from
    axes: list[Axis]
    tune: TuneSettings
    file: Source | None = None  # the parsed file: where each key stands, for errors
    sample_search: SampleSearch | None = None  # searched sampling-time axes: how

    @property
    def training_axes(self) -> list[Axis]:
        return [a for a in self.axes if not a.sampling_time]

    @property
    def sampling_axes(self) -> list[Axis]:
        return [a for a in self.axes if a.sampling_time]

    @property
    def searched_axes(self) -> list[Axis]:
        """Sampling-time axes with a distribution: searched per checkpoint, not a grid."""
        return [a for a in self.sampling_axes if a.kind != "grid"]


KNOWN_KEYS = config_keys()


def _check_key(where: str, key: str) -> None:
    path = f"search.{key}"
    if key not in KNOWN_KEYS and not key.startswith("network."):
        raise ConfigError(
            f"{where}: {path}: unknown config key{did_you_mean(key, KNOWN_KEYS)}", path
        )
    if is_sampling_time(key) and key.split(".", 1)[1] in EXECUTION_KEYS:
        raise ConfigError(
            f"{where}: {path}: how cells are run, not what they sample, so not an axis: "
            f"set base.{key} instead",
            path,
        )


def _plain(v: Any) -> Any:
    return OmegaConf.to_container(v) if isinstance(v, (DictConfig, ListConfig)) else v


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
                f"{list(DISTRIBUTIONS)}",
                path,
            )
        path = f"{path}.{kind}"
        values = list(values) if isinstance(values, (list, ListConfig)) else values
    else:
        raise ConfigError(
            f"{where}: {path} = {_plain(spec)!r}: expected a list of values (a grid) or "
            f"one of {{{', '.join(DISTRIBUTIONS)}: ...}}",
            path,
        )
    if not isinstance(values, list) or not values:
        raise ConfigError(
            f"{where}: {path}{'' if kind != 'grid' else '.grid'}: expected a non-empty list, "
            f"got {values!r}",
            path,
        )
    if kind in ("uniform", "loguniform", "randint"):
        if len(values) != 2 or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in values
        ):
            raise ConfigError(f"{where}: {path} = {values!r}: expected [low, high]", path)
        low, high = values
        if not low < high or (kind == "loguniform" and low <= 0):
            raise ConfigError(
                f"{where}: {path} = {values!r}: expected low < high"
                + (" and low > 0" if kind == "loguniform" else ""),
                path,
            )
    axis = Axis(key, kind, [_plain(v) for v in values])
    field_name = key.split(".", 1)[1] if axis.sampling_time else ""
    if axis.sampling_time and kind != "grid" and kind not in SEARCHABLE.get(field_name, ()):
        allowed = SEARCHABLE.get(field_name)
        expected = (
            f"one of {{{', '.join(allowed)}: ...}} or a list of values"
            if allowed
            else "a list of values (it is not searched)"
        )
        raise ConfigError(
            f"{where}: {path}: sample.{field_name} cannot take a {kind} distribution: "
            f"expected {expected}",
            path,
        )
    return axis


def _check_tune(where: str, t: TuneSettings, base: DictConfig, axes: list[Axis]) -> None:
    def expect(ok, key, value, expected):
        if not ok:
            raise ConfigError(
                f"{where}: tune.{key} = {value!r} is invalid: expected {expected}", f"tune.{key}"
            )

    expect(t.search_alg in SEARCH_ALGS, "search_alg", t.search_alg, f"one of {list(SEARCH_ALGS)}")
    expect(t.scheduler in SCHEDULERS, "scheduler", t.scheduler, f"one of {list(SCHEDULERS)}")
    expect(t.mode in ("min", "max"), "mode", t.mode, "'min' or 'max'")
    reported = [m for m in TRAINING_METRICS if m != "val/bpd" or base.train.bpd_subset > 0]
    periodic = base.eval.periodic
    quality = {}
    if periodic.every_n_steps:  # eval.periodic: sample quality at validations (eval/<metric>)
        data = describe_data(base.data)
        measured = quality_metrics(data.kind, bool(data.num_classes))
        quality = {f"eval/{m}": mode for m, mode in measured.items()}
        reported += list(quality)
    hint = (
        ""
        if quality or not t.metric.startswith("eval/")
        else " (a sample-quality metric needs base.eval.periodic.every_n_steps > 0: sample "
        "quality measured during training)"
    )
    expect(
        t.metric in reported,
        "metric",
        t.metric,
        f"a metric the training trials report: one of {reported}{hint}",
    )
    if t.metric in quality:
        better = "lower" if quality[t.metric] == "min" else "higher"
        expect(
            t.mode == quality[t.metric],
            "mode",
            t.mode,
            f"{quality[t.metric]!r} ({better} {t.metric} is better)",
        )
        val_every = base.train.val_every_n_steps
        if periodic.every_n_steps != val_every:
            raise ConfigError(
                f"{where}: base.eval.periodic.every_n_steps = {periodic.every_n_steps} is invalid "
                f"with tune.metric = {t.metric!r}: expected train.val_every_n_steps = "
                f"{val_every} (each report to Tune, one per validation, must carry the metric)",
                "base.eval.periodic.every_n_steps",
            )
    expect(t.num_samples >= 1, "num_samples", t.num_samples, "an integer >= 1")
    expect(t.max_concurrent_trials >= 1, "max_concurrent_trials", t.max_concurrent_trials, ">= 1")
    expect(t.max_failures >= 0, "max_failures", t.max_failures, "an integer >= 0")
    expect(t.cpus_per_trial > 0, "cpus_per_trial", t.cpus_per_trial, "a number > 0")
    expect(
        0 <= t.gpus_per_trial <= 1 or float(t.gpus_per_trial).is_integer(),
        "gpus_per_trial",
        t.gpus_per_trial,
        "a number >= 0: a fraction of one GPU (<= 1) or a whole number of GPUs",
    )
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
            "lists only; use search_alg 'random' or 'bayes' for distributions",
            f"search.{searched[0].key}",
        )
    grids = [a for a in axes if not a.sampling_time and a.kind == "grid"]
    if t.search_alg == "bayes" and grids:
        raise ConfigError(
            f"{where}: search.{grids[0].key}: tune.search_alg = 'bayes' (Optuna) "
            "cannot expand a grid; write {choice: [...]} instead",
            f"search.{grids[0].key}",
        )


def training_grid(sweep: Sweep) -> list[dict[str, Any]]:
    """Every combination of the training-time grid axes (one dict of overrides each)."""
    grid = [a for a in sweep.training_axes if a.kind == "grid"]
    return [
        dict(zip([a.key for a in grid], combo))
        for combo in itertools.product(*[a.values for a in grid])
    ]


def apply_overrides(source: Source, overrides: list[str] | tuple[str, ...]) -> None:
    """``key=value`` overrides on the sweep file, as if written in it: ``base.train.lr=1e-3``,
    ``tune.max_concurrent_trials=1``, ``search.sample.guidance=[0,1]`` (after ``search.`` the
    rest is one axis key, dots and all). Values are YAML, read as the file is."""
    for text in overrides:
        key, sep, value = text.partition("=")
        key = key.strip()
        head, _, rest = key.partition(".")
        if not sep or head not in TOP_LEVEL or (head != "name" and not rest):
            raise ConfigError(
                f"{source.path}: override {text!r}: expected key=value with the key under one "
                f"of {', '.join(TOP_LEVEL)} (e.g. base.train.max_steps=200)"
            )
        try:
            parsed = yaml.load(value, Loader=get_yaml_loader()) if value.strip() else None
        except yaml.YAMLError as err:
            raise ConfigError(
                f"{source.path}: override {text!r}: not a YAML value ({str(err).splitlines()[0]})"
            ) from None
        path = [head] if head == "name" else [head, rest] if head == "search" else key.split(".")
        node = source.data
        for part in path[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[path[-1]] = parsed
        source.overrides[key] = text


def load_sweep(path: str | Path, overrides: list[str] = (), name: str | None = None) -> Sweep:
    """Read and check a sweep file; `overrides` are `key=value` on the sweep file itself
    (e.g. `base.train.max_steps=100`, `tune.max_concurrent_trials=1`). Errors point at the
    key as the user wrote it, in the file (`file:line:column`) or on the command line."""
    source = read_yaml(path)
    try:
        apply_overrides(source, overrides)
        if name is not None:
            source.data["name"] = name
            source.overrides["name"] = f"--name {name}"
        return _parse(source)
    except ConfigError as err:
        raise source.locate(err) from None


def _parse(source: Source) -> Sweep:
    where, raw = source.path, source.data
    unknown = [k for k in raw if k not in TOP_LEVEL]
    if unknown:
        raise ConfigError(
            f"{where}: {unknown[0]}: unknown top-level key{did_you_mean(unknown[0], TOP_LEVEL)} "
            f"(expected {', '.join(TOP_LEVEL)})",
            unknown[0],
        )
    if not raw.get("base") and not raw.get("search"):
        raise ConfigError(
            f"{where}: nothing to sweep: expected a `base:` run config and/or a `search:` of "
            "axes (see sweeps/quickstart.yaml)"
        )
    for section in ("base", "search", "tune"):
        if raw.get(section) is not None and not isinstance(raw[section], dict):
            raise ConfigError(
                f"{where}: {section}: expected a mapping, got {type(raw[section]).__name__}",
                section,
            )
    sweep_name = raw.get("name", SweepFile.name)
    if not isinstance(sweep_name, str) or not NAME_PATTERN.fullmatch(sweep_name):
        raise ConfigError(
            f"{where}: name = {sweep_name!r} is invalid: expected a plain name of letters, "
            "digits, '.', '_' and '-' (it names the MLflow experiment and a directory under "
            "the storage path), at most 100 characters",
            "name",
        )
    axes = [_parse_axis(where, str(k), v) for k, v in (raw.get("search") or {}).items()]
    # A sampling list that an axis replaces is not the base's to check (its default steps may
    # exceed a small T): the axis values are checked one by one by the plan.
    replaced = {a.key.split(".", 1)[1]: a for a in axes if a.key in cell_lists()}
    raw_base = dict(raw.get("base") or {})
    if replaced:
        placeholder = {"guidance": [1.0], "variance": ["fixed_small"], "steps": [1]}
        raw_base["sample"] = dict(raw_base.get("sample") or {}) | {
            k: placeholder[k] for k in replaced
        }
    base = load_config(raw_base or None, where=where, prefix="base")
    for k, axis in replaced.items():
        # The cells' lists: the axis values, once each (the plan builds its cells from them); a
        # searched key's list holds one placeholder, its first value, which each study replaces.
        values = axis.flat_values() if axis.kind == "grid" else axis.values[:1]
        OmegaConf.update(base, f"sample.{k}", list(dict.fromkeys(values)), merge=False)
    try:
        tune = OmegaConf.to_object(
            OmegaConf.merge(OmegaConf.structured(TuneSettings), raw.get("tune") or {})
        )
    except OmegaConfBaseException as err:
        raise config_error(err, where, "tune", list(TuneSettings.__dataclass_fields__)) from None
    _check_tune(where, tune, base, axes)
    search = _parse_sample_search(where, raw, axes)
    return Sweep(sweep_name, where, base, axes, tune, source, search)


def _parse_sample_search(where: str, raw: dict, axes: list[Axis]) -> SampleSearch | None:
    """The ``sample_search`` section, checked against the searched axes: there is one exactly
    when some sampling-time axis has a distribution."""
    searched = [a for a in axes if a.sampling_time and a.kind != "grid"]
    section = raw.get("sample_search")
    if section is None:
        if searched:
            a = searched[0]
            path = f"search.{a.key}.{a.kind}"
            raise ConfigError(
                f"{where}: {path}: a distribution on a sampling-time key is searched per "
                "checkpoint, which needs a `sample_search:` section with its budget and "
                "objective (e.g. sample_search: {cells: 16, metric: fid}); or give a list of "
                "values (a grid)",
                path,
            )
        return None
    if not isinstance(section, dict):
        raise ConfigError(
            f"{where}: sample_search: expected a mapping, got {type(section).__name__}",
            "sample_search",
        )
    if not searched:
        raise ConfigError(
            f"{where}: sample_search: nothing to search: give a sample.* key under `search:` "
            "a distribution (e.g. sample.guidance: {uniform: [0, 4]})",
            "sample_search",
        )
    try:
        s = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(SampleSearch), section))
    except OmegaConfBaseException as err:
        fields = list(SampleSearch.__dataclass_fields__)
        raise config_error(err, where, "sample_search", fields) from None

    def expect(ok, key, expected):
        if not ok:
            raise ConfigError(
                f"{where}: sample_search.{key} = {getattr(s, key)!r} is invalid: expected "
                f"{expected}",
                f"sample_search.{key}",
            )

    expect(s.algorithm in SEARCH_ALGORITHMS, "algorithm", f"one of {list(SEARCH_ALGORITHMS)}")
    expect(s.cells >= 1, "cells", "an integer >= 1 (evaluated cells per study)")
    expect(s.mode in (None, "min", "max"), "mode", "'min' or 'max'")
    expect(s.chunks >= 1, "chunks", "an integer >= 1 (1: no early stopping)")
    expect(s.pruner in PRUNERS, "pruner", f"one of {list(PRUNERS)}")
    expect(
        s.pruner == "none" or s.chunks >= 2,
        "pruner",
        "'none' with chunks = 1 (a cell measured once cannot be stopped early), or chunks >= 2",
    )
    return s


def cell_lists() -> tuple[str, ...]:
    return tuple(f"{SAMPLING_SECTION}.{k}" for k in CELL_LISTS)
