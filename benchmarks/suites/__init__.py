"""The shipped benchmark suites, installed as package data so they run by name from any directory.

- `tiny`: every method on the embedded offline world (the default of `llm-envs bench`).
- `v2`: every method on world v2, where methods separate and reward hacking shows (3 seeds).
- `smollm2`: every method on a real pretrained chat LM offline (SmolLM2-135M-Instruct, world `smollm2`).
- `hh_gpu`: the same suite on hub models (GPT-2-large, a DeBERTa reward model, HH-RLHF) on a GPU.
- `proxy_rlhf`: the Proxy-RLHF / MARA protocol on a GPU (alpaca-7b-reproduced, the beaver-7b-v1.0-reward
  score model, HH single-turn prompts in safe-rlhf's template).
- `args`: the ARGS protocol on a GPU (argsearch's LLaMA-7B SFT and RM, Dahoas/full-hh-rlhf, ARGS's metrics).

`suite_path("tiny")` is the shipped file; `suite_path("my_suite.yaml")` is a user's own file. Copy a
shipped suite to start one of your own: `llm-envs config path tiny`.
"""

from __future__ import annotations

import difflib
import os
from importlib import resources
from pathlib import Path

DEFAULT_SUITE = "tiny"


def shipped_suites() -> list[str]:
    """Names of the suites that ship with llm_envs."""
    folder = resources.files(__name__)
    return sorted(entry.name[: -len(".yaml")] for entry in folder.iterdir() if entry.name.endswith(".yaml"))


def suite_path(config: str | os.PathLike) -> Path:
    """A suite's YAML file: an existing path, or the name of a shipped suite (`tiny`, `hh_gpu`)."""
    path = Path(config)
    if path.is_file():
        return path
    name = str(config)
    name = name[: -len(".yaml")] if name.endswith(".yaml") else name
    shipped = shipped_suites()
    if name in shipped:
        return Path(str(resources.files(__name__) / f"{name}.yaml"))
    close = difflib.get_close_matches(name, shipped, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise FileNotFoundError(
        f"config {str(config)!r} is neither a YAML file nor a shipped suite.{hint} Shipped suites: "
        f"{', '.join(shipped)}; or pass the path of your own YAML file (start from `llm-envs config path tiny`)."
    )
