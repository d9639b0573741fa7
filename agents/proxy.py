"""Train the Proxy-RLHF proxy: MaskablePPO on the SB3 view of TokenAccept-v0 (or of TokenChoice-v0).

Read top to bottom: config -> envs -> policy -> callbacks (metrics, eval, checkpoints) ->
learn -> save. `llm-envs train --config tiny` runs `train(suite.train, suite.task)`: the proxy trains
on the task's train prompts and is evaluated on its held-out prompts, with the task's LM, reward
model and response budget. The env is the config's `env_id`: a `TrainConfig` trains the accept/reject
proxy, a `ChoiceTrainConfig` the same policy and PPO on TokenChoice (one of the top-k tokens per step).

Logged metrics (stdout, CSV in the run dir, and wandb; each is a mean over the episodes that
ended during the rollout; a metric appears when the env reports it):
- `rollout/reward_model`: reward-model score of the finished responses (the training reward).
- `rollout/gold`: gold-judge score, where a gold judge exists (the embedded world).
- `rollout/rejection_rate`: rejects / steps (TokenAccept).
- `rollout/decisions_per_step`: steps where the agent had a choice (reject legal; more than one
  legal slot) / steps.
- `rollout/forced_accepts` (TokenAccept) / `rollout/forced_actions` (TokenChoice): masked actions
  coerced to the default, per episode.
- `rollout/deviation_nats`: sum over accepted tokens of log p(top1) - log p(accepted), per
  episode (how far the proxy moved the LM from its own greedy choice; TokenAccept).
- `rollout/response_len`: accepted tokens per response.
- `rollout/lm_forwards`: LM forwards per episode (prefill counts 1).
- `rollout/rm_calls`: reward-model calls per episode spent on observations (TokenChoice).
- `time/env_steps_per_s`: env steps per second of wall time since the start.
- SB3's own: `rollout/ep_rew_mean`, `train/*` (losses, KL, clip fraction), `eval/mean_reward`.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sb3_contrib import MaskablePPO
from sb3_contrib.common.maskable.callbacks import MaskableEvalCallback
from stable_baselines3.common.callbacks import BaseCallback, CallbackList
from stable_baselines3.common.logger import KVWriter, configure
from stable_baselines3.common.vec_env import VecEnv

import llm_envs
from agents.configs import TrainConfig, check_budget
from agents.run_dir import AppendingCSV, AtomicCheckpoints, claim_run_dir, newest_loadable_checkpoint, save_atomically
from llm_envs.config import to_dict
from llm_envs.task import Task, TaskEnvKwargs, TaskSources

ENV_ID = TrainConfig.env_id  # the default env (a config's class says which env it trains on)
ACTIVATIONS = {"relu": torch.nn.ReLU, "tanh": torch.nn.Tanh, "gelu": torch.nn.GELU}
# Per-episode stats averaged as they are (whichever of them the env reports).
STAT_KEYS = ("forced_accepts", "forced_actions", "deviation_nats", "response_len", "lm_forwards", "rm_calls")


class EpisodeMetrics(BaseCallback):
    """Averages the env's end-of-episode info (see the module docstring) per rollout."""

    def __init__(self) -> None:
        super().__init__()
        self.sums: dict[str, list[float]] = defaultdict(list)
        self.started = time.perf_counter()

    def _on_step(self) -> bool:
        for info, done in zip(self.locals["infos"], self.locals["dones"]):
            if not done or "reward_parts" not in info:
                continue
            parts, stats = info["reward_parts"], info["episode_stats"]
            self.sums["reward_model"].append(parts["reward_model"])
            if "gold" in parts:
                self.sums["gold"].append(parts["gold"])
            steps = max(stats["steps"], 1)
            if "rejections" in stats:
                self.sums["rejection_rate"].append(stats["rejections"] / steps)
            if "decisions" in stats:
                self.sums["decisions_per_step"].append(stats["decisions"] / steps)
            for key in STAT_KEYS:
                if key in stats:
                    self.sums[key].append(stats[key])
        return True

    def _on_rollout_end(self) -> None:
        for key, values in self.sums.items():
            self.logger.record(f"rollout/{key}", float(np.mean(values)))
        self.logger.record("time/env_steps_per_s", self.num_timesteps / (time.perf_counter() - self.started))
        self.sums.clear()


class WandbWriter(KVWriter):
    """Forwards SB3's logger to wandb (wandb's SB3 integration needs tensorboard)."""

    def __init__(self, run: Any) -> None:
        self.run = run

    def write(self, key_values: dict[str, Any], key_excluded: dict[str, Any], step: int = 0) -> None:
        numbers = {k: v for k, v in key_values.items() if isinstance(v, (int, float, np.floating, np.integer))}
        self.run.log(numbers, step=step, commit=True)

    def close(self) -> None:
        self.run.finish()


def run_config(cfg: TrainConfig, task: Task) -> dict[str, Any]:
    """What a run directory's `config.yaml` holds: the task and the training config that made it."""
    return {"task": to_dict(task), "train": to_dict(cfg)}


def train(cfg: TrainConfig, task: Task | None = None, *, restart: bool = False) -> Path:
    """Train a proxy on `task` (default: the embedded world) in the env of `cfg.env_id` (TokenAccept
    for a `TrainConfig`, TokenChoice for a `ChoiceTrainConfig`); returns `<output_dir>/proxy.zip`.

    A run directory belongs to one config: resuming under another one (model, env, task, seed) is
    refused; `restart=True` moves the old run aside first. See `agents.run_dir`."""
    task = task or Task()
    check_budget(cfg.env, task)
    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    run_dir = Path(cfg.output_dir)
    claim_run_dir(run_dir, run_config(cfg, task), restart=restart,
                  defaults={"train": to_dict(type(cfg)()), "task": to_dict(Task())})  # fields added since: at default

    with contextlib.ExitStack() as stack:
        return _train(cfg, task, run_dir, stack)


def _train_env(cfg: TrainConfig, task: Task, sources: TaskSources, stack: contextlib.ExitStack) -> VecEnv:
    """The training envs: one local engine steps them all, or (`num_workers` = K) K Ray actors each step
    num_envs/K of them on their own device, each resolving the task itself (its models loaded there, not
    pickled from here). Ray is started for the run when it is not running, and the actors end with it."""
    if not cfg.num_workers:
        return llm_envs.make_sb3_vec_env(cfg.env_id, cfg.num_envs, params=cfg.env,
                                         **sources.env_kwargs(sources.train_prompts))
    from llm_envs.vector.ray_sb3 import make_ray_sb3_vec_env
    from llm_envs.vector.ray_workers import ray_session

    stack.enter_context(ray_session(min_cpus=cfg.num_workers))
    env = make_ray_sb3_vec_env(cfg.env_id, cfg.num_envs, num_workers=cfg.num_workers,
                               kwargs_factory=TaskEnvKwargs(task, "train"), params=cfg.env,
                               torch_threads=cfg.torch_threads)
    stack.callback(env.close)
    return env


def _train(cfg: TrainConfig, task: Task, run_dir: Path, stack: contextlib.ExitStack) -> Path:
    """`train` in its claimed run directory; `stack` closes the Ray workers however training ends."""
    # Envs: one engine steps all training envs (or K Ray workers do); evaluation runs on the task's
    # held-out prompts. The task is resolved here first, so a world it needs is built once, before any worker.
    sources = task.resolve()
    train_env = _train_env(cfg, task, sources, stack)
    train_env.seed(cfg.seed)
    eval_env = llm_envs.make_sb3_vec_env(cfg.env_id, min(cfg.num_envs, cfg.eval_episodes), params=cfg.env,
                                         **sources.env_kwargs(sources.eval_prompts))
    eval_env.seed(cfg.seed + 10_000)

    # Policy: the paper's proxy is a 2-layer MLP (hidden 2048) for both policy and value.
    found = newest_loadable_checkpoint(run_dir, lambda path: MaskablePPO.load(path, env=train_env, device="auto")) \
        if cfg.resume else None
    if found is not None:
        checkpoint, model = found
        print(f"resuming from {checkpoint} at {model.num_timesteps} steps")
    else:
        checkpoint = None
        p = cfg.proxy
        policy_kwargs = dict(net_arch=dict(pi=list(p.hidden_sizes), vf=list(p.hidden_sizes)),
                             activation_fn=ACTIVATIONS[p.activation])
        model = MaskablePPO("MlpPolicy", train_env, learning_rate=p.learning_rate, n_steps=p.n_steps,
                            batch_size=p.batch_size, n_epochs=p.n_epochs, gamma=p.gamma,
                            gae_lambda=p.gae_lambda, clip_range=p.clip_range, ent_coef=p.ent_coef,
                            normalize_advantage=p.normalize_advantage, policy_kwargs=policy_kwargs,
                            seed=cfg.seed, device="auto", verbose=0)

    # Logging: stdout + CSV always (appended across resumes); wandb offline by default (no network needed).
    logger = configure(str(run_dir / "logs"), ["stdout"])
    logger.output_formats.append(AppendingCSV(run_dir / "logs" / "progress.csv"))
    if cfg.wandb_mode != "disabled":
        import wandb

        run = wandb.init(project=cfg.wandb_project, dir=str(run_dir), mode=cfg.wandb_mode,
                         config=run_config(cfg, task), name=run_dir.name, reinit="finish_previous")
        logger.output_formats.append(WandbWriter(run))
    model.set_logger(logger)

    callbacks: list[BaseCallback] = [EpisodeMetrics()]
    eval_freq = cfg.eval_freq or max(cfg.total_timesteps // cfg.num_envs, 1)
    callbacks.append(MaskableEvalCallback(eval_env, n_eval_episodes=cfg.eval_episodes, eval_freq=eval_freq,
                                          deterministic=True, best_model_save_path=str(run_dir / "best"),
                                          log_path=str(run_dir / "eval"), verbose=0))
    if cfg.checkpoint_freq:
        callbacks.append(AtomicCheckpoints(cfg.checkpoint_freq, str(run_dir / "checkpoints"), name_prefix="proxy"))

    remaining = cfg.total_timesteps - model.num_timesteps
    if remaining > 0:
        model.learn(remaining, callback=CallbackList(callbacks), progress_bar=cfg.progress_bar,
                    reset_num_timesteps=checkpoint is None)
    final = save_atomically(model, run_dir / "proxy.zip")
    logger.close()
    return final
