"""`avatar train`: fit the two-branch talking Gaussian avatar to a captured dataset.

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

Checkpoints are atomic and periodic; `--resume` continues from the last one, with the
same frame order and randomness as an uninterrupted run.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from avatar.errors import AvatarError
from avatar.io import atomic_path, write_json
from capture.masks import mouth_opening
from capture.pose import pseudo_huber
from capture.tracking import LIPS, OUTER_LIPS, RIGID

from .avatar_dir import CHECKPOINT, model_from_tensors, read_json_lines, save_avatar
from .checkpoint import load_checkpoint
from .conditioning import normalize_mel, viseme_features
from .config import TrainConfig, preset
from .dataset import Dataset, behind_head, dataset_fingerprint, dilate
from .deform import DeformInputs
from .densify import GradStats, densify_and_prune, edit_branch, reset_opacity
from .gaussians import FACE, MOUTH, save_ply
from .init import init_gaussians
from .losses import photometric_loss, psnr
from .model import AvatarModel, BranchParams, composite, coverage, torso_under
from .motion import fit_motion_stage, fit_rig, has_tracked_faces, tracked_motion
from .raster.api import check_backend
from .torso import TorsoModel, init_torso, refine_tracks

BRANCHES = (("face", FACE), ("mouth", MOUTH))


def _gaussian_lrs(cfg: TrainConfig) -> dict[str, float]:
    return {"means": cfg.lr_means, "quats": cfg.lr_quats, "log_scales": cfg.lr_scales,
            "opacity_logits": cfg.lr_opacity, "sh_dc": cfg.lr_sh, "sh_rest": cfg.lr_sh / 20}


def torso_groups(torso: TorsoModel, cfg: TrainConfig) -> list[dict]:
    """The torso's parameter groups ("torso.means", ..., "torso.mlp")."""
    lrs = _gaussian_lrs(cfg)
    groups = [{"params": [getattr(torso.params, k)], "name": f"torso.{k}", "lr": lrs[k]} for k in BranchParams.NAMES]
    groups.append({"params": [*torso.blend.parameters(), *torso.offset.parameters()], "name": "torso.mlp",
                   "lr": cfg.lr_deform})
    for g in groups:
        g["base_lr"] = g["lr"]
    return groups


def make_optimizer(model: AvatarModel, cfg: TrainConfig) -> torch.optim.Adam:
    """Adam with one named group per tensor ("face.means", ..., "face_deform", ...)."""
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
    for g in groups:
        g["base_lr"] = g["lr"]
    if model.torso is not None:
        groups += torso_groups(model.torso, cfg)
    return torch.optim.Adam(groups, eps=1e-15)


def optimizer_tensors(optim: torch.optim.Adam) -> dict[str, torch.Tensor]:
    out = {}
    for g in optim.param_groups:
        for j, p in enumerate(g["params"]):
            st = optim.state.get(p)
            if st:
                out[f"optim.{g['name']}.{j}.exp_avg"] = st["exp_avg"]
                out[f"optim.{g['name']}.{j}.exp_avg_sq"] = st["exp_avg_sq"]
                step = torch.as_tensor(st["step"], dtype=torch.float32, device="cpu")  # Adam keeps it on the host
                out[f"optim.{g['name']}.{j}.step"] = step.reshape(1)
    return out


def load_optimizer_tensors(optim: torch.optim.Adam, tensors: dict[str, torch.Tensor]) -> None:
    for g in optim.param_groups:
        for j, p in enumerate(g["params"]):
            key = f"optim.{g['name']}.{j}"
            if f"{key}.exp_avg" in tensors:
                optim.state[p] = {"step": tensors[f"{key}.step"].reshape(()).clone(),
                                  "exp_avg": tensors[f"{key}.exp_avg"].to(p.device, copy=True),
                                  "exp_avg_sq": tensors[f"{key}.exp_avg_sq"].to(p.device, copy=True)}


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
    (OpenCV), one per leading index or one for all; K: [3, 3]."""
    cam = xyz @ viewmat[..., :3, :3].transpose(-1, -2) + viewmat[..., None, :3, 3]
    uv = cam @ K.T
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
    offset = (project(face[rigid], ds.viewmat(i), ds.K) - lm[rigid]).mean(0)
    return lm[LIPS] + offset


def lip_landmark_loss(model: AvatarModel, lips: torch.Tensor, motion: torch.Tensor, eye: torch.Tensor,
                      viewmat: torch.Tensor, K: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Robust pixel distance between the lip landmarks carried by the face deformation (the
    mesh's motion plus the residual head) and where the frames' lips are: (loss [] in
    pixels, mean distance in pixels), over B frames.

    lips: [L, 3] canonical landmarks (mesh vertices LIPS); motion: [B, K]; eye: [B, 1];
    viewmat: [B, 4, 4]; K: [3, 3]; target: [B, L, 2] pixels.
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
    eye: torch.Tensor  # [T, 1]
    motion: torch.Tensor  # [T, K] tracked motion codes

    @classmethod
    def of(cls, ds: Dataset, ids: list[int], motion: torch.Tensor | None) -> "LipTargets | None":
        """None when the dataset has no tracked motion (motion [len(ds), K] is None: ER-NeRF imports)."""
        if motion is None:
            return None
        face = ds.face_geometry()
        return cls(lips=face[LIPS], target=torch.stack([lip_landmark_target(ds, i, face) for i in ids]),
                   viewmat=torch.stack([ds.viewmat(i) for i in ids]),
                   eye=torch.tensor([[float(ds.frames[i].get("eye_openness", 1.0))] for i in ids]),
                   motion=motion[ids])

    def to(self, device: torch.device | str) -> "LipTargets":
        return LipTargets(**{k: getattr(self, k).to(device) for k in ("lips", "target", "viewmat", "eye", "motion")})


class Trainer:
    """State of one training run (model, optimizer, statistics) and its steps."""

    def __init__(self, dataset: Path, out: Path, cfg: TrainConfig | None, resume: bool, progress: bool = True,
                 force: bool = False, overrides: dict | None = None, device: torch.device | str = "cpu"):
        self.out = Path(out)
        self.device = device = torch.device(device)
        ckpt = self.out / CHECKPOINT
        if ckpt.exists() and not resume:
            raise AvatarError(self.out, "already holds a trained avatar",
                              "pass --resume to continue it, or choose another --out")
        resumed = load_checkpoint(ckpt) if resume and ckpt.exists() else None
        if resumed is not None:
            cfg = resume_config(ckpt, resumed[1], cfg, Path(dataset), force, overrides or {})
        self.cfg = cfg = cfg or preset("cpu", **(overrides or {}))
        self.dataset_fingerprint = dataset_fingerprint(Path(dataset))
        check_backend(cfg.backend, device)
        self.ds = Dataset(dataset, size=cfg.size, cache_frames=cfg.cache_frames, check_images=True, device=device)
        # The model is built on the host, from the dataset read there, and then moved.
        self.host_ds = self.ds.on("cpu", cache_frames=16)
        mel, visemes = normalize_mel(self.ds.features["mel"]), viseme_features(self.ds.features)
        self.mel, self.visemes = mel.to(device), visemes.to(device)
        self.train_ids, self.held_out = self.ds.split()
        self.step = 0
        if resumed is not None:
            tensors, meta = resumed
            self.model = model_from_tensors(tensors, ckpt)
            motion = tracked_motion(self.host_ds, self.model.rig) if self.model.rig is not None else None
            self.model.to(device)
            self.optim = make_optimizer(self.model, cfg)
            load_optimizer_tensors(self.optim, tensors)
            self.stats = {name: GradStats.from_state({k: tensors[f"densify.{name}.{k}"] for k in ("grad_sum", "count")},
                                                     device)
                          for name in [n for n, _ in BRANCHES] + (["torso"] if self.model.torso is not None else [])}
            self.step, self.extent = int(meta["step"]), float(meta["extent"])
            for stale in self.out.glob(".*.tmp*"):  # a write cut short by a crash
                stale.unlink()
            self._trim_metrics()
            print(f"avatar train: resuming {self.out} from step {self.step}", file=sys.stderr)
        else:
            if resume:
                print(f"avatar train: {ckpt} not found; starting from the beginning", file=sys.stderr)
            torch.manual_seed(cfg.seed)
            g = init_gaussians(self.host_ds, n_volume=cfg.init_volume_points, n_mouth=cfg.init_mouth_points,
                               sh_degree=cfg.sh_degree, seed=cfg.seed)
            rig, motion = (fit_rig(self.host_ds, self.train_ids, cfg.motion_components, cfg.motion_falloff)
                           if has_tracked_faces(self.host_ds) else (None, None))
            self.model = AvatarModel(g, rig, motion_dim=cfg.motion_components, visemes=visemes.shape[1],
                                     window=cfg.audio_window)
            if rig is not None:
                self.fit_motion_net(mel, visemes, motion, progress)
            self.model.to(device)
            self.optim = make_optimizer(self.model, cfg)
            self.stats = {name: GradStats(len(self.model.branch(b)), self.device) for name, b in BRANCHES}
            face = g.means[g.branch == FACE]
            self.extent = float((face.max(0).values - face.min(0).values).norm())
        self.motion = None if motion is None else motion.to(device)
        lips = LipTargets.of(self.host_ds, self.train_ids, motion) if cfg.lip_landmark_weight > 0 else None
        self.lip_targets = None if lips is None else lips.to(device)
        self.out.mkdir(parents=True, exist_ok=True)

    def fit_motion_net(self, mel: torch.Tensor, visemes: torch.Tensor, motion: torch.Tensor, progress: bool) -> None:
        """The speech-to-motion stage (on the host, before the model moves): MotionNet fitted
        to the training frames' tracked codes (motion [len(ds), K]) from the clip's speech
        (mel, visemes), its range calibrated out of sample (motion.fit_motion_stage);
        logged to motion.json."""
        cfg = self.cfg
        rows = torch.tensor([int(self.ds.frames[i]["frame_index"]) for i in self.train_ids])
        opening = mouth_opening(np.stack([self.ds.landmarks(i) for i in self.train_ids]))
        self.model.motion_net.set_closed_mouth(self.model.rig.basis, motion[self.train_ids], opening)
        bar = tqdm(total=cfg.motion_steps, desc="speech -> motion", unit="it", disable=not progress, file=sys.stderr,
                   dynamic_ncols=True)
        t0 = time.perf_counter()
        result = fit_motion_stage(self.model.motion_net, mel, visemes, motion[self.train_ids], rows,
                                  cfg.motion_steps, lr=cfg.lr_motion, noise=cfg.audio_noise,
                                  velocity_weight=cfg.motion_velocity_weight, seed=cfg.seed,
                                  progress=lambda step, loss: (bar.update(1),
                                                               bar.set_postfix(loss=f"{loss:.4f}", refresh=False)))
        bar.close()
        self.out.mkdir(parents=True, exist_ok=True)
        write_json(self.out / "motion.json", {**result, "seconds": time.perf_counter() - t0,
                                              "frames": len(rows), "codes": motion.shape[1]})

    def motion_at(self, i: int, step: int) -> torch.Tensor:
        """[K] the motion codes that drive frame i: its tracked codes, or (without tracked
        faces) MotionNet's codes from its speech, learned through the render."""
        if self.motion is not None:
            return self.motion[i]
        r, h, n = int(self.ds.frames[i]["frame_index"]), self.cfg.audio_window, self.mel.shape[0]
        lo, hi = max(r - h, 0), min(r + h + 1, n)  # wider than MotionNet's reach: same as the whole clip
        mel = self.mel[lo:hi]
        if self.cfg.audio_noise > 0:
            noise = torch.Generator().manual_seed(self.cfg.seed * 104_729 + step + 1)
            mel = mel + self.cfg.audio_noise * torch.randn(mel.shape, generator=noise, device="cpu").to(mel)
        return self.model.motion_net.train()(mel, self.visemes[lo:hi])[r - lo]

    # -- bookkeeping -------------------------------------------------------------------
    def _trim_metrics(self) -> None:
        """Drop metric lines logged after the checkpoint we resume from."""
        path = self.out / "metrics.jsonl"
        lines = [r for r in read_json_lines(path) if r["step"] <= self.step]
        with atomic_path(path) as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in lines))

    def meta(self) -> dict:
        return {"step": self.step, "config": self.cfg.to_dict(), "dataset": str(self.ds.root.resolve()),
                "dataset_fingerprint": self.dataset_fingerprint,
                "fps": float(self.ds.meta.get("fps", 25.0)), "size": self.cfg.size, "extent": self.extent,
                "n_face": len(self.model.face), "n_mouth": len(self.model.mouth),
                "n_torso": 0 if self.model.torso is None else len(self.model.torso)}

    def save(self) -> Path:
        extra = {"background": self.ds.background, "K": self.ds.K, **optimizer_tensors(self.optim)}
        for name in self.stats:
            extra.update({f"densify.{name}.{k}": v for k, v in self.stats[name].state().items()})
        return save_avatar(self.out, self.model, self.meta(), extra)

    # -- one step ----------------------------------------------------------------------
    def frame_for_step(self, step: int) -> int:
        """Shuffled epochs, a pure function of (seed, step): a resumed run sees the same frames."""
        n = len(self.train_ids)
        epoch, k = divmod(step, n)
        g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + epoch)
        perm = torch.randperm(n, generator=g, device="cpu")
        return self.train_ids[int(perm[k])]

    def set_learning_rates(self, step: int) -> None:
        cfg = self.cfg
        head_t = min(step / max(cfg.iterations - 1, 1), 1.0)
        torso_t = min(max(step - cfg.iterations, 0) / max(cfg.torso_steps - 1, 1), 1.0)
        for g in self.optim.param_groups:
            t = torso_t if g["name"].startswith("torso.") else head_t
            if g["name"].endswith(".means"):
                g["lr"] = g["base_lr"] * 0.01**t  # 3DGS's exponential decay to 1/100
            elif g["name"].endswith((".mlp", ".planes")):
                g["lr"] = g["base_lr"] * 0.1**t

    def active_sh_degree(self, step: int) -> int:
        """One more SH band every iterations / (2 (degree + 1)) steps (3DGS ramps every 1000)."""
        return min(self.cfg.sh_degree, step * 2 * (self.cfg.sh_degree + 1) // max(self.cfg.iterations, 1))

    def prune_floaters(self, views: int = 16, share: float = 0.8) -> int:
        """Remove face-branch Gaussians whose centres fall outside the person (its mask
        dilated by 1 % of the frame) in at least `share` of the training views that see
        them: they can only be painting background, and show as blotches around the head
        in novel views. Returns how many were removed."""
        ds, p = self.ds, self.model.face
        picks = self.train_ids[:: max(1, len(self.train_ids) // views)][:views]
        means = p.means.detach()
        outside, seen = torch.zeros(len(means), device=self.device), torch.zeros(len(means), device=self.device)
        for i in picks:
            px = project(means, ds.viewmat(i), ds.K).round().long()
            ok = ((px >= 0) & (px < ds.size)).all(1)
            person = dilate(ds[i].masks["person"], max(1, ds.size // 100))
            outside[ok] += (~person[px[ok, 1], px[ok, 0]]).float()
            seen[ok] += 1
        floaters = (seen > 0) & (outside >= share * seen)
        if floaters.any():
            empty = {k: getattr(p, k).detach()[:0] for k in BranchParams.NAMES}
            edit_branch(p, "face", self.optim, ~floaters, empty)
            self.stats["face"] = GradStats(len(p), self.device)
            self.model.rebind()
        return int(floaters.sum())

    def start_torso(self, progress: bool = False) -> int:
        """Prune the head's floaters, create the torso branch (recon/torso.py) and its
        optimizer groups (progress: a bar while the body is tracked). Returns how many
        floaters were pruned."""
        removed = self.prune_floaters()
        if removed:
            print(f"avatar train: removed {removed} floaters outside the person", file=sys.stderr)
        torso = init_torso(self.host_ds, self.train_ids, self.cfg.init_torso_points, seed=self.cfg.seed,
                           progress=progress)
        if torso is None:
            print("avatar train: the frames show no body below the head; no torso", file=sys.stderr)
            return removed
        self.model.torso = torso.to(self.device)
        for group in torso_groups(torso, self.cfg):
            self.optim.add_param_group(group)
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

    def torso_loss_at(self, step: int) -> tuple[torch.Tensor, dict, list]:
        """The torso stage's loss: the finished head (no gradients) over the torso over the
        plate against the whole frame, and head-or-torso alpha against the person mask."""
        cfg, ds, model = self.cfg, self.ds, self.model
        i = self.frame_for_step(step)
        f = ds[i]
        with torch.no_grad():
            motion, eye = self.motion_at(i, step), torch.tensor([f.eye_openness], device=self.device)
            face, mouth = (model.render_layer(model.deformed(b, motion, eye)[0], ds.viewmat(i), ds.K, ds.size,
                                              cfg.sh_degree, cfg.backend) for b in (FACE, MOUTH))
        g, penalty = model.torso.deformed(model.torso.motion_in(f.c2w, i))
        torso = model.render_layer(g, ds.viewmat(i), ds.K, ds.size, self.active_sh_degree(step), cfg.backend)
        torso.means2d.retain_grad()
        pred, head_alpha = composite(face, mouth, torso_under(torso, ds.background))
        alpha = coverage(head_alpha, torso.alpha)
        gt, person, region = f.image, f.masks["person"], f.masks["torso"]
        # The silhouette outside the head's mask: inside it, where the head's alpha is
        # partial (hair), the torso must not grow up behind the head to fill it.
        outside_head = ~f.masks["head"]
        silhouette = (alpha[..., 0] - person.float()).abs()[outside_head].mean() if outside_head.any() else 0
        loss = photometric_loss(pred, gt, cfg.ssim_weight) + cfg.silhouette_weight * silhouette \
            + cfg.deform_weight * penalty
        info = {"stage": "torso", "frame": i, "psnr": psnr(pred.detach(), gt, region if region.any() else None)}
        return loss, info, [torso]

    def optimize(self, step: int) -> tuple[torch.Tensor, dict]:
        """One optimizer step at `step`: its loss, gradients, densification statistics and
        update. Returns the loss and the step's info."""
        loss, info, layers = self.loss_at(step)
        if not torch.isfinite(loss):
            raise AvatarError(self.out, f"training diverged at step {step} (loss {float(loss)})",
                              "resume from the last checkpoint with --resume after lowering learning rates")
        loss.backward()
        names = ["torso"] if info["stage"] == "torso" else [name for name, _ in BRANCHES]
        for name, layer in zip(names, layers):
            if layer is not None:
                self.stats[name].update(layer, self.cfg.size)
        self.optim.step()
        self.optim.zero_grad(set_to_none=True)
        return loss, info

    def loss_at(self, step: int) -> tuple[torch.Tensor, dict, list]:
        cfg, ds, model = self.cfg, self.ds, self.model
        stage = stage_at(cfg, step)
        if stage == "torso":
            return self.torso_loss_at(step)
        i = self.frame_for_step(step)
        f = ds[i]
        gt, masks = f.image, f.masks
        under = behind_head(f, ds.background)
        motion = self.motion_at(i, step)
        eye = torch.tensor([f.eye_openness], device=self.device)
        lips = lip_weights(ds, i)
        weight = 1 + cfg.lip_weight * lips if lips is not None else None
        inner_mouth = dilate(masks["mouth"], max(1, ds.size // 128))
        trains, deforms = STAGE_TRAINS[stage], STAGE_DEFORMS[stage]
        sh = self.active_sh_degree(step)
        layers, penalty = [], torch.zeros((), device=self.device)
        for k, b in enumerate((FACE, MOUTH)):
            if stage in ("mouth", "face") and not trains[k]:
                layers.append(None)  # the other branch is not rendered in its single-branch stage
                continue
            g, pen = model.deformed(b, motion if deforms[k] else None, eye, frozen=not trains[k])
            layer = model.render_layer(g, ds.viewmat(i), ds.K, ds.size, sh, cfg.backend)
            layer.means2d.retain_grad()
            layers.append(layer)
            penalty = penalty + pen
        face, mouth = layers
        if stage == "mouth":
            pred = mouth.rgb + (1 - mouth.alpha) * under
            m = inner_mouth
            loss = (pred - gt).abs().mean(-1)[m].mean() if m.any() else pred.sum() * 0
            loss = loss + cfg.alpha_weight * (1 - mouth.alpha[..., 0][m]).mean() if m.any() else loss
            shown = torch.where(m[..., None], pred, gt)
        elif stage == "face":
            pred = face.rgb + (1 - face.alpha) * torch.where(inner_mouth[..., None], gt, under)
            target_alpha = (masks["head"] & ~inner_mouth).float()
            loss = photometric_loss(pred, gt, cfg.ssim_weight, weight)
            loss = loss + cfg.alpha_weight * (face.alpha[..., 0] - target_alpha).abs().mean()
            shown = pred
        else:
            pred, alpha = composite(face, mouth, under)
            loss = photometric_loss(pred, gt, cfg.ssim_weight, weight)
            loss = loss + cfg.alpha_weight * (alpha[..., 0] - masks["head"].float()).abs().mean()
            shown = pred
        loss = loss + cfg.deform_weight * penalty
        info = {"stage": stage, "frame": i, "psnr": psnr(shown.detach(), gt, masks["head"] if masks["head"].any() else None)}
        if self.lip_targets is not None:
            lip_loss, info["lip_landmark_px"] = self.lip_landmark_loss_at(step, i, eye)
            loss = loss + cfg.lip_landmark_weight * lip_loss / ds.size
        return loss, info, layers

    def lip_landmark_loss_at(self, step: int, i: int, eye: torch.Tensor) -> tuple[torch.Tensor, float]:
        """The lip-landmark loss of the step's frame i (eye [1]) plus `lip_landmark_frames - 1`
        other training frames drawn from (seed, step), each with its tracked motion. It
        renders nothing, so every stage trains the face head's share of the lips on many
        frames per step, the static and mouth stages included."""
        cfg, lt = self.cfg, self.lip_targets
        g = torch.Generator().manual_seed(cfg.seed * 15_485_863 + step)
        rows = torch.cat([torch.tensor([self.train_ids.index(i)], device="cpu"),  # row numbers, from a host generator
                          torch.randint(len(self.train_ids), (max(cfg.lip_landmark_frames - 1, 0),), generator=g,
                                        device="cpu")])
        return lip_landmark_loss(self.model, lt.lips, lt.motion[rows], torch.cat([eye.reshape(1, 1), lt.eye[rows[1:]]]),
                                 lt.viewmat[rows], self.ds.K, lt.target[rows])

    def densify(self, step: int) -> dict:
        cfg = self.cfg
        stage = stage_at(cfg, step)
        counts = {}
        g = torch.Generator().manual_seed(cfg.seed * 7919 + step)
        for k, (name, b) in enumerate(BRANCHES):
            if not STAGE_TRAINS[stage][k]:
                continue
            p = self.model.branch(b)
            budget = cfg.max_gaussians - len(self.model)
            counts[name] = densify_and_prune(p, name, self.optim, self.stats[name], grad_threshold=cfg.densify_grad,
                                             extent=self.extent, percent_dense=cfg.percent_dense,
                                             prune_opacity=cfg.prune_opacity, budget=budget, generator=g)
            self.stats[name] = GradStats(len(p), self.device)
        return counts

    def densify_torso(self, step: int) -> dict:
        """One densification round of the torso (3DGS rules, its own budget)."""
        cfg, torso = self.cfg, self.model.torso
        g = torch.Generator().manual_seed(cfg.seed * 7919 + step)
        counts = densify_and_prune(torso.params, "torso", self.optim, self.stats["torso"],
                                   grad_threshold=cfg.densify_grad, extent=self.extent,
                                   percent_dense=cfg.percent_dense, prune_opacity=cfg.prune_opacity,
                                   budget=cfg.max_torso_gaussians - len(torso), generator=g)
        self.stats["torso"] = GradStats(len(torso), self.device)
        return {"torso": counts}

    def run(self, progress: bool = True) -> Path:
        cfg = self.cfg
        metrics_path = self.out / "metrics.jsonl"
        t_start, done_at_start = time.perf_counter(), self.step
        bar = tqdm(total=cfg.total_steps, initial=self.step, desc="avatar train", unit="it", disable=not progress,
                   dynamic_ncols=True, file=sys.stderr)
        densify_from, densify_until = int(cfg.densify_from * cfg.iterations), int(cfg.densify_until * cfg.iterations)
        torso_densify = (cfg.iterations + int(cfg.densify_from * cfg.torso_steps),
                         cfg.iterations + int(cfg.densify_until * cfg.torso_steps))
        reset_at = int(cfg.opacity_reset_at * cfg.iterations) if cfg.opacity_reset_at > 0 else -1
        # Body tracks are refined part-way (the rest of the stage fits the refined body) and
        # after the last step (every frame tracked against the finished torso).
        refine_at = {cfg.iterations + max(1, round(cfg.body_refine_at * cfg.torso_steps)), cfg.total_steps} \
            if cfg.body_refine_at > 0 else set()
        log = open(metrics_path, "a")
        try:
            while self.step < cfg.total_steps:
                step = self.step
                event = {}
                if step == cfg.iterations and self.model.torso is None:
                    event["floaters_pruned"] = self.start_torso(progress)
                    if self.model.torso is None:  # nothing to fit: the run ends with the head
                        self.step = cfg.total_steps
                        self.save()
                        break
                self.set_learning_rates(step)
                loss, info = self.optimize(step)
                self.step = step + 1
                if self.step in refine_at and self.model.torso is not None:
                    event["body_refined"] = self.refine_body(progress)
                if densify_from <= self.step < densify_until and self.step % cfg.densify_every == 0:
                    event["densify"] = self.densify(step)
                    self.model.rebind()
                if self.model.torso is not None and torso_densify[0] <= self.step < torso_densify[1] \
                        and self.step % cfg.densify_every == 0:
                    event["densify"] = self.densify_torso(step)
                if self.step == reset_at:
                    for name, b in BRANCHES:
                        reset_opacity(self.model.branch(b), name, self.optim)
                    event["opacity_reset"] = True
                bar.update(1)
                bar.set_postfix(stage=info["stage"], loss=f"{loss.item():.4f}", psnr=f"{info['psnr']:.2f}",
                                gaussians=len(self.model), refresh=False)
                if self.step % cfg.log_every == 0 or event or self.step in (cfg.iterations, cfg.total_steps):
                    elapsed = time.perf_counter() - t_start
                    record = {"step": self.step, "stage": info["stage"], "loss": loss.item(),
                              ("psnr_torso" if info["stage"] == "torso" else "psnr_head"): info["psnr"],
                              "n_face": len(self.model.face), "n_mouth": len(self.model.mouth),
                              "it_per_s": (self.step - done_at_start) / max(elapsed, 1e-9),
                              "elapsed_s": elapsed, **event}
                    if self.model.torso is not None:
                        record["n_torso"] = len(self.model.torso)
                    if "lip_landmark_px" in info:
                        record["lip_landmark_px"] = info["lip_landmark_px"]
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                if self.step % cfg.checkpoint_every == 0 or self.step in (cfg.iterations, cfg.total_steps):
                    self.save()
                    self.model.rebind()  # from the saved points, as a run resumed here binds
        finally:
            log.close()
            bar.close()
        save_ply(self.out / "canonical.ply", self.model.gaussians())
        return self.out


BOOKKEEPING = ("checkpoint_every", "log_every", "cache_frames", "backend")
"""Settings that do not change what is trained: never a reason to refuse a resume or retrain."""


def saved_config(ckpt: Path, meta: dict) -> TrainConfig:
    """The config a checkpoint was trained with; AvatarError when it is unreadable."""
    try:
        return TrainConfig.from_dict(meta["config"])
    except (KeyError, TypeError, ValueError) as exc:
        raise AvatarError(ckpt, f"has an unreadable config ({exc})", "train into a new --out") from exc


def checkpoint_differences(ckpt: Path, meta: dict, wanted: TrainConfig | None, dataset: Path) -> tuple[TrainConfig, list[str]]:
    """(the checkpoint's config, what differs from it: each setting of `wanted` other than
    BOOKKEEPING that is not the same, and the dataset when it was captured again or edited
    since)."""
    saved = saved_config(ckpt, meta)
    diffs = [] if wanted is None else [f"{f.name} {getattr(saved, f.name)!r} -> {getattr(wanted, f.name)!r}"
                                       for f in fields(TrainConfig) if f.name not in BOOKKEEPING
                                       and getattr(saved, f.name) != getattr(wanted, f.name)]
    fingerprint = dataset_fingerprint(dataset)
    if meta.get("dataset_fingerprint", fingerprint) != fingerprint:
        diffs.append("the dataset (captured again or edited since)")
    return saved, diffs


def resume_config(ckpt: Path, meta: dict, wanted: TrainConfig | None, dataset: Path, force: bool,
                  overrides: dict) -> TrainConfig:
    """The config to resume a checkpoint with: its own with `overrides` applied, or
    `wanted` (a whole config: a preset or config file was given). Any difference from the
    checkpoint's, or a dataset changed since, stops with an error naming it, unless
    `force` (then the given settings are used)."""
    if wanted is None:
        wanted = replace(saved_config(ckpt, meta), **overrides)
    _, diffs = checkpoint_differences(ckpt, meta, wanted, dataset)
    if diffs and not force:
        raise AvatarError(ckpt, f"was trained with other settings or data: {'; '.join(diffs)}",
                          "resume without settings to keep the checkpoint's, pass --force to go on with the new "
                          "ones, or train into a new --out")
    if diffs:
        print(f"avatar train: --force: resuming {ckpt} with {'; '.join(diffs)}", file=sys.stderr)
    return wanted


def train(dataset: str | Path, out: str | Path, cfg: TrainConfig | None, resume: bool = False, progress: bool = True,
          force: bool = False, overrides: dict | None = None, device: torch.device | str = "cpu") -> Path:
    """Train (or resume) an avatar on `device` (recon/device.py); returns the avatar folder.
    See the module docstring. cfg None: the checkpoint's config when resuming, else the cpu
    preset; `overrides` (settings given one by one) are applied over either."""
    trainer = Trainer(Path(dataset), Path(out), cfg, resume, progress, force, overrides, device)
    if trainer.step >= trainer.cfg.total_steps:
        print(f"avatar train: {out} is already trained ({trainer.step} steps)", file=sys.stderr)
        if not (trainer.out / "canonical.ply").is_file():
            save_ply(trainer.out / "canonical.ply", trainer.model.gaussians())
        return trainer.out
    return trainer.run(progress)
