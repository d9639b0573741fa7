"""A first look at the product: the embedded world, its LM's answers, one reward wrapper.

`llm-envs demo` builds the world if needed, decodes held-out test prompts greedily and with
best-of-8 nucleus sampling (picked by the reward model), and scores every answer with the
same two reward wrappers every method uses: the learned reward model and the gold judge.
The gap between the two rows is the headroom that alignment methods compete for.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from llm_envs.models import load_causal_lm, load_tokenizer
from llm_envs.rewards import RewardWrapper
from llm_envs.world import load_world
from llm_envs.world.report import generate_answers


def run_demo(
    num_prompts: int = 8,
    *,
    size: str = "default",
    seed: int = 0,
    cache_dir: str | None = None,
    best_of: int = 8,
    verbose: bool = True,
) -> dict[str, Any]:
    if num_prompts < 1:
        raise ValueError(f"num_prompts={num_prompts}; expected at least 1.")
    world = load_world(size, seed, cache_dir)
    every = max(1, len(world.test_prompts) // num_prompts)  # spread over tasks (sorted by task)
    prompts = world.test_prompts[::every][:num_prompts]
    lm = load_causal_lm(world.lm_dir, device="cpu")
    tokenizer = load_tokenizer(world.lm_dir)
    reward_model = RewardWrapper.from_model(world.rm_dir, lm_tokenizer=tokenizer, device="cpu")
    gold = RewardWrapper.from_callable(world.gold, name="world-gold")

    started = time.perf_counter()
    greedy = generate_answers(lm, tokenizer, prompts, do_sample=False)
    samples = generate_answers(lm, tokenizer, prompts, do_sample=True,
                               num_return_sequences=best_of, seed=seed)
    sample_rm = np.array(reward_model.score([p for p in prompts for _ in range(best_of)], samples))
    picks = sample_rm.reshape(num_prompts, best_of).argmax(axis=1)
    best = [samples[i * best_of + j] for i, j in enumerate(picks)]
    seconds = time.perf_counter() - started

    rows = {}
    for method, responses in (("greedy", greedy), (f"best-of-{best_of} (by RM)", best)):
        rm_scores, gold_scores = reward_model.score(prompts, responses), gold.score(prompts, responses)
        rows[method] = {
            "reward_mean": round(float(np.mean(rm_scores)), 4),
            "gold_mean": round(float(np.mean(gold_scores)), 4),
            "examples": [
                {"prompt": p, "response": r, "reward": round(s, 3), "gold": round(g, 3)}
                for p, r, s, g in zip(prompts, responses, rm_scores, gold_scores)
            ],
        }
    summary = {
        "world": str(world.path),
        "headroom": {k: world.report[k] for k in
                     ("greedy_low_gold_frac", "nucleus_best_gold_frac", "rm_gold_agreement")},
        "methods": rows,
        "reward_model_calls": reward_model.calls,
        "decode_seconds": round(seconds, 2),
    }
    if verbose:
        _print_summary(summary)
    return summary


def _print_summary(summary: dict[str, Any]) -> None:
    print(f"world: {summary['world']}")
    print("headroom: " + ", ".join(f"{k}={v}" for k, v in summary["headroom"].items()))
    for method, row in summary["methods"].items():
        print(f"\n== {method}: mean reward {row['reward_mean']:+.3f}, mean gold {row['gold_mean']:+.3f}")
        for ex in row["examples"][:4]:
            print(f"  {ex['prompt']}\n    -> {ex['response']}   [rm {ex['reward']:+.2f}, gold {ex['gold']:+.2f}]")
    print("\nNext: gym.make('llm_envs/TokenAccept-v0') steers this LM token by token (see README).")
