"""What drives the avatar: speech features (normalised log-mel, viseme posteriors) and
the eye signal.

Both training and `avatar render` go through these functions, so a new speech file is
conditioned exactly as the training clip was.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from avatar.errors import AvatarError


def normalize_mel(mel: np.ndarray) -> Tensor:
    """Per-clip, per-mel-bin mean/variance normalisation (CMVN) of log-mel windows.

    mel: [N, 16, 80] log-mel windows -> [N, 16, 80] float32 tensor with zero mean and unit
    variance per bin over the clip (per speaker). It removes recording level, microphone
    colour and part of the voice's timbre, so speech recorded elsewhere drives the avatar
    like the training clip did.
    """
    x = torch.as_tensor(np.asarray(mel, np.float32), device="cpu")  # features are made on the host
    flat = x.reshape(-1, x.shape[-1])
    return (x - flat.mean(0)) / flat.std(0).clamp_min(1e-3)


def mel_input(feats: dict) -> Tensor:
    """[N, 16, 80] the normalised log-mel windows of a feature set: normalize_mel over the
    clip, or those a live stream normalised as it went ("mel_norm", RunningCMVN)."""
    return feats["mel_norm"] if "mel_norm" in feats else normalize_mel(feats["mel"])


class RunningCMVN:
    """normalize_mel for speech that is still arriving: per-bin mean and variance of the
    windows heard so far (Welford), starting from a prior worth `prior_windows` windows
    (the subject's clip: the first words are normalised like the training speech), and
    the standard deviation at least `min_std` (a few windows of one sound say little).
    Once a whole clip has gone through, the statistics are normalize_mel's."""

    def __init__(self, prior_mel: np.ndarray | None = None, prior_windows: int = 50, min_std: float = 0.5):
        bins = 80 if prior_mel is None else np.asarray(prior_mel).shape[-1]
        self.count, self.mean, self.m2 = 0.0, np.zeros(bins), np.zeros(bins)
        if prior_mel is not None:
            rows = np.asarray(prior_mel, np.float64).reshape(-1, bins)
            self.count = float(prior_windows * np.asarray(prior_mel).shape[-2])
            self.mean, self.m2 = rows.mean(0), rows.var(0) * self.count
        self.min_std = min_std

    def __call__(self, mel: np.ndarray) -> Tensor:
        """[16, 80] one frame's log-mel window -> normalised, after adding it to the statistics."""
        rows = np.asarray(mel, np.float64).reshape(-1, self.mean.shape[0])
        n, mean = len(rows), rows.mean(0)
        delta, total = mean - self.mean, self.count + n
        self.m2 += rows.var(0) * n + delta**2 * self.count * n / total
        self.mean, self.count = self.mean + delta * n / total, total
        return self.normalize(mel)

    def normalize(self, mel: np.ndarray) -> Tensor:
        """[16, 80] a log-mel window normalised by the statistics so far (not added to them)."""
        std = np.maximum(np.sqrt(self.m2 / max(self.count - 1, 1)), max(self.min_std, 1e-3))  # as normalize_mel
        return torch.from_numpy(((mel - self.mean) / std).astype(np.float32))


def viseme_features(feats: dict) -> Tensor:
    """[N, 15] viseme posteriors of a feature set (avatar.dataset_format), zeros where a dataset
    was made without them: the speaker-independent half of MotionNet's input."""
    from avatar.dataset_format import VISEMES

    vis = feats.get("visemes")
    n = len(feats["mel"])
    return (torch.zeros(n, len(VISEMES), device="cpu") if vis is None  # features are made on the host
            else torch.as_tensor(np.asarray(vis, np.float32), device="cpu"))


def blink_schedule(n_frames: int, fps: float, seed: int = 0, mean_interval_s: float = 4.0,
                   duration_s: float = 0.2) -> np.ndarray:
    """Natural blinks when no eye signal is given: eye openness [n_frames] in [0, 1].

    Intervals are drawn from a gamma distribution (mean 4 s, rarely under 1.5 s; people blink
    10-20 times a minute) and each blink is a smooth close-and-open lasting `duration_s`.
    """
    rng = np.random.default_rng(seed)
    t = np.arange(n_frames) / fps
    openness = np.ones(n_frames, np.float32)
    at = rng.gamma(4.0, mean_interval_s / 4.0) * 0.5
    while at < t[-1] if n_frames else False:
        phase = (t - at) / duration_s
        inside = (phase >= 0) & (phase <= 1)
        openness[inside] = np.minimum(openness[inside], 0.5 + 0.5 * np.cos(2 * np.pi * phase[inside]))
        at += max(rng.gamma(4.0, mean_interval_s / 4.0), 1.0)
    return openness


def load_speech(path: Path, fps: float, max_seconds: float | None = None) -> np.ndarray:
    """Any speech file -> 16 kHz mono pcm, checked as capture checks a clip's sound.
    Raises AvatarError for unreadable files, less than a video frame of audio, audio
    without speech, or audio longer than `max_seconds`."""
    from avatar.dataset_format import SAMPLE_RATE
    from capture import check_speech, load_audio

    pcm = load_audio(Path(path), max_seconds)
    if pcm.size < SAMPLE_RATE // fps:
        raise AvatarError(path, "holds less than one video frame of audio")
    check_speech(pcm, Path(path))
    return pcm


def speech_features(path: Path, fps: float, max_seconds: float | None = None) -> tuple[np.ndarray, dict]:
    """Audio of any speech file -> (16 kHz mono pcm, per-frame features: mel, energy,
    visemes), exactly as capture computes them (load_speech's errors)."""
    from avatar.dataset_format import SAMPLE_RATE
    from capture import compute_features

    pcm = load_speech(path, fps, max_seconds)
    n = int(np.ceil(len(pcm) / SAMPLE_RATE * fps - 1e-6))
    return pcm, compute_features(pcm, n, fps)


def speech_motion(net, feats: dict) -> Tensor:
    """Per-frame features of a clip -> [N, K] motion codes from a MotionNet
    (recon/motion.py: its calibrated `predict`), on the net's device."""
    on = net.centre.device
    return net.predict(mel_input(feats).to(on), viseme_features(feats).to(on))
