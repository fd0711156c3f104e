"""The avatar model, its densification and its conditioning, without a dataset."""

import math

import numpy as np
import pytest
import torch

from recon.conditioning import blink_schedule, normalize_mel, viseme_features
from recon.config import StageSchedule, TrainConfig, preset
from recon.densify import GradStats, densify_and_prune, reset_opacity
from recon.gaussians import FACE, MOUTH, Gaussians, rgb_to_sh_dc
from recon.model import AvatarModel
from recon.render import look_at, ping_pong
from recon.methods.gaussians import head_groups, stage_at


def random_gaussians(n_face=300, n_mouth=60, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = n_face + n_mouth
    sh = torch.zeros(n, 4, 3)
    sh[:, 0] = rgb_to_sh_dc(torch.rand(n, 3, generator=g))
    means = (torch.rand(n, 3, generator=g) - 0.5) * torch.tensor([0.16, 0.2, 0.1])
    means[n_face:, 2] -= 0.03  # the mouth sits behind the face
    return Gaussians(means, torch.randn(n, 4, generator=g), torch.full((n, 3), math.log(0.01)),
                     torch.full((n,), 1.0), sh,
                     torch.cat([torch.full((n_face,), FACE), torch.full((n_mouth,), MOUTH)]).to(torch.uint8))


def camera(size=48):
    K = torch.tensor([[60.0, 0, size / 2], [0, 60.0, size / 2], [0, 0, 1]])
    return look_at(torch.tensor([0.0, 0.0, 0.5]), torch.zeros(3)), K


def test_render_composites_mouth_under_face_over_background():
    model = AvatarModel(random_gaussians())
    viewmat, K = camera()
    under = torch.rand(48, 48, 3)
    motion = torch.randn(16)
    fr = model.render(viewmat, K, 48, under, motion, torch.ones(1), backend="torch")
    f, m = fr.face, fr.mouth
    expect = f.rgb + (1 - f.alpha) * (m.rgb + (1 - m.alpha) * under)
    torch.testing.assert_close(fr.image, expect)
    assert f.alpha.max() > 0.5 and m.alpha.max() > 0.1
    # Deformation heads start at the identity and there is no mesh rig: motion changes nothing yet.
    still = model.render(viewmat, K, 48, under, None, None, backend="torch")
    torch.testing.assert_close(fr.image, still.image)
    assert float(fr.deformation.detach()) == 0.0


def test_frozen_branch_and_idle_heads_get_no_gradient():
    model = AvatarModel(random_gaussians())
    viewmat, K = camera()
    fr = model.render(viewmat, K, 48, torch.zeros(48, 48, 3), torch.randn(16), torch.ones(1),
                      deform=(False, True), frozen=(True, False), backend="torch")
    fr.image.sum().backward()
    assert all(p.grad is None for p in model.face.parameters())
    assert all(p.grad is None for p in model.face_deform.parameters())
    assert model.mouth.sh_dc.grad is not None and model.mouth.sh_dc.grad.abs().sum() > 0
    # The mouth head's output layer starts at zero but receives gradient.
    assert model.mouth_deform.out[-1].weight.grad.abs().sum() > 0


def test_densification_statistics_are_collected():
    model = AvatarModel(random_gaussians())
    viewmat, K = camera()
    fr = model.render(viewmat, K, 48, torch.zeros(48, 48, 3), None, None, backend="torch")
    fr.face.means2d.retain_grad()
    fr.image.sum().backward()
    stats = GradStats(len(model.face))
    stats.update([fr.face], 48)
    assert stats.count.sum() > 0 and stats.mean().max() > 0


def test_densify_clones_splits_prunes_within_a_branch():
    torch.manual_seed(0)
    model = AvatarModel(random_gaussians())
    optim = torch.optim.Adam(head_groups(model, TrainConfig()))
    # Give Adam some state for every tensor.
    fr = model.render(*camera(), 48, torch.zeros(48, 48, 3), None, None, backend="torch")
    fr.image.sum().backward()
    optim.step()
    p = model.face
    n0, n_mouth = len(p), len(model.mouth)
    with torch.no_grad():
        p.log_scales[:10] = math.log(0.0005)  # small: cloned
        p.log_scales[10:20] = math.log(0.02)  # large: split
        p.opacity_logits[20:25] = -10  # transparent: pruned
    stats = GradStats(n0)
    stats.grad_sum[:20] = 1.0
    stats.count[:20] = 1
    counts = densify_and_prune(p, "face", optim, stats, grad_threshold=2e-4, extent=0.2, percent_dense=0.01,
                               prune_opacity=0.005, budget=100, generator=torch.Generator().manual_seed(0))
    assert counts == {"cloned": 10, "split": 10, "pruned": 5}
    assert len(p) == n0 + 10 + 10 - 5 and len(model.mouth) == n_mouth
    for name in ("means", "sh_dc", "opacity_logits"):
        t = getattr(p, name)
        group = next(g for g in optim.param_groups if g["name"] == f"face.{name}")
        assert group["params"][0] is t
        assert optim.state[t]["exp_avg"].shape == t.shape
    # Split children are 1.6x smaller than their parent.
    assert torch.allclose(p.log_scales[-10:], torch.full((10, 3), math.log(0.02 / 1.6)))
    # The budget bounds the count.
    stats = GradStats(len(p))
    stats.grad_sum[:] = 1.0
    stats.count[:] = 1
    before = len(p)
    densify_and_prune(p, "face", optim, stats, grad_threshold=2e-4, extent=0.2, percent_dense=0.01,
                      prune_opacity=0.0, budget=7, generator=torch.Generator().manual_seed(0))
    assert len(p) == before + 7
    reset_opacity(p, "face", optim)
    assert torch.sigmoid(p.opacity_logits).max() <= 0.01 + 1e-6


def test_stage_schedule_and_presets():
    cfg = TrainConfig(iterations=100, stages=StageSchedule(static=1, mouth=1, face=1, fuse=1))
    assert [stage_at(cfg, s) for s in (0, 24, 25, 50, 99)] == ["static", "static", "mouth", "face", "fuse"]
    assert preset("gpu").size == 512 and preset("cpu").size == 256
    assert preset("cpu", iterations=7, stages={"static": 2.0}).stages.static == 2.0
    with pytest.raises(ValueError, match="unknown"):
        preset("cpu", learning_rate=1)
    assert TrainConfig.from_dict(preset("demo").to_dict()) == preset("demo")


def test_conditioning():
    mel = np.random.default_rng(0).normal(3.0, 2.0, (30, 16, 80)).astype(np.float32)
    x = normalize_mel(mel)
    assert abs(float(x.mean())) < 1e-4 and abs(float(x.reshape(-1, 80).std(0).mean()) - 1) < 1e-2
    vis = np.eye(15, dtype=np.float32)[np.arange(30) % 15]
    torch.testing.assert_close(viseme_features({"mel": mel, "visemes": vis}), torch.from_numpy(vis))
    assert viseme_features({"mel": mel}).shape == (30, 15)  # a dataset made without visemes
    eye = blink_schedule(25 * 60, 25.0, seed=1)
    blinks = int(((eye[1:] < 0.5) & (eye[:-1] >= 0.5)).sum())
    assert 8 <= blinks <= 30 and eye.min() < 0.1 and eye.max() == 1.0
    assert [ping_pong(k, 3) for k in range(6)] == [0, 1, 2, 1, 0, 1]


def test_look_at_centres_the_target():
    viewmat = look_at(torch.tensor([0.3, 0.1, 0.4]), torch.tensor([0.0, 0.02, 0.0]))
    p = viewmat @ torch.tensor([0.0, 0.02, 0.0, 1.0])
    assert abs(float(p[0])) < 1e-6 and abs(float(p[1])) < 1e-6 and float(p[2]) > 0
    up = viewmat[:3, :3] @ torch.tensor([0.0, 1.0, 0.0])
    assert float(up[1]) < 0  # world up is image up (OpenCV y points down)


def test_config_values_are_type_checked():
    assert preset("cpu", lr_sh=1).lr_sh == 1.0
    for bad in ({"iterations": "many"}, {"iterations": 2.5}, {"size": True}, {"backend": 3}):
        with pytest.raises(ValueError, match="must be"):
            preset("cpu", **bad)
