"""The LightningModule: trains a DDPM with classifier-free guidance and samples it.

It receives its denoiser network and diffusion process; the config only carries the training
choices (loss, prediction, optimiser, label dropout). EMA of the weights is Lightning's
``WeightAveraging`` callback with torch's EMA (see ``train.py``): validation, the end of training
and every checkpoint's ``state_dict`` use the averaged weights.
"""

from __future__ import annotations

import dataclasses
import logging
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
    sample,
    training_losses,
)
from .diffusion.timesteps import build_timestep_sampler

log = logging.getLogger(__name__)
CHECKPOINT_KEY = "ddpm_sweep"


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite."""


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
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"non-finite training loss {loss.item()} at step {self.global_step}"
            )
        logs = {"train/loss": loss, "train/mse": terms["mse"].mean()}
        if "vb" in terms:
            logs["train/vb"] = terms["vb"].mean()
        self.log_dict(logs, prog_bar=True, on_step=True, on_epoch=False, batch_size=x0.shape[0])
        return loss

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
    @torch.no_grad()
    def sample(
        self,
        labels: torch.Tensor | None,
        spec: SamplingSpec,
        *,
        num_samples: int | None = None,
        batch_size: int = 512,
    ) -> torch.Tensor:
        """Samples (N, *data_shape) on the CPU, drawn as ``spec`` says, from noise seeded by
        ``spec.seed``: every spec of one model starts from the same noise, so cells compare
        like with like, and a cell drawn alone is the cell drawn within a grid.

        The variance, guidance weight and steps are sampling-time choices: any trained
        checkpoint can be sampled with all of them (`learned_range` needs a net trained for it).
        """
        if labels is None and num_samples is None:
            raise ValueError("pass labels (a conditional model) or num_samples (unconditional)")
        if labels is not None and self.null_label is None:
            raise ValueError("this model is unconditional: sample it with labels=None")
        if get_variance(spec.variance).learned and not self.variance.learned:
            raise ValueError(
                f"variance {spec.variance!r} needs a network trained with diffusion.variance="
                f"learned_range; this one was trained with {self.variance.name!r}"
            )
        if spec.threshold == "auto":  # images live in [-1, 1]; 2-D points do not
            spec = replace(spec, threshold="clip" if len(self.data_shape) == 3 else "none")
        n = labels.shape[0] if labels is not None else num_samples
        was_training = self.net.training
        self.net.eval()
        chunks = []
        try:
            g = torch.Generator(device=self.device).manual_seed(spec.seed)
            for start in range(0, n, batch_size):
                stop = min(n, start + batch_size)
                y = None if labels is None else labels[start:stop].to(self.device)
                x = sample(
                    self.net,
                    self.process,
                    (stop - start, *self.data_shape),
                    spec,
                    labels=y,
                    prediction=self.cfg.diffusion.prediction,
                    null_label=self.null_label,
                    generator=g,
                    device=self.device,
                )
                chunks.append(x.float().cpu())
        finally:
            self.net.train(was_training)
        return torch.cat(chunks)

    # -- checkpoints ------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Store everything needed to sample later: config, network config, schedule."""
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
