"""Where a trial's sampling cells are evaluated: inside the trial, or as separate Ray tasks.

The sweep evaluates every sampling configuration (variance x guidance x steps) from each trial's
checkpoint. The product does it inside the trial, after training (``orchestrator.trial.
evaluate_cells``): in the trial's process, reusing the trained module, its datamodule and one
evaluation context. The alternative is one Ray task per cell (fractional GPUs on a GPU machine),
each loading the checkpoint. This script measures both on the same trained model:

1. Train once, in this process: the ``quickstart`` base (digits, ``digits`` U-Net; or
   ``--data gaussian_mixture``: the ``mixture_quick`` base) at reduced size (``--max-steps``,
   ``--eval-samples``), through ``lightning_modules.train.fit``; keep its ``last.ckpt``.
2. Inside: what ``evaluate_cells`` does for one scalar sampling combination: ``prepare_context``
   once, then ONE ``evaluate_module`` call with the lists of variances, guidance weights and
   steps (K cells), on the module ``fit`` returned. Per cell: its sampling time (the module's
   ``sample`` is wrapped to run one guidance weight at a time: the same samples, timed per
   weight; a guided weight, w not in {0, 1}, costs two forwards per step), its metrics time
   (``_measure``, timed) and an equal share of the rest (PNGs); ``per_cell_compute_s`` is their
   median. The inside wall time is ``prepare_context`` + the ``evaluate_module`` call, in one
   process on one core (the trial's slot).
3. Separate tasks: the same K cells as K Ray tasks (``num_cpus=1``; with CUDA also
   ``num_gpus=--gpu-fraction``, default 1/K) on a new local Ray with ``--slots`` CPUs (started
   after step 2, so its daemons do not load the inside measurement; its start-up is reported, not
   counted: a sweep has Ray running already). Each task does what a separate evaluation task
   must: import torch and the product, ``DiffusionModule.from_checkpoint`` (as ``ddpm-sweep
   sample`` loads a checkpoint), ``build_datamodule`` + ``prepare_context`` (the cached eval
   classifier is loaded from disk), ``evaluate_module`` for its one cell. Variant ``fresh``:
   ``max_calls=1``, every task in a new worker process, as a real separate task pays; variant
   ``reused`` (``--no-reused`` skips it): Ray's default worker reuse, so only the first task of
   each worker imports torch. Per task: ``start`` (its slot's idle time before the task's first
   line: the first ``slots`` tasks from the submission, later ones from the return that freed
   their slot: scheduling, a new worker process, Ray's worker init, fetching the function),
   ``imports``, ``load_checkpoint``, ``prepare`` (datamodule + context), ``evaluate`` (sampling +
   metrics + PNG), ``total``; and the wall time of all K tasks, submission to last result.
4. The metrics of every cell are compared between the placements (same seeds; the checkpoint
   holds the EMA weights the trained module has after ``fit``): ``max_metric_difference``.

Keys: ``separate_over_inside_wall`` (fresh tasks' wall time / inside wall time),
``separate_over_inside_slot_seconds`` (sum of the tasks' totals / inside wall time: the slot time
the tasks hold, what they take from other trials when the sweep's trials fill every slot),
``per_task_overhead_s`` (median over fresh tasks of total - evaluate), ``per_cell_compute_s``
(median inside), ``break_even_overhead_s`` (= per_cell_compute_s x (slots - 1): the per-task
overhead below which K tasks on ``slots`` idle slots would beat one slot inside) and
``decision``: ``inside`` unless the tasks are faster in wall time AND cost at most 10% more slot
time (only then would taking extra slots from the sweep pay). Also reported:
``separate_over_inside_wall_reused``, ``per_task_overhead_reused_s`` and, per variant,
``task_evaluate_over_inside_compute`` (median over cells of a task's ``evaluate`` / the same
cell's compute inside: how much slower sampling ran with ``slots`` tasks sharing the machine,
which the overhead does not count but the wall time does). On a GPU both placements sample on
the GPU (Lightning's teardown leaves the fitted module on the CPU; the product's
``evaluate_cell`` moves it back to the GPU, ``lightning_modules.evaluate.sampling_device``).

A Ray instance stopped from outside (``ray stop`` kills every Ray process on the machine) fails
the variant running on it; it is rerun on a new local Ray (``--retries``, default 2), and the
errors are kept under ``ray_failures``.

    .venv/bin/python benchmarks/studies/sampling_placement.py --out /tmp/bench_placement.json
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

# A decision study, apart from the benchmarks that guard goals; it shares their helpers, which
# live one folder up: on this process's path, and on the path of the Ray workers it starts.
_BENCHMARKS = str(Path(__file__).resolve().parents[1])
sys.path.insert(0, _BENCHMARKS)
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (_BENCHMARKS, os.environ.get("PYTHONPATH")) if p
)

import _common
import _sweeps
import torch
from omegaconf import OmegaConf

from lightning_modules.config import load_config
from lightning_modules.evaluate import evaluate_module, prepare_context
from lightning_modules.train import fit

SWEEP_FILES = {"digits": "quickstart.yaml", "gaussian_mixture": "mixture_quick.yaml"}
DEFAULT_EVAL_SAMPLES = {"digits": 100}  # quickstart: 200; the mixture keeps its file's 400
SLOT_TIME_TOLERANCE = 1.10  # tasks may hold at most 10% more slot time than inside to be chosen
TASK_PHASES = ("start", "imports", "load_checkpoint", "prepare", "evaluate")
NON_METRICS = ("guidance", "sample_seconds")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="JSON file for the figures")
    p.add_argument("--data", choices=list(SWEEP_FILES), default="digits")
    p.add_argument("--max-steps", type=int, default=150, help="training steps (quickstart: 400)")
    p.add_argument(
        "--eval-samples",
        type=int,
        help="eval.num_samples per cell (default: digits 100, the quickstart's 200 halved; the "
        "mixture's file value)",
    )
    p.add_argument("--variance", nargs="+", default=["fixed_small", "fixed_large"])
    p.add_argument("--guidance", type=float, nargs="+", default=[0.0, 1.0, 2.0, 4.0])
    p.add_argument(
        "--steps", type=int, nargs="+", help="sampling steps (default: the sweep file's)"
    )
    p.add_argument("--slots", type=int, default=2, help="ray.init(num_cpus=...): parallel tasks")
    p.add_argument(
        "--gpu-fraction",
        type=float,
        help="num_gpus per task when CUDA is available (default 1/K); ignored without CUDA",
    )
    p.add_argument("--no-reused", action="store_true", help="skip the reused-workers variant")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (all processes)")
    p.add_argument("--quiet", action="store_true", help="ray.init(log_to_driver=False)")
    p.add_argument(
        "--retries",
        type=int,
        default=2,
        help="reruns of a variant whose Ray died (`ray stop` elsewhere kills every local Ray)",
    )
    p.add_argument("--keep", action="store_true", help="keep the temp dir (checkpoint, PNGs)")
    return p.parse_args()


def build_config(args):
    sweep = OmegaConf.load(_common.REPO_ROOT / "sweeps" / SWEEP_FILES[args.data])
    raw = sweep.base
    steps = args.steps or list(
        OmegaConf.select(raw, "sample.steps", default=None)
        or sweep.get("search", {}).get("sample.steps")
        or [50]
    )
    eval_samples = args.eval_samples or DEFAULT_EVAL_SAMPLES.get(args.data)
    warmup = OmegaConf.select(raw, "train.warmup_steps", default=100)
    overrides = [
        f"train.max_steps={args.max_steps}",
        f"train.val_every_n_steps={args.max_steps}",
        f"train.warmup_steps={min(warmup, max(1, args.max_steps // 3))}",
        "sample.variance=[" + ",".join(args.variance) + "]",
        "sample.guidance=[" + ",".join(str(w) for w in args.guidance) + "]",
        "sample.steps=[" + ",".join(str(s) for s in steps) + "]",
    ]
    if eval_samples:
        overrides.append(f"eval.num_samples={eval_samples}")
    return load_config(raw, overrides, where=SWEEP_FILES[args.data])


def cell_key(row) -> tuple:
    return (row.spec.variance, float(row.spec.guidance), int(row.spec.steps))


def metrics_of(row) -> dict[str, float]:
    return {k: v for k, v in row.metrics.items() if k not in NON_METRICS}


# -- inside the trial -----------------------------------------------------------------------------
def evaluate_inside(result, cfg, out_dir: Path, device: str) -> dict:
    """`evaluate_cells` for one scalar combination, minus MLflow: one context, one call.

    Timing per cell: each cell is sampled on its own (`evaluate_cell`), and its result carries
    its sampling and metric seconds. Rows come in call order."""
    module = result.module.to(device)  # evaluate_cell also moves it (sampling_device)
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    eval_ctx = prepare_context(result.datamodule, cfg.eval, device=device)
    prepare_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    rows = evaluate_module(
        module, result.datamodule, cfg.sample, cfg.eval, out_dir, context=eval_ctx
    )
    evaluate_s = time.perf_counter() - t1
    sample_s = [row.sample_seconds for row in rows]
    measure_s = [row.measure_seconds for row in rows]
    k = len(rows)
    rest = (evaluate_s - sum(sample_s) - sum(measure_s)) / k  # PNGs, labels: shared equally
    cells = [
        {
            "cell": list(cell_key(row)),
            "sample_s": sample_s[i],
            "metrics_s": measure_s[i],
            "compute_s": sample_s[i] + measure_s[i] + rest,
            "metrics": metrics_of(row),
        }
        for i, row in enumerate(rows)
    ]
    return {
        "prepare_context_s": prepare_s,
        "evaluate_s": evaluate_s,
        "wall_s": prepare_s + evaluate_s,
        "cells": cells,
        "load_average_1min": [load, os.getloadavg()[0]],
    }


# -- separate tasks -------------------------------------------------------------------------------
def _process_started_at() -> float | None:
    """This process's start, as a Unix time (Linux /proc), or None."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(
            int(line.split()[1])
            for line in Path("/proc/stat").read_text().splitlines()
            if line.startswith("btime")
        )
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def evaluate_one_cell(
    checkpoint: str, cell: tuple, device: str, out_dir: str, threads: int
) -> dict:
    """One separate evaluation task. Imports inside, so they are timed here (this function is
    pickled by value: nothing heavy comes with it)."""
    t_entry = time.time()
    created = _process_started_at()
    fresh_process = "torch" not in sys.modules
    t0 = time.perf_counter()
    import torch
    from omegaconf import OmegaConf

    from lightning_modules.data import build_datamodule
    from lightning_modules.evaluate import evaluate_module, prepare_context
    from lightning_modules.module import DiffusionModule

    torch.set_num_threads(threads)
    t1 = time.perf_counter()
    module = DiffusionModule.from_checkpoint(checkpoint, map_location=device).to(device)
    t2 = time.perf_counter()
    cfg = module.cfg
    datamodule = build_datamodule(cfg.data)
    ctx = prepare_context(datamodule, cfg.eval, device=device)
    t3 = time.perf_counter()
    variance, guidance, steps = cell
    sample_cfg = OmegaConf.merge(
        cfg.sample, {"variance": [variance], "guidance": [guidance], "steps": [steps]}
    )
    rows = evaluate_module(module, datamodule, sample_cfg, cfg.eval, out_dir, context=ctx)
    t4 = time.perf_counter()
    (row,) = rows
    return {
        "cell": list(cell_key(row)),
        "pid": os.getpid(),
        "fresh_process": fresh_process,
        "t_entry": t_entry,
        "t_return": time.time(),
        "process_age_at_entry_s": None if created is None else t_entry - created,
        "phases_s": {
            "imports": t1 - t0,
            "load_checkpoint": t2 - t1,
            "prepare": t3 - t2,
            "evaluate": t4 - t3,
        },
        "sample_s": row.sample_seconds,
        "metrics": metrics_of(row),
    }


def start_ray(slots: int, quiet: bool) -> dict:
    """A new local Ray in this process (never someone else's cluster: address="local")."""
    import ray

    started = _sweeps.start_ray(log_to_driver=not quiet, num_cpus=slots, include_dashboard=False)
    return started | {
        "cluster": {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")},
        "ray": ray.__version__,
    }


def run_tasks(
    checkpoint: Path,
    cells: list[tuple],
    out_dir: Path,
    *,
    fresh: bool,
    slots: int,
    num_gpus: float,
    device: str,
    threads: int,
) -> dict:
    import ray

    # max_calls=0 (no limit) explicitly: Ray's default for a task with GPUs is 1.
    remote = ray.remote(num_cpus=1, num_gpus=num_gpus, max_calls=1 if fresh else 0)(
        evaluate_one_cell
    )
    load = os.getloadavg()[0]
    t_submit = time.time()
    refs = [
        remote.remote(str(checkpoint), cell, device, str(out_dir / f"task{i}"), threads)
        for i, cell in enumerate(cells)
    ]
    tasks = ray.get(refs)
    t_end = time.time()
    # Slot idle time before each task's first line (FIFO, equal resources): the i-th task to
    # start (i >= slots) took the slot freed by the (i - slots)-th return.
    order = sorted(range(len(tasks)), key=lambda i: tasks[i]["t_entry"])
    returns = sorted(t["t_return"] for t in tasks)
    for n, i in enumerate(order):
        freed = t_submit if n < slots else returns[n - slots]
        tasks[i]["phases_s"] = {"start": max(0.0, tasks[i]["t_entry"] - freed)} | tasks[i][
            "phases_s"
        ]
        tasks[i]["total_s"] = sum(tasks[i]["phases_s"].values())
        tasks[i]["overhead_s"] = tasks[i]["total_s"] - tasks[i]["phases_s"]["evaluate"]
    ages = [t["process_age_at_entry_s"] for t in tasks if t["process_age_at_entry_s"] is not None]
    return {
        "fresh_worker_per_task": fresh,
        "wall_s": t_end - t_submit,
        "processes": len({t["pid"] for t in tasks}),
        "fresh_process_tasks": sum(t["fresh_process"] for t in tasks),
        "slot_seconds": sum(t["total_s"] for t in tasks),
        "median_s": {p: _common.median(t["phases_s"][p] for t in tasks) for p in TASK_PHASES}
        | {
            "total": _common.median(t["total_s"] for t in tasks),
            "overhead": _common.median(t["overhead_s"] for t in tasks),
        },
        "process_age_at_entry_median_s": _common.median(ages) if ages else None,
        "tail_s": t_end - returns[-1],
        "load_average_1min": [load, os.getloadavg()[0]],
        "tasks": [{k: v for k, v in t.items() if k not in ("t_entry", "t_return")} for t in tasks],
    }


def max_difference(inside: dict, tasks: list[dict]) -> float:
    ref = {tuple(c["cell"]): c["metrics"] for c in inside["cells"]}
    diffs = []
    for t in tasks:
        mine, theirs = t["metrics"], ref[tuple(t["cell"])]
        if set(mine) != set(theirs):
            raise RuntimeError(f"cell {t['cell']}: metrics {sorted(mine)} vs {sorted(theirs)}")
        diffs += [abs(mine[k] - theirs[k]) for k in mine]
    return max(diffs)


# -- the decision ---------------------------------------------------------------------------------
def evaluate_slowdown(inside: dict, tasks: list[dict]) -> float:
    """Median over cells of the task's evaluate time / the same cell's compute inside."""
    ref = {tuple(c["cell"]): c["compute_s"] for c in inside["cells"]}
    return _common.median(t["phases_s"]["evaluate"] / ref[tuple(t["cell"])] for t in tasks)


def decide(
    k: int, slots: int, inside: dict, fresh: dict, reused: dict | None, cuda: bool
) -> tuple[str, str, dict]:
    c = _common.median(cell["compute_s"] for cell in inside["cells"])
    o = fresh["median_s"]["overhead"]
    wall = fresh["wall_s"] / inside["wall_s"]
    slot_time = fresh["slot_seconds"] / inside["wall_s"]
    break_even = c * (slots - 1)
    figures = {
        "per_cell_compute_s": c,
        "per_task_overhead_s": o,
        "separate_over_inside_wall": wall,
        "separate_over_inside_slot_seconds": slot_time,
        "break_even_overhead_s": break_even,
    }
    choice = "separate" if wall < 1 and slot_time <= SLOT_TIME_TOLERANCE else "inside"
    m = fresh["median_s"]
    why = (
        f"{k} cells at {c:.2f} s compute each: inside the trial they take {inside['wall_s']:.1f} s "
        f"on the trial's one slot; as {k} fresh-process tasks on {slots} slots "
        f"{fresh['wall_s']:.1f} s ({wall:.2f}x) and {fresh['slot_seconds']:.1f} slot-seconds "
        f"({slot_time:.2f}x), because each task pays {o:.2f} s before and around its sampling "
        f"(start {m['start']:.2f}, imports {m['imports']:.2f}, checkpoint "
        f"{m['load_checkpoint']:.2f}, datamodule + context {m['prepare']:.2f}). "
        "Tasks can only win in wall time when slots are idle and the overhead is below "
        f"compute x (slots - 1) = {break_even:.2f} s"
    )
    if choice == "inside":
        if wall >= 1:
            why += "; here they lose even with idle slots."
        else:
            why += (
                f"; they win here only by taking {slots - 1} more slot(s) than the trial holds, "
                f"at {slot_time:.2f}x the slot time: in a sweep whose trials fill the slots "
                "(max_concurrent_trials = slots, as shipped) those slots belong to other trials."
            )
    else:
        why += "; here they do, at about the same slot time."
    if reused is not None:
        r_o = reused["median_s"]["overhead"]
        why += (
            f" With reused (warm) workers the median overhead is {r_o:.2f} s per task "
            f"({'below' if r_o < break_even else 'above'} break-even; wall "
            f"{reused['wall_s'] / inside['wall_s']:.2f}x, slot time "
            f"{reused['slot_seconds'] / inside['wall_s']:.2f}x inside, the first task of each "
            "worker still importing torch): warm workers could only gain where slots are idle, "
            "i.e. in a sweep's tail, and would keep a torch process per slot next to the trials."
        )
    why += (
        " On a GPU, fractional-GPU tasks could share one GPU, but the trial already holds its "
        "GPU (gpus_per_trial), idle while it evaluates: inside the trial it serves the "
        "evaluation with no new process, imports, checkpoint load or context and no extra GPU "
        "fraction to reserve."
    )
    if cuda:
        why += " (Measured with CUDA: see the figures.)"
    return choice, why, figures


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))  # Ray workers inherit it
    t_start = time.perf_counter()
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    cfg = build_config(args)
    tmp = Path(tempfile.mkdtemp(prefix="bench-sampling-placement-"))
    import ray

    try:
        print(
            f"training {args.max_steps} steps ({args.data}, {SWEEP_FILES[args.data]} base) ...",
            flush=True,
        )
        t0 = time.perf_counter()
        result = fit(cfg, tmp / "train", enable_progress_bar=False, enable_model_summary=False)
        fit_s = time.perf_counter() - t0
        checkpoint = result.checkpoint
        checkpoint_bytes = checkpoint.stat().st_size
        # The eval classifier is trained once per dataset and cached on disk (a sweep's first
        # trial does it); make sure it exists so that both placements load it.
        prepare_context(result.datamodule, cfg.eval)

        k = len(cfg.sample.variance) * len(cfg.sample.guidance) * len(cfg.sample.steps)
        print(f"inside: {k} cells in this process ...", flush=True)
        inside = evaluate_inside(result, cfg, tmp / "inside", device)
        cells = [tuple(c["cell"]) for c in inside["cells"]]

        num_gpus = (args.gpu_fraction or 1.0 / k) if cuda else 0.0
        variants, failed, ray_starts = {}, {}, []
        for name in ["fresh"] + ([] if args.no_reused else ["reused"]):
            for attempt in range(1 + args.retries):
                try:
                    if not ray.is_initialized():
                        print(f"starting a local Ray ({args.slots} CPUs) ...", flush=True)
                        ray_starts.append(start_ray(args.slots, args.quiet))
                    print(f"separate ({name}): {k} tasks on {args.slots} slots ...", flush=True)
                    variants[name] = run_tasks(
                        checkpoint,
                        cells,
                        tmp / name / str(attempt),
                        fresh=name == "fresh",
                        slots=args.slots,
                        num_gpus=num_gpus,
                        device=device,
                        threads=args.threads,
                    )
                    break
                except Exception as err:  # e.g. Ray stopped from outside: a new Ray, again
                    failed.setdefault(name, []).append(repr(err))
                    print(f"separate ({name}): FAILED: {err!r}", flush=True)
                    if ray.is_initialized():
                        ray.shutdown()
            if name not in variants:
                break
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)

    if "fresh" not in variants:
        _common.write_json(
            args.out,
            {"benchmark": "sampling_placement", **_common.environment(device), "failed": failed}
            | {"inside": inside, "ray_starts": ray_starts},
        )
        raise SystemExit(f"the separate tasks did not finish: {failed}")
    ray_start = ray_starts[0]
    differences = {n: max_difference(inside, v["tasks"]) for n, v in variants.items()}
    choice, why, figures = decide(
        k, args.slots, inside, variants["fresh"], variants.get("reused"), cuda
    )
    slowdown = {n: evaluate_slowdown(inside, v["tasks"]) for n, v in variants.items()}
    notes = []
    if not cuda:
        notes.append("CPU only: the fractional-GPU variant was not run (num_gpus=0).")
    if failed:
        notes.append(
            f"Ray died under a variant and it was rerun on a new local Ray: {failed} "
            "(another process ran `ray stop`?)."
        )
    if "reused" in variants:
        r = variants["reused"]
        notes.append(
            f"Reused workers ({r['processes']} processes for {k} tasks, "
            f"{r['fresh_process_tasks']} imported torch): wall {r['wall_s']:.1f} s "
            f"({r['wall_s'] / inside['wall_s']:.2f}x inside), median overhead "
            f"{r['median_s']['overhead']:.2f} s per task (checkpoint + context remain)."
        )
    result_json = {
        "benchmark": "sampling_placement",
        **_common.environment(device),
        "ray": ray_start["ray"],
        "settings": {
            "data": args.data,
            "sweep_file": SWEEP_FILES[args.data],
            "max_steps": args.max_steps,
            "eval_num_samples": int(cfg.eval.num_samples),
            "variance": list(cfg.sample.variance),
            "guidance": list(cfg.sample.guidance),
            "steps": list(cfg.sample.steps),
            "cells": k,
            "slots": args.slots,
            "gpu_fraction": num_gpus,
            "threads": args.threads,
        },
        **figures,
        "separate_over_inside_wall_reused": variants["reused"]["wall_s"] / inside["wall_s"]
        if "reused" in variants
        else None,
        "per_task_overhead_reused_s": variants["reused"]["median_s"]["overhead"]
        if "reused" in variants
        else None,
        "max_metric_difference": differences,
        "task_evaluate_over_inside_compute": slowdown,
        "decision": choice,
        "decision_reason": why,
        "notes": notes,
        "ray_failures": failed,  # per variant: errors of attempts whose Ray died (then rerun)
        "training": {"fit_s": fit_s, "checkpoint_bytes": checkpoint_bytes},
        "ray_start": ray_start,
        "ray_restarts": ray_starts[1:],
        "inside": inside,
        "separate": variants,
        "load_average_1min_end": os.getloadavg()[0],
        "elapsed_s": time.perf_counter() - t_start,
    }

    print(f"\n{result_json['device']}, torch {torch.__version__}, ray {ray_start['ray']}")
    print(
        f"trained {args.max_steps} steps in {fit_s:.1f} s; {k} cells "
        f"({int(cfg.eval.num_samples)} samples, steps {list(cfg.sample.steps)}); Ray start-up "
        f"{ray_start['ray_init_s']:.1f} s + first task {ray_start['first_task_s']:.1f} s "
        "(not counted)"
    )
    print("\nper cell / per task, median s:")
    _common.print_table(
        [
            "placement",
            "wall s",
            "slot-s",
            "procs",
            *TASK_PHASES,
            "overhead",
            "total",
            "eval/inside",
            "max |Δ|",
        ],
        [
            [
                "inside",
                inside["wall_s"],
                inside["wall_s"],
                1,
                0.0,
                0.0,
                0.0,
                inside["prepare_context_s"] / k,
                figures["per_cell_compute_s"],
                inside["prepare_context_s"] / k,
                figures["per_cell_compute_s"] + inside["prepare_context_s"] / k,
                1.0,
                0.0,
            ]
        ]
        + [
            [
                f"tasks ({n})",
                v["wall_s"],
                v["slot_seconds"],
                v["processes"],
                *(v["median_s"][p] for p in TASK_PHASES),
                v["median_s"]["overhead"],
                v["median_s"]["total"],
                slowdown[n],
                differences[n],
            ]
            for n, v in variants.items()
        ],
    )
    print("\nper cell, s (inside: compute; tasks: evaluate / total):")
    by_cell = {n: {tuple(t["cell"]): t for t in v["tasks"]} for n, v in variants.items()}
    _common.print_table(
        ["variance", "w", "steps", "inside", *(f"{n} eval / total" for n in variants)],
        [
            [
                *c["cell"],
                c["compute_s"],
                *(
                    f"{by_cell[n][tuple(c['cell'])]['phases_s']['evaluate']:.2f} / "
                    f"{by_cell[n][tuple(c['cell'])]['total_s']:.2f}"
                    for n in variants
                ),
            ]
            for c in inside["cells"]
        ],
    )
    print(
        f"\nseparate_over_inside_wall = {figures['separate_over_inside_wall']:.2f}, "
        f"separate_over_inside_slot_seconds = "
        f"{figures['separate_over_inside_slot_seconds']:.2f}, per_task_overhead_s = "
        f"{figures['per_task_overhead_s']:.2f}, per_cell_compute_s = "
        f"{figures['per_cell_compute_s']:.2f}, break_even_overhead_s = "
        f"{figures['break_even_overhead_s']:.2f}"
    )
    print(f"decision: {choice}: {why}")
    for note in notes:
        print(f"- {note}")
    _common.write_json(args.out, result_json)


if __name__ == "__main__":
    main()
