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
from typing import Any, Callable, Sequence

from agents.decoding import diverse_beam_search, encode_prompts, generate_responses
from agents.rrhf.cache import append_jsonl, check_scored, read_jsonl, resume_jsonl
from agents.rrhf.config import RRHFConfig
from llm_envs.chat import chat_format_of
from llm_envs.data import load_prompts
from llm_envs.models import load_causal_lm, load_tokenizer
from llm_envs.reward_spec import RewardTerm
from llm_envs.rewards import RewardWrapper, cut_at_turn
from llm_envs.task import Task, lm_chat_tokenizer

SAMPLES_FILE, SCORED_FILE = "samples.jsonl", "scored.jsonl"


@dataclass
class Sources:
    """The task resolved for RRHF: models, the sampled train prompts, the dataset's own responses."""

    lm: str
    reward: str | tuple[RewardTerm, ...]  # one model, or a weighted sum (`llm_envs.reward_spec`)
    train_prompts: list[str]
    dataset_responses: str | None  # path of a {prompt, response} JSONL, or None
    eval_prompts: list[str] | None
    device: str = "auto"
    gold: Callable[[list[str], list[str]], Sequence[float]] | None = None
    world_path: str | None = None
    world_hash: str | None = None  # the world's content hash when the task uses the world
    notes: dict[str, Any] = field(default_factory=dict)
    chat_template: bool = False  # prompts are rendered through the LM's chat template (task.chat_template)
    system_prompt: str | None = None
    train_messages: list[str] | None = None  # the user messages of rendered train prompts (dataset lookups)
    reward_kwargs: dict[str, Any] = field(default_factory=dict)  # the task's reward rules / tokenizer (build)

    def lm_tokenizer(self, padding_side: str = "left") -> Any:
        """The LM's tokenizer as every stage uses it: on a chat task the chat tokenizer (rendered prompts get
        no second BOS; its EOS is the template's end of turn, which RRHF also appends to responses)."""
        return task_tokenizer(self.lm, self.chat_template, self.system_prompt, padding_side)


def task_tokenizer(lm: str, chat_template: bool, system_prompt: str | None, padding_side: str = "left") -> Any:
    tokenizer = load_tokenizer(lm, padding_side=padding_side)
    return lm_chat_tokenizer(tokenizer, system_prompt) if chat_template else tokenizer


def resolve_sources(cfg: RRHFConfig, task: Task, *, with_eval: bool = True) -> Sources:
    """The task's models and prompts (the world fills unset parts), sampled as `cfg` says."""
    resolved = task.resolve(progress=cfg.progress)
    tokenizer = (task_tokenizer(resolved.lm, task.chat_template, task.system_prompt)
                 if task.max_prompt_tokens or task.chat_template else None)
    chat = chat_format_of(tokenizer)  # the one place RRHF's prompts are rendered (load_prompts)
    prompt_set = load_prompts(resolved.train_prompts, tokenizer=tokenizer, max_prompt_tokens=task.max_prompt_tokens,
                              num_prompts=cfg.num_prompts, seed=cfg.seed, chat=chat)
    responses = cfg.dataset_responses
    if responses == "auto":  # the world's SFT corpus holds the world prompts' own responses
        corpus = resolved.sft_corpus
        responses = str(corpus) if resolved.on_world_prompts and corpus is not None else None
    eval_prompts = None
    if with_eval:
        eval_prompts = load_prompts(resolved.eval_prompts, num_prompts=cfg.eval_num_prompts, seed=cfg.seed,
                                    chat=chat).prompts
    return Sources(lm=resolved.lm, reward=resolved.reward, train_prompts=prompt_set.prompts,
                   dataset_responses=responses, eval_prompts=eval_prompts, device=task.device, gold=resolved.gold,
                   world_path=resolved.world_path, world_hash=resolved.world_hash,
                   notes={"dropped_too_long": prompt_set.dropped_too_long}, chat_template=task.chat_template,
                   system_prompt=task.system_prompt, train_messages=prompt_set.messages,
                   reward_kwargs=resolved.reward_kwargs())


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


def sample(cfg: RRHFConfig, sources: Sources) -> Path:
    """Stage 1: k responses per training prompt from the base LM (+ the dataset's own) -> samples.jsonl."""
    out = Path(cfg.output_dir) / SAMPLES_FILE
    out.parent.mkdir(parents=True, exist_ok=True)
    prompts = sources.train_prompts
    done = resume_jsonl(out, prompts, align=cfg.sample_batch_size)
    if len(done) == len(prompts):
        return out
    model = load_causal_lm(sources.lm, device=sources.device)
    tokenizer = sources.lm_tokenizer()
    # The dataset's rows hold the plain prompts: on a chat task, look them up by user message.
    keys = dict(zip(prompts, sources.train_messages or prompts))
    by_key = (load_dataset_responses(sources.dataset_responses, list(keys.values()), cfg.responses_per_prompt)
              if sources.dataset_responses else {})
    provided = {p: by_key[k] for p, k in keys.items() if k in by_key}
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


def score(cfg: RRHFConfig, sources: Sources) -> Path:
    """Stage 2: score every sampled response with the reward wrapper -> scored.jsonl."""
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
    tokenizer = sources.lm_tokenizer()  # a chat tokenizer tells the wrapper how prompts are rendered
    reward = RewardWrapper.build(sources.reward, lm_tokenizer=tokenizer, device=sources.device,
                                 batch_size=cfg.score_batch_size, **sources.reward_kwargs)
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
