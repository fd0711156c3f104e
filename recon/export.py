"""`avatar export`: standard 3DGS `.ply` files of an avatar, readable by common splat viewers.

  --ply OUT.ply                 the canonical Gaussians (every branch)
  --ply OUT.ply --frame K       deformed as in dataset frame K (its audio and eye signal)
  --audio SPEECH --frames DIR   one deformed .ply per video frame of the speech
The extra `branch` property (0 face, 1 inside-mouth, 2 torso) is ignored by other viewers.
The torso sits in its reference relation to the head, or as the body stood in frame K.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from avatar.errors import AvatarError

from .avatar_dir import load_avatar
from .conditioning import blink_schedule, speech_features
from .gaussians import save_ply
from .render import Drive, open_dataset, posed_gaussians


def export(avatar: str | Path, ply: str | Path | None = None, frame: int | None = None,
           audio: str | Path | None = None, frames_dir: str | Path | None = None, progress: bool = True,
           device: torch.device | str = "cpu") -> list[Path]:
    av = load_avatar(avatar, device)
    if not av.has_gaussians:
        av.gaussians()  # the method's own error: it has no Gaussians
    if audio is not None:
        if frames_dir is None:
            raise AvatarError(Path(audio), "--audio needs --frames DIR to write one .ply per frame")
        _, feats = speech_features(Path(audio), av.fps)
        drive = Drive(av.speech_motion(feats), blink_schedule(len(feats["mel"]), av.fps))
        out = Path(frames_dir)
        paths = []
        for k in tqdm(range(len(drive)), desc="avatar export", unit="frame", disable=not progress, file=sys.stderr):
            paths.append(save_ply(out / f"frame_{k:06d}.ply", posed_gaussians(av, drive, k)))
        return paths
    if ply is None:
        raise AvatarError(Path(avatar), "nothing to export: give --ply OUT.ply, or --audio SPEECH --frames DIR")
    if frame is None:
        return [save_ply(ply, av.gaussians())]
    ds = open_dataset(av, av.size, required=True)
    if not 0 <= frame < len(ds):
        raise AvatarError(ds.root, f"has frames 0..{len(ds) - 1}; --frame {frame} is out of range")
    f = ds[frame]
    drive = Drive(av.speech_motion(ds.features), np.full(len(ds.features["mel"]), f.eye_openness, np.float32))
    return [save_ply(ply, posed_gaussians(av, drive, f.frame_index, f))]
