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

Once trained, an avatar is opened by its method's `open_trained` as a `TrainedAvatar`, the
only thing `avatar render`, `eval`, `export` and `view` talk to (recon/avatar_dir.py:
load_avatar). Per video frame it takes motion codes [C] (from speech by `speech_motion`;
zeros: the clip's average, neutral mouth) and eye openness [1]; `deform` poses the head
for a run of frames and `render_head` draws one pose into any camera as layers, front to
back, that `HeadView.over` lays over what lies behind the head (a torso, the plate, the
frame's own pixels).
"""

from __future__ import annotations

import importlib
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch
from torch import Tensor

from avatar.errors import AvatarError

from .conditioning import speech_motion as net_speech_motion
from .dataset import Dataset, Frame

if TYPE_CHECKING:
    from .motion import MotionNet


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
    """The samples of one step and their decoded frames: all B of them, or in a run of
    several processes (recon/distributed.py) this one's share."""

    samples: list[Sample]
    frames: list[Frame]
    step_views: int = 0
    """B, the views of the whole step over every process (0: len(samples)). The step's
    loss is the mean over all of them, so a view's gradient carries a factor 1 / B."""

    def __post_init__(self) -> None:
        self.step_views = self.step_views or len(self.samples)

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
    def open_trained(cls, root: Path, tensors: dict[str, torch.Tensor], meta: dict,
                     device: torch.device) -> "TrainedAvatar":
        """The trained avatar in folder `root` (its checkpoint's tensors, on the host, and
        metadata) on `device`, as `avatar render`, `eval`, `export` and `view` take it
        (recon/avatar_dir.py: load_avatar). AvatarError when the method has no renderer."""
        raise AvatarError(root, f"was trained by the method {cls.name!r}, which has no renderer yet: render, eval, "
                          "export and view open avatars of the gaussians method")


class ImageLayer(Protocol):
    """Anything rendered into one camera, H x W pixels."""

    rgb: Tensor  # [H, W, 3] premultiplied by alpha (black behind)
    alpha: Tensor  # [H, W, 1]
    depth: Tensor  # [H, W, 1] expected camera z


def coverage(a: Tensor, b: Tensor) -> Tensor:
    """Alpha of two layers over each other: 1 - (1 - a)(1 - b)."""
    return 1 - (1 - a) * (1 - b)


def torso_under(torso: ImageLayer | None, plate: Tensor) -> Tensor:
    """[H, W, 3] what lies behind the head: the torso layer over the plate [H, W, 3]."""
    return plate if torso is None else torso.rgb + (1 - torso.alpha) * plate


@dataclass
class HeadView:
    """A posed head rendered into one camera: its layers by name, front to back (the
    Gaussian avatar's: "face" over "mouth")."""

    layers: dict[str, ImageLayer]

    def over(self, under: Tensor) -> tuple[Tensor, Tensor]:
        """The layers, back to front, over `under` [H, W, 3]: (image [H, W, 3], head
        coverage [H, W, 1])."""
        image = under
        for layer in reversed(self.layers.values()):
            image = layer.rgb + (1 - layer.alpha) * image
        return image, self.alpha

    @property
    def alpha(self) -> Tensor:
        """[H, W, 1] head coverage."""
        layers = list(self.layers.values())
        alpha = layers[0].alpha
        for layer in layers[1:]:
            alpha = coverage(alpha, layer.alpha)
        return alpha

    @property
    def depth(self) -> Tensor:
        """[H, W, 1] camera z of the front-most layer covering each pixel by more than half."""
        layers = list(self.layers.values())
        depth = layers[-1].depth
        for layer in reversed(layers[:-1]):
            depth = torch.where(layer.alpha > 0.5, layer.depth, depth)
        return depth


class TrainedAvatar(ABC):
    """A trained avatar, as `avatar render`, `eval`, `export` and `view` use it (see the
    module docstring): a method's `open_trained` returns one, on the device asked for.

    Args (kept as attributes):
        root: the avatar folder.
        config: the method's config it was trained with (`backend` is read by name).
        meta: the checkpoint's metadata (size, fps, dataset...).
        background: [S, S, 3] the plate behind the head, at the training size S.
        K: [3, 3] the capture's intrinsics at size S.
    """

    layer_names: ClassVar[tuple[str, ...]]
    """The names of a HeadView's layers, front to back (the viewer shows each alone)."""
    has_gaussians: ClassVar[bool] = False
    """Whether `gaussians` gives 3DGS points (for `avatar export --ply` and the viewer)."""

    def __init__(self, root: Path, config: Any, meta: dict, background: Tensor, K: Tensor):
        self.root, self.config, self.meta, self.background, self.K = root, config, meta, background, K

    @property
    def size(self) -> int:
        return int(self.meta["size"])

    @property
    def fps(self) -> float:
        return float(self.meta["fps"])

    @property
    def dataset(self) -> Path:
        return Path(self.meta["dataset"])

    @property
    def device(self) -> torch.device:
        return self.background.device

    # -- conditioning ------------------------------------------------------------------
    def check_speech(self) -> None:
        """AvatarError when the avatar was trained on a dataset filmed without sound: speech
        cannot drive it."""
        if not self.meta.get("speech", True):
            raise AvatarError(self.root, "was trained on a dataset filmed without sound, so speech cannot drive it",
                              "capture the subject speaking, with sound, and train again")

    def speech_motion(self, feats: dict) -> Tensor:
        """[N, C] motion codes of the N video frames of speech features (capture's layout:
        avatar.dataset_format; "mel_norm", when given, holds the windows already normalised:
        conditioning.mel_input), on the avatar's device: the motion net's; a method without
        one gives its own."""
        self.check_speech()
        if self.motion_net is None:
            raise NotImplementedError(f"{type(self).__name__} has no motion net, so it must give speech_motion")
        return net_speech_motion(self.motion_net, feats)

    @property
    def motion_net(self) -> MotionNet | None:
        """The speech -> motion net behind `speech_motion` (recon/motion.py), or None where
        the method has none (recon/live.py distils a live net from it)."""
        return None

    @property
    def speech_reach(self) -> int:
        """Frames of speech either side of a frame that its motion codes depend on (a live
        stream, recon/live.py, feeds `speech_motion` that many past frames and holds the
        newest in place of the future ones): the motion net's reach; 0 without one."""
        return 0 if self.motion_net is None else self.motion_net.reach

    def tracked_motion(self, ds: Dataset) -> Tensor | None:
        """[rows of ds.features, C] each dataset frame's motion codes from its tracked face
        (the renderer's own input in training: eval's expression oracle), or None when the
        method or the dataset has none."""
        return None

    @property
    def spoken_codes(self) -> int | None:
        """How many of the motion codes speech drives, the first ones (the lower face's; the
        rest are the upper face's: recon/motion.py); None: all."""
        return None if self.motion_net is None else self.motion_net.spoken

    def dataset_motion(self, ds: Dataset) -> Tensor:
        """[rows of ds.features, C] the codes that drive a dataset's own frames from its
        speech: the motion net's for the codes speech moves (the lower face), each frame's
        tracked ones for the rest (the upper face: brows, forehead, cheeks), as the eye
        signal is each frame's own. Other speech leaves those at zero, the clip's average."""
        codes = self.speech_motion(ds.features)
        spoken = self.spoken_codes or codes.shape[1]
        tracked = self.tracked_motion(ds) if spoken < codes.shape[1] else None
        if tracked is not None:
            codes[:, spoken:] = tracked[:, spoken:]
        return codes

    def static_mouth(self, codes: Tensor) -> Tensor:
        """codes [..., C] with the mouth at rest: the codes speech drives at zero (the clip's
        average mouth), the upper face's as they are (eval's static-mouth baseline)."""
        out = codes.clone()
        out[..., : self.spoken_codes or codes.shape[-1]] = 0
        return out

    # -- the head ----------------------------------------------------------------------
    @abstractmethod
    def head_points(self) -> Tensor:
        """[P, 3] points on the head in the head frame (framing: the camera rig and the viewer)."""

    @abstractmethod
    def deform(self, motion: Tensor | None, eye: Tensor, *, mouth_scale: float = 1.0) -> list[Any]:
        """The head posed in B frames: motion [B, C], eye [B, 1] -> B poses for
        `render_head` (opaque to callers); motion None: one pose, the canonical head.
        mouth_scale multiplies the motion's effect (the viewer's amplitude)."""

    @abstractmethod
    def render_head(self, pose: Any, viewmat: Tensor, K: Tensor, size: int | tuple[int, int]) -> HeadView:
        """One pose (from `deform`) in one camera: viewmat [4, 4] world-to-camera (OpenCV),
        K [3, 3], size S (square) or (W, H). Differentiable in viewmat (eval fits poses)."""

    # -- what lies behind it -------------------------------------------------------------
    @property
    def has_torso(self) -> bool:
        """Whether the avatar has a 3D neck-and-shoulders branch."""
        return False

    def check_dataset(self, ds: Dataset) -> None:
        """AvatarError naming `ds` when it is not the dataset this avatar was trained on
        (captured again since)."""

    def torso_layer(self, viewmat: Tensor, K: Tensor, size: int | tuple[int, int],
                    frame: Frame | None) -> ImageLayer | None:
        """The torso in one camera, as the body stood in dataset `frame`, or (None) in its
        reference relation to the head for novel views; None without a torso."""
        return None

    # -- points --------------------------------------------------------------------------
    def gaussians(self, pose: Any = None, *, torso: bool = True, frame: Frame | None = None) -> Any:
        """Every branch's 3D Gaussians (recon.gaussians.Gaussians): canonical (pose None) or
        in a pose from `deform`, with the torso (when `torso` and the avatar has one) as
        the body stood in `frame` (None: its reference relation). AvatarError for methods
        without Gaussians (`has_gaussians`)."""
        raise AvatarError(self.root, f"was trained by the method {self.meta.get('method', DEFAULT_METHOD)!r}, "
                          "which has no 3D Gaussians to export")


    def mesh(self, pose: Any = None, resolution: int = 192) -> tuple[Tensor, Tensor, Tensor]:
        """(vertices [V, 3] in the head frame, triangles [F, 3] long, colours [V, 3] in [0, 1]):
        the head's surface, canonical (pose None) or in a pose from `deform`, on a grid of
        `resolution` cells a side. AvatarError for methods without a density field."""
        raise AvatarError(self.root, f"was trained by the method {self.meta.get('method', DEFAULT_METHOD)!r}, which has "
                          "no density field to extract a mesh from", "export --ply for its 3D Gaussians")


DEFAULT_METHOD = "gaussians"
"""The method of `--method`'s default, and of checkpoints that name none (written before the engine)."""
METHODS: dict[str, str | type[Method]] = {"gaussians": "recon.methods.gaussians:GaussianAvatar",
                                          "nerf": "recon.methods.nerf:RadianceFieldAvatar"}
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
