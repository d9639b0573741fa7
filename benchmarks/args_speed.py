"""ARGS-greedy decoding speed relative to greedy decoding of the same LM (ARGS paper: ~1.9x at k=10),
and relative to its own limit.

Times fixed-length decoding (no EOS stop, so every method generates the same number of tokens) of
the embedded world's SFT LM, guided by its reward model, at batch 1 and batch 16 prompts:

- `greedy`: argmax decoding on the same batched `DecodeEngine` ARGS runs on (the fair floor);
- `hf_greedy`: HF `generate(do_sample=False)` (for reference);
- `args_greedy`: `agents.args.ARGS(k, w)` with the reward model's prefix KV cache (the default);
- `args_greedy_no_cache`: the same, every candidate scored from scratch (what the cache saves);
- `limit`: ARGS's own limit, the forwards it cannot avoid and nothing else, on the same LM and
  reward model: per batch of prompts, a bare left-padded LM prefill and T - 1 bare batched
  single-token LM forwards on a HF ``DynamicCache`` (argmax fed back; `benchmarks.throughput`'s
  limit loop), plus a bare reward-model prefill of the prompts and T - 1 bare batched reward-model
  forwards of k candidate tokens per row on its ``DynamicCache`` (a 4-D mask: each candidate sees
  the row's prefix and itself, all at the prefix's next position; the first candidate's slot is
  kept as the row's next token, the others cropped), the score head read at every candidate.
  T LM forwards and T reward-model forwards, as ARGS runs (its first reward-model forward also
  scores the first candidates, the limit's prefill does not: the limit is, if anything, fast).
  Host-side input building is not timed; each forward is.

Reports seconds per generated token (median of the rounds, and the best round), the ratio to
`greedy`, batched LM forwards / reward-model calls per decoding step and per generated token, and
``args_over_limit`` = the limit's time per token / ARGS-greedy's (both their best round; 1 = ARGS
costs only its forwards; issue 16 asks >= 0.8 at batch 16). Writes
`benchmarks/results/args_speed.{json,md}` (``--quick``: `args_speed_quick.{json,md}`).

    python -m benchmarks.args_speed                      # default world, k=10, w=1.5
    python -m benchmarks.args_speed --quick              # 16 tokens, 2 rounds, no hf / no-cache rows
    python -m benchmarks.args_speed --world test --tokens 32 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.provenance import git_commit
from llm_envs.io import atomic_write_text

RESULTS = Path(__file__).resolve().parent / "results"


@torch.inference_mode()
def engine_greedy(model: Any, prompt_ids: list[list[int]], tokens: int, batch: int) -> dict[str, Any]:
    """Argmax decoding on a DecodeEngine, `batch` prompts at a time, exactly `tokens` tokens each."""
    from llm_envs.engine import DecodeEngine

    forwards = 0
    for start in range(0, len(prompt_ids), batch):
        chunk = prompt_ids[start : start + batch]
        engine = DecodeEngine(model, len(chunk))
        logits = engine.reset_rows(range(len(chunk)), chunk).logits
        for step in range(tokens):
            chosen = logits.argmax(-1)
            if step < tokens - 1:
                logits = engine.append(chosen).logits
        forwards += engine.forward_calls
    return {"lm_forwards": forwards, "rm_calls": 0}


@torch.inference_mode()
def hf_greedy(model: Any, tokenizer: Any, prompt_ids: list[list[int]], tokens: int, batch: int) -> dict[str, Any]:
    from agents.decoding import generate_responses

    generate_responses(model, tokenizer, prompt_ids, max_new_tokens=tokens, min_new_tokens=tokens,
                       batch_size=batch, do_sample=False)
    return {"lm_forwards": -(-len(prompt_ids) // batch) * tokens, "rm_calls": 0}


# ---------------------------------------------------------------------------------------- ARGS's limit
def _keep_slots(cache: Any, length: int) -> None:
    """Keep the first `length` slots of every layer of a DynamicCache (views, no copy).

    Written against the layers rather than `DynamicCache.crop`, whose argument changed meaning in
    transformers 5.24 (a count to remove instead of the length to keep)."""
    for layer in cache.layers:
        if layer.is_initialized:
            layer.keys, layer.values = layer.keys[..., :length, :], layer.values[..., :length, :]


@torch.inference_mode()
def rm_limit_episode(rm: Any, prompts: list[list[int]], k: int, forwards: int) -> tuple[float, float, torch.Tensor]:
    """A bare reward-model prefill of `prompts`, then `forwards` batched forwards of k candidates (ids 0 .. k - 1)
    per row on its DynamicCache. Returns (prefill seconds, candidate-forward seconds, the last forward's scores
    [n, k]: of prompt + [0] * (forwards - 1) + [j], so a test can check the limit does the real work).

    Each candidate sees its row's prefix and itself (a 4-D additive mask), all k at the prefix's next
    position; the score head reads every candidate. Afterwards the first candidate's slot stays as the
    row's next token and the rest are cropped, so the prefix grows by one token a step, as in ARGS
    (whose prefix cache moves the chosen candidate's slot to the row's length)."""
    from transformers import DynamicCache

    from benchmarks.throughput import _sync, left_padded
    from llm_envs.models import cache_kwargs

    base, head, device, dtype = rm.base_model, rm.score, rm.device, rm.dtype
    ids, attn, pos = left_padded(prompts, device)
    n = ids.shape[0]
    candidates = torch.arange(k, device=device).expand(n, k)  # any k ids: the cost does not depend on them
    scores = torch.zeros(n, k, device=device)
    own = torch.eye(k, dtype=torch.bool, device=device).expand(n, k, k)
    cache = DynamicCache(config=rm.config)
    _sync(device)
    start = time.perf_counter()
    out = base(input_ids=ids, attention_mask=attn, position_ids=pos, **cache_kwargs(base, cache), use_cache=True)
    head(out.last_hidden_state[:, -1:])
    _sync(device)
    prefill = time.perf_counter() - start
    seen, position = attn.bool(), attn.sum(1, keepdim=True)
    start = time.perf_counter()
    for _ in range(forwards):
        allowed = torch.cat([seen[:, None, :].expand(n, k, seen.shape[1]), own], 2)
        additive = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, torch.finfo(dtype).min)
        out = base(input_ids=candidates, attention_mask=additive[:, None], position_ids=position.expand(n, k),
                   **cache_kwargs(base, cache), use_cache=True)
        scores = head(out.last_hidden_state)[..., 0]
        _keep_slots(cache, seen.shape[1] + 1)
        seen, position = torch.cat([seen, seen.new_ones(n, 1)], 1), position + 1
    _sync(device)
    return prefill, time.perf_counter() - start, scores


def args_limit(model: Any, rm: Any, prompt_ids: list[list[int]], tokens: int, batch: int, k: int) -> dict[str, Any]:
    """ARGS's limit on `prompt_ids`, `batch` at a time: per batch the LM's prefill and T - 1 single-token
    forwards, the reward model's prefill and T - 1 forwards of k candidates per row (see the module
    docstring). Self-timed: the returned ``seconds`` count the forwards only."""
    from benchmarks.throughput import _limit_episode

    lm_s = rm_s = 0.0
    for start in range(0, len(prompt_ids), batch):
        chunk = [list(p) for p in prompt_ids[start : start + batch]]
        lm_prefill, lm_decode, _ = _limit_episode(model, chunk, tokens - 1)
        rm_prefill, rm_decode, _ = rm_limit_episode(rm, chunk, k, tokens - 1)
        lm_s, rm_s = lm_s + lm_prefill + lm_decode, rm_s + rm_prefill + rm_decode
    chunks = -(-len(prompt_ids) // batch)
    return {"lm_forwards": chunks * tokens, "rm_calls": chunks * tokens, "seconds": lm_s + rm_s,
            "lm_seconds": lm_s, "rm_seconds": rm_s}


# ---------------------------------------------------------------------------------------- timing
Timed = dict[str, tuple[list[float], list[dict[str, Any]]]]


def _time(methods: dict[str, Callable[[], dict[str, Any]]], repeats: int, device: torch.device) -> Timed:
    """Each method's time and counts in every round (a method that times itself returns ``seconds``).
    Methods take turns in every round, so load from other processes on the machine falls on all of
    them alike."""
    from benchmarks.throughput import _sync

    for fn in methods.values():
        fn()  # warm-up (allocations, the prefix cache's first-use check)
    times: dict[str, list[float]] = {name: [] for name in methods}
    counts: dict[str, list[dict[str, Any]]] = {name: [] for name in methods}
    for _ in range(repeats):
        for name, fn in methods.items():
            _sync(device)
            start = time.perf_counter()
            got = fn()
            _sync(device)
            times[name].append(got.get("seconds", time.perf_counter() - start))
            counts[name].append(got)
    return {name: (times[name], counts[name]) for name in methods}


def _batch_methods(args: argparse.Namespace, world: Any, model: Any, tokenizer: Any, prompts: list[str],
                   prompt_ids: list[list[int]], batch: int) -> tuple[dict[str, Callable[[], dict[str, Any]]], int]:
    """The timed methods at one batch size, and the reward model's parameter count."""
    from agents.args import ARGS
    from llm_envs.rewards import RewardWrapper

    methods: dict[str, Callable[[], dict[str, Any]]] = {
        "greedy": lambda: engine_greedy(model, prompt_ids, args.tokens, batch)}
    if not args.quick:
        methods["hf_greedy"] = lambda: hf_greedy(model, tokenizer, prompt_ids, args.tokens, batch)
    rm_parameters = 0
    for name, cache in (("args_greedy", True), ("args_greedy_no_cache", False)):
        if args.quick and not cache:
            continue
        reward = RewardWrapper.from_model(world.rm_dir, lm_tokenizer=tokenizer, device=args.device,
                                          batch_size=max(32, batch * args.k))
        decoder = ARGS(model, reward, k=args.k, w=args.w, tokenizer=tokenizer, device=args.device,
                       batch_size=batch, prefix_cache=cache)

        def call(decoder: ARGS = decoder) -> dict[str, Any]:
            decoder.generate(prompts, max_new_tokens=args.tokens, stop_at_eos=False)
            return {"lm_forwards": decoder.last_stats["lm_forwards"], "rm_calls": decoder.last_stats["rm_calls"]}

        methods[name] = call
        rm_parameters = sum(p.numel() for p in reward.model.parameters())
        if cache:
            methods["limit"] = lambda rm=reward.model: args_limit(model, rm, prompt_ids, args.tokens, batch, args.k)
    return methods, rm_parameters


def run(args: argparse.Namespace) -> dict[str, Any]:
    from agents.decoding import encode_prompts
    from llm_envs.models import load_causal_lm, load_tokenizer
    from llm_envs.world import load_world

    torch.set_num_threads(args.threads)
    world = load_world(args.world, seed=0, cache_dir=args.cache_dir, progress=False)
    tokenizer = load_tokenizer(world.lm_dir)
    model = load_causal_lm(world.lm_dir, device=args.device)
    rows, limits = [], []
    for batch in args.batches:
        prompts = world.test_prompts[: max(batch, args.min_prompts)]
        prompt_ids = encode_prompts(tokenizer, prompts)
        generated = len(prompts) * args.tokens
        steps = -(-len(prompts) // batch) * args.tokens  # decoding steps (one token per row each)
        methods, rm_parameters = _batch_methods(args, world, model, tokenizer, prompts, prompt_ids, batch)
        timed = _time(methods, args.repeats, model.device)
        for name, (times, rounds) in timed.items():
            if name == "limit":
                continue
            seconds, counts = statistics.median(times), rounds[-1]
            rows.append({
                "batch": batch, "method": name, "prompts": len(prompts), "tokens_generated": generated,
                "seconds": seconds, "seconds_per_token": seconds / generated,
                "best_seconds_per_token": min(times) / generated,
                "lm_forwards_per_step": counts["lm_forwards"] / steps,
                "rm_calls_per_step": counts["rm_calls"] / steps,
                "lm_forwards_per_token": counts["lm_forwards"] / generated,
                "rm_calls_per_token": counts["rm_calls"] / generated,
            })
            print(f"batch {batch:>2} {name:<22} {1e3 * seconds / generated:8.3f} ms/token", flush=True)
        limits.append(_limit_row(batch, generated, timed))
        print(f"batch {batch:>2} {'limit':<22} {1e3 * limits[-1]['limit_seconds_per_token']:8.3f} ms/token  "
              f"limit/ARGS {limits[-1]['args_over_limit']:.2f}", flush=True)
    for row in rows:
        base = next(r for r in rows if r["batch"] == row["batch"] and r["method"] == "greedy")
        row["ratio_to_greedy"] = row["seconds_per_token"] / base["seconds_per_token"]
    import transformers

    return {
        "benchmark": "args_speed",
        "config": {"world": args.world, "k": args.k, "w": args.w, "tokens_per_prompt": args.tokens,
                   "batches": args.batches, "repeats": args.repeats, "quick": args.quick,
                   "timing": "median of repeats after a warm-up, methods in turn",
                   "limit_timing": "best round of each (ARGS-greedy, limit), methods in turn",
                   "device": args.device, "torch_threads": args.threads, "stop_at_eos": False,
                   "lm": Path(world.lm_dir).parent.name + "/lm", "rm": Path(world.rm_dir).parent.name + "/rm",
                   "lm_parameters": sum(p.numel() for p in model.parameters()),
                   "rm_parameters": rm_parameters},
        "seeds": {"world": 0},
        "results": rows,
        "limit": limits,
        "git_commit": git_commit(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__},
        "hardware": {"machine": platform.machine(), "processor": platform.processor() or platform.machine(),
                     "cpu_count": __import__("os").cpu_count(),
                     "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _limit_row(batch: int, generated: int, timed: Timed) -> dict[str, Any]:
    """ARGS-greedy against its limit at one batch size: both their best round, per generated token."""
    args_times, _ = timed["args_greedy"]
    limit_times, rounds = timed["limit"]
    best = min(range(len(limit_times)), key=limit_times.__getitem__)
    limit_s, args_s = limit_times[best] / generated, min(args_times) / generated
    return {"batch": batch, "args_seconds_per_token": args_s, "limit_seconds_per_token": limit_s,
            "limit_lm_seconds_per_token": rounds[best]["lm_seconds"] / generated,
            "limit_rm_seconds_per_token": rounds[best]["rm_seconds"] / generated,
            "args_over_limit": limit_s / args_s,
            "rounds": {"args_greedy": args_times, "limit": limit_times}}


def markdown(report: dict[str, Any]) -> str:
    cfg = report["config"]
    lines = [
        "# ARGS-greedy speed vs greedy decoding",
        "",
        (f"World `{cfg['world']}` (SFT LM of {cfg['lm_parameters'] / 1e6:.2f}M parameters, reward model of "
         f"{cfg['rm_parameters'] / 1e6:.2f}M), k = {cfg['k']}, w = {cfg['w']}, "
         f"{cfg['tokens_per_prompt']} tokens per prompt (no EOS stop), device {cfg['device']}, "
         f"{cfg['torch_threads']} torch thread(s), {cfg['timing']} (n = {cfg['repeats']}). "
         "The ARGS paper reports about 1.9x (OPT-2.7b, GPU, per response). Forwards and calls are batched: "
         "one LM forward or reward-model call serves every prompt in flight."),
        "",
        ("| batch | method | ms / token | x greedy | LM fwd / step | RM calls / step | LM fwd / token "
         "| RM calls / token |"),
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        lines.append(
            f"| {r['batch']} | {r['method']} | {1e3 * r['seconds_per_token']:.3f} | {r['ratio_to_greedy']:.2f} | "
            f"{r['lm_forwards_per_step']:.2f} | {r['rm_calls_per_step']:.2f} | {r['lm_forwards_per_token']:.3f} | "
            f"{r['rm_calls_per_token']:.3f} |"
        )
    lines += _limit_lines(report)
    lines += ["", (f"git {report['git_commit']}, torch {report['versions']['torch']}, transformers "
                   f"{report['versions']['transformers']}, {report['hardware']['processor']} "
                   f"({report['hardware']['cpu_count']} CPUs), {report['timestamp']}."), ""]
    return "\n".join(lines)


def _limit_lines(report: dict[str, Any]) -> list[str]:
    """The table of ARGS-greedy against its own limit (reports written before it existed have none)."""
    if not report.get("limit"):
        return []
    lines = [
        "", "## ARGS-greedy vs its own limit", "",
        ("The limit: the same count of bare batched forwards ARGS runs (T LM forwards on a HF DynamicCache, "
         "T reward-model forwards of k candidates per row on a prefix DynamicCache; see the module docstring), "
         "best round of each, methods in turn. `limit / ARGS` = the limit's time per token / ARGS-greedy's "
         "(1 = ARGS costs only its forwards; issue 16 asks >= 0.8 at batch 16)."), "",
        "| batch | ARGS ms / token | limit ms / token | of which LM | of which RM | limit / ARGS |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["limit"]:
        lines.append(
            f"| {r['batch']} | {1e3 * r['args_seconds_per_token']:.3f} | {1e3 * r['limit_seconds_per_token']:.3f} | "
            f"{1e3 * r['limit_lm_seconds_per_token']:.3f} | {1e3 * r['limit_rm_seconds_per_token']:.3f} | "
            f"{r['args_over_limit']:.2f} |"
        )
    return lines


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--world", default="default", choices=["default", "test"])
    parser.add_argument("--cache-dir", default=None, help="world cache root (default: $LLM_ENVS_CACHE or ~/.cache)")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--w", type=float, default=1.5)
    parser.add_argument("--tokens", type=int, default=None, help="tokens generated per prompt (default 64; quick 16)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--min-prompts", type=int, default=4, help="prompts decoded (one at a time at batch 1)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 5; quick 2)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true",
                        help="a cheap run: 16 tokens, 2 rounds, no hf_greedy / no-cache rows; writes args_speed_quick")
    parser.add_argument("--out", type=Path, default=None,
                        help="results path without suffix (default: benchmarks/results/args_speed[_quick])")
    args = parser.parse_args(argv)
    args.tokens = args.tokens or (16 if args.quick else 64)  # explicit --tokens / --repeats win over --quick
    args.repeats = args.repeats or (2 if args.quick else 5)
    args.out = args.out or RESULTS / ("args_speed_quick" if args.quick else "args_speed")
    report = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out.with_suffix(".json"), json.dumps(report, indent=2) + "\n")
    atomic_write_text(args.out.with_suffix(".md"), markdown(report))
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
