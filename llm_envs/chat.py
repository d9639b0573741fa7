"""Chat templates as a prompt option: a user message rendered through the LM's own template.

`ChatFormat.learn(tokenizer)` reads a tokenizer's chat template once, by rendering probe
conversations with ``apply_chat_template``: the text before and after a single user message with
the generation prompt (`prefix` / `suffix`, including the template's default system turn or the
given `system_prompt`), and the token that ends an assistant turn (`end_of_turn_id`: the first
special token after an assistant message's content, e.g. ``<|im_end|>``; for a Llama-3-like
template ``<|eot_id|>``, which is not its EOS ``<|end_of_text|>``).

    fmt = ChatFormat.learn(tokenizer)
    prompt = fmt.render("What is the capital of France?")    # exactly apply_chat_template's text
    fmt.message_of(prompt)                                     # -> "What is the capital of France?"

`chat_tokenizer(tokenizer, fmt)` is the tokenizer a chat task runs on: a copy (the caller's
object is never changed) that carries its format and whose ``eos_token`` is the end-of-turn
token, so everything that stops at, or cuts at, ``tokenizer.eos_token_id`` (the envs, HF
``generate``, ARGS, the reward wrapper, RRHF) follows the template's turn end with no extra
plumbing. When the end of turn is the EOS already (SmolLM2) nothing but the format changes.

`encode_prompt` is the one rule for turning a prompt into ids: a prompt rendered by the
tokenizer's chat format is encoded with ``add_special_tokens=False`` (as HF's
``apply_chat_template(tokenize=True)`` does: the template writes its own BOS), any other text with
the tokenizer's defaults.

A data-layer module: transformers is only a type here, so it imports nothing from llm_envs.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "ChatFormat",
    "NoChatTemplateError",
    "chat_format_of",
    "chat_tokenizer",
    "encode_prompt",
    "render_exchange",
]

_PROBES = ("llmenvsprobealpha", "llmenvsprobebeta")  # plain words: templates may trim or escape content
_ANSWER = "llmenvsprobeanswer"
_ATTR = "_llm_envs_chat_format"  # where a chat tokenizer keeps its format (survives copies)


class NoChatTemplateError(ValueError):
    """chat_template=True on a tokenizer that has none; the message names the tokenizer and the fix."""


def _help(text: str) -> dict[str, str]:
    return {"help": text}


def _name(tokenizer: Any) -> str:
    return str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)


def _special_ids(tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """Every special token id: the named ones and added tokens flagged special (e.g. ``<|eot_id|>``)."""
    ids = {int(i) for i in tokenizer.all_special_ids}
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    ids |= {int(i) for i, token in decoder.items() if getattr(token, "special", False)}
    return ids


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], *, generation: bool) -> str:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
    if not isinstance(text, str):  # pragma: no cover - tokenize=False returns text in every 5.x release
        raise TypeError(f"apply_chat_template returned {type(text).__name__}; expected the rendered text.")
    return text


def _conversation(system_prompt: str | None, message: str) -> list[dict[str, str]]:
    turns = [{"role": "system", "content": system_prompt}] if system_prompt is not None else []
    return [*turns, {"role": "user", "content": message}]


@dataclass(frozen=True)
class ChatFormat:
    """How a tokenizer's chat template renders one user message for the assistant's turn."""

    tokenizer_name: str = field(metadata=_help("the tokenizer the format was learned from (for messages)"))
    prefix: str = field(metadata=_help("rendered text before the user message (BOS, system turn, user header)"))
    suffix: str = field(metadata=_help("rendered text after it: end of the user turn + the assistant header"))
    end_of_turn: str = field(metadata=_help("text of the token that ends an assistant turn, e.g. '<|im_end|>'"))
    end_of_turn_id: int = field(metadata=_help("its id: episodes and decoders stop there, responses are cut there"))
    eos_token_id: int | None = field(metadata=_help("the tokenizer's own EOS id (may differ from end_of_turn_id)"))
    system_prompt: str | None = field(default=None, metadata=_help(
        "system turn rendered before every message; None = the template's default (if any)"))
    template: str = field(default="", repr=False, metadata=_help("the jinja template itself (to compare formats)"))
    strips: bool = field(default=False, metadata=_help(
        "the template trims whitespace around a message (Llama-3's `| trim`); render does the same"))

    @classmethod
    def learn(cls, tokenizer: PreTrainedTokenizerBase, system_prompt: str | None = None) -> ChatFormat:
        """Read `tokenizer`'s chat template by rendering probe conversations (see the module docstring).

        Raises `NoChatTemplateError` when the tokenizer has no template, and ValueError when the
        template does not render a user message as plain text between a fixed prefix and suffix."""
        name = _name(tokenizer)
        template = getattr(tokenizer, "chat_template", None)
        if not template:
            raise NoChatTemplateError(
                f"chat_template=True but tokenizer {name!r} has no chat template (tokenizer.chat_template is "
                "unset), so a user message cannot be rendered for it. Pass chat_template=False and give "
                "prompts as the plain text the LM reads, or use a tokenizer that has a template (e.g. an "
                "instruct model's; set tokenizer.chat_template = '<jinja>' on yours)."
            )
        if system_prompt is not None and not isinstance(system_prompt, str):
            raise TypeError(f"system_prompt={system_prompt!r}; expected a string or None.")
        parts = []
        for probe in _PROBES:
            try:
                text = _render(tokenizer, _conversation(system_prompt, probe), generation=True)
            except Exception as exc:  # jinja raises what the template says, e.g. "system role not supported"
                raise ValueError(f"the chat template of {name!r} could not render a user message"
                                 f"{' with system_prompt=' + repr(system_prompt) if system_prompt else ''} "
                                 f"({type(exc).__name__}: {exc}).") from exc
            at = text.find(probe)
            if at < 0 or text.count(probe) != 1:
                raise ValueError(f"the chat template of {name!r} does not write a user message verbatim once; "
                                 "llm_envs cannot render prompts with it. Render prompts yourself and pass "
                                 "chat_template=False.")
            parts.append((text[:at], text[at + len(probe):]))
        if parts[0] != parts[1]:
            raise ValueError(f"the chat template of {name!r} renders the text around a user message differently "
                             "for different messages; render prompts yourself and pass chat_template=False.")
        prefix, suffix = parts[0]
        if not prefix and not suffix:
            raise ValueError(f"the chat template of {name!r} adds nothing around a user message; pass "
                             "chat_template=False (the prompts are the LM's text as they are).")
        padded = _render(tokenizer, _conversation(system_prompt, f" {_PROBES[0]} "), generation=True)
        strips = padded == prefix + _PROBES[0] + suffix
        end_text, end_id = _end_of_turn(tokenizer, system_prompt)
        return cls(tokenizer_name=name, prefix=prefix, suffix=suffix, end_of_turn=end_text, end_of_turn_id=end_id,
                   eos_token_id=tokenizer.eos_token_id, system_prompt=system_prompt, template=str(template),
                   strips=strips)

    def render(self, message: str) -> str:
        """The prompt the LM reads for `message`: what ``apply_chat_template([system?, user],
        add_generation_prompt=True, tokenize=False)`` renders (the template is a plain substitution,
        checked by `learn`, as is whether it trims the message)."""
        return self.prefix + (message.strip() if self.strips else message) + self.suffix

    def message_of(self, rendered: str) -> str | None:
        """The user message of a prompt this format rendered (`render`'s inverse); None for any other text."""
        if (len(rendered) >= len(self.prefix) + len(self.suffix) and rendered.startswith(self.prefix)
                and rendered.endswith(self.suffix)):
            return rendered[len(self.prefix) : len(rendered) - len(self.suffix)]
        return None

    def is_rendered(self, text: str) -> bool:
        return self.message_of(text) is not None

    def prompt(self, text: str) -> str:
        """`text` as this format's prompt: kept when already rendered, else rendered as a user message."""
        return text if self.is_rendered(text) else self.render(text)

    @property
    def eot_differs(self) -> bool:
        """Whether the end-of-turn token is not the tokenizer's EOS (Llama-3's ``<|eot_id|>``)."""
        return self.end_of_turn_id != self.eos_token_id

    def same_rendering(self, other: ChatFormat | None) -> bool:
        """Whether `other` renders a message exactly as this format does (same prompt text, same turn end)."""
        return other is not None and (self.prefix, self.suffix, self.end_of_turn) == (
            other.prefix, other.suffix, other.end_of_turn)


def _end_of_turn(tokenizer: PreTrainedTokenizerBase, system_prompt: str | None) -> tuple[str, int]:
    """The first special token after an assistant message's content (the template's turn end); the
    tokenizer's EOS when the template writes none there."""
    messages = [*_conversation(system_prompt, _PROBES[0]), {"role": "assistant", "content": _ANSWER}]
    try:
        text = _render(tokenizer, messages, generation=False)
    except Exception:  # a template that refuses an assistant turn: its EOS is the best guess
        text = ""
    at = text.rfind(_ANSWER)
    if at >= 0:
        after = tokenizer(text[at + len(_ANSWER):], add_special_tokens=False)["input_ids"]
        specials = _special_ids(tokenizer)
        for token in after:
            if int(token) in specials:
                return tokenizer.decode([int(token)]), int(token)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError(f"the chat template of {_name(tokenizer)!r} writes no special token after an assistant "
                         "turn and the tokenizer has no EOS; set tokenizer.eos_token to the turn end.")
    return str(tokenizer.eos_token), int(eos)


def chat_format_of(tokenizer: Any) -> ChatFormat | None:
    """The format a chat tokenizer (`chat_tokenizer`) carries; None for any other tokenizer."""
    return getattr(tokenizer, _ATTR, None)


def chat_tokenizer(tokenizer: PreTrainedTokenizerBase, fmt: ChatFormat) -> PreTrainedTokenizerBase:
    """A copy of `tokenizer` for a chat task: it carries `fmt` (so `encode_prompt` and the reward wrapper
    know its prompts are rendered) and its EOS is the template's end-of-turn token.

    Why the EOS and not a separate stop id: every consumer (env termination, HF ``generate``'s
    ``eos_token_id``, ARGS, the reward wrapper's response cut, RRHF's appended EOS) already reads
    ``tokenizer.eos_token_id``, so one change on the task's tokenizer makes them all agree. The pad
    token is kept (a Llama-3 pad that was its EOS stays ``<|end_of_text|>``). A copy, since the
    caller's tokenizer may serve non-chat uses."""
    if chat_format_of(tokenizer) == fmt:
        return tokenizer
    chat = copy.deepcopy(tokenizer)
    if fmt.eot_differs:
        pad = chat.pad_token
        chat.eos_token = fmt.end_of_turn
        if pad is not None:
            chat.pad_token = pad
    setattr(chat, _ATTR, fmt)
    return chat


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str) -> list[int]:
    """A prompt's token ids: without the tokenizer's own specials when the tokenizer's chat format rendered
    it (the template wrote them: no second BOS), with them otherwise (the tokenizer's default)."""
    fmt = chat_format_of(tokenizer)
    rendered = fmt is not None and fmt.is_rendered(prompt)
    return list(tokenizer(prompt, add_special_tokens=not rendered)["input_ids"])


def render_exchange(tokenizer: PreTrainedTokenizerBase, message: str, response: str) -> str:
    """One user message and the assistant's response in `tokenizer`'s own chat template (what a reward
    model with a template reads): ``apply_chat_template([user, assistant], tokenize=False)``."""
    return _render(tokenizer, [{"role": "user", "content": message}, {"role": "assistant", "content": response}],
                   generation=False)
