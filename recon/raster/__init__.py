"""Differentiable 3D Gaussian rasterization with four backends.

>>> from recon.raster import rasterize
>>> out = rasterize(means, quats, scales, opacities, colors, viewmats, Ks, W, H)
>>> out.image  # [C, H, W, D]

Backends: ``torch`` (pure-PyTorch reference, :mod:`.reference`), ``cpu`` (OpenMP C++
kernels built from ``cuda/cpu``) and ``cuda`` (our CUDA kernels built with nvcc from
``cuda/kernels``), both through :mod:`.kernels_backend`, and ``gsplat`` (gsplat's CUDA
kernels, :mod:`.gsplat_backend`).
"""

from .api import BACKENDS, BackendUnavailable, RasterizerArgumentError, RasterOutput, rasterize

__all__ = ["BACKENDS", "BackendUnavailable", "RasterOutput", "RasterizerArgumentError", "rasterize"]
