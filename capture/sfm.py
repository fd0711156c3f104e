"""Rig calibration by structure from motion (pycolmap): no target, only a static, textured
scene that neighbouring cameras see together.

1. Frames at up to SFM_INSTANTS sync indices shared by every camera, spread over the clip,
   one folder per camera (COLMAP's one camera per folder: its own intrinsics, OpenCV
   model with distortion).
2. SIFT features, exhaustive matching and COLMAP's incremental mapper, on the CPU, with
   every image free. Anything that moves between instants (a talking head) is an outlier
   to the mapper's RANSAC.
3. The images of one instant become one frame of a rig (COLMAP's rig support): each
   camera's pose relative to the first camera is derived from that first solve, and a
   bundle adjustment holds it constant over time while it refines the lenses.
4. Where the scene does not pin the focal lengths, the mapper can run off to lenses no
   camera has (fx/fy of 4, distortion terms of 100): such a solve is redone with another
   random seed, up to SFM_SOLVES times, and then refused with a remedy.

Carry or turn the rig through the scene while filming: each instant then sees the scene
from new places, which pins each camera's focal length and principal point (on a
synthetic room, focal within 0.05 %). A rig that stays put sees one picture per camera,
where focal trades with distortion and the principal point cannot be told from a turn,
so it stays at the image centre (focal lengths 4-6 % off there). Whether the rig moved is
read from the solve (RIG_MOVED_DEG), and reported.

Structure from motion knows no metric scale: the rig is scaled so that the first two
cameras are 1 unit apart (`units` in CALIB.json says so); multi-view capture puts it in
metres from the face it triangulates.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from avatar.errors import AvatarError

from .bundle import residual_report, spread_evenly
from .calibration import COLMAP_MODELS, Calibration, CameraCalibration, rotation_angle_deg
from .rig import RigCamera, sync_indices

SFM_INSTANTS = 6
"""Sync indices whose frames enter the reconstruction (more add matching time, n^2)."""
SFM_UNITS = "rig units: the first two cameras 1 apart"
SFM_SOLVES = 5
"""Mapper runs (random seeds 0, 1, ...) tried until one gives plausible lenses."""
SFM_MAX_ASPECT = 1.1
"""A solved camera's fx/fy beyond this (or its inverse) is no real lens: the solve is redone."""
RIG_MOVED_DEG = 3.0
"""The rig turned at least this far over the instants: its lenses' principal points are
refined (a rig that stays put cannot tell them from its cameras' rotations)."""


def _homogeneous(rigid) -> np.ndarray:
    """pycolmap Rigid3d -> 4x4."""
    return np.vstack([rigid.matrix(), [0, 0, 0, 1]])


def lens_problem(camera) -> str | None:
    """Why a solved pycolmap camera cannot be a real lens, or None. COLMAP's own bounds
    (focal 0.1-10x the larger side, distortion terms within 1), and square pixels: where the
    scene does not pin the focal length the mapper can run off along the focal-distortion
    valley, to fx/fy of 4 or k2 of 100 (seen on a rig that stayed put)."""
    fx, fy = camera.focal_length_x, camera.focal_length_y
    if not 1 / SFM_MAX_ASPECT <= fx / fy <= SFM_MAX_ASPECT:
        return f"focal lengths {fx:.0f} x {fy:.0f} px (pixels are square)"
    if camera.has_bogus_params(0.1, 10.0, 1.0):
        return f"focal {fx:.0f} px or distortion {[round(float(d), 2) for d in camera.params[4:]]} out of range"
    return None


def _solve_rig(root: Path, cameras: list[RigCamera], work: Path, seed: int) -> tuple:
    """One solve on the matched database in `work`: COLMAP's incremental mapper with every
    image free (random seed `seed`), then the images of one instant made one frame of a
    rig and a bundle adjustment with the rig held. (reconstruction, registered images per
    camera name, free poses by image name, instants placed per camera, how far the rig turned)."""
    import pycolmap

    options = pycolmap.IncrementalPipelineOptions()
    options.random_seed = seed
    models = pycolmap.incremental_mapping(work / "database.db", work / "images", work / f"sparse{seed}", options)
    if not models:
        raise AvatarError(root, "structure from motion found no two frames it could relate",
                          "film a static, textured scene that neighbouring cameras see together, or calibrate "
                          "with --method charuco (a board) or face (the talking head)")
    rec = max(models.values(), key=lambda r: r.num_reg_images())
    camera_of = {cam.name: [im for im in rec.images.values() if im.has_pose and Path(im.name).parent.name == cam.name]
                 for cam in cameras}
    lost = [name for name, ims in camera_of.items() if not ims]
    if lost:
        raise AvatarError(root, f"structure from motion could not place camera{'s' if len(lost) > 1 else ''} "
                          f"{', '.join(lost)}: too few of {'their' if len(lost) > 1 else 'its'} features match "
                          "the other cameras'", "film a static, textured scene that neighbouring cameras see "
                          "together, or calibrate with --method charuco or face")
    free = {im.name: _homogeneous(im.cam_from_world()) for im in rec.images.values() if im.has_pose}
    placed = {cam.name: {Path(im.name).name for im in camera_of[cam.name]} for cam in cameras}
    alone = [name for name, at in placed.items() if not at & placed[cameras[0].name]]
    if alone:  # the rig's pose of such a camera relative to the first cannot be derived
        raise AvatarError(root, f"structure from motion placed every camera, but {', '.join(alone)} never at an "
                          f"instant when {cameras[0].name} was placed too",
                          "film longer, so that the cameras see the scene together at more instants")
    config = pycolmap.RigConfig(cameras=[pycolmap.RigConfigCamera(ref_sensor=i == 0, image_prefix=f"{cam.name}/")
                                         for i, cam in enumerate(cameras)])
    rig_database = work / f"rig{seed}.db"  # the rig goes into a copy: a later solve maps the database unrigged
    shutil.copyfile(work / "database.db", rig_database)
    db = pycolmap.Database.open(rig_database)
    try:
        pycolmap.apply_rig_config([config], db, rec)
    finally:
        db.close()
    ref = [f for f in rec.frames.values() if f.has_pose]
    turn = max((rotation_angle_deg(_homogeneous(a.rig_from_world), _homogeneous(b.rig_from_world))
                for a in ref for b in ref), default=0.0)
    adjust = pycolmap.BundleAdjustmentOptions()
    adjust.refine_sensor_from_rig = True
    adjust.refine_principal_point = turn >= RIG_MOVED_DEG
    pycolmap.bundle_adjustment(rec, adjust)
    return rec, camera_of, free, placed, turn


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
        rejected = []
        for seed in range(SFM_SOLVES):
            try:
                rec, camera_of, free, placed, turn = _solve_rig(root, cameras, Path(work), seed)
            except AvatarError as error:  # a rig that cannot be placed fails its first solve as it did
                if not rejected:
                    raise
                rejected.append(error.problem)
                continue
            problems = [f"{name}: {problem}" for name, ims in camera_of.items()
                        if (problem := lens_problem(rec.images[ims[0].image_id].camera))]
            if not problems:
                break
            rejected.append("; ".join(problems))
        else:
            raise AvatarError(root, f"structure from motion gave no plausible rig in {SFM_SOLVES} solves "
                              f"({rejected[-1]}): the scene does not pin the cameras' focal lengths",
                              "carry or turn the rig through a textured scene with depth (not one wall), or "
                              "calibrate with --method charuco, or give the lenses with --intrinsics")
    rig = next(iter(rec.rigs.values()))
    out, all_err = [], []
    for cam in cameras:
        ims = [rec.images[im.image_id] for im in camera_of[cam.name]]
        camera = ims[0].camera
        T = np.eye(4) if rig.is_ref_sensor(camera.sensor_id) else _homogeneous(rig.sensor_from_rig(camera.sensor_id))
        # How far the first, unconstrained solve had this camera from the rig's pose for it.
        spread = max(rotation_angle_deg(free[im.name] @ np.linalg.inv(free[f"{cameras[0].name}/{Path(im.name).name}"]), T)
                     for im in ims if Path(im.name).name in placed[cameras[0].name])
        err = [float(np.linalg.norm(np.asarray(camera.img_from_cam(im.cam_from_world() * rec.points3D[p.point3D_id].xyz))
                                    - np.asarray(p.xy)))
               for im in ims for p in im.points2D if p.has_point3D()]
        all_err += err
        fx, fy, cx, cy, d = COLMAP_MODELS["OPENCV"](list(camera.params))
        out.append(CameraCalibration(cam.name, cam.width, cam.height, np.array([[fx, 0, cx], [0, fy, cy], [0, 0, 1.0]]),
                                     np.concatenate([d, [0.0]]), T,
                                     {**residual_report(np.array(err), len(ims)), "free_solve_deg": spread}))
    baseline = float(np.linalg.norm(out[1].centre))
    for cam in out:
        cam.world_to_camera[:3, 3] /= baseline
    report = {"instants": len(chosen), "registered_frames": int(rec.num_reg_images()),
              "points": int(rec.num_points3D()), "scale": SFM_UNITS, "rig_turn_deg": turn,
              "principal_points": "refined" if turn >= RIG_MOVED_DEG else f"image centres (the rig turned under {RIG_MOVED_DEG:g}°)",
              "rejected_solves": rejected,
              "median_px": float(np.median(all_err)), "p90_px": float(np.percentile(all_err, 90))}
    return Calibration("sfm", out, str(root), report, units=SFM_UNITS)
