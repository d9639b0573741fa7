"""Running the RRHF stages in order, resuming, and the evaluation (base vs RRHF greedy, best-of-n).

`run(cfg)` checks the output directory (a stage's output made with other settings is never mixed
with new results), writes the resolved config beside the outputs, then runs each requested stage;
a stage whose output is complete is skipped. Under `accelerate launch` only the main process
samples, scores and evaluates; every process trains.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import yaml

from agents.rrhf.cache import read_jsonl
from agents.rrhf.config import EVAL_FIELDS, SAMPLE_FIELDS, SCORE_FIELDS, TRAIN_FIELDS, RRHFConfig
from agents.rrhf.stages import SAMPLES_FILE, SCORED_FILE, Sources, resolve_sources, sample, score
from agents.rrhf.training import CHECKPOINT_DIR, DONE_FILE, MODEL_DIR, model_is_complete, train
from llm_envs.config import ConfigError, load_config, save_config, to_dict
from llm_envs.io import atomic_write_json

STAGES = ("sample", "score", "train", "eval")
CONFIG_FILE, EVAL_FILE = "config.yaml", "eval.json"


def load_rrhf_config(path: str | os.PathLike | None, overrides: Sequence[str] = ()) -> RRHFConfig:
    """An `RRHFConfig` from a YAML file (its `rrhf:` section when it has one) and `key=value` overrides."""
    section = None
    if path is not None and Path(path).is_file():
        data = yaml.safe_load(Path(path).read_text()) or {}
        section = "rrhf" if isinstance(data, dict) and isinstance(data.get("rrhf"), dict) else None
    return load_config(RRHFConfig, path, overrides, section=section)


def check_output_dir(cfg: RRHFConfig) -> None:
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
    old, new = yaml.safe_load(saved.read_text()) or {}, to_dict(cfg)
    for name, exists, fields in outputs:
        changed = [k for k in fields if exists and k in old and old[k] != new[k]]
        if changed:
            k = changed[0]
            raise ConfigError(
                f"{out / name} was made with {k}={old[k]!r} but the config now says {k}={new[k]!r}. Use a new "
                f"output_dir, set {k}={old[k]!r} back, or delete {out / name} (and what follows it) to redo it."
            )


def _mean_ci(values: Sequence[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=float)
    half = 1.96 * arr.std(ddof=1) / math.sqrt(len(arr)) if len(arr) > 1 else 0.0
    return round(float(arr.mean()), 4), round(float(half), 4)


def evaluate(cfg: RRHFConfig, sources: Sources) -> dict[str, Any]:
    """Greedy decoding of the base and the RRHF-tuned LM, and best-of-n of the base LM, on the eval
    prompts; every answer scored by the same reward wrapper (and the world's gold judge)."""
    from agents.decoding import BestOfNDecoder, GreedyDecoder
    from llm_envs.models import load_tokenizer
    from llm_envs.rewards import RewardWrapper

    if not sources.eval_prompts:
        raise ValueError("no evaluation prompts: set eval_prompts (e.g. 'world:test') or drop the eval stage.")
    prompts, max_new = sources.eval_prompts, cfg.eval_max_new_tokens or cfg.max_new_tokens
    tokenizer = load_tokenizer(sources.lm)
    reward = RewardWrapper.build(sources.reward, lm_tokenizer=tokenizer, device=cfg.device,
                                 batch_size=cfg.score_batch_size)
    gold = RewardWrapper.from_callable(sources.gold, name="gold") if sources.gold else None
    decoders: dict[str, Any] = {
        "base_greedy": lambda: GreedyDecoder(sources.lm, device=cfg.device),
        "rrhf_greedy": lambda: GreedyDecoder(str(Path(cfg.output_dir) / MODEL_DIR), device=cfg.device),
    }
    if cfg.eval_best_of:
        decoders[f"base_best_of_{cfg.eval_best_of}"] = lambda: BestOfNDecoder(
            sources.lm, reward=reward, n=cfg.eval_best_of, device=cfg.device)
    methods: dict[str, Any] = {}
    for name, make in decoders.items():
        decoder = make()
        started = time.perf_counter()
        gens = decoder.generate(prompts, max_new_tokens=max_new, seed=cfg.seed)
        seconds = time.perf_counter() - started
        texts = [g.response_text for g in gens]
        rm = reward.score(prompts, texts)
        row: dict[str, Any] = {"reward_mean": _mean_ci(rm)[0], "reward_ci95": _mean_ci(rm)[1]}
        if gold is not None:
            g_scores = gold.score(prompts, texts)
            row.update(gold_mean=_mean_ci(g_scores)[0], gold_ci95=_mean_ci(g_scores)[1])
        row.update(
            mean_length=round(float(np.mean([len(g.response_ids) for g in gens])), 2),
            lm_forwards_per_response=round(float(np.mean([g.lm_forwards for g in gens])), 2),
            rm_calls_per_response=round(float(np.mean([g.rm_calls for g in gens])), 2),
            seconds_per_response=round(seconds / len(prompts), 5),
            examples=[{"prompt": p, "response": t} for p, t in list(zip(prompts, texts))[:3]],
        )
        methods[name] = row
    return {"num_prompts": len(prompts), "max_new_tokens": max_new, "seed": cfg.seed,
            "reward": sources.reward, "gold": "world gold judge" if gold else None, "methods": methods}


def _print_eval(result: dict[str, Any]) -> None:
    print(f"RRHF evaluation on {result['num_prompts']} held-out prompts (reward: {result['reward']})")
    for name, row in result["methods"].items():
        gold = f"  gold {row['gold_mean']:+.3f} ± {row['gold_ci95']:.3f}" if "gold_mean" in row else ""
        print(f"  {name:18s} RM {row['reward_mean']:+.3f} ± {row['reward_ci95']:.3f}{gold}  "
              f"len {row['mean_length']:.1f}  rm_calls {row['rm_calls_per_response']:g}")


def _eval_stage(cfg: RRHFConfig, sources: Sources, verbose: bool) -> dict[str, Any] | None:
    """`evaluate`, skipped when eval.json already holds it for these settings and this model."""
    out = Path(cfg.output_dir)
    if sources.eval_prompts is None:
        return None
    if not model_is_complete(out):
        raise FileNotFoundError(f"{out / MODEL_DIR} is not trained yet; run the train stage first.")
    settings = {k: v for k, v in to_dict(cfg).items() if k in EVAL_FIELDS}
    settings["model"] = json.loads((out / MODEL_DIR / DONE_FILE).read_text())
    previous = json.loads((out / EVAL_FILE).read_text()) if (out / EVAL_FILE).is_file() else {}
    result = previous
    if previous.get("config") != settings:
        result = {**evaluate(cfg, sources), "config": settings}
        atomic_write_json(out / EVAL_FILE, result)
    if verbose:
        _print_eval(result)
    return result


def _stamp(path: Path) -> tuple[int, int] | None:
    return (path.stat().st_size, path.stat().st_mtime_ns) if path.exists() else None


def run(cfg: RRHFConfig, stages: Sequence[str] = STAGES, *, verbose: bool = True) -> dict[str, Any]:
    """Run the requested stages in order (skipping complete ones); returns what each produced."""
    from accelerate import PartialState

    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage {unknown[0]!r}; expected some of {list(STAGES)} (in any order).")
    if cfg.num_threads is not None:
        import torch

        torch.set_num_threads(cfg.num_threads)
    state = PartialState(cpu=cfg.device == "cpu")
    out = Path(cfg.output_dir)
    if state.is_main_process:
        check_output_dir(cfg)
        save_config(cfg, out / CONFIG_FILE)
    with_eval = "eval" in stages and cfg.eval_prompts is not None
    sources = resolve_sources(cfg, with_eval=with_eval) if state.is_main_process else None
    state.wait_for_everyone()  # the main process builds the world if needed, the others then load it
    sources = sources or resolve_sources(cfg, with_eval=with_eval)
    summary: dict[str, Any] = {"output_dir": str(out), "lm": sources.lm, "reward": sources.reward,
                               "train_prompts": len(sources.train_prompts), "world": sources.world_path}
    outputs = {"sample": out / SAMPLES_FILE, "score": out / SCORED_FILE,
               "train": out / MODEL_DIR / DONE_FILE, "eval": out / EVAL_FILE}
    for stage in (s for s in STAGES if s in stages):
        started, before = time.perf_counter(), _stamp(outputs[stage])
        if stage == "train":
            summary["model"] = str(train(cfg, sources.lm))
            summary["train"] = json.loads((out / MODEL_DIR / DONE_FILE).read_text())
        elif state.is_main_process:
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
                summary["eval"] = _eval_stage(cfg, sources, verbose)
        state.wait_for_everyone()
        skipped = before is not None and _stamp(outputs[stage]) == before
        took = f"{time.perf_counter() - started:.1f} s"
        if stage == "eval" and summary.get("eval") is None:
            took = "skipped (no eval prompts: set eval_prompts)"
        summary.setdefault("stages", {})[stage] = "skipped (complete)" if skipped else took
        if verbose and state.is_main_process:
            print(f"rrhf: {stage}: {summary['stages'][stage]}", file=sys.stderr)
    return summary
