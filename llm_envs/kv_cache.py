"""An append-only per-row KV cache with a visibility mask: what per-row rollback stands on.

Two users keep N growing token sequences in one batched transformers cache and must take tokens
back from single rows: the decode engine (a rejected candidate is dropped from its row) and the
reward model's prefix cache of the candidate scorer (k candidates are fed tentatively, one of
them is kept). transformers' `DynamicCache` can only crop every row at once, so `SlotKVCache`
rolls back by masking instead of deleting:

* The cache is append-only, ``[N, heads, L, head_dim]`` per layer, where ``L`` is a *physical*
  slot count shared by all rows. A ``[N, L]`` bool mask says which slots each row sees;
  padding, dropped slots and slots of a row's previous sequence are hidden.
* Physical slot != logical position, so callers pass explicit per-row ``position_ids`` (the
  row's count of visible tokens, `num_tokens`); without them GPT-2's learned positions are wrong.
* A row's visible slots are in increasing physical order, so compaction (gathering each row's
  visible slots to the front) preserves order. `maybe_compact` runs it when the physical length
  exceeds the longest visible row by more than ``compact_slack``, so memory stays
  O(N * (longest visible row + slack)).

This module owns the cache object, the mask and the bookkeeping (each row's visible token ids
and their physical slots); the forwards stay with the callers, who pass `cache` to the model
(`llm_envs.models.cache_kwargs`) and then tell this object what the forward appended
(`extend`, `splice`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import DynamicLayer

__all__ = ["SlotKVCache"]


def _grow(kv: torch.Tensor, length: int) -> torch.Tensor:
    """Pad a [N, H, L, Dh] cache tensor with zero slots up to ``length``."""
    n, h, cur, d = kv.shape
    return torch.cat([kv, kv.new_zeros(n, h, length - cur, d)], dim=2)


def _gather_slots(kv: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Per row, take the slots ``index[row]`` of a [N, H, L, Dh] cache tensor."""
    n, h, _, d = kv.shape
    return kv.gather(2, index[:, None, :, None].expand(n, h, index.shape[1], d))


class SlotKVCache:
    """N rows of visible tokens in one append-only transformers cache (see the module docstring).

    The transformers cache is `cache`; `mask` ([N, L] bool) is what each row sees. After a
    forward that appended slots to `cache`, call `extend` (or `splice` for a prompt prefilled in
    a cache of its own, `new_cache`); take tokens back with `pop` / `truncate`, reveal a slot
    fed tentatively with `show`, start over with `clear`.
    """

    def __init__(self, model: PreTrainedModel, num_rows: int, *, compact_slack: int) -> None:
        """An empty cache for ``num_rows`` rows of ``model`` (full-attention layers only).

        ``compact_slack``: hidden slots tolerated beyond the longest row before `maybe_compact`
        gathers (larger = fewer gathers, more memory).
        """
        if num_rows < 1:
            raise ValueError(f"num_rows={num_rows}; expected at least 1 row.")
        if compact_slack < 0:
            raise ValueError(f"compact_slack={compact_slack}; expected an integer >= 0.")
        self.num_rows, self.compact_slack = num_rows, compact_slack
        self.device = next(model.parameters()).device
        self._model_config = model.config
        self.cache = self.new_cache()
        if any(type(layer) is not DynamicLayer for layer in self.cache.layers):
            raise ValueError(
                f"{type(model).__name__} uses sliding-window or hybrid cache layers, which per-row slot "
                "masking does not support; use a model with full attention only."
            )
        with torch.inference_mode():  # every later update runs in inference mode too
            self.mask = torch.zeros(num_rows, 0, dtype=torch.bool, device=self.device)
        self._tokens: list[list[int]] = [[] for _ in range(num_rows)]  # ids in each row's visible slots
        self._slots: list[list[int]] = [[] for _ in range(num_rows)]  # the physical slot of each
        self.compactions = 0

    # ------------------------------------------------------------------ reading
    @property
    def length(self) -> int:
        """Physical slots per row (visible + hidden)."""
        return int(self.mask.shape[1])

    def tokens(self, row: int) -> list[int]:
        """The row's visible token ids, in order (a copy)."""
        return list(self._tokens[row])

    def num_tokens(self, row: int) -> int:
        """The row's count of visible tokens: the position id its next token gets."""
        return len(self._tokens[row])

    def longest(self) -> int:
        """The most visible tokens any row holds."""
        return max(len(s) for s in self._slots)

    def new_cache(self) -> DynamicCache:
        """An empty transformers cache of this model, e.g. to prefill prompts apart (`splice`)."""
        return DynamicCache(config=self._model_config)

    def attention_mask(self, new_slots: int) -> torch.Tensor:
        """The [N, L + new_slots] 2-D mask of a forward that appends ``new_slots`` slots to every
        row: each row sees its visible slots and all the new ones. A row that will not keep its
        new slot still sees it during the forward, so no query is fully masked (a fully masked
        softmax can yield NaN, which would then sit in the cache)."""
        return torch.cat([self.mask, self.mask.new_ones(self.num_rows, new_slots)], 1)

    # ------------------------------------------------------------------ writing
    @torch.inference_mode()
    def clear(self) -> None:
        """Every row empty, in a fresh cache: the layout (and so the float rounding of attention
        sums) then depends only on what comes next, which makes runs reproducible."""
        self.cache = self.new_cache()
        self.mask = self.mask.new_zeros(self.num_rows, 0)
        self._tokens = [[] for _ in range(self.num_rows)]
        self._slots = [[] for _ in range(self.num_rows)]

    @torch.inference_mode()
    def extend(self, width: int, kept: Mapping[int, tuple[int, Sequence[int]]]) -> int:
        """Account for the ``width`` slots the last forward appended to every row of `cache`.

        ``kept[row] = (offset, tokens)``: the row keeps the new slots ``offset .. offset +
        len(tokens) - 1`` visible, holding ``tokens``; all other new slots stay hidden (a caller
        may `show` one later). Returns the physical index of the first new slot.
        """
        first = self.length
        visible = [[False] * width for _ in range(self.num_rows)]
        for row, (offset, tokens) in kept.items():
            visible[row][offset : offset + len(tokens)] = [True] * len(tokens)
            self._tokens[row].extend(tokens)
            self._slots[row].extend(range(first + offset, first + offset + len(tokens)))
        self.mask = torch.cat([self.mask, torch.tensor(visible, dtype=torch.bool, device=self.device)], 1)
        return first

    @torch.inference_mode()
    def splice(
        self, rows: Sequence[int], tokens: Sequence[Sequence[int]], source: DynamicCache, visible: torch.Tensor
    ) -> None:
        """Replace what ``rows`` hold with sequences prefilled in a cache of their own.

        ``source`` holds ``len(rows)`` left-padded sequences of ``W`` slots (`new_cache`, one
        forward); ``visible`` [len(rows), W] marks their real tokens, ``tokens[i]`` are those
        ids. They go to slots ``[0, W)`` of the rows (growing ``L`` when ``W > L``); the rest of
        each row is hidden. Other rows are untouched.
        """
        width = int(visible.shape[1])
        if width > self.length:  # grow the mask, then every layer below, to hold the prompts
            self.mask = torch.cat([self.mask, self.mask.new_zeros(self.num_rows, width - self.length)], 1)
        index = torch.tensor(list(rows), device=self.device)
        hide = ~visible[:, None, :, None]
        for main, new in zip(self.cache.layers, source.layers):
            k_new, v_new = new.keys.masked_fill(hide, 0), new.values.masked_fill(hide, 0)
            if not main.is_initialized:  # first splice: allocate [N, H, 0, Dh]
                main.lazy_initialization(k_new, v_new)
                shape = (self.num_rows, k_new.shape[1], 0, k_new.shape[3])
                main.keys = k_new.new_zeros(shape)
                main.values = v_new.new_zeros(shape[:3] + (v_new.shape[3],))
            if main.keys.shape[2] < self.length:
                main.keys = _grow(main.keys, self.length)
                main.values = _grow(main.values, self.length)
            main.keys[index, :, :width] = k_new
            main.values[index, :, :width] = v_new
        self.mask[index] = False
        self.mask[index, :width] = visible
        for row, ids in zip(rows, tokens):  # left padding: a row's tokens end at slot W - 1
            self._tokens[row] = list(ids)
            self._slots[row] = list(range(width - len(ids), width))

    @torch.inference_mode()
    def pop(self, rows: Sequence[int]) -> None:
        """Hide each row's last visible token (a row listed twice loses two); no forward needed."""
        hidden_rows, hidden_slots = [], []
        for row in rows:
            self._tokens[row].pop()
            hidden_rows.append(row)
            hidden_slots.append(self._slots[row].pop())
        if hidden_rows:
            self.mask[torch.tensor(hidden_rows), torch.tensor(hidden_slots)] = False

    @torch.inference_mode()
    def truncate(self, row: int, length: int) -> None:
        """Keep the row's first ``length`` visible tokens; hide the rest."""
        self.mask[row, self._slots[row][length:]] = False
        del self._tokens[row][length:], self._slots[row][length:]

    @torch.inference_mode()
    def show(self, row: int, slot: int, token: int) -> None:
        """Make a hidden slot the row's next visible token (``token`` was fed there tentatively).
        The slot must lie after the row's last visible one, so the row's slots stay in order."""
        if self._slots[row] and slot <= self._slots[row][-1]:
            raise ValueError(f"row {row}: slot {slot} is not after the row's last visible slot {self._slots[row][-1]}.")
        self.mask[row, slot] = True
        self._tokens[row].append(int(token))
        self._slots[row].append(slot)

    def maybe_compact(self) -> bool:
        """`compact` when hidden slots beyond the longest row exceed ``compact_slack``; says whether it did."""
        if self.length - self.longest() > self.compact_slack:
            self.compact()
            return True
        return False

    @torch.inference_mode()
    def compact(self) -> None:
        """Gather each row's visible slots to the front; the cache shrinks to the longest row.
        Hidden slots are gone afterwards (a tentative slot can no longer be shown)."""
        longest = self.longest()
        index = torch.zeros(self.num_rows, longest, dtype=torch.long)
        for row, slots in enumerate(self._slots):
            index[row, : len(slots)] = torch.tensor(slots, dtype=torch.long)
            self._slots[row] = list(range(len(slots)))
        index = index.to(self.device)
        for layer in self.cache.layers:
            if layer.is_initialized:
                layer.keys = _gather_slots(layer.keys, index)
                layer.values = _gather_slots(layer.values, index)
        lengths = torch.tensor([len(s) for s in self._slots], device=self.device)
        self.mask = torch.arange(longest, device=self.device)[None, :] < lengths[:, None]
        self.compactions += 1
