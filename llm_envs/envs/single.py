"""The single-env face of a batched MDP core: the core with one row (one implementation)."""

from __future__ import annotations

from typing import Any, ClassVar

import gymnasium as gym
import numpy as np


class SingleRowEnv(gym.Env):
    """A `gym.Env` over `core_class(1, **kwargs)`; subclasses set `core_class` and the env card."""

    core_class: ClassVar[type]
    metadata = {"render_modes": ["ansi"]}

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
        obs, rewards, terminated, truncated, infos = self.core.step(np.array([action], dtype=object))
        return obs[0], float(rewards[0]), bool(terminated[0]), bool(truncated[0]), infos[0]

    def action_masks(self) -> np.ndarray:
        return self.core.action_masks()[0]
