"""The run config: everything a user sets, as OmegaConf structured dataclasses.

Keys are the words users type in YAML (``diffusion.schedule``, ``sample.guidance``). The lists of
valid values come from the modules that own them (``SCHEDULES``, ``VARIANCES``, ``SAMPLERS``, ...),
so they are defined once. The ``sample`` section holds the sampling-time choices: one trained
checkpoint can be sampled with all of them.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from .data.config import DataConfig, check_data_config
from .diffusion import (
    SAMPLERS,
    SAMPLING_SPEC_KEYS,
    SCHEDULES,
    THRESHOLDS,
    VARIANCES,
    Prediction,
    SamplingSpec,
)
from .diffusion.timesteps import TIMESTEP_SAMPLERS


@dataclass
class DiffusionConfig:
    schedule: str = "cosine"
    timesteps: int = 1000
    zero_terminal_snr: bool = False
    prediction: str = "eps"
    # Training-time: `learned_range` doubles the network's output and trains with the hybrid
    # loss; the fixed choices train with L_simple and are picked again at sampling time.
    variance: str = "fixed_small"
    timestep_sampling: str = "uniform"
    lambda_vlb: float = 0.001


@dataclass
class TrainConfig:
    max_steps: int = 2000
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 100
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    p_uncond: float = 0.1
    precision: str = "auto"  # auto: bf16-mixed on a GPU, 32-true on a CPU
    compile: bool = False
    seed: int = 0
    val_every_n_steps: int = 500
    bpd_subset: int = 32  # samples of the first validation batch for the NLL bound; 0 = off
    accelerator: str = "auto"
    devices: int = 1
    log_every_n_steps: int = 25


@dataclass
class SampleConfig:
    guidance: list[float] = field(default_factory=lambda: [0.0, 1.0, 3.0])
    variance: list[str] = field(default_factory=lambda: ["fixed_small", "fixed_large"])
    steps: list[int] = field(default_factory=lambda: [50])
    sampler: str = "ancestral"
    eta: float = 0.0
    guidance_rescale: float = 0.0
    guidance_interval: list[float] | None = None
    threshold: str = "auto"  # auto: clip x̂_0 to [-1, 1] for images, none for 2-D points
    per_class: int = 10  # samples per class in each PNG grid row
    seed: int = 0
    batch_size: int = 512
    precision: str = "auto"  # the network's precision when sampling: auto (bf16 on GPUs), 32, bf16


# The sampling-time keys are the fields of SampleConfig: the SamplingSpec fields (one value each
# per cell; guidance, variance and steps take lists, a grid evaluated from one checkpoint) and
# how cells are run and drawn (not what they sample): batch size and grid rows.
CELL_LISTS = ("guidance", "variance", "steps")
EXECUTION_KEYS = ("per_class", "batch_size", "precision")
SAMPLE_PRECISIONS = ("auto", "32", "bf16")


def sampling_specs(sample_cfg) -> list[SamplingSpec]:
    """The cells of a ``sample`` config: one SamplingSpec per (variance, steps, guidance) of its
    lists, in that order, with its scalar settings."""
    scalars = {k: sample_cfg[k] for k in SAMPLING_SPEC_KEYS if k not in CELL_LISTS}
    if scalars.get("guidance_interval") is not None:
        scalars["guidance_interval"] = tuple(scalars["guidance_interval"])
    return [
        SamplingSpec(guidance=float(w), variance=str(v), steps=int(k), **scalars)
        for v in sample_cfg.variance
        for k in sample_cfg.steps
        for w in sample_cfg.guidance
    ]


@dataclass
class PeriodicEvalConfig:
    """Sample quality during training: at every ``every_n_steps``-th step (a multiple of
    ``train.val_every_n_steps``: it runs at a validation, with the EMA weights), each of
    ``cells`` is sampled (``num_samples``) and measured; logged as ``eval/<metric>`` (the first
    cell) and ``eval/<metric>/<cell>`` (the others) against the step, and reported to Tune."""

    every_n_steps: int = 0  # 0: off
    num_samples: int = 100
    # Each cell: `sample` keys with one value each (guidance, steps, variance, sampler, eta, ...);
    # unset keys: the conditional cell (w = 1), min(10, T) steps, the `sample` section's first
    # variance and its scalars.
    cells: list[Any] = field(default_factory=lambda: [{}])


@dataclass
class EvalConfig:
    num_samples: int = 500  # samples per (guidance, variance, steps) cell for the metrics
    bootstrap: int = 200  # resamples for each metric's interval and the paired comparisons; 0 = off
    confidence: float = 0.95  # of the intervals and of "within noise of the best"
    floor_draws: int = 5  # real draws of num_samples scored like a cell: the noise floor; 0 = off
    min_effect: float | None = None  # the smallest quality difference `plan` checks n can see
    classifier_seed: int = 0
    cache_dir: str | None = None  # default: $DDPM_SWEEP_CACHE or ~/.cache/ddpm-sweep
    inception_weights: str | None = None  # local Inception weights for a standard FID
    periodic: PeriodicEvalConfig = field(default_factory=PeriodicEvalConfig)


@dataclass
class ExperimentConfig:
    name: str = "ddpm"
    data: DataConfig = field(default_factory=DataConfig)
    # `name: unet` (default for images; `preset`, default `digits`, plus any UNetConfig key) or
    # `name: mlp` (default for 2-D points). The data decides channels, size and classes, the
    # diffusion config whether the variance is learned.
    network: Any = field(default_factory=dict)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


class ConfigError(ValueError):
    """A bad value in a user's config: the message names the source, key path and expectation.

    ``key`` is the key path as the user wrote it (``base.train.lr``, ``search.sample.steps[2]``),
    so a caller that knows where that key stands in a file can point at it.
    """

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


def join_key(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix and key else (prefix or key)


def config_keys(node: Any = ..., prefix: str = "") -> list[str]:
    """Every key path of the run config (``train.lr``, ``sample.guidance``, ...)."""
    if node is ...:
        node = OmegaConf.to_container(OmegaConf.structured(ExperimentConfig))
    if isinstance(node, (dict, DictConfig)):
        out = []
        for k, v in node.items():
            out += config_keys(v, f"{prefix}.{k}" if prefix else str(k))
        return out or [prefix]
    return [prefix]


def did_you_mean(key: str, known, prefix: str = "") -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    return f"; did you mean {join_key(prefix, close[0])!r}?" if close else ""


def config_error(
    err: OmegaConfBaseException, where: str, prefix: str = "", known=None
) -> ConfigError:
    """OmegaConf's error as one line: the key path as written, and what was wrong. ``known``:
    the valid keys below ``prefix`` (default: the run config's), for a "did you mean"."""
    key = str(getattr(err, "full_key", None) or "")
    path = join_key(prefix, key)
    if isinstance(err, ConfigKeyError) and key:
        known = known or [k for k in config_keys() if k != "network"]
        return ConfigError(
            f"{where}: {path}: unknown config key{did_you_mean(key, known, prefix)}", path
        )
    msg = str(getattr(err, "msg", None) or err).splitlines()[0]
    return ConfigError(f"{where}: {path or '?'}: {msg}", path or None)


def load_config(
    source: str | Path | dict | DictConfig | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    where: str | None = None,
    prefix: str = "",
) -> DictConfig:
    """Defaults <- a YAML file (or mapping) <- ``key=value`` overrides; type-checked, validated.
    ``prefix`` is where the config stands in the user's file (``base`` in a sweep file): every
    key path in an error starts with it."""
    where = where or (str(source) if isinstance(source, (str, Path)) else "config")
    try:
        cfg = OmegaConf.structured(ExperimentConfig)
        if isinstance(source, (str, Path)):
            if not Path(source).is_file():
                raise ConfigError(f"{source}: no such config file")
            cfg = OmegaConf.merge(cfg, OmegaConf.load(source))
        elif source is not None:
            cfg = OmegaConf.merge(cfg, source)
        if overrides:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as err:
        raise config_error(err, where, prefix) from None
    validate_config(cfg, where, prefix)
    return cfg


def omegaconf_message(err: OmegaConfBaseException) -> str:
    """`key.path: first line of OmegaConf's message` (it says "Did you mean" for typos)."""
    msg = str(getattr(err, "msg", None) or err).splitlines()[0]
    return f"{getattr(err, 'full_key', None) or '?'}: {msg}"


def _expect(ok: bool, where: str, key: str, value: Any, expected: str) -> None:
    if not ok:
        raise ConfigError(f"{where}: {key} = {value!r} is invalid: expected {expected}", key)


_expect_at = _expect


def _one_of(where: str, key: str, value: Any, choices) -> None:
    _expect(value in choices, where, key, value, f"one of {sorted(choices)}")


def validate_config(cfg: DictConfig, where: str = "config", prefix: str = "") -> None:
    """Check every value a user can get wrong, naming the key path (``sample.guidance[2]``) as
    the user wrote it (``prefix``: where the config stands in the file, e.g. ``base``)."""
    d, t, s = cfg.diffusion, cfg.train, cfg.sample

    def _expect(ok: bool, where: str, key: str, value: Any, expected: str) -> None:
        _expect_at(ok, where, join_key(prefix, key), value, expected)

    def _one_of(where: str, key: str, value: Any, choices) -> None:
        _expect(value in choices, where, key, value, f"one of {sorted(choices)}")

    try:
        check_data_config(cfg.data, join_key(prefix, "data"))
    except ValueError as err:
        raise ConfigError(f"{where}: {err}", str(err).split(" ", 1)[0]) from None
    _one_of(where, "diffusion.schedule", d.schedule, SCHEDULES)
    _expect(d.timesteps >= 1, where, "diffusion.timesteps", d.timesteps, "an integer >= 1")
    _one_of(where, "diffusion.prediction", d.prediction, [p.value for p in Prediction])
    _one_of(where, "diffusion.variance", d.variance, VARIANCES)
    _one_of(where, "diffusion.timestep_sampling", d.timestep_sampling, TIMESTEP_SAMPLERS)
    _expect(d.lambda_vlb >= 0, where, "diffusion.lambda_vlb", d.lambda_vlb, "a number >= 0")
    _expect(t.max_steps >= 1, where, "train.max_steps", t.max_steps, "an integer >= 1")
    _expect(t.lr > 0, where, "train.lr", t.lr, "a number > 0")
    _expect(t.warmup_steps >= 0, where, "train.warmup_steps", t.warmup_steps, "an integer >= 0")
    _expect(t.grad_clip >= 0, where, "train.grad_clip", t.grad_clip, "a number >= 0 (0 = off)")
    _expect(0 <= t.ema_decay < 1, where, "train.ema_decay", t.ema_decay, "a number in [0, 1)")
    _expect(0 <= t.p_uncond <= 1, where, "train.p_uncond", t.p_uncond, "a number in [0, 1]")
    _one_of(where, "train.precision", t.precision, ["auto", "32-true", "bf16-mixed", "16-mixed"])
    _expect(t.val_every_n_steps >= 1, where, "train.val_every_n_steps", t.val_every_n_steps, ">= 1")
    _expect(t.bpd_subset >= 0, where, "train.bpd_subset", t.bpd_subset, "an integer >= 0")
    validate_sample_config(s, d.timesteps, where, join_key(prefix, "sample"))
    validate_eval_config(cfg.eval, where, join_key(prefix, "eval"))
    validate_periodic(cfg, where, prefix)


def periodic_specs(cfg) -> list[SamplingSpec]:
    """The cells of ``eval.periodic``: each cell's keys over the defaults (the conditional cell
    at min(10, T) steps; unconditional for a model that never sees labels, p_uncond = 1), the
    ``sample`` section's first variance and its scalar settings."""
    s = cfg.sample
    base = {k: s[k] for k in SAMPLING_SPEC_KEYS if k not in CELL_LISTS}
    if base.get("guidance_interval") is not None:
        base["guidance_interval"] = tuple(base["guidance_interval"])
    base |= {
        "variance": str(s.variance[0]),
        "steps": min(10, cfg.diffusion.timesteps),
        "guidance": 1.0 if cfg.train.p_uncond < 1 else 0.0,
    }
    specs = []
    for cell in cfg.eval.periodic.cells:
        fields = dict(OmegaConf.to_container(cell) if isinstance(cell, DictConfig) else cell)
        specs.append(SamplingSpec(**(base | fields)))
    return specs


def validate_periodic(cfg, where: str = "config", prefix: str = "") -> None:
    """``eval.periodic``: its schedule against validation, and each cell's keys and values
    against the training (steps <= T, guidance needs p_uncond > 0, ...)."""
    from .diffusion import GaussianDiffusion, get_variance

    p, t = cfg.eval.periodic, cfg.train
    key = join_key(prefix, "eval.periodic")
    _expect(p.every_n_steps >= 0, where, f"{key}.every_n_steps", p.every_n_steps, ">= 0 (0: off)")
    _expect(
        p.every_n_steps % t.val_every_n_steps == 0,
        where,
        f"{key}.every_n_steps",
        p.every_n_steps,
        f"0 (off) or a multiple of train.val_every_n_steps = {t.val_every_n_steps} (it runs at "
        "a validation, with the EMA weights)",
    )
    _expect(p.num_samples >= 1, where, f"{key}.num_samples", p.num_samples, "an integer >= 1")
    cells = p.cells
    _expect(
        isinstance(cells, (list, ListConfig)) and len(cells) > 0,
        where,
        f"{key}.cells",
        cells,
        "a non-empty list of cells, each a mapping of sample keys (e.g. [{guidance: 1, steps: "
        "10}])",
    )
    allowed = list(SAMPLING_SPEC_KEYS)
    for i, cell in enumerate(cells):
        at = f"{key}.cells[{i}]"
        if not isinstance(cell, (dict, DictConfig)):
            raise ConfigError(
                f"{where}: {at} = {cell!r} is invalid: expected a mapping of sample keys "
                f"({', '.join(allowed)})",
                at,
            )
        for k in cell:
            if k not in allowed:
                raise ConfigError(
                    f"{where}: {at}.{k}: not a sampling key{did_you_mean(str(k), allowed, at)} "
                    f"(expected one of {', '.join(allowed)})",
                    f"{at}.{k}",
                )
    process = GaussianDiffusion.from_schedule(cfg.diffusion.schedule, cfg.diffusion.timesteps)
    for i, spec in enumerate(periodic_specs(cfg)):
        at = f"{key}.cells[{i}]"
        try:
            spec.check(process)
        except (ValueError, TypeError) as err:
            raise ConfigError(f"{where}: {at} is invalid: {err}", at) from None
        if get_variance(spec.variance).learned and not get_variance(cfg.diffusion.variance).learned:
            raise ConfigError(
                f"{where}: {at}.variance = {spec.variance!r} needs a model trained with "
                "diffusion.variance = 'learned_range'",
                f"{at}.variance",
            )
        if (spec.guidance != 1 and t.p_uncond <= 0) or (spec.guidance != 0 and t.p_uncond >= 1):
            raise ConfigError(
                f"{where}: {at}.guidance = {spec.guidance:g} needs the "
                f"{'un' if t.p_uncond <= 0 else ''}conditional model, which train.p_uncond = "
                f"{t.p_uncond:g} never trains",
                f"{at}.guidance",
            )


def validate_eval_config(e, where: str = "config", prefix: str = "eval") -> None:
    _expect(e.num_samples >= 1, where, f"{prefix}.num_samples", e.num_samples, ">= 1")
    _expect(
        e.bootstrap == 0 or e.bootstrap >= 20,
        where,
        f"{prefix}.bootstrap",
        e.bootstrap,
        "0 (off) or an integer >= 20 (resamples; 200 is the default)",
    )
    _expect(
        0 < e.confidence < 1,
        where,
        f"{prefix}.confidence",
        e.confidence,
        "a number in (0, 1), e.g. 0.95",
    )
    _expect(e.floor_draws >= 0, where, f"{prefix}.floor_draws", e.floor_draws, "an integer >= 0")
    _expect(
        e.floor_draws != 1,
        where,
        f"{prefix}.floor_draws",
        e.floor_draws,
        "0 (off) or >= 2 (a spread needs two draws)",
    )
    _expect(
        e.min_effect is None or e.min_effect > 0,
        where,
        f"{prefix}.min_effect",
        e.min_effect,
        "a number > 0, or null",
    )


def validate_sample_config(
    s, timesteps: int, where: str = "config", prefix: str = "sample"
) -> None:
    for key in ("guidance", "variance", "steps"):
        values = s[key]
        _expect(
            isinstance(values, (list, ListConfig)) and len(values) > 0,
            where,
            f"{prefix}.{key}",
            values,
            "a non-empty list",
        )
    for i, w in enumerate(s.guidance):
        _expect(
            isinstance(w, (int, float)) and math.isfinite(w),
            where,
            f"{prefix}.guidance[{i}]",
            w,
            "a finite number (0 unconditional, 1 conditional)",
        )
    for i, v in enumerate(s.variance):
        _one_of(where, f"{prefix}.variance[{i}]", v, VARIANCES)
    for i, k in enumerate(s.steps):
        _expect(
            isinstance(k, int) and 1 <= k <= timesteps,
            where,
            f"{prefix}.steps[{i}]",
            k,
            f"an integer in [1, diffusion.timesteps={timesteps}]",
        )
    _one_of(where, f"{prefix}.sampler", s.sampler, SAMPLERS)
    _expect(0 <= s.eta <= 1, where, f"{prefix}.eta", s.eta, "a number in [0, 1]")
    _expect(
        0 <= s.guidance_rescale <= 1,
        where,
        f"{prefix}.guidance_rescale",
        s.guidance_rescale,
        "a number in [0, 1]",
    )
    gi = s.guidance_interval
    _expect(
        gi is None or (len(gi) == 2 and 0 <= gi[0] <= gi[1] <= 1),
        where,
        f"{prefix}.guidance_interval",
        gi,
        "null or [lo, hi] with 0 <= lo <= hi <= 1",
    )
    _one_of(where, f"{prefix}.threshold", s.threshold, ["auto", *THRESHOLDS])
    _expect(s.per_class >= 1, where, f"{prefix}.per_class", s.per_class, "an integer >= 1")
    _expect(s.batch_size >= 1, where, f"{prefix}.batch_size", s.batch_size, "an integer >= 1")
    _one_of(where, f"{prefix}.precision", s.precision, SAMPLE_PRECISIONS)


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg)
