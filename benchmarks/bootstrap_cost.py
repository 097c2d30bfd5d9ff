"""Cost of the metrics' uncertainty: bootstrap seconds per cell against the cell's sampling
seconds (goal: `bootstrap_over_sampling` < 0.10).

For each workload (the quickstart's digits U-Net at 200 samples and 25 steps; the 2-D mixture
MLP of `mixture_quick` at 400 samples and 20 steps; `--workloads` picks), a network built from
the sweep's config (untrained: sampling costs the same) samples one cell at w = 1 and at w = 3
(a guided cell draws a doubled batch) as `evaluate_group` does, and the cell's metrics are
measured twice in the same context (`EvalContext.measure`): without resamples (the point
estimates, what a cell cost before intervals) and with `eval.bootstrap` resamples (200 by
default), then `with_intervals`. `bootstrap_seconds` is the difference: the replicates of every
metric and their intervals. The real data's noise floor (`noise_floor`, `eval.floor_draws`
draws, once per training: every cell of it shares the floor) is timed apart and reported per
cell of the quickstart's 8 cells per training. Each figure is the median over `--rounds`
rounds; the ratio is the median of the per-round ratios, all measured in one process.

    .venv/bin/python benchmarks/bootstrap_cost.py --out /tmp/bench_bootstrap_cost.json
"""

from __future__ import annotations

import time

import _common
import torch
from omegaconf import OmegaConf

from lightning_modules.config import load_config
from lightning_modules.diffusion import SamplingSpec
from lightning_modules.evaluate import eval_labels, noise_floor, prepare_context
from lightning_modules.evaluation.bootstrap import Resamples, with_intervals
from lightning_modules.train import build_experiment

GOAL = 0.10
CELLS_PER_TRAINING = 8  # the quickstart: 2 variances x 4 guidance weights
WORKLOADS = {
    "digits": {
        "data": {"name": "digits"},
        "network": {"name": "unet", "preset": "digits"},
        "diffusion": {"timesteps": 1000},
        "eval": {"num_samples": 200},
        "steps": 25,
    },
    "mixture": {
        "data": {"name": "gaussian_mixture"},
        "network": {"name": "mlp"},
        "diffusion": {"timesteps": 100, "prediction": "v"},
        "eval": {"num_samples": 400},
        "steps": 20,
    },
}


def parse_args():
    p = _common.parser(__doc__)
    p.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--resamples", type=int, default=200, help="eval.bootstrap")
    return p.parse_args()


def config(workload: dict, resamples: int):
    base = OmegaConf.merge(
        load_config(None, []),
        {k: v for k, v in workload.items() if k != "steps"},
        {"eval": {"bootstrap": resamples}},
    )
    return base


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def metrics_with_intervals(ctx, x, labels, resamples):
    metrics, reps = ctx.measure(x, labels, resamples)
    return with_intervals(metrics, reps, ctx.confidence)


def measure_workload(name: str, workload: dict, args) -> dict:
    cfg = config(workload, args.resamples)
    datamodule, module = build_experiment(cfg)
    module.eval()
    ctx = prepare_context(datamodule, cfg.eval)
    labels = eval_labels(ctx.num_classes, cfg.eval.num_samples, cfg.sample.per_class)
    n = len(labels) if labels is not None else cfg.eval.num_samples
    rows = []
    for guidance in (1.0, 3.0):
        spec = SamplingSpec(guidance=guidance, variance="fixed_small", steps=workload["steps"])
        sample_s, point_s, boot_s, ratios = [], [], [], []
        for _ in range(args.rounds):
            (x,), s = timed(module.sample_many, labels, [spec], num_samples=n)
            _, p = timed(ctx.measure, x, labels)
            # The counts are drawn once per seed and training; drawing them is counted here.
            _, draw = timed(Resamples.draw, n, args.resamples, spec.seed, labels)
            resamples = ctx.resamples(n, labels, spec.seed)
            _, b = timed(metrics_with_intervals, ctx, x, labels, resamples)
            b += draw
            sample_s.append(s)
            point_s.append(p)
            boot_s.append(b - p)
            ratios.append((b - p) / s)
        rows.append(
            {
                "workload": name,
                "guidance": guidance,
                "samples": n,
                "steps": workload["steps"],
                "sampling_seconds": _common.median(sample_s),
                "point_metrics_seconds": _common.median(point_s),
                "bootstrap_seconds": _common.median(boot_s),
                "bootstrap_over_sampling": _common.median(ratios),
            }
        )
    _, floor_s = timed(noise_floor, ctx, labels, n, cfg.eval.floor_draws)
    for row in rows:
        row["floor_seconds_per_training"] = floor_s
        row["floor_over_sampling_per_cell"] = floor_s / CELLS_PER_TRAINING / row["sampling_seconds"]
    return {"rows": rows}


def main() -> None:
    args = parse_args()
    _common.setup(args)
    torch.manual_seed(0)
    results = [measure_workload(w, WORKLOADS[w], args) for w in args.workloads]
    rows = [row for r in results for row in r["rows"]]
    worst = max(row["bootstrap_over_sampling"] for row in rows)
    headers = [
        "workload",
        "w",
        "n",
        "sampling s",
        "metrics s",
        "bootstrap s",
        "bootstrap/sampling",
        "floor s/training",
        "floor/sampling per cell",
    ]
    _common.print_table(
        headers,
        [
            [
                r["workload"],
                r["guidance"],
                r["samples"],
                r["sampling_seconds"],
                r["point_metrics_seconds"],
                r["bootstrap_seconds"],
                r["bootstrap_over_sampling"],
                r["floor_seconds_per_training"],
                r["floor_over_sampling_per_cell"],
            ]
            for r in rows
        ],
    )
    print(f"bootstrap_over_sampling (worst): {worst:.3f} (goal < {GOAL})")
    _common.write_json(
        args.out,
        {
            "environment": _common.environment(),
            "resamples": args.resamples,
            "rounds": args.rounds,
            "goal": GOAL,
            "bootstrap_over_sampling": worst,
            "rows": rows,
        },
    )


if __name__ == "__main__":
    main()
