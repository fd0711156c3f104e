"""Devices (recon/device.py): --device resolves or fails by name, and training, rendering and
export keep every tensor on the device they were given (checked without a GPU by
tests/_device_guard.py)."""

from __future__ import annotations

import collections
import linecache
import subprocess
import sys

import pytest
import torch
from _device_guard import ROOT, DeviceGuard

from recon.device import resolve_device


def test_resolve_device_names_what_cannot_run():
    assert resolve_device("cpu") == torch.device("cpu") == resolve_device(" CPU ")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        for name in ("cuda", "cuda:1"):
            with pytest.raises(ValueError, match=f"device '{name}' cannot run here"):
                resolve_device(name)
    else:
        with pytest.raises(ValueError, match="does not exist"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: --device cuda is valid here")
@pytest.mark.parametrize("command", ["train", "run"])
def test_cuda_without_a_gpu_is_a_named_error_before_anything_is_written(command, sample_dataset, tmp_path):
    out = tmp_path / "out"
    args = [str(sample_dataset)] if command == "train" else [str(ROOT / "scenes" / "demo.toml")]
    r = subprocess.run([sys.executable, "-m", "avatar", command, *args, "--out", str(out), "--device", "cuda"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.startswith("error: --device: device 'cuda' cannot run here")
    assert "Traceback" not in r.stderr and not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: --device cuda is valid here")
def test_viewing_on_cuda_without_a_gpu_is_a_named_error(trained_avatar):
    r = subprocess.run([sys.executable, "-m", "avatar", "view", str(trained_avatar), "--device", "cuda"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.startswith("error: --device: device 'cuda' cannot run here")
    assert "Traceback" not in r.stderr


def test_the_guard_sees_a_planted_host_tensor():
    """The check itself can fail: code in recon/ that makes a tensor without a device, brings
    one to the host, or mixes a host array with a device tensor is named with its line; a
    `# host:` line, a named device, host indices and host scalars pass (as on CUDA)."""
    source = ("import numpy as np, torch\n"
              "a = torch.zeros(3)\n"
              "b = torch.ones(2, device=torch.device('cpu')).cpu()\n"
              "c = b.to('cpu')\n"
              "d = torch.tensor([1.0], device=b.device).numpy()  # host: said on purpose\n"
              "e = torch.zeros_like(b).to(b.device)\n"
              "on = torch.ones(3, device=torch.device('cpu'))\n"
              "f = on + torch.from_numpy(np.ones(3, np.float32))\n"
              "g = on[torch.from_numpy(np.array([0, 2]))] * torch.from_numpy(np.array(2.0, np.float32))\n")
    path = str(ROOT / "recon" / "planted.py")
    linecache.cache[path] = (len(source), None, source.splitlines(True), path)  # the guard reads its comments
    try:
        with DeviceGuard() as guard:
            exec(compile(source, path, "exec"), {})
    finally:
        linecache.cache.pop(path, None)
    assert guard.violations == ["recon/planted.py:2: torch.zeros without device=",
                                "recon/planted.py:3: cpu brings a tensor to the host",
                                "recon/planted.py:4: to brings a tensor to the host",
                                "recon/planted.py:8: add mixes host and device tensors"]


def _clean(guard: DeviceGuard) -> None:
    found = collections.Counter(guard.violations)
    assert not found, "tensors made off the device:\n" + "\n".join(f"{n}x {v}" for v, n in found.most_common())


def test_training_steps_stay_on_the_device(sample_dataset, tmp_path):
    """Every stage's step, both densifications and the body's refinement, under the guard;
    building the model and the torso (on the host, then moved) and saving are outside it."""
    from _scenes import TINY_TRAIN

    from recon.config import preset
    from recon.engine import Trainer

    cfg = preset("cpu", **{**TINY_TRAIN, "iterations": 8, "torso_steps": 4})
    building = DeviceGuard(strict=False)  # only follows where tensors live
    with building:
        trainer = Trainer(sample_dataset, tmp_path / "avatar", cfg, resume=False, progress=False,
                          device=torch.device("cpu"))
    guard = DeviceGuard()
    trainer.data.close()  # frames decoded in the step, under the guard (its mode does not follow threads)

    for s in range(0, 8, 2):  # static, mouth, face and fuse
        with guard:
            trainer.optimize(s)
    method = trainer.method
    with guard:
        method.densify(7, trainer.optim)
        method.model.rebind()
    with building:
        method.start_torso(trainer.optim)
    for s in (8, 9):
        with guard:
            trainer.optimize(s)
    with guard:
        method.densify_torso(9, trainer.optim)
        method.refine_body()
    _clean(building)
    _clean(guard)


def test_rendering_and_export_stay_on_the_device(trained_avatar, speech_wav, tmp_path, monkeypatch):
    """Rendered frames (orbit and dataset cameras, the 3D torso) and an exported frame under
    the guard; the avatar is loaded (host, then moved) outside it."""
    import recon.export
    import recon.render
    from recon.avatar_dir import load_avatar

    building = DeviceGuard(strict=False)
    with building:
        av = load_avatar(trained_avatar, torch.device("cpu"))
    _clean(building)
    assert av.model.torso is not None
    monkeypatch.setattr(recon.render, "load_avatar", lambda *a, **k: av)
    monkeypatch.setattr(recon.export, "load_avatar", lambda *a, **k: av)
    with DeviceGuard() as guard:
        for camera in ("orbit", "dataset"):
            recon.render.render_video(trained_avatar, speech_wav, tmp_path / f"{camera}.mp4", camera=camera,
                                      progress=False, device=torch.device("cpu"))
        recon.export.export(trained_avatar, tmp_path / "frame.ply", frame=1, progress=False,
                            device=torch.device("cpu"))
    _clean(guard)


def test_evaluation_stays_on_the_device(trained_avatar, speech_wav, monkeypatch):
    """eval's held-out frames (scores, torso, pose-only fit, training-frame fit) and eval
    --drive under the guard; only images handed to the face tracker leave the device."""
    import recon.evaluate
    from recon.avatar_dir import load_avatar

    building = DeviceGuard(strict=False)
    with building:
        av = load_avatar(trained_avatar, torch.device("cpu"))
    monkeypatch.setattr(recon.evaluate, "load_avatar", lambda *a, **k: av)
    with DeviceGuard() as guard:
        recon.evaluate.evaluate(trained_avatar, progress=False, train_fit_frames=2, pose_fit_frames=1,
                                device=torch.device("cpu"))
        recon.evaluate.evaluate_drive(trained_avatar, speech_wav, progress=False, real_frames=4,
                                      device=torch.device("cpu"))
    _clean(building)
    _clean(guard)


def test_the_studio_renders_on_the_device(trained_avatar, speech_wav):
    """The viewer's frames in every mode, with speech and the 3D torso, under the guard: the
    browser's camera comes from the host, the avatar renders on its device, and only the
    plate's warp and the finished frame cross back (each line saying why)."""
    from recon.avatar_dir import load_avatar
    from viewer.avatar_view import ViewRenderer, ViewSettings, head_extent, load_track

    building = DeviceGuard(strict=False)
    with building:
        av = load_avatar(trained_avatar, torch.device("cpu"))
        renderer = ViewRenderer(av)
        track = load_track(speech_wav, av)
    _clean(building)
    viewmat = renderer.rig.at(10.0, 5.0).cpu()  # as the browser's camera arrives: a host tensor
    K = renderer.intrinsics(0.5, 48, 40)
    with DeviceGuard() as guard:
        for mode in ("rgb", "centres", "face branch", "mouth branch", "alpha", "depth"):
            for torso in ("3d", "frame"):
                rgb, _ = renderer.render(viewmat, K, 48, 40, track.drive.codes(3),
                                         ViewSettings(mode=mode, torso=torso))
                assert rgb.shape == (40, 48, 3)
        head_extent(av)
    _clean(guard)
