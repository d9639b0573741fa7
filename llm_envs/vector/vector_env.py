"""The Gymnasium `VectorEnv` view of a batched core, and Gymnasium's vector info layout.

One core with N rows, so a step of N envs is one batched LM forward (not N single-env forwards
as `SyncVectorEnv` would do). Row i, seeded with `seed + i`, follows the same trajectory as a
single env seeded with `seed + i`. Autoresets (NEXT_STEP or SAME_STEP) happen inside the core's
step, so the new rows share its forward.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, ClassVar

import gymnasium as gym
import numpy as np
from gymnasium.utils.seeding import np_random
from gymnasium.vector import AutoresetMode, VectorEnv

from llm_envs.envs.core import Restart
from llm_envs.envs.rows import merge_infos  # noqa: F401  (re-exported: the vector info layout)
from llm_envs.vector.registry import core_class, face_class


def row_rngs(seed: int | None, n: int) -> list[np.random.Generator]:
    """Row i's prompt sampler, seeded with `seed + i` (as a single env seeded with `seed + i`)."""
    return [np_random(None if seed is None else seed + i)[0] for i in range(n)]


class LMVectorEnv(VectorEnv):
    """A Gymnasium `VectorEnv` over a batched core (autoreset: NEXT_STEP or SAME_STEP).

    Build one with `make_vector_env(env_id, num_envs)` or `gym.make_vec(env_id, num_envs=...)`;
    `vector_env_class(core_class)` is the class for a core, with the core's `row_methods`."""

    core_class: ClassVar[type]

    def __init__(
        self,
        num_envs: int = 1,
        *,
        autoreset_mode: AutoresetMode | str = AutoresetMode.NEXT_STEP,
        max_episode_steps: int | None = None,
        **kwargs: Any,
    ) -> None:
        mode = AutoresetMode(autoreset_mode)
        if mode == AutoresetMode.DISABLED:
            raise ValueError("autoreset_mode=DISABLED is not supported; use NEXT_STEP or SAME_STEP.")
        if max_episode_steps is not None:  # gym.make_vec passes the spec's step limit
            kwargs.setdefault("max_steps", max_episode_steps)
        self.core = self.core_class(num_envs, **kwargs)
        self.num_envs = num_envs
        self.autoreset_mode = mode
        self.metadata = {"autoreset_mode": mode, "render_modes": []}
        self.single_observation_space = self.core.observation_space
        self.single_action_space = self.core.action_space
        self.observation_space = gym.vector.utils.batch_space(self.single_observation_space, num_envs)
        self.action_space = gym.vector.utils.batch_space(self.single_action_space, num_envs)
        self._rngs = row_rngs(None, num_envs)
        self._needs_reset = np.zeros(num_envs, dtype=bool)
        self._options: dict[str, Any] | None = None
        self._started = False

    @property
    def params(self) -> Any:
        """The env's MDP parameters (a frozen dataclass)."""
        return self.core.params

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        if seed is not None:
            self._rngs = row_rngs(seed, self.num_envs)
        self._options = options
        rows = list(range(self.num_envs))
        obs, infos = self.core.reset_rows(rows, self._rngs, [options] * self.num_envs)
        self._needs_reset[:] = False
        self._started = True
        return obs, infos.vector()

    def step(self, actions: Any):
        self._require_started()
        # NEXT_STEP: the rows that ended last step start over now (their action is ignored);
        # SAME_STEP: rows that end now start over at once, their last obs in final_obs.
        same_step = self.autoreset_mode == AutoresetMode.SAME_STEP
        obs, rewards, terminated, truncated, infos = self.core.step(
            actions, ~self._needs_reset, restart=self._restart(np.flatnonzero(self._needs_reset).tolist()),
            restart_done=self._restart if same_step else None)
        self._needs_reset[:] = False
        if not same_step:
            self._needs_reset[terminated | truncated] = True
        return obs, rewards, terminated, truncated, infos.vector()

    def _restart(self, rows: list[int]) -> Restart:
        return Restart(rows, [self._rngs[r] for r in rows], [self._options] * len(rows))

    def check_actions(self, actions: Any) -> None:
        """Raise what `step(actions)` would raise on them, changing nothing (rows about to reset ignore
        their action, as in `step`)."""
        self._require_started()
        self.core.check_actions(actions, ~self._needs_reset)

    def _require_started(self) -> None:
        if not self._started:
            raise RuntimeError("step() called before reset(); call reset() first.")

    def action_masks(self) -> np.ndarray:
        """[num_envs, n_actions] bool (for rows about to reset: all actions legal)."""
        masks = self.core.action_masks()
        masks[self._needs_reset] = True
        return masks


@functools.cache
def vector_env_class(core_cls: type) -> type[LMVectorEnv]:
    """`LMVectorEnv` for `core_cls`: its signature shows the env's parameters, and it has the
    core's `row_methods` (e.g. `TokenChoiceVectorEnv.candidate_rewards`), [num_envs, ...] each."""
    return face_class(LMVectorEnv, core_cls, "VectorEnv", lead=[
        inspect.Parameter("num_envs", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=1, annotation=int),
        inspect.Parameter("autoreset_mode", inspect.Parameter.KEYWORD_ONLY, default=AutoresetMode.NEXT_STEP,
                          annotation="AutoresetMode | str"),
        inspect.Parameter("max_episode_steps", inspect.Parameter.KEYWORD_ONLY, default=None, annotation="int | None"),
    ])


def make_vector_env(env_id: str, num_envs: int = 1, **kwargs: Any) -> LMVectorEnv:
    """The Gymnasium vector env for `env_id` (what `gym.make_vec` gives): `num_envs` rows on one
    engine. `kwargs` are the env's keywords (world keywords, MDP parameters or `params=`) plus
    `autoreset_mode` and `max_episode_steps`."""
    if isinstance(num_envs, bool) or not isinstance(num_envs, (int, np.integer)) or num_envs < 1:
        raise ValueError(f"num_envs={num_envs!r}; expected a positive int.")
    return vector_env_class(core_class(env_id))(int(num_envs), **kwargs)


def token_accept_vector_env(num_envs: int = 1, **kwargs: Any) -> LMVectorEnv:
    """vector_entry_point of llm_envs/TokenAccept-v0."""
    return make_vector_env("llm_envs/TokenAccept-v0", num_envs, **kwargs)


def token_choice_vector_env(num_envs: int = 1, **kwargs: Any) -> LMVectorEnv:
    """vector_entry_point of llm_envs/TokenChoice-v0."""
    return make_vector_env("llm_envs/TokenChoice-v0", num_envs, **kwargs)
