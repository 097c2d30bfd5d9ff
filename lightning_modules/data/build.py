"""`data.name` -> datamodule class: the one list of datasets, used to build and to validate."""

from __future__ import annotations

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


def build_datamodule(cfg: DataConfig | DictConfig | dict | None = None) -> TensorDataModule:
    """The datamodule `cfg` describes (defaults: the digits dataset).

    Raises ValueError for an unknown `data.name` or an out-of-range value, and
    `DatasetNotFoundError` when a file-backed dataset is not where `data.path` says.
    """
    cfg = to_data_config(cfg)
    if cfg.name not in DATAMODULES:
        raise ValueError(
            f"data.name = {cfg.name!r} is not a known dataset: expected one of "
            f"{', '.join(DATASET_NAMES)}"
        )
    return DATAMODULES[cfg.name].from_config(cfg)
