"""TokenChoice-v0: reward-guided search as an MDP (ARGS, Khanov et al., 2024).

At every response position the agent picks one of the LM's top-k candidate tokens; ARGS is one
hand-written policy of this env (`agents.args`). `TokenChoiceCore` is the one implementation,
batched over N rows on one `DecodeEngine`; `TokenChoiceEnv` is that core with one row, and the
vector views (`gym.make_vec`, `llm_envs.make_sb3_vec_env`) are the core with N rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from llm_envs.engine import DecodeEngine, StepOutput
from llm_envs.envs.core import BatchedCore, raise_non_finite
from llm_envs.envs.params import TokenChoiceParams
from llm_envs.envs.pools import nucleus_pools, top_k_by_id
from llm_envs.envs.rows import RowArrays, pack_rows, to_device
from llm_envs.envs.single import SingleRowEnv
from llm_envs.rewards import CandidateScorer, Scoring

__all__ = ["LOGPROB_FLOOR", "TokenChoiceCore", "TokenChoiceEnv", "TokenChoiceParams"]

LOGPROB_FLOOR = -100.0  # observed log-probs are clamped here


class TokenChoiceCore(BatchedCore[TokenChoiceParams]):
    """The batched pick-one-of-k MDP. See `TokenChoiceEnv` for the env card.

    Device state: each row's k candidates (ids, raw logits, log-probs), its legal slot count and
    prefix hidden state, written for all new positions at once. Host state: `state`'s arrays and
    the mirror of those candidate arrays (`_mirror`), copied back once per step (`_refresh`), from
    which the host builds observations, masks, infos and reward-model calls.
    """

    params_class = TokenChoiceParams
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
        n, width, device = self.num_rows, min(self.k, self.engine.vocab_size), self.device
        self._width = width  # k' = min(k, vocabulary): slots past it never hold a token
        self._device_state = {
            "ids": torch.zeros(n, width, dtype=torch.long, device=device),
            "logits": torch.zeros(n, width, dtype=torch.float32, device=device),
            "logprobs": torch.zeros(n, width, dtype=torch.float64, device=device),
            "valid": torch.ones(n, dtype=torch.long, device=device),
            "hidden": torch.zeros(n, self.hidden_size, dtype=torch.float32, device=device),
        }
        self._finite = torch.ones(n, dtype=torch.bool, device=device)  # the last forward's verdict per row
        self._mirror = RowArrays(n, {
            "ids": (np.int64, (width,)), "logits": (np.float32, (width,)), "logprobs": (np.float64, (width,)),
            "valid": (np.int64, ()), "hidden": (np.float32, (self.hidden_size,)),
        })
        # Candidate rewards of the current positions, by scoring mode; `_scored[mode][r]` says row r's are in.
        self._rewards: dict[str, np.ndarray] = {}
        self._scored: dict[str, np.ndarray] = {}

    def _row_fields(self) -> dict[str, tuple[Any, tuple[int, ...]]]:
        return {"decisions": (np.int64, ()),  # steps taken with more than one legal slot (the agent had a choice)
                "rm_calls": (np.int64, ()),  # reward-model calls that scored this row's candidates or prefix
                "last_score": (np.float64, ()),  # dense shaping: R(x, y) of the response so far
                "prev_score": (np.float64, ()),  # dense shaping: R(x, y_<t) before the last step
                "start_score": (np.float64, ())}  # dense shaping: R(x, empty response)

    def _row_extras(self, row: int) -> dict[str, Any]:
        m = self._mirror
        return {"cand_ids": m.ids[row].copy(), "cand_logits": m.logits[row].copy(),
                "cand_logprobs": m.logprobs[row].copy(), "valid": int(m.valid[row])}

    # ------------------------------------------------------------------ positions
    def _set_positions(self, rows: list[int], out: StepOutput) -> None:
        """Candidates of each row's next position: the top-k of the raw logits (as ARGS does), ties
        by lower token id (`top_k_by_id`: bf16 logits tie, and topk's tie order is arbitrary)."""
        logits, p, state = out.logits, self.params, self._device_state
        top_logits, top_ids = top_k_by_id(logits, self._width)
        index = to_device(np.asarray(rows, dtype=np.int64), self.device)
        state["ids"][index], state["logits"][index] = top_ids, top_logits
        state["logprobs"][index] = torch.log_softmax(logits.double() / p.temperature, dim=-1).gather(1, top_ids)
        state["valid"][index] = nucleus_pools(logits, top_p=p.top_p, top_k=self.k, temperature=p.temperature).size
        state["hidden"][index] = out.hidden
        for scored in self._scored.values():
            scored[rows] = False

    def _advance(self, continuing: np.ndarray, started: list[int], actions: np.ndarray) -> None:
        """Append each continuing row's token (one batched forward), copy the new positions to the
        host (one copy), then score the new positions of continuing and started rows together (one
        reward call, when the params need it)."""
        s = self.state
        if started:
            self.scorer.forget(started)
        if continuing.size:
            tokens = np.zeros(self.num_rows, dtype=np.int64)
            tokens[continuing] = s.response[continuing, s.response_len[continuing] - 1]
            mask = np.zeros(self.num_rows, dtype=bool)
            mask[continuing] = True
            out = self.engine.append(tokens, mask, check_finite=False)  # checked in `_refresh`'s copy
            index = to_device(continuing, self.device)
            self._set_positions(continuing.tolist(), StepOutput(out.logits[index], out.hidden[index]))
            self._finite[index] = out.finite[index]
        rows = np.union1d(continuing, np.asarray(started, dtype=np.int64))
        self._refresh(rows)
        self._finite.fill_(True)
        self._score_new_positions(rows)
        s.start_score[started] = s.last_score[started]

    def _refresh(self, rows: np.ndarray) -> None:
        """The candidate arrays of `rows`, copied to the host mirror in one transfer."""
        if not rows.size:
            return
        index = to_device(rows, self.device)
        host = pack_rows({**{name: tensor[index] for name, tensor in self._device_state.items()},
                          "finite": self._finite[index]})
        if not host["finite"].all():
            self._finite.fill_(True)
            raise_non_finite(rows[~host["finite"]], self.ctx.model)
        for name in self._device_state:
            getattr(self._mirror, name)[rows] = host[name]

    def _score_new_positions(self, rows: np.ndarray) -> None:
        """Candidate rewards (obs_rewards) and R(x, y) (dense_reward) in one reward call."""
        p = self.params
        if not rows.size or not (p.obs_rewards or p.dense_reward):
            return
        cands = self._mirror.ids[rows].tolist() if p.obs_rewards else [[] for _ in rows]
        scores, prefix = self._score(rows, cands, "wrapper", prefix=p.dense_reward)
        if p.obs_rewards:
            self._store_rewards("wrapper", rows, scores)
        if p.dense_reward:
            self.state.last_score[rows] = np.asarray(prefix, dtype=np.float64)

    def _store_rewards(self, scoring: Scoring, rows: np.ndarray, scores: Sequence[np.ndarray]) -> None:
        if scoring not in self._rewards:
            self._rewards[scoring] = np.zeros((self.num_rows, self.k))
            self._scored[scoring] = np.zeros(self.num_rows, dtype=bool)
        for row, values in zip(rows.tolist(), scores):
            self._rewards[scoring][row] = 0.0
            self._rewards[scoring][row, : len(values)] = values
        self._scored[scoring][rows] = True

    def _score(
        self, rows: np.ndarray, cands: list[list[int]], scoring: Scoring, prefix: bool = False
    ) -> tuple[np.ndarray, np.ndarray | None]:
        s = self.state
        before = self.ctx.reward.calls
        out = self.scorer.score(rows.tolist(), [list(s.prompt_ids[r]) for r in rows],
                                [s.response[r, : s.response_len[r]].tolist() for r in rows], cands,
                                scoring=scoring, prefix=prefix)
        # A batched call is billed to every row it served, as ARGS counts them.
        s.rm_calls[rows] += self.ctx.reward.calls - before
        return out

    # ------------------------------------------------------------------ candidates (row_methods)
    def candidate_rewards(self, scoring: Scoring = "wrapper") -> np.ndarray:
        """[N, k] reward of prompt + response + candidate j for every live row (one batched call).

        ``scoring="wrapper"``: the reward wrapper's score (the conventions of the terminal reward);
        ``"raw"``: the reward model's score of exactly those token ids (the ARGS reference). Rows
        not in an episode (ended, about to reset), and slots past the vocabulary, read 0. Cached
        until the next step.
        """
        live = self.state.live
        scored = self._scored.get(scoring)
        missing = np.flatnonzero(live & ~scored) if scored is not None else np.flatnonzero(live)
        if missing.size:
            scores, _ = self._score(missing, self._mirror.ids[missing].tolist(), scoring)
            self._store_rewards(scoring, missing, scores)
        out = np.zeros((self.num_rows, self.k))
        if scoring in self._rewards:
            out[live] = self._rewards[scoring][live]
        return out

    def candidate_logits(self) -> np.ndarray:
        """[N, k] float32 raw LM logits of the candidates (-inf past the vocabulary or off-episode)."""
        out = np.full((self.num_rows, self.k), -np.inf, dtype=np.float32)
        live = self.state.live
        out[live, : self._width] = self._mirror.logits[live]
        return out

    def candidate_ids(self) -> np.ndarray:
        """[N, k] int64 candidate token ids (-1 past the vocabulary or off-episode)."""
        out = np.full((self.num_rows, self.k), -1, dtype=np.int64)
        live = self.state.live
        out[live, : self._width] = self._mirror.ids[live]
        return out

    # ------------------------------------------------------------------ actions
    def _masks(self) -> np.ndarray:
        """[N, k] bool: slots inside the top-p nucleus (and the vocabulary); slot 0 always."""
        masks = np.arange(self.k)[None, :] < np.where(self.state.live, self._mirror.valid, 1)[:, None]
        masks[:, 0] = True
        return masks

    def action_masks(self) -> np.ndarray:
        """[N, k] bool: slots inside the top-p nucleus (and the vocabulary); slot 0 always."""
        return self._masks()

    def _masked_message(self, row: int, slot: int) -> str:
        valid = int(self._mirror.valid[row])
        return (f"slot {slot} is masked here (only slots [0, {valid}) are in the top-p nucleus and the "
                "vocabulary); use action_masks(), or pass invalid_action='top' to replace masked slots by slot 0.")

    def _act(self, chosen: np.ndarray, stepped: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        s, m = self.state, self._mirror
        rewards = np.zeros(self.num_rows)
        tokens = np.full(self.num_rows, -1, dtype=np.int64)
        slots = chosen[stepped]
        s.decisions[stepped] += m.valid[stepped] > 1
        cost = self.params.deviation_beta * (m.logprobs[stepped, 0] - m.logprobs[stepped, slots])
        s.deviation_cost[stepped] += cost
        s.prev_score[stepped] = s.last_score[stepped]
        rewards[stepped] = -cost
        tokens[stepped] = m.ids[stepped, slots]
        return rewards, tokens

    # ------------------------------------------------------------------ rewards
    def _final_rewards(self, rows: np.ndarray, scores: np.ndarray) -> np.ndarray:
        # Dense shaping ends on the terminal score: R(x, y) - R(x, y_<T).
        return scores - self.state.prev_score[rows] if self.params.dense_reward else scores

    def _shaping_rewards(self, rows: np.ndarray) -> np.ndarray:
        # R(x, y_<=t) - R(x, y_<t), with R(x, y_<=t) scored by `_advance`.
        s = self.state
        return s.last_score[rows] - s.prev_score[rows] if self.params.dense_reward else np.zeros(len(rows))

    def _reward_parts(self, row: int, score: float) -> dict[str, float]:
        parts = {"reward_model": score, "deviation_cost": -float(self.state.deviation_cost[row])}
        if self.params.dense_reward:
            parts["prompt_baseline"] = -float(self.state.start_score[row])
        return parts

    def _episode_stats(self, row: int) -> dict[str, Any]:
        s = self.state
        return {self.forced_stat_key: int(s.forced[row]), "decisions": int(s.decisions[row]),
                "rm_calls": int(s.rm_calls[row])}

    # ------------------------------------------------------------------ observation, infos
    def _observations(self, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        s, m, k, h = self.state, self._mirror, self.k, self.hidden_size
        out = np.zeros((len(rows), self.obs_dim), dtype=np.float32)
        started = s.prompt_ids[rows] != None
        out[:, :h] = m.hidden[rows]
        out[:, h:h + k] = LOGPROB_FLOOR
        out[:, h:h + self._width] = np.maximum(m.logprobs[rows], LOGPROB_FLOOR)
        if self.params.obs_rewards and "wrapper" in self._rewards:
            scored = self._scored["wrapper"][rows]
            out[scored, h + k:h + 2 * k] = self._rewards["wrapper"][rows[scored]]
        out[:, -1] = s.response_len[rows] / self.params.max_new_tokens
        out[~started] = 0.0
        return out

    def observation_tensor(self) -> torch.Tensor:
        """Every row's observation [N, D] float32 on the engine's device (the torch face), equal to
        `_observations` bit for bit."""
        s, state, k, h = self.state, self._device_state, self.k, self.hidden_size
        out = torch.zeros(self.num_rows, self.obs_dim, dtype=torch.float32, device=self.device)
        out[:, :h] = state["hidden"]
        out[:, h:h + k] = LOGPROB_FLOOR
        out[:, h:h + self._width] = state["logprobs"].clamp_min(LOGPROB_FLOOR).float()
        if self.params.obs_rewards and "wrapper" in self._rewards:
            scored = self._scored["wrapper"]
            rewards = np.where(scored[:, None], self._rewards["wrapper"], 0.0).astype(np.float32)
            out[:, h + k:h + 2 * k] = to_device(rewards, self.device)
        out[:, -1] = to_device(s.response_len / self.params.max_new_tokens, self.device).float()
        started = np.asarray([ids is not None for ids in s.prompt_ids])
        return out * to_device(started, self.device)[:, None]

    def action_mask_tensor(self) -> torch.Tensor:
        """`action_masks()` as a [N, k] bool tensor on the engine's device."""
        live = to_device(self.state.live, self.device)
        valid = torch.where(live, self._device_state["valid"], 1)
        masks = torch.arange(self.k, device=self.device)[None, :] < valid[:, None]
        masks[:, 0] = True
        return masks

    def _info_columns(self) -> dict[str, np.ndarray]:
        ids = np.empty(self.num_rows, dtype=object)
        for row, values in enumerate(self._mirror.ids.tolist()):
            ids[row] = values
        return {"candidate_ids": ids, "valid_slots": self._mirror.valid.copy()}


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
      `chat_template`, `system_prompt`, `reward_rules`, `reward_tokenizer`, `device`, `dtype`, `context`,
      `prefill_ahead`: as in `llm_envs/TokenAccept-v0`.

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
