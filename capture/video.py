"""Video probing and frame decoding (PyAV), streamed: never the whole clip in memory."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import av
import numpy as np

from avatar.errors import AvatarError
from avatar.media import open_media


@dataclass
class VideoInfo:
    """What the probe learns about an input video."""

    path: str
    width: int  # after rotation
    height: int
    fps: float
    duration: float  # seconds
    frames: int | None  # as declared by the container (may be None)
    rotation: int  # degrees counter-clockwise applied on decode (0, 90, 180, 270)
    codec: str
    audio_rate: int | None
    audio_channels: int | None

    def to_dict(self) -> dict:
        return asdict(self)


def probe_video(path: Path) -> VideoInfo:
    """Read stream metadata; raise :class:`AvatarError` for unreadable input."""
    path = Path(path)
    with open_media(path, "a video", "check that the file is a complete video (mp4, mov, mkv, webm) and re-export it") as container:
        if not container.streams.video:
            raise AvatarError(path, "has no video stream", "pass a video file, not an audio or image file")
        vs = container.streams.video[0]
        fps = float(vs.average_rate or vs.guessed_rate or 0)
        if fps <= 0:
            raise AvatarError(path, "video stream has no frame rate", "re-encode the video (e.g. ffmpeg -i in -r 25 out.mp4)")
        if container.duration:
            duration = container.duration / 1e6
        elif vs.duration and vs.time_base:
            duration = float(vs.duration * vs.time_base)
        else:
            duration = float("nan")
        rotation = 0
        width, height = vs.codec_context.width, vs.codec_context.height
        try:  # rotation is a property of decoded frames (display matrix side data)
            first = next(container.decode(video=0))
            rotation = int(round(getattr(first, "rotation", 0) or 0)) % 360
        except StopIteration:
            raise AvatarError(path, "video stream holds no decodable frame", "the file is empty or truncated") from None
        except av.error.FFmpegError as exc:
            raise AvatarError(path, f"first video frame cannot be decoded ({exc})", "the file is corrupt; re-export it") from exc
        if rotation in (90, 270):
            width, height = height, width
        audio = container.streams.audio[0] if container.streams.audio else None
        return VideoInfo(
            path=str(path), width=width, height=height, fps=fps, duration=duration,
            frames=vs.frames or None, rotation=rotation, codec=vs.codec_context.name,
            audio_rate=audio.rate if audio else None, audio_channels=audio.channels if audio else None,
        )


def _rotate(img: np.ndarray, rotation: int) -> np.ndarray:
    # PyAV reports the counter-clockwise angle needed to display the frame upright.
    return np.ascontiguousarray(np.rot90(img, k=rotation // 90)) if rotation else img


@dataclass
class DecodeStats:
    """Filled while decoding: frame timing, for variable-frame-rate detection."""

    source_frames: int = 0
    interval_mean: float = 0.0
    interval_cv: float = 0.0  # coefficient of variation of frame intervals

    def to_dict(self) -> dict:
        return asdict(self)


def iter_frames(info: VideoInfo, fps: float, stats: DecodeStats | None = None) -> Iterator[tuple[int, float, np.ndarray]]:
    """Decode and resample to `fps` by nearest timestamp.

    Yields (index, time_seconds, rgb uint8 [H, W, 3]) for index 0, 1, ... covering the clip.
    Raises :class:`AvatarError` when the stream breaks off (truncated or corrupt file).
    """
    path = Path(info.path)
    times: list[float] = []
    k = 0
    prev: tuple[float, np.ndarray] | None = None
    n_target = int(math.floor(info.duration * fps + 1e-6)) if math.isfinite(info.duration) else None
    try:
        with av.open(str(path)) as container:
            vs = container.streams.video[0]
            vs.thread_type = "AUTO"
            for frame in container.decode(vs):
                if frame.time is None:
                    continue
                t = float(frame.time)
                times.append(t)
                img = _rotate(frame.to_ndarray(format="rgb24"), info.rotation)
                # Emit every target time whose nearest source frame is known now.
                while n_target is None or k < n_target:
                    tk = k / fps
                    if t < tk:
                        break
                    if prev is not None and abs(prev[0] - tk) <= abs(t - tk):
                        yield k, tk, prev[1]
                    else:
                        yield k, tk, img
                    k += 1
                prev = (t, img)
            if n_target is not None and len(times) < 0.5 * info.duration * info.fps:
                raise AvatarError(path, f"only {len(times)} of ~{info.duration * info.fps:.0f} frames could be "
                                  "decoded: the file is truncated", "re-export or re-download the video")
            while prev is not None and n_target is not None and k < n_target:
                yield k, k / fps, prev[1]  # tail: the last frame covers to the end
                k += 1
    except av.error.FFmpegError as exc:
        raise AvatarError(path, f"decoding failed after {len(times)} frames ({exc}): the file is truncated or corrupt",
                          "re-export or re-download the video") from exc
    if stats is not None and len(times) > 1:
        d = np.diff(np.asarray(times))
        stats.source_frames = len(times)
        stats.interval_mean = float(d.mean())
        stats.interval_cv = float(d.std() / max(d.mean(), 1e-9))
