"""TokenAccept-v0: the Proxy-RLHF accept/reject MDP over a frozen LM (Zhu, Sun et al., 2024).

`TokenAcceptCore` is the one implementation of the MDP, batched over N rows on one
`DecodeEngine`; `TokenAcceptEnv` is that core with one row, and the vector views in
`llm_envs.vector` are the core with N rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from llm_envs.engine import DecodeEngine, StepOutput
from llm_envs.envs.core import BatchedCore, RowState
from llm_envs.envs.params import TokenAcceptParams
from llm_envs.envs.pools import Pool, PoolWorkspace, nucleus_pools
from llm_envs.envs.single import SingleRowEnv

__all__ = [
    "ACCEPT",
    "FEATURE_NAMES",
    "NUM_FEATURES",
    "REJECT",
    "TokenAcceptCore",
    "TokenAcceptEnv",
    "TokenAcceptParams",
    "gate_allows_reject",
    "reject_allowed",
    "skam_allows_reject",
]

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


def gate_allows_reject(pool: Pool, params: TokenAcceptParams) -> bool:
    """The decision mask's position gate: whether the LM is unsure enough at this position for the
    proxy to be asked at all (`decision_mask`; the gate is open everywhere under plain SKAM).

    Both gates read the position's full-vocabulary distribution p = softmax(logits / temperature),
    before any rejection (so the gate is the same for every candidate of a position):
    - 'entropy': open iff H(p) = -sum_v p(v) ln p(v) >= entropy_threshold (nats);
    - 'confidence': open iff max_v p(v) < confidence_threshold.
    """
    if params.decision_mask == "entropy":
        if np.isnan(pool.entropy):
            raise RuntimeError("the entropy gate got a pool without its entropy; build pools with "
                               "nucleus_pools(..., with_entropy=True).")
        return pool.entropy >= params.entropy_threshold
    if params.decision_mask == "confidence":
        return pool.top_prob < params.confidence_threshold
    return True


def reject_allowed(pool: Pool, rejections: int, params: TokenAcceptParams) -> bool:
    """TokenAccept's reject mask: the position gate of `decision_mask` and SKAM (`skam_allows_reject`).

    SKAM always applies: its `|T'| > 1` keeps a candidate for the accept, and its mean-probability
    test bounds how deep a row can reject (the pool's head holds every rank it lets a row reach).
    With p_t = 0 the SKAM part is only `|T'| > 1` (and `max_rejections`), leaving the bare gate.
    """
    return gate_allows_reject(pool, params) and skam_allows_reject(pool, rejections, params.p_t,
                                                                   params.max_rejections)


@dataclass
class _Row(RowState):
    """A row's position state. `pool[rejections]` is always the current candidate."""

    pool: Pool | None = None
    rejections: int = 0  # at the current position
    hidden: torch.Tensor | None = None  # obs hidden state
    next_logits: torch.Tensor | None = None  # candidate mode: distribution after the candidate
    total_rejections: int = 0
    decisions: int = 0  # steps taken where reject was legal (the proxy had a choice)
    rejection_cost: float = 0.0
    deviation_nats: float = 0.0  # sum of log p(top1) - log p(accepted), before deviation_beta

    @property
    def candidate(self) -> int:
        return int(self.pool.ids[self.rejections])


class TokenAcceptCore(BatchedCore[TokenAcceptParams, _Row]):
    """The batched accept/reject MDP. See `TokenAcceptEnv` for the env card."""

    params_class = TokenAcceptParams
    vocab_bounded = ("top_k",)
    row_class = _Row
    action_help = "0 (accept) or 1 (reject)"
    forced_info_key, forced_stat_key = "forced_accept", "forced_accepts"

    def __init__(self, num_rows: int = 1, **kwargs: Any) -> None:
        super().__init__(num_rows, **kwargs)
        params = self.params
        self.max_steps = params.max_steps if params.max_steps is not None else 8 * params.max_new_tokens
        self._embeddings = self.ctx.model.get_input_embeddings()
        self.obs_dim = self.hidden_size * (2 if params.obs_mode == "prefix" else 1) + NUM_FEATURES
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (self.obs_dim,), np.float32)
        self.action_space = gym.spaces.Discrete(2)
        self._pool_workspace = PoolWorkspace()
        self._check_entropy_threshold()

    def _check_entropy_threshold(self) -> None:
        """No distribution over V tokens has more than ln V nats: a higher gate never opens (the
        proxy would never be asked), which is a mistake rather than a setting."""
        vocab = self.engine.vocab_size
        threshold = self.params.entropy_threshold
        if self.params.decision_mask == "entropy" and threshold > np.log(vocab):
            raise ValueError(f"entropy_threshold={threshold} exceeds ln({vocab}) = {np.log(vocab):.3f} nats, the "
                             "entropy of a uniform distribution over this LM's vocabulary, so reject would never "
                             f"be allowed; use entropy_threshold <= {np.log(vocab):.3f}.")

    # ------------------------------------------------------------------ actions
    def action_masks(self) -> np.ndarray:
        """[N, 2] bool: accept is always legal; reject is legal where the decision mask (the position
        gate of `decision_mask`, and SKAM) allows it."""
        masks = np.ones((self.num_rows, 2), dtype=bool)
        for row, state in enumerate(self.rows):
            masks[row, REJECT] = state.live and self._reject_allowed(state)
        return masks

    def _reject_allowed(self, state: _Row) -> bool:
        return reject_allowed(state.pool, state.rejections, self.params)

    def _allowed(self, state: _Row, action: int) -> bool:
        return action == ACCEPT or self._reject_allowed(state)

    def _masked_message(self, state: _Row, action: int) -> str:
        p = self.params
        gate = "" if p.decision_mask == "skam" else (
            f"; the {p.decision_mask} gate is {'open' if gate_allows_reject(state.pool, p) else 'closed'}: "
            + (f"entropy {state.pool.entropy:.3f} nats vs entropy_threshold={p.entropy_threshold}"
               if p.decision_mask == "entropy" else
               f"top-1 p {state.pool.top_prob:.3f} vs confidence_threshold={p.confidence_threshold}"))
        return (f"reject is masked here (SKAM: {len(state.pool) - state.rejections} candidates left, "
                f"p_t={p.p_t}{gate}); use action_masks(), or pass invalid_action='accept' to coerce "
                "masked rejects to accept.")

    def _act(self, state: _Row, action: int) -> tuple[float, int | None]:
        state.decisions += int(self._reject_allowed(state))  # the state the action was taken in
        if action == REJECT:
            cost = self.params.rejection_cost
            state.rejections += 1
            state.total_rejections += 1
            state.rejection_cost += cost
            return 0.0 - cost, None
        nats = state.pool.top_logprob - float(np.log(state.pool.probs[state.rejections]))
        cost = self.params.deviation_beta * nats
        state.deviation_nats += nats
        state.deviation_cost += cost
        return 0.0 - cost, state.candidate

    # ------------------------------------------------------------------ positions
    def _set_positions(self, rows: list[int], out: StepOutput) -> None:
        for i, (row, pool) in enumerate(zip(rows, self._pools(out.logits))):
            self.rows[row].pool, self.rows[row].hidden = pool, out.hidden[i]

    def _advance(self, continuing: list[int], started: list[int], actions: np.ndarray) -> None:
        """Propose the next candidate on each continuing row, with at most one batched forward.

        `started` rows have their first pool already (from their prefill); in candidate mode
        their first candidate rides along in the same forward.
        """
        accepted = [row for row in continuing if actions[row] == ACCEPT]
        if self.params.obs_mode == "candidate":
            # The proposed candidate sits in the cache: a reject hides it; an accept keeps it,
            # and its forward already gave the next position's distribution.
            self.engine.drop_last([row for row in continuing if actions[row] == REJECT])
            if accepted:
                pools = self._pools(torch.stack([self.rows[r].next_logits for r in accepted]))
                for row, pool in zip(accepted, pools):
                    self.rows[row].pool, self.rows[row].rejections = pool, 0
            self._forward_candidates(sorted(continuing + started))
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
        # with_entropy: the entropy gate's H(p), from the same batched softmax (no per-row work).
        p = self.params
        return nucleus_pools(logits, top_p=p.top_p, top_k=p.top_k, temperature=p.temperature,
                             head_min_prob=p.p_t, with_entropy=p.decision_mask == "entropy",
                             workspace=self._pool_workspace).rows()

    # ------------------------------------------------------------------ rewards, infos
    def _reward_parts(self, state: _Row, score: float) -> dict[str, float]:
        return {"reward_model": score, "rejection_cost": -state.rejection_cost,
                "deviation_cost": -state.deviation_cost}

    def _episode_stats(self, state: _Row) -> dict[str, Any]:
        return {"rejections": state.total_rejections, "forced_accepts": state.forced,
                "deviation_nats": state.deviation_nats, "decisions": state.decisions}

    def _candidate_info(self, state: _Row) -> dict[str, Any]:
        return {"candidate_id": state.candidate, "candidate_prob": float(state.pool.probs[state.rejections]),
                "rejections_here": state.rejections}

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
        if self.params.obs_mode == "prefix":
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
            len(state.response) / self.params.max_new_tokens,
            float(state.live and self._reject_allowed(state)),
        )


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
    the position gate of `decision_mask` is open and SKAM allows it:
    - SKAM (every mask): `|T'| > 1` and `sum_{t in T'} p(t) > p_t * |T'|`, where `T'` is the pool
      minus the tokens rejected here (and, with `max_rejections`, fewer than that many rejections
      here). `|T'| > 1` means a reject never leaves the position without a candidate; the mean test
      bounds how deep a row rejects. With `p_t=0` only `|T'| > 1` (and the cap) remains.
    - the gate, a property of the position (the same for every candidate of it), read from the
      position's full-vocabulary `p = softmax(logits / temperature)` before any rejection:
      `decision_mask="skam"` (default): always open (the paper's MDP);
      `"entropy"`: open iff `H(p) = -sum_v p(v) ln p(v) >= entropy_threshold` (nats; at most
      `ln V` for a vocabulary of V tokens) -- the proxy is asked only where the LM is uncertain;
      `"confidence"`: open iff `max_v p(v) < confidence_threshold` -- the LM defers to the proxy
      only where its top-1 token is below that probability.
    A masked reject is coerced to accept (`info["forced_accept"] = True`), or raises with
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
    `decisions` = steps taken where reject was legal, i.e. where the agent had a choice (so
    `decisions / steps` is the share of proposals the decision mask handed to the agent),
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
    - `chat_template=False`: True renders each prompt as a user message through the LM's chat
      template (`system_prompt=None`: an optional system turn); episodes then end at the template's
      end-of-turn token and the reward backend reads the conversation in its own format (README,
      "Chat templates"). A tokenizer without a template is an error.
    - `reward_rules`: how the reward model reads a response (`llm_envs.reward_rules.RewardRules` or a
      mapping of its fields: turn markers and their case, the whitespace at a cut, a prefix to strip,
      an appended EOS); `reward_tokenizer`: the reward model's tokenizer when its checkpoint has none.
    - `device="auto"` (cuda when present), `dtype="auto"` (bfloat16 on CUDA, float32 on CPU; or "float32", "bfloat16",
      "float16" on GPU: logits, probabilities and rewards are float32 whatever the model runs in);
      `context`: an `LMContext` to share between envs instead of all of the above.

    MDP parameters (`TokenAcceptParams`): pass them as keywords, or `params=TokenAcceptParams(...)`
    (keywords given beside it replace its fields); `env.unwrapped.params` holds them. An unknown
    keyword raises with a "did you mean". A gate's threshold is required with its `decision_mask`
    and refused with any other (it would do nothing); `entropy_threshold` above `ln V` raises:
    {params}

    ## Version History
    - v0: initial version.
    - v0, decision masks: `decision_mask` ("entropy", "confidence") with `entropy_threshold` /
      `confidence_threshold`, and `episode_stats["decisions"]`. The default `decision_mask="skam"`
      is the initial MDP unchanged, so the id stays v0.
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
