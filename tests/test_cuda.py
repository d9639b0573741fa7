"""On a CUDA GPU (marker `cuda`; skipped where torch sees none): the bf16 engine against an fp32 full
forward, CUDA pools and masks against the CPU ones, and no host sync inside a step.

Run by `bash benchmarks/gpu_check.sh` (`pytest -m cuda`); every test skips on a CPU-only machine.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedModel

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (torch.cuda.is_available() is False)"),
]

VOCAB = 97
# bf16 keeps 8 significant bits: a logit of magnitude ~4 (initializer_range 0.2) rounds by ~0.016 per
# operation; two layers and the bf16 head accumulate a few of those. 0.15 is ~3x what CPU bf16 gives (0.05) on
# this model, and far below the ~1 gap between the top logits that decides a token.
BF16_LOGIT_TOL = 0.15
BF16_HIDDEN_TOL = 0.15
STEPS = 12


def tiny_llama(dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """A seeded random tiny Llama (GQA), far from uniform (initializer_range 0.2), on the CPU."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         initializer_range=0.2, bos_token_id=1, eos_token_id=2)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype).eval()


@pytest.fixture
def exact_float32_matmuls() -> Any:
    """CUDA float32 matmuls without TF32 (the engine turns TF32 on; CPU never uses it), so CUDA and CPU
    differ by summation order only; restored afterwards."""
    before = torch.get_float32_matmul_precision()
    yield lambda: torch.set_float32_matmul_precision("highest")
    torch.set_float32_matmul_precision(before)


def test_bf16_engine_matches_an_fp32_full_forward_without_cache() -> None:
    from llm_envs.engine import DecodeEngine

    reference = tiny_llama(torch.float32).to("cuda")
    half = copy.deepcopy(reference).to(torch.bfloat16)
    engine = DecodeEngine(half, 2)
    rng = np.random.default_rng(0)
    out = engine.reset_rows([0, 1], [[5, 6, 7, 8], [9]])
    worst = 0.0
    for step in range(8):
        if step % 3 == 2:
            engine.drop_last([0])  # a reject: the next append overwrites row 0's candidate
        out = engine.append(rng.integers(3, VOCAB, size=2).tolist())
        assert out.logits.dtype == torch.float32 and out.logits.device.type == "cuda"
        for row in (0, 1):
            with torch.no_grad():
                full = reference(torch.tensor([engine.tokens(row)], device="cuda"), output_hidden_states=True)
            logit_diff = (out.logits[row] - full.logits[0, -1].float()).abs().max().item()
            hidden_diff = (out.hidden[row] - full.hidden_states[-1][0, -1].float()).abs().max().item()
            assert logit_diff <= BF16_LOGIT_TOL, f"step {step} row {row}: |logit diff| {logit_diff:.3g}"
            assert hidden_diff <= BF16_HIDDEN_TOL, f"step {step} row {row}: |hidden diff| {hidden_diff:.3g}"
            worst = max(worst, logit_diff)
    print(f"bf16 engine vs fp32 full forward: worst |logit diff| {worst:.3g}")


def test_nucleus_pools_on_cuda_equal_the_cpu_ones() -> None:
    from llm_envs.envs.pools import nucleus_pools

    torch.manual_seed(1)
    logits = torch.randn(16, VOCAB) * 3
    kwargs = dict(top_p=0.9, top_k=None, temperature=1.0, head_min_prob=0.01, with_entropy=True)
    cpu, gpu = nucleus_pools(logits, **kwargs).rows(), nucleus_pools(logits.cuda(), **kwargs).rows()
    for i, (a, b) in enumerate(zip(cpu, gpu)):
        assert a.size == b.size and list(a.ids[:len(a.probs)]) == list(b.ids[:len(b.probs)]), f"row {i}"
        np.testing.assert_allclose(a.probs, b.probs, rtol=1e-6, atol=1e-9, err_msg=f"row {i}")
        np.testing.assert_allclose(a.suffix_mass, b.suffix_mass, rtol=1e-6, atol=1e-9, err_msg=f"row {i}")


def zero_reward(prompts: list[str], responses: list[str]) -> list[float]:
    return [0.0] * len(prompts)


def _env_kwargs(model: PreTrainedModel, device: str, **extra: Any) -> dict[str, Any]:
    """TokenAccept-v0's keywords on `model` (float32) with a word tokenizer and prompts, zero reward."""
    from llm_envs.world.build import train_tokenizer

    words = [f"w{i}" for i in range(VOCAB - 8)]
    prompts = [" ".join(words[i:i + 3 + i % 5]) for i in range(0, 40, 3)]
    return dict(lm=model, tokenizer=train_tokenizer(prompts), reward=zero_reward, prompts=prompts, device=device,
                dtype="float32", **extra)


def _vector_env(model: PreTrainedModel, device: str, num_envs: int = 4, **extra: Any) -> Any:
    import gymnasium as gym

    return gym.make_vec("llm_envs/TokenAccept-v0", num_envs=num_envs, **_env_kwargs(model, device, **extra))


def test_masks_and_observations_on_cuda_equal_the_cpu_ones(exact_float32_matmuls: Any) -> None:
    """Same float32 model, same actions: TokenAccept's action masks (SKAM on the pools) are equal and its
    observations (hidden state + pool features) agree to 1e-4."""
    model = tiny_llama(torch.float32)
    cpu_env = _vector_env(copy.deepcopy(model), "cpu", max_new_tokens=8)
    gpu_env = _vector_env(copy.deepcopy(model), "cuda", max_new_tokens=8)
    exact_float32_matmuls()
    obs_cpu, _ = cpu_env.reset(seed=0)
    obs_gpu, _ = gpu_env.reset(seed=0)
    rng = np.random.default_rng(0)
    for step in range(STEPS):
        np.testing.assert_allclose(obs_gpu, obs_cpu, atol=1e-4, err_msg=f"observations at step {step}")
        masks = cpu_env.action_masks()
        np.testing.assert_array_equal(gpu_env.action_masks(), masks, err_msg=f"action masks at step {step}")
        actions = np.where(masks[:, 1] & (rng.random(len(masks)) < 0.5), 1, 0)
        obs_cpu, *_ = cpu_env.step(actions)
        obs_gpu, *_ = gpu_env.step(actions)


def test_a_torch_face_step_syncs_only_for_its_two_copies() -> None:
    """Under torch's CUDA sync debug mode, a torch-face step with CUDA-tensor actions synchronises only
    where it means to: the actions' copy to the host (bookkeeping) and the step's one packed copy back
    (`pack_rows`); pools, masks, SKAM, the cache write and the mask build never wait on the GPU."""
    from llm_envs.envs import pools
    from llm_envs.vector import TorchVectorEnv

    assert pools.sync_free(torch.device("cuda"))
    venv = TorchVectorEnv(_vector_env(tiny_llama(torch.float32), "cuda", num_envs=4, max_new_tokens=64))
    venv.reset(seed=0)
    actions = torch.zeros(4, dtype=torch.long, device="cuda")  # accepts: no episode ends in these steps
    venv.step(actions)  # warm-up: kernels loaded, pinned buffers allocated
    torch.cuda.synchronize()
    counts = []
    torch.cuda.set_sync_debug_mode("warn")
    try:
        for _ in range(3):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                venv.step(actions)
            counts.append(sum("synchronizing" in str(w.message) for w in caught))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(count <= 2 for count in counts), counts


def test_a_ray_worker_gets_the_gpu_and_its_rows_follow_the_local_env() -> None:
    """One Ray env worker on a one-GPU cluster takes the GPU by default (num_gpus=1), its torch face gives
    CUDA tensors on the caller's device, and its rows follow the local CUDA env's (same seed and actions,
    same GPU and shapes, TF32 on in both)."""
    ray = pytest.importorskip("ray")
    from pathlib import Path

    from llm_envs.vector import make_ray_torch_vector_env, make_torch_vector_env

    tests = Path(__file__).resolve().parent  # the actor unpickles this module's zero_reward
    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False,
             runtime_env={"env_vars": {"PYTHONPATH": f"{tests.parent}:{tests}"}})
    try:
        kwargs = _env_kwargs(tiny_llama(torch.float32), "cuda", max_new_tokens=8)
        remote = make_ray_torch_vector_env("llm_envs/TokenAccept-v0", 4, num_workers=1, tensor_device="cuda",
                                           **kwargs)
        local = make_torch_vector_env("llm_envs/TokenAccept-v0", 4, **kwargs)
        assert remote.unwrapped.workers.num_gpus == 1 and remote.unwrapped.workers.infos[0].device.startswith("cuda")
        obs_remote, _ = remote.reset(seed=0)
        obs_local, _ = local.reset(seed=0)
        rng = np.random.default_rng(0)
        for step in range(STEPS):
            assert obs_remote.device.type == "cuda"
            torch.testing.assert_close(obs_remote, obs_local, atol=1e-5, rtol=0, msg=f"observations at step {step}")
            masks = local.action_masks()
            assert torch.equal(remote.action_masks().to(masks.device), masks), f"action masks at step {step}"
            choice = torch.from_numpy(rng.random(4) < 0.5).to(masks.device)
            actions = torch.where(masks[:, 1] & choice, 1, 0)
            obs_remote, rewards_remote, *_ = remote.step(actions)
            obs_local, rewards_local, *_ = local.step(actions)
            torch.testing.assert_close(rewards_remote, rewards_local)
        remote.close()
    finally:
        ray.shutdown()
