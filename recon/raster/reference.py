"""Pure-PyTorch reference rasterizer.

Readable, differentiable through autograd, and the ground truth that the native
backends are tested against. Each function mirrors one native operation in
``cuda/cpu`` (and the math of ``cuda/include/splat_math.h``) and returns the same
tensors. Compositing is tiled and gradient-checkpointed per chunk of tiles, so memory
stays bounded (256x256 with 50k Gaussians fits in a few GB, forward and backward).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

ALPHA_MIN = 1.0 / 255.0  # contributions below this are skipped
ALPHA_MAX = 0.99  # alpha clamp
TRANSMITTANCE_MIN = 1e-4  # front-to-back early stop
CLIP_FOV = 0.3  # Jacobian clamp margin beyond the frustum


def quat_to_rotmat(quats: Tensor) -> Tensor:
    """quats: [..., 4] (wxyz, any norm) -> rotation matrices [..., 3, 3]."""
    w, x, y, z = F.normalize(quats, dim=-1).unbind(-1)
    R = torch.stack(
        [
            1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
            2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
            2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
        ],
        dim=-1,
    )
    return R.reshape(quats.shape[:-1] + (3, 3))


def quat_scale_to_covar(quats: Tensor, scales: Tensor) -> Tensor:
    """quats: [N, 4], scales: [N, 3] (linear) -> covariances R S S^T R^T [N, 3, 3]."""
    M = quat_to_rotmat(quats) * scales[..., None, :]
    return M @ M.transpose(-1, -2)


def extent_sigmas(opacities: Tensor) -> Tensor:
    """Opacity-aware extent in standard deviations: beyond it alpha < 1/255.

    opacities: [...] -> [...]; 0 where the Gaussian can never reach 1/255.
    """
    q = 2.0 * torch.log(opacities / ALPHA_MIN)
    return torch.where(q > 0, torch.sqrt(q.clamp_min(0)), torch.zeros_like(q))


def project(
    means: Tensor,
    quats: Tensor,
    scales: Tensor,
    opacities: Tensor,
    viewmats: Tensor,
    Ks: Tensor,
    width: int,
    height: int,
    eps2d: float = 0.3,
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    antialiased: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """EWA projection of 3D Gaussians into C cameras.

    Args:
        means: [N, 3]; quats: [N, 4] (wxyz); scales: [N, 3] (linear); opacities: [N].
        viewmats: [C, 4, 4] world-to-camera; Ks: [C, 3, 3].

    Returns:
        radii [C, N, 2] int32 (0 = culled), means2d [C, N, 2], depths [C, N],
        conics [C, N, 3] (inverse 2D covariance a, b, c), compensations [C, N]
        (antialiasing factor sqrt(det / det_dilated)). Culled entries of means2d,
        conics and compensations are zero and carry no gradient.
    """
    R = viewmats[:, :3, :3]  # [C, 3, 3]
    t = viewmats[:, :3, 3]  # [C, 3]
    p_c = torch.einsum("cij,nj->cni", R, means) + t[:, None]  # [C, N, 3]
    cov_c = R[:, None] @ quat_scale_to_covar(quats, scales)[None] @ R[:, None].transpose(-1, -2)

    x, y, depths = p_c.unbind(-1)
    in_range = (depths > near_plane) & (depths < far_plane)
    # Culled Gaussians get a harmless depth so no inf/NaN reaches the backward pass.
    z = torch.where(in_range, depths, torch.ones_like(depths))
    fx, fy = Ks[:, 0, 0, None], Ks[:, 1, 1, None]  # [C, 1]
    cx, cy = Ks[:, 0, 2, None], Ks[:, 1, 2, None]
    # The Jacobian is evaluated at the mean clamped to the widened frustum (3DGS).
    tan_fovx, tan_fovy = 0.5 * width / fx, 0.5 * height / fy
    lim_x_pos = (width - cx) / fx + CLIP_FOV * tan_fovx
    lim_x_neg = cx / fx + CLIP_FOV * tan_fovx
    lim_y_pos = (height - cy) / fy + CLIP_FOV * tan_fovy
    lim_y_neg = cy / fy + CLIP_FOV * tan_fovy
    tx = z * torch.minimum(lim_x_pos, torch.maximum(-lim_x_neg, x / z))
    ty = z * torch.minimum(lim_y_pos, torch.maximum(-lim_y_neg, y / z))
    zeros = torch.zeros_like(z)
    J = torch.stack(
        [fx / z, zeros, -fx * tx / z**2, zeros, fy / z, -fy * ty / z**2], dim=-1
    ).reshape(z.shape + (2, 3))
    cov2d = J @ cov_c @ J.transpose(-1, -2)  # [C, N, 2, 2]
    means2d = torch.stack([fx * x / z + cx, fy * y / z + cy], dim=-1)

    det_orig = cov2d[..., 0, 0] * cov2d[..., 1, 1] - cov2d[..., 0, 1] * cov2d[..., 1, 0]
    cov2d = cov2d + eps2d * torch.eye(2, dtype=cov2d.dtype, device=cov2d.device)
    det = cov2d[..., 0, 0] * cov2d[..., 1, 1] - cov2d[..., 0, 1] * cov2d[..., 1, 0]
    ok_det = det > 0
    safe_det = torch.where(ok_det, det, torch.ones_like(det))
    ratio = det_orig / safe_det
    pos = ok_det & (ratio > 0)
    comp = torch.where(pos, torch.sqrt(torch.where(pos, ratio, 1.0)), 0.0)
    conics = torch.stack(
        [
            cov2d[..., 1, 1] / safe_det,
            -0.5 * (cov2d[..., 0, 1] + cov2d[..., 1, 0]) / safe_det,
            cov2d[..., 0, 0] / safe_det,
        ],
        dim=-1,
    )

    with torch.no_grad():
        o = opacities[None].expand_as(z) * (comp if antialiased else 1.0)
        k = extent_sigmas(o)
        rx = torch.ceil(k * torch.sqrt(cov2d[..., 0, 0].clamp_min(0)))
        ry = torch.ceil(k * torch.sqrt(cov2d[..., 1, 1].clamp_min(0)))
        valid = in_range & ok_det & (k > 0) & (rx > 0) & (ry > 0)
        mx, my = means2d[..., 0], means2d[..., 1]
        valid &= (mx + rx > 0) & (mx - rx < width) & (my + ry > 0) & (my - ry < height)
        valid &= torch.isfinite(mx) & torch.isfinite(my)
        radii = torch.stack([rx, ry], dim=-1) * valid[..., None]
        radii = torch.nan_to_num(radii).to(torch.int32)

    v = valid[..., None]
    means2d = torch.where(v, means2d, 0.0)
    conics = torch.where(v, conics, 0.0)
    comp = torch.where(valid, comp, 0.0)
    return radii, means2d, depths, conics, comp


def spherical_harmonics(degree: int, dirs: Tensor, coeffs: Tensor) -> Tensor:
    """Evaluate SH colour. dirs: [C, N, 3] (any length), coeffs: [N, K, 3] -> [C, N, 3].

    Real SH up to degree 3 in the ordering and constants of 3DGS / gsplat.
    """
    if not 0 <= degree <= 3:
        raise ValueError(f"sh degree must be in [0, 3], got {degree}")
    x, y, z = F.normalize(dirs, dim=-1).unbind(-1)
    b = [torch.full_like(x, 0.2820947917738781)]
    if degree >= 1:
        b += [-0.48860251190292 * y, 0.48860251190292 * z, -0.48860251190292 * x]
    if degree >= 2:
        z2, c1, s1 = z * z, x * x - y * y, 2 * x * y
        b += [
            0.5462742152960395 * s1,
            -1.092548430592079 * z * y,
            0.9461746957575601 * z2 - 0.3153915652525201,
            -1.092548430592079 * z * x,
            0.5462742152960395 * c1,
        ]
    if degree >= 3:
        tc = -2.285228997322329 * z2 + 0.4570457994644658
        tb = 1.445305721320277 * z
        ta = -0.5900435899266435
        c2, s2 = x * c1 - y * s1, x * s1 + y * c1
        b += [
            ta * s2, tb * s1, tc * y,
            z * (1.865881662950577 * z2 - 1.119528997770346),
            tc * x, tb * c1, ta * c2,
        ]
    basis = torch.stack(b, dim=-1)  # [C, N, nb]
    return torch.einsum("cnk,nkd->cnd", basis, coeffs[:, : basis.shape[-1]])


@torch.no_grad()
def isect_tiles(
    means2d: Tensor, radii: Tensor, depths: Tensor, tile_size: int, tiles_x: int, tiles_y: int
) -> tuple[Tensor, Tensor]:
    """List every visible Gaussian in each tile its extent touches, depth-sorted.

    Args: means2d [C, N, 2], radii [C, N, 2], depths [C, N].
    Returns: tile_offsets [C, tiles_y, tiles_x] int64 (start of each tile's list in
        flat_ids) and flat_ids [M] int64 (index c * N + n), sorted by (camera, tile,
        depth), ties by index.
    """
    C, N = depths.shape
    device = means2d.device
    m = means2d.float().reshape(-1, 2)
    r = radii.float().reshape(-1, 2)
    # Same float arithmetic as the native kernel (cuda/cpu/tile_intersect.cpp).
    lo = torch.floor((m - r) / tile_size).to(torch.int64)
    hi = torch.ceil((m + r) / tile_size).to(torch.int64)
    lim = torch.tensor([tiles_x, tiles_y], device=device)
    lo = torch.minimum(lo.clamp_min(0), lim)
    hi = torch.minimum(hi.clamp_min(0), lim)
    visible = (radii.reshape(-1, 2) > 0).all(-1)
    span = (hi - lo) * visible[:, None]
    counts = span[:, 0] * span[:, 1]  # tiles per Gaussian
    gauss = torch.repeat_interleave(torch.arange(C * N, device=device), counts)
    first = torch.cumsum(counts, 0) - counts
    local = torch.arange(gauss.numel(), device=device) - first[gauss]
    w = span[gauss, 0].clamp_min(1)
    tx = lo[gauss, 0] + local % w
    ty = lo[gauss, 1] + local // w
    tile = (gauss // N) * (tiles_x * tiles_y) + ty * tiles_x + tx
    # Sort by depth, then stably by tile: a (tile, depth, index) order.
    depth_key = depths.reshape(-1).float()[gauss]
    order = torch.sort(depth_key, stable=True).indices
    order = order[torch.sort(tile[order], stable=True).indices]
    flat_ids = gauss[order]
    n_tiles = C * tiles_x * tiles_y
    per_tile = torch.bincount(tile, minlength=n_tiles)
    offsets = (torch.cumsum(per_tile, 0) - per_tile).reshape(C, tiles_y, tiles_x)
    return offsets, flat_ids


def _composite_tiles(
    pix: Tensor,
    ids: Tensor,
    valid: Tensor,
    means2d: Tensor,
    conics: Tensor,
    features: Tensor,
    opacities: Tensor,
) -> tuple[Tensor, Tensor]:
    """Composite a batch of B tiles with at most K Gaussians each.

    pix: [B, P, 2] pixel centres; ids: [B, K] flat Gaussian ids, depth-ordered;
    valid: [B, K]; means2d [CN, 2], conics [CN, 3], features [CN, D], opacities [CN].
    Returns accumulated features [B, P, D] and transmittance [B, P].
    """
    d = pix[:, None, :, :] - means2d[ids][:, :, None, :]  # [B, K, P, 2]
    a, b, c = conics[ids].unbind(-1)  # [B, K]
    dx, dy = d[..., 0], d[..., 1]
    sigma = 0.5 * (a[..., None] * dx * dx + c[..., None] * dy * dy) + b[..., None] * dx * dy
    alpha = torch.clamp_max(opacities[ids][..., None] * torch.exp(-sigma), ALPHA_MAX)
    keep = valid[..., None] & (sigma >= 0) & (alpha >= ALPHA_MIN)
    alpha = torch.where(keep, alpha, 0.0)  # [B, K, P]
    t_after = torch.cumprod(1 - alpha, dim=1)
    # Front-to-back stop: a Gaussian is composited only while transmittance stays >= 1e-4.
    alpha = torch.where(t_after >= TRANSMITTANCE_MIN, alpha, 0.0)
    t_after = torch.cumprod(1 - alpha, dim=1)
    t_before = torch.cat([torch.ones_like(t_after[:, :1]), t_after[:, :-1]], dim=1)
    weights = alpha * t_before  # [B, K, P]
    acc = torch.einsum("bkp,bkd->bpd", weights, features[ids])
    return acc, t_after[:, -1]


def composite(
    means2d: Tensor,
    conics: Tensor,
    features: Tensor,
    opacities: Tensor,
    backgrounds: Tensor | None,
    width: int,
    height: int,
    tile_size: int,
    tile_offsets: Tensor,
    flat_ids: Tensor,
    chunk_elems: int = 1 << 22,
) -> tuple[Tensor, Tensor]:
    """Front-to-back alpha compositing over 16x16 tiles.

    Args:
        means2d [C, N, 2], conics [C, N, 3], features [C, N, D], opacities [C, N],
        backgrounds [C, D] or None, tile_offsets / flat_ids from :func:`isect_tiles`.
        chunk_elems: budget of (tiles x Gaussians x pixels) evaluated at once.

    Returns:
        render [C, H, W, D] (background blended in), alpha [C, H, W, 1].
    """
    C, N, D = features.shape
    tiles_y, tiles_x = tile_offsets.shape[1:]
    n_tiles = C * tiles_y * tiles_x
    device, dtype = means2d.device, means2d.dtype
    P = tile_size * tile_size
    starts = tile_offsets.reshape(-1)
    ends = torch.cat([starts[1:], torch.tensor([flat_ids.numel()], device=device)])
    counts = ends - starts

    # Pixel centres of every tile: [n_tiles, P, 2].
    off = torch.arange(tile_size, device=device, dtype=dtype) + 0.5
    oy, ox = torch.meshgrid(off, off, indexing="ij")
    local = torch.stack([ox, oy], -1).reshape(P, 2)
    t = torch.arange(tiles_y * tiles_x, device=device)
    origin = torch.stack([t % tiles_x, t // tiles_x], -1).to(dtype) * tile_size

    flat = (means2d.reshape(-1, 2), conics.reshape(-1, 3), features.reshape(-1, D), opacities.reshape(-1))
    acc = torch.zeros(n_tiles, P, D, device=device, dtype=dtype)
    trans = torch.ones(n_tiles, P, device=device, dtype=dtype)
    # Group tiles of similar length so padding stays small.
    order = torch.argsort(counts, descending=True, stable=True)
    counts_sorted = counts[order].tolist()
    use_ckpt = torch.is_grad_enabled() and any(x.requires_grad for x in flat)
    i = 0
    while i < n_tiles and counts_sorted[i] > 0:
        K = counts_sorted[i]
        B = max(1, min(n_tiles - i, chunk_elems // (K * P)))
        tiles = order[i : i + B]
        i += B
        k = torch.arange(K, device=device)
        idx = starts[tiles, None] + k
        valid = k < counts[tiles, None]
        ids = flat_ids[torch.where(valid, idx, 0).clamp_max(max(flat_ids.numel() - 1, 0))]
        pix = origin[tiles % (tiles_y * tiles_x), None] + local
        args = (pix, ids, valid) + flat
        a_chunk, t_chunk = (
            checkpoint(_composite_tiles, *args, use_reentrant=False) if use_ckpt else _composite_tiles(*args)
        )
        acc = acc.index_copy(0, tiles, a_chunk)
        trans = trans.index_copy(0, tiles, t_chunk)
    if i == 0 and use_ckpt:
        # Nothing to composite: keep the output in the graph so backward yields zeros.
        acc = acc + sum(x.sum() for x in flat) * 0

    def untile(x: Tensor) -> Tensor:  # [n_tiles, P, E] -> [C, H, W, E]
        E = x.shape[-1]
        x = x.reshape(C, tiles_y, tiles_x, tile_size, tile_size, E).permute(0, 1, 3, 2, 4, 5)
        return x.reshape(C, tiles_y * tile_size, tiles_x * tile_size, E)[:, :height, :width]

    render, trans = untile(acc), untile(trans[..., None])
    if backgrounds is not None:
        render = render + trans * backgrounds[:, None, None, :]
    return render, 1 - trans


def tile_grid(width: int, height: int, tile_size: int) -> tuple[int, int]:
    """Number of tiles (x, y) covering an image."""
    return math.ceil(width / tile_size), math.ceil(height / tile_size)
