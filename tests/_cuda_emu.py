"""Build the CUDA kernels of cuda/kernels/ for the CPU through the emulation headers of
tests/cuda_emu/include (tests only; see cuda_emu.h): as a torch extension (the torch op of
cuda/kernels/bindings.cpp, the CPU extension's functions), and as standalone programs under ThreadSanitizer or
AddressSanitizer + UBSan (tests/cuda_emu/sanitize_main.cpp)."""

from __future__ import annotations

import functools
import hashlib
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EMU = ROOT / "tests" / "cuda_emu"
KERNEL_DIR = ROOT / "cuda" / "kernels"
INCLUDES = [EMU / "include", ROOT / "cuda" / "include", KERNEL_DIR]
KERNELS = [str(p) for p in sorted(EMU.glob("*_emu.cpp"))]  # each includes one cuda/kernels/*.cu
BINDINGS = ROOT / "cuda" / "kernels" / "bindings.cpp"  # the torch op, built here for CPU tensors
SANITIZERS = {"thread": ["-fsanitize=thread"], "address": ["-fsanitize=address,undefined", "-fno-sanitize-recover=all"]}


@functools.lru_cache(maxsize=None)
def load_emulated_kernels():
    """The extension (built on first use into the project's build folder, about 30 s)."""
    import torch.utils.cpp_extension as cpp_ext

    from recon.raster._build import build_root

    build_dir = build_root() / "avatar_cuda_emu"
    build_dir.mkdir(parents=True, exist_ok=True)
    return cpp_ext.load(name="avatar_cuda_emu", sources=[str(BINDINGS), *KERNELS],
                        extra_include_paths=[str(p) for p in INCLUDES],
                        extra_cflags=["-std=c++20", "-O1", "-pthread"],
                        extra_ldflags=["-pthread"], build_directory=str(build_dir))


def build_sanitized(sanitizer: str, kernels: Path = KERNEL_DIR) -> Path:
    """sanitize_main built with `sanitizer` ("thread" or "address") from the kernel sources
    in `kernels` (a planted bug's copy, say), cached by the digest of every source it is
    made of (a change to any kernel or header builds it again)."""
    includes = [EMU / "include", ROOT / "cuda" / "include", kernels]
    sources = [EMU / "sanitize_main.cpp", *map(Path, KERNELS)]
    digest = hashlib.sha1(sanitizer.encode())
    for path in sorted({*sources, *(p for folder in includes for p in folder.rglob("*") if p.is_file())}):
        digest.update(path.read_bytes())
    from recon.raster._build import build_root

    exe = build_root() / "cuda_emu_sanitize" / f"sanitize_{sanitizer}_{digest.hexdigest()[:12]}"
    if not exe.is_file():
        exe.parent.mkdir(parents=True, exist_ok=True)
        tmp = exe.with_suffix(".tmp")
        subprocess.run(["g++", "-std=c++20", "-O1", "-g", "-pthread", *SANITIZERS[sanitizer],
                        *(f"-I{p}" for p in includes), *map(str, sources), "-o", str(tmp)], check=True)
        tmp.replace(exe)
    return exe
