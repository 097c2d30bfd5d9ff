"""The point-cloud denoiser: a residual MLP for D-dimensional data (2-D toy sets by default).

Same conditioning and calling convention as the U-Net, so the diffusion code cannot tell them
apart: ``net(x [N, D], t [N], y [N] | None) -> [N, D]`` (or [N, 2D] with ``learned_variance``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from torch import Tensor, nn

from .embeddings import (
    ConditionEmbedding,
    check_bool,
    check_dropout,
    check_name,
    check_num_classes,
    check_positive_int,
    zero_module,
)

logger = logging.getLogger(__name__)


@dataclass
class MLPConfig:
    """Residual-MLP hyper-parameters."""

    name: str = "mlp"
    data_dim: int = 2
    hidden_dim: int = 256
    num_blocks: int = 4  # residual blocks, two Linear layers each
    dropout: float = 0.0
    num_classes: int | None = None  # None or 0: unconditional
    learned_variance: bool = False  # output 2*D features: eps, then the variance value v

    def validate(self, key: str = "network") -> MLPConfig:
        """Raise ValueError naming ``key.<field>`` for the first bad value; return self."""
        check_name(self.name, "mlp", f"{key}.name")
        for field in ("data_dim", "hidden_dim", "num_blocks"):
            check_positive_int(getattr(self, field), f"{key}.{field}")
        check_dropout(self.dropout, f"{key}.dropout")
        check_num_classes(self.num_classes, f"{key}.num_classes")
        check_bool(self.learned_variance, f"{key}.learned_variance")
        return self


class MLPBlock(nn.Module):
    """LayerNorm-SiLU-Linear, add the projected embedding, SiLU-dropout-Linear, + skip."""

    def __init__(self, width: int, emb_dim: int, dropout: float) -> None:
        super().__init__()
        self.in_layers = nn.Sequential(nn.LayerNorm(width), nn.SiLU(), nn.Linear(width, width))
        self.emb_proj = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, width))
        # Zeroed last layer: the block starts as the identity, as the U-Net's ResBlocks do.
        self.out_layers = nn.Sequential(
            nn.SiLU(), nn.Dropout(dropout), zero_module(nn.Linear(width, width))
        )

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        return x + self.out_layers(self.in_layers(x) + self.emb_proj(emb))


class MLPDenoiser(nn.Module):
    """Class-conditional residual-MLP denoiser: ``net(x [N, D], t [N], y [N] | None)``."""

    def __init__(self, cfg: MLPConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.data_dim = cfg.data_dim
        self.num_classes = cfg.num_classes or 0
        self.learned_variance = cfg.learned_variance
        width = cfg.hidden_dim
        self.embed = ConditionEmbedding(width, width, cfg.num_classes)
        self.in_proj = nn.Linear(cfg.data_dim, width)
        self.blocks = nn.ModuleList(
            MLPBlock(width, width, cfg.dropout) for _ in range(cfg.num_blocks)
        )
        out_dim = cfg.data_dim * (2 if cfg.learned_variance else 1)
        self.out = nn.Sequential(
            nn.LayerNorm(width), nn.SiLU(), zero_module(nn.Linear(width, out_dim))
        )
        logger.debug(
            "built MLPDenoiser with %d parameters", sum(p.numel() for p in self.parameters())
        )

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        if x.ndim != 2 or x.shape[1] != self.data_dim:
            raise ValueError(f"x must have shape (N, {self.data_dim}), got {tuple(x.shape)}")
        emb = self.embed(t, y, x.shape[0])
        h = self.in_proj(x)
        for block in self.blocks:
            h = block(h, emb)
        return self.out(h)
