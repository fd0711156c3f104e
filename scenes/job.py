"""Job configs: one TOML file runs the whole pipeline, video -> dataset -> avatar ->
renders + evaluation, each stage reusing what an earlier run already finished.

    avatar run scenes/phone_video.toml          # your own clip
    avatar run scenes/ernerf_dataset.toml       # a dataset you made with ER-NeRF
    avatar run my_rig.toml                      # [input] rig = "rig/", [capture] calib = "CALIB.json"
    avatar demo                                 # scenes/demo.toml on the built-in sample

Format (every key optional except one input; see the three files in scenes/):

    [job]      out = "outputs/me"                working folder: dataset/, avatar/, renders/
    [input]    video = "me.mp4" | rig = "rig/" (a folder, or a composite video with tiles)
               | ernerf = "ER-NeRF/data/obama" | sample = true
    [capture]  CaptureConfig fields (fps, size, audio, ...); for a rig RigCaptureConfig's
               (calib = "CALIB.json", tiles = [[X, Y, W, H], ...], fps, size, audio)
    [train]    method = "gaussians" | "nerf" (recon/method.py), preset = "cpu" | "gpu" | "demo",
               plus any field of that method's config; for a rig, holdout_cameras = ["NAME", ...]
               (`avatar train --holdout-cameras`: cameras kept out, scored as novel views)
    [render]   audio = ["speech.wav", ...], camera = "orbit" | "dataset" | "dataset:CAMERA" | "fixed:YAW,PITCH", size
    [eval]     enabled = true

Relative paths are taken from the current directory; "{out}" stands for the job's folder.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING

from avatar.errors import AvatarError
from avatar.io import file_digest, write_json

if TYPE_CHECKING:
    import torch

JOB_DIR = Path(__file__).resolve().parent
RENDER_INPUTS_FORMAT = "avatar-render-inputs/1"


@dataclass
class JobConfig:
    """One pipeline run."""

    out: Path
    """Working folder; holds dataset/, avatar/ and renders/."""
    video: Path | None = None
    """Talking-head video to capture."""
    rig: Path | None = None
    """A rig to capture (capture/multiview.py): one video or image folder per camera, or a
    composite video with [capture] tiles."""
    ernerf: Path | None = None
    """An ER-NeRF / TalkingGaussian preprocessed folder to import instead of a video."""
    sample: bool = False
    """Generate the built-in sample subject and capture it (the demo)."""
    capture: dict = field(default_factory=dict)
    """CaptureConfig fields (fps, size, audio, crop_scale, ...)."""
    train: dict = field(default_factory=dict)
    """The method's config fields; "method" picks the method (default gaussians), "preset"
    the base (cpu, gpu, demo)."""
    holdout_cameras: list[str] = field(default_factory=list)
    """Cameras of a rig kept out of training ([train] holdout_cameras), scored as novel views."""
    render_audio: list[Path] = field(default_factory=list)
    """Speech files to render the avatar with."""
    render_camera: str = "orbit"
    """Camera of the renders: dataset, orbit, fixed:YAW,PITCH."""
    render_size: int | None = None
    """Side of the rendered frames (default: the training size)."""
    render_torso: str | None = None
    """Behind the head: 3d, frame or none (recon/render.py; default: 3d when trained)."""
    evaluate: bool = True
    """Score the avatar on held-out frames (avatar eval)."""
    source: Path | None = None
    """The TOML file the job was read from."""


SECTIONS = {"job": {"out"}, "input": {"video", "rig", "ernerf", "sample"}, "capture": None, "train": None,
            "render": {"audio", "camera", "size", "torso"}, "eval": {"enabled"}}
"""Each section's keys ([capture] and [train] take their config's fields)."""


def _typed(path: Path, where: str, value, kind: type | tuple[type, ...], what: str):
    if isinstance(value, bool) and kind is not bool:
        ok = False
    else:
        ok = isinstance(value, kind)
    if not ok:
        raise AvatarError(path, f"{where} must be {what}, got {value!r}")
    return value


def load_job(path: str | Path, out: str | Path | None = None) -> JobConfig:
    """Read and check a job TOML (sections, keys, types, the [capture] and [train]
    settings, the camera); AvatarError naming the file when anything is wrong. Whether
    the input files exist is checked by `check_inputs`, before a run starts."""
    from capture.config import CaptureConfig
    from recon.render import TORSO_MODES, parse_camera

    path = Path(path)
    try:
        d = tomllib.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError as exc:
        raise AvatarError(path, "job config not found") from exc
    except IsADirectoryError as exc:
        raise AvatarError(path, "is a folder, not a job TOML file") from exc
    except UnicodeDecodeError as exc:
        raise AvatarError(path, f"is not a text file ({exc})") from exc
    except tomllib.TOMLDecodeError as exc:
        raise AvatarError(path, f"is not valid TOML ({exc})") from exc
    if set(d) - set(SECTIONS):
        raise AvatarError(path, f"has unknown sections {sorted(set(d) - set(SECTIONS))}; expected {sorted(SECTIONS)}")
    for name, keys in SECTIONS.items():
        section = _typed(path, f"[{name}]", d.get(name, {}), dict, "a table")
        if keys is not None and set(section) - keys:
            raise AvatarError(path, f"[{name}] has unknown keys {sorted(set(section) - keys)}; expected {sorted(keys)}")
    job, inp, render = d.get("job", {}), d.get("input", {}), d.get("render", {})
    out_dir = Path(out or _typed(path, "[job] out", job.get("out", f"outputs/{path.stem}"), str, "a folder path"))
    if "out" in job:
        _typed(path, "[job] out", job["out"], str, "a folder path")

    def resolve(where: str, p) -> Path:
        return Path(_typed(path, where, p, str, "a path").replace("{out}", str(out_dir)))

    sources = [k for k in ("video", "rig", "ernerf", "sample") if inp.get(k)]
    if len(sources) != 1:
        raise AvatarError(path, "needs exactly one input: [input] video = ..., rig = ..., ernerf = ..., or sample = true")
    sample = _typed(path, "[input] sample", inp.get("sample", False), bool, "true or false")
    capture = dict(d.get("capture", {}))
    if "audio" in capture:
        capture["audio"] = resolve("[capture] audio", capture["audio"])
    if "audio_features" in capture:
        capture["audio_features"] = [resolve("[capture] audio_features", a)
                                     for a in _typed(path, "[capture] audio_features", capture["audio_features"],
                                                     list, "a list of paths")]
    if "calib" in capture:
        capture["calib"] = resolve("[capture] calib", capture["calib"])
    if "tiles" in capture:
        tiles = _typed(path, "[capture] tiles", capture["tiles"], list, "a list of [X, Y, W, H]")
        if not all(isinstance(t, list) and len(t) == 4 and all(isinstance(v, int) for v in t) for t in tiles):
            raise AvatarError(path, "[capture] tiles must be a list of [X, Y, W, H] (integers, pixels)")
        capture["tiles"] = [tuple(t) for t in tiles]
    config = CaptureConfig
    if "rig" in inp:
        from capture.multiview import RigCaptureConfig as config
    known = {f.name for f in fields(config)} - {"video", "rig", "out"}
    if set(capture) - known:
        raise AvatarError(path, f"[capture] has unknown keys {sorted(set(capture) - known)}"
                                f"{' for a rig' if 'rig' in inp else ''}")
    try:
        config(Path("."), out_dir, **capture).check()
    except ValueError as exc:
        raise AvatarError(path, f"[capture] {exc}") from exc
    train = dict(d.get("train", {}))
    holdout = _typed(path, "[train] holdout_cameras", train.pop("holdout_cameras", []), list, "a list of camera names")
    if not all(isinstance(name, str) and name for name in holdout):
        raise AvatarError(path, f"[train] holdout_cameras must be a list of camera names, got {holdout!r}")
    holdout = list(dict.fromkeys(holdout))  # a name twice holds out one camera
    _typed(path, "[train] method", train.get("method", ""), str, "a method name")
    _typed(path, "[train] preset", train.get("preset", ""), str, "a preset name")
    try:
        train_config(train)
    except (ValueError, TypeError) as exc:
        raise AvatarError(path, f"[train] is invalid ({exc})") from exc
    audio = render.get("audio", [])
    audio = [audio] if isinstance(audio, str) else _typed(path, "[render] audio", audio, list, "a list of paths")
    camera = _typed(path, "[render] camera", render.get("camera", "orbit"), str, "dataset, orbit or fixed:YAW,PITCH")
    try:
        parse_camera(camera)
    except AvatarError as exc:
        raise AvatarError(path, f"[render] camera {camera!r} is not a camera: use dataset, dataset:CAMERA, orbit or "
                                    "fixed:YAW,PITCH") \
            from exc
    size = render.get("size")
    if size is not None and (not _typed(path, "[render] size", size, int, "a positive integer") or size < 16):
        raise AvatarError(path, f"[render] size must be at least 16 pixels, got {size}")
    torso = render.get("torso")
    if torso is not None and _typed(path, "[render] torso", torso, str, "3d, frame or none") not in TORSO_MODES:
        raise AvatarError(path, f"[render] torso {torso!r} is not a torso mode: use {', '.join(TORSO_MODES)}")
    return JobConfig(
        out=out_dir, video=resolve("[input] video", inp["video"]) if "video" in inp else None,
        rig=resolve("[input] rig", inp["rig"]) if "rig" in inp else None,
        ernerf=resolve("[input] ernerf", inp["ernerf"]) if "ernerf" in inp else None, sample=sample,
        capture=capture, train=train, holdout_cameras=holdout,
        render_audio=[resolve("[render] audio", a) for a in audio],
        render_camera=camera, render_size=size, render_torso=torso,
        evaluate=_typed(path, "[eval] enabled", d.get("eval", {}).get("enabled", True), bool, "true or false"),
        source=path,
    )


def train_config(train: dict) -> tuple[str, object]:
    """(the method's name, its config) of a job's [train] table; ValueError or TypeError
    names an unknown method or preset, or a bad setting."""
    from recon.method import DEFAULT_METHOD, method_class

    opts = dict(train)
    name = opts.pop("method", DEFAULT_METHOD)
    method = method_class(name)
    return method.name, method.config(opts.pop("preset", None), **opts)


def check_inputs(job: JobConfig) -> None:
    """Every input file the job names exists (those under its own folder are made by it)."""
    def made_by_job(p: Path) -> bool:
        return p.resolve().is_relative_to(job.out.resolve())

    wanted = [(job.video, "[input] video", Path.is_file), (job.ernerf, "[input] ernerf", Path.is_dir),
              (job.rig, "[input] rig", Path.exists), (job.capture.get("audio"), "[capture] audio", Path.is_file),
              (job.capture.get("calib"), "[capture] calib", Path.is_file)]
    wanted += [(a, "[capture] audio_features", Path.is_file) for a in job.capture.get("audio_features", [])]
    wanted += [(a, "[render] audio", Path.is_file) for a in job.render_audio]
    for p, where, exists in wanted:
        if p is not None and not made_by_job(p) and not exists(p):
            raise AvatarError(p, f"not found (named by {where} in {job.source})",
                              "fix the path; relative paths are taken from the current directory")


def _say(step: str, text: str) -> None:
    print(f"[{step}] {text}", file=sys.stderr, flush=True)


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def run_job(job: JobConfig, device: torch.device | str = "cpu") -> dict:
    """Run (or finish) every stage of a job, training, rendering and scoring on `device`
    (recon/device.py; capture runs on the host); returns the artifacts and results."""
    from capture.config import CaptureConfig
    from recon.avatar_dir import CHECKPOINT, load_avatar
    from recon.evaluate import eval_inputs, evaluate
    from recon.render import render_video
    from recon.checkpoint import load_checkpoint
    from recon.dataset import Dataset
    from recon.engine import checkpoint_differences, train

    check_inputs(job)
    out = job.out
    result: dict = {"out": str(out), "timings_s": {}}
    t = time.perf_counter()
    dataset = out / "dataset"
    if job.ernerf is not None:
        from capture.ernerf import import_ernerf

        _say("capture", f"importing the ER-NeRF folder {job.ernerf}")
        dataset = import_ernerf(job.ernerf, dataset)
    elif job.rig is not None:
        from capture.multiview import RigCaptureConfig, run_rig_capture

        _say("capture", f"the rig {job.rig} -> {dataset}")
        dataset = run_rig_capture(RigCaptureConfig(rig=job.rig, out=dataset, **job.capture),
                                  progress=sys.stderr.isatty())  # as `avatar capture` shows it
    else:
        from capture.pipeline import run_capture

        video = job.video if job.video is not None else out / "sample" / "sample.mp4"
        _say("capture", f"{video} -> {dataset}")
        dataset = run_capture(CaptureConfig(video=video, out=dataset, **job.capture))
    result["dataset"] = str(dataset)
    result["timings_s"]["capture"] = time.perf_counter() - t

    t = time.perf_counter()
    avatar = out / "avatar"
    method, cfg = train_config(job.train)  # checked by load_job
    if job.holdout_cameras:  # names the dataset lacks are refused before an avatar is moved aside
        Dataset(dataset).split(holdout_cameras=job.holdout_cameras)
    resume = (avatar / CHECKPOINT).is_file()
    steps_done = 0
    if resume:
        saved = load_checkpoint(avatar / CHECKPOINT)[1]
        steps_done = int(saved.get("step", 0))
        _, changed = checkpoint_differences(avatar / CHECKPOINT, saved, cfg, dataset)
        held = sorted(saved.get("holdout_cameras", []))
        if held != sorted(job.holdout_cameras):
            changed.append(f"held-out cameras {held or 'none'} -> {sorted(job.holdout_cameras) or 'none'}")
        if changed:  # a stale avatar is kept aside, not reused and not lost
            previous = out / "avatar.previous"
            _say("train", f"{avatar} was trained with other settings or data ({'; '.join(changed)}); "
                          f"training again, the old avatar moved to {previous}")
            shutil.rmtree(previous, ignore_errors=True)
            avatar.rename(previous)
            resume = False
    if resume and steps_done >= cfg.total_steps:
        _say("train", f"reusing {avatar} (trained, {steps_done} steps)")
    else:
        _say("train", f"{'finishing' if resume else 'training'} {avatar} (method {method}, preset {cfg.preset}, "
                      f"{cfg.total_steps} steps)")
    train(dataset, avatar, cfg, resume=resume, device=device, method=method, holdout_cameras=job.holdout_cameras)
    result["avatar"] = str(avatar)
    result["timings_s"]["train"] = time.perf_counter() - t
    checkpoint = file_digest(avatar / CHECKPOINT)

    t = time.perf_counter()
    result["videos"] = []
    stems = [a.stem for a in job.render_audio]
    for k, audio in enumerate(job.render_audio):
        stem = audio.stem if stems.count(audio.stem) == 1 else f"{audio.stem}-{k + 1}"  # two speech.wav: two videos
        video = out / "renders" / f"{stem}_{job.render_camera.replace(':', '_').replace(',', '_')}.mp4"
        made_from = {"format": RENDER_INPUTS_FORMAT, "checkpoint": checkpoint, "audio": file_digest(audio),
                     "camera": job.render_camera, "size": job.render_size, "torso": job.render_torso}
        record = video.with_suffix(".inputs.json")  # what the video was rendered from
        if video.is_file() and _read_json(record) == made_from:
            _say("render", f"reusing {video}")
        else:
            _say("render", f"{audio} -> {video} (camera {job.render_camera})")
            render_video(avatar, audio, video, camera=job.render_camera, size=job.render_size, torso=job.render_torso,
                         device=device)
            write_json(record, made_from)
        result["videos"].append(str(video))
    result["timings_s"]["render"] = time.perf_counter() - t

    if job.evaluate:
        t = time.perf_counter()
        saved = _read_json(avatar / "eval.json")
        if isinstance(saved, dict) and saved.get("inputs") == eval_inputs(avatar, dataset):
            _say("eval", f"reusing {avatar / 'eval.json'}")
            result["eval"] = saved
        else:
            _say("eval", f"scoring {avatar} on held-out frames")
            result["eval"] = evaluate(avatar, device=device)
        result["timings_s"]["eval"] = time.perf_counter() - t
    load_avatar(avatar)  # the finished avatar opens cleanly
    return result
