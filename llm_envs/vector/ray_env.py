"""The Gymnasium and torch faces of an env whose rows live in K Ray actors (`llm_envs.vector.ray_workers`).

`make_ray_vector_env(env_id, num_envs, num_workers=K, **env_keywords)` is `make_vector_env` with its
rows split over K actors of `num_envs / K` rows each (one batched core per actor, on its own device):
same spaces, same autoreset, same info layout, and row i follows the same trajectory as row i of
`make_vector_env(env_id, num_envs)` with the same seed. A step sends every actor its actions and
gathers all their results in one round trip; `action_masks()` answers from what the step brought back.

`make_ray_torch_vector_env` gives the same env with torch tensors on the caller's `tensor_device`
(`device=` stays the env keyword: where each actor's engine runs).
"""

from __future__ import annotations

import functools
from typing import Any, ClassVar

import gymnasium as gym
import numpy as np
import torch
from gymnasium.vector import AutoresetMode, VectorEnv, VectorWrapper

from llm_envs.envs.rows import to_device
from llm_envs.models import resolve_device
from llm_envs.vector.ray_workers import (
    START_TIMEOUT_S,
    KwargsFactory,
    WorkerGroup,
    concat_vector_infos,
    ray_face_class,
)
from llm_envs.vector.registry import core_class


class RayVectorEnv(VectorEnv):
    """A Gymnasium `VectorEnv` of `num_envs` rows held by `num_workers` Ray actors (each an `LMVectorEnv`
    of `num_envs / num_workers` rows). Built by `make_ray_vector_env`; `workers` is the driver's
    `WorkerGroup` (`workers.infos`: each actor's device, pid and node). `close()` kills the actors."""

    core_class: ClassVar[type]

    def __init__(self, env_id: str, num_envs: int, *, num_workers: int, kwargs_factory: KwargsFactory | None = None,
                 autoreset_mode: AutoresetMode | str = AutoresetMode.NEXT_STEP, max_episode_steps: int | None = None,
                 num_cpus: float = 1, num_gpus: float | None = None, torch_threads: int | None = None,
                 timeout_s: float | None = None, start_timeout_s: float = START_TIMEOUT_S, **kwargs: Any) -> None:
        mode = AutoresetMode(autoreset_mode)
        self.workers = WorkerGroup(
            "gymnasium", env_id, num_envs, num_workers, kwargs_factory=kwargs_factory,
            kwargs={**kwargs, "autoreset_mode": mode, "max_episode_steps": max_episode_steps},
            num_cpus=num_cpus, num_gpus=num_gpus, torch_threads=torch_threads, timeout_s=timeout_s,
            start_timeout_s=start_timeout_s)
        info = self.workers.infos[0]
        self.num_envs = self.workers.num_envs
        self.autoreset_mode = mode
        self.metadata = {"autoreset_mode": mode, "render_modes": []}
        self.single_observation_space = info.observation_space
        self.single_action_space = info.action_space
        self.observation_space = gym.vector.utils.batch_space(self.single_observation_space, self.num_envs)
        self.action_space = gym.vector.utils.batch_space(self.single_action_space, self.num_envs)
        self._masks = np.ones((self.num_envs, int(info.action_space.n)), dtype=bool)
        self._started = False

    @property
    def params(self) -> Any:
        """The env's MDP parameters (a frozen dataclass; the same on every worker)."""
        return self.workers.infos[0].params

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        n = self.workers.rows_per_worker
        results = self.workers.call("reset", [(None if seed is None else seed + k * n, options)
                                              for k in range(self.workers.num_workers)])
        obs, infos, masks = zip(*results)
        self._masks = np.concatenate(masks)
        self._started = True
        return np.concatenate(obs), concat_vector_infos(infos, [n] * len(infos))

    def step(self, actions: Any):
        if not self._started:
            raise RuntimeError("step() called before reset(); call reset() first.")
        array = self.workers.check_actions(actions, self._masks, int(self.single_action_space.n),
                                           strict_masks=getattr(self.params, "invalid_action", None) == "raise")
        results = gather_step(self, send_step(self, array))
        obs, rewards, terminated, truncated, infos, masks = zip(*results)
        self._masks = np.concatenate(masks)
        return (np.concatenate(obs), np.concatenate(rewards), np.concatenate(terminated), np.concatenate(truncated),
                concat_vector_infos(infos, [self.workers.rows_per_worker] * len(infos)))

    def action_masks(self) -> np.ndarray:
        """[num_envs, n_actions] bool (for rows about to reset: all actions legal), as of the last step."""
        return self._masks.copy()

    def close_extras(self, **kwargs: Any) -> None:
        self.workers.close()


def send_step(env: Any, actions: np.ndarray) -> list[tuple[int, Any]]:
    """Send every worker its slice of the (checked) actions; the futures go to `gather_step`."""
    return env.workers.submit("step", [(part,) for part in env.workers.split(actions)])


def gather_step(env: Any, futures: list[tuple[int, Any]]) -> list[Any]:
    """Every worker's step result, in one `ray.get`. If a worker raised inside its step, the others
    have moved on: the env then needs `reset()` (`env._started = False`)."""
    try:
        return env.workers.gather(futures)
    except Exception as error:
        if not env.workers.broken:  # a worker's own error, not a dead one
            env._started = False
            error.add_note("The other Ray workers' rows took this step, so every env now needs reset().")
        raise


@functools.cache
def ray_vector_env_class(core_cls: type) -> type[RayVectorEnv]:
    """`RayVectorEnv` for `core_cls`, with the core's row methods ([num_envs, ...], from every worker)."""
    return ray_face_class(RayVectorEnv, core_cls, "RayVectorEnv")


def make_ray_vector_env(env_id: str, num_envs: int, *, num_workers: int,
                        kwargs_factory: KwargsFactory | None = None, **kwargs: Any) -> RayVectorEnv:
    """The Gymnasium vector env of `env_id` with its `num_envs` rows split over `num_workers` Ray actors
    (`num_envs` must be divisible by `num_workers`). `kwargs` are `make_vector_env`'s keywords (the env's
    world keywords and parameters, `autoreset_mode`, `max_episode_steps`), pickled to every actor;
    `kwargs_factory` (a picklable zero-argument callable, e.g. `llm_envs.task.TaskEnvKwargs(task)`) gives
    keywords built inside each actor instead, so each loads its models on its own device (`kwargs`
    override it). Worker options: `num_cpus` and `num_gpus` per actor (default: one GPU each when
    the cluster has them, an equal share of one when it has fewer GPUs than workers, else CPU; an actor sees
    only its own GPUs, so leave `device` at 'auto' or 'cuda'), `torch_threads` per actor, `timeout_s`
    per reset and step, `start_timeout_s` for the actors to start. Starts a local Ray cluster when
    none is initialised (`llm_envs.vector.ray_workers.ensure_ray`)."""
    return ray_vector_env_class(core_class(env_id))(env_id, num_envs, num_workers=num_workers,
                                                    kwargs_factory=kwargs_factory, **kwargs)


class RayTorchVectorEnv(VectorWrapper):
    """`RayVectorEnv` with torch tensors on `tensor_device` (the caller's, e.g. where the agent lives) in and
    out: obs [N, D] float32, rewards [N] float32, terminated / truncated [N] bool, `action_masks()`
    [N, n_actions] bool; actions as a tensor on any device (or anything the numpy face takes). Infos
    keep the numpy layout. The workers' arrays reach the driver's host anyway, so each result is one
    host -> device copy."""

    def __init__(self, env: RayVectorEnv, tensor_device: str | torch.device = "auto") -> None:
        if not isinstance(env, RayVectorEnv):
            raise TypeError(f"RayTorchVectorEnv wraps a RayVectorEnv, got {type(env).__name__}; build one with "
                            "make_ray_torch_vector_env(env_id, num_envs, num_workers=K).")
        super().__init__(env)
        self.device: torch.device = resolve_device(tensor_device)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        obs, infos = self.env.reset(seed=seed, options=options)
        return to_device(obs, self.device), infos

    def step(self, actions: Any):
        if isinstance(actions, torch.Tensor):
            actions = actions.detach().to("cpu").numpy()
        obs, rewards, terminated, truncated, infos = self.env.step(actions)
        return (to_device(obs, self.device), to_device(rewards.astype(np.float32), self.device),
                to_device(terminated, self.device), to_device(truncated, self.device), infos)

    def action_masks(self) -> torch.Tensor:
        return to_device(self.env.action_masks(), self.device)


def make_ray_torch_vector_env(env_id: str, num_envs: int, *, num_workers: int,
                              tensor_device: str | torch.device = "auto", kwargs_factory: KwargsFactory | None = None,
                              **kwargs: Any) -> RayTorchVectorEnv:
    """The torch face of `make_ray_vector_env(env_id, num_envs, num_workers=K, **kwargs)`, with tensors on
    `tensor_device` ('auto': cuda when the driver has one, else cpu); `device=` in `kwargs` is, as for
    every env, where the actors' engines run ('auto': each actor's GPU when it has one)."""
    return RayTorchVectorEnv(make_ray_vector_env(env_id, num_envs, num_workers=num_workers,
                                                 kwargs_factory=kwargs_factory, **kwargs), tensor_device)


__all__ = ["RayTorchVectorEnv", "RayVectorEnv", "make_ray_torch_vector_env", "make_ray_vector_env",
           "ray_vector_env_class"]
