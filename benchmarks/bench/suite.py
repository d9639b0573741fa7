"""`llm-envs bench`: every method on the same held-out prompts, scored by one reward wrapper.

Read top to bottom: the task's context (LM, reward model, gold judge, held-out prompts) -> for each
method and each of its seeds (`benchmarks.bench.seeds`): prepare (train or reuse), evaluate through
the one harness (`agents.harness`: generate with a progress bar, score) -> write the method's records,
every seed's -> leaderboard from the records -> plots -> wandb -> print. See
`benchmarks/bench/leaderboard.py` for every column. Launched on several processes (`accelerate launch`,
`benchmarks/bench/distributed.py`), each generates a share of the prompts and the main process scores
them, writes the records and everything after them.
"""

from __future__ import annotations

import dataclasses
import re
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from agents.harness import Scorer, generate_timed, scored
from agents.launch import SINGLE_PROCESS, Processes, launch
from agents.metrics import SentenceEncoder
from benchmarks.bench.config import MethodConfig, SuiteConfig
from benchmarks.bench.distributed import chunk_shard, idle_note, joined
from benchmarks.bench.leaderboard import COLUMNS, build_leaderboard, format_cell, write_leaderboard
from benchmarks.bench.methods import decoder_rows, prepare_method
from benchmarks.bench.plots import write_suite_plots
from benchmarks.bench.records import fingerprint, read_method_records, results_lock, write_method_records
from benchmarks.bench.seeds import evaluation_seed, method_seeds, seeded_method
from benchmarks.provenance import provenance
from llm_envs.config import ConfigError, save_config, to_dict
from llm_envs.data import load_prompts
from llm_envs.task import LMContext
from llm_envs.rewards import RewardWrapper


@dataclasses.dataclass(frozen=True)
class SuiteContext:
    """What every method of a suite shares: the task's context, the held-out prompts, the scorer, and the
    launch's processes that split the prompts."""

    ctx: LMContext
    prompts: list[str]
    scorer: Scorer
    fingerprint: str
    header: dict[str, Any]
    processes: Processes = SINGLE_PROCESS


_WORLD_MODEL = re.compile(r"/world/([^/]+-seed\d+-v\d+/(?:lm|rm))/?$")


def display_name(source: str) -> str:
    """A model's name for result files: world models as `world:<build>/<part>` (wherever the cache
    lives), not this machine's path."""
    match = _WORLD_MODEL.search(source)
    return f"world:{match.group(1)}" if match else source


def suite_context(cfg: SuiteConfig, processes: Processes = SINGLE_PROCESS) -> SuiteContext:
    """Load the task: LM, reward model, held-out prompts, gold judge, and the coherence encoder (on every
    process of a launch: each decodes)."""
    task, bench = cfg.task, cfg.bench
    if not bench.progress or not processes.is_main:  # no bars at all: transformers' weight-loading bars included
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    with processes.main_first():  # the main process builds the world on first use, the others then load it
        sources = task.resolve(progress=bench.progress and processes.is_main)
    source = load_prompts(sources.eval_prompts, num_prompts=bench.num_prompts, seed=bench.seed)
    ctx = sources.context(source.prompts)
    prompts = list(ctx.prompts.prompts)
    gold = (RewardWrapper.from_callable(sources.gold, name="world-gold", lm_tokenizer=ctx.tokenizer)
            if sources.gold is not None else None)  # on chat prompts the judge reads the user message
    metrics = bench.metrics
    encoder = (SentenceEncoder.load(bench.coherence_encoder, device=task.device, pooling=metrics.coherence_pooling,
                                    max_length=metrics.coherence_max_length) if bench.coherence_encoder
               else SentenceEncoder(ctx.model, ctx.tokenizer, pooling=metrics.coherence_pooling,
                                    max_length=metrics.coherence_max_length))
    scorer = Scorer(ctx.reward, gold, encoder, metrics)  # checks the rules can run before any method does
    lm, reward = display_name(ctx.lm_name), display_name(ctx.reward.name)
    settings = dict(prompts=prompts, lm=lm, reward=reward, max_new_tokens=task.max_new_tokens,
                    seed=bench.seed, gold=gold.name if gold else None, coherence=bench.coherence_encoder)
    settings.update(protocol_settings(cfg))
    if sources.world_hash is not None:  # records made on another build of the world are not comparable
        settings["world_hash"] = sources.world_hash
    header = {"suite": bench.suite, "num_prompts": len(prompts), "prompts": source.source or "a list",
              "max_new_tokens": task.max_new_tokens, "chat_template": task.chat_template,
              "lm": lm, "reward": reward, "gold": gold.name if gold else None, "seed": bench.seed,
              "seeds": list(bench.seeds), "world_hash": sources.world_hash, **protocol_settings(cfg)}
    return SuiteContext(ctx, prompts, scorer, fingerprint(**settings), header, processes)


def protocol_settings(cfg: SuiteConfig) -> dict[str, Any]:
    """The protocol's settings that change what a number means (the suite's protocol name, the reward
    wrapper's rules and tokenizer, the metric rules), each only when it is not the default: records made
    before these were settings keep their fingerprints."""
    task, bench = cfg.task, cfg.bench
    out: dict[str, Any] = {}
    if bench.protocol is not None:
        out["protocol"] = bench.protocol
    if not task.reward_rules.is_default:
        out["reward_rules"] = to_dict(task.reward_rules)
    if task.reward_tokenizer is not None:
        out["reward_tokenizer"] = task.reward_tokenizer
    if not bench.metrics.is_default:
        out["metrics"] = to_dict(bench.metrics)
    return out


def run_seed(cfg: SuiteConfig, sc: SuiteContext, method: MethodConfig, seed: int
             ) -> tuple[list[dict[str, Any]], dict[str, Any]] | None:
    """One seed of a method: prepare (train or reuse its seed's model), generate with its sampling seed
    (each process of a launch its share, `chunk_shard`), score; the episodes (each with its `seed`) and
    what the run cost, on the main process (None on the others)."""
    bench, processes = cfg.bench, sc.processes
    prepared = prepare_method(seeded_method(method, seed), cfg, sc.ctx, processes)
    chunk = decoder_rows(cfg)
    share = chunk_shard(len(sc.prompts), chunk, processes.count, processes.index)
    # A share starts on a chunk boundary, and its chunks keep the seeds they have in one process's run.
    mine = (generate_timed(prepared.decoder, sc.prompts[share.start:share.stop], max_new_tokens=cfg.task.max_new_tokens,
                           seed=evaluation_seed(seed) + share.start, chunk=chunk,
                           progress=bench.progress and processes.is_main) if share else None)
    parts = processes.gather(mine)
    if not processes.is_main:
        return None
    evaluation = scored(sc.scorer, sc.prompts, joined(parts))
    run = {"seed": seed, "generate_seconds": evaluation.generate_seconds, "train_seconds": prepared.train_seconds,
           "trainable_params": prepared.trainable_params, "peak_memory_mb": evaluation.peak_memory_mb,
           "processes": processes.count, "info": prepared.info, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    return [{**e, "seed": seed} for e in evaluation.episodes], run


def run_method(cfg: SuiteConfig, sc: SuiteContext, method: MethodConfig) -> None:
    """Run every seed of one method (`method_seeds`) and write its records, all seeds in one pair of files
    (the main process of a launch)."""
    episodes, runs = [], []
    seeds = method_seeds(method, cfg.bench)
    for seed in seeds:
        if len(seeds) > 1 and cfg.bench.progress and sc.processes.is_main:
            print(f"bench: {method.name} seed {seed}", file=sys.stderr)
        result = run_seed(cfg, sc, method, seed)
        if result is not None:
            episodes += result[0]
            runs.append(result[1])
    if not sc.processes.is_main:
        return
    meta = {"name": method.name, "kind": method.kind, "params": method.params, "entry": method.entry,
            "fingerprint": sc.fingerprint, "world_hash": sc.header.get("world_hash"), "seeds": list(seeds), "batch_size": cfg.bench.batch_size, "runs": runs}
    write_method_records(cfg.results_path, method.name, episodes, meta)


def log_to_wandb(cfg: SuiteConfig, rows: Sequence[dict[str, Any]], plots: Sequence[Path]) -> str | None:
    """The leaderboard table and the plots, to wandb (offline by default: no network needed)."""
    bench = cfg.bench
    if bench.wandb_mode == "disabled":
        return None
    import wandb

    directory = Path(bench.runs_dir)
    directory.mkdir(parents=True, exist_ok=True)
    run = wandb.init(project=bench.wandb_project, dir=str(directory), mode=bench.wandb_mode, name=f"bench-{bench.suite}",
                     config=to_dict(cfg), job_type="bench", reinit="finish_previous")
    keys = ["method", "kind", *[k for k, _, _ in COLUMNS[1:]], "reward_ci95", "gold_ci95", "seed_reward_sd",
            "seed_gold_sd", "irregular_rate"]
    table = wandb.Table(columns=keys, data=[[row.get(k) for k in keys] for row in rows])
    run.log({"leaderboard": table, **{f"plots/{p.stem}": wandb.Image(str(p)) for p in plots}})
    location = str(Path(run.dir).parent)  # the run's folder (wandb sync takes it)
    run.finish()
    return location


def print_leaderboard(rows: Sequence[dict[str, Any]], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for key, header, _ in COLUMNS:
        table.add_column(header, justify="left" if key == "method" else "right")
    for row in rows:
        table.add_row(*[format_cell(row, key, fmt) for key, _, fmt in COLUMNS])
    Console(width=200).print(table)


def finish_suite(cfg: SuiteConfig, sc: SuiteContext, *, verbose: bool = True) -> dict[str, Any]:
    """Leaderboard, config, provenance, plots and wandb from the records on disk."""
    suite_dir = cfg.results_path
    seeds = {m.name: method_seeds(m, cfg.bench) for m in cfg.bench.methods}
    rows, notes = build_leaderboard(suite_dir, [m.name for m in cfg.bench.methods], sc.fingerprint, seeds)
    header = {**sc.header, "provenance": provenance(seed=cfg.bench.seed, seeds={k: list(v) for k, v in seeds.items()}),
              "notes": notes}
    with results_lock(suite_dir):
        write_leaderboard(suite_dir, rows, header)
        save_config(cfg, suite_dir / "config.yaml")
    records = {m.name: read_method_records(suite_dir, m.name) for m in cfg.bench.methods}
    plots = write_suite_plots(suite_dir, rows, {k: v[0] for k, v in records.items() if v is not None})
    wandb_dir = log_to_wandb(cfg, rows, plots)
    if verbose:
        print_leaderboard(rows, f"llm_envs leaderboard: {cfg.bench.suite} ({sc.header['num_prompts']} prompts)")
        for note in notes:
            print(f"note: {note}")
        print(f"results: {suite_dir}/ (leaderboard.md, leaderboard.json, records/, plots)"
              + (f"; wandb: {wandb_dir}" if wandb_dir else ""))
    return {"suite_dir": str(suite_dir), "rows": rows, "notes": notes, "plots": [str(p) for p in plots]}


def check_kept_records(cfg: SuiteConfig, sc: SuiteContext, chosen: Sequence[MethodConfig]) -> None:
    """Refuse, before anything is overwritten, a partial run whose kept records were made under other
    suite settings: the leaderboard would mix prompts (or models), and the old records would be orphaned."""
    rerun = {m.name for m in chosen}
    stale = []
    for method in cfg.bench.methods:
        records = None if method.name in rerun else read_method_records(cfg.results_path, method.name)
        if records is not None and records[1]["fingerprint"] != sc.fingerprint:
            stale.append(method.name)
    if stale:
        raise ValueError(
            f"the records of {stale} in {cfg.results_path} were made under other suite settings (prompts, LM, reward "
            "model, budget or seed) than this run's; nothing was run. Run them too (--methods "
            f"{','.join(sorted(rerun | set(stale)))}), run the whole suite, or set bench.suite to a new name."
        )


def run_suite(cfg: SuiteConfig, *, methods: Sequence[str] | None = None, verbose: bool = True,
              processes: Processes | None = None) -> dict[str, Any] | None:
    """Run the suite's methods (all, or the named ones, keeping the others' records), then the leaderboard.

    `processes`: the launch that splits the prompts (default: this process's, `launch`). The main
    process writes and prints everything and returns the summary; the others return None."""
    if not cfg.bench.methods:
        raise ConfigError("bench.methods is empty; list at least one method (see `llm-envs config show tiny bench`).")
    if cfg.bench.torch_threads:
        torch.set_num_threads(cfg.bench.torch_threads)
    processes = launch(cfg.task.device) if processes is None else processes
    verbose = verbose and processes.is_main
    chosen = [cfg.bench.method(name) for name in methods] if methods else list(cfg.bench.methods)
    cfg.results_path.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    sc = suite_context(cfg, processes)
    check_kept_records(cfg, sc, chosen)  # on every process: each refuses, none waits for the others
    note = idle_note(len(sc.prompts), decoder_rows(cfg), processes.count)
    if verbose and note:
        print(f"bench: note: {note}", file=sys.stderr)
    for method in chosen:
        if verbose:
            print(f"bench: {method.name} ({method.kind})", file=sys.stderr)
        run_method(cfg, sc, method)
    if not processes.is_main:
        return None
    summary = finish_suite(cfg, sc, verbose=verbose)
    summary["seconds"] = time.perf_counter() - started
    return summary
