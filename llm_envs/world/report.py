"""The world's headroom report: does the world leave room for alignment methods to show?

All figures are on the test split (prompts disjoint from the ones the LM and RM were trained on):

- `greedy_low_gold_frac`: share of prompts where greedy decoding gets gold < LOW_GOLD.
- `nucleus_best_gold_frac`: share of prompts where at least one of `nucleus_samples`
  top-p 0.9 / T 1.0 samples reaches the best gold score.
- `rm_gold_agreement`: share of held-out preference pairs the RM orders as the gold judge does.
- `decision_positions`: teacher-forcing the ideal answer, the answer positions where the LM's
  greedy token differs from the ideal one (where a policy must intervene), and whether the
  right token there depends on the prompt.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from transformers import (
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    PreTrainedTokenizerFast,
)

from llm_envs.world import grammar, grammar_v2
from llm_envs.world.build import Pair, score_pairs
from llm_envs.world.decisions import decision_report
from llm_envs.world.gold import gold_reward as gold_reward_v1
from llm_envs.world.grammars import get_grammar


def _word_counts(greedy: Sequence[str], sampled: Sequence[str]) -> dict[str, float]:
    """Answer lengths in words (= tokens of the word-level tokenizer, EOS not counted)."""
    lengths = np.array([len(a.split()) for a in sampled])
    return {"greedy_mean": round(float(np.mean([len(a.split()) for a in greedy])), 1),
            "nucleus_mean": round(float(lengths.mean()), 1), "nucleus_min": int(lengths.min()),
            "nucleus_max": int(lengths.max())}


@torch.inference_mode()
def generate_answers(
    lm: GPT2LMHeadModel,
    tokenizer: PreTrainedTokenizerFast,
    prompts: Sequence[str],
    *,
    do_sample: bool,
    num_return_sequences: int = 1,
    max_new_tokens: int = 40,
    batch_size: int = 64,
    seed: int = 0,
) -> list[str]:
    """Responses in prompt-major order (prompt 0's samples first), EOS and padding removed."""
    torch.manual_seed(seed)
    tokenizer.padding_side = "left"
    out: list[str] = []
    for start in range(0, len(prompts), batch_size):
        batch = tokenizer(list(prompts[start : start + batch_size]), return_tensors="pt",
                          padding=True, add_special_tokens=False)
        sample_args = dict(top_p=0.9, temperature=1.0, top_k=0) if do_sample else {}
        generated = lm.generate(
            **batch,
            do_sample=do_sample,
            num_return_sequences=num_return_sequences,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **sample_args,
        )
        new_tokens = generated[:, batch["input_ids"].shape[1] :]
        out += tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    return [" ".join(text.split()) for text in out]


def _decision_positions(
    lm: GPT2LMHeadModel, tokenizer: PreTrainedTokenizerFast, requests: Sequence[grammar.Request]
) -> dict[str, Any]:
    """Where greedy decoding leaves the ideal answer *and that costs gold*.

    Teacher-force each prompt's ideal answer; at every position where the LM's greedy token
    differs from the ideal one, finish the answer greedily twice: once from the greedy token,
    once from the ideal token. The position is a decision when the greedy token's answer gets
    the lower gold score; a synonym (both finish alike) is not a decision.
    """
    divergences: list[tuple[grammar.Request, int, str]] = []  # request, position, right token
    starts: list[str] = []  # per divergence: [prefix + greedy token, prefix + ideal token]
    for request in requests:
        ideal = grammar.ideal_answer(request)
        prompt_ids = tokenizer(request.text, add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(ideal.text, add_special_tokens=False)["input_ids"]
        with torch.inference_mode():
            logits = lm(input_ids=torch.tensor([prompt_ids + answer_ids])).logits[0]
        greedy = logits[len(prompt_ids) - 1 : -1].argmax(-1).tolist()
        for pos, (g, y) in enumerate(zip(greedy, answer_ids)):
            if g != y:
                divergences.append((request, pos, tokenizer.convert_ids_to_tokens(y)))
                starts += [tokenizer.decode(prompt_ids + answer_ids[:pos] + [t]) for t in (g, y)]
    completions = generate_answers(lm, tokenizer, starts, do_sample=False)
    answers = [s.split("Assistant:", 1)[1] + " " + c for s, c in zip(starts, completions)]
    by_position: Counter[int] = Counter()
    right_tokens: dict[int, set[str]] = {}
    parts: Counter[str] = Counter()
    for i, (request, pos, right) in enumerate(divergences):
        took_greedy, took_ideal = gold_reward_v1([request.text] * 2, answers[2 * i : 2 * i + 2])
        if took_greedy >= took_ideal:
            continue
        by_position[pos] += 1
        right_tokens.setdefault(pos, set()).add(right)
        ideal = grammar.ideal_answer(request)
        body_len = len(f"{ideal.opener} , {ideal.body} .".split())
        parts["opener" if pos == 0 else "tail" if pos == body_len else "body"] += 1
    n = len(requests)
    frequent = sorted(p for p, c in by_position.items() if c >= 0.05 * n)
    return {
        "positions": frequent,
        "count": len(frequent),
        "share_of_prompts_by_position": {str(p): round(by_position[p] / n, 3) for p in sorted(by_position)},
        "share_of_prompts_by_part": {k: round(v / n, 3) for k, v in sorted(parts.items())},
        "right_token_depends_on_prompt": any(len(right_tokens.get(p, ())) > 1 for p in frequent),
        "right_tokens_by_position": {str(p): sorted(right_tokens[p]) for p in frequent},
    }


def _rm_bias(rm: GPT2ForSequenceClassification, tokenizer: PreTrainedTokenizerFast,
             test: Sequence[grammar_v2.Request]) -> dict[str, Any]:
    """World v2's documented RM biases, measured: how often the RM prefers the ideal answer with a
    flattering phrase, or with one step more than the prompt asked for, to the ideal answer."""
    ideal = [grammar_v2.ideal_answer(r) for r in test]
    flattered = [dataclasses.replace(a, flattery=True) for a in ideal]
    longer = [(r, dataclasses.replace(a, num_steps=a.num_steps + 1)) for r, a in zip(test, ideal)
              if a.comply and a.num_steps < len(grammar_v2.task_steps(a.topic))]
    prompts = [r.text for r in test]
    base = np.array(score_pairs(rm, tokenizer, prompts, [a.text for a in ideal]))
    flat = np.array(score_pairs(rm, tokenizer, prompts, [a.text for a in flattered]))
    long_prompts = [r.text for r, _ in longer]
    long_base = np.array(score_pairs(rm, tokenizer, long_prompts,
                                     [grammar_v2.ideal_answer(r).text for r, _ in longer]))
    long = np.array(score_pairs(rm, tokenizer, long_prompts, [a.text for _, a in longer]))
    return {
        "rm_prefers_flattery_frac": round(float(np.mean(flat > base)), 4),
        "rm_prefers_extra_step_frac": round(float(np.mean(long > long_base)), 4),
        "labeller": "gold + 0.5 per flattering phrase + 0.35 per step written (llm_envs/world/gold_v2.py)",
    }


def headroom_report(
    lm: GPT2LMHeadModel,
    rm: GPT2ForSequenceClassification,
    tokenizer: PreTrainedTokenizerFast,
    test: Sequence[Any],
    heldout_pairs: Sequence[Pair],
    *,
    nucleus_samples: int,
    seed: int,
    grammar_name: str = "v1",
    max_new_tokens: int = 40,
    decision_stride: int = 1,
) -> dict[str, Any]:
    rules = get_grammar(grammar_name)
    gold_reward = rules.gold_reward
    prompts = [r.text for r in test]
    greedy = generate_answers(lm, tokenizer, prompts, do_sample=False, max_new_tokens=max_new_tokens)
    greedy_gold = np.array(gold_reward(prompts, greedy))

    sampled = generate_answers(lm, tokenizer, prompts, do_sample=True, max_new_tokens=max_new_tokens,
                               num_return_sequences=nucleus_samples, batch_size=32, seed=seed)
    sample_prompts = [p for p in prompts for _ in range(nucleus_samples)]
    sample_gold = np.array(gold_reward(sample_prompts, sampled)).reshape(len(prompts), nucleus_samples)

    chosen = score_pairs(rm, tokenizer, [p.prompt for p in heldout_pairs], [p.chosen for p in heldout_pairs])
    rejected = score_pairs(rm, tokenizer, [p.prompt for p in heldout_pairs], [p.rejected for p in heldout_pairs])
    agreement = float(np.mean(np.array(chosen) > np.array(rejected)))

    if grammar_name == "v1":
        decisions = _decision_positions(lm, tokenizer, test)
        extra: dict[str, Any] = {}
    else:
        decisions = decision_report(
            lm, tokenizer, test[::decision_stride], gold_reward,
            lambda texts: generate_answers(lm, tokenizer, texts, do_sample=False, max_new_tokens=max_new_tokens))
        extra = {"rm_bias": _rm_bias(rm, tokenizer, test), "answer_words": _word_counts(greedy, sampled)}
    return {
        "grammar": grammar_name,
        "greedy_low_gold_frac": round(float(np.mean(greedy_gold < rules.low_gold)), 4),
        "nucleus_best_gold_frac": round(float(np.mean(sample_gold.max(axis=1) >= rules.best_gold)), 4),
        "rm_gold_agreement": round(agreement, 4),
        "decision_positions": decisions,
        **extra,
        "greedy_gold_mean": round(float(greedy_gold.mean()), 4),
        "nucleus_sample_gold_mean": round(float(sample_gold.mean()), 4),
        "best_of_n_gold_mean": round(float(sample_gold.max(axis=1).mean()), 4),
        "low_gold_threshold": rules.low_gold,
        "best_gold": rules.best_gold,
        "greedy_examples": [{"prompt": p, "response": r} for p, r in list(zip(prompts, greedy))[:3]],
    }
