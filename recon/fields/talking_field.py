"""The talking head as a conditioned radiance field (ER-NeRF's audio-spatial decomposition).

Space: three 2-d hash grids on the head box's planes (xy, yz, xz; ER-NeRF's tri-plane
hash encoding: far fewer collisions than one 3-d table of the same size), their features
concatenated. Conditioning: each frame's motion codes and eye openness (the speech ->
motion stage's codes, as the Gaussian avatar's deformation takes them). Region
attention: every point weighs the conditioning channels by sigmoid(linear(its spatial
features)), so the lips listen to the mouth codes and the forehead to none of them.
Density and a geometry feature come from one MLP over [space, attended conditioning],
colour from a second over [geometry feature, attended conditioning].
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .hash_encoding import HashEncoding, HashGridConfig

PLANES = ((0, 1), (1, 2), (0, 2))
"""The coordinate pairs of the three planes."""
MAX_LOG_DENSITY = 15.0
"""Density is exp(raw) with raw clamped here (Instant-NGP's truncated exponential)."""


class TalkingField(nn.Module):
    """xyz [M, 3] (head frame, inside [lo, hi]) and per-point conditioning [M, C] ->
    (density [M], rgb [M, 3])."""

    def __init__(self, lo: Tensor, hi: Tensor, cond_dim: int, grid: HashGridConfig, hidden: int = 64,
                 geometry_features: int = 15, backend: str = "auto"):
        super().__init__()
        self.register_buffer("lo", torch.as_tensor(lo, dtype=torch.float32).clone())
        self.register_buffer("hi", torch.as_tensor(hi, dtype=torch.float32).clone())
        self.planes = nn.ModuleList(HashEncoding(grid, backend=backend) for _ in PLANES)
        space = len(PLANES) * grid.out_features
        self.attention = nn.Linear(space, cond_dim)
        self.density_net = nn.Sequential(nn.Linear(space + cond_dim, hidden), nn.ReLU(),
                                         nn.Linear(hidden, 1 + geometry_features))
        self.colour_net = nn.Sequential(nn.Linear(geometry_features + cond_dim, hidden), nn.ReLU(),
                                        nn.Linear(hidden, 3))
        with torch.no_grad():  # start nearly empty: a step of ~3 mm about 1 % opaque
            self.density_net[-1].bias[0] = 1.0

    def space(self, xyz: Tensor) -> Tensor:
        """[M, 3] -> [M, 3 * L * F] tri-plane features."""
        unit = (xyz - self.lo) / (self.hi - self.lo)
        return torch.cat([enc(unit[:, list(pair)]) for enc, pair in zip(self.planes, PLANES)], 1)

    def forward(self, xyz: Tensor, cond: Tensor) -> tuple[Tensor, Tensor]:
        feats = self.space(xyz)
        attended = torch.sigmoid(self.attention(feats)) * cond
        h = self.density_net(torch.cat([feats, attended], 1))
        density = torch.exp(h[:, 0].clamp(max=MAX_LOG_DENSITY))
        rgb = torch.sigmoid(self.colour_net(torch.cat([h[:, 1:], attended], 1)))
        return density, rgb
