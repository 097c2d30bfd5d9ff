"""The reverse process, guidance and likelihood, proven with exact denoisers (items 2, 8-13, 15)."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_modules.diffusion import (
    GaussianDiffusion,
    SamplingSpec,
    bits_per_dim,
    drop_labels,
    gaussian_eps_model,
    get_betas,
    guided_output,
    point_mass_eps_model,
    rescale_guidance,
    sample,
    sample_progressive,
    threshold_x0,
    training_losses,
)

LINEAR = GaussianDiffusion.from_schedule("linear", 1000)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_marginal_matches_iterated_chain():
    """Item 2 vs item 1 iterated t times: same mean and variance within sampling error."""
    p = GaussianDiffusion.from_schedule("cosine", 100)
    n, x0 = 200_000, torch.tensor([1.5, -0.7], dtype=torch.float64)
    g = gen()
    x = x0.expand(n, 2).clone()
    for t in range(60):
        x = p.q_step(x, torch.full((n,), t), torch.randn(n, 2, generator=g, dtype=torch.float64))
    t = torch.full((n,), 59)
    mean, var, _ = p.q_mean_variance(x0.expand(n, 2), t)
    direct = p.q_sample(x0.expand(n, 2), t, torch.randn(n, 2, generator=g, dtype=torch.float64))
    se_mean, se_var = math.sqrt(var[0, 0] / n), var[0, 0] * math.sqrt(2 / n)
    for samples in (x, direct):
        assert torch.allclose(samples.mean(0), mean[0], atol=5 * se_mean)
        assert torch.allclose(samples.var(0), var[0], atol=5 * se_var)


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
def test_respacing_with_all_steps_reproduces_the_chain_exactly(variance):
    p = GaussianDiffusion.from_schedule("linear", 200)
    model = gaussian_eps_model(p)
    a = sample(model, p, (64, 3), SamplingSpec(variance=variance), generator=gen(3))
    b = sample(model, p.respace(200), (64, 3), SamplingSpec(variance=variance), generator=gen(3))
    c = sample(model, p, (64, 3), SamplingSpec(variance=variance, steps=200), generator=gen(3))
    assert torch.equal(a, b) and torch.equal(a, c)


@pytest.mark.parametrize("steps", [None, 50])
def test_gaussian_data_fixed_large_returns_standard_normal(steps):
    """For x_0 ~ N(0, I) the exact ε is √(1-ᾱ_t) x_t and σ² = β_t is the exact reverse variance."""
    model = gaussian_eps_model(LINEAR)
    x = sample(
        model,
        LINEAR,
        (4000, 16),
        SamplingSpec(variance="fixed_large", steps=steps),
        generator=gen(1),
    )
    se = 1 / math.sqrt(x.numel())
    assert abs(x.mean().item()) < 5 * se
    assert abs(x.var().item() - 1) < 5 * math.sqrt(2) * se


def test_gaussian_data_fixed_small_underestimates_the_variance():
    """The mismatch direction: β̃_t < β_t, so `fixed_small` shrinks N(0, I) data (by ~12% at 50
    steps, where the gap between the two variances is large)."""
    model = gaussian_eps_model(LINEAR)
    x = sample(
        model, LINEAR, (4000, 16), SamplingSpec(variance="fixed_small", steps=50), generator=gen(1)
    )
    assert x.var().item() < 0.93


@pytest.mark.parametrize("steps", [None, 50])
def test_point_mass_fixed_small_returns_the_point(steps):
    c = torch.tensor([0.25, -0.5, 0.9])
    model = point_mass_eps_model(LINEAR, c)
    x = sample(
        model, LINEAR, (256, 3), SamplingSpec(variance="fixed_small", steps=steps), generator=gen(2)
    )
    assert torch.allclose(x, c.expand_as(x), atol=1e-5)


def test_point_mass_fixed_large_overshoots_the_true_marginals():
    """With x_0 = c, `fixed_small` is the exact reverse process: its intermediate x_t has the
    true marginal variance 1-ᾱ_t; `fixed_large` adds too much noise (the mismatch direction)."""
    c = torch.zeros(8)
    model = point_mass_eps_model(LINEAR, c)
    probe = 5  # a 0-based timestep near the end of the chain, where β_t/β̃_t is large
    spread = {}
    for variance in ("fixed_small", "fixed_large"):
        for t, x, _ in sample_progressive(
            model, LINEAR, (4000, 8), SamplingSpec(variance=variance), generator=gen(4)
        ):
            if t == probe + 1:  # x is now x_{probe}: the sample at code timestep `probe`
                spread[variance] = x.var().item()
                break
    true_var = 1 - LINEAR.alphas_cumprod[probe].item()
    assert spread["fixed_small"] == pytest.approx(true_var, rel=0.04)
    assert spread["fixed_large"] > 1.1 * true_var


def test_ddim_eta_one_is_the_fixed_small_ancestral_sampler():
    p = GaussianDiffusion.from_schedule("cosine", 100)
    model = gaussian_eps_model(p, std=0.5)
    for steps in (None, 20):
        a = sample(
            model, p, (32, 4), SamplingSpec(variance="fixed_small", steps=steps), generator=gen(5)
        )
        b = sample(
            model, p, (32, 4), SamplingSpec(sampler="ddim", eta=1.0, steps=steps), generator=gen(5)
        )
        assert torch.allclose(a, b, atol=1e-5)


def test_ddim_eta_zero_is_deterministic_and_exact_on_a_point_mass():
    c = torch.tensor([0.3, -0.2])
    model = point_mass_eps_model(LINEAR, c)
    x = sample(
        model, LINEAR, (16, 2), SamplingSpec(sampler="ddim", eta=0.0, steps=10), generator=gen(0)
    )
    assert torch.allclose(x, c.expand_as(x), atol=1e-5)


@pytest.mark.parametrize("prediction", ["x0", "v"])
def test_x0_and_v_models_sample_like_the_eps_model(prediction):
    p = GaussianDiffusion.from_schedule("cosine", 100)
    eps_model = gaussian_eps_model(p, std=0.7)

    def model(x_t, t, y=None):
        eps = eps_model(x_t, t)
        x0 = p.predict_x0_from_eps(x_t, t, eps)
        return x0 if prediction == "x0" else p.v_from_x0_eps(x0, eps, t)

    a = sample(eps_model, p, (32, 3), SamplingSpec(steps=25), generator=gen(6))
    b = sample(model, p, (32, 3), SamplingSpec(steps=25), prediction=prediction, generator=gen(6))
    assert torch.allclose(a, b, atol=1e-4)


def test_learned_range_at_minus_one_samples_like_fixed_small():
    p = GaussianDiffusion.from_schedule("linear", 100)
    eps_model = gaussian_eps_model(p)

    def learned(v):
        return lambda x, t, y=None: torch.cat([eps_model(x, t), torch.full_like(x, v)], dim=1)

    for v, fixed in ((-1.0, "fixed_small"), (1.0, "fixed_large")):
        a = sample(eps_model, p, (32, 3), SamplingSpec(variance=fixed), generator=gen(7))
        b = sample(learned(v), p, (32, 3), SamplingSpec(variance="learned_range"), generator=gen(7))
        # v ignored
        c = sample(learned(v), p, (32, 3), SamplingSpec(variance=fixed), generator=gen(7))
        assert torch.allclose(a, b, atol=1e-5) and torch.equal(a, c)


class CountingModel:
    """A class-conditional toy denoiser that records its calls."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, t, y):
        self.calls.append((x.shape[0], y.clone()))
        return 0.1 * x + (y.to(x.dtype) - 2).reshape(-1, *([1] * (x.ndim - 1)))


def test_guidance_uses_one_doubled_forward_pass():
    model = CountingModel()
    x, t, y = torch.randn(5, 3), torch.full((5,), 10), torch.tensor([0, 1, 2, 0, 1])
    out = guided_output(model, x, t, y, 3.0, null_label=4, num_timesteps=100)
    assert len(model.calls) == 1 and model.calls[0][0] == 10
    assert torch.equal(model.calls[0][1], torch.cat([y, torch.full_like(y, 4)]))
    cond, uncond = model(x, t, y), model(x, t, torch.full_like(y, 4))
    assert torch.allclose(out, uncond + 3.0 * (cond - uncond))


def test_guidance_weight_zero_and_one_are_the_unconditional_and_conditional_models():
    model = CountingModel()
    x, t, y = torch.randn(5, 3), torch.full((5,), 10), torch.tensor([0, 1, 2, 0, 1])
    null = torch.full_like(y, 4)
    for w, labels in ((0.0, null), (1.0, y)):
        model.calls.clear()
        out = guided_output(model, x, t, y, w, null_label=4, num_timesteps=100)
        assert len(model.calls) == 1 and model.calls[0][0] == 5  # no doubled batch needed
        assert torch.equal(out, model(x, t, labels))


def test_guidance_interval_applies_guidance_only_inside():
    model = CountingModel()
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 2, 3])
    t = torch.tensor([0, 39, 40, 99])  # spec times 1, 40, 41, 100 of T = 100
    out = guided_output(model, x, t, y, 5.0, null_label=4, num_timesteps=100, interval=(0.4, 0.8))
    cond, uncond = model(x, t, y), model(x, t, torch.full_like(y, 4))
    inside = torch.tensor([False, True, True, False])
    assert torch.allclose(out[inside], (uncond + 5.0 * (cond - uncond))[inside])
    assert torch.allclose(out[~inside], cond[~inside])


def test_guidance_rescale_matches_the_conditional_std():
    g = gen(8)
    cond, guided = torch.randn(6, 50, generator=g), 4 * torch.randn(6, 50, generator=g)
    assert torch.equal(rescale_guidance(guided, cond, 0.0), guided)
    full = rescale_guidance(guided, cond, 1.0)
    assert torch.allclose(full.std(dim=1), cond.std(dim=1), rtol=1e-5)
    half = rescale_guidance(guided, cond, 0.5)
    assert torch.allclose(half, 0.5 * full + 0.5 * guided)


def test_guided_sampling_moves_toward_the_class():
    """End to end: a 2-class exact model (point masses at ±1, N(0, I) unconditional):
    w = 0 samples the unconditional model, w = 1 the class exactly, w in between interpolates."""
    p = GaussianDiffusion.from_schedule("linear", 100)
    plus, minus = point_mass_eps_model(p, torch.ones(2)), point_mass_eps_model(p, -torch.ones(2))
    uncond = gaussian_eps_model(p)

    def model(x, t, y):
        return torch.where(
            (y == 0)[:, None], plus(x, t), torch.where((y == 1)[:, None], minus(x, t), uncond(x, t))
        )

    y = torch.zeros(200, dtype=torch.long)
    means = [
        sample(
            model, p, (200, 2), SamplingSpec(guidance=w), labels=y, null_label=2, generator=gen(9)
        )
        .mean()
        .item()
        for w in (0.0, 1.0, 0.5)
    ]
    assert abs(means[0]) < 0.3 and means[1] == pytest.approx(1.0, abs=1e-4)
    assert 0.3 < means[2] < 0.99


def test_thresholding():
    x0 = torch.tensor([[0.5, -3.0, 2.0, 0.1], [0.2, 0.3, -0.4, 0.9]])
    assert torch.equal(threshold_x0(x0, "none"), x0)
    assert threshold_x0(x0, "clip").abs().max() <= 1
    dyn = threshold_x0(x0, "dynamic", percentile=1.0)
    assert dyn.abs().max() <= 1 + 1e-6
    assert torch.allclose(dyn[0], x0[0] / 3.0)  # scaled by its own max |x0|
    assert torch.equal(dyn[1], x0[1])  # s = max(1, ...) leaves in-range samples alone


def test_drop_labels_rate():
    y = torch.zeros(20000, dtype=torch.long)
    dropped = drop_labels(y, 0.2, null_label=10, generator=gen(0))
    assert set(dropped.unique().tolist()) == {0, 10}
    assert (dropped == 10).float().mean().item() == pytest.approx(0.2, abs=0.02)


def test_bits_per_dim_is_finite_and_lower_for_the_exact_model():
    p = GaussianDiffusion.from_schedule("linear", 200)
    std = 0.5
    x0 = ((torch.randn(64, 8, generator=gen(10)) * std).clamp(-1, 1) * 127.5).round() / 127.5
    exact = gaussian_eps_model(p, std=std)
    wrong = gaussian_eps_model(p, std=1.5)
    bpd = {
        name: bits_per_dim(m, p, x0, variance=v, generator=gen(11))["total_bpd"].mean().item()
        for name, m in (("exact", exact), ("wrong", wrong))
        for v in ["fixed_large"]
    }
    assert all(math.isfinite(b) and b > 0 for b in bpd.values())
    assert bpd["exact"] < bpd["wrong"] - 0.05
    # The prior term is ~0 for a good schedule; the decoder term is finite.
    res = bits_per_dim(exact, p, x0, generator=gen(11))
    assert res["prior_bpd"].max() < 1e-3 and torch.isfinite(res["vb"]).all()


def test_hybrid_loss_trains_only_the_variance_through_l_vlb():
    p = GaussianDiffusion.from_schedule("linear", 50)
    mean_w, var_w = torch.tensor(0.5, requires_grad=True), torch.tensor(0.1, requires_grad=True)

    def model(x, t, y=None):
        return torch.cat([mean_w * x, torch.tanh(var_w * x)], dim=1)

    x0, t, noise = (
        torch.rand(16, 2) * 2 - 1,
        torch.randint(0, 50, (16,), generator=gen(1)),
        torch.randn(16, 2),
    )
    terms = training_losses(model, p, x0, t, noise, variance="learned_range")
    assert set(terms) == {"loss", "mse", "vb"}
    (g_mean_vb,) = torch.autograd.grad(
        terms["vb"].sum(), mean_w, retain_graph=True, allow_unused=True
    )
    assert g_mean_vb is None or g_mean_vb == 0  # mean detached inside L_vlb
    (g_var,) = torch.autograd.grad(terms["loss"].sum(), var_w)
    assert g_var != 0
    fixed = training_losses(lambda x, t, y=None: mean_w * x, p, x0, t, noise)
    assert torch.equal(fixed["loss"], fixed["mse"])


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: get_betas("quadratic", 10), "unknown noise schedule 'quadratic'"),
        (lambda: get_betas("linear", 0), "T must be an integer >= 1"),
        (lambda: GaussianDiffusion(torch.tensor([0.1, 1.0])), r"beta\[1\] = 1.0"),
        (lambda: GaussianDiffusion(torch.tensor([0.0, 0.5])), r"beta\[0\] = 0.0"),
        (
            lambda: sample(lambda x, t, y: x, LINEAR, (2, 2), SamplingSpec(guidance=float("nan"))),
            "finite",
        ),
        (
            lambda: sample(lambda x, t, y: x, LINEAR, (2, 2), SamplingSpec(guidance=float("inf"))),
            "finite",
        ),
        (
            lambda: sample(lambda x, t, y: x, LINEAR, (2, 2), SamplingSpec(steps=1001)),
            r"\[1, T=1000\]",
        ),
        (lambda: LINEAR.respace(2000), "between 1 and T=1000"),
        (
            lambda: sample(lambda x, t, y: x, LINEAR, (2, 2), SamplingSpec(variance="huge")),
            "unknown variance",
        ),
        (
            lambda: sample(lambda x, t, y: x, LINEAR, (2, 2), SamplingSpec(sampler="euler")),
            "unknown sampler",
        ),
        (
            lambda: sample(lambda x, t, y: x, LINEAR, (2, 2), prediction="score"),
            "unknown prediction",
        ),
        (lambda: sample(lambda x, t, y: x[:, :1], LINEAR, (2, 2)), r"model output shape \(2, 1\)"),
        (
            lambda: sample(
                lambda x, t, y: x, LINEAR, (2, 2), SamplingSpec(variance="learned_range")
            ),
            "doubled",
        ),
        (
            lambda: sample(lambda x, t, y: x, LINEAR, (2, 2), labels=torch.zeros(3).long()),
            "labels must have shape",
        ),
        (
            lambda: LINEAR.q_sample(torch.zeros(2, 3), torch.zeros(3).long(), torch.zeros(2, 3)),
            "t must have shape",
        ),
        (
            lambda: sample(
                lambda x, t, y: x, LINEAR, (2, 2), SamplingSpec(guidance_interval=(0.8, 0.2))
            ),
            "interval",
        ),
        (lambda: threshold_x0(torch.zeros(2, 2), "soft"), "unknown x0 threshold"),
    ],
)
def test_clear_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()
