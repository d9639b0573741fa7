"""TokenAccept-v0: checkers, HF generate parity, cache-free reference, SKAM, vector parity, errors."""

from __future__ import annotations


import gymnasium as gym
import numpy as np
import pytest
from parity import same_step_rows_match_singles
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import llm_envs
from llm_envs.envs.pools import Pool, nucleus_pools, reference_pool
from llm_envs.envs.params import TokenAcceptParams
from llm_envs.envs.token_accept import ACCEPT, NUM_FEATURES, REJECT, gate_allows_reject, skam_allows_reject
from llm_envs.models import load_causal_lm, load_tokenizer
from llm_envs.vector import make_vector_env

ENV_ID = "llm_envs/TokenAccept-v0"


@pytest.fixture(scope="module")
def world_kwargs(test_world):
    return dict(lm=test_world.lm_dir, reward=test_world.rm_dir, prompts=test_world.train_prompts[:200],
                gold=test_world.gold, device="cpu", max_new_tokens=24)


@pytest.fixture(scope="module")
def tiny_llama_dir(test_world, tmp_path_factory):
    """A random Llama-style LM on the world's tokenizer, saved like any hub model."""
    tok = load_tokenizer(test_world.lm_dir)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=max(tok.get_vocab().values()) + 1, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, eos_token_id=tok.eos_token_id,
                         bos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    path = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _random_episode(env, rng, reject_prob=0.4, max_steps=200):
    """Play masked-random actions; returns (actions, observations, infos, rewards)."""
    obs, info = env.reset(seed=int(rng.integers(1 << 30)))
    actions, observations, infos, rewards = [], [obs], [info], []
    for _ in range(max_steps):
        mask = env.unwrapped.action_masks()
        action = REJECT if mask[REJECT] and rng.random() < reject_prob else ACCEPT
        obs, reward, terminated, truncated, info = env.step(action)
        actions.append(action), observations.append(obs), infos.append(info), rewards.append(reward)
        if terminated or truncated:
            break
    return actions, observations, infos, rewards


# ----------------------------------------------------------------------------- checkers


@pytest.mark.parametrize("obs_mode", ["candidate", "prefix"])
def test_gymnasium_and_sb3_checkers_pass(world_kwargs, obs_mode):
    from gymnasium.utils.env_checker import check_env
    from stable_baselines3.common.env_checker import check_env as sb3_check_env

    env = gym.make(ENV_ID, obs_mode=obs_mode, **world_kwargs)
    check_env(env.unwrapped, skip_render_check=True)
    sb3_check_env(env.unwrapped, warn=True)


def test_make_with_module_prefix_registers_the_env(world_kwargs):
    env = gym.make("llm_envs:llm_envs/TokenAccept-v0", **world_kwargs)
    assert env.observation_space.shape == (env.unwrapped.core.hidden_size + NUM_FEATURES,)


# ----------------------------------------------------------------------------- references


@pytest.mark.parametrize("which", ["world_lm", "tiny_llama"])
def test_always_accept_at_top_p_1_equals_hf_greedy_generate(which, test_world, tiny_llama_dir):
    lm_dir = test_world.lm_dir if which == "world_lm" else tiny_llama_dir
    prompts = test_world.test_prompts[:4]
    env = gym.make(ENV_ID, lm=lm_dir, reward=lambda p, r: [0.0] * len(p), prompts=prompts,
                   top_p=1.0, temperature=1.0, max_new_tokens=20, device="cpu")
    model, tok = load_causal_lm(lm_dir, device="cpu"), load_tokenizer(lm_dir)
    for index, prompt in enumerate(prompts):
        env.reset(options={"prompt_index": index})
        done = False
        while not done:
            _, _, terminated, truncated, info = env.step(ACCEPT)
            done = terminated or truncated
        ids = torch.tensor([tok(prompt)["input_ids"]])
        expected = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                  max_new_tokens=20, eos_token_id=tok.eos_token_id,
                                  pad_token_id=tok.pad_token_id)[0, ids.shape[1]:].tolist()
        assert info["response_ids"] == expected


@pytest.mark.parametrize("obs_mode", ["candidate", "prefix"])
def test_observation_and_probs_equal_a_fresh_forward_without_cache(world_kwargs, test_world, obs_mode):
    env = gym.make(ENV_ID, obs_mode=obs_mode, temperature=0.75, **world_kwargs)
    model, tok = load_causal_lm(test_world.lm_dir, device="cpu"), load_tokenizer(test_world.lm_dir)
    hidden = env.unwrapped.core.hidden_size
    rng = np.random.default_rng(1)
    checked = 0
    for _ in range(3):
        actions, observations, infos, _ = _random_episode(env, rng)
        prompt_ids = tok(infos[0]["prompt"])["input_ids"]
        response: list[int] = []
        for step, (obs, info) in enumerate(zip(observations, infos)):
            candidate = info["candidate_id"]
            with torch.inference_mode():
                prefix = model(input_ids=torch.tensor([prompt_ids + response]), output_hidden_states=True)
                probs = torch.softmax(prefix.logits[0, -1].double() / 0.75, -1)
                if obs_mode == "candidate":
                    full = model(input_ids=torch.tensor([prompt_ids + response + [candidate]]),
                                 output_hidden_states=True)
                    expected_h = full.hidden_states[-1][0, -1]
                else:
                    expected_h = prefix.hidden_states[-1][0, -1]
            assert np.abs(obs[:hidden] - expected_h.numpy()).max() <= 1e-4
            assert abs(info["candidate_prob"] - float(probs[candidate])) <= 1e-4
            assert abs(obs[-NUM_FEATURES] - float(probs[candidate])) <= 1e-4
            checked += 1
            if step < len(actions) and actions[step] == ACCEPT and "response_ids" not in infos[step + 1]:
                response.append(candidate)
    assert checked > 20


# ----------------------------------------------------------------------------- SKAM


def _pool(probs: list[float]) -> Pool:
    return Pool.from_sorted(list(range(len(probs))), probs)


@pytest.mark.parametrize(
    "probs, rejections, p_t, expected",
    [
        ([0.5, 0.25, 0.125, 0.125], 0, 0.1, True),  # mean 0.25 > 0.1
        ([0.5, 0.25, 0.125, 0.125], 2, 0.125, False),  # mean left 0.125, not > 0.125
        ([0.5, 0.25, 0.125, 0.125], 2, 0.124, True),
        ([0.5, 0.25, 0.125, 0.125], 3, 0.0, False),  # |T'| = 1: never reject the last token
        ([1.0], 0, 0.0, False),
        ([0.5, 0.25, 0.125, 0.125], 0, 0.25, False),  # mean exactly p_t: not above it
        ([0.4, 0.3, 0.2, 0.05], 1, 0.18, True),  # mean of [0.3, 0.2, 0.05] = 0.1833 > 0.18
    ],
)
def test_skam_mask_equals_the_formula(probs, rejections, p_t, expected):
    pool = _pool(probs)
    assert skam_allows_reject(pool, rejections, p_t) is expected
    left = probs[rejections:]
    assert expected == (len(left) > 1 and sum(left) > p_t * len(left))


def test_rejection_cap_masks_reject():
    pool = _pool([0.3, 0.3, 0.2, 0.2])
    assert skam_allows_reject(pool, 1, 0.0, max_rejections=2)
    assert not skam_allows_reject(pool, 2, 0.0, max_rejections=2)


def test_nucleus_pool_is_the_smallest_prefix_reaching_top_p():
    logits = torch.log(torch.tensor([[0.05, 0.5, 0.3, 0.15]]))
    (pool,) = nucleus_pools(logits, top_p=0.8, top_k=None, temperature=1.0).rows()
    assert pool.ids.tolist() == [1, 2]  # 0.5 + 0.3 reaches 0.8
    (pool,) = nucleus_pools(logits, top_p=0.81, top_k=None, temperature=1.0).rows()
    assert pool.ids.tolist() == [1, 2, 3]
    (pool,) = nucleus_pools(logits, top_p=0.81, top_k=2, temperature=1.0).rows()
    assert pool.ids.tolist() == [1, 2]


def _remaining_pool_probs(model, core, row: int = 0) -> list[float]:
    """p of the tokens left in the row's pool, from a cache-free forward and a full sort."""
    state = core.rows[0]
    prefix = state.prompt_ids + state.response
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([prefix])).logits[0, -1]
    params = core.params
    pool = reference_pool(logits, top_p=params.top_p, top_k=params.top_k, temperature=params.temperature)
    return pool.probs[state.rejections:].tolist()


def test_env_mask_matches_formula_and_rejected_tokens_never_return(world_kwargs, test_world):
    env = gym.make(ENV_ID, p_t=0.001, **world_kwargs)
    core = env.unwrapped.core
    model = load_causal_lm(test_world.lm_dir, device="cpu")
    rng = np.random.default_rng(2)
    for _ in range(4):
        env.reset(seed=int(rng.integers(1000)))
        seen_here: set[int] = set()
        position = 0
        for _ in range(150):
            state = core.rows[0]
            left = _remaining_pool_probs(model, core)
            formula = len(left) > 1 and sum(left) > 0.001 * len(left)
            assert env.unwrapped.action_masks().tolist() == [True, formula]
            assert state.candidate not in seen_here
            action = REJECT if formula and rng.random() < 0.7 else ACCEPT
            seen_here.add(state.candidate)
            _, _, terminated, truncated, info = env.step(action)
            if terminated or truncated:
                break
            if info["position"] != position:
                position, seen_here = info["position"], set()


# ----------------------------------------------------------------------------- decision masks (gates)


def test_pool_entropy_is_the_full_vocabulary_entropy_after_temperature():
    torch.manual_seed(0)
    logits = torch.randn(3, 50) * 3
    logits[1, :10] = float("-inf")  # tokens of probability 0 add nothing (no NaN)
    pools = nucleus_pools(logits, top_p=0.5, top_k=None, temperature=0.7, with_entropy=True).rows()
    for row, pool in zip(logits, pools):
        p = torch.softmax(row.double() / 0.7, -1)
        p = p[p > 0]
        assert pool.entropy == pytest.approx(float(-(p * p.log()).sum()), abs=1e-12)
        assert pool.top_prob == pytest.approx(float(p.max()), abs=1e-15)
    assert all(np.isnan(p.entropy) for p in nucleus_pools(logits, top_p=0.5, top_k=None, temperature=0.7).rows())


@pytest.mark.parametrize("params, entropy, probs, expected", [
    (dict(decision_mask="entropy", entropy_threshold=1.0), 1.0, [0.6, 0.4], True),  # >= opens
    (dict(decision_mask="entropy", entropy_threshold=1.0), 0.999, [0.6, 0.4], False),
    (dict(decision_mask="confidence", confidence_threshold=0.6), 0.5, [0.6, 0.4], False),  # < opens, = does not
    (dict(decision_mask="confidence", confidence_threshold=0.61), 0.5, [0.6, 0.4], True),
    (dict(), 0.0, [0.99, 0.01], True),  # plain SKAM: the gate is always open
])
def test_gates_equal_their_formula(params, entropy, probs, expected):
    assert gate_allows_reject(Pool.from_sorted(list(range(len(probs))), probs, entropy), TokenAcceptParams(**params)) \
        is expected


def _brute_force_position(model, state, temperature: float) -> tuple[float, float, list[float]]:
    """(entropy, top-1 p, p of the pool tokens left) of a row's position, from a cache-free full forward."""
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([state.prompt_ids + state.response])).logits[0, -1].double()
    p = torch.softmax(logits / temperature, -1)
    entropy = float(-(p[p > 0] * p[p > 0].log()).sum())
    pool = reference_pool(logits, top_p=0.9, top_k=None, temperature=temperature)
    return entropy, float(p.max()), pool.probs[state.rejections:].tolist()


@pytest.mark.parametrize("mask, threshold, p_t", [
    ("entropy", 1.0, 0.001), ("confidence", 0.6, 0.001), ("entropy", 1.0, 0.0),  # p_t=0: the bare gate
])
def test_decision_masks_match_a_brute_force_computation_along_a_random_walk(world_kwargs, test_world, mask,
                                                                             threshold, p_t):
    """Along random walks (random legal rejects), the env's reject mask equals the gate's formula on a
    full forward's logits (softmax at the temperature, entropy, top-1) and SKAM's on a full sort, and
    `decisions` counts the steps where it was open."""
    temperature = 0.75
    env = gym.make(ENV_ID, p_t=p_t, temperature=temperature, decision_mask=mask,
                   **{f"{mask}_threshold": threshold}, **world_kwargs)
    core = env.unwrapped.core
    model = load_causal_lm(test_world.lm_dir, device="cpu")
    rng = np.random.default_rng(7)
    gates_seen: set[bool] = set()
    for _ in range(2):
        env.reset(seed=int(rng.integers(1000)))
        open_steps = 0
        for _ in range(60):
            entropy, top1, left = _brute_force_position(model, core.rows[0], temperature)
            gate = entropy >= threshold if mask == "entropy" else top1 < threshold
            expected = gate and len(left) > 1 and sum(left) > p_t * len(left)
            assert env.unwrapped.action_masks().tolist() == [True, expected]
            gates_seen.add(gate)
            open_steps += expected
            action = REJECT if expected and rng.random() < 0.6 else ACCEPT
            _, _, terminated, truncated, info = env.step(action)
            if terminated or truncated:
                assert info["episode_stats"]["decisions"] == open_steps
                break
    assert gates_seen == {True, False}  # the threshold splits the walk's positions: both branches checked


def test_masked_reject_is_coerced_or_raises(world_kwargs):
    env = gym.make(ENV_ID, p_t=0.99, **world_kwargs)  # reject is (almost) always masked
    env.reset(seed=0)
    assert not env.unwrapped.action_masks()[REJECT]
    _, _, _, _, info = env.step(REJECT)
    assert info["forced_accept"] and info["position"] == 1
    strict = gym.make(ENV_ID, p_t=0.99, invalid_action="raise", **world_kwargs)
    strict.reset(seed=0)
    with pytest.raises(ValueError, match="masked"):
        strict.step(REJECT)


# ----------------------------------------------------------------------------- rewards


def test_terminal_reward_is_the_reward_wrapper_score_plus_costs(world_kwargs, test_world):
    from llm_envs.rewards import RewardWrapper

    env = gym.make(ENV_ID, rejection_cost=0.05, deviation_beta=0.1, **world_kwargs)
    actions, _, infos, rewards = _random_episode(env, np.random.default_rng(3))
    final = infos[-1]
    rm = RewardWrapper.from_model(test_world.rm_dir, device="cpu")
    expected = rm.score([final["prompt"]], [final["response_text"]])[0]
    parts = final["reward_parts"]
    assert parts["reward_model"] == pytest.approx(expected, abs=1e-4)
    assert parts["rejection_cost"] == pytest.approx(-0.05 * actions.count(REJECT))
    assert parts["deviation_cost"] <= 0.0
    assert sum(rewards) == pytest.approx(sum(parts[k] for k in ("reward_model", "rejection_cost", "deviation_cost")))
    assert parts["gold"] == pytest.approx(test_world.gold([final["prompt"]], [final["response_text"]])[0])
    assert all(r <= 0 for r in rewards[:-1])
    assert final["episode_stats"]["rejections"] == actions.count(REJECT)


def test_truncates_at_max_new_tokens_and_scores_the_partial_response(world_kwargs):
    env = gym.make(ENV_ID, **{**world_kwargs, "max_new_tokens": 3})
    env.reset(seed=0)
    for _ in range(3):
        _, reward, terminated, truncated, info = env.step(ACCEPT)
    assert truncated and not terminated and len(info["response_ids"]) == 3
    assert reward == info["reward_parts"]["reward_model"]


# ----------------------------------------------------------------------------- vector forms


def test_vector_rows_equal_single_envs_with_the_same_seeds_and_actions(world_kwargs):
    n, seed = 3, 11
    venv = gym.make_vec(ENV_ID, num_envs=n, **world_kwargs)
    singles = [gym.make(ENV_ID, **world_kwargs) for _ in range(n)]
    obs, _ = venv.reset(seed=seed)
    single_obs = [env.reset(seed=seed + i)[0] for i, env in enumerate(singles)]
    rng = np.random.default_rng(5)
    pending_reset = [False] * n  # NEXT_STEP: a finished row starts over on its next step
    episodes = 0
    for step in range(80):
        masks = venv.action_masks()
        actions = np.where(masks[:, REJECT] & (rng.random(n) < 0.4), REJECT, ACCEPT)
        for i, env in enumerate(singles):
            if not pending_reset[i]:
                assert masks[i].tolist() == env.unwrapped.action_masks().tolist()
                np.testing.assert_allclose(obs[i], single_obs[i], atol=1e-5)
        calls = venv.core.engine.forward_calls
        obs, rewards, terminated, truncated, infos = venv.step(actions)
        if not any(pending_reset):
            assert venv.core.engine.forward_calls <= calls + 1  # one batched forward per step
        for i, env in enumerate(singles):
            if pending_reset[i]:
                single_obs[i], _ = env.reset()
                pending_reset[i] = False
                np.testing.assert_allclose(obs[i], single_obs[i], atol=1e-5)
                assert rewards[i] == 0 and not (terminated[i] or truncated[i])
                continue
            single_obs[i], reward, te, tr, info = env.step(int(actions[i]))
            assert (terminated[i], truncated[i]) == (te, tr)
            assert rewards[i] == pytest.approx(reward, abs=1e-5)
            if te or tr:
                episodes += 1
                pending_reset[i] = True
                assert list(infos["response_ids"][i]) == info["response_ids"]
    assert episodes >= 3


@pytest.mark.parametrize("autoreset_mode", ["NextStep", "SameStep"])
def test_prompts_prefilled_ahead_change_nothing_but_the_forward_count(world_kwargs, autoreset_mode):
    """prefill_ahead=True (the default) and False give the same episodes (prompts, tokens, masks,
    rewards; observations to float rounding: a prompt's prefill batch differs), through autoresets and
    a reseeded reset; True needs fewer forwards."""
    n = 4
    envs = [make_vector_env(ENV_ID, n, autoreset_mode=autoreset_mode, prefill_ahead=flag,
                            **{**world_kwargs, "max_new_tokens": 6}) for flag in (True, False)]
    rng = np.random.default_rng(2)
    ended = 0
    for seed in (3, 4):
        (obs_a, info_a), (obs_b, info_b) = (env.reset(seed=seed) for env in envs)
        np.testing.assert_allclose(obs_a, obs_b, atol=1e-5)
        for _ in range(30):
            masks = envs[0].action_masks()
            assert (masks == envs[1].action_masks()).all()
            actions = np.where(masks[:, REJECT] & (rng.random(n) < 0.4), REJECT, ACCEPT)
            (obs_a, r_a, te_a, tr_a, info_a), (obs_b, r_b, te_b, tr_b, info_b) = (env.step(actions) for env in envs)
            np.testing.assert_allclose(obs_a, obs_b, atol=1e-5)
            np.testing.assert_allclose(r_a, r_b, atol=1e-5)
            assert (te_a == te_b).all() and (tr_a == tr_b).all()
            assert (info_a["prompt"] == info_b["prompt"]).all()
            assert (info_a["candidate_id"] == info_b["candidate_id"]).all()
            ended += int((te_a | tr_a).sum())
    assert ended >= 2 * n
    with_ahead, without = (env.unwrapped.core.engine.forward_calls for env in envs)
    assert with_ahead < without
    # A reset of every env prefills afresh: the same seed gives the same bits whatever the bank holds.
    first, _ = envs[0].reset(seed=3)
    for _ in range(12):
        envs[0].step(np.zeros(n, dtype=np.int64))
    again, _ = envs[0].reset(seed=3)
    assert np.array_equal(first, again)


def test_same_step_autoreset_rows_equal_single_envs_and_share_the_forward(world_kwargs):
    """SAME_STEP: a finished row starts over inside the step; the new rows' first candidates go in
    the step's batched forward (a step costs at most a prefill plus one forward)."""
    n, seed = 3, 4
    kwargs = {**world_kwargs, "max_new_tokens": 5}
    venv = make_vector_env(ENV_ID, n, autoreset_mode="SameStep", **kwargs)
    singles = [gym.make(ENV_ID, **kwargs) for _ in range(n)]
    obs, _ = venv.reset(seed=seed)
    for i, env in enumerate(singles):
        env.reset(seed=seed + i)
    rng = np.random.default_rng(6)
    ended = 0
    for _ in range(30):
        masks = venv.action_masks()
        actions = np.where(masks[:, REJECT] & (rng.random(n) < 0.3), REJECT, ACCEPT)
        calls = venv.core.engine.forward_calls
        obs, rewards, terminated, truncated, infos = venv.step(actions)
        done = terminated | truncated
        assert venv.core.engine.forward_calls <= calls + (2 if done.any() else 1)
        ended += same_step_rows_match_singles((obs, rewards, terminated, truncated, infos), singles, actions)
    assert ended >= 3


def test_sb3_vec_env_autoresets_in_the_same_step_with_masks(world_kwargs):
    from sb3_contrib.common.maskable.utils import get_action_masks, is_masking_supported

    venv = llm_envs.make_sb3_vec_env(ENV_ID, 4, **{**world_kwargs, "max_new_tokens": 4})
    venv.seed(0)
    obs = venv.reset()
    assert obs.shape == (4, venv.observation_space.shape[0]) and is_masking_supported(venv)
    ended = 0
    for _ in range(12):
        masks = get_action_masks(venv)
        assert masks.shape == (4, 2) and masks[:, ACCEPT].all()
        obs, rewards, dones, infos = venv.step(np.zeros(4, dtype=int))
        for i in np.flatnonzero(dones):
            ended += 1
            assert "terminal_observation" in infos[i] and "response_ids" in infos[i]
            assert infos[i]["TimeLimit.truncated"] == (infos[i]["response_ids"][-1] != venv.core.ctx.eos_token_id)
    assert ended >= 4 and rewards.dtype == np.float32


def test_maskable_ppo_trains_a_few_steps_on_the_sb3_view(world_kwargs):
    from sb3_contrib import MaskablePPO
    from stable_baselines3.common.logger import Logger

    venv = llm_envs.make_sb3_vec_env(ENV_ID, 2, **{**world_kwargs, "max_new_tokens": 6})
    model = MaskablePPO("MlpPolicy", venv, n_steps=16, batch_size=16, n_epochs=1, seed=0,
                        policy_kwargs=dict(net_arch=[32]), device="cpu")
    model.set_logger(Logger(folder=None, output_formats=[]))  # SB3's default logger leaves a /tmp/SB3-* dir
    model.learn(64)
    assert model.num_timesteps >= 64


# ----------------------------------------------------------------------------- bad input


def test_bad_actions_and_call_order_fail_clearly(world_kwargs):
    env = gym.make(ENV_ID, **world_kwargs).unwrapped
    with pytest.raises(RuntimeError, match="before reset"):
        env.step(ACCEPT)
    env.reset(seed=0)
    for bad in (2, -1, 0.5, "x", True):
        with pytest.raises(ValueError, match="outside the action space"):
            env.step(bad)
    env = gym.make(ENV_ID, **{**world_kwargs, "max_new_tokens": 1}).unwrapped
    env.reset(seed=0)
    env.step(ACCEPT)
    with pytest.raises(RuntimeError, match="after the episode ended"):
        env.step(ACCEPT)


def test_prompt_too_long_for_the_context_is_a_clear_error(world_kwargs):
    env = gym.make(ENV_ID, **{**world_kwargs, "max_new_tokens": 100}).unwrapped  # context 128
    long_prompt = "Human: " + "how do i bake bread ? " * 10 + "Assistant:"
    with pytest.raises(ValueError, match="max_prompt_tokens"):
        env.reset(options={"prompt": long_prompt})
    with pytest.raises(ValueError, match="empty"):
        env.reset(options={"prompt": "   "})
    with pytest.raises(ValueError, match="prompt_index"):
        env.reset(options={"prompt_index": 10_000})
    with pytest.raises(ValueError, match=r"reset options \['prompt_idx'\] are unknown.*Did you mean 'prompt_index'\?"):
        env.reset(options={"prompt_idx": 3})


def test_nan_reward_names_the_pair(world_kwargs):
    env = gym.make(ENV_ID, **{**world_kwargs, "reward": lambda p, r: [float("nan")] * len(p),
                              "max_new_tokens": 2})
    env.reset(seed=0)
    env.step(ACCEPT)
    with pytest.raises(ValueError, match="(?i)non-finite|nan"):
        env.step(ACCEPT)


@pytest.mark.parametrize("kwargs, match", [
    ({"p_t": 1.5}, "p_t"), ({"top_p": 0.0}, "top_p"), ({"temperature": 0.0}, "temperature"),
    ({"obs_mode": "pixels"}, "obs_mode"), ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"invalid_action": "ignore"}, "invalid_action"),
    ({"decision_mask": "entropi", "entropy_threshold": 1.0}, "decision_mask.*Did you mean 'entropy'"),
    ({"decision_mask": "entropy"}, "entropy_threshold=None; expected a finite number of nats"),
    ({"decision_mask": "entropy", "entropy_threshold": -0.1}, "entropy_threshold=-0.1"),
    ({"decision_mask": "entropy", "entropy_threshold": float("inf")}, "entropy_threshold=inf"),
    ({"decision_mask": "entropy", "entropy_threshold": 99.0}, r"entropy_threshold=99.0 exceeds ln\("),
    ({"decision_mask": "confidence", "confidence_threshold": 0.0}, "confidence_threshold=0.0; expected a top-1"),
    ({"decision_mask": "confidence", "confidence_threshold": 1.5}, "confidence_threshold=1.5"),
    ({"decision_mask": "confidence"}, "confidence_threshold=None"),
    ({"entropy_threshold": 1.0}, "entropy_threshold=1.0; expected None, since decision_mask='skam'"),
    ({"decision_mask": "entropy", "entropy_threshold": 1.0, "confidence_threshold": 0.5},
     "confidence_threshold=0.5; expected None"),
    ({"prefill_ahead": "yes"}, "prefill_ahead='yes'; expected True"),
])
def test_bad_kwargs_fail_clearly(world_kwargs, kwargs, match):
    with pytest.raises(ValueError, match=match):
        gym.make(ENV_ID, **{**world_kwargs, **kwargs})
