"""Rasterizer benchmark: our backends side by side with gsplat, in one process.

    avatar bench raster [--scenes garden head] [--repeats 5] [--json]

Peers:
  * on CPU, ``gsplat-torch``: gsplat's own pure-torch projection and SH
    (``gsplat.cuda._torch_impl``) feeding a tiled torch compositor. gsplat's torch
    compositing needs its CUDA kernels, so ours stands in; it is the reference.
  * on a GPU, ``gsplat-cuda``: ``gsplat.rasterization`` with its CUDA kernels; our
    ``cuda`` backend's speed-up over it is ours/gsplat.

Prints a table of medians and speed-ups over the reference; with ``--json`` the last
line is one JSON object with the medians, the speed-ups and the max abs image
difference of every backend against the reference.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Callable

import torch
from torch import Tensor

from bench.scenes import Scene, garden_scene, head_scene
from recon.raster import rasterize, reference


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gsplat_torch_render(s: Scene, means, quats, scales, opacities, colors) -> Tensor:
    """gsplat's pure-torch projection + SH, composited by our tiled torch compositor."""
    from gsplat.cuda import _torch_impl as gs

    covars, _ = gs._quat_scale_to_covar_preci(quats, scales, compute_preci=False)
    radii, means2d, depths, conics, _ = gs._fully_fused_projection(
        means, covars, s.viewmats, s.Ks, s.width, s.height
    )
    C, N = depths.shape
    if s.sh_degree is not None:
        campos = torch.linalg.inv(s.viewmats)[:, :3, 3]
        dirs = means[None] - campos[:, None]
        feats = torch.clamp_min(
            gs._spherical_harmonics(s.sh_degree, dirs, colors.expand(C, *colors.shape)) + 0.5, 0.0
        )
    else:
        feats = colors.expand(C, N, colors.shape[-1])
    radii = radii * (opacities > 1 / 255)[None, :, None]  # gsplat culls these too
    tiles_x, tiles_y = reference.tile_grid(s.width, s.height, 16)
    offsets, flat_ids = reference.isect_tiles(means2d, radii, depths, 16, tiles_x, tiles_y)
    render, _ = reference.composite(
        means2d, conics, feats.contiguous(), opacities[None].expand(C, N), None, s.width, s.height, 16, offsets, flat_ids
    )
    return render


def gsplat_cuda_render(s: Scene, means, quats, scales, opacities, colors) -> Tensor:
    from gsplat import rasterization

    render, _, _ = rasterization(
        means, quats, scales, opacities, colors, s.viewmats, s.Ks, s.width, s.height, sh_degree=s.sh_degree
    )
    return render


def ours(backend: str) -> Callable[..., Tensor]:
    def render(s: Scene, means, quats, scales, opacities, colors) -> Tensor:
        return rasterize(
            means, quats, scales, opacities, colors, s.viewmats, s.Ks, s.width, s.height,
            sh_degree=s.sh_degree, backend=backend,
        ).image

    return render


def measure(fn, s: Scene, repeats: int, budget_s: float, backward: bool) -> tuple[float, Tensor, float | None]:
    """Median milliseconds over `repeats` runs (fewer if `budget_s` runs out), the image,
    and the peak CUDA memory in MiB (None on CPU)."""
    device = s.means.device
    params = [t.detach().clone().requires_grad_(backward) for t in (s.means, s.quats, s.scales, s.opacities, s.colors)]
    weight = None
    times = []
    image = None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for i in range(repeats + 1):  # first run is warm-up (JIT load, allocator)
        _sync(device)
        t0 = time.perf_counter()
        with torch.set_grad_enabled(backward):
            image = fn(s, *params)
            if backward:
                if weight is None:
                    weight = torch.rand(image.shape, generator=torch.Generator().manual_seed(0)).to(image)
                (image * weight).sum().backward()
        _sync(device)
        if i > 0:
            times.append((time.perf_counter() - t0) * 1e3)
        if i > 0 and time.perf_counter() - start > budget_s:
            break
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return statistics.median(times), image.detach(), peak


def run(scenes: list[str], repeats: int, budget_s: float, backends: list[str] | None) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    peers: dict[str, Callable] = {}
    if device.type == "cuda":
        peers["gsplat-cuda"] = gsplat_cuda_render
        peers["gsplat"] = ours("gsplat")  # the same kernels through our backend's glue
        peers["cuda"] = ours("cuda")  # our CUDA kernels (cuda/kernels)
        peers["torch"] = ours("torch")
    else:
        peers["gsplat-torch"] = gsplat_torch_render
        peers["torch"] = ours("torch")
        peers["cpu"] = ours("cpu")
    if backends:
        peers = {k: v for k, v in peers.items() if k in backends or k.startswith("gsplat")}
    reference_name = next(iter(peers))

    makers = {
        "garden": lambda: garden_scene(),
        "garden4x": lambda: garden_scene(grid=3),
        "head": lambda: head_scene(n=20_000, size=256, cameras=1),
        "head8": lambda: head_scene(n=20_000, size=512, cameras=8),
    }
    results: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                     "threads": torch.get_num_threads(), "reference": reference_name, "scenes": {}}
    for name in scenes:
        s = makers[name]().to(device)
        if name == "garden4x":  # 4x larger scene at 1920x1080, as in the GPU benchmark
            s.width, s.height = 1920, 1080
            s.Ks = s.Ks.clone()
            s.Ks[:, 0] *= 1920 / 648
            s.Ks[:, 1] *= 1080 / 420
        rows = {}
        ref_img = None
        for peer, fn in peers.items():
            fwd, img, _ = measure(fn, s, repeats, budget_s, backward=False)
            both, _, peak = measure(fn, s, repeats, budget_s, backward=True)
            if ref_img is None:
                ref_img = img
            rows[peer] = {"fwd_ms": fwd, "fwd_bwd_ms": both, "peak_mib": peak,
                          "max_abs_diff": float((img - ref_img).abs().max())}
        for r in rows.values():
            r["speedup_fwd"] = rows[reference_name]["fwd_ms"] / r["fwd_ms"]
            r["speedup_fwd_bwd"] = rows[reference_name]["fwd_bwd_ms"] / r["fwd_bwd_ms"]
            if "torch" in rows:  # also against our own pure-torch reference
                r["speedup_fwd_bwd_vs_torch"] = rows["torch"]["fwd_bwd_ms"] / r["fwd_bwd_ms"]
        results["scenes"][name] = {"N": s.means.shape[0], "C": s.viewmats.shape[0],
                                   "size": [s.width, s.height], "backends": rows}
    return results


def print_table(results: dict) -> None:
    print(f"device: {results['device']}  threads: {results['threads']}  reference: {results['reference']}"
          "  (x: speed-up over the reference; x f+b/torch: over our pure-torch backend)")
    head = (f"{'scene':<9}{'backend':<14}{'fwd ms':>10}{'fwd+bwd ms':>12}{'x fwd':>8}{'x f+b':>8}{'x f+b/torch':>12}"
            f"{'max|diff|':>11}{'peak MiB':>10}")
    print(head)
    print("-" * len(head))
    for name, sc in results["scenes"].items():
        for peer, r in sc["backends"].items():
            peak = f"{r['peak_mib']:.0f}" if r["peak_mib"] is not None else "-"
            vs_torch = f"{r['speedup_fwd_bwd_vs_torch']:.1f}" if "speedup_fwd_bwd_vs_torch" in r else "-"
            print(f"{name:<9}{peer:<14}{r['fwd_ms']:>10.1f}{r['fwd_bwd_ms']:>12.1f}"
                  f"{r['speedup_fwd']:>8.1f}{r['speedup_fwd_bwd']:>8.1f}{vs_torch:>12}{r['max_abs_diff']:>11.2e}{peak:>10}")
        print(f"{'':<9}(N={sc['N']}, C={sc['C']}, {sc['size'][0]}x{sc['size'][1]})")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="avatar bench raster", description=__doc__.split("\n\n")[0])
    p.add_argument("--scenes", nargs="+", default=["garden", "head"],
                   choices=["garden", "garden4x", "head", "head8"], help="scenes to run")
    p.add_argument("--backends", nargs="+", default=None, help="our backends to include (default: all available)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (median reported)")
    p.add_argument("--budget", type=float, default=30.0, help="max seconds per measurement; stops repeating after")
    p.add_argument("--json", action="store_true", help="also print one JSON object on the last line")
    args = p.parse_args(argv)
    results = run(args.scenes, args.repeats, args.budget, args.backends)
    print_table(results)
    if args.json:
        print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
