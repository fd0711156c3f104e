"""Rig calibration with no target: the moving head is the calibration object.

1. Every frame of every camera: mediapipe's 478 face landmarks (one tracker per camera,
   in video mode); frames where the face is lost drop out.
2. Per camera, monocular capture's own fit (capture/pose.py: fit_head_pose): a focal
   length and the head's pose in every frame the camera sees it, all against one
   canonical face (the one solved from the camera that sees the face most), so that
   every camera's head poses share one head frame.
3. Rig extrinsics from the timesteps two cameras share: camera i -> camera j is the head's
   pose in j times its inverse in i, a robust mean over those timesteps; cameras are
   placed outward from the first (capture/bundle.py: place_cameras).
4. Bundle adjustment (capture/bundle.py) over up to MAX_TIMESTEPS timesteps: every
   camera's pose, the head's pose at each timestep and the rigid landmarks' 3D shape
   (pulled towards the canonical face by POINT_PRIOR_M), then every camera's focal length
   as well (square pixels, principal point at the image centre, no distortion); then once
   more without the observations off by more than max(OUTLIER_PX, 3 x the median).
5. Metric scale from the face: the solved shape's outer eye corners are put 9 cm apart
   (capture/pose.py: EYE_CORNER_DISTANCE_M), and the rig's translations scale with it.

Only the rigid landmarks (forehead, nose bridge, eye corners, cheekbones) enter, so
speech and expressions do not bend the rig. The world frame is the first camera's.

Landmarks are regressed, not found: mediapipe's slide over the skin as the head turns
from a camera, by a pixel or more, consistently enough to bend the rig by degrees. The
face's texture is where it is. So the bundle adjustment also takes SIFT features inside
the face, matched between every two cameras at each of its timesteps (Lowe's ratio test,
then one RANSAC fundamental matrix per pair over all timesteps together, which a fixed
rig shares whatever the face does), each adding its epipolar (Sampson) distance. They
pin the relative poses; the landmarks give the scale and the frame.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from avatar.dataset_format import EYE_OUTER, RIGID
from avatar.errors import AvatarError

from .bundle import (Matches, Observations, adjust_rig, pack_camera, place_cameras, residual_report,
                     rotation_vector, sampson_px, spread_evenly, unpack_camera)
from .calibration import Calibration, CameraCalibration
from .pose import EYE_CORNER_DISTANCE_M, fit_head_pose
from .rig import RigCamera, sync_indices
from .tracking import FaceTracker, face_height

OUTLINE = (127, 356, 162, 389, 21, 251, 54, 284, 103, 332, 67, 297, 109, 338)
"""Rigid landmarks on the face's outline (temples, hairline edge): mediapipe puts them on
the silhouette a view happens to see, so they are not one surface point across views."""
LANDMARKS = tuple(i for i in RIGID if i not in OUTLINE)
"""The landmarks the rig is solved on: the rigid ones inside the face."""
MIN_FACE_VIEWS = 10
"""Frames a camera must see the face in to be placed."""
MAX_TIMESTEPS = 120
"""Timesteps in the bundle adjustment (spread over the clip; more add time, not accuracy)."""
POINT_PRIOR_M = 0.005
"""How far (metres) a rigid landmark may move from the canonical face for the cost of
one robust-scale pixel: the shape adapts to the subject, the frame stays the face's."""
LOSS_SCALE_PX = 1.5
"""Soft-L1 scale: mediapipe's landmarks wander about a pixel on a face this size."""
OUTLIER_PX = 5.0
FACE_FEATURES = 500
"""SIFT features per face image (the strongest, inside the landmarks' hull)."""
MATCH_RATIO = 0.8
"""Lowe's ratio test on the two nearest descriptors."""
MIN_PAIR_MATCHES = 16
"""Matches two cameras need over the clip for their epipolar geometry to enter."""
UNDISTORT = (cv2.TERM_CRITERIA_COUNT | cv2.TERM_CRITERIA_EPS, 50, 1e-10)
"""Iterations of the lens's inversion (OpenCV's 5 leave strong barrel lenses off)."""
EPIPOLAR_RANSAC_PX = 2.0
"""RANSAC's inlier distance for a pair's fundamental matrix (a coarse cut: the bundle's
robust loss and outlier pass do the rest)."""


def track_rig(cameras: list[RigCamera], sync: list[np.ndarray], progress: bool = True) -> list[dict[int, np.ndarray]]:
    """Per camera: {sync index: [478, 3] landmarks (pixels, mediapipe's relative depth)} of
    the frames where it finds a face (the largest). Frames stream one at a time."""
    out = []
    with tqdm(total=sum(c.frames for c in cameras), desc="face landmarks", unit="frame", disable=not progress,
              dynamic_ncols=True) as bar:
        for cam, indices in zip(cameras, sync):
            seen = {}
            with FaceTracker(max_faces=1) as tracker:
                for k, rgb in cam.iter_frames(rgb=True):
                    bar.update(1)
                    if k >= len(indices):
                        break
                    faces = tracker(rgb)
                    if faces:
                        seen[int(indices[k])] = faces[0]
            out.append(seen)
    return out


def _cameras_per_timestep(seen: list[dict[int, np.ndarray]]) -> dict[int, int]:
    """How many cameras see the face at each timestep."""
    shared = defaultdict(int)
    for views in seen:
        for k in views:
            shared[k] += 1
    return shared


def bundle_timesteps(seen: list[dict[int, np.ndarray]]) -> list[int]:
    """The timesteps the bundle adjustment uses: up to MAX_TIMESTEPS of those at least two
    cameras see the face at, spread over the clip."""
    return spread_evenly(sorted(k for k, n in _cameras_per_timestep(seen).items() if n >= 2), MAX_TIMESTEPS)


FaceFeatures = list[dict[int, tuple[np.ndarray, np.ndarray]]]
"""Per camera: {timestep: (pixels [N, 2], SIFT descriptors [N, 128])}."""


def face_features(cameras: list[RigCamera], sync: list[np.ndarray], seen: list[dict[int, np.ndarray]],
                  progress: bool = True) -> FaceFeatures:
    """SIFT features inside the face (the convex hull of its tracked landmarks) of every
    camera's frames at the bundle's timesteps. Frames stream one at a time."""
    sift = cv2.SIFT_create(nfeatures=FACE_FEATURES)
    wanted = set(bundle_timesteps(seen))
    out = []
    with tqdm(total=sum(len(wanted & set(views)) for views in seen), desc="face features", unit="frame",
              disable=not progress, dynamic_ncols=True) as bar:
        for cam, indices, views in zip(cameras, sync, seen):
            needed = wanted & set(views)
            found, last = {}, max((k for k, step in enumerate(indices) if int(step) in needed), default=-1)
            for k, rgb in cam.iter_frames(rgb=True):  # grey as the tracker's frames, not the decoder's own
                if k > last:
                    break
                step = int(indices[k])
                if step not in needed:
                    continue
                bar.update(1)
                grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
                mask = np.zeros_like(grey)
                cv2.fillConvexPoly(mask, cv2.convexHull(views[step][:, :2].astype(np.float32)).astype(np.int32), 255)
                keypoints, descriptors = sift.detectAndCompute(grey, mask)
                if descriptors is not None:
                    found[step] = (np.array([kp.pt for kp in keypoints], np.float64), descriptors)
            out.append(found)
    return out


def match_features(features: FaceFeatures, lenses: list[tuple[np.ndarray, np.ndarray]] | None
                   ) -> tuple[Matches, dict[tuple[int, int], int]]:
    """Matches between every two cameras at the timesteps both have features at, kept where
    they fit one fundamental matrix per pair over all those timesteps (RANSAC). lenses:
    per camera (K, dist) to undistort by, or None (pixels taken as undistorted). Returns
    (matches, {(camera a, camera b): matches kept})."""
    matcher = cv2.BFMatcher(cv2.NORM_L2)
    parts, kept = [], {}
    for a in range(len(features)):
        for b in range(a + 1, len(features)):
            uv_a, uv_b = [], []
            for k in sorted(set(features[a]) & set(features[b])):
                (pa, da), (pb, db) = features[a][k], features[b][k]
                if len(da) < 2 or len(db) < 2:
                    continue
                for pair in matcher.knnMatch(da, db, k=2):
                    if len(pair) == 2 and pair[0].distance < MATCH_RATIO * pair[1].distance:
                        uv_a.append(pa[pair[0].queryIdx]), uv_b.append(pb[pair[0].trainIdx])
            if len(uv_a) < MIN_PAIR_MATCHES:
                continue
            uv_a, uv_b = np.array(uv_a), np.array(uv_b)
            if lenses is not None:
                uv_a, uv_b = (cv2.undistortPointsIter(uv[:, None], K, dist, None, K, UNDISTORT)[:, 0].astype(np.float64)
                              for uv, (K, dist) in ((uv_a, lenses[a]), (uv_b, lenses[b])))
            _, inlier = cv2.findFundamentalMat(uv_a, uv_b, cv2.FM_RANSAC, EPIPOLAR_RANSAC_PX, 0.999)
            if inlier is None or inlier.sum() < MIN_PAIR_MATCHES:
                continue
            inlier = inlier.ravel().astype(bool)
            n = int(inlier.sum())
            parts.append(Matches(np.full(n, a), np.full(n, b), uv_a[inlier], uv_b[inlier]))
            kept[(a, b)] = n
    if not parts:
        return Matches(np.zeros(0, int), np.zeros(0, int), np.zeros((0, 2)), np.zeros((0, 2))), kept
    return Matches(*(np.concatenate([getattr(m, f) for m in parts])
                     for f in ("camera_a", "camera_b", "uv_a", "uv_b"))), kept


def _head_in_camera(fit, k: int) -> np.ndarray:
    T = np.eye(4)
    T[:3, :3], T[:3, 3] = fit.R[k], fit.t[k]
    return T


def calibrate_face(root: Path, cameras: list[RigCamera], lenses: Calibration | None = None,
                   same_lens: bool = False, progress: bool = True) -> Calibration:
    """Calibrate a rig from a talking head filmed by every camera (see the module doc);
    `lenses`: a calibration whose K and dist are kept for every camera (only the rig's
    poses are solved); `same_lens`: one focal length for every camera (a rig of identical
    cameras)."""
    sync = sync_indices(root, cameras)
    seen = track_rig(cameras, sync, progress)
    features = face_features(cameras, sync, seen, progress)
    return solve_face_rig(root, cameras, seen, lenses, same_lens, features)


def solve_face_rig(root: Path, cameras: list[RigCamera], seen: list[dict[int, np.ndarray]],
                   lenses: Calibration | None = None, same_lens: bool = False,
                   features: FaceFeatures | None = None) -> Calibration:
    """Steps 2-5 of the module doc on tracked landmarks `seen` (track_rig's) and, where
    given, the face's texture (face_features')."""
    for cam, views in zip(cameras, seen):
        if len(views) < MIN_FACE_VIEWS:
            raise AvatarError(cam.path, f"camera {cam.name} finds a face in {len(views)} frame"
                              f"{'s' if len(views) != 1 else ''} (at least {MIN_FACE_VIEWS} needed)",
                              "film the head so that every camera sees the face, less than side-on, for a few seconds")
    shared = _cameras_per_timestep(seen)
    if max(shared.values()) < 2:
        raise AvatarError(root, "no two cameras see the face at the same time, so their poses cannot be related",
                          "film the head with the cameras running together, each seeing the face")

    # 2. Monocular fits, all against the canonical face of the camera that sees it most.
    rigid = list(LANDMARKS)
    order = sorted(range(len(cameras)), key=lambda c: -len(seen[c]))
    fits: dict[int, object] = {}
    keys = [sorted(views) for views in seen]
    canonical = None
    for c in order:
        lm = np.stack([seen[c][k] for k in keys[c]])
        fits[c] = fit_head_pose(lm, cameras[c].width, cameras[c].height, canonical=canonical,
                                frame_ids=np.asarray(keys[c]),
                                focal=lenses.camera(cameras[c].name).K[0, 0] if lenses is not None else None)
        canonical = fits[c].canonical if canonical is None else canonical
    row = [{k: n for n, k in enumerate(keys[c])} for c in range(len(cameras))]

    # 3. Rig extrinsics from shared timesteps.
    head_in_camera = [{k: _head_in_camera(fits[c], row[c][k]) for k in seen[c]} for c in range(len(cameras))]
    world_to_cam = place_cameras(root, [c.name for c in cameras], head_in_camera, "the face",
                                 "film the head where neighbouring cameras see the face together")

    # 4. Bundle adjustment on timesteps seen by two or more cameras, spread over the clip;
    #    each head pose starts from the camera that sees the face largest then.
    steps = bundle_timesteps(seen)
    index_of = {k: n for n, k in enumerate(steps)}
    poses = np.zeros((len(steps), 6))
    for k in steps:
        c = max((c for c in range(len(cameras)) if k in seen[c]), key=lambda c: float(face_height(seen[c][k])))
        T = np.linalg.inv(world_to_cam[c]) @ head_in_camera[c][k]
        poses[index_of[k]] = np.concatenate([rotation_vector(T[:3, :3]), T[:3, 3]])
    cam_idx, t_idx, p_idx, uv = [], [], [], []
    for c, views in enumerate(seen):
        for k in steps:
            if k in views:
                cam_idx.append(np.full(len(rigid), c)), t_idx.append(np.full(len(rigid), index_of[k]))
                p_idx.append(np.arange(len(rigid))), uv.append(views[k][rigid, :2].astype(np.float64))
    obs = Observations(np.concatenate(cam_idx), np.concatenate(t_idx), np.concatenate(p_idx), np.concatenate(uv))
    if lenses is not None:
        params = np.stack([pack_camera(lenses.camera(cam.name).K, lenses.camera(cam.name).dist, world_to_cam[c])
                           for c, cam in enumerate(cameras)])
    else:
        focal = [fits[c].focal for c in range(len(cameras))]
        if same_lens:
            focal = [float(np.exp(np.mean(np.log(focal))))] * len(cameras)
        params = np.stack([pack_camera(np.array([[focal[c], 0, cam.width / 2], [0, focal[c], cam.height / 2],
                                                 [0, 0, 1.0]]), np.zeros(5), world_to_cam[c])
                           for c, cam in enumerate(cameras)])
    matches, pairs = None, {}
    if features is not None:
        matches, pairs = match_features(features, None if lenses is None else
                                        [(lenses.camera(cam.name).K, lenses.camera(cam.name).dist) for cam in cameras])
    focal_only = np.zeros(9, bool)
    focal_only[0] = lenses is None
    params, poses, points, obs, err, dropped, matches = adjust_rig(
        params, poses, canonical[rigid].copy(), obs, focal_only, OUTLIER_PX, matches=matches,
        loss_scale_px=LOSS_SCALE_PX, square_pixels=lenses is None, shared_focal=same_lens and lenses is None,
        point_prior_m=POINT_PRIOR_M, max_iterations=300)
    epipolar = sampson_px(params, matches) if matches else np.zeros(0)

    # 5. Metric scale from the eye corners.
    eyes = [rigid.index(i) for i in EYE_OUTER]
    scale = EYE_CORNER_DISTANCE_M / float(np.linalg.norm(points[eyes[0]] - points[eyes[1]]))
    out = []
    for c, cam in enumerate(cameras):
        K, dist, T = unpack_camera(params[c])
        T[:3, 3] *= scale
        mine = obs.camera == c
        out.append(CameraCalibration(cam.name, cam.width, cam.height, K, dist, T,
                                     {**residual_report(err[mine], len(np.unique(obs.timestep[mine]))),
                                      "face_frames": len(seen[c]), "focal_monocular_px": float(fits[c].focal),
                                      "intrinsics": {"given": lenses.source} if lenses is not None else {"solved_from": "face"}}))
    report = {"landmarks": len(rigid), "timesteps_used": len(steps), "timesteps_shared": int(sum(n >= 2 for n in shared.values())),
              "outliers_dropped": dropped, "metric_scale": "outer eye corners 9 cm apart",
              "texture_matches": {f"{cameras[a].name}-{cameras[b].name}": n for (a, b), n in pairs.items()},
              "texture_matches_kept": len(epipolar),
              "epipolar_median_px": float(np.median(epipolar)) if len(epipolar) else None,
              "scale_applied": scale, "median_px": float(np.median(err)), "p90_px": float(np.percentile(err, 90))}
    return Calibration("face", out, str(root), report)
