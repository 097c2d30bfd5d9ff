"""One Ray Tune trial: train one training configuration, then evaluate every sampling
configuration from its checkpoint — each evaluated pair is its own MLflow child run.

Runs inside a Ray worker process. Training metrics go to the trial's MLflow training run (a child
of the sweep's parent run) through Lightning's MLflow logger and to Tune through
:class:`TuneReportCallback`, with a checkpoint at every validation.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import pytorch_lightning as pl
import torch
from mlflow.entities import Metric, Param
from omegaconf import DictConfig
from pytorch_lightning.loggers import MLFlowLogger

from lightning_modules.config import load_config
from lightning_modules.evaluate import evaluate_module, prepare_context
from lightning_modules.train import build_experiment, fit

from .tracking import cell_suffix, flat_params, run_tags

log = logging.getLogger(__name__)
RUN_ID_FILE = "mlflow_run_id.txt"
METRICS_FILE = "metrics.json"  # what the checkpoint's report said, for a trial resumed at its end


@dataclass
class TrialContext:
    """What every trial needs from the driver (passed with tune.with_parameters)."""

    base: dict
    sampling_grid: list[dict[str, Any]]  # scalar sampling-time combinations (may be [{}])
    sampling_lists: dict[str, list]  # list-valued sampling keys: guidance, variance, steps
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    sweep_name: str
    config_file: str


class ResumingMLFlowLogger(MLFlowLogger):
    """Lightning's MLflow logger that never logs a (metric, step) pair twice.

    A trial resumed from its last checkpoint replays the steps between that checkpoint and the
    crash; those steps are already in MLflow, so they are skipped here.
    """

    def finalize(self, status: str = "success") -> None:
        mlflow.flush_async_logging()  # every queued metric is written before the run is closed
        super().finalize(status)

    def __init__(self, tracking_uri: str, run_id: str, client):
        # Asynchronous: metrics are queued and written by MLflow's logging thread, so a slow or
        # busy tracking store does not stall training (see benchmarks/tracking_overhead.py).
        # Buffered (1 s batches): unbuffered, that thread polls its queue with a 1 s timeout, and
        # each flush and set_terminated waits out a poll: ~2 s per trial, 30 of a 16-trial
        # sweep's 48 s wall (benchmarks/sweep_overhead.py, variant mlflow_buffering).
        os.environ.setdefault("MLFLOW_ASYNC_LOGGING_BUFFERING_SECONDS", "1")
        super().__init__(tracking_uri=tracking_uri, run_id=run_id, synchronous=False)
        self._last_step = {
            key: max(m.step for m in client.get_metric_history(run_id, key))
            for key in client.get_run(run_id).data.metrics
        }

    def log_metrics(self, metrics, step=None):
        fresh = {
            k: v for k, v in metrics.items() if step is None or step > self._last_step.get(k, -1)
        }
        if fresh:
            super().log_metrics(fresh, step)


class TuneReportCallback(pl.Callback):
    """Report validation metrics and a checkpoint to Tune after every validation."""

    def __init__(self, run_id: str):
        self.run_id = run_id

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from ray import tune

        if trainer.sanity_checking:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        metrics["step"] = trainer.global_step
        with tempfile.TemporaryDirectory() as tmp:
            trainer.save_checkpoint(Path(tmp) / "last.ckpt")
            (Path(tmp) / RUN_ID_FILE).write_text(self.run_id)
            (Path(tmp) / METRICS_FILE).write_text(json.dumps(metrics))
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))


def trial_config(ctx: TrialContext, params: dict[str, Any]) -> DictConfig:
    overrides = [f"{k}={_as_override(v)}" for k, v in params.items()]
    overrides += [f"{k}={_as_override(v)}" for k, v in ctx.sampling_lists.items()]
    return load_config(ctx.base, overrides, where=ctx.config_file)


def _as_override(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(str(x) for x in v) + "]"
    return str(v)


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
    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):  # MLflow's batch limit
        client.log_batch(run.info.run_id, params=items[i : i + 100])
    return run.info.run_id


def train_and_evaluate(params: dict[str, Any], ctx: TrialContext) -> None:
    """The Tune trainable (function API)."""
    import ray
    from ray import tune

    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    cfg = trial_config(ctx, params)
    trial = tune.get_context()
    client = mlflow.MlflowClient(ctx.tracking_uri)
    root = Path(tempfile.mkdtemp(prefix="ddpm-trial-"))
    run_id, ckpt_path, reported = _resume_point(root)
    if run_id is None:
        run_id = _earlier_run(client, ctx, trial.get_trial_id())
        if run_id is not None:  # retried before its first checkpoint: same run, fresh start
            log.warning(
                "trial %s has no checkpoint: training starts fresh (same seed, so the "
                "steps already in MLflow run %s repeat and are not logged again)",
                trial.get_trial_name(),
                run_id,
            )
    if run_id is None:  # a fresh trial: its own child run under the sweep's parent
        run_id = _create_run(
            client,
            ctx,
            f"train {trial.get_trial_name()}",
            "train",
            flat_params(cfg),
            {"ddpm_sweep.trial_id": trial.get_trial_id()},
        )
    else:  # a retried or resumed trial re-attaches to its run
        client.update_run(run_id, status="RUNNING")
        log.info("trial %s re-attached to MLflow run %s", trial.get_trial_name(), run_id)
    node_id = ray.get_runtime_context().get_node_id()
    client.set_tag(run_id, "ddpm_sweep.pid", str(os.getpid()))
    client.set_tag(run_id, "ddpm_sweep.node_id", node_id)  # which Ray node trained it
    logger = ResumingMLFlowLogger(ctx.tracking_uri, run_id, client)
    try:
        result = fit(
            cfg,
            root,
            logger=logger,
            callbacks=[TuneReportCallback(run_id)],
            experiment=build_experiment(cfg),
            ckpt_path=ckpt_path,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        client.log_artifact(run_id, str(result.checkpoint), "checkpoints")
        summary = evaluate_cells(client, ctx, cfg, params, result, root, run_id)
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
    tune.report(final | {"node_id": node_id})


def _earlier_run(client, ctx: TrialContext, trial_id: str) -> str | None:
    """The training run an earlier attempt of this trial opened, if any."""
    runs = client.search_runs(
        [ctx.experiment_id],
        f"tags.mlflow.parentRunId = '{ctx.parent_run_id}' and "
        f"tags.`ddpm_sweep.trial_id` = '{trial_id}'",
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def _resume_point(root: Path) -> tuple[str | None, str | None, dict[str, float]]:
    """(MLflow run id, Lightning checkpoint path, the metrics reported with it) from Tune's
    last checkpoint of this trial."""
    from ray import tune

    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        return None, None, {}
    with checkpoint.as_directory() as d:
        run_id = (Path(d) / RUN_ID_FILE).read_text().strip()
        target = root / "resume.ckpt"
        target.write_bytes((Path(d) / "last.ckpt").read_bytes())
        metrics = Path(d) / METRICS_FILE
        reported = json.loads(metrics.read_text()) if metrics.is_file() else {}
    return run_id, str(target), reported


def evaluate_cells(client, ctx, cfg, params, result, root: Path, train_run_id: str) -> dict:
    """Evaluate every sampling configuration; one MLflow child run per (training × sampling)."""
    eval_ctx = prepare_context(result.datamodule, cfg.eval)
    done = {
        r.info.run_name
        for r in client.search_runs(
            [ctx.experiment_id],
            f"tags.`ddpm_sweep.train_run_id` = '{train_run_id}' and attributes.status = 'FINISHED'",
            max_results=10000,
        )
    }
    summary: dict[str, float] = {}
    for scalars in ctx.sampling_grid:
        sample_cfg = cfg.sample.copy()
        for k, v in scalars.items():
            sample_cfg[k.split(".", 1)[1]] = v
        rows = evaluate_module(
            result.module,
            result.datamodule,
            sample_cfg,
            cfg.eval,
            root / "samples",
            context=eval_ctx,
        )
        for row in rows:
            cell = {
                "sample.guidance": row["guidance"],
                "sample.variance": row["variance"],
                "sample.steps": row["steps"],
            } | scalars
            run_params = flat_params(cfg) | {k: str(v) for k, v in cell.items()}
            name = " ".join(
                [
                    "eval",
                    cell_suffix(row["guidance"], row["variance"], row["steps"]),
                    *(f"{k.split('.', 1)[1]}={v}" for k, v in scalars.items()),
                ]
            )
            if name in done:  # evaluated before the trial was interrupted: not twice
                continue
            run_id = _create_run(
                client, ctx, name, "eval", run_params, {"ddpm_sweep.train_run_id": train_run_id}
            )
            metrics = {k: v for k, v in row.items() if isinstance(v, float) and k != "guidance"}
            now = int(time.time() * 1000)
            client.log_batch(
                run_id,
                metrics=[Metric(k, v, now, result.trainer.global_step) for k, v in metrics.items()],
            )
            client.log_artifact(run_id, row["image"], "samples")
            client.set_terminated(run_id, "FINISHED")
            for k, v in metrics.items():
                summary[
                    f"eval/{k}/{cell_suffix(row['guidance'], row['variance'], row['steps'])}"
                ] = v
    return summary


def sampling_grid(axes) -> list[dict[str, Any]]:
    """Scalar sampling-time axes (sampler, eta, ...) as a list of combinations."""
    keys = [a.key for a in axes]
    return [dict(zip(keys, combo)) for combo in itertools.product(*[a.values for a in axes])]
