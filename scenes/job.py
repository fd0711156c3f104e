"""Job configs: one TOML file runs the whole pipeline, video -> dataset -> avatar ->
renders + evaluation, each stage reusing what an earlier run already finished.

    avatar run scenes/phone_video.toml          # your own clip
    avatar run scenes/ernerf_dataset.toml       # a dataset you made with ER-NeRF
    avatar demo                                 # scenes/demo.toml on the built-in sample

Format (every key optional except one input; see the three files in scenes/):

    [job]      out = "outputs/me"                working folder: dataset/, avatar/, renders/
    [input]    video = "me.mp4" | ernerf = "ER-NeRF/data/obama" | sample = true
    [capture]  CaptureConfig fields (fps, size, audio, ...)
    [train]    preset = "cpu" | "gpu" | "demo", plus any TrainConfig field
    [render]   audio = ["speech.wav", ...], camera = "orbit" | "dataset" | "fixed:YAW,PITCH", size
    [eval]     enabled = true

Relative paths are taken from the current directory; "{out}" stands for the job's folder.
"""

from __future__ import annotations

import sys
import time
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path

from avatar.errors import AvatarError

JOB_DIR = Path(__file__).resolve().parent


@dataclass
class JobConfig:
    """One pipeline run."""

    out: Path
    """Working folder; holds dataset/, avatar/ and renders/."""
    video: Path | None = None
    """Talking-head video to capture."""
    ernerf: Path | None = None
    """An ER-NeRF / TalkingGaussian preprocessed folder to import instead of a video."""
    sample: bool = False
    """Generate the built-in sample subject and capture it (the demo)."""
    capture: dict = field(default_factory=dict)
    """CaptureConfig fields (fps, size, audio, crop_scale, ...)."""
    train: dict = field(default_factory=dict)
    """TrainConfig fields; "preset" picks the base (cpu, gpu, demo)."""
    render_audio: list[Path] = field(default_factory=list)
    """Speech files to render the avatar with."""
    render_camera: str = "orbit"
    """Camera of the renders: dataset, orbit, fixed:YAW,PITCH."""
    render_size: int | None = None
    """Side of the rendered frames (default: the training size)."""
    evaluate: bool = True
    """Score the avatar on held-out frames (avatar eval)."""


def load_job(path: str | Path, out: str | Path | None = None) -> JobConfig:
    """Read a job TOML; AvatarError naming the file when it is malformed."""
    path = Path(path)
    try:
        d = tomllib.loads(path.read_text())
    except FileNotFoundError as exc:
        raise AvatarError(path, "job config not found") from exc
    except tomllib.TOMLDecodeError as exc:
        raise AvatarError(path, f"is not valid TOML ({exc})") from exc
    known = {"job", "input", "capture", "train", "render", "eval"}
    if set(d) - known:
        raise AvatarError(path, f"has unknown sections {sorted(set(d) - known)}; expected {sorted(known)}")
    out_dir = Path(out or d.get("job", {}).get("out", f"outputs/{path.stem}"))

    def resolve(p: str) -> Path:
        return Path(str(p).replace("{out}", str(out_dir)))

    inp = d.get("input", {})
    sources = [k for k in ("video", "ernerf", "sample") if inp.get(k)]
    if len(sources) != 1:
        raise AvatarError(path, "needs exactly one input: [input] video = ..., ernerf = ..., or sample = true")
    render = d.get("render", {})
    audio = render.get("audio", [])
    capture = dict(d.get("capture", {}))
    if "audio" in capture:
        capture["audio"] = resolve(capture["audio"])
    return JobConfig(
        out=out_dir, video=resolve(inp["video"]) if "video" in inp else None,
        ernerf=resolve(inp["ernerf"]) if "ernerf" in inp else None, sample=bool(inp.get("sample", False)),
        capture=capture, train=dict(d.get("train", {})),
        render_audio=[resolve(a) for a in ([audio] if isinstance(audio, str) else audio)],
        render_camera=render.get("camera", "orbit"), render_size=render.get("size"),
        evaluate=bool(d.get("eval", {}).get("enabled", True)),
    )


def _say(step: str, text: str) -> None:
    print(f"[{step}] {text}", file=sys.stderr, flush=True)


def _newer(a: Path, b: Path) -> bool:
    return a.is_file() and b.is_file() and a.stat().st_mtime >= b.stat().st_mtime


def run_job(job: JobConfig) -> dict:
    """Run (or finish) every stage of a job; returns the artifacts and results."""
    from capture.config import CaptureConfig
    from recon.avatar_dir import CHECKPOINT, load_avatar
    from recon.config import preset
    from recon.evaluate import evaluate
    from recon.render import render_video
    from recon.train import train

    out = job.out
    result: dict = {"out": str(out), "timings_s": {}}
    t = time.perf_counter()
    dataset = out / "dataset"
    if job.ernerf is not None:
        from capture.ernerf import import_ernerf

        _say("capture", f"importing the ER-NeRF folder {job.ernerf}")
        dataset = import_ernerf(job.ernerf, dataset)
    else:
        from capture.pipeline import run_capture

        video = job.video if job.video is not None else out / "sample" / "sample.mp4"
        known = {f.name for f in fields(CaptureConfig)} - {"video", "out"}
        if set(job.capture) - known:
            raise AvatarError(Path(str(out)), f"job [capture] has unknown keys {sorted(set(job.capture) - known)}")
        _say("capture", f"{video} -> {dataset}")
        dataset = run_capture(CaptureConfig(video=video, out=dataset, **job.capture))
    result["dataset"] = str(dataset)
    result["timings_s"]["capture"] = time.perf_counter() - t

    t = time.perf_counter()
    avatar = out / "avatar"
    opts = dict(job.train)
    try:
        cfg = preset(opts.pop("preset", "cpu"), **opts)
    except (ValueError, TypeError) as exc:
        raise AvatarError(Path(str(out)), f"job [train] is invalid ({exc})") from exc
    resume = (avatar / CHECKPOINT).is_file()
    _say("train", f"{'finishing' if resume else 'training'} {avatar} (preset {cfg.preset}, {cfg.iterations} steps)")
    train(dataset, avatar, cfg, resume=resume)
    result["avatar"] = str(avatar)
    result["timings_s"]["train"] = time.perf_counter() - t
    ckpt = avatar / CHECKPOINT

    t = time.perf_counter()
    result["videos"] = []
    for audio in job.render_audio:
        video = out / "renders" / f"{audio.stem}_{job.render_camera.replace(':', '_').replace(',', '_')}.mp4"
        if _newer(video, ckpt):
            _say("render", f"reusing {video}")
        else:
            _say("render", f"{audio} -> {video} (camera {job.render_camera})")
            render_video(avatar, audio, video, camera=job.render_camera, size=job.render_size)
        result["videos"].append(str(video))
    result["timings_s"]["render"] = time.perf_counter() - t

    if job.evaluate:
        t = time.perf_counter()
        import json

        if _newer(avatar / "eval.json", ckpt):
            _say("eval", f"reusing {avatar / 'eval.json'}")
            result["eval"] = json.loads((avatar / "eval.json").read_text())
        else:
            _say("eval", f"scoring {avatar} on held-out frames")
            result["eval"] = evaluate(avatar)
        result["timings_s"]["eval"] = time.perf_counter() - t
    load_avatar(avatar)  # the finished avatar opens cleanly
    return result
