"""RRHF stage 3: fine-tune the base LM on scored.jsonl with `rrhf_loss`, on accelerate.

One process: `llm-envs rrhf ...`. Several processes (DDP; FSDP through `accelerate config`) train
the same model with the same global batch, no code change:

    accelerate launch --multi_gpu --num_processes N --num_machines 1 --mixed_precision no \
        --dynamo_backend no -m benchmarks.cli rrhf --stages train ...

on N GPUs; with `task.device=cpu` the same command runs N CPU processes (gloo), e.g. to try it
without GPUs. `--multi_gpu` is what starts N processes (torch's elastic launcher, which also serves
CPU processes); `accelerate launch --cpu --num_processes N` starts ONE process (its CPU launcher
needs mpirun for more). `torchrun --nproc_per_node N -m benchmarks.cli rrhf ...` works as well.
The precision is `rrhf.mixed_precision` whatever the launch's `--mixed_precision` says (the flags
above only spare accelerate's warnings about unset defaults). The run's process count is
`processes` in `model/rrhf_train.json`.

Each micro-batch holds `queries_per_batch` prompts in total over the processes, with all their
responses, one row per (prompt, response): `prompt ids + response ids + EOS`, right-padded,
labels = the response tokens (prompt and padding are -100). accelerate's `split_batches` gives
each of N processes queries_per_batch / N of them (so queries_per_batch must be divisible by N),
and the updates, the learning-rate schedule and the examples do not depend on N:

- a micro-batch's loss is the mean over its queries; each process weighs its queries by
  N / (queries in the micro-batch) (`query_weights` of `rrhf_loss`), so DDP's mean of the
  processes' gradients is the gradient of that mean, also when the processes' shares differ;
- an epoch's last micro-batch is short when the prompt count is not a multiple of
  queries_per_batch: under several processes it is filled with weight-0 copies of its first
  query (compute, no loss, no gradient), so every process has a share (DDP needs all of them in
  every gradient all-reduce) and the processes see exactly the prompts one process sees
  (accelerate's own `even_batches` would instead count repeats of the epoch's first prompts);
- `train_log.jsonl`'s losses are those of the whole micro-batches (reduced over the processes).

So N processes reach one process's loss curve and weights up to float rounding (summation order,
padding widths; tests/test_rrhf_distributed.py states the tolerance), given a model without
dropout: with dropout the processes draw other masks, the same training in distribution only.

The epoch order is a seeded permutation, so a run restarted from a checkpoint (`checkpoint_every`)
replays the same batches. The model is saved (save_pretrained plus the tokenizer) to `model/`
atomically; `model/rrhf_train.json` marks it complete.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from agents.rrhf.cache import append_jsonl, check_scored, read_jsonl, write_jsonl_atomic
from agents.rrhf.config import RRHFConfig
from agents.rrhf.loss import IGNORE_INDEX, rrhf_loss
from agents.rrhf.stages import SCORED_FILE
from llm_envs.chat import encode_prompt
from llm_envs.io import atomic_replace_dir
from llm_envs.models import context_length, load_causal_lm, load_tokenizer

MODEL_DIR, DONE_FILE, CHECKPOINT_DIR = "model", "rrhf_train.json", "checkpoint"
Example = tuple[list[int], list[list[int]], list[float]]  # prompt ids, response ids (EOS incl.), rewards
LOSS_KEYS = ("loss", "rank_loss", "sft_loss")


def model_is_complete(output_dir: str | os.PathLike) -> bool:
    return (Path(output_dir) / MODEL_DIR / DONE_FILE).is_file()


def tokenize_scored(records: list[dict[str, Any]], tokenizer: Any, max_length: int) -> list[Example]:
    """(prompt ids, [response ids + EOS], rewards) per record; responses cut to fit `max_length`."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no EOS token; RRHF appends EOS to responses.")
    examples = []
    for i, record in enumerate(records):
        check_scored(record, f"{SCORED_FILE} line {i + 1}")
        prompt = encode_prompt(tokenizer, record["query"])  # a chat-rendered query gets no second BOS
        room = max_length - len(prompt)
        if room < 1:
            raise ValueError(
                f"prompt {i} ({record['query'][:80]!r}) has {len(prompt)} tokens, leaving no room for a "
                f"response within max_length={max_length}; raise max_length or drop long prompts "
                "(max_prompt_tokens)."
            )
        responses = [(list(tokenizer(r, add_special_tokens=False)["input_ids"]) + [eos])[:room]
                     for r in record["responses"]]
        examples.append((prompt, responses, [float(s) for s in record["scores"]]))
    return examples


def collate(examples: list[Example], pad_id: int, weights: Sequence[float] | None = None) -> dict[str, torch.Tensor]:
    """Right-padded rows (one per response) with labels on response tokens, rewards, query ids and
    each query's weight in the loss (`weights`; default 1 / len(examples) each: their mean)."""
    if weights is None:
        weights = [1.0 / len(examples)] * len(examples)
    if len(weights) != len(examples):
        raise ValueError(f"{len(weights)} weights for {len(examples)} queries; pass one weight per query.")
    rows, labels, rewards, groups = [], [], [], []
    for q, (prompt, responses, scores) in enumerate(examples):
        for response, reward in zip(responses, scores):
            rows.append(prompt + response)
            labels.append([IGNORE_INDEX] * len(prompt) + response)
            rewards.append(reward)
            groups.append(q)
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    label_t = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for i, (row, label) in enumerate(zip(rows, labels)):
        ids[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), 1
        label_t[i, : len(label)] = torch.tensor(label)
    return {"input_ids": ids, "attention_mask": mask, "labels": label_t,
            "rewards": torch.tensor(rewards, dtype=torch.float32), "groups": torch.tensor(groups),
            "query_weights": torch.tensor(weights, dtype=torch.float32)}


def check_process_count(queries_per_batch: int, num_processes: int) -> None:
    """Refuse a micro-batch that cannot be split evenly over the processes (accelerate's split_batches)."""
    if queries_per_batch % num_processes:
        multiple = -(-queries_per_batch // num_processes) * num_processes
        raise ValueError(
            f"queries_per_batch={queries_per_batch} is the prompts per micro-batch summed over the processes, "
            f"split evenly between them, so it must be divisible by the number of processes ({num_processes}); "
            f"set rrhf.queries_per_batch={multiple} (or another multiple of {num_processes}), or launch a "
            f"number of processes that divides {queries_per_batch}."
        )


def epoch_items(order: Sequence[int], queries_per_batch: int, num_processes: int) -> list[tuple[int, float]]:
    """An epoch's (example index, query weight) items, `queries_per_batch` per micro-batch, in `order`.

    A query weighs 1 / (the queries of its micro-batch), so a micro-batch's loss is their mean. Under
    several processes a short last micro-batch is filled up to `queries_per_batch` with weight-0 copies
    of its first query: accelerate's split_batches splits only full batches evenly (a short one it
    either fills with repeats of the epoch's first prompts, which would count, or leaves some
    processes without a share, whose missing gradient all-reduce would hang the others)."""
    items: list[tuple[int, float]] = []
    for start in range(0, len(order), queries_per_batch):
        batch = order[start: start + queries_per_batch]
        items += [(i, 1.0 / len(batch)) for i in batch]
        if num_processes > 1:
            items += [(batch[0], 0.0)] * (queries_per_batch - len(batch))
    return items


def _lr_at(update: int, total: int, peak: float, warmup: int) -> float:
    """Linear warmup to `peak`, then linear decay to 0 (the paper's schedule)."""
    if update < warmup:
        return peak * (update + 1) / warmup
    return peak * max(0.0, (total - update) / max(1, total - warmup))


def train(cfg: RRHFConfig, lm: str, device: str = "auto", tokenizer: Any = None) -> Path:
    """Stage 3: RRHF fine-tuning of `lm` on `output_dir/scored.jsonl`; returns `output_dir/model`.

    `tokenizer`: the LM's (default: loaded beside it); a chat task passes its chat tokenizer, so
    queries are encoded as rendered prompts and responses end with the template's end of turn."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, set_seed

    out_dir = Path(cfg.output_dir)
    target = out_dir / MODEL_DIR
    if model_is_complete(out_dir):
        return target
    records, clean = read_jsonl(out_dir / SCORED_FILE)
    if not records or not clean:
        raise FileNotFoundError(
            f"{out_dir / SCORED_FILE} is missing or incomplete; run the sample and score stages first "
            "(llm-envs rrhf --stages sample,score)."
        )
    # split_batches: the loader's batch (queries_per_batch) is the global micro-batch, each process
    # takes its 1/N of it, so one process and N train on the same batches.
    accelerator = Accelerator(gradient_accumulation_steps=cfg.grad_accum, mixed_precision=cfg.mixed_precision,
                              cpu=device == "cpu", dataloader_config=DataLoaderConfiguration(split_batches=True))
    check_process_count(cfg.queries_per_batch, accelerator.num_processes)
    set_seed(cfg.seed)
    if tokenizer is None:
        tokenizer = load_tokenizer(lm, padding_side="right")
    model = load_causal_lm(lm, device="cpu")
    model.requires_grad_(True)
    model.train()
    limit = context_length(model)
    max_length = cfg.max_length or limit or 1024
    if limit and max_length > limit:
        raise ValueError(f"max_length={max_length} exceeds the model's context of {limit} tokens; use <= {limit}.")
    examples = tokenize_scored(records, tokenizer, max_length)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    model, optimizer = accelerator.prepare(model, optimizer)

    def epoch_loader(epoch: int) -> DataLoader:
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(cfg.seed + epoch)).tolist()
        items = epoch_items(order, cfg.queries_per_batch, accelerator.num_processes)
        loader = DataLoader(items, batch_size=cfg.queries_per_batch, collate_fn=lambda batch: collate(
            [examples[i] for i, _ in batch], tokenizer.pad_token_id, [weight for _, weight in batch]))
        return accelerator.prepare(loader)

    per_epoch = math.ceil(len(epoch_loader(0)) / cfg.grad_accum)
    total = per_epoch * cfg.epochs if cfg.max_steps is None else min(cfg.max_steps, per_epoch * cfg.epochs)
    warmup = int(cfg.warmup_ratio * total)
    update, checkpoint = 0, out_dir / CHECKPOINT_DIR
    if (checkpoint / "progress.json").is_file():
        accelerator.load_state(str(checkpoint))
        update = json.loads((checkpoint / "progress.json").read_text())["update"]
    log_path = out_dir / "train_log.jsonl"
    if accelerator.is_main_process:  # keep the log of the updates this run resumes from, no more
        write_jsonl_atomic(log_path, [r for r in read_jsonl(log_path)[0] if r.get("update", 0) <= update])
    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=update, desc="rrhf train", file=sys.stderr, leave=False,
               disable=not (cfg.progress and accelerator.is_main_process))
    # This process's share of each micro-batch's losses, summed over the micro-batches since the last log line.
    sums, micro = torch.zeros(len(LOSS_KEYS), device=accelerator.device), 0
    started = time.perf_counter()
    while update < total:
        epoch = update // per_epoch
        loader = epoch_loader(epoch)
        loader = accelerator.skip_first_batches(loader, (update % per_epoch) * cfg.grad_accum)
        for batch in loader:
            with accelerator.accumulate(model):
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                # A process's queries weigh N / (the micro-batch's queries): DDP averages the N processes'
                # gradients, which is then the gradient of the mean over the whole micro-batch.
                parts = rrhf_loss(logits, batch["labels"], batch["rewards"], batch["groups"],
                                  rank_weight=cfg.rank_weight, sft_weight=cfg.sft_weight,
                                  sft_normalization=cfg.sft_normalization,
                                  query_weights=batch["query_weights"] * accelerator.num_processes)
                accelerator.backward(parts.loss)
                if accelerator.sync_gradients:
                    if cfg.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                    for group in optimizer.param_groups:
                        group["lr"] = _lr_at(update, total, cfg.lr, warmup)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            sums += torch.stack([getattr(parts, key).detach().float() for key in LOSS_KEYS])
            micro += 1
            if not accelerator.sync_gradients:
                continue
            update += 1
            bar.update(1)
            if update % cfg.log_every == 0 or update == total:  # the same updates on every process
                # The mean over the processes of their N-weighted shares: the whole micro-batches' losses.
                means = (accelerator.reduce(sums, reduction="mean") / micro).tolist()
                row: dict[str, Any] = {k: round(v, 5) for k, v in zip(LOSS_KEYS, means)}
                row.update(update=update, epoch=epoch, lr=_lr_at(update - 1, total, cfg.lr, warmup))
                bar.set_postfix(loss=row["loss"], rank=row["rank_loss"], sft=row["sft_loss"])
                if accelerator.is_main_process:
                    append_jsonl(log_path, [row])
                sums, micro = torch.zeros_like(sums), 0
            if cfg.checkpoint_every and update % cfg.checkpoint_every == 0 and update < total:
                _checkpoint(accelerator, checkpoint, update)
            if update >= total:
                break
    bar.close()

    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    state = accelerator.get_state_dict(model)
    summary = {"updates": total, "updates_per_epoch": per_epoch, "queries": len(examples),
               "responses": sum(len(e[1]) for e in examples), "processes": accelerator.num_processes,
               "seconds": round(time.perf_counter() - started, 1), "base_lm": lm}
    if accelerator.is_main_process:
        def save(directory: Path) -> None:
            unwrapped.save_pretrained(directory, state_dict=state, save_function=accelerator.save)
            tokenizer.padding_side = "left"  # how decoders load it
            tokenizer.save_pretrained(directory)
            (directory / DONE_FILE).write_text(json.dumps(summary, indent=2))

        atomic_replace_dir(target, save)
        shutil.rmtree(checkpoint, ignore_errors=True)
    accelerator.wait_for_everyone()
    return target


def _checkpoint(accelerator: Any, checkpoint: Path, update: int) -> None:
    """accelerate state (model, optimizer, RNG) + the update count, swapped in atomically."""
    staging = checkpoint.with_name(checkpoint.name + ".tmp")
    accelerator.save_state(str(staging))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (staging / "progress.json").write_text(json.dumps({"update": update}))
        if checkpoint.exists():
            shutil.rmtree(checkpoint)
        os.replace(staging, checkpoint)
    accelerator.wait_for_everyone()
