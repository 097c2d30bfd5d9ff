"""The benchmark harness: arguments, threads, device sync, the step timer, one plain training
step, the environment record, medians, tables and JSON output.

Not a benchmark itself (the leading underscore keeps it out of the list in README.md).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # run as `python benchmarks/x.py` from anywhere
    sys.path.insert(0, str(REPO_ROOT))

from lightning_modules.diffusion import drop_labels, get_variance, training_losses  # noqa: E402
from lightning_modules.diffusion.timesteps import build_timestep_sampler  # noqa: E402


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device | str = "cpu") -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU: {cpu_name()}"


def environment(device: torch.device | str = "cpu") -> dict:
    """What every JSON records: where and with what the figures were taken."""
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
    }


def median(values) -> float:
    return float(statistics.median(values))


def print_table(headers: list[str], rows: list[list]) -> None:
    cells = [[str(h) for h in headers]] + [[fmt(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for n, row in enumerate(cells):
        print("  ".join(c.rjust(w) if n else c.ljust(w) for c, w in zip(row, widths)))
        if n == 0:
            print("  ".join("-" * w for w in widths))


def fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    return str(value)


def write_json(path: str | Path, payload: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    print(f"wrote {path}")


# -- the harness: arguments, threads, device ---------------------------------------------------
def parser(doc: str, *, device: str | None = None, device_help: str | None = None):
    """An argument parser with what every script takes: ``--out`` (required), ``--threads``
    (default 1) and, where ``device`` gives its default, ``--device``. ``doc``: the script's
    docstring, whose first paragraph becomes the description."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--out", required=True, help="JSON file for the figures")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    if device is not None:
        p.add_argument("--device", default=device, help=device_help)
    return p


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def setup(args: argparse.Namespace) -> torch.device:
    """Applies ``--threads``; returns ``--device``, or for a script without one the GPU if there
    is one, else the CPU."""
    torch.set_num_threads(args.threads)
    return torch.device(getattr(args, "device", None) or default_device())


def sync(device: torch.device) -> None:
    """Waits for the device's queued work (a no-op on the CPU): call before reading a timer."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- the step timer (a Lightning callback; built on first use, so that scripts without Lightning
# do not import it) ----------------------------------------------------------------------------
def _step_timer_class():
    import pytorch_lightning as pl

    class StepTimer(pl.Callback):
        """Times the steady-state steps of a ``pl.Trainer`` fit.

        Step k runs from its ``on_train_batch_start`` to step k + 1's, so it includes the batch
        fetch, every hook and what the loop does after ``on_train_batch_end`` (writing the logged
        metrics to the logger). ``times``: the ``steps`` steps after the first ``warmup``; the
        fit needs ``fit_steps`` (= warmup + steps + 1) steps, the last one closing the window.
        The device is synchronised at the window's two ends, so its total is the device's time
        without a sync between its steps (which would hide the host/device overlap), or at every
        step start with ``sync_every``. ``between_steps`` runs other work between two steps,
        outside both timed intervals.
        """

        def __init__(self, warmup: int, steps: int, *, sync_every: bool = False) -> None:
            self.warmup, self.steps, self.sync_every = warmup, steps, sync_every
            self.starts: list[float] = []  # the start of each step
            self.durations: list[float] = []  # step k's duration, known at step k + 1's start

        @property
        def fit_steps(self) -> int:
            return self.warmup + self.steps + 1

        @property
        def times(self) -> list[float]:
            return self.durations[self.warmup : self.warmup + self.steps]

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            k = len(self.starts)
            if self.sync_every or k in (self.warmup, self.warmup + self.steps):
                sync(pl_module.device)
            now = time.perf_counter()
            if k:
                self.durations.append(now - self.starts[-1])
            self.starts.append(self.between_steps(k, now))

        def between_steps(self, k: int, now: float) -> float:
            """Before step k starts (``now``: step k - 1's end): returns step k's start."""
            return now

    return StepTimer


def __getattr__(name: str):
    if name == "StepTimer":
        globals()["StepTimer"] = cls = _step_timer_class()
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# -- one plain PyTorch training step -----------------------------------------------------------
class PlainStep:
    """The product's training step written out without Lightning: the work of
    ``DiffusionModule.training_step`` + the Trainer (gradient clipping, optimizer and scheduler
    steps, precision) + the EMA callback.

    ``step(x0, y)`` on a batch already on ``device``: label dropout (conditional networks),
    the config's timestep sampler, ``training_losses`` under the precision's autocast, the
    finite-loss check, backward, ``clip_grad_norm_`` (``train.grad_clip``), AdamW + the warm-up
    LambdaLR, and an EMA update (``AveragedModel`` with ``get_ema_multi_avg_fn``, use_buffers)
    when ``train.ema_decay`` > 0. ``forward_backward`` is the part up to backward.

    ``net`` is trained in place (already on ``device``; compile it after this is built, as the
    EMA copies it uncompiled); ``process`` a ``GaussianDiffusion``; ``cfg`` the product's config
    (``train`` and ``diffusion`` sections, read at every step as ``training_step`` reads them).
    """

    def __init__(self, net: nn.Module, process, cfg, device: torch.device) -> None:
        from lightning_modules.train import precision_for

        t = cfg.train
        self.net, self.process, self.cfg, self.device = net.train(), process, cfg, device
        self.null_label = int(getattr(net, "num_classes", 0) or 0) or None
        self.variance = get_variance(cfg.diffusion.variance)
        self.sampler = build_timestep_sampler(
            cfg.diffusion.timestep_sampling, process.num_timesteps
        )
        self.opt = torch.optim.AdamW(net.parameters(), lr=t.lr, weight_decay=t.weight_decay)
        warmup = max(1, t.warmup_steps)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda step: min(1.0, (step + 1) / warmup)
        )
        self.ema = (
            AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(t.ema_decay), use_buffers=True)
            if t.ema_decay > 0
            else None
        )
        self.precision = precision_for(cfg)
        if self.precision == "bf16-mixed":
            self.autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16)
        elif self.precision == "32-true":
            self.autocast = contextlib.nullcontext
        else:
            raise NotImplementedError(f"plain step: precision {self.precision!r}")

    def forward_backward(self, x0: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        t = self.cfg.train
        self.opt.zero_grad(set_to_none=True)
        with self.autocast():
            y = drop_labels(y, t.p_uncond, self.null_label) if self.null_label is not None else None
            ts, weight = self.sampler.sample(x0.shape[0], x0.device)
            terms = training_losses(
                self.net,
                self.process,
                x0,
                ts,
                torch.randn_like(x0),
                y,
                prediction=self.cfg.diffusion.prediction,
                variance=self.variance,
                lambda_vlb=self.cfg.diffusion.lambda_vlb,
            )
            self.sampler.update(ts, terms["loss"])
            loss = (terms["loss"] * weight).mean()
        if not torch.isfinite(loss):  # the product's check (a device sync every step)
            from lightning_modules.module import NonFiniteLossError

            raise NonFiniteLossError(f"non-finite training loss {loss.item()}")
        loss.backward()
        return loss

    def step(self, x0: torch.Tensor, y: torch.Tensor | None) -> None:
        self.forward_backward(x0, y)
        t = self.cfg.train
        if t.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), t.grad_clip)
        self.opt.step()
        self.sched.step()
        if self.ema is not None:
            self.ema.update_parameters(self.net)
