"""The LightningModule: trains a DDPM with classifier-free guidance and samples it.

It receives its denoiser network and diffusion process; the config only carries the training
choices (loss, prediction, optimiser, label dropout). EMA of the weights is Lightning's
``WeightAveraging`` callback with torch's EMA (see ``train.py``): validation, the end of training
and every checkpoint's ``state_dict`` use the averaged weights.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from .diffusion import (
    GUIDANCE_CONVENTION,
    GaussianDiffusion,
    SamplingSpec,
    bits_per_dim,
    drop_labels,
    get_variance,
    sample_specs,
    training_losses,
)
from .diffusion.timesteps import build_timestep_sampler

log = logging.getLogger(__name__)
CHECKPOINT_KEY = "ddpm_sweep"


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite."""


BATCH_SEED_STRIDE = 1_000_003  # batch b > 0 of a spec of seed s draws from seed s + b x this


def batch_seed(seed: int, batch: int) -> int:
    """The noise seed of a spec's ``batch``-th batch: the spec's own for the first (a cell of
    one batch is seeded as it always was), then one apart per batch."""
    return seed + BATCH_SEED_STRIDE * batch


class DiffusionModule(pl.LightningModule):
    def __init__(
        self,
        net: nn.Module,
        process: GaussianDiffusion,
        cfg: DictConfig,
        data_shape: tuple[int, ...],
    ):
        super().__init__()
        self.net = net
        self.data_shape = tuple(int(d) for d in data_shape)
        self.process = process
        self.cfg = cfg
        self.num_classes = int(getattr(net, "num_classes", 0) or 0)
        self.null_label = self.num_classes if self.num_classes else None
        self.variance = get_variance(cfg.diffusion.variance)
        self.timestep_sampler = build_timestep_sampler(
            cfg.diffusion.timestep_sampling, process.num_timesteps
        )
        # The first step whose loss was not finite (-1: none yet), kept on the device and read
        # only every `train.log_every_n_steps` steps and before a validation or checkpoint.
        self._first_bad_step: torch.Tensor | None = None

    # -- training ---------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        return self.net(x, t, y)

    def _losses(self, x0, y, t, noise) -> dict[str, torch.Tensor]:
        return training_losses(
            self.net,
            self.process,
            x0,
            t,
            noise,
            y,
            prediction=self.cfg.diffusion.prediction,
            variance=self.variance,
            lambda_vlb=self.cfg.diffusion.lambda_vlb,
        )

    def training_step(self, batch, batch_idx):
        x0, y = batch
        if self.null_label is not None:
            y = drop_labels(y, self.cfg.train.p_uncond, self.null_label)  # item 12
        else:
            y = None
        t, weight = self.timestep_sampler.sample(x0.shape[0], x0.device)
        terms = self._losses(x0, y, t, torch.randn_like(x0))
        self.timestep_sampler.update(t, terms["loss"])
        loss = (terms["loss"] * weight).mean()
        self._note_finite(loss)
        logs = {"train/loss": loss}
        # L_simple on its own where the loss is more than it (the hybrid loss, or importance
        # weights); elsewhere it would repeat train/loss.
        if "vb" in terms or self.cfg.diffusion.timestep_sampling != "uniform":
            logs["train/mse"] = terms["mse"].mean()
        if "vb" in terms:
            logs["train/vb"] = terms["vb"].mean()
        self.log_dict(logs, prog_bar=True, on_step=True, on_epoch=False, batch_size=x0.shape[0])
        return loss

    def _note_finite(self, loss: torch.Tensor) -> None:
        """Record (on the device, without waiting for it) the first step with a non-finite loss."""
        if self._first_bad_step is None or self._first_bad_step.device != loss.device:
            self._first_bad_step = torch.full((), -1, dtype=torch.long, device=loss.device)
        bad = ~torch.isfinite(loss.detach()) & (self._first_bad_step < 0)
        self._first_bad_step = torch.where(bad, self.global_step, self._first_bad_step)

    def check_finite(self) -> None:
        """Raise :class:`NonFiniteLossError` if a step since the start had a non-finite loss.
        Reads one number back from the device: called every `train.log_every_n_steps` steps
        (where Lightning reads the logged metrics anyway) and before validation, checkpoints
        and the end of training, so a diverged run never writes a checkpoint."""
        if self._first_bad_step is not None and int(self._first_bad_step) >= 0:
            raise NonFiniteLossError(
                f"non-finite training loss at step {int(self._first_bad_step)} "
                f"(checked at step {self.global_step}): lower train.lr or raise train.grad_clip"
            )

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self.global_step % max(1, self.cfg.train.log_every_n_steps) == 0:
            self.check_finite()

    def on_validation_start(self) -> None:
        self.check_finite()

    def on_train_end(self) -> None:
        self.check_finite()

    def validation_step(self, batch, batch_idx):
        """L_simple on held-out data with fixed t and noise per batch (comparable across runs and
        steps), and the NLL bound in bits/dim on a fixed subset of the first batch."""
        x0, y = batch
        y = y if self.null_label is not None else None
        g = torch.Generator(device=x0.device).manual_seed(10_000 + batch_idx)
        t = torch.randint(
            0, self.process.num_timesteps, (x0.shape[0],), generator=g, device=x0.device
        )
        noise = torch.randn(x0.shape, generator=g, device=x0.device)
        terms = self._losses(x0, y, t, noise)
        self.log("val/loss_simple", terms["mse"].mean(), prog_bar=True, batch_size=x0.shape[0])
        n = self.cfg.train.bpd_subset
        if batch_idx == 0 and n > 0:
            bpd = bits_per_dim(
                self.net,
                self.process,
                x0[:n],
                None if y is None else y[:n],
                prediction=self.cfg.diffusion.prediction,
                variance=self.variance,
                generator=g,
            )
            self.log(
                "val/bpd", bpd["total_bpd"].mean(), prog_bar=True, batch_size=min(n, x0.shape[0])
            )

    def configure_optimizers(self):
        opt = torch.optim.AdamW(
            self.net.parameters(), lr=self.cfg.train.lr, weight_decay=self.cfg.train.weight_decay
        )
        warmup = max(1, self.cfg.train.warmup_steps)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / warmup))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # -- sampling ---------------------------------------------------------------------------------
    def sampling_dtype(self, precision: str = "auto") -> torch.dtype:
        """The network's dtype when sampling: ``precision`` '32', 'bf16', or 'auto' (bf16 on a
        GPU that supports it, fp32 elsewhere). Only the network runs in it, under autocast;
        the diffusion math (schedule, posterior, noise) stays in fp32/fp64."""
        if precision == "auto":
            cuda = self.device.type == "cuda" and torch.cuda.is_bf16_supported()
            return torch.bfloat16 if cuda else torch.float32
        if precision not in ("32", "bf16"):
            raise ValueError(f"sampling precision {precision!r}: expected 'auto', '32' or 'bf16'")
        return torch.bfloat16 if precision == "bf16" else torch.float32

    def _sampling_net(self, dtype: torch.dtype):
        if dtype == torch.float32:
            return self.net

        def net(x, t, y):
            with torch.autocast(self.device.type, dtype=dtype):
                out = self.net(x, t, y)
            return out.float()

        return net

    @torch.no_grad()
    def sample(
        self,
        labels: torch.Tensor | None,
        spec: SamplingSpec,
        *,
        num_samples: int | None = None,
        batch_size: int = 512,
        precision: str = "auto",
    ) -> torch.Tensor:
        """Samples (N, *data_shape) on the CPU, drawn as ``spec`` says, from noise seeded by
        ``spec.seed``: every spec of one model starts from the same noise, so cells compare
        like with like, and a cell drawn alone is the cell drawn within a grid.

        The variance, guidance weight and steps are sampling-time choices: any trained
        checkpoint can be sampled with all of them (`learned_range` needs a net trained for it).
        ``precision``: see :meth:`sampling_dtype`.
        """
        return self.sample_many(
            labels, [spec], num_samples=num_samples, batch_size=batch_size, precision=precision
        )[0]

    @torch.no_grad()
    def sample_many(
        self,
        labels: torch.Tensor | None,
        specs: list[SamplingSpec],
        *,
        num_samples: int | None = None,
        batch_size: int = 512,
        precision: str = "auto",
        chunks: list[torch.Tensor] | None = None,
    ) -> list[torch.Tensor]:
        """:meth:`sample` for several specs that differ only in guidance weight (one cell's
        weights): drawn together, one forward pass per step over all of them, each from its own
        seed's noise, so each spec's samples are the samples :meth:`sample` draws for it (up
        to floating-point reassociation). Each spec's N samples go in chunks of ``batch_size``
        as they would alone, so one pass holds up to k x batch_size samples (x 2 when guided):
        whoever groups specs decides whether that fits and pays (see ``evaluate``).
        ``chunks``: the order of drawing (:meth:`sample_chunks`)."""
        n = labels.shape[0] if labels is not None else num_samples
        out = [None] * len(specs)
        for index, xs in self.sample_chunks(
            labels, specs, num_samples=n, batch_size=batch_size, precision=precision, chunks=chunks
        ):
            for i, x in enumerate(xs):
                if out[i] is None:
                    out[i] = torch.empty(n, *x.shape[1:], dtype=x.dtype)
                out[i][index] = x
        return out

    @torch.no_grad()
    def sample_chunks(
        self,
        labels: torch.Tensor | None,
        specs: list[SamplingSpec],
        *,
        num_samples: int | None = None,
        batch_size: int = 512,
        precision: str = "auto",
        chunks: list[torch.Tensor] | None = None,
    ) -> Iterator[tuple[torch.Tensor, list[torch.Tensor]]]:
        """Draw the N samples chunk by chunk, yielding (the chunk's positions, each spec's
        samples there) as each chunk is done, so that a caller can measure a cell on its first
        chunks and stop it early. ``chunks`` are position index tensors covering 0..N-1 once
        (default: one chunk, in order); each is drawn in batches of ``batch_size``. Each batch's
        noise is seeded by the spec's seed and the batch's number alone (:func:`batch_seed`),
        not by how much noise the batches before it drew: the same chunks give the same samples
        however far one goes, a cell drawn to the end in chunks is the cell drawn whole with the
        same chunks, and cells with different step counts start every batch from the same
        noise."""
        if labels is None and num_samples is None:
            raise ValueError("pass labels (a conditional model) or num_samples (unconditional)")
        if labels is not None and self.null_label is None:
            raise ValueError("this model is unconditional: sample it with labels=None")
        specs = [self._resolve(spec) for spec in specs]
        n = labels.shape[0] if labels is not None else num_samples
        chunks = [torch.arange(n)] if chunks is None else chunks
        net = self._sampling_net(self.sampling_dtype(precision))
        gens = [torch.Generator(device=self.device) for _ in specs]
        batch = 0
        for chunk in chunks:
            drawn: list[list[torch.Tensor]] = [[] for _ in specs]
            for start in range(0, len(chunk), batch_size):
                index = chunk[start : start + batch_size]
                for g, s in zip(gens, specs):  # each batch's noise from (seed, batch) alone
                    g.manual_seed(batch_seed(s.seed, batch))
                batch += 1
                was_training = self.net.training
                self.net.eval()
                try:
                    xs = sample_specs(
                        net,
                        self.process,
                        (len(index), *self.data_shape),
                        specs,
                        generators=gens,
                        labels=None if labels is None else labels[index].to(self.device),
                        prediction=self.cfg.diffusion.prediction,
                        null_label=self.null_label,
                        device=self.device,
                    )
                finally:
                    self.net.train(was_training)
                for out, x in zip(drawn, xs):
                    out.append(x.float().cpu())
            yield chunk, [torch.cat(d) for d in drawn]

    def _resolve(self, spec: SamplingSpec) -> SamplingSpec:
        if get_variance(spec.variance).learned and not self.variance.learned:
            raise ValueError(
                f"variance {spec.variance!r} needs a network trained with diffusion.variance="
                f"learned_range; this one was trained with {self.variance.name!r}"
            )
        if spec.threshold == "auto":  # images live in [-1, 1]; 2-D points do not
            spec = replace(spec, threshold="clip" if len(self.data_shape) == 3 else "none")
        return spec

    # -- checkpoints ------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Store everything needed to sample later: config, network config, schedule."""
        self.check_finite()
        checkpoint[CHECKPOINT_KEY] = {
            "config": OmegaConf.to_container(self.cfg, resolve=True),
            "network": dataclasses.asdict(self.net.cfg),
            "network_name": self.net.cfg.name,
            "betas": self.process.betas.clone(),
            "data_shape": list(self.data_shape),
            "num_classes": self.num_classes,
            "guidance_convention": GUIDANCE_CONVENTION,
        }

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, map_location: str | torch.device = "cpu"
    ) -> DiffusionModule:
        """Rebuild the module from a checkpoint; its weights are the EMA weights."""
        from .networks import build_network

        if not Path(path).is_file():
            raise FileNotFoundError(f"{path}: no such checkpoint file")
        try:
            ckpt = torch.load(path, map_location=map_location, weights_only=False)
        except Exception as err:  # truncated, corrupted, or not a torch file at all
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ValueError(
                f"{path}: not a readable checkpoint, truncated or corrupted? (torch.load: {first})"
            ) from None
        if not isinstance(ckpt, dict) or CHECKPOINT_KEY not in ckpt:
            raise ValueError(
                f"{path}: not a ddpm-sweep checkpoint (a torch file without the "
                f"'{CHECKPOINT_KEY}' entry that `ddpm-sweep train` and `run` write)"
            )
        meta = ckpt[CHECKPOINT_KEY]
        cfg = OmegaConf.create(meta["config"])
        net = build_network(meta["network"])
        module = cls(net, GaussianDiffusion(meta["betas"]), cfg, meta["data_shape"])
        module.load_state_dict(ckpt["state_dict"])
        module.eval()
        return module
