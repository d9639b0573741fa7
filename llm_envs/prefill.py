"""Prefills of the decode engine's prompts: batched by length, and banked ahead of their resets.

`DecodeEngine.reset_rows` prefills new prompts left-padded in a fresh `DynamicCache` (a `Prefill`),
split in at most two batches by length when the padding saved outweighs a forward's fixed cost
(`length_groups`, `prefill_overhead_tokens`), then copies each prompt's K/V into its row. With
``ahead=`` the same forward also prefills other rows' next prompts into a `PrefillBank`, which their
later resets copy in without a forward of their own.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache, PreTrainedModel

from llm_envs.length_cache import LengthKVCache

__all__ = ["AheadPrompts", "Prefill", "PrefillBank", "length_groups", "prefill_overhead_tokens"]


# A forward's fixed cost (Python, dispatch, kernel launches) in seconds, and the matmul throughput
# (FLOP/s) a token position of a forward gets, per device type; rough, but of the right order: on a
# CPU ~1 ms and ~20 GFLOP/s, on a datacenter GPU a few ms of launches and ~200 TFLOP/s. Other
# accelerators are taken to behave like a GPU.
_FORWARD_COST = {"cpu": (1e-3, 20e9), "cuda": (4e-3, 200e12)}


def prefill_overhead_tokens(device: torch.device, num_params: int) -> float:
    """A forward's fixed cost in token positions of a model of ``num_params`` on ``device`` (~2 FLOPs
    per parameter per token): whether splitting a prefill in two batches pays off (`length_groups`).
    On a GPU it is thousands of positions for a small model (padding is nearly free), tens for 8B."""
    fixed_s, flops = _FORWARD_COST.get(torch.device(device).type, _FORWARD_COST["cuda"])
    return fixed_s * flops / (2.0 * max(num_params, 1))


def length_groups(lengths: list[int], overhead_tokens: float) -> list[list[int]]:
    """Split prompts (indices into `lengths`) into at most two left-padded prefill batches.

    Padding is computed like real tokens, so a batch of mixed lengths wastes work; a second
    forward pays off when the padding it saves outweighs a forward's fixed cost, expressed as
    `overhead_tokens` (`prefill_overhead_tokens`).
    """
    by_length = sorted(range(len(lengths)), key=lambda i: lengths[i])
    ordered = [lengths[i] for i in by_length]
    padded = len(ordered) * ordered[-1]
    best, cut = padded, 0
    for k in range(1, len(ordered)):  # first k (shortest) prompts in their own batch
        cost = k * ordered[k - 1] + (len(ordered) - k) * ordered[-1] + overhead_tokens
        if cost < best:
            best, cut = cost, k
    return [by_length[:cut], by_length[cut:]] if cut else [list(range(len(lengths)))]


@dataclass(frozen=True)
class Prefill:
    """A prefill forward not yet copied into the engine's cache (see `DecodeEngine.reset_rows`):
    ``prompts[i]`` sits left-padded in row i of ``cache``, its last-token outputs in row i of the rest."""

    prompts: list[list[int]]
    cache: DynamicCache
    logits: torch.Tensor
    hidden: torch.Tensor
    finite: torch.Tensor


AheadPrompts = Callable[[list[int]], Mapping[int, Sequence[int]]]


class PrefillBank:
    """Rows' next prompts prefilled ahead of their resets (`DecodeEngine.reset_rows(ahead=)`): their
    K/V in a `LengthKVCache` of their own (row r's next prompt in its row r), their last-token
    outputs beside it, and which prompt each row holds. A later reset copies a row's entry into the
    engine's cache in one batched copy with the other rows served from here."""

    def __init__(self, model: PreTrainedModel, num_rows: int) -> None:
        self.kv = LengthKVCache(model, num_rows)
        self.prompts: dict[int, list[int]] = {}
        self.outputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # logits, hidden, finite

    def store(self, rows: list[int], prompts: list[list[int]], prefill: Prefill, source_rows: list[int],
              capacity: int) -> None:
        """Rows `rows` hold `prompts`, rows `source_rows` of `prefill`; the bank grows to `capacity` slots
        (the owner's rounding of the longest prompt) when it has fewer."""
        if capacity > self.kv.capacity:
            self.kv.resize(capacity)
        self.kv.load(rows, prompts, prefill.cache, source_rows=source_rows)
        where, taken = (torch.tensor(v, device=prefill.logits.device) for v in (rows, source_rows))
        fresh = (prefill.logits, prefill.hidden, prefill.finite)
        if self.outputs is None:
            self.outputs = tuple(t.new_zeros(self.kv.num_rows, *t.shape[1:]) for t in fresh)  # type: ignore[assignment]
        for bank, new in zip(self.outputs, fresh):
            bank[where] = new[taken]
        self.prompts.update(zip(rows, prompts))
