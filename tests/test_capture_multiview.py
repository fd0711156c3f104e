"""`avatar capture RIG`: a calibrated rig's videos -> a dataset (format avatar-dataset/2).
The steps on exact data (triangulation, head poses, the undistort-crop maps), the whole
path on the sample subject filmed by a rig through the face tracker and into training and
novel-view eval, the named errors, and the real 3-camera NeRSemble composite."""

from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest

from _rigs import COMPOSITE, TILES, face_landmarks, head_motion, head_rig, look_at, write_head_rig
from avatar.cli import main
from avatar.errors import AvatarError
from capture.calibration import Calibration, CameraCalibration, load_calibration, save_calibration
from capture.face_calibration import LANDMARKS
from capture.multiview import crop_view, head_poses, triangulate_face
from recon.checkpoint import load_checkpoint
from recon.dataset import Dataset

RADIUS = 0.8


def _projections(cams) -> tuple[np.ndarray, np.ndarray]:
    return np.stack([c.K @ c.world_to_camera[:3] for c in cams]), np.stack([c.centre for c in cams])


def _angle_deg(R: np.ndarray) -> float:
    return math.degrees(math.acos(np.clip((np.trace(R) - 1) / 2, -1, 1)))


def test_triangulation_and_head_poses_are_exact_on_exact_landmarks(face):
    cams = head_rig(4, RADIUS)
    motion = head_motion(12)
    seen = [face_landmarks(c, face, motion, 0.0) for c in cams]
    tri = triangulate_face(seen, *_projections(cams))
    assert tri.timesteps == list(range(12)) and all(v == [0, 1, 2, 3] for v in tri.views)
    truth = np.stack([face @ T[:3, :3].T + T[:3, 3] for T in motion])
    assert np.abs(tri.points - truth).max() < 1e-6  # metres
    assert max(max(e) for e in tri.errors.values()) < 1e-4  # pixels

    canonical, scale, R, t = head_poses(tri.points)
    eyes = np.linalg.norm(face[33] - face[263])
    assert scale == pytest.approx(eyes / 0.09, rel=1e-6)  # the world's metre is 9 cm / the eye corners
    for k, T in enumerate(motion):  # the head's motion relative to its first pose, exactly
        assert _angle_deg((R[k] @ R[0].T).T @ (T[:3, :3] @ motion[0][:3, :3].T)) < 1e-4
    rigid = list(LANDMARKS)
    fitted = scale * np.einsum("tij,pj->tpi", R, canonical[rigid]) + t[:, None]
    assert np.abs(fitted - tri.points[:, rigid]).max() < 1e-6


def test_disagreeing_and_profile_views_drop_out(face):
    cams = head_rig(4, RADIUS)
    motion = head_motion(6)
    seen = [face_landmarks(c, face, motion, 0.3, seed=n) for n, c in enumerate(cams)]
    seen[2][3] = seen[2][3] + np.array([25.0, -10.0, 0.0], np.float32)  # a mistracked view
    behind = CameraCalibration("behind", 320, 320, cams[0].K, np.zeros(5),
                               look_at(-cams[0].centre, up=(0.0, 1.0, 0.0)))
    behind_seen = face_landmarks(behind, face, motion, 0.0)  # the back of the head, "tracked" as a face
    tri = triangulate_face(seen + [behind_seen], *_projections(cams + [behind]))
    assert tri.views[3] == [0, 1, 3] and all(v == [0, 1, 2, 3] for n, v in enumerate(tri.views) if n != 3)
    assert tri.dropped_views == {"disagreeing": 1, "profile": 6, "lone view": 0}
    truth = np.stack([face @ T[:3, :3].T + T[:3, 3] for T in motion])
    assert np.abs(tri.points - truth).max() < 0.004  # 0.3 px of noise: millimetres

    # Fewer than two views left: the timestep drops out.
    lone = [seen[0], {k: v for k, v in seen[1].items() if k != 4}]
    tri = triangulate_face(lone, *_projections(cams[:2]))
    assert 4 not in tri.timesteps and tri.dropped_views["lone view"] == 1


@pytest.mark.parametrize("dist", [np.zeros(5), np.array([-0.25, 0.08, 0.001, -0.002, 0.0])])
def test_the_crop_maps_undistort_and_keep_the_intrinsics_true(dist):
    """A dot filmed through the lens lands in the undistorted crop where the crop's own
    pinhole intrinsics put it (to a tenth of a pixel)."""
    K = np.array([[600.0, 0, 331.0], [0, 602.0, 236.0], [0, 0, 1]])
    rng = np.random.default_rng(0)
    points = np.column_stack([rng.uniform(-0.08, 0.08, (6, 2)), np.full(6, 1.0)])
    uv = cv2.projectPoints(points, np.zeros(3), np.zeros(3), K, dist)[0].reshape(-1, 2)
    view = crop_view(K, dist, 640, 480, uv, np.full(6, 60.0), 256, 2.6)
    x0, y0, side = view.window
    spread = (np.percentile(uv, 95, axis=0) - np.percentile(uv, 5, axis=0)).max()
    assert side == round(2.6 * 60 + spread) and 0 <= x0 <= 640 - side and 0 <= y0 <= 480 - side
    yy, xx = np.mgrid[0:480, 0:640]
    for (x, y), X in zip(uv, points):
        img = np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / 4.5).astype(np.float32)  # a blob centred at (x, y)
        crop = cv2.remap(img, *view.maps, cv2.INTER_LINEAR)
        m = cv2.moments(crop)
        found = np.array([m["m10"] / m["m00"], m["m01"] / m["m00"]])
        expected = (view.K @ X)[:2] / X[2]
        assert np.linalg.norm(found - expected) < 0.1, (found, expected)


@pytest.fixture(scope="module")
def filmed_rig(tmp_path_factory):
    """The sample subject's head filmed by 4 cameras (30 frames at 256 px) and its true
    calibration: (folder, CALIB.json, cameras)."""
    root = tmp_path_factory.mktemp("head_rig")
    cams = head_rig(4, RADIUS, size=256, arc_deg=50)
    write_head_rig(root / "rig", cams, 30)
    save_calibration(root / "CALIB.json", Calibration("given", cams, "truth"))
    return root / "rig", root / "CALIB.json", cams


def test_a_filmed_rig_becomes_a_dataset_an_avatar_trains_on(filmed_rig, speech_wav, tmp_path, capsys):
    rig, calib, cams = filmed_rig
    out = tmp_path / "ds"
    assert main(["capture", str(rig), "--calib", str(calib), "--out", str(out), "--size", "128"]) == 0
    report = json.loads((out / "capture_report.json").read_text())
    assert report["timesteps"]["triangulated"] == 30 and report["audio"]["source"] is None
    for name, cam in report["cameras"].items():  # through mediapipe, on a photo on a relief
        assert cam["face_frames"] == 30 and cam["triangulation_rigid_px"]["median"] < 2.0, (name, cam)
    ds = Dataset(out, check_images=True)
    assert ds.meta["format"] == "avatar-dataset/2" and not ds.has_speech and len(ds) == 120
    assert [c.name for c in ds.cameras] == [c.name for c in cams]

    # Every frame's camera, in the head frame, is where the rig puts it: the poses of two
    # cameras at one timestep differ by the calibration's relative pose ...
    gl = np.diag([1.0, -1.0, -1.0, 1.0])
    by_view = {(f["camera"], f["timestep"]): np.array(f["transform_matrix"]) @ gl for f in ds.frames}
    for k in (0, 17):
        rel = np.linalg.inv(by_view["cam_3", k]) @ by_view["cam_0", k]  # cam_0 -> cam_3
        truth = cams[3].world_to_camera @ np.linalg.inv(cams[0].world_to_camera)
        assert _angle_deg(rel[:3, :3].T @ truth[:3, :3]) < 1e-4
    # ... and the head turns as it did (23 degrees at most), within the face tracker's error
    # (its landmarks slide on the sample subject, a photo on a relief, as the head turns).
    motion, W = head_motion(30), cams[0].world_to_camera[:3, :3]
    errors = [_angle_deg((np.linalg.inv(by_view["cam_0", k][:3, :3]) @ by_view["cam_0", 0][:3, :3]).T
                         @ W @ motion[k][:3, :3] @ motion[0][:3, :3].T @ W.T) for k in range(30)]
    assert np.median(errors) < 2.0 and max(errors) < 3.0, errors  # measured: 1.45, 2.39
    # Each camera's crop keeps its own lens: the 4 focal lengths differ as the rig's do.
    ratio = [c.K[0, 0] / c.width for c in cams]
    crop = [c["fl_x"] * c_report["crop_window"]["side"] / 128 / 256 for c, c_report in
            zip(ds.meta["cameras"], report["cameras"].values())]
    assert np.allclose(ratio, crop, rtol=1e-6)

    # A dataset without sound: the avatar follows tracked motion; a camera held out is scored.
    avatar = tmp_path / "av"
    assert main(["train", str(out), "--out", str(avatar), "--preset", "demo", "--iterations", "12", "--size", "64",
                 "--holdout-cameras", "cam_1"]) == 0
    capsys.readouterr()
    assert main(["eval", str(avatar)]) == 0
    printed = capsys.readouterr().out
    assert "lip sync: not measured" in printed and "camera cam_1: 24 views" in printed
    result = json.loads((avatar / "eval.json").read_text())
    assert result["driven_by"] == "tracked_motion" and result["novel_views"]["cameras"]["cam_1"]["frames"] == 24
    assert all(ds.frames[i]["camera"] != "cam_1" for i in result["held_out_frames"])
    assert main(["eval", str(avatar), "--drive", str(speech_wav)]) == 1
    assert "filmed without sound, so speech cannot drive it" in capsys.readouterr().err

    # With speech given, the dataset carries it: one row of features per timestep.
    spoken = tmp_path / "spoken"
    assert main(["capture", str(rig), "--calib", str(calib), "--out", str(spoken), "--size", "64",
                 "--audio", str(speech_wav)]) == 0
    ds = Dataset(spoken)
    assert ds.has_speech and ds.features["mel"].shape == (30, 16, 80) and (spoken / "audio.wav").is_file()
    # ... and an avatar of it speaks: replayed through the first camera's clip.
    short = tmp_path / "short_live.json"  # a live motion net of a few steps (recon/live.py)
    short.write_text(json.dumps({"live_motion_steps": 10, "live_copies": 1}))
    assert main(["train", str(spoken), "--out", str(tmp_path / "spoken_av"), "--preset", "demo", "--iterations", "6",
                 "--size", "64", "--config", str(short)]) == 0
    assert (tmp_path / "spoken_av" / "live_motion.safetensors").is_file()
    video = tmp_path / "spoken.mp4"
    assert main(["render", str(tmp_path / "spoken_av"), "--audio", str(speech_wav), "--out", str(video)]) == 0
    import av

    with av.open(str(video)) as container:
        assert container.streams.video[0].frames == 58 and container.streams.audio  # 2.3 s at 25 fps
        first = next(container.decode(video=0)).to_ndarray(format="rgb24").astype(np.float32)
    # ... or through another of the rig's cameras, with its own lens and plate.
    side = tmp_path / "side.mp4"
    assert main(["render", str(tmp_path / "spoken_av"), "--audio", str(speech_wav), "--out", str(side),
                 "--camera", "dataset:cam_2"]) == 0
    with av.open(str(side)) as container:
        assert container.streams.video[0].frames == 58
        seen = next(container.decode(video=0)).to_ndarray(format="rgb24").astype(np.float32)
    ds64 = Dataset(spoken, size=64)
    truth = ds64[ds64.views_of(2)[0]].image.numpy() * 255  # cam_2's first view, which the render replays
    assert np.abs(seen - truth).mean() < 0.7 * np.abs(first - truth).mean()  # measured: 0.54
    assert main(["render", str(tmp_path / "spoken_av"), "--audio", str(speech_wav), "--out", str(side),
                 "--camera", "dataset:cam_9"]) == 1
    assert "has no camera named 'cam_9'" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "spoken_av"), "--drive", str(speech_wav), "--camera", "cam_2"]) == 0
    drive = json.loads((tmp_path / "spoken_av" / f"eval_drive_{speech_wav.stem}_cam_2.json").read_text())
    assert drive["camera"] == "cam_2" and drive["frames"] == 58



def test_a_job_runs_a_rig(filmed_rig, tmp_path, capsys):
    """`avatar run` with [input] rig: the rig captured with its calibration, an avatar
    trained on its cameras but the one [train] holds out, trained again when the held-out
    cameras change; a setting only one camera's capture has is refused by name."""
    rig, calib, cams = filmed_rig
    job = tmp_path / "rig.toml"
    text = f"""[job]
out = "{tmp_path / 'work'}"
[input]
rig = "{rig}"
[capture]
calib = "{calib}"
size = 64
[train]
preset = "demo"
iterations = 6
torso_steps = 0
size = 64
holdout_cameras = ["{cams[-1].name}"]
[eval]
enabled = false
"""
    job.write_text(text)
    assert main(["run", str(job)]) == 0
    assert "the rig " in capsys.readouterr().err
    ds = Dataset(tmp_path / "work" / "dataset")
    assert [c.name for c in ds.cameras] == [c.name for c in cams] and len(ds) == 120
    checkpoint = tmp_path / "work" / "avatar" / "checkpoint.safetensors"
    assert load_checkpoint(checkpoint)[1]["holdout_cameras"] == [cams[-1].name]
    assert main(["run", str(job)]) == 0  # the same cameras held out: the avatar is reused
    assert "reusing" in capsys.readouterr().err
    job.write_text(text.replace(f'["{cams[-1].name}"]', '["cam_9"]'))  # refused before the avatar is moved
    assert main(["run", str(job)]) == 1
    assert "has no camera named 'cam_9'" in capsys.readouterr().err and checkpoint.is_file()
    job.write_text(text.replace(f'holdout_cameras = ["{cams[-1].name}"]', "holdout_cameras = []"))
    assert main(["run", str(job)]) == 0
    assert f"(held-out cameras ['{cams[-1].name}'] -> none)" in capsys.readouterr().err
    assert load_checkpoint(checkpoint)[1]["holdout_cameras"] == []
    previous = tmp_path / "work" / "avatar.previous" / "checkpoint.safetensors"
    assert load_checkpoint(previous)[1]["holdout_cameras"] == [cams[-1].name]
    job.write_text(text.replace(f'["{cams[-1].name}"]', f'"{cams[-1].name}"'))
    assert main(["run", str(job)]) == 1
    assert "[train] holdout_cameras must be a list of camera names" in capsys.readouterr().err
    job.write_text(text.replace("size = 64\n[train]", "size = 64\nphotometric = true\n[train]"))
    assert main(["run", str(job)]) == 1
    assert "[capture] has unknown keys ['photometric'] for a rig" in capsys.readouterr().err

def _takes(seconds: float, seed: int) -> np.ndarray:
    from scenes.speech import synthesize

    return synthesize(seconds, seed=seed).pcm


def _hand_started(folder: Path, frames: list[list[np.ndarray]], speech: np.ndarray, starts: list[float],
                  fps: float = 25.0, seed: int = 0) -> None:
    """One mp4 per camera, camera n recording from `starts[n]` seconds into the take: its
    frames from then on, and the speech from then on with its own microphone's noise."""
    from avatar.media import write_mp4

    rng = np.random.default_rng(seed)
    folder.mkdir()
    for n, (images, start) in enumerate(zip(frames, starts)):
        pcm = speech[int(round(start * 16_000)):]
        write_mp4(folder / f"cam_{n}.mp4", images[int(round(start * fps)):], fps,
                  pcm + rng.normal(0, 0.01, pcm.shape).astype(np.float32))


def test_cameras_started_by_hand_are_synced_by_their_sound(tmp_path):
    from capture.rig import audio_offsets, open_rig

    speech = _takes(6.0, seed=3)
    grey = [[np.full((64, 64, 3), 40 * n, np.uint8)] * 150 for n in range(3)]
    _hand_started(tmp_path / "rig", grey, speech, [0.0, 0.237, 0.61])
    offsets, peaks = audio_offsets(open_rig(tmp_path / "rig"))
    assert np.allclose(offsets, [0.0, 0.237, 0.61], atol=0.008), offsets  # a fifth of a frame (measured: 5 ms)
    assert min(peaks) > 0.45  # measured: 0.52 where the offset falls between envelope steps, 0.94 on one

    _hand_started(tmp_path / "other", grey[:2], speech, [0.0, 0.0])  # camera 1 filmed another take
    from avatar.media import write_mp4

    write_mp4(tmp_path / "other" / "cam_1.mp4", grey[1], 25.0, _takes(6.0, seed=9))
    with pytest.raises(AvatarError, match=r"cam_1.mp4: its sound does not match camera cam_0's"):
        audio_offsets(open_rig(tmp_path / "other"))
    write_mp4(tmp_path / "other" / "cam_2.mp4", grey[2], 25.0)  # no sound at all
    with pytest.raises(AvatarError, match="cameras cam_2 have no sound track"):
        audio_offsets(open_rig(tmp_path / "other"))


def test_a_rig_of_phones_started_by_hand_is_captured_in_sync(filmed_rig, tmp_path):
    """The filmed rig's cameras as videos started 0-5 frames apart, with sound: capture finds
    the offsets and every moment is triangulated from all four views (a camera a frame
    late would see the head elsewhere, and drop out as disagreeing)."""
    rig, calib, cams = filmed_rig
    frames = [[cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB) for p in sorted((rig / c.name).glob("*.png"))]
              for c in cams]
    _hand_started(tmp_path / "phones", frames, _takes(1.2, seed=4), [0.08, 0.0, 0.2, 0.12])
    out = tmp_path / "ds"
    assert main(["capture", str(tmp_path / "phones"), "--calib", str(calib), "--out", str(out), "--size", "64"]) == 0
    report = json.loads((out / "capture_report.json").read_text())
    assert report["sync"]["method"] == "sound"
    assert report["sync"]["offsets_frames"] == {"cam_0": 2, "cam_1": 0, "cam_2": 5, "cam_3": 3}
    assert report["timesteps"]["views_per_timestep"]["4"] >= 24 and report["timesteps"]["views_dropped"]["disagreeing"] == 0
    ds = Dataset(out)
    assert ds.has_speech and report["audio"]["source"].endswith("cam_0.mp4")


def test_bad_rigs_are_named(filmed_rig, tmp_path, capsys):
    rig, calib, cams = filmed_rig
    uneven = tmp_path / "uneven"
    uneven.mkdir()
    (uneven / "cam_0").symlink_to(rig / "cam_0")
    (uneven / "cam_1").mkdir()
    for png in sorted((rig / "cam_1").glob("*.png"))[:20]:
        (uneven / "cam_1" / png.name).symlink_to(png)
    blind = tmp_path / "blind"
    blind.mkdir()
    (blind / "cam_0").symlink_to(rig / "cam_0")
    (blind / "cam_1").mkdir()
    for k in range(30):
        cv2.imwrite(str(blind / "cam_1" / f"{k:04d}.png"), np.full((256, 256, 3), 90, np.uint8))
    other = tmp_path / "other.json"
    save_calibration(other, Calibration("given", cams[:1], "truth"))
    small = tmp_path / "small.json"
    save_calibration(small, Calibration("given", [CameraCalibration(c.name, 128, 128, c.K, c.dist, c.world_to_camera)
                                                  for c in cams], "truth"))
    for argv, message in [
        ([str(uneven), "--calib", str(calib)], "its cameras have different lengths (cam_0: 30, cam_1: 20 frames)"),
        ([str(blind), "--calib", str(calib)], "the face is seen by two or more cameras at 0 timesteps"),
        ([str(rig), "--calib", str(other)], "has no camera named 'cam_1'"),
        ([str(rig), "--calib", str(small)], "calibrates camera cam_0 at 128x128, but its frames are 256x256"),
        ([str(rig / "cam_0")], "holds 0 cameras"),
        ([str(rig), "--photometric"], "--photometric is for one camera's video, not a rig"),
        ([str(rig), "--size", "8"], "capture setting size must be between 32 and 4096, got 8"),
    ]:
        assert main(["capture", *argv, "--out", str(tmp_path / "ds")]) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and "Traceback" not in err, err
        assert not (tmp_path / "ds").exists() and not (tmp_path / "ds.partial").exists()


@pytest.mark.skipif(not COMPOSITE.is_file(), reason="the NeRSemble composite is not in ../shared/data")
def test_real_three_camera_capture(tmp_path):
    """NeRSemble subject 074, three of its 16 identical cameras (tiles of VHAP's composite;
    no calibration is published with it), calibrated from the face with one lens model
    (--same-lens) and captured: every view's rigid landmarks agree with the triangulated
    face to under 2 px (the whole face's, outline and lips included, to about 3 px)."""
    calib = tmp_path / "CALIB.json"
    tiles = [a for t in TILES for a in ("--tile", t)]
    assert main(["calibrate", str(COMPOSITE), "--method", "face", "--same-lens", "--out", str(calib), *tiles]) == 0
    rig = load_calibration(calib)
    assert rig.method == "face" and len(rig.cameras) == 3
    for cam in rig.cameras:
        assert cam.reprojection["median_px"] < 2.0, cam.reprojection  # the bound, every view
        assert cam.K[0, 0] == rig.cameras[0].K[0, 0]
    assert 300 < rig.cameras[0].K[0, 0] < 800  # 17-45 degrees across a 247 px tile
    centres = np.stack([c.centre for c in rig.cameras])
    assert 0.2 < np.linalg.norm(centres[1] - centres[0]) < 3.0  # metres, from the 9 cm eye corners
    out = tmp_path / "ds"
    assert main(["capture", str(COMPOSITE), "--calib", str(calib), "--out", str(out), "--size", "128", *tiles]) == 0
    report = json.loads((out / "capture_report.json").read_text())
    assert report["timesteps"]["triangulated"] >= 180
    for cam in report["cameras"].values():
        assert cam["triangulation_rigid_px"]["median"] < 2.0 and cam["triangulation_px"]["median"] < 3.5, cam
    assert report["peak_memory_gb"] < 2.0 and report["timings_s"]["total"] < 120
    assert 0.8 < report["head"]["scale_units_per_metre"] < 1.25  # the face's 9 cm, in the calibration's metres
    ds = Dataset(out)
    assert len(ds) == 3 * report["timesteps"]["triangulated"] and not ds.has_speech
