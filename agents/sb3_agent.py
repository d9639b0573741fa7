"""Adapters from SB3 / sb3-contrib models to the `PolicyAgent` protocol, and safe loading."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np


class SB3Agent:
    """Any SB3 model as a `PolicyAgent`; masks are passed on to maskable models."""

    def __init__(self, model: Any, name: str = "proxy") -> None:
        self.model = model
        self.name = name
        self._maskable = "action_masks" in model.predict.__code__.co_varnames

    def predict(
        self, obs: np.ndarray, action_masks: np.ndarray | None = None, deterministic: bool = True
    ) -> np.ndarray:
        kwargs = {"action_masks": action_masks} if self._maskable and action_masks is not None else {}
        actions, _ = self.model.predict(obs, deterministic=deterministic, **kwargs)
        return np.asarray(actions)

    @property
    def trainable_params(self) -> int:
        return sum(p.numel() for p in self.model.policy.parameters() if p.requires_grad)


def load_proxy(path: str | os.PathLike, observation_space: gym.spaces.Box, device: str = "auto",
               action_space: gym.spaces.Space | None = None) -> SB3Agent:
    """Load a MaskablePPO proxy for an env; a different observation size (or, when given, action
    space: a TokenAccept proxy on TokenChoice) is a clear error."""
    from sb3_contrib import MaskablePPO

    path = Path(path)
    if not path.exists() and path.with_suffix(".zip").exists():
        path = path.with_suffix(".zip")
    if not path.is_file():
        raise FileNotFoundError(f"proxy checkpoint {str(path)!r} does not exist; pass the .zip written by `llm-envs train`.")
    try:
        model = MaskablePPO.load(path, device=device)
    except Exception as error:  # a torn or foreign zip fails in zipfile, torch or SB3 with many error types
        raise ValueError(f"proxy checkpoint {str(path)!r} does not load ({type(error).__name__}: {error}); it is "
                         "damaged or not a MaskablePPO model. Use another checkpoint of the run "
                         "(<output_dir>/checkpoints/) or retrain.") from error
    saved, wanted = model.observation_space.shape, observation_space.shape
    if saved != wanted:
        raise ValueError(
            f"proxy checkpoint {str(path)!r} expects observations of shape {saved}, but the env "
            f"gives {wanted}: it was trained on another LM (hidden size) or other observation settings "
            "(TokenAccept's obs_mode; TokenChoice's k or obs_rewards). Evaluate it with the env config it "
            "was trained with (config.yaml beside it), or retrain."
        )
    if action_space is not None and model.action_space != action_space:
        raise ValueError(
            f"proxy checkpoint {str(path)!r} acts in {model.action_space}, but the env's actions are "
            f"{action_space}: it was trained on another env (TokenAccept: Discrete(2); TokenChoice: "
            "Discrete(k)). Evaluate it on the env it was trained on (config.yaml beside it), or retrain."
        )
    return SB3Agent(model, name="proxy")
