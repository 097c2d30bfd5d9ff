"""Cost of one classifier-free-guided sampling step: batched [x; x] forward vs alternatives.

For each batch size B, three variants of one denoiser evaluation, in eval mode under
``torch.no_grad()``:

* ``unguided``: ``guided_output(..., w=1)``, a single conditional forward over B;
* ``batched_cfg``: ``guided_output(..., w=3)``, ONE forward over the doubled batch [x; x] with
  labels [c; null], then the combination;
* ``two_pass``: two separate forwards over B (cond, then uncond), then ``cfg_combine``;
* ``grouped``: K guidance weights of one cell drawn together (``sample_specs``, what
  ``evaluate.guidance_groups`` does on a GPU): ONE forward over [x; x] x K, 2KB samples;
* ``sequential``: the same K weights one after another, K ``batched_cfg`` forwards.

Rounds alternate the variants (the order rotates every round) after warm-up calls; each
variant's figure is the median over rounds. Keys: ``batched_cfg_over_unguided`` (goal <= 1.3;
per batch size and overall = geometric mean over batch sizes), ``two_pass_over_batched`` and
``grouped_over_sequential`` (below 1: drawing a cell's K weights together pays).
The batched and two-pass outputs are also compared (they must agree to float tolerance).

On a CPU the network is compute-bound already at small batches, so a doubled batch costs about
twice as much: the 1.3 goal is about a GPU, where a small batch leaves the device idle.

    .venv/bin/python benchmarks/cfg_batching.py --out /tmp/bench_cfg_batching.json
"""

from __future__ import annotations

import argparse
import math
import time

import _common
import torch

from lightning_modules.diffusion import cfg_combine, guided_forward, guided_output
from lightning_modules.networks import UNet, unet_preset

GOAL = 1.3
GUIDANCE = 3.0
GROUP = (0.0, 1.0, 3.0, 5.0)  # the K weights of one cell (the quickstart has four)
NUM_TIMESTEPS = 1000


def parse_args() -> argparse.Namespace:
    p = _common.parser(__doc__, device=_common.default_device())
    p.add_argument("--preset", default="digits", help="U-Net preset: digits or ddpm_cifar10")
    p.add_argument(
        "--batch-sizes",
        type=int,
        nargs="+",
        help="default: 16 64 (ddpm_cifar10 on a CPU: 2 4, it is slow there)",
    )
    p.add_argument("--rounds", type=int, help="rounds per batch size (default 40; cifar CPU 3)")
    p.add_argument("--calls", type=int, default=2, help="calls per variant per round (timed)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls per variant first")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast around the forwards")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    slow = args.preset == "ddpm_cifar10" and not args.device.startswith("cuda")
    if args.batch_sizes is None:
        args.batch_sizes = [2, 4] if slow else [16, 64]
    if args.rounds is None:
        args.rounds = 3 if slow else 40
    return args


def build_net(preset: str, device: torch.device) -> UNet:
    cfg = unet_preset(preset)
    if not cfg.num_classes:  # ddpm_cifar10 is unconditional as published: give it classes
        cfg = unet_preset(preset, num_classes=10)
    return UNet(cfg).to(device).eval()


def main() -> None:
    args = parse_args()
    device = _common.setup(args)
    torch.manual_seed(args.seed)
    net = build_net(args.preset, device)
    cfg = net.cfg
    null = cfg.num_classes
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16)
        if args.bf16
        else torch.autocast(device.type, enabled=False)
    )

    def variants(x, t, y):
        def unguided():
            return guided_output(net, x, t, y, 1.0, null_label=null, num_timesteps=NUM_TIMESTEPS)

        def batched_cfg():
            return guided_output(
                net, x, t, y, GUIDANCE, null_label=null, num_timesteps=NUM_TIMESTEPS
            )

        def two_pass():
            cond = net(x, t, y)
            uncond = net(x, t, torch.full_like(y, null))
            return cfg_combine(uncond, cond, GUIDANCE)

        k = len(GROUP)
        xk, tk, yk = x.repeat(k, 1, 1, 1), t.repeat(k), y.repeat(k)
        wk = torch.tensor(GROUP, device=x.device).repeat_interleave(len(x)).reshape(-1, 1, 1, 1)

        def grouped():
            return guided_forward(net, xk, tk, yk, wk, "both", null_label=null)

        def sequential():
            return [guided_forward(net, x, t, y, w, "both", null_label=null) for w in GROUP]

        return {
            "unguided": unguided,
            "batched_cfg": batched_cfg,
            "two_pass": two_pass,
            "grouped": grouped,
            "sequential": sequential,
        }

    names = ["unguided", "batched_cfg", "two_pass", "grouped", "sequential"]
    per_batch = {}
    t_start = time.perf_counter()
    with torch.no_grad(), autocast:
        for bs in args.batch_sizes:
            g = torch.Generator().manual_seed(args.seed + bs)
            x = torch.randn(bs, cfg.in_channels, cfg.image_size, cfg.image_size, generator=g)
            y = torch.randint(0, cfg.num_classes, (bs,), generator=g)
            x, y = x.to(device), y.to(device)
            # All samples at one timestep, as in a sampling step; mid-chain.
            t = torch.full((bs,), NUM_TIMESTEPS // 2, dtype=torch.long, device=device)
            fns = variants(x, t, y)
            diff = (fns["batched_cfg"]() - fns["two_pass"]()).abs().max().item()
            for name in names:
                for _ in range(args.warmup):
                    fns[name]()
            _common.sync(device)
            times: dict[str, list[float]] = {n: [] for n in names}
            for r in range(args.rounds):
                order = names[r % len(names) :] + names[: r % len(names)]  # none always first
                for name in order:
                    _common.sync(device)
                    t0 = time.perf_counter()
                    for _ in range(args.calls):
                        fns[name]()
                    _common.sync(device)
                    times[name].append((time.perf_counter() - t0) / args.calls)
            med = {n: _common.median(v) for n, v in times.items()}
            per_batch[bs] = {
                "median_s": med,
                "round_s": times,
                "batched_cfg_over_unguided": med["batched_cfg"] / med["unguided"],
                "two_pass_over_batched": med["two_pass"] / med["batched_cfg"],
                "two_pass_over_unguided": med["two_pass"] / med["unguided"],
                "grouped_over_sequential": med["grouped"] / med["sequential"],
                "max_abs_diff_batched_vs_two_pass": diff,
            }
            print(
                f"batch {bs}: batched/unguided {per_batch[bs]['batched_cfg_over_unguided']:.3f}, "
                f"two-pass/batched {per_batch[bs]['two_pass_over_batched']:.3f}, "
                f"grouped/sequential {per_batch[bs]['grouped_over_sequential']:.3f}",
                flush=True,
            )

    def geomean(key: str) -> float:
        return math.exp(sum(math.log(v[key]) for v in per_batch.values()) / len(per_batch))

    overall = geomean("batched_cfg_over_unguided")
    result = {
        "benchmark": "cfg_batching",
        **_common.environment(device),
        "settings": {
            "preset": args.preset,
            "parameters": sum(p.numel() for p in net.parameters()),
            "num_classes": cfg.num_classes,
            "batch_sizes": args.batch_sizes,
            "guidance_w": GUIDANCE,
            "group_weights": list(GROUP),
            "rounds": args.rounds,
            "calls_per_round": args.calls,
            "warmup_calls": args.warmup,
            "bf16_autocast": args.bf16,
            "mode": "eval, torch.no_grad(); all samples at t = 500; variants alternate, order "
            "rotating per round; median over rounds",
            "overall": "geometric mean over batch sizes",
        },
        "batched_cfg_over_unguided": overall,
        "batched_cfg_over_unguided_goal": GOAL,
        "batched_cfg_over_unguided_worst": max(
            v["batched_cfg_over_unguided"] for v in per_batch.values()
        ),
        "two_pass_over_batched": geomean("two_pass_over_batched"),
        "grouped_over_sequential": geomean("grouped_over_sequential"),
        "per_batch_size": {str(k): v for k, v in per_batch.items()},
        "elapsed_s": time.perf_counter() - t_start,
    }

    print(
        f"\n{args.preset} U-Net ({result['settings']['parameters'] / 1e6:.2f}M parameters), "
        f"w = {GUIDANCE}, {torch.get_num_threads()} thread(s), {result['device']}"
    )
    _common.print_table(
        [
            "batch",
            "unguided ms",
            "batched ms",
            "two-pass ms",
            "batched/unguided",
            "two-pass/batched",
            "grouped/sequential",
            "max |diff|",
        ],
        [
            [
                bs,
                v["median_s"]["unguided"] * 1e3,
                v["median_s"]["batched_cfg"] * 1e3,
                v["median_s"]["two_pass"] * 1e3,
                v["batched_cfg_over_unguided"],
                v["two_pass_over_batched"],
                v["grouped_over_sequential"],
                f"{v['max_abs_diff_batched_vs_two_pass']:.1e}",
            ]
            for bs, v in per_batch.items()
        ],
    )
    verdict = "ok" if overall <= GOAL else "ABOVE GOAL"
    print(
        f"batched_cfg_over_unguided = {overall:.3f} overall (geometric mean; goal <= {GOAL}: "
        f"{verdict}); two_pass_over_batched = {result['two_pass_over_batched']:.3f}; "
        f"grouped_over_sequential = {result['grouped_over_sequential']:.3f} "
        f"({len(GROUP)} weights)"
    )
    if device.type == "cpu":
        print(
            "note: on a CPU the forward is compute-bound, so a doubled batch costs ~2x; "
            "the goal is about a GPU (absolute times here are not reported figures)"
        )
    _common.write_json(args.out, result)


if __name__ == "__main__":
    main()
