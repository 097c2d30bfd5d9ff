"""What MLflow tracking costs a training step: the product's trial logger vs no logger.

The same DiffusionModule is trained under a real Trainer with logger=False and with the sweep
trials' logger (`orchestrator.metric_log.DurableMLFlowLogger`, Lightning's MLflow logger writing
batched metrics to a sqlite tracking store) in alternating rounds (A B A B ...) of the same
length; each round times its steady-state steps with `_common.StepTimer` (start-up excluded;
a step runs from one `on_train_batch_start` to the next, so it includes the loop's write of the
logged metrics to the logger, which comes after `on_train_batch_end`). Key
`tracking_overhead_fraction` = median over rounds of (logged step time / unlogged step time) - 1
at the product's logging interval (goal <= 0.02); `--every 1` shows the worst case (a write per
step).

Then what a checkpoint costs the tracking side: before a trial reports a checkpoint to Tune it
waits until MLflow has confirmed every metric logged so far (`DurableMLFlowLogger.sync`), so a
checkpoint never stands ahead of the store. `checkpoint_sync_ms` (median, max) times that wait
right after each of `--validations` validations; `checkpoint_sync_fraction` puts the median
against the training time between two checkpoints at the product's default
`train.val_every_n_steps`.

    .venv/bin/python benchmarks/tracking_overhead.py --out /tmp/bench_tracking_overhead.json
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import _common
import mlflow
import pytorch_lightning as pl
import torch

from lightning_modules.config import TrainConfig, load_config
from lightning_modules.train import build_experiment, build_trainer
from orchestrator.metric_log import DurableMLFlowLogger


class SyncTimer(pl.Callback):
    """What TuneReportCallback waits for at every validation: the store's confirmation."""

    def __init__(self, logger):
        self.logger, self.ms = logger, []

    def on_validation_end(self, trainer, pl_module):
        start = time.perf_counter()
        left = self.logger.sync()
        self.ms.append(1000 * (time.perf_counter() - start))
        assert not left, "the sqlite store did not confirm the metrics"


def train(cfg, root: Path, logger, timer: pl.Callback, **trainer_settings) -> None:
    """The product's experiment and trainer (build_experiment, build_trainer), quiet."""
    datamodule, module = build_experiment(cfg)
    trainer = build_trainer(
        cfg,
        root,
        logger=logger,
        callbacks=[timer],
        enable_progress_bar=False,
        enable_model_summary=False,
        **trainer_settings,
    )
    trainer.fit(module, datamodule=datamodule)


def sync_cost(cfg, root: Path, uri: str, client, experiment_id: str, validations: int):
    """Train with a validation every 5 steps and time the sync after each validation."""
    run = client.create_run(experiment_id)
    logger = DurableMLFlowLogger(uri, run.info.run_id, client)
    timer = SyncTimer(logger)
    train(
        cfg,
        root,
        logger,
        timer,
        max_steps=5 * validations,
        val_check_interval=5,
        limit_val_batches=1,
        log_every_n_steps=1,
    )
    return timer.ms


def one_round(cfg, root: Path, steps: int, warmup: int, logger) -> float:
    timer = _common.StepTimer(warmup, steps)
    train(cfg, root, logger, timer, max_steps=timer.fit_steps, limit_val_batches=0)
    return statistics.mean(timer.times)


def main() -> None:
    p = _common.parser(__doc__)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument(
        "--every",
        type=int,
        default=None,
        help="log every N steps (default: the product's train.log_every_n_steps)",
    )
    p.add_argument("--validations", type=int, default=20, help="checkpoint syncs to time")
    p.add_argument("--override", nargs="*", default=[], help="config key=value overrides")
    args = p.parse_args()
    device = _common.setup(args)
    overrides = [
        "data.name=gaussian_mixture",
        "network.name=mlp",
        "diffusion.timesteps=100",
        "train.bpd_subset=0",
        "train.val_every_n_steps=100000",
        *args.override,
    ]
    if args.every:
        overrides.append(f"train.log_every_n_steps={args.every}")
    cfg = load_config(None, overrides)
    if cfg.train.accelerator == "cpu":
        device = torch.device("cpu")
    tmp = Path(tempfile.mkdtemp(prefix="bench-tracking-"))
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    experiment_id = client.create_experiment("tracking-overhead")
    plain, logged = [], []
    for r in range(args.rounds):
        for variant in ("plain", "logged") if r % 2 == 0 else ("logged", "plain"):
            if variant == "plain":
                plain.append(one_round(cfg, tmp / f"p{r}", args.steps, args.warmup, False))
            else:
                run = client.create_run(experiment_id)
                logger = DurableMLFlowLogger(uri, run.info.run_id, client)
                logged.append(one_round(cfg, tmp / f"l{r}", args.steps, args.warmup, logger))
    ratios = [b / a for a, b in zip(plain, logged)]
    sync_ms = sync_cost(cfg, tmp / "sync", uri, client, experiment_id, args.validations)
    between_checkpoints_ms = TrainConfig.val_every_n_steps * 1000 * statistics.median(logged)
    result = {
        "benchmark": "tracking_overhead",
        **_common.environment(device),
        "mlflow": mlflow.__version__,
        "tracking_overhead_fraction": statistics.median(ratios) - 1,
        "checkpoint_sync_ms": {"median": statistics.median(sync_ms), "max": max(sync_ms)},
        "checkpoint_sync_fraction": statistics.median(sync_ms) / between_checkpoints_ms,
        "checkpoint_sync_ms_all": sync_ms,
        "per_round_ratio": ratios,
        "plain_ms_per_step": [1000 * t for t in plain],
        "logged_ms_per_step": [1000 * t for t in logged],
        "log_every_n_steps": cfg.train.log_every_n_steps,
        "settings": {
            "rounds": args.rounds,
            "steps": args.steps,
            "warmup": args.warmup,
            "threads": args.threads,
            "overrides": overrides,
            "store": "sqlite",
        },
    }
    print(
        f"logging every {cfg.train.log_every_n_steps} step(s), sqlite store, "
        f"{args.rounds} alternating rounds x {args.steps} steps"
    )
    _common.print_table(
        ["round", "plain ms", "logged ms", "ratio"],
        [[i, 1000 * a, 1000 * b, b / a] for i, (a, b) in enumerate(zip(plain, logged))],
    )
    goal = "ok" if result["tracking_overhead_fraction"] <= 0.02 else "ABOVE GOAL"
    print(
        f"tracking_overhead_fraction = {result['tracking_overhead_fraction']:+.4f} "
        f"(goal <= 0.02: {goal})"
    )
    print(
        f"checkpoint sync: median {statistics.median(sync_ms):.2f} ms, max {max(sync_ms):.2f} ms "
        f"over {len(sync_ms)} validations = {result['checkpoint_sync_fraction']:.2e} of the "
        f"training between two checkpoints (val_every_n_steps={TrainConfig.val_every_n_steps})"
    )
    _common.write_json(args.out, result)


if __name__ == "__main__":
    main()
