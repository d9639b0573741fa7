"""The batched episode machinery every LM env shares; each env module adds only its MDP.

A core runs N rows (N envs) on one `DecodeEngine`. `BatchedCore` owns what does not depend on the
MDP: the world (`LMContext`), the params, the rows' episode bookkeeping as host arrays (`RowArrays`:
prompt, response tokens, steps, coerced actions, costs, liveness), drawing prompts and prefilling
them, validating a step's actions before any row changes, scoring finished rows (one batched
reward-model call and one gold call per step), the final infos, and autoresets inside a step
(`Restart`), so that new rows share the step's forward.

Why host arrays and no per-row objects: everything an action changes is known on the host (the
candidate it accepts was copied back with the last step's observation), so a step's bookkeeping is a
few vectorised numpy operations whatever N is, and the device is read once per step, by the MDP's
`_advance` (its one `pack_rows` copy), never row by row.

A subclass sets `params_class` and implements the MDP hooks, all batched over row index arrays:
`_row_fields` (its host arrays), `_set_positions` (the first position after a prompt), `_masks` (the
host mirror of the action masks), `_masked_message`, `_act` (the actions' bookkeeping: rewards and
the tokens they append), `_advance` (the next position of every continuing row, one batched forward,
one host copy), `_observations`, `_info_columns`, `_reward_parts`, `_episode_stats`.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, make_dataclass
from typing import Any, ClassVar, Generic, NamedTuple, TypeVar

import gymnasium as gym
import numpy as np
import torch

from llm_envs.engine import DecodeEngine, NonFiniteLogitsError, StepOutput
from llm_envs.envs.params import params_fields, resolve_params
from llm_envs.envs.rows import RowArrays, StepInfos, python_scalar
from llm_envs.task import LMContext, context_for_env

P = TypeVar("P")

# Every core's host arrays: name -> (dtype, trailing shape); `response` gets (max_new_tokens,).
COMMON_FIELDS: dict[str, tuple[Any, tuple[int, ...]]] = {
    "prompt": (object, ()),
    "prompt_index": (object, ()),
    "prompt_ids": (object, ()),
    "response_len": (np.int64, ()),
    "steps": (np.int64, ()),
    "forced": (np.int64, ()),  # masked actions coerced to the fallback action
    "deviation_cost": (np.float64, ()),
    "live": (np.bool_, ()),
}


@dataclass(frozen=True)
class Restart:
    """Rows to start a new episode on, with each row's prompt RNG and reset options."""

    rows: list[int]
    rngs: list[np.random.Generator]
    options: list[dict[str, Any] | None]


class Final(NamedTuple):
    """A finished row: its reward-model score and the infos the final step adds."""

    score: float
    info: dict[str, Any]


StepResult = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, StepInfos]


class BatchedCore(Generic[P]):
    """N rows of one MDP on one engine. `step` moves every active row with at most one batched
    LM forward (plus one prefill when rows start over inside it)."""

    params_class: ClassVar[type]
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
        prefill_ahead: bool = False,
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
        if not isinstance(prefill_ahead, (bool, np.bool_)):
            raise ValueError(f"prefill_ahead={prefill_ahead!r}; expected True (prefill rows' next prompts ahead, in "
                             "forwards that run anyway) or False (each prompt when its row resets).")
        self._check_sizes()
        # The reserve: a response of max_new_tokens, plus the slot a finished row still writes while idle.
        self.engine = DecodeEngine(self.ctx.model, self.num_rows, hidden_layer=self.params.hidden_layer,
                                   reserve_tokens=self.params.max_new_tokens + 1)
        self.hidden_size = self.engine.hidden_size
        self.device = self.engine.device
        fields = {**COMMON_FIELDS, "response": (np.int64, (self.params.max_new_tokens,)), **self._row_fields()}
        self.state = RowArrays(self.num_rows, fields)
        # Each row's prompt sampler and reset options at its latest start: what its next start will
        # most likely draw from, so that `_start` can have the engine prefill it ahead.
        self._prompt_sources: dict[int, tuple[np.random.Generator, dict[str, Any]]] = {}
        self._prefill_ahead = bool(prefill_ahead)
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

    # ------------------------------------------------------------------ rows, for reading
    @property
    def rows(self) -> _RowsView:
        """Read-only snapshots of the rows (`core.rows[i].response`, `.steps`, ...): for tests,
        renders and debugging; the step itself works on `state`'s arrays."""
        return _RowsView(self)

    def row_snapshot(self, row: int) -> Any:
        """Row `row` as a frozen dataclass: every host field, `response` as a list of the ids so
        far, plus the MDP's `_row_extras` (e.g. TokenAccept's current `candidate`)."""
        s = self.state
        values = {name: getattr(s, name)[row] for name in s._fields if name != "response"}
        values = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in values.items()}
        values["prompt_ids"] = list(values["prompt_ids"] or [])
        values["response"] = s.response[row, : s.response_len[row]].tolist()
        values.update(self._row_extras(row))
        return _snapshot_class(type(self), tuple(values))(**values)

    def _row_extras(self, row: int) -> dict[str, Any]:
        return {}

    # ------------------------------------------------------------------ reset
    def reset_rows(
        self,
        rows: Sequence[int],
        rngs: Sequence[np.random.Generator],
        options: Sequence[dict[str, Any] | None],
    ) -> tuple[np.ndarray, StepInfos]:
        """Start new episodes on `rows`; returns their observations [len(rows), D] and their infos
        (`infos[i]` is row `rows[i]`'s)."""
        rows = [int(r) for r in rows]
        with torch.inference_mode():  # as in `step`
            self._start(Restart(rows, list(rngs), list(options)), fresh=True)
            self._advance(np.zeros(0, dtype=np.int64), rows, np.zeros(self.num_rows, dtype=np.int64))
        present = np.zeros(self.num_rows, dtype=bool)
        present[rows] = True
        infos = self._step_infos(present, np.zeros(self.num_rows, dtype=bool))
        return self._observations(rows), _Reordered(infos, rows)

    def _start(self, restart: Restart, fresh: bool = False) -> None:
        """Draw each row's prompt and prefill them all in one batched forward. Autoresets (not `fresh`)
        take prompts prefilled ahead and bank others' (`prefill_ahead`); an explicit reset prefills
        afresh, so the same seed gives the same bits whatever came before."""
        picked = [self.ctx.pick_prompt(rng, opts or {}, self.params.max_new_tokens)
                  for rng, opts in zip(restart.rngs, restart.options)]  # may raise: before any row changes
        if self._prefill_ahead:
            for row, rng, opts in zip(restart.rows, restart.rngs, restart.options):
                self._prompt_sources[row] = (rng, opts or {})
        out = self.engine.reset_rows(restart.rows, [ids for _, _, ids in picked],
                                     ahead=self._next_prompts if self._prefill_ahead and not fresh else None)
        s = self.state
        s.clear(restart.rows)
        for row, (prompt, index, prompt_ids) in zip(restart.rows, picked):
            s.prompt[row], s.prompt_index[row], s.prompt_ids[row] = prompt, index, prompt_ids
        s.live[restart.rows] = True
        self._set_positions(restart.rows, out)

    def _next_prompts(self, rows: list[int]) -> dict[int, list[int]]:
        """The prompt each of `rows` will draw at its next start, from a copy of its sampler (the
        engine's `reset_rows(ahead=)`): a guess that holds unless the sampler is reseeded or the reset
        options change, and is checked against the real draw then. Rows never started, or whose draw
        would raise (an over-long prompt raises at the real draw), are left out."""
        found = {}
        for row in rows:
            source = self._prompt_sources.get(row)
            if source is None:
                continue
            rng, options = source
            try:
                found[row] = self.ctx.pick_prompt(_copy_generator(rng), options, self.params.max_new_tokens)[2]
            except ValueError:
                continue
        return found

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
        if active.shape[0] != n:
            raise ValueError(f"got {active.shape[0]} active flags for {n} envs; pass one per env.")
        stepped = np.flatnonzero(active)
        chosen, forced = self._check_actions(self._action_array(actions), stepped)
        saved = self.state.copy()
        try:
            # Inference mode throughout: the device state holds the engine's outputs (inference tensors),
            # which may only be updated in place inside it.
            with torch.inference_mode():
                return self._step(stepped, chosen, forced, restart, restart_done)
        except BaseException as error:
            self.state.restore(saved)  # host bookkeeping as before the step
            self._discard_step()
            if isinstance(error, NonFiniteLogitsError):
                # The forward already overwrote cache slots (a rejected candidate's), so the rows cannot
                # go back to where they were: every episode ends here, and the next call must reset.
                self.state.live[:] = False
                error.add_note("Every env of this batch now needs reset() (the step could not be undone).")
            raise

    def check_actions(self, actions: Sequence[Any] | np.ndarray, active: Sequence[bool] | np.ndarray | None = None) -> None:
        """Raise what `step(actions, active)` would raise on these actions, changing nothing (a Ray env
        checks a step's actions on its workers before any of them moves)."""
        active = np.ones(self.num_rows, dtype=bool) if active is None else np.asarray(active, dtype=bool).reshape(-1)
        self._check_actions(self._action_array(actions), np.flatnonzero(active))

    def _step(self, stepped: np.ndarray, chosen: np.ndarray, forced: np.ndarray, restart: Restart | None,
              restart_done: Callable[[list[int]], Restart] | None) -> StepResult:
        n, s = self.num_rows, self.state
        rewards, tokens = self._act(chosen, stepped)
        s.steps[stepped] += 1
        s.forced[stepped] += forced[stepped]
        appended = stepped[tokens[stepped] >= 0]
        s.response[appended, s.response_len[appended]] = tokens[appended]
        s.response_len[appended] += 1
        terminated, truncated = np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
        terminated[appended] = tokens[appended] == self._eos_token_id
        truncated[stepped] = ~terminated[stepped] & ((s.response_len[stepped] >= self.params.max_new_tokens)
                                                     | (s.steps[stepped] >= self.max_steps))
        ended = terminated | truncated
        done = np.flatnonzero(ended)
        continuing = stepped[~ended[stepped]]
        # Ended rows' rewards, infos and last obs, taken before a same-step restart overwrites them.
        done_infos: dict[int, dict[str, Any]] = {}
        final_obs = None
        if done.size:
            columns = self._columns(forced)
            finals = self._finish(done.tolist())
            rewards[done] += self._final_rewards(done, np.array([finals[r].score for r in done.tolist()]))
            for row in done.tolist():
                done_infos[row] = {**{k: python_scalar(v[row]) for k, v in columns.items()}, **finals[row].info}
            if restart_done is not None:
                final_obs = self._observations(done)
        batches = [restart] if restart is not None and restart.rows else []
        if final_obs is not None:
            batches.append(restart_done(done.tolist()))
        for batch in batches:
            self._start(batch)
        started = [row for batch in batches for row in batch.rows]
        self._advance(continuing, started, chosen)
        rewards[continuing] += self._shaping_rewards(continuing)
        present = np.zeros(n, dtype=bool)
        present[stepped] = True
        present[started] = True
        step_forced = forced.copy()
        step_forced[started] = False
        infos = self._step_infos(present, step_forced)
        for row, info in done_infos.items():
            if final_obs is None:  # the columns already hold the ended row's last values (nothing moved it)
                infos.extra[row] = {k: v for k, v in info.items() if k not in infos.columns}
        if final_obs is not None:
            for i, row in enumerate(done.tolist()):
                infos.extra[row] = {"final_obs": final_obs[i], "final_info": done_infos[row]}
        return self._observations(np.arange(n)), rewards, terminated, truncated, infos

    def _check_actions(self, actions: np.ndarray, stepped: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The action each stepped row takes (masked ones coerced to 0 or raising, as the params
        say) and whether it was coerced; raises before any row has changed."""
        dead = stepped[~self.state.live[stepped]]
        if dead.size:
            raise RuntimeError(
                f"env {dead[0]}: step() called before reset() or after the episode ended; call reset() first."
            )
        values = self._action_values(actions, stepped)
        chosen = np.zeros(self.num_rows, dtype=np.int64)
        forced = np.zeros(self.num_rows, dtype=bool)
        chosen[stepped] = values[stepped]
        masked = stepped[~self._masks()[stepped, values[stepped]]]
        if masked.size:
            if self.params.invalid_action == "raise":
                row = int(masked[0])
                raise ValueError(f"env {row}: {self._masked_message(row, int(values[row]))}")
            chosen[masked], forced[masked] = 0, True
        return chosen, forced

    def _action_array(self, actions: Any) -> np.ndarray:
        """The step's actions as an array of exactly one entry per env (no reshaping: a (2, 2) array
        for 4 envs is a mistake, not 4 actions)."""
        array = np.asarray(actions, dtype=object if not isinstance(actions, np.ndarray) else None)
        if array.shape != (self.num_rows,):
            raise ValueError(f"actions {actions!r:.80} have shape {array.shape}; expected shape ({self.num_rows},): "
                             f"one action per env, each {self.action_help}.")
        return array

    def _action_values(self, actions: np.ndarray, stepped: np.ndarray) -> np.ndarray:
        """Each stepped row's action as an int64, checked to be an integer of the space (not a bool,
        float or string; in range); raises naming the first bad row. An integer array is checked at
        once; other arrays (lists, objects) element by element."""
        values = np.zeros(self.num_rows, dtype=np.int64)
        if actions.dtype.kind in "iu":
            values[stepped] = actions[stepped]
            bad = stepped[(actions[stepped] < 0) | (actions[stepped] >= self.action_space.n)]
            if bad.size:
                row = int(bad[0])
                raise ValueError(f"env {row}: action {actions[row]!r} is outside the action space; "
                                 f"expected {self.action_help}.")
            return values
        for row in stepped.tolist():
            raw = actions[row]
            if isinstance(raw, (bool, np.bool_)) or not isinstance(raw, (int, np.integer)):
                raise ValueError(f"env {row}: action {raw!r} ({type(raw).__name__}) is outside the action space: "
                                 f"not an integer; expected {self.action_help}.")
            if not 0 <= raw < self.action_space.n:
                raise ValueError(f"env {row}: action {raw!r} is outside the action space; expected {self.action_help}.")
            values[row] = int(raw)
        return values

    # ------------------------------------------------------------------ episode end
    def _finish(self, rows: list[int]) -> dict[int, Final]:
        """Score finished rows in one batched reward call (and one gold call)."""
        s = self.state
        prompt_ids = [list(s.prompt_ids[r]) for r in rows]
        responses = [s.response[r, : s.response_len[r]].tolist() for r in rows]
        scores = self.ctx.reward.score_ids(prompt_ids, responses, self.ctx.tokenizer)
        texts = [self.ctx.tokenizer.decode(ids, skip_special_tokens=True) for ids in responses]
        golds = self.ctx.gold.score([s.prompt[r] for r in rows], texts) if self.ctx.gold else None
        finals = {}
        s.live[rows] = False
        for i, row in enumerate(rows):
            score = float(scores[i])
            parts = self._reward_parts(row, score)
            if golds is not None:
                parts["gold"] = float(golds[i])
            stats = {"steps": int(s.steps[row]), "response_len": int(s.response_len[row]), **self._episode_stats(row),
                     "lm_forwards": self.engine.row_forwards(row)}
            finals[row] = Final(score, {"response_ids": responses[i], "response_text": texts[i],
                                        "reward_parts": parts, "episode_stats": stats})
        return finals

    def _final_rewards(self, rows: np.ndarray, scores: np.ndarray) -> np.ndarray:
        """What the final step adds to the step reward of `rows`: the reward model's scores."""
        return scores

    def _shaping_rewards(self, rows: np.ndarray) -> np.ndarray:
        """What a step that does not end the episode adds (after `_advance`): nothing by default."""
        return np.zeros(len(rows))

    def _reward_parts(self, row: int, score: float) -> dict[str, float]:
        return {"reward_model": score, "deviation_cost": -float(self.state.deviation_cost[row])}

    def _episode_stats(self, row: int) -> dict[str, Any]:
        return {self.forced_stat_key: int(self.state.forced[row])}

    # ------------------------------------------------------------------ infos
    def _columns(self, forced: np.ndarray) -> dict[str, np.ndarray]:
        """Every row's per-step info values, by key (in the order a single env's info has them)."""
        s = self.state
        return {**self._info_columns(), "prompt": s.prompt.copy(), "prompt_index": s.prompt_index.copy(),
                "position": s.response_len.copy(), self.forced_info_key: forced.copy()}

    def _step_infos(self, present: np.ndarray, forced: np.ndarray) -> StepInfos:
        infos = StepInfos(self.num_rows, present)
        infos.columns = self._columns(forced)
        return infos

    # ------------------------------------------------------------------ the MDP (subclasses)
    def _row_fields(self) -> dict[str, tuple[Any, tuple[int, ...]]]:
        """The MDP's own host arrays (name -> (dtype, trailing shape)), beside `COMMON_FIELDS`."""
        return {}

    def action_masks(self) -> np.ndarray:
        """[N, n_actions] bool: the legal actions of every row (a fresh array)."""
        return self._masks().copy()

    def _masks(self) -> np.ndarray:
        """The host mirror of the action masks, [N, n_actions] bool (not a copy)."""
        raise NotImplementedError

    def _discard_step(self) -> None:
        """Drop what the MDP kept for a step that raised before it finished (nothing by default)."""

    def _set_positions(self, rows: list[int], out: StepOutput) -> None:
        """The position after a prefix: `out` holds the rows' next-token logits and hidden states."""
        raise NotImplementedError

    def _masked_message(self, row: int, action: int) -> str:
        raise NotImplementedError

    def _act(self, chosen: np.ndarray, stepped: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The stepped rows' actions' MDP bookkeeping: (step rewards [N], the token each appends [N],
        -1 where none)."""
        raise NotImplementedError

    def _advance(self, continuing: np.ndarray, started: list[int], actions: np.ndarray) -> None:
        """The next position of every continuing row and the first of every started one (whose
        prefill `_set_positions` has seen), with at most one batched LM forward and one host copy."""
        raise NotImplementedError

    def _observations(self, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        """Observations of `rows` [len(rows), D] float32, a fresh array."""
        raise NotImplementedError

    def observation_tensor(self) -> torch.Tensor:
        """Every row's observation [N, D] float32 on the engine's device (the torch face)."""
        raise NotImplementedError

    def action_mask_tensor(self) -> torch.Tensor:
        """`action_masks()` as a bool tensor on the engine's device (the torch face)."""
        raise NotImplementedError

    def _info_columns(self) -> dict[str, np.ndarray]:
        """The MDP's per-step info values of every row, by key (fresh arrays)."""
        raise NotImplementedError


class _RowsView(Sequence):
    """`core.rows`: row i is `core.row_snapshot(i)`."""

    def __init__(self, core: BatchedCore) -> None:
        self._core = core

    def __len__(self) -> int:
        return self._core.num_rows

    def __getitem__(self, i: int) -> Any:  # type: ignore[override]
        if not -self._core.num_rows <= i < self._core.num_rows:
            raise IndexError(i)
        return self._core.row_snapshot(i % self._core.num_rows)


@functools.cache
def _snapshot_class(core_class: type, names: tuple[str, ...]) -> type:
    return make_dataclass(f"{core_class.__name__}Row", list(names), frozen=True)


class _Reordered(StepInfos):
    """Infos of `rows` in that order (what `reset_rows` returns: `infos[i]` is row `rows[i]`'s)."""

    def __init__(self, infos: StepInfos, rows: list[int]) -> None:
        super().__init__(infos.num_rows, infos.present)
        self.columns, self.extra, self._rows = infos.columns, infos.extra, rows

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.row(self._rows[i])

    def __len__(self) -> int:
        return len(self._rows)

    def as_list(self) -> list[dict[str, Any]]:
        return [self.row(r) for r in self._rows]


def _copy_generator(rng: np.random.Generator) -> np.random.Generator:
    """An independent copy of `rng` at its current state (half the cost of `copy.deepcopy`)."""
    bits = type(rng.bit_generator)()
    bits.state = rng.bit_generator.state
    return np.random.Generator(bits)


def raise_non_finite(rows: np.ndarray, model: Any) -> None:
    """Raise `NonFiniteLogitsError` for `rows`, whose last forward gave non-finite logits (found in
    a step's host copy)."""
    rows = [int(r) for r in rows]
    raise NonFiniteLogitsError(
        f"{type(model).__name__} ({getattr(model, 'dtype', None)}) returned non-finite next-token logits for "
        f"env rows {rows[:8]}{' and more' if len(rows) > 8 else ''}, expected finite values (-inf only for banned "
        "tokens). Likely fix: load the LM with dtype='bfloat16' or 'float32' (float16 overflows past 65504), "
        "and check its weights and the input ids.", rows)


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
