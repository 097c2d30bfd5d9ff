"""Which timesteps a training batch sees: uniform, or importance-sampled by the loss.

Importance sampling (Nichol & Dhariwal 2021, §3.3) draws t with p_t ∝ √E[L_t²] from a history of
recent per-timestep losses and reweights each sample by 1/(T p_t), so the estimate of Σ_t L_t stays
unbiased while its variance drops. Until every t has a full history, it samples uniformly.

Both samplers draw and update on the batch's device without reading anything back to the host:
a training step on a GPU never waits for the GPU here.
"""

from __future__ import annotations

import torch


class UniformSampler:
    def __init__(self, num_timesteps: int):
        self.num_timesteps = num_timesteps

    def weights(self) -> torch.Tensor:
        return torch.ones(self.num_timesteps, dtype=torch.float64)

    def sample(self, n: int, device, generator: torch.Generator | None = None):
        """(t, weight): n timesteps and their importance weights 1/(T p_t), on ``device``."""
        t = torch.randint(0, self.num_timesteps, (n,), device=device, generator=generator)
        return t, torch.ones(n, device=device)

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """Record per-sample losses at timesteps t (unused by the uniform sampler)."""


class LossSecondMomentSampler(UniformSampler):
    """The last ``history`` losses of every timestep, in a ring per timestep, kept on the device
    of the losses it is given (the order within a ring does not matter: only E[L²] is used)."""

    def __init__(self, num_timesteps: int, history: int = 10, uniform_prob: float = 0.001):
        super().__init__(num_timesteps)
        self.uniform_prob = uniform_prob
        # one ring of `history` slots per timestep, and a last column that takes the writes
        # that must not land (a boolean mask would size its result from the data: a read back)
        self._ring = torch.zeros(num_timesteps, history + 1, dtype=torch.float64)
        self.counts = torch.zeros(num_timesteps, dtype=torch.long)  # losses seen, capped
        self.next = torch.zeros(num_timesteps, dtype=torch.long)  # the ring slot to write next

    @property
    def history(self) -> torch.Tensor:
        """(T, history): the last losses of every timestep, in ring order."""
        return self._ring[:, :-1]

    def to(self, device) -> LossSecondMomentSampler:
        if self._ring.device != torch.device(device):
            self._ring, self.counts, self.next = (
                a.to(device) for a in (self._ring, self.counts, self.next)
            )
        return self

    def warmed_up(self) -> bool:
        return bool(self._warm())

    def _warm(self) -> torch.Tensor:
        return (self.counts >= self.history.shape[1]).all()

    def weights(self) -> torch.Tensor:
        """p_t: uniform until every timestep has a full history (decided on the device)."""
        w = (self.history**2).mean(dim=1).sqrt()
        w = w / w.sum().clamp(min=torch.finfo(w.dtype).tiny)
        w = w * (1 - self.uniform_prob) + self.uniform_prob / self.num_timesteps
        return torch.where(self._warm(), w, torch.full_like(w, 1.0 / self.num_timesteps))

    def sample(self, n: int, device, generator: torch.Generator | None = None):
        self.to(device)
        p = self.weights()
        t = torch.multinomial(p, n, replacement=True, generator=generator)
        weight = 1.0 / (self.num_timesteps * p[t])
        return t, weight.to(torch.float32)

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """Push each sample's loss into its timestep's ring, in batch order; a timestep seen
        more often than ``history`` times in one batch keeps its last ``history`` losses."""
        self.to(t.device)
        k = self.history.shape[1]
        t = t.long()
        order = torch.sort(t, stable=True).indices
        t_sorted = t[order]
        # rank of each sample among the samples of its timestep, in batch order
        first = torch.searchsorted(t_sorted, t_sorted, right=False)
        rank = torch.arange(t.numel(), device=t.device) - first
        # (bincount sizes its output from the data, which on a GPU means a read back)
        seen = torch.zeros_like(self.counts).scatter_add_(0, t, torch.ones_like(t))
        keep = rank >= (seen[t_sorted] - k)  # only the last k of a timestep can stay
        slot = torch.where(keep, (self.next[t_sorted] + rank) % k, k)
        self._ring.index_put_((t_sorted, slot), losses.detach().double()[order])
        self.next = (self.next + seen) % k
        self.counts = (self.counts + seen).clamp(max=k)


TIMESTEP_SAMPLERS = {"uniform": UniformSampler, "importance": LossSecondMomentSampler}


def build_timestep_sampler(name: str, num_timesteps: int) -> UniformSampler:
    if name not in TIMESTEP_SAMPLERS:
        raise ValueError(
            f"unknown timestep sampling {name!r}; expected one of {sorted(TIMESTEP_SAMPLERS)}"
        )
    return TIMESTEP_SAMPLERS[name](num_timesteps)
