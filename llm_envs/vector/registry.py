"""Env id -> env class -> batched core class, through Gymnasium's registry (the only registry).

`llm_envs/__init__.py` registers each env with its single-env entry point; the env class names
its core (`core_class`), so the vector views need no table of their own.
"""

from __future__ import annotations

import inspect
from typing import Any

import gymnasium as gym
from gymnasium.envs.registration import load_env_creator, registry

from llm_envs.config import did_you_mean
from llm_envs.envs.core import core_signature, row_method_forwarders


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


def face_class(base: type, core_cls: type, suffix: str, lead: list[inspect.Parameter]) -> type:
    """A vector face (`base`: the Gymnasium or the SB3 view) of `core_cls`, e.g. `TokenChoiceVectorEnv`:
    its signature shows `lead` then the env's parameters, and it has the core's `row_methods`
    ([num_envs, ...] each), so every face of an env id has the same methods."""
    name = core_cls.__name__.removesuffix("Core") + suffix
    namespace: dict[str, Any] = {
        "core_class": core_cls,
        "__module__": base.__module__,
        "__qualname__": name,
        "__doc__": f"`{base.__name__}` of `{core_cls.__module__}.{core_cls.__name__}`; see the env card of its env.",
        **row_method_forwarders(core_cls, lambda self, out: out),
    }
    cls = type(name, (base,), namespace)
    cls.__signature__ = core_signature(core_cls.params_class, lead=lead)
    return cls
