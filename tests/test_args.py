"""ARGS (agents.args): w=0 == greedy, == a cache-free reference of the rule, batching, env agent, errors."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
from parity import reference_args
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPT2Config, GPT2ForSequenceClassification, PreTrainedTokenizerFast

from agents.args import ARGS, ARGSAgent, args_select
from agents.base import PolicyDecoder
from llm_envs.envs.token_choice import TokenChoiceCore
from llm_envs.models import load_causal_lm, load_reward_model, load_tokenizer
from llm_envs.rewards import RewardWrapper


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def world(test_world):
    """The world's LM and RM (a GPT-2 sequence classifier on the LM's tokenizer), loaded once."""
    tok = load_tokenizer(test_world.lm_dir)
    lm = load_causal_lm(test_world.lm_dir, device="cpu")
    rm = load_reward_model(test_world.rm_dir, device="cpu")
    return tok, lm, rm, test_world.test_prompts[:4]


def _decoder(world, **kwargs) -> ARGS:
    tok, lm, rm, _ = world
    reward = kwargs.pop("reward", None) or RewardWrapper.from_model(rm, tokenizer=tok, lm_tokenizer=tok, device="cpu")
    return ARGS(lm, reward, tokenizer=tok, device="cpu", **kwargs)


def _raw_rm(rm):
    def score(ids: list[int]) -> float:
        return float(rm(torch.tensor([ids])).logits[0, 0])
    return score


# ----------------------------------------------------------------------------- the rule


def test_args_greedy_with_w0_equals_greedy_decoding(world):
    tok, lm, _, prompts = world
    got = _decoder(world, w=0.0).generate(prompts, max_new_tokens=24)
    for prompt, generation in zip(prompts, got):
        ids = torch.tensor([tok(prompt)["input_ids"]])
        out = lm.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=24,
                          eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)[0, ids.shape[1]:].tolist()
        assert generation.response_ids == out
    assert any(g.response_ids[-1] == tok.eos_token_id for g in got)  # stops at EOS by default


@pytest.mark.parametrize("mode, k, w", [
    ("greedy", 10, 1.5), ("greedy", 3, 5.0), ("greedy", 20, 0.5),
    ("stochastic", 10, 1.5), ("stochastic", 4, 3.0),
])
def test_args_equals_a_cache_free_reference(world, mode, k, w):
    tok, lm, rm, prompts = world
    decoder = _decoder(world, k=k, w=w, mode=mode)
    got = decoder.generate(prompts[:3], max_new_tokens=20, stop_at_eos=False, seed=7)
    greedy = _decoder(world, w=0.0).generate(prompts[:3], max_new_tokens=20, stop_at_eos=False)
    for i, (prompt, generation) in enumerate(zip(prompts, got)):
        expected = reference_args(lm, _raw_rm(rm), tok, prompt, k=k, w=w, mode=mode, max_new_tokens=20, seed=7 + i)
        assert generation.response_ids == expected
    assert any(g.response_ids != h.response_ids for g, h in zip(got, greedy))  # the reward mattered
    stats = decoder.last_stats
    assert stats["prefix_cache"] and stats["lm_forwards"] == 20 and stats["rm_calls"] <= 20 + 2  # + first check


def test_decoding_past_eos_as_the_reference_is_a_constructor_setting(world):
    """The ARGS protocol suite's rows (`stop_at_eos: false` in their params) decode max_new_tokens tokens, as the
    reference does; `generate`'s own keyword still wins."""
    tok, _, _, prompts = world
    past = _decoder(world, stop_at_eos=False).generate(prompts, max_new_tokens=24)
    assert [g.response_ids for g in past] == [
        g.response_ids for g in _decoder(world).generate(prompts, max_new_tokens=24, stop_at_eos=False)]
    assert all(len(g.response_ids) == 24 for g in past)
    stopped = _decoder(world, stop_at_eos=False).generate(prompts, max_new_tokens=24, stop_at_eos=True)
    assert any(g.response_ids[-1] == tok.eos_token_id for g in stopped)
    with pytest.raises(ValueError, match="stop_at_eos='no'; expected true"):
        _decoder(world, stop_at_eos="no")


def test_global_seed_reproduces_the_reference_on_one_prompt(world):
    tok, lm, rm, prompts = world
    torch.manual_seed(3)
    got = _decoder(world, mode="stochastic", k=6).generate(prompts[:1], max_new_tokens=16, stop_at_eos=False)
    expected = reference_args(lm, _raw_rm(rm), tok, prompts[0], k=6, w=1.5, mode="stochastic",
                              max_new_tokens=16, seed=3)
    assert got[0].response_ids == expected


def test_a_reward_model_with_another_tokenizer(world):
    tok, lm, _, prompts = world
    words = sorted(tok.get_vocab(), key=lambda word: -tok.get_vocab()[word])  # same words, other ids
    backend = Tokenizer(models.WordLevel({word: i for i, word in enumerate(words)}, unk_token=words[0]))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    other = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=tok.eos_token, pad_token=tok.pad_token)
    torch.manual_seed(2)
    rm = GPT2ForSequenceClassification(GPT2Config(vocab_size=len(words), n_positions=128, n_embd=32, n_layer=2,
                                                  n_head=4, num_labels=1, pad_token_id=other.pad_token_id)).eval()
    wrapper = RewardWrapper.from_model(rm, tokenizer=other, lm_tokenizer=tok, device="cpu")
    decoder = _decoder(world, reward=wrapper, k=5, w=3.0)
    got = decoder.generate(prompts[:2], max_new_tokens=12, stop_at_eos=False)
    assert not decoder.last_stats["prefix_cache"]
    text_score = RewardWrapper.from_model(rm, tokenizer=other, device="cpu")
    for prompt, generation in zip(prompts, got):
        def score(ids: list[int], n=len(tok(prompt)["input_ids"])) -> float:  # re-tokenized text, wrapper rules
            return text_score.score([prompt], [tok.decode(ids[n:], skip_special_tokens=False)])[0]
        assert generation.response_ids == reference_args(lm, score, tok, prompt, k=5, w=3.0, mode="greedy",
                                                         max_new_tokens=12)


# ----------------------------------------------------------------------------- batching


@pytest.mark.parametrize("mode", ["greedy", "stochastic"])
def test_batched_prompts_equal_one_prompt_at_a_time(world, mode):
    _, _, _, prompts = world
    batched = _decoder(world, mode=mode, k=5, w=2.0, batch_size=3).generate(prompts, max_new_tokens=16, seed=11)
    single = _decoder(world, mode=mode, k=5, w=2.0, batch_size=1)
    for i, prompt in enumerate(prompts):
        alone = single.generate([prompt], max_new_tokens=16, seed=11 + i)[0]
        assert batched[i].response_ids == alone.response_ids and batched[i].prompt == prompt
        assert batched[i].response_text == alone.response_text
    assert all(g.lm_forwards == len(g.response_ids) for g in batched)  # prefill + one per further token


def test_prefix_cache_off_gives_the_same_tokens_with_more_rm_work(world):
    _, _, _, prompts = world
    cached = _decoder(world, k=8, w=2.0)
    plain = _decoder(world, k=8, w=2.0, prefix_cache=False)
    a = cached.generate(prompts, max_new_tokens=12, stop_at_eos=False)
    b = plain.generate(prompts, max_new_tokens=12, stop_at_eos=False)
    assert [g.response_ids for g in a] == [g.response_ids for g in b]
    assert cached.last_stats["prefix_cache"] and not plain.last_stats["prefix_cache"]
    assert plain.reward.pairs_scored == 4 * 12 * 8


# ----------------------------------------------------------------------------- the agent face


@pytest.mark.parametrize("scoring", ["raw", "wrapper"])
def test_agent_on_token_choice_equals_the_decoder(world, test_world, scoring):
    tok, lm, rm, prompts = world
    reward = RewardWrapper.from_model(rm, tokenizer=tok, lm_tokenizer=tok, device="cpu")
    core = TokenChoiceCore(2, lm=lm, tokenizer=tok, reward=reward, prompts=prompts, device="cpu",
                           k=6, max_new_tokens=16)
    via_env = PolicyDecoder(ARGSAgent(w=2.0, scoring=scoring), core).generate(prompts)
    direct = _decoder(world, k=6, w=2.0, scoring=scoring).generate(prompts, max_new_tokens=16)
    assert [g.response_ids for g in via_env] == [g.response_ids for g in direct]

    sampler = PolicyDecoder(ARGSAgent(w=2.0, mode="stochastic", scoring=scoring, seed=0), core)
    assert len(sampler.generate(prompts)) == len(prompts)


def test_agent_acts_on_a_single_env_made_with_gym(world):
    import gymnasium as gym

    tok, lm, rm, prompts = world
    reward = RewardWrapper.from_model(rm, tokenizer=tok, lm_tokenizer=tok, device="cpu")
    env = gym.make("llm_envs/TokenChoice-v0", lm=lm, tokenizer=tok, reward=reward, prompts=prompts[:1],
                   device="cpu", k=5, max_new_tokens=10)
    agent = ARGSAgent(w=2.0).bind(env)
    obs, _ = env.reset(seed=0)
    done = False
    while not done:
        action = agent.predict(obs, env.unwrapped.action_masks())
        assert np.ndim(action) == 0 and env.action_space.contains(int(action))
        obs, _, terminated, truncated, info = env.step(int(action))
        done = terminated or truncated
    direct = _decoder(world, k=5, w=2.0).generate(prompts[:1], max_new_tokens=10)[0]
    assert info["response_ids"] == direct.response_ids


def test_args_select_and_bad_arguments(world):
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    assert args_select(logits, torch.tensor([[0.0, 0.0, 3.0]]), w=1.0, mode="greedy") == [2]
    assert args_select(logits, torch.tensor([[0.0, 0.0, 3.0]]), w=0.0, mode="greedy") == [0]
    masked = args_select(logits, torch.tensor([[0.0, 0.0, 3.0]]), w=1.0, mode="stochastic",
                         valid=torch.tensor([[True, True, False]]))
    assert masked[0] in (0, 1)
    for kwargs, match in [({"k": 0}, "k="), ({"w": float("nan")}, "w="), ({"mode": "beam"}, "mode"),
                          ({"temperature": 0.0}, "temperature"), ({"scoring": "text"}, "scoring"),
                          ({"batch_size": 0}, "batch_size")]:
        with pytest.raises(ValueError, match=match):
            _decoder(world, **kwargs)
    with pytest.raises(RuntimeError, match="bind"):
        ARGSAgent().predict(np.zeros(3))
    with pytest.raises(ValueError, match="max_new_tokens"):
        _decoder(world).generate(["Human: hi Assistant:"], max_new_tokens=0)


def test_a_decoding_step_brings_only_the_top_k_to_the_host(world, monkeypatch):
    """The top-k runs on the logits' device: of the LM's [n, V] logits only [n, k] values and ids reach
    the host, in one copy per LM forward (an int32 block [n, 2k]); no transfer is vocabulary-sized.
    On CPU nothing really moves, so the test records the calls that would copy on a GPU."""
    _, lm, _, prompts = world
    vocab = lm.get_output_embeddings().weight.shape[0]
    k, seen = 4, []

    def recording(name: str) -> Any:  # a Tensor method that records what it is called on
        original = getattr(torch.Tensor, name)

        def method(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            seen.append((name, tuple(self.shape), self.dtype))
            return original(self, *args, **kwargs)
        return method

    decoder = _decoder(world, k=k, w=2.0, batch_size=3)
    for name in ("cpu", "tolist", "numpy", "item"):  # the ways a tensor reaches the host (not `.to`: on CPU the
        # model's own `.to(device)` calls would be counted too)
        monkeypatch.setattr(torch.Tensor, name, recording(name))
    got = decoder.generate(prompts[:3], max_new_tokens=6, stop_at_eos=False)
    monkeypatch.undo()
    assert [len(g.response_ids) for g in got] == [6, 6, 6]
    largest = max(seen, key=lambda call: math.prod(call[1]))
    assert math.prod(largest[1]) < vocab, largest
    top_k_copies = [shape for name, shape, dtype in seen if name == "cpu" and dtype == torch.int32]
    assert top_k_copies == [(3, 2 * k)] * decoder.last_stats["lm_forwards"]  # the prefill, then one per step
