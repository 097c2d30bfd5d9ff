"""Sample a trained module over a grid of sampling-time choices and measure each cell.

One cell is (guidance weight, variance, steps). Every cell gets a PNG (a grid with one row per
class for images, a scatter plot for 2-D points) and, unless switched off, its metrics: FID,
guided accuracy, precision and recall in the eval classifier's features for images; distances to
the true distribution and mode coverage for 2-D points.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .evaluation import (
    evaluate_images,
    evaluate_points,
    grid_filename,
    load_or_train_classifier,
    save_points_plot,
    save_sample_grid,
)
from .module import DiffusionModule

log = logging.getLogger(__name__)


@dataclass
class EvalContext:
    """What the metrics compare against: a cached classifier and real images, or the truth."""

    kind: str
    num_classes: int
    classifier: object | None = None
    real_x: torch.Tensor | None = None
    truth: object | None = None
    inception_weights: str | None = None


def prepare_context(datamodule, eval_cfg, with_metrics: bool = True) -> EvalContext:
    ctx = EvalContext(datamodule.kind, datamodule.num_classes)
    if not with_metrics:
        return ctx
    if datamodule.kind == "points":
        ctx.truth = datamodule.truth
        return ctx
    train_x, train_y = datamodule.train_tensors()
    ctx.classifier = load_or_train_classifier(
        datamodule.name,
        train_x,
        train_y,
        datamodule.num_classes,
        eval_cfg.classifier_seed,
        eval_cfg.cache_dir,
    ).model
    ctx.real_x = datamodule.val_tensors()[0]
    ctx.inception_weights = eval_cfg.get("inception_weights")
    return ctx


def eval_labels(num_classes: int, num_samples: int, per_class: int) -> torch.Tensor | None:
    """Class-major balanced labels: the first `per_class` of each class also make the grid."""
    if not num_classes:
        return None
    n_per = max(per_class, math.ceil(num_samples / num_classes))
    return torch.arange(num_classes).repeat_interleave(n_per)


def _grid_subset(x: torch.Tensor, num_classes: int, per_class: int) -> torch.Tensor:
    if not num_classes:
        return x[: per_class * 10]
    return x.reshape(num_classes, -1, *x.shape[1:])[:, :per_class].reshape(-1, *x.shape[1:])


def _measure(ctx: EvalContext, x: torch.Tensor, labels: torch.Tensor | None) -> dict[str, float]:
    if ctx.kind == "points":
        return evaluate_points(x, labels, ctx.truth)
    return evaluate_images(
        x, labels, ctx.real_x, ctx.classifier, inception_weights_path=ctx.inception_weights
    )


def sampling_device(cfg) -> torch.device:
    """Where to sample: the GPU when there is one (unless the run was pinned to the CPU).
    Lightning hands a fitted module back on the CPU, so evaluation after training must move it
    back, or a GPU trial would sample on its CPU."""
    if torch.cuda.is_available() and cfg.train.get("accelerator", "auto") not in ("cpu",):
        return torch.device("cuda")
    return torch.device("cpu")


def eval_cells(sample_cfg) -> list[tuple[float, str, int]]:
    """The (guidance, variance, steps) cells of a sample config's lists, in evaluation order."""
    return [
        (float(w), variance, int(steps))
        for variance in sample_cfg.variance
        for steps in sample_cfg.steps
        for w in sample_cfg.guidance
    ]


def evaluate_cell(
    module: DiffusionModule,
    datamodule,
    sample_cfg,
    eval_cfg,
    out_dir: str | Path,
    cell: tuple[float, str, int],
    *,
    with_metrics: bool = True,
    context: EvalContext | None = None,
) -> dict:
    """Sample one (guidance, variance, steps) cell and measure it: its settings, metrics, PNG
    path and sampling time. Every cell starts from the same noise and labels (``sample.seed``),
    so cells of one model compare like with like, and a cell evaluated alone gives the same
    samples as within a grid."""
    w, variance, steps = cell
    out_dir = Path(out_dir)
    module.to(sampling_device(module.cfg))
    ctx = context or prepare_context(datamodule, eval_cfg, with_metrics)
    n = eval_cfg.num_samples if with_metrics else sample_cfg.per_class * max(1, ctx.num_classes)
    labels = eval_labels(ctx.num_classes, n, sample_cfg.per_class)
    interval = sample_cfg.guidance_interval
    start = time.perf_counter()
    x = module.sample(
        labels,
        [w],
        variance=variance,
        steps=steps,
        sampler=sample_cfg.sampler,
        eta=sample_cfg.eta,
        guidance_rescale=sample_cfg.guidance_rescale,
        guidance_interval=tuple(interval) if interval is not None else None,
        threshold=sample_cfg.threshold,
        seed=sample_cfg.seed,
        num_samples=n,
        batch_size=sample_cfg.batch_size,
    )[w]
    seconds = time.perf_counter() - start
    png = out_dir / grid_filename(w, variance, steps)
    if ctx.kind == "points":
        title = f"w={w:g} {variance} {steps} steps"
        save_points_plot(x, labels, png, truth=datamodule.truth, title=title)
    else:
        sub = _grid_subset(x, ctx.num_classes, sample_cfg.per_class)
        save_sample_grid(sub, png, nrow=sample_cfg.per_class)
    row = {
        "guidance": w,
        "variance": variance,
        "steps": steps,
        "sample_seconds": seconds,
        "image": str(png),
    }
    if with_metrics:
        row |= _measure(ctx, x, labels)
    log.info("evaluated %s", {k: v for k, v in row.items() if k != "image"})
    return row


def evaluate_module(
    module: DiffusionModule,
    datamodule,
    sample_cfg,
    eval_cfg,
    out_dir: str | Path,
    *,
    with_metrics: bool = True,
    context: EvalContext | None = None,
) -> list[dict]:
    """One row per (guidance, variance, steps) cell of the sample config's lists."""
    ctx = context or prepare_context(datamodule, eval_cfg, with_metrics)
    return [
        evaluate_cell(
            module,
            datamodule,
            sample_cfg,
            eval_cfg,
            out_dir,
            cell,
            with_metrics=with_metrics,
            context=ctx,
        )
        for cell in eval_cells(sample_cfg)
    ]
