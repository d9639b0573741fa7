"""RRHF on several processes: `accelerate launch --multi_gpu --num_processes 2` on CPU (gloo) trains
with the same global batch as one process and reaches the same loss curve and model.

Tolerances (float32: the runs differ in summation order and padding widths, i.e. in the last bits):
- train_log.jsonl's losses (rounded to 5 decimals) agree within 1e-5 relative + 2e-5 absolute
  (the rounding). Observed on this test's run: at most 3e-7 relative before rounding (2.7e-6 over a
  12-update run), identical after it; a per-process mean instead of the weighted split, or
  accelerate's repeat-padding of the last micro-batch, is off by 2% to 80%.
- The final models' per-token log-probs of every scored response agree within 1e-4 (observed 8e-6).
- Their weights are apart by at most 1% of the training's own change (observed 2e-4 to 4e-4 of it; 4e-6
  without the attention key bias, whose true gradient is exactly 0, softmax being shift-invariant:
  its gradient is rounding noise that Adam scales up to near lr-sized steps, without changing the
  outputs). A wrong split is 20% apart.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
from pathlib import Path

import pytest
import torch

from agents.rrhf import read_jsonl
from agents.rrhf.training import check_process_count, collate, epoch_items, tokenize_scored
from benchmarks.bench.config import load_suite_config
from launching import ROOT, accelerate_launch, launch_env
from llm_envs.models import load_causal_lm, load_tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# 14 prompts in micro-batches of 6: the epoch's last holds 2, so under 2 processes one process gets
# both real queries plus a weight-0 copy and the other only copies (uneven shares, an all-copy share);
# grad_accum=2 makes updates of two micro-batches (DDP's no_sync) and of the epoch's lone last one.
SETTINGS = ["task.world=test", "task.device=cpu", "rrhf.num_prompts=14", "rrhf.num_samples=2", "rrhf.max_new_tokens=8",
            "rrhf.epochs=2", "rrhf.queries_per_batch=6", "rrhf.grad_accum=2", "rrhf.log_every=1", "rrhf.progress=false"]
LOSS_REL, LOSS_ABS = 1e-5, 2e-5  # relative float32 agreement + the log's 5-decimal rounding
LOGPROB_ATOL = 1e-4
WEIGHT_REL = 1e-2  # of the training's change; see the module docstring (the attention key bias)


def _launch_two_processes(out: Path, world_cache: Path, home: Path) -> subprocess.Popen:
    """`llm-envs rrhf` on 2 CPU processes, every stage but eval, started in the background."""
    command = accelerate_launch(2, "rrhf", "--config", "tiny", "--stages", "sample,score,train", "--json", *SETTINGS,
                                f"rrhf.output_dir={out}")
    return subprocess.Popen(command, cwd=ROOT, env=launch_env(world_cache, home), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own process group: a failed test ends the workers too


def _logprobs(model_dir: Path, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    model = load_causal_lm(model_dir, device="cpu")
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return torch.log_softmax(logits, -1)[batch["attention_mask"].bool()]


def test_rrhf_on_two_processes_matches_one_process(test_world, world_cache: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from agents.rrhf.pipeline import run

    monkeypatch.setenv("LLM_ENVS_CACHE", str(world_cache))
    one, two = tmp_path / "one", tmp_path / "two"
    launched = _launch_two_processes(two, world_cache, tmp_path / "hf_home")  # its start-up overlaps the 1-process run
    try:
        suite = load_suite_config("tiny", [*SETTINGS, f"rrhf.output_dir={one}"])
        run(suite.rrhf, suite.task, ["sample", "score", "train"], verbose=False)
        stdout, stderr = launched.communicate(timeout=180)
    finally:
        if launched.poll() is None:
            os.killpg(launched.pid, signal.SIGKILL)
            launched.communicate()
    assert launched.returncode == 0, stdout[-2000:] + stderr[-4000:]
    summaries = [line for line in stdout.splitlines() if line.startswith("{")]
    assert len(summaries) == 1, stdout[-2000:]  # one --json summary, from the main process

    # The main process sampled and scored exactly what one process did (the others waited), so both
    # trainings start from the same data.
    assert (two / "scored.jsonl").read_bytes() == (one / "scored.jsonl").read_bytes()
    done = [read_jsonl(run_dir / "train_log.jsonl")[0] for run_dir in (one, two)]
    assert [row["update"] for row in done[0]] == [row["update"] for row in done[1]] == [1, 2, 3, 4]
    for a, b in zip(*done):
        for key in ("loss", "rank_loss", "sft_loss"):
            assert math.isclose(a[key], b[key], rel_tol=LOSS_REL, abs_tol=LOSS_ABS), (a, b)
        assert a["lr"] == b["lr"]
    summary = [json.loads((run_dir / "model" / "rrhf_train.json").read_text()) for run_dir in (one, two)]
    assert (summary[0]["processes"], summary[1]["processes"]) == (1, 2)
    assert summary[0]["updates"] == summary[1]["updates"] == 4

    tokenizer = load_tokenizer(str(one / "model"), padding_side="right")
    batch = collate(tokenize_scored(read_jsonl(one / "scored.jsonl")[0], tokenizer, 128), tokenizer.pad_token_id)
    gap = (_logprobs(one / "model", batch) - _logprobs(two / "model", batch)).abs().max().item()
    assert gap <= LOGPROB_ATOL, f"the final models' log-probs differ by up to {gap:.2e}"
    base = load_causal_lm(test_world.lm_dir, device="cpu").state_dict()
    a, b = (load_causal_lm(run_dir / "model", device="cpu").state_dict() for run_dir in (one, two))
    apart = math.sqrt(sum(float((a[k] - b[k]).square().sum()) for k in a))
    moved = math.sqrt(sum(float((a[k] - base[k]).square().sum()) for k in a))
    assert apart <= WEIGHT_REL * moved, f"weights {apart:.2e} apart after a change of {moved:.2e}"


def test_a_micro_batch_the_processes_cannot_split_is_refused() -> None:
    check_process_count(6, 2)
    check_process_count(6, 1)
    with pytest.raises(ValueError, match=r"queries_per_batch=6 .* number of processes \(4\); set "
                                         r"rrhf.queries_per_batch=8 .* divides 6"):
        check_process_count(6, 4)


def test_epoch_items_fill_the_short_last_micro_batch_with_weight_0_copies_only_for_several_processes() -> None:
    order = [4, 0, 3, 1, 2]
    assert epoch_items(order, 2, 1) == [(4, 0.5), (0, 0.5), (3, 0.5), (1, 0.5), (2, 1.0)]
    assert epoch_items(order, 4, 2) == [(4, 0.25), (0, 0.25), (3, 0.25), (1, 0.25), (2, 1.0), (2, 0.0), (2, 0.0),
                                        (2, 0.0)]
