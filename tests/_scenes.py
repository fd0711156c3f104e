"""Small random scenes for the rasterizer tests."""

import math

import torch
import torch.nn.functional as F

from bench.scenes import Scene


def look_at_viewmat(eye, target=(0.0, 0.0, 0.0), up=(0.0, -1.0, 0.0)) -> torch.Tensor:
    """World-to-camera matrix (OpenCV axes) of a camera at `eye` looking at `target`."""
    eye, target, up = (torch.tensor(v, dtype=torch.float64) for v in (eye, target, up))
    z = F.normalize(target - eye, dim=0)
    x = F.normalize(torch.linalg.cross(z, up), dim=0)
    y = torch.linalg.cross(z, x)
    R = torch.stack([x, y, z])
    V = torch.eye(4, dtype=torch.float64)
    V[:3, :3] = R
    V[:3, 3] = -R @ eye
    return V.float()


def random_scene(n=300, cameras=2, width=70, height=45, sh_degree=None, feat_dim=3, seed=0,
                 scale_range=(0.02, 0.12), opacity_range=(0.05, 0.95)) -> Scene:
    g = torch.Generator().manual_seed(seed)
    means = (torch.rand(n, 3, generator=g) - 0.5) * 2.0
    quats = torch.randn(n, 4, generator=g)
    lo, hi = (math.log(v) for v in scale_range)
    scales = torch.exp(torch.rand(n, 3, generator=g) * (hi - lo) + lo)
    opacities = torch.rand(n, generator=g) * (opacity_range[1] - opacity_range[0]) + opacity_range[0]
    if sh_degree is None:
        colors = torch.rand(n, feat_dim, generator=g)
    else:
        colors = torch.randn(n, (sh_degree + 1) ** 2, 3, generator=g) * 0.3
    viewmats, Ks = [], []
    for c in range(cameras):
        a = 2 * math.pi * c / max(cameras, 1) + 0.3
        eye = (3.0 * math.sin(a), 0.4 * (c % 2) - 0.2, -3.0 * math.cos(a))
        viewmats.append(look_at_viewmat(eye))
        f = 0.9 * width + 5 * c
        Ks.append(torch.tensor([[f, 0.0, width / 2 + c], [0.0, f * 1.02, height / 2 - c], [0.0, 0.0, 1.0]]))
    return Scene("random", means, quats, scales, opacities, colors, torch.stack(viewmats), torch.stack(Ks),
                 width, height, sh_degree)


# A training schedule small enough for tests: 64 px, 60 steps, every stage visited.
TINY_TRAIN = dict(size=64, iterations=60, motion_steps=100, live_motion_steps=20, live_copies=2, init_volume_points=1500, init_mouth_points=200, max_gaussians=2500,
                  checkpoint_every=20, log_every=5, densify_every=10, densify_from=0.1, densify_until=0.8,
                  opacity_reset_at=0.0, torso_steps=20, init_torso_points=300, max_torso_gaussians=800)


def run_until_killed(trainer, steps_done: int) -> None:
    """Run `trainer` (recon.engine.Trainer) as if the process were killed right after its
    step `steps_done`: checkpoints written before then stay, nothing after."""
    import pytest

    after_step = trainer.method.after_step

    def killed(done, optim, progress):
        if done == steps_done:
            raise KeyboardInterrupt
        return after_step(done, optim, progress)

    trainer.method.after_step = killed
    with pytest.raises(KeyboardInterrupt):
        trainer.run(progress=False)
