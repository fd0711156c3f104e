"""The dataset folder (format ``avatar-dataset/1``): capture writes it, recon reads it, and
this module checks it up front, before any stage creates anything from it.

Layout (every path in transforms.json is relative to the folder and stays inside it):
    transforms.json        nerfstudio-style: format, fl_x, fl_y, cx, cy, w == h, fps, frames[]
                           each frame: file_path, <mask>_mask_path for MASK_NAMES,
                           transform_matrix [4, 4] (camera-to-world, OpenGL axes, rigid),
                           frame_index (row of the audio features), optional time,
                           eye_openness, mouth_opening
    images/, masks/<mask>/ one JPEG / PNG per frame, w x h
    background.png         the plate behind the subject, w x h
    audio_features.npz     capture.audio's format: mel [N, 16, 80], energy [N], visemes [N, 15]
    landmarks.npy          optional [frames, 478, 3] mediapipe landmarks in pixels
    landmarks68.npy        optional [frames, 68, 2] (ER-NeRF imports)
    face_geometry.npz      optional canonical [478 or 68, 3] face in the head frame, metres
"""

from __future__ import annotations

import json
import math
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from avatar.errors import AvatarError
from avatar.io import publish_folder, recover_folder, replaced_path

from .audio import MEL_WINDOW, N_MELS, VISEMES, load_features

DATASET_FORMAT = "avatar-dataset/1"
SUPPORTED_FORMATS = (DATASET_FORMAT,)
MASK_NAMES = ("person", "head", "mouth", "eyes", "torso")
RECAPTURE = "re-run `avatar capture --force` on the video (or fix the file by hand)"


def _is_number(v: Any) -> bool:
    try:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    except OverflowError:  # an integer beyond float range
        return False


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class _Checker:
    """Checks one dataset folder; every problem is an AvatarError naming the file."""

    def __init__(self, root: Path):
        self.root = root
        self.tpath = root / "transforms.json"

    def fail(self, problem: str, path: Path | None = None, remedy: str = RECAPTURE) -> None:
        raise AvatarError(path or self.tpath, problem, remedy)

    def file(self, rel: Any, what: str) -> Path:
        """The existing file `rel` names inside the folder."""
        if not isinstance(rel, str) or not rel:
            self.fail(f"{what} must be a relative file path, got {rel!r}")
        path = (self.root / rel).resolve()
        if Path(rel).is_absolute() or not path.is_relative_to(self.root.resolve()):
            self.fail(f"{what} {rel!r} points outside the dataset folder")
        if not path.is_file():
            self.fail(f"missing from the dataset (named by {what} in transforms.json)", self.root / rel)
        return self.root / rel

    def meta(self) -> dict:
        if not self.root.is_dir():
            if replaced_path(self.root).is_dir():
                raise AvatarError(self.root, "is missing: a capture was killed while it replaced this dataset",
                                  "run the same `avatar capture` again: it restores the old or the new dataset")
            raise AvatarError(self.root, "is not a folder", "give the dataset folder written by `avatar capture`")
        if not self.tpath.is_file():
            raise AvatarError(self.root, "is not a dataset folder (no transforms.json)",
                              "create one with `avatar capture VIDEO --out DIR`")
        try:
            meta = json.loads(self.tpath.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            self.fail(f"is not valid JSON ({exc})")
        except OSError as exc:
            self.fail(f"cannot be read ({exc.strerror or exc})")
        if not isinstance(meta, dict):
            self.fail(f"must hold a JSON object, not {type(meta).__name__}")
        if meta.get("format") not in SUPPORTED_FORMATS:
            self.fail(f"has format {meta.get('format')!r}; this version reads {', '.join(SUPPORTED_FORMATS)}")
        for key in ("fl_x", "fl_y", "cx", "cy", "fps"):
            if not _is_number(meta.get(key)):
                self.fail(f"{key} must be a finite number, got {meta.get(key)!r}")
        for key in ("fl_x", "fl_y", "fps"):
            if meta[key] <= 0:
                self.fail(f"{key} must be positive, got {meta[key]!r}")
        for key in ("w", "h"):
            if not _is_int(meta.get(key)) or meta[key] <= 0:
                self.fail(f"{key} must be a positive integer, got {meta.get(key)!r}")
        if meta["w"] != meta["h"]:
            self.fail(f"frames must be square, got w={meta['w']} h={meta['h']}")
        frames = meta.get("frames")
        if not isinstance(frames, list):
            self.fail(f"needs a list of frames under 'frames', got {type(frames).__name__}")
        if not frames:
            self.fail("lists no frames")
        for i, f in enumerate(frames):
            self.frame(i, f)
        return meta

    def frame(self, i: int, f: Any) -> None:
        where = f"frames[{i}]"
        if not isinstance(f, dict):
            self.fail(f"{where} must be an object, got {type(f).__name__}")
        if not _is_int(f.get("frame_index")) or f["frame_index"] < 0:
            self.fail(f"{where}.frame_index must be a non-negative integer, got {f.get('frame_index')!r}")
        for key in ("time", "eye_openness", "mouth_opening"):
            if key in f and not _is_number(f[key]):
                self.fail(f"{where}.{key} must be a finite number, got {f[key]!r}")
        m = f.get("transform_matrix")
        if not (isinstance(m, list) and len(m) == 4 and all(isinstance(r, list) and len(r) == 4 for r in m)
                and all(_is_number(v) or (isinstance(v, float) and not math.isfinite(v)) for r in m for v in r)):
            self.fail(f"{where}.transform_matrix must be a 4x4 list of numbers")
        c2w = np.array(m, dtype=np.float64)
        if not np.isfinite(c2w).all():
            self.fail(f"{where}.transform_matrix has a non-finite number (NaN or infinity)")
        R = c2w[:3, :3]
        if not np.allclose(c2w[3], [0, 0, 0, 1], atol=1e-6) or not np.allclose(R.T @ R, np.eye(3), atol=1e-3) \
                or np.linalg.det(R) < 0:
            self.fail(f"{where}.transform_matrix is not a rigid camera pose (rotation and translation, "
                      "last row 0 0 0 1)")

    def files(self, meta: dict) -> list[tuple[Path, int]]:
        """Every image the frames name, with its cv2 read flag; missing ones fail here."""
        out = [(self.file(meta.get("background"), "background"), cv2.IMREAD_COLOR)]
        for i, f in enumerate(meta["frames"]):
            out.append((self.file(f.get("file_path"), f"frames[{i}].file_path"), cv2.IMREAD_COLOR))
            out += [(self.file(f.get(f"{m}_mask_path"), f"frames[{i}].{m}_mask_path"), cv2.IMREAD_GRAYSCALE)
                    for m in MASK_NAMES]
        return out

    def features(self, meta: dict) -> dict[str, np.ndarray]:
        path = self.file(meta.get("audio_features"), "audio_features")
        try:
            feats = load_features(path)
        except AvatarError:
            raise
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
            self.fail(f"is not a readable feature file ({type(exc).__name__}: {exc})", path)
        expected = {"mel": (MEL_WINDOW, N_MELS), "energy": (), "visemes": (len(VISEMES),)}
        for key, tail in expected.items():
            if key not in feats:
                if key == "visemes":
                    continue
                self.fail(f"has no '{key}' array", path)
            a = feats[key]
            if a.dtype.kind != "f" or a.ndim != 1 + len(tail) or a.shape[1:] != tail:
                self.fail(f"'{key}' must be float [N{''.join(', ' + str(t) for t in tail)}], got {a.dtype} "
                          f"{list(a.shape)}", path)
            if not np.isfinite(a).all():
                self.fail(f"'{key}' has non-finite values", path)
        n = len(feats["mel"])
        if any(len(feats[k]) != n for k in expected if k in feats):
            self.fail("its arrays cover different numbers of frames", path)
        last = max(f["frame_index"] for f in meta["frames"])
        if last >= n:
            self.fail(f"covers {n} frames but transforms.json uses frame_index {last}", path)
        return feats

    def arrays(self, meta: dict) -> None:
        n = len(meta["frames"])
        for key, points in (("landmarks", 478), ("landmarks68", 68)):
            if key not in meta:
                continue
            path = self.file(meta[key], key)
            try:
                a = np.load(path, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError, EOFError) as exc:
                self.fail(f"is not a readable .npy file ({exc})", path)
            if a.ndim != 3 or a.shape[0] != n or a.shape[1] != points or a.shape[2] < 2 or a.dtype.kind != "f":
                self.fail(f"must be float [{n} frames, {points}, 2 or 3], got {a.dtype} {list(a.shape)}", path)
            if not np.isfinite(a[..., :2]).all():
                self.fail("has non-finite landmark coordinates", path)
        if "face_geometry" in meta:
            path = self.file(meta["face_geometry"], "face_geometry")
            try:
                with np.load(path, allow_pickle=False) as z:
                    canonical = z["canonical"]
            except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
                self.fail(f"is not a readable face geometry file ({type(exc).__name__}: {exc})", path)
            if canonical.shape not in ((478, 3), (68, 3)) or not np.isfinite(canonical).all():
                self.fail(f"'canonical' must be finite [478 or 68, 3], got {list(canonical.shape)}", path)

    def decode(self, files: list[tuple[Path, int]], size: int) -> None:
        def check(item: tuple[Path, int]) -> str | None:
            path, flags = item
            img = cv2.imread(str(path), flags)
            if img is None:
                return f"{path}\0is not a readable image"
            if img.shape[:2] != (size, size):
                return f"{path}\0is {img.shape[1]}x{img.shape[0]}, the dataset's frames are {size}x{size}"
            return None

        with ThreadPoolExecutor(max_workers=4) as pool:
            for problem in pool.map(check, files):
                if problem:
                    path, text = problem.split("\0")
                    self.fail(text, Path(path))


def validate_dataset(root: str | Path, decode: bool = False) -> dict:
    """Check a dataset folder and return its parsed transforms.json (see `open_checked`)."""
    return open_checked(root, decode)[0]


def open_checked(root: str | Path, decode: bool = False) -> tuple[dict, dict[str, np.ndarray]]:
    """Check a dataset folder; (its parsed transforms.json, its audio features as checked).

    Always: the schema and types of transforms.json, finite numbers, rigid poses, every
    referenced file present and inside the folder, the feature arrays' shapes and length
    against the frames, the landmark and face-geometry shapes. decode: also decode every
    image and mask and check its size (what training reads; ~1 s per 200 frames).
    Raises AvatarError naming the file, the problem and the remedy.
    """
    check = _Checker(Path(root))
    meta = check.meta()
    files = check.files(meta)
    feats = check.features(meta)
    check.arrays(meta)
    if decode:
        check.decode(files, meta["w"])
    return meta, feats


def work_folder(out: Path) -> Path:
    """Where a dataset is built before it is published at `out` (capture resumes from it)."""
    return out.with_name(out.name + ".partial")


def _finished(work: Path) -> bool:
    # transforms.json is written last, and the stage markers go just before publishing.
    return (work / "transforms.json").is_file() and not any(work.glob(".stage_*.json"))


def publish_dataset(out: Path) -> Path:
    """Move the finished work folder onto `out`, keeping the old dataset until the new one
    is in place (avatar.io.publish_folder)."""
    publish_folder(work_folder(out), out)
    return out


def recover_dataset(out: Path) -> None:
    """Finish or undo a publish that a kill cut short (called before any capture or import)."""
    recover_folder(out, work_folder(out), _finished)
