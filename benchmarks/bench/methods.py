"""Every leaderboard method as a `Decoder` (prompts in, responses out) on the suite's LM.

`prepare_method` turns a `MethodConfig` into a ready decoder, training it first when the method
needs training (the proxy with MaskablePPO, RRHF with its ranking loss). Trained models live in
`<runs_dir>/bench/<kind>-<hash of their config>/` and are reused while their config is unchanged,
so re-running the suite (or a sweep point that equals the leaderboard's proxy) does not retrain;
an interrupted training resumes from its checkpoints. `choice_proxy` is MaskablePPO on TokenChoice-v0
(one of the LM's top-k tokens per step) with the `train:` section's policy, PPO and run settings
(`ChoiceTrainConfig.like`); its `params` override them, e.g. `{env: {obs_rewards: true}}`.

A custom method (`kind: custom`, `entry: "module:Class"`) is built with its `params`; constructor
arguments named `lm`, `tokenizer`, `reward` or `device` that the entry does not set receive the
suite's loaded LM, tokenizer, `RewardWrapper` and device. An object with `generate` is used as a
`Decoder`; one with `predict` is a `PolicyAgent` played on TokenAccept-v0 (the suite's `train.env`
settings on its task).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agents.base import Decoder, PolicyDecoder
from agents.configs import ChoiceTrainConfig, TrainConfig
from agents.harness import unscored
from agents.launch import SINGLE_PROCESS, Processes
from benchmarks.bench.config import MethodConfig, SuiteConfig
from benchmarks.bench.records import fingerprint
from llm_envs.config import ConfigError, from_dict, set_key, to_dict
from llm_envs.task import LMContext
from llm_envs.envs.params import TokenAcceptParams, TokenChoiceParams
from llm_envs.envs.token_accept import TokenAcceptCore
from llm_envs.envs.token_choice import TokenChoiceCore
from llm_envs.io import atomic_write_json

DECODING_KINDS = ("greedy", "top_k", "nucleus", "best_of_n")
TRAIN_INFO = "bench_train.json"  # written once a training run is complete: its wall time
# Fields that do not change what a training run learns (left out of the run directory's hash).
# num_workers: Ray workers hold the same rows a local core would (row i == row i, tests/test_ray_env.py).
_RUN_ONLY_FIELDS = ("output_dir", "progress_bar", "progress", "wandb_mode", "wandb_project", "torch_threads",
                    "num_threads", "resume", "num_workers")


@dataclass
class PreparedMethod:
    decoder: Decoder
    trainable_params: int = 0
    train_seconds: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)


def with_overrides(cfg: Any, params: dict[str, Any]) -> Any:
    """A copy of a frozen config with `params` applied (nested mappings or dotted keys), re-validated."""
    data = to_dict(cfg)
    for key, value in params.items():
        set_key(data, key.split("."), value, f"{type(cfg).__name__} params {key!r}")
    return from_dict(type(cfg), data, where=type(cfg).__name__)


def run_dir(suite: SuiteConfig, kind: str, cfg: Any) -> Path:
    """Where a trained method lives: a hash of its config and the task it learns (not run-only fields)."""
    settings = {k: v for k, v in to_dict(cfg).items() if k not in _RUN_ONLY_FIELDS}
    task = to_dict(suite.task)
    if not task.get("chat_template"):  # fields added with chat templates: at their defaults the hash stays the same
        task.pop("chat_template", None)
        task.pop("system_prompt", None)
    if suite.task.reward_rules.is_default:  # fields added with the protocol suites: likewise
        task.pop("reward_rules", None)
    if suite.task.reward_tokenizer is None:
        task.pop("reward_tokenizer", None)
    settings["task"] = task
    return Path(suite.bench.runs_dir) / "bench" / f"{kind}-{fingerprint(**settings)}"


def _task_world_hash(suite: SuiteConfig) -> str | None:
    """The hash of the world the suite's task uses (None when it uses none)."""
    return suite.task.resolve(progress=False).world_hash if suite.task.needs_world() else None


def _timed_training(directory: Path, train: Any, world_hash: str | None, processes: Processes = SINGLE_PROCESS,
                    *, together: bool = False) -> float:
    """Run `train()` unless `directory` holds a finished run; returns the run's training seconds.

    Under a launch of several processes (`processes`) the main process trains while the others wait,
    then they find its finished run; with `together` every process enters `train()` (RRHF's training
    is multi-process itself: a process left out would stall the others) and the main process records
    the time."""
    if together:
        return _train_or_reuse(directory, train, world_hash, record=processes.is_main)
    with processes.main_first():
        return _train_or_reuse(directory, train, world_hash, record=True)


def _train_or_reuse(directory: Path, train: Any, world_hash: str | None, *, record: bool) -> float:
    """`_timed_training` in one process: reuse the finished run in `directory`, else train and (`record`)
    write its time.

    A run directory is named by its config and task, not by the world's bytes, so a world rebuilt
    with other bytes (a changed preset, another machine) would silently reuse a model trained on
    the old one: the world hash is recorded with the run and a mismatch is refused. Runs recorded
    before hashes were kept (no `world_hash`) are reused as they are."""
    info = directory / TRAIN_INFO
    if info.is_file():
        recorded = json.loads(info.read_text())
        trained_on = recorded.get("world_hash")
        if world_hash is not None and trained_on is not None and trained_on != world_hash:
            raise RuntimeError(
                f"{directory} was trained on world {trained_on[:12]}, but the task's world is now "
                f"{world_hash[:12]} (it was rebuilt with other bytes); delete that directory to retrain, or "
                "restore the world it was trained on.")
        return float(recorded["train_seconds"])
    started = time.perf_counter()
    train()
    seconds = time.perf_counter() - started
    if record:
        atomic_write_json(info, {"train_seconds": seconds, "world_hash": world_hash})
    return seconds


def train_proxy(suite: SuiteConfig, params: dict[str, Any], kind: str = "proxy",
                processes: Processes = SINGLE_PROCESS) -> tuple[TrainConfig, Path, float]:
    """Train (or reuse) the MaskablePPO proxy of `suite.train` with `params` applied: on TokenAccept
    (`kind="proxy"`) or, with the same policy and PPO settings, on TokenChoice (`"choice_proxy"`); on
    a launch of several processes the main process trains it."""
    from agents.proxy import train

    base = suite.train if kind == "proxy" else ChoiceTrainConfig.like(suite.train, suite.task.max_new_tokens)
    cfg = with_overrides(base, params)
    directory = run_dir(suite, kind, cfg)
    cfg = dataclasses.replace(cfg, output_dir=str(directory), progress_bar=suite.bench.progress)
    seconds = _timed_training(directory, lambda: train(cfg, suite.task), _task_world_hash(suite), processes)
    return cfg, directory / "proxy.zip", seconds


def decoder_rows(suite: SuiteConfig) -> int:
    """Rows per `generate` call of the HF decoders (4 x bench.batch_size, the env methods' rows), and the
    harness's chunk of prompts: a chunk is one decoder batch, the unit a launch of several processes splits
    the prompts by (`benchmarks.bench.distributed`)."""
    return 4 * suite.bench.batch_size


def token_accept_core(params: TokenAcceptParams, ctx: LMContext, batch_size: int) -> TokenAcceptCore:
    """TokenAccept-v0 rows with `params` on the suite's (unscored) context: the harness scores."""
    return TokenAcceptCore(min(batch_size, len(ctx.prompts)), context=unscored(ctx), params=params)


def _proxy(method: MethodConfig, suite: SuiteConfig, ctx: LMContext, processes: Processes) -> PreparedMethod:
    from agents.sb3_agent import load_proxy

    cfg, path, seconds = train_proxy(suite, method.params, processes=processes)
    core = token_accept_core(cfg.env, ctx, suite.bench.batch_size)
    agent = load_proxy(path, core.observation_space)
    return PreparedMethod(PolicyDecoder(agent, core, name=method.name), agent.trainable_params, seconds,
                          {"run_dir": str(path.parent), "p_t": cfg.env.p_t, "temperature": cfg.env.temperature,
                           "total_timesteps": cfg.total_timesteps})


def token_choice_core(params: TokenChoiceParams, ctx: LMContext, batch_size: int) -> TokenChoiceCore:
    """TokenChoice-v0 rows with `params` on the suite's context, without its gold judge (the harness
    scores). With `obs_rewards` the rows keep the real reward model, since the observation holds its
    scores of the candidates; that also scores each finished row once more (billed to generation time)."""
    scored = dataclasses.replace(ctx, gold=None) if params.obs_rewards else unscored(ctx)
    return TokenChoiceCore(min(batch_size, len(ctx.prompts)), context=scored, params=params)


def _choice_proxy(method: MethodConfig, suite: SuiteConfig, ctx: LMContext, processes: Processes) -> PreparedMethod:
    from agents.sb3_agent import load_proxy

    cfg, path, seconds = train_proxy(suite, method.params, kind="choice_proxy", processes=processes)
    core = token_choice_core(cfg.env, ctx, suite.bench.batch_size)
    agent = load_proxy(path, core.observation_space, action_space=core.action_space)
    return PreparedMethod(PolicyDecoder(agent, core, name=method.name), agent.trainable_params, seconds,
                          {"run_dir": str(path.parent), "k": cfg.env.k, "obs_rewards": cfg.env.obs_rewards,
                           "temperature": cfg.env.temperature, "total_timesteps": cfg.total_timesteps})


def _rrhf(method: MethodConfig, suite: SuiteConfig, ctx: LMContext, processes: Processes) -> PreparedMethod:
    from agents.decoding import GreedyDecoder
    from agents.rrhf import run
    from agents.rrhf.training import MODEL_DIR

    cfg = with_overrides(suite.rrhf, method.params)
    directory = run_dir(suite, "rrhf", cfg)
    cfg = dataclasses.replace(cfg, output_dir=str(directory), progress=suite.bench.progress)
    seconds = _timed_training(directory, lambda: run(cfg, suite.task, ("sample", "score", "train"),
                                                     verbose=suite.bench.progress and processes.is_main,
                                                     processes=processes),
                              _task_world_hash(suite), processes, together=True)
    decoder = GreedyDecoder(str(directory / MODEL_DIR), ctx.tokenizer, device=suite.task.device,
                            batch_size=decoder_rows(suite), name=method.name)
    params = sum(p.numel() for p in decoder.model.parameters())  # RRHF fine-tunes every weight
    return PreparedMethod(decoder, params, seconds, {"run_dir": str(directory)})


def _decoding(method: MethodConfig, suite: SuiteConfig, ctx: LMContext, processes: Processes) -> PreparedMethod:
    from agents.decoding import make_decoder

    kwargs = dict(method.params)
    if method.kind == "best_of_n":
        kwargs.setdefault("reward", ctx.reward)
    decoder = make_decoder(method.kind, ctx.model, tokenizer=ctx.tokenizer, device=suite.task.device,
                           batch_size=decoder_rows(suite), name=method.name, **kwargs)
    return PreparedMethod(decoder)


def _args(method: MethodConfig, suite: SuiteConfig, ctx: LMContext, processes: Processes) -> PreparedMethod:
    from agents.args import ARGS

    decoder = ARGS(ctx.model, ctx.reward, tokenizer=ctx.tokenizer, device=suite.task.device,
                   batch_size=suite.bench.batch_size, name=method.name, **method.params)
    return PreparedMethod(decoder)


def import_entry(entry: str) -> Any:
    module_name, _, attr = entry.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ConfigError(f"entry {entry!r}: cannot import module {module_name!r} ({error}); make it importable "
                          "(installed, or on PYTHONPATH).") from error
    if not hasattr(module, attr):
        raise ConfigError(f"entry {entry!r}: module {module_name!r} has no attribute {attr!r}.")
    return getattr(module, attr)


def _custom(method: MethodConfig, suite: SuiteConfig, ctx: LMContext, processes: Processes) -> PreparedMethod:
    cls = import_entry(method.entry)
    kwargs = dict(method.params)
    suite_parts = {"lm": ctx.model, "tokenizer": ctx.tokenizer, "reward": ctx.reward, "device": suite.task.device}
    accepted = inspect.signature(cls).parameters
    for key, value in suite_parts.items():
        if key in accepted and key not in kwargs:
            kwargs[key] = value
    obj = cls(**kwargs)
    params = int(getattr(obj, "trainable_params", 0) or 0)
    if callable(getattr(obj, "generate", None)):
        if not getattr(obj, "name", None):
            obj.name = method.name
        return PreparedMethod(obj, params)
    if callable(getattr(obj, "predict", None)):
        core = token_accept_core(suite.train.env, ctx, suite.bench.batch_size)
        return PreparedMethod(PolicyDecoder(obj, core, name=method.name), params)
    raise ConfigError(f"method {method.name!r}: {method.entry} builds a {type(obj).__name__}, which has neither "
                      "generate(prompts, max_new_tokens=, seed=) (a Decoder) nor predict(obs, action_masks, "
                      "deterministic) (a PolicyAgent); implement one of agents.base's protocols.")


# Each builder takes the launch's processes (the trained methods decide which of them trains; the others
# build the same decoder on every process).
_BUILDERS = {"args": _args, "proxy": _proxy, "choice_proxy": _choice_proxy, "rrhf": _rrhf, "custom": _custom,
             **{kind: _decoding for kind in DECODING_KINDS}}


def prepare_method(method: MethodConfig, suite: SuiteConfig, ctx: LMContext,
                   processes: Processes = SINGLE_PROCESS) -> PreparedMethod:
    """Build (and, for the proxies and RRHF, train or reuse: on the launch's processes as
    `_timed_training` says) one method's decoder."""
    return _BUILDERS[method.kind](method, suite, ctx, processes)
