"""The Lightning DDPM module: fast_dev_run for every network × variance × prediction, learning on
the 2-D mixture, guidance, checkpoints, EMA, timestep sampling and config errors."""

from __future__ import annotations

import pytest
import pytorch_lightning
import torch

from lightning_modules.config import ConfigError, load_config
from lightning_modules.diffusion import GUIDANCE_CONVENTION, SamplingSpec
from lightning_modules.diffusion.timesteps import LossSecondMomentSampler, UniformSampler
from lightning_modules.evaluation import evaluate_points
from lightning_modules.module import DiffusionModule, NonFiniteLossError
from lightning_modules.train import build_experiment, fit

TINY_UNET = [
    "network.model_channels=16",
    "network.attention_resolutions=[4]",
    "network.num_heads=1",
]
FAST = ["diffusion.timesteps=20", "train.bpd_subset=4", "data.batch_size=16", "sample.steps=[10]"]
MIXTURE = ["data.name=gaussian_mixture", "data.n_train=2048", "data.n_val=512"]


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large", "learned_range"])
@pytest.mark.parametrize("data", ["digits", "gaussian_mixture"])
def test_fast_dev_run(tmp_path, data, variance, prediction):
    overrides = [
        *FAST,
        f"data.name={data}",
        f"diffusion.variance={variance}",
        f"diffusion.prediction={prediction}",
    ]
    if data == "digits":
        overrides += TINY_UNET
    cfg = load_config(None, overrides)
    result = fit(cfg, tmp_path, fast_dev_run=True, enable_progress_bar=False)
    metrics = result.trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss"]) and torch.isfinite(metrics["val/loss_simple"])
    assert torch.isfinite(metrics["val/bpd"]) and metrics["val/bpd"] > 0
    assert ("train/vb" in metrics) == (variance == "learned_range")
    net = result.module.net
    assert type(net).__name__ == ("UNet" if data == "digits" else "MLPDenoiser")
    assert net.learned_variance == (variance == "learned_range")
    for w in (0.0, 2.0):
        spec = SamplingSpec(guidance=w, variance=variance, steps=3)
        x = result.module.sample(torch.tensor([0, 1]), spec)
        assert x.shape == (2, *result.datamodule.data_shape) and torch.isfinite(x).all()


@pytest.fixture(scope="module")
def trained_mixture(tmp_path_factory):
    """An MLP trained for 600 steps on the 8-mode ring; checkpoint included."""
    torch.manual_seed(0)
    cfg = load_config(
        None,
        [
            *MIXTURE,
            "data.batch_size=256",
            "diffusion.timesteps=100",
            "diffusion.schedule=linear",
            "train.max_steps=600",
            "train.lr=3e-3",
            "train.warmup_steps=20",
            "train.val_every_n_steps=300",
            "train.bpd_subset=0",
            "train.ema_decay=0.99",
            "network.hidden_dim=128",
            "network.num_blocks=3",
            "train.p_uncond=0.2",
        ],
    )
    root = tmp_path_factory.mktemp("mixture")
    return fit(cfg, root, enable_progress_bar=False)


def _points_metrics(module, truth, w, n_per=64, steps=50):
    labels = torch.arange(8).repeat_interleave(n_per)
    spec = SamplingSpec(guidance=w, variance="fixed_small", steps=steps, seed=1)
    x = module.sample(labels, spec)
    return evaluate_points(x, labels, truth)


@pytest.mark.slow
def test_training_learns_the_mixture(trained_mixture, tmp_path):
    dm = trained_mixture.datamodule
    trained = _points_metrics(trained_mixture.module, dm.truth, 1.0)
    _, untrained = build_experiment(trained_mixture.module.cfg)
    before = _points_metrics(untrained, dm.truth, 1.0)
    assert trained["sliced_wasserstein"] < 0.3 * before["sliced_wasserstein"]
    assert trained["energy_distance"] < 0.2 * before["energy_distance"]
    assert trained["modes_hit"] == 1.0


@pytest.mark.slow
def test_guidance_increases_class_accuracy(trained_mixture):
    dm = trained_mixture.datamodule
    acc = {
        w: _points_metrics(trained_mixture.module, dm.truth, w)["label_accuracy"]
        for w in (0.0, 1.0, 3.0)
    }
    assert acc[0.0] < 0.35  # unconditional: about 1 in 8 land in the requested mode
    assert acc[1.0] > acc[0.0] + 0.3
    assert acc[3.0] >= acc[1.0] and acc[3.0] > 0.9


@pytest.mark.slow
def test_checkpoint_sample_round_trip(trained_mixture):
    ckpt = trained_mixture.checkpoint
    assert ckpt is not None and ckpt.exists()
    loaded = DiffusionModule.from_checkpoint(ckpt)
    labels = torch.arange(8).repeat(4)
    for w in (0.0, 1.0, 3.0):
        spec = SamplingSpec(guidance=w, variance="fixed_large", steps=20, seed=5)
        a = trained_mixture.module.sample(labels, spec)
        b = loaded.sample(labels, spec)
        assert torch.allclose(a, b, atol=1e-5)
    meta = torch.load(ckpt, weights_only=False)
    assert meta["ddpm_sweep"]["config"]["diffusion"]["timesteps"] == 100
    assert torch.equal(meta["ddpm_sweep"]["betas"], trained_mixture.module.process.betas)
    assert meta["ddpm_sweep"]["guidance_convention"] == GUIDANCE_CONVENTION
    # EMA: a checkpoint written during training holds the averaged weights in its state_dict
    # (what from_checkpoint loads) and the raw ones beside them, to resume training.
    best = torch.load(ckpt.parent / "best.ckpt", weights_only=False)
    raw, ema = best["current_model_state"], best["state_dict"]
    assert all(not torch.equal(raw[k], ema[k]) for k in ema if k.startswith("net."))
    with pytest.raises(ValueError, match="learned_range"):
        loaded.sample(labels, SamplingSpec(variance="learned_range"))
    with pytest.raises(ValueError, match="finite"):
        loaded.sample(labels, SamplingSpec(guidance=float("nan")))


def test_non_finite_loss_fails_the_step(tmp_path):
    cfg = load_config(
        None,
        [
            *FAST,
            *MIXTURE,
            "train.lr=1e30",
            "train.warmup_steps=0",
            "train.grad_clip=0",
            "train.max_steps=50",
        ],
    )
    with pytest.raises(NonFiniteLossError, match="non-finite training loss"):
        fit(cfg, tmp_path, enable_progress_bar=False)


def test_importance_sampler_reweights_to_an_unbiased_estimate():
    s = LossSecondMomentSampler(4, history=3)
    t, w = s.sample(1000, "cpu", generator=torch.Generator().manual_seed(0))
    assert torch.allclose(w, torch.ones_like(w))  # uniform until warmed up
    for _ in range(3):
        s.update(torch.arange(4), torch.tensor([1.0, 1.0, 1.0, 9.0]))
    assert s.warmed_up()
    p = s.weights()
    assert p[3] > 0.7 and torch.isclose(p.sum(), torch.tensor(1.0, dtype=torch.float64))
    t, w = s.sample(20000, "cpu", generator=torch.Generator().manual_seed(1))
    losses = torch.tensor([1.0, 2.0, 3.0, 9.0])[t]
    # E_p[w L] = mean_t L_t: the importance-weighted loss estimates the uniform average.
    assert (w * losses).mean().item() == pytest.approx(15 / 4, rel=0.05)
    u_t, u_w = UniformSampler(4).sample(10, "cpu")
    assert torch.all(u_w == 1)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["diffusion.schedule=quadratic"], "diffusion.schedule = 'quadratic'"),
        (["diffusion.timesteps=0"], "diffusion.timesteps = 0"),
        (["diffusion.variance=big"], "diffusion.variance = 'big'"),
        (["sample.steps=[50,2000]"], r"sample.steps\[1\] = 2000"),
        (["sample.guidance=[1,.nan]"], r"sample.guidance\[1\]"),
        (["sample.guidance=[]"], "sample.guidance = .* non-empty list"),
        (["sample.variance=[fixed_small,tiny]"], r"sample.variance\[1\] = 'tiny'"),
        (["train.p_uncond=1.5"], "train.p_uncond = 1.5"),
        (["data.val_fraction=2"], "data.val_fraction = 2"),
        (["train.lr=fast"], "train.lr"),
        (["train.learning_rate=1"], "learning_rate"),
    ],
)
def test_bad_config_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_bad_config_file_is_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("diffusion:\n  schedule: quadratic\n")
    with pytest.raises(ConfigError, match=f"{bad}: diffusion.schedule = 'quadratic'"):
        load_config(bad)
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "missing.yaml")


def test_network_must_match_the_data():
    with pytest.raises(ConfigError, match="network.name = 'unet' needs image data"):
        build_experiment(load_config(None, [*MIXTURE, "network.name=unet"]))
    with pytest.raises(ConfigError, match="network.name = 'mlp' needs point data"):
        build_experiment(load_config(None, ["network.name=mlp"]))
    with pytest.raises(ValueError, match="network.channel_mult"):
        build_experiment(load_config(None, ["network.channel_mult=[1,0]"]))


class LossRecorder(pytorch_lightning.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def test_same_seed_gives_the_same_first_losses(tmp_path):
    """What makes a fresh restart safe: the steps it repeats reproduce what was logged."""
    losses = {}
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        recorder = LossRecorder()
        cfg = load_config(None, [*FAST, *MIXTURE, "train.max_steps=5", f"train.seed={seed}"])
        fit(cfg, tmp_path / name, callbacks=[recorder], enable_progress_bar=False)
        losses[name] = recorder.losses
    assert len(losses["a"]) == 5 and losses["a"] == losses["b"]
    assert losses["c"] != losses["a"]


def test_initial_weights_depend_on_the_config_not_the_process_history():
    """A reused Ray worker has drawn random numbers for earlier trials; the next trial's network
    must still start from the weights its seed gives (this made the planned and the naive sweep
    of benchmarks/sweep_savings.py disagree by up to 0.5 in a metric)."""
    cfg = load_config(None, [*FAST, *MIXTURE, "train.seed=3"])
    torch.manual_seed(123)
    first = build_experiment(cfg)[1].net.state_dict()
    torch.rand(1000)  # what an earlier trial in the same process would have done
    second = build_experiment(cfg)[1].net.state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    other = build_experiment(load_config(None, [*FAST, *MIXTURE, "train.seed=4"]))[1]
    assert not all(torch.equal(first[k], v) for k, v in other.net.state_dict().items())


def test_auto_precision_is_bf16_only_for_a_run_on_the_gpu(monkeypatch):
    """On a GPU machine `precision: auto` trains in bf16, unless the run is pinned to the CPU
    (where bf16 autocast would slow it down and change its numbers)."""
    from lightning_modules.train import precision_for

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert precision_for(load_config(None, [])) == "bf16-mixed"
    assert precision_for(load_config(None, ["train.accelerator=cpu"])) == "32-true"
    assert precision_for(load_config(None, ["train.precision=32-true"])) == "32-true"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert precision_for(load_config(None, [])) == "32-true"
