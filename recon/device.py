"""Which device recon runs on: `--device auto|cpu|cuda[:N]` of train, eval, render, export,
view and run.

Parameters, optimizer state, features and frames live on that device; checkpoints are
written from host copies and read onto any device, so an avatar trained on a GPU opens on
a CPU and back.
"""

from __future__ import annotations

import re

import torch

DEVICES = "auto, cpu, cuda or cuda:N"


def resolve_device(name: str | torch.device | None) -> torch.device:
    """The torch device for `name` ("auto": the first CUDA GPU when there is one, else the
    CPU). ValueError, naming the problem and what exists, when it cannot run here."""
    if isinstance(name, torch.device):
        name = str(name)
    name = (name or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    match = re.fullmatch(r"cuda(?::(\d+))?", name)
    if not match:
        raise ValueError(f"unknown device {name!r}; use {DEVICES}")
    if not torch.cuda.is_available():
        build = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise ValueError(f"device {name!r} cannot run here: {build}; use --device cpu (or auto)")
    index = int(match.group(1) or 0)
    if index >= torch.cuda.device_count():
        raise ValueError(f"device {name!r} does not exist: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    return torch.device("cuda", index)
