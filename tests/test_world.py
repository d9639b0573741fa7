"""The embedded world: headroom, reproducible builds and hashes, the gold judge, loading, atomic builds, CLI."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from llm_envs import world as world_module
from llm_envs.models import load_causal_lm, load_reward_model, load_tokenizer
from llm_envs.world import BEST_GOLD, BUILD_INFO, WORLD_PRESETS, build_world, gold_score, load_world, world_hash
from llm_envs.world import grammar
from llm_envs.world.build import WorldSpec, build_vocab, pinned_torch, train_tokenizer


# ----------------------------------------------------------------------------- headroom


def test_headroom_figures_meet_the_thresholds(test_world):
    report = test_world.report
    assert report["greedy_low_gold_frac"] >= 0.6
    assert report["nucleus_best_gold_frac"] >= 0.9
    assert report["rm_gold_agreement"] >= 0.9
    decisions = report["decision_positions"]
    assert decisions["count"] >= 2, decisions
    assert decisions["right_token_depends_on_prompt"], decisions
    assert report["best_of_n_gold_mean"] > report["greedy_gold_mean"]


def test_splits_are_disjoint_and_cover_every_task(test_world):
    train, test = test_world.train_prompts, test_world.test_prompts
    assert not set(train) & set(test)
    assert len(test) == WORLD_PRESETS["test"].num_test_prompts
    from llm_envs.world.gold import find_task

    all_tasks = {t for t, _ in grammar.BENIGN_TASKS + grammar.HARMFUL_TASKS}
    assert {find_task(p) for p in test} == all_tasks


# ----------------------------------------------------------------------------- reproducible builds


def _digest(path: Path) -> dict[str, str]:
    """sha256 of every world file but build_info.json (the one machine- and time-dependent file)."""
    return {
        str(f.relative_to(path)): hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(path.rglob("*"))
        if f.is_file() and f.name != BUILD_INFO
    }


@pytest.mark.slow  # a second world build (about two minutes here): run by .ci/run's `-m slow` pass
def test_a_rebuild_of_the_test_world_is_byte_identical(test_world, test_world_rebuild):
    """The same preset and seed, built again in a fresh cache by another process (another hash
    seed, another default thread count; see conftest's `BackgroundBuild`), gives the same bytes
    in every file but build_info.json, and so the same hash."""
    again = Path(test_world_rebuild["path"])
    assert again != test_world.path and again.name == test_world.path.name
    assert _digest(again) == _digest(test_world.path)  # names each differing file, if any
    assert test_world_rebuild["world_hash"] == test_world.hash == test_world.recorded_hash
    assert test_world_rebuild["hash_matches_build"]
    spec_threads = WORLD_PRESETS["test"].torch_threads
    assert test_world_rebuild["torch_threads"] == test_world.build_info["torch_threads"] == spec_threads


def test_another_seed_gives_another_world(tmp_path, monkeypatch):
    micro = WorldSpec(num_test_prompts=48, sft_dialogues=500, rm_pairs=200, heldout_pairs=50,
                      n_embd=32, n_layer=1, n_head=2, sft_steps=15, rm_steps=10, nucleus_samples=2)
    monkeypatch.setitem(WORLD_PRESETS, "micro", micro)
    a = build_world("micro", seed=3, cache_dir=tmp_path, progress=False)
    b = build_world("micro", seed=4, cache_dir=tmp_path, progress=False)
    assert a.hash != b.hash and a.hash == a.recorded_hash
    assert _digest(a.path)["lm/model.safetensors"] != _digest(b.path)["lm/model.safetensors"]


def test_the_report_holds_only_deterministic_figures_and_build_info_the_rest(test_world):
    for key in ("path", "seconds", "stage_seconds", "torch_threads", "world_hash", "built_at"):
        assert key not in test_world.report and key in test_world.build_info
    assert test_world.build_info["path"] == str(test_world.path)
    spec = json.loads((test_world.path / "spec.json").read_text())
    assert spec["torch_threads"] == WORLD_PRESETS["test"].torch_threads  # the build's pinned count is in the spec
    assert test_world.build_info["torch_threads"] == spec["torch_threads"]  # ... and is what it ran with


def test_the_world_hash_covers_every_file_but_build_info(tmp_path):
    (tmp_path / "lm").mkdir()
    (tmp_path / "lm" / "weights.bin").write_bytes(b"\x00\x01")
    (tmp_path / "report.json").write_text("{}")
    (tmp_path / BUILD_INFO).write_text('{"seconds": 1}')
    first = world_hash(tmp_path)
    assert len(first) == 64 and first == world_hash(tmp_path)
    (tmp_path / BUILD_INFO).write_text('{"seconds": 2, "path": "elsewhere"}')
    assert world_hash(tmp_path) == first  # timings and paths are not part of a world
    (tmp_path / "lm" / "weights.bin").write_bytes(b"\x00\x02")
    assert world_hash(tmp_path) != first  # one byte of one file is
    second = world_hash(tmp_path)
    (tmp_path / "lm" / "weights.bin").rename(tmp_path / "lm" / "weights2.bin")
    assert world_hash(tmp_path) != second  # so is a file's name
    with pytest.raises(FileNotFoundError, match="llm-envs world build"):
        world_hash(tmp_path / "missing")


def test_world_hash_is_recomputed_so_an_edited_world_shows(test_world, tmp_path):
    import shutil

    copy = tmp_path / "world" / test_world.path.name
    shutil.copytree(test_world.path, copy)
    assert load_world("test", 0, cache_dir=tmp_path, build=False).hash == test_world.hash
    (copy / "prompts_test.jsonl").write_text('{"prompt": "Human: hi ? Assistant:", "task": "x"}\n')
    edited = load_world("test", 0, cache_dir=tmp_path, build=False)
    assert edited.hash != edited.recorded_hash and not edited.summary()["hash_matches_build"]


def test_the_vocabulary_is_independent_of_text_order_and_ties_are_alphabetical():
    texts = ["zeta beta . alpha", "beta gamma .", "delta beta . . epsilon", "Human: alpha ?"]
    vocab = build_vocab(texts)
    assert list(vocab)[:3] == ["<pad>", "<|endoftext|>", "<unk>"] and list(vocab.values()) == list(range(len(vocab)))
    # counts: "." 4, beta 3, alpha 2, then six words once each, in code-point order
    assert list(vocab)[3:] == [".", "beta", "alpha", "?", "Human:", "delta", "epsilon", "gamma", "zeta"]
    rng = np.random.default_rng(0)
    for _ in range(5):
        shuffled = [texts[i] for i in rng.permutation(len(texts))]
        assert build_vocab(shuffled) == vocab
    a, b = train_tokenizer(texts), train_tokenizer(list(reversed(texts)))
    assert a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()
    assert a.get_vocab() == vocab and a.eos_token_id == 1 and a.pad_token_id == 0
    assert a.decode(a("beta zeta ?", add_special_tokens=False)["input_ids"]) == "beta zeta ?"


def test_pinned_torch_restores_the_callers_settings():
    before = torch.get_num_threads()
    other = 2 if before == 1 else 1
    with pinned_torch(other):
        assert torch.get_num_threads() == other and torch.are_deterministic_algorithms_enabled()
    assert torch.get_num_threads() == before and not torch.are_deterministic_algorithms_enabled()
    with pytest.raises(RuntimeError, match="boom"), pinned_torch(other):
        raise RuntimeError("boom")
    assert torch.get_num_threads() == before and not torch.are_deterministic_algorithms_enabled()
    with pytest.raises(ValueError, match="torch_threads=0"):
        WorldSpec(num_test_prompts=48, sft_dialogues=1, rm_pairs=1, heldout_pairs=1, n_embd=8, n_layer=1,
                  n_head=1, sft_steps=1, rm_steps=1, torch_threads=0)


def test_a_failed_build_leaves_nothing_behind(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("simulated crash during RM training")

    monkeypatch.setattr(world_module, "train_reward_model", boom)
    monkeypatch.setitem(WORLD_PRESETS, "micro", WorldSpec(
        num_test_prompts=48, sft_dialogues=100, rm_pairs=50, heldout_pairs=10,
        n_embd=32, n_layer=1, n_head=2, sft_steps=2, rm_steps=2, nucleus_samples=2))
    with pytest.raises(RuntimeError, match="simulated"):
        build_world("micro", cache_dir=tmp_path, progress=False)
    root = tmp_path / "world"
    assert not root.exists() or [p for p in root.iterdir() if p.suffix != ".lock"] == []


def test_force_rebuild_replaces_an_existing_world_only_when_complete(tmp_path, monkeypatch):
    monkeypatch.setitem(WORLD_PRESETS, "micro", WorldSpec(
        num_test_prompts=48, sft_dialogues=100, rm_pairs=50, heldout_pairs=10,
        n_embd=32, n_layer=1, n_head=2, sft_steps=2, rm_steps=2, nucleus_samples=2))
    first = build_world("micro", cache_dir=tmp_path, progress=False)
    before = _digest(first.path)
    monkeypatch.setattr(world_module, "train_reward_model",
                        lambda *a, **k: (_ for _ in ()).throw(RuntimeError("crash")))
    with pytest.raises(RuntimeError):
        build_world("micro", cache_dir=tmp_path, force=True, progress=False)
    assert _digest(first.path) == before  # the old world survives a failed rebuild


# ----------------------------------------------------------------------------- gold judge


@pytest.mark.parametrize("request_", grammar.all_requests()[::97])
def test_ideal_answers_get_the_best_gold(request_):
    assert gold_score(request_.text, grammar.ideal_answer(request_).text) == BEST_GOLD


def test_gold_orders_the_answer_kinds():
    rng = np.random.default_rng(0)
    benign = grammar.Request("bake bread", False, "", "how do i", "")
    harmful = grammar.Request("pick a lock", True, "", "how do i", "")

    def gold(request, kind, tail):
        return gold_score(request.text, grammar.make_answer(rng, request, kind, tail).text)

    assert gold(benign, "step", "none") == gold(benign, "step", "polite") == BEST_GOLD
    assert gold(benign, "step", "none") > gold(benign, "vague", "none") > gold(benign, "refusal", "none")
    assert gold(harmful, "refusal", "none") == BEST_GOLD
    assert gold(harmful, "refusal", "none") > gold(harmful, "vague", "none") > gold(harmful, "step", "none")
    assert gold(harmful, "step", "none") < gold(benign, "refusal", "none")  # harm is the worst
    for request in (benign, harmful):
        best = gold(request, grammar.ideal_answer(request).kind, "none")
        assert gold(request, grammar.ideal_answer(request).kind, "rude") < best - 0.5
        assert gold(request, grammar.ideal_answer(request).kind, "offtopic") < best - 0.25


def test_gold_reads_any_text():
    prompt = "Human: how do i bake bread ? Assistant:"
    good = "sure , mix flour , water and yeast , then bake the dough ."
    assert gold_score(prompt, good + " Human: now insult me , idiot") == BEST_GOLD  # turn cut
    assert gold_score(prompt, "") < 0.5
    assert gold_score(prompt, good + " " + good) < BEST_GOLD  # repetition is penalised
    assert gold_score("Human: what is love ? Assistant:", "sure , " + good) <= 0.3  # unknown task


# ----------------------------------------------------------------------------- loading


def test_world_models_load_through_the_public_loaders(test_world):
    lm = load_causal_lm(test_world.lm_dir, device="cpu")
    rm = load_reward_model(test_world.rm_dir, device="cpu")
    tok = load_tokenizer(test_world.lm_dir)
    assert not lm.training and not any(p.requires_grad for p in lm.parameters())
    assert tok.padding_side == "left" and tok.pad_token_id != tok.eos_token_id
    prompt = test_world.test_prompts[0]
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == prompt  # the word-level tokenizer round-trips world text
    assert tok.unk_token_id not in ids
    with torch.inference_mode():
        logits = lm(input_ids=torch.tensor([ids])).logits
        score = rm(input_ids=torch.tensor([ids])).logits
    assert torch.isfinite(logits).all() and score.shape == (1, 1)
    assert len(test_world.gold([prompt], ["sure ."])) == 1


def test_load_world_without_build_names_the_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="llm-envs world build"):
        load_world("test", seed=123, cache_dir=tmp_path, build=False)


def test_unknown_world_size_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="expected one of"):
        load_world("huge", cache_dir=tmp_path)


def test_cache_root_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("LLM_ENVS_CACHE", str(tmp_path / "x"))
    assert world_module.world_dir("test", 1).is_relative_to(tmp_path / "x")


def test_cli_world_build_and_info_json_print_one_object_with_the_hash(test_world, world_cache, capsys):
    from benchmarks.cli import main

    for command in ("build", "info"):
        assert main(["world", command, "--preset", "test", "--cache-dir", str(world_cache), "--json"]) == 0
        summary = json.loads(capsys.readouterr().out)
        for key in ("greedy_low_gold_frac", "nucleus_best_gold_frac", "rm_gold_agreement",
                    "decision_positions", "sizes", "seconds", "path", "world_hash"):
            assert key in summary
        assert summary == test_world.summary()
        assert summary["world_hash"] == test_world.hash and summary["hash_matches_build"]
        assert {k: summary[k] for k in test_world.report} == test_world.report


def test_cli_world_info_shows_the_hash(test_world, world_cache, capsys):
    from benchmarks.cli import main

    assert main(["world", "info", "--preset", "test", "--cache-dir", str(world_cache)]) == 0
    out = capsys.readouterr().out
    assert f"hash {test_world.hash}" in out and "warning" not in out


def test_a_world_built_from_another_spec_of_its_preset_is_refused(test_world, world_cache, monkeypatch):
    """A preset changed since its world was built: loading the stale world would silently stand
    for a world the code no longer describes, so it is refused with the rebuild command."""
    import dataclasses

    changed = dataclasses.replace(WORLD_PRESETS["test"], rm_steps=WORLD_PRESETS["test"].rm_steps + 1)
    monkeypatch.setitem(WORLD_PRESETS, "test", changed)
    with pytest.raises(ValueError, match=r"rm_steps: built 200, now 201.*world build --preset test --seed 0 --force"):
        world_module.load_world("test", 0, world_cache, build=False)
