"""Building the embedded world: corpus -> tokenizer -> SFT LM -> reward model.

Each stage is a plain function of (spec, rng / data) so that the build reads top to bottom in
`build_world` (see `llm_envs/world/__init__.py`). Everything is seeded; on one machine with the
same thread count a build is bit-for-bit reproducible.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
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


def train_tokenizer(texts: Sequence[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the corpus (one token per word or punctuation mark)."""
    tok = Tokenizer(models.WordLevel(unk_token=UNK_TOKEN))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.WordLevelTrainer(special_tokens=[PAD_TOKEN, EOS_TOKEN, UNK_TOKEN])
    tok.train_from_iterator(texts, trainer=trainer)
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
    encoded = []
    for prompt, answer in dialogues:
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        a = tokenizer(answer, add_special_tokens=False)["input_ids"] + [eos]
        encoded.append((p, a))
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
    encode = lambda prompt, answer: tokenizer(f"{prompt} {answer}", add_special_tokens=False)[
        "input_ids"
    ]
    encoded = [(encode(p.prompt, p.chosen), encode(p.prompt, p.rejected)) for p in pairs]
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.rm_lr, weight_decay=0.01)
    generator = torch.Generator().manual_seed(seed + 1)
    model.train()
    loss_value = float("nan")
    half = spec.batch_size // 2
    for step in range(spec.rm_steps):
        idx = torch.randint(len(encoded), (half,), generator=generator).tolist()
        rows = [encoded[i][0] for i in idx] + [encoded[i][1] for i in idx]
        ids, mask = _right_pad(rows, tokenizer.pad_token_id)
        scores = model(input_ids=ids, attention_mask=mask).logits.squeeze(-1)
        loss = -F.logsigmoid(scores[:half] - scores[half:]).mean()
        loss_value = _optimizer_step(model, optimizer, loss, _cosine_lr(step, spec.rm_steps, spec.rm_lr))
        progress("rm", step + 1, spec.rm_steps)
    model.eval()
    return model, loss_value


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
