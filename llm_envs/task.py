"""The task every method of a suite faces: one LM, one reward model, the prompts, the gold judge.

- `Task`: the config (a suite's `task:` section), `TaskSources`: it resolved (the embedded world
  fills unset parts), `LMContext`: it loaded (models, tokenizer, reward wrapper, encoded prompts),
  which every env and decoder of the task shares. `build_context` turns an env's world keywords
  (`lm`, `reward`, `prompts`, `gold`, `device`, `dtype`, `chat_template`, ...) into an `LMContext`.

Chat templates (`chat_template=True`, optional `system_prompt`): the context's tokenizer is the LM's
`llm_envs.chat.chat_tokenizer` (its EOS is the template's end-of-turn token), its prompts are the
user messages rendered through the LM's template (`LMContext.prompts.prompts`; the messages in
`.messages`), and the reward wrapper and gold judge know the format, so each reads the conversation
in its own terms (see `llm_envs.rewards.wrapper`).

A suite file's `task:` section is a `Task`; the proxy, RRHF, ARGS and every decoder read their LM,
reward model, prompts, response budget and device from it, so a leaderboard compares methods on
one task by construction.

    task = Task(lm="gpt2", reward="OpenAssistant/reward-model-deberta-v3-large-v2")   # or Task(): the world
    sources = task.resolve()                       # the embedded world fills every unset part
    sources.lm, sources.reward, sources.eval_prompts, sources.gold, sources.world_hash

A task's reward may be a weighted sum of models (`llm_envs.reward_spec`, MARA's reward − cost): ``reward:
[{model: REWARD, weight: 1.0}, {model: COST, weight: -1.0}]``, held as a tuple of `RewardTerm`s.

How the reward model reads a response is the task's too (``reward_rules``, `llm_envs.reward_rules.RewardRules`):
the turn markers a response is cut at and their case, the whitespace at the cut, a prefix to strip, and
whether the RM's EOS is appended (safe-rlhf score models). Every method is trained, guided and scored under
them. ``reward_tokenizer`` names the RM's tokenizer when its checkpoint ships none (ARGS's RM is scored with
the SFT model's tokenizer).

`resolve()` loads (or builds) the embedded world only when some part needs it: an unset `lm` or
`reward`, or a `"world:train"` / `"world:test"` prompt source (the world's gold judge is a function
of the text alone). Worlds live in `$LLM_ENVS_CACHE` (default `~/.cache/llm_envs`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal, Sequence

import numpy as np

from llm_envs.chat import ChatFormat, chat_format_of, encode_prompt
from llm_envs.config import did_you_mean
from llm_envs.data import PromptSet, load_prompts
from llm_envs.reward_rules import RewardRules, as_reward_rules
from llm_envs.reward_spec import RewardTerm, is_combination, reward_terms

if TYPE_CHECKING:  # loaded lazily: a task's config needs no torch
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from llm_envs.rewards import RewardWrapper

GoldFn = Callable[[list[str], list[str]], Sequence[float]]
WORLD_SPLITS = {"world:train": "train_prompts", "world:test": "test_prompts"}


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass(frozen=True)
class Task:
    """What every method is run and scored on."""

    lm: str | None = field(default=None, metadata=_help(
        "frozen causal LM: hub name or save_pretrained directory; null = the embedded world's SFT LM"))
    reward: str | Sequence[Mapping[str, Any] | RewardTerm] | None = field(default=None, metadata=_help(
        "reward model: hub name or directory of a sequence classifier (num_labels=1) or a safe-rlhf score model "
        "(e.g. PKU-Alignment/beaver-7b-v1.0-reward); or a weighted sum of models, [{model: NAME, weight: 1.0}, "
        "{model: COST_MODEL, weight: -1.0}] (MARA: reward - cost); null = the world's RM"))
    train_prompts: Any = field(default="world:train", metadata=_help(
        "prompts methods train on: a list, a .jsonl file, a dataset name/dir or {dataset, split, column} "
        "mapping (see llm_envs.data.load_prompts), or world:train"))
    eval_prompts: Any = field(default="world:test", metadata=_help(
        "held-out prompts every method is scored on (same forms as train_prompts)"))
    max_prompt_tokens: int | None = field(default=None, metadata=_help(
        "drop prompts longer than this many LM tokens (the Proxy-RLHF paper: 256); null = keep all"))
    max_new_tokens: int = field(default=32, metadata=_help(
        "response budget of every method, in LM tokens (the envs' max_new_tokens)"))
    gold: Literal["auto", "world", "none"] = field(default="auto", metadata=_help(
        "gold judge: 'auto' = the embedded world's when the LM is the world's; 'world' = always; 'none'"))
    world: str = field(default="default", metadata=_help(
        "embedded world preset that fills every unset part (llm-envs world build --preset ...)"))
    world_seed: int = field(default=0, metadata=_help("seed of the embedded world"))
    device: str = field(default="auto", metadata=_help("'auto' = cuda when present, else cpu; or 'cpu', 'cuda:1'"))
    dtype: str = field(default="auto", metadata=_help("LM dtype: auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16, float16"))
    chat_template: bool = field(default=False, metadata=_help(
        "render every prompt as a user message through the LM's chat template (episodes and decoders then "
        "stop at the template's end-of-turn token); needs an LM tokenizer with a chat template"))
    system_prompt: str | None = field(default=None, metadata=_help(
        "chat_template only: a system turn rendered before every message; null = the template's default"))
    reward_rules: RewardRules = field(default_factory=RewardRules, metadata=_help(
        "how the reward model reads a response (llm_envs.reward_rules): turn_markers it is cut at, case_sensitive, "
        "rstrip (the whitespace before a cut), strip_prefix, append_eos (the RM's EOS after the response, as "
        "safe-rlhf score models were trained); applies to every method's training, guidance and score"))
    reward_tokenizer: str | None = field(default=None, metadata=_help(
        "the reward model's tokenizer (hub name or directory) when its checkpoint has none (ARGS scores its RM "
        "with the SFT model's tokenizer); every model of a weighted sum uses it. null = the one saved beside "
        "the reward model"))

    def __post_init__(self) -> None:
        if is_combination(self.reward):  # held as a tuple of RewardTerm: hashable, validated once
            object.__setattr__(self, "reward", reward_terms(self.reward, where="task.reward"))
        elif self.reward is not None and not isinstance(self.reward, str):
            raise ValueError(f"task.reward={self.reward!r}; expected a reward model's hub name or directory, a list "
                             "of {model, weight} terms (e.g. [{model: REWARD, weight: 1.0}, {model: COST, weight: "
                             "-1.0}]), or null for the embedded world's reward model.")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"task.max_new_tokens={self.max_new_tokens!r}; expected a positive int (e.g. 32).")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise ValueError(f"task.max_prompt_tokens={self.max_prompt_tokens!r}; expected a positive int or null.")
        if self.gold not in ("auto", "world", "none"):
            raise ValueError(f"task.gold={self.gold!r}; expected 'auto', 'world' or 'none'.")
        check_chat_keywords(self.chat_template, self.system_prompt, where="task.")
        object.__setattr__(self, "reward_rules", as_reward_rules(self.reward_rules, where="task.reward_rules"))
        if self.reward_tokenizer is not None and (not isinstance(self.reward_tokenizer, str)
                                                  or not self.reward_tokenizer.strip()):
            raise ValueError(f"task.reward_tokenizer={self.reward_tokenizer!r}; expected a tokenizer's hub name or "
                             "directory, or null for the one saved beside the reward model.")
        for name in ("train_prompts", "eval_prompts"):
            source = getattr(self, name)
            if isinstance(source, str) and source.startswith("world:") and source not in WORLD_SPLITS:
                raise ValueError(f"task.{name}={source!r}; a world split is one of {sorted(WORLD_SPLITS)}.")

    @property
    def uses_world_gold(self) -> bool:
        return self.gold == "world" or (self.gold == "auto" and self.lm is None)

    def needs_world(self) -> bool:
        """Whether some part of the task comes from the built embedded world (its gold judge is a plain
        function of the text and needs no build)."""
        world_prompts = any(isinstance(s, str) and s in WORLD_SPLITS for s in (self.train_prompts, self.eval_prompts))
        return self.lm is None or self.reward is None or world_prompts

    def resolve(self, *, progress: bool = True) -> TaskSources:
        """Concrete sources: the world (loaded or built on first use) fills every unset part."""
        from llm_envs.world import load_world, world_gold  # lazy: the world imports torch

        world = load_world(self.world, self.world_seed, progress=progress) if self.needs_world() else None

        def prompts(source: Any) -> Any:
            if isinstance(source, str) and source in WORLD_SPLITS:
                return PromptSet(list(getattr(world, WORLD_SPLITS[source])), source=f"embedded world ({source})")
            return source

        return TaskSources(
            task=self,
            lm=self.lm if self.lm is not None else world.lm_source,
            reward=self.reward if self.reward is not None else str(world.rm_dir),
            train_prompts=prompts(self.train_prompts),
            eval_prompts=prompts(self.eval_prompts),
            gold=world_gold(self.world) if self.uses_world_gold else None,
            world_path=str(world.path) if world is not None else None,
            world_hash=world.hash if world is not None else None,
        )


@dataclass(frozen=True)
class TaskSources:
    """A resolved task: model sources (names or directories), prompt sources and the gold judge."""

    task: Task
    lm: str
    reward: str | tuple[RewardTerm, ...]  # one model, or a weighted sum (`llm_envs.reward_spec`)
    train_prompts: Any
    eval_prompts: Any
    gold: GoldFn | None
    world_path: str | None
    world_hash: str | None = None  # the world's content hash (`llm_envs.world.world_hash`) when the task uses it

    def env_kwargs(self, prompts: Any) -> dict[str, Any]:
        """The world keywords of an env (`gym.make(..., **kwargs)`) on this task with `prompts`."""
        task = self.task
        return {"lm": self.lm, "reward": self.reward, "prompts": prompts, "gold": self.gold, "device": task.device,
                "dtype": task.dtype, "max_prompt_tokens": task.max_prompt_tokens,
                "chat_template": task.chat_template, "system_prompt": task.system_prompt,
                "reward_rules": task.reward_rules, "reward_tokenizer": task.reward_tokenizer}

    def reward_kwargs(self) -> dict[str, Any]:
        """The task's keywords of `RewardWrapper.build` beyond the LM tokenizer and device: its rules and, when
        set, the reward tokenizer (for the methods that build the task's reward wrapper themselves)."""
        kwargs: dict[str, Any] = {"rules": self.task.reward_rules}
        if self.task.reward_tokenizer is not None:
            kwargs["tokenizer"] = self.task.reward_tokenizer
        return kwargs

    def context(self, prompts: Any = None) -> LMContext:
        """The loaded LM, tokenizer, reward wrapper and gold judge, with `prompts` (default: the
        held-out prompts) encoded: what envs and decoders of this task share."""
        return build_context(**self.env_kwargs(self.eval_prompts if prompts is None else prompts))

    @property
    def on_world_prompts(self) -> bool:
        """Training prompts are the world's (so its SFT corpus holds their dataset responses)."""
        return isinstance(self.task.train_prompts, str) and self.task.train_prompts in WORLD_SPLITS

    @property
    def sft_corpus(self) -> Path | None:
        """The world's {prompt, response} corpus (RRHF's dataset responses), when on a world that has
        one (a world around a real LM has no SFT corpus)."""
        path = Path(self.world_path) / "sft_corpus.jsonl" if self.world_path else None
        return path if path is not None and path.is_file() else None


@dataclass(frozen=True)
class TaskEnvKwargs:
    """The env keywords of `task` on its `split` prompts, resolved where this is called: a picklable
    zero-argument callable for the Ray env workers (`llm_envs.vector.ray_env`, `kwargs_factory=`), so
    each actor loads the LM and reward model itself, on its own device, instead of receiving loaded
    models pickled from the driver. Resolve the task once on the driver first when it may build the
    embedded world (the actors then find it in the cache; they never show progress)."""

    task: Task
    split: Literal["train", "eval"] = "train"

    def __post_init__(self) -> None:
        if self.split not in ("train", "eval"):
            raise ValueError(f"split={self.split!r}; expected 'train' or 'eval' (the task's train_prompts or "
                             "eval_prompts).")

    def __call__(self) -> dict[str, Any]:
        sources = self.task.resolve(progress=False)
        return sources.env_kwargs(sources.train_prompts if self.split == "train" else sources.eval_prompts)


@dataclass(frozen=True)
class LMContext:
    """A task loaded: the frozen LM and its tokenizer, the reward wrapper, the prompts (and their
    token ids), the gold judge. Envs built on one context share its models."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    reward: RewardWrapper
    prompts: PromptSet
    prompt_ids: list[list[int]]
    gold: RewardWrapper | None
    lm_name: str

    @property
    def eos_token_id(self) -> int | None:
        """Where episodes end: the tokenizer's EOS, which on a chat task is the template's end of turn."""
        return self.tokenizer.eos_token_id

    @property
    def chat(self) -> ChatFormat | None:
        """The LM's chat format when prompts are rendered through it (chat_template=True), else None."""
        return chat_format_of(self.tokenizer)

    @property
    def max_context(self) -> int | None:
        from llm_envs.models import context_length

        return context_length(self.model)

    def pick_prompt(
        self, rng: np.random.Generator, options: dict[str, Any], max_new_tokens: int
    ) -> tuple[str, int | None, list[int]]:
        """The prompt an episode starts from: `options["prompt"]`, `options["prompt_index"]`, or
        one drawn uniformly with `rng`. Returns (text, index or None, token ids); a prompt that
        leaves no room for `max_new_tokens` in the model's context is a clear error."""
        unknown = set(options) - {"prompt", "prompt_index"}
        if unknown:
            names = sorted(map(str, unknown))
            raise ValueError(f"reset options {names} are unknown; expected 'prompt' or "
                             f"'prompt_index'.{did_you_mean(names[0], ['prompt', 'prompt_index'])}")
        if "prompt" in options:
            prompt, index = options["prompt"], None
            if self.chat is not None and isinstance(prompt, str) and prompt.strip():
                prompt = self.chat.prompt(prompt)  # a user message is rendered; a rendered prompt kept
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
        ids = encode_prompt(self.tokenizer, prompt)  # a chat-rendered prompt gets no second BOS
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
    chat_template: bool = False,
    system_prompt: str | None = None,
    reward_rules: RewardRules | Mapping[str, Any] | None = None,
    reward_tokenizer: str | None = None,
) -> LMContext:
    """Load an env's world keywords into one `LMContext`. Unset `lm`, `reward` and `prompts` come
    from the default task (the embedded world: its SFT LM, reward model and train prompts; its gold
    judge too when the LM is the world's). `chat_template=True` renders the prompts through the LM's
    chat template (see the module docstring). `reward_rules` (`RewardRules` or a mapping of its fields)
    say how the reward model reads a response; `reward_tokenizer` is its tokenizer when its checkpoint has
    none."""
    from llm_envs.models import load_causal_lm, model_source_name, resolve_tokenizer
    from llm_envs.rewards import RewardWrapper

    if lm is None or reward is None or prompts is None:
        world = Task().resolve()  # the one place unset parts are filled in from the world
        if lm is None:
            lm, gold = world.lm, gold if gold is not None else world.gold
        reward = world.reward if reward is None else reward
        prompts = world.train_prompts if prompts is None else prompts
    check_chat_keywords(chat_template, system_prompt)
    model = load_causal_lm(lm, device=device, dtype=dtype)
    tok = resolve_tokenizer(tokenizer, lm, model)
    if chat_template:
        tok = lm_chat_tokenizer(tok, system_prompt)
    extra: dict[str, Any] = {"rules": as_reward_rules(reward_rules, where="reward_rules")}
    if reward_tokenizer is not None:
        extra["tokenizer"] = reward_tokenizer
    reward_wrapper = RewardWrapper.build(
        reward, **{"lm_tokenizer": tok, "device": device, "dtype": dtype, **extra, **(reward_kwargs or {})}
    )
    prompt_set = load_prompts(
        prompts,
        tokenizer=tok if max_prompt_tokens else None,
        max_prompt_tokens=max_prompt_tokens,
        chat=chat_format_of(tok),
    )
    context = LMContext(
        model=model,
        tokenizer=tok,
        reward=reward_wrapper,
        prompts=prompt_set,
        prompt_ids=[],
        gold=RewardWrapper.from_callable(gold, name="gold", lm_tokenizer=tok) if gold is not None else None,
        lm_name=model_source_name(lm),
    )
    context.prompt_ids.extend(context.encode(p) for p in prompt_set.prompts)
    return context


def check_chat_keywords(chat_template: Any, system_prompt: Any, where: str = "") -> None:
    """`chat_template` is a bool; `system_prompt` a string that only means something with a template."""
    if not isinstance(chat_template, bool):
        raise ValueError(f"{where}chat_template={chat_template!r}; expected true or false (true renders every "
                         "prompt as a user message through the LM's chat template).")
    if system_prompt is not None and not isinstance(system_prompt, str):
        raise ValueError(f"{where}system_prompt={system_prompt!r}; expected a string or null.")
    if system_prompt is not None and not chat_template:
        raise ValueError(f"{where}system_prompt={system_prompt!r} is set but {where}chat_template is false, so it "
                         f"would be ignored; set {where}chat_template=true to render it, or drop system_prompt.")


def lm_chat_tokenizer(tokenizer: PreTrainedTokenizerBase, system_prompt: str | None = None) -> PreTrainedTokenizerBase:
    """The LM tokenizer of a chat task: `llm_envs.chat.chat_tokenizer` with the format learned from it
    (a tokenizer without a chat template is a `NoChatTemplateError` naming it and the fix)."""
    from llm_envs.chat import ChatFormat, chat_tokenizer

    known = chat_format_of(tokenizer)
    if known is not None and known.system_prompt == system_prompt:  # already the chat tokenizer (a task's)
        return tokenizer
    return chat_tokenizer(tokenizer, ChatFormat.learn(tokenizer, system_prompt))


def context_for_env(context: LMContext | None, **kwargs: Any) -> LMContext:
    """An env's context: the one passed in (shared between envs), or one built from the env's
    kwargs (see `build_context`); either way it must hold at least one prompt."""
    ctx = context or build_context(**kwargs)
    if len(ctx.prompts) == 0:
        raise ValueError("the prompt source holds no prompts; pass a non-empty list or dataset.")
    return ctx

