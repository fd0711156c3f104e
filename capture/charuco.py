"""Rig calibration from a ChArUco board filmed by every camera (OpenCV's aruco module).

1. Every frame of every camera: the board's inner corners (ids and sub-pixel positions).
2. Per camera: intrinsics and distortion, given (`avatar calibrate --intrinsics FILE`,
   e.g. from a camera's own close-up board video) or solved from these views
   (cv2.calibrateCamera on up to MAX_VIEWS views spread through the video, with the
   focal length's standard error in the report), and the board's pose in each view (PnP).
3. Rig extrinsics: for each pair of cameras that see the board at the same sync index,
   their relative pose (a robust mean over shared views); cameras are placed outward from
   the first camera along the pairs with the most shared views.
4. Bundle adjustment of every camera's pose and every board pose (capture/bundle.py);
   then of every camera's lens as well, when each camera saw the board over a range of
   distances (DEPTH_RATIO) and no lenses were given; then once more without the
   observations that are off by more than OUTLIER_PX.

The board file is caliscope's charuco.toml, as is:
    columns, rows              squares across and down
    dictionary                 e.g. "DICT_4X4_1000"
    square_size_override_cm    the printed square (else board_width / columns in `units`)
    aruco_scale                marker side / square side
    inverted                   white markers on black (the image is inverted to detect)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from avatar.errors import AvatarError

from .bundle import (INTRINSICS, Observations, adjust_rig, pack_camera, place_cameras, residual_report,
                     rotation_vector, spread_evenly, unpack_camera)
from .calibration import Calibration, CameraCalibration, read_document
from .rig import RigCamera, sync_indices

MIN_CORNERS = 6
"""Corners a view needs to count (a pose from fewer is unreliable on a small board)."""
MAX_VIEWS = 80
"""Views per camera for its intrinsics (spread through the video)."""
DEPTH_RATIO = 2.0
"""The rig's bundle adjustment refines every camera's lens too when each camera saw the
board at distances at least this far apart (farthest / nearest; caliscope's gate): a
board kept at one distance cannot tell focal length from distance, and on the real
4-webcam set (ratios 1.2-1.6) refining moved a focal by 10 % and the rig by degrees."""
FOCAL_UNCERTAIN = 0.02
"""A solved focal length with a larger relative standard error is reported as uncertain."""
OUTLIER_PX = 3.0
UNITS_CM = {"cm": 1.0, "inch": 2.54, "in": 2.54, "mm": 0.1}


@dataclass
class Board:
    columns: int
    rows: int
    dictionary: str
    square_m: float
    marker_ratio: float
    inverted: bool = False

    def opencv(self) -> "cv2.aruco.CharucoBoard":
        d = cv2.aruco.getPredefinedDictionary(getattr(cv2.aruco, self.dictionary))
        return cv2.aruco.CharucoBoard((self.columns, self.rows), self.square_m, self.square_m * self.marker_ratio, d)

    def corners(self) -> np.ndarray:
        """[N, 3] inner corners in the board frame (metres, z = 0), by corner id."""
        return np.asarray(self.opencv().getChessboardCorners(), np.float64)


def load_board(path: str | Path) -> Board:
    """caliscope's charuco.toml -> Board; a named error for anything missing or unknown."""
    path = Path(path)
    doc = read_document(path, "give the board's charuco.toml (caliscope's format)")
    doc = doc.get("charuco", doc)
    try:
        columns, rows = int(doc["columns"]), int(doc["rows"])
        dictionary = str(doc["dictionary"])
        if doc.get("square_size_override_cm"):
            square_cm = float(doc["square_size_override_cm"])
        else:
            unit = UNITS_CM[str(doc.get("units", "cm"))]
            square_cm = min(float(doc["board_width"]) / columns, float(doc["board_height"]) / rows) * unit
        ratio = float(doc.get("aruco_scale", 0.75))
    except (KeyError, TypeError, ValueError) as exc:
        raise AvatarError(path, f"does not describe a ChArUco board ({exc!r} missing or wrong)",
                          "give columns, rows, dictionary and square_size_override_cm (caliscope's charuco.toml)") from exc
    if not hasattr(cv2.aruco, dictionary) or not dictionary.startswith("DICT_"):
        raise AvatarError(path, f"names an unknown ArUco dictionary {dictionary!r}", "use one of OpenCV's, e.g. DICT_4X4_1000")
    if columns < 3 or rows < 3 or square_cm <= 0 or not 0 < ratio < 1:
        raise AvatarError(path, "describes an impossible board (at least 3 x 3 squares, a positive square, "
                          "marker ratio between 0 and 1)", "check the board's measurements")
    return Board(columns, rows, dictionary, square_cm / 100.0, ratio, bool(doc.get("inverted", False)))


def detect(board: Board, detector: "cv2.aruco.CharucoDetector", grey: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(corner ids [n], pixels [n, 2]) of the board in one grey frame (n = 0 when unseen)."""
    corners, ids, _, _ = detector.detectBoard(255 - grey if board.inverted else grey)
    if ids is None or len(ids) == 0:
        return np.zeros(0, int), np.zeros((0, 2))
    return ids.ravel().astype(int), corners.reshape(-1, 2).astype(np.float64)


def _collinear(points: np.ndarray) -> bool:
    centred = points - points.mean(0)
    s = np.linalg.svd(centred, compute_uv=False)
    return s[1] < 1e-6 * max(s[0], 1e-12)


def detect_rig(cameras: list[RigCamera], sync: list[np.ndarray], board: Board, progress: bool = True) -> list[dict]:
    """Per camera: {sync index: (ids, pixels)} of the views with at least MIN_CORNERS
    non-collinear corners. Frames stream one at a time."""
    detector = cv2.aruco.CharucoDetector(board.opencv())
    grid = board.corners()
    out = []
    total = sum(c.frames for c in cameras)
    with tqdm(total=total, desc="board corners", unit="frame", disable=not progress, dynamic_ncols=True) as bar:
        for cam, indices in zip(cameras, sync):
            views = {}
            for k, grey in cam.iter_frames():
                bar.update(1)
                if k >= len(indices):
                    break
                ids, uv = detect(board, detector, grey)
                if len(ids) >= MIN_CORNERS and not _collinear(grid[ids, :2]):
                    views[int(indices[k])] = (ids, uv)
            out.append(views)
    return out


def _intrinsics(cam: RigCamera, views: dict, grid: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict]:
    """(K, dist [5], figures) of one camera solved from its board views."""
    keys = spread_evenly(sorted(views), MAX_VIEWS)
    obj = [grid[views[k][0]].astype(np.float32) for k in keys]
    img = [views[k][1].astype(np.float32) for k in keys]
    rms, K, dist, _, _, sd, _, _ = cv2.calibrateCameraExtended(obj, img, (cam.width, cam.height), None, None)
    if not np.isfinite(rms) or K[0, 0] <= 0 or K[1, 1] <= 0:
        raise AvatarError(cam.path, f"camera {cam.name}'s intrinsics could not be solved from {len(keys)} board views",
                          "film the board closer, tilted, and across the whole frame")
    sd = sd.ravel()  # fx, fy, cx, cy, k1, ...
    focal_sd = float(np.hypot(sd[0], sd[1]) / np.hypot(K[0, 0], K[1, 1]))
    return K, dist.ravel()[:5], {"solved_from_views": len(keys), "rms_px": float(rms),
                                 "focal_relative_sd": focal_sd, "focal_uncertain": bool(focal_sd > FOCAL_UNCERTAIN)}


def _board_pose(views: dict, key: int, grid: np.ndarray, K: np.ndarray, dist: np.ndarray) -> np.ndarray | None:
    """4x4 board -> camera of one view, or None when PnP fails."""
    ids, uv = views[key]
    ok, rvec, tvec = cv2.solvePnP(grid[ids], uv, K, dist, flags=cv2.SOLVEPNP_IPPE)
    if not ok:
        return None
    T = np.eye(4)
    T[:3, :3], T[:3, 3] = cv2.Rodrigues(rvec)[0], tvec.ravel()
    return T


def calibrate_charuco(root: Path, cameras: list[RigCamera], board: Board, intrinsics: Calibration | None = None,
                      progress: bool = True) -> Calibration:
    """Calibrate a rig from its board videos (see the module doc); `intrinsics`: a
    calibration whose K and dist are kept for every camera (its poses are not used)."""
    sync = sync_indices(root, cameras)
    seen = detect_rig(cameras, sync, board, progress)
    grid = board.corners()
    for cam, views in zip(cameras, seen):
        if len(views) < 3:
            raise AvatarError(cam.path, f"camera {cam.name} sees the board in {len(views)} frame"
                              f"{'s' if len(views) != 1 else ''} (at least 3 needed, with {MIN_CORNERS} corners each)",
                              "film the board so that every camera sees it, whole and in focus, several times")
    if intrinsics is not None:
        lenses = [(intrinsics.camera(cam.name).K, intrinsics.camera(cam.name).dist, {"given": intrinsics.source})
                  for cam in cameras]
    else:
        lenses = [_intrinsics(cam, views, grid) for cam, views in zip(cameras, seen)]
    board_in_cam = [{k: T for k in views if (T := _board_pose(views, k, grid, K, d)) is not None}
                    for views, (K, d, _) in zip(seen, lenses)]

    world_to_cam = place_cameras(root, [c.name for c in cameras], board_in_cam, "the board",
                                 "film the board where neighbouring cameras see it together")

    # Board pose per sync index, from the camera that sees the most corners then.
    keys = sorted(set().union(*[b.keys() for b in board_in_cam]))
    index_of = {k: n for n, k in enumerate(keys)}
    poses = np.zeros((len(keys), 6))
    for k in keys:
        c = max((c for c in range(len(cameras)) if k in board_in_cam[c]), key=lambda c: len(seen[c][k][0]))
        T = np.linalg.inv(world_to_cam[c]) @ board_in_cam[c][k]
        poses[index_of[k]] = np.concatenate([rotation_vector(T[:3, :3]), T[:3, 3]])

    cam_idx, t_idx, p_idx, uv = [], [], [], []
    for c, views in enumerate(seen):
        for k in board_in_cam[c]:
            ids, pts = views[k]
            cam_idx.append(np.full(len(ids), c)), t_idx.append(np.full(len(ids), index_of[k]))
            p_idx.append(ids), uv.append(pts)
    obs = Observations(np.concatenate(cam_idx), np.concatenate(t_idx), np.concatenate(p_idx), np.concatenate(uv))
    params = np.stack([pack_camera(K, d, world_to_cam[c]) for c, (K, d, _) in enumerate(lenses)])
    depth_ratio = [max(np.linalg.norm(T[:3, 3]) for T in b.values()) / min(np.linalg.norm(T[:3, 3]) for T in b.values())
                   for b in board_in_cam]
    refine = bool(intrinsics is None and min(depth_ratio) >= DEPTH_RATIO)
    free = np.ones(INTRINSICS, bool) if refine else None
    params, poses, _, obs, err, dropped, _ = adjust_rig(params, poses, grid, obs, free, OUTLIER_PX)

    out = []
    for c, cam in enumerate(cameras):
        K, dist, T = unpack_camera(params[c])
        mine = obs.camera == c
        out.append(CameraCalibration(cam.name, cam.width, cam.height, K, dist, T,
                                     {**residual_report(err[mine], len(np.unique(obs.timestep[mine]))),
                                      "intrinsics": {**lenses[c][2], "refined_with_the_rig": refine},
                                      "board_depth_ratio": float(depth_ratio[c])}))
    report = {"board": {"columns": board.columns, "rows": board.rows, "dictionary": board.dictionary,
                        "square_m": board.square_m},
              "sync_indices_used": len(keys), "outliers_dropped": dropped,
              "intrinsics_refined": refine, "min_board_depth_ratio": float(min(depth_ratio)),
              "median_px": float(np.median(err)), "p90_px": float(np.percentile(err, 90))}
    return Calibration("charuco", out, str(root), report)
