"""Vector views of the batched MDP cores: N envs as N rows of one core, one LM forward per step.

- `make_vector_env` / `gym.make_vec`: a Gymnasium `VectorEnv` (`llm_envs.vector.vector_env`).
- `make_torch_vector_env`: the same with torch tensors on the engine's device in and out
  (`llm_envs.vector.torch_face`), for agents on the GPU.
- `make_sb3_vec_env` / `llm_envs.make_sb3_vec_env`: a Stable-Baselines3 `VecEnv`
  (`llm_envs.vector.sb3`), imported only when asked for: stable-baselines3 stays unimported
  otherwise.
- `make_ray_vector_env`, `make_ray_torch_vector_env`, `make_ray_sb3_vec_env`: the same three faces with
  the rows split over K Ray actors, one batched core each on its own device
  (`llm_envs.vector.ray_env`, `llm_envs.vector.ray_sb3`; Ray is the optional extra
  `pip install 'llm-envs[ray]'`, imported only when such an env is built).

Env ids resolve through Gymnasium's registry (`llm_envs.vector.registry`).
"""

from __future__ import annotations

from typing import Any

from llm_envs.vector.ray_env import RayTorchVectorEnv, RayVectorEnv, make_ray_torch_vector_env, make_ray_vector_env
from llm_envs.vector.registry import core_class, env_class
from llm_envs.vector.torch_face import TorchVectorEnv, make_torch_vector_env
from llm_envs.vector.vector_env import (
    LMVectorEnv,
    make_vector_env,
    merge_infos,
    token_accept_vector_env,
    token_choice_vector_env,
    vector_env_class,
)


def make_sb3_vec_env(env_id: str, num_envs: int, **kwargs: Any) -> Any:
    """An SB3 `VecEnv` of `num_envs` rows of `env_id` on one engine (see `llm_envs.vector.sb3`)."""
    from llm_envs.vector.sb3 import make_sb3_vec_env as make

    return make(env_id, num_envs, **kwargs)


def make_ray_sb3_vec_env(env_id: str, num_envs: int, *, num_workers: int, **kwargs: Any) -> Any:
    """An SB3 `VecEnv` of `num_envs` rows of `env_id` split over `num_workers` Ray actors (see
    `llm_envs.vector.ray_sb3`)."""
    from llm_envs.vector.ray_sb3 import make_ray_sb3_vec_env as make

    return make(env_id, num_envs, num_workers=num_workers, **kwargs)


__all__ = ["LMVectorEnv", "RayTorchVectorEnv", "RayVectorEnv", "TorchVectorEnv", "core_class", "env_class",
           "make_ray_sb3_vec_env", "make_ray_torch_vector_env", "make_ray_vector_env", "make_sb3_vec_env",
           "make_torch_vector_env", "make_vector_env", "merge_infos",
           "token_accept_vector_env", "token_choice_vector_env", "vector_env_class"]
