"""Dataset reader, 3DGS .ply round trip and checkpoints (safetensors, no pickle)."""

import json

import numpy as np
import pytest
import torch
from plyfile import PlyData

from avatar.errors import AvatarError
from recon.checkpoint import load_checkpoint, save_checkpoint
from recon.dataset import Dataset
from recon.gaussians import Gaussians, load_ply, save_ply
from _datasets import make_dataset, make_rig_dataset


def test_dataset_streams_with_bounded_cache(tmp_path):
    make_dataset(tmp_path / "ds", n=11)
    ds = Dataset(tmp_path / "ds", size=16, cache_frames=3)
    assert len(ds) == 11 and ds.K[0, 0] == 20.0
    for i in range(len(ds)):
        f = ds[i]
        assert f.image.shape == (16, 16, 3) and f.masks["head"].all() and not f.masks["mouth"].any()
    assert len(ds._cache) == 3
    train, held_out = ds.split()
    assert held_out == [10] and train == list(range(10))
    assert torch.allclose(ds.viewmat(0), torch.diag(torch.tensor([1.0, -1.0, -1.0, 1.0])))


def test_dataset_errors(tmp_path):
    with pytest.raises(AvatarError, match="no transforms.json"):
        Dataset(tmp_path)
    make_dataset(tmp_path / "ds")
    (tmp_path / "ds" / "images" / "000002.jpg").write_bytes(b"not a jpeg")
    ds = Dataset(tmp_path / "ds")  # without check_images, a frame is decoded when read
    with pytest.raises(AvatarError, match="000002.jpg: missing or unreadable"):
        ds[2]
    with pytest.raises(AvatarError, match="000002.jpg: is not a readable image"):
        Dataset(tmp_path / "ds", check_images=True)
    (tmp_path / "ds" / "images" / "000002.jpg").unlink()
    with pytest.raises(AvatarError, match="000002.jpg: missing from the dataset"):
        Dataset(tmp_path / "ds")
    (tmp_path / "ds" / "background.png").unlink()
    with pytest.raises(AvatarError, match="background.png: missing from the dataset"):
        Dataset(tmp_path / "ds")


def random_gaussians(n=50, degree=2):
    g = torch.Generator().manual_seed(0)
    return Gaussians(torch.randn(n, 3, generator=g), torch.randn(n, 4, generator=g), torch.randn(n, 3, generator=g),
                     torch.randn(n, generator=g), torch.randn(n, (degree + 1) ** 2, 3, generator=g),
                     (torch.rand(n, generator=g) > 0.7).to(torch.uint8))


def test_ply_round_trip_and_standard_layout(tmp_path):
    g = random_gaussians()
    save_ply(tmp_path / "a.ply", g)
    names = PlyData.read(str(tmp_path / "a.ply"))["vertex"].data.dtype.names
    assert names[:9] == ("x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2")
    assert "f_rest_23" in names and "f_rest_24" not in names and names[-1] == "branch"
    h = load_ply(tmp_path / "a.ply")
    for k in ("means", "quats", "log_scales", "opacity_logits", "sh", "branch"):
        assert torch.equal(getattr(h, k), getattr(g, k)), k
    # Inria's layout: f_rest is channel-major (all red coefficients first).
    v = PlyData.read(str(tmp_path / "a.ply"))["vertex"]
    assert np.isclose(v["f_rest_1"][0], g.sh[0, 2, 0]) and np.isclose(v["f_rest_8"][0], g.sh[0, 1, 1])


def test_malformed_ply(tmp_path):
    (tmp_path / "junk.ply").write_bytes(b"not a ply at all")
    with pytest.raises(AvatarError, match="junk.ply: is not a readable PLY"):
        load_ply(tmp_path / "junk.ply")
    from plyfile import PlyElement
    arr = np.zeros(3, dtype=[("x", "f4"), ("y", "f4"), ("z", "f4")])
    PlyData([PlyElement.describe(arr, "vertex")]).write(str(tmp_path / "points.ply"))
    with pytest.raises(AvatarError, match="is not a 3DGS PLY: missing"):
        load_ply(tmp_path / "points.ply")
    g = random_gaussians()
    g.means[3, 1] = float("nan")
    save_ply(tmp_path / "nan.ply", g)
    with pytest.raises(AvatarError, match="NaN or Inf values in means"):
        load_ply(tmp_path / "nan.ply")


def test_checkpoint_round_trip_and_errors(tmp_path):
    t = {"gaussians.means": torch.randn(10, 3), "step_count": torch.tensor([5])}
    save_checkpoint(tmp_path / "c.safetensors", t, {"step": 5, "config": {"lr": 1e-3}})
    back, meta = load_checkpoint(tmp_path / "c.safetensors")
    assert torch.equal(back["gaussians.means"], t["gaussians.means"]) and meta["step"] == 5
    assert meta["format"] == "avatar-checkpoint/1"
    with pytest.raises(AvatarError, match="refusing to save a checkpoint with NaN"):
        save_checkpoint(tmp_path / "d.safetensors", {"x": torch.tensor([float("nan")])}, {})
    assert not (tmp_path / "d.safetensors").exists()
    data = (tmp_path / "c.safetensors").read_bytes()
    (tmp_path / "flipped.safetensors").write_bytes(data[:-4] + bytes(b ^ 1 for b in data[-4:]))  # one bit per byte
    with pytest.raises(AvatarError, match="flipped.safetensors: is damaged: its tensors do not match the checksum"):
        load_checkpoint(tmp_path / "flipped.safetensors")
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(AvatarError, match="cut.safetensors: is not a readable checkpoint"):
        load_checkpoint(tmp_path / "cut.safetensors")
    from safetensors.torch import save_file
    save_file({"x": torch.tensor([float("inf")])}, str(tmp_path / "inf.safetensors"),
              metadata={"avatar": json.dumps({"format": "avatar-checkpoint/1"})})
    with pytest.raises(AvatarError, match="NaN/Inf values in x"):
        load_checkpoint(tmp_path / "inf.safetensors")
    save_file({"x": torch.zeros(1)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(AvatarError, match="not an avatar checkpoint"):
        load_checkpoint(tmp_path / "foreign.safetensors")


def test_rig_dataset_cameras_and_held_out_cameras(tmp_path):
    make_rig_dataset(tmp_path / "ds", ("a", "b", "c"), steps=11)
    ds = Dataset(tmp_path / "ds", size=16)
    assert [c.name for c in ds.cameras] == ["a", "b", "c"] and not ds.has_speech
    assert ds.camera_of[:4] == [0, 1, 2, 0]
    assert ds.views_of(1) == list(range(1, 33, 3)) and ds.views_of() == list(range(0, 33, 3))
    assert torch.equal(ds.intrinsics(4), torch.tensor([[25.0, 0, 7.5], [0, 25.5, 8], [0, 0, 1]]))  # camera b, halved
    assert float(ds.plate(5).mean()) == pytest.approx(120 / 255, abs=1e-6) and ds[5].camera == 2
    train, later = ds.split()  # the last of 11 timesteps, every camera's view of it
    assert later == [30, 31, 32] and train == list(range(30))
    train, later = ds.split(holdout_cameras=["b"])
    assert later == [30, 32] and all(ds.camera_of[i] != 1 for i in train) and len(train) == 20
    assert ds.novel_views(["b"]) == list(range(1, 30, 3))  # camera b at the 10 training timesteps
    with pytest.raises(AvatarError, match="has no camera named 'z'"):
        ds.split(holdout_cameras=["z"])
    with pytest.raises(AvatarError, match="every camera held out"):
        ds.split(holdout_cameras=["a", "b", "c"])


@pytest.mark.parametrize("change, message", [
    (lambda m: m["frames"][3].update(camera="z"), r"frames\[3\].camera must name one of cameras\[\] \(a, b\)"),
    (lambda m: m["frames"][3].update(timestep=7), r"frames\[3\].timestep must equal its frame_index 1"),
    (lambda m: m["frames"][3].update(camera="a"), r"frames\[3\] repeats camera 'a' at timestep 1"),
    (lambda m: m["cameras"][1].update(name="a"), r"cameras\[1\].name must be a non-empty string no other camera has"),
    (lambda m: m["cameras"][0].update(fl_y=0), r"cameras\[0\].fl_y must be a finite positive number"),
    (lambda m: m.pop("cameras"), r"needs a non-empty list of cameras"),
    (lambda m: m["cameras"][1].update(background="gone.png"), r"gone.png: missing from the dataset"),
    (lambda m: m.update(format="avatar-dataset/1"), r"audio_features must be a relative file path"),
])
def test_rig_dataset_errors(tmp_path, change, message):
    meta = make_rig_dataset(tmp_path / "ds")
    change(meta)
    (tmp_path / "ds" / "transforms.json").write_text(json.dumps(meta))
    with pytest.raises(AvatarError, match=message):
        Dataset(tmp_path / "ds")
