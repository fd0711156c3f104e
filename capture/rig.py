"""A multi-camera rig on disk: one video, or one folder of images, per camera.

    RIG/
      cam_0.mp4              a camera named "cam_0"
      side/                  a camera named "side": frame images (png, jpg), in name order
      timestamps.csv         optional (caliscope's): sync_index, cam_id, frame_index, frame_time

A composite video (several cameras tiled into one frame, as released multi-view captures
often are) is a rig too: `open_rig(VIDEO, tiles=[(x, y, w, h), ...])` makes one camera
per tile, named tile_0, tile_1, ..., all on the composite's frame clock.

Frames are paired across cameras by their sync index: caliscope's timestamps.csv when
the folder has one (a camera's k-th frame is its k-th row by frame_index; cam_id N is
the camera whose name ends in N), else the frame's position in its stream (cameras
triggered together), shifted by the cameras' start offsets where their sound tracks give
them (`audio_offsets`: phones started by hand). Frames stream; nothing holds a whole video.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np

from avatar.errors import AvatarError

VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".avi", ".webm")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


@dataclass
class RigCamera:
    """One camera of a rig: its name (the file or folder name) and where its frames are."""

    name: str
    path: Path
    width: int
    height: int
    frames: int
    tile: tuple[int, int, int, int] | None = None
    """(x, y, w, h) of this camera's image inside a composite video's frames, else None."""

    def iter_frames(self, rgb: bool = False) -> Iterator[tuple[int, np.ndarray]]:
        """(position, frame) for every frame, in order: grey uint8 [H, W], or with `rgb`
        uint8 [H, W, 3]."""
        if self.path.is_dir():
            for k, image in enumerate(_images(self.path)):
                frame = cv2.imread(str(image), cv2.IMREAD_COLOR if rgb else cv2.IMREAD_GRAYSCALE)
                if frame is None:
                    raise AvatarError(image, "cannot be read as an image", "re-export the frame as png or jpg")
                yield k, cv2.cvtColor(frame, cv2.COLOR_BGR2RGB) if rgb else frame
            return
        import av

        x, y, w, h = self.tile or (0, 0, self.width, self.height)
        try:
            with av.open(str(self.path)) as container:
                for k, frame in enumerate(container.decode(video=0)):
                    yield k, np.ascontiguousarray(frame.to_ndarray(format="rgb24" if rgb else "gray")[y:y + h, x:x + w])
        except av.error.FFmpegError as exc:
            raise AvatarError(self.path, f"decoding failed ({exc}): the file is truncated or corrupt",
                              "re-export the camera's video") from exc


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def _probe(path: Path) -> tuple[int, int, int]:
    """(width, height, frames) of a camera's video or image folder."""
    if path.is_dir():
        images = _images(path)
        first = cv2.imread(str(images[0]), cv2.IMREAD_GRAYSCALE) if images else None
        if first is None:
            raise AvatarError(path, "holds no readable frame image (png or jpg)", "put the camera's frames in it")
        return first.shape[1], first.shape[0], len(images)
    from avatar.media import open_media

    with open_media(path, "a video", "re-export the camera's video (mp4, mov, mkv)") as container:
        if not container.streams.video:
            raise AvatarError(path, "has no video stream", "give one video per camera")
        vs = container.streams.video[0]
        count = vs.frames or sum(1 for _ in container.decode(video=0))
        return vs.codec_context.width, vs.codec_context.height, count


def open_tiles(video: Path, tiles: list[tuple[int, int, int, int]]) -> list[RigCamera]:
    """One camera per tile (x, y, w, h) of a composite video, named tile_0, tile_1, ..."""
    width, height, frames = _probe(video)
    for n, (x, y, w, h) in enumerate(tiles):
        if w <= 0 or h <= 0 or x < 0 or y < 0 or x + w > width or y + h > height:
            raise AvatarError(video, f"tile {n} ({x},{y},{w},{h}) is not inside its {width}x{height} frames",
                              "give each --tile as X,Y,W,H in pixels of the composite frame")
    return [RigCamera(f"tile_{n}", video, w, h, frames, (x, y, w, h)) for n, (x, y, w, h) in enumerate(tiles)]


def open_rig(root: str | Path, min_cameras: int = 2,
             tiles: list[tuple[int, int, int, int]] | None = None) -> list[RigCamera]:
    """The cameras of a rig folder, sorted by name, or of a composite video's `tiles`.
    Refuses a folder that is missing or holds fewer than `min_cameras` cameras."""
    root = Path(root)
    if tiles:
        if not root.is_file():
            raise AvatarError(root, "is not a video file", "--tile cuts cameras out of one composite video: give its path")
        cameras = open_tiles(root, tiles)
        if len(cameras) < min_cameras:
            raise AvatarError(root, f"has {len(cameras)} tile{'s' if len(cameras) != 1 else ''}; a rig needs at least "
                              f"{min_cameras}", "give one --tile X,Y,W,H per camera in the composite")
        return cameras
    if root.is_file() and root.suffix.lower() in VIDEO_SUFFIXES:
        raise AvatarError(root, "is one video, not a rig folder",
                          "put one video per camera in a folder, or give the tiles of a composite with --tile X,Y,W,H")
    if not root.is_dir():
        raise AvatarError(root, "is not a folder", "give a folder with one video (or image folder) per camera")
    entries = sorted(p for p in root.iterdir()
                     if (p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES) or (p.is_dir() and _images(p)))
    cameras = [RigCamera(p.stem if p.is_file() else p.name, p, *_probe(p)) for p in entries]
    names = [c.name for c in cameras]
    if len(set(names)) != len(names):
        raise AvatarError(root, f"two cameras share a name ({', '.join(sorted(n for n in set(names) if names.count(n) > 1))})",
                          "keep one video or image folder per camera name")
    if len(cameras) < min_cameras:
        raise AvatarError(root, f"holds {len(cameras)} camera{'s' if len(cameras) != 1 else ''}; a rig needs at least "
                          f"{min_cameras}", "put one video (or one folder of images) per camera in the folder")
    return cameras


ENVELOPE_HZ = 200
"""Rate of the onset envelopes the audio sync correlates (5 ms steps; the peak is refined
between them)."""
MIN_SYNC_CORRELATION = 0.3
"""The least correlation of two cameras' envelopes at their offset that is taken as a match
(one take through two microphones: 0.5-0.95; two takes of speech: under 0.2)."""
MIN_SYNC_DISTINCTNESS = 2.0
"""How many times the best correlation at lags a quarter second or more from the peak the
peak must be (a match stands out about fourfold; two takes' best lag does not)."""


def has_sound(cam: RigCamera) -> bool:
    """Whether the camera is a video with a sound track."""
    if cam.path.is_dir():
        return False
    import av

    try:
        with av.open(str(cam.path)) as container:
            return bool(container.streams.audio)
    except av.error.FFmpegError:
        return False


def frame_rate(cam: RigCamera, fallback: float) -> float:
    """Frames per second of a camera's video; `fallback` for a folder of images."""
    if cam.path.is_dir():
        return fallback
    import av

    with av.open(str(cam.path)) as container:
        rate = container.streams.video[0].average_rate
    return float(rate) if rate else fallback


def _onsets(pcm: np.ndarray, rate: int) -> np.ndarray:
    """The rises of log loudness at ENVELOPE_HZ (half-wave rectified), zero mean and unit
    variance: sharp, take-specific events, where loudness itself follows speech's rhythm
    and two different takes correlate almost as well as one take with itself."""
    hop = rate // ENVELOPE_HZ
    frames = pcm[: len(pcm) // hop * hop].astype(np.float64).reshape(-1, hop)
    rises = np.maximum(np.diff(np.log(np.mean(frames**2, axis=1) + 1e-8)), 0)
    rises -= rises.mean()
    return rises / (rises.std() + 1e-12)


def audio_offsets(cameras: list[RigCamera], max_shift_s: float = 30.0) -> tuple[list[float], list[float]] | None:
    """(seconds each camera's recording started after the first camera's, the correlation of
    its onset envelope with the first's at that offset) from their sound tracks; None
    when fewer than two cameras have sound. A camera without sound among ones with it, or
    whose sound does not match the first camera's, is an AvatarError."""
    from scipy.signal import correlate, correlation_lags

    from .audio import load_audio
    from avatar.dataset_format import SAMPLE_RATE

    sound = [has_sound(c) for c in cameras]
    if sum(sound) < 2:
        return None
    if not all(sound):
        silent = ", ".join(c.name for c, s in zip(cameras, sound) if not s)
        raise AvatarError(cameras[0].path.parent, f"cameras {silent} have no sound track, so they cannot be synced to "
                          "the others by sound", "record sound on every camera, or add caliscope's timestamps.csv")
    envs = [_onsets(load_audio(c.path), SAMPLE_RATE) for c in cameras]
    offsets, peaks = [0.0], [1.0]
    for cam, env in zip(cameras[1:], envs[1:]):
        r = correlate(envs[0], env, mode="full", method="fft")
        lags = correlation_lags(len(envs[0]), len(env), mode="full")
        # Normalised by the shorter track, so a lag leaving little overlap cannot win on a
        # chance match of a second or two.
        shorter = min(len(envs[0]), len(env))
        overlap = np.minimum(len(envs[0]), len(env) + lags) - np.maximum(0, lags)
        r = np.where((np.abs(lags) <= max_shift_s * ENVELOPE_HZ) & (overlap >= shorter / 2), r / shorter, -np.inf)
        k = int(np.argmax(r))
        elsewhere = np.abs(lags - lags[k]) >= ENVELOPE_HZ // 4
        runner_up = float(r[elsewhere].max()) if np.isfinite(r[elsewhere]).any() else 0.0
        if not np.isfinite(r[k]) or r[k] < MIN_SYNC_CORRELATION or r[k] < MIN_SYNC_DISTINCTNESS * runner_up:
            raise AvatarError(cam.path, f"its sound does not match camera {cameras[0].name}'s (correlation "
                              f"{max(float(r[k]), 0.0):.2f} at best within {max_shift_s:.0f} s, "
                              f"{max(runner_up, 0.0):.2f} elsewhere)",
                              "film every camera of one take, started within the same half minute; or add "
                              "caliscope's timestamps.csv")
        shift = 0.0
        if 0 < k < len(r) - 1 and np.isfinite(r[k - 1]) and np.isfinite(r[k + 1]):  # parabolic refinement
            shift = 0.5 * (r[k - 1] - r[k + 1]) / (r[k - 1] - 2 * r[k] + r[k + 1])
        offsets.append(float(lags[k] + shift) / ENVELOPE_HZ)
        peaks.append(float(r[k]))
    return offsets, peaks


def sync_indices(root: Path, cameras: list[RigCamera]) -> list[np.ndarray]:
    """Per camera, the sync index of each of its frames [frames] (see the module doc)."""
    table = Path(root) / "timestamps.csv"
    if not table.is_file():
        return [np.arange(c.frames) for c in cameras]
    rows: dict[int, list[tuple[int, int]]] = {}
    try:
        with open(table, newline="") as f:
            for row in csv.DictReader(f):
                rows.setdefault(int(row["cam_id"]), []).append((int(row["frame_index"]), int(row["sync_index"])))
    except (KeyError, ValueError) as exc:
        raise AvatarError(table, f"is not caliscope's frame table ({exc})",
                          "columns: sync_index, cam_id, frame_index, frame_time; or remove it to pair frames by position"
                          ) from exc
    out = []
    for cam in cameras:
        number = re.search(r"(\d+)$", cam.name)
        found = rows.get(int(number.group(1))) if number else None
        if not found:
            raise AvatarError(table, f"has no rows for camera {cam.name}",
                              "name cameras cam_<id> as in the table, or remove it to pair frames by position")
        sync = np.array([s for _, s in sorted(found)])
        if len(sync) < cam.frames:
            raise AvatarError(table, f"lists {len(sync)} frames of camera {cam.name}, which has {cam.frames}",
                              "the table and the videos come from different recordings")
        out.append(sync[:cam.frames])
    return out
