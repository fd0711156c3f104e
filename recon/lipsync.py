"""Lip-sync metrics: how far the rendered mouth opens, when, and at which sounds.

Every measure reads the *inner-lip opening* of a face, tracked by mediapipe on the image
(render or real frame alike): the gap between landmarks 13 and 14 over the outer eye-corner
distance (avatar.dataset_format.mouth_opening). Against the real mouth:
  opening_corr          Pearson correlation with the real opening, frame by frame;
  opening_range_ratio   (p95 - p5) of the opening over (p95 - p5) of the real one: 1 when
                        the mouth opens as far as the real one, ~0.4 for a mumbling avatar.
Against the speech (need no real video, so they also score another voice):
  bilabial_closure      share of P/B/M phones (pocketsphinx's viseme track) at which the
                        lips close: the opening, within one frame of the phone, falls below
                        the real mouth's p5 + 20 % of its p5-p95 range;
  open_vowel_opening    mean opening at frames whose main viseme is an open vowel (aa, oh);
  av_offset_ms, av_peak_corr   the lag within +-320 ms at which the opening best follows
                        the syllable envelope (mean log-mel over each frame's 160 ms window),
                        and that correlation; positive: the audio is late (capture's sign).
"""

from __future__ import annotations

import numpy as np

from avatar.dataset_format import VISEMES, mouth_opening

CLOSED_FRACTION = 0.2
"""Lips count as closed below the real mouth's p5 + this fraction of its p5-p95 range."""
OPEN_VOWELS = ("aa", "oh")
MAX_LAG_MS = 320.0


def opening_of(landmarks: np.ndarray | None) -> float | None:
    """Inner-lip opening of one tracked face [478, >=2] (None when no face was found)."""
    return None if landmarks is None else float(mouth_opening(np.asarray(landmarks)[None])[0])


def syllable_envelope(mel: np.ndarray) -> np.ndarray:
    """[N, 16, 80] log-mel windows -> [N] loudness over each frame's 160 ms window."""
    return np.asarray(mel, np.float64).mean(axis=(1, 2))


def _spread(x: np.ndarray) -> float:
    lo, hi = np.percentile(x, [5, 95])
    return float(hi - lo)


def _corr(a: np.ndarray, b: np.ndarray) -> float | None:
    if len(a) < 3 or a.std() < 1e-9 or b.std() < 1e-9:
        return None
    return float(np.corrcoef(a, b)[0, 1])


def closed_threshold(reference: np.ndarray) -> float:
    """Opening below which lips count as closed, from the real mouth's openings."""
    lo = float(np.percentile(reference, 5))
    return lo + CLOSED_FRACTION * _spread(reference)


def bilabial_closure(opening: np.ndarray, visemes: np.ndarray, threshold: float) -> float | None:
    """Share of bilabial events (runs of frames whose main viseme is PP) at which the
    opening falls below `threshold` within one frame of the run. None without any."""
    pp = np.argmax(visemes, axis=1) == VISEMES.index("PP")
    events, closed, k = 0, 0, 0
    while k < len(pp):
        if not pp[k]:
            k += 1
            continue
        end = k
        while end + 1 < len(pp) and pp[end + 1]:
            end += 1
        events += 1
        closed += bool(opening[max(k - 1, 0): end + 2].min() <= threshold)
        k = end + 1
    return closed / events if events else None


def av_offset(opening: np.ndarray, envelope: np.ndarray, fps: float) -> tuple[float | None, float | None]:
    """(offset_ms, peak correlation) of the opening against the envelope over lags within
    +-MAX_LAG_MS (positive: the audio is late). Both None for fewer than 3 frames."""
    max_lag = int(round(MAX_LAG_MS / 1000 * fps))
    n = len(opening)
    best = (None, None)
    for lag in range(-max_lag, max_lag + 1):
        t = np.arange(max(0, -lag), min(n, n - lag))  # frames whose shifted partner exists
        c = _corr(opening[t], envelope[t + lag]) if len(t) else None
        if c is not None and (best[1] is None or c > best[1]):
            best = (1000.0 * lag / fps, c)
    return best


def agreement(opening: np.ndarray, real: np.ndarray) -> dict:
    """opening_corr and opening_range_ratio of openings [N] against the real ones [N] of the
    same frames (frames need not be consecutive; NaN where no face was found)."""
    opening, real = np.asarray(opening, np.float64), np.asarray(real, np.float64)
    both = np.isfinite(opening) & np.isfinite(real)
    if both.sum() < 3:
        return {"opening_corr": None, "opening_range_ratio": None}
    return {"opening_corr": _corr(opening[both], real[both]),
            "opening_range_ratio": _spread(opening[both]) / max(_spread(real[both]), 1e-9)}


def lipsync_block(opening: np.ndarray, visemes: np.ndarray, envelope: np.ndarray, fps: float,
                  reference: np.ndarray, real: np.ndarray | None = None) -> dict:
    """All measures of one row (a sequence of consecutive frames).

    opening: [N] tracked openings (NaN where no face was found); visemes: [N, 15];
    envelope: [N]; reference: the subject's real openings (range and closed threshold);
    real: [N] the real openings of these same frames, when the row replays them.
    """
    opening = np.asarray(opening, np.float64)
    found = np.isfinite(opening)
    if found.sum() < 3:
        return {"frames": int(len(opening)), "tracked": int(found.sum())}
    filled = np.interp(np.arange(len(opening)), np.flatnonzero(found), opening[found])
    reference = np.asarray(reference, np.float64)
    reference = reference[np.isfinite(reference)]
    vowel = np.isin(np.argmax(visemes, axis=1), [VISEMES.index(v) for v in OPEN_VOWELS])
    offset, peak = av_offset(filled, envelope, fps)
    block = {
        "frames": int(len(opening)), "tracked": int(found.sum()),
        "opening_range_ratio": _spread(opening[found]) / max(_spread(reference), 1e-9),
        "opening_p5_p95": [float(v) for v in np.percentile(opening[found], [5, 95])],
        "bilabial_closure": bilabial_closure(filled, visemes, closed_threshold(reference)),
        "open_vowel_opening": float(filled[vowel].mean()) if vowel.any() else None,
        "av_offset_ms": offset, "av_peak_corr": peak,
    }
    if real is not None:
        block["opening_corr"] = agreement(opening, real)["opening_corr"]
    return block
