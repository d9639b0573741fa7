"""The one evaluation harness: prompts + a `Decoder` -> scored per-episode records.

`llm-envs bench` (every leaderboard row), `llm-envs eval` and RRHF's evaluation all go through
`generate_timed` (steps 1-2) and `scored` (step 3), so every number they print is made the same way
(`evaluate_decoder` is the two in one; a bench launched on several processes runs step 2 on shares of
the prompts and step 3 on their join):

1. an untimed warm-up on the first prompt (lazy initialisation is not billed to the method);
2. generation of every prompt, a chunk at a time (prompt i keeps seed `seed + i`), timed, with the
   peak memory of the block;
3. every response scored by the task's one reward wrapper (and gold judge), plus ARGS's diversity,
   coherence (when an encoder is given) and the irregular-output check (`agents.metrics`), under the
   protocol's metric rules (`agents.metric_rules.MetricRules`: a pair whose reward-model input is too long
   is skipped and counted, diversity and coherence read the response up to its stop strings).

A record is a plain dict (`EPISODE_KEYS`); `summarize` turns records into the means every command
prints. The leaderboard (`benchmarks.bench.leaderboard`) aggregates the same records.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from agents.base import Decoder, Generation
from agents.metric_rules import MetricRules
from agents.metrics import SentenceEncoder, check_word_tokenizer, diversity, is_irregular, mean_ci95
from llm_envs.task import LMContext
from llm_envs.rewards import RewardWrapper

EPISODE_KEYS = ("index", "prompt", "response", "response_ids", "response_len", "reward", "gold", "diversity",
                "coherence", "irregular", "lm_forwards", "rm_calls", "extra")
# With a skip rule (MetricRules.reward_skip_tokens) every record also has "reward_skipped" (bool) and
# "reward_input_tokens" (int); a skipped record's "reward" is None.
SKIP_KEYS = ("reward_skipped", "reward_input_tokens")


@dataclass(frozen=True)
class Scorer:
    """What every method's responses are scored by: the reward wrapper, the gold judge, the encoder, and the
    protocol's metric rules (checked when built: a diversity tokenizer that cannot run fails before any method)."""

    reward: RewardWrapper
    gold: RewardWrapper | None = None
    encoder: SentenceEncoder | None = None
    rules: MetricRules = MetricRules()

    def __post_init__(self) -> None:
        check_word_tokenizer(self.rules.diversity_tokenizer)


@dataclass(frozen=True)
class Generated:
    """A decoder's responses to a prompt set, in prompt order, with what generating them cost (not yet
    scored: on several processes, each generates a share and one scores their join)."""

    generations: list[Generation]
    generate_seconds: float
    peak_memory_mb: float | None


@dataclass(frozen=True)
class Evaluation:
    """A decoder's scored records on a prompt set, with what generating them cost."""

    episodes: list[dict[str, Any]]
    generate_seconds: float
    peak_memory_mb: float | None


def unscored(ctx: LMContext) -> LMContext:
    """A context with a free reward and no gold judge, for the envs a policy plays in the harness: the
    harness scores every response afterwards with the task's one wrapper, so episodes need not (and
    the generation time excludes the final reward-model call)."""
    free = RewardWrapper.from_callable(lambda prompts, responses: [0.0] * len(prompts), name="unscored")
    return dataclasses.replace(ctx, reward=free, gold=None)


class PeakMemory:
    """Peak memory (MB) inside a `with` block: CUDA peak allocated on GPU, else the process's peak RSS
    (Linux: reset through /proc/self/clear_refs, so each block is measured on its own)."""

    def __enter__(self) -> PeakMemory:
        self.mb: float | None = None
        self.cuda = torch.cuda.is_available()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:
                pass  # not Linux: the peak since the process started is the best there is
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.cuda:
            self.mb = torch.cuda.max_memory_allocated() / 2**20
            return
        try:
            line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmHWM"))
            self.mb = int(line.split()[1]) / 1024
        except (OSError, StopIteration):
            import resource

            self.mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def generate_all(decoder: Decoder, prompts: Sequence[str], *, max_new_tokens: int, seed: int, chunk: int,
                 progress: bool = False, desc: str | None = None) -> list[Generation]:
    """Decode every prompt, a chunk at a time so that the progress bar moves (prompt i keeps its seed)."""
    desc = desc or decoder.name
    generations: list[Generation] = []
    with tqdm(total=len(prompts), desc=desc, unit="prompt", disable=not progress, file=sys.stderr) as bar:
        for start in range(0, len(prompts), chunk):
            part = list(prompts[start : start + chunk])
            out = decoder.generate(part, max_new_tokens=max_new_tokens, seed=seed + start)
            if len(out) != len(part):
                raise RuntimeError(f"{desc}: generate returned {len(out)} responses for {len(part)} prompts; a "
                                   "Decoder must answer every prompt, in order.")
            generations.extend(out)
            bar.update(len(part))
    for g, prompt in zip(generations, prompts):
        if g.prompt != prompt:
            raise RuntimeError(f"{desc}: a response came back for {g.prompt[:60]!r} where {prompt[:60]!r} was "
                               "expected; a Decoder must answer the prompts in order.")
    return generations


def score_rewards(scorer: Scorer, prompts: list[str], texts: list[str]) -> tuple[list[float | None], list[int] | None]:
    """The reward of every pair, None for the pairs the skip rule leaves unscored; and the reward-model input
    lengths when a skip rule is set (else None)."""
    if scorer.rules.reward_skip_tokens is None:
        return list(scorer.reward.score(prompts, texts)), None
    lengths = scorer.reward.input_lengths(prompts, texts)
    keep = [i for i, skip in enumerate(scorer.rules.skipped(lengths)) if not skip]
    values = scorer.reward.score([prompts[i] for i in keep], [texts[i] for i in keep]) if keep else []
    rewards: list[float | None] = [None] * len(texts)
    for i, value in zip(keep, values):
        rewards[i] = float(value)
    return rewards, lengths


def score_episodes(scorer: Scorer, prompts: Sequence[str], generations: Sequence[Generation]) -> list[dict[str, Any]]:
    """Per-episode records: every response scored by the one reward wrapper and gold judge, under the metric
    rules (`Scorer.rules`)."""
    prompts = list(prompts)
    rules = scorer.rules
    texts = [g.response_text for g in generations]
    rewards, lengths = score_rewards(scorer, prompts, texts)
    metric_texts = [rules.metric_text(t) for t in texts]
    golds = scorer.gold.score(prompts, texts) if scorer.gold is not None else [None] * len(texts)
    coherence = (scorer.encoder.coherence(prompts, metric_texts) if scorer.encoder is not None
                 else [None] * len(texts))
    episodes = []
    for i, (g, reward, gold, coh) in enumerate(zip(generations, rewards, golds, coherence)):
        extra = {k: v for k, v in g.extra.items() if k != "reward_parts"}  # the env ran unscored
        episode = {
            "index": i, "prompt": g.prompt, "response": g.response_text, "response_ids": list(g.response_ids),
            "response_len": len(g.response_ids), "reward": reward, "gold": gold,
            "diversity": diversity(metric_texts[i], rules.diversity_tokenizer), "coherence": coh,
            "irregular": bool(is_irregular(g.response_text)), "lm_forwards": g.lm_forwards,
            "rm_calls": g.rm_calls, "extra": extra,
        }
        if lengths is not None:
            episode.update(reward_skipped=reward is None, reward_input_tokens=int(lengths[i]))
        episodes.append(episode)
    return episodes


def generate_timed(decoder: Decoder, prompts: Sequence[str], *, max_new_tokens: int, seed: int = 0, chunk: int = 64,
                   progress: bool = False, warmup: bool = True) -> Generated:
    """Warm up, then generate every prompt (`generate_all`), timed, with the block's peak memory."""
    prompts = list(prompts)
    if not prompts:
        raise ValueError("the harness got no prompts to generate; pass at least one held-out prompt.")
    if warmup:  # untimed: lazy initialisation should not be billed to whichever method runs first
        decoder.generate(prompts[:1], max_new_tokens=max_new_tokens, seed=seed)
    with PeakMemory() as memory:
        started = time.perf_counter()
        generations = generate_all(decoder, prompts, max_new_tokens=max_new_tokens, seed=seed, chunk=chunk,
                                   progress=progress)
        seconds = time.perf_counter() - started
    return Generated(generations, seconds, memory.mb)


def evaluate_decoder(decoder: Decoder, prompts: Sequence[str], scorer: Scorer, *, max_new_tokens: int,
                     seed: int = 0, chunk: int = 64, progress: bool = False, warmup: bool = True) -> Evaluation:
    """Warm up, generate (timed, peak memory), then score every response: the one evaluation path."""
    generated = generate_timed(decoder, prompts, max_new_tokens=max_new_tokens, seed=seed, chunk=chunk,
                               progress=progress, warmup=warmup)
    return scored(scorer, prompts, generated)


def scored(scorer: Scorer, prompts: Sequence[str], generated: Generated) -> Evaluation:
    """`generated` (the responses to `prompts`, in order) scored: the records and what generating cost."""
    return Evaluation(score_episodes(scorer, prompts, generated.generations), generated.generate_seconds,
                      generated.peak_memory_mb)


def summarize(evaluation: Evaluation) -> dict[str, Any]:
    """The means every command prints: reward and gold (± 95% CI), length, costs per response."""
    episodes = evaluation.episodes
    scored = [e["reward"] for e in episodes if e["reward"] is not None]
    reward, reward_ci = mean_ci95(scored) if scored else (float("nan"), float("nan"))
    summary: dict[str, Any] = {"episodes": len(episodes), "reward_mean": reward, "reward_ci95": reward_ci}
    if any("reward_skipped" in e for e in episodes):
        summary["reward_skipped"] = sum(bool(e.get("reward_skipped")) for e in episodes)
    if all(e["gold"] is not None for e in episodes):
        summary["gold_mean"], summary["gold_ci95"] = mean_ci95([e["gold"] for e in episodes])
    summary.update(
        response_len=float(np.mean([e["response_len"] for e in episodes])),
        diversity=float(np.mean([e["diversity"] for e in episodes])),
        lm_forwards_per_response=float(np.mean([e["lm_forwards"] for e in episodes])),
        rm_calls_per_response=float(np.mean([e["rm_calls"] for e in episodes])),
        seconds=round(evaluation.generate_seconds, 3),
        seconds_per_response=evaluation.generate_seconds / len(episodes),
        examples=[{"prompt": e["prompt"], "response": e["response"], "reward": e["reward"], "gold": e["gold"]}
                  for e in episodes[:3]],
    )
    return summary
