"""The ``avatar`` command: one CLI, one subcommand per pipeline stage."""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from . import __version__

# Stages still to be built, with the issue that tracks each.
_PENDING = {
    "train": ("fit a talking Gaussian avatar to a dataset", 5),
    "eval": ("score a trained avatar on held-out frames", 5),
    "render": ("render an avatar driven by a speech file to an mp4 with audio", 5),
    "export": ("export an avatar to a standard 3DGS .ply", 5),
}


def _pending(name: str, issue: int) -> Callable[[argparse.Namespace], int]:
    def run(_: argparse.Namespace) -> int:
        print(
            f"avatar {name}: this stage is not built yet (tracked in issue #{issue}).",
            file=sys.stderr,
        )
        return 2

    return run


def _capture(args: argparse.Namespace) -> int:
    from pathlib import Path

    from capture.config import CaptureConfig

    if args.from_ernerf is not None:
        from capture.ernerf import import_ernerf

        out = import_ernerf(Path(args.from_ernerf), Path(args.out), force=args.force)
    else:
        if args.video is None:
            raise SystemExit("avatar capture: give a VIDEO, or --from-ernerf DIR")
        from capture.pipeline import run_capture

        cfg = CaptureConfig(video=Path(args.video), out=Path(args.out), audio=args.audio and Path(args.audio),
                            audio_features=[Path(p) for p in args.audio_features], fps=args.fps, size=args.size,
                            force=args.force)
        out = run_capture(cfg)
    print(f"dataset: {out}\n  report:  {out / 'capture_report.json'}\n  preview: {out / 'preview.png'}")
    return 0


def _view(args: argparse.Namespace) -> int:
    from pathlib import Path

    path = Path(args.path)
    if (path / "transforms.json").is_file():
        from viewer.dataset_view import run_dataset_viewer

        return run_dataset_viewer(path, args.host, args.port)
    print(f"avatar view: {path} is not a dataset folder; viewing trained avatars is not built yet (tracked in "
          "issue #6).", file=sys.stderr)
    return 2


def _demo(args: argparse.Namespace) -> int:
    from pathlib import Path

    from scenes.demo import run_demo

    return run_demo(Path(args.out))


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
    p = sub.add_parser("capture", help="turn a talking-head video into a calibrated dataset folder",
                       description="Video -> dataset folder (transforms.json, images, masks, audio features).")
    p.add_argument("video", nargs="?", help="talking-head video (phone or camera; any length >= 3 s)")
    p.add_argument("--out", required=True, help="dataset folder to write")
    p.add_argument("--audio", help="speech file to use instead of the video's own audio")
    p.add_argument("--audio-features", nargs="*", default=[], metavar="NPY",
                   help="precomputed ER-NeRF features to carry along (aud_ds.npy, aud_hu.npy)")
    p.add_argument("--fps", type=float, default=25.0, help="target frame rate (default 25)")
    p.add_argument("--size", type=int, default=512, help="side of the square output frames (default 512)")
    p.add_argument("--from-ernerf", metavar="DIR", help="import an ER-NeRF / TalkingGaussian preprocessed folder")
    p.add_argument("--force", action="store_true", help="redo every stage and replace an existing dataset")
    p.set_defaults(func=_capture)
    p = sub.add_parser("view", help="open the browser viewer on a dataset (capture inspection); avatars: not built yet")
    p.add_argument("path", help="dataset folder written by `avatar capture`")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    p.set_defaults(func=_view)
    p = sub.add_parser("demo", help="run the pipeline on the built-in sample subject (capture so far)")
    p.add_argument("--out", default="outputs/demo", help="working folder (default outputs/demo); reruns reuse it")
    p.set_defaults(func=_demo)
    p = sub.add_parser("bench", help="benchmarks (raster: rasterizer backends vs gsplat)")
    p.add_argument("target", choices=["raster"], help="what to benchmark")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="options of the benchmark (see `avatar bench raster --help`)")
    p.set_defaults(func=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    import logging

    from .errors import AvatarError

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except AvatarError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
