"""Losses and likelihood (spec item 13): L_simple, the KL terms and discretised-Gaussian decoder
of L_vlb, the hybrid loss, and the full-chain NLL bound in bits per dimension.

Data is assumed scaled to [-1, 1] in 256 bins. Per-sample values are means over all non-batch
dimensions; likelihood terms are in bits (per dimension).
"""

from __future__ import annotations

import math

import torch

from .guidance import ModelFn
from .process import GaussianDiffusion, Prediction
from .sampling import p_mean_variance
from .variance import VarianceChoice, get_variance, split_variance_output

LAMBDA_VLB = 0.001  # item 13: weight of L_vlb in the hybrid loss (Nichol & Dhariwal 2021)


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=tuple(range(1, x.ndim)))


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats."""
    return 0.5 * (
        -1.0
        + logvar2
        - logvar1
        + (logvar1 - logvar2).exp()
        + (mean1 - mean2) ** 2 * (-logvar2).exp()
    )


def discretized_gaussian_log_likelihood(
    x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor
) -> torch.Tensor:
    """Item 13, L_0: log-probability (nats, elementwise) of x in 256 bins on [-1, 1] under a
    Gaussian decoder; the edge bins take the tails (as in Ho et al. 2020)."""
    centered = x - mean
    inv_std = (-log_scale).exp()
    upper = inv_std * (centered + 1.0 / 255.0)
    lower = inv_std * (centered - 1.0 / 255.0)
    log_cdf_upper = torch.special.log_ndtr(upper)
    log_one_minus_cdf_lower = torch.special.log_ndtr(-lower)
    log_delta = (torch.special.ndtr(upper) - torch.special.ndtr(lower)).clamp(min=1e-12).log()
    return torch.where(
        x < -0.999, log_cdf_upper, torch.where(x > 0.999, log_one_minus_cdf_lower, log_delta)
    )


def vb_terms_bpd(
    process: GaussianDiffusion,
    output: torch.Tensor,
    x0: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    *,
    prediction: str | Prediction = Prediction.EPS,
    variance: str | VarianceChoice = "fixed_small",
) -> torch.Tensor:
    """Item 13: the per-sample L_vlb term at t in bits/dim — KL(q(x_{t-1}|x_t,x_0) ‖ p_θ) for
    t >= 2 (code t >= 1) and the decoder NLL -log p_θ(x_0|x_1) at t = 1 (code t = 0)."""
    true_mean, _, true_log_var = process.posterior_mean_variance(x0, x_t, t)
    m = p_mean_variance(process, output, x_t, t, prediction=prediction, variance=variance)
    kl = mean_flat(normal_kl(true_mean, true_log_var, m.mean, m.log_variance)) / math.log(2.0)
    nll = -mean_flat(discretized_gaussian_log_likelihood(x0, m.mean, 0.5 * m.log_variance))
    return torch.where(t == 0, nll / math.log(2.0), kl)


def prior_bpd(process: GaussianDiffusion, x0: torch.Tensor) -> torch.Tensor:
    """L_T = KL(q(x_T | x_0) ‖ N(0, I)) in bits/dim; no parameters, near 0 for a good schedule."""
    t = torch.full((x0.shape[0],), process.num_timesteps - 1, device=x0.device, dtype=torch.long)
    mean, _, log_var = process.q_mean_variance(x0, t)
    return mean_flat(
        normal_kl(mean, log_var, torch.zeros_like(mean), torch.zeros_like(mean))
    ) / math.log(2.0)


def training_losses(
    model: ModelFn,
    process: GaussianDiffusion,
    x0: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    prediction: str | Prediction = Prediction.EPS,
    variance: str | VarianceChoice = "fixed_small",
    lambda_vlb: float = LAMBDA_VLB,
) -> dict[str, torch.Tensor]:
    """Per-sample training loss at timesteps t: L_simple (item 13), or for `learned_range` the
    hybrid L_simple + λ·L_vlb, where L_vlb = T·L_t estimates the sum over t and the mean is
    detached inside it so that L_vlb trains only the variance."""
    variance = get_variance(variance)
    x_t = process.q_sample(x0, t, noise)
    output = model(x_t, process.model_timesteps(t), labels)
    pred, v = split_variance_output(output, variance, x0.shape[1])
    target = process.training_target(prediction, x0, noise, t)
    terms = {"mse": mean_flat((target.to(pred.dtype) - pred) ** 2)}
    if variance.learned:
        frozen = torch.cat([pred.detach(), v], dim=1)
        terms["vb"] = vb_terms_bpd(
            process, frozen, x0, x_t, t, prediction=prediction, variance=variance
        )
        terms["loss"] = terms["mse"] + lambda_vlb * process.num_timesteps * terms["vb"]
    else:
        terms["loss"] = terms["mse"]
    return terms


@torch.no_grad()
def bits_per_dim(
    model: ModelFn,
    process: GaussianDiffusion,
    x0: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    prediction: str | Prediction = Prediction.EPS,
    variance: str | VarianceChoice = "fixed_small",
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Item 13: the full-chain NLL bound L_T + Σ_{t>=2} L_{t-1} + L_0 in bits/dim, per sample.

    Returns ``total_bpd`` (N,), ``prior_bpd`` (N,), ``vb`` (N, T) and ``mse`` (N, T, the ε error).
    Costs T network evaluations per sample: use a fixed subset for validation.
    """
    N, T = x0.shape[0], process.num_timesteps
    vb, mse = x0.new_zeros(N, T), x0.new_zeros(N, T)
    channels = x0.shape[1]
    for i in reversed(range(T)):
        t = torch.full((N,), i, device=x0.device, dtype=torch.long)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        x_t = process.q_sample(x0, t, noise)
        output = model(x_t, process.model_timesteps(t), labels)
        vb[:, i] = vb_terms_bpd(
            process, output, x0, x_t, t, prediction=prediction, variance=variance
        )
        pred, _ = split_variance_output(output, get_variance(variance), channels)
        eps, _ = process.eps_x0_from_prediction(pred, prediction, x_t, t)
        mse[:, i] = mean_flat((eps - noise) ** 2)
    prior = prior_bpd(process, x0)
    return {"total_bpd": vb.sum(dim=1) + prior, "prior_bpd": prior, "vb": vb, "mse": mse}
