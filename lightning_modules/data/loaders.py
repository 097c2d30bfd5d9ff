"""Readers for the on-disk formats: CIFAR-10 pickle batches, MNIST IDX files, image folders.

Each `find_*` function only checks that the files are there (cheap, so datamodules call it in
their constructor and a bad `data.path` fails before any training starts); each `load_*`
function reads them into uint8 numpy arrays of shape (N, C, H, W) plus int64 labels. Nothing
here downloads anything.
"""

from __future__ import annotations

import gzip
import logging
import pickle
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

CIFAR10_DIRNAME = "cifar-10-batches-py"
CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_VAL_FILE = "test_batch"
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip

# Role -> file name; each may also be gzipped (`<name>.gz`).
MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "val_images": "t10k-images-idx3-ubyte",
    "val_labels": "t10k-labels-idx1-ubyte",
}
# The IDX magic number is 0x0000 0x08 (unsigned byte) <ndim>: 2051 for images, 2049 for labels.
IDX_IMAGES_MAGIC = 2051
IDX_LABELS_MAGIC = 2049

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


class DatasetNotFoundError(FileNotFoundError):
    """A file-backed dataset is missing; the message says what to put where."""


def _path_or_raise(path: str | Path | None, what: str, expected: str) -> Path:
    """Return `path` as an existing directory, or raise with the fix spelled out."""
    if path is None:
        raise DatasetNotFoundError(
            f"{what} is read from local files but data.path is not set: "
            f"expected {expected} (set data.path)"
        )
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DatasetNotFoundError(
            f"{what} not found at '{path}': that directory does not exist; "
            f"expected {expected} (set data.path)"
        )
    return root


def _where(path: str | Path | None, subdir: str) -> str:
    if path is None:
        return f"a directory or its '{subdir}' subdirectory"
    return f"'{path}' or '{Path(path) / subdir}'"


def _missing_in(root: Path, subdir: str, list_missing) -> tuple[Path, list[str]]:
    """The folder the user most likely meant (the subdir if it exists) and what it lacks."""
    folder = root / subdir if (root / subdir).is_dir() else root
    return folder, list_missing(folder)


# --- CIFAR-10 -----------------------------------------------------------------------------


def find_cifar10(path: str | Path | None) -> Path:
    """The directory holding the CIFAR-10 batches: `path` itself or `path/cifar-10-batches-py`."""
    names = (*CIFAR10_TRAIN_FILES, CIFAR10_VAL_FILE)
    expected = (
        "the python version's pickle batches data_batch_1..data_batch_5 and test_batch in "
        + _where(path, CIFAR10_DIRNAME)
    )
    root = _path_or_raise(path, "CIFAR-10", expected)
    for candidate in (root, root / CIFAR10_DIRNAME):
        if all((candidate / n).is_file() for n in names):
            return candidate
    folder, missing = _missing_in(
        root, CIFAR10_DIRNAME, lambda f: [n for n in names if not (f / n).is_file()]
    )
    raise DatasetNotFoundError(
        f"CIFAR-10 not found at '{path}': expected {expected} "
        f"(missing in '{folder}': {', '.join(missing)}) (set data.path)"
    )


def _read_cifar_batch(file: Path) -> tuple[np.ndarray, np.ndarray]:
    # The official files are Python 2 pickles of a dict with bytes keys. Unpickling runs code
    # from the file, so data.path must point at a copy you trust.
    with file.open("rb") as fh:
        batch = pickle.load(fh, encoding="bytes")
    data = np.asarray(batch[b"data"], dtype=np.uint8)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"'{file}': b'data' has shape {data.shape}, expected (N, 3072)")
    # Rows are the red plane, then green, then blue, each 32x32 row-major: already C, H, W.
    return data.reshape(-1, 3, 32, 32), np.asarray(batch[b"labels"], dtype=np.int64)


def load_cifar10(root: Path) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """((train_x, train_y), (val_x, val_y)) from a directory returned by `find_cifar10`."""
    parts = [_read_cifar_batch(root / n) for n in CIFAR10_TRAIN_FILES]
    train = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
    return train, _read_cifar_batch(root / CIFAR10_VAL_FILE)


# --- MNIST --------------------------------------------------------------------------------


def _mnist_expected(path: str | Path | None) -> str:
    names = ", ".join(MNIST_FILES.values())
    return f"the IDX files {names} (plain or .gz) in {_where(path, 'MNIST/raw')}"


def find_mnist(path: str | Path | None) -> dict[str, Path]:
    """Role -> file for the four MNIST IDX files, in `path` or torchvision's `path/MNIST/raw`."""
    root = _path_or_raise(path, "MNIST", _mnist_expected(path))

    def locate(folder: Path, name: str) -> Path | None:
        for file in (folder / name, folder / f"{name}.gz"):
            if file.is_file():
                return file
        return None

    for folder in (root, root / "MNIST" / "raw"):
        found = {role: locate(folder, name) for role, name in MNIST_FILES.items()}
        if all(found.values()):
            return found
    folder, missing = _missing_in(
        root, "MNIST/raw", lambda f: [n for n in MNIST_FILES.values() if locate(f, n) is None]
    )
    raise DatasetNotFoundError(
        f"MNIST not found at '{path}': expected {_mnist_expected(path)} "
        f"(missing in '{folder}': {', '.join(missing)}) (set data.path)"
    )


def read_idx(file: Path, magic: int) -> np.ndarray:
    """Read an unsigned-byte IDX file (optionally gzipped), checking its magic number."""
    opener = gzip.open if file.suffix == ".gz" else open
    with opener(file, "rb") as fh:
        raw = fh.read()
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise ValueError(f"'{file}' has IDX magic number {found}, expected {magic}")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    # bytearray: a writable buffer, so torch.from_numpy later shares it without a warning.
    data = np.frombuffer(bytearray(raw), dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"'{file}' holds {data.size} values, its header says shape {shape}")
    return data.reshape(shape)


def load_mnist(
    files: dict[str, Path],
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """((train_x, train_y), (val_x, val_y)), x uint8 (N, 1, 28, 28), from `find_mnist`."""

    def split(prefix: str) -> tuple[np.ndarray, np.ndarray]:
        x = read_idx(files[f"{prefix}_images"], IDX_IMAGES_MAGIC)[:, None]
        y = read_idx(files[f"{prefix}_labels"], IDX_LABELS_MAGIC).astype(np.int64)
        if len(x) != len(y):
            raise ValueError(f"MNIST {prefix}: {len(x)} images but {len(y)} labels")
        return x, y

    return split("train"), split("val")


# --- Image folder -------------------------------------------------------------------------


def find_image_folder(path: str | Path | None) -> tuple[list[str], list[tuple[Path, int]]]:
    """Class names (sorted subfolder names) and (file, label) pairs of `root/<class>/*.png|jpg`."""
    where = "a directory" if path is None else f"'{path}'"
    expected = (
        f"one subfolder per class in {where}, each holding .png/.jpg/.jpeg images "
        "(<root>/<class_name>/<image>.png)"
    )
    root = _path_or_raise(path, "Image folder", expected)
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    items = [
        (file, label)
        for label, name in enumerate(classes)
        for file in sorted((root / name).iterdir())
        if file.suffix.lower() in IMAGE_EXTENSIONS and file.is_file()
    ]
    if not items:
        raise DatasetNotFoundError(
            f"Image folder not found at '{path}': no images there; expected {expected} "
            "(set data.path)"
        )
    return classes, items


def load_images(items: list[tuple[Path, int]], image_size: int, channels: int) -> np.ndarray:
    """uint8 (N, channels, image_size, image_size) from the files of `find_image_folder`."""
    # Imported here: only image folders need Pillow, and a GPU machine may lack it.
    from PIL import Image, ImageOps

    mode = "L" if channels == 1 else "RGB"
    out = np.empty((len(items), channels, image_size, image_size), dtype=np.uint8)
    for i, (file, _) in enumerate(items):
        with Image.open(file) as img:
            # `fit` crops to a square around the centre before resizing, so non-square
            # images keep their aspect ratio instead of being squashed.
            img = ImageOps.fit(img.convert(mode), (image_size, image_size), Image.BICUBIC)
        array = np.asarray(img, dtype=np.uint8)
        out[i] = array[None] if channels == 1 else array.transpose(2, 0, 1)
    log.info("Read %d images at %dx%d (%s)", len(items), image_size, image_size, mode)
    return out
