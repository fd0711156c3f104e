"""Initial canonical Gaussians from a dataset folder.

Face branch: the fitted canonical face (face_geometry.npz) plus points sampled in the
head volume and carved by the head masks of several frames (a visual hull), coloured
by averaging the frames they project into. Mouth branch: points in the cavity behind
the inner lips (1 to 3 cm deep), dark red to start with.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from avatar.dataset_format import INNER_LIPS, INNER_MOUTH68, N_LANDMARKS
from avatar.errors import AvatarError

from .dataset import Dataset, spread
from .gaussians import FACE, MOUTH, Gaussians, rgb_to_sh_dc


def _project(points: Tensor, viewmat: Tensor, K: Tensor) -> tuple[Tensor, Tensor]:
    """points [N, 3] -> pixel coordinates [N, 2] and camera depth [N]."""
    pc = points @ viewmat[:3, :3].T + viewmat[:3, 3]
    uv = pc[:, :2] / pc[:, 2:].clamp_min(1e-6) * K[[0, 1], [0, 1]] + K[[0, 1], [2, 2]]
    return uv, pc[:, 2]


def _carve_and_colour(ds: Dataset, points: Tensor, views: list[int], min_inside: float) -> tuple[Tensor, Tensor]:
    """Keep points inside the head mask in >= min_inside of the views that see them;
    return (kept mask [N], mean colour [N, 3])."""
    inside = torch.zeros(len(points))
    seen = torch.zeros(len(points))
    colour = torch.zeros(len(points), 3)
    S = ds.size
    for i in views:
        f = ds[i]
        uv, z = _project(points, ds.viewmat(i), ds.intrinsics(i))
        px = uv.round().long()
        ok = (z > 0) & (px[:, 0] >= 0) & (px[:, 0] < S) & (px[:, 1] >= 0) & (px[:, 1] < S)
        idx = px[ok]
        hit = f.masks["head"][idx[:, 1], idx[:, 0]].float()
        seen[ok] += 1
        inside[ok] += hit
        colour[ok] += f.image[idx[:, 1], idx[:, 0]] * hit[:, None]
    keep = (seen > 0) & (inside >= min_inside * seen)
    return keep, colour / inside.clamp_min(1)[:, None]


def init_gaussians(ds: Dataset, n_volume: int = 20_000, n_mouth: int = 2_000, sh_degree: int = 3,
                   views: int = 8, seed: int = 0, train_ids: list[int] | None = None) -> Gaussians:
    """Initial Gaussians (face and mouth branches) for a dataset, from its training frames
    `train_ids` (default: `Dataset.split`'s). See the module docstring."""
    face = ds.face_geometry()
    if face is None:
        raise AvatarError(ds.root / ds.meta.get("face_geometry", "face_geometry.npz"),
                          "missing: the dataset has no fitted face geometry",
                          "capture it with `avatar capture`, or import an ER-NeRF folder whose frames all have .lms landmarks")
    g = torch.Generator().manual_seed(seed)
    train = ds.split()[0] if train_ids is None else train_ids
    view_ids = spread(train, views)

    # Face branch: landmarks plus a carved head volume around them.
    # Hair reaches well above and beside the face mesh; the back of the head is unseen.
    lo = face.min(0).values - torch.tensor([0.06, 0.05, 0.10])
    hi = face.max(0).values + torch.tensor([0.06, 0.10, 0.02])
    cand = lo + torch.rand(n_volume * 4, 3, generator=g) * (hi - lo)
    keep, colour = _carve_and_colour(ds, cand, view_ids, min_inside=0.8)
    cand, colour = cand[keep][:n_volume], colour[keep][:n_volume]
    _, face_colour = _carve_and_colour(ds, face, view_ids, min_inside=0.0)
    face_pts = torch.cat([face, cand])
    face_col = torch.cat([face_colour, colour])

    # Mouth branch: behind the inner-lip contour.
    lips = face[list(INNER_LIPS if len(face) == N_LANDMARKS else INNER_MOUTH68)]
    centre, half = lips.mean(0), (lips.max(0).values - lips.min(0).values) / 2
    u = torch.rand(n_mouth, 3, generator=g) * 2 - 1
    mouth_pts = centre + u * torch.tensor([half[0], max(half[1], 0.004), 0.0])
    mouth_pts[:, 2] = centre[2] - 0.01 - 0.02 * torch.rand(n_mouth, generator=g)
    mouth_col = torch.tensor([0.35, 0.12, 0.12]).expand(n_mouth, 3)

    means = torch.cat([face_pts, mouth_pts])
    colours = torch.cat([face_col, mouth_col]).clamp(0, 1)
    n = len(means)
    spacing = float(((hi - lo).prod() / max(len(cand), 1)) ** (1 / 3))  # mean distance between samples
    K = (sh_degree + 1) ** 2
    sh = torch.zeros(n, K, 3)
    sh[:, 0] = rgb_to_sh_dc(colours)
    return Gaussians(
        means=means,
        quats=torch.tensor([1.0, 0, 0, 0]).expand(n, 4).clone(),
        log_scales=torch.full((n, 3), math.log(0.5 * spacing)),
        opacity_logits=torch.full((n,), math.log(0.1 / 0.9)),
        sh=sh,
        branch=torch.cat([torch.full((len(face_pts),), FACE), torch.full((n_mouth,), MOUTH)]).to(torch.uint8),
    )
