"""Shared checks of the parity tests: vector rows == single envs (SAME_STEP autoreset), and a
cache-free reference of the ARGS rule (tests/test_args.py, tests/test_real_lm.py)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pytest
import torch


def same_step_rows_match_singles(step: tuple, singles: Sequence[Any], actions: np.ndarray, atol: float = 1e-5) -> int:
    """Step each single env with its row's action and check the vector step `step` against them:
    done flags, rewards, the ended rows' `final_obs` / `final_info`, and every row's observation (a
    single env that ended is reset, as SAME_STEP does). Returns how many rows ended."""
    obs, rewards, terminated, truncated, infos = step
    ended = 0
    for i, env in enumerate(singles):
        last, reward, te, tr, info = env.step(int(actions[i]))
        assert (terminated[i], truncated[i]) == (te, tr) and rewards[i] == pytest.approx(reward, abs=atol)
        if te or tr:
            ended += 1
            np.testing.assert_allclose(infos["final_obs"][i], last, atol=atol)
            assert list(infos["final_info"]["response_ids"][i]) == info["response_ids"]
            last, _ = env.reset()
        np.testing.assert_allclose(obs[i], last, atol=atol)
    return ended


def reference_args(lm: Any, rm_score: Callable[[list[int]], float], tok: Any, prompt: str, *, k: int, w: float,
                   mode: str, temperature: float = 0.7, max_new_tokens: int, seed: int | None = None) -> list[int]:
    """The rule as the reference computes it, with no cache and one sequence at a time.

    `rm_score(ids)` scores the LM ids prompt + response + [candidate] (the raw RM on them when the
    tokenizers match; with another RM tokenizer the caller decodes and re-tokenises there).
    Every step: a full forward of prompt + response, `torch.topk` of the raw last logits, each
    candidate scored by `rm_score(ids)` on its own, `score = r * w + logit`; greedy takes
    `torch.topk(score, 1)`, stochastic one `torch.multinomial(softmax(score / T), 1)` after a
    single `torch.manual_seed(seed)`. Never stops at EOS (the reference's fixed length).
    """
    if seed is not None:
        torch.manual_seed(seed)
    ids, response = tok(prompt)["input_ids"], []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = lm(torch.tensor([ids + response])).logits[0, -1]
            top_logits, top_ids = torch.topk(logits, k)
            rewards = torch.tensor([rm_score(ids + response + [int(c)]) for c in top_ids], dtype=torch.float32)
            scores = rewards * w + top_logits
            if mode == "greedy":
                pick = torch.topk(scores, 1).indices[0]
            else:
                pick = torch.multinomial(torch.softmax(scores / temperature, dim=-1), 1)[0]
            response.append(int(top_ids[pick]))
    return response
