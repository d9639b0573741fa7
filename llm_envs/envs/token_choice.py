"""TokenChoice-v0: reward-guided search as an MDP (ARGS, Khanov et al., 2024).

At every response position the agent picks one of the LM's top-k candidate tokens; ARGS is one
hand-written policy of this env (`agents.args`). `TokenChoiceCore` is the one implementation,
batched over N rows on one `DecodeEngine`; `TokenChoiceEnv` is that core with one row, and the
vector views (`gym.make_vec`, `llm_envs.make_sb3_vec_env`) are the core with N rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

import gymnasium as gym
import numpy as np
import torch

from llm_envs.engine import DecodeEngine
from llm_envs.envs.context import LMContext, context_for_env
from llm_envs.envs.pools import nucleus_pools, validate_sampling
from llm_envs.envs.single import SingleRowEnv
from llm_envs.rewards import CandidateScorer, Scoring
from llm_envs.vector import LMVectorEnv

LOGPROB_FLOOR = -100.0  # observed log-probs are clamped here (and slots past the vocabulary read it)


@dataclass
class _Row:
    """Per-row episode state; the candidate arrays describe the current position."""

    prompt: str = ""
    prompt_index: int | None = None
    prompt_ids: list[int] = field(default_factory=list)
    response: list[int] = field(default_factory=list)
    cand_ids: torch.Tensor | None = None  # [k'] long, k' = min(k, vocab), by descending logit
    cand_logits: torch.Tensor | None = None  # [k'] float32, the raw logits
    cand_logprobs: torch.Tensor | None = None  # [k'] float64, log softmax(logits / temperature)
    valid: int = 1  # slots [0, valid) are legal (the top-p nucleus, capped at k')
    hidden: torch.Tensor | None = None  # prefix hidden state h(x, y_<t)
    rewards: dict[str, np.ndarray] = field(default_factory=dict)  # candidate rewards by scoring mode
    last_score: float = 0.0  # dense shaping: R(x, y) of the response so far
    prev_score: float = 0.0  # dense shaping: R(x, y_<t) before the last step
    start_score: float = 0.0  # dense shaping: R(x, empty response)
    steps: int = 0
    forced: int = 0
    deviation_cost: float = 0.0
    live: bool = False


class TokenChoiceCore:
    """The batched pick-one-of-k MDP. See `TokenChoiceEnv` for the env card."""

    def __init__(
        self,
        num_rows: int = 1,
        *,
        lm: Any = None,
        reward: Any = None,
        prompts: Any = None,
        tokenizer: Any = None,
        gold: Any = None,
        k: int = 10,
        top_p: float = 1.0,
        temperature: float = 1.0,
        max_new_tokens: int = 32,
        max_steps: int | None = None,
        obs_rewards: bool = False,
        dense_reward: bool = False,
        deviation_beta: float = 0.0,
        invalid_action: Literal["top", "raise"] = "top",
        hidden_layer: int = -1,
        device: str | torch.device | None = "auto",
        dtype: str | torch.dtype | None = "auto",
        max_prompt_tokens: int | None = None,
        prefix_cache: bool = True,
        context: LMContext | None = None,
    ) -> None:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k={k!r}; expected a positive int (the number of candidate slots; ARGS uses 10).")
        validate_sampling(top_p, None, temperature)
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens!r}; expected a positive int.")
        if max_steps is not None and (not isinstance(max_steps, int) or max_steps < 1):
            raise ValueError(f"max_steps={max_steps!r}; expected a positive int or None.")
        if invalid_action not in ("top", "raise"):
            raise ValueError(f"invalid_action={invalid_action!r}; expected 'top' (take slot 0) or 'raise'.")
        if not np.isfinite(deviation_beta) or deviation_beta < 0:
            raise ValueError(f"deviation_beta={deviation_beta!r}; expected a finite number >= 0.")
        self.ctx = context_for_env(context, lm=lm, tokenizer=tokenizer, reward=reward, prompts=prompts,
                                   gold=gold, device=device, dtype=dtype, max_prompt_tokens=max_prompt_tokens)
        self.num_rows, self.k = num_rows, int(k)
        self.top_p, self.temperature = top_p, temperature
        self.max_new_tokens = max_new_tokens
        self.max_steps = max_new_tokens if max_steps is None else min(max_steps, max_new_tokens)
        self.obs_rewards, self.dense_reward = bool(obs_rewards), bool(dense_reward)
        self.deviation_beta = float(deviation_beta)
        self.invalid_action = invalid_action
        self.engine = DecodeEngine(self.ctx.model, num_rows, hidden_layer=hidden_layer)
        self.scorer = CandidateScorer(self.ctx.reward, num_rows, self.ctx.tokenizer, prefix_cache=prefix_cache)
        self.hidden_size = self.engine.hidden_size
        self.obs_dim = self.hidden_size + self.k * (2 if self.obs_rewards else 1) + 1
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (self.obs_dim,), np.float32)
        self.action_space = gym.spaces.Discrete(self.k)
        self.rows = [_Row() for _ in range(num_rows)]

    # ------------------------------------------------------------------ reset
    def reset_rows(
        self,
        rows: Sequence[int],
        rngs: Sequence[np.random.Generator],
        options: Sequence[dict[str, Any] | None],
    ) -> tuple[np.ndarray, list[dict[str, Any]]]:
        """Start new episodes on `rows`; returns their observations [len(rows), D] and infos."""
        rows = list(rows)
        for row, rng, opts in zip(rows, rngs, options):
            self._start_episode(self.rows[row], rng, opts or {})
        out = self.engine.reset_rows(rows, [self.rows[r].prompt_ids for r in rows])
        self.scorer.forget(rows)
        self._set_positions(rows, out.logits, out.hidden)
        self._score_new_positions(rows)
        for row in rows:
            state = self.rows[row]
            state.start_score = state.last_score
        return np.stack([self._observation(r) for r in rows]), [self._info(r) for r in rows]

    def _start_episode(self, state: _Row, rng: np.random.Generator, options: dict[str, Any]) -> None:
        prompt, index, prompt_ids = self.ctx.pick_prompt(rng, options, self.max_new_tokens)
        state.__init__(prompt=prompt, prompt_index=index, prompt_ids=prompt_ids, live=True)

    def _set_positions(self, rows: list[int], logits: torch.Tensor, hidden: torch.Tensor) -> None:
        """Candidates of each row's next position: torch.topk of the raw logits (as ARGS does)."""
        top_logits, top_ids = torch.topk(logits, min(self.k, logits.shape[-1]), dim=-1)
        logprobs = torch.log_softmax(logits.double() / self.temperature, dim=-1).gather(1, top_ids)
        sizes = nucleus_pools(logits, top_p=self.top_p, top_k=self.k, temperature=self.temperature).size.tolist()
        for i, row in enumerate(rows):
            state = self.rows[row]
            state.cand_ids, state.cand_logits = top_ids[i].cpu(), top_logits[i].cpu()
            state.cand_logprobs, state.hidden = logprobs[i].cpu(), hidden[i]
            state.valid, state.rewards = int(sizes[i]), {}

    def _score_new_positions(self, rows: list[int]) -> None:
        """Candidate rewards (obs_rewards) and R(x, y) (dense_reward) in one reward call."""
        if not rows or not (self.obs_rewards or self.dense_reward):
            return
        cands = [self.rows[r].cand_ids.tolist() if self.obs_rewards else [] for r in rows]
        scores, prefix = self._score(rows, cands, "wrapper", prefix=self.dense_reward)
        for i, row in enumerate(rows):
            if self.obs_rewards:
                self.rows[row].rewards["wrapper"] = scores[i]
            if self.dense_reward:
                self.rows[row].last_score = float(prefix[i])

    def _score(
        self, rows: list[int], cands: list[list[int]], scoring: Scoring, prefix: bool = False
    ) -> tuple[np.ndarray, np.ndarray | None]:
        states = [self.rows[r] for r in rows]
        return self.scorer.score(rows, [s.prompt_ids for s in states], [s.response for s in states], cands,
                                 scoring=scoring, prefix=prefix)

    # ------------------------------------------------------------------ candidates
    def candidate_rewards(self, scoring: Scoring = "wrapper") -> np.ndarray:
        """[N, k] reward of prompt + response + candidate j for every live row (one batched call).

        ``scoring="wrapper"``: the reward wrapper's score (the conventions of the terminal reward);
        ``"raw"``: the reward model's score of exactly those token ids (the ARGS reference). Rows
        not in an episode, and slots past the vocabulary, read 0. Cached until the next step.
        """
        missing = [r for r, s in enumerate(self.rows) if s.live and scoring not in s.rewards]
        if missing:
            scores, _ = self._score(missing, [self.rows[r].cand_ids.tolist() for r in missing], scoring)
            for i, row in enumerate(missing):
                self.rows[row].rewards[scoring] = scores[i]
        out = np.zeros((self.num_rows, self.k))
        for row, state in enumerate(self.rows):
            if state.live:
                values = state.rewards[scoring]
                out[row, : len(values)] = values
        return out

    def candidate_logits(self) -> np.ndarray:
        """[N, k] float32 raw LM logits of the candidates (-inf past the vocabulary or off-episode)."""
        out = np.full((self.num_rows, self.k), -np.inf, dtype=np.float32)
        for row, state in enumerate(self.rows):
            if state.live:
                out[row, : len(state.cand_logits)] = state.cand_logits.numpy()
        return out

    def candidate_ids(self) -> np.ndarray:
        """[N, k] int64 candidate token ids (-1 past the vocabulary or off-episode)."""
        out = np.full((self.num_rows, self.k), -1, dtype=np.int64)
        for row, state in enumerate(self.rows):
            if state.live:
                out[row, : len(state.cand_ids)] = state.cand_ids.numpy()
        return out

    # ------------------------------------------------------------------ step
    def action_masks(self) -> np.ndarray:
        """[N, k] bool: slots inside the top-p nucleus (and the vocabulary); slot 0 always."""
        masks = np.zeros((self.num_rows, self.k), dtype=bool)
        masks[:, 0] = True
        for row, state in enumerate(self.rows):
            if state.live:
                masks[row, : state.valid] = True
        return masks

    def step(
        self, actions: Sequence[int] | np.ndarray, active: Sequence[bool] | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[dict[str, Any]]]:
        """Step the active rows (all by default). Rows not active keep their state."""
        active = [True] * self.num_rows if active is None else list(active)
        actions = np.asarray(actions).reshape(-1)
        if actions.shape[0] != self.num_rows:
            raise ValueError(f"got {actions.shape[0]} actions for {self.num_rows} envs; pass one per env.")
        n = self.num_rows
        rewards, forced = np.zeros(n), np.zeros(n, dtype=bool)
        terminated, truncated = np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
        stepped = [r for r in range(n) if active[r]]
        for row in stepped:
            state = self.rows[row]
            if not state.live:
                raise RuntimeError(
                    f"env {row}: step() called before reset() or after the episode ended; call reset() first."
                )
            slot = self._checked_action(actions[row], state, row)
            forced[row] = slot != int(float(actions[row]))
            rewards[row], terminated[row], truncated[row] = self._apply(state, slot, bool(forced[row]))
        going = [r for r in stepped if not (terminated[r] or truncated[r])]
        if going:
            tokens = [self.rows[r].response[-1] if r in going else 0 for r in range(n)]
            out = self.engine.append(tokens, [r in going for r in range(n)])
            self._set_positions(going, out.logits[going], out.hidden[going])
            self._score_new_positions(going)
        done = [r for r in stepped if terminated[r] or truncated[r]]
        finals = self._finish(done)
        infos: list[dict[str, Any]] = [{} for _ in range(n)]
        for row in stepped:
            state = self.rows[row]
            if self.dense_reward:  # R(x, y_<=t) - R(x, y_<t); the last step ends on the terminal score
                new = finals[row]["reward_model"] if row in finals else state.last_score
                rewards[row] += new - state.prev_score
            elif row in finals:
                rewards[row] += finals[row]["reward_model"]
            infos[row] = self._info(row, forced_action=bool(forced[row]))
            if row in finals:
                infos[row].update(finals[row]["info"])
        obs = np.stack([self._observation(r) for r in range(n)])
        return obs, rewards, terminated, truncated, infos

    def _checked_action(self, raw: Any, state: _Row, row: int) -> int:
        try:
            value = float(raw)
            valid = not isinstance(raw, (bool, np.bool_)) and value.is_integer() and 0 <= value < self.k
        except (TypeError, ValueError):
            valid = False
        if not valid:
            raise ValueError(
                f"env {row}: action {raw!r} is outside the action space; expected an int slot in [0, {self.k})."
            )
        slot = int(value)
        if slot >= state.valid:
            if self.invalid_action == "raise":
                raise ValueError(
                    f"env {row}: slot {slot} is masked here (only slots [0, {state.valid}) are in the top-p "
                    f"nucleus and the vocabulary); use action_masks(), or pass invalid_action='top' to "
                    "replace masked slots by slot 0."
                )
            return 0
        return slot

    def _apply(self, state: _Row, slot: int, forced: bool) -> tuple[float, bool, bool]:
        """Append the chosen candidate; returns (step reward so far, terminated, truncated)."""
        state.steps += 1
        state.forced += int(forced)
        token = int(state.cand_ids[slot])
        cost = self.deviation_beta * float(state.cand_logprobs[0] - state.cand_logprobs[slot])
        state.deviation_cost += cost
        state.prev_score = state.last_score
        state.response.append(token)
        if token == self.ctx.eos_token_id:
            return -cost, True, False
        truncated = len(state.response) >= self.max_new_tokens or state.steps >= self.max_steps
        return -cost, False, truncated

    # ------------------------------------------------------------------ episode end
    def _finish(self, rows: list[int]) -> dict[int, dict[str, Any]]:
        """Score finished rows in one batched reward call (and one gold call)."""
        if not rows:
            return {}
        states = [self.rows[r] for r in rows]
        scores = self.ctx.reward.score_ids([s.prompt_ids for s in states], [s.response for s in states],
                                           self.ctx.tokenizer)
        texts = [self.ctx.tokenizer.decode(s.response, skip_special_tokens=True) for s in states]
        golds = self.ctx.gold.score([s.prompt for s in states], texts) if self.ctx.gold else None
        finals = {}
        for i, (row, state) in enumerate(zip(rows, states)):
            state.live = False
            parts = {"reward_model": float(scores[i]), "deviation_cost": -state.deviation_cost}
            if self.dense_reward:
                parts["prompt_baseline"] = -state.start_score
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
                        "forced_actions": state.forced,
                        "lm_forwards": self.engine.row_forwards(row),
                    },
                },
            }
        return finals

    # ------------------------------------------------------------------ observation
    def _observation(self, row: int) -> np.ndarray:
        state = self.rows[row]
        if state.cand_ids is None:
            return np.zeros(self.obs_dim, dtype=np.float32)
        logprobs = torch.full((self.k,), LOGPROB_FLOOR, dtype=torch.float32)
        logprobs[: len(state.cand_logprobs)] = state.cand_logprobs.clamp(min=LOGPROB_FLOOR).float()
        parts = [state.hidden.float().cpu(), logprobs]
        if self.obs_rewards:
            rewards = torch.zeros(self.k, dtype=torch.float32)
            values = state.rewards.get("wrapper")
            if values is not None:
                rewards[: len(values)] = torch.as_tensor(values, dtype=torch.float32)
            parts.append(rewards)
        parts.append(torch.tensor([len(state.response) / self.max_new_tokens], dtype=torch.float32))
        return torch.cat(parts).numpy().astype(np.float32, copy=True)

    def _info(self, row: int, forced_action: bool = False) -> dict[str, Any]:
        state = self.rows[row]
        return {
            "candidate_ids": state.cand_ids.tolist(),
            "valid_slots": state.valid,
            "prompt": state.prompt,
            "prompt_index": state.prompt_index,
            "position": len(state.response),
            "forced_action": forced_action,
        }


class TokenChoiceEnv(SingleRowEnv):
    """
    ## Description
    Reward-guided search as an MDP (ARGS, Khanov et al., 2024): at every response position a
    frozen causal LM offers its `k` most probable next tokens, and the agent picks one. ARGS
    (`agents.args`) is a hand-written policy of this env (`logit_j + w * r_j`, with `r_j` from
    `candidate_rewards()`); an RL agent can learn another.

    ## Action Space
    `Discrete(k)`: the slot of the chosen candidate. Slots are ordered by probability: slot j holds
    the (j+1)-th token of `torch.topk(logits, k)` of the raw next-token logits. `action_masks()`
    returns a `(k,)` bool array: slots inside the top-p nucleus of `softmax(logits / temperature)`
    (smallest prefix reaching `top_p`; all k slots with the default `top_p=1.0`) and inside the
    vocabulary are legal; slot 0 always is. A masked slot is replaced by slot 0
    (`info["forced_action"] = True`), or raises with `invalid_action="raise"`. Any action that is
    not an int in `[0, k)` raises.

    ## Observation Space
    `Box(-inf, inf, (D,), float32)`, with `H` the LM's hidden size, `D = H + k + 1`
    (`H + 2k + 1` with `obs_rewards=True`):
    - `obs[:H]`: last-layer (or `hidden_layer`) hidden state of the prefix, `h(x, y_<t)`;
    - `obs[H:H+k]`: the candidates' log-probs `log softmax(logits / temperature)`, in slot order,
      clamped at -100 (slots past the vocabulary read -100);
    - with `obs_rewards=True`, `obs[H+k:H+2k]`: `candidate_rewards()` (one reward-model call per
      step; 0 past the vocabulary);
    - `obs[-1]`: `budget_used` = response tokens so far / `max_new_tokens`.

    ## Starting State
    `reset` draws a prompt uniformly from `prompts` with the env's seeded RNG, or takes
    `options={"prompt": str}` / `options={"prompt_index": int}`; the candidates are the top-k tokens
    after the prompt.

    ## Rewards
    Default: 0 per step and, at the final step, the reward wrapper's score R(x, y) of (prompt,
    response) (the response cut at the next turn marker). With `dense_reward=True`, every step
    gets `R(x, y_<=t) - R(x, y_<t)` instead (scored by the same wrapper; the sum over an episode is
    `R(x, y) - R(x, empty)`). Optional deviation cost per step:
    `-deviation_beta * (log p(slot 0) - log p(chosen))`.

    ## Episode End
    Terminated when the EOS token is chosen. Truncated after `max_new_tokens` tokens (or
    `max_steps`, when smaller); the response so far is scored either way.

    ## Information
    `reset` and every `step`: `candidate_ids` (the k' = min(k, vocab) candidate token ids),
    `valid_slots`, `prompt`, `prompt_index`, `position`, `forced_action`. The final step adds
    `response_ids` (EOS included when chosen), `response_text`, `reward_parts` (`reward_model`,
    `deviation_cost` and, with `dense_reward`, `prompt_baseline` = -R(x, empty): these sum to the
    episode return; plus `gold` when a gold judge is set, for evaluation only) and `episode_stats`
    (`steps`, `response_len`, `forced_actions`, `lm_forwards`).

    Methods: `action_masks()`; `candidate_rewards(scoring="wrapper")` -> `(k,)` reward of
    prompt + response + candidate for each slot, in one batched reward-model call that reuses the
    reward model's KV cache of the prefix when the tokenizers match (`scoring="raw"`: the RM's
    score of exactly those token ids, as the ARGS reference computes it); `candidate_logits()` ->
    `(k,)` raw logits; `candidate_ids()`. The vector env (`gym.make_vec`) has the same methods with
    a leading `num_envs` axis; on the SB3 view call them on `venv.core`.

    ## Arguments
    `gym.make("llm_envs/TokenChoice-v0", **kwargs)`; with no kwargs it runs on the embedded world:
    - `lm`, `tokenizer`, `reward`, `gold`, `prompts`, `max_prompt_tokens`, `device`, `dtype`,
      `hidden_layer`: as in `llm_envs/TokenAccept-v0`.
    - `k=10` (the ARGS paper's setting), `top_p=1.0`, `temperature=1.0`, `max_new_tokens=32`,
      `max_steps=None`, `obs_rewards=False`, `dense_reward=False`, `deviation_beta=0.0`,
      `invalid_action="top"`, `prefix_cache=True` (`False` scores candidates from scratch).

    ## Version History
    - v0: initial version.
    """

    core_class = TokenChoiceCore

    def candidate_rewards(self, scoring: Scoring = "wrapper") -> np.ndarray:
        return self.core.candidate_rewards(scoring)[0]

    def candidate_logits(self) -> np.ndarray:
        return self.core.candidate_logits()[0]

    def candidate_ids(self) -> np.ndarray:
        return self.core.candidate_ids()[0]

    def render(self) -> str | None:
        if self.render_mode != "ansi":
            return None
        state, tok = self.core.rows[0], self.core.ctx.tokenizer
        options = " | ".join(tok.decode([t]) for t in state.cand_ids[: state.valid].tolist())
        return f"{state.prompt} {tok.decode(state.response)} [{options}?]"

    @property
    def engine(self) -> DecodeEngine:
        return self.core.engine


class TokenChoiceVectorEnv(LMVectorEnv):
    """`gym.make_vec("llm_envs/TokenChoice-v0", num_envs=N)`: `LMVectorEnv` plus the candidate methods."""

    def candidate_rewards(self, scoring: Scoring = "wrapper") -> np.ndarray:
        """[num_envs, k]; rows about to auto-reset read 0."""
        out = self.core.candidate_rewards(scoring)
        out[self._needs_reset] = 0.0
        return out

    def candidate_logits(self) -> np.ndarray:
        out = self.core.candidate_logits()
        out[self._needs_reset] = -np.inf
        return out

    def candidate_ids(self) -> np.ndarray:
        out = self.core.candidate_ids()
        out[self._needs_reset] = -1
        return out
