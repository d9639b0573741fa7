"""The structure a newcomer relies on: one-way layers with no cycles (import-linter contracts in
pyproject.toml), a command line that answers at once, and suites that run from any directory."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_the_import_contracts_hold():
    """Layers benchmarks > agents > llm_envs, the layers inside llm_envs and the reward package, and
    no cycles: a new upward import fails here with import-linter's report of the offending chain."""
    script = Path(sys.executable).parent / "lint-imports"
    command = [str(script)] if script.is_file() else [sys.executable, "-c",
                                                      "from importlinter.cli import lint_imports_command as c; c()"]
    result = subprocess.run([*command, "--no-cache", "--config", str(ROOT / "pyproject.toml")], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "Contracts: 4 kept, 0 broken." in result.stdout


def _python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_the_command_line_parses_without_heavy_imports(tmp_path):
    """`llm-envs --help` (and every subcommand's) imports no torch, transformers or SB3: it answers at once."""
    code = ("import sys\nfrom benchmarks.cli import build_parser\nparser = build_parser()\n"
            "for argv in (['--help'], ['bench', '--help'], ['train', '--help'], ['config', 'show', '--help']):\n"
            "    try:\n        parser.parse_args(argv)\n    except SystemExit:\n        pass\n"
            "heavy = sorted(m for m in ('torch', 'transformers', 'stable_baselines3', 'gymnasium') if m in sys.modules)\n"
            "print('HEAVY', heavy)")
    result = _python(code, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "HEAVY []" in result.stdout


def test_llm_envs_help_runs_as_a_module(tmp_path):
    result = subprocess.run([sys.executable, "-m", "benchmarks.cli", "--help"], cwd=tmp_path, capture_output=True,
                            text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)
    assert result.returncode == 0 and "llm-envs bench" in result.stdout


def test_shipped_suites_resolve_by_name_from_any_directory(tmp_path, monkeypatch):
    from benchmarks.suites import shipped_suites, suite_path

    monkeypatch.chdir(tmp_path)
    assert {"tiny", "hh_gpu"} <= set(shipped_suites())
    assert suite_path("tiny").is_file() and suite_path("tiny.yaml") == suite_path("tiny")
    own = tmp_path / "mine.yaml"
    own.write_text("task: {max_new_tokens: 8}\n")
    assert suite_path(str(own)) == own
    with pytest.raises(FileNotFoundError, match="Did you mean 'tiny'"):
        suite_path("tinny")


def test_config_show_prints_every_field_with_its_help_without_loading_models(tmp_path):
    code = ("import sys\nfrom benchmarks.cli import main\nmain(['config', 'show', 'tiny', 'task', 'train'])\n"
            "print('TORCH', 'torch' in sys.modules)")
    result = _python(code, tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "task.lm = None" in out and "the embedded world's SFT LM" in out  # value and help
    assert "train.env.p_t = 0.01" in out and "SKAM threshold" in out  # the env's own params dataclass
    assert "bench.methods" not in out and "TORCH False" in out
