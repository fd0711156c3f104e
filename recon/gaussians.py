"""Persistent canonical Gaussians of an avatar, and the standard 3DGS `.ply` format.

Parameters are stored as 3DGS optimises them: log-scales, opacity logits, unnormalised
quaternions (wxyz) and SH coefficients (DC + rest). Each Gaussian carries a branch
label: 0 = face, 1 = inside-mouth (TalkingGaussian's split), 2 = torso (neck and shoulders).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from plyfile import PlyData, PlyElement
from torch import Tensor

from avatar.errors import AvatarError
from avatar.io import atomic_path

FACE, MOUTH, TORSO = 0, 1, 2
SH_C0 = 0.28209479177387814  # Y_0^0: colour = SH_C0 * f_dc + 0.5


@dataclass
class Gaussians:
    means: Tensor  # [N, 3]
    quats: Tensor  # [N, 4] wxyz, any norm
    log_scales: Tensor  # [N, 3]
    opacity_logits: Tensor  # [N]
    sh: Tensor  # [N, K, 3], K = (degree + 1)^2
    branch: Tensor  # [N] uint8: 0 face, 1 mouth, 2 torso

    def __len__(self) -> int:
        return self.means.shape[0]

    @property
    def sh_degree(self) -> int:
        return int(round(self.sh.shape[1] ** 0.5)) - 1

    def activated(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(means, quats, linear scales, opacities in [0, 1]) as the rasterizer takes them."""
        return self.means, self.quats, torch.exp(self.log_scales), torch.sigmoid(self.opacity_logits)

    def select(self, mask: Tensor) -> "Gaussians":
        return Gaussians(*(getattr(self, k)[mask] for k in ("means", "quats", "log_scales", "opacity_logits", "sh", "branch")))


def rgb_to_sh_dc(rgb: Tensor) -> Tensor:
    """Colour in [0, 1] -> degree-0 SH coefficient (3DGS convention)."""
    return (rgb - 0.5) / SH_C0


def save_ply(path: str | Path, g: Gaussians) -> Path:
    """Write the standard 3DGS layout (x y z nx ny nz f_dc_* f_rest_* opacity scale_* rot_*),
    readable by common splat viewers, plus our `branch` property (ignored by them)."""
    n, K = len(g), g.sh.shape[1]
    sh = g.sh.detach().cpu().float()  # host: written to the file
    rest = sh[:, 1:].transpose(1, 2).reshape(n, -1)  # channel-major, as Inria writes it
    cols = {
        "x": g.means[:, 0], "y": g.means[:, 1], "z": g.means[:, 2],
        "nx": torch.zeros(n, device="cpu"), "ny": torch.zeros(n, device="cpu"), "nz": torch.zeros(n, device="cpu"),
        **{f"f_dc_{c}": sh[:, 0, c] for c in range(3)},
        **{f"f_rest_{i}": rest[:, i] for i in range(3 * (K - 1))},
        "opacity": g.opacity_logits,
        **{f"scale_{i}": g.log_scales[:, i] for i in range(3)},
        **{f"rot_{i}": g.quats[:, i] for i in range(4)},
    }
    data = np.empty(n, dtype=[(k, "f4") for k in cols] + [("branch", "u1")])
    for k, v in cols.items():
        data[k] = v.detach().cpu().float().numpy()  # host: written to the file
    data["branch"] = g.branch.cpu().numpy().astype(np.uint8)  # host: written to the file
    with atomic_path(path) as tmp:
        PlyData([PlyElement.describe(data, "vertex")], text=False).write(str(tmp))
    return Path(path)


def load_ply(path: str | Path) -> Gaussians:
    """Read a 3DGS `.ply` (ours or another tool's); raises AvatarError if malformed."""
    path = Path(path)
    try:
        v = PlyData.read(str(path))["vertex"]
        names = set(v.data.dtype.names)
    except Exception as exc:  # plyfile raises several types on malformed input
        raise AvatarError(path, f"is not a readable PLY file ({exc.__class__.__name__}: {exc})") from exc
    need = {"x", "y", "z", "f_dc_0", "f_dc_1", "f_dc_2", "opacity", "scale_0", "scale_1", "scale_2",
            "rot_0", "rot_1", "rot_2", "rot_3"}
    if not need <= names:
        raise AvatarError(path, f"is not a 3DGS PLY: missing {sorted(need - names)}")
    n_rest = len([k for k in names if k.startswith("f_rest_")])
    if n_rest % 3 or int(round((n_rest // 3 + 1) ** 0.5)) ** 2 != n_rest // 3 + 1:
        raise AvatarError(path, f"has {n_rest} f_rest properties, not 3 x ((d+1)^2 - 1) for an SH degree d")

    def col(k: str) -> Tensor:
        return torch.from_numpy(np.asarray(v[k], np.float32).copy())

    n = len(v.data)
    K = n_rest // 3 + 1
    dc = torch.stack([col(f"f_dc_{c}") for c in range(3)], -1)[:, None]
    rest = torch.stack([col(f"f_rest_{i}") for i in range(n_rest)], -1).reshape(n, 3, K - 1).transpose(1, 2)
    g = Gaussians(
        means=torch.stack([col("x"), col("y"), col("z")], -1),
        quats=torch.stack([col(f"rot_{i}") for i in range(4)], -1),
        log_scales=torch.stack([col(f"scale_{i}") for i in range(3)], -1),
        opacity_logits=col("opacity"),
        sh=torch.cat([dc, rest], 1),
        branch=torch.from_numpy(np.asarray(v["branch"], np.uint8).copy()) if "branch" in names
        else torch.zeros(n, dtype=torch.uint8),
    )
    for k in ("means", "quats", "log_scales", "opacity_logits", "sh"):
        if not torch.isfinite(getattr(g, k)).all():
            raise AvatarError(path, f"holds NaN or Inf values in {k}")
    return g
