"""The neck-and-shoulders branch (recon/torso.py): its rotation helpers, its two-bone blend,
its initialisation from the person masks, the seam measure, and a trained avatar's torso
in rendering, evaluation and export."""

from __future__ import annotations

import math
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch

from avatar.errors import AvatarError
from capture.pose import so3_exp
from recon.dataset import world_to_camera
from recon.gaussians import TORSO, Gaussians
from recon.losses import boundary_seam
from recon.raster.reference import quat_to_rotmat
from recon.torso import (TorsoModel, body_motion, mean_pose, pose_features, quat_multiply, refine_tracks,
                         rotmat_to_quat, track_body, twist)


def rigid(r: list[float], t: list[float]) -> torch.Tensor:
    out = torch.eye(4)
    out[:3, :3] = so3_exp(torch.tensor([r]))[0]
    out[:3, 3] = torch.tensor(t)
    return out


def test_rotmat_to_quat_inverts_quat_to_rotmat_at_any_angle():
    g = torch.Generator().manual_seed(0)
    axes = torch.nn.functional.normalize(torch.randn(64, 3, generator=g), dim=-1)
    angles = torch.linspace(0.0, math.pi * 0.999, 64)[:, None]  # up to a half turn: every Shepperd branch
    for R in so3_exp(axes * angles):
        q = rotmat_to_quat(R)
        assert q[0] >= 0 and torch.allclose(q.norm(), torch.tensor(1.0), atol=1e-5)
        torch.testing.assert_close(quat_to_rotmat(q[None])[0], R, atol=2e-5, rtol=0)


def test_quat_multiply_composes_rotations():
    a, b = so3_exp(torch.tensor([[0.3, -0.2, 0.5], [-0.7, 0.1, 0.2]]))
    qa, qb = rotmat_to_quat(a), rotmat_to_quat(b)
    torch.testing.assert_close(quat_to_rotmat(quat_multiply(qa, qb)[None])[0], a @ b, atol=1e-5, rtol=0)


def test_mean_pose_and_body_motion():
    poses = torch.stack([rigid([0.0, 0.1, 0.0], [0.0, 0.0, 0.7]), rigid([0.0, -0.1, 0.0], [0.02, 0.0, 0.7])])
    ref = mean_pose(poses)
    torch.testing.assert_close(ref[:3, :3], torch.eye(3), atol=1e-6, rtol=0)  # symmetric turns average out
    torch.testing.assert_close(ref[:3, 3], torch.tensor([0.01, 0.0, 0.7]))
    torch.testing.assert_close(body_motion(ref, ref), torch.eye(4), atol=1e-6, rtol=0)
    assert pose_features(torch.eye(4)).abs().max() == 0


def _torso(points: torch.Tensor, neck_y: float) -> TorsoModel:
    n = len(points)
    g = Gaussians(points, torch.tensor([1.0, 0, 0, 0]).expand(n, 4).clone(), torch.full((n, 3), -5.0),
                  torch.zeros(n), torch.zeros(n, 4, 3), torch.full((n,), TORSO, dtype=torch.uint8))
    return TorsoModel(g, torch.eye(4), neck_y, torch.eye(4)[None])


def test_torso_blend_neck_follows_head_shoulders_follow_body():
    # A point high on the neck, one on the shoulders far below it.
    points = torch.tensor([[0.0, -0.10, 0.0], [0.15, -0.30, -0.02]])
    torso = _torso(points, neck_y=-0.16)
    g, penalty = torso.deformed(None)
    torch.testing.assert_close(g.means, points)  # the reference pose: where it was made
    assert float(penalty.detach()) == 0 and (g.branch == TORSO).all()
    A = rigid([0.0, 0.4, 0.0], [0.03, 0.0, 0.0])  # the head turned: the body turned the other way
    moved, _ = torso.deformed(A)
    body = points @ A[:3, :3].T + A[:3, 3]
    assert (moved.means[0] - points[0]).norm() < 1e-3  # the neck under the chin stays with the head
    assert (moved.means[1] - body[1]).norm() < 1e-4  # the shoulders stay with the body
    q = moved.quats[1] / moved.quats[1].norm()
    torch.testing.assert_close(quat_to_rotmat(q[None])[0], A[:3, :3], atol=1e-4, rtol=0)  # and turn with it


class ShiftedFrames:
    """A stand-in dataset: one textured image shifted and turned by known amounts per frame."""

    def __init__(self, shifts: list[tuple[float, float, float, float]], size: int = 96):
        base = cv2.GaussianBlur(np.random.default_rng(0).random((size, size)).astype(np.float32), (0, 0), 3.0)
        self.size, self.K = size, torch.tensor([[100.0, 0, 48], [0, 100.0, 48], [0, 0, 1]])
        self.frames = []
        for dx, dy, deg, scale in shifts:
            W = cv2.getRotationMatrix2D((48.0, 48.0), -deg, scale)  # about the principal point
            W[:, 2] += (dx, dy)
            img = cv2.warpAffine(base, W, (size, size), borderMode=cv2.BORDER_REFLECT)
            self.frames.append(SimpleNamespace(image=torch.from_numpy(np.repeat(img[..., None], 3, -1))))

    def __len__(self):
        return len(self.frames)

    def __getitem__(self, i):
        return self.frames[i]


def test_track_body_recovers_shifts_turns_and_depth():
    shifts = [(0.0, 0.0, 0.0, 1.0)] * 5 + [(1.0, -0.5, 0.5, 1.0), (3.0, -2.0, 1.0, 1.02), (1.0, 1.0, -0.5, 0.99),
                                           (-4.0, 1.0, -1.5, 1.0)]
    ds = ShiftedFrames(shifts)
    body = np.zeros((96, 96), bool)
    body[20:76, 20:76] = True
    tracks = track_body(ds, list(range(5)), body, depth=0.5)  # the median of 5 still frames is the template
    for (dx, dy, deg, scale), M in zip(shifts, tracks):
        depth = 0.5 + float(M[2, 3])  # the body came closer by the scale
        assert depth == pytest.approx(0.5 / scale, abs=5e-4)
        assert float(M[0, 3]) * 100 / depth == pytest.approx(dx, abs=0.15)  # metres at its depth -> pixels
        assert float(M[1, 3]) * 100 / depth == pytest.approx(dy, abs=0.15)
        assert math.degrees(math.atan2(float(M[1, 0]), float(M[0, 0]))) == pytest.approx(deg, abs=0.25)
        assert torch.allclose(M[2, :3], torch.tensor([0.0, 0.0, 1.0]))


class RenderedBody:
    """A stand-in dataset: a textured chest rendered by its own torso model under known
    corrections of its track (camera 0.75 m in front of it, nothing of a head in view)."""

    def __init__(self, torso: TorsoModel, model, truths: list[torch.Tensor], size: int = 64):
        self.size, self.device = size, "cpu"
        self.K = torch.tensor([[1.4 * size, 0, size / 2], [0, 1.4 * size, size / 2], [0, 0, 1]])
        self.background = torch.full((size, size, 3), 0.5)
        self.c2w = c2w = torso.reference  # every frame seen from the reference camera
        self.frames = []
        with torch.no_grad():
            for D in truths:
                layer = model.render_layer(torso.deformed(body_motion(c2w, torso.reference, D))[0],
                                           self.viewmat(0), self.K, size, 0, "torch")
                image = layer.rgb + (1 - layer.alpha) * self.background
                self.frames.append(SimpleNamespace(image=image, c2w=c2w,
                                                   masks={"head": torch.zeros(size, size, dtype=torch.bool)}))

    def __len__(self):
        return len(self.frames)

    def __getitem__(self, i):
        return self.frames[i]

    def viewmat(self, i):
        return world_to_camera(self.c2w)


def test_refine_tracks_finds_a_body_that_turns_and_leans():
    """The image-plane tracks miss a turn about the vertical axis and a lean; the fit through
    the renderer finds them, on fitted frames and on the frames blended between them."""
    from recon.model import AvatarModel

    g = torch.Generator().manual_seed(0)
    ys, xs = torch.meshgrid(torch.linspace(-0.16, 0.10, 22), torch.linspace(-0.15, 0.15, 24), indexing="ij")
    points = torch.stack([xs.flatten(), ys.flatten(), -0.05 - 1.5 * xs.flatten() ** 2], -1)
    torso = _torso(points, neck_y=1.0)  # all body: nothing follows the head
    torso.reference[2, 3] = 0.75  # the camera 0.75 m in front of the head frame's origin
    torso.params.log_scales.data.fill_(math.log(0.008))
    torso.params.opacity_logits.data.fill_(4.0)
    phase = torch.rand(3, generator=g) * 6.3  # a smooth print on the shirt, one phase per channel
    torso.params.sh_dc.data.copy_((torch.sin(points[:, :1] / 0.012 + phase) * torch.cos(points[:, 1:2] / 0.01 - phase))[:, None])
    head = Gaussians(torch.zeros(1, 3), torch.tensor([[1.0, 0, 0, 0]]), torch.full((1, 3), -5.0), torch.zeros(1),
                     torch.zeros(1, 1, 3), torch.zeros(1, dtype=torch.uint8))
    model = AvatarModel(head)
    model.torso = torso
    pivot = torch.tensor([0.0, 0.02, 0.8])  # the chest's centre, camera coordinates
    truths = [twist(torch.tensor([0.004 * k, 0.012 * k, 0.0]), torch.tensor([0.0006 * k, 0.0, 0.0015 * k]), pivot)
              for k in range(7)]  # up to 4 degrees of turn, 2 degrees of lean, 9 mm closer
    ds = RenderedBody(torso, model, truths, size=96)
    torso.tracks = torch.eye(4).expand(len(truths), 4, 4).clone()  # what an image-plane tracker saw: no motion
    tracks = refine_tracks(model, ds, side=96, backend="torch")  # fits frames 0, 3 and 6
    chest = torch.cat([points, torch.ones(len(points), 1)], 1) @ ds.viewmat(0).T  # camera coordinates
    for D, M in zip(truths[1:], tracks[1:]):
        before = (chest @ D.T - chest)[:, :3].norm(dim=-1).mean()  # 2 to 11 mm
        after = (chest @ D.T - chest @ M.T)[:, :3].norm(dim=-1).mean()
        assert after < min(0.15 * before, 1e-3)


def test_body_motion_with_a_track_moves_the_body_in_camera_coordinates():
    c2w = rigid([0.0, 0.2, 0.0], [0.05, 0.0, 0.7])
    track = torch.eye(4)
    track[0, 3] = 0.01  # the body 1 cm to the camera's right
    A = body_motion(c2w, c2w, track)
    x = torch.tensor([0.0, -0.25, 0.0, 1.0])  # a point on the chest, head frame
    cam = lambda p: torch.linalg.inv(c2w @ torch.diag(torch.tensor([1.0, -1.0, -1.0, 1.0]))) @ p  # noqa: E731
    torch.testing.assert_close(cam(A @ x) - cam(x), torch.tensor([0.01, 0.0, 0.0, 0.0]), atol=1e-6, rtol=0)


def test_torso_never_rises_behind_the_head():
    # neck_y -0.16: the chin at -0.12, the torso's top 3 cm above it at -0.09
    torso = _torso(torch.tensor([[0.0, -0.20, 0.0], [0.0, -0.05, -0.05]]), neck_y=-0.16)
    opacity = torch.sigmoid(torso.deformed(None)[0].opacity_logits).detach()
    assert opacity[0] == pytest.approx(0.5, abs=1e-3) and opacity[1] < 1e-3


def test_torso_offsets_train_through_the_pose():
    """The pose network is live: a loss on the moved points reaches its weights and the means."""
    torso = _torso(torch.tensor([[0.1, -0.3, 0.0], [-0.1, -0.3, 0.0]]), neck_y=-0.16)
    torso.offset[-1].weight.data.normal_(0, 0.01)
    g, penalty = torso.deformed(rigid([0.1, 0.0, 0.0], [0.0, 0.0, 0.0]))
    (g.means.sum() + penalty).backward()
    assert torso.offset[0].weight.grad.abs().sum() > 0 and torso.params.means.grad.abs().sum() > 0


def test_boundary_seam_sees_a_line_but_not_a_uniform_error():
    H = W = 48
    yy = torch.arange(H)[:, None].expand(H, W)
    upper, lower = yy < 24, (yy >= 24)
    gt = torch.stack([yy / H, 0.5 + 0 * yy, 1 - yy / H], -1).float()
    assert boundary_seam(gt, gt, upper, lower) == pytest.approx(0.0)
    assert boundary_seam(gt + 0.05, gt, upper, lower) == pytest.approx(0.0, abs=1e-4)  # a uniform error
    seam = gt.clone()
    seam[23] = torch.tensor([0.1, 0.1, 0.1])  # the plate showing through the head's last row
    assert boundary_seam(seam, gt, upper, lower) > 40
    step = gt.clone()
    step[24:] += 0.1  # the torso a shade off the head: a step of 25.5 levels reads as half of it
    assert boundary_seam(step, gt, upper, lower) == pytest.approx(12.75, abs=0.5)
    assert boundary_seam(gt, gt, upper, torch.zeros_like(lower)) is None  # head and torso do not meet


def test_init_torso_lifts_the_body_below_the_head(sample_dataset):
    from recon.dataset import Dataset
    from recon.torso import init_torso

    ds = Dataset(sample_dataset, size=64, cache_frames=10_000)  # cached: the test edits masks below
    train_ids, _ = ds.split()
    torso = init_torso(ds, train_ids, 400)
    assert torso is not None and len(torso) == 400
    # Seen from the reference camera, every point falls on the person, below the face.
    viewmat = torch.linalg.inv(torso.reference @ torch.diag(torch.tensor([1.0, -1.0, -1.0, 1.0])))
    cam = torso.params.means.detach() @ viewmat[:3, :3].T + viewmat[:3, 3]
    uv = (cam @ ds.K.T)[:, :2] / (cam @ ds.K.T)[:, 2:]
    person = np.mean([ds[i].masks["person"].numpy() for i in train_ids[::4]], 0) > 0.3
    px = uv.round().long().clamp(0, ds.size - 1)
    assert person[px[:, 1], px[:, 0]].mean() > 0.95
    face = ds.face_geometry()
    assert torso.params.means[:, 1].max() < face[:, 1].max()  # nothing above the brows
    assert (cam[:, 2] > 0).all()
    # A clip with no body below the head gets no torso.
    for i in range(len(ds)):
        ds[i].masks["person"] = ds[i].masks["head"].clone()
        ds[i].masks["torso"] = torch.zeros_like(ds[i].masks["head"])
    assert init_torso(ds, train_ids, 400) is None


def test_trained_avatar_has_a_torso_that_renders_and_scores(trained_avatar, sample_dataset, speech_wav, tmp_path):
    from recon.avatar_dir import load_avatar
    from recon.evaluate import evaluate
    from recon.render import behind, open_dataset, render_video, torso_mode

    av = load_avatar(trained_avatar)
    assert av.model.torso is not None and len(av.model.torso) > 0
    assert torso_mode(av, None) == "3d"
    ds = open_dataset(av, av.size, required=True)
    f = ds[0]
    with torch.no_grad():
        unders = {m: behind(av, m, ds.viewmat(0), ds.K, ds.size, av.background, f) for m in ("3d", "frame", "none")}
    assert not torch.equal(unders["3d"], unders["none"]) and not torch.equal(unders["3d"], unders["frame"])
    torch.testing.assert_close(unders["none"], av.background)
    # The torso covers the person below the head in its own frame's view.
    torso = f.masks["torso"]
    covered = (unders["3d"] - av.background).abs().sum(-1) > 0.02
    assert covered[torso].float().mean() > 0.5
    r = render_video(trained_avatar, speech_wav, tmp_path / "orbit.mp4", camera="orbit", progress=False)
    assert r["torso"] == "3d"
    result = evaluate(trained_avatar, progress=False, train_fit_frames=0, pose_fit_frames=0)
    t = result["torso"]
    assert 0 < t["silhouette_iou"] <= 1 and t["psnr"] > 10
    # Where head meets torso the head's alpha fades, and over the frame's own pixels the plate
    # shows through there (a seam); the 3D torso fills it.
    assert t["neck_coverage_head"] < 0.9 < 0.95 < t["neck_coverage"]
    with pytest.raises(AvatarError, match="not a torso mode"):
        torso_mode(av, "2d")


def test_avatar_without_torso_renders_the_frame_and_resume_adds_one(sample_dataset, tmp_path):
    from _scenes import TINY_TRAIN
    from recon.avatar_dir import load_avatar
    from recon.config import preset
    from recon.render import torso_mode
    from recon.engine import train

    out = tmp_path / "avatar"
    train(sample_dataset, out, preset("cpu", **{**TINY_TRAIN, "iterations": 12, "torso_steps": 0}), progress=False)
    av = load_avatar(out)
    assert av.model.torso is None and torso_mode(av, None) == "frame"
    with pytest.raises(AvatarError, match="has no 3D torso"):
        torso_mode(av, "3d")
    # Before the torso, the head's floaters go: a point painted over the background in every
    # view is removed, and nothing else.
    from recon.densify import edit_branch
    from recon.model import BranchParams
    from recon.engine import Trainer

    trainer = Trainer(sample_dataset, out, None, resume=True, progress=False, force=True, overrides={"torso_steps": 6})
    method = trainer.method
    face = method.model.face
    n = len(face)
    f = trainer.ds[0]
    corner = torch.linalg.inv(trainer.ds.viewmat(0)) @ torch.tensor([-0.12, -0.12, 0.5, 1.0])  # top left, far out
    assert not f.masks["person"][:8, :8].any()
    floater = {k: getattr(face, k).detach()[:1].clone() for k in BranchParams.NAMES}
    floater["means"] = corner[None, :3]
    edit_branch(face, "face", trainer.optim, torch.ones(n, dtype=torch.bool), floater)
    assert method.prune_floaters(trainer.optim) == 1 and len(method.model.face) == n
    assert not torch.isclose(method.model.face.means, corner[:3]).all(-1).any()
    trainer.run(progress=False)
    av = load_avatar(out)
    assert av.model.torso is not None and av.meta["step"] == 18
