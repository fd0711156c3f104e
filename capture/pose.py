"""Head pose per frame and one focal length per video, fitted jointly.

1. A canonical face for this subject: per-frame 3D landmarks aligned by
   similarity Procrustes on the rigid landmarks and averaged, scaled so the outer eye
   corners are 9 cm apart, and expressed in a head frame (x to the subject's left, y up,
   z out of the face; origin 9 cm behind the eyes).
2. A focal sweep (as ER-NeRF does): for each log-spaced field of view the landmarks are
   back-projected with that focal, the canonical face rebuilt from them (so its depth is
   consistent with the hypothesis), and SQPnP run per frame; the focal with the lowest
   reprojection error wins (coarse grid, then two finer grids around the best). Only
   the right focal makes the shapes agree across head rotations, but with the small
   turns of a talking head the error curve is often nearly flat. So the sweep's
   uncertainty is measured (bootstrap over frames, as a log-focal standard deviation)
   and the estimate is combined with a log-normal prior on the field of view, centred
   on ER-NeRF's sweep range (600-1500 px at 512 px, i.e. about 30 deg): a decisive sweep
   keeps its minimum, an uninformative one leans on the prior.
3. Joint refinement in torch (L-BFGS, float64): per-frame rotation and
   translation, and small per-subject offsets of the canonical rigid points, under a
   robust (pseudo-Huber) reprojection loss and a robust temporal prior on the
   acceleration of the projected rigid points (frames adjacent in time only). Only rigid landmarks enter, so speech cannot wobble the
   head.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
import torch

from avatar.dataset_format import BROW_TOP, CHIN, EYE_OUTER, RIGID
from avatar.geometry import pseudo_huber, umeyama

EYE_CORNER_DISTANCE_M = 0.09  # adult outer canthi, ex-ex
HEAD_CENTER_BEHIND_EYES_M = 0.09


@dataclass
class PoseFit:
    """Result of :func:`fit_head_pose` for T tracked frames."""

    focal: float  # pixels, at the image size the landmarks are in
    R: np.ndarray  # [T, 3, 3] head -> camera rotation (OpenCV camera axes)
    t: np.ndarray  # [T, 3] head -> camera translation, metres
    canonical: np.ndarray  # [478, 3] face landmarks in the head frame, metres
    reproj_px: np.ndarray  # [T] median rigid-landmark reprojection error per frame
    sweep: list[tuple[float, float]]  # (focal, median error) per swept focal
    focal_sweep: float  # the sweep's own minimum, before the prior
    focal_log_sd: float  # bootstrap standard deviation of log(focal) of the sweep's minimum
    jitter_deg: float  # high-frequency rotation jitter of the fitted track
    jitter_raw_deg: float  # same for independent per-frame PnP at the same focal


def c2w_opengl(R: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Head->camera poses R [T, 3, 3], t [T, 3] (OpenCV camera) -> [T, 4, 4] camera-to-world,
    OpenGL camera axes (x right, y up, z back), head at the origin."""
    w2c = np.tile(np.eye(4), (len(R), 1, 1))
    w2c[:, :3, :3] = R
    w2c[:, :3, 3] = t
    return np.linalg.inv(w2c) @ np.diag([1.0, -1.0, -1.0, 1.0])


def project_points(X: np.ndarray, R: np.ndarray, t: np.ndarray, focal: float, cx: float, cy: float) -> np.ndarray:
    """Head-frame points X [M, 3] seen from T poses (R [T, 3, 3], t [T, 3]) -> pixels [T, M, 2]."""
    Xc = X[None] @ np.swapaxes(R, 1, 2) + t[:, None]
    return focal * Xc[..., :2] / Xc[..., 2:] + np.array([cx, cy])


def backproject(lm3d: np.ndarray, focal: float, cx: float, cy: float) -> np.ndarray:
    """Metric camera-space landmarks under a focal hypothesis. lm3d: [T, 478, 3] -> [T, 478, 3].

    Depth of the face centre comes from the eye-corner distance (9 cm) measured in
    mediapipe's rotation-invariant 3D pixel scale; per-landmark depth adds mediapipe's
    relative z at that scale.
    """
    eye_px = np.linalg.norm(lm3d[:, EYE_OUTER[1]] - lm3d[:, EYE_OUTER[0]], axis=-1)  # [T]
    m_per_px = EYE_CORNER_DISTANCE_M / eye_px  # metres per pixel at the face
    z0 = focal * m_per_px  # [T] depth of mediapipe's z origin
    Z = z0[:, None] + lm3d[..., 2] * m_per_px[:, None]
    X = (lm3d[..., 0] - cx) * Z / focal
    Y = (lm3d[..., 1] - cy) * Z / focal
    return np.stack([X, Y, Z], -1)


def canonical_face(lm3d: np.ndarray) -> np.ndarray:
    """lm3d: [T, 478, 3] landmarks (x right, y down, z away; any common scale) -> [478, 3]
    in the head frame, metres (similarity-aligned median shape, eye corners 9 cm apart)."""
    rigid = list(RIGID)
    ref = lm3d[0].astype(np.float64)
    for _ in range(3):
        aligned = []
        for p in lm3d.astype(np.float64):
            s, R, t = umeyama(p[rigid], ref[rigid])
            aligned.append(p @ (s * R).T + t)
        ref = np.median(np.stack(aligned), axis=0)
    r_eye, l_eye = ref[EYE_OUTER[0]], ref[EYE_OUTER[1]]
    scale = EYE_CORNER_DISTANCE_M / np.linalg.norm(l_eye - r_eye)
    x = (l_eye - r_eye) / np.linalg.norm(l_eye - r_eye)  # towards the subject's left
    up = ref[BROW_TOP] - ref[CHIN]
    y = up - (up @ x) * x
    y /= np.linalg.norm(y)
    z = np.cross(x, y)  # out of the face, towards the camera
    basis = np.stack([x, y, z], axis=1)
    center = (r_eye + l_eye) / 2 - HEAD_CENTER_BEHIND_EYES_M / scale * z
    return ((ref - center) @ basis * scale).astype(np.float64)


def _pnp(X: np.ndarray, uv: np.ndarray, K: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ok, rvec, tvec = cv2.solvePnP(X, uv.astype(np.float64), K, None, flags=cv2.SOLVEPNP_SQPNP)
    if not ok:
        ok, rvec, tvec = cv2.solvePnP(X, uv.astype(np.float64), K, None, flags=cv2.SOLVEPNP_EPNP)
    return rvec.reshape(3), tvec.reshape(3)


def _project_np(X, rvec, tvec, K):
    uv, _ = cv2.projectPoints(X, rvec, tvec, K, None)
    return uv.reshape(-1, 2)


def _intrinsics(f: float, cx: float, cy: float) -> np.ndarray:
    return np.array([[f, 0, cx], [0, f, cy], [0, 0, 1]], np.float64)


def so3_exp(r: torch.Tensor) -> torch.Tensor:
    """Rodrigues: [T, 3] axis-angle -> [T, 3, 3], smooth at zero."""
    theta2 = (r * r).sum(-1, keepdim=True)
    theta = torch.sqrt(theta2 + 1e-24)
    small = theta2 < 1e-10
    a = torch.where(small, 1 - theta2 / 6, torch.sin(theta) / theta)
    b = torch.where(small, 0.5 - theta2 / 24, (1 - torch.cos(theta)) / (theta2 + 1e-24))
    zero = torch.zeros_like(r[:, 0])
    Kx = torch.stack([zero, -r[:, 2], r[:, 1], r[:, 2], zero, -r[:, 0], -r[:, 1], r[:, 0], zero], -1).reshape(-1, 3, 3)
    eye = torch.eye(3, dtype=r.dtype).expand_as(Kx)
    return eye + a[..., None] * Kx + b[..., None] * (Kx @ Kx)


def rotation_jitter_deg(R: np.ndarray, window: int = 5) -> float:
    """Median angle (degrees) between each rotation and its centred moving average.

    A 5-frame window at 25 fps removes motion slower than ~5 Hz, so what remains is the
    jitter (landmark noise, speech-driven wobble) a stabilised head must not have. The
    median keeps the few genuine quick head turns of a clip from dominating.
    """
    if len(R) < window:
        return 0.0
    half = window // 2
    angles = []
    for i in range(half, len(R) - half):
        # Window mean as an average of rotation vectors relative to R_i (small angles).
        rel = [cv2.Rodrigues(R[j] @ R[i].T)[0].reshape(3) for j in range(i - half, i + half + 1)]
        angles.append(float(np.linalg.norm(np.mean(rel, axis=0))))
    return math.degrees(float(np.median(angles)))


def fit_head_pose(
    lm: np.ndarray,
    width: int,
    height: int,
    fov_range_deg: tuple[float, float] = (8.0, 70.0),
    sweep_steps: int = 24,
    smoothness: float = 2.0,
    canonical: np.ndarray | None = None,
    frame_ids: np.ndarray | None = None,
    focal_prior: tuple[float, float] | None = (30.2, 0.35),
    focal: float | None = None,
) -> PoseFit:
    """Fit poses and focal to landmarks.

    Args:
        lm: [T, 478, 3] landmarks in pixels (x, y) plus mediapipe's relative depth (z).
        width, height: image size; the principal point is its centre.
        canonical: optional [478, 3] head-frame face to start from (default: from `lm`).
        frame_ids: [T] increasing frame numbers; the temporal prior only links frames
            that are adjacent in time (default: 0..T-1).
        focal_prior: (horizontal FOV in degrees, standard deviation of log focal) of the
            log-normal prior the sweep is combined with; None keeps the sweep's minimum.
        focal: a known focal length (pixels): no sweep, only poses and shape are fitted.
    """
    T = len(lm)
    rigid = list(RIGID)
    X0 = None if canonical is None else canonical.astype(np.float64)
    obs = lm[:, rigid, :2].astype(np.float64)
    cx, cy = width / 2.0, height / 2.0
    ids = np.arange(T) if frame_ids is None else np.asarray(frame_ids)
    # Triples (t-1, t, t+1) of consecutive frames carry the acceleration prior.
    triple = torch.tensor((ids[2:] - ids[:-2] == 2) if T >= 3 else np.zeros(0, bool))

    def bundle_adjust(f: float, poses):
        """Poses + per-subject shape offsets at a fixed focal: robust loss, temporal prior."""
        dt = torch.float64
        rvec = torch.tensor(np.stack([p[0] for p in poses]), dtype=dt, requires_grad=True)
        tvec = torch.tensor(np.stack([p[1] for p in poses]), dtype=dt, requires_grad=True)
        dX_mm = torch.zeros(len(rigid), 3, dtype=dt, requires_grad=True)
        X = torch.tensor(Xr, dtype=dt)
        target = torch.tensor(obs, dtype=dt)
        center = torch.tensor([cx, cy], dtype=dt)
        delta = 1.5  # px: pseudo-Huber scale; mediapipe noise is about a pixel
        delta_acc = 2.0  # px/frame^2: pseudo-Huber scale of the temporal prior
        px_per_mm = f / float(np.median([p[1][2] for p in poses])) * 1e-3

        def project() -> torch.Tensor:
            Xc = (X + 1e-3 * dX_mm)[None] @ so3_exp(rvec).transpose(1, 2) + tvec[:, None]
            return f * Xc[..., :2] / Xc[..., 2:] + center

        def objective() -> torch.Tensor:
            uv = project()
            r2 = ((uv - target) ** 2).sum(-1)
            loss = pseudo_huber(r2, delta).sum()
            if T >= 3:
                # Robust too: landmark jitter (a pixel or so) is damped, a real quick head
                # movement (tens of pixels of acceleration) is followed.
                a2 = ((uv[2:] - 2 * uv[1:-1] + uv[:-2]) ** 2).sum(-1)[triple]
                loss = loss + smoothness * pseudo_huber(a2, delta_acc).sum()
            # Weak shape prior: a 1 mm offset costs about 1 px^2 per 100 frames.
            return loss + 0.01 * T * ((dX_mm * px_per_mm) ** 2).sum()

        opt = torch.optim.LBFGS([rvec, tvec, dX_mm], lr=1.0, max_iter=400, tolerance_grad=1e-10, tolerance_change=1e-12,
                                history_size=50, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = objective()
            loss.backward()
            return loss

        opt.step(closure)
        with torch.no_grad():
            uv = project().numpy()
            err = float(np.median(np.linalg.norm(uv - obs, axis=-1)))
        return err, rvec.detach(), tvec.detach(), dX_mm.detach(), uv

    # 2. Focal sweep, coarse to fine: a canonical face consistent with each focal, PnP
    #    per frame (on at most 100 evenly spaced frames, to bound the cost).
    sample = np.unique(np.linspace(0, T - 1, min(T, 100)).round().astype(int))

    frame_errors: dict[float, np.ndarray] = {}  # focal -> [S] median error per sampled frame

    def sweep_error(f: float) -> float:
        canon_f = canonical_face(backproject(lm[sample], f, cx, cy)) if X0 is None else X0
        K = _intrinsics(f, cx, cy)
        errs = []
        for i in sample:
            p = _pnp(canon_f[rigid], obs[i], K)
            errs.append(np.median(np.linalg.norm(_project_np(canon_f[rigid], *p, K) - obs[i], axis=1)))
        frame_errors[f] = np.array(errs)
        return float(np.median(errs))

    def focal_of(fov_deg: float) -> float:
        return (width / 2) / math.tan(math.radians(fov_deg) / 2)

    sweep: list[tuple[float, float]] = []
    if focal is not None:
        f_sweep = f0 = float(focal)
        log_sd = 0.0
    else:
        grid = [focal_of(v) for v in np.geomspace(*fov_range_deg, sweep_steps)][::-1]  # increasing focal
        for _ in range(3):
            errors = [sweep_error(f) for f in grid]
            sweep += list(zip(grid, errors))
            i = int(np.argmin(errors))
            lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
            grid = list(np.geomspace(lo, hi, 9))
        sweep.sort()
        f_sweep = min(sweep, key=lambda fe: fe[1])[0]
        # Bootstrap over frames: how far the sweep's minimum moves when the frames change.
        focals = np.array(sorted(frame_errors))
        E = np.stack([frame_errors[f] for f in focals])  # [F, S]
        rng = np.random.default_rng(0)
        picks = [focals[np.argmin(np.median(E[:, rng.integers(0, E.shape[1], E.shape[1])], axis=1))] for _ in range(200)]
        log_sd = max(float(np.std(np.log(picks))), 1e-3)
        f0 = f_sweep
        if focal_prior is not None:
            prior_mean, prior_sd = math.log(focal_of(focal_prior[0])), focal_prior[1]
            w_data, w_prior = 1 / log_sd**2, 1 / prior_sd**2
            f0 = math.exp((w_data * math.log(f_sweep) + w_prior * prior_mean) / (w_data + w_prior))
    X0 = canonical_face(backproject(lm, f0, cx, cy)) if X0 is None else X0
    Xr = X0[rigid]
    K0 = _intrinsics(f0, cx, cy)
    poses0 = [_pnp(Xr, obs[i], K0) for i in range(T)]
    R_raw = np.stack([cv2.Rodrigues(p[0])[0] for p in poses0])

    # 3. Joint refinement of poses and face shape at that focal (the free shape offsets
    #    would absorb a free focal, so the sweep decides it).
    _, rvec, tvec, dX_mm, uv = bundle_adjust(f0, poses0)
    R = so3_exp(rvec).numpy()
    canon = X0.copy()
    canon[rigid] += 1e-3 * dX_mm.numpy()
    reproj = np.median(np.linalg.norm(uv - obs, axis=-1), axis=1)
    return PoseFit(
        focal=f0, R=R, t=tvec.numpy().copy(), canonical=canon,
        reproj_px=reproj, sweep=sweep, focal_sweep=f_sweep, focal_log_sd=log_sd, jitter_deg=rotation_jitter_deg(R), jitter_raw_deg=rotation_jitter_deg(R_raw),
    )
