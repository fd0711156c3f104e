"""The talking avatar: persistent canonical Gaussians in two head branches, moved by the face
mesh's motion (recon/motion.py) and each branch's residual deformation head, rendered
mouth first, face over it, both over torso and background; and, once trained, a third
branch for the neck and shoulders (recon/torso.py).

    speech --MotionNet--> motion codes [K] per frame (training: the frame's tracked motion)
    canonical Gaussians (face | mouth) --mesh skinning + deform(motion, eye)--> per-frame Gaussians
    mouth layer = rasterize(mouth branch)          (inside-mouth: teeth, tongue, cavity)
    face layer  = rasterize(face branch)
    image = face + (1 - a_face) * (mouth + (1 - a_mouth) * under)

`under` is what lies behind the head: during the head's training the frame's own pixels
outside its head mask and the background plate inside it (dataset.behind_head); with the
torso branch, its layer over the plate (method.torso_under). recon/render.py chooses per view.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from recon.raster import rasterize

from .deform import DeformationHead, DeformInputs, TriPlaneEncoding
from .gaussians import FACE, MOUTH, Gaussians
from .method import coverage
from .motion import MotionNet, MotionRig

if TYPE_CHECKING:
    from .torso import TorsoModel

HEAD_BOUND_M = 0.25
"""Half-extent of the cube the deformation heads encode (head frame, metres)."""


@dataclass
class Layer:
    """One branch rendered into one camera. H x W pixels."""

    rgb: Tensor  # [H, W, 3] premultiplied by alpha (black behind)
    alpha: Tensor  # [H, W, 1]
    depth: Tensor  # [H, W, 1] expected camera z
    means2d: Tensor  # [1, n, 2] the rasterizer's projected centres (retain_grad() it for densification)
    radii: Tensor  # [n, 2]


@dataclass
class Frame:
    """The composite of both layers over what lies behind the head."""

    image: Tensor  # [H, W, 3]
    alpha: Tensor  # [H, W, 1] head coverage: 1 - (1 - a_face)(1 - a_mouth)
    face: Layer
    mouth: Layer
    deformation: Tensor  # [] mean squared offset (positions in cm, rotations, log-scales); 0 if none


def concat(parts: list[Gaussians]) -> Gaussians:
    """Several sets of Gaussians as one (in order); SH bands a set lacks are zero."""
    K = max(p.sh.shape[1] for p in parts)
    sh = torch.cat([torch.cat([p.sh, p.sh.new_zeros(len(p), K - p.sh.shape[1], 3)], 1) for p in parts])
    return Gaussians(*(torch.cat([getattr(p, f) for p in parts]) for f in ("means", "quats", "log_scales",
                                                                            "opacity_logits")),
                     sh, torch.cat([p.branch for p in parts]))


def composite(face: Layer, mouth: Layer, under: Tensor) -> tuple[Tensor, Tensor]:
    """Mouth layer first, face layer over it, both over `under` [H, W, 3].
    Returns the image [H, W, 3] and the head coverage [H, W, 1]."""
    image = face.rgb + (1 - face.alpha) * (mouth.rgb + (1 - mouth.alpha) * under)
    return image, coverage(face.alpha, mouth.alpha)


class BranchParams(nn.Module):
    """One branch's canonical Gaussians, as 3DGS optimises them. Each branch is its own set
    of tensors, so stages can train one branch while the other stays exactly as it is, and
    densification adds and prunes points within a branch."""

    NAMES = ("means", "quats", "log_scales", "opacity_logits", "sh_dc", "sh_rest")

    def __init__(self, g: Gaussians):
        super().__init__()
        self.means = nn.Parameter(g.means.clone())  # [n, 3]
        self.quats = nn.Parameter(g.quats.clone())  # [n, 4]
        self.log_scales = nn.Parameter(g.log_scales.clone())  # [n, 3]
        self.opacity_logits = nn.Parameter(g.opacity_logits.clone())  # [n]
        self.sh_dc = nn.Parameter(g.sh[:, :1].clone())  # [n, 1, 3]
        self.sh_rest = nn.Parameter(g.sh[:, 1:].clone())  # [n, K - 1, 3]

    def __len__(self) -> int:
        return self.means.shape[0]


class AvatarModel(nn.Module):
    """The two branches' canonical Gaussians, the speech-to-motion network, the face mesh
    rig that carries motion onto the Gaussians, and the residual deformation heads.

    rig: None for datasets without tracked face-mesh landmarks (ER-NeRF imports); the
    motion codes are then a latent learned through the renders alone. spoken: the codes
    speech drives (MotionNet; default: the rig's, or all).
    """

    torso: "TorsoModel | None"
    """The neck-and-shoulders branch (recon/torso.py), None until the torso stage starts."""

    def __init__(self, g: Gaussians, rig: MotionRig | None = None, motion_dim: int = 16, visemes: int = 15,
                 window: int = 16, spoken: int | None = None):
        super().__init__()
        self.torso = None
        self.face = BranchParams(g.select(g.branch == FACE))
        self.mouth = BranchParams(g.select(g.branch == MOUTH))
        motion_dim = rig.basis.dim if rig is not None else motion_dim
        self.rig = rig
        spoken = spoken if spoken is not None else rig.basis.spoken if rig is not None else None
        self.motion_net = MotionNet(codes=motion_dim, visemes=visemes, window=window, spoken=spoken)
        self.face_deform = DeformationHead(motion_only=False, encoding=TriPlaneEncoding(bound=HEAD_BOUND_M),
                                           motion_dim=motion_dim)
        self.mouth_deform = DeformationHead(motion_only=True, encoding=TriPlaneEncoding(bound=HEAD_BOUND_M),
                                            motion_dim=motion_dim)

    def rebind(self) -> None:
        """Bind both branches' current canonical points to the face mesh (see MotionRig)."""
        if self.rig is not None:
            for b in (FACE, MOUTH):
                self.rig.rebind(b, self.branch(b).means)

    def __len__(self) -> int:
        """Gaussians of the head (face and mouth branches; the torso's are counted apart)."""
        return len(self.face) + len(self.mouth)

    @property
    def sh_degree(self) -> int:
        return int(round((1 + self.face.sh_rest.shape[1]) ** 0.5)) - 1

    def branch(self, branch: int) -> BranchParams:
        return self.face if branch == FACE else self.mouth

    def gaussians(self, pose: list[Gaussians] | None = None, *, torso: bool = True,
                  body: Tensor | None = None) -> Gaussians:
        """Every branch's Gaussians as one detached :class:`Gaussians`: the head canonical
        (pose None) or posed (its face and mouth Gaussians of one frame), then (when `torso`
        and the avatar has one) the torso under body motion `body` [4, 4] (None: in its
        reference relation to the head, as novel views show it)."""
        with torch.no_grad():  # concatenated copies, cut from the parameters
            parts = list(pose) if pose is not None else [self.deformed(b, None, None)[0] for b in (FACE, MOUTH)]
            if torso and self.torso is not None:
                parts.append(self.torso.deformed(body)[0])
            return concat(parts)

    def torso_layer(self, viewmat: Tensor, K: Tensor, size: int | tuple[int, int], body: Tensor | None,
                    sh_degree: int | None = None, backend: str = "auto") -> Layer | None:
        """The torso rendered into one camera under body motion `body` [4, 4] (None: the
        reference relation, for novel views); None for an avatar without a torso."""
        if self.torso is None:
            return None
        g, _ = self.torso.deformed(body)
        return self.render_layer(g, viewmat, K, size, self.sh_degree if sh_degree is None else sh_degree, backend)

    def deformed(self, branch: int, motion: Tensor | None, eye: Tensor | None, *, frozen: bool = False,
                 mouth_scale: float = 1.0) -> tuple[Gaussians, Tensor]:
        """The branch's Gaussians for one frame (differentiable).

        motion: [K] motion codes, or None for the canonical (undeformed) state. eye: [1]
        eye openness. frozen: detach the canonical parameters (a stage that does not train
        this branch). mouth_scale multiplies the deformation (viewer's amplitude).
        Returns the frame's Gaussians and the mean squared residual offset (positions in cm).
        """
        frames, penalty = self.deformed_batch(branch, None if motion is None else motion[None],
                                              None if eye is None else eye.reshape(1, 1), frozen=frozen,
                                              mouth_scale=mouth_scale)
        return frames[0], penalty

    def deformed_batch(self, branch: int, motion: Tensor | None, eye: Tensor | None, *, frozen: bool = False,
                       mouth_scale: float = 1.0) -> tuple[list[Gaussians], Tensor]:
        """As :meth:`deformed` for B frames at once (one pass of the deformation head).

        motion: [B, K] or None; eye: [B, 1] or None. Returns B Gaussians (one if motion is
        None) and the mean squared residual offset over the batch.
        """
        p = self.branch(branch)
        get = (lambda t: t.detach()) if frozen else (lambda t: t)
        means, quats, log_scales = get(p.means), get(p.quats), get(p.log_scales)
        sh = torch.cat([get(p.sh_dc), get(p.sh_rest)], 1)
        label = torch.full((len(p),), branch, dtype=torch.uint8, device=means.device)

        def frame(m: Tensor, q: Tensor, s: Tensor) -> Gaussians:
            return Gaussians(m, q, s, get(p.opacity_logits), sh, label)

        if motion is None or not len(p):
            return [frame(means, quats, log_scales)] * (1 if motion is None else len(motion)), means.new_zeros(())
        head = self.face_deform if branch == FACE else self.mouth_deform
        B = motion.shape[0]
        motion = motion.to(means)
        eye_in = (eye if eye is not None else torch.ones(B, 1)).reshape(B, 1).to(means)
        out = head(DeformInputs(xyz=means.detach(), motion=motion, eye=eye_in))
        penalty = ((100 * out.d_xyz) ** 2).mean() + (out.d_rot**2).mean() + (out.d_scale**2).mean()
        d_xyz = out.d_xyz if self.rig is None else out.d_xyz + self.rig.offsets(branch, means, motion)
        if branch == FACE:
            return [frame(means + mouth_scale * d_xyz[k], quats + mouth_scale * out.d_rot[k],
                          log_scales + mouth_scale * out.d_scale[k]) for k in range(B)], penalty
        return [frame(means + mouth_scale * d_xyz[k], quats, log_scales) for k in range(B)], penalty

    def render_layer(self, g: Gaussians, viewmat: Tensor, K: Tensor, size: int | tuple[int, int], sh_degree: int,
                     backend: str = "auto") -> Layer:
        """Rasterize one branch's Gaussians; size is S (square) or (width, height)."""
        width, height = (size, size) if isinstance(size, int) else size
        means, quats, scales, opacities = g.activated()
        out = rasterize(means, quats, scales, opacities, g.sh, viewmat[None], K[None], width, height,
                        sh_degree=min(sh_degree, g.sh_degree), backend=backend)
        return Layer(rgb=out.image[0], alpha=out.alpha[0], depth=out.depth[0], means2d=out.means2d,
                     radii=out.radii[0])

    def render(self, viewmat: Tensor, K: Tensor, size: int | tuple[int, int], under: Tensor, motion: Tensor | None,
               eye: Tensor | None, *, deform: tuple[bool, bool] = (True, True),
               frozen: tuple[bool, bool] = (False, False), sh_degree: int | None = None,
               mouth_scale: float = 1.0, backend: str = "auto") -> Frame:
        """Render one frame.

        viewmat: [4, 4] world-to-camera (OpenCV); K: [3, 3]; size: S or (W, H); under: [H, W, 3] behind
        the head; motion: [K] motion codes; eye: [1]. deform / frozen: per
        (face, mouth) branch, whether its head moves it this frame, and whether its
        canonical parameters are held fixed (detached).
        """
        d = self.sh_degree if sh_degree is None else sh_degree
        layers, penalty = [], 0
        for k, b in enumerate((FACE, MOUTH)):
            g, pen = self.deformed(b, motion if deform[k] else None, eye, frozen=frozen[k], mouth_scale=mouth_scale)
            layers.append(self.render_layer(g, viewmat, K, size, d, backend))
            penalty = penalty + pen
        face, mouth = layers
        image, alpha = composite(face, mouth, under)
        return Frame(image=image, alpha=alpha, face=face, mouth=mouth, deformation=penalty)
