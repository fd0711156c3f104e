"""The lip-landmark loss of training: its projection agrees with the rasterizer, its
target is free of pose error, and its gradient carries the face deformation onto the
tracked lips."""

import math

import numpy as np
import pytest
import torch

from _scenes import TINY_TRAIN

from avatar.dataset_format import LIPS, N_LANDMARKS, RIGID
from recon.deform import DeformationHead, TriPlaneEncoding
from recon.model import AvatarModel
from recon.raster import rasterize
from recon.config import preset
from recon.engine import Trainer
from recon.methods.gaussians import lip_landmark_loss, lip_landmark_target, project, stage_at
from test_recon_model import random_gaussians


def camera(size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """A camera 0.5 m in front of the head frame's origin, turned 10 degrees (OpenCV w2c)."""
    a = math.radians(10)
    R = torch.tensor([[math.cos(a), 0, -math.sin(a)], [0, 1, 0], [math.sin(a), 0, math.cos(a)]])
    viewmat = torch.eye(4)
    viewmat[:3, :3], viewmat[:3, 3] = R, torch.tensor([0.01, -0.02, 0.5])
    K = torch.tensor([[2.2 * size, 0, size / 2], [0, 2.2 * size, size / 2], [0, 0, 1]])
    return viewmat, K


def face(seed: int = 0) -> torch.Tensor:
    """[478, 3] a face-sized point cloud (stand-in for the fitted canonical face)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(N_LANDMARKS, 3, generator=g) - 0.5) * torch.tensor([0.14, 0.2, 0.08])


def test_projection_matches_the_rasterizer():
    viewmat, K = camera()
    X = face()
    n = len(X)
    out = rasterize(X, torch.tensor([1.0, 0, 0, 0]).expand(n, 4), torch.full((n, 3), 1e-3), torch.full((n,), 0.5),
                    torch.rand(n, 3), viewmat[None], K[None], 128, 128, backend="torch")
    seen = (out.radii[0] > 0).all(-1)  # culled points carry zeros
    assert seen.float().mean() > 0.8
    torch.testing.assert_close(project(X, viewmat, K)[seen], out.means2d[0][seen], atol=1e-4, rtol=1e-5)


def test_projection_takes_one_camera_per_frame():
    viewmat, K = camera()
    moved = viewmat.clone()
    moved[:3, 3] += torch.tensor([0.02, 0.0, 0.1])
    X = face()[:40]
    batched = project(X.expand(2, -1, -1), torch.stack([viewmat, moved]), K)
    torch.testing.assert_close(batched[0], project(X, viewmat, K))
    torch.testing.assert_close(batched[1], project(X, moved, K))
    assert (batched[0] - batched[1]).abs().max() > 1.0


class FakeDataset:
    """What lip_landmark_target reads of a Dataset: tracked landmarks, camera, intrinsics."""

    def __init__(self, tracked: np.ndarray, viewmat: torch.Tensor, K: torch.Tensor):
        self.tracked, self._viewmat, self.K = tracked, viewmat, K

    def landmarks(self, i: int) -> np.ndarray:
        return self.tracked

    def viewmat(self, i: int) -> torch.Tensor:
        return self._viewmat

    def intrinsics(self, i: int) -> torch.Tensor:
        return self.K


def test_target_removes_the_pose_offset_and_keeps_the_mouth_motion():
    viewmat, K = camera()
    X = face()
    seen = project(X, viewmat, K).numpy().copy()
    mouth_motion = np.zeros_like(seen)
    mouth_motion[LIPS, 1] = np.linspace(0, 3, len(LIPS))  # lips part, up to 3 px
    pose_error = np.array([2.5, -1.5], np.float32)  # the whole face seen shifted
    ds = FakeDataset((seen + mouth_motion + pose_error).astype(np.float32), viewmat, K)
    target = lip_landmark_target(ds, 0, X)
    torch.testing.assert_close(target, torch.from_numpy(seen[LIPS] + mouth_motion[LIPS]),
                               atol=1e-4, rtol=0)
    assert not set(LIPS) & set(RIGID)  # the offset is measured away from the mouth
    ds.tracked = None
    assert lip_landmark_target(ds, 0, X) is None


def test_gradient_moves_the_deformation_onto_the_tracked_lips():
    torch.manual_seed(0)
    viewmat, K = camera()
    lips = face()[LIPS]
    model = AvatarModel(random_gaussians())  # no mesh rig: the residual head alone carries the lips
    model.face_deform = DeformationHead(encoding=TriPlaneEncoding(bound=0.15))
    motion, eye, viewmats = torch.randn(1, 16), torch.ones(1, 1), viewmat[None]
    # The tracked lower lip sits 4 px lower than the canonical face puts it.
    target = project(lips, viewmat, K) + torch.tensor([0.0, 4.0]) * (lips[:, 1:2] < lips[:, 1].median()).float()
    loss0, px0 = lip_landmark_loss(model, lips, motion, eye, viewmats, K, target[None])
    opt = torch.optim.Adam(model.face_deform.parameters(), lr=1e-3)
    for _ in range(150):
        loss, px = lip_landmark_loss(model, lips, motion, eye, viewmats, K, target[None])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert px0 > 1.5 and px < 0.3 * px0, (px0, px)
    assert loss.item() < 0.2 * loss0.item()


@pytest.mark.slow
def test_static_stage_trains_the_face_head_on_a_batch_of_lip_landmarks(sample_dataset, tmp_path):
    """The lip-landmark loss renders nothing, so it supervises the face head from the first
    (static) step on, over `lip_landmark_frames` frames per step, drawn reproducibly."""
    cfg = preset("cpu", **{**TINY_TRAIN, "lip_landmark_frames": 6})
    trainer = Trainer(sample_dataset, tmp_path / "avatar", cfg, resume=False)
    method = trainer.method
    lt = method.lip_targets
    assert lt is not None and lt.target.shape == (len(trainer.train_ids), len(LIPS), 2)
    assert stage_at(cfg, 0) == "static"
    before = {k: v.clone() for k, v in method.model.face_deform.state_dict().items()}
    for step in range(2):  # the output layer starts at zero: the first step moves only it
        loss, info = trainer.optimize(step)
    assert "lip_landmark_px" in info
    moved = [k for k, v in method.model.face_deform.state_dict().items() if not torch.equal(v, before[k])]
    assert any(k.startswith("out.") for k in moved), moved
    # Per view: its frame, then frames drawn from (seed, the sample's key), the same on a rerun.
    batch = trainer.data.batch(0)
    a = method.lip_landmark_loss_at(batch)
    b = method.lip_landmark_loss_at(batch)
    torch.testing.assert_close(a[0], b[0])
    assert a[1] == b[1]
