"""Helpers shared by the sweep benchmarks (`sweep_savings.py`, `sweep_overhead.py`).

Not a benchmark itself. Two halves:

* worker side: `timed_trainable`, the function both benchmarks hand to the product's
  `run_sweep(..., trainable=...)` seam. It imports the product inside the trial, where that
  import time is measured (the product's trainable pays the same imports when the worker loads
  it, before Tune's clock for the trial starts), then calls `train_and_evaluate` unchanged. The
  trial's own phases (build, fit, checkpoint, evaluate, MLflow) are what the product reports
  with every trial's result (`time/<phase>_s`, orchestrator/phases.py): nothing is patched;
* driver side: starting Ray, running `run_sweep` with that trainable, reading back Tune's
  per-trial results and the MLflow evaluation runs.

Ray puts the driver script's directory (`benchmarks/`) on the workers' `sys.path`, so the
workers import this module by name.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
import time
from pathlib import Path

# Phases of one trial, in the order they are printed; exclusive times that add up to the
# trial's total. All but imports and other are the product's own report (orchestrator/phases.py).
PHASES = (
    "imports",  # torch, pytorch_lightning, mlflow, orchestrator.trial (0 once imported)
    "build",  # build_experiment: data module + network
    "fit",  # Lightning fit, validation included; checkpoints and MLflow calls excluded
    "checkpoint",  # at each validation: save, sync the metrics with MLflow, tune.report
    "evaluate",  # the sampling cells: sampling, metrics, PNGs (MLflow calls excluded)
    "mlflow",  # every MlflowClient call of the trial's thread (runs, params, artifacts, ...)
    "other",  # the rest: config, run tags, temp dirs, the final report, ...
)


def naive_plan(plan, name: str):
    """The same sweep as a naive grid: every axis (sampling ones too) a Tune axis, and each
    trial trains its own model and evaluates only its own cell. Built on the plan's seams
    (``training_for``, ``cells_for``), so the trials run the product's code unchanged."""
    from orchestrator.plan import Plan, Training, resolve
    from orchestrator.sweep_config import Axis

    class Trained(Axis):
        @property
        def sampling_time(self) -> bool:
            return False

    class NaivePlan(Plan):
        def cells_for(self, params):
            wanted = {k.split(".", 1)[1]: v for k, v in params.items() if k.startswith("sample.")}
            for cell in self.cells:
                if all(getattr(cell.spec, k) == v for k, v in wanted.items()):
                    return [cell]
            raise KeyError(f"no planned cell has {wanted}")

        def training_for(self, params):
            training = {k: v for k, v in params.items() if not k.startswith("sample.")}
            return Training(training, resolve(self.sweep, training, self.cells_for(params)))

    sweep = dataclasses.replace(
        plan.sweep, name=name, axes=[Trained(a.key, a.kind, a.values) for a in plan.sweep.axes]
    )
    return NaivePlan(sweep, plan.trainings, plan.cells, plan.costs, plan.sampled_axes)


def timed_trainable(
    params: dict,
    *,
    ctx,
    timing_dir: str,
    seed_first: bool = False,
    env: dict | None = None,
) -> None:
    """The product's `train_and_evaluate(params, ctx)`, with its imports timed; writes one JSON
    per trial to `timing_dir`. `env`: environment variables set for the trial (restored
    after)."""
    t_first = time.time()
    fresh_process = "torch" not in sys.modules
    start = time.perf_counter()
    import pytorch_lightning
    import torch

    import orchestrator.trial as trial_mod

    imports_s = time.perf_counter() - start
    from ray import tune

    if seed_first:  # variant: seed before build_experiment (the network's init), see README
        seed = int(params.get("train.seed", ctx.plan.sweep.base.train.seed))
        pytorch_lightning.seed_everything(seed, workers=True, verbose=False)
    error = None
    saved_env = {k: os.environ.get(k) for k in env or {}}
    os.environ.update(env or {})
    start = time.perf_counter()
    try:
        trial_mod.train_and_evaluate(params, ctx)
    except BaseException as err:
        error = repr(err)
        raise
    finally:
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        trial = tune.get_context()
        record = {
            "trial_id": trial.get_trial_id(),
            "trial_name": trial.get_trial_name(),
            "params": dict(params),
            "pid": os.getpid(),
            "fresh_process": fresh_process,
            "torch_threads": torch.get_num_threads(),
            "t_first": t_first,  # wall clock at the trainable's first line
            "t_return": time.time(),  # wall clock when train_and_evaluate returned
            "compute_s": time.perf_counter() - start,  # train_and_evaluate, imports excluded
            "imports_s": imports_s,
            "error": error,
        }
        path = Path(timing_dir) / f"{record['trial_id']}.json"
        path.write_text(json.dumps(record, default=str))


def trial_phases(record: dict, result: dict) -> dict[str, float]:
    """A trial's phases: its imports (measured by the wrapper), the product's own report of
    the rest (Tune's final result), and what neither covers."""
    phases = {"imports": record["imports_s"]}
    phases |= {p: float(result.get(f"time/{p}_s") or 0.0) for p in PHASES[1:-1]}
    phases["other"] = record["compute_s"] - sum(v for k, v in phases.items() if k != "imports")
    return phases


# -- driver side ---------------------------------------------------------------------------------


def start_ray(log_to_driver: bool = True, **init_kwargs) -> dict:
    """A new local Ray instance (never someone else's cluster), as the product starts it
    (`ray.init(address=None, log_to_driver=True)`), timed; then a first task's round trip.
    ``init_kwargs`` go to ray.init (num_cpus=..., include_dashboard=...)."""
    import ray

    t0 = time.perf_counter()
    ray.init(address="local", log_to_driver=log_to_driver, **init_kwargs)
    init_s = time.perf_counter() - t0

    @ray.remote(num_cpus=1)
    def _ping():
        return os.getpid()

    t0 = time.perf_counter()
    ray.get(_ping.remote())
    first_task_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    ray.get(_ping.remote())
    warm_task_s = time.perf_counter() - t0
    return {
        "ray_init_s": init_s,
        "first_task_s": first_task_s,
        "warm_task_s": warm_task_s,
        "cluster_cpus": ray.cluster_resources().get("CPU", 0.0),
    }


def ray_version() -> str:
    import ray

    return ray.__version__


def run_timed_sweep(
    plan,
    workdir: Path,
    *,
    seed_first: bool = False,
    env: dict | None = None,
) -> dict:
    """`run_sweep(plan)` with a fresh sqlite MLflow file and Tune storage under `workdir`,
    each trial running `timed_trainable` (the `trainable` seam). Returns wall times, per-trial
    timing records (joined with Tune's results) and the tracking URI."""
    import orchestrator.sweep as sweep_mod

    workdir.mkdir(parents=True, exist_ok=True)
    timing_dir = workdir / "timings"
    timing_dir.mkdir(exist_ok=True)
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    storage = workdir / "tune"
    trainable = functools.partial(
        timed_trainable, timing_dir=str(timing_dir), seed_first=seed_first, env=env
    )
    cwd = os.getcwd()
    os.chdir(workdir)  # MLflow's default artifact root is ./mlruns
    t_start = time.time()
    try:
        summary = sweep_mod.run_sweep(
            plan, tracking_uri=uri, storage_path=str(storage), trainable=trainable
        )
    finally:
        os.chdir(cwd)
    t_end = time.time()
    location = sweep_mod.experiment_location(str(storage), plan.name)
    tune_results = read_tune_results(Path(location))
    trials = []
    for path in sorted(timing_dir.glob("*.json")):
        rec = json.loads(path.read_text())
        result = tune_results.get(rec["trial_id"], {})
        rec["time_total_s"] = result.get("time_total_s")
        rec["phases_s"] = trial_phases(rec, result)
        rec["final_metrics"] = {
            k: v for k, v in result.items() if isinstance(v, (int, float)) and "/" in k
        }
        trials.append(rec)
    return {
        "t_start": t_start,
        "t_end": t_end,
        "wall_s": t_end - t_start,
        "run_sweep_wall_s": summary["wall_seconds"],  # run_sweep's own: Ray init + Tune fit
        "errored": summary["errored"],
        "num_trials": len(summary["trials"]),
        "trials": trials,
        "tracking_uri": uri,
        "experiment": plan.name,
    }


def read_tune_results(exp_dir: Path) -> dict[str, dict]:
    """Each trial's last result (`result.json` is one JSON object per report), by trial id."""
    out = {}
    for path in exp_dir.glob("*/result.json"):
        lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
        if lines:
            last = json.loads(lines[-1])
            out[last["trial_id"]] = last
    return out


def slot_gaps(trials: list[dict], slots: int, t_start: float, t_end: float) -> dict:
    """Per-trial start cost from the workers' own clocks. With FIFO scheduling and equal
    resources, the i-th trial to start (i >= slots) took the slot freed by the (i - slots)-th
    trial to return; gap = its first line - that return (Tune's bookkeeping, stopping the
    actor, a new worker process, creating the actor; with reuse_actors, resetting the actor).
    The first `slots` trials: first line - the run_sweep call."""
    firsts = sorted(t["t_first"] for t in trials)
    returns = sorted(t["t_return"] for t in trials)
    first_wave = [f - t_start for f in firsts[:slots]]
    gaps = [firsts[i] - returns[i - slots] for i in range(slots, len(firsts))]
    return {
        "first_wave_start_s": first_wave,
        "slot_gap_s": gaps,
        "tail_s": t_end - returns[-1] if returns else None,
    }


def eval_metrics(tracking_uri: str, experiment: str) -> dict[tuple, dict[str, float]]:
    """Every evaluation run's metrics keyed by (schedule, variance, guidance, steps) plus any
    other sampling params, read back from MLflow."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs(
        [exp.experiment_id], "tags.`ddpm_sweep.role` = 'eval'", max_results=10000
    )
    out = {}
    for r in runs:
        p = r.data.params
        key = (
            p["diffusion.schedule"],
            p["sample.variance"],
            float(p["sample.guidance"]),
            int(p["sample.steps"]),
        )
        if key in out:
            raise RuntimeError(f"{experiment}: two evaluation runs for cell {key}")
        out[key] = dict(r.data.metrics)
    return out
