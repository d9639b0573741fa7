"""Decoding baselines (greedy, top-k, nucleus, best-of-n) and the generation primitives they share.

Every decoder implements the `agents.base.Decoder` protocol (prompts in, `Generation`s out) on a
frozen causal LM loaded like any other (hub name, local directory or loaded model), so a base LM
and an RRHF-tuned LM are decoded the same way:

    >>> dec = GreedyDecoder(world.lm_dir)
    >>> dec.generate(prompts, max_new_tokens=40)
    >>> bon = BestOfNDecoder(world.lm_dir, reward=world.rm_dir, n=16)   # Proxy-RLHF's BON-n

Conventions (the same as the envs'): prompts are encoded by `llm_envs.chat.encode_prompt` (with the
tokenizer's own special tokens, except for a prompt rendered by a chat tokenizer's template, which
holds them already), responses are the new tokens up to and including the first EOS (a chat
tokenizer's EOS is its template's end-of-turn token), with padding removed; `response_text` is decoded with `skip_special_tokens=True`. `lm_forwards` counts
the forwards that computed something for the response (prefill = 1, then one per further token:
the number of generated tokens); `rm_calls` counts reward-model scorings spent choosing it.

`generate_responses` (HF `generate`: greedy, sampling, beam search) and `diverse_beam_search`
(Vijayakumar et al. 2018, Hamming diversity; HF moved its own to a hub repo that cannot be
reached offline) are what RRHF's sampling stage uses too.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from agents.base import Generation
from llm_envs.chat import encode_prompt
from llm_envs.models import (
    ModelSpec,
    cache_kwargs,
    context_length,
    load_causal_lm,
    model_source_name,
    output_cache,
    resolve_tokenizer,
)
from llm_envs.rewards import RewardWrapper

__all__ = [
    "BestOfNDecoder",
    "DECODERS",
    "GreedyDecoder",
    "HFDecoder",
    "NucleusDecoder",
    "TopKDecoder",
    "best_index",
    "candidate_seed",
    "diverse_beam_search",
    "encode_prompts",
    "generate_responses",
    "make_decoder",
]


# ---------------------------------------------------------------------------- primitives


def encode_prompts(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str]) -> list[list[int]]:
    """Token ids of each prompt, encoded as the envs encode them (`llm_envs.chat.encode_prompt`)."""
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise TypeError(f"prompts must be a list of strings, got {type(prompts).__name__}: {str(prompts)[:80]!r}.")
    rows = []
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"prompts[{i}]={prompt!r} is empty or not a string; pass non-empty prompt strings.")
        ids = encode_prompt(tokenizer, prompt)
        if not ids:
            raise ValueError(f"prompts[{i}]={prompt!r} encodes to no tokens; pass a prompt the tokenizer knows.")
        rows.append(ids)
    return rows


def check_context(model: PreTrainedModel, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int) -> None:
    """Raise a clear error when a prompt plus `max_new_tokens` exceeds the model's context."""
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r}; expected a positive integer.")
    limit = context_length(model)
    if limit is None:
        return
    for i, ids in enumerate(prompt_ids):
        if len(ids) + max_new_tokens > limit:
            raise ValueError(
                f"prompt {i} has {len(ids)} tokens; with max_new_tokens={max_new_tokens} that is "
                f"{len(ids) + max_new_tokens} > the model's context of {limit} tokens. Use a shorter prompt "
                f"or max_new_tokens <= {limit - len(ids)}."
            )


def _left_pad(rows: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(list(row), dtype=torch.long)
        mask[i, width - len(row) :] = 1
    return ids.to(device), mask.to(device)


def _pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no pad or EOS token; set tokenizer.pad_token.")
    return int(pad)


def _cut_response(ids: Sequence[int], eos: int | None, pad: int) -> list[int]:
    """New tokens up to and including the first EOS, padding removed."""
    out: list[int] = []
    for token in ids:
        token = int(token)
        if token == eos:
            out.append(token)
            break
        if token != pad:
            out.append(token)
    return out


@contextlib.contextmanager
def _seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    """Seed torch's RNGs for a block without disturbing the caller's RNG state."""
    if seed is None:
        yield
        return
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


@torch.inference_mode()
def generate_responses(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    num_return_sequences: int = 1,
    batch_size: int = 64,
    seed: int | None = None,
    **generate_kwargs: Any,
) -> list[list[list[int]]]:
    """HF `generate` over prompts in batches: `[prompt][sequence] -> response ids` (EOS included).

    `generate_kwargs` select the strategy, e.g. `do_sample=False` (greedy), `do_sample=True,
    top_k=0, top_p=0.9` (nucleus), `num_beams=4` (beam search; set num_return_sequences <= num_beams).
    `batch_size` counts rows (prompts x sequences) per `generate` call. Batch b is seeded with
    `seed + b`, so a run is reproducible for a fixed `batch_size`.
    """
    check_context(model, prompt_ids, max_new_tokens)
    pad, eos = _pad_id(tokenizer), tokenizer.eos_token_id
    per_call = max(1, batch_size // num_return_sequences)
    out: list[list[list[int]]] = []
    for b, start in enumerate(range(0, len(prompt_ids), per_call)):
        chunk = prompt_ids[start : start + per_call]
        ids, mask = _left_pad(chunk, pad, model.device)
        with _seeded(None if seed is None else seed + b, model.device):
            generated = model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                num_return_sequences=num_return_sequences, pad_token_id=pad, eos_token_id=eos,
                **generate_kwargs,
            )
        new = generated[:, ids.shape[1] :].tolist()
        for i in range(len(chunk)):
            rows = new[i * num_return_sequences : (i + 1) * num_return_sequences]
            out.append([_cut_response(r, eos, pad) for r in rows])
    return out


@torch.inference_mode()
def diverse_beam_search(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    num_beams: int = 4,
    num_beam_groups: int = 4,
    diversity_penalty: float = 1.0,
    length_penalty: float = 1.0,
    batch_size: int = 16,
) -> list[list[list[int]]]:
    """Diverse (group) beam search with Hamming diversity: `[prompt][num_beams] -> response ids`.

    The beams are split into `num_beam_groups` groups of `num_beams // num_beam_groups`; each step,
    group g runs beam search on `log p - diversity_penalty * (times earlier groups picked the token
    at this step)`, as in HF's former group beam search (Vijayakumar et al. 2018). Each group returns
    its best beams (score = summed penalised log-prob / length ** length_penalty), groups in order.
    One batched forward per step for all beams (KV cache reordered by beam parent). `batch_size`
    counts prompts per search.
    """
    if num_beams < 1 or num_beam_groups < 1 or num_beams % num_beam_groups:
        raise ValueError(
            f"num_beams={num_beams}, num_beam_groups={num_beam_groups}: num_beams must be a positive "
            "multiple of num_beam_groups (the paper's DP setting is 4 and 4)."
        )
    check_context(model, prompt_ids, max_new_tokens)
    pad, eos = _pad_id(tokenizer), tokenizer.eos_token_id
    out: list[list[list[int]]] = []
    for start in range(0, len(prompt_ids), batch_size):
        chunk = prompt_ids[start : start + batch_size]
        out += _diverse_beam_chunk(model, chunk, pad, eos, max_new_tokens, num_beams, num_beam_groups,
                                   diversity_penalty, length_penalty)
    return out


def _diverse_beam_chunk(
    model: PreTrainedModel, chunk: Sequence[Sequence[int]], pad: int, eos: int | None, max_new_tokens: int,
    num_beams: int, groups: int, penalty: float, length_penalty: float,
) -> list[list[list[int]]]:
    q_count, size = len(chunk), num_beams // groups
    device = model.device
    ids, mask = _left_pad(chunk, pad, device)
    ids, mask = ids.repeat_interleave(num_beams, 0), mask.repeat_interleave(num_beams, 0)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    output = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
    cache, logits = output_cache(output), output.logits[:, -1]
    next_position = positions[:, -1] + 1
    beam_scores = torch.zeros(q_count, num_beams, device=device)
    beam_scores.view(q_count, groups, size)[:, :, 1:] = -1e9  # at first, one live beam per group
    history = torch.zeros(q_count * num_beams, 0, dtype=torch.long, device=device)
    finished: list[list[list[tuple[float, list[int]]]]] = [[[] for _ in range(groups)] for _ in range(q_count)]
    done = [[False] * groups for _ in range(q_count)]

    def add(q: int, g: int, tokens: list[int], score: float) -> None:
        hyps = finished[q][g]
        hyps.append((score / max(1, len(tokens)) ** length_penalty, tokens))
        hyps.sort(key=lambda h: -h[0])
        del hyps[size:]

    for step in range(max_new_tokens):
        logp = torch.log_softmax(logits.float(), dim=-1).view(q_count, num_beams, -1)
        vocab = logp.shape[-1]
        chosen = torch.full((q_count, num_beams), pad, dtype=torch.long)
        parent = torch.arange(num_beams).repeat(q_count, 1)
        new_scores = beam_scores.clone().cpu()
        counts = torch.zeros(q_count, vocab, device=device)
        for g in range(groups):
            group = slice(g * size, (g + 1) * size)
            scores = logp[:, group] - penalty * counts[:, None, :] + beam_scores[:, group, None]
            top_scores, top_index = scores.reshape(q_count, -1).topk(2 * size, dim=-1)
            top_scores, top_index = top_scores.cpu().tolist(), top_index.cpu().tolist()
            for q in range(q_count):
                if done[q][g]:
                    continue
                kept = 0
                for rank, (score, index) in enumerate(zip(top_scores[q], top_index[q])):
                    source, token = g * size + index // vocab, index % vocab
                    if token == eos:
                        if rank < size:
                            add(q, g, history[q * num_beams + source].tolist() + [token], score)
                        continue
                    chosen[q, g * size + kept], parent[q, g * size + kept] = token, source
                    new_scores[q, g * size + kept] = score
                    kept += 1
                    if kept == size:
                        break
                hyps = finished[q][g]
                best_live = new_scores[q, g * size].item() / (step + 1) ** length_penalty
                if len(hyps) == size and hyps[-1][0] >= best_live:
                    done[q][g] = True
                else:
                    counts[q].index_add_(0, chosen[q, group].to(device), torch.ones(size, device=device))
        rows = (parent + torch.arange(q_count)[:, None] * num_beams).reshape(-1).to(device)
        history = torch.cat([history[rows], chosen.reshape(-1, 1).to(device)], dim=1)
        beam_scores = new_scores.to(device)
        if all(all(d) for d in done) or step == max_new_tokens - 1:
            break
        cache.reorder_cache(rows)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        output = model(input_ids=chosen.reshape(-1, 1).to(device), attention_mask=mask,
                       position_ids=next_position[:, None], **cache_kwargs(model, cache), use_cache=True)
        cache, logits = output_cache(output), output.logits[:, -1]
        next_position = next_position + 1

    results = []
    for q in range(q_count):
        responses: list[list[int]] = []
        for g in range(groups):
            if not done[q][g]:  # ran out of tokens: live beams compete with the finished ones
                for j in range(size):
                    row = q * num_beams + g * size + j
                    add(q, g, history[row].tolist(), beam_scores[q, g * size + j].item())
            responses += [_cut_response(tokens, eos, pad) for _, tokens in finished[q][g]]
        results.append(responses)
    return results


# ---------------------------------------------------------------------------- decoders


class HFDecoder:
    """A `Decoder` on a frozen causal LM decoded with HF `generate` (subclasses set the strategy)."""

    name = "hf"

    def __init__(
        self,
        lm: ModelSpec,
        tokenizer: PreTrainedTokenizerBase | str | os.PathLike | None = None,
        *,
        device: str | torch.device | None = "auto",
        dtype: str | torch.dtype | None = "auto",
        batch_size: int = 64,
        name: str | None = None,
    ) -> None:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r}; expected a positive integer (rows per generate call).")
        self.model = load_causal_lm(lm, device=device, dtype=dtype)
        self.tokenizer = resolve_tokenizer(tokenizer, lm, self.model)
        self.batch_size = batch_size
        if name is not None:
            self.name = name

    def generation_kwargs(self) -> dict[str, Any]:
        return {"do_sample": False, "num_beams": 1}

    def _sample(self, prompt_ids: list[list[int]], num: int, max_new_tokens: int, seed: int | None
                ) -> list[list[list[int]]]:
        return generate_responses(self.model, self.tokenizer, prompt_ids, max_new_tokens=max_new_tokens,
                                  num_return_sequences=num, batch_size=self.batch_size, seed=seed,
                                  **self.generation_kwargs())

    def _generation(self, prompt: str, ids: list[int], **kw: Any) -> Generation:
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        return Generation(prompt=prompt, response_ids=ids, response_text=text, **kw)

    def generate(
        self, prompts: Sequence[str], *, max_new_tokens: int = 32, seed: int | None = None
    ) -> list[Generation]:
        prompt_ids = encode_prompts(self.tokenizer, prompts)
        responses = self._sample(prompt_ids, 1, max_new_tokens, seed)
        return [self._generation(p, r[0], lm_forwards=max(1, len(r[0]))) for p, r in zip(prompts, responses)]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, lm={model_source_name(self.model)!r})"


class GreedyDecoder(HFDecoder):
    """Argmax decoding: the floor every method must beat."""

    name = "greedy"


def _check_temperature(temperature: float) -> float:
    if not temperature > 0:
        raise ValueError(f"temperature={temperature!r}; expected a number > 0.")
    return float(temperature)


class TopKDecoder(HFDecoder):
    """Sampling from the k most probable tokens (softmax(logits / temperature) renormalised)."""

    def __init__(self, lm: ModelSpec, tokenizer: Any = None, *, top_k: int = 50, temperature: float = 1.0,
                 **kw: Any) -> None:
        if not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k={top_k!r}; expected a positive integer.")
        self.top_k, self.temperature = top_k, _check_temperature(temperature)
        kw.setdefault("name", f"top_k{top_k}")
        super().__init__(lm, tokenizer, **kw)

    def generation_kwargs(self) -> dict[str, Any]:
        return {"do_sample": True, "top_k": self.top_k, "top_p": 1.0, "temperature": self.temperature}


class NucleusDecoder(HFDecoder):
    """Nucleus (top-p) sampling: the smallest set of tokens whose probability mass reaches top_p."""

    def __init__(self, lm: ModelSpec, tokenizer: Any = None, *, top_p: float = 0.9, temperature: float = 1.0,
                 **kw: Any) -> None:
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p={top_p!r}; expected a number in (0, 1].")
        self.top_p, self.temperature = float(top_p), _check_temperature(temperature)
        kw.setdefault("name", f"nucleus{top_p:g}")
        super().__init__(lm, tokenizer, **kw)

    def generation_kwargs(self) -> dict[str, Any]:
        return {"do_sample": True, "top_k": 0, "top_p": self.top_p, "temperature": self.temperature}


def candidate_seed(seed: int, j: int) -> int:
    """The seed of best-of-n's candidate j: `seed` itself for j = 0 (the nucleus sample), else a 32-bit
    hash of (seed, j). Not `seed + j * stride`: torch's CPU generator keeps only the low 32 bits of a
    seed, and small offsets would collide with the seeds `generate_responses` gives later batches."""
    if j == 0:
        return seed
    return int(np.random.SeedSequence([seed & (2**64 - 1), j]).generate_state(1)[0])


def best_index(rewards: Sequence[float]) -> int:
    """The candidate best-of-n keeps: the highest reward, the first one on ties."""
    return max(range(len(rewards)), key=lambda j: (rewards[j], -j))


class BestOfNDecoder(NucleusDecoder):
    """Best-of-n: n nucleus samples per prompt, scored by the reward wrapper; the best is kept.

    `reward` is anything `RewardWrapper.build` accepts (a wrapper, an RM directory or hub name, a
    function). Costs: `lm_forwards` sums the n samples' forwards, `rm_calls` = n. `extra` holds the
    candidates' rewards and which one was picked (the first best on ties); with
    `keep_candidates=True` also every candidate's ids (`candidate_ids`), for studies over n.

    With a seed the candidates are nested: candidate j is drawn on its own with seed
    `candidate_seed(seed, j)`, so candidate 0 is exactly the `NucleusDecoder` sample (same
    top_p, temperature, batch_size and seed) and best-of-k's candidates are the first k of best-of-n's
    for every k < n: one draw of the largest n serves every smaller n.
    """

    def __init__(self, lm: ModelSpec, tokenizer: Any = None, *, reward: Any, n: int = 16, top_p: float = 1.0,
                 temperature: float = 1.0, keep_candidates: bool = False, **kw: Any) -> None:
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n={n!r}; expected a positive integer (16 and 32 are the usual settings).")
        self.n, self.keep_candidates = n, bool(keep_candidates)
        kw.setdefault("name", f"best_of_{n}")
        super().__init__(lm, tokenizer, top_p=top_p, temperature=temperature, **kw)
        # The RM gets the LM's device and dtype (its score head computes in float32 either way).
        device, dtype = kw.get("device", "auto"), kw.get("dtype", "auto")
        self.reward = RewardWrapper.build(reward, lm_tokenizer=self.tokenizer, device=device, dtype=dtype)

    def candidates(self, prompt_ids: list[list[int]], max_new_tokens: int, seed: int | None
                   ) -> list[list[list[int]]]:
        """`[prompt][j] -> ids` of the n nucleus samples, one seeded draw per j (see the class docstring)."""
        draws = [self._sample(prompt_ids, 1, max_new_tokens, None if seed is None else candidate_seed(seed, j))
                 for j in range(self.n)]
        return [[draw[i][0] for draw in draws] for i in range(len(prompt_ids))]

    def generate(
        self, prompts: Sequence[str], *, max_new_tokens: int = 32, seed: int | None = None
    ) -> list[Generation]:
        prompt_ids = encode_prompts(self.tokenizer, prompts)
        samples = self.candidates(prompt_ids, max_new_tokens, seed)
        flat_prompts = [p for p, rows in zip(prompt_ids, samples) for _ in rows]
        flat = [r for rows in samples for r in rows]
        scores = self.reward.score_ids(flat_prompts, flat, self.tokenizer)
        out = []
        for i, (prompt, rows) in enumerate(zip(prompts, samples)):
            mine = scores[i * self.n : (i + 1) * self.n]
            best = best_index(mine)
            extra: dict[str, Any] = {"candidate_rewards": mine, "picked": best, "reward": mine[best]}
            if self.keep_candidates:
                extra["candidate_ids"] = rows
            out.append(self._generation(prompt, rows[best], lm_forwards=sum(max(1, len(r)) for r in rows),
                                        rm_calls=self.n, extra=extra))
        return out


DECODERS: dict[str, type[HFDecoder]] = {
    "greedy": GreedyDecoder,
    "top_k": TopKDecoder,
    "nucleus": NucleusDecoder,
    "best_of_n": BestOfNDecoder,
}


def make_decoder(kind: str, lm: ModelSpec, **kw: Any) -> HFDecoder:
    """A decoder by name: "greedy", "top_k", "nucleus", "best_of_n", or "best_of_16" / "best_of_32"
    (best-of-n with that n; pass `reward=`). Keywords go to the decoder's constructor."""
    if kind.startswith("best_of_") and kind[len("best_of_"):].isdigit():
        kw.setdefault("n", int(kind[len("best_of_"):]))
        kind = "best_of_n"
    if kind not in DECODERS:
        import difflib

        close = difflib.get_close_matches(kind, [*DECODERS, "best_of_16", "best_of_32"], n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(
            f"decoder {kind!r} is unknown; expected one of {sorted(DECODERS)} or best_of_<n>.{hint}"
        )
    return DECODERS[kind](lm, **kw)
