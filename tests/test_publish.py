"""Publishing a dataset folder: a kill at any step leaves the old or the new dataset."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from _datasets import make_dataset
from avatar.errors import AvatarError
from avatar.io import replaced_path
from avatar.dataset_format import validate_dataset
from capture.publish import recover_dataset, work_folder

ROOT = Path(__file__).resolve().parents[1]

# Publish with a kill (os._exit, no clean-up) at the k-th filesystem step: a rename, a
# removal or an fsync.
KILLED_PUBLISH = """
import os, shutil, sys
from pathlib import Path
sys.path.insert(0, {root!r})
from capture.publish import publish_dataset
k, calls = int(sys.argv[1]), [0]
def killing(fn):
    def step(*args, **kwargs):
        if calls[0] == k:
            os._exit(9)
        calls[0] += 1
        return fn(*args, **kwargs)
    return step
Path.rename, shutil.rmtree, os.fsync = killing(Path.rename), killing(shutil.rmtree), killing(os.fsync)
publish_dataset(Path(sys.argv[2]))
print("published")
"""


def which(ds: Path) -> str:
    return json.loads((ds / "transforms.json").read_text())["which"]


def make(root: Path, label: str) -> None:
    make_dataset(root, n=3, size=16)
    meta = json.loads((root / "transforms.json").read_text())
    (root / "transforms.json").write_text(json.dumps({**meta, "which": label}))


def test_a_kill_at_every_step_of_publishing_leaves_a_dataset(tmp_path):
    script = KILLED_PUBLISH.format(root=str(ROOT))
    outcomes = []
    for k in range(20):
        case = tmp_path / f"k{k}"
        out = case / "ds"
        make(out, "old")
        make(work_folder(out), "new")
        run = subprocess.run([sys.executable, "-c", script, str(k), str(out)], capture_output=True, text=True)
        if "published" in run.stdout:
            assert which(out) == "new" and not work_folder(out).exists()
            assert not replaced_path(out).exists()
            break
        assert run.returncode == 9, run.stderr
        if not out.exists():  # killed between the renames: nothing is lost, and readers say what to do
            with pytest.raises(AvatarError, match="run the same `avatar capture` again"):
                validate_dataset(out)
        recover_dataset(out)
        validate_dataset(out, decode=True)
        outcomes.append(which(out))
        assert not replaced_path(out).exists()
    else:
        pytest.fail("the publish never completed")
    assert k >= 3 and set(outcomes) <= {"old", "new"} and "new" in outcomes
