"""The `gsplat` backend: gsplat 1.5.3's CUDA rasterization behind :func:`recon.raster.rasterize`.

It is the second GPU backend: a parity check for our own kernels, and what `auto` runs on
a CUDA device until they exist. gsplat keeps the same conventions as ours and 3DGS's (0.3
px^2 dilation, 1/255 alpha cut-off, 0.99 clamp, 1e-4 transmittance stop, SH + 0.5 clamped
at 0), so its outputs map one to one onto :class:`RasterOutput`: colours with the expected
depth as one more channel ("RGB+ED", 0 where nothing is hit), and unpacked [C, N, ...]
projections, whose `means2d` takes `.retain_grad()` for densification as ours does.

gsplat compiles its CUDA kernels on first use (minutes, needs the CUDA toolkit); the build
goes under the project's build folder (recon/raster/_build.py: build_root), like ours.
"""

from __future__ import annotations

from torch import Tensor

from .api import RasterOutput


def load_gsplat():
    """gsplat's `rasterization`, its CUDA kernels built; ImportError / RuntimeError (with
    gsplat's reason) when they cannot be."""
    from ._build import build_root

    build_root()  # TORCH_EXTENSIONS_DIR inside the project, before gsplat reads it
    from gsplat.cuda._backend import _C

    if _C is None:
        raise RuntimeError("gsplat found no CUDA toolkit to build its kernels with")
    from gsplat import rasterization

    return rasterization


def rasterize_gsplat(means: Tensor, quats: Tensor, scales: Tensor, opacities: Tensor, colors: Tensor,
                     viewmats: Tensor, Ks: Tensor, width: int, height: int, *, sh_degree: int | None,
                     backgrounds: Tensor | None, near_plane: float, far_plane: float, eps2d: float,
                     antialiased: bool, tile_size: int) -> RasterOutput:
    """As :func:`recon.raster.rasterize` (arguments already checked there), on gsplat."""
    rasterization = load_gsplat()
    C = viewmats.shape[0]
    if backgrounds is not None:
        backgrounds = backgrounds.expand(C, backgrounds.shape[-1])
    render, alpha, meta = rasterization(
        means, quats, scales, opacities, colors, viewmats, Ks, width, height, near_plane=near_plane,
        far_plane=far_plane, eps2d=eps2d, sh_degree=sh_degree, packed=False, tile_size=tile_size,
        backgrounds=backgrounds, render_mode="RGB+ED", rasterize_mode="antialiased" if antialiased else "classic")
    return RasterOutput(image=render[..., :-1], alpha=alpha, depth=render[..., -1:], means2d=meta["means2d"],
                        radii=meta["radii"], depths=meta["depths"], conics=meta["conics"], backend="gsplat")
