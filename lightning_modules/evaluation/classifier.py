"""A small CNN classifier that gives image metrics a feature space and a label oracle.

FID, precision/recall and guided accuracy need a network that knows the dataset. Inception v3
knows ImageNet, not 8x8 digits, and its weights cannot be downloaded at run time, so each
dataset gets its own small classifier, trained once per (dataset key, seed) and cached on disk.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

logger = logging.getLogger(__name__)

CACHE_ENV_VAR = "DDPM_SWEEP_CACHE"
_CACHE_FORMAT_VERSION = 1


@dataclass(frozen=True)
class ClassifierArch:
    """Hyperparameters that fix the classifier's shape (stored with the cached weights)."""

    in_channels: int
    num_classes: int
    width: int = 32
    feature_dim: int = 64


def _conv_block(c_in: int, c_out: int) -> list[nn.Module]:
    # GroupNorm, not BatchNorm: a sample's features must not depend on the rest of its batch
    # (FID feeds real and generated images in separate batches), and it halves the epochs needed.
    return [
        nn.Conv2d(c_in, c_out, 3, padding=1),
        nn.GroupNorm(math.gcd(8, c_out), c_out),
        nn.ReLU(),
    ]


class EvalClassifier(nn.Module):
    """Conv stack -> global average pool -> penultimate feature layer -> linear head.

    Global average pooling makes the same network work from 8x8x1 to 64x64x3 images; pooling
    early keeps training on CPU to seconds (8x8 digits: ~0.6 MMAC per image).
    Inputs are float (N, C, H, W) in [-1, 1].
    """

    def __init__(self, arch: ClassifierArch) -> None:
        super().__init__()
        self.arch = arch
        w = arch.width
        self.body = nn.Sequential(
            *_conv_block(arch.in_channels, w),
            nn.MaxPool2d(2),
            *_conv_block(w, 2 * w),
            nn.MaxPool2d(2),
            *_conv_block(2 * w, 4 * w),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        # Features are taken before the ReLU: after it, dead units (a quarter of them on
        # digits) are constant zeros that make the FID covariances singular.
        self.feature_layer = nn.Linear(4 * w, arch.feature_dim)
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(arch.feature_dim, arch.num_classes))

    @property
    def num_features(self) -> int:
        return self.arch.feature_dim

    def features(self, x: Tensor) -> Tensor:
        """Penultimate features, shape (N, feature_dim): the space FID and precision/recall use."""
        return self.feature_layer(self.body(x))

    def forward(self, x: Tensor) -> Tensor:
        """Class logits, shape (N, num_classes)."""
        return self.head(self.features(x))


@dataclass
class TrainedClassifier:
    """A classifier in eval mode plus how well it did and where it came from."""

    model: EvalClassifier
    train_accuracy: float
    heldout_accuracy: float
    loaded_from_cache: bool = False
    path: Path | None = None


def batched_apply(
    fn: Callable[[Tensor], Tensor],
    x: Tensor,
    batch_size: int = 512,
    device: torch.device | str | None = None,
) -> Tensor:
    """Apply `fn` to `x` in batches without autograd, moving each batch to `device` if given.

    Batching bounds memory for large sample sets; moving per batch lets samples stay on the
    CPU while the classifier runs on an accelerator (or the other way round).
    """
    with torch.no_grad():
        return torch.cat(
            [fn(chunk.to(device) if device else chunk) for chunk in x.split(batch_size)]
        )


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def classifier_accuracy(model: EvalClassifier, x: Tensor, y: Tensor) -> float:
    """Fraction of images whose argmax class equals the label."""
    if len(x) == 0:
        return float("nan")
    model.eval()
    pred = batched_apply(model, x.float(), device=model_device(model)).argmax(dim=1)
    return (pred == y.to(pred.device)).double().mean().item()


@contextlib.contextmanager
def _reproducible(seed: int, num_threads: int) -> Iterator[None]:
    # fork_rng keeps the caller's global RNG untouched, and the deterministic flag and thread
    # count are restored, so training a classifier inside a trial leaves the trial unchanged.
    # A fixed thread count also fixes the reduction order: a seed gives the same weights
    # whatever the machine's core count.
    previous_deterministic = torch.are_deterministic_algorithms_enabled()
    previous_threads = torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.use_deterministic_algorithms(True)
        torch.set_num_threads(num_threads)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(previous_deterministic)
            torch.set_num_threads(previous_threads)


def _split_heldout(
    n: int, heldout_fraction: float, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    perm = torch.randperm(n, generator=generator)
    n_heldout = int(round(n * heldout_fraction))
    return perm[n_heldout:], perm[:n_heldout]


def _train_epoch(
    model: EvalClassifier,
    optimizer: torch.optim.Optimizer,
    x: Tensor,
    y: Tensor,
    batch_size: int,
    generator: torch.Generator,
) -> None:
    model.train()
    for idx in torch.randperm(len(x), generator=generator).split(batch_size):
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def train_classifier(
    train_x: Tensor,
    train_y: Tensor,
    num_classes: int,
    seed: int,
    epochs: int = 10,
    batch_size: int = 64,
    lr: float = 2e-3,
    weight_decay: float = 1e-4,
    heldout_fraction: float = 0.2,
    width: int = 32,
    feature_dim: int = 64,
    num_threads: int = 1,
) -> TrainedClassifier:
    """Train an `EvalClassifier` deterministically on CPU.

    A `heldout_fraction` of the data (chosen with the seed) is kept out of training so the
    returned `heldout_accuracy` is an honest estimate; set it to 0 to train on everything.
    `num_threads` defaults to 1: this net is too small to gain from intra-op threads, and with
    several trials sharing the cores extra threads made training up to 30x slower (measured).
    """
    _check_images(train_x, train_y)
    arch = ClassifierArch(train_x.shape[1], num_classes, width, feature_dim)
    x, y = train_x.float().cpu(), train_y.long().cpu()
    start = time.perf_counter()
    with _reproducible(seed, num_threads):
        generator = torch.Generator().manual_seed(seed)
        train_idx, heldout_idx = _split_heldout(len(x), heldout_fraction, generator)
        model = EvalClassifier(arch)
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        for _ in range(epochs):
            _train_epoch(model, optimizer, x[train_idx], y[train_idx], batch_size, generator)
    model.eval()
    result = TrainedClassifier(
        model=model,
        train_accuracy=classifier_accuracy(model, x[train_idx], y[train_idx]),
        heldout_accuracy=classifier_accuracy(model, x[heldout_idx], y[heldout_idx]),
    )
    logger.info(
        "trained eval classifier in %.1fs: train acc %.4f, held-out acc %.4f",
        time.perf_counter() - start,
        result.train_accuracy,
        result.heldout_accuracy,
    )
    return result


def _check_images(x: Tensor, y: Tensor) -> None:
    if x.dim() != 4:
        raise ValueError(f"expected images of shape (N, C, H, W), got {tuple(x.shape)}")
    if len(x) != len(y):
        raise ValueError(f"got {len(x)} images but {len(y)} labels")


def default_cache_dir() -> Path:
    """`$DDPM_SWEEP_CACHE` if set, else `~/.cache/ddpm-sweep`."""
    env = os.environ.get(CACHE_ENV_VAR)
    return Path(env) if env else Path.home() / ".cache" / "ddpm-sweep"


def classifier_cache_path(dataset_key: str, seed: int, cache_dir: str | Path | None) -> Path:
    """Where the classifier for (dataset_key, seed) lives; the key is made filename-safe."""
    safe_key = re.sub(r"[^A-Za-z0-9_.-]+", "_", dataset_key)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return root / f"classifier-{safe_key}-seed{seed}.pt"


def _save_atomically(payload: dict, path: Path) -> None:
    # Several trials may train the same classifier at once: each writes a private temp file in
    # the target directory and renames it into place, so readers never see a partial file.
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def _payload(trained: TrainedClassifier, dataset_key: str, seed: int) -> dict:
    return {
        "format_version": _CACHE_FORMAT_VERSION,
        "dataset_key": dataset_key,
        "seed": seed,
        "arch": asdict(trained.model.arch),
        "train_accuracy": trained.train_accuracy,
        "heldout_accuracy": trained.heldout_accuracy,
        "state_dict": trained.model.state_dict(),
    }


def _load_cached(path: Path, arch: ClassifierArch) -> TrainedClassifier | None:
    """The cached classifier, or None if the file is missing, unreadable or of another shape."""
    if not path.exists():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        cached_arch = ClassifierArch(**payload["arch"])
        if payload["format_version"] != _CACHE_FORMAT_VERSION or cached_arch != arch:
            logger.warning("cached classifier %s has another format or arch; retraining", path)
            return None
        model = EvalClassifier(cached_arch)
        model.load_state_dict(payload["state_dict"])
    except Exception as err:  # a corrupt cache must never kill a trial: retrain instead
        logger.warning("could not read cached classifier %s (%s); retraining", path, err)
        return None
    model.eval()
    return TrainedClassifier(
        model, payload["train_accuracy"], payload["heldout_accuracy"], True, path
    )


def load_or_train_classifier(
    dataset_key: str,
    train_x: Tensor,
    train_y: Tensor,
    num_classes: int,
    seed: int,
    cache_dir: str | Path | None = None,
    **train_kwargs,
) -> TrainedClassifier:
    """Return the cached classifier for (dataset_key, seed), training and caching it if absent.

    `dataset_key` must change whenever the training data changes (e.g. "digits8x8"); the cache
    cannot tell two datasets with the same key apart. `loaded_from_cache` on the result says
    whether training was skipped. `train_kwargs` go to `train_classifier`.
    """
    path = classifier_cache_path(dataset_key, seed, cache_dir)
    arch = ClassifierArch(
        in_channels=train_x.shape[1],
        num_classes=num_classes,
        width=train_kwargs.get("width", ClassifierArch.width),
        feature_dim=train_kwargs.get("feature_dim", ClassifierArch.feature_dim),
    )
    cached = _load_cached(path, arch)
    if cached is not None:
        logger.info("loaded eval classifier from %s", path)
        return cached
    trained = train_classifier(train_x, train_y, num_classes, seed, **train_kwargs)
    _save_atomically(_payload(trained, dataset_key, seed), path)
    trained.path = path
    logger.info("saved eval classifier to %s", path)
    return trained
