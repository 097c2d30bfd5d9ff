"""Image datamodules: digits (the default), CIFAR-10, MNIST and a labelled image folder.

All yield `(x, y)` with x float32 (N, C, H, W) in [-1, 1] and y int64 labels. File formats are
read by `loaders.py`; this module only decides splits, shapes and cache keys.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import torch

from .base import Split, TensorDataModule, stratified_split
from .config import DataConfig
from .loaders import (
    CIFAR10_CLASSES,
    find_cifar10,
    find_image_folder,
    find_mnist,
    load_cifar10,
    load_images,
    load_mnist,
)

log = logging.getLogger(__name__)

DIGIT_CLASSES = tuple(str(d) for d in range(10))


def _as_split(x: np.ndarray, y: np.ndarray) -> Split:
    return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y.astype(np.int64))


def _no_flip(cfg: DataConfig) -> None:
    # A mirrored digit is a different (or no) glyph, so the flag is ignored, not honoured.
    if cfg.hflip:
        log.warning("data.hflip is ignored for %s: mirrored digits are not digits", cfg.name)


class DigitsDataModule(TensorDataModule):
    """scikit-learn's bundled 8x8 digits (1797 images, 10 classes) as (1, 8, 8) in [-1, 1].

    Small enough to train a DDPM on a laptop CPU; the train/val split is stratified by class
    and fixed by `seed`.
    """

    def __init__(
        self, batch_size: int = 128, num_workers: int = 0, val_fraction: float = 0.2, seed: int = 0
    ) -> None:
        super().__init__(
            name=f"digits-val{val_fraction:g}-seed{seed}",
            dataset="digits",
            num_classes=10,
            data_shape=(1, 8, 8),
            class_names=DIGIT_CLASSES,
            batch_size=batch_size,
            num_workers=num_workers,
        )
        self.val_fraction = val_fraction
        self.seed = seed

    @classmethod
    def from_config(cls, cfg: DataConfig) -> DigitsDataModule:
        _no_flip(cfg)
        return cls(cfg.batch_size, cfg.num_workers, cfg.val_fraction, cfg.seed)

    def load_splits(self) -> tuple[Split, Split]:
        # Imported here: sklearn is slow to import and only this dataset needs it.
        from sklearn.datasets import load_digits

        digits = load_digits()
        # Pixel values are integers 0..16, so the [-1, 1] scaling divides by 8, not 127.5.
        x = (digits.images[:, None] / 8.0 - 1.0).astype(np.float32)
        y = digits.target.astype(np.int64)
        train, val = stratified_split(y, self.val_fraction, self.seed)
        return _as_split(x[train], y[train]), _as_split(x[val], y[val])


class Cifar10DataModule(TensorDataModule):
    """CIFAR-10 from the python pickle batches: train = data_batch_1..5, val = test_batch."""

    def __init__(
        self, path: str | None, batch_size: int = 128, num_workers: int = 0, hflip: bool = False
    ) -> None:
        # Look for the files now so a wrong data.path fails before training starts.
        self.root = find_cifar10(path)
        super().__init__(
            name="cifar10",
            dataset="cifar10",
            num_classes=10,
            data_shape=(3, 32, 32),
            class_names=CIFAR10_CLASSES,
            batch_size=batch_size,
            num_workers=num_workers,
            hflip=hflip,
        )

    @classmethod
    def from_config(cls, cfg: DataConfig) -> Cifar10DataModule:
        return cls(cfg.path, cfg.batch_size, cfg.num_workers, cfg.hflip)

    def load_splits(self) -> tuple[Split, Split]:
        train, val = load_cifar10(self.root)
        return _as_split(*train), _as_split(*val)


class MnistDataModule(TensorDataModule):
    """MNIST from the four IDX files (plain or gzipped): train = train-*, val = t10k-*."""

    def __init__(self, path: str | None, batch_size: int = 128, num_workers: int = 0) -> None:
        self.files = find_mnist(path)
        super().__init__(
            name="mnist",
            dataset="mnist",
            num_classes=10,
            data_shape=(1, 28, 28),
            class_names=DIGIT_CLASSES,
            batch_size=batch_size,
            num_workers=num_workers,
        )

    @classmethod
    def from_config(cls, cfg: DataConfig) -> MnistDataModule:
        _no_flip(cfg)
        return cls(cfg.path, cfg.batch_size, cfg.num_workers)

    def load_splits(self) -> tuple[Split, Split]:
        train, val = load_mnist(self.files)
        return _as_split(*train), _as_split(*val)


class ImageFolderDataModule(TensorDataModule):
    """Labelled images in `path/<class_name>/*.png|jpg|jpeg`; classes sorted -> labels 0..K-1.

    Images are centre-cropped to a square and resized to `image_size`, in RGB (`channels=3`)
    or grayscale (`channels=1`); the train/val split is stratified by class and fixed by `seed`.
    """

    def __init__(
        self,
        path: str | None,
        image_size: int = 32,
        channels: int = 3,
        batch_size: int = 128,
        num_workers: int = 0,
        val_fraction: float = 0.2,
        seed: int = 0,
        hflip: bool = False,
    ) -> None:
        classes, self.items = find_image_folder(path)
        root = Path(str(path)).expanduser().resolve()
        # The folder's absolute path is hashed into the cache key so two folders that share a
        # basename never share cached evaluation statistics.
        digest = hashlib.sha1(str(root).encode()).hexdigest()[:8]
        super().__init__(
            name=f"image_folder-{root.name}-{digest}-{image_size}px-c{channels}"
            f"-val{val_fraction:g}-seed{seed}",
            dataset="image_folder",
            num_classes=len(classes),
            data_shape=(channels, image_size, image_size),
            class_names=tuple(classes),
            batch_size=batch_size,
            num_workers=num_workers,
            hflip=hflip,
        )
        self.image_size, self.channels = image_size, channels
        self.val_fraction, self.seed = val_fraction, seed

    @classmethod
    def from_config(cls, cfg: DataConfig) -> ImageFolderDataModule:
        return cls(
            cfg.path,
            image_size=cfg.image_size,
            channels=cfg.channels,
            batch_size=cfg.batch_size,
            num_workers=cfg.num_workers,
            val_fraction=cfg.val_fraction,
            seed=cfg.seed,
            hflip=cfg.hflip,
        )

    def load_splits(self) -> tuple[Split, Split]:
        x = load_images(self.items, self.image_size, self.channels)
        y = np.array([label for _, label in self.items], dtype=np.int64)
        train, val = stratified_split(y, self.val_fraction, self.seed)
        return _as_split(x[train], y[train]), _as_split(x[val], y[val])
