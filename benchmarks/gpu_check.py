"""The Python steps of `benchmarks/gpu_check.sh`: the environment record, a short MaskablePPO run, the summary.

    python -m benchmarks.gpu_check environment --out DIR            # DIR/environment.json (and prints it)
    python -m benchmarks.gpu_check ppo --out DIR --device cuda --shape llama-1b --steps 4096
    python -m benchmarks.gpu_check summary --out DIR                # DIR/gpu_check.{json,md} from the others

The PPO run trains MaskablePPO (policy on `--device`) on the SB3 view of TokenAccept-v0 over the same
random Llama as the throughput benchmark (`benchmarks.throughput.make_random_llama`, the world grammar's
prompts, zero reward), and reports env-steps/s of `learn()` (rollouts and updates together).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.provenance import git_commit
from llm_envs.io import atomic_write_text

PACKAGES = ("torch", "transformers", "gymnasium", "stable-baselines3", "sb3-contrib", "numpy", "pytest")


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _nvidia_smi() -> str | None:
    """nvidia-smi's one-line summary; None where it is missing or does not answer within 20 s."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return None
    return done.stdout.strip() or None


def environment() -> dict[str, Any]:
    """Where the check ran: GPU, driver, library versions, commit."""
    cuda = torch.cuda.is_available()
    return {
        "gpu": torch.cuda.get_device_name() if cuda else None,
        "gpu_memory_gib": torch.cuda.get_device_properties(0).total_memory / 2**30 if cuda else None,
        "nvidia_smi": _nvidia_smi(),
        "cuda_available": cuda,
        "torch_cuda": torch.version.cuda,
        "python": platform.python_version(),
        "packages": {name: _version(name) for name in PACKAGES},
        "cpu_count": os.cpu_count(),
        "git_commit": git_commit(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def ppo_speed(device: str, shape: str, num_envs: int, steps: int, n_steps: int, seed: int = 0) -> dict[str, Any]:
    """Train MaskablePPO for `steps` env-steps on `num_envs` rows; env-steps/s of the whole `learn()`."""
    from sb3_contrib import MaskablePPO
    from stable_baselines3.common.logger import Logger

    import llm_envs
    from benchmarks.throughput import grammar_prompts, make_random_llama, zero_reward
    from llm_envs.world.build import train_tokenizer

    prompts = grammar_prompts()
    tokenizer = train_tokenizer(prompts)
    model = make_random_llama(tokenizer, shape, seed=seed, device=device)
    venv = llm_envs.make_sb3_vec_env("llm_envs/TokenAccept-v0", num_envs, lm=model, tokenizer=tokenizer,
                                     reward=zero_reward, prompts=prompts, max_new_tokens=32, device=device)
    try:
        # batch_size = one rollout: one gradient step per epoch keeps the update share of a short run small
        agent = MaskablePPO("MlpPolicy", venv, n_steps=n_steps, batch_size=n_steps * num_envs, n_epochs=2,
                            seed=seed, policy_kwargs=dict(net_arch=[64]), device=device)
        agent.set_logger(Logger(folder=None, output_formats=[]))  # SB3's default logger makes a /tmp/SB3-* dir per run
        start = time.perf_counter()
        agent.learn(steps)
        seconds = time.perf_counter() - start
    finally:
        venv.close()
    return {"shape": shape, "device": device, "num_envs": num_envs, "n_steps": n_steps,
            "timesteps": int(agent.num_timesteps), "seconds": seconds,
            "env_steps_per_s": agent.num_timesteps / seconds, "policy_device": str(agent.device)}


def _tests_summary(out: Path, exit_code: int | None) -> dict[str, Any]:
    """The pytest run's exit code and its last line ("3 passed, 1 xfailed in 9.1s")."""
    log = out / "cuda_tests.log"
    lines = [line for line in log.read_text().splitlines() if line.strip()] if log.is_file() else []
    return {"exit_code": exit_code, "summary": lines[-1] if lines else "not run"}


def summary(out: Path, seconds: float | None, tests_rc: int | None) -> dict[str, Any]:
    """gpu_check.json: every step's record in one file; gpu_check.md: the tables a reader wants."""
    def load(name: str) -> Any:
        path = out / name
        return json.loads(path.read_text()) if path.is_file() else None

    throughput = load("throughput.json") or load("throughput_quick.json")
    report = {"environment": load("environment.json"), "cuda_tests": _tests_summary(out, tests_rc),
              "throughput": throughput, "ppo": load("ppo.json"), "wall_seconds": seconds}
    atomic_write_text(out / "gpu_check.json", json.dumps(report, indent=2) + "\n")
    atomic_write_text(out / "gpu_check.md", markdown(report))
    return report


def markdown(report: dict[str, Any]) -> str:
    env, tests, ppo, tp = report["environment"] or {}, report["cuda_tests"] or {}, report["ppo"], report["throughput"]
    lines = ["# GPU check", "",
             f"{env.get('gpu') or 'no GPU (dry run on CPU)'}; torch {env.get('packages', {}).get('torch')} "
             f"(CUDA {env.get('torch_cuda')}), transformers {env.get('packages', {}).get('transformers')}; "
             f"git {env.get('git_commit')}; {env.get('date')}"
             + (f"; {report['wall_seconds']:.0f} s wall." if report.get("wall_seconds") else "."), "",
             f"Tests marked `cuda`: exit code {tests.get('exit_code')} ({tests.get('summary', 'not run')}).", "",
             "| model | params | N | limit | env | env / limit | env / limit at most | env / limit, prefill_ahead | naive "
             "| peak GPU mem |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in (tp or {}).get("rows", []):
        peak = r.get("peak_gpu_mem_gib")
        lines.append(f"| {r['model']} | {r['params'] / 1e6:.1f}M | {r['num_envs']} | {r['limit_steps_per_s']:.0f} | "
                     f"{r['env_steps_per_s']:.0f} | {r['env_over_limit']:.2f} | "
                     f"{r.get('env_over_limit_at_most', float('nan')):.2f} | {r.get('ahead_over_limit', float('nan')):.2f} | "
                     f"{r['naive_steps_per_s']:.0f} | "
                     + (f"{peak:.2f} GiB |" if peak is not None else "- |"))
    lines += ["", "Throughput unit: env-steps/s (see throughput.md beside this file).", ""]
    if ppo:
        lines += [f"MaskablePPO on TokenAccept-v0 ({ppo['shape']}, {ppo['num_envs']} envs, policy on "
                  f"{ppo['policy_device']}): {ppo['timesteps']} steps in {ppo['seconds']:.1f} s = "
                  f"{ppo['env_steps_per_s']:.0f} env-steps/s (rollouts and updates).", ""]
    return "\n".join(lines)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("step", choices=["environment", "ppo", "summary"])
    parser.add_argument("--out", type=Path, required=True, help="the check's result directory")
    parser.add_argument("--device", default="cuda", help="ppo: where the LM, the env and the policy run")
    parser.add_argument("--shape", default="llama-1b", help="ppo: a shape of benchmarks.throughput.LLAMA_SHAPES")
    parser.add_argument("--num-envs", type=int, default=16, help="ppo: rows of the vector env")
    parser.add_argument("--steps", type=int, default=4096, help="ppo: total env-steps to train")
    parser.add_argument("--n-steps", type=int, default=64, help="ppo: rollout length per row")
    parser.add_argument("--seconds", type=float, default=None, help="summary: the check's wall time")
    parser.add_argument("--tests-rc", type=int, default=None, help="summary: the exit code of pytest -m cuda")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.step == "environment":
        record = environment()
        atomic_write_text(args.out / "environment.json", json.dumps(record, indent=2) + "\n")
    elif args.step == "ppo":
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        record = ppo_speed(args.device, args.shape, args.num_envs, args.steps, args.n_steps)
        atomic_write_text(args.out / "ppo.json", json.dumps(record, indent=2) + "\n")
    else:
        record = summary(args.out, args.seconds, args.tests_rc)
        print(markdown(record))
        return
    print(json.dumps(record, indent=2), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
