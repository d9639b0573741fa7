"""The torch face of a vector env: observations, masks, rewards and episode ends as torch tensors
on the engine's device, actions as a tensor, for agents that live on the GPU.

Why not Gymnasium's `NumpyToTorch` wrapper: it converts the numpy face, so every observation would
go device -> host -> device. Here the observations and masks are built from the core's device
tensors (`observation_tensor`, `action_mask_tensor`), equal bit for bit to the numpy face's; the
host keeps only the step's bookkeeping. Per step: one device->host copy of the actions (the host
validates them and keeps the episode counters) and the core's one copy of what the host needs.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from gymnasium.vector import VectorWrapper

from llm_envs.vector.vector_env import LMVectorEnv, make_vector_env


class TorchVectorEnv(VectorWrapper):
    """`LMVectorEnv` with torch tensors on the engine's device in and out.

    `reset` -> (obs [N, D] float32, infos); `step(actions)` (a tensor [N] on any device, or anything
    the numpy face takes) -> (obs, rewards [N] float32, terminated [N] bool, truncated [N] bool,
    infos); `action_masks()` -> [N, n_actions] bool. Infos keep the numpy face's layout (they are
    host data: text, ids, per-row dicts). `device` is where the tensors live.
    """

    def __init__(self, env: LMVectorEnv) -> None:
        if not isinstance(env, LMVectorEnv):
            raise TypeError(f"TorchVectorEnv wraps an llm_envs LMVectorEnv, got {type(env).__name__}; "
                            "build one with make_torch_vector_env(env_id, num_envs).")
        super().__init__(env)
        self.core = env.core
        self.device: torch.device = env.core.device

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        _, infos = self.env.reset(seed=seed, options=options)
        return self.core.observation_tensor(), infos

    def step(self, actions: Any):
        if isinstance(actions, torch.Tensor):
            actions = actions.detach().to("cpu").numpy()  # the one copy in: the host checks and counts them
        _, rewards, terminated, truncated, infos = self.env.step(actions)
        return (self.core.observation_tensor(), self._tensor(rewards, torch.float32), self._tensor(terminated),
                self._tensor(truncated), infos)

    def action_masks(self) -> torch.Tensor:
        """[N, n_actions] bool on the device (rows about to reset: all actions legal)."""
        masks = self.core.action_mask_tensor()
        needs_reset = self.env._needs_reset
        if needs_reset.any():
            masks[torch.from_numpy(needs_reset).to(self.device)] = True
        return masks

    def _tensor(self, values: np.ndarray, dtype: torch.dtype | None = None) -> torch.Tensor:
        tensor = torch.from_numpy(np.ascontiguousarray(values))
        if dtype is not None:
            tensor = tensor.to(dtype)
        return tensor if self.device.type == "cpu" else tensor.pin_memory().to(self.device, non_blocking=True)


def make_torch_vector_env(env_id: str, num_envs: int = 1, **kwargs: Any) -> TorchVectorEnv:
    """The torch face of `make_vector_env(env_id, num_envs, **kwargs)` (same keywords)."""
    return TorchVectorEnv(make_vector_env(env_id, num_envs, **kwargs))
