"""Multi-resolution hash encoding (Instant-NGP, Müller et al. 2022).

A point ``x`` in the unit cube (or square, for ER-NeRF's tri-plane grids) is looked up in
``L`` grids of growing resolution; each level D-linearly interpolates ``F`` learned
features stored at its grid corners, and the levels' features are concatenated:
``[N, D] -> [N, L * F]``. A level whose corners fit the table is stored densely; finer
levels share the table through Instant-NGP's spatial hash. The math (and its
conventions: ``p = x * scale + 0.5``, ``res = floor(scale + 0.5) + 2`` corners a side,
points outside the cube clamped to it) is ``cuda/include/hash_math.h``; this module
holds its pure-torch reference and the autograd wrapper of the compiled kernels (the
OpenMP CPU op, and the CUDA op on GPUs), which agree with it on values and gradients
(tests/test_hash_encoding.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

PRIMES = (1, 2654435761, 805459861)
"""The spatial hash's per-axis multipliers (Instant-NGP's; the first is 1 for coherence)."""
BACKENDS = ("auto", "torch", "kernels")


@dataclass(frozen=True)
class HashGridConfig:
    """A hash grid: `dims` 2 or 3, `levels` L, `features` F per level (1, 2, 4 or 8),
    2^`log2_table_size` entries per level, level scales growing geometrically from
    `base_resolution` to `max_resolution` cells across the unit cube."""

    dims: int = 3
    levels: int = 16
    features: int = 2
    log2_table_size: int = 19
    base_resolution: int = 16
    max_resolution: int = 2048

    def __post_init__(self):
        if self.dims not in (2, 3):
            raise ValueError(f"hash grid dims must be 2 or 3, not {self.dims}")
        if self.features not in (1, 2, 4, 8):
            raise ValueError(f"hash grid features per level must be 1, 2, 4 or 8, not {self.features}")
        if not 1 <= self.levels <= 64 or not 4 <= self.log2_table_size <= 31:
            raise ValueError("hash grid: levels must be 1-64 and log2_table_size 4-31")
        if not 1 <= self.base_resolution <= self.max_resolution:
            raise ValueError("hash grid: base_resolution must be at least 1 and at most max_resolution")

    @property
    def table_size(self) -> int:
        return 1 << self.log2_table_size

    @property
    def out_features(self) -> int:
        return self.levels * self.features


def level_grid(cfg: HashGridConfig) -> tuple[Tensor, Tensor]:
    """(scales [L] float64, res [L] int32): each level's cells across the unit cube less
    one (Instant-NGP's `scale`) and its corners a side."""
    growth = math.exp(math.log(cfg.max_resolution / cfg.base_resolution) / max(cfg.levels - 1, 1))
    scales = torch.tensor([cfg.base_resolution * growth**level - 1 for level in range(cfg.levels)], dtype=torch.float64)
    res = (torch.floor(scales + 0.5) + 2).to(torch.int32)
    return scales, res


def hash_encode_reference(x: Tensor, table: Tensor, scales: Tensor, res: Tensor) -> Tensor:
    """The encoding in plain torch (autograd gives both gradients).

    x: [N, D] (D 2 or 3), table: [L, S, F] (S a power of two), scales: [L] (x's dtype),
    res: [L] int -> [N, L * F]."""
    N, D = x.shape
    L, S, F = table.shape
    xc = x.clamp(0, 1)
    corners = torch.tensor([[(c >> d) & 1 for d in range(D)] for c in range(1 << D)], device=x.device)  # [2^D, D]
    out = []
    for level in range(L):
        p = xc * scales[level] + 0.5
        cell = torch.floor(p)
        frac = p - cell
        coord = cell.long()[:, None, :] + corners  # [N, 2^D, D]
        weight = torch.where(corners.bool(), frac[:, None, :], 1 - frac[:, None, :]).prod(-1)  # [N, 2^D]
        r = int(res[level])
        if r**D <= S:  # dense
            index = sum(coord[..., d] * r**d for d in range(D))
        else:
            index = torch.zeros_like(coord[..., 0])
            for d in range(D):
                index = index ^ ((coord[..., d] * PRIMES[d]) & 0xFFFFFFFF)
            index = index & (S - 1)
        out.append((weight[..., None] * table[level][index]).sum(1))  # [N, F]
    return torch.cat(out, 1)


def _extension(device: torch.device):
    from recon.raster.kernels_backend import extension

    return extension(device)


class _HashEncode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, table, scales, res):
        ctx.save_for_backward(x, table, scales, res)
        return _extension(x.device).hash_encode_forward(x, table, scales, res)

    @staticmethod
    def backward(ctx, v_out):
        x, table, scales, res = ctx.saved_tensors
        v_table, v_x = _extension(x.device).hash_encode_backward(x, table, scales, res, v_out.contiguous(),
                                                                 ctx.needs_input_grad[0])
        return v_x, v_table, None, None


def hash_encode(x: Tensor, table: Tensor, scales: Tensor, res: Tensor, backend: str = "kernels") -> Tensor:
    """The encoding (see hash_encode_reference for shapes) by `backend`: "kernels" (our
    compiled op: OpenMP on CPU tensors, CUDA on GPU tensors) or "torch" (the reference)."""
    if backend == "torch":
        return hash_encode_reference(x, table, scales, res)
    if backend != "kernels":
        raise ValueError(f"hash encoding backend must be 'kernels' or 'torch', not {backend!r}")
    return _HashEncode.apply(x.contiguous(), table.contiguous(), scales.to(x.dtype).contiguous(),
                             res.to(torch.int32).contiguous())


class HashEncoding(nn.Module):
    """A learned hash grid: forward(x [N, D] in the unit cube) -> [N, L * F].

    backend: "auto" (the compiled kernels, else the torch reference if they cannot be
    built here), "kernels" or "torch"."""

    def __init__(self, cfg: HashGridConfig = HashGridConfig(), backend: str = "auto", init_range: float = 1e-4):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"hash encoding backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
        self.cfg, self.backend = cfg, backend
        # Instant-NGP's initialisation: small uniform features, so early levels do not fight.
        self.table = nn.Parameter(torch.empty(cfg.levels, cfg.table_size, cfg.features).uniform_(-init_range, init_range))
        scales, res = level_grid(cfg)
        self.register_buffer("scales", scales.float(), persistent=False)
        self.register_buffer("res", res, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.cfg.dims:
            raise ValueError(f"hash encoding of {self.cfg.dims}-d points got points of {x.shape[-1]} coordinates")
        flat = x.reshape(-1, self.cfg.dims).to(self.table.dtype)
        out = hash_encode(flat, self.table, self.scales.to(flat.dtype), self.res, self._resolved_backend())
        return out.reshape(*x.shape[:-1], self.cfg.out_features)

    def _resolved_backend(self) -> str:
        if self.backend != "auto":
            return self.backend
        from recon.raster._build import KernelBuildError
        from recon.raster.api import _announce_fallback

        try:
            _extension(self.table.device)
        except KernelBuildError as exc:
            _announce_fallback(exc, "the pure-torch hash encoding (avatar bench hash measures its cost)", stacklevel=4)
            return "torch"
        return "kernels"
