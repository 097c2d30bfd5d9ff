"""The training recipe: build data, network, diffusion, module, callbacks, trainer; fit.

Loggers and extra callbacks (MLflow, Ray Tune reporting) come from the caller, so this module
stays free of Ray and MLflow.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from pathlib import Path

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint, WeightAveraging
from torch.optim.swa_utils import get_ema_multi_avg_fn

from .config import ConfigError
from .data import build_datamodule, describe_data
from .diffusion import GaussianDiffusion, get_variance
from .module import DiffusionModule
from .networks import NetworkConfig, build_network, network_config, unet_preset
from .periodic import PeriodicEvaluation

log = logging.getLogger(__name__)


def resolve_network_config(cfg: DictConfig, datamodule) -> NetworkConfig:
    """The network config with what the data and diffusion decide filled in: channels, image
    size or dimension, classes (+ the null label) and doubled outputs for `learned_range`.
    ``datamodule`` is a datamodule or a :class:`DataSpec` (what the config alone says)."""
    node = dict(OmegaConf.to_container(cfg.network, resolve=True) if cfg.network else {})
    name = node.setdefault("name", "unet" if datamodule.kind == "image" else "mlp")
    learned = get_variance(cfg.diffusion.variance).learned
    shape = datamodule.data_shape
    if name == "unet":
        if datamodule.kind != "image":
            raise ConfigError(
                f"network.name = 'unet' needs image data, but data.name = {cfg.data.name!r} is "
                "2-D points: use network.name = 'mlp'"
            )
        derived = {"in_channels": shape[0], "image_size": shape[1]}
    elif name == "mlp":
        if datamodule.kind != "points":
            raise ConfigError(
                f"network.name = 'mlp' needs point data (e.g. data.name = 'gaussian_mixture'), "
                f"but data.name = {cfg.data.name!r} is images: use network.name = 'unet'"
            )
        derived = {"data_dim": shape[0]}
    else:
        return network_config(node)  # raises the clear unknown-name error
    # An image folder's classes are only known where its files are; any count checks shapes.
    classes = datamodule.num_classes if datamodule.num_classes is not None else 10
    derived |= {"num_classes": classes, "learned_variance": learned}
    if name == "unet":
        node.pop("name")
        return unet_preset(node.pop("preset", "digits"), **(node | derived))
    if "preset" in node:
        raise ConfigError(f"network.preset = {node['preset']!r} is only for network.name = 'unet'")
    return network_config(node | derived)


def check_network(cfg: DictConfig, data=None) -> NetworkConfig:
    """Build the network on the meta device (shapes, no weights) and run one forward pass with
    the data's shape: unknown or ill-typed network keys, and architectures that do not fit the
    data (a `channel_mult` too deep for 8x8 images), fail here, before any training.
    ``data``: a datamodule or a :class:`DataSpec` (default: described from ``cfg.data``)."""
    data = data if data is not None else describe_data(cfg.data)
    net_cfg = resolve_network_config(cfg, data)
    learned = get_variance(cfg.diffusion.variance).learned
    with torch.device("meta"):
        net = build_network(net_cfg)
        x = torch.zeros(2, *data.data_shape)
        t = torch.zeros(2, dtype=torch.long)
        y = torch.zeros(2, dtype=torch.long)
        try:
            out = net(x, t, y)
        except (RuntimeError, ValueError, IndexError) as err:
            raise ConfigError(
                f"network: this architecture does not fit {data.name} data of shape "
                f"{tuple(data.data_shape)}: {str(err).splitlines()[0]}",
                "network",
            ) from None
    expected = (2, data.data_shape[0] * (2 if learned else 1), *data.data_shape[1:])
    if tuple(out.shape) != expected:
        raise ConfigError(
            f"network: outputs shape {tuple(out.shape)} for inputs {tuple(x.shape)}; "
            f"expected {expected}",
            "network",
        )
    return net_cfg


def compile_network(net: torch.nn.Module, backend: str = "inductor") -> None:
    """``torch.compile`` the network in place (state_dict keys, and checkpoints, stay unchanged).

    One compiled network meets training, validation (eval mode, no grad), the last short batch
    and sampling batches of several sizes under autocast. After the first change of batch size
    dynamo compiles a graph with a dynamic batch, so these fit well within its recompile limit;
    should they not, the run fails rather than falling back to eager without a word."""
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    net.compile(backend=backend)


def build_experiment(cfg: DictConfig, *, compile_backend: str = "inductor"):
    """(datamodule, module) for a validated config. Seeds from ``train.seed`` first, so the
    network's initial weights depend on the config alone, not on what the process ran before
    (a Ray worker reused across trials, a benchmark that trains twice)."""
    pl.seed_everything(cfg.train.seed, workers=True, verbose=False)
    datamodule = build_datamodule(cfg.data, pin_memory=trains_on_gpu(cfg))
    net = build_network(resolve_network_config(cfg, datamodule))
    process = GaussianDiffusion.from_schedule(
        cfg.diffusion.schedule,
        cfg.diffusion.timesteps,
        zero_terminal_snr=cfg.diffusion.zero_terminal_snr,
    )
    module = DiffusionModule(net, process, cfg, datamodule.data_shape)
    if cfg.train.compile:
        compile_network(module.net, compile_backend)
    return datamodule, module


def trains_on_gpu(cfg: DictConfig) -> bool:
    """Whether the run trains (and samples) on a GPU: one is visible and the run is not pinned
    to the CPU (``train.accelerator``)."""
    return torch.cuda.is_available() and cfg.train.accelerator not in ("cpu",)


def cuda_problem() -> str | None:
    """Why CUDA is not usable in this process (None when it is): the driver's own complaint
    where torch has one, and which CUDA the installed torch was built for."""
    if torch.cuda.is_available():
        return None
    build = (
        f"torch {torch.__version__} is built for CUDA {torch.version.cuda}"
        if torch.version.cuda
        else f"torch {torch.__version__} is a CPU-only build"
    )
    try:
        torch.cuda.init()
        reason = "torch.cuda.is_available() is False"
    except Exception as err:  # e.g. "The NVIDIA driver on your system is too old (found ...)"
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return f"{reason}; {build}"


def precision_for(cfg: DictConfig) -> str:
    """``train.precision``, or for ``auto``: bf16-mixed when the run trains on a GPU, 32-true
    otherwise (a run pinned to the CPU on a GPU machine included)."""
    if cfg.train.precision != "auto":
        return cfg.train.precision
    return "bf16-mixed" if trains_on_gpu(cfg) else "32-true"


class EMA(WeightAveraging):
    """Lightning's weight averaging with an EMA over all tensors at once (one foreach lerp per
    dtype: EMAWeightAveraging updates tensor by tensor, which cost 4-6 ms per step here), kept
    on the module's device and updated without reading anything back from it.

    ``WeightAveraging`` builds its averaged copy in ``setup``, before the strategy moves the
    module to the GPU: left there, the copy stays on the CPU and every step would copy all the
    weights to the host and average them there. ``on_fit_start`` runs after that move (and
    after a checkpoint's averaged weights are restored), so the copy follows the module there.
    torch's ``AveragedModel.update_parameters`` tests its device counter ``n_averaged`` twice
    per call (a host-device sync every step); the update here keeps that count on the host.
    """

    def __init__(self, decay: float):
        super().__init__(multi_avg_fn=get_ema_multi_avg_fn(decay))
        self.decay = decay
        self._updates: int | None = None  # n_averaged, on the host

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._average_model is not None:
            self._updates = int(self._average_model.n_averaged)  # still on the CPU here
            self._average_model.to(pl_module.device)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step_idx = trainer.global_step - 1
        if trainer.global_step > self._latest_update_step and self.should_update(step_idx=step_idx):
            self.update(pl_module)
            self._latest_update_step = trainer.global_step

    @torch.no_grad()
    def update(self, pl_module: pl.LightningModule) -> None:
        """One EMA step of every parameter and buffer (the first one copies)."""
        avg = self._average_model
        if self._updates is None:
            self._updates = int(avg.n_averaged)
        pairs: dict[torch.dtype, tuple[list, list]] = {}
        averaged = itertools.chain(avg.module.parameters(), avg.module.buffers())
        current = itertools.chain(pl_module.parameters(), pl_module.buffers())
        for a, c in zip(averaged, current, strict=True):
            ema, model = pairs.setdefault(a.dtype, ([], []))
            ema.append(a.detach())
            model.append(c.detach())
        for dtype, (ema, model) in pairs.items():
            if self._updates == 0:
                torch._foreach_copy_(ema, model)
            elif dtype.is_floating_point or dtype.is_complex:
                torch._foreach_lerp_(ema, model, 1 - self.decay)
            else:  # integer buffers: as torch's EMA does them
                for e, m in zip(ema, model):
                    e.copy_(e * self.decay + m * (1 - self.decay))
        avg.n_averaged += 1  # on the device, no read
        self._updates += 1

    @property
    def average_model(self) -> torch.nn.Module | None:
        return self._average_model


def build_callbacks(cfg: DictConfig, checkpoint_dir: Path) -> list[pl.Callback]:
    callbacks: list[pl.Callback] = [
        ModelCheckpoint(
            dirpath=checkpoint_dir,
            filename="best",
            monitor="val/loss_simple",
            mode="min",
            save_top_k=1,
            save_last=True,
            auto_insert_metric_name=False,
        ),
    ]
    if cfg.eval.periodic.every_n_steps:  # before the EMA: it samples with the EMA weights in
        callbacks.append(PeriodicEvaluation(cfg))
    if cfg.train.ema_decay > 0:
        callbacks.append(EMA(cfg.train.ema_decay))
    return callbacks


def build_trainer(
    cfg: DictConfig, root_dir: Path, *, logger=False, callbacks=(), **overrides
) -> pl.Trainer:
    t = cfg.train
    kwargs = dict(
        default_root_dir=str(root_dir),
        max_steps=t.max_steps,
        max_epochs=-1,
        val_check_interval=t.val_every_n_steps,
        check_val_every_n_epoch=None,
        gradient_clip_val=t.grad_clip or None,
        precision=precision_for(cfg),
        accelerator=t.accelerator,
        devices=t.devices,
        log_every_n_steps=t.log_every_n_steps,
        logger=logger,
        callbacks=[*build_callbacks(cfg, root_dir / "checkpoints"), *callbacks],
        num_sanity_val_steps=0,
        deterministic=False,
    )
    return pl.Trainer(**(kwargs | overrides))


@dataclass
class FitResult:
    module: DiffusionModule
    datamodule: pl.LightningDataModule
    trainer: pl.Trainer
    checkpoint: Path | None  # the last checkpoint written (EMA weights)


def fit(
    cfg: DictConfig,
    root_dir: str | Path,
    *,
    logger=False,
    callbacks=(),
    ckpt_path=None,
    experiment=None,
    **trainer_overrides,
) -> FitResult:
    """Train one run; checkpoints go to ``root_dir/checkpoints``. ``experiment`` is a prebuilt
    (datamodule, module) pair, for callers that check the config by building it first."""
    root_dir = Path(root_dir)
    pl.seed_everything(cfg.train.seed, workers=True, verbose=False)
    datamodule, module = experiment or build_experiment(cfg)
    trainer = build_trainer(cfg, root_dir, logger=logger, callbacks=callbacks, **trainer_overrides)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    last = root_dir / "checkpoints" / "last.ckpt"
    if not trainer.fast_dev_run:
        trainer.save_checkpoint(last)  # after training: the EMA weights are the module's weights
    return FitResult(module, datamodule, trainer, last if last.exists() else None)
