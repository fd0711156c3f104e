"""The one rasterization entry point used by training, rendering and the viewer."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from types import ModuleType

import torch
from torch import Tensor

from avatar.errors import AvatarError

from . import kernels_backend, reference
from ._build import KernelBuildError

BACKENDS = ("auto", "torch", "cpu", "cuda", "gsplat")
TORCH_SLOWDOWN = 50
"""Forward + backward time of the torch backend over the CPU kernels (`avatar bench raster
--scenes head`: 20k Gaussians at 256^2 on 2 cores, 3327 vs 66 ms)."""
_fallbacks_announced: set[str] = set()


@dataclass
class RasterOutput:
    """Everything :func:`rasterize` returns. C cameras, N Gaussians, D channels."""

    image: Tensor
    """[C, H, W, D] composited colours/features, background blended in."""
    alpha: Tensor
    """[C, H, W, 1] accumulated opacity."""
    depth: Tensor
    """[C, H, W, 1] expected depth (alpha-normalised camera z; 0 where alpha = 0)."""
    means2d: Tensor
    """[C, N, 2] projected centres in pixels. Call ``.retain_grad()`` before backward to
    read the view-space positional gradient that 3DGS densification thresholds."""
    radii: Tensor
    """[C, N, 2] int32 screen-space half extents in pixels; 0 for culled Gaussians."""
    depths: Tensor
    """[C, N] camera-space z of each centre."""
    conics: Tensor
    """[C, N, 3] inverse 2D covariances (a, b, c) after the low-pass dilation."""
    backend: str
    """The backend that actually ran."""

    @property
    def visible(self) -> Tensor:
        """[C, N] bool: the Gaussian touched the image in that camera."""
        return (self.radii > 0).all(dim=-1)


class RasterizerArgumentError(ValueError):
    """An argument of :func:`rasterize` has the wrong shape, dtype, device or value."""


class BackendUnavailable(AvatarError):
    """The backend asked for cannot run on this machine."""


def check_backend(name: str, device: torch.device = torch.device("cpu")) -> str:
    """The backend `name` resolves to on `device` (building the kernels if needed); a named
    error when it cannot run here. Called before a stage starts, so it fails before
    anything is written."""
    return _pick_backend(name, device)[0]


def _check(
    means, quats, scales, opacities, colors, viewmats, Ks, width, height, sh_degree, backgrounds, tile_size
) -> tuple[int, int]:
    tensors = dict(means=means, quats=quats, scales=scales, opacities=opacities, colors=colors, viewmats=viewmats, Ks=Ks)
    if backgrounds is not None:
        tensors["backgrounds"] = backgrounds
    for name, t in tensors.items():
        if not isinstance(t, Tensor):
            raise RasterizerArgumentError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise RasterizerArgumentError(f"{name} must be floating point, got {t.dtype}")
        if t.dtype != means.dtype:
            raise RasterizerArgumentError(f"{name} has dtype {t.dtype} but means has {means.dtype}")
        if t.device != means.device:
            raise RasterizerArgumentError(f"{name} is on {t.device} but means is on {means.device}")
    if means.dim() != 2 or means.shape[1] != 3:
        raise RasterizerArgumentError(f"means must have shape [N, 3], got {list(means.shape)}")
    if viewmats.dim() != 3 or viewmats.shape[1:] != (4, 4):
        raise RasterizerArgumentError(f"viewmats must have shape [C, 4, 4], got {list(viewmats.shape)}")
    N, C = means.shape[0], viewmats.shape[0]
    expect = {"quats": ("[N, 4]", (N, 4)), "scales": ("[N, 3]", (N, 3)), "opacities": ("[N]", (N,)),
              "Ks": ("[C, 3, 3]", (C, 3, 3))}
    for name, (text, shape) in expect.items():
        if tuple(tensors[name].shape) != shape:
            raise RasterizerArgumentError(
                f"{name} must have shape {text}, got {list(tensors[name].shape)} "
                f"(N = {N} from means, C = {C} from viewmats)"
            )
    if C == 0:
        raise RasterizerArgumentError("viewmats must hold at least one camera")
    if sh_degree is not None:
        if not 0 <= sh_degree <= 3:
            raise RasterizerArgumentError(f"sh_degree must be in [0, 3], got {sh_degree}")
        nb = (sh_degree + 1) ** 2
        if colors.dim() != 3 or colors.shape[0] != N or colors.shape[2] != 3 or colors.shape[1] < nb:
            raise RasterizerArgumentError(
                f"with sh_degree={sh_degree}, colors must be SH coefficients [N, K>={nb}, 3], got {list(colors.shape)}"
            )
        D = 3
    else:
        if not (colors.dim() == 2 and colors.shape[0] == N) and not (
            colors.dim() == 3 and colors.shape[:2] == (C, N)
        ):
            raise RasterizerArgumentError(
                f"colors must be features [N, D] or [C, N, D] (or pass sh_degree for SH), got {list(colors.shape)}"
            )
        D = colors.shape[-1]
    if backgrounds is not None and tuple(backgrounds.shape) not in ((D,), (C, D)):
        raise RasterizerArgumentError(f"backgrounds must have shape [{D}] or [C, {D}], got {list(backgrounds.shape)}")
    if not (isinstance(width, int) and isinstance(height, int) and width > 0 and height > 0):
        raise RasterizerArgumentError(f"width and height must be positive ints, got {width!r} x {height!r}")
    if tile_size not in (8, 16, 32):
        raise RasterizerArgumentError(f"tile_size must be 8, 16 or 32, got {tile_size}")
    for name, t in tensors.items():
        if t.numel() and not bool(torch.isfinite(t).all()):
            raise RasterizerArgumentError(f"{name} contains NaN or Inf")
    if opacities.numel() and bool(((opacities < 0) | (opacities > 1)).any()):
        raise RasterizerArgumentError("opacities must lie in [0, 1] (apply sigmoid to logits first)")
    if scales.numel() and bool((scales < 0).any()):
        raise RasterizerArgumentError("scales must be non-negative (linear scales; apply exp to log-scales first)")
    return C, D


CUDA_KERNEL_LIMITS = {"max_channels": 3, "tile_size": 16}
"""What cuda/kernels are built for (rasterize.h: kMaxChannels = colour + depth, kTileSize)."""


def _cuda_kernels_refuse(dtype: torch.dtype, channels: int, tile_size: int) -> str | None:
    """Why our CUDA kernels cannot run these arguments, and which backend can (None: they
    can run them)."""
    if dtype != torch.float32:
        return f"backend 'cuda' takes float32 tensors, got {dtype} (the torch backend takes them)"
    if channels > CUDA_KERNEL_LIMITS["max_channels"]:
        return f"backend 'cuda' composites up to {CUDA_KERNEL_LIMITS['max_channels']} channels, got {channels} " \
               "(backend gsplat or torch takes them)"
    if tile_size != CUDA_KERNEL_LIMITS["tile_size"]:
        return f"backend 'cuda' uses {CUDA_KERNEL_LIMITS['tile_size']}x{CUDA_KERNEL_LIMITS['tile_size']} tiles, " \
               f"got tile_size={tile_size} (backend gsplat or torch takes them)"
    return None


def _pick_backend(name: str, device: torch.device, dtype: torch.dtype = torch.float32, channels: int = 3,
                  tile_size: int = 16) -> tuple[str, ModuleType]:
    if name not in BACKENDS:
        raise RasterizerArgumentError(f"backend must be one of {BACKENDS}, got {name!r}")
    if name in ("cuda", "gsplat") and device.type != "cuda":
        kernels = "our CUDA kernels" if name == "cuda" else "gsplat's CUDA kernels"
        raise BackendUnavailable(None, f"backend {name!r} runs {kernels}, and this run is on {device}"
                                 + ("" if torch.cuda.is_available() else " (this machine has no CUDA GPU)"),
                                 "use backend auto (the CPU kernels here), or --device cuda on a GPU")
    if name == "cpu" and device.type != "cpu":
        raise RasterizerArgumentError(f"backend='cpu' needs CPU tensors, got {device}")
    refused = _cuda_kernels_refuse(dtype, channels, tile_size)
    if name == "cuda" and refused:
        raise RasterizerArgumentError(refused)
    if name == "gsplat" and dtype != torch.float32:
        raise RasterizerArgumentError(f"backend 'gsplat' takes float32 tensors, got {dtype} (the torch backend "
                                      "takes them)")
    if name == "cuda" or (name == "auto" and device.type == "cuda" and not refused):
        from ._build import load_cuda_extension

        if _built_or_fallen_back(name, "cuda", load_cuda_extension, "gsplat's CUDA kernels"):
            return "cuda", kernels_backend
    if name == "gsplat" or (name == "auto" and device.type == "cuda" and dtype == torch.float32):
        from . import gsplat_backend

        try:
            gsplat_backend.load_gsplat()
            return "gsplat", gsplat_backend
        except (ImportError, RuntimeError, OSError) as exc:
            if name == "gsplat":
                raise BackendUnavailable(None, f"backend 'gsplat': its CUDA kernels cannot be built here ({exc})",
                                         "install the CUDA toolkit matching torch, or use backend torch") from exc
            _announce_fallback(KernelBuildError(f"gsplat's CUDA kernels cannot be built here ({exc})"), stacklevel=4)
    if name == "cpu" or (name == "auto" and device.type == "cpu"):
        from ._build import load_cpu_extension

        if _built_or_fallen_back(name, "cpu", load_cpu_extension):
            return "cpu", kernels_backend
    return "torch", reference


def _built_or_fallen_back(asked: str, backend: str, load, instead: str | None = None) -> bool:
    """Builds (or loads) `backend`'s kernels: True once they are there. Where they cannot
    be built, the build error when `backend` was asked for by name (retried despite a
    recorded failure: the user may have fixed the toolchain), else False with the
    fallback to `instead` announced."""
    try:
        load(retry=asked == backend)
        return True
    except KernelBuildError as exc:
        if asked == backend:
            raise
        _announce_fallback(exc, instead, stacklevel=5)
        return False


def _announce_fallback(exc: KernelBuildError, instead: str | None = None, *, stacklevel: int) -> None:
    """Said once per process and fallback: which backend runs instead, and what it costs.
    stacklevel: the frames from here up to the caller of rasterize() or check_backend()."""
    instead = instead or f"the pure-torch rasterizer, about {TORCH_SLOWDOWN}x slower for training " \
                         "(avatar bench raster measures it here)"
    if instead in _fallbacks_announced:
        return
    _fallbacks_announced.add(instead)
    warnings.warn(f"{exc}\nFalling back to {instead}.", RuntimeWarning, stacklevel=stacklevel)


def rasterize(
    means: Tensor,
    quats: Tensor,
    scales: Tensor,
    opacities: Tensor,
    colors: Tensor,
    viewmats: Tensor,
    Ks: Tensor,
    width: int,
    height: int,
    *,
    sh_degree: int | None = None,
    backgrounds: Tensor | None = None,
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    eps2d: float = 0.3,
    antialiased: bool = False,
    tile_size: int = 16,
    backend: str = "auto",
) -> RasterOutput:
    """Render 3D Gaussians into C pinhole cameras (3DGS conventions, differentiable).

    Args:
        means: [N, 3] world-space centres.
        quats: [N, 4] rotations as (w, x, y, z) quaternions; normalised internally.
        scales: [N, 3] **linear** standard deviations along the local axes (apply
            ``exp`` to log-scales before calling).
        opacities: [N] in [0, 1] (apply ``sigmoid`` to logits before calling).
        colors: SH coefficients [N, K, 3] when ``sh_degree`` is given (K >= (d+1)^2;
            colour = SH(view dir) + 0.5, clamped at 0 as in 3DGS), otherwise plain
            features [N, D] or per-camera features [C, N, D].
        viewmats: [C, 4, 4] world-to-camera (OpenCV axes: x right, y down, z forward).
        Ks: [C, 3, 3] pinhole intrinsics in pixels.
        width, height: image size in pixels.
        sh_degree: SH degree to evaluate (0..3), or None for plain features.
        backgrounds: [D] or [C, D] colour behind the Gaussians (default: none, i.e. 0).
        near_plane, far_plane: camera-z culling range.
        eps2d: low-pass dilation added to the 2D covariance (3DGS: 0.3 px^2).
        antialiased: scale opacity by sqrt(det / det_dilated) (Mip-Splatting's 2D
            filter), so small Gaussians do not bloat when rendered far away.
        tile_size: tile edge in pixels (16 as in 3DGS).
        backend: "auto" (the device's: the CPU kernels on a CPU, ours on a CUDA device,
            then gsplat's; torch where none can be built), "torch" (pure-PyTorch reference),
            "cpu" (OpenMP C++ kernels), "cuda" (our CUDA kernels: float32, up to 3
            channels, 16-pixel tiles; built with nvcc on first use; ``auto`` passes
            other arguments to gsplat), "gsplat" (gsplat 1.5.3's CUDA kernels).

    Returns:
        A :class:`RasterOutput`. Differentiable with respect to means, quats, scales,
        opacities, colors, viewmats and backgrounds (not Ks).
    """
    C, D = _check(means, quats, scales, opacities, colors, viewmats, Ks, width, height, sh_degree, backgrounds, tile_size)
    name, ops = _pick_backend(backend, means.device, means.dtype, D, tile_size)
    if name == "gsplat":
        return ops.rasterize_gsplat(means, quats, scales, opacities, colors, viewmats, Ks, width, height,
                                    sh_degree=sh_degree, backgrounds=backgrounds, near_plane=near_plane,
                                    far_plane=far_plane, eps2d=eps2d, antialiased=antialiased, tile_size=tile_size)
    N = means.shape[0]

    radii, means2d, depths, conics, comps = ops.project(
        means, quats, scales, opacities, viewmats, Ks, width, height, eps2d, near_plane, far_plane, antialiased
    )
    if sh_degree is not None:
        # View direction from each camera centre (-R^T t) to each Gaussian.
        campos = -torch.einsum("cji,cj->ci", viewmats[:, :3, :3], viewmats[:, :3, 3])  # [C, 3]
        dirs = means[None] - campos[:, None]  # [C, N, 3]
        feats = torch.clamp_min(ops.spherical_harmonics(sh_degree, dirs, colors) + 0.5, 0.0)
    else:
        feats = colors.expand(C, N, D) if colors.dim() == 2 else colors
    opac = opacities[None].expand(C, N)
    if antialiased:
        opac = opac * comps
    # Depth rides along as one more channel, so one compositing pass yields both.
    feats = torch.cat([feats, depths[..., None]], dim=-1)
    bg = None
    if backgrounds is not None:
        bg = torch.cat([backgrounds.expand(C, D), torch.zeros_like(backgrounds.expand(C, D)[:, :1])], dim=-1)

    tiles_x, tiles_y = reference.tile_grid(width, height, tile_size)
    tile_offsets, flat_ids = ops.isect_tiles(means2d, radii, depths, tile_size, tiles_x, tiles_y)
    render, alpha = ops.composite(
        means2d, conics, feats, opac, bg, width, height, tile_size, tile_offsets, flat_ids
    )
    image, depth_acc = render[..., :D], render[..., D:]
    depth = torch.where(alpha > 0, depth_acc / alpha.clamp_min(1e-10), torch.zeros_like(depth_acc))
    return RasterOutput(
        image=image, alpha=alpha, depth=depth, means2d=means2d, radii=radii,
        depths=depths, conics=conics, backend=name,
    )
