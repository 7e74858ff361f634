"""The code version a benchmark records: the git commit, '+dirty' when ``src`` has uncommitted
changes (read it once at start, so commits made while a run goes on do not relabel it)."""

from __future__ import annotations

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def code_version(paths: tuple[str, ...] = ("src",)) -> str:
    """``paths`` are relative to the repository root."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=REPO, check=True).stdout.strip() or "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--", *paths],
                               capture_output=True, text=True, cwd=REPO).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")
