"""Denoiser networks: shapes, conditioning, presets, config errors, gradients."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from lightning_modules.networks import (
    NETWORKS,
    MLPConfig,
    MLPDenoiser,
    UNet,
    UNetConfig,
    build_network,
    timestep_embedding,
    unet_preset,
)

NUM_CLASSES = 3


def tiny_unet(**overrides) -> UNet:
    """An 8x8 U-Net small enough to run in milliseconds, with attention and classes."""
    cfg = dict(
        in_channels=1,
        image_size=8,
        model_channels=8,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_resolutions=(4,),
        num_heads=2,
        dropout=0.0,
        num_classes=NUM_CLASSES,
    )
    cfg.update(overrides)
    return UNet(UNetConfig(**cfg))


def tiny_mlp(**overrides) -> MLPDenoiser:
    cfg = dict(data_dim=2, hidden_dim=16, num_blocks=2, num_classes=NUM_CLASSES)
    cfg.update(overrides)
    return MLPDenoiser(MLPConfig(**cfg))


def perturb_zero_init(net: torch.nn.Module) -> torch.nn.Module:
    """Randomise the zero-initialised layers: at init every output is exactly 0 whatever t, y."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            if not p.any():
                p.normal_(std=0.2)
    return net.eval()


def sample_input(net: torch.nn.Module, n: int = 4) -> torch.Tensor:
    if isinstance(net, MLPDenoiser):
        return torch.randn(n, net.data_dim)
    return torch.randn(n, net.in_channels, net.cfg.image_size, net.cfg.image_size)


NET_FACTORIES = pytest.mark.parametrize("make_net", [tiny_unet, tiny_mlp], ids=["unet", "mlp"])


# ---- shapes ------------------------------------------------------------------------------


@pytest.mark.parametrize("learned_variance", [False, True])
@pytest.mark.parametrize(
    "size, channels, channel_mult, attention",
    [
        (8, 1, (1, 2), (4,)),
        (16, 3, (1, 2), (8,)),
        (28, 1, (1, 2, 2), (7,)),  # MNIST: 28 -> 14 -> 7
        (32, 3, (1, 2, 2, 2), (16,)),  # the CIFAR-10 layout at width 8
    ],
)
def test_unet_output_shape(size, channels, channel_mult, attention, learned_variance):
    net = tiny_unet(
        in_channels=channels,
        image_size=size,
        channel_mult=channel_mult,
        attention_resolutions=attention,
        learned_variance=learned_variance,
    )
    x = torch.randn(2, channels, size, size)
    out = net(x, torch.tensor([0, 999]), torch.tensor([1, NUM_CLASSES]))
    assert out.shape == (2, channels * (2 if learned_variance else 1), size, size)


@pytest.mark.parametrize("learned_variance", [False, True])
def test_mlp_output_shape(learned_variance):
    net = tiny_mlp(data_dim=3, learned_variance=learned_variance)
    out = net(torch.randn(5, 3), torch.arange(5), None)
    assert out.shape == (5, 6 if learned_variance else 3)


@NET_FACTORIES
def test_scalar_and_float_timesteps_are_accepted(make_net):
    net = perturb_zero_init(make_net())
    x = sample_input(net)
    by_index = net(x, torch.full((4,), 7), None)
    torch.testing.assert_close(net(x, torch.tensor(7), None), by_index)
    torch.testing.assert_close(net(x, torch.full((4,), 7.0), None), by_index)


# ---- conditioning ------------------------------------------------------------------------


@NET_FACTORIES
def test_class_label_changes_output(make_net):
    net = perturb_zero_init(make_net())
    x, t = sample_input(net), torch.full((4,), 10)
    out = {label: net(x, t, torch.full((4,), label)) for label in range(NUM_CLASSES + 1)}
    assert not torch.allclose(out[0], out[1])
    assert not torch.allclose(out[0], out[NUM_CLASSES])  # null label differs from a real one
    torch.testing.assert_close(net(x, t, None), out[NUM_CLASSES])  # y=None is all-null


@NET_FACTORIES
def test_timestep_changes_output(make_net):
    net = perturb_zero_init(make_net())
    x, y = sample_input(net), torch.zeros(4, dtype=torch.long)
    assert not torch.allclose(net(x, torch.full((4,), 10), y), net(x, torch.full((4,), 500), y))


@NET_FACTORIES
def test_outputs_start_at_zero(make_net):
    """The zero-initialised output layer makes the untrained net predict eps = 0."""
    net = make_net()
    x = sample_input(net)
    assert not net(x, torch.arange(4), None).any()


@NET_FACTORIES
def test_unconditional_net_ignores_labels(make_net):
    net = perturb_zero_init(make_net(num_classes=None))
    assert not any("class_table" in name for name, _ in net.named_parameters())
    x, t = sample_input(net), torch.arange(4)
    reference = net(x, t, None)
    torch.testing.assert_close(net(x, t, torch.tensor([0, 1, 2, 5])), reference)
    torch.testing.assert_close(net(x, t, torch.zeros(4, dtype=torch.long)), reference)


def test_timestep_embedding_separates_long_schedules():
    """T = 4000 steps: neighbouring indices keep distinct codes; float t agrees with int t."""
    emb = timestep_embedding(torch.arange(4000), 128)
    assert emb.shape == (4000, 128)
    assert (emb[1:] - emb[:-1]).norm(dim=1).min() > 1e-2
    torch.testing.assert_close(timestep_embedding(torch.tensor([3.0, 3999.0]), 128), emb[[3, 3999]])


# ---- gradients, precision, layouts --------------------------------------------------------


@NET_FACTORIES
def test_gradients_reach_every_parameter(make_net):
    extra = {"use_scale_shift_norm": True} if make_net is tiny_unet else {}  # the FiLM branch
    net = perturb_zero_init(make_net(learned_variance=True, **extra)).train()
    x = sample_input(net)
    net(x, torch.arange(4), torch.tensor([0, 1, 2, NUM_CLASSES])).square().mean().backward()
    missing = [name for name, p in net.named_parameters() if p.grad is None or not p.grad.any()]
    assert not missing


def test_unet_bf16_autocast_and_channels_last():
    net = perturb_zero_init(tiny_unet())
    x, t, y = sample_input(net), torch.arange(4), torch.tensor([0, 1, 2, 3])
    reference = net(x, t, y)
    channels_last = net.to(memory_format=torch.channels_last)
    out = channels_last(x.contiguous(memory_format=torch.channels_last), t, y)
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = net(x, t, y)
    assert low.shape == reference.shape and torch.isfinite(low).all()


# ---- presets and configs -----------------------------------------------------------------


def test_ddpm_cifar10_preset_parameter_count():
    # Ho et al. 2020's CIFAR-10 model has 35,746,307 parameters; meta tensors make this instant.
    with torch.device("meta"):
        net = UNet(unet_preset("ddpm_cifar10"))
    count = sum(p.numel() for p in net.parameters())
    assert abs(count - 35_746_307) < 100_000
    assert count == 35_746_307


def test_digits_preset_runs_on_8x8_digits():
    net = UNet(unet_preset("digits", dropout=0.0))
    out = net(torch.randn(2, 1, 8, 8), torch.tensor([0, 999]), torch.tensor([3, 10]))
    assert out.shape == (2, 1, 8, 8)


@pytest.mark.parametrize(
    "cfg, key",
    [
        ({"name": "unet", "channel_mult": []}, "network.channel_mult"),
        ({"name": "unet", "channel_mult": [1, 0]}, "network.channel_mult[1]"),
        ({"name": "unet", "channel_mult": "abc"}, "network.channel_mult"),
        ({"name": "unet", "channel_mult": [1, "a"]}, "network.channel_mult"),
        ({"name": "unet", "num_res_blocks": "${missing}"}, "network.num_res_blocks"),
        ({"name": "unet", "image_size": 28}, "network.image_size"),
        ({"name": "unet", "attention_resolutions": [5]}, "network.attention_resolutions[0]"),
        ({"name": "unet", "num_heads": 3}, "network.num_heads"),
        ({"name": "unet", "dropout": 1.5}, "network.dropout"),
        ({"name": "unet", "chanel_mult": [1, 2]}, "network.chanel_mult"),
        ({"name": "mlp", "hidden_dim": 0}, "network.hidden_dim"),
        ({"name": "mlp", "num_classes": -1}, "network.num_classes"),
        ({"name": "transformer"}, "network.name"),
    ],
)
def test_bad_config_raises_value_error_naming_the_key(cfg, key):
    with pytest.raises(ValueError, match=re.escape(key) + r"(?![\w.\[])"):
        build_network(OmegaConf.create(cfg))


def test_unknown_preset_and_override_are_rejected():
    with pytest.raises(ValueError, match="ddpm_cifar10"):
        unet_preset("imagenet")
    with pytest.raises(ValueError, match="network.channels"):
        unet_preset("digits", channels=4)


def test_build_network_from_dictconfig_and_dataclass():
    unet = build_network(
        OmegaConf.create(
            {
                "name": "unet",
                "image_size": 8,
                "model_channels": 8,
                "channel_mult": [1, 2],
                "attention_resolutions": [4],
            }
        )
    )
    assert isinstance(unet, UNet) and unet.cfg.channel_mult == (1, 2)
    assert isinstance(build_network(MLPConfig(hidden_dim=8)), MLPDenoiser)
    # a network node inside a bigger config resolves interpolations against the whole config
    root = OmegaConf.create(
        {"data": {"classes": 7}, "network": {"name": "mlp", "num_classes": "${data.classes}"}}
    )
    assert build_network(root.network).num_classes == 7
    assert set(NETWORKS) == {"unet", "mlp"}


def test_networks_import_no_orchestration_packages():
    """lightning_modules must train on machines without ray, mlflow or the orchestrator."""
    package = Path(__file__).parents[1] / "lightning_modules" / "networks"
    for path in package.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = (
                    [a.name for a in node.names]
                    if isinstance(node, ast.Import)
                    else [node.module or ""]
                )
                roots = {name.split(".")[0] for name in names}
                assert not roots & {"ray", "mlflow", "orchestrator"}, path.name


@pytest.mark.parametrize("overrides", [{}, {"model_channels": 8, "channel_mult": (1, 2)}])
def test_every_resblock_hears_the_timestep_and_the_label(overrides):
    """A ResBlock adds the (time + class) embedding per channel just before a GroupNorm: with
    one channel per group the norm removed it, and the digits preset's 32-channel blocks
    ignored t and y. Every block's output must depend on the embedding."""
    from lightning_modules.networks.unet import ResBlock

    torch.manual_seed(0)
    net = UNet(unet_preset("digits", num_classes=10, **overrides)).eval()  # no dropout
    with torch.no_grad():
        for p in net.parameters():  # zero-initialised output convs would hide everything
            p.normal_(0, 0.2)
    blocks = [m for m in net.modules() if isinstance(m, ResBlock)]
    assert blocks
    for block in blocks:
        c_in = block.in_layers[2].in_channels
        x = torch.randn(2, c_in, 4, 4)
        emb_dim = block.emb_proj[1].in_features
        a, b = block(x, torch.randn(2, emb_dim)), block(x, torch.randn(2, emb_dim))
        assert (a - b).abs().max() > 1e-3, f"a block of {block.out_norm.num_channels} channels"
