"""`llm-envs bench` on several processes (`benchmarks.bench.distributed`): the chunk-aligned split of the
held-out prompts, the join of the processes' shares, and `accelerate launch` of two CPU processes (gloo)
against one process on the test world: the same records, the same leaderboard but for its timings."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from agents.base import Generation
from agents.harness import Generated
from agents.launch import PROCESS_COUNT_VARS, SINGLE_PROCESS, launch, launched_process_count
from benchmarks.bench.distributed import chunk_shard, idle_note, joined
from launching import ROOT, accelerate_launch, launch_env
from test_bench import _suite_file

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------------------- the split


@pytest.mark.parametrize("total, chunk, count, shares", [
    (16, 4, 2, [(0, 8), (8, 16)]),  # even: two whole chunks each
    (20, 8, 2, [(0, 16), (16, 20)]),  # 3 chunks: the first process takes the extra one, the last the short chunk
    (10, 4, 3, [(0, 4), (4, 8), (8, 10)]),  # one chunk each, the last short
    (5, 4, 4, [(0, 4), (4, 5), (5, 5), (5, 5)]),  # fewer chunks than processes: the last ones get nothing
    (3, 64, 2, [(0, 3), (3, 3)]),  # one short chunk: one process decodes it all
    (7, 2, 1, [(0, 7)]),  # one process: everything, as without a launch
    (0, 4, 2, [(0, 0), (0, 0)]),  # no prompts: nothing for anyone
])
def test_shares_are_contiguous_runs_of_whole_chunks_in_prompt_order(total, chunk, count, shares):
    got = [chunk_shard(total, chunk, count, index) for index in range(count)]
    assert [(r.start, r.stop) for r in got] == shares
    assert [i for r in got for i in r] == list(range(total))  # joined in process order: prompt order
    assert all(r.start % chunk == 0 for r in got if r)  # every share starts where a one-process chunk starts
    sizes = [-(-len(r) // chunk) for r in got]  # chunks per process: as even as whole chunks allow
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("args", [(10, 0, 2, 0), (10, 4, 0, 0), (10, 4, 2, 2), (10, 4, 2, -1), (-1, 4, 2, 0)])
def test_a_bad_split_request_fails_naming_its_values(args):
    with pytest.raises(ValueError, match=r"chunk_shard\(total=.*expected total >= 0, chunk >= 1"):
        chunk_shard(*args)


def test_idle_processes_are_named_with_the_fix():
    assert idle_note(500, 256, 2) is None and idle_note(16, 8, 2) is None
    note = idle_note(500, 256, 8)  # hh_gpu's 500 prompts at batch_size 64 on 8 GPUs
    assert "make 2 chunk(s) of 256" in note and "for 8 processes, so 6 process(es) decode nothing" in note
    assert "smaller bench.batch_size" in note


def _generated(prompts: list[str], seconds: float, mb: float | None) -> Generated:
    return Generated([Generation(prompt=p, response_ids=[1], response_text="a") for p in prompts], seconds, mb)


def test_joined_shares_keep_process_order_the_slowest_time_and_the_largest_memory():
    parts = [_generated(["a", "b"], 2.0, 100.0), _generated(["c"], 3.5, None), None, _generated(["d"], 1.0, 250.0)]
    out = joined(parts)
    assert [g.prompt for g in out.generations] == ["a", "b", "c", "d"]
    assert (out.generate_seconds, out.peak_memory_mb) == (3.5, 250.0)
    assert joined([_generated(["a"], 1.0, None)]).peak_memory_mb is None
    with pytest.raises(ValueError, match="no process generated anything"):
        joined([None, None])


def test_a_plain_run_is_one_process_and_a_launch_is_read_from_its_environment(monkeypatch):
    for name in PROCESS_COUNT_VARS:
        monkeypatch.delenv(name, raising=False)
    assert launched_process_count() == 1 and launch("cpu") is SINGLE_PROCESS
    assert SINGLE_PROCESS.gather("x") == ["x"] and SINGLE_PROCESS.is_main
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "4")  # an MPI launcher
    assert launched_process_count() == 4
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE='two' is not a process count"):
        launched_process_count()


def test_sweeps_and_rebuilds_from_records_refuse_a_launch(monkeypatch, capsys):
    from benchmarks.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["bench", "--config", "tiny", "--from-records"]) == 2
    assert "--from-records runs in one process, but it was launched on 2" in capsys.readouterr().err
    assert main(["bench", "--config", "tiny", "--sweep", "args_w"]) == 2
    assert "--sweep runs in one process" in capsys.readouterr().err


# ---------------------------------------------------------------------------- accelerate launch, end to end

# Greedy and ARGS-greedy must match exactly (the check); nucleus shows the chunk seeds carry over;
# the proxy is trained by the main process while the other waits; RRHF's run is entered by both processes
# (its training is multi-process: it trains on shares of its own, so only its row is checked, not equality).
METHODS = [
    {"name": "greedy", "kind": "greedy"},
    {"name": "args_greedy", "kind": "args", "params": {"k": 4, "w": 1.5}},
    {"name": "nucleus", "kind": "nucleus", "params": {"top_p": 0.95}},
    {"name": "proxy", "kind": "proxy"},
    {"name": "rrhf", "kind": "rrhf"},
]
EQUAL = ("greedy", "args_greedy", "nucleus", "proxy")
TIMING = ("seconds_per_response", "train_seconds", "peak_memory_mb")


def _launch_two_cpu_processes(config: Path, out: Path, world_cache: Path) -> None:
    """`accelerate launch` of the bench on two CPU processes (`launching.accelerate_launch`)."""
    command = accelerate_launch(2, "bench", "--config", str(config), f"bench.results_dir={out / 'results'}",
                                f"bench.runs_dir={out / 'runs'}")
    result = subprocess.run(command, cwd=ROOT, env=launch_env(world_cache, out / "hf_home"), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]


@pytest.fixture(scope="module")
def one_and_two(test_world, world_cache, tmp_path_factory):
    """The same suite (20 prompts in chunks of 8: the processes get 16 and 4) run by one process and by two."""
    from benchmarks.cli import main

    tmp = tmp_path_factory.mktemp("bench_two")
    config = _suite_file(tmp, test_world, world_cache, METHODS, num_prompts=20, batch_size=2)
    assert main(["bench", "--config", str(config), f"bench.results_dir={tmp / 'one' / 'results'}",
                 f"bench.runs_dir={tmp / 'one' / 'runs'}"]) == 0
    _launch_two_cpu_processes(config, tmp / "two", world_cache)
    return tmp / "one" / "results" / "t", tmp / "two" / "results" / "t"


def _records(out: Path, name: str) -> tuple[list[dict], dict]:
    episodes = [json.loads(line) for line in (out / "records" / f"{name}.jsonl").read_text().splitlines()]
    return episodes, json.loads((out / "records" / f"{name}.json").read_text())


def test_two_processes_write_the_records_of_one(one_and_two):
    one, two = one_and_two
    for name in EQUAL:
        (episodes_one, meta_one), (episodes_two, meta_two) = _records(one, name), _records(two, name)
        assert [e["index"] for e in episodes_two] == list(range(20))
        assert episodes_two == episodes_one, name  # every field: responses, reward, gold, coherence, costs
        assert meta_two["fingerprint"] == meta_one["fingerprint"]
        assert [r["processes"] for r in meta_one["runs"]] == [1] and [r["processes"] for r in meta_two["runs"]] == [2]
        assert meta_two["runs"][0]["generate_seconds"] > 0 and meta_two["runs"][0]["peak_memory_mb"] > 0
    trained = Path(_records(two, "proxy")[1]["runs"][0]["info"]["run_dir"])
    assert trained.parent.parent == two.parents[1] / "runs" and (trained / "proxy.zip").is_file()


def test_two_processes_write_the_leaderboard_of_one_but_its_timings(one_and_two):
    one, two = one_and_two
    # The ranks are left out too: RRHF's row, trained on two processes, takes part in them.
    skip = (*TIMING, "rank_gold", "rank_rm")
    rows = [{r["method"]: {k: v for k, v in r.items() if k not in skip}
             for r in json.loads((out / "leaderboard.json").read_text())["rows"]} for out in one_and_two]
    assert set(rows[1]) == set(rows[0]) == {m["name"] for m in METHODS}
    for name in EQUAL:
        assert rows[1][name] == rows[0][name], name
    assert rows[1]["rrhf"]["trainable_params"] == rows[0]["rrhf"]["trainable_params"] > 0  # RRHF trained on both
    assert (two / "config.yaml").is_file() and (two / "leaderboard.md").is_file()
