"""`RRHFConfig`: every knob of the three RRHF stages (sample, score, train) and the evaluation.

A suite file's `rrhf:` section. What RRHF trains on and is scored by (base LM, reward model, train and
held-out prompts, response budget, device) is the suite's `task:` (`llm_envs.task.Task`); with the
default task everything comes from the embedded offline world (the dataset's own responses too).
The paper's values for a 7B model are given in the help texts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Sampling = Literal["beam", "diverse_beam", "top_p"]

# Fields that define each stage's output: changing one after that output exists is refused, so a
# resumed run never mixes results of two configs (see `agents.rrhf.pipeline.check_output_dir`).
# `task.*` keys are the task's fields (see `agents.rrhf.pipeline.run_settings`). The process count of
# `accelerate launch` is none of them: queries_per_batch is the micro-batch over all processes, so the
# batches and updates are the same on any count (a resumed run may use another).
SAMPLE_FIELDS = (
    "task.lm", "task.train_prompts", "task.max_prompt_tokens", "task.world", "task.world_seed", "num_prompts",
    "task.chat_template", "task.system_prompt", "dataset_responses", "responses_per_prompt", "sampling", "num_samples",
    "max_new_tokens", "temperature", "top_p", "diversity_penalty", "sample_batch_size", "cut_at_turn", "seed",
)
SCORE_FIELDS = SAMPLE_FIELDS + ("task.reward", "task.reward_rules", "task.reward_tokenizer")
TRAIN_FIELDS = SCORE_FIELDS + (
    "epochs", "max_steps", "queries_per_batch", "grad_accum", "lr", "warmup_ratio", "weight_decay",
    "max_grad_norm", "rank_weight", "sft_weight", "sft_normalization", "max_length", "mixed_precision",
)
EVAL_FIELDS = TRAIN_FIELDS + ("task.eval_prompts", "task.max_new_tokens", "task.gold", "eval_num_prompts",
                               "eval_best_of")


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass(frozen=True)
class RRHFConfig:
    """RRHF (Yuan et al. 2023) on any causal LM; the defaults use the embedded world."""

    output_dir: str = field(default="runs/rrhf", metadata=_help(
        "Run directory: samples.jsonl, scored.jsonl, config.yaml, train_log.jsonl, model/, eval.json."))
    # ------------------------------------------------------------------ what to train on (besides the task)
    num_prompts: int | None = field(default=None, metadata=_help(
        "Use a seeded sample of this many of the task's train prompts; null = all."))
    dataset_responses: str | None = field(default="auto", metadata=_help(
        "The dataset's own responses (the paper's 'P'): a .jsonl of {prompt, response} (or {prompt, "
        "chosen, rejected}) rows; 'auto' = the world's sft_corpus.jsonl when the task's train prompts "
        "are the world's; null = none."))
    responses_per_prompt: int = field(default=2, metadata=_help(
        "Dataset responses added per prompt (first ones found; HH gives 2: chosen and rejected)."))
    # ------------------------------------------------------------------ stage 1: sampling
    sampling: Sampling = field(default="diverse_beam", metadata=_help(
        "How the base LM samples: 'beam' (BP: beam search, num_beams=num_samples), 'diverse_beam' (DP: "
        "num_samples groups of 1 beam, Hamming diversity penalty), 'top_p' (SP: num_samples independent "
        "samples with top_p and temperature)."))
    num_samples: int = field(default=4, metadata=_help("k responses sampled per prompt (paper: 4)."))
    max_new_tokens: int = field(default=40, metadata=_help("Longest sampled response (paper: 128)."))
    temperature: float = field(default=0.8, metadata=_help("Temperature of 'top_p' sampling (paper: 0.8)."))
    top_p: float = field(default=1.0, metadata=_help("top_p of 'top_p' sampling (paper: 1.0)."))
    diversity_penalty: float = field(default=1.0, metadata=_help("Diverse beam search penalty (paper: 1.0)."))
    sample_batch_size: int = field(default=32, metadata=_help("Prompts per sampling batch."))
    cut_at_turn: bool = field(default=True, metadata=_help(
        "Cut sampled responses at the next turn marker ('Human:', 'Assistant:'), as the reward "
        "wrapper does before scoring (the reference code's stop_response)."))
    # ------------------------------------------------------------------ stage 2: scoring
    score_batch_size: int = field(default=64, metadata=_help("(prompt, response) pairs per reward-model forward."))
    # ------------------------------------------------------------------ stage 3: training
    epochs: int = field(default=3, metadata=_help("Passes over the scored prompts (paper: 3)."))
    max_steps: int | None = field(default=None, metadata=_help(
        "Stop after this many optimizer updates (overrides epochs when smaller); null = no cap."))
    queries_per_batch: int = field(default=8, metadata=_help(
        "Prompts per micro-batch in total over all processes (all their responses go in together); under "
        "accelerate launch each of N processes takes queries_per_batch / N, so it must be divisible by N "
        "(paper: 1 per GPU, i.e. 8 on 8 GPUs)."))
    grad_accum: int = field(default=1, metadata=_help(
        "Micro-batches per optimizer update: queries_per_batch * grad_accum prompts per update, whatever "
        "the process count (paper: 8, with 8 prompts per micro-batch on 8 GPUs: 64 prompts per update)."))
    lr: float = field(default=5e-4, metadata=_help(
        "Peak learning rate: linear warmup then linear decay to 0 (paper: 2e-5 for 7B models; the "
        "world's small LM needs more)."))
    warmup_ratio: float = field(default=0.03, metadata=_help("Share of the updates spent warming up."))
    weight_decay: float = field(default=0.0, metadata=_help("AdamW weight decay."))
    max_grad_norm: float = field(default=1.0, metadata=_help("Gradient clipping norm (0 = none)."))
    rank_weight: float = field(default=1.0, metadata=_help(
        "Weight of the ranking loss (paper and scripts: 1; the reference code's default is 100)."))
    sft_weight: float = field(default=1.0, metadata=_help("Weight of the SFT loss on the best response."))
    sft_normalization: Literal["mean", "sum"] = field(default="mean", metadata=_help(
        "SFT loss of the best response: 'mean' per-token NLL (its own length), 'sum' over tokens (eq. 4)."))
    max_length: int | None = field(default=None, metadata=_help(
        "Tokens per (prompt + response) row; longer responses are cut; null = the model's context."))
    mixed_precision: Literal["no", "bf16", "fp16"] = field(default="no", metadata=_help(
        "accelerate mixed precision (bf16 on recent GPUs)."))
    checkpoint_every: int = field(default=0, metadata=_help(
        "Save a resumable training checkpoint every this many updates (0 = never)."))
    log_every: int = field(default=10, metadata=_help("Updates between train_log.jsonl lines."))
    # ------------------------------------------------------------------ evaluation
    eval_num_prompts: int | None = field(default=None, metadata=_help(
        "Evaluate on a seeded sample of this many of the task's held-out prompts (null = all)."))
    eval_best_of: int = field(default=16, metadata=_help("n of the best-of-n reference (0 = skip it)."))
    # ------------------------------------------------------------------ general
    seed: int = field(default=0, metadata=_help("Seed of prompt sampling, response sampling and training."))
    progress: bool = field(default=True, metadata=_help("Progress bars on stderr."))
    num_threads: int | None = field(default=None, metadata=_help(
        "torch CPU threads (torch.set_num_threads); null = torch's default. 1 is much faster for "
        "small models on a busy machine."))

    def __post_init__(self) -> None:
        positive = ("num_samples", "max_new_tokens", "sample_batch_size", "score_batch_size", "epochs",
                    "queries_per_batch", "grad_accum", "responses_per_prompt", "log_every")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r}; expected a positive integer.")
        for name in ("num_prompts", "max_steps", "max_length", "eval_num_prompts", "num_threads"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name}={value!r}; expected a positive integer or null.")
        for name in ("eval_best_of", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)!r}; expected 0 (off) or a positive integer.")
        if self.sampling not in ("beam", "diverse_beam", "top_p"):
            raise ValueError(f"sampling={self.sampling!r}; expected 'beam' (BP), 'diverse_beam' (DP) or 'top_p' (SP).")
        if self.sampling == "top_p" and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p!r}; expected a number in (0, 1].")
        if not self.temperature > 0:
            raise ValueError(f"temperature={self.temperature!r}; expected a number > 0.")
        if self.num_samples == 1 and self.dataset_responses is None:
            raise ValueError(
                "num_samples=1 with dataset_responses=null leaves one response per prompt, so there is "
                "nothing to rank; use num_samples >= 2 or add the dataset's responses."
            )
        for name in ("lr", "rank_weight", "sft_weight", "diversity_penalty", "weight_decay", "max_grad_norm"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)!r}; expected a number >= 0.")
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr!r}; expected a number > 0 (e.g. 5e-4 on the world, 2e-5 for 7B).")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio={self.warmup_ratio!r}; expected a number in [0, 1).")
        if not self.output_dir:
            raise ValueError("output_dir is empty; give the run directory (e.g. runs/rrhf).")
