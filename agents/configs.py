"""Frozen, validated configs of the proxy (MaskablePPO) runs. Loaded from `configs/*.yaml` with
`llm_envs.config.load_config(TrainConfig, path, overrides)`; every field says what it is for."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass(frozen=True)
class EnvConfig:
    """The TokenAccept env the proxy trains and is evaluated on (kwargs of TokenAccept-v0)."""

    lm: str | None = field(default=None, metadata=_help("causal LM: hub name or dir; null = the embedded world's SFT LM"))
    reward: str | None = field(default=None, metadata=_help("reward model: hub name or dir; null = the world's RM"))
    train_prompts: Any = field(default="world:train", metadata=_help("prompt source for training (see llm_envs.data.load_prompts)"))
    eval_prompts: Any = field(default="world:test", metadata=_help("held-out prompt source for evaluation"))
    max_prompt_tokens: int | None = field(default=None, metadata=_help("drop longer prompts (the paper: 256)"))
    top_p: float = field(default=0.9, metadata=_help("candidate pool = top-p nucleus of softmax(logits / temperature)"))
    top_k: int | None = field(default=None, metadata=_help("optional cap on the pool size"))
    temperature: float = field(default=1.0, metadata=_help("the paper sweeps 0.25, 0.5, 0.75, 1.0"))
    p_t: float = field(default=0.01, metadata=_help("SKAM threshold: reject allowed iff mean p over the remaining pool > p_t"))
    max_new_tokens: int = field(default=32, metadata=_help("response budget (accepted tokens)"))
    obs_mode: Literal["candidate", "prefix"] = field(default="candidate", metadata=_help("observation layout, see the env card"))
    rejection_cost: float = field(default=0.0, metadata=_help("reward cost per reject"))
    deviation_beta: float = field(default=0.0, metadata=_help("beta of the cost beta * (log p(top1) - log p(accepted))"))
    device: str = field(default="auto", metadata=_help("'auto' = cuda when present, else cpu"))
    dtype: str = field(default="auto", metadata=_help("LM dtype: auto (float32), bfloat16, float16"))

    def __post_init__(self) -> None:
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"env.top_p={self.top_p}; expected 0 < top_p <= 1.")
        if not 0.0 <= self.p_t < 1.0:
            raise ValueError(f"env.p_t={self.p_t}; expected 0 <= p_t < 1.")
        if self.temperature <= 0:
            raise ValueError(f"env.temperature={self.temperature}; expected > 0.")
        if self.max_new_tokens < 1:
            raise ValueError(f"env.max_new_tokens={self.max_new_tokens}; expected >= 1.")

    def env_kwargs(self, prompts: Any) -> dict[str, Any]:
        """Keyword arguments of TokenAccept-v0 for a prompt source."""
        kwargs = asdict(self)
        kwargs.pop("train_prompts"), kwargs.pop("eval_prompts")
        return {**kwargs, "prompts": prompts}


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
    """One proxy run: `llm-envs train --config configs/tiny.yaml [key=value ...]`."""

    env: EnvConfig = field(default_factory=EnvConfig, metadata=_help("the TokenAccept env"))
    proxy: ProxyConfig = field(default_factory=ProxyConfig, metadata=_help("the policy and PPO"))
    num_envs: int = field(default=16, metadata=_help("envs stepped together (one batched LM forward per step)"))
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

    def __post_init__(self) -> None:
        if self.num_envs < 1 or self.total_timesteps < 1:
            raise ValueError(f"num_envs={self.num_envs}, total_timesteps={self.total_timesteps}; expected >= 1.")
        if self.eval_freq < 0 or self.checkpoint_freq < 0 or self.eval_episodes < 1:
            raise ValueError("eval_freq and checkpoint_freq must be >= 0 and eval_episodes >= 1.")
