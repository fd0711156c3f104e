"""`avatar eval`: score a trained avatar on the held-out frames (the last 1/11 of the clip,
never trained on).

Each held-out frame is rendered from its own camera, audio window and eye signal, over
its own pixels outside the head mask and the background plate inside it (as ER-NeRF and
TalkingGaussian evaluate heads; the face metrics are what measure the avatar).
Metrics, written to AVATAR/eval.json:
  psnr/ssim        full image, and face (inside mediapipe's face oval of the real frame);
  lmd              mouth-landmark distance: mediapipe face mesh on the render and on the
                   real frame, mean distance of the 40 lip landmarks in pixels;
  lmd_static_mouth the same with the audio features zeroed (the avatar's static-mouth
                   baseline); the audio head earns its keep when lmd is below it;
  fps              rendering rate (deformation + rasterization) at the avatar's size;
  train_fit        the same PSNR/SSIM/LMD on training frames spaced evenly through the
                   clip: the fit, so the held-out figures read as fit minus a
                   generalisation gap.
AVATAR/eval_strip.png shows real | render | static-mouth render for a few frames.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from tqdm import tqdm

from avatar.errors import AvatarError
from avatar.io import atomic_path, write_json
from capture.masks import polygon_mask
from capture.tracking import FACE_OVAL, LIPS, FaceTracker

from .avatar_dir import load_avatar
from .conditioning import audio_windows, normalize_mel
from .losses import psnr, ssim
from .dataset import behind_head
from .render import open_dataset


def _to_uint8(img: torch.Tensor) -> np.ndarray:
    return (img.clamp(0, 1) * 255 + 0.5).to(torch.uint8).numpy()


def _score(pred: torch.Tensor, gt: torch.Tensor, face: torch.Tensor | None) -> dict:
    """PSNR/SSIM of a render [S, S, 3] against its frame, full and inside the face oval."""
    row = {"psnr": psnr(pred, gt), "ssim": ssim(pred, gt)}
    if face is not None and face.any():
        row.update(psnr_face=psnr(pred, gt, face), ssim_face=ssim(pred, gt, face))
    return row


def _lmd(tracker: FaceTracker, img: np.ndarray, gt_lm: list) -> float | None:
    """Mean distance of the 40 lip landmarks tracked on `img` and on the real frame (pixels)."""
    found = tracker(img)
    return float(np.linalg.norm(found[0][LIPS, :2] - gt_lm[0][LIPS, :2], axis=-1).mean()) if found and gt_lm else None


def _mean(rows: list[dict], key: str) -> float | None:
    vals = [r[key] for r in rows if r.get(key) is not None]
    return float(np.mean(vals)) if vals else None


def evaluate(avatar: str | Path, progress: bool = True, strip_frames: int = 6, train_fit_frames: int = 18,
             features: torch.Tensor | None = None) -> dict:
    """Score `avatar` (see the module docstring) and write eval.json and eval_strip.png.

    train_fit_frames: training frames, evenly spaced, also scored (`train_fit` in eval.json):
    how well the avatar fits what it was trained on, so the held-out figures read as fit
    minus a generalisation gap. 0 skips them.
    features: [N, 16, 80] normalised conditioning to drive the heads instead of the
    dataset's audio (diagnostics such as bench/expression_oracle.py); None for the audio.
    """
    av = load_avatar(avatar)
    ds = open_dataset(av, av.size, required=True)
    train_ids, held_out = ds.split()
    mel = normalize_mel(ds.features["mel"]) if features is None else features
    fit_ids = train_ids[:: max(1, len(train_ids) // train_fit_frames)][:train_fit_frames] if train_fit_frames else []
    rows, fit_rows, strip = [], [], []
    t_render = 0.0
    with torch.no_grad(), FaceTracker(max_faces=1, video_mode=False) as tracker:
        frames = [(i, True) for i in held_out] + [(i, False) for i in fit_ids]
        for n, (i, is_held_out) in enumerate(tqdm(frames, desc="avatar eval", unit="frame", disable=not progress,
                                                  file=sys.stderr)):
            f = ds[i]
            under = behind_head(f, av.background)
            audio = audio_windows(mel, [f.frame_index], av.config.audio_window)[0]
            eye = torch.tensor([f.eye_openness])
            t0 = time.perf_counter()
            pred = av.model.render(ds.viewmat(i), ds.K, ds.size, under, audio, eye, backend=av.config.backend).image
            if is_held_out:
                t_render += time.perf_counter() - t0
            lm = ds.landmarks(i)
            face = torch.from_numpy(polygon_mask((ds.size, ds.size), lm[list(FACE_OVAL)])) if lm is not None else None
            gt_u8, pred_u8 = _to_uint8(f.image), _to_uint8(pred)
            gt_lm = tracker(gt_u8)
            row = {"frame": i, **_score(pred, f.image, face), "lmd": _lmd(tracker, pred_u8, gt_lm)}
            if not is_held_out:
                fit_rows.append(row)
                continue
            static = av.model.render(ds.viewmat(i), ds.K, ds.size, under, torch.zeros_like(audio), eye,
                                     backend=av.config.backend).image
            static_u8 = _to_uint8(static)
            row["lmd_static_mouth"] = _lmd(tracker, static_u8, gt_lm)
            rows.append(row)
            if n % max(1, len(held_out) // strip_frames) == 0 and len(strip) < strip_frames:
                strip.append(np.concatenate([gt_u8, pred_u8, static_u8], axis=0))
    if not rows:
        raise AvatarError(ds.root, "has no held-out frames to evaluate")

    lmd_frames = [r for r in rows if r["lmd"] is not None and r["lmd_static_mouth"] is not None]
    result = {
        "format": "avatar-eval/1",
        "avatar": str(Path(avatar).resolve()), "dataset": str(ds.root), "held_out_frames": [r["frame"] for r in rows],
        "size": ds.size,
        "psnr": _mean(rows, "psnr"), "ssim": _mean(rows, "ssim"),
        "psnr_face": _mean(rows, "psnr_face"), "ssim_face": _mean(rows, "ssim_face"),
        "lmd": float(np.mean([r["lmd"] for r in lmd_frames])) if lmd_frames else None,
        "lmd_static_mouth": float(np.mean([r["lmd_static_mouth"] for r in lmd_frames])) if lmd_frames else None,
        "lmd_frames": len(lmd_frames),
        "fps": len(rows) / t_render,
        "per_frame": rows,
        "train_fit": {"frames": fit_ids, **{k: _mean(fit_rows, k) for k in ("psnr", "ssim", "psnr_face", "ssim_face",
                                                                            "lmd")},
                      "per_frame": fit_rows} if fit_rows else None,
    }
    root = Path(avatar)
    write_json(root / "eval.json", result)
    with atomic_path(root / "eval_strip.png") as tmp:
        cv2.imwrite(str(tmp), cv2.cvtColor(np.concatenate(strip, axis=1), cv2.COLOR_RGB2BGR))
    return result
