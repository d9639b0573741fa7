"""A reward model's input ids: its special tokens around the content, an appended EOS, truncation.

`ModelInputs` is what `RewardWrapper` (`llm_envs.rewards.wrapper`) knows of a reward model's tokenizer
once it is built: the special ids it adds around one sequence, the EOS the rules append, the longest
input the model reads, the text template. It is immutable and its methods are pure: each returns how many
inputs it truncated, and the wrapper that called it counts them (so wrappers that share one, such as a
wrapper and its `with_chat` copy, keep counters of their own).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from transformers import PreTrainedTokenizerBase

from llm_envs.chat import ChatFormat, render_exchange
from llm_envs.models import context_length
from llm_envs.reward_rules import RewardRules
from llm_envs.rewards.text import (
    SpecialTemplate,
    clean_response_text,
    join_prompt_response,
    special_template,
    strip_template,
)

__all__ = ["ChatReading", "ModelInputs", "Template"]

Template = Literal["concat", "pair"]
ChatReading = Literal["message", "same", "own"]  # how a backend reads a chat-rendered prompt


@dataclass(frozen=True)
class ModelInputs:
    """How text becomes a reward model's input ids (see `build`)."""

    tokenizer: PreTrainedTokenizerBase
    rules: RewardRules
    template: Template
    specials: SpecialTemplate | None  # the ids the tokenizer adds (before, after) one sequence; None: unknowable
    eos_ids: list[int]  # [the RM's EOS] when the rules append it, else []
    max_length: int | None  # the longest input the model reads (None: no limit known)

    @classmethod
    def build(cls, model: Any, tokenizer: PreTrainedTokenizerBase, rules: RewardRules, template: Template,
              max_length: int | None, name: str) -> ModelInputs:
        """The inputs of reward model `model` (named `name` in errors): `max_length` defaults to the least
        of the model's context and the tokenizer's limit; an EOS the rules append is checked to exist."""
        eos_ids = _appended_eos(tokenizer, rules, template, name)
        if max_length is None:
            # A tokenizer without a limit reports a huge sentinel (1e30): only plausible limits count.
            limits = [context_length(model), getattr(tokenizer, "model_max_length", None)]
            valid = [int(x) for x in limits if isinstance(x, int) and 0 < x < 1_000_000]
            max_length = min(valid) if valid else None
        if max_length is not None and max_length < 2:
            raise ValueError(f"max_length={max_length!r}; expected at least 2 tokens.")
        return cls(tokenizer, rules, template, special_template(tokenizer), eos_ids, max_length)

    def fit(self, ids: list[int]) -> tuple[list[int], int]:
        """The last ``max_length`` of `ids` (the oldest tokens give way), and 1 if any did, else 0."""
        if self.max_length is not None and len(ids) > self.max_length:
            return ids[len(ids) - self.max_length :], 1
        return ids, 0

    def wrap(self, body: list[int], *, fit: bool = True) -> tuple[list[int], int]:
        """The specials around a body of content ids (and the EOS after it when the rules append it),
        truncating the body's oldest tokens (`fit`); and 1 if it did, else 0."""
        prefix, suffix = self.specials or ([], [])
        suffix = self.eos_ids + suffix
        cut = 0
        if fit and self.max_length is not None:
            room = self.max_length - len(prefix) - len(suffix)
            if len(body) > room:
                body, cut = body[len(body) - room :], 1
        return prefix + body + suffix, cut

    def text_inputs(self, prompts: list[str], responses: list[str], chat: ChatFormat | None,
                    reading: ChatReading, *, fit: bool) -> tuple[list[list[int]], list[list[int]] | None, int]:
        """The input ids of text pairs (and token types for the 'pair' template), and how many were truncated.

        The response is cut at the LM's end of turn (on `chat` prompts), cleaned of special strings and read by
        the rules; a chat prompt is read as `reading` says (the rendered prompt, the user message, or the
        exchange in the RM's own template). `fit=True` truncates to ``max_length``, `fit=False` gives the full
        lengths."""
        if chat is not None:  # the LM's turn ends at its end-of-turn text, whatever the RM's EOS
            responses = [r.split(chat.end_of_turn, 1)[0] if chat.end_of_turn else r for r in responses]
        messages = [chat.message_of(p) if chat is not None else None for p in prompts]
        tok = self.tokenizer
        cut = [self.rules.read(clean_response_text(r, tok)) for r in responses]
        if self.template == "pair":
            firsts = [p if m is None or reading == "same" else m for p, m in zip(prompts, messages)]
            return self._pair_inputs(firsts, cut, fit=fit)
        seqs, truncated = [], 0
        for p, m, r in zip(prompts, messages, cut):
            if m is not None and reading == "own":  # the RM's own template around the exchange
                ids = list(tok(render_exchange(tok, m, r), add_special_tokens=False)["input_ids"]) + self.eos_ids
                ids, n = self.fit(ids) if fit else (ids, 0)
            else:
                body = list(tok(join_prompt_response(p if m is None or reading == "same" else m, r),
                                add_special_tokens=False)["input_ids"])
                if m is not None and reading == "same":  # the rendered prompt holds the template's BOS already
                    body = strip_template(body, self.specials)
                ids, n = self.wrap(body, fit=fit)
            seqs.append(ids)
            truncated += n
        return seqs, None, truncated

    def _pair_inputs(self, prompts: list[str], cut: list[str], *, fit: bool
                     ) -> tuple[list[list[int]], list[list[int]] | None, int]:
        tok = self.tokenizer
        with_types = "token_type_ids" in tok.model_input_names
        ids, types, truncated = [], [], 0
        for p, r in zip(prompts, cut):
            enc = tok(p, r)
            if fit and self.max_length is not None and len(enc["input_ids"]) > self.max_length:
                truncated += 1  # the prompt gives way (tokenizer's truncation_side)
                enc = tok(p, r, truncation="only_first", max_length=self.max_length)
            ids.append(list(enc["input_ids"]))
            types.append(list(enc.get("token_type_ids") or []))
        return ids, (types if with_types else None), truncated


def _appended_eos(tokenizer: PreTrainedTokenizerBase, rules: RewardRules, template: Template, name: str) -> list[int]:
    """``[eos]`` when the rules append the RM's EOS (checked: a concat template, a tokenizer with an EOS)."""
    if not rules.append_eos:
        return []
    if template != "concat":
        raise ValueError(f"rules.append_eos=True with template={template!r} for reward model {name!r}; an "
                         "EOS is appended to the 'concat' text (prompt + response + EOS). Use template='concat'.")
    eos = tokenizer.eos_token_id
    if not isinstance(eos, int):
        raise ValueError(f"rules.append_eos=True but the tokenizer of reward model {name!r} has no EOS token; "
                         "pass a reward tokenizer with an EOS (safe-rlhf's Llama tokenizers have '</s>'), or set "
                         "append_eos: false.")
    return [int(eos)]
