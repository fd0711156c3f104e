"""The engine (recon/engine.py) and its method interface (recon/method.py): a second, tiny
method trains, checkpoints and resumes through it without any change to the engine, and
its trained avatar renders, evaluates and shows in the viewer without any change to them;
the data manager's batches and prefetch; and B views per step give the gradient of the
mean of B one-view steps."""

import os
from dataclasses import asdict, dataclass

import numpy as np
import pytest
import torch

from _scenes import TINY_TRAIN, run_until_killed
from avatar.errors import AvatarError
from recon.avatar_dir import load_avatar
from recon.checkpoint import load_checkpoint
from recon.config import preset
from recon.datamanager import DataManager, prefetch_helps
from recon.dataset import Dataset
from recon.engine import Trainer, train
from recon.method import METHODS, Batch, HeadView, Method, TrainedAvatar, register_method


@dataclass
class ColourConfig:
    """A tiny method's config: the engine's settings and one of its own."""

    preset: str = "tiny"
    seed: int = 0
    size: int = 32
    batch_size: int = 2
    total_steps: int = 40
    checkpoint_every: int = 10
    log_every: int = 5
    cache_frames: int = 8
    backend: str = "torch"
    lr: float = 0.05
    """Learning rate of the colour grid."""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ColourConfig":
        unknown = set(d) - set(asdict(cls()))
        if unknown:
            raise ValueError(f"unknown config keys {sorted(unknown)}")
        return cls(**d)


class ColourGrid(Method):
    """The smallest method: one colour grid for every frame (the clip's mean image), an 8x8
    grid upsampled to the frame size, fitted by L1. It shares nothing with the Gaussian
    avatar but the interface."""

    name = "colour-grid"
    presets = {"tiny": ColourConfig()}

    def create(self, out, progress):
        self.grid = torch.nn.Parameter(torch.rand(1, 3, 8, 8, device=self.device))
        self.steps_seen = torch.zeros((), device=self.device)

    def restore(self, tensors, meta, path):
        if "grid" not in tensors:
            raise AvatarError(path, "has no colour grid")
        self.grid = torch.nn.Parameter(tensors["grid"].to(self.device))
        self.steps_seen = tensors["steps_seen"].to(self.device)

    def state_tensors(self):
        return {"grid": self.grid.detach(), "steps_seen": self.steps_seen}

    def param_groups(self):
        return [{"params": [self.grid], "name": "grid", "lr": self.cfg.lr}]

    def learning_rate(self, group, step):
        return group["base_lr"] * 0.5 ** (step / self.cfg.total_steps)

    def render(self, batch, step):
        image = torch.nn.functional.interpolate(self.grid, size=(self.cfg.size,) * 2, mode="bilinear")
        rgb = image.permute(0, 2, 3, 1).expand(len(batch), -1, -1, -1)
        return {"rgb": rgb, "alpha": torch.ones_like(rgb[..., :1])}

    def loss(self, batch, outputs, step):
        gt = torch.stack([f.image for f in batch.frames])
        loss = (outputs["rgb"] - gt).abs().mean()
        return loss, {"l1": loss.item()}

    def after_step(self, steps_done, optim, progress):
        self.steps_seen += 1
        return {"halfway": True} if steps_done == self.cfg.total_steps // 2 else {}

    @classmethod
    def open_trained(cls, root, tensors, meta, device):
        ds = Dataset(meta["dataset"], size=meta["size"])
        return ColourCard(root, cls.config(**meta["config"]), meta, ds.background.to(device), ds.K.to(device),
                          tensors["grid"].to(device))


@dataclass
class Card:
    rgb: torch.Tensor
    alpha: torch.Tensor
    depth: torch.Tensor


class ColourCard(TrainedAvatar):
    """ColourGrid's trained avatar: its grid on a 30 cm square card through the head's
    origin, facing +z, ray-cast into any camera; speech brightens it by its energy. It
    shares nothing with the Gaussian avatar but the interface."""

    layer_names = ("card",)
    HALF = 0.15

    def __init__(self, root, config, meta, background, K, grid):
        super().__init__(root, config, meta, background, K)
        self.grid = grid  # [1, 3, 8, 8]

    def speech_motion(self, feats):
        return torch.as_tensor(feats["energy"], dtype=torch.float32, device=self.device).reshape(-1, 1)

    def head_points(self):
        corners = torch.tensor([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]], device=self.device) * self.HALF
        return torch.cat([corners, torch.zeros(4, 1, device=self.device)], 1)

    def deform(self, motion, eye, *, mouth_scale=1.0):
        if motion is None:
            return [torch.ones((), device=self.device)]
        return list(1 + 0.2 * mouth_scale * motion[:, 0].clamp(0, 1))  # a brightness gain per frame

    def render_head(self, pose, viewmat, K, size):
        width, height = (size, size) if isinstance(size, int) else size
        v, u = torch.meshgrid(torch.arange(height, device=self.device) + 0.5,
                              torch.arange(width, device=self.device) + 0.5, indexing="ij")
        rays = torch.stack([u, v, torch.ones_like(u)], -1) @ torch.linalg.inv(K).T  # camera frame, z = 1
        c2w = torch.linalg.inv(viewmat)
        origin, dirs = c2w[:3, 3], rays @ c2w[:3, :3].T
        t = -origin[2] / dirs[..., 2]
        hit = origin[:2] + t[..., None] * dirs[..., :2]  # [H, W, 2] on the card's plane
        inside = ((hit.abs() < self.HALF).all(-1) & (t > 0)).float()[..., None]
        colour = torch.nn.functional.grid_sample(self.grid, (hit / self.HALF)[None], align_corners=False)[0]
        rgb = colour.permute(1, 2, 0).clamp(0, 1) * pose * inside
        return HeadView({"card": Card(rgb, inside, (t * rays[..., 2])[..., None] * inside)})


@pytest.fixture
def colour_method():
    register_method(ColourGrid)
    yield ColourGrid
    METHODS.pop(ColourGrid.name)


def test_a_second_method_trains_checkpoints_and_resumes_through_the_engine(colour_method, sample_dataset, tmp_path):
    out = train(sample_dataset, tmp_path / "a", None, method="colour-grid", progress=False)
    tensors, meta = load_checkpoint(out / "checkpoint.safetensors")
    assert meta["method"] == "colour-grid" and meta["step"] == 40 and float(tensors["steps_seen"]) == 40
    assert any(k.startswith("optim.grid.0.") for k in tensors)
    import json

    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 40 and log[-1]["l1"] < 0.6 * log[0]["l1"], log
    assert any(r.get("halfway") for r in log)
    # Killed after step 23 (the last checkpoint: 20) and resumed, the method named by the
    # checkpoint, it ends where the uninterrupted run did.
    cut = Trainer(sample_dataset, tmp_path / "b", None, resume=False, progress=False, method="colour-grid")
    run_until_killed(cut, 23)
    assert load_checkpoint(tmp_path / "b" / "checkpoint.safetensors")[1]["step"] == 20
    resumed = train(sample_dataset, tmp_path / "b", None, resume=True, progress=False)
    again, meta_b = load_checkpoint(resumed / "checkpoint.safetensors")
    assert meta_b["method"] == "colour-grid"
    torch.testing.assert_close(again["grid"], tensors["grid"])
    with pytest.raises(AvatarError, match="was trained by the method 'colour-grid', which has no renderer yet"):
        super(ColourGrid, ColourGrid).open_trained(out, tensors, meta, torch.device("cpu"))  # a method without one
    with pytest.raises(AvatarError, match="was trained by the method 'colour-grid', not 'gaussians'"):
        train(sample_dataset, tmp_path / "b", None, resume=True, progress=False, method="gaussians")


def test_a_second_method_renders_evaluates_and_shows_through_the_trained_avatar(colour_method, sample_dataset,
                                                                                speech_wav, tmp_path):
    from avatar.media import open_media
    from recon.evaluate import evaluate
    from recon.export import export
    from recon.render import render_video
    from viewer.avatar_view import ViewRenderer, ViewSettings, head_extent, load_track, render_modes

    out = train(sample_dataset, tmp_path / "a", None, method="colour-grid", progress=False)
    av = load_avatar(out)
    assert isinstance(av, ColourCard)
    for camera in ("dataset", "orbit"):
        summary = render_video(out, speech_wav, tmp_path / f"{camera}.mp4", camera=camera, progress=False)
        with open_media(summary["video"], "video", "") as c:
            frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
        assert len(frames) == summary["frames"] > 20
        assert np.std(np.stack(frames).astype(np.float32)) > 5  # the card and the plate, not a blank
    with pytest.raises(AvatarError, match="'colour-grid', which has no 3D Gaussians to export"):
        export(out, tmp_path / "card.ply", progress=False)
    with pytest.raises(AvatarError, match="'colour-grid', which has no density field to extract a mesh from"):
        export(out, mesh=tmp_path / "card_mesh.ply", progress=False)
    assert not (tmp_path / "card.ply").exists() and not (tmp_path / "card_mesh.ply").exists()
    result = evaluate(out, progress=False, train_fit_frames=2, pose_fit_frames=1)
    assert np.isfinite(result["psnr"]) and result["per_frame"] and (out / "eval_strip.png").is_file()
    assert result["pose_fit"]["per_frame"][0]["psnr_face_fitted_pose"] is not None
    renderer = ViewRenderer(av)
    assert render_modes(av) == ("RGB", "depth", "alpha", "card branch")
    track = load_track(speech_wav, av)
    centre, height = head_extent(av)
    assert height == pytest.approx(2 * ColourCard.HALF) and centre.abs().max() < 1e-6
    viewmat, K = renderer.rig.at(10.0, 5.0), renderer.intrinsics(0.6, 40, 32)
    for mode in render_modes(av):
        rgb, timings = renderer.render(viewmat, K, 40, 32, track.drive.codes(3), ViewSettings(mode=mode, torso="none"))
        assert rgb.shape == (32, 40, 3) and rgb.max() > 0 and set(timings) == {"deform", "rasterize"}


def test_data_manager_streams_shuffled_epochs_in_batches(sample_dataset):
    ds = Dataset(sample_dataset, size=32, cache_frames=16)
    ids = list(range(0, len(ds) - 3))
    one, two = DataManager(ds, ids, 1, seed=3), DataManager(ds, ids, 2, seed=3, prefetch=True)
    stream = [one.samples(s)[0].index for s in range(2 * len(ids))]
    # Each epoch visits every training frame once, in a new order.
    assert sorted(stream[: len(ids)]) == ids and sorted(stream[len(ids):]) == ids
    assert stream[: len(ids)] != stream[len(ids):]
    # B = 2: step s carries samples 2s and 2s + 1 of the same stream, keyed by position.
    for s in range(len(ids)):
        pair = two.samples(s)
        assert [p.index for p in pair] == stream[2 * s: 2 * s + 2] and [p.key for p in pair] == [2 * s, 2 * s + 1]
    # Prefetch: after a step's batch, the next step's frames are being decoded, and the
    # frames are those a plain read gives.
    batch = two.batch(0)
    assert isinstance(batch, Batch) and len(batch) == 2
    ahead = two._ahead
    assert ahead is not None and ahead[0] == 1
    nxt = two.batch(1)
    for s, f in zip(nxt.samples, nxt.frames):
        plain = ds.read_frame(s.index)
        assert f.index == s.index and torch.equal(f.image, plain.image)
        assert all(torch.equal(f.masks[m], plain.masks[m]) for m in plain.masks)
    two.close()
    one.close()
    # By default a decoding thread runs only where it has a core of its own.
    assert prefetch_helps(torch.device("cuda"))
    assert prefetch_helps(torch.device("cpu")) == ((os.cpu_count() or 1) > torch.get_num_threads())


def test_data_manager_keeps_a_timestep_s_views_together_and_monocular_order_unchanged(sample_dataset):
    from types import SimpleNamespace

    # Monocular: sample n is frame perm_e[n mod N] of epoch e, the order of earlier versions.
    ds = Dataset(sample_dataset, size=32, cache_frames=4)
    ids = list(range(1, len(ds) - 2))
    dm = DataManager(ds, ids, 1, seed=5)
    for epoch in (0, 1):
        perm = torch.randperm(len(ids), generator=torch.Generator().manual_seed(5 * 1_000_003 + epoch))
        assert [dm.index(epoch * len(ids) + k) for k in range(len(ids))] == [ids[int(j)] for j in perm]
    dm.close()
    # A rig of 3 cameras (frames 3t, 3t + 1, 3t + 2 are timestep t): a batch of 3 is one
    # timestep from every camera, and each epoch visits every view once.
    rig = SimpleNamespace(frames=[{"frame_index": i // 3} for i in range(24)], device="cpu")
    dm = DataManager(rig, list(range(3, 24)), 3, seed=1, prefetch=False)
    steps = [[x.index for x in dm.samples(s)] for s in range(14)]
    assert all(len({i // 3 for i in step}) == 1 and sorted(step) == step for step in steps)
    epochs = [sum(steps[:7], []), sum(steps[7:], [])]
    assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(3, 24)) and epochs[0] != epochs[1]


def _gradients(trainer, batch, step):
    trainer.optim.zero_grad(set_to_none=True)
    outputs = trainer.method.render(batch, step)
    loss, _ = trainer.method.loss(batch, outputs, step)
    loss.backward()
    grads = {g["name"]: [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in g["params"]]
             for g in trainer.optim.param_groups}
    return grads, outputs


@pytest.mark.parametrize("step", [50, 75], ids=["fuse", "torso"])
def test_two_views_give_the_gradient_of_the_mean_of_two_one_view_steps(sample_dataset, tmp_path, step):
    """The Gaussian avatar at a fuse-stage step (both branches deform, lip landmarks) and a
    torso-stage step: B = 2 is the mean of the two B = 1 steps of the same samples, in
    every parameter's gradient and in the densification statistics."""
    cfg = preset("cpu", **{**TINY_TRAIN, "batch_size": 2, "iterations": 60, "torso_steps": 20})
    trainer = Trainer(sample_dataset, tmp_path / "avatar", cfg, resume=False, progress=False)
    trainer.data.close()
    method = trainer.method
    if step >= cfg.iterations:
        method.start_torso(trainer.optim)
    batch = trainer.data.batch(step)
    assert len({s.index for s in batch.samples}) == 2
    stats_name = "torso" if step >= cfg.iterations else "face"
    both, outputs = _gradients(trainer, batch, step)
    before = method.stats[stats_name].grad_sum.clone()
    method.after_backward(batch, outputs)
    stat_both = method.stats[stats_name].grad_sum - before
    singles, stat_singles = [], torch.zeros_like(stat_both)
    for s, f in zip(batch.samples, batch.frames):
        one = Batch([s], [f])
        grads, outputs = _gradients(trainer, one, step)
        singles.append(grads)
        before = method.stats[stats_name].grad_sum.clone()
        method.after_backward(one, outputs)
        stat_singles += method.stats[stats_name].grad_sum - before
    moved = 0
    for name, grads in both.items():
        for k, g in enumerate(grads):
            mean = (singles[0][name][k] + singles[1][name][k]) / 2
            torch.testing.assert_close(g, mean, rtol=1e-4, atol=1e-7, msg=name)
            moved += int(g.abs().sum() > 0)
    assert moved >= 5, "too few parameters with a gradient to compare"
    assert stat_both.sum() > 0
    torch.testing.assert_close(stat_both, stat_singles, rtol=1e-4, atol=1e-9)


def test_batch_size_is_a_checked_setting():
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        preset("cpu", batch_size=0)
    assert preset("cpu").batch_size == 1 and preset("gpu").batch_size == 4


def test_training_benchmark_runs_every_set_up(sample_dataset, capsys):
    from avatar.cli import main

    assert main(["bench", "train", str(sample_dataset), "--preset", "demo", "--steps", "1", "--rounds", "1",
                 "--batch-sizes", "1", "2", "--json"]) == 0
    import json

    rows = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["rows"]
    assert list(rows) == ["B=1 in-step", "B=1 prefetch", "B=2 prefetch"]
    assert rows["B=1 in-step"]["speedup_per_view"] == 1.0 and rows["B=2 prefetch"]["views"] == 2


def test_the_gpu_checks_sanitized_render_runs():
    """The script compute-sanitizer runs on a GPU, run here on the CPU kernels: it renders
    two views and reaches every gradient."""
    import subprocess
    import sys

    from bench.gpu_check import ROOT, SANITIZED_RENDER

    run = subprocess.run([sys.executable, "-c", SANITIZED_RENDER, "cpu", "cpu"], capture_output=True, text=True,
                         cwd=ROOT, timeout=300)
    assert run.returncode == 0 and "rendered 2 views; gradients True" in run.stdout, run.stderr[-2000:]


def test_the_gpu_check_runs_its_steps_on_a_cpu(sample_dataset, tmp_path):
    """bench/gpu_check.py is what a session lent a GPU runs first, unseen before then: on a
    CPU its steps (the rasterizer benchmark aside, minutes on the torch backend) must run
    and report the figures a closing note quotes."""
    import json

    from bench.gpu_check import main

    rc = main([str(sample_dataset), "--out", str(tmp_path), "--device", "cpu", "--steps", "8", "--torso-steps", "0",
               "--size", "64", "--bench-steps", "1", "--nerf-steps", "1", "--skip", "raster"])
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert rc == 0 and all(r["ok"] for r in report.values()), report
    assert list(report) == ["environment", "parity", "hash", "train_bench", "training", "eval", "nerf", "distributed",
                            "sanitizer"]
    assert report["distributed"]["skipped"].startswith("needs 2 CUDA GPUs or more")
    assert report["hash"]["max_abs_diff"] < 1e-6 and report["hash"]["speedup"]["forward_backward_s"] > 1
    assert report["sanitizer"]["skipped"].startswith("compute-sanitizer checks CUDA kernels: no GPU here")
    assert "passed" in report["parity"]["pytest"]
    assert set(report["train_bench"]["rows"]) == {"B=1 in-step", "B=1 prefetch", "B=4 prefetch"}
    t = report["training"]
    assert (t["batch_size"], t["size"], t["steps"], t["backend"]) == (4, 64, 8, "cpu")
    assert t["it_per_s"] > 0 and t["train_psnr_head"] > 5
    assert report["eval"]["psnr"] > 10 and "lmd" in report["eval"]  # None at 64 px: too small to track
    n = report["nerf"]
    assert (n["marching"], n["size"], n["steps"]) == ("torch", 64, 1) and n["render_fps"] > 0
