"""The dataset folder (format ``avatar-dataset/2``), the hand-off from capture to recon:
capture writes it, recon and the viewer read it, and this module alone defines it. It
checks a folder up front, before any stage creates anything from it, and it holds the
layouts the files are written in: the landmark index sets (lips, eyes, rigid points), the
masks, and the audio feature file.

A dataset is a set of views: each frame is one camera's image of one moment (timestep).
A monocular capture is the one-camera case; a rig capture has one frame per camera per
timestep, every camera with its own intrinsics and background plate.

Layout (every path in transforms.json is relative to the folder and stays inside it):
    transforms.json        nerfstudio-style: format, fl_x, fl_y, cx, cy (the first camera's,
                           for nerfstudio), w == h (every camera's), fps, cameras[], frames[]
                           each camera: name, fl_x, fl_y, cx, cy, background (its plate)
                           each frame: camera (a name of cameras[]), timestep (the moment,
                           also frame_index: the row of the audio features), fl_x, fl_y, cx,
                           cy (its camera's, for nerfstudio), file_path, <mask>_mask_path for
                           MASK_NAMES, transform_matrix [4, 4] (camera-to-world, OpenGL
                           axes, rigid; the world is the head's frame), optional time,
                           eye_openness, mouth_opening (see `mouth_opening`)
    images/, masks/<mask>/ one JPEG / PNG per frame, w x h
    background.png         a camera's plate behind the subject, w x h (rigs: backgrounds/)
    audio_features.npz     format avatar-audio-features/1 (`save_features`): mel [N, 16, 80],
                           energy [N], visemes [N, 15] (VISEMES), at SAMPLE_RATE. Optional:
                           a rig filmed without sound has none (recon then fits the avatar to
                           tracked motion only, and it cannot be driven by speech)
    landmarks.npy          optional [frames, 478, 3] mediapipe landmarks in pixels (the
                           478-point layout below)
    landmarks_3d.npy       optional [frames, 478, 3] the same landmarks in the head frame,
                           metres (rigs: triangulated); recon reads expression from these
                           when present
    landmarks68.npy        optional [frames, 68, 2] (ER-NeRF imports; the 68-point layout)
    face_geometry.npz      optional canonical [478 or 68, 3] face in the head frame, metres

Format ``avatar-dataset/1`` (still read) is the monocular case written before rigs: no
cameras[], the one camera's intrinsics and background at the top level, frames without
camera and timestep (frame_index is the timestep), audio features required.
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
from avatar.io import atomic_path, replaced_path

DATASET_FORMAT = "avatar-dataset/2"
SUPPORTED_FORMATS = ("avatar-dataset/1", DATASET_FORMAT)
MONOCULAR_CAMERA = "camera"
"""The camera name of a monocular capture (and of every /1 dataset's one camera)."""
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
        if meta["format"] != "avatar-dataset/1":
            self.cameras(meta.get("cameras"))
        frames = meta.get("frames")
        if not isinstance(frames, list):
            self.fail(f"needs a list of frames under 'frames', got {type(frames).__name__}")
        if not frames:
            self.fail("lists no frames")
        names = {c["name"] for c in camera_table(meta)}
        views: set[tuple[str, int]] = set()
        for i, f in enumerate(frames):
            self.frame(i, f)
            if meta["format"] != "avatar-dataset/1":
                if not isinstance(f.get("camera"), str) or f["camera"] not in names:
                    self.fail(f"frames[{i}].camera must name one of cameras[] ({', '.join(sorted(names))}), "
                              f"got {f.get('camera')!r}")
                if not _is_int(f.get("timestep")) or f["timestep"] != f["frame_index"]:
                    self.fail(f"frames[{i}].timestep must equal its frame_index {f['frame_index']}, "
                              f"got {f.get('timestep')!r}")
            view = (frame_camera(f), f["frame_index"])
            if view in views:
                self.fail(f"frames[{i}] repeats camera {view[0]!r} at timestep {view[1]}")
            views.add(view)
        return meta

    def cameras(self, cameras: Any) -> None:
        if not isinstance(cameras, list) or not cameras:
            self.fail(f"needs a non-empty list of cameras under 'cameras', got {cameras!r:.60}")
        seen = set()
        for n, c in enumerate(cameras):
            where = f"cameras[{n}]"
            if not isinstance(c, dict):
                self.fail(f"{where} must be an object, got {type(c).__name__}")
            if not isinstance(c.get("name"), str) or not c["name"] or c["name"] in seen:
                self.fail(f"{where}.name must be a non-empty string no other camera has, got {c.get('name')!r}")
            seen.add(c["name"])
            for key in ("fl_x", "fl_y", "cx", "cy"):
                if not _is_number(c.get(key)) or (key.startswith("fl") and c[key] <= 0):
                    self.fail(f"{where}.{key} must be a finite{' positive' if key.startswith('fl') else ''} number, "
                              f"got {c.get(key)!r}")

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
        out = [(self.file(c.get("background"), f"the background of camera {c['name']}"), cv2.IMREAD_COLOR)
               for c in camera_table(meta)]
        for i, f in enumerate(meta["frames"]):
            out.append((self.file(f.get("file_path"), f"frames[{i}].file_path"), cv2.IMREAD_COLOR))
            out += [(self.file(f.get(f"{m}_mask_path"), f"frames[{i}].{m}_mask_path"), cv2.IMREAD_GRAYSCALE)
                    for m in MASK_NAMES]
        return out

    def features(self, meta: dict) -> dict[str, np.ndarray] | None:
        if "audio_features" not in meta and meta["format"] != "avatar-dataset/1":
            return None  # filmed without sound
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
        for key, points in (("landmarks", 478), ("landmarks_3d", 478), ("landmarks68", 68)):
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


def open_checked(root: str | Path, decode: bool = False) -> tuple[dict, dict[str, np.ndarray] | None]:
    """Check a dataset folder; (its parsed transforms.json, its audio features as checked, or
    None for a dataset filmed without sound).

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


def camera_table(meta: dict) -> list[dict]:
    """The cameras of a dataset (each: name, fl_x, fl_y, cx, cy, background): its cameras[],
    or the one camera a /1 dataset describes at its top level."""
    if "cameras" in meta:
        return meta["cameras"]
    return [{"name": MONOCULAR_CAMERA, **{k: meta.get(k) for k in ("fl_x", "fl_y", "cx", "cy", "background")}}]


def frame_camera(frame: dict) -> str:
    """The camera name of a frame (/1 frames: the one camera's)."""
    return frame.get("camera", MONOCULAR_CAMERA)


def monocular_camera(fl_x: float, fl_y: float, cx: float, cy: float, background: str) -> dict:
    """What a one-camera dataset writes for its camera: the top-level intrinsics (nerfstudio's,
    and /1 readers'), the cameras[] entry, and the background."""
    intrinsics = {"fl_x": fl_x, "fl_y": fl_y, "cx": cx, "cy": cy}
    return {**intrinsics, "background": background,
            "cameras": [{"name": MONOCULAR_CAMERA, **intrinsics, "background": background}]}


def view_fields(camera: dict, timestep: int) -> dict:
    """A frame's camera, timestep (= frame_index) and its camera's intrinsics (nerfstudio reads
    per-frame intrinsics)."""
    return {"camera": camera["name"], "timestep": timestep, "frame_index": timestep,
            **{k: camera[k] for k in ("fl_x", "fl_y", "cx", "cy")}}


# -- landmark layouts: mediapipe's 478-point face mesh (landmarks.npy) ------------------
# Landmarks that do not move with speech or expression: forehead, brow ridge, nose
# bridge and tip, temples, eye corners (not eyelids, lips, cheeks or jaw).
RIGID = (
    10, 151, 9, 8, 168, 6, 197, 195, 5, 4, 1, 109, 338, 67, 297, 108, 337, 69, 299, 104, 333,
    54, 284, 21, 251, 103, 332, 127, 356, 162, 389, 33, 133, 362, 263, 130, 359, 243, 463, 226, 446,
)
FACE_OVAL = (
    10, 338, 297, 332, 284, 251, 389, 356, 454, 323, 361, 288, 397, 365, 379, 378, 400, 377, 152,
    148, 176, 149, 150, 136, 172, 58, 132, 93, 234, 127, 162, 21, 54, 103, 67, 109,
)
INNER_LIPS = (78, 191, 80, 81, 82, 13, 312, 311, 310, 415, 308, 324, 318, 402, 317, 14, 87, 178, 88, 95)
OUTER_LIPS = (61, 185, 40, 39, 37, 0, 267, 269, 270, 409, 291, 375, 321, 405, 314, 17, 84, 181, 91, 146)
LIPS = list(OUTER_LIPS + INNER_LIPS)  # the 40 lip landmarks (LMD, the lip-landmark loss)
RIGHT_EYE = (33, 246, 161, 160, 159, 158, 157, 173, 133, 155, 154, 153, 145, 144, 163, 7)
LEFT_EYE = (263, 466, 388, 387, 386, 385, 384, 398, 362, 382, 381, 380, 374, 373, 390, 249)
# Eye aspect ratio points (p1..p6: outer corner, two upper lid, inner corner, two lower lid).
RIGHT_EAR = (33, 160, 158, 133, 153, 144)
LEFT_EAR = (263, 387, 385, 362, 380, 373)
EYE_OUTER = (33, 263)
UPPER_LIP, LOWER_LIP = 13, 14
BROW_TOP, CHIN = 10, 152
NOSE_BASE = 2
"""The subnasale: below it the face moves with speech (lips, cheeks, jaw, chin), above it
the face is rigid but for eyes and brows."""
NASION, NOSE_DORSUM = 168, 197  # between the eyes; the nose's bridge just below the eyes
N_LANDMARKS = 478


FACE_TRIANGLES_FILE = Path(__file__).with_name("face_triangles.npy")
"""The face mesh's 854 triangles [854, 3] (int16, sorted): the 3-cliques of mediapipe
0.10.21's tessellation edges (it ships edges, not faces), kept here so that reading a
dataset needs no face tracker (tests/test_capture_tracking.py checks them against it)."""


def face_triangles() -> list[tuple[int, int, int]]:
    """The face mesh's triangles [(i, j, k)] over the 478-point layout (FACE_TRIANGLES_FILE)."""
    return [tuple(int(v) for v in t) for t in np.load(FACE_TRIANGLES_FILE)]


# The 68-point layout of ER-NeRF imports (landmarks68.npy).
EYES68 = (tuple(range(36, 42)), tuple(range(42, 48)))
INNER_MOUTH68 = tuple(range(60, 68))


# -- measures and masks defined on those layouts ----------------------------------------
def polygon_mask(shape: tuple[int, int], pts: np.ndarray) -> np.ndarray:
    """[H, W] bool mask of a filled polygon. pts: [K, 2] pixels."""
    m = np.zeros(shape, np.uint8)
    cv2.fillPoly(m, [np.round(pts).astype(np.int32)], 1)
    return m.astype(bool)


def mouth_opening(lm: np.ndarray) -> np.ndarray:
    """Inner-lip gap over the outer eye-corner distance per frame (replaces AU25). [T]."""
    gap = np.linalg.norm(lm[:, UPPER_LIP, :2] - lm[:, LOWER_LIP, :2], axis=-1)
    eyes = np.linalg.norm(lm[:, EYE_OUTER[0], :2] - lm[:, EYE_OUTER[1], :2], axis=-1)
    return (gap / (eyes + 1e-9)).astype(np.float32)


# -- audio_features.npz (format avatar-audio-features/1) ---------------------------------
SAMPLE_RATE = 16_000
"""Sample rate of the speech the features are computed from (capture.audio resamples to it)."""
N_MELS = 80
MEL_WINDOW = 16  # hops (10 ms) per video frame's log-mel window
FEATURES_FORMAT = "avatar-audio-features/1"
VISEMES = ("sil", "PP", "FF", "TH", "DD", "kk", "CH", "SS", "nn", "RR", "aa", "E", "ih", "oh", "ou")


def save_features(path: Path, feats: dict[str, np.ndarray], fps: float) -> None:
    meta = {"format": FEATURES_FORMAT, "fps": fps, "sample_rate": SAMPLE_RATE,
            "shapes": {k: list(v.shape) for k, v in feats.items()}}
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, viseme_names=np.array(VISEMES), meta=np.array(json.dumps(meta)), **feats)


def load_features(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        out = {k: z[k] for k in z.files}
    meta = json.loads(str(out.pop("meta")))
    if meta.get("format") != FEATURES_FORMAT:
        raise AvatarError(path, f"unknown audio feature format {meta.get('format')!r}, expected {FEATURES_FORMAT}")
    return out
