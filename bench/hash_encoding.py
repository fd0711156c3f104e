"""Hash-encoding benchmark: our compiled op against the pure-torch reference, in one process.

    avatar bench hash [--levels 16] [--log2-table-size 19] [--points 65536] [--device cpu]

Both run the same encoding (recon/fields/hash_encoding.py) on the same points and table:
forward, and forward + backward (the table's gradient, as training needs). Prints the
medians and our speed-up over the reference, and the largest difference of our
encoding from it; with ``--json`` the last line is one JSON object of the same.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from recon.fields import HashGridConfig, hash_encode, level_grid


def _median_seconds(fn, device: torch.device, repeats: int, budget: float) -> float:
    fn()  # warm-up: builds, caches, allocator
    times, spent = [], time.perf_counter()
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
        if time.perf_counter() - spent > budget:
            break
    return statistics.median(times)


def run(cfg: HashGridConfig, points: int, device: torch.device, repeats: int = 5, budget: float = 60.0,
        seed: int = 0) -> dict:
    """{backend: {forward_s, forward_backward_s}}, speed-ups and the largest difference."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(points, cfg.dims, generator=g).to(device)
    table = (torch.rand(cfg.levels, cfg.table_size, cfg.features, generator=g) * 2e-4 - 1e-4).to(device)
    table.requires_grad_(True)
    v_out = torch.randn(points, cfg.out_features, generator=g).to(device)
    scales, res = level_grid(cfg)
    scales = scales.float().to(device)
    res = res.to(device)
    out: dict = {"config": {**cfg.__dict__, "points": points, "device": str(device)}}
    for backend in ("torch", "kernels"):
        def forward():
            with torch.no_grad():
                return hash_encode(x, table, scales, res, backend)

        def forward_backward():
            table.grad = None
            hash_encode(x, table, scales, res, backend).backward(v_out)

        out[backend] = {"forward_s": _median_seconds(forward, device, repeats, budget),
                        "forward_backward_s": _median_seconds(forward_backward, device, repeats, budget)}
    with torch.no_grad():
        out["max_abs_diff"] = float((hash_encode(x, table, scales, res, "kernels")
                                     - hash_encode(x, table, scales, res, "torch")).abs().max())
    out["speedup"] = {k: out["torch"][k] / out["kernels"][k] for k in ("forward_s", "forward_backward_s")}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="avatar bench hash", description=__doc__.split("\n\n")[0])
    p.add_argument("--levels", type=int, default=16)
    p.add_argument("--features", type=int, default=2, help="features per level")
    p.add_argument("--log2-table-size", type=int, default=19, help="entries per level: 2^this")
    p.add_argument("--dims", type=int, default=3, choices=[2, 3])
    p.add_argument("--points", type=int, default=65536)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (median reported)")
    p.add_argument("--budget", type=float, default=60.0, help="max seconds per measurement; stops repeating after")
    p.add_argument("--json", action="store_true", help="also print one JSON object on the last line")
    args = p.parse_args(argv)
    cfg = HashGridConfig(dims=args.dims, levels=args.levels, features=args.features,
                         log2_table_size=args.log2_table_size)
    result = run(cfg, args.points, torch.device(args.device), args.repeats, args.budget)
    print(f"hash encoding: {cfg.levels} levels x 2^{cfg.log2_table_size} entries x {cfg.features} features, "
          f"{args.points} points of {cfg.dims} coordinates, {args.device}, {torch.get_num_threads()} threads")
    print(f"  {'backend':<10} {'forward ms':>11} {'fwd+bwd ms':>11}")
    for backend in ("torch", "kernels"):
        r = result[backend]
        print(f"  {backend:<10} {1e3 * r['forward_s']:11.1f} {1e3 * r['forward_backward_s']:11.1f}")
    s = result["speedup"]
    print(f"  kernels over the torch reference: forward {s['forward_s']:.1f}x, forward+backward "
          f"{s['forward_backward_s']:.1f}x (largest difference {result['max_abs_diff']:.1e})")
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
