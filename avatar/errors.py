"""User-facing errors: each names the file, the problem and, where known, the remedy.

The CLI prints them without a traceback and exits with status 1.
"""

from __future__ import annotations

from pathlib import Path


class AvatarError(RuntimeError):
    """A problem with the user's input or environment, explained in one message."""

    def __init__(self, path: str | Path | None, problem: str, remedy: str | None = None):
        self.path = None if path is None else Path(path)
        self.problem = problem
        self.remedy = remedy
        where = f"{self.path}: " if self.path is not None else ""
        super().__init__(where + problem + (f"\n  remedy: {remedy}" if remedy else ""))
