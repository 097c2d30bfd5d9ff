"""One Ray Tune trial: train one training configuration, then evaluate every sampling
configuration from its checkpoint — each evaluated pair is its own MLflow child run.

Runs inside a Ray worker process. Training metrics go to the trial's MLflow training run (a child
of the sweep's parent run) through Lightning's MLflow logger and to Tune through
:class:`TuneReportCallback`, with a checkpoint at every validation.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import pytorch_lightning as pl
import torch
from mlflow.entities import Metric, Param

from lightning_modules.evaluate import (
    evaluate_group,
    guidance_groups,
    prepare_context,
    sampling_device,
)
from lightning_modules.periodic import PeriodicEvaluation
from lightning_modules.train import build_experiment, cuda_problem, fit

from .compare import REPLICATES_ARTIFACT  # what compare.py pairs cells by
from .metric_log import PENDING_FILE, DurableMLFlowLogger, dump_metrics, load_metrics
from .phases import PhaseTimer, TimedClient
from .plan import Cell, Plan, run_name
from .tracking import cell_suffix, eval_params, run_tags, train_params

log = logging.getLogger(__name__)
CELL_TAG = "ddpm_sweep.cell"  # an eval run's cell key: how a retried trial finds it again
RUN_ID_FILE = "mlflow_run_id.txt"
DERIVED = ("_ci_low", "_ci_high", "_floor", "_floor_sd")  # beside a metric, in its eval run
METRICS_FILE = "metrics.json"  # what the checkpoint's report said, for a trial resumed at its end


@dataclass
class TrialContext:
    """What every trial needs from the driver (passed with tune.with_parameters): the plan
    (each training's resolved config, the sampling cells) and where to record."""

    plan: Plan
    tracking_uri: str
    experiment_id: str
    parent_run_id: str

    @property
    def sweep_name(self) -> str:
        return self.plan.name

    @property
    def config_file(self) -> str:
        return self.plan.sweep.source


class TuneReportCallback(pl.Callback):
    """Report validation metrics and a checkpoint to Tune after every validation.

    The checkpoint never stands ahead of the tracking store: every metric logged up to it is
    confirmed by MLflow first, or, if the store does not confirm in time, carried in the
    checkpoint (``pending_metrics.json``) for the trial resumed from it to log.
    """

    def __init__(
        self, run_id: str, logger: DurableMLFlowLogger, timer: PhaseTimer, started: float = 0.0
    ):
        self.run_id, self.logger, self.timer = run_id, logger, timer
        self.started = started or time.perf_counter()  # the trial's start (perf_counter)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from ray import tune

        if trainer.sanity_checking:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        metrics["step"] = trainer.global_step
        # Every report, and the run at every validation, carries the periodic evaluation's cost
        # so far: a trial that Tune stops (its process ended, or not) never reaches its end.
        cost = periodic_cost(trainer, self.started)
        metrics |= cost
        if cost:
            self.logger.log_metrics(cost, step=trainer.global_step)
        with self.timer("checkpoint"), tempfile.TemporaryDirectory() as tmp:
            trainer.save_checkpoint(Path(tmp) / "last.ckpt")
            (Path(tmp) / RUN_ID_FILE).write_text(self.run_id)
            (Path(tmp) / METRICS_FILE).write_text(json.dumps(metrics))
            dump_metrics(self.logger.sync(), Path(tmp) / PENDING_FILE)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))


def _create_run(client, ctx: TrialContext, name: str, role: str, params: dict, extra_tags=None):
    tags = (
        run_tags(ctx.config_file)
        | {
            "mlflow.parentRunId": ctx.parent_run_id,
            "ddpm_sweep.sweep": ctx.sweep_name,
            "ddpm_sweep.role": role,
            "mlflow.runName": name,
        }
        | (extra_tags or {})
    )
    run = client.create_run(ctx.experiment_id, run_name=name, tags=tags)
    log_missing_params(client, run.info.run_id, params, have={})
    return run.info.run_id


def log_missing_params(client, run_id: str, params: dict, have: dict | None = None) -> None:
    """Log the params the run does not have yet. A run is created first and its params logged
    after, so a process killed in between leaves a run without them; whoever re-attaches to
    the run (a retried trial, a redone cell) completes it this way (params are write-once)."""
    if have is None:
        have = client.get_run(run_id).data.params
    items = [Param(k, str(v)[:6000]) for k, v in params.items() if k not in have]
    for i in range(0, len(items), 100):  # MLflow's batch limit
        client.log_batch(run_id, params=items[i : i + 100])


def train_and_evaluate(params: dict[str, Any], ctx: TrialContext) -> None:
    """The Tune trainable (function API)."""
    import ray
    from ray import tune

    started = time.perf_counter()
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    # MLflow fetches a whole run to print its UI link when a server-tracked run ends: 13-15 ms
    # a cell for a line in a worker's log (benchmarks/tracking_scale.py).
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    require_cuda_for(ray.get_gpu_ids())
    cfg = ctx.plan.training_for(params).config
    trial = tune.get_context()
    timer = PhaseTimer()
    with timer("mlflow"):  # the client opens the tracking store (a database engine, a session)
        client = TimedClient(mlflow.MlflowClient(ctx.tracking_uri), timer)
    root = Path(tempfile.mkdtemp(prefix="ddpm-trial-"))
    run_id, ckpt_path, reported, carried = _resume_point(root)
    if run_id is None:
        run_id = _earlier_run(client, ctx, trial.get_trial_id())
        if run_id is not None:  # retried before its first checkpoint: same run, fresh start
            log.warning(
                "trial %s has no checkpoint: training starts fresh (same seed, so the "
                "steps already in MLflow run %s repeat and are not logged again)",
                trial.get_trial_name(),
                run_id,
            )
    label = ctx.plan.training_label(params, trial_index(trial.get_trial_name()))
    if run_id is None:  # a fresh trial: its own child run under the sweep's parent
        run_id = _create_run(
            client,
            ctx,
            run_name("train", label),
            "train",
            train_params(cfg),
            {
                "ddpm_sweep.trial_id": trial.get_trial_id(),
                "ddpm_sweep.trial": trial.get_trial_name(),
            },
        )
    else:  # a retried or resumed trial re-attaches to its run
        client.update_run(run_id, status="RUNNING")
        log_missing_params(client, run_id, train_params(cfg))
        log.info("trial %s re-attached to MLflow run %s", trial.get_trial_name(), run_id)
    node_id = ray.get_runtime_context().get_node_id()
    client.set_tag(run_id, "ddpm_sweep.pid", str(os.getpid()))
    client.set_tag(run_id, "ddpm_sweep.node_id", node_id)  # which Ray node trained it
    with timer("mlflow"):
        logger = DurableMLFlowLogger(ctx.tracking_uri, run_id, client, carried)
    reporter = TuneReportCallback(run_id, logger, timer, started)
    try:
        with timer("build"):
            experiment = build_experiment(cfg)
        with timer("fit"):
            result = fit(
                cfg,
                root,
                logger=logger,
                callbacks=[reporter],
                experiment=experiment,
                ckpt_path=ckpt_path,
                enable_progress_bar=False,
                enable_model_summary=False,
            )
        client.log_artifact(run_id, str(result.checkpoint), "checkpoints")
        periodic = periodic_cost(result.trainer, started)
        if periodic:  # its seconds counted apart from fit's (in the run since each validation)
            timer.move(periodic["time/periodic_eval_s"], "fit", "periodic_eval")
        cells = ctx.plan.cells_for(params)
        with timer("evaluate"):
            summary = evaluate_cells(
                client, ctx, cells, cfg, result, root, run_id, EvalLabels(label, params)
            )
    except SystemExit:
        # Tune stopped the trial (ASHA, a stopper): tune.report ends the trial's thread with
        # sys.exit(0) when its process is kept for the next trial (reuse_actors), instead of
        # killing the process. Stopped, not failed; its evaluations are not run.
        client.set_terminated(run_id, "KILLED")
        raise
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    # The final report repeats the training metrics (Tune's searcher, the summary): from this
    # fit, or, for a trial resumed from the checkpoint at its last step (no step left to run),
    # from that checkpoint's report.
    final = reported | {k: float(v) for k, v in result.trainer.callback_metrics.items()} | summary
    tune.report(final | timer.report() | periodic | {"node_id": node_id})


def periodic_cost(trainer: pl.Trainer, started: float) -> dict[str, float]:
    """What the periodic evaluation (eval.periodic) has cost this attempt of the trial so far:
    its seconds and their fraction of the trial's time (empty without periodic evaluation)."""
    callback = next((c for c in trainer.callbacks if isinstance(c, PeriodicEvaluation)), None)
    if callback is None:
        return {}
    elapsed = time.perf_counter() - started
    return {
        "time/periodic_eval_s": callback.seconds,
        "time/periodic_eval_fraction": callback.seconds / elapsed if elapsed > 0 else 0.0,
    }


def trial_index(trial_name: str) -> int | None:
    """Tune's index of a trial, from its name (`train_and_evaluate_35b23_00002` -> 2)."""
    match = re.search(r"_(\d+)$", trial_name)
    return int(match.group(1)) if match else None


@dataclass(frozen=True)
class EvalLabels:
    """What the eval runs of one training take from it: the label of their names, and the
    training axes' values they record as params."""

    training: str = ""
    params: dict = field(default_factory=dict)


def require_cuda_for(gpu_ids: list) -> None:
    """A trial that Ray gave GPUs must be able to use them. Otherwise Lightning's 'auto'
    accelerator would pick the CPU and train there, slowly and without a word, while the GPU
    stays reserved: fail at once instead, before anything is recorded, naming the cause."""
    if not gpu_ids:
        return
    problem = cuda_problem()
    if problem is not None:
        raise RuntimeError(
            f"Ray gave this trial GPU {', '.join(map(str, gpu_ids))} on node "
            f"{os.uname().nodename} (CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r}), but CUDA is not usable here: "
            f"{problem}. Install a torch build this node's driver supports (README, 'Scale "
            "out': the image's TORCH_CUDA), or set tune.gpus_per_trial = 0 to train on CPUs"
        )


def _earlier_run(client, ctx: TrialContext, trial_id: str) -> str | None:
    """The training run an earlier attempt of this trial opened, if any."""
    runs = client.search_runs(
        [ctx.experiment_id],
        f"tags.mlflow.parentRunId = '{ctx.parent_run_id}' and "
        f"tags.`ddpm_sweep.trial_id` = '{trial_id}'",
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def _resume_point(root: Path):
    """(MLflow run id, Lightning checkpoint path, the metrics reported with it, the metrics it
    carried for MLflow) from Tune's last checkpoint of this trial."""
    from ray import tune

    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        return None, None, {}, []
    with checkpoint.as_directory() as d:
        run_id = (Path(d) / RUN_ID_FILE).read_text().strip()
        target = root / "resume.ckpt"
        target.write_bytes((Path(d) / "last.ckpt").read_bytes())
        metrics = Path(d) / METRICS_FILE
        reported = json.loads(metrics.read_text()) if metrics.is_file() else {}
        carried = load_metrics(Path(d) / PENDING_FILE)
    return run_id, str(target), reported, carried


def evaluate_cells(
    client,
    ctx,
    cells: list[Cell],
    cfg,
    result,
    root: Path,
    train_run_id: str,
    labels: EvalLabels = EvalLabels(),
) -> dict:
    """Evaluate the training's sampling cells; one MLflow child run per (training x cell).

    A cell's run is FINISHED only once its metrics and its PNG are in MLflow. A trial resumed
    after some cells finished skips those before sampling them; a cell interrupted half-way (its
    run not FINISHED) is sampled again into the same run, so no cell is recorded twice. Cells
    left to do are drawn in :func:`guidance_groups` (together, on a GPU, when they differ only
    in guidance weight).
    """
    earlier = {
        r.data.tags.get(CELL_TAG): r
        for r in client.search_runs(
            [ctx.experiment_id],
            f"tags.`ddpm_sweep.train_run_id` = '{train_run_id}'",
            max_results=10000,
            order_by=["attributes.start_time ASC"],
        )
    }
    if ctx.plan.search is not None:  # the cells are studies: searched, not a grid
        from .sample_search import search_cells

        return search_cells(client, ctx, cfg, result, root, train_run_id, labels, earlier)
    device = sampling_device(cfg)
    eval_ctx = prepare_context(result.datamodule, cfg.eval, device=device)
    done = {c.key for c in cells if c.key in earlier and earlier[c.key].info.status == "FINISHED"}
    todo = {c.spec: c for c in cells if c.key not in done}
    measured: dict[str, dict[str, float]] = {
        name: dict(earlier[name].data.metrics)
        for name in done  # before an interruption
    }
    groups = guidance_groups(list(todo), device, cfg.eval.num_samples, cfg.sample.batch_size)
    for group in groups:
        group_cells = [todo[spec] for spec in group]
        measured |= _evaluate_into_runs(
            client, ctx, cfg, result, root, train_run_id, eval_ctx, group_cells, earlier, labels
        )
    summary: dict[str, float] = {}
    for cell in cells:
        suffix = cell_suffix(cell.spec.guidance, cell.spec.variance, cell.spec.steps)
        for k, v in measured[cell.key].items():
            if not k.endswith(DERIVED):  # Tune's results keep the metrics themselves
                summary[f"eval/{k}/{suffix}"] = v
    return summary


def _evaluate_into_runs(
    client, ctx, cfg, result, root, train_run_id, eval_ctx, cells: list[Cell], earlier, labels
) -> dict[str, dict[str, float]]:
    """Sample and measure cells drawn together, each into its MLflow run: a new one, or the
    unfinished run of an earlier attempt (whose metrics are not logged twice). Every run is
    open before sampling starts, and FINISHED comes last."""
    runs = [
        open_cell_run(
            client, ctx, cell, eval_params(cfg, labels.params, cell.params()),
            train_run_id, labels.training, earlier.get(cell.key),
        )
        for cell in cells
    ]  # fmt: skip
    evaluated = evaluate_group(
        result.module,
        result.datamodule,
        [cell.spec for cell in cells],
        cfg.eval,
        root / "samples",
        per_class=cfg.sample.per_class,
        batch_size=cfg.sample.batch_size,
        precision=cfg.sample.precision,
        context=eval_ctx,
    )
    measured = {}
    for cell, (run_id, have), cell_result in zip(cells, runs, evaluated):
        metrics = cell_result.logged_metrics()
        finish_cell_run(client, run_id, have, metrics, cell_result)
        measured[cell.key] = metrics
    return measured


def open_cell_run(
    client,
    ctx,
    cell: Cell,
    params: dict,
    train_run_id: str,
    training_label: str,
    run=None,
    extra_tags: dict | None = None,
) -> tuple[str, set[str]]:
    """(run id, metrics it already has): a new eval run for the cell, or ``run``, the one an
    interrupted attempt left unfinished, re-opened with the params it lacks."""
    if run is None:
        tags = {
            "ddpm_sweep.train_run_id": train_run_id,
            "ddpm_sweep.pid": str(os.getpid()),
            CELL_TAG: cell.key,
        } | (extra_tags or {})
        name = run_name("eval", training_label, cell.label)
        return _create_run(client, ctx, name, "eval", params, tags), set()
    run_id = run.info.run_id  # interrupted half-way: redo it in the same run
    client.set_tag(run_id, "ddpm_sweep.pid", str(os.getpid()))
    client.update_run(run_id, status="RUNNING")
    log_missing_params(client, run_id, params, run.data.params)
    log.info("redoing the interrupted evaluation %r in run %s", cell.label, run_id)
    return run_id, set(run.data.metrics)


def finish_cell_run(
    client, run_id: str, have: set[str], metrics: dict, result, status: str = "FINISHED"
) -> None:
    """The cell's metrics (those the run lacks), its grid and its bootstrap replicates, then
    ``status`` (FINISHED; KILLED for a searched cell stopped early)."""
    now = int(time.time() * 1000)
    # Step 0: an evaluation is one point per run, and the chart view plots runs against each
    # other at one step (the training step is a param of the training run).
    fresh = [Metric(k, v, now, 0) for k, v in metrics.items() if k not in have]
    if fresh:
        client.log_batch(run_id, metrics=fresh)
    log_cell_artifacts(client, run_id, result)
    client.set_terminated(run_id, status)


# One name, at the artifact root, in every eval run: MLflow's compare page lists the files that
# the runs' artifact roots have in common (not folders) and shows them side by side.
GRID_ARTIFACT = "grid.png"


def log_cell_artifacts(client, run_id: str, result) -> None:
    """The cell's sample grid under the artifact name every eval run shares, and its metrics'
    bootstrap replicates, in one call. (The grid is not also an MLflow image for the chart
    view: `log_image` writes three files and took 18 of a cell's 51 ms of tracking on sqlite,
    over the 50 ms goal; benchmarks/tracking_scale.py.)"""
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copyfile(result.image, Path(tmp) / GRID_ARTIFACT)
        if result.replicates:
            text = json.dumps(result.replicates_json(), separators=(",", ":"))
            (Path(tmp) / REPLICATES_ARTIFACT).write_text(text)
        client.log_artifacts(run_id, tmp)
