"""Rig bundle adjustment: every camera's pose (and, where asked, its lens) and a rigid
object's pose at every timestep, fitted to where the object's points are seen.

    x_cam = R_c (R_t X_p + t_t) + t_c         camera c, timestep t, object point p
    uv    = project(x_cam; fx, fy, cx, cy, k1, k2, p1, p2, k3)   (OpenCV's model)

The first camera is the world frame (its pose is held at identity); the object's points
are known (a calibration board), so the scale is the object's. Intrinsics are fitted
only where asked (see capture/charuco.py: DEPTH_RATIO for when they can be). Solved with scipy's
trust-region least squares, a robust loss in pixels and the Jacobian's sparsity.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch
from scipy.optimize import least_squares
from scipy.sparse import lil_matrix

from .pose import so3_exp

INTRINSICS = 9  # fx, fy, cx, cy, k1, k2, p1, p2, k3
CAMERA_PARAMS = INTRINSICS + 6


def rodrigues(rvecs: np.ndarray) -> np.ndarray:
    """[N, 3] rotation vectors -> [N, 3, 3] rotation matrices (capture.pose.so3_exp, in numpy)."""
    return so3_exp(torch.from_numpy(np.ascontiguousarray(rvecs, np.float64))).numpy()


def rotation_vector(R: np.ndarray) -> np.ndarray:
    return cv2.Rodrigues(np.asarray(R, np.float64))[0].ravel()


def distort_project(x: np.ndarray, intrinsics: np.ndarray) -> np.ndarray:
    """Camera-frame points x [N, 3] -> pixels [N, 2] with per-point intrinsics [N, 9]
    (fx, fy, cx, cy, k1, k2, p1, p2, k3): OpenCV's pinhole + Brown-Conrady model."""
    z = np.where(np.abs(x[:, 2]) < 1e-9, 1e-9, x[:, 2])
    a, b = x[:, 0] / z, x[:, 1] / z
    fx, fy, cx, cy, k1, k2, p1, p2, k3 = intrinsics.T
    r2 = a * a + b * b
    radial = 1 + r2 * (k1 + r2 * (k2 + r2 * k3))
    xd = a * radial + 2 * p1 * a * b + p2 * (r2 + 2 * a * a)
    yd = b * radial + p1 * (r2 + 2 * b * b) + 2 * p2 * a * b
    return np.stack([fx * xd + cx, fy * yd + cy], axis=1)


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
    Rt = rodrigues(poses[:, :3])
    world = np.einsum("mij,mj->mi", Rt[obs.timestep], points[obs.point]) + poses[obs.timestep, 3:]
    cam = cameras[obs.camera]
    x = np.einsum("mij,mj->mi", rodrigues(cam[:, 9:12]), world) + cam[:, 12:15]
    return distort_project(x, cam[:, :INTRINSICS])


def bundle_adjust(cameras: np.ndarray, poses: np.ndarray, points: np.ndarray, obs: Observations,
                  free_intrinsics: np.ndarray | None = None, loss_scale_px: float = 1.0,
                  max_evaluations: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """Refine the poses of cameras [C, 15] (all but the first), object poses [T, 6] and
    the intrinsics flagged in `free_intrinsics` ([9] bools over fx fy cx cy k1 k2 p1 p2 k3;
    default none). Robust loss: soft-L1 with scale `loss_scale_px`. Returns the refined
    (cameras, poses)."""
    C, T = len(cameras), len(poses)
    cam_free = np.zeros((C, CAMERA_PARAMS), bool)
    if free_intrinsics is not None:
        cam_free[:, :INTRINSICS] = np.asarray(free_intrinsics, bool)
    cam_free[1:, INTRINSICS:] = True  # the first camera is the world frame
    cam_index = np.flatnonzero(cam_free.ravel())
    n_cam = len(cam_index)

    def unpack(x):
        cams = cameras.copy().ravel()
        cams[cam_index] = x[:n_cam]
        return cams.reshape(C, CAMERA_PARAMS), x[n_cam:].reshape(T, 6)

    def residuals(x):
        cams, ps = unpack(x)
        return (reproject(cams, ps, points, obs) - obs.uv).ravel()

    # Jacobian sparsity: an observation depends on its camera's free parameters and its pose.
    col_of = -np.ones(C * CAMERA_PARAMS, int)
    col_of[cam_index] = np.arange(n_cam)
    J = lil_matrix((2 * len(obs.uv), n_cam + 6 * T), dtype=np.int8)
    rows = np.arange(len(obs.uv))
    for j in range(CAMERA_PARAMS):
        cols = col_of[obs.camera * CAMERA_PARAMS + j]
        ok = cols >= 0
        for axis in (0, 1):
            J[2 * rows[ok] + axis, cols[ok]] = 1
    for j in range(6):
        for axis in (0, 1):
            J[2 * rows + axis, n_cam + 6 * obs.timestep + j] = 1
    x0 = np.concatenate([cameras.ravel()[cam_index], poses.ravel()])
    fit = least_squares(residuals, x0, jac_sparsity=J, loss="soft_l1", f_scale=loss_scale_px, x_scale="jac",
                        method="trf", max_nfev=max_evaluations)
    return unpack(fit.x)


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
