"""A check that code keeps its tensors on the device it was given, without a GPU.

On a CUDA machine a tensor left on the host breaks the step ("expected all tensors to be
on the same device"). A CPU-only machine cannot see that, and the meta device cannot run a
rasterizer (its tile lists have data-dependent sizes). So `DeviceGuard` plays the device
on the CPU: it follows where each tensor would live and reports what CUDA would refuse.

- *Where tensors live.* A tensor is on the device when it was made with a `device=` given
  as a torch.device (the configured device travels as one), moved by `.to(device)`, or
  computed from one that is. It is on the host when made by a factory without a device or
  with the string "cpu", by `torch.from_numpy`, or brought back by `.cpu()` /
  `.to("cpu")`. Tensors the guard never saw made (autograd's gradients) take no side.
- *What is reported*, with the file and line of this project's code that made the call:
  an operation mixing a host tensor and a device tensor (0-d host tensors and host index
  tensors into device tensors are allowed, as CUDA allows them); and, when `strict`, every factory call
  without a device and every transfer to the host (`.cpu()`, `.numpy()`, `.to("cpu")`),
  except on a line that says why with a `# host:` comment (frames to the video encoder).

Building a model on the host and then moving it is the design, so construction runs under
a guard that is not strict: it only records where things live.
"""

from __future__ import annotations

import linecache
import sys
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

ROOT = Path(__file__).resolve().parents[1]
FACTORIES = {torch.zeros, torch.ones, torch.full, torch.empty, torch.eye, torch.arange, torch.linspace,
             torch.rand, torch.randn, torch.randint, torch.randperm, torch.tensor, torch.as_tensor, torch.logspace}
HOST = {torch.Tensor.cpu, torch.Tensor.numpy}
TAG = "_device_guard_side"


def _project_line() -> str | None:
    """'path:line' of the project frame that made the current call (None for library calls)."""
    f = sys._getframe(2)
    while f is not None and Path(f.f_code.co_filename).name == "_device_guard.py":
        f = f.f_back
    if f is None:
        return None
    path = Path(f.f_code.co_filename)
    if ROOT in path.parents and "tests" not in path.parts and ".venv" not in path.parts:
        return f"{path.relative_to(ROOT)}:{f.f_lineno}"
    return None


def _tensors(x):
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (list, tuple)):
        for y in x:
            yield from _tensors(y)
    elif isinstance(x, dict):
        for y in x.values():
            yield from _tensors(y)


def _side(t: torch.Tensor) -> str | None:
    return getattr(t, TAG, None)


def _mark(out, side: str | None) -> None:
    if side is None:
        return
    for t in _tensors(out):
        try:
            setattr(t, TAG, side)
        except (AttributeError, RuntimeError):  # some tensor subclasses refuse attributes
            pass


class DeviceGuard(TorchFunctionMode):
    """Simulates a device on the CPU (module docstring); `violations` lists what CUDA would
    refuse (and, when `strict`, host tensors made or fetched by project code)."""

    def __init__(self, strict: bool = True) -> None:
        super().__init__()
        self.strict = strict
        self.violations: list[str] = []
        self._from_numpy = None

    def __enter__(self):
        # torch does not let a mode see from_numpy: wrap it while the guard is on.
        from_numpy = self._from_numpy = torch.from_numpy

        def tagged_from_numpy(array):
            t = from_numpy(array)
            _mark(t, "host")
            return t

        torch.from_numpy = tagged_from_numpy
        return super().__enter__()

    def __exit__(self, *exc):
        torch.from_numpy = self._from_numpy
        return super().__exit__(*exc)

    def _report(self, problem: str, host_ok: bool = False) -> None:
        where = _project_line()
        if where is None:
            return
        path, line = where.rsplit(":", 1)
        if host_ok and "# host:" in linecache.getline(str(ROOT / path), int(line)):
            return
        self.violations.append(f"{where}: {problem}")

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in FACTORIES:
            device = kwargs.get("device")
            on_device = isinstance(device, torch.device)
            if self.strict and device is None:
                self._report(f"torch.{func.__name__} without device=")
            _mark(out, "device" if on_device else "host")
            return out
        if func in HOST or (func is torch.Tensor.to and _to_host(args, kwargs)):
            if self.strict:
                self._report(f"{func.__name__} brings a tensor to the host", host_ok=True)
            out = _moved(args[0], out, "host")
            return out
        if func is torch.Tensor.to and _to_device(args, kwargs):
            return _moved(args[0], out, "device")
        if func is torch.Tensor.__getitem__:  # a device tensor takes host indices, not the reverse
            inputs = list(_tensors(args[:1]))
            if _side(args[0]) == "host" and any(_side(t) == "device" for t in _tensors(args[1:])):
                self._report("a host tensor indexed by a device tensor")
        elif func is torch.Tensor.__setitem__:
            inputs = list(_tensors([args[0], *args[2:]]))
        else:
            inputs = list(_tensors((args, kwargs)))
        sides = {_side(t) for t in inputs if t.dim() > 0} - {None}
        if sides == {"host", "device"}:
            self._report(f"{getattr(func, '__name__', func)} mixes host and device tensors")
        if "device" in sides or any(_side(t) == "device" for t in inputs):
            _mark(out, "device")
        elif sides:
            _mark(out, "host")
        return out


def _moved(source, out, side: str):
    """`out` of a move to `side`. On the CPU a move returns its source itself, which would
    then be on both sides; a view of it (what the CPU's move is, an alias) takes the tag."""
    if out is source and _side(source) not in (None, side):
        out = out.view_as(out)
    _mark(out, side)
    return out


def _target(args, kwargs):
    return kwargs.get("device", args[1] if len(args) > 1 else None)


def _to_host(args, kwargs) -> bool:
    """`.to("cpu")`: the configured device travels as a torch.device, so a device given as
    the string "cpu" is a transfer to the host written into the code."""
    target = _target(args, kwargs)
    return isinstance(target, str) and torch.device(target).type == "cpu"


def _to_device(args, kwargs) -> bool:
    """`.to(device)` with a torch.device, or `.to(other)` with a tensor on the device."""
    target = _target(args, kwargs)
    return isinstance(target, torch.device) or (isinstance(target, torch.Tensor) and _side(target) == "device")
