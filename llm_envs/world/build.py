"""Building the embedded world: corpus -> tokenizer -> SFT LM -> reward model.

Each stage is a plain function of (spec, rng / data) so that the build reads top to bottom in
`build_world` (see `llm_envs/world/__init__.py`). A build is byte-reproducible for a preset and
seed on one kind of machine: every draw is seeded, the vocabulary's order is ours (not a
library's), and the training runs under `pinned_torch` (a fixed thread count, because float
reductions split over another number of threads round differently, and deterministic kernels).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    PreTrainedTokenizerFast,
)

from llm_envs.world import grammar
from llm_envs.world.grammars import get_grammar

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<pad>"
UNK_TOKEN = "<unk>"

Progress = Callable[[str, int, int], None]  # (stage, done, total)


@dataclass(frozen=True)
class WorldSpec:
    """Sizes and training budgets of one world preset (see `WORLD_PRESETS`)."""

    num_test_prompts: int
    sft_dialogues: int
    rm_pairs: int
    heldout_pairs: int
    n_embd: int
    n_layer: int
    n_head: int
    sft_steps: int
    rm_steps: int
    batch_size: int = 64
    lr: float = 2e-3
    rm_lr: float = 5e-4
    n_positions: int = 128
    nucleus_samples: int = 32
    mixture: Any = grammar.Mixture()  # the grammar's Mixture (grammar.Mixture for v1, grammar_v2.Mixture for v2)
    grammar: str = "v1"  # see llm_envs.world.grammars
    max_answer_tokens: int = 40  # generation budget of the build report's greedy / nucleus answers
    decision_stride: int = 1  # the report's decision analysis reads every n-th test prompt (it is the costly part)
    # torch CPU threads while building: part of the spec because another count rounds float
    # reductions differently (another world); 1 is also the fastest for models this small.
    torch_threads: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.torch_threads, int) or self.torch_threads < 1:
            raise ValueError(f"WorldSpec.torch_threads={self.torch_threads!r}; expected a positive int (e.g. 1).")


@contextmanager
def pinned_torch(threads: int) -> Iterator[None]:
    """Run the block with `threads` torch CPU threads and deterministic algorithms only, then
    restore the caller's settings (a build must not change how the rest of the process runs).

    Why: the default thread count is the machine's core count (or whatever the caller set, e.g.
    a benchmark's `torch_threads: 1`), and a matmul or a reduction split over another number of
    threads sums in another order, so the same seed trained another model.
    """
    threads_before = torch.get_num_threads()
    deterministic_before = torch.are_deterministic_algorithms_enabled()
    warn_only_before = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(deterministic_before, warn_only=warn_only_before)
        torch.set_num_threads(threads_before)


@dataclass(frozen=True)
class Pair:
    prompt: str
    chosen: str
    rejected: str


# ---------------------------------------------------------------------------- corpus


def make_sft_corpus(
    rng: np.random.Generator, train: Sequence[grammar.Request], spec: WorldSpec
) -> tuple[list[tuple[str, str]], dict[str, float]]:
    """(prompt, answer) dialogues drawn from the SFT mixture, and the per-task habits."""
    rules = get_grammar(spec.grammar)
    habits = rules.draw_task_habits(rng, spec.mixture)
    picks = rng.integers(len(train), size=spec.sft_dialogues)
    dialogues = []
    for i in picks:
        request = train[int(i)]
        answer = rules.sample_sft_answer(rng, request, habits[request.task], spec.mixture)
        dialogues.append((request.text, answer.text))
    return dialogues, habits


def make_preference_pairs(
    rng: np.random.Generator, requests: Sequence[Any], count: int, grammar_name: str = "v1",
    *, by: str = "gold",
) -> list[Pair]:
    """Pairs of answers to one prompt with different scores, ordered by the gold judge
    (`by="gold"`: held-out pairs) or by the grammar's RM labeller (`by="labeller"`: the RM's
    training pairs; the same as gold for v1, gold plus documented biases for v2)."""
    rules = get_grammar(grammar_name)
    score = rules.gold_score if by == "gold" else rules.preference_score
    pairs: list[Pair] = []
    while len(pairs) < count:
        request = requests[int(rng.integers(len(requests)))]
        a = rules.sample_any_answer(rng, request).text
        b = rules.sample_any_answer(rng, request).text
        ga, gb = score(request.text, a), score(request.text, b)
        if ga == gb:
            continue  # ties teach a Bradley-Terry model nothing
        chosen, rejected = (a, b) if ga > gb else (b, a)
        pairs.append(Pair(request.text, chosen, rejected))
    return pairs


# ---------------------------------------------------------------------------- tokenizer


SPECIAL_TOKENS: tuple[str, ...] = (PAD_TOKEN, EOS_TOKEN, UNK_TOKEN)  # ids 0, 1, 2


def build_vocab(texts: Sequence[str]) -> dict[str, int]:
    """Word -> id: the special tokens first, then every word by count (most frequent first),
    equal counts in code-point order (`sorted`).

    We order the vocabulary ourselves instead of using `tokenizers`' WordLevelTrainer: its order
    of equal-count words is the library's business (older releases took it from a randomly
    seeded hash map), and a token's id decides which embedding row it starts from, so another
    order trains another model from the same seed. Here the vocabulary is a function of the
    multiset of words alone, whatever the order of `texts`.
    """
    counts = Counter(word for text in texts for word in text.split())
    for special in SPECIAL_TOKENS:
        counts.pop(special, None)
    words = sorted(counts, key=lambda word: (-counts[word], word))
    return {token: i for i, token in enumerate([*SPECIAL_TOKENS, *words])}


def train_tokenizer(texts: Sequence[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the corpus (one token per word or punctuation mark)."""
    tok = Tokenizer(models.WordLevel(vocab=build_vocab(texts), unk_token=UNK_TOKEN))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        clean_up_tokenization_spaces=False,
        padding_side="left",
        model_max_length=128,
    )
    return fast


# ---------------------------------------------------------------------------- models


def _gpt2_config(tokenizer: PreTrainedTokenizerFast, spec: WorldSpec) -> GPT2Config:
    # Size the vocabulary from the largest id, not tokenizer.vocab_size (see NOTES.md).
    vocab = max(tokenizer.get_vocab().values()) + 1
    return GPT2Config(
        vocab_size=vocab,
        n_positions=spec.n_positions,
        n_embd=spec.n_embd,
        n_layer=spec.n_layer,
        n_head=spec.n_head,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )


def _encode_all(tokenizer: PreTrainedTokenizerFast, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, no special tokens: one batched call (the same ids as one call
    per text, without a Python round trip per text)."""
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def _right_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return ids, mask


def _cosine_lr(step: int, total: int, base: float, warmup: int = 30) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _optimizer_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, loss: torch.Tensor, lr: float) -> float:
    """One AdamW step at learning rate `lr`, gradients clipped to norm 1; returns the loss."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return loss.item()


def train_sft_lm(
    dialogues: Sequence[tuple[str, str]],
    tokenizer: PreTrainedTokenizerFast,
    spec: WorldSpec,
    seed: int,
    progress: Progress,
) -> tuple[GPT2LMHeadModel, float]:
    """Next-token cross-entropy on the answers (prompt tokens are context, not targets)."""
    torch.manual_seed(seed)
    config = _gpt2_config(tokenizer, spec)
    config.loss_type = "ForCausalLM"
    model = GPT2LMHeadModel(config)
    eos = tokenizer.eos_token_id
    prompt_ids = _encode_all(tokenizer, [prompt for prompt, _ in dialogues])
    answer_ids = _encode_all(tokenizer, [answer for _, answer in dialogues])
    encoded = [(p, a + [eos]) for p, a in zip(prompt_ids, answer_ids)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.01)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    loss_value = float("nan")
    for step in range(spec.sft_steps):
        idx = torch.randint(len(encoded), (spec.batch_size,), generator=generator).tolist()
        rows = [encoded[i][0] + encoded[i][1] for i in idx]
        ids, mask = _right_pad(rows, tokenizer.pad_token_id)
        labels = ids.clone()
        labels[mask == 0] = -100
        for r, i in enumerate(idx):
            labels[r, : len(encoded[i][0])] = -100
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss_value = _optimizer_step(model, optimizer, loss, _cosine_lr(step, spec.sft_steps, spec.lr))
        progress("sft", step + 1, spec.sft_steps)
    model.eval()
    return model, loss_value


def train_reward_model(
    pairs: Sequence[Pair],
    tokenizer: PreTrainedTokenizerFast,
    sft: GPT2LMHeadModel,
    spec: WorldSpec,
    seed: int,
    progress: Progress,
) -> tuple[GPT2ForSequenceClassification, float]:
    """Bradley-Terry: minimise -log sigmoid(r(chosen) - r(rejected)). Starts from the SFT
    LM's transformer, as RMs usually start from the SFT model."""
    torch.manual_seed(seed + 1)
    config = _gpt2_config(tokenizer, spec)
    config.num_labels = 1
    model = GPT2ForSequenceClassification(config)
    model.transformer.load_state_dict(sft.transformer.state_dict())
    chosen = _encode_all(tokenizer, [f"{p.prompt} {p.chosen}" for p in pairs])
    rejected = _encode_all(tokenizer, [f"{p.prompt} {p.rejected}" for p in pairs])
    loss = train_bradley_terry(model, list(zip(chosen, rejected)), steps=spec.rm_steps, batch_size=spec.batch_size,
                               lr=spec.rm_lr, seed=seed + 1, pad_id=tokenizer.pad_token_id, progress=progress)
    return model, loss


def train_bradley_terry(
    model: torch.nn.Module,
    encoded: Sequence[tuple[list[int], list[int]]],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    pad_id: int,
    progress: Progress,
) -> float:
    """Train a sequence classifier (num_labels=1) in place on (chosen ids, rejected ids) pairs:
    minimise -log sigmoid(r(chosen) - r(rejected)) over `steps` batches of `batch_size // 2`
    pairs drawn with a seeded generator, AdamW with warm-up and cosine decay. Returns the last loss."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.01)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    loss_value = float("nan")
    half = batch_size // 2
    for step in range(steps):
        idx = torch.randint(len(encoded), (half,), generator=generator).tolist()
        rows = [encoded[i][0] for i in idx] + [encoded[i][1] for i in idx]
        ids, mask = _right_pad(rows, pad_id)
        scores = model(input_ids=ids, attention_mask=mask).logits.squeeze(-1)
        loss = -F.logsigmoid(scores[:half] - scores[half:]).mean()
        loss_value = _optimizer_step(model, optimizer, loss, _cosine_lr(step, steps, lr))
        progress("rm", step + 1, steps)
    model.eval()
    return loss_value


@torch.inference_mode()
def score_pairs(
    model: GPT2ForSequenceClassification,
    tokenizer: PreTrainedTokenizerFast,
    prompts: Sequence[str],
    answers: Sequence[str],
    batch_size: int = 256,
) -> list[float]:
    """RM scores of `prompt + " " + answer` (the format the RM was trained on)."""
    out: list[float] = []
    for start in range(0, len(prompts), batch_size):
        chunk = zip(prompts[start : start + batch_size], answers[start : start + batch_size])
        texts = [f"{p} {a}" for p, a in chunk]
        rows = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        ids, mask = _right_pad(rows, tokenizer.pad_token_id)
        out += model(input_ids=ids, attention_mask=mask).logits.squeeze(-1).tolist()
    return out
