"""The run config: everything a user sets, as OmegaConf structured dataclasses.

Keys are the words users type in YAML (``diffusion.schedule``, ``sample.guidance``). The lists of
valid values come from the modules that own them (``SCHEDULES``, ``VARIANCES``, ``SAMPLERS``, ...),
so they are defined once. The ``sample`` section holds the sampling-time choices: one trained
checkpoint can be sampled with all of them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .data.config import DataConfig, check_data_config
from .diffusion import SAMPLERS, SCHEDULES, THRESHOLDS, VARIANCES, Prediction
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


@dataclass
class EvalConfig:
    num_samples: int = 500  # samples per (guidance, variance, steps) cell for the metrics
    classifier_seed: int = 0
    cache_dir: str | None = None  # default: $DDPM_SWEEP_CACHE or ~/.cache/ddpm-sweep
    inception_weights: str | None = None  # local Inception weights for a standard FID


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
    """A bad value in a user's config: the message names the source, key path and expectation."""


def load_config(
    source: str | Path | dict | DictConfig | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    where: str | None = None,
) -> DictConfig:
    """Defaults <- a YAML file (or mapping) <- ``key=value`` overrides; type-checked, validated."""
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
        key = getattr(err, "full_key", None)
        raise ConfigError(
            f"{where}: {key or ''}: {err.msg if hasattr(err, 'msg') else err}"
        ) from None
    validate_config(cfg, where)
    return cfg


def omegaconf_message(err: OmegaConfBaseException) -> str:
    """`key.path: first line of OmegaConf's message` (it says "Did you mean" for typos)."""
    msg = str(getattr(err, "msg", None) or err).splitlines()[0]
    return f"{getattr(err, 'full_key', None) or '?'}: {msg}"


def _expect(ok: bool, where: str, key: str, value: Any, expected: str) -> None:
    if not ok:
        raise ConfigError(f"{where}: {key} = {value!r} is invalid: expected {expected}")


def _one_of(where: str, key: str, value: Any, choices) -> None:
    _expect(value in choices, where, key, value, f"one of {sorted(choices)}")


def validate_config(cfg: DictConfig, where: str = "config") -> None:
    """Check every value a user can get wrong, naming the key path (``sample.guidance[2]``)."""
    d, t, s = cfg.diffusion, cfg.train, cfg.sample
    try:
        check_data_config(cfg.data)
    except ValueError as err:
        raise ConfigError(f"{where}: {err}") from None
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
    validate_sample_config(s, d.timesteps, where)
    _expect(cfg.eval.num_samples >= 1, where, "eval.num_samples", cfg.eval.num_samples, ">= 1")


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


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg)
