"""The `llm-envs` command line (the top layer: it drives the world, the agents and the benchmarks).

    llm-envs bench       [--config tiny] [--quick] [--methods a,b] [--sweep p_t|temperature|best_of_n|args_w]
                         [--from-records] [--out DIR] [key=value ...]   # the leaderboard (the main job)
    accelerate launch --multi_gpu --num_processes N -m benchmarks.cli bench ...   # the prompts split over N GPUs
    llm-envs train       [--config tiny] [key=value ...]                # the MaskablePPO proxy
    llm-envs eval        [--config tiny] [--agent greedy|random|proxy:PATH|top_k|nucleus|best_of_N]
    llm-envs rrhf        [--config tiny] [--stages sample,score,train,eval] [key=value ...]
    llm-envs world build [--preset default|v2|smollm2|test] [--seed 0] [--cache-dir DIR] [--json]
    llm-envs world info  [--preset ...] [--seed ...] [--cache-dir DIR] [--json]
    llm-envs config show [SUITE] [SECTION ...]           # every field: value, default and help
    llm-envs config path [NAME]                          # where a shipped suite's YAML lives
    llm-envs config list                                 # the shipped suites

`--config` takes a shipped suite's name (`tiny`, `hh_gpu`) or a YAML file of your own; every key can
be overridden with key=value (`task.max_new_tokens=16 train.env.p_t=0.001`). Imports are lazy so
that `--help` answers at once.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    from benchmarks.bench.config import SuiteConfig

HEADROOM_KEYS = ("greedy_low_gold_frac", "nucleus_best_gold_frac", "rm_gold_agreement")
WORLD_PRESET_NAMES = ("default", "v2", "smollm2", "test")  # llm_envs.world.WORLD_PRESETS, named here to keep --help light
CONFIG_HELP = ("suite: a shipped suite's name (tiny, v2, smollm2, hh_gpu; the papers' protocols proxy_rlhf, args) or "
               "a YAML file; `llm-envs config show` lists its fields")


def _add_world_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", "--size", dest="preset", default="default", choices=WORLD_PRESET_NAMES,
                        help="world preset: 'default' (the tiny suite's world), 'v2' (the v2 suite's: longer answers, "
                             "five decisions, a biased RM), 'smollm2' (a real pretrained chat LM, SmolLM2-135M-Instruct "
                             "offline, with a reward model learned from its own answers) or 'test' (small, for tests)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the world (corpus, splits, training)")
    parser.add_argument("--cache-dir", default=None,
                        help="cache root (default: $LLM_ENVS_CACHE or ~/.cache/llm_envs)")


def _print_world_summary(summary: dict) -> None:
    """A built world's summary (`World.summary()`): where, its hash, and the headroom figures."""
    print(f"world: {summary['path']}")
    print(f"  hash {summary['world_hash']}")
    if not summary["hash_matches_build"]:
        print("  warning: the files changed since the build (its hash differs); results on this world are not "
              "comparable with others: rebuild it with `llm-envs world build --force`")
    print(f"  built in {summary['seconds']} s; sizes: {json.dumps(summary['sizes'])}")
    for key in HEADROOM_KEYS:
        print(f"  {key:24s} {summary[key]}")
    decisions = summary.get("decision_positions")
    if decisions is not None:  # a world around a real LM has no ideal answer to find decisions against
        print(f"  decision_positions       {decisions['positions']} "
              f"(prompt-dependent: {decisions['right_token_depends_on_prompt']})")


def cmd_world_build(args: argparse.Namespace) -> int:
    from llm_envs.world import build_world

    world = build_world(args.preset, args.seed, args.cache_dir, force=args.force,
                        progress=not args.json and not args.no_progress)
    if args.json:
        print(json.dumps(world.summary()))
    else:
        _print_world_summary(world.summary())
    return 0


def cmd_world_info(args: argparse.Namespace) -> int:
    from llm_envs.world import load_world

    world = load_world(args.preset, args.seed, args.cache_dir, build=False)
    if args.json:
        print(json.dumps(world.summary()))
    else:
        _print_world_summary(world.summary())
    return 0


def cmd_rrhf(args: argparse.Namespace) -> int:
    """RRHF's stages (sample, score, train, eval) on the suite's task, with its rrhf: section."""
    from agents.launch import launch
    from agents.rrhf import run
    from benchmarks.bench.config import load_suite_config

    cfg = load_suite_config(args.config, args.overrides)
    processes = launch(cfg.task.device)  # several under `accelerate launch`: all train, the main one samples and scores
    try:
        summary = run(cfg.rrhf, cfg.task, [s.strip() for s in args.stages.split(",") if s.strip()],
                      verbose=not args.json, processes=processes)
    finally:
        processes.close()
    if args.json and processes.is_main:  # under accelerate launch: one summary, not one per process
        print(json.dumps(summary))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """The MaskablePPO proxy on the suite's task, with its train: section."""
    from agents.proxy import train
    from benchmarks.bench.config import load_suite_config

    cfg = load_suite_config(args.config, args.overrides)
    model = train(cfg.train, cfg.task, restart=args.restart)
    print(f"proxy saved to {model} (resolved config: {model.parent / 'config.yaml'})")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """One agent on the suite's held-out prompts, scored as on the leaderboard."""
    from agents.evaluate import evaluate_agent
    from benchmarks.bench.config import load_suite_config

    cfg = load_suite_config(args.config, args.overrides)
    summary = evaluate_agent(cfg.task, cfg.train.env, args.agent, num_prompts=args.num_prompts,
                             num_envs=cfg.train.num_envs, seed=cfg.train.seed, metrics=cfg.bench.metrics)
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

    overrides = [*args.overrides, *(["bench.progress=false"] if args.no_progress else []),
                 *([f"bench.results_dir={args.out}"] if args.out else [])]
    cfg = load_suite_config(args.config, overrides, quick=args.quick)
    if args.sweep or args.from_records:
        return _bench_in_one_process(cfg, args)
    from agents.launch import launch
    from benchmarks.bench.suite import run_suite

    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
    processes = launch(cfg.task.device)  # several under `accelerate launch`: each decodes a share of the prompts
    try:
        summary = run_suite(cfg, methods=methods, processes=processes)
    finally:
        processes.close()
    if summary is not None:  # the main process
        print(f"bench: done in {summary['seconds']:.0f} s")
    return 0


def _bench_in_one_process(cfg: SuiteConfig, args: argparse.Namespace) -> int:
    """`--sweep` and `--from-records`: one process does them (a launch of several is refused)."""
    from agents.launch import launched_process_count

    count = launched_process_count()
    if count > 1:
        flag = "--sweep" if args.sweep else "--from-records"
        raise ValueError(f"llm-envs bench {flag} runs in one process, but it was launched on {count}; run it "
                         "without accelerate launch / torchrun (only a suite run splits its prompts).")
    if args.sweep:
        from benchmarks.bench.sweep import run_sweep

        run_sweep(cfg, {"pt": "p_t"}.get(args.sweep, args.sweep))
        return 0
    from benchmarks.bench.suite import finish_suite, suite_context

    finish_suite(cfg, suite_context(cfg))
    return 0


SECTIONS = ("task", "bench", "train", "rrhf")


def cmd_config_show(args: argparse.Namespace) -> int:
    from benchmarks.bench.config import describe_suite_config, load_suite_config

    names = list(args.names)
    suite = names.pop(0) if names and names[0] not in SECTIONS else args.config
    cfg = load_suite_config(suite, args.overrides)
    print(describe_suite_config(cfg, names))
    return 0


def cmd_config_path(args: argparse.Namespace) -> int:
    from benchmarks.suites import suite_path

    print(suite_path(args.name))
    return 0


def cmd_config_list(args: argparse.Namespace) -> int:
    from benchmarks.suites import shipped_suites, suite_path

    for name in shipped_suites():
        print(f"{name:10s} {suite_path(name)}")
    return 0


def _add_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="tiny", help=CONFIG_HELP)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llm-envs", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    commands = parser.add_subparsers(dest="command", required=True)

    bench = commands.add_parser("bench", help="run every method on the held-out prompts and write the leaderboard")
    _add_config(bench)
    bench.add_argument("--quick", action="store_true",
                       help="apply the config's quick: overrides (a small, fast suite written to <suite>-quick/)")
    bench.add_argument("--methods", default=None,
                       help="comma-separated method names to (re)run; the others keep their records")
    bench.add_argument("--sweep", default=None, choices=["p_t", "pt", "temperature", "best_of_n", "args_w"],
                       help="p_t | temperature: one proxy per value (the paper's study); best_of_n | args_w: RM reward "
                            "and gold against best-of-n's n or ARGS-greedy's w (over-optimisation); grids and seeds: "
                            "bench.sweep")
    bench.add_argument("--from-records", action="store_true",
                       help="rebuild the leaderboard, plots and wandb log from the records without running anything")
    bench.add_argument("--out", default=None,
                       help="results root (default: ./results; results go to <out>/<suite>/)")
    bench.add_argument("--no-progress", action="store_true", help="no progress bars (logs, CI)")
    bench.add_argument("overrides", nargs="*", help="key=value overrides, e.g. bench.num_prompts=48 train.total_timesteps=20000")
    bench.set_defaults(func=cmd_bench)

    train = commands.add_parser("train", help="train the MaskablePPO proxy on TokenAccept (the suite's train: section)")
    _add_config(train)
    train.add_argument("--restart", action="store_true",
                       help="start over in output_dir: the previous run is moved aside (never deleted)")
    train.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.total_timesteps=2000 train.env.p_t=0.001")
    train.set_defaults(func=cmd_train)

    evaluate = commands.add_parser("eval", help="evaluate an agent on the task's held-out prompts")
    _add_config(evaluate)
    evaluate.add_argument("--agent", default="greedy",
                          help="greedy, random, proxy:PATH (a .zip), or a decoding baseline: top_k, nucleus, best_of_N")
    evaluate.add_argument("--num-prompts", type=int, default=None, help="evaluate on a seeded sample of prompts")
    evaluate.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    evaluate.add_argument("overrides", nargs="*", help="key=value overrides of the config")
    evaluate.set_defaults(func=cmd_eval)

    rrhf = commands.add_parser("rrhf", help="RRHF baseline: sample, score, train, evaluate (resumable)")
    _add_config(rrhf)
    rrhf.add_argument("--stages", default="sample,score,train,eval",
                      help="comma-separated stages to run; complete ones are skipped")
    rrhf.add_argument("overrides", nargs="*", help="key=value overrides (e.g. rrhf.epochs=1 rrhf.output_dir=runs/x)")
    rrhf.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    rrhf.set_defaults(func=cmd_rrhf)

    world = commands.add_parser("world", help="build or inspect the embedded offline world")
    world_commands = world.add_subparsers(dest="world_command", required=True)
    build = world_commands.add_parser("build", help="build the world into the cache (a no-op if built)")
    _add_world_args(build)
    build.add_argument("--force", action="store_true", help="rebuild even if the cache holds it")
    build.add_argument("--json", action="store_true", help="print the build report as one JSON object")
    build.add_argument("--no-progress", action="store_true", help="no progress bars")
    build.set_defaults(func=cmd_world_build)
    info = world_commands.add_parser("info", help="print the report and hash of a built world")
    _add_world_args(info)
    info.add_argument("--json", action="store_true",
                      help="print the report (with the hash and build info) as one JSON object")
    info.set_defaults(func=cmd_world_info)

    config = commands.add_parser("config", help="the suites' config fields: values, defaults and help")
    config_commands = config.add_subparsers(dest="config_command", required=True)
    show = config_commands.add_parser("show", help="every field of a suite (or of the named sections) with its help")
    _add_config(show)
    show.add_argument("names", nargs="*", metavar="[SUITE] [SECTION ...]",
                      help="a suite (default: --config, i.e. tiny), then sections: task, bench, train, rrhf (default: all)")
    show.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                      help="show the config with this override applied (repeatable)")
    show.set_defaults(func=cmd_config_show)
    path = config_commands.add_parser("path", help="print where a shipped suite's YAML file is (copy it to start your own)")
    path.add_argument("name", nargs="?", default="tiny", help="a shipped suite (default: tiny)")
    path.set_defaults(func=cmd_config_path)
    listing = config_commands.add_parser("list", help="list the shipped suites")
    listing.set_defaults(func=cmd_config_list)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run a command; a failure is one line on stderr (the full traceback with --debug)."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("llm-envs: interrupted (what was written is complete; rerun to resume)", file=sys.stderr)
        return 130
    except Exception as error:
        if args.debug:
            raise
        if isinstance(error, (ValueError, OSError)):  # a user's input: the message says the fix
            print(f"llm-envs: error: {error}", file=sys.stderr)
            return 2
        print(f"llm-envs: unexpected error: {type(error).__name__}: {error} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
