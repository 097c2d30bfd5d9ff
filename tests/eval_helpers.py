"""What the evaluation tests share: real digits, a classifier trained on half of them, a
stand-in for the 2-D mixture."""

from __future__ import annotations

import math

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from lightning_modules.evaluation import train_classifier


def digit_halves():
    """sklearn digits as (x in [-1, 1] (N, 1, 8, 8), y), split into two stratified halves."""
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16 * 2 - 1
    y = torch.tensor(data.target, dtype=torch.int64)
    idx_a, idx_b = train_test_split(np.arange(len(x)), test_size=0.5, stratify=y, random_state=0)
    return x[idx_a], y[idx_a], x[idx_b], y[idx_b]


def classifier_on(halves):
    """The classifier every image-metric test uses: trained once on half A of digits."""
    x_a, y_a, _, _ = halves
    return train_classifier(x_a, y_a, num_classes=10, seed=0)


class StandInMixture:
    """Ring of Gaussian modes with the duck type `evaluate_points` expects."""

    def __init__(self, n_modes: int = 8, radius: float = 2.0, std: float = 0.1) -> None:
        angles = torch.arange(n_modes) * (2 * math.pi / n_modes)
        self.means = radius * torch.stack([angles.cos(), angles.sin()], dim=1)
        self.std = std

    def sample(self, n, labels=None, generator=None):
        if labels is None:
            labels = torch.randint(len(self.means), (n,), generator=generator)
        noise = torch.randn(n, 2, generator=generator)
        return self.means[labels] + self.std * noise, labels

    def mode_of(self, x):
        return torch.cdist(x.float(), self.means).argmin(dim=1)


def balanced_labels(n_modes: int, per_mode: int) -> torch.Tensor:
    return torch.arange(n_modes).repeat_interleave(per_mode)
