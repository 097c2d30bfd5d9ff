"""Sample quality during training (``eval.periodic``): a few cheap cells sampled and measured at
chosen validations, with the EMA weights, so that a run has quality-vs-step curves and a Tune
scheduler can stop trials on sample quality instead of the loss.

The callback runs at the end of a validation epoch, *before* the EMA callback swaps the training
weights back (it stands before it in the callback list, and Lightning calls callbacks in order):
what it samples is what validation measured and what a checkpoint would sample. Its values go
through ``pl_module.log``, so the run's logger records them at the step and the validation's
``callback_metrics`` carry them to whoever reports to Tune after it.
"""

from __future__ import annotations

import contextlib
import logging
import random
import tempfile
import time
from collections.abc import Iterator

import numpy as np
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf

from .config import periodic_specs
from .diffusion import SamplingSpec

log = logging.getLogger(__name__)
SECONDS_METRIC = "eval/periodic_seconds"  # cumulative seconds spent in periodic evaluation


def periodic_key(metric: str, spec: SamplingSpec, first: bool) -> str:
    """`eval/fid` for the first cell (the one a Tune metric names), `eval/fid/w3_fixed_small_10
    steps` for the others."""
    if first:
        return f"eval/{metric}"
    return f"eval/{metric}/w{spec.guidance:g}_{spec.variance}_{spec.steps}steps"


@contextlib.contextmanager
def untouched_rng(device: torch.device) -> Iterator[None]:
    """Leave the training's random streams (torch's on the CPU and the device, NumPy's,
    Python's) as they were: the evaluation draws from its own seeded generators, but what it
    sets up on first use (a classifier trained once, data drawn) may draw from the global ones,
    which would change what the run trains next."""
    py, np_state = random.getstate(), np.random.get_state()
    devices = [device] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(np_state)


class PeriodicEvaluation(pl.Callback):
    """Measure ``eval.periodic.cells`` every ``eval.periodic.every_n_steps`` training steps."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.every = cfg.eval.periodic.every_n_steps
        self.specs = periodic_specs(cfg)
        # The final grid's evaluation settings at the periodic sample size, without intervals
        # or the noise floor (a curve's points need the values; the final grid has the rest).
        self.eval_cfg = OmegaConf.merge(
            cfg.eval,
            {"num_samples": cfg.eval.periodic.num_samples, "bootstrap": 0, "floor_draws": 0},
        )
        self.context = None
        self.seconds = 0.0
        self.evaluations = 0

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = trainer.global_step
        if trainer.sanity_checking or not self.every or step == 0 or step % self.every:
            return
        from .evaluate import evaluate_group, prepare_context, sampling_device

        start = time.perf_counter()
        if self.context is None:  # the classifier and real images, once per run
            # Validation runs under inference mode; a classifier not yet cached trains here.
            with untouched_rng(pl_module.device), torch.inference_mode(False), torch.enable_grad():
                self.context = prepare_context(
                    trainer.datamodule, self.eval_cfg, device=sampling_device(self.cfg)
                )
        s = self.cfg.sample
        results = []
        with untouched_rng(pl_module.device), tempfile.TemporaryDirectory() as tmp:
            for spec in self.specs:
                results += evaluate_group(
                    pl_module, trainer.datamodule, [spec], self.eval_cfg, tmp,
                    per_class=s.per_class, batch_size=s.batch_size, precision=s.precision,
                    context=self.context,
                )  # fmt: skip
        self.seconds += time.perf_counter() - start
        self.evaluations += 1
        values = {SECONDS_METRIC: self.seconds}
        for i, result in enumerate(results):
            for metric, value in result.metrics.items():
                if "_class_" not in metric:  # per-class coverage: in the final grid's cells
                    values[periodic_key(metric, result.spec, i == 0)] = value
        for key, value in values.items():
            pl_module.log(key, float(value), on_step=False, on_epoch=True)
        log.info("periodic evaluation at step %d: %s", step, values)
