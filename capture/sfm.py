"""Rig calibration by structure from motion (pycolmap): no target, only a static, textured
scene that neighbouring cameras see together.

1. Frames at up to SFM_INSTANTS sync indices shared by every camera, spread over the clip,
   one folder per camera (COLMAP's one camera per folder: its own intrinsics, OpenCV
   model with distortion).
2. SIFT features, exhaustive matching and COLMAP's incremental mapper, on the CPU.
3. Each camera's pose is the robust mean of its registered frames' poses (a rig does not
   move; the spread is reported), re-expressed in the first camera's frame. Anything
   that moves between instants (a talking head) is an outlier to the mapper's RANSAC.

Structure from motion knows no metric scale: the rig is scaled so that the first two
cameras are 1 unit apart (`units` in CALIB.json says so); multi-view capture puts it in
metres from the face it triangulates.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from avatar.errors import AvatarError

from .bundle import average_rigid, residual_report, spread_evenly
from .calibration import COLMAP_MODELS, Calibration, CameraCalibration, rotation_angle_deg
from .rig import RigCamera, sync_indices

SFM_INSTANTS = 6
"""Sync indices whose frames enter the reconstruction (more add matching time, n^2)."""
SFM_UNITS = "rig units: the first two cameras 1 apart"


def calibrate_sfm(root: Path, cameras: list[RigCamera], instants: int = SFM_INSTANTS,
                  progress: bool = True) -> Calibration:
    """Calibrate a rig from a static scene its cameras film (see the module doc)."""
    try:
        import pycolmap
    except ImportError:
        raise AvatarError(root, "calibrating by structure from motion needs pycolmap",
                          "pip install 'avatar-studio[multiview]'") from None
    sync = sync_indices(root, cameras)
    common = sorted(set.intersection(*[set(s.tolist()) for s in sync]))
    if not common:
        raise AvatarError(root, "its cameras share no sync index, so no instant is seen by all of them",
                          "give videos recorded together (or caliscope's timestamps.csv)")
    chosen = set(spread_evenly(common, instants))
    with tempfile.TemporaryDirectory(prefix="avatar-sfm-") as work:
        images = Path(work) / "images"
        for cam, indices in tqdm(list(zip(cameras, sync)), desc="sfm frames", unit="camera", disable=not progress):
            (images / cam.name).mkdir(parents=True)
            for k, grey in cam.iter_frames():
                if k < len(indices) and int(indices[k]) in chosen:
                    cv2.imwrite(str(images / cam.name / f"{int(indices[k]):06d}.png"), grey)
        database = Path(work) / "database.db"
        reader = pycolmap.ImageReaderOptions()
        reader.camera_model = "OPENCV"
        pycolmap.extract_features(database, images, camera_mode=pycolmap.CameraMode.PER_FOLDER,
                                  reader_options=reader, device=pycolmap.Device.cpu)
        pycolmap.match_exhaustive(database, device=pycolmap.Device.cpu)
        options = pycolmap.IncrementalPipelineOptions()
        options.random_seed = 0
        models = pycolmap.incremental_mapping(database, images, Path(work) / "sparse", options)
    if not models:
        raise AvatarError(root, "structure from motion found no two frames it could relate",
                          "film a static, textured scene that neighbouring cameras see together, or calibrate "
                          "with --method charuco (a board) or face (the talking head)")
    rec = max(models.values(), key=lambda r: r.num_reg_images())

    by_camera: dict[str, list] = {cam.name: [] for cam in cameras}
    for image in rec.images.values():
        if image.has_pose and Path(image.name).parent.name in by_camera:
            by_camera[Path(image.name).parent.name].append(image)
    lost = [name for name, ims in by_camera.items() if not ims]
    if lost:
        raise AvatarError(root, f"structure from motion could not place camera{'s' if len(lost) > 1 else ''} "
                          f"{', '.join(lost)}: too few of {'their' if len(lost) > 1 else 'its'} features match "
                          "the other cameras'", "film a static, textured scene that neighbouring cameras see "
                          "together, or calibrate with --method charuco or face")
    world_to_cam, spread, errors = {}, {}, {}
    for cam in cameras:
        ims = by_camera[cam.name]
        poses = [np.vstack([im.cam_from_world().matrix(), [0, 0, 0, 1]]) for im in ims]
        world_to_cam[cam.name] = average_rigid(poses)
        spread[cam.name] = max(rotation_angle_deg(p, world_to_cam[cam.name]) for p in poses)
        err = []
        for im in ims:
            camera = rec.cameras[im.camera_id]
            for p in im.points2D:
                if p.has_point3D():
                    uv = camera.img_from_cam(im.cam_from_world() * rec.points3D[p.point3D_id].xyz)
                    err.append(float(np.linalg.norm(np.asarray(uv) - np.asarray(p.xy))))
        errors[cam.name] = (np.array(err), len(ims))
    first = world_to_cam[cameras[0].name]
    to_first = {name: T @ np.linalg.inv(first) for name, T in world_to_cam.items()}
    baseline = float(np.linalg.norm(np.linalg.inv(to_first[cameras[1].name])[:3, 3]))
    out = []
    for cam in cameras:
        camera = rec.cameras[by_camera[cam.name][0].camera_id]
        fx, fy, cx, cy, d = COLMAP_MODELS["OPENCV"](list(camera.params))
        T = to_first[cam.name].copy()
        T[:3, 3] /= baseline
        out.append(CameraCalibration(cam.name, cam.width, cam.height, np.array([[fx, 0, cx], [0, fy, cy], [0, 0, 1.0]]),
                                     np.concatenate([d, [0.0]]), T,
                                     {**residual_report(*errors[cam.name]), "pose_spread_deg": spread[cam.name]}))
    all_err = np.concatenate([e for e, _ in errors.values()])
    report = {"instants": len(chosen), "registered_frames": int(rec.num_reg_images()),
              "points": int(rec.num_points3D()), "scale": SFM_UNITS,
              "median_px": float(np.median(all_err)), "p90_px": float(np.percentile(all_err, 90))}
    return Calibration("sfm", out, str(root), report, units=SFM_UNITS)
