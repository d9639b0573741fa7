"""What every LM environment stands on: a frozen LM, its tokenizer, the reward wrapper, prompts.

`build_context` turns the public env kwargs (`lm`, `reward`, `prompts`, `gold`, `device`,
`dtype`) into one `LMContext`. With nothing given it uses the embedded world (building it on
first use, with a message): the world's SFT LM, its reward model, its train prompts and its
gold judge.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from llm_envs.data import PromptSet, load_prompts
from llm_envs.models import context_length, load_causal_lm, model_source_name, resolve_tokenizer
from llm_envs.rewards import RewardWrapper

GoldFn = Callable[[list[str], list[str]], Sequence[float]]


@dataclass(frozen=True)
class LMContext:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    reward: RewardWrapper
    prompts: PromptSet
    prompt_ids: list[list[int]]
    gold: RewardWrapper | None
    lm_name: str

    @property
    def eos_token_id(self) -> int | None:
        return self.tokenizer.eos_token_id

    @property
    def max_context(self) -> int | None:
        return context_length(self.model)

    def pick_prompt(
        self, rng: np.random.Generator, options: dict[str, Any], max_new_tokens: int
    ) -> tuple[str, int | None, list[int]]:
        """The prompt an episode starts from: `options["prompt"]`, `options["prompt_index"]`, or
        one drawn uniformly with `rng`. Returns (text, index or None, token ids); a prompt that
        leaves no room for `max_new_tokens` in the model's context is a clear error."""
        unknown = set(options) - {"prompt", "prompt_index"}
        if unknown:
            raise ValueError(f"reset options {sorted(unknown)} are unknown; expected 'prompt' or 'prompt_index'.")
        if "prompt" in options:
            prompt, index = options["prompt"], None
            prompt_ids = self.encode(prompt)
        else:
            n = len(self.prompts)
            index = options.get("prompt_index")
            if index is None:
                index = int(rng.integers(n))
            elif isinstance(index, bool) or not isinstance(index, (int, np.integer)) or not 0 <= index < n:
                raise ValueError(f"prompt_index={index!r}; expected an int in [0, {n}).")
            index = int(index)
            prompt, prompt_ids = self.prompts[index], self.prompt_ids[index]
        limit = self.max_context
        if limit is not None and len(prompt_ids) + max_new_tokens > limit:
            raise ValueError(
                f"prompt {prompt[:80]!r} has {len(prompt_ids)} tokens; with max_new_tokens="
                f"{max_new_tokens} that exceeds the model's context of {limit} positions. Use "
                f"shorter prompts (max_prompt_tokens={limit - max_new_tokens} drops longer "
                "ones) or a smaller max_new_tokens."
            )
        return prompt, index, list(prompt_ids)

    def encode(self, prompt: str) -> list[int]:
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"prompt={prompt!r} is empty; pass a non-empty string.")
        ids = self.tokenizer(prompt)["input_ids"]
        if not ids:
            raise ValueError(f"prompt={prompt!r} encodes to no tokens with {self.lm_name}'s tokenizer.")
        return list(ids)


def build_context(
    *,
    lm: str | PreTrainedModel | None = None,
    tokenizer: str | PreTrainedTokenizerBase | None = None,
    reward: Any = None,
    prompts: Any = None,
    gold: GoldFn | None = None,
    device: str | torch.device | None = "auto",
    dtype: str | torch.dtype | None = "auto",
    max_prompt_tokens: int | None = None,
    reward_kwargs: dict[str, Any] | None = None,
) -> LMContext:
    """Resolve the env kwargs. `lm=None` means the embedded world for every unset part."""
    world = None
    if lm is None or reward is None or prompts is None:
        from llm_envs.world import load_world

        world = load_world()
    if lm is None:
        lm, tokenizer = world.lm_dir, tokenizer or world.lm_dir
        if gold is None:
            gold = world.gold
    model = load_causal_lm(lm, device=device, dtype=dtype)
    tok = resolve_tokenizer(tokenizer, lm, model)
    if reward is None:
        reward = world.rm_dir
    reward_wrapper = RewardWrapper.build(
        reward, **{"lm_tokenizer": tok, "device": device, "dtype": dtype, **(reward_kwargs or {})}
    )
    prompt_set = load_prompts(
        "world:train" if prompts is None else prompts,
        tokenizer=tok if max_prompt_tokens else None,
        max_prompt_tokens=max_prompt_tokens,
    )
    context = LMContext(
        model=model,
        tokenizer=tok,
        reward=reward_wrapper,
        prompts=prompt_set,
        prompt_ids=[],
        gold=RewardWrapper.from_callable(gold, name="gold") if gold is not None else None,
        lm_name=model_source_name(lm),
    )
    context.prompt_ids.extend(context.encode(p) for p in prompt_set.prompts)
    return context


def context_for_env(context: LMContext | None, **kwargs: Any) -> LMContext:
    """An env's context: the one passed in (shared between envs), or one built from the env's
    kwargs (see `build_context`); either way it must hold at least one prompt."""
    ctx = context or build_context(**kwargs)
    if len(ctx.prompts) == 0:
        raise ValueError("the prompt source holds no prompts; pass a non-empty list or dataset.")
    return ctx

