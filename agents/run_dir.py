"""A training run's directory, kept safe across interrupts and resumes.

- `claim_run_dir`: a run directory records the config that made it (`config.yaml`); resuming into it
  with a config that changes the model, the env, the task or the seed stops with the differing keys
  and the fix (a new `output_dir`, or `restart=True` / `--restart`, which moves the old run aside and
  never deletes it). Settings that do not change what is learned (total steps, logging, checkpoint
  and eval frequency, torch threads, the number of Ray env workers) may change between resumes.
- `AtomicCheckpoints`: SB3's `CheckpointCallback`, but every checkpoint is written to a unique temp
  file, fsynced and renamed, so a kill mid-save never leaves a truncated zip under a real name.
- `newest_loadable_checkpoint`: resume from the newest checkpoint that loads; broken ones are skipped
  with a message saying which and why.
- `AppendingCSV`: SB3's logger output as CSV that survives resumes (SB3's own opens its file with
  "w+" and truncates the earlier runs' rows): rows are appended, the header written once and widened
  (atomically) when new metrics appear.
"""

from __future__ import annotations

import csv
import io
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import yaml
from stable_baselines3.common.callbacks import CheckpointCallback
from stable_baselines3.common.logger import KVWriter

from llm_envs.config import ConfigError, read_yaml
from llm_envs.io import append_lines, atomic_write_bytes, atomic_write_text

CONFIG_FILE = "config.yaml"
# train: fields that do not change what a run learns, so a resume may change them.
RESUMABLE_FIELDS = ("total_timesteps", "eval_freq", "eval_episodes", "checkpoint_freq", "output_dir", "resume",
                    "wandb_mode", "wandb_project", "progress_bar", "torch_threads", "num_workers")


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(data, dict):
        return {prefix: data}
    flat: dict[str, Any] = {}
    for key, value in data.items():
        flat.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def config_differences(old: dict[str, Any], new: dict[str, Any], resumable: Sequence[str],
                       defaults: dict[str, Any] | None = None) -> list[str]:
    """Flat keys whose values differ between two run configs, ignoring the `resumable` ones and, with
    `defaults`, keys the old config lacks that the new one holds at their default (fields added to the
    config since the old run was made, which it ran under without knowing them)."""
    a, b, d = _flatten(old), _flatten(new), _flatten(defaults or {})
    added = {k for k in set(b) - set(a) if k in d and b[k] == d[k]}
    return sorted(k for k in set(a) | set(b)
                  if a.get(k) != b.get(k) and k.split(".")[-1] not in resumable and k not in added)


def claim_run_dir(run_dir: Path, config: dict[str, Any], *, restart: bool = False,
                  resumable: Sequence[str] = RESUMABLE_FIELDS, defaults: dict[str, Any] | None = None) -> Path | None:
    """Make `run_dir` this config's: refuse a resume under another config, or move the old run aside
    (`restart=True`); then record the config. Returns where an old run was moved, if it was. `defaults`
    (the config's defaults, same layout) lets a run made before a field existed resume at its default."""
    saved = run_dir / CONFIG_FILE
    moved = None
    if restart and run_dir.exists() and any(run_dir.iterdir()):
        moved = run_dir.with_name(f"{run_dir.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
        os.replace(run_dir, moved)
        print(f"moved the previous run aside to {moved}", file=sys.stderr)
    elif saved.is_file():
        old = read_yaml(saved) or {}
        changed = config_differences(old, config, resumable, defaults)
        if changed:
            shown = ", ".join(f"{k}: {_flatten(old).get(k)!r} -> {_flatten(config).get(k)!r}" for k in changed[:6])
            raise ConfigError(
                f"{run_dir} holds a run made with another config ({shown}{', ...' if len(changed) > 6 else ''}); "
                "resuming would mix two runs. Use a new output_dir, or restart (`llm-envs train --restart`, "
                "train(..., restart=True)) to move the old run aside."
            )
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(saved, yaml.safe_dump(config, sort_keys=False))
    return moved


class AtomicCheckpoints(CheckpointCallback):
    """`CheckpointCallback` whose saves are atomic (unique temp file, fsync, rename)."""

    def _on_step(self) -> bool:
        if self.n_calls % self.save_freq == 0:
            buffer = io.BytesIO()
            self.model.save(buffer)
            atomic_write_bytes(self._checkpoint_path(extension="zip"), buffer.getvalue())
        return True


def save_atomically(model: Any, path: Path) -> Path:
    """`model.save(path)` in one step: readers see the old file or the whole new one."""
    buffer = io.BytesIO()
    model.save(buffer)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def checkpoints(run_dir: Path, prefix: str = "proxy") -> list[Path]:
    """What a run can resume from, newest first: its final model (`<prefix>.zip`, written last), then
    its checkpoints by steps."""
    def steps(path: Path) -> int:
        try:
            return int(path.stem.split("_")[-2])
        except (IndexError, ValueError):
            return -1

    final = [run_dir / f"{prefix}.zip"] if (run_dir / f"{prefix}.zip").is_file() else []
    return final + sorted((run_dir / "checkpoints").glob(f"{prefix}_*_steps.zip"), key=steps, reverse=True)


def newest_loadable_checkpoint(run_dir: Path, load: Callable[[Path], Any]) -> tuple[Path, Any] | None:
    """(path, loaded model) of the newest checkpoint that loads; each one that does not is named on
    stderr with the reason and skipped (it stays on disk)."""
    for path in checkpoints(run_dir):
        try:
            return path, load(path)
        except Exception as error:  # a torn zip fails in zipfile, torch or SB3 with many error types
            reason = f"{type(error).__name__}: {error}".strip()
            print(f"skipping checkpoint {path}: it does not load ({reason[:200]})", file=sys.stderr)
    return None


class AppendingCSV(KVWriter):
    """SB3 logger output to a CSV file that resumes append to (header once, widened when keys appear)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.keys: list[str] = []
        if path.is_file() and path.stat().st_size:
            with open(path, newline="", encoding="utf-8") as f:
                self.keys = next(csv.reader(f), [])

    def write(self, key_values: dict[str, Any], key_excluded: dict[str, Any], step: int = 0) -> None:
        values = {k: v for k, v in key_values.items()
                  if not (key_excluded.get(k) and "csv" in key_excluded[k])}
        new = [k for k in values if k not in self.keys]
        if new or not self.path.is_file():
            self._widen(self.keys + sorted(new))
        row = io.StringIO()
        csv.writer(row, lineterminator="").writerow([self._cell(values.get(k)) for k in self.keys])
        append_lines(self.path, [row.getvalue()])

    @staticmethod
    def _cell(value: Any) -> Any:
        if value is None:
            return ""
        return value.item() if isinstance(value, np.generic) else value

    def _widen(self, keys: list[str]) -> None:
        """Rewrite the file with a wider header (earlier rows padded), atomically."""
        rows: list[list[str]] = []
        if self.path.is_file():
            with open(self.path, newline="", encoding="utf-8") as f:
                rows = list(csv.reader(f))[1:]
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(keys)
        writer.writerows(row + [""] * (len(keys) - len(row)) for row in rows)
        atomic_write_text(self.path, out.getvalue())
        self.keys = keys

    def close(self) -> None:
        pass
