"""What the sweep planner saves: one trial per training config vs a naive grid over every axis.

One sweep, run both ways in one run, on one local Ray instance, with the same seeds:

* ``planned``: ``run_sweep`` with the sweep as loaded: one Tune trial per training
  configuration (here the schedules), every sampling configuration (variance x guidance x
  steps) evaluated from that trial's checkpoint;
* ``naive``: the same plan with every sampling axis turned into a training axis
  (``_sweeps.naive_plan``): the sampling axes go through ``tune_space`` as grid_search on the
  trainable, so each trial trains its own model and evaluates only its one sampling cell (the
  plan's ``cells_for`` seam).

Both run the product's ``run_sweep`` and ``train_and_evaluate`` unchanged; only the trainable
is wrapped (``_sweeps.timed_trainable``) to time each trial's phases from inside the worker.
Each way has its own sqlite MLflow file and Tune storage in a temp dir.

Keys: ``naive_over_planned_trial_seconds`` (the sum over trials of each trial's own work, the
``train_and_evaluate`` call, naive over planned; goal >= 5 for 3 schedules x 2 variances x 6 w;
a fresh worker process's imports are left out: they come with a process, not with the plan,
and happen when the worker unpacks the trial's context, before Tune's clock for the trial is
far along), ``naive_over_planned_time_total_s`` (the same with Tune's ``time_total_s``, which
counts those imports), ``naive_over_planned_wall_seconds`` (``run_sweep`` wall
time) and ``max_metric_difference`` (the largest |difference| of an evaluation metric between
the two ways over every (schedule, variance, guidance, steps) cell, read back from the two
MLflow databases: the same seeds, so it should be 0 up to float noise).

The default is the issue's 3 x 2 x 6 grid on the 2-D ``mixture_quick`` base at a reduced
training length (60 steps): the quickstart's 400-step U-Net trainings are too slow to run 36 of
them on a 2-core CPU. ``--sweep sweeps/quickstart.yaml --max-steps 400`` runs the quickstart.

    .venv/bin/python benchmarks/sweep_savings.py --out /tmp/bench_sweep_savings.json
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import _common
import _sweeps
import torch
from omegaconf import OmegaConf

from orchestrator.plan import Plan, build_plan

GOAL = 5.0
NOT_METRICS = {"sample_seconds"}  # timings logged with the metrics: not compared


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="JSON file for the figures")
    p.add_argument(
        "--sweep",
        default=str(_common.REPO_ROOT / "sweeps" / "mixture_quick.yaml"),
        help="sweep file whose base config is used (its search is replaced by the axes below)",
    )
    p.add_argument("--schedules", default="linear,cosine,sigmoid", help="training axis")
    p.add_argument("--variances", default="fixed_small,fixed_large", help="sampling axis")
    p.add_argument("--guidance", default="0,0.5,1,2,3,5", help="sampling axis: w values")
    p.add_argument("--sample-steps", default="20", help="sampling axis: sampling steps")
    p.add_argument("--max-steps", type=int, default=60, help="base.train.max_steps")
    p.add_argument(
        "--val-every", type=int, help="base.train.val_every_n_steps (default: --max-steps)"
    )
    p.add_argument("--eval-samples", type=int, default=200, help="base.eval.num_samples")
    p.add_argument("--concurrency", type=int, default=2, help="tune.max_concurrent_trials")
    p.add_argument(
        "--override",
        action="append",
        default=[],
        help="extra sweep-file override, e.g. base.train.lr=1e-3 (repeatable)",
    )
    p.add_argument("--order", choices=["planned-first", "naive-first"], default="planned-first")
    p.add_argument(
        "--seed-init",
        action="store_true",
        help="seed (pl.seed_everything(train.seed)) before the trial builds its network, as "
        "the product does not (yet): without it each trial's initial weights are random",
    )
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads in the driver")
    p.add_argument("--quiet", action="store_true", help="ray.init(log_to_driver=False)")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (MLflow DBs, Tune)")
    return p.parse_args()


def _csv(text: str, kind=str) -> list:
    return [kind(v) for v in text.split(",") if v.strip()]


def _number(v: str):
    f = float(v)
    return int(f) if f.is_integer() else f


def build_sweeps(args, workdir: Path) -> tuple[Plan, Plan]:
    """The planned sweep (built by build_plan from a sweep file written here) and the
    naive one: the same base and axes, every axis a training axis."""
    raw = OmegaConf.load(args.sweep)
    raw.search = {
        "diffusion.schedule": _csv(args.schedules),
        "sample.variance": _csv(args.variances),
        "sample.guidance": _csv(args.guidance, _number),
        "sample.steps": _csv(args.sample_steps, int),
    }
    warmup = OmegaConf.select(raw, "base.train.warmup_steps", default=100)
    path = workdir / "sweep_savings.yaml"
    OmegaConf.save(raw, path)
    overrides = [
        f"base.train.max_steps={args.max_steps}",
        f"base.train.val_every_n_steps={args.val_every or args.max_steps}",
        f"base.train.warmup_steps={min(args.max_steps // 3, warmup)}",
        f"base.eval.num_samples={args.eval_samples}",
        f"tune.max_concurrent_trials={args.concurrency}",
        "tune.search_alg=grid",
        "tune.scheduler=fifo",
        "tune.num_samples=1",
        *args.override,
    ]
    planned = build_plan(path, overrides, "savings-planned")
    naive = _sweeps.naive_plan(planned, "savings-naive")
    return planned, naive


def trial_seconds(run: dict, cells: dict) -> dict:
    trials = run["trials"]
    tune_total = [t["time_total_s"] for t in trials]
    imports = [t["phases_s"]["imports"] for t in trials]
    if any(v is None for v in tune_total):  # no Tune result for a trial: the wrapper's clock
        tune_total = [t["compute_s"] + t["phases_s"]["imports"] for t in trials]
    phases = {p: sum(t["phases_s"][p] for t in trials) for p in _sweeps.PHASES}
    return {
        "trials": len(trials),
        "trial_seconds": sum(t["compute_s"] for t in trials),
        "tune_time_total_s": sum(tune_total),
        "compute_s": sum(t["compute_s"] for t in trials),
        "imports_s": sum(imports),
        "phases_s": phases,
        "wall_s": run["wall_s"],
        "load_average_1min": run["load_average_1min"],
        "eval_cells": len(cells),
        "errored": run["errored"],
    }


def compare_metrics(a: dict, b: dict) -> dict:
    """Largest |a - b| over the cells and metrics both ways logged."""
    cells = sorted(set(a) & set(b))
    worst = {"value": 0.0, "metric": None, "cell": None}
    per_metric: dict[str, float] = {}
    identical = compared = 0
    for cell in cells:
        for metric in sorted((set(a[cell]) & set(b[cell])) - NOT_METRICS):
            diff = abs(a[cell][metric] - b[cell][metric])
            compared += 1
            identical += diff == 0
            per_metric[metric] = max(per_metric.get(metric, 0.0), diff)
            if diff > worst["value"] or worst["metric"] is None:
                worst = {
                    "value": diff,
                    "metric": metric,
                    "cell": dict(zip(["schedule", "variance", "guidance", "steps"], cell)),
                    "planned": a[cell][metric],
                    "naive": b[cell][metric],
                }
    return {
        "max": worst,
        "per_metric_max": per_metric,
        "cells_compared": len(cells),
        "values_compared": compared,
        "values_identical": identical,
        "cells_only_planned": [list(c) for c in sorted(set(a) - set(b))],
        "cells_only_naive": [list(c) for c in sorted(set(b) - set(a))],
    }


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="bench-sweep-savings-"))
    import ray

    try:
        planned, naive = build_sweeps(args, tmp)
        costs = planned.costs
        plans = {
            "planned": costs.as_dict(),
            "naive": {"trainings": costs.naive_trainings, "cells": 1},
        }
        print(
            f"planned: {costs.trainings} trainings x {costs.cells} cells; naive: "
            f"{costs.naive_trainings} trainings x 1 cell  (work dir {tmp})",
            flush=True,
        )
        ray_start = _sweeps.start_ray(log_to_driver=not args.quiet)
        runs = {}
        order = ["planned", "naive"] if args.order == "planned-first" else ["naive", "planned"]
        for way in order:
            sweep = planned if way == "planned" else naive
            print(f"\n=== {way}: run_sweep({sweep.name}) ===", flush=True)
            load = os.getloadavg()[0]
            runs[way] = _sweeps.run_timed_sweep(sweep, tmp / way, seed_first=args.seed_init)
            runs[way]["load_average_1min"] = [load, os.getloadavg()[0]]
            if runs[way]["num_trials"] != len(runs[way]["trials"]) or runs[way]["errored"]:
                print(
                    f"WARNING: {way}: {len(runs[way]['trials'])} of {runs[way]['num_trials']} "
                    f"trials wrote timings, {runs[way]['errored']} errored (Ray stopped from "
                    "outside?)",
                    flush=True,
                )
            print(f"=== {way}: {runs[way]['wall_s']:.1f} s wall ===", flush=True)
        metrics = {
            w: _sweeps.eval_metrics(r["tracking_uri"], r["experiment"]) for w, r in runs.items()
        }
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)

    stats = {w: trial_seconds(r, metrics[w]) for w, r in runs.items()}
    diff = compare_metrics(metrics["planned"], metrics["naive"])
    p, n = stats["planned"], stats["naive"]
    ratio = n["trial_seconds"] / p["trial_seconds"]
    result = {
        "benchmark": "sweep_savings",
        **_common.environment(),
        "ray": _sweeps.ray_version(),
        "mlflow": _mlflow_version(),
        "pytorch_lightning": _pl_version(),
        "settings": {
            "sweep_file": args.sweep,
            "schedules": _csv(args.schedules),
            "variances": _csv(args.variances),
            "guidance": _csv(args.guidance, _number),
            "sample_steps": _csv(args.sample_steps, int),
            "max_steps": args.max_steps,
            "val_every_n_steps": args.val_every or args.max_steps,
            "eval_num_samples": args.eval_samples,
            "max_concurrent_trials": args.concurrency,
            "cpus_per_trial": planned.tune.cpus_per_trial,
            "overrides": args.override,
            "seed_init": args.seed_init,
            "order": order,
            "seeds": {
                "train.seed": planned.sweep.base.train.seed,
                "sample.seed": planned.sweep.base.sample.seed,
            },
            "trial_seconds": "sum over trials of train_and_evaluate's wall time (a fresh "
            "worker's imports happen before, when it unpacks the trial's context; Tune's "
            "time_total_s counts them: see naive_over_planned_time_total_s)",
            "wall_seconds": "the run_sweep call (MLflow parent run + Tune fit); Ray started "
            "once before both",
        },
        "plan": plans,
        "ray_start": ray_start,
        "naive_over_planned_trial_seconds": ratio,
        "naive_over_planned_trial_seconds_goal": GOAL,
        "naive_over_planned_wall_seconds": n["wall_s"] / p["wall_s"],
        "naive_over_planned_time_total_s": n["tune_time_total_s"] / p["tune_time_total_s"],
        "naive_over_planned_trainings": n["trials"] / p["trials"],
        "max_metric_difference": diff["max"]["value"],
        "max_metric_difference_detail": diff,
        "ways": stats,
        "trials": {
            w: [
                {k: t[k] for k in ("params", "pid", "time_total_s", "compute_s", "phases_s")}
                for t in r["trials"]
            ]
            for w, r in runs.items()
        },
        "elapsed_s": time.perf_counter() - t_start,
    }

    print(f"\n{result['device']}, torch {torch.__version__}, ray {result['ray']}")
    _common.print_table(
        [
            "way",
            "trials",
            "eval cells",
            "trial s",
            "imports s",
            "fit s",
            "evaluate s",
            "mlflow s",
            "wall s",
        ],
        [
            [
                w,
                s["trials"],
                s["eval_cells"],
                s["trial_seconds"],
                s["imports_s"],
                s["phases_s"]["fit"] + s["phases_s"]["build"],
                s["phases_s"]["evaluate"],
                s["phases_s"]["mlflow"],
                s["wall_s"],
            ]
            for w, s in stats.items()
        ],
    )
    worst = diff["max"]
    verdict = "ok" if ratio >= GOAL else "BELOW GOAL"
    print(
        f"naive_over_planned_trial_seconds = {ratio:.2f} (goal >= {GOAL}: {verdict}); "
        f"wall {result['naive_over_planned_wall_seconds']:.2f}; trainings "
        f"{n['trials']} vs {p['trials']}"
    )
    print(
        f"max_metric_difference = {worst['value']:.3g} ({worst['metric']} at {worst['cell']}; "
        f"{diff['values_identical']}/{diff['values_compared']} values identical over "
        f"{diff['cells_compared']} cells)"
    )
    if n["errored"] or p["errored"]:
        print(f"WARNING: errored trials: planned {p['errored']}, naive {n['errored']}")
    _common.write_json(args.out, result)


def _mlflow_version() -> str:
    import mlflow

    return mlflow.__version__


def _pl_version() -> str:
    import pytorch_lightning

    return pytorch_lightning.__version__


if __name__ == "__main__":
    main()
