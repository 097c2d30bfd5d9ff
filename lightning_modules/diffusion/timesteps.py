"""Which timesteps a training batch sees: uniform, or importance-sampled by the loss.

Importance sampling (Nichol & Dhariwal 2021, §3.3) draws t with p_t ∝ √E[L_t²] from a history of
recent per-timestep losses and reweights each sample by 1/(T p_t), so the estimate of Σ_t L_t stays
unbiased while its variance drops. Until every t has a full history, it samples uniformly.
"""

from __future__ import annotations

import torch


class UniformSampler:
    def __init__(self, num_timesteps: int):
        self.num_timesteps = num_timesteps

    def weights(self) -> torch.Tensor:
        return torch.ones(self.num_timesteps, dtype=torch.float64)

    def sample(self, n: int, device, generator: torch.Generator | None = None):
        """(t, weight): n timesteps and their importance weights 1/(T p_t)."""
        p = self.weights() / self.weights().sum()
        t = torch.multinomial(p, n, replacement=True, generator=generator)
        weight = 1.0 / (self.num_timesteps * p[t])
        return t.to(device), weight.to(device=device, dtype=torch.float32)

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """Record per-sample losses at timesteps t (unused by the uniform sampler)."""


class LossSecondMomentSampler(UniformSampler):
    def __init__(self, num_timesteps: int, history: int = 10, uniform_prob: float = 0.001):
        super().__init__(num_timesteps)
        self.uniform_prob = uniform_prob
        self.history = torch.zeros(num_timesteps, history, dtype=torch.float64)
        self.counts = torch.zeros(num_timesteps, dtype=torch.long)

    def warmed_up(self) -> bool:
        return bool((self.counts >= self.history.shape[1]).all())

    def weights(self) -> torch.Tensor:
        if not self.warmed_up():
            return super().weights()
        w = (self.history**2).mean(dim=1).sqrt()
        w = w / w.sum()
        return w * (1 - self.uniform_prob) + self.uniform_prob / self.num_timesteps

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        k = self.history.shape[1]
        for ti, loss in zip(t.tolist(), losses.detach().double().cpu().tolist()):
            if self.counts[ti] == k:  # drop the oldest loss of a full history
                self.history[ti, :-1] = self.history[ti, 1:].clone()
                self.history[ti, -1] = loss
            else:
                self.history[ti, self.counts[ti]] = loss
                self.counts[ti] += 1


TIMESTEP_SAMPLERS = {"uniform": UniformSampler, "importance": LossSecondMomentSampler}


def build_timestep_sampler(name: str, num_timesteps: int) -> UniformSampler:
    if name not in TIMESTEP_SAMPLERS:
        raise ValueError(
            f"unknown timestep sampling {name!r}; expected one of {sorted(TIMESTEP_SAMPLERS)}"
        )
    return TIMESTEP_SAMPLERS[name](num_timesteps)
