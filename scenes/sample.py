"""The built-in sample subject: a synthetic talking-head clip with known ground truth.

The face is scikit-image's public-domain astronaut portrait (Eileen Collins, NASA) on a
3D relief: mediapipe's face mesh, run once on the photo, places eyes, lips and jaw, and
its relative depths, interpolated, shape the relief. Every texel becomes a small
Gaussian, rendered by our own rasterizer through a real perspective camera. The head
turns and moves along a smooth known trajectory, the eyelids blink, and the jaw opens
with formant-synthesised speech (scenes/speech.py), revealing a dark mouth cavity.

Outputs (`generate_sample`):
    sample.mp4         H.264 + AAC, the clip to capture
    sample_truth.json  focal, per-frame head->camera rotation/translation, jaw opening, blink
    speech_b.wav       a second, different generated speech to drive the avatar with
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
import soundfile as sf
import torch
from scipy.interpolate import griddata
from scipy.ndimage import distance_transform_edt
from tqdm import tqdm

from avatar.dataset_format import CHIN, EYE_OUTER, LEFT_EYE, LOWER_LIP, RIGHT_EYE, UPPER_LIP
from avatar.errors import AvatarError
from avatar.io import atomic_path, write_json
from avatar.media import write_mp4
from capture.pose import EYE_CORNER_DISTANCE_M, HEAD_CENTER_BEHIND_EYES_M
from capture.tracking import FaceTracker, PersonSegmenter

from .speech import SAMPLE_RATE, synthesize

TRUTH_FORMAT = "avatar-sample-truth/1"
JAW_DROP_M = 0.02  # jaw travel at full mouth opening


@dataclass
class SampleConfig:
    """How the sample clip is made."""

    seconds: float = 8.0
    """Clip length."""
    fps: float = 25.0
    """Frame rate."""
    size: int = 512
    """Square frame side in pixels."""
    fov_deg: float = 30.0
    """Horizontal field of view of the camera."""
    distance_m: float = 0.75
    """Camera to head-centre distance."""
    yaw_deg: float = 14.0
    """Amplitude of the head's yaw; pitch and roll are smaller."""
    seed: int = 0
    """Seed of the trajectory, blinks and speech."""


@dataclass
class _Head:
    means: np.ndarray  # [N, 3] head frame (x subject's left, y up, z out), metres
    colors: np.ndarray  # [N, 3] in [0, 1]
    scale: float  # Gaussian std, metres
    jaw: np.ndarray  # [N] jaw weight in [0, 1]
    lid_index: np.ndarray  # [M] indices of eyelid Gaussians
    lid_depth: np.ndarray  # [M] in [0, 1]: 0 at the upper lid line, 1 at the lower lid


def _relief(texture: np.ndarray) -> _Head:
    """Build the textured face relief from the portrait and its face mesh."""
    with FaceTracker(max_faces=1, video_mode=False) as tracker:
        faces = tracker(texture)
    with PersonSegmenter() as segmenter:
        person = segmenter(texture) > 0.5
    if not faces:
        raise AvatarError(None, "the face mesh found no face in the sample texture (mediapipe install broken?)")
    lm = faces[0]
    eye_px = float(np.linalg.norm(lm[EYE_OUTER[1], :2] - lm[EYE_OUTER[0], :2]))
    s = EYE_CORNER_DISTANCE_M / eye_px  # metres per texel
    fh = float(np.linalg.norm(lm[10, :2] - lm[CHIN, :2]))
    cx = float(lm[:, 0].mean())
    x0, x1 = int(cx - 1.25 * fh), int(cx + 1.25 * fh)
    y0, y1 = int(lm[10, 1] - 0.75 * fh), int(lm[CHIN, 1] + 0.85 * fh)
    x0, y0 = max(x0, 0), max(y0, 0)
    tex = texture[y0:y1, x0:x1].astype(np.float32) / 255
    H, W = tex.shape[:2]
    vv, uu = np.mgrid[0:H, 0:W].astype(np.float32)
    pts = lm[:, :2] - [x0, y0]

    # Depth: the mesh's relative z inside the face, a rounded fall-off outside it.
    z = griddata(pts, -lm[:, 2], (uu, vv), method="linear")
    inside = ~np.isnan(z)
    dist, (iy, ix) = distance_transform_edt(~inside, return_indices=True)
    z = np.where(inside, z, z[iy, ix] - 0.8 * dist - 0.004 * dist**2)
    depth = np.maximum(z * s, (z[inside].min() * s) - 0.06)  # metres, towards the camera

    eyes_mid = (lm[EYE_OUTER[0], :2] + lm[EYE_OUTER[1], :2]) / 2 - [x0, y0]
    eye_depth = float(depth[int(eyes_mid[1]), int(eyes_mid[0])])
    X = (uu - eyes_mid[0]) * s
    Y = -(vv - eyes_mid[1]) * s
    Z = depth - eye_depth + HEAD_CENTER_BEHIND_EYES_M  # origin 9 cm behind the eyes
    means = np.stack([X, Y, Z], -1).reshape(-1, 3)
    colors = tex.reshape(-1, 3)
    keep = person[y0:y1, x0:x1].reshape(-1)  # only the person; the backdrop is ours

    # Jaw: between the mouth corners the face splits cleanly at the lip line (the cavity
    # shows through); beside them the cheek skin stretches smoothly down to the chin.
    lip_y = float((lm[UPPER_LIP, 1] + lm[LOWER_LIP, 1]) / 2 - y0)
    chin_y = float(lm[CHIN, 1] - y0)
    mouth_c = float((lm[61, 0] + lm[291, 0]) / 2 - x0)
    mouth_half = float(abs(lm[291, 0] - lm[61, 0]) / 2)
    inner = np.clip((mouth_half - np.abs(uu - mouth_c)) / 3.0 + 0.5, 0, 1)
    split = (vv > lip_y).astype(np.float32)
    stretch = np.clip((vv - lip_y) / max(chin_y - lip_y, 1.0), 0, 1)
    lateral = np.exp(-np.maximum(np.abs(uu - mouth_c) - 1.6 * mouth_half, 0) ** 2 / (2 * (0.15 * fh) ** 2))
    neck = np.clip(1 - (vv - chin_y) / (0.25 * fh), 0, 1)
    jaw = ((inner * split + (1 - inner) * stretch) * lateral * neck).reshape(-1)

    # Mouth cavity: dark Gaussians 1.2 cm behind the surface, between the lips and as far
    # down as the jaw can drop, seen only when it opens.
    mx0, mx1 = lm[61, 0] - x0, lm[291, 0] - x0
    cav_v, cav_u = np.mgrid[lm[UPPER_LIP, 1] - y0 : lip_y + JAW_DROP_M / s + 2 : 1.0, mx0 : mx1 : 1.0]
    cav_d = depth[cav_v.astype(int).clip(0, H - 1), cav_u.astype(int).clip(0, W - 1)] - 0.012
    cav = np.stack([(cav_u - eyes_mid[0]) * s, -(cav_v - eyes_mid[1]) * s,
                    cav_d - eye_depth + HEAD_CENTER_BEHIND_EYES_M], -1).reshape(-1, 3)
    shade = np.clip(1 - np.abs(cav_u - (mx0 + mx1) / 2) / ((mx1 - mx0) / 2 + 1e-6), 0, 1).reshape(-1, 1)
    cav_col = np.array([0.28, 0.07, 0.08]) * (1 - 0.6 * shade)

    # Eyelids: skin-coloured Gaussians just in front of each eye, revealed top-down by a blink.
    lid_means, lid_cols, lid_depth = [], [], []
    for contour, upper, lower in ((RIGHT_EYE, 159, 145), (LEFT_EYE, 386, 374)):
        poly = (lm[list(contour), :2] - [x0, y0]).astype(np.float32)
        ey0, ey1 = lm[upper, 1] - y0, lm[lower, 1] - y0
        eh = max(ey1 - ey0, 2.0)
        (ex0, ey_min), (ex1, ey_max) = poly.min(0) - 1.5, poly.max(0) + 1.5
        gv, gu = np.mgrid[ey_min:ey_max:0.7, ex0:ex1:0.7]
        inside_eye = np.array([cv2.pointPolygonTest(poly, (float(u), float(v)), True) >= -1.5
                               for v, u in zip(gv.ravel(), gu.ravel())])
        gv, gu = gv.ravel()[inside_eye], gu.ravel()[inside_eye]
        skin = np.median(tex[int(max(ey0 - 1.2 * eh, 0)) : int(max(ey0 - 0.5 * eh, 1)), int(ex0) : int(ex1)].reshape(-1, 3), 0)
        d = depth[gv.astype(int).clip(0, H - 1), gu.astype(int).clip(0, W - 1)]
        lid_means.append(np.stack([(gu - eyes_mid[0]) * s, -(gv - eyes_mid[1]) * s,
                                   d + 0.0015 - eye_depth + HEAD_CENTER_BEHIND_EYES_M], -1))
        lid_cols.append(np.repeat(skin[None] * 0.92, gu.size, 0))
        lid_depth.append(np.clip((gv - ey_min) / (ey_max - ey_min), 0, 1))
    means, colors, jaw = means[keep], colors[keep], jaw[keep]
    n_face = len(means)
    means = np.concatenate([means, cav] + lid_means)
    colors = np.concatenate([colors, cav_col] + lid_cols)
    jaw = np.concatenate([jaw, np.zeros(len(cav))] + [np.zeros(len(m)) for m in lid_means])
    lid_index = np.arange(n_face + len(cav), len(means))
    return _Head(means.astype(np.float32), colors.astype(np.float32), 0.75 * s, jaw.astype(np.float32),
                 lid_index, np.concatenate(lid_depth).astype(np.float32))


def _trajectory(cfg: SampleConfig, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Smooth head motion: [n, 3, 3] head->camera rotations (OpenCV camera) and [n, 3] translations."""
    rng = np.random.default_rng(cfg.seed)
    t = np.arange(n) / cfg.fps
    def wave(amp, freqs):
        ph = rng.uniform(0, 2 * np.pi, len(freqs))
        return amp * sum(np.sin(2 * np.pi * f * t + p) for f, p in zip(freqs, ph)) / len(freqs)
    yaw = np.radians(wave(cfg.yaw_deg * 1.6, (0.11, 0.23)))
    pitch = np.radians(wave(cfg.yaw_deg * 0.5, (0.17, 0.31)))
    roll = np.radians(wave(cfg.yaw_deg * 0.3, (0.13, 0.27)))
    flip = np.diag([1.0, -1.0, -1.0])  # head frame (y up, z out) -> OpenCV camera (y down, z forward)
    R = np.stack([flip @ cv2.Rodrigues(np.array([p, y, r]))[0] for p, y, r in zip(pitch, yaw, roll)])
    tr = np.stack([wave(0.015, (0.09, 0.21)), wave(0.01, (0.12, 0.19)) + 0.03, cfg.distance_m + wave(0.02, (0.07,))], 1)
    return R, tr


def _blinks(cfg: SampleConfig, n: int) -> np.ndarray:
    """[n] eyelid closure in [0, 1]: a 0.24 s blink every 2-4.5 s."""
    rng = np.random.default_rng(cfg.seed + 7)
    closure = np.zeros(n)
    t = rng.uniform(0.6, 1.5)
    times = np.arange(n) / cfg.fps
    while t < cfg.seconds:
        closure = np.maximum(closure, np.clip(1 - np.abs(times - t) / 0.12, 0, 1))
        t += rng.uniform(2.0, 4.5)
    return closure


def _background(size: int, seed: int) -> np.ndarray:
    """A static room-like backdrop: a lit wall with a few soft shapes (uint8 [size, size, 3])."""
    rng = np.random.default_rng(seed + 3)
    yy, xx = np.mgrid[0:size, 0:size] / size
    img = np.stack([0.55 + 0.2 * xx, 0.5 + 0.15 * yy, 0.45 + 0.1 * (1 - xx)], -1)
    for _ in range(5):
        x0, y0 = rng.uniform(0, 0.8, 2)
        w, h = rng.uniform(0.1, 0.3, 2)
        img[int(y0 * size) : int((y0 + h) * size), int(x0 * size) : int((x0 + w) * size)] = rng.uniform(0.2, 0.8, 3)
    return (cv2.GaussianBlur(img, (0, 0), size / 100) * 255).clip(0, 255).astype(np.uint8)


def render_frames(cfg: SampleConfig, head: _Head, R: np.ndarray, tr: np.ndarray, jaw_open: np.ndarray,
                  blink: np.ndarray):
    """Yield RGB frames [size, size, 3] uint8."""
    from recon.raster import rasterize

    f = cfg.size / 2 / math.tan(math.radians(cfg.fov_deg) / 2)
    K = torch.tensor([[[f, 0, cfg.size / 2], [0, f, cfg.size / 2], [0, 0, 1]]], dtype=torch.float32)
    bg = torch.from_numpy(_background(cfg.size, cfg.seed)).float() / 255
    base = torch.from_numpy(head.means)
    colors = torch.from_numpy(head.colors)
    jaw = torch.from_numpy(head.jaw)[:, None]
    n = len(base)
    quats = torch.tensor([[1.0, 0, 0, 0]]).expand(n, 4)
    scales = torch.full((n, 3), head.scale)
    lid_depth = torch.from_numpy(head.lid_depth)
    with torch.no_grad():
        for k in range(len(R)):
            means = base + jaw * torch.tensor([0.0, -JAW_DROP_M, -0.2 * JAW_DROP_M]) * float(jaw_open[k])
            opac = torch.ones(n)
            opac[torch.from_numpy(head.lid_index)] = (lid_depth <= float(blink[k]) * 1.05).float()
            V = torch.eye(4)
            V[:3, :3] = torch.from_numpy(R[k]).float()
            V[:3, 3] = torch.from_numpy(tr[k]).float()
            out = rasterize(means, quats, scales, opac * 0.99, colors, V[None], K, cfg.size, cfg.size)
            img = out.image[0] + (1 - out.alpha[0]) * bg
            yield (img.clamp(0, 1) * 255).round().to(torch.uint8).numpy()


def generate_sample(out_dir: str | Path, cfg: SampleConfig | None = None) -> dict:
    """Write sample.mp4, sample_truth.json and speech_b.wav into out_dir; returns the truth."""
    from skimage import data

    cfg = cfg or SampleConfig()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n = int(round(cfg.seconds * cfg.fps))
    speech = synthesize(cfg.seconds, seed=cfg.seed, f0=125.0)
    times = np.arange(n) / cfg.fps
    jaw_open = speech.mouth_at(times)
    blink = _blinks(cfg, n)
    R, tr = _trajectory(cfg, n)
    head = _relief(data.astronaut())
    frames = tqdm(render_frames(cfg, head, R, tr, jaw_open, blink), total=n, desc="render sample", unit="frame",
                  leave=False)
    write_mp4(out_dir / "sample.mp4", frames, cfg.fps, speech.pcm, SAMPLE_RATE)
    other = synthesize(cfg.seconds + 2.0, seed=cfg.seed + 101, f0=190.0)
    with atomic_path(out_dir / "speech_b.wav") as tmp:
        sf.write(str(tmp), other.pcm, SAMPLE_RATE, subtype="PCM_16", format="WAV")
    f = cfg.size / 2 / math.tan(math.radians(cfg.fov_deg) / 2)
    truth = {
        "format": TRUTH_FORMAT,
        "config": asdict(cfg),
        "focal_px": f,
        "frames": [{"time": float(times[k]), "R": R[k].round(8).tolist(), "t": tr[k].round(8).tolist(),
                    "jaw_opening": float(jaw_open[k]), "eye_closure": float(blink[k])} for k in range(n)],
        "syllables": [list(s) for s in speech.syllables],
    }
    write_json(out_dir / "sample_truth.json", truth)
    return truth


def compare_capture(truth: dict, transforms: dict) -> dict:
    """How far a capture of the sample landed from the truth: focal error, and the
    rotation error of each frame's pose relative to the first kept frame (independent
    of how each side defines its head frame)."""
    frames = transforms["frames"]
    idx = [f["frame_index"] for f in frames]
    R_true = np.array([truth["frames"][k]["R"] for k in idx])
    c2w = np.array([f["transform_matrix"] for f in frames])
    w2c = np.linalg.inv(c2w @ np.diag([1.0, -1.0, -1.0, 1.0]))  # back to OpenCV camera axes
    R_est = w2c[:, :3, :3]
    errs = []
    for i in range(len(idx)):
        d = (R_est[i] @ R_est[0].T) @ (R_true[i] @ R_true[0].T).T
        errs.append(math.degrees(float(np.linalg.norm(cv2.Rodrigues(d)[0]))))
    jaw = np.array([truth["frames"][k]["jaw_opening"] for k in idx])
    mouth = np.array([f.get("mouth_opening", np.nan) for f in frames])
    return {
        "focal_error": transforms["fl_x"] / truth["focal_px"] - 1,
        "rotation_error_deg": {"median": float(np.median(errs)), "p90": float(np.percentile(errs, 90)),
                               "max": float(np.max(errs))},
        "mouth_vs_jaw_correlation": float(np.corrcoef(mouth, jaw)[0, 1]),
        "frames_compared": len(idx),
    }

