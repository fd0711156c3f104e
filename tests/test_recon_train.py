"""Training, evaluation, rendering and export end to end on a small sample dataset,
resume after kill -9, and the errors of bad inputs."""

import json
import os
import signal
import subprocess
import sys
import time

import av
import numpy as np
import pytest
import soundfile as sf
import torch

from _scenes import TINY_TRAIN
from avatar.cli import main as cli
from avatar.errors import AvatarError
from recon.avatar_dir import load_avatar
from recon.config import preset
from recon.dataset import behind_head
from recon.evaluate import FACE_REGIONS, evaluate_drive, face_masks, face_region_masks, render_frame
from recon.export import export
from recon.gaussians import load_ply
from recon.losses import psnr
from recon.render import open_dataset, render_video
from recon.engine import train

pytestmark = pytest.mark.slow

TINY = TINY_TRAIN


@pytest.fixture(scope="module")
def trained(trained_avatar):
    return trained_avatar


def test_training_writes_a_documented_avatar(trained, sample_dataset):
    metrics = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    steps = [m["step"] for m in metrics]
    assert steps == sorted(set(steps)) and steps[-1] == 80  # 60 of the head, 20 of the torso
    assert {m["stage"] for m in metrics} == {"static", "mouth", "face", "fuse", "torso"}
    # The torso stage starts by pruning the head's floaters: the face branch loses exactly those.
    start = next(m for m in metrics if "floaters_pruned" in m)
    before = next(m for m in metrics if m["step"] == 60)
    assert start["step"] == 61 and start["n_face"] == before["n_face"] - start["floaters_pruned"]
    # Half-way through the torso stage and after its last step the body's tracks are refined
    # through the renderer.
    refined = [m for m in metrics if "body_refined" in m]
    assert [m["step"] for m in refined] == [70, 80]
    assert all(0 <= m["body_refined"]["mean_turn_deg"] < 10 for m in refined)
    psnrs = [m["psnr_head"] for m in metrics if "psnr_head" in m]
    assert np.mean(psnrs[-3:]) > psnrs[0] + 1.5, psnrs  # it learns
    assert any(m.get("densify", {}).get("face", {}).get("split", 0) + m.get("densify", {}).get("face", {}).get("cloned", 0)
               for m in metrics)
    cfg = json.loads((trained / "config.json").read_text())
    assert cfg["format"] == "avatar/4" and cfg["config"]["size"] == 64 and cfg["config"]["iterations"] == 60
    a = load_avatar(trained)
    g = load_ply(trained / "canonical.ply")
    assert len(g) == len(a.model) + len(a.model.torso) and set(g.branch.tolist()) == {0, 1, 2}
    assert a.background.shape == (64, 64, 3) and a.meta["step"] == 80
    assert a.model.motion_net.lip_axis.abs().sum() > 0  # the bilabial closure was set up
    # A second run finds it trained and does nothing; without --resume it refuses to overwrite.
    with pytest.raises(AvatarError, match="already holds a trained avatar"):
        train(sample_dataset, trained, preset("cpu", **TINY), progress=False)
    # --resume with other settings stops and names them (--force goes on with the new ones).
    with pytest.raises(AvatarError, match=r"other settings or data: size 64 -> 96; iterations 60 -> 61"):
        train(sample_dataset, trained, preset("cpu", **{**TINY, "iterations": 61, "size": 96}), resume=True,
              progress=False)
    assert train(sample_dataset, trained, None, resume=True, progress=False) == trained  # its own settings
    with pytest.raises(AvatarError, match=r"other settings or data: iterations 60 -> 61\n"):  # only what was given
        train(sample_dataset, trained, None, resume=True, progress=False, overrides={"iterations": 61})


def test_face_regions_cut_along_the_face(face):
    """The face oval in three bands across the face, upright or tilted: the eyes in the
    upper band, the nose tip in the middle one, the lips in the lower one; together the
    whole oval, each pixel in one band."""
    size = 256
    upright = np.c_[size / 2 + 700 * face[:, 0], size / 2 - 700 * face[:, 1]]  # head frame: y up; pixels: y down
    c, s = np.cos(np.radians(35)), np.sin(np.radians(35))
    tilted = (upright - size / 2) @ np.array([[c, s], [-s, c]]) + size / 2
    for lm in (upright, tilted):
        masks = face_region_masks(lm, size)
        bands = np.stack([masks[k] for k in FACE_REGIONS])
        assert (bands.sum(0) == masks["face"]).all() and all(b.sum() > 200 for b in bands)
        for band, points in (("upper", (159, 386, 105, 334)), ("middle", (4, 205, 425)), ("lower", (13, 14, 17, 61))):
            x, y = np.round(lm[list(points)]).astype(int).T
            assert masks[band][y, x].all(), band


def test_eval_render_export(trained, speech_wav, tmp_path, capsys):
    assert cli(["eval", str(trained)]) == 0
    printed = capsys.readouterr().out
    r = saved = json.loads((trained / "eval.json").read_text())
    assert saved["format"] == "avatar-eval/3" and saved["held_out_frames"] == r["held_out_frames"]
    # Lip sync: the real frames, the speech-driven avatar, the renderer on tracked motion, the static mouth.
    assert set(saved["lipsync"]) == {"real", "avatar", "tracked_motion", "static_mouth"}
    assert saved["lipsync"]["real"]["opening_range_ratio"] == pytest.approx(1.0)
    # (mediapipe rarely finds the tiny 64 px test avatar's face: the measures are tested in test_recon_lipsync)
    assert all(row["frames"] == len(r["held_out_frames"]) for row in saved["lipsync"].values())
    assert len(r["held_out_frames"]) == round(80 / 11)
    assert 10 < r["psnr"] < 60 and 0 < r["ssim"] <= 1 and r["psnr_face"] is not None and r["fps"] > 0
    assert (trained / "eval_strip.png").is_file()
    live = saved["live_speech"]  # the same frames driven by the clip's speech streamed causally
    assert live["frames"] == len(r["held_out_frames"]) and live["psnr_face_offline"] == pytest.approx(r["psnr_face"])
    assert 10 < live["psnr_face"] < 60 and live["face_cost_db"] == pytest.approx(r["psnr_face"] - live["psnr_face"])
    assert live["motion"].startswith("the live motion net (distilled for 80 ms)")  # trained with the avatar
    # The held-out frames driven by their own tracked motion: the renderer without the speech stage.
    first = r["per_frame"][0]
    a = load_avatar(trained)
    ds = open_dataset(a, a.size, required=True)
    f = ds[first["frame"]]
    with torch.no_grad():
        pred = render_frame(a, ds, first["frame"], behind_head(f, ds.plate(first["frame"])),
                            a.tracked_motion(ds)[f.frame_index], torch.tensor([f.eye_openness]))[0]
    assert first["tracked_motion"]["psnr"] == pytest.approx(float(psnr(pred, f.image)), abs=1e-4)
    # The upper face's codes: any speech leaves them at the clip's average; a dataset's own
    # frame takes its tracked ones (eval's held-out rows), and they survive the checkpoint.
    spoken = a.motion_net.spoken
    assert spoken == a.model.rig.basis.spoken == 16 and a.model.rig.basis.dim == 22
    speech, own, tracked_codes = a.speech_motion(ds.features), a.dataset_motion(ds), a.tracked_motion(ds)
    assert float(speech[:, spoken:].abs().max()) == 0 and float(tracked_codes[:, spoken:].abs().max()) > 0
    torch.testing.assert_close(own, torch.cat([speech[:, :spoken], tracked_codes[:, spoken:]], 1))
    rest = a.static_mouth(own)  # the static-mouth baseline keeps the frame's brows
    assert float(rest[:, :spoken].abs().max()) == 0 and torch.equal(rest[:, spoken:], own[:, spoken:])
    with torch.no_grad():
        pred_own = render_frame(a, ds, first["frame"], behind_head(f, ds.plate(first["frame"])), own[f.frame_index],
                                torch.tensor([f.eye_openness]))[0]
    assert first["psnr"] == pytest.approx(float(psnr(pred_own, f.image)), abs=1e-4)
    tracked = saved["tracked_motion"]
    assert tracked["psnr"] == pytest.approx(np.mean([row["tracked_motion"]["psnr"] for row in r["per_frame"]]))
    assert all(10 < tracked[k] < 60 for k in ("psnr", "psnr_face")) and 0 < tracked["ssim"] <= 1
    assert tracked["lmd_frames"] == sum(row["tracked_motion"]["lmd"] is not None for row in r["per_frame"])
    assert f"driven by their tracked motion (a perfect speech -> motion stage): PSNR full {tracked['psnr']:.2f} dB" \
        in printed
    # The face PSNR by region: each over its own band of the face oval.
    masks = face_masks(ds, first["frame"])
    assert first["tracked_motion"]["psnr_face_lower"] == pytest.approx(float(psnr(pred, f.image, masks["lower"])),
                                                                       abs=1e-4)
    assert all(r[f"psnr_face_{k}"] == pytest.approx(np.mean([row[f"psnr_face_{k}"] for row in r["per_frame"]]))
               for k in FACE_REGIONS)
    assert " (upper / middle / lower face " + " / ".join(f"{r[f'psnr_face_{k}']:.2f}" for k in FACE_REGIONS) + " dB)" \
        in printed
    assert all(10 < block[f"psnr_face_{k}"] < 60 for block in (tracked, saved["train_fit"]["tracked_motion"])
               for k in FACE_REGIONS)
    fit = saved["train_fit"]
    assert fit["frames"] and not set(fit["frames"]) & set(r["held_out_frames"]) and max(fit["frames"]) < 73
    assert len(fit["per_frame"]) == len(fit["frames"]) and 10 < fit["psnr_face"] < 60
    assert f"PSNR face {fit['psnr_face']:.2f} dB, LMD" in printed  # train_fit's LMD is there to print

    for camera in ("dataset", "orbit", "fixed:20,-5"):
        out = tmp_path / f"{camera.replace(':', '_')}.mp4"
        info = render_video(trained, speech_wav, out, camera=camera, progress=False)
        with av.open(str(out)) as c:
            kinds = {s.type: s.codec_context.name for s in c.streams}
            video = c.streams.video[0]
            n_frames = sum(1 for _ in c.decode(video=0))
        assert kinds == {"video": "h264", "audio": "aac"}
        assert abs(n_frames / 25.0 - 2.3) < 0.1 and abs(info["seconds"] - info["audio_seconds"]) < 0.1
        assert (video.codec_context.width, video.codec_context.height) == (64, 64)

    paths = export(trained, ply=tmp_path / "canonical.ply")
    model = load_avatar(trained).model
    assert len(load_ply(paths[0])) == len(model) + len(model.torso)  # the head's branches and the torso
    export(trained, ply=tmp_path / "frame3.ply", frame=3)
    assert load_ply(tmp_path / "frame3.ply").means.shape == load_ply(paths[0]).means.shape
    frames = export(trained, audio=speech_wav, frames_dir=tmp_path / "frames", progress=False)
    assert len(frames) == int(np.ceil(2.3 * 25)) and frames[0].name == "frame_000000.ply"

    drive = evaluate_drive(trained, speech_wav, progress=False)
    saved = json.loads((trained / f"eval_drive_{speech_wav.stem}.json").read_text())
    assert saved["frames"] == drive["frames"] == int(np.ceil(2.3 * 25))
    assert set(saved["lipsync"]) == {"real", "avatar", "static_mouth"}


def test_cli_errors_on_bad_inputs(trained, sample_dataset, tmp_path, capsys):
    # Audio without speech.
    silent = tmp_path / "silent.wav"
    sf.write(silent, np.zeros(16000 * 2, np.float32), 16000)
    assert cli(["render", str(trained), "--audio", str(silent), "--out", str(tmp_path / "x.mp4")]) == 1
    err = capsys.readouterr().err
    assert "silent.wav" in err and not (tmp_path / "x.mp4").exists()
    assert cli(["render", str(trained), "--audio", str(silent), "--out", str(tmp_path / "x.mp4"),
                "--camera", "sideways"]) == 1
    assert "dataset, dataset:CAMERA (a rig's), orbit or fixed" in capsys.readouterr().err
    # Corrupt and NaN checkpoints.
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "checkpoint.safetensors").write_bytes((trained / "checkpoint.safetensors").read_bytes()[:5000])
    assert cli(["eval", str(bad)]) == 1
    assert "checkpoint.safetensors: is not a readable checkpoint" in capsys.readouterr().err
    from recon.checkpoint import load_checkpoint
    from safetensors.torch import save_file

    tensors, meta = load_checkpoint(trained / "checkpoint.safetensors")
    tensors["face.means"][0, 0] = float("nan")
    save_file(tensors, str(bad / "checkpoint.safetensors"), metadata={"avatar": json.dumps(meta)})
    assert cli(["export", str(bad), "--ply", str(tmp_path / "nan.ply")]) == 1
    assert "NaN/Inf values in face.means" in capsys.readouterr().err and not (tmp_path / "nan.ply").exists()
    assert cli(["eval", str(tmp_path / "nowhere")]) == 1
    assert "is not an avatar folder" in capsys.readouterr().err
    # A dataset missing files.
    broken = tmp_path / "broken"
    import shutil

    shutil.copytree(sample_dataset, broken)
    (broken / "audio_features.npz").unlink()
    assert cli(["train", str(broken), "--out", str(tmp_path / "a2")]) == 1
    assert "audio_features.npz: missing from the dataset" in capsys.readouterr().err
    cfg = tmp_path / "cfg.json"
    cfg.write_text('{"iterations": "many"}')
    assert cli(["train", str(sample_dataset), "--out", str(tmp_path / "a3"), "--config", str(cfg)]) == 1
    assert "cfg.json" in capsys.readouterr().err


def test_resume_after_kill_9(sample_dataset, tmp_path):
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps({**TINY, "iterations": 400, "checkpoint_every": 25}))
    out = tmp_path / "avatar"
    cmd = [sys.executable, "-m", "avatar", "train", str(sample_dataset), "--out", str(out), "--config", str(cfg)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = out / "checkpoint.safetensors"
    deadline = time.time() + 300
    from recon.checkpoint import load_checkpoint

    while time.time() < deadline:
        if ckpt.is_file() and load_checkpoint(ckpt)[1]["step"] >= 50:
            break
        assert proc.poll() is None, "training ended before it could be killed"
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = load_checkpoint(ckpt)[1]["step"]
    assert 50 <= killed_at < 420
    # Resuming continues from the last checkpoint and finishes; the metrics log has each step once.
    done = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    _, meta = load_checkpoint(ckpt)
    assert meta["step"] == 420  # 400 of the head, 20 of the torso
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 420
    assert not list(out.glob(".*.tmp*"))  # a write cut short by the kill was cleaned up
    assert f"{killed_at}/420" in done.stderr  # the progress bar restarted where the checkpoint was
    a = load_avatar(out)
    assert torch.isfinite(a.model.face.means).all()


def test_job_runs_every_stage_and_reuses_them(sample_dataset, speech_wav, tmp_path, capsys):
    video = sample_dataset.parent / "sample" / "sample.mp4"
    train = ", ".join(f"{k} = {json.dumps(v)}" for k, v in TINY_TRAIN.items())
    job = tmp_path / "job.toml"
    job.write_text(f"""
[job]
out = "{tmp_path / 'work'}"
[input]
video = "{video}"
[capture]
size = 128
[train]
preset = "cpu"
{train.replace(', ', chr(10))}
[render]
audio = ["{speech_wav}"]
camera = "fixed:10,0"
""")
    assert cli(["run", str(job)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["videos"] == [str(tmp_path / "work" / "renders" / "speech_fixed_10_0.mp4")]
    assert (tmp_path / "work" / "avatar" / "eval.json").is_file()
    t0 = time.time()
    assert cli(["run", str(job)]) == 0
    err = capsys.readouterr().err
    assert err.count("reusing") == 3 and time.time() - t0 < 30  # the avatar, the render and the eval
    # Other speech under the same name: rendered again, the rest reused.
    sf.write(tmp_path / "speech.wav", sf.read(speech_wav)[0][::-1], sf.info(speech_wav).samplerate)
    job.write_text(job.read_text().replace(str(speech_wav), str(tmp_path / "speech.wav")))
    assert cli(["run", str(job)]) == 0
    err = capsys.readouterr().err
    assert "reusing" in err and "speech.wav -> " in err and "scoring" not in err
    # Another training setting: the avatar is trained again, the old one kept aside.
    job.write_text(job.read_text().replace("iterations = 60", "iterations = 40"))
    assert cli(["run", str(job)]) == 0
    err = capsys.readouterr().err
    assert "trained with other settings or data (iterations 60 -> 40)" in err and "scoring" in err
    assert (tmp_path / "work" / "avatar.previous" / "checkpoint.safetensors").is_file()
    # Two speech files with one name: two videos, not one overwritten.
    job.write_text(job.read_text().replace(f'audio = ["{tmp_path / "speech.wav"}"]',
                                           f'audio = ["{tmp_path / "speech.wav"}", "{speech_wav}"]'))
    assert cli(["run", str(job)]) == 0
    videos = json.loads(capsys.readouterr().out)["videos"]
    assert [os.path.basename(v) for v in videos] == ["speech-1_fixed_10_0.mp4", "speech-2_fixed_10_0.mp4"]
    # The radiance-field method on the same dataset: a new avatar, the Gaussian one kept aside.
    nerf = tmp_path / "nerf.toml"
    nerf.write_text(job.read_text().split("[train]")[0] + """[train]
method = "nerf"
preset = "demo"
iterations = 30
size = 64
rays_per_view = 256
motion_steps = 10
live_motion_steps = 10
live_copies = 1
[eval]
enabled = false
""")
    assert cli(["run", str(nerf)]) == 0
    err = capsys.readouterr().err
    assert "the method 'gaussians' -> a config of NerfConfig" in err and "(method nerf" in err
    assert load_avatar(tmp_path / "work" / "avatar").meta["method"] == "nerf"
