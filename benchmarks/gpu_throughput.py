"""Training throughput of the 35.7M ``ddpm_cifar10`` U-Net on one GPU: images/s and % of peak.

One training step does the product's work (``DiffusionModule.training_step`` with the Trainer's
gradient clipping and an EMA, written out as a plain loop): label dropout, the uniform timestep
sampler, ``training_losses`` under bf16 autocast, the finite-loss check, backward,
``clip_grad_norm_(1.0)``, AdamW + the warm-up LambdaLR, and an EMA update
(``AveragedModel`` with ``get_ema_multi_avg_fn``). The data are one synthetic CIFAR-sized
batch already on the GPU, so data loading is not measured. The network is conditional
(10 classes + the null label), as the product trains it on CIFAR-10.

For each batch size (default 128 and 256), an eager and a ``torch.compile``-d copy of the
network (built from the same seed; compiled in place like ``train.compile=true`` does, with
``dynamic=False``) alternate in rounds after warm-up; the compile time is reported separately.
Figures are medians over rounds. FLOPs per step (forward + backward; matmuls, convolutions and
attention) come from ``torch.utils.flop_counter.FlopCounterMode`` on the eager network; achieved
TFLOP/s and % of the device's dense bf16 peak follow (peak from a small table by device name,
or ``--peak-tflops``). Goal: >= 2,000 images/s on one H100.

Without CUDA it prints so, runs a tiny CPU smoke step (batch 2, 2 steps, fp32) so the code is
exercised, writes ``{"skipped": "no CUDA device", ...}`` and exits 0. ``--device cpu`` runs the
full measurement on a CPU instead (slow; for checking the script).

    .venv/bin/python benchmarks/gpu_throughput.py --out /tmp/bench_gpu_throughput.json
"""

from __future__ import annotations

import argparse
import contextlib
import time

import _common
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.flop_counter import FlopCounterMode

from lightning_modules.diffusion import GaussianDiffusion, drop_labels, training_losses
from lightning_modules.diffusion.timesteps import build_timestep_sampler
from lightning_modules.networks import UNet, unet_preset

GOAL_IMAGES_PER_S = 2000
# Dense (no sparsity) bf16 tensor-core peak in TFLOP/s; the first matching substring wins.
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM ("NVIDIA H100 80GB HBM3")
    ("H200", 989.0),
    ("A100", 312.0),
)
NUM_CLASSES = 10
# The product's defaults (lightning_modules.config.TrainConfig / DiffusionConfig).
LR, WARMUP_STEPS, GRAD_CLIP, EMA_DECAY, P_UNCOND = 2e-4, 100, 1.0, 0.999, 0.1
SCHEDULE, TIMESTEPS = "cosine", 1000


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="JSON file for the figures")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 256])
    p.add_argument("--rounds", type=int, default=5, help="rounds per variant (alternating)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per round")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per variant first")
    p.add_argument("--no-compile", action="store_true", help="eager only")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode (default: default)")
    p.add_argument("--peak-tflops", type=float, help="dense bf16 peak of the device, TFLOP/s")
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (full run on a CPU)")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def peak_for(name: str) -> float | None:
    for key, tflops in PEAK_BF16_TFLOPS:
        if key.lower() in name.lower():
            return tflops
    return None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Trainer:
    """A network with its optimizer, scheduler and EMA; ``step()`` is one training step."""

    def __init__(self, device: torch.device, seed: int, bf16: bool, compile_: bool, mode=None):
        torch.manual_seed(seed)
        self.device = device
        self.net = UNet(unet_preset("ddpm_cifar10", num_classes=NUM_CLASSES)).to(device).train()
        self.process = GaussianDiffusion.from_schedule(SCHEDULE, TIMESTEPS)
        self.sampler = build_timestep_sampler("uniform", TIMESTEPS)
        self.opt = torch.optim.AdamW(self.net.parameters(), lr=LR, weight_decay=0.0)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda step: min(1.0, (step + 1) / WARMUP_STEPS)
        )
        self.ema = AveragedModel(
            self.net, multi_avg_fn=get_ema_multi_avg_fn(EMA_DECAY), use_buffers=True
        )
        self.bf16 = bf16
        if compile_:
            self.net.compile(mode=mode, dynamic=False)  # in place, as train.compile=true does

    def autocast(self):
        if self.bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def forward_backward(self, x0: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.opt.zero_grad(set_to_none=True)
        with self.autocast():
            y = drop_labels(y, P_UNCOND, NUM_CLASSES)
            t, weight = self.sampler.sample(x0.shape[0], x0.device)
            terms = training_losses(self.net, self.process, x0, t, torch.randn_like(x0), y)
            loss = (terms["loss"] * weight).mean()
        if not torch.isfinite(loss):  # the product's check (a device sync every step)
            raise FloatingPointError(f"non-finite training loss {loss.item()}")
        loss.backward()
        return loss

    def step(self, x0: torch.Tensor, y: torch.Tensor) -> None:
        self.forward_backward(x0, y)
        torch.nn.utils.clip_grad_norm_(self.net.parameters(), GRAD_CLIP)
        self.opt.step()
        self.sched.step()
        self.ema.update_parameters(self.net)


def synthetic_batch(batch_size: int, device: torch.device, seed: int):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(batch_size, 3, 32, 32, generator=g) * 2 - 1
    y = torch.randint(0, NUM_CLASSES, (batch_size,), generator=g)
    return x0.to(device), y.to(device)


def count_flops(trainer: Trainer, x0: torch.Tensor, y: torch.Tensor) -> int:
    """FLOPs of one forward + backward (FlopCounterMode: matmul, conv, attention)."""
    counter = FlopCounterMode(display=False)
    with counter:
        trainer.forward_backward(x0, y)
    trainer.opt.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def timed_round(trainer: Trainer, x0, y, steps: int) -> float:
    """Seconds per step over ``steps`` consecutive steps."""
    sync(trainer.device)
    t0 = time.perf_counter()
    for _ in range(steps):
        trainer.step(x0, y)
    sync(trainer.device)
    return (time.perf_counter() - t0) / steps


def smoke(args: argparse.Namespace) -> dict:
    """No CUDA: two fp32 steps at batch 2 on the CPU, and the FLOP count, to exercise the code."""
    device = torch.device("cpu")
    trainer = Trainer(device, args.seed, bf16=False, compile_=False)
    x0, y = synthetic_batch(2, device, args.seed)
    flops = count_flops(trainer, x0, y)
    t0 = time.perf_counter()
    for _ in range(2):
        trainer.step(x0, y)
    return {
        "batch_size": 2,
        "steps": 2,
        "precision": "fp32",
        "s_per_step": (time.perf_counter() - t0) / 2,
        "train_gflops_per_image": flops / 2 / 1e9,
        "parameters": sum(p.numel() for p in trainer.net.parameters()),
    }


def measure(args: argparse.Namespace, device: torch.device) -> dict:
    bf16 = True
    name = _common.device_name(device)
    peak = args.peak_tflops or (peak_for(name) if device.type == "cuda" else None)
    variants = ["eager"] if args.no_compile else ["eager", "compile"]
    per_batch: dict[str, dict] = {}
    for bs in args.batch_sizes:
        x0, y = synthetic_batch(bs, device, args.seed)
        try:
            trainers = {
                v: Trainer(device, args.seed, bf16, v == "compile", args.compile_mode)
                for v in variants
            }
            flops = count_flops(trainers["eager"], x0, y)
            entry: dict = {"flops_per_step": flops, "train_gflops_per_image": flops / bs / 1e9}
            for v, trainer in trainers.items():
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                sync(device)
                t0 = time.perf_counter()
                trainer.step(x0, y)  # compiles the compiled variant
                sync(device)
                entry.setdefault("first_step_s", {})[v] = time.perf_counter() - t0
                for _ in range(args.warmup - 1):
                    trainer.step(x0, y)
                sync(device)
                if device.type == "cuda":
                    mem = torch.cuda.max_memory_allocated(device) / 2**30
                    entry.setdefault("peak_memory_gib", {})[v] = mem
            rounds: dict[str, list[float]] = {v: [] for v in variants}
            for r in range(args.rounds):
                order = variants if r % 2 == 0 else variants[::-1]
                for v in order:
                    rounds[v].append(timed_round(trainers[v], x0, y, args.steps))
        except torch.cuda.OutOfMemoryError as err:
            print(f"batch {bs}: out of memory ({err})", flush=True)
            per_batch[str(bs)] = {"error": "out of memory"}
            continue
        finally:
            trainers = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
        for v in variants:
            s = _common.median(rounds[v])
            tflops = flops / s / 1e12
            entry[v] = {
                "s_per_step": s,
                "images_per_s": bs / s,
                "achieved_tflops": tflops,
                "percent_of_peak": 100 * tflops / peak if peak else None,
                "round_s_per_step": rounds[v],
            }
        if "compile" in entry:
            entry["compile_speedup"] = entry["eager"]["s_per_step"] / entry["compile"]["s_per_step"]
        per_batch[str(bs)] = entry
        print(
            f"batch {bs}: "
            + ", ".join(f"{v} {_common.fmt(entry[v]['images_per_s'])} img/s" for v in variants),
            flush=True,
        )

    measured = [
        (e[v]["images_per_s"], bs, v)
        for bs, e in per_batch.items()
        if "error" not in e
        for v in variants
    ]
    best = max(measured) if measured else None
    return {
        "peak_bf16_tflops": peak,
        "peak_source": "--peak-tflops" if args.peak_tflops else "table by device name",
        "per_batch_size": per_batch,
        "best_images_per_s": best[0] if best else None,
        "best_config": {"batch_size": int(best[1]), "variant": best[2]} if best else None,
        "goal_images_per_s": GOAL_IMAGES_PER_S,
        "goal_note": ">= 2,000 img/s on one H100",
    }


def print_results(res: dict, device_name: str) -> None:
    print(f"\nddpm_cifar10 U-Net (conditional), bf16 autocast, {device_name}")
    rows = []
    for bs, e in res["per_batch_size"].items():
        if "error" in e:
            rows.append([bs, "-", e["error"], "", "", "", ""])
            continue
        for v in ("eager", "compile"):
            if v not in e:
                continue
            m = e[v]
            pct = m["percent_of_peak"]
            rows.append(
                [
                    bs,
                    v,
                    m["images_per_s"],
                    m["s_per_step"] * 1e3,
                    m["achieved_tflops"],
                    f"{pct:.1f}" if pct is not None else "n/a",
                    f"{e['peak_memory_gib'][v]:.1f}" if "peak_memory_gib" in e else "n/a",
                ]
            )
    _common.print_table(
        ["batch", "variant", "img/s", "ms/step", "TFLOP/s", "% peak", "peak GiB"], rows
    )
    for bs, e in res["per_batch_size"].items():
        if "first_step_s" in e and "compile" in e["first_step_s"]:
            print(
                f"batch {bs}: first compiled step (includes compiling): "
                f"{e['first_step_s']['compile']:.1f} s"
            )
    gflops = next(
        (e["train_gflops_per_image"] for e in res["per_batch_size"].values() if "error" not in e),
        None,
    )
    if gflops:
        print(f"training FLOPs per image (forward + backward): {gflops:.1f} GFLOP")
    peak = res["peak_bf16_tflops"]
    print(f"peak bf16 dense: {peak if peak else 'unknown (pass --peak-tflops)'} TFLOP/s")
    best = res["best_images_per_s"]
    if best is not None:
        verdict = "ok" if best >= GOAL_IMAGES_PER_S else "BELOW GOAL"
        cfg = res["best_config"]
        print(
            f"best: {_common.fmt(best)} img/s (batch {cfg['batch_size']}, {cfg['variant']}); "
            f"goal >= {GOAL_IMAGES_PER_S:,} img/s on one H100: {verdict}"
        )


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(
            "gpu_throughput: no CUDA device here; skipping the measurement (it needs a GPU). "
            "Running a tiny CPU smoke step (batch 2, 2 steps, fp32) to exercise the script."
        )
        result = {
            "benchmark": "gpu_throughput",
            "skipped": "no CUDA device",
            **_common.environment("cpu"),
            "smoke": smoke(args),
            "goal_images_per_s": GOAL_IMAGES_PER_S,
        }
        s = result["smoke"]
        print(
            f"smoke ok: {s['parameters'] / 1e6:.2f}M parameters, "
            f"{s['train_gflops_per_image']:.1f} GFLOP per training image (forward + backward)"
        )
        _common.write_json(args.out, result)
        return
    t0 = time.perf_counter()
    res = measure(args, device)
    result = {
        "benchmark": "gpu_throughput",
        **_common.environment(device),
        "settings": {
            "preset": "ddpm_cifar10 (num_classes=10)",
            "batch_sizes": args.batch_sizes,
            "rounds": args.rounds,
            "steps_per_round": args.steps,
            "warmup_steps": args.warmup,
            "precision": "bf16 autocast (fp32 weights, AdamW)",
            "compile": None
            if args.no_compile
            else f"net.compile(mode={args.compile_mode!r}, dynamic=False)",
            "step": "drop_labels, uniform t, training_losses, isfinite check, backward, "
            "clip_grad_norm_(1.0), AdamW, LambdaLR, EMA (foreach); synthetic data on device",
            "flops": "FlopCounterMode, eager forward + backward, per step",
        },
        **res,
        "elapsed_s": time.perf_counter() - t0,
    }
    print_results(res, result["device"])
    _common.write_json(args.out, result)


if __name__ == "__main__":
    main()
