"""Per-frame masks, the background plate and the eye/mouth control signals."""

from __future__ import annotations

import warnings

import cv2
import numpy as np

from avatar.dataset_format import CHIN, FACE_OVAL, INNER_LIPS, LEFT_EAR, LEFT_EYE, RIGHT_EAR, RIGHT_EYE, polygon_mask


def frame_masks(lm: np.ndarray, person_prob: np.ndarray) -> dict[str, np.ndarray]:
    """Masks of one frame. lm: [478, >=2] pixels; person_prob: [H, W] in [0, 1].

    person: selfie segmentation > 0.5. head: face oval, plus the person's pixels inside
    an ellipse around the face above the chin (hair, ears). mouth: inside the inner lip
    contour. eyes: inside both eye contours. torso: person minus head (neck, shoulders).
    """
    H, W = person_prob.shape
    person = person_prob > 0.5
    oval = polygon_mask((H, W), lm[list(FACE_OVAL), :2])
    xy = lm[list(FACE_OVAL), :2]
    cx, cy = xy[:, 0].mean(), xy[:, 1].mean()
    fw, fh = np.ptp(xy[:, 0]), np.ptp(xy[:, 1])
    yy, xx = np.mgrid[0:H, 0:W]
    around = ((xx - cx) / (0.85 * fw)) ** 2 + ((yy - (cy - 0.15 * fh)) / (0.85 * fh)) ** 2 <= 1
    above_chin = yy <= lm[CHIN, 1] + 0.02 * fh
    head = oval | (person & around & above_chin)
    mouth = polygon_mask((H, W), lm[list(INNER_LIPS), :2])
    eyes = polygon_mask((H, W), lm[list(RIGHT_EYE), :2]) | polygon_mask((H, W), lm[list(LEFT_EYE), :2])
    torso = person & ~head
    return {"person": person, "head": head, "mouth": mouth, "eyes": eyes, "torso": torso}


def background_plate(frames: list[np.ndarray], person: list[np.ndarray], dilate_px: int = 6) -> tuple[np.ndarray, float]:
    """Median of the pixels the person never covers; holes inpainted.

    frames: list of [H, W, 3] uint8; person: matching [H, W] bool masks.
    Returns the plate [H, W, 3] uint8 and the fraction of pixels that had to be filled.
    """
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * dilate_px + 1, 2 * dilate_px + 1))
    stack = np.stack(frames).astype(np.float32)
    covered = np.stack([cv2.dilate(m.astype(np.uint8), kernel).astype(bool) for m in person])
    stack[covered] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN pixels are the holes
        plate = np.nanmedian(stack, axis=0)
    holes = np.isnan(plate).any(-1)
    plate = np.nan_to_num(plate).clip(0, 255).astype(np.uint8)
    if holes.any():
        plate = cv2.inpaint(plate, holes.astype(np.uint8), 7, cv2.INPAINT_TELEA)
    return plate, float(holes.mean())


def eye_aspect_ratio(lm: np.ndarray) -> np.ndarray:
    """Mean eye aspect ratio of both eyes. lm: [T, 478, >=2] -> [T]."""
    def ear(idx):
        p = lm[:, list(idx), :2]
        v = np.linalg.norm(p[:, 1] - p[:, 5], axis=-1) + np.linalg.norm(p[:, 2] - p[:, 4], axis=-1)
        return v / (2 * np.linalg.norm(p[:, 0] - p[:, 3], axis=-1) + 1e-9)

    return (ear(RIGHT_EAR) + ear(LEFT_EAR)) / 2


def eye_openness(lm: np.ndarray) -> np.ndarray:
    """Eye openness in [0, 1] per frame (replaces OpenFace's AU45).

    The eye aspect ratio, mapped so this subject's typical open eye (90th percentile)
    is 1 and 30% of it (a closed lid) is 0.
    """
    ear = eye_aspect_ratio(lm)
    open_ref = np.percentile(ear, 90)
    return np.clip((ear - 0.3 * open_ref) / (0.7 * open_ref + 1e-9), 0, 1).astype(np.float32)


def sharpness(rgb: np.ndarray, box: np.ndarray) -> tuple[float, float]:
    """Variance of the Laplacian (blur) and mean luma (light) of a face box [x0, y0, w, h]."""
    x0, y0 = np.maximum(box[:2].astype(int), 0)
    x1, y1 = (box[:2] + box[2:]).astype(int)
    face = cv2.cvtColor(np.ascontiguousarray(rgb[y0:y1, x0:x1]), cv2.COLOR_RGB2GRAY)
    if face.size < 16:
        return 0.0, 0.0
    scale = 160.0 / max(float(box[3]), 1.0)  # compare at a common face size
    face = cv2.resize(face, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    return float(cv2.Laplacian(face, cv2.CV_32F).var()), float(face.mean())
