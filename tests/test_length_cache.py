"""LengthKVCache: rows with lengths of their own in one preallocated transformers cache."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    DynamicCache,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    PreTrainedModel,
)

from llm_envs.length_cache import LengthKVCache, to_device
from llm_envs.models import cache_kwargs

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VOCAB = 53


def tiny_llama() -> PreTrainedModel:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         initializer_range=0.2)
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()


def tiny_gpt2() -> PreTrainedModel:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4, initializer_range=0.2)
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()


def prefill(model: PreTrainedModel, prompts: list[list[int]]) -> DynamicCache:
    """Left-padded prompts in a cache of their own (what DecodeEngine.reset_rows does)."""
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    attn = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    pos = (attn.cumsum(1) - 1).clamp(min=0)
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        model(input_ids=ids, attention_mask=attn, position_ids=pos, **cache_kwargs(model, cache), use_cache=True)
    return cache


def test_load_puts_each_prompt_at_slot_zero_and_a_step_writes_one_slot_per_row() -> None:
    model = tiny_llama()
    kv = LengthKVCache(model, 3)
    prompts = [[4, 5], [6, 7, 8, 9]]
    with torch.inference_mode():
        kv.resize(8)
        source = prefill(model, prompts)
        kv.load([2, 0], prompts, source)
    layer, src = kv.layers[0], source.layers[0]
    assert layer.keys.shape == (3, 2, 8, 8) and kv.capacity == 8
    assert torch.equal(layer.keys[2, :, :2], src.keys[0, :, 2:]) and torch.equal(layer.keys[0, :, :4], src.keys[1])
    assert layer.keys[1].abs().sum() == 0 and kv.row_tokens(2, 2) == [4, 5] and kv.row_tokens(0, 4) == prompts[1]
    slots = torch.tensor([4, 0, 2])  # each row writes at its length (row 1 is empty)
    with torch.inference_mode():
        kv.begin(slots, 8)
        keys, _ = layer.update(torch.ones(3, 2, 1, 8), torch.ones(3, 2, 1, 8))
        kv.write_tokens(torch.tensor([10, 11, 12]))
    assert keys.shape == (3, 2, 8, 8) and keys.data_ptr() == layer.keys.data_ptr()  # a view, no copy
    for row, slot in enumerate(slots.tolist()):
        assert (layer.keys[row, :, slot] == 1).all()
    assert kv.row_tokens(2, 3) == [4, 5, 12] and kv.row_tokens(0, 5) == [6, 7, 8, 9, 10]
    assert kv.get_seq_length() == 8 and kv.get_mask_sizes(1, 0) == (8, 0)


def test_resize_keeps_rows_and_clear_zeroes_in_place() -> None:
    model = tiny_llama()
    kv = LengthKVCache(model, 2)
    with torch.inference_mode():
        kv.resize(4)
        kv.load([0, 1], [[1, 2, 3], [4]], prefill(model, [[1, 2, 3], [4]]))
        before = kv.layers[1].values[:, :, :4].clone()
        kv.resize(12)
        assert kv.capacity == 12 and torch.equal(kv.layers[1].values[:, :, :4], before)
        assert kv.row_tokens(0, 3) == [1, 2, 3] and kv.tokens.shape == (2, 12)
        address = kv.layers[0].keys.data_ptr()
        kv.clear(12)  # same capacity: zeroed in place (static addresses, for CUDA graphs)
        assert kv.layers[0].keys.data_ptr() == address and kv.layers[0].keys.abs().sum() == 0
        kv.clear(4)  # another capacity: reallocated lazily, like a new cache
        assert kv.capacity == 4 and not kv.layers[0].is_initialized and kv.tokens.shape == (2, 4)


def test_zero_from_scrubs_slots_past_the_lengths() -> None:
    model = tiny_llama()
    kv = LengthKVCache(model, 2)
    with torch.inference_mode():
        kv.resize(6)
        kv.load([0, 1], [[1, 2, 3, 4], [5, 6]], prefill(model, [[1, 2, 3, 4], [5, 6]]))
        kv.layers[0].keys.fill_(float("nan"))
        kv.zero_from(to_device(torch.tensor([1, 3]).numpy(), kv.device), 4)
    keys = kv.layers[0].keys
    assert keys[0, :, 1:4].abs().sum() == 0 and keys[1, :, 3:4].abs().sum() == 0
    assert keys[0, :, :1].isnan().all() and keys[1, :, :3].isnan().all() and keys[:, :, 4:].isnan().all()
    assert kv.row_tokens(0, 4) == [1, 0, 0, 0] and kv.row_tokens(1, 4) == [5, 6, 0, 0]


def test_misuse_is_named() -> None:
    model = tiny_llama()
    kv = LengthKVCache(model, 2)
    with torch.inference_mode(), pytest.raises(RuntimeError, match=r"before begin\(\)"):
        kv.layers[0].update(torch.ones(2, 2, 1, 8), torch.ones(2, 2, 1, 8))
    with pytest.raises(ValueError, match="width=32 exceeds the capacity of 0 slots"):
        kv.begin(torch.zeros(2, dtype=torch.long), 32)
    with torch.inference_mode():
        kv.resize(4)
        kv.begin(torch.zeros(2, dtype=torch.long), 4)
        with pytest.raises(ValueError, match=r"got 3 new tokens per row in this forward, expected 1 \(begin's run=1\)"):
            kv.layers[0].update(torch.ones(2, 2, 3, 8), torch.ones(2, 2, 3, 8))
        with pytest.raises(ValueError, match=r"run=5; expected an int in \[1, width=4\]"):
            kv.begin(torch.zeros(2, dtype=torch.long), 4, run=5)
        with pytest.raises(ValueError, match="prompts of 5 tokens do not fit the capacity of 4 slots"):
            kv.load([0], [[1] * 5], prefill(model, [[1] * 5]))
    with pytest.raises(ValueError, match="num_rows=0"):
        LengthKVCache(model, 0)
    config = MistralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=8)
    with pytest.raises(ValueError, match="sliding-window"):
        LengthKVCache(AutoModelForCausalLM.from_config(config), 1)


def fresh(model: PreTrainedModel, ids: list[int]) -> torch.Tensor:
    """The last position's logits of one no-cache forward: what a cached forward must reproduce."""
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0, -1]


def additive(allowed: torch.Tensor) -> torch.Tensor:
    """A [N, T, W] bool mask as the [N, 1, T, W] additive mask eager attention takes as is."""
    return torch.zeros(allowed.shape).masked_fill_(~allowed, torch.finfo(torch.float32).min)[:, None]


@pytest.mark.parametrize("make", [tiny_gpt2, tiny_llama], ids=["gpt2", "llama"])
def test_a_run_of_tentative_tokens_then_move_slots_keeps_one_as_if_it_was_fed(make) -> None:
    """One forward writes a run of k tentative tokens per row (each at the row's next position, seeing the
    prefix and itself); `move_slots` keeps one per row at the row's length; the next step equals fresh
    forwards (learned positions and rotary alike)."""
    model, width = make(), 16
    kv = LengthKVCache(model, 2)
    prompts, candidates = [[4, 5, 6], [7, 8]], [[10, 11, 12], [13, 14, 15]]
    with torch.inference_mode():
        kv.resize(width)
        kv.load([0, 1], prompts, prefill(model, prompts))
        start = torch.tensor([3, 2])
        kv.begin(start, width, run=3)
        rel = torch.arange(width)[None, :] - start[:, None]
        own = rel[:, None, :] == torch.arange(3)[None, :, None]
        out = model(input_ids=torch.tensor(candidates), attention_mask=additive((rel[:, None, :] < 0) | own),
                    position_ids=start[:, None].expand(2, 3), **cache_kwargs(model, kv), use_cache=True)
        kv.write_tokens(torch.tensor(candidates))
    for row in range(2):
        for j, c in enumerate(candidates[row]):
            assert (out.logits[row, j] - fresh(model, prompts[row] + [c])).abs().max() <= 1e-4
    assert kv.row_tokens(0, 6) == [4, 5, 6, 10, 11, 12] and kv.row_tokens(1, 5) == [7, 8, 13, 14, 15]
    with torch.inference_mode():
        kv.move_slots(torch.tensor([0, 1]), torch.tensor([3 + 2, 2 + 1]), torch.tensor([3, 2]))  # keep 12 and 14
        slots = torch.tensor([4, 3])  # the lengths, one more each; now one token per row
        kv.begin(slots, width)
        visible = torch.arange(width)[None, None, :] <= slots[:, None, None]
        out = model(input_ids=torch.tensor([[20], [21]]), attention_mask=additive(visible),
                    position_ids=slots[:, None], **cache_kwargs(model, kv), use_cache=True)
        kv.write_tokens(torch.tensor([20, 21]))
    assert kv.row_tokens(0, 5) == [4, 5, 6, 12, 20] and kv.row_tokens(1, 4) == [7, 8, 14, 21]
    for row in range(2):
        assert (out.logits[row, -1] - fresh(model, kv.row_tokens(row, int(slots[row]) + 1))).abs().max() <= 1e-4
