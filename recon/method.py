"""The interface between the training engine (recon/engine.py) and a reconstruction method.

A method (nerfstudio's Model, with gsplat's densification strategy folded in) owns its
parameters and everything particular to it; the engine owns what every method shares: the
avatar folder, checkpoints and resume, the optimizer, the data manager's batches
(recon/datamanager.py), metrics, the progress bar and devices. One engine step is

    method.before_step(step, optim)          stage transitions (may add parameter groups)
    outputs = method.render(batch, step)     a batch of B views -> dict of tensors
    loss, info = method.loss(batch, outputs, step)    mean over the batch
    loss.backward(); method.after_backward(batch, outputs)   strategy statistics
    optim.step(); optim.zero_grad()
    method.after_step(step + 1, optim)       densify / prune / refine, logged as events

A method's config is a typed dataclass (presets in `presets`, per-field docstrings) that
also carries the engine's settings, read by name: `preset`, `seed`, `size`, `batch_size`,
`total_steps`, `checkpoint_every`, `log_every`, `cache_frames`, `backend`; it has
`to_dict()` and a checking `from_dict(d)`.

Checkpoints hold `state_tensors()` and `state_meta()` beside the optimizer, with the
method's name in the metadata, so that `--resume` rebuilds the same method with `restore`.
Methods are found by name in METHODS; `register_method` adds one (tests plug in their own).
"""

from __future__ import annotations

import importlib
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from avatar.errors import AvatarError

from .dataset import Dataset, Frame


@dataclass(frozen=True)
class Sample:
    """One view of a training step: a dataset frame (an image of one timestep from one
    camera), and its position in the run's stream of samples."""

    key: int
    """Position in the stream (step * batch_size + slot): whatever is random about this
    sample (noise, extra frames) is drawn from a generator seeded by it, so a sample is the
    same whichever batch carries it, and a resumed run draws what the whole run would."""
    index: int
    """Frame in the dataset."""


@dataclass
class Batch:
    """The B samples of one step and their decoded frames."""

    samples: list[Sample]
    frames: list[Frame]

    def __len__(self) -> int:
        return len(self.samples)


class Method(ABC):
    """A reconstruction method as the engine drives it (see the module docstring).

    Args (kept as attributes):
        ds: the training dataset, on the run's device.
        train_ids: dataset indices of the training frames (the rest are held out).
        cfg: the method's config dataclass.
        device: where parameters, optimizer state and frames live.
    """

    name: ClassVar[str]
    """What `--method` calls it, and what checkpoints record."""
    presets: ClassVar[dict[str, Any]]
    """Preset name -> config; the first is the default."""

    def __init__(self, ds: Dataset, train_ids: list[int], cfg: Any, device: torch.device):
        self.ds, self.train_ids, self.cfg, self.device = ds, train_ids, cfg, device

    @classmethod
    def config(cls, preset: str | None = None, **overrides) -> Any:
        """A preset (default: the first) with fields replaced, types and ranges checked;
        ValueError names the first bad setting."""
        name = preset or next(iter(cls.presets))
        overrides = {k: v for k, v in overrides.items() if v is not None}
        if name not in cls.presets:
            raise ValueError(f"unknown preset {name!r} for method {cls.name!r}; choose from {', '.join(cls.presets)}")
        return type(cls.presets[name]).from_dict({**cls.presets[name].to_dict(), "preset": name, **overrides})

    # -- lifecycle -------------------------------------------------------------------
    @abstractmethod
    def create(self, out: Path, progress: bool) -> None:
        """Build the parameters from the dataset (a fresh run; the engine has seeded torch
        with cfg.seed). `out` exists: a method may write its own logs there."""

    @abstractmethod
    def restore(self, tensors: dict[str, torch.Tensor], meta: dict, path: Path) -> None:
        """Rebuild the parameters from a checkpoint's tensors (on the host) and metadata;
        AvatarError naming `path` when they are incomplete."""

    @abstractmethod
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Everything of the method a resume needs (parameters, strategy state), by name."""

    def state_meta(self) -> dict:
        """JSON-able facts saved beside the tensors (counts, scene extent...)."""
        return {}

    # -- optimisation ----------------------------------------------------------------
    @abstractmethod
    def param_groups(self) -> list[dict]:
        """Adam parameter groups: {"params": [...], "name": unique str, "lr": float, ...};
        any other Adam option (eps, betas) may be set per group."""

    def learning_rate(self, group: dict, step: int) -> float:
        """The group's learning rate at `step` (its schedule); group["base_lr"] is the
        rate it was created with. Default: constant."""
        return group["base_lr"]

    def stage_at(self, step: int) -> str:
        """The name of the training stage `step` is in (logged with every metric line)."""
        return "train"

    def before_step(self, step: int, optim: torch.optim.Optimizer, progress: bool) -> dict:
        """Stage transitions before `step` (a new branch and its parameter groups); returns
        events to log. {"finished": True} ends the run here (nothing left to fit)."""
        return {}

    @abstractmethod
    def render(self, batch: Batch, step: int) -> dict:
        """The batch's B views, as training at `step` renders them: a dict with at least
        "rgb" [B, H, W, 3] and "alpha" [B, H, W, 1], and whatever else the loss and the
        strategy read (depth, per-branch layers, deformation penalties)."""

    @abstractmethod
    def loss(self, batch: Batch, outputs: dict, step: int) -> tuple[torch.Tensor, dict]:
        """(the loss [], the mean over the batch's samples; info: JSON-able numbers for the
        log, with "psnr" of the region the stage fits)."""

    def after_backward(self, batch: Batch, outputs: dict) -> None:
        """Read gradients before the optimizer steps (densification statistics)."""

    def after_step(self, steps_done: int, optim: torch.optim.Optimizer, progress: bool) -> dict:
        """Structure changes after the optimizer step (densify, prune, reset, refine);
        returns events to log."""
        return {}

    def milestones(self) -> set[int]:
        """Step counts (besides the last) after which a checkpoint is always written and a
        metric line logged: the ends of phases a user may want to go back to."""
        return set()

    def saved(self) -> None:
        """Called after each checkpoint is written (a method that derives state from its
        parameters re-derives it here, as a run resumed from that checkpoint would)."""

    def log_fields(self) -> dict:
        """Numbers logged on every metric line (sizes of the model)."""
        return {}

    def finish(self, out: Path) -> None:
        """Write the method's end-of-training artifacts into the avatar folder."""

    # -- the trained avatar ------------------------------------------------------------
    @classmethod
    def open_trained(cls, root: Path, tensors: dict[str, torch.Tensor], meta: dict, device: torch.device) -> Any:
        """The trained avatar in folder `root` (its checkpoint's tensors, on the host, and
        metadata) on `device`, as `avatar render`, `eval`, `export` and `view` take it
        (recon/avatar_dir.py: load_avatar). AvatarError when the method has none."""
        raise AvatarError(root, f"was trained by the method {cls.name!r}, which has no renderer yet: render, eval, "
                          "export and view open avatars of the gaussians method")


DEFAULT_METHOD = "gaussians"
"""The method of `--method`'s default, and of checkpoints that name none (written before the engine)."""
METHODS: dict[str, str | type[Method]] = {"gaussians": "recon.methods.gaussians:GaussianAvatar"}
"""Method name -> class, or "module:Class" imported on first use."""


def register_method(cls: type[Method]) -> type[Method]:
    """Make `cls` trainable as `--method cls.name` (usable as a class decorator)."""
    METHODS[cls.name] = cls
    return cls


def method_class(name: str) -> type[Method]:
    """The class of a method by name; ValueError naming the known ones."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    entry = METHODS[name]
    if isinstance(entry, str):
        module, attr = entry.split(":")
        entry = METHODS[name] = getattr(importlib.import_module(module), attr)
    return entry


def config_from_file(path: Path, method: str, preset: str | None = None, **overrides) -> Any:
    """A JSON file of a method's config fields over a preset (its own "preset" key, or
    `preset`); keyword overrides win over both. AvatarError naming the file when it is bad."""
    try:
        d = json.loads(Path(path).read_text())
        if not isinstance(d, dict):
            raise ValueError("the top level must be an object of config fields")
        base = preset or d.get("preset")
        d.pop("preset", None)
        return method_class(method).config(base, **{**d, **overrides})
    except FileNotFoundError as exc:
        raise AvatarError(path, "config file not found") from exc
    except (json.JSONDecodeError, ValueError, TypeError) as exc:
        raise AvatarError(path, f"is not a valid training config ({exc})") from exc


def checkpoint_method(ckpt: Path, meta: dict) -> str:
    """The name of the method a checkpoint was trained by (its metadata `meta`); AvatarError
    naming `ckpt` when this version lacks it."""
    name = meta.get("method", DEFAULT_METHOD)
    try:
        method_class(name)
    except ValueError as exc:
        raise AvatarError(ckpt, f"was trained by a method this version lacks ({exc})") from exc
    return name
