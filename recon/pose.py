"""Rigid corrections of a frame's head pose, for `avatar eval`'s pose-only fit.

Capture's poses come from landmarks (and optionally the skin texture); an error of a
degree moves the face by pixels. Eval fits a correction to held-out frames, the avatar
frozen, to show how much of their error is pose:

    viewmat_corrected = viewmat @ [[R(w), t], [0, 1]]     w: rotation vector (rad), t = c / 100 m
"""

from __future__ import annotations

import torch
from torch import Tensor


def correction_matrix(delta: Tensor) -> Tensor:
    """[..., 6] (rotation vector in radians, translation in cm) -> [..., 4, 4] rigid transforms."""
    w, t = delta[..., :3], delta[..., 3:] / 100
    zero = torch.zeros_like(w[..., 0])
    skew = torch.stack([zero, -w[..., 2], w[..., 1], w[..., 2], zero, -w[..., 0], -w[..., 1], w[..., 0], zero],
                       -1).reshape(*w.shape[:-1], 3, 3)
    out = torch.zeros(*w.shape[:-1], 4, 4, dtype=delta.dtype, device=delta.device)
    out[..., :3, :3] = torch.linalg.matrix_exp(skew)
    out[..., :3, 3] = t
    out[..., 3, 3] = 1
    return out
