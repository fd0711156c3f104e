import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests run from a checkout, installed or not
os.environ.setdefault("AVATAR_BUILD_DIR", str(ROOT / ".torch_ext"))

from bench.scenes import GARDEN_NPZ  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def garden_path():
    if not GARDEN_NPZ.is_file():
        pytest.skip(f"shared test data absent: {GARDEN_NPZ}")
    return GARDEN_NPZ


@pytest.fixture(scope="session")
def sample_dataset(tmp_path_factory):
    """A small captured dataset of the built-in sample subject (3.2 s, 128 px), made once."""
    from capture.config import CaptureConfig
    from capture.pipeline import run_capture
    from scenes.sample import SampleConfig, generate_sample

    root = tmp_path_factory.mktemp("sample")
    generate_sample(root / "sample", SampleConfig(seconds=3.2, size=256, seed=1))
    return run_capture(CaptureConfig(video=root / "sample" / "sample.mp4", out=root / "dataset", size=128))


@pytest.fixture(scope="session")
def speech_wav(tmp_path_factory):
    """A 2.3 s synthetic speech recording at 22.05 kHz stereo (not capture's 16 kHz mono)."""
    import numpy as np
    import soundfile as sf

    from scenes.speech import synthesize

    s = synthesize(2.3, seed=5)
    pcm = np.interp(np.arange(0, len(s.pcm), 16000 / 22050), np.arange(len(s.pcm)), s.pcm)
    path = tmp_path_factory.mktemp("speech") / "speech.wav"
    sf.write(path, np.stack([pcm, 0.5 * pcm], 1), 22050)
    return path


@pytest.fixture(scope="session")
def trained_avatar(sample_dataset, tmp_path_factory):
    """An avatar trained on sample_dataset with the tiny test schedule (made once)."""
    from _scenes import TINY_TRAIN
    from recon.config import preset
    from recon.engine import train

    out = tmp_path_factory.mktemp("avatar") / "avatar"
    train(sample_dataset, out, preset("cpu", **TINY_TRAIN), progress=False)
    return out


@pytest.fixture(scope="session")
def face():
    """[478, 3] a real face's landmarks in the head frame (the sample portrait's, metres):
    the face of the synthetic rigs (tests/_rigs.py)."""
    import numpy as np
    from skimage import data

    from capture.pose import canonical_face
    from capture.tracking import FaceTracker

    with FaceTracker(max_faces=1, video_mode=False) as tracker:
        return canonical_face(tracker(data.astronaut())[0][None].astype(np.float64))
