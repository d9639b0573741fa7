"""TokenAccept-v0: the Proxy-RLHF accept/reject MDP over a frozen LM (Zhu, Sun et al., 2024).

`TokenAcceptCore` is the one implementation of the MDP, batched over N rows on one
`DecodeEngine`; `TokenAcceptEnv` is that core with one row, and the vector views in
`llm_envs.vector` are the core with N rows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from llm_envs.engine import DecodeEngine, StepOutput
from llm_envs.envs.core import BatchedCore, raise_non_finite
from llm_envs.envs.params import TokenAcceptParams
from llm_envs.envs.pools import NucleusPools, Pool, PoolWorkspace, nucleus_pools
from llm_envs.envs.rows import RowArrays, pack_rows, to_device
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


def _row_selector(rows: np.ndarray, num_rows: int, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """`take(t)` = the rows `rows` (sorted, unique) of a [N, ...] tensor: the tensor itself when every
    row is asked for (the common step: an index gather costs tens of microseconds on the CPU)."""
    if len(rows) == num_rows:
        return lambda tensor: tensor
    index = to_device(rows, device)
    return lambda tensor: tensor[index]


class _DevicePools:
    """Every row's candidate pool on the engine's device, padded to one head width `W`.

    `ids[r, :w]` is row r's head (w = min(|T|, W); -1 after), `probs` their p, `suffix[r, j]` the
    pool's mass without its first j tokens, `size` |T|, `entropy` H(p) (with the entropy gate).
    Rows are written in batches (`write`), never one by one.
    """

    def __init__(self, num_rows: int, device: torch.device) -> None:
        self.ids = torch.full((num_rows, 1), -1, dtype=torch.long, device=device)
        self.probs = torch.zeros(num_rows, 1, dtype=torch.float64, device=device)
        self.suffix = torch.zeros(num_rows, 2, dtype=torch.float64, device=device)
        self.size = torch.ones(num_rows, dtype=torch.long, device=device)
        self.entropy = torch.full((num_rows,), float("nan"), dtype=torch.float64, device=device)

    @property
    def width(self) -> int:
        return int(self.ids.shape[1])

    def write(self, rows: torch.Tensor, pools: NucleusPools) -> None:
        """Rows `rows` (a device index tensor) take `pools` (one per row, in order)."""
        width = pools.ids.shape[1]
        if width > self.width:  # a wider head than any before: pad every row (rare; heads grow, never shrink)
            grow = width - self.width
            self.ids = torch.nn.functional.pad(self.ids, (0, grow), value=-1)
            self.probs = torch.nn.functional.pad(self.probs, (0, grow))
            self.suffix = torch.nn.functional.pad(self.suffix, (0, grow))
        pad = self.width - width
        if pad:
            self.ids[rows] = -1
            self.probs[rows] = 0.0
            self.suffix[rows] = 0.0
        self.ids[rows, :width] = pools.ids
        self.probs[rows, :width] = pools.probs
        self.suffix[rows, : width + 1] = pools.suffix_mass
        self.size[rows] = pools.size
        if pools.entropy is not None:
            self.entropy[rows] = pools.entropy


class TokenAcceptCore(BatchedCore[TokenAcceptParams]):
    """The batched accept/reject MDP. See `TokenAcceptEnv` for the env card.

    Device state: the pools (`_DevicePools`), each row's observed hidden state and, in candidate
    mode, the next-token logits after its candidate (the next position's distribution once it is
    accepted). Host state: `state`'s arrays (rejections here, costs, counts) and the mirror of what
    the last step copied back (`_mirror`: candidate id and p, the SKAM inputs, the reject mask, the
    observed hidden state), from which the host builds observations and infos and checks actions.
    """

    params_class = TokenAcceptParams
    vocab_bounded = ("top_k",)
    action_help = "0 (accept) or 1 (reject)"
    forced_info_key, forced_stat_key = "forced_accept", "forced_accepts"

    def __init__(self, num_rows: int = 1, **kwargs: Any) -> None:
        super().__init__(num_rows, **kwargs)
        params = self.params
        self.max_steps = params.max_steps if params.max_steps is not None else 8 * params.max_new_tokens
        self._embeddings = self.ctx.model.get_input_embeddings()
        self._obs_hidden = self.hidden_size * (2 if params.obs_mode == "prefix" else 1)
        self.obs_dim = self._obs_hidden + NUM_FEATURES
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (self.obs_dim,), np.float32)
        self.action_space = gym.spaces.Discrete(2)
        self._pool_workspace = PoolWorkspace()
        self._started: list[tuple[list[int], StepOutput]] = []  # prefills `_advance` has not taken in yet
        self._check_entropy_threshold()
        n, device = self.num_rows, self.device
        self._pools = _DevicePools(n, device)
        self._hidden = torch.zeros(n, self.hidden_size, dtype=torch.float32, device=device)
        self._finite = torch.ones(n, dtype=torch.bool, device=device)
        self._next_logits = (torch.zeros(n, self.engine.vocab_size, dtype=torch.float32, device=device)
                             if params.obs_mode == "candidate" else None)
        # What the torch face reads (observation_tensor, action_mask_tensor): the device side of the mirror.
        self._device_view = {"obs_hidden": torch.zeros(n, self._obs_hidden, dtype=torch.float32, device=device),
                             "candidate_prob": torch.zeros(n, dtype=torch.float64, device=device),
                             "mean_left": torch.zeros(n, dtype=torch.float64, device=device),
                             "reject_ok": torch.zeros(n, dtype=torch.bool, device=device)}
        self._mirror = RowArrays(n, {
            "candidate": (np.int64, ()), "candidate_prob": (np.float64, ()), "top_prob": (np.float64, ()),
            "mean_left": (np.float64, ()), "size": (np.int64, ()), "entropy": (np.float64, ()),
            "reject_ok": (np.bool_, ()), "hidden": (np.float32, (self._obs_hidden,)),
        })

    def _row_fields(self) -> dict[str, tuple[Any, tuple[int, ...]]]:
        return {"rejections": (np.int64, ()),  # at the current position
                "total_rejections": (np.int64, ()),
                "decisions": (np.int64, ()),  # steps taken where reject was legal (the proxy had a choice)
                "rejection_cost": (np.float64, ()),
                "deviation_nats": (np.float64, ())}  # sum of log p(top1) - log p(accepted), before deviation_beta

    def _row_extras(self, row: int) -> dict[str, Any]:
        return {"candidate": int(self._mirror.candidate[row])}

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
        return self._masks().copy()

    def _masks(self) -> np.ndarray:
        masks = np.ones((self.num_rows, 2), dtype=bool)
        masks[:, REJECT] = self._mirror.reject_ok & self.state.live
        return masks

    def _masked_message(self, row: int, action: int) -> str:
        p, m = self.params, self._mirror
        gate = "" if p.decision_mask == "skam" else (
            f"; the {p.decision_mask} gate is {'open' if self._gate_open(row) else 'closed'}: "
            + (f"entropy {m.entropy[row]:.3f} nats vs entropy_threshold={p.entropy_threshold}"
               if p.decision_mask == "entropy" else
               f"top-1 p {m.top_prob[row]:.3f} vs confidence_threshold={p.confidence_threshold}"))
        return (f"reject is masked here (SKAM: {m.size[row] - self.state.rejections[row]} candidates left, "
                f"p_t={p.p_t}{gate}); use action_masks(), or pass invalid_action='accept' to coerce "
                "masked rejects to accept.")

    def _gate_open(self, row: int) -> bool:
        p, m = self.params, self._mirror
        if p.decision_mask == "entropy":
            return bool(m.entropy[row] >= p.entropy_threshold)
        return bool(m.top_prob[row] < p.confidence_threshold)

    def _act(self, chosen: np.ndarray, stepped: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        s, m, p = self.state, self._mirror, self.params
        rewards = np.zeros(self.num_rows)
        tokens = np.full(self.num_rows, -1, dtype=np.int64)
        s.decisions[stepped] += m.reject_ok[stepped]  # the state the action was taken in
        rejects = stepped[chosen[stepped] == REJECT]
        s.rejections[rejects] += 1
        s.total_rejections[rejects] += 1
        s.rejection_cost[rejects] += p.rejection_cost
        rewards[rejects] = 0.0 - p.rejection_cost
        accepts = stepped[chosen[stepped] == ACCEPT]
        nats = np.log(m.top_prob[accepts]) - np.log(m.candidate_prob[accepts])
        cost = p.deviation_beta * nats
        s.deviation_nats[accepts] += nats
        s.deviation_cost[accepts] += cost
        rewards[accepts] = 0.0 - cost
        tokens[accepts] = m.candidate[accepts]
        return rewards, tokens

    # ------------------------------------------------------------------ positions
    def _discard_step(self) -> None:
        self._started.clear()

    def _set_positions(self, rows: list[int], out: StepOutput) -> None:
        # Their pools are built by `_advance`, in one batched call with the accepted rows' (each call is
        # a few dozen small device ops whatever the batch).
        self._started.append((rows, out))

    def _advance(self, continuing: np.ndarray, started: list[int], actions: np.ndarray) -> None:
        """Propose the next candidate on each continuing row, with at most one batched forward, and
        copy what the host needs of every row that moved (`_refresh`, one copy).

        `started` rows come with their prefill's outputs (`_set_positions`); their pools are built
        with the accepted rows' in one call, and in candidate mode their first candidate rides along
        in the same forward.
        """
        s = self.state
        prefilled, self._started = self._started, []
        accepted = continuing[actions[continuing] == ACCEPT]
        s.rejections[accepted] = 0
        self._finite.fill_(True)  # the forward's verdict per row, checked in `_refresh`'s copy
        new_rows = [np.asarray(rows, dtype=np.int64) for rows, _ in prefilled]  # rows at a new position
        new_logits = [out.logits for _, out in prefilled]
        for rows, out in prefilled:
            self._hidden[to_device(np.asarray(rows, dtype=np.int64), self.device)] = out.hidden
        if self.params.obs_mode == "candidate":
            # The proposed candidate sits in the cache: a reject hides it; an accept keeps it,
            # and its forward already gave the next position's distribution.
            self.engine.drop_last(continuing[actions[continuing] == REJECT].tolist())
            if accepted.size:
                new_rows.append(accepted)
                new_logits.append(self._next_logits[to_device(accepted, self.device)])
            self._write_pools(new_rows, new_logits)
            self._forward_candidates(np.union1d(continuing, np.asarray(started, dtype=np.int64)))
        else:
            if accepted.size:
                # Prefix mode: only an accept changes the prefix; a reject needs no forward.
                tokens = np.zeros(self.num_rows, dtype=np.int64)
                tokens[accepted] = s.response[accepted, s.response_len[accepted] - 1]
                mask = np.zeros(self.num_rows, dtype=bool)
                mask[accepted] = True
                out = self.engine.append(tokens, mask, check_finite=False)
                index = to_device(accepted, self.device)
                self._hidden[index] = out.hidden[index]
                self._finite[index] = out.finite[index]
                new_rows.append(accepted)
                new_logits.append(out.logits[index])
            self._write_pools(new_rows, new_logits)
        self._refresh(np.union1d(continuing, np.asarray(started, dtype=np.int64)))

    def _write_pools(self, rows: list[np.ndarray], logits: list[torch.Tensor]) -> None:
        """The pools of every row at a new position (`rows[i]`'s next-token `logits[i]`), one batched call."""
        if not rows:
            return
        index = to_device(np.concatenate(rows), self.device)
        self._pools.write(index, self._pool_batch(logits[0] if len(logits) == 1 else torch.cat(logits)))

    def _candidates(self) -> torch.Tensor:
        """[N] the token each row proposes now: its pool's rank `rejections` (on the device)."""
        rank = to_device(self.state.rejections, self.device)
        return self._pools.ids.gather(1, rank[:, None]).squeeze(1)

    def _forward_candidates(self, rows: np.ndarray) -> None:
        """Candidate mode: forward each row's candidate in context (one batched forward)."""
        if not rows.size:
            return
        active = np.zeros(self.num_rows, dtype=bool)
        active[rows] = True
        tokens = self._candidates().clamp_min(0)  # rows not active may hold -1 (never fed to the model)
        out = self.engine.append(tokens, active, check_finite=False)  # device ids: no host read
        if len(rows) == self.num_rows:  # every row forwarded: keep the outputs, no [N, V] copy
            self._hidden, self._next_logits, self._finite = out.hidden, out.logits, out.finite
            return
        index = to_device(rows, self.device)
        self._hidden[index] = out.hidden[index]
        self._next_logits[index] = out.logits[index]
        self._finite[index] = out.finite[index]

    def _pool_batch(self, logits: torch.Tensor) -> NucleusPools:
        # head_min_prob=p_t: the head then holds every candidate SKAM can let a row reach.
        # with_entropy: the entropy gate's H(p), from the same batched softmax (no per-row work).
        p = self.params
        return nucleus_pools(logits, top_p=p.top_p, top_k=p.top_k, temperature=p.temperature,
                             head_min_prob=p.p_t, with_entropy=p.decision_mask == "entropy",
                             workspace=self._pool_workspace)

    def _refresh(self, rows: np.ndarray) -> None:
        """The mask inputs and observation of `rows` computed on the device for all of them at once,
        then copied to the host mirror in one transfer (`pack_rows`)."""
        if not rows.size:
            return
        p, pools = self.params, self._pools
        take = _row_selector(rows, self.num_rows, self.device)
        rank = to_device(self.state.rejections[rows], self.device)[:, None]
        ids, probs, size = take(pools.ids), take(pools.probs), take(pools.size)
        candidate = ids.gather(1, rank).squeeze(1)
        left = take(pools.suffix).gather(1, rank).squeeze(1)  # mass of T', the pool minus the rejected
        remaining = size - rank.squeeze(1)
        # SKAM: |T'| > 1 and the mean p left above p_t (and, with a cap, fewer rejections here).
        allowed = (remaining > 1) & (left > p.p_t * remaining)
        if p.max_rejections is not None:
            allowed &= rank.squeeze(1) < p.max_rejections
        entropy, top_prob = take(pools.entropy), probs[:, 0]
        if p.decision_mask == "entropy":
            allowed &= entropy >= p.entropy_threshold
        elif p.decision_mask == "confidence":
            allowed &= top_prob < p.confidence_threshold
        # `nucleus_pools(head_min_prob=p_t)` keeps every reachable candidate in the head.
        past_head = allowed & (rank.squeeze(1) + 1 >= (ids >= 0).sum(1))
        hidden = take(self._hidden)
        if p.obs_mode == "prefix":
            with torch.inference_mode():
                hidden = torch.cat([hidden, self._embeddings(candidate.clamp_min(0)).float()], 1)
        view = {"obs_hidden": hidden, "candidate_prob": probs.gather(1, rank).squeeze(1),
                "mean_left": left / remaining.clamp_min(1), "reject_ok": allowed}
        for name, values in view.items():
            if len(rows) == self.num_rows:
                self._device_view[name] = values  # every row moved: the new tensors are the view
            else:
                self._device_view[name][to_device(rows, self.device)] = values
        # Few tensors into the copy (each costs a few operations to pack): grouped by dtype.
        host = pack_rows({"real": torch.stack([view["candidate_prob"], top_prob, view["mean_left"], entropy], 1),
                          "int": torch.stack([candidate, size], 1),
                          "flag": torch.stack([allowed, past_head, take(self._finite)], 1), "hidden": hidden})
        reject_ok, past, finite = host["flag"].T
        if not finite.all():
            raise_non_finite(rows[~finite], self.ctx.model)
        if past.any():
            raise RuntimeError(
                f"SKAM allows a reject at rank {int(self.state.rejections[rows][past][0])}, past the pool's head; "
                "build pools with nucleus_pools(..., head_min_prob=p_t) so the head covers every reachable rank.")
        m = self._mirror
        m.candidate_prob[rows], m.top_prob[rows], m.mean_left[rows], m.entropy[rows] = host["real"].T
        m.candidate[rows], m.size[rows] = host["int"].T
        m.reject_ok[rows], m.hidden[rows] = reject_ok, host["hidden"]

    # ------------------------------------------------------------------ rewards, infos
    def _reward_parts(self, row: int, score: float) -> dict[str, float]:
        s = self.state
        return {"reward_model": score, "rejection_cost": -float(s.rejection_cost[row]),
                "deviation_cost": -float(s.deviation_cost[row])}

    def _episode_stats(self, row: int) -> dict[str, Any]:
        s = self.state
        return {"rejections": int(s.total_rejections[row]), "forced_accepts": int(s.forced[row]),
                "deviation_nats": float(s.deviation_nats[row]), "decisions": int(s.decisions[row])}

    def _info_columns(self) -> dict[str, np.ndarray]:
        m = self._mirror
        return {"candidate_id": m.candidate.copy(), "candidate_prob": m.candidate_prob.copy(),
                "rejections_here": self.state.rejections.copy()}

    # ------------------------------------------------------------------ observation
    def observation_tensor(self) -> torch.Tensor:
        """Every row's observation [N, D] float32 on the engine's device: what `_observations` gives,
        built from the device tensors (the torch face), equal to it bit for bit."""
        s, view = self.state, self._device_view
        live = to_device(s.live, self.device)
        features = torch.stack([view["candidate_prob"], view["mean_left"],
                                to_device(s.rejections, self.device).double(),
                                to_device(s.response_len / self.params.max_new_tokens, self.device),
                                (view["reject_ok"] & live).double()], 1).float()
        return torch.cat([view["obs_hidden"], features], 1)

    def action_mask_tensor(self) -> torch.Tensor:
        """`action_masks()` as a [N, 2] bool tensor on the engine's device."""
        masks = torch.ones(self.num_rows, 2, dtype=torch.bool, device=self.device)
        masks[:, REJECT] = self._device_view["reject_ok"] & to_device(self.state.live, self.device)
        return masks

    def _observations(self, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        """Observations of `rows` [len(rows), D] float32, a fresh array, from the host mirror."""
        rows = np.asarray(rows, dtype=np.int64)
        s, m = self.state, self._mirror
        out = np.empty((len(rows), self.obs_dim), dtype=np.float32)
        out[:, : self._obs_hidden] = m.hidden[rows]
        features = out[:, self._obs_hidden:]
        features[:, 0] = m.candidate_prob[rows]
        features[:, 1] = m.mean_left[rows]
        features[:, 2] = s.rejections[rows]
        features[:, 3] = s.response_len[rows] / self.params.max_new_tokens
        features[:, 4] = m.reject_ok[rows] & s.live[rows]
        return out


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
    - `prefill_ahead=False`: True (vector envs) has an autoreset that runs a prefill also prefill the
      next prompts of the rows that will start over later (drawn from copies of their samplers) in
      the same batched forward, so most later autoresets cost a copy instead of a forward of their own
      (1.06 instead of 1.71 LM forwards per step on the world LM at N=64; rows that all end together
      gain nothing). `reset()` always prefills afresh. Episodes are the same up to float rounding (a
      prompt prefilled in another batch), which a PPO run amplifies into a different run: off by
      default so that results match earlier versions bit for bit. It holds up to one prefilled prompt
      per row beside the KV cache.

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
