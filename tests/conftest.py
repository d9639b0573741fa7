"""Shared fixtures. The test-suite never touches the user's cache or the network."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# Nothing in the tests may reach a hub; wandb stays off.
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("WANDB_MODE", "disabled")


XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER")  # "gw0", "gw1", ... under `pytest -n N`; None otherwise
SHARED_CACHE = "llm_envs_cache"  # under pytest-xdist: the workers' cache root, in the run's common temp root


@pytest.fixture(scope="session")
def world_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache root private to this test run (the user's ~/.cache is never written).

    Under pytest-xdist the workers share one (in the run's common temp root): the test world and
    SmolLM2's dequantised copy are then built once, the other workers waiting on the build's file
    lock (`build_world`, `dequantize_gguf`) instead of building their own. A developer iterating
    on a few tests may set LLM_ENVS_TEST_CACHE to a directory of their own to keep the test world
    between runs (CI never sets it)."""
    if os.environ.get("LLM_ENVS_TEST_CACHE"):
        kept = Path(os.environ["LLM_ENVS_TEST_CACHE"])
        kept.mkdir(parents=True, exist_ok=True)
        return kept
    if XDIST_WORKER is None:
        return tmp_path_factory.mktemp("llm_envs_cache")
    shared = tmp_path_factory.getbasetemp().parent / SHARED_CACHE
    shared.mkdir(exist_ok=True)
    return shared


# ---------------------------------------------------------------------------------------------------
# Under pytest-xdist the test world is built while the workers run the tests that do not need it.
#
# Why: the build is single-threaded (~40 s here, twice that on a slower machine) and every other
# worker that reaches a world test waits on its lock, so one core idled through the build. Now the
# controller (which runs no tests) starts the build in a process of its own at session start, and
# the modules that need no world run first. A worker that reaches a world test before the build
# ends waits on the same lock (`build_world`); if the early build failed, that worker builds it.


def _needs_world(item: pytest.Item) -> bool:
    return "test_world" in getattr(item, "fixturenames", ())


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    """Modules with no test that needs the test world first (whole modules, so module-scoped fixtures are
    set up once; order inside a module and among each group kept). Every xdist worker sorts alike."""
    modules: dict[str, bool] = {}
    for item in items:
        modules[item.nodeid.split("::")[0]] = modules.get(item.nodeid.split("::")[0], False) or _needs_world(item)
    items.sort(key=lambda item: modules[item.nodeid.split("::")[0]])  # stable: False (world-free) first


def pytest_sessionstart(session: pytest.Session) -> None:
    config = session.config
    is_controller = getattr(config.option, "numprocesses", None) and not hasattr(config, "workerinput")
    if not is_controller or os.environ.get("LLM_ENVS_TEST_CACHE"):
        return
    shared = config._tmp_path_factory.getbasetemp() / SHARED_CACHE  # the workers' basetemps are under it
    shared.mkdir(exist_ok=True)
    config._early_world_build = BackgroundBuild(shared, shared.parent / "early_world_build.log")


def pytest_sessionfinish(session: pytest.Session) -> None:
    build = getattr(session.config, "_early_world_build", None)
    if build is not None:
        build.stop()


REBUILD_TEST = "test_a_rebuild_of_the_test_world_is_byte_identical"  # in tests/test_world.py


class BackgroundBuild:
    """`llm-envs world build --preset test` into a fresh cache, in a separate process.

    Why a process started beside the session's own build: a world build is single-threaded
    (its spec pins one torch thread), so on a 2-core machine the second build runs on the core
    the first leaves idle and the reproducibility check costs little wall time; and another
    process is the stronger check (fresh interpreter, fresh hash seed, another default thread
    count: OMP_NUM_THREADS=3, which the build must override).
    """

    def __init__(self, cache_dir: Path, log: Path) -> None:
        root = Path(__file__).resolve().parents[1]
        env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "3", "PYTHONHASHSEED": "random"}
        self.cache_dir, self.log = cache_dir, log
        self._log_file = open(log, "w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.cli", "world", "build", "--preset", "test", "--seed", "0",
             "--cache-dir", str(cache_dir), "--json", "--no-progress"],
            cwd=root, env=env, stdout=subprocess.PIPE, stderr=self._log_file, text=True)

    def result(self, timeout_s: float = 900) -> dict:
        """The build's `--json` summary, once it is done; its stderr if it failed."""
        out, _ = self.process.communicate(timeout=timeout_s)
        self._log_file.close()
        if self.process.returncode != 0:
            raise AssertionError(f"the background world build failed (exit {self.process.returncode}):\n"
                                 + self.log.read_text()[-3000:])
        return json.loads(out)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._log_file.close()


@pytest.fixture(scope="session")
def _background_rebuild(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """Holds the background rebuild (started by `test_world` when the rebuild test will run)."""
    holder: dict[str, BackgroundBuild] = {}
    yield holder
    if "build" in holder:
        holder["build"].stop()


@pytest.fixture(scope="session")
def test_world(world_cache: Path, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
               _background_rebuild: dict):
    """The 'test' preset of the embedded world (same grammar, small models; about a minute to build).

    When the session will run the rebuild check, a second build of the same preset starts in
    another process first, so that the two builds overlap (see `BackgroundBuild`). Not under
    pytest-xdist: every worker lists every test, and the other workers already use the second core."""
    from llm_envs.world import load_world

    if XDIST_WORKER is None and any(item.name == REBUILD_TEST for item in request.session.items):
        rebuild_dir = tmp_path_factory.mktemp("world_rebuild")
        _background_rebuild["build"] = BackgroundBuild(rebuild_dir / "cache", rebuild_dir / "build.log")
    return load_world("test", seed=0, cache_dir=world_cache, progress=False)


@pytest.fixture(scope="session")
def test_world_rebuild(test_world, _background_rebuild: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The `--json` summary of a second, independent build of the test world (in a fresh cache)."""
    if "build" not in _background_rebuild:  # the session world was made before the check was selected
        rebuild_dir = tmp_path_factory.mktemp("world_rebuild")
        _background_rebuild["build"] = BackgroundBuild(rebuild_dir / "cache", rebuild_dir / "build.log")
    return _background_rebuild["build"].result()


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
