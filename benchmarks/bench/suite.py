"""`llm-envs bench`: every method on the same held-out prompts, scored by one reward wrapper.

Read top to bottom: context (LM, reward model, gold judge, prompts) -> for each method: prepare
(train or reuse), generate with a progress bar, score, write its records -> leaderboard from the
records -> plots -> wandb -> print. See `benchmarks/bench/leaderboard.py` for every column.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from agents.base import Decoder, Generation
from benchmarks.bench.config import MethodConfig, SuiteConfig
from benchmarks.bench.leaderboard import COLUMNS, build_leaderboard, format_cell, write_leaderboard
from benchmarks.bench.methods import prepare_method
from benchmarks.bench.metrics import SentenceEncoder, diversity, is_irregular
from benchmarks.bench.plots import write_suite_plots
from benchmarks.bench.records import fingerprint, read_method_records, write_method_records
from benchmarks.provenance import provenance
from llm_envs.config import save_config, to_dict
from llm_envs.data import load_prompts
from llm_envs.envs.context import LMContext, build_context
from llm_envs.rewards import RewardWrapper


class PeakMemory:
    """Peak memory (MB) inside a `with` block: CUDA peak allocated on GPU, else the process's peak RSS
    (Linux: reset through /proc/self/clear_refs, so each block is measured on its own)."""

    def __enter__(self) -> PeakMemory:
        self.mb: float | None = None
        self.cuda = torch.cuda.is_available()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:
                pass  # not Linux: the peak since the process started is the best there is
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.cuda:
            self.mb = torch.cuda.max_memory_allocated() / 2**20
            return
        try:
            line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmHWM"))
            self.mb = int(line.split()[1]) / 1024
        except (OSError, StopIteration):
            import resource

            self.mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@dataclasses.dataclass(frozen=True)
class SuiteContext:
    """What every method of a suite shares."""

    ctx: LMContext
    prompts: list[str]
    gold: RewardWrapper | None
    encoder: SentenceEncoder
    fingerprint: str
    header: dict[str, Any]


def display_name(source: str) -> str:
    """A model's name for result files: world models as `world:<build>/<part>`, not this machine's path."""
    marker = "/llm_envs/world/"
    return "world:" + source.split(marker, 1)[1] if marker in source else source


def suite_context(cfg: SuiteConfig) -> SuiteContext:
    """Load the LM, the reward model, the held-out prompts, the gold judge and the coherence encoder."""
    env, bench = cfg.train.env, cfg.bench
    if env.lm is None or env.reward is None or str(env.eval_prompts).startswith("world:"):
        from llm_envs.world import load_world

        load_world(progress=bench.progress)  # build it on first use, with bars only when asked for
    source = load_prompts(env.eval_prompts, num_prompts=bench.num_prompts, seed=bench.seed)
    ctx = build_context(lm=env.lm, reward=env.reward, prompts=source.prompts, device=env.device, dtype=env.dtype,
                        max_prompt_tokens=env.max_prompt_tokens)
    prompts = list(ctx.prompts.prompts)
    use_gold = bench.gold == "world" or (bench.gold == "auto" and env.lm is None)
    gold = None
    if use_gold:
        from llm_envs.world import gold_reward

        gold = RewardWrapper.from_callable(gold_reward, name="world-gold")
    encoder = (SentenceEncoder.load(bench.coherence_encoder, device=env.device) if bench.coherence_encoder
               else SentenceEncoder(ctx.model, ctx.tokenizer))
    lm, reward = display_name(ctx.lm_name), display_name(ctx.reward.name)
    settings = dict(prompts=prompts, lm=lm, reward=reward, max_new_tokens=env.max_new_tokens,
                    seed=bench.seed, gold=gold.name if gold else None, coherence=bench.coherence_encoder)
    header = {"suite": bench.suite, "num_prompts": len(prompts), "prompts": source.source or "a list",
              "max_new_tokens": env.max_new_tokens,
              "lm": lm, "reward": reward, "gold": gold.name if gold else None, "seed": bench.seed}
    return SuiteContext(ctx, prompts, gold, encoder, fingerprint(**settings), header)


def generate_all(decoder: Decoder, prompts: Sequence[str], *, max_new_tokens: int, seed: int, chunk: int,
                 progress: bool, desc: str) -> list[Generation]:
    """Decode every prompt, a chunk at a time so that the progress bar moves (prompt i keeps its seed)."""
    generations: list[Generation] = []
    with tqdm(total=len(prompts), desc=desc, unit="prompt", disable=not progress, file=sys.stderr) as bar:
        for start in range(0, len(prompts), chunk):
            part = list(prompts[start : start + chunk])
            out = decoder.generate(part, max_new_tokens=max_new_tokens, seed=seed + start)
            if len(out) != len(part):
                raise RuntimeError(f"{desc}: generate returned {len(out)} responses for {len(part)} prompts; a "
                                   "Decoder must answer every prompt, in order.")
            generations.extend(out)
            bar.update(len(part))
    return generations


def score_episodes(sc: SuiteContext, generations: Sequence[Generation]) -> list[dict[str, Any]]:
    """Per-episode records: every response scored by the suite's one reward wrapper and gold judge."""
    texts = [g.response_text for g in generations]
    rewards = sc.ctx.reward.score(sc.prompts, texts)
    golds = sc.gold.score(sc.prompts, texts) if sc.gold is not None else [None] * len(texts)
    coherence = sc.encoder.coherence(sc.prompts, texts)
    episodes = []
    for i, (g, reward, gold, coh) in enumerate(zip(generations, rewards, golds, coherence)):
        extra = {k: v for k, v in g.extra.items() if k != "reward_parts"}  # the env ran unscored
        episodes.append({
            "index": i, "prompt": g.prompt, "response": g.response_text, "response_ids": list(g.response_ids),
            "response_len": len(g.response_ids), "reward": float(reward), "gold": gold, "diversity": diversity(g.response_text),
            "coherence": coh, "irregular": bool(is_irregular(g.response_text)), "lm_forwards": g.lm_forwards,
            "rm_calls": g.rm_calls, "extra": extra,
        })
    return episodes


def run_method(cfg: SuiteConfig, sc: SuiteContext, method: MethodConfig) -> None:
    """Prepare, generate, score, and write one method's records."""
    bench = cfg.bench
    prepared = prepare_method(method, cfg, sc.ctx)
    # Warm-up (untimed): lazy initialisation should not be billed to whichever method runs first.
    prepared.decoder.generate(sc.prompts[:1], max_new_tokens=cfg.train.env.max_new_tokens, seed=bench.seed)
    with PeakMemory() as memory:
        started = time.perf_counter()
        generations = generate_all(prepared.decoder, sc.prompts, max_new_tokens=cfg.train.env.max_new_tokens,
                                   seed=bench.seed, chunk=4 * bench.batch_size, progress=bench.progress,
                                   desc=method.name)
        seconds = time.perf_counter() - started
    for g, prompt in zip(generations, sc.prompts):
        if g.prompt != prompt:
            raise RuntimeError(f"{method.name}: a response came back for {g.prompt[:60]!r} where {prompt[:60]!r} was "
                               "expected; a Decoder must answer the prompts in order.")
    episodes = score_episodes(sc, generations)
    meta = {"name": method.name, "kind": method.kind, "params": method.params, "entry": method.entry,
            "fingerprint": sc.fingerprint, "generate_seconds": seconds, "train_seconds": prepared.train_seconds,
            "trainable_params": prepared.trainable_params, "peak_memory_mb": memory.mb, "info": prepared.info,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
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
    keys = ["method", "kind", *[k for k, _, _ in COLUMNS[1:]], "reward_ci95", "gold_ci95", "irregular_rate"]
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
    rows, notes = build_leaderboard(suite_dir, [m.name for m in cfg.bench.methods], sc.fingerprint)
    header = {**sc.header, "provenance": provenance(seed=cfg.bench.seed, train_seed=cfg.train.seed,
                                                    rrhf_seed=cfg.rrhf.seed), "notes": notes}
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


def run_suite(cfg: SuiteConfig, *, methods: Sequence[str] | None = None, verbose: bool = True) -> dict[str, Any]:
    """Run the suite's methods (all, or the named ones, keeping the others' records), then the leaderboard."""
    if cfg.bench.torch_threads:
        torch.set_num_threads(cfg.bench.torch_threads)
    chosen = [cfg.bench.method(name) for name in methods] if methods else list(cfg.bench.methods)
    cfg.results_path.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    sc = suite_context(cfg)
    check_kept_records(cfg, sc, chosen)
    for method in chosen:
        if verbose:
            print(f"bench: {method.name} ({method.kind})", file=sys.stderr)
        run_method(cfg, sc, method)
    summary = finish_suite(cfg, sc, verbose=verbose)
    summary["seconds"] = time.perf_counter() - started
    return summary
