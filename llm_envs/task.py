"""The task every method of a suite faces: one LM, one reward model, the prompts, the gold judge.

A suite file's `task:` section is a `Task`; the proxy, RRHF, ARGS and every decoder read their LM,
reward model, prompts, response budget and device from it, so a leaderboard compares methods on
one task by construction.

    task = Task(lm="gpt2", reward="OpenAssistant/reward-model-deberta-v3-large-v2")   # or Task(): the world
    sources = task.resolve()                       # the embedded world fills every unset part
    sources.lm, sources.reward, sources.eval_prompts, sources.gold

`resolve()` loads (or builds) the embedded world only when some part needs it: an unset `lm` or
`reward`, or a `"world:train"` / `"world:test"` prompt source (the world's gold judge is a function
of the text alone). Worlds live in `$LLM_ENVS_CACHE` (default `~/.cache/llm_envs`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal, Sequence

from llm_envs.data import PromptSet

if TYPE_CHECKING:
    from llm_envs.envs.context import LMContext
GoldFn = Callable[[list[str], list[str]], Sequence[float]]
WORLD_SPLITS = {"world:train": "train_prompts", "world:test": "test_prompts"}


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass(frozen=True)
class Task:
    """What every method is run and scored on."""

    lm: str | None = field(default=None, metadata=_help(
        "frozen causal LM: hub name or save_pretrained directory; null = the embedded world's SFT LM"))
    reward: str | None = field(default=None, metadata=_help(
        "reward model (sequence classifier, num_labels=1): hub name or directory; null = the world's RM"))
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
    dtype: str = field(default="auto", metadata=_help("LM dtype: auto (float32), float32, bfloat16, float16"))

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"task.max_new_tokens={self.max_new_tokens!r}; expected a positive int (e.g. 32).")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise ValueError(f"task.max_prompt_tokens={self.max_prompt_tokens!r}; expected a positive int or null.")
        if self.gold not in ("auto", "world", "none"):
            raise ValueError(f"task.gold={self.gold!r}; expected 'auto', 'world' or 'none'.")
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
        from llm_envs.world import gold_reward, load_world  # lazy: the world imports torch

        world = load_world(self.world, self.world_seed, progress=progress) if self.needs_world() else None

        def prompts(source: Any) -> Any:
            if isinstance(source, str) and source in WORLD_SPLITS:
                return PromptSet(list(getattr(world, WORLD_SPLITS[source])), source=f"embedded world ({source})")
            return source

        return TaskSources(
            task=self,
            lm=self.lm if self.lm is not None else str(world.lm_dir),
            reward=self.reward if self.reward is not None else str(world.rm_dir),
            train_prompts=prompts(self.train_prompts),
            eval_prompts=prompts(self.eval_prompts),
            gold=gold_reward if self.uses_world_gold else None,
            world_path=str(world.path) if world is not None else None,
        )


@dataclass(frozen=True)
class TaskSources:
    """A resolved task: model sources (names or directories), prompt sources and the gold judge."""

    task: Task
    lm: str
    reward: str
    train_prompts: Any
    eval_prompts: Any
    gold: GoldFn | None
    world_path: str | None

    def env_kwargs(self, prompts: Any) -> dict[str, Any]:
        """The world keywords of an env (`gym.make(..., **kwargs)`) on this task with `prompts`."""
        task = self.task
        return {"lm": self.lm, "reward": self.reward, "prompts": prompts, "gold": self.gold, "device": task.device,
                "dtype": task.dtype, "max_prompt_tokens": task.max_prompt_tokens}

    def context(self, prompts: Any = None) -> LMContext:
        """The loaded LM, tokenizer, reward wrapper and gold judge, with `prompts` (default: the
        held-out prompts) encoded: what envs and decoders of this task share."""
        from llm_envs.envs.context import build_context  # TODO(lead): moves here with LMContext

        return build_context(**self.env_kwargs(self.eval_prompts if prompts is None else prompts))

    @property
    def on_world_prompts(self) -> bool:
        """Training prompts are the world's (so its SFT corpus holds their dataset responses)."""
        return self.task.train_prompts in WORLD_SPLITS

    @property
    def sft_corpus(self) -> Path | None:
        """The world's {prompt, response} corpus (RRHF's dataset responses), when on the world."""
        return Path(self.world_path) / "sft_corpus.jsonl" if self.world_path else None

