"""Build the CUDA kernels of cuda/kernels/ for the CPU through the emulation headers of
tests/cuda_emu/include (tests only; see cuda_emu.h): as a torch extension (the torch op of
cuda/kernels/bindings.cpp, the CPU extension's functions), and as standalone programs under ThreadSanitizer or
AddressSanitizer + UBSan (tests/cuda_emu/sanitize_main.cpp)."""

from __future__ import annotations

import functools
import hashlib
import os
import re
import subprocess
from concurrent.futures import ThreadPoolExecutor
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
    in `kernels` (a planted bug's copy, say). Each translation unit is compiled once per
    content (its own text, the .cu file it includes, every header), two at a time, and
    linked once per set of objects, so a copy with one file changed compiles only that
    file."""
    from recon.raster._build import build_root

    includes = [EMU / "include", ROOT / "cuda" / "include", kernels]
    flags = ["-std=c++20", "-O1", "-g", "-pthread", *SANITIZERS[sanitizer]]
    headers = hashlib.sha1(" ".join(flags).encode())
    headers.update(subprocess.run(["g++", "--version"], capture_output=True, check=True).stdout)
    for folder in includes:
        for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix != ".cu"):
            headers.update(path.relative_to(folder).as_posix().encode() + path.read_bytes())
    out = build_root() / "cuda_emu_sanitize"
    out.mkdir(parents=True, exist_ok=True)

    def object_for(source: Path) -> Path:
        digest = headers.copy()
        text = source.read_bytes()
        digest.update(text)
        for name in re.findall(rb'#include "([^"]+\.cu)"', text):
            digest.update((kernels / name.decode()).read_bytes())
        return out / f"{source.stem}_{sanitizer}_{digest.hexdigest()[:12]}.o"

    def compile_unit(source: Path, obj: Path) -> None:
        tmp = obj.with_suffix(f".{os.getpid()}.tmp")
        subprocess.run(["g++", *flags, *(f"-I{p}" for p in includes), "-c", str(source), "-o", str(tmp)], check=True)
        tmp.replace(obj)

    objects = {source: object_for(source) for source in [EMU / "sanitize_main.cpp", *map(Path, KERNELS)]}
    with ThreadPoolExecutor(2) as pool:  # this machine's two cores
        list(pool.map(lambda item: compile_unit(*item), [(s, o) for s, o in objects.items() if not o.is_file()]))
    linked = hashlib.sha1("".join(o.name for o in objects.values()).encode()).hexdigest()[:12]
    exe = out / f"sanitize_{sanitizer}_{linked}"
    if not exe.is_file():
        tmp = exe.with_suffix(f".{os.getpid()}.tmp")
        subprocess.run(["g++", *flags, *map(str, objects.values()), "-o", str(tmp)], check=True)
        tmp.replace(exe)
    return exe
