"""The plan of a sweep: which trainings run, which sampling cells each evaluates, what it costs.

The sweep's central idea lives here: the noise schedule (and every other training-time key) is
a training configuration, trained once; the reverse-process variance, the guidance weight, the
number of steps (and every other ``sample.*`` key) are sampling cells, evaluated from each
training's checkpoint. :func:`build_plan` builds the plan once, from a sweep file and its
overrides, and building it *is* the validation: every training configuration is resolved and
checked, its network built on the meta device and run on the data's shape, its dataset
checked, and every sampling cell checked against the training it belongs to. A plan that
builds is a sweep whose trials will not fail on their input; ``ddpm-sweep plan`` prints it,
``run`` prints it and hands it to the trials.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lightning_modules.config import (
    CELL_LISTS,
    ConfigError,
    periodic_specs,
    sampling_specs,
    validate_config,
    validate_sample_config,
)
from lightning_modules.data import build_datamodule, describe_data
from lightning_modules.diffusion import SAMPLING_SPEC_KEYS, SamplingSpec, get_variance
from lightning_modules.evaluate import eval_labels, quality_metrics
from lightning_modules.train import check_network

from .sweep_config import Axis, SampleSearch, Sweep, TuneSettings, load_sweep, training_grid
from .tracking import cell_suffix


@dataclass(frozen=True)
class Cell:
    """One sampling configuration of every training: its spec, a stable key (the Tune metric
    suffix and the tag that finds its run again) and the label its MLflow runs are named by."""

    spec: SamplingSpec
    key: str  # `w1_fixed_small_25steps` (+ ` sampler=ddim ...` for other sampling axes)
    label: str  # `fixed_small · w=1 · 25 steps` (+ ` · sampler=ddim ...`)

    def params(self) -> dict[str, str]:
        """The cell's own settings as MLflow params (`sample.guidance`, ...)."""
        return {f"sample.{k}": str(v) for k, v in self.spec.as_dict().items()}


@dataclass(frozen=True)
class SearchPlan:
    """What each training searches (``sample_search``): the searched sampling axes, a study per
    cell of the plan (a grid combination of the sampling lists, its searched keys left to the
    study), the objective and the budget."""

    settings: SampleSearch
    axes: list[Axis]
    metric: str
    lower: bool

    @property
    def fields(self) -> list[str]:
        """The searched SamplingSpec fields (`guidance`, `eta`, ...)."""
        return [a.key.split(".", 1)[1] for a in self.axes]

    def describe(self) -> str:
        s = self.settings
        stop = {
            "none": "never stopped early",
            "paired": "stopped early once clearly worse than the best (paired)",
        }.get(s.pruner, f"stopped early by Optuna's {s.pruner} pruner")
        return (
            f"searched: {s.algorithm} (seed {s.seed}), {s.cells} cells a study, "
            f"{'min' if self.lower else 'max'} {self.metric};\n  each cell measured after each "
            f"of {s.chunks} chunk(s) of its samples and {stop}"
        )


@dataclass(frozen=True)
class Training:
    """One training configuration: its Tune params (the training axes' values) and its fully
    resolved run config (whose `sample` lists are the plan's sampling values)."""

    params: dict[str, Any]
    config: DictConfig


@dataclass(frozen=True)
class Costs:
    trainings: int  # Tune trials
    cells: int  # sampling cells per training
    evaluated_pairs: int  # trainings x cells: one MLflow eval run each
    naive_trainings: int  # a grid over every axis trains once per pair
    training_steps: int  # summed over the trainings
    sampling_forwards: int  # network forward passes of one example, summed over every pair
    periodic_forwards: int = 0  # the same for eval.periodic, over every training

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class Plan:
    sweep: Sweep
    trainings: list[Training]  # one per training-grid combination (distributions: drawn by Tune)
    cells: list[Cell]
    costs: Costs
    sampled_axes: list[Axis] = field(default_factory=list)  # training axes Tune draws from
    search: SearchPlan | None = None  # sampling axes searched per training (cells: one study each)

    @property
    def name(self) -> str:
        return self.sweep.name

    @property
    def tune(self) -> TuneSettings:
        return self.sweep.tune

    def training_for(self, params: dict[str, Any]) -> Training:
        """The training a Tune trial's params stand for: the planned one for a grid point, or
        (values drawn from a distribution) one resolved and checked now."""
        for training in self.trainings:
            if training.params == params:
                return training
        config = resolve(self.sweep, params, self.cells)
        check_training(self.sweep, config, params, self.cells, local_data=False)
        return Training(dict(params), config)

    def training_label(self, params: dict[str, Any], trial_index: int | None = None) -> str:
        """What tells this training apart from the sweep's others, for run names: the training
        axes' values (`sigmoid · lr=0.0003`), and the Tune trial's index where values alone may
        repeat (several samples of each point, values drawn from distributions)."""
        keys = [a.key for a in self.sweep.training_axes]
        parts = [_label_part(k, params[k]) for k in keys if k in params]
        if trial_index is not None and (self.sweep.tune.num_samples > 1 or self.sampled_axes):
            parts.append(f"#{trial_index}")
        return LABEL_SEP.join(parts)

    def cells_for(self, params: dict[str, Any]) -> list[Cell]:
        """The cells a training evaluates: all of them (train once, sample many). With a
        sampling search, each is a study's grid combination, its searched keys left open."""
        return self.cells

    def table(self) -> str:
        """What `ddpm-sweep plan` prints: trainings, cells, counts and cost."""
        c, sweep = self.costs, self.sweep
        lines = [f"plan of sweep {sweep.name!r} ({sweep.source})"]
        axes = [a.key for a in sweep.training_axes]
        lines.append(
            f"trainings: {c.trainings}"
            + (
                f" ({sweep.tune.num_samples} sample(s) of each)"
                if sweep.tune.num_samples > 1
                else ""
            )
        )
        if axes:
            rows = [
                [str(i), *(_show(t.params.get(k, "")) for k in axes)]
                for i, t in enumerate(self.trainings)
            ]
            for a in self.sampled_axes:
                for row in rows:
                    row[1 + axes.index(a.key)] = f"~{a.kind}{a.values}"
            lines += _table(["#", *axes], rows)
        else:
            lines.append("  (one training: the base config)")
        search = self.search
        searched = search.fields if search else []
        varying = [
            k
            for k in SAMPLING_SPEC_KEYS
            if len({getattr(x.spec, k) for x in self.cells}) > 1 and k not in searched
        ]
        if search:
            lines.append(
                f"sampling cells per training: {c.cells} ({len(self.cells)} "
                f"stud{'y' if len(self.cells) == 1 else 'ies'} of {search.settings.cells})"
            )
            lines.append("  " + search.describe())
            for a in search.axes:
                lines.append(f"  {a.key} ~ {a.kind}{a.values}")
        else:
            lines.append(f"sampling cells per training: {c.cells}")
        rows = [
            [x.key, *(_show(getattr(x.spec, k)) for k in varying)]
            + (["~ searched"] if search else [])
            for x in self.cells
        ]
        lines += _table(
            ["study" if search else "cell", *varying] + (searched and [", ".join(searched)]), rows
        )
        lines.append(
            f"evaluated pairs: {c.evaluated_pairs} (a naive grid over every axis would train "
            f"{c.naive_trainings} times); training steps: {c.training_steps:,}; sampling: "
            f"{'at most ' if search else ''}{c.sampling_forwards:,} network forwards"
            + (
                f" (+ {c.periodic_forwards:,} for eval.periodic during training)"
                if c.periodic_forwards
                else ""
            )
        )
        return "\n".join(lines)


LABEL_SEP = " · "


def _show(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _label_part(key: str, value: Any) -> str:
    """A string value as itself (`sigmoid`), anything else with its key's last part
    (`lr=0.000316`, `ema_decay=0.999`, `compile=True`)."""
    if isinstance(value, str):
        return value
    shown = f"{value:.3g}" if isinstance(value, float) else str(value)
    return f"{key.rsplit('.', 1)[-1]}={shown}"


def run_name(role: str, *labels: str) -> str:
    """`train sigmoid`, `eval sigmoid · fixed_small · w=1 · 25 steps` (empty labels left out)."""
    return " ".join([role, LABEL_SEP.join(x for x in labels if x)]).strip()


def _table(headers: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    out = ["  " + "  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()]
    out += ["  " + "  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
    return out


# -- building the plan --------------------------------------------------------------------------
def build_plan(
    path: str | Path,
    overrides: list[str] | tuple[str, ...] = (),
    name: str | None = None,
    *,
    local_data: bool = True,
) -> Plan:
    """Read the sweep file and build its plan; every error is one ConfigError that points at
    the key as written. ``local_data``: the dataset's files are on this machine (no Ray address)
    and are checked here; on a cluster only the dataset's name and options are (its files are
    checked on the workers, see orchestrator/cluster.py)."""
    sweep = load_sweep(path, list(overrides), name)
    try:
        return _build(sweep, local_data)
    except ConfigError as err:
        raise sweep.file.locate(err) if sweep.file else err from None


def _build(sweep: Sweep, local_data: bool) -> Plan:
    _check_sampling_axes(sweep)
    search = _search_plan(sweep)
    cells = plan_cells(sweep, search.fields if search else ())
    sampled = [a for a in sweep.training_axes if a.kind != "grid"]
    trainings = []
    for combo in training_grid(sweep):
        for draw in _representatives(sampled):  # each extreme of every distribution
            params = combo | draw
            config = resolve(sweep, params, cells)
            check_training(sweep, config, params, cells, local_data)
        params = combo | {a.key: _representatives([a])[0][a.key] for a in sampled}
        trainings.append(Training(combo, resolve(sweep, params, cells)))
    _check_devices(sweep)
    costs = _costs(sweep, trainings, cells, search)
    return Plan(sweep, trainings, cells, costs, sampled, search)


def _representatives(axes: list[Axis]) -> list[dict[str, Any]]:
    """Values that stand for every draw of the distributions: all choices, both bounds."""
    options = [a.extremes() for a in axes]
    return [dict(zip([a.key for a in axes], combo)) for combo in itertools.product(*options)]


def _search_plan(sweep: Sweep) -> SearchPlan | None:
    """The sampling search's objective, checked against what the data's cells measure."""
    settings = sweep.sample_search
    if settings is None:
        return None
    data = describe_data(sweep.base.data)
    offered = quality_metrics(data.kind, bool(data.num_classes))
    metric = settings.metric or next(iter(offered))
    if metric not in offered:
        raise ConfigError(
            f"{sweep.source}: sample_search.metric = {metric!r} is invalid: expected a metric "
            f"every cell of {data.name} measures, with intervals: one of {list(offered)}",
            "sample_search.metric",
        )
    if sweep.base.eval.bootstrap == 0 and settings.pruner == "paired":
        raise ConfigError(
            f"{sweep.source}: sample_search.pruner = 'paired' compares a cell's bootstrap "
            "replicates with the best's, but base.eval.bootstrap = 0: set eval.bootstrap (e.g. "
            "200) or another pruner",
            "sample_search.pruner",
        )
    lower = (settings.mode or offered[metric]) == "min"
    return SearchPlan(settings, sweep.searched_axes, metric, lower)


def plan_cells(sweep: Sweep, searched: list[str] | tuple[str, ...] = ()) -> list[Cell]:
    """The sampling cells: every combination of the other sampling axes, times the base's
    guidance, variance and steps lists (which their axes, if any, have replaced when the sweep
    was read). Names as in MLflow. ``searched``: the SamplingSpec fields a study searches; each
    cell is then a study's grid combination, named without them (its spec holds placeholders)."""
    lists = {f"sample.{k}" for k in CELL_LISTS}
    grid_axes = [a for a in sweep.sampling_axes if a.key not in lists and a.kind == "grid"]
    sample = sweep.base.sample
    cells = []
    for combo in itertools.product(*[a.values for a in grid_axes]):
        scalars = dict(zip([a.key for a in grid_axes], combo))
        cfg = OmegaConf.merge(sample, {k.split(".", 1)[1]: v for k, v in scalars.items()})
        for spec in sampling_specs(cfg):
            extra = [f"{k.split('.', 1)[1]}={_show(v)}" for k, v in scalars.items()]
            if searched:
                cells.append(_study_cell(spec, searched, extra))
                continue
            key = " ".join([cell_suffix(spec.guidance, spec.variance, spec.steps), *extra])
            label = [spec.variance, f"w={spec.guidance:g}", f"{spec.steps} steps", *extra]
            cells.append(Cell(spec, key, LABEL_SEP.join(label)))
    return cells


def _study_cell(spec: SamplingSpec, searched, extra: list[str]) -> Cell:
    """A study's grid combination: the cell lists' values it fixes, and the other grid axes'."""
    fixed = [
        part
        for name, part in (
            ("variance", spec.variance),
            ("guidance", f"w={spec.guidance:g}"),
            ("steps", f"{spec.steps} steps"),
        )
        if name not in searched
    ]
    label = LABEL_SEP.join([*fixed, *extra])
    key = (
        "search " + " ".join(p.replace(" ", "") for p in [*fixed, *extra])
        if fixed or extra
        else "search"
    )
    return Cell(spec, key.strip(), label)


def _nested(params: dict[str, Any]) -> dict:
    """`{"diffusion.schedule": "cosine"}` -> `{"diffusion": {"schedule": "cosine"}}`."""
    out: dict = {}
    for key, value in params.items():
        node = out
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return out


def resolve(sweep: Sweep, params: dict[str, Any], cells: list[Cell]) -> DictConfig:
    """The run config of one training: the base, its training params, and the plan's sampling
    values as the `sample` lists (what a checkpoint offers `ddpm-sweep sample` by default).
    Merged as structured values, never through strings."""
    lists = {k: list(dict.fromkeys(getattr(c.spec, k) for c in cells)) for k in CELL_LISTS}
    return OmegaConf.merge(sweep.base, _nested(params), {"sample": lists})


def _axis_key(sweep: Sweep, params: dict[str, Any], key: str | None) -> str | None:
    """The key as the user wrote it for an error on run-config key ``key``: the axis value
    that set it (`search.train.lr[1]`), else the base's (`base.train.lr`)."""
    if not key:
        return None
    for axis in sweep.axes:
        if key == axis.key or key.startswith((axis.key + ".", axis.key + "[")):
            if axis.key in params and axis.kind in ("grid", "choice"):
                values = axis.values
                index = next((i for i, v in enumerate(values) if v == params[axis.key]), None)
                if index is not None:
                    kind = ".choice" if axis.kind == "choice" else ""
                    return f"search.{axis.key}{kind}[{index}]"
            return f"search.{axis.key}"
    return f"base.{key}"


def check_training(
    sweep: Sweep, config: DictConfig, params: dict[str, Any], cells: list[Cell], local_data: bool
) -> None:
    """Everything that would make this training's trial fail on its input, as a ConfigError."""
    where = sweep.source
    shown = ", ".join(f"{k}={_show(v)}" for k, v in params.items())
    context = f" (in the training with {shown})" if shown else ""

    def fail(message: str, inner: str | None, located: str | None) -> ConfigError:
        """``message`` starts with run-config key ``inner`` (``data.path: ...``); name it as
        the user wrote it, ``located`` (``base.data.path``, ``search.train.lr.choice[1]``)."""
        detail = message.removeprefix(f"{where}: ")
        if located and inner and detail.startswith(inner):
            detail = located + detail[len(inner) :]
        elif located and not detail.startswith(located):
            detail = f"{located}: {detail}"
        return ConfigError(f"{where}: {detail}{context}", located)

    # The training keys, with one cell's sampling values in the sample lists: each cell is
    # checked against the training below, where its own value is named.
    probe = OmegaConf.merge(
        config, {"sample": {k: [getattr(cells[0].spec, k)] for k in CELL_LISTS}}
    )
    try:
        validate_config(probe, where)
    except ConfigError as err:
        key = err.key.split("[", 1)[0] if err.key else None
        raise fail(str(err), key, _axis_key(sweep, params, key)) from None
    try:
        data = build_datamodule(config.data) if local_data else describe_data(config.data)
    except (ValueError, FileNotFoundError) as err:
        key = "data.path" if isinstance(err, FileNotFoundError) else "data.name"
        message = str(err) if str(err).startswith("data.") else f"{key}: {err}"
        raise fail(message, key, _axis_key(sweep, params, key)) from None
    try:
        check_network(config, data)
    except ValueError as err:
        key = re.split(r"[:= []", str(err), maxsplit=1)[0]
        key = key if key.startswith("network") else "network"
        raise fail(str(err), key, _axis_key(sweep, params, key)) from None
    searched = sweep.searched_axes
    for cell in cells:
        for draw in _representatives(searched):  # each extreme of every searched distribution
            probe = replace(cell, spec=replace(cell.spec, **spec_fields(draw)))
            problem = cell_problem(probe.spec, config)
            if problem:
                key, message = problem
                raise fail(f"sample.{key}{message}", f"sample.{key}", _cell_key(sweep, probe, key))


def spec_fields(draw: dict[str, Any]) -> dict[str, Any]:
    """`{"sample.steps": 7}` -> SamplingSpec fields `{"steps": 7}` (the spec normalises the
    values' types)."""
    return {key.split(".", 1)[1]: value for key, value in draw.items()}


def _check_sampling_axes(sweep: Sweep) -> None:
    """Each value of each sampling axis, on its own, as the `sample` section would take it."""
    for axis in sweep.sampling_axes:
        field_name = axis.key.split(".", 1)[1]
        if axis.kind != "grid":
            values = axis.extremes()
        else:
            values = axis.flat_values() if field_name in CELL_LISTS else axis.values
        for i, value in enumerate(values):
            one = [value] if field_name in CELL_LISTS else value
            located = (
                _searched_key(axis, value) if axis.kind != "grid" else f"search.{axis.key}[{i}]"
            )
            try:
                sample = OmegaConf.merge(sweep.base.sample, {field_name: one})
                validate_sample_config(sample, sweep.base.diffusion.timesteps, sweep.source)
            except ConfigError as err:
                if err.key and err.key.split("[", 1)[0] != axis.key:
                    continue  # another key of the base (its own error, reported elsewhere)
                expected = str(err).split(" is invalid: ", 1)[-1]
                shown = repr(value)
                if axis.kind in ("uniform", "loguniform", "randint"):
                    shown = f"{axis.values!r} reaches {value!r}, which"
                raise ConfigError(
                    f"{sweep.source}: {located} = {shown} is invalid: {expected}", located
                ) from None
            except OmegaConfBaseException as err:
                raise ConfigError(
                    f"{sweep.source}: {located} = {value!r}: {str(err).splitlines()[0]}",
                    located,
                ) from None


def _searched_key(axis: Axis, value) -> str:
    """Where a distribution's value was written: `search.sample.eta.choice[1]`, or the
    distribution itself for a bound (`search.sample.steps.randint`)."""
    if axis.kind == "choice":
        index = next((i for i, v in enumerate(axis.values) if v == value), None)
        return f"search.{axis.key}.choice" + (f"[{index}]" if index is not None else "")
    return f"search.{axis.key}.{axis.kind}"


def _cell_key(sweep: Sweep, cell: Cell, key: str) -> str:
    """Where the value of ``key`` (a SamplingSpec field) of ``cell`` was written: its axis
    value (`search.sample.steps[1]`) or the base's (`base.sample.steps[0]`)."""
    value = getattr(cell.spec, key)
    for axis in sweep.sampling_axes:
        if axis.key == f"sample.{key}" and axis.kind != "grid":
            return _searched_key(axis, value)
        if axis.key == f"sample.{key}":
            values = axis.flat_values() if key in CELL_LISTS else axis.values
            index = next((i for i, v in enumerate(values) if v == value), None)
            return f"search.{axis.key}" + (f"[{index}]" if index is not None else "")
    base = sweep.base.sample[key]
    if key in CELL_LISTS:
        index = next((i for i, v in enumerate(base) if v == value), None)
        return f"base.sample.{key}" + (f"[{index}]" if index is not None else "")
    return f"base.sample.{key}"


def cell_problem(spec: SamplingSpec, config: DictConfig) -> tuple[str, str] | None:
    """Why ``spec`` cannot sample a model trained with ``config``: (spec key, what follows
    the key in the message)."""
    d, t = config.diffusion, config.train
    if get_variance(spec.variance).learned and not get_variance(d.variance).learned:
        return "variance", (
            f" = {spec.variance!r} needs a model trained with diffusion.variance = "
            f"'learned_range', but this training has {d.variance!r}: sample it with "
            "fixed_small or fixed_large, or train with learned_range"
        )
    if spec.steps is not None and not 1 <= spec.steps <= d.timesteps:
        return "steps", (
            f" = {spec.steps} is invalid: expected an integer in "
            f"[1, diffusion.timesteps={d.timesteps}]"
        )
    if spec.guidance != 1 and t.p_uncond <= 0:
        return "guidance", (
            f" = {spec.guidance:g} needs the unconditional model, but this training has "
            "train.p_uncond = 0 (labels never dropped): use w = 1, or train with p_uncond > 0 "
            "(e.g. 0.1)"
        )
    if spec.guidance != 0 and t.p_uncond >= 1:
        return "guidance", (
            f" = {spec.guidance:g} needs the conditional model, but this training has "
            "train.p_uncond = 1 (labels always dropped): use w = 0"
        )
    return None


def _check_devices(sweep: Sweep) -> None:
    """The Tune and Lightning device settings, derived from each other and consistent."""
    t, train = sweep.tune, sweep.base.train
    where = sweep.source
    if train.devices != 1:
        raise ConfigError(
            f"{where}: base.train.devices = {train.devices} is invalid in a sweep: expected 1 "
            "(each Tune trial is one process; give a trial more GPUs with tune.gpus_per_trial)",
            "base.train.devices",
        )
    if t.gpus_per_trial == 0 and train.accelerator in ("gpu", "cuda"):
        raise ConfigError(
            f"{where}: base.train.accelerator = {train.accelerator!r} needs a GPU, but "
            "tune.gpus_per_trial = 0: set tune.gpus_per_trial (e.g. 1)",
            "base.train.accelerator",
        )
    if t.gpus_per_trial > 0 and train.accelerator == "cpu":
        raise ConfigError(
            f"{where}: tune.gpus_per_trial = {t.gpus_per_trial:g} reserves a GPU that "
            "base.train.accelerator = 'cpu' would leave idle: set one of them",
            "tune.gpus_per_trial",
        )


def _costs(
    sweep: Sweep, trainings: list[Training], cells: list[Cell], search: SearchPlan | None = None
) -> Costs:
    """What the plan costs; with a sampling search, at most (every cell drawn to the end, at
    its distributions' costliest: most steps, guided)."""
    n_trainings = len(trainings) * sweep.tune.num_samples
    base = sweep.base
    classes = describe_data(base.data).num_classes or 0
    labels = eval_labels(classes, base.eval.num_samples, base.sample.per_class)
    examples = base.eval.num_samples if labels is None else len(labels)
    per_study = search.settings.cells if search else 1
    worst = {}
    for axis in search.axes if search else []:
        name = axis.key.split(".", 1)[1]
        if name == "steps":
            worst["steps"] = max(v for v in axis.extremes() if v is not None)
        if name == "guidance":
            worst["guidance"] = 2.0 if len(set(axis.extremes())) > 1 else axis.extremes()[0]
    forwards = 0
    for t in trainings:
        for cell in cells:
            spec = replace(cell.spec, **worst)
            steps = spec.steps or t.config.diffusion.timesteps
            passes = 1 if spec.guidance in (0, 1) else 2  # CFG: a doubled batch
            forwards += examples * steps * passes * per_study
    periodic = 0
    for t in trainings:
        p = t.config.eval.periodic
        if p.every_n_steps:
            n = eval_labels(classes, p.num_samples, t.config.sample.per_class)
            size = p.num_samples if n is None else len(n)
            for spec in periodic_specs(t.config):
                passes = 1 if spec.guidance in (0, 1) else 2
                steps = spec.steps or t.config.diffusion.timesteps
                periodic += (t.config.train.max_steps // p.every_n_steps) * size * steps * passes
    n_cells = len(cells) * per_study
    return Costs(
        trainings=n_trainings,
        cells=n_cells,
        evaluated_pairs=n_trainings * n_cells,
        naive_trainings=n_trainings * n_cells,
        training_steps=sweep.tune.num_samples * sum(t.config.train.max_steps for t in trainings),
        sampling_forwards=sweep.tune.num_samples * forwards,
        periodic_forwards=sweep.tune.num_samples * periodic,
    )


def check_cluster(plan: Plan, nodes: list[dict]) -> None:
    """Once connected to Ray, before anything is recorded: some node must offer what one trial
    asks for (CPUs, GPUs, custom resources), or Tune would wait forever."""
    t, where = plan.tune, plan.sweep.source
    asks = {"CPU": t.cpus_per_trial, "GPU": t.gpus_per_trial} | dict(t.resources_per_trial)
    asks = {k: v for k, v in asks.items() if v > 0}
    keys = {"CPU": "tune.cpus_per_trial", "GPU": "tune.gpus_per_trial"}
    for resource, amount in asks.items():
        best = max((n.get("Resources", {}).get(resource, 0.0) for n in nodes), default=0.0)
        if best < amount:
            key = keys.get(resource, f"tune.resources_per_trial.{resource}")
            cluster = f"the {len(nodes)}-node Ray cluster"
            have = (
                f"the most one node of {cluster} offers is {best:g} {resource}"
                if best
                else f"no node of {cluster} offers {resource}"
            )
            err = ConfigError(
                f"{where}: {key} = {amount:g} is more than a trial can get: {have} (lower it, "
                "or add nodes that have it)",
                key,
            )
            raise plan.sweep.file.locate(err) if plan.sweep.file else err
