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

from agents.rrhf.cache import append_jsonl, read_jsonl, resume_jsonl, write_jsonl_atomic
from agents.rrhf.config import RRHFConfig
from agents.rrhf.loss import RRHFLossOutput, response_logprobs, rrhf_loss
from agents.rrhf.pipeline import STAGES, check_output_dir, evaluate, run
from agents.rrhf.stages import Sources, load_dataset_responses, resolve_sources, sample, score
from agents.rrhf.training import collate, tokenize_scored, train

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
