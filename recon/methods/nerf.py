"""The talking head as a hash-grid radiance field (ER-NeRF style): `avatar train --method nerf`.

Shared with the Gaussian avatar: the face mesh's motion basis and the speech -> motion
stage (recon/motion.py): every frame's tracked lower-face motion becomes a few codes, and
MotionNet learns them from the clip's speech. The field (recon/fields/talking_field.py)
is conditioned on a frame's codes and eye openness, so training renders each frame from
its *tracked* codes and new speech goes through MotionNet, as for the Gaussians.

Space is the head box: the fitted face's landmarks, widened by BOX_MARGIN of their extent
on every side (hair, ears, the back of the head). A step renders `rays_per_view` rays of
each of the batch's views, drawn inside the box's image, three times as often on the head
mask as off it; the head's colour and alpha are laid over what lies behind the head (the
frame outside its head mask, the plate inside: recon/dataset.py: behind_head, as ER-NeRF
composites its head over the real torso). Loss: squared error of that composite, and
`alpha_weight` |alpha - head mask|. An occupancy grid over the box (recon/fields/volume.py)
is refreshed every `occupancy_every` steps with a random training frame's conditioning
(its moving maximum keeps what any frame fills), so empty space costs nothing. On CUDA,
nerfacc marches the rays when its kernels load (recon/fields/nerfacc_marching.py), over
the same grid; backend "torch" keeps our torch marching there too.

The avatar renders one layer, "head", with no torso of its own: renders keep the frame's
own pixels below the head, or the plate.
"""

from __future__ import annotations

import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor

from avatar.dataset_format import VISEMES
from avatar.errors import AvatarError

from ..conditioning import normalize_mel, viseme_features
from ..config import replace_checked
from ..dataset import Dataset, behind_head, dilate
from ..fields.hash_encoding import HashGridConfig
from ..fields.nerfacc_marching import NerfaccMarcher, nerfacc_unavailable
from ..fields.talking_field import TalkingField
from ..fields.volume import OccupancyGrid, box_span, camera_rays, render_rays
from ..method import Batch, HeadView, Method, TrainedAvatar
from ..motion import (MotionBasis, MotionNet, MotionRig, fit_rig, fit_speech_to_motion, has_tracked_faces,
                      tracked_motion, tracked_motion_rows)

BOX_MARGIN = 0.3
"""The head box: the face landmarks' bounds widened by this share of their extent a side."""


@dataclass
class NerfConfig:
    """How a radiance-field avatar is fitted. Defaults are the `cpu` preset."""

    preset: str = "cpu"
    size: int = 256
    """Training and rendering resolution (square)."""
    iterations: int = 6000
    """Optimisation steps (each on `batch_size` views)."""
    batch_size: int = 1
    """Views per step."""
    rays_per_view: int = 2048
    """Rays of each view rendered per step."""
    seed: int = 0
    # The field.
    levels: int = 12
    """Hash-grid levels of each of the three planes."""
    features_per_level: int = 2
    log2_table_size: int = 14
    """Entries of each level's table: 2^this."""
    base_resolution: int = 16
    """Cells across the box on the coarsest level."""
    max_resolution: int = 512
    """Cells across the box on the finest level."""
    hidden: int = 64
    """Width of the density and colour MLPs."""
    steps_across: int = 128
    """Ray-marching step: the box's largest side over this."""
    occupancy_resolution: int = 48
    occupancy_every: int = 16
    """Steps between refreshes of the occupancy grid."""
    # The speech -> motion stage (recon/motion.py), as the Gaussian avatar's.
    motion_components: int = 16
    motion_steps: int = 600
    motion_velocity_weight: float = 1.0
    motion_gap_weight: float = 1.0
    lr_motion: float = 2e-3
    audio_noise: float = 0.4
    audio_window: int = 16
    live_lookahead_ms: float = 80.0
    live_motion_steps: int = 600
    live_copies: int = 12
    # Optimisation.
    lr_grid: float = 1e-2
    """Learning rate of the hash tables (decays 10x over the run)."""
    lr_mlp: float = 1e-3
    """Learning rate of the MLPs and the attention (decays 10x)."""
    alpha_weight: float = 0.1
    """Weight of |alpha - head mask|."""
    # Bookkeeping (the engine reads these by name).
    checkpoint_every: int = 500
    log_every: int = 50
    cache_frames: int = 256
    backend: str = "auto"
    """auto: the hash encoding by our compiled kernels (else torch), and on CUDA nerfacc's
    ray marching when it loads; torch: both in torch."""

    @property
    def total_steps(self) -> int:
        return self.iterations

    def grid(self) -> HashGridConfig:
        return HashGridConfig(dims=2, levels=self.levels, features=self.features_per_level,
                              log2_table_size=self.log2_table_size, base_resolution=self.base_resolution,
                              max_resolution=self.max_resolution)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "NerfConfig":
        if not isinstance(d, dict):
            raise ValueError(f"a training config must be an object of settings, got {type(d).__name__}")
        d = dict(d)
        name = d.pop("preset", "cpu")
        if name not in NERF_PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose from {', '.join(NERF_PRESETS)}")
        cfg = replace_checked(NERF_PRESETS[name], d)
        for key in ("size", "iterations", "batch_size", "rays_per_view", "levels", "hidden", "steps_across",
                    "occupancy_resolution", "occupancy_every", "motion_components", "checkpoint_every", "log_every",
                    "cache_frames", "audio_window"):
            if getattr(cfg, key) < 1:
                raise ValueError(f"{key} must be at least 1, got {getattr(cfg, key)!r}")
        if cfg.features_per_level not in (1, 2, 4, 8) or not 4 <= cfg.log2_table_size <= 24:
            raise ValueError("features_per_level must be 1, 2, 4 or 8 and log2_table_size 4-24")
        if not 1 <= cfg.base_resolution <= cfg.max_resolution:
            raise ValueError("base_resolution must be at least 1 and at most max_resolution")
        if cfg.backend not in ("auto", "torch"):
            raise ValueError(f"backend must be auto or torch, got {cfg.backend!r}")
        if not 16 <= cfg.size <= 4096:
            raise ValueError(f"size must be between 16 and 4096 pixels, got {cfg.size}")
        return cfg


NERF_PRESETS: dict[str, NerfConfig] = {
    "cpu": NerfConfig(),
    "gpu": NerfConfig(preset="gpu", size=512, iterations=30_000, batch_size=4, rays_per_view=4096, levels=16,
                      log2_table_size=17, max_resolution=2048, steps_across=256, occupancy_resolution=128,
                      checkpoint_every=2000, log_every=100, cache_frames=512),
    "demo": NerfConfig(preset="demo", iterations=600, rays_per_view=1024, checkpoint_every=200, live_motion_steps=200,
                       live_copies=4),
}


def head_box(face: Tensor) -> tuple[Tensor, Tensor]:
    """[3], [3]: the box around face landmarks [L, 3], widened by BOX_MARGIN a side."""
    lo, hi = face.min(0).values, face.max(0).values
    pad = BOX_MARGIN * (hi - lo).max()
    return lo - pad, hi + pad


def box_pixels(lo: Tensor, hi: Tensor, viewmat: Tensor, K: Tensor, width: int, height: int) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1): the pixel rectangle the box projects into (clamped to the image)."""
    corners = torch.stack(torch.meshgrid(*[torch.stack([lo[d], hi[d]]) for d in range(3)], indexing="ij"), -1).reshape(-1, 3)
    cam = corners @ viewmat[:3, :3].T + viewmat[:3, 3]
    if (cam[:, 2] <= 1e-3).any():  # the camera is inside or behind part of the box: the whole image
        return 0, 0, width, height
    uv = ((cam @ K.T)[:, :2] / cam[:, 2:]).detach()
    x0, y0 = (int(math.floor(float(v))) for v in uv.min(0).values)
    x1, y1 = (int(math.ceil(float(v))) + 1 for v in uv.max(0).values)
    return max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)


class FieldModel(torch.nn.Module):
    """The field, its occupancy grid, the face mesh's motion basis and MotionNet."""

    def __init__(self, lo: Tensor, hi: Tensor, cfg: NerfConfig, rig: MotionRig):
        super().__init__()
        self.field = TalkingField(lo, hi, cfg.motion_components + 1, cfg.grid(), hidden=cfg.hidden, backend=cfg.backend)
        self.step = float((hi - lo).max()) / cfg.steps_across
        self.grid = OccupancyGrid(lo, hi, cfg.occupancy_resolution, self.step)
        self.rig = rig
        self.motion_net = MotionNet(codes=cfg.motion_components, visemes=len(VISEMES), window=cfg.audio_window)
        self.backend = cfg.backend
        self._nerfacc: NerfaccMarcher | None | bool = None  # None: not tried yet; False: unavailable

    def marcher(self) -> NerfaccMarcher | None:
        """nerfacc's marcher when backend auto finds it usable on the field's device (on
        CUDA; said once when it is not), else None: our torch marching."""
        device = self.lo.device
        if self.backend == "torch" or device.type != "cuda":
            return None
        if self._nerfacc is None:
            why = nerfacc_unavailable(device)
            if why is not None:
                print(f"avatar: ray marching in torch on {device}: {why}", file=sys.stderr)
            self._nerfacc = False if why is not None else NerfaccMarcher(self.grid)
        return self._nerfacc or None

    @property
    def lo(self) -> Tensor:
        return self.field.lo

    @property
    def hi(self) -> Tensor:
        return self.field.hi

    def render(self, cond: Tensor, viewmat: Tensor, K: Tensor, pixels: Tensor, jitter: Tensor | None = None,
               chunk: int = 16384, block: int = 8):
        """The head along the rays through `pixels` [R, 2] of one camera, conditioned on
        cond [C]: (rgb [R, 3] premultiplied, alpha [R, 1], camera z [R, 1], field evaluations).
        block: samples per ray per round (volume.render_rays); smaller wastes fewer behind
        an opaque surface, larger spends less time per round."""
        rgb, alpha, depth, spent = [], [], [], 0
        marcher = self.marcher()

        def field(xyz: Tensor, ray: Tensor) -> tuple[Tensor, Tensor]:
            return self.field(xyz, cond.expand(len(xyz), -1))

        for i in range(0, len(pixels), chunk):
            o, d = camera_rays(viewmat, K, pixels[i:i + chunk])
            near, far = box_span(o, d, self.lo, self.hi)
            offsets = None if jitter is None else jitter[i:i + chunk]
            if marcher is not None:
                out = marcher.render(field, o, d, near, far, self.step, offsets)
            else:
                out = render_rays(field, o, d, near, far, self.step, self.grid, offsets, block=block)
            z = d @ viewmat[2, :3]  # camera z per unit of distance along each ray
            rgb.append(out.rgb), alpha.append(out.alpha), depth.append(out.depth * z[:, None])
            spent += out.samples
        return torch.cat(rgb), torch.cat(alpha), torch.cat(depth), spent


def _conditioning(codes: Tensor, eye: Tensor) -> Tensor:
    """[B, K], [B, 1] -> [B, K + 1]."""
    return torch.cat([codes, eye], -1)


class RadianceFieldAvatar(Method):
    """The talking head as a hash-grid radiance field (module docstring)."""

    name = "nerf"
    presets = NERF_PRESETS

    def __init__(self, ds: Dataset, train_ids: list[int], cfg: NerfConfig, device: torch.device):
        super().__init__(ds, train_ids, cfg, device)
        self.host_ds = ds.on("cpu", cache_frames=16)
        if not has_tracked_faces(self.host_ds):
            raise AvatarError(ds.root, "has no tracked faces (mediapipe landmarks), which the radiance-field method "
                              "is conditioned on", "capture the video with `avatar capture`, or train --method gaussians")
        self.model: FieldModel
        self.motion: Tensor  # [len(ds), K] tracked codes

    # -- lifecycle ---------------------------------------------------------------------
    def create(self, out: Path, progress: bool) -> None:
        cfg = self.cfg
        rig, motion = fit_rig(self.host_ds, self.train_ids, cfg.motion_components, 0.015)
        lo, hi = head_box(self.host_ds.face_geometry())
        self.model = FieldModel(lo, hi, cfg, rig)
        if self.ds.has_speech:
            mel, visemes = normalize_mel(self.ds.features["mel"]), viseme_features(self.ds.features)
            fit_speech_to_motion(self.model.motion_net, rig, self.host_ds, self.train_ids, motion, mel.cpu(),
                                 visemes.cpu(), out, progress, steps=cfg.motion_steps, lr=cfg.lr_motion,
                                 noise=cfg.audio_noise, velocity_weight=cfg.motion_velocity_weight,
                                 gap_weight=cfg.motion_gap_weight, seed=cfg.seed)
        self.model.to(self.device)
        self.motion = motion.to(self.device)

    def restore(self, tensors: dict[str, Tensor], meta: dict, path: Path) -> None:
        self.model = field_model_from_tensors(tensors, self.cfg, path)
        self.motion = tracked_motion(self.host_ds, self.model.rig).to(self.device)
        self.model.to(self.device)

    def state_tensors(self) -> dict[str, Tensor]:
        return {**{f"model.{k}": v for k, v in self.model.state_dict().items()}, "background": self.ds.background,
                "K": self.ds.K}

    def state_meta(self) -> dict:
        return {"speech": self.ds.has_speech, "box": [self.model.lo.tolist(), self.model.hi.tolist()]}

    def log_fields(self) -> dict:
        return {"occupied": float(self.model.grid.occupied.float().mean())}

    # -- optimisation ----------------------------------------------------------------
    def param_groups(self) -> list[dict]:
        tables = [p for enc in self.model.field.planes for p in enc.parameters()]
        table_ids = {id(p) for p in tables}
        mlps = [p for p in self.model.field.parameters() if id(p) not in table_ids]
        # Instant-NGP's Adam: eps 1e-15 (hash entries a point rarely reaches get tiny gradients).
        return [{"params": tables, "name": "field.tables", "lr": self.cfg.lr_grid, "eps": 1e-15},
                {"params": mlps, "name": "field.mlp", "lr": self.cfg.lr_mlp, "eps": 1e-15}]

    def learning_rate(self, group: dict, step: int) -> float:
        return group["base_lr"] * 0.1 ** min(step / max(self.cfg.iterations - 1, 1), 1.0)

    def before_step(self, step: int, optim: torch.optim.Optimizer, progress: bool) -> dict:
        if step % self.cfg.occupancy_every == 0:
            g = torch.Generator().manual_seed(self.cfg.seed * 7919 + step)  # the same draw when resumed
            i = self.train_ids[int(torch.randint(len(self.train_ids), (1,), generator=g))]
            cond = self._cond([i])[0]
            share = self.model.grid.update(lambda xyz: self.model.field(xyz, cond.expand(len(xyz), -1))[0], g)
            return {"occupied": share} if step == 0 else {}
        return {}

    def _cond(self, ids: list[int]) -> Tensor:
        eye = torch.tensor([[float(self.ds.frames[i].get("eye_openness", 1.0))] for i in ids], device=self.device)
        return _conditioning(self.motion[ids], eye)

    def _pixels(self, frame, i: int, count: int, g: torch.Generator) -> Tensor:
        """[count, 2] pixel centres inside the box's image, the head mask three times as likely."""
        S = self.ds.size
        x0, y0, x1, y1 = box_pixels(self.model.lo, self.model.hi, self.ds.viewmat(i), self.ds.intrinsics(i), S, S)
        head = dilate(frame.masks["head"], 2)[y0:y1, x0:x1].float()
        weights = (1 + 2 * head).reshape(-1).cpu()
        flat = torch.multinomial(weights, count, replacement=True, generator=g)
        w = x1 - x0
        return torch.stack([flat % w + x0, flat // w + y0], 1).float().to(self.device) + 0.5

    def render(self, batch: Batch, step: int) -> dict:
        rgb, alpha, under, target, head, spent = [], [], [], [], [], 0
        cond = self._cond([s.index for s in batch.samples])
        for b, (sample, frame) in enumerate(zip(batch.samples, batch.frames)):
            g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + sample.key)
            pix = self._pixels(frame, sample.index, self.cfg.rays_per_view, g)
            jitter = torch.rand(len(pix), generator=g).to(self.device)
            c, a, _, n = self.model.render(cond[b], self.ds.viewmat(sample.index), self.ds.intrinsics(sample.index),
                                           pix, jitter)
            ij = pix.long()
            back = behind_head(frame, self.ds.plate(sample.index))
            rgb.append(c), alpha.append(a), under.append(back[ij[:, 1], ij[:, 0]])
            target.append(frame.image[ij[:, 1], ij[:, 0]]), head.append(frame.masks["head"][ij[:, 1], ij[:, 0]])
            spent += n
        return {"rgb": torch.stack(rgb), "alpha": torch.stack(alpha), "under": torch.stack(under),
                "target": torch.stack(target), "head": torch.stack(head)[..., None].float(), "samples": spent}

    def loss(self, batch: Batch, outputs: dict, step: int) -> tuple[Tensor, dict]:
        image = outputs["rgb"] + (1 - outputs["alpha"]) * outputs["under"]
        mse = (image - outputs["target"]).square().mean()
        silhouette = (outputs["alpha"] - outputs["head"]).abs().mean()
        loss = mse + self.cfg.alpha_weight * silhouette
        return loss, {"psnr": float(-10 * torch.log10(mse.detach().clamp_min(1e-10))),
                      "samples_per_ray": outputs["samples"] / outputs["rgb"].shape[:2].numel()}

    @classmethod
    def open_trained(cls, root: Path, tensors: dict[str, Tensor], meta: dict,
                     device: torch.device) -> "TrainedRadianceField":
        try:
            cfg = NerfConfig.from_dict(meta["config"])
        except (KeyError, TypeError, ValueError) as exc:
            raise AvatarError(root, f"has an unreadable config ({exc})", "train it again") from exc
        model = field_model_from_tensors(tensors, cfg, root).to(device)
        return TrainedRadianceField(root, model, cfg, meta, tensors["background"].to(device), tensors["K"].to(device))


def field_model_from_tensors(tensors: dict[str, Tensor], cfg: NerfConfig, path: Path) -> FieldModel:
    """The FieldModel of checkpoint tensors `model.*`; AvatarError naming `path` when they are incomplete."""
    state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    try:
        basis = MotionBasis(len(state["rig.vertices"]), len(state["rig.basis.vertices"]), len(state["rig.basis.std"]))
        rig = MotionRig(basis, state["rig.vertices"], state["rig.triangles"])
        model = FieldModel(state["field.lo"], state["field.hi"], cfg, rig)
        model.load_state_dict(state)
    except (KeyError, RuntimeError, ValueError) as exc:
        raise AvatarError(path, f"does not hold a complete radiance-field avatar ({exc.__class__.__name__}: {exc})",
                          "train it again") from exc
    return model


class TrainedRadianceField(TrainedAvatar):
    """A trained radiance-field avatar: a pose is one frame's conditioning [K + 1]."""

    layer_names = ("head",)

    def __init__(self, root: Path, model: FieldModel, config: NerfConfig, meta: dict, background: Tensor, K: Tensor):
        super().__init__(root, config, meta, background, K)
        self.model = model.eval()

    @property
    def motion_net(self) -> MotionNet:
        return self.model.motion_net

    def tracked_motion(self, ds: Dataset) -> Tensor | None:
        return None if ds.landmarks(0) is None else tracked_motion_rows(ds, self.model.rig)

    def head_points(self) -> Tensor:
        return self.model.rig.vertices

    def deform(self, motion: Tensor | None, eye: Tensor, *, mouth_scale: float = 1.0) -> list[Tensor]:
        if motion is None:
            motion = torch.zeros(1, self.model.motion_net.centre.shape[0], device=self.device)
            eye = eye[:1]
        return list(_conditioning(motion * mouth_scale, eye))

    def render_head(self, pose: Tensor, viewmat: Tensor, K: Tensor, size: int | tuple[int, int]) -> HeadView:
        W, H = (size, size) if isinstance(size, int) else size
        x0, y0, x1, y1 = box_pixels(self.model.lo, self.model.hi, viewmat, K, W, H)
        rgb = torch.zeros(H, W, 3, device=self.device)
        alpha = torch.zeros(H, W, 1, device=self.device)
        depth = torch.zeros(H, W, 1, device=self.device)
        if x1 > x0 and y1 > y0:
            ys, xs = torch.meshgrid(torch.arange(y0, y1, device=self.device), torch.arange(x0, x1, device=self.device),
                                    indexing="ij")
            pix = torch.stack([xs.reshape(-1), ys.reshape(-1)], 1).float() + 0.5
            c, a, z, _ = self.model.render(pose, viewmat, K, pix, block=4)  # whole frames: rounds are cheap
            rgb[y0:y1, x0:x1] = c.reshape(y1 - y0, x1 - x0, 3)
            alpha[y0:y1, x0:x1] = a.reshape(y1 - y0, x1 - x0, 1)
            depth[y0:y1, x0:x1] = (z / a.clamp_min(1e-6)).reshape(y1 - y0, x1 - x0, 1)
        return HeadView({"head": _Layer(rgb, alpha, depth)})


    @torch.no_grad()
    def mesh(self, pose: Tensor | None = None, resolution: int = 192) -> tuple[Tensor, Tensor, Tensor]:
        """Marching cubes (scikit-image) on the density sampled at the centres of a
        `resolution`^3 grid over the head box, at the density where one ray-marching step
        is half opaque; colours are the field's at the vertices."""
        from skimage.measure import marching_cubes

        cond = pose if pose is not None else self.deform(None, torch.ones(1, 1, device=self.device))[0]
        lo, hi = self.model.lo, self.model.hi
        axes = [lo[d] + (torch.arange(resolution, device=self.device) + 0.5) / resolution * (hi[d] - lo[d])
                for d in range(3)]
        xyz = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
        density = torch.cat([self.model.field(x, cond.expand(len(x), -1))[0] for x in xyz.split(65536)])
        level = math.log(2) / self.model.step
        volume = density.reshape((resolution,) * 3).cpu().numpy()  # host: scikit-image's marching cubes
        if not volume.min() < level < volume.max():
            raise AvatarError(self.root, "has no surface in its head box (the field is empty or solid everywhere)",
                              "train it longer")
        spacing = ((hi - lo) / resolution).tolist()
        verts, faces, _, _ = marching_cubes(volume, level, spacing=spacing)
        vertices = torch.from_numpy(verts.copy()).float().to(self.device) + lo + (hi - lo) / resolution / 2
        colours = torch.cat([self.model.field(v, cond.expand(len(v), -1))[1] for v in vertices.split(65536)])
        return vertices, torch.from_numpy(faces.astype("int64")), colours


@dataclass
class _Layer:
    rgb: Tensor
    alpha: Tensor
    depth: Tensor
