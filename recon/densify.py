"""3DGS adaptive density control, per branch: clone small Gaussians and split large ones
where the view-space positional gradient is high, prune transparent and oversized ones,
and reset opacities once. New points stay in the branch of their parent.

The optimizer holds one parameter group per tensor, named "<branch>.<tensor>" (for example
"face.means"), so its Adam moments can be cut and extended alongside the tensors.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .distributed import sum_over_ranks
from .model import BranchParams, Layer
from .raster.reference import quat_to_rotmat


class GradStats:
    """Running mean of the view-space positional gradient norm of one branch's Gaussians."""

    def __init__(self, n: int, device: torch.device | str = "cpu"):
        self.grad_sum = torch.zeros(n, device=device)  # [n]
        self.count = torch.zeros(n, device=device)  # [n]

    def update(self, layers: list[Layer], size: int, views: int = 1) -> None:
        """Add one step's gradients of layer.means2d (retain_grad was called on each), from
        `layers`, this process's views of the step, out of `views` views over every process
        whose losses were averaged. The step's sums are added up over the processes
        (recon/distributed.py) before they join the running ones, so every replica keeps
        the same statistics as one process with the whole batch."""
        step = torch.zeros(2, len(self.count), device=self.count.device)  # [grad norm sum, count]
        for layer in layers:
            if layer.means2d.grad is None:
                continue
            visible = (layer.radii > 0).all(-1)
            # Pixel gradients -> NDC units, where 3DGS's threshold (2e-4) is defined; times the
            # views, to undo the batch mean (gsplat does the same), so B views count as B steps.
            g = layer.means2d.grad.detach()[0] * ((size / 2) * views)
            step[0, visible] += g[visible].norm(dim=-1)
            step[1, visible] += 1
        sum_over_ranks(step)
        self.grad_sum += step[0]
        self.count += step[1]

    def mean(self) -> Tensor:
        return self.grad_sum / self.count.clamp_min(1)

    def state(self) -> dict[str, Tensor]:
        return {"grad_sum": self.grad_sum, "count": self.count}

    @classmethod
    def from_state(cls, state: dict[str, Tensor], device: torch.device | str = "cpu") -> "GradStats":
        s = cls(0)
        s.grad_sum, s.count = state["grad_sum"].to(device, copy=True), state["count"].to(device, copy=True)
        return s


def _group(optim: torch.optim.Optimizer, name: str) -> dict:
    for g in optim.param_groups:
        if g["name"] == name:
            return g
    raise KeyError(name)


def edit_branch(p: BranchParams, prefix: str, optim: torch.optim.Optimizer, keep: Tensor,
                extra: dict[str, Tensor]) -> None:
    """Replace every tensor t of the branch by cat(t[keep], extra[name]), in the module and in
    the optimizer (Adam moments of kept rows survive; new rows start at zero)."""
    for name in BranchParams.NAMES:
        old = getattr(p, name)
        new = nn.Parameter(torch.cat([old.detach()[keep], extra[name].to(old)]))
        group = _group(optim, f"{prefix}.{name}")
        state = optim.state.pop(old, None)
        if state:
            for k in ("exp_avg", "exp_avg_sq"):
                state[k] = torch.cat([state[k][keep], torch.zeros_like(extra[name])])
            optim.state[new] = state
        group["params"] = [new]
        setattr(p, name, new)


def densify_and_prune(p: BranchParams, prefix: str, optim: torch.optim.Optimizer, stats: GradStats, *,
                      grad_threshold: float, extent: float, percent_dense: float, prune_opacity: float,
                      budget: int, generator: torch.Generator) -> dict[str, int]:
    """One densification round for one branch; returns counts (cloned, split, pruned).

    budget: how many Gaussians this branch may add (the bounded total count); the highest
    gradients are served first.
    """
    with torch.no_grad():
        grads = stats.mean()
        scale_max = p.log_scales.exp().max(-1).values
        candidates = torch.nonzero(grads >= grad_threshold).squeeze(1)
        candidates = candidates[grads[candidates].argsort(descending=True)]
        small = scale_max[candidates] <= percent_dense * extent
        # A split adds one net point (two children replace the parent); a clone adds one.
        candidates = candidates[: max(budget, 0)]
        small = small[: len(candidates)]
        clone_idx, split_idx = candidates[small], candidates[~small]

        extra = {name: getattr(p, name).detach()[clone_idx] for name in BranchParams.NAMES}
        # Split: two children sampled from the parent's Gaussian, scales / 1.6 (3DGS).
        stds = p.log_scales.detach()[split_idx].exp().repeat(2, 1)
        samples = torch.randn(stds.shape, generator=generator, device="cpu").to(stds) * stds  # host generator
        rot = quat_to_rotmat(p.quats.detach()[split_idx]).repeat(2, 1, 1)
        children = {name: getattr(p, name).detach()[split_idx].repeat(2, *[1] * (getattr(p, name).dim() - 1))
                    for name in BranchParams.NAMES}
        children["means"] = children["means"] + (rot @ samples[..., None])[..., 0]
        children["log_scales"] = children["log_scales"] - math.log(1.6)
        extra = {k: torch.cat([extra[k], children[k]]) for k in extra}

        opacity = torch.sigmoid(p.opacity_logits.detach())
        prune = (opacity < prune_opacity) | (scale_max > 0.1 * extent)
        prune[split_idx] = True  # parents are replaced by their children
        keep = ~prune
        edit_branch(p, prefix, optim, keep, extra)
    return {"cloned": len(clone_idx), "split": len(split_idx), "pruned": int(prune.sum()) - len(split_idx)}


def reset_opacity(p: BranchParams, prefix: str, optim: torch.optim.Optimizer, value: float = 0.01) -> None:
    """Clamp opacities to at most `value` and clear their Adam moments (3DGS's reset)."""
    with torch.no_grad():
        p.opacity_logits.clamp_(max=math.log(value / (1 - value)))
    state = optim.state.get(p.opacity_logits)
    if state:
        state["exp_avg"].zero_()
        state["exp_avg_sq"].zero_()
