"""Datamodules: batch format, splits, the known 2-D truth, and the on-disk loaders.

File-backed datasets are tested on tiny fake files written here in the real formats, so
nothing is downloaded.
"""

from __future__ import annotations

import ast
import gzip
import logging
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from lightning_modules.data import (
    DATASET_NAMES,
    DataConfig,
    DatasetNotFoundError,
    GaussianMixture2D,
    build_datamodule,
    stratified_split,
)
from lightning_modules.data.base import BatchTransform

DATA_PACKAGE = Path(__file__).resolve().parents[1] / "lightning_modules" / "data"


# --- digits -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits():
    dm = build_datamodule({"name": "digits", "batch_size": 64, "seed": 0})
    dm.setup("fit")
    return dm


def test_digits_attributes_shapes_and_range(digits):
    assert isinstance(digits, pl.LightningDataModule)
    assert (digits.kind, digits.num_classes, digits.data_shape) == ("image", 10, (1, 8, 8))
    x, y = digits.train_tensors()
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.shape[1:] == (1, 8, 8)
    # The full [-1, 1] range is used: background pixels are -1 and the darkest ink is 1.
    assert x.min().item() == -1.0 and x.max().item() == 1.0
    assert set(y.tolist()) == set(range(10))


def test_digits_split_sizes_are_stratified(digits):
    (_, train_y), (_, val_y) = digits.train_tensors(), digits.val_tensors()
    assert len(train_y) + len(val_y) == 1797
    assert abs(len(val_y) - 0.2 * 1797) <= 10
    val_share = val_y.bincount(minlength=10) / (train_y.bincount(minlength=10) + val_y.bincount())
    assert torch.all((val_share > 0.17) & (val_share < 0.23))


def test_digits_split_is_deterministic_given_seed(digits):
    again = build_datamodule({"name": "digits", "seed": 0})
    other = build_datamodule({"name": "digits", "seed": 1})
    assert torch.equal(again.val_tensors()[0], digits.val_tensors()[0])
    assert torch.equal(again.train_tensors()[1], digits.train_tensors()[1])
    assert not torch.equal(other.val_tensors()[0], digits.val_tensors()[0])
    # The cache key follows the split, so evaluation never reuses another split's statistics.
    assert again.name == digits.name != other.name


def test_dataloaders_yield_documented_batches(digits):
    x, y = next(iter(digits.train_dataloader()))
    assert x.shape == (64, 1, 8, 8) and x.dtype == torch.float32
    assert y.shape == (64,) and y.dtype == torch.int64
    assert x.min() >= -1 and x.max() <= 1
    # Validation is neither shuffled nor augmented: the batches are exactly val_tensors().
    val_x = torch.cat([b[0] for b in digits.val_dataloader()])
    val_y = torch.cat([b[1] for b in digits.val_dataloader()])
    assert torch.equal(val_x, digits.val_tensors()[0])
    assert torch.equal(val_y, digits.val_tensors()[1])


def test_digits_ignore_hflip_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING):
        dm = build_datamodule({"name": "digits", "hflip": True})
    assert not dm.train_dataloader().collate_fn.hflip
    assert "hflip" in caplog.text


@pytest.mark.parametrize("name", ["digits", "gaussian_mixture"])
def test_loaders_pin_memory_only_when_asked(name):
    """A run that trains on CUDA asks for page-locked batches, which copy to the GPU faster."""
    pinned = build_datamodule({"name": name}, pin_memory=True)
    assert pinned.train_dataloader().pin_memory and pinned.val_dataloader().pin_memory
    plain = build_datamodule({"name": name})
    assert not plain.train_dataloader().pin_memory and not plain.val_dataloader().pin_memory


# --- splits and batch transform -----------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    counts=st.lists(st.integers(1, 30), min_size=1, max_size=6),
    val_fraction=st.floats(0.05, 0.95),
    seed=st.integers(0, 2**31),
)
def test_stratified_split_partitions_each_class(counts, val_fraction, seed):
    labels = np.repeat(np.arange(len(counts)), counts)
    train, val = stratified_split(labels, val_fraction, seed)
    assert sorted(np.concatenate([train, val]).tolist()) == list(range(len(labels)))
    for label, count in enumerate(counts):
        n_train = int((labels[train] == label).sum())
        # Every class stays in train; classes of two or more examples also appear in val.
        assert n_train >= 1
        assert (count - n_train >= 1) == (count >= 2)
    again = stratified_split(labels, val_fraction, seed)
    assert np.array_equal(again[1], val)


def test_batch_transform_scales_and_flips_about_half():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (64, 3, 4, 4), dtype=torch.uint8)
    samples = [(img, torch.tensor(i)) for i, img in enumerate(images)]
    x, y = BatchTransform(hflip=True)(samples)
    plain = images.float() / 127.5 - 1
    flipped = torch.tensor([torch.equal(a, b.flip(-1)) for a, b in zip(x, plain)])
    kept = torch.tensor([torch.equal(a, b) for a, b in zip(x, plain)])
    assert torch.all(flipped | kept) and 10 < int(flipped.sum()) < 54
    assert torch.equal(y, torch.arange(64))
    x, _ = BatchTransform(hflip=False)(samples)
    assert torch.equal(x, plain)
    pickle.dumps(BatchTransform(hflip=True))  # needed by num_workers > 0


# --- 2-D Gaussian mixture -----------------------------------------------------------------


@pytest.fixture(scope="module")
def mixture():
    return build_datamodule({"name": "gaussian_mixture", "n_train": 2000, "n_val": 500})


def test_mixture_attributes_and_ring(mixture):
    assert (mixture.kind, mixture.num_classes, mixture.data_shape) == ("points", 8, (2,))
    truth = mixture.truth
    assert truth.means.shape == (8, 2)
    assert torch.allclose(truth.means.norm(dim=1), torch.full((8,), 2.0))
    x, y = mixture.train_tensors()
    assert x.shape == (2000, 2) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert len(mixture.val_tensors()[1]) == 500
    xb, yb = next(iter(mixture.train_dataloader()))
    assert xb.shape == (128, 2) and xb.dtype == torch.float32 and yb.dtype == torch.int64


def test_mixture_labels_are_the_nearest_mode(mixture):
    x, y = mixture.train_tensors()
    assert (mixture.truth.mode_of(x) == y).float().mean() > 0.99
    assert set(y.tolist()) == set(range(8))
    for k in range(8):
        assert torch.allclose(x[y == k].mean(0), mixture.truth.means[k], atol=0.05)


def test_mixture_same_seed_same_data_and_independent_splits(mixture):
    again = build_datamodule({"name": "gaussian_mixture", "n_train": 2000, "n_val": 500})
    other = build_datamodule({"name": "gaussian_mixture", "n_train": 2000, "n_val": 500, "seed": 1})
    more = build_datamodule({"name": "gaussian_mixture", "n_train": 3000, "n_val": 500})
    assert torch.equal(again.train_tensors()[0], mixture.train_tensors()[0])
    assert not torch.equal(other.train_tensors()[0], mixture.train_tensors()[0])
    assert not torch.equal(mixture.train_tensors()[0][:500], mixture.val_tensors()[0])
    # Val is its own stream: drawing more training points leaves it unchanged.
    assert torch.equal(more.val_tensors()[0], mixture.val_tensors()[0])
    assert len({mixture.name, other.name, more.name}) == 3


def test_mixture_log_prob_is_a_normalised_mixture():
    truth = GaussianMixture2D.ring(n_modes=4, radius=1.5, std=0.3)
    far = torch.tensor([[10.0, 10.0]])
    assert torch.all(truth.log_prob(truth.means) > truth.log_prob(far) + 50)
    # log p(x) = logsumexp_k [log w_k + log p(x | k)]  (mixture identity)
    x = torch.randn(50, 2, generator=torch.Generator().manual_seed(0)) * 2
    per_label = torch.stack(
        [truth.log_prob_given_label(x, torch.full((50,), k)) for k in range(4)], dim=1
    )
    expected = torch.logsumexp(per_label + truth.weights.log(), dim=1)
    assert torch.allclose(truth.log_prob(x), expected, atol=1e-5)
    # The density integrates to 1 (Riemann sum on a grid covering every mode).
    grid = torch.linspace(-4, 4, 161)
    cell = (grid[1] - grid[0]) ** 2
    points = torch.cartesian_prod(grid, grid)
    assert math.isclose(float(truth.log_prob(points).exp().sum() * cell), 1.0, abs_tol=1e-3)
    # A single isotropic 2-D Gaussian at its mean: log(1 / (2 pi std^2)).
    at_mean = truth.log_prob_given_label(truth.means[:1], torch.tensor([0]))
    assert math.isclose(at_mean.item(), -math.log(2 * math.pi * 0.09), rel_tol=1e-5)


def test_mixture_sample_respects_labels_and_generator():
    truth = GaussianMixture2D.ring()
    labels = torch.tensor([3, 3, 5, 0])
    x1, y1 = truth.sample(4, labels=labels, generator=torch.Generator().manual_seed(7))
    x2, _ = truth.sample(4, labels=labels, generator=torch.Generator().manual_seed(7))
    assert torch.equal(y1, labels) and torch.equal(x1, x2)
    assert torch.equal(truth.mode_of(x1), labels)


# --- CIFAR-10 -----------------------------------------------------------------------------


def _write_cifar(folder: Path, per_batch: int = 4) -> None:
    folder.mkdir(parents=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for b, name in enumerate(names):
        data = np.zeros((per_batch, 3072), dtype=np.uint8)
        data[:, :1024] = 255  # the red plane comes first in each row
        data[:, -1] = b  # tag the last blue pixel with the batch index
        labels = [(b + i) % 10 for i in range(per_batch)]
        with (folder / name).open("wb") as fh:
            pickle.dump({b"data": data, b"labels": labels}, fh)


@pytest.mark.parametrize("nested", [True, False], ids=["parent_dir", "batches_dir"])
def test_cifar10_reads_pickle_batches(tmp_path, nested):
    _write_cifar(tmp_path / "cifar-10-batches-py")
    path = tmp_path if nested else tmp_path / "cifar-10-batches-py"
    dm = build_datamodule({"name": "cifar10", "path": str(path), "batch_size": 8})
    assert (dm.kind, dm.num_classes, dm.data_shape) == ("image", 10, (3, 32, 32))
    x, y = dm.train_tensors()
    assert x.shape == (20, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.all(x[:, 0] == 1) and torch.all(x[:, 1] == -1)
    # Train is data_batch_1..5 in order, then val is test_batch (tag 5).
    tags = (x[:, 2, -1, -1] * 127.5 + 127.5).round().long()
    assert tags.tolist() == np.repeat(np.arange(5), 4).tolist()
    assert y[:4].tolist() == [0, 1, 2, 3]
    vx, vy = dm.val_tensors()
    assert vx.shape == (4, 3, 32, 32) and vy.tolist() == [5, 6, 7, 8]
    xb, yb = next(iter(dm.train_dataloader()))
    assert xb.shape == (8, 3, 32, 32) and xb.dtype == torch.float32 and yb.dtype == torch.int64


def test_cifar10_hflip_only_on_train(tmp_path):
    _write_cifar(tmp_path / "c")
    dm = build_datamodule({"name": "cifar10", "path": str(tmp_path / "c"), "hflip": True})
    assert dm.train_dataloader().collate_fn.hflip
    assert not dm.val_dataloader().collate_fn.hflip


def test_cifar10_missing_files_name_path_and_files(tmp_path):
    _write_cifar(tmp_path / "cifar-10-batches-py")
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DatasetNotFoundError) as err:
        build_datamodule({"name": "cifar10", "path": str(tmp_path)})
    message = str(err.value)
    assert str(tmp_path) in message and "data_batch_3" in message and "test_batch" in message
    assert "data.path" in message


# --- MNIST --------------------------------------------------------------------------------


def _idx_bytes(array: np.ndarray, magic: int) -> bytes:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write_mnist(folder: Path, gz: bool, n_train: int = 6, n_val: int = 3) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_val)):
        images = np.zeros((n, 28, 28), dtype=np.uint8)
        images[:, 0, 3] = 255  # row 0, column 3: checks row-major order
        arrays[f"{prefix}-images-idx3-ubyte"] = (images, 2051)
        arrays[f"{prefix}-labels-idx1-ubyte"] = (np.arange(n) % 10, 2049)
    for name, (array, magic) in arrays.items():
        data = _idx_bytes(array, magic)
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / name).write_bytes(data)


@pytest.mark.parametrize("gz,subdir", [(False, ""), (True, ""), (True, "MNIST/raw")])
def test_mnist_reads_idx_files(tmp_path, gz, subdir):
    _write_mnist(tmp_path / subdir, gz)
    dm = build_datamodule({"name": "mnist", "path": str(tmp_path), "batch_size": 4})
    assert (dm.kind, dm.num_classes, dm.data_shape) == ("image", 10, (1, 28, 28))
    x, y = dm.train_tensors()
    assert x.shape == (6, 1, 28, 28) and x.dtype == torch.float32
    assert y.tolist() == [0, 1, 2, 3, 4, 5] and y.dtype == torch.int64
    assert (
        torch.all(x[:, 0, 0, 3] == 1) and x[:, 0, 0, :3].eq(-1).all() and x[:, 0, 1:].eq(-1).all()
    )
    assert dm.val_tensors()[1].tolist() == [0, 1, 2]
    xb, yb = next(iter(dm.train_dataloader()))
    assert xb.shape == (4, 1, 28, 28) and yb.dtype == torch.int64


def test_mnist_wrong_magic_number_is_reported(tmp_path):
    _write_mnist(tmp_path, gz=False)
    bad = tmp_path / "train-labels-idx1-ubyte"
    bad.write_bytes(_idx_bytes(np.arange(6), 2051))
    dm = build_datamodule({"name": "mnist", "path": str(tmp_path)})
    with pytest.raises(ValueError, match="magic number 2051, expected 2049"):
        dm.train_tensors()


def test_mnist_missing_files_name_path_and_files(tmp_path):
    with pytest.raises(DatasetNotFoundError) as err:
        build_datamodule({"name": "mnist", "path": str(tmp_path)})
    message = str(err.value)
    assert str(tmp_path) in message and "t10k-labels-idx1-ubyte" in message


# --- image folder -------------------------------------------------------------------------


COLOURS = {"cat": (0, 0, 255), "ant": (255, 0, 0)}


def _write_folder(root: Path, per_class: int = 5) -> None:
    for name, colour in COLOURS.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            ext = "png" if i % 2 else "jpg"
            Image.new("RGB", (12 + i, 10), colour).save(root / name / f"{i}.{ext}")
    (root / "cat" / "notes.txt").write_text("not an image")


def test_image_folder_labels_sorted_classes_and_resizes(tmp_path):
    _write_folder(tmp_path)
    cfg = DataConfig(name="image_folder", path=str(tmp_path), image_size=8, batch_size=4)
    dm = build_datamodule(cfg)
    assert (dm.num_classes, dm.data_shape, dm.class_names) == (2, (3, 8, 8), ("ant", "cat"))
    x, y = dm.train_tensors()
    vx, vy = dm.val_tensors()
    assert x.shape == (8, 3, 8, 8) and vx.shape == (2, 3, 8, 8)
    assert sorted(vy.tolist()) == [0, 1] and y.dtype == torch.int64
    # "ant" (label 0) is red, "cat" (label 1) blue; JPEG is lossy, hence the tolerance.
    red = x[:, 0].mean(dim=(1, 2)) > 0.9
    assert torch.equal(red, y == 0) and torch.all(x[y == 1, 2] > 0.9)
    xb, _ = next(iter(dm.train_dataloader()))
    assert xb.shape == (4, 3, 8, 8) and xb.dtype == torch.float32


def test_image_folder_grayscale(tmp_path):
    _write_folder(tmp_path)
    dm = build_datamodule({"name": "image_folder", "path": str(tmp_path), "channels": 1})
    assert dm.data_shape == (1, 32, 32) and dm.train_tensors()[0].shape[1:] == (1, 32, 32)


def test_image_folder_without_images_is_not_found(tmp_path):
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(DatasetNotFoundError, match="<class_name>"):
        build_datamodule({"name": "image_folder", "path": str(tmp_path)})


# --- config and errors --------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cifar10", "mnist", "image_folder"])
def test_missing_path_errors_name_the_path(tmp_path, name):
    with pytest.raises(DatasetNotFoundError, match="data.path is not set"):
        build_datamodule({"name": name})
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        build_datamodule({"name": name, "path": str(missing)})


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as err:
        build_datamodule({"name": "imagenet"})
    assert "imagenet" in str(err.value)
    assert all(name in str(err.value) for name in DATASET_NAMES)


def test_out_of_range_value_names_the_key():
    with pytest.raises(ValueError, match=r"data\.val_fraction = 1\.5"):
        build_datamodule({"val_fraction": 1.5})


def test_data_package_never_imports_orchestration():
    forbidden = {"ray", "mlflow", "orchestrator"}
    for file in DATA_PACKAGE.glob("*.py"):
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.Import):
                roots = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                roots = {(node.module or "").split(".")[0]}
            else:
                continue
            assert not roots & forbidden, f"{file.name} imports {roots & forbidden}"
