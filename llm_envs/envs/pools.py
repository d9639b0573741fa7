"""Candidate pools: the top-p nucleus of `softmax(logits / temperature)`, sorted by probability.

Shared by the envs so that TokenAccept and TokenChoice see the same candidates.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Pool:
    """One position's candidate pool, in descending probability.

    `probs` are full-vocabulary probabilities (not renormalised over the pool), as the SKAM
    mask and the deviation cost use them. `suffix_mass[r]` = sum of `probs[r:]`, so the mass
    of the pool left after `r` rejections is one lookup.
    """

    ids: torch.Tensor  # [K] long
    probs: torch.Tensor  # [K] float64
    suffix_mass: torch.Tensor  # [K + 1] float64, suffix_mass[K] = 0
    top_logprob: float  # log p of the most probable token (for the deviation cost)

    def __len__(self) -> int:
        return int(self.ids.shape[0])


def validate_sampling(top_p: float, top_k: int | None, temperature: float) -> None:
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p!r}; expected 0 < top_p <= 1 (1.0 keeps every token).")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k={top_k!r}; expected a positive int, or None for no cap.")
    if not temperature > 0.0:
        raise ValueError(f"temperature={temperature!r}; expected a positive float (1.0 = the LM's own).")


def nucleus_pools(
    logits: torch.Tensor, *, top_p: float, top_k: int | None, temperature: float
) -> list[Pool]:
    """Pools for a batch of next-token logits [B, V].

    The nucleus is the smallest prefix of the sorted distribution whose mass reaches `top_p`
    (at least one token), then capped at `top_k` tokens.
    """
    # float64 so that sums over large vocabularies do not wobble the nucleus edge.
    probs = torch.softmax(logits.to(torch.float64) / temperature, dim=-1)
    limit = logits.shape[-1] if top_k is None else min(top_k, logits.shape[-1])
    if top_p >= 1.0:
        sorted_p, sorted_ids = torch.topk(probs, limit, dim=-1)
        sizes = [limit] * logits.shape[0]
    else:
        sorted_p, sorted_ids = torch.sort(probs, dim=-1, descending=True)
        mass_before = sorted_p.cumsum(-1) - sorted_p
        sizes = ((mass_before < top_p).sum(-1).clamp(1, limit)).tolist()
    top_logprob = torch.log(sorted_p[:, 0]).tolist()
    pools = []
    for row, size in enumerate(sizes):
        p = sorted_p[row, :size].cpu()
        suffix = torch.cat([p.flip(0).cumsum(0).flip(0), p.new_zeros(1)])
        pools.append(Pool(sorted_ids[row, :size].cpu(), p, suffix, top_logprob[row]))
    return pools
