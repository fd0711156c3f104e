"""A fixed sample of the bad-input fuzz cases (tests/fuzz_bad_inputs.py runs them all)."""

import pytest

from _datasets import make_dataset
from fuzz_bad_inputs import Fixtures, all_cases, checkpoint_keys, run_case, sample


@pytest.fixture(scope="module")
def fixtures(sample_dataset, trained_avatar, speech_wav, tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz-dataset")
    make_dataset(root / "dataset", n=6, size=32, landmarks=True)
    return Fixtures(trained_avatar, sample_dataset.parent / "sample" / "sample.mp4", speech_wav, root / "dataset")


def test_bad_inputs_get_a_named_error_and_change_nothing(fixtures, tmp_path, monkeypatch):
    monkeypatch.setenv("AVATAR_LOG_DIR", str(tmp_path / "logs"))
    cases = sample(all_cases(checkpoint_keys(fixtures)))
    assert len(cases) >= 45
    failures = [p for k, c in enumerate(cases) if (p := run_case(c, fixtures, tmp_path / f"{k:03d}"))]
    assert not failures, f"{len(failures)} of {len(cases)} bad inputs mishandled:\n" + "\n".join(failures)
