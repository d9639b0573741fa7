"""A suite file: the task (`task:`, an `llm_envs.task.Task`: LM, reward model, prompts, gold judge,
budget, device), the leaderboard (`bench:`), the proxy's training run (`train:`, an
`agents.configs.TrainConfig`) and RRHF's run (`rrhf:`, an `agents.rrhf.config.RRHFConfig`). Every
method reads its LM, reward model, prompts and budget from the one `task:`.

    cfg = load_suite_config("tiny", ["bench.num_prompts=48"], quick=False)   # a shipped suite or a path

`quick: [key=value, ...]` in the file lists the overrides of the `--quick` variant (applied before
the command line's); the quick suite writes to `<suite>-quick` so it never overwrites full results.
"""

from __future__ import annotations

import dataclasses
import math
import os
import textwrap
import typing
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Sequence


from agents.configs import TrainConfig
from agents.metric_rules import MetricRules
from agents.rrhf.config import RRHFConfig
from benchmarks.suites import suite_path
from llm_envs.config import ConfigError, did_you_mean, from_dict, parse_override, read_yaml, set_key, to_dict
from llm_envs.task import Task

METHOD_KINDS = ("greedy", "top_k", "nucleus", "best_of_n", "args", "proxy", "choice_proxy", "rrhf", "custom")
SWEEPS = ("p_t", "temperature", "best_of_n", "args_w")
TRAINED_KINDS = ("proxy", "choice_proxy", "rrhf")  # a seed is their training seed (train.seed / rrhf.seed)


def _help(text: str) -> dict[str, str]:
    return {"help": text}


# A run with seed s samples with harness seed s * 1_000_000 (benchmarks.bench.seeds), which must stay below
# 2**32: torch's CPU generator keeps only a seed's low 32 bits.
MAX_SEED = 4294


def check_seeds(where: str, seeds: Sequence[int]) -> None:
    """Seeds are distinct ints in [0, MAX_SEED], at least one (numpy's generators refuse negative seeds)."""
    if not seeds or len(set(seeds)) != len(seeds) or any(not 0 <= s <= MAX_SEED for s in seeds):
        raise ValueError(f"{where}={list(seeds)}; expected distinct non-negative int seeds up to {MAX_SEED}, at "
                         "least one, e.g. [0, 1, 2].")


@dataclass(frozen=True)
class MethodConfig:
    """One leaderboard row: a method and its settings."""

    name: str = field(metadata=_help("row name on the leaderboard (also the records' file name)"))
    kind: str = field(metadata=_help(
        "greedy | top_k | nucleus | best_of_n (agents.decoding), args (agents.args.ARGS), proxy (MaskablePPO "
        "trained with the train: section), choice_proxy (MaskablePPO on TokenChoice-v0 with the train: "
        "section's policy and PPO), rrhf (trained with the rrhf: section), custom (an importable class)"))
    params: dict = field(default_factory=dict, metadata=_help(
        "keyword arguments of the method's class (e.g. {top_k: 40, temperature: 0.7}; ARGS: {k, w, mode}); "
        "proxy/rrhf: key=value overrides of their section as a mapping, e.g. {total_timesteps: 20000} or "
        "{env: {decision_mask: entropy, entropy_threshold: 1.0}}; choice_proxy: the same over the train: "
        "section with env = TokenChoiceParams, e.g. {env: {k: 10, obs_rewards: true}}"))
    entry: str | None = field(default=None, metadata=_help(
        "custom only: 'module:Class' of a Decoder (generate(prompts, max_new_tokens=, seed=)) or a "
        "PolicyAgent (predict(obs, action_masks, deterministic)) played on TokenAccept-v0"))
    seeds: tuple[int, ...] | None = field(default=None, metadata=_help(
        "this row's seeds (null = bench.seeds): a trained method (proxy, rrhf, a custom class that takes `seed`) "
        "trains one model per seed and samples its evaluation with it; a sampling method samples once per seed; "
        "a deterministic method (greedy, ARGS greedy) runs once, with the first"))

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
        if self.seeds is not None:
            check_seeds(f"method {self.name!r}: seeds", self.seeds)
        if self.kind in TRAINED_KINDS and "seed" in self.params and self.seeds != (self.params["seed"],):
            raise ValueError(f"method {self.name!r}: params.seed={self.params['seed']!r}; a trained method's "
                             f"training seed is each of its seeds. Write seeds: [{self.params['seed']}] instead.")


@dataclass(frozen=True)
class SweepConfig:
    """The proxy's hyper-parameter study (Proxy-RLHF Fig. 3, Table 2) and the over-optimisation sweeps
    (best-of-n's n, ARGS's w: RM reward and gold side by side)."""

    p_t: tuple[float, ...] = field(default=(0.1, 0.01, 0.001, 0.0001), metadata=_help("SKAM thresholds swept"))
    temperature: tuple[float, ...] = field(default=(0.25, 0.5, 0.75, 1.0), metadata=_help("temperatures swept"))
    total_timesteps: int | None = field(default=None, metadata=_help(
        "proxy training steps per point (null = train.total_timesteps)"))
    best_of_n: tuple[int, ...] = field(default=(1, 2, 4, 8, 16, 32, 64), metadata=_help(
        "n values of --sweep best_of_n: max(n) nucleus samples are drawn once per prompt and seed, and best-of-k "
        "picks among the first k (the candidates are nested), so the grid costs one best-of-max(n) draw"))
    best_of_n_top_p: float = field(default=1.0, metadata=_help(
        "top_p of the best-of-n sweep's samples (1.0 = plain sampling, as the leaderboard's best_of rows)"))
    best_of_n_temperature: float = field(default=1.0, metadata=_help("temperature of the best-of-n sweep's samples"))
    args_w: tuple[float, ...] = field(default=(0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0, 8.0), metadata=_help(
        "reward weights w of --sweep args_w (ARGS-greedy: argmax over the top-k of logit + w * RM; w = 0 is "
        "greedy decoding)"))
    args_k: int = field(default=10, metadata=_help("candidates per step k of the ARGS-greedy w sweep (the paper's 10)"))
    seeds: tuple[int, ...] = field(default=(0,), metadata=_help(
        "seeds per point: the proxy sweeps (p_t, temperature) train one proxy per seed (train.seed) and sample "
        "its evaluation with it; the best-of-n sweep samples once per seed; ARGS-greedy is deterministic and "
        "runs once. A point is the mean over its seeds' means, with their spread (PPO runs differ by seed more "
        "than by many settings)"))
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
        check_seeds("sweep.seeds", self.seeds)
        if not self.best_of_n or len(set(self.best_of_n)) != len(self.best_of_n) or min(self.best_of_n) < 1:
            raise ValueError(f"sweep.best_of_n={list(self.best_of_n)}; expected distinct positive ints, e.g. "
                             "[1, 2, 4, 8, 16, 32, 64].")
        if not 0 < self.best_of_n_top_p <= 1 or not self.best_of_n_temperature > 0:
            raise ValueError(f"sweep.best_of_n_top_p={self.best_of_n_top_p}, best_of_n_temperature="
                             f"{self.best_of_n_temperature}; expected top_p in (0, 1] and a temperature > 0.")
        if not self.args_w or len(set(self.args_w)) != len(self.args_w) or not all(map(math.isfinite, self.args_w)):
            raise ValueError(f"sweep.args_w={list(self.args_w)}; expected distinct finite weights, e.g. [0, 1.5, 3].")
        if self.args_k < 1:
            raise ValueError(f"sweep.args_k={self.args_k}; expected a positive int (the paper's 10).")
        if self.tag is not None and (not self.tag or any(c in self.tag for c in "/\\ ")):
            raise ValueError(f"sweep.tag={self.tag!r}; expected a name without spaces or slashes, or null.")


@dataclass(frozen=True)
class BenchConfig:
    """What the suite runs and where it writes. The LM, reward model, held-out prompts, gold judge and
    response budget come from the suite's `task:` (one source for every method)."""

    suite: str = field(default="tiny", metadata=_help("results go to <results_dir>/<suite>/"))
    methods: tuple[MethodConfig, ...] = field(default=(), metadata=_help("the leaderboard's rows, in order"))
    num_prompts: int | None = field(default=None, metadata=_help(
        "a seeded sample of this many held-out prompts (null = all of task.eval_prompts)"))
    seed: int = field(default=0, metadata=_help(
        "seed of the held-out prompt sample (bench.num_prompts); part of the records' fingerprint. The methods' "
        "seeds are bench.seeds"))
    seeds: tuple[int, ...] = field(default=(0,), metadata=_help(
        "every row's seeds unless the row sets its own (methods[].seeds): trained methods (proxy, rrhf, a custom "
        "class that takes `seed`) train one model per seed (seed s = train.seed / rrhf.seed / seed=s, so its own "
        "run directory) and sample their "
        "evaluation with it; sampling methods (top_k, nucleus, best_of_n, ARGS stochastic) sample once per seed; "
        "greedy and ARGS greedy run once. A row is the mean over seeds of each seed's mean, with their spread"))
    batch_size: int = field(default=16, metadata=_help("prompts decoded side by side (env rows for RL agents)"))
    coherence_encoder: str | None = field(default=None, metadata=_help(
        "sentence encoder for coherence (hub name or dir; pooled as bench.metrics.coherence_pooling says); null = "
        "the suite's LM, mean-pooled"))
    protocol: str | None = field(default=None, metadata=_help(
        "the published evaluation protocol the suite follows (e.g. 'ARGS (Khanov et al. 2024)'), written into "
        "leaderboard.md/.json and the records' fingerprint: rows of different protocols are not comparable"))
    metrics: MetricRules = field(default_factory=MetricRules, metadata=_help(
        "the protocol's metric rules beyond the reward wrapper (agents/metric_rules.py): skip-and-count of long "
        "reward-model inputs, the stop strings of diversity and coherence, diversity's word tokenizer, "
        "coherence's pooling and truncation"))
    sweep: SweepConfig = field(default_factory=SweepConfig, metadata=_help(
        "llm-envs bench --sweep p_t | temperature (the proxy) | best_of_n | args_w (over-optimisation)"))
    results_dir: str = field(default="results", metadata=_help(
        "root of the result folders, relative to the current directory (`--out DIR` sets it)"))
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
        names = [m.name for m in self.methods]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"bench.methods repeats the name(s) {repeated}; give every row its own name.")
        if self.num_prompts is not None and self.num_prompts < 1:
            raise ValueError(f"bench.num_prompts={self.num_prompts}; expected a positive int or null.")
        if self.batch_size < 1:
            raise ValueError(f"bench.batch_size={self.batch_size}; expected a positive int.")
        check_seeds("bench.seeds", self.seeds)
        if self.torch_threads is not None and self.torch_threads < 1:
            raise ValueError(f"bench.torch_threads={self.torch_threads}; expected a positive int or null.")
        if self.protocol is not None and (not isinstance(self.protocol, str) or not self.protocol.strip()):
            raise ValueError(f"bench.protocol={self.protocol!r}; expected a non-empty name of the protocol, or null.")
        if self.metrics.coherence_pooling == "pooler" and self.coherence_encoder is None:
            raise ValueError("bench.metrics.coherence_pooling='pooler' but bench.coherence_encoder is null (the LM, "
                             "which has no pooler); name a sentence encoder with one (ARGS: "
                             "princeton-nlp/sup-simcse-bert-base-uncased) or use pooling 'mean'.")

    def method(self, name: str) -> MethodConfig:
        for m in self.methods:
            if m.name == name:
                return m
        names = [m.name for m in self.methods]
        raise ConfigError(f"method {name!r} is not in bench.methods.{did_you_mean(name, names)} Known: {names}.")


@dataclass(frozen=True)
class SuiteConfig:
    """A whole suite file: `task:`, `bench:`, `train:` (the proxy) and `rrhf:` sections."""

    task: Task = field(default_factory=Task, metadata=_help("what every method is run and scored on"))
    bench: BenchConfig = field(default_factory=BenchConfig, metadata=_help("the suite"))
    train: TrainConfig = field(default_factory=TrainConfig, metadata=_help("the proxy's training run"))
    rrhf: RRHFConfig = field(default_factory=RRHFConfig, metadata=_help("RRHF's run"))

    def __post_init__(self) -> None:
        # The response budget is the task's; the proxy's env must not say otherwise.
        if self.train.env.max_new_tokens != self.task.max_new_tokens:
            raise ValueError(
                f"train.env.max_new_tokens={self.train.env.max_new_tokens} differs from task.max_new_tokens="
                f"{self.task.max_new_tokens}; every method decodes with the task's budget. Set task.max_new_tokens "
                "and leave train.env.max_new_tokens out (it is filled in from the task)."
            )

    @property
    def results_path(self) -> Path:
        return Path(self.bench.results_dir) / self.bench.suite


def load_suite_config(
    config: str | os.PathLike = "tiny", overrides: Sequence[str] = (), *, quick: bool = False
) -> SuiteConfig:
    """Defaults <- the suite file (a shipped suite's name or a path) <- its `quick:` overrides (with
    `quick=True`) <- `overrides` (`section.key=value`)."""
    path = suite_path(config)
    data: Any = read_yaml(path) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a YAML mapping with task:, bench:, train: and rrhf: sections.")
    quick_overrides = data.pop("quick", None) or []
    if quick and not quick_overrides:
        raise ConfigError(f"{path} has no 'quick:' list of overrides, so --quick has nothing to apply; add one "
                          "(see `llm-envs config path tiny`).")
    for text in [*(quick_overrides if quick else []), *overrides]:
        keys, value = parse_override(text)
        set_key(data, keys, value, f"override {text!r}")
    # The proxy's env decodes with the task's budget unless the file says otherwise (then it must agree).
    task, train = data.get("task") or {}, data.get("train") or {}
    if isinstance(task, dict) and isinstance(train, dict) and isinstance(train.get("env") or {}, dict):
        env = train["env"] = train.get("env") or {}
        env.setdefault("max_new_tokens", task.get("max_new_tokens", Task.max_new_tokens))
        data["train"] = train
    cfg = from_dict(SuiteConfig, data, where=str(path))
    if quick:
        cfg = replace(cfg, bench=replace(cfg.bench, suite=f"{cfg.bench.suite}-quick"))
    return cfg


def describe_config(cfg: Any, prefix: str) -> list[str]:
    """One line per field: `prefix.name = value` (and the default when it differs), then its help."""
    lines: list[str] = []
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value, name = getattr(cfg, f.name), f"{prefix}.{f.name}"
        if dataclasses.is_dataclass(value):
            lines.append(f"{name}:  # {f.metadata.get('help', '')}")
            lines.extend(describe_config(value, name))
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)  # type: ignore[misc]
        shown = to_dict(cfg)[f.name]
        changed = "" if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING else (
            f"  (default: {default!r})" if value != default else "")
        hint = hints[f.name]
        kind = hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")
        lines.append(f"{name} = {shown!r}{changed}   [{kind}]")
        if f.metadata.get("help"):
            lines.extend(textwrap.wrap(f.metadata["help"], 100, initial_indent="    ", subsequent_indent="    "))
        item = next(iter(typing.get_args(hint)), None)
        if typing.get_origin(hint) is tuple and dataclasses.is_dataclass(item):
            lines.extend(describe_fields(item, f"{name}[]"))  # what each item (e.g. a method row) may set
    return lines


def describe_fields(cls: type, prefix: str) -> list[str]:
    """One line per field of a dataclass type (its type, default and help), for list items."""
    lines = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        kind = hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")
        default = "" if f.default is dataclasses.MISSING else f" (default: {f.default!r})"
        lines.append(f"  {prefix}.{f.name}{default}   [{kind}]")
        if f.metadata.get("help"):
            lines.extend(textwrap.wrap(f.metadata["help"], 100, initial_indent="      ", subsequent_indent="      "))
    return lines


def describe_suite_config(cfg: SuiteConfig, sections: Sequence[str] = ()) -> str:
    """`llm-envs config show`: every field of the suite (or of `sections`) with its value and help."""
    names = [f.name for f in dataclasses.fields(cfg)]
    for section in sections:
        if section not in names:
            raise ConfigError(f"section {section!r} is unknown.{did_you_mean(section, names)} Sections: {names}.")
    lines = []
    for name in sections or names:
        section = getattr(cfg, name)
        lines += [f"# {name}: {type(section).__doc__.strip().splitlines()[0]}", *describe_config(section, name), ""]
    return "\n".join(lines)
