"""The one atomic-write primitive: readers never see a torn or mixed file, a failed write leaves
the old one, and concurrent writers never collide on a temp name."""

from __future__ import annotations

import json
import multiprocessing as mp
from pathlib import Path

import pytest

from llm_envs.io import append_lines, atomic_replace_dir, atomic_write_json, atomic_write_text


def test_atomic_write_replaces_and_leaves_no_temp_files(tmp_path: Path):
    target = tmp_path / "sub" / "out.json"
    atomic_write_json(target, {"a": 1})
    atomic_write_json(target, {"a": 2})
    assert json.loads(target.read_text()) == {"a": 2}
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.json"]


def test_a_failed_directory_swap_keeps_the_old_directory(tmp_path: Path):
    target = tmp_path / "model"
    atomic_replace_dir(target, lambda d: (d / "weights").write_text("old"))

    def broken(staging: Path) -> None:
        (staging / "weights").write_text("half")
        raise RuntimeError("killed mid-save")

    with pytest.raises(RuntimeError, match="killed mid-save"):
        atomic_replace_dir(target, broken)
    assert (target / "weights").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # the staging dir is gone


def _writer(path: str, tag: int, count: int) -> None:
    for i in range(count):
        atomic_write_text(path, json.dumps({"writer": tag, "i": i, "pad": "x" * 4096}))


def test_concurrent_writers_never_collide_and_readers_never_see_a_torn_file(tmp_path: Path):
    path = tmp_path / "records.json"
    atomic_write_text(path, json.dumps({"writer": -1, "i": 0, "pad": ""}))
    ctx = mp.get_context("fork")
    writers = [ctx.Process(target=_writer, args=(str(path), tag, 150)) for tag in range(2)]
    for w in writers:
        w.start()
    reads = 0
    while any(w.is_alive() for w in writers):
        record = json.loads(path.read_text())  # raises on a torn or mixed file
        assert record["writer"] in (-1, 0, 1)
        reads += 1
    for w in writers:
        w.join()
        assert w.exitcode == 0
    assert reads > 0 and json.loads(path.read_text())["i"] == 149
    assert [p.name for p in tmp_path.iterdir()] == ["records.json"]


def test_append_lines_appends_whole_lines(tmp_path: Path):
    path = tmp_path / "log.jsonl"
    append_lines(path, ["a", "b"])
    append_lines(path, [])
    append_lines(path, ["c"])
    assert path.read_text() == "a\nb\nc\n"
