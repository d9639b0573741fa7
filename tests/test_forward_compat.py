"""transformers forward compatibility: our model calls use the KV-cache keyword the installed
forward declares (``cache=`` from 5.24, ``past_key_values=`` before), so the forward path emits
no deprecation warning or deprecation log line."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from transformers.utils import logging as hf_logging

import agents
import benchmarks
import llm_envs
from agents.decoding import GreedyDecoder, diverse_beam_search, encode_prompts
from llm_envs.engine import DecodeEngine
from llm_envs.models import cache_kwarg, load_causal_lm, load_reward_model, load_tokenizer
from llm_envs.rewards import CandidateScorer, RewardWrapper, prefix_cache_verdict

pytestmark = pytest.mark.usefixtures("one_torch_thread")

OUR_DIRS = tuple(str(Path(m.__file__).parent) for m in (llm_envs, agents, benchmarks))
OLD_NAMES = ("past_key_values", "cache_params")


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextmanager
def deprecations() -> Iterator[tuple[list[warnings.WarningMessage], list[str]]]:
    """Record every warning, and transformers' log lines (its `warning_once` memory cleared first,
    so a line already logged earlier in the session is seen again)."""
    hf_logging.warning_once.cache_clear()
    handler = _Records()
    root = logging.getLogger("transformers")
    root.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield caught, handler.messages
    finally:
        root.removeHandler(handler)


def offending(caught: list[warnings.WarningMessage], logged: list[str]) -> list[str]:
    bad = [f"{w.category.__name__}: {w.message} ({w.filename})" for w in caught
           if any(name in str(w.message) for name in OLD_NAMES)
           or (issubclass(w.category, (FutureWarning, DeprecationWarning)) and w.filename.startswith(OUR_DIRS))]
    return bad + [line for line in logged if any(name in line for name in OLD_NAMES)]


@pytest.fixture(scope="module")
def world_models(test_world):
    tok = load_tokenizer(test_world.lm_dir)
    lm = load_causal_lm(test_world.lm_dir, device="cpu")
    rm = load_reward_model(test_world.rm_dir, device="cpu")
    prompts = test_world.test_prompts[:3]
    return tok, lm, rm, prompts, encode_prompts(tok, prompts)


def test_the_capture_sees_a_deprecated_call(world_models) -> None:
    """Control: the old keyword on a forward that declares the new one is caught."""
    _, lm, _, _, prompt_ids = world_models
    if cache_kwarg(lm) != "cache":
        pytest.skip("this transformers still takes past_key_values= (before 5.24): nothing is deprecated")
    from transformers import DynamicCache

    with deprecations() as (caught, logged), torch.no_grad():
        lm(input_ids=torch.tensor([prompt_ids[0]]), past_key_values=DynamicCache(config=lm.config), use_cache=True)
    assert offending(caught, logged)


def test_forward_path_emits_no_deprecation(world_models) -> None:
    tok, lm, rm, prompts, prompt_ids = world_models
    wrapper = RewardWrapper.from_model(rm, tokenizer=tok, lm_tokenizer=tok, device="cpu")
    with deprecations() as (caught, logged):
        engine = DecodeEngine(lm, 2, bucket_size=4)  # an episode: prefill, steps, rejections, bucket changes
        out = engine.reset_rows([0, 1], prompt_ids[:2])
        for step in range(6):
            out = engine.append(out.logits.argmax(-1))
            if step % 2:
                engine.drop_last([0])
        scorer = CandidateScorer(wrapper, 2, tok)  # reward-model prefix cache, checked on first use
        responses: list[list[int]] = [[], []]
        for _ in range(3):
            top = out.logits.topk(4, dim=-1).indices.tolist()
            scorer.score([0, 1], prompt_ids[:2], responses, top, scoring="raw")
            for row in range(2):
                responses[row].append(top[row][0])
        assert scorer.uses_prefix_cache and prefix_cache_verdict(wrapper) is True
        diverse_beam_search(lm, tok, prompt_ids, max_new_tokens=5, num_beams=2, num_beam_groups=2)
        GreedyDecoder(lm, tok).generate(prompts, max_new_tokens=5)
    assert not offending(caught, logged), offending(caught, logged)
