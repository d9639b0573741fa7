"""The papers' protocol suites (`proxy_rlhf`, `args`) end to end in `--quick`, offline, on tiny stand-ins of
their hub models and datasets written in each one's layout (`protocol_models`), with the README's overrides:
the same loaders (safe-rlhf score model, sequence classifier, `datasets.load_dataset` by local path) as the
real names, and every number of a record checked against a hand computation of its protocol's rule."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from agents.metric_rules import MetricRules
from agents.metrics import diversity
from benchmarks.bench.config import load_suite_config
from benchmarks.cli import main
from llm_envs.reward_rules import RewardRules
from llm_envs.rewards import join_prompt_response
from protocol_models import (
    save_bert_encoder,
    save_score_model,
    save_sequence_rm,
    save_sft_lm,
    word_tokenizer,
    write_full_hh_rlhf,
    write_hh_rlhf,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SAFE_RLHF = "BEGINNING OF CONVERSATION: USER: {input} ASSISTANT:"
ARGS_RULES = RewardRules(turn_markers=("human:",), case_sensitive=False, rstrip=False, strip_prefix=": ")


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep load_dataset's arrow cache out of the user's ~/.cache."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.getbasetemp() / "hf_datasets")


def test_the_shipped_protocol_suites_state_their_protocols():
    proxy = load_suite_config("proxy_rlhf")
    task = proxy.task
    assert task.lm == "PKU-Alignment/alpaca-7b-reproduced" and task.reward == "PKU-Alignment/beaver-7b-v1.0-reward"
    assert task.reward_rules == RewardRules(append_eos=True) and task.gold == "none"
    for source, split in ((task.train_prompts, "train"), (task.eval_prompts, "test")):
        assert source == {"dataset": "Anthropic/hh-rlhf", "data_dir": ["helpful-base", "harmless-base"],
                          "split": split, "hh_prompt": "first_turn", "template": SAFE_RLHF}
    assert proxy.train.proxy.hidden_sizes == (2048, 2048) and proxy.train.proxy.learning_rate == 3e-4
    assert proxy.bench.sweep.p_t == (0.1, 0.01, 0.001, 0.0001)
    assert proxy.bench.sweep.temperature == (0.25, 0.5, 0.75, 1.0)
    assert [m.name for m in proxy.bench.methods] == ["greedy", "best_of_32", "proxy"]
    assert proxy.bench.method("best_of_32").params == {"n": 32} and proxy.bench.num_prompts == 200
    assert "Proxy-RLHF" in proxy.bench.protocol
    args = load_suite_config("args")
    assert args.task.lm == "argsearch/llama-7b-sft-float32" and args.task.reward == "argsearch/llama-7b-rm-float32"
    assert args.task.reward_tokenizer == "argsearch/llama-7b-sft-float32" and args.task.reward_rules == ARGS_RULES
    assert args.task.eval_prompts == {"dataset": "Dahoas/full-hh-rlhf", "split": "test"}
    assert args.task.max_new_tokens == 128
    assert args.bench.coherence_encoder == "princeton-nlp/sup-simcse-bert-base-uncased"
    assert args.bench.metrics == MetricRules(reward_skip_tokens=1334, text_stops=("###Human:", "\n\nHuman:"),
                                             diversity_tokenizer="nltk", coherence_pooling="pooler",
                                             coherence_max_length=128)
    assert {m.name: m.params.get("stop_at_eos") for m in args.bench.methods if m.kind == "args"} == {
        "args_greedy": False, "args_stochastic": False}
    assert "ARGS" in args.bench.protocol
    for name in ("proxy_rlhf", "args"):
        quick = load_suite_config(name, quick=True)
        assert quick.bench.suite == f"{name}-quick" and quick.bench.num_prompts == 8


def _records(suite_dir: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (suite_dir / "records" / f"{name}.jsonl").read_text().splitlines()]


def test_proxy_rlhf_quick_runs_offline_on_its_stand_ins(tmp_path, monkeypatch):
    """From an empty directory, with the README's overrides: greedy, best-of-32 and a trained proxy, every
    response scored by the score model on prompt + answer + EOS (its end score by hand)."""
    models = tmp_path / "models"
    lm = save_sft_lm(models / "alpaca")
    score = save_score_model(models / "beaver-reward")
    hh = write_hh_rlhf(tmp_path / "data" / "hh-rlhf", test_rows=5)
    work = tmp_path / "empty"
    work.mkdir()
    monkeypatch.chdir(work)
    overrides = [f"task.lm={lm}", f"task.reward={score.path}", f"task.train_prompts.dataset={hh}",
                 f"task.eval_prompts.dataset={hh}", "task.device=cpu", "task.dtype=auto", "bench.torch_threads=1"]
    assert main(["bench", "--config", "proxy_rlhf", "--quick", "--no-progress", *overrides]) == 0
    suite_dir = work / "results" / "proxy_rlhf-quick"
    board = json.loads((suite_dir / "leaderboard.json").read_text())
    assert {r["method"] for r in board["rows"]} == {"greedy", "best_of_32", "proxy"}
    assert board["num_prompts"] == 8 and board["gold"] is None and "Proxy-RLHF" in board["protocol"]
    assert board["reward_rules"]["append_eos"] is True
    assert "Protocol: Proxy-RLHF" in (suite_dir / "leaderboard.md").read_text()
    tok = word_tokenizer()
    for name in ("greedy", "best_of_32", "proxy"):
        for record in _records(suite_dir, name)[:3]:
            prompt = record["prompt"]
            assert prompt.startswith("BEGINNING OF CONVERSATION: USER: ") and prompt.endswith(" ASSISTANT:")
            text = join_prompt_response(prompt, RewardRules().read(record["response"]))
            expected = score.end_score(tok(text)["input_ids"] + [tok.eos_token_id])
            assert record["reward"] == pytest.approx(expected, abs=1e-4), name
    proxy_meta = json.loads((suite_dir / "records" / "proxy.json").read_text())
    assert proxy_meta["runs"][0]["trainable_params"] > 0
    assert (work / "runs").is_dir()  # the proxy trained under the current directory


def test_args_quick_runs_offline_on_its_stand_ins(tmp_path):
    """Greedy, top-k, nucleus and both ARGS modes on the full-hh-rlhf layout: rewards under ARGS's cut with the
    SFT model's tokenizer, input lengths for the 1334-token rule, diversity and coherence of the cleaned text."""
    models = tmp_path / "models"
    lm = save_sft_lm(models / "llama-7b-sft")
    rm_dir = models / "llama-7b-rm"
    rm = save_sequence_rm(rm_dir)
    encoder = models / "sup-simcse"
    save_bert_encoder(encoder)
    data = write_full_hh_rlhf(tmp_path / "data" / "full-hh-rlhf", test_rows=10)
    out = tmp_path / "results"
    overrides = [f"task.lm={lm}", f"task.reward={rm_dir}", f"task.reward_tokenizer={lm}",
                 f"task.train_prompts.dataset={data}", f"task.eval_prompts.dataset={data}", "task.device=cpu",
                 "task.dtype=auto", f"bench.coherence_encoder={encoder}", "bench.metrics.diversity_tokenizer=regex",
                 "bench.torch_threads=1"]
    assert main(["bench", "--config", "args", "--quick", "--no-progress", "--out", str(out), *overrides]) == 0
    suite_dir = out / "args-quick"
    board = json.loads((suite_dir / "leaderboard.json").read_text())
    assert {r["method"] for r in board["rows"]} == {"greedy", "top_k", "nucleus", "args_greedy", "args_stochastic"}
    assert all(r["coherence"] is not None and r["reward_skipped"] == 0 for r in board["rows"])
    assert board["metrics"]["reward_skip_tokens"] == 1334 and "ARGS" in board["protocol"]
    tok = word_tokenizer()
    for name in ("greedy", "args_greedy"):
        records = _records(suite_dir, name)
        for record in records[:3]:
            assert record["prompt"].startswith("\n\nHuman: ") and record["prompt"].endswith("Assistant:")
            ids = tok(join_prompt_response(record["prompt"], ARGS_RULES.read(record["response"])))["input_ids"]
            with torch.no_grad():
                expected = float(rm(input_ids=torch.tensor([ids])).logits[0, 0])
            assert record["reward"] == pytest.approx(expected, abs=1e-4), name
            assert record["reward_input_tokens"] == len(ids) and record["reward_skipped"] is False
            cleaned = record["response"].split("###Human:")[0].split("\n\nHuman:")[0]
            assert record["diversity"] == pytest.approx(diversity(cleaned))
        if name == "args_greedy":  # ARGS decodes all 16 tokens, as the reference decodes max_new_token
            assert all(r["response_len"] == 16 for r in records)
