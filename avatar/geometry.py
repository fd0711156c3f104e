"""Small geometry and robust-fitting helpers shared by capture and recon."""

from __future__ import annotations

import numpy as np
import torch


def umeyama(src: np.ndarray, dst: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """Similarity (s, R, t) minimising ||s R src + t - dst||^2. src, dst: [M, 3]."""
    mu_s, mu_d = src.mean(0), dst.mean(0)
    a, b = src - mu_s, dst - mu_d
    U, S, Vt = np.linalg.svd(b.T @ a / len(src))
    D = np.eye(3)
    D[2, 2] = np.sign(np.linalg.det(U @ Vt))
    R = U @ D @ Vt
    s = float(np.trace(np.diag(S) @ D) / (a**2).sum(1).mean())
    return s, R, mu_d - s * R @ mu_s


def pseudo_huber(r2: torch.Tensor, delta: float) -> torch.Tensor:
    """Robust cost of squared residuals r2: quadratic below delta, linear above."""
    return delta**2 * (torch.sqrt(1 + r2 / delta**2) - 1)
