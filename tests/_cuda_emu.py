"""Build the CUDA kernels of cuda/kernels/ for the CPU through the emulation headers of
tests/cuda_emu/include (tests only; see cuda_emu.h), as a torch extension with the CPU
extension's compositing signatures."""

from __future__ import annotations

import functools
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EMU = ROOT / "tests" / "cuda_emu"
INCLUDES = [EMU / "include", ROOT / "cuda" / "include", ROOT / "cuda" / "kernels"]


@functools.lru_cache(maxsize=None)
def load_emulated_kernels():
    """The extension (built on first use into the project's build folder, about 30 s)."""
    import torch.utils.cpp_extension as cpp_ext

    from recon.raster._build import build_root

    build_dir = build_root() / "avatar_cuda_emu"
    build_dir.mkdir(parents=True, exist_ok=True)
    return cpp_ext.load(name="avatar_cuda_emu", sources=[str(p) for p in sorted(EMU.glob("*.cpp"))],
                        extra_include_paths=[str(p) for p in INCLUDES],
                        extra_cflags=["-std=c++20", "-O1", "-pthread"],
                        extra_ldflags=["-pthread"], build_directory=str(build_dir))
