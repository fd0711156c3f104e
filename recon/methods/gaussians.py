"""The talking Gaussian avatar as a method of the engine (`avatar train --method gaussians`,
the default; recon/method.py, recon/engine.py).

First, the speech-to-motion stage (recon/motion.py): the lower face's tracked motion of
every frame becomes a few PCA codes, and MotionNet learns to predict them from the
clip's speech (log-mel and viseme posteriors), with a velocity term. The renders below
are then driven by each frame's *tracked* codes (GeneFace's split: the renderer learns
motion -> image, MotionNet speech -> motion); new speech goes through MotionNet.

Stages (TalkingGaussian's order; fractions in TrainConfig.stages):
  static  both branches' canonical Gaussians, no deformation, full composite;
  mouth   the inside-mouth branch and its motion-only head, on the inner-mouth region:
          its layer over the torso/background must match the frame inside the inner lips;
  face    the face branch and its motion/eye head; its layer is laid over the frame's own
          inner mouth, and its alpha must match head-minus-mouth, so the lips learn to open;
  fuse    everything, on the full composite;
  torso   (`torso_steps` more, recon/torso.py) first the head's floaters (points that
          project outside the person in most views) are pruned, then the neck-and-
          shoulders branch is fitted alone, under the finished head, over the background
          plate: the composite must match the whole frame, and head and torso alphas
          together the person mask. The head is rendered without gradients.
Loss: (1 - 0.2) L1 + 0.2 D-SSIM with extra weight on the lips, + |alpha - mask|,
+ a small penalty on deformation magnitude, + (while the face head deforms) the distance
between the tracked lip landmarks and the fitted face's lip landmarks carried by the
face deformation (mesh motion plus residual head), so the lips land where they were tracked.

A step takes B views (`batch_size`): every loss term is the mean of the views' own terms,
and the densification statistics undo that mean (gsplat's rule), so B = 1 is the
one-frame step of earlier versions.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from avatar.dataset_format import LIPS, OUTER_LIPS, RIGID, VISEMES
from avatar.errors import AvatarError
from avatar.geometry import pseudo_huber

from ..avatar_dir import TrainedGaussianAvatar, model_from_tensors, model_tensors, open_gaussian_avatar
from ..conditioning import normalize_mel, viseme_features
from ..config import PRESETS, TrainConfig
from ..dataset import Dataset, Frame, behind_head, dilate
from ..deform import DeformInputs
from ..densify import GradStats, densify_and_prune, edit_branch, reset_opacity
from ..gaussians import FACE, MOUTH, save_ply
from ..init import init_gaussians
from ..losses import photometric_loss, psnr
from ..method import Batch, Method, coverage, torso_under
from ..model import AvatarModel, BranchParams, Layer, composite
from ..motion import fit_rig, fit_speech_to_motion, has_tracked_faces, tracked_motion
from ..torso import TorsoModel, init_torso, refine_tracks

BRANCHES = (("face", FACE), ("mouth", MOUTH))


ADAM_EPS = 1e-15
"""3DGS's Adam epsilon: gradients of far-off Gaussians are tiny, and 1e-8 would freeze them."""


def _gaussian_lrs(cfg: TrainConfig) -> dict[str, float]:
    return {"means": cfg.lr_means, "quats": cfg.lr_quats, "log_scales": cfg.lr_scales,
            "opacity_logits": cfg.lr_opacity, "sh_dc": cfg.lr_sh, "sh_rest": cfg.lr_sh / 20}


def torso_groups(torso: TorsoModel, cfg: TrainConfig) -> list[dict]:
    """The torso's parameter groups ("torso.means", ..., "torso.mlp")."""
    lrs = _gaussian_lrs(cfg)
    groups = [{"params": [getattr(torso.params, k)], "name": f"torso.{k}", "lr": lrs[k]} for k in BranchParams.NAMES]
    groups.append({"params": [*torso.blend.parameters(), *torso.offset.parameters()], "name": "torso.mlp",
                   "lr": cfg.lr_deform})
    return [{**g, "eps": ADAM_EPS} for g in groups]


def head_groups(model: AvatarModel, cfg: TrainConfig) -> list[dict]:
    """Adam groups of the head, one per tensor ("face.means", ..., "face_deform.planes",
    "face_deform.mlp", ...), and of the torso when the model has one."""
    lrs = _gaussian_lrs(cfg)
    groups = [{"params": [getattr(model.branch(b), k)], "name": f"{prefix}.{k}", "lr": lrs[k]}
              for prefix, b in BRANCHES for k in BranchParams.NAMES]
    if model.rig is None:  # no tracked motion to fit MotionNet to: it learns through the renders
        groups.append({"params": list(model.motion_net.parameters()), "name": "motion_net", "lr": cfg.lr_deform})
    for prefix in ("face_deform", "mouth_deform"):
        head = getattr(model, prefix)
        planes = list(head.encoding.parameters())
        plane_ids = {id(p) for p in planes}
        groups.append({"params": planes, "name": f"{prefix}.planes", "lr": cfg.lr_planes})
        groups.append({"params": [p for p in head.parameters() if id(p) not in plane_ids],
                       "name": f"{prefix}.mlp", "lr": cfg.lr_deform})
    groups = [{**g, "eps": ADAM_EPS} for g in groups]
    return groups + (torso_groups(model.torso, cfg) if model.torso is not None else [])


def stage_at(cfg: TrainConfig, step: int) -> str:
    if step >= cfg.iterations:
        return "torso"
    current = "static"
    for name, first in cfg.stages.boundaries(cfg.iterations):
        if step >= first:
            current = name
    return current


# Which branches each stage trains (face, mouth), and which heads deform.
STAGE_TRAINS = {"static": (True, True), "mouth": (False, True), "face": (True, False), "fuse": (True, True)}
STAGE_DEFORMS = {"static": (False, False), "mouth": (False, True), "face": (True, False), "fuse": (True, True)}


def lip_weights(ds: Dataset, i: int, margin: float = 0.25) -> torch.Tensor | None:
    """[S, S] 1 inside a box around the outer lips (widened by `margin`), else 0."""
    lm = ds.landmarks(i)
    if lm is None:
        return None
    lips = lm[list(OUTER_LIPS)]
    lo, hi = lips.min(0), lips.max(0)
    pad = (hi - lo) * margin
    (x0, y0), (x1, y1) = np.floor(lo - pad).astype(int), np.ceil(hi + pad).astype(int)
    w = torch.zeros(ds.size, ds.size, device=ds.device)
    w[max(y0, 0): max(y1, 0), max(x0, 0): max(x1, 0)] = 1
    return w


def project(xyz: torch.Tensor, viewmat: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
    """[..., P, 3] head-frame points -> [..., P, 2] pixels. viewmat: [..., 4, 4] world-to-camera
    (OpenCV) and K: [..., 3, 3] intrinsics, each one per leading index or one for all."""
    cam = xyz @ viewmat[..., :3, :3].transpose(-1, -2) + viewmat[..., None, :3, 3]
    uv = cam @ K.transpose(-1, -2)
    return uv[..., :2] / uv[..., 2:].clamp_min(1e-6)


def lip_landmark_target(ds: Dataset, i: int, face: torch.Tensor) -> torch.Tensor | None:
    """[40, 2] where frame i's tracked lips are, in pixels at ds.size, after removing the 2D
    offset by which the fitted face's rigid landmarks miss their tracked positions (pose
    error is not the mouth's to explain); None without landmarks."""
    lm = ds.landmarks(i)
    if lm is None:
        return None
    lm = torch.from_numpy(lm)
    rigid = list(RIGID)
    offset = (project(face[rigid], ds.viewmat(i), ds.intrinsics(i)) - lm[rigid]).mean(0)
    return lm[LIPS] + offset


def lip_landmark_loss(model: AvatarModel, lips: torch.Tensor, motion: torch.Tensor, eye: torch.Tensor,
                      viewmat: torch.Tensor, K: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Robust pixel distance between the lip landmarks carried by the face deformation (the
    mesh's motion plus the residual head) and where the frames' lips are: (loss [] in
    pixels, mean distance in pixels), over B frames.

    lips: [L, 3] canonical landmarks (mesh vertices LIPS); motion: [B, K]; eye: [B, 1];
    viewmat: [B, 4, 4]; K: [B, 3, 3]; target: [B, L, 2] pixels.
    """
    d = model.face_deform(DeformInputs(xyz=lips, motion=motion, eye=eye)).d_xyz  # [B, L, 3]
    if model.rig is not None:
        d = d + model.rig.basis.decode(motion)[:, LIPS]
    err2 = (project(lips + d, viewmat, K) - target).square().sum(-1)
    return pseudo_huber(err2, 1.0).mean(), float(err2.detach().sqrt().mean())


@dataclass
class LipTargets:
    """What the lip-landmark loss needs of each training frame, gathered once (T frames)."""

    lips: torch.Tensor  # [40, 3] the fitted face's lip landmarks (head frame, metres)
    target: torch.Tensor  # [T, 40, 2] tracked lips, pose offset removed (lip_landmark_target)
    viewmat: torch.Tensor  # [T, 4, 4]
    K: torch.Tensor  # [T, 3, 3]
    eye: torch.Tensor  # [T, 1]
    motion: torch.Tensor  # [T, K] tracked motion codes

    @classmethod
    def of(cls, ds: Dataset, ids: list[int], motion: torch.Tensor | None) -> "LipTargets | None":
        """None when the dataset has no tracked motion (motion [len(ds), K] is None: ER-NeRF imports)."""
        if motion is None:
            return None
        face = ds.face_geometry()
        return cls(lips=face[LIPS], target=torch.stack([lip_landmark_target(ds, i, face) for i in ids]),
                   viewmat=torch.stack([ds.viewmat(i) for i in ids]), K=torch.stack([ds.intrinsics(i) for i in ids]),
                   eye=torch.tensor([[float(ds.frames[i].get("eye_openness", 1.0))] for i in ids]),
                   motion=motion[ids])

    def to(self, device: torch.device | str) -> "LipTargets":
        return LipTargets(**{k: getattr(self, k).to(device) for k in ("lips", "target", "viewmat", "K", "eye", "motion")})


class GaussianAvatar(Method):
    """The talking Gaussian avatar (module docstring): its model, speech -> motion stage,
    stages, losses and per-branch 3DGS densification, behind the engine's interface."""

    name = "gaussians"
    presets = PRESETS

    def __init__(self, ds: Dataset, train_ids: list[int], cfg: TrainConfig, device: torch.device):
        super().__init__(ds, train_ids, cfg, device)
        # The model is built on the host, from the dataset read there, and then moved.
        self.host_ds = ds.on("cpu", cache_frames=16)
        if ds.has_speech:
            mel, visemes = normalize_mel(ds.features["mel"]), viseme_features(ds.features)
            self.mel, self.visemes = mel.to(device), visemes.to(device)
        else:  # filmed without sound: the avatar follows tracked motion only
            self.mel = self.visemes = None
        self.model: AvatarModel
        self.stats: dict[str, GradStats] = {}
        self.extent = 0.0
        self.motion: torch.Tensor | None = None  # [len(ds), K] tracked motion codes
        self.lip_targets: LipTargets | None = None

    # -- lifecycle ---------------------------------------------------------------------
    def create(self, out: Path, progress: bool) -> None:
        cfg = self.cfg
        g = init_gaussians(self.host_ds, n_volume=cfg.init_volume_points, n_mouth=cfg.init_mouth_points,
                           sh_degree=cfg.sh_degree, seed=cfg.seed, train_ids=self.train_ids)
        rig, motion = (fit_rig(self.host_ds, self.train_ids, cfg.motion_components, cfg.motion_falloff,
                               cfg.motion_upper_components)
                       if has_tracked_faces(self.host_ds) else (None, None))
        if rig is None and not self.ds.has_speech:
            raise AvatarError(self.ds.root, "has neither speech nor tracked faces: nothing drives the avatar",
                              "capture the video with its sound, or with mediapipe's face tracking")
        self.model = AvatarModel(g, rig, motion_dim=cfg.motion_components, visemes=len(VISEMES),
                                 window=cfg.audio_window)
        if rig is not None and self.ds.has_speech:
            fit_speech_to_motion(self.model.motion_net, rig, self.host_ds, self.train_ids, motion, self.mel.cpu(),
                                 self.visemes.cpu(), out, progress, steps=cfg.motion_steps, lr=cfg.lr_motion,
                                 noise=cfg.audio_noise, velocity_weight=cfg.motion_velocity_weight,
                                 gap_weight=cfg.motion_gap_weight, seed=cfg.seed)  # host: setup
        self.model.to(self.device)
        self.stats = {name: GradStats(len(self.model.branch(b)), self.device) for name, b in BRANCHES}
        face = g.means[g.branch == FACE]
        self.extent = float((face.max(0).values - face.min(0).values).norm())
        self._targets(motion)

    def restore(self, tensors: dict[str, torch.Tensor], meta: dict, path: Path) -> None:
        self.model = model_from_tensors(tensors, path)
        motion = tracked_motion(self.host_ds, self.model.rig) if self.model.rig is not None else None
        self.model.to(self.device)
        names = [n for n, _ in BRANCHES] + (["torso"] if self.model.torso is not None else [])
        self.stats = {name: GradStats.from_state({k: tensors[f"densify.{name}.{k}"] for k in ("grad_sum", "count")},
                                                 self.device) for name in names}
        self.extent = float(meta["extent"])
        self._targets(motion)

    def _targets(self, motion: torch.Tensor | None) -> None:
        self.motion = None if motion is None else motion.to(self.device)
        lips = LipTargets.of(self.host_ds, self.train_ids, motion) if self.cfg.lip_landmark_weight > 0 else None
        self.lip_targets = None if lips is None else lips.to(self.device)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {**model_tensors(self.model), "background": self.ds.background, "K": self.ds.K}
        for name in self.stats:
            out.update({f"densify.{name}.{k}": v for k, v in self.stats[name].state().items()})
        return out

    def state_meta(self) -> dict:
        return {"extent": self.extent, "speech": self.ds.has_speech, "n_face": len(self.model.face),
                "n_mouth": len(self.model.mouth),
                "n_torso": 0 if self.model.torso is None else len(self.model.torso)}

    def saved(self) -> None:
        self.model.rebind()  # from the saved points, as a run resumed here binds

    def log_fields(self) -> dict:
        out = {"n_face": len(self.model.face), "n_mouth": len(self.model.mouth)}
        if self.model.torso is not None:
            out["n_torso"] = len(self.model.torso)
        return out

    def finish(self, out: Path) -> None:
        save_ply(out / "canonical.ply", self.model.gaussians())

    @classmethod
    def open_trained(cls, root: Path, tensors: dict[str, torch.Tensor], meta: dict,
                     device: torch.device) -> TrainedGaussianAvatar:
        return open_gaussian_avatar(root, tensors, meta, device)

    # -- schedule ----------------------------------------------------------------------
    def param_groups(self) -> list[dict]:
        return head_groups(self.model, self.cfg)

    def learning_rate(self, group: dict, step: int) -> float:
        """3DGS's exponential decay of the centres' rate to 1/100 and of the networks' to
        1/10, over the head's iterations (the torso's groups over the torso stage)."""
        cfg = self.cfg
        if group["name"].startswith("torso."):
            t = min(max(step - cfg.iterations, 0) / max(cfg.torso_steps - 1, 1), 1.0)
        else:
            t = min(step / max(cfg.iterations - 1, 1), 1.0)
        if group["name"].endswith(".means"):
            return group["base_lr"] * 0.01**t
        if group["name"].endswith((".mlp", ".planes")):
            return group["base_lr"] * 0.1**t
        return group["base_lr"]

    def stage_at(self, step: int) -> str:
        return stage_at(self.cfg, step)

    def milestones(self) -> set[int]:
        return {self.cfg.iterations}  # the finished head, before the torso stage

    def active_sh_degree(self, step: int) -> int:
        """One more SH band every iterations / (2 (degree + 1)) steps (3DGS ramps every 1000)."""
        return min(self.cfg.sh_degree, step * 2 * (self.cfg.sh_degree + 1) // max(self.cfg.iterations, 1))

    def before_step(self, step: int, optim: torch.optim.Optimizer, progress: bool) -> dict:
        if step != self.cfg.iterations or self.model.torso is not None:
            return {}
        event = {"floaters_pruned": self.start_torso(optim, progress)}
        if self.model.torso is None:  # nothing to fit: the run ends with the head
            event["finished"] = True
        return event

    # -- one step ----------------------------------------------------------------------
    def motion_at(self, i: int, key: int) -> torch.Tensor:
        """[K] the motion codes that drive frame i: its tracked codes, or (without tracked
        faces) MotionNet's codes from its speech, learned through the render, with noise
        and dropout drawn from the sample's key (the same in any batch, on any process)."""
        if self.motion is not None:
            return self.motion[i]
        r, h, n = int(self.ds.frames[i]["frame_index"]), self.cfg.audio_window, self.mel.shape[0]
        lo, hi = max(r - h, 0), min(r + h + 1, n)  # wider than MotionNet's reach: same as the whole clip
        mel = self.mel[lo:hi]
        seed = self.cfg.seed * 104_729 + key + 1
        if self.cfg.audio_noise > 0:
            noise = torch.Generator().manual_seed(seed)
            mel = mel + self.cfg.audio_noise * torch.randn(mel.shape, generator=noise, device="cpu").to(mel)
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(seed)  # MotionNet's dropout draws from the global generator
            return self.model.motion_net.train()(mel, self.visemes[lo:hi])[r - lo]

    def _drive(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(motion [B, K], eye openness [B, 1]) of the batch's frames."""
        motion = torch.stack([self.motion_at(s.index, s.key) for s in batch.samples])
        eye = torch.tensor([[f.eye_openness] for f in batch.frames], device=self.device)
        return motion, eye

    def _layers(self, branch: int, motion: torch.Tensor | None, eye: torch.Tensor,
                viewmats: list[tuple[torch.Tensor, torch.Tensor]],
                sh: int, frozen: bool = False) -> tuple[list[Layer], torch.Tensor]:
        """The branch deformed for every view of the batch (one pass of its head) and
        rendered into each view's camera (viewmats: B ([4, 4] world-to-camera, [3, 3] K)); and
        the mean deformation penalty."""
        model, ds = self.model, self.ds
        gs, penalty = model.deformed_batch(branch, motion, eye, frozen=frozen)
        gs = gs * len(viewmats) if len(gs) == 1 else gs  # undeformed: one set for every view
        return [model.render_layer(g, v, K, ds.size, sh, self.cfg.backend) for g, (v, K) in zip(gs, viewmats)], penalty

    def render(self, batch: Batch, step: int) -> dict:
        """{"rgb", "alpha": [B, H, W, *] the rendered layers over what lies behind them,
        "face", "mouth" (and in the torso stage "torso"): B layers each (None for a branch
        the stage leaves out), "deformation": [] mean penalty}."""
        stage = stage_at(self.cfg, step)
        viewmats = [(self.ds.viewmat(s.index), self.ds.intrinsics(s.index))  # once per view, shared by the branches
                    for s in batch.samples]
        if stage == "torso":
            with torch.no_grad():  # the finished head
                motion, eye = self._drive(batch)
                face, _ = self._layers(FACE, motion, eye, viewmats, self.cfg.sh_degree)
                mouth, _ = self._layers(MOUTH, motion, eye, viewmats, self.cfg.sh_degree)
            torso, penalty = [], torch.zeros((), device=self.device)
            for s, f, (v, K) in zip(batch.samples, batch.frames, viewmats):
                g, pen = self.model.torso.deformed(self.model.torso.motion_in(f.c2w, s.index))
                torso.append(self.model.render_layer(g, v, K, self.ds.size, self.active_sh_degree(step),
                                                     self.cfg.backend))
                torso[-1].means2d.retain_grad()
                penalty = penalty + pen / len(batch)
            unders = [torso_under(t, self.ds.plate(s.index)) for t, s in zip(torso, batch.samples)]
            out = {"face": face, "mouth": mouth, "torso": torso, "deformation": penalty}
        else:
            motion, eye = self._drive(batch)
            trains, deforms = STAGE_TRAINS[stage], STAGE_DEFORMS[stage]
            out, penalty = {}, torch.zeros((), device=self.device)
            for k, (name, b) in enumerate(BRANCHES):
                if stage in ("mouth", "face") and not trains[k]:
                    out[name] = [None] * len(batch)  # the other branch is not rendered in its single-branch stage
                    continue
                out[name], pen = self._layers(b, motion if deforms[k] else None, eye, viewmats,
                                              self.active_sh_degree(step), frozen=not trains[k])
                for layer in out[name]:
                    layer.means2d.retain_grad()
                penalty = penalty + pen
            out["deformation"] = penalty
            unders = [behind_head(f, self.ds.plate(f.index)) for f in batch.frames]
        images, alphas = zip(*(self._over(fl, ml, under) for fl, ml, under in zip(out["face"], out["mouth"], unders)))
        if "torso" in out:
            alphas = [coverage(a, t.alpha) for a, t in zip(alphas, out["torso"])]
        return {**out, "rgb": torch.stack(images), "alpha": torch.stack(alphas)}

    @staticmethod
    def _over(face: Layer | None, mouth: Layer | None, under: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The layers rendered (either may be None) over `under`: (image, coverage)."""
        if face is not None and mouth is not None:
            return composite(face, mouth, under)
        layer = face if face is not None else mouth
        return layer.rgb + (1 - layer.alpha) * under, layer.alpha

    def loss(self, batch: Batch, outputs: dict, step: int) -> tuple[torch.Tensor, dict]:
        cfg, stage = self.cfg, stage_at(self.cfg, step)
        if stage == "torso":
            terms, scores = zip(*(self._torso_loss(f, outputs["rgb"][j], outputs["alpha"][j])
                                  for j, f in enumerate(batch.frames)))
            loss = torch.stack(terms).mean() + cfg.deform_weight * outputs["deformation"]
            return loss, {"psnr_torso": sum(scores) / len(scores)}
        terms, scores = zip(*(self._head_loss(stage, f, outputs["face"][j], outputs["mouth"][j], outputs["rgb"][j],
                                              outputs["alpha"][j]) for j, f in enumerate(batch.frames)))
        loss = torch.stack(terms).mean() + cfg.deform_weight * outputs["deformation"]
        info = {"psnr_head": sum(scores) / len(scores)}
        if self.lip_targets is not None:
            lip_loss, info["lip_landmark_px"] = self.lip_landmark_loss_at(batch)
            loss = loss + cfg.lip_landmark_weight * lip_loss / self.ds.size
        return loss, info

    def _head_loss(self, stage: str, f: Frame, face: Layer | None, mouth: Layer | None, rgb: torch.Tensor,
                   alpha: torch.Tensor) -> tuple[torch.Tensor, float]:
        """One view's loss in a head stage (and the PSNR of what it fits, on the head)."""
        cfg, ds = self.cfg, self.ds
        gt, masks = f.image, f.masks
        lips = lip_weights(ds, f.index)
        weight = 1 + cfg.lip_weight * lips if lips is not None else None
        inner_mouth = dilate(masks["mouth"], max(1, ds.size // 128))
        if stage == "mouth":
            m = inner_mouth
            loss = (rgb - gt).abs().mean(-1)[m].mean() if m.any() else rgb.sum() * 0
            loss = loss + cfg.alpha_weight * (1 - mouth.alpha[..., 0][m]).mean() if m.any() else loss
            shown = torch.where(m[..., None], rgb, gt)
        elif stage == "face":
            # The face layer over the frame's own inner mouth: its alpha must open there.
            shown = face.rgb + (1 - face.alpha) * torch.where(inner_mouth[..., None], gt,
                                                              behind_head(f, ds.plate(f.index)))
            target_alpha = (masks["head"] & ~inner_mouth).float()
            loss = photometric_loss(shown, gt, cfg.ssim_weight, weight)
            loss = loss + cfg.alpha_weight * (face.alpha[..., 0] - target_alpha).abs().mean()
        else:
            loss = photometric_loss(rgb, gt, cfg.ssim_weight, weight)
            loss = loss + cfg.alpha_weight * (alpha[..., 0] - masks["head"].float()).abs().mean()
            shown = rgb
        return loss, psnr(shown.detach(), gt, masks["head"] if masks["head"].any() else None)

    def _torso_loss(self, f: Frame, rgb: torch.Tensor, alpha: torch.Tensor) -> tuple[torch.Tensor, float]:
        """One view's torso-stage loss: the finished head over the torso over the plate
        against the whole frame, and head-or-torso alpha against the person mask."""
        cfg = self.cfg
        gt, person, region = f.image, f.masks["person"], f.masks["torso"]
        # The silhouette outside the head's mask: inside it, where the head's alpha is
        # partial (hair), the torso must not grow up behind the head to fill it.
        outside_head = ~f.masks["head"]
        silhouette = (alpha[..., 0] - person.float()).abs()[outside_head].mean() if outside_head.any() else 0
        loss = photometric_loss(rgb, gt, cfg.ssim_weight) + cfg.silhouette_weight * silhouette
        return loss, psnr(rgb.detach(), gt, region if region.any() else None)

    def lip_landmark_loss_at(self, batch: Batch) -> tuple[torch.Tensor, float]:
        """The lip-landmark loss of the batch: per view, its frame plus `lip_landmark_frames
        - 1` other training frames drawn from (seed, the sample's key), each with its
        tracked motion; the mean over all of them. It renders nothing, so every stage trains
        the face head's share of the lips on many frames per step, the static and mouth
        stages included."""
        cfg, lt = self.cfg, self.lip_targets
        rows, eyes = [], []
        for s, f in zip(batch.samples, batch.frames):
            g = torch.Generator().manual_seed(cfg.seed * 15_485_863 + s.key)
            rows.append(torch.cat([torch.tensor([self.train_ids.index(s.index)], device="cpu"),  # host: row numbers
                                   torch.randint(len(self.train_ids), (max(cfg.lip_landmark_frames - 1, 0),),
                                                 generator=g, device="cpu")]))
            eyes.append(torch.cat([torch.tensor([[f.eye_openness]], device=self.device), lt.eye[rows[-1][1:]]]))
        rows = torch.cat(rows)
        return lip_landmark_loss(self.model, lt.lips, lt.motion[rows], torch.cat(eyes), lt.viewmat[rows], lt.K[rows],
                                 lt.target[rows])

    def after_backward(self, batch: Batch, outputs: dict) -> None:
        names = ("torso",) if "torso" in outputs else tuple(name for name, _ in BRANCHES)
        for name in names:
            self.stats[name].update([layer for layer in outputs[name] if layer is not None], self.cfg.size,
                                    views=batch.step_views)

    # -- structure ---------------------------------------------------------------------
    def after_step(self, steps_done: int, optim: torch.optim.Optimizer, progress: bool) -> dict:
        """Body refinement, densification of head and torso, and the opacity reset, each at
        its point of the schedule."""
        cfg, event, step = self.cfg, {}, steps_done - 1
        # Body tracks are refined part-way (the rest of the stage fits the refined body) and
        # after the last step (every frame tracked against the finished torso).
        refine_at = {cfg.iterations + max(1, round(cfg.body_refine_at * cfg.torso_steps)), cfg.total_steps} \
            if cfg.body_refine_at > 0 else set()
        if steps_done in refine_at and self.model.torso is not None:
            event["body_refined"] = self.refine_body(progress)
        if int(cfg.densify_from * cfg.iterations) <= steps_done < int(cfg.densify_until * cfg.iterations) \
                and steps_done % cfg.densify_every == 0:
            event["densify"] = self.densify(step, optim)
            self.model.rebind()
        torso_from = cfg.iterations + int(cfg.densify_from * cfg.torso_steps)
        torso_until = cfg.iterations + int(cfg.densify_until * cfg.torso_steps)
        if self.model.torso is not None and torso_from <= steps_done < torso_until \
                and steps_done % cfg.densify_every == 0:
            event["densify"] = self.densify_torso(step, optim)
        if cfg.opacity_reset_at > 0 and steps_done == int(cfg.opacity_reset_at * cfg.iterations):
            for name, b in BRANCHES:
                reset_opacity(self.model.branch(b), name, optim)
            event["opacity_reset"] = True
        return event

    def densify(self, step: int, optim: torch.optim.Optimizer) -> dict:
        """One densification round of the branches the stage of `step` trains."""
        cfg = self.cfg
        stage = stage_at(cfg, step)
        counts = {}
        g = torch.Generator().manual_seed(cfg.seed * 7919 + step)
        for k, (name, b) in enumerate(BRANCHES):
            if not STAGE_TRAINS[stage][k]:
                continue
            p = self.model.branch(b)
            budget = cfg.max_gaussians - len(self.model)
            counts[name] = densify_and_prune(p, name, optim, self.stats[name], grad_threshold=cfg.densify_grad,
                                             extent=self.extent, percent_dense=cfg.percent_dense,
                                             prune_opacity=cfg.prune_opacity, budget=budget, generator=g)
            self.stats[name] = GradStats(len(p), self.device)
        return counts

    def densify_torso(self, step: int, optim: torch.optim.Optimizer) -> dict:
        """One densification round of the torso (3DGS rules, its own budget)."""
        cfg, torso = self.cfg, self.model.torso
        g = torch.Generator().manual_seed(cfg.seed * 7919 + step)
        counts = densify_and_prune(torso.params, "torso", optim, self.stats["torso"],
                                   grad_threshold=cfg.densify_grad, extent=self.extent,
                                   percent_dense=cfg.percent_dense, prune_opacity=cfg.prune_opacity,
                                   budget=cfg.max_torso_gaussians - len(torso), generator=g)
        self.stats["torso"] = GradStats(len(torso), self.device)
        return {"torso": counts}

    def prune_floaters(self, optim: torch.optim.Optimizer, views: int = 16, share: float = 0.8) -> int:
        """Remove face-branch Gaussians whose centres fall outside the person (its mask
        dilated by 1 % of the frame) in at least `share` of the training views that see
        them: they can only be painting background, and show as blotches around the head
        in novel views. Returns how many were removed."""
        ds, p = self.ds, self.model.face
        picks = self.train_ids[:: max(1, len(self.train_ids) // views)][:views]
        means = p.means.detach()
        outside, seen = torch.zeros(len(means), device=self.device), torch.zeros(len(means), device=self.device)
        for i in picks:
            px = project(means, ds.viewmat(i), ds.intrinsics(i)).round().long()
            ok = ((px >= 0) & (px < ds.size)).all(1)
            person = dilate(ds[i].masks["person"], max(1, ds.size // 100))
            outside[ok] += (~person[px[ok, 1], px[ok, 0]]).float()
            seen[ok] += 1
        floaters = (seen > 0) & (outside >= share * seen)
        if floaters.any():
            empty = {k: getattr(p, k).detach()[:0] for k in BranchParams.NAMES}
            edit_branch(p, "face", optim, ~floaters, empty)
            self.stats["face"] = GradStats(len(p), self.device)
            self.model.rebind()
        return int(floaters.sum())

    def start_torso(self, optim: torch.optim.Optimizer, progress: bool = False) -> int:
        """Prune the head's floaters, create the torso branch (recon/torso.py) and its
        optimizer groups (progress: a bar while the body is tracked). Returns how many
        floaters were pruned."""
        removed = self.prune_floaters(optim)
        if removed:
            print(f"avatar train: removed {removed} floaters outside the person", file=sys.stderr)
        if len(self.host_ds.cameras) > 1:  # the body is tracked in one camera's image (recon/torso.py)
            print("avatar train: the torso branch follows one camera's view of the body; a rig's dataset has no "
                  "torso (its frames keep their own pixels below the head)", file=sys.stderr)
            return removed
        torso = init_torso(self.host_ds, self.train_ids, self.cfg.init_torso_points, seed=self.cfg.seed,
                           progress=progress)
        if torso is None:
            print("avatar train: the frames show no body below the head; no torso", file=sys.stderr)
            return removed
        self.model.torso = torso.to(self.device)
        for group in torso_groups(torso, self.cfg):
            optim.add_param_group(group)
        self.stats["torso"] = GradStats(len(torso), self.device)
        return removed

    def refine_body(self, progress: bool = False) -> dict:
        """Refine every frame's body track through the renderer (recon/torso.py:
        refine_tracks); returns the mean turn of the corrections (degrees)."""
        torso = self.model.torso
        tracks = refine_tracks(self.model, self.ds, backend=self.cfg.backend, progress=progress)
        change = tracks @ torch.linalg.inv(torso.tracks)
        angle = torch.arccos(((change[:, :3, :3].diagonal(dim1=1, dim2=2).sum(-1) - 1) / 2).clamp(-1, 1))
        torso.tracks.copy_(tracks)
        return {"mean_turn_deg": round(float(angle.mean().rad2deg()), 3)}
