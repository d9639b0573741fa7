"""The Stable-Baselines3 `VecEnv` face of an env whose rows live in K Ray actors (what MaskablePPO trains
on with `llm-envs train ... train.num_workers=K`).

Each actor holds an `LMSb3VecEnv` of `num_envs / K` rows, so same-step autoreset, `terminal_observation`
and `TimeLimit.truncated` are the local face's; row i follows the same trajectory as row i of
`make_sb3_vec_env(env_id, num_envs)` after the same `seed()`. `step_async` sends the actions to every
actor, `step_wait` gathers them (one round trip); `env_method("action_masks")` is one (N, n_actions)
array, answered on the driver from what the step brought back (no second round trip per step).
Imported only when asked for, like `llm_envs.vector.sb3`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
from stable_baselines3.common.vec_env.base_vec_env import VecEnv, VecEnvIndices, VecEnvStepReturn

from llm_envs.vector.ray_env import gather_step, send_step
from llm_envs.vector.ray_workers import START_TIMEOUT_S, KwargsFactory, WorkerGroup, ray_face_class
from llm_envs.vector.registry import core_class


class RaySb3VecEnv(VecEnv):
    """An SB3 `VecEnv` of `num_envs` rows held by `num_workers` Ray actors (each an `LMSb3VecEnv`).
    Built by `make_ray_sb3_vec_env`; `close()` kills the actors."""

    core_class: ClassVar[type]

    def __init__(self, env_id: str, num_envs: int, *, num_workers: int, kwargs_factory: KwargsFactory | None = None,
                 num_cpus: float = 1, num_gpus: float | None = None, torch_threads: int | None = None,
                 timeout_s: float | None = None, start_timeout_s: float = START_TIMEOUT_S, **kwargs: Any) -> None:
        self.workers = WorkerGroup("sb3", env_id, num_envs, num_workers, kwargs_factory=kwargs_factory, kwargs=kwargs,
                                   num_cpus=num_cpus, num_gpus=num_gpus, torch_threads=torch_threads,
                                   timeout_s=timeout_s, start_timeout_s=start_timeout_s)
        info = self.workers.infos[0]
        self.render_mode: str | None = None
        super().__init__(self.workers.num_envs, info.observation_space, info.action_space)
        self._masks = np.ones((self.num_envs, int(info.action_space.n)), dtype=bool)
        self._pending: list | None = None  # the step sent by step_async, gathered by step_wait
        self._started = False

    @property
    def params(self) -> Any:
        """The env's MDP parameters (a frozen dataclass; the same on every worker)."""
        return self.workers.infos[0].params

    def reset(self) -> np.ndarray:
        # SB3's pending per-row seeds and options (`seed()`, `set_options()`), each worker given its rows'.
        self._pending = None  # a step sent but not gathered: each worker runs it before this reset anyway
        seeds, options = self.workers.split(self._seeds), self.workers.split([opt or {} for opt in self._options])
        results = self.workers.call("reset_sb3", list(zip(seeds, options)))
        obs, reset_infos, masks = zip(*results)
        self.reset_infos = [info for part in reset_infos for info in part]
        self._masks = np.concatenate(masks)
        self._reset_seeds()
        self._reset_options()
        self._started = True
        return np.concatenate(obs)

    def step_async(self, actions: np.ndarray) -> None:
        if not self._started:
            raise RuntimeError("step() called before reset(); call reset() first.")
        if self._pending is not None:
            raise RuntimeError("step_async() called twice without step_wait(); call step_wait() first.")
        array = self.workers.check_actions(actions, self._masks, int(self.action_space.n),
                                           strict_masks=getattr(self.params, "invalid_action", None) == "raise")
        self._pending = send_step(self, array)

    def step_wait(self) -> VecEnvStepReturn:
        if self._pending is None:
            raise RuntimeError("step_wait() called without step_async(); call step_async(actions) first.")
        futures, self._pending = self._pending, None
        results = gather_step(self, futures)
        obs, rewards, dones, infos, masks, new_infos = zip(*results)
        self._masks = np.concatenate(masks)
        n = self.workers.rows_per_worker
        for k, part in enumerate(new_infos):
            for row, info in part.items():
                self.reset_infos[k * n + row] = info
        return (np.concatenate(obs), np.concatenate(rewards), np.concatenate(dones),
                [info for part in infos for info in part])

    def action_masks(self) -> np.ndarray:
        return self._masks.copy()

    def close(self) -> None:
        self.workers.close()

    def get_attr(self, attr_name: str, indices: VecEnvIndices = None) -> list[Any]:
        rows = list(self._get_indices(indices))
        if attr_name in ("action_masks", "render_mode", "params", *self.core_class.row_methods):
            return [getattr(self, attr_name) for _ in rows]
        return self._per_row("get_attr", rows, lambda local: (attr_name, local))

    def set_attr(self, attr_name: str, value: Any, indices: VecEnvIndices = None) -> None:
        # As the local face: the attribute is set on the core, which every row shares (so on every worker).
        self.workers.call("set_attr", [(attr_name, value)] * self.workers.num_workers)

    def env_method(self, method_name: str, *method_args: Any, indices: VecEnvIndices = None,
                   **method_kwargs: Any) -> Any:
        rows = list(self._get_indices(indices))
        if method_name == "action_masks":  # one array, as sb3-contrib's get_action_masks stacks it
            return self._masks[rows]
        return self._per_row("env_method", rows, lambda local: (method_name, method_args, method_kwargs, local))

    def env_is_wrapped(self, wrapper_class: type, indices: VecEnvIndices = None) -> list[bool]:
        return [False for _ in self._get_indices(indices)]

    def _per_row(self, method: str, rows: Sequence[int], args: Any) -> list[Any]:
        """One value per row of `rows`, each from the worker that holds it (in the order asked)."""
        grouped = self.workers.by_worker(rows)
        workers = list(grouped)
        answers = self.workers.call(method, [args(grouped[k]) for k in workers], workers=workers)
        values = {(k, local): value for k, part in zip(workers, answers) for local, value in zip(grouped[k], part)}
        n = self.workers.rows_per_worker
        return [values[(row // n, row % n)] for row in rows]


@functools.cache
def ray_sb3_vec_env_class(core_cls: type) -> type[RaySb3VecEnv]:
    """`RaySb3VecEnv` for `core_cls`, with the core's row methods ([num_envs, ...], from every worker)."""
    return ray_face_class(RaySb3VecEnv, core_cls, "RaySb3VecEnv")


def make_ray_sb3_vec_env(env_id: str, num_envs: int, *, num_workers: int,
                         kwargs_factory: KwargsFactory | None = None, **kwargs: Any) -> RaySb3VecEnv:
    """The SB3 `VecEnv` of `env_id` with its `num_envs` rows split over `num_workers` Ray actors, ready for
    MaskablePPO. Keywords as `make_ray_vector_env` (the env's keywords, `kwargs_factory`, `num_cpus`,
    `num_gpus`, `torch_threads`, `timeout_s`)."""
    return ray_sb3_vec_env_class(core_class(env_id))(env_id, num_envs, num_workers=num_workers,
                                                     kwargs_factory=kwargs_factory, **kwargs)
