"""`avatar view DATASET` serves the capture on loopback only."""

import socket
import urllib.request

import numpy as np
import pytest

from avatar.cli import main
from _datasets import make_dataset, make_rig_dataset
from viewer.dataset_view import build_dataset_scene, serve_dataset


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_dataset_viewer_serves_scene_on_loopback(tmp_path):
    make_dataset(tmp_path / "ds", n=5)
    np.save(tmp_path / "ds" / "landmarks.npy", np.full((5, 478, 3), 16.0, np.float32))
    import json
    meta = json.loads((tmp_path / "ds" / "transforms.json").read_text())
    meta["landmarks"] = "landmarks.npy"
    (tmp_path / "ds" / "transforms.json").write_text(json.dumps(meta))
    np.savez(tmp_path / "ds" / "face_geometry.npz", canonical=np.zeros((478, 3), np.float32), focal=np.float32(40))
    port = free_port()
    server = serve_dataset(tmp_path / "ds", port=port)
    try:
        html = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10).read().decode()
        assert "<html" in html.lower()
        # Bound to loopback: the machine's other addresses do not answer.
        host_ip = socket.gethostbyname(socket.gethostname())
        if not host_ip.startswith("127."):
            with pytest.raises(OSError):
                socket.create_connection((host_ip, port), timeout=2).close()
    finally:
        server.stop()


def test_view_refuses_non_dataset(tmp_path, capsys):
    assert main(["view", str(tmp_path)]) == 2
    assert "neither a dataset folder" in capsys.readouterr().err


class _Recorder:
    """The parts of a viser server the dataset scene uses, recording what it is given."""

    def __init__(self):
        self.frustums, self.markdown = {}, []
        self.scene, self.gui = self, self

    def add_camera_frustum(self, name, fov, **kwargs):
        self.frustums[name] = fov

    def add_frame(self, *args, **kwargs):
        pass

    def add_point_cloud(self, *args, **kwargs):
        pass

    def add_markdown(self, text):
        self.markdown.append(text)


def test_a_rig_dataset_shows_every_camera_with_its_own_lens(tmp_path):
    make_rig_dataset(tmp_path / "ds", ("left", "right"), steps=4)
    server = _Recorder()
    assert build_dataset_scene(server, tmp_path / "ds") == 8
    assert sorted(server.frustums) == [f"/cameras/{c}/{k:06d}" for c in ("left", "right") for k in range(4)]
    assert server.frustums["/cameras/left/000000"] == pytest.approx(2 * np.arctan(32 / (2 * 41.0)))
    assert server.frustums["/cameras/right/000000"] == pytest.approx(2 * np.arctan(32 / (2 * 51.0)))
    assert "from 2 cameras" in server.markdown[0] and "right 50 px" in server.markdown[0]


class _Frustum:
    def __init__(self, kwargs):
        self.kwargs, self.clicked = kwargs, None

    def on_click(self, func):
        self.clicked = func


def test_an_avatar_of_a_rig_shows_its_cameras_and_looks_through_one_when_clicked(tmp_path):
    from recon.dataset import Dataset
    from viewer.avatar_view import add_rig_frustums

    make_rig_dataset(tmp_path / "ds", ("left", "right"), steps=3)
    ds = Dataset(tmp_path / "ds")
    added = {}

    class Scene:
        def add_camera_frustum(self, name, **kwargs):
            added[name] = _Frustum(kwargs)
            return added[name]

    picked = []
    assert add_rig_frustums(Scene(), ds, lambda client, c2w, fov: picked.append((client, c2w, fov))) == \
        ["/rig/left", "/rig/right"]
    right = added["/rig/right"]
    assert right.kwargs["fov"] == pytest.approx(2 * np.arctan(32 / (2 * 51.0)))  # its own lens
    assert right.kwargs["image"].shape == (32, 32, 3)
    right.clicked(type("Event", (), {"client": "tab"})())
    client, c2w, fov = picked[0]
    first_view = ds.views_of(1)[0]
    assert client == "tab" and fov == right.kwargs["fov"]
    np.testing.assert_allclose(c2w @ ds.viewmat(first_view).double().numpy(), np.eye(4), atol=1e-6)
    np.testing.assert_allclose(c2w[:3, 3], right.kwargs["position"])
    make_dataset(tmp_path / "mono", n=3)
    assert add_rig_frustums(Scene(), Dataset(tmp_path / "mono"), None) == []  # one camera: nothing to pick
