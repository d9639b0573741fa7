"""DecodeEngine: every output equals a fresh no-cache forward of the row's visible tokens."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, PreTrainedModel

from llm_envs.engine import DecodeEngine, StepOutput

TOL = 1e-4
VOCAB = 97
CONTEXT = 64
ARCHS = ["gpt2", "llama"]
ATTNS = ["eager", "sdpa"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_model(arch: str, attn: str, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """A seeded random tiny LM; initializer_range 0.2 so logits are far from uniform."""
    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, initializer_range=0.2, bos_token_id=1, eos_token_id=None)
    if arch == "gpt2":
        config = GPT2Config(n_positions=CONTEXT, n_embd=32, n_layer=2, n_head=4, **common)
    else:
        config = LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=CONTEXT,
            **common,
        )
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=dtype)
    return model.eval()


def reference(
    model: PreTrainedModel, ids: list[int], layer: int = -1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Last-position logits and hidden state of a fresh forward (no cache, no mask)."""
    with torch.no_grad():
        out = model(torch.tensor([ids]), output_hidden_states=True)
    return out.logits[0, -1].float(), out.hidden_states[layer][0, -1].float()


class Checker:
    """Compares engine outputs with fresh forwards and records the worst difference."""

    def __init__(self, model: PreTrainedModel, engine: DecodeEngine) -> None:
        self.model, self.engine, self.worst, self.checks = model, engine, 0.0, 0

    def __call__(self, out: StepOutput, rows: list[int], positions: list[int]) -> None:
        assert out.logits.dtype == torch.float32 and out.hidden.dtype == torch.float32
        for row in rows:
            i = positions[row] if positions else row
            ids = self.engine.tokens(row)
            logits, hidden = reference(self.model, ids, self.engine.hidden_layer)
            diff = max(
                (out.logits[i] - logits).abs().max().item(),
                (out.hidden[i] - hidden).abs().max().item(),
            )
            assert diff <= TOL, f"row {row}: max abs diff {diff} vs a fresh forward"
            self.worst, self.checks = max(self.worst, diff), self.checks + 1


def random_prompt(rng: random.Random, low: int = 1, high: int = 24) -> list[int]:
    return [rng.randrange(VOCAB) for _ in range(rng.randint(low, high))]


@pytest.mark.parametrize("attn", ATTNS)
@pytest.mark.parametrize("arch", ARCHS)
def test_random_interleavings_match_fresh_forward(arch: str, attn: str) -> None:
    model = make_model(arch, attn)
    engine = DecodeEngine(model, 4, compact_slack=3)
    check = Checker(model, engine)
    rng = random.Random(1234)
    rows = list(range(4))
    out = engine.reset_rows(rows, [random_prompt(rng, 1, 12) for _ in rows])
    check(out, rows, [])
    assert engine.forward_calls == 1

    def append(active: list[bool]) -> None:
        before = [engine.tokens(r) for r in rows]
        tokens = [rng.randrange(VOCAB) for _ in rows]
        out = engine.append(torch.tensor(tokens), torch.tensor(active))
        assert out.logits.shape == (4, VOCAB) and out.hidden.shape == (4, 32)
        assert torch.isfinite(out.logits).all() and torch.isfinite(out.hidden).all()
        for r in rows:
            assert engine.tokens(r) == (before[r] + [tokens[r]] if active[r] else before[r])
        check(out, [r for r in rows if active[r]], [])

    grew = 0
    for _ in range(70):
        op = rng.random()
        room = [engine.next_position(r) < CONTEXT - 4 for r in rows]
        if op < 0.45:  # a step: some rows idle (e.g. finished episodes awaiting reset)
            append([room[r] and rng.random() < 0.75 for r in rows])
        elif op < 0.65:  # rejections of the last candidate in some rows
            droppable = [r for r in rows if engine.next_position(r) > engine.prompt_length(r)]
            engine.drop_last([r for r in droppable if rng.random() < 0.6])
        elif op < 0.8:  # several rejections in a row at one position
            chain = [room[r] and rng.random() < 0.6 for r in rows]
            positions = [engine.next_position(r) for r in rows]
            for _ in range(rng.randint(2, 4)):
                append(chain)
                engine.drop_last([r for r in rows if chain[r]])
            assert [engine.next_position(r) for r in rows] == positions
        else:  # resets of one or more rows, prompts of different lengths (some grow the cache)
            chosen = sorted(rng.sample(rows, rng.randint(1, 3)))
            prompts = [random_prompt(rng, 1, 40) for _ in chosen]
            grew += max(map(len, prompts)) > engine.cache_length
            out = engine.reset_rows(chosen, prompts)
            assert [engine.tokens(r) for r in chosen] == prompts
            check(out, chosen, {r: i for i, r in enumerate(chosen)})

    assert engine.compactions > 0, "compaction was never triggered"
    assert grew > 0, "no reset spliced a prompt longer than the cache"
    longest = max(engine.next_position(r) for r in rows)
    assert engine.cache_length <= longest + engine.compact_slack + 1
    assert check.checks > 100
    print(f"{arch}/{attn}: worst |diff| {check.worst:.2e} over {check.checks} checks")


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_matches_generate(arch: str) -> None:
    model = make_model(arch, "sdpa")
    rng = random.Random(7)
    prompts = [random_prompt(rng, 2, 9) for _ in range(3)]
    new_tokens = 12
    engine = DecodeEngine(model, len(prompts), compact_slack=2)
    out = engine.reset_rows(range(len(prompts)), prompts)
    for _ in range(new_tokens):
        out = engine.append(out.logits.argmax(-1))
    for row, prompt in enumerate(prompts):
        expected = model.generate(
            torch.tensor([prompt]), do_sample=False, max_new_tokens=new_tokens, pad_token_id=0
        )[0].tolist()
        assert engine.tokens(row) == expected
    assert engine.forward_calls == 1 + new_tokens
    assert engine.tokens_forwarded == 3 * max(map(len, prompts)) + 3 * new_tokens


@pytest.mark.parametrize("arch", ARCHS)
def test_physical_cache_longer_than_context(arch: str) -> None:
    """Without compaction the cache holds more slots than the model has positions: still exact."""
    model = make_model(arch, "sdpa")
    engine = DecodeEngine(model, 2, compact_slack=1000)
    check = Checker(model, engine)
    check(engine.reset_rows([0, 1], [[5, 6, 7], [8] * 10]), [0, 1], [])
    for step in range(40):  # row 0 rejects 3 candidates per position, row 1 idles half the time
        for candidate in range(4):
            out = engine.append([step + candidate, 3], [True, candidate == 0 and step % 2 == 0])
            check(out, [0] + ([1] if candidate == 0 and step % 2 == 0 else []), [])
            if candidate < 3:
                engine.drop_last([0])
    assert engine.cache_length == 10 + 160 > CONTEXT and engine.compactions == 0
    assert engine.next_position(0) == 43 and engine.next_position(1) == 30
    engine.compact()
    assert engine.cache_length == 43
    check(engine.append([1, 2]), [0, 1], [])


def test_context_overflow_raises_clear_error() -> None:
    model = make_model("gpt2", "eager")
    engine = DecodeEngine(model, 3)
    message = r"row 2: prompt of 65 tokens exceeds .* 64 positions.*truncate"
    with pytest.raises(ValueError, match=message):
        engine.reset_rows([0, 2], [[1, 2], [5] * 65])
    assert engine.tokens(0) == [] and engine.forward_calls == 0
    out = engine.reset_rows([0, 1], [[3] * 63, [4] * 5])
    assert out.logits.shape == (2, VOCAB)
    engine.append(out.logits.argmax(-1).tolist() + [0], [True, True, False])  # position 63
    assert engine.next_position(0) == CONTEXT
    with pytest.raises(ValueError, match=r"row 0: appending a token at position 64 exceeds .* 64"):
        engine.append([1, 1, 1], [True, True, False])
    assert engine.next_position(0) == CONTEXT and engine.next_position(1) == 6
    engine.append([1, 1, 1], [False, True, False])  # other rows keep going


def test_bad_input_errors() -> None:
    model = make_model("llama", "eager")
    engine = DecodeEngine(model, 2)
    with pytest.raises(ValueError, match=r"row 0 has no prompt; call reset_rows"):
        engine.append([1, 2])
    with pytest.raises(ValueError, match="empty"):
        engine.reset_rows([0], [[]])
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        engine.reset_rows([0], [[1, VOCAB]])
    with pytest.raises(ValueError, match="out of range"):
        engine.reset_rows([2], [[1]])
    engine.reset_rows([0, 1], [[1, 2], [3]])
    with pytest.raises(ValueError, match="only its prompt"):
        engine.drop_last([1])
    with pytest.raises(ValueError, match="hidden_layer"):
        DecodeEngine(model, 1, hidden_layer=5)


@pytest.mark.parametrize("arch", ARCHS)
def test_intermediate_hidden_layer_and_bfloat16(arch: str) -> None:
    model = make_model(arch, "eager")
    engine = DecodeEngine(model, 2, hidden_layer=1, compact_slack=0)
    check = Checker(model, engine)
    check(engine.reset_rows([0, 1], [[5, 6, 7], [8]]), [0, 1], [])
    check(engine.append([9, 10]), [0, 1], [])
    engine.drop_last([0])
    check(engine.append([11, 12], [True, False]), [0], [])

    half = make_model(arch, "sdpa", dtype=torch.bfloat16)
    engine = DecodeEngine(half, 2)
    engine.reset_rows([0, 1], [[5, 6, 7], [8]])
    engine.drop_last([])
    out = engine.append([9, 10])
    assert out.logits.dtype == torch.float32 and torch.isfinite(out.logits).all()
    logits, _ = reference(half, engine.tokens(0))
    assert (out.logits[0] - logits).abs().max().item() < 0.1


@pytest.mark.parametrize("arch", ARCHS)
def test_prefill_split_by_length_matches_fresh_forward(arch: str) -> None:
    """With a forward's fixed cost set to zero, mixed prompt lengths prefill in two batches (less
    padding); outputs come back in the caller's row order and decoding continues correctly."""
    model = make_model(arch, "sdpa")
    engine = DecodeEngine(model, 5)
    engine._prefill_overhead_tokens = 0.0
    check = Checker(model, engine)
    rng = random.Random(7)
    prompts = [random_prompt(rng, 20, 24), random_prompt(rng, 2, 3), random_prompt(rng, 20, 24),
               random_prompt(rng, 2, 3), random_prompt(rng, 10, 12)]
    rows = [3, 0, 4, 1, 2]
    out = engine.reset_rows(rows, prompts)
    assert engine.forward_calls == 2
    check(out, rows, {row: i for i, row in enumerate(rows)})
    for _ in range(3):
        check(engine.append([rng.randrange(VOCAB) for _ in range(5)]), list(range(5)), [])
    engine._prefill_overhead_tokens = 1e9  # a tiny model's real setting: one batch
    out = engine.reset_rows([1, 2], [random_prompt(rng, 2, 3), random_prompt(rng, 20, 24)])
    assert engine.forward_calls == 2 + 3 + 1
    check(out, [1, 2], {1: 0, 2: 1})
