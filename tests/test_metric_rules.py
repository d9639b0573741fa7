"""The harness's metric rules (`agents.metric_rules.MetricRules`, ``bench.metrics``) against hand-computed values:
ARGS's skip-and-count of long reward-model inputs, the stop strings of diversity and coherence, NLTK words for
diversity, and SimCSE's pooled, truncated embeddings for coherence."""

from __future__ import annotations

import math
import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from agents.base import Generation
from agents.harness import Evaluation, Scorer, score_episodes, summarize
from agents.metric_rules import MetricRules
from agents.metrics import MissingMetricToolError, SentenceEncoder, diversity, nltk_words
from benchmarks.bench.config import load_suite_config
from benchmarks.bench.leaderboard import method_row, skip_notes
from llm_envs.config import ConfigError
from llm_envs.rewards import RewardWrapper
from protocol_models import save_bert_encoder, save_sequence_rm, save_sft_lm, word_tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ARGS_METRICS = MetricRules(reward_skip_tokens=1334, text_stops=("###Human:", "\n\nHuman:"))


def args_clean(text: str) -> str:
    """ARGS's metrics.py: clean(clean(response, "###Human:"), "\\n\\nHuman:")."""
    return text.split("###Human:")[0].split("\n\nHuman:")[0]


@pytest.mark.parametrize("text", [
    "Sure.\n\nHuman: more", "a ###Human: b \n\nHuman: c", "x \n\nHuman: y ###Human: z", "human: stays",
    "no stop", "", "\n\nHuman:",
])
def test_the_metric_text_is_args_cleaning(text):
    assert ARGS_METRICS.metric_text(text) == args_clean(text)
    assert MetricRules().metric_text(text) == text


def test_diversity_by_hand():
    # words a b a b: rep_2 = 1 - 2/(3+1), rep_3 = 1 - 2/(2+1), rep_4 = 1 - 1/(1+1)
    assert diversity("a b a b") == pytest.approx((2 / 4) * (2 / 3) * (1 / 2))
    assert diversity("") == 0.0  # an empty (or ' ') response scores 0, as in the reference
    assert diversity("one two three four five") == pytest.approx((4 / 5) * (3 / 4) * (2 / 3))


@pytest.fixture()
def fake_nltk(monkeypatch):
    """A stand-in `nltk` module (the real one's punkt data cannot be fetched offline)."""
    module = types.ModuleType("nltk")
    module.word_tokenize = lambda text: text.replace(".", " .").split()
    monkeypatch.setitem(sys.modules, "nltk", module)
    return module


def test_nltk_words_feed_diversity(fake_nltk):
    assert nltk_words("a b. a b.") == ["a", "b", ".", "a", "b", "."]
    # tokens a b . a b .: bigrams ab b. .a ab b. (3 unique of 5), trigrams 3 of 4, 4-grams 3 of 3
    expected = (1 - (1 - 3 / 6)) * (1 - (1 - 3 / 5)) * (1 - (1 - 3 / 4))
    assert diversity("a b. a b.", "nltk") == pytest.approx(expected)
    fake_nltk.word_tokenize = lambda text: text.split()  # diversity reads whatever words nltk gives
    assert diversity("a b. a b.", "nltk") == pytest.approx((2 / 4) * (2 / 3) * (1 / 2))


def test_nltk_missing_or_without_its_data_fails_before_any_method(monkeypatch, fake_nltk):
    def no_punkt(text):
        raise LookupError("Resource punkt_tab not found.")

    fake_nltk.word_tokenize = no_punkt
    rm = RewardWrapper.from_callable(lambda p, r: [0.0] * len(p))
    with pytest.raises(MissingMetricToolError, match="punkt_tab data, which is not installed: pip install nltk"):
        Scorer(rm, rules=MetricRules(diversity_tokenizer="nltk"))
    monkeypatch.setitem(sys.modules, "nltk", None)  # import nltk -> ImportError
    with pytest.raises(MissingMetricToolError, match="needs the nltk package: pip install nltk"):
        Scorer(rm, rules=MetricRules(diversity_tokenizer="nltk"))
    Scorer(rm)  # regex needs nothing


@pytest.mark.parametrize("field, value, message", [
    ("reward_skip_tokens", 1, "reward_skip_tokens=1; expected an int >= 2"),
    ("text_stops", "###Human:", "text_stops='###Human:'; expected a list of non-empty strings"),
    ("text_stops", ("",), "expected a list of non-empty strings"),
    ("diversity_tokenizer", "spacy", "expected 'regex' or 'nltk'"),
    ("coherence_pooling", "max", "expected 'mean', 'pooler' or 'cls'"),
    ("coherence_max_length", 0, "coherence_max_length=0"),
])
def test_bad_metric_rules_fail_naming_the_value(field, value, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        MetricRules(**{field: value})


def test_metric_rules_are_the_bench_metrics_section():
    cfg = load_suite_config("tiny", ["bench.metrics.reward_skip_tokens=1334", "bench.coherence_encoder=enc",
                                     "bench.metrics.coherence_pooling=pooler"])
    assert cfg.bench.metrics == MetricRules(reward_skip_tokens=1334, coherence_pooling="pooler")
    with pytest.raises(ConfigError, match="unknown key 'reward_skip'.*Did you mean 'reward_skip_tokens'"):
        load_suite_config("tiny", ["bench.metrics.reward_skip=5"])
    with pytest.raises(ConfigError, match="coherence_pooling='pooler' but bench.coherence_encoder is null"):
        load_suite_config("tiny", ["bench.metrics.coherence_pooling=pooler"])


# ---------------------------------------------------------------------- skip and count, on a reward model
@pytest.fixture(scope="module")
def rm(tmp_path_factory) -> tuple[RewardWrapper, torch.nn.Module]:
    root = tmp_path_factory.mktemp("skip_models")
    model = save_sequence_rm(root / "rm")
    save_sft_lm(root / "lm")
    wrapper = RewardWrapper.from_model(str(root / "rm"), tokenizer=str(root / "lm"), lm_tokenizer=word_tokenizer(),
                                       device="cpu")
    return wrapper, model


PROMPTS = ["\n\nHuman: how do i bake bread ?\n\nAssistant:", "\n\nHuman: why ?\n\nAssistant:"]
RESPONSES = ["sure , here is how . ###Human: more", "no ."]


def generations() -> list[Generation]:
    return [Generation(prompt=p, response_ids=[4] * (i + 1), response_text=r)
            for i, (p, r) in enumerate(zip(PROMPTS, RESPONSES))]


def test_long_reward_inputs_are_skipped_and_counted(rm):
    wrapper, model = rm
    tok = word_tokenizer()
    # the reward model reads the response under the wrapper's rules: cut at 'Human:' (the metric rules do not
    # change what it reads)
    lengths = [len(tok(f"{p} {wrapper.rules.read(r)}")["input_ids"]) for p, r in zip(PROMPTS, RESPONSES)]
    assert wrapper.input_lengths(PROMPTS, RESPONSES) == lengths and lengths[0] > lengths[1]
    rules = MetricRules(reward_skip_tokens=lengths[0], text_stops=("###Human:",))  # the first pair reaches it
    episodes = score_episodes(Scorer(wrapper, rules=rules), PROMPTS, generations())
    with torch.no_grad():
        second = float(model(input_ids=torch.tensor([tok(f"{PROMPTS[1]} {RESPONSES[1]}")["input_ids"]])).logits[0, 0])
    assert [e["reward"] for e in episodes] == [None, pytest.approx(second, abs=1e-5)]
    assert [e["reward_skipped"] for e in episodes] == [True, False]
    assert [e["reward_input_tokens"] for e in episodes] == lengths
    assert episodes[0]["diversity"] == diversity("sure , here is how . ")  # read up to the stop string
    summary = summarize(Evaluation(episodes, 1.0, None))
    assert summary["reward_mean"] == pytest.approx(second, abs=1e-5) and summary["reward_skipped"] == 1
    row = method_row([{**e, "seed": 0} for e in episodes], {"name": "greedy", "kind": "greedy", "runs": [
        {"generate_seconds": 1.0}]}, None)
    assert row["reward_mean"] == pytest.approx(second, abs=1e-5) and row["reward_skipped"] == 1
    assert skip_notes([row]) == ["greedy: 1 of 2 responses were not scored (their reward-model input reached "
                                 "bench.metrics.reward_skip_tokens, as ARGS's evaluation skips them); its RM reward is "
                                 "the mean over the rest"]
    unruled = score_episodes(Scorer(wrapper), PROMPTS, generations())
    assert all(e["reward"] is not None and "reward_skipped" not in e for e in unruled)


def test_every_pair_skipped_leaves_a_nan_mean_not_an_error(rm):
    wrapper, _ = rm
    episodes = score_episodes(Scorer(wrapper, rules=MetricRules(reward_skip_tokens=2)), PROMPTS, generations())
    assert all(e["reward"] is None for e in episodes)
    assert math.isnan(summarize(Evaluation(episodes, 1.0, None))["reward_mean"])


# ---------------------------------------------------------------------- SimCSE-style coherence
@pytest.fixture(scope="module")
def bert(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    path = tmp_path_factory.mktemp("enc") / "simcse"
    return path, save_bert_encoder(path)


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a, b, dim=-1))


def test_coherence_is_the_cosine_of_pooler_outputs_truncated_as_simcse(bert):
    path, model = bert
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    prompt, response = "how do i bake bread ? please", "sure , here is how ."
    encoder = SentenceEncoder.load(str(path), device="cpu", pooling="pooler", max_length=5)
    with torch.no_grad():
        pooled = [model(**tok(t, truncation=True, max_length=5, return_tensors="pt")).pooler_output[0]
                  for t in (prompt, response)]
        first = [model(**tok(t, return_tensors="pt")).last_hidden_state[0, 0] for t in (prompt, response)]
    assert encoder.coherence([prompt], [response]) == pytest.approx([_cos(*pooled)], abs=1e-5)
    whole = SentenceEncoder.load(str(path), device="cpu", pooling="cls")
    assert whole.coherence([prompt], [response]) == pytest.approx([_cos(*first)], abs=1e-5)
    with torch.no_grad():  # an empty response embeds as [CLS] [SEP], as SimCSE's tool embeds ' '
        empty = model(**tok("", return_tensors="pt")).pooler_output[0]
    assert encoder.coherence([prompt], [""]) == pytest.approx([_cos(pooled[0], empty)], abs=1e-5)
    batch = encoder.coherence([prompt, "why ?"], [response, "no ."])  # padding changes nothing
    assert batch[0] == pytest.approx(_cos(*pooled), abs=1e-5)


def test_an_encoder_without_its_pooler_is_refused_for_pooler_coherence(bert, tmp_path):
    path, model = bert
    from safetensors.torch import load_file, save_file

    bare = tmp_path / "bare"
    bare.mkdir()
    for item in path.iterdir():
        if item.name != "model.safetensors":
            (bare / item.name).write_bytes(item.read_bytes())
    state = {k: v for k, v in load_file(path / "model.safetensors").items() if not k.startswith("pooler.")}
    save_file(state, bare / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="lacks weights that BertModel needs: pooler.dense"):
        SentenceEncoder.load(str(bare), device="cpu", pooling="pooler")
    SentenceEncoder.load(str(bare), device="cpu", pooling="cls")  # reads no pooler
