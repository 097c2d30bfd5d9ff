"""Searching the sampling-time space of one trained checkpoint: a seeded Optuna study per study
cell of the plan, each study trial one evaluated cell and its own MLflow run.

A sweep whose ``sample.*`` axes have distributions (``search: {sample.eta: {uniform: [0, 1]}}``)
has a ``sample_search`` section: the budget (``cells`` per study), the objective (``metric``,
``mode``) and the sampler (``algorithm``, ``seed``). The lists among the sampling axes stay a
grid: each of their combinations (a :class:`~orchestrator.plan.Cell` of the plan, its searched
keys left open) is one study. Inside the trial, after training:

- **ask**: the study's sampler (TPE or random) proposes values for the searched keys;
- **evaluate, multi-fidelity**: the cell draws its evaluation set in ``chunks`` class-balanced
  chunks and is measured after each (``lightning_modules.evaluate.evaluate_chunked``). Every
  cell of a training starts from the same noise and labels, so after chunk j two cells are
  measured on the same positions with the same bootstrap counts: their difference has a
  paired interval. The ``paired`` pruner stops a cell once that interval says it is worse than
  the best cell so far at the same chunk, at the sweep's confidence over all of a cell's looks
  (Bonferroni); ``halving`` and ``median`` are Optuna's pruners on the partial values;
- **record**: the cell's run has the grid cells' metrics, intervals, floor, PNG and
  ``bootstrap.json``, plus ``samples`` (how many its metrics are of) and, per chunk,
  ``<metric>_partial`` against the samples drawn. A stopped cell's run ends KILLED with the tag
  ``ddpm_sweep.stopped`` saying where and why; a finished one FINISHED;
- **tell**: the value, or PRUNED with its partial values.

The study lives in MLflow, not in the trial's memory: a trial resumed after training rebuilds
each study from its cells' runs (finished and stopped cells are added to it as they were, never
sampled again) and redoes a cell interrupted half-way in its own run, with the values it had.
"""

from __future__ import annotations

import json
import logging
import math
import time
import warnings
from dataclasses import dataclass, field, replace
from typing import Any

import optuna
import torch
from mlflow.entities import Metric
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.trial import TrialState

from lightning_modules.evaluate import evaluate_chunked, prepare_context, sampling_device
from lightning_modules.evaluation.bootstrap import interval

from .plan import LABEL_SEP, Cell, SearchPlan, spec_fields
from .sweep_config import Axis
from .tracking import NUMBER_TAG, SEARCHED_TAG, STOPPED_TAG, STUDY_TAG, VALUES_TAG, eval_params

log = logging.getLogger(__name__)
RESUME_SEED_STEP = 7919  # a resumed study's sampler: seed + this x cells already done


def distribution(axis: Axis) -> BaseDistribution:
    """The Optuna distribution of a searched axis (a choice is its index)."""
    if axis.kind == "choice":
        return CategoricalDistribution(list(range(len(axis.values))))
    low, high = axis.values
    if axis.kind == "randint":
        return IntDistribution(int(low), int(high))  # inclusive, like the YAML reads
    return FloatDistribution(float(low), float(high), log=axis.kind == "loguniform")


def spec_values(search: SearchPlan, values: dict[str, Any]) -> dict[str, Any]:
    """The study's values (`{"eta": 0.41, "variance": 1}`) as SamplingSpec fields."""
    return spec_fields(
        {
            a.key: a.values[values[name]] if a.kind == "choice" else values[name]
            for a, name in zip(search.axes, search.fields)
        }
    )


def _shown(name: str, value: Any) -> str:
    if name == "guidance":
        return f"w={value:.3g}"
    if name == "steps":
        return f"{value} steps"
    if isinstance(value, float):
        return f"{name}={value:.3g}"
    return f"{name}={value}" if name not in ("variance",) else str(value)


def make_sampler(search: SearchPlan, seed: int) -> optuna.samplers.BaseSampler:
    if search.settings.algorithm == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    with warnings.catch_warnings():  # multivariate TPE is "experimental" since Optuna 2.2
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(
            seed=seed, n_startup_trials=max(4, search.settings.cells // 4), multivariate=True
        )


def make_pruner(search: SearchPlan) -> optuna.pruners.BasePruner:
    """Optuna's pruner for ``halving`` and ``median``; the ``paired`` rule is ours (it needs
    the replicates), so Optuna's is a no-op there."""
    name = search.settings.pruner
    if name == "halving":
        return optuna.pruners.SuccessiveHalvingPruner()
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2)
    return optuna.pruners.NopPruner()


@dataclass
class Partial:
    """A cell's measurements after each chunk: samples so far -> (value, replicates)."""

    values: dict[int, tuple[float, torch.Tensor | None]] = field(default_factory=dict)


@dataclass
class StudyCell:
    """One study trial: its plan cell with the study's values, and what became of it."""

    number: int
    cell: Cell
    values: dict[str, Any]
    value: float = math.nan
    samples: int = 0
    stopped: str = ""  # why it was stopped early ("" if it ran to the end)


class CellStudy:
    """The study of one plan cell in one training: ask, evaluate in chunks, prune, tell."""

    def __init__(self, search: SearchPlan, cell: Cell, seed: int, history: list[dict] = ()):
        self.search, self.cell = search, cell
        self.dists = {name: distribution(a) for a, name in zip(search.axes, search.fields)}
        done = [h for h in history if h["state"] != "redo"]
        sampler = make_sampler(search, seed + RESUME_SEED_STEP * len(done) if done else seed)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        direction = "minimize" if search.lower else "maximize"
        self.study = optuna.create_study(
            direction=direction, sampler=sampler, pruner=make_pruner(search)
        )
        self.partials: dict[int, Partial] = {}
        self.best: StudyCell | None = None
        for h in sorted(done, key=lambda h: h["number"]):
            self._add(h)
        for h in sorted(history, key=lambda h: h["number"]):
            if h["state"] == "redo":  # interrupted half-way: the same values, in the same run
                self.study.enqueue_trial(h["values"], skip_if_exists=False)

    def _add(self, h: dict) -> None:
        """A cell of an earlier attempt, as it ended (finished or stopped)."""
        pruned = h["state"] == "stopped"
        trial = optuna.trial.create_trial(
            state=TrialState.PRUNED if pruned else TrialState.COMPLETE,
            value=None if pruned else h["value"],
            params=h["values"],
            distributions=self.dists,
            intermediate_values=h.get("partial", {}),
        )
        self.study.add_trial(trial)
        if not pruned:
            self._consider(StudyCell(h["number"], self.cell, h["values"], h["value"]))

    @property
    def remaining(self) -> int:
        return max(0, self.search.settings.cells - len(self.study.trials))

    def _consider(self, done: StudyCell) -> None:
        better = (lambda a, b: a < b) if self.search.lower else (lambda a, b: a > b)
        if not math.isnan(done.value) and (
            self.best is None or better(done.value, self.best.value)
        ):
            self.best = done

    def ask(self) -> tuple[optuna.trial.Trial, StudyCell]:
        trial = self.study.ask(self.dists)
        values = dict(trial.params)
        fields = spec_values(self.search, values)
        spec = replace(self.cell.spec, **fields)
        parts = [p for p in self.cell.label.split(LABEL_SEP) if p]
        parts += [_shown(k, v) for k, v in fields.items()] + [f"search #{trial.number}"]
        cell = Cell(spec, f"{self.cell.key} #{trial.number}", LABEL_SEP.join(parts))
        return trial, StudyCell(trial.number, cell, values)

    def look_confidence(self, confidence: float) -> float:
        """The confidence of each look of the paired pruner: a cell is looked at after each of
        its chunks but the last, so each look gets 1 - (1 - confidence) / looks (Bonferroni),
        and a cell as good as the best is stopped with probability at most 1 - confidence."""
        looks = max(1, self.search.settings.chunks - 1)
        return 1 - (1 - confidence) / looks

    def on_chunk(self, trial, cell: StudyCell, confidence: float):
        """The callback of evaluate_chunked: record the partial value, then stop?"""
        metric = self.search.metric
        partial = self.partials.setdefault(cell.number, Partial())

        def decide(n: int, metrics: dict[str, float], replicates: dict) -> bool:
            value = metrics[metric]
            partial.values[n] = (value, replicates.get(metric))
            trial.report(value, step=n)
            cell.samples = n
            if self.search.settings.pruner == "paired":
                cell.stopped = self._clearly_worse(n, value, replicates.get(metric), confidence)
            elif trial.should_prune():
                cell.stopped = (
                    f"pruned by Optuna's {self.search.settings.pruner} pruner at {n} samples "
                    f"({metric} {value:.4g})"
                )
            return bool(cell.stopped)

        return decide

    def _clearly_worse(self, n: int, value: float, reps, confidence: float) -> str:
        """Why the cell is worse than the best cell so far at n samples, with the paired
        interval of their difference excluding 0 (""; not clearly worse, or nothing to pair
        with: the best's partial measurements are in this process only)."""
        best = self.best
        if best is None or reps is None or best.number not in self.partials:
            return ""
        ref = self.partials[best.number].values.get(n)
        if ref is None or ref[1] is None:
            return ""
        diff = value - ref[0]
        low, high = interval(diff, reps - ref[1], confidence)
        worse = low > 0 if self.search.lower else high < 0
        if not worse:
            return ""
        return (
            f"clearly worse than search #{best.number} at {n} samples: {self.search.metric} "
            f"{value:.4g} vs {ref[0]:.4g}, difference {diff:+.4g} "
            f"[{low:+.4g}, {high:+.4g}] ({100 * confidence:.3g} % paired interval)"
        )

    def evaluate(self, trial, cell: StudyCell, result, cfg, out_dir, eval_ctx, partial=None):
        """Draw and measure the cell in chunks, stopping it when the pruner says so
        (``partial(n, value)`` is told each partial value first); its value and samples are
        set on ``cell``. Returns the EvalResult; ``tell`` comes after recording it."""
        decide = self.on_chunk(trial, cell, self.look_confidence(eval_ctx.confidence))

        def on_chunk(n: int, metrics: dict[str, float], replicates: dict) -> bool:
            if partial is not None:
                partial(n, metrics[self.search.metric])
            return decide(n, metrics, replicates)

        evaluated = evaluate_chunked(
            result.module,
            result.datamodule,
            cell.cell.spec,
            cfg.eval,
            out_dir,
            chunks=self.search.settings.chunks,
            on_chunk=on_chunk,
            per_class=cfg.sample.per_class,
            batch_size=cfg.sample.batch_size,
            precision=cfg.sample.precision,
            context=eval_ctx,
        )
        cell.value = evaluated.metrics.get(self.search.metric, math.nan)
        cell.samples = evaluated.samples
        return evaluated

    def tell(self, trial, cell: StudyCell) -> None:
        if cell.stopped:
            self.study.tell(trial, state=TrialState.PRUNED)
        else:
            self.study.tell(trial, cell.value)
            self._consider(cell)


def study_history(client, runs: list, metric: str) -> list[dict]:
    """A study's cells as its runs recorded them: finished, stopped (with their partial
    values) or to redo (interrupted half-way), each with its number and study values."""
    history = []
    for run in runs:
        tags = run.data.tags
        entry = {
            "number": int(tags[NUMBER_TAG]),
            "values": json.loads(tags[VALUES_TAG]),
            "run": run,
        }
        if run.info.status == "FINISHED" and metric in run.data.metrics:
            entry |= {"state": "finished", "value": run.data.metrics[metric]}
        elif run.info.status == "KILLED" and STOPPED_TAG in tags:
            hist = client.get_metric_history(run.info.run_id, f"{metric}_partial")
            entry |= {"state": "stopped", "partial": {int(m.step): m.value for m in hist}}
        else:
            entry["state"] = "redo"
        history.append(entry)
    return history


def search_cells(
    client, ctx, cfg, result, root, train_run_id: str, labels, earlier: dict
) -> dict[str, float]:
    """Run each study of the training to its budget; returns the Tune summary (each study's
    best value). ``earlier``: this training's eval runs by cell key, from an earlier attempt."""
    from .trial import finish_cell_run, open_cell_run

    search: SearchPlan = ctx.plan.search
    settings = search.settings
    device = sampling_device(cfg)
    eval_ctx = prepare_context(result.datamodule, cfg.eval, device=device)
    summary = {}
    for index, plan_cell in enumerate(ctx.plan.cells_for(labels.params)):
        runs = [r for r in earlier.values() if r.data.tags.get(STUDY_TAG) == plan_cell.key]
        history = study_history(client, runs, search.metric)
        redo = {h["number"]: h["run"] for h in history if h["state"] == "redo"}
        study = CellStudy(search, plan_cell, settings.seed + index, history)
        if history:
            log.info(
                "study %r resumed: %d of %d cells done, %d to redo",
                plan_cell.key,
                len(history) - len(redo),
                settings.cells,
                len(redo),
            )
        while study.remaining:
            trial, cell = study.ask()
            tags = {
                STUDY_TAG: plan_cell.key,
                NUMBER_TAG: str(cell.number),
                VALUES_TAG: json.dumps(cell.values),
                SEARCHED_TAG: ",".join(f"sample.{f}" for f in search.fields),
            }
            params = eval_params(cfg, labels.params, cell.cell.params())
            run_id, have = open_cell_run(
                client, ctx, cell.cell, params, train_run_id, labels.training,
                redo.get(cell.number), extra_tags=tags,
            )  # fmt: skip
            partial = _partial_logger(client, run_id, search.metric)
            evaluated = study.evaluate(
                trial, cell, result, cfg, root / "samples", eval_ctx, partial
            )
            metrics = evaluated.logged_metrics() | {"samples": float(evaluated.samples)}
            if evaluated.stopped:
                client.set_tag(run_id, STOPPED_TAG, cell.stopped)
                log.info("stopped %r: %s", cell.cell.label, cell.stopped)
            finish_cell_run(
                client, run_id, have, metrics, evaluated,
                status="KILLED" if evaluated.stopped else "FINISHED",
            )  # fmt: skip
            study.tell(trial, cell)
        if study.best is not None:
            summary[f"search/{search.metric}/{plan_cell.key}"] = study.best.value
    return summary


def _partial_logger(client, run_id: str, metric: str):
    """Log a partial value to the cell's run: `<metric>_partial` at step = samples so far (the
    fidelity curve in MLflow's chart view, and what a resumed study re-reads for a stopped
    cell)."""

    def log_partial(n: int, value: float) -> None:
        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(f"{metric}_partial", value, now, n)])

    return log_partial
