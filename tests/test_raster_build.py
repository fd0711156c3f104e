"""A kernel build that fails is reported once with the compiler's words and the fix,
recorded so later runs do not compile again, and the fallback is announced once."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROBE = textwrap.dedent("""
    import sys, warnings
    import torch
    from recon.raster._build import KernelBuildError, load_cpu_extension
    from recon.raster.api import check_backend
    try:
        load_cpu_extension()
    except KernelBuildError as exc:
        print("ERROR:", exc)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        picked = [check_backend("auto") for _ in range(3)]
    print("PICKED:", picked, "WARNINGS:", len(caught))
    print("WARNING:", caught[0].message if caught else "")
""")


def run_probe(build_dir: Path, compiler: str) -> str:
    env = {**os.environ, "AVATAR_BUILD_DIR": str(build_dir), "CXX": compiler, "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stdout


def test_failed_kernel_build_is_named_recorded_and_falls_back_once(tmp_path):
    first = run_probe(tmp_path, "/nonexistent/g++")
    assert "could not build the CPU rasterizer" in first and "/nonexistent/g++: not found" in first
    assert "fix: no C++ compiler (/nonexistent/g++) was found: install one" in first
    assert "PICKED: ['torch', 'torch', 'torch'] WARNINGS: 1" in first  # announced once, not retried
    assert "about 50x slower" in first
    records = list(tmp_path.glob("*/build_failed.json"))
    assert len(records) == 1
    second = run_probe(tmp_path, "/nonexistent/g++")  # the next run reads the record instead of compiling
    assert "the build failed before; recorded in" in second and str(records[0]) in second
    other = run_probe(tmp_path, "/elsewhere/c++")  # another compiler: built (tried) again
    assert "/elsewhere/c++: not found" in other and "failed before" not in other


def test_cuda_backend_where_it_cannot_run_is_a_named_error(sample_dataset, tmp_path, capsys):
    from avatar.cli import main

    assert main(["train", str(sample_dataset), "--out", str(tmp_path / "av"), "--backend", "cuda"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: backend 'cuda' runs our CUDA kernels, and this run is on cpu") and "remedy" in err
    assert not (tmp_path / "av").exists()
