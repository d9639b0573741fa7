"""The evaluation rules of a protocol beyond how the reward model reads a response: one frozen config.

The reward wrapper's own rules (`llm_envs.reward_rules.RewardRules`, ``task.reward_rules``) say what the
reward model reads; these (``bench.metrics``) say how the harness (`agents.harness`) turns the scored
responses into the leaderboard's numbers:

- **skip and count** (`reward_skip_tokens`): a pair whose reward-model input has at least this many tokens
  (`RewardWrapper.input_lengths`: the RM's specials and an appended EOS included) is not scored; its record
  says so (``reward: null``, ``reward_skipped: true``), a method's mean reward is over the pairs scored, and
  the leaderboard counts the skipped ones. ARGS's ``measure_reward.py`` skips pairs of >= 1334 tokens.
- **the text of diversity and coherence** (`text_stops`): both read the response up to the first of these
  strings (ARGS's ``metrics.py`` cuts at ``"###Human:"`` and ``"\\n\\nHuman:"``, case-sensitive, nothing
  stripped); the reward is read by the wrapper's rules, not these.
- **diversity's words** (`diversity_tokenizer`): ``"regex"`` (words and punctuation marks, no download) or
  ``"nltk"`` (``nltk.word_tokenize``, as ARGS computes it: needs ``pip install nltk`` and its ``punkt_tab``
  data, ``python -m nltk.downloader punkt_tab``).
- **coherence's embedding** (`coherence_pooling`, `coherence_max_length`): ``"mean"`` (mean-pooled last hidden
  states, the default encoder of the offline suites), ``"pooler"`` (the encoder's pooler output: SimCSE's
  ``"cls"`` for supervised models such as ``princeton-nlp/sup-simcse-bert-base-uncased``, which ARGS uses) or
  ``"cls"`` (the first token's last hidden state: SimCSE's ``"cls_before_pooler"``); inputs truncated to
  ``coherence_max_length`` tokens (SimCSE's tool: 128).

`MetricRules()` are the rules of every suite before protocols were settings, so records made under them keep
their fingerprints.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Sequence

__all__ = ["DiversityTokenizer", "MetricRules", "Pooling"]

DiversityTokenizer = Literal["regex", "nltk"]
Pooling = Literal["mean", "cls", "pooler"]


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass(frozen=True)
class MetricRules:
    """How the harness scores a method's responses beyond the reward wrapper: skip rule, diversity, coherence."""

    reward_skip_tokens: int | None = field(default=None, metadata=_help(
        "pairs whose reward-model input has at least this many tokens are not scored and are counted (ARGS's "
        "measure_reward.py: 1334); a row's reward is the mean over the pairs scored. null = score every pair"))
    text_stops: tuple[str, ...] = field(default=(), metadata=_help(
        "diversity and coherence read the response up to the first of these strings (ARGS's metrics.py: "
        "['###Human:', '\\n\\nHuman:']); [] = the whole response"))
    diversity_tokenizer: DiversityTokenizer = field(default="regex", metadata=_help(
        "words of the diversity metric: regex (words and punctuation, no download) or nltk (nltk.word_tokenize, "
        "as ARGS: pip install nltk, then python -m nltk.downloader punkt_tab)"))
    coherence_pooling: Pooling = field(default="mean", metadata=_help(
        "sentence embedding of the coherence metric: mean (mean-pooled last hidden states), pooler (the encoder's "
        "pooler output: SimCSE's 'cls' for supervised models, as ARGS), cls (first token's last hidden state)"))
    coherence_max_length: int | None = field(default=None, metadata=_help(
        "truncate each text to this many encoder tokens before embedding (SimCSE's tool: 128); null = no limit"))

    def __post_init__(self) -> None:
        limit = self.reward_skip_tokens
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 2):
            raise ValueError(f"bench.metrics.reward_skip_tokens={limit!r}; expected an int >= 2 (ARGS: 1334) or null "
                             "to score every pair.")
        stops = self.text_stops
        if isinstance(stops, str) or not isinstance(stops, Sequence) or not all(isinstance(s, str) and s
                                                                                 for s in stops):
            raise ValueError(f"bench.metrics.text_stops={stops!r}; expected a list of non-empty strings, e.g. "
                             "['###Human:', '\\n\\nHuman:'] (or [] for the whole response).")
        object.__setattr__(self, "text_stops", tuple(stops))
        if self.diversity_tokenizer not in ("regex", "nltk"):
            raise ValueError(f"bench.metrics.diversity_tokenizer={self.diversity_tokenizer!r}; expected 'regex' or "
                             "'nltk'.")
        if self.coherence_pooling not in ("mean", "cls", "pooler"):
            raise ValueError(f"bench.metrics.coherence_pooling={self.coherence_pooling!r}; expected 'mean', 'pooler' "
                             "or 'cls'.")
        length = self.coherence_max_length
        if length is not None and (isinstance(length, bool) or not isinstance(length, int) or length < 2):
            raise ValueError(f"bench.metrics.coherence_max_length={length!r}; expected an int >= 2 (SimCSE: 128) or "
                             "null for no limit.")

    @property
    def is_default(self) -> bool:
        return self == MetricRules()

    def metric_text(self, response: str) -> str:
        """The response as diversity and coherence read it: up to the first of `text_stops` (ARGS's
        ``clean(clean(r, "###Human:"), "\\n\\nHuman:")`` is a cut at the earliest of the two)."""
        cut = len(response)
        for stop in self.text_stops:
            idx = response.find(stop, 0, cut)
            if idx != -1:
                cut = idx
        return response[:cut]

    def skipped(self, lengths: Sequence[int]) -> list[bool]:
        """Which pairs the skip rule leaves unscored, given their reward-model input lengths."""
        limit = self.reward_skip_tokens
        return [limit is not None and n >= limit for n in lengths]
