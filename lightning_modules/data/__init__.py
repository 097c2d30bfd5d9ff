"""LightningDataModules; nothing is downloaded at run time.

`build_datamodule(cfg)` turns the `data:` config section (`DataConfig`) into one of the
datamodules below. Every datamodule yields `(x, y)` batches (images: float32 (N, C, H, W) in
[-1, 1]; points: float32 (N, 2); y int64 labels) and exposes `name` (an evaluation cache
key), `kind` ("image" or "points"), `num_classes`, `data_shape`, `train_tensors()` and
`val_tensors()`.
"""

from .base import TensorDataModule, stratified_split, to_model_range
from .build import DATAMODULES, DATASET_NAMES, DataSpec, build_datamodule, describe_data
from .config import DataConfig, check_data_config, to_data_config
from .images import (
    Cifar10DataModule,
    DigitsDataModule,
    ImageFolderDataModule,
    MnistDataModule,
)
from .loaders import DatasetNotFoundError
from .toy2d import GaussianMixture2D, GaussianMixtureDataModule

__all__ = [
    "DATAMODULES",
    "DATASET_NAMES",
    "Cifar10DataModule",
    "DataConfig",
    "DataSpec",
    "DatasetNotFoundError",
    "DigitsDataModule",
    "GaussianMixture2D",
    "GaussianMixtureDataModule",
    "ImageFolderDataModule",
    "MnistDataModule",
    "TensorDataModule",
    "build_datamodule",
    "check_data_config",
    "describe_data",
    "stratified_split",
    "to_data_config",
    "to_model_range",
]
