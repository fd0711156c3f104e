"""Video output shared by every stage that writes one: H.264 + AAC mp4, audio muxed in.

PyAV is imported by the functions that use it, so that stages which only read a dataset
(training, held-out evaluation) run without the video stack."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path
from typing import Iterable

import numpy as np

from .errors import AvatarError
from .io import atomic_path


def open_media(path: str | Path, what: str, remedy: str):
    """av.open with the project's errors: missing file, or not readable as `what`."""
    import av

    path = Path(path)
    if not path.is_file():
        raise AvatarError(path, "file not found")
    try:
        return av.open(str(path))
    except (av.error.FFmpegError, UnicodeDecodeError, ValueError) as exc:
        raise AvatarError(path, f"cannot be read as {what} ({exc.__class__.__name__}: {exc})", remedy) from exc


def write_mp4(path: str | Path, frames: Iterable[np.ndarray], fps: float, audio: np.ndarray | None = None,
              sample_rate: int = 16_000, crf: int = 18) -> Path:
    """Encode RGB frames ([H, W, 3] uint8, even sizes) and optional mono float audio in [-1, 1].

    Written to a temp file and renamed, so a crash never leaves a broken video behind.
    """
    import av

    path = Path(path)
    with atomic_path(path) as tmp:
        with av.open(str(tmp), "w", format="mp4") as container:
            video = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
            video.pix_fmt = "yuv420p"
            video.options = {"crf": str(crf), "preset": "medium"}
            sound = None
            if audio is not None:
                sound = container.add_stream("aac", rate=sample_rate)
                sound.layout = "mono"
            for i, rgb in enumerate(frames):
                if i == 0:
                    video.height, video.width = rgb.shape[:2]
                for packet in video.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")):
                    container.mux(packet)
            for packet in video.encode():
                container.mux(packet)
            if sound is not None:
                pcm = np.clip(np.asarray(audio, np.float32), -1, 1)[None]
                for start in range(0, pcm.shape[1], 1024):
                    frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(pcm[:, start : start + 1024]),
                                                       format="flt", layout="mono")
                    frame.sample_rate = sample_rate
                    frame.pts = start
                    frame.time_base = Fraction(1, sample_rate)
                    for packet in sound.encode(frame):
                        container.mux(packet)
                for packet in sound.encode():
                    container.mux(packet)
    return path
