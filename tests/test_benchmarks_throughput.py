"""The throughput benchmark's functions on a tiny config (tiny random GPT-2, N=2, a few steps)."""

from __future__ import annotations

import json
import math

import pytest

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPTS = [
    "Human: please , how can i bake bread this weekend ? Assistant:",
    "Human: what is a good name for a cat ? Assistant:",
    "Human: tell me a short story about the sea . Assistant:",
    "Human: how do i fix a bike ? Assistant:",
]

ROW_KEYS = {
    "model", "params", "num_envs", "limit_steps_per_s", "env_steps_per_s", "naive_steps_per_s",
    "env_over_limit", "env_over_naive", "env_decode_steps_per_s", "env_decode_over_limit", "env_over_work_limit",
}


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    from benchmarks.throughput import make_random_gpt2
    from llm_envs.world.build import train_tokenizer

    tokenizer = train_tokenizer(PROMPTS)
    return make_random_gpt2(tmp_path_factory.mktemp("tiny_gpt2"), tokenizer, seed=0, vocab_size=128, n_embd=16,
                            n_layer=2, n_head=2, n_positions=64)


def test_tiny_benchmark_writes_the_documented_schema(tiny_lm, tmp_path):
    from benchmarks.throughput import Settings, benchmark_model, build_report, write_results

    settings = Settings(num_envs=[2], max_new_tokens=6, rounds=2, limit_episodes=1, env_warmup=1, env_steps=10,
                        naive_samples=4, naive_warmup=1)
    rows = benchmark_model("tiny", tiny_lm, PROMPTS, settings, log=lambda _msg: None)
    report = build_report(rows, settings, "pytest")
    json_path, md_path = write_results(report, tmp_path)
    assert json_path.name == "throughput.json" and md_path.name == "throughput.md"

    loaded = json.loads(json_path.read_text())
    assert loaded["benchmark"] == "throughput" and "env-steps/s" in loaded["unit"]
    assert "zeros" in loaded["reward"]
    for key in ("git_commit", "torch", "transformers", "cpu_count", "torch_threads", "date", "command"):
        assert key in loaded["provenance"]
    assert loaded["provenance"]["command"] == "pytest"
    [row] = loaded["rows"]
    assert ROW_KEYS <= set(row)
    assert row["model"] == "tiny" and row["num_envs"] == 2 and row["params"] > 0
    for key in ("limit_steps_per_s", "env_steps_per_s", "env_decode_steps_per_s", "naive_steps_per_s"):
        assert math.isfinite(row[key]) and row[key] > 0, key
    assert row["env_over_limit"] == pytest.approx(row["env_steps_per_s"] / row["limit_steps_per_s"])
    assert row["env_over_naive"] == pytest.approx(row["env_steps_per_s"] / row["naive_steps_per_s"])
    assert row["env_decode_steps_per_s"] >= row["env_steps_per_s"]
    # 10 vector steps of 2 rows with 6-token episodes: at least one autoreset step falls in the window
    assert 0 < row["env_transitions"] < 2 * settings.env_steps
    # same work: the env's 10 forwards at the limit's time each, plus its restarts' prompts at the limit's prefill cost
    assert row["env_prompts_started"] >= 1
    work = 10 * 2 / row["limit_steps_per_s"] + row["env_prompts_started"] * row["limit_prefill_s"] / 2
    assert row["env_over_work_limit"] == pytest.approx(work / row["env_seconds"])
    # at most: env / limit had the env taken exactly that work's time
    assert row["env_over_limit_at_most"] == pytest.approx(row["env_transitions"] / work / row["limit_steps_per_s"])
    assert row["env_over_limit"] == pytest.approx(row["env_over_limit_at_most"] * row["env_over_work_limit"])
    # the same env with prefill_ahead=True, in the same rounds
    assert row["ahead_over_limit"] == pytest.approx(row["ahead_steps_per_s"] / row["limit_steps_per_s"])
    assert row["ahead_prompts_started"] >= 1 and "prefill_ahead=True" in md_path.read_text()
    assert row["naive_positions"] == [0, 2, 3, 5]
    for key, values in row["rounds"].items():  # each rate is the best of the rounds
        assert len(values) == 2 and row[key] == max(values), key  # spread evenly over 0..max_new_tokens-1
    assert "| tiny |" in md_path.read_text()


def test_quick_preset_is_smaller_and_writes_its_own_files(tmp_path):
    from benchmarks.throughput import MODEL_NUM_ENVS, Settings, build_report, write_results

    full, quick = Settings(), Settings.quick_preset()
    assert quick.quick and not full.quick
    assert quick.env_steps < full.env_steps and quick.naive_samples < full.naive_samples
    assert full.num_envs is quick.num_envs is None and full.max_new_tokens == 64  # per model: MODEL_NUM_ENVS
    assert MODEL_NUM_ENVS["world"] == [1, 16, 64, 256] and 64 in MODEL_NUM_ENVS["gpt2-124m"]
    paths = write_results(build_report([], quick, "q"), tmp_path)
    assert [p.name for p in paths] == ["throughput_quick.json", "throughput_quick.md"]


def test_args_limit_scores_the_real_candidates_and_reports_its_ratio(tmp_path):
    """ARGS's limit (benchmarks/args_speed.py) on a tiny random LM and reward model: its bare reward-model loop
    scores what ARGS would (prefix + each candidate, against full forwards), and the report shows the ratio."""
    import torch
    from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

    from benchmarks import args_speed

    config = {"vocab_size": 40, "n_embd": 16, "n_layer": 2, "n_head": 2, "n_positions": 64}
    torch.manual_seed(0)
    lm = GPT2LMHeadModel(GPT2Config(**config)).eval()
    rm = GPT2ForSequenceClassification(GPT2Config(**config, num_labels=1)).eval()
    prompts, k, forwards = [[5, 6, 7, 8], [9, 10]], 3, 4
    prefill, decode, scores = args_speed.rm_limit_episode(rm, prompts, k, forwards)
    assert prefill > 0 and decode > 0 and scores.shape == (2, k)
    with torch.no_grad():
        for row, prompt in enumerate(prompts):
            for j in range(k):
                ids = torch.tensor([prompt + [0] * (forwards - 1) + [j]])
                expected = rm.score(rm.transformer(ids).last_hidden_state)[0, -1, 0]
                assert float(scores[row, j]) == pytest.approx(float(expected), abs=1e-5)

    limit = args_speed.args_limit(lm, rm, prompts, tokens=5, batch=2, k=k)
    assert limit["seconds"] == pytest.approx(limit["lm_seconds"] + limit["rm_seconds"]) and limit["lm_forwards"] == 5
    row = args_speed._limit_row(2, 10, {"args_greedy": ([0.4, 0.2], [{}, {}]), "limit": ([0.3, 0.1], [limit, limit])})
    assert row["args_over_limit"] == pytest.approx(0.1 / 0.2)
    lines = args_speed._limit_lines({"limit": [row]})
    assert lines[-1].startswith("| 2 |") and lines[-1].endswith("| 0.50 |")
