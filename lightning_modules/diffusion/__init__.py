"""The diffusion math of ``docs/diffusion-math.md``, one small function per item.

Timestep convention (stated once, here): code indexes timesteps **0..T-1**; code index ``t``
holds the spec's quantity at time ``t + 1``. So ``betas[0]`` is β_1, ``alphas_cumprod[t]`` is
ᾱ_{t+1}, ``alphas_cumprod_prev[0]`` is ᾱ_0 = 1, and ``t == 0`` is the last reverse step (where
no noise is added and L_0, the decoder term, applies). Every per-timestep array is float64,
built once; coefficients are gathered per sample and cast to the data's dtype.

Guidance convention: ε̂ = ε_u + w (ε_c - ε_u): w = 0 unconditional, w = 1 conditional.

Nothing here imports Ray, MLflow or a network: a model is any callable
``model(x_t, t, y) -> output`` returning ε, x_0 or v (with doubled channels for
`learned_range`), with ``t`` the training-chain timesteps and ``y`` labels (the null label
meaning unconditional).
"""

from .exact import gaussian_eps_model, point_mass_eps_model
from .guidance import (
    GUIDANCE_CONVENTION,
    THRESHOLDS,
    cfg_combine,
    check_guidance_weight,
    drop_labels,
    from_ho_salimans,
    guidance_applies,
    guidance_mode,
    guided_forward,
    guided_output,
    in_guidance_interval,
    rescale_guidance,
    threshold_x0,
    to_ho_salimans,
)
from .losses import (
    LAMBDA_VLB,
    bits_per_dim,
    discretized_gaussian_log_likelihood,
    mean_flat,
    normal_kl,
    prior_bpd,
    training_losses,
    vb_terms_bpd,
)
from .process import GaussianDiffusion, Prediction, space_timesteps
from .sampling import (
    SAMPLERS,
    SAMPLING_SPEC_KEYS,
    ReverseMoments,
    SamplingSpec,
    ancestral_step,
    batch_key,
    ddim_step,
    p_mean_variance,
    sample,
    sample_progressive,
    sample_specs,
)
from .schedules import (
    SCHEDULES,
    cosine_betas,
    get_betas,
    linear_betas,
    rescale_zero_terminal_snr,
    sigmoid_betas,
    validate_betas,
)
from .variance import VARIANCES, FixedLarge, FixedSmall, LearnedRange, get_variance

__all__ = [name for name in dir() if not name.startswith("_")]
