"""`ddpm-sweep run`: from the plan, open the sweep's MLflow parent run and launch the trials.

One Tune trial per training configuration of the plan (orchestrator/plan.py); every sampling
cell is evaluated inside the trial from its checkpoint, so no sampling axis is ever retrained.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric, Param
from omegaconf import OmegaConf

from lightning_modules.diffusion import GUIDANCE_CONVENTION

from .cluster import (
    check_storage_visible,
    connect,
    describe_cluster,
    experiment_location,
    is_uri,
    local_path,
    read_text,
    write_text,
)
from .plan import Plan, build_plan, check_cluster
from .sweep_config import Axis, Sweep
from .tracking import run_tags
from .trial import TrialContext, train_and_evaluate

log = logging.getLogger(__name__)


def tune_space(axes: list[Axis]) -> dict[str, Any]:
    from ray import tune

    make = {
        "grid": tune.grid_search,
        "choice": tune.choice,
        "uniform": lambda v: tune.uniform(*v),
        "loguniform": lambda v: tune.loguniform(*v),
        "randint": lambda v: tune.randint(v[0], v[1] + 1),  # inclusive, like the YAML reads
    }
    return {a.key: make[a.kind](a.values) for a in axes}


def _searcher(sweep: Sweep):
    if sweep.tune.search_alg == "bayes":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(seed=sweep.tune.seed)
    from ray.tune.search import BasicVariantGenerator

    # Grid and random: Tune's own generator, given tune.seed (left to Tune, it is unseeded and
    # random search draws other points each run) and the concurrency limit itself.
    return BasicVariantGenerator(
        max_concurrent=sweep.tune.max_concurrent_trials, random_state=sweep.tune.seed
    )


def _scheduler(sweep: Sweep):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if sweep.tune.scheduler == "asha":
        return ASHAScheduler(
            grace_period=sweep.tune.grace_period, reduction_factor=sweep.tune.reduction_factor
        )
    return FIFOScheduler()


def axis_text(axis: Axis) -> str:
    """An axis as its sweep file reads: `[linear, cosine]`, `loguniform(0.0001, 0.001)`."""
    values = ", ".join(str(v) for v in axis.values)
    return f"[{values}]" if axis.kind == "grid" else f"{axis.kind}({values})"


def parent_params(plan: Plan) -> dict[str, str]:
    """The parent run's params: the sweep's axes, its Tune settings and the plan's counts,
    under `sweep.` so that they never share a column with the children's own values."""
    sweep = plan.sweep
    params = {f"sweep.axis.{a.key}": axis_text(a) for a in sweep.axes}
    params |= {
        f"sweep.tune.{k}": str(getattr(sweep.tune, k))
        for k in ("search_alg", "scheduler", "metric", "mode", "num_samples")
        if hasattr(sweep.tune, k)
    }
    params |= {f"sweep.plan.{k}": str(v) for k, v in plan.costs.as_dict().items()}
    if plan.search is not None:  # the resolved objective, not the file's defaults (None)
        settings = plan.search.settings.__dict__ | {
            "metric": plan.search.metric,
            "mode": "min" if plan.search.lower else "max",
        }
        params |= {f"sweep.sample_search.{k}": str(v) for k, v in settings.items()}
    return params


def sweep_note(plan: Plan, best: dict[str, Any] | None = None) -> str:
    """The parent run's description (`mlflow.note.content`, markdown in the UI)."""
    sweep, c = plan.sweep, plan.costs
    axes = "\n".join(f"- `{a.key}`: {axis_text(a)}" for a in sweep.axes) or "- (none)"
    lines = [
        f"Sweep **{sweep.name}** from `{sweep.source}`: {c.trainings} training run(s) x "
        f"{c.cells} sampling cell(s) = {c.evaluated_pairs} evaluation runs (a grid over every "
        f"axis would train {c.naive_trainings} times).",
        "",
        "Axes:",
        axes,
        "",
        f"Guidance convention: {GUIDANCE_CONVENTION}.",
    ]
    if best:
        lines += [
            "",
            f"**Best:** {best['eval_run']} ({best_text(best)}); registered as model "
            f"`{best['registered_model']}` version {best['version']}. {best['comparison']}",
        ]
    lines += ["", "Runs: group by `diffusion.schedule` or any axis in the Columns view; the "
              "sampling cell's values are the `sample.*` params of the eval runs."]  # fmt: skip
    return "\n".join(lines)


def best_text(best: dict[str, Any]) -> str:
    """`fid 0.88 [0.71, 1.05]`: the best configuration's metric and its interval."""
    metric = best["metric"]
    value, low = best[metric], best.get(f"{metric}_ci_low", math.nan)
    if math.isnan(low):
        return f"{metric} {value:.4g}"
    return f"{metric} {value:.4g} [{low:.3g}, {best[f'{metric}_ci_high']:.3g}]"


BEST_FIELDS = (
    "metric",
    "ties",
    "comparison",
    "eval_run",
    "eval_run_id",
    "train_run_id",
    "params",
    "registered_model",
    "version",
    "model_uri",
)


def resolved_base(sweep: Sweep) -> str:
    """The base config as the sweep runs it: every axis key shows its axis, not the default
    it replaces (a training axis over schedules is not `schedule: cosine`)."""
    base = OmegaConf.to_container(sweep.base, resolve=True)
    for a in sweep.axes:
        node = base
        *parents, last = a.key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = f"<axis {axis_text(a)}>"
    return OmegaConf.to_yaml(OmegaConf.create(base))


def open_parent_run(plan: Plan, tracking_uri: str) -> tuple[str, str]:
    sweep = plan.sweep
    client = mlflow.MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(sweep.name)
    experiment_id = exp.experiment_id if exp else client.create_experiment(sweep.name)
    tags = run_tags(sweep.source) | {
        "ddpm_sweep.sweep": sweep.name,
        "ddpm_sweep.role": "sweep",
        "mlflow.runName": f"sweep {sweep.name}",
        "mlflow.note.content": sweep_note(plan),
    }
    run = client.create_run(experiment_id, run_name=f"sweep {sweep.name}", tags=tags)
    params = [Param(k, v[:6000]) for k, v in parent_params(plan).items()]
    for i in range(0, len(params), 100):
        client.log_batch(run.info.run_id, params=params[i : i + 100])
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "resolved_config.yaml").write_text(resolved_base(sweep))
        (Path(tmp) / "sweep.json").write_text(
            json.dumps(
                {
                    "axes": [a.__dict__ for a in sweep.axes],
                    "tune": sweep.tune.__dict__,
                    "sample_search": sweep.sample_search and sweep.sample_search.__dict__,
                    "plan": plan.costs.as_dict(),
                },
                indent=2,
                default=str,
            )
        )
        client.log_artifacts(run.info.run_id, tmp)
    return experiment_id, run.info.run_id


STATE_FILE = "ddpm_sweep.json"  # in the Tune experiment directory: what `resume` needs


def _trainable(plan: Plan, ctx: TrialContext, trainable=train_and_evaluate):
    from ray import tune

    t = plan.tune
    return tune.with_resources(
        tune.with_parameters(trainable, ctx=ctx),
        {"cpu": t.cpus_per_trial, "gpu": t.gpus_per_trial} | dict(t.resources_per_trial),
    )


def _tuner(
    plan: Plan, ctx: TrialContext, location: str, trainable=train_and_evaluate, verbose=False
):
    from ray import tune

    from .progress import SweepProgress

    sweep, t = plan.sweep, plan.tune
    return tune.Tuner(
        _trainable(plan, ctx, trainable),
        param_space=tune_space(sweep.training_axes),
        tune_config=tune.TuneConfig(
            metric=t.metric,
            mode=t.mode,
            num_samples=t.num_samples,
            # The generator limits itself (max_concurrent); Optuna gets Tune's limiter.
            max_concurrent_trials=t.max_concurrent_trials if t.search_alg == "bayes" else None,
            search_alg=_searcher(sweep),
            scheduler=_scheduler(sweep),
            reuse_actors=t.reuse_actors,
        ),
        run_config=tune.RunConfig(
            name=sweep.name,
            storage_path=location.rsplit("/", 1)[0],
            failure_config=tune.FailureConfig(max_failures=t.max_failures),
            # Two, not one: a driver killed between deleting the older checkpoint and
            # snapshotting the experiment state must still find the one the state names.
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            verbose=1 if verbose else 0,  # Tune's status tables: --verbose
            callbacks=[
                SweepProgress(
                    trainings=plan.costs.trainings,
                    cells=plan.costs.cells,
                    tracking_uri=ctx.tracking_uri,
                    experiment_id=ctx.experiment_id,
                    parent_run_id=ctx.parent_run_id,
                )
            ],
        ),
    )


def _connect(plan: Plan, address: str | None, storage_path: str | None, verbose=False) -> None:
    """Start or join Ray; refuse a trial no node can host, and (on a cluster) a storage path
    some node cannot see. Workers' output reaches this console only when ``verbose``."""
    import ray

    if not verbose:
        from .progress import quiet_console

        quiet_console()
    connect(address, log_to_driver=verbose)
    check_cluster(plan, [n for n in ray.nodes() if n["Alive"]])
    if address is not None:
        check_storage_visible(storage_path)


def run_sweep(
    plan: Plan,
    *,
    tracking_uri: str,
    address: str | None = None,
    storage_path: str | None = None,
    overrides: list[str] = (),
    trainable=train_and_evaluate,
    verbose: bool = False,
) -> dict[str, Any]:
    """Run the plan's trials on Ray Tune, recorded in MLflow; the summary. ``trainable``: the
    function each trial runs, ``train_and_evaluate`` (a seam for tools that wrap it, e.g. the
    benchmarks, which time it from the outside). ``verbose``: Tune's status tables and the
    workers' output on this console, beside the progress line."""
    sweep = plan.sweep
    location = experiment_location(storage_path, sweep.name)
    # Before anything is recorded: a refused sweep leaves no run.
    _connect(plan, address, storage_path, verbose)
    experiment_id, parent_run_id = open_parent_run(plan, tracking_uri)
    state = {
        "sweep_file": str(Path(sweep.source).resolve()),
        "overrides": list(overrides),
        "name": sweep.name,
        "tracking_uri": tracking_uri,
        "experiment_id": experiment_id,
        "parent_run_id": parent_run_id,
        "address": address,
    }
    write_text(location, STATE_FILE, json.dumps(state, indent=2))
    ctx = TrialContext(plan, tracking_uri, experiment_id, parent_run_id)
    client = mlflow.MlflowClient(tracking_uri)
    start = time.time()
    try:
        tuner = _tuner(plan, ctx, location, trainable, verbose)
        results = tuner.fit()
    except BaseException:
        client.set_terminated(parent_run_id, "FAILED")
        raise
    return _finish(client, results, plan, experiment_id, parent_run_id, start)


def _finish(client, results, plan: Plan, experiment_id, parent_run_id, start) -> dict[str, Any]:
    close_orphan_runs(client, experiment_id, parent_run_id)
    summary = summarize(results, plan, time.time() - start)
    summary["cluster"] = describe_cluster()
    summary["best"] = publish_best(client, plan.sweep, parent_run_id)
    log_sweep_results(client, plan, parent_run_id, summary)
    client.log_dict(parent_run_id, summary, "summary.json")
    client.set_terminated(parent_run_id, "FINISHED" if not summary["errored"] else "FAILED")
    summary["parent_run_id"] = parent_run_id
    summary["tracking_uri"] = client.tracking_uri
    return summary


def resume_sweep(
    directory: str | Path, *, address: str | None = None, verbose: bool = False
) -> dict[str, Any]:
    """Continue a killed sweep from its Tune experiment directory: finished trials are kept,
    unfinished and errored ones resume from their last checkpoint, the same parent run is used."""
    from ray import tune

    directory = str(directory)
    location = directory.rstrip("/") if is_uri(directory) else str(local_path(directory))
    text = read_text(location, STATE_FILE)
    if text is None:
        raise ValueError(
            f"{location}: not a ddpm-sweep experiment directory (no {STATE_FILE}); "
            "pass the directory `ddpm-sweep run` printed, <storage-path>/<name>"
        )
    state = json.loads(text)
    address = address or state.get("address")
    plan = build_plan(
        state["sweep_file"], state["overrides"], state["name"], local_data=address is None
    )
    _connect(plan, address, location.rsplit("/", 1)[0], verbose)
    client = mlflow.MlflowClient(state["tracking_uri"])
    client.update_run(state["parent_run_id"], status="RUNNING")
    ctx = TrialContext(plan, state["tracking_uri"], state["experiment_id"], state["parent_run_id"])
    start = time.time()
    try:
        if tune.Tuner.can_restore(location):
            tuner = tune.Tuner.restore(
                location, _trainable(plan, ctx), resume_unfinished=True, resume_errored=True
            )
        else:  # killed before Tune wrote any state: start the trials afresh, same parent run
            log.warning(
                "%s has no Tune checkpoint yet: starting the sweep's trials fresh "
                "(same MLflow parent run)",
                location,
            )
            tuner = _tuner(plan, ctx, location, verbose=verbose)
        results = tuner.fit()
    except BaseException:
        client.set_terminated(state["parent_run_id"], "FAILED")
        raise
    return _finish(client, results, plan, state["experiment_id"], state["parent_run_id"], start)


def publish_best(client, sweep: Sweep, parent_run_id: str) -> dict[str, Any] | None:
    """Log the best pair's checkpoint to the parent run (`best/`) and register it as a new
    version of the registered model named after the sweep."""
    from .model import log_sampler_model, register_best
    from .report import compare_evals, finished_evals, quality_metric, sweep_runs
    from .report_page import value_text

    _, children = sweep_runs(client, sweep.name, parent_run_id)
    evals = finished_evals(children)
    quality, lower = quality_metric(evals) if evals else (None, True)
    if quality is None:
        return None
    # The best configuration (replicates averaged), and the others within noise of it.
    comparison = compare_evals(client, evals, quality, lower)
    top = comparison.best
    best = top.best_run
    ties = [c.best_run.info.run_name for c in comparison.ties]
    train_run_id = best.data.tags["ddpm_sweep.train_run_id"]
    cell = {k: v for k, v in best.data.params.items() if k.startswith("sample.")}
    score = best.data.metrics.get(quality)
    interval = {f"{quality}_ci_low": top.ci_low, f"{quality}_ci_high": top.ci_high}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = mlflow.artifacts.download_artifacts(
            run_id=train_run_id,
            artifact_path="checkpoints/last.ckpt",
            dst_path=tmp,
            tracking_uri=client.tracking_uri,
        )
        client.log_artifact(parent_run_id, ckpt, "best")
        # A pyfunc model: mlflow.pyfunc.load_model(...).predict(labels, guidance) samples.
        info = log_sampler_model(
            ckpt,
            name=sweep.name,
            cell=cell,
            run_id=train_run_id,
            eval_run_id=best.info.run_id,
            tracking_uri=client.tracking_uri,
            metadata={
                "sweep": sweep.name,
                "parent_run_id": parent_run_id,
                "eval_run": best.info.run_name,
                "quality": quality,
                quality: score,
                **interval,
                "within_noise": ties,
                "comparison": comparison.sentence(),
            },
            tags={"ddpm_sweep.sweep": sweep.name, "ddpm_sweep.parent_run_id": parent_run_id},
        )
    version = register_best(
        client,
        info,
        sweep.name,
        tags={
            "ddpm_sweep.parent_run_id": parent_run_id,
            "ddpm_sweep.eval_run_id": best.info.run_id,
            **{k: cell[k] for k in ("sample.variance", "sample.guidance", "sample.steps")},
            quality: str(score),
            "ddpm_sweep.within_noise": str(len(ties)),
        },
        description=(
            f"best {quality} of sweep {sweep.name}: {best.info.run_name}, {quality} "
            f"{value_text(top)}. {comparison.sentence()}"
        ),
        registered_description=f"best model of sweep {sweep.name}",
    )
    return {
        "eval_run": best.info.run_name,
        "eval_run_id": best.info.run_id,
        "train_run_id": train_run_id,
        "metric": quality,
        quality: top.mean,
        **interval,
        "replicates": top.n,
        "within_noise": len(ties),
        "ties": ties,
        "comparison": comparison.sentence(),
        "params": {
            k: v
            for k, v in best.data.params.items()
            if k in sweep_axis_keys(sweep) or k.startswith("sample.")
        },
        "registered_model": sweep.name,
        "version": version.version,
        "model_uri": info.model_uri,
    }


def log_sweep_results(client, plan: Plan, parent_run_id: str, summary: dict) -> None:
    """The sweep's outcome on its parent run: the best result and the counts as metrics (the
    experiment's runs table shows them in the parent's row), and the note updated with it."""
    best = summary.get("best") or {}
    metrics = {
        "sweep/trials": len(summary["trials"]),
        "sweep/errored": summary["errored"],
        "sweep/wall_seconds": summary["wall_seconds"],
    }
    metrics |= {
        f"best/{k}": float(v)
        for k, v in best.items()
        if k not in BEST_FIELDS and isinstance(v, (int, float)) and math.isfinite(v)
    }
    now = int(time.time() * 1000)
    client.log_batch(parent_run_id, metrics=[Metric(k, v, now, 0) for k, v in metrics.items()])
    client.set_tag(parent_run_id, "mlflow.note.content", sweep_note(plan, best or None))


def sweep_axis_keys(sweep: Sweep) -> set[str]:
    return {a.key for a in sweep.axes}


def close_orphan_runs(client, experiment_id: str, parent_run_id: str) -> None:
    """Trials stopped by ASHA (or killed) cannot close their MLflow run; mark those KILLED."""
    running = client.search_runs(
        [experiment_id],
        f"tags.mlflow.parentRunId = '{parent_run_id}' and attributes.status = 'RUNNING'",
        max_results=1000,
    )
    for run in running:
        client.set_terminated(run.info.run_id, "KILLED")


def summarize(results, plan: Plan, wall_seconds: float) -> dict[str, Any]:
    sweep = plan.sweep
    trials = []
    for r in results:
        trials.append(
            {
                "config": r.config,
                "error": str(r.error) if r.error else None,
                "node_id": (r.metrics or {}).get("node_id"),  # the Ray node that trained it
                "metrics": {
                    k: v
                    for k, v in (r.metrics or {}).items()
                    if isinstance(v, (int, float)) and "/" in k
                },
            }
        )
    errored = [t for t in trials if t["error"]]
    # Tune's time_total_s is the trial's own compute time (training and evaluation).
    trial_seconds = sum(float((r.metrics or {}).get("time_total_s", 0.0)) for r in results)
    return {
        "sweep": sweep.name,
        "trials": trials,
        "errored": len(errored),
        "wall_seconds": wall_seconds,
        "plan": plan.costs.as_dict(),
        "trial_seconds": trial_seconds,
        "cpu_hours": trial_seconds * sweep.tune.cpus_per_trial / 3600,
        "gpu_hours": trial_seconds * sweep.tune.gpus_per_trial / 3600,
    }
