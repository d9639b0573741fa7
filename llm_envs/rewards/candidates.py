"""Candidate scoring for reward-guided decoding (TokenChoice, ARGS).

`CandidateScorer` scores k candidate next tokens after each of N growing prefixes in one
reward-model forward per call, keeping the reward model's KV cache of every prefix between
calls: ``CandidateScorer(wrapper, num_rows, lm_tokenizer)``; `score_candidates` is the one-shot
form. It stands on the reward wrapper's public seams and on `llm_envs.length_cache.LengthKVCache`;
the wrapper module does not know it (dependencies: text <- wrapper <- candidates).

Whether the prefix cache gave the same scores as scoring from scratch is checked once per
wrapper, on its first cached call; the verdict is kept here (`prefix_cache_verdict`), keyed
weakly by wrapper, so every scorer of a wrapper shares it.
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from llm_envs.length_cache import LengthKVCache, to_device
from llm_envs.models import cache_kwargs
from llm_envs.rewards.text import (
    as_id_rows,
    response_content_ids,
    response_special_ids,
    special_template,
    strip_template,
)
from llm_envs.rewards.wrapper import RewardWrapper
from llm_envs.score_model import ScoreModel

__all__ = ["CandidateScorer", "Scoring", "prefix_cache_verdict", "score_candidates"]

Scoring = Literal["wrapper", "raw"]

# Per wrapper: True once the prefix cache's scores were checked against scoring from scratch,
# False when they disagreed (the cache is then never used for that wrapper); absent = unchecked.
_verdicts: weakref.WeakKeyDictionary[RewardWrapper, bool] = weakref.WeakKeyDictionary()


def prefix_cache_verdict(wrapper: RewardWrapper) -> bool | None:
    """Whether the reward-model prefix cache matched scoring from scratch for `wrapper`: True
    (checked, used), False (disagreed, off for good) or None (not checked yet)."""
    return _verdicts.get(wrapper)


def score_candidates(
    wrapper: RewardWrapper,
    prompt_ids: Sequence[Sequence[int]],
    response_ids: Sequence[Sequence[int]],
    candidates: Sequence[Sequence[int]],
    lm_tokenizer: PreTrainedTokenizerBase | None = None,
    *,
    scoring: Scoring = "wrapper",
) -> np.ndarray:
    """Scores [B, k] of `prompt + response + [candidate]` for each row's candidates (LM ids).

    One-shot form of `CandidateScorer`: the shared prefix is still forwarded once per row,
    not once per candidate. See `CandidateScorer.score` for `scoring`.
    """
    scorer = CandidateScorer(wrapper, max(1, len(prompt_ids)), lm_tokenizer)
    return scorer.score(range(len(prompt_ids)), prompt_ids, response_ids, candidates, scoring=scoring)[0]


_BUCKET = 32  # attention runs over a multiple of this many slots: shapes change every 32 tokens, not every one
_NEVER = -(2**62)  # a padding query's limit: no relative slot lies below it (it sees only its own slot)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


class _PrefixKV:
    """The reward model's KV cache of N growing prefixes; scores k candidates per row per forward.

    The rows live in a `LengthKVCache`, as the decode engine's do: row r's prefix is slots
    ``[0, len[r])``, slot j at position j, the lengths exact on the host (`tokens`). One call is ONE
    forward of a *run* per row: the prefix tokens not yet cached ("pending", m of them) followed by
    the k candidates, written at slots ``len[r] .. len[r] + m + k - 1`` (padding fills shorter runs).
    A 4-D attention mask built on the device from (len, m, k) per row makes pending tokens causal
    among themselves and lets each candidate see the row's prefix, the pending tokens and itself only
    (not the other candidates); every candidate sits at position ``len[r] + m``. The score head is
    read at every position, so a candidate's score is the sequence score of prefix + candidate.

    Afterwards the pending tokens are the row's (``len[r] += m``) and candidate j stays tentatively
    at slot ``len[r] + j``. When the next prefix is the old one plus one of them (the chosen token),
    `LengthKVCache.move_slots` copies that slot to slot ``len[r]`` (for all such rows in one call) and
    ``len[r] += 1``, instead of feeding the token again: a decoding step costs one reward-model
    forward of k tokens per row, with no copy of the cache, no hidden slots and no compaction. A row
    left out of a call writes its padding past its tentative slots (``held``), so they survive.

    Scores follow the model's end rule, so they equal a fresh forward of the whole sequence: HF's
    sequence-classification pooling (the last token whose id is not the pad id), or a safe-rlhf score
    model's (`llm_envs.score_model.ScoreModel`: the last token, whatever its id).
    """

    def __init__(self, model: PreTrainedModel | ScoreModel, num_rows: int) -> None:
        self.model, self.base, self.head = model, model.base_model, model.score
        self.cache = LengthKVCache(model, num_rows)  # validates num_rows and the model's cache layers
        self.pad = int(model.config.get_text_config().pad_token_id)
        # The id that pooling skips (its score is the prefix's): HF's pad id; none for a score model.
        self.skip: int | None = None if isinstance(model, ScoreModel) else self.pad
        self.device, self.dtype = model.device, model.dtype
        # The additive mask's two values (0-d, so `torch.where` keeps the model's dtype).
        self._open = torch.zeros((), dtype=self.dtype, device=self.device)
        self._shut = torch.full((), torch.finfo(self.dtype).min, dtype=self.dtype, device=self.device)
        self.num_rows = num_rows
        self.tokens: list[list[int]] = [[] for _ in range(num_rows)]  # ids in slots [0, len[r])
        self.pooled: list[list[float]] = [[] for _ in range(num_rows)]  # score of tokens[: i + 1]
        self.tentative: list[dict[int, tuple[int, float]]] = [{} for _ in range(num_rows)]  # id -> (j, score)
        self.held = [0] * num_rows  # tentative slots past each row's length (candidate j at len + j)
        self.forwards = 0  # reward-model forwards
        self.kept = 0  # candidates kept by moving their slot (not fed again)

    def _sync(self, row: int, prefix: list[int]) -> tuple[list[int], tuple[int, int] | None]:
        """Make the row's cached tokens the longest cached part of `prefix`: returns the rest (pending)
        and, when `prefix` adds one of the row's tentative candidates, the move (from slot, to slot)
        that keeps its K/V (the caller runs every row's move at once)."""
        fed, tentative = self.tokens[row], self.tentative[row]
        self.tentative[row], self.held[row] = {}, 0
        n = len(fed)
        if len(prefix) > n and prefix[n] in tentative and prefix[:n] == fed:  # the chosen candidate
            j, score = tentative[prefix[n]]
            fed.append(prefix[n])
            self._pool(row, prefix[n], score)
            return prefix[n + 1 :], (n + j, n)
        if prefix[:n] != fed:  # diverged (new episode or rollback): keep the common part
            n = next((i for i, (a, b) in enumerate(zip(fed, prefix)) if a != b), min(n, len(prefix)))
            del fed[n:], self.pooled[row][n:]
        return prefix[n:], None

    @torch.inference_mode()
    def forget(self, rows: Sequence[int]) -> None:
        """Drop what `rows` hold; once every row is empty the cache is zeroed (so what a run reads,
        masked slots included, depends only on its own inputs, as with `DecodeEngine.reset_rows`)."""
        for row in rows:
            self._sync(row, [])
        if not any(self.tokens):
            self.cache.clear(self.cache.capacity)

    def _pool(self, row: int, token: int, score: float) -> None:
        """Record the sequence score after the row's newest cached token."""
        pooled = self.pooled[row]  # HF pooling: the last non-pad token (position 0 if none)
        pooled.append(score if token != self.skip or not pooled else pooled[-1])

    @torch.inference_mode()
    def run(
        self, rows: list[int], prefixes: list[list[int]], candidates: list[list[int]]
    ) -> list[tuple[list[float], float]]:
        """Per row: the scores of prefix + [c] for each candidate c, and the prefix's own score."""
        pending, moves = [], []
        for row, prefix in zip(rows, prefixes):
            rest, move = self._sync(row, prefix)
            pending.append(rest)
            if move is not None:
                moves.append((row, *move))
        if moves:
            self._keep(moves)
        if any(pending) or any(candidates):
            scores = self._forward(rows, pending, candidates)
        out = []
        for i, (row, cands) in enumerate(zip(rows, candidates)):
            cand_scores = [self.pooled[row][-1] if c == self.skip else float(scores[i][j]) for j, c in enumerate(cands)]
            out.append((cand_scores, self.pooled[row][-1]))
        return out

    def _keep(self, moves: list[tuple[int, int, int]]) -> None:
        """Keep a tentative candidate per listed row: ``(row, its slot, the row's length)``; one host->device
        copy and one `move_slots` for all rows (the host lengths already count the kept tokens)."""
        rows, sources, targets = to_device(np.array(moves, dtype=np.int64).T.copy(), self.device)
        self.cache.move_slots(rows, sources, targets)
        self.kept += len(moves)

    def _forward(self, rows: list[int], pending: list[list[int]], candidates: list[list[int]]) -> list[list[float]]:
        """One forward of every row's pending tokens and candidates; records the pending tokens' scores and
        the candidates as tentative; returns each listed row's candidate scores."""
        ids, pos, additive = self._inputs(rows, pending, candidates)
        out = self.base(input_ids=ids, attention_mask=additive[:, None], position_ids=pos,
                        **cache_kwargs(self.base, self.cache), use_cache=True)
        self.cache.write_tokens(ids)
        table = self.head(out.last_hidden_state)[..., 0].float().cpu().tolist()  # [N, run]
        self.forwards += 1
        result = []
        for row, pend, cands in zip(rows, pending, candidates):
            scores, m = table[row], len(pend)
            for i, token in enumerate(pend):
                self._pool(row, token, scores[i])
            self.tokens[row].extend(pend)
            self.tentative[row] = {c: (j, scores[m + j]) for j, c in enumerate(cands)}
            self.held[row] = len(cands)
            result.append(scores[m : m + len(cands)])
        return result

    def _inputs(
        self, rows: list[int], pending: list[list[int]], candidates: list[list[int]]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Input ids and position ids [N, run] and the additive 4-D mask [N, run, width] of one forward;
        calls the cache's `begin` (grows it first when the runs do not fit).

        Row r's column q writes slot ``start[r] + q``: a listed row starts at its length (its pending
        tokens at columns ``0 .. m - 1``, its candidates at ``m .. m + k - 1``), a row left out past its
        tentative slots; every other column is padding that sees only its own slot. Built for all rows
        at once on the model's device from ONE host->device copy of the ids and per-row (m, k, start).
        """
        n = self.num_rows
        run = max(len(p) + len(c) for p, c in zip(pending, candidates))
        ids = np.full((n, run), self.pad, dtype=np.int64)
        counts = np.zeros((3, n), dtype=np.int64)  # per row: m, k, start
        counts[2] = [len(t) + held for t, held in zip(self.tokens, self.held)]  # a listed row holds none
        for row, pend, cands in zip(rows, pending, candidates):
            ids[row, : len(pend) + len(cands)] = pend + cands
            counts[:2, row] = len(pend), len(cands)
        need = int(counts[2].max()) + run
        self._ensure_capacity(need)
        width = _round_up(need, _BUCKET)
        packed = to_device(np.concatenate([ids.reshape(-1), counts.reshape(-1)]), self.device)
        ids_d, (m, k, start) = packed[: n * run].view(n, run), packed[n * run :].view(3, n, 1)
        self.cache.begin(start[:, 0], width, run)
        q = self.cache.slot_range(run)
        real = q < m + k  # [N, run]: the column holds a pending token or a candidate
        pos = torch.where(real, start + torch.minimum(q, m), 0)  # candidates all at start + m, padding at 0
        # Query q sees the relative slots (s - start) below its limit (the row's prefix, and the pending
        # tokens up to q for a pending token, all of them for a candidate) and its own slot.
        limit = torch.where(real, torch.minimum(q + 1, m), _NEVER)
        rel = self.cache.slot_range(width) - start  # [N, width]
        allowed = (rel[:, None, :] < limit[:, :, None]) | (rel[:, None, :] == q[None, :, None])
        return ids_d, pos, torch.where(allowed, self._open, self._shut)

    def _ensure_capacity(self, need: int) -> None:
        """Grow the cache (a reallocation and copy: rare) to hold ``need`` slots, by at least half its size,
        to a multiple of the bucket (so a forward's width never depends on how the cache grew)."""
        if need > self.cache.capacity:
            self.cache.resize(_round_up(max(need, self.cache.capacity * 3 // 2), _BUCKET))


class CandidateScorer:
    """Scores k candidate next tokens after each of N (prompt, response) prefixes, batched.

    ``score(rows, prompt_ids, response_ids, candidates)`` returns, for row i and candidate c, the
    reward of ``prompt + response + [c]`` (all LM token ids):

    - ``scoring="wrapper"``: the wrapper's `score_ids` of (prompt, response + [c]), with all its
      conventions (the response ends at EOS, pad/BOS are not content, turn cutting, truncation).
      This is what the envs' terminal reward uses.
    - ``scoring="raw"``: the reward model's score of exactly the ids ``prompt + response + [c]``
      (no cutting), i.e. what the ARGS reference code feeds its reward model. Needs the ids
      path (the RM tokenizer equals the LM's); otherwise text is re-tokenized as for "wrapper".

    Cost: when the reward model is a decoder sequence classifier (GPT-2, Llama, ... with a
    ``score`` head) and the tokenizers match, each call is ONE reward-model forward over the
    rows' new prefix tokens plus their k candidates, reusing the KV cache of every prefix
    (`_PrefixKV`); a chosen candidate's K/V is kept, so a decoding step feeds k tokens per
    row, not the whole sequence. The first such call on a wrapper is checked against scoring
    from scratch; on disagreement (an architecture this trick does not fit) it warns and scores
    from scratch from then on. Rows the cache cannot serve (turn markers in the text, prefixes
    at the RM's length limit, a tokenizer suffix template) and other backends (functions,
    ``template="pair"``, a different RM tokenizer: decoded and re-tokenized) are scored from
    scratch in one extra batched call. The wrapper's ``calls``/``pairs_scored`` count it all.

    A weighted sum (`RewardWrapper.combine`, e.g. reward − cost) is scored by one scorer per term,
    each with its own paths and prefix cache, and the scores are added with the terms' weights.
    """

    def __init__(
        self,
        wrapper: RewardWrapper,
        num_rows: int = 1,
        lm_tokenizer: PreTrainedTokenizerBase | None = None,
        *,
        prefix_cache: bool = True,
    ) -> None:
        if not isinstance(num_rows, int) or num_rows < 1:
            raise ValueError(f"num_rows={num_rows!r}; expected a positive int (one row per prefix).")
        lm_tok = lm_tokenizer if lm_tokenizer is not None else wrapper.lm_tokenizer
        if lm_tok is None:
            raise ValueError("candidate scoring needs the LM's tokenizer: pass lm_tokenizer= here or to the wrapper.")
        self.wrapper, self.num_rows, self.lm_tokenizer = wrapper, num_rows, lm_tok
        self.parts: list[tuple[CandidateScorer, float]] | None = None  # a weighted sum: one scorer per term
        if wrapper.terms is not None:
            self.parts = [(CandidateScorer(t, num_rows, lm_tok, prefix_cache=prefix_cache), w)
                          for t, w in wrapper.terms]
        self.ids_path, why = wrapper.fast_path(lm_tok)
        self.lm_template = special_template(lm_tok) if self.ids_path else None
        self.eos = wrapper.response_end_id(lm_tok)  # the chat template's end of turn on chat prompts
        self.specials = response_special_ids(lm_tok) | ({self.eos} if self.eos is not None else set())
        self._kv: _PrefixKV | None = None
        self.cache_off_reason = why or ("prefix_cache=False" if not prefix_cache else "")
        if self.parts is not None:  # each term's scorer holds its own cache
            self.cache_off_reason = "; ".join(f"term {p.wrapper.name!r}: {p.cache_off_reason}" for p, _ in self.parts
                                              if p.cache_off_reason)
        elif prefix_cache and self.ids_path:
            self._kv = self._make_kv()

    def _make_kv(self) -> _PrefixKV | None:
        model, template = self.wrapper.model, self.wrapper.template_ids
        reasons = [
            (prefix_cache_verdict(self.wrapper) is False, "the prefix cache disagreed with scoring from scratch"),
            (bool(template and template[1]), "the RM tokenizer (or rules.append_eos) appends tokens after the text"),
            (not isinstance(getattr(model, "score", None), torch.nn.Module) or model.base_model is model,
             f"{type(model).__name__} has no `score` head over a base model"),
            (bool(getattr(model.config, "is_encoder_decoder", False)), "the RM is an encoder-decoder"),
        ]
        for failed, reason in reasons:
            if failed:
                self.cache_off_reason = reason
                return None
        try:
            return _PrefixKV(model, self.num_rows)
        except ValueError as exc:
            self.cache_off_reason = str(exc)
            return None

    def forget(self, rows: Sequence[int]) -> None:
        """Drop the cached prefixes of `rows` (a new episode starts there)."""
        for part, _ in self.parts or []:
            part.forget(rows)
        if self._kv is not None:
            self._kv.forget([int(r) for r in rows])

    @property
    def uses_prefix_cache(self) -> bool:
        """Whether candidates are scored on the reward model's prefix cache (every term's, for a weighted sum)."""
        if self.parts is not None:
            return all(part.uses_prefix_cache for part, _ in self.parts)
        return self._kv is not None

    def score(
        self,
        rows: Sequence[int],
        prompt_ids: Sequence[Sequence[int]],
        response_ids: Sequence[Sequence[int]],
        candidates: Sequence[Sequence[int]],
        *,
        scoring: Scoring = "wrapper",
        prefix: bool = False,
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Scores [B, k] (float64) and, with ``prefix=True``, each row's own score R(prompt, response).

        ``rows`` name the cache row of each entry (in [0, num_rows)); a row whose prefix changed
        in any other way than growing (a new episode) is re-synced automatically.
        """
        if self.parts is not None:
            return self._weighted(rows, prompt_ids, response_ids, candidates, scoring, prefix)
        rows = [int(r) for r in rows]
        batch = len(rows)
        prompts = [list(map(int, p)) for p in as_id_rows(prompt_ids)]
        responses = [list(map(int, r)) for r in as_id_rows(response_ids)]
        cands = [list(map(int, c)) for c in as_id_rows(candidates)]
        if not len(prompts) == len(responses) == len(cands) == batch:
            raise ValueError(
                f"score got {batch} rows, {len(prompts)} prompts, {len(responses)} responses and "
                f"{len(cands)} candidate lists; pass one of each per row."
            )
        if scoring not in ("wrapper", "raw"):
            raise ValueError(f"scoring={scoring!r}; expected 'wrapper' (the wrapper's conventions) or 'raw'.")
        bad = [r for r in rows if not 0 <= r < self.num_rows] or ([rows[0]] if len(set(rows)) < batch else [])
        if bad:
            raise ValueError(
                f"row {bad[0]} is out of range or repeated; expected distinct rows in [0, {self.num_rows})."
            )
        k = len(cands[0]) if cands else 0
        if any(len(c) != k for c in cands):
            raise ValueError(f"candidate lists have lengths {[len(c) for c in cands]}; pass the same k for every row.")
        out, pref = np.zeros((batch, k)), np.zeros(batch)
        if not self.ids_path:  # decode and re-tokenize: one batched call
            pairs = [(i, j, responses[i] + [c]) for i in range(batch) for j, c in enumerate(cands[i])]
            pairs += [(i, -1, responses[i]) for i in range(batch)] if prefix else []
            values = self.wrapper.score_ids([prompts[i] for i, _, _ in pairs], [r for _, _, r in pairs],
                                            self.lm_tokenizer)
            for (i, j, _), value in zip(pairs, values):
                if j < 0:
                    pref[i] = value
                else:
                    out[i, j] = value
            return out, (pref if prefix else None)
        if self._kv is not None and prefix_cache_verdict(self.wrapper) is False:  # another scorer found it wrong
            self._kv, self.cache_off_reason = None, "the prefix cache disagreed with scoring from scratch"
        plan = _Plan()
        for i in range(batch):
            if scoring == "raw":
                self._plan_raw(plan, i, prompts[i] + responses[i], cands[i], prefix)
            else:
                self._plan_wrapper(plan, i, prompts[i], responses[i], cands[i], prefix)
        self._execute(plan, rows, out, pref)
        return out, (pref if prefix else None)

    def _weighted(
        self,
        rows: Sequence[int],
        prompt_ids: Sequence[Sequence[int]],
        response_ids: Sequence[Sequence[int]],
        candidates: Sequence[Sequence[int]],
        scoring: Scoring,
        prefix: bool,
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """A weighted sum's scores: each term's scorer on the same rows, added with the terms' weights."""
        assert self.parts is not None
        out: np.ndarray | None = None
        pref: np.ndarray | None = None
        with self.wrapper.counting_terms():
            for part, weight in self.parts:
                values, own = part.score(rows, prompt_ids, response_ids, candidates, scoring=scoring, prefix=prefix)
                out = weight * values if out is None else out + weight * values
                if own is not None:
                    pref = weight * own if pref is None else pref + weight * own
        assert out is not None
        return out, pref

    # ------------------------------------------------------------------ planning
    def _fits(self, seq_len: int) -> bool:
        limit = self.wrapper.max_length
        return self._kv is not None and seq_len >= 1 and (limit is None or seq_len + 1 <= limit)

    def _plan_raw(self, plan: _Plan, i: int, seq: list[int], cands: list[int], prefix: bool) -> None:
        if self._fits(len(seq)):
            plan.kv[i] = (seq, list(enumerate(cands)))
            return
        for j, c in [*enumerate(cands), *([(-1, None)] if prefix else [])]:
            plan.seqs.append((i, j, self.wrapper.fit_to_max_length(seq + ([] if c is None else [c]))))

    def _plan_wrapper(self, plan: _Plan, i: int, p: list[int], r: list[int], cands: list[int], prefix: bool) -> None:
        wrapper, tok = self.wrapper, self.wrapper.tokenizer
        content = strip_template(p, self.lm_template)
        frozen = self.eos is not None and self.eos in r
        body = response_content_ids(r, self.eos, self.specials)
        rules = wrapper.rules
        markers, prefix_rule = rules.turn_markers, rules.strip_prefix
        text = tok.decode(body, skip_special_tokens=False) if (markers or prefix_rule) and not frozen else ""
        if not frozen and markers:
            frozen = rules.marker_cut(text) != text
        if frozen:  # the response is already cut: every continuation scores as the response itself
            plan.pairs.append((i, -2, p, r))
            return
        if prefix_rule and (len(text) < len(prefix_rule) or text.startswith(prefix_rule)):
            # the rules strip the response's start (or a candidate may complete what they strip): scored as text
            plan.pairs += [(i, j, p, r + [c]) for j, c in enumerate(cands)]
            if prefix:
                plan.pairs.append((i, -1, p, r))
            return
        seq = (wrapper.template_ids or ([], []))[0] + content + body
        regular: list[tuple[int, int]] = []
        copies: list[int] = []
        for j, c in enumerate(cands):
            if c in self.specials:
                copies.append(j)  # EOS / pad / BOS are not content: the prefix's own score
            else:
                regular.append((j, c))
        if regular and markers:
            texts = tok.batch_decode([body + [c] for _, c in regular], skip_special_tokens=False)
            cut = {j for (j, _), t in zip(regular, texts) if rules.marker_cut(t) != t}
            plan.pairs += [(i, j, p, r + [c]) for j, c in regular if j in cut]
            regular = [(j, c) for j, c in regular if j not in cut]
        plan.copies[i] = copies
        if self._fits(len(seq)):
            plan.kv[i] = (seq, regular)
            return
        plan.pairs += [(i, j, p, r + [c]) for j, c in regular]
        if copies or prefix:
            plan.pairs.append((i, -1, p, r))

    # ------------------------------------------------------------------ execution
    def _execute(self, plan: _Plan, rows: list[int], out: np.ndarray, pref: np.ndarray) -> None:
        wrapper = self.wrapper
        if plan.kv:
            order = list(plan.kv)
            results = self._kv_scores(order, rows, plan)
            for i, (cand_scores, prefix_score) in zip(order, results):
                for (j, _), value in zip(plan.kv[i][1], cand_scores):
                    out[i, j] = value
                pref[i] = prefix_score
        if plan.seqs:
            values = wrapper.score_model_inputs([s for _, _, s in plan.seqs])
            for (i, j, _), value in zip(plan.seqs, values):
                if j < 0:
                    pref[i] = value
                else:
                    out[i, j] = value
        if plan.pairs:
            values = wrapper.score_ids([p for _, _, p, _ in plan.pairs], [r for _, _, _, r in plan.pairs],
                                       self.lm_tokenizer)
            for (i, j, _, _), value in zip(plan.pairs, values):
                if j == -2:
                    out[i, :], pref[i] = value, value
                elif j == -1:
                    pref[i] = value
                else:
                    out[i, j] = value
        for i, copies in plan.copies.items():
            out[i, copies] = pref[i]

    def _kv_scores(self, order: list[int], rows: list[int], plan: _Plan) -> list[tuple[list[float], float]]:
        """Run the prefix cache for the planned rows; verify against scratch on the wrapper's first use."""
        wrapper, kv = self.wrapper, self._kv
        assert kv is not None
        prefixes = [plan.kv[i][0] for i in order]
        cand_lists = [[c for _, c in plan.kv[i][1]] for i in order]
        try:
            results = kv.run([rows[i] for i in order], prefixes, cand_lists)
        except Exception as exc:  # an architecture the 4-D mask trick does not fit
            return self._disable(f"it failed ({type(exc).__name__}: {exc})", _scratch_inputs(prefixes, cand_lists),
                                 cand_lists)
        wrapper.count_call(sum(len(c) for c in cand_lists))
        if prefix_cache_verdict(wrapper) is None:
            cached = [v for cs, _ in results for v in cs] + [p for _, p in results]
            seqs = _scratch_inputs(prefixes, cand_lists)
            scratch = wrapper.score_model_inputs(seqs)
            tol = 1e-3 if kv.dtype == torch.float32 else 5e-2
            err = max((abs(a - b) / max(1.0, abs(b)) for a, b in zip(cached, scratch)), default=0.0)
            if not err <= tol:
                return self._disable(f"its scores differ from scoring from scratch by {err:.3g}", seqs,
                                     cand_lists, scratch)
            _verdicts[wrapper] = True
        for scores, prefix_score in results:
            if not all(math.isfinite(v) for v in [*scores, prefix_score]):
                raise ValueError(
                    f"reward model {wrapper.name!r} returned a non-finite score ({[*scores, prefix_score]}) for "
                    "a candidate continuation. Check the reward model (e.g. dtype overflow: try dtype='float32')."
                )
        return results

    def _disable(
        self, why: str, seqs: list[list[int]], cand_lists: list[list[int]], scratch: list[float] | None = None
    ) -> list[tuple[list[float], float]]:
        warnings.warn(
            f"the reward model's prefix KV cache is off for {self.wrapper.name!r}: {why}. Candidates are "
            "scored from scratch from now on (same scores, more compute).", RuntimeWarning, stacklevel=4,
        )
        _verdicts[self.wrapper] = False
        self._kv, self.cache_off_reason = None, why
        if scratch is None:
            scratch = self.wrapper.score_model_inputs(seqs)
        n = sum(len(c) for c in cand_lists)
        values, prefix_values = scratch[:n], scratch[n:]
        out, at = [], 0
        for cs, prefix_value in zip(cand_lists, prefix_values):
            out.append((values[at : at + len(cs)], prefix_value))
            at += len(cs)
        return out


def _scratch_inputs(prefixes: list[list[int]], cand_lists: list[list[int]]) -> list[list[int]]:
    """The reward-model inputs that score the prefix cache's work from scratch: every prefix + [candidate],
    then every prefix. Built only when needed (the first-use check, a fallback): n * k copies of a prefix."""
    return [[*p, c] for p, cs in zip(prefixes, cand_lists) for c in cs] + prefixes


class _Plan:
    """How one `CandidateScorer.score` call serves each (row, candidate)."""

    def __init__(self) -> None:
        self.kv: dict[int, tuple[list[int], list[tuple[int, int]]]] = {}  # i -> (RM prefix, [(j, c)])
        self.seqs: list[tuple[int, int, list[int]]] = []  # raw RM inputs from scratch (j = -1: prefix)
        self.pairs: list[tuple[int, int, list[int], list[int]]] = []  # score_ids pairs (-1 prefix, -2 all)
        self.copies: dict[int, list[int]] = {}  # i -> slots that take the prefix's own score
