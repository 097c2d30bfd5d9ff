"""The ``ddpm-sweep`` command line."""

from __future__ import annotations

import argparse
import sys

from . import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ddpm-sweep",
        description=(
            "Sweep denoising diffusion models: train once per training configuration, sample "
            "every variance choice, guidance weight and step count from the checkpoints."
        ),
    )
    parser.add_argument("--version", action="version", version=f"ddpm-sweep {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser(
        "demo",
        help="sample with exact denoisers: the variance choice vs sampling steps, in seconds",
        description=(
            "End-to-end check of the diffusion math with exact denoisers (no training): for "
            "N(0, I) data fixed_large is exact, for point-mass data fixed_small is."
        ),
    )
    demo.add_argument("--schedule", default="linear", help="noise schedule (default: linear)")
    demo.add_argument("--timesteps", type=int, default=1000, help="T (default: 1000)")
    demo.add_argument("--steps", default="1000,250,50,10", help="sampling steps to compare")
    demo.add_argument("--samples", type=int, default=2000, help="samples per cell")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_run_demo)

    train = sub.add_parser(
        "train",
        help="train one run (no Ray), log it to MLflow, sample and evaluate it",
        description="Train one configuration, then sample every (guidance, variance, steps) of "
        "its `sample` section and log metrics, grids and the checkpoint to MLflow.",
    )
    train.add_argument("config", help="run config YAML (see sweeps/ for examples)")
    train.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    train.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite:///mlflow.db)")
    train.add_argument("--out", help="directory for checkpoints and samples (default: a temp dir)")
    train.add_argument("--no-eval", action="store_true", help="skip sampling and metrics")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.set_defaults(func=_run_train)

    smp = sub.add_parser(
        "sample",
        help="sample a checkpoint: grids (and metrics with --eval)",
        description="Sample a trained checkpoint with any guidance weights, variance choices and "
        "step counts; write one PNG per (w, variance, steps) and, with --eval, the metrics.",
    )
    smp.add_argument("checkpoint")
    smp.add_argument(
        "--guidance",
        help="guidance weights, comma-separated (0 unconditional, 1 conditional, >1 "
        "extrapolates; default: the checkpoint's sample.guidance)",
    )
    smp.add_argument("--variance", help="fixed_small,fixed_large,... (default: the checkpoint's)")
    smp.add_argument("--steps", help="sampling steps, comma-separated (default: the checkpoint's)")
    smp.add_argument("--out", required=True, help="output directory")
    smp.add_argument("--eval", action="store_true", help="also compute the metrics")
    smp.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="other sample settings, e.g. sampler=ddim eta=0.5 seed=3",
    )
    smp.set_defaults(func=_run_sample)

    plan = sub.add_parser(
        "plan",
        help="check a sweep and print its plan (trainings, sampling cells, cost); runs nothing",
        description="Build the sweep's plan, which checks everything it can before a trial "
        "starts (every training config, its network on the data's shape, its dataset, every "
        "sampling cell against its training), print it, and exit. `run` prints the same.",
    )
    plan.add_argument("sweep", help="sweep YAML (see sweeps/)")
    plan.add_argument("overrides", nargs="*", metavar="key=value", help="sweep-file overrides")
    plan.add_argument("--name", help="sweep name (default: the file's `name`)")
    plan.add_argument(
        "--address",
        help="the Ray cluster it will run on: its dataset files are then checked on the "
        "workers at `run`, not here",
    )
    plan.set_defaults(func=_run_plan)

    run = sub.add_parser(
        "run",
        help="run a sweep on Ray Tune, tracked in MLflow",
        description="Train once per training configuration of the sweep file and evaluate every "
        "sampling configuration (sample.*) from each checkpoint. Local Ray by default.",
    )
    run.add_argument("sweep", help="sweep YAML (see sweeps/)")
    run.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="sweep-file overrides, e.g. base.train.max_steps=200 tune.max_concurrent_trials=1",
    )
    run.add_argument("--name", help="sweep name (default: the file's `name`)")
    run.add_argument("--address", help="Ray cluster address (default: start a local Ray)")
    run.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite:///mlflow.db)")
    run.add_argument("--storage-path", help="Ray Tune storage path (default: ./ddpm_sweep_runs)")
    run.add_argument(
        "--verbose",
        action="store_true",
        help="also Tune's status tables and every worker's output (they always go to log files)",
    )
    run.set_defaults(func=_run_sweep)

    resume = sub.add_parser(
        "resume",
        help="continue a killed sweep from its directory",
        description="Continue a sweep from its Ray Tune experiment directory "
        "(<storage-path>/<name>): finished trials are not rerun, unfinished and errored ones "
        "resume from their last checkpoint, and the same MLflow parent run is used.",
    )
    resume.add_argument("directory", help="e.g. ddpm_sweep_runs/quickstart")
    resume.add_argument("--address", help="Ray cluster address (default: as the sweep ran)")
    resume.add_argument(
        "--verbose", action="store_true", help="also Tune's status tables and workers' output"
    )
    resume.set_defaults(func=_run_resume)

    report = sub.add_parser(
        "report",
        help="tables and plots of a sweep, from MLflow",
        description="Best configurations and plots (quality and guided accuracy vs guidance "
        "weight per schedule x variance, quality vs sampling steps, learning curves) as PNG, "
        "Markdown and HTML (which the MLflow UI shows), also logged to the sweep's parent run.",
    )
    report.add_argument("sweep", help="the sweep name (its MLflow experiment)")
    report.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite:///mlflow.db)")
    report.add_argument("--out", help="output directory (default: reports/<sweep>)")
    report.add_argument(
        "--top", type=int, default=10, help="configurations in the best table (default 10)"
    )
    report.add_argument(
        "--contrast",
        action="append",
        default=[],
        metavar="KEY[=BASELINE]",
        help="a table of every configuration against its twin at KEY = BASELINE (default: "
        "KEY's smallest value), paired; e.g. --contrast sample.variance; repeatable",
    )
    report.add_argument(
        "--ui-url",
        help="where the MLflow UI is, for the HTML report's run links (default: the tracking "
        "server for an http(s) URI, else http://127.0.0.1:5000, where `mlflow ui` listens)",
    )
    report.set_defaults(func=_run_report)
    return parser


def _run_report(args: argparse.Namespace) -> int:
    from .report import write_report
    from .tracking import existing_store, tracking_uri, ui_url

    uri = existing_store(tracking_uri(args.tracking_uri))
    path = write_report(
        args.sweep,
        uri,
        args.out or f"reports/{args.sweep}",
        args.top,
        ui_url=args.ui_url or ui_url(uri),
        contrast=args.contrast,
    )
    print(path.read_text())
    print(f"report: {path}")
    return 0


def _run_resume(args: argparse.Namespace) -> int:
    from .sweep import resume_sweep

    return _print_summary(resume_sweep(args.directory, address=args.address, verbose=args.verbose))


def _print_summary(summary: dict) -> int:
    from .sweep import best_text

    best = summary.get("best")
    if best:
        print(
            f"best: {best['eval_run']} ({best_text(best)}); registered as model "
            f"{best['registered_model']!r} version {best['version']}"
        )
        print(best["comparison"])
    print(
        f"compute: {summary['cpu_hours']:.3f} CPU-hours, {summary['gpu_hours']:.3f} GPU-hours "
        f"in {summary['trial_seconds']:.0f} trial-seconds"
    )
    print(
        f"done in {summary['wall_seconds']:.0f} s; {summary['errored']} trial(s) errored; "
        f"parent run {summary['parent_run_id']}"
    )
    print(f"browse: mlflow ui --backend-store-uri {summary['tracking_uri']}")
    return 0 if not summary["errored"] else 1


def _build_plan(args: argparse.Namespace):
    from .plan import build_plan

    return build_plan(args.sweep, args.overrides, args.name, local_data=args.address is None)


def _run_plan(args: argparse.Namespace) -> int:
    plan = _build_plan(args)
    print(plan.table())
    _print_noise(plan, args)
    return 0


def _print_noise(plan, args: argparse.Namespace) -> None:
    """What eval.num_samples can tell apart (orchestrator/noise.py), where the data is here."""
    if args.address is not None:
        return  # the dataset's files are on the cluster's nodes
    from .noise import noise_check

    check = noise_check(plan)
    for line in check.lines() if check else []:
        print(line)


def _run_sweep(args: argparse.Namespace) -> int:
    from .cluster import experiment_location
    from .sweep import run_sweep
    from .tracking import tracking_uri

    plan = _build_plan(args)  # all validation, before Ray
    sweep = plan.sweep
    print(plan.table())
    _print_noise(plan, args)
    print(
        f"Tune state: {experiment_location(args.storage_path, sweep.name)} "
        "(continue a killed sweep with `ddpm-sweep resume` on it)"
    )
    summary = run_sweep(
        plan,
        tracking_uri=tracking_uri(args.tracking_uri),
        address=args.address,
        storage_path=args.storage_path,
        overrides=args.overrides,
        verbose=args.verbose,
    )
    code = _print_summary(summary)
    from .report import write_report
    from .tracking import ui_url

    uri = summary["tracking_uri"]
    path = write_report(sweep.name, uri, f"reports/{sweep.name}", ui_url=ui_url(uri))
    print(
        f"report: {path} (also logged to the parent run); `ddpm-sweep report {sweep.name}` "
        "rebuilds it"
    )
    return code


def _csv(text: str, kind, option: str) -> list:
    try:
        return [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(
            f"{option} {text!r}: expected comma-separated {kind.__name__} values"
        ) from None


def _run_train(args: argparse.Namespace) -> int:
    from .single_run import train_command

    return train_command(
        args.config,
        args.overrides,
        args.tracking_uri,
        args.out,
        run_eval=not args.no_eval,
        progress=not args.no_progress,
    )


def _run_sample(args: argparse.Namespace) -> int:
    from .single_run import sample_command

    return sample_command(
        args.checkpoint,
        args.guidance and _csv(args.guidance, float, "--guidance"),
        args.variance and _csv(args.variance, str, "--variance"),
        args.steps and _csv(args.steps, int, "--steps"),
        args.out,
        args.eval,
        args.overrides,
    )


def _run_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    steps = [int(s) for s in args.steps.split(",") if s.strip()]
    print(run_demo(args.schedule, args.timesteps, steps, args.samples, args.seed))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # key=value overrides may come after options too (`sample CKPT --steps 50 sampler=ddim`).
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any(a.startswith("-") or "=" not in a for a in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as err:  # bad user input: one clear line
        print(f"ddpm-sweep: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
