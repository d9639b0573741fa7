"""RRHF stages 1 and 2: sample k responses per training prompt, then score them with the reward wrapper.

    samples.jsonl  {"query", "responses", "sources"}  one line per prompt, in prompt order
    scored.jsonl   {"query", "responses", "scores"}   the reference code's format

Both stages append whole batches (fsynced) and resume from the valid prefix of their file; a stage
whose file holds every prompt is skipped.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from agents.decoding import diverse_beam_search, encode_prompts, generate_responses
from agents.rrhf.cache import append_jsonl, check_scored, read_jsonl, resume_jsonl
from agents.rrhf.config import RRHFConfig
from llm_envs.data import load_prompts
from llm_envs.models import load_causal_lm, load_tokenizer
from llm_envs.rewards import RewardWrapper, cut_at_turn

SAMPLES_FILE, SCORED_FILE = "samples.jsonl", "scored.jsonl"


@dataclass
class Sources:
    """What a config points at, with the embedded world filling every unset part."""

    lm: str
    reward: str
    train_prompts: list[str]
    dataset_responses: str | None  # path of a {prompt, response} JSONL, or None
    eval_prompts: list[str] | None
    gold: Callable[[list[str], list[str]], list[float]] | None = None
    world_path: str | None = None
    notes: dict[str, Any] = field(default_factory=dict)


def _world_split(world: Any, source: str) -> list[str]:
    splits = {"world:train": "train_prompts", "world:test": "test_prompts"}
    if source not in splits:
        raise ValueError(f"prompt source {source!r} is not a world split; expected one of {sorted(splits)}.")
    return list(getattr(world, splits[source]))


def resolve_sources(cfg: RRHFConfig, *, with_eval: bool = True) -> Sources:
    """Resolve lm / reward / prompts / dataset responses / eval prompts (loading the world if needed)."""
    world = None
    source = cfg.prompts or "world:train"
    on_world = source.startswith("world:")
    eval_source = cfg.eval_prompts if with_eval else None
    if eval_source == "auto":  # the world's test split when training on the world's prompts, else no eval
        eval_source = "world:test" if on_world else None
    needs_world = (cfg.lm is None or cfg.reward is None or on_world
                   or (eval_source is not None and eval_source.startswith("world:")))
    if needs_world:
        from llm_envs.world import load_world

        world = load_world(cfg.world, cfg.world_seed, cfg.world_cache_dir, progress=cfg.progress)
    lm = cfg.lm if cfg.lm is not None else str(world.lm_dir)
    reward = cfg.reward if cfg.reward is not None else str(world.rm_dir)
    tokenizer = load_tokenizer(lm) if cfg.max_prompt_tokens else None
    raw: Any = _world_split(world, source) if on_world else source
    prompt_set = load_prompts(raw, split=cfg.prompt_split, column=cfg.prompt_column, tokenizer=tokenizer,
                              max_prompt_tokens=cfg.max_prompt_tokens, num_prompts=cfg.num_prompts, seed=cfg.seed)
    responses = cfg.dataset_responses
    if responses == "auto":
        responses = str(world.path / "sft_corpus.jsonl") if on_world and world is not None else None
    eval_prompts = None
    if eval_source is not None:
        raw = _world_split(world, eval_source) if eval_source.startswith("world:") else eval_source
        eval_prompts = load_prompts(raw, num_prompts=cfg.eval_num_prompts, seed=cfg.seed).prompts
    return Sources(lm=lm, reward=reward, train_prompts=prompt_set.prompts, dataset_responses=responses,
                   eval_prompts=eval_prompts,
                   gold=world.gold if world is not None and eval_source and eval_source.startswith("world:") else None,
                   world_path=str(world.path) if world is not None else None,
                   notes={"dropped_too_long": prompt_set.dropped_too_long})


def load_dataset_responses(path: str, prompts: list[str], per_prompt: int) -> dict[str, list[str]]:
    """The first `per_prompt` distinct responses of each prompt in a JSONL of {prompt, response}
    (or HH-style {prompt, chosen, rejected}) rows."""
    wanted = set(prompts)
    found: dict[str, list[str]] = {}
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(
            f"dataset_responses={path!r} does not exist; pass a .jsonl of {{prompt, response}} rows, or "
            "null to train on sampled responses only."
        )
    with open(file, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            texts = [row[k] for k in ("response", "chosen", "rejected") if isinstance(row.get(k), str)]
            if "prompt" not in row or not texts:
                raise ValueError(
                    f"{path}:{n}: expected a 'prompt' and a 'response' (or 'chosen'/'rejected') field, got "
                    f"keys {sorted(row)}."
                )
            if row["prompt"] not in wanted:
                continue
            bucket = found.setdefault(row["prompt"], [])
            for text in texts:
                if len(bucket) < per_prompt and text not in bucket:
                    bucket.append(text)
    return found


def _progress(total: int, done: int, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=done, desc=desc, file=sys.stderr, disable=not enabled, leave=False)


def sample(cfg: RRHFConfig, sources: Sources | None = None) -> Path:
    """Stage 1: k responses per training prompt from the base LM (+ the dataset's own) -> samples.jsonl."""
    sources = sources or resolve_sources(cfg, with_eval=False)
    out = Path(cfg.output_dir) / SAMPLES_FILE
    out.parent.mkdir(parents=True, exist_ok=True)
    prompts = sources.train_prompts
    done = resume_jsonl(out, prompts, align=cfg.sample_batch_size)
    if len(done) == len(prompts):
        return out
    model = load_causal_lm(sources.lm, device=cfg.device)
    tokenizer = load_tokenizer(sources.lm)
    provided = (load_dataset_responses(sources.dataset_responses, prompts, cfg.responses_per_prompt)
                if sources.dataset_responses else {})
    bar = _progress(len(prompts), len(done), f"rrhf sample ({cfg.sampling})", cfg.progress)
    for start in range(len(done), len(prompts), cfg.sample_batch_size):
        batch = prompts[start : start + cfg.sample_batch_size]
        ids = encode_prompts(tokenizer, batch)
        if cfg.sampling == "diverse_beam":
            sampled = diverse_beam_search(model, tokenizer, ids, max_new_tokens=cfg.max_new_tokens,
                                          num_beams=cfg.num_samples, num_beam_groups=cfg.num_samples,
                                          diversity_penalty=cfg.diversity_penalty, batch_size=len(batch))
        else:
            kwargs: dict[str, Any] = (
                {"do_sample": False, "num_beams": cfg.num_samples} if cfg.sampling == "beam"
                else {"do_sample": True, "top_k": 0, "top_p": cfg.top_p, "temperature": cfg.temperature}
            )
            sampled = generate_responses(model, tokenizer, ids, max_new_tokens=cfg.max_new_tokens,
                                         num_return_sequences=cfg.num_samples,
                                         batch_size=len(batch) * cfg.num_samples, seed=cfg.seed + start, **kwargs)
        records = []
        for prompt, rows in zip(batch, sampled):
            texts = [tokenizer.decode(r, skip_special_tokens=True) for r in rows]
            if cfg.cut_at_turn:
                texts = [cut_at_turn(t) for t in texts]
            extra = provided.get(prompt, [])
            records.append({"query": prompt, "responses": texts + extra,
                            "sources": [cfg.sampling] * len(texts) + ["dataset"] * len(extra)})
        append_jsonl(out, records)
        bar.update(len(batch))
    bar.close()
    return out


def score(cfg: RRHFConfig, sources: Sources | None = None) -> Path:
    """Stage 2: score every sampled response with the reward wrapper -> scored.jsonl."""
    sources = sources or resolve_sources(cfg, with_eval=False)
    samples_path = Path(cfg.output_dir) / SAMPLES_FILE
    samples, clean = read_jsonl(samples_path)
    if not clean or len(samples) != len(sources.train_prompts):
        raise FileNotFoundError(
            f"{samples_path} holds {len(samples)} of {len(sources.train_prompts)} prompts' samples; run the "
            "sample stage first (llm-envs rrhf --stages sample)."
        )
    out = Path(cfg.output_dir) / SCORED_FILE
    done = resume_jsonl(out, [s["query"] for s in samples])
    if len(done) == len(samples):
        return out
    tokenizer = load_tokenizer(sources.lm)
    reward = RewardWrapper.build(sources.reward, lm_tokenizer=tokenizer, device=cfg.device,
                                 batch_size=cfg.score_batch_size)
    chunk = max(1, 4 * cfg.score_batch_size // max(1, len(samples[0]["responses"])))
    bar = _progress(len(samples), len(done), "rrhf score", cfg.progress)
    for start in range(len(done), len(samples), chunk):
        batch = samples[start : start + chunk]
        prompts = [s["query"] for s in batch for _ in s["responses"]]
        scores = reward.score(prompts, [r for s in batch for r in s["responses"]])
        records, at = [], 0
        for s in batch:
            n = len(s["responses"])
            record = {"query": s["query"], "responses": s["responses"], "scores": scores[at : at + n]}
            check_scored(record, str(out))
            records.append(record)
            at += n
        append_jsonl(out, records)
        bar.update(len(batch))
    bar.close()
    return out
