"""Seeds of the leaderboard and the sweeps: which seeds a method runs with, and how a row or a sweep
point aggregates them (one implementation for both).

A method runs once per seed (`bench.seeds`, or the row's own `seeds:`):

- a trained method (proxy, rrhf, a custom agent whose class takes `seed`) trains one model per seed
  (seed s becomes its `train.seed` / `rrhf.seed`, so each seed has its own run directory) and samples
  its evaluation with s;
- a sampling method (top_k, nucleus, best_of_n, ARGS stochastic) samples its evaluation with s;
- a deterministic method (greedy, ARGS greedy) gives the same responses for every seed, so it runs
  once, with the first seed.

Aggregation (`seed_stat`): the value of a row is the mean over seeds of each seed's mean over prompts;
the spread is the sample standard deviation (ddof=1) of those seed means (None with one seed: no
spread can be estimated); the 95% CI is over prompts: each prompt's score averaged over the seeds,
then `mean_ci95` (1.96 * sd / sqrt(prompts)) of those per-prompt means. The CI says how sure the
mean is given these prompts; the spread says how much a rerun with another seed moves it. A value of
None (a reward the protocol's skip rule left unscored, `agents.metric_rules`) does not count: a mean is
over the values there are (nan when a seed has none).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from agents.metrics import mean_ci95
from benchmarks.bench.config import TRAINED_KINDS, BenchConfig, MethodConfig

# The harness seeds prompt i (or its chunk) with `seed + i`; seed s samples with s * this stride, so
# two seeds never reuse one random stream (seed 1 would otherwise replay seed 0's stream shifted by a
# prompt). Seed 0 samples with 0, as the single-seed suites before seeds did. Seeds go up to
# config.MAX_SEED, so the product stays within torch's 32-bit CPU seeds.
SAMPLING_SEED_STRIDE = 1_000_000


def evaluation_seed(seed: int) -> int:
    """The harness seed of a run with seed `seed` (see SAMPLING_SEED_STRIDE)."""
    return seed * SAMPLING_SEED_STRIDE


def is_deterministic(method: MethodConfig) -> bool:
    """True when every seed gives the same responses (greedy; ARGS greedy, its default mode)."""
    return method.kind == "greedy" or (method.kind == "args" and method.params.get("mode", "greedy") == "greedy")


def method_seeds(method: MethodConfig, bench: BenchConfig) -> tuple[int, ...]:
    """The seeds a method runs with: its own, else the bench's; the first only when it is deterministic."""
    seeds = method.seeds if method.seeds is not None else bench.seeds
    return seeds[:1] if is_deterministic(method) else tuple(seeds)


def _custom_takes_seed(method: MethodConfig) -> bool:
    from benchmarks.bench.methods import import_entry

    try:
        return "seed" in inspect.signature(import_entry(method.entry)).parameters
    except (TypeError, ValueError):  # no introspectable signature: pass nothing
        return False


def seeded_method(method: MethodConfig, seed: int) -> MethodConfig:
    """The method of one seed: a trained method gets it as its training seed (params.seed, which also
    names its run directory); a custom class that takes `seed` (and is not given one) gets it too."""
    takes_seed = method.kind in TRAINED_KINDS or (
        method.kind == "custom" and "seed" not in method.params and _custom_takes_seed(method))
    if not takes_seed:
        return method
    return dataclasses.replace(method, params={**method.params, "seed": seed}, seeds=(seed,))


@dataclass(frozen=True)
class SeedStat:
    """A metric over seeds: `mean` of the seed means, `ci95` over prompts, `seed_sd` across seeds."""

    mean: float
    ci95: float
    seed_means: list[float]
    seed_sd: float | None


def by_seed(episodes: Sequence[dict[str, Any]]) -> dict[int, list[dict[str, Any]]]:
    """Episodes grouped by their seed, seeds in ascending order."""
    groups: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for episode in episodes:
        groups[episode["seed"]].append(episode)
    return dict(sorted(groups.items()))


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if len(values) else float("nan")


def seed_means(episodes: Sequence[dict[str, Any]], key: str) -> list[float]:
    """Each seed's mean of `key` over the episodes that have a value, seeds in ascending order."""
    return [_mean([e[key] for e in group if e[key] is not None]) for group in by_seed(episodes).values()]


def seed_mean(episodes: Sequence[dict[str, Any]], key: str) -> float:
    """The mean over seeds of each seed's mean of `key` (every seed weighs the same)."""
    return float(np.mean(seed_means(episodes, key)))


def seed_sd(means: Sequence[float]) -> float | None:
    """Sample standard deviation (ddof=1) of seed means; None with fewer than two seeds."""
    return float(np.std(means, ddof=1)) if len(means) > 1 else None


def seed_stat(episodes: Sequence[dict[str, Any]], key: str) -> SeedStat:
    """Mean over seeds, the spread of the seed means, and the 95% CI over prompts (module docstring)."""
    means = seed_means(episodes, key)
    per_prompt: dict[int, list[float]] = defaultdict(list)
    for episode in episodes:
        if episode[key] is not None:
            per_prompt[episode["index"]].append(episode[key])
    _, half = mean_ci95([float(np.mean(v)) for v in per_prompt.values()]) if per_prompt else (0.0, float("nan"))
    return SeedStat(float(np.mean(means)), half, means, seed_sd(means))
