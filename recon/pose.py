"""Per-frame head-pose corrections learned with the avatar (SyncTalk, GaussianAvatars).

Capture's poses come from landmarks (and optionally the skin texture); an error of a
degree moves the face by pixels, and Gaussians fitted to many frames at once then average
the misregistered frames into blur. Training refines each frame's pose by a small rigid
correction of the head frame, under a temporal smoothness prior (heads do not jitter from
one frame to the next) and a small pull towards capture's pose.

    viewmat_refined = viewmat @ [[R(w), t], [0, 1]]     w: rotation vector (rad), t = c / 100 m

Held-out frames have no correction (they were never trained on): `avatar eval` scores
them with capture's poses, and separately with a pose-only fit to the frame, labelled.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def correction_matrix(delta: Tensor) -> Tensor:
    """[..., 6] (rotation vector in radians, translation in cm) -> [..., 4, 4] rigid transforms."""
    w, t = delta[..., :3], delta[..., 3:] / 100
    zero = torch.zeros_like(w[..., 0])
    skew = torch.stack([zero, -w[..., 2], w[..., 1], w[..., 2], zero, -w[..., 0], -w[..., 1], w[..., 0], zero],
                       -1).reshape(*w.shape[:-1], 3, 3)
    out = torch.zeros(*w.shape[:-1], 4, 4, dtype=delta.dtype)
    out[..., :3, :3] = torch.linalg.matrix_exp(skew)
    out[..., :3, 3] = t
    out[..., 3, 3] = 1
    return out


class PoseCorrection(nn.Module):
    """Learnable corrections of the dataset's frames: delta [T, 6], zero at the start."""

    def __init__(self, frames: int):
        super().__init__()
        self.delta = nn.Parameter(torch.zeros(frames, 6))

    def refine(self, viewmat: Tensor, i: int) -> Tensor:
        """[4, 4] dataset frame i's world-to-camera matrix, corrected."""
        return viewmat @ correction_matrix(self.delta[i])

    def prior(self, rows: Tensor, smoothness: float, magnitude: float) -> Tensor:
        """smoothness x mean squared change between consecutive frames `rows` (sorted dataset
        indices; pairs that are not neighbours in the clip are skipped) + magnitude x mean
        squared correction, in (rad, cm) units."""
        d = self.delta[rows]
        neighbours = (rows[1:] - rows[:-1]) == 1
        step = (d[1:] - d[:-1])[neighbours].square().sum(-1).mean() if neighbours.any() else d.sum() * 0
        return smoothness * step + magnitude * d.square().sum(-1).mean()
