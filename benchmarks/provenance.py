"""Provenance shared by every benchmark's result files."""

from __future__ import annotations

from pathlib import Path


def git_commit() -> str | None:
    """The checked-out commit, read from .git (no git process)."""
    git = Path(__file__).resolve().parents[1] / ".git"
    try:
        head = (git / "HEAD").read_text().strip()
        if head.startswith("ref: "):
            ref = head[5:]
            path = git / ref
            if path.exists():
                return path.read_text().strip()
            packed = (git / "packed-refs").read_text().splitlines()
            return next((line.split()[0] for line in packed if line.endswith(ref)), None)
        return head
    except OSError:
        return None
