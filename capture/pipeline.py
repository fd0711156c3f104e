"""`avatar capture`: a talking-head video becomes a dataset folder (format in capture/README.md).

Stages run in `<out>.partial/` and each leaves a marker there, so an interrupted run
resumes where it stopped; the folder is renamed onto `<out>` only when complete, so a
dataset is never half-written and an existing one is replaced only with --force.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from avatar.dataset_format import (DATASET_FORMAT, MASK_NAMES, RIGID, load_features, monocular_camera, mouth_opening,
                                   save_features, view_fields)
from avatar.errors import AvatarError
from avatar.io import atomic_path, write_json

from . import audio as audio_mod
from .config import CaptureConfig
from .masks import background_plate, eye_openness, frame_masks, sharpness
from .photometric import refine_poses
from .pose import c2w_opengl, fit_head_pose, project_points, rotation_jitter_deg
from .preview import annotate, contact_sheet, signal_plot
from .publish import publish_dataset, recover_dataset, work_folder
from .tracking import FaceDetector, FaceTracker, PersonSegmenter
from .video import DecodeStats, VideoInfo, iter_frames, probe_video

log = logging.getLogger("avatar.capture")
DETECT_MAX_SIDE = 640  # source frames are scanned at this size to place the crop


class _Stages:
    """Markers of finished stages in the work folder, keyed by the config fingerprint."""

    def __init__(self, work: Path, fingerprint: str):
        self.work, self.fingerprint = work, fingerprint
        if any(self._read(m) is None for m in work.glob(".stage_*.json")):
            # A run with other inputs or settings left this folder: none of it is reusable.
            for child in work.iterdir():
                shutil.rmtree(child) if child.is_dir() else child.unlink()

    def _read(self, marker: Path) -> dict | None:
        try:
            meta = json.loads(marker.read_text())
        except (OSError, ValueError):
            return None
        return meta if isinstance(meta, dict) and meta.get("fingerprint") == self.fingerprint else None

    def done(self, name: str) -> dict | None:
        p = self.work / f".stage_{name}.json"
        return self._read(p) if p.is_file() else None

    def mark(self, name: str, **meta) -> None:
        write_json(self.work / f".stage_{name}.json", {"fingerprint": self.fingerprint, **meta})


def capture_inputs(cfg: CaptureConfig) -> dict:
    """What a capture depends on: the format, its settings and its input files' identity
    (path, size, modification time); a dataset or a finished stage is reused only when
    this matches exactly."""
    d = asdict(cfg)
    d.pop("force")
    d.pop("out")
    for key in ("video", "audio"):
        if d[key] is not None:
            st = Path(d[key]).stat()
            d[key] = [str(Path(d[key]).resolve()), st.st_size, st.st_mtime_ns]
    d["audio_features"] = [[str(Path(p).resolve()), Path(p).stat().st_size, Path(p).stat().st_mtime_ns]
                           for p in d["audio_features"]]
    return json.loads(json.dumps({"format": DATASET_FORMAT, **d}, default=str))


def _fingerprint(inputs: dict) -> str:
    return hashlib.sha1(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def stale_fields(out: Path, inputs: dict) -> list[str] | None:
    """None when the dataset at `out` was captured from exactly `inputs`; else the names of
    what differs (['unknown'] for a dataset that does not record its inputs)."""
    try:
        saved = json.loads((out / "transforms.json").read_text()).get("capture", {}).get("inputs")
    except (OSError, ValueError, AttributeError):
        saved = None
    if not isinstance(saved, dict):
        return ["unknown"]
    changed = sorted(k for k in set(saved) | set(inputs) if saved.get(k) != inputs.get(k))
    return changed or None


def _write_png(path: Path, img: np.ndarray) -> None:
    if img.dtype == bool:
        img = img.astype(np.uint8) * 255
    elif img.ndim == 3:
        img = cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
    with atomic_path(path) as tmp:  # the temp name keeps the .png suffix cv2 needs
        if not cv2.imwrite(str(tmp), img):
            raise AvatarError(path, "could not be written (disk full or not writable?)")


def _write_jpg(path: Path, rgb: np.ndarray, quality: int) -> None:
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise AvatarError(path, "JPEG encoding failed")
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.tobytes())


def _scan_faces(info: VideoInfo, cfg: CaptureConfig, stats: DecodeStats) -> dict:
    """Pass A: full-range face detection on downscaled source frames -> where the face is,
    how big, and whether another face competes with it."""
    scale = min(1.0, DETECT_MAX_SIDE / max(info.width, info.height))
    n = int(math.floor(info.duration * cfg.fps + 1e-6))
    centers = np.full((n, 2), np.nan, np.float32)
    heights = np.full(n, np.nan, np.float32)
    second = np.zeros(n, np.float32)  # height ratio of the second face, if any
    blur, light = [], []
    with FaceDetector() as detector:
        for k, _, rgb in tqdm(iter_frames(info, cfg.fps, stats), total=n, desc="scan faces", unit="frame",
                              leave=False):
            small = cv2.resize(rgb, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA) if scale < 1 else rgb
            boxes = [b / scale for b in detector(small)]
            if not boxes:
                continue
            box = boxes[0]
            centers[k] = box[:2] + box[2:] / 2
            heights[k] = box[3]
            if len(boxes) > 1:
                second[k] = boxes[1][3] / box[3]
            if k % 5 == 0:
                b, li = sharpness(rgb, box)
                blur.append(b)
                light.append(li)
    return {"centers": centers, "heights": heights, "second": second, "blur": blur, "light": light}


def _preflight_faces(scan: dict, cfg: CaptureConfig, warnings: list[str]) -> None:
    tracked = ~np.isnan(scan["heights"])
    frac = float(tracked.mean()) if tracked.size else 0.0
    h = float(np.nanmedian(scan["heights"])) if tracked.any() else float("nan")
    too_small = AvatarError(cfg.video, f"face too small in frame ({h:.0f} px tall where found, in {frac:.0%} of frames; "
                            f"need {cfg.min_face_px:.0f} px)", "move the camera closer or film at a higher resolution")
    if frac < cfg.min_tracked_fraction:
        if frac >= 0.2 and h < 2 * cfg.min_face_px:  # found often enough to trust, but small
            raise too_small
        raise AvatarError(cfg.video, f"no face found in most frames (face in {frac:.0%} of frames)",
                          "film your face, frontal and well lit, filling a good part of the frame")
    if h < cfg.min_face_px:
        raise too_small
    dominant_second = (scan["second"] > 0.6)[tracked].mean()
    if dominant_second > 0.3:
        raise AvatarError(cfg.video, f"more than one dominant face ({dominant_second:.0%} of frames show a second face)",
                          "film one person alone, or crop the video to one face")
    if scan["blur"] and np.median(scan["blur"]) < 15:
        warnings.append(f"heavy motion blur (face sharpness {np.median(scan['blur']):.0f}); tracking may suffer")
    if scan["light"] and np.median(scan["light"]) < 50:
        warnings.append(f"low light (face brightness {np.median(scan['light']):.0f}/255); expect noise")


def face_window(centres: np.ndarray, heights: np.ndarray, width: int, height: int,
                crop_scale: float) -> tuple[int, int, int]:
    """One square window for a whole clip (x0, y0, side) in a width x height image, from
    robust statistics of the face's track (centres [T, 2], heights [T] pixels), so the
    virtual camera stays still: crop_scale face heights plus the track's spread, a little
    below the face for the neck and shoulders, inside the image."""
    h = float(np.median(heights))
    spread = np.percentile(centres, 95, axis=0) - np.percentile(centres, 5, axis=0)
    center = np.median(centres, axis=0) + np.array([0.0, 0.2 * h])
    side = int(round(min(crop_scale * h + spread.max(), width, height)))
    x0 = int(round(np.clip(center[0] - side / 2, 0, width - side)))
    y0 = int(round(np.clip(center[1] - side / 2, 0, height - side)))
    return x0, y0, side


def _crop_window(scan: dict, info: VideoInfo, cfg: CaptureConfig) -> tuple[int, int, int]:
    """The clip's window (face_window) from the face detector's scan."""
    found = ~np.isnan(scan["heights"])
    return face_window(scan["centers"][found], scan["heights"][found], info.width, info.height, cfg.crop_scale)


def _extract(info: VideoInfo, cfg: CaptureConfig, window: tuple[int, int, int], work: Path) -> dict:
    """Pass B: crop + resize, write images/ and person masks, track the face at output size."""
    x0, y0, side = window
    S = cfg.size
    n = int(math.floor(info.duration * cfg.fps + 1e-6))
    (work / "images").mkdir(exist_ok=True)
    (work / "masks" / "person").mkdir(parents=True, exist_ok=True)
    lms = np.zeros((n, 478, 3), np.float32)
    ok = np.zeros(n, bool)
    dropped: dict[int, str] = {}
    sample_every = max(1, n // cfg.background_samples)
    bg_frames, bg_masks = [], []
    interp = cv2.INTER_AREA if side > S else cv2.INTER_CUBIC
    with FaceTracker(max_faces=1) as tracker, PersonSegmenter() as segmenter:
        for k, _, rgb in tqdm(iter_frames(info, cfg.fps), total=n, desc="crop + track", unit="frame", leave=False):
            crop = cv2.resize(rgb[y0 : y0 + side, x0 : x0 + side], (S, S), interpolation=interp)
            faces = tracker(crop)
            if not faces:
                dropped[k] = "no face found by the face mesh"
                continue
            lms[k], ok[k] = faces[0], True
            person = segmenter(crop) > 0.5
            _write_jpg(work / "images" / f"{k:06d}.jpg", crop, cfg.jpeg_quality)
            _write_png(work / "masks" / "person" / f"{k:06d}.png", person)
            if k % sample_every == 0:
                bg_frames.append(crop)
                bg_masks.append(person)
    plate, fill = background_plate(bg_frames, bg_masks) if bg_frames else (np.zeros((S, S, 3), np.uint8), 1.0)
    _write_png(work / "background.png", plate)
    return {"landmarks": lms, "ok": ok, "dropped": dropped, "background_fill": fill}


def _av_sync(mouth: np.ndarray, energy: np.ndarray, kept: np.ndarray, fps: float, max_lag: int = 8) -> dict:
    """Correlation of mouth opening with an audio energy signal, at zero lag and at the best
    lag within +-max_lag frames: a rough audio/video offset estimate (positive: the audio
    is late)."""
    def corr(lag: int) -> float:
        e = energy[np.clip(kept + lag, 0, len(energy) - 1)]
        return float(np.corrcoef(mouth, e)[0, 1]) if len(kept) > 2 and e.std() > 0 and mouth.std() > 0 else 0.0

    lags = range(-max_lag, max_lag + 1)
    best = max(lags, key=corr)
    return {"correlation": corr(0), "offset_ms": 1000.0 * best / fps, "correlation_at_offset": corr(best)}


def run_capture(cfg: CaptureConfig) -> Path:
    """Run every stage; returns the dataset folder. Raises AvatarError on bad input.

    On bad input the work folder is removed (nothing to resume); after a crash or a kill
    it stays, and the next run resumes from the finished stages.
    """
    work = work_folder(Path(cfg.out))
    existed = work.exists()
    try:
        return _run(cfg)
    except AvatarError:
        if not existed or cfg.force:
            shutil.rmtree(work, ignore_errors=True)
        raise


def _run(cfg: CaptureConfig) -> Path:
    out = Path(cfg.out)
    for path in cfg.audio_features:
        if not Path(path).is_file():
            raise AvatarError(path, "not found (given with --audio-features)", "give the path of aud_ds.npy or aud_hu.npy")
    recover_dataset(out)
    readable = all(Path(p).is_file() for p in [cfg.video, *([cfg.audio] if cfg.audio else []), *cfg.audio_features])
    if (out / "transforms.json").is_file() and not cfg.force and readable:  # (else probing names the missing file)
        changed = stale_fields(out, capture_inputs(cfg))
        if changed is None:
            log.info("%s is already a complete dataset of this video and these settings; --force redoes it", out)
            return out
        log.info("%s was captured from other inputs or settings (%s); capturing again", out, ", ".join(changed))
    work = work_folder(out)
    if cfg.force and work.exists():
        shutil.rmtree(work)
    timings: dict[str, float] = {}
    warnings: list[str] = []
    t_start = time.perf_counter()

    def timed(name: str, t0: float) -> None:
        timings[name] = round(time.perf_counter() - t0, 2)

    # 1. Probe and preflight (before anything is written).
    t0 = time.perf_counter()
    info = probe_video(cfg.video)
    if math.isfinite(info.duration) and info.duration < cfg.min_duration:
        raise AvatarError(cfg.video, f"too short ({info.duration:.1f} s, need at least {cfg.min_duration:.0f} s)",
                          "record a longer clip; a few minutes of speech gives the best avatar")
    if not math.isfinite(info.duration):
        raise AvatarError(cfg.video, "duration unknown (stream without timing)", "re-encode the video to mp4")
    if info.audio_rate is None and cfg.audio is None:
        raise AvatarError(cfg.video, "has no audio stream",
                          "record with sound, or give the speech separately with --audio FILE")
    audio_src = Path(cfg.audio) if cfg.audio is not None else Path(cfg.video)
    pcm = audio_mod.load_audio(audio_src)
    speech = audio_mod.check_speech(pcm, audio_src)
    timed("probe", t0)

    work.mkdir(parents=True, exist_ok=True)
    inputs = capture_inputs(cfg)
    stages = _Stages(work, _fingerprint(inputs))
    n = int(math.floor(info.duration * cfg.fps + 1e-6))

    # 2. Where is the face: crop window, preflight errors and warnings.
    t0 = time.perf_counter()
    stats = DecodeStats()
    meta = stages.done("scan")
    if meta is None:
        scan = _scan_faces(info, cfg, stats)
        _preflight_faces(scan, cfg, warnings)
        window = _crop_window(scan, info, cfg)
        meta = {"window": list(window), "warnings": warnings, "decode": stats.to_dict(),
                "face_height_px": float(np.nanmedian(scan["heights"]))}
        stages.mark("scan", **meta)
    window, warnings, decode = tuple(meta["window"]), list(meta["warnings"]), meta["decode"]
    if decode.get("interval_cv", 0) > 0.05:
        warnings.append(f"variable frame rate (interval variation {decode['interval_cv']:.0%}); frames are resampled "
                        f"to {cfg.fps:g} fps by nearest timestamp")
    if window[2] < cfg.size / 2:
        warnings.append(f"the face crop is {window[2]} px and is upscaled to {cfg.size}; film closer for sharper results")
    timed("scan", t0)

    # 3. Frames, person masks, landmarks, background plate.
    t0 = time.perf_counter()
    if stages.done("extract") is None:
        ext = _extract(info, cfg, window, work)
        np.savez(work / "extract.npz", landmarks=ext["landmarks"], ok=ext["ok"])
        stages.mark("extract", dropped={str(k): v for k, v in ext["dropped"].items()},
                    background_fill=ext["background_fill"])
    with np.load(work / "extract.npz") as z:
        landmarks, ok = z["landmarks"], z["ok"]
    ext_meta = stages.done("extract")
    dropped = {int(k): v for k, v in ext_meta["dropped"].items()}
    timed("extract", t0)

    # 4. Audio: 16 kHz mono wav and per-frame features.
    t0 = time.perf_counter()
    if stages.done("audio") is None:
        extra = dict(audio_mod.load_ernerf_features(p, n) for p in cfg.audio_features)
        audio_mod.write_wav(work / "audio.wav", pcm)
        feats = audio_mod.compute_features(pcm, n, cfg.fps, extra)
        save_features(work / "audio_features.npz", feats, cfg.fps)
        stages.mark("audio", **speech)
    feats = load_features(work / "audio_features.npz")
    timed("audio", t0)

    # 5. Head pose and focal; frames the fit cannot explain are dropped as tracking outliers.
    t0 = time.perf_counter()
    kept = np.flatnonzero(ok)
    if len(kept) < max(cfg.min_tracked_fraction * n, 10):
        raise AvatarError(cfg.video, f"face tracked in only {len(kept)} of {n} frames after cropping",
                          "film your face frontal and well lit")
    focal_prior = (cfg.focal_prior_fov_deg, cfg.focal_prior_log_sd) if cfg.focal_prior_log_sd > 0 else None
    fit = fit_head_pose(landmarks[kept], cfg.size, cfg.size, cfg.focal_sweep_fov_deg, cfg.focal_sweep_steps,
                        cfg.smoothness, frame_ids=kept, focal_prior=focal_prior)
    bad = fit.reproj_px > max(8.0, 4 * float(np.median(fit.reproj_px)))
    if bad.any():
        for k in kept[bad]:
            dropped[int(k)] = f"tracking outlier (rigid landmarks {fit.reproj_px[np.searchsorted(kept, k)]:.1f} px off the fitted head)"
            (work / "images" / f"{k:06d}.jpg").unlink(missing_ok=True)
            (work / "masks" / "person" / f"{k:06d}.png").unlink(missing_ok=True)
        kept = kept[~bad]
        fit = fit_head_pose(landmarks[kept], cfg.size, cfg.size, cfg.focal_sweep_fov_deg, cfg.focal_sweep_steps,
                            cfg.smoothness, frame_ids=kept, focal_prior=focal_prior)
    timed("pose", t0)
    t0 = time.perf_counter()
    R_pose, t_pose, photometric, rigid_err = fit.R, fit.t, None, fit.reproj_px
    if cfg.photometric:
        photo = refine_poses([work / "images" / f"{k:06d}.jpg" for k in kept], fit.canonical, fit.R, fit.t, fit.focal,
                             cfg.size, cfg.size, landmarks[kept])
        R_pose, t_pose = photo.R, photo.t
        photometric = {"residual_before": photo.residual_before, "residual_after": photo.residual_after,
                       "rotation_change_deg": photo.rotation_change_deg}
        # The landmarks' disagreement with the refined poses (their bias shows here).
        rigid_err = np.median(np.linalg.norm(project_points(fit.canonical[list(RIGID)], R_pose, t_pose, fit.focal,
                                                              cfg.size / 2, cfg.size / 2)
                                             - landmarks[kept][:, list(RIGID), :2], axis=-1), axis=1)
        timed("photometric", t0)

    # 6. Masks and control signals.
    t0 = time.perf_counter()
    lm = landmarks[kept]
    for name in MASK_NAMES[1:]:
        (work / "masks" / name).mkdir(parents=True, exist_ok=True)
    preview_at = set(kept[np.linspace(0, len(kept) - 1, 6).round().astype(int)].tolist())
    tiles = []
    K = np.array([[fit.focal, 0, cfg.size / 2], [0, fit.focal, cfg.size / 2], [0, 0, 1]])
    for j, k in enumerate(tqdm(kept, desc="masks", unit="frame", leave=False)):
        person = cv2.imread(str(work / "masks" / "person" / f"{k:06d}.png"), cv2.IMREAD_GRAYSCALE) > 127
        masks = frame_masks(lm[j], person.astype(np.float32))
        for name in MASK_NAMES[1:]:
            _write_png(work / "masks" / name / f"{k:06d}.png", masks[name])
        if k in preview_at:
            rgb = cv2.cvtColor(cv2.imread(str(work / "images" / f"{k:06d}.jpg")), cv2.COLOR_BGR2RGB)
            tiles.append(annotate(rgb, lm[j], masks, K, R_pose[j], t_pose[j], f"frame {k}"))
    eyes = eye_openness(lm)
    mouth = mouth_opening(lm)
    energy = feats["energy"][kept]
    # The jaw follows the syllable envelope: loudness over the 160 ms mel window of each
    # frame (mean log-mel), besides the 40 ms frame energy.
    av_sync = _av_sync(mouth, feats["mel"].mean(axis=(1, 2)), kept, cfg.fps)
    av_sync_energy = _av_sync(mouth, feats["energy"], kept, cfg.fps)
    if (abs(av_sync["offset_ms"]) >= 120 and av_sync["correlation_at_offset"] > 0.3
            and av_sync["correlation_at_offset"] - av_sync["correlation"] > 0.15):
        late = "late" if av_sync["offset_ms"] > 0 else "early"
        warnings.append(f"the audio may be {abs(av_sync['offset_ms']):.0f} ms {late} relative to the video "
                        "(mouth opening matches the audio energy best at that shift)")
    timed("masks", t0)

    # 7. The dataset files.
    t0 = time.perf_counter()
    c2w = c2w_opengl(R_pose, t_pose)
    camera = monocular_camera(fit.focal, fit.focal, cfg.size / 2, cfg.size / 2, "background.png")
    frames = []
    for j, k in enumerate(kept):
        name = f"{k:06d}"
        frames.append({
            "file_path": f"images/{name}.jpg",
            **{f"{m}_mask_path": f"masks/{m}/{name}.png" for m in MASK_NAMES},
            "transform_matrix": c2w[j].round(8).tolist(),
            "time": round(k / cfg.fps, 6),
            **view_fields(camera["cameras"][0], int(k)),
            "eye_openness": round(float(eyes[j]), 5),
            "mouth_opening": round(float(mouth[j]), 5),
        })
    transforms = {
        "format": DATASET_FORMAT,
        "camera_model": "OPENCV",
        **camera, "w": cfg.size, "h": cfg.size, "k1": 0.0, "k2": 0.0, "p1": 0.0, "p2": 0.0,
        "fps": cfg.fps, "num_source_frames": n, "audio": "audio.wav", "audio_features": "audio_features.npz",
        "face_geometry": "face_geometry.npz", "landmarks": "landmarks.npy",
        "capture": {"fingerprint": _fingerprint(inputs), "inputs": inputs},
        "frames": frames,
    }
    write_json(work / "transforms.json", transforms)
    with atomic_path(work / "landmarks.npy") as tmp, open(tmp, "wb") as f:
        np.save(f, lm.astype(np.float32))
    with atomic_path(work / "face_geometry.npz") as tmp, open(tmp, "wb") as f:
        np.savez(f, canonical=fit.canonical.astype(np.float32), focal=np.float32(fit.focal))
    tiles.append(cv2.cvtColor(cv2.imread(str(work / "background.png")), cv2.COLOR_BGR2RGB))
    tiles.append(signal_plot(cfg.size, cfg.size, {"mouth opening": mouth, "audio energy": energy, "eye openness": eyes}))
    _write_png(work / "preview.png", contact_sheet(tiles))
    timed("write", t0)

    fov = math.degrees(2 * math.atan(cfg.size / 2 / fit.focal))
    report = {
        "format": DATASET_FORMAT,
        "source": info.to_dict(),
        "decode": decode,
        "crop_window": {"x0": window[0], "y0": window[1], "side": window[2]},
        "warnings": warnings,
        "frames": {"total": n, "kept": int(len(kept)),
                   "dropped": [{"frame": k, "time": round(k / cfg.fps, 3), "reason": r} for k, r in sorted(dropped.items())]},
        "pose": {
            "focal_px": fit.focal, "fov_deg": fov,
            "reprojection_px": {"median": float(np.median(rigid_err)), "p90": float(np.percentile(rigid_err, 90)),
                                "max": float(rigid_err.max())},
            "reprojection_px_landmark_fit": {"median": float(np.median(fit.reproj_px)),
                                             "p90": float(np.percentile(fit.reproj_px, 90))},
            "jitter_deg": {"fitted": rotation_jitter_deg(R_pose), "landmark_fit": fit.jitter_deg,
                           "per_frame_pnp": fit.jitter_raw_deg},
            "photometric": photometric,
            "focal_estimate": {"sweep_minimum_px": fit.focal_sweep, "sweep_log_sd": fit.focal_log_sd,
                               "prior_fov_deg": cfg.focal_prior_fov_deg if focal_prior else None,
                               "prior_log_sd": cfg.focal_prior_log_sd if focal_prior else None},
            "focal_sweep": [{"focal_px": f, "median_error_px": e} for f, e in fit.sweep],
        },
        "audio": {**speech, "source": str(audio_src), "features": {k: list(v.shape) for k, v in feats.items()}},
        "signals": {"mouth_loudness": av_sync, "mouth_energy": av_sync_energy,
                    "eye_openness": {"min": float(eyes.min()), "mean": float(eyes.mean())},
                    "mouth_opening": {"min": float(mouth.min()), "max": float(mouth.max())}},
        "background_fill_fraction": ext_meta["background_fill"],
        "timings_s": {**timings, "total": round(time.perf_counter() - t_start, 2)},
    }
    write_json(work / "capture_report.json", report)
    for w in warnings:
        log.warning("%s: %s", cfg.video, w)

    (work / "extract.npz").unlink(missing_ok=True)
    for marker in work.glob(".stage_*.json"):
        marker.unlink()
    return publish_dataset(out)
