"""`avatar capture` end to end: bad inputs get their message and leave nothing behind;
the real clip gives a complete, accurate dataset; ER-NeRF folders import."""

import json
import time

import av
import cv2
import numpy as np
import pytest
import soundfile as sf

from avatar.cli import main
from avatar.media import write_mp4
from bench.scenes import SHARED_DATA
from capture.audio import load_audio

CLIP = SHARED_DATA / "video" / "hdtf_katie_512_8s.mp4"
SPEECH = SHARED_DATA / "audio" / "zozo_16k_stereo_11s.wav"


def write_video(path, frames, fps=25, audio=None):
    """frames: iterable of [H, W, 3] uint8; audio: float32 mono 16 kHz samples or None."""
    write_mp4(path, frames, fps, audio)


def clip_frames(limit=None):
    with av.open(str(CLIP)) as c:
        for i, f in enumerate(c.decode(video=0)):
            if limit is not None and i >= limit:
                break
            yield f.to_ndarray(format="rgb24")


def noise_frames(n, size=(128, 96), seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8) for _ in range(n)]


def speech(seconds):
    if not SPEECH.is_file():
        pytest.skip(f"shared test data absent: {SPEECH}")
    return load_audio(SPEECH)[: int(seconds * 16000)]


def run_cli(*args):
    return main(["capture", *map(str, args)])


def expect_failure(capsys, out, *args, match):
    assert run_cli(*args, "--out", out) == 1
    err = capsys.readouterr().err
    assert match in err, err
    assert not out.exists() and not out.with_name(out.name + ".partial").exists()
    return err


def test_missing_file(tmp_path, capsys):
    err = expect_failure(capsys, tmp_path / "ds", tmp_path / "nope.mp4", match="file not found")
    assert "nope.mp4" in err


def test_corrupt_file(tmp_path, capsys):
    bad = tmp_path / "corrupt.mp4"
    bad.write_bytes(np.random.default_rng(0).integers(0, 255, 50_000, dtype=np.uint8).tobytes())
    expect_failure(capsys, tmp_path / "ds", bad, match="cannot be read as a video")


def test_audio_only_file(tmp_path, capsys):
    wav = tmp_path / "speech.wav"
    sf.write(wav, np.zeros(16000 * 4, np.float32), 16000)
    expect_failure(capsys, tmp_path / "ds", wav, match="has no video stream")


def test_truncated_file(tmp_path, capsys):
    video = tmp_path / "full.mp4"
    write_video(video, noise_frames(100), audio=np.zeros(16000 * 4, np.float32))
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(video.read_bytes()[: video.stat().st_size // 3])
    err = expect_failure(capsys, tmp_path / "ds", cut, match="cut.mp4")
    assert "truncated" in err or "cannot be read" in err


def test_too_short(tmp_path, capsys):
    video = tmp_path / "short.mp4"
    write_video(video, noise_frames(50), audio=np.zeros(32000, np.float32))
    expect_failure(capsys, tmp_path / "ds", video, match="too short (2.0 s")


def test_no_audio_stream(tmp_path, capsys):
    video = tmp_path / "mute.mp4"
    write_video(video, noise_frames(100))
    err = expect_failure(capsys, tmp_path / "ds", video, match="has no audio stream")
    assert "--audio FILE" in err


def test_silent_audio(tmp_path, capsys):
    video = tmp_path / "silent.mp4"
    write_video(video, noise_frames(100), audio=np.zeros(16000 * 4, np.float32))
    expect_failure(capsys, tmp_path / "ds", video, match="the audio is silent")


def test_no_speech(tmp_path, capsys):
    video = tmp_path / "hum.mp4"
    t = np.arange(16000 * 4) / 16000
    write_video(video, noise_frames(100), audio=(0.3 * np.sin(2 * np.pi * 120 * t)).astype(np.float32))
    expect_failure(capsys, tmp_path / "ds", video, match="no speech found")


def test_no_face(tmp_path, capsys):
    video = tmp_path / "noface.mp4"
    write_video(video, noise_frames(100), audio=speech(4))
    expect_failure(capsys, tmp_path / "ds", video, match="no face found in most frames")


@pytest.fixture(scope="module")
def clip_path():
    if not CLIP.is_file():
        pytest.skip(f"shared test data absent: {CLIP}")
    return CLIP


def test_two_faces(tmp_path, capsys, clip_path):
    video = tmp_path / "two.mp4"
    frames = [np.concatenate([f, f[:, ::-1]], 1)[::2, ::2].copy() for f in clip_frames(100)]
    write_video(video, frames, audio=speech(4))
    expect_failure(capsys, tmp_path / "ds", video, match="more than one dominant face")


def test_face_too_small(tmp_path, capsys, clip_path):
    video = tmp_path / "far.mp4"
    frames = []
    for f in clip_frames(100):
        canvas = np.full((720, 1280, 3), 90, np.uint8)
        canvas[300:428, 600:728] = cv2.resize(f, (128, 128), interpolation=cv2.INTER_AREA)
        frames.append(canvas)
    write_video(video, frames, audio=speech(4))
    expect_failure(capsys, tmp_path / "ds", video, match="face too small in frame")


@pytest.mark.slow
def test_real_clip(tmp_path, clip_path, capsys):
    out = tmp_path / "katie"
    t0 = time.perf_counter()
    assert run_cli(clip_path, "--out", out) == 0
    wall = time.perf_counter() - t0
    report = json.loads((out / "capture_report.json").read_text())
    tr = json.loads((out / "transforms.json").read_text())
    print(f"capture wall {wall:.1f} s, report {json.dumps(report['pose']['reprojection_px'])}, "
          f"jitter {report['pose']['jitter_deg']}, signals {report['signals']['mouth_energy']}")
    assert wall < 180
    assert report["frames"]["total"] == 200 and report["frames"]["kept"] >= 195
    assert report["pose"]["reprojection_px"]["median"] < 2.0
    assert report["pose"]["jitter_deg"]["fitted"] < report["pose"]["jitter_deg"]["per_frame_pnp"]
    assert report["pose"]["jitter_deg"]["fitted"] < 0.5
    assert tr["format"] == "avatar-dataset/2" and tr["w"] == tr["h"] == 512 and 100 < tr["fl_x"] < 5000
    assert tr["cameras"] == [{"name": "camera", **{k: tr[k] for k in ("fl_x", "fl_y", "cx", "cy", "background")}}]
    assert all(f["camera"] == "camera" and f["timestep"] == f["frame_index"] for f in tr["frames"])
    assert len(tr["frames"]) == report["frames"]["kept"]
    for f in tr["frames"][:: len(tr["frames"]) // 5]:
        assert (out / f["file_path"]).is_file()
        for m in ("person", "head", "mouth", "eyes", "torso"):
            assert (out / f[f"{m}_mask_path"]).is_file()
        c2w = np.array(f["transform_matrix"])
        assert np.allclose(c2w[:3, :3] @ c2w[:3, :3].T, np.eye(3), atol=1e-5)
        assert 0 <= f["eye_openness"] <= 1
    lm = np.load(out / "landmarks.npy")
    assert lm.shape == (len(tr["frames"]), 478, 3)
    feats = np.load(out / "audio_features.npz")
    assert feats["mel"].shape == (200, 16, 80) and feats["visemes"].shape == (200, 15)
    info = sf.info(out / "audio.wav")
    assert info.samplerate == 16000 and info.channels == 1
    assert cv2.imread(str(out / "preview.png")).shape[0] > 300
    eyes = np.array([f["eye_openness"] for f in tr["frames"]])
    assert eyes.min() < 0.3 < 0.7 < eyes.max()  # the clip has blinks
    assert not out.with_name("katie.partial").exists()

    # A second run reuses the finished dataset.
    t0 = time.perf_counter()
    assert run_cli(clip_path, "--out", out) == 0
    assert time.perf_counter() - t0 < 5


def _face68(rng):
    """A head-like set of 68 landmarks in metres (x to the subject's left, y up, z out)."""
    pts = np.column_stack([rng.uniform(-0.06, 0.06, 68), rng.uniform(-0.08, 0.05, 68), rng.uniform(0.06, 0.1, 68)])
    pts[36], pts[45] = (-0.045, 0.03, 0.09), (0.045, 0.03, 0.09)  # outer eye corners
    pts[8], pts[27] = (0.0, -0.09, 0.08), (0.0, 0.035, 0.1)  # chin, nose bridge
    pts[60:68] = np.column_stack([0.015 * np.cos(np.arange(8)), -0.045 + 0.005 * np.sin(np.arange(8)), np.full(8, 0.095)])
    return pts


# ER-NeRF's own world: another scale, rotation and origin than this project's head frame.
ERNERF_SCALE, ERNERF_SHIFT = 3.0, np.array([0.2, -0.1, 0.3])
ERNERF_ROT = np.array([[np.cos(0.4), -np.sin(0.4), 0], [np.sin(0.4), np.cos(0.4), 0], [0, 0, 1]])


def _fake_ernerf(root, n=12, size=64):
    rng = np.random.default_rng(0)
    face = _face68(rng)
    (root / "ori_imgs").mkdir(parents=True)
    (root / "parsing").mkdir()
    frames = []
    for i in range(n):
        cv2.imwrite(str(root / "ori_imgs" / f"{i}.jpg"), rng.integers(0, 255, (size, size, 3), dtype=np.uint8))
        seg = np.full((size, size, 3), 255, np.uint8)
        seg[10:40, 20:44] = (0, 0, 255)  # head: red in RGB, stored BGR
        seg[40:64, 8:56] = (255, 0, 0)  # torso: blue in RGB
        cv2.imwrite(str(root / "parsing" / f"{i}.png"), seg)
        yaw = np.radians(-15 + 30 * i / (n - 1))
        centre = np.array([0.6 * np.sin(yaw), 0.02, 0.6 * np.cos(yaw)])  # metres, looking at the origin
        z = -centre / np.linalg.norm(centre)
        x = np.cross(np.array([0.0, -1.0, 0.0]), z)
        x /= np.linalg.norm(x)
        R_cv = np.stack([x, np.cross(z, x), z], 1)  # camera-to-world columns, OpenCV axes
        uv = (face - centre) @ R_cv
        lm = uv[:, :2] / uv[:, 2:] * 70.0 + 32.0
        np.savetxt(root / "ori_imgs" / f"{i}.lms", lm, "%f")
        c2w = np.eye(4)
        c2w[:3, :3] = ERNERF_ROT @ R_cv @ np.diag([1.0, -1.0, -1.0])  # OpenGL axes, ER-NeRF world
        c2w[:3, 3] = ERNERF_SCALE * ERNERF_ROT @ centre + ERNERF_SHIFT
        frames.append({"img_id": i, "aud_id": i, "transform_matrix": c2w.tolist(), "face_m": face.tolist()})
    split = n - 2
    for name, fr in (("train", frames[:split]), ("val", frames[split:])):
        (root / f"transforms_{name}.json").write_text(json.dumps({"focal_len": 70.0, "cx": 32.0, "cy": 32.0, "frames": fr}))
    cv2.imwrite(str(root / "bc.jpg"), np.zeros((size, size, 3), np.uint8))
    np.save(root / "aud_ds.npy", rng.normal(size=(n, 16, 29)).astype(np.float32))
    with open(root / "au.csv", "w") as f:
        f.write("frame, AU25_r, AU45_r\n" + "".join(f"{i}, {i % 5}.0, {0.0 if i % 4 else 3.0}\n" for i in range(n)))
    return frames


def test_ernerf_import(tmp_path):
    src = tmp_path / "ernerf"
    frames = _fake_ernerf(src)
    sf.write(src / "aud.wav", speech(12 / 25 + 2), 16000)
    out = tmp_path / "ds"
    assert run_cli("--from-ernerf", src, "--out", out) == 0
    tr = json.loads((out / "transforms.json").read_text())
    assert tr["source"] == "ernerf" and tr["fl_x"] == 70.0 and len(tr["frames"]) == 12
    # The poses moved into the metric head frame (a rigid move of the truth in metres) ...
    c2w = np.array([f["transform_matrix"] for f in tr["frames"]])
    truth = np.array(frames[0]["face_m"])
    eyes = truth[[36, 45]].mean(0)
    centres = np.array([[0.6 * np.sin(y), 0.02, 0.6 * np.cos(y)] for y in np.radians(np.linspace(-15, 15, 12))])
    assert np.allclose(np.linalg.norm(c2w[:, :3, 3] - [0, 0, 0.09], axis=1),
                       np.linalg.norm(centres - eyes, axis=1), atol=1e-3)
    assert np.allclose(c2w[:, :3, :3] @ c2w[:, :3, :3].transpose(0, 2, 1), np.eye(3), atol=1e-6)
    # ... and the triangulated face is the truth: 9 cm between the outer eye corners, which
    # sit on the x axis 9 cm in front of the origin, and every distance as in the truth.
    face = np.load(out / "face_geometry.npz")["canonical"]
    assert np.allclose(face[[36, 45]], [[-0.045, 0, 0.09], [0.045, 0, 0.09]], atol=1e-4)
    assert face[27, 1] > face[8, 1]  # nose bridge above the chin: y is up
    dist = lambda p: np.linalg.norm(p[:, None] - p[None], axis=-1)  # noqa: E731
    assert np.allclose(dist(face), dist(truth), atol=1e-3)
    report = json.loads((out / "capture_report.json").read_text())
    assert report["head_frame"]["reprojection_px"]["median"] < 0.01
    # So an imported folder can be trained: Gaussians initialise from it.
    from recon.dataset import Dataset
    from recon.init import init_gaussians

    g = init_gaussians(Dataset(out), n_volume=400, n_mouth=50)
    assert int((g.branch == 1).sum()) == 50 and int((g.branch == 0).sum()) > 68 + 100
    mouth = g.means[g.branch == 1].mean(0).numpy()
    assert np.linalg.norm(mouth[:2] - face[60:68, :2].mean(0)) < 0.01
    assert tr["frames"][4]["eye_openness"] == 0.0 and tr["frames"][1]["eye_openness"] == 1.0
    head = cv2.imread(str(out / tr["frames"][0]["head_mask_path"]), cv2.IMREAD_GRAYSCALE) > 0
    torso = cv2.imread(str(out / tr["frames"][0]["torso_mask_path"]), cv2.IMREAD_GRAYSCALE) > 0
    assert head[20, 30] and not head[50, 30] and torso[50, 30] and not torso[20, 30]
    feats = np.load(out / "audio_features.npz")
    assert feats["ernerf_ds"].shape == (12, 16, 29)
    # Reused while the ER-NeRF folder is unchanged, imported again when it changes.
    stamp = (out / "transforms.json").stat().st_mtime_ns
    assert run_cli("--from-ernerf", src, "--out", out) == 0
    assert (out / "transforms.json").stat().st_mtime_ns == stamp
    bc = cv2.imread(str(src / "bc.jpg"))
    cv2.imwrite(str(src / "bc.jpg"), 255 - bc)
    assert run_cli("--from-ernerf", src, "--out", out) == 0
    assert (out / "transforms.json").stat().st_mtime_ns != stamp
    assert cv2.imread(str(out / "background.png")).mean() > 200


def test_ernerf_import_rejects_non_ernerf_folder(tmp_path, capsys):
    (tmp_path / "x").mkdir()
    assert run_cli("--from-ernerf", tmp_path / "x", "--out", tmp_path / "ds") == 1
    assert "has no transforms_train.json" in capsys.readouterr().err


def test_a_dataset_is_reused_only_for_the_same_video_and_settings(sample_dataset, tmp_path):
    import os
    import shutil

    from capture.config import CaptureConfig
    from capture.pipeline import capture_inputs, run_capture, stale_fields

    video = sample_dataset.parent / "sample" / "sample.mp4"
    same = CaptureConfig(video=video, out=sample_dataset, size=128)
    assert stale_fields(sample_dataset, capture_inputs(same)) is None
    stamp = (sample_dataset / "transforms.json").stat().st_mtime_ns
    assert run_capture(same) == sample_dataset  # reused: nothing rewritten
    assert (sample_dataset / "transforms.json").stat().st_mtime_ns == stamp
    assert stale_fields(sample_dataset, capture_inputs(CaptureConfig(video=video, out=sample_dataset, size=256))) \
        == ["size"]
    edited = tmp_path / "sample.mp4"
    shutil.copy(video, edited)
    os.utime(edited, ns=(1, 1))
    assert stale_fields(sample_dataset, capture_inputs(CaptureConfig(video=edited, out=sample_dataset, size=128))) \
        == ["video"]
    old = tmp_path / "old"
    shutil.copytree(sample_dataset, old)
    meta = json.loads((old / "transforms.json").read_text())
    del meta["capture"]  # a dataset from before inputs were recorded
    (old / "transforms.json").write_text(json.dumps(meta))
    assert stale_fields(old, capture_inputs(same)) == ["unknown"]


def test_missing_precomputed_features_are_named(tmp_path, capsys):
    (tmp_path / "v.mp4").write_bytes(b"not checked yet")
    assert run_cli(tmp_path / "v.mp4", "--out", tmp_path / "ds", "--audio-features", tmp_path / "aud_ds.npy") == 1
    assert "aud_ds.npy: not found (given with --audio-features)" in capsys.readouterr().err
    assert not (tmp_path / "ds").exists() and not (tmp_path / "ds.partial").exists()
