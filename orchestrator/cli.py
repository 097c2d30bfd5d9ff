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
    return parser


def _run_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    steps = [int(s) for s in args.steps.split(",") if s.strip()]
    print(run_demo(args.schedule, args.timesteps, steps, args.samples, args.seed))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except ValueError as err:  # bad user input: one clear line, no traceback
        print(f"ddpm-sweep: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
