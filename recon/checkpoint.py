"""Avatar checkpoints: safetensors (no pickle execution) with JSON metadata.

Format `avatar-checkpoint/1`: one `.safetensors` file; tensors under dotted names
(`gaussians.means`, `deform.*`, `optim.*`), and the metadata entry `avatar` holding a JSON
object with at least {"format", "step", "config"}. Written to a temp file and renamed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load, load_file, save

from avatar.errors import AvatarError
from avatar.io import atomic_path

CHECKPOINT_FORMAT = "avatar-checkpoint/1"


def save_checkpoint(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
    for name, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise AvatarError(path, f"refusing to save a checkpoint with NaN/Inf in {name}",
                              "training diverged; resume from the previous checkpoint with a lower learning rate")
    with atomic_path(path, durable=True) as tmp:
        tmp.write_bytes(encode_state(tensors, meta))
    return Path(path)


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-1 of every tensor's name, dtype, shape and bytes: safetensors has no checksum,
    and a flipped bit in the data would otherwise load as a valid, wrong avatar."""
    h = hashlib.sha1()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()  # host: hashed there (GPU replicas too, recon/distributed.py)
        h.update(f"{name}|{t.dtype}|{list(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())  # host: t is a host copy
    return h.hexdigest()


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Load tensors and metadata; raises AvatarError if missing, corrupt, foreign or NaN."""
    path = Path(path)
    if not path.is_file():
        raise AvatarError(path, "checkpoint not found")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("avatar")
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise AvatarError(path, f"is not a readable checkpoint ({exc})", "the file is corrupt or truncated") from exc
    return tensors, checked_state(path, tensors, raw)


def encode_state(tensors: dict[str, torch.Tensor], meta: dict) -> bytes:
    """A checkpoint's bytes, in memory (what save_checkpoint writes): how training processes
    hand rank 0's state to the others (recon/distributed.py)."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    meta = {"format": CHECKPOINT_FORMAT, **meta, "tensors_sha1": tensors_digest(tensors)}
    return save(tensors, metadata={"avatar": json.dumps(meta)})


def decode_state(data: bytes, where: str) -> tuple[dict[str, torch.Tensor], dict]:
    """encode_state's tensors and metadata, checked as load_checkpoint checks a file, except
    for NaN/Inf: a state in the middle of a step may hold them by design, such as a radiance
    field's occupancy grid before its first refresh (`where` names the source in errors)."""
    try:
        header = json.loads(data[8: 8 + int.from_bytes(data[:8], "little")])  # safetensors: u64 size, JSON
        tensors = load(data)
    except (SafetensorError, ValueError) as exc:
        raise AvatarError(where, f"is not a readable state ({exc})") from exc
    return tensors, checked_state(where, tensors, header.get("__metadata__", {}).get("avatar"), finite=False)


def checked_state(where: str | Path, tensors: dict[str, torch.Tensor], raw: str | None, finite: bool = True) -> dict:
    """The metadata of a checkpoint's `tensors` from its raw JSON; AvatarError naming
    `where` when it is foreign, damaged or (`finite`) holds NaN/Inf."""
    try:
        meta = json.loads(raw) if raw else {}
    except json.JSONDecodeError as exc:
        raise AvatarError(where, f"has unreadable metadata ({exc})") from exc
    if not isinstance(meta, dict):
        raise AvatarError(where, "has metadata that is not a JSON object", "the file is damaged or foreign")
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise AvatarError(where, f"is not an avatar checkpoint (format {meta.get('format')!r})")
    for name, t in tensors.items():
        if finite and t.is_floating_point() and not torch.isfinite(t).all():
            raise AvatarError(where, f"holds NaN/Inf values in {name}", "resume from an earlier checkpoint")
    if "tensors_sha1" in meta and meta["tensors_sha1"] != tensors_digest(tensors):
        raise AvatarError(where, "is damaged: its tensors do not match the checksum written with them",
                          "resume from an earlier copy, or retrain")
    return meta
