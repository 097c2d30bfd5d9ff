"""Pieces both denoisers share: timestep and class conditioning, zero-init, config checks.

Conditioning follows DDPM / improved-diffusion: a sinusoidal embedding of the timestep, an MLP
on top, and (for class-conditional nets) a learned class embedding added to it. The class table
has ``num_classes + 1`` rows; the extra row, index ``num_classes``, is the *null label* that
classifier-free guidance trains and samples with (spec items 9-12).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

# The longest period of the sinusoids. Raw timestep indices go in unscaled, so t <= 4000 spans
# under a tenth of the slowest sinusoid's period (2*pi*10000): every step keeps a distinct,
# smoothly varying code. Same constant as DDPM and improved-diffusion.
MAX_PERIOD = 10_000.0


def timestep_embedding(t: Tensor, dim: int, max_period: float = MAX_PERIOD) -> Tensor:
    """Sinusoidal embedding of timesteps ``t`` (shape [N], int or float) -> [N, dim] float32."""
    half = dim // 2
    exponents = torch.arange(half, device=t.device, dtype=torch.float32) / half
    freqs = torch.exp(-math.log(max_period) * exponents)
    # Computed in float32 whatever the autocast dtype: bf16 has 8 mantissa bits, so t * freq
    # for t in the thousands would collapse neighbouring timesteps onto one code.
    args = t.to(torch.float32)[:, None] * freqs[None, :]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def null_labels(batch_size: int, num_classes: int, device: torch.device) -> Tensor:
    """A batch of the null label ("no class"), index ``num_classes`` of the class table."""
    return torch.full((batch_size,), num_classes, dtype=torch.long, device=device)


class ConditionEmbedding(nn.Module):
    """Maps (t, y) to one conditioning vector: MLP(sinusoid(t)) + class_table[y].

    ``num_classes`` None or 0 makes it unconditional: y is ignored and there is no table.
    ``y=None`` means the null label for every sample.
    """

    def __init__(self, freq_dim: int, emb_dim: int, num_classes: int | None = None) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.num_classes = num_classes or 0
        self.time_mlp = nn.Sequential(
            nn.Linear(freq_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )
        self.class_table = nn.Embedding(self.num_classes + 1, emb_dim) if self.num_classes else None

    def forward(self, t: Tensor, y: Tensor | None, batch_size: int) -> Tensor:
        t = torch.as_tensor(t, device=self.time_mlp[0].weight.device)
        if t.ndim == 0:  # one timestep for the whole batch, as samplers often pass it
            t = t.expand(batch_size)
        if t.shape != (batch_size,):
            raise ValueError(f"t must have shape ({batch_size},), got {tuple(t.shape)}")
        emb = self.time_mlp(timestep_embedding(t, self.freq_dim))
        if self.class_table is None:
            return emb
        if y is None:
            y = null_labels(batch_size, self.num_classes, emb.device)
        elif y.shape != (batch_size,):
            raise ValueError(f"y must have shape ({batch_size},), got {tuple(y.shape)}")
        return emb + self.class_table(y)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero a layer's parameters, so a residual branch or the output starts as a no-op.

    improved-diffusion does this for the last conv of each residual branch and for the output
    layer: the untrained net predicts eps = 0 and every block starts as the identity, which
    keeps early training stable at depth.
    """
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


# ---- config checks shared by UNetConfig and MLPConfig -------------------------------------


def check_positive_int(value: object, key: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{key}={value!r}: expected a positive int")


def check_int_tuple(value: object, key: str, allow_empty: bool = False) -> None:
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise ValueError(f"{key}={value!r}: expected a tuple of positive ints")
    if not value and not allow_empty:
        raise ValueError(f"{key}={value!r}: expected a non-empty tuple of positive ints")
    for i, item in enumerate(value):
        check_positive_int(item, f"{key}[{i}]")


def check_dropout(value: object, key: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
        raise ValueError(f"{key}={value!r}: expected a float in [0, 1)")


def check_num_classes(value: object, key: str) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{key}={value!r}: expected None, 0 (unconditional) or a positive int")


def check_bool(value: object, key: str) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{key}={value!r}: expected true or false")


def check_name(value: object, expected: str, key: str) -> None:
    if value != expected:
        raise ValueError(f"{key}={value!r}: expected {expected!r}")
