"""Training steps/s of the LightningModule under a real ``pl.Trainer`` vs a plain PyTorch loop.

Both variants do the same work per step: one batch from the same datamodule's DataLoader (the
same in-memory tensors, batch size and epoch structure), label dropout, the timestep sampler,
``training_losses``, the finite-loss check, backward, gradient-norm clipping, AdamW + the warm-up
LambdaLR, and an EMA update with ``torch.optim.swa_utils.AveragedModel`` (the plain side is
``_common.PlainStep``, shared with ``gpu_throughput.py``). The two networks are built from the
same config and seed (identical initial weights).

The Lightning side replicates ``lightning_modules.train.build_trainer`` (it cannot be called as
is: it always adds a ``ModelCheckpoint``, which ``enable_checkpointing=False`` refuses) and checks
the replicated settings against a trainer that ``build_trainer`` builds: the same gradient
clipping, precision, EMA ``WeightAveraging`` callback and logging interval; logger,
checkpointing, progress bar, model summary, sanity check and validation off.

A Lightning step is timed from one ``on_train_batch_start`` to the next (``_common.StepTimer``),
so it includes the batch fetch and every hook; Trainer start-up (``fit`` to the first batch) is
reported separately. Two ways to alternate the variants (``--mode``):

* ``steps`` (default on a CPU): one ``fit``; a callback runs one plain step at every
  ``on_train_batch_start``, outside the Lightning step's timed interval (L P L P ...), so noise
  from other processes on a shared machine hits both variants alike. The timed steps are grouped
  into ``--rounds`` rounds of ``--steps`` pairs.
* ``rounds`` (default on a GPU, where a plain step inside the fit would need synchronising and
  would hide the host/device overlap Lightning's overhead can hide behind): ``--rounds`` separate
  fits alternating with plain-loop rounds, each with ``--warmup`` untimed steps.

``lightning_over_plain`` is the median over rounds of Lightning's mean time per step over the
same for the plain loop (goal <= 1.03).

    .venv/bin/python benchmarks/lightning_overhead.py --out /tmp/bench_lightning_overhead.json
"""

from __future__ import annotations

import argparse
import cProfile
import io
import logging
import pstats
import tempfile
import time
import warnings
from pathlib import Path

import _common
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint, WeightAveraging

from lightning_modules.config import load_config
from lightning_modules.module import DiffusionModule
from lightning_modules.train import build_callbacks, build_experiment, build_trainer, precision_for

GOAL = 1.03
DEFAULTS = {"steps": {"rounds": 8, "steps": 10}, "rounds": {"rounds": 3, "steps": 30}}


def parse_args() -> argparse.Namespace:
    p = _common.parser(__doc__)
    p.add_argument("--dataset", default="digits", help="data.name (default: digits)")
    p.add_argument("--preset", default="digits", help="U-Net preset (default: digits)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument(
        "--mode",
        choices=["auto", "steps", "rounds"],
        default="auto",
        help="alternate per step inside one fit, or per round of separate fits "
        "(auto: steps on a CPU, rounds on a GPU)",
    )
    p.add_argument("--rounds", type=int, help="rounds per variant (default: 8 steps / 3 rounds)")
    p.add_argument("--steps", type=int, help="timed steps per round (default: 10 / 30)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (per round/fit)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--profile",
        action="store_true",
        help="afterwards, cProfile --steps more steps of each variant and print where the "
        "Lightning steps spend their time",
    )
    p.add_argument("--override", nargs="*", default=[], help="extra config key=value overrides")
    args = p.parse_args()
    if args.mode == "auto":
        args.mode = "rounds" if torch.cuda.is_available() else "steps"
    for key, value in DEFAULTS[args.mode].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def make_config(args: argparse.Namespace):
    return load_config(
        None,
        [
            f"data.name={args.dataset}",
            f"data.batch_size={args.batch_size}",
            f"network.preset={args.preset}",
            f"train.seed={args.seed}",
            *args.override,
        ],
    )


# -- plain PyTorch ----------------------------------------------------------------------------
class PlainLoop:
    """``_common.PlainStep`` fed from the datamodule's DataLoader, as the Trainer feeds a step."""

    def __init__(self, module: DiffusionModule, datamodule, cfg, device: torch.device) -> None:
        self.device = device
        module.to(device)
        self.plain = _common.PlainStep(module.net, module.process, cfg, device)
        self.loader = datamodule.train_dataloader()
        self.batches = iter(self.loader)

    def step(self) -> None:
        try:
            x0, y = next(self.batches)
        except StopIteration:  # a new epoch, as Lightning does
            self.batches = iter(self.loader)
            x0, y = next(self.batches)
        x0, y = x0.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        self.plain.step(x0, y)


def plain_round(loop: PlainLoop, warmup: int, steps: int) -> list[float]:
    stamps = []
    for i in range(warmup + steps):
        if i == warmup:
            _common.sync(loop.device)
        stamps.append(time.perf_counter())
        loop.step()
    _common.sync(loop.device)
    stamps.append(time.perf_counter())
    return [b - a for a, b in zip(stamps, stamps[1:])][warmup:]


# -- Lightning --------------------------------------------------------------------------------
class StepClock(_common.StepTimer):
    """``_common.StepTimer`` over the Lightning steps, which with ``plain`` also runs one plain
    step between every two Lightning steps (outside their timed intervals; synchronised at every
    step start). ``profilers`` = (lightning, plain) cProfile objects, each enabled only while its
    variant runs, over the timed window (steps ``warmup`` .. ``warmup + steps - 1``).
    """

    def __init__(
        self,
        warmup: int,
        steps: int,
        plain: PlainLoop | None = None,
        profilers: tuple[cProfile.Profile, cProfile.Profile] | None = None,
    ) -> None:
        super().__init__(warmup, steps, sync_every=plain is not None)
        self.plain, self.profilers = plain, profilers
        self.plain_steps: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        k, first, stop = len(self.starts), self.warmup, self.warmup + self.steps
        if self.profilers is not None and first < k <= stop:
            self.profilers[0].disable()
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        if self.profilers is not None and first <= k < stop:
            self.profilers[0].enable()

    def between_steps(self, k: int, now: float) -> float:
        if self.plain is None or not k:
            return now
        profiling = self.profilers is not None and self.warmup < k <= self.warmup + self.steps
        if profiling:
            self.profilers[1].enable()
        self.plain.step()
        _common.sync(self.plain.device)
        after = time.perf_counter()
        if profiling:
            self.profilers[1].disable()
        self.plain_steps.append(after - now)
        return after


def trainer_kwargs(cfg, root_dir: Path) -> dict:
    """``build_trainer``'s settings minus checkpointing, with the benchmark's switches."""
    t = cfg.train
    callbacks = [
        c
        for c in build_callbacks(cfg, root_dir / "checkpoints")
        if not isinstance(c, ModelCheckpoint)
    ]
    return dict(
        default_root_dir=str(root_dir),
        max_epochs=-1,
        val_check_interval=t.val_every_n_steps,
        check_val_every_n_epoch=None,
        gradient_clip_val=t.grad_clip or None,
        precision=precision_for(cfg),
        accelerator=t.accelerator,
        devices=t.devices,
        log_every_n_steps=t.log_every_n_steps,
        logger=False,
        callbacks=callbacks,
        num_sanity_val_steps=0,
        deterministic=False,
        # The benchmark's switches:
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )


def trainer_summary(trainer: pl.Trainer) -> dict:
    return {
        "gradient_clip_val": trainer.gradient_clip_val,
        "gradient_clip_algorithm": str(trainer.gradient_clip_algorithm),
        "precision": trainer.precision,
        "accelerator": type(trainer.accelerator).__name__,
        "log_every_n_steps": trainer.log_every_n_steps,
        "ema_callbacks": sum(isinstance(c, WeightAveraging) for c in trainer.callbacks),
    }


def make_trainer(cfg, root_dir: Path, clock: StepClock) -> pl.Trainer:
    kwargs = trainer_kwargs(cfg, root_dir)
    kwargs["callbacks"] = [clock, *kwargs["callbacks"]]
    trainer = pl.Trainer(max_steps=clock.fit_steps, **kwargs)
    want = trainer_summary(build_trainer(cfg, root_dir / "product"))
    got = trainer_summary(trainer)
    if got != want:
        raise RuntimeError(f"benchmark trainer drifted from build_trainer: {got} != {want}")
    return trainer


def fit(trainer: pl.Trainer, module, datamodule, clock: StepClock) -> dict:
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    return {"startup_s": clock.starts[0] - t0, "fit_s": time.perf_counter() - t0}


# -- the two modes ----------------------------------------------------------------------------
def run_steps_mode(args, cfg, root, lit_module, plain_module, datamodule, device) -> dict:
    """One fit; a plain step between every two Lightning steps."""
    plain = PlainLoop(plain_module, datamodule, cfg, device)
    n = args.rounds * args.steps
    clock = StepClock(args.warmup, n, plain=plain)
    trainer = make_trainer(cfg, root / "fit", clock)
    info = fit(trainer, lit_module, datamodule, clock)
    lit, pln = clock.times, clock.plain_steps[args.warmup :]
    assert len(lit) == len(pln) == n, (len(lit), len(pln), n)
    s = args.steps
    return {
        "lightning_steps": [lit[i * s : (i + 1) * s] for i in range(args.rounds)],
        "plain_steps": [pln[i * s : (i + 1) * s] for i in range(args.rounds)],
        "startup_s": [info["startup_s"]],
        "trainer": trainer,
    }


def run_rounds_mode(args, cfg, root, lit_module, plain_module, datamodule, device) -> dict:
    """Separate fits alternating with plain rounds (fresh optimizer, scheduler, EMA each)."""
    out = {"lightning_steps": [], "plain_steps": [], "startup_s": []}
    w, s = args.warmup, args.steps
    for r in range(args.rounds):
        clock = StepClock(w, s)
        trainer = make_trainer(cfg, root / f"round{r}", clock)
        info = fit(trainer, lit_module, datamodule, clock)
        out["lightning_steps"].append(clock.times)
        out["startup_s"].append(info["startup_s"])
        out["trainer"] = trainer
        plain = PlainLoop(plain_module, datamodule, cfg, device)
        out["plain_steps"].append(plain_round(plain, w, s))
        print(
            f"round {r + 1}/{args.rounds}: lightning "
            f"{_common.median(out['lightning_steps'][-1]) * 1e3:.1f} ms/step, plain "
            f"{_common.median(out['plain_steps'][-1]) * 1e3:.1f} ms/step (medians)",
            flush=True,
        )
    return out


def run_profile(args, cfg, root, lit_module, plain_module, datamodule, device) -> dict:
    """cProfile ``--steps`` interleaved steps of each variant (after ``--warmup``)."""
    profilers = (cProfile.Profile(), cProfile.Profile())
    plain = PlainLoop(plain_module, datamodule, cfg, device)
    clock = StepClock(args.warmup, args.steps, plain=plain, profilers=profilers)
    trainer = make_trainer(cfg, root / "profile", clock)
    fit(trainer, lit_module, datamodule, clock)
    return profile_summary(*profilers, args.steps)


# Parts of a step found in both variants' profiles: (file name ending, function name).
PHASES = {
    "data (DataLoader __next__)": ("dataloader.py", "__next__"),
    "forward + loss (training_losses)": ("diffusion/losses.py", "training_losses"),
    "backward": ("torch/_tensor.py", "backward"),
    "grad clipping (clip_grad_norm_)": ("nn/utils/clip_grad.py", "clip_grad_norm_"),
    "AdamW update (functional adam)": ("optim/adam.py", "adam"),
    "EMA (AveragedModel.update_parameters)": ("optim/swa_utils.py", "update_parameters"),
    "logging (LightningModule.log_dict)": ("core/module.py", "log_dict"),
}


def _bucket(file: str) -> str:
    if any(k in file for k in ("pytorch_lightning", "lightning_fabric", "lightning_utilities")):
        return "lightning"
    if "torchmetrics" in file:
        return "lightning"
    if "lightning_modules" in file:
        return "project"
    if "/torch/" in file or file == "~":
        return "torch + builtins"
    return "other python"


def profile_summary(lightning: cProfile.Profile, plain: cProfile.Profile, steps: int) -> dict:
    """Per-step time under cProfile (which inflates Python-heavy code), by where it is spent."""

    def by_bucket(st: pstats.Stats) -> dict[str, float]:
        out: dict[str, float] = {}
        for (file, _, _), (_, _, tottime, _, _) in st.stats.items():
            out[_bucket(file)] = out.get(_bucket(file), 0.0) + tottime / steps
        return out

    ls = pstats.Stats(lightning, stream=io.StringIO())
    ps = pstats.Stats(plain, stream=io.StringIO())

    def phases(st: pstats.Stats) -> dict[str, float]:
        out = dict.fromkeys(PHASES, 0.0)
        for (file, _, name), (_, _, _, cum, _) in st.stats.items():
            for phase, (file_end, func) in PHASES.items():
                if file.endswith(file_end) and name == func:
                    out[phase] += cum / steps
        return out

    top = [
        (cum / steps, ncalls / steps, f"{Path(file).name}:{line}({name})")
        for (file, line, name), (_, ncalls, _, cum, _) in ls.stats.items()
        if _bucket(file) == "lightning"
    ]
    top.sort(reverse=True)
    return {
        "note": "cProfile figures, per step; the profiler inflates Python-heavy code",
        "total_per_step_s": {"lightning": ls.total_tt / steps, "plain": ps.total_tt / steps},
        "self_time_per_step_s": {"lightning": by_bucket(ls), "plain": by_bucket(ps)},
        "phases_per_step_s": {"lightning": phases(ls), "plain": phases(ps)},
        "lightning_top_cumulative": [
            {"per_step_s": c, "calls_per_step": n, "function": f} for c, n, f in top[:30]
        ],
    }


def print_profile(prof: dict) -> None:
    print("\ncProfile, time per step in ms (the profiler inflates Python-heavy code):")
    la, pa = prof["self_time_per_step_s"]["lightning"], prof["self_time_per_step_s"]["plain"]
    rows = [[k, la.get(k, 0.0) * 1e3, pa.get(k, 0.0) * 1e3] for k in sorted(set(la) | set(pa))]
    tot = prof["total_per_step_s"]
    rows.append(["total", tot["lightning"] * 1e3, tot["plain"] * 1e3])
    _common.print_table(["self time in", "lightning", "plain"], rows)
    print()
    lp, pp = prof["phases_per_step_s"]["lightning"], prof["phases_per_step_s"]["plain"]
    _common.print_table(
        ["part of the step (cumulative)", "lightning", "plain", "difference"],
        [[k, lp[k] * 1e3, pp[k] * 1e3, (lp[k] - pp[k]) * 1e3] for k in PHASES],
    )
    print("\nLightning functions by cumulative time per step (ms; nested calls overlap):")
    _common.print_table(
        ["ms/step", "calls/step", "function"],
        [
            [e["per_step_s"] * 1e3, e["calls_per_step"], e["function"]]
            for e in prof["lightning_top_cumulative"][:20]
        ],
    )


def main() -> None:
    args = parse_args()
    device = _common.setup(args)
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning_fabric").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")

    cfg = make_config(args)
    pl.seed_everything(args.seed, verbose=False)
    datamodule, lit_module = build_experiment(cfg)
    pl.seed_everything(args.seed, verbose=False)
    _, plain_module = build_experiment(cfg)
    for a, b in zip(lit_module.net.state_dict().values(), plain_module.net.state_dict().values()):
        assert torch.equal(a, b), "the two networks must start identical"
    datamodule.setup("fit")
    if cfg.train.accelerator == "cpu":
        device = torch.device("cpu")

    root = Path(tempfile.mkdtemp(prefix="bench_lightning_"))
    t_start = time.perf_counter()
    run = run_steps_mode if args.mode == "steps" else run_rounds_mode
    res = run(args, cfg, root, lit_module, plain_module, datamodule, device)
    elapsed = time.perf_counter() - t_start
    trained_on = res["trainer"].strategy.root_device
    if trained_on.type != device.type:
        raise RuntimeError(f"Lightning trained on {trained_on}, the plain loop on {device}")

    def mean(xs: list[float]) -> float:
        return sum(xs) / len(xs)

    lit_means = [mean(r) for r in res["lightning_steps"]]
    plain_means = [mean(r) for r in res["plain_steps"]]
    lit_s, plain_s = _common.median(lit_means), _common.median(plain_means)
    ratio = lit_s / plain_s
    per_round = [a / b for a, b in zip(lit_means, plain_means)]
    all_lit = [x for r in res["lightning_steps"] for x in r]
    all_plain = [x for r in res["plain_steps"] for x in r]
    ratio_of_sums = sum(all_lit) / sum(all_plain)
    ratio_of_step_medians = _common.median(all_lit) / _common.median(all_plain)

    result = {
        "benchmark": "lightning_overhead",
        **_common.environment(device),
        "pytorch_lightning": pl.__version__,
        "settings": {
            "dataset": args.dataset,
            "preset": args.preset,
            "batch_size": args.batch_size,
            "parameters": sum(p.numel() for p in lit_module.net.parameters()),
            "mode": args.mode,
            "rounds": args.rounds,
            "timed_steps_per_round": args.steps,
            "warmup_steps": args.warmup,
            "seed": args.seed,
            "overrides": args.override,
            "trainer": "replicates build_trainer minus its ModelCheckpoint (settings checked "
            "against build_trainer's); checkpointing, logger, progress bar, model summary, "
            "sanity check and validation off",
            "trainer_settings": trainer_summary(res["trainer"]),
            "lightning_ema": "WeightAveraging(multi_avg_fn=get_ema_multi_avg_fn(decay)): "
            "AveragedModel(module, use_buffers=True), as the product builds it",
            "plain_ema": "AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(decay), "
            "use_buffers=True)",
            "data": "both iterate datamodule.train_dataloader() (same tensors, batch size, "
            "epochs; last batch of an epoch partial, as in the product)",
        },
        "lightning_s_per_step": lit_s,
        "plain_s_per_step": plain_s,
        "lightning_steps_per_s": 1 / lit_s,
        "plain_steps_per_s": 1 / plain_s,
        "lightning_over_plain": ratio,
        "lightning_over_plain_goal": GOAL,
        "lightning_over_plain_per_round": per_round,
        "lightning_over_plain_all_steps": ratio_of_sums,
        "lightning_over_plain_step_medians": ratio_of_step_medians,
        "lightning_round_mean_s_per_step": lit_means,
        "plain_round_mean_s_per_step": plain_means,
        "lightning_startup_s": res["startup_s"],
        "lightning_step_s": res["lightning_steps"],
        "plain_step_s": res["plain_steps"],
        "elapsed_s": elapsed,
    }
    if args.profile:
        result["profile"] = run_profile(
            args, cfg, root, lit_module, plain_module, datamodule, device
        )

    print(
        f"\n{args.dataset} / {args.preset} U-Net, batch {args.batch_size}, mode {args.mode}: "
        f"{args.rounds} rounds x {args.steps} timed steps per variant, "
        f"{torch.get_num_threads()} thread(s), {result['device']}"
    )
    _common.print_table(
        ["variant", "steps/s", "ms/step", "per-round ms/step"],
        [
            ["lightning", 1 / lit_s, lit_s * 1e3, " ".join(f"{m * 1e3:.1f}" for m in lit_means)],
            ["plain", 1 / plain_s, plain_s * 1e3, " ".join(f"{m * 1e3:.1f}" for m in plain_means)],
        ],
    )
    verdict = "ok" if ratio <= GOAL else "ABOVE GOAL"
    print(f"lightning_over_plain = {ratio:.3f}  (goal <= {GOAL}: {verdict})")
    print(
        "  per round: "
        + " ".join(f"{x:.3f}" for x in per_round)
        + f"; all steps: {ratio_of_sums:.3f}; per-step medians: {ratio_of_step_medians:.3f}"
    )
    print(
        "Trainer start-up (fit() to the first batch, not in the ratio): "
        + ", ".join(f"{s:.2f} s" for s in res["startup_s"])
    )
    if "profile" in result:
        print_profile(result["profile"])
    _common.write_json(args.out, result)


if __name__ == "__main__":
    main()
