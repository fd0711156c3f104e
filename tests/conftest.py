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
