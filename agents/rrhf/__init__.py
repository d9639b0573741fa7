"""RRHF (Yuan et al. 2023, "RRHF: Rank Responses to align Human Feedback") as a non-RL baseline.

Three stages that run separately and resume, in one output directory:

1. `sample`: k responses per training prompt from the base LM (beam search, diverse beam search or
   top-p sampling: the paper's BP / DP / SP) plus the dataset's own responses -> `samples.jsonl`.
2. `score`: every response scored by the reward wrapper -> `scored.jsonl` (`{"query", "responses",
   "scores"}`, the reference format), appended batch by batch, fsynced.
3. `train`: fine-tuning with `rrhf_loss` on accelerate (`accelerate launch` for DDP/FSDP) ->
   `model/` (save_pretrained + tokenizer), loadable by every env and decoder like any other LM.

`evaluate` compares greedy decoding of the base and the tuned LM (and best-of-n of the base) on
held-out prompts. `run(cfg, task)` does all of it on the suite's task; `llm-envs rrhf --config tiny`
is the CLI.

    >>> from agents.rrhf import RRHFConfig, run
    >>> run(RRHFConfig(output_dir="runs/rrhf"))       # on the default task: the embedded world
"""

from importlib import import_module
from typing import Any

# Public names -> the module that defines them, imported on first use (PEP 562) so that reading an
# RRHFConfig (`llm-envs config show`) loads no torch or accelerate.
_EXPORTS = {
    "append_jsonl": "cache", "read_jsonl": "cache", "resume_jsonl": "cache", "write_jsonl_atomic": "cache",
    "RRHFConfig": "config",
    "RRHFLossOutput": "loss", "response_logprobs": "loss", "rrhf_loss": "loss",
    "STAGES": "pipeline", "check_output_dir": "pipeline", "evaluate": "pipeline", "run": "pipeline",
    "Sources": "stages", "load_dataset_responses": "stages", "resolve_sources": "stages", "sample": "stages",
    "score": "stages",
    "collate": "training", "tokenize_scored": "training", "train": "training",
}


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'agents.rrhf' has no attribute {name!r}")
    return getattr(import_module(f"agents.rrhf.{_EXPORTS[name]}"), name)


__all__ = [
    "RRHFConfig",
    "RRHFLossOutput",
    "STAGES",
    "Sources",
    "append_jsonl",
    "check_output_dir",
    "collate",
    "evaluate",
    "load_dataset_responses",
    "read_jsonl",
    "resolve_sources",
    "response_logprobs",
    "resume_jsonl",
    "rrhf_loss",
    "run",
    "sample",
    "score",
    "tokenize_scored",
    "train",
    "write_jsonl_atomic",
]
