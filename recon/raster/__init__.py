"""Differentiable 3D Gaussian rasterization with four backends.

>>> from recon.raster import rasterize
>>> out = rasterize(means, quats, scales, opacities, colors, viewmats, Ks, W, H)
>>> out.image  # [C, H, W, D]

Backends: ``torch`` (pure-PyTorch reference, :mod:`.reference`), ``cpu`` (OpenMP C++
kernels built from ``cuda/cpu``, :mod:`.cpu_backend`), ``gsplat`` (gsplat's CUDA kernels,
:mod:`.gsplat_backend`), ``cuda`` (custom CUDA kernels, not built yet).
"""

from .api import BACKENDS, BackendUnavailable, RasterizerArgumentError, RasterOutput, rasterize

__all__ = ["BACKENDS", "BackendUnavailable", "RasterOutput", "RasterizerArgumentError", "rasterize"]
