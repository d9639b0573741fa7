"""A vector step reads the device once: the host copy of what it needs, nothing else.

On a GPU every read of a device tensor from the host (`.item()`, `.tolist()`, `.cpu()`, `nonzero`,
`bool(t)`, `int(t)`, ...) waits for the device to finish, so a step that reads row by row runs at
the speed of its slowest sync. These tests count such reads on the CPU, with the pools' accelerator
path forced (`SYNC_FREE_ON_CPU`), over steps where no episode ends (an ending episode's bookkeeping
-- reward-model call, text, restart -- may read more: it is not per step).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llm_envs.envs import pools as pools_module
from llm_envs.vector import make_torch_vector_env, make_vector_env

pytestmark = pytest.mark.usefixtures("one_torch_thread")

READS = ("item", "tolist", "cpu", "nonzero", "__bool__", "__int__", "__float__", "__index__")
HOST_COPIES_PER_STEP = 1


@pytest.fixture(scope="module")
def world_kwargs(test_world):
    return dict(lm=test_world.lm_dir, reward=test_world.rm_dir, prompts=test_world.train_prompts[:200],
                gold=test_world.gold, device="cpu")


class _ReadCounter:
    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[str] = []
        for name in READS:
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._counted(name, original))
        original_nonzero = torch.nonzero
        monkeypatch.setattr(torch, "nonzero", lambda *a, **k: (self.calls.append("torch.nonzero"),
                                                               original_nonzero(*a, **k))[1])

    def _counted(self, name, original):
        def method(tensor, *args, **kwargs):
            self.calls.append(name)
            return original(tensor, *args, **kwargs)
        return method


def _count_reads(monkeypatch, venv, steps: int, rng) -> list[list[str]]:
    """The reads of each of `steps` steps with random legal actions (steps where no row ends)."""
    per_step = []
    for _ in range(steps):
        masks = venv.action_masks()
        masks = masks.cpu().numpy() if isinstance(masks, torch.Tensor) else masks
        actions = np.array([rng.choice(np.flatnonzero(m)) for m in masks])
        if isinstance(venv.action_masks(), torch.Tensor):
            actions = torch.from_numpy(actions)
        with monkeypatch.context() as patch:
            counter = _ReadCounter(patch)
            _, _, terminated, truncated, _ = venv.step(actions)
        if not (terminated | truncated).any():
            per_step.append(counter.calls)
    return per_step


@pytest.mark.parametrize("env_id, kwargs", [
    ("llm_envs/TokenAccept-v0", {"p_t": 0.001}),
    ("llm_envs/TokenAccept-v0", {"p_t": 0.001, "obs_mode": "prefix"}),
    ("llm_envs/TokenAccept-v0", {"p_t": 0.01, "decision_mask": "entropy", "entropy_threshold": 1.0}),
    ("llm_envs/TokenChoice-v0", {"k": 4, "top_p": 0.9}),
])
def test_a_step_copies_to_the_host_once(monkeypatch, world_kwargs, env_id, kwargs):
    monkeypatch.setattr(pools_module, "SYNC_FREE_ON_CPU", True)
    venv = make_vector_env(env_id, 4, max_new_tokens=48, **kwargs, **world_kwargs)
    venv.reset(seed=1)
    per_step = _count_reads(monkeypatch, venv, 8, np.random.default_rng(0))
    assert len(per_step) >= 6
    for calls in per_step:
        assert calls == ["cpu"] * HOST_COPIES_PER_STEP, calls  # the one copy (`pack_rows`), nothing else


def test_the_counter_sees_a_read(monkeypatch):
    with monkeypatch.context() as patch:
        counter = _ReadCounter(patch)
        bool(torch.ones(1).sum() > 0)
        torch.zeros(3).tolist()
    assert counter.calls == ["__bool__", "tolist"]


def test_a_torch_face_step_reads_the_actions_and_copies_once(monkeypatch, world_kwargs):
    """The torch face: the actions' copy in, the step's copy out."""
    monkeypatch.setattr(pools_module, "SYNC_FREE_ON_CPU", True)
    venv = make_torch_vector_env("llm_envs/TokenAccept-v0", 4, max_new_tokens=48, p_t=0.001, **world_kwargs)
    venv.reset(seed=2)
    per_step = _count_reads(monkeypatch, venv, 6, np.random.default_rng(1))
    assert len(per_step) >= 4
    for calls in per_step:
        assert len(calls) <= HOST_COPIES_PER_STEP + 1, calls


def test_a_non_finite_forward_raises_naming_the_rows_and_asks_for_a_reset(test_world):
    """NaN logits found in the step's copy raise `NonFiniteLogitsError` with the rows; the cache was
    already written, so every row then needs reset() (said in the error and enforced)."""
    from llm_envs.engine import NonFiniteLogitsError
    from llm_envs.models import load_causal_lm, load_tokenizer

    model = load_causal_lm(test_world.lm_dir, device="cpu")  # our own copy: its weights get poisoned
    venv = make_vector_env("llm_envs/TokenAccept-v0", 3, lm=model, tokenizer=load_tokenizer(test_world.lm_dir),
                           reward=test_world.rm_dir, prompts=test_world.train_prompts[:50], device="cpu",
                           max_new_tokens=16)
    venv.reset(seed=0)
    with torch.no_grad():
        model.get_output_embeddings().weight[:, 0] = float("nan")
    with pytest.raises(NonFiniteLogitsError, match=r"env rows \[0, 1, 2\].*bfloat16") as caught:
        venv.step(np.zeros(3, dtype=np.int64))
    assert caught.value.rows == [0, 1, 2]
    assert any("needs reset()" in note for note in caught.value.__notes__)
    with pytest.raises(RuntimeError, match="call reset"):
        venv.step(np.zeros(3, dtype=np.int64))
