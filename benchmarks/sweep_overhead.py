"""Where a sweep's wall time goes beyond its trials' compute: Ray, Tune, process starts, imports.

16 short trials (a grid over ``train.seed`` on the 2-D ``mixture_quick`` base: a few dozen
training steps, one small evaluation cell each) through the product's ``run_sweep`` on a new
local Ray instance, ``max_concurrent_trials=2``, ``cpus_per_trial=1``. The trainable is the
product's ``train_and_evaluate`` wrapped by ``_sweeps.timed_trainable``, which times from inside
the worker: the imports (torch, Lightning, MLflow, the product), building the experiment, the
Lightning fit, the checkpoints, the evaluation, MLflow calls (the product's own per-trial report,
``time/<phase>_s``).

Key: ``wall_over_ideal`` = (Ray start-up + ``run_sweep`` wall time) / (sum of the trials' compute
÷ parallel slots), goal <= 1.2, where a trial's compute is ``train_and_evaluate`` without the
imports (what Tune's ``time_total_s`` counts for the product's trainable). Also reported: Ray
start-up (``ray.init`` and a first task's round trip), the imports in a fresh process (measured
in a subprocess before Ray starts, and inside every trial), each trial's start cost (the gap
between a trial returning and the next trial's first line in that slot: Tune's bookkeeping,
stopping the actor, a new worker process, creating the actor) and each phase's share.

``--variants`` runs the sweep again with changes (joined by ``+``), in the same run, on the same
Ray instance: ``reuse_actors`` / ``no_reuse_actors`` (``TuneConfig(reuse_actors=...)`` whatever
the product sets (it reuses); Ray 2.60 supports reuse for function trainables through
``FunctionTrainable.reset_config``: the next trial runs in the finished trial's worker process,
with no new process and no re-imports) and ``seed_init`` (seed before the network is built; the
product does that now). ``default`` is the product as it stands. ``max_result_difference``
compares the trials' final validation loss between variants.

A Ray instance stopped from outside (``ray stop`` kills every Ray process on the machine) ends
the run; the variants finished by then are still written, with the error.

    .venv/bin/python benchmarks/sweep_overhead.py --out /tmp/bench_sweep_overhead.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common
import _sweeps
import torch
from omegaconf import OmegaConf

from orchestrator.plan import build_plan

GOAL = 1.2
# A variant is "default" or a "+"-joined list of these changes.
CHANGES = {
    # Tune runs the next trial in the finished trial's actor (its worker process) when the
    # resources match: Ray 2.60 supports it for function trainables (reset_config). Without it
    # every trial is a new worker process that imports torch, Lightning and MLflow again.
    "reuse_actors": {"overrides": ["tune.reuse_actors=true"]},
    "no_reuse_actors": {"overrides": ["tune.reuse_actors=false"]},
    # pl.seed_everything(train.seed) before the trial builds its network (see the README).
    "seed_init": {"seed_first": True},
}


def variant_kwargs(variant: str) -> dict:
    if variant == "default":
        return {}
    out: dict = {}
    for change in variant.split("+"):
        if change not in CHANGES:
            raise SystemExit(f"--variants: unknown change {change!r}; expected {list(CHANGES)}")
        for k, v in CHANGES[change].items():
            if isinstance(v, dict):
                out[k] = (out.get(k) or {}) | v
            elif isinstance(v, list):
                out[k] = (out.get(k) or []) + v
            else:
                out[k] = v
    return out


IMPORTS = ("torch", "pytorch_lightning", "mlflow", "ray.tune", "orchestrator.trial")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="JSON file for the figures")
    p.add_argument(
        "--sweep",
        default=str(_common.REPO_ROOT / "sweeps" / "mixture_quick.yaml"),
        help="sweep file whose base config is used (its search is replaced)",
    )
    p.add_argument("--trials", type=int, default=16)
    p.add_argument(
        "--axis",
        choices=["train.seed", "train.lr"],
        default="train.seed",
        help="the grid axis: seeds 0..N-1, or N learning rates from 1e-3 to 1e-2",
    )
    p.add_argument("--max-steps", type=int, default=30, help="base.train.max_steps")
    p.add_argument("--eval-samples", type=int, default=100, help="base.eval.num_samples")
    p.add_argument("--sample-steps", type=int, default=10, help="the one evaluated cell's steps")
    p.add_argument("--concurrency", type=int, default=2, help="tune.max_concurrent_trials")
    p.add_argument("--cpus-per-trial", type=float, default=1.0, help="tune.cpus_per_trial")
    p.add_argument(
        "--variants",
        nargs="+",
        default=["default", "no_reuse_actors"],
        help="sweeps to run, in this order (the first is the one `wall_over_ideal` reports): "
        f"'default' or changes joined by '+', from {list(CHANGES)}",
    )
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads in the driver")
    p.add_argument("--quiet", action="store_true", help="ray.init(log_to_driver=False)")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (MLflow DBs, Tune)")
    return p.parse_args()


def fresh_import_times() -> dict:
    """Cumulative import time of each module in a new Python process, one after another."""
    code = (
        "import json, time, importlib\n"
        "out = {}\n"
        "t0 = time.perf_counter()\n"
        f"for name in {list(IMPORTS)!r}:\n"
        "    importlib.import_module(name)\n"
        "    out[name] = time.perf_counter() - t0\n"
        "print(json.dumps(out))\n"
    )
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=_common.REPO_ROOT,
        env={"OMP_NUM_THREADS": "1", **_env()},
    )
    cumulative = json.loads(proc.stdout.strip().splitlines()[-1])
    incremental, last = {}, 0.0
    for name in IMPORTS:
        incremental[name] = cumulative[name] - last
        last = cumulative[name]
    return {
        "process_s": time.perf_counter() - start,
        "imports_s": last,
        "incremental_s": incremental,
    }


def _env() -> dict:
    return dict(os.environ)


def build_sweep(args, workdir: Path, name: str, extra: list[str] = ()):
    raw = OmegaConf.load(args.sweep)
    if args.axis == "train.seed":
        values = list(range(args.trials))
    else:
        values = [
            float(f"{1e-3 * 10 ** (i / max(1, args.trials - 1)):.3g}") for i in range(args.trials)
        ]
    raw.search = {args.axis: values}
    warmup = OmegaConf.select(raw, "base.train.warmup_steps", default=100)
    path = workdir / "sweep_overhead.yaml"
    OmegaConf.save(raw, path)
    overrides = [
        f"base.train.max_steps={args.max_steps}",
        f"base.train.val_every_n_steps={args.max_steps}",
        f"base.train.warmup_steps={min(args.max_steps // 3, warmup)}",
        f"base.eval.num_samples={args.eval_samples}",
        "base.sample.guidance=[1.0]",
        "base.sample.variance=[fixed_small]",
        f"base.sample.steps=[{args.sample_steps}]",
        f"tune.max_concurrent_trials={args.concurrency}",
        f"tune.cpus_per_trial={args.cpus_per_trial}",
        "tune.search_alg=grid",
        "tune.scheduler=fifo",
        "tune.num_samples=1",
        *extra,
    ]
    return build_plan(path, overrides, name)


def analyse(run: dict, slots: int, ray_init_s: float) -> dict:
    trials = run["trials"]
    compute = sum(t["compute_s"] for t in trials)
    ideal = compute / slots
    imports = [t["phases_s"]["imports"] for t in trials]
    fresh = [t["phases_s"]["imports"] for t in trials if t["fresh_process"]]
    gaps = _sweeps.slot_gaps(trials, slots, run["t_start"], run["t_end"])
    phases = {p: sum(t["phases_s"][p] for t in trials) for p in _sweeps.PHASES}
    tune_total = [t["time_total_s"] for t in trials if t["time_total_s"] is not None]
    first_wave = statistics.mean(gaps["first_wave_start_s"]) if trials else 0.0
    # The wall time, slot by slot: start-up of the first wave, then per slot its trials'
    # imports + compute and the gaps between them, then the tail after the last return.
    budget = {
        "ray_start_s": ray_init_s,
        "first_trial_start_s": first_wave,
        "imports_per_slot_s": sum(imports) / slots,
        "trial_start_gaps_per_slot_s": sum(gaps["slot_gap_s"]) / slots,
        "compute_per_slot_s": ideal,
        "tail_s": gaps["tail_s"],
    }
    total = ray_init_s + run["wall_s"]
    budget["unaccounted_s"] = total - sum(budget.values())
    # Fixed start-up, paid once per sweep whatever its length: Ray, the first trials' start and
    # their imports. What remains over the ideal is the per-trial overhead.
    first = sorted(trials, key=lambda t: t["t_first"])[:slots]
    startup = ray_init_s + first_wave + statistics.mean(t["phases_s"]["imports"] for t in first)
    return {
        "trials": len(trials),
        "errored": run["errored"],
        "slots": slots,
        "wall_s": run["wall_s"],
        "wall_with_ray_start_s": total,
        "ideal_s": ideal,
        "wall_over_ideal": total / ideal,
        "wall_over_ideal_without_ray_start": run["wall_s"] / ideal,
        "startup_s": startup,
        "wall_over_ideal_after_startup": (total - startup) / ideal,
        "wall_over_ideal_tune_time": total / (sum(tune_total) / slots) if tune_total else None,
        "compute_s": compute,
        "compute_per_trial_s": compute / len(trials),
        "tune_time_total_s": sum(tune_total),
        "processes": len({t["pid"] for t in trials}),
        "imports_s": sum(imports),
        "imports_fresh_process_median_s": statistics.median(fresh) if fresh else 0.0,
        "fresh_process_trials": len(fresh),
        "trial_start_gap_median_s": statistics.median(gaps["slot_gap_s"])
        if gaps["slot_gap_s"]
        else None,
        "trial_start_gaps_s": gaps["slot_gap_s"],
        "first_wave_start_s": gaps["first_wave_start_s"],
        "tail_s": gaps["tail_s"],
        "phases_s": phases,
        "phase_share_of_trial": {p: v / (compute + sum(imports)) for p, v in phases.items()},
        "wall_budget_s": budget,
        "final_val_loss": {
            json.dumps(t["params"], sort_keys=True): t["final_metrics"].get("val/loss_simple")
            for t in trials
        },
    }


def result_differences(stats: dict) -> dict:
    """Per pair of variants: the largest |Δ final val/loss_simple| over the same trials."""
    out = {}
    names = list(stats)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            va, vb = stats[a]["final_val_loss"], stats[b]["final_val_loss"]
            diffs = [abs(va[k] - vb[k]) for k in va if k in vb and None not in (va[k], vb[k])]
            out[f"{a} vs {b}"] = max(diffs) if diffs else None
    return out


def conclusions(stats: dict, fresh: dict, ray_start: dict) -> dict:
    base = stats[next(iter(stats))]
    b = base["wall_budget_s"]
    overhead = {k: v for k, v in b.items() if k != "compute_per_slot_s"}
    dominant = max(overhead, key=lambda k: overhead[k] or 0.0)
    mlflow_share = base["phases_s"]["mlflow"] / base["compute_s"]
    text = {
        "dominant_overhead": dominant,
        "dominant_overhead_s": overhead[dominant],
        "overhead_s": {k: v for k, v in overhead.items()},
        "mlflow_share_of_compute": mlflow_share,
        "notes": [
            f"{base['trials']} trials ran in {base['processes']} worker process(es); a fresh "
            f"process spends {base['imports_fresh_process_median_s']:.1f} s (median inside the "
            f"sweep; {fresh['imports_s']:.1f} s in an idle process) importing torch, Lightning, "
            f"MLflow and the product before its trial starts, and {base['imports_s']:.0f} s in "
            f"all; {base['trial_start_gap_median_s'] or 0:.2f} s median between one trial "
            f"returning and the next starting in its slot.",
            f"Ray start-up: ray.init {ray_start['ray_init_s']:.1f} s, first task "
            f"{ray_start['first_task_s']:.1f} s.",
            f"MLflow calls are {100 * mlflow_share:.0f}% of the trials' compute.",
        ],
    }
    for name, r in list(stats.items())[1:]:
        text["notes"].append(
            f"{name}: {r['processes']} worker processes (vs {base['processes']}), imports "
            f"{r['imports_s']:.0f} s (vs {base['imports_s']:.0f} s) in total, compute "
            f"{r['compute_per_trial_s']:.2f} s per trial (vs {base['compute_per_trial_s']:.2f}), "
            f"MLflow {r['phases_s']['mlflow']:.0f} s (vs {base['phases_s']['mlflow']:.0f} s), "
            f"wall {r['wall_with_ray_start_s']:.0f} s (vs {base['wall_with_ray_start_s']:.0f} s, "
            f"{base['wall_with_ray_start_s'] / r['wall_with_ray_start_s']:.2f}x faster), "
            f"wall_over_ideal {r['wall_over_ideal']:.2f} (vs {base['wall_over_ideal']:.2f})."
        )
        text.setdefault("speedup_vs_first", {})[name] = (
            base["wall_with_ray_start_s"] / r["wall_with_ray_start_s"]
        )
    return text


def main() -> None:
    args = parse_args()
    for variant in args.variants:
        variant_kwargs(variant)  # unknown names fail here, before anything runs
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    print("imports in a fresh process ...", flush=True)
    fresh = fresh_import_times()
    tmp = Path(tempfile.mkdtemp(prefix="bench-sweep-overhead-"))
    import ray

    runs: dict = {}
    failed: dict[str, str] = {}
    try:
        kwargs = {v: variant_kwargs(v) for v in args.variants}
        sweeps = {
            v: build_sweep(
                args, tmp, f"overhead-{v.replace('+', '-')}", kwargs[v].pop("overrides", [])
            )
            for v in args.variants
        }
        ray_start = _sweeps.start_ray(log_to_driver=not args.quiet)
        slots = int(min(args.concurrency, ray_start["cluster_cpus"] // args.cpus_per_trial))
        for variant in args.variants:
            print(f"\n=== {variant}: {args.trials} trials ===", flush=True)
            load = os.getloadavg()[0]
            try:
                runs[variant] = _sweeps.run_timed_sweep(
                    sweeps[variant], tmp / variant.replace("+", "-"), **kwargs[variant]
                )
            except Exception as err:  # e.g. Ray stopped from outside: keep what finished
                failed[variant] = repr(err)
                print(f"=== {variant}: FAILED: {err!r} ===", flush=True)
                break
            runs[variant]["load_average_1min"] = [load, os.getloadavg()[0]]
            if runs[variant]["num_trials"] != len(runs[variant]["trials"]):
                failed[variant] = (
                    f"{len(runs[variant]['trials'])} of {runs[variant]['num_trials']} trials "
                    "wrote timings (errored trials, or Ray stopped from outside)"
                )
                print(f"WARNING: {variant}: {failed[variant]}", flush=True)
            print(f"=== {variant}: {runs[variant]['wall_s']:.1f} s wall ===", flush=True)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)

    if not runs:
        raise SystemExit(f"no variant finished: {failed}")
    stats = {v: analyse(r, slots, ray_start["ray_init_s"]) for v, r in runs.items()}
    for v, r in runs.items():
        stats[v]["load_average_1min"] = r["load_average_1min"]
    first = stats[args.variants[0]]
    result = {
        "benchmark": "sweep_overhead",
        **_common.environment(),
        "ray": _sweeps.ray_version(),
        "settings": {
            "sweep_file": args.sweep,
            "trials": args.trials,
            "axis": args.axis,
            "max_steps": args.max_steps,
            "eval_num_samples": args.eval_samples,
            "sample_steps": args.sample_steps,
            "max_concurrent_trials": args.concurrency,
            "cpus_per_trial": args.cpus_per_trial,
            "slots": slots,
            "variants": args.variants,
            "compute": "train_and_evaluate in the worker, imports excluded (what Tune's "
            "time_total_s counts for the product's trainable)",
            "wall": "Ray start-up (ray.init, once, shared by the variants) + the run_sweep call",
        },
        "wall_over_ideal": first["wall_over_ideal"],
        "wall_over_ideal_goal": GOAL,
        "wall_over_ideal_variant": args.variants[0],
        "wall_over_ideal_after_startup": first["wall_over_ideal_after_startup"],
        "wall_over_ideal_by_variant": {v: s["wall_over_ideal"] for v, s in stats.items()},
        "wall_over_ideal_after_startup_by_variant": {
            v: s["wall_over_ideal_after_startup"] for v, s in stats.items()
        },
        "wall_s_by_variant": {v: s["wall_with_ray_start_s"] for v, s in stats.items()},
        "ray_start": ray_start,
        "fresh_process_imports": fresh,
        "variants": stats,
        "max_result_difference": result_differences(stats),
        "failed": failed,
        "conclusions": conclusions(stats, fresh, ray_start),
        "trials": {
            v: [
                {k: t[k] for k in ("params", "pid", "fresh_process", "time_total_s", "compute_s")}
                | {"phases_s": t["phases_s"]}
                for t in r["trials"]
            ]
            for v, r in runs.items()
        },
        "elapsed_s": time.perf_counter() - t_start,
    }

    print(f"\n{result['device']}, torch {torch.__version__}, ray {result['ray']}, {slots} slots")
    print(
        f"Ray start-up: ray.init {ray_start['ray_init_s']:.2f} s, first task "
        f"{ray_start['first_task_s']:.2f} s; imports in a fresh process "
        f"{fresh['imports_s']:.2f} s ("
        + ", ".join(f"{k} {v:.2f}" for k, v in fresh["incremental_s"].items())
        + ")"
    )
    _common.print_table(
        [
            "variant",
            "trials",
            "procs",
            "wall s",
            "ideal s",
            "wall/ideal",
            "after start-up",
            "imports s",
            "start gap s",
            "compute/trial s",
            "mlflow s",
        ],
        [
            [
                v,
                s["trials"],
                s["processes"],
                s["wall_with_ray_start_s"],
                s["ideal_s"],
                s["wall_over_ideal"],
                s["wall_over_ideal_after_startup"],
                s["imports_s"],
                s["trial_start_gap_median_s"],
                s["compute_per_trial_s"],
                s["phases_s"]["mlflow"],
            ]
            for v, s in stats.items()
        ],
    )
    print("\nwall-time budget (s):")
    _common.print_table(
        ["variant", *first["wall_budget_s"]],
        [[v, *s["wall_budget_s"].values()] for v, s in stats.items()],
    )
    print("\nper-trial phases, % of (imports + compute):")
    _common.print_table(
        ["variant", *_sweeps.PHASES],
        [
            [v, *(f"{100 * x:.0f}%" for x in s["phase_share_of_trial"].values())]
            for v, s in stats.items()
        ],
    )
    verdict = "ok" if first["wall_over_ideal"] <= GOAL else "ABOVE GOAL"
    print(
        f"\nwall_over_ideal = {first['wall_over_ideal']:.2f} ({args.variants[0]}; goal <= "
        f"{GOAL}: {verdict}); without Ray start-up {first['wall_over_ideal_without_ray_start']:.2f}"
        f"; after the fixed start-up ({first['startup_s']:.1f} s: Ray, first trials' start and "
        f"imports) {first['wall_over_ideal_after_startup']:.2f}"
    )
    for note in result["conclusions"]["notes"]:
        print(f"- {note}")
    for pair, d in result["max_result_difference"].items():
        if d is not None:
            print(f"- max |Δ final val/loss_simple| {pair}: {d:.3g}")
    if any(s["errored"] for s in stats.values()):
        print("WARNING: errored trials: " + str({v: s["errored"] for v, s in stats.items()}))
    _common.write_json(args.out, result)


if __name__ == "__main__":
    main()
