"""Live speech (recon/live.py, capture.SpeechStream): the features of speech arriving in
chunks are the offline ones wherever the look-ahead covers them, nothing past the
look-ahead is read, the running normalisation ends where the clip's own does, and
`avatar speak --realtime` drives an avatar from a stream and reports its latency."""

import json
import subprocess
import sys
import os

import numpy as np
import pytest
import torch

from capture.audio import SpeechStream, compute_features, load_audio
from recon.conditioning import RunningCMVN, normalize_mel

FPS = 25.0


def _stream(pcm, lookahead_s, chunk=320):
    s = SpeechStream(FPS, lookahead_s)
    frames = [f for start in range(0, len(pcm), chunk) for f in s.push(pcm[start: start + chunk])]
    return frames, s.flush()


@pytest.fixture(scope="module")
def pcm(speech_wav):
    return load_audio(speech_wav)  # 16 kHz mono, as a microphone stream arrives


def test_streamed_features_are_the_offline_ones_where_the_look_ahead_covers_them(pcm):
    n = int(np.ceil(len(pcm) / 16000 * FPS - 1e-6))
    offline = compute_features(pcm, n, FPS)
    for lookahead, exact_rows in ((0.2, 16), (0.08, 15)):  # 80 ms covers all of a window but its last row
        live, tail = _stream(pcm, lookahead)
        frames = live + tail
        assert [f["index"] for f in frames] == list(range(n)) and len(tail) <= lookahead * FPS + 1
        mel = np.stack([f["mel"] for f in frames])
        np.testing.assert_array_equal(mel[: len(live), :exact_rows], offline["mel"][: len(live), :exact_rows])
        np.testing.assert_allclose(mel[len(live):], offline["mel"][len(live):], atol=1e-5)  # the end, padded alike
        np.testing.assert_allclose([f["energy"] for f in frames], offline["energy"], atol=1e-5)
        assert all(f["heard_s"] >= f["index"] / FPS + lookahead - 1e-9 for f in live)
        assert all(np.isclose(f["visemes"].sum(), 1) for f in frames)


@pytest.mark.parametrize("every", ["half a second", "all but the last chunk"])
def test_a_long_stream_restarts_the_phone_decoder_and_keeps_every_frame(pcm, every):
    """The decoder's utterance restarts every UTTERANCE_S (here every 0.5 s, or once with
    one chunk left, an utterance too short to decode): every frame comes once, the mel as
    offline, a viseme each."""
    n = int(np.ceil(len(pcm) / 16000 * FPS - 1e-6))
    offline = compute_features(pcm, n, FPS)
    s = SpeechStream(FPS, 0.08)
    s.UTTERANCE_S = 0.5 if every == "half a second" else (len(pcm) - 1) // 320 * 320 / 16000
    frames = [f for start in range(0, len(pcm), 320) for f in s.push(pcm[start: start + 320])] + s.flush()
    assert [f["index"] for f in frames] == list(range(n)) and s.utterance_from >= 2 * 16000
    np.testing.assert_allclose(np.stack([f["mel"] for f in frames])[:, :15], offline["mel"][:, :15], atol=1e-5)
    assert all(np.isclose(f["visemes"].sum(), 1) for f in frames)


def test_nothing_past_the_look_ahead_is_read(pcm):
    """The second half of the audio replaced by noise: every frame made ready before the
    change was heard is the same, features and visemes."""
    cut = len(pcm) // 2
    other = pcm.copy()
    other[cut:] = np.random.default_rng(0).normal(0, 0.1, len(pcm) - cut).astype(np.float32)
    a, _ = _stream(pcm, 0.08)
    b, _ = _stream(other, 0.08)
    before = [f for f in a if f["heard_s"] * 16000 <= cut]
    assert len(before) > 15
    for fa, fb in zip(before, b):
        np.testing.assert_array_equal(fa["mel"], fb["mel"])
        np.testing.assert_array_equal(fa["visemes"], fb["visemes"])
        assert fa["energy"] == fb["energy"]
    assert not np.array_equal(a[-1]["mel"], b[-1]["mel"])  # and the change does show after it


def test_the_running_normalisation_ends_where_the_clip_s_own_does(pcm):
    mel = compute_features(pcm, 50, FPS)["mel"]
    cmvn = RunningCMVN(min_std=0.0)
    last = [cmvn(w) for w in mel][-1]
    torch.testing.assert_close(last, normalize_mel(mel)[-1], atol=2e-4, rtol=0)
    # With the subject's clip as prior, the first window is normalised as that clip's are.
    first = RunningCMVN(mel, prior_windows=10_000)(mel[0])
    torch.testing.assert_close(first, normalize_mel(mel)[0], atol=2e-3, rtol=0)


def test_checking_speech_leaves_torch_s_threads_alone(speech_wav):
    """silero_vad sets torch to one thread when imported: every command that checked a
    speech file (render, eval --drive, speak, the studio, a job's training after its
    capture) ran at half speed on two cores."""
    code = ("import torch; torch.set_num_threads(2); from pathlib import Path; "
            "from capture.audio import check_speech, load_audio; "
            f"check_speech(load_audio(Path({str(speech_wav)!r})), Path('x')); print(torch.get_num_threads())")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.stdout.strip() == "2", out.stderr[-2000:]


def test_live_motion_reads_no_speech_past_the_look_ahead(trained_avatar, pcm):
    from recon.avatar_dir import load_avatar
    from recon.live import LiveSpeech

    av = load_avatar(trained_avatar)
    cut = len(pcm) // 2
    other = pcm.copy()
    other[cut:] = 0.0
    for lookahead in (0.08, 0.16):
        runs = []
        for audio in (pcm, other):
            live = LiveSpeech(av, lookahead)
            frames = [f for s in range(0, len(audio), 320) for f in live.push(audio[s: s + 320])]
            runs.append((frames, live.flush()))
        (a, a_tail), (b, _) = runs
        n = int(np.ceil(len(pcm) / 16000 * FPS - 1e-6))
        assert [f.index for f in a + a_tail] == list(range(n))
        assert all(f.heard_s >= f.index / FPS + lookahead - 1e-9 for f in a)  # a frame waits for its look-ahead
        heard = [(fa, fb) for fa, fb in zip(a, b) if fa.heard_s * 16000 <= cut]
        assert len(heard) > 10
        for fa, fb in heard:
            torch.testing.assert_close(fa.codes, fb.codes, rtol=0, atol=0)
        assert torch.stack([f.codes for f in a]).std(0).max() > 0  # the motion moves


@pytest.mark.parametrize("chunk", [320, 3200], ids=["20ms", "200ms"])
def test_with_the_whole_reach_heard_live_codes_are_the_offline_codes_of_the_stream(trained_avatar, pcm, chunk):
    """A look-ahead of the features' 80 ms plus MotionNet's whole reach: every frame but
    the last `reach` gets the codes the offline net gives the streamed features, whatever
    the number of frames one chunk completes."""
    from recon.avatar_dir import load_avatar
    from recon.live import LiveSpeech

    av = load_avatar(trained_avatar)
    reach = av.speech_reach
    lookahead = 0.08 + reach / FPS
    live = LiveSpeech(av, lookahead)
    codes = [f for s in range(0, len(pcm), chunk) for f in live.push(pcm[s: s + chunk])] + live.flush()
    stream, cmvn = SpeechStream(FPS, 0.08), RunningCMVN()
    feats = [f for s in range(0, len(pcm), chunk) for f in stream.push(pcm[s: s + chunk])] + stream.flush()
    offline = av.speech_motion({"mel": np.stack([f["mel"] for f in feats]),
                                "mel_norm": torch.stack([cmvn(f["mel"]) for f in feats]),
                                "visemes": np.stack([f["visemes"] for f in feats])})
    n = len(feats) - reach
    assert n > 20
    torch.testing.assert_close(torch.stack([f.codes for f in codes[:n]]), offline[:n], rtol=1e-5, atol=1e-6)


def test_speak_streams_in_real_time_and_reports_latency(trained_avatar, speech_wav, tmp_path):
    from avatar.cli import main

    out = tmp_path / "live.mp4"
    import io
    from contextlib import redirect_stdout

    buf = io.StringIO()
    with redirect_stdout(buf):
        assert main(["speak", str(trained_avatar), "--audio", str(speech_wav), "--realtime", "--out", str(out),
                     "--json"]) == 0
    r = json.loads(buf.getvalue().strip().splitlines()[-1])
    assert r["realtime"] and r["frames"] == int(np.ceil(2.3 * 25)) and r["rendered"] + r["skipped"] == r["frames"]
    lat = r["latency_ms"]
    assert set(lat) == {"total", "buffering", "queue", "features", "motion", "deform", "rasterize", "encode"}
    assert lat["buffering"]["median"] >= 80 - 1  # a frame cannot show before its look-ahead has been heard
    assert lat["total"]["median"] >= lat["buffering"]["median"] and r["sustained_fps"] > 0
    from avatar.media import open_media

    with open_media(out, "video", "") as c:
        assert sum(1 for _ in c.decode(video=0)) == r["frames"]
    assert main(["speak", str(trained_avatar), "--audio", str(speech_wav), "--lookahead-ms", "-5"]) == 1


def test_training_distils_a_live_motion_net_and_live_speech_uses_it_at_its_look_ahead(trained_avatar, pcm):
    from recon.avatar_dir import load_avatar
    from recon.checkpoint import load_checkpoint, tensors_digest
    from recon.live import LIVE_MOTION, LiveSpeech, stream_codes

    av = load_avatar(trained_avatar)
    _, meta = load_checkpoint(trained_avatar / LIVE_MOTION)
    assert meta["kind"] == "live-motion" and meta["lookahead_ms"] == 80 and meta["windows"] > 20
    assert meta["teacher"] == tensors_digest(av.motion_net.state_dict())
    assert meta["error_after"] < meta["error_before"]  # it learnt to give the offline codes from what it heard
    assert LiveSpeech(av, 0.08).net is not None and LiveSpeech(av, 0.08).motion_note.startswith("the live motion net")
    for other in (LiveSpeech(av, 0.16), LiveSpeech(av, 0.08, motion="offline")):
        assert other.net is None and other.motion_note.startswith("the offline net")
    assert "80.0 ms look-ahead" in LiveSpeech(av, 0.16).motion_note
    live, _ = stream_codes(av, pcm, 0.08)
    offline_net, _ = stream_codes(av, pcm, 0.08, motion="offline")
    assert (live - offline_net).abs().max() > 1e-3


def test_the_distillation_learns_from_the_windows_live_speech_feeds_the_net(trained_avatar, pcm):
    """The recorded windows, rebuilt from the bank, give the codes LiveSpeech gives."""
    from recon.avatar_dir import load_avatar
    from recon.conditioning import speech_motion
    from recon.live import LiveSpeech, _Windows

    av = load_avatar(trained_avatar)
    rec, live = _Windows(av, 0.08, None), LiveSpeech(av, 0.08, motion="offline")
    codes = []
    for s in range(0, len(pcm), 320):
        rec.push(pcm[s: s + 320])
        codes += live.push(pcm[s: s + 320])
    rec.flush()
    codes += live.flush()
    assert len(rec.windows) == len(codes) and len(rec.bank) < 4 * len(codes)  # shared, not copied
    for (idx, at), frame in zip(rec.windows, codes):
        window = [rec.bank[i] for i in idx]
        feats = {"mel": np.stack([w["mel"] for w in window]), "mel_norm": torch.stack([w["mel_norm"] for w in window]),
                 "visemes": np.stack([w["visemes"] for w in window])}
        with torch.no_grad():
            torch.testing.assert_close(speech_motion(av.motion_net, feats)[at], frame.codes, rtol=0, atol=0)


def test_speech_copies_are_shifted_reordered_and_sped_up_within_the_budget(pcm):
    from recon.live import LIVE_AUDIO_S, speech_copies

    copies = speech_copies(pcm, 12)
    assert len(copies) == 12 and copies[0][:2] == (0, 1.0)
    np.testing.assert_array_equal(copies[0][2], pcm)
    for shift, speed, x in copies[1:]:
        assert abs(len(x) * speed / (len(pcm) - shift * 16) - 1) < 0.04  # 10 ms crossfades, every 0.3-1.2 s
        if speed == 1.0:
            n = min(len(x), len(pcm) - shift * 16)
            assert not np.allclose(x[:n], pcm[shift * 16:][:n])  # reordered
    assert speech_copies(pcm, 12, seed=1)[1][2].tolist() != copies[1][2].tolist()
    long = np.zeros(int(100 * 16000), np.float32)
    assert sum(len(x) for _, _, x in speech_copies(long, 12)) / 16000 <= LIVE_AUDIO_S


def test_a_stale_or_damaged_live_motion_net_is_not_used(trained_avatar, tmp_path):
    import shutil

    from recon.avatar_dir import CHECKPOINT, load_avatar
    from recon.checkpoint import load_checkpoint, save_checkpoint
    from recon.live import LIVE_MOTION, LiveSpeech, ensure_live_motion

    avatar = shutil.copytree(trained_avatar, tmp_path / "avatar")
    tensors, meta = load_checkpoint(avatar / CHECKPOINT)
    tensors["motion_net.temporal.6.bias"] = tensors["motion_net.temporal.6.bias"] + 0.1  # trained further
    save_checkpoint(avatar / CHECKPOINT, tensors, meta)
    stale = LiveSpeech(load_avatar(avatar), 0.08)
    assert stale.net is None and "earlier state" in stale.motion_note
    assert ensure_live_motion(avatar, progress=False)["lookahead_ms"] == 80  # as `avatar train --resume` does
    assert LiveSpeech(load_avatar(avatar), 0.08).net is not None
    assert ensure_live_motion(avatar, progress=False) is None  # up to date: nothing to do
    (avatar / LIVE_MOTION).write_bytes(b"\0" * 64)
    damaged = LiveSpeech(load_avatar(avatar), 0.08)  # live speech goes on, with the offline net
    assert damaged.net is None and "live_motion.safetensors is damaged" in damaged.motion_note
    assert ensure_live_motion(avatar, progress=False) is not None  # and it is made again
    assert LiveSpeech(load_avatar(avatar), 0.08).net is not None
