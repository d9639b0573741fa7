"""The sweeps of `llm-envs bench --sweep NAME`, each written to `<suite>/sweep_<NAME>[-<tag>].json`, `.md`
and `.png`, with its records in `<suite>/sweep_<NAME>[-<tag>]/records/` (a suite folder of its own):

- `p_t`, `temperature`: the proxy's hyper-parameter study (Proxy-RLHF §4.3, Fig. 3, Table 2, appendix
  C). One proxy is trained per value and seed (`bench.sweep.seeds`; everything else from the suite's
  `train:` section, steps from `bench.sweep.total_timesteps`) and evaluated on the suite's held-out
  prompts with the suite's reward wrapper. The paper finds reward rising as p_t falls and as
  temperature rises, with irregular (repetitive) outputs at p_t <= 0.001; `irregular_rate` checks
  the latter.
- `best_of_n`, `args_w`: over-optimisation (reward hacking in plain sight). Mean RM reward and mean
  gold side by side against best-of-n's n (`bench.sweep.best_of_n`) and ARGS-greedy's reward weight w
  (`bench.sweep.args_w`): when pushing harder on the reward model stops paying in gold, gold peaks
  before RM does. Best-of-n samples once: max(n) candidates per prompt and seed
  (`BestOfNDecoder(keep_candidates=True)`, whose candidates are nested), every candidate scored by the
  suite's reward wrapper and gold judge; best-of-k picks among the first k. Both reuse their records
  on a rerun while the suite settings and the point's settings are unchanged.

A point aggregates its seeds as a leaderboard row does (`benchmarks.bench.seeds.seed_stat`: mean of
the seed means, 95% CI over prompts, seed-to-seed sd).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from typing import Any, Callable

import numpy as np
import torch

from agents.decoding import best_index
from agents.harness import generate_all
from benchmarks.bench.config import SWEEPS, MethodConfig, SuiteConfig
from benchmarks.bench.leaderboard import add_ranks, method_row, short_hash, with_spread
from benchmarks.bench.methods import decoder_rows, prepare_method
from benchmarks.bench.plots import plot_overoptimisation, plot_sweep
from benchmarks.bench.records import read_method_records, write_method_records
from benchmarks.bench.seeds import evaluation_seed, method_seeds, seed_mean, seed_stat
from benchmarks.bench.suite import SuiteContext, run_method, suite_context
from benchmarks.provenance import provenance
from llm_envs.config import ConfigError, did_you_mean
from llm_envs.io import atomic_write_json, atomic_write_text

Records = tuple[list[dict[str, Any]], dict[str, Any]]
OVEROPTIMISATION = ("best_of_n", "args_w")


def _point_method(cfg: SuiteConfig, param: str, value: float) -> MethodConfig:
    params: dict[str, Any] = {"env": {param: value}}
    if cfg.bench.sweep.total_timesteps is not None:
        params["total_timesteps"] = cfg.bench.sweep.total_timesteps
    return MethodConfig(name=f"proxy-{param}-{value:g}", kind="proxy", params=params, seeds=cfg.bench.sweep.seeds)


def _proxy_point(sweep_cfg: SuiteConfig, sc: SuiteContext, param: str, value: float, reference: list[dict[str, Any]],
                 verbose: bool) -> dict[str, Any]:
    """Train and evaluate one proxy per seed at `value`; the point is their mean (a leaderboard row)."""
    method = _point_method(sweep_cfg, param, value)
    if verbose:
        print(f"sweep {param}={value:g} seeds {list(method.seeds)}: train + evaluate the proxies", file=sys.stderr)
    run_method(sweep_cfg, sc, method)
    episodes, meta = read_method_records(sweep_cfg.results_path, method.name)
    row = method_row(episodes, meta, reference)
    row.update(value=value, total_timesteps=meta["runs"][0]["info"]["total_timesteps"],
               rejection_rate=float(np.mean([e["extra"]["rejections"] / max(e["extra"]["steps"], 1) for e in episodes])),
               irregular_examples=[e["response"] for e in episodes if e["irregular"]][:3])
    return row


def _records_match(meta: dict[str, Any], sc: SuiteContext, method: MethodConfig, sweep_cfg: SuiteConfig) -> bool:
    """Records made by this very point: same suite settings, params, seeds and batching (it seeds batches)."""
    return (meta["fingerprint"] == sc.fingerprint and meta["params"] == method.params
            and meta.get("seeds") == list(method_seeds(method, sweep_cfg.bench))
            and meta.get("batch_size") == sweep_cfg.bench.batch_size)


def _reused_or_run(sweep_cfg: SuiteConfig, sc: SuiteContext, method: MethodConfig, verbose: bool) -> Records:
    """The method's records, run only when the folder holds none made with these settings."""
    records = read_method_records(sweep_cfg.results_path, method.name)
    if records is None or not _records_match(records[1], sc, method, sweep_cfg):
        if verbose:
            print(f"sweep: {method.name}", file=sys.stderr)
        run_method(sweep_cfg, sc, method)
        records = read_method_records(sweep_cfg.results_path, method.name)
    return records


def _greedy_reference(sc: SuiteContext, sweep_cfg: SuiteConfig) -> Records:
    """Greedy's records on the suite's prompts (run into the sweep folder unless already there)."""
    return _reused_or_run(sweep_cfg, sc, MethodConfig(name="greedy", kind="greedy"), verbose=False)


# ---------------------------------------------------------------------------- over-optimisation


def _args_point(sweep_cfg: SuiteConfig, sc: SuiteContext, w: float, reference: list[dict[str, Any]],
                verbose: bool) -> dict[str, Any]:
    """ARGS-greedy at weight w (deterministic: one run), as a leaderboard row."""
    method = MethodConfig(name=f"args-w{w:g}", kind="args", seeds=sweep_cfg.bench.sweep.seeds,
                          params={"k": sweep_cfg.bench.sweep.args_k, "w": w, "mode": "greedy"})
    episodes, meta = _reused_or_run(sweep_cfg, sc, method, verbose)
    return {**method_row(episodes, meta, reference), "value": w}


def _candidates(sweep_cfg: SuiteConfig, sc: SuiteContext, seed: int, verbose: bool) -> list[dict[str, Any]]:
    """Per prompt, the max(n) best-of-n candidates of one seed, every one scored by the RM and the judge
    (reused from the records when made with these settings)."""
    sweep, bench = sweep_cfg.bench.sweep, sweep_cfg.bench
    params = {"n": max(sweep.best_of_n), "top_p": sweep.best_of_n_top_p, "temperature": sweep.best_of_n_temperature,
              "keep_candidates": True}
    method = MethodConfig(name=f"candidates-seed{seed}", kind="best_of_n", params=params, seeds=(seed,))
    records = read_method_records(sweep_cfg.results_path, method.name)
    if records is not None and _candidates_reusable(records[1], sc, method, sweep_cfg):
        return records[0]
    if verbose:
        print(f"sweep best_of_n: {params['n']} samples per prompt, seed {seed}", file=sys.stderr)
    decoder = prepare_method(method, sweep_cfg, sc.ctx).decoder
    started = time.perf_counter()
    generations = generate_all(decoder, sc.prompts, max_new_tokens=sweep_cfg.task.max_new_tokens,
                               seed=evaluation_seed(seed), chunk=decoder_rows(sweep_cfg), progress=bench.progress)
    seconds = time.perf_counter() - started
    episodes = _score_candidates(sc, [g.extra for g in generations], decoder.tokenizer, seed)
    meta = {"name": method.name, "kind": method.kind, "params": params, "entry": None, "fingerprint": sc.fingerprint,
            "seeds": [seed], "batch_size": bench.batch_size,
            "runs": [{"seed": seed, "generate_seconds": seconds, "train_seconds": 0.0, "trainable_params": 0,
                      "peak_memory_mb": None, "info": {}}]}
    write_method_records(sweep_cfg.results_path, method.name, episodes, meta)
    return episodes


def _candidates_reusable(meta: dict[str, Any], sc: SuiteContext, method: MethodConfig, sweep_cfg: SuiteConfig
                         ) -> bool:
    """A recorded draw of this seed with the same sampling settings and at least max(n) candidates serves:
    the candidates are nested, so the first max(n) of a larger draw are exactly this draw."""
    recorded, wanted = meta["params"], method.params
    return ({**recorded, "n": wanted["n"]} == wanted and recorded["n"] >= wanted["n"]
            and _records_match(meta, sc, dataclasses.replace(method, params=recorded), sweep_cfg))


def _score_candidates(sc: SuiteContext, extras: list[dict[str, Any]], tokenizer: Any, seed: int
                      ) -> list[dict[str, Any]]:
    """One record per prompt: every candidate's text, length, the score best-of-n picked by, and its RM
    reward and gold as the harness scores a response (from its text, by the suite's scorer)."""
    texts = [[tokenizer.decode(ids, skip_special_tokens=True) for ids in extra["candidate_ids"]] for extra in extras]
    flat_prompts = [p for p, rows in zip(sc.prompts, texts) for _ in rows]
    flat = [t for rows in texts for t in rows]
    rewards = sc.scorer.reward.score(flat_prompts, flat)
    golds = sc.scorer.gold.score(flat_prompts, flat) if sc.scorer.gold is not None else [None] * len(flat)
    episodes, at = [], 0
    for i, (prompt, extra, rows) in enumerate(zip(sc.prompts, extras, texts)):
        n = len(rows)
        episodes.append({"seed": seed, "index": i, "prompt": prompt, "responses": rows,
                         "response_lens": [len(ids) for ids in extra["candidate_ids"]],
                         "pick_scores": list(extra["candidate_rewards"]),
                         "rewards": [float(r) for r in rewards[at : at + n]], "golds": list(golds[at : at + n])})
        at += n
    return episodes


def best_of_k(record: dict[str, Any], k: int) -> dict[str, Any]:
    """Best-of-k from one prompt's candidates: the first k, picked as `BestOfNDecoder` picks."""
    pick = best_index(record["pick_scores"][:k])
    return {"seed": record["seed"], "index": record["index"], "picked": pick, "response": record["responses"][pick],
            "reward": record["rewards"][pick], "gold": record["golds"][pick],
            "response_len": record["response_lens"][pick], "rm_calls": k,
            "lm_forwards": sum(max(1, n) for n in record["response_lens"][:k])}


def _best_of_n_points(sweep_cfg: SuiteConfig, sc: SuiteContext, verbose: bool) -> list[dict[str, Any]]:
    sweep = sweep_cfg.bench.sweep
    records = [r for seed in sweep.seeds for r in _candidates(sweep_cfg, sc, seed, verbose)]
    points = []
    for n in sorted(sweep.best_of_n):
        episodes = [best_of_k(r, n) for r in records]
        points.append({"value": n, "episodes": len(episodes), "seeds": list(sweep.seeds),
                       **_stat_keys(episodes, "reward"), **_stat_keys(episodes, "gold"),
                       **{key: seed_mean(episodes, source) for key, source in (
                           ("response_len", "response_len"), ("lm_forwards_per_response", "lm_forwards"),
                           ("rm_calls_per_response", "rm_calls"))}})
    return points


def _stat_keys(episodes: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """A point's `<key>_mean`, `<key>_ci95`, `seed_<key>_means`, `seed_<key>_sd` (None without gold; rewards a
    skip rule left unscored do not count)."""
    if all(e[key] is None for e in episodes):
        return {f"{key}_mean": None, f"{key}_ci95": None, f"seed_{key}_means": None, f"seed_{key}_sd": None}
    stat = seed_stat(episodes, key)
    return {f"{key}_mean": stat.mean, f"{key}_ci95": stat.ci95, f"seed_{key}_means": stat.seed_means,
            f"seed_{key}_sd": stat.seed_sd}


def peaks(points: list[dict[str, Any]]) -> dict[str, Any]:
    """Where RM reward and gold peak (the first best value) and whether gold peaks first: the
    over-optimisation signature (past gold's peak, more RM reward buys less gold)."""
    out: dict[str, Any] = {"rm_peak": max(points, key=lambda p: p["reward_mean"])["value"]}
    if all(p.get("gold_mean") is not None for p in points):
        best = max(points, key=lambda p: p["gold_mean"])
        out.update(gold_peak=best["value"], gold_peaks_before_rm=best["value"] < out["rm_peak"],
                   gold_drop_after_peak=best["gold_mean"] - points[-1]["gold_mean"])
    return out


def _peak_sentence(param: str, found: dict[str, Any]) -> str:
    if "gold_peak" not in found:
        return f"RM reward peaks at {param}={found['rm_peak']:g} (no gold judge)."
    gold, rm = found["gold_peak"], found["rm_peak"]
    if found["gold_peaks_before_rm"]:
        return (f"**Gold peaks before RM**: gold at {param}={gold:g}, RM reward at {param}={rm:g}: past gold's peak, "
                f"more RM reward buys less gold (over-optimisation of the reward model); gold at the largest {param} "
                f"is {found['gold_drop_after_peak']:.3f} below its peak. Compare that drop with the CIs before "
                "reading it as real.")
    if gold == rm:
        return (f"Gold and RM reward both peak at {param}={gold:g}: no over-optimisation within this grid "
                "(the reward model and the judge agree on where to stop).")
    return f"RM reward peaks at {param}={rm:g}, before gold ({param}={gold:g})."


def overoptimisation_markdown(param: str, points: list[dict[str, Any]], header: dict[str, Any]) -> str:
    """The table of an over-optimisation sweep: RM reward and gold per value, their ranks, and the peaks."""
    found = header["peaks"]
    if param == "best_of_n":
        what = (f"Best-of-n: max(n) = {max(p['value'] for p in points)} nucleus samples (top_p {header['top_p']}, "
                f"temperature {header['temperature']}) drawn once per prompt and seed (seeds {header['seeds']}); "
                "best-of-k picks by RM reward among the first k, so the points are nested.")
    else:
        what = (f"ARGS-greedy (k = {header['k']}) at each reward weight w: argmax over the top-k of logit + w * RM "
                "(deterministic: one run; w = 0 is greedy decoding).")
    lines = [f"# Over-optimisation sweep over {param}: suite `{header['suite']}`", "",
             f"{header['num_prompts']} held-out prompts. {what} Every response is scored by the suite's reward model "
             "(RM) and gold judge. A row is the mean over seeds of each seed's mean; ± = 95% CI over prompts; (sd x) = "
             "sample sd of the seed means. Greedy: RM "
             f"{header['greedy_reward']:+.2f}" + (f", gold {header['greedy_gold']:+.3f}" if header.get('greedy_gold')
                                                   is not None else "") + ". Generated from records; do not edit.", "",
             f"| {param} | RM reward | gold | rank RM | rank gold | peak | length | LM fwd / resp | RM calls / resp |",
             "|---:|---:|---:|---:|---:|---|---:|---:|---:|"]
    for p in points:
        reward = with_spread(f"{p['reward_mean']:+.2f}", p["reward_ci95"], p["seed_reward_sd"])
        gold = with_spread(f"{p['gold_mean']:+.3f}", p["gold_ci95"], p["seed_gold_sd"]) \
            if p.get("gold_mean") is not None else "—"
        peak = ", ".join(name for name, key in (("RM", "rm_peak"), ("gold", "gold_peak")) if found.get(key) == p["value"])
        lines.append(f"| {p['value']:g} | {reward} | {gold} | {p['rank_rm']} | {p['rank_gold'] or '—'} | {peak} | "
                     f"{p['response_len']:.1f} | {p['lm_forwards_per_response']:.1f} | {p['rm_calls_per_response']:.1f} |")
    lines += ["", _peak_sentence(param, found), "",
              f"git {header['provenance']['git_commit']}, `{header['provenance']['command']}`."]
    return "\n".join(lines) + "\n"


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
             "row is the mean over its seeds of each seed's mean (± = 95% CI over prompts; (sd x) = sample sd of the "
             f"seed means). Greedy (the SFT model): {greedy}. Generated from records; do not edit.", "",
             f"| {param} | RM reward | gold | gold per seed | win vs greedy | rejection rate | irregular | diversity | length |",
             "|---:|---:|---:|---|---:|---:|---:|---:|---:|"]
    for p in points:
        gold = with_spread(f"{p['gold_mean']:+.3f}", p["gold_ci95"], p["seed_gold_sd"]) \
            if p.get("gold_mean") is not None else "—"
        reward = with_spread(f"{p['reward_mean']:+.2f}", p["reward_ci95"], p["seed_reward_sd"])
        per_seed = " / ".join(f"{g:+.2f}" for g in p["seed_gold_means"]) if p.get("seed_gold_means") else "—"
        win = f"{p['gold_win_rate_vs_greedy']:.0%}" if p.get("gold_win_rate_vs_greedy") is not None else "—"
        lines.append(f"| {p['value']:g} | {reward} | {gold} | {per_seed} | {win} | "
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


def _proxy_sweep(cfg: SuiteConfig, sweep_cfg: SuiteConfig, sc: SuiteContext, param: str,
                 reference: list[dict[str, Any]], verbose: bool) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    points = [_proxy_point(sweep_cfg, sc, param, value, reference, verbose) for value in getattr(cfg.bench.sweep, param)]
    env = cfg.train.env
    header = {"total_timesteps": points[0]["total_timesteps"], "seeds": points[0]["seeds"],
              "env": {"top_p": env.top_p, "top_k": env.top_k, "temperature": env.temperature, "p_t": env.p_t}}
    return points, header


def _overoptimisation_sweep(cfg: SuiteConfig, sweep_cfg: SuiteConfig, sc: SuiteContext, param: str,
                            reference: list[dict[str, Any]], verbose: bool
                            ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    sweep = cfg.bench.sweep
    if param == "best_of_n":
        points = _best_of_n_points(sweep_cfg, sc, verbose)
        header = {"seeds": list(sweep.seeds), "top_p": sweep.best_of_n_top_p, "temperature": sweep.best_of_n_temperature}
    else:
        points = [_args_point(sweep_cfg, sc, w, reference, verbose) for w in sorted(sweep.args_w)]
        header = {"seeds": points[0]["seeds"], "k": sweep.args_k}
    add_ranks(points)
    return points, {**header, "peaks": peaks(points)}


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
    reference, reference_meta = _greedy_reference(sc, sweep_cfg)
    greedy = method_row(reference, reference_meta, None)
    run: Callable[..., tuple[list[dict[str, Any]], dict[str, Any]]] = (
        _overoptimisation_sweep if param in OVEROPTIMISATION else _proxy_sweep)
    points, extra = run(cfg, sweep_cfg, sc, param, reference, verbose)
    for row in points:
        row.update(greedy_reward=greedy["reward_mean"], greedy_gold=greedy["gold_mean"])
    header = {**sc.header, "param": param, **extra, "greedy_reward": greedy["reward_mean"],
              "greedy_gold": greedy["gold_mean"],
              "provenance": provenance(seed=cfg.bench.seed, sweep_seeds=list(cfg.bench.sweep.seeds))}
    suite_dir = cfg.results_path
    atomic_write_json(suite_dir / f"{name}.json", {**header, "points": points})
    if param in OVEROPTIMISATION:
        atomic_write_text(suite_dir / f"{name}.md", overoptimisation_markdown(param, points, header))
        plot = plot_overoptimisation(suite_dir / f"{name}.png", param, points, header["peaks"])
    else:
        atomic_write_text(suite_dir / f"{name}.md", sweep_markdown(param, points, header))
        plot = plot_sweep(suite_dir / f"{name}.png", param, points)
    if verbose:
        print((suite_dir / f"{name}.md").read_text())
    return {"points": points, "plot": str(plot), "seconds": time.perf_counter() - started}
