"""The residual deformation head's contract: shapes, identity start, gradients, and that it
can learn a motion-dependent deformation (so the motion path is wired, not decorative)."""

import pytest
import torch

from recon.deform import DeformationHead, DeformInputs, TriPlaneEncoding


def inputs(B=2, N=100, K=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return DeformInputs(xyz=(torch.rand(N, 3, generator=g) - 0.5) * 0.2,
                        motion=torch.randn(B, K, generator=g), eye=torch.rand(B, 1, generator=g))


@pytest.mark.parametrize("motion_only", [False, True])
def test_shapes_and_identity_start(motion_only):
    head = DeformationHead(motion_only=motion_only)
    out = head(inputs())
    assert out.d_xyz.shape == (2, 100, 3) and out.d_rot.shape == (2, 100, 4) and out.d_scale.shape == (2, 100, 3)
    assert out.motion_attention.shape == (2, 100, 1)
    for t in (out.d_xyz, out.d_rot, out.d_scale):
        assert torch.count_nonzero(t) == 0  # zero-initialised outputs


def test_gradients_reach_every_part():
    head = DeformationHead()
    torch.nn.init.normal_(head.out[-1].weight, std=0.1)  # leave the identity start
    out = head(inputs())
    (out.d_xyz.square().sum() + out.d_rot.sum() + out.d_scale.sum()).backward()
    for name, p in head.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_triplane_is_smooth_and_bounded():
    enc = TriPlaneEncoding(bound=0.1)
    x = torch.tensor([[0.0, 0.0, 0.0], [1e-4, 0.0, 0.0], [5.0, 5.0, 5.0]])
    f = enc(x)
    assert f.shape == (3, enc.out_dim)
    assert (f[0] - f[1]).abs().max() < 1e-2  # nearby points, nearby features
    assert torch.allclose(enc(torch.tensor([[0.1, 0.1, 0.1]])), f[2:3])  # outside: clamped to the border


def test_learns_motion_dependent_deformation():
    torch.manual_seed(0)
    head = DeformationHead(motion_only=True)
    x = inputs(B=2)
    x.motion[1] = -x.motion[0]  # two different mouth shapes
    target = torch.tensor([0.01, -0.01])[:, None, None] * torch.tensor([0.0, 1.0, 0.0])  # mouth opens / closes
    opt = torch.optim.Adam(head.parameters(), lr=3e-3)
    for _ in range(150):
        opt.zero_grad()
        loss = (head(x).d_xyz - target).square().mean()
        loss.backward()
        opt.step()
    out = head(x).d_xyz
    assert loss.item() < 1e-6
    assert out[0, :, 1].mean() > 0.008 and out[1, :, 1].mean() < -0.008


@pytest.mark.parametrize("motion_only", [False, True])
def test_split_first_layer_matches_the_plain_mlp_and_caches_in_inference(motion_only):
    head = DeformationHead(motion_only=motion_only)
    for p in head.out[-1].parameters():
        torch.nn.init.normal_(p, std=0.1)
    x = inputs(B=2, N=50)
    feats = head.encoding(x.xyz)
    cond = [torch.sigmoid(head.motion_gate(feats))[None] * x.motion[:, None]]
    if not motion_only:
        cond.append(torch.sigmoid(head.eye_gate(feats))[None] * x.eye[:, None])
    plain = head.out(torch.cat([feats[None].expand(2, -1, -1)] + [c.expand(2, 50, -1) for c in cond], -1))
    got = head(x)
    torch.testing.assert_close(got.d_xyz, plain[..., :3])
    head.eval()
    with torch.no_grad():
        first = head(x).d_xyz
        assert head._cache is not None
        torch.testing.assert_close(head(x).d_xyz, first)
        moved = DeformInputs(xyz=x.xyz + 0.01, motion=x.motion, eye=x.eye)
        assert not torch.allclose(head(moved).d_xyz, first)  # new positions are not served from the cache
