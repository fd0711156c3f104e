"""Speech-like audio for the sample subject: formant synthesis of vowel sequences.

A glottal pulse train (F0 with declination and vibrato) is shaped by three formant
resonators per vowel, under a syllable envelope, with short noise bursts for consonant
onsets and pauses between phrases. The mouth-opening track that drives the synthetic
face comes from the same envelope, so picture and sound agree by construction.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.signal import lfilter

SAMPLE_RATE = 16_000
# Formants (Hz) of five vowels (Peterson & Barney averages) and how far each opens the jaw.
VOWELS = {
    "a": ((730, 1090, 2440), 1.0),
    "e": ((530, 1840, 2480), 0.6),
    "i": ((270, 2290, 3010), 0.3),
    "o": ((570, 840, 2410), 0.7),
    "u": ((300, 870, 2240), 0.35),
}
BANDWIDTHS = (90.0, 110.0, 170.0)


@dataclass
class Speech:
    pcm: np.ndarray  # [S] float32 mono, 16 kHz
    mouth: np.ndarray  # [S] float32 in [0, 1]: jaw opening over time (leads the sound slightly)
    syllables: list[tuple[float, float, str]]  # (start s, end s, vowel)

    def mouth_at(self, t: np.ndarray) -> np.ndarray:
        """Mouth opening at times t (seconds)."""
        return np.interp(np.asarray(t) * SAMPLE_RATE, np.arange(self.mouth.size), self.mouth)


def _resonator(x: np.ndarray, freq: float, bw: float) -> np.ndarray:
    r = np.exp(-np.pi * bw / SAMPLE_RATE)
    theta = 2 * np.pi * freq / SAMPLE_RATE
    a = [1.0, -2 * r * np.cos(theta), r * r]
    return lfilter([1.0 - r], a, x)


def synthesize(seconds: float, seed: int = 0, f0: float = 130.0) -> Speech:
    """Phrases of 3-7 syllables separated by pauses, filling `seconds`."""
    rng = np.random.default_rng(seed)
    n = int(seconds * SAMPLE_RATE)
    pcm = np.zeros(n, np.float64)
    mouth = np.zeros(n, np.float64)
    syllables = []
    t = 0.25
    while t < seconds - 0.6:
        phrase_f0 = f0 * rng.uniform(0.9, 1.15)
        for k in range(int(rng.integers(3, 8))):
            dur = float(rng.uniform(0.16, 0.28))
            if t + dur > seconds - 0.3:
                break
            vowel = str(rng.choice(list(VOWELS)))
            formants, openness = VOWELS[vowel]
            i0, i1 = int(t * SAMPLE_RATE), int((t + dur) * SAMPLE_RATE)
            m = i1 - i0
            tt = np.arange(m) / SAMPLE_RATE
            pitch = phrase_f0 * (1 - 0.08 * k / 7) * (1 + 0.02 * np.sin(2 * np.pi * 5.5 * tt))
            phase = np.cumsum(pitch / SAMPLE_RATE)
            source = (np.diff(np.floor(phase), prepend=0) > 0).astype(np.float64)  # glottal pulses
            source = lfilter([1.0], [1.0, -0.97], source)  # spectral tilt
            voiced = sum(_resonator(source, f, bw) for f, bw in zip(formants, BANDWIDTHS))
            env = np.sin(np.pi * np.clip(tt / dur, 0, 1)) ** 0.7
            burst = np.zeros(m)
            nb = min(m, int(0.035 * SAMPLE_RATE))
            burst[:nb] = rng.normal(0, 0.25, nb) * np.linspace(1, 0, nb)  # consonant onset
            pcm[i0:i1] += voiced * env / (np.abs(voiced).max() + 1e-9) + burst
            mouth[i0:i1] = np.maximum(mouth[i0:i1], openness * env)
            syllables.append((t, t + dur, vowel))
            t += dur + float(rng.uniform(0.0, 0.05))
        t += float(rng.uniform(0.3, 0.6))  # pause between phrases
    pcm *= 0.5 / (np.abs(pcm).max() + 1e-9)
    lead = int(0.04 * SAMPLE_RATE)  # the jaw moves a little before the sound
    mouth = np.concatenate([mouth[lead:], np.zeros(lead)])
    return Speech(pcm.astype(np.float32), mouth.astype(np.float32), syllables)
