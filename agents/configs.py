"""Frozen, validated configs of the proxy (MaskablePPO) runs: a suite file's `train:` section.

What the proxy is trained and evaluated on (LM, reward model, prompts, budget, device) is the suite's
`task:` (`llm_envs.task.Task`); `train.env` holds only the TokenAccept MDP's settings
(`TokenAcceptParams`, the env's own dataclass: one source of defaults and help). Every field says
what it is for: `llm-envs config show tiny train`.

`ChoiceTrainConfig` is the same run on TokenChoice-v0 (`env` = `TokenChoiceParams`); the env a config
trains on is its class's `env_id`, so one training loop (`agents.proxy.train`) serves both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from llm_envs.config import from_dict, to_dict
from llm_envs.envs.params import TokenAcceptParams, TokenChoiceParams
from llm_envs.task import Task


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass(frozen=True)
class ProxyConfig:
    """The proxy policy and its PPO settings (the paper: 2-layer MLP, hidden 2048, lr 3e-4)."""

    hidden_sizes: tuple[int, ...] = field(default=(2048, 2048), metadata=_help("MLP hidden layers of both the policy and value nets"))
    activation: Literal["relu", "tanh", "gelu"] = field(default="relu", metadata=_help("MLP activation (SB3's default would be tanh)"))
    learning_rate: float = field(default=3e-4, metadata=_help("Adam learning rate"))
    n_steps: int = field(default=128, metadata=_help("rollout steps per env between updates"))
    batch_size: int = field(default=256, metadata=_help("PPO minibatch size"))
    n_epochs: int = field(default=4, metadata=_help("PPO epochs per update"))
    gamma: float = field(default=1.0, metadata=_help("discount; episodes are short and the reward terminal"))
    gae_lambda: float = field(default=0.95, metadata=_help("GAE lambda"))
    clip_range: float = field(default=0.2, metadata=_help("PPO clip range"))
    ent_coef: float = field(default=0.01, metadata=_help("entropy bonus"))
    normalize_advantage: bool = field(default=True, metadata=_help("normalise advantages per minibatch"))

    def __post_init__(self) -> None:
        if not self.hidden_sizes or any(h < 1 for h in self.hidden_sizes):
            raise ValueError(f"proxy.hidden_sizes={self.hidden_sizes}; expected positive layer widths.")
        if self.learning_rate <= 0 or self.n_steps < 1 or self.batch_size < 2 or self.n_epochs < 1:
            raise ValueError("proxy.learning_rate, n_steps, batch_size (>= 2) and n_epochs must be positive.")
        if not 0.0 <= self.gamma <= 1.0 or not 0.0 <= self.gae_lambda <= 1.0:
            raise ValueError(f"proxy.gamma={self.gamma}, gae_lambda={self.gae_lambda}; expected values in [0, 1].")


@dataclass(frozen=True)
class TrainConfig:
    """One proxy run: a suite's `train:` section (`llm-envs train --config tiny [train.key=value ...]`)."""

    env: TokenAcceptParams = field(default_factory=TokenAcceptParams, metadata=_help(
        "the TokenAccept MDP (p_t, top_p, temperature, obs_mode, costs ...); its max_new_tokens is the task's"))
    proxy: ProxyConfig = field(default_factory=ProxyConfig, metadata=_help("the policy and PPO"))
    num_envs: int = field(default=16, metadata=_help("envs stepped together (one batched LM forward per step)"))
    num_workers: int = field(default=0, metadata=_help(
        "0 = the training envs are one local batched core; K >= 1 = K Ray actors (pip install 'llm-envs[ray]'), "
        "each one core of num_envs/K rows on its own device (a GPU each when the cluster has them); the "
        "trajectories are the same, so it may change between resumes"))
    total_timesteps: int = field(default=50_000, metadata=_help("env steps of training"))
    seed: int = field(default=0, metadata=_help("seed of envs, policy init and PPO"))
    eval_freq: int = field(default=0, metadata=_help("vector steps between MaskableEvalCallback runs (0 = only at the end)"))
    eval_episodes: int = field(default=64, metadata=_help("held-out prompts per evaluation"))
    checkpoint_freq: int = field(default=0, metadata=_help("vector steps between checkpoints (0 = none besides the final model)"))
    output_dir: str = field(default="runs/proxy-tiny", metadata=_help("where the model, checkpoints and resolved config go"))
    resume: bool = field(default=True, metadata=_help("continue from the newest checkpoint in output_dir/checkpoints"))
    wandb_mode: Literal["offline", "online", "disabled"] = field(default="offline", metadata=_help("wandb: offline needs no network"))
    wandb_project: str = field(default="llm_envs", metadata=_help("wandb project"))
    progress_bar: bool = field(default=True, metadata=_help("show a progress bar"))
    torch_threads: int | None = field(default=None, metadata=_help("torch CPU threads (None = torch's default)"))

    env_id: ClassVar[str] = "llm_envs/TokenAccept-v0"  # the env `agents.proxy.train` builds from `env`

    def __post_init__(self) -> None:
        if self.num_envs < 1 or self.total_timesteps < 1:
            raise ValueError(f"num_envs={self.num_envs}, total_timesteps={self.total_timesteps}; expected >= 1.")
        if isinstance(self.num_workers, bool) or not isinstance(self.num_workers, int) or self.num_workers < 0:
            raise ValueError(f"num_workers={self.num_workers!r}; expected 0 (one local core) or K >= 1 Ray workers.")
        if self.num_workers and self.num_envs % self.num_workers:
            raise ValueError(f"num_envs={self.num_envs} is not divisible by num_workers={self.num_workers}: every Ray "
                             f"worker holds num_envs / num_workers envs. Use a num_envs that is a multiple of "
                             f"{self.num_workers}, or a num_workers that divides {self.num_envs}.")
        if self.eval_freq < 0 or self.checkpoint_freq < 0 or self.eval_episodes < 1:
            raise ValueError("eval_freq and checkpoint_freq must be >= 0 and eval_episodes >= 1.")


@dataclass(frozen=True)
class ChoiceTrainConfig(TrainConfig):
    """One MaskablePPO run on TokenChoice-v0 (an agent picking one of the LM's top-k tokens): the fields
    of `TrainConfig`, with `env` the TokenChoice MDP. `env.obs_rewards=True` puts the reward model's
    score of every candidate in the observation (one reward-model call per step)."""

    env: TokenChoiceParams = field(default_factory=TokenChoiceParams, metadata=_help(  # type: ignore[assignment]
        "the TokenChoice MDP (k, top_p, temperature, obs_rewards, dense_reward, costs ...); its max_new_tokens "
        "is the task's"))
    output_dir: str = field(default="runs/choice-tiny", metadata=_help(
        "where the model, checkpoints and resolved config go"))

    env_id: ClassVar[str] = "llm_envs/TokenChoice-v0"

    @classmethod
    def like(cls, train: TrainConfig, max_new_tokens: int, **env: Any) -> ChoiceTrainConfig:
        """The TokenChoice run that shares `train`'s policy, PPO and run settings (a suite's `train:`
        section, so the two agents of a leaderboard learn alike), on TokenChoiceParams(**env) with the
        task's response budget."""
        shared = {k: v for k, v in to_dict(train).items() if k != "env"}
        return from_dict(cls, {**shared, "env": {"max_new_tokens": max_new_tokens, **env}}, where=cls.__name__)


def check_budget(env: TokenAcceptParams | TokenChoiceParams, task: Task) -> None:
    """The response budget is the task's: an env section that says otherwise is a mistake."""
    if env.max_new_tokens != task.max_new_tokens:
        raise ValueError(
            f"train.env.max_new_tokens={env.max_new_tokens} differs from task.max_new_tokens={task.max_new_tokens}; "
            "every method of a task decodes with the task's budget. Set task.max_new_tokens and leave "
            "train.env.max_new_tokens unset (a suite file fills it in from the task)."
        )
