"""The RRHF loss (Yuan et al. 2023, "RRHF: Rank Responses to align Human Feedback"), as a pure function.

For one query x with responses y_1..y_k and rewards r_1..r_k:

    p_i    = (sum_t log P(y_i,t | x, y_i,<t)) / |y_i|       eq. 1, |y_i| = y_i's OWN token count
    L_rank = sum_{r_i < r_j} max(0, p_i - p_j)               eq. 2, ties (r_i == r_j) add nothing
    L_sft  = -(sum_t log P(y_i',t | x, y_i',<t)) / |y_i'|    eq. 4, i' = argmax_i r_i (first on ties)
    L      = rank_weight * L_rank + sft_weight * L_sft       eq. 5 with rank_weight = sft_weight = 1

Normalisation (stated, because the paper and the reference code differ):

- `p_i` divides by each response's own length (the paper's eq. 1). The reference code divided
  every response by the padded length of the batch (GanjinZero/RRHF issue #37); not done here.
- `L_sft` is the mean per-token negative log-likelihood of the best response (divided by its own
  length, `sft_normalization="mean"`, the default), so it is on the scale of `p_i` and of the
  usual SFT loss. `sft_normalization="sum"` gives the paper's eq. 4 literally (a sum over tokens).
- A batch holds several queries: `rank_loss` and `sft_loss` are the per-query values averaged
  over the queries of the batch (so the scale does not depend on the batch size; with gradient
  accumulation the micro-batches' gradients are averaged the same way). `query_weights` replaces
  that mean by a weighted sum: the trainer uses it when a micro-batch is split over several
  processes, so that DDP's mean of the processes' gradients is the gradient of the mean over the
  whole micro-batch's queries (`agents.rrhf.training`).
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F

SFTNormalization = Literal["mean", "sum"]
IGNORE_INDEX = -100


class RRHFLossOutput(NamedTuple):
    """What `rrhf_loss` returns (all tensors; `scores` keeps its graph)."""

    loss: torch.Tensor  # scalar: rank_weight * rank_loss + sft_weight * sft_loss
    rank_loss: torch.Tensor  # scalar: mean (or query_weights sum) over queries of sum_{r_i < r_j} max(0, p_i - p_j)
    sft_loss: torch.Tensor  # scalar: mean (or query_weights sum) over queries of the best response's NLL
    scores: torch.Tensor  # [N]: p_i, the length-normalised log-probability of each row


def response_logprobs(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row sum of response-token log-probs and the response lengths.

    `logits` [N, T, V] come from a causal LM run on `input_ids` [N, T]; `labels` [N, T] are
    those ids with `ignore_index` on every position that is not a response token (prompt,
    padding). As in HF, position t's logits predict `labels[:, t + 1]`.
    Returns (sum_logprob [N] float32, length [N] float32).
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"logits must be [N, T, V] and labels [N, T] with the same N, T; got logits "
            f"{tuple(logits.shape)} and labels {tuple(labels.shape)}."
        )
    shifted_logits = logits[:, :-1].float()
    targets = labels[:, 1:]
    token_logp = -F.cross_entropy(
        shifted_logits.reshape(-1, shifted_logits.shape[-1]),
        targets.reshape(-1),
        ignore_index=ignore_index,
        reduction="none",
    ).view(targets.shape)  # 0 where ignored
    lengths = (targets != ignore_index).sum(dim=1).float()
    return token_logp.sum(dim=1), lengths


def rrhf_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    rewards: torch.Tensor,
    groups: torch.Tensor | None = None,
    *,
    rank_weight: float = 1.0,
    sft_weight: float = 1.0,
    sft_normalization: SFTNormalization = "mean",
    query_weights: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> RRHFLossOutput:
    """The RRHF loss of a batch of (query, response) rows; see the module docstring for the maths.

    Args:
        logits: [N, T, V] causal-LM logits, one row per (query, response) pair.
        labels: [N, T] the input ids with `ignore_index` on prompt and padding positions, so
            only the response tokens (EOS included when present) count.
        rewards: [N] the reward-model score r_i of each row.
        groups: [N] integer id of the query each row answers; rows compare only within their
            query. None: all rows answer the same query.
        rank_weight: weight of `rank_loss` in `loss` (the paper and scripts use 1).
        sft_weight: weight of `sft_loss` in `loss` (1 in the paper).
        sft_normalization: "mean" (default) divides the best response's NLL by its own length;
            "sum" keeps the sum over tokens (eq. 4 literally).
        query_weights: [number of queries] weight of each query's terms, queries in increasing
            group id order: `rank_loss` and `sft_loss` are then sum_q w_q * term_q. None: 1 / the
            number of queries each (the mean over the batch's queries).

    Returns:
        `RRHFLossOutput(loss, rank_loss, sft_loss, scores)`.
    """
    if sft_normalization not in ("mean", "sum"):
        raise ValueError(f"sft_normalization={sft_normalization!r}; expected 'mean' or 'sum'.")
    n = logits.shape[0]
    rewards = torch.as_tensor(rewards, device=logits.device).float().reshape(-1)
    if rewards.shape[0] != n:
        raise ValueError(f"rewards has {rewards.shape[0]} entries for {n} rows; pass one reward per row.")
    if not torch.isfinite(rewards).all():
        raise ValueError(f"rewards must be finite; got {rewards.tolist()}.")
    if groups is None:
        groups = torch.zeros(n, dtype=torch.long, device=logits.device)
    groups = torch.as_tensor(groups, device=logits.device).reshape(-1)
    if groups.shape[0] != n:
        raise ValueError(f"groups has {groups.shape[0]} entries for {n} rows; pass one query id per row.")

    sum_logp, lengths = response_logprobs(logits, labels, ignore_index)
    if (lengths == 0).any():
        empty = torch.nonzero(lengths == 0).flatten().tolist()
        raise ValueError(
            f"rows {empty} have no response tokens (every label is {ignore_index}); each response "
            "needs at least one token (append EOS to empty responses)."
        )
    scores = sum_logp / lengths  # p_i, eq. 1 with each response's own length

    same_query = groups[:, None] == groups[None, :]
    worse = rewards[:, None] < rewards[None, :]  # [i, j]: r_i < r_j (strict: ties add nothing)
    pair_loss = torch.relu(scores[:, None] - scores[None, :])  # max(0, p_i - p_j)
    pair_loss = torch.where(same_query & worse, pair_loss, torch.zeros_like(pair_loss))

    query_ids, row_query = torch.unique(groups, return_inverse=True)
    num_queries = query_ids.shape[0]
    rank_per_query = torch.zeros(num_queries, device=logits.device).index_add(
        0, row_query, pair_loss.sum(dim=1)
    )

    sft_per_query = []
    for q in range(num_queries):
        rows = torch.nonzero(row_query == q).flatten()
        best = rows[torch.argmax(rewards[rows])]  # first row with the highest reward
        nll = -sum_logp[best]
        sft_per_query.append(nll / lengths[best] if sft_normalization == "mean" else nll)
    if query_weights is None:
        weights = torch.full((num_queries,), 1.0 / num_queries, device=logits.device)
    else:
        weights = torch.as_tensor(query_weights, device=logits.device).float().reshape(-1)
        if weights.shape[0] != num_queries:
            raise ValueError(f"query_weights has {weights.shape[0]} entries for {num_queries} queries (distinct "
                             "group ids); pass one weight per query, in increasing group id order.")
    sft_loss = (weights * torch.stack(sft_per_query)).sum()
    rank_loss = (weights * rank_per_query).sum()
    loss = rank_weight * rank_loss + sft_weight * sft_loss
    return RRHFLossOutput(loss=loss, rank_loss=rank_loss, sft_loss=sft_loss, scores=scores)
