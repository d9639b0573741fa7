"""The benchmark suite's config: one YAML file holds the suite (`bench:`), the proxy's training run
(`train:`, an `agents.configs.TrainConfig`) and RRHF's run (`rrhf:`, an `agents.rrhf.config.RRHFConfig`),
so every method of a suite reads its LM, reward model and prompts from one place.

    cfg = load_suite_config("configs/tiny.yaml", ["bench.num_prompts=48"], quick=False)

`quick: [key=value, ...]` in the file lists the overrides of the `--quick` variant (applied before
the command line's); the quick suite writes to `<suite>-quick` so it never overwrites full results.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Sequence

import yaml

from agents.configs import TrainConfig
from agents.rrhf.config import RRHFConfig
from llm_envs.config import ConfigError, did_you_mean, load_config

METHOD_KINDS = ("greedy", "top_k", "nucleus", "best_of_n", "args", "proxy", "rrhf", "custom")
SWEEPS = ("p_t", "temperature")


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass(frozen=True)
class MethodConfig:
    """One leaderboard row: a method and its settings."""

    name: str = field(metadata=_help("row name on the leaderboard (also the records' file name)"))
    kind: str = field(metadata=_help(
        "greedy | top_k | nucleus | best_of_n (agents.decoding), args (agents.args.ARGS), proxy (MaskablePPO "
        "trained with the train: section), rrhf (trained with the rrhf: section), custom (an importable class)"))
    params: dict = field(default_factory=dict, metadata=_help(
        "keyword arguments of the method's class (e.g. {top_k: 40, temperature: 0.7}; ARGS: {k, w, mode}); "
        "proxy/rrhf: key=value overrides of their section as a mapping, e.g. {total_timesteps: 20000}"))
    entry: str | None = field(default=None, metadata=_help(
        "custom only: 'module:Class' of a Decoder (generate(prompts, max_new_tokens=, seed=)) or a "
        "PolicyAgent (predict(obs, action_masks, deterministic)) played on TokenAccept-v0"))

    def __post_init__(self) -> None:
        if not self.name or any(c in self.name for c in "/\\ ") or self.name.startswith("."):
            raise ValueError(f"method name {self.name!r}; expected a non-empty name without spaces or slashes "
                             "(it names the records file).")
        if self.kind not in METHOD_KINDS:
            raise ValueError(f"method {self.name!r}: kind={self.kind!r} is unknown.{did_you_mean(self.kind, METHOD_KINDS)} "
                             f"Expected one of {list(METHOD_KINDS)}.")
        if (self.kind == "custom") != (self.entry is not None):
            raise ValueError(f"method {self.name!r}: entry='module:Class' is required for kind 'custom' and only "
                             f"for it (got kind={self.kind!r}, entry={self.entry!r}).")
        if self.entry is not None and ":" not in self.entry:
            raise ValueError(f"method {self.name!r}: entry={self.entry!r}; expected 'module:Class', e.g. "
                             "'my_package.agents:MyAgent'.")


@dataclass(frozen=True)
class SweepConfig:
    """The paper's hyper-parameter study of the proxy (Proxy-RLHF Fig. 3, Table 2)."""

    p_t: tuple[float, ...] = field(default=(0.1, 0.01, 0.001, 0.0001), metadata=_help("SKAM thresholds swept"))
    temperature: tuple[float, ...] = field(default=(0.25, 0.5, 0.75, 1.0), metadata=_help("temperatures swept"))
    total_timesteps: int | None = field(default=None, metadata=_help(
        "proxy training steps per point (null = train.total_timesteps)"))
    seeds: tuple[int, ...] = field(default=(0,), metadata=_help(
        "training seeds per point (train.seed); a point pools the episodes of all its seeds and reports the "
        "spread of the per-seed means (PPO runs differ by seed more than by many settings)"))
    tag: str | None = field(default=None, metadata=_help(
        "suffix of the sweep's output names, keeping variants apart: e.g. `--sweep p_t train.env.top_p=1.0 "
        "bench.sweep.tag=top_p1` writes sweep_p_t-top_p1.*"))

    def __post_init__(self) -> None:
        if not self.p_t or any(not 0 <= v < 1 for v in self.p_t):
            raise ValueError(f"sweep.p_t={list(self.p_t)}; expected values in [0, 1).")
        if not self.temperature or any(not v > 0 for v in self.temperature):
            raise ValueError(f"sweep.temperature={list(self.temperature)}; expected values > 0.")
        if self.total_timesteps is not None and self.total_timesteps < 1:
            raise ValueError(f"sweep.total_timesteps={self.total_timesteps}; expected a positive int or null.")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"sweep.seeds={list(self.seeds)}; expected distinct seeds, at least one.")
        if self.tag is not None and (not self.tag or any(c in self.tag for c in "/\\ ")):
            raise ValueError(f"sweep.tag={self.tag!r}; expected a name without spaces or slashes, or null.")


@dataclass(frozen=True)
class BenchConfig:
    """What the suite runs and where it writes. The LM, reward model, held-out prompts and response
    budget come from `train.env` (one source for every method)."""

    suite: str = field(default="tiny", metadata=_help("results go to <results_dir>/<suite>/"))
    methods: tuple[MethodConfig, ...] = field(default=(), metadata=_help("the leaderboard's rows, in order"))
    num_prompts: int | None = field(default=None, metadata=_help(
        "a seeded sample of this many held-out prompts (null = all of train.env.eval_prompts)"))
    seed: int = field(default=0, metadata=_help("seed of prompt sampling and of every sampling method"))
    batch_size: int = field(default=16, metadata=_help("prompts decoded side by side (env rows for RL agents)"))
    gold: Literal["auto", "world", "none"] = field(default="auto", metadata=_help(
        "gold judge: 'auto' = the embedded world's when the LM is the world's; 'world' = always; 'none'"))
    coherence_encoder: str | None = field(default=None, metadata=_help(
        "sentence encoder for coherence (hub name or dir, mean-pooled); null = the suite's LM, mean-pooled"))
    sweep: SweepConfig = field(default_factory=SweepConfig, metadata=_help("the proxy's p_t / temperature sweeps"))
    results_dir: str = field(default="benchmarks/results", metadata=_help("root of the result folders"))
    runs_dir: str = field(default="runs", metadata=_help(
        "where trained proxies / RRHF models go (<runs_dir>/bench-<suite>/<name>-<config hash>); reused when "
        "the config is unchanged"))
    torch_threads: int | None = field(default=1, metadata=_help(
        "torch CPU threads (1 is fastest for the world's small models on 2 cores; null = torch's default)"))
    wandb_mode: Literal["offline", "online", "disabled"] = field(default="offline", metadata=_help(
        "wandb logging of the leaderboard table and plots (offline needs no network)"))
    wandb_project: str = field(default="llm_envs-bench", metadata=_help("wandb project"))
    progress: bool = field(default=True, metadata=_help("progress bars on stderr"))

    def __post_init__(self) -> None:
        if not self.suite or any(c in self.suite for c in "/\\ "):
            raise ValueError(f"suite={self.suite!r}; expected a name without spaces or slashes.")
        if not self.methods:
            raise ValueError("bench.methods is empty; list at least one method (see configs/tiny.yaml).")
        names = [m.name for m in self.methods]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"bench.methods repeats the name(s) {repeated}; give every row its own name.")
        if self.num_prompts is not None and self.num_prompts < 1:
            raise ValueError(f"bench.num_prompts={self.num_prompts}; expected a positive int or null.")
        if self.batch_size < 1:
            raise ValueError(f"bench.batch_size={self.batch_size}; expected a positive int.")
        if self.torch_threads is not None and self.torch_threads < 1:
            raise ValueError(f"bench.torch_threads={self.torch_threads}; expected a positive int or null.")

    def method(self, name: str) -> MethodConfig:
        for m in self.methods:
            if m.name == name:
                return m
        names = [m.name for m in self.methods]
        raise ConfigError(f"method {name!r} is not in bench.methods.{did_you_mean(name, names)} Known: {names}.")


@dataclass(frozen=True)
class SuiteConfig:
    """A whole suite file: `bench:`, `train:` (the proxy) and `rrhf:` sections."""

    bench: BenchConfig = field(default_factory=BenchConfig, metadata=_help("the suite"))
    train: TrainConfig = field(default_factory=TrainConfig, metadata=_help("the proxy's training run"))
    rrhf: RRHFConfig = field(default_factory=RRHFConfig, metadata=_help("RRHF's run"))

    def __post_init__(self) -> None:
        # Every method must face the same LM and reward model, or the leaderboard compares nothing.
        env, rrhf = self.train.env, self.rrhf
        if any(m.kind == "rrhf" for m in self.bench.methods) and (rrhf.lm, rrhf.reward) != (env.lm, env.reward):
            raise ValueError(
                f"rrhf.lm / rrhf.reward ({rrhf.lm!r}, {rrhf.reward!r}) differ from train.env.lm / train.env.reward "
                f"({env.lm!r}, {env.reward!r}); every method of a suite must use one LM and one reward model. "
                "Set them equal (null = the embedded world's)."
            )

    @property
    def results_path(self) -> Path:
        return Path(self.bench.results_dir) / self.bench.suite


def load_suite_config(
    path: str | os.PathLike, overrides: Sequence[str] = (), *, quick: bool = False
) -> SuiteConfig:
    """Defaults <- the YAML file <- its `quick:` overrides (with `quick=True`) <- `overrides`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist; pass an existing YAML file "
                          "(e.g. configs/tiny.yaml).")
    data: Any = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a YAML mapping with bench:, train: and rrhf: sections.")
    quick_overrides = data.get("quick") or []
    if quick and not quick_overrides:
        raise ConfigError(f"{path} has no 'quick:' list of overrides, so --quick has nothing to apply; add one "
                          "(see configs/tiny.yaml).")
    applied = [*(quick_overrides if quick else []), *overrides]
    cfg = load_config(SuiteConfig, path, applied, section=None, ignore=("quick",))
    if quick:
        cfg = replace(cfg, bench=replace(cfg.bench, suite=f"{cfg.bench.suite}-quick"))
    return cfg
