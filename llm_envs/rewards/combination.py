"""The weighted-sum backend's mechanics: checking terms, counting their compute, adding their scores.

A reward can be ``sum_i weight_i * score_i`` over several reward wrappers (MARA: reward − cost;
`llm_envs.rewards.wrapper.RewardWrapper.combine`). The wrapper module keeps the dispatch (which
backend scores a call); this module holds what does not depend on the wrapper class itself, so the
wrapper module stays readable: `check_terms`, and `WeightedSum`, the mixin with the counting and the
sum. Terms are read through a small protocol (`Counted`), so this module imports no other.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import numpy as np

__all__ = ["Counted", "WeightedSum", "check_terms"]


class Counted(Protocol):
    """What a term exposes for compute accounting (a `RewardWrapper` does)."""

    calls: int
    pairs_scored: int
    truncated: int


def check_terms(terms: Any, term_type: type) -> None:
    """Terms are ``(term_type instance, finite non-zero weight)`` pairs, at least one; else a ValueError
    naming the bad term and the expected form."""
    if isinstance(terms, (str, bytes)) or not isinstance(terms, Sequence) or not terms:
        raise ValueError(f"terms={terms!r}; expected a non-empty list of ({term_type.__name__}, weight) pairs, e.g. "
                         "[(reward_rm, 1.0), (cost_rm, -1.0)].")
    for i, term in enumerate(terms):
        ok = isinstance(term, tuple) and len(term) == 2 and isinstance(term[0], term_type)
        weight = term[1] if ok else None
        if not ok or isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not math.isfinite(weight):
            raise ValueError(f"terms[{i}]={term!r}; expected a ({term_type.__name__}, finite weight) pair, e.g. "
                             f"({term_type.__name__}.build(cost_model_dir), -1.0).")
        if float(weight) == 0.0:
            raise ValueError(f"terms[{i}] has weight 0: it would add nothing while its model still runs; drop it.")


class WeightedSum:
    """Mixin of the reward wrapper: a weighted sum's counters and scores (``terms`` is None for the other
    backends, which these methods then leave alone)."""

    terms: tuple[tuple[Any, float], ...] | None
    calls: int
    pairs_scored: int
    truncated: int

    @contextlib.contextmanager
    def counting_terms(self) -> Iterator[None]:
        """Add what this weighted sum's terms count inside the block (batches, pairs, truncations) to its
        own counters: the sum's compute is every model's. A no-op for other backends."""
        if self.terms is None:
            yield
            return
        terms: list[Counted] = [t for t, _ in self.terms]
        before = [(t.calls, t.pairs_scored, t.truncated) for t in terms]
        try:
            yield
        finally:
            for t, (calls, pairs, truncated) in zip(terms, before):
                self.calls += t.calls - calls
                self.pairs_scored += t.pairs_scored - pairs
                self.truncated += t.truncated - truncated

    def weighted_scores(self, score: Callable[[Any], Sequence[float]]) -> list[float]:
        """``sum(weight * score(term))`` over the terms, pair by pair, counted (`counting_terms`)."""
        assert self.terms is not None, "weighted_scores needs a weighted-sum backend"
        total: np.ndarray | None = None
        with self.counting_terms():
            for term, weight in self.terms:
                values = np.asarray(score(term), dtype=np.float64) * weight
                total = values if total is None else total + values
        return [float(v) for v in (total if total is not None else [])]
