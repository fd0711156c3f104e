"""Pose corrections (eval's pose-only fit): rigid transforms, and a gradient through the
rasterizer that finds a misregistered frame's pose."""

import math

import torch

from recon.pose import correction_matrix
from recon.raster import rasterize
from test_recon_model import camera, random_gaussians


def test_corrections_are_rigid_and_start_at_identity():
    torch.testing.assert_close(correction_matrix(torch.zeros(6)), torch.eye(4))
    T = correction_matrix(torch.tensor([0.0, math.radians(10), 0.0, 1.0, -2.0, 0.5]))
    R = T[:3, :3]
    torch.testing.assert_close(R @ R.T, torch.eye(3), atol=1e-6, rtol=0)
    assert abs(float(torch.linalg.det(R)) - 1) < 1e-6
    torch.testing.assert_close(T[:3, 3], torch.tensor([0.01, -0.02, 0.005]))  # centimetres -> metres
    assert abs(float(R[0, 2]) - math.sin(math.radians(10))) < 1e-6  # a yaw of 10 degrees


def test_gradient_finds_a_misregistered_frame():
    g = random_gaussians(n_face=400, n_mouth=0)
    viewmat, K = camera(48)
    means, quats, scales, opacities = g.activated()

    def render(V):
        return rasterize(means, quats, scales, opacities, g.sh, V[None], K[None], 48, 48, sh_degree=0,
                         backend="torch").image[0]

    truth = torch.tensor([0.0, math.radians(3), math.radians(-2), 0.3, -0.2, 0.0])
    target = render(viewmat)
    captured = viewmat @ torch.linalg.inv(correction_matrix(truth))  # capture's pose is off
    delta = torch.zeros(6, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=5e-3)
    start = float((render(captured) - target).abs().mean())
    for _ in range(100):
        loss = (render(captured @ correction_matrix(delta)) - target).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.3 * start
    assert float((delta.detach() - truth)[:3].norm()) < 0.25 * float(truth[:3].norm())


def test_half_size_camera_sees_the_pooled_frame():
    """Eval's pose fit renders at half size with K[:2] halved: the same picture as the
    full-size render pooled 2x2, so the pose it fits there is the frame's pose."""
    from recon.evaluate import half_size

    g = random_gaussians(n_face=400, n_mouth=0)
    viewmat, K = camera(64)
    means, quats, scales, opacities = g.activated()

    def render(K, size):
        return rasterize(means, quats, scales, opacities, g.sh, viewmat[None], K[None], size, size, sh_degree=0,
                         backend="torch").image[0]

    full = half_size(render(K, 64))
    K_half = K.clone()
    K_half[:2] *= 0.5
    error = float((render(K_half, 32) - full).abs().mean())
    assert error < 0.2 * float(full.mean())  # what differs: the 0.3 px dilation, at half size
    K_off = K_half.clone()
    K_off[:2, 2] += 0.5  # the half-pixel slip of scaling pixel indices instead of coordinates
    assert error < 0.6 * float((render(K_off, 32) - full).abs().mean())
