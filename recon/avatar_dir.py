"""The trained-avatar folder (format `avatar/4`), the hand-off from training to rendering,
evaluation, export and the viewer.

    AVATAR/
      checkpoint.safetensors  model, optimizer and densification state (avatar-checkpoint/1)
      config.json             the TrainConfig it was trained with, and the dataset path
      metrics.jsonl           one JSON object per logged training step
      live_motion.safetensors the live motion net, distilled after training (recon/live.py)
      canonical.ply           canonical Gaussians, standard 3DGS layout (+ branch), at the end
      eval.json, eval_strip.png   written by `avatar eval`

Checkpoint tensors (safetensors, no pickle):
    face.{means,quats,log_scales,opacity_logits,sh_dc,sh_rest}   face branch [n_face, ...]
    mouth.{...}                                                  inside-mouth branch
    torso.params.{means,...}, torso.{blend,offset}.*, torso.{reference,neck_y,tracks}
                                                                 neck-and-shoulders branch (absent
                                                                 until the torso stage starts)
    face_deform.*, mouth_deform.*                                residual deformation heads (state_dict)
    motion_net.*                                                 speech -> motion codes (state_dict)
    rig.{vertices,triangles,falloff,basis.*}                     face mesh and motion basis (absent
                                                                 for datasets without landmarks)
    optim.<group>.{exp_avg,exp_avg_sq}                           Adam moments per tensor
    densify.<branch>.{grad_sum,count}                            densification statistics (face, mouth, torso)
    background                                                   [S, S, 3] plate at training size
    K                                                            [3, 3] intrinsics at training size
Metadata (JSON): format, step, config, dataset, fps, size, extent, optim_steps.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from avatar.errors import AvatarError

from .checkpoint import load_checkpoint, save_checkpoint
from .config import TrainConfig
from .dataset import Dataset, Frame
from .gaussians import FACE, MOUTH, TORSO, Gaussians
from .method import HeadView, TrainedAvatar, checkpoint_method, method_class
from .model import AvatarModel, BranchParams, Layer, concat
from .motion import MotionBasis, MotionNet, MotionRig, tracked_motion_rows
from .torso import TorsoModel

CHECKPOINT = "checkpoint.safetensors"
AVATAR_FORMAT = "avatar/4"
# 4: the torso branch (avatar/3 checkpoints load as avatars without one, and `--resume`
# trains them one); 3: MotionNet's bilabial closure; 2: speech -> motion codes -> mesh skinning;
# 1: audio windows straight into the deformation heads. Checkpoints name the method that
# trained them (recon/method.py); those that name none are the Gaussian avatar's.


def model_tensors(model: AvatarModel) -> dict[str, torch.Tensor]:
    out = {}
    for prefix in ("face", "mouth"):
        p = getattr(model, prefix)
        out.update({f"{prefix}.{k}": getattr(p, k).detach() for k in BranchParams.NAMES})
    for prefix in ("face_deform", "mouth_deform", "motion_net", "rig"):
        module = getattr(model, prefix)
        if module is not None:
            out.update({f"{prefix}.{k}": v for k, v in module.state_dict().items()})
    if model.torso is not None:
        out.update({f"torso.{k}": v.detach() for k, v in model.torso.state_dict().items()})
    return out


def _state(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}


def rig_from_tensors(tensors: dict[str, torch.Tensor]) -> MotionRig | None:
    """The face mesh rig saved with a model, or None (an avatar of a dataset without landmarks)."""
    state = _state(tensors, "rig")
    if not state:
        return None
    basis = MotionBasis(len(state["vertices"]), len(state["basis.vertices"]), len(state["basis.std"]))
    rig = MotionRig(basis, state["vertices"], state["triangles"])
    rig.load_state_dict(state)
    return rig


GAUSSIAN_SHAPES = {"means": (3,), "quats": (4,), "log_scales": (3,), "opacity_logits": (), "sh_dc": (1, 3),
                   "sh_rest": None}
"""Trailing shape of each per-Gaussian tensor (None: sh_rest, [N, (degree+1)^2 - 1, 3])."""


def branch_from_tensors(tensors: dict[str, torch.Tensor], prefix: str, label: int) -> Gaussians:
    """One branch's Gaussians from checkpoint tensors `<prefix>.<name>`, shapes checked
    (ValueError, KeyError)."""
    t = {k: tensors[f"{prefix}.{k}"] for k in BranchParams.NAMES}
    n = len(t["means"])
    for k, tail in GAUSSIAN_SHAPES.items():
        shape = tuple(t[k].shape)
        if shape[:1] != (n,) or (shape[2:] != (3,) if tail is None else shape[1:] != tail):
            raise ValueError(f"{prefix}.{k} has shape {list(shape)}, expected "
                             f"{[n, 'K', 3] if tail is None else [n, *tail]}")
    return Gaussians(t["means"], t["quats"], t["log_scales"], t["opacity_logits"],
                     torch.cat([t["sh_dc"], t["sh_rest"]], 1), torch.full((n,), label, dtype=torch.uint8))


def model_from_tensors(tensors: dict[str, torch.Tensor], path: Path) -> AvatarModel:
    try:
        g = concat([branch_from_tensors(tensors, prefix, b) for prefix, b in (("face", FACE), ("mouth", MOUTH))])
        first = tensors["motion_net.temporal.0.weight"]  # [width, 32 + visemes, kernel]
        model = AvatarModel(g, rig_from_tensors(tensors), motion_dim=len(tensors["motion_net.centre"]),
                            visemes=first.shape[1] - 32, window=4 * first.shape[2],
                            spoken=tensors["motion_net.temporal.6.weight"].shape[0])
        if model.rig is not None:
            model.rig.basis.spoken = model.motion_net.spoken
        for prefix in ("face_deform", "mouth_deform", "motion_net"):
            getattr(model, prefix).load_state_dict(_state(tensors, prefix))
        if any(k.startswith("torso.") for k in tensors):  # an avatar with a torso: all of it
            tracks, reference = tensors["torso.tracks"], tensors["torso.reference"]
            if tracks.dim() != 3 or tuple(tracks.shape[1:]) != (4, 4) or tuple(reference.shape) != (4, 4):
                raise ValueError(f"torso.tracks has shape {list(tracks.shape)} and torso.reference "
                                 f"{list(reference.shape)}, expected [N, 4, 4] and [4, 4]")
            model.torso = TorsoModel(branch_from_tensors(tensors, "torso.params", TORSO), tensors["torso.reference"],
                                     float(tensors["torso.neck_y"]), tensors["torso.tracks"])
            model.torso.load_state_dict(_state(tensors, "torso"))
    except (KeyError, RuntimeError, ValueError, IndexError, TypeError) as exc:
        raise AvatarError(path, f"does not hold a complete avatar model ({exc.__class__.__name__}: {exc})",
                          "it was written by another version or is damaged; retrain or resume from a copy") from exc
    return model


class TrainedGaussianAvatar(TrainedAvatar):
    """The Gaussian avatar (recon/model.py) as render, eval, export and view use it. A pose
    is the face and mouth branches' deformed Gaussians of one frame."""

    layer_names = ("face", "mouth")
    has_gaussians = True

    def __init__(self, root: Path, model: AvatarModel, config: TrainConfig, meta: dict, background: torch.Tensor,
                 K: torch.Tensor):
        super().__init__(root, config, meta, background, K)
        self.model = model

    @property
    def motion_net(self) -> MotionNet:
        return self.model.motion_net

    def tracked_motion(self, ds: Dataset) -> torch.Tensor | None:
        if self.model.rig is None or ds.landmarks(0) is None:
            return None
        return tracked_motion_rows(ds, self.model.rig)

    def head_points(self) -> torch.Tensor:
        return self.model.face.means.detach()

    def deform(self, motion: torch.Tensor | None, eye: torch.Tensor, *,
               mouth_scale: float = 1.0) -> list[list[Gaussians]]:
        branches = [self.model.deformed_batch(b, motion, eye, mouth_scale=mouth_scale)[0] for b in (FACE, MOUTH)]
        return [list(pose) for pose in zip(*branches)]

    def render_head(self, pose: list[Gaussians], viewmat: torch.Tensor, K: torch.Tensor,
                    size: int | tuple[int, int]) -> HeadView:
        return HeadView({name: self.model.render_layer(g, viewmat, K, size, self.model.sh_degree, self.config.backend)
                         for name, g in zip(self.layer_names, pose)})

    @property
    def has_torso(self) -> bool:
        return self.model.torso is not None

    def check_dataset(self, ds: Dataset) -> None:
        if self.model.torso is not None and len(ds) != len(self.model.torso.tracks):
            raise AvatarError(ds.root, f"has {len(ds)} frames, but the avatar tracked the body in "
                              f"{len(self.model.torso.tracks)}: it was captured again since the avatar was trained",
                              "train the avatar again on it")

    def _body(self, frame: Frame | None) -> torch.Tensor | None:
        return None if frame is None else self.model.torso.motion_in(frame.c2w, frame.index)

    def torso_layer(self, viewmat: torch.Tensor, K: torch.Tensor, size: int | tuple[int, int],
                    frame: Frame | None) -> Layer | None:
        if self.model.torso is None:
            return None
        return self.model.torso_layer(viewmat, K, size, self._body(frame), backend=self.config.backend)

    def gaussians(self, pose: list[Gaussians] | None = None, *, torso: bool = True,
                  frame: Frame | None = None) -> Gaussians:
        return self.model.gaussians(pose, torso=torso, body=None if self.model.torso is None else self._body(frame))


def load_avatar(root: str | Path, device: torch.device | str = "cpu") -> TrainedAvatar:
    """Open an avatar folder onto `device` through the method that trained it
    (Method.open_trained; checkpoints are read to the host first, so an avatar trained on
    any device opens on any other); AvatarError if it is missing, corrupt, not an avatar,
    or of a method without a renderer."""
    root = Path(root)
    path = root / CHECKPOINT
    if not root.is_dir():
        raise AvatarError(root, "is not an avatar folder (it does not exist)", "train one with `avatar train`")
    if not path.is_file():
        raise AvatarError(root, f"is not an avatar folder (no {CHECKPOINT})", "train one with `avatar train`")
    tensors, meta = load_checkpoint(path)
    return method_class(checkpoint_method(path, meta)).open_trained(root, tensors, meta, torch.device(device))


def open_gaussian_avatar(root: Path, tensors: dict[str, torch.Tensor], meta: dict,
                         device: torch.device) -> TrainedGaussianAvatar:
    """The Gaussian avatar of folder `root` from its checkpoint (`load_avatar` for the
    gaussians method)."""
    path = root / CHECKPOINT
    for key in ("background", "K"):
        if key not in tensors:
            raise AvatarError(path, f"lacks the tensor {key!r}; it is not an avatar checkpoint")
    bg, K = tensors["background"], tensors["K"]
    if bg.dim() != 3 or bg.shape[0] != bg.shape[1] or bg.shape[2] != 3 or tuple(K.shape) != (3, 3):
        raise AvatarError(path, f"has a background of shape {list(bg.shape)} and intrinsics of shape {list(K.shape)}; "
                          "expected [S, S, 3] and [3, 3]", "the file is damaged; retrain or resume from a copy")
    try:
        config = TrainConfig.from_dict(meta["config"])
    except (KeyError, TypeError, ValueError) as exc:
        raise AvatarError(path, f"has an unreadable config ({exc})") from exc
    model = model_from_tensors(tensors, path).to(device)
    model.eval()
    return TrainedGaussianAvatar(root, model, config, meta, tensors["background"].to(device),
                                 tensors["K"].to(device))


def save_avatar(root: Path, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
    """Write checkpoint.safetensors atomically (a method's tensors, the optimizer's, and
    `meta` with at least step, method, config and dataset) and config.json."""
    save_checkpoint(root / CHECKPOINT, tensors, meta)
    from avatar.io import write_json

    write_json(root / "config.json", {"format": AVATAR_FORMAT, "method": meta["method"], "dataset": meta["dataset"],
                                      "config": meta["config"]})
    return root / CHECKPOINT


def read_json_lines(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
