"""Initial Gaussians: both branches, carved to the head, coloured from the frames."""

import numpy as np
import pytest
import torch

from avatar.errors import AvatarError
from avatar.dataset_format import INNER_LIPS
from recon.dataset import Dataset
from recon.gaussians import FACE, MOUTH, SH_C0
from recon.init import init_gaussians
from _datasets import make_dataset


def test_init_from_dataset(tmp_path):
    make_dataset(tmp_path / "ds", n=12)
    rng = np.random.default_rng(0)
    face = rng.normal(0, 0.03, (478, 3)).astype(np.float32)
    face[:, 2] -= 0.5  # in front of the (identity, OpenGL) cameras
    np.savez(tmp_path / "ds" / "face_geometry.npz", canonical=face, focal=np.float32(40))
    g = init_gaussians(Dataset(tmp_path / "ds"), n_volume=3000, n_mouth=200, sh_degree=2)
    n_face = int((g.branch == FACE).sum())
    assert int((g.branch == MOUTH).sum()) == 200 and n_face > 478
    assert g.sh.shape == (len(g), 9, 3) and torch.isfinite(g.means).all()
    rgb = g.sh[:, 0] * SH_C0 + 0.5
    assert (rgb >= -1e-6).all() and (rgb <= 1 + 1e-6).all()
    lips_z = torch.from_numpy(face[list(INNER_LIPS), 2]).mean()
    assert (g.means[g.branch == MOUTH, 2] < lips_z - 0.009).all()  # the cavity is behind the lips
    assert torch.allclose(torch.sigmoid(g.opacity_logits), torch.tensor(0.1))


def test_init_needs_face_geometry(tmp_path):
    make_dataset(tmp_path / "ds")
    with pytest.raises(AvatarError, match="face_geometry.npz: missing"):
        init_gaussians(Dataset(tmp_path / "ds"))
