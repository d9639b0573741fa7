"""JSONL caches of the RRHF stages, written so that an interrupted run loses nothing.

- `append_jsonl` appends whole lines and fsyncs, so every line that was reported written is on disk.
- `read_jsonl` reads the valid prefix of a file: a line cut by a crash (no newline, bad JSON) and
  everything after it is not returned.
- `write_jsonl_atomic` replaces a file in one step (temp file in the same directory + `os.replace`),
  used to drop a torn tail before a stage resumes.
- `check_scored` validates the reference format `{"query", "responses", "scores"}`.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Iterable

from llm_envs.io import append_lines, atomic_write_text


def _dumps(record: dict[str, Any]) -> str:
    return json.dumps(record, ensure_ascii=False, allow_nan=False)


def append_jsonl(path: str | os.PathLike, records: Iterable[dict[str, Any]]) -> None:
    """Append records as lines (one write, flushed and fsynced)."""
    append_lines(path, (_dumps(r) for r in records))


def write_jsonl_atomic(path: str | os.PathLike, records: Iterable[dict[str, Any]]) -> None:
    """Write `path` so that readers see either the old file or the complete new one."""
    atomic_write_text(path, "".join(_dumps(record) + "\n" for record in records))


def read_jsonl(path: str | os.PathLike) -> tuple[list[dict[str, Any]], bool]:
    """The valid prefix of a JSONL file and whether the whole file was valid.

    A missing file reads as ([], True). Reading stops at the first line that is not a complete
    JSON object (a torn write) and reports the file as not clean.
    """
    path = Path(path)
    if not path.exists():
        return [], True
    records: list[dict[str, Any]] = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.endswith("\n"):
                return records, False
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                return records, False
            if not isinstance(record, dict):
                return records, False
            records.append(record)
    return records, True


def resume_jsonl(path: str | os.PathLike, queries: list[str], align: int = 1) -> list[dict[str, Any]]:
    """Records already in `path` that answer `queries[:n]` in order, for a stage to resume from.

    Keeps the longest valid prefix whose "query" fields match `queries`, cut down to a multiple of
    `align` (so resumed batches are the batches an uninterrupted run makes); if anything was dropped,
    the file is rewritten atomically to exactly that prefix.
    """
    records, clean = read_jsonl(path)
    keep = 0
    while keep < min(len(records), len(queries)) and records[keep].get("query") == queries[keep]:
        keep += 1
    if keep < len(queries):
        keep -= keep % max(1, align)
    if keep != len(records) or not clean:
        write_jsonl_atomic(path, records[:keep])
    return records[:keep]


def check_scored(record: dict[str, Any], where: str) -> None:
    """Raise naming the record when it is not `{"query": str, "responses": [str], "scores": [float]}`."""
    query, responses, scores = record.get("query"), record.get("responses"), record.get("scores")
    if not isinstance(query, str) or not isinstance(responses, list) or not isinstance(scores, list):
        raise ValueError(
            f"{where}: expected {{'query': str, 'responses': [str], 'scores': [float]}}, got keys "
            f"{sorted(record)}; regenerate it with the score stage."
        )
    if len(responses) != len(scores) or not responses:
        raise ValueError(
            f"{where}: {len(responses)} responses but {len(scores)} scores for query {query[:80]!r}; "
            "each response needs one score (and a query at least one response)."
        )
    for score in scores:
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
            raise ValueError(f"{where}: score {score!r} for query {query[:80]!r} is not a finite number.")
