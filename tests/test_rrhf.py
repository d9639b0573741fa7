"""RRHF: the loss against its formulas, the JSONL caches, and a tiny end-to-end run on the world."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from agents.rrhf import (
    RRHFConfig,
    append_jsonl,
    read_jsonl,
    resume_jsonl,
    rrhf_loss,
    write_jsonl_atomic,
)
from benchmarks.bench.config import load_suite_config
from llm_envs.config import ConfigError, load_config
from llm_envs.task import Task

torch.set_num_threads(1)
TINY = "tiny"  # the shipped suite, by name


def load_rrhf_config(path, overrides=()) -> RRHFConfig:
    """An RRHFConfig from a file's rrhf: section and section-relative overrides."""
    return load_config(RRHFConfig, path, overrides, section="rrhf")


# ---------------------------------------------------------------------------- the loss


def _batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two queries: q0 has 3 responses (a reward tie), q1 has 2; responses of different lengths."""
    gen = torch.Generator().manual_seed(0)
    n, t, v = 5, 9, 13
    logits = torch.randn(n, t, v, generator=gen) * 2
    ids = torch.randint(v, (n, t), generator=gen)
    labels = torch.full((n, t), -100)
    # (prompt length, response length) per row: labels cover the response, the rest is prompt/padding
    spans = [(3, 2), (3, 5), (3, 4), (2, 6), (2, 1)]
    for i, (p, r) in enumerate(spans):
        labels[i, p : p + r] = ids[i, p : p + r]
    rewards = torch.tensor([1.0, 2.0, 1.0, 0.5, -0.3])
    groups = torch.tensor([0, 0, 0, 1, 1])
    return logits, labels, rewards, groups


def _reference(logits, labels, rewards, groups, rank_weight=1.0, sft="mean"):
    """The paper's formulas, written out with loops (independent of the implementation)."""
    sums, lens = [], []
    for i in range(logits.shape[0]):
        s, count = 0.0, 0
        for pos in range(1, logits.shape[1]):
            if labels[i, pos] != -100:
                logp = torch.log_softmax(logits[i, pos - 1].double(), -1)[labels[i, pos]].item()
                s, count = s + logp, count + 1
        sums.append(s)
        lens.append(count)
    p = [s / n for s, n in zip(sums, lens)]
    rank, sft_terms = [], []
    for q in sorted(set(groups.tolist())):
        rows = [i for i in range(len(p)) if groups[i] == q]
        total = 0.0
        for i in rows:
            for j in rows:
                if rewards[i] < rewards[j]:
                    total += max(0.0, p[i] - p[j])
        rank.append(total)
        best = max(rows, key=lambda i: (rewards[i].item(), -i))
        sft_terms.append(-sums[best] / (lens[best] if sft == "mean" else 1))
    rank_loss, sft_loss = sum(rank) / len(rank), sum(sft_terms) / len(sft_terms)
    return p, rank_loss, sft_loss, rank_weight * rank_loss + sft_loss


@pytest.mark.parametrize("rank_weight,sft", [(1.0, "mean"), (3.0, "sum")])
def test_rrhf_loss_equals_the_formulas(rank_weight: float, sft: str) -> None:
    logits, labels, rewards, groups = _batch()
    out = rrhf_loss(logits, labels, rewards, groups, rank_weight=rank_weight, sft_normalization=sft)
    p, rank_loss, sft_loss, loss = _reference(logits, labels, rewards, groups, rank_weight, sft)
    assert torch.allclose(out.scores.double(), torch.tensor(p, dtype=torch.float64), atol=1e-5)
    assert abs(out.rank_loss.item() - rank_loss) <= 1e-5
    assert abs(out.sft_loss.item() - sft_loss) <= 1e-5
    assert abs(out.loss.item() - loss) <= 1e-5
    assert rank_loss > 0  # the batch does exercise the ranking term


def test_rrhf_loss_uses_each_response_own_length_and_ignores_ties() -> None:
    logits, labels, rewards, groups = _batch()
    out = rrhf_loss(logits, labels, rewards, groups)
    counts = (labels[:, 1:] != -100).sum(1)
    assert counts.tolist() == [2, 5, 4, 6, 1]
    padded = out.scores * counts / labels.shape[1]  # what dividing by the padded length would give
    assert not torch.allclose(padded, out.scores)
    # All rewards tied: no pair is ordered, so the rank loss is exactly 0 whatever the p_i.
    tied = rrhf_loss(logits, labels, torch.ones(5), groups)
    assert tied.rank_loss.item() == 0.0
    # Rows of different queries are never compared: one query per row -> no rank loss either.
    alone = rrhf_loss(logits, labels, rewards, torch.arange(5))
    assert alone.rank_loss.item() == 0.0


def test_rrhf_loss_gradients_and_bad_input() -> None:
    logits, labels, rewards, groups = _batch()
    logits.requires_grad_(True)
    out = rrhf_loss(logits, labels, rewards, groups)
    out.loss.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    empty = labels.clone()
    empty[2] = -100
    with pytest.raises(ValueError, match=r"rows \[2\] have no response tokens"):
        rrhf_loss(logits, empty, rewards, groups)
    with pytest.raises(ValueError, match="4 entries for 5 rows"):
        rrhf_loss(logits, labels, rewards[:4], groups)
    with pytest.raises(ValueError, match="sft_normalization"):
        rrhf_loss(logits, labels, rewards, groups, sft_normalization="token")  # type: ignore[arg-type]


def test_query_weights_split_a_batch_over_processes_exactly() -> None:
    """The trainer's split of a micro-batch over N processes (agents.rrhf.training): each process weighs
    its queries N / (the batch's queries); the mean of the processes' losses and gradients (what DDP
    averages) is then the whole batch's, also when the shares hold different numbers of queries."""
    logits, labels, rewards, _ = _batch()
    logits.requires_grad_(True)
    groups = torch.tensor([0, 0, 1, 1, 2])  # three queries; process 0 gets query 0, process 1 queries 1 and 2
    shares, n = [slice(0, 2), slice(2, 5)], 2
    whole = rrhf_loss(logits, labels, rewards, groups)
    (whole_grad,) = torch.autograd.grad(whole.loss, logits)
    weighted = [rrhf_loss(logits[rows], labels[rows], rewards[rows], groups[rows],
                          query_weights=torch.full((len(groups[rows].unique()),), n / 3)) for rows in shares]
    mean = sum(part.loss for part in weighted) / n
    (mean_grad,) = torch.autograd.grad(mean, logits)
    assert abs(mean.item() - whole.loss.item()) <= 1e-6
    assert torch.allclose(mean_grad, whole_grad, atol=1e-7)
    # Each process's own mean would weigh query 0 twice as much as queries 1 and 2.
    unweighted = sum(rrhf_loss(logits[rows], labels[rows], rewards[rows], groups[rows]).loss for rows in shares) / n
    assert abs(unweighted.item() - whole.loss.item()) > 1e-3
    # Weights [1, 0, 0] give query 0's loss alone; a weight per query is required.
    first = rrhf_loss(logits, labels, rewards, groups, query_weights=torch.tensor([1.0, 0.0, 0.0]))
    assert abs(first.loss.item() - rrhf_loss(logits[:2], labels[:2], rewards[:2]).loss.item()) <= 1e-6
    with pytest.raises(ValueError, match="query_weights has 2 entries for 3 queries"):
        rrhf_loss(logits, labels, rewards, groups, query_weights=torch.ones(2))


# ---------------------------------------------------------------------------- caches and config


def test_jsonl_cache_round_trips_and_resumes(tmp_path: Path) -> None:
    path = tmp_path / "scored.jsonl"
    records = [{"query": f"Human: q{i} é\nAssistant:", "responses": ["a", "b c"], "scores": [0.1 * i, -1 / 3]}
               for i in range(5)]
    append_jsonl(path, records[:2])
    append_jsonl(path, records[2:])
    assert read_jsonl(path) == (records, True)
    write_jsonl_atomic(path, records)
    assert read_jsonl(path) == (records, True)
    assert json.loads(path.read_text().splitlines()[1])["scores"][1] == -1 / 3  # floats exact
    # A torn last line (crash mid-write) is dropped, and resuming rewrites the file to the valid prefix.
    with open(path, "a", encoding="utf-8") as f:
        f.write('{"query": "Human: cut')
    assert read_jsonl(path) == (records, False)
    queries = [r["query"] for r in records] + ["Human: q5\nAssistant:"]
    assert resume_jsonl(path, queries) == records
    assert read_jsonl(path) == (records, True)
    # Resuming aligns to whole batches, and a different prompt list keeps only the matching prefix.
    assert resume_jsonl(path, queries, align=2) == records[:4]
    assert resume_jsonl(path, ["other"] + queries[1:]) == []
    assert path.read_text() == ""


def test_config_validation_and_did_you_mean(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="Did you mean 'num_samples'"):
        load_rrhf_config(None, ["num_sample=3"])
    with pytest.raises(ConfigError, match="sampling='greedy'"):
        load_rrhf_config(None, ["sampling=greedy"])
    with pytest.raises(ConfigError, match="lr=0"):
        load_rrhf_config(None, ["lr=0"])
    section = tmp_path / "c.yaml"
    section.write_text("rrhf:\n  num_samples: 3\n")
    assert load_rrhf_config(section).num_samples == 3
    assert load_suite_config(TINY).rrhf.sampling in ("beam", "diverse_beam", "top_p")
    with pytest.raises(ConfigError, match="unknown key 'lm'"):  # the LM is the task's, not RRHF's
        load_suite_config(TINY, ["rrhf.lm=gpt2"])


# ---------------------------------------------------------------------------- a tiny run on the world


def test_tiny_rrhf_run_on_the_world(test_world, world_cache: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    from agents.decoding import GreedyDecoder
    from agents.rrhf.pipeline import run
    from benchmarks.cli import main

    monkeypatch.setenv("LLM_ENVS_CACHE", str(world_cache))  # the test world lives there
    out = tmp_path / "run"
    args = [f"output_dir={out}", "num_prompts=24",
            "num_samples=3", "max_new_tokens=12", "sample_batch_size=8", "epochs=1", "queries_per_batch=6",
            "grad_accum=1", "eval_num_prompts=6", "eval_best_of=2", "progress=false", "log_every=1"]
    task_args = ["task.world=test", "task.device=cpu", "task.max_new_tokens=12"]
    assert main(["rrhf", "--config", TINY, "--json", *task_args, *[f"rrhf.{a}" for a in args]]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["train_prompts"] == 24 and summary["train"]["updates"] == 4
    assert set(summary["eval"]["methods"]) == {"base_greedy", "rrhf_greedy", "base_best_of_2"}
    assert math.isfinite(summary["eval"]["methods"]["rrhf_greedy"]["gold_mean"])

    scored, clean = read_jsonl(out / "scored.jsonl")
    assert clean and len(scored) == 24
    assert all(set(r) == {"query", "responses", "scores"} for r in scored)
    samples, _ = read_jsonl(out / "samples.jsonl")
    assert all(r["sources"][:3] == ["diverse_beam"] * 3 for r in samples)
    assert any("dataset" in r["sources"] for r in samples)  # the world's own responses, where it has them
    assert all(len(s["responses"]) == len(r["responses"]) for s, r in zip(samples, scored))
    log, _ = read_jsonl(out / "train_log.jsonl")
    assert len(log) == 4 and all(math.isfinite(row["loss"]) for row in log)
    assert (out / "config.yaml").is_file() and (out / "model" / "config.json").is_file()
    # The tuned LM loads like any other LM.
    gen = GreedyDecoder(out / "model", device="cpu").generate([scored[0]["query"]], max_new_tokens=8)
    assert gen[0].lm_forwards == len(gen[0].response_ids) >= 1

    # Resume: cut samples.jsonl mid-line; sampling redoes only the torn batch and scoring is untouched.
    suite = load_suite_config(TINY, [*task_args, *[f"rrhf.{a}" for a in args]])
    cfg, task = suite.rrhf, suite.task
    text = (out / "samples.jsonl").read_text()
    lines = text.splitlines(keepends=True)
    (out / "samples.jsonl").write_text("".join(lines[:-3]) + lines[-3][:10])
    run(cfg, task, ["sample"], verbose=False)
    assert (out / "samples.jsonl").read_text() == text
    again = run(cfg, task, verbose=False)  # every stage complete: all skipped
    assert set(again["stages"].values()) == {"skipped (complete)"}
    # Resuming with settings that made the outputs differently is refused, naming the field.
    with pytest.raises(ConfigError, match="sampling='diverse_beam' but the config now says sampling='beam'"):
        run(load_rrhf_config(TINY_PATH(), args + ["sampling=beam"]), task, verbose=False)
    # ... and so is a changed task (another base LM made these samples).
    with pytest.raises(ConfigError, match="made with task.lm=None but the config now says task.lm="):
        run(cfg, Task(lm=str(test_world.lm_dir), world="test", device="cpu", max_new_tokens=12), verbose=False)


def TINY_PATH() -> Path:
    from benchmarks.suites import suite_path

    return suite_path(TINY)


def test_training_resumes_from_a_checkpoint(test_world, world_cache: Path, tmp_path: Path, monkeypatch) -> None:
    """A run killed after update 2 resumes from its checkpoint and ends with the uninterrupted weights."""
    import shutil

    from agents.rrhf import training as train_module
    from agents.rrhf.pipeline import run
    from llm_envs.models import load_causal_lm

    monkeypatch.setenv("LLM_ENVS_CACHE", str(world_cache))  # the test world lives there
    task = Task(world="test", device="cpu")
    args = ["num_prompts=12", "num_samples=2", "max_new_tokens=8", "epochs=2", "queries_per_batch=4", "grad_accum=1",
            "progress=false", "checkpoint_every=2", "log_every=1"]
    whole = load_rrhf_config(None, args + [f"output_dir={tmp_path / 'whole'}"])
    run(whole, task, ["sample", "score", "train"], verbose=False)
    cut = load_rrhf_config(None, args + [f"output_dir={tmp_path / 'cut'}"])
    run(cut, task, ["sample", "score"], verbose=False)
    real_lr = train_module._lr_at

    def crash_at_update_3(update: int, *rest: float) -> float:
        if update == 3:
            raise KeyboardInterrupt("killed")
        return real_lr(update, *rest)

    monkeypatch.setattr(train_module, "_lr_at", crash_at_update_3)
    with pytest.raises(KeyboardInterrupt):
        run(cut, task, ["train"], verbose=False)
    assert (tmp_path / "cut" / "checkpoint" / "progress.json").is_file()
    assert not (tmp_path / "cut" / "model").exists()
    monkeypatch.setattr(train_module, "_lr_at", real_lr)
    run(cut, task, ["train"], verbose=False)
    assert not (tmp_path / "cut" / "checkpoint").exists()
    a = load_causal_lm(tmp_path / "whole" / "model", device="cpu").state_dict()
    b = load_causal_lm(tmp_path / "cut" / "model", device="cpu").state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    log, _ = read_jsonl(tmp_path / "cut" / "train_log.jsonl")
    assert [r["update"] for r in log] == list(range(1, 7))
    shutil.rmtree(tmp_path / "whole")
