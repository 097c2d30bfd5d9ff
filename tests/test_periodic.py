"""Sample quality during training (eval.periodic, lightning_modules/periodic.py): measured at the
chosen validations with the EMA weights, logged against the step and left in the validation's
callback metrics for Tune; its cells resolved from the config."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf
from pytorch_lightning.loggers.logger import Logger

from lightning_modules.config import load_config, periodic_specs
from lightning_modules.evaluate import evaluate_group
from lightning_modules.periodic import SECONDS_METRIC, PeriodicEvaluation
from lightning_modules.train import fit

CONFIG = {
    "data": {"name": "gaussian_mixture", "batch_size": 256, "n_train": 2048, "n_val": 128},
    "network": {"name": "mlp", "hidden_dim": 64, "num_blocks": 2},
    "diffusion": {"timesteps": 100, "prediction": "v"},
    "train": {
        "max_steps": 120,
        "lr": 3e-3,
        "p_uncond": 0.2,
        "val_every_n_steps": 30,
        "bpd_subset": 0,
        "ema_decay": 0.9,
    },
    "eval": {"periodic": {"every_n_steps": 60, "num_samples": 80, "cells": [{}, {"guidance": 3}]}},
}


class Recorder(Logger):
    """What a run's logger receives: (step, metrics) per call."""

    name, version = "recorder", "0"

    def __init__(self):
        super().__init__()
        self.rows = []

    def log_metrics(self, metrics, step=None):
        self.rows.append((step, dict(metrics)))

    def log_hyperparams(self, *args, **kwargs):
        pass

    def history(self, key):
        return [(step, m[key]) for step, m in self.rows if key in m]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    cfg = load_config(CONFIG)
    logger = Recorder()
    result = fit(cfg, tmp_path_factory.mktemp("periodic"), logger=logger, enable_progress_bar=False)
    return cfg, logger, result


def test_cells_default_to_the_conditional_cell_at_few_steps():
    cfg = load_config(CONFIG)
    first, second = periodic_specs(cfg)
    assert (first.guidance, first.steps, first.variance) == (1.0, 10, "fixed_small")
    assert (second.guidance, second.steps) == (3.0, 10)
    unconditional = load_config(
        CONFIG
        | {"train": CONFIG["train"] | {"p_uncond": 1.0}}
        | {"eval": {"periodic": {"every_n_steps": 60}}}
    )
    assert periodic_specs(unconditional)[0].guidance == 0.0  # the only model it trains


def test_quality_is_logged_at_the_chosen_validations_with_the_ema_weights(trained, tmp_path):
    cfg, logger, result = trained
    validations = [step for step, _ in logger.history("val/loss_simple")]
    fid_like = logger.history("eval/sliced_wasserstein")
    assert len(validations) == 4 and [s for s, _ in fid_like] == validations[1::2]  # every 60
    other = logger.history("eval/sliced_wasserstein/w3_fixed_small_10steps")
    assert [s for s, _ in other] == [s for s, _ in fid_like]
    assert not any("_class_" in k for _, m in logger.rows for k in m)
    seconds = [v for _, v in logger.history(SECONDS_METRIC)]
    assert len(seconds) == 2 and 0 < seconds[0] < seconds[1]  # cumulative
    # The last value is what the trained module (its EMA weights, as a checkpoint holds them)
    # scores on the same cell, noise and labels: it was measured with the EMA weights in.
    spec = periodic_specs(cfg)[0]
    eval_cfg = OmegaConf.merge(cfg.eval, {"num_samples": 80, "bootstrap": 0, "floor_draws": 0})
    (final,) = evaluate_group(result.module, result.datamodule, [spec], eval_cfg, tmp_path)
    assert fid_like[-1][1] == pytest.approx(final.metrics["sliced_wasserstein"], rel=1e-5)
    # ... and the validation's callback metrics carry it to whoever reports to Tune.
    reported = result.trainer.callback_metrics["eval/sliced_wasserstein"]
    assert float(reported) == pytest.approx(fid_like[-1][1])
    callback = next(c for c in result.trainer.callbacks if isinstance(c, PeriodicEvaluation))
    assert callback.evaluations == 2 and callback.seconds == pytest.approx(seconds[-1])


@pytest.mark.slow
def test_measuring_during_training_does_not_change_what_is_trained(tmp_path):
    """The evaluation keeps the training's random streams as they were: the same run without it
    has the same validation losses, step for step. On images its first use trains the eval
    classifier (a fresh cache: under validation's inference mode) or builds it from the cache
    (its layers' initialisation draws from torch's global generator)."""
    config = {
        "data": {"name": "digits", "batch_size": 32},
        "network": {"name": "unet", "preset": "digits"},
        "diffusion": {"timesteps": 100},
        "train": {"max_steps": 40, "val_every_n_steps": 10, "bpd_subset": 0, "warmup_steps": 5},
        "eval": {"cache_dir": str(tmp_path / "cache")},
    }
    periodic = {"every_n_steps": 10, "num_samples": 20, "cells": [{"steps": 5}]}
    logs = []
    for eval_cfg in ({"periodic": periodic}, {}, {"periodic": periodic}):  # trained, -, cached
        cfg = load_config(config | {"eval": config["eval"] | eval_cfg})
        logs.append(Recorder())
        fit(cfg, tmp_path / str(len(logs)), logger=logs[-1], enable_progress_bar=False)
    trained, plain, cached = logs
    assert len(cached.history("eval/fid")) == 4 and not plain.history("eval/fid")
    assert cached.history("eval/fid") == trained.history("eval/fid")
    assert trained.history("val/loss_simple") == plain.history("val/loss_simple")
    assert cached.history("val/loss_simple") == plain.history("val/loss_simple")


def test_no_periodic_evaluation_unless_asked():
    cfg = load_config(CONFIG | {"eval": {}})
    from lightning_modules.train import build_callbacks

    assert not any(isinstance(c, PeriodicEvaluation) for c in build_callbacks(cfg, None))


def test_plan_counts_the_periodic_evaluation_in_its_cost():
    from orchestrator.plan import build_plan

    sweep = Path(__file__).parents[1] / "sweeps" / "mixture_quick.yaml"
    plan = build_plan(sweep, ["base.eval.periodic.every_n_steps=100"])
    # 2 trainings x 300 // 100 evaluations x 104 samples (13 of each of 8 modes) x 10 steps
    assert plan.costs.periodic_forwards == 2 * 3 * 104 * 10
    assert "(+ 6,240 for eval.periodic during training)" in plan.table()
    assert build_plan(sweep).costs.periodic_forwards == 0
