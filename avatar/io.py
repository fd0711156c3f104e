"""Atomic file output: nothing is ever half-written (temp file, then rename)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | Path, durable: bool = False) -> Iterator[Path]:
    """Yield a temp path in the same folder; rename it onto `path` if the block succeeds.
    durable: fsync the file before the rename and the folder after it, so that a power
    cut leaves the old or the new file, never an empty one (checkpoints)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual mode
        if durable:
            _fsync(tmp_path)
        os.replace(tmp_path, path)
        if durable:
            _fsync(path.parent)
    finally:
        tmp_path.unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replaced_path(out: Path) -> Path:
    """Where `publish_folder` keeps the folder it replaces until the new one is in place (a
    hidden name of its own, so no folder of the user's is ever taken for it)."""
    return out.with_name(f".{out.name}.replaced")


def publish_folder(work: Path, out: Path) -> None:
    """Put the finished folder `work` at `out`, replacing any folder there: `out` is renamed
    to `replaced_path(out)`, `work` to `out`, then the replaced folder is removed. A kill
    between the two renames leaves no `out` but both folders intact; `recover_folder`
    (called by every publisher before it starts) finishes the swap or puts the old folder
    back."""
    work, out = Path(work), Path(out)
    aside = replaced_path(out)
    if aside.exists():  # a previous publish was cut short after its swap; `out` is the newer
        shutil.rmtree(aside)
    if out.exists():
        out.rename(aside)
    work.rename(out)
    _fsync(out.parent)
    shutil.rmtree(aside, ignore_errors=True)


def recover_folder(out: Path, work: Path, complete: Callable[[Path], bool]) -> None:
    """Repair what a killed `publish_folder(work, out)` left: with `out` in place, drop a
    leftover replaced folder; without it, move the finished `work` in (when
    `complete(work)`), else put the replaced folder back."""
    out, work = Path(out), Path(work)
    aside = replaced_path(out)
    if out.exists():
        shutil.rmtree(aside, ignore_errors=True)
        return
    if work.is_dir() and complete(work):
        work.rename(out)
        shutil.rmtree(aside, ignore_errors=True)
    elif aside.exists():
        aside.rename(out)
    else:
        return
    _fsync(out.parent)


def write_json(path: str | Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def file_digest(path: str | Path) -> str:
    """A short content hash of a file (SHA-1, 16 hex digits): the identity of an input a
    later run may reuse work from."""
    h = hashlib.sha1()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()[:16]
