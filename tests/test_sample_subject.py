"""The built-in sample subject: a real H.264 + AAC clip that capture can track, with
ground truth to score it against."""

import json

import av
import numpy as np
import pytest

from capture.config import CaptureConfig
from capture.pipeline import run_capture
from scenes.sample import SampleConfig, compare_capture, generate_sample
from scenes.speech import synthesize


def test_speech_is_speech_and_drives_the_mouth():
    from pathlib import Path

    from capture.audio import check_speech

    s = synthesize(6.0, seed=3)
    stats = check_speech(s.pcm, Path("synthetic"))  # silero-vad hears voice in it
    assert stats["speech_seconds"] > 3.0
    assert len(s.syllables) > 10
    # The mouth track follows the loudness envelope (40 ms lead).
    frames = np.arange(0, 6.0, 0.04)
    energy = np.array([np.sqrt(np.mean(s.pcm[int(t * 16000): int((t + 0.04) * 16000)] ** 2)) for t in frames])
    assert np.corrcoef(s.mouth_at(frames + 0.02), energy)[0, 1] > 0.5


@pytest.mark.slow
def test_sample_is_tracked_by_capture(tmp_path):
    truth = generate_sample(tmp_path / "sample", SampleConfig(seconds=4.0, seed=1))
    with av.open(str(tmp_path / "sample" / "sample.mp4")) as c:
        kinds = {s.type: s.codec_context.name for s in c.streams}
        assert kinds == {"video": "h264", "audio": "aac"}
        assert abs(float(c.duration) / 1e6 - 4.0) < 0.1
    out = run_capture(CaptureConfig(video=tmp_path / "sample" / "sample.mp4", out=tmp_path / "ds"))
    tr = json.loads((out / "transforms.json").read_text())
    score = compare_capture(truth, tr)
    print(json.dumps(score))
    assert score["frames_compared"] == 100  # every frame tracked
    assert score["mouth_vs_jaw_correlation"] > 0.6
    eyes = np.array([f["eye_openness"] for f in tr["frames"]])
    closure = np.array([truth["frames"][f["frame_index"]]["eye_closure"] for f in tr["frames"]])
    assert np.corrcoef(eyes, closure)[0, 1] < -0.5
    # Regression guard only: the target (median < 2 degrees) is not met yet on
    # this subject (the focal sweep prefers a wide field of view on the relief face).
    assert score["rotation_error_deg"]["median"] < 8.0
