"""Typed configuration of `avatar capture`."""

from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path


@dataclass
class CaptureConfig:
    """How a talking-head video becomes a dataset folder."""

    video: Path
    """Input video (any container/codec FFmpeg reads; phone rotation metadata honoured)."""
    out: Path
    """Dataset folder to write."""
    audio: Path | None = None
    """Speech to use instead of the video's audio track (wav/mp3/flac, any rate)."""
    audio_features: list[Path] = field(default_factory=list)
    """Precomputed ER-NeRF features to carry along (aud_ds.npy [N,16,29], aud_hu.npy [N,2,1024])."""
    fps: float = 25.0
    """Target frame rate; frames are resampled to it by nearest timestamp."""
    size: int = 512
    """Side of the square output frames in pixels."""
    crop_scale: float = 2.6
    """Crop side as a multiple of the detected face height; includes hair and shoulders."""
    min_duration: float = 3.0
    """Shortest clip accepted, in seconds."""
    min_face_px: float = 80.0
    """Smallest median face height (detector box) accepted in the source video, in pixels."""
    min_tracked_fraction: float = 0.5
    """Fail when fewer frames than this have a face."""
    focal_sweep_fov_deg: tuple[float, float] = (8.0, 70.0)
    """Range of horizontal fields of view tried by the focal sweep."""
    focal_sweep_steps: int = 24
    """Number of focal lengths tried by the sweep (log-spaced)."""
    focal_prior_fov_deg: float = 30.2
    """Centre of the log-normal prior on the horizontal field of view of the output frames
    (ER-NeRF's sweep range, 600-1500 px at 512 px, has its log-centre here)."""
    focal_prior_log_sd: float = 0.35
    """Standard deviation of log(focal) of that prior; it decides only where the sweep is
    uncertain (its bootstrap spread is reported). 0 or less: the sweep's minimum alone."""
    smoothness: float = 2.0
    """Weight of the robust temporal (acceleration) prior on head pose."""
    photometric: bool = False
    """Refine the landmark-fitted head poses by aligning the frames' skin texture
    (capture/photometric.py). Landmarks alone under-estimate head turns, but the texture
    assumes a rigid upper face: off by default, on for subjects that keep a neutral face."""
    background_samples: int = 64
    """Frames sampled to build the background plate."""
    jpeg_quality: int = 95
    """JPEG quality of images/."""
    force: bool = False
    """Redo every stage even when its output exists."""

    def check(self) -> "CaptureConfig":
        """Raise ValueError naming the first setting of the wrong type or out of range."""
        for f in fields(self):
            value, default = getattr(self, f.name), f.default
            if f.name in ("video", "out", "audio", "audio_features") or default is MISSING:
                continue
            if isinstance(default, tuple):
                ok = (isinstance(value, (tuple, list)) and len(value) == len(default)
                      and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value))
            elif isinstance(default, bool):
                ok = isinstance(value, bool)
            elif isinstance(default, float):
                ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            else:
                ok = isinstance(value, type(default)) and not isinstance(value, bool)
            if not ok:
                raise ValueError(f"{f.name} must be {type(default).__name__}, got {value!r}")
        limits = {"fps": (1.0, 120.0), "size": (32, 4096), "crop_scale": (1.0, 10.0), "min_duration": (0.0, 3600.0),
                  "min_face_px": (1.0, 10_000.0), "min_tracked_fraction": (0.0, 1.0), "focal_sweep_steps": (2, 1000),
                  "smoothness": (0.0, 1e6), "background_samples": (1, 10_000), "jpeg_quality": (1, 100),
                  "focal_prior_fov_deg": (1.0, 170.0), "focal_prior_log_sd": (-1e6, 10.0), "min_face_px": (1.0, 1e4)}
        for name, (lo, hi) in limits.items():
            if not lo <= getattr(self, name) <= hi:
                raise ValueError(f"{name} must be between {lo:g} and {hi:g}, got {getattr(self, name)!r}")
        lo, hi = self.focal_sweep_fov_deg
        if not 1 <= lo < hi < 170:
            raise ValueError(f"focal_sweep_fov_deg must be (low, high) degrees in 1..170, got {self.focal_sweep_fov_deg}")
        return self
