"""`llm-envs eval`: one agent on the task's held-out prompts, through the one harness.

Agents: `greedy` (always accept: the LM's own greedy decoding), `random` (uniform over legal
actions), a proxy checkpoint (`proxy:PATH` or a path to a `.zip`), or a decoding baseline of
`agents.decoding` (`top_k`, `nucleus`, `best_of_16`, `best_of_32`, ...). Policies play
TokenAccept-v0 with the suite's `train.env` settings; every response is scored by the task's
reward wrapper (and gold judge) in `agents.harness.evaluate_decoder`, as on the leaderboard.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from agents.base import Decoder, PolicyDecoder
from agents.harness import Scorer, evaluate_decoder, summarize, unscored
from agents.metric_rules import MetricRules
from agents.sb3_agent import load_proxy
from llm_envs.data import load_prompts
from llm_envs.task import LMContext
from llm_envs.envs.params import TokenAcceptParams
from llm_envs.envs.token_accept import TokenAcceptCore
from llm_envs.task import Task

DECODER_AGENTS = ("top_k", "nucleus", "best_of_n")


class AlwaysAccept:
    """Accept every candidate: exactly the LM's greedy decoding (candidate = argmax)."""

    name = "greedy"

    def predict(self, obs: np.ndarray, action_masks: np.ndarray | None = None, deterministic: bool = True) -> np.ndarray:
        return np.zeros(len(obs), dtype=np.int64)


class RandomLegal:
    """Uniform over the legal actions (a floor for any learned proxy)."""

    name = "random"

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)

    def predict(self, obs: np.ndarray, action_masks: np.ndarray | None = None, deterministic: bool = True) -> np.ndarray:
        masks = np.ones((len(obs), 2), dtype=bool) if action_masks is None else action_masks
        return np.array([self.rng.choice(np.flatnonzero(m)) for m in masks])


def resolve_agent(spec: str, core: TokenAcceptCore, seed: int = 0) -> Any:
    if spec == "greedy":
        return AlwaysAccept()
    if spec == "random":
        return RandomLegal(seed)
    path = spec.split(":", 1)[1] if spec.startswith("proxy:") else spec
    if path.endswith(".zip") or spec.startswith("proxy:"):
        return load_proxy(path, core.observation_space)
    raise ValueError(f"agent {spec!r} is unknown; expected 'greedy', 'random', 'proxy:PATH' (a .zip), or a "
                     f"decoding baseline: {', '.join(DECODER_AGENTS[:2])}, best_of_N.")


def is_decoder(agent: str) -> bool:
    return agent in DECODER_AGENTS or (agent.startswith("best_of_") and agent[8:].isdigit())


def agent_decoder(agent: str, ctx: LMContext, env: TokenAcceptParams, *, num_envs: int, device: str,
                  seed: int) -> tuple[Decoder, Any]:
    """The agent as a `Decoder` on the task's context (and the policy, for policies)."""
    if is_decoder(agent):
        from agents.decoding import make_decoder

        kwargs = {"reward": ctx.reward} if agent.startswith("best_of_") else {}
        return make_decoder(agent, ctx.model, tokenizer=ctx.tokenizer, device=device, **kwargs), None
    core = TokenAcceptCore(min(num_envs, len(ctx.prompts)), context=unscored(ctx), params=env)
    policy = resolve_agent(agent, core, seed)
    return PolicyDecoder(policy, core, name=agent), policy


def evaluate_agent(task: Task, env: TokenAcceptParams, agent: str, *, num_prompts: int | None = None,
                   num_envs: int = 16, seed: int = 0, metrics: MetricRules | None = None) -> dict[str, Any]:
    """Decode the task's held-out prompts with the agent; the harness's summary plus the env's stats, under the
    suite's metric rules (`metrics`: its skip rule, diversity's stop strings and words; no coherence here)."""
    sources = task.resolve()
    prompts = load_prompts(sources.eval_prompts, num_prompts=num_prompts, seed=seed).prompts
    ctx = sources.context(prompts)
    decoder, policy = agent_decoder(agent, ctx, env, num_envs=num_envs, device=task.device, seed=seed)
    scorer = Scorer(ctx.reward, ctx.gold, rules=metrics or MetricRules())
    evaluation = evaluate_decoder(decoder, list(ctx.prompts), scorer, max_new_tokens=task.max_new_tokens,
                                  seed=seed, chunk=max(len(prompts), 1), warmup=False)
    summary: dict[str, Any] = {"agent": agent, **summarize(evaluation)}
    extras = [e["extra"] for e in evaluation.episodes]
    if all("rejections" in x for x in extras):  # played on TokenAccept: the env's own counts
        summary["rejection_rate"] = float(np.mean([x["rejections"] / max(x["steps"], 1) for x in extras]))
        summary["forced_accepts"] = float(np.mean([x["forced_accepts"] for x in extras]))
    else:
        summary["rejection_rate"], summary["forced_accepts"] = 0.0, 0.0
    if policy is not None and hasattr(policy, "trainable_params"):
        summary["trainable_params"] = policy.trainable_params
    return summary
