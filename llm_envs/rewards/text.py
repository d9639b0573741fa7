"""Text and token conventions of the reward wrapper, as plain functions.

Every way of scoring a (prompt, response) pair -- text, LM token ids, k candidate next tokens --
must agree on what the reward model reads, so the rules live here once:

- **Turn cutting (HH convention):** `cut_at_turn` ends a response at the next turn marker
  (`DEFAULT_TURN_MARKERS`); a model that keeps talking past its own turn is scored on its turn.
- **Joining:** `join_prompt_response` puts one space between prompt and response unless either
  side already has whitespace there (BPE responses decoded as ``" Sure"`` are not double-spaced).
- **Special tokens:** a tokenizer's own template around one sequence (`special_template`, e.g. a
  leading BOS) is stripped from encoded prompts (`strip_template`); a response is its content:
  it ends at the first EOS and pad/BOS are dropped, on ids (`response_content_ids`,
  `response_special_ids`) and on text (`clean_response_text`).
- **Same tokenizer?** `tokenizers_match` decides whether LM token ids can be fed to the reward
  model as they are (the ids fast path).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from transformers import PreTrainedTokenizerBase

from llm_envs.reward_rules import DEFAULT_TURN_MARKERS, RewardRules

__all__ = [
    "DEFAULT_TURN_MARKERS",
    "SpecialTemplate",
    "as_id_rows",
    "clean_response_text",
    "cut_at_turn",
    "join_prompt_response",
    "response_content_ids",
    "response_special_ids",
    "response_special_strings",
    "special_template",
    "strip_template",
    "tokenizers_match",
]

SpecialTemplate = tuple[list[int], list[int]]  # the ids a tokenizer adds (before, after) one sequence
_PROBE_TEXT = "hello world"


def cut_at_turn(response: str, markers: Sequence[str] = DEFAULT_TURN_MARKERS) -> str:
    """Cut `response` at the first occurrence of any turn marker (HH convention).

    The text before the marker is kept, with trailing whitespace removed (the ``"\\n\\n"``
    that precedes an HH turn belongs to the next turn). No marker: returned unchanged. The default
    rules of `llm_envs.reward_rules.RewardRules` (`RewardRules.marker_cut`), whose settings (case, the
    whitespace, a stripped prefix, an appended EOS) a reward wrapper takes as ``rules=``.
    """
    return RewardRules(turn_markers=tuple(m for m in markers if m)).marker_cut(response)


def join_prompt_response(prompt: str, response: str) -> str:
    """``prompt + " " + response``, without the space when either side has whitespace there."""
    if not prompt or not response or prompt[-1].isspace() or response[0].isspace():
        return prompt + response
    return prompt + " " + response


def special_template(tokenizer: PreTrainedTokenizerBase) -> SpecialTemplate | None:
    """The ids a tokenizer adds around one sequence (e.g. ``([bos], [])``); None if unknowable.

    Found by encoding a probe text with and without special tokens.
    """
    full = list(tokenizer(_PROBE_TEXT)["input_ids"])
    body = list(tokenizer(_PROBE_TEXT, add_special_tokens=False)["input_ids"])
    if not body:
        return None
    for start in range(len(full) - len(body) + 1):
        if full[start : start + len(body)] == body:
            return full[:start], full[start + len(body) :]
    return None


def strip_template(ids: list[int], template: SpecialTemplate | None) -> list[int]:
    """Drop the tokenizer's own specials (e.g. a leading BOS) from an encoded prompt."""
    prefix, suffix = template or ([], [])
    if prefix and ids[: len(prefix)] == prefix:
        ids = ids[len(prefix) :]
    if suffix and ids[-len(suffix) :] == suffix:
        ids = ids[: -len(suffix)]
    return ids


def response_special_ids(tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """Ids that are not response content: EOS, pad and BOS."""
    ids = (tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.bos_token_id)
    return {int(i) for i in ids if isinstance(i, int)}


def response_special_strings(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """Strings dropped from a response text: the pad and BOS tokens (EOS ends it instead)."""
    toks = (tokenizer.pad_token, tokenizer.bos_token)
    return [t for t in toks if isinstance(t, str) and t]


def response_content_ids(ids: Sequence[int], eos: int | None, specials: set[int]) -> list[int]:
    """A response's content ids: up to (not including) the first `eos`, without `specials`
    (`response_special_ids`)."""
    ids = [int(i) for i in ids]
    if eos is not None and eos in ids:
        ids = ids[: ids.index(eos)]
    return [i for i in ids if i not in specials]


def clean_response_text(response: str, tokenizer: PreTrainedTokenizerBase) -> str:
    """A response text's content: up to the tokenizer's EOS string, pad/BOS strings removed."""
    eos = tokenizer.eos_token
    if isinstance(eos, str) and eos and eos in response:
        response = response[: response.index(eos)]
    for special in response_special_strings(tokenizer):
        response = response.replace(special, "")
    return response


def tokenizers_match(a: PreTrainedTokenizerBase, b: PreTrainedTokenizerBase) -> bool:
    """Whether ids of `a` mean the same to `b`: same vocabulary, same BOS/EOS/UNK/SEP/CLS and the
    same special-token template (pad may differ)."""
    if a is b:
        return True
    keys = ("bos_token", "eos_token", "unk_token", "sep_token", "cls_token")
    if any(getattr(a, k, None) != getattr(b, k, None) for k in keys):
        return False
    return a.get_vocab() == b.get_vocab() and special_template(a) == special_template(b)


def as_id_rows(rows: Any) -> Any:
    """Rows of token ids given as tensors / arrays -> lists; anything else is returned as is
    (for the caller's validation to name)."""
    if hasattr(rows, "tolist") and not isinstance(rows, (str, bytes)):
        rows = rows.tolist()
    if isinstance(rows, list):
        return [row.tolist() if hasattr(row, "tolist") else row for row in rows]
    return rows
