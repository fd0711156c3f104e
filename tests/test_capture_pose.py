"""Head pose and focal are recovered from synthetic landmarks with known ground truth."""

import math

import cv2
import numpy as np
import pytest

from capture.pose import backproject, canonical_face, fit_head_pose, rotation_jitter_deg
from avatar.geometry import umeyama
from avatar.dataset_format import BROW_TOP, CHIN, EYE_OUTER, LOWER_LIP, RIGID, UPPER_LIP


def synthetic_face(seed=0) -> np.ndarray:
    """[478, 3] points on the front of a head-sized ellipsoid (x left, y up, z out), metres,
    with the anatomical landmarks that define the head frame in place."""
    rng = np.random.default_rng(seed)
    a, b, c = 0.075, 0.10, 0.06
    u = rng.uniform(-0.85, 0.85, (478, 2))
    pts = np.stack([a * u[:, 0], b * u[:, 1], c * np.sqrt(np.clip(1 - (u**2).sum(1), 0.05, None))], 1)
    def on_surface(x, y, bump=0.0):
        return [x, y, c * math.sqrt(max(1 - (x / a) ** 2 - (y / b) ** 2, 0.05)) + bump]
    pts[EYE_OUTER[0]] = on_surface(-0.045, 0.03)
    pts[EYE_OUTER[1]] = on_surface(0.045, 0.03)
    pts[BROW_TOP] = on_surface(0.0, 0.085)
    pts[CHIN] = on_surface(0.0, -0.095)
    pts[1] = on_surface(0.0, -0.01, bump=0.03)  # nose tip
    pts[4] = on_surface(0.0, 0.0, bump=0.025)
    return pts


def head_track(T, seed=1):
    """Smooth head motion: yaw +-25 deg, pitch +-10, roll +-5, some translation."""
    t = np.linspace(0, 1, T)
    yaw = np.radians(25) * np.sin(2 * np.pi * 0.9 * t + 0.3)
    pitch = np.radians(10) * np.sin(2 * np.pi * 1.3 * t)
    roll = np.radians(5) * np.sin(2 * np.pi * 0.7 * t + 1.0)
    flip = np.diag([1.0, -1.0, -1.0])  # head frame (y up, z out) -> OpenCV camera (y down, z forward)
    Rs, ts = [], []
    for i in range(T):
        Rh = cv2.Rodrigues(np.array([pitch[i], yaw[i], roll[i]]))[0]
        Rs.append(flip @ Rh)
        ts.append(np.array([0.02 * np.sin(5 * t[i]), 0.01 * t[i], 0.55 + 0.05 * np.sin(3 * t[i])]))
    return np.stack(Rs), np.stack(ts)


def mediapipe_like(face, Rs, ts, f, size, noise_px, rng):
    """Projected x, y (+ noise) and mediapipe-style relative depth z (pixel scale, noisy)."""
    Xc = np.einsum("tij,nj->tni", Rs, face) + ts[:, None]
    uv = f * Xc[..., :2] / Xc[..., 2:] + size / 2
    z = (Xc[..., 2] - Xc[:, :, 2].mean(1, keepdims=True)) * f / Xc[:, :, 2].mean(1, keepdims=True)
    lm = np.concatenate([uv, z[..., None]], -1)
    lm[..., :2] += rng.normal(0, noise_px, uv.shape)
    lm[..., 2] += rng.normal(0, 2 * noise_px, z.shape)
    return lm.astype(np.float32)


@pytest.mark.parametrize("fov_deg", [20.0, 35.0])
def test_pose_and_focal_recovered(fov_deg):
    size, T = 512, 120
    f_true = (size / 2) / math.tan(math.radians(fov_deg) / 2)
    face = synthetic_face()
    Rs, ts = head_track(T)
    rng = np.random.default_rng(0)
    lm = mediapipe_like(face, Rs, ts, f_true, size, noise_px=0.5, rng=rng)
    # Speech: lips and jaw move a lot; rigid landmarks do not.
    mouth = np.array([UPPER_LIP, LOWER_LIP, CHIN])
    lm[:, mouth, 1] += 15 * np.abs(np.sin(np.arange(T) * 1.7))[:, None]

    fit = fit_head_pose(lm, size, size)

    assert abs(fit.focal / f_true - 1) < 0.03, f"focal {fit.focal:.1f} vs {f_true:.1f}"
    assert fit.focal_log_sd < 0.05  # a decisive sweep: the prior barely moves it
    # Rotations relative to the first frame are frame-definition independent.
    errs = []
    for i in range(T):
        d = (fit.R[i] @ fit.R[0].T) @ (Rs[i] @ Rs[0].T).T
        errs.append(np.degrees(np.linalg.norm(cv2.Rodrigues(d)[0])))
    assert np.median(errs) < 1.0 and np.max(errs) < 2.0, f"rotation error median {np.median(errs):.2f} max {np.max(errs):.2f}"
    assert np.median(fit.reproj_px) < 1.0
    assert fit.jitter_deg <= fit.jitter_raw_deg + 1e-6


def test_uninformative_sweep_leans_on_the_focal_prior():
    """With barely turning head and noisy landmarks the focal is unobservable: the
    bootstrap spread is wide and the estimate moves from the sweep's minimum to the prior."""
    size, T = 512, 60
    f_true = (size / 2) / math.tan(math.radians(30) / 2)
    Rs, ts = head_track(T)
    small = np.stack([cv2.Rodrigues(0.1 * cv2.Rodrigues(np.diag([1.0, -1, -1]) @ R)[0])[0] for R in Rs])
    Rs = np.einsum("ij,tjk->tik", np.diag([1.0, -1, -1]), small)  # turns of a tenth: +-2.5 deg yaw
    lm = mediapipe_like(synthetic_face(), Rs, ts, f_true, size, noise_px=1.5, rng=np.random.default_rng(3))
    free = fit_head_pose(lm, size, size, focal_prior=None)
    prior_focal = (size / 2) / math.tan(math.radians(40) / 2)
    fit = fit_head_pose(lm, size, size, focal_prior=(40.0, 0.35))
    assert free.focal_log_sd > 0.2, free.focal_log_sd
    assert free.focal == free.focal_sweep
    assert abs(math.log(fit.focal / prior_focal)) < abs(math.log(free.focal / prior_focal))
    assert min(free.focal, prior_focal) <= fit.focal <= max(free.focal, prior_focal)


def test_canonical_face_is_metric_and_upright():
    face = synthetic_face()
    Rs, ts = head_track(30)
    lm = mediapipe_like(face, Rs, ts, 800.0, 512, noise_px=0.0, rng=np.random.default_rng(0))
    canon = canonical_face(backproject(lm, 800.0, 256.0, 256.0))
    eye_l, eye_r = canon[EYE_OUTER[1]], canon[EYE_OUTER[0]]
    assert abs(np.linalg.norm(eye_l - eye_r) - 0.09) < 1e-6
    assert abs(eye_l[1] - eye_r[1]) < 1e-6 and eye_l[0] > eye_r[0]  # level, x to the subject's left
    assert canon[BROW_TOP][1] > canon[CHIN][1]  # y up
    assert canon[1][2] > canon[EYE_OUTER[0]][2]  # nose tip nearer the camera than the eyes (z out)
    # Same shape as the truth up to a similarity.
    s, R, t = umeyama(canon[list(RIGID)], face[list(RIGID)])
    resid = np.linalg.norm(canon[list(RIGID)] @ (s * R).T + t - face[list(RIGID)], axis=1)
    assert resid.max() < 5e-4


def test_jitter_metric():
    T = 50
    base = [cv2.Rodrigues(np.array([0.0, 0.01 * i, 0.0]))[0] for i in range(T)]
    assert rotation_jitter_deg(np.stack(base)) < 1e-3
    rng = np.random.default_rng(0)
    noisy = [R @ cv2.Rodrigues(rng.normal(0, math.radians(1.0), 3))[0] for R in base]
    assert 0.8 < rotation_jitter_deg(np.stack(noisy)) < 2.5
