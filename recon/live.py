"""Live speech: the avatar speaks what a microphone hears, a frame at a time, with low
latency (`avatar speak AVATAR --audio SPEECH --realtime` simulates the stream from a file).

The path of a frame: 16 kHz mono chunks -> capture's SpeechStream (a frame's features as
soon as the audio 80 ms past it has arrived, or the whole look-ahead if shorter) ->
RunningCMVN (the speaker's normalisation, learnt as they talk) -> the avatar's
`speech_motion` over the frame's past `speech_reach` frames and as many future ones: those
the rest of the look-ahead completes, then those whose own moment has been heard (their
windows cut short where the audio ends), then the last of them held -> deform ->
rasterize -> encode (JPEG, what a browser shows). Nothing beyond the look-ahead (default
80 ms) is ever read, so a frame's earliest moment is its sound plus the look-ahead.

The look-ahead trades latency for articulation: MotionNet's codes depend on speech up to
`speech_reach` frames ahead (lips move before the sound they make). Measured on a 13 s
and a 40 s voice through an HDTF avatar, the correlation of the streamed lip gap with the
offline one on the whole file: 0.57 and 0.65 at 80 ms, 0.83 and 0.84 at 160 ms, 0.91 and
0.92 at 240 ms (the rest: the running normalisation and the streaming visemes). Held-out
face PSNR driven by the clip's own speech streamed (eval's `live_speech`) falls by 0.99 and
0.62 dB at 80 ms (HDTF, the 20 s clip), 0.23 and 0.25 dB at 160 ms, 0.08 and 0.22 dB at
240 ms. A MotionNet trained on a frame's own and
earlier speech only (its convolutions cut at the present) did no better at 80 ms (0.80 dB,
and its lip gap uncorrelated with the offline net's on other voices): the lips move
before the sound, which a stream has not yet heard.

Latency is measured per frame from the moment its sound reached the microphone (the
stream's clock: frame k's sound is at k / fps) to its JPEG, split into
  buffering   until the chunk that completes the look-ahead has arrived,
  queue       that chunk waiting while an earlier frame rendered,
  features, motion, deform, rasterize, encode.
When frames become ready faster than they render, only the newest is rendered (a live
view skips, it does not fall behind); the sustained frame rate counts those rendered.
"""

from __future__ import annotations

import queue
import statistics
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import Tensor

from avatar.dataset_format import SAMPLE_RATE
from avatar.errors import AvatarError
from avatar.media import write_mp4

from .avatar_dir import load_avatar
from .conditioning import RunningCMVN, blink_schedule, load_speech
from .method import TrainedAvatar
from .render import CameraRig, behind, open_dataset, scaled

STAGES = ("buffering", "queue", "features", "motion", "deform", "rasterize", "encode")


@dataclass
class LiveFrame:
    """One video frame of live speech, ready to render."""

    index: int
    codes: Tensor  # [C] motion codes
    eye: float  # eye openness
    heard_s: float  # audio received (stream seconds) when it became ready
    ms: dict = field(default_factory=dict)  # features and motion cost (milliseconds)


class LiveSpeech:
    """A live speech stream -> motion codes of each video frame, causally (module docstring).

    av: the trained avatar (speech_motion, speech_reach, fps); lookahead_s: how far past a
    frame its features may look; prior_mel: [N, 16, 80] log-mel windows of the subject's
    clip (the normalisation's prior), or None; seed: of the natural blinks.
    """

    FEATURE_LOOKAHEAD_S = 0.08
    """How far past a frame its own features reach (the log-mel window's later half)."""

    def __init__(self, av: TrainedAvatar, lookahead_s: float = 0.08, prior_mel: np.ndarray | None = None,
                 seed: int = 0):
        from capture import SpeechStream

        av.check_speech()
        self.av = av
        self.stream = SpeechStream(av.fps, min(lookahead_s, self.FEATURE_LOOKAHEAD_S))
        self.cmvn = RunningCMVN(prior_mel)
        # Future frames the rest of the look-ahead lets the motion see (no more than it reaches).
        self.ahead = min(int((max(lookahead_s - self.FEATURE_LOOKAHEAD_S, 0.0) + 1e-9) * av.fps), av.speech_reach)
        self.heard: deque[dict] = deque(maxlen=av.speech_reach + 1 + self.ahead)  # frames with features
        self.next = 0  # the next frame to give codes to
        self.blinks = blink_schedule(int(600 * av.fps), av.fps, seed)  # ten minutes, then again

    def push(self, pcm: np.ndarray) -> list[LiveFrame]:
        """Frames made ready by a chunk of pcm [n] (float, 16 kHz mono), in order."""
        t = time.perf_counter()
        ready = self.stream.push(pcm)
        return self._motion(ready, (time.perf_counter() - t) * 1000, end=False)

    def flush(self) -> list[LiveFrame]:
        """The frames left once the stream has ended."""
        t = time.perf_counter()
        ready = self.stream.flush()
        return self._motion(ready, (time.perf_counter() - t) * 1000, end=True)

    def _motion(self, ready: list[dict], features_ms: float, end: bool) -> list[LiveFrame]:
        """Codes of the frames the newly `ready` ones complete: each heard in turn (the
        window keeps just what the next frame needs), then at the end the rest."""
        out = []
        for f in ready:
            t = time.perf_counter()
            f["mel_norm"] = self.cmvn(f["mel"])
            self.heard.append(f)
            out += self._drain(False, features_ms / len(ready) + (time.perf_counter() - t) * 1000)
        return out + (self._drain(True, 0.0) if end else [])

    def _drain(self, end: bool, features_ms: float) -> list[LiveFrame]:
        """Codes of every frame whose future (`ahead` frames, or at the end what there is)
        has been heard."""
        out = []
        newest = self.heard[-1]["index"] if self.heard else -1
        while self.heard and (self.next + self.ahead <= newest or (end and self.next <= newest)):
            t = time.perf_counter()
            window = [f for f in self.heard if f["index"] >= self.next - self.av.speech_reach]
            at = self.next - window[0]["index"]
            window += self._heard_ahead(at + self.av.speech_reach + 1 - len(window), end)
            feats = {"mel": np.stack([w["mel"] for w in window]),
                     "mel_norm": torch.stack([w["mel_norm"] for w in window]),
                     "visemes": np.stack([w["visemes"] for w in window]),
                     "energy": np.array([w["energy"] for w in window], np.float32)}
            with torch.no_grad():
                codes = self.av.speech_motion(feats)[at]
            out.append(LiveFrame(self.next, codes, float(self.blinks[self.next % len(self.blinks)]),
                                 self.heard[-1]["heard_s"], {"features": features_ms,
                                                             "motion": (time.perf_counter() - t) * 1000}))
            self.next += 1
        return out

    def _heard_ahead(self, count: int, end: bool) -> list[dict]:
        """`count` frames past the newest whose look-ahead is in: those whose own moment
        has been heard, from what has (SpeechStream.peek), then the last of them held."""
        out, last = [], self.heard[-1]
        k = last["index"] + 1
        while len(out) < count and not end and k / self.av.fps * SAMPLE_RATE <= self.stream.received:
            f = self.stream.peek(k)
            out.append({**f, "mel_norm": self.cmvn.normalize(f["mel"])})
            k += 1
        return out + [out[-1] if out else last] * (count - len(out))


def stream_codes(av: TrainedAvatar, pcm: np.ndarray, lookahead_s: float = 0.08, prior_mel: np.ndarray | None = None,
                 chunk_ms: float = 20.0) -> Tensor:
    """[N, C] the motion codes a live stream gives every frame of `pcm` (16 kHz mono),
    delivered in `chunk_ms` chunks: as `speak` and the studio's microphone drive the
    avatar, for scoring against the offline codes."""
    live = LiveSpeech(av, lookahead_s, prior_mel)
    chunk = max(1, int(round(chunk_ms / 1000 * SAMPLE_RATE)))
    frames = [f for start in range(0, len(pcm), chunk) for f in live.push(pcm[start: start + chunk])] + live.flush()
    return torch.stack([f.codes for f in frames])


class LiveRenderer:
    """Renders live frames into one camera (yaw, pitch degrees from the capture's mean
    view) at `size`, over the 3D torso where the avatar has one, and encodes them."""

    def __init__(self, av: TrainedAvatar, size: int, yaw: float = 0.0, pitch: float = 0.0, jpeg_quality: int = 90):
        self.av, self.size, self.quality = av, size, jpeg_quality
        self.viewmat = CameraRig(av, None).at(yaw, pitch)
        self.K, plate = scaled(av, size)
        with torch.no_grad():
            self.under = behind(av, "3d" if av.has_torso else "none", self.viewmat, self.K, size, plate)

    def render(self, frame: LiveFrame) -> tuple[np.ndarray, bytes, dict]:
        """(image [S, S, 3] uint8 RGB, its JPEG, {deform, rasterize, encode} milliseconds)."""
        ms = {}
        with torch.no_grad():
            t = time.perf_counter()
            eye = torch.tensor([[frame.eye]], device=self.av.device)
            pose = self.av.deform(frame.codes[None].to(self.av.device), eye)[0]
            t, ms["deform"] = time.perf_counter(), (time.perf_counter() - t) * 1000
            image, _ = self.av.render_head(pose, self.viewmat, self.K, self.size).over(self.under)
            rgb = (image.clamp(0, 1) * 255 + 0.5).to(torch.uint8).cpu().numpy()  # host: to the encoder
            t, ms["rasterize"] = time.perf_counter(), (time.perf_counter() - t) * 1000
        ok, jpeg = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, self.quality])
        ms["encode"] = (time.perf_counter() - t) * 1000
        return rgb, jpeg.tobytes(), ms


def speak(avatar: str | Path, audio: str | Path, realtime: bool = True, lookahead_s: float = 0.08,
          size: int | None = None, chunk_ms: float = 20.0, out: str | Path | None = None,
          device: torch.device | str = "cpu") -> dict:
    """Stream a speech file through the live path, as a microphone would deliver it: in
    `chunk_ms` chunks, at its own pace (`realtime`), or all at once with every frame
    rendered (throughput; the latencies are then not a microphone's). Returns
    the report: frames rendered and skipped, the sustained frame rate, and the median
    and 90th-percentile latency per stage (module docstring); `out`: the frames shown,
    each held until the next, as an mp4 with the speech."""
    av = load_avatar(avatar, device)
    av.check_speech()
    size = size or av.size
    if out is not None and size % 2:
        raise AvatarError(Path(out), f"--size {size} must be even (H.264 needs even frame sizes)")
    pcm = load_speech(Path(audio), av.fps)
    ds = open_dataset(av, size, required=False)
    live = LiveSpeech(av, lookahead_s, None if ds is None else ds.features["mel"])
    renderer = LiveRenderer(av, size)
    chunk = max(1, int(round(chunk_ms / 1000 * SAMPLE_RATE)))
    chunks: queue.Queue = queue.Queue()
    t0 = time.perf_counter()

    def microphone() -> None:  # delivers each chunk once its last sample has been "spoken"
        for start in range(0, len(pcm), chunk):
            end = min(start + chunk, len(pcm))
            if realtime:
                time.sleep(max(0.0, t0 + end / SAMPLE_RATE - time.perf_counter()))
            chunks.put((time.perf_counter(), pcm[start:end]))
        chunks.put(None)

    feeder = threading.Thread(target=microphone, daemon=True)
    feeder.start()
    rows, shown, skipped, ended = [], [], 0, False
    while not ended:
        pending = [chunks.get()]
        while not chunks.empty():
            pending.append(chunks.get())
        ready: list[tuple[LiveFrame, float, float]] = []  # (frame, chunk arrival, push start)
        for item in pending:
            start = time.perf_counter()
            if item is None:
                ended = True
                frames = live.flush()
                arrived = start
            else:
                arrived, samples = item
                frames = live.push(samples)
            ready += [(f, arrived, start) for f in frames]
        if not ready:
            continue
        if realtime:  # the newest: a live view skips rather than lags
            skipped += len(ready) - 1
            ready = ready[-1:]
        for frame, arrived, start in ready:
            rgb, _, ms = renderer.render(frame)
            done = time.perf_counter()
            sound = t0 + frame.index / av.fps
            rows.append({"index": frame.index, "total": (done - sound) * 1000, "buffering": (arrived - sound) * 1000,
                         "queue": (start - arrived) * 1000, **frame.ms, **ms})
            if out is not None:  # kept for the video only: minutes of frames are hundreds of MB
                shown.append((frame.index, rgb))
    seconds = len(pcm) / SAMPLE_RATE
    report = {"avatar": str(avatar), "audio": str(audio), "realtime": realtime, "lookahead_ms": lookahead_s * 1000,
              "size": size, "device": str(av.device), "frames": len(rows) + skipped, "rendered": len(rows),
              "skipped": skipped, "seconds": round(seconds, 2),
              "sustained_fps": round(len(rows) / max(seconds if realtime else time.perf_counter() - t0, 1e-9), 2),
              "latency_ms": {stage: _spread([r[stage] for r in rows]) for stage in ("total", *STAGES)}}
    if out is not None:
        report["video"] = str(_write_shown(out, shown, len(rows) + skipped, av.fps, pcm))
    return report


def _spread(values: list[float]) -> dict:
    if not values:
        raise AvatarError(None, "no frame was rendered", "give speech of at least one video frame")
    return {"median": round(statistics.median(values), 1), "p90": round(float(np.percentile(values, 90)), 1)}


def _write_shown(out: str | Path, shown: list[tuple[int, np.ndarray]], frames: int, fps: float,
                 pcm: np.ndarray) -> Path:
    """The frames a live view showed, each held until the next, with the speech."""
    def video():
        j = 0
        for k in range(frames):
            while j + 1 < len(shown) and shown[j + 1][0] <= k:
                j += 1
            yield shown[j][1]

    return write_mp4(out, video(), fps, audio=pcm)
