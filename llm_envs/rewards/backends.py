"""The two scoring backends run on ready inputs, and the checks on what goes in and comes out.

`RewardWrapper` (`llm_envs.rewards.wrapper`) decides what a backend reads (the rules, the chat reading,
the ids fast path, the reward model's specials); this module runs it:

- `model_scores`: a reward model's scores of exact input id sequences, batched with right padding
  (shortest first, so a batch holds little padding);
- `function_scores`: a function ``fn(prompts, responses)``, batched, its result checked to be one real
  number per pair (`as_floats`);
- `check_pairs` / `check_finite`: a call's arguments, and the scores, with errors that name the pair.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["as_floats", "check_finite", "check_pairs", "function_scores", "model_scores", "short"]

PairText = Callable[[int], tuple[str, str]]  # pair i -> (prompt, response) as a message shows them


def short(text: str, limit: int = 200) -> str:
    """`text` repr'd for a message, cut at `limit` characters."""
    return repr(text if len(text) <= limit else text[:limit] + "...")


def check_pairs(prompts: Any, responses: Any, item_type: type, where: str) -> tuple[list[Any], list[Any]]:
    """`prompts` and `responses` as lists, after checking they are sequences of the same length whose items
    are `item_type` (``str``, or ``Sequence`` for token-id rows); `where` names the call in errors."""
    for label, seq in (("prompts", prompts), ("responses", responses)):
        if isinstance(seq, (str, bytes)) or not isinstance(seq, Sequence):
            raise TypeError(f"{where}: {label} must be a list, got {type(seq).__name__}: {short(str(seq), 80)}.")
    if len(prompts) != len(responses):
        raise ValueError(f"{where}: got {len(prompts)} prompts but {len(responses)} responses; "
                         "pass one response per prompt.")
    for label, seq in (("prompts", prompts), ("responses", responses)):
        for i, item in enumerate(seq):
            if not isinstance(item, item_type) or (item_type is Sequence and isinstance(item, str)):
                want = "str" if item_type is str else "a list of token ids"
                raise TypeError(f"{where}: {label}[{i}] is {type(item).__name__} ({short(str(item), 80)}); "
                                f"expected {want}.")
    return list(prompts), list(responses)


def check_finite(scores: list[float], backend: str, pair_text: PairText) -> None:
    """Raise on the first non-finite score, naming the pair (`pair_text`) and the `backend`."""
    for i, value in enumerate(scores):
        if not math.isfinite(value):
            p, r = pair_text(i)
            raise ValueError(
                f"reward backend {backend} returned a non-finite score ({value}) for pair {i}: prompt {short(p)}, "
                f"response {short(r)}. Check the reward function / model (e.g. dtype overflow: try dtype='float32').")


def model_scores(model: Any, seqs: list[list[int]], token_types: list[list[int]] | None, pad_id: int,
                 batch_size: int | None) -> tuple[list[float], int]:
    """The reward model's score (logit 0) of each input id sequence, and how many forwards it took: batches
    of `batch_size` (None: one batch) taken shortest first, right-padded with `pad_id` (every row's
    positions start at 0), with `token_types` when the model reads them. Sequences must be non-empty."""
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))  # less padding per batch
    step = batch_size or max(1, len(seqs))
    out, calls = [0.0] * len(seqs), 0
    with torch.inference_mode():
        for start in range(0, len(order), step):
            idx = order[start : start + step]
            width = max(len(seqs[i]) for i in idx)
            ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                ids[row, : len(seqs[i])] = torch.tensor(seqs[i], dtype=torch.long)
                mask[row, : len(seqs[i])] = 1
            inputs: dict[str, torch.Tensor] = {"input_ids": ids, "attention_mask": mask}
            if token_types is not None:
                types = torch.zeros((len(idx), width), dtype=torch.long)
                for row, i in enumerate(idx):
                    types[row, : len(token_types[i])] = torch.tensor(token_types[i], dtype=torch.long)
                inputs["token_type_ids"] = types
            logits = model(**{k: v.to(model.device) for k, v in inputs.items()}).logits
            calls += 1
            for row, value in zip(idx, logits[:, 0].float().cpu().tolist()):
                out[row] = float(value)
    return out, calls


def function_scores(fn: Callable[[list[str], list[str]], Any], prompts: list[str], responses: list[str],
                    batch_size: int | None, name: str) -> tuple[list[float], int]:
    """``fn`` on the pairs in batches of `batch_size` (None: one batch), each result checked (`as_floats`);
    the scores and how many calls it took. `name` names the function in errors."""
    step = batch_size or max(1, len(prompts))
    out: list[float] = []
    calls = 0
    for start in range(0, len(prompts), step):
        p, r = prompts[start : start + step], responses[start : start + step]
        result = fn(p, r)
        calls += 1
        out.extend(as_floats(result, len(p), start, name))
    return out, calls


def as_floats(result: Any, expected: int, offset: int, name: str) -> list[float]:
    """A reward function's `result` for a batch of `expected` pairs (pair `offset` first) as floats: a list,
    tuple, 1-D array or tensor of real numbers, one per pair; anything else raises, naming function `name`."""
    where = f"reward function {name!r}"
    if isinstance(result, torch.Tensor):
        result = result.detach().cpu().numpy()
    if isinstance(result, np.ndarray):
        if result.ndim != 1:
            raise TypeError(f"{where} returned an array of shape {result.shape}; expected a 1-D list of {expected} "
                            "floats.")
        result = result.tolist()
    if isinstance(result, (str, bytes, dict)) or not isinstance(result, Sequence):
        raise TypeError(f"{where} returned {type(result).__name__} ({short(str(result), 80)}); expected a list of "
                        f"{expected} floats, one per (prompt, response) pair.")
    if len(result) != expected:
        raise ValueError(f"{where} returned {len(result)} scores for a batch of {expected} pairs; it must return one "
                         "float per pair, in order.")
    values = []
    for j, value in enumerate(result):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{where} returned {type(value).__name__} ({short(str(value), 80)}) for pair "
                            f"{offset + j}; expected a real number.")
        values.append(float(value))
    return values
