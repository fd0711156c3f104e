"""Speech: any file to 16 kHz mono, per-video-frame features, and a viseme track.

Features (``audio_features.npz``, format ``avatar-audio-features/1``), for N video frames:
    mel      [N, 16, 80] float32  log-mel (80 bands, 25 ms windows, 10 ms hop) over the
                                  16 hops (160 ms) centred on each frame, like ER-NeRF's
                                  DeepSpeech windows [N, 16, 29]
    energy   [N] float32          RMS level in dBFS over each frame's span
    visemes  [N, 15] float32      share of each frame covered by each viseme of
                                  pocketsphinx's best English phone path (rows sum to 1)
    viseme_names [15] str
    ernerf_ds [N, 16, 29] / ernerf_hu [N, 2, 1024]   only when precomputed ones are given
The same code computes features for `avatar render`, so training and driving match.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import av
import numpy as np
import soundfile as sf
import torch

from avatar.dataset_format import MEL_WINDOW, N_MELS, SAMPLE_RATE, VISEMES
from avatar.errors import AvatarError
from avatar.io import atomic_path
from avatar.media import open_media

HOP = 160  # 10 ms
WIN = 400  # 25 ms
N_FFT = 512
_PHONE_TO_VISEME = {
    "P": "PP", "B": "PP", "M": "PP", "F": "FF", "V": "FF", "TH": "TH", "DH": "TH",
    "T": "DD", "D": "DD", "K": "kk", "G": "kk", "NG": "kk", "HH": "kk",
    "CH": "CH", "JH": "CH", "SH": "CH", "ZH": "CH", "S": "SS", "Z": "SS", "N": "nn", "L": "nn",
    "R": "RR", "ER": "RR", "AA": "aa", "AE": "aa", "AH": "aa", "AY": "aa", "AW": "aa",
    "EH": "E", "EY": "E", "IH": "ih", "IY": "ih", "Y": "ih", "AO": "oh", "OW": "oh", "OY": "oh",
    "UH": "ou", "UW": "ou", "W": "ou",
}


def load_audio(path: Path, max_seconds: float | None = None) -> np.ndarray:
    """Any audio (or video's audio track), any rate and channel count -> float32 mono 16 kHz.
    max_seconds: refuse longer audio as soon as decoding passes it (a two-hour upload is
    neither decoded whole nor held in memory)."""
    path = Path(path)
    limit = None if max_seconds is None else int(max_seconds * SAMPLE_RATE)
    with open_media(path, "audio", "pass a wav, mp3, flac or video file") as container:
        if not container.streams.audio:
            raise AvatarError(path, "has no audio stream",
                              "record with sound, or give the speech separately with --audio FILE")
        resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
        chunks = []
        try:
            decoded = 0
            for frame in container.decode(audio=0):
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray().reshape(-1))
                    decoded += len(chunks[-1])
                if limit is not None and decoded > limit:
                    raise AvatarError(path, f"is longer than {max_seconds:.0f} s")
            for out in resampler.resample(None):
                chunks.append(out.to_ndarray().reshape(-1))
        except av.error.FFmpegError as exc:
            raise AvatarError(path, f"audio decoding failed ({exc}): the file is truncated or corrupt") from exc
    if not chunks:
        raise AvatarError(path, "audio stream holds no samples")
    return np.concatenate(chunks).astype(np.float32)


def check_speech(pcm: np.ndarray, path: Path) -> dict:
    """Refuse silent or speechless audio; returns level and voice-activity statistics."""
    rms_db = 20 * math.log10(float(np.sqrt(np.mean(pcm.astype(np.float64) ** 2))) + 1e-12)
    if rms_db < -60:
        raise AvatarError(path, f"the audio is silent (level {rms_db:.0f} dBFS)",
                          "check the microphone track, or pass the speech with --audio FILE")
    import silero_vad

    model = silero_vad.load_silero_vad()  # ships inside the package: no download
    with torch.no_grad():
        spans = silero_vad.get_speech_timestamps(torch.from_numpy(pcm), model, sampling_rate=SAMPLE_RATE)
    speech = sum(s["end"] - s["start"] for s in spans) / SAMPLE_RATE
    if speech < 0.5:
        raise AvatarError(path, f"no speech found in the audio ({speech:.1f} s of voice activity)",
                          "the avatar learns lip motion from speech: record yourself talking")
    return {"level_dbfs": rms_db, "speech_seconds": speech, "duration": len(pcm) / SAMPLE_RATE}


def write_wav(path: Path, pcm: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        sf.write(str(tmp), pcm, SAMPLE_RATE, subtype="PCM_16", format="WAV")


def _mel_filterbank() -> np.ndarray:
    """HTK-style triangular mel filters [N_MELS, N_FFT // 2 + 1] from 0 to 8 kHz."""
    def hz_to_mel(f):
        return 2595.0 * np.log10(1.0 + f / 700.0)

    def mel_to_hz(m):
        return 700.0 * (10 ** (m / 2595.0) - 1.0)

    freqs = np.linspace(0, SAMPLE_RATE / 2, N_FFT // 2 + 1)
    edges = mel_to_hz(np.linspace(hz_to_mel(0.0), hz_to_mel(SAMPLE_RATE / 2), N_MELS + 2))
    fb = np.zeros((N_MELS, freqs.size), np.float32)
    for i in range(N_MELS):
        lo, mid, hi = edges[i : i + 3]
        fb[i] = np.clip(np.minimum((freqs - lo) / (mid - lo), (hi - freqs) / (hi - mid)), 0, None)
    return fb


def log_mel(pcm: np.ndarray) -> np.ndarray:
    """[T, 80] log-mel spectrogram, one row per 10 ms hop (row t centred at t * 10 ms)."""
    x = torch.from_numpy(pcm)
    spec = torch.stft(x, N_FFT, hop_length=HOP, win_length=WIN, window=torch.hann_window(WIN),
                      center=True, return_complex=True).abs() ** 2  # [F, T]
    mel = torch.from_numpy(_mel_filterbank()) @ spec
    return torch.log(mel + 1e-6).T.numpy().astype(np.float32)  # host: capture computes on the host


def frame_features(pcm: np.ndarray, n_frames: int, fps: float) -> dict[str, np.ndarray]:
    """Per-video-frame mel windows [N, 16, 80] and energy [N] for frames at k / fps."""
    mel = log_mel(pcm)
    centers = np.round(np.arange(n_frames) / fps * SAMPLE_RATE / HOP).astype(np.int64)
    idx = np.clip(centers[:, None] + np.arange(-MEL_WINDOW // 2, MEL_WINDOW // 2)[None], 0, len(mel) - 1)
    half = int(round(SAMPLE_RATE / fps / 2))
    energy = np.empty(n_frames, np.float32)
    for k in range(n_frames):
        c = int(round(k / fps * SAMPLE_RATE))
        seg = pcm[max(c - half, 0) : c + half]
        energy[k] = 20 * np.log10(np.sqrt(np.mean(seg.astype(np.float64) ** 2)) + 1e-8) if seg.size else -160.0
    return {"mel": mel[idx], "energy": energy}


def phone_segments(pcm: np.ndarray) -> list[tuple[str, float, float]]:
    """Best English phone path from pocketsphinx's bundled phonetic model: (phone, start_s, end_s)."""
    from pocketsphinx import Decoder, get_model_path

    decoder = Decoder(allphone=os.path.join(get_model_path(), "en-us", "en-us-phone.lm.bin"),
                      lw=2.0, pip=0.3, beam=1e-20, pbeam=1e-20, loglevel="FATAL")
    pcm16 = (np.clip(pcm, -1, 1) * 32767).astype(np.int16)
    decoder.start_utt()
    decoder.process_raw(pcm16.tobytes(), full_utt=True)
    decoder.end_utt()
    return [(s.word, s.start_frame / 100.0, (s.end_frame + 1) / 100.0) for s in decoder.seg()]


def viseme_track(segments: list[tuple[str, float, float]], n_frames: int, fps: float) -> np.ndarray:
    """[N, 15] share of each frame's span [k/fps - 0.5/fps, k/fps + 0.5/fps] per viseme."""
    track = np.zeros((n_frames, len(VISEMES)), np.float32)
    for phone, t0, t1 in segments:
        v = VISEMES.index(_PHONE_TO_VISEME.get(phone.upper(), "sil"))
        k0 = max(int(math.floor(t0 * fps - 0.5)), 0)
        k1 = min(int(math.ceil(t1 * fps + 0.5)), n_frames - 1)
        for k in range(k0, k1 + 1):
            lo, hi = (k - 0.5) / fps, (k + 0.5) / fps
            track[k, v] += max(0.0, min(hi, t1) - max(lo, t0)) * fps
    empty = track.sum(1) <= 1e-6
    track[empty, 0] = 1.0  # no phone (start/end of clip): silence
    return track / track.sum(1, keepdims=True)


def load_ernerf_features(path: Path, n_frames: int) -> tuple[str, np.ndarray]:
    """Validate precomputed ER-NeRF features: aud_ds.npy [N,16,29] or aud_hu.npy [N,2,1024]."""
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise AvatarError(path, f"cannot be read as a .npy array ({exc})") from exc
    if arr.ndim == 3 and arr.shape[1:] == (16, 29):
        key = "ernerf_ds"
    elif arr.ndim == 3 and arr.shape[1:] == (2, 1024):
        key = "ernerf_hu"
    else:
        raise AvatarError(path, f"has shape {list(arr.shape)}; expected ER-NeRF aud_ds [N,16,29] or aud_hu [N,2,1024]")
    if abs(arr.shape[0] - n_frames) > 2:
        raise AvatarError(path, f"holds {arr.shape[0]} frames of features but the clip has {n_frames} frames")
    if arr.shape[0] < n_frames:
        arr = np.concatenate([arr, np.repeat(arr[-1:], n_frames - arr.shape[0], 0)])
    return key, arr[:n_frames].astype(np.float32)


def compute_features(pcm: np.ndarray, n_frames: int, fps: float, extra: dict[str, np.ndarray] | None = None) -> dict:
    feats = frame_features(pcm, n_frames, fps)
    feats["visemes"] = viseme_track(phone_segments(pcm), n_frames, fps)
    feats.update(extra or {})
    return feats
