"""Ray env workers: K actors, each holding one local vector face (one batched core of N rows on its
own device), and the driver-side client every Ray face shares.

Why actors that hold a whole local face (`LMVectorEnv` or `LMSb3VecEnv`) rather than a core: the
faces already own seeding, autoreset and the info layouts, so a worker is the local env, and row j of
worker k is row k*N + j of a local env of K*N rows with the same seed (its seed is seed + k*N, and the
local face seeds its rows seed + k*N + j). The driver only splits actions, concatenates results and
turns Ray's failures into errors that name the worker.

One round trip per step: `WorkerGroup.submit` sends every worker its slice of the actions, `gather`
waits on all the futures in one `ray.get`; each worker's result carries its next action masks, so a
face's `action_masks()` is answered on the driver.

Ray is optional (`pip install 'llm-envs[ray]'`) and imported only when a Ray env is built.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

Face = Literal["gymnasium", "sb3"]
KwargsFactory = Callable[[], Mapping[str, Any]]
INSTALL_HINT = "pip install 'llm-envs[ray]'"
START_TIMEOUT_S = 120.0  # placing and starting an actor process (its imports included), before its env is built


def require_ray() -> Any:
    """The `ray` module, or an ImportError that names the extra to install."""
    try:
        import ray
    except ImportError as error:
        raise ImportError(f"The Ray env workers need Ray, which is not installed: {INSTALL_HINT}.") from error
    return ray


def ensure_ray(min_cpus: int = 1) -> bool:
    """Connect to Ray: the cluster this process already joined (`ray.init(...)`), else a running one
    (`RAY_ADDRESS`, or one started on this machine by `ray start`), else a new local cluster (this
    machine's CPUs, at least `min_cpus` of them since Ray's CPUs are only a scheduling count, and its
    GPUs; no dashboard). Returns whether it connected here (the caller then disconnects when done)."""
    ray = require_ray()
    if ray.is_initialized():
        return False
    try:  # a running cluster takes no resource arguments (ray.init refuses num_cpus when joining one)
        ray.init(address="auto", log_to_driver=True)
    except ConnectionError:  # none running: start one on this machine
        ray.init(num_cpus=max(os.cpu_count() or 1, min_cpus), include_dashboard=False, log_to_driver=True)
    return True


@contextlib.contextmanager
def ray_session(min_cpus: int = 1) -> Iterator[None]:
    """Ray for the duration of a block (`ensure_ray`: a running cluster joined, or a local one started),
    disconnected at the end (a local cluster started here stops with it; a `ray start` cluster stays
    up); a Ray this process had joined before stays connected."""
    started = ensure_ray(min_cpus)
    try:
        yield
    finally:
        if started:
            require_ray().shutdown()


class RayWorkerError(RuntimeError):
    """A Ray env worker died or did not answer in time; `workers` are their indices. The env is
    unusable afterwards (`close()` it and build a new one)."""

    def __init__(self, message: str, workers: Sequence[int]) -> None:
        super().__init__(message)
        self.workers = list(workers)


@dataclass(frozen=True)
class WorkerInfo:
    """What a worker reports once its env is built (identical spaces and params on every worker)."""

    observation_space: Any
    action_space: Any
    params: Any
    device: str
    pid: int
    node: str


class EnvWorker:
    """The actor: one local vector face over `num_envs` rows, built by `build()` (not in `__init__`, so
    a bad keyword comes back as the env's own exception, not as a dead actor).

    `kwargs_factory()` (picklable, zero arguments) gives env keywords built inside the actor, e.g. a
    task resolved there (`llm_envs.task.TaskEnvKwargs`), so each actor loads the LM on its own device;
    `kwargs` (pickled from the driver) override them."""

    def __init__(self, face: Face, env_id: str, num_envs: int, kwargs_factory: KwargsFactory | None,
                 kwargs: Mapping[str, Any], torch_threads: int | None) -> None:
        self.face, self.env_id, self.num_envs = face, env_id, num_envs
        self.kwargs_factory, self.kwargs, self.torch_threads = kwargs_factory, dict(kwargs), torch_threads
        self.env: Any = None

    def build(self) -> WorkerInfo:
        import torch

        import llm_envs  # noqa: F401  (registers the env ids in this process)

        if self.torch_threads:
            torch.set_num_threads(self.torch_threads)
        kwargs = {**(dict(self.kwargs_factory()) if self.kwargs_factory is not None else {}), **self.kwargs}
        if self.face == "sb3":
            from llm_envs.vector.sb3 import make_sb3_vec_env

            self.env = make_sb3_vec_env(self.env_id, self.num_envs, **kwargs)
        else:
            from llm_envs.vector.vector_env import make_vector_env

            self.env = make_vector_env(self.env_id, self.num_envs, **kwargs)
        core = self.env.core
        return WorkerInfo(core.observation_space, core.action_space, core.params, str(core.device), os.getpid(),
                          _node_ip())

    def reset(self, seed: int | None, options: dict[str, Any] | None) -> tuple[np.ndarray, Any, np.ndarray]:
        """Gymnasium face: (obs, infos in the vector layout, masks)."""
        obs, infos = self.env.reset(seed=seed, options=options)
        return obs, infos, self.env.action_masks()

    def reset_sb3(self, seeds: list[int | None], options: list[dict[str, Any]]) -> tuple[np.ndarray, list, np.ndarray]:
        """SB3 face: the driver's per-row seeds and options for these rows (as SubprocVecEnv hands each
        process its own), then (obs, reset_infos, masks)."""
        self.env._seeds = list(seeds)  # SB3's pending seeds, read by the next reset()
        self.env.set_options(list(options))
        obs = self.env.reset()
        return obs, self.env.reset_infos, self.env.action_masks()

    def step(self, actions: np.ndarray) -> tuple[Any, ...]:
        """The face's step result, then its next masks; the SB3 face adds the new episodes' reset infos
        ({row: info} of the rows that ended)."""
        result = self.env.step(actions)
        if self.face == "sb3":
            dones = result[2]
            return (*result, self.env.action_masks(), {int(r): self.env.reset_infos[r] for r in np.flatnonzero(dones)})
        return (*result, self.env.action_masks())

    def check_actions(self, actions: np.ndarray) -> None:
        """Raise what `step(actions)` would raise on them, changing nothing."""
        self.env.check_actions(actions)

    def call(self, name: str, args: tuple, kwargs: dict[str, Any]) -> Any:
        """A method of the local face (row methods: [N, ...] over this worker's rows)."""
        return getattr(self.env, name)(*args, **kwargs)

    def get_attr(self, name: str, indices: list[int]) -> list[Any]:
        return self.env.get_attr(name, indices)

    def set_attr(self, name: str, value: Any) -> None:
        self.env.set_attr(name, value)

    def env_method(self, name: str, args: tuple, kwargs: dict[str, Any], indices: list[int]) -> list[Any]:
        return list(self.env.env_method(name, *args, indices=indices, **kwargs))


def _node_ip() -> str:
    try:
        return require_ray().util.get_node_ip_address()
    except Exception:  # only informative
        return "?"


def default_gpus_per_actor(num_workers: int, cluster_gpus: float) -> float:
    """A GPU per actor when the cluster has one per worker; else equal shares packed onto whole GPUs (an
    actor cannot span two): 1 / ceil(K / GPUs), e.g. 3 workers on 2 GPUs take half a GPU each; none
    without GPUs."""
    return 1.0 / math.ceil(num_workers / int(cluster_gpus)) if cluster_gpus >= 1 else 0.0


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name}={value!r}; expected a positive int.")
    return int(value)


class WorkerGroup:
    """The driver's side of K env workers: starts them (each with `num_envs / K` rows), sends one call
    to all of them and gathers the answers in one `ray.get`, and turns a dead or silent worker into a
    `RayWorkerError` that names it (after which every call is refused: the rows can no longer move
    together).

    `num_gpus=None` gives each actor one GPU when the cluster has one per worker, an equal share of one
    when it has fewer (1 / ceil(K / GPUs): 2 workers on 1 GPU take half each), and none on a cluster
    without GPUs; `num_cpus` is the CPUs each actor
    reserves; `torch_threads` sets torch's threads in each actor (None: Ray's default, OMP_NUM_THREADS
    = its CPUs). `timeout_s` bounds every reset and step (None: wait as long as the step takes; a dead
    actor is reported at once either way); `start_timeout_s` bounds the wait for the actors to be placed
    and started (not the loading of their models)."""

    def __init__(self, face: Face, env_id: str, num_envs: int, num_workers: int, *,
                 kwargs_factory: KwargsFactory | None = None, kwargs: Mapping[str, Any] | None = None,
                 num_cpus: float = 1, num_gpus: float | None = None, torch_threads: int | None = None,
                 timeout_s: float | None = None, start_timeout_s: float = START_TIMEOUT_S) -> None:
        num_envs, num_workers = _positive_int("num_envs", num_envs), _positive_int("num_workers", num_workers)
        if num_envs % num_workers:
            per = num_envs // num_workers
            fixes = sorted({n for n in (per * num_workers, (per + 1) * num_workers) if n > 0})
            raise ValueError(
                f"num_envs={num_envs} is not divisible by num_workers={num_workers}: every Ray worker holds "
                f"num_envs / num_workers rows. Use num_envs={' or '.join(map(str, fixes))}, or a num_workers "
                f"that divides {num_envs}.")
        if kwargs_factory is not None and not callable(kwargs_factory):
            raise TypeError(f"kwargs_factory={kwargs_factory!r} is not callable; expected a picklable zero-argument "
                            "callable returning env keywords (e.g. llm_envs.task.TaskEnvKwargs(task)).")
        if timeout_s is not None and not timeout_s > 0:
            raise ValueError(f"timeout_s={timeout_s!r}; expected a positive number of seconds, or None for no limit.")
        if not start_timeout_s > 0:
            raise ValueError(f"start_timeout_s={start_timeout_s!r}; expected a positive number of seconds.")
        if torch_threads is not None:
            _positive_int("torch_threads", torch_threads)
        self.ray = require_ray()
        ensure_ray(min_cpus=int(np.ceil(num_cpus * num_workers)))
        self.num_envs, self.num_workers = num_envs, num_workers
        self.rows_per_worker = num_envs // num_workers
        self.timeout_s = timeout_s
        self.num_gpus = self._gpus_per_actor(num_gpus, num_cpus)
        self._broken: str | None = None  # why a worker failure stopped the group
        self._closed = False
        remote = self.ray.remote(EnvWorker).options(num_cpus=num_cpus, num_gpus=self.num_gpus)
        self.workers = [remote.remote(face, env_id, self.rows_per_worker, kwargs_factory, dict(kwargs or {}),
                                      torch_threads) for _ in range(num_workers)]
        try:
            self._wait_started(num_cpus, start_timeout_s)
            self.infos: list[WorkerInfo] = self.gather(self.submit("build"), timeout_s=None)
        except BaseException:
            self.close()
            raise

    def _wait_started(self, num_cpus: float, timeout_s: float) -> None:
        """Wait for the actors to be placed and started (not yet built: loading a model may take long),
        so that a cluster whose free CPUs or GPUs are held by other actors gives an error, not a hang."""
        ready = [worker.__ray_ready__.remote() for worker in self.workers]
        _, pending = self.ray.wait(ready, num_returns=len(ready), timeout=timeout_s)
        if pending:
            late = [k for k, ref in enumerate(ready) if ref in pending]
            free, total = self.ray.available_resources(), self.ray.cluster_resources()
            have = ", ".join(f"{free.get(unit, 0):g} of {total.get(unit, 0):g} {unit}s" for unit in ("CPU", "GPU"))
            raise RayWorkerError(
                f"{', '.join(self.describe(k) for k in late)} did not start within start_timeout_s={timeout_s} s. "
                f"Each worker needs num_cpus={num_cpus:g} and num_gpus={self.num_gpus:g}; the Ray cluster has {have} "
                "free. Other actors (other Ray envs: close() them) may hold the rest, or the worker processes are "
                "slow to start (raise start_timeout_s).", late)

    def _gpus_per_actor(self, num_gpus: float | None, num_cpus: float) -> float:
        """Check the cluster can ever hold the K actors (else they would wait forever to start)."""
        resources = self.ray.cluster_resources()
        cpus, gpus = resources.get("CPU", 0), resources.get("GPU", 0)
        if num_gpus is None:
            num_gpus = default_gpus_per_actor(self.num_workers, gpus)
        if num_cpus < 0 or num_gpus < 0:
            raise ValueError(f"num_cpus={num_cpus!r}, num_gpus={num_gpus!r}; expected resources >= 0 per actor.")
        for name, unit, each, total in (("num_cpus", "CPUs", num_cpus, cpus), ("num_gpus", "GPUs", num_gpus, gpus)):
            if each * self.num_workers > total + 1e-9:
                raise ValueError(
                    f"{self.num_workers} Ray workers with {name}={each:g} each need {each * self.num_workers:g} "
                    f"{unit}, but the Ray cluster has {total:g}. Use fewer num_workers, a smaller {name} per "
                    f"worker, or a larger cluster (ray.init({name}=...)).")
        return float(num_gpus)

    def rows(self, worker: int) -> range:
        """The global rows worker `worker` holds."""
        return range(worker * self.rows_per_worker, (worker + 1) * self.rows_per_worker)

    def describe(self, worker: int) -> str:
        rows = self.rows(worker)
        return f"Ray env worker {worker} (envs {rows.start}..{rows.stop - 1})"

    def split(self, values: np.ndarray | Sequence[Any]) -> list[Any]:
        """`values` over all rows -> one slice per worker."""
        n = self.rows_per_worker
        return [values[k * n:(k + 1) * n] for k in range(self.num_workers)]

    def by_worker(self, indices: Sequence[int]) -> dict[int, list[int]]:
        """Global row indices -> {worker: its local indices}, in the order given."""
        grouped: dict[int, list[int]] = {}
        for i in indices:
            grouped.setdefault(int(i) // self.rows_per_worker, []).append(int(i) % self.rows_per_worker)
        return grouped

    # ------------------------------------------------------------------ calls
    def submit(self, method: str, per_worker: Sequence[tuple] | None = None, *,
               workers: Sequence[int] | None = None) -> list[tuple[int, Any]]:
        """Send `method` to `workers` (default: all), worker k with the arguments `per_worker[i]` (the
        i-th of `workers`); returns (worker, future) pairs for `gather`."""
        self.ensure_usable()
        workers = list(range(self.num_workers)) if workers is None else list(workers)
        args = per_worker if per_worker is not None else [()] * len(workers)
        return [(k, getattr(self.workers[k], method).remote(*a)) for k, a in zip(workers, args)]

    def call(self, method: str, per_worker: Sequence[tuple] | None = None, *,
             workers: Sequence[int] | None = None) -> list[Any]:
        """`submit` then `gather`: the answers in the order of `workers`."""
        return self.gather(self.submit(method, per_worker, workers=workers))

    def gather(self, futures: list[tuple[int, Any]], timeout_s: float | None | Literal["default"] = "default") -> list:
        """All answers in one `ray.get`. A dead actor or one that did not answer within the timeout
        raises `RayWorkerError` (and the group is unusable from then on); an exception raised inside
        a worker's method is re-raised as itself, with a note naming the worker."""
        ray = self.ray
        timeout = self.timeout_s if timeout_s == "default" else timeout_s
        refs = [ref for _, ref in futures]
        try:
            return ray.get(refs, timeout=timeout)
        except ray.exceptions.GetTimeoutError:
            _, pending = ray.wait(refs, num_returns=len(refs), timeout=0)
            late = [k for k, ref in futures if ref in pending]
            self._fail(f"{', '.join(self.describe(k) for k in late)} did not answer within timeout_s={timeout} s "
                       "(a step or reset still running, or the worker hung)", late)
        except ray.exceptions.RayError as error:
            first = error  # which worker and why: each future on its own below
        dead, raised = [], None
        for k, ref in futures:
            try:
                ray.get(ref, timeout=timeout)
            except ray.exceptions.RayTaskError as error:
                raised = raised or (k, error)
            except ray.exceptions.GetTimeoutError:
                dead.append((k, "did not answer in time"))
            except ray.exceptions.RayError as error:  # RayActorError (died), WorkerCrashedError, ...
                dead.append((k, f"{type(error).__name__}: {_first_line(error)}"))
        if dead:
            self._fail("; ".join(f"{self.describe(k)} failed ({why})" for k, why in dead), [k for k, _ in dead])
        if raised is not None:
            k, error = raised
            cause = getattr(error, "cause", None)
            if isinstance(cause, BaseException):
                cause.add_note(f"(raised in {self.describe(k)}; its env j is env {self.rows(k).start} + j here)")
                raise cause from None
            raise error
        raise first  # not tied to one worker (e.g. Ray itself shut down)

    def _fail(self, message: str, workers: list[int]) -> None:
        self._broken = message
        raise RayWorkerError(
            f"{message}. The Ray env cannot go on (its rows no longer move together): close() it and build a "
            "new one; check the worker's log (ray logs, or the driver's output) for why it died.", workers)

    @property
    def broken(self) -> bool:
        """Whether a worker failed or the group was closed: no call goes out any more."""
        return self._broken is not None or self._closed

    def ensure_usable(self) -> None:
        if self._closed:
            raise RuntimeError("this Ray env is closed (its actors are gone); build a new one.")
        if self._broken is not None:
            raise RuntimeError(f"this Ray env stopped after a worker failure ({self._broken}); close() it and "
                               "build a new one.")

    def check_actions(self, actions: Any, masks: np.ndarray, n_actions: int, strict_masks: bool) -> np.ndarray:
        """The step's actions as an array of one per env, checked before any worker moves, so a step
        that raises changes nothing (as a local env's). The shape is checked here; values that may be
        wrong (not integers, out of range, or masked when the env raises on masked actions) are
        checked by their workers' own env (`check_actions`), whose error is raised. Valid actions
        cost no round trip."""
        array = np.asarray(actions)
        if array.shape != (self.num_envs,):
            raise ValueError(f"actions {actions!r:.80} have shape {array.shape}; expected shape ({self.num_envs},): "
                             f"one action per env ({self.num_workers} Ray workers x {self.rows_per_worker} envs).")
        if array.dtype.kind not in "iu":
            suspect = np.ones(self.num_envs, dtype=bool)
        else:
            suspect = (array < 0) | (array >= n_actions)
            if strict_masks and not suspect.any():
                suspect = ~masks[np.arange(self.num_envs), array]
        if suspect.any():
            workers = sorted({int(i) // self.rows_per_worker for i in np.flatnonzero(suspect)})
            slices = self.split(array)
            self.call("check_actions", [(slices[k],) for k in workers], workers=workers)
        return array

    def close(self) -> None:
        """Kill the actors (the Ray cluster itself stays up)."""
        for worker in getattr(self, "workers", []):
            with contextlib.suppress(Exception):
                self.ray.kill(worker)
        self.workers = []
        self._closed = True


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def concat_vector_infos(parts: Sequence[Mapping[str, Any]], sizes: Sequence[int]) -> dict[str, Any]:
    """Gymnasium vector infos of consecutive blocks of rows (one per worker) as one: every array
    concatenated, a key some blocks lack filled there as Gymnasium would (0 / False / None, so its
    mask `_key` is False there), nested dicts (`final_info`) recursively."""
    merged: dict[str, Any] = {}
    for key in dict.fromkeys(k for part in parts for k in part):
        values = [part.get(key) for part in parts]
        like = next(v for v in values if v is not None)
        if isinstance(like, Mapping):
            merged[key] = concat_vector_infos([v if v is not None else {} for v in values], sizes)
        else:
            merged[key] = np.concatenate([np.asarray(v) if v is not None else _blank(like, n)
                                          for v, n in zip(values, sizes)])
    return merged


def _blank(like: np.ndarray, rows: int) -> np.ndarray:
    if like.dtype == object:
        return np.full((rows, *like.shape[1:]), None, dtype=object)
    return np.zeros((rows, *like.shape[1:]), dtype=like.dtype)


def row_method_callers(core_cls: type) -> dict[str, Callable]:
    """For each of `core_cls.row_methods`, a face method that calls it on every worker's local face and
    concatenates the answers ([num_envs, ...], as the local faces' row methods)."""
    def caller(name: str) -> Callable:
        @functools.wraps(getattr(core_cls, name))
        def method(self: Any, *args: Any, **kwargs: Any) -> Any:
            return np.concatenate(self.workers.call("call", [(name, args, kwargs)] * self.workers.num_workers))

        return method

    return {name: caller(name) for name in core_cls.row_methods}


def ray_face_class(base: type, core_cls: type, suffix: str) -> type:
    """`base` (a Ray face) for `core_cls`, e.g. `TokenChoiceRayVectorEnv`, with the core's row methods."""
    name = core_cls.__name__.removesuffix("Core") + suffix
    return type(name, (base,), {"core_class": core_cls, "__module__": base.__module__, "__qualname__": name,
                                **row_method_callers(core_cls)})
