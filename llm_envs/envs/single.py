"""The single-env face of a batched MDP core: the core with one row (one implementation)."""

from __future__ import annotations

import inspect
from typing import Any, ClassVar

import gymnasium as gym
import numpy as np

from llm_envs.envs.core import core_signature, row_method_forwarders
from llm_envs.envs.params import arguments_doc

PARAMS_MARKER = "{params}"  # the env card line that becomes the list of MDP parameters


class SingleRowEnv(gym.Env):
    """A `gym.Env` over `core_class(1, **kwargs)`; subclasses set `core_class` and the env card.

    A subclass gets, from its core class: its signature (`render_mode`, the world keywords, one
    keyword per MDP parameter), the env card's parameter list (the `{params}` line of its
    docstring, generated from the params dataclass), and the core's `row_methods` taking row 0.
    """

    core_class: ClassVar[type]
    metadata = {"render_modes": ["ansi"]}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "core_class" not in cls.__dict__:
            return
        params_class = cls.core_class.params_class
        render_mode = inspect.Parameter("render_mode", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None,
                                        annotation="str | None")
        cls.__signature__ = core_signature(params_class, lead=[render_mode])
        if cls.__doc__ and PARAMS_MARKER in cls.__doc__:
            cls.__doc__ = _fill_marker(cls.__doc__, arguments_doc(params_class))
        note = f"This env's row of `{cls.core_class.__name__}`'s method (no leading row axis):"
        for name, method in row_method_forwarders(cls.core_class, lambda self, out: out[0], note).items():
            if name not in cls.__dict__:
                setattr(cls, name, method)

    def __init__(self, render_mode: str | None = None, **kwargs: Any) -> None:
        if render_mode not in (None, "ansi"):
            raise ValueError(f"render_mode={render_mode!r}; expected None or 'ansi'.")
        self.render_mode = render_mode
        self.core = self.core_class(1, **kwargs)
        self.observation_space = self.core.observation_space
        self.action_space = self.core.action_space

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)  # seeds self.np_random, the row's prompt sampler
        obs, infos = self.core.reset_rows([0], [self.np_random], [options])
        return obs[0], infos[0]

    def step(self, action: Any):
        if isinstance(action, np.ndarray) and action.ndim == 0:  # a 0-d array is a scalar; np.array([[0]]) is not
            action = action[()]
        batch = np.empty(1, dtype=object)
        batch[0] = action  # kept as given, so the core checks its type
        obs, rewards, terminated, truncated, infos = self.core.step(batch)
        return obs[0], float(rewards[0]), bool(terminated[0]), bool(truncated[0]), infos[0]

    def action_masks(self) -> np.ndarray:
        return self.core.action_masks()[0]

    @property
    def params(self) -> Any:
        """The env's MDP parameters (a frozen dataclass)."""
        return self.core.params


def _fill_marker(doc: str, text: str) -> str:
    """Replace the marker line by `text`, indented like the marker (docstrings are dedented later)."""
    lines = doc.splitlines()
    for i, line in enumerate(lines):
        if line.strip() == PARAMS_MARKER:
            indent = line[: len(line) - len(line.lstrip())]
            lines[i : i + 1] = [indent + t for t in text.splitlines()]
    return "\n".join(lines)
