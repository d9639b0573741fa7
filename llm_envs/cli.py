"""The `llm-envs` command line.

    llm-envs world build [--size default|test] [--seed 0] [--cache-dir DIR] [--force] [--json]
    llm-envs world info  [--size ...] [--seed ...] [--cache-dir DIR]
    llm-envs demo        [--num-prompts 8] [--json]   # build the world, score greedy answers
    llm-envs rrhf        [--config FILE] [--stages sample,score,train,eval] [key=value ...] [--json]
    llm-envs train       [--config FILE] [key=value ...]
    llm-envs eval        [--config FILE] [--agent greedy|random|proxy:PATH] [key=value ...]
    llm-envs bench       [--config configs/tiny.yaml] [--quick] [--methods a,b] [--sweep p_t|temperature]
                         [--from-records] [key=value ...]   # the leaderboard (the main job)
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from llm_envs.world import WORLD_PRESETS

HEADROOM_KEYS = ("greedy_low_gold_frac", "nucleus_best_gold_frac", "rm_gold_agreement")


def _add_world_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", default="default", choices=sorted(WORLD_PRESETS),
                        help="world preset: 'default' (used by everything) or 'test' (small, for tests)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the world (corpus, splits, training)")
    parser.add_argument("--cache-dir", default=None,
                        help="cache root (default: $LLM_ENVS_CACHE or ~/.cache/llm_envs)")


def _print_world_summary(report: dict) -> None:
    print(f"world: {report['path']}")
    print(f"  built in {report['seconds']} s; sizes: {json.dumps(report['sizes'])}")
    for key in HEADROOM_KEYS:
        print(f"  {key:24s} {report[key]}")
    decisions = report["decision_positions"]
    print(f"  decision_positions       {decisions['positions']} "
          f"(prompt-dependent: {decisions['right_token_depends_on_prompt']})")


def cmd_world_build(args: argparse.Namespace) -> int:
    from llm_envs.world import build_world

    world = build_world(args.size, args.seed, args.cache_dir, force=args.force,
                        progress=not args.json and not args.no_progress)
    if args.json:
        print(json.dumps(world.report))
    else:
        _print_world_summary(world.report)
    return 0


def cmd_world_info(args: argparse.Namespace) -> int:
    from llm_envs.world import load_world

    world = load_world(args.size, args.seed, args.cache_dir, build=False)
    _print_world_summary(world.report)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The main job until the benchmark exists: world, greedy answers, one reward wrapper."""
    from llm_envs.demo import run_demo

    summary = run_demo(num_prompts=args.num_prompts, cache_dir=args.cache_dir, size=args.size,
                       seed=args.seed, verbose=not args.json)
    if args.json:
        print(json.dumps(summary))
    return 0


def cmd_rrhf(args: argparse.Namespace) -> int:
    """RRHF's stages (sample, score, train, eval) on the embedded world unless the config says otherwise."""
    from agents.rrhf import load_rrhf_config, run

    cfg = load_rrhf_config(args.config, args.overrides)
    summary = run(cfg, [s.strip() for s in args.stages.split(",") if s.strip()], verbose=not args.json)
    if args.json:
        print(json.dumps(summary))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from agents.configs import TrainConfig
    from agents.proxy import train
    from llm_envs.config import load_config

    cfg = load_config(TrainConfig, args.config, args.overrides, section="train")
    path = train(cfg)
    print(f"proxy saved to {path} (resolved config: {path.parent / 'config.yaml'})")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from agents.configs import TrainConfig
    from agents.evaluate import evaluate
    from llm_envs.config import load_config

    cfg = load_config(TrainConfig, args.config, args.overrides, section="train")
    summary = evaluate(cfg.env, args.agent, num_prompts=args.num_prompts, num_envs=cfg.num_envs, seed=cfg.seed)
    if args.json:
        print(json.dumps(summary))
    else:
        for key, value in summary.items():
            if key != "examples":
                print(f"{key:26s} {value}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """The benchmark suite: every method on the held-out prompts, one reward wrapper, one leaderboard."""
    from benchmarks.bench.config import load_suite_config

    overrides = [*args.overrides, *(["bench.progress=false"] if args.no_progress else [])]
    cfg = load_suite_config(args.config, overrides, quick=args.quick)
    if args.sweep:
        from benchmarks.bench.sweep import run_sweep

        run_sweep(cfg, {"pt": "p_t"}.get(args.sweep, args.sweep))
        return 0
    from benchmarks.bench.suite import finish_suite, run_suite, suite_context

    if args.from_records:
        finish_suite(cfg, suite_context(cfg))
        return 0
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
    summary = run_suite(cfg, methods=methods)
    print(f"bench: done in {summary['seconds']:.0f} s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llm-envs", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    world = commands.add_parser("world", help="build or inspect the embedded offline world")
    world_commands = world.add_subparsers(dest="world_command", required=True)
    build = world_commands.add_parser("build", help="build the world into the cache (a no-op if built)")
    _add_world_args(build)
    build.add_argument("--force", action="store_true", help="rebuild even if the cache holds it")
    build.add_argument("--json", action="store_true", help="print the build report as one JSON object")
    build.add_argument("--no-progress", action="store_true", help="no progress bars")
    build.set_defaults(func=cmd_world_build)
    info = world_commands.add_parser("info", help="print the report of a built world")
    _add_world_args(info)
    info.set_defaults(func=cmd_world_info)

    demo = commands.add_parser("demo", help="build the world and score greedy answers with the RM and gold judge")
    _add_world_args(demo)
    demo.add_argument("--num-prompts", type=int, default=8, help="test prompts to decode and score")
    demo.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    demo.set_defaults(func=cmd_demo)

    rrhf = commands.add_parser("rrhf", help="RRHF baseline: sample, score, train, evaluate (resumable)")
    rrhf.add_argument("--config", default=None, help="YAML config (e.g. configs/tiny.yaml, its rrhf: section); fields of RRHFConfig")
    rrhf.add_argument("--stages", default="sample,score,train,eval",
                      help="comma-separated stages to run; complete ones are skipped")
    rrhf.add_argument("overrides", nargs="*", help="config overrides key=value (e.g. epochs=1 output_dir=runs/x)")
    rrhf.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    rrhf.set_defaults(func=cmd_rrhf)

    train = commands.add_parser("train", help="train the MaskablePPO proxy on TokenAccept")
    train.add_argument("--config", default="configs/tiny.yaml", help="YAML config (its 'train' section)")
    train.add_argument("overrides", nargs="*", help="key=value overrides, e.g. total_timesteps=2000 env.p_t=0.001")
    train.set_defaults(func=cmd_train)

    evaluate = commands.add_parser("eval", help="evaluate an agent on the held-out prompts")
    evaluate.add_argument("--config", default="configs/tiny.yaml", help="YAML config (its 'train' section)")
    evaluate.add_argument("--agent", default="greedy", help="greedy, random, or proxy:PATH (a .zip)")
    evaluate.add_argument("--num-prompts", type=int, default=None, help="evaluate on a seeded sample of prompts")
    evaluate.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    evaluate.add_argument("overrides", nargs="*", help="key=value overrides of the config")
    evaluate.set_defaults(func=cmd_eval)

    bench = commands.add_parser("bench", help="run every method on the held-out prompts and write the leaderboard")
    bench.add_argument("--config", default="configs/tiny.yaml", help="suite YAML (bench:, train:, rrhf: sections)")
    bench.add_argument("--quick", action="store_true",
                       help="apply the config's quick: overrides (a small, fast suite written to <suite>-quick/)")
    bench.add_argument("--methods", default=None,
                       help="comma-separated method names to (re)run; the others keep their records")
    bench.add_argument("--sweep", default=None, choices=["p_t", "pt", "temperature"],
                       help="train and evaluate one proxy per value of p_t or temperature (the paper's study)")
    bench.add_argument("--from-records", action="store_true",
                       help="rebuild the leaderboard, plots and wandb log from the records without running anything")
    bench.add_argument("--no-progress", action="store_true", help="no progress bars (logs, CI)")
    bench.add_argument("overrides", nargs="*", help="key=value overrides, e.g. bench.num_prompts=48 train.total_timesteps=20000")
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, OSError) as error:
        print(f"llm-envs: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
