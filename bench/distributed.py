"""Scaling of training over processes (recon/distributed.py): `avatar train --nproc N` for
each N, side by side, with the same batch.

    avatar bench distributed DATASET [--nproc 1 2] [--batch-size B] [--preset cpu] [--steps 60]
                                     [--rounds 1] [--device auto] [--json]

Each run trains a Gaussian avatar from scratch for `steps` head steps (no torso) with B
views per step (default: the largest N, so every process has a view), as `avatar train
--nproc N` does, and is timed from its metrics (steps after the first 5, so start-up,
the speech -> motion fit and the first steps' compilation stay out). Rounds interleave
the N, so a noisy spell hits each alike. Prints the median steps and views per second and
each N's speed over N = 1 (on GPUs, one per process; on CPUs the cores are shared out).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from avatar.errors import AvatarError

WARMUP_STEPS = 5


def timed_run(dataset: Path, nproc: int, batch_size: int, preset: str, steps: int, device: str, root: Path) -> float:
    """Steps per second of one `avatar train --nproc nproc` run, after WARMUP_STEPS."""
    out = root / f"avatar_{nproc}"
    config = root / "train.json"
    config.write_text(json.dumps({"iterations": steps, "torso_steps": 0, "motion_steps": 10, "live_lookahead_ms": 0,
                                  "log_every": 1,
                                  "checkpoint_every": steps, "batch_size": batch_size}))
    cmd = [sys.executable, "-m", "avatar", "train", str(dataset), "--out", str(out), "--preset", preset,
           "--config", str(config), "--device", device, "--nproc", str(nproc)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise AvatarError(dataset, f"`avatar train --nproc {nproc}` failed:\n{done.stderr[-2000:]}")
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    first = next(r for r in lines if r["step"] >= WARMUP_STEPS)
    last = lines[-1]
    for path in out.iterdir():  # the next round trains into the same folder afresh
        path.unlink()
    return (last["step"] - first["step"]) / max(last["elapsed_s"] - first["elapsed_s"], 1e-9)


def run(dataset: Path, nprocs: list[int], batch_size: int | None, preset: str, steps: int, rounds: int,
        device: str) -> dict:
    """{"rows": {N: {"it_per_s", "views_per_s", "speedup"}}, ...} (module docstring)."""
    nprocs = list(dict.fromkeys(nprocs))
    batch_size = batch_size or max(nprocs)
    speeds: dict[int, list[float]] = {n: [] for n in nprocs}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(rounds):
            for n in nprocs:
                speeds[n].append(timed_run(dataset, n, batch_size, preset, steps, device, Path(tmp)))
    rows = {n: {"it_per_s": round(statistics.median(s), 3), "views_per_s": round(statistics.median(s) * batch_size, 2)}
            for n, s in speeds.items()}
    peer = rows[nprocs[0]]["it_per_s"]
    for r in rows.values():
        r["speedup"] = round(r["it_per_s"] / peer, 3)
    return {"dataset": str(dataset), "preset": preset, "device": device, "batch_size": batch_size, "steps": steps,
            "rounds": rounds, "cpu_count": os.cpu_count(), "rows": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="avatar bench distributed", description=__doc__.split("\n\n")[0])
    p.add_argument("dataset", help="dataset folder written by `avatar capture`")
    p.add_argument("--nproc", type=int, nargs="+", default=[1, 2], help="process counts to time (the first is the peer)")
    p.add_argument("--batch-size", type=int, help="views per step, the same for every N (default: the largest N)")
    p.add_argument("--preset", default="cpu", help="the Gaussian avatar's preset (default cpu)")
    p.add_argument("--steps", type=int, default=60, help="head steps per run (the first 5 are not timed)")
    p.add_argument("--rounds", type=int, default=1, help="runs per N, interleaved (medians pool them)")
    p.add_argument("--device", default="auto", help="auto (default), cpu or cuda (one GPU per process)")
    p.add_argument("--json", action="store_true", help="also print one JSON line of the results")
    args = p.parse_args(argv)
    if args.steps <= WARMUP_STEPS + 1:
        p.error(f"--steps must be more than {WARMUP_STEPS + 1}")
    result = run(Path(args.dataset), args.nproc, args.batch_size, args.preset, args.steps, args.rounds, args.device)
    print(f"training over processes: {result['dataset']}, preset {result['preset']}, device {result['device']}, "
          f"B = {result['batch_size']}, {result['steps']} steps, {result['rounds']} round(s), "
          f"{result['cpu_count']} CPU cores")
    print(f"  {'processes':>9} {'it/s':>8} {'views/s':>8} {'speed-up':>8}")
    for n, r in result["rows"].items():
        print(f"  {n:>9} {r['it_per_s']:>8.2f} {r['views_per_s']:>8.2f} {r['speedup']:>7.2f}x")
    if args.json:
        print(json.dumps(result))
    return 0
