"""Running the RRHF stages in order, resuming, and the evaluation (base vs RRHF greedy, best-of-n).

`run(cfg, task)` checks the output directory (a stage's output made with other settings is never mixed
with new results), writes the resolved config beside the outputs, then runs each requested stage;
a stage whose output is complete is skipped. Under `accelerate launch` only the main process
samples, scores and evaluates while the others wait in a barrier; every process trains
(`agents.rrhf.training`: the same batches and updates on any process count).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import yaml

from agents.launch import Processes, launch
from agents.rrhf.cache import read_jsonl
from agents.rrhf.config import EVAL_FIELDS, SAMPLE_FIELDS, SCORE_FIELDS, TRAIN_FIELDS, RRHFConfig
from agents.rrhf.stages import SAMPLES_FILE, SCORED_FILE, Sources, resolve_sources, sample, score
from agents.rrhf.training import CHECKPOINT_DIR, DONE_FILE, MODEL_DIR, check_process_count, model_is_complete, train
from llm_envs.config import ConfigError, read_yaml, to_dict
from llm_envs.io import atomic_write_json, atomic_write_text
from llm_envs.reward_spec import reward_label
from llm_envs.task import Task

STAGES = ("sample", "score", "train", "eval")
CONFIG_FILE, EVAL_FILE = "config.yaml", "eval.json"


def run_settings(cfg: RRHFConfig, task: Task) -> dict[str, Any]:
    """The settings a run's outputs depend on, flat: RRHF's fields and the task's as `task.<field>`."""
    return {**to_dict(cfg), **{f"task.{k}": v for k, v in to_dict(task).items()}}


def run_config(cfg: RRHFConfig, task: Task) -> dict[str, Any]:
    """What a run directory's `config.yaml` holds: the task and the RRHF config that made it."""
    return {"task": to_dict(task), "rrhf": to_dict(cfg)}


def _saved_settings(path: Path) -> dict[str, Any]:
    saved = read_yaml(path) or {}
    return {**saved.get("rrhf", {}), **{f"task.{k}": v for k, v in saved.get("task", {}).items()}}


def check_output_dir(cfg: RRHFConfig, task: Task) -> None:
    """Refuse to resume into outputs made with different settings, or outputs whose inputs are gone."""
    out = Path(cfg.output_dir)
    outputs = [(SAMPLES_FILE, (out / SAMPLES_FILE).exists(), SAMPLE_FIELDS),
               (SCORED_FILE, (out / SCORED_FILE).exists(), SCORE_FIELDS),
               (f"{MODEL_DIR}/", model_is_complete(out) or (out / CHECKPOINT_DIR).exists(), TRAIN_FIELDS)]
    for (name, exists, _), (later, later_exists, _) in zip(outputs, outputs[1:]):
        if later_exists and not exists:
            raise ConfigError(
                f"{out / later} exists but {out / name} does not, so it was made from inputs that are gone; "
                f"delete {out / later} (and what follows it) or use a new output_dir."
            )
    saved = out / CONFIG_FILE
    if not saved.is_file():
        return
    old, new = _saved_settings(saved), run_settings(cfg, task)
    for name, exists, fields in outputs:
        changed = [k for k in fields if exists and k in old and old[k] != new[k]]
        if changed:
            k = changed[0]
            raise ConfigError(
                f"{out / name} was made with {k}={old[k]!r} but the config now says {k}={new[k]!r}. Use a new "
                f"output_dir, set {k}={old[k]!r} back, or delete {out / name} (and what follows it) to redo it."
            )


def evaluate(cfg: RRHFConfig, sources: Sources, task: Task) -> dict[str, Any]:
    """Greedy decoding of the base and the RRHF-tuned LM, and best-of-n of the base LM, on the task's
    held-out prompts, through the one harness (`agents.harness`): every answer scored by the task's
    reward wrapper (and gold judge)."""
    from agents.decoding import BestOfNDecoder, GreedyDecoder
    from agents.harness import Scorer, evaluate_decoder, summarize
    from llm_envs.rewards import RewardWrapper

    if not sources.eval_prompts:
        raise ValueError("no evaluation prompts: set task.eval_prompts (e.g. 'world:test') or drop the eval stage.")
    prompts, device = sources.eval_prompts, sources.device
    tokenizer = sources.lm_tokenizer()  # on a chat task: the chat tokenizer (rendering, end of turn)
    reward = RewardWrapper.build(sources.reward, lm_tokenizer=tokenizer, device=device,
                                 batch_size=cfg.score_batch_size, **sources.reward_kwargs)
    gold = RewardWrapper.from_callable(sources.gold, name="gold", lm_tokenizer=tokenizer) if sources.gold else None
    decoders: dict[str, Any] = {
        "base_greedy": lambda: GreedyDecoder(sources.lm, tokenizer, device=device),
        "rrhf_greedy": lambda: GreedyDecoder(str(Path(cfg.output_dir) / MODEL_DIR), tokenizer, device=device),
    }
    if cfg.eval_best_of:
        decoders[f"base_best_of_{cfg.eval_best_of}"] = lambda: BestOfNDecoder(
            sources.lm, tokenizer, reward=reward, n=cfg.eval_best_of, device=device)
    methods: dict[str, Any] = {}
    for name, make in decoders.items():
        evaluation = evaluate_decoder(make(), prompts, Scorer(reward, gold), max_new_tokens=task.max_new_tokens,
                                      seed=cfg.seed, chunk=len(prompts), warmup=False)
        methods[name] = summarize(evaluation)
    return {"num_prompts": len(prompts), "max_new_tokens": task.max_new_tokens, "seed": cfg.seed,
            "reward": reward_label(sources.reward), "gold": "world gold judge" if gold else None, "methods": methods}


def _print_eval(result: dict[str, Any]) -> None:
    print(f"RRHF evaluation on {result['num_prompts']} held-out prompts (reward: {result['reward']})")
    for name, row in result["methods"].items():
        gold = f"  gold {row['gold_mean']:+.3f} ± {row['gold_ci95']:.3f}" if "gold_mean" in row else ""
        print(f"  {name:18s} RM {row['reward_mean']:+.3f} ± {row['reward_ci95']:.3f}{gold}  "
              f"len {row['response_len']:.1f}  rm_calls {row['rm_calls_per_response']:g}")


def _eval_stage(cfg: RRHFConfig, task: Task, sources: Sources, verbose: bool) -> dict[str, Any] | None:
    """`evaluate`, skipped when eval.json already holds it for these settings and this model."""
    out = Path(cfg.output_dir)
    if sources.eval_prompts is None:
        return None
    if not model_is_complete(out):
        raise FileNotFoundError(f"{out / MODEL_DIR} is not trained yet; run the train stage first.")
    settings = {k: v for k, v in run_settings(cfg, task).items() if k in EVAL_FIELDS}
    settings["model"] = json.loads((out / MODEL_DIR / DONE_FILE).read_text())
    previous = json.loads((out / EVAL_FILE).read_text()) if (out / EVAL_FILE).is_file() else {}
    result = previous
    if previous.get("config") != settings:
        result = {**evaluate(cfg, sources, task), "config": settings}
        atomic_write_json(out / EVAL_FILE, result)
    if verbose:
        _print_eval(result)
    return result


def _stamp(path: Path) -> tuple[int, int] | None:
    return (path.stat().st_size, path.stat().st_mtime_ns) if path.exists() else None


def run(cfg: RRHFConfig, task: Task | None = None, stages: Sequence[str] = STAGES, *,
        verbose: bool = True, processes: Processes | None = None) -> dict[str, Any]:
    """Run the requested stages on `task` (default: the embedded world) in order, skipping complete
    ones; returns what each produced. `processes`: the launch this runs in (default: `launch(task.device)`,
    one process unless a launcher started several)."""
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage {unknown[0]!r}; expected some of {list(STAGES)} (in any order).")
    if cfg.num_threads is not None:
        import torch

        torch.set_num_threads(cfg.num_threads)
    task = task or Task()
    processes = launch(task.device) if processes is None else processes
    if "train" in stages:  # before sampling for hours: a batch that cannot be split fails now
        check_process_count(cfg.queries_per_batch, processes.count)
    out = Path(cfg.output_dir)
    if processes.is_main:
        check_output_dir(cfg, task)
        atomic_write_text(out / CONFIG_FILE, yaml.safe_dump(run_config(cfg, task), sort_keys=False))
    with_eval = "eval" in stages
    sources = resolve_sources(cfg, task, with_eval=with_eval) if processes.is_main else None
    processes.barrier()  # the main process builds the world if needed, the others then load it
    sources = sources or resolve_sources(cfg, task, with_eval=with_eval)
    summary: dict[str, Any] = {"output_dir": str(out), "lm": sources.lm, "reward": reward_label(sources.reward),
                               "train_prompts": len(sources.train_prompts), "world": sources.world_path,
                               "world_hash": sources.world_hash}
    outputs = {"sample": out / SAMPLES_FILE, "score": out / SCORED_FILE,
               "train": out / MODEL_DIR / DONE_FILE, "eval": out / EVAL_FILE}
    for stage in (s for s in STAGES if s in stages):
        started, before = time.perf_counter(), _stamp(outputs[stage])
        if stage == "train":
            summary["model"] = str(train(cfg, sources.lm, sources.device, sources.lm_tokenizer("right")))
            summary["train"] = json.loads((out / MODEL_DIR / DONE_FILE).read_text())
        elif processes.is_main:
            if stage == "sample":
                summary["samples"] = str(sample(cfg, sources))
            elif stage == "score":
                summary["scored"] = str(score(cfg, sources))
                scored, _ = read_jsonl(out / SCORED_FILE)
                best = [max(r["scores"]) for r in scored]
                mean = [float(np.mean(r["scores"])) for r in scored]
                summary["scored_stats"] = {"mean_reward": round(float(np.mean(mean)), 4),
                                           "mean_best_reward": round(float(np.mean(best)), 4)}
            elif stage == "eval":
                summary["eval"] = _eval_stage(cfg, task, sources, verbose)
        processes.barrier()
        skipped = before is not None and _stamp(outputs[stage]) == before
        took = f"{time.perf_counter() - started:.1f} s"
        if stage == "eval" and summary.get("eval") is None:
            took = "skipped (no eval prompts: set eval_prompts)"
        summary.setdefault("stages", {})[stage] = "skipped (complete)" if skipped else took
        if verbose and processes.is_main:
            print(f"rrhf: {stage}: {summary['stages'][stage]}", file=sys.stderr)
    return summary
