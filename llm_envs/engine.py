"""Batched, KV-cached single-token decoding over a frozen Hugging Face causal LM.

The RL environments keep N rows (one per env) that advance one token at a time, reject
candidates, and reset at different moments. This engine serves all of them with at most one
batched forward per env step, and it knows only token ids: candidate pools, masks and rewards
live in the envs.

Cache layout (why it is built this way): transformers' `DynamicCache` can only crop every row
at once, so a per-row rollback is done with masking instead of deletion, on the append-only
`llm_envs.kv_cache.SlotKVCache` (a [N, L] visibility mask over physical slots, explicit per-row
``position_ids``, compaction when hidden slots pile up; its docstring has the details).

* ``append`` feeds one token per row into a new slot; ``drop_last`` hides a row's last slot.
* ``reset_rows`` prefills the new prompts in their own left-padded batch (fresh cache), then
  splices that K/V into slots ``[0, P)`` of those rows (growing ``L`` when ``P > L``) and
  hides the rest of the row.
* Compaction runs before a forward whenever the physical length exceeds the longest visible row
  by more than ``compact_slack``.

The result equals a fresh no-cache forward of each row's visible sequence to float rounding
(~1e-6 in float32), for learned-position (GPT-2) and rotary (Llama) models, eager and sdpa.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache, PreTrainedModel

from llm_envs.kv_cache import SlotKVCache
from llm_envs.models import cache_kwargs, context_length, enable_tf32

__all__ = ["DecodeEngine", "NonFiniteLogitsError", "StepOutput"]


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
    any softmax, top-k or sort. The logits are checked finite (`NonFiniteLogitsError`).
    """

    logits: torch.Tensor  # [B, V] float32
    hidden: torch.Tensor  # [B, D] float32


def _as_int_list(values: Sequence[int] | torch.Tensor) -> list[int]:
    if isinstance(values, torch.Tensor):
        return [int(v) for v in values.reshape(-1).tolist()]
    return [int(v) for v in values]


def _length_groups(lengths: list[int], overhead_tokens: float) -> list[list[int]]:
    """Split prompts (indices into `lengths`) into at most two left-padded prefill batches.

    Padding is computed like real tokens, so a batch of mixed lengths wastes work; a second
    forward pays off when the padding it saves outweighs a forward's fixed cost, expressed as
    `overhead_tokens` (large for a tiny model, where dispatch dominates; < 1 for a 100M one).
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
class _Prefill:
    """A prefill forward not yet spliced into the shared cache (see `DecodeEngine.reset_rows`)."""

    rows: list[int]
    prompts: list[list[int]]
    cache: DynamicCache
    attn: torch.Tensor
    logits: torch.Tensor
    hidden: torch.Tensor


def _check_finite_logits(logits: torch.Tensor, rows: list[int], model: torch.nn.Module) -> None:
    """Raise `NonFiniteLogitsError` naming the rows whose logits hold NaN, +inf, or no finite value.

    Cheap on the hot path: one max-reduction over [B, V] (NaN and +inf propagate through the max,
    and a row of only -inf has max -inf; a -inf entry alone is a legitimately banned token) and
    one host sync for the verdict; the per-row diagnosis runs only when it fails.
    """
    bad = ~torch.isfinite(logits.amax(dim=-1))
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


class DecodeEngine:
    """N independent decoding rows over one frozen causal LM, one batched forward per step.

    Typical use: ``reset_rows`` a row with its prompt; each step ``append`` one token per row
    (a candidate, tentatively); ``drop_last`` the rows whose candidate was rejected. Logits and
    hidden states always match a fresh forward of the row's visible tokens (``tokens(row)``).
    """

    def __init__(
        self,
        model: PreTrainedModel,
        num_rows: int,
        *,
        hidden_layer: int = -1,
        compact_slack: int = 32,
    ) -> None:
        """Wrap ``model`` (put in eval mode) for ``num_rows`` rows.

        ``hidden_layer`` indexes ``output_hidden_states`` (0 = embeddings, -1 = after the final
        norm, the default, which is read from the LM head's input at no extra cost).
        ``compact_slack`` is how many hidden slots beyond the longest row are tolerated before
        the cache is compacted: larger = fewer gathers, more memory.
        """
        self._kv = SlotKVCache(model, num_rows, compact_slack=compact_slack)  # validates both numbers
        self.model = model.eval()
        self.config = model.config.get_text_config(decoder=True)
        self.num_rows = num_rows
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
        self._prompt_len = [0] * num_rows
        self._row_forwards = [0] * num_rows
        self.forward_calls = 0  # batched forwards, prefill included
        self.tokens_forwarded = 0  # token positions computed (padding and inactive rows included)
        # A forward's fixed cost (Python, dispatch: ~1 ms on CPU) in token positions of this model
        # (~2 FLOPs per parameter per token at ~20 GFLOP/s): whether splitting a prefill pays off.
        params = sum(p.numel() for p in model.parameters())
        self._prefill_overhead_tokens = 1e-3 * 20e9 / (2.0 * params)

    # ------------------------------------------------------------------ per-row state
    def tokens(self, row: int) -> list[int]:
        """The row's visible token ids (prompt + kept tokens): what a fresh forward would see."""
        return self._kv.tokens(row)

    def next_position(self, row: int) -> int:
        """Position id the row's next token gets (= its number of visible tokens)."""
        return self._kv.num_tokens(row)

    def prompt_length(self, row: int) -> int:
        """Length of the prompt the row was last reset with (0 if never reset)."""
        return self._prompt_len[row]

    def row_forwards(self, row: int) -> int:
        """Forwards that computed something for this row since its last reset (prefill = 1)."""
        return self._row_forwards[row]

    @property
    def cache_length(self) -> int:
        """Physical slots per row in the cache (visible + hidden)."""
        return self._kv.length

    @property
    def compact_slack(self) -> int:
        """Hidden slots tolerated beyond the longest row before the cache is compacted."""
        return self._kv.compact_slack

    @property
    def compactions(self) -> int:
        """How many times the cache was compacted."""
        return self._kv.compactions

    # ------------------------------------------------------------------ operations
    @torch.inference_mode()
    def reset_rows(
        self, rows: Sequence[int], prompt_ids: Sequence[Sequence[int] | torch.Tensor]
    ) -> StepOutput:
        """Replace what ``rows`` hold with new prompts, prefilled in one batched forward.

        Returns, in the order of ``rows``, the logits and hidden state at each prompt's last
        token. Other rows are untouched. Non-finite logits raise `NonFiniteLogitsError` naming
        the rows, before any row is replaced.
        """
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
        order, prefills = [], []
        for group in _length_groups([len(p) for p in prompts], self._prefill_overhead_tokens):
            prefills.append(self._prefill_forward([rows[i] for i in group], [prompts[i] for i in group]))
            order += group
        logits, hidden = (torch.cat([pf.logits for pf in prefills]), torch.cat([pf.hidden for pf in prefills]))
        # Checked before anything is spliced: a non-finite prefill leaves every row as it was.
        _check_finite_logits(logits, [rows[i] for i in order], self.model)
        if len(rows) == self.num_rows:
            # Every row starts over: drop the old cache, so the layout (and with it the float
            # rounding of attention sums) depends only on the new prompts. This makes a single
            # env bit-for-bit reproducible across resets with the same seed.
            self._kv.clear()
        for pf in prefills:
            self._splice(pf)
        if len(prefills) > 1:  # back to the caller's row order
            back = torch.empty(len(order), dtype=torch.long)
            back[torch.tensor(order)] = torch.arange(len(order))
            logits, hidden = logits[back.to(logits.device)], hidden[back.to(hidden.device)]
        self._kv.maybe_compact()
        return StepOutput(logits, hidden)

    def _prefill_forward(self, rows: list[int], prompts: list[list[int]]) -> _Prefill:
        """One left-padded batched forward of `prompts` in a fresh cache (spliced later, `_splice`)."""
        batch, width = len(rows), max(len(p) for p in prompts)
        ids = torch.zeros(batch, width, dtype=torch.long)
        attn = torch.zeros(batch, width, dtype=torch.bool)
        pos = torch.zeros(batch, width, dtype=torch.long)
        for i, prompt in enumerate(prompts):  # left padding: every prompt ends at slot width-1
            n = len(prompt)
            ids[i, width - n :] = torch.tensor(prompt)
            attn[i, width - n :] = True
            pos[i, width - n :] = torch.arange(n)
        ids, attn, pos = (t.to(self.device) for t in (ids, attn, pos))
        fresh = self._kv.new_cache()
        logits, hidden = self._forward(ids, attn, pos, fresh)
        self.forward_calls += 1
        self.tokens_forwarded += batch * width
        return _Prefill(rows, prompts, fresh, attn, logits, hidden)

    def _splice(self, prefill: _Prefill) -> None:
        """Put a prefilled batch into its rows of the shared cache."""
        self._kv.splice(prefill.rows, prefill.prompts, prefill.cache, prefill.attn)
        for row, prompt in zip(prefill.rows, prefill.prompts):
            self._prompt_len[row] = len(prompt)
            self._row_forwards[row] = 1

    @torch.inference_mode()
    def append(
        self,
        tokens: torch.Tensor | Sequence[int],
        active: torch.Tensor | Sequence[bool] | None = None,
    ) -> StepOutput:
        """Feed one token per row in ONE batched forward; active rows keep it (tentatively).

        Each active row's token gets a new cache slot at its next position; ``drop_last`` undoes
        it. Returns logits [N, V] and hidden [N, D] at the new slot; rows not active get
        meaningless (but finite) outputs and their slot is hidden at once; their token may be
        any placeholder (it is not validated or fed to the model). Non-finite logits raise
        `NonFiniteLogitsError` naming the rows; no row keeps its token then.
        """
        toks = _as_int_list(tokens)
        if len(toks) != self.num_rows:
            raise ValueError(f"got {len(toks)} tokens for {self.num_rows} rows; pass one per row.")
        act = [True] * self.num_rows if active is None else [bool(a) for a in _as_int_list(active)]
        if len(act) != self.num_rows:
            raise ValueError(f"active has {len(act)} entries for {self.num_rows} rows.")
        for row in (r for r in range(self.num_rows) if act[r]):
            if self._prompt_len[row] == 0:
                raise ValueError(f"row {row} has no prompt; call reset_rows([{row}], ...) first.")
            position = self._kv.num_tokens(row)
            if self.max_context is not None and position >= self.max_context:
                raise ValueError(
                    f"row {row}: appending a token at position {position} exceeds the model's maximum "
                    f"context of {self.max_context} positions (prompt {self._prompt_len[row]} + "
                    f"{position - self._prompt_len[row]} kept tokens); end the episode earlier (cap "
                    "max_new_tokens at context minus prompt length) or use shorter prompts."
                )
            self._check_ids(row, [toks[row]])
        self._kv.maybe_compact()
        ids = torch.tensor([[t if a else 0] for t, a in zip(toks, act)], device=self.device)
        positions = [[self._kv.num_tokens(r) if a else 0] for r, a in enumerate(act)]
        pos = torch.tensor(positions, device=self.device)
        # Inactive rows see their new slot during this forward (see SlotKVCache.attention_mask);
        # it is hidden after.
        logits, hidden = self._forward(ids, self._kv.attention_mask(1), pos, self._kv.cache)
        kept = {row: (0, [toks[row]]) for row in range(self.num_rows) if act[row]}
        try:
            _check_finite_logits(logits, list(range(self.num_rows)), self.model)
        except NonFiniteLogitsError:
            self._kv.extend(1, {})  # the forward wrote a slot to every row: account for it, hidden
            raise
        self._kv.extend(1, kept)
        for row in kept:
            self._row_forwards[row] += 1
        self.forward_calls += 1
        self.tokens_forwarded += self.num_rows
        return StepOutput(logits, hidden)

    @torch.inference_mode()
    def drop_last(self, rows: Sequence[int]) -> None:
        """Hide each row's most recent kept token (a rejected candidate); no forward needed.

        Later forwards behave exactly as if that token was never there and the row's next
        position goes back by one. A row listed twice drops two tokens. Prompt tokens cannot be
        dropped (reset the row instead).
        """
        rows = _as_int_list(rows)
        remaining = {row: self._kv.num_tokens(row) for row in rows if 0 <= row < self.num_rows}
        for row in rows:  # validate every row (a row listed twice drops two) before any moves
            self._check_row(row)
            if remaining[row] <= self._prompt_len[row]:
                raise ValueError(
                    f"row {row} holds only its prompt ({self._prompt_len[row]} tokens); there is "
                    "no appended token to drop. Use reset_rows to replace the prompt."
                )
            remaining[row] -= 1
        self._kv.pop(rows)

    def compact(self) -> None:
        """Gather each row's visible slots to the front; the cache shrinks to the longest row."""
        self._kv.compact()

    # ------------------------------------------------------------------ internals
    def _check_row(self, row: int) -> None:
        if not 0 <= row < self.num_rows:
            raise ValueError(
                f"row {row} is out of range; this engine has rows 0..{self.num_rows - 1}."
            )

    def _check_ids(self, row: int, ids: list[int]) -> None:
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(
                f"row {row}: token id {bad[0]} is outside the model's vocabulary "
                f"[0, {self.vocab_size}); check that the tokenizer matches the model."
            )

    def _forward(
        self, ids: torch.Tensor, attn: torch.Tensor, pos: torch.Tensor, cache: DynamicCache
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward; returns float32 last-position logits [B, V] and hidden state [B, D]."""
        captured: list[torch.Tensor] = []
        hook = None
        if self.hidden_layer == -1:  # the LM head's input is the final normed hidden state
            hook = self._head.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
        try:
            out = self.model(
                input_ids=ids,
                attention_mask=attn.long(),
                position_ids=pos,
                **cache_kwargs(self.model, cache),
                use_cache=True,
                logits_to_keep=1,
                output_hidden_states=self.hidden_layer != -1,
            )
        finally:
            if hook is not None:
                hook.remove()
        if hook is not None:
            if not captured:
                raise RuntimeError(
                    f"{type(self.model).__name__} did not call its output embeddings module; "
                    f"pass hidden_layer={self.config.num_hidden_layers} to read hidden_states."
                )
            hidden = captured[-1][:, -1]
        else:
            hidden = out.hidden_states[self.hidden_layer][:, -1]
        return out.logits[:, -1].float(), hidden.float()
