"""Image losses and metrics: L1, SSIM (3DGS's 11x11 Gaussian window), PSNR."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def _window(size: int = 11, sigma: float = 1.5, device: torch.device | None = None) -> Tensor:
    """1D Gaussian taps; the 2D window is their outer product, applied separably."""
    x = torch.arange(size, dtype=torch.float32, device=device) - size // 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def ssim_map(a: Tensor, b: Tensor) -> Tensor:
    """Per-pixel SSIM of two images [H, W, C] in [0, 1] -> [H, W] (mean over channels)."""
    C = a.shape[-1]
    x, y = a.permute(2, 0, 1)[None], b.permute(2, 0, 1)[None]
    g = _window(device=a.device).to(a.dtype)
    wx, wy = g.reshape(1, 1, 1, 11).expand(5 * C, 1, 1, 11), g.reshape(1, 1, 11, 1).expand(5 * C, 1, 11, 1)

    def blur(t: Tensor) -> Tensor:
        t = F.conv2d(F.pad(t, (5, 5, 0, 0)), wx, groups=t.shape[1])
        return F.conv2d(F.pad(t, (0, 0, 5, 5)), wy, groups=t.shape[1])

    # One grouped convolution for all five moments (zero padding, as 3DGS's conv2d).
    mx, my, xx, yy, xy = blur(torch.cat([x, y, x * x, y * y, x * y], 1)).split(C, 1)
    sxx, syy, sxy = xx - mx**2, yy - my**2, xy - mx * my
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx**2 + my**2 + c1) * (sxx + syy + c2))
    return s[0].mean(0)


def photometric_loss(pred: Tensor, gt: Tensor, ssim_weight: float, weight: Tensor | None = None) -> Tensor:
    """(1 - w) L1 + w (1 - SSIM), as 3DGS. weight: optional [H, W] per-pixel L1 weights."""
    l1 = (pred - gt).abs().mean(-1)
    l1 = (l1 * weight).sum() / weight.sum().clamp_min(1) if weight is not None else l1.mean()
    return (1 - ssim_weight) * l1 + ssim_weight * (1 - ssim_map(pred, gt).mean())


def psnr(pred: Tensor, gt: Tensor, mask: Tensor | None = None) -> float:
    """PSNR in dB over all pixels, or over mask [H, W] (bool) only."""
    se = ((pred - gt) ** 2).mean(-1)
    mse = float(se[mask].mean()) if mask is not None else float(se.mean())
    return 10 * math.log10(1 / max(mse, 1e-10))


def ssim(pred: Tensor, gt: Tensor, mask: Tensor | None = None) -> float:
    """Mean SSIM over all pixels, or over mask [H, W] (bool) only."""
    m = ssim_map(pred, gt)
    return float(m[mask].mean()) if mask is not None else float(m.mean())


def boundary_columns(upper: Tensor, lower: Tensor, margin: int = 6) -> tuple[Tensor, Tensor]:
    """Where a region `upper` [H, W] bool ends directly above a region `lower` [H, W] bool
    (the head's mask over the torso's): (rows [C], the last row of `upper` in each such
    column; cols [C]), with `margin` rows to spare above and below."""
    H = upper.shape[0]
    rows = torch.arange(H, device=upper.device)[:, None].expand_as(upper)
    last = torch.where(upper, rows, -1).max(0).values  # lowest row of `upper` per column
    cols = torch.nonzero((last >= margin) & (last < H - margin - 1)).squeeze(1)
    cols = cols[lower[last[cols] + 1, cols] & lower[(last[cols] + 2).clamp(max=H - 1), cols]]
    return last[cols], cols


def boundary_seam(pred: Tensor, gt: Tensor, upper: Tensor, lower: Tensor, band: int = 3, ref: tuple[int, int] = (4, 6)) -> float | None:
    """How visible the boundary between two regions stacked vertically (the head's mask
    `upper` over the torso's `lower`, [H, W] bool) is in `pred` [H, W, 3] beyond what the
    real frame `gt` shows there, in 8-bit levels; None where they do not meet.

    Down each column where `upper` ends directly above `lower`, the signed error pred - gt
    at the rows within `band` of the boundary is compared with its mean at the rows
    `ref` away on both sides: a uniform error (the torso a little dark) is no seam, a line
    or a step in the error at the boundary is (a step of s levels reads s / 2). The mean
    over columns of the largest difference is returned.
    """
    y, cols = boundary_columns(upper, lower, ref[1])
    if not len(cols):
        return None
    H = upper.shape[0]
    err = pred - gt
    on = pred.device
    near = torch.arange(-band, band + 1, device=on)
    far = torch.cat([torch.arange(-ref[1], -ref[0] + 1, device=on), torch.arange(ref[0], ref[1] + 1, device=on)])
    e_near = err[(y[:, None] + near).clamp(0, H - 1), cols[:, None]]  # [C, 2 band + 1, 3]
    e_far = err[(y[:, None] + far).clamp(0, H - 1), cols[:, None]].mean(1, keepdim=True)
    return float((e_near - e_far).abs().mean(-1).max(1).values.mean()) * 255


def boundary_coverage(alpha: Tensor, upper: Tensor, lower: Tensor, band: int = 2) -> float | None:
    """Mean of `alpha` [H, W] within `band` rows of where `upper` ends above `lower` (see
    boundary_columns); None where they do not meet. With head-or-torso alpha: 1 when no
    background shows through at the neck."""
    y, cols = boundary_columns(upper, lower, band)
    if not len(cols):
        return None
    near = (y[:, None] + torch.arange(-band, band + 1, device=alpha.device)).clamp(0, alpha.shape[0] - 1)
    return float(alpha[near, cols[:, None]].mean())
