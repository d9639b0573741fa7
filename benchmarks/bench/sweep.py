"""The proxy's hyper-parameter study (Proxy-RLHF §4.3, Fig. 3, Table 2, appendix C):
`llm-envs bench --sweep p_t` / `--sweep temperature`.

One proxy is trained per value and seed (`bench.sweep.seeds`; everything else from the suite's
`train:` section, steps from `bench.sweep.total_timesteps`) and evaluated on the suite's held-out
prompts with the suite's reward wrapper; a value's row pools its seeds' episodes. Each proxy's per-episode records go to `<suite>/sweep_<param>/records/`; the table
(`sweep_<param>.json`, `.md`) and the plot (`sweep_<param>.png`) are computed from them. The paper
finds reward rising as p_t falls and as temperature rises, with irregular (repetitive) outputs at
p_t <= 0.001; `irregular_rate` checks the latter.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from typing import Any

import numpy as np
import torch

from benchmarks.bench.config import SWEEPS, MethodConfig, SuiteConfig
from benchmarks.bench.leaderboard import method_row, short_hash
from benchmarks.bench.plots import plot_sweep
from benchmarks.bench.records import read_method_records
from benchmarks.bench.suite import SuiteContext, run_method, suite_context
from benchmarks.provenance import provenance
from llm_envs.config import ConfigError, did_you_mean
from llm_envs.io import atomic_write_json, atomic_write_text


def _point_method(cfg: SuiteConfig, param: str, value: float, seed: int) -> MethodConfig:
    params: dict[str, Any] = {"env": {param: value}, "seed": seed}
    if cfg.bench.sweep.total_timesteps is not None:
        params["total_timesteps"] = cfg.bench.sweep.total_timesteps
    return MethodConfig(name=f"proxy-{param}-{value:g}-seed{seed}", kind="proxy", params=params)


def _point(sweep_cfg: SuiteConfig, sc: SuiteContext, param: str, value: float,
           reference: list[dict[str, Any]], verbose: bool) -> dict[str, Any]:
    """Train and evaluate one proxy per seed at `value`; the point pools their episodes."""
    episodes: list[dict[str, Any]] = []
    seed_gold, seed_reward, seconds = [], [], 0.0
    for seed in sweep_cfg.bench.sweep.seeds:
        method = _point_method(sweep_cfg, param, value, seed)
        if verbose:
            print(f"sweep {param}={value:g} seed {seed}: train + evaluate the proxy", file=sys.stderr)
        run_method(sweep_cfg, sc, method)
        mine, meta = read_method_records(sweep_cfg.results_path, method.name)
        episodes += mine
        seconds += meta["generate_seconds"]
        seed_reward.append(float(np.mean([e["reward"] for e in mine])))
        if mine[0]["gold"] is not None:
            seed_gold.append(float(np.mean([e["gold"] for e in mine])))
    row = method_row(episodes, {**meta, "name": f"proxy-{param}-{value:g}", "generate_seconds": seconds}, reference)
    row.update(value=value, seeds=list(sweep_cfg.bench.sweep.seeds), seed_reward_means=seed_reward,
               seed_gold_means=seed_gold or None, total_timesteps=meta["info"]["total_timesteps"],
               rejection_rate=float(np.mean([e["extra"]["rejections"] / max(e["extra"]["steps"], 1) for e in episodes])),
               irregular_examples=[e["response"] for e in episodes if e["irregular"]][:3])
    return row


def _greedy_reference(sc: SuiteContext, sweep_cfg: SuiteConfig) -> list[dict[str, Any]]:
    """Greedy's episodes on the suite's prompts (run into the sweep folder unless already there)."""
    records = read_method_records(sweep_cfg.results_path, "greedy")
    if records is None or records[1]["fingerprint"] != sc.fingerprint:
        run_method(sweep_cfg, sc, MethodConfig(name="greedy", kind="greedy"))
        records = read_method_records(sweep_cfg.results_path, "greedy")
    return records[0]


def sweep_markdown(param: str, points: list[dict[str, Any]], header: dict[str, Any]) -> str:
    fixed = ", ".join(f"{k}={v}" for k, v in header["env"].items() if k != param)
    greedy = f"RM {points[0]['greedy_reward']:+.2f}"
    if points[0].get("greedy_gold") is not None:
        greedy += f", gold {points[0]['greedy_gold']:+.3f}"
    seeds = points[0]["seeds"]
    world = f", world `{short_hash(header['world_hash'])}`" if header.get("world_hash") else ""
    lines = [f"# Proxy sweep over {param}: suite `{header['suite']}`", "",
             f"{header['num_prompts']} held-out prompts; {len(seeds)} {'proxy' if len(seeds) == 1 else 'proxies'} "
             f"trained per value (seeds {seeds}, "
             f"{header['total_timesteps']} steps each; the rest of the suite's train: section, {fixed}); a value's "
             f"row pools the episodes of its seeds (± = 95% CI over them). Greedy (the SFT model): {greedy}. "
             "Generated from records; do not edit.", "",
             f"| {param} | RM reward | gold | gold per seed | win vs greedy | rejection rate | irregular | diversity | length |",
             "|---:|---:|---:|---|---:|---:|---:|---:|---:|"]
    for p in points:
        gold = f"{p['gold_mean']:+.3f} ± {p['gold_ci95']:.2f}" if p.get("gold_mean") is not None else "—"
        per_seed = " / ".join(f"{g:+.2f}" for g in p["seed_gold_means"]) if p.get("seed_gold_means") else "—"
        win = f"{p['gold_win_rate_vs_greedy']:.0%}" if p.get("gold_win_rate_vs_greedy") is not None else "—"
        lines.append(f"| {p['value']:g} | {p['reward_mean']:+.2f} ± {p['reward_ci95']:.2f} | {gold} | {per_seed} | {win} | "
                     f"{p['rejection_rate']:.1%} | {p['irregular_rate']:.1%} | {p['diversity']:.3f} | {p['response_len']:.1f} |")
    trend = np.corrcoef(np.log([p["value"] for p in points]), [p["reward_mean"] for p in points])[0, 1] \
        if len(points) > 2 else float("nan")
    examples = [(p["value"], text) for p in points for text in p["irregular_examples"][:2]]
    if examples:
        lines += ["", "Irregular responses (the paper's appendix C check), up to two per value:", ""]
        lines += [f"- {param}={value:g}: `{text}`" for value, text in examples]
    lines += ["", f"Correlation of RM reward with log({param}): {trend:+.2f} (the paper: negative for p_t, positive "
              "for temperature).", "",
              f"git {header['provenance']['git_commit']}{world}, `{header['provenance']['command']}`."]
    return "\n".join(lines) + "\n"


def run_sweep(cfg: SuiteConfig, param: str, *, verbose: bool = True) -> dict[str, Any]:
    if param not in SWEEPS:
        raise ConfigError(f"--sweep {param!r} is unknown.{did_you_mean(param, SWEEPS)} Expected one of {list(SWEEPS)}.")
    if cfg.bench.torch_threads:
        torch.set_num_threads(cfg.bench.torch_threads)
    started = time.perf_counter()
    sc = suite_context(cfg)
    # The sweep's records live in <suite>/sweep_<param>[-<tag>]/, as a suite of their own.
    name = f"sweep_{param}" + (f"-{cfg.bench.sweep.tag}" if cfg.bench.sweep.tag else "")
    sweep_cfg = dataclasses.replace(cfg, bench=dataclasses.replace(
        cfg.bench, results_dir=str(cfg.results_path), suite=name))
    reference = _greedy_reference(sc, sweep_cfg)
    greedy = method_row(reference, {"name": "greedy", "kind": "greedy", "generate_seconds": 0.0}, None)
    points = []
    for value in getattr(cfg.bench.sweep, param):
        row = _point(sweep_cfg, sc, param, value, reference, verbose)
        row.update(greedy_reward=greedy["reward_mean"], greedy_gold=greedy["gold_mean"])
        points.append(row)
    env = cfg.train.env
    header = {**sc.header, "param": param, "total_timesteps": points[0]["total_timesteps"], "seeds": points[0]["seeds"],
              "env": {"top_p": env.top_p, "top_k": env.top_k, "temperature": env.temperature, "p_t": env.p_t},
              "provenance": provenance(seed=cfg.bench.seed, train_seeds=list(cfg.bench.sweep.seeds))}
    suite_dir = cfg.results_path
    atomic_write_json(suite_dir / f"{name}.json", {**header, "points": points})
    atomic_write_text(suite_dir / f"{name}.md", sweep_markdown(param, points, header))
    plot = plot_sweep(suite_dir / f"{name}.png", param, points)
    if verbose:
        print((suite_dir / f"{name}.md").read_text())
    return {"points": points, "plot": str(plot), "seconds": time.perf_counter() - started}
