"""JIT build of the rasterizer's native kernels from the sources in ``cuda/``.

Builds land inside the project tree (``<repo>/.torch_ext``), never in a shared cache;
``AVATAR_BUILD_DIR`` overrides the location. The first build takes about a minute on a
laptop and is announced with a spinner; later loads reuse the cached library.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
from pathlib import Path

_REPO_ROOT = Path(__file__).resolve().parents[2]


def kernel_source_dir() -> Path:
    """Directory holding ``include/``, ``cpu/`` and ``kernels/`` (the repo's ``cuda/``)."""
    repo_dir = _REPO_ROOT / "cuda"
    if (repo_dir / "include" / "splat_math.h").is_file():
        return repo_dir
    installed = Path(__file__).resolve().parent / "kernel_sources"  # wheel layout
    if (installed / "include" / "splat_math.h").is_file():
        return installed
    raise FileNotFoundError(
        f"rasterizer kernel sources not found (looked in {repo_dir} and {installed})"
    )


def build_root() -> Path:
    """Where JIT builds go: $AVATAR_BUILD_DIR, else <repo>/.torch_ext."""
    env = os.environ.get("AVATAR_BUILD_DIR")
    if env:
        root = Path(env)
    elif (_REPO_ROOT / "pyproject.toml").is_file():
        root = _REPO_ROOT / ".torch_ext"
    else:
        root = Path.home() / ".cache" / "avatar-studio" / "torch_extensions"
    root.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(root))
    return root


def _cpu_fingerprint() -> str:
    # -march=native code must not be reused on a different CPU: key the build on it.
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features", "model name")):
                flags += line
    except OSError:
        pass
    return hashlib.sha1((platform.machine() + flags).encode()).hexdigest()[:8]


class KernelBuildError(RuntimeError):
    """The native kernels could not be compiled or loaded."""


@functools.lru_cache(maxsize=None)
def load_cpu_extension():
    """Compile (first use) and import the OpenMP CPU rasterizer."""
    import torch.utils.cpp_extension as cpp_ext
    from rich.console import Console

    src = kernel_source_dir()
    name = f"avatar_raster_cpu_{_cpu_fingerprint()}"
    build_dir = build_root() / name
    build_dir.mkdir(parents=True, exist_ok=True)
    sources = sorted(str(p) for p in (src / "cpu").glob("*.cpp"))
    console = Console(stderr=True)
    try:
        with console.status(
            f"[bold]Loading CPU rasterizer[/] (compiles on first use, ~1 min) -> {build_dir}",
            spinner="dots",
        ):
            return cpp_ext.load(
                name=name,
                sources=sources,
                extra_include_paths=[str(src / "include"), str(src / "cpu")],
                extra_cflags=["-O3", "-std=c++17", "-fopenmp", "-march=native", "-fno-math-errno",
                             "-fno-trapping-math"],
                extra_ldflags=["-fopenmp"],
                build_directory=str(build_dir),
                verbose=os.environ.get("AVATAR_VERBOSE_BUILD") == "1",
            )
    except Exception as exc:  # compiler missing, headers missing, ...
        raise KernelBuildError(
            f"could not build the CPU rasterizer from {src / 'cpu'}: {exc}\n"
            "Set AVATAR_VERBOSE_BUILD=1 to see the compiler output, or use backend='torch'."
        ) from exc

