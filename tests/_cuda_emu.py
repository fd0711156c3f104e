"""Build the CUDA kernels of cuda/kernels/ for the CPU through the emulation headers of
tests/cuda_emu/include (tests only; see cuda_emu.h), as a torch extension with the CPU
extension's compositing signatures."""

from __future__ import annotations

import functools
import hashlib
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
    # torch rebuilds when the listed sources or the flags change; the kernels and headers
    # reach the build through #include, so their digest rides along as a flag.
    digest = hashlib.sha1()
    for path in sorted(p for folder in INCLUDES for p in folder.rglob("*") if p.is_file()):
        digest.update(path.read_bytes())
    return cpp_ext.load(name="avatar_cuda_emu", sources=[str(p) for p in sorted(EMU.glob("*.cpp"))],
                        extra_include_paths=[str(p) for p in INCLUDES],
                        extra_cflags=["-std=c++20", "-O1", "-pthread", f"-DSPLAT_SOURCES={digest.hexdigest()[:12]}"],
                        extra_ldflags=["-pthread"], build_directory=str(build_dir))
