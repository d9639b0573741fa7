"""The Stable-Baselines3 `VecEnv` view of a batched core (what MaskablePPO trains on).

Imported only when asked for (`llm_envs.make_sb3_vec_env`), so `import llm_envs` and
`gym.make_vec` never import stable-baselines3.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, ClassVar

import numpy as np
from gymnasium.utils.seeding import np_random
from stable_baselines3.common.vec_env.base_vec_env import VecEnv, VecEnvStepReturn

from llm_envs.envs.core import Restart
from llm_envs.vector.registry import core_class, face_class
from llm_envs.vector.vector_env import row_rngs


class LMSb3VecEnv(VecEnv):
    """An SB3 `VecEnv` over a batched core: same-step autoreset (inside the core's step, sharing
    its forward), `terminal_observation` and `TimeLimit.truncated` in infos, and
    `env_method("action_masks")` -> one (N, n_actions) array (what sb3-contrib's MaskablePPO
    reads). The core's `row_methods` are methods here too ([N, ...]); through `env_method` they
    give one row per env."""

    core_class: ClassVar[type]

    def __init__(self, num_envs: int = 1, **kwargs: Any) -> None:
        self.core = self.core_class(num_envs, **kwargs)
        self.render_mode: str | None = None
        super().__init__(num_envs, self.core.observation_space, self.core.action_space)
        self._rngs = row_rngs(None, num_envs)
        self._actions: np.ndarray | None = None

    @property
    def params(self) -> Any:
        """The env's MDP parameters (a frozen dataclass)."""
        return self.core.params

    def reset(self) -> np.ndarray:
        if any(seed is not None for seed in self._seeds):
            self._rngs = [np_random(seed)[0] for seed in self._seeds]
        rows = list(range(self.num_envs))
        options = [opt or None for opt in self._options]
        obs, infos = self.core.reset_rows(rows, self._rngs, options)
        self.reset_infos = infos.as_list()
        self._reset_seeds()
        self._reset_options()
        return obs

    def step_async(self, actions: np.ndarray) -> None:
        self._actions = np.asarray(actions)

    def step_wait(self) -> VecEnvStepReturn:
        obs, rewards, terminated, truncated, step_infos = self.core.step(self._actions, restart_done=self._restart)
        infos = step_infos.as_list()  # SB3's layout: one dict per env
        dones = terminated | truncated
        for row in np.flatnonzero(dones).tolist():
            new_info = infos[row]
            infos[row] = {**new_info.pop("final_info"), "terminal_observation": new_info.pop("final_obs"),
                          "TimeLimit.truncated": bool(truncated[row] and not terminated[row])}
            self.reset_infos[row] = new_info
        return obs, rewards.astype(np.float32), dones, infos

    def _restart(self, rows: list[int]) -> Restart:
        return Restart(rows, [self._rngs[r] for r in rows], [None] * len(rows))

    def action_masks(self) -> np.ndarray:
        return self.core.action_masks()

    def check_actions(self, actions: np.ndarray) -> None:
        """Raise what `step(actions)` would raise on them, changing nothing."""
        self.core.check_actions(actions)

    def close(self) -> None:
        pass

    def get_attr(self, attr_name: str, indices: Any = None) -> list[Any]:
        own = ("action_masks", "render_mode", *self.core_class.row_methods)
        target = self if attr_name in own else self.core
        value = getattr(target, attr_name)  # AttributeError when missing, as SB3 expects
        return [value for _ in self._get_indices(indices)]

    def set_attr(self, attr_name: str, value: Any, indices: Any = None) -> None:
        setattr(self.core, attr_name, value)

    def env_method(self, method_name: str, *args: Any, indices: Any = None, **kwargs: Any) -> Any:
        rows = list(self._get_indices(indices))
        if method_name == "action_masks":  # one array, as sb3-contrib's get_action_masks stacks it
            return self.action_masks()[rows]
        if method_name in self.core_class.row_methods:  # [N, ...] -> one row per env
            return list(getattr(self, method_name)(*args, **kwargs)[rows])
        return [getattr(self.core, method_name)(*args, **kwargs) for _ in rows]

    def env_is_wrapped(self, wrapper_class: type, indices: Any = None) -> list[bool]:
        return [False for _ in self._get_indices(indices)]


@functools.cache
def sb3_vec_env_class(core_cls: type) -> type[LMSb3VecEnv]:
    """`LMSb3VecEnv` for `core_cls`, with its signature and `row_methods`."""
    num_envs = inspect.Parameter("num_envs", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=1, annotation=int)
    return face_class(LMSb3VecEnv, core_cls, "Sb3VecEnv", lead=[num_envs])


def make_sb3_vec_env(env_id: str, num_envs: int, **kwargs: Any) -> LMSb3VecEnv:
    """An SB3 `VecEnv` of `num_envs` rows of `env_id` on one engine, ready for MaskablePPO.
    `kwargs` are the env's keywords (world keywords, MDP parameters or `params=`)."""
    if isinstance(num_envs, bool) or not isinstance(num_envs, (int, np.integer)) or num_envs < 1:
        raise ValueError(f"num_envs={num_envs!r}; expected at least 1.")
    return sb3_vec_env_class(core_class(env_id))(int(num_envs), **kwargs)
