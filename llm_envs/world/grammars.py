"""The world's grammars by name: what a preset's corpus, judge and reward labels are made of.

A grammar bundles the functions a build needs (`split_requests`, the SFT mixture, the answer
samplers, the ideal answer) with its gold judge and the score its reward model's preference
pairs are ordered by. `v1` (`grammar.py` / `gold.py`): two decisions per answer, RM trained on
gold preferences. `v2` (`grammar_v2.py` / `gold_v2.py`): five decisions, three of them
prompt-dependent, RM trained on a deliberately biased labeller.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from llm_envs.world import gold, gold_v2, grammar, grammar_v2


@dataclass(frozen=True)
class Grammar:
    """One world grammar: the corpus's generator functions, its judge and its RM labels."""

    name: str
    split_requests: Callable[..., Any]
    draw_task_habits: Callable[..., Any]
    sample_sft_answer: Callable[..., Any]
    sample_any_answer: Callable[..., Any]
    ideal_answer: Callable[..., Any]
    default_mixture: Any
    gold_score: Callable[[str, str], float]
    gold_reward: Callable[[list[str], list[str]], list[float]]
    preference_score: Callable[[str, str], float]  # what the RM's training pairs are ordered by
    find_task: Callable[[str], str | None]
    tasks: tuple[str, ...]
    best_gold: float
    low_gold: float


GRAMMARS: dict[str, Grammar] = {
    "v1": Grammar(
        name="v1", split_requests=grammar.split_requests, draw_task_habits=grammar.draw_task_habits,
        sample_sft_answer=grammar.sample_sft_answer, sample_any_answer=grammar.sample_any_answer,
        ideal_answer=grammar.ideal_answer, default_mixture=grammar.Mixture(),
        gold_score=gold.gold_score, gold_reward=gold.gold_reward, preference_score=gold.gold_score,
        find_task=gold.find_task, tasks=tuple(t for t, _ in grammar.BENIGN_TASKS + grammar.HARMFUL_TASKS),
        best_gold=gold.BEST_GOLD, low_gold=gold.LOW_GOLD,
    ),
    "v2": Grammar(
        name="v2", split_requests=grammar_v2.split_requests, draw_task_habits=grammar_v2.draw_task_habits,
        sample_sft_answer=grammar_v2.sample_sft_answer, sample_any_answer=grammar_v2.sample_any_answer,
        ideal_answer=grammar_v2.ideal_answer, default_mixture=grammar_v2.Mixture(),
        gold_score=gold_v2.gold_score, gold_reward=gold_v2.gold_reward, preference_score=gold_v2.labeller_score,
        find_task=gold_v2.find_task, tasks=tuple(grammar_v2.all_tasks()),
        best_gold=gold_v2.BEST_GOLD, low_gold=gold_v2.LOW_GOLD,
    ),
}


def get_grammar(name: str) -> Grammar:
    if name not in GRAMMARS:
        raise ValueError(f"world grammar {name!r} is unknown; expected one of {sorted(GRAMMARS)}.")
    return GRAMMARS[name]
