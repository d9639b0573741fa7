"""Ray env workers (`llm_envs.vector.ray_env`, `ray_sb3`): a local Ray cluster, 2 actors x 2 rows.

Row i of the Ray env follows row i of a local 4-row env with the same seed; the masks come back
batched; MaskablePPO trains through it (`agents.proxy.train` with `num_workers=2`); a killed actor
or a silent one raises an error naming it, instead of hanging.

Actors cost seconds to start (each imports torch and loads the LM), so one cluster serves the module
and each env's actors serve several tests; a test that breaks an env (a kill, a timeout) is the
last of its env's tests.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest
import torch

ray = pytest.importorskip("ray")

from llm_envs.vector import make_ray_sb3_vec_env, make_ray_vector_env, make_sb3_vec_env, make_vector_env  # noqa: E402
from llm_envs.vector.ray_env import RayTorchVectorEnv  # noqa: E402
from llm_envs.vector.ray_workers import RayWorkerError, concat_vector_infos, default_gpus_per_actor  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ACCEPT, CHOICE = "llm_envs/TokenAccept-v0", "llm_envs/TokenChoice-v0"
TIMEOUT_S = 60.0  # every Ray env here: a hung worker fails the test instead of hanging it


@pytest.fixture(scope="module")
def ray_cluster():
    # Two CPUs: Ray starts one idle worker process per CPU at once, each a few seconds of CPU here. The
    # envs below reserve half a CPU per actor, so that both can be up at once (module fixtures outlive their
    # tests when a subset runs); train()'s actors take one each, so its test comes first.
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def world_kwargs(test_world):
    return dict(lm=test_world.lm_dir, reward=test_world.rm_dir, prompts=test_world.train_prompts[:200],
                gold=test_world.gold, device="cpu")


# ----------------------------------------------------------------------------- training (first: its actors take
# both of the cluster's CPUs)


def test_maskable_ppo_trains_through_the_ray_env(ray_cluster, test_world, tmp_path):
    """`agents.proxy.train` with num_workers=2: the Task is resolved inside each actor, MaskablePPO runs
    a few hundred steps, episodes end, the policy moves, and the actors are gone afterwards (the Ray
    cluster, which the caller started, stays up)."""
    from sb3_contrib import MaskablePPO

    from agents.configs import ProxyConfig, TrainConfig
    from agents.proxy import train
    from llm_envs.envs.params import TokenAcceptParams
    from llm_envs.task import Task

    task = Task(lm=str(test_world.lm_dir), reward=str(test_world.rm_dir), eval_prompts=test_world.test_prompts[:4],
                train_prompts=test_world.train_prompts[:100], max_new_tokens=8, device="cpu")
    proxy = ProxyConfig(hidden_sizes=(16,), n_steps=64, batch_size=64, n_epochs=2, learning_rate=1e-3)
    cfg = TrainConfig(env=TokenAcceptParams(max_new_tokens=8, p_t=0.001), proxy=proxy, num_envs=4, num_workers=2,
                      total_timesteps=256, checkpoint_freq=16, eval_episodes=4, output_dir=str(tmp_path / "run"),
                      wandb_mode="disabled", progress_bar=False, torch_threads=1)
    free_cpus = ray.available_resources().get("CPU", 0)
    model = MaskablePPO.load(train(cfg, task), device="cpu")
    assert model.num_timesteps >= 256
    progress = (tmp_path / "run" / "logs" / "progress.csv").read_text()
    assert "rollout/reward_model" in progress  # episodes ended during the rollout
    # The checkpoint at 64 steps holds the initial policy (the first update comes after 4 x 64 steps).
    initial = MaskablePPO.load(tmp_path / "run" / "checkpoints" / "proxy_64_steps.zip", device="cpu")
    before = initial.policy.state_dict()
    assert any(not torch.equal(before[k], v) for k, v in model.policy.state_dict().items())
    deadline = time.perf_counter() + 10  # train() closed its env: its actors' CPUs come back
    while ray.available_resources().get("CPU", 0) < free_cpus and time.perf_counter() < deadline:
        time.sleep(0.1)
    assert ray.available_resources().get("CPU", 0) == free_cpus and ray.is_initialized()  # the test's Ray stays up


# ----------------------------------------------------------------------------- the Gymnasium and torch faces


def ray_and_local(make_ray: Any, make_local: Any, env_id: str, **kwargs: Any) -> Any:
    """(a Ray env of 2 actors x 2 rows, the local env of 4 rows) with the same keywords; closes the Ray one."""
    remote = make_ray(env_id, 4, num_workers=2, num_cpus=0.5, torch_threads=1, timeout_s=TIMEOUT_S, **kwargs)
    yield remote, make_local(env_id, 4, **kwargs)
    remote.close()


@pytest.fixture(scope="module")
def accept_envs(ray_cluster, world_kwargs):
    """(Ray env, local env) of TokenAccept; the kill test ends the Ray one."""
    yield from ray_and_local(make_ray_vector_env, make_vector_env, ACCEPT, max_new_tokens=6, p_t=0.001, **world_kwargs)


def assert_close(got: Any, want: Any, where: str = "") -> None:
    """Equal values, floats within 1e-5 (a batch of 2 rows and one of 4 round the models' matmuls
    differently; every int, bool, string and token id is exact); dicts, lists and arrays recursively,
    dtypes and shapes included."""
    if isinstance(want, Mapping):
        assert isinstance(got, Mapping) and set(got) == set(want), (where, set(got) ^ set(want))
        for key in want:
            assert_close(got[key], want[key], f"{where}.{key}")
    elif isinstance(want, np.ndarray) and want.dtype != object:
        assert isinstance(got, np.ndarray) and got.dtype == want.dtype and got.shape == want.shape, where
        if want.dtype.kind == "f":
            np.testing.assert_allclose(got, want, atol=1e-5, err_msg=where)
        else:
            assert np.array_equal(got, want), where
    elif isinstance(want, (np.ndarray, list, tuple)):
        assert type(got) is type(want) and len(got) == len(want), where
        for i, (a, b) in enumerate(zip(got, want)):
            assert_close(a, b, f"{where}[{i}]")
    elif isinstance(want, (float, np.floating)):
        assert type(got) is type(want) and got == pytest.approx(want, abs=1e-5), where
    else:
        assert type(got) is type(want) and got == want, where


def test_gymnasium_rows_equal_the_local_rows_with_the_same_seed(accept_envs):
    remote, local = accept_envs
    # This is the first test on these actors: stepping before reset is refused.
    with pytest.raises(RuntimeError, match=r"before reset\(\); call reset\(\) first"):
        remote.step(np.zeros(4, dtype=int))
    assert remote.observation_space == local.observation_space and remote.action_space == local.action_space
    assert remote.params == local.params and remote.autoreset_mode == local.autoreset_mode
    obs, infos = remote.reset(seed=3)
    want_obs, want_infos = local.reset(seed=3)
    assert_close(obs, want_obs)
    assert_close(infos, want_infos)
    rng = np.random.default_rng(0)
    ended = 0
    for _ in range(15):
        masks = local.action_masks()
        assert np.array_equal(remote.action_masks(), masks)  # batched [4, 2], answered without a round trip
        actions = np.array([rng.choice(np.flatnonzero(m)) for m in masks])
        got, want = remote.step(actions), local.step(actions)
        assert_close(got, want)  # obs, rewards, terminated, truncated, infos (ended rows' included)
        ended += int((want[2] | want[3]).sum())
    assert ended >= 3  # episodes ended (NEXT_STEP autoresets on both sides), rows of both workers among them


def test_same_step_autoreset_rows_equal_the_local_rows(ray_cluster, world_kwargs):
    """SAME_STEP on the Gymnasium face: a row that ends starts over within the step, its last observation and
    infos in `final_obs` / `final_info`, joined over the workers as the local env lays them out."""
    from gymnasium.vector import AutoresetMode

    kwargs = dict(max_new_tokens=4, p_t=0.001, autoreset_mode=AutoresetMode.SAME_STEP, **world_kwargs)
    # num_cpus=0: the module's other Ray envs may still hold the cluster's two CPUs.
    remote = make_ray_vector_env(ACCEPT, 4, num_workers=2, num_cpus=0, torch_threads=1, timeout_s=TIMEOUT_S, **kwargs)
    try:
        local = make_vector_env(ACCEPT, 4, **kwargs)
        assert_close(remote.reset(seed=5), local.reset(seed=5))
        rng = np.random.default_rng(1)
        ended_rows: set[int] = set()
        for _ in range(12):
            masks = local.action_masks()
            assert np.array_equal(remote.action_masks(), masks)
            actions = np.array([rng.choice(np.flatnonzero(m)) for m in masks])
            got, want = remote.step(actions), local.step(actions)
            assert_close(got, want)  # final_obs / final_info of the rows that ended included
            done = np.flatnonzero(want[2] | want[3])
            assert not done.size or want[4]["_final_obs"][done].all()
            ended_rows.update(done.tolist())
        assert ended_rows & {0, 1} and ended_rows & {2, 3}  # rows of both workers ended and restarted
    finally:
        remote.close()


def test_the_torch_face_gives_tensors_on_the_requested_device_equal_to_the_numpy_face(accept_envs):
    remote, local = accept_envs
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        face = RayTorchVectorEnv(remote, tensor_device=device)
        obs, _ = face.reset(seed=8)
        want_obs, _ = local.reset(seed=8)
        assert isinstance(obs, torch.Tensor) and obs.device.type == device and obs.dtype == torch.float32
        np.testing.assert_allclose(obs.cpu().numpy(), want_obs, atol=1e-5)
        for _ in range(6):
            masks = face.action_masks()
            assert masks.dtype == torch.bool and masks.device.type == device
            assert np.array_equal(masks.cpu().numpy(), local.action_masks())
            actions = torch.ones(4, dtype=torch.int64, device=device) & masks[:, 1].long()  # reject where legal
            obs, rewards, terminated, truncated, _ = face.step(actions)
            want = local.step(actions.cpu().numpy())
            np.testing.assert_allclose(obs.cpu().numpy(), want[0], atol=1e-5)
            assert rewards.dtype == torch.float32 and torch.equal(rewards.cpu(), torch.from_numpy(want[1]).float())
            assert torch.equal(terminated.cpu(), torch.from_numpy(want[2]))
            assert torch.equal(truncated.cpu(), torch.from_numpy(want[3]))


def test_bad_inputs_fail_clearly_and_a_step_that_raises_changes_nothing(accept_envs, world_kwargs):
    remote, local = accept_envs
    with pytest.raises(ValueError, match=r"num_envs=5 is not divisible by num_workers=2.*num_envs=4 or 6"):
        make_ray_vector_env(ACCEPT, 5, num_workers=2, **world_kwargs)
    with pytest.raises(ValueError, match=r"num_workers=0; expected a positive int"):
        make_ray_vector_env(ACCEPT, 4, num_workers=0, **world_kwargs)
    with pytest.raises(ValueError, match=r"need 3 CPUs, but the Ray cluster has 2"):
        make_ray_vector_env(ACCEPT, 6, num_workers=3, **world_kwargs)
    remote.reset(seed=5)
    local.reset(seed=5)
    with pytest.raises(ValueError, match=r"shape \(2, 2\); expected shape \(4,\)"):
        remote.step(np.zeros((2, 2), dtype=int))
    with pytest.raises(ValueError, match=r"env 1: action \S*7\)? is outside the action space") as error:
        remote.step(np.array([0, 0, 0, 7]))  # env 3 is worker 1's env 1
    assert "Ray env worker 1 (envs 2..3)" in "\n".join(getattr(error.value, "__notes__", []))
    with pytest.raises(ValueError, match=r"not an integer"):
        remote.step(np.array([0.0, 1.0, 0.0, 0.0]))
    actions = np.zeros(4, dtype=int)  # the refused steps moved no row: both envs still step alike
    np.testing.assert_allclose(remote.step(actions)[0], local.step(actions)[0], atol=1e-5)


def test_a_killed_actor_raises_an_error_naming_the_worker_instead_of_hanging(accept_envs):
    remote, _ = accept_envs  # the last test on these actors
    remote.reset(seed=0)
    ray.kill(remote.workers.workers[1])
    started = time.perf_counter()
    died = r"Ray env worker 1 \(envs 2\.\.3\) failed \(.*(ActorDied|RayActorError)"
    with pytest.raises(RayWorkerError, match=died) as error:
        while time.perf_counter() - started < 20:  # ray.kill is asynchronous: a step may still go through
            remote.step(np.zeros(4, dtype=int))
    assert error.value.workers == [1] and time.perf_counter() - started < 20
    with pytest.raises(RuntimeError, match=r"stopped after a worker failure .*worker 1"):
        remote.step(np.zeros(4, dtype=int))
    remote.close()
    with pytest.raises(RuntimeError, match=r"this Ray env is closed"):
        remote.reset()


# ----------------------------------------------------------------------------- the SB3 face


@pytest.fixture(scope="module")
def choice_envs(ray_cluster, world_kwargs):
    """(Ray SB3 env, local SB3 env) of TokenChoice; the timeout test ends the Ray one."""
    yield from ray_and_local(make_ray_sb3_vec_env, make_sb3_vec_env, CHOICE, max_new_tokens=4, k=3, **world_kwargs)


def test_sb3_rows_equal_the_local_rows_with_batched_masks(choice_envs):
    from sb3_contrib.common.maskable.utils import get_action_masks, is_masking_supported

    remote, local = choice_envs
    remote.seed(11)
    local.seed(11)
    assert_close(remote.reset(), local.reset())
    assert_close(remote.reset_infos, local.reset_infos)
    assert is_masking_supported(remote)
    rng = np.random.default_rng(1)
    ended = 0
    for _ in range(12):
        masks = remote.env_method("action_masks")
        assert isinstance(masks, np.ndarray) and masks.shape == (4, 3)  # one array, as MaskablePPO reads it
        assert np.array_equal(get_action_masks(remote), local.action_masks())
        actions = np.array([rng.choice(np.flatnonzero(m)) for m in masks])
        got, want = remote.step(actions), local.step(actions)
        assert_close(got, want)  # obs, rewards (float32), dones, infos (terminal_observation included)
        ended += int(want[2].sum())
    assert ended >= 4
    assert_close(remote.reset_infos, local.reset_infos)  # the new episodes' reset infos too
    assert_close(remote.candidate_ids(), local.candidate_ids())  # row methods: [4, k] from both workers
    assert_close(remote.env_method("candidate_ids", indices=[3, 0]), local.env_method("candidate_ids", indices=[3, 0]))
    assert remote.get_attr("params", indices=[1, 2]) == [local.params] * 2
    assert remote.get_attr("max_new_tokens", indices=[2]) == [4]
    with pytest.raises(AttributeError):
        remote.get_attr("no_such_attribute")


def test_a_worker_that_does_not_answer_in_time_raises_naming_it(choice_envs):
    remote, _ = choice_envs  # the last test on these actors
    remote.reset()
    remote.workers.timeout_s = 1e-4  # no step answers this fast: as if both workers hung
    late = r"Ray env worker \d \(envs \d\.\.\d\).* did not answer within timeout_s=0.0001"
    with pytest.raises(RayWorkerError, match=late):
        remote.step(np.zeros(4, dtype=int))
    with pytest.raises(RuntimeError, match=r"stopped after a worker failure"):
        remote.reset()
    remote.close()


def test_without_ray_the_error_names_the_extra(monkeypatch, world_kwargs):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails, as where it is not installed
    with pytest.raises(ImportError, match=r"pip install 'llm-envs\[ray\]'"):
        make_ray_vector_env(ACCEPT, 4, num_workers=2, **world_kwargs)


def test_concat_vector_infos_fills_keys_a_worker_lacks():
    parts = [{"a": np.array([1, 2]), "_a": np.array([True, True]),
              "final_info": {"x": np.array([None, "s"], dtype=object), "_x": np.array([False, True])}},
             {"b": np.array([0.5, 0.0]), "_b": np.array([True, False])}]
    merged = concat_vector_infos(parts, [2, 2])
    assert merged["a"].tolist() == [1, 2, 0, 0] and merged["_a"].tolist() == [True, True, False, False]
    assert merged["b"].tolist() == [0, 0, 0.5, 0] and merged["_b"].tolist() == [False, False, True, False]
    assert merged["final_info"]["x"].tolist() == [None, "s", None, None]
    assert merged["final_info"]["_x"].tolist() == [False, True, False, False]


@pytest.mark.parametrize("workers, gpus, each", [(2, 0, 0.0), (2, 2, 1.0), (2, 8, 1.0), (2, 1, 0.5), (3, 2, 0.5),
                                                  (4, 3, 0.5), (5, 2, 1 / 3)])
def test_by_default_each_actor_gets_a_gpu_or_an_equal_share_that_fits_on_one(workers, gpus, each):
    assert default_gpus_per_actor(workers, gpus) == pytest.approx(each)
    if gpus:  # the shares fit the cluster's whole GPUs: no actor waits forever for a place
        assert int(1 / each + 1e-9) * gpus >= workers


@pytest.mark.slow
def test_the_ray_overhead_benchmark_runs_quick(test_world, world_cache, tmp_path):
    """`python -m benchmarks.ray_overhead --quick` (its own Ray cluster, in another process) does not rot."""
    import json
    import os
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.ray_overhead", "--quick", "--json", "--world", "test",
         "--cache-dir", str(world_cache)], cwd=tmp_path, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert [(r["model"], r["num_envs"]) for r in report["rows"]] == [("world", 4), ("gpt2-tiny", 4)]
    for row in report["rows"]:
        assert all(row[f"{key}_ms"] > 0 for key in ("local", "ray_1x", "ray_2x"))
        assert row["overhead_ms"] == pytest.approx(row["ray_1x_ms"] - row["local_ms"])
