"""Evaluate an agent on TokenAccept's held-out prompts: `llm-envs eval --config ... --agent ...`.

Agents: `greedy` (always accept: the LM's own greedy decoding), `random` (uniform over legal
actions), a proxy checkpoint (`proxy:PATH` or a path to a `.zip`), or a decoding baseline of
`agents.decoding` (`top_k`, `nucleus`, `best_of_16`, `best_of_32`, ...). Every agent's responses
are scored by the same reward wrapper (and gold judge) as the env's episodes.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from agents.base import Generation, PolicyDecoder
from agents.configs import EnvConfig
from agents.sb3_agent import load_proxy
from llm_envs.data import load_prompts
from llm_envs.envs.context import LMContext, build_context
from llm_envs.envs.token_accept import TokenAcceptCore

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
    raise ValueError(f"agent {spec!r} is unknown; expected 'greedy', 'random', or 'proxy:PATH' (a .zip).")


def _is_decoder(agent: str) -> bool:
    return agent in DECODER_AGENTS or (agent.startswith("best_of_") and agent[8:].isdigit())


def _decode(env: EnvConfig, agent: str, ctx: LMContext, prompts: list[str], seed: int) -> list[Generation]:
    """A decoding baseline on the env's LM; responses scored by the env's reward wrapper."""
    from agents.decoding import make_decoder

    kwargs = {"reward": ctx.reward} if agent.startswith("best_of_") else {}
    decoder = make_decoder(agent, ctx.model, tokenizer=ctx.tokenizer, device=env.device, **kwargs)
    generations = decoder.generate(prompts, max_new_tokens=env.max_new_tokens, seed=seed)
    texts = [g.response_text for g in generations]
    rewards = ctx.reward.score(prompts, texts)
    golds = ctx.gold.score(prompts, texts) if ctx.gold is not None else [None] * len(texts)
    scored = []
    for g, r, gold in zip(generations, rewards, golds):
        parts = {"reward_model": r, **({"gold": gold} if gold is not None else {})}
        stats = {"rejections": 0, "steps": len(g.response_ids), "forced_accepts": 0,
                 "response_len": len(g.response_ids)}
        scored.append(Generation(g.prompt, g.response_ids, g.response_text, g.lm_forwards, g.rm_calls,
                                 {"reward_parts": parts, **stats}))
    return scored


def evaluate(
    env: EnvConfig, agent: str, *, num_prompts: int | None = None, num_envs: int = 16, seed: int = 0
) -> dict[str, Any]:
    """Decode the held-out prompts with the agent; summarise rewards, gold and costs."""
    prompts = load_prompts(env.eval_prompts, num_prompts=num_prompts, seed=seed).prompts
    kwargs = env.env_kwargs(prompts)
    ctx = build_context(lm=kwargs.pop("lm"), reward=kwargs.pop("reward"), prompts=kwargs.pop("prompts"),
                        device=kwargs.pop("device"), dtype=kwargs.pop("dtype"),
                        max_prompt_tokens=kwargs.pop("max_prompt_tokens"))
    started = time.perf_counter()
    policy = None
    if _is_decoder(agent):
        generations = _decode(env, agent, ctx, prompts, seed)
    else:
        core = TokenAcceptCore(min(num_envs, len(prompts)), context=ctx, **kwargs)
        policy = resolve_agent(agent, core, seed)
        generations = PolicyDecoder(policy, core).generate(prompts, seed=seed)
    seconds = time.perf_counter() - started
    parts = [g.extra["reward_parts"] for g in generations]
    summary: dict[str, Any] = {
        "agent": agent,
        "episodes": len(generations),
        "reward_mean": float(np.mean([p["reward_model"] for p in parts])),
        "rejection_rate": float(np.mean([g.extra["rejections"] / max(g.extra["steps"], 1) for g in generations])),
        "forced_accepts": float(np.mean([g.extra["forced_accepts"] for g in generations])),
        "response_len": float(np.mean([g.extra["response_len"] for g in generations])),
        "lm_forwards_per_response": float(np.mean([g.lm_forwards for g in generations])),
        "rm_calls_per_response": float(np.mean([g.rm_calls for g in generations])),
        "seconds": round(seconds, 3),
        "seconds_per_response": seconds / max(len(generations), 1),
    }
    if all("gold" in p for p in parts):
        summary["gold_mean"] = float(np.mean([p["gold"] for p in parts]))
    if policy is not None and hasattr(policy, "trainable_params"):
        summary["trainable_params"] = policy.trainable_params
    summary["examples"] = [{"prompt": g.prompt, "response": g.response_text, **g.extra["reward_parts"]}
                           for g in generations[:3]]
    return summary
