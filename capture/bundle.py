"""Rig bundle adjustment: every camera's pose (and, where asked, its lens) and a rigid
object's pose at every timestep, fitted to where the object's points are seen.

    x_cam = R_c (R_t X_p + t_t) + t_c         camera c, timestep t, object point p
    uv    = project(x_cam; fx, fy, cx, cy, k1, k2, p1, p2, k3)   (OpenCV's model)

The first camera is the world frame (its pose is held at identity). The object's points
are known (a calibration board, whose scale is then the rig's), or refined about where
they start under a prior (a face: capture/face_calibration.py). Points matched between two
cameras at one instant (texture, not landmarks) may enter too, by their epipolar
(Sampson) distance: the rig's cameras are fixed to each other, so every instant's matches
obey one epipolar geometry per pair, whatever moves in front of them. Intrinsics are fitted
only where asked (see capture/charuco.py: DEPTH_RATIO for when they can be). Solved by
Levenberg-Marquardt with a robust (soft-L1) loss in pixels and the exact, sparse Jacobian.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch
from scipy.sparse import coo_matrix

from avatar.errors import AvatarError

from .pose import so3_exp

INTRINSICS = 9  # fx, fy, cx, cy, k1, k2, p1, p2, k3
CAMERA_PARAMS = INTRINSICS + 6


def rodrigues(rvecs: np.ndarray) -> np.ndarray:
    """[N, 3] rotation vectors -> [N, 3, 3] rotation matrices (capture.pose.so3_exp, in numpy)."""
    return so3_exp(torch.from_numpy(np.ascontiguousarray(rvecs, np.float64))).numpy()


def rotation_vector(R: np.ndarray) -> np.ndarray:
    return cv2.Rodrigues(np.asarray(R, np.float64))[0].ravel()


def triangulate(P: np.ndarray, uv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Linear (DLT) triangulation of points seen by several views.

    P: [F, 3, 4] projection matrices (K [R | t]); uv: [F, L, 2] pixels (undistorted).
    Returns points [L, 3] and their reprojection error [F, L] in pixels.
    """
    u, v = uv[..., 0], uv[..., 1]  # [F, L]
    rows = np.concatenate([u[..., None] * P[:, None, 2] - P[:, None, 0],
                           v[..., None] * P[:, None, 2] - P[:, None, 1]], axis=0)  # [2F, L, 4]
    A = rows.transpose(1, 0, 2)  # [L, 2F, 4]
    A = A / np.linalg.norm(A, axis=-1, keepdims=True).clip(1e-12)
    X = np.linalg.svd(A)[2][:, -1]  # [L, 4]
    X = X[:, :3] / X[:, 3:]
    proj = np.einsum("fij,lj->fli", P, np.concatenate([X, np.ones((len(X), 1))], 1))
    return X, np.linalg.norm(proj[..., :2] / proj[..., 2:] - uv, axis=-1)


def _project(cam: torch.Tensor, pose: torch.Tensor, point: torch.Tensor) -> torch.Tensor:
    """Pixels [M, 2] of object points [M, 3] under object poses [M, 6] (rotation vector,
    translation) seen by cameras [M, 15] (packed: fx fy cx cy k1 k2 p1 p2 k3, rotation
    vector, translation): the module doc's model, OpenCV's pinhole + Brown-Conrady lens."""
    world = (so3_exp(pose[:, :3]) @ point[:, :, None])[..., 0] + pose[:, 3:]
    x = (so3_exp(cam[:, 9:12]) @ world[:, :, None])[..., 0] + cam[:, 12:15]
    z = torch.where(x[:, 2].abs() < 1e-9, torch.full_like(x[:, 2], 1e-9), x[:, 2])
    a, b = x[:, 0] / z, x[:, 1] / z
    fx, fy, cx, cy, k1, k2, p1, p2, k3 = cam[:, :INTRINSICS].unbind(1)
    r2 = a * a + b * b
    radial = 1 + r2 * (k1 + r2 * (k2 + r2 * k3))
    xd = a * radial + 2 * p1 * a * b + p2 * (r2 + 2 * a * a)
    yd = b * radial + p1 * (r2 + 2 * b * b) + 2 * p2 * a * b
    return torch.stack([fx * xd + cx, fy * yd + cy], dim=1)


def _gathered(cameras: np.ndarray, poses: np.ndarray, points: np.ndarray, obs: "Observations"):
    return (torch.from_numpy(np.ascontiguousarray(cameras[obs.camera], np.float64)),
            torch.from_numpy(np.ascontiguousarray(poses[obs.timestep], np.float64)),
            torch.from_numpy(np.ascontiguousarray(points[obs.point], np.float64)))


@dataclass
class Observations:
    """Where object points are seen: camera [M], timestep [M], point [M] indices and
    pixels uv [M, 2]."""

    camera: np.ndarray
    timestep: np.ndarray
    point: np.ndarray
    uv: np.ndarray

    def subset(self, keep: np.ndarray) -> "Observations":
        return Observations(self.camera[keep], self.timestep[keep], self.point[keep], self.uv[keep])


@dataclass
class Matches:
    """One scene point seen by cameras a [E] and b [E] at the same instant, at undistorted
    pixels uv_a [E, 2] and uv_b [E, 2] (the lens's distortion taken out)."""

    camera_a: np.ndarray
    camera_b: np.ndarray
    uv_a: np.ndarray
    uv_b: np.ndarray

    def __len__(self) -> int:
        return len(self.camera_a)

    def subset(self, keep: np.ndarray) -> "Matches":
        return Matches(self.camera_a[keep], self.camera_b[keep], self.uv_a[keep], self.uv_b[keep])


def _sampson(cam_a: torch.Tensor, cam_b: torch.Tensor, uv_a: torch.Tensor, uv_b: torch.Tensor) -> torch.Tensor:
    """Signed Sampson distance [E] (pixels, first order of the distance to the epipolar
    lines) of matches under packed cameras [E, 15]: F = K_b^-T [t]x R K_a^-1 with (R, t)
    camera a -> camera b. The distortion terms do not enter (the pixels are undistorted)."""
    Ra, Rb = so3_exp(cam_a[:, 9:12]), so3_exp(cam_b[:, 9:12])
    R = Rb @ Ra.transpose(1, 2)
    t = cam_b[:, 12:15] - (R @ cam_a[:, 12:15, None])[..., 0]
    zero = torch.zeros_like(t[:, 0])
    tx = torch.stack([torch.stack([zero, -t[:, 2], t[:, 1]], 1), torch.stack([t[:, 2], zero, -t[:, 0]], 1),
                      torch.stack([-t[:, 1], t[:, 0], zero], 1)], 1)

    def normalised(cam, uv):  # K^-1 [u, v, 1]
        return torch.stack([(uv[:, 0] - cam[:, 2]) / cam[:, 0], (uv[:, 1] - cam[:, 3]) / cam[:, 1],
                            torch.ones_like(uv[:, 0])], 1)

    xa, xb = normalised(cam_a, uv_a), normalised(cam_b, uv_b)
    E = tx @ R
    Exa = (E @ xa[..., None])[..., 0]  # the epipolar line of a in b (normalised coordinates)
    Etxb = (E.transpose(1, 2) @ xb[..., None])[..., 0]
    # Lines to pixels: each coordinate's gradient scaled by its camera's focal length.
    grad2 = ((Exa[:, 0] / cam_b[:, 0]) ** 2 + (Exa[:, 1] / cam_b[:, 1]) ** 2
             + (Etxb[:, 0] / cam_a[:, 0]) ** 2 + (Etxb[:, 1] / cam_a[:, 1]) ** 2)
    return (xb * Exa).sum(1) / torch.sqrt(grad2.clamp_min(1e-30))


def _matched(cameras: np.ndarray, matches: Matches) -> tuple[torch.Tensor, ...]:
    return tuple(torch.from_numpy(np.ascontiguousarray(a, np.float64)) for a in (
        cameras[matches.camera_a], cameras[matches.camera_b], matches.uv_a, matches.uv_b))


def sampson_px(cameras: np.ndarray, matches: Matches) -> np.ndarray:
    """|Sampson distance| [E] in pixels of `matches` under packed cameras [C, 15]."""
    with torch.no_grad():
        return _sampson(*_matched(cameras, matches)).abs().numpy()


def sampson_jacobian(cameras: np.ndarray, matches: Matches) -> tuple[np.ndarray, np.ndarray]:
    """The exact derivatives of each match's Sampson distance (autograd, per match):
    d / d camera a [E, 15], d / d camera b [E, 15]."""
    from torch.func import jacrev, vmap

    def one(a, b, ua, ub):
        return _sampson(a[None], b[None], ua[None], ub[None])[0]

    return tuple(d.numpy() for d in vmap(jacrev(one, argnums=(0, 1)))(*_matched(cameras, matches)))


def pack_camera(K: np.ndarray, dist: np.ndarray, world_to_camera: np.ndarray) -> np.ndarray:
    return np.concatenate([[K[0, 0], K[1, 1], K[0, 2], K[1, 2]], np.asarray(dist, float)[:5],
                           rotation_vector(world_to_camera[:3, :3]), world_to_camera[:3, 3]])


def unpack_camera(p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """[15] -> (K [3, 3], dist [5], world_to_camera [4, 4])."""
    K = np.array([[p[0], 0, p[2]], [0, p[1], p[3]], [0, 0, 1.0]])
    T = np.eye(4)
    T[:3, :3], T[:3, 3] = cv2.Rodrigues(p[9:12])[0], p[12:15]
    return K, p[4:9].copy(), T


def reproject(cameras: np.ndarray, poses: np.ndarray, points: np.ndarray, obs: Observations) -> np.ndarray:
    """Pixels [M, 2] predicted for each observation. cameras: [C, 15] packed; poses: [T, 6]
    (object -> world rotation vector and translation); points: [P, 3] in the object frame."""
    with torch.no_grad():
        return _project(*_gathered(cameras, poses, points, obs)).numpy()


def reproject_jacobian(cameras: np.ndarray, poses: np.ndarray, points: np.ndarray,
                       obs: Observations) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The exact derivatives of each observation's pixels (autograd, per observation):
    d uv / d camera [M, 2, 15], d uv / d pose [M, 2, 6], d uv / d point [M, 2, 3]."""
    from torch.func import jacrev, vmap

    def one(c, p, x):
        return _project(c[None], p[None], x[None])[0]

    return vmap(jacrev(one, argnums=(0, 1, 2)))(*_gathered(cameras, poses, points, obs))


def bundle_adjust(cameras: np.ndarray, poses: np.ndarray, points: np.ndarray, obs: Observations,
                  free_intrinsics: np.ndarray | None = None, loss_scale_px: float = 1.0,
                  max_iterations: int = 200, square_pixels: bool = False, shared_focal: bool = False,
                  point_prior_m: float | None = None,
                  matches: Matches | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Refine the poses of cameras [C, 15] (all but the first), object poses [T, 6] and
    the intrinsics flagged in `free_intrinsics` ([9] bools over fx fy cx cy k1 k2 p1 p2 k3;
    default none). square_pixels: fy is set to fx (one focal per camera);
    shared_focal as well: every camera's fx is the first camera's (a rig of one lens model).
    Both overwrite the given values, so use them only when the focal is being solved.
    point_prior_m: None holds the object's points [P, 3] fixed; a length lets them move,
    each pulled back to where it started as hard as one `loss_scale_px` residual per that
    many metres (the prior also fixes the object frame, which free points leave open).
    matches: texture matched between cameras, each adding its Sampson distance in pixels
    (they pin the cameras' relative poses; the object's points give the scale).
    Robust loss: soft-L1 with scale `loss_scale_px`. Returns the refined (cameras, poses,
    points)."""
    C, T, P = len(cameras), len(poses), len(points)
    cam_free = np.zeros((C, CAMERA_PARAMS), bool)
    if free_intrinsics is not None:
        cam_free[:, :INTRINSICS] = np.asarray(free_intrinsics, bool)
    square_pixels = square_pixels or shared_focal
    if square_pixels:
        cam_free[:, 1] = False  # fy follows fx
    if shared_focal:
        cam_free[1:, 0] = False  # and fx the first camera's
    cam_free[1:, INTRINSICS:] = True  # the first camera is the world frame
    cam_index = np.flatnonzero(cam_free.ravel())
    n_cam, n_pts = len(cam_index), 3 * P if point_prior_m is not None else 0

    def unpack(x):
        cams = cameras.copy().ravel()
        cams[cam_index] = x[:n_cam]
        cams = cams.reshape(C, CAMERA_PARAMS)
        if shared_focal:
            cams[:, 0] = cams[0, 0]
        if square_pixels:
            cams[:, 1] = cams[:, 0]
        pts = x[n_cam + 6 * T:].reshape(P, 3) if n_pts else points
        return cams, x[n_cam:n_cam + 6 * T].reshape(T, 6), pts

    n_matches = len(matches) if matches is not None else 0

    def residuals(x):
        cams, ps, pts = unpack(x)
        r = [(reproject(cams, ps, pts, obs) - obs.uv).ravel()]
        if n_pts:
            r.append((loss_scale_px / point_prior_m) * (pts - points).ravel())
        if n_matches:
            with torch.no_grad():
                r.append(_sampson(*_matched(cams, matches)).numpy())
        return np.concatenate(r)

    # The Jacobian, exact and sparse: an observation depends on its camera's free parameters,
    # its pose and (when free) its point; a point's prior on that point.
    col_of = -np.ones(C * CAMERA_PARAMS, int)
    col_of[cam_index] = np.arange(n_cam)
    if square_pixels:
        if shared_focal:
            col_of[0::CAMERA_PARAMS] = col_of[0]
        col_of[1::CAMERA_PARAMS] = col_of[0::CAMERA_PARAMS]  # d/d fx gathers fy's share too
    M = len(obs.uv)
    cam_cols = col_of[obs.camera[:, None] * CAMERA_PARAMS + np.arange(CAMERA_PARAMS)]  # [M, 15]
    pose_cols = n_cam + 6 * obs.timestep[:, None] + np.arange(6)  # [M, 6]
    point_cols = n_cam + 6 * T + 3 * obs.point[:, None] + np.arange(3)  # [M, 3]
    rows = 2 * np.arange(M)[:, None, None] + np.arange(2)[None, :, None]  # [M, 2, 1]
    n_cols = n_cam + 6 * T + n_pts
    if n_matches:
        match_rows = 2 * M + n_pts + np.arange(n_matches)
        match_cols = [col_of[cams[:, None] * CAMERA_PARAMS + np.arange(CAMERA_PARAMS)]  # [E, 15] each
                      for cams in (matches.camera_a, matches.camera_b)]

    def jacobian(x):
        cams, ps, pts = unpack(x)
        d_cam, d_pose, d_point = (d.numpy() for d in reproject_jacobian(cams, ps, pts, obs))
        parts = [(d_cam, cam_cols), (d_pose, pose_cols)] + ([(d_point, point_cols)] if n_pts else [])
        r, c, v = [], [], []
        for d, cols in parts:
            keep = np.broadcast_to(cols[:, None, :] >= 0, d.shape)
            r.append(np.broadcast_to(rows, d.shape)[keep])
            c.append(np.broadcast_to(cols[:, None, :], d.shape)[keep])
            v.append(d[keep])
        if n_pts:
            r.append(2 * M + np.arange(n_pts)), c.append(n_cam + 6 * T + np.arange(n_pts))
            v.append(np.full(n_pts, loss_scale_px / point_prior_m))
        if n_matches:
            for d, cols in zip(sampson_jacobian(cams, matches), match_cols):
                keep = cols >= 0
                r.append(np.broadcast_to(match_rows[:, None], d.shape)[keep]), c.append(cols[keep])
                v.append(d[keep])
        return coo_matrix((np.concatenate(v), (np.concatenate(r), np.concatenate(c))),
                          shape=(2 * M + n_pts + n_matches, n_cols)).tocsr()  # duplicates (fx, fy) add up

    x0 = np.concatenate([cameras.ravel()[cam_index], poses.ravel(), points.ravel() if n_pts else []])
    return unpack(levenberg_marquardt(residuals, jacobian, x0, loss_scale_px, max_iterations))


def adjust_rig(cameras: np.ndarray, poses: np.ndarray, points: np.ndarray, obs: Observations,
               free_intrinsics: np.ndarray | None, outlier_px: float, matches: Matches | None = None, **options):
    """bundle_adjust in three passes: the poses with the lenses held, then with the
    `free_intrinsics` too (when any), then once more without the observations (and
    matches) off by more than max(outlier_px, 3 x their median). `options` go to every
    pass. Returns (cameras, poses, points, the observations kept, their pixel errors [M],
    how many were dropped, the matches kept or None)."""
    free = free_intrinsics if free_intrinsics is not None and np.any(free_intrinsics) else None
    cameras, poses, points = bundle_adjust(cameras, poses, points, obs, None, matches=matches, **options)
    if free is not None:
        cameras, poses, points = bundle_adjust(cameras, poses, points, obs, free, matches=matches, **options)

    def inliers(err):
        return err <= max(outlier_px, 3 * float(np.median(err)))

    keep = inliers(np.linalg.norm(reproject(cameras, poses, points, obs) - obs.uv, axis=1))
    keep_matches = inliers(sampson_px(cameras, matches)) if matches else None
    if not keep.all() or keep_matches is not None and not keep_matches.all():
        obs = obs.subset(keep)
        matches = matches.subset(keep_matches) if matches else None
        cameras, poses, points = bundle_adjust(cameras, poses, points, obs, free, matches=matches, **options)
    err = np.linalg.norm(reproject(cameras, poses, points, obs) - obs.uv, axis=1)
    return cameras, poses, points, obs, err, int((~keep).sum()), matches


def levenberg_marquardt(residuals, jacobian, x0: np.ndarray, loss_scale: float, max_iterations: int = 200,
                        tolerance: float = 1e-10) -> np.ndarray:
    """Minimise sum(soft_l1(r_i / loss_scale)) over x by Levenberg-Marquardt on the
    reweighted normal equations (Marquardt's diagonal damping): residuals(x) -> r [m],
    jacobian(x) -> sparse [m, n]. A bundle has few parameters (cameras, poses, a face's
    points: hundreds) and many residuals, so the normal matrix is small and solved
    directly; each iteration costs one Jacobian."""
    s2 = loss_scale**2

    def cost(r):
        return float(2 * s2 * (np.sqrt(1 + r * r / s2) - 1).sum())

    x, r = x0.astype(np.float64), residuals(x0)
    c, damping = cost(r), 1e-4
    for _ in range(max_iterations):
        J = jacobian(x)
        w = 1 / np.sqrt(1 + r * r / s2)  # soft-L1's weights (iteratively reweighted)
        JtW = J.T.multiply(w).tocsr()
        A, g = (JtW @ J).toarray(), JtW @ r
        diag = np.maximum(np.diag(A), 1e-12)
        while True:
            try:
                step = np.linalg.solve(A + damping * np.diag(diag), -g)
            except np.linalg.LinAlgError:
                step = None
            if step is not None:
                r_new = residuals(x + step)
                c_new = cost(r_new)
                if np.isfinite(c_new) and c_new < c:
                    break
            damping *= 10
            if damping > 1e12:
                return x
        x, r, done = x + step, r_new, c - c_new <= tolerance * c
        c, damping = c_new, max(damping / 10, 1e-10)
        if done or np.linalg.norm(step) <= tolerance * (np.linalg.norm(x) + tolerance):
            break
    return x


def place_cameras(root, names: list[str], object_in_camera: list[dict[int, np.ndarray]], what: str,
                  remedy: str) -> dict[int, np.ndarray]:
    """World-to-camera 4x4s of a rig from each camera's view of one object ({sync index:
    object -> camera 4x4}): camera i -> camera j is the object's pose in j times its
    inverse in i, a robust mean over the indices both see it at; cameras are placed
    outward from camera 0 (the world frame) along the pairs with the most shared views.
    A camera that cannot be reached is refused: "... never sees `what` at the same time
    as the others", with `remedy`."""
    relative: dict[tuple[int, int], list[np.ndarray]] = {}
    for i, seen_i in enumerate(object_in_camera):
        for j, seen_j in enumerate(object_in_camera):
            if i != j:
                relative[i, j] = [seen_j[k] @ np.linalg.inv(seen_i[k]) for k in seen_i.keys() & seen_j.keys()]
    world_to_cam: dict[int, np.ndarray] = {0: np.eye(4)}
    while len(world_to_cam) < len(names):
        links = [(len(v), i, j) for (i, j), v in relative.items() if v and i in world_to_cam and j not in world_to_cam]
        if not links:
            lost = [names[j] for j in range(len(names)) if j not in world_to_cam]
            raise AvatarError(root, f"camera{'s' if len(lost) > 1 else ''} {', '.join(lost)} never see"
                              f"{'' if len(lost) > 1 else 's'} {what} at the same time as the others, so "
                              f"{'they' if len(lost) > 1 else 'it'} cannot be placed", remedy)
        _, i, j = max(links)
        world_to_cam[j] = average_rigid(relative[i, j]) @ world_to_cam[i]
    return world_to_cam


def spread_evenly(keys: list[int], n: int) -> list[int]:
    """At most n of the sorted `keys`, evenly spread from the first to the last."""
    if len(keys) <= n:
        return keys
    return [keys[int(round(i))] for i in np.linspace(0, len(keys) - 1, n)]


def average_rigid(transforms: list[np.ndarray]) -> np.ndarray:
    """A robust mean of 4x4 rigid transforms: the rotation nearest the summed rotations
    (chordal mean), the median translation."""
    Rs = np.stack([t[:3, :3] for t in transforms])
    U, _, Vt = np.linalg.svd(Rs.sum(0))
    R = U @ np.diag([1, 1, np.sign(np.linalg.det(U @ Vt))]) @ Vt
    out = np.eye(4)
    out[:3, :3], out[:3, 3] = R, np.median(np.stack([t[:3, 3] for t in transforms]), axis=0)
    return out


def residual_report(errors: np.ndarray, views: int) -> dict:
    """Reprojection figures of one camera (pixel errors [M])."""
    return {"median_px": float(np.median(errors)) if len(errors) else None,
            "p90_px": float(np.percentile(errors, 90)) if len(errors) else None,
            "views": int(views), "points": int(len(errors))}
