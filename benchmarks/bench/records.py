"""Per-episode records of a suite, written atomically, one pair of files per method:

- `records/<method>.jsonl`: one line per seed and held-out prompt (its `seed`, prompt, response, RM
  reward, gold, diversity, coherence, costs, and the method's own extras such as the proxy's
  rejections), seeds in ascending order;
- `records/<method>.json`: the method's settings, the suite fingerprint it was run under, its `seeds`,
  and per seed (`runs`) what it cost: wall time, training time, trainable parameters, peak memory,
  the processes that generated it (`processes`: more than 1 under `accelerate launch`, whose records
  equal one process's), and the method's info (e.g. the proxy's run directory).

Records format 2 (`records_format`) adds the seeds. Format 1 (before seeds: no `records_format`, no
`seed` per episode) is read as one run with seed 0 (what every shipped suite ran it with:
bench.seed = train.seed = rrhf.seed = 0); a newer format is refused with the fix.

The leaderboard is computed from these files alone (`benchmarks.bench.leaderboard`), so it can be
rebuilt, and a new method's row added, without rerunning the others.

Every file is written atomically (`llm_envs.io`), and writers and readers of one suite folder take its
lock (`results_lock`), so two processes writing the same method's records never interleave their
pair of files and a reader never sees one method's episodes with another run's meta.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Sequence

from filelock import FileLock

from llm_envs.io import atomic_write_text

RECORDS_DIR = "records"
LOCK_FILE = ".lock"
RECORDS_FORMAT = 2
RUN_KEYS = ("generate_seconds", "train_seconds", "trainable_params", "peak_memory_mb", "info")  # per seed


def results_lock(suite_dir: Path) -> FileLock:
    """The suite folder's lock (re-entrant in one process); hold it while writing or reading records."""
    suite_dir.mkdir(parents=True, exist_ok=True)
    return FileLock(str(suite_dir / LOCK_FILE))


def fingerprint(**settings: Any) -> str:
    """A short hash of what makes two methods' records comparable (prompts, LM, RM, budget, seed)."""
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def write_method_records(suite_dir: Path, name: str, episodes: Sequence[dict[str, Any]], meta: dict[str, Any]) -> None:
    """Replace a method's records (episodes first, then the meta that vouches for them)."""
    folder = suite_dir / RECORDS_DIR
    meta = {"records_format": RECORDS_FORMAT, **meta, "episodes": len(episodes)}
    with results_lock(suite_dir):
        atomic_write_text(folder / f"{name}.jsonl", "".join(json.dumps(e) + "\n" for e in episodes))
        atomic_write_text(folder / f"{name}.json", json.dumps(meta, indent=2))


def read_method_records(suite_dir: Path, name: str) -> tuple[list[dict[str, Any]], dict[str, Any]] | None:
    """(episodes, meta) of a method, or None when it has not been run (or its run did not finish)."""
    folder = suite_dir / RECORDS_DIR
    meta_path, episodes_path = folder / f"{name}.json", folder / f"{name}.jsonl"
    if not meta_path.is_file() or not episodes_path.is_file():
        return None
    with results_lock(suite_dir):  # the pair as one writer left it
        try:
            meta = json.loads(meta_path.read_text())
            episodes = [json.loads(line) for line in episodes_path.read_text().splitlines() if line.strip()]
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"the records of {name!r} in {folder} are damaged ({error}); rerun the method "
                             f"(llm-envs bench --methods {name}).") from error
    if len(episodes) != meta.get("episodes"):
        raise ValueError(f"{episodes_path} holds {len(episodes)} episodes but {meta_path} says {meta.get('episodes')}: "
                         f"the records are damaged; rerun the method (llm-envs bench --methods {name}).")
    return _upgraded(meta_path, name, episodes, meta)


def _upgraded(path: Path, name: str, episodes: list[dict[str, Any]], meta: dict[str, Any]
              ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Records in the current format: format 1 becomes one run with seed 0 (see the module docstring)."""
    version = meta.get("records_format", 1)
    if version > RECORDS_FORMAT:
        raise ValueError(f"{path} is in records format {version}, newer than this llm_envs reads ({RECORDS_FORMAT}); "
                         f"upgrade llm_envs or rerun the method (llm-envs bench --methods {name}).")
    if version == 1:
        episodes = [{**e, "seed": 0} for e in episodes]
        meta = {**meta, "records_format": RECORDS_FORMAT, "seeds": [0],
                "runs": [{"seed": 0, **{k: meta.get(k) for k in RUN_KEYS}}]}
    return episodes, meta
