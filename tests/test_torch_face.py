"""The torch face: tensors on the engine's device in and out, equal to the numpy face's arrays."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llm_envs.vector import make_torch_vector_env, make_vector_env

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def world_kwargs(test_world):
    return dict(lm=test_world.lm_dir, reward=test_world.rm_dir, prompts=test_world.train_prompts[:200],
                gold=test_world.gold, device="cpu")


@pytest.mark.parametrize("env_id, kwargs", [
    ("llm_envs/TokenAccept-v0", {"p_t": 0.001}),
    ("llm_envs/TokenAccept-v0", {"p_t": 0.001, "obs_mode": "prefix"}),
    ("llm_envs/TokenChoice-v0", {"k": 4, "top_p": 0.9}),
])
def test_the_torch_face_equals_the_numpy_face_along_random_episodes(world_kwargs, env_id, kwargs):
    numpy_env = make_vector_env(env_id, 3, max_new_tokens=6, **kwargs, **world_kwargs)
    torch_env = make_torch_vector_env(env_id, 3, max_new_tokens=6, **kwargs, **world_kwargs)
    obs, _ = numpy_env.reset(seed=4)
    tobs, _ = torch_env.reset(seed=4)
    assert isinstance(tobs, torch.Tensor) and tobs.device == torch_env.device and tobs.dtype == torch.float32
    assert torch.equal(tobs, torch.from_numpy(obs))
    rng = np.random.default_rng(0)
    ended = 0
    for _ in range(14):
        masks = numpy_env.action_masks()
        tmasks = torch_env.action_masks()
        assert tmasks.dtype == torch.bool and torch.equal(tmasks, torch.from_numpy(masks))
        actions = np.array([rng.choice(np.flatnonzero(m)) for m in masks])
        obs, rewards, terminated, truncated, _ = numpy_env.step(actions)
        tobs, trewards, tterminated, ttruncated, _ = torch_env.step(torch.from_numpy(actions))
        assert torch.equal(tobs, torch.from_numpy(obs))
        assert torch.equal(trewards, torch.from_numpy(rewards).float())
        assert torch.equal(tterminated, torch.from_numpy(terminated))
        assert torch.equal(ttruncated, torch.from_numpy(truncated))
        ended += int((terminated | truncated).sum())
    assert ended >= 2  # episode ends and autoresets went through both faces
    policy = torch.nn.Linear(tobs.shape[1], 2)  # an agent trains on them: not inference-mode tensors
    policy(tobs).sum().backward()
    assert policy.weight.grad is not None


def test_the_torch_face_wraps_only_llm_envs_vector_envs():
    with pytest.raises(TypeError, match="make_torch_vector_env"):
        from llm_envs.vector import TorchVectorEnv

        TorchVectorEnv(object())
