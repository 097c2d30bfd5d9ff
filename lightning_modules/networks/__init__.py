"""Denoiser networks: a class-conditional U-Net for images and an MLP for 2-D data.

Every network is called as ``net(x, t, y)``: ``t`` the integer timestep indices [N], ``y`` the
class labels [N] with ``num_classes`` as the null label (or ``None`` for all-null). With
``learned_variance`` the output has twice the channels / features of ``x``: split it with
``out.chunk(2, dim=1)`` into (eps, v).

``NETWORKS`` is the one list of network names; ``build_network`` turns a config (dataclass,
DictConfig or plain mapping with a ``name`` key) into a module.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch import nn

from .embeddings import ConditionEmbedding, null_labels, timestep_embedding
from .mlp import MLPConfig, MLPDenoiser
from .unet import UNET_PRESETS, UNet, UNetConfig, unet_preset

__all__ = [
    "NETWORKS",
    "UNET_PRESETS",
    "ConditionEmbedding",
    "MLPConfig",
    "MLPDenoiser",
    "NetworkConfig",
    "UNet",
    "UNetConfig",
    "build_network",
    "network_config",
    "null_labels",
    "timestep_embedding",
    "unet_preset",
]

NetworkConfig = UNetConfig | MLPConfig

# name -> (config dataclass, network class): the single source of the network choices.
NETWORKS: dict[str, tuple[type[NetworkConfig], type[nn.Module]]] = {
    "unet": (UNetConfig, UNet),
    "mlp": (MLPConfig, MLPDenoiser),
}


def network_config(
    cfg: NetworkConfig | Mapping | DictConfig, key: str = "network"
) -> NetworkConfig:
    """Validate ``cfg`` and return it as its config dataclass.

    ``key`` is the path of ``cfg`` in the user's config, used in error messages
    (``network.channel_mult[1]=0: expected a positive int``).
    """
    if isinstance(cfg, UNetConfig | MLPConfig):
        return cfg.validate(key)
    if not isinstance(cfg, Mapping | DictConfig):
        raise ValueError(f"{key}: expected a mapping with a 'name' key, got {type(cfg).__name__}")
    name = cfg.get("name")
    if name not in NETWORKS:
        raise ValueError(f"{key}.name={name!r}: expected one of {sorted(NETWORKS)}")
    return _to_dataclass(NETWORKS[name][0], cfg, key).validate(key)


def _to_dataclass(
    config_cls: type[NetworkConfig], cfg: Mapping | DictConfig, key: str
) -> NetworkConfig:
    """Type-check ``cfg`` against ``config_cls`` with OmegaConf; errors name the bad key."""
    try:
        raw = (
            OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
        )
    except OmegaConfBaseException as err:  # e.g. an interpolation that does not resolve
        raise ValueError(f"{key}.{err.key}: {str(err).splitlines()[0]}") from err
    fields = config_cls.__dataclass_fields__
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        close = difflib.get_close_matches(unknown[0], list(fields), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ValueError(
            f"{key}.{unknown[0]}: unknown key for a {raw['name']} network; {hint}"
            f"expected one of {sorted(fields)}"
        )
    schema = OmegaConf.structured(config_cls)
    for field, value in raw.items():
        # One key at a time: OmegaConf does not always say which key failed (tuple items).
        try:
            OmegaConf.merge(schema, {field: value})
        except OmegaConfBaseException as err:
            raise ValueError(f"{key}.{field}={value!r}: expected {fields[field].type}") from err
    return OmegaConf.to_object(OmegaConf.merge(schema, raw))


def build_network(cfg: NetworkConfig | Mapping | DictConfig, key: str = "network") -> nn.Module:
    """Build the denoiser that ``cfg`` names (``name: unet`` or ``name: mlp``)."""
    typed = network_config(cfg, key)
    return NETWORKS[typed.name][1](typed)
