"""Training-step benchmark: the engine's batches and prefetch side by side, in one process.

    avatar bench train DATASET [--preset cpu] [--steps 10] [--rounds 3] [--batch-sizes 1 2] [--device auto] [--json]

One Gaussian avatar is built on the dataset, then timed in its fuse stage (both branches
deforming: the costliest head step) under each data set-up, in turn:
  * ``B=1 in-step``: one view per step, frames decoded inside the step (the peer: the
    engine before prefetch);
  * ``B=1 prefetch``: one view per step, the next step's frames decoded in the background;
  * ``B=k prefetch`` for each other batch size.
The frame cache holds only two frames, so every step decodes: the case of clips longer
than the cache (a 50 s clip at the cpu preset). Prints median milliseconds per step and
per view, and each set-up's speed per view over the peer's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def run(dataset: Path, preset_name: str, steps: int, rounds: int, batch_sizes: list[int],
        device: torch.device) -> dict:
    """Time every set-up (module docstring); {"device", "rows": {set-up: {views, ms_per_step,
    ms_per_view, speedup_per_view}}}."""
    from recon.config import preset
    from recon.datamanager import DataManager
    from recon.engine import Trainer

    cfg = preset(preset_name, motion_steps=10, cache_frames=2)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(Path(dataset), Path(tmp) / "avatar", cfg, resume=False, progress=False, device=device)
        trainer.data.close()
        fuse = dict(cfg.stages.boundaries(cfg.iterations))["fuse"]
        setups = [("B=1 in-step", 1, False)] + [(f"B={b} prefetch", b, True) for b in dict.fromkeys(batch_sizes)]
        times: dict[str, list[float]] = {name: [] for name, _, _ in setups}
        for _ in range(rounds):  # interleaved, so a noisy spell hits every set-up alike
            for name, b, prefetch in setups:
                trainer.data = DataManager(trainer.ds, trainer.train_ids, b, cfg.seed, prefetch=prefetch)
                for k in range(steps + 2):
                    t = time.perf_counter()
                    trainer.optimize(fuse + k)
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    if k >= 2:
                        times[name].append(time.perf_counter() - t)
                trainer.data.close()
    rows = {}
    for name, b, _ in setups:
        ms = 1000 * statistics.median(times[name])
        rows[name] = {"views": b, "ms_per_step": round(ms, 1), "ms_per_view": round(ms / b, 1)}
    peer = rows["B=1 in-step"]["ms_per_view"]
    for r in rows.values():
        r["speedup_per_view"] = round(peer / r["ms_per_view"], 3)
    return {"dataset": str(dataset), "preset": preset_name, "device": str(device), "steps": steps, "rounds": rounds,
            "rows": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="avatar bench train", description=__doc__.split("\n\n")[0])
    p.add_argument("dataset", help="dataset folder written by `avatar capture`")
    p.add_argument("--preset", default="cpu", help="the Gaussian avatar's preset (default cpu)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per set-up and round (after 2 warm-up steps)")
    p.add_argument("--rounds", type=int, default=3, help="rounds over all set-ups (medians pool them)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2], help="views per step to time")
    p.add_argument("--device", default="auto", help="where to train: auto (default), cpu, cuda or cuda:N")
    p.add_argument("--json", action="store_true", help="also print one JSON line of the results")
    args = p.parse_args(argv)

    from recon.device import resolve_device

    result = run(Path(args.dataset), args.preset, args.steps, args.rounds, args.batch_sizes,
                 resolve_device(args.device))
    print(f"{'set-up':<14} {'ms/step':>8} {'ms/view':>8} {'views/s vs peer':>16}")
    for name, r in result["rows"].items():
        print(f"{name:<14} {r['ms_per_step']:>8.1f} {r['ms_per_view']:>8.1f} {r['speedup_per_view']:>15.2f}x")
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
