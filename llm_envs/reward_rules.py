"""How the reward wrapper reads a response before its reward model scores it: one set of rules, as data.

Every protocol reads a response its own way, and numbers are only comparable when the rules agree:

- the embedded world and the HH suites: cut the response at the next turn marker (``Human:``,
  ``Assistant:``, ``USER:``) and drop the whitespace before it (the default `RewardRules()`);
- ARGS's evaluation (deeplearning-wisc/args ``measure_reward.py``): strip a leading ``": "``, cut at the
  first ``human:`` in any case, keep everything before it (whitespace included), and score
  ``prompt + response`` as the reward model's tokenizer encodes it (its BOS, no EOS);
- safe-rlhf score models (``beaver-7b-v1.0-reward`` / ``-cost``, the Proxy-RLHF / MARA lineage) were trained
  on ``prompt + answer + EOS`` and read the score at the last token, so the reward model's EOS id is
  appended after the response (`append_eos`).

A suite states its rules once, in ``task.reward_rules``; the wrapper (`llm_envs.rewards.RewardWrapper`,
``rules=``) applies them on every path (text, LM token ids, candidate tokens), for every method: training
rewards, best-of-n's choice, ARGS's guidance and the leaderboard's score. This module is plain data and
string operations (no torch), so a config is validated where it is read.

    rules = RewardRules(turn_markers=("human:",), case_sensitive=False, strip_prefix=": ", rstrip=False)
    rules.read(": Sure.\\n\\nHUMAN: thanks")   # -> "Sure.\\n\\n"
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from llm_envs.config import did_you_mean

__all__ = ["DEFAULT_TURN_MARKERS", "RewardRules", "as_reward_rules"]

DEFAULT_TURN_MARKERS: tuple[str, ...] = ("Human:", "Assistant:", "USER:")


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass(frozen=True)
class RewardRules:
    """How a response is read before the reward model scores ``prompt + response`` (every method, every path)."""

    turn_markers: tuple[str, ...] = field(default=DEFAULT_TURN_MARKERS, metadata=_help(
        "cut the response at the first of these (HH convention: a model that keeps talking past its turn is "
        "scored on its turn); [] = no cut. ARGS's evaluation: [\"human:\"] with case_sensitive: false"))
    case_sensitive: bool = field(default=True, metadata=_help(
        "whether turn_markers match only in their own case (false: 'human:' also cuts at 'Human:' and 'HUMAN:', "
        "as ARGS's re.split(..., flags=re.IGNORECASE))"))
    rstrip: bool = field(default=True, metadata=_help(
        "where a response is cut, drop the whitespace before the marker (the '\\n\\n' before an HH turn belongs "
        "to that turn); false keeps it, as ARGS's evaluation does"))
    strip_prefix: str | None = field(default=None, metadata=_help(
        "remove this text from the start of a response that begins with it, before the cut (ARGS: ': '); "
        "null = none"))
    append_eos: bool = field(default=False, metadata=_help(
        "append the reward model's EOS token after the response (safe-rlhf score models such as "
        "PKU-Alignment/beaver-7b-v1.0-reward were trained on prompt + answer + EOS and read the last token); "
        "needs a reward model whose tokenizer has an EOS token, and the wrapper's 'concat' template"))

    def __post_init__(self) -> None:
        markers = self.turn_markers
        if isinstance(markers, str) or not isinstance(markers, Sequence) or not all(
                isinstance(m, str) for m in markers):
            raise ValueError(f"reward_rules.turn_markers={markers!r}; expected a list of strings, e.g. "
                             "[\"Human:\", \"Assistant:\"] (or [] for no cut).")
        if any(not m for m in markers):
            raise ValueError(f"reward_rules.turn_markers={list(markers)!r} holds an empty string, which would cut "
                             "every response at its start; remove it.")
        object.__setattr__(self, "turn_markers", tuple(markers))
        for name in ("case_sensitive", "rstrip", "append_eos"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"reward_rules.{name}={getattr(self, name)!r}; expected true or false.")
        if self.strip_prefix is not None and (not isinstance(self.strip_prefix, str) or not self.strip_prefix):
            raise ValueError(f"reward_rules.strip_prefix={self.strip_prefix!r}; expected a non-empty string "
                             "(ARGS: ': ') or null for none.")

    @property
    def is_default(self) -> bool:
        """Whether these are the rules every suite used before rules were settings (records and run
        directories made under them keep their fingerprints)."""
        return self == RewardRules()

    def marker_cut(self, text: str) -> str:
        """`text` up to the first turn marker (matched per `case_sensitive`; trailing whitespace dropped per
        `rstrip`); unchanged when no marker occurs."""
        haystack = text if self.case_sensitive else text.lower()
        cut = len(text)
        for marker in self.turn_markers:
            idx = haystack.find(marker if self.case_sensitive else marker.lower(), 0, cut)
            if idx != -1:
                cut = idx
        if cut == len(text):
            return text
        return text[:cut].rstrip() if self.rstrip else text[:cut]

    def read(self, response: str) -> str:
        """The response as the reward model reads it: `strip_prefix` removed, then cut at a turn marker."""
        if self.strip_prefix and response.startswith(self.strip_prefix):
            response = response[len(self.strip_prefix):]
        return self.marker_cut(response)

    def changes(self, response: str) -> bool:
        """Whether `read` changes `response` (then a token-id path re-tokenizes the text it reads)."""
        return self.read(response) != response


_FIELDS = tuple(f.name for f in dataclasses.fields(RewardRules))


def as_reward_rules(value: Any, where: str = "reward_rules") -> RewardRules:
    """`RewardRules` from a `RewardRules`, a mapping of its fields, or None (the defaults); a wrong key or
    value is a ValueError naming `where`, the value and the fix."""
    if value is None:
        return RewardRules()
    if isinstance(value, RewardRules):
        return value
    if not isinstance(value, Mapping):
        raise ValueError(f"{where}={value!r} ({type(value).__name__}); expected a mapping of {list(_FIELDS)}, e.g. "
                         "{append_eos: true}, or null for the defaults.")
    for key in value:
        if key not in _FIELDS:
            raise ValueError(f"{where} has an unknown key {key!r}.{did_you_mean(str(key), _FIELDS)} Valid keys: "
                             f"{', '.join(_FIELDS)}.")
    try:
        return RewardRules(**dict(value))
    except ValueError as error:
        raise ValueError(str(error).replace("reward_rules.", f"{where}.", 1)) from error
