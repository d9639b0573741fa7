"""The evaluation metrics (SPEC §8): what the harness records per episode and the leaderboard aggregates.

- `mean_ci95`: mean and the half-width of its 95% confidence interval (normal approximation,
  1.96 standard errors; with the suite's 192 prompts Student's t would widen it by < 1%).
- `diversity`: ARGS's metric (Khanov et al. 2024, reference code): for one response,
  `prod_{n=2..4} (1 - rep_n)` with `rep_n = 1 - unique_ngrams / (total_ngrams + 1)` over its words;
  a method's diversity is the mean over its responses (an empty response scores 0, as there). Words are
  ours (`words`: a regex, no download) or NLTK's (`nltk_words`: ``nltk.word_tokenize``, as the reference).
- `coherence`: cosine similarity between the prompt's and the response's sentence embeddings
  (ARGS uses SimCSE's pooler output; here any encoder, mean-pooled over tokens by default, or its pooler
  output / first token, with inputs truncated as SimCSE's tool does: `SentenceEncoder`).
- `win_rate`: share of prompts on which a method's gold score beats the reference's (ties count
  half), the pairwise-judge convention of the papers' GPT-4 win rates.
- `is_irregular`: the paper's appendix C check for small p_t (repeated tokens, runaway text):
  a word repeated back to back, or a 4-gram that occurs twice.
"""

from __future__ import annotations

import math
import re
from typing import Any, Sequence

import numpy as np
import torch

_WORDS = re.compile(r"\w+|[^\w\s]")


def words(text: str) -> list[str]:
    """Words and punctuation marks, like nltk's word_tokenize on plain English (no download)."""
    return _WORDS.findall(text)


_NLTK_FIX = "pip install nltk (or 'llm-envs[protocols]'), then python -m nltk.downloader punkt_tab"


class MissingMetricToolError(OSError):
    """A package or data file a metric needs is not installed (an OSError: what the machine lacks, which the
    command line reports as one line with the fix)."""


def nltk_words(text: str) -> list[str]:
    """``nltk.word_tokenize(text)``: ARGS's diversity words (punkt sentences, then Treebank words). NLTK or its
    ``punkt_tab`` data missing is a `MissingMetricToolError` naming the fix."""
    try:
        import nltk
    except ImportError as error:
        raise MissingMetricToolError(f"diversity_tokenizer='nltk' needs the nltk package: {_NLTK_FIX} (or set "
                           "bench.metrics.diversity_tokenizer=regex, which needs no download).") from error
    try:
        return list(nltk.word_tokenize(text))
    except LookupError as error:
        raise MissingMetricToolError(f"diversity_tokenizer='nltk' needs NLTK's punkt_tab data, which is not installed: "
                           f"{_NLTK_FIX} (offline: copy an nltk_data folder and set NLTK_DATA, or set "
                           "bench.metrics.diversity_tokenizer=regex).") from error


def check_word_tokenizer(tokenizer: str) -> None:
    """Fail now, before any method runs, when `tokenizer` ('regex' | 'nltk') cannot tokenize."""
    if tokenizer == "nltk":
        nltk_words("Check. The data.")
    elif tokenizer != "regex":
        raise ValueError(f"diversity tokenizer {tokenizer!r}; expected 'regex' or 'nltk'.")


def mean_ci95(values: Sequence[float]) -> tuple[float, float]:
    """(mean, half-width of the 95% confidence interval); the half-width is 0 for one value."""
    arr = np.asarray(values, dtype=float)
    if arr.size == 0:
        raise ValueError("mean_ci95 of no values; every method needs at least one episode.")
    half = 1.96 * arr.std(ddof=1) / math.sqrt(arr.size) if arr.size > 1 else 0.0
    return float(arr.mean()), float(half)


def rep_n(tokens: Sequence[str], n: int) -> float:
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return 1.0 - len(set(grams)) / (len(grams) + 1)


def diversity(text: str, tokenizer: str = "regex") -> float:
    """ARGS's diversity of one response, its words by `tokenizer` ('regex': `words`; 'nltk': `nltk_words`)."""
    tokens = nltk_words(text) if tokenizer == "nltk" else words(text)
    return float(np.prod([1.0 - rep_n(tokens, n) for n in (2, 3, 4)]))


def is_irregular(text: str) -> bool:
    tokens = [w.lower() for w in words(text)]
    if any(a == b and a.isalnum() for a, b in zip(tokens, tokens[1:])):
        return True
    grams = [tuple(tokens[i : i + 4]) for i in range(len(tokens) - 3)]
    return len(grams) != len(set(grams))


def win_rate(scores: Sequence[float], reference: Sequence[float]) -> dict[str, float]:
    """Pairwise comparison, prompt by prompt: wins, ties, losses and win rate (ties count half)."""
    if len(scores) != len(reference):
        raise ValueError(f"win rate needs one reference score per prompt: {len(scores)} vs {len(reference)}.")
    a, b = np.asarray(scores, dtype=float), np.asarray(reference, dtype=float)
    wins, ties = int((a > b + 1e-9).sum()), int((np.abs(a - b) <= 1e-9).sum())
    losses = len(a) - wins - ties
    return {"wins": wins, "ties": ties, "losses": losses, "win_rate": (wins + 0.5 * ties) / max(len(a), 1)}


class SentenceEncoder:
    """Sentence embeddings of any HF model (a causal LM's body or a sentence encoder): mean-pooled last hidden
    states (`pooling="mean"`, the default), the pooler output (`"pooler"`: SimCSE's embedding of supervised
    models) or the first token's last hidden state (`"cls"`); inputs truncated to `max_length` tokens."""

    def __init__(self, model: Any, tokenizer: Any, *, batch_size: int = 64, pooling: str = "mean",
                 max_length: int | None = None) -> None:
        if pooling not in ("mean", "cls", "pooler"):
            raise ValueError(f"pooling={pooling!r}; expected 'mean', 'pooler' or 'cls'.")
        if max_length is not None and max_length < 2:
            raise ValueError(f"max_length={max_length!r}; expected an int >= 2 or None.")
        self.model, self.tokenizer, self.batch_size = model.eval(), tokenizer, batch_size
        self.pooling, self.max_length = pooling, max_length
        self.device = next(model.parameters()).device

    @classmethod
    def load(cls, name: str, device: str = "auto", *, pooling: str = "mean",
             max_length: int | None = None) -> SentenceEncoder:
        """An encoder by hub name or directory; with `pooling="pooler"` a checkpoint without pooler weights
        (which would be initialised at random) is refused, naming them."""
        from llm_envs.models import load_encoder, load_tokenizer

        model = load_encoder(name, device=device, refuse_missing=pooling == "pooler")
        return cls(model, load_tokenizer(name, padding_side="right"), pooling=pooling, max_length=max_length)

    @torch.inference_mode()
    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """[len(texts), H] float64. Mean pooling: an empty text embeds to zeros (cosine 0 with anything); the
        other poolings embed every text as the tokenizer encodes it (an empty one as its special tokens alone,
        as SimCSE does)."""
        if self.pooling != "mean":
            return self._embed_first(texts)
        out = np.zeros((len(texts), 0))
        rows: list[np.ndarray] = []
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        limit = {"truncation": True, "max_length": self.max_length} if self.max_length else {}
        for start in range(0, len(texts), self.batch_size):
            ids = [list(self.tokenizer(t, **limit)["input_ids"]) if t.strip() else []
                   for t in texts[start : start + self.batch_size]]
            width = max(1, max(len(i) for i in ids))
            batch = torch.full((len(ids), width), pad, dtype=torch.long)
            mask = torch.zeros(len(ids), width, dtype=torch.long)
            for r, row in enumerate(ids):
                batch[r, : len(row)], mask[r, : len(row)] = torch.tensor(row, dtype=torch.long), 1
            hidden = self.model(input_ids=batch.to(self.device), attention_mask=mask.to(self.device),
                                output_hidden_states=True).hidden_states[-1].float().cpu()
            summed = (hidden * mask[..., None]).sum(1)
            rows.append((summed / mask.sum(1, keepdim=True).clamp(min=1)).double().numpy())
        return np.concatenate(rows) if rows else out

    def _embed_first(self, texts: Sequence[str]) -> np.ndarray:
        """The pooler output (`"pooler"`) or the first token's last hidden state (`"cls"`), batch by batch."""
        rows: list[np.ndarray] = []
        limit = {"truncation": True, "max_length": self.max_length} if self.max_length else {}
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(list(texts[start : start + self.batch_size]), padding=True, padding_side="right",
                                   return_tensors="pt", **limit)
            out = self.model(**{k: v.to(self.device) for k, v in batch.items()})
            if self.pooling == "pooler":
                pooled = getattr(out, "pooler_output", None)
                if pooled is None:
                    raise ValueError(f"coherence pooling 'pooler' needs an encoder with a pooler (BERT-like, as "
                                     f"SimCSE's); {type(self.model).__name__} returns none. Use pooling 'cls' or "
                                     "'mean'.")
            else:
                pooled = out.last_hidden_state[:, 0]
            rows.append(pooled.float().cpu().double().numpy())
        return np.concatenate(rows) if rows else np.zeros((0, 0))

    def coherence(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        a, b = self.embed(prompts), self.embed(responses)
        norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
        cos = np.where(norms > 0, (a * b).sum(1) / np.where(norms > 0, norms, 1.0), 0.0)
        return [float(c) for c in cos]
