"""`avatar export`: standard 3DGS `.ply` files of an avatar, readable by common splat viewers,
or a triangle mesh of a radiance-field avatar's surface.

  --ply OUT.ply                 the canonical Gaussians (every branch)
  --ply OUT.ply --frame K       deformed as in dataset frame K (its audio and eye signal)
  --audio SPEECH --frames DIR   one deformed .ply per video frame of the speech
  --mesh OUT.ply [--frame K]    the surface (marching cubes of the density: `--method nerf`),
                                canonical or as in dataset frame K; vertex colours
The extra `branch` property (0 face, 1 inside-mouth, 2 torso) is ignored by other viewers.
The torso sits in its reference relation to the head, or as the body stood in frame K.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from plyfile import PlyData, PlyElement
from tqdm import tqdm

from avatar.errors import AvatarError
from avatar.io import atomic_path

from .avatar_dir import load_avatar
from .conditioning import blink_schedule, speech_features
from .gaussians import save_ply
from .render import Drive, open_dataset, posed_gaussians


def save_mesh_ply(path: str | Path, vertices: torch.Tensor, triangles: torch.Tensor, colours: torch.Tensor) -> Path:
    """A binary .ply triangle mesh: vertices [V, 3] (float), colours [V, 3] in [0, 1] (as
    8-bit red, green, blue), triangles [F, 3] of vertex indices."""
    v = np.empty(len(vertices), dtype=[("x", "f4"), ("y", "f4"), ("z", "f4"), ("red", "u1"), ("green", "u1"),
                                       ("blue", "u1")])
    xyz = vertices.detach().cpu().numpy()  # host: written to the file
    rgb = (colours.detach().clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)  # host: written to the file
    for k, name in enumerate("xyz"):
        v[name] = xyz[:, k]
    for k, name in enumerate(("red", "green", "blue")):
        v[name] = rgb[:, k]
    f = np.empty(len(triangles), dtype=[("vertex_indices", "i4", (3,))])
    f["vertex_indices"] = triangles.cpu().numpy()  # host: written to the file
    with atomic_path(path) as tmp:
        PlyData([PlyElement.describe(v, "vertex"), PlyElement.describe(f, "face")], text=False).write(str(tmp))
    return Path(path)


def export(avatar: str | Path, ply: str | Path | None = None, frame: int | None = None,
           audio: str | Path | None = None, frames_dir: str | Path | None = None, progress: bool = True,
           device: torch.device | str = "cpu", mesh: str | Path | None = None, mesh_resolution: int = 192) -> list[Path]:
    av = load_avatar(avatar, device)
    if mesh is not None:
        if not 8 <= mesh_resolution <= 1024:
            raise AvatarError(Path(mesh), f"--mesh-resolution {mesh_resolution} is outside 8-1024")
        if ply is not None or audio is not None:
            raise AvatarError(Path(mesh), "--mesh is exported alone: give --ply or --audio in another call")
        pose = None
        if frame is not None:
            ds, f = _dataset_frame(av, frame)
            codes = av.dataset_motion(ds)
            pose = av.deform(codes[f.frame_index][None], torch.tensor([[f.eye_openness]], device=codes.device))[0]
        return [save_mesh_ply(mesh, *av.mesh(pose, mesh_resolution))]
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
        raise AvatarError(Path(avatar), "nothing to export: give --ply OUT.ply, --audio SPEECH --frames DIR, or --mesh OUT.ply")
    if frame is None:
        return [save_ply(ply, av.gaussians())]
    ds, f = _dataset_frame(av, frame)
    drive = Drive(av.dataset_motion(ds), np.full(len(ds.features["mel"]), f.eye_openness, np.float32))
    return [save_ply(ply, posed_gaussians(av, drive, f.frame_index, f))]


def _dataset_frame(av, frame: int):
    """(the avatar's dataset, its frame `frame`); AvatarError when out of range."""
    ds = open_dataset(av, av.size, required=True)
    if not 0 <= frame < len(ds):
        raise AvatarError(ds.root, f"has frames 0..{len(ds) - 1}; --frame {frame} is out of range")
    return ds, ds[frame]
