"""Provenance shared by every benchmark's result files: commit, library versions, hardware."""

from __future__ import annotations

import os
import platform
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

LIBRARIES = ("torch", "transformers", "gymnasium", "stable-baselines3", "sb3-contrib", "numpy", "accelerate",
             "tokenizers", "wandb")


def _git_dirs(root: Path) -> tuple[Path, Path] | None:
    """(this checkout's git dir, the repository's common dir): `.git` is a folder in a clone and a
    `gitdir: ...` file in a worktree, whose refs live in the main repository's folder."""
    git = root / ".git"
    if git.is_dir():
        return git, git
    if not git.is_file():
        return None
    gitdir = Path(git.read_text().split("gitdir:", 1)[1].strip())
    common = gitdir / (gitdir / "commondir").read_text().strip() if (gitdir / "commondir").is_file() else gitdir
    return gitdir, common.resolve()


def git_commit() -> str | None:
    """The checked-out commit, read from the git metadata (no git process); None outside a checkout."""
    try:
        dirs = _git_dirs(Path(__file__).resolve().parents[1])
        if dirs is None:
            return None
        gitdir, common = dirs
        head = (gitdir / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head
        ref = head[5:]
        for folder in (gitdir, common):
            if (folder / ref).exists():
                return (folder / ref).read_text().strip()
        packed = (common / "packed-refs").read_text().splitlines()
        return next((line.split()[0] for line in packed if line.endswith(ref)), None)
    except (OSError, IndexError):
        return None


def library_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def hardware() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"machine": platform.machine(), "system": platform.system(),
                            "processor": platform.processor() or None, "cpu_count": os.cpu_count(),
                            "torch_threads": torch.get_num_threads(), "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def provenance(**extra: Any) -> dict[str, Any]:
    """Everything a reader needs to reproduce a result file; `extra` adds seeds and the like."""
    command = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])  # the program's name, not this machine's path
    return {"git_commit": git_commit(), "command": command,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "libraries": library_versions(),
            "hardware": hardware(), **extra}
