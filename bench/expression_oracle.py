"""Expression-oracle diagnostic: how far would a perfect expression signal take the avatar?

    python -m bench.expression_oracle DATASET --out AVATAR [--preset cpu] [--dims 32]

Trains the usual avatar, except that both deformation heads are driven by each frame's
*tracked expression* instead of its speech: a pose-free code of the frame's 478 face-mesh
landmarks (Procrustes-aligned, PCA on the training frames, whitened), placed in the first
`dims` mel bins of every feature row, with an audio window of 1 and no feature noise.
Held-out frames get their own tracked code, so the heads know each held-out expression
exactly. `avatar eval`'s metrics then bound what any avatar driven by per-frame signals
reaches with this model and budget: if the oracle's held-out face PSNR is no better than
the speech-driven avatar's, the gap lies in fit and generalisation, not in what speech
fails to say about the face.

Writes AVATAR (an ordinary avatar folder; `avatar render` would drive it with speech, which
it was not trained on, so use it for this diagnostic only) and prints eval.json's figures.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch


def expression_codes(landmarks: np.ndarray, fit_rows: list[int], dims: int = 32, iterations: int = 3) -> np.ndarray:
    """Pose-free expression codes of tracked face meshes.

    landmarks: [T, P, 3] (mediapipe: pixels and relative depth). Each frame is centred,
    scaled to unit norm and rotated onto the mean shape (generalised Procrustes), so head
    pose and distance drop out; PCA fitted on `fit_rows` gives `dims` components, whitened
    there. Returns [T, dims] float32.
    """
    x = landmarks.astype(np.float64)
    x = x - x.mean(1, keepdims=True)
    x /= np.linalg.norm(x, axis=(1, 2), keepdims=True)
    ref = x[fit_rows].mean(0)
    for _ in range(iterations):
        u, _, vt = np.linalg.svd(np.einsum("tpi,pj->tij", x, ref))  # rotation of each frame onto ref
        d = np.sign(np.linalg.det(u @ vt))
        u[:, :, -1] *= d[:, None]  # proper rotations only
        x = x @ (u @ vt)
        ref = x[fit_rows].mean(0)
        ref /= np.linalg.norm(ref)
    flat = x.reshape(len(x), -1)
    mu = flat[fit_rows].mean(0)
    _, sv, vt = np.linalg.svd(flat[fit_rows] - mu, full_matrices=False)
    dims = min(dims, len(sv))
    return ((flat - mu) @ vt[:dims].T / (sv[:dims] / np.sqrt(len(fit_rows)) + 1e-12)).astype(np.float32)


def oracle_features(codes: np.ndarray, shape: tuple[int, int, int]) -> torch.Tensor:
    """[T, dims] codes -> [T, 16, 80] feature rows carrying them in the first dims bins."""
    out = torch.zeros(shape)
    out[:, :, : codes.shape[1]] = torch.from_numpy(codes)[:, None, :]
    return out


def main(argv: list[str] | None = None) -> int:
    from avatar.errors import AvatarError
    from recon.avatar_dir import CHECKPOINT
    from recon.config import preset
    from recon.evaluate import evaluate
    from recon.train import Trainer

    ap = argparse.ArgumentParser(prog="python -m bench.expression_oracle", description=__doc__.split("\n\n")[0])
    ap.add_argument("dataset", type=Path)
    ap.add_argument("--out", type=Path, required=True, help="avatar folder to write (resumes if it exists)")
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--dims", type=int, default=32, help="expression code dimensions (<= 80)")
    args = ap.parse_args(argv)
    try:
        cfg = preset(args.preset, audio_window=1, audio_noise=0.0)
        trainer = Trainer(args.dataset, args.out, cfg, resume=(args.out / CHECKPOINT).exists())
        ds = trainer.ds
        if ds.landmarks(0) is None:
            raise AvatarError(args.dataset, "has no face-mesh landmarks (landmarks.npy); the oracle needs them")
        landmarks = np.load(ds.root / ds.meta["landmarks"], mmap_mode="r")  # [T, 478, 3]: x, y and depth
        n_rows, _, n_bins = trainer.mel.shape
        codes = np.zeros((n_rows, min(args.dims, n_bins)), np.float32)
        codes[[int(f["frame_index"]) for f in ds.frames]] = expression_codes(np.asarray(landmarks), trainer.train_ids,
                                                                            codes.shape[1])
        trainer.mel = oracle_features(codes, tuple(trainer.mel.shape))
        t0 = time.perf_counter()
        if trainer.step < trainer.cfg.iterations:
            trainer.run()
        print(f"oracle trained in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        r = evaluate(args.out, features=trainer.mel)
    except AvatarError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    fit = r["train_fit"] or {}
    print(json.dumps({"held_out": {k: r[k] for k in ("psnr", "psnr_face", "ssim_face", "lmd")},
                      "train_fit": {k: fit.get(k) for k in ("psnr", "psnr_face", "ssim_face", "lmd")}}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
