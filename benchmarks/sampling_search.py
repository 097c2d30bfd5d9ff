"""A dense grid over a sampling-time space against the per-checkpoint sampling search
(orchestrator/sample_search.py): the search's sampling seconds against the grid's (goal:
`grid_over_search_sampling_seconds` >= 3) and whether its best cell is as good as the grid's.

One checkpoint, trained in this process with `lightning_modules.train.fit` from a sweep written
into a temp folder: the quickstart's base (digits, `digits` U-Net, T = 1000, 400 steps, lr 2e-3,
warm-up 50, EMA 0.99, p_uncond 0.1; `--max-steps`), fixed_small, `eval.num_samples` 200
(`--num-samples`; the quickstart's 300 take ~13 minutes here, see below) and three searched
axes spanning the grid: `sample.guidance ~ uniform[0, 4]`, `sample.guidance_rescale ~
uniform[0, 1]`, `sample.steps ~ randint[5, 40]` (both bounds included, as a sweep file reads
it), with `sample_search: {algorithm: tpe, cells: 16, metric: fid, chunks: 4, pruner: paired}`.
Everything is evaluated in ONE `EvalContext` (`prepare_context`): every cell gets the same
labels and, at each sample count, the same bootstrap counts, and every batch of every cell
starts from the noise of (seed, batch), whatever its step count: any two cells are paired.

- **Grid**: w in {0, 1, 2, 3, 4} x rescale phi in {0, 0.5, 1} x steps in {5, 10, 20, 40} (60
  cells; `--grid-*`), each through `evaluate_chunked` with the search's chunks and a callback
  that records the partial FID and never stops: the cell a study would draw with that spec, to
  the end. At w = 0 and w = 1 the rescale does nothing (one forward pass, nothing to rescale), so
  the grid's phi > 0 cells there repeat the phi = 0 cell's samples; a grid draws them all the
  same, and they are counted (`grid_redundant_sampling_seconds`: what they cost).
- **Search**: per seed (`--seeds`, default 0-4) a `CellStudy` of the plan's study cell with
  `sample_search.seed` set to it, run as a trial runs it (ask, `CellStudy.evaluate`, tell) but
  without MLflow. A stopped cell's sampling counts up to where it stopped.
- **Order**: the grid's cells and the studies' cells are interleaved (studies round robin, grid
  cells spread evenly among them), so that a shared machine's load, which drifts over minutes,
  weighs on both sides alike. `grid_over_search_forwards` is the same ratio in network forwards
  of one example (samples x steps, x 2 for a guided step), which no load moves.

Keys: `grid_sampling_seconds`, `search_sampling_seconds` (per seed and mean),
`grid_over_search_sampling_seconds` (grid over the mean of the seeds; per seed too),
`grid_best` (w, phi, steps, FID and its 95 % interval), per seed the search's best and its
paired difference from the grid's best (search - grid, with the interval of the replicates'
differences); `within_grid_best_ci`: that interval holds 0 or lies below it (the search found a
cell at least as good), `search_best_within_grid_ci_count` over the seeds. `partial_ranking`:
over the grid's cells, the Spearman correlation of the partial FID after chunk j with the final
FID, the rank at chunk j of the final best cell (`final_best_in_top3`) and the share of the
final top 3 in the partial top 3; `partial_ranking_distinct` the same over the grid's distinct
cells (the repeated w = 0, 1 cells left out: their ties crowd the top 3). Sampling seconds are
the cells' own (`EvalResult.sample_seconds`, the metrics left out: the grid measures after every
chunk only to give `partial_ranking`); wall times and metric seconds are reported beside them.
Every cell's FID replicates are in the JSON, for paired comparisons after the fact.

About 9 minutes on this 2-core CPU at one thread with a load average of 4-5 from other work
(training 45 s, the grid 3.2 min, each seed's study about 1 min); at `--num-samples 300`
13 minutes. A quick smoke run (half a minute):

    .venv/bin/python benchmarks/sampling_search.py --out /tmp/bench_sampling_search.json
    .venv/bin/python benchmarks/sampling_search.py --max-steps 50 --num-samples 60 --cells 4 \\
        --seeds 0 --grid-guidance 0 2 --grid-rescale 0 --grid-steps 5 10 --out /tmp/smoke.json
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import tempfile
import time
from pathlib import Path

import _common
import numpy as np
import torch
import yaml
from omegaconf import OmegaConf

from lightning_modules.evaluate import evaluate_chunked, prepare_context, sampling_device
from lightning_modules.evaluation.bootstrap import interval
from lightning_modules.train import fit
from orchestrator.plan import build_plan
from orchestrator.sample_search import CellStudy

GOAL = 3.0
CONFIDENCE = 0.95
GRID_GUIDANCE = [0.0, 1.0, 2.0, 3.0, 4.0]
GRID_RESCALE = [0.0, 0.5, 1.0]
GRID_STEPS = [5, 10, 20, 40]
# The searched space: the grid's extents.
SEARCH_AXES = {
    "sample.guidance": {"uniform": [0, 4]},
    "sample.guidance_rescale": {"uniform": [0, 1]},
    "sample.steps": {"randint": [5, 40]},  # inclusive, as the sweep file reads it
}


def parse_args():
    p = _common.parser(__doc__)
    p.add_argument("--num-samples", type=int, default=200, help="eval.num_samples (200)")
    p.add_argument("--cells", type=int, default=16, help="sample_search.cells per study (16)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--chunks", type=int, default=4, help="sample_search.chunks (4)")
    p.add_argument("--algorithm", default="tpe", choices=["tpe", "random"])
    p.add_argument("--pruner", default="paired", choices=["paired", "halving", "median", "none"])
    p.add_argument("--max-steps", type=int, default=None, help="train.max_steps (default 400)")
    p.add_argument("--grid-guidance", type=float, nargs="+", default=GRID_GUIDANCE)
    p.add_argument("--grid-rescale", type=float, nargs="+", default=GRID_RESCALE)
    p.add_argument("--grid-steps", type=int, nargs="+", default=GRID_STEPS)
    p.add_argument("--keep-dir", default=None, help="keep the checkpoint and PNGs here")
    return p.parse_args()


def sweep_yaml(args) -> dict:
    return {
        "name": "sampling_search_bench",
        "base": {
            "data": {"name": "digits", "batch_size": 64},
            "network": {"name": "unet", "preset": "digits"},
            "diffusion": {"timesteps": 1000, "prediction": "eps", "variance": "fixed_small"},
            "train": {
                "max_steps": args.max_steps or 400,
                "lr": 2.0e-3,
                "warmup_steps": 50,
                "ema_decay": 0.99,
                "p_uncond": 0.1,
                "val_every_n_steps": min(200, args.max_steps or 400),
                "bpd_subset": 0,
            },
            "sample": {"variance": ["fixed_small"], "per_class": 10},
            "eval": {"num_samples": args.num_samples},
        },
        "search": dict(SEARCH_AXES),
        "sample_search": {
            "algorithm": args.algorithm,
            "cells": args.cells,
            "metric": "fid",
            "seed": 0,
            "chunks": args.chunks,
            "pruner": args.pruner,
        },
    }


def fid_ci(value: float, reps: torch.Tensor | None) -> tuple[float, float]:
    if reps is None:
        return math.nan, math.nan
    return interval(value, reps, CONFIDENCE)


def rounded(reps: torch.Tensor | None) -> list[float] | None:
    return None if reps is None else [round(float(r), 4) for r in reps]


def spec_values(spec) -> dict:
    return {
        "guidance": spec.guidance,
        "guidance_rescale": spec.guidance_rescale,
        "steps": spec.steps,
    }


# -- the grid -------------------------------------------------------------------------------------
def forwards(spec, samples: int) -> int:
    """Network forwards of one example: a guided step (w not 0 or 1) runs the conditional and
    the unconditional half in one doubled batch."""
    return samples * spec.steps * (1 if spec.guidance in (0.0, 1.0) else 2)


def grid_specs(args, plan) -> list:
    base = plan.cells[0].spec
    return [
        dataclasses.replace(base, guidance=float(w), guidance_rescale=float(phi), steps=int(k))
        for w in args.grid_guidance
        for phi in args.grid_rescale
        for k in args.grid_steps
    ]


def grid_cell(spec, args, config, result, eval_ctx, out_dir: Path) -> dict:
    """One grid cell, drawn in the search's chunks to the end (the callback never stops it)."""
    partial: list[tuple[int, float]] = []

    def record(n, metrics, replicates) -> bool:
        partial.append((n, metrics["fid"]))
        return False

    start = time.perf_counter()
    ev = evaluate_chunked(
        result.module,
        result.datamodule,
        spec,
        config.eval,
        out_dir,
        chunks=args.chunks,
        on_chunk=record,
        per_class=config.sample.per_class,
        batch_size=config.sample.batch_size,
        precision=config.sample.precision,
        context=eval_ctx,
    )
    wall = time.perf_counter() - start
    fid, reps = ev.metrics["fid"], ev.replicates.get("fid")
    low, high = fid_ci(fid, reps)
    print(
        f"grid w={spec.guidance:g} phi={spec.guidance_rescale:g} steps={spec.steps}: fid "
        f"{fid:.3f} [{low:.3f}, {high:.3f}], {ev.sample_seconds:.1f} s sampling",
        flush=True,
    )
    return spec_values(spec) | {
        "fid": fid,
        "fid_ci_low": low,
        "fid_ci_high": high,
        "samples": ev.samples,
        "forwards": forwards(spec, ev.samples),
        "sample_seconds": ev.sample_seconds,
        "measure_seconds": ev.measure_seconds,
        "wall_seconds": wall,
        "partial_fid": [{"samples": n, "fid": v} for n, v in partial],
        "_replicates": reps,
    }


# -- the search -----------------------------------------------------------------------------------
class SearchRun:
    """One seed's study, driven a cell at a time as a trial drives it (ask, evaluate, tell),
    without MLflow; keeps each cell's FID replicates (the study keeps only partial ones)."""

    def __init__(self, seed: int, plan, config, result, eval_ctx, out_dir: Path):
        search = dataclasses.replace(
            plan.search, settings=dataclasses.replace(plan.search.settings, seed=seed)
        )
        self.seed, self.config, self.result, self.eval_ctx = seed, config, result, eval_ctx
        self.out_dir = out_dir
        self.study = CellStudy(search, plan.cells[0], seed=seed)
        self.cells: list[dict] = []
        self.kept: dict[int, torch.Tensor | None] = {}
        self.trace: list[dict] = []  # the best finished FID so far against sampling seconds

    @property
    def remaining(self) -> int:
        return self.study.remaining

    def step(self) -> None:
        study = self.study
        trial, cell = study.ask()
        start = time.perf_counter()
        ev = study.evaluate(trial, cell, self.result, self.config, self.out_dir, self.eval_ctx)
        wall = time.perf_counter() - start
        study.tell(trial, cell)
        reps = ev.replicates.get("fid")
        self.kept[cell.number] = reps
        spec = cell.cell.spec
        partial = study.partials.get(cell.number)
        self.cells.append(
            {"number": cell.number}
            | spec_values(spec)
            | {
                "stopped": bool(cell.stopped),
                "why": cell.stopped,
                "samples": ev.samples,
                "forwards": forwards(spec, ev.samples),
                "fid": ev.metrics["fid"],
                "sample_seconds": ev.sample_seconds,
                "measure_seconds": ev.measure_seconds,
                "wall_seconds": wall,
                "partial_fid": [
                    {"samples": n, "fid": v} for n, (v, _) in sorted(partial.values.items())
                ]
                if partial
                else [],
                "_replicates": reps,
            }
        )
        self.trace.append(
            {
                "sampling_seconds": sum(c["sample_seconds"] for c in self.cells),
                "best_fid": study.best.value if study.best else math.nan,
            }
        )
        print(
            f"search seed {self.seed} #{cell.number} w={spec.guidance:.2f} "
            f"phi={spec.guidance_rescale:.2f} steps={spec.steps}: fid {ev.metrics['fid']:.3f} "
            f"on {ev.samples}" + (" (stopped)" if cell.stopped else "")
            + f", {ev.sample_seconds:.1f} s sampling",
            flush=True,
        )  # fmt: skip


def run_interleaved(specs, searches: list[SearchRun], evaluate_grid) -> list[dict]:
    """The grid's cells and the searches' cells in one interleaved order (the studies round
    robin, the grid cells spread evenly among them), so that a shared machine's load, which
    drifts over minutes, weighs on both alike."""
    grid: list[dict] = []
    total = sum(s.remaining for s in searches)
    done, turn = 0, 0
    while len(grid) < len(specs) or any(s.remaining for s in searches):
        if len(grid) < len(specs) and (not total or len(grid) / len(specs) <= done / total):
            grid.append(evaluate_grid(specs[len(grid)]))
            continue
        live = [s for s in searches if s.remaining]
        if not live:
            continue
        live[turn % len(live)].step()
        turn, done = turn + 1, done + 1
    return grid


# -- ranks ----------------------------------------------------------------------------------------
def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing their mean rank."""
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(1, len(values) + 1)
    for v in np.unique(values):
        tied = values == v
        ranks[tied] = ranks[tied].mean()
    return ranks


def spearman(a, b) -> float:
    ra, rb = average_ranks(np.asarray(a, float)), average_ranks(np.asarray(b, float))
    if ra.std() == 0 or rb.std() == 0:
        return math.nan
    return float(np.corrcoef(ra, rb)[0, 1])


def distinct(grid: list[dict]) -> list[dict]:
    """The grid's cells less those that repeat another's samples: at w = 0 and w = 1 one
    forward pass is guided by nothing, so the rescale does nothing there."""
    seen, out = set(), []
    for c in grid:
        key = (c["guidance"], c["guidance_rescale"] * (c["guidance"] not in (0.0, 1.0)), c["steps"])
        if key not in seen:
            seen.add(key)
            out.append(c)
    return out


def partial_ranking(grid: list[dict], chunks: int) -> list[dict]:
    """Per chunk but the last: how the grid's partial FIDs rank against their final FIDs."""
    final = np.array([c["fid"] for c in grid])
    best = int(np.argmin(final))
    top3 = set(np.argsort(final, kind="stable")[:3].tolist())
    out = []
    for j in range(chunks - 1):
        part = np.array([c["partial_fid"][j]["fid"] for c in grid])
        rank = 1 + int((part < part[best]).sum())  # competition rank: ties share the best
        out.append(
            {
                "chunk": j + 1,
                "samples": grid[0]["partial_fid"][j]["samples"],
                "spearman": spearman(part, final),
                "final_best_rank": rank,
                "final_best_in_top3": rank <= 3,
                "top3_overlap": len(top3 & set(np.argsort(part, kind="stable")[:3].tolist())) / 3,
            }
        )
    return out


# -- figures --------------------------------------------------------------------------------------
def seed_figures(run: SearchRun, grid_best: dict, grid_seconds: float, grid_fwd: int) -> dict:
    cells = run.cells
    seconds = sum(c["sample_seconds"] for c in cells)
    fwd = sum(c["forwards"] for c in cells)
    out = {
        "seed": run.seed,
        "search_cells": len(cells),
        "search_stopped": sum(c["stopped"] for c in cells),
        "search_samples_drawn": sum(c["samples"] for c in cells),
        "search_forwards": fwd,
        "search_sampling_seconds": seconds,
        "search_measure_seconds": sum(c["measure_seconds"] for c in cells),
        "search_wall_seconds": sum(c["wall_seconds"] for c in cells),
        "grid_over_search_sampling_seconds": grid_seconds / seconds,
        "grid_over_search_forwards": grid_fwd / fwd,
    }
    best = run.study.best
    if best is None:
        return out | {"best": None, "within_grid_best_ci": False}
    reps = run.kept[best.number]
    low, high = fid_ci(best.value, reps)
    diff = best.value - grid_best["fid"]
    d_low, d_high = (
        interval(diff, reps - grid_best["_replicates"], CONFIDENCE)
        if reps is not None and grid_best["_replicates"] is not None
        else (math.nan, math.nan)
    )
    return out | {
        "best": {"number": best.number}
        | spec_values(best.cell.spec)
        | {"fid": best.value, "fid_ci_low": low, "fid_ci_high": high},
        "difference_vs_grid_best": {"fid": diff, "ci_low": d_low, "ci_high": d_high},
        "within_grid_best_ci": bool(d_low <= 0),  # holds 0 or lies below it
        "clearly_better_than_grid_best": bool(d_high < 0),
        "best_so_far": run.trace,
    }


def public(cell: dict) -> dict:
    out = {k: v for k, v in cell.items() if not k.startswith("_")}
    out["fid_replicates"] = rounded(cell.get("_replicates"))
    return out


def main() -> None:
    args = parse_args()
    _common.setup(args)
    started = time.perf_counter()
    tmp = Path(args.keep_dir or tempfile.mkdtemp(prefix="bench-sampling-search-"))
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        (tmp / "sweep.yaml").write_text(yaml.safe_dump(sweep_yaml(args), sort_keys=False))
        plan = build_plan(tmp / "sweep.yaml")
        config = plan.trainings[0].config
        if args.max_steps is not None:
            assert config.train.max_steps == args.max_steps, OmegaConf.to_yaml(config.train)
        print(plan.search.describe(), flush=True)

        t0 = time.perf_counter()
        result = fit(config, tmp / "train", enable_progress_bar=False, enable_model_summary=False)
        train_s = time.perf_counter() - t0
        print(f"trained {config.train.max_steps} steps in {train_s:.1f} s", flush=True)

        t0 = time.perf_counter()
        eval_ctx = prepare_context(result.datamodule, config.eval, device=sampling_device(config))
        context_s = time.perf_counter() - t0

        t0 = time.perf_counter()
        searches = [
            SearchRun(seed, plan, config, result, eval_ctx, tmp / f"search{seed}")
            for seed in args.seeds
        ]
        grid = run_interleaved(
            grid_specs(args, plan),
            searches,
            lambda spec: grid_cell(spec, args, config, result, eval_ctx, tmp / "grid"),
        )
        evaluate_wall = time.perf_counter() - t0
    finally:
        if args.keep_dir is None:
            shutil.rmtree(tmp, ignore_errors=True)

    grid_seconds = sum(c["sample_seconds"] for c in grid)
    grid_fwd = sum(c["forwards"] for c in grid)
    redundant = sum(
        c["sample_seconds"]
        for c in grid
        if c["guidance"] in (0.0, 1.0) and c["guidance_rescale"] != args.grid_rescale[0]
    )
    grid_best = min(grid, key=lambda c: c["fid"])
    seeds = [seed_figures(run, grid_best, grid_seconds, grid_fwd) for run in searches]
    search_mean = float(np.mean([s["search_sampling_seconds"] for s in seeds]))
    search_fwd_mean = float(np.mean([s["search_forwards"] for s in seeds]))
    ranking = partial_ranking(grid, args.chunks)
    ranking_distinct = partial_ranking(distinct(grid), args.chunks)
    within = sum(s["within_grid_best_ci"] for s in seeds)
    ratio = grid_seconds / search_mean
    total = time.perf_counter() - started
    print_tables(grid, grid_best, grid_seconds, seeds, ranking, ranking_distinct)
    print(
        f"\ngrid_over_search_sampling_seconds: {ratio:.2f} (goal >= {GOAL}; forwards "
        f"{grid_fwd / search_fwd_mean:.2f}); search best within the grid best's paired CI: "
        f"{within} of {len(seeds)} seeds; total {total:.0f} s"
    )
    _common.write_json(
        args.out,
        {
            "environment": _common.environment(),
            "settings": {
                "num_samples": args.num_samples,
                "samples_per_cell": grid[0]["samples"],
                "cells": args.cells,
                "chunks": args.chunks,
                "algorithm": args.algorithm,
                "pruner": args.pruner,
                "seeds": args.seeds,
                "max_steps": config.train.max_steps,
                "bootstrap": config.eval.bootstrap,
                "confidence": CONFIDENCE,
                "grid": {
                    "guidance": args.grid_guidance,
                    "guidance_rescale": args.grid_rescale,
                    "steps": args.grid_steps,
                },
                "search_axes": SEARCH_AXES,
            },
            "goal": GOAL,
            "grid_over_search_sampling_seconds": ratio,
            "grid_over_search_sampling_seconds_per_seed": [
                s["grid_over_search_sampling_seconds"] for s in seeds
            ],
            "grid_over_search_forwards": grid_fwd / search_fwd_mean,
            "search_best_within_grid_ci_count": within,
            "grid_cells": len(grid),
            "grid_sampling_seconds": grid_seconds,
            "grid_forwards": grid_fwd,
            "grid_redundant_sampling_seconds": redundant,
            "grid_measure_seconds": sum(c["measure_seconds"] for c in grid),
            "grid_wall_seconds": sum(c["wall_seconds"] for c in grid),
            "search_sampling_seconds_mean": search_mean,
            "search_forwards_mean": search_fwd_mean,
            "grid_best": public(grid_best),
            "partial_ranking": ranking,
            "partial_ranking_distinct": ranking_distinct,
            "grid_distinct_cells": len(distinct(grid)),
            "seeds": seeds,
            "grid": [public(c) for c in grid],
            "search": [
                {"seed": run.seed, "cells": [public(c) for c in run.cells]} for run in searches
            ],
            "train_seconds": train_s,
            "context_seconds": context_s,
            "evaluate_wall_seconds": evaluate_wall,
            "total_seconds": total,
        },
    )


def print_tables(grid, grid_best, grid_seconds, seeds, ranking, ranking_distinct) -> None:
    print()
    rows = [
        ["grid", len(grid), 0, grid_seconds, 1.0, 1.0, grid_best["guidance"],
         grid_best["guidance_rescale"], grid_best["steps"], grid_best["fid"],
         f"[{grid_best['fid_ci_low']:.2f}, {grid_best['fid_ci_high']:.2f}]", "", ""],
    ]  # fmt: skip
    for s in seeds:
        row = [
            f"search seed {s['seed']}", s["search_cells"], s["search_stopped"],
            s["search_sampling_seconds"], s["grid_over_search_sampling_seconds"],
            s["grid_over_search_forwards"],
        ]  # fmt: skip
        b, d = s["best"], s.get("difference_vs_grid_best")
        if b is None:
            rows.append(row + ["-"] * 7)
            continue
        rows.append(
            row
            + [
                round(b["guidance"], 3),
                round(b["guidance_rescale"], 3),
                b["steps"],
                b["fid"],
                f"[{b['fid_ci_low']:.2f}, {b['fid_ci_high']:.2f}]",
                f"{d['fid']:+.2f} [{d['ci_low']:+.2f}, {d['ci_high']:+.2f}]",
                s["within_grid_best_ci"],
            ]
        )
    headers = ["", "cells", "stopped", "sampling s", "grid/this s", "grid/this fwd", "best w",
               "phi", "steps", "fid", "95% CI", "- grid best [paired CI]", "within"]  # fmt: skip
    _common.print_table(headers, rows)
    print()
    n_distinct = len(distinct(grid))
    _common.print_table(
        ["chunk", "samples", "cells", "spearman(partial, final)", "final best's rank", "in top 3",
         "top-3 overlap"],
        [
            [r["chunk"], r["samples"], cells, r["spearman"], r["final_best_rank"],
             r["final_best_in_top3"], r["top3_overlap"]]
            for rows, cells in ((ranking, len(grid)), (ranking_distinct, n_distinct))
            for r in rows
        ],
    )  # fmt: skip


if __name__ == "__main__":
    main()
