"""`preview.png`: a contact sheet to check a capture at a glance."""

from __future__ import annotations

import cv2
import numpy as np

from avatar.dataset_format import RIGID

_TINT = {"head": (255, 140, 0), "torso": (0, 120, 255), "mouth": (255, 0, 200), "eyes": (0, 255, 255)}


def annotate(rgb: np.ndarray, lm: np.ndarray, masks: dict[str, np.ndarray], K: np.ndarray,
             R: np.ndarray, t: np.ndarray, label: str) -> np.ndarray:
    """One tile: mask tints, all landmarks (rigid ones green), head axes (x red, y green, z blue)."""
    img = rgb.astype(np.float32)
    for name, color in _TINT.items():
        m = masks[name]
        img[m] = 0.65 * img[m] + 0.35 * np.array(color, np.float32)
    img = img.clip(0, 255).astype(np.uint8)
    rigid = set(RIGID)
    for i, (x, y) in enumerate(lm[:, :2]):
        cv2.circle(img, (int(round(x)), int(round(y))), 2 if i in rigid else 1,
                   (0, 255, 0) if i in rigid else (255, 255, 255), -1, cv2.LINE_AA)
    axes = np.array([[0, 0, 0], [0.08, 0, 0], [0, 0.08, 0], [0, 0, 0.08]], np.float64)
    uv, _ = cv2.projectPoints(axes, cv2.Rodrigues(R)[0], t, K, None)
    uv = uv.reshape(-1, 2).round().astype(int)
    for k, color in zip(range(1, 4), [(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        cv2.line(img, tuple(uv[0]), tuple(uv[k]), color, 2, cv2.LINE_AA)
    cv2.putText(img, label, (8, 22), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (255, 255, 0), 2, cv2.LINE_AA)
    return img


def signal_plot(width: int, height: int, series: dict[str, np.ndarray]) -> np.ndarray:
    """Tile with each series min-max normalised and drawn as a line."""
    img = np.full((height, width, 3), 24, np.uint8)
    colors = [(255, 200, 0), (0, 200, 255), (120, 255, 120)]
    for k, ((name, y), color) in enumerate(zip(series.items(), colors)):
        y = np.asarray(y, np.float64)
        if y.size < 2:
            continue
        y = (y - y.min()) / (np.ptp(y) + 1e-9)
        pts = np.stack([np.linspace(4, width - 4, y.size), height - 8 - y * (height - 40)], 1)
        cv2.polylines(img, [pts.round().astype(np.int32)], False, color, 1, cv2.LINE_AA)
        cv2.putText(img, name, (8, 20 + 18 * k), cv2.FONT_HERSHEY_SIMPLEX, 0.5, color, 1, cv2.LINE_AA)
    return img


def contact_sheet(tiles: list[np.ndarray], columns: int = 4, tile: int = 320) -> np.ndarray:
    tiles = [cv2.resize(t, (tile, tile), interpolation=cv2.INTER_AREA) for t in tiles]
    while len(tiles) % columns:
        tiles.append(np.zeros_like(tiles[0]))
    rows = [np.concatenate(tiles[i : i + columns], 1) for i in range(0, len(tiles), columns)]
    return np.concatenate(rows, 0)
