"""Synthetic camera rigs with known calibration, and a ChArUco board filmed by them."""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np

from capture.calibration import CameraCalibration, relative_rotation_deg
from capture.charuco import Board

COMPOSITE = Path(__file__).resolve().parents[2] / "shared" / "data" / "multiview" / "vhap_nersemble_074_composite.mp4"
"""The real NeRSemble composite (../shared/data/README.md): 3 cameras of subject 074 tiled in one column."""
TILES = ["0,0,247,360", "0,360,247,360", "0,720,247,360"]
"""Its three cameras' tiles (X,Y,W,H)."""


def rig_errors(solved: list, truth: list, radius: float = 1.0) -> tuple[float, float, float]:
    """(largest rotation error in degrees, largest position error as a share of the rig
    `radius`, largest relative focal error) of a solved rig against the truth, both taken in
    their first camera's frame (each calibration has its own world frame)."""
    rot, pos = [], []
    for a, b in zip(solved[1:], truth[1:]):
        rot.append(relative_rotation_deg(solved[0], a, truth[0], b))
        in_first = [np.linalg.inv(c.world_to_camera @ np.linalg.inv(ref.world_to_camera))[:3, 3]
                    for c, ref in ((a, solved[0]), (b, truth[0]))]
        pos.append(np.linalg.norm(in_first[0] - in_first[1]) / radius)
    focal = [abs(a.K[0, 0] / b.K[0, 0] - 1) for a, b in zip(solved, truth)]
    return max(rot), max(pos), max(focal)


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


def head_rig(n: int = 6, radius: float = 0.8, size: int = 320, arc_deg: float = 70.0,
             seed: int = 0) -> list[CameraCalibration]:
    """n square cameras on an arc of `arc_deg` around a head at the origin (the head frame
    of scenes/sample.py: y up, z out of the face), looking at it, each with its own focal
    length (the head 40-55 % of the frame), principal point at the centre, no distortion."""
    rng = np.random.default_rng(seed)
    cams = []
    for i in range(n):
        a = math.radians(-arc_deg / 2 + arc_deg * i / max(n - 1, 1))
        eye = (radius * math.sin(a), rng.uniform(-0.12, 0.12), radius * math.cos(a))
        f = rng.uniform(1.6, 2.2) * size  # 0.22 m of head at 0.8 m
        K = np.array([[f, 0, size / 2], [0, f, size / 2], [0, 0, 1]])
        cams.append(CameraCalibration(f"cam_{i}", size, size, K, np.zeros(5), look_at(eye, up=(0.0, 1.0, 0.0))))
    return cams


def write_head_rig(root: Path, cams: list[CameraCalibration], frames: int = 30, seed: int = 0) -> None:
    """One folder of png frames per camera: the built-in sample subject's head (scenes/
    sample.py) moving at the origin (head_motion), filmed by every camera at once."""
    from scenes.sample import SampleConfig, _relief, render_frames
    from skimage import data

    head = _relief(data.astronaut())
    motion = head_motion(frames, seed)
    for cam in cams:
        cfg = SampleConfig(size=cam.width, fov_deg=math.degrees(2 * math.atan(cam.width / 2 / cam.K[0, 0])), seed=seed)
        M = np.stack([cam.world_to_camera @ T for T in motion])
        folder = root / cam.name
        folder.mkdir(parents=True, exist_ok=True)
        for k, rgb in enumerate(render_frames(cfg, head, M[:, :3, :3], M[:, :3, 3], np.zeros(frames), np.zeros(frames))):
            cv2.imwrite(str(folder / f"{k:04d}.png"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))


def head_motion(frames: int, seed: int = 0) -> list[np.ndarray]:
    """Head -> world 4x4s of a head at the origin turning (yaw +-18 deg), nodding and
    swaying a few centimetres, at 25 fps."""
    t = np.arange(frames) / 25.0
    rng = np.random.default_rng(seed)
    yaw = np.radians(18 * np.sin(2 * np.pi * 0.4 * t + rng.uniform(0, 6)))
    pitch = np.radians(8 * np.sin(2 * np.pi * 0.55 * t + rng.uniform(0, 6)))
    roll = np.radians(4 * np.sin(2 * np.pi * 0.3 * t + rng.uniform(0, 6)))
    out = []
    for k in range(frames):
        T = np.eye(4)
        T[:3, :3] = cv2.Rodrigues(np.array([pitch[k], yaw[k], roll[k]]))[0]
        T[:3, 3] = [0.02 * np.sin(2 * np.pi * 0.25 * t[k]), 0.01 * np.sin(2 * np.pi * 0.35 * t[k]), 0.0]
        out.append(T)
    return out


def face_landmarks(cam: CameraCalibration, face: np.ndarray, head_to_world: list[np.ndarray], noise_px: float,
                   seed: int = 0) -> dict[int, np.ndarray]:
    """{frame: [478, 3]} landmarks as the face tracker gives them (pixels, and depth
    relative to the face at the pixel scale) of a head-frame `face` [478, 3] seen by `cam`
    (pinhole) at each pose, with Gaussian pixel noise."""
    rng = np.random.default_rng(seed)
    out = {}
    for k, T in enumerate(head_to_world):
        M = cam.world_to_camera @ T
        x = face @ M[:3, :3].T + M[:3, 3]
        uv = x[:, :2] / x[:, 2:] * np.diag(cam.K)[:2] + cam.K[:2, 2]
        z = (x[:, 2] - x[:, 2].mean()) * cam.K[0, 0] / x[:, 2].mean()
        out[k] = np.concatenate([uv + rng.normal(0, noise_px, uv.shape), z[:, None]], 1).astype(np.float32)
    return out


def room_planes() -> list[tuple[np.ndarray, np.ndarray, float]]:
    """A static textured scene around the origin for structure from motion: (plane ->
    world 4x4, grey texture, side in metres) for a back wall, a floor and two side walls,
    each a different natural image (scikit-image's public-domain photos)."""
    from skimage import color, data

    def pose(R, t):
        T = np.eye(4)
        T[:3, :3], T[:3, 3] = R, t
        return T

    grey = [(color.rgb2gray(img) * 255).astype(np.uint8) for img in (data.astronaut(), data.coffee(), data.chelsea(),
                                                                       data.rocket(), data.immunohistochemistry())]
    rot_x, rot_y = cv2.Rodrigues(np.array([math.pi / 2, 0, 0]))[0], cv2.Rodrigues(np.array([0, math.pi / 2, 0]))[0]
    turned = cv2.Rodrigues(np.array([0.3, -0.6, 0.1]))[0]
    return [(pose(np.eye(3), [-1.0, -1.0, 0.8]), grey[0], 2.0),  # back wall, facing the rig
            (pose(rot_x, [-1.0, 0.5, -1.2]), grey[1], 2.0),  # floor, below the rig's eye line
            (pose(rot_y, [-0.9, -1.0, 0.8]), grey[2], 2.0),  # side walls
            (pose(rot_y, [0.9, -1.0, 0.8]), grey[3], 2.0),
            (pose(turned, [-0.15, -0.3, 0.1]), grey[4], 0.35),  # a panel in the middle of the room
            (pose(turned.T, [0.3, -0.1, 0.3]), grey[1], 0.3)]


def film_planes(cam: CameraCalibration, rays: np.ndarray, planes: list, seed: int = 0) -> np.ndarray:
    """Grey uint8 [H, W] of textured planes (room_planes) seen by `cam` through its lens:
    each pixel shows the nearest plane its ray hits inside the plane's square."""
    cam_to_world = np.linalg.inv(cam.world_to_camera)
    o, d = cam_to_world[:3, 3], rays @ cam_to_world[:3, :3].T
    best = np.full(len(rays), np.inf)
    img = np.full(len(rays), 110.0)
    for plane_to_world, texture, side in planes:
        world_to_plane = np.linalg.inv(plane_to_world)
        op, dp = world_to_plane[:3, :3] @ o + world_to_plane[:3, 3], d @ world_to_plane[:3, :3].T
        with np.errstate(divide="ignore", invalid="ignore"):
            s = -op[2] / dp[:, 2]
        hit = op + s[:, None] * dp
        inside = (s > 0) & (s < best) & (hit[:, 0] >= 0) & (hit[:, 0] < side) & (hit[:, 1] >= 0) & (hit[:, 1] < side)
        px = (hit[:, :2] * (np.array(texture.shape[1::-1]) / side)).astype(np.float32).reshape(cam.height, cam.width, 2)
        seen = cv2.remap(texture, px[..., 0], px[..., 1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE).ravel()
        img[inside] = seen[inside]
        best[inside] = s[inside]
    img = img.reshape(cam.height, cam.width) + np.random.default_rng(seed).normal(0, 1.5, (cam.height, cam.width))
    return np.clip(img, 0, 255).astype(np.uint8)


def write_room_rig(root: Path, cams: list[CameraCalibration], frames: int = 3, moving: bool = False) -> None:
    """One folder of png frames per camera filming the static room_planes scene. With
    `moving`, the whole rig is carried between frames (turned up to 12 degrees about the
    vertical and shifted up to 12 cm), its cameras fixed to each other."""
    planes = room_planes()
    rng = np.random.default_rng(7)
    rig_to_world = [np.eye(4)]
    for _ in range(frames - 1):
        T = np.eye(4)
        if moving:
            T[:3, :3] = cv2.Rodrigues(np.radians(rng.uniform(-12, 12, 3) * [0.4, 1.0, 0.3]))[0]
            T[:3, 3] = rng.uniform(-0.12, 0.12, 3)
        rig_to_world.append(T)
    for c, cam in enumerate(cams):
        folder = root / cam.name
        folder.mkdir(parents=True, exist_ok=True)
        rays = pixel_rays(cam)
        for k, T in enumerate(rig_to_world):
            carried = CameraCalibration(cam.name, cam.width, cam.height, cam.K, cam.dist,
                                        cam.world_to_camera @ np.linalg.inv(T))
            cv2.imwrite(str(folder / f"{k:04d}.png"), film_planes(carried, rays, planes, seed=100 * c + k))
