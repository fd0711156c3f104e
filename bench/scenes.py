"""Gaussian scenes shared by the rasterizer benchmark and tests."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

SHARED_DATA = Path(os.environ.get("AVATAR_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
GARDEN_NPZ = SHARED_DATA / "raster" / "gsplat_test_garden.npz"


@dataclass
class Scene:
    """Inputs of :func:`recon.raster.rasterize` (linear scales, opacities in [0, 1])."""

    name: str
    means: Tensor  # [N, 3]
    quats: Tensor  # [N, 4]
    scales: Tensor  # [N, 3]
    opacities: Tensor  # [N]
    colors: Tensor  # [N, 3] features or [N, K, 3] SH coefficients
    viewmats: Tensor  # [C, 4, 4]
    Ks: Tensor  # [C, 3, 3]
    width: int
    height: int
    sh_degree: int | None = None

    def to(self, device: str | torch.device, dtype: torch.dtype = torch.float32) -> "Scene":
        moved = {k: (v.to(device, dtype) if isinstance(v, Tensor) else v) for k, v in vars(self).items()}
        return Scene(**moved)

    @property
    def tensors(self) -> tuple[Tensor, ...]:
        return (self.means, self.quats, self.scales, self.opacities, self.colors, self.viewmats, self.Ks)


def garden_scene(path: Path = GARDEN_NPZ, grid: int = 1) -> Scene:
    """gsplat's rasterizer test scene, prepared as gsplat's tests do.

    Crop to [-2, 2]^3, torch.manual_seed(42), scales U[1e-4, 0.02], random unit quats,
    U[0, 1] opacities; ``grid`` > 1 tiles the crop into a grid x grid larger scene.
    """
    from gsplat._helper import load_test_data

    if not path.is_file():
        raise FileNotFoundError(f"garden scene not found: {path} (set AVATAR_SHARED_DATA)")
    torch.manual_seed(42)
    means, quats, scales, opacities, colors, viewmats, Ks, width, height = load_test_data(
        data_path=str(path), device="cpu", scene_grid=grid
    )
    return Scene("garden", means, quats, scales.clamp_min(1e-4), opacities, colors, viewmats, Ks, width, height)


def head_scene(n: int = 20_000, size: int = 256, cameras: int = 1, sh_degree: int = 3, seed: int = 0) -> Scene:
    """A head-sized cloud: n Gaussians in and on a 9 x 12 x 10 cm ellipsoid, seen from
    about 0.6 m by `cameras` views spread over +-20 degrees of yaw (size x size pixels).
    """
    g = torch.Generator().manual_seed(seed)
    radii = torch.tensor([0.09, 0.12, 0.10])
    d = F.normalize(torch.randn(n, 3, generator=g), dim=-1)
    r = torch.rand(n, 1, generator=g) ** 0.25  # most mass near the surface, like a face
    means = d * r * radii
    quats = F.normalize(torch.randn(n, 4, generator=g), dim=-1)
    scales = torch.exp(torch.empty(n, 3).uniform_(math.log(0.002), math.log(0.01), generator=g))
    opacities = torch.empty(n).uniform_(0.3, 1.0, generator=g)
    K_sh = (sh_degree + 1) ** 2
    colors = torch.randn(n, K_sh, 3, generator=g) * 0.2
    viewmats = []
    for yaw in torch.linspace(-20, 20, cameras) if cameras > 1 else torch.zeros(1):
        a = math.radians(float(yaw))
        R = torch.tensor([[math.cos(a), 0.0, -math.sin(a)], [0.0, 1.0, 0.0], [math.sin(a), 0.0, math.cos(a)]])
        V = torch.eye(4)
        V[:3, :3] = R
        V[:3, 3] = torch.tensor([0.0, 0.0, 0.6])
        viewmats.append(V)
    f = 0.5 * size / math.tan(math.radians(12.5))  # 25 degree field of view
    K = torch.tensor([[f, 0.0, size / 2], [0.0, f, size / 2], [0.0, 0.0, 1.0]])
    return Scene(
        "head", means, quats, scales, opacities, colors, torch.stack(viewmats), K[None].repeat(cameras, 1, 1),
        size, size, sh_degree,
    )
