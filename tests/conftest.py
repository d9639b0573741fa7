"""Shared fixtures. The test-suite never touches the user's cache or the network."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Nothing in the tests may reach a hub; wandb stays off.
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("WANDB_MODE", "disabled")


@pytest.fixture(scope="session")
def world_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache root private to this test session (the user's ~/.cache is never written)."""
    return tmp_path_factory.mktemp("llm_envs_cache")


@pytest.fixture(scope="session")
def test_world(world_cache: Path):
    """The 'test' preset of the embedded world (same grammar, small models; ~30 s to build)."""
    from llm_envs.world import load_world

    return load_world("test", seed=0, cache_dir=world_cache, progress=False)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run far faster on one thread (thread hand-offs cost more than they save,
    ~50x on a shared 2-core box); modules opt in with `pytestmark`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(params=["HF_HUB_OFFLINE=1", "no network"])
def hub_unreachable(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """The hub cannot be reached: either declared offline, or (this machine) no network at all."""
    from llm_envs import models

    if request.param == "HF_HUB_OFFLINE=1":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        if models._hub_endpoint_reachable(timeout_s=2.0):
            pytest.skip("the hub is reachable from this machine; the offline failure cannot be exercised")
