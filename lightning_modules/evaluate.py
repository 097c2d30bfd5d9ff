"""Sample a trained module over a grid of sampling-time choices and measure each cell.

One cell is one :class:`SamplingSpec` (guidance weight, variance, steps, sampler, ...). Every
cell gets a PNG (a grid with one row per class for images, a scatter plot for 2-D points) and,
unless switched off, its metrics: FID,
guided accuracy, precision and recall in the eval classifier's features for images; distances to
the true distribution and mode coverage for 2-D points. Each metric comes with its bootstrap
interval (`<metric>_ci_low`, `<metric>_ci_high`; evaluation/bootstrap.py) and the real data's
own score at the same sample size (`<metric>_floor`, `<metric>_floor_sd`; :func:`noise_floor`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import sampling_specs
from .diffusion import SamplingSpec, batch_key
from .evaluation import (
    RealReference,
    grid_filename,
    image_metrics,
    load_or_train_classifier,
    point_metrics,
    save_points_plot,
    save_sample_grid,
)
from .evaluation.bootstrap import Resamples, by_label, with_intervals
from .module import DiffusionModule
from .train import trains_on_gpu

log = logging.getLogger(__name__)


# The quality metrics every cell measures with bootstrap replicates, by data kind, and their
# direction: what a sampling search optimises and a Tune metric on sample quality may name.
QUALITY_METRICS = {
    "image": {"fid": "min", "precision": "max", "recall": "max", "guided_accuracy": "max"},
    "points": {
        "sliced_wasserstein": "min",
        "energy_distance": "min",
        "modes_hit": "max",
        "mode_coverage": "max",
        "label_accuracy": "max",
    },
}
LABELLED_METRICS = ("guided_accuracy", "mode_coverage", "label_accuracy")  # need class labels


def quality_metrics(kind: str, labelled: bool) -> dict[str, str]:
    """The metrics of :data:`QUALITY_METRICS` a dataset's cells measure (metric -> min|max)."""
    return {k: v for k, v in QUALITY_METRICS[kind].items() if labelled or k not in LABELLED_METRICS}


@dataclass
class EvalContext:
    """What the metrics compare against: a cached classifier and real images, or the truth."""

    kind: str
    num_classes: int
    classifier: object | None = None
    real_x: torch.Tensor | None = None
    truth: object | None = None
    inception_weights: str | None = None
    reference: RealReference | None = None  # the real images' side, once the first cell needs it
    real_train: tuple | None = None  # the training split (x, y): the noise floor's real draws
    bootstrap: int = 0  # resamples per cell (eval.bootstrap); 0: no intervals
    floor_draws: int = 0  # real draws for the noise floor (eval.floor_draws); 0: none
    confidence: float = 0.95
    _resamples: dict = field(default_factory=dict, repr=False)
    _floors: dict = field(default_factory=dict, repr=False)

    def real_reference(self) -> RealReference:
        """The real images' features and FID statistics, computed on first use and shared by
        every cell measured in this context."""
        if self.reference is None:
            self.reference = RealReference.from_images(self.real_x, self.classifier)
        return self.reference

    def resamples(self, n: int, labels: torch.Tensor | None, seed: int) -> Resamples | None:
        """The bootstrap's counts for cells of n samples drawn with ``seed``: the same for
        every such cell (which pairs them), made once."""
        if not self.bootstrap:
            return None
        key = (n, seed)
        if key not in self._resamples:
            self._resamples[key] = Resamples.draw(n, self.bootstrap, seed, labels)
        return self._resamples[key]

    def measure(
        self, x: torch.Tensor, labels: torch.Tensor | None, resamples: Resamples | None = None
    ) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
        """(metrics, bootstrap replicates) of one sample set."""
        if self.kind == "points":
            counts = None if resamples is None else resamples.samples
            return point_metrics(x, labels, self.truth, counts=counts)
        return image_metrics(
            x,
            labels,
            self.real_x,
            self.classifier,
            inception_weights_path=self.inception_weights,
            reference=self.real_reference(),
            resamples=resamples,
        )

    def floor(self, labels: torch.Tensor | None, n: int) -> dict[str, float]:
        """:func:`noise_floor` for samples of these labels, computed once per size."""
        if not self.floor_draws:
            return {}
        if n not in self._floors:
            self._floors[n] = noise_floor(self, labels, n, self.floor_draws)
        return self._floors[n]


def prepare_context(
    datamodule, eval_cfg, with_metrics: bool = True, device: torch.device | str = "cpu"
) -> EvalContext:
    """The context the cells of one model are measured in; the eval classifier runs on `device`
    (pass :func:`sampling_device`, so that features are computed where samples are drawn)."""
    ctx = EvalContext(datamodule.kind, datamodule.num_classes)
    if not with_metrics:
        return ctx
    ctx.bootstrap = eval_cfg.get("bootstrap", 0)
    ctx.floor_draws = eval_cfg.get("floor_draws", 0)
    ctx.confidence = eval_cfg.get("confidence", 0.95)
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
    ).model.to(device)  # trained (or loaded) on the CPU
    ctx.real_x = datamodule.val_tensors()[0]
    ctx.real_train = datamodule.train_tensors()
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


FLOOR_SEED = 1000  # the real draws of the noise floor: seeds 1000, 1001, ...


def noise_floor(
    ctx: EvalContext, labels: torch.Tensor | None, n: int, draws: int
) -> dict[str, float]:
    """What real data of the cell's size scores, measured as a cell is: ``<metric>_floor`` (the
    mean over ``draws`` independent draws) and ``<metric>_floor_sd`` (their spread).

    The floor is the metric's own bias at this n (a perfect model scores about this, not 0) and
    the sd its noise: cells whose difference is within a few sd of each other cannot be told
    apart at this n. Images: real training images with the cell's labels (class for class),
    against the validation images the cells are scored against; 2-D points: fresh draws from
    the true distribution."""
    runs: dict[str, list[float]] = {}
    for r in range(draws):
        generator = torch.Generator().manual_seed(FLOOR_SEED + r)
        x = _real_draw(ctx, labels, n, generator)
        for key, value in ctx.measure(x, labels)[0].items():
            if not key.startswith(("mode_coverage_class_", "fid_inception")):
                runs.setdefault(key, []).append(value)
    out = {}
    for key, values in runs.items():
        v = torch.tensor(values, dtype=torch.float64)
        out[f"{key}_floor"], out[f"{key}_floor_sd"] = v.mean().item(), v.std().item()
    return out


def _real_draw(ctx: EvalContext, labels, n: int, generator: torch.Generator) -> torch.Tensor:
    """n real samples with ``labels`` (any, without labels): the truth's for 2-D points, the
    training split's for images (without replacement, where a class has enough)."""
    if ctx.kind == "points":
        return ctx.truth.sample(n, labels=labels, generator=generator)[0]
    train_x, train_y = ctx.real_train
    if labels is None:
        return train_x[_pick(len(train_x), n, generator)]
    out = torch.empty(len(labels), *train_x.shape[1:], dtype=train_x.dtype)
    for c in labels.unique().tolist():
        where = (labels == c).nonzero().flatten()
        pool = (train_y == c).nonzero().flatten()
        out[where] = train_x[pool[_pick(len(pool), len(where), generator)]]
    return out


def _pick(pool: int, k: int, generator: torch.Generator) -> torch.Tensor:
    if k <= pool:
        return torch.randperm(pool, generator=generator)[:k]
    return torch.randint(pool, (k,), generator=generator)


def sampling_device(cfg) -> torch.device:
    """Where to sample: the GPU when the run trains on one (:func:`trains_on_gpu`). Lightning
    hands a fitted module back on the CPU, so evaluation after training must move it back, or a
    GPU trial would sample on its CPU."""
    return torch.device("cuda") if trains_on_gpu(cfg) else torch.device("cpu")


def guidance_groups(
    specs: list[SamplingSpec], device: torch.device | str, num_samples: int, batch_size: int
) -> list[list[SamplingSpec]]:
    """The cells to draw together (:meth:`DiffusionModule.sample_many`): on a GPU, cells that
    differ only in guidance weight share a batch as long as the samples of one pass stay
    within ``batch_size`` (a small per-cell batch leaves the GPU idle; benchmarks/cfg_batching.py
    measures it); on the CPU, which is busy at any batch, each cell alone. Order is kept."""
    per_pass = min(num_samples, batch_size)
    fit = batch_size // max(1, per_pass)
    if torch.device(device).type != "cuda" or fit < 2:
        return [[spec] for spec in specs]
    groups: list[list[SamplingSpec]] = []
    for spec in specs:
        last = groups[-1] if groups else None
        if last and len(last) < fit and batch_key(last[0]) == batch_key(spec):
            last.append(spec)
        else:
            groups.append([spec])
    return groups


@dataclass
class EvalResult:
    """One evaluated cell: its settings, its quality metrics (with their intervals and the
    real data's floor), its sampling time and its PNG, and its metrics' bootstrap replicates."""

    spec: SamplingSpec
    metrics: dict[str, float]  # quality metrics (empty without metrics)
    sample_seconds: float  # sampling this cell alone, wall-clock
    image: Path
    measure_seconds: float = 0.0  # computing its metrics, wall-clock (not logged)
    replicates: dict[str, torch.Tensor] = field(default_factory=dict)  # metric -> (B,)
    samples: int = 0  # how many samples the metrics are of
    stopped: bool = False  # stopped early (evaluate_chunked): the metrics are of `samples` only

    def replicates_json(self) -> dict:
        """The replicates as a cell logs them (``bootstrap.json``): a later comparison with
        another cell of the same seed pairs them replicate for replicate."""
        first = next(iter(self.replicates.values()), torch.empty(0))
        return {
            "resamples": len(first),
            "seed": self.spec.seed,
            "metrics": {k: [round(float(x), 8) for x in v] for k, v in self.replicates.items()},
        }

    def logged_metrics(self) -> dict[str, float]:
        """What a run logs for the cell: its metrics and its sampling time."""
        return self.metrics | {"sample_seconds": self.sample_seconds}

    def as_dict(self) -> dict:
        """A flat row for tables and JSON: settings, metrics, seconds, image."""
        return self.spec.as_dict() | self.logged_metrics() | {"image": str(self.image)}


def evaluate_cell(
    module: DiffusionModule, datamodule, spec: SamplingSpec, eval_cfg, out_dir: str | Path, **kw
) -> EvalResult:
    """Sample one cell and measure it (see :func:`evaluate_group`)."""
    return evaluate_group(module, datamodule, [spec], eval_cfg, out_dir, **kw)[0]


def evaluate_group(
    module: DiffusionModule,
    datamodule,
    specs: list[SamplingSpec],
    eval_cfg,
    out_dir: str | Path,
    *,
    per_class: int = 10,
    batch_size: int = 512,
    precision: str = "auto",
    with_metrics: bool = True,
    context: EvalContext | None = None,
    chunks: int = 1,
) -> list[EvalResult]:
    """Sample cells that differ only in guidance weight together (one is a group too) and
    measure each. Every cell starts from the same noise and labels (the spec's seed,
    class-major balanced labels), so cells of one model compare like with like, and a cell
    evaluated alone gives the same samples as within a grid or a group. A cell's
    ``sample_seconds`` is its share of the group's sampling time (the group's time / k).
    ``chunks``: draw the samples in that many class-balanced chunks (:func:`eval_chunks`), as
    :func:`evaluate_chunked` does, so that these cells are those cells drawn to the end."""
    out_dir = Path(out_dir)
    device = sampling_device(module.cfg)
    module.to(device)
    ctx = context or prepare_context(datamodule, eval_cfg, with_metrics, device=device)
    n = eval_cfg.num_samples if with_metrics else per_class * max(1, ctx.num_classes)
    labels = eval_labels(ctx.num_classes, n, per_class)
    start = time.perf_counter()
    order = None if chunks == 1 else eval_chunks(labels, n, chunks)
    samples = module.sample_many(
        labels, specs, num_samples=n, batch_size=batch_size, precision=precision, chunks=order
    )
    seconds = (time.perf_counter() - start) / len(specs)
    return [
        _measure_cell(ctx, datamodule, spec, x, labels, per_class, out_dir, seconds, with_metrics)
        for spec, x in zip(specs, samples)
    ]


def _measure_cell(ctx, datamodule, spec, x, labels, per_class, out_dir, seconds, with_metrics):
    png = out_dir / grid_filename(spec.guidance, spec.variance, spec.steps)
    if ctx.kind == "points":
        title = f"w={spec.guidance:g} {spec.variance} {spec.steps} steps"
        save_points_plot(x, labels, png, truth=datamodule.truth, title=title)
    else:
        per_class = min(per_class, len(x) // max(1, ctx.num_classes))  # a cell stopped early
        sub = _grid_subset(x, ctx.num_classes, per_class)
        save_sample_grid(sub, png, nrow=per_class)
    start = time.perf_counter()
    metrics, replicates = {}, {}
    if with_metrics:
        metrics, replicates = ctx.measure(x, labels, ctx.resamples(len(x), labels, spec.seed))
        metrics = {k: float(v) for k, v in metrics.items()}
        metrics = with_intervals(metrics, replicates, ctx.confidence)
        metrics |= ctx.floor(labels, len(x))
    measured = time.perf_counter() - start
    result = EvalResult(spec, metrics, seconds, png, measured, replicates, samples=len(x))
    log.info("evaluated %s", {k: v for k, v in result.as_dict().items() if k != "image"})
    return result


def eval_chunks(labels: torch.Tensor | None, n: int, chunks: int) -> list[torch.Tensor]:
    """The positions of n samples split into ``chunks`` parts, each with its share of every
    class: the eval labels are class-major, so a prefix would hold the first classes only. Class
    c's positions are split at floor(j * n_c / chunks); without labels, 0..n-1 in order."""
    groups = [torch.arange(n)] if labels is None else by_label(labels)
    parts = [[] for _ in range(chunks)]
    for members in groups:
        bounds = [j * len(members) // chunks for j in range(chunks + 1)]
        for j in range(chunks):
            parts[j].append(members[bounds[j] : bounds[j + 1]])
    return [torch.cat(p) for p in parts]


# What a caller of evaluate_chunked answers after each chunk but the last, given (samples so far,
# their metrics with intervals, their bootstrap replicates): stop the cell here?
ChunkCallback = Callable[[int, dict[str, float], dict[str, torch.Tensor]], bool]


def evaluate_chunked(
    module: DiffusionModule,
    datamodule,
    spec: SamplingSpec,
    eval_cfg,
    out_dir: str | Path,
    *,
    chunks: int,
    on_chunk: ChunkCallback,
    per_class: int = 10,
    batch_size: int = 512,
    precision: str = "auto",
    context: EvalContext | None = None,
) -> EvalResult:
    """One cell, multi-fidelity: its evaluation set drawn in ``chunks`` class-balanced chunks
    (:func:`eval_chunks`), measured on the samples so far after each chunk and handed to
    ``on_chunk``, which may stop it there. A cell drawn to the end is the cell
    :func:`evaluate_group` draws with the same ``chunks`` (same noise, labels and samples). Its
    partial measurements are paired with every other cell's at the same chunk: the same
    positions, labels and noise, and the bootstrap counts of :meth:`EvalContext.resamples` for
    that many samples of the spec's seed. A stopped cell's result is its last partial
    measurement, of the samples it reached (``samples``, ``stopped``)."""
    out_dir = Path(out_dir)
    device = sampling_device(module.cfg)
    module.to(device)
    ctx = context or prepare_context(datamodule, eval_cfg, device=device)
    labels = eval_labels(ctx.num_classes, eval_cfg.num_samples, per_class)
    n = eval_cfg.num_samples if labels is None else len(labels)
    parts = eval_chunks(labels, n, chunks)
    x = done = last = None
    seconds, measuring, stopped = 0.0, 0.0, False
    start = time.perf_counter()
    drawn = module.sample_chunks(
        labels, [spec], num_samples=n, batch_size=batch_size, precision=precision, chunks=parts
    )
    for j, (index, (chunk,)) in enumerate(drawn):
        seconds += time.perf_counter() - start
        if x is None:
            x = torch.empty(n, *chunk.shape[1:], dtype=chunk.dtype)
        x[index] = chunk
        done = index if done is None else torch.cat([done, index])
        if j == len(parts) - 1:
            break
        start = time.perf_counter()
        pos = done.sort().values
        sub = None if labels is None else labels[pos]
        metrics, replicates = ctx.measure(x[pos], sub, ctx.resamples(len(pos), sub, spec.seed))
        metrics = with_intervals(
            {k: float(v) for k, v in metrics.items()}, replicates, ctx.confidence
        )
        measuring += time.perf_counter() - start
        last = metrics, replicates
        if on_chunk(len(pos), metrics, replicates):
            stopped = True
            break
        start = time.perf_counter()
    drawn.close()
    pos = done.sort().values
    sub = None if labels is None else labels[pos]
    # Stopped: its last partial measurement is its result (no second measurement, and no noise
    # floor at a size only stopped cells have); drawn to the end: measured as a grid cell is.
    result = _measure_cell(
        ctx, datamodule, spec, x[pos], sub, per_class, out_dir, seconds, not stopped
    )
    if stopped:
        result.metrics, result.replicates = last
    result.measure_seconds += measuring
    result.stopped = stopped
    return result


def evaluate_module(
    module: DiffusionModule,
    datamodule,
    sample_cfg,
    eval_cfg,
    out_dir: str | Path,
    *,
    with_metrics: bool = True,
    context: EvalContext | None = None,
) -> list[EvalResult]:
    """Every cell of the sample config's lists (:func:`sampling_specs`), in order, drawn in
    :func:`guidance_groups`."""
    device = sampling_device(module.cfg)
    ctx = context or prepare_context(datamodule, eval_cfg, with_metrics, device=device)
    n = eval_cfg.num_samples if with_metrics else sample_cfg.per_class * max(1, ctx.num_classes)
    results: list[EvalResult] = []
    for group in guidance_groups(sampling_specs(sample_cfg), device, n, sample_cfg.batch_size):
        results += evaluate_group(
            module,
            datamodule,
            group,
            eval_cfg,
            out_dir,
            per_class=sample_cfg.per_class,
            batch_size=sample_cfg.batch_size,
            precision=sample_cfg.precision,
            with_metrics=with_metrics,
            context=ctx,
        )
    return results
