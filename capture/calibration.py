"""`avatar calibrate`: a rig's cameras -> CALIB.json (format `avatar-calibration/1`).

    {"format": "avatar-calibration/1", "method": "charuco" | "face" | "sfm" | "given",
     "units": "metres", or in words the method's own scale (sfm, COLMAP, nerfstudio),
     "cameras": [{"name", "width", "height",
                  "K": 3x3 pixels, "dist": [k1, k2, p1, p2, k3] (OpenCV),
                  "world_to_camera": 4x4 (OpenCV axes: x right, y down, z forward),
                  "reprojection": {"median_px", "p90_px", "views", "points"} or null}],
     "source": what was calibrated or imported, "report": method-specific figures}

The world frame is the method's: the first camera's frame for `charuco`, `face` and
`sfm`, the file's for `given`. Capture places the head per timestep, so nothing downstream depends on it.

Ways to calibrate (capture/README.md):
    given    import NeRSemble's camera_params.json, a COLMAP sparse model (pycolmap),
             a nerfstudio transforms.json, or caliscope's camera_array.toml
    charuco  a ChArUco board filmed by every camera (capture/charuco.py)
    face     no target: the talking head itself (capture/face_calibration.py)
    sfm      no target: structure from motion on a static scene (capture/sfm.py)
"""

from __future__ import annotations

import json
import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from avatar.errors import AvatarError
from avatar.io import write_json

CALIBRATION_FORMAT = "avatar-calibration/1"
GIVEN_FILES = ("camera_params.json", "camera_array.toml", "transforms.json", "sparse")
"""What `--method given` (and auto) looks for in a rig folder, in this order."""


@dataclass
class CameraCalibration:
    """One calibrated camera. K: [3, 3]; dist: [5] OpenCV (k1, k2, p1, p2, k3);
    world_to_camera: [4, 4] OpenCV axes; reprojection: residual figures or None."""

    name: str
    width: int
    height: int
    K: np.ndarray
    dist: np.ndarray
    world_to_camera: np.ndarray
    reprojection: dict | None = None

    @property
    def centre(self) -> np.ndarray:
        """[3] the camera's position in the world."""
        R, t = self.world_to_camera[:3, :3], self.world_to_camera[:3, 3]
        return -R.T @ t

    def to_dict(self) -> dict:
        return {"name": self.name, "width": int(self.width), "height": int(self.height),
                "K": np.asarray(self.K, float).tolist(), "dist": np.asarray(self.dist, float).tolist(),
                "world_to_camera": np.asarray(self.world_to_camera, float).tolist(),
                "reprojection": self.reprojection}


@dataclass
class Calibration:
    method: str
    cameras: list[CameraCalibration]
    source: str = ""
    report: dict = field(default_factory=dict)
    units: str = "metres"
    """What the translations are in: metres, or (structure from motion, COLMAP and
    nerfstudio imports) the method's own scale, said in words."""

    def camera(self, name: str) -> CameraCalibration:
        for cam in self.cameras:
            if cam.name == name:
                return cam
        raise KeyError(name)

    def to_dict(self) -> dict:
        return {"format": CALIBRATION_FORMAT, "method": self.method, "units": self.units, "source": self.source,
                "cameras": [c.to_dict() for c in self.cameras], "report": self.report}


def save_calibration(path: str | Path, calib: Calibration) -> None:
    write_json(path, calib.to_dict())


def _matrix(path: Path, where: str, value, shape: tuple[int, ...]) -> np.ndarray:
    try:
        m = np.asarray(value, np.float64)
    except (TypeError, ValueError):
        m = None
    if m is None or m.shape != shape or not np.isfinite(m).all():
        raise AvatarError(path, f"{where} must be {' x '.join(map(str, shape))} finite numbers",
                          "write it again with `avatar calibrate`")
    return m


def _rigid(path: Path, where: str, value) -> np.ndarray:
    m = _matrix(path, where, value, (4, 4))
    R = m[:3, :3]
    if not np.allclose(m[3], [0, 0, 0, 1], atol=1e-6) or not np.allclose(R @ R.T, np.eye(3), atol=1e-4) \
            or np.linalg.det(R) < 0:
        raise AvatarError(path, f"{where} is not a rigid transform (rotation and translation)",
                          "write it again with `avatar calibrate`")
    return m


def read_document(path: Path, remedy: str) -> dict:
    """A JSON (.json) or TOML (other suffixes) file as a dict; a missing, unreadable or
    malformed file is a named error with `remedy`."""
    try:
        text = path.read_text()
        doc = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except FileNotFoundError:
        raise AvatarError(path, "does not exist", remedy) from None
    except (OSError, ValueError) as exc:  # JSONDecodeError and TOMLDecodeError are ValueErrors
        raise AvatarError(path, f"is not readable {'JSON' if path.suffix == '.json' else 'TOML'} ({exc})", remedy) from exc
    if not isinstance(doc, dict):
        raise AvatarError(path, "does not hold an object of settings", remedy)
    return doc


def load_calibration(path: str | Path) -> Calibration:
    """Read and check a CALIB.json; every problem is a named error."""
    path = Path(path)
    doc = read_document(path, "write it with `avatar calibrate RIG --out CALIB.json`")
    if doc.get("format") != CALIBRATION_FORMAT:
        found = doc.get("format")
        raise AvatarError(path, f"is not a calibration file of format {CALIBRATION_FORMAT} (format: {found!r})",
                          "write it with `avatar calibrate`")
    cams = doc.get("cameras")
    if not isinstance(cams, list) or not cams:
        raise AvatarError(path, "lists no cameras", "write it again with `avatar calibrate`")
    out = []
    for i, c in enumerate(cams):
        where = f"camera {i}"
        if not isinstance(c, dict) or not isinstance(c.get("name"), str) or not c["name"]:
            raise AvatarError(path, f"{where} has no name", "write it again with `avatar calibrate`")
        where = f"camera {c['name']!r}"
        w, h = c.get("width"), c.get("height")
        if not (isinstance(w, int) and isinstance(h, int) and w > 0 and h > 0):
            raise AvatarError(path, f"{where}: width and height must be positive integers",
                              "write it again with `avatar calibrate`")
        K = _matrix(path, f"{where} K", c.get("K"), (3, 3))
        if K[0, 0] <= 0 or K[1, 1] <= 0:
            raise AvatarError(path, f"{where}: the focal lengths in K must be positive", "write it again with `avatar calibrate`")
        out.append(CameraCalibration(c["name"], w, h, K, _matrix(path, f"{where} dist", c.get("dist"), (5,)),
                                     _rigid(path, f"{where} world_to_camera", c.get("world_to_camera")),
                                     c.get("reprojection")))
    names = [c.name for c in out]
    if len(set(names)) != len(names):
        raise AvatarError(path, "names a camera twice", "write it again with `avatar calibrate`")
    return Calibration(str(doc.get("method", "")), out, str(doc.get("source", "")), doc.get("report") or {},
                       str(doc.get("units", "metres")))


# -- given: other tools' calibration files ---------------------------------------------------

def _rig_sizes(rig: list | None) -> dict[str, tuple[int, int]]:
    return {c.name: (c.width, c.height) for c in rig or []}


def _name_for(key: str, sizes: dict[str, tuple[int, int]]) -> str:
    """A file's camera key (a serial, an id) -> the rig's camera name: equal, or the rig's
    name ends in the key after a separator (cam_0 for 0, cam_220700191 for 220700191)."""
    if not sizes or key in sizes:
        return key
    matches = [n for n in sizes if re.fullmatch(rf".*[^0-9A-Za-z]{re.escape(key)}", n)]
    return matches[0] if len(matches) == 1 else key


def _size(path: Path, name: str, sizes: dict, given: tuple[int, int] | None) -> tuple[int, int]:
    if name in sizes:
        if given is not None and tuple(given) != sizes[name]:
            raise AvatarError(path, f"camera {name} is calibrated for {given[0]}x{given[1]} pixels, its frames in the "
                              f"rig are {sizes[name][0]}x{sizes[name][1]}",
                              "calibrate the frames as recorded, or resize them to the calibrated size")
        return sizes[name]
    if given is None:
        raise AvatarError(path, f"does not give camera {name}'s image size",
                          "pass the rig folder with the camera's video, so its size is read from the frames")
    return int(given[0]), int(given[1])


def _pose(R, t) -> np.ndarray:
    m = np.eye(4)
    m[:3, :3], m[:3, 3] = R, np.ravel(t)
    return m


def import_caliscope(path: Path, rig: list | None = None) -> Calibration:
    """caliscope's camera_array.toml: [cameras.N] (or [cam_N]) with matrix, distortions,
    rotation (world->camera R) and translation (x_cam = R x_world + t), size."""
    doc = read_document(path, "give caliscope's camera_array.toml")
    table = doc.get("cameras") if isinstance(doc.get("cameras"), dict) else \
        {k[4:]: v for k, v in doc.items() if k.startswith("cam_") and isinstance(v, dict)}
    sizes = _rig_sizes(rig)
    cams = []
    for key, c in sorted(table.items(), key=lambda kv: kv[0]):
        if c.get("ignore"):
            continue
        name = _name_for(str(key), sizes) if sizes else f"cam_{key}"  # caliscope films cam_N.mp4
        where = f"camera {key}"
        if "rotation" not in c or "translation" not in c:
            raise AvatarError(path, f"{where} has no extrinsics (rotation, translation)",
                              "finish caliscope's extrinsic calibration first")
        R = _matrix(path, f"{where} rotation", c["rotation"], (3, 3))
        cams.append(CameraCalibration(name, *_size(path, name, sizes, c.get("size")),
                                      _matrix(path, f"{where} matrix", c.get("matrix"), (3, 3)),
                                      _matrix(path, f"{where} distortions", c.get("distortions"), (5,)),
                                      _pose(R, _matrix(path, f"{where} translation", c["translation"], (3,))),
                                      {"rmse_px": c["error"]} if isinstance(c.get("error"), (int, float)) else None))
    return Calibration("given", cams, f"caliscope {path.name}")


def import_nersemble(path: Path, rig: list | None = None) -> Calibration:
    """NeRSemble's camera_params.json: {"world_2_cam": {serial: 4x4 (OpenCV)}, "intrinsics":
    3x3 shared by every camera}; no distortion (NeRSemble's frames are undistorted); image
    sizes from the rig."""
    doc = _json(path)
    w2c, K = doc.get("world_2_cam"), doc.get("intrinsics")
    if not isinstance(w2c, dict) or not w2c or K is None:
        raise AvatarError(path, "has no world_2_cam table or intrinsics", "give NeRSemble's camera_params.json")
    sizes = _rig_sizes(rig)
    K = _matrix(path, "intrinsics", K, (3, 3))
    cams = []
    for serial, m in sorted(w2c.items()):
        name = _name_for(str(serial), sizes)
        width, height = _size(path, name, sizes, None)
        if not (0 < K[0, 2] < width and 0 < K[1, 2] < height):
            raise AvatarError(path, f"the principal point ({K[0, 2]:.0f}, {K[1, 2]:.0f}) lies outside camera {name}'s "
                              f"{width}x{height} frames: the intrinsics are for another resolution",
                              "scale K to the frames' size first")
        cams.append(CameraCalibration(name, width, height, K.copy(), np.zeros(5),
                                      _rigid(path, f"world_2_cam[{serial}]", m)))
    return Calibration("given", cams, f"NeRSemble {path.name}")


def _json(path: Path) -> dict:
    return read_document(path, "give the calibration file as its tool wrote it")


NERFSTUDIO_DIST = ("k1", "k2", "p1", "p2", "k3")
GL_TO_CV = np.diag([1.0, -1.0, -1.0, 1.0])


def import_nerfstudio(path: Path, rig: list | None = None) -> Calibration:
    """nerfstudio's transforms.json: frames with `transform_matrix` (camera to world,
    OpenGL axes) and intrinsics (fl_x, fl_y, cx, cy, w, h, k1 k2 p1 p2 k3) per frame or
    for all. A camera is named after its frame's file (its folder when frames sit in one
    folder per camera); a camera's frames must agree."""
    doc = _json(path)
    frames = doc.get("frames")
    if not isinstance(frames, list) or not frames:
        raise AvatarError(path, "has no frames", "give nerfstudio's transforms.json")
    sizes = _rig_sizes(rig)
    cams: dict[str, CameraCalibration] = {}
    for i, f in enumerate(frames):
        get = lambda key, default=None: f.get(key, doc.get(key, default))  # noqa: E731
        fp = Path(str(f.get("file_path", f"frame_{i}")))
        key = fp.parent.name if fp.parent.name not in ("", ".", "images") else fp.stem
        name = _name_for(key, sizes)
        try:
            fx, fy, cx, cy = (float(get(k)) for k in ("fl_x", "fl_y", "cx", "cy"))
            size = (int(get("w")), int(get("h"))) if get("w") is not None else None
            dist = np.array([float(get(k, 0.0)) for k in NERFSTUDIO_DIST])
        except (TypeError, ValueError) as exc:
            raise AvatarError(path, f"frame {i} ({fp}) lacks intrinsics fl_x, fl_y, cx, cy ({exc})",
                              "write them per frame or once for all frames") from exc
        c2w = _matrix(path, f"frame {i} transform_matrix", f.get("transform_matrix"), (4, 4))
        cam = CameraCalibration(name, *_size(path, name, sizes, size), np.array([[fx, 0, cx], [0, fy, cy], [0, 0, 1]]),
                                dist, _rigid(path, f"frame {i} transform_matrix", np.linalg.inv(c2w @ GL_TO_CV)))
        seen = cams.setdefault(name, cam)
        if seen is not cam and not (np.allclose(seen.world_to_camera, cam.world_to_camera, atol=1e-5)
                                    and np.allclose(seen.K, cam.K)):
            raise AvatarError(path, f"camera {name}'s frames disagree on its pose or intrinsics: a moving camera is not a rig",
                              "give one frame per camera, or name frames <camera>/<frame>")
    return Calibration("given", [cams[k] for k in sorted(cams)], f"nerfstudio {path.name}",
                       units="the nerfstudio file's own")


# COLMAP puts the first pixel's centre at (0.5, 0.5), OpenCV at (0, 0): cx, cy move by half a pixel.
COLMAP_MODELS = {  # model -> (fx, fy, cx, cy, dist) from its params, OpenCV's pixel convention
    "SIMPLE_PINHOLE": lambda p: (p[0], p[0], p[1] - 0.5, p[2] - 0.5, []),
    "PINHOLE": lambda p: (p[0], p[1], p[2] - 0.5, p[3] - 0.5, []),
    "SIMPLE_RADIAL": lambda p: (p[0], p[0], p[1] - 0.5, p[2] - 0.5, [p[3]]),
    "RADIAL": lambda p: (p[0], p[0], p[1] - 0.5, p[2] - 0.5, [p[3], p[4]]),
    "OPENCV": lambda p: (p[0], p[1], p[2] - 0.5, p[3] - 0.5, [p[4], p[5], p[6], p[7]]),
    "FULL_OPENCV": None,  # rational model: OpenCV's 8 coefficients, not the 5 we keep
}


def import_colmap(path: Path, rig: list | None = None) -> Calibration:
    """A COLMAP sparse model folder (cameras/images .bin or .txt), read with pycolmap. One
    COLMAP camera per rig camera, named after its images' folder (or the image file when
    the camera has one image); the camera's images must share one pose (a fixed rig)."""
    try:
        import pycolmap
    except ImportError:
        raise AvatarError(path, "is a COLMAP model, which needs pycolmap",
                          "pip install 'avatar-studio[multiview]'") from None
    try:
        rec = pycolmap.Reconstruction(str(path))
    except Exception as exc:  # pycolmap raises its own error types for unreadable models
        raise AvatarError(path, f"is not a readable COLMAP model ({exc})",
                          "give the sparse model folder (cameras, images, points3D as .bin or .txt)") from exc
    sizes = _rig_sizes(rig)
    by_camera: dict[int, list] = {}
    for image in rec.images.values():
        if image.has_pose:
            by_camera.setdefault(image.camera_id, []).append(image)
    cams = []
    for cam_id, images in sorted(by_camera.items()):
        camera = rec.cameras[cam_id]
        model = camera.model_name if hasattr(camera, "model_name") else str(camera.model)
        convert = COLMAP_MODELS.get(model)
        if convert is None:
            raise AvatarError(path, f"camera {cam_id} uses COLMAP's {model} model, which OpenCV's 5 coefficients "
                              "cannot hold", "model the cameras as PINHOLE, SIMPLE_RADIAL, RADIAL or OPENCV")
        fx, fy, cx, cy, d = convert(list(camera.params))
        names = sorted(Path(im.name) for im in images)
        key = names[0].parent.name if names[0].parent.name else names[0].stem
        poses = [im.cam_from_world().matrix() for im in images]
        if any(not np.allclose(p, poses[0], atol=1e-5) for p in poses):
            raise AvatarError(path, f"camera {cam_id} ({key}) has images at different poses: a moving camera is not a rig",
                              "give a model with one image per camera (or COLMAP rig constraints)")
        name = _name_for(key, sizes)
        dist = np.zeros(5)
        dist[: len(d)] = d
        cams.append(CameraCalibration(name, *_size(path, name, sizes, (camera.width, camera.height)),
                                      np.array([[fx, 0, cx], [0, fy, cy], [0, 0, 1]], float), dist,
                                      np.vstack([poses[0], [0, 0, 0, 1]])))
    if not cams:
        raise AvatarError(path, "has no registered image", "run COLMAP's mapper on the rig's frames first")
    return Calibration("given", cams, f"COLMAP {path.name}", units="COLMAP's own (no metric scale)")


def import_given(path: Path, rig: list | None = None) -> Calibration:
    """Any of the four given formats (or our own CALIB.json), told apart by name and content."""
    path = Path(path)
    if path.is_dir():
        if any((path / f"{stem}{ext}").is_file() for stem in ("cameras", "images") for ext in (".bin", ".txt")):
            calib = import_colmap(path, rig)
        else:
            raise AvatarError(path, "is a folder without a COLMAP model (cameras.bin/.txt, images.bin/.txt)",
                              "give camera_params.json, camera_array.toml, transforms.json or a COLMAP model")
    elif not path.is_file():
        raise AvatarError(path, "does not exist", "give camera_params.json, camera_array.toml, transforms.json "
                          "or a COLMAP model folder")
    elif path.suffix == ".toml":
        calib = import_caliscope(path, rig)
    elif path.suffix == ".json":
        doc = _json(path)
        if doc.get("format") == CALIBRATION_FORMAT:
            calib = load_calibration(path)
        elif "world_2_cam" in doc:
            calib = import_nersemble(path, rig)
        else:
            calib = import_nerfstudio(path, rig)
    else:
        raise AvatarError(path, "is not a calibration format we read",
                          "give camera_params.json, camera_array.toml, transforms.json or a COLMAP model folder")
    if rig:
        missing = sorted({c.name for c in rig} - {c.name for c in calib.cameras})
        if missing:
            raise AvatarError(path, f"does not calibrate the rig's camera{'s' if len(missing) > 1 else ''} "
                              f"{', '.join(missing)}", "calibrate every camera of the rig, or remove the others")
        calib.cameras = [c for c in calib.cameras if c.name in {r.name for r in rig}]
    return calib


def find_given(rig_root: Path) -> Path | None:
    """The first calibration file of GIVEN_FILES in a rig folder (sparse/ or sparse/0/ for COLMAP)."""
    for name in GIVEN_FILES:
        p = rig_root / name
        if name == "sparse":
            for folder in (p / "0", p):
                if folder.is_dir() and any(folder.glob("cameras.*")):
                    return folder
        elif p.is_file():
            return p
    return None


def rotation_angle_deg(a: np.ndarray, b: np.ndarray) -> float:
    """Angle (degrees) between two rotations (the upper-left 3x3 of each)."""
    cos = (np.trace(a[:3, :3].T @ b[:3, :3]) - 1) / 2
    return math.degrees(math.acos(float(np.clip(cos, -1.0, 1.0))))


def relative_rotation_deg(a: CameraCalibration, b: CameraCalibration, c: CameraCalibration,
                          d: CameraCalibration) -> float:
    """Angle (degrees) between the rotation from camera a to b in one calibration and from
    c to d in another: the world frame drops out."""
    Rab = b.world_to_camera[:3, :3] @ a.world_to_camera[:3, :3].T
    Rcd = d.world_to_camera[:3, :3] @ c.world_to_camera[:3, :3].T
    return rotation_angle_deg(Rab, Rcd)


# -- avatar calibrate ---------------------------------------------------------------------------

METHODS = ("auto", "given", "charuco", "face", "sfm")


def calibrate_rig(rig_root: str | Path, method: str = "auto", board: str | Path | None = None,
                  given: str | Path | None = None, intrinsics: str | Path | None = None,
                  tiles: list[tuple[int, int, int, int]] | None = None, same_lens: bool = False,
                  progress: bool = True) -> Calibration:
    """Calibrate the rig `rig_root` (a folder, or with `tiles` a composite video;
    capture/rig.py) by `method`:
    given     import `given`, else the first of GIVEN_FILES in the rig folder;
    charuco   the board `board` (else the rig's charuco.toml) filmed by every camera;
    face      no target: the talking head every camera films (capture/face_calibration.py),
              with one focal length for all cameras when `same_lens`;
    sfm       no target: structure from motion on a static scene, the rig best carried through it (capture/sfm.py);
    charuco and face keep the lenses of `intrinsics` (a given-format file) when passed;
    auto      given when a calibration file is passed or found, else charuco when a board
              is, else face.
    """
    from .rig import open_rig

    root = Path(rig_root)
    if method not in METHODS:
        raise AvatarError(None, f"--method {method!r} is not one of {', '.join(METHODS)}")
    if not tiles and not root.is_dir():
        raise AvatarError(root, "is not a folder", "give the rig's folder (one video or image folder per camera), or a "
                          "composite video with one --tile X,Y,W,H per camera")
    board_file = Path(board) if board is not None else (root / "charuco.toml" if (root / "charuco.toml").is_file()
                                                        else None)
    given_file = Path(given) if given is not None else (find_given(root) if root.is_dir() else None)
    if method == "auto":
        method = "given" if given_file is not None else "charuco" if board_file is not None else "face"
    uses = {"--board": ("charuco",), "--from": ("given",), "--intrinsics": ("charuco", "face"), "--same-lens": ("face",)}
    for flag, passed in (("--board", board is not None), ("--from", given is not None),
                         ("--intrinsics", intrinsics is not None), ("--same-lens", same_lens)):
        if passed and method not in uses[flag]:
            raise AvatarError(None, f"{flag} does nothing for --method {method} (it is for {' and '.join(uses[flag])})",
                              f"leave out {flag}, or choose --method {uses[flag][0]}")
    if method == "given":
        if given_file is None:
            raise AvatarError(root, f"holds none of {', '.join(GIVEN_FILES)}", "pass the calibration file with --from FILE")
        return import_given(given_file, open_rig(root, min_cameras=0, tiles=tiles))
    if method == "charuco" and board_file is None:
        raise AvatarError(root, "has no charuco.toml", "pass the board with --board BOARD.toml (caliscope's format)")
    lenses = import_given(Path(intrinsics)) if intrinsics is not None else None
    rig = open_rig(root, tiles=tiles)
    if lenses is not None:
        missing = [c.name for c in rig if c.name not in {m.name for m in lenses.cameras}]
        if missing:
            raise AvatarError(intrinsics, f"has no intrinsics for camera{'s' if len(missing) > 1 else ''} {', '.join(missing)}",
                              "calibrate the lens of every camera of the rig, or leave out --intrinsics")
    if method == "sfm":
        from .sfm import calibrate_sfm

        return calibrate_sfm(root, rig, progress=progress)
    if method == "face":
        from .face_calibration import calibrate_face

        return calibrate_face(root, rig, lenses, same_lens, progress)
    from .charuco import calibrate_charuco, load_board

    return calibrate_charuco(root, rig, load_board(board_file), lenses, progress)
