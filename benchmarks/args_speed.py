"""ARGS-greedy decoding speed relative to greedy decoding of the same LM (ARGS paper: ~1.9x at k=10).

Times fixed-length decoding (no EOS stop, so every method generates the same number of tokens) of
the embedded world's SFT LM, guided by its reward model, at batch 1 and batch 16 prompts:

- `greedy`: argmax decoding on the same batched `DecodeEngine` ARGS runs on (the fair floor);
- `hf_greedy`: HF `generate(do_sample=False)` (for reference);
- `args_greedy`: `agents.args.ARGS(k, w)` with the reward model's prefix KV cache (the default);
- `args_greedy_no_cache`: the same, every candidate scored from scratch (what the cache saves).

Reports seconds per generated token, the ratio to `greedy`, and batched LM forwards / reward-model
calls per decoding step and per generated token. Writes `benchmarks/results/args_speed.{json,md}`.

    python -m benchmarks.args_speed                      # default world, k=10, w=1.5
    python -m benchmarks.args_speed --world test --tokens 32 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch

from benchmarks.provenance import git_commit
from llm_envs.io import atomic_write_text

RESULTS = Path(__file__).resolve().parent / "results"


@torch.inference_mode()
def engine_greedy(model: Any, prompt_ids: list[list[int]], tokens: int, batch: int) -> dict[str, int]:
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
def hf_greedy(model: Any, tokenizer: Any, prompt_ids: list[list[int]], tokens: int, batch: int) -> dict[str, int]:
    from agents.decoding import generate_responses

    generate_responses(model, tokenizer, prompt_ids, max_new_tokens=tokens, min_new_tokens=tokens,
                       batch_size=batch, do_sample=False)
    return {"lm_forwards": -(-len(prompt_ids) // batch) * tokens, "rm_calls": 0}


def _time(methods: dict[str, Callable[[], dict[str, int]]], repeats: int) -> dict[str, tuple[float, dict[str, int]]]:
    """Median wall time per method; methods take turns in every round, so load from other processes
    on the machine falls on all of them alike."""
    for fn in methods.values():
        fn()  # warm-up (allocations, the prefix cache's first-use check)
    times: dict[str, list[float]] = {name: [] for name in methods}
    counts: dict[str, dict[str, int]] = {}
    for _ in range(repeats):
        for name, fn in methods.items():
            start = time.perf_counter()
            counts[name] = fn()
            times[name].append(time.perf_counter() - start)
    return {name: (statistics.median(times[name]), counts[name]) for name in methods}


def run(args: argparse.Namespace) -> dict[str, Any]:
    from agents.args import ARGS
    from agents.decoding import encode_prompts
    from llm_envs.models import load_causal_lm, load_tokenizer
    from llm_envs.rewards import RewardWrapper
    from llm_envs.world import load_world

    torch.set_num_threads(args.threads)
    world = load_world(args.world, seed=0, cache_dir=args.cache_dir, progress=False)
    tokenizer = load_tokenizer(world.lm_dir)
    model = load_causal_lm(world.lm_dir, device=args.device)
    rows = []
    for batch in args.batches:
        prompts = world.test_prompts[: max(batch, args.min_prompts)]
        prompt_ids = encode_prompts(tokenizer, prompts)
        generated = len(prompts) * args.tokens
        steps = -(-len(prompts) // batch) * args.tokens  # decoding steps (one token per row each)
        methods: dict[str, Callable[[], dict[str, int]]] = {
            "greedy": lambda: engine_greedy(model, prompt_ids, args.tokens, batch),
            "hf_greedy": lambda: hf_greedy(model, tokenizer, prompt_ids, args.tokens, batch),
        }
        for name, cache in (("args_greedy", True), ("args_greedy_no_cache", False)):
            reward = RewardWrapper.from_model(world.rm_dir, lm_tokenizer=tokenizer, device=args.device,
                                              batch_size=max(32, batch * args.k))
            decoder = ARGS(model, reward, k=args.k, w=args.w, tokenizer=tokenizer, device=args.device,
                           batch_size=batch, prefix_cache=cache)

            def call(decoder: ARGS = decoder) -> dict[str, int]:
                decoder.generate(prompts, max_new_tokens=args.tokens, stop_at_eos=False)
                return {"lm_forwards": decoder.last_stats["lm_forwards"], "rm_calls": decoder.last_stats["rm_calls"]}

            methods[name] = call
            rm_parameters = sum(p.numel() for p in reward.model.parameters())
        for name, (seconds, counts) in _time(methods, args.repeats).items():
            rows.append({
                "batch": batch, "method": name, "prompts": len(prompts), "tokens_generated": generated,
                "seconds": seconds, "seconds_per_token": seconds / generated,
                "lm_forwards_per_step": counts["lm_forwards"] / steps,
                "rm_calls_per_step": counts["rm_calls"] / steps,
                "lm_forwards_per_token": counts["lm_forwards"] / generated,
                "rm_calls_per_token": counts["rm_calls"] / generated,
            })
            print(f"batch {batch:>2} {name:<22} {1e3 * seconds / generated:8.3f} ms/token", flush=True)
    for row in rows:
        base = next(r for r in rows if r["batch"] == row["batch"] and r["method"] == "greedy")
        row["ratio_to_greedy"] = row["seconds_per_token"] / base["seconds_per_token"]
    import transformers

    return {
        "benchmark": "args_speed",
        "config": {"world": args.world, "k": args.k, "w": args.w, "tokens_per_prompt": args.tokens,
                   "batches": args.batches, "repeats": args.repeats, "timing": "median of repeats after a warm-up, methods in turn",
                   "device": args.device, "torch_threads": args.threads, "stop_at_eos": False,
                   "lm": Path(world.lm_dir).parent.name + "/lm", "rm": Path(world.rm_dir).parent.name + "/rm",
                   "lm_parameters": sum(p.numel() for p in model.parameters()),
                   "rm_parameters": rm_parameters},
        "seeds": {"world": 0},
        "results": rows,
        "git_commit": git_commit(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__},
        "hardware": {"machine": platform.machine(), "processor": platform.processor() or platform.machine(),
                     "cpu_count": __import__("os").cpu_count(),
                     "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def markdown(report: dict[str, Any]) -> str:
    cfg = report["config"]
    lines = [
        "# ARGS-greedy speed vs greedy decoding",
        "",
        f"World `{cfg['world']}` (SFT LM of {cfg['lm_parameters'] / 1e6:.2f}M parameters, reward model of "
        f"{cfg['rm_parameters'] / 1e6:.2f}M), k = {cfg['k']}, w = {cfg['w']}, "
        f"{cfg['tokens_per_prompt']} tokens per prompt (no EOS stop), device {cfg['device']}, "
        f"{cfg['torch_threads']} torch thread(s), {cfg['timing']} (n = {cfg['repeats']}). "
        "The ARGS paper reports about 1.9x (OPT-2.7b, GPU, per response). Forwards and calls are batched: "
        "one LM forward or reward-model call serves every prompt in flight.",
        "",
        "| batch | method | ms / token | x greedy | LM fwd / step | RM calls / step | LM fwd / token "
        "| RM calls / token |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        lines.append(
            f"| {r['batch']} | {r['method']} | {1e3 * r['seconds_per_token']:.3f} | {r['ratio_to_greedy']:.2f} | "
            f"{r['lm_forwards_per_step']:.2f} | {r['rm_calls_per_step']:.2f} | {r['lm_forwards_per_token']:.3f} | "
            f"{r['rm_calls_per_token']:.3f} |"
        )
    lines += ["", f"git {report['git_commit']}, torch {report['versions']['torch']}, transformers "
              f"{report['versions']['transformers']}, {report['hardware']['processor']} "
              f"({report['hardware']['cpu_count']} CPUs), {report['timestamp']}.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--world", default="default", choices=["default", "test"])
    parser.add_argument("--cache-dir", default=None, help="world cache root (default: $LLM_ENVS_CACHE or ~/.cache)")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--w", type=float, default=1.5)
    parser.add_argument("--tokens", type=int, default=64, help="tokens generated per prompt")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--min-prompts", type=int, default=4, help="prompts decoded (one at a time at batch 1)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=RESULTS / "args_speed")
    args = parser.parse_args(argv)
    report = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out.with_suffix(".json"), json.dumps(report, indent=2) + "\n")
    atomic_write_text(args.out.with_suffix(".md"), markdown(report))
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
