"""`avatar render`: drive a trained avatar with any speech file and write an mp4 (H.264 +
AAC, the speech muxed in, as long as the audio).

Cameras (head frame; the head is still, the camera moves around it):
  dataset      replay the capture's camera (head) motion, ping-pong over the clip, with
               each frame's own torso and surroundings around the head;
  orbit        a slow yaw/pitch orbit around the head at the capture's mean distance;
  fixed:Y,P    a still camera at yaw Y and pitch P degrees from the capture's mean view.
What lies behind the head (`--torso`):
  3d           the avatar's neck-and-shoulders branch over the background plate (recon/
               torso.py), carried as the body moved in each dataset frame, and in its
               reference relation to the head for novel views; the default;
  frame        each dataset frame's own pixels around the head (ER-NeRF's way; only the
               dataset camera has them: novel views show the plate);
  none         the plate alone: the head by itself.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from avatar.errors import AvatarError
from avatar.media import write_mp4

from .avatar_dir import load_avatar
from .conditioning import blink_schedule, speech_features
from .dataset import Dataset, Frame, behind_head
from .method import TrainedAvatar, torso_under

@dataclass
class Drive:
    """Per-frame conditioning of a rendered clip: motion codes (from its speech) and eye openness."""

    motion: Tensor  # [N, K]
    eye: np.ndarray  # [N]

    def __len__(self) -> int:
        return self.motion.shape[0]

    def codes(self, k: int) -> Tensor:
        """[K] motion codes of frame k."""
        return self.motion[k]

    def batch(self, frames: range) -> tuple[Tensor, Tensor]:
        """Motion codes [B, K] and eye openness [B, 1] of a run of frames."""
        return (self.motion[frames.start:frames.stop],
                torch.from_numpy(self.eye[frames.start:frames.stop].astype(np.float32))[:, None].to(self.motion.device))


def look_at(eye: Tensor, target: Tensor, up: tuple[float, float, float] = (0.0, 1.0, 0.0)) -> Tensor:
    """[4, 4] world-to-camera (OpenCV axes) of a camera at `eye` [3] looking at `target` [3]."""
    up = torch.tensor(up, device=eye.device)
    z = target - eye
    z = z / z.norm()
    x = torch.linalg.cross(-up, z)
    x = x / x.norm()
    y = torch.linalg.cross(z, x)
    R = torch.stack([x, y, z])  # rows: camera axes in world
    w2c = torch.eye(4, device=eye.device)
    w2c[:3, :3] = R
    w2c[:3, 3] = -R @ eye
    return w2c


class CameraRig:
    """Cameras around a trained avatar, from the capture's mean viewpoint (a rig's: its first
    camera's, whose intrinsics the avatar renders with)."""

    def __init__(self, av: TrainedAvatar, ds: Dataset | None):
        self.target = av.head_points().median(0).values
        if ds is not None:
            poses = torch.tensor([ds.frames[i]["transform_matrix"] for i in ds.views_of(0)],  # the lens's camera
                                 dtype=torch.float32, device=self.target.device)
            mean_centre = poses[:, :3, 3].mean(0)
        else:  # a camera straight in front of the face at a typical phone distance
            mean_centre = self.target + torch.tensor([0.0, 0.0, 0.5], device=self.target.device)
        offset = mean_centre - self.target
        self.distance = float(offset.norm())
        self.base_dir = offset / offset.norm()

    def at(self, yaw_deg: float, pitch_deg: float, distance: float | None = None) -> Tensor:
        """[4, 4] viewmat at yaw/pitch degrees away from the capture's mean view."""
        yaw, pitch = math.radians(yaw_deg), math.radians(pitch_deg)
        on = self.base_dir.device
        ry = torch.tensor([[math.cos(yaw), 0, math.sin(yaw)], [0, 1, 0], [-math.sin(yaw), 0, math.cos(yaw)]], device=on)
        rx = torch.tensor([[1, 0, 0], [0, math.cos(pitch), -math.sin(pitch)], [0, math.sin(pitch), math.cos(pitch)]],
                          device=on)
        d = ry @ rx @ self.base_dir
        return look_at(self.target + (distance or self.distance) * d, self.target)

    def orbit(self, k: int, fps: float, period_s: float = 8.0, yaw_deg: float = 30.0, pitch_deg: float = 8.0) -> Tensor:
        phase = 2 * math.pi * k / (fps * period_s)
        return self.at(yaw_deg * math.sin(phase), pitch_deg * math.sin(2 * phase))


@dataclass(frozen=True)
class CameraSpec:
    """A render's camera: `mode` dataset (replay the capture's head motion through one of
    its cameras, `rig_camera`, default the first), orbit, or fixed at yaw/pitch degrees."""

    mode: str
    yaw: float = 0.0
    pitch: float = 0.0
    rig_camera: str | None = None


def parse_camera(spec: str) -> CameraSpec:
    if spec in ("dataset", "orbit"):
        return CameraSpec(spec)
    if spec.startswith("dataset:") and len(spec) > 8:
        return CameraSpec("dataset", rig_camera=spec[8:])
    if spec.startswith("fixed:"):
        try:
            yaw, pitch = (float(v) for v in spec[6:].split(","))
            return CameraSpec("fixed", yaw, pitch)
        except ValueError:
            pass
    raise AvatarError(Path(spec), "is not a camera: use dataset, dataset:CAMERA (a rig's), orbit or fixed:YAW,PITCH "
                                  "(degrees)")


TORSO_MODES = ("3d", "frame", "none")


def torso_mode(av: TrainedAvatar, torso: str | None) -> str:
    """The torso to render (see the module docstring): `torso`, or by default 3d for an
    avatar with a torso branch and frame for one without."""
    if torso is None:
        return "3d" if av.has_torso else "frame"
    if torso not in TORSO_MODES:
        raise AvatarError(Path(torso), f"is not a torso mode: use {', '.join(TORSO_MODES)}")
    if torso == "3d" and not av.has_torso:
        raise AvatarError(av.root, "has no 3D torso (trained before avatar/4, or with torso_steps 0)",
                          "add one with `avatar train DATASET --out AVATAR --resume`, or pass --torso frame")
    return torso


def behind(av: TrainedAvatar, torso: str, viewmat: Tensor, K: Tensor, size: int, plate: Tensor,
           frame: Frame | None = None) -> Tensor:
    """[size, size, 3] what lies behind the head in one view: by `torso` mode, for a dataset
    `frame` (its camera) or a novel view (frame None)."""
    if torso == "3d":
        return torso_under(av.torso_layer(viewmat, K, size, frame), plate)
    if torso == "frame" and frame is not None:
        return behind_head(frame, plate)
    return plate


def open_dataset(av: TrainedAvatar, size: int, required: bool) -> Dataset | None:
    """The avatar's dataset; when not `required`, None if it is gone or damaged (said once)."""
    if av.dataset.is_dir():
        try:
            ds = Dataset(av.dataset, size=size, cache_frames=32, device=av.device)
            av.check_dataset(ds)
            return ds
        except AvatarError as exc:
            if required:
                raise
            print(f"warning: the avatar's dataset is unusable, going on without it: {exc}", file=sys.stderr)
            return None
    if required:
        raise AvatarError(av.dataset, "the avatar's dataset folder is missing; `--camera dataset` replays its "
                          "cameras and torso", "use --camera orbit or fixed:YAW,PITCH, or restore the dataset")
    return None


def scaled(av: TrainedAvatar, size: int) -> tuple[Tensor, Tensor]:
    """(K [3, 3], background [size, size, 3]) at a render size."""
    s = size / av.size
    K = av.K.clone()
    K[:2] *= s
    if size == av.size:
        return K, av.background
    bg = cv2.resize(av.background.cpu().numpy(), (size, size),  # host: OpenCV resamples the plate
                    interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR)
    return K, torch.from_numpy(bg).to(av.background.device)


def ping_pong(k: int, n: int) -> int:
    """k-th index of 0, 1, .., n-1, n-2, .., 1, 0, 1, .. (smooth replay of a clip)."""
    if n == 1:
        return 0
    period = 2 * (n - 1)
    j = k % period
    return j if j < n else period - j


def render_video(avatar: str | Path, audio: str | Path, out: str | Path, camera: str = "dataset",
                 size: int | None = None, progress: bool = True, seed: int = 0, batch: int = 8,
                 torso: str | None = None, device: torch.device | str = "cpu") -> dict:
    """Render `audio` through the avatar to an mp4, deforming `batch` frames per pass.
    torso: 3d, frame or none (module docstring; None: the avatar's default); device: where
    the avatar renders (recon/device.py). Returns a summary dict."""
    spec = parse_camera(camera)
    mode = spec.mode
    av = load_avatar(avatar, device)
    torso = torso_mode(av, torso)
    size = size or av.size
    if size % 2:
        raise AvatarError(Path(out), f"--size {size} must be even (H.264 needs even frame sizes)")
    pcm, feats = speech_features(Path(audio), av.fps)
    drive = Drive(av.speech_motion(feats), blink_schedule(len(feats["mel"]), av.fps, seed))
    ds = open_dataset(av, size, required=mode == "dataset")
    rig = CameraRig(av, ds)
    K, plate = scaled(av, size)
    replay = []
    if mode == "dataset":
        c = ds.camera_index(spec.rig_camera)
        replay = ds.views_of(c)
        if c != 0:  # the avatar keeps its first camera's lens and plate; the dataset has the others'
            K, plate = ds.cameras[c].K, ds.cameras[c].background

    bar = tqdm(total=len(drive), desc="avatar render", unit="frame", disable=not progress, file=sys.stderr)

    def frames():
        with torch.no_grad():
            for start in range(0, len(drive), batch):
                run = range(start, min(start + batch, len(drive)))
                for k, pose in zip(run, av.deform(*drive.batch(run))):
                    if mode == "dataset":
                        i = replay[ping_pong(k, len(replay))]
                        f, viewmat = ds[i], ds.viewmat(i)
                    else:
                        f, viewmat = None, rig.orbit(k, av.fps) if mode == "orbit" else rig.at(spec.yaw, spec.pitch)
                    under = behind(av, torso, viewmat, K, size, plate, f)
                    image, _ = av.render_head(pose, viewmat, K, size).over(under)
                    bar.update(1)
                    yield (image.clamp(0, 1) * 255 + 0.5).to(torch.uint8).cpu().numpy()  # host: to the encoder

    try:
        path = write_mp4(out, frames(), av.fps, audio=pcm)
    finally:
        bar.close()
    return {"video": str(path), "frames": len(drive), "seconds": len(drive) / av.fps,
            "audio_seconds": len(pcm) / 16_000, "camera": camera, "size": size, "torso": torso}


def posed_gaussians(av: TrainedAvatar, drive: Drive, k: int, frame: Frame | None = None):
    """Every branch's Gaussians at frame k of a drive (the torso as the body stood in
    dataset `frame`; None: in its reference relation to the head)."""
    with torch.no_grad():
        pose = av.deform(*drive.batch(range(k, k + 1)))[0]
    return av.gaussians(pose, frame=frame)


def contact_sheet(video: str | Path, out: str | Path, n: int = 8, columns: int = 4) -> Path:
    """A grid of n frames evenly spread over a video, each labelled with its time."""
    from avatar.io import atomic_path
    from avatar.media import open_media

    with open_media(video, "video", "render it again with `avatar render`") as c:
        frames = [(f.time, f.to_ndarray(format="rgb24")) for f in c.decode(video=0)]
    if not frames:
        raise AvatarError(Path(video), "holds no video frames")
    picks = [frames[int(k)] for k in np.linspace(0, len(frames) - 1, min(n, len(frames))).round()]
    tiles = []
    for t, img in picks:
        img = img.copy()
        cv2.putText(img, f"{t:.2f} s", (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 0), 1, cv2.LINE_AA)
        tiles.append(img)
    while len(tiles) % columns:
        tiles.append(np.zeros_like(tiles[0]))
    grid = np.concatenate([np.concatenate(tiles[r:r + columns], 1) for r in range(0, len(tiles), columns)], 0)
    with atomic_path(out) as tmp:
        cv2.imwrite(str(tmp), cv2.cvtColor(grid, cv2.COLOR_RGB2BGR))
    return Path(out)
