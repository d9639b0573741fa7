"""Where a policy must decide: the decision positions of a world's answers (world v2's report).

Teacher-force each test prompt's ideal answer (and its EOS) through the SFT LM. At every
position, every token of the LM's top-p nucleus other than the ideal one is an *alternative*;
finish the answer greedily once from the ideal token and once from each alternative. The
position is a **decision** when some alternative's answer gets a lower gold score than the
ideal token's (a synonym, which finishes as well, is not a decision). Each decision gets the
grammar's kind (`grammar_v2.decision_kind`: stance, flattery, topic, length, tail), and the
report counts them per answer, with the ones whose right choice depends on the prompt apart.

A **greedy error** is a decision position where the LM's greedy token is itself one of the
gold-losing alternatives: what greedy decoding gets wrong when it is put back on the ideal path.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from llm_envs.world import grammar_v2

# A trained LM's nucleus at a decision is a few tokens; an untrained one's is the whole vocabulary.
# Alternatives are the nucleus tokens with at least MIN_ALTERNATIVE_PROB, at most MAX_ALTERNATIVES.
MAX_ALTERNATIVES = 6
MIN_ALTERNATIVE_PROB = 0.02


def _nucleus(probs: torch.Tensor, top_p: float) -> list[int]:
    """Token ids of the top-p nucleus (the smallest head of the sorted distribution holding top_p)
    that have at least `MIN_ALTERNATIVE_PROB`, at most `MAX_ALTERNATIVES + 1` of the likeliest."""
    sorted_probs, order = probs.sort(descending=True)
    keep = int((sorted_probs.cumsum(0) < top_p).sum().item()) + 1
    keep = min(keep, int((sorted_probs >= MIN_ALTERNATIVE_PROB).sum().item()), MAX_ALTERNATIVES + 1)
    return order[:keep].tolist()


def _branches(lm: PreTrainedModel, tok: PreTrainedTokenizerFast, requests: Sequence[grammar_v2.Request],
              top_p: float) -> list[dict[str, Any]]:
    """Per position with alternatives: the prefix, the ideal token, the alternatives and greedy's token."""
    eos = tok.eos_token_id
    out = []
    for index, request in enumerate(requests):
        prompt_ids = tok(request.text, add_special_tokens=False)["input_ids"]
        answer_ids = tok(grammar_v2.ideal_answer(request).text, add_special_tokens=False)["input_ids"] + [eos]
        with torch.inference_mode():
            logits = lm(input_ids=torch.tensor([prompt_ids + answer_ids[:-1]])).logits[0].float()
        probs = logits[len(prompt_ids) - 1:].softmax(-1)
        for pos, ideal in enumerate(answer_ids):
            nucleus = _nucleus(probs[pos], top_p)
            greedy = int(probs[pos].argmax())
            alternatives = [t for t in nucleus if t != ideal]
            if greedy != ideal and greedy not in alternatives:
                alternatives.append(greedy)
            if alternatives:
                out.append({"request": index, "pos": pos, "prefix": answer_ids[:pos], "ideal": ideal,
                            "alternatives": alternatives, "greedy": greedy, "prompt_ids": prompt_ids})
    return out


def decision_report(
    lm: PreTrainedModel,
    tok: PreTrainedTokenizerFast,
    requests: Sequence[grammar_v2.Request],
    gold_reward: Callable[[list[str], list[str]], list[float]],
    complete: Callable[[list[str]], list[str]],
    *,
    top_p: float = 0.9,
) -> dict[str, Any]:
    """The decision figures of world v2 (see the module docstring). `complete(texts)` finishes
    each prompt+prefix text greedily (the report's `generate_answers`)."""
    eos = tok.eos_token_id
    branches = _branches(lm, tok, requests, top_p)
    starts: list[str] = []
    index: list[tuple[int, int]] = []  # (branch, token) of each start
    for b, branch in enumerate(branches):
        for token in [branch["ideal"], *branch["alternatives"]]:
            index.append((b, token))
            starts.append(tok.decode(branch["prompt_ids"] + branch["prefix"] + [token], skip_special_tokens=True))
    completions = complete([s for s, (_, t) in zip(starts, index) if t != eos])
    answers, it = [], iter(completions)
    for start, (_, token) in zip(starts, index):
        answer = start.split("Assistant:", 1)[1]
        answers.append(answer if token == eos else f"{answer} {next(it)}")
    prompts = [requests[branches[b]["request"]].text for b, _ in index]
    golds = dict(zip(index, gold_reward(prompts, answers)))

    n = len(requests)
    positions, dependent, greedy_errors = np.zeros(n), np.zeros(n), np.zeros(n)
    kinds_per_prompt: defaultdict[str, set[int]] = defaultdict(set)
    kind_counts: Counter[str] = Counter()
    right_tokens: defaultdict[str, set[str]] = defaultdict(set)
    for b, branch in enumerate(branches):
        ideal_gold = golds[(b, branch["ideal"])]
        request = requests[branch["request"]]
        losing = [t for t in branch["alternatives"] if golds[(b, t)] < ideal_gold]
        if not losing:
            continue
        ideal_word = tok.convert_ids_to_tokens(branch["ideal"])
        kinds = {grammar_v2.decision_kind(request, branch["pos"], ideal_word, tok.convert_ids_to_tokens(t))
                 for t in losing}
        r = branch["request"]
        positions[r] += 1
        dependent[r] += bool(kinds & grammar_v2.PROMPT_DEPENDENT_DECISIONS)
        greedy_errors[r] += branch["greedy"] in losing
        for kind in kinds:
            kinds_per_prompt[kind].add(r)
            kind_counts[kind] += 1
            right_tokens[kind].add(ideal_word)
    every_kind = [*grammar_v2.DECISIONS, *sorted(set(kinds_per_prompt) - set(grammar_v2.DECISIONS))]
    present = [k for k in every_kind if len(kinds_per_prompt[k]) >= 0.05 * n]
    return {
        "decision_positions_per_answer": round(float(positions.mean()), 3),
        "prompt_dependent_positions_per_answer": round(float(dependent.mean()), 3),
        "greedy_error_positions_per_answer": round(float(greedy_errors.mean()), 3),
        "kinds": present,
        "count": len(present),
        "prompt_dependent_kinds": [k for k in present if k in grammar_v2.PROMPT_DEPENDENT_DECISIONS],
        "share_of_prompts_by_kind": {k: round(len(kinds_per_prompt[k]) / n, 3) for k in every_kind},
        "decisions_per_answer_by_kind": {k: round(kind_counts[k] / n, 3) for k in every_kind},
        "right_tokens_by_kind": {k: sorted(right_tokens[k])[:12] for k in every_kind},
        "right_token_depends_on_prompt": sum(len(right_tokens[k]) > 1 for k in present
                                             if k in grammar_v2.PROMPT_DEPENDENT_DECISIONS) >= 3,
        "nucleus_top_p": top_p,
    }
