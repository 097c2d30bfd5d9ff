"""Training throughput of the 35.7M ``ddpm_cifar10`` U-Net on one GPU: images/s and % of peak.

One training step does the product's work (``DiffusionModule.training_step`` with the Trainer's
gradient clipping and an EMA, written out as a plain loop: ``_common.PlainStep``, shared with
``lightning_overhead.py``): label dropout, the uniform timestep sampler, ``training_losses``
under bf16 autocast, the finite-loss check, backward, ``clip_grad_norm_(1.0)``, AdamW + the
warm-up LambdaLR, and an EMA update (``AveragedModel`` with ``get_ema_multi_avg_fn``). The
data are one synthetic CIFAR-sized batch already on the GPU, so data loading is not measured.
The network is conditional (10 classes + the null label), as the product trains it on CIFAR-10.

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
import time

import _common
import torch
from torch.utils.flop_counter import FlopCounterMode

from lightning_modules.config import load_config
from lightning_modules.diffusion import GaussianDiffusion
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
# The product's defaults (lightning_modules.config.TrainConfig / DiffusionConfig), pinned here so
# that the figure does not move when a default does.
SETTINGS = {
    "train.lr": 2e-4,
    "train.weight_decay": 0.0,
    "train.warmup_steps": 100,
    "train.grad_clip": 1.0,
    "train.ema_decay": 0.999,
    "train.p_uncond": 0.1,
    "diffusion.schedule": "cosine",
    "diffusion.timesteps": 1000,
    "diffusion.timestep_sampling": "uniform",
    "diffusion.prediction": "eps",
    "diffusion.variance": "fixed_small",
}


def parse_args() -> argparse.Namespace:
    p = _common.parser(
        __doc__, device="cuda", device_help="cuda (default) or cpu (full run on a CPU)"
    )
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 256])
    p.add_argument("--rounds", type=int, default=5, help="rounds per variant (alternating)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per round")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per variant first")
    p.add_argument("--no-compile", action="store_true", help="eager only")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode (default: default)")
    p.add_argument("--peak-tflops", type=float, help="dense bf16 peak of the device, TFLOP/s")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def peak_for(name: str) -> float | None:
    for key, tflops in PEAK_BF16_TFLOPS:
        if key.lower() in name.lower():
            return tflops
    return None


def make_step(
    device: torch.device, seed: int, bf16: bool, compile_: bool, mode=None
) -> _common.PlainStep:
    """The network (from ``seed``) with its optimizer, scheduler and EMA; ``.step(x0, y)`` is one
    training step."""
    precision = "bf16-mixed" if bf16 else "32-true"
    cfg = load_config(
        None, [f"{k}={v}" for k, v in SETTINGS.items()] + [f"train.precision={precision}"]
    )
    torch.manual_seed(seed)
    net = UNet(unet_preset("ddpm_cifar10", num_classes=NUM_CLASSES)).to(device).train()
    process = GaussianDiffusion.from_schedule(cfg.diffusion.schedule, cfg.diffusion.timesteps)
    loop = _common.PlainStep(net, process, cfg, device)
    if compile_:
        net.compile(mode=mode, dynamic=False)  # in place, as train.compile=true does
    return loop


def synthetic_batch(batch_size: int, device: torch.device, seed: int):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(batch_size, 3, 32, 32, generator=g) * 2 - 1
    y = torch.randint(0, NUM_CLASSES, (batch_size,), generator=g)
    return x0.to(device), y.to(device)


def count_flops(loop: _common.PlainStep, x0: torch.Tensor, y: torch.Tensor) -> int:
    """FLOPs of one forward + backward (FlopCounterMode: matmul, conv, attention)."""
    counter = FlopCounterMode(display=False)
    with counter:
        loop.forward_backward(x0, y)
    loop.opt.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def timed_round(loop: _common.PlainStep, x0, y, steps: int) -> float:
    """Seconds per step over ``steps`` consecutive steps."""
    _common.sync(loop.device)
    t0 = time.perf_counter()
    for _ in range(steps):
        loop.step(x0, y)
    _common.sync(loop.device)
    return (time.perf_counter() - t0) / steps


def smoke(args: argparse.Namespace) -> dict:
    """No CUDA: two fp32 steps at batch 2 on the CPU, and the FLOP count, to exercise the code."""
    device = torch.device("cpu")
    loop = make_step(device, args.seed, bf16=False, compile_=False)
    x0, y = synthetic_batch(2, device, args.seed)
    flops = count_flops(loop, x0, y)
    t0 = time.perf_counter()
    for _ in range(2):
        loop.step(x0, y)
    return {
        "batch_size": 2,
        "steps": 2,
        "precision": "fp32",
        "s_per_step": (time.perf_counter() - t0) / 2,
        "train_gflops_per_image": flops / 2 / 1e9,
        "parameters": sum(p.numel() for p in loop.net.parameters()),
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
            loops = {
                v: make_step(device, args.seed, bf16, v == "compile", args.compile_mode)
                for v in variants
            }
            flops = count_flops(loops["eager"], x0, y)
            entry: dict = {"flops_per_step": flops, "train_gflops_per_image": flops / bs / 1e9}
            for v, loop in loops.items():
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                _common.sync(device)
                t0 = time.perf_counter()
                loop.step(x0, y)  # compiles the compiled variant
                _common.sync(device)
                entry.setdefault("first_step_s", {})[v] = time.perf_counter() - t0
                for _ in range(args.warmup - 1):
                    loop.step(x0, y)
                _common.sync(device)
                if device.type == "cuda":
                    mem = torch.cuda.max_memory_allocated(device) / 2**30
                    entry.setdefault("peak_memory_gib", {})[v] = mem
            rounds: dict[str, list[float]] = {v: [] for v in variants}
            for r in range(args.rounds):
                order = variants if r % 2 == 0 else variants[::-1]
                for v in order:
                    rounds[v].append(timed_round(loops[v], x0, y, args.steps))
        except torch.cuda.OutOfMemoryError as err:
            print(f"batch {bs}: out of memory ({err})", flush=True)
            per_batch[str(bs)] = {"error": "out of memory"}
            continue
        finally:
            loops = None
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
    device = _common.setup(args)
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
