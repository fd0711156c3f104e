"""Bad inputs of every kind, each run through the CLI in-process: it must exit 1 with one
`error: <file>: ...` naming the bad file, print no traceback, leave nothing behind and
change nothing already saved.

    python tests/fuzz_bad_inputs.py       # every case (a trained tiny avatar is made first)
    pytest tests/test_fuzz_bad_inputs.py  # the fixed sample CI runs

Kinds: datasets (transforms.json and every file it names), avatar checkpoints, speech files
(`render` and `eval --drive`), videos (`capture`, with and without an old dataset to keep)
and job TOML files (`run`). No command reads a .ply or a calibration file yet, so there is
no case for them.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shutil
import struct
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import av  # noqa: E402
import cv2  # noqa: E402
import soundfile as sf  # noqa: E402
import torch  # noqa: E402

from _datasets import make_dataset  # noqa: E402

SAMPLE_EVERY = 7  # CI runs every 7th case


@dataclass
class Fixtures:
    """Valid inputs the cases start from (never modified by a case)."""

    avatar: Path  # a trained avatar folder
    video: Path  # a valid talking-head video with speech
    speech: Path  # a valid speech file
    dataset: Path  # a valid small dataset (synthetic; with landmarks)


@dataclass
class Case:
    name: str
    build: Callable[[Fixtures, Path], tuple[list[str], str]]
    """(fixtures, empty workspace) -> (CLI argv, text the error must name)."""


def _rng(name: str) -> np.random.Generator:
    return np.random.default_rng(sum(map(ord, name)))


# ---------------------------------------------------------------- datasets -----------------

def _copy_dataset(fx: Fixtures, ws: Path) -> Path:
    ds = ws / "ds"
    shutil.copytree(fx.dataset, ds)
    return ds


def _train_argv(ds: Path, ws: Path) -> list[str]:
    return ["train", str(ds), "--out", str(ws / "avatar"), "--preset", "demo", "--iterations", "1"]


def _meta_case(name: str, edit: Callable[[dict], object]) -> Case:
    """A dataset whose transforms.json is the valid one after `edit` (which changes the dict
    in place, or returns raw text to write instead)."""
    def build(fx: Fixtures, ws: Path):
        ds = _copy_dataset(fx, ws)
        meta = json.loads((ds / "transforms.json").read_text())
        out = edit(meta)
        if isinstance(out, bytes):
            (ds / "transforms.json").write_bytes(out)
        else:
            (ds / "transforms.json").write_text(out if isinstance(out, str) else json.dumps(meta))
        return _train_argv(ds, ws), str(ds)
    return Case(f"dataset/transforms/{name}", build)


def _as_rig(cameras: object, path: list | None = None, value: object = None) -> Callable[[dict], None]:
    """An edit making the /1 dataset a one-camera rig's (/2) with `cameras` (None: none
    listed), every frame of camera "a" at its timestep, then `value` set at `path`."""
    def edit(meta: dict) -> None:
        meta["format"] = "avatar-dataset/2"
        if cameras is not None:
            meta["cameras"] = cameras
        for f in meta["frames"]:
            f.update(camera="a", timestep=f["frame_index"])
        if path is not None:
            _set(path, value)(meta)
    return edit


def _file_case(name: str, rel: str, content: Callable[[Path, np.random.Generator], bytes | None]) -> Case:
    """A dataset whose file `rel` is replaced by `content(original)` (None: deleted)."""
    def build(fx: Fixtures, ws: Path):
        ds = _copy_dataset(fx, ws)
        data = content(ds / rel, _rng(name))
        (ds / rel).unlink()
        if data is not None:
            (ds / rel).write_bytes(data)
        return _train_argv(ds, ws), str(ds)
    return Case(f"dataset/file/{name}", build)


def _set(path: list, value) -> Callable[[dict], None]:
    def edit(meta: dict) -> None:
        node = meta
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return edit


def _drop(path: list) -> Callable[[dict], None]:
    def edit(meta: dict) -> None:
        node = meta
        for key in path[:-1]:
            node = node[key]
        del node[path[-1]]
    return edit


def _png(img: np.ndarray) -> bytes:
    return cv2.imencode(".png", img)[1].tobytes()


def _npz(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _features(mutate: Callable[[dict], None]) -> Callable[[Path, np.random.Generator], bytes]:
    def content(path: Path, rng) -> bytes:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        mutate(arrays)
        return _npz(**arrays)
    return content


def _junk(n: int) -> Callable[[Path, np.random.Generator], bytes]:
    return lambda path, rng: rng.integers(0, 256, n, dtype=np.uint8).tobytes()


def _truncated(fraction: float) -> Callable[[Path, np.random.Generator], bytes]:
    return lambda path, rng: path.read_bytes()[: int(len(path.read_bytes()) * fraction)]


def dataset_cases() -> list[Case]:
    cases = []
    raw = {"empty": "", "open-brace": "{", "array": "[]", "null": "null", "number": "42", "string": '"frames"',
           "binary": b"\xff\xfe\x00garbage\x80", "truncated": None}
    for name, text in raw.items():
        cases.append(_meta_case(f"raw-{name}", (lambda t: lambda meta: json.dumps(meta)[: len(json.dumps(meta)) // 2]
                                                if t is None else t)(text)))
    for key in ("format", "fl_x", "fl_y", "cx", "cy", "w", "h", "fps", "frames", "audio_features", "background"):
        cases.append(_meta_case(f"missing-{key}", _drop([key])))
    bad_numbers = {"string": "12", "null": None, "list": [], "object": {}, "bool": True, "nan": math.nan,
                   "inf": math.inf, "-inf": -math.inf}
    for key in ("fl_x", "fl_y", "cx", "cy", "fps"):
        for label, v in bad_numbers.items():
            cases.append(_meta_case(f"{key}-{label}", _set([key], v)))
    for key in ("fl_x", "fl_y", "fps"):
        for v in (0, -5.0):
            cases.append(_meta_case(f"{key}-{v}", _set([key], v)))
    for key in ("w", "h"):
        for label, v in {"string": "32", "float": 32.5, "zero": 0, "negative": -32, "null": None, "bool": True,
                         "not-square": 64, "huge": 10**9}.items():
            cases.append(_meta_case(f"{key}-{label}", _set([key], v)))
    for v in ("avatar-dataset/3", None, 1):
        cases.append(_meta_case(f"format-{v}", _set(["format"], v)))
    # As a rig's dataset (format /2): its cameras and every frame's camera and timestep.
    for label, cameras in {"missing": None, "empty": [], "string": "cam", "nulls": [None],
                           "unnamed": [{"fl_x": 40.0, "fl_y": 40.0, "cx": 16.0, "cy": 16.0}],
                           "no-plate": [{"name": "a", "fl_x": 40.0, "fl_y": 40.0, "cx": 16.0, "cy": 16.0}],
                           "focal-nan": [{"name": "a", "fl_x": math.nan, "fl_y": 40.0, "cx": 16.0, "cy": 16.0,
                                          "background": "background.png"}]}.items():
        cases.append(_meta_case(f"rig-cameras-{label}", _as_rig(cameras)))
    plate = [{"name": "a", "fl_x": 40.0, "fl_y": 40.0, "cx": 16.0, "cy": 16.0, "background": "background.png"}]
    for label, (k, key, v) in {"camera-unknown": (2, "camera", "b"), "camera-null": (2, "camera", None),
                               "camera-list": (2, "camera", ["a"]), "timestep-other": (2, "timestep", 5),
                               "timestep-string": (2, "timestep", "2"),
                               "timestep-bool": (1, "timestep", True)}.items():  # frames[1] is at timestep 1
        cases.append(_meta_case(f"rig-frame-{label}", _as_rig(plate, ["frames", k, key], v)))
    for label, v in {"empty": [], "object": {}, "string": "x", "numbers": [1], "nulls": [None], "lists": [[]]}.items():
        cases.append(_meta_case(f"frames-{label}", _set(["frames"], v)))
    for key in ("file_path", "person_mask_path", "head_mask_path", "mouth_mask_path", "eyes_mask_path",
                "torso_mask_path", "transform_matrix", "frame_index"):
        cases.append(_meta_case(f"frame-missing-{key}", _drop(["frames", 2, key])))
    for label, v in {"negative": -1, "float": 1.5, "string": "3", "null": None, "bool": True,
                     "beyond-features": 10**6}.items():
        cases.append(_meta_case(f"frame_index-{label}", _set(["frames", 2, "frame_index"], v)))
    for key in ("eye_openness", "mouth_opening", "time"):
        for label, v in {"string": "x", "nan": math.nan, "inf": math.inf, "null": None, "list": []}.items():
            cases.append(_meta_case(f"{key}-{label}", _set(["frames", 1, key], v)))
    for (r, c) in ((0, 0), (1, 3), (2, 2), (3, 3)):
        cases.append(_meta_case(f"pose-nan-{r}{c}", _set(["frames", 3, "transform_matrix", r, c], math.nan)))
    cases.append(_meta_case("pose-inf", _set(["frames", 0, "transform_matrix", 0, 3], math.inf)))
    cases.append(_meta_case("pose-huge-int", _set(["frames", 0, "transform_matrix", 0, 3], 10**400)))
    eye = np.eye(4)
    poses = {"3x3": np.eye(3).tolist(), "4x3": eye[:, :3].tolist(), "empty": [], "string": "eye",
             "strings": [["1", "0", "0", "0"]] * 4, "nulls": [[None] * 4] * 4, "ragged": [[1, 0, 0, 0], [0, 1]],
             "scaled": (2 * eye).tolist(), "mirrored": np.diag([1.0, 1.0, -1.0, 1.0]).tolist(),
             "sheared": [[1, 0.5, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]],
             "projective": [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0.1, 1]]}
    for label, v in poses.items():
        cases.append(_meta_case(f"pose-{label}", _set(["frames", 4, "transform_matrix"], v)))
    for label, v in {"absolute": "/etc/hostname", "parent": "../../outside.jpg", "empty": "", "number": 5,
                     "null": None, "missing": "images/nope.jpg", "folder": "images"}.items():
        cases.append(_meta_case(f"file_path-{label}", _set(["frames", 1, "file_path"], v)))
    for label, v in {"missing": "masks/head/nope.png", "parent": "../x.png", "number": 3, "folder": "masks"}.items():
        cases.append(_meta_case(f"head_mask-{label}", _set(["frames", 0, "head_mask_path"], v)))
    for label, v in {"missing": "nope.npz", "parent": "../audio_features.npz", "number": 3}.items():
        cases.append(_meta_case(f"audio_features-{label}", _set(["audio_features"], v)))
    for label, v in {"missing": "nope.png", "empty": ""}.items():
        cases.append(_meta_case(f"background-{label}", _set(["background"], v)))
    for label, v in {"missing": "nope.npy", "number": 1}.items():
        cases.append(_meta_case(f"landmarks-{label}", _set(["landmarks"], v)))
    cases.append(_meta_case("face_geometry-missing", _set(["face_geometry"], "nope.npz")))

    images = {"empty": lambda p, r: b"", "junk": _junk(3000), "truncated": _truncated(0.3),
              "too-big": lambda p, r: _png(np.zeros((64, 64, 3), np.uint8)), "deleted": lambda p, r: None}
    for label, fn in images.items():
        cases.append(_file_case(f"image-{label}", "images/000001.jpg", fn))
    for label in ("empty", "junk", "too-big", "deleted"):
        cases.append(_file_case(f"head-mask-{label}", "masks/head/000002.png", images[label]))
        cases.append(_file_case(f"background-{label}", "background.png", images[label]))

    def arr(key, value):
        return _features(lambda a: a.__setitem__(key, value))

    feats = {"empty": lambda p, r: b"", "junk": _junk(5000), "truncated": _truncated(0.5),
             "deleted": lambda p, r: None,
             "no-mel": _features(lambda a: a.pop("mel")),
             "no-meta": _features(lambda a: a.pop("meta")),
             "mel-2d": _features(lambda a: a.__setitem__("mel", a["mel"][:, 0])),
             "mel-nan": _features(lambda a: a["mel"].__setitem__((0, 0, 0), np.nan)),
             "mel-int": _features(lambda a: a.__setitem__("mel", a["mel"].astype(np.int32))),
             "mel-short": _features(lambda a: a.update(mel=a["mel"][:3], energy=a["energy"][:3])),
             "energy-length": _features(lambda a: a.__setitem__("energy", a["energy"][:-1])),
             "visemes-width": arr("visemes", np.zeros((6, 3), np.float32)),
             "meta-format": arr("meta", np.array(json.dumps({"format": "avatar-audio-features/9"}))),
             "meta-junk": arr("meta", np.array("{not json")),
             "object-array": lambda p, r: _npz(mel=np.array([{"a": 1}], dtype=object))}
    for label, fn in feats.items():
        cases.append(_file_case(f"features-{label}", "audio_features.npz", fn))

    def npy(a) -> Callable:
        def content(path, rng):
            buf = io.BytesIO()
            np.save(buf, a(np.load(path)) if callable(a) else a)
            return buf.getvalue()
        return content

    lms = {"frames": npy(lambda a: a[:-1]), "points": npy(lambda a: a[:, :68]), "nan": npy(lambda a: np.where(
           np.arange(a.size).reshape(a.shape) == 7, np.nan, a)), "2d": npy(lambda a: a[:, :, 0]),
           "int": npy(lambda a: a.astype(np.int32)), "junk": _junk(4000), "empty": lambda p, r: b"",
           "deleted": lambda p, r: None}
    for label, fn in lms.items():
        cases.append(_file_case(f"landmarks-{label}", "landmarks.npy", fn))
    geo = {"junk": _junk(2000), "no-canonical": lambda p, r: _npz(focal=np.float32(40)),
           "shape": lambda p, r: _npz(canonical=np.zeros((10, 3), np.float32)),
           "nan": lambda p, r: _npz(canonical=np.full((478, 3), np.nan, np.float32)), "deleted": lambda p, r: None}
    for label, fn in geo.items():
        cases.append(_file_case(f"face_geometry-{label}", "face_geometry.npz", fn))

    def transforms_folder(fx: Fixtures, target: Path) -> None:
        target.mkdir()
        (target / "transforms.json").mkdir()

    return cases + _not_a_folder("dataset", "ds", _train_argv, {"transforms-folder": transforms_folder})


def _not_a_folder(kind: str, name: str, argv: Callable[[Path, Path], list[str]],
                  others: dict[str, Callable[[Fixtures, Path], None]]) -> list[Case]:
    """Cases where the folder a command takes is missing, a file, or one of `others`
    (maker of a wrong folder at the target path)."""
    makers = {"missing": lambda fx, target: None, "file": lambda fx, target: target.write_text("not a folder"),
              **others}

    def case(label: str, make: Callable[[Fixtures, Path], None]) -> Case:
        def build(fx: Fixtures, ws: Path):
            make(fx, ws / name)
            return argv(ws / name, ws), str(ws / name)
        return Case(f"{kind}/folder-{label}", build)

    return [case(label, make) for label, make in makers.items()]


# ---------------------------------------------------------------- checkpoints --------------

def _ckpt_case(name: str, make: Callable[[Path, np.random.Generator], None]) -> Case:
    """A copy of the trained avatar whose checkpoint `make` spoils (in place)."""
    def build(fx: Fixtures, ws: Path):
        avatar = ws / "avatar"
        shutil.copytree(fx.avatar, avatar)
        make(avatar / "checkpoint.safetensors", _rng(name))
        (ws / "out.ply").write_bytes(b"an earlier export, to keep")
        return ["export", str(avatar), "--ply", str(ws / "out.ply")], str(avatar)
    return Case(f"checkpoint/{name}", build)


def _rewrite(edit: Callable[[dict, dict], None]) -> Callable[[Path, np.random.Generator], None]:
    """Load the checkpoint, let `edit(tensors, metadata)` change it, save it back."""
    def make(path: Path, rng) -> None:
        from safetensors import safe_open
        from safetensors.torch import load_file, save_file

        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
        tensors = load_file(str(path))
        edit(tensors, metadata)
        save_file(tensors, str(path), metadata=metadata)
    return make


def checkpoint_keys(fx: Fixtures) -> dict[str, bool]:
    """The trained avatar's checkpoint tensor names -> whether the tensor holds floating-point
    values (at least one: a NaN can be written into it)."""
    from safetensors import safe_open

    with safe_open(str(fx.avatar / "checkpoint.safetensors"), framework="pt") as f:
        return {k: f.get_slice(k).get_dtype().startswith(("F", "BF")) and math.prod(f.get_slice(k).get_shape()) > 0
                for k in sorted(f.keys())}


def checkpoint_cases(keys: dict[str, bool]) -> list[Case]:
    """keys: checkpoint_keys of the trained avatar."""
    cases = []

    def write(data: Callable[[bytes, np.random.Generator], bytes]):
        return lambda path, rng: path.write_bytes(data(path.read_bytes(), rng))

    for frac in (0.0, 0.01, 0.1, 0.5, 0.9, 0.999):
        cases.append(_ckpt_case(f"truncated-{frac}", write(lambda b, r, f=frac: b[: int(len(b) * f)])))
    cases.append(_ckpt_case("junk", write(lambda b, r: r.integers(0, 256, 10000, dtype=np.uint8).tobytes())))
    cases.append(_ckpt_case("huge-header", write(lambda b, r: struct.pack("<Q", 2**60) + b[8:])))
    cases.append(_ckpt_case("header-junk", write(lambda b, r: b[:8] + b"#" * 20 + b[28:])))
    cases.append(_ckpt_case("flipped-tail", write(lambda b, r: b[:-100] + bytes(x ^ 0xFF for x in b[-100:]))))
    cases.append(_ckpt_case("deleted", lambda p, r: p.unlink()))
    meta_edits = {
        "no-metadata": lambda t, m: m.clear(),
        "metadata-junk": lambda t, m: m.__setitem__("avatar", "{not json"),
        "foreign-format": lambda t, m: m.__setitem__("avatar", json.dumps({**json.loads(m["avatar"]),
                                                                           "format": "gsplat/1"})),
        "no-config": lambda t, m: m.__setitem__("avatar", json.dumps({k: v for k, v in json.loads(m["avatar"]).items()
                                                                      if k != "config"})),
        "config-types": lambda t, m: m.__setitem__("avatar", json.dumps(
            {**json.loads(m["avatar"]), "config": {**json.loads(m["avatar"])["config"], "size": "big"}})),
        "config-list": lambda t, m: m.__setitem__("avatar", json.dumps({**json.loads(m["avatar"]), "config": []})),
        "metadata-array": lambda t, m: m.__setitem__("avatar", "[1, 2]"),
    }
    for label, fn in meta_edits.items():
        cases.append(_ckpt_case(label, _rewrite(fn)))
    model = [k for k in keys if not k.startswith("optim.") and not k.startswith("densify.")]
    floats = [k for k in model if keys[k]]
    for key in floats[:: max(1, len(floats) // 16)]:
        cases.append(_ckpt_case(f"nan-{key}", _rewrite(lambda t, m, k=key: t[k].view(-1).__setitem__(0, float("nan")))))
    for key in model[:: max(1, len(model) // 12)]:
        cases.append(_ckpt_case(f"without-{key}", _rewrite(lambda t, m, k=key: t.pop(k))))
    for key in model[1:: max(1, len(model) // 12)]:
        cases.append(_ckpt_case(f"reshaped-{key}", _rewrite(lambda t, m, k=key: t.__setitem__(
            k, t[k].reshape(-1)[:-1].clone() if t[k].numel() > 1 else torch.full((2, 2, 2), 0.5)))))

    return cases + _not_a_folder("checkpoint", "avatar", lambda target, ws: ["export", str(target), "--ply",
                                                                          str(ws / "out.ply")],
                                 {"dataset": lambda fx, target: shutil.copytree(fx.dataset, target)})


# ---------------------------------------------------------------- speech -------------------

def _wav_bytes(pcm: np.ndarray, rate: int = 16000, subtype: str = "PCM_16") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, pcm, rate, format="WAV", subtype=subtype)
    return buf.getvalue()


def _silent_video(path: Path, seconds: float, noise: bool = False, audio: np.ndarray | None = None) -> None:
    """An H.264 mp4 of grey (or noise) frames at 25 fps, with `audio` at 16 kHz if given."""
    rng = np.random.default_rng(3)
    with av.open(str(path), "w") as out:
        vs = out.add_stream("libx264", rate=25)
        vs.width = vs.height = 96
        vs.pix_fmt = "yuv420p"
        as_ = out.add_stream("aac", rate=16000) if audio is not None else None
        for k in range(int(seconds * 25)):
            img = rng.integers(0, 255, (96, 96, 3), np.uint8) if noise else np.full((96, 96, 3), 128, np.uint8)
            out.mux(vs.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        out.mux(vs.encode())
        if as_ is not None:
            frame = av.AudioFrame.from_ndarray(audio.astype(np.float32)[None], format="fltp", layout="mono")
            frame.sample_rate = 16000
            out.mux(as_.encode(frame))
            out.mux(as_.encode())


def _raw_file(stem: str):
    """Builder of builders: a file `<stem><suffix>` holding `data(fixtures, rng)`."""
    def raw(suffix: str, data: Callable[[Fixtures, np.random.Generator], bytes]):
        def build(fx: Fixtures, ws: Path, name: str) -> Path:
            path = ws / f"{stem}{suffix}"
            path.write_bytes(data(fx, _rng(name)))
            return path
        return build
    return raw


def _folder(name: str):
    """A builder of a folder where a file is expected."""
    def build(fx: Fixtures, ws: Path, case: str) -> Path:
        (ws / name).mkdir()
        return ws / name
    return build


def speech_files() -> dict[str, Callable[[Fixtures, Path], Path]]:
    """name -> builder of a bad speech file inside a workspace."""
    raw = _raw_file("bad_speech")

    def good(fx: Fixtures) -> bytes:
        return fx.speech.read_bytes()

    def video(fx: Fixtures, ws: Path, name: str) -> Path:
        path = ws / "bad_speech.mp4"
        _silent_video(path, 1.0)
        return path

    return {
        "empty": raw(".wav", lambda fx, r: b""),
        "junk-small": raw(".wav", lambda fx, r: r.integers(0, 256, 40, dtype=np.uint8).tobytes()),
        "junk-large": raw(".wav", lambda fx, r: r.integers(0, 256, 200_000, dtype=np.uint8).tobytes()),
        "junk-mp3": raw(".mp3", lambda fx, r: r.integers(0, 256, 30_000, dtype=np.uint8).tobytes()),
        "header-only": raw(".wav", lambda fx, r: good(fx)[:44]),
        "half-header": raw(".wav", lambda fx, r: good(fx)[:20]),
        "no-samples": raw(".wav", lambda fx, r: _wav_bytes(np.zeros(0, np.float32))),
        "silent": raw(".wav", lambda fx, r: _wav_bytes(np.zeros(32000, np.float32))),
        "dc-offset": raw(".wav", lambda fx, r: _wav_bytes(np.full(32000, 0.5, np.float32))),
        "too-short": raw(".wav", lambda fx, r: _wav_bytes(
            sf.read(io.BytesIO(good(fx)), dtype="float32")[0][:800])),
        "nan-float": raw(".wav", lambda fx, r: _wav_bytes(np.full(32000, np.nan, np.float32), subtype="FLOAT")),
        "inf-float": raw(".wav", lambda fx, r: _wav_bytes(np.full(32000, np.inf, np.float32), subtype="FLOAT")),
        "text": raw(".mp3", lambda fx, r: b"this is not audio\n" * 50),
        "png": raw(".wav", lambda fx, r: _png(np.zeros((16, 16, 3), np.uint8))),
        "video-no-audio": video,
        "folder": _folder("speech_folder"),
        "missing": lambda fx, ws, name: ws / "nowhere.wav",
    }


def speech_cases() -> list[Case]:
    cases = []
    for label, make in speech_files().items():
        def render(fx, ws, make=make, label=label):
            path = make(fx, ws, label)
            (ws / "out.mp4").write_bytes(b"an earlier render, to keep")
            return ["render", str(fx.avatar), "--audio", str(path), "--out", str(ws / "out.mp4"),
                    "--camera", "orbit"], path.name

        def drive(fx, ws, make=make, label=label):
            path = make(fx, ws, label)
            return ["eval", str(fx.avatar), "--drive", str(path)], path.name

        cases += [Case(f"speech/render/{label}", render), Case(f"speech/drive/{label}", drive)]
    return cases


# ---------------------------------------------------------------- videos -------------------

def video_files() -> dict[str, Callable[[Fixtures, Path], Path]]:
    """name -> builder of a bad video inside a workspace."""
    raw = _raw_file("bad_video")

    def synth(seconds: float, noise: bool, with_audio: bool):
        def build(fx: Fixtures, ws: Path, name: str) -> Path:
            path = ws / "bad_video.mp4"
            pcm = sf.read(str(fx.speech), dtype="float32")[0] if with_audio else None
            if pcm is not None and pcm.ndim == 2:
                pcm = pcm.mean(1)
            _silent_video(path, seconds, noise, None if pcm is None else np.tile(pcm, 3)[: int(seconds * 16000)])
            return path
        return build

    return {
        "empty": raw(".mp4", lambda fx, r: b""),
        "junk": raw(".mp4", lambda fx, r: r.integers(0, 256, 50_000, dtype=np.uint8).tobytes()),
        "truncated-1pct": raw(".mp4", lambda fx, r: fx.video.read_bytes()[: len(fx.video.read_bytes()) // 100]),
        "truncated-10pct": raw(".mp4", lambda fx, r: fx.video.read_bytes()[: len(fx.video.read_bytes()) // 10]),
        "text": raw(".mp4", lambda fx, r: b"not a video\n" * 100),
        "png": raw(".png", lambda fx, r: _png(np.zeros((64, 64, 3), np.uint8))),
        "audio-only": raw(".wav", lambda fx, r: fx.speech.read_bytes()),
        "too-short": synth(1.0, False, True),
        "no-audio": synth(3.5, False, False),
        "no-face": synth(3.5, True, True),
        "folder": _folder("video_folder"),
        "missing": lambda fx, ws, name: ws / "nowhere.mp4",
    }


def video_cases() -> list[Case]:
    cases = []
    for label, make in video_files().items():
        for keep in (False, True):
            def build(fx, ws, make=make, label=label, keep=keep):
                path = make(fx, ws, label)
                argv = ["capture", str(path), "--out", str(ws / "ds"), "--size", "128"]
                if keep:  # an earlier dataset at --out must survive a failed --force
                    shutil.copytree(fx.dataset, ws / "ds")
                    argv.append("--force")
                return argv, path.name
            cases.append(Case(f"video/{label}{'/over-old-dataset' if keep else ''}", build))
    return cases


# ---------------------------------------------------------------- jobs ---------------------

def job_cases() -> list[Case]:
    def case(label: str, text: str | bytes | None) -> Case:
        def build(fx: Fixtures, ws: Path):
            path = ws / "job.toml"
            body = (text.replace("{speech}", str(fx.speech)).replace("{video}", str(fx.video))
                    if isinstance(text, str) else text)
            if body is None:
                path.mkdir()
            elif isinstance(body, bytes):
                path.write_bytes(body)
            else:
                path.write_text(body)
            return ["run", str(path), "--out", str(ws / "job")], "job.toml"
        return Case(f"job/{label}", build)

    ok_input = '[input]\nvideo = "{video}"\n'
    variants = {
        "toml-unclosed": "[input\n", "toml-bad-value": "[input]\nvideo = \n", "toml-duplicate": ok_input + ok_input,
        "binary": b"\x00\xff\xfe\x80" * 20, "empty": "", "folder": None,
        "unknown-section": ok_input + "[trian]\n", "no-input": "[train]\npreset = \"demo\"\n",
        "two-inputs": '[input]\nvideo = "{video}"\nsample = true\n',
        "video-missing": '[input]\nvideo = "nowhere.mp4"\n', "video-number": "[input]\nvideo = 5\n",
        "sample-string": '[input]\nsample = "yes"\n', "ernerf-missing": '[input]\nernerf = "nowhere"\n',
        "input-unknown-key": ok_input + "camera = 1\n",
        "capture-unknown-key": ok_input + "[capture]\nfsp = 25\n",
        "capture-fps-string": ok_input + '[capture]\nfps = "fast"\n',
        "capture-size-negative": ok_input + "[capture]\nsize = -1\n",
        "capture-audio-missing": ok_input + '[capture]\naudio = "nowhere.wav"\n',
        "capture-features-missing": ok_input + '[capture]\naudio_features = ["nowhere.npy"]\n',
        "capture-focal-prior-zero": ok_input + "[capture]\nfocal_prior_fov_deg = 0\n",
        "train-preset": ok_input + '[train]\npreset = "fast"\n',
        "train-unknown-key": ok_input + "[train]\niterationz = 5\n",
        "train-iterations-string": ok_input + '[train]\niterations = "many"\n',
        "train-iterations-negative": ok_input + "[train]\niterations = -5\n",
        "train-size-float": ok_input + "[train]\nsize = 64.5\n",
        "render-audio-number": ok_input + "[render]\naudio = 5\n",
        "render-audio-missing": ok_input + '[render]\naudio = ["nowhere.wav"]\n',
        "render-camera": ok_input + '[render]\naudio = ["{speech}"]\ncamera = "sideways"\n',
        "render-camera-number": ok_input + "[render]\ncamera = 3\n",
        "render-size-string": ok_input + '[render]\nsize = "big"\n',
        "render-size-zero": ok_input + "[render]\nsize = 0\n",
        "render-unknown-key": ok_input + "[render]\nvoice = 1\n",
        "render-torso": ok_input + '[render]\ntorso = "2d"\n',
        "render-torso-number": ok_input + "[render]\ntorso = 3\n",
        "eval-enabled-string": ok_input + '[eval]\nenabled = "yes"\n',
        "eval-unknown-key": ok_input + "[eval]\nfast = true\n",
        "job-out-number": ok_input + "[job]\nout = 5\n",
        "section-not-table": 'input = "x"\n',
    }
    return [case(k, v) for k, v in variants.items()]


# ---------------------------------------------------------------- running ------------------

def all_cases(fx_keys: dict[str, bool]) -> list[Case]:
    """Every case, in a fixed order. fx_keys: checkpoint_keys of the trained avatar."""
    return dataset_cases() + checkpoint_cases(fx_keys) + speech_cases() + video_cases() + job_cases()


def sample(cases: list[Case]) -> list[Case]:
    """The fixed subset CI runs."""
    return cases[::SAMPLE_EVERY]


def _snapshot(*roots: Path) -> dict[str, tuple]:
    out = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                p = Path(dirpath) / name
                st = p.lstat()
                out[str(p)] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return out


def run_case(case: Case, fx: Fixtures, workspace: Path) -> str | None:
    """Run one case; None when it behaves, else what went wrong."""
    from avatar.cli import main

    workspace.mkdir(parents=True)
    argv, names = case.build(fx, workspace)
    fixture_roots = [fx.avatar, fx.video.parent, fx.speech.parent, fx.dataset]
    before = _snapshot(workspace, *fixture_roots)
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse
            code = exc.code
        except BaseException as exc:  # noqa: BLE001 - reported, not raised
            code = f"raised {type(exc).__name__}: {exc}"
    text = err.getvalue()
    after = _snapshot(workspace, *fixture_roots)
    problems = []
    if code != 1:
        problems.append(f"exit {code!r}, expected 1")
    if "Traceback" in text:
        problems.append("printed a traceback")
    error_lines = [line for line in text.splitlines() if line.startswith("error: ")]
    if not error_lines:
        problems.append("no 'error:' line")
    elif names not in error_lines[0]:
        problems.append(f"the error does not name {names!r}")
    added = sorted(set(after) - set(before))
    changed = sorted(k for k in before if k in after and before[k] != after[k])
    removed = sorted(set(before) - set(after))
    if added:
        problems.append(f"left behind {[os.path.relpath(p, workspace) for p in added][:3]}")
    if changed or removed:
        problems.append(f"changed {[os.path.relpath(p, workspace) for p in changed + removed][:3]}")
    return None if not problems else f"{case.name}: {'; '.join(problems)}\n    stderr: {text.strip()[-400:]}"


def make_fixtures(root: Path) -> Fixtures:
    """Valid inputs for script mode: the sample subject captured at 128 px, a tiny avatar
    trained on it, a synthetic speech file and a small synthetic dataset."""
    from _scenes import TINY_TRAIN
    from capture.config import CaptureConfig
    from capture.pipeline import run_capture
    from recon.config import preset
    from recon.engine import train
    from scenes.sample import SampleConfig, generate_sample
    from scenes.speech import synthesize

    generate_sample(root / "sample", SampleConfig(seconds=3.2, size=256, seed=1))
    captured = run_capture(CaptureConfig(video=root / "sample" / "sample.mp4", out=root / "captured", size=128))
    train(captured, root / "avatar", preset("cpu", **TINY_TRAIN), progress=False)
    (root / "speech").mkdir()
    sf.write(root / "speech" / "speech.wav", synthesize(2.3, seed=5).pcm, 16000)
    make_dataset(root / "dataset", n=6, size=32, landmarks=True)
    return Fixtures(root / "avatar", root / "sample" / "sample.mp4", root / "speech" / "speech.wav", root / "dataset")


def main() -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sample", action="store_true", help="only the fixed sample CI runs")
    parser.add_argument("--only", help="only cases whose name contains this text")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="avatar-fuzz-") as tmp:
        tmp = Path(tmp)
        os.environ["AVATAR_LOG_DIR"] = str(tmp / "logs")
        print("making the valid inputs (capture and a tiny training run) ...", file=sys.stderr)
        fx = make_fixtures(tmp / "fixtures")
        cases = all_cases(checkpoint_keys(fx))
        if args.sample:
            cases = sample(cases)
        if args.only:
            cases = [c for c in cases if args.only in c.name]
        failures = []
        for k, case in enumerate(cases):
            problem = run_case(case, fx, tmp / "cases" / f"{k:04d}")
            shutil.rmtree(tmp / "cases" / f"{k:04d}", ignore_errors=True)
            if problem:
                failures.append(problem)
                print("FAIL", problem, file=sys.stderr)
        kinds: dict[str, int] = {}
        for c in cases:
            kinds[c.name.split("/")[0]] = kinds.get(c.name.split("/")[0], 0) + 1
        print(f"{len(cases)} bad inputs ({', '.join(f'{v} {k}' for k, v in kinds.items())}): "
              f"{len(cases) - len(failures)} handled, {len(failures)} failed")
        return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
