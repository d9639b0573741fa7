"""The batched episode machinery every LM env shares; each env module adds only its MDP.

A core runs N rows (N envs) on one `DecodeEngine`. `BatchedCore` owns what does not depend
on the MDP: the world (`LMContext`), the params, per-row episode bookkeeping (`RowState`),
drawing prompts and prefilling them, validating a step's actions before any row changes,
scoring finished rows (one batched reward-model call and one gold call per step), the final
infos, and autoresets inside a step (`Restart`), so that new rows share the step's forward.

A subclass sets `params_class` / `row_class` and implements the MDP hooks: `_set_positions`
(the first position after a prompt), `_allowed` / `_masked_message` (the action mask),
`_act` (one action's bookkeeping), `_advance` (the next position of every continuing row,
one batched forward), `_observations`, `_candidate_info`, `_reward_parts`, `_episode_stats`.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, NamedTuple, TypeVar

import gymnasium as gym
import numpy as np
import torch

from llm_envs.engine import DecodeEngine, StepOutput
from llm_envs.task import LMContext, context_for_env
from llm_envs.envs.params import params_fields, resolve_params

P = TypeVar("P")
Row = TypeVar("Row", bound="RowState")


@dataclass(frozen=True)
class Restart:
    """Rows to start a new episode on, with each row's prompt RNG and reset options."""

    rows: list[int]
    rngs: list[np.random.Generator]
    options: list[dict[str, Any] | None]


@dataclass
class RowState:
    """One row's episode bookkeeping; env modules subclass it with their position state."""

    prompt: str = ""
    prompt_index: int | None = None
    prompt_ids: list[int] = field(default_factory=list)
    response: list[int] = field(default_factory=list)
    steps: int = 0
    forced: int = 0  # masked actions coerced to the fallback action
    deviation_cost: float = 0.0
    live: bool = False


class Final(NamedTuple):
    """A finished row: its reward-model score and the infos the final step adds."""

    score: float
    info: dict[str, Any]


StepResult = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[dict[str, Any]]]


class BatchedCore(Generic[P, Row]):
    """N rows of one MDP on one engine. `step` moves every active row with at most one batched
    LM forward (plus one prefill when rows start over inside it)."""

    params_class: ClassVar[type]
    row_class: ClassVar[type[RowState]]
    # Env methods with a leading row axis (e.g. TokenChoice's candidate_rewards); the single env
    # and the vector views expose each of them, so every face of an env id has the same methods.
    row_methods: ClassVar[tuple[str, ...]] = ()
    vocab_bounded: ClassVar[tuple[str, ...]] = ()  # params that count tokens, so at most the vocabulary
    action_help: ClassVar[str]  # what a legal action is, for the error message
    forced_info_key: ClassVar[str]  # the info flag of a coerced action
    forced_stat_key: ClassVar[str]  # the episode_stats count of coerced actions
    max_steps: int  # the step cap, resolved from the params by the subclass

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "params_class" in cls.__dict__:
            cls.__signature__ = core_signature(cls.params_class)

    def __init__(
        self,
        num_rows: int = 1,
        *,
        lm: Any = None,
        reward: Any = None,
        prompts: Any = None,
        tokenizer: Any = None,
        gold: Any = None,
        device: str | torch.device | None = "auto",
        dtype: str | torch.dtype | None = "auto",
        max_prompt_tokens: int | None = None,
        chat_template: bool = False,
        system_prompt: str | None = None,
        reward_rules: Any = None,
        reward_tokenizer: str | None = None,
        context: LMContext | None = None,
        params: P | None = None,
        **param_kwargs: Any,
    ) -> None:
        if isinstance(num_rows, bool) or not isinstance(num_rows, (int, np.integer)) or num_rows < 1:
            raise ValueError(f"num_rows={num_rows!r}; expected a positive int (the number of envs stepped together).")
        self.params: P = resolve_params(self.params_class, params, param_kwargs, type(self).__name__)
        self.ctx = context_for_env(context, lm=lm, tokenizer=tokenizer, reward=reward, prompts=prompts,
                                   gold=gold, device=device, dtype=dtype, max_prompt_tokens=max_prompt_tokens,
                                   chat_template=chat_template, system_prompt=system_prompt,
                                   reward_rules=reward_rules, reward_tokenizer=reward_tokenizer)
        self.num_rows = int(num_rows)
        self._check_sizes()
        # The reserve: a response of max_new_tokens, plus the slot a finished row still writes while idle.
        self.engine = DecodeEngine(self.ctx.model, self.num_rows, hidden_layer=self.params.hidden_layer,
                                   reserve_tokens=self.params.max_new_tokens + 1)
        self.hidden_size = self.engine.hidden_size
        self.rows: list[Row] = [self.row_class() for _ in range(self.num_rows)]
        # Read once (a tokenizer attribute lookup per row per step adds up); on a chat task it is the
        # template's end-of-turn token (`llm_envs.chat.chat_tokenizer`).
        self._eos_token_id = self.ctx.eos_token_id
        self.observation_space: gym.spaces.Box
        self.action_space: gym.spaces.Discrete

    @property
    def max_new_tokens(self) -> int:
        return self.params.max_new_tokens

    def _check_sizes(self) -> None:
        """Params bounded by the LM (its vocabulary, context and depth) are checked once the LM is
        known, before anything is allocated from them."""
        config = self.ctx.model.config.get_text_config(decoder=True)
        vocab, layers, context = int(config.vocab_size), config.num_hidden_layers, self.ctx.max_context
        for name in self.vocab_bounded:
            value = getattr(self.params, name)
            if value is not None and value > vocab:
                raise ValueError(f"{name}={value} exceeds the LM's vocabulary of {vocab} tokens; use {name} <= {vocab}.")
        if context is not None and self.params.max_new_tokens >= context:
            raise ValueError(f"max_new_tokens={self.params.max_new_tokens} leaves no room for a prompt in the LM's "
                             f"context of {context} positions; use max_new_tokens < {context}.")
        if not -(layers + 1) <= self.params.hidden_layer <= layers:
            raise ValueError(f"hidden_layer={self.params.hidden_layer} is not a hidden state of this {layers}-layer LM; "
                             f"use an index in [-{layers + 1}, {layers}] (-1 = the last layer).")

    # ------------------------------------------------------------------ reset
    def reset_rows(
        self,
        rows: Sequence[int],
        rngs: Sequence[np.random.Generator],
        options: Sequence[dict[str, Any] | None],
    ) -> tuple[np.ndarray, list[dict[str, Any]]]:
        """Start new episodes on `rows`; returns their observations [len(rows), D] and infos."""
        rows = list(rows)
        self._start(Restart(rows, list(rngs), list(options)))
        self._advance([], rows, np.zeros(self.num_rows, dtype=np.int64))
        return self._observations(rows), [self._info(r) for r in rows]

    def _start(self, restart: Restart) -> None:
        """Draw each row's prompt and prefill them all in one batched forward."""
        for row, rng, opts in zip(restart.rows, restart.rngs, restart.options):
            prompt, index, prompt_ids = self.ctx.pick_prompt(rng, opts or {}, self.params.max_new_tokens)
            self.rows[row] = self.row_class(prompt=prompt, prompt_index=index, prompt_ids=prompt_ids, live=True)
        out = self.engine.reset_rows(restart.rows, [self.rows[r].prompt_ids for r in restart.rows])
        self._set_positions(restart.rows, out)

    # ------------------------------------------------------------------ step
    def step(
        self,
        actions: Sequence[Any] | np.ndarray,
        active: Sequence[bool] | np.ndarray | None = None,
        *,
        restart: Restart | None = None,
        restart_done: Callable[[list[int]], Restart] | None = None,
    ) -> StepResult:
        """Step the active rows (all by default). Rows not active keep their state. Every action
        is checked before any row changes, so a step that raises on an action changes nothing.

        Autoresets share the step's batched forward (the new rows' first positions go in with
        the others'), so a step that starts episodes costs a prefill plus one forward:
        - `restart`: inactive rows that start a new episode now (NEXT_STEP autoreset); their obs
          and info are the new episode's, reward 0, not done.
        - `restart_done(rows)` -> `Restart`: rows that end in this step start over in it
          (SAME_STEP autoreset); their obs and info are the new episode's, the ended episode's
          last ones go to `infos[row]["final_obs"]` / `["final_info"]`; terminated/truncated
          stay True.
        """
        n = self.num_rows
        active = np.ones(n, dtype=bool) if active is None else np.asarray(active, dtype=bool).reshape(-1)
        actions = self._action_array(actions)
        if active.shape[0] != n:
            raise ValueError(f"got {active.shape[0]} active flags for {n} envs; pass one per env.")
        stepped = np.flatnonzero(active).tolist()
        chosen, forced = self._check_actions(actions, stepped)
        rewards = np.zeros(n, dtype=np.float64)
        terminated, truncated = np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
        for row in stepped:
            rewards[row], terminated[row], truncated[row] = self._apply(self.rows[row], int(chosen[row]), forced[row])
        done = np.flatnonzero(terminated | truncated).tolist()
        continuing = [row for row in stepped if not (terminated[row] or truncated[row])]
        # Ended rows' rewards, infos and last obs, taken before a same-step restart overwrites them.
        finals = self._finish(done)
        done_infos = {}
        for row in done:
            rewards[row] += self._final_reward(self.rows[row], finals[row].score)
            done_infos[row] = {**self._info(row, forced[row]), **finals[row].info}
        final_obs = self._observations(done) if done and restart_done is not None else None
        batches = [restart] if restart is not None and restart.rows else []
        if final_obs is not None:
            batches.append(restart_done(done))
        for batch in batches:
            self._start(batch)
        started = [row for batch in batches for row in batch.rows]
        self._advance(continuing, started, chosen)
        infos: list[dict[str, Any]] = [{} for _ in range(n)]
        for row in continuing:
            rewards[row] += self._shaping_reward(self.rows[row])
            infos[row] = self._info(row, forced[row])
        for row in done:
            infos[row] = done_infos[row]
        for row in started:
            infos[row] = self._info(row)
        if final_obs is not None:
            for i, row in enumerate(done):
                infos[row] = {**infos[row], "final_obs": final_obs[i], "final_info": done_infos[row]}
        return self._observations(range(n)), rewards, terminated, truncated, infos

    def _check_actions(self, actions: np.ndarray, stepped: list[int]) -> tuple[np.ndarray, list[bool]]:
        """The action each stepped row takes (masked ones coerced to 0 or raising, as the params
        say) and whether it was coerced; raises before any row has changed."""
        chosen = np.zeros(self.num_rows, dtype=np.int64)
        forced = [False] * self.num_rows
        for row in stepped:
            state = self.rows[row]
            if not state.live:
                raise RuntimeError(
                    f"env {row}: step() called before reset() or after the episode ended; call reset() first."
                )
            action = self._action_value(actions[row], row)
            if not self._allowed(state, action):
                if self.params.invalid_action == "raise":
                    raise ValueError(f"env {row}: {self._masked_message(state, action)}")
                chosen[row], forced[row] = 0, True
            else:
                chosen[row] = action
        return chosen, forced

    def _action_array(self, actions: Any) -> np.ndarray:
        """The step's actions as an array of exactly one entry per env (no reshaping: a (2, 2) array
        for 4 envs is a mistake, not 4 actions)."""
        array = np.asarray(actions, dtype=object if not isinstance(actions, np.ndarray) else None)
        if array.shape != (self.num_rows,):
            raise ValueError(f"actions {actions!r:.80} have shape {array.shape}; expected shape ({self.num_rows},): "
                             f"one action per env, each {self.action_help}.")
        return array

    def _action_value(self, raw: Any, row: int) -> int:
        """An action of the space: a Python or numpy integer (not a bool, float or string) in range."""
        if isinstance(raw, (bool, np.bool_)) or not isinstance(raw, (int, np.integer)):
            raise ValueError(f"env {row}: action {raw!r} ({type(raw).__name__}) is outside the action space: not "
                             f"an integer; expected {self.action_help}.")
        if not 0 <= raw < self.action_space.n:
            raise ValueError(f"env {row}: action {raw!r} is outside the action space; expected {self.action_help}.")
        return int(raw)

    def _apply(self, state: Row, action: int, forced: bool) -> tuple[float, bool, bool]:
        """One action's bookkeeping; returns (step reward so far, terminated, truncated)."""
        state.steps += 1
        state.forced += int(forced)
        reward, token = self._act(state, action)
        if token is not None:
            state.response.append(token)
            if token == self._eos_token_id:
                return reward, True, False
        return reward, False, len(state.response) >= self.params.max_new_tokens or state.steps >= self.max_steps

    # ------------------------------------------------------------------ episode end
    def _finish(self, rows: list[int]) -> dict[int, Final]:
        """Score finished rows in one batched reward call (and one gold call)."""
        if not rows:
            return {}
        states = [self.rows[r] for r in rows]
        scores = self.ctx.reward.score_ids([s.prompt_ids for s in states], [s.response for s in states],
                                           self.ctx.tokenizer)
        texts = [self.ctx.tokenizer.decode(s.response, skip_special_tokens=True) for s in states]
        golds = self.ctx.gold.score([s.prompt for s in states], texts) if self.ctx.gold else None
        finals = {}
        for i, (row, state) in enumerate(zip(rows, states)):
            state.live = False
            score = float(scores[i])
            parts = self._reward_parts(state, score)
            if golds is not None:
                parts["gold"] = float(golds[i])
            stats = {"steps": state.steps, "response_len": len(state.response), **self._episode_stats(state),
                     "lm_forwards": self.engine.row_forwards(row)}
            finals[row] = Final(score, {"response_ids": list(state.response), "response_text": texts[i],
                                        "reward_parts": parts, "episode_stats": stats})
        return finals

    def _final_reward(self, state: Row, score: float) -> float:
        """What the final step adds to the step reward: the reward model's score."""
        return score

    def _shaping_reward(self, state: Row) -> float:
        """What a step that does not end the episode adds (after `_advance`): nothing by default."""
        return 0.0

    def _reward_parts(self, state: Row, score: float) -> dict[str, float]:
        return {"reward_model": score, "deviation_cost": -state.deviation_cost}

    def _episode_stats(self, state: Row) -> dict[str, Any]:
        return {self.forced_stat_key: state.forced}

    # ------------------------------------------------------------------ infos
    def _info(self, row: int, forced: bool = False) -> dict[str, Any]:
        state = self.rows[row]
        return {**self._candidate_info(state), "prompt": state.prompt, "prompt_index": state.prompt_index,
                "position": len(state.response), self.forced_info_key: bool(forced)}

    # ------------------------------------------------------------------ the MDP (subclasses)
    def action_masks(self) -> np.ndarray:
        raise NotImplementedError

    def _set_positions(self, rows: list[int], out: StepOutput) -> None:
        """The position after a prefix: `out` holds the rows' next-token logits and hidden states."""
        raise NotImplementedError

    def _allowed(self, state: Row, action: int) -> bool:
        raise NotImplementedError

    def _masked_message(self, state: Row, action: int) -> str:
        raise NotImplementedError

    def _act(self, state: Row, action: int) -> tuple[float, int | None]:
        """An action's MDP bookkeeping: (step reward, the token it appends or None)."""
        raise NotImplementedError

    def _advance(self, continuing: list[int], started: list[int], actions: np.ndarray) -> None:
        """The next position of every continuing row and the first of every started one (whose
        prefill `_set_positions` has seen), with at most one batched LM forward."""
        raise NotImplementedError

    def _observations(self, rows: Sequence[int]) -> np.ndarray:
        """Observations of `rows` [len(rows), D] float32, a fresh array."""
        raise NotImplementedError

    def _candidate_info(self, state: Row) -> dict[str, Any]:
        raise NotImplementedError


def core_signature(params_class: type, *, lead: Sequence[inspect.Parameter] | None = None) -> inspect.Signature:
    """`(num_rows=1, *, lm=None, ..., params=None, top_p=0.9, ...)`: the world keywords of
    `BatchedCore.__init__` plus one keyword per params field (defaults from the dataclass), so
    `help()` and `inspect.signature` show an env's real parameters. `lead` replaces `num_rows`."""
    base = list(inspect.signature(BatchedCore.__init__).parameters.values())[1:]  # without self
    world = [p.replace(annotation=f"{params_class.__name__} | None") if p.name == "params" else p
             for p in base if p.kind is inspect.Parameter.KEYWORD_ONLY]
    mdp = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=hint)
           for name, hint, default, _ in params_fields(params_class)]
    return inspect.Signature([*(base[:1] if lead is None else lead), *world, *mdp])


def row_method_forwarders(
    core_class: type, select: Callable[[Any, Any], Any], note: str = ""
) -> dict[str, Callable]:
    """For each of `core_class.row_methods`, a method that calls the core's method on `self.core`
    and passes the result through `select(self, result)` (the single env takes row 0), keeping the
    core method's name, docstring (after `note`, which says how the result differs) and signature."""
    def forwarder(name: str) -> Callable:
        core_method = getattr(core_class, name)

        @functools.wraps(core_method)
        def method(self: Any, *args: Any, **kwargs: Any) -> Any:
            return select(self, getattr(self.core, name)(*args, **kwargs))

        if note:
            method.__doc__ = f"{note}\n\n{core_method.__doc__ or ''}"
        return method

    return {name: forwarder(name) for name in core_class.row_methods}
