"""The GPU path, checked where the CPU can see it: the EMA copy follows the module to its
device, training and sampling steps never read a device value back, sampling runs the network
under autocast and draws several guidance weights in one batch, `torch.compile` stays within its
recompile limit, and a trial that Ray gave a GPU it cannot use fails at once.

The meta device stands in for a GPU: tensors there have a device but no values, so any read of
a value on the host (`.item()`, `bool(t)`, `.tolist()`, `.cpu()` of data) raises, and a tensor
left on the CPU meets a meta tensor in an op and raises too."""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf

from lightning_modules.config import load_config
from lightning_modules.diffusion import GaussianDiffusion, SamplingSpec, sample, sample_specs
from lightning_modules.diffusion.timesteps import LossSecondMomentSampler
from lightning_modules.module import DiffusionModule, NonFiniteLossError
from lightning_modules.networks import build_network
from lightning_modules.train import EMA, build_experiment, fit

T = 20


def tiny_unet_module(**overrides) -> DiffusionModule:
    cfg = load_config(
        overrides=[
            f"diffusion.timesteps={T}",
            "sample.steps=[5]",
            "network.model_channels=8",
            "network.channel_mult=[1]",
            "network.num_res_blocks=1",
            "network.attention_resolutions=[]",
            *[f"{k}={v}" for k, v in overrides.items()],
        ]
    )
    _, module = build_experiment(cfg)
    return module


def test_the_ema_copy_follows_the_module_to_its_device():
    """Lightning builds the averaged copy in `setup`, before the strategy moves the module to
    the GPU; `on_fit_start` comes after that move and must bring the copy along."""
    module = tiny_unet_module()
    ema = EMA(0.999)
    ema.setup(None, module, "fit")
    assert {p.device.type for p in ema.average_model.parameters()} == {"cpu"}
    module.to("meta")  # what the strategy does with a GPU
    ema.on_fit_start(None, module)
    assert {p.device.type for p in ema.average_model.parameters()} == {"meta"}
    assert ema.average_model.n_averaged.device.type == "meta"


def test_the_ema_update_reads_nothing_back_and_matches_torchs_ema():
    """torch's AveragedModel.update_parameters reads its device counter every call; the EMA
    here counts on the host, and averages exactly as torch's EMA does."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    module = tiny_unet_module()
    ema = EMA(0.9)
    ema.setup(None, module, "fit")
    reference = AveragedModel(module, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    ema.on_fit_start(None, module)
    for _ in range(3):
        with torch.no_grad():
            for p in module.parameters():
                p.add_(torch.randn_like(p))
        ema.update(module)
        reference.update_parameters(module)
    for a, b in zip(ema.average_model.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b)
    assert int(ema.average_model.n_averaged) == 3
    module.to("meta")  # on the "GPU": an update that read the counter back would raise
    ema.on_fit_start(None, module)
    ema.update(module)
    ema.update(module)
    assert ema.average_model.n_averaged.device.type == "meta"


@pytest.mark.parametrize("timestep_sampling", ["uniform", "importance"])
def test_a_training_step_reads_nothing_back_from_the_device(timestep_sampling):
    module = tiny_unet_module(**{"diffusion.timestep_sampling": timestep_sampling})
    module.log_dict = lambda *a, **k: None  # Lightning's logging is not under test here
    module.to("meta")
    x0 = torch.empty(4, 1, 8, 8, device="meta")
    y = torch.zeros(4, dtype=torch.long, device="meta")
    loss = module.training_step((x0, y), 0)
    assert loss.device.type == "meta" and loss.shape == ()
    assert module._first_bad_step.device.type == "meta"


def test_the_importance_sampler_keeps_the_last_losses_of_each_timestep_on_the_device():
    s = LossSecondMomentSampler(3, history=2)
    s.update(torch.tensor([0, 0, 0, 1]), torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert sorted(s.history[0].tolist()) == [2.0, 3.0]  # the oldest of three dropped
    assert s.counts.tolist() == [2, 1, 0] and not s.warmed_up()
    s.update(torch.tensor([1, 2, 2]), torch.tensor([5.0, 6.0, 7.0]))
    assert s.warmed_up() and sorted(s.history[1].tolist()) == [4.0, 5.0]
    s.update(torch.tensor([2]), torch.tensor([8.0]))  # the ring overwrites the oldest
    assert sorted(s.history[2].tolist()) == [7.0, 8.0]
    t, w = s.to("meta").sample(5, "meta")
    s.update(t, torch.empty(5, device="meta"))
    assert t.device.type == w.device.type == "meta"


def test_a_non_finite_loss_is_caught_at_the_next_check_not_read_every_step(tmp_path):
    cfg = load_config(
        overrides=[
            "data.name=gaussian_mixture",
            "network.name=mlp",
            "train.max_steps=6",
            "train.val_every_n_steps=100",
            "train.log_every_n_steps=3",
            "train.lr=1e30",
        ]
    )
    datamodule, module = build_experiment(cfg)
    reads = []
    check = module.check_finite
    module.check_finite = lambda: (reads.append(module.global_step), check())[1]
    with pytest.raises(NonFiniteLossError, match="non-finite training loss at step"):
        fit(cfg, tmp_path, experiment=(datamodule, module), enable_progress_bar=False)
    assert reads and all(step % 3 == 0 for step in reads), reads  # never every step


def _meta_model(out_channels: int):
    def model(x, t, y):
        assert x.device.type == t.device.type == "meta"
        assert y is None or y.device.type == "meta"
        return torch.empty(x.shape[0], out_channels, *x.shape[2:], device="meta")

    return model


@pytest.mark.parametrize(
    "spec",
    [
        SamplingSpec(guidance=3.0, steps=10),
        SamplingSpec(guidance=3.0, steps=10, guidance_interval=(0.3, 0.7), guidance_rescale=0.5),
        SamplingSpec(guidance=2.0, sampler="ddim", eta=0.5, threshold="dynamic"),
        SamplingSpec(guidance=0.0, variance="learned_range", steps=5),
    ],
    ids=["guided", "interval+rescale", "ddim+dynamic", "learned"],
)
def test_sampling_steps_read_nothing_back_from_the_device(spec):
    process = GaussianDiffusion.from_schedule("cosine", T)
    out = 2 if spec.variance == "learned_range" else 1
    specs = [spec, SamplingSpec(**(spec.as_dict() | {"guidance": 1.0}))]
    labels = torch.zeros(3, dtype=torch.long, device="meta")
    xs = sample_specs(
        _meta_model(out), process, (3, 1, 4, 4), specs,
        generators=[None, None], labels=labels, null_label=5, device="meta",
    )  # fmt: skip
    assert [tuple(x.shape) for x in xs] == [(3, 1, 4, 4)] * 2
    assert {x.device.type for x in xs} == {"meta"}


def test_guidance_weights_drawn_together_are_the_weights_drawn_alone():
    torch.manual_seed(0)
    net = build_network(
        {"name": "mlp", "data_dim": 2, "num_classes": 3, "hidden_dim": 32, "num_blocks": 1}
    ).eval()
    process = GaussianDiffusion.from_schedule("linear", T)
    labels = torch.tensor([0, 1, 2, 1])
    base = {"steps": 8, "guidance_interval": (0.2, 0.9), "seed": 3}
    specs = [SamplingSpec(guidance=w, **base) for w in (0.0, 1.0, 2.5, 4.0)]
    calls = []

    def model(x, t, y):
        calls.append(x.shape[0])
        return net(x, t, y)

    with torch.no_grad():
        together = sample_specs(model, process, (4, 2), specs, labels=labels, null_label=3)
        batched_calls, calls[:] = list(calls), []
        alone = [
            sample(
                model,
                process,
                (4, 2),
                s,
                labels=labels,
                null_label=3,
                generator=torch.Generator().manual_seed(s.seed),
            )  # fmt: skip
            for s in specs
        ]
    for a, b in zip(together, alone):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)  # kernels may reassociate
    assert len(batched_calls) == 8  # one forward per step for all four weights
    assert len(calls) > len(batched_calls)
    assert max(batched_calls) == 2 * 4 * len(specs)  # [x; x] for every weight at once
    with pytest.raises(ValueError, match="differ only in guidance"):
        sample_specs(model, process, (4, 2), [specs[0], SamplingSpec(steps=5)], labels=labels)


def test_sampling_runs_the_network_under_autocast_and_the_math_in_fp32():
    module = tiny_unet_module()
    seen = []
    module.net.register_forward_hook(
        lambda m, args, out: seen.append((torch.is_autocast_enabled("cpu"), out.dtype))
    )
    labels = torch.arange(2)
    spec = SamplingSpec(guidance=2.0, steps=3)
    assert module.sampling_dtype("auto") == torch.float32  # on the CPU
    fp32 = module.sample(labels, spec, precision="32")
    assert {s for s in seen} == {(False, torch.float32)}
    seen.clear()
    bf16 = module.sample(labels, spec, precision="bf16")
    assert {s for s in seen} == {(True, torch.bfloat16)}
    assert bf16.dtype == torch.float32 and torch.isfinite(bf16).all()
    assert (bf16 - fp32).abs().max() < 0.5  # the same chain, in a coarser network precision


def test_compile_stays_within_its_recompile_limit_over_training_validation_and_sampling(
    tmp_path,
):
    """Training, validation, the last short batches and sampling batches of several sizes meet
    one compiled network: it must not run out of recompiles (and fall back to eager)."""
    torch._dynamo.reset()
    cfg = load_config(
        overrides=[
            "data.name=gaussian_mixture",
            "data.n_train=200",
            "data.n_val=100",
            "data.batch_size=64",
            "network.name=mlp",
            "train.max_steps=8",
            "train.val_every_n_steps=4",
            "train.compile=true",
        ]
    )
    datamodule, module = build_experiment(cfg, compile_backend="eager")
    result = fit(cfg, tmp_path, experiment=(datamodule, module), enable_progress_bar=False)
    labels = torch.arange(8) % datamodule.num_classes
    for n, batch in ((8, 8), (8, 3), (5, 512)):
        specs = [SamplingSpec(guidance=w, steps=4) for w in (0.0, 1.0, 3.0)]
        result.module.sample_many(labels[:n], specs, batch_size=batch)
    frames = torch._dynamo.utils.counters["frames"]
    assert frames["ok"] >= 1
    stats = torch._dynamo.utils.counters["stats"]
    limit = torch._dynamo.config.recompile_limit
    assert stats["unique_graphs"] <= limit, dict(stats)
    assert torch._dynamo.config.fail_on_recompile_limit_hit  # a fall-back would be an error
    assert not math.isnan(float(result.trainer.callback_metrics["val/loss_simple"]))


def test_a_trial_given_a_gpu_it_cannot_use_fails_at_once(tmp_path, monkeypatch):
    """A real local Ray that believes it has a GPU (num_gpus=1) gives it to the trial; this
    torch cannot use it, so the trial must fail before training, naming the cause."""
    import ray

    from orchestrator.plan import build_plan
    from orchestrator.sweep import run_sweep

    monkeypatch.chdir(tmp_path)
    sweep = tmp_path / "gpu.yaml"
    sweep.write_text(
        OmegaConf.to_yaml(
            {
                "name": "gpu-trial",
                "base": {
                    "data": {"name": "gaussian_mixture"},
                    "network": {"name": "mlp"},
                    "train": {"max_steps": 2, "val_every_n_steps": 2},
                },
                "tune": {"gpus_per_trial": 1, "max_failures": 0},
            }
        )
    )
    plan = build_plan(sweep)
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False)
    try:
        summary = run_sweep(
            plan,
            tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
            storage_path=str(tmp_path / "runs"),
        )
    finally:
        ray.shutdown()
    (trial,) = summary["trials"]
    assert "CUDA is not usable here" in trial["error"], trial["error"]
    assert "CPU-only build" in trial["error"] or "driver" in trial["error"]
    assert "tune.gpus_per_trial = 0" in trial["error"]
    assert trial["metrics"].get("train/loss") is None  # it never trained
