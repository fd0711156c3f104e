"""Speech -> mouth motion: the avatar's explicit audio-to-motion stage (GeneFace's
audio-to-motion, learned on one clip), and the mesh skinning that carries the motion
onto the Gaussians.

Why an explicit stage: a deformation field learned only through pixels regresses to the
average mouth where speech is ambiguous, and a field sampled at canonical positions
cannot tell the upper lip from the lower one, which lie millimetres apart in a closed
mouth. The face mesh can: its mouth slit is a hole, so a point bound to a triangle of the
upper lip moves with the upper lip.

    tracked landmarks [T, 478, 3] --Procrustes onto the canonical face--> offsets [T, 478, 3]
    offsets of the lower face, of the upper face --one PCA each on training frames-->
        motion codes [T, K] (whitened; the lower face's first)
    speech features (log-mel windows, viseme posteriors) --MotionNet--> the lower face's codes
        (lips closed wherever the phone recogniser hears P, B or M; the upper face's: zero,
        or a dataset frame's own tracked ones)
    motion codes --MotionBasis.decode--> mesh offsets [B, 478, 3] --skin--> Gaussian offsets [B, N, 3]

Training renders with each frame's *tracked* motion (the renderer learns motion -> image),
while MotionNet learns speech -> motion on the same frames; new speech goes through
MotionNet. Codes of zero are the clip's average face (the mouth's at zero: the static-mouth baseline).

The upper face (brows, forehead) moves with expression, not speech; without codes of its
own the renderer averaged each training frame's brows into blur.
"""

from __future__ import annotations

import copy
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from avatar.dataset_format import (LEFT_EYE, LOWER_LIP, N_LANDMARKS, NOSE_BASE, RIGHT_EYE, RIGID, UPPER_LIP, VISEMES,
                                   face_triangles, mouth_opening)
from avatar.geometry import umeyama
from avatar.io import write_json

from .lipsync import closed_threshold

if TYPE_CHECKING:
    from .dataset import Dataset

BILABIAL = VISEMES.index("PP")


def tracked_offsets(landmarks: np.ndarray, canonical: np.ndarray, rigid: list[int]) -> np.ndarray:
    """Per-frame expression offsets of the face mesh in the head frame.

    landmarks: [T, P, 3] tracked (mediapipe: x right, y down in pixels, z away at pixel
    scale); canonical: [P, 3] the subject's face in the head frame (metres, y up, z out of
    the face); rigid: indices that do not move with expression. Each frame is similarity-
    aligned onto the canonical face by its rigid points (pose and distance drop out).
    Returns [T, P, 3] float32 metres: aligned frame minus canonical.
    """
    X = np.asarray(canonical, np.float64)
    out = np.empty((len(landmarks), *X.shape), np.float32)
    for t, p in enumerate(np.asarray(landmarks, np.float64)):
        s, R, shift = umeyama(p[rigid], X[rigid])
        out[t] = (s * p @ R.T + shift) - X
    return out


class MotionBasis(nn.Module):
    """PCA of the face's offsets over the training frames; codes are whitened. The first
    `spoken` codes are the lower face's (what speech moves), the rest the upper face's.

    Buffers: vertices [P] mesh indices that move; mean [P * 3]; components [K, P * 3]
    (orthonormal rows); std [K] the codes' standard deviation on the training frames.
    """

    def __init__(self, n_vertices: int = 478, n_moving: int = 1, components: int = 16):
        super().__init__()
        self.n_vertices = n_vertices
        self.register_buffer("vertices", torch.zeros(n_moving, dtype=torch.long))
        self.register_buffer("mean", torch.zeros(n_moving * 3))
        self.register_buffer("components", torch.zeros(components, n_moving * 3))
        self.register_buffer("std", torch.ones(components))
        self.spoken = components

    @property
    def dim(self) -> int:
        return self.components.shape[0]

    @classmethod
    def fit(cls, offsets: np.ndarray, canonical: np.ndarray, components: int = 16, upper: int = 0) -> "MotionBasis":
        """offsets: [T, P, 3] of the training frames; canonical: [P, 3]. `components` codes
        of the lower face, then `upper` codes of the face above the nose base (brows,
        forehead, cheeks; not the rigid points or the eyes' contours), each block a PCA of
        its own vertices, so a lower code never moves a brow."""
        lower = np.flatnonzero(canonical[:, 1] < canonical[NOSE_BASE, 1])
        above = np.setdiff1d(np.arange(len(canonical)), np.concatenate([lower, RIGID, RIGHT_EYE, LEFT_EYE]))
        blocks = [(lower, components)] + ([(above, upper)] if upper > 0 else [])
        moving = np.concatenate([v for v, _ in blocks])
        means, rows, stds, at = [], [], [], 0
        for verts, want in blocks:
            x = torch.from_numpy(offsets[:, verts].reshape(len(offsets), -1)).double()
            mean = x.mean(0)
            _, sv, vt = torch.linalg.svd(x - mean, full_matrices=False)
            k = min(want, len(sv))
            row = torch.zeros(k, 3 * len(moving), dtype=torch.float64)  # zero on the other block's vertices
            row[:, at:at + vt.shape[1]] = vt[:k]
            means.append(mean)
            rows.append(row)
            stds.append(sv[:k] / max(len(x) - 1, 1) ** 0.5)
            at += vt.shape[1]
        stacked = torch.cat(rows)
        basis = cls(canonical.shape[0], len(moving), len(stacked))
        basis.vertices.copy_(torch.from_numpy(moving))
        basis.mean.copy_(torch.cat(means).float())
        basis.components.copy_(stacked.float())
        basis.std.copy_(torch.cat(stds).clamp_min(1e-9).float())
        basis.spoken = len(rows[0])
        return basis

    def axis(self, a: int, b: int, dim: int) -> Tensor:
        """[K]: d(offset of vertex a - offset of vertex b)[dim] / d codes (zero where a vertex
        does not move)."""
        out = torch.zeros(self.dim)
        for vertex, sign in ((a, 1.0), (b, -1.0)):
            at = torch.nonzero(self.vertices == vertex)
            if len(at):
                out += sign * self.std * self.components[:, 3 * int(at[0, 0]) + dim]
        return out

    def encode(self, offsets: Tensor) -> Tensor:
        """[T, P, 3] mesh offsets -> [T, K] whitened codes."""
        x = offsets.to(self.mean)[:, self.vertices].reshape(len(offsets), -1)
        return (x - self.mean) @ self.components.T / self.std

    def decode(self, codes: Tensor) -> Tensor:
        """[B, K] codes -> [B, P, 3] offsets of every mesh vertex (zero where none moves)."""
        x = self.mean + (codes * self.std) @ self.components  # [B, M * 3]
        out = x.new_zeros(len(codes), self.n_vertices, 3)
        out[:, self.vertices] = x.reshape(len(codes), -1, 3)
        return out


class MotionNet(nn.Module):
    """Speech features of a whole clip -> motion codes per video frame.

    mel: [T, 16, 80] normalised log-mel windows; visemes: [T, V] viseme posteriors
    (speaker-independent: which mouth shape the phone needs). Each frame is encoded from
    its 160 ms window, then temporal convolutions over about +-`window` / 2 frames give
    the codes [T, K] (lips move ahead of the sound they make, and settle after it).
    Only the first `spoken` codes (default: all) come from speech, the lower face's; the
    rest (the upper face's: MotionBasis.fit) are zero, the clip's average, for any speech.
    """

    def __init__(self, codes: int = 16, visemes: int = 15, window: int = 16, width: int = 64, dropout: float = 0.2,
                 spoken: int | None = None):
        super().__init__()
        self.spoken = codes if spoken is None else spoken
        if not 1 <= self.spoken <= codes:
            raise ValueError(f"spoken codes must be 1..{codes}, got {self.spoken}")
        self.frame_net = nn.Sequential(
            nn.Conv1d(80, 64, 3, padding=1), nn.LeakyReLU(0.02),
            nn.Conv1d(64, 64, 3, stride=2, padding=1), nn.LeakyReLU(0.02),
            nn.Conv1d(64, 32, 3, stride=2, padding=1), nn.LeakyReLU(0.02),
            nn.AdaptiveAvgPool1d(1),
        )
        k = max(3, (window // 4) | 1)  # three layers of kernel k reach about +-window / 2 frames
        self.temporal = nn.Sequential(
            nn.Conv1d(32 + visemes, width, k, padding=k // 2), nn.LeakyReLU(0.02), nn.Dropout(dropout),
            nn.Conv1d(width, width, k, padding=k // 2), nn.LeakyReLU(0.02), nn.Dropout(dropout),
            nn.Conv1d(width, self.spoken, k, padding=k // 2),
        )
        # Inference calibration (fit_motion_stage): codes = centre + gain * (raw - centre).
        self.register_buffer("centre", torch.zeros(codes))
        self.register_buffer("gain", torch.ones(codes))
        # Bilabial closure: the lips must meet for P, B and M in any voice, which seconds of
        # one speaker's audio do not teach the net (fitted alone, it closed them for 14-71 %
        # of other voices' bilabials). codes @ lip_axis is the vertical inner-lip gap (up to
        # a constant) and lip_closed its value with the subject's lips closed
        # (set_closed_mouth); the gap is also what the fit weighs most (fit_motion_net).
        self.register_buffer("lip_axis", torch.zeros(codes))
        self.register_buffer("lip_closed", torch.zeros(()))

    @property
    def reach(self) -> int:
        """Frames either side of a frame whose speech its codes depend on (the reach of the
        temporal convolutions)."""
        return sum(m.kernel_size[0] // 2 for m in self.temporal if isinstance(m, nn.Conv1d))

    def raw(self, mel: Tensor, visemes: Tensor) -> Tensor:
        """Codes [T, K] before the bilabial closure (zero past the `spoken` ones)."""
        return self.raw_windows(mel[None], visemes[None])[0]

    def raw_windows(self, mel: Tensor, visemes: Tensor) -> Tensor:
        """`raw` of B clips at once: mel [B, T, 16, 80], visemes [B, T, V] -> [B, T, K]."""
        B, T = mel.shape[:2]
        per_frame = self.frame_net(mel.reshape(B * T, *mel.shape[2:]).transpose(1, 2))[..., 0]  # [B T, 32]
        x = torch.cat([per_frame.reshape(B, T, -1), visemes.to(per_frame)], -1).transpose(1, 2)  # [B, 32 + V, T]
        out = self.temporal(x).transpose(1, 2)
        return F.pad(out, (0, len(self.centre) - self.spoken))

    def close_lips(self, codes: Tensor, visemes: Tensor) -> Tensor:
        """codes [T, K] with the lips closed once per bilabial phone (visemes [T, V]). The
        change is the smallest one of the (whitened) codes that narrows the gap: the rest of
        the face moves only as far as it moved with the lip gap in the training frames, so a
        smile or rounding stays. Lips already closed stay as they are. A no-op before
        set_closed_mouth."""
        at = self.closure_frames(codes, visemes)
        if not len(at):
            return codes
        excess = F.relu(codes[at] @ self.lip_axis - self.lip_closed)[:, None]
        shift = torch.zeros_like(codes)
        shift[at] = excess * self.lip_axis / self.lip_axis.square().sum().clamp_min(1e-12)
        return codes - shift

    def closure_frames(self, codes: Tensor, visemes: Tensor) -> Tensor:
        """[E] frame indices (on the host) where the lips close. One frame per bilabial event
        (a run of frames whose main viseme is P/B/M), the frame from one before the run to one
        after it where the predicted lips are nearest closed: the lips meet once per
        bilabial, the net decides when. Closing every frame the recogniser tags instead cost
        held-out correlation (0.84 -> 0.65 on the 20 s clip): a phone recogniser's bilabials
        are often not the subject's, and they last longer than the closure. None before
        set_closed_mouth."""
        if visemes.shape[1] <= BILABIAL or not self.lip_axis.any():
            return torch.zeros(0, dtype=torch.long, device="cpu")  # host: an index of none
        tagged = (visemes.argmax(1) == BILABIAL).cpu()  # host: the events are found in Python, over [T]
        gaps = (codes.detach() @ self.lip_axis).cpu()  # host: each event's argmin
        at = []
        starts = torch.nonzero(tagged & ~torch.cat([tagged.new_zeros(1), tagged[:-1]])).ravel().tolist()
        for start in starts:
            end = start
            while end + 1 < len(tagged) and tagged[end + 1]:
                end += 1
            lo, hi = max(start - 1, 0), min(end + 2, len(tagged))
            at.append(lo + int(torch.argmin(gaps[lo:hi])))
        return torch.tensor(at, dtype=torch.long, device="cpu")  # host: indices into the codes

    def forward(self, mel: Tensor, visemes: Tensor) -> Tensor:
        """Codes [T, K] (what training fits)."""
        return self.close_lips(self.raw(mel, visemes), visemes)

    def predict(self, mel: Tensor, visemes: Tensor) -> Tensor:
        """Calibrated codes [T, K] for rendering (eval mode, no gradient): the range is
        restored before the lips close."""
        with torch.no_grad():
            return self.calibrated(self.eval().raw(mel, visemes), visemes)

    def calibrated(self, raw: Tensor, visemes: Tensor) -> Tensor:
        """Codes [T, K] from raw codes [T, K] (`raw`'s, or a blend of nets sharing this
        one's calibration and lip axis): the range restored, then the lips closed."""
        return self.close_lips(self.centre + self.gain * (raw - self.centre), visemes)

    def set_closed_mouth(self, basis: MotionBasis, codes: Tensor, opening: np.ndarray) -> None:
        """Set the lip axis from `basis` and the closed gap from the training frames' codes
        [R, K] whose inner-lip opening [R] (avatar.dataset_format.mouth_opening) counts as closed by
        lipsync's rule: the subject's own closed lips."""
        self.lip_axis.copy_(basis.axis(UPPER_LIP, LOWER_LIP, 1))
        shut = torch.from_numpy(np.asarray(opening) <= closed_threshold(opening))
        gaps = codes @ self.lip_axis
        self.lip_closed.copy_(gaps[shut].mean() if shut.any() else gaps.min())


def fit_motion_net(net: MotionNet, mel: Tensor, visemes: Tensor, codes: Tensor, rows: Tensor, steps: int,
                   lr: float = 2e-3, noise: float = 0.4, velocity_weight: float = 1.0, gap_weight: float = 1.0,
                   seed: int = 0, progress=None) -> list[float]:
    """Fit `net` so that net(mel, visemes)[rows] matches codes [R, K] (tracked motion of the
    training frames `rows`). Loss: squared error of the codes plus `velocity_weight` x that
    of their frame-to-frame differences (where consecutive rows are consecutive frames), so
    the mouth moves as fast as the real one, plus `gap_weight` x the same two errors of the
    inner-lip gap (codes @ net.lip_axis, in units of its tracked variance; after
    set_closed_mouth). The gap is one direction among the K codes, and an equal weight let
    the fit trade it for the rest of the lower face: weighing it raised held-out opening
    correlation on all three real clips (recon/README.md). Gaussian noise of std `noise`
    on the normalised mel regularises the few seconds of speech. Returns the loss per step.
    Deterministic given `seed`: dropout draws from a forked, seeded generator."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-3)
    consecutive = (rows[1:] - rows[:-1]) == 1
    axis = net.lip_axis
    gap_weight = gap_weight if axis.any() else 0.0
    gap_scale = (codes @ axis).var().clamp_min(1e-12) if gap_weight > 0 else None

    def error(pred: Tensor, target: Tensor) -> Tensor:
        loss = F.mse_loss(pred, target)
        if velocity_weight > 0 and consecutive.any():
            loss = loss + velocity_weight * F.mse_loss((pred[1:] - pred[:-1])[consecutive],
                                                       (target[1:] - target[:-1])[consecutive])
        return loss

    losses = []
    net.train()
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)
        for step in range(steps):
            for group in opt.param_groups:
                group["lr"] = lr * 0.1 ** (step / max(steps - 1, 1))
            x = mel + noise * torch.randn(mel.shape, generator=g) if noise > 0 else mel
            pred = net(x, visemes)[rows]
            loss = error(pred, codes)
            if gap_weight > 0:
                loss = loss + gap_weight * error(pred @ axis, codes @ axis) / gap_scale
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            if progress is not None:
                progress(step, losses[-1])
    net.eval()
    return losses


def spread(x: Tensor) -> Tensor:
    """p95 - p5 of x [N] (lipsync's range)."""
    return torch.quantile(x, 0.95) - torch.quantile(x, 0.05)


def fit_motion_stage(net: MotionNet, mel: Tensor, visemes: Tensor, codes: Tensor, rows: Tensor, steps: int,
                     holdout: float = 0.15, max_gain: float = 2.0, progress=None, **fit) -> dict:
    """The speech-to-motion stage: fit `net` on all training rows, and calibrate its range.

    A squared-error fit regresses to the mean where speech is ambiguous, so the predicted
    mouth opens less than the real one on speech it has not heard. The shrinkage is
    measured out of sample: a second net of the same shape is fitted on the first
    1 - `holdout` of the rows and predicts the rest; one gain for every code, set so that
    the inner-lip gap there (after the bilabial closure) spans the tracked gap's p5-p95
    range, clamped to [1, max_gain], is applied around the mean of the final net's codes
    at inference (MotionNet.predict). (Without a lip axis, before set_closed_mouth, the
    codes' total spread is matched instead.) One gain, not one per code: per-code gains,
    each set from a few seconds of held-aside speech, amplified codes the net barely
    predicts and cost the 50 s clip 0.05-0.13 of held-out correlation (gap weights 1-4).
    `fit` goes to fit_motion_net. Returns {"loss", "gain"}.
    """
    n_fit = int(round(len(rows) * (1 - holdout)))
    gain = torch.ones(())
    if 3 <= len(rows) - n_fit and n_fit >= 3:
        probe = copy.deepcopy(net)  # the same shape and start
        fit_motion_net(probe, mel, visemes, codes[:n_fit], rows[:n_fit], steps, **fit)
        with torch.no_grad():
            every = probe.raw(mel, visemes)
            centre, held, vis = every[rows[:n_fit]].mean(0), every[rows[n_fit:]], visemes[rows[n_fit:]]
            if net.lip_axis.any():
                measure = lambda c: spread(c @ net.lip_axis)  # noqa: E731
            else:
                measure = lambda c: c.std(0).square().sum().sqrt()  # noqa: E731
            target = measure(codes[n_fit:])
            for _ in range(4):  # the closure narrows the spread it adds to: a few fixed-point steps
                out = probe.close_lips(centre + gain * (held - centre), vis)
                gain = (gain * target / measure(out).clamp_min(1e-9)).clamp(1.0, max_gain)
    losses = fit_motion_net(net, mel, visemes, codes, rows, steps, progress=progress, **fit)
    with torch.no_grad():
        net.centre.copy_(net.raw(mel, visemes)[rows].mean(0))
    net.gain.fill_(float(gain))
    return {"loss": losses[-1] if losses else None, "gain": float(gain)}


@dataclass
class MeshBinding:
    """Each point bound to its nearest triangle of the face mesh.

    triangle [N, 3] vertex indices; bary [N, 3] barycentric weights of the nearest point on
    the triangle; weight [N] falloff with the distance to it (1 on the surface).
    """

    triangle: Tensor
    bary: Tensor
    weight: Tensor

    def __len__(self) -> int:
        return self.triangle.shape[0]

    def skin(self, vertex_offsets: Tensor) -> Tensor:
        """[B, V, 3] mesh vertex offsets -> [B, N, 3] offsets of the bound points."""
        picked = vertex_offsets[:, self.triangle]  # [B, N, 3, 3]
        return (picked * self.bary[None, :, :, None]).sum(2) * self.weight[None, :, None]


def closest_on_triangles(points: Tensor, corners: Tensor) -> tuple[Tensor, Tensor]:
    """Nearest points on triangles (Ericson's region tests).

    points: [N, 3]; corners: [N, C, 3, 3] C candidate triangles per point. Returns squared
    distances [N, C] and barycentric weights [N, C, 3] of the nearest point on each.
    """
    a, b, c = corners[..., 0, :], corners[..., 1, :], corners[..., 2, :]  # [N, C, 3]
    p = points[:, None]
    ab, ac = b - a, c - a
    ap, bp, cp = p - a, p - b, p - c
    d1, d2 = (ab * ap).sum(-1), (ac * ap).sum(-1)
    d3, d4 = (ab * bp).sum(-1), (ac * bp).sum(-1)
    d5, d6 = (ab * cp).sum(-1), (ac * cp).sum(-1)
    va, vb, vc = d3 * d6 - d5 * d4, d5 * d2 - d1 * d6, d1 * d4 - d3 * d2

    def ratio(num: Tensor, den: Tensor) -> Tensor:
        return num / torch.where(den.abs() < 1e-20, torch.full_like(den, 1e-20), den)

    denom = va + vb + vc
    v_in, w_in = ratio(vb, denom), ratio(vc, denom)
    # Nearest points on the three edges (clamped to them, so corners are covered too).
    t_ab = ratio(d1, d1 - d3).clamp(0, 1)
    t_ac = ratio(d2, d2 - d6).clamp(0, 1)
    t_bc = ratio(d4 - d3, (d4 - d3) + (d5 - d6)).clamp(0, 1)
    zero = torch.zeros_like(d1)
    candidates = torch.stack([
        torch.stack([1 - v_in - w_in, v_in, w_in], -1),  # interior
        torch.stack([1 - t_ab, t_ab, zero], -1),
        torch.stack([1 - t_ac, zero, t_ac], -1),
        torch.stack([zero, 1 - t_bc, t_bc], -1),
    ], -2)  # [N, C, 4, 3]
    q = candidates @ corners  # [N, C, 4, 3]
    dist2 = (q - p[:, :, None]).square().sum(-1)  # [N, C, 4]
    inside = (va >= 0) & (vb >= 0) & (vc >= 0)
    dist2[..., 0] = torch.where(inside, dist2[..., 0], torch.full_like(dist2[..., 0], float("inf")))
    best = dist2.argmin(-1)  # [N, C]
    bary = candidates.gather(-2, best[..., None, None].expand(*best.shape, 1, 3))[..., 0, :]
    return dist2.gather(-1, best[..., None])[..., 0], bary


def bind_to_mesh(points: Tensor, vertices: Tensor, triangles: Tensor, falloff: float, near: int = 6,
                 chunk: int = 8192) -> MeshBinding:
    """Bind points [N, 3] to the nearest triangle of a mesh (vertices [V, 3], triangles
    [F, 3]); the weight falls off as exp(-(d / falloff)^2) with the distance d to it.
    Candidates are the triangles around each point's `near` nearest vertices (the nearest
    triangle of a mesh with even faces is almost always among them)."""
    points, vertices = points.detach().float(), vertices.detach().float()
    if not len(points):
        return MeshBinding(triangles.new_zeros(0, 3), points.new_zeros(0, 3), points.new_zeros(0))
    # Triangles around each vertex, padded by repeating the first one.
    around: list[list[int]] = [[] for _ in range(len(vertices))]
    for f, tri in enumerate(triangles.tolist()):
        for v in tri:
            around[v].append(f)
    width = max(len(a) for a in around)
    ring = torch.tensor([a + [a[0]] * (width - len(a)) if a else [0] * width for a in around],
                        device=points.device)  # [V, width]
    tri, bary, dist2 = [], [], []
    for start in range(0, len(points), chunk):
        x = points[start:start + chunk]
        nearest = torch.cdist(x, vertices).topk(min(near, len(vertices)), largest=False).indices  # [n, near]
        cand = ring[nearest].reshape(len(x), -1)  # [n, near * width] triangle ids
        d2, b = closest_on_triangles(x, vertices[triangles[cand]])
        best = d2.argmin(1)
        rows = torch.arange(len(x), device=x.device)
        tri.append(triangles[cand[rows, best]])
        bary.append(b[rows, best])
        dist2.append(d2[rows, best])
    return MeshBinding(torch.cat(tri), torch.cat(bary), torch.exp(-torch.cat(dist2) / falloff**2))


class MotionRig(nn.Module):
    """The face mesh and its motion basis: motion codes -> offsets of bound Gaussians.

    Buffers: vertices [V, 3] the canonical face (head frame, metres); triangles [F, 3];
    basis (MotionBasis). Bindings of each branch's points are derived state, recomputed
    by :meth:`rebind` (training calls it whenever points are added or moved far enough to
    matter: at densification and at every checkpoint, so a resumed run binds as an
    uninterrupted one).
    """

    def __init__(self, basis: MotionBasis, vertices: Tensor, triangles: Tensor, falloff: float = 0.015):
        super().__init__()
        self.basis = basis
        self.register_buffer("vertices", vertices.float().clone())
        self.register_buffer("triangles", triangles.long().clone())
        self.register_buffer("falloff", torch.tensor(float(falloff)))
        self._bindings: dict[int, MeshBinding] = {}

    def rebind(self, branch: int, points: Tensor) -> MeshBinding:
        self._bindings[branch] = bind_to_mesh(points, self.vertices, self.triangles, float(self.falloff))
        return self._bindings[branch]

    def offsets(self, branch: int, points: Tensor, codes: Tensor) -> Tensor:
        """[B, K] codes -> [B, N, 3] offsets of the branch's points [N, 3] (bound on first use)."""
        binding = self._bindings.get(branch)
        if binding is None or len(binding) != len(points):
            binding = self.rebind(branch, points)
        return binding.skin(self.basis.decode(codes))


def has_tracked_faces(ds: Dataset) -> bool:
    """Whether the dataset carries mediapipe's 478-point face and per-frame landmarks."""
    face = ds.face_geometry()
    return face is not None and len(face) == N_LANDMARKS and ds.landmarks(0) is not None


def tracked_landmarks(ds: Dataset) -> np.ndarray:
    """[len(ds), 478, 3] what the dataset's expressions are read from (memory-mapped): the
    landmarks in the head frame where capture has them (rigs: triangulated, one shape per
    timestep whichever camera a frame is from), else the per-frame tracked ones."""
    return np.load(ds.root / ds.meta.get("landmarks_3d", ds.meta["landmarks"]), mmap_mode="r")


def fit_rig(ds: Dataset, train_ids: list[int], components: int, falloff: float,
            upper: int = 0) -> tuple[MotionRig, Tensor]:
    """The face mesh rig of a dataset (its canonical face, triangles, and the motion basis
    of `components` codes fitted on the training frames' tracked lower-face motion, then
    `upper` of their upper face's), and every frame's tracked codes [len(ds), K] (as
    tracked_motion gives them)."""
    canonical = ds.face_geometry().numpy()
    offsets = tracked_offsets(tracked_landmarks(ds), canonical, list(RIGID))
    basis = MotionBasis.fit(offsets[train_ids], canonical, components, upper)
    rig = MotionRig(basis, torch.from_numpy(canonical), torch.tensor(face_triangles()), falloff)
    return rig, basis.encode(torch.from_numpy(offsets)).float()


def tracked_motion(ds: Dataset, rig: MotionRig) -> torch.Tensor:
    """[len(ds), K] each frame's tracked motion codes."""
    vertices = rig.vertices.cpu().numpy()  # host: the landmark fit runs in numpy
    offsets = tracked_offsets(tracked_landmarks(ds), vertices, list(RIGID))
    return rig.basis.encode(torch.from_numpy(offsets)).float()


def tracked_motion_rows(ds: Dataset, rig: MotionRig) -> Tensor:
    """[rows of ds.features, K] each timestep's tracked motion codes (rows a dataset frame
    shows; zeros elsewhere), on ds.device: a trained avatar's expression oracle."""
    per_frame = tracked_motion(ds, rig).to(ds.device)
    rows = len(ds.features["mel"]) if ds.has_speech else 1 + max(int(f["frame_index"]) for f in ds.frames)
    out = torch.zeros(rows, per_frame.shape[1], device=ds.device)
    out[[int(f["frame_index"]) for f in ds.frames]] = per_frame
    return out


def fit_speech_to_motion(net: MotionNet, rig: MotionRig, ds: Dataset, train_ids: list[int], motion: Tensor,
                         mel: Tensor, visemes: Tensor, out: Path, progress: bool, *, steps: int, lr: float,
                         noise: float, velocity_weight: float, gap_weight: float, seed: int) -> None:
    """The speech-to-motion stage of a speech-driven avatar (on the host): `net` fitted to
    the training frames' tracked codes (motion [len(ds), K]) from the clip's speech (mel,
    visemes), its lips' closed gap set from the subject's own and its range calibrated out
    of sample (fit_motion_stage); logged to OUT/motion.json. Codes past the net's `spoken`
    ones are not speech's: their targets are zero, as its output is."""
    from tqdm import tqdm

    rows = torch.tensor([int(ds.frames[i]["frame_index"]) for i in train_ids])
    targets = motion[train_ids].clone()
    targets[:, net.spoken:] = 0
    opening = mouth_opening(np.stack([ds.landmarks(i) for i in train_ids]))
    net.set_closed_mouth(rig.basis, motion[train_ids], opening)
    bar = tqdm(total=steps, desc="speech -> motion", unit="it", disable=not progress, file=sys.stderr,
               dynamic_ncols=True)
    t0 = time.perf_counter()
    result = fit_motion_stage(net, mel, visemes, targets, rows, steps, lr=lr, noise=noise,
                              velocity_weight=velocity_weight, gap_weight=gap_weight, seed=seed,
                              progress=lambda step, loss: (bar.update(1),
                                                           bar.set_postfix(loss=f"{loss:.4f}", refresh=False)))
    bar.close()
    write_json(out / "motion.json", {**result, "seconds": time.perf_counter() - t0,
                                     "frames": len(rows), "codes": motion.shape[1]})
