"""A labelled 2-D Gaussian mixture whose true density is known, and its datamodule.

With the truth in closed form, evaluation can score samples directly: log-likelihood under
the true density, distance to the nearest mode, and per-class mode coverage for guidance.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .base import Split, TensorDataModule
from .config import DataConfig


class GaussianMixture2D:
    """Isotropic Gaussians N(means[k], std^2 I) with mixture weights; label = mode index k."""

    def __init__(
        self, means: torch.Tensor, std: float, weights: torch.Tensor | None = None
    ) -> None:
        self.means = torch.as_tensor(means, dtype=torch.float32)
        if self.means.ndim != 2 or self.means.shape[1] != 2:
            raise ValueError(f"means must have shape (K, 2), got {tuple(self.means.shape)}")
        if std <= 0:
            raise ValueError(f"std must be > 0, got {std}")
        self.std = float(std)
        k = len(self.means)
        weights = torch.full((k,), 1.0 / k) if weights is None else torch.as_tensor(weights)
        self.weights = weights.float() / weights.sum()

    @classmethod
    def ring(cls, n_modes: int = 8, radius: float = 2.0, std: float = 0.1) -> GaussianMixture2D:
        """`n_modes` equal-weight modes equally spaced on a circle, the first at angle 0."""
        angles = torch.arange(n_modes, dtype=torch.float64) * (2 * math.pi / n_modes)
        means = radius * torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)
        return cls(means.float(), std)

    @property
    def n_modes(self) -> int:
        return len(self.means)

    def sample(
        self,
        n: int,
        labels: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Split:
        """(x float32 (n, 2), y int64 (n,)); labels drawn from the weights unless given."""
        if labels is None:
            labels = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        labels = torch.as_tensor(labels, dtype=torch.int64)
        # Noise is drawn on the CPU (where `generator` lives) and then moved to the labels'
        # device, so a given generator state gives the same points on any device.
        noise = torch.randn(len(labels), 2, generator=generator).to(labels.device)
        return self.means.to(labels.device)[labels] + self.std * noise, labels

    def _component_log_probs(self, x: torch.Tensor) -> torch.Tensor:
        """(N, K): log N(x_n; mean_k, std^2 I), computed in float64."""
        x = torch.as_tensor(x).double()
        sq_dist = torch.cdist(x, self.means.to(x.device, torch.float64)).square()
        log_norm = -math.log(2 * math.pi * self.std**2)  # 2-D isotropic normaliser
        return log_norm - sq_dist / (2 * self.std**2)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """log p(x) = logsumexp_k [log w_k + log N(x; mean_k, std^2 I)], shape (N,)."""
        per_mode = self._component_log_probs(x)
        joint = per_mode + self.weights.to(per_mode.device, torch.float64).log()
        return torch.logsumexp(joint, dim=1).float()

    def log_prob_given_label(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """log p(x | y) = log N(x; mean_y, std^2 I), shape (N,)."""
        per_mode = self._component_log_probs(x)
        y = torch.as_tensor(y, dtype=torch.int64, device=per_mode.device)
        return per_mode.gather(1, y[:, None]).squeeze(1).float()

    def mode_of(self, x: torch.Tensor) -> torch.Tensor:
        """Index of the nearest mean for each point, int64 (N,)."""
        x = torch.as_tensor(x).float()
        return torch.cdist(x, self.means.to(x.device)).argmin(dim=1)


def _split_seeds(seed: int) -> tuple[int, int]:
    # Independent streams for train and val, so the val set does not depend on n_train.
    train, val = np.random.SeedSequence(seed).generate_state(2, dtype=np.uint64)
    return int(train >> np.uint64(1)), int(val >> np.uint64(1))  # torch wants < 2**63


class GaussianMixtureDataModule(TensorDataModule):
    """`n_train`/`n_val` labelled points drawn from a ring mixture; the truth is `.truth`."""

    kind = "points"

    def __init__(
        self,
        n_modes: int = 8,
        radius: float = 2.0,
        std: float = 0.1,
        n_train: int = 8192,
        n_val: int = 2048,
        batch_size: int = 128,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(
            name=f"gaussian_mixture-k{n_modes}-r{radius:g}-std{std:g}-n{n_train}-{n_val}"
            f"-seed{seed}",
            dataset="gaussian_mixture",
            num_classes=n_modes,
            data_shape=(2,),
            class_names=tuple(f"mode_{k}" for k in range(n_modes)),
            batch_size=batch_size,
            num_workers=num_workers,
        )
        self.truth = GaussianMixture2D.ring(n_modes, radius, std)
        self.n_train, self.n_val, self.seed = n_train, n_val, seed

    @classmethod
    def from_config(cls, cfg: DataConfig) -> GaussianMixtureDataModule:
        return cls(
            n_modes=cfg.n_modes,
            radius=cfg.radius,
            std=cfg.std,
            n_train=cfg.n_train,
            n_val=cfg.n_val,
            batch_size=cfg.batch_size,
            num_workers=cfg.num_workers,
            seed=cfg.seed,
        )

    def load_splits(self) -> tuple[Split, Split]:
        train_seed, val_seed = _split_seeds(self.seed)
        train = self.truth.sample(self.n_train, generator=torch.Generator().manual_seed(train_seed))
        val = self.truth.sample(self.n_val, generator=torch.Generator().manual_seed(val_seed))
        return train, val
