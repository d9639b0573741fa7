"""`accelerate launch` of `llm-envs` on several CPU processes, as the distributed tests run it."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A port for the launch's rendezvous (not accelerate's default 29500: another launch, e.g. the other
    xdist worker's, may hold it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_launch(num_processes: int, *cli_args: str) -> list[str]:
    """The command line of `accelerate launch ... -m benchmarks.cli <cli_args>`. `--multi_gpu` is what
    starts several local processes (torchrun); with no GPU, or task.device=cpu, they join over gloo
    (`--cpu` would start one). Every flag given, so no accelerate config file is asked for or read."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(num_processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(free_port()), "-m", "benchmarks.cli", *cli_args]


def launch_env(world_cache: Path, hf_home: Path) -> dict[str, str]:
    """The launched processes' environment: this checkout importable, one torch thread each, the test world's
    cache, a private HF_HOME (no user accelerate config is read), offline, wandb off."""
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "LLM_ENVS_CACHE": str(world_cache),
            "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
