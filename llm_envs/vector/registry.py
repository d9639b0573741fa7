"""Env id -> env class -> batched core class, through Gymnasium's registry (the only registry).

`llm_envs/__init__.py` registers each env with its single-env entry point; the env class names
its core (`core_class`), so the vector views need no table of their own.
"""

from __future__ import annotations

import gymnasium as gym
from gymnasium.envs.registration import load_env_creator, registry

from llm_envs.config import did_you_mean


def env_class(env_id: str) -> type:
    """The single-env class registered for `env_id`."""
    try:
        spec = gym.spec(env_id)
    except gym.error.Error as error:
        ours = sorted(name for name in registry if name.startswith("llm_envs/"))
        raise ValueError(
            f"env id {env_id!r} is not registered ({error}); expected one of {ours}. Import llm_envs first, "
            f"or write 'llm_envs:{env_id}'.{did_you_mean(env_id, ours)}"
        ) from error
    entry = spec.entry_point
    return load_env_creator(entry) if isinstance(entry, str) else entry


def core_class(env_id: str) -> type:
    """The batched core behind `env_id` (the class its env runs with one row)."""
    cls = env_class(env_id)
    core = getattr(cls, "core_class", None)
    if core is None:
        raise ValueError(
            f"env id {env_id!r} ({cls.__module__}.{cls.__name__}) has no batched core (no `core_class`); "
            "the llm_envs vector views drive batched cores only. Use gym.make_vec(..., "
            "vectorization_mode='sync') for other envs."
        )
    return core
