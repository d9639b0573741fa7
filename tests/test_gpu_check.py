"""`bash benchmarks/gpu_check.sh --dry-run`: the GPU check's steps on CPU at toy sizes, so it does not rot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FILES = {"environment.json", "cuda_tests.log", "throughput_quick.json", "throughput_quick.md", "ppo.json",
         "gpu_check.json", "gpu_check.md", "gpu_check.log"}


@pytest.mark.slow  # ~40 s (six Python processes): .ci/run runs it after the test command
def test_dry_run_writes_every_result_file(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", "--out", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert {p.name for p in tmp_path.iterdir()} == FILES  # 8 flat files: what the device tool brings back

    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["environment"]["cuda_available"] is False and report["environment"]["packages"]["torch"]
    assert report["cuda_tests"]["exit_code"] == 0 and "skipped" in report["cuda_tests"]["summary"]
    rows = report["throughput"]["rows"]
    assert [(r["model"], r["num_envs"], r["device"]) for r in rows] == [("llama-tiny", 1, "cpu"), ("llama-tiny", 4, "cpu")]
    assert all(r["peak_gpu_mem_gib"] is None and r["env_steps_per_s"] > 0 for r in rows)
    assert report["ppo"]["timesteps"] >= 128 and report["ppo"]["env_steps_per_s"] > 0
    assert "| llama-tiny |" in (tmp_path / "gpu_check.md").read_text()
    assert "done in" in (tmp_path / "gpu_check.log").read_text()


def test_bad_arguments_name_the_usage() -> None:
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--frobnicate"], cwd=ROOT,
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "unknown argument '--frobnicate'" in done.stderr and "usage:" in done.stderr


def test_the_1b_shape_is_about_a_billion_parameters() -> None:
    from benchmarks.throughput import LLAMA_SHAPES, llama_params

    assert 0.9e9 < llama_params(LLAMA_SHAPES["llama-1b"]) < 1.2e9
