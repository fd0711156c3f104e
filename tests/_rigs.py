"""Synthetic camera rigs with known calibration, and a ChArUco board filmed by them."""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np

from capture.calibration import CameraCalibration
from capture.charuco import Board


def look_at(eye, target=(0.0, 0.0, 0.0), up=(0.0, -1.0, 0.0)) -> np.ndarray:
    """World-to-camera 4x4 (OpenCV axes) of a camera at `eye` looking at `target`."""
    eye, target, up = (np.asarray(v, float) for v in (eye, target, up))
    z = (target - eye) / np.linalg.norm(target - eye)
    x = np.cross(z, up)
    x /= np.linalg.norm(x)
    R = np.stack([x, np.cross(z, x), z])
    T = np.eye(4)
    T[:3, :3], T[:3, 3] = R, -R @ eye
    return T


def ring_rig(n: int = 6, radius: float = 1.0, width: int = 640, height: int = 480, arc_deg: float = 100.0,
             seed: int = 0) -> list[CameraCalibration]:
    """n cameras on an arc of `arc_deg` around the origin at `radius` metres, each with its
    own focal length and principal point; camera 1 has strong barrel distortion."""
    rng = np.random.default_rng(seed)
    cams = []
    for i in range(n):
        a = math.radians(-arc_deg / 2 + arc_deg * i / max(n - 1, 1))
        eye = (radius * math.sin(a), rng.uniform(-0.15, 0.15), -radius * math.cos(a))
        f = rng.uniform(0.8, 1.1) * width
        K = np.array([[f, 0, width / 2 + rng.uniform(-12, 12)], [0, f * rng.uniform(0.99, 1.01), height / 2 + rng.uniform(-12, 12)],
                      [0, 0, 1]])
        dist = np.array([-0.28, 0.09, 0.001, -0.001, 0.0]) if i == 1 else np.array([0.02, -0.01, 0, 0, 0.0])
        cams.append(CameraCalibration(f"cam_{i}", width, height, K, dist, look_at(eye)))
    return cams


def board_poses(n: int, seed: int = 0, spread: float = 0.25, tilt_deg: float = 25.0,
                depth: tuple[float, float] = (-0.3, 0.3), arc_deg: float = 100.0) -> list[np.ndarray]:
    """Board -> world 4x4s near the origin with random tilts. With no tilt the board's axes
    are the world's: the rig, on the -z side looking along +z, sees its printed face.
    `depth`: the range of the board's z (towards or away from the rig). Each pose turns
    the board towards a random direction within the rig's arc, so every camera of a
    ring_rig sees it face-on now and then."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        yaw, pitch, roll = np.radians(rng.uniform(-tilt_deg, tilt_deg, 3) * [1.0, 1.0, 2.0])
        yaw -= np.radians(rng.uniform(-arc_deg / 2, arc_deg / 2))
        R = cv2.Rodrigues(np.array([pitch, yaw, roll]))[0]
        T = np.eye(4)
        T[:3, :3], T[:3, 3] = R, [*rng.uniform(-spread, spread, 2) * [1.0, 0.8], rng.uniform(*depth)]
        out.append(T)
    return out


def pixel_rays(cam: CameraCalibration) -> np.ndarray:
    """[H * W, 3] the direction (camera frame, z = 1) each pixel sees through the lens."""
    u, v = np.meshgrid(np.arange(cam.width, dtype=np.float64), np.arange(cam.height, dtype=np.float64))
    pix = np.stack([u.ravel(), v.ravel()], 1)[:, None]
    rays = cv2.undistortPointsIter(pix, cam.K, cam.dist, None, None,
                                   (cv2.TERM_CRITERIA_COUNT | cv2.TERM_CRITERIA_EPS, 40, 1e-10)).reshape(-1, 2)
    return np.concatenate([rays, np.ones((len(rays), 1))], 1)


def film_board(cam: CameraCalibration, rays: np.ndarray, board: Board, board_to_world: np.ndarray,
               texture: np.ndarray, margin_m: float, noise: float = 2.0, seed: int = 0) -> np.ndarray:
    """Grey uint8 [H, W] of `board` (its image `texture`, with a `margin_m` white border)
    seen by `cam` (its pixel_rays) through its lens, over a mid-grey wall."""
    d_cam = rays
    cam_to_board = np.linalg.inv(board_to_world) @ np.linalg.inv(cam.world_to_camera)
    o = cam_to_board[:3, 3]
    d = d_cam @ cam_to_board[:3, :3].T
    with np.errstate(divide="ignore", invalid="ignore"):
        s = -o[2] / d[:, 2]
    hit = o + s[:, None] * d
    scale = texture.shape[1] / (board.columns * board.square_m + 2 * margin_m)
    mx = ((hit[:, 0] + margin_m) * scale).reshape(cam.height, cam.width).astype(np.float32)
    my = ((hit[:, 1] + margin_m) * scale).reshape(cam.height, cam.width).astype(np.float32)
    valid = (s > 0).reshape(cam.height, cam.width)
    mx[~valid] = -1
    img = cv2.remap(texture, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                    borderValue=110)
    img = cv2.GaussianBlur(img.astype(np.float32), (0, 0), 0.6)
    img += np.random.default_rng(seed).normal(0, noise, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def board_texture(board: Board, margin_m: float, px_per_m: float = 4000.0) -> np.ndarray:
    side = (round((board.columns * board.square_m + 2 * margin_m) * px_per_m),
            round((board.rows * board.square_m + 2 * margin_m) * px_per_m))
    return board.opencv().generateImage(side, marginSize=round(margin_m * px_per_m))


def write_board_rig(root: Path, cams: list[CameraCalibration], board: Board, poses: list[np.ndarray],
                    margin_m: float = 0.02) -> None:
    """One folder of png frames per camera (the board at each pose) and charuco.toml."""
    texture = board_texture(board, margin_m)
    for c, cam in enumerate(cams):
        folder = root / cam.name
        folder.mkdir(parents=True, exist_ok=True)
        rays = pixel_rays(cam)
        for k, pose in enumerate(poses):
            cv2.imwrite(str(folder / f"{k:04d}.png"),
                        film_board(cam, rays, board, pose, texture, margin_m, seed=100 * c + k))
    (root / "charuco.toml").write_text(
        f"columns = {board.columns}\nrows = {board.rows}\ndictionary = \"{board.dictionary}\"\n"
        f"units = \"cm\"\nboard_width = 30\nboard_height = 30\naruco_scale = {board.marker_ratio}\n"
        f"square_size_override_cm = {board.square_m * 100}\ninverted = false\n")
