"""`data.name` -> datamodule class: the one list of datasets, used to build and to validate."""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import DictConfig

from .base import TensorDataModule
from .config import DataConfig, to_data_config
from .images import (
    Cifar10DataModule,
    DigitsDataModule,
    ImageFolderDataModule,
    MnistDataModule,
)
from .toy2d import GaussianMixtureDataModule

DATAMODULES: dict[str, type[TensorDataModule]] = {
    "digits": DigitsDataModule,
    "gaussian_mixture": GaussianMixtureDataModule,
    "cifar10": Cifar10DataModule,
    "mnist": MnistDataModule,
    "image_folder": ImageFolderDataModule,
}
DATASET_NAMES: tuple[str, ...] = tuple(DATAMODULES)


def build_datamodule(
    cfg: DataConfig | DictConfig | dict | None = None, *, pin_memory: bool = False
) -> TensorDataModule:
    """The datamodule `cfg` describes (defaults: the digits dataset). `pin_memory`: batches
    in page-locked memory, for a run that trains on CUDA (the `train:` section decides that).

    Raises ValueError for an unknown `data.name` or an out-of-range value, and
    `DatasetNotFoundError` when a file-backed dataset is not where `data.path` says.
    """
    cfg = to_data_config(cfg)
    if cfg.name not in DATAMODULES:
        raise ValueError(
            f"data.name = {cfg.name!r} is not a known dataset: expected one of "
            f"{', '.join(DATASET_NAMES)}"
        )
    datamodule = DATAMODULES[cfg.name].from_config(cfg)
    datamodule.pin_memory = pin_memory
    return datamodule


@dataclass(frozen=True)
class DataSpec:
    """What a network must fit, from the `data:` config alone: no file is read. The attribute
    names are a datamodule's, so either can be passed where one is needed."""

    name: str
    kind: str  # "image" or "points"
    data_shape: tuple[int, ...]
    num_classes: int | None  # None: an image folder's subfolders decide, on the machine that has it


def describe_data(cfg: DataConfig | DictConfig | dict | None = None) -> DataSpec:
    """The shape of one example and the number of classes that `cfg` would give; checks the
    name and the options (not the files, which may live on other machines)."""
    cfg = to_data_config(cfg)
    fixed = {
        "digits": ("image", (1, 8, 8), 10),
        "cifar10": ("image", (3, 32, 32), 10),
        "mnist": ("image", (1, 28, 28), 10),
        "gaussian_mixture": ("points", (2,), cfg.n_modes),
        "image_folder": ("image", (cfg.channels, cfg.image_size, cfg.image_size), None),
    }
    if cfg.name not in DATAMODULES:
        raise ValueError(
            f"data.name = {cfg.name!r} is not a known dataset: expected one of "
            f"{', '.join(DATASET_NAMES)}"
        )
    kind, shape, classes = fixed[cfg.name]
    return DataSpec(cfg.name, kind, shape, classes)
