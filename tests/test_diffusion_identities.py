"""Property tests of the spec's identities (items 1-10, 14, 15) over random t, shapes and dtypes."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_modules.diffusion import (
    SCHEDULES,
    FixedLarge,
    FixedSmall,
    GaussianDiffusion,
    LearnedRange,
    cfg_combine,
    get_betas,
    rescale_zero_terminal_snr,
)

PROCESSES = {
    (name, T): GaussianDiffusion.from_schedule(name, T) for name in SCHEDULES for T in (1, 7, 1000)
}
TOL = {torch.float64: 1e-9, torch.float32: 2e-3}
# Per-sample tolerances are ULPS machine epsilons of the dtype times the size of that sample's own
# terms, amplified by that sample's own conditioning (e.g. 1/√ᾱ_t for x̂_0 from ε). Never take
# the tolerance from the batch's worst sample: a cosine batch holding t = T would then allow
# errors of order 1 in every other sample. Measured rounding errors stay below 2 epsilons.
ULPS = 8
EPS64 = torch.finfo(torch.float64).eps


def per_sample_max(x: torch.Tensor) -> torch.Tensor:
    """max |x| over each sample's elements, float64, shape (N,)."""
    return x.double().abs().reshape(x.shape[0], -1).amax(dim=1)


def assert_close_per_sample(actual, expected, tol, what):
    """|actual - expected| <= tol[i] for every element of sample i (tol: (N,), broadcast)."""
    err = per_sample_max(actual.double() - expected.double())
    bad = err > tol
    assert not bool(bad.any()), (
        f"{what}: samples {bad.nonzero().flatten().tolist()} off by {err[bad].tolist()}, "
        f"tolerances {tol[bad].tolist()}"
    )


@st.composite
def batch(draw, need_t_ge_2=False):
    """A process, a batch shape, a dtype, per-sample timesteps, and random tensors."""
    name = draw(st.sampled_from(sorted(SCHEDULES)))
    T = draw(st.sampled_from([7, 1000] if need_t_ge_2 else [1, 7, 1000]))
    process = PROCESSES[(name, T)]
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    shape = draw(st.sampled_from([(3,), (2, 5), (4, 1, 3, 3), (2, 3, 4, 4)]))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    lo = 1 if need_t_ge_2 else 0
    t = torch.randint(lo, T, (shape[0],), generator=g)
    a, b, c = (torch.randn(shape, generator=g, dtype=torch.float64).to(dtype) for _ in range(3))
    return process, t, a, b, c, dtype


def close(x, y, dtype):
    tol = TOL[dtype]
    return torch.allclose(x.double(), y.double(), rtol=tol, atol=tol)


@settings(max_examples=60, deadline=None)
@given(batch())
def test_eps_form_mean_equals_posterior_mean_at_predicted_x0(data):
    """Item 5 = item 3 at x̂_0 of item 4, for any ε."""
    process, t, x_t, eps, _, dtype = data
    x0_hat = process.predict_x0_from_eps(x_t, t, eps)
    mu_tilde, _, _ = process.posterior_mean_variance(x0_hat, x_t, t)
    # Per sample: relative to the size of that sample's summands on both sides (x̂_0 is large
    # where ᾱ_t is tiny), plus the float64 rounding of the schedule arrays, which the identity
    # amplifies by 1/(1-ᾱ_t) (1 - ᾱ_t is tiny near t = 1).
    xd, ed = x_t.double(), eps.double()
    c = {n: process.coef(n, t, xd) for n in ("alphas", "betas", "sqrt_one_minus_alphas_cumprod")}
    k = c["betas"] / c["sqrt_one_minus_alphas_cumprod"]
    terms = per_sample_max(
        (xd.abs() + k * ed.abs()) / c["alphas"].sqrt()
        + (process.coef("posterior_mean_coef_x0", t, xd) * x0_hat.double()).abs()
        + (process.coef("posterior_mean_coef_xt", t, xd) * xd).abs()
    )
    ab = process.alphas_cumprod[t]
    tol = ULPS * (torch.finfo(dtype).eps + EPS64 / (1 - ab)) * terms
    assert_close_per_sample(process.eps_mean(x_t, t, eps), mu_tilde, tol, "eps_mean vs mu_tilde")


@pytest.mark.parametrize("name", sorted(SCHEDULES))
@pytest.mark.parametrize("T", [2, 10, 1000])
def test_posterior_variance_is_the_bayes_product(name, T):
    """Item 3: 1/β̃_t = α_t/β_t + 1/(1 - ᾱ_{t-1}) for t >= 2, and β̃_1 = 0."""
    p = GaussianDiffusion.from_schedule(name, T)
    precision = p.alphas[1:] / p.betas[1:] + 1 / (1 - p.alphas_cumprod_prev[1:])
    assert torch.allclose(1 / p.posterior_variance[1:], precision, rtol=1e-10)
    assert p.posterior_variance[0] == 0
    assert p.posterior_log_variance_clipped[0] == p.posterior_variance[1].log()


@pytest.mark.parametrize("T", [2, 10, 1000])
def test_posterior_mean_is_the_bayes_product(T):
    """Item 3: μ̃ is the precision-weighted combination of the two Gaussian factors
    q(x_t | x_{t-1}) (item 1, as a function of x_{t-1}) and q(x_{t-1} | x_0) (item 2)."""
    p = GaussianDiffusion.from_schedule("cosine", T)
    g = torch.Generator().manual_seed(0)
    x0, xt = (
        torch.randn(T, 3, generator=g, dtype=torch.float64),
        torch.randn(T, 3, generator=g, dtype=torch.float64),
    )
    t = torch.arange(T)
    a, b, ab_prev = (p.coef(n, t, xt) for n in ("alphas", "betas", "alphas_cumprod_prev"))
    prec = a / b + 1 / (1 - ab_prev)
    bayes = (a.sqrt() / b * xt + ab_prev.sqrt() / (1 - ab_prev) * x0) / prec
    mean, _, _ = p.posterior_mean_variance(x0, xt, t)
    assert torch.allclose(mean[1:], bayes[1:], rtol=1e-10, atol=1e-12)
    assert torch.allclose(mean[0], x0[0], atol=1e-12)  # at t = 1 the posterior is x_0 itself


@settings(max_examples=60, deadline=None)
@given(batch(), st.floats(-3, 8))
def test_cfg_mean_identity(data, w):
    """Item 10: plugging ε̂ into item 5 gives μ̂ = (1-w) μ_u + w μ_c."""
    process, t, x_t, eps_u, eps_c, dtype = data
    mu = lambda e: process.eps_mean(x_t, t, e)  # noqa: E731
    guided = mu(cfg_combine(eps_u, eps_c, w))
    expected = (1 - w) * mu(eps_u) + w * mu(eps_c)
    # Per sample: the size of that sample's terms of μ (x_t/√α_t and β_t/(√(1-ᾱ_t)√α_t)·ε),
    # times the weights' amplification 1 + 2|w|.
    xd = x_t.double()
    a = process.coef("alphas", t, xd).sqrt()
    k = process.coef("betas", t, xd) / process.coef("sqrt_one_minus_alphas_cumprod", t, xd)
    terms = per_sample_max((xd.abs() + k * (eps_u.double().abs() + eps_c.double().abs())) / a)
    tol = ULPS * torch.finfo(dtype).eps * (1 + 2 * abs(w)) * terms
    assert_close_per_sample(guided, expected, tol, f"guided mean at w={w}")


@settings(max_examples=60, deadline=None)
@given(batch())
def test_score_identity(data):
    """Item 6: for x_t = √ᾱ x_0 + √(1-ᾱ) ε, -ε/√(1-ᾱ) equals ∇ log N(x_t; √ᾱ x_0, (1-ᾱ) I)."""
    process, t, x0, eps, _, dtype = data
    x_t = process.q_sample(x0, t, eps)
    # The reference gradient in float64 (in float32, 1 - ᾱ_t itself would carry a relative error
    # of eps32/(1-ᾱ_t), 1e-3 near t = 1), at the exact x_t of these inputs.
    x_t64 = process.q_sample(x0.double(), t, eps.double()).requires_grad_(True)
    mean, var, _ = process.q_mean_variance(x0.double(), t)
    log_q = (-0.5 * (x_t64 - mean) ** 2 / var).sum()
    (grad,) = torch.autograd.grad(log_q, x_t64)
    # Per sample: the score's size |ε|/√(1-ᾱ_t) in the dtype; the float64 reference's own
    # rounding is amplified by 1/(1-ᾱ_t) on top (x_t - mean and 1 - ᾱ_t both cancel).
    ab = process.alphas_cumprod[t]
    size = (1 + per_sample_max(x0) + per_sample_max(eps)) / (1 - ab).sqrt()
    tol = ULPS * (torch.finfo(dtype).eps + EPS64 / (1 - ab)) * size
    assert_close_per_sample(process.score_from_eps(x_t, t, eps), grad, tol, "score")


@settings(max_examples=60, deadline=None)
@given(batch())
def test_x0_eps_v_round_trips(data):
    """Item 7: every prediction type converts to the same (ε, x_0) through the one helper."""
    process, t, x0, eps, _, dtype = data
    x_t = process.q_sample(x0, t, eps)
    v = process.v_from_x0_eps(x0, eps, t)
    # Per sample, from that sample's own timestep: ε from x_0 divides by √(1-ᾱ_t), x_0 from ε by
    # √ᾱ_t; x_0 from v (√ᾱ_t x_t - √(1-ᾱ_t) v) divides by nothing.
    ab = process.alphas_cumprod[t]
    magnitude = 1 + torch.maximum(per_sample_max(x0), per_sample_max(eps))
    size = ULPS * torch.finfo(dtype).eps * magnitude
    tol_eps = {"x0": size / (1 - ab).sqrt(), "v": size / (1 - ab).sqrt()}
    tol_x0 = {"eps": size / ab.sqrt(), "v": size}
    for pred_type, output in (("eps", eps), ("x0", x0), ("v", v)):
        eps_hat, x0_hat = process.eps_x0_from_prediction(output, pred_type, x_t, t)
        if pred_type != "eps":
            assert_close_per_sample(eps_hat, eps, tol_eps[pred_type], f"eps from {pred_type}")
        if pred_type != "x0":
            assert_close_per_sample(x0_hat, x0, tol_x0[pred_type], f"x0 from {pred_type}")
    assert close(process.training_target("v", x0, eps, t), v, dtype)


def test_learned_range_endpoints_equal_fixed_choices():
    """Item 8: v = -1 is `fixed_small`, v = +1 is `fixed_large`, at every t (t = 1 included)."""
    p = GaussianDiffusion.from_schedule("linear", 1000)
    t = torch.arange(1000)
    x = torch.zeros(1000, 2)
    lr = LearnedRange()
    small = FixedSmall().log_variance(p, t, x)
    large = FixedLarge().log_variance(p, t, x)
    assert torch.allclose(lr.log_variance(p, t, x, -torch.ones_like(x)), small.expand_as(x))
    assert torch.allclose(lr.log_variance(p, t, x, torch.ones_like(x)), large.expand_as(x))
    assert torch.allclose(large[1:, 0].double().exp(), p.betas[1:], rtol=1e-6)
    assert torch.allclose(small[1:, 0].double().exp(), p.posterior_variance[1:], rtol=1e-6)
    mid = lr.log_variance(p, t, x, torch.zeros_like(x))
    assert torch.all(mid[1:] > small[1:]) and torch.all(mid[1:] < large[1:])


@pytest.mark.parametrize("name", sorted(SCHEDULES))
@pytest.mark.parametrize("T", [1, 2, 3, 10, 50, 1000, 4000])
def test_schedules_are_valid_float64_for_any_T(name, T):
    betas = get_betas(name, T)
    assert betas.dtype == torch.float64 and betas.shape == (T,)
    assert torch.all((betas > 0) & (betas < 1))
    p = GaussianDiffusion(betas)
    assert torch.all(p.alphas_cumprod[1:] < p.alphas_cumprod[:-1])


def test_linear_and_cosine_match_the_spec():
    """Item 14: linear from 1e-4 to 0.02 at T = 1000 (scaled by 1000/T), cosine's ᾱ = f(t)/f(0)."""
    lin = get_betas("linear", 1000)
    assert lin[0].item() == pytest.approx(1e-4) and lin[-1].item() == pytest.approx(0.02)
    assert get_betas("linear", 500)[-1].item() == pytest.approx(0.04)
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    ab = GaussianDiffusion.from_schedule("cosine", 1000).alphas_cumprod
    for t in (1, 250, 500, 900):
        assert ab[t - 1].item() == pytest.approx(f(t / 1000) / f(0), rel=1e-9)


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_zero_terminal_snr_rescaling(name):
    betas = get_betas(name, 1000)
    p0 = GaussianDiffusion(betas)
    p = GaussianDiffusion(rescale_zero_terminal_snr(betas))
    assert p.alphas_cumprod[0].item() == pytest.approx(p0.alphas_cumprod[0].item(), rel=1e-9)
    assert p.alphas_cumprod[-1].item() < 3e-7  # SNR at T is (almost) zero
    assert torch.all((p.betas > 0) & (p.betas < 1))
    # √ᾱ is an affine map of the original √ᾱ (Lin et al. 2023, Algorithm 1).
    a, b = p0.sqrt_alphas_cumprod[:-1], p.sqrt_alphas_cumprod[:-1]
    slope = (b[1] - b[0]) / (a[1] - a[0])
    assert torch.allclose(b - b[0], slope * (a - a[0]), atol=1e-9)


def test_respacing_coefficients():
    """Item 15: ᾱ'_i = ᾱ_{s_i}, β'_i = 1 - ᾱ'_i/ᾱ'_{i-1}, model timesteps mapped."""
    p = GaussianDiffusion.from_schedule("linear", 1000)
    r = p.respace(50)
    S = r.timestep_map
    assert S[0] == 0 and S[-1] == 999 and len(S) == 50
    assert torch.allclose(r.alphas_cumprod, p.alphas_cumprod[S], rtol=1e-12)
    assert torch.equal(p.respace(1000).betas, p.betas)
    rr = r.respace([0, 10, 49])  # respacing composes: timesteps map back to the training chain
    assert rr.timestep_map.tolist() == [S[0].item(), S[10].item(), S[49].item()]
