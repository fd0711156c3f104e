"""Publishing a dataset folder: capture builds it in a work folder beside its destination
and moves it into place only when it is finished, so a kill never leaves half a dataset
where recon would read it."""

from __future__ import annotations

from pathlib import Path

from avatar.io import publish_folder, recover_folder


def work_folder(out: Path) -> Path:
    """Where a dataset is built before it is published at `out` (capture resumes from it)."""
    return out.with_name(out.name + ".partial")


def _finished(work: Path) -> bool:
    # transforms.json is written last, and the stage markers go just before publishing.
    return (work / "transforms.json").is_file() and not any(work.glob(".stage_*.json"))


def publish_dataset(out: Path) -> Path:
    """Move the finished work folder onto `out`, keeping the old dataset until the new one
    is in place (avatar.io.publish_folder)."""
    publish_folder(work_folder(out), out)
    return out


def recover_dataset(out: Path) -> None:
    """Finish or undo a publish that a kill cut short (called before any capture or import)."""
    recover_folder(out, work_folder(out), _finished)
