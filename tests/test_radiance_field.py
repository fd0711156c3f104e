"""The radiance-field method's rendering (recon/fields/volume.py) on fields whose images
are known in closed form, and the method itself (recon/methods/nerf.py)."""

import math

import pytest
import torch

from _scenes import run_until_killed
from recon.fields.volume import OccupancyGrid, box_span, camera_rays, render_rays

LO, HI = torch.tensor([-0.2, -0.2, -0.2]), torch.tensor([0.2, 0.2, 0.2])


def sphere_field(sigma: float, radius: float = 0.1, colour=(0.2, 0.5, 0.9)):
    """A ball of constant density and colour at the origin."""
    c = torch.tensor(colour)

    def field(xyz, ray):
        inside = xyz.norm(dim=-1) < radius
        return torch.where(inside, sigma, 0.0), c.expand(len(xyz), 3)

    return field


def looking_at_origin(distance: float = 1.0, size: int = 32, focal: float = 80.0):
    viewmat = torch.eye(4)
    viewmat[2, 3] = distance  # camera at z = -distance, looking along +z
    K = torch.tensor([[focal, 0, size / 2], [0, focal, size / 2], [0, 0, 1.0]])
    return viewmat, K


def test_rays_leave_the_camera_through_their_pixels_and_span_the_box():
    viewmat, K = looking_at_origin()
    pixels = torch.tensor([[16.0, 16.0], [24.0, 10.0]])
    o, d = camera_rays(viewmat, K, pixels)
    assert torch.allclose(o, torch.tensor([0.0, 0.0, -1.0]).expand(2, 3))
    assert torch.allclose(d[0], torch.tensor([0.0, 0.0, 1.0]))
    assert torch.allclose(d[1] / d[1, 2], torch.tensor([8 / 80, -6 / 80, 1.0]))  # back through K
    near, far = box_span(o, d, LO, HI)
    assert torch.allclose(near[0], torch.tensor(0.8)) and torch.allclose(far[0], torch.tensor(1.2))
    near, far = box_span(o, torch.tensor([[0.0, 1.0, 0.0]]).expand(2, 3), LO, HI)
    assert (far <= near).all()  # parallel to the box, outside it: a miss


def test_a_ball_of_constant_density_absorbs_as_beer_lambert_says():
    """alpha = 1 - exp(-sigma * chord) through a ball, colour its own, depth the middle of
    the chord for a thin ball; the same with the occupancy grid, for fewer evaluations."""
    sigma, radius = 8.0, 0.1
    field = sphere_field(sigma, radius)
    o = torch.tensor([[0.0, 0.0, -1.0]]).expand(5, 3)
    b = torch.tensor([0.0, 0.03, 0.05, 0.08, 0.15])  # impact parameters
    d = torch.stack([torch.zeros(5), b, torch.ones(5)], 1)
    d = d / d.norm(dim=-1, keepdim=True)
    near, far = box_span(o, d, LO, HI)
    miss_distance = b / torch.sqrt(1 + b**2)
    chord = 2 * torch.sqrt((radius**2 - miss_distance**2).clamp_min(0))
    out = render_rays(field, o, d, near, far, step=5e-4)
    torch.testing.assert_close(out.alpha[:, 0], 1 - torch.exp(-sigma * chord), atol=2e-3, rtol=0)
    torch.testing.assert_close(out.rgb, out.alpha * torch.tensor([0.2, 0.5, 0.9]), atol=1e-5, rtol=0)

    grid = OccupancyGrid(LO, HI, resolution=32, step=5e-4)
    g = torch.Generator().manual_seed(0)
    for _ in range(10):  # as training updates it: a random point of each cell each time, the maximum kept
        share = grid.update(lambda xyz: field(xyz, None)[0], g)
    ball_share = (4 / 3 * math.pi * radius**3) / 0.4**3
    assert ball_share < share < 2 * ball_share  # the ball's cells and the ones its surface crosses
    fast = render_rays(field, o, d, near, far, step=5e-4, grid=grid)
    torch.testing.assert_close(fast.alpha, out.alpha, atol=1e-6, rtol=0)
    assert fast.samples < 0.6 * out.samples  # the empty part of the box is skipped
    assert grid.is_occupied(torch.zeros(1, 3)) and not grid.is_occupied(torch.tensor([[0.19, 0.19, 0.19]]))


def test_rays_stop_once_opaque():
    """A dense ball: alpha 1, and the ray stops at its front."""
    o = torch.tensor([[0.0, 0.0, -1.0]])
    d = torch.tensor([[0.0, 0.0, 1.0]])
    near, far = box_span(o, d, LO, HI)
    out = render_rays(sphere_field(2000.0), o, d, near, far, step=1e-3, block=8)
    assert out.alpha.item() > 1 - 1e-4
    assert out.samples <= 100 + 16  # the 100 before the ball, then a block or two of its 200: not the box's 400
    assert abs(out.depth.item() - 0.9) < 2e-3  # at the ball's front surface


def test_gradients_reach_the_field():
    o = torch.tensor([[0.0, 0.0, -1.0]])
    d = torch.tensor([[0.0, 0.0, 1.0]])
    near, far = box_span(o, d, LO, HI)
    sigma = torch.tensor(5.0, requires_grad=True)

    def field(xyz, ray):
        return torch.where(xyz.norm(dim=-1) < 0.1, sigma, torch.zeros(())), torch.ones(len(xyz), 3)

    out = render_rays(field, o, d, near, far, step=1e-3)
    out.alpha.sum().backward()
    expected = 0.2 * math.exp(-5.0 * 0.2)  # d/dsigma (1 - exp(-sigma * chord))
    assert abs(sigma.grad.item() - expected) < 2e-3



def dense_reference(field, o, d, near, far, step):
    """nerfacc's own compositing (its batched layout, pure torch on any device) of the
    samples render_rays takes with no grid: the middles of `step`s from where each ray
    enters the box: (rgb, alpha, depth weighted by alpha)."""
    nerfacc = pytest.importorskip("nerfacc")
    S = int(((far - near).max() / step).ceil())
    mid = near[:, None] + (torch.arange(S) + 0.5) * step  # [R, S]
    inside = mid < far[:, None]

    def rgb_sigma(t0, t1, ray_indices):
        xyz = o[:, None] + ((t0 + t1) / 2)[..., None] * d[:, None]
        density, rgb = field(xyz.reshape(-1, 3), None)
        return rgb.reshape(*t0.shape, 3), torch.where(inside, density.reshape(t0.shape), 0.0)

    rgb, alpha, depth, _ = nerfacc.rendering(mid - step / 2, mid + step / 2, rgb_sigma_fn=rgb_sigma)
    return rgb, alpha, depth * alpha


def test_our_compositing_is_nerfaccs():
    """render_rays against nerfacc's volume rendering of the same samples: a ball with a
    colour gradient, rays through its middle, its edge and past it."""
    def field(xyz, ray):
        inside = xyz.norm(dim=-1) < 0.12
        return torch.where(inside, 30.0, 0.0), torch.sigmoid(xyz * 10 + torch.tensor([0.0, 0.5, -0.5]))

    viewmat, K = looking_at_origin(size=24)
    pixels = torch.stack(torch.meshgrid(torch.arange(24.0), torch.arange(24.0), indexing="xy"), -1).reshape(-1, 2) + 0.5
    o, d = camera_rays(viewmat, K, pixels)
    near, far = box_span(o, d, LO, HI)
    ours = render_rays(field, o, d, near, far, step=2e-3, block=8)
    rgb, alpha, depth = dense_reference(field, o, d, near, far, 2e-3)
    assert 0.2 < float(alpha.mean()) < 0.8  # the ball, and rays that miss it
    for mine, theirs in ((ours.rgb, rgb), (ours.alpha, alpha), (ours.depth, depth)):
        torch.testing.assert_close(mine, theirs, atol=3e-4, rtol=0)  # what the 1e-4 stop leaves out


def test_nerfacc_marching_is_for_cuda_tensors():
    from recon.fields.nerfacc_marching import nerfacc_unavailable

    assert "CUDA" in nerfacc_unavailable(torch.device("cpu"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CI has none)")
def test_nerfacc_marches_as_we_do_on_gpu():
    """On CUDA, nerfacc's estimator over our occupancy grid renders what render_rays does,
    and its gradients reach the field."""
    from recon.fields.nerfacc_marching import NerfaccMarcher, nerfacc_unavailable

    device = torch.device("cuda")
    assert nerfacc_unavailable(device) is None, nerfacc_unavailable(device)
    sigma = torch.tensor(30.0, device=device, requires_grad=True)

    def field(xyz, ray):
        inside = xyz.norm(dim=-1) < 0.12
        return torch.where(inside, sigma, 0.0), torch.sigmoid(xyz * 10)

    grid = OccupancyGrid(LO, HI, resolution=32, step=2e-3).to(device)
    for _ in range(4):
        grid.update(lambda xyz: field(xyz, None)[0].detach())
    viewmat, K = looking_at_origin(size=48)
    pixels = torch.stack(torch.meshgrid(torch.arange(48.0), torch.arange(48.0), indexing="xy"), -1).reshape(-1, 2) + 0.5
    o, d = camera_rays(viewmat.to(device), K.to(device), pixels.to(device))
    near, far = box_span(o, d, LO.to(device), HI.to(device))
    ours = render_rays(field, o, d, near, far, step=2e-3, grid=grid)
    theirs = NerfaccMarcher(grid).render(field, o, d, near, far, step=2e-3)
    torch.testing.assert_close(theirs.alpha, ours.alpha, atol=2e-2, rtol=0)
    torch.testing.assert_close(theirs.rgb, ours.rgb, atol=2e-2, rtol=0)
    assert theirs.samples <= 1.1 * ours.samples
    theirs.alpha.sum().backward()
    assert sigma.grad is not None and sigma.grad.abs() > 0

NERF_TINY = dict(iterations=400, size=64, rays_per_view=512, levels=8, log2_table_size=12, max_resolution=128,
                 hidden=32, steps_across=64, occupancy_resolution=16, occupancy_every=8, motion_steps=20,
                 live_motion_steps=20, live_copies=2,
                 checkpoint_every=100, log_every=25, cache_frames=16)


@pytest.fixture(scope="module")
def tiny_nerf(sample_dataset, tmp_path_factory):
    """A radiance-field avatar of the sample dataset (NERF_TINY, trained once): its folder."""
    from recon.engine import train
    from recon.methods.nerf import RadianceFieldAvatar

    cfg = RadianceFieldAvatar.config("demo", **NERF_TINY)
    return train(sample_dataset, tmp_path_factory.mktemp("nerf") / "a", cfg, method="nerf", progress=False)


def test_the_radiance_field_trains_checkpoints_and_resumes(tiny_nerf, sample_dataset, tmp_path):
    """`--method nerf` through the engine: it learns (the training PSNR rises), and a run
    killed after step 163 and resumed from its step-100 checkpoint ends where the
    uninterrupted run did (rays, jitter and occupancy refreshes are drawn per step)."""
    import json

    from recon.checkpoint import load_checkpoint
    from recon.engine import Trainer, train
    from recon.methods.nerf import RadianceFieldAvatar

    cfg = RadianceFieldAvatar.config("demo", **NERF_TINY)
    out = tiny_nerf
    tensors, meta = load_checkpoint(out / "checkpoint.safetensors")
    assert meta["method"] == "nerf" and meta["step"] == 400 and meta["speech"]
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert log[-1]["psnr"] > log[0]["psnr"] + 3, [r["psnr"] for r in log]
    assert 0 < log[-1]["occupied"] < 1 and (out / "motion.json").is_file()

    cut = Trainer(sample_dataset, tmp_path / "b", cfg, resume=False, progress=False, method="nerf")
    run_until_killed(cut, 163)
    resumed = train(sample_dataset, tmp_path / "b", None, resume=True, progress=False)
    again, _ = load_checkpoint(resumed / "checkpoint.safetensors")
    for key in ("model.field.planes.0.table", "model.field.density_net.0.weight", "model.grid.density"):
        torch.testing.assert_close(again[key], tensors[key])


def test_a_trained_radiance_field_renders_evaluates_exports_and_shows(tiny_nerf, speech_wav, tmp_path):
    """The avatar opens through load_avatar, and render, eval and the viewer take it
    unchanged; it exports its surface as a mesh, and has no Gaussians to export."""
    import numpy as np

    from avatar.errors import AvatarError
    from avatar.media import open_media
    from recon.avatar_dir import load_avatar
    from recon.evaluate import evaluate
    from recon.export import export
    from recon.methods.nerf import TrainedRadianceField
    from recon.render import render_video
    from viewer.avatar_view import ViewRenderer, ViewSettings, load_track, render_modes

    out = tiny_nerf
    av = load_avatar(out)
    assert isinstance(av, TrainedRadianceField)
    summary = render_video(out, speech_wav, tmp_path / "dataset.mp4", camera="dataset", progress=False)
    with open_media(summary["video"], "video", "") as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert len(frames) == summary["frames"] > 20 and np.std(np.stack(frames).astype(np.float32)) > 5
    result = evaluate(out, progress=False, train_fit_frames=2, pose_fit_frames=1)
    assert np.isfinite(result["psnr"]) and result["per_frame"] and (out / "eval_strip.png").is_file()
    assert result["pose_fit"]["per_frame"][0]["psnr_face_fitted_pose"] is not None  # gradients reach the pose
    with pytest.raises(AvatarError, match="'nerf', which has no 3D Gaussians to export"):
        export(out, tmp_path / "head.ply", progress=False)
    from plyfile import PlyData

    lo, hi = av.model.lo, av.model.hi
    for frame in (None, 3):  # the canonical head, and as in dataset frame 3
        path = export(out, mesh=tmp_path / f"mesh_{frame}.ply", frame=frame, mesh_resolution=48, progress=False)[0]
        ply = PlyData.read(str(path))
        xyz = torch.tensor(np.stack([ply["vertex"][k] for k in "xyz"], 1))
        faces = np.stack(ply["face"]["vertex_indices"])
        assert len(xyz) > 200 and len(faces) > 200 and faces.max() < len(xyz)
        assert ((xyz >= lo - 1e-6) & (xyz <= hi + 1e-6)).all()
        assert np.ptp(np.stack([ply["vertex"][k] for k in ("red", "green", "blue")]), 1).max() > 20  # coloured
    renderer = ViewRenderer(av)
    track = load_track(speech_wav, av)
    viewmat, K = renderer.rig.at(10.0, 5.0), renderer.intrinsics(0.6, 40, 32)
    for mode in render_modes(av):
        rgb, _ = renderer.render(viewmat, K, 40, 32, track.drive.codes(3), ViewSettings(mode=mode, torso="none"))
        assert rgb.shape == (32, 40, 3)
