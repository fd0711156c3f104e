"""The ``avatar`` command: one CLI, one subcommand per pipeline stage."""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from . import __version__

# Stages still to be built, with the issue that tracks each.
_PENDING = {
    "capture": ("turn a talking-head video into a calibrated dataset folder", 3),
    "train": ("fit a talking Gaussian avatar to a dataset", 5),
    "eval": ("score a trained avatar on held-out frames", 5),
    "render": ("render an avatar driven by a speech file to an mp4 with audio", 5),
    "export": ("export an avatar to a standard 3DGS .ply", 5),
    "view": ("open the live browser viewer", 6),
    "demo": ("run the whole pipeline on the built-in sample subject", 4),
}


def _pending(name: str, issue: int) -> Callable[[argparse.Namespace], int]:
    def run(_: argparse.Namespace) -> int:
        print(
            f"avatar {name}: this stage is not built yet (tracked in issue #{issue}).",
            file=sys.stderr,
        )
        return 2

    return run


def _bench(args: argparse.Namespace) -> int:
    if args.target == "raster":
        from bench.rasterizer import main as bench_raster

        return bench_raster(args.rest)
    return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="avatar",
        description="Talking-head avatar studio: video -> dataset -> Gaussian avatar -> speech-driven renders.",
    )
    parser.add_argument("--version", action="version", version=f"avatar-studio {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (help_text, issue) in _PENDING.items():
        p = sub.add_parser(name, help=f"{help_text} (not built yet)", add_help=True)
        p.add_argument("args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
        p.set_defaults(func=_pending(name, issue))
    p = sub.add_parser("bench", help="benchmarks (raster: rasterizer backends vs gsplat)")
    p.add_argument("target", choices=["raster"], help="what to benchmark")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="options of the benchmark (see `avatar bench raster --help`)")
    p.set_defaults(func=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
