"""`avatar capture RIG`: a head filmed by a calibrated camera rig becomes a dataset folder
(format avatar-dataset/2, avatar/dataset_format.py): one frame per camera per timestep.

1. The rig (capture/rig.py: a folder of videos or image folders, or the tiles of a
   composite) and its calibration (--calib CALIB.json, else a calibration file found in
   the folder, else the face itself: capture/face_calibration.py on the landmarks tracked
   here). Frames are paired across cameras by caliscope's frame table, a composite's
   shared clock, or their position in each stream shifted by the cameras' start offsets
   where every camera has sound (capture/rig.py: audio_offsets, phones started by hand);
   cameras of different lengths that none of these pairs are refused.
2. mediapipe's 478 landmarks in every frame of every camera, undistorted with the
   camera's lens.
3. Per timestep, the landmarks triangulated from every camera that sees the face (DLT,
   capture/bundle.py: triangulate). A view whose rigid landmarks disagree with the others
   (more than max(OUTLIER_PX, 3 x the best view's median)) drops out, and so does a view
   that sees the face more than PROFILE_DEG from frontal (mediapipe's landmarks slide on a
   profile). Timesteps seen by fewer than two views drop out.
4. The head's pose per timestep: the canonical face (capture/pose.py: canonical_face, the
   same metric head frame as monocular capture: eye corners 9 cm apart, origin 9 cm behind
   the eyes) fitted by similarity to the triangulated rigid landmarks, with one scale for
   the clip (the calibration's units per metre of the face). Every frame's camera is then
   posed in the head frame, as in a monocular capture.
5. Per camera: one square crop around the face for the whole clip, undistorted, cropped
   and resized in one remap; person segmentation; the masks from the triangulated
   landmarks projected into the crop (so a view where tracking failed still has them);
   a background plate.
6. Audio from --audio (starting at the rig's first timestep) or the first camera whose
   sound track holds speech (placed at that camera's first timestep); a rig filmed without
   sound makes a dataset without audio features (an avatar fitted to tracked motion only).

Frames stream: a camera's video is decoded twice (tracking, then writing), one frame at a
time, so memory does not grow with the number of cameras or the clip's length. The
dataset is built in `<out>.partial/` and published when complete (capture/publish.py).
"""

from __future__ import annotations

import json
import logging
import math
import resource
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from avatar.dataset_format import DATASET_FORMAT, MASK_NAMES, SAMPLE_RATE, mouth_opening, save_features, view_fields
from avatar.errors import AvatarError
from avatar.geometry import umeyama
from avatar.io import write_json

from . import audio as audio_mod
from .bundle import triangulate
from .calibration import Calibration, find_given, import_given, load_calibration
from .face_calibration import LANDMARKS, face_features, solve_face_rig, track_rig
from .masks import background_plate, eye_openness, frame_masks
from .pipeline import _write_jpg, _write_png, face_window, stale_fields
from .pose import c2w_opengl, canonical_face
from .preview import annotate, contact_sheet
from .publish import publish_dataset, recover_dataset, work_folder
from .rig import RigCamera, audio_offsets, frame_rate, has_sound, open_rig, sync_indices
from .tracking import PersonSegmenter, face_height

log = logging.getLogger("avatar.capture")

OUTLIER_PX = 4.0
"""A view whose rigid landmarks sit further than max(this, 3 x the best view's median)
from the triangulated points drops out of that timestep."""
PROFILE_DEG = 70.0
"""A view that sees the face turned further than this from frontal drops out."""
LENGTH_SLACK = 2
"""Frames by which cameras paired by position may differ in length (encoders drop one)."""


@dataclass
class RigCaptureConfig:
    """How a rig's videos become a dataset folder."""

    rig: Path
    """Rig folder (one video or image folder per camera), or a composite video with `tiles`."""
    out: Path
    """Dataset folder to write."""
    calib: Path | None = None
    """CALIB.json (`avatar calibrate`); default: a calibration file in the rig folder, else the face."""
    tiles: list[tuple[int, int, int, int]] = field(default_factory=list)
    """(x, y, w, h) of each camera in a composite video."""
    audio: Path | None = None
    """Speech to use instead of the first camera's sound track."""
    fps: float = 25.0
    """Frame rate of cameras given as image folders (videos keep their own)."""
    size: int = 512
    """Side of the square output frames in pixels."""
    crop_scale: float = 2.6
    """Crop side as a multiple of the face's brow-to-chin height (clipped to the image)."""
    background_samples: int = 32
    """Frames per camera sampled for its background plate."""
    jpeg_quality: int = 95
    force: bool = False
    """Capture again even when `out` already holds this rig's dataset."""

    def check(self) -> "RigCaptureConfig":
        """Raise ValueError naming the first setting out of range."""
        for name, (lo, hi) in {"fps": (1.0, 120.0), "size": (32, 4096), "crop_scale": (1.0, 10.0),
                               "background_samples": (1, 10_000), "jpeg_quality": (1, 100)}.items():
            if not lo <= getattr(self, name) <= hi:
                raise ValueError(f"{name} must be between {lo:g} and {hi:g}, got {getattr(self, name)!r}")
        return self


def _inputs(cfg: RigCaptureConfig, cameras: list[RigCamera]) -> dict:
    """What the dataset depends on (reused only when this matches exactly)."""
    def ident(p: Path) -> list:
        st = Path(p).stat()
        return [str(Path(p).resolve()), st.st_size, st.st_mtime_ns]

    d = {k: v for k, v in asdict(cfg).items() if k not in ("force", "out")}
    d["rig"] = [[c.name, ident(c.path), list(c.tile) if c.tile else None] for c in cameras]
    d["calib"] = ident(cfg.calib) if cfg.calib else None
    d["audio"] = ident(cfg.audio) if cfg.audio else None
    return json.loads(json.dumps({"format": DATASET_FORMAT, **d}, default=str))


def _paired(root: Path, cameras: list[RigCamera], fps: float) -> tuple[list[np.ndarray], dict]:
    """(sync indices per camera, how they were found): caliscope's frame table, the tiles'
    shared clock, the cameras' sound (their start offsets rounded to frames), or the
    frames' positions; cameras of different lengths that nothing pairs are refused."""
    if (Path(root) / "timestamps.csv").is_file() or cameras[0].tile:
        return sync_indices(root, cameras), {"method": "timestamps.csv" if not cameras[0].tile else "one composite"}
    rates = [frame_rate(c, fps) for c in cameras]
    if max(rates) > min(rates) * 1.001:
        listing = ", ".join(f"{c.name}: {r:g}" for c, r in zip(cameras, rates))
        raise AvatarError(root, f"its cameras film at different frame rates ({listing} fps)",
                          "record every camera at one frame rate, or convert the videos to one")
    found = audio_offsets(cameras)
    if found is not None:
        offsets, peaks = found
        shift = [round((d - min(offsets)) * fps) for d in offsets]
        return [np.arange(c.frames) + s for c, s in zip(cameras, shift)], {
            "method": "sound", "offsets_s": {c.name: round(d, 4) for c, d in zip(cameras, offsets)},
            "offsets_frames": {c.name: s for c, s in zip(cameras, shift)},
            "residual_ms": {c.name: round(1000 * ((d - min(offsets)) - s / fps), 1)
                            for c, d, s in zip(cameras, offsets, shift)},
            "correlation": {c.name: round(p, 3) for c, p in zip(cameras, peaks)}}
    lengths = [c.frames for c in cameras]
    if max(lengths) - min(lengths) > LENGTH_SLACK:
        listing = ", ".join(f"{c.name}: {c.frames}" for c in cameras)
        raise AvatarError(root, f"its cameras have different lengths ({listing} frames), and neither sound nor a "
                          "timestamps.csv pairs their frames", "trim the videos to start and end together, record "
                          "sound on every camera, or add caliscope's timestamps.csv")
    return sync_indices(root, cameras), {"method": "frame position"}


def _calibration(cfg: RigCaptureConfig, cameras: list[RigCamera], sync: list[np.ndarray],
                 seen: list[dict[int, np.ndarray]], progress: bool) -> Calibration:
    if cfg.calib is not None:
        calib = load_calibration(cfg.calib)
    elif (given := find_given(Path(cfg.rig)) if Path(cfg.rig).is_dir() else None) is not None:
        calib = import_given(given, cameras)
    else:
        log.info("no --calib and no calibration file in the rig: calibrating from the face")
        return solve_face_rig(Path(cfg.rig), cameras, seen,
                              features=face_features(cameras, sync, seen, progress))
    where = cfg.calib or Path(cfg.rig)
    for cam in cameras:
        try:
            c = calib.camera(cam.name)
        except KeyError:
            raise AvatarError(where, f"has no camera named {cam.name!r} (it has {', '.join(c.name for c in calib.cameras)})",
                              "calibrate this rig with `avatar calibrate`, or name the videos as the calibration does"
                              ) from None
        if (c.width, c.height) != (cam.width, cam.height):
            raise AvatarError(where, f"calibrates camera {cam.name} at {c.width}x{c.height}, but its frames are "
                              f"{cam.width}x{cam.height}", "calibrate the rig at the resolution it films")
    return calib


def _undistorted(seen: list[dict[int, np.ndarray]], calib: Calibration, cameras: list[RigCamera]) -> list[dict]:
    out = []
    for cam, views in zip(cameras, seen):
        c = calib.camera(cam.name)
        if not np.any(c.dist) or not views:
            out.append(views)
            continue
        keys = sorted(views)
        lm = np.stack([views[k] for k in keys]).astype(np.float64)
        uv = cv2.undistortPoints(lm[..., :2].reshape(-1, 1, 2), c.K, c.dist, P=c.K).reshape(lm.shape[0], -1, 2)
        out.append({k: np.concatenate([uv[n], lm[n, :, 2:]], axis=-1).astype(np.float32) for n, k in enumerate(keys)})
    return out


@dataclass
class Triangulation:
    """The face per timestep, triangulated (step 3 of the module doc)."""

    timesteps: list[int]  # sync indices with a triangulated face
    points: np.ndarray  # [T, 478, 3] world (the calibration's frame and units)
    views: list[list[int]]  # per timestep, the cameras it was triangulated from
    errors: dict[int, list[float]]  # camera -> per used view, median landmark reprojection (px)
    rigid_errors: dict[int, list[float]]  # camera -> the same on the rigid landmarks
    dropped_views: dict[str, int]  # why views were dropped -> count


def triangulate_face(seen: list[dict[int, np.ndarray]], projections: np.ndarray, centres: np.ndarray,
                     progress: bool = False) -> Triangulation:
    """Step 3 of the module doc. seen: per camera {sync index: [478, >=2] undistorted
    landmarks}; projections: [C, 3, 4] K [R | t]; centres: [C, 3] camera positions."""
    rigid = list(LANDMARKS)
    keys = sorted({k for views in seen for k in views})
    out = Triangulation([], np.zeros((0, 478, 3)), [], {c: [] for c in range(len(seen))},
                        {c: [] for c in range(len(seen))}, {"disagreeing": 0, "profile": 0, "lone view": 0})
    points = []
    for k in tqdm(keys, desc="triangulate", unit="timestep", disable=not progress, leave=False):
        cams = [c for c in range(len(seen)) if k in seen[c]]
        uv = {c: seen[c][k][:, :2].astype(np.float64) for c in cams}
        while len(cams) >= 2:
            X, err = triangulate(projections[cams], np.stack([uv[c][rigid] for c in cams]))
            med = np.median(err, axis=1)
            worst = int(np.argmax(med))
            if med[worst] <= max(OUTLIER_PX, 3 * med.min()) or len(cams) == 2 and med[worst] <= 2 * OUTLIER_PX:
                break
            out.dropped_views["disagreeing"] += 1
            cams = cams[:worst] + cams[worst + 1:] if len(cams) > 2 else []
        if len(cams) >= 2:  # the face's facing direction, from the triangulated rigid points
            face = canonical_frame(X)
            facing = [c for c in cams if _turn_deg(face, centres[c]) <= PROFILE_DEG]
            out.dropped_views["profile"] += len(cams) - len(facing)
            cams = facing
        if len(cams) < 2:
            out.dropped_views["lone view"] += len(cams)
            continue
        X, err = triangulate(projections[cams], np.stack([uv[c] for c in cams]))
        for n, c in enumerate(cams):
            out.errors[c].append(float(np.median(err[n])))
            out.rigid_errors[c].append(float(np.median(err[n, rigid])))
        out.timesteps.append(k)
        out.views.append(cams)
        points.append(X)
    if points:
        out.points = np.stack(points)
    return out


def canonical_frame(rigid_points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(centre [3], out-of-face direction [3]) of triangulated rigid landmarks (LANDMARKS order)."""
    rigid = list(LANDMARKS)
    eyes = [rigid.index(i) for i in (33, 263)]
    brow, nose = rigid.index(10), rigid.index(4)
    x = rigid_points[eyes[1]] - rigid_points[eyes[0]]
    up = rigid_points[brow] - rigid_points[nose]
    z = np.cross(x, up)
    centre = rigid_points[eyes].mean(0)
    return centre, z / (np.linalg.norm(z) + 1e-12)


def _turn_deg(face: tuple[np.ndarray, np.ndarray], camera_centre: np.ndarray) -> float:
    centre, out_of_face = face
    to_camera = camera_centre - centre
    cos = float(out_of_face @ to_camera / (np.linalg.norm(to_camera) + 1e-12))
    return math.degrees(math.acos(np.clip(cos, -1, 1)))


def head_poses(points: np.ndarray) -> tuple[np.ndarray, float, np.ndarray, np.ndarray]:
    """Step 4: (canonical [478, 3] metres, scale (world units per metre), R [T, 3, 3],
    t [T, 3]) with points[t] ~ scale R[t] canonical + t[t] on the rigid landmarks inside the
    face (LANDMARKS). points: [T, 478, 3] world."""
    canonical = canonical_face(points)
    rigid = list(LANDMARKS)  # the outline's points are each view's silhouette, not one surface point
    fits = [umeyama(canonical[rigid], p[rigid]) for p in points]
    scale = float(np.median([s for s, _, _ in fits]))
    R = np.stack([r for _, r, _ in fits])
    t = np.stack([p[rigid].mean(0) - scale * r @ canonical[rigid].mean(0) for p, r in zip(points, R)])
    return canonical, scale, R, t


@dataclass
class CameraView:
    """Where one camera's crop comes from: the undistort-crop-resize maps and its intrinsics."""

    K: np.ndarray  # [3, 3] of the output crop
    window: tuple[int, int, int]  # (x0, y0, side) in the undistorted image
    maps: tuple[np.ndarray, np.ndarray]


def crop_view(K: np.ndarray, dist: np.ndarray, width: int, height: int, face_px: np.ndarray, heights: np.ndarray,
              size: int, crop_scale: float) -> CameraView:
    """One square window around the face for the whole clip (pipeline.face_window; face_px:
    [T, 2] face centres, heights: [T] brow-to-chin pixels, undistorted) and the maps that
    undistort, crop and resize to `size` in one remap."""
    x0, y0, side = face_window(face_px, heights, width, height, crop_scale)
    s = size / side
    Kc = K.astype(np.float64).copy()  # pixel centres at integers (OpenCV): u' = (u - x0 + 0.5) s - 0.5
    Kc[0, 0], Kc[1, 1] = K[0, 0] * s, K[1, 1] * s
    Kc[0, 1] = K[0, 1] * s
    Kc[0, 2], Kc[1, 2] = (K[0, 2] - x0 + 0.5) * s - 0.5, (K[1, 2] - y0 + 0.5) * s - 0.5
    maps = cv2.initUndistortRectifyMap(K, dist, None, Kc, (size, size), cv2.CV_32FC1)
    return CameraView(Kc, (x0, y0, side), maps)


def _project(X: np.ndarray, world_to_camera: np.ndarray, K: np.ndarray) -> np.ndarray:
    """[..., 478, 3] world -> [..., 478, 3] pixels and mediapipe-style depth (pixel scale,
    relative to the face's median depth)."""
    Xc = X @ world_to_camera[:3, :3].T + world_to_camera[:3, 3]
    z = Xc[..., 2:]
    uv = (Xc[..., :2] / z) @ K[:2, :2].T + K[:2, 2]
    z0 = np.median(z, axis=-2, keepdims=True)
    return np.concatenate([uv, (z - z0) * K[0, 0] / z0], axis=-1)


def run_rig_capture(cfg: RigCaptureConfig, progress: bool = True) -> Path:
    """Every step of the module doc; returns the dataset folder. Raises AvatarError on bad input."""
    out = Path(cfg.out)
    work = work_folder(out)
    recover_dataset(out)
    cameras = open_rig(cfg.rig, tiles=cfg.tiles or None)
    inputs = _inputs(cfg, cameras)
    if (out / "transforms.json").is_file() and not cfg.force:
        changed = stale_fields(out, inputs)
        if changed is None:
            log.info("%s is already a complete dataset of this rig and these settings; --force redoes it", out)
            return out
        log.info("%s was captured from other inputs or settings (%s); capturing again", out, ", ".join(changed))
    shutil.rmtree(work, ignore_errors=True)
    try:
        _capture(cfg, cameras, inputs, work, progress)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)  # a rig capture is minutes: it restarts, never resumes
        raise
    return publish_dataset(out)


def _capture(cfg: RigCaptureConfig, cameras: list[RigCamera], inputs: dict, work: Path, progress: bool) -> None:
    t_start = time.perf_counter()
    timings: dict[str, float] = {}

    def timed(name: str, t0: float) -> None:
        timings[name] = round(time.perf_counter() - t0, 2)

    # 1-2. Sync, audio and landmarks.
    t0 = time.perf_counter()
    root = Path(cfg.rig)
    fps = frame_rate(cameras[0], cfg.fps)
    sync, sync_report = _paired(root, cameras, fps)
    n_steps = int(max(s.max() for s in sync)) + 1
    audio_src, pcm, speech = _speech(cfg, cameras, sync, fps)
    seen_raw = track_rig(cameras, sync, progress)
    timed("track", t0)
    t0 = time.perf_counter()
    calib = _calibration(cfg, cameras, sync, seen_raw, progress)
    timed("calibration", t0)

    # 3-4. Triangulated face and head poses.
    t0 = time.perf_counter()
    seen = _undistorted(seen_raw, calib, cameras)
    lenses = [calib.camera(c.name) for c in cameras]
    P = np.stack([c.K @ c.world_to_camera[:3] for c in lenses])
    tri = triangulate_face(seen, P, np.stack([c.centre for c in lenses]), progress)
    if len(tri.timesteps) < 2:
        shared = sum(1 for k in {k for v in seen for k in v} if sum(k in v for v in seen) >= 2)
        raise AvatarError(root, f"the face is seen by two or more cameras at {shared} timestep"
                          f"{'s' if shared != 1 else ''}, and consistently at {len(tri.timesteps)}: no face to triangulate",
                          "film the head where at least two cameras see the face together; check the calibration "
                          "belongs to this rig")
    canonical, scale, R_head, t_head = head_poses(tri.points)
    timed("triangulate", t0)

    # 5. Frames, masks and plates per camera.
    t0 = time.perf_counter()
    step_row = {k: n for n, k in enumerate(tri.timesteps)}
    samples = set(np.linspace(0, len(tri.timesteps) - 1, min(cfg.background_samples, len(tri.timesteps))).round()
                  .astype(int).tolist())
    preview_step = tri.timesteps[len(tri.timesteps) // 2]
    head_lm = np.einsum("tij,tpj->tpi", R_head.transpose(0, 2, 1), tri.points - t_head[:, None]) / scale
    eyes, mouth = eye_openness(head_lm), mouth_opening(head_lm)  # seen from the front, one per timestep
    frames, lm2d, lm3d, tiles, camera_rows, crops = [], [], [], [], [], {}
    with PersonSegmenter() as segmenter, tqdm(total=len(cameras) * len(tri.timesteps), desc="frames + masks",
                                               unit="frame", disable=not progress, leave=False) as bar:
        for ci, (cam, lens, indices) in enumerate(zip(cameras, lenses, sync)):
            px = _project(tri.points, lens.world_to_camera, lens.K)
            view = crop_view(lens.K, lens.dist, cam.width, cam.height, px[:, :, :2].mean(1), face_height(px),
                             cfg.size, cfg.crop_scale)
            crops[cam.name] = {"x0": view.window[0], "y0": view.window[1], "side": view.window[2]}
            px_crop = _project(tri.points, lens.world_to_camera, view.K)
            entry = {"name": cam.name, "fl_x": float(view.K[0, 0]), "fl_y": float(view.K[1, 1]),
                     "cx": float(view.K[0, 2]), "cy": float(view.K[1, 2]), "background": f"backgrounds/{cam.name}.png"}
            camera_rows.append(entry)
            for sub in ["images", *(f"masks/{m}" for m in MASK_NAMES)]:
                (work / sub / cam.name).mkdir(parents=True, exist_ok=True)
            plates, plate_masks = [], []
            for pos, raw in cam.iter_frames(rgb=True):
                if pos >= len(indices) or int(indices[pos]) not in step_row:
                    continue
                k = int(indices[pos])
                n = step_row[k]
                crop = cv2.remap(raw, *view.maps, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
                person = segmenter(crop).astype(np.float32)
                masks = frame_masks(px_crop[n], person)
                name = f"{cam.name}/{k:06d}"
                _write_jpg(work / "images" / f"{name}.jpg", crop, cfg.jpeg_quality)
                for m in MASK_NAMES:
                    _write_png(work / "masks" / m / f"{name}.png", masks[m])
                R = lens.world_to_camera[:3, :3] @ R_head[n]
                t = (lens.world_to_camera[:3, :3] @ t_head[n] + lens.world_to_camera[:3, 3]) / scale
                frames.append({"file_path": f"images/{name}.jpg",
                               **{f"{m}_mask_path": f"masks/{m}/{name}.png" for m in MASK_NAMES},
                               "transform_matrix": c2w_opengl(R[None], t[None])[0].round(8).tolist(),
                               "time": round(k / fps, 6), **view_fields(entry, k),
                               "eye_openness": round(float(eyes[n]), 5), "mouth_opening": round(float(mouth[n]), 5)})
                lm2d.append(px_crop[n].astype(np.float32))
                lm3d.append(head_lm[n].astype(np.float32))
                if n in samples:
                    plates.append(crop)
                    plate_masks.append(masks["person"])
                if k == preview_step:
                    tiles.append(annotate(crop, px_crop[n], masks, view.K, R, t, f"{cam.name} t={k}"))
                bar.update(1)
            plate, _ = background_plate(plates, plate_masks) if plates else (np.zeros((cfg.size,) * 2 + (3,), np.uint8), 1.0)
            (work / "backgrounds").mkdir(exist_ok=True)
            _write_png(work / entry["background"], plate)
    timed("frames", t0)

    # 6. Audio features, then the dataset files.
    t0 = time.perf_counter()
    transforms = {"format": DATASET_FORMAT, "camera_model": "OPENCV",
                  **{k: camera_rows[0][k] for k in ("fl_x", "fl_y", "cx", "cy")},
                  "w": cfg.size, "h": cfg.size, "fps": fps, "num_source_frames": n_steps, "cameras": camera_rows,
                  "face_geometry": "face_geometry.npz", "landmarks": "landmarks.npy", "landmarks_3d": "landmarks_3d.npy",
                  "capture": {"inputs": inputs}, "frames": frames}
    if pcm is not None:
        audio_mod.write_wav(work / "audio.wav", pcm)
        save_features(work / "audio_features.npz", audio_mod.compute_features(pcm, n_steps, fps), fps)
        transforms.update(audio="audio.wav", audio_features="audio_features.npz")
    for name, arr in (("landmarks.npy", lm2d), ("landmarks_3d.npy", lm3d)):
        np.save(work / name, np.stack(arr))
    np.savez(work / "face_geometry.npz", canonical=canonical.astype(np.float32),
             focal=np.float32(camera_rows[0]["fl_x"]))
    if tiles:
        _write_png(work / "preview.png", contact_sheet(tiles))
    timed("write", t0)

    def stats(v: list[float]) -> dict:
        return {"median": float(np.median(v)), "p90": float(np.percentile(v, 90)), "views": len(v)} if v else {}

    used = np.bincount([len(v) for v in tri.views], minlength=len(cameras) + 1)
    report = {
        "format": DATASET_FORMAT,
        "rig": str(root), "fps": fps, "sync": sync_report,
        "calibration": {"method": calib.method, "source": str(cfg.calib or calib.source), "units": calib.units},
        "cameras": {c.name: {"crop_window": crops[c.name], "face_frames": len(seen[ci]),
                             "triangulation_px": stats(tri.errors[ci]),
                             "triangulation_rigid_px": stats(tri.rigid_errors[ci])}
                    for ci, c in enumerate(cameras)},
        "timesteps": {"total": n_steps, "triangulated": len(tri.timesteps),
                      "views_per_timestep": {str(n): int(used[n]) for n in range(2, len(used)) if used[n]},
                      "views_dropped": tri.dropped_views},
        "head": {"scale_units_per_metre": scale,
                 "note": "the canonical face has its outer eye corners 9 cm apart; scale is the calibration's "
                         "length of that face's metre"},
        "audio": ({**speech, "source": str(audio_src)} if pcm is not None
                  else {"source": None, "note": "no sound track: the dataset has no audio features"}),
        "frames": len(frames),
        "peak_memory_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
        "timings_s": {**timings, "total": round(time.perf_counter() - t_start, 2)},
    }
    write_json(work / "capture_report.json", report)
    write_json(work / "transforms.json", transforms)


def _speech(cfg: RigCaptureConfig, cameras: list[RigCamera], sync: list[np.ndarray],
            fps: float) -> tuple[Path | None, np.ndarray | None, dict | None]:
    """(source, 16 kHz pcm starting at timestep 0, speech statistics) of --audio (which must
    hold speech and start with the rig's first timestep), else of the first camera whose
    sound track holds speech (delayed by the timestep its first frame is); (None, None,
    None) without."""
    if cfg.audio is not None:
        pcm = audio_mod.load_audio(Path(cfg.audio))
        return Path(cfg.audio), pcm, audio_mod.check_speech(pcm, Path(cfg.audio))
    for cam, indices in zip(cameras, sync):
        if not has_sound(cam):
            continue
        pcm = audio_mod.load_audio(cam.path)
        try:
            speech = audio_mod.check_speech(pcm, cam.path)
        except AvatarError as exc:  # a studio camera's track often holds only room noise
            log.warning("%s; not used as the rig's speech", exc)
            continue
        lead = np.zeros(int(round(int(indices[0]) / fps * SAMPLE_RATE)), np.float32)
        return cam.path, np.concatenate([lead, pcm]), speech
    return None, None, None
