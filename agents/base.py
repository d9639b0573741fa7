"""The one Agent protocol every method implements, so one benchmark can run them all.

Two kinds of agents:

- `PolicyAgent`: an RL-style agent acting on an environment's (observation, action mask),
  e.g. a MaskablePPO proxy on TokenAccept, or ARGS acting on TokenChoice.
- `Decoder`: maps prompts to responses directly, e.g. greedy / top-k / nucleus / best-of-n
  decoding, ARGS's batch decoder, or an RRHF-tuned LM decoded greedily.

`PolicyDecoder` turns a `PolicyAgent` plus an env into a `Decoder` (it plays one episode per
prompt on the batched core), so the benchmark only ever calls `Decoder.generate`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np


@dataclass(frozen=True)
class Generation:
    """One response to one prompt, with what it cost."""

    prompt: str
    response_ids: list[int]
    response_text: str
    lm_forwards: int = 0  # batched-forward rows spent on this response (prefill counts 1)
    rm_calls: int = 0  # reward-model scorings spent while generating (not the final scoring)
    extra: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Decoder(Protocol):
    """Prompts in, responses out."""

    name: str

    def generate(
        self, prompts: Sequence[str], *, max_new_tokens: int = 32, seed: int | None = None
    ) -> list[Generation]: ...


@runtime_checkable
class PolicyAgent(Protocol):
    """Acts on a batch of observations with their action masks ([N, D] and [N, A])."""

    name: str

    def predict(
        self, obs: np.ndarray, action_masks: np.ndarray | None = None, deterministic: bool = True
    ) -> np.ndarray: ...


class PolicyDecoder:
    """A `Decoder` that plays a `PolicyAgent` on a batched env core, one episode per prompt.

    `core` is a batched MDP core (e.g. `TokenAcceptCore(num_rows, ...)`) exposing
    `reset_rows`, `step(actions, active)`, `action_masks()` and the `ctx` it runs on. Agents
    that need the env itself (ARGS reads `candidate_rewards()`) get it through `bind(core)`
    when they define it.
    """

    def __init__(self, agent: PolicyAgent, core: Any, name: str | None = None) -> None:
        self.agent = agent
        self.core = core
        self.name = name or agent.name
        if hasattr(agent, "bind"):
            agent.bind(core)

    def generate(
        self, prompts: Sequence[str], *, max_new_tokens: int | None = None, seed: int | None = None
    ) -> list[Generation]:
        if max_new_tokens is not None and max_new_tokens != self.core.max_new_tokens:
            raise ValueError(
                f"max_new_tokens={max_new_tokens} differs from the env's ({self.core.max_new_tokens}); "
                "build the env with the max_new_tokens you want to decode with."
            )
        n = self.core.num_rows
        rngs = [np.random.default_rng(None if seed is None else seed + i) for i in range(n)]
        results: list[Generation | None] = [None] * len(prompts)
        queue = list(range(len(prompts)))
        slot_prompt: list[int | None] = [None] * n  # which prompt each row is decoding
        obs = np.zeros((n,) + self.core.observation_space.shape, dtype=np.float32)

        def fill(rows: list[int]) -> None:
            rows = rows[: len(queue)]
            if not rows:
                return
            picked = [queue.pop(0) for _ in rows]
            options = [{"prompt": prompts[i]} for i in picked]
            obs[rows] = self.core.reset_rows(rows, [rngs[r] for r in rows], options)[0]
            for row, index in zip(rows, picked):
                slot_prompt[row] = index

        fill(list(range(n)))
        while any(s is not None for s in slot_prompt):
            active = np.array([s is not None for s in slot_prompt])
            actions = np.asarray(self.agent.predict(obs, self.core.action_masks(), True)).reshape(-1)
            obs[:], _, terminated, truncated, infos = self.core.step(np.where(active, actions, 0), active)
            finished = [r for r in range(n) if active[r] and (terminated[r] or truncated[r])]
            for row in finished:
                info = infos[row]
                results[slot_prompt[row]] = Generation(
                    prompt=info["prompt"], response_ids=info["response_ids"],
                    response_text=info["response_text"],
                    lm_forwards=info["episode_stats"]["lm_forwards"],
                    rm_calls=info["episode_stats"].get("rm_calls", 0),  # TokenChoice scoring candidates
                    extra={"reward_parts": info["reward_parts"], **info["episode_stats"]},
                )
                slot_prompt[row] = None
            fill(finished)
        return [g for g in results if g is not None]
