"""Motion- and eye-driven residual deformation of the canonical Gaussians (TalkingGaussian
style). The mouth's motion itself reaches the Gaussians through the face mesh
(recon/motion.py); this head learns what the mesh does not carry: rotations, scales, and
position corrections where points sit off the mesh.

Contract (shared with the hash-grid radiance-field backend of a later issue):

    DeformationHead(inputs: DeformInputs) -> DeformOutputs
      inputs.xyz      [N, 3]        canonical positions (head frame, metres)
      inputs.motion   [B, K]        motion codes of B frames (recon/motion.py)
      inputs.eye      [B, 1]        eye openness in [0, 1]
      outputs.d_xyz   [B, N, 3]     position offsets
      outputs.d_rot   [B, N, 4]     quaternion offsets (added to wxyz before normalising)
      outputs.d_scale [B, N, 3]     log-scale offsets
      outputs.motion_attention [B, N, 1]  how much the motion drives each point (inspectable)

The face branch predicts all three offsets from motion and eye; the inside-mouth branch
(`motion_only=True`) predicts positions from motion alone. Output layers start at zero, so
training starts from the identity deformation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class SpatialEncoding(nn.Module):
    """Interface: positions [N, 3] -> features [N, out_dim]. A faster kernel (e.g. a
    tiny-cuda-nn hash grid) plugs in by subclassing and keeping `out_dim`."""

    out_dim: int


class TriPlaneEncoding(SpatialEncoding):
    """Multi-resolution tri-plane features (ER-NeRF): the xy, yz and xz planes are sampled
    bilinearly at several resolutions and concatenated.

    Args:
        bound: half-extent of the encoded cube; positions are divided by it.
        resolutions: plane resolutions, coarse to fine.
        channels: features per plane and resolution.
    """

    def __init__(self, bound: float = 0.15, resolutions: tuple[int, ...] = (16, 32, 64), channels: int = 4):
        super().__init__()
        self.bound = bound
        self.planes = nn.ParameterList(
            [nn.Parameter(1e-1 * torch.randn(3, channels, r, r)) for r in resolutions]
        )
        self.out_dim = 3 * channels * len(resolutions)

    def forward(self, xyz: Tensor) -> Tensor:
        p = (xyz / self.bound).clamp(-1, 1)
        coords = torch.stack([p[:, [0, 1]], p[:, [1, 2]], p[:, [0, 2]]])  # [3, N, 2]
        feats = []
        for planes in self.planes:
            s = F.grid_sample(planes, coords[:, None], mode="bilinear", align_corners=True)  # [3, C, 1, N]
            feats.append(s[:, :, 0].permute(2, 0, 1).reshape(xyz.shape[0], -1))
        return torch.cat(feats, dim=-1)


@dataclass
class DeformInputs:
    xyz: Tensor  # [N, 3]
    motion: Tensor  # [B, K]
    eye: Tensor  # [B, 1]


@dataclass
class DeformOutputs:
    d_xyz: Tensor  # [B, N, 3]
    d_rot: Tensor  # [B, N, 4]
    d_scale: Tensor  # [B, N, 3]
    motion_attention: Tensor  # [B, N, 1]


def _mlp(d_in: int, width: int, d_out: int) -> nn.Sequential:
    net = nn.Sequential(nn.Linear(d_in, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, d_out))
    nn.init.zeros_(net[-1].weight)
    nn.init.zeros_(net[-1].bias)  # identity deformation at the start
    return net


class DeformationHead(nn.Module):
    """One branch's deformation network. See the module docstring for the contract."""

    def __init__(self, motion_only: bool = False, encoding: SpatialEncoding | None = None, motion_dim: int = 16,
                 width: int = 64):
        super().__init__()
        self.motion_only = motion_only
        self.encoding = encoding or TriPlaneEncoding()
        f = self.encoding.out_dim
        # Region attention: each point decides how much of the motion (and eye) code it takes.
        self.motion_gate = nn.Sequential(nn.Linear(f, 32), nn.ReLU(), nn.Linear(32, 1))
        self.eye_gate = None if motion_only else nn.Sequential(nn.Linear(f, 32), nn.ReLU(), nn.Linear(32, 1))
        d_cond = motion_dim + (0 if motion_only else 1)
        self.out = _mlp(f + d_cond, width, 3 if motion_only else 10)

    def _point_features(self, xyz: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """Per-point terms that depend on the canonical positions only: the first MLP
        layer's share of the encoding [N, width], and the region-attention gates [N, 1]
        (motion) and [N, 1] | None (eye). Inference (rendering, the viewer) computes them
        once per set of positions."""
        key = (xyz.data_ptr(), xyz._version, tuple(xyz.shape))
        cached = getattr(self, "_cache", None)
        if not torch.is_grad_enabled() and not self.training and cached is not None and cached[0] == key:
            return cached[1]
        feats = self.encoding(xyz)
        first = self.out[0]
        f = feats.shape[1]
        spatial = F.linear(feats, first.weight[:, :f], first.bias)
        att_a = torch.sigmoid(self.motion_gate(feats))
        att_e = None if self.motion_only else torch.sigmoid(self.eye_gate(feats))
        out = (spatial, att_a, att_e)
        self._cache = (key, out) if not torch.is_grad_enabled() and not self.training else None
        return out

    def forward(self, inputs: DeformInputs) -> DeformOutputs:
        spatial, gate_m, gate_e = self._point_features(inputs.xyz)  # [N, width], [N, 1], [N, 1]
        m = inputs.motion  # [B, K]
        B, N = m.shape[0], spatial.shape[0]
        att_m = gate_m[None].expand(B, N, 1)
        cond = [att_m * m[:, None]]
        if not self.motion_only:
            cond.append(gate_e[None].expand(B, N, 1) * inputs.eye[:, None])
        # The first layer on cat([encoding, conditioning]), split in its two shares.
        w_cond = self.out[0].weight[:, self.out[0].in_features - sum(c.shape[-1] for c in cond):]
        y = self.out[1:](spatial[None] + torch.cat(cond, dim=-1) @ w_cond.T)
        zeros = y.new_zeros(B, N, 1)
        if self.motion_only:
            d_xyz, d_rot, d_scale = y, torch.cat([zeros] * 4, -1), torch.cat([zeros] * 3, -1)
        else:
            d_xyz, d_rot, d_scale = y[..., :3], y[..., 3:7], y[..., 7:10]
        return DeformOutputs(d_xyz=d_xyz, d_rot=d_rot, d_scale=d_scale, motion_attention=att_m)
