"""The neck-and-shoulders branch: 3D Gaussians of the body below the head, so that novel
views show a person and not a floating head (the torso of ER-NeRF and TalkingGaussian,
here as Gaussians).

The body does not move with the head. Canonical torso points live in the head frame at a
reference pose, the mean of the training cameras. The body is taken to be still in front
of the camera, so in a frame whose camera is c2w_i (head frame, OpenGL axes) it has
moved, relative to the head, by

    A_i = c2w_i @ inv(c2w_ref)

But people lean: the body follows part of the head's motion (on real clips a linear map
of the head's pose predicts most of the torso's sideways shift). A learned linear `sway`
of the pose features gives the body's own small rigid motion S_i on top. Each point
blends the body's motion with the head's (none) by a weight w(x): 1 on the upper neck,
which turns with the head; 0 on the shoulders, which stay with the body (two-bone linear
blend skinning). A small network of the relative pose adds what the blend cannot say,
such as the collar's shift when the head turns:

    x_i = w(x) x + (1 - w(x)) A_i S_i x + offset(enc(x), pose(A_i))

The branch is rendered as its own layer under the head: image = head over (torso over
plate). Novel views use A = I, the body in its reference relation to the head.
"""

from __future__ import annotations

import math
import warnings

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from capture.pose import so3_exp

from .dataset import Dataset
from .deform import _mlp
from .gaussians import TORSO, Gaussians, rgb_to_sh_dc
from .model import BranchParams

NECK_BELOW_CHIN_M = 0.04
"""Where the neck's blend weight is 1/2: this far below the fitted face's lowest point."""
NECK_SOFTNESS_M = 0.015
"""Width of the neck's blend from the head's motion to the body's (metres)."""
ENCODING_BOUND_M = 0.4
"""Positions are divided by this before the sinusoidal encoding (the torso is ~0.5 m wide)."""
BODY_DEPTH_BEHIND_ORIGIN_M = -0.03
"""The neck's axis, along the head frame's z (towards the camera), relative to its origin."""


def quat_multiply(a: Tensor, b: Tensor) -> Tensor:
    """Hamilton product of wxyz quaternions [..., 4] x [..., 4] -> [..., 4]."""
    aw, ax, ay, az = a.unbind(-1)
    bw, bx, by, bz = b.unbind(-1)
    return torch.stack([aw * bw - ax * bx - ay * by - az * bz, aw * bx + ax * bw + ay * bz - az * by,
                        aw * by - ax * bz + ay * bw + az * bx, aw * bz + ax * by - ay * bx + az * bw], -1)


def rotmat_to_quat(R: Tensor) -> Tensor:
    """[3, 3] rotation -> [4] unit wxyz quaternion with w >= 0 (Shepperd: from the largest
    of w, x, y, z, so it stays accurate at any angle)."""
    m = R
    t = torch.stack([1 + m[0, 0] + m[1, 1] + m[2, 2], 1 + m[0, 0] - m[1, 1] - m[2, 2],
                     1 - m[0, 0] + m[1, 1] - m[2, 2], 1 - m[0, 0] - m[1, 1] + m[2, 2]])
    k = int(t.argmax())
    s = 0.5 / torch.sqrt(t[k].clamp_min(1e-12))
    if k == 0:
        q = torch.stack([0.25 / s, (m[2, 1] - m[1, 2]) * s, (m[0, 2] - m[2, 0]) * s, (m[1, 0] - m[0, 1]) * s])
    elif k == 1:
        q = torch.stack([(m[2, 1] - m[1, 2]) * s, 0.25 / s, (m[0, 1] + m[1, 0]) * s, (m[0, 2] + m[2, 0]) * s])
    elif k == 2:
        q = torch.stack([(m[0, 2] - m[2, 0]) * s, (m[0, 1] + m[1, 0]) * s, 0.25 / s, (m[1, 2] + m[2, 1]) * s])
    else:
        q = torch.stack([(m[1, 0] - m[0, 1]) * s, (m[0, 2] + m[2, 0]) * s, (m[1, 2] + m[2, 1]) * s, 0.25 / s])
    return q * (1.0 if q[0] >= 0 else -1.0)


def mean_pose(c2w: Tensor) -> Tensor:
    """[T, 4, 4] rigid poses -> [4, 4] their mean: mean translation, and the rotation
    nearest the mean rotation matrix (chordal L2 mean)."""
    U, _, Vh = torch.linalg.svd(c2w[:, :3, :3].mean(0))
    R = U @ Vh
    if torch.det(R) < 0:
        R = U @ torch.diag(torch.tensor([1.0, 1.0, -1.0])) @ Vh
    out = torch.eye(4)
    out[:3, :3], out[:3, 3] = R, c2w[:, :3, 3].mean(0)
    return out


def body_motion(c2w: Tensor, reference: Tensor) -> Tensor:
    """[4, 4] how the body has moved relative to the head in a frame with camera c2w
    [4, 4], from the reference camera [4, 4] (both head frame, the same axes)."""
    return c2w @ torch.linalg.inv(reference)


def pose_features(A: Tensor) -> Tensor:
    """[6] features of a body motion A [4, 4], zero at the identity: twice the vector part of
    its quaternion (the axis-angle for small turns) and its translation in decimetres."""
    return torch.cat([2 * rotmat_to_quat(A[:3, :3])[1:], 10 * A[:3, 3]])


def encode(xyz: Tensor, frequencies: int = 4) -> Tensor:
    """[N, 3] -> [N, 3 + 6 * frequencies] sinusoidal encoding of positions / ENCODING_BOUND_M."""
    p = xyz / ENCODING_BOUND_M
    bands = [p] + [f(p * (2.0**k) * math.pi) for k in range(frequencies) for f in (torch.sin, torch.cos)]
    return torch.cat(bands, -1)


class TorsoModel(nn.Module):
    """The torso's canonical Gaussians, its blend weights and its pose-conditioned offsets.

    g: canonical Gaussians (head frame at the reference pose); reference: [4, 4] the
    reference camera (c2w, the dataset's axes); neck_y: head-frame height where the blend
    weight is 1/2.
    """

    def __init__(self, g: Gaussians, reference: Tensor, neck_y: float, width: int = 64):
        super().__init__()
        self.params = BranchParams(g)
        self.register_buffer("reference", reference.clone().float())
        self.register_buffer("neck_y", torch.tensor(float(neck_y)))
        d = encode(torch.zeros(1, 3)).shape[1]
        self.blend = _mlp(d, 32, 1)  # residual of the blend weight's logit (starts at zero)
        self.offset = _mlp(d + 6, width, 3)  # pose-conditioned position offset (starts at zero)
        self.sway = nn.Linear(6, 6, bias=False)  # pose -> the body's own turn (rad) and shift (dm)
        nn.init.zeros_(self.sway.weight)

    def __len__(self) -> int:
        return len(self.params)

    def head_weight(self, xyz: Tensor) -> Tensor:
        """[N, 1] how much each canonical point [N, 3] moves with the head (1) or the body (0)."""
        logit = (xyz[:, 1:2] - self.neck_y) / NECK_SOFTNESS_M + self.blend(encode(xyz))
        return torch.sigmoid(logit)

    def deformed(self, A: Tensor | None = None, *, frozen: bool = False) -> tuple[Gaussians, Tensor]:
        """The torso's Gaussians under body motion A [4, 4] (None: the reference, A = I), and
        the mean squared pose-conditioned offset in cm (a regulariser)."""
        p = self.params
        get = (lambda t: t.detach()) if frozen else (lambda t: t)
        x, q = get(p.means), F.normalize(get(p.quats), dim=-1)
        A = torch.eye(4) if A is None else A.to(x)
        pose = pose_features(A)
        sway = self.sway(pose)
        R = A[:3, :3] @ so3_exp(sway[None, :3])[0]
        t = A[:3, :3] @ sway[3:] / 10 + A[:3, 3]
        e = encode(x.detach())
        w = self.head_weight(x.detach())
        offset = self.offset(torch.cat([e, pose.expand(len(x), 6)], -1))
        means = w * x + (1 - w) * (x @ R.T + t) + offset
        quats = w * q + (1 - w) * quat_multiply(rotmat_to_quat(R.detach()).expand_as(q), q)
        sh = torch.cat([get(p.sh_dc), get(p.sh_rest)], 1)
        label = torch.full((len(x),), TORSO, dtype=torch.uint8)
        g = Gaussians(means, quats, get(p.log_scales), get(p.opacity_logits), sh, label)
        return g, ((100 * offset) ** 2).mean() if len(x) else x.new_zeros(())

    def motion_in(self, c2w: Tensor) -> Tensor:
        """[4, 4] body motion of a frame whose camera is c2w [4, 4]."""
        return body_motion(c2w, self.reference)


def body_silhouette(ds: Dataset, views: list[int], chin_row: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The body as the (still) camera sees it: pixels the person covers in most views below
    a line a little above each view's chin, including what the head hides there.

    chin_row: [len(views)] the lowest row of each view's head mask. Returns (mask [S, S]
    bool, the median colour of the visible torso [S, S, 3] float, inpainted where the head
    always hides it).
    """
    S = ds.size
    votes = np.zeros((S, S), np.float32)
    visible = []
    rows = np.arange(S)[:, None]
    for i, chin in zip(views, chin_row):
        f = ds[i]
        head = f.masks["head"].numpy()
        top = np.nonzero(head.any(1))[0]
        height = (chin - top[0]) if len(top) else 0
        below = rows >= chin - 0.35 * height
        votes += f.masks["person"].numpy() & below
        rgb = f.image.numpy().copy()
        rgb[~f.masks["torso"].numpy()] = np.nan
        visible.append(rgb)
    mask = votes >= 0.5 * len(views)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # pixels never seen as torso
        colour = np.nanmedian(np.stack(visible), 0)
    holes = np.isnan(colour).any(-1)
    colour = np.nan_to_num(colour, nan=0.5).clip(0, 1)
    if holes.any() and not holes.all():
        img = (colour * 255).astype(np.uint8)
        colour = cv2.inpaint(img, holes.astype(np.uint8), 5, cv2.INPAINT_TELEA).astype(np.float32) / 255
    return mask, colour


def init_torso(ds: Dataset, train_ids: list[int], n_points: int, sh_degree: int, views: int = 16,
               seed: int = 0) -> TorsoModel | None:
    """Initial torso from the person masks and the head frame's geometry; None when the
    frames show no body below the head.

    The body's silhouette (body_silhouette) is lifted onto an elliptic cylinder per image
    row: its centre on the neck's axis behind the face, its half-depth half its half-width
    (at most 10 cm), so the shoulders curve back from the neck as a person's do.
    """
    face = ds.face_geometry()
    c2w = torch.stack([torch.tensor(ds.frames[i]["transform_matrix"], dtype=torch.float32) for i in train_ids])
    reference = mean_pose(c2w)
    view_ids = [train_ids[k] for k in np.linspace(0, len(train_ids) - 1, min(views, len(train_ids))).round().astype(int)]
    chin = []
    for i in view_ids:
        rows = np.nonzero(ds[i].masks["head"].numpy().any(1))[0]
        chin.append(rows[-1] if len(rows) else ds.size)
    mask, colour = body_silhouette(ds, view_ids, np.array(chin))
    if mask.sum() < 16:
        return None
    viewmat = torch.linalg.inv(reference @ torch.diag(torch.tensor([1.0, -1.0, -1.0, 1.0])))  # OpenCV
    centre_head = torch.tensor([0.0, 0.0, BODY_DEPTH_BEHIND_ORIGIN_M]) if face is None else \
        torch.tensor([float(face[:, 0].mean()), 0.0, BODY_DEPTH_BEHIND_ORIGIN_M])
    z_body = float((viewmat[:3, :3] @ centre_head + viewmat[:3, 3])[2])  # the neck's depth
    fx, fy, cx, cy = (float(ds.K[0, 0]), float(ds.K[1, 1]), float(ds.K[0, 2]), float(ds.K[1, 2]))

    g = torch.Generator().manual_seed(seed)
    ys, xs = np.nonzero(mask)
    pick = torch.randint(len(xs), (n_points,), generator=g).numpy()
    jitter = torch.rand(n_points, 2, generator=g).numpy() - 0.5
    u, v = xs[pick] + 0.5 + jitter[:, 0], ys[pick] + 0.5 + jitter[:, 1]
    left = np.array([xs[ys == r].min() if (ys == r).any() else 0 for r in range(ds.size)], np.float32)
    right = np.array([xs[ys == r].max() + 1 if (ys == r).any() else 0 for r in range(ds.size)], np.float32)
    row = ys[pick]
    half = np.maximum((right[row] - left[row]) / 2, 1) * z_body / fx  # metres
    mid = ((left[row] + right[row]) / 2 - cx) * z_body / fx
    X = (u - cx) * z_body / fx
    s = np.clip((X - mid) / half, -1, 1)
    Z = z_body - np.minimum(0.5 * half, 0.10) * np.sqrt(1 - s**2)
    cam = np.stack([(u - cx) * Z / fx, (v - cy) * Z / fy, Z], -1).astype(np.float32)
    means = (torch.from_numpy(cam) - viewmat[:3, 3]) @ viewmat[:3, :3]  # camera -> head frame
    rgb = torch.from_numpy(colour[ys[pick], xs[pick]])
    spacing = math.sqrt(len(xs) / n_points) * z_body / fx
    n = n_points
    sh = torch.zeros(n, (sh_degree + 1) ** 2, 3)
    sh[:, 0] = rgb_to_sh_dc(rgb)
    gaussians = Gaussians(means=means.float(), quats=torch.tensor([1.0, 0, 0, 0]).expand(n, 4).clone(),
                          log_scales=torch.full((n, 3), math.log(0.7 * spacing)),
                          opacity_logits=torch.full((n,), math.log(0.5 / 0.5)), sh=sh,
                          branch=torch.full((n,), TORSO, dtype=torch.uint8))
    chin_y = float(face[:, 1].min()) if face is not None else float(means[:, 1].max())
    return TorsoModel(gaussians, reference, neck_y=chin_y - NECK_BELOW_CHIN_M)
