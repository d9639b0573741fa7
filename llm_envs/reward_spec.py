"""A reward as a weighted sum of reward models: MARA's reward − cost, as data.

A task's ``reward`` names one reward model (a hub name or directory), or a list of terms:

    task:
      reward:
        - {model: PKU-Alignment/beaver-7b-v1.0-reward, weight: 1.0}
        - {model: PKU-Alignment/beaver-7b-v1.0-cost, weight: -1.0}

The reward of a (prompt, response) pair is then ``sum_i weight_i * score_i``, each model's score
computed by the one reward wrapper with that model's own tokenizer, template and fast paths
(`llm_envs.rewards.RewardWrapper.build` takes the list; `RewardWrapper.combine` takes built wrappers).

This module is plain data and its validation (no torch): a task's config is checked where it is read,
and the reward wrapper reads the same terms.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from llm_envs.config import did_you_mean

__all__ = ["TERM_EXAMPLE", "RewardTerm", "is_combination", "reward_label", "reward_terms", "weighted_name"]

TERM_EXAMPLE = "[{model: REWARD_MODEL, weight: 1.0}, {model: COST_MODEL, weight: -1.0}]"
_KEYS = ("model", "weight")


@dataclass(frozen=True)
class RewardTerm:
    """One reward model of a weighted sum: its hub name or directory, and its weight (-1.0 subtracts a
    cost model)."""

    model: str
    weight: float


def is_combination(spec: Any) -> bool:
    """Whether a ``reward`` value is a list of terms (rather than one model, function or wrapper)."""
    return isinstance(spec, (list, tuple))


def reward_terms(spec: Any, where: str = "reward") -> tuple[RewardTerm, ...]:
    """Validate a list of ``{model, weight}`` mappings (or `RewardTerm`s) into terms; every mistake is a
    ValueError naming `where`, the value, what was expected and the fix."""
    if not is_combination(spec):
        raise ValueError(f"{where}={spec!r} is not a list of terms; expected {TERM_EXAMPLE}, or one model's name.")
    if not spec:
        raise ValueError(f"{where} is an empty list; give at least one term, e.g. {TERM_EXAMPLE}, or one model's name.")
    terms = tuple(_term(item, f"{where}[{i}]") for i, item in enumerate(spec))
    seen: dict[str, int] = {}
    for i, term in enumerate(terms):
        if term.model in seen:
            raise ValueError(
                f"{where} lists model {term.model!r} twice (terms {seen[term.model]} and {i}); merge them into one "
                "term whose weight is the sum."
            )
        seen[term.model] = i
    return terms


def _term(item: Any, where: str) -> RewardTerm:
    if isinstance(item, RewardTerm):
        item = {"model": item.model, "weight": item.weight}
    if not isinstance(item, Mapping):
        raise ValueError(f"{where}={item!r} ({type(item).__name__}); expected a mapping {{model: NAME_OR_DIR, "
                         "weight: NUMBER}}.")
    for key in item:
        if key not in _KEYS:
            raise ValueError(f"{where} has an unknown key {key!r}.{did_you_mean(str(key), _KEYS)} A term has exactly "
                             "the keys 'model' and 'weight'.")
    for key in _KEYS:
        if key not in item:
            why = (" (no default: -1.0 subtracts a cost model, so a sign is never assumed)" if key == "weight" else "")
            raise ValueError(f"{where} has no {key!r}{why}; write it as {{model: NAME_OR_DIR, weight: NUMBER}}.")
    return RewardTerm(model=_model(item["model"], f"{where}.model"), weight=_weight(item["weight"], f"{where}.weight"))


def _model(value: Any, where: str) -> str:
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where}={value!r}; expected a reward or cost model's hub name or directory (a non-empty "
                         "string).")
    return value


def _weight(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise ValueError(f"{where}={value!r}; expected a finite number (1.0 adds a reward model, -1.0 subtracts a "
                         "cost model).")
    if float(value) == 0.0:
        raise ValueError(f"{where}=0: the term would add nothing while its model still runs; drop the term instead.")
    return float(value)


def reward_label(spec: Any) -> str:
    """A reward's name for result files: the model's name, or the sum written out, e.g.
    ``"1*PKU-Alignment/beaver-7b-v1.0-reward - 1*PKU-Alignment/beaver-7b-v1.0-cost"``."""
    if not is_combination(spec):
        return str(spec)
    return weighted_name([(t.weight, t.model) for t in reward_terms(spec)])


def weighted_name(terms: list[tuple[float, str]]) -> str:
    """``w1*name1 + w2*name2 - ...``, with weights written as %g."""
    text = ""
    for i, (weight, name) in enumerate(terms):
        sign = "-" if weight < 0 else "+"
        head = ("-" if sign == "-" else "") if i == 0 else f" {sign} "
        text += f"{head}{abs(weight):g}*{name}"
    return text
