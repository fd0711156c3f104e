"""The GPU check: what a session lent a GPU runs first, as one command of a few minutes.

    python -m bench.gpu_check DATASET --out DIR [--device cuda] [--steps 600] [--torso-steps 150]

Steps, in order; each is timed, and a step that fails is recorded with its error and the
next one runs. Everything lands in DIR/gpu_check.json (the figures a closing note quotes),
with each step's log beside it:

  1. environment: torch, the device, and both CUDA rasterizers built, ours (cuda/kernels,
     with nvcc) and gsplat's (their build times);
  2. parity: the GPU tests through pytest (tests/test_raster_backends.py: our `cuda`
     backend against the CPU kernels and gsplat, and gsplat against the torch reference,
     values and gradients; the torch backend on the GPU; tests/test_hash_encoding.py: the
     CUDA hash encoding against the CPU op; tests/test_radiance_field.py: nerfacc's ray
     marching against ours);
  3. rasterizer benchmark (`avatar bench raster`: forward, backward and peak memory of our
     kernels and of gsplat's, in one process: garden 648x420, the tiled garden at
     1920x1080, 8 heads at 512^2 in one batch; ours/gsplat as speed-ups);
  3b. hash-encoding benchmark (`avatar bench hash`: our CUDA op against the torch reference
     on the GPU, Instant-NGP's grid, 2^18 points);
  4. training-step benchmark (`avatar bench train`: 1 and 4 views a step, `gpu` preset);
  5. a short `gpu`-preset training of DATASET (512 px, 4 views a step, the device's raster
     backend: ours on a GPU) for `--steps` head steps and `--torso-steps` torso steps:
     it/s, Gaussians, the training PSNR and the peak GPU memory;
  6. `avatar eval` of that avatar: the held-out figures;
  6b. a short `gpu`-preset radiance-field training (`--method nerf`, `--nerf-steps`): the
     ray marching it used (nerfacc's on CUDA when its kernels build, else ours in torch),
     it/s, the training PSNR, peak memory, and the head's render rate at the preset's 512^2;
  6c. distributed: on a machine of several GPUs, `avatar bench distributed` (`gpu` preset,
     `avatar train --nproc N` for N = 1, 2, ... GPUs, one batch of as many views): it/s and
     the speed-up over one GPU; recorded as skipped, with the reason, on one GPU or a CPU;
  7. sanitizer: our kernels, forward and backward on a small head seen by two cameras,
     under compute-sanitizer's memcheck (torch's caching allocator off), racecheck and
     synccheck, at most 150 s each.

On a CPU (`--device cpu` and a small `--size`) the same script checks its own plumbing
(tests/test_recon_engine.py runs it so). On the device machine (the `device` tool: one
call, its working tree this checkout) carry the dataset and the wheels its image lacks,
and run, for example:

    python -m bench.gpu_check data/hdtf --out $OUT/check --device cuda

Of our dependencies, training needs only torch, numpy, OpenCV, safetensors, tqdm, plyfile
and gsplat, and held-out evaluation adds mediapipe (tests/test_dependencies.py runs both
with the rest unimportable). The `nvidia-h200` image (device/KINDS.md) lacks gsplat,
plyfile and mediapipe: carry their Python 3.12 wheels (6.5 MB, 36 kB, 35.6 MB; `pip
download --no-deps --only-binary=:all: --python-version 3.12 --platform
manylinux_2_28_x86_64 ...`) and a copy of the dataset (HDTF at 512 px: 22 MB), under
64 MiB together. mediapipe 0.10.21 is built for numpy < 2 and that image has numpy 2: if
it fails to import there, the eval step is recorded as failed and the training figures
stand.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

from avatar.io import write_json

ROOT = Path(__file__).resolve().parents[1]


def _environment(device: torch.device) -> dict:
    out = {"torch": torch.__version__, "device": str(device), "cuda": torch.version.cuda}
    if device.type == "cuda":
        from recon.raster._build import load_cuda_extension
        from recon.raster.gsplat_backend import load_gsplat

        out["gpu"] = torch.cuda.get_device_name(device)
        for name, load in (("cuda_kernels_s", load_cuda_extension), ("gsplat_kernels_s", load_gsplat)):
            t = time.perf_counter()
            load()
            out[name] = round(time.perf_counter() - t, 1)
    return out


def _parity(out: Path) -> dict:
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", str(ROOT / "tests" / "test_raster_backends.py"),
                        str(ROOT / "tests" / "test_hash_encoding.py"), str(ROOT / "tests" / "test_radiance_field.py"),
                        "-k", "gpu or gsplat"],
                       capture_output=True, text=True, cwd=ROOT)
    (out / "parity_pytest.log").write_text(r.stdout + r.stderr)
    summary = (r.stdout.strip().splitlines() or [""])[-1]
    if r.returncode not in (0, 5):
        raise RuntimeError(f"pytest failed: {summary}")
    return {"pytest": summary}


SANITIZED_RENDER = """
import sys
import torch
from bench.scenes import head_scene
from recon.raster import rasterize
device, backend = sys.argv[1:3]  # cuda cuda under compute-sanitizer
s = head_scene(n=3000, size=48, cameras=2, sh_degree=1).to(device)
leaves = [t.clone().requires_grad_(True) for t in (s.means, s.quats, s.scales, s.opacities, s.colors, s.viewmats)]
out = rasterize(*leaves, s.Ks, s.width, s.height, sh_degree=s.sh_degree, backgrounds=torch.rand(3, device=device),
                antialiased=True, backend=backend)
(out.image.sum() + out.alpha.sum() + out.depth.sum()).backward()
if device != "cpu":
    torch.cuda.synchronize()
print("rendered", out.image.shape[0], "views; gradients", all(t.grad is not None for t in leaves))
"""
"""A forward and backward pass of the rasterizer on a small head seen by two cameras:
`python -c SANITIZED_RENDER DEVICE BACKEND`."""


def _compute_sanitizer() -> str:
    """compute-sanitizer from PATH, else from the CUDA toolkit torch builds with."""
    import shutil

    from torch.utils.cpp_extension import CUDA_HOME

    found = shutil.which("compute-sanitizer")
    if found is None and CUDA_HOME and (Path(CUDA_HOME) / "bin" / "compute-sanitizer").is_file():
        found = str(Path(CUDA_HOME) / "bin" / "compute-sanitizer")
    if found is None:
        raise RuntimeError("compute-sanitizer not found (PATH, CUDA_HOME/bin): install the CUDA toolkit")
    return found


def _sanitizer(out: Path, device: torch.device) -> dict:
    if device.type != "cuda":
        return {"skipped": "compute-sanitizer checks CUDA kernels: no GPU here"}
    found = {}
    # Without torch's caching allocator every tensor is its own allocation, so memcheck sees
    # an access past a tensor's end instead of landing in a cached block's slack.
    env = {**os.environ, "PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}
    for tool in ("memcheck", "racecheck", "synccheck"):
        r = subprocess.run([_compute_sanitizer(), "--tool", tool, "--error-exitcode", "9", sys.executable, "-c",
                            SANITIZED_RENDER, str(device), "cuda"], capture_output=True, text=True, cwd=ROOT,
                           env=env, timeout=150)
        (out / f"sanitizer_{tool}.log").write_text(r.stdout + r.stderr)
        summary = [line for line in (r.stdout + r.stderr).splitlines() if "ERROR SUMMARY" in line or "RACECHECK SUMMARY"
                   in line]
        if r.returncode != 0 or "rendered 2 views; gradients True" not in r.stdout:
            raise RuntimeError(f"{tool}: exit {r.returncode}: {' '.join(summary) or r.stderr[-500:]}")
        found[tool] = " ".join(summary)
    return found


def _raster_bench(device: torch.device) -> dict:
    from bench.rasterizer import run

    if device.type == "cuda":  # ours against gsplat's kernels (the torch reference is left out: minutes here)
        return run(["garden", "garden4x", "head8"], repeats=5, budget_s=20.0, backends=["cuda"])
    return run(["head"], repeats=5, budget_s=20.0, backends=None)


def _hash_bench(device: torch.device) -> dict:
    from bench.hash_encoding import run
    from recon.fields import HashGridConfig

    # Instant-NGP's grid; on a GPU at a training batch's size (2^18 samples), on a CPU small.
    return run(HashGridConfig(), 2**18 if device.type == "cuda" else 2**12, device, repeats=5, budget=20.0)


def _train_bench(dataset: Path, device: torch.device, steps: int) -> dict:
    from bench.training import run

    return run(dataset, "gpu" if device.type == "cuda" else "demo", steps, 2, [1, 4], device)


def _training(dataset: Path, avatar: Path, device: torch.device, steps: int, torso_steps: int,
              size: int | None) -> dict:
    from recon.config import preset
    from recon.engine import train
    from recon.raster.api import check_backend

    cfg = preset("gpu", iterations=steps, torso_steps=torso_steps, motion_steps=min(steps, 600),
                 checkpoint_every=max(steps // 2, 1), log_every=max(steps // 20, 1), size=size,
                 live_lookahead_ms=0)  # the training alone is timed
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t = time.perf_counter()
    train(dataset, avatar, cfg, resume=(avatar / "checkpoint.safetensors").is_file(), progress=False, device=device)
    train_s = time.perf_counter() - t
    log = [json.loads(line) for line in (avatar / "metrics.jsonl").read_text().splitlines()]
    head = [r for r in log if r["stage"] != "torso"]
    return {"steps": steps, "torso_steps": torso_steps, "size": cfg.size, "batch_size": cfg.batch_size,
            "backend": check_backend(cfg.backend, device), "train_s": round(train_s, 1),
            "head_it_per_s": head[-1]["it_per_s"] if head else None, "it_per_s": log[-1]["it_per_s"],
            "gaussians": log[-1].get("n_face", 0) + log[-1].get("n_mouth", 0),
            "train_psnr_head": head[-1].get("psnr_head") if head else None,
            "peak_gpu_mib": round(torch.cuda.max_memory_allocated(device) / 2**20) if device.type == "cuda" else None}


def _eval(avatar: Path, device: torch.device) -> dict:
    from recon.evaluate import evaluate

    scores = evaluate(avatar, progress=False, device=device)
    lip = scores["lipsync"]["avatar"]
    return {"psnr": scores["psnr"], "psnr_face": scores["psnr_face"], "lmd": scores["lmd"],
            "lmd_static_mouth": scores["lmd_static_mouth"], "opening_corr": lip.get("opening_corr"),
            "opening_range_ratio": lip.get("opening_range_ratio"),
            "train_fit_psnr_face": scores["train_fit"]["psnr_face"]}


def _nerf(dataset: Path, avatar: Path, device: torch.device, steps: int, size: int | None) -> dict:
    from recon.avatar_dir import load_avatar
    from recon.engine import train
    from recon.methods.nerf import RadianceFieldAvatar
    from recon.render import open_dataset

    cfg = RadianceFieldAvatar.config("gpu", iterations=steps, motion_steps=min(steps, 600), size=size,
                                     checkpoint_every=max(steps // 2, 1), log_every=max(steps // 20, 1),
                                     live_lookahead_ms=0)  # the training alone is timed
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t = time.perf_counter()
    train(dataset, avatar, cfg, resume=(avatar / "checkpoint.safetensors").is_file(), progress=False, device=device,
          method="nerf")
    train_s = time.perf_counter() - t
    log = [json.loads(line) for line in (avatar / "metrics.jsonl").read_text().splitlines()]
    av = load_avatar(avatar, device)
    ds = open_dataset(av, av.size, required=True)
    pose = av.deform(None, torch.ones(1, 1, device=device))[0]
    times = []
    with torch.no_grad():
        for k in range(4):  # the first builds and warms up
            t = time.perf_counter()
            av.render_head(pose, ds.viewmat(k), ds.intrinsics(k), av.size)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t)
    return {"steps": steps, "size": cfg.size, "batch_size": cfg.batch_size, "rays_per_view": cfg.rays_per_view,
            "marching": "nerfacc" if av.model.marcher() is not None else "torch", "train_s": round(train_s, 1),
            "it_per_s": log[-1]["it_per_s"], "train_psnr": log[-1].get("psnr"),
            "samples_per_ray": log[-1].get("samples_per_ray"), "render_fps": round(1 / min(times[1:]), 2),
            "peak_gpu_mib": round(torch.cuda.max_memory_allocated(device) / 2**20) if device.type == "cuda" else None}


def _distributed(dataset: Path, device: torch.device) -> dict:
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    if gpus < 2:
        return {"skipped": f"needs 2 CUDA GPUs or more (one per process); this machine has {gpus}"}
    from bench.distributed import run

    return run(dataset, list(range(1, gpus + 1)), None, "gpu", 60, 1, "cuda")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("dataset", help="dataset folder written by `avatar capture`")
    p.add_argument("--out", required=True, help="folder for gpu_check.json and the logs")
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu to check the script itself")
    p.add_argument("--steps", type=int, default=600, help="head steps of the short training")
    p.add_argument("--torso-steps", type=int, default=150, help="torso steps of the short training")
    p.add_argument("--size", type=int, help="training size (default: the gpu preset's 512)")
    p.add_argument("--nerf-steps", type=int, default=300, help="steps of the short radiance-field training")
    p.add_argument("--bench-steps", type=int, default=10, help="timed steps per set-up of the training benchmark")
    p.add_argument("--skip", nargs="*", default=[],
                   choices=["parity", "raster", "hash", "train_bench", "training", "eval", "nerf", "distributed",
                            "sanitizer"],
                   help="steps to leave out")
    args = p.parse_args(argv)

    from recon.device import resolve_device

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(args.device)
    dataset = Path(args.dataset)
    steps = {"environment": lambda: _environment(device), "parity": lambda: _parity(out),
             "raster": lambda: _raster_bench(device), "hash": lambda: _hash_bench(device),
             "train_bench": lambda: _train_bench(dataset, device, args.bench_steps),
             "training": lambda: _training(dataset, out / "avatar", device, args.steps, args.torso_steps, args.size),
             "eval": lambda: _eval(out / "avatar", device),
             "nerf": lambda: _nerf(dataset, out / "nerf", device, args.nerf_steps, args.size),
             "distributed": lambda: _distributed(dataset, device),
             "sanitizer": lambda: _sanitizer(out, device)}  # last: the slowest, and the figures come first
    report: dict = {}
    for name, step in steps.items():
        if name in args.skip:
            continue
        t = time.perf_counter()
        log = io.StringIO()
        try:
            with contextlib.redirect_stdout(log):
                result = {"ok": True, **step()}
        except Exception as exc:  # a failed step is a finding; the next steps still run
            result = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
            log.write(traceback.format_exc())
        result["seconds"] = round(time.perf_counter() - t, 1)
        if log.getvalue():
            (out / f"{name}.log").write_text(log.getvalue())
        report[name] = result
        print(f"gpu_check: {name}: {'ok' if result['ok'] else result['error']} ({result['seconds']} s)", flush=True)
        write_json(out / "gpu_check.json", report)  # after every step: a killed run keeps what it measured
    return 0 if all(r["ok"] for r in report.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
