"""The neck-and-shoulders branch: 3D Gaussians of the body below the head, so that novel
views show a person and not a floating head (the torso of ER-NeRF and TalkingGaussian,
here as Gaussians).

The body does not move with the head. Canonical torso points live in the head frame at a
reference pose, the mean of the training cameras. Were the body still in front of the
camera, in a frame whose camera is c2w_i (head frame, OpenGL axes) it would have moved,
relative to the head, by c2w_i @ inv(c2w_ref). But people lean and shift: the body is
*tracked* like the head. Each dataset frame's torso (below the neck) is registered to
the clip's median torso image by a turn, a scale and a shift in the image plane
(`track_body`). At the body's depth that is a rigid motion M_i of the body in camera
coordinates (a turn about the optical axis, a move along it and across it), so

    A_i = c2w_i @ F M_i F @ inv(c2w_ref)        (F = diag(1, -1, -1, 1): OpenCV <-> OpenGL)

Each point blends the body's motion with the head's (none) by a weight w(x): 1 on the
upper neck, which turns with the head; 0 on the shoulders, which stay with the body
(two-bone linear blend skinning). A small network of the relative pose adds what the
blend cannot say, such as the collar's shift when the head turns:

    x_i = w(x) x + (1 - w(x)) A_i x + offset(enc(x), pose(A_i))

As the head's tracked pose drives the head in a dataset frame, the body's tracked motion
drives the body there; held-out frames are scored with both, as ER-NeRF scores its
torso with the tracked pose.

The branch is rendered as its own layer under the head: image = head over (torso over
plate). Novel views use A = I, the body in its reference relation to the head.
"""

from __future__ import annotations

import math
import sys
import warnings
from typing import TYPE_CHECKING

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from .dataset import GL_TO_CV, Dataset, dilate, spread, world_to_camera
from .deform import _mlp
from .gaussians import TORSO, Gaussians, rgb_to_sh_dc
from .model import BranchParams
from .pose import correction_matrix

if TYPE_CHECKING:
    from .model import AvatarModel

NECK_BELOW_CHIN_M = 0.04
"""Where the neck's blend weight is 1/2: this far below the fitted face's lowest point."""
NECK_SOFTNESS_M = 0.015
"""Width of the neck's blend from the head's motion to the body's (metres)."""
MAX_SCALE_M = 0.02
"""Largest standard deviation a torso Gaussian renders with: a long one hidden behind the
head in every training view would stick out of it in a novel view."""
TOP_ABOVE_CHIN_M = 0.03
"""The torso ends this far above the fitted face's lowest point (behind the jaw): points
that rise higher fade out, so the branch cannot grow up behind the head, where no
training view sees it and a novel view would."""
ENCODING_BOUND_M = 0.4
"""Positions are divided by this before the sinusoidal encoding (the torso is ~0.5 m wide)."""
BODY_DEPTH_BEHIND_ORIGIN_M = -0.03
"""The neck's axis, along the head frame's z (towards the camera), relative to its origin."""
MAX_CORRECTION_RAD = 0.15
MAX_CORRECTION_M = 0.03
"""The largest correction refine_tracks makes to a registered body (8.6 degrees, 3 cm):
beyond, the fit has run off, and the image-plane registration is kept for that frame."""


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


def body_motion(c2w: Tensor, reference: Tensor, track: Tensor | None = None) -> Tensor:
    """[4, 4] how the body has moved relative to the head in a frame with camera c2w
    [4, 4], from the reference camera [4, 4] (both head frame, OpenGL axes); track [4, 4]:
    the body's own motion in that frame, camera coordinates (OpenCV), or None (still)."""
    if track is None:
        return c2w @ torch.linalg.inv(reference)
    flip = GL_TO_CV.to(c2w)
    return c2w @ flip @ track @ flip @ torch.linalg.inv(reference)


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
    weight is 1/2; tracks: [N, 4, 4] the body's tracked motion in each dataset frame
    (camera coordinates, OpenCV; `track_body`).
    """

    def __init__(self, g: Gaussians, reference: Tensor, neck_y: float, tracks: Tensor, width: int = 64):
        super().__init__()
        self.params = BranchParams(g)
        self.register_buffer("reference", reference.clone().float())
        self.register_buffer("neck_y", torch.tensor(float(neck_y)))
        self.register_buffer("tracks", tracks.clone().float())
        d = encode(torch.zeros(1, 3)).shape[1]
        self.blend = _mlp(d, 32, 1)  # residual of the blend weight's logit (starts at zero)
        self.offset = _mlp(d + 6, width, 3)  # pose-conditioned position offset (starts at zero)

    def __len__(self) -> int:
        return len(self.params)

    def head_weight(self, xyz: Tensor) -> Tensor:
        """[N, 1] how much each canonical point [N, 3] moves with the head (1) or the body (0)."""
        logit = (xyz[:, 1:2] - self.neck_y) / NECK_SOFTNESS_M + self.blend(encode(xyz))
        return torch.sigmoid(logit)

    def offset_at(self, A: Tensor) -> Tensor:
        """[N, 3] the pose-conditioned offsets of the canonical points under body motion A [4, 4]."""
        x = self.params.means.detach()
        return self.offset(torch.cat([encode(x), pose_features(A.to(x)).expand(len(x), 6)], -1))

    def deformed(self, A: Tensor | None = None, offset: Tensor | None = None) -> tuple[Gaussians, Tensor]:
        """The torso's Gaussians under body motion A [4, 4] (None: the reference, A = I), and
        the mean squared pose-conditioned offset in cm (a regulariser). offset: [N, 3] the
        offsets to use instead of offset_at(A) (a fit of A that holds them)."""
        p = self.params
        x, q = p.means, F.normalize(p.quats, dim=-1)
        A = torch.eye(4, device=x.device) if A is None else A.to(x)
        R, t = A[:3, :3], A[:3, 3]
        w = self.head_weight(x.detach())
        offset = self.offset_at(A) if offset is None else offset
        means = w * x + (1 - w) * (x @ R.T + t) + offset
        quats = w * q + (1 - w) * quat_multiply(rotmat_to_quat(R).expand_as(q), q)
        sh = torch.cat([p.sh_dc, p.sh_rest], 1)
        label = torch.full((len(x),), TORSO, dtype=torch.uint8, device=x.device)
        top = self.neck_y + NECK_BELOW_CHIN_M + TOP_ABOVE_CHIN_M
        opacity = torch.sigmoid(p.opacity_logits) * torch.sigmoid((top - x[:, 1].detach()) / 0.005)
        logits = torch.logit(opacity.clamp(1e-6, 1 - 1e-6))
        g = Gaussians(means, quats, p.log_scales.clamp(max=math.log(MAX_SCALE_M)), logits, sh, label)
        return g, ((100 * offset) ** 2).mean() if len(x) else x.new_zeros(())

    def motion_in(self, c2w: Tensor, index: int | None = None) -> Tensor:
        """[4, 4] body motion relative to the head in dataset frame `index`, whose camera is
        c2w [4, 4]; with index None, the body still in front of the camera."""
        return body_motion(c2w, self.reference, None if index is None else self.tracks[index])


def register_similarity(template: np.ndarray, image: np.ndarray, mask: np.ndarray, centre: np.ndarray,
                        start: np.ndarray, iterations: int = 40) -> np.ndarray:
    """The turn, log-scale and shift (theta, sigma, tx, ty) about `centre` [2] that carry
    `template` [h, w] onto `image` [h, w] inside `mask` [h, w] bool:
    image(e^sigma R(theta) (u - c) + c + t) ~ template(u). Gauss-Newton on the masked
    pixels, from `start` [4]; `start` again if that does not lower the error or leaves
    plausible bounds (a turn of 0.3 rad, a scale of 20 %, a shift of a quarter of the image).
    (OpenCV's ECC masks the moving image only, and is biased by the mask's edge; this
    masks the template.)"""
    ys, xs = np.nonzero(mask)
    u = np.stack([xs, ys], 1).astype(np.float64) - centre
    T = template[ys, xs].astype(np.float64)
    gx, gy = cv2.Sobel(image, cv2.CV_32F, 1, 0, ksize=3) / 8, cv2.Sobel(image, cv2.CV_32F, 0, 1, ksize=3) / 8

    def sample(p: np.ndarray, *images: np.ndarray) -> tuple[list[np.ndarray], float, float]:
        k = math.exp(p[1])
        c, s_ = k * math.cos(p[0]), k * math.sin(p[0])
        wx = (c * u[:, 0] - s_ * u[:, 1] + centre[0] + p[2]).astype(np.float32)[None]
        wy = (s_ * u[:, 0] + c * u[:, 1] + centre[1] + p[3]).astype(np.float32)[None]
        return [cv2.remap(a, wx, wy, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)[0].astype(np.float64)
                for a in images], c, s_

    p = start.astype(np.float64).copy()
    for _ in range(iterations):
        (img, ix, iy), c, s_ = sample(p, image, gx, gy)
        d_theta = ix * (-s_ * u[:, 0] - c * u[:, 1]) + iy * (c * u[:, 0] - s_ * u[:, 1])
        d_sigma = ix * (c * u[:, 0] - s_ * u[:, 1]) + iy * (s_ * u[:, 0] + c * u[:, 1])
        J = np.stack([d_theta, d_sigma, ix, iy], 1)
        step = np.linalg.lstsq(J.T @ J + 1e-9 * np.eye(4), -J.T @ (img - T), rcond=None)[0]
        p += step
        if not np.isfinite(p).all() or np.abs(step[:2]).max() < 1e-6 and np.abs(step[2:]).max() < 1e-3:
            break
    bound = np.array([0.3, math.log(1.2), image.shape[1] / 4, image.shape[0] / 4])
    if not np.isfinite(p).all() or (np.abs(p) > bound).any():
        return start
    error = lambda q: float(np.square(sample(q, image)[0][0] - T).mean())  # noqa: E731
    return p if error(p) <= error(start) else start


def track_body(ds: Dataset, train_ids: list[int], body: np.ndarray, depth: float, template_frames: int = 48,
               side: int = 256, progress: bool = False) -> Tensor:
    """[len(ds), 4, 4] the body's motion in every dataset frame, camera coordinates (OpenCV).

    Its torso is registered to the median torso image of the training frames by a turn and
    scale about the principal point and a shift in the image plane (register_similarity on
    the grey images at `side` pixels at most, coarse to fine, each frame starting from the
    previous one; inside `body` [S, S] bool: the torso below the neck). That is a rotation
    about the optical axis (at any depth), a move along it (the scale, at the body's
    `depth` in metres) and a shift parallel to the image. progress: show a progress bar.
    """
    S = ds.size
    r = min(1.0, side / S)
    n = max(8, round(S * r))
    pick = spread(train_ids, template_frames)

    def grey(i: int) -> np.ndarray:
        g = cv2.cvtColor((ds[i].image.cpu().numpy() * 255).astype(np.uint8), cv2.COLOR_RGB2GRAY)
        return cv2.GaussianBlur(cv2.resize(g, (n, n), interpolation=cv2.INTER_AREA).astype(np.float32), (0, 0), 1.0)

    template = np.median(np.stack([grey(i) for i in pick]), 0).astype(np.float32)
    mask = cv2.resize(body.astype(np.uint8), (n, n), interpolation=cv2.INTER_NEAREST) > 0
    fx, fy = float(ds.K[0, 0]), float(ds.K[1, 1])
    centre = ds.K[:2, 2].double().cpu().numpy() * r
    half = (n // 2, n // 2)
    coarse = (cv2.resize(template, half, interpolation=cv2.INTER_AREA),
              cv2.resize(mask.astype(np.uint8), half, interpolation=cv2.INTER_NEAREST) > 0)
    tracks, p = [], np.zeros(4)
    for i in tqdm(range(len(ds)), desc="track body", unit="frame", disable=not progress, file=sys.stderr,
                  leave=False):
        image = grey(i)
        if mask.sum() >= 64:
            q = p
            if coarse[1].sum() >= 64:
                q = register_similarity(coarse[0], cv2.resize(image, half, interpolation=cv2.INTER_AREA), coarse[1],
                                        centre / 2, p * [1, 1, 0.5, 0.5], iterations=20) * [1, 1, 2, 2]
            p = register_similarity(template, image, mask, centre, q)
        # Scale s at depth z: the body moved to depth z / s, and its shift is seen there.
        moved = depth * math.exp(-p[1])
        M = np.eye(4)
        M[:2, :2] = [[math.cos(p[0]), -math.sin(p[0])], [math.sin(p[0]), math.cos(p[0])]]
        M[:3, 3] = p[2] / r * moved / fx, p[3] / r * moved / fy, moved - depth
        tracks.append(M)
    return torch.tensor(np.stack(tracks), dtype=torch.float32)


def twist(rotation: Tensor, shift: Tensor, pivot: Tensor) -> Tensor:
    """[4, 4] a rigid motion: a turn by the rotation vector [3] (radians) about `pivot` [3],
    then a shift [3] (metres)."""
    M = correction_matrix(torch.cat([rotation, 100 * shift]))  # turn about the origin, shift in cm
    return torch.cat([torch.cat([M[:3, :3], (M[:3, 3] + pivot - M[:3, :3] @ pivot)[:, None]], 1), M[3:]])


def refine_tracks(model: AvatarModel, ds: Dataset, *, iterations: int = 3, max_keyframes: int = 150,
                  side: int = 256, backend: str = "auto", progress: bool = False) -> Tensor:
    """[len(ds), 4, 4] the body's tracks (`TorsoModel.tracks`) refined through the renderer.

    The image-plane registration of `track_body` cannot see a body that turns or leans
    towards the camera, and misses the collar and tie by a pixel. Here a frame's track gains
    a rigid correction in camera coordinates, a turn about the torso's centre and a shift
    (6 numbers), fitted by Levenberg-Marquardt (`iterations`, forward-difference Jacobian)
    to the torso layer over the plate against the frame, outside the head's mask (the head
    hides the rest), at `side` pixels at most; the pose-conditioned offsets are held at the
    registered pose during the fit; a correction beyond MAX_CORRECTION_RAD or
    MAX_CORRECTION_M is dropped. Every third frame is fitted (fewer on long clips: at
    most `max_keyframes`, so the cost is bounded), in order, each from the previous
    correction, and the frames between take the linear blend of their neighbours' (a body
    moves smoothly). As the head's tracked pose does, every frame's body pose comes from
    that frame: held-out frames are tracked like training ones.
    """
    torso = model.torso
    n = min(ds.size, side)
    K = ds.K.clone()
    K[:2] *= n / ds.size

    def shrink(x: Tensor) -> Tensor:
        """[S, S, C] -> [n, n, C], area-averaged."""
        return F.interpolate(x.permute(2, 0, 1)[None], size=(n, n), mode="area")[0].permute(1, 2, 0)

    plate = shrink(ds.background)
    # Units of 1/100 rad and 1 mm, so that the six numbers are alike in size.
    units = torch.tensor([0.01] * 3 + [0.001] * 3, device=ds.device)
    eye6 = torch.eye(6, device=ds.device)

    def fit(i: int, start: Tensor) -> tuple[Tensor, Tensor]:
        """Frame i's correction [6] from `start` [6], and the torso's centre [3] (camera)."""
        f, viewmat = ds[i], ds.viewmat(i)
        region = shrink((~dilate(f.masks["head"], max(1, ds.size // 128))).float()[..., None])[..., 0] > 0.999
        A = torso.motion_in(f.c2w, i)
        offset = torso.offset_at(A)
        means = torso.deformed(A, offset=offset)[0].means
        pivot = (means @ viewmat[:3, :3].T + viewmat[:3, 3]).mean(0)
        if region.sum() < 64:
            return start, pivot
        gt = shrink(f.image)[region]
        to_head = torch.linalg.inv(viewmat)

        def residual(x: Tensor) -> Tensor:
            E = to_head @ twist(x[:3] * units[:3], x[3:] * units[3:], pivot) @ viewmat
            layer = model.render_layer(torso.deformed(E @ A, offset=offset)[0], viewmat, K, n, 0, backend)
            return ((layer.rgb + (1 - layer.alpha) * plate)[region] - gt).flatten()

        x, r, damping, h = start.clone(), residual(start), 1e-3, 0.1
        for _ in range(iterations):
            J = torch.stack([(residual(x + h * e) - r) / h for e in eye6], 1)
            JtJ, g = J.T @ J, J.T @ r
            for _ in range(4):
                step = torch.linalg.solve(JtJ + damping * (torch.diag(torch.diag(JtJ)) + 1e-9 * eye6), -g)
                r_new = residual(x + step)
                if r_new.square().sum() < r.square().sum():
                    x, r, damping = x + step, r_new, max(damping / 10, 1e-6)
                    break
                damping *= 10
            else:
                break  # no step lowers the error: converged
        if (x[:3] * units[:3]).norm() > MAX_CORRECTION_RAD or (x[3:] * units[3:]).norm() > MAX_CORRECTION_M:
            x = torch.zeros_like(x)  # a fit that ran off (an unfinished torso, a blank shirt): the registration
        return x, pivot

    tracks = torso.tracks.clone()
    stride = max(3, math.ceil(len(ds) / max_keyframes))
    keys = list(range(0, len(ds), stride))
    if keys[-1] != len(ds) - 1:
        keys.append(len(ds) - 1)
    found, x = {}, torch.zeros(6, device=ds.device)
    with torch.no_grad():
        for i in tqdm(keys, desc="refine body", unit="frame", disable=not progress, file=sys.stderr, leave=False):
            x, pivot = fit(i, x)
            found[i] = torch.cat([x, pivot])
        for a, b in zip(keys, keys[1:] + [keys[-1] + 1]):
            for i in range(a, b):
                t = (i - a) / (b - a)
                blend = (1 - t) * found[a] + t * found.get(b, found[a])  # the correction [6] and pivot [3]
                tracks[i] = twist(blend[:3] * units[:3], blend[3:6] * units[3:], blend[6:]) @ tracks[i]
    return tracks


def body_silhouette(ds: Dataset, views: list[int], chin_row: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The body as the (still) camera sees it: pixels the person covers in most views below
    a line a little above the bottom of each view's head mask (12 % of the head's height:
    under the jaw), including what the head hides there (the neck behind the chin).

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
        head = f.masks["head"].cpu().numpy()
        top = np.nonzero(head.any(1))[0]
        height = (chin - top[0]) if len(top) else 0
        below = rows >= chin - 0.12 * height
        votes += f.masks["person"].cpu().numpy() & below
        rgb = f.image.cpu().numpy().copy()
        rgb[~f.masks["torso"].cpu().numpy()] = np.nan
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


def init_torso(ds: Dataset, train_ids: list[int], n_points: int, views: int = 16,
               seed: int = 0, progress: bool = False) -> TorsoModel | None:
    """Initial torso from the person masks and the head frame's geometry; None when the
    frames show no body below the head. Its colours are view-independent (SH degree 0):
    clothes are matte, and the torso's sides are seen from few directions.

    The body's silhouette (body_silhouette) is lifted onto an elliptic cylinder per image
    row: its centre on the neck's axis behind the face, its half-depth half its half-width
    (at most 10 cm), so the shoulders curve back from the neck as a person's do.
    """
    face = ds.face_geometry()
    c2w = torch.stack([torch.tensor(ds.frames[i]["transform_matrix"], dtype=torch.float32) for i in train_ids])
    reference = mean_pose(c2w)
    view_ids = spread(train_ids, views)
    chin = []
    for i in view_ids:
        rows = np.nonzero(ds[i].masks["head"].cpu().numpy().any(1))[0]
        chin.append(rows[-1] if len(rows) else ds.size)
    seen = np.mean([ds[i].masks["torso"].cpu().numpy() for i in view_ids], 0) >= 0.5  # the visible body
    if seen.sum() < 16:
        return None
    mask, colour = body_silhouette(ds, view_ids, np.array(chin))
    viewmat = world_to_camera(reference)
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
    sh = rgb_to_sh_dc(rgb)[:, None]
    gaussians = Gaussians(means=means.float(), quats=torch.tensor([1.0, 0, 0, 0]).expand(n, 4).clone(),
                          log_scales=torch.full((n, 3), math.log(0.7 * spacing)),
                          opacity_logits=torch.zeros(n), sh=sh,  # opacity 1/2
                          branch=torch.full((n,), TORSO, dtype=torch.uint8))
    chin_y = float(face[:, 1].min()) if face is not None else float(means[:, 1].max())
    tracks = track_body(ds, train_ids, tracking_region(seen, np.array(chin)), z_body, progress=progress)
    return TorsoModel(gaussians, reference, neck_y=chin_y - NECK_BELOW_CHIN_M, tracks=tracks)


def tracking_region(seen: np.ndarray, chin_row: np.ndarray) -> np.ndarray:
    """[S, S] bool where the body is tracked: the torso most views show (`seen` [S, S]),
    widened to take in its outline against the background, and kept clear of the neck
    (which turns with the head) by a band below the chin rows [views]."""
    S = seen.shape[0]
    k = max(3, S // 64) * 2 + 1
    region = cv2.dilate(seen.astype(np.uint8), cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))) > 0
    region[: int(np.median(chin_row) + 0.06 * S)] = False
    return region
