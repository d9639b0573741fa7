"""TokenChoice-v0 and candidate scoring: checkers, candidates == scoring from scratch, masks, vector parity."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForSequenceClassification,
    GPT2Config,
    GPT2ForSequenceClassification,
    LlamaConfig,
    PreTrainedTokenizerFast,
)

import llm_envs
from llm_envs.envs.token_choice import LOGPROB_FLOOR, TokenChoiceCore
from llm_envs.models import load_causal_lm, load_reward_model, load_tokenizer
from llm_envs.rewards import CandidateScorer, RewardWrapper, prefix_cache_verdict, score_candidates
from llm_envs.vector import vector_env_class

TokenChoiceVectorEnv = vector_env_class(TokenChoiceCore)

ENV_ID = "llm_envs/TokenChoice-v0"
TOL = 1e-4


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def world_kwargs(test_world):
    return dict(lm=test_world.lm_dir, reward=test_world.rm_dir, prompts=test_world.train_prompts[:200],
                gold=test_world.gold, device="cpu", max_new_tokens=16)


@pytest.fixture(scope="module")
def tok(test_world):
    return load_tokenizer(test_world.lm_dir)


@pytest.fixture(scope="module")
def llama_rm(tok):
    """A random Llama-style reward model (rotary positions, eager attention) on the world's tokenizer."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=max(tok.get_vocab().values()) + 1, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_labels=1,
                         max_position_embeddings=128, pad_token_id=tok.pad_token_id, initializer_range=0.2)
    return AutoModelForSequenceClassification.from_config(config, attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def other_tok(tok):
    """A word-level tokenizer over the world's words with other ids: a reward model that does not share ids."""
    words = sorted(tok.get_vocab(), key=lambda w: -tok.get_vocab()[w])
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=tok.unk_token or words[0]))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=tok.eos_token, pad_token=tok.pad_token,
                                   unk_token=tok.unk_token or words[0])


@pytest.fixture(scope="module")
def other_rm(other_tok):
    torch.manual_seed(1)
    config = GPT2Config(vocab_size=len(other_tok.get_vocab()), n_positions=128, n_embd=32, n_layer=2, n_head=4,
                        num_labels=1, pad_token_id=other_tok.pad_token_id)
    return GPT2ForSequenceClassification(config).eval()


def _raw_score(model, seq: list[int]) -> float:
    """What the ARGS reference computes: one unpadded forward of exactly these ids."""
    with torch.no_grad():
        return float(model(torch.tensor([seq])).logits[0, 0])


def _episode(env, rng: np.random.Generator, check) -> int:
    """Play masked-random slots, calling `check(env, info)` before every step; returns steps. Checks the
    episode's `decisions` (steps with more than one legal slot) against the masks it saw."""
    _, info = env.reset(seed=int(rng.integers(1 << 20)))
    steps = choices = 0
    while True:
        check(env, info)
        mask = env.unwrapped.action_masks()
        choices += int(mask.sum() > 1)
        slot = int(rng.choice(np.flatnonzero(mask))) if rng.random() < 0.7 else 0
        _, _, terminated, truncated, info = env.step(slot)
        steps += 1
        if terminated or truncated:
            assert info["episode_stats"]["decisions"] == choices
            return steps


# ----------------------------------------------------------------------------- checkers, registration


@pytest.mark.parametrize("extra", [{}, {"obs_rewards": True, "dense_reward": True, "top_p": 0.8}])
def test_gymnasium_and_sb3_checkers_pass(world_kwargs, extra):
    from gymnasium.utils.env_checker import check_env
    from stable_baselines3.common.env_checker import check_env as sb3_check_env

    env = gym.make(ENV_ID, **world_kwargs, **extra)
    check_env(env.unwrapped, skip_render_check=True)
    sb3_check_env(env.unwrapped, warn=True)


def test_registration_spaces_and_observation_layout(world_kwargs, test_world, tok):
    env = gym.make("llm_envs:" + ENV_ID, k=7, temperature=0.5, **world_kwargs)
    core = env.unwrapped.core
    hidden = core.hidden_size
    assert env.action_space == gym.spaces.Discrete(7) and env.observation_space.shape == (hidden + 7 + 1,)
    lm = load_causal_lm(test_world.lm_dir, device="cpu")
    obs, info = env.reset(seed=3)
    for _ in range(4):
        ids = tok(info["prompt"])["input_ids"] + core.rows[0].response
        with torch.no_grad():
            out = lm(torch.tensor([ids]), output_hidden_states=True)
        logits = out.logits[0, -1]
        top = torch.topk(logits, 7)
        assert info["candidate_ids"] == top.indices.tolist()
        np.testing.assert_allclose(env.unwrapped.candidate_logits(), top.values.numpy(), atol=TOL)
        np.testing.assert_allclose(obs[:hidden], out.hidden_states[-1][0, -1].numpy(), atol=TOL)
        logp = torch.log_softmax(logits.double() / 0.5, -1)[top.indices].clamp(min=LOGPROB_FLOOR)
        np.testing.assert_allclose(obs[hidden : hidden + 7], logp.numpy(), atol=TOL)
        assert obs[-1] == pytest.approx(len(core.rows[0].response) / 16)
        obs, _, _, _, info = env.step(2)


# ----------------------------------------------------------------------------- candidate rewards


@pytest.mark.parametrize("which", ["world_gpt2_rm", "llama_rm_eager", "other_tokenizer"])
@pytest.mark.parametrize("scoring", ["wrapper", "raw"])
def test_candidate_rewards_equal_scoring_each_candidate_from_scratch(
    which, scoring, world_kwargs, test_world, tok, llama_rm, other_rm, other_tok
):
    if which == "world_gpt2_rm":
        model, rm_tok = load_reward_model(test_world.rm_dir, device="cpu"), tok
    elif which == "llama_rm_eager":
        model, rm_tok = llama_rm, tok
    else:
        model, rm_tok = other_rm, other_tok
    wrapper = RewardWrapper.from_model(model, tokenizer=rm_tok, lm_tokenizer=tok, device="cpu")
    fresh = RewardWrapper.from_model(model, tokenizer=rm_tok, lm_tokenizer=tok, device="cpu")
    env = gym.make(ENV_ID, **{**world_kwargs, "reward": wrapper, "max_new_tokens": 12})
    uses_cache = which != "other_tokenizer"
    assert env.unwrapped.core.scorer.uses_prefix_cache == uses_cache
    checked = []

    def check(env, info):
        prompt_ids, response = tok(info["prompt"])["input_ids"], env.unwrapped.core.rows[0].response
        calls, verified = wrapper.calls, prefix_cache_verdict(wrapper)
        got = env.unwrapped.candidate_rewards(scoring)
        if uses_cache and verified:  # after the first (checked) call: one forward per step
            assert wrapper.calls == calls + 1
        for c, value in zip(info["candidate_ids"], got):
            if scoring == "raw" and uses_cache:
                expected = _raw_score(model, prompt_ids + response + [c])
            else:  # the wrapper's own score of the text, from scratch
                expected = fresh.score_ids([prompt_ids], [response + [c]])[0]
            assert abs(value - expected) <= TOL, (c, value, expected)
        checked.append(len(got))

    rng = np.random.default_rng(0)
    for _ in range(2):
        _episode(env, rng, check)
    assert len(checked) >= 8


def test_scorer_edge_cases_match_scratch(test_world, tok):
    """EOS / pad / turn-marker candidates, responses holding them, new episodes, kept candidates, cache growth."""
    model = load_reward_model(test_world.rm_dir, device="cpu")
    wrapper = RewardWrapper.from_model(model, lm_tokenizer=tok, device="cpu")
    scorer = CandidateScorer(wrapper, 3, tok)
    marker = tok.convert_tokens_to_ids("Human:")
    specials = [tok.eos_token_id, tok.pad_token_id, marker]
    prompts = [tok(p)["input_ids"] for p in test_world.test_prompts[:3]]
    responses: list[list[int]] = [[], [], []]
    rng = np.random.default_rng(1)
    for step in range(24):
        cands = [[int(c) for c in rng.choice(300, 5, replace=False)] for _ in range(3)]
        for i in range(3):
            cands[i][i] = specials[i]
        for scoring in ("raw", "wrapper"):
            got, prefix = scorer.score([0, 1, 2], prompts, responses, cands, scoring=scoring, prefix=True)
            for i in range(3):
                for j, c in enumerate(cands[i]):
                    if scoring == "raw":
                        expected = _raw_score(model, prompts[i] + responses[i] + [c])
                    else:
                        expected = wrapper.score_ids([prompts[i]], [responses[i] + [c]])[0]
                    assert abs(got[i, j] - expected) <= TOL, (step, scoring, i, c)
                expected = (_raw_score(model, prompts[i] + responses[i]) if scoring == "raw"
                            else wrapper.score_ids([prompts[i]], [responses[i]])[0])
                assert abs(prefix[i] - expected) <= TOL
        for i in range(3):
            responses[i].append(cands[i][int(rng.integers(5))])
        if step == 12:
            prompts[1], responses[1] = tok(test_world.test_prompts[7])["input_ids"], []
    kv = scorer._kv  # chosen candidates were kept by moving their slot: no slots pile up over 48 calls of 5
    assert scorer.uses_prefix_cache and kv.kept > 0 and kv.cache.capacity < 24 * 8


def test_prefix_cache_disagreement_warns_and_falls_back(test_world, tok, monkeypatch):
    from llm_envs.rewards import candidates

    model = load_reward_model(test_world.rm_dir, device="cpu")
    wrapper = RewardWrapper.from_model(model, lm_tokenizer=tok, device="cpu")
    original = candidates._PrefixKV.run
    monkeypatch.setattr(candidates._PrefixKV, "run",
                        lambda self, *a: [([v + 1.0 for v in c], p) for c, p in original(self, *a)])
    prompt, response, cands = [tok("Human: hi Assistant:")["input_ids"]], [[]], [[5, 9, 12]]
    with pytest.warns(RuntimeWarning, match="prefix KV cache is off"):
        got = score_candidates(wrapper, prompt, response, cands, tok)
    expected = [wrapper.score_ids(prompt, [[c]])[0] for c in cands[0]]
    np.testing.assert_allclose(got[0], expected, atol=TOL)
    assert prefix_cache_verdict(wrapper) is False and not CandidateScorer(wrapper, 1, tok).uses_prefix_cache


# ----------------------------------------------------------------------------- masks and actions


def test_slot_zero_always_valid_nucleus_mask_and_k_bounded_by_the_vocabulary(world_kwargs):
    """k can be the whole vocabulary (every token a slot, the nucleus masks the tail), never more: slots
    past the vocabulary would be observations of nothing, so k > vocabulary is a clear error."""
    vocab = load_causal_lm(world_kwargs["lm"], device="cpu").config.vocab_size
    with pytest.raises(ValueError, match=f"k={vocab + 5} exceeds the LM's vocabulary of {vocab} tokens"):
        gym.make(ENV_ID, **{**world_kwargs, "k": vocab + 5})
    env = gym.make(ENV_ID, **{**world_kwargs, "k": vocab, "top_p": 0.5, "obs_rewards": True})
    core = env.unwrapped.core
    rng = np.random.default_rng(4)

    def check(env, info):
        mask = env.unwrapped.action_masks()
        state = core.rows[0]
        probs = torch.softmax(core.engine.model(torch.tensor([core.engine.tokens(0)])).logits[0, -1].double(), -1)
        sorted_p = probs[state.cand_ids]
        nucleus = int(((sorted_p.cumsum(0) - sorted_p) < 0.5).sum().clamp(min=1))
        assert mask[0] and mask.sum() == nucleus and mask[:nucleus].all()
        assert sorted(env.unwrapped.candidate_ids().tolist()) == list(range(vocab))  # every token, once

    with torch.no_grad():
        steps = _episode(env, rng, check)
    # obs_rewards: every position's candidates scored, in one or more reward-model batches (k = the vocabulary).
    assert core.rows[0].rm_calls >= steps
    env.reset(seed=0)
    top = int(core.rows[0].cand_ids[0])
    _, _, _, _, info = env.step(vocab - 1)  # the least likely token: masked, replaced by slot 0
    assert info["forced_action"] and core.rows[0].response == [top]
    strict = gym.make(ENV_ID, **{**world_kwargs, "top_p": 0.01, "invalid_action": "raise"})
    strict.reset(seed=0)
    assert strict.unwrapped.action_masks().tolist() == [True] + [False] * 9
    with pytest.raises(ValueError, match="masked"):
        strict.step(3)


def test_bad_actions_kwargs_and_call_order_fail_clearly(world_kwargs):
    env = gym.make(ENV_ID, **world_kwargs).unwrapped
    with pytest.raises(RuntimeError, match="before reset"):
        env.step(0)
    env.reset(seed=0)
    for bad in (10, -1, 0.5, "x", True):
        with pytest.raises(ValueError, match="outside the action space"):
            env.step(bad)
    for kwargs, match in [({"k": 0}, "k="), ({"top_p": 0.0}, "top_p"), ({"invalid_action": "x"}, "invalid_action"),
                          ({"max_new_tokens": 0}, "max_new_tokens"), ({"deviation_beta": -1.0}, "deviation_beta")]:
        with pytest.raises(ValueError, match=match):
            gym.make(ENV_ID, **{**world_kwargs, **kwargs})


# ----------------------------------------------------------------------------- rewards


def test_terminal_and_dense_rewards(world_kwargs, test_world):
    rm = RewardWrapper.from_model(test_world.rm_dir, device="cpu")
    sparse = gym.make(ENV_ID, deviation_beta=0.1, **world_kwargs)
    dense = gym.make(ENV_ID, deviation_beta=0.1, dense_reward=True, **world_kwargs)
    rng = np.random.default_rng(5)
    for env in (sparse, dense):
        env.reset(seed=1)
        rewards, info, running = [], {}, []
        while "response_ids" not in info:
            _, reward, _, _, info = env.step(int(rng.integers(3)))
            rewards.append(reward)
            running.append(rm.score_ids([env.unwrapped.core.rows[0].prompt_ids],
                                        [env.unwrapped.core.rows[0].response], load_tokenizer(test_world.lm_dir))[0])
        parts = info["reward_parts"]
        assert parts["reward_model"] == pytest.approx(rm.score([info["prompt"]], [info["response_text"]])[0], abs=TOL)
        assert sum(rewards) == pytest.approx(sum(v for key, v in parts.items() if key != "gold"), abs=TOL)
        assert parts["deviation_cost"] <= 0 and "gold" in parts
        if env is dense:  # r_t = R(x, y_<=t) - R(x, y_<t)
            start = -parts["prompt_baseline"]
            shaped = np.diff([start] + running)
            costs = np.array(rewards) - shaped
            assert (costs <= 1e-6).all() and costs.sum() == pytest.approx(parts["deviation_cost"], abs=TOL)


# ----------------------------------------------------------------------------- vector forms


def test_vector_rows_equal_single_envs(world_kwargs):
    n, seed = 3, 11
    kwargs = {**world_kwargs, "obs_rewards": True, "dense_reward": True}
    venv = gym.make_vec(ENV_ID, num_envs=n, **kwargs)
    assert isinstance(venv, TokenChoiceVectorEnv)
    singles = [gym.make(ENV_ID, **kwargs) for _ in range(n)]
    obs, _ = venv.reset(seed=seed)
    single_obs = [env.reset(seed=seed + i)[0] for i, env in enumerate(singles)]
    rng = np.random.default_rng(6)
    pending = [False] * n
    episodes = 0
    for _ in range(40):
        masks = venv.action_masks()
        cand = venv.candidate_rewards()
        actions = np.array([rng.choice(np.flatnonzero(m)) for m in masks])
        for i, env in enumerate(singles):
            if not pending[i]:
                np.testing.assert_allclose(obs[i], single_obs[i], atol=1e-5)
                np.testing.assert_allclose(cand[i], env.unwrapped.candidate_rewards(), atol=1e-5)
                assert masks[i].tolist() == env.unwrapped.action_masks().tolist()
        obs, rewards, terminated, truncated, infos = venv.step(actions)
        for i, env in enumerate(singles):
            if pending[i]:
                single_obs[i], _ = env.reset()
                pending[i] = False
                continue
            single_obs[i], reward, te, tr, info = env.step(int(actions[i]))
            assert (terminated[i], truncated[i]) == (te, tr) and rewards[i] == pytest.approx(reward, abs=1e-5)
            if te or tr:
                episodes, pending[i] = episodes + 1, True
                assert list(infos["response_ids"][i]) == info["response_ids"]
    assert episodes >= 3


def test_sb3_vec_env_masks_and_autoreset(world_kwargs):
    from sb3_contrib.common.maskable.utils import get_action_masks, is_masking_supported

    venv = llm_envs.make_sb3_vec_env(ENV_ID, 4, **{**world_kwargs, "max_new_tokens": 4, "k": 5})
    venv.seed(0)
    obs = venv.reset()
    assert obs.shape == (4, venv.observation_space.shape[0]) and is_masking_supported(venv)
    assert isinstance(venv.core, TokenChoiceCore) and venv.core.candidate_rewards().shape == (4, 5)
    ended = 0
    for _ in range(8):
        masks = get_action_masks(venv)
        assert masks.shape == (4, 5) and masks[:, 0].all()
        obs, rewards, dones, infos = venv.step(np.ones(4, dtype=int))
        ended += int(dones.sum())
        for i in np.flatnonzero(dones):
            assert "terminal_observation" in infos[i] and "response_ids" in infos[i]
    assert ended >= 4 and rewards.dtype == np.float32
