"""`RewardWrapper`: one object that scores (prompt, response) batches for every method.

Backends:

- a reward model, by hub name, local directory or loaded model: `RewardWrapper.from_model`. A HF
  sequence classifier (``num_labels=1``), or a safe-rlhf score model (``LlamaForScore``: a
  ``score_head`` read at the last token, `llm_envs.score_model`), told apart by the checkpoint; a
  checkpoint whose head would be initialised at random is refused (`llm_envs.models.load_reward_model`);
- a programmatic function ``fn(prompts, responses) -> list[float]`` (the embedded world's
  gold judge is one): `RewardWrapper.from_callable`;
- a weighted sum of wrappers (MARA's reward − cost): `RewardWrapper.combine`. Each term scores the
  pairs with its own conventions and fast paths; the sum adds ``weight * score``.

`RewardWrapper.build` dispatches on whatever a user passed as ``reward=`` (a list of ``{model, weight}``
terms, `llm_envs.reward_spec`, builds a weighted sum).

Conventions shared by every backend:

- **Reading a response (`llm_envs.reward_rules.RewardRules`, ``rules=``).** Before scoring, a response
  is cut at the first turn marker (default ``"Human:"``, ``"Assistant:"``, ``"USER:"``, trailing
  whitespace dropped); a model that keeps talking past its own turn is scored on its own turn only.
  The rules also say whether markers match in any case, whether the whitespace before a cut stays, a
  prefix to strip (ARGS's ``": "``), and whether the reward model's EOS follows the response
  (``append_eos``: safe-rlhf score models were trained on prompt + answer + EOS). One set of rules per
  wrapper, applied on every path (text, ids, candidates). The text and special-token rules are
  functions of `llm_envs.rewards.text`; a reward model's input ids are built by
  `llm_envs.rewards.inputs.ModelInputs`, and the backends run by `llm_envs.rewards.backends`.
- **Input lengths.** `input_lengths` gives how many tokens the reward model would read for each pair
  (its specials and an appended EOS included, before truncation to ``max_length``): what a protocol's
  skip rule (ARGS: pairs of >= 1334 tokens are not scored) is checked against.
- **Special tokens.** A response is its text content: on the token-id path it ends at the
  first EOS and pad/BOS ids are dropped; on the text path the EOS/pad/BOS strings are treated
  the same way. Prompts keep their special tokens (chat templates need them).
- **Text template** (model backend). ``"concat"`` scores ``prompt + " " + response`` (no
  space is added when the prompt already ends, or the response already starts, with
  whitespace, so BPE responses decoded as ``" Sure"`` are not double-spaced); ``"pair"``
  passes ``tokenizer(prompt, response)`` for reward models trained on text pairs.
- **Fast path.** `score_ids` builds reward-model inputs straight from the LM's token ids when
  the RM tokenizer equals the LM tokenizer (same vocabulary and same BOS/EOS/UNK/SEP/CLS;
  pad may differ); otherwise it decodes and re-tokenizes. Both give the same score.
- **Chat templates.** When the LM's prompts are rendered through its chat template (the LM
  tokenizer is a `llm_envs.chat.chat_tokenizer`, or ``chat=`` is given), each backend reads the
  conversation in its own format: a function (a gold judge) gets the user message
  (`ChatFormat.message_of`); a reward model that renders a message exactly as the LM does (same
  template) reads the rendered prompt, on the ids fast path when its vocabulary matches too; a
  reward model with another template reads ``apply_chat_template([user, assistant])`` of its own
  (`llm_envs.chat.render_exchange`); one without a template reads ``message + " " + response``.
  The response is cut at the LM's end-of-turn token (ids) / text (text) first. A prompt that is
  not a rendering of the format is scored as plain text, as without a template.
- Scores are finite floats; a non-finite score raises naming the pair and the backend.
- ``calls`` counts batches sent to the backend, ``pairs_scored`` the pairs (compute accounting); a
  weighted sum counts what its terms count through it (every model's batches and pairs).

Candidate scoring (reward-guided decoding, TokenChoice) builds on this class from the module
above it: `llm_envs.rewards.candidates.CandidateScorer(wrapper, num_rows, lm_tokenizer)` scores
k candidate next tokens after each of N growing prefixes in one reward-model forward per call.
It uses the public seams of this class (`fast_path`, `template_ids`, `score_model_inputs`,
`fit_to_max_length`, `count_call`), so this module does not import it.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from llm_envs.chat import ChatFormat, chat_format_of, chat_tokenizer
from llm_envs.models import (
    RewardModel,
    RewardModelSpec,
    load_reward_model,
    load_tokenizer,
    model_source_name,
)
from llm_envs.reward_rules import RewardRules, as_reward_rules
from llm_envs.reward_spec import is_combination, reward_terms, weighted_name
from llm_envs.rewards.backends import check_finite, check_pairs, function_scores, model_scores, short
from llm_envs.rewards.combination import WeightedSum, check_terms
from llm_envs.rewards.inputs import ChatReading, ModelInputs, Template
from llm_envs.rewards.text import (
    SpecialTemplate,
    as_id_rows,
    response_content_ids,
    response_special_ids,
    special_template,
    strip_template,
    tokenizers_match,
)
from llm_envs.score_model import ScoreModel

__all__ = ["RewardFn", "RewardWrapper", "Template"]

RewardFn = Callable[[list[str], list[str]], Sequence[float]]
Term = tuple["RewardWrapper", float]  # one wrapper of a weighted sum and its weight


def _merged_rules(rules: RewardRules | Mapping[str, Any] | None, turn_markers: Sequence[str] | None) -> RewardRules:
    """A wrapper's rules: `rules` (default `RewardRules()`), with `turn_markers` when given on its own (the
    keyword that predates the rules); both, disagreeing, is an error naming them."""
    merged = as_reward_rules(rules, "rules")
    if turn_markers is None:
        return merged
    if isinstance(turn_markers, str) or not all(isinstance(m, str) for m in turn_markers):
        raise TypeError(f"turn_markers={turn_markers!r}; expected a tuple of strings.")
    if rules is not None and tuple(turn_markers) != merged.turn_markers:
        raise ValueError(f"turn_markers={tuple(turn_markers)!r} disagrees with rules.turn_markers="
                         f"{merged.turn_markers!r}; give the markers once, in rules=RewardRules(turn_markers=...).")
    return dataclasses.replace(merged, turn_markers=tuple(m for m in turn_markers if m))


class RewardWrapper(WeightedSum):
    """Scores (prompt, response) pairs in batches; see the module docstring for conventions.

    Build it with `from_model`, `from_callable`, `combine` or `build`, then call `score` (texts) or
    `score_ids` (LM token ids). ``calls``/``pairs_scored`` count backend batches and pairs.
    """

    def __init__(
        self,
        *,
        name: str,
        model: RewardModel | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        fn: RewardFn | None = None,
        terms: Sequence[Term] | None = None,
        lm_tokenizer: PreTrainedTokenizerBase | None = None,
        batch_size: int | None = 32,
        max_length: int | None = None,
        template: Template = "concat",
        turn_markers: Sequence[str] | None = None,
        chat: ChatFormat | None = None,
        rules: RewardRules | Mapping[str, Any] | None = None,
    ) -> None:
        if sum(x is not None for x in (model, fn, terms)) != 1:
            raise ValueError("RewardWrapper needs exactly one backend: model=, fn= or terms=.")
        if terms is not None:
            check_terms(terms, RewardWrapper)
        if model is not None and tokenizer is None:
            raise ValueError("a reward-model backend needs its tokenizer (tokenizer=).")
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f"batch_size={batch_size!r}; expected a positive int (or None).")
        if template not in ("concat", "pair"):
            raise ValueError(f"template={template!r}; expected 'concat' or 'pair'.")
        self.rules: RewardRules = _merged_rules(rules, turn_markers)
        self.name = name
        self.model = model
        self.tokenizer = tokenizer
        self.fn = fn
        self.terms: tuple[Term, ...] | None = tuple((t, float(w)) for t, w in terms) if terms is not None else None
        self.lm_tokenizer = lm_tokenizer
        self.batch_size = batch_size
        self.template: Template = template
        # The LM's chat format (its prompts are rendered through it): given, or the LM tokenizer's.
        self.chat: ChatFormat | None = chat if chat is not None else chat_format_of(lm_tokenizer)
        self._chat_reading: dict[ChatFormat, tuple[ChatReading, PreTrainedTokenizerBase | None]] = {}
        self._inputs: ModelInputs | None = None  # how text becomes the reward model's input ids (model backend)
        if fn is not None and self.rules.append_eos:
            raise ValueError(f"rules.append_eos=True for the function backend {name!r}; a function reads text, not a "
                             "reward model's tokens, so there is no EOS to append. Set append_eos only for reward "
                             "models (e.g. safe-rlhf score models).")
        self._match_cache: tuple[weakref.ref[Any], bool] | None = None
        # The LM tokenizer's special template (`special_template` encodes a probe twice, ~0.3 ms, and
        # score_ids runs every step that ends an episode), for the latest LM tokenizer seen.
        self._lm_template_cache: tuple[weakref.ref[Any], SpecialTemplate | None] | None = None
        self.last_path: str | None = None  # "ids" or "text": which path the last score_ids took
        if model is not None and tokenizer is not None:
            if model.config.pad_token_id is None:
                pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
                model.config.pad_token_id = int(pad) if pad is not None else 0
            self._inputs = ModelInputs.build(model, tokenizer, self.rules, template, max_length, name)
        self.reset_counters()

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_model(
        cls,
        spec: RewardModelSpec,
        *,
        tokenizer: PreTrainedTokenizerBase | str | os.PathLike | None = None,
        lm_tokenizer: PreTrainedTokenizerBase | None = None,
        device: str | torch.device | None = "auto",
        dtype: str | torch.dtype | None = "auto",
        batch_size: int = 32,
        max_length: int | None = None,
        template: Template = "concat",
        turn_markers: Sequence[str] | None = None,
        chat: ChatFormat | None = None,
        rules: RewardRules | Mapping[str, Any] | None = None,
    ) -> RewardWrapper:
        """A reward model (hub name, local dir or loaded model): a HF sequence classifier or a
        safe-rlhf score model (`llm_envs.models.load_reward_model` tells them apart).

        `tokenizer` defaults to the one saved beside the model. `lm_tokenizer` is the policy
        LM's tokenizer, the default for `score_ids`. `max_length` defaults to the model's
        context size; longer inputs lose their oldest prompt tokens (counted in ``truncated``). `rules`
        (`llm_envs.reward_rules.RewardRules`) say how a response is read (cut, stripped, EOS appended).
        """
        model = load_reward_model(spec, device=device, dtype=dtype)
        if tokenizer is None:
            source = model_source_name(spec)
            try:
                tokenizer = load_tokenizer(source)
            except (OSError, ValueError) as exc:
                raise ValueError(
                    f"could not load the reward model's tokenizer from {source!r} ({exc}); "
                    "pass tokenizer= (a tokenizer object or its directory)."
                ) from exc
        elif isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = load_tokenizer(tokenizer)
        return cls(
            name=model_source_name(spec),
            model=model,
            tokenizer=tokenizer,
            lm_tokenizer=lm_tokenizer,
            batch_size=batch_size,
            max_length=max_length,
            template=template,
            turn_markers=turn_markers,
            chat=chat,
            rules=rules,
        )

    @classmethod
    def from_callable(
        cls,
        fn: RewardFn,
        name: str | None = None,
        *,
        lm_tokenizer: PreTrainedTokenizerBase | None = None,
        batch_size: int | None = None,
        turn_markers: Sequence[str] | None = None,
        chat: ChatFormat | None = None,
        rules: RewardRules | Mapping[str, Any] | None = None,
    ) -> RewardWrapper:
        """A programmatic reward ``fn(prompts, responses) -> list[float]``.

        `batch_size=None` sends each `score` call to `fn` as one batch. On chat-rendered prompts
        (`chat`, default: `lm_tokenizer`'s format) `fn` gets the user messages, not the rendered text.
        """
        if not callable(fn):
            raise TypeError(f"from_callable expects a function, got {type(fn).__name__}: {fn!r}.")
        if name is None:
            name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or type(fn).__name__
        return cls(
            name=str(name), fn=fn, lm_tokenizer=lm_tokenizer, batch_size=batch_size, turn_markers=turn_markers,
            chat=chat, rules=rules,
        )

    @classmethod
    def combine(cls, terms: Sequence[Term], name: str | None = None) -> RewardWrapper:
        """A weighted sum of wrappers, ``sum(weight * wrapper.score(...))`` (MARA: reward − cost):
        ``RewardWrapper.combine([(reward_rm, 1.0), (cost_rm, -1.0)])``.

        Each term scores through its own code path (tokenizer, template, turn cutting, ids fast path,
        candidate prefix cache), so the sum is exactly the weighted sum of the terms' scores. `name`
        defaults to the sum written out (``1*reward - 1*cost``).
        """
        terms = tuple(terms)
        check_terms(terms, RewardWrapper)
        if name is None:
            name = weighted_name([(float(w), t.name) for t, w in terms])
        chats = {t.chat for t, _ in terms if t.chat is not None}
        lm_toks = [t.lm_tokenizer for t, _ in terms if t.lm_tokenizer is not None]
        return cls(name=name, terms=terms, lm_tokenizer=lm_toks[0] if lm_toks else None, batch_size=None,
                   chat=next(iter(chats)) if len(chats) == 1 else None)

    _MODEL_KW = (
        "tokenizer", "lm_tokenizer", "device", "dtype", "batch_size", "max_length", "template", "turn_markers", "chat",
        "rules",
    )
    _CALLABLE_KW = ("name", "lm_tokenizer", "batch_size", "turn_markers", "chat", "rules")

    @classmethod
    def build(cls, reward: Any, **kw: Any) -> RewardWrapper:
        """What envs call with their ``reward=`` kwarg.

        A RewardWrapper is returned as is (`kw` ignored; non-default ``rules`` other than its own are an
        error), except that on chat-rendered prompts (a
        ``chat`` format, or an ``lm_tokenizer`` that carries one) a wrapper that knows no format is
        returned as a copy that knows it (`with_chat`); a str/PathLike/PreTrainedModel/ScoreModel goes
        to `from_model`; a list of ``{model, weight}`` terms (`llm_envs.reward_spec`) to `combine`, each
        model built with `kw`; any other callable to `from_callable`. Keywords that do not apply to
        the chosen backend (e.g. ``device`` for a function) are ignored; unknown ones raise.
        """
        known = set(cls._MODEL_KW) | set(cls._CALLABLE_KW)
        for key in kw:
            if key not in known:
                hint = difflib.get_close_matches(key, sorted(known), n=1)
                extra = f" Did you mean {hint[0]!r}?" if hint else ""
                raise TypeError(
                    f"RewardWrapper.build got an unknown keyword {key!r}; expected one of {sorted(known)}.{extra}"
                )
        if isinstance(reward, RewardWrapper):
            rules = as_reward_rules(kw.get("rules"), "rules")
            if not rules.is_default and rules != reward.rules:
                raise ValueError(f"reward is the ready-made wrapper {reward.name!r}, read under rules {reward.rules}, "
                                 f"but rules {rules} were asked for; build the wrapper with those rules "
                                 "(RewardWrapper.from_model(..., rules=...)) or pass the model's name instead.")
            chat = kw.get("chat") or chat_format_of(kw.get("lm_tokenizer"))
            if chat is None or reward.chat is not None:
                return reward
            return reward.with_chat(chat, lm_tokenizer=kw.get("lm_tokenizer"))
        if is_combination(reward):
            terms = reward_terms(reward)
            return cls.combine([(cls.build(t.model, **kw), t.weight) for t in terms])
        if isinstance(reward, (str, os.PathLike, PreTrainedModel, ScoreModel)):
            return cls.from_model(reward, **{k: v for k, v in kw.items() if k in cls._MODEL_KW})
        if callable(reward):
            return cls.from_callable(reward, **{k: v for k, v in kw.items() if k in cls._CALLABLE_KW})
        raise TypeError(
            f"reward={reward!r} ({type(reward).__name__}) is not a reward; expected a RewardWrapper, a "
            "reward-model hub name or directory, a loaded PreTrainedModel (num_labels=1) or ScoreModel, a list of "
            "{model, weight} terms, or a function fn(prompts, responses) -> list[float]. For the offline default use "
            "`llm_envs.world.load_world().rm_dir`."
        )

    def with_chat(self, chat: ChatFormat, lm_tokenizer: PreTrainedTokenizerBase | None = None) -> RewardWrapper:
        """A copy of this wrapper that reads prompts rendered by `chat` (the LM's format) as chat
        conversations (the module docstring's rules), with `lm_tokenizer` as its default LM tokenizer
        when it had none; it shares the backend, its counters start at 0."""
        other = copy.copy(self)
        other.chat, other._chat_reading, other._match_cache = chat, {}, None
        other.lm_tokenizer = self.lm_tokenizer if self.lm_tokenizer is not None else lm_tokenizer
        if self.terms is not None:  # each term reads the conversation in its own terms
            other.terms = tuple((t if t.chat is not None else t.with_chat(chat, lm_tokenizer), w)
                                for t, w in self.terms)
        other.reset_counters()
        return other

    # ------------------------------------------------------------------ provenance
    @property
    def turn_markers(self) -> tuple[str, ...]:
        """The markers a response is cut at (``rules.turn_markers``)."""
        return self.rules.turn_markers

    @property
    def kind(self) -> str:
        return "model" if self.model is not None else "callable" if self.fn is not None else "combination"

    def describe(self) -> dict[str, Any]:
        """Provenance for result files: backend, name, template, batching, counters."""
        info: dict[str, Any] = {
            "kind": self.kind,
            "name": self.name,
            "batch_size": self.batch_size,
            "turn_markers": list(self.turn_markers),
            "calls": self.calls,
            "pairs_scored": self.pairs_scored,
        }
        if not self.rules.is_default and self.terms is None:
            info["rules"] = {k: (list(v) if isinstance(v, tuple) else v)
                             for k, v in dataclasses.asdict(self.rules).items()}
        if self.chat is not None and self.terms is None:
            info["chat"] = {"lm_format": self.chat.tokenizer_name, "reads": self.chat_reading(self.chat)}
        if self.terms is not None:
            info["terms"] = [{"weight": w, **t.describe()} for t, w in self.terms]
        if self.model is not None:
            info.update(
                template=self.template,
                max_length=self.max_length,
                truncated=self.truncated,
                model_class=type(self.model).__name__,
                device=str(self.model.device),
                dtype=str(self.model.dtype).replace("torch.", ""),
                num_parameters=int(sum(p.numel() for p in self.model.parameters())),
            )
        return info

    def __repr__(self) -> str:
        return (
            f"RewardWrapper(kind={self.kind!r}, name={self.name!r}, calls={self.calls}, "
            f"pairs_scored={self.pairs_scored})"
        )

    def reset_counters(self) -> None:
        self.calls = 0
        self.pairs_scored = 0
        self.truncated = 0

    # ------------------------------------------------------------------ scoring
    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        """Score text pairs (responses cut at the next turn marker first; chat-rendered prompts read
        as the module docstring says)."""
        prompts, responses = check_pairs(prompts, responses, str, "score")
        if self.terms is not None:
            return self._summed(lambda t: t.score(prompts, responses), prompts, responses)
        return self._score_text(prompts, responses, self.chat)

    def _score_text(self, prompts: list[str], responses: list[str], chat: ChatFormat | None) -> list[float]:
        if not prompts:
            return []  # (transformers 5 tokenizers raise IndexError on an empty batch)
        if self.fn is not None:
            texts, cut = self._read_text(prompts, responses, chat)
            return self._callable_scores(texts, cut, shown=(prompts, responses))
        seqs, types = self._text_inputs(prompts, responses, chat, fit=True)
        return self._model_scores(seqs, types, prompts, responses)

    @property
    def max_length(self) -> int | None:
        """The longest input the reward model reads (longer ones lose their oldest prompt tokens); None for a
        function backend, or when neither the model nor its tokenizer states a limit."""
        return self._inputs.max_length if self._inputs is not None else None

    def _read_text(self, prompts: list[str], responses: list[str], chat: ChatFormat | None
                   ) -> tuple[list[str], list[str]]:
        """What a function backend reads: the prompts (user messages on chat prompts) and the responses cut at
        the LM's end of turn and read by the rules."""
        if chat is not None:  # the LM's turn ends at its end-of-turn text
            responses = [r.split(chat.end_of_turn, 1)[0] if chat.end_of_turn else r for r in responses]
        messages = [chat.message_of(p) if chat is not None else None for p in prompts]
        return [p if m is None else m for p, m in zip(prompts, messages)], [self.rules.read(r) for r in responses]

    def _text_inputs(self, prompts: list[str], responses: list[str], chat: ChatFormat | None, *, fit: bool
                     ) -> tuple[list[list[int]], list[list[int]] | None]:
        """The reward model's input ids of text pairs (`ModelInputs.text_inputs`), chat prompts read per
        `chat_reading`; `fit=True` truncates to ``max_length`` (counted in ``truncated``)."""
        assert self._inputs is not None
        reading = self.chat_reading(chat) if chat is not None else "same"
        seqs, types, truncated = self._inputs.text_inputs(prompts, responses, chat, reading, fit=fit)
        self.truncated += truncated
        return seqs, types

    def input_lengths(self, prompts: Sequence[str], responses: Sequence[str]) -> list[int]:
        """How many tokens the reward model reads for each (prompt, response) text pair, as `score` builds its
        input (the rules applied, the RM's specials and an appended EOS included), before truncation to
        ``max_length``: what a skip rule such as ARGS's (pairs of >= 1334 tokens are not scored) checks. A
        weighted sum gives each pair's longest input over its models; a function reads no tokens (an error)."""
        prompts, responses = check_pairs(prompts, responses, str, "input_lengths")
        if self.terms is not None:
            lengths = [t.input_lengths(prompts, responses) for t, _ in self.terms if t.kind != "callable"]
            if not lengths:
                raise ValueError(f"input_lengths: no term of {self.name!r} is a reward model; functions read no "
                                 "tokens, so a token-length rule cannot apply.")
            return [max(column) for column in zip(*lengths)] if prompts else []
        if self.model is None:
            raise ValueError(f"input_lengths: {self.name!r} is a function, which reads no tokens; a token-length rule "
                             "(e.g. ARGS's reward_skip_tokens) needs a reward-model backend.")
        if not prompts:
            return []
        return [len(ids) for ids in self._text_inputs(prompts, responses, self.chat, fit=False)[0]]

    def chat_reading(self, chat: ChatFormat) -> ChatReading:
        """How this backend reads a prompt rendered by the LM's format `chat`: "message" (a function, or a
        reward model without a chat template: the user message), "same" (a reward model whose template
        renders messages exactly as the LM's: the rendered prompt), "own" (another template: its own)."""
        return self._chat_rm(chat)[0]

    def _chat_rm(self, chat: ChatFormat) -> tuple[ChatReading, PreTrainedTokenizerBase | None]:
        """`chat_reading`, and for "same" the RM tokenizer as the LM's chat tokenizer would be (its EOS at
        the turn end), which is what the ids fast path compares with the LM's."""
        if chat not in self._chat_reading:
            reading: tuple[ChatReading, PreTrainedTokenizerBase | None] = ("message", None)
            tok = self.tokenizer
            if self.model is not None and tok is not None and getattr(tok, "chat_template", None):
                try:
                    own = ChatFormat.learn(tok, chat.system_prompt)
                except ValueError:  # a template llm_envs cannot read as a plain substitution
                    own = None
                same = own is not None and chat.same_rendering(own)
                reading = ("same", chat_tokenizer(tok, own)) if same and own is not None else ("own", None)
            self._chat_reading[chat] = reading
        return self._chat_reading[chat]

    def response_end_id(self, lm_tokenizer: PreTrainedTokenizerBase) -> int | None:
        """The LM token that ends a response: the chat format's end of turn, else the LM's EOS."""
        chat = chat_format_of(lm_tokenizer) or self.chat
        return chat.end_of_turn_id if chat is not None else lm_tokenizer.eos_token_id

    def _lm_template(self, lm_tok: PreTrainedTokenizerBase) -> SpecialTemplate | None:
        cached = self._lm_template_cache
        if cached is None or cached[0]() is not lm_tok:
            cached = self._lm_template_cache = (weakref.ref(lm_tok), special_template(lm_tok))
        return cached[1]

    def score_ids(
        self,
        prompt_ids: Sequence[Sequence[int]],
        response_ids: Sequence[Sequence[int]],
        lm_tokenizer: PreTrainedTokenizerBase | None = None,
        *,
        fast: bool | None = None,
    ) -> list[float]:
        """Score pairs given as the LM's token ids (unpadded prompts; responses may carry EOS/pad).

        `fast=None` takes the ids fast path when possible, `True` requires it, `False` forces
        decode + re-tokenize. `lm_tokenizer` defaults to the one given at construction.
        """
        prompt_ids, response_ids = as_id_rows(prompt_ids), as_id_rows(response_ids)
        prompt_ids, response_ids = check_pairs(prompt_ids, response_ids, Sequence, "score_ids")
        if not prompt_ids:
            return []
        lm_tok = lm_tokenizer if lm_tokenizer is not None else self.lm_tokenizer
        if self.terms is not None:  # each term on its own path; "ids" when every term took the ids path
            out = self._summed(lambda t: t.score_ids(prompt_ids, response_ids, lm_tok, fast=fast), None, None)
            self.last_path = "ids" if all(t.last_path == "ids" for t, _ in self.terms) else "text"
            return out
        if lm_tok is None:
            raise ValueError(
                "score_ids needs the LM's tokenizer to read token ids: pass lm_tokenizer= here or "
                "to RewardWrapper.from_model/from_callable/build."
            )
        eligible, why = self.fast_path(lm_tok)
        if fast and not eligible:
            raise ValueError(f"score_ids(fast=True) is impossible: {why}; use fast=None or False.")
        lm_template = self._inputs.specials if self._inputs is not None and lm_tok is self.tokenizer \
            else self._lm_template(lm_tok)
        prompt_content = [strip_template(list(map(int, p)), lm_template) for p in prompt_ids]
        eos = self.response_end_id(lm_tok)
        specials = response_special_ids(lm_tok) | ({eos} if eos is not None else set())
        response_content = [response_content_ids(ids, eos, specials) for ids in response_ids]
        if not eligible or fast is False:
            self.last_path = "text"  # decode with the LM tokenizer, re-tokenize with the RM's
            chat = chat_format_of(lm_tok) or self.chat
            prompts = lm_tok.batch_decode(prompt_content, skip_special_tokens=False)
            if chat is not None:  # a rendered prompt keeps the template's own BOS, so it reads as rendered
                whole = lm_tok.batch_decode([list(map(int, p)) for p in prompt_ids], skip_special_tokens=False)
                prompts = [w if chat.is_rendered(w) else p for w, p in zip(whole, prompts)]
            responses = lm_tok.batch_decode(response_content, skip_special_tokens=False)
            return self._score_text(prompts, responses, chat)
        self.last_path = "ids"
        assert self.tokenizer is not None
        tok = self.tokenizer
        seqs: list[list[int]] = []
        reads = bool(self.rules.turn_markers or self.rules.strip_prefix)
        for p, r in zip(prompt_content, response_content):
            if reads:
                text = tok.decode(r, skip_special_tokens=False)
                cut = self.rules.read(text)
                if cut != text:
                    r = list(tok(cut, add_special_tokens=False)["input_ids"])
            seqs.append(self._wrap(p + r))
        return self._model_scores(seqs, None, None, None, (prompt_content, response_content))

    # ------------------------------------------------------------------ seams for candidate scoring
    @property
    def template_ids(self) -> SpecialTemplate | None:
        """The special ids the reward tokenizer adds (before, after) one sequence, e.g.
        ``([bos], [])``; None for a function backend or when unknowable. With ``rules.append_eos`` the suffix
        starts with the RM's EOS (so the candidate scorer's prefix cache, which cannot append it, stands aside)."""
        if self._inputs is None or self._inputs.specials is None:
            return None
        prefix, suffix = self._inputs.specials
        return prefix, self._inputs.eos_ids + suffix

    def fast_path(self, lm_tokenizer: PreTrainedTokenizerBase) -> tuple[bool, str]:
        """Whether `score_ids` can feed `lm_tokenizer`'s ids to the reward model as they are
        (the ids fast path), and if not, why (a sentence for messages)."""
        if self.terms is not None:
            reasons = [f"term {t.name!r}: {why}" for t, _ in self.terms for ok, why in [t.fast_path(lm_tokenizer)]
                       if not ok]
            return not reasons, "; ".join(reasons)
        if self.model is None or self.tokenizer is None:
            return False, f"the backend of {self.name!r} is a function, which scores text"
        if self.template != "concat":
            return False, "template='pair' scores text pairs"
        if self._inputs is None or self._inputs.specials is None:
            return False, "the reward tokenizer's special-token template could not be determined"
        rm_tok = self.tokenizer
        chat = chat_format_of(lm_tokenizer) or self.chat
        if chat is not None:  # chat-rendered prompts: ids serve only an RM that reads them as the LM renders
            reading, rm_chat_tok = self._chat_rm(chat)
            if reading != "same" or rm_chat_tok is None:
                return False, ("the reward model reads the conversation in its own chat template" if reading == "own"
                               else "the reward model has no chat template, so it reads the user message")
            rm_tok = rm_chat_tok
        cached = self._match_cache
        if cached is not None and cached[0]() is lm_tokenizer:
            same = cached[1]
        else:
            same = tokenizers_match(rm_tok, lm_tokenizer)
            self._match_cache = (weakref.ref(lm_tokenizer), same)
        return same, ("" if same else "the reward tokenizer differs from the LM tokenizer")

    def score_model_inputs(self, seqs: list[list[int]]) -> list[float]:
        """The reward model's scores of exact input id sequences (specials included, no cutting or
        truncation), batched; counted in ``calls``/``pairs_scored``. Model backend only."""
        if self.model is None:
            what = "a function" if self.fn is not None else "a weighted sum (score each term's model apart)"
            raise ValueError(f"score_model_inputs needs a reward-model backend; {self.name!r} is {what}.")
        return self._model_scores(seqs, None, None, None)

    def fit_to_max_length(self, ids: list[int]) -> list[int]:
        """The last ``max_length`` of `ids` (the oldest tokens give way, counted in ``truncated``)."""
        if self._inputs is None:
            return ids
        ids, truncated = self._inputs.fit(ids)
        self.truncated += truncated
        return ids

    def count_call(self, pairs: int) -> None:
        """Count one backend call that scored `pairs` pairs on this wrapper's model outside it
        (the candidate scorer's cached forwards), so compute accounting stays whole."""
        self.calls += 1
        self.pairs_scored += int(pairs)

    # ------------------------------------------------------------------ internals
    def _summed(
        self, score: Callable[[RewardWrapper], list[float]], prompts: list[str] | None, responses: list[str] | None
    ) -> list[float]:
        """A weighted sum's scores (`WeightedSum.weighted_scores`): each term checks its own scores and names
        a bad pair; the sum is checked too (`prompts`/`responses` name pairs in its error)."""
        out = self.weighted_scores(score)
        self._check_finite(out, prompts, responses, None)
        return out

    def _wrap(self, body: list[int]) -> list[int]:
        """The reward model's specials around a body of content ids, truncated to ``max_length`` (counted)."""
        assert self._inputs is not None
        ids, truncated = self._inputs.wrap(body)
        self.truncated += truncated
        return ids

    def _model_scores(
        self,
        seqs: list[list[int]],
        token_types: list[list[int]] | None,
        prompts: list[str] | None,
        responses: list[str] | None,
        id_pairs: tuple[list[list[int]], list[list[int]]] | None = None,
    ) -> list[float]:
        assert self.model is not None
        for i, ids in enumerate(seqs):
            if not ids:
                p, r = self._pair_text(i, prompts, responses, id_pairs)
                raise ValueError(
                    f"pair {i} (prompt {short(p)}, response {short(r)}) tokenizes to nothing for reward "
                    f"model {self.name!r}; give a non-empty prompt or response."
                )
        out, calls = model_scores(self.model, seqs, token_types, int(self.model.config.pad_token_id), self.batch_size)
        self.calls += calls
        self.pairs_scored += len(seqs)
        self._check_finite(out, prompts, responses, id_pairs)
        return out

    def _callable_scores(
        self, prompts: list[str], responses: list[str], shown: tuple[list[str], list[str]] | None = None
    ) -> list[float]:
        """`fn` on the pairs in batches; `shown` = the pairs as the caller gave them (for error messages)."""
        assert self.fn is not None
        out, calls = function_scores(self.fn, prompts, responses, self.batch_size, self.name)
        self.calls += calls
        self.pairs_scored += len(prompts)
        self._check_finite(out, *(shown or (prompts, responses)), None)
        return out

    def _pair_text(
        self,
        i: int,
        prompts: list[str] | None,
        responses: list[str] | None,
        id_pairs: tuple[list[list[int]], list[list[int]]] | None,
    ) -> tuple[str, str]:
        if prompts is not None and responses is not None:
            return prompts[i], responses[i]
        if id_pairs is not None and self.tokenizer is not None:
            return self.tokenizer.decode(id_pairs[0][i]), self.tokenizer.decode(id_pairs[1][i])
        return "?", "?"

    def _check_finite(
        self,
        scores: list[float],
        prompts: list[str] | None,
        responses: list[str] | None,
        id_pairs: tuple[list[list[int]], list[list[int]]] | None,
    ) -> None:
        check_finite(scores, f"{self.kind} {self.name!r}",
                     lambda i: self._pair_text(i, prompts, responses, id_pairs))
