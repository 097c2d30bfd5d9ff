"""The `data:` section of a run config, as an OmegaConf structured dataclass.

Keys are the words users type in sweep YAML (`data.name`, `data.path`, ...). Which `name`
values exist is decided by the datamodule registry in `build.py`, not here, so that the list
is defined once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf


@dataclass
class DataConfig:
    """Everything needed to build one datamodule; unused keys are ignored by other datasets."""

    name: str = "digits"
    # Local directory for file-backed datasets (cifar10, mnist, image_folder); nothing is
    # ever downloaded, so these datasets need it set.
    path: str | None = None
    batch_size: int = 128
    num_workers: int = 0
    # Share of each class held out for validation (digits, image_folder). CIFAR-10 and MNIST
    # use their official train/test files instead.
    val_fraction: float = 0.2
    seed: int = 0
    # image_folder only: square side length in pixels and 1 (grayscale) or 3 (RGB) channels.
    image_size: int = 32
    channels: int = 3
    # Random horizontal flips of training batches (cifar10, image_folder); digits and MNIST
    # are never flipped because a mirrored digit is a different glyph.
    hflip: bool = False
    # gaussian_mixture only: modes equally spaced on a ring, isotropic std.
    n_modes: int = 8
    radius: float = 2.0
    std: float = 0.1
    n_train: int = 8192
    n_val: int = 2048


# The keys each dataset reads beside `name` (its `from_config`): what its runs record, so that a
# digits run shows no `image_size` and a CIFAR-10 run no `n_modes`.
DATASET_KEYS: dict[str, tuple[str, ...]] = {
    "digits": ("batch_size", "num_workers", "val_fraction", "seed"),
    "cifar10": ("path", "batch_size", "num_workers", "hflip"),
    "mnist": ("path", "batch_size", "num_workers"),
    "image_folder": (
        "path",
        "image_size",
        "channels",
        "batch_size",
        "num_workers",
        "val_fraction",
        "seed",
        "hflip",
    ),  # fmt: skip
    "gaussian_mixture": (
        "n_modes",
        "radius",
        "std",
        "n_train",
        "n_val",
        "batch_size",
        "num_workers",
        "seed",
    ),  # fmt: skip
}

# (key, predicate, what was expected); checked in order by `check_data_config`.
_CHECKS: tuple[tuple[str, Any, str], ...] = (
    ("batch_size", lambda v: v >= 1, "an integer >= 1"),
    ("num_workers", lambda v: v >= 0, "an integer >= 0"),
    ("val_fraction", lambda v: 0.0 < v < 1.0, "a number strictly between 0 and 1"),
    ("image_size", lambda v: v >= 1, "an integer >= 1"),
    ("channels", lambda v: v in (1, 3), "1 (grayscale) or 3 (RGB)"),
    ("n_modes", lambda v: v >= 1, "an integer >= 1"),
    ("radius", lambda v: v >= 0.0, "a number >= 0"),
    ("std", lambda v: v > 0.0, "a number > 0"),
    ("n_train", lambda v: v >= 1, "an integer >= 1"),
    ("n_val", lambda v: v >= 1, "an integer >= 1"),
)


def to_data_config(cfg: DataConfig | DictConfig | dict | None = None) -> DataConfig:
    """Merge `cfg` over the defaults, type-check it, and return a plain `DataConfig`.

    Accepts the dataclass, a DictConfig (e.g. the `data` node of a larger config) or a plain
    dict; unknown keys and wrongly typed values raise OmegaConf's errors, which name the key.
    """
    merged = OmegaConf.merge(OmegaConf.structured(DataConfig), cfg or {})
    check_data_config(merged)
    return OmegaConf.to_object(merged)


def check_data_config(cfg: DataConfig | DictConfig, prefix: str = "data") -> None:
    """Raise ValueError naming the key path, the bad value and what was expected."""
    for key, ok, expected in _CHECKS:
        value = getattr(cfg, key)
        if not ok(value):
            raise ValueError(f"{prefix}.{key} = {value!r} is invalid: expected {expected}")
