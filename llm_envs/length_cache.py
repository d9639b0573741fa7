"""A preallocated per-row KV cache with per-row lengths: the one KV cache of llm_envs.

Two owners keep N growing token sequences in one batched cache and must take tokens back from single
rows. The decode engine (`llm_envs.engine.DecodeEngine`) advances each row one token per step, takes
back a rejected token and restarts rows with new prompts at their own moments; the reward model's
prefix cache of the candidate scorer (`llm_envs.rewards.candidates`) feeds each row a *run* of new
tokens per forward (the prefix tokens not cached yet, then k tentative candidates) and later keeps
one candidate. `LengthKVCache` serves both with no copy of the cache on the hot path:

* Layout: per layer, ``keys`` / ``values`` are ``[N, kv_heads, capacity, head_dim]``, allocated
  once (zeroed); `tokens` ``[N, capacity]`` holds the id in each slot. Row r's sequence is slots
  ``[0, len[r])``, its slot j holds its position j, so positions need no bookkeeping of their own.
* A forward writes each row's new K/V at slots ``start[r] .. start[r] + run - 1`` (one scatter per
  layer, no ``torch.cat`` of the whole cache as in transformers' `DynamicCache`); the engine writes
  one slot, ``start[r] = len[r]``. A rejected token is ``len[r] -= 1``: the next write overwrites its
  slot, so there are no holes and no compaction.
* Tentative tokens written past a row's length (the scorer's k candidates, each at the same position
  ``len[r]``) cost nothing until one is kept: `move_slots` copies the kept one's slot to slot
  ``len[r]`` for all rows at once (one gather and one scatter per tensor per layer) and the owner
  does ``len[r] += 1``; the others are overwritten by later writes.
* Attention runs over the first ``width`` slots only, a *bucket* (a multiple of a bucket size
  that covers the longest row), returned as a view: shapes change only when the bucket does,
  which is what CUDA graphs need. The attention mask (slot j visible to row r iff j <= the slot
  r writes) is built on the device from the lengths by the owner and passed to the model as a
  4-D mask, which transformers uses as is (no data-dependent mask logic, no host sync).
* Capacity grows by reallocation and copy (`resize`), which is rare: the owner sizes it for a
  prompt plus a reserve of tokens when rows restart.

The lengths themselves live with the owner (both owners keep them exact on the host, so no decision
needs a device->host sync); before each forward it calls `begin` with the first slot each row writes
(a device tensor), the bucket width and the run length, then runs the model with this object as its
cache (`llm_envs.models.cache_kwargs`), with explicit position ids. Every row writes in every
forward, also a row that does not keep its tokens: it writes past its length, where nothing is read,
and each query sees at least its own slot, so no query is fully masked (a fully masked softmax can
give NaN).

Slots past a row's length are never read with weight > 0, but ``0 * NaN`` is NaN, so anything
non-finite written there (by a step whose logits turned out non-finite) is zeroed (`zero_from`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer

__all__ = ["LengthKVCache", "to_device"]


def to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """Copy a host array to ``device`` without making the host wait for the device.

    On CUDA through pinned memory with ``non_blocking=True`` (a plain copy from pageable memory
    synchronises the stream); the pinned block comes from torch's caching host allocator, which
    does not hand it out again before the copy has finished. Elsewhere a plain tensor.
    """
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


class _Step:
    """Where the current forward writes (``index``: [N, run] slots on the device, each row's ``run``
    consecutive slots) and how many slots it attends over (``width``): set by `LengthKVCache.begin`,
    read by every layer's `update`."""

    __slots__ = ("index", "run", "width")

    def __init__(self) -> None:
        self.index: torch.Tensor | None = None
        self.run = 1
        self.width = 0


class LengthLayer(CacheLayerMixin):
    """One layer of `LengthKVCache`: ``[N, kv_heads, capacity, head_dim]`` keys and values."""

    is_compileable = True  # static shapes for a given bucket width, in-place writes
    is_sliding = False

    def __init__(self, num_rows: int, step: _Step) -> None:
        super().__init__()
        self.num_rows, self.capacity, self._step = num_rows, 0, step

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Allocate zeroed keys and values of ``capacity`` slots, with the heads, head size, dtype
        and device of the given states (so nothing is guessed from the config)."""
        self.device = key_states.device
        self.keys = key_states.new_zeros(self.num_rows, key_states.shape[1], self.capacity, key_states.shape[3])
        self.values = value_states.new_zeros(self.num_rows, value_states.shape[1], self.capacity,
                                             value_states.shape[3])
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write each row's run of new K/V at its slots (one scatter per tensor); return views of the
        first ``width`` slots, which is what attention runs over."""
        index, run, width = self._step.index, self._step.run, self._step.width
        if index is None:
            raise RuntimeError("LengthKVCache.update ran before begin(); call begin(slots, width) before the forward.")
        if key_states.shape[2] != run:
            raise ValueError(
                f"LengthKVCache got {key_states.shape[2]} new tokens per row in this forward, expected {run} "
                f"(begin's run={run}); pass the forward's token count per row as begin(..., run=), or prefill "
                "prompts in a cache of their own and `load` them.")
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        for cache, new in ((self.keys, key_states), (self.values, value_states)):
            cache.scatter_(2, index.view(-1, 1, run, 1).expand(-1, new.shape[1], run, new.shape[3]), new)
        return self.keys[:, :, :width], self.values[:, :, :width]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """The attended width and offset (what a mask built by transformers would have to cover)."""
        return self._step.width, 0

    def get_seq_length(self) -> int:
        """Rows have lengths of their own; this is the width the current forward attends over."""
        return self._step.width

    def get_max_length(self) -> int:
        return self.capacity

    def move_slots(self, rows: torch.Tensor, sources: torch.Tensor, targets: torch.Tensor) -> None:
        """For each i, copy slot ``sources[i]`` of row ``rows[i]`` to its slot ``targets[i]`` (keys and
        values: one gather and one scatter per tensor for all rows); rows distinct."""
        if self.is_initialized:
            for cache in (self.keys, self.values):
                cache[rows, :, targets] = cache[rows, :, sources]

    def resize(self, capacity: int) -> None:
        """Reallocate to ``capacity`` slots (zeroed), keeping the first ``min(old, new)`` slots."""
        if self.is_initialized:
            for name in ("keys", "values"):
                old = getattr(self, name)
                new = old.new_zeros(*old.shape[:2], capacity, old.shape[3])
                keep = min(capacity, old.shape[2])
                new[:, :, :keep] = old[:, :, :keep]
                setattr(self, name, new)
        self.capacity = capacity


class LengthKVCache(Cache):
    """N rows with lengths of their own in one preallocated transformers cache (module docstring).

    The owner keeps the lengths; it calls `begin` before each forward, `write_tokens` after it,
    `move_slots` to keep a token written past a row's length, `load` to put prompts prefilled in a
    `DynamicCache` of their own into rows, `resize` to grow, `clear` to start over, and `zero_from`
    to scrub slots past the lengths.
    """

    def __init__(self, model: PreTrainedModel, num_rows: int) -> None:
        """An empty cache (capacity 0, allocated on first use) for ``num_rows`` rows of ``model``,
        which must use full attention in every layer."""
        if isinstance(num_rows, bool) or not isinstance(num_rows, (int, np.integer)) or num_rows < 1:
            raise ValueError(f"num_rows={num_rows!r}; expected an int >= 1 (rows decoded together).")
        num_rows = int(num_rows)
        probe = DynamicCache(config=model.config)
        if not probe.layers or any(type(layer) is not DynamicLayer for layer in probe.layers):
            raise ValueError(
                f"{type(model).__name__} uses sliding-window, hybrid or lazily typed cache layers, which the "
                "per-row length cache does not support; use a model with full attention in every layer."
            )
        self._step = _Step()
        super().__init__(layers=[LengthLayer(num_rows, self._step) for _ in probe.layers])
        self.num_rows = num_rows
        self.device = next(model.parameters()).device
        self.capacity = 0
        with torch.inference_mode():  # every later write runs in inference mode too
            self.tokens = torch.zeros(num_rows, 0, dtype=torch.long, device=self.device)
            self._range = torch.arange(0, device=self.device)

    @property
    def width(self) -> int:
        """Slots the latest decode forward attends over (0 before the first)."""
        return self._step.width

    def slot_range(self, width: int) -> torch.Tensor:
        """``arange(width)`` on the device, without allocating one per step."""
        return self._range[:width]

    # ------------------------------------------------------------------ a forward
    def begin(self, slots: torch.Tensor, width: int, run: int = 1) -> None:
        """Set the next forward's first write slot per row (``slots``: [N] long, on the device), the
        tokens it feeds per row (``run``: row r writes slots ``slots[r] .. slots[r] + run - 1``) and
        the number of slots it attends over (``width`` <= capacity, covering every slot written)."""
        if width > self.capacity:
            raise ValueError(f"width={width} exceeds the capacity of {self.capacity} slots; resize first.")
        if isinstance(run, bool) or not isinstance(run, (int, np.integer)) or not 1 <= run <= width:
            raise ValueError(f"run={run!r}; expected an int in [1, width={width}] (the tokens fed per row).")
        index = slots[:, None] if run == 1 else slots[:, None] + self.slot_range(int(run))[None, :]
        self._step.index, self._step.run, self._step.width = index, int(run), width

    def write_tokens(self, ids: torch.Tensor) -> None:
        """Record the ids the forward just fed ([N] or [N, run] long, on the device) at their rows' slots."""
        self.tokens.scatter_(1, self._step.index, ids.view(self.num_rows, -1))

    def move_slots(self, rows: torch.Tensor, sources: torch.Tensor, targets: torch.Tensor) -> None:
        """Copy slot ``sources[i]`` of row ``rows[i]`` to its slot ``targets[i]`` in every layer (and
        `tokens`), for all i at once (device tensors [R] long, rows distinct): keeps a token written
        tentatively past a row's length (targets = the lengths; the owner then adds 1 to them)."""
        for layer in self.layers:
            layer.move_slots(rows, sources, targets)
        self.tokens[rows, targets] = self.tokens[rows, sources]

    # ------------------------------------------------------------------ whole rows
    def resize(self, capacity: int) -> None:
        """Reallocate every layer (and `tokens`) to ``capacity`` slots, keeping what fits: rare, a copy."""
        for layer in self.layers:
            layer.resize(capacity)
        tokens = self.tokens.new_zeros(self.num_rows, capacity)
        keep = min(capacity, self.tokens.shape[1])
        tokens[:, :keep] = self.tokens[:, :keep]
        self.tokens, self.capacity = tokens, capacity
        self._range = torch.arange(capacity, device=self.device)

    def clear(self, capacity: int) -> None:
        """Every slot zeroed at ``capacity`` slots, as if new: in place when the capacity is
        unchanged (the tensors keep their addresses), else by reallocation. After it, the layout
        (and with it the float rounding of attention) depends only on what comes next."""
        if capacity == self.capacity:
            for layer in self.layers:
                if layer.is_initialized:
                    layer.keys.zero_()
                    layer.values.zero_()
            self.tokens.zero_()
            return
        for layer in self.layers:
            layer.keys = layer.values = None
            layer.is_initialized = False
        self.capacity = 0
        self.tokens = self.tokens.new_zeros(self.num_rows, 0)
        self.resize(capacity)

    def load(self, rows: Sequence[int], prompts: Sequence[Sequence[int]], source: DynamicCache,
             source_rows: Sequence[int] | None = None) -> None:
        """Put prompts prefilled left-padded in ``source`` (one forward of ``W`` slots, each prompt ending
        at slot W - 1) into slots ``[0, P_i)`` of ``rows[i]``, undoing the padding with a gather; the
        rest of each of those rows is zeroed. Prompt i is row ``source_rows[i]`` of ``source`` (default:
        row i). Needs ``capacity >= max P_i``."""
        width = max(len(p) for p in prompts)
        if width > self.capacity:
            raise ValueError(f"prompts of {width} tokens do not fit the capacity of {self.capacity} slots; "
                             "resize first.")
        padded = int(source.layers[0].keys.shape[2])
        lengths = np.array([len(p) for p in prompts], dtype=np.int64)[:, None]
        columns = np.arange(width, dtype=np.int64)[None, :]
        index = padded - lengths + np.minimum(columns, lengths - 1)  # past P_i: repeats of the last slot (finite)
        ids = np.zeros((len(prompts), width), dtype=np.int64)
        for i, prompt in enumerate(prompts):
            ids[i, : len(prompt)] = prompt
        taken = np.arange(len(prompts)) if source_rows is None else np.asarray(source_rows, dtype=np.int64)
        packed = to_device(np.concatenate([np.asarray(rows, dtype=np.int64)[:, None], taken[:, None], index, ids],
                                          axis=1), self.device)
        where, taken_d = packed[:, 0], packed[:, 1]
        index_d, ids_d = packed[:, 2 : width + 2], packed[:, width + 2 :]
        for mine, theirs in zip(self.layers, source.layers):
            if not mine.is_initialized:
                mine.lazy_initialization(theirs.keys, theirs.values)
            for cache, new in ((mine.keys, theirs.keys), (mine.values, theirs.values)):
                cache.index_fill_(0, where, 0)
                # [R, width, heads, dim]: row taken[i], slots index[i] (one gather), to the cache's layout
                cache[where, :, :width] = new[taken_d[:, None], :, index_d].transpose(1, 2)
        self.tokens.index_fill_(0, where, 0)
        self.tokens[where, :width] = ids_d

    def copy_rows(self, source: LengthKVCache, rows: Sequence[int], width: int) -> None:
        """Rows ``rows`` take the same rows of ``source`` (a cache of the same model and row count):
        their first ``width`` slots copied (one gather and one scatter per tensor per layer), the rest
        zeroed, as `load` leaves a row. Needs ``width`` <= both capacities."""
        if width > min(self.capacity, source.capacity):
            raise ValueError(f"width={width} exceeds a capacity ({self.capacity} here, {source.capacity} in the source); "
                             "resize first.")
        where = to_device(np.asarray(rows, dtype=np.int64), self.device)
        for mine, theirs in zip(self.layers, source.layers):
            if not mine.is_initialized:
                mine.lazy_initialization(theirs.keys, theirs.values)
            for cache, new in ((mine.keys, theirs.keys), (mine.values, theirs.values)):
                cache.index_fill_(0, where, 0)
                cache[where, :, :width] = new[where, :, :width]
        self.tokens.index_fill_(0, where, 0)
        self.tokens[where, :width] = source.tokens[where, :width]

    def zero_from(self, lengths: torch.Tensor, width: int) -> None:
        """Zero every slot ``j >= lengths[r]`` of the first ``width`` slots of each row r (lengths [N]
        on the device): scrubs what steps that were undone wrote, which may be non-finite."""
        stale = self.slot_range(width)[None, :] >= lengths[:, None]
        for layer in self.layers:
            if layer.is_initialized:
                layer.keys[:, :, :width].masked_fill_(stale[:, None, :, None], 0)
                layer.values[:, :, :width].masked_fill_(stale[:, None, :, None], 0)
        self.tokens[:, :width].masked_fill_(stale, 0)

    def row_tokens(self, row: int, length: int) -> list[int]:
        """The first ``length`` ids of ``row`` (reads the device: a sync, not for the hot path)."""
        return self.tokens[row, :length].tolist() if length else []
