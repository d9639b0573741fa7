"""TokenAccept-v0: the Proxy-RLHF accept/reject MDP over a frozen LM (Zhu, Sun et al., 2024).

`TokenAcceptCore` is the one implementation of the MDP, batched over N rows on one
`DecodeEngine`; `TokenAcceptEnv` is that core with one row, and the vector views in
`llm_envs.vector` are the core with N rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Sequence

import gymnasium as gym
import numpy as np
import torch

from llm_envs.engine import DecodeEngine
from llm_envs.envs.context import LMContext, context_for_env
from llm_envs.envs.pools import Pool, PoolWorkspace, nucleus_pools, validate_sampling
from llm_envs.envs.restart import Restart
from llm_envs.envs.single import SingleRowEnv

ObsMode = Literal["candidate", "prefix"]
ACCEPT, REJECT = 0, 1
NUM_FEATURES = 5
FEATURE_NAMES = ("candidate_prob", "remaining_mean_prob", "rejections_here", "budget_used", "reject_allowed")


def skam_allows_reject(pool: Pool, rejections: int, p_t: float, max_rejections: int | None = None) -> bool:
    """The Stable Knowledge-Aware Module's action restriction (Proxy-RLHF, eq. for A).

    With T' = the pool minus the `rejections` tokens already rejected at this position, reject
    is allowed iff |T'| > 1 and sum_{t in T'} p(t) > p_t * |T'| (the mean probability left is
    above p_t), and, with a cap, fewer than `max_rejections` rejections were made here.
    """
    remaining = len(pool) - rejections
    if remaining <= 1:
        return False
    if max_rejections is not None and rejections >= max_rejections:
        return False
    allowed = float(pool.suffix_mass[rejections]) > p_t * remaining
    if allowed and rejections + 1 >= pool.head_width:
        # `nucleus_pools(head_min_prob=p_t)` keeps every reachable candidate in the head.
        raise RuntimeError(
            f"SKAM allows a reject at rank {rejections}, past the pool's head of {pool.head_width} tokens; "
            "build pools with nucleus_pools(..., head_min_prob=p_t) so the head covers every reachable rank."
        )
    return allowed


@dataclass
class _Row:
    """Per-row episode state. `pool[rejections]` is always the current candidate."""

    prompt: str = ""
    prompt_index: int | None = None
    prompt_ids: list[int] = field(default_factory=list)
    response: list[int] = field(default_factory=list)
    pool: Pool | None = None
    rejections: int = 0  # at the current position
    hidden: torch.Tensor | None = None  # obs hidden state
    next_logits: torch.Tensor | None = None  # candidate mode: distribution after the candidate
    steps: int = 0
    total_rejections: int = 0
    forced_accepts: int = 0
    rejection_cost: float = 0.0
    deviation_cost: float = 0.0
    deviation_nats: float = 0.0  # sum of log p(top1) - log p(accepted), before deviation_beta
    live: bool = False

    @property
    def candidate(self) -> int:
        return int(self.pool.ids[self.rejections])


class TokenAcceptCore:
    """The batched accept/reject MDP. See `TokenAcceptEnv` for the env card."""

    supports_restart = True  # step(restart=..., restart_done=...): autoresets share the step's forward

    def __init__(
        self,
        num_rows: int = 1,
        *,
        lm: Any = None,
        reward: Any = None,
        prompts: Any = None,
        tokenizer: Any = None,
        gold: Any = None,
        top_p: float = 0.9,
        top_k: int | None = None,
        temperature: float = 1.0,
        p_t: float = 0.01,
        max_rejections: int | None = None,
        max_new_tokens: int = 32,
        max_steps: int | None = None,
        obs_mode: ObsMode = "candidate",
        invalid_action: Literal["accept", "raise"] = "accept",
        rejection_cost: float = 0.0,
        deviation_beta: float = 0.0,
        hidden_layer: int = -1,
        device: str | torch.device | None = "auto",
        dtype: str | torch.dtype | None = "auto",
        max_prompt_tokens: int | None = None,
        context: LMContext | None = None,
    ) -> None:
        validate_sampling(top_p, top_k, temperature)
        if not 0.0 <= p_t < 1.0:
            raise ValueError(f"p_t={p_t!r}; expected 0 <= p_t < 1 (the paper uses 0.1 ... 0.0001).")
        if obs_mode not in ("candidate", "prefix"):
            raise ValueError(f"obs_mode={obs_mode!r}; expected 'candidate' (the paper's h(x, y<i, t_i)) or 'prefix'.")
        if invalid_action not in ("accept", "raise"):
            raise ValueError(f"invalid_action={invalid_action!r}; expected 'accept' (coerce) or 'raise'.")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens!r}; expected a positive int.")
        if max_rejections is not None and max_rejections < 0:
            raise ValueError(f"max_rejections={max_rejections!r}; expected an int >= 0 or None.")
        for name, value in (("rejection_cost", rejection_cost), ("deviation_beta", deviation_beta)):
            if not np.isfinite(value) or value < 0:
                raise ValueError(f"{name}={value!r}; expected a finite number >= 0.")
        self.ctx = context_for_env(context, lm=lm, tokenizer=tokenizer, reward=reward, prompts=prompts,
                                   gold=gold, device=device, dtype=dtype, max_prompt_tokens=max_prompt_tokens)
        self.num_rows = num_rows
        self.top_p, self.top_k, self.temperature, self.p_t = top_p, top_k, temperature, p_t
        self.max_rejections = max_rejections
        self.max_new_tokens = max_new_tokens
        self.max_steps = max_steps if max_steps is not None else 8 * max_new_tokens
        self.obs_mode: ObsMode = obs_mode
        self.invalid_action = invalid_action
        self.rejection_cost_per_reject = float(rejection_cost)
        self.deviation_beta = float(deviation_beta)
        self.engine = DecodeEngine(self.ctx.model, num_rows, hidden_layer=hidden_layer)
        self.hidden_size = self.engine.hidden_size
        self._embeddings = self.ctx.model.get_input_embeddings()
        self.obs_dim = self.hidden_size * (2 if obs_mode == "prefix" else 1) + NUM_FEATURES
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (self.obs_dim,), np.float32)
        self.action_space = gym.spaces.Discrete(2)
        self.rows = [_Row() for _ in range(num_rows)]
        self._pool_workspace = PoolWorkspace()
        self._eos_token_id = self.ctx.eos_token_id  # read once: a tokenizer attribute lookup per row per step adds up

    # ------------------------------------------------------------------ reset
    def reset_rows(
        self,
        rows: Sequence[int],
        rngs: Sequence[np.random.Generator],
        options: Sequence[dict[str, Any] | None],
    ) -> tuple[np.ndarray, list[dict[str, Any]]]:
        """Start new episodes on `rows`; returns their observations [len(rows), D] and infos."""
        rows = list(rows)
        self._start(Restart(rows, list(rngs), list(options)))
        if self.obs_mode == "candidate":
            self._forward_candidates(rows)
        return self._observations(rows), [self._info(r) for r in rows]

    def _start(self, restart: Restart) -> None:
        """Draw prompts, prefill them (one batched forward) and set each row's first pool."""
        for row, rng, opts in zip(restart.rows, restart.rngs, restart.options):
            self._start_episode(self.rows[row], rng, opts or {})
        out = self.engine.reset_rows(restart.rows, [self.rows[r].prompt_ids for r in restart.rows])
        for i, (row, pool) in enumerate(zip(restart.rows, self._pools(out.logits))):
            self.rows[row].pool, self.rows[row].hidden = pool, out.hidden[i]

    def _start_episode(self, state: _Row, rng: np.random.Generator, options: dict[str, Any]) -> None:
        prompt, index, prompt_ids = self.ctx.pick_prompt(rng, options, self.max_new_tokens)
        state.__init__(prompt=prompt, prompt_index=index, prompt_ids=prompt_ids, live=True)

    # ------------------------------------------------------------------ step
    def action_masks(self) -> np.ndarray:
        """[N, 2] bool: accept is always legal; reject is legal where SKAM allows it."""
        masks = np.ones((self.num_rows, 2), dtype=bool)
        for row, state in enumerate(self.rows):
            masks[row, REJECT] = state.live and self._reject_allowed(state)
        return masks

    def _reject_allowed(self, state: _Row) -> bool:
        return skam_allows_reject(state.pool, state.rejections, self.p_t, self.max_rejections)

    def step(
        self,
        actions: Sequence[int] | np.ndarray,
        active: Sequence[bool] | np.ndarray | None = None,
        *,
        restart: Restart | None = None,
        restart_done: Callable[[list[int]], Restart] | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[dict[str, Any]]]:
        """Step the active rows (all by default). Rows not active keep their state.

        Autoresets share the step's batched forward (the new rows' first candidates go in with
        the others'), so a step that starts episodes costs a prefill plus one forward, not three:
        - `restart`: inactive rows that start a new episode now (NEXT_STEP autoreset); their obs
          and info are the new episode's, reward 0, not done.
        - `restart_done(rows)` -> `Restart`: rows that end in this step start over in it
          (SAME_STEP autoreset); their obs and info are the new episode's, the ended episode's
          last ones go to `infos[row]["final_obs"]` / `["final_info"]`; terminated/truncated
          stay True.
        """
        active = np.ones(self.num_rows, dtype=bool) if active is None else np.asarray(active, dtype=bool)
        actions = np.asarray(actions).reshape(-1)
        if actions.shape[0] != self.num_rows:
            raise ValueError(f"got {actions.shape[0]} actions for {self.num_rows} envs; pass one per env.")
        rewards = np.zeros(self.num_rows, dtype=np.float64)
        terminated = np.zeros(self.num_rows, dtype=bool)
        truncated = np.zeros(self.num_rows, dtype=bool)
        forced = np.zeros(self.num_rows, dtype=bool)
        accepted: list[int] = []  # rows that continue after an accept
        rejected: list[int] = []  # rows that continue after a reject
        stepped = np.flatnonzero(active).tolist()
        for row in stepped:
            state = self.rows[row]
            if not state.live:
                raise RuntimeError(
                    f"env {row}: step() called before reset() or after the episode ended; call reset() first."
                )
            action = self._checked_action(actions[row], state, row)
            forced[row] = action != int(actions[row])
            rewards[row], terminated[row], truncated[row] = self._apply(state, action, forced[row])
            if not (terminated[row] or truncated[row]):
                (rejected if action == REJECT else accepted).append(row)
        done = np.flatnonzero(terminated | truncated).tolist()
        finals = self._finish(done)
        for row, final in finals.items():
            rewards[row] += final["reward_model"]
        # Ended rows' last obs/info, taken before a same-step restart overwrites the rows.
        done_infos = {row: {**self._info(row, forced_accept=bool(forced[row])), **finals[row]["info"]} for row in done}
        final_obs = self._observations(done) if done and restart_done is not None else None
        restarts = [restart] if restart is not None and restart.rows else []
        if final_obs is not None:
            restarts.append(restart_done(done))
        for batch in restarts:
            self._start(batch)
        started = [row for batch in restarts for row in batch.rows]
        self._advance(accepted, rejected, started)
        infos: list[dict[str, Any]] = [{} for _ in range(self.num_rows)]
        for row in stepped:
            infos[row] = done_infos.get(row) or self._info(row, forced_accept=bool(forced[row]))
        for row in started:
            infos[row] = self._info(row)
        if final_obs is not None:
            for i, row in enumerate(done):
                infos[row] = {**infos[row], "final_obs": final_obs[i], "final_info": done_infos[row]}
        return self._observations(range(self.num_rows)), rewards, terminated, truncated, infos

    def _checked_action(self, raw: Any, state: _Row, row: int) -> int:
        try:
            valid = not isinstance(raw, (bool, np.bool_)) and float(raw) in (ACCEPT, REJECT)
        except (TypeError, ValueError):
            valid = False
        if not valid:
            raise ValueError(
                f"env {row}: action {raw!r} is outside the action space; expected 0 (accept) or 1 (reject)."
            )
        action = int(float(raw))
        if action == REJECT and not self._reject_allowed(state):
            if self.invalid_action == "raise":
                raise ValueError(
                    f"env {row}: reject is masked here (SKAM: {len(state.pool) - state.rejections} "
                    f"candidates left, p_t={self.p_t}); use action_masks(), or pass "
                    "invalid_action='accept' to coerce masked rejects to accept."
                )
            return ACCEPT
        return action

    def _apply(self, state: _Row, action: int, forced: bool) -> tuple[float, bool, bool]:
        """Bookkeeping of one action; returns (step reward so far, terminated, truncated)."""
        state.steps += 1
        reward = 0.0
        if action == REJECT:
            state.rejections += 1
            state.total_rejections += 1
            state.rejection_cost += self.rejection_cost_per_reject
            reward -= self.rejection_cost_per_reject
        else:
            token = state.candidate
            nats = state.pool.top_logprob - float(np.log(state.pool.probs[state.rejections]))
            cost = self.deviation_beta * nats
            state.deviation_nats += nats
            state.deviation_cost += cost
            reward -= cost
            state.forced_accepts += int(forced)
            state.response.append(token)
            if token == self._eos_token_id:
                return reward, True, False
        truncated = len(state.response) >= self.max_new_tokens or state.steps >= self.max_steps
        return reward, False, truncated

    def _advance(self, accepted: list[int], rejected: list[int], started: list[int]) -> None:
        """Propose the next candidate on each continuing row, with at most one batched forward.

        `started` rows have their first pool already (from their prefill); in candidate mode
        their first candidate rides along in the same forward.
        """
        if self.obs_mode == "candidate":
            # The proposed candidate sits in the cache: a reject hides it; an accept keeps it,
            # and its forward already gave the next position's distribution.
            self.engine.drop_last(rejected)
            if accepted:
                pools = self._pools(torch.stack([self.rows[r].next_logits for r in accepted]))
                for row, pool in zip(accepted, pools):
                    self.rows[row].pool, self.rows[row].rejections = pool, 0
            self._forward_candidates(sorted(accepted + rejected + started))
        elif accepted:
            # Prefix mode: only an accept changes the prefix; a reject needs no forward.
            tokens = [0] * self.num_rows
            for row in accepted:
                tokens[row] = self.rows[row].response[-1]
            out = self.engine.append(tokens, [r in accepted for r in range(self.num_rows)])
            for row, pool in zip(accepted, self._pools(out.logits[accepted])):
                state = self.rows[row]
                state.pool, state.rejections, state.hidden = pool, 0, out.hidden[row]

    def _forward_candidates(self, rows: list[int]) -> None:
        """Candidate mode: forward each row's candidate in context (one batched forward)."""
        if not rows:
            return
        tokens = [0] * self.num_rows
        active = [False] * self.num_rows
        for r in rows:
            tokens[r], active[r] = self.rows[r].candidate, True
        out = self.engine.append(tokens, active)
        for r in rows:
            self.rows[r].hidden, self.rows[r].next_logits = out.hidden[r], out.logits[r]

    def _pools(self, logits: torch.Tensor) -> list[Pool]:
        # head_min_prob=p_t: the head then holds every candidate SKAM can let a row reach.
        return nucleus_pools(logits, top_p=self.top_p, top_k=self.top_k, temperature=self.temperature,
                             head_min_prob=self.p_t, workspace=self._pool_workspace).rows()

    # ------------------------------------------------------------------ episode end
    def _finish(self, rows: list[int]) -> dict[int, dict[str, Any]]:
        """Score finished rows in one batched reward call (and one gold call)."""
        if not rows:
            return {}
        prompt_ids = [self.rows[r].prompt_ids for r in rows]
        responses = [self.rows[r].response for r in rows]
        scores = self.ctx.reward.score_ids(prompt_ids, responses, self.ctx.tokenizer)
        texts = [self.ctx.tokenizer.decode(resp, skip_special_tokens=True) for resp in responses]
        golds = self.ctx.gold.score([self.rows[r].prompt for r in rows], texts) if self.ctx.gold else None
        finals = {}
        for i, row in enumerate(rows):
            state = self.rows[row]
            state.live = False
            parts = {"reward_model": float(scores[i]), "rejection_cost": -state.rejection_cost,
                     "deviation_cost": -state.deviation_cost}
            if golds is not None:
                parts["gold"] = float(golds[i])
            finals[row] = {
                "reward_model": float(scores[i]),
                "info": {
                    "response_ids": list(state.response),
                    "response_text": texts[i],
                    "reward_parts": parts,
                    "episode_stats": {
                        "steps": state.steps,
                        "response_len": len(state.response),
                        "rejections": state.total_rejections,
                        "forced_accepts": state.forced_accepts,
                        "deviation_nats": state.deviation_nats,
                        "lm_forwards": self.engine.row_forwards(row),
                    },
                },
            }
        return finals

    # ------------------------------------------------------------------ observation
    def _observations(self, rows: Sequence[int]) -> np.ndarray:
        """Observations of `rows` [len(rows), D] float32, a fresh array (hidden states batched)."""
        rows = list(rows)
        out = np.zeros((len(rows), self.obs_dim), dtype=np.float32)
        have = [i for i, r in enumerate(rows) if self.rows[r].pool is not None]
        if not have:
            return out
        states = [self.rows[rows[i]] for i in have]
        hidden = torch.stack([s.hidden for s in states]).float()
        parts = [hidden]
        if self.obs_mode == "prefix":
            with torch.inference_mode():
                tokens = torch.tensor([s.candidate for s in states], device=self._embeddings.weight.device)
                parts.append(self._embeddings(tokens).float())
        out[have, : self.obs_dim - NUM_FEATURES] = torch.cat(parts, 1).cpu().numpy()
        out[have, self.obs_dim - NUM_FEATURES:] = [self._features(s) for s in states]
        return out

    def _features(self, state: _Row) -> tuple[float, ...]:
        """The 5 scalar features (FEATURE_NAMES) of a row's current candidate."""
        r = state.rejections
        remaining = len(state.pool) - r
        return (
            float(state.pool.probs[r]),
            float(state.pool.suffix_mass[r]) / max(remaining, 1),
            float(r),
            len(state.response) / self.max_new_tokens,
            float(state.live and self._reject_allowed(state)),
        )

    def _info(self, row: int, forced_accept: bool = False) -> dict[str, Any]:
        state = self.rows[row]
        return {
            "candidate_id": state.candidate,
            "candidate_prob": float(state.pool.probs[state.rejections]),
            "prompt": state.prompt,
            "prompt_index": state.prompt_index,
            "position": len(state.response),
            "rejections_here": state.rejections,
            "forced_accept": forced_accept,
        }


class TokenAcceptEnv(SingleRowEnv):
    """
    ## Description
    The Proxy-RLHF MDP (Zhu, Sun et al., 2024): a frozen causal LM proposes tokens, a small
    policy (the *proxy*) accepts or rejects each one. At every response position the LM's
    candidate pool is the top-p nucleus of `p = softmax(logits / temperature)` (optionally
    capped at `top_k` tokens). The LM proposes the most probable token not yet rejected at
    this position (greedy re-proposal: a rejected token is never proposed again there). The
    Stable Knowledge-Aware Module (SKAM) masks *reject* where the tokens left are unlikely.

    ## Action Space
    `Discrete(2)`: `0` = accept the candidate (append it, move to the next position),
    `1` = reject it (the next most probable remaining token is proposed at the same position).
    `action_masks()` returns a `(2,)` bool array: accept is always legal; reject is legal iff
    `|T'| > 1` and `sum_{t in T'} p(t) > p_t * |T'|`, where `T'` is the pool minus the tokens
    rejected here (and, with `max_rejections`, fewer than that many rejections here). A masked
    reject is coerced to accept (`info["forced_accept"] = True`), or raises with
    `invalid_action="raise"`. Any action other than 0 or 1 raises.

    ## Observation Space
    `Box(-inf, inf, (D,), float32)`, with `H` the LM's hidden size:
    - `obs_mode="candidate"` (default, the paper's state): `D = H + 5`;
      `obs[:H]` = last-layer (or `hidden_layer`) hidden state of the candidate in context,
      `h(x, y_<i, t_i)`. Each step costs one LM forward (the candidate's).
    - `obs_mode="prefix"` (faster): `D = 2H + 5`; `obs[:H]` = `h(x, y_<i)`, `obs[H:2H]` = the
      candidate's input embedding. A reject needs no LM forward.
    - the last 5 entries: `candidate_prob` p(t_i); `remaining_mean_prob` = mean p over T'
      (what SKAM compares with p_t); `rejections_here` at this position; `budget_used` =
      accepted tokens / max_new_tokens; `reject_allowed` (1.0 or 0.0, the mask).

    ## Starting State
    `reset` draws a prompt uniformly from `prompts` with the env's seeded RNG, or takes
    `options={"prompt": str}` / `options={"prompt_index": int}`; the first candidate is the
    most probable token after the prompt.

    ## Rewards
    At the final step: the reward wrapper's score of (prompt, response) (`reward`: a
    sequence-classification RM, a callable, or a `RewardWrapper`; the response is cut at the
    next turn marker). Optional per-step costs: `rejection_cost` per reject, and
    `deviation_beta * (log p(top1) - log p(accepted))` per accept (a KL-like penalty for
    leaving the base model's choice). All other rewards are 0.

    ## Episode End
    Terminated when an EOS candidate is accepted. Truncated when `max_new_tokens` tokens were
    accepted, or after `max_steps` steps (default `8 * max_new_tokens`); the response so far is
    scored either way.

    ## Information
    `reset` and every `step`: `candidate_id`, `candidate_prob` (the token now proposed),
    `prompt`, `prompt_index`, `position`, `rejections_here`, `forced_accept`. The final step
    adds `response_ids` (list of int, EOS included when accepted), `response_text`,
    `reward_parts` (`reward_model`, `rejection_cost`, `deviation_cost`, and `gold` when a gold
    judge is set, as with the embedded world) and `episode_stats` (`steps`, `response_len`,
    `rejections`, `forced_accepts`, `deviation_nats` = sum of log p(top1) - log p(accepted),
    `lm_forwards`).

    ## Arguments
    `gym.make("llm_envs/TokenAccept-v0", **kwargs)`; with no kwargs it runs on the embedded
    world (building it on first use):
    - `lm`: hub name, local dir or loaded causal LM (default: the world's SFT LM);
      `tokenizer` defaults to the LM's own.
    - `reward`: RM hub name/dir, `RewardWrapper`, or callable `(prompts, responses) -> list[float]`
      (default: the world's reward model); `gold`: an optional judge callable (default: the
      world's gold judge when the world's LM is used).
    - `prompts`: list of str, a dataset spec (see `llm_envs.data.load_prompts`), or None (the
      world's train split); `max_prompt_tokens` drops longer prompts.
    - `top_p=0.9`, `top_k=None`, `temperature=1.0`, `p_t=0.01`, `max_rejections=None`,
      `max_new_tokens=32`, `max_steps=None`, `obs_mode="candidate"`, `invalid_action="accept"`,
      `rejection_cost=0.0`, `deviation_beta=0.0`, `hidden_layer=-1`, `device="auto"`,
      `dtype="auto"` (float32; "bfloat16"/"float16" on GPU).

    ## Version History
    - v0: initial version.
    """

    core_class = TokenAcceptCore

    def render(self) -> str | None:
        if self.render_mode != "ansi":
            return None
        state = self.core.rows[0]
        tok = self.core.ctx.tokenizer
        return f"{state.prompt} {tok.decode(state.response)} [{tok.decode([state.candidate])}?]"

    @property
    def engine(self) -> DecodeEngine:
        return self.core.engine
