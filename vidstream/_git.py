"""The commit a record names (a validation entry, a benchmark result)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent


def head_commit(mark_dirty: bool = False) -> str | None:
    """``VIDSTREAM_COMMIT`` where set (a copy of the tree without .git, as a lent GPU machine
    gets, names its commit there), else ``git rev-parse HEAD`` of the source tree, with "+dirty"
    (when ``mark_dirty``) if tracked files have uncommitted changes; None where neither tells."""
    if os.environ.get("VIDSTREAM_COMMIT"):
        return os.environ["VIDSTREAM_COMMIT"]

    def git(*args: str):
        return subprocess.run(["git", *args], cwd=_ROOT, capture_output=True, text=True, timeout=30)

    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return None
        dirty = mark_dirty and bool(git("status", "--porcelain", "--untracked-files=no").stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty else "")
