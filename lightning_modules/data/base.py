"""What every datamodule here shares: in-memory splits, the batch format and the split rule.

Batches are `(x, y)`: x float32, images (N, C, H, W) in [-1, 1] or points (N, 2); y int64.
Image splits are kept in memory as uint8 (CIFAR-10 train is 150 MB instead of 600 MB as
float32) and converted per batch by `BatchTransform`, which also applies the optional random
horizontal flip. Splits are loaded on first use (`setup`, a dataloader, or `*_tensors()`), so
building a datamodule stays cheap.
"""

from __future__ import annotations

import logging

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset, default_collate

log = logging.getLogger(__name__)

Split = tuple[torch.Tensor, torch.Tensor]


def to_model_range(x: torch.Tensor) -> torch.Tensor:
    """uint8 pixels 0..255 -> float32 in [-1, 1]; float tensors are already model-ready."""
    if x.is_floating_point():
        return x.float()
    return x.float() / 127.5 - 1.0


def random_hflip(x: torch.Tensor) -> torch.Tensor:
    """Mirror each image of (N, C, H, W) left-right with probability 1/2."""
    flip = torch.rand(x.shape[0]) < 0.5
    x = x.clone()
    x[flip] = x[flip].flip(-1)
    return x


class BatchTransform:
    """collate_fn: stack samples, scale to the model range, optionally flip (picklable)."""

    def __init__(self, hflip: bool = False) -> None:
        self.hflip = hflip

    def __call__(self, samples: list[tuple[torch.Tensor, torch.Tensor]]) -> Split:
        x, y = default_collate(samples)
        x = to_model_range(x)
        return (random_hflip(x) if self.hflip else x), y


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, ...]:
    """(train_idx, val_idx): per class, a seeded shuffle then the first share goes to val.

    Done by hand rather than with sklearn's `train_test_split(stratify=...)`, which refuses
    classes with a single example (common in small image folders); such a class stays in
    train. Every class with at least two examples keeps at least one in each split.
    """
    rng = np.random.default_rng(seed)
    train, val = [], []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        n_val = int(round(val_fraction * len(members)))
        n_val = min(max(n_val, 1), len(members) - 1) if len(members) > 1 else 0
        val.append(members[:n_val])
        train.append(members[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


class TensorDataModule(pl.LightningDataModule):
    """A datamodule whose splits fit in memory; subclasses implement `load_splits`.

    Attributes other code relies on: `name` (a cache key that changes whenever the tensors
    would), `dataset` (the `data.name` it was built from), `kind` ("image" or "points"),
    `num_classes`, `data_shape` (one example's shape) and `class_names`. `pin_memory` makes
    the loaders hand out batches in page-locked memory, which a run that trains on CUDA copies
    to the GPU faster; it is not a `data:` key because the accelerator decides it.
    """

    kind: str = "image"

    def __init__(
        self,
        *,
        name: str,
        dataset: str,
        num_classes: int,
        data_shape: tuple[int, ...],
        class_names: tuple[str, ...],
        batch_size: int,
        num_workers: int = 0,
        hflip: bool = False,
        pin_memory: bool = False,
    ) -> None:
        super().__init__()
        self.name = name
        self.dataset = dataset
        self.num_classes = num_classes
        self.data_shape = tuple(data_shape)
        self.class_names = tuple(class_names)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.hflip = hflip
        self.pin_memory = pin_memory
        self._splits: tuple[Split, Split] | None = None

    def load_splits(self) -> tuple[Split, Split]:
        """((train_x, train_y), (val_x, val_y)); x uint8 or float32 in the model range."""
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if self._splits is None:
            self._splits = self.load_splits()
            (train_x, _), (val_x, _) = self._splits
            shape = tuple(train_x.shape[1:])
            log.info(
                "%s: %d train / %d val of shape %s", self.name, len(train_x), len(val_x), shape
            )

    def _split(self, index: int) -> Split:
        self.setup()
        return self._splits[index]

    def train_tensors(self) -> Split:
        """The whole training split as (x float32 in the model range, y int64); no flips."""
        x, y = self._split(0)
        return to_model_range(x), y

    def val_tensors(self) -> Split:
        """The whole validation split as (x float32 in the model range, y int64)."""
        x, y = self._split(1)
        return to_model_range(x), y

    def _loader(self, split: Split, train: bool) -> DataLoader:
        return DataLoader(
            TensorDataset(*split),
            batch_size=self.batch_size,
            shuffle=train,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=self.pin_memory,
            collate_fn=BatchTransform(hflip=self.hflip and train),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self._split(0), train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self._split(1), train=False)
