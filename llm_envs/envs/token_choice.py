"""TokenChoice-v0: reward-guided search as an MDP (ARGS, Khanov et al., 2024).

At every response position the agent picks one of the LM's top-k candidate tokens; ARGS is one
hand-written policy of this env (`agents.args`). `TokenChoiceCore` is the one implementation,
batched over N rows on one `DecodeEngine`; `TokenChoiceEnv` is that core with one row, and the
vector views (`gym.make_vec`, `llm_envs.make_sb3_vec_env`) are the core with N rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from llm_envs.engine import DecodeEngine, StepOutput
from llm_envs.envs.core import BatchedCore, RowState
from llm_envs.envs.params import TokenChoiceParams
from llm_envs.envs.pools import nucleus_pools, top_k_by_id
from llm_envs.envs.single import SingleRowEnv
from llm_envs.rewards import CandidateScorer, Scoring

__all__ = ["LOGPROB_FLOOR", "TokenChoiceCore", "TokenChoiceEnv", "TokenChoiceParams"]

LOGPROB_FLOOR = -100.0  # observed log-probs are clamped here


@dataclass
class _Row(RowState):
    """A row's position state: the candidate arrays describe the current position."""

    cand_ids: torch.Tensor | None = None  # [k'] long, k' = min(k, vocab), by descending logit, ties by id
    cand_logits: torch.Tensor | None = None  # [k'] float32, the raw logits
    cand_logprobs: torch.Tensor | None = None  # [k'] float64, log softmax(logits / temperature)
    valid: int = 1  # slots [0, valid) are legal (the top-p nucleus, capped at k')
    decisions: int = 0  # steps taken with more than one legal slot (the agent had a choice)
    rm_calls: int = 0  # reward-model calls that scored this row's candidates or prefix (compute accounting)
    hidden: torch.Tensor | None = None  # prefix hidden state h(x, y_<t)
    rewards: dict[str, np.ndarray] = field(default_factory=dict)  # candidate rewards by scoring mode
    last_score: float = 0.0  # dense shaping: R(x, y) of the response so far
    prev_score: float = 0.0  # dense shaping: R(x, y_<t) before the last step
    start_score: float = 0.0  # dense shaping: R(x, empty response)


class TokenChoiceCore(BatchedCore[TokenChoiceParams, _Row]):
    """The batched pick-one-of-k MDP. See `TokenChoiceEnv` for the env card."""

    params_class = TokenChoiceParams
    row_class = _Row
    row_methods = ("candidate_rewards", "candidate_logits", "candidate_ids")
    vocab_bounded = ("k",)
    forced_info_key, forced_stat_key = "forced_action", "forced_actions"

    def __init__(self, num_rows: int = 1, **kwargs: Any) -> None:
        super().__init__(num_rows, **kwargs)
        params = self.params
        self.k = params.k
        self.action_help = f"an int slot in [0, {self.k})"
        self.max_steps = params.max_new_tokens if params.max_steps is None else min(params.max_steps,
                                                                                     params.max_new_tokens)
        self.scorer = CandidateScorer(self.ctx.reward, self.num_rows, self.ctx.tokenizer,
                                      prefix_cache=params.prefix_cache)
        self.obs_dim = self.hidden_size + self.k * (2 if params.obs_rewards else 1) + 1
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (self.obs_dim,), np.float32)
        self.action_space = gym.spaces.Discrete(self.k)

    # ------------------------------------------------------------------ positions
    def _set_positions(self, rows: list[int], out: StepOutput) -> None:
        """Candidates of each row's next position: the top-k of the raw logits (as ARGS does), ties
        by lower token id (`top_k_by_id`: bf16 logits tie, and topk's tie order is arbitrary)."""
        logits, p = out.logits, self.params
        top_logits, top_ids = top_k_by_id(logits, min(self.k, logits.shape[-1]))
        logprobs = torch.log_softmax(logits.double() / p.temperature, dim=-1).gather(1, top_ids)
        sizes = nucleus_pools(logits, top_p=p.top_p, top_k=self.k, temperature=p.temperature).size.tolist()
        for i, row in enumerate(rows):
            state = self.rows[row]
            state.cand_ids, state.cand_logits = top_ids[i].cpu(), top_logits[i].cpu()
            state.cand_logprobs, state.hidden = logprobs[i].cpu(), out.hidden[i]
            state.valid, state.rewards = int(sizes[i]), {}

    def _advance(self, continuing: list[int], started: list[int], actions: np.ndarray) -> None:
        """Append each continuing row's token (one batched forward), then score the new positions
        of continuing and started rows together (one reward call, when the params need it)."""
        if started:
            self.scorer.forget(started)
        if continuing:
            tokens = [self.rows[r].response[-1] if r in continuing else 0 for r in range(self.num_rows)]
            out = self.engine.append(tokens, [r in continuing for r in range(self.num_rows)])
            self._set_positions(continuing, StepOutput(out.logits[continuing], out.hidden[continuing]))
        self._score_new_positions(sorted(continuing + started))
        for row in started:
            self.rows[row].start_score = self.rows[row].last_score

    def _score_new_positions(self, rows: list[int]) -> None:
        """Candidate rewards (obs_rewards) and R(x, y) (dense_reward) in one reward call."""
        p = self.params
        if not rows or not (p.obs_rewards or p.dense_reward):
            return
        cands = [self.rows[r].cand_ids.tolist() if p.obs_rewards else [] for r in rows]
        scores, prefix = self._score(rows, cands, "wrapper", prefix=p.dense_reward)
        for i, row in enumerate(rows):
            if p.obs_rewards:
                self.rows[row].rewards["wrapper"] = scores[i]
            if p.dense_reward:
                self.rows[row].last_score = float(prefix[i])

    def _score(
        self, rows: list[int], cands: list[list[int]], scoring: Scoring, prefix: bool = False
    ) -> tuple[np.ndarray, np.ndarray | None]:
        states = [self.rows[r] for r in rows]
        before = self.ctx.reward.calls
        out = self.scorer.score(rows, [s.prompt_ids for s in states], [s.response for s in states], cands,
                                scoring=scoring, prefix=prefix)
        for state in states:  # a batched call is billed to every row it served, as ARGS counts them
            state.rm_calls += self.ctx.reward.calls - before
        return out

    # ------------------------------------------------------------------ candidates (row_methods)
    def candidate_rewards(self, scoring: Scoring = "wrapper") -> np.ndarray:
        """[N, k] reward of prompt + response + candidate j for every live row (one batched call).

        ``scoring="wrapper"``: the reward wrapper's score (the conventions of the terminal reward);
        ``"raw"``: the reward model's score of exactly those token ids (the ARGS reference). Rows
        not in an episode (ended, about to reset), and slots past the vocabulary, read 0. Cached
        until the next step.
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

    # ------------------------------------------------------------------ actions
    def action_masks(self) -> np.ndarray:
        """[N, k] bool: slots inside the top-p nucleus (and the vocabulary); slot 0 always."""
        masks = np.zeros((self.num_rows, self.k), dtype=bool)
        masks[:, 0] = True
        for row, state in enumerate(self.rows):
            if state.live:
                masks[row, : state.valid] = True
        return masks

    def _allowed(self, state: _Row, slot: int) -> bool:
        return slot < state.valid

    def _masked_message(self, state: _Row, slot: int) -> str:
        return (f"slot {slot} is masked here (only slots [0, {state.valid}) are in the top-p nucleus and the "
                "vocabulary); use action_masks(), or pass invalid_action='top' to replace masked slots by slot 0.")

    def _act(self, state: _Row, slot: int) -> tuple[float, int | None]:
        state.decisions += int(state.valid > 1)
        cost = self.params.deviation_beta * float(state.cand_logprobs[0] - state.cand_logprobs[slot])
        state.deviation_cost += cost
        state.prev_score = state.last_score
        return -cost, int(state.cand_ids[slot])

    # ------------------------------------------------------------------ rewards
    def _final_reward(self, state: _Row, score: float) -> float:
        # Dense shaping ends on the terminal score: R(x, y) - R(x, y_<T).
        return score - state.prev_score if self.params.dense_reward else score

    def _shaping_reward(self, state: _Row) -> float:
        # R(x, y_<=t) - R(x, y_<t), with R(x, y_<=t) scored by `_advance`.
        return state.last_score - state.prev_score if self.params.dense_reward else 0.0

    def _reward_parts(self, state: _Row, score: float) -> dict[str, float]:
        parts = {"reward_model": score, "deviation_cost": -state.deviation_cost}
        if self.params.dense_reward:
            parts["prompt_baseline"] = -state.start_score
        return parts

    def _episode_stats(self, state: _Row) -> dict[str, Any]:
        return {self.forced_stat_key: state.forced, "decisions": state.decisions, "rm_calls": state.rm_calls}

    # ------------------------------------------------------------------ observation, infos
    def _observations(self, rows: Sequence[int]) -> np.ndarray:
        return np.stack([self._observation(r) for r in rows])

    def _observation(self, row: int) -> np.ndarray:
        state = self.rows[row]
        if state.cand_ids is None:
            return np.zeros(self.obs_dim, dtype=np.float32)
        logprobs = torch.full((self.k,), LOGPROB_FLOOR, dtype=torch.float32)
        logprobs[: len(state.cand_logprobs)] = state.cand_logprobs.clamp(min=LOGPROB_FLOOR).float()
        parts = [state.hidden.float().cpu(), logprobs]
        if self.params.obs_rewards:
            rewards = torch.zeros(self.k, dtype=torch.float32)
            values = state.rewards.get("wrapper")
            if values is not None:
                rewards[: len(values)] = torch.as_tensor(values, dtype=torch.float32)
            parts.append(rewards)
        parts.append(torch.tensor([len(state.response) / self.params.max_new_tokens], dtype=torch.float32))
        return torch.cat(parts).numpy().astype(np.float32, copy=True)

    def _candidate_info(self, state: _Row) -> dict[str, Any]:
        return {"candidate_ids": state.cand_ids.tolist(), "valid_slots": state.valid}


class TokenChoiceEnv(SingleRowEnv):
    """
    ## Description
    Reward-guided search as an MDP (ARGS, Khanov et al., 2024): at every response position a
    frozen causal LM offers its `k` most probable next tokens, and the agent picks one. ARGS
    (`agents.args`) is a hand-written policy of this env (`logit_j + w * r_j`, with `r_j` from
    `candidate_rewards()`); an RL agent can learn another.

    ## Action Space
    `Discrete(k)`: the slot of the chosen candidate. Slots are ordered by probability: slot j holds
    the (j+1)-th token of `torch.topk(logits, k)` of the raw next-token logits (ties by lower token id,
    so the order is the same on every run and device). `action_masks()`
    returns a `(k,)` bool array: slots inside the top-p nucleus of `softmax(logits / temperature)`
    (smallest prefix reaching `top_p`; all k slots with the default `top_p=1.0`) are legal; slot 0
    always is. A masked slot is replaced by slot 0
    (`info["forced_action"] = True`), or raises with `invalid_action="raise"`. Any action that is
    not an int in `[0, k)` raises.

    ## Observation Space
    `Box(-inf, inf, (D,), float32)`, with `H` the LM's hidden size, `D = H + k + 1`
    (`H + 2k + 1` with `obs_rewards=True`):
    - `obs[:H]`: last-layer (or `hidden_layer`) hidden state of the prefix, `h(x, y_<t)`;
    - `obs[H:H+k]`: the candidates' log-probs `log softmax(logits / temperature)`, in slot order,
      clamped at -100;
    - with `obs_rewards=True`, `obs[H+k:H+2k]`: `candidate_rewards()` (one reward-model call per
      step);
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
    `reset` and every `step`: `candidate_ids` (the k candidate token ids),
    `valid_slots`, `prompt`, `prompt_index`, `position`, `forced_action`. The final step adds
    `response_ids` (EOS included when chosen), `response_text`, `reward_parts` (`reward_model`,
    `deviation_cost` and, with `dense_reward`, `prompt_baseline` = -R(x, empty): these sum to the
    episode return; plus `gold` when a gold judge is set, for evaluation only) and `episode_stats`
    (`steps`, `response_len`, `forced_actions`, `decisions` = steps taken with more than one legal
    slot, `rm_calls` = reward-model calls (the wrapper's `calls`: backend batches) that scored this
    row's candidates or prefix (with `obs_rewards`, `dense_reward` or `candidate_rewards()`; a
    batched call counts once for each row it served; the final scoring is not counted),
    `lm_forwards`).

    Methods: `action_masks()`; `candidate_rewards(scoring="wrapper")` -> `(k,)` reward of
    prompt + response + candidate for each slot, in one batched reward-model call that reuses the
    reward model's KV cache of the prefix when the tokenizers match (`scoring="raw"`: the RM's
    score of exactly those token ids, as the ARGS reference computes it); `candidate_logits()` ->
    `(k,)` raw logits; `candidate_ids()`. Every vector view (`gym.make_vec`,
    `llm_envs.vector.make_vector_env`, `llm_envs.make_sb3_vec_env`) has the same methods with a
    leading `num_envs` axis (rows about to reset read 0 / -inf / -1); SB3's
    `env_method("candidate_rewards")` gives one row per env.

    ## Arguments
    `gym.make("llm_envs/TokenChoice-v0", **kwargs)`; with no kwargs it runs on the embedded world:
    - World keywords: `lm`, `tokenizer`, `reward`, `gold`, `prompts`, `max_prompt_tokens`,
      `chat_template`, `system_prompt`, `reward_rules`, `reward_tokenizer`, `device`, `dtype`, `context`: as
      in `llm_envs/TokenAccept-v0`.

    MDP parameters (`TokenChoiceParams`): pass them as keywords, or `params=TokenChoiceParams(...)`
    (keywords given beside it replace its fields); `env.unwrapped.params` holds them. An unknown
    keyword raises with a "did you mean":
    {params}

    ## Version History
    - v0: initial version.
    - v0: `episode_stats["decisions"]` and `["rm_calls"]` added (the MDP is unchanged).
    """

    core_class = TokenChoiceCore

    def render(self) -> str | None:
        if self.render_mode != "ansi":
            return None
        state, tok = self.core.rows[0], self.core.ctx.tokenizer
        options = " | ".join(tok.decode([t]) for t in state.cand_ids[: state.valid].tolist())
        return f"{state.prompt} {tok.decode(state.response)} [{options}?]"

    @property
    def engine(self) -> DecodeEngine:
        return self.core.engine
