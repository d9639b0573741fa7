"""Batched, KV-cached single-token decoding over a frozen Hugging Face causal LM.

The RL environments keep N rows (one per env) that advance one token at a time, reject
candidates, and reset at different moments. This engine serves all of them with at most one
batched forward per env step, and it knows only token ids: candidate pools, masks and rewards
live in the envs.

Cache layout (why it is built this way): transformers' `DynamicCache` can only crop every row at
once and copies the whole cache at every step (``torch.cat``). The engine's rows live instead in
`llm_envs.length_cache.LengthKVCache`, preallocated per layer as [N, kv_heads, capacity, head_dim],
with a length per row (its docstring has the details):

* ``append`` writes each row's token at slot ``len[r]`` (explicit position id ``len[r]``) and
  attends over a bucket of slots; a kept token is ``len[r] += 1``. ``drop_last`` is
  ``len[r] -= 1``: the next write overwrites the slot, so there are no holes and no compaction.
* ``reset_rows`` prefills the new prompts in their own left-padded batch (fresh `DynamicCache`),
  then copies each prompt's K/V into slots ``[0, P)`` of its row. With ``ahead=`` the same forward
  also prefills other rows' next prompts, which their later resets copy in without a forward
  (`llm_envs.prefill`).
* The lengths are kept exact on the host (numpy), so context checks, capacity, the bucket and
  every per-row query need no device->host sync; each forward sends them to the device in one
  host->device copy. With token ids already on the device and ``check_finite=False``, ``append``
  and ``drop_last`` never wait for the device (ready for CUDA graphs and a sync-free env step).

The result equals a fresh no-cache forward of each row's visible sequence to float rounding
(~1e-6 in float32), for learned-position (GPT-2) and rotary (Llama) models, eager and sdpa.
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from transformers import DynamicCache, PreTrainedModel

from llm_envs.length_cache import LengthKVCache, to_device
from llm_envs.models import cache_kwargs, context_length, enable_tf32
from llm_envs.prefill import (
    AheadPrompts,
    Prefill,
    PrefillBank,
    length_groups,
    prefill_overhead_tokens,
)

__all__ = ["DecodeEngine", "EngineSnapshot", "NonFiniteLogitsError", "StepOutput"]


class NonFiniteLogitsError(FloatingPointError):
    """The LM's next-token logits hold NaN or +inf (or no finite value) for some rows.

    Raised instead of building pools from garbage (a NaN row's nucleus would collapse to one
    arbitrary token and PPO would see NaN features). ``rows`` are the engine (= env) row indices.
    """

    def __init__(self, message: str, rows: list[int]) -> None:
        super().__init__(message)
        self.rows = rows


@dataclass(frozen=True)
class StepOutput:
    """Next-token logits and the chosen layer's hidden state at each returned row's last slot.

    Both are float32 whatever the model dtype, so envs can build observations and
    probabilities without caring how the LM was loaded: a bf16 LM head's output is upcast before
    any softmax, top-k or sort. ``finite`` ([B] bool, on the device) is True where a row's logits
    are finite by the rule of `_check_finite_logits`; a caller that passed ``check_finite=False``
    to `DecodeEngine.append` reads it (without a sync) and decides.
    """

    logits: torch.Tensor  # [B, V] float32
    hidden: torch.Tensor  # [B, D] float32
    finite: torch.Tensor | None = None  # [B] bool


@dataclass(frozen=True)
class EngineSnapshot:
    """The engine's per-row lengths and counters at one moment (`DecodeEngine.save`); opaque.

    Only `DecodeEngine.restore` of the engine that made it reads it. Cache contents are not
    copied: a restore is valid while no slot below a saved length was written since (checked).
    """

    owner: int
    serial: int
    resets: int
    lengths: np.ndarray
    row_forwards: np.ndarray
    forward_calls: int
    tokens_forwarded: int


def _as_int_list(values: Sequence[int] | np.ndarray | torch.Tensor) -> list[int]:
    if isinstance(values, torch.Tensor):
        return [int(v) for v in values.reshape(-1).tolist()]
    return [int(v) for v in values]


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _finite_rows(logits: torch.Tensor) -> torch.Tensor:
    """[B] bool on the device: the row's max logit is finite. NaN and +inf propagate through the
    max, a row of only -inf has max -inf; a -inf entry alone is a legitimately banned token."""
    return torch.isfinite(logits.amax(dim=-1))


def _check_finite_logits(
    logits: torch.Tensor, rows: list[int], model: torch.nn.Module, finite: torch.Tensor | None = None
) -> None:
    """Raise `NonFiniteLogitsError` naming the rows whose logits hold NaN, +inf, or no finite value.

    Cheap on the hot path: one max-reduction over [B, V] (`_finite_rows`, or ``finite`` when the
    caller has it) and one host sync for the verdict; the per-row diagnosis runs only when it fails.
    """
    bad = ~(_finite_rows(logits) if finite is None else finite)
    if not bool(bad.any()):
        return
    found = []
    for i in bad.nonzero().squeeze(1).tolist():
        row_logits = logits[i]
        what = ("NaN" if bool(row_logits.isnan().any()) else
                "+inf" if bool(row_logits.isposinf().any()) else "no finite value (all -inf)")
        found.append((rows[i], what))
    shown = ", ".join(f"row {row}: {what}" for row, what in found[:8])
    more = f" and {len(found) - 8} more rows" if len(found) > 8 else ""
    dtype = getattr(model, "dtype", None)
    fix = ("float16 overflows past 65504: load the LM with dtype='bfloat16' (same range as float32) or "
           "'float32'" if dtype == torch.float16 else
           "check the model's weights for NaN/inf and the input ids; load it with dtype='float32' to rule out "
           "a half-precision overflow")
    raise NonFiniteLogitsError(
        f"{type(model).__name__} ({dtype}) returned non-finite next-token logits, expected finite values "
        f"(-inf only for banned tokens): {shown}{more}. Likely fix: {fix}.", [row for row, _ in found])


def _head_input_hook(engine: DecodeEngine) -> Any:
    """A forward pre-hook for the LM head that hands its input (the final normed hidden state) to
    ``engine`` while the engine runs a forward. It holds the engine weakly, so the hook (registered
    once, removed when the engine is collected) neither keeps the engine alive nor sees other
    callers' forwards of the same model."""
    ref = weakref.ref(engine)

    def hook(_module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        owner = ref()
        if owner is not None and owner._capturing:
            owner._captured = args[0]

    return hook


def _attention_kind(model: PreTrainedModel) -> str:
    """'bool' (sdpa) or 'additive' (eager): the 4-D mask each attention takes as is."""
    impl = getattr(model.config, "_attn_implementation", None)
    if impl == "sdpa":
        return "bool"
    if impl == "eager":
        return "additive"
    raise ValueError(
        f"{type(model).__name__} runs attn_implementation={impl!r}; the decode engine passes a 4-D attention mask "
        "over per-row lengths, which transformers' 'sdpa' and 'eager' attention take as is. Load the LM with "
        "attn_implementation='sdpa' (or 'eager')."
    )


class DecodeEngine:
    """N independent decoding rows over one frozen causal LM, one batched forward per step.

    Typical use: ``reset_rows`` a row with its prompt; each step ``append`` one token per row
    (a candidate, tentatively); ``drop_last`` the rows whose candidate was rejected. Logits and
    hidden states always match a fresh forward of the row's visible tokens (``tokens(row)``).
    """

    _ids = itertools.count()  # a distinct owner id per engine, for `EngineSnapshot`

    def __init__(
        self,
        model: PreTrainedModel,
        num_rows: int,
        *,
        hidden_layer: int = -1,
        reserve_tokens: int = 0,
        bucket_size: int = 32,
    ) -> None:
        """Wrap ``model`` (put in eval mode) for ``num_rows`` rows.

        ``hidden_layer`` indexes ``output_hidden_states`` (0 = embeddings, -1 = after the final
        norm, the default, which is read from the LM head's input at no extra cost).
        ``reserve_tokens``: slots kept free past the longest prompt when rows are reset, so decoding
        never has to grow the cache (an env passes ``max_new_tokens + 1``: its response plus the slot
        a finished row still writes); without it the cache grows on demand (a reallocation and copy).
        ``bucket_size``: attention runs over the smallest multiple of it that covers the longest row,
        so shapes change only every ``bucket_size`` tokens (larger = fewer shapes, more masked work).
        """
        for name, value, low in (("reserve_tokens", reserve_tokens, 0), ("bucket_size", bucket_size, 1)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise ValueError(f"{name}={value!r}; expected an int >= {low}.")
        self._kv = LengthKVCache(model, num_rows)  # validates num_rows and the model's cache layers
        self.model = model.eval()
        self.config = model.config.get_text_config(decoder=True)
        self.num_rows = self._kv.num_rows
        self.device = self._kv.device
        enable_tf32(self.device)  # a model placed on CUDA by the caller, not through llm_envs.models
        n_layers = int(self.config.num_hidden_layers)
        if not -(n_layers + 1) <= hidden_layer <= n_layers:
            raise ValueError(
                f"hidden_layer={hidden_layer} is out of range for a model with {n_layers} layers; "
                f"expected -{n_layers + 1}..{n_layers} (0 = embeddings, -1 = final normed state)."
            )
        self.hidden_layer = hidden_layer
        self._head = model.get_output_embeddings()
        if hidden_layer in (-1, n_layers) and self._head is None:
            self.hidden_layer = n_layers  # no LM-head module to hook: fall back to hidden_states
        self.vocab_size = int(self.config.vocab_size)
        self.hidden_size = int(self.config.hidden_size)
        self.max_context: int | None = context_length(self.config)
        self.reserve_tokens, self.bucket_size = int(reserve_tokens), int(bucket_size)
        # The most slots a row can use: its context, plus the slot a full row writes while inactive.
        self._max_slots = None if self.max_context is None else _round_up(self.max_context + 1, self.bucket_size)
        self._mask_kind = _attention_kind(model)
        with torch.inference_mode():
            dtype = model.dtype
            self._mask_fill = (torch.zeros((), dtype=dtype, device=self.device),
                               torch.full((), torch.finfo(dtype).min, dtype=dtype, device=self.device))
        # Host-side truth (exact, never read back from the device): each row's length (= the slot and
        # position id its next token gets), prompt length, and forwards since its reset.
        self._len = np.zeros(num_rows, dtype=np.int64)
        self._prompt_len = np.zeros(num_rows, dtype=np.int64)
        self._row_forwards = np.zeros(num_rows, dtype=np.int64)
        self.forward_calls = 0  # batched forwards, prefill included
        self.tokens_forwarded = 0  # token positions computed (padding and inactive rows included)
        # Snapshot validity (save / restore): resets so far, the latest snapshot, and the lowest slot
        # per row (and the highest overall) written since it.
        self._id, self._resets, self._serial = next(DecodeEngine._ids), 0, 0
        self._lowest_write = np.full(num_rows, np.iinfo(np.int64).max, dtype=np.int64)
        self._highest_write = -1
        self._capturing, self._captured = False, None
        # Rows' next prompts prefilled ahead of their resets (`reset_rows(..., ahead=)`).
        self._bank = PrefillBank(model, num_rows)
        if self.hidden_layer == -1:  # the LM head's input is the final normed hidden state
            handle = self._head.register_forward_pre_hook(_head_input_hook(self))
            weakref.finalize(self, handle.remove)
        self._prefill_overhead_tokens = prefill_overhead_tokens(
            self.device, sum(p.numel() for p in model.parameters()))

    # ------------------------------------------------------------------ per-row state
    def tokens(self, row: int) -> list[int]:
        """The row's visible token ids (prompt + kept tokens): what a fresh forward would see.
        Reads the device's token buffer (a sync): for checks and final results, not every step."""
        self._check_row(row)
        return self._kv.row_tokens(row, int(self._len[row]))

    def next_position(self, row: int) -> int:
        """Position id the row's next token gets (= its number of visible tokens)."""
        return int(self._len[row])

    def prompt_length(self, row: int) -> int:
        """Length of the prompt the row was last reset with (0 if never reset)."""
        return int(self._prompt_len[row])

    def row_forwards(self, row: int) -> int:
        """Forwards that computed something for this row since its last reset (prefill = 1)."""
        return int(self._row_forwards[row])

    @property
    def cache_length(self) -> int:
        """Slots allocated per row (the cache's capacity); rows use ``[0, next_position(row))``."""
        return self._kv.capacity

    @property
    def attention_width(self) -> int:
        """Slots the latest ``append`` attended over: a bucket, the smallest multiple of
        ``bucket_size`` that covers the longest row (0 before the first append)."""
        return self._kv.width

    # ------------------------------------------------------------------ operations
    @torch.inference_mode()
    def reset_rows(
        self, rows: Sequence[int], prompt_ids: Sequence[Sequence[int] | torch.Tensor], *,
        ahead: AheadPrompts | None = None,
    ) -> StepOutput:
        """Replace what ``rows`` hold with new prompts, prefilled in one batched forward.

        Returns, in the order of ``rows``, the logits and hidden state at each prompt's last
        token. Other rows are untouched. Non-finite logits raise `NonFiniteLogitsError` naming
        the rows, before any row is replaced.

        ``ahead(free_rows)`` -> {row: its next prompt}: when this reset runs a prefill forward, the
        rows that hold no prompt prefilled ahead (``free_rows``) are offered, and the next prompts the
        caller knows go into the same forward. A later reset of such a row with exactly that prompt
        then copies it from there, with no forward of its own. Why: a forward's fixed cost (Python,
        launches) dwarfs a short prompt's compute on a small model or a GPU, and rows of an env end one
        or two at a time, so one batched prefill then serves about N resets instead of one. Memory: at
        most one prefilled prompt per row beside the cache. A prompt that differs from the one banked
        (a reseeded sampler, reset options) is simply prefilled then. A reset without ``ahead`` takes
        nothing banked (it prefills afresh, bit-reproducible whatever came before), and an engine of one
        row banks nothing (its every reset is of all its rows).
        """
        rows, prompts = self._checked_prompts(rows, prompt_ids)
        bank, full = self._bank, len(rows) == self.num_rows
        # Without `ahead` the reset neither takes nor banks anything, so it gives the same bits whatever
        # came before; one row has nothing to bank for (every reset of it is a reset of all its rows).
        banking = ahead is not None and self.num_rows > 1
        hits = [i for i, (row, prompt) in enumerate(zip(rows, prompts)) if bank.prompts.get(row) == prompt] \
            if banking else []
        for row in rows:
            bank.prompts.pop(row, None)  # taken or stale: either way the row's next prompt is unknown now
        hit = set(hits)
        missing = [i for i in range(len(rows)) if i not in hit]
        prefills: list[tuple[Prefill, list[int]]] = []  # each forward with the batch members it holds
        extra: list[tuple[int, list[int]]] = []
        if missing and banking:
            extra = self._ahead_prompts(ahead)
        if missing:
            batch = [prompts[i] for i in missing] + [prompt for _, prompt in extra]
            for group in length_groups([len(p) for p in batch], self._prefill_overhead_tokens):
                prefills.append((self._prefill_forward([batch[i] for i in group]), group))
        logits, hidden, finite = self._reset_outputs(rows, hits, missing, prefills)
        # Checked before anything is copied: a non-finite prefill leaves every row as it was.
        _check_finite_logits(logits, rows, self.model, finite)
        need = max(len(p) for p in prompts) + self.reserve_tokens
        if full:
            # Every row starts over: a cache as if new, sized by the new prompts alone, so the layout
            # (and with it the float rounding of attention sums) depends only on them. This makes a
            # single env bit-for-bit reproducible across resets with the same seed.
            self._kv.clear(self._capacity_for(need))
        else:
            self._ensure_capacity(need)
        if hits:  # before the bank takes new prompts (a row taken now may get its next one below)
            self._kv.copy_rows(bank.kv, [rows[i] for i in hits], max(len(prompts[i]) for i in hits))
        for prefill, group in prefills:
            now = [(slot, missing[member]) for slot, member in enumerate(group) if member < len(missing)]
            later = [(slot, extra[member - len(missing)]) for slot, member in enumerate(group) if member >= len(missing)]
            if now:
                self._kv.load([rows[i] for _, i in now], [prompts[i] for _, i in now], prefill.cache,
                              source_rows=[slot for slot, _ in now])
            if later:
                banked = [prompt for _, (_, prompt) in later]
                bank.store([row for _, (row, _) in later], banked, prefill, [slot for slot, _ in later],
                           _round_up(max(len(p) for p in banked), self.bucket_size))
        for row, prompt in zip(rows, prompts):
            self._len[row] = self._prompt_len[row] = len(prompt)
            self._row_forwards[row] = 1
        self._resets += 1
        return StepOutput(logits, hidden, finite)

    def _reset_outputs(
        self, rows: list[int], hits: list[int], missing: list[int], prefills: list[tuple[Prefill, list[int]]]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Logits, hidden states and finite flags of the reset rows in their order: the hits' from the bank,
        the others' from this reset's prefills (one index per source, none for a prefill serving all)."""
        parts: list[tuple[torch.Tensor, ...]] = []
        order: list[int] = []
        if hits:
            where = torch.tensor([rows[i] for i in hits], device=self.device)
            parts.append(tuple(t.index_select(0, where) for t in self._bank.outputs))  # type: ignore[union-attr]
            order += hits
        for prefill, group in prefills:
            slots = [slot for slot, member in enumerate(group) if member < len(missing)]
            if not slots:  # a forward of prompts prefilled ahead only
                continue
            tensors = (prefill.logits, prefill.hidden, prefill.finite)
            if len(slots) != len(prefill.prompts):
                where = torch.tensor(slots, dtype=torch.long, device=self.device)
                tensors = tuple(t.index_select(0, where) for t in tensors)
            parts.append(tensors)
            order += [missing[group[slot]] for slot in slots]
        out = [torch.cat(column) if len(column) > 1 else column[0] for column in zip(*parts)]
        if order != list(range(len(order))):  # back to the caller's row order
            back = torch.empty(len(order), dtype=torch.long)
            back[torch.tensor(order)] = torch.arange(len(order))
            back = back.to(self.device)
            out = [t[back] for t in out]
        return out[0], out[1], out[2]

    def _ahead_prompts(self, ahead: AheadPrompts) -> list[tuple[int, list[int]]]:
        """The (row, prompt) pairs to prefill ahead: what ``ahead`` knows of the rows holding none."""
        free = [row for row in range(self.num_rows) if row not in self._bank.prompts]
        pairs = []
        for row, prompt in ahead(free).items():
            if row not in free:
                raise ValueError(f"ahead() returned a prompt for row {row}, which it was not offered; "
                                 f"return prompts only for the rows it is called with ({len(free)} rows).")
            pairs.append((int(row), self._checked_prompts([row], [prompt])[1][0]))
        return pairs

    def _checked_prompts(
        self, rows: Sequence[int], prompt_ids: Sequence[Sequence[int] | torch.Tensor]
    ) -> tuple[list[int], list[list[int]]]:
        """`reset_rows`' arguments as int lists, after every check (nothing has run yet)."""
        rows = _as_int_list(rows)
        prompts = [_as_int_list(p) for p in prompt_ids]
        if len(rows) != len(prompts):
            raise ValueError(f"got {len(rows)} rows but {len(prompts)} prompts; pass one per row.")
        if not rows:
            raise ValueError("reset_rows needs at least one row.")
        if len(set(rows)) != len(rows):
            raise ValueError(f"rows={rows} repeats a row; reset each row at most once per call.")
        for row, prompt in zip(rows, prompts):
            self._check_row(row)
            if not prompt:
                raise ValueError(f"row {row}: the prompt is empty; pass at least one token id.")
            if self.max_context is not None and len(prompt) > self.max_context:
                raise ValueError(
                    f"row {row}: prompt of {len(prompt)} tokens exceeds the model's maximum "
                    f"context of {self.max_context} positions (config.max_position_embeddings); "
                    "truncate the prompt (keep its last tokens, leaving room for the response) "
                    "or use a model with a longer context."
                )
            self._check_ids(row, prompt)
        return rows, prompts

    def _prefill_forward(self, prompts: list[list[int]]) -> Prefill:
        """One left-padded batched forward of `prompts` in a fresh cache (copied to rows later)."""
        batch, width = len(prompts), max(len(p) for p in prompts)
        inputs = np.zeros((3, batch, width), dtype=np.int64)  # ids, attention mask, position ids
        for i, prompt in enumerate(prompts):  # left padding: every prompt ends at slot width-1
            n = len(prompt)
            inputs[:, i, width - n :] = (prompt, np.ones(n), np.arange(n))
        ids, attn, pos = to_device(inputs, self.device)
        fresh = DynamicCache(config=self.model.config)
        logits, hidden = self._forward(ids, attn, pos, fresh)
        self.forward_calls += 1
        self.tokens_forwarded += batch * width
        return Prefill(prompts, fresh, logits, hidden, _finite_rows(logits))

    @torch.inference_mode()
    def append(
        self,
        tokens: torch.Tensor | np.ndarray | Sequence[int],
        active: np.ndarray | Sequence[bool] | None = None,
        *,
        check_finite: bool = True,
    ) -> StepOutput:
        """Feed one token per row in ONE batched forward; active rows keep it (tentatively).

        Each active row's token goes to the slot at its next position; ``drop_last`` undoes it.
        Returns logits [N, V] and hidden [N, D] at that slot; rows not active get meaningless
        (but finite) outputs and keep nothing; their token may be any placeholder (it is not fed).

        ``tokens``: host ids (a sequence or numpy array; active rows' ids are checked against the
        vocabulary), or a [N] integer tensor already on the engine's device, taken as is: not
        checked and never read back (ids from the LM's own pools). ``active`` is host-side (None =
        all rows): it decides the bookkeeping, which stays on the host.

        ``check_finite=True``: non-finite logits raise `NonFiniteLogitsError` naming the rows, and
        no row keeps its token. ``check_finite=False``: no check (and no sync); ``finite`` in the
        output says which rows are fine, and a caller that dislikes it undoes the append with
        `restore` of a `save` taken just before. With device tokens and ``check_finite=False`` the
        call never waits for the device.
        """
        act = self._active_mask(active)
        self._check_can_append(act)
        on_device = isinstance(tokens, torch.Tensor) and tokens.device == self.device
        host_ids = None if on_device else self._host_ids(tokens, act)
        if on_device:
            self._check_token_tensor(tokens)
        slots = self._len.copy()  # every row writes at its length; only active rows keep it
        need = int(slots.max()) + 1
        self._ensure_capacity(need)
        width = min(_round_up(need, self.bucket_size), self._kv.capacity)
        columns = [slots, np.where(act, slots, 0), act.astype(np.int64)]
        packed = to_device(np.stack(columns if host_ids is None else [*columns, host_ids]), self.device)
        slots_d, pos_d, active_d = packed[0], packed[1], packed[2].bool()
        ids = packed[3] if host_ids is not None else torch.where(active_d, tokens.reshape(-1).long(), 0)
        self._kv.begin(slots_d, width)
        logits, hidden = self._forward(ids[:, None], self._attention_mask(slots_d, width), pos_d[:, None], self._kv)
        self._kv.write_tokens(ids)
        finite = _finite_rows(logits)
        np.minimum(self._lowest_write, slots, out=self._lowest_write)
        self._highest_write = max(self._highest_write, need - 1)
        if check_finite:
            try:
                _check_finite_logits(logits, list(range(self.num_rows)), self.model, finite)
            except NonFiniteLogitsError:
                self._kv.zero_from(slots_d, width)  # nothing kept: scrub what this forward wrote
                raise
        self._len += act
        self._row_forwards += act
        self.forward_calls += 1
        self.tokens_forwarded += self.num_rows
        return StepOutput(logits, hidden, finite)

    def drop_last(self, rows: Sequence[int] | np.ndarray) -> None:
        """Take back each row's most recent kept token (a rejected candidate); no forward needed.

        Later forwards behave exactly as if that token was never there and the row's next
        position goes back by one (the next append overwrites its slot). A row listed twice drops
        two tokens. Prompt tokens cannot be dropped (reset the row instead). Host-only bookkeeping.
        """
        rows = self._host_rows(rows, "rows")
        left: dict[int, int] = {}
        for row in rows:  # validate every row (a row listed twice drops two) before any moves
            self._check_row(row)
            length = left.get(row, int(self._len[row]))
            if length <= self._prompt_len[row]:
                raise ValueError(
                    f"row {row} holds only its prompt ({self._prompt_len[row]} tokens); there is "
                    "no appended token to drop. Use reset_rows to replace the prompt."
                )
            left[row] = length - 1
        for row, length in left.items():
            self._len[row] = length

    # ------------------------------------------------------------------ undo
    def save(self) -> EngineSnapshot:
        """A snapshot of every row's length and the counters, for `restore` (host-only, cheap).

        Take it right before an ``append(..., check_finite=False)`` that may have to be undone.
        Only the latest snapshot can be restored.
        """
        self._serial += 1
        self._lowest_write.fill(np.iinfo(np.int64).max)
        self._highest_write = -1
        return EngineSnapshot(self._id, self._serial, self._resets, self._len.copy(), self._row_forwards.copy(),
                              self.forward_calls, self.tokens_forwarded)

    @torch.inference_mode()
    def restore(self, snapshot: EngineSnapshot) -> None:
        """Put every row's length and the counters back as `save` found them: the appends since are
        undone atomically, as if they never ran. Slots written since are zeroed (they may hold
        non-finite K/V); slots below the saved lengths were not written, which is checked."""
        if not isinstance(snapshot, EngineSnapshot) or snapshot.owner != self._id:
            raise ValueError(f"got {type(snapshot).__name__}, expected a snapshot from this engine's save().")
        if snapshot.serial != self._serial:
            raise ValueError(f"snapshot {snapshot.serial} is not the latest ({self._serial}); only the latest "
                             "save() can be restored. Call save() right before the append you may undo.")
        if snapshot.resets != self._resets:
            raise ValueError("rows were reset (reset_rows) since this snapshot was saved; it no longer describes "
                             "the cache. Call save() after reset_rows, right before the append you may undo.")
        clobbered = np.flatnonzero(self._lowest_write < snapshot.lengths)
        if clobbered.size:
            row = int(clobbered[0])
            raise ValueError(
                f"row {row}: slot {int(self._lowest_write[row])}, below its saved length {int(snapshot.lengths[row])}, "
                "was written since save() (drop_last, then append); the snapshot can no longer be restored. "
                "Call save() after drop_last, right before the append you may undo.")
        self._len[:] = snapshot.lengths
        self._row_forwards[:] = snapshot.row_forwards
        self.forward_calls, self.tokens_forwarded = snapshot.forward_calls, snapshot.tokens_forwarded
        if self._highest_write >= 0:
            width = min(_round_up(self._highest_write + 1, self.bucket_size), self._kv.capacity)
            self._kv.zero_from(to_device(self._len.copy(), self.device), width)
        self._lowest_write.fill(np.iinfo(np.int64).max)
        self._highest_write = -1

    # ------------------------------------------------------------------ internals
    def _check_row(self, row: int) -> None:
        if not 0 <= row < self.num_rows:
            raise ValueError(
                f"row {row} is out of range; this engine has rows 0..{self.num_rows - 1}."
            )

    def _check_ids(self, row: int, ids: Sequence[int]) -> None:
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(
                f"row {row}: token id {bad[0]} is outside the model's vocabulary "
                f"[0, {self.vocab_size}); check that the tokenizer matches the model."
            )

    def _host_rows(self, values: Any, name: str) -> list[int]:
        """Row indices (or flags) given on the host; a device tensor would need a sync to read."""
        if isinstance(values, torch.Tensor) and values.device.type != "cpu":
            raise TypeError(f"{name} is a tensor on {values.device}; the engine keeps its bookkeeping on the "
                            f"host, so pass {name} as a list or numpy array (reading it here would wait for "
                            "the device).")
        return _as_int_list(values)

    def _active_mask(self, active: Any) -> np.ndarray:
        """``active`` as a host bool array [N] (None = every row)."""
        if active is None:
            return np.ones(self.num_rows, dtype=bool)
        if isinstance(active, torch.Tensor) and active.device.type != "cpu":
            raise TypeError(f"active is a tensor on {active.device}; the engine keeps its bookkeeping on the host, "
                            "so pass active as a list or numpy array of bools (reading it here would wait for "
                            "the device).")
        flags = np.asarray(active).reshape(-1).astype(bool)
        if flags.shape[0] != self.num_rows:
            raise ValueError(f"active has {flags.shape[0]} entries for {self.num_rows} rows; pass one per row.")
        return flags

    def _check_can_append(self, act: np.ndarray) -> None:
        """Every active row has a prompt and room in the model's context (host lengths only)."""
        empty = np.flatnonzero(act & (self._prompt_len == 0))
        if empty.size:
            row = int(empty[0])
            raise ValueError(f"row {row} has no prompt; call reset_rows([{row}], ...) first.")
        if self.max_context is None:
            return
        full = np.flatnonzero(act & (self._len >= self.max_context))
        if full.size:
            row = int(full[0])
            position, prompt = int(self._len[row]), int(self._prompt_len[row])
            raise ValueError(
                f"row {row}: appending a token at position {position} exceeds the model's maximum "
                f"context of {self.max_context} positions (prompt {prompt} + {position - prompt} kept tokens); "
                "end the episode earlier (cap max_new_tokens at context minus prompt length) or use shorter prompts."
            )

    def _host_ids(self, tokens: Any, act: np.ndarray) -> np.ndarray:
        """Host token ids as int64 [N], active rows' checked against the vocabulary, 0 elsewhere."""
        ids = np.asarray(tokens.reshape(-1).tolist() if isinstance(tokens, torch.Tensor) else tokens,
                         dtype=np.int64).reshape(-1)
        if ids.shape[0] != self.num_rows:
            raise ValueError(f"got {ids.shape[0]} tokens for {self.num_rows} rows; pass one per row.")
        bad = np.flatnonzero(act & ((ids < 0) | (ids >= self.vocab_size)))
        if bad.size:
            self._check_ids(int(bad[0]), [int(ids[bad[0]])])
        return np.where(act, ids, 0)

    def _check_token_tensor(self, tokens: torch.Tensor) -> None:
        """Shape and dtype of device tokens (metadata only: nothing is read from the device)."""
        if tokens.numel() != self.num_rows:
            raise ValueError(f"got {tokens.numel()} tokens for {self.num_rows} rows; pass a [{self.num_rows}] tensor.")
        if tokens.dtype == torch.bool or tokens.is_floating_point() or tokens.is_complex():
            raise TypeError(f"tokens is a {tokens.dtype} tensor; pass token ids as an integer tensor "
                            "(torch.long), e.g. logits.argmax(-1).")

    def _capacity_for(self, need: int) -> int:
        """Slots to allocate for ``need``: a multiple of the bucket size, no more than a row can use
        (its context plus the slot a full, inactive row writes)."""
        if self._max_slots is not None:
            need = min(need, self._max_slots)
        return _round_up(max(need, 1), self.bucket_size)

    def _ensure_capacity(self, need: int) -> None:
        """Grow the cache (a reallocation and copy: rare) when it has fewer than ``need`` slots; by
        at least half its size, so growth on demand stays amortised."""
        if need > self._kv.capacity:
            self._kv.resize(self._capacity_for(max(need, self._kv.capacity * 3 // 2)))

    def _attention_mask(self, slots: torch.Tensor, width: int) -> torch.Tensor:
        """The [N, 1, 1, width] mask of a decode forward, built on the device: row r sees slots
        ``0..slots[r]`` (its tokens and the one it writes now; so no row is fully masked)."""
        visible = (self._kv.slot_range(width)[None, :] <= slots[:, None])[:, None, None, :]
        if self._mask_kind == "bool":
            return visible
        zero, lowest = self._mask_fill
        return torch.where(visible, zero, lowest)

    def _forward(
        self, ids: torch.Tensor, attn: torch.Tensor, pos: torch.Tensor, cache: DynamicCache | LengthKVCache
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward; returns float32 last-position logits [B, V] and hidden state [B, D]."""
        self._capturing, self._captured = self.hidden_layer == -1, None
        try:
            out = self.model(
                input_ids=ids,
                attention_mask=attn,
                position_ids=pos,
                **cache_kwargs(self.model, cache),
                use_cache=True,
                logits_to_keep=1,
                output_hidden_states=self.hidden_layer != -1,
            )
        finally:
            self._capturing = False
        captured, self._captured = self._captured, None
        if self.hidden_layer == -1:
            if captured is None:
                raise RuntimeError(
                    f"{type(self.model).__name__} did not call its output embeddings module; "
                    f"pass hidden_layer={self.config.num_hidden_layers} to read hidden_states."
                )
            hidden = captured[:, -1]
        else:
            hidden = out.hidden_states[self.hidden_layer][:, -1]
        return out.logits[:, -1].float(), hidden.float()
