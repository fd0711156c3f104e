"""`avatar capture --from-ernerf DIR`: import an ER-NeRF / TalkingGaussian preprocessed folder.

Read: transforms_{train,val}.json (focal_len, cx, cy, frames[img_id, aud_id,
transform_matrix]), ori_imgs/<id>.jpg (+ <id>.lms, 68 landmarks), parsing/<id>.png
(BiSeNet colours: head red, neck green, torso blue, background white), bc.jpg, aud.wav,
aud_ds.npy / aud_hu.npy, au.csv (OpenFace AU45_r blink, AU25_r lips part).

ER-NeRF stores camera-to-world matrices in the NeRF/OpenGL convention, in its own head
frame and units. When every frame has its 68 landmarks, the import triangulates them
with those cameras and moves the poses into this project's head frame (metres, x to the
subject's left, y up, z out of the face, outer eye corners 9 cm apart, eyes 9 cm in front
of the origin); the triangulated face becomes face_geometry.npz, which Gaussian
initialisation needs. Without landmarks the poses are kept as they are.
"""

from __future__ import annotations

import csv
import json
import logging
import shutil
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from avatar.dataset_format import (DATASET_FORMAT, EYES68, INNER_MOUTH68, MASK_NAMES, monocular_camera, polygon_mask,
                                   save_features, view_fields)
from avatar.errors import AvatarError
from avatar.io import write_json

from . import audio as audio_mod
from .bundle import triangulate
from .pipeline import _write_jpg, _write_png
from .publish import publish_dataset, recover_dataset, work_folder

log = logging.getLogger("avatar.capture")


def _read_frames(src: Path) -> tuple[dict, list[dict]]:
    frames, meta = [], None
    for split in ("train", "val"):
        p = src / f"transforms_{split}.json"
        if not p.is_file():
            continue
        try:
            d = json.loads(p.read_text())
        except json.JSONDecodeError as exc:
            raise AvatarError(p, f"is not valid JSON ({exc})") from exc
        for key in ("focal_len", "cx", "cy", "frames"):
            if key not in d:
                raise AvatarError(p, f"has no '{key}' field; not an ER-NeRF transforms file")
        meta = meta or d
        frames += d["frames"]
    if meta is None:
        raise AvatarError(src, "has no transforms_train.json / transforms_val.json",
                          "point --from-ernerf at an ER-NeRF or TalkingGaussian data/<name> folder")
    frames.sort(key=lambda f: int(f["img_id"]))
    return meta, frames


_EYE_OUTER68, _CHIN68, _NOSE_BRIDGE68 = (36, 45), 8, 27
EYE_DISTANCE_M = 0.09


def triangulate_posed(lms: np.ndarray, c2w_gl: np.ndarray, focal: float, cx: float,
                      cy: float) -> tuple[np.ndarray, np.ndarray]:
    """Landmarks tracked over posed frames, triangulated (capture/bundle.py: triangulate).

    lms: [F, L, 2] pixels; c2w_gl: [F, 4, 4] camera-to-world, OpenGL axes.
    Returns points [L, 3] and the reprojection error [F, L] in pixels.
    """
    K = np.array([[focal, 0, cx], [0, focal, cy], [0, 0, 1]])
    w2c = np.linalg.inv(c2w_gl @ np.diag([1.0, -1.0, -1.0, 1.0]))  # OpenCV camera axes
    return triangulate(K @ w2c[:, :3], lms)


def metric_head_frame(points68: np.ndarray) -> np.ndarray:
    """[4, 4] similarity taking ER-NeRF world points to this project's head frame (see the
    module docstring), from triangulated 68-point landmarks."""
    x = points68[_EYE_OUTER68[1]] - points68[_EYE_OUTER68[0]]  # towards the subject's left
    scale = EYE_DISTANCE_M / np.linalg.norm(x)
    x = x / np.linalg.norm(x)
    y = points68[_NOSE_BRIDGE68] - points68[_CHIN68]
    y = y - (y @ x) * x
    y = y / np.linalg.norm(y)
    R = np.stack([x, y, np.cross(x, y)])
    eyes = points68[list(_EYE_OUTER68)].mean(0)
    T = np.eye(4)
    T[:3, :3] = scale * R
    T[:3, 3] = np.array([0.0, 0.0, EYE_DISTANCE_M]) - scale * R @ eyes
    return T


def _read_au(path: Path) -> dict[str, np.ndarray]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    cols = {k.strip(): k for k in rows[0]} if rows else {}
    return {name: np.array([float(r[cols[name]]) for r in rows], np.float32) for name in ("AU45_r", "AU25_r") if name in cols}


SOURCE_FILES = ("transforms_train.json", "transforms_val.json", "aud.wav", "bc.jpg", "au.csv", "aud_ds.npy",
                "aud_hu.npy")
SOURCE_FOLDERS = ("ori_imgs", "parsing")


def source_inputs(src: Path, fps: float) -> dict:
    """What an import depends on: the format, the frame rate and the identity (size,
    modification time) of the ER-NeRF folder's files and of its frame and mask folders."""
    files = {}
    for name in SOURCE_FILES:
        if (src / name).is_file():
            st = (src / name).stat()
            files[name] = [st.st_size, st.st_mtime_ns]
    for sub in SOURCE_FOLDERS:  # frames, masks, landmarks: their count, total size and newest change
        stats = [p.stat() for p in (src / sub).iterdir() if p.is_file()] if (src / sub).is_dir() else []
        files[sub + "/"] = [len(stats), sum(st.st_size for st in stats), max((st.st_mtime_ns for st in stats), default=0)]
    return {"format": DATASET_FORMAT, "source": str(src.resolve()), "fps": fps, "files": files}


def import_ernerf(src: Path, out: Path, force: bool = False, fps: float = 25.0) -> Path:
    """Convert an ER-NeRF folder into a dataset folder (format avatar-dataset/1)."""
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise AvatarError(src, "is not a folder")
    recover_dataset(out)
    inputs = source_inputs(src, fps)
    if (out / "transforms.json").is_file() and not force:
        try:
            saved = json.loads((out / "transforms.json").read_text()).get("source_inputs")
        except (OSError, ValueError, AttributeError):
            saved = None
        if saved == inputs:
            return out
        log.info("%s was imported from another folder or version of it; importing again", out)
    meta, frames = _read_frames(src)
    first = src / "ori_imgs" / f"{int(frames[0]['img_id'])}.jpg"
    img0 = cv2.imread(str(first))
    if img0 is None:
        raise AvatarError(first, "missing or unreadable; ER-NeRF keeps the frames in ori_imgs/")
    H, W = img0.shape[:2]
    wav = src / "aud.wav"
    pcm = audio_mod.load_audio(wav)
    speech = audio_mod.check_speech(pcm, wav)
    n_audio = max(int(f.get("aud_id", f["img_id"])) for f in frames) + 1
    au = _read_au(src / "au.csv") if (src / "au.csv").is_file() else {}

    work = work_folder(out)
    shutil.rmtree(work, ignore_errors=True)
    try:
        for name in MASK_NAMES:
            (work / "masks" / name).mkdir(parents=True, exist_ok=True)
        (work / "images").mkdir()
        out_frames, lms68 = [], []
        camera = monocular_camera(float(meta["focal_len"]), float(meta["focal_len"]), float(meta["cx"]),
                                  float(meta["cy"]), "background.png")
        for f in tqdm(frames, desc="import", unit="frame", leave=False):
            i = int(f["img_id"])
            name = f"{i:06d}"
            img = cv2.imread(str(src / "ori_imgs" / f"{i}.jpg"))
            seg = cv2.imread(str(src / "parsing" / f"{i}.png"))
            if img is None or seg is None:
                raise AvatarError(src / "ori_imgs" / f"{i}.jpg", "frame or its parsing/ mask is missing or unreadable")
            _write_jpg(work / "images" / f"{name}.jpg", cv2.cvtColor(img, cv2.COLOR_BGR2RGB), 95)
            b, g, r = (seg[..., c].astype(int) for c in range(3))
            head = (r == 255) & (g == 0) & (b == 0)
            torso = ((r == 0) & (g == 255) & (b == 0)) | ((r == 0) & (g == 0) & (b == 255))
            person = ~((r == 255) & (g == 255) & (b == 255))
            lms_path = src / "ori_imgs" / f"{i}.lms"
            lm = np.loadtxt(lms_path, dtype=np.float32).reshape(-1, 2) if lms_path.is_file() else None
            mouth = polygon_mask((H, W), lm[list(INNER_MOUTH68)]) if lm is not None and len(lm) == 68 else np.zeros((H, W), bool)
            eyes = np.zeros((H, W), bool)
            if lm is not None and len(lm) == 68:
                eyes = polygon_mask((H, W), lm[list(EYES68[0])]) | polygon_mask((H, W), lm[list(EYES68[1])])
                lms68.append(lm)
            for mname, m in zip(MASK_NAMES, (person, head, mouth, eyes, torso)):
                _write_png(work / "masks" / mname / f"{name}.png", m)
            k = int(f.get("aud_id", i))
            entry = {
                "file_path": f"images/{name}.jpg",
                **{f"{m}_mask_path": f"masks/{m}/{name}.png" for m in MASK_NAMES},
                "transform_matrix": f["transform_matrix"],
                "time": round(k / fps, 6),
                **view_fields(camera["cameras"][0], k),
            }
            if "AU45_r" in au and i < len(au["AU45_r"]):
                entry["eye_openness"] = float(1 - np.clip(au["AU45_r"][i] / 3.0, 0, 1))
            if "AU25_r" in au and i < len(au["AU25_r"]):
                entry["mouth_opening"] = float(np.clip(au["AU25_r"][i] / 5.0, 0, 1))
            out_frames.append(entry)

        bg = cv2.imread(str(src / "bc.jpg"))
        if bg is None:
            raise AvatarError(src / "bc.jpg", "background image missing or unreadable")
        _write_png(work / "background.png", cv2.cvtColor(bg, cv2.COLOR_BGR2RGB))
        audio_mod.write_wav(work / "audio.wav", pcm)
        extra = dict(audio_mod.load_ernerf_features(p, n_audio) for p in (src / "aud_ds.npy", src / "aud_hu.npy")
                     if p.is_file())
        feats = audio_mod.compute_features(pcm, n_audio, fps, extra)
        save_features(work / "audio_features.npz", feats, fps)
        transforms = {
            "format": DATASET_FORMAT, "camera_model": "OPENCV", "source": "ernerf", "source_inputs": inputs,
            **camera, "w": W, "h": H, "fps": fps, "num_source_frames": n_audio,
            "audio": "audio.wav", "audio_features": "audio_features.npz",
            "frames": out_frames,
        }
        report = {"format": DATASET_FORMAT, "source": {"ernerf": str(src)}, "frames": {"total": len(out_frames)},
                  "audio": speech, "eye_openness_from": "au.csv AU45_r" if "AU45_r" in au else None}
        if len(lms68) == len(out_frames):
            lms = np.stack(lms68)
            np.save(work / "landmarks68.npy", lms)
            transforms["landmarks68"] = "landmarks68.npy"
            c2w = np.array([f["transform_matrix"] for f in out_frames], np.float64)
            points, err = triangulate_posed(lms, c2w, float(meta["focal_len"]), float(meta["cx"]), float(meta["cy"]))
            T = metric_head_frame(points)
            scale = float(np.cbrt(np.linalg.det(T[:3, :3])))
            for f, m in zip(out_frames, c2w):
                moved = T @ m
                moved[:3, :3] /= scale  # rotate and move the camera; it stays a rigid camera
                f["transform_matrix"] = moved.tolist()
            face = (points @ T[:3, :3].T + T[:3, 3]).astype(np.float32)
            np.savez(work / "face_geometry.npz", canonical=face, focal=np.float32(meta["focal_len"]),
                     landmark_set=np.array("ibug68"))
            transforms["face_geometry"] = "face_geometry.npz"
            transforms["source_to_head_frame"] = T.tolist()
            report["head_frame"] = {"from": "triangulated 68 landmarks", "scale_to_metres": scale,
                                    "reprojection_px": {"median": float(np.median(err)),
                                                        "p90": float(np.percentile(err, 90))}}
        write_json(work / "capture_report.json", report)
        write_json(work / "transforms.json", transforms)  # last: its presence marks the import finished
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return publish_dataset(out)
