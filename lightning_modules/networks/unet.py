"""The image denoiser: a compact version of the DDPM / improved-diffusion U-Net.

Layout (Ho et al. 2020, appendix B; improved-diffusion's ``UNetModel``): a 3x3 input conv, then
per resolution level ``num_res_blocks`` ResBlocks (with self-attention at the spatial sizes in
``attention_resolutions``) and a stride-2 downsample; a middle ResBlock-attention-ResBlock; the
mirrored up path with ``num_res_blocks + 1`` ResBlocks per level, each fed the matching skip;
GroupNorm-SiLU and a zero-initialised 3x3 output conv.

With ``UNetConfig`` at its defaults this is the DDPM CIFAR-10 network (35,746,307 parameters,
unconditional); ``unet_preset`` names it and a small one for 8x8 digits.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .embeddings import (
    ConditionEmbedding,
    check_bool,
    check_dropout,
    check_int_tuple,
    check_name,
    check_num_classes,
    check_positive_int,
    zero_module,
)

logger = logging.getLogger(__name__)


@dataclass
class UNetConfig:
    """U-Net hyper-parameters; the defaults are the DDPM CIFAR-10 network."""

    name: str = "unet"
    in_channels: int = 3
    image_size: int = 32
    model_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (16,)  # spatial sizes, e.g. 16 means 16x16
    num_heads: int = 1
    dropout: float = 0.1
    num_classes: int | None = None  # None or 0: unconditional
    learned_variance: bool = False  # output 2*C channels: eps, then the variance value v
    use_scale_shift_norm: bool = False  # FiLM-style embedding injection (improved-diffusion)

    def resolutions(self) -> list[int]:
        """Spatial size at each level of the down path."""
        return [self.image_size // 2**level for level in range(len(self.channel_mult))]

    def validate(self, key: str = "network") -> UNetConfig:
        """Raise ValueError naming ``key.<field>`` for the first bad value; return self."""
        check_name(self.name, "unet", f"{key}.name")
        for field in ("in_channels", "image_size", "model_channels", "num_res_blocks"):
            check_positive_int(getattr(self, field), f"{key}.{field}")
        check_positive_int(self.num_heads, f"{key}.num_heads")
        check_int_tuple(self.channel_mult, f"{key}.channel_mult")
        check_int_tuple(self.attention_resolutions, f"{key}.attention_resolutions", True)
        check_dropout(self.dropout, f"{key}.dropout")
        check_num_classes(self.num_classes, f"{key}.num_classes")
        check_bool(self.learned_variance, f"{key}.learned_variance")
        check_bool(self.use_scale_shift_norm, f"{key}.use_scale_shift_norm")
        self._check_geometry(key)
        return self

    def _check_geometry(self, key: str) -> None:
        # Each downsample halves the size and the up path doubles it back; an odd size on the
        # way down (28 -> 14 -> 7 -> 4) would come back as 8 and the skip concat would fail.
        factor = 2 ** (len(self.channel_mult) - 1)
        if self.image_size % factor:
            raise ValueError(
                f"{key}.image_size={self.image_size}: must be divisible by "
                f"2**(len(channel_mult)-1)={factor} for channel_mult={tuple(self.channel_mult)}; "
                "use a shorter channel_mult (e.g. (1, 2, 2) for 28x28)"
            )
        resolutions = self.resolutions()
        for i, res in enumerate(self.attention_resolutions):
            if res not in resolutions:
                raise ValueError(
                    f"{key}.attention_resolutions[{i}]={res}: not a resolution of this U-Net; "
                    f"expected one of {resolutions}"
                )
        for level, mult in enumerate(self.channel_mult):
            channels = self.model_channels * mult
            attends = (
                resolutions[level] in self.attention_resolutions or level == len(resolutions) - 1
            )
            if attends and channels % self.num_heads:
                raise ValueError(
                    f"{key}.num_heads={self.num_heads}: must divide the {channels} channels "
                    f"attended at {resolutions[level]}x{resolutions[level]}"
                )


_PRESETS: dict[str, UNetConfig] = {
    # Ho et al. 2020, CIFAR-10: 35.7M parameters unconditional.
    "ddpm_cifar10": UNetConfig(),
    # sklearn's 8x8 digits: 0.7M parameters; a batch-128 training step is ~0.3 s on one core.
    "digits": UNetConfig(
        in_channels=1,
        image_size=8,
        model_channels=32,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_resolutions=(4,),
        num_heads=2,
        dropout=0.1,
        num_classes=10,
    ),
}
UNET_PRESETS: tuple[str, ...] = tuple(_PRESETS)


def unet_preset(name: str, **overrides: object) -> UNetConfig:
    """A validated copy of the named preset config, with ``overrides`` applied."""
    if name not in _PRESETS:
        raise ValueError(f"unet preset {name!r}: expected one of {list(UNET_PRESETS)}")
    fields = {f.name for f in dataclasses.fields(UNetConfig)}
    for field in overrides:
        if field not in fields:
            close = difflib.get_close_matches(field, sorted(fields), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ValueError(
                f"network.{field}: unknown U-Net key; {hint}expected one of {sorted(fields)}"
            )
    return dataclasses.replace(_PRESETS[name], **overrides).validate()


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with 32 groups (DDPM's 4 channels per group at 128 channels), fewer where
    ``channels`` is small: the largest count <= 32 that divides ``channels`` and leaves at least
    4 channels per group. A group of one channel would normalise away the per-channel embedding
    a ResBlock adds just before its norm: those blocks would ignore the timestep and the label."""
    groups = max(g for g in range(1, 33) if channels % g == 0 and channels // g >= min(4, channels))
    return nn.GroupNorm(groups, channels)


class EmbedBlock(nn.Module):
    """A block whose forward also takes the (time + class) embedding."""

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError


class EmbedSequential(nn.Sequential):
    """``nn.Sequential`` that hands the embedding to the blocks that take one."""

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, EmbedBlock) else layer(x)
        return x


class ResBlock(EmbedBlock):
    """GroupNorm-SiLU-conv, add the projected embedding, GroupNorm-SiLU-dropout-conv, + skip."""

    def __init__(
        self, in_ch: int, out_ch: int, emb_dim: int, dropout: float, scale_shift: bool
    ) -> None:
        super().__init__()
        self.scale_shift = scale_shift
        self.in_layers = nn.Sequential(
            group_norm(in_ch), nn.SiLU(), nn.Conv2d(in_ch, out_ch, 3, padding=1)
        )
        self.emb_proj = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, out_ch * (1 + scale_shift)))
        self.out_norm = group_norm(out_ch)
        self.out_layers = nn.Sequential(
            nn.SiLU(), nn.Dropout(dropout), zero_module(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        )
        # DDPM's "nin_shortcut": a 1x1 conv only where the channel count changes.
        self.skip = nn.Identity() if in_ch == out_ch else nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.in_layers(x)
        e = self.emb_proj(emb)[:, :, None, None]
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = self.out_norm(h) * (1 + scale) + shift
        else:
            h = self.out_norm(h + e)
        return self.skip(x) + self.out_layers(h)


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the H*W positions, as a residual branch.

    Works in (B, H, W, C) so the projections are plain Linear layers and a channels-last input
    needs no copy; the attention itself is ``scaled_dot_product_attention`` (flash / memory-
    efficient kernels where available).
    """

    def __init__(self, channels: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm = group_norm(channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj_out = zero_module(nn.Linear(channels, channels))

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        tokens = self.norm(x).permute(0, 2, 3, 1).reshape(b, h * w, c)
        qkv = self.qkv(tokens).reshape(b, h * w, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, HW, C/heads)
        out = F.scaled_dot_product_attention(q, k, v)
        out = self.proj_out(out.transpose(1, 2).reshape(b, h, w, c))
        return x + out.permute(0, 3, 1, 2)


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNet(nn.Module):
    """Class-conditional U-Net denoiser: ``net(x [N,C,H,W], t [N], y [N] | None)``.

    Returns [N, C, H, W], or [N, 2C, H, W] with ``learned_variance`` (eps first, then the
    variance value v of spec item 8). ``y == num_classes`` (or ``y=None``) is the null label.
    """

    def __init__(self, cfg: UNetConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.in_channels = cfg.in_channels
        self.num_classes = cfg.num_classes or 0
        self.learned_variance = cfg.learned_variance
        emb_dim = 4 * cfg.model_channels
        self.embed = ConditionEmbedding(cfg.model_channels, emb_dim, cfg.num_classes)
        res_block = functools.partial(
            ResBlock, emb_dim=emb_dim, dropout=cfg.dropout, scale_shift=cfg.use_scale_shift_norm
        )
        self.input_blocks, skip_channels = _down_path(cfg, res_block)
        ch = skip_channels[-1]
        self.middle_block = EmbedSequential(
            res_block(ch, ch), AttentionBlock(ch, cfg.num_heads), res_block(ch, ch)
        )
        self.output_blocks, ch = _up_path(cfg, skip_channels, res_block)
        out_channels = cfg.in_channels * (2 if cfg.learned_variance else 1)
        self.out = nn.Sequential(
            group_norm(ch), nn.SiLU(), zero_module(nn.Conv2d(ch, out_channels, 3, padding=1))
        )
        logger.debug("built UNet with %d parameters", sum(p.numel() for p in self.parameters()))

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"x must have shape (N, {self.in_channels}, H, W), got {tuple(x.shape)}"
            )
        emb = self.embed(t, y, x.shape[0])
        h = x
        skips = []
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h)


ResBlockFactory = Callable[[int, int], ResBlock]


def _down_path(cfg: UNetConfig, res_block: ResBlockFactory) -> tuple[nn.ModuleList, list[int]]:
    """Input blocks, one per skip connection, and the channel count of each skip."""
    ch = cfg.model_channels
    blocks = [EmbedSequential(nn.Conv2d(cfg.in_channels, ch, 3, padding=1))]
    skip_channels = [ch]
    for level, (res, mult) in enumerate(zip(cfg.resolutions(), cfg.channel_mult)):
        for _ in range(cfg.num_res_blocks):
            layers: list[nn.Module] = [res_block(ch, cfg.model_channels * mult)]
            ch = cfg.model_channels * mult
            if res in cfg.attention_resolutions:
                layers.append(AttentionBlock(ch, cfg.num_heads))
            blocks.append(EmbedSequential(*layers))
            skip_channels.append(ch)
        if level < len(cfg.channel_mult) - 1:
            blocks.append(EmbedSequential(Downsample(ch)))
            skip_channels.append(ch)
    return nn.ModuleList(blocks), skip_channels


def _up_path(
    cfg: UNetConfig, skip_channels: list[int], res_block: ResBlockFactory
) -> tuple[nn.ModuleList, int]:
    """Output blocks, each consuming one skip (last in, first out), and the final width."""
    skips = list(skip_channels)
    ch = skips[-1]
    blocks = []
    levels = list(enumerate(zip(cfg.resolutions(), cfg.channel_mult)))
    for level, (res, mult) in reversed(levels):
        for i in range(cfg.num_res_blocks + 1):
            layers: list[nn.Module] = [res_block(ch + skips.pop(), cfg.model_channels * mult)]
            ch = cfg.model_channels * mult
            if res in cfg.attention_resolutions:
                layers.append(AttentionBlock(ch, cfg.num_heads))
            if level > 0 and i == cfg.num_res_blocks:
                layers.append(Upsample(ch))
            blocks.append(EmbedSequential(*layers))
    return nn.ModuleList(blocks), ch
