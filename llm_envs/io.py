"""Writing files so that nothing already written is lost or half-replaced.

Every file llm_envs writes for a user (records, leaderboards, configs, caches, the world's and
RRHF's model folders) goes through these:

- `atomic_write_text` / `atomic_write_bytes` / `atomic_write_json`: write a temp file with a
  *unique* name in the target's directory (two processes never share one), flush and fsync it,
  then `os.replace` it over the target. A reader sees the old file or the whole new one, never
  a torn or mixed one; a crash leaves the old file and at worst a stray `.name.*.tmp`.
- `atomic_replace_dir`: fill a unique staging directory beside the target through a callback,
  then swap it in; on any failure the staging directory is removed and the target is untouched.
- `append_lines`: append whole lines with one write, flushed and fsynced (logs, JSONL caches
  that resume by appending).

`default_cache_root` says where llm_envs keeps what it builds once and reuses (the embedded
world, dequantised GGUF models). It lives here, in the lowest layer, so the model loaders and
the world read the same root without importing each other.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable


def default_cache_root() -> Path:
    """`$LLM_ENVS_CACHE`, else `$XDG_CACHE_HOME/llm_envs`, else `~/.cache/llm_envs`."""
    if os.environ.get("LLM_ENVS_CACHE"):
        return Path(os.environ["LLM_ENVS_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "llm_envs"


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Replace `path` with `data` in one step (unique temp file, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; results are shared like any other file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Replace `path` with `text` (UTF-8) in one step."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, data: Any, *, indent: int | None = 2) -> None:
    """Replace `path` with `data` as JSON in one step."""
    atomic_write_text(path, json.dumps(data, indent=indent, default=str))


def atomic_replace_dir(target: str | os.PathLike, fill: Callable[[Path], None]) -> Path:
    """Call `fill(staging_dir)`, then swap the staging directory in for `target`.

    The staging directory has a unique name beside `target` (same filesystem, so the final
    rename is atomic). An existing `target` is removed only once the new one is complete.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; caches and runs are shared like any other
    try:
        fill(staging)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def append_lines(path: str | os.PathLike, lines: Iterable[str]) -> None:
    """Append `lines` (each gets a newline) with one write, flushed and fsynced."""
    text = "".join(line + "\n" for line in lines)
    if not text:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
