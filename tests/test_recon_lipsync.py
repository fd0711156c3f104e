"""Lip-sync measures on signals with known answers: a mumbling mouth reads as a small
range, a late mouth as an offset, lips that stay open at P/B/M as missed closures."""

import numpy as np
import pytest

from avatar.dataset_format import VISEMES
from recon.lipsync import agreement, av_offset, bilabial_closure, closed_threshold, lipsync_block


def speech(T: int = 200, seed: int = 0):
    """A syllable-like envelope, a real mouth that follows it, and a viseme track with P/B/M
    where the real mouth is closed and open vowels where it is widest."""
    rng = np.random.default_rng(seed)
    env = np.convolve(rng.normal(size=T + 8), np.ones(5) / 5, "valid")[:T]
    real = 0.02 + 0.05 * (env - env.min()) / np.ptp(env)
    visemes = np.zeros((T, len(VISEMES)))
    visemes[:, VISEMES.index("E")] = 1
    lo, hi = np.percentile(real, [10, 90])
    visemes[real < lo] = np.eye(len(VISEMES))[VISEMES.index("PP")]
    visemes[real > hi] = np.eye(len(VISEMES))[VISEMES.index("aa")]
    return env, real, visemes


def test_a_mumbling_mouth_reads_as_a_small_range_and_misses_closures():
    env, real, vis = speech()
    mumble = real.mean() + 0.4 * (real - real.mean())
    good = lipsync_block(real, vis, env, 25.0, real, real=real)
    bad = lipsync_block(mumble, vis, env, 25.0, real, real=real)
    assert good["opening_range_ratio"] == pytest.approx(1.0) and good["opening_corr"] == pytest.approx(1.0)
    assert bad["opening_range_ratio"] == pytest.approx(0.4, abs=1e-6)
    assert bad["opening_corr"] == pytest.approx(1.0)  # in step, but too small
    assert good["bilabial_closure"] == 1.0 and bad["bilabial_closure"] < 0.5
    assert bad["open_vowel_opening"] < good["open_vowel_opening"]


def test_offset_of_a_late_mouth():
    env, real, vis = speech()
    late = np.roll(real, 3)  # the mouth moves 3 frames (120 ms) after the sound
    offset, peak = av_offset(late, env, 25.0)
    assert offset == pytest.approx(-120.0) and peak > 0.95
    assert av_offset(real, env, 25.0)[0] == 0.0


def test_untracked_frames_and_degenerate_rows():
    env, real, vis = speech()
    holes = real.copy()
    holes[::7] = np.nan  # mediapipe found no face there
    block = lipsync_block(holes, vis, env, 25.0, real, real=real)
    assert block["tracked"] == len(real) - len(real[::7]) and block["opening_corr"] > 0.99
    assert lipsync_block(np.full(5, np.nan), vis[:5], env[:5], 25.0, real)["tracked"] == 0
    assert agreement(np.full(10, 0.03), real[:10])["opening_corr"] is None  # a frozen mouth has no correlation
    assert bilabial_closure(real, np.zeros((len(real), len(VISEMES))), closed_threshold(real)) is None
