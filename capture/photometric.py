"""Photometric head-pose refinement: every frame aligned directly to one textured face.

Landmark regressors are pulled towards the frontal face they were mostly trained on: as
the head turns, mediapipe's landmarks move less than the skin under them. On the sample
subject, whose true poses are known, even the true face shape at the true focal gives
2.3 deg median rotation error from the landmarks alone. The skin texture itself has no
such bias, so this stage refines the landmark fit by direct image alignment:

1. The rigid part of the subject's canonical face (mediapipe's tessellation above the
   nose base, eye openings excluded: they blink and gaze) is sampled densely, with a
   normal per sample.
2. Frames become grey, high-passed images (shading and exposure drift removed).
3. The appearance of each surface sample starts as its median intensity over up to 128
   frames at the current poses; then the poses (and, for clips of one chunk, the
   appearance with them) are refined by Adam under a robust photometric residual, while
   the landmarks keep the face as a whole where tracking put it. Rounds alternate.

Only samples facing the camera (cos > 0.3) take part, so grazing skin does not smear.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from avatar.dataset_format import LEFT_EYE, NOSE_BASE, RIGHT_EYE, RIGID, face_triangles
from avatar.geometry import pseudo_huber

from .pose import so3_exp

MIN_COS = 0.3  # samples seen more obliquely than ~73 deg are ignored


@dataclass
class PhotometricConfig:
    """How poses are refined against the frames."""

    resolution: int = 256
    """Side of the images the frames are aligned at."""
    rounds: int = 8
    """Alternations of appearance and poses."""
    steps_per_round: int = 30
    """Adam steps on the poses per round."""
    step_rad: float = 2e-3
    """Adam step size of the rotations (radians)."""
    step_mm: float = 1.0
    """Adam step size of the translations (millimetres)."""
    step_intensity: float = 1e-3
    """Adam step size of the appearance (clips of one chunk refine it with the poses)."""
    samples_per_edge: int = 4
    """Surface samples along each triangle edge (a triangle gets (n+1)(n+2)/2)."""
    appearance_frames: int = 128
    """Frames whose median gives the face's appearance."""
    correction_sigma_frames: float = 1.0
    """Temporal Gaussian low-pass (in frames) of the pose corrections; 0 leaves them per frame."""
    gauge_weight: float = 0.01
    """Weight of the landmarks' mean offset, which keeps the face as a whole in place
    (per frame, relative to the photometric term)."""
    chunk_frames: int = 256
    """Frames refined together (bounds memory on long clips)."""
    intensity_scale: float = 0.02
    """Pseudo-Huber scale of the photometric residual (high-passed intensity in [0, 1])."""


@dataclass
class PhotometricFit:
    """Refined poses for T frames and what the refinement changed."""

    R: np.ndarray  # [T, 3, 3] head -> camera rotation (OpenCV camera axes)
    t: np.ndarray  # [T, 3] head -> camera translation, metres
    residual_before: float  # median |high-passed intensity residual| at the landmark poses
    residual_after: float  # same at the refined poses
    rotation_change_deg: float  # median angle between landmark and refined rotations


def rigid_surface(canonical: np.ndarray, samples_per_edge: int) -> tuple[np.ndarray, np.ndarray]:
    """Dense samples of the rigid face surface.

    Args:
        canonical: [478, 3] face landmarks in the head frame (z out of the face).
    Returns:
        points [P, 3] and unit normals [P, 3] (pointing out of the face), head frame.
    """
    eyes = set(RIGHT_EYE) | set(LEFT_EYE)
    base = canonical[NOSE_BASE, 1]
    tris = np.array([t for t in face_triangles() if not eyes & set(t) and canonical[list(t), 1].min() > base])
    n = samples_per_edge
    bary = np.array([(i / n, j / n, 1 - (i + j) / n) for i in range(n + 1) for j in range(n + 1 - i)])
    corners = canonical[tris]  # [F, 3, 3]
    points = np.einsum("sk,fkd->fsd", bary, corners).reshape(-1, 3)
    normal = np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])
    normal /= np.linalg.norm(normal, axis=-1, keepdims=True) + 1e-12
    normal *= np.sign(normal[:, 2:3] + 1e-12)  # mediapipe's winding is not relied on
    normals = np.repeat(normal, len(bary), axis=0)
    return points, normals


def high_pass(gray: np.ndarray, side: int) -> np.ndarray:
    """[H, W] grey in [0, 1] -> [side, side] high-passed (detail finer than side/64 px)."""
    g = cv2.resize(gray, (side, side), interpolation=cv2.INTER_AREA)
    return g - cv2.GaussianBlur(g, (0, 0), side / 128)


def _load(paths: list[Path], side: int) -> torch.Tensor:
    imgs = [high_pass(cv2.imread(str(p), cv2.IMREAD_GRAYSCALE).astype(np.float32) / 255, side) for p in paths]
    return torch.from_numpy(np.stack(imgs))[:, None]  # [T, 1, side, side]


class _Surface:
    """Samples the high-passed frames at the projected surface points."""

    def __init__(self, points: np.ndarray, normals: np.ndarray, focal: float, width: int, height: int):
        self.points = torch.from_numpy(points).float()
        self.normals = torch.from_numpy(normals).float()
        self.focal, self.width, self.height = focal, width, height

    def project(self, R: torch.Tensor, t: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
        """[T,3,3], [T,3], [P,3] -> [T, P, 2] pixels at the dataset size."""
        Xc = X[None] @ R.transpose(1, 2) + t[:, None]
        return self.focal * Xc[..., :2] / Xc[..., 2:] + torch.tensor([self.width / 2, self.height / 2])

    def sample(self, images: torch.Tensor, R: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Intensities [T, P] and visibility weights [T, P] (1 where the sample faces the camera)."""
        uv = self.project(R, t, self.points)
        grid = uv / torch.tensor([self.width, self.height]) * 2 - 1  # align_corners=False convention
        val = F.grid_sample(images, grid[:, :, None], mode="bilinear", padding_mode="border",
                            align_corners=False)[:, 0, :, 0]
        with torch.no_grad():
            Xc = self.points[None] @ R.transpose(1, 2) + t[:, None]
            cos = -((self.normals[None] @ R.transpose(1, 2)) * Xc).sum(-1) / Xc.norm(dim=-1)
            inside = (grid.abs() < 1).all(-1)
            vis = ((cos > MIN_COS) & inside).float()
        return val, vis


def _appearance(surface: _Surface, images: torch.Tensor, R: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Median intensity per surface sample [P], and whether it was seen in 3+ frames [P]."""
    with torch.no_grad():
        val, vis = surface.sample(images, R, t)
        val = val.masked_fill(vis == 0, float("nan"))
        return torch.nanmedian(val, 0).values.nan_to_num(0.0), (vis.sum(0) >= 3).float()


def refine_poses(
    image_paths: list[Path],
    canonical: np.ndarray,
    R: np.ndarray,
    t: np.ndarray,
    focal: float,
    width: int,
    height: int,
    landmarks: np.ndarray,
    cfg: PhotometricConfig | None = None,
) -> PhotometricFit:
    """Refine landmark-fitted head poses by direct alignment of the frames.

    Args:
        image_paths: T frames, all width x height.
        canonical: [478, 3] the subject's face in the head frame, metres.
        R, t: [T, 3, 3], [T, 3] head -> camera poses from the landmark fit.
        focal: pixels at width x height; the principal point is the image centre.
        landmarks: [T, 478, >=2] tracked landmarks in pixels (they fix the gauge).
    """
    cfg = cfg or PhotometricConfig()
    T = len(image_paths)
    points, normals = rigid_surface(canonical.astype(np.float64), cfg.samples_per_edge)
    surface = _Surface(points.astype(np.float32), normals.astype(np.float32), focal, width, height)
    rigid = list(RIGID)
    X_rigid = torch.from_numpy(canonical[rigid]).float()
    obs = torch.from_numpy(landmarks[:, rigid, :2]).float()
    R_cur = torch.from_numpy(R).float()
    t_cur = torch.from_numpy(t).float()
    subset = np.unique(np.linspace(0, T - 1, min(T, cfg.appearance_frames)).round().astype(int))
    delta_px = 1.5  # as the landmark fit

    def residual(resident: torch.Tensor | None) -> float:
        """Median |intensity - appearance| over the visible samples of all frames."""
        key = resident[subset] if resident is not None else _load([image_paths[i] for i in subset], cfg.resolution)
        colour, seen = _appearance(surface, key, R_cur[subset], t_cur[subset])
        out = []
        with torch.no_grad():
            for c0 in range(0, T, cfg.chunk_frames):
                sl = slice(c0, c0 + cfg.chunk_frames)
                images = resident[sl] if resident is not None else _load(image_paths[sl], cfg.resolution)
                val, vis = surface.sample(images, R_cur[sl], t_cur[sl])
                out.append((val - colour[None]).abs()[(vis * seen[None]) > 0])
        return float(torch.cat(out).median())

    radius = int(math.ceil(3 * cfg.correction_sigma_frames))
    kernel = torch.exp(-0.5 * (torch.arange(-radius, radius + 1) / max(cfg.correction_sigma_frames, 1e-6)) ** 2)
    kernel = (kernel / kernel.sum()).reshape(1, 1, -1).repeat(3, 1, 1)

    def smooth(x: torch.Tensor) -> torch.Tensor:
        """Gaussian low-pass of per-frame corrections [n, 3] along time: the landmarks'
        bias varies slowly with the head pose, so the texture only needs to correct slowly,
        and per-frame texture noise does not become jitter."""
        if radius == 0 or len(x) < 2:
            return x
        padded = F.pad(x.T[None], (radius, radius), mode="replicate")
        return F.conv1d(padded, kernel, groups=3)[0].T

    def align(images: torch.Tensor, frames: np.ndarray, colour: torch.Tensor, seen: torch.Tensor):
        """Adam steps on the poses of `frames`, and on `colour` when it requires grad."""
        n = len(frames)
        R0, t0 = R_cur[frames], t_cur[frames]
        dr = torch.zeros(n, 3, requires_grad=True)
        dt_mm = torch.zeros(n, 3, requires_grad=True)
        # Adam, not L-BFGS: its bounded per-step moves (0.1 deg, 1 mm) follow the
        # slowly revealed optimum as the appearance sharpens, where L-BFGS settles at once.
        groups = [{"params": [dr], "lr": cfg.step_rad}, {"params": [dt_mm], "lr": cfg.step_mm}]
        if colour.requires_grad:  # the appearance too: a bundle adjustment of the texture
            groups.append({"params": [colour], "lr": cfg.step_intensity})
        opt = torch.optim.Adam(groups)
        for _ in range(cfg.steps_per_round):
            opt.zero_grad()
            Rk = so3_exp(smooth(dr)) @ R0
            tk = t0 + 1e-3 * smooth(dt_mm)
            val, vis = surface.sample(images, Rk, tk)
            w = vis * seen[None]
            photo = (pseudo_huber((val - colour[None]) ** 2, cfg.intensity_scale) * w).sum(-1)
            photo = photo / (w.sum(-1) + 1e-6) / cfg.intensity_scale**2
            uv = surface.project(Rk, tk, X_rigid)
            # Gauge: the landmarks place the face as a whole (their mean offset over the
            # frames), the texture moves each frame. A per-frame pull would bring back the
            # landmarks' bias, and a temporal prior only slows Adam down: the texture
            # alone gives a steadier track than the landmark fit.
            offset = ((uv - obs[frames]).mean(0) ** 2).sum(-1)
            anchor = cfg.gauge_weight * n * pseudo_huber(offset, delta_px).mean() / delta_px**2
            loss = photo.sum() + anchor
            loss.backward()
            opt.step()
        with torch.no_grad():
            return so3_exp(smooth(dr)) @ R0, t0 + 1e-3 * smooth(dt_mm)

    side = cfg.resolution
    chunks = [np.arange(c0, min(c0 + cfg.chunk_frames, T)) for c0 in range(0, T, cfg.chunk_frames)]
    resident = _load(image_paths, side) if len(chunks) == 1 else None  # short clips stay in memory
    residual_before = residual(resident)
    for _ in tqdm(range(cfg.rounds), desc="photometric pose", unit="round", leave=False):
        # Appearance from the current poses, then every pose towards it; alternating lets
        # the appearance sharpen as the poses improve.
        key = resident[subset] if resident is not None else _load([image_paths[i] for i in subset], side)
        colour, seen = _appearance(surface, key, R_cur[subset], t_cur[subset])
        if len(chunks) == 1:
            colour.requires_grad_(True)
        for chunk in chunks:
            images = resident if resident is not None else _load([image_paths[i] for i in chunk], side)
            R_cur[chunk], t_cur[chunk] = align(images, chunk, colour, seen)
    residual_after = residual(resident)
    R_new = R_cur.double().numpy()
    # Re-orthonormalise after float32 composition.
    U, _, Vt = np.linalg.svd(R_new)
    R_new = U @ Vt
    change = [math.degrees(float(np.linalg.norm(cv2.Rodrigues(a @ b.T)[0]))) for a, b in zip(R_new, R)]
    return PhotometricFit(R=R_new, t=t_cur.double().numpy(), residual_before=residual_before, residual_after=residual_after,
                          rotation_change_deg=float(np.median(change)))

