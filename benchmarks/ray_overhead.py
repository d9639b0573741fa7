"""What the Ray env workers cost per step: the local vector env vs the Ray env, measured side by side.

For each model -- the embedded world's SFT LM and a GPT-2-small-shaped (~124M parameter) model with
random weights (built as `benchmarks.throughput` builds it) -- and each N, three envs of
TokenAccept-v0 with N rows are stepped in one process:

- ``local``: `make_vector_env(env_id, N)`, one batched core in this process;
- ``ray_1x``: `make_ray_vector_env(env_id, N, num_workers=1)`, one Ray actor holding the same N rows:
  the same compute as ``local`` plus what Ray adds (sending the actions, pickling the results, the
  driver concatenating them);
- ``ray_2x``: `make_ray_vector_env(env_id, N, num_workers=2)`, two actors of N/2 rows each, stepping
  concurrently (with two free cores the halves compute in parallel).

All three are seeded alike and stepped with the same random valid actions (reject with probability
1/2 where SKAM allows it, as `benchmarks.throughput`), so row i follows the same trajectory in each
(the Ray env's contract) and each times the same work, autoresets included. The reward is a callable
returning zeros (`benchmarks.throughput.zero_reward`), so reward-model time is not measured. Every
process (this one and each actor) runs one torch thread.

Timing: ``time.perf_counter`` around `steps` vector steps (action masks, action sampling and the step),
after `warmup` steps; the three take turns for `rounds` rounds and each keeps its best round (load from
other processes only slows a round down); every round is kept in the JSON.

Reported per model and N: ms per vector step of each env; ``overhead_ms`` = ray_1x - local (Ray's
cost per step, the compute being equal) and ``overhead_share`` = overhead_ms / ray_1x (its share of a
Ray step); ``split_ms`` = ray_2x - local and ``split_share`` = split_ms / ray_2x (two actors against one
local core: the overhead net of whatever the parallel halves win back; negative when they win).

``--quick`` (a smoke run, seconds): N = 4, 4 timed steps after 1 warm-up, one round, 16-token episodes,
and a 2-layer 64-wide GPT-2 in place of the 124M shape (same code path). Only the full run is a
measurement.

    python -m benchmarks.ray_overhead                   # world LM and 124M at N = 16 and 64 (a few minutes)
    python -m benchmarks.ray_overhead --quick --world test
    python -m benchmarks.ray_overhead --num-envs 64 --models gpt2-124m --json
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from benchmarks.provenance import provenance
from benchmarks.throughput import make_random_gpt2, zero_reward

ENV_ID = "llm_envs/TokenAccept-v0"
ENVS = ("local", "ray_1x", "ray_2x")
MODEL_CHOICES = ("world", "gpt2-124m")
QUICK_GPT2 = dict(n_embd=64, n_layer=2, n_head=2)  # --quick: the 124M code path at toy size


@dataclass(frozen=True)
class Settings:
    """One run's measurement settings; `quick_preset()` is the smoke run."""

    num_envs: tuple[int, ...] = (16, 64)
    steps: int = 32  # timed vector steps per round
    warmup: int = 4  # steps after reset, before the first round
    rounds: int = 3
    max_new_tokens: int = 64
    p_t: float = 0.01
    top_p: float = 0.9
    seed: int = 0
    threads: int = 1  # torch threads of this process and of each actor
    quick: bool = False
    gpt2: dict[str, int] = field(default_factory=dict)  # GPT2Config overrides (none: the 124M shape)

    def __post_init__(self) -> None:
        if not self.num_envs or any(n < 2 or n % 2 for n in self.num_envs):
            raise ValueError(f"num_envs={self.num_envs}; expected even N >= 2 (the 2-actor env holds N/2 rows each).")
        if self.steps < 1 or self.warmup < 0 or self.rounds < 1:
            raise ValueError(f"steps={self.steps}, warmup={self.warmup}, rounds={self.rounds}; expected steps >= 1, "
                             "warmup >= 0, rounds >= 1.")

    @classmethod
    def quick_preset(cls, **overrides: Any) -> Settings:
        base: dict[str, Any] = dict(num_envs=(4,), steps=4, warmup=1, rounds=1, max_new_tokens=16, quick=True,
                                    gpt2=QUICK_GPT2)
        return cls(**{**base, **overrides})


class Stepper:
    """Steps one vector env with the benchmark's random valid actions; `segment()` times `steps` steps."""

    def __init__(self, venv: Any, settings: Settings) -> None:
        self.venv, self.settings = venv, settings
        self.rng = np.random.default_rng(settings.seed)  # the same stream in every env: the same trajectories
        venv.reset(seed=settings.seed)
        for _ in range(settings.warmup):
            self.step()

    def step(self) -> None:
        masks = self.venv.action_masks()
        actions = self.rng.integers(0, 2, size=self.venv.num_envs)
        actions[~masks[:, 1]] = 0
        self.venv.step(actions)

    def segment(self) -> float:
        """Seconds per vector step over one timed stretch."""
        start = time.perf_counter()
        for _ in range(self.settings.steps):
            self.step()
        return (time.perf_counter() - start) / self.settings.steps


def env_kwargs(lm: str | os.PathLike, prompts: list[str], settings: Settings) -> dict[str, Any]:
    """The TokenAccept keywords of all three envs (the LM as a directory: each actor loads its own copy)."""
    return dict(lm=str(lm), reward=zero_reward, prompts=prompts, max_new_tokens=settings.max_new_tokens,
                p_t=settings.p_t, top_p=settings.top_p, device="cpu", dtype="float32")


def measure(name: str, lm: str | os.PathLike, prompts: list[str], settings: Settings,
            log: Callable[[str], None]) -> list[dict[str, Any]]:
    """The three envs of `lm` at every N, taking turns; one row per N."""
    from llm_envs.vector import make_ray_vector_env, make_vector_env

    rows = []
    for n in settings.num_envs:
        kwargs = env_kwargs(lm, prompts, settings)
        envs = {"local": make_vector_env(ENV_ID, n, **kwargs),
                "ray_1x": make_ray_vector_env(ENV_ID, n, num_workers=1, torch_threads=settings.threads, **kwargs),
                "ray_2x": make_ray_vector_env(ENV_ID, n, num_workers=2, torch_threads=settings.threads, **kwargs)}
        try:
            steppers = {key: Stepper(env, settings) for key, env in envs.items()}
            rounds = [{key: stepper.segment() * 1e3 for key, stepper in steppers.items()}
                      for _ in range(settings.rounds)]
        finally:
            for env in envs.values():
                env.close()
        best = {key: min(r[key] for r in rounds) for key in ENVS}
        params = sum(p.numel() for p in envs["local"].core.ctx.model.parameters())
        row = {"model": name, "params": params, "num_envs": n, **{f"{key}_ms": best[key] for key in ENVS},
               "overhead_ms": best["ray_1x"] - best["local"], "split_ms": best["ray_2x"] - best["local"],
               "rounds_ms": rounds}
        row["overhead_share"] = row["overhead_ms"] / best["ray_1x"]
        row["split_share"] = row["split_ms"] / best["ray_2x"]
        rows.append(row)
        log(f"{name:<10} N={n:<3} local {best['local']:8.2f} ms  ray 1x{n} {best['ray_1x']:8.2f} ms  "
            f"ray 2x{n // 2} {best['ray_2x']:8.2f} ms  overhead {row['overhead_ms']:+.2f} ms "
            f"({row['overhead_share']:.0%} of the Ray step)")
    return rows


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"Ray env workers vs the local env, ms per vector step of TokenAccept-v0 ({report['settings']['steps']} "
        f"steps x best of {report['settings']['rounds']} rounds; {report['provenance']['hardware'].get('cpu_count')} "
        "CPUs, one torch thread per process)",
        "",
        "| model | N | local | Ray 1 actor x N | Ray 2 actors x N/2 | overhead (1 actor - local) | "
        "its share of the Ray step | 2 actors - local | its share |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        lines.append(f"| {r['model']} ({r['params'] / 1e6:.1f}M) | {r['num_envs']} | {r['local_ms']:.2f} | "
                     f"{r['ray_1x_ms']:.2f} | {r['ray_2x_ms']:.2f} | {r['overhead_ms']:+.2f} | "
                     f"{r['overhead_share']:.0%} | {r['split_ms']:+.2f} | {r['split_share']:.0%} |")
    return "\n".join(lines)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run (seconds): see the module doc")
    parser.add_argument("--num-envs", type=int, nargs="+", default=None, help="N values (even; default 16 64)")
    parser.add_argument("--models", nargs="+", default=list(MODEL_CHOICES), choices=list(MODEL_CHOICES))
    parser.add_argument("--steps", type=int, default=None, help="timed vector steps per round")
    parser.add_argument("--rounds", type=int, default=None, help="rounds (each env keeps its best)")
    parser.add_argument("--world", default="default", help="embedded world preset whose LM and prompts are used")
    parser.add_argument("--cache-dir", default=None, help="where the world is (default: $LLM_ENVS_CACHE)")
    parser.add_argument("--json", action="store_true", help="print the JSON report (progress goes to stderr)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = _parse(argv)
    overrides = {key: value for key, value in (("num_envs", tuple(args.num_envs or ())), ("steps", args.steps),
                                               ("rounds", args.rounds)) if value}
    settings = Settings.quick_preset(**overrides) if args.quick else Settings(**overrides)
    log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if args.json else (lambda msg: print(msg, flush=True))
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # the actors (started below) inherit it
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    torch.set_num_threads(settings.threads)

    from llm_envs.models import load_tokenizer
    from llm_envs.vector.ray_workers import ray_session
    from llm_envs.world import load_world

    world = load_world(args.world, cache_dir=args.cache_dir)
    prompts = list(world.train_prompts)
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    models: dict[str, str] = {}
    with ray_session(min_cpus=3), tempfile.TemporaryDirectory(prefix="llm_envs_ray_overhead_") as tmp:
        if "world" in args.models:
            models["world"] = f"the {args.world} world's SFT LM ({Path(world.lm_dir).parent.name})"
            rows += measure("world", world.lm_dir, prompts, settings, log)
        if "gpt2-124m" in args.models:
            name = "gpt2-tiny" if settings.gpt2 else "gpt2-124m"
            gpt2 = make_random_gpt2(tmp, load_tokenizer(world.lm_dir), seed=settings.seed, **settings.gpt2)
            models[name] = (f"GPT2Config({settings.gpt2 or 'defaults: n_embd 768, 12 layers, 12 heads'}), random "
                            f"init with torch.manual_seed({settings.seed}), the world tokenizer; loaded by each env "
                            "through lm=<dir>")
            rows += measure(name, gpt2, prompts, settings, log)
    given = sys.argv[1:] if argv is None else argv
    command = "python -m benchmarks.ray_overhead" + (" " + shlex.join(given) if given else "")
    report = {"benchmark": "ray_overhead", "unit": "ms per vector step (N rows)", "settings": asdict(settings),
              "models": models, "rows": rows,
              "provenance": provenance(command=command, wall_seconds=time.perf_counter() - started)}
    print(json.dumps(report, indent=2) if args.json else markdown(report))
    return report


if __name__ == "__main__":
    main()
