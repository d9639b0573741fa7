"""DecodeEngine: every output equals a fresh no-cache forward of the row's visible tokens."""

from __future__ import annotations

import gc
import random

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, PreTrainedModel

from llm_envs.engine import (
    DecodeEngine,
    NonFiniteLogitsError,
    StepOutput,
    prefill_overhead_tokens,
)

TOL = 1e-4
VOCAB = 97
CONTEXT = 64
ARCHS = ["gpt2", "llama"]
ATTNS = ["eager", "sdpa"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_model(arch: str, attn: str, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """A seeded random tiny LM; initializer_range 0.2 so logits are far from uniform."""
    torch.manual_seed(0)
    common = {"vocab_size": VOCAB, "initializer_range": 0.2, "bos_token_id": 1, "eos_token_id": None}
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
    engine = DecodeEngine(model, 4, bucket_size=8)  # no reserve: the cache grows on demand
    check = Checker(model, engine)
    rng = random.Random(1234)
    rows = list(range(4))
    out = engine.reset_rows(rows, [random_prompt(rng, 1, 12) for _ in rows])
    check(out, rows, [])
    assert engine.forward_calls == 1
    widths, capacities = set(), {engine.cache_length}

    def append(active: list[bool]) -> None:
        before = [engine.tokens(r) for r in rows]
        tokens = [rng.randrange(VOCAB) for _ in rows]
        as_tensor = rng.random() < 0.5  # device tokens (taken as is) or host ids (checked)
        out = engine.append(torch.tensor(tokens) if as_tensor else tokens, active)
        assert out.logits.shape == (4, VOCAB) and out.hidden.shape == (4, 32)
        assert torch.isfinite(out.logits).all() and torch.isfinite(out.hidden).all() and out.finite.all()
        for r in rows:
            assert engine.tokens(r) == (before[r] + [tokens[r]] if active[r] else before[r])
        longest = max(len(b) for b in before) + 1
        assert engine.attention_width % 8 == 0 and longest <= engine.attention_width < longest + 8
        widths.add(engine.attention_width)
        capacities.add(engine.cache_length)
        check(out, [r for r in rows if active[r]], [])

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
        else:  # resets of one or more rows while the others continue (some prompts grow the cache)
            chosen = sorted(rng.sample(rows, rng.randint(1, 3)))
            prompts = [random_prompt(rng, 1, 40) for _ in chosen]
            out = engine.reset_rows(chosen, prompts)
            assert [engine.tokens(r) for r in chosen] == prompts
            assert engine.cache_length >= max(map(len, prompts))
            capacities.add(engine.cache_length)
            check(out, chosen, {r: i for i, r in enumerate(chosen)})

    assert len(capacities) > 1, "the cache never grew"
    assert len(widths) > 2, f"attention ran over too few buckets: {sorted(widths)}"
    assert engine.cache_length <= 72  # bounded by the context (64) + the slot a full row writes, in buckets
    assert check.checks > 100
    print(f"{arch}/{attn}: worst |diff| {check.worst:.2e} over {check.checks} checks, buckets {sorted(widths)}")


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_matches_generate(arch: str) -> None:
    model = make_model(arch, "sdpa")
    rng = random.Random(7)
    prompts = [random_prompt(rng, 2, 9) for _ in range(3)]
    new_tokens = 12
    engine = DecodeEngine(model, len(prompts), bucket_size=4)
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
def test_rejects_never_grow_the_cache(arch: str) -> None:
    """A reject is a shorter length and the next write overwrites its slot: 160 appends of which
    120 are rejected leave the cache at the size the reserve gave it, and every output exact."""
    model = make_model(arch, "sdpa")
    engine = DecodeEngine(model, 2, reserve_tokens=41)
    check = Checker(model, engine)
    check(engine.reset_rows([0, 1], [[5, 6, 7], [8] * 10]), [0, 1], [])
    assert engine.cache_length == 64  # 10 + 41, in buckets of 32
    for step in range(40):  # row 0 rejects 3 candidates per position, row 1 idles half the time
        for candidate in range(4):
            out = engine.append([step + candidate, 3], [True, candidate == 0 and step % 2 == 0])
            check(out, [0] + ([1] if candidate == 0 and step % 2 == 0 else []), [])
            if candidate < 3:
                engine.drop_last([0])
    assert engine.cache_length == 64 and engine.attention_width == 64
    assert engine.next_position(0) == 43 and engine.next_position(1) == 30
    check(engine.append([1, 2]), [0, 1], [])


def test_capacity_follows_prompts_reserve_and_growth_on_demand() -> None:
    model = make_model("llama", "sdpa")
    engine = DecodeEngine(model, 3, reserve_tokens=5, bucket_size=16)
    assert engine.cache_length == 0 and engine.attention_width == 0
    engine.reset_rows([0, 1, 2], [[1] * 20, [2] * 3, [3]])
    assert engine.cache_length == 32  # 20 + 5, in buckets of 16
    engine.reset_rows([1], [[4] * 40])  # a longer prompt: growth (at least by half)
    assert engine.cache_length == 48 and engine.tokens(0) == [1] * 20
    for _ in range(9):  # row 1 passes its reserve: growth on demand, then the context caps it
        engine.append([5, 5, 5], [False, True, False])
    # 48 * 3 // 2 = 72 slots, in buckets: 80, which is also all a row can use (context 64 + 1 slot)
    assert engine.next_position(1) == 49 and engine.cache_length == 80 and engine.attention_width == 64
    engine.reset_rows([0, 1, 2], [[6] * 4, [7] * 2, [8]])  # a full reset starts over at the fresh size
    assert engine.cache_length == 16
    fresh = DecodeEngine(model, 3, reserve_tokens=5, bucket_size=16)
    fresh.reset_rows([0, 1, 2], [[6] * 4, [7] * 2, [8]])
    assert fresh.cache_length == 16


def test_a_single_env_is_bit_reproducible_across_full_resets() -> None:
    """After any history, a full reset gives exactly the outputs of a fresh engine."""
    model = make_model("gpt2", "sdpa")
    engine = DecodeEngine(model, 1, bucket_size=8)
    fresh = DecodeEngine(model, 1, bucket_size=8)
    engine.reset_rows([0], [[3] * 30])
    for t in range(12):
        engine.append([t])
    engine.drop_last([0])

    def episode(current: DecodeEngine) -> list[StepOutput]:
        outs = [current.reset_rows([0], [[4, 5, 6]])] + [current.append([t]) for t in (7, 8, 9)]
        current.drop_last([0])
        return outs + [current.append([10])]

    for a, b in zip(episode(engine), episode(fresh)):
        assert torch.equal(a.logits, b.logits) and torch.equal(a.hidden, b.hidden)


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
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        engine.append([1, VOCAB])
    engine.append([1, VOCAB], [True, False])  # an inactive row's token is a placeholder: not checked
    with pytest.raises(ValueError, match=r"got 3 tokens for 2 rows"):
        engine.append([1, 2, 3])
    with pytest.raises(ValueError, match=r"active has 3 entries for 2 rows"):
        engine.append([1, 2], [True, True, False])
    with pytest.raises(TypeError, match=r"tokens is a torch.float32 tensor.*integer tensor"):
        engine.append(torch.tensor([1.0, 2.0]))
    for name, value in (("reserve_tokens", -1), ("bucket_size", 0), ("bucket_size", True)):
        with pytest.raises(ValueError, match=rf"{name}={value}; expected an int >= "):
            DecodeEngine(model, 1, **{name: value})
    with pytest.raises(ValueError, match="num_rows=0"):
        DecodeEngine(model, 0)
    flash = make_model("llama", "eager")
    flash.config._attn_implementation = "flex_attention"
    with pytest.raises(ValueError, match=r"attn_implementation='flex_attention'.*'sdpa'"):
        DecodeEngine(flash, 1)


@pytest.mark.parametrize("arch", ARCHS)
def test_intermediate_hidden_layer_and_bfloat16(arch: str) -> None:
    model = make_model(arch, "eager")
    engine = DecodeEngine(model, 2, hidden_layer=1, bucket_size=1)
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


# ---------------------------------------------------------------------------- the fast path
SYNCS = ("item", "cpu", "tolist", "nonzero", "__bool__", "__int__", "__float__", "__index__")


@pytest.mark.parametrize("arch", ARCHS)
def test_fast_path_append_and_drop_last_never_read_the_device(arch: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """With device tokens and check_finite=False, nothing in append (the forward included) or
    drop_last reads a tensor back to the host: each read that would sync on CUDA is counted."""
    model = make_model(arch, "sdpa")
    engine = DecodeEngine(model, 3, bucket_size=4)
    out = engine.reset_rows([0, 1], [[5, 6, 7], [8]])  # row 2 is never reset: it idles
    tokens = out.logits.argmax(-1)
    tokens = torch.cat([tokens, tokens[:1]])
    calls: dict[str, int] = {}
    for name in SYNCS:
        original = getattr(torch.Tensor, name)

        def counted(self: torch.Tensor, *args: object, _name: str = name, _original: object = original) -> object:
            calls[_name] = calls.get(_name, 0) + 1
            return _original(self, *args)

        monkeypatch.setattr(torch.Tensor, name, counted)
    original_nonzero = torch.nonzero
    monkeypatch.setattr(torch, "nonzero", lambda *a, **k: calls.update(nonzero=1) or original_nonzero(*a, **k))
    assert bool(torch.ones(())) and calls == {"__bool__": 1}  # the counting works
    calls.clear()
    with torch.inference_mode():
        for step in range(6):  # crosses bucket edges (4, 8) and grows the cache
            out = engine.append(tokens, [True, step % 2 == 0, False], check_finite=False)
            tokens = torch.where(out.finite, out.logits.argmax(-1), 0)
            if step % 3 == 1:
                engine.drop_last([0])
    monkeypatch.undo()
    assert calls == {}, f"device reads on the fast path: {calls}"
    assert engine.next_position(0) == 3 + 6 - 2 and engine.next_position(1) == 1 + 3
    check = Checker(model, engine)
    check(engine.append([1, 2, 3], [True, True, False]), [0, 1], [])


def poison_keys(model: PreTrainedModel, row: int) -> torch.utils.hooks.RemovableHandle:
    """Make row `row`'s keys in the first layer NaN in every forward (so its logits are NaN too)."""
    def hook(_m: torch.nn.Module, _a: object, out: torch.Tensor) -> None:
        out[row] = float("nan")
    return model.model.layers[0].self_attn.k_proj.register_forward_hook(hook)


def test_unchecked_append_reports_finite_rows_and_restore_undoes_it() -> None:
    model = make_model("llama", "sdpa")
    engine = DecodeEngine(model, 3, bucket_size=4)
    engine.reset_rows([0, 1, 2], [[5, 6], [7, 8, 9], [1]])
    engine.append([1, 2, 3])
    engine.drop_last([1])
    before = [engine.tokens(r) for r in range(3)]
    counters = (engine.forward_calls, engine.tokens_forwarded, [engine.row_forwards(r) for r in range(3)])
    snapshot = engine.save()
    engine.append([4, 5, 6])
    handle = poison_keys(model, 2)
    out = engine.append([7, 8, 9], check_finite=False)  # NaN K/V past row 2's saved length: scrubbed
    handle.remove()
    assert out.finite.tolist() == [True, True, False]
    assert engine.tokens(2) == before[2] + [6, 9]  # unchecked: kept until the caller decides
    engine.restore(snapshot)
    assert [engine.tokens(r) for r in range(3)] == before
    assert (engine.forward_calls, engine.tokens_forwarded, [engine.row_forwards(r) for r in range(3)]) == counters
    engine.restore(snapshot)  # still the latest snapshot: restoring again is a no-op
    clean = engine.append([10, 11, 12])
    check = Checker(model, engine)
    check(clean, [0, 1, 2], [])


def test_restore_refuses_a_snapshot_it_cannot_honour() -> None:
    model = make_model("gpt2", "eager")
    engine = DecodeEngine(model, 2)
    engine.reset_rows([0, 1], [[5, 6], [7]])
    engine.append([1, 2])
    old = engine.save()
    snapshot = engine.save()
    with pytest.raises(ValueError, match="not the latest"):
        engine.restore(old)
    engine.drop_last([0])
    engine.append([3, 4])  # row 0 overwrote the slot its saved length covers
    with pytest.raises(ValueError, match=r"row 0: slot 2, below its saved length 3, was written since save"):
        engine.restore(snapshot)
    snapshot = engine.save()
    engine.reset_rows([1], [[9, 9]])
    with pytest.raises(ValueError, match=r"reset \(reset_rows\) since this snapshot"):
        engine.restore(snapshot)
    with pytest.raises(ValueError, match="expected a snapshot from this engine"):
        DecodeEngine(model, 2).restore(engine.save())


def test_a_checked_append_that_fails_keeps_nothing_and_scrubs_its_slots() -> None:
    """A NaN written past a row's length must not leak through `0 * NaN` once the row shrinks."""
    model = make_model("llama", "eager")
    engine = DecodeEngine(model, 2, bucket_size=8)
    engine.reset_rows([0, 1], [[5, 6, 7], [8, 9]])
    engine.append([1, 2])
    handle = poison_keys(model, 0)
    with pytest.raises(NonFiniteLogitsError):
        engine.append([3, 4])  # NaN K/V at row 0's slot 4
    handle.remove()
    assert engine.tokens(0) == [5, 6, 7, 1] and engine.tokens(1) == [8, 9, 2]
    engine.drop_last([0, 1])
    check = Checker(model, engine)
    check(engine.append([5, 6]), [0, 1], [])


# ---------------------------------------------------------------------------- construction
def test_the_head_hook_is_registered_once_and_leaves_with_the_engine() -> None:
    model = make_model("gpt2", "sdpa")
    head = model.get_output_embeddings()
    hooks_before = len(head._forward_pre_hooks)
    engines = [DecodeEngine(model, 1) for _ in range(3)]
    assert len(head._forward_pre_hooks) == hooks_before + 3
    engines[0].reset_rows([0], [[1, 2]])
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]))  # someone else's forward: no engine keeps its hidden state
    assert all(engine._captured is None for engine in engines)
    del engines
    gc.collect()
    assert len(head._forward_pre_hooks) == hooks_before


def test_the_prefill_split_threshold_depends_on_the_device() -> None:
    small, large = 135e6, 8e9
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert prefill_overhead_tokens(cpu, small) < 1  # a CPU forward's fixed cost is tiny next to 135M params
    assert prefill_overhead_tokens(cuda, small) > 1000  # on a GPU padding a small model is nearly free
    assert 10 < prefill_overhead_tokens(cuda, large) < 200


# ---------------------------------------------------------------------------- prompts prefilled ahead
@pytest.mark.parametrize("arch", ARCHS)
def test_prompts_prefilled_ahead_serve_later_resets_without_a_forward(arch: str) -> None:
    """`reset_rows(ahead=)`: the next prompts ride in a prefill that runs anyway; a later reset with
    exactly that prompt copies it in (no forward) and equals a fresh forward, before and after decoding;
    a prompt other than the banked one is prefilled then, and the rows offered are those holding none."""
    model = make_model(arch, "sdpa")
    engine = DecodeEngine(model, 4, reserve_tokens=8)
    check = Checker(model, engine)
    rng = random.Random(3)
    upcoming = {row: random_prompt(rng, 2, 20) for row in range(4)}
    offered: list[list[int]] = []

    def ahead(free: list[int]) -> dict[int, list[int]]:
        offered.append(free)
        return {row: upcoming[row] for row in free if row != 3}  # row 3's next prompt is unknown

    out = engine.reset_rows(range(4), [random_prompt(rng) for _ in range(4)], ahead=ahead)
    assert engine.forward_calls == 1 and offered == [[0, 1, 2, 3]]  # one forward: 4 prompts + 3 ahead
    check(out, [0, 1, 2, 3], [])
    for _ in range(3):
        check(engine.append([rng.randrange(VOCAB) for _ in range(4)]), [0, 1, 2, 3], [])
    out = engine.reset_rows([2, 0], [upcoming[2], upcoming[0]], ahead=ahead)
    assert engine.forward_calls == 4 and len(offered) == 1  # served from the bank: no forward, no offer
    assert [engine.tokens(2), engine.tokens(0)] == [upcoming[2], upcoming[0]]
    check(out, [2, 0], {2: 0, 0: 1})
    for _ in range(3):
        check(engine.append([rng.randrange(VOCAB) for _ in range(4)], [True, False, True, True]), [0, 2, 3], [])
    other = random_prompt(rng, 2, 20)
    upcoming.update({row: random_prompt(rng, 2, 20) for row in range(4)})
    out = engine.reset_rows([1], [other], ahead=ahead)  # row 1's banked prompt was not this one
    assert engine.forward_calls == 8 and offered[-1] == [0, 1, 2, 3]  # 0 and 2 used theirs, 1's was stale
    assert engine.tokens(1) == other
    check(out, [1], {1: 0})
    check(engine.append([rng.randrange(VOCAB) for _ in range(4)]), [0, 1, 2, 3], [])
    out = engine.reset_rows([0, 2, 1], [upcoming[0], upcoming[2], upcoming[1]], ahead=ahead)
    assert engine.forward_calls == 9  # all three from the bank
    check(out, [0, 2, 1], {0: 0, 2: 1, 1: 2})
    check(engine.append([rng.randrange(VOCAB) for _ in range(4)]), [0, 1, 2, 3], [])
    # Split by length (no fixed cost): the short prompt in one forward, the long ones ahead in another.
    engine._prefill_overhead_tokens = 0.0
    short = random_prompt(rng, 2, 2)
    upcoming.update({row: random_prompt(rng, 30, 30) for row in range(4)})
    out = engine.reset_rows([3], [short], ahead=ahead)
    assert engine.forward_calls == 12 and engine.tokens(3) == short
    check(out, [3], {3: 0})
    check(engine.append([rng.randrange(VOCAB) for _ in range(4)]), [0, 1, 2, 3], [])
    out = engine.reset_rows([1, 0], [upcoming[1], upcoming[0]], ahead=ahead)
    assert engine.forward_calls == 13 and [engine.tokens(1), engine.tokens(0)] == [upcoming[1], upcoming[0]]
    check(out, [1, 0], {1: 0, 0: 1})
    check(engine.append([rng.randrange(VOCAB) for _ in range(4)]), [0, 1, 2, 3], [])
    engine.reset_rows([3], [random_prompt(rng)], ahead=lambda free: {row: [5, 6] for row in free})  # fills 0, 1, 3
    with pytest.raises(ValueError, match="row 0, which it was not offered"):  # row 0 holds its next prompt
        engine.reset_rows([2], [random_prompt(rng)], ahead=lambda free: {0: [1, 2]})


def test_without_ahead_nothing_is_prefilled_for_later() -> None:
    model = make_model("gpt2", "sdpa")
    engine = DecodeEngine(model, 2)
    rng = random.Random(4)
    prompts = [random_prompt(rng) for _ in range(2)]
    engine.reset_rows([0, 1], prompts)
    engine.reset_rows([0], [prompts[0]])  # the same prompt again: no bank without ahead=, so a forward
    assert engine.forward_calls == 2
