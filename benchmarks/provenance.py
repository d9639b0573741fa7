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
