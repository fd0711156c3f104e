"""Volume rendering of a radiance field in torch: camera rays, their span through the
field's box, an occupancy grid that skips empty space (Instant-NGP's), and front-to-back
compositing that stops a ray once it is opaque.

A ray's samples are `step` apart along it inside the box (jittered in training); those in
cells the grid marks empty are skipped. Samples are taken `block` at a time for every
live ray, so a ray stops costing anything once its transmittance falls below `stop`
(3DGS's and Instant-NGP's 1e-4), which on a CPU is most of the saving. The field is
called only on the samples that count:

    field(xyz [M, 3], ray [M]) -> (density [M], rgb [M, 3])

`ray` lets the field look up each sample's conditioning (its frame's speech, say).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

STOP_TRANSMITTANCE = 1e-4
"""A ray stops once less than this much light gets through (3DGS's cut-off)."""
OCCUPIED_ALPHA = 0.01
"""A cell is occupied when a step through it would be at least this opaque (Instant-NGP)."""

Field = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


def camera_rays(viewmat: Tensor, K: Tensor, pixels: Tensor) -> tuple[Tensor, Tensor]:
    """Rays through pixel centres: viewmat [4, 4] world-to-camera (OpenCV), K [3, 3],
    pixels [R, 2] (x, y; the pixel (i, j) is at (j + 0.5, i + 0.5)) -> (origins [R, 3],
    unit directions [R, 3]) in the world (the head frame)."""
    uv1 = torch.cat([pixels, torch.ones_like(pixels[:, :1])], 1)
    d_cam = uv1 @ torch.linalg.inv(K).T
    R, t = viewmat[:3, :3], viewmat[:3, 3]
    d = d_cam @ R  # R^T d_cam, row-wise
    origin = -(R.T @ t)
    return origin.expand_as(d), d / d.norm(dim=-1, keepdim=True)


def box_span(origins: Tensor, dirs: Tensor, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
    """Where rays [R, 3] enter and leave the box [lo, hi] ([3] each): (near [R], far [R]),
    near >= 0; far <= near for rays that miss it."""
    inv = 1 / torch.where(dirs.abs() < 1e-12, torch.full_like(dirs, 1e-12), dirs)
    t0, t1 = (lo - origins) * inv, (hi - origins) * inv
    near = torch.minimum(t0, t1).amax(-1).clamp_min(0)
    far = torch.maximum(t0, t1).amin(-1)
    return near, far


class OccupancyGrid(nn.Module):
    """Which cells of a box [lo, hi] hold anything: a `resolution`^3 grid of each cell's
    largest density seen (an exponential moving maximum, Instant-NGP's), a cell occupied
    when a `step` through it would be at least OCCUPIED_ALPHA opaque or its density
    reaches the grid's mean (so a faint field is not emptied whole)."""

    def __init__(self, lo: Tensor, hi: Tensor, resolution: int = 64, step: float = 0.003, decay: float = 0.95):
        super().__init__()
        self.resolution, self.step, self.decay = resolution, step, decay
        self.register_buffer("lo", torch.as_tensor(lo, dtype=torch.float32).clone())
        self.register_buffer("hi", torch.as_tensor(hi, dtype=torch.float32).clone())
        self.register_buffer("density", torch.full((resolution,) * 3, float("inf")))  # unseen: occupied
        self.register_buffer("occupied", torch.ones((resolution,) * 3, dtype=torch.bool))

    def cell_of(self, xyz: Tensor) -> Tensor:
        """[M, 3] points -> [M, 3] long cell indices (clamped into the grid)."""
        rel = (xyz - self.lo) / (self.hi - self.lo) * self.resolution
        return rel.long().clamp(0, self.resolution - 1)

    def is_occupied(self, xyz: Tensor) -> Tensor:
        """[M, 3] points -> [M] bool."""
        c = self.cell_of(xyz)
        return self.occupied[c[:, 0], c[:, 1], c[:, 2]]

    @torch.no_grad()
    def update(self, density_at: Callable[[Tensor], Tensor], generator: torch.Generator | None = None,
               chunk: int = 65536) -> float:
        """Evaluate `density_at(xyz [M, 3]) -> [M]` at a random point of every cell, fold it
        into the moving maximum and re-mark the occupied cells; returns their share."""
        r = self.resolution
        idx = torch.stack(torch.meshgrid(*[torch.arange(r, device=self.lo.device)] * 3, indexing="ij"), -1).reshape(-1, 3)
        jitter = torch.rand(idx.shape, generator=generator, device="cpu").to(self.lo.device)
        xyz = self.lo + (idx + jitter) / r * (self.hi - self.lo)
        fresh = torch.cat([density_at(xyz[i:i + chunk]) for i in range(0, len(xyz), chunk)]).reshape((r,) * 3)
        seen = torch.isfinite(self.density)
        self.density = torch.where(seen, torch.maximum(self.density * self.decay, fresh), fresh)
        threshold = min(-math.log(1 - OCCUPIED_ALPHA) / self.step, float(self.density.mean()))
        self.occupied = self.density >= threshold
        return float(self.occupied.float().mean())


@dataclass
class RayResult:
    """What volume rendering gives per ray."""

    rgb: Tensor  # [R, 3], premultiplied by alpha
    alpha: Tensor  # [R, 1]
    depth: Tensor  # [R, 1] expected distance along the ray (alpha-weighted; 0 where empty)
    samples: int  # field evaluations spent


def render_rays(field: Field, origins: Tensor, dirs: Tensor, near: Tensor, far: Tensor, step: float,
                grid: OccupancyGrid | None = None, jitter: Tensor | None = None, block: int = 8,
                max_samples: int = 1024, stop: float = STOP_TRANSMITTANCE) -> RayResult:
    """Front-to-back compositing of the field along rays [R] (module docstring). jitter:
    [R] offsets in [0, 1) of each ray's first sample (training), else samples sit at the
    middle of their steps."""
    R = len(origins)
    device = origins.device
    rgb = torch.zeros(R, 3, device=device)
    alpha = torch.zeros(R, 1, device=device)
    depth = torch.zeros(R, 1, device=device)
    trans = torch.ones(R, device=device)
    offset = torch.full((R,), 0.5, device=device) if jitter is None else jitter
    live = torch.nonzero(far > near).squeeze(1)
    samples = 0
    for first in range(0, max_samples, block):
        if len(live) == 0:
            break
        k = torch.arange(first, first + block, device=device, dtype=torch.float32)
        t = near[live, None] + (k + offset[live, None]) * step  # [L, block]
        inside = t < far[live, None]
        xyz = origins[live, None] + t[..., None] * dirs[live, None]
        if grid is not None:
            inside = inside & grid.is_occupied(xyz.reshape(-1, 3)).reshape(inside.shape)
        if not bool(inside.any()):
            live = live[(near[live] + (first + block) * step) < far[live]]
            continue
        rows, cols = torch.nonzero(inside, as_tuple=True)
        density, colour = field(xyz[rows, cols], live[rows])
        samples += len(rows)
        a = torch.zeros(inside.shape, device=device).index_put((rows, cols), 1 - torch.exp(-density * step))
        through = torch.cumprod(torch.cat([torch.ones_like(a[:, :1]), 1 - a[:, :-1]], 1), 1)  # within the block
        w = trans[live, None] * through * a  # [L, block]
        w_s = w[rows, cols][:, None]
        rgb = rgb.index_add(0, live[rows], w_s * colour)
        alpha = alpha.index_add(0, live, w.sum(1, keepdim=True))
        depth = depth.index_add(0, live, (w * t).sum(1, keepdim=True))
        trans = trans.index_put((live,), trans[live] * through[:, -1] * (1 - a[:, -1]))
        keep = (trans[live] > stop) & ((near[live] + (first + block) * step) < far[live])
        live = live[keep]
    return RayResult(rgb, alpha, depth, samples)
