"""ARGS: alignment as reward-guided search (Khanov et al., 2024), greedy and stochastic.

At each step ARGS takes the top-k candidates of the raw next-token logits, `torch.topk(logits, k)`
(ties by lower token id, `llm_envs.envs.pools.top_k_by_id`, so bf16 ties give one order everywhere),
scores each as `logit_j + w * r_j`, where `r_j` is the reward model's score of prompt + response +
candidate j, and keeps the argmax (ARGS-greedy) or samples one candidate from
`softmax(score / temperature)` with one `torch.multinomial(probs, 1)` per step (ARGS-stochastic).
Paper settings: k = 10, w = 1.5, temperature 0.7.

Two faces of the same rule (`args_select`):

- `ARGS`, a batch decoder (`agents.base.Decoder`): ``ARGS(lm, reward, k=10, w=1.5).generate(prompts)``.
  One batched LM forward and one reward-model forward per step for all prompts in flight; the
  reward model's KV cache of every prefix is kept (`llm_envs.rewards.CandidateScorer`). The top-k
  runs on the LM's device and only the [n, k] candidates reach the host, in one copy per step
  (`top_k_to_host`); the rule itself (`args_select`) runs on the host, on [n, k].
- `ARGSAgent`, a policy of `llm_envs/TokenChoice-v0` (`agents.base.PolicyAgent`): it reads the
  env's `candidate_logits()` and `candidate_rewards()` (bound by `PolicyDecoder`).

Against the reference code (deeplearning-wisc/args): with ``scoring="raw"`` (the default) the
reward model reads exactly the ids the reference feeds it, ``prompt_ids + response + [candidate]``,
so with ``stop_at_eos=False`` (a constructor setting, the default of `generate`'s; the ARGS protocol
suite sets it, as the reference always decodes ``max_new_tokens`` tokens) the tokens equal the reference's (for ARGS-stochastic, a given
``torch.manual_seed(s)`` before a single-prompt ``generate(seed=None)``, or ``seed=s``, draws the
same samples). Beyond it: batches of prompts in both modes, stopping at EOS (default), and reward
models with a different tokenizer (their text is re-tokenized and scored under the reward
wrapper's conventions, since there are no shared ids). ``scoring="wrapper"`` scores candidates
under the wrapper's conventions (response cut at EOS and turn markers) as the envs do.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch

from agents.base import Generation
from agents.decoding import check_context, encode_prompts
from llm_envs.engine import DecodeEngine
from llm_envs.envs.pools import top_k_by_id
from llm_envs.models import ModelSpec, load_causal_lm, resolve_tokenizer
from llm_envs.rewards import CandidateScorer, RewardWrapper, Scoring

Mode = Literal["greedy", "stochastic"]

__all__ = ["ARGS", "ARGSAgent", "args_select"]


def _check_args(k: int | None, w: float, mode: str, temperature: float, scoring: str) -> None:
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        raise ValueError(f"k={k!r}; expected a positive int (the paper uses 10).")
    if not np.isfinite(w):
        raise ValueError(f"w={w!r}; expected a finite reward weight (the paper uses 1.5; 0 = greedy decoding).")
    if mode not in ("greedy", "stochastic"):
        raise ValueError(f"mode={mode!r}; expected 'greedy' or 'stochastic'.")
    if not temperature > 0:
        raise ValueError(f"temperature={temperature!r}; expected a number > 0 (the paper uses 0.7).")
    if scoring not in ("raw", "wrapper"):
        raise ValueError(f"scoring={scoring!r}; expected 'raw' (the reference's RM input) or 'wrapper'.")


def args_select(
    logits: torch.Tensor,
    rewards: torch.Tensor,
    *,
    w: float,
    mode: Mode,
    temperature: float = 0.7,
    generators: Sequence[torch.Generator | None] | None = None,
    valid: torch.Tensor | None = None,
) -> list[int]:
    """The ARGS rule on [B, k] candidate logits and rewards (in topk order): one slot per row.

    ``score = rewards * w + logits`` (as the reference computes it, in the logits' dtype). Greedy:
    ``torch.topk(score, 1)``, the first (lowest) slot on ties (``argmax``; topk's tie pick is
    arbitrary). Stochastic: per row, ``torch.multinomial(softmax(score / temperature),
    1, generator=generators[i])`` (None = torch's global generator). `valid` masks slots out.
    """
    scores = rewards.to(logits.dtype) * w + logits
    if valid is not None:
        scores = scores.masked_fill(~valid, float("-inf"))
    if mode == "greedy":
        return scores.argmax(dim=-1).tolist()  # documented: the first maximum on ties
    gens = list(generators) if generators is not None else [None] * scores.shape[0]
    probs = torch.softmax(scores / temperature, dim=-1)
    return [int(torch.multinomial(probs[i], 1, generator=gens[i])) for i in range(scores.shape[0])]


def top_k_to_host(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-k logits [B, k] (float32) and ids [B, k] (int64) of each row of `logits` [B, V], on the host.

    The top-k runs on the logits' device (`top_k_by_id`: ties by lower id, the same order on every
    device), and only [B, k] comes back, in ONE device->host copy: ARGS needs k candidates, and the
    full float32 logits are 0.5 MB a row at a 128k vocabulary. Values and ids travel as one int32
    block (the float32 bits viewed as int32, ids < 2**31), so the values come back bit for bit.
    """
    values, ids = top_k_by_id(logits.float(), k)
    packed = torch.cat([values.view(torch.int32), ids.to(torch.int32)], dim=1).cpu()
    return packed[:, :k].view(torch.float32), packed[:, k:].long()


class _Rows:
    """The host-side state of `ARGS.generate`'s decoding rows: the prompt each decodes, its response so
    far, its reward-model calls, and its current top-k candidates (logits and ids, [n, k] on the host)."""

    def __init__(self, n: int, k: int) -> None:
        self.slot: list[int | None] = [None] * n  # prompt index each row decodes
        self.responses: list[list[int]] = [[] for _ in range(n)]
        self.rm_calls = [0] * n
        self.top_logits = torch.zeros(n, k)
        self.top_ids = torch.zeros(n, k, dtype=torch.long)

    def live(self) -> list[int]:
        """The rows decoding a prompt."""
        return [r for r, s in enumerate(self.slot) if s is not None]

    def start(self, rows: list[int], prompts: list[int], top_logits: torch.Tensor, top_ids: torch.Tensor) -> None:
        """`rows` start decoding prompts `prompts` with these first candidates."""
        for row, index in zip(rows, prompts):
            self.slot[row], self.responses[row], self.rm_calls[row] = index, [], 0
        self.set_heads(rows, top_logits, top_ids)

    def heads(self, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The candidates' logits and ids [len(rows), k] of `rows`."""
        index = torch.tensor(rows)
        return self.top_logits[index], self.top_ids[index]

    def set_heads(self, rows: list[int], top_logits: torch.Tensor, top_ids: torch.Tensor) -> None:
        """New candidates [len(rows), k] for `rows`."""
        index = torch.tensor(rows)
        self.top_logits[index], self.top_ids[index] = top_logits, top_ids

    def advance(
        self, live: list[int], tokens: list[int], rm_calls: int, stop: int | None, max_tokens: int
    ) -> tuple[list[int], list[int]]:
        """Append each live row's token and count the step's reward-model calls; returns the rows going
        on and the rows done (the token is `stop`, or the response has `max_tokens` tokens)."""
        going, done = [], []
        for row, token in zip(live, tokens):
            self.responses[row].append(token)
            self.rm_calls[row] += rm_calls
            (done if token == stop or len(self.responses[row]) >= max_tokens else going).append(row)
        return going, done

    def flags(self, rows: list[int]) -> list[bool]:
        """[n] flags: True for `rows`."""
        flags = [False] * len(self.slot)
        for row in rows:
            flags[row] = True
        return flags


class ARGS:
    """ARGS batch decoder: ``ARGS(lm, reward, k=10, w=1.5, mode="greedy").generate(prompts)``.

    `lm` / `reward` take hub names, local directories or loaded models (a reward may also be a
    `RewardWrapper` or a function), like the envs; both default to the embedded world's.
    `batch_size` prompts are decoded at once (finished rows are refilled from the queue).
    ``prefix_cache=False`` scores each candidate from scratch (same tokens, more compute).
    After `generate`, `last_stats` holds the batched LM forwards and reward-model calls it used.
    """

    def __init__(
        self,
        lm: ModelSpec | None = None,
        reward: Any = None,
        *,
        k: int = 10,
        w: float = 1.5,
        mode: Mode = "greedy",
        temperature: float = 0.7,
        scoring: Scoring = "raw",
        tokenizer: Any = None,
        device: str | torch.device | None = "auto",
        dtype: str | torch.dtype | None = "auto",
        batch_size: int = 16,
        prefix_cache: bool = True,
        stop_at_eos: bool = True,
        name: str | None = None,
    ) -> None:
        _check_args(k, w, mode, temperature, scoring)
        if not isinstance(stop_at_eos, bool):
            raise ValueError(f"stop_at_eos={stop_at_eos!r}; expected true (a response ends at EOS) or false (always "
                             "max_new_tokens tokens, as the reference code decodes).")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r}; expected a positive int (prompts decoded at once).")
        if lm is None or reward is None:
            from llm_envs.world import load_world

            world = load_world()
            lm = world.lm_dir if lm is None else lm
            reward = world.rm_dir if reward is None else reward
        self.model = load_causal_lm(lm, device=device, dtype=dtype)
        self.tokenizer = resolve_tokenizer(tokenizer, lm, self.model)
        self.reward = RewardWrapper.build(reward, lm_tokenizer=self.tokenizer, device=device, dtype=dtype)
        self.k, self.w, self.mode, self.temperature = k, float(w), mode, float(temperature)
        self.scoring: Scoring = scoring
        self.batch_size, self.prefix_cache, self.stop_at_eos = batch_size, prefix_cache, stop_at_eos
        self.name = name or f"args-{mode}"
        self.last_stats: dict[str, Any] = {}

    def __repr__(self) -> str:
        return f"ARGS(name={self.name!r}, k={self.k}, w={self.w}, mode={self.mode!r}, reward={self.reward.name!r})"

    @torch.inference_mode()
    def generate(
        self,
        prompts: Sequence[str],
        max_new_tokens: int = 128,
        stop_at_eos: bool | None = None,
        seed: int | None = None,
    ) -> list[Generation]:
        """Decode every prompt; per prompt, the response ids (EOS included when reached) and text (special
        tokens skipped). `stop_at_eos=None` takes the constructor's setting.

        ``seed``: prompt i samples with its own generator seeded ``seed + i``, so a prompt gets the
        same tokens alone or in a batch; ``None`` samples from torch's global generator (seed it
        with ``torch.manual_seed`` to reproduce the reference on one prompt).
        """
        stop_at_eos = self.stop_at_eos if stop_at_eos is None else stop_at_eos
        prompt_ids = encode_prompts(self.tokenizer, prompts)
        check_context(self.model, prompt_ids, max_new_tokens)
        n = min(self.batch_size, len(prompt_ids))
        if n == 0:
            return []
        engine = DecodeEngine(self.model, n, reserve_tokens=max_new_tokens + 1)
        scorer = CandidateScorer(self.reward, n, self.tokenizer, prefix_cache=self.prefix_cache)
        gens = [None if seed is None else torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
        eos, k = self.tokenizer.eos_token_id, min(self.k, engine.vocab_size)
        calls_before = self.reward.calls
        results: list[Generation | None] = [None] * len(prompts)
        rows = _Rows(n, k)
        queue = list(range(len(prompts)))
        steps = 0

        def fill(free: list[int]) -> None:
            free = free[: len(queue)]
            if free:
                picked = [queue.pop(0) for _ in free]
                out = engine.reset_rows(free, [prompt_ids[i] for i in picked])
                scorer.forget(free)
                rows.start(free, picked, *top_k_to_host(out.logits, k))

        fill(list(range(n)))
        while live := rows.live():
            top_logits, top_ids = rows.heads(live)
            candidates = top_ids.tolist()
            before = self.reward.calls
            rewards, _ = scorer.score(live, [prompt_ids[rows.slot[r]] for r in live],
                                      [rows.responses[r] for r in live], candidates, scoring=self.scoring)
            picks = args_select(top_logits, torch.from_numpy(rewards), w=self.w, mode=self.mode,
                                temperature=self.temperature, generators=[gens[rows.slot[r]] for r in live])
            tokens = [cands[pick] for cands, pick in zip(candidates, picks)]
            going, done = rows.advance(live, tokens, self.reward.calls - before, eos if stop_at_eos else None,
                                       max_new_tokens)
            steps += 1
            if going:
                flags = rows.flags(going)
                out = engine.append([r[-1] if f else 0 for r, f in zip(rows.responses, flags)], flags)
                top_logits, top_ids = top_k_to_host(out.logits, k)  # every row's: no device-side gather
                rows.set_heads(going, top_logits[going], top_ids[going])
            for row in done:
                ids = list(rows.responses[row])
                index = rows.slot[row]
                results[index] = Generation(
                    prompt=prompts[index], response_ids=ids,
                    response_text=self.tokenizer.decode(ids, skip_special_tokens=True),
                    lm_forwards=engine.row_forwards(row), rm_calls=rows.rm_calls[row],
                    extra={"k": self.k, "w": self.w, "mode": self.mode},
                )
                rows.slot[row] = None
            fill(done)
        self.last_stats = {
            "lm_forwards": engine.forward_calls,
            "rm_calls": self.reward.calls - calls_before,
            "steps": steps,
            "tokens": sum(len(g.response_ids) for g in results if g is not None),
            "prefix_cache": scorer.uses_prefix_cache,
        }
        return [g for g in results if g is not None]


class ARGSAgent:
    """ARGS as a policy of `llm_envs/TokenChoice-v0`: picks the slot ARGS would pick.

    Bind it to the env (a single `TokenChoiceEnv`, its vector env, or a `TokenChoiceCore`) with
    `bind` (`agents.base.PolicyDecoder` does this). `predict` reads the env's raw candidate logits
    and `candidate_rewards(scoring)`, and respects the action mask (with the default
    ``top_p=1.0`` nothing is masked and the choice is the reference's). The mode set here decides
    greedy vs sampling; `deterministic` is accepted for the protocol and ignored.
    """

    def __init__(
        self,
        w: float = 1.5,
        mode: Mode = "greedy",
        temperature: float = 0.7,
        scoring: Scoring = "raw",
        seed: int | None = None,
        name: str | None = None,
    ) -> None:
        _check_args(None, w, mode, temperature, scoring)
        self.w, self.mode, self.temperature = float(w), mode, float(temperature)
        self.scoring: Scoring = scoring
        self.generator = None if seed is None else torch.Generator().manual_seed(seed)
        self.name = name or f"args-{mode}"
        self.env: Any = None

    def bind(self, env: Any) -> ARGSAgent:
        for attr in ("unwrapped", "core"):  # gym.make wrappers, SB3 views
            if not hasattr(env, "candidate_rewards"):
                env = getattr(env, attr, env)
        if not (hasattr(env, "candidate_rewards") and hasattr(env, "candidate_logits")):
            raise TypeError(
                f"ARGSAgent.bind got {type(env).__name__}; expected a TokenChoice env, vector env or core "
                "(something with candidate_rewards() and candidate_logits())."
            )
        self.env = env
        return self

    def predict(
        self, obs: np.ndarray, action_masks: np.ndarray | None = None, deterministic: bool = True
    ) -> np.ndarray:
        if self.env is None:
            raise RuntimeError("ARGSAgent.predict needs the env: call agent.bind(env) first.")
        single = np.asarray(obs).ndim == 1
        logits = np.atleast_2d(self.env.candidate_logits())
        rewards = np.atleast_2d(self.env.candidate_rewards(self.scoring))
        masks = np.atleast_2d(self.env.action_masks() if action_masks is None else action_masks)
        actions = np.zeros(logits.shape[0], dtype=np.int64)
        rows = [r for r in range(logits.shape[0]) if np.isfinite(logits[r, 0])]  # rows in an episode
        if rows:
            picks = args_select(torch.from_numpy(logits[rows]), torch.from_numpy(rewards[rows]), w=self.w,
                                mode=self.mode, temperature=self.temperature,
                                generators=[self.generator] * len(rows),
                                valid=torch.from_numpy(masks[rows].astype(bool)))
            actions[rows] = picks
        return actions[0] if single else actions
