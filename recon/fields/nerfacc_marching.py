"""Ray marching and compositing by nerfacc on CUDA (its `OccGridEstimator` and `rendering`),
the GPU counterpart of volume.render_rays.

The occupancy grid stays ours (volume.OccupancyGrid: what a checkpoint holds, what the
CPU renders with); before marching, its cells are copied into a one-level nerfacc
estimator over the same box, so the two paths skip the same empty space. Samples sit
where ours do: `step` apart from where a ray enters the box, at `jitter` (training) or
the middle of their steps, and a ray stops under STOP_TRANSMITTANCE. nerfacc drops the
invisible samples with a no-grad pass of the density first, then composites the rest
with gradients, all in its CUDA kernels (the jagged samples of many rays in one launch,
where our torch loop goes in rounds).

nerfacc's kernels are compiled on first use (minutes; they need the CUDA toolkit), and
only for CUDA tensors: `nerfacc_unavailable` says why they cannot be used.
"""

from __future__ import annotations

from torch import Tensor

from .volume import STOP_TRANSMITTANCE, Field, OccupancyGrid, RayResult


def nerfacc_unavailable(device) -> str | None:
    """None when nerfacc's CUDA marching can run on `device`, else why not."""
    if getattr(device, "type", str(device)) != "cuda":
        return "nerfacc's marching runs on CUDA tensors only"
    try:
        from nerfacc.cuda._backend import _C  # builds nerfacc's kernels (once) when nvcc is there
    except ImportError as exc:
        return f"nerfacc is not installed ({exc}); pip install 'avatar-studio[nerf]'"
    except Exception as exc:  # noqa: BLE001 - a failed JIT build raises whatever the toolchain raised
        return f"nerfacc's CUDA kernels did not build ({type(exc).__name__}: {exc})"
    if _C is None:
        return "nerfacc found no CUDA toolkit (nvcc) to build its kernels with"
    return None


class NerfaccMarcher:
    """nerfacc's estimator over `grid`'s box, kept in step with `grid`'s cells."""

    def __init__(self, grid: OccupancyGrid):
        from nerfacc import OccGridEstimator

        self.grid = grid
        self.estimator = OccGridEstimator(roi_aabb=[*grid.lo.tolist(), *grid.hi.tolist()],
                                          resolution=grid.resolution, levels=1).to(grid.lo.device)

    def render(self, field: Field, origins: Tensor, dirs: Tensor, near: Tensor, far: Tensor, step: float,
               jitter: Tensor | None = None, stop: float = STOP_TRANSMITTANCE) -> RayResult:
        """volume.render_rays' result for rays [R] (the same arguments, the grid fixed)."""
        import nerfacc

        self.estimator.binaries[0] = self.grid.occupied
        offset = 0.5 if jitter is None else jitter
        # nerfacc samples the middles of steps from where it starts (never before the box):
        # start so that they fall where ours do, less a first one in the box's outer half-step.
        start = near + ((offset - 0.5) % 1.0) * step

        def at(t0: Tensor, t1: Tensor, ray: Tensor) -> tuple[Tensor, Tensor]:
            ray = ray.long()
            return field(origins[ray] + dirs[ray] * ((t0 + t1) / 2)[:, None], ray)

        ray, t0, t1 = self.estimator.sampling(origins, dirs, sigma_fn=lambda *s: at(*s)[0], t_min=start, t_max=far,
                                              render_step_size=step, early_stop_eps=stop, alpha_thre=0.0)

        def rgb_sigma(a: Tensor, b: Tensor, r: Tensor) -> tuple[Tensor, Tensor]:
            density, rgb = at(a, b, r)
            return rgb, density

        rgb, alpha, depth, _ = nerfacc.rendering(t0, t1, ray, n_rays=len(origins), rgb_sigma_fn=rgb_sigma)
        return RayResult(rgb, alpha, depth * alpha, int(len(ray)))  # our depth is weighted, not normalised
