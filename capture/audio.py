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

import functools
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
    threads = torch.get_num_threads()
    import silero_vad

    torch.set_num_threads(threads)  # importing silero_vad sets torch to one thread for the whole process
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


@functools.lru_cache(maxsize=1)
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
    """[T, 80] log-mel spectrogram, one row per 10 ms hop (row t centred at t * 10 ms; the
    ends reflected, as torch.stft's centring does)."""
    return _mel_rows(np.pad(pcm, N_FFT // 2, mode="reflect"))


def _mel_rows(padded: np.ndarray) -> np.ndarray:
    """[T, 80] log-mel rows of the 512-sample frames starting every hop of `padded`."""
    spec = torch.stft(torch.from_numpy(np.ascontiguousarray(padded, np.float32)), N_FFT, hop_length=HOP,
                      win_length=WIN, window=torch.hann_window(WIN), center=False, return_complex=True).abs() ** 2
    mel = torch.from_numpy(_mel_filterbank()) @ spec  # [80, T]
    return torch.log(mel + 1e-6).T.numpy().astype(np.float32)  # host: capture computes on the host


def _energy(pcm: np.ndarray, centre: int, half: int) -> float:
    """RMS level in dBFS of pcm[centre - half: centre + half]."""
    seg = pcm[max(centre - half, 0): max(centre + half, 0)]
    return float(20 * np.log10(np.sqrt(np.mean(seg.astype(np.float64) ** 2)) + 1e-8)) if seg.size else -160.0


def frame_features(pcm: np.ndarray, n_frames: int, fps: float) -> dict[str, np.ndarray]:
    """Per-video-frame mel windows [N, 16, 80] and energy [N] for frames at k / fps."""
    mel = log_mel(pcm)
    centers = np.round(np.arange(n_frames) / fps * SAMPLE_RATE / HOP).astype(np.int64)
    idx = np.clip(centers[:, None] + np.arange(-MEL_WINDOW // 2, MEL_WINDOW // 2)[None], 0, len(mel) - 1)
    half = int(round(SAMPLE_RATE / fps / 2))
    energy = np.array([_energy(pcm, int(round(k / fps * SAMPLE_RATE)), half) for k in range(n_frames)], np.float32)
    return {"mel": mel[idx], "energy": energy}


def _phone_decoder():
    """pocketsphinx's phone recogniser with its bundled English phonetic model."""
    from pocketsphinx import Decoder, get_model_path

    return Decoder(allphone=os.path.join(get_model_path(), "en-us", "en-us-phone.lm.bin"),
                   lw=2.0, pip=0.3, beam=1e-20, pbeam=1e-20, loglevel="FATAL")


def _pcm16(pcm: np.ndarray) -> bytes:
    return (np.clip(pcm, -1, 1) * 32767).astype(np.int16).tobytes()


def _segments(decoder) -> list[tuple[str, float, float]]:
    """The decoded utterance's phones: (phone, start_s, end_s); none for an utterance too
    short to decode."""
    return [(s.word, s.start_frame / 100.0, (s.end_frame + 1) / 100.0) for s in decoder.seg() or ()]


def phone_segments(pcm: np.ndarray) -> list[tuple[str, float, float]]:
    """Best English phone path from pocketsphinx's bundled phonetic model: (phone, start_s, end_s)."""
    decoder = _phone_decoder()
    decoder.start_utt()
    decoder.process_raw(_pcm16(pcm), full_utt=True)
    decoder.end_utt()
    return _segments(decoder)


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


class SpeechStream:
    """Speech arriving in chunks (a microphone) -> the features `compute_features` gives a
    whole file, frame by frame, each as soon as the audio `lookahead_s` past its time has
    arrived; nothing later is read.

    A frame's log-mel window reaches 80 ms past it: rows beyond the audio received repeat
    the last one, so with the default 80 ms look-ahead the window is the offline one but
    for its last row. Energy (20 ms either side) is the offline value whenever the
    look-ahead covers it. Visemes come from pocketsphinx decoding as the audio arrives: a
    frame takes the viseme of the last phone of the running hypothesis (one-hot) once
    PHONE_DELAY_S past the frame had been heard (or as much as the look-ahead allows),
    where the offline track shares the frame among the best path's timed phones. `flush`
    ends the stream: the frames left, the last ones with the offline end padding.

    push(pcm [n] float32 at 16 kHz) and flush() return the frames that became ready, in
    order: dicts of index, mel [16, 80], energy [], visemes [15], and `heard_s`, the
    audio received (seconds) when the frame became ready.
    """

    UTTERANCE_S = 10.0
    """The decoder's utterance restarts after this much audio: its running hypothesis is
    backtraced on every chunk, which costs more the longer the utterance (a live session
    has no end). A restart forgets the phone context across it; the ends are far apart."""

    PHONE_DELAY_S = 0.08
    """How late the running hypothesis names a phone: the last phone heard 80 ms after a
    frame agreed best with the offline path's phone at the frame, on three voices (58-73 %
    of 10 s each; 20-38 % with no delay, 26-41 % with 160 ms)."""

    def __init__(self, fps: float, lookahead_s: float = 0.08):
        if lookahead_s < 0:
            raise ValueError(f"lookahead must be >= 0 seconds, got {lookahead_s}")
        self.fps, self.lookahead_s = fps, lookahead_s
        self.received = 0  # samples pushed
        self.pcm = np.zeros(0, np.float32)  # those later frames still reach; pcm[0] is sample `start`
        self.start = 0
        self.rows = np.zeros((0, N_MELS), np.float32)  # log-mel rows; rows[0] is row `row0`
        self.row0 = 0
        self.next_frame = 0
        self.half = int(round(SAMPLE_RATE / fps / 2))
        self.decoder = _phone_decoder()
        self.decoder.start_utt()
        self.utterance_from = 0  # the sample the decoder's utterance began at
        self.heard: list[tuple[int, np.ndarray]] = []  # (samples received, viseme of the last phone then)

    def push(self, pcm: np.ndarray) -> list[dict]:
        pcm = np.asarray(pcm, np.float32).reshape(-1)
        self.pcm = np.concatenate([self.pcm, pcm])
        if self.received - self.utterance_from >= self.UTTERANCE_S * SAMPLE_RATE:
            self.decoder.end_utt()
            self.decoder.start_utt()
            self.utterance_from = self.received
        self.received += len(pcm)
        self.decoder.process_raw(_pcm16(pcm), full_utt=False)
        hyp = self.decoder.hyp()
        phones = hyp.hypstr.split() if hyp is not None else []
        self.heard.append((self.received, self._viseme(phones[-1] if phones else "SIL")))
        self._add_rows(end=False)
        ready = []
        while len(self.rows) and (self.next_frame / self.fps + self.lookahead_s) * SAMPLE_RATE <= self.received:
            ready.append(self._frame(self.next_frame, self._heard_viseme(self.next_frame)))
            self.next_frame += 1
        self._trim()
        return ready

    def peek(self, k: int) -> dict:
        """Frame k's features from the audio heard so far, before the look-ahead past it has
        arrived (rows not yet heard repeat the last; the viseme is the newest phone's)."""
        return self._frame(k, self.heard[-1][1])

    def _heard_viseme(self, k: int) -> np.ndarray:
        """Frame k's viseme: the last phone of the hypothesis as it stood PHONE_DELAY_S after
        the frame (at most the look-ahead)."""
        at = (k / self.fps + min(self.PHONE_DELAY_S, self.lookahead_s)) * SAMPLE_RATE
        pick = self.heard[0][1]
        for received, viseme in self.heard:
            if received > at:
                break
            pick = viseme
        return pick

    def flush(self) -> list[dict]:
        """The frames left once the stream has ended (as many as `compute_features` gives
        the whole audio)."""
        self.decoder.end_utt()
        at = self.utterance_from / SAMPLE_RATE  # the utterance's times count from its start
        segments = [(phone, t0 + at, t1 + at) for phone, t0, t1 in _segments(self.decoder)]
        self._add_rows(end=True)
        n = int(np.ceil(self.received / SAMPLE_RATE * self.fps - 1e-6))
        track = viseme_track(segments, n, self.fps) if n else np.zeros((0, len(VISEMES)), np.float32)
        # A frame before the last utterance began keeps the hypothesis it was heard with.
        ready = [self._frame(k, track[k] if k / self.fps >= at else self._heard_viseme(k))
                 for k in range(self.next_frame, n)]
        self.next_frame = n
        return ready

    def _viseme(self, phone: str) -> np.ndarray:
        v = np.zeros(len(VISEMES), np.float32)
        v[VISEMES.index(_PHONE_TO_VISEME.get(phone.upper(), "sil"))] = 1.0
        return v

    def _add_rows(self, end: bool) -> None:
        """Log-mel rows of the audio received: each row whose 512-sample frame (centred on
        its hop, the start reflected) is in, and at the end the rest, the end reflected."""
        pad = N_FFT // 2
        if self.received <= pad:  # the start's reflection needs pad + 1 samples
            if not end or not self.received:
                return
        first = self.row0 + len(self.rows)  # the next row to compute
        lo = first * HOP - pad  # its frame's first sample
        if end:
            stop = self.received // HOP + 1  # as log_mel: one row per hop, centred
        else:
            stop = (self.received - pad) // HOP + 1 if self.received >= pad else 0
        if stop <= first:
            return
        x = self.pcm[max(lo - self.start, 0):]
        if lo < 0:  # the stream's start, reflected as torch.stft's centring does
            x = np.concatenate([self.pcm[1: 1 - lo][::-1], x]) if self.start == 0 else x
        if end:
            x = np.pad(x, (0, pad), mode="reflect")
        need = (stop - first - 1) * HOP + N_FFT
        if len(x) < need:  # the end of a short stream: reflect what there is
            x = np.pad(x, (0, need - len(x)), mode="reflect")
        self.rows = np.concatenate([self.rows, _mel_rows(x[:need])])

    def _frame(self, k: int, visemes: np.ndarray) -> dict:
        centre_row = int(np.round(k / self.fps * SAMPLE_RATE / HOP))
        rows = np.clip(centre_row + np.arange(-MEL_WINDOW // 2, MEL_WINDOW // 2), 0, self.row0 + len(self.rows) - 1)
        centre = int(round(k / self.fps * SAMPLE_RATE))
        return {"index": k, "mel": self.rows[rows - self.row0], "visemes": visemes,
                "energy": np.float32(_energy(self.pcm, centre - self.start, self.half)),
                "heard_s": self.received / SAMPLE_RATE}

    def _trim(self) -> None:
        """Drop the audio and rows that no later frame or row reaches back to (in steps of
        a second or more, so that a long stream keeps a bounded buffer)."""
        centre = int(round(self.next_frame / self.fps * SAMPLE_RATE))
        keep_from = min(centre - self.half, (self.row0 + len(self.rows)) * HOP - N_FFT // 2)
        if keep_from - self.start >= SAMPLE_RATE:
            cut = keep_from - self.start
            self.pcm, self.start = self.pcm[cut:], self.start + cut
        while len(self.heard) > 1 and self.heard[1][0] <= centre:
            self.heard.pop(0)
        first_row = int(np.round(centre / HOP)) - MEL_WINDOW // 2
        cut = min(first_row - self.row0, len(self.rows) - 1)
        if cut >= 100:
            self.rows, self.row0 = self.rows[cut:], self.row0 + cut


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
    """Features of N video frames of a whole recording (the module docstring); SpeechStream
    computes them causally, as audio arrives."""
    feats = frame_features(pcm, n_frames, fps)
    feats["visemes"] = viseme_track(phone_segments(pcm), n_frames, fps)
    feats.update(extra or {})
    return feats
