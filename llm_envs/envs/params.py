"""The MDP parameters of each env: frozen, validated dataclasses, the one source of defaults.

`TokenAcceptParams` / `TokenChoiceParams` hold what defines the MDP (candidate pool, SKAM
threshold, budgets, observation layout, costs). What the MDP runs on (the LM, tokenizer,
reward wrapper, prompts, gold judge, device, dtype) is not here: those are the world keywords
of the env constructors (`WORLD_KEYWORDS`).

This module imports nothing heavy (no torch, no transformers), so a config loader or a command
line can build and validate params without loading a model. The env modules re-export them:
`from llm_envs.envs.token_accept import TokenAcceptParams` works too.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from llm_envs.config import did_you_mean

P = TypeVar("P")

# Constructor keywords that pick the world an env runs in (and how it runs there); every other keyword
# is an MDP parameter.
WORLD_KEYWORDS = ("lm", "reward", "prompts", "tokenizer", "gold", "device", "dtype", "max_prompt_tokens",
                  "chat_template", "system_prompt", "reward_rules", "reward_tokenizer", "context", "prefill_ahead")


class UnknownArgumentError(TypeError, ValueError):
    """An env got a keyword it does not have. A `TypeError` as Python raises for an unexpected
    keyword, and a `ValueError` as the config loader raises for an unknown key, so callers that
    catch either see it."""


def _help(text: str) -> dict[str, str]:
    return {"help": text}


def _fail(name: str, value: Any, expected: str, fix: str) -> None:
    raise ValueError(f"{name}={value!r}; expected {expected}. {fix}")


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _check_sampling(top_p: Any, temperature: Any) -> None:
    if not (_is_real(top_p) and 0.0 < top_p <= 1.0):
        _fail("top_p", top_p, "a number with 0 < top_p <= 1", "Use 1.0 to keep every token, 0.9 for a typical nucleus.")
    if not (_is_real(temperature) and temperature > 0.0):
        _fail("temperature", temperature, "a positive number", "Use 1.0 for the LM's own distribution.")


def _check_budget(max_new_tokens: Any, max_steps: Any) -> None:
    if not (_is_int(max_new_tokens) and max_new_tokens >= 1):
        _fail("max_new_tokens", max_new_tokens, "a positive int (the response budget in tokens)", "Pass e.g. 32.")
    if max_steps is not None and not (_is_int(max_steps) and max_steps >= 1):
        _fail("max_steps", max_steps, "a positive int or None", "Pass None for the env's default step cap.")


def _check_cost(name: str, value: Any) -> None:
    if not (_is_real(value) and value >= 0):
        _fail(name, value, "a finite number >= 0", "Pass 0.0 to switch the cost off.")


def _check_choice(name: str, value: Any, options: tuple[str, ...]) -> None:
    if value not in options:
        _fail(name, value, f"one of {list(options)}", f"Pass {options[0]!r} (the default).{did_you_mean(str(value), options)}")


def _check_hidden_layer(value: Any) -> None:
    if not _is_int(value):
        _fail("hidden_layer", value, "an int index into the LM's hidden states", "Pass -1 for the last layer.")


@dataclass(frozen=True)
class TokenAcceptParams:
    """The Proxy-RLHF accept/reject MDP's settings (see `TokenAcceptEnv`'s env card)."""

    top_p: float = field(default=0.9, metadata=_help(
        "candidate pool = the top-p nucleus of softmax(logits / temperature)"))
    top_k: int | None = field(default=None, metadata=_help("optional cap on the pool size (at most the LM's vocabulary); None = no cap"))
    temperature: float = field(default=1.0, metadata=_help("the paper sweeps 0.25, 0.5, 0.75, 1.0"))
    p_t: float = field(default=0.01, metadata=_help(
        "SKAM threshold: reject is allowed iff the mean p over the remaining pool > p_t "
        "(the paper: 0.1 ... 0.0001)"))
    max_rejections: int | None = field(default=None, metadata=_help(
        "optional cap on rejections per position; None = SKAM alone decides"))
    max_new_tokens: int = field(default=32, metadata=_help("response budget: accepted tokens before truncation"))
    max_steps: int | None = field(default=None, metadata=_help(
        "step cap (accepts + rejects) before truncation; None = 8 * max_new_tokens"))
    obs_mode: Literal["candidate", "prefix"] = field(default="candidate", metadata=_help(
        "'candidate' = h(x, y<i, t_i) (the paper's state); 'prefix' = h(x, y<i) + the candidate's "
        "embedding (a reject needs no LM forward)"))
    invalid_action: Literal["accept", "raise"] = field(default="accept", metadata=_help(
        "a masked reject is coerced to accept ('accept') or raises ('raise')"))
    rejection_cost: float = field(default=0.0, metadata=_help("reward cost per reject"))
    deviation_beta: float = field(default=0.0, metadata=_help(
        "beta of the per-accept cost beta * (log p(top1) - log p(accepted))"))
    hidden_layer: int = field(default=-1, metadata=_help("which hidden state the observation holds; -1 = last layer"))
    decision_mask: Literal["skam", "entropy", "confidence"] = field(default="skam", metadata=_help(
        "where reject is legal: 'skam' = SKAM alone; 'entropy' = SKAM and only at positions whose LM entropy "
        ">= entropy_threshold; 'confidence' = SKAM and only where the LM's top-1 probability < "
        "confidence_threshold (p_t=0 leaves of SKAM only 'never reject the last candidate')"))
    entropy_threshold: float | None = field(default=None, metadata=_help(
        "decision_mask='entropy' only: the gate opens where H(softmax(logits / temperature)), in nats over the "
        "full vocabulary, is >= this"))
    confidence_threshold: float | None = field(default=None, metadata=_help(
        "decision_mask='confidence' only: the gate opens where max softmax(logits / temperature) is < this "
        "(0 < value <= 1)"))

    def __post_init__(self) -> None:
        _check_sampling(self.top_p, self.temperature)
        if self.top_k is not None and not (_is_int(self.top_k) and self.top_k >= 1):
            _fail("top_k", self.top_k, "a positive int, or None for no cap", "Pass None to keep the whole nucleus.")
        if not (_is_real(self.p_t) and 0.0 <= self.p_t < 1.0):
            _fail("p_t", self.p_t, "a number with 0 <= p_t < 1", "The paper uses 0.1, 0.01, 0.001 or 0.0001.")
        if self.max_rejections is not None and not (_is_int(self.max_rejections) and self.max_rejections >= 0):
            _fail("max_rejections", self.max_rejections, "an int >= 0 or None", "Pass None for no cap.")
        _check_budget(self.max_new_tokens, self.max_steps)
        _check_choice("obs_mode", self.obs_mode, ("candidate", "prefix"))
        _check_choice("invalid_action", self.invalid_action, ("accept", "raise"))
        _check_cost("rejection_cost", self.rejection_cost)
        _check_cost("deviation_beta", self.deviation_beta)
        _check_hidden_layer(self.hidden_layer)
        _check_decision_mask(self.decision_mask, self.entropy_threshold, self.confidence_threshold)


def _check_decision_mask(mask: Any, entropy_threshold: Any, confidence_threshold: Any) -> None:
    """A gate's threshold is required by its mask and read by no other: a threshold set beside another
    mask (most likely a forgotten `decision_mask=...`) would silently do nothing, so it is an error."""
    _check_choice("decision_mask", mask, ("skam", "entropy", "confidence"))
    thresholds = {"entropy": ("entropy_threshold", entropy_threshold),
                  "confidence": ("confidence_threshold", confidence_threshold)}
    for owner, (name, value) in thresholds.items():
        if mask != owner and value is not None:
            _fail(name, value, f"None, since decision_mask={mask!r} does not read it",
                  f"Pass decision_mask={owner!r} to gate rejects by it, or drop {name}.")
    if mask == "entropy" and not (_is_real(entropy_threshold) and entropy_threshold >= 0.0):
        _fail("entropy_threshold", entropy_threshold, "a finite number of nats >= 0 with decision_mask='entropy'",
              "Pass e.g. entropy_threshold=1.0 (0 opens the gate everywhere; ln(vocabulary size) is the maximum).")
    if mask == "confidence" and not (_is_real(confidence_threshold) and 0.0 < confidence_threshold <= 1.0):
        _fail("confidence_threshold", confidence_threshold,
              "a top-1 probability with 0 < value <= 1 with decision_mask='confidence'",
              "Pass e.g. confidence_threshold=0.5 (reject only where the LM's top token has p < 0.5).")


@dataclass(frozen=True)
class TokenChoiceParams:
    """The pick-one-of-k MDP's settings (see `TokenChoiceEnv`'s env card)."""

    k: int = field(default=10, metadata=_help("candidate slots: the top-k tokens of the raw logits (ARGS uses 10); at most the LM's vocabulary"))
    top_p: float = field(default=1.0, metadata=_help(
        "slots outside the top-p nucleus of softmax(logits / temperature) are masked; 1.0 = none"))
    temperature: float = field(default=1.0, metadata=_help("temperature of the observed log-probs and the nucleus"))
    max_new_tokens: int = field(default=32, metadata=_help("response budget in tokens"))
    max_steps: int | None = field(default=None, metadata=_help(
        "step cap before truncation, when smaller than max_new_tokens; None = max_new_tokens"))
    obs_rewards: bool = field(default=False, metadata=_help(
        "add candidate_rewards() to the observation (one reward-model call per step)"))
    dense_reward: bool = field(default=False, metadata=_help(
        "reward every step with R(x, y<=t) - R(x, y<t) instead of the terminal score alone"))
    deviation_beta: float = field(default=0.0, metadata=_help(
        "beta of the per-step cost beta * (log p(slot 0) - log p(chosen))"))
    invalid_action: Literal["top", "raise"] = field(default="top", metadata=_help(
        "a masked slot is replaced by slot 0 ('top') or raises ('raise')"))
    hidden_layer: int = field(default=-1, metadata=_help("which hidden state the observation holds; -1 = last layer"))
    prefix_cache: bool = field(default=True, metadata=_help(
        "score candidates reusing the reward model's KV cache of the prefix (same results; False = from scratch)"))

    def __post_init__(self) -> None:
        if not (_is_int(self.k) and self.k >= 1):
            _fail("k", self.k, "a positive int (the number of candidate slots)", "ARGS uses k=10.")
        object.__setattr__(self, "k", int(self.k))  # a numpy int from a sweep becomes a plain int
        _check_sampling(self.top_p, self.temperature)
        _check_budget(self.max_new_tokens, self.max_steps)
        for name in ("obs_rewards", "dense_reward", "prefix_cache"):
            if not isinstance(getattr(self, name), bool):
                _fail(name, getattr(self, name), "True or False", f"Pass {name}=True or {name}=False.")
        _check_cost("deviation_beta", self.deviation_beta)
        _check_choice("invalid_action", self.invalid_action, ("top", "raise"))
        _check_hidden_layer(self.hidden_layer)


def resolve_params(params_class: type[P], params: P | None, overrides: dict[str, Any], owner: str) -> P:
    """The params an env runs with: `params` (default: the class's defaults) with `overrides`
    (MDP keywords passed one by one) replacing its fields. An unknown keyword is an error with
    a "did you mean"."""
    names = [f.name for f in dataclasses.fields(params_class)]
    for key in overrides:
        if key not in names:
            raise UnknownArgumentError(
                f"{owner} got an unknown keyword argument {key!r}.{did_you_mean(key, names + list(WORLD_KEYWORDS))} "
                f"Its MDP parameters ({params_class.__name__}) are {names}; its world keywords are "
                f"{list(WORLD_KEYWORDS)}."
            )
    if params is None:
        return params_class(**overrides)
    if not isinstance(params, params_class):
        raise TypeError(
            f"params={params!r}; expected a {params_class.__name__}. Build one with "
            f"{params_class.__name__}(...) or pass its fields as keywords."
        )
    return dataclasses.replace(params, **overrides) if overrides else params


def params_fields(params_class: type) -> list[tuple[str, Any, Any, str]]:
    """(name, resolved type, default, help) of each field, in declaration order."""
    hints = typing.get_type_hints(params_class)
    return [(f.name, hints[f.name], f.default, f.metadata.get("help", "")) for f in dataclasses.fields(params_class)]


def arguments_doc(params_class: type) -> str:
    """The env card's list of MDP parameters, generated from the dataclass (defaults and help)."""
    return "\n".join(f"- `{name}={default!r}`: {text}." for name, _, default, text in params_fields(params_class))
