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


_failures: dict[str, KernelBuildError] = {}  # this process's failed builds, raised again at once
FAILED_BUILD = "build_failed.json"
"""Written in the build folder when a build fails: the next runs report it at once instead
of compiling again, until the sources, the compiler or torch change."""


def _compiler() -> str:
    return os.environ.get("CXX", "c++")


def _build_key(sources: list[str], compilers: list[str]) -> str:
    """What a build's success depends on: the sources, the compilers found and torch."""
    import torch

    h = hashlib.sha1(torch.__version__.encode())
    for path in sources:
        h.update(Path(path).read_bytes())
    for compiler in compilers:
        found = shutil.which(compiler)
        stamp = Path(found).stat().st_mtime_ns if found else ""
        h.update(f"{compiler}|{found}|{stamp}|".encode())
    h.update(f"{shutil.which('ninja')}|{os.environ.get('CUDA_HOME')}|{os.environ.get('TORCH_CUDA_ARCH_LIST')}".encode())
    return h.hexdigest()[:16]


def _remedy(message: str) -> str:
    if shutil.which(_compiler()) is None:
        return (f"no C++ compiler ({_compiler()}) was found: install one (Debian/Ubuntu: sudo apt install g++; "
                "macOS: xcode-select --install)")
    if "omp.h" in message or "fopenmp" in message:
        return "the compiler lacks OpenMP: install libgomp (Debian/Ubuntu: sudo apt install libgomp1 g++)"
    if "CUDA_HOME" in message or "nvcc: not found" in message or "nvcc: No such file" in message:
        return "install the CUDA toolkit of this torch's CUDA version and put its nvcc on PATH (or set CUDA_HOME)"
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
    """Compile (first use) and import the OpenMP CPU rasterizer (``cuda/cpu``). A failed
    build raises KernelBuildError with the compiler's error lines and the fix; it is
    recorded, so later calls and later runs raise it at once until the sources, compiler
    or torch change. retry: build again despite a recorded failure (backend 'cpu' asked for
    by name: the user may have installed what was missing, headers or OpenMP, which the
    record's key cannot see)."""
    src = kernel_source_dir()
    return _load_extension(
        "CPU rasterizer", f"avatar_raster_cpu_{_cpu_fingerprint()}", src / "cpu",
        sorted(str(p) for p in (src / "cpu").glob("*.cpp")), [src / "include", src / "cpu"],
        cflags=["-O3", "-std=c++17", "-fopenmp", "-march=native", "-fno-math-errno", "-fno-trapping-math"],
        ldflags=["-fopenmp"], retry=retry, minutes="~1 min")


@functools.lru_cache(maxsize=None)
def load_cuda_extension(retry: bool = False):
    """Compile (first use, with nvcc) and import our CUDA rasterizer (``cuda/kernels``: the
    kernels and their torch op). Needs a CUDA build of torch and the CUDA toolkit; failures
    are named and recorded as for :func:`load_cpu_extension`."""
    import torch

    if torch.version.cuda is None:
        raise KernelBuildError("could not build the CUDA rasterizer: this torch is a CPU-only build "
                               f"(torch {torch.__version__})\n  fix: install a CUDA build of torch")
    src = kernel_source_dir()
    kernels = src / "kernels"
    sources = [str(kernels / "bindings.cpp"), *sorted(str(p) for p in kernels.glob("*.cu"))]
    return _load_extension(
        "CUDA rasterizer", f"avatar_raster_cuda_{torch.version.cuda.replace('.', '')}", kernels, sources,
        [src / "include", kernels], cflags=["-O3"], cuda_cflags=["-O3"], retry=retry,
        minutes="~2 min")


def _load_extension(label: str, name: str, folder: Path, sources: list[str], includes: list[Path], *,
                    cflags: list[str], ldflags: list[str] | None = None, cuda_cflags: list[str] | None = None,
                    retry: bool, minutes: str):
    import torch.utils.cpp_extension as cpp_ext
    from rich.console import Console

    if name in _failures:
        raise _failures[name]
    build_dir = build_root() / name
    build_dir.mkdir(parents=True, exist_ok=True)
    compilers = [_compiler()] + (["nvcc"] if cuda_cflags is not None else [])
    key = _build_key(sources + sorted(str(p) for include in includes for p in include.glob("*.h*")), compilers)
    record = build_dir / FAILED_BUILD
    try:
        failed = json.loads(record.read_text()) if record.is_file() else None
    except ValueError:
        failed = None
    if isinstance(failed, dict) and failed.get("key") == key and not retry:
        _failures[name] = KernelBuildError(
            f"{failed['message']}\n  (the build failed before; recorded in {record}: it is tried again once the "
            "compiler, the sources or torch change, when the backend is asked for by name, or when that file is "
            "deleted)")
        raise _failures[name]
    console = Console(stderr=True)
    try:
        with console.status(f"[bold]Loading {label}[/] (compiles on first use, {minutes}) -> {build_dir}",
                            spinner="dots"):
            module = cpp_ext.load(
                name=name, sources=sources, extra_include_paths=[str(p) for p in includes],
                extra_cflags=cflags, extra_cuda_cflags=cuda_cflags, extra_ldflags=ldflags,
                build_directory=str(build_dir), verbose=os.environ.get("AVATAR_VERBOSE_BUILD") == "1",
            )
    except Exception as exc:  # compiler missing, headers missing, ...
        message = (f"could not build the {label} from {folder}; the compiler said:\n"
                   f"{_compiler_errors(str(exc))}\n  fix: {_remedy(str(exc))}")
        record.write_text(json.dumps({"key": key, "message": message}))
        _failures[name] = KernelBuildError(message)
        raise _failures[name] from exc
    record.unlink(missing_ok=True)
    return module
