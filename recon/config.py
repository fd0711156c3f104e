"""Typed configuration of `avatar train`, with the `cpu` and `gpu` presets.

The config is saved beside every checkpoint (`config.json`), so an avatar folder always
says how it was made, and `--resume` continues with exactly the same settings.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace


@dataclass
class StageSchedule:
    """Fractions of `iterations` spent in each stage (TalkingGaussian's order)."""

    static: float = 0.25
    """Warm-up: canonical Gaussians of both branches, no deformation, full composite."""
    mouth: float = 0.15
    """Inside-mouth branch and its audio-driven deformation, on the inner-mouth region."""
    face: float = 0.35
    """Face branch and its audio/eye-driven deformation; its alpha must open over the mouth."""
    fuse: float = 0.25
    """Everything jointly on the full composite."""

    def boundaries(self, iterations: int) -> list[tuple[str, int]]:
        """[(stage, first step)] in order; the stages cover [0, iterations)."""
        total = self.static + self.mouth + self.face + self.fuse
        out, acc = [], 0.0
        for name in ("static", "mouth", "face", "fuse"):
            out.append((name, int(round(acc / total * iterations))))
            acc += getattr(self, name)
        return out


@dataclass
class TrainConfig:
    """How an avatar is fitted to a dataset. Defaults are the `cpu` preset."""

    preset: str = "cpu"
    """Name of the preset these values started from."""
    size: int = 256
    """Training and rendering resolution (square)."""
    iterations: int = 3000
    """Optimisation steps of the head (each on `batch_size` views)."""
    batch_size: int = 1
    """Views per step (recon/datamanager.py): the loss is their mean. More views per step
    use a GPU's width; on a CPU, time grows with the views, so one is the default."""
    stages: StageSchedule = field(default_factory=StageSchedule)
    """How the steps split into TalkingGaussian's stages."""
    seed: int = 0
    """Seed of the initialisation, frame order and everything random."""
    sh_degree: int = 1
    """Spherical-harmonics degree of the colours (0..3)."""
    init_volume_points: int = 12_000
    """Face-branch points sampled in the carved head volume at initialisation."""
    init_mouth_points: int = 1_500
    """Inside-mouth points at initialisation."""
    max_gaussians: int = 25_000
    """Densification stops adding points at this count (both branches together)."""
    audio_window: int = 16
    """Video frames of speech MotionNet's temporal convolutions reach over (16 = +-320 ms,
    as AD-NeRF's smoothing window: lips often move well before the sound they make)."""
    audio_noise: float = 0.4
    """Std of Gaussian noise added to the normalised log-mel features while MotionNet learns
    (a few seconds of speech are easy to memorise; noise makes the mouth follow the sound)."""
    motion_components: int = 16
    """Motion codes: PCA components of the lower face's tracked motion (recon/motion.py)."""
    motion_upper_components: int = 6
    """Motion codes of the face above the nose base (brows, forehead, cheeks), after the lower
    face's: the renderer learns each training frame's tracked brows instead of averaging
    them into blur. Speech does not move them: a dataset's own frames take their tracked
    values (like the eye signal), other speech the clip's average (recon/motion.py)."""
    motion_steps: int = 600
    """Full-clip Adam steps of the speech-to-motion stage (about 10 s per 200 frames here)."""
    motion_velocity_weight: float = 1.0
    """Weight of the frame-to-frame velocity error in the speech-to-motion loss (GeneFace):
    without it the predicted mouth lags and smooths over fast closures."""
    motion_gap_weight: float = 1.0
    """Weight of the inner-lip gap's error (and its velocity's) in the speech-to-motion loss,
    beside the codes' (recon/motion.py: fit_motion_net): the opening is what lip sync is
    judged by, and one direction among 16 codes when weighed equally."""
    motion_falloff: float = 0.015
    """Distance (metres) over which a Gaussian's share of the face mesh's motion falls off
    (exp(-(d / falloff)^2)): points on the lips move with them, the skull does not."""
    lr_motion: float = 2e-3
    """Initial learning rate of MotionNet (decays 10x over motion_steps)."""
    live_lookahead_ms: float = 80.0
    """Look-ahead of the live motion net distilled from MotionNet after training
    (recon/live.py): live speech with this look-ahead drives the avatar through it. 0: none."""
    live_motion_steps: int = 600
    """Adam steps of that distillation (256 windows a step)."""
    live_copies: int = 12
    """Time-shifted and speed-perturbed copies of the clip's speech the live net learns
    from (no more than four minutes of audio in all: recon/live.py, LIVE_AUDIO_S)."""
    torso_steps: int = 2000
    """Steps of the torso stage, after `iterations`: the neck-and-shoulders branch
    (recon/torso.py) fitted under the finished head, which it never changes. 0: no torso."""
    init_torso_points: int = 4_000
    """Torso points at initialisation, lifted from the person masks below the head."""
    max_torso_gaussians: int = 12_000
    """Densification of the torso stops adding points at this count."""
    body_refine_at: float = 0.5
    """Fraction of the torso stage after which every frame's body track is refined through
    the renderer (recon/torso.py: refine_tracks), so that the rest of the stage fits a body
    tracked in 3D; they are refined once more after the last step, against the finished
    torso. 0: never (the image-plane registration is kept)."""
    silhouette_weight: float = 0.5
    """Weight of |alpha - person mask| in the torso stage, outside the head's mask: the head
    and torso together must cover the person, and nothing else (clean silhouettes)."""
    # Learning rates (Adam). Positions are in metres: the head is about 0.25 m across.
    lr_means: float = 2.5e-4
    """Initial learning rate of the Gaussian centres (decays 100x, as in 3DGS)."""
    lr_sh: float = 5e-3
    """Learning rate of the DC colour; higher SH bands use 1/20 of it."""
    lr_opacity: float = 0.05
    """Learning rate of opacity logits."""
    lr_scales: float = 1e-2
    """Learning rate of log-scales."""
    lr_quats: float = 1e-3
    """Learning rate of the quaternions."""
    lr_deform: float = 1e-3
    """Learning rate of the residual deformation MLPs (and of MotionNet for datasets
    without tracked faces, where it learns through the renders)."""
    lr_planes: float = 1e-2
    """Learning rate of the tri-plane features of the deformation heads."""
    # Losses.
    ssim_weight: float = 0.2
    """L = (1 - w) L1 + w D-SSIM (3DGS)."""
    lip_weight: float = 1.0
    """Extra L1 weight on the lip region (box around the outer lips)."""
    lip_landmark_weight: float = 1.0
    """Weight of the lip-landmark loss: the face deformation, evaluated at the fitted face's
    40 lip landmarks, must carry them onto the lips tracked in the frame (robust distance in
    pixels / size). It hands the audio head the mouth's shape directly, not only through
    pixels. 0 disables; datasets without face-mesh landmarks (ER-NeRF imports) skip it."""
    lip_landmark_frames: int = 8
    """Frames in the lip-landmark loss of each step: the step's frame plus random training
    frames. The loss renders nothing, so it trains the face head's audio-to-lips map on
    many frames per step, from the first step on."""
    alpha_weight: float = 0.1
    """Weight of |alpha - head mask| (face alpha vs head-minus-mouth in the face stage)."""
    deform_weight: float = 1e-2
    """Weight of the mean squared deformation (positions in cm, log-scales, quaternions)."""
    # Densification (3DGS rules, per branch).
    densify_from: float = 0.05
    """Start densifying at this fraction of the iterations."""
    densify_until: float = 0.7
    """Stop densifying at this fraction of the iterations."""
    densify_every: int = 100
    """Steps between densification rounds."""
    densify_grad: float = 2e-4
    """View-space positional gradient threshold (NDC units, as in 3DGS)."""
    percent_dense: float = 0.01
    """Clone below / split above this fraction of the head extent."""
    opacity_reset_at: float = 0.35
    """Reset opacities to 0.01 once, at this fraction of the iterations (0 disables)."""
    prune_opacity: float = 0.005
    """Prune Gaussians whose opacity falls below this."""
    # Bookkeeping.
    checkpoint_every: int = 250
    """Steps between checkpoints (one is also written at the end)."""
    log_every: int = 25
    """Steps between metric lines in metrics.jsonl."""
    cache_frames: int = 256
    """Decoded frames kept in memory (data streams from disk; 256 frames at 256^2 is ~0.3 GB)."""
    backend: str = "auto"
    """Rasterizer backend (auto, cpu, torch, cuda, gsplat; recon/raster/api.py)."""

    @property
    def total_steps(self) -> int:
        """All steps of a run: the head's `iterations`, then the torso's."""
        return self.iterations + self.torso_steps

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """A config from its dict (a checkpoint's, a config file's): every field's type and
        range checked as `preset` checks them; ValueError names the first bad one."""
        if not isinstance(d, dict):
            raise ValueError(f"a training config must be an object of settings, got {type(d).__name__}")
        d = dict(d)
        return preset(d.pop("preset", "cpu"), **d)


PRESETS: dict[str, TrainConfig] = {
    "cpu": TrainConfig(),
    # Paper scale: 4 views a step for 30k steps is 120k views, about TalkingGaussian's
    # 50k-step mouth and face stages and its fusion at one view a step.
    "gpu": TrainConfig(preset="gpu", size=512, iterations=30_000, batch_size=4, sh_degree=3, init_volume_points=40_000,
                       init_mouth_points=5_000, max_gaussians=300_000, torso_steps=6000, init_torso_points=15_000,
                       max_torso_gaussians=80_000, checkpoint_every=2000, log_every=100,
                       cache_frames=512, densify_until=0.5, opacity_reset_at=0.1),
    # The demo's shortened schedule: same model, fewer steps and points.
    "demo": TrainConfig(preset="demo", iterations=900, init_volume_points=6_000, init_mouth_points=800,
                        max_gaussians=15_000, checkpoint_every=150, torso_steps=300, init_torso_points=2_000,
                        max_torso_gaussians=5_000, live_motion_steps=200, live_copies=4),
}


def preset(name: str, **overrides) -> TrainConfig:
    """A preset with some fields replaced (None values are ignored; `stages` may be a dict)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if isinstance(overrides.get("stages"), dict):
        overrides["stages"] = StageSchedule(**overrides["stages"])
    return check_ranges(replace_checked(PRESETS[name], overrides))


def replace_checked(base, overrides: dict):
    """The config dataclass `base` with `overrides` (None values ignored), each of the type
    of the field it replaces (an int stands for a float); ValueError names an unknown key or
    the first value of the wrong type."""
    overrides = {k: v for k, v in overrides.items() if v is not None}
    unknown = set(overrides) - {f.name for f in fields(base)}
    if unknown:
        raise ValueError(f"unknown config keys {sorted(unknown)}")
    for key, value in overrides.items():
        default = getattr(base, key)
        ok = isinstance(value, type(default)) and not (isinstance(value, bool) and not isinstance(default, bool))
        if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            ok = True  # 1 for 1.0
        if not ok:
            raise ValueError(f"{key} must be {type(default).__name__}, got {value!r}")
    return replace(base, **overrides)


AT_LEAST_ONE = ("size", "iterations", "batch_size", "init_volume_points", "init_torso_points", "max_gaussians", "audio_window", "motion_components",
                "checkpoint_every", "log_every", "cache_frames", "densify_every", "lip_landmark_frames", "live_copies")
FRACTIONS = ("body_refine_at", "densify_from", "densify_until", "opacity_reset_at", "percent_dense", "prune_opacity", "ssim_weight")


def check_ranges(cfg: TrainConfig) -> TrainConfig:
    """Raise ValueError naming the first setting out of its range (types are checked by `preset`)."""
    from .raster.api import BACKENDS

    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and f.name != "seed":
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{f.name} must be a finite number >= 0, got {value!r}")
    for name in AT_LEAST_ONE:
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name} must be at least 1, got {getattr(cfg, name)!r}")
    for name in FRACTIONS:
        if getattr(cfg, name) > 1:
            raise ValueError(f"{name} must be a fraction in [0, 1], got {getattr(cfg, name)!r}")
    if not 16 <= cfg.size <= 4096:
        raise ValueError(f"size must be between 16 and 4096 pixels, got {cfg.size}")
    if cfg.sh_degree > 3:
        raise ValueError(f"sh_degree must be 0..3, got {cfg.sh_degree}")
    if cfg.backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {cfg.backend!r}")
    stages = [cfg.stages.static, cfg.stages.mouth, cfg.stages.face, cfg.stages.fuse]
    if any(not math.isfinite(v) or v < 0 for v in stages) or sum(stages) <= 0:
        raise ValueError(f"stages must be fractions >= 0 with a positive sum, got {cfg.stages}")
    return cfg
