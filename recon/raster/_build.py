"""JIT build of the rasterizer's native kernels from the sources in ``cuda/``.

Builds land inside the project tree (``<repo>/.torch_ext``), never in a shared cache;
``AVATAR_BUILD_DIR`` overrides the location. The first build takes about a minute on a
laptop and is announced with a spinner; later loads reuse the cached library.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import shutil
from pathlib import Path

from avatar.errors import AvatarError

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


class KernelBuildError(AvatarError):
    """The native kernels could not be compiled or loaded (a problem of this machine's
    toolchain: the CLI reports it as a named error)."""

    def __init__(self, message: str):
        super().__init__(None, message)


_failure: KernelBuildError | None = None  # this process's failed build, raised again at once
FAILED_BUILD = "build_failed.json"
"""Written in the build folder when a build fails: the next runs report it at once instead
of compiling again, until the sources, the compiler or torch change."""


def _compiler() -> str:
    return os.environ.get("CXX", "c++")


def _build_key(sources: list[str]) -> str:
    """What a build's success depends on: the sources, the compiler found and torch."""
    import torch

    h = hashlib.sha1(torch.__version__.encode())
    for path in sources:
        h.update(Path(path).read_bytes())
    found = shutil.which(_compiler())
    stamp = Path(found).stat().st_mtime_ns if found else ""
    h.update(f"{_compiler()}|{found}|{stamp}|{shutil.which('ninja')}".encode())
    return h.hexdigest()[:16]


def _remedy(message: str) -> str:
    if shutil.which(_compiler()) is None:
        return (f"no C++ compiler ({_compiler()}) was found: install one (Debian/Ubuntu: sudo apt install g++; "
                "macOS: xcode-select --install)")
    if "omp.h" in message or "fopenmp" in message:
        return "the compiler lacks OpenMP: install libgomp (Debian/Ubuntu: sudo apt install libgomp1 g++)"
    if "Ninja is required" in message:
        return "install ninja (pip install ninja)"
    return "set AVATAR_VERBOSE_BUILD=1 to see the whole compiler output"


def _compiler_errors(text: str, n: int = 6) -> str:
    """The lines of a failed build that say what went wrong (not the command lines)."""
    lines = list(dict.fromkeys(line.strip() for line in text.splitlines() if line.strip() and len(line) < 400))
    said = [line for line in lines if any(k in line.lower() for k in ("error", "not found", "fatal", "no such file",
                                                                       "undefined reference"))]
    return "\n".join("    " + line for line in (said or lines)[-n:])


@functools.lru_cache(maxsize=None)
def load_cpu_extension(retry: bool = False):
    """Compile (first use) and import the OpenMP CPU rasterizer. A failed build raises
    KernelBuildError with the compiler's error lines and the fix; it is recorded, so later
    calls and later runs raise it at once until the sources, compiler or torch change.
    retry: build again despite a recorded failure (backend 'cpu' asked for by name: the
    user may have installed what was missing, headers or OpenMP, which the record's key
    cannot see)."""
    import torch.utils.cpp_extension as cpp_ext
    from rich.console import Console

    global _failure
    if _failure is not None:
        raise _failure
    src = kernel_source_dir()
    name = f"avatar_raster_cpu_{_cpu_fingerprint()}"
    build_dir = build_root() / name
    build_dir.mkdir(parents=True, exist_ok=True)
    sources = sorted(str(p) for p in (src / "cpu").glob("*.cpp"))
    key = _build_key(sources)
    record = build_dir / FAILED_BUILD
    try:
        failed = json.loads(record.read_text()) if record.is_file() else None
    except ValueError:
        failed = None
    if isinstance(failed, dict) and failed.get("key") == key and not retry:
        _failure = KernelBuildError(f"{failed['message']}\n  (the build failed before; recorded in {record}: it is tried "
                               "again once the compiler, the sources or torch change, with --backend cpu, or when that file is deleted)")
        raise _failure
    console = Console(stderr=True)
    try:
        with console.status(
            f"[bold]Loading CPU rasterizer[/] (compiles on first use, ~1 min) -> {build_dir}",
            spinner="dots",
        ):
            module = cpp_ext.load(
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
        message = (f"could not build the CPU rasterizer from {src / 'cpu'}; the compiler said:\n"
                   f"{_compiler_errors(str(exc))}\n  fix: {_remedy(str(exc))}")
        record.write_text(json.dumps({"key": key, "message": message}))
        _failure = KernelBuildError(message)
        raise _failure from exc
    record.unlink(missing_ok=True)
    return module
