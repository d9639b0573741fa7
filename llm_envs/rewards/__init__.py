"""The reward wrapper shared by every method: scores (prompt, response) pairs, and candidate tokens.

Its modules, each importing only the ones before it (`inputs`, `backends` and `combination`, the weighted sum,
stand side by side), over `llm_envs.reward_rules` (below this package, no torch: `RewardRules`, how a response is
read before scoring -- turn markers, their case, the whitespace at a cut, a prefix to strip, an appended EOS):

- `llm_envs.rewards.text`: the conventions as plain functions -- turn cutting (`cut_at_turn`,
  `DEFAULT_TURN_MARKERS`), joining a prompt and a response, special-token templates, response
  special ids/strings, whether two tokenizers match (the ids fast path);
- `llm_envs.rewards.inputs`: `ModelInputs`, how text becomes a reward model's input ids (its specials, an
  appended EOS, truncation to its length, a chat prompt read as the wrapper decided);
- `llm_envs.rewards.backends`: a reward model or a function run on ready
  inputs, batched, and the checks on a call's pairs and on the scores;
- `llm_envs.rewards.wrapper`: `RewardWrapper`, which scores pairs in batches with a reward model
  or a function (texts or LM token ids; counts calls for compute accounting);
- `llm_envs.rewards.candidates`: `CandidateScorer` / `score_candidates`, which score k candidate
  next tokens after N growing prefixes, reusing the reward model's KV cache of each prefix.

Everything public is importable from here: ``from llm_envs.rewards import RewardWrapper``.
"""

from llm_envs.reward_rules import RewardRules
from llm_envs.rewards.candidates import CandidateScorer, Scoring, prefix_cache_verdict, score_candidates
from llm_envs.rewards.text import (
    DEFAULT_TURN_MARKERS,
    SpecialTemplate,
    as_id_rows,
    clean_response_text,
    cut_at_turn,
    join_prompt_response,
    response_content_ids,
    response_special_ids,
    response_special_strings,
    special_template,
    strip_template,
    tokenizers_match,
)
from llm_envs.rewards.wrapper import RewardFn, RewardWrapper, Template

__all__ = [
    "DEFAULT_TURN_MARKERS",
    "CandidateScorer",
    "RewardFn",
    "RewardRules",
    "RewardWrapper",
    "Scoring",
    "SpecialTemplate",
    "Template",
    "as_id_rows",
    "clean_response_text",
    "cut_at_turn",
    "join_prompt_response",
    "prefix_cache_verdict",
    "response_content_ids",
    "response_special_ids",
    "response_special_strings",
    "score_candidates",
    "special_template",
    "strip_template",
    "tokenizers_match",
]
