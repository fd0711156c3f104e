"""Autograd wrappers around our compiled kernels: the OpenMP CPU kernels (``cuda/cpu``)
for CPU tensors, the CUDA kernels (``cuda/kernels``) for CUDA tensors. Both extensions
expose the same functions with the same arguments, so one set of wrappers runs either.

Each Function mirrors one function of :mod:`recon.raster.reference`, with the same
arguments and outputs, so the pipeline in :mod:`recon.raster.api` runs either one.
Backward passes are hand-written (``*_backward`` kernels).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._build import load_cpu_extension, load_cuda_extension


def extension(device: torch.device):
    """The compiled kernels for tensors on `device` (built on first use)."""
    return load_cuda_extension() if device.type == "cuda" else load_cpu_extension()


class _Project(torch.autograd.Function):
    @staticmethod
    def forward(ctx, means, quats, scales, opacities, viewmats, Ks, width, height, eps2d, near, far, antialiased):
        radii, means2d, depths, conics, comps = extension(means.device).project_forward(
            means, quats, scales, opacities, viewmats, Ks, width, height, eps2d, near, far, antialiased
        )
        ctx.save_for_backward(means, quats, scales, viewmats, Ks, radii, conics, comps)
        ctx.args = (width, height, eps2d, antialiased)
        ctx.mark_non_differentiable(radii)
        return radii, means2d, depths, conics, comps

    @staticmethod
    def backward(ctx, _v_radii, v_means2d, v_depths, v_conics, v_comps):
        means, quats, scales, viewmats, Ks, radii, conics, comps = ctx.saved_tensors
        width, height, eps2d, antialiased = ctx.args
        v_means, v_quats, v_scales, v_viewmats = extension(means.device).project_backward(
            means, quats, scales, viewmats, Ks, width, height, eps2d, radii, conics, comps,
            v_means2d.contiguous(), v_depths.contiguous(), v_conics.contiguous(),
            v_comps.contiguous() if antialiased else None,
            ctx.needs_input_grad[4],
        )
        return (v_means, v_quats, v_scales, None, v_viewmats) + (None,) * 7


class _SphericalHarmonics(torch.autograd.Function):
    @staticmethod
    def forward(ctx, degree, dirs, coeffs):
        ctx.degree = degree
        ctx.save_for_backward(dirs, coeffs)
        return extension(dirs.device).sh_forward(degree, dirs, coeffs)

    @staticmethod
    def backward(ctx, v_colors):
        dirs, coeffs = ctx.saved_tensors
        v_dirs, v_coeffs = extension(dirs.device).sh_backward(
            ctx.degree, dirs, coeffs, v_colors.contiguous(), ctx.needs_input_grad[1]
        )
        return None, v_dirs, v_coeffs


class _Composite(torch.autograd.Function):
    @staticmethod
    def forward(ctx, means2d, conics, features, opacities, backgrounds, width, height, tile_size, tile_offsets, flat_ids):
        render, alpha, final_t, last_ids = extension(means2d.device).rasterize_forward(
            means2d, conics, features, opacities, backgrounds, width, height, tile_size, tile_offsets, flat_ids
        )
        ctx.save_for_backward(means2d, conics, features, opacities, backgrounds, tile_offsets, flat_ids, final_t, last_ids)
        ctx.args = (width, height, tile_size)
        return render, alpha

    @staticmethod
    def backward(ctx, v_render, v_alpha):
        means2d, conics, features, opacities, backgrounds, tile_offsets, flat_ids, final_t, last_ids = ctx.saved_tensors
        width, height, tile_size = ctx.args
        v_means2d, v_conics, v_features, v_opacities, v_backgrounds = extension(means2d.device).rasterize_backward(
            means2d, conics, features, opacities, backgrounds, width, height, tile_size,
            tile_offsets, flat_ids, final_t, last_ids,
            v_render.contiguous(), v_alpha[..., 0].contiguous(),
        )
        return v_means2d, v_conics, v_features, v_opacities, v_backgrounds, None, None, None, None, None


def project(means, quats, scales, opacities, viewmats, Ks, width, height, eps2d=0.3,
            near_plane=0.01, far_plane=1e10, antialiased=False):
    """Same contract as :func:`recon.raster.reference.project`."""
    return _Project.apply(
        means.contiguous(), quats.contiguous(), scales.contiguous(), opacities.detach().contiguous(),
        viewmats.contiguous(), Ks.contiguous(), width, height, eps2d, near_plane, far_plane, antialiased,
    )


def spherical_harmonics(degree: int, dirs: Tensor, coeffs: Tensor) -> Tensor:
    """Same contract as :func:`recon.raster.reference.spherical_harmonics`."""
    return _SphericalHarmonics.apply(degree, dirs.contiguous(), coeffs.contiguous())


@torch.no_grad()
def isect_tiles(means2d, radii, depths, tile_size, tiles_x, tiles_y):
    """Same contract as :func:`recon.raster.reference.isect_tiles`."""
    return extension(means2d.device).isect_tiles(
        means2d.contiguous(), radii.contiguous(), depths.contiguous(), tile_size, tiles_x, tiles_y
    )


def composite(means2d, conics, features, opacities, backgrounds, width, height, tile_size, tile_offsets, flat_ids):
    """Same contract as :func:`recon.raster.reference.composite`."""
    return _Composite.apply(
        means2d.contiguous(), conics.contiguous(), features.contiguous(), opacities.contiguous(),
        None if backgrounds is None else backgrounds.contiguous(),
        width, height, tile_size, tile_offsets, flat_ids,
    )
