"""SlotKVCache: per-row bookkeeping, and forwards on it equal fresh no-cache forwards."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, PreTrainedModel

from llm_envs.kv_cache import SlotKVCache
from llm_envs.models import cache_kwargs

TOL = 1e-4
VOCAB = 53

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_model(arch: str) -> PreTrainedModel:
    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, initializer_range=0.2, bos_token_id=1, eos_token_id=None)
    if arch == "gpt2":
        config = GPT2Config(n_positions=64, n_embd=32, n_layer=2, n_head=4, **common)
    else:
        config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=64, **common)
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()


def step(model: PreTrainedModel, kv: SlotKVCache, tokens: list[int], keep: list[bool]) -> torch.Tensor:
    """One token per row on the cache; rows with keep=False leave it hidden. Returns logits [N, V]."""
    pos = torch.tensor([[kv.num_tokens(r)] for r in range(kv.num_rows)])
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([[t] for t in tokens]), attention_mask=kv.attention_mask(1).long(),
                    position_ids=pos, **cache_kwargs(model, kv.cache), use_cache=True)
    kv.extend(1, {r: (0, [tokens[r]]) for r in range(kv.num_rows) if keep[r]})
    return out.logits[:, -1]


def fresh(model: PreTrainedModel, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, -1]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_extend_pop_show_truncate_compact_match_fresh_forwards(arch: str) -> None:
    model = make_model(arch)
    kv = SlotKVCache(model, 2, compact_slack=1000)
    prompts = [[5, 6, 7], [8, 9, 10]]
    with torch.inference_mode():  # prompts of one length: a plain batched prefill
        model(input_ids=torch.tensor(prompts), **cache_kwargs(model, kv.cache), use_cache=True)
    assert kv.extend(3, {0: (0, prompts[0]), 1: (0, prompts[1])}) == 0

    def check(logits: torch.Tensor, rows: list[int]) -> None:
        for row in rows:
            diff = (logits[row] - fresh(model, kv.tokens(row))).abs().max().item()
            assert diff <= TOL, (row, diff)

    check(step(model, kv, [11, 12], [True, True]), [0, 1])
    tentative = kv.length
    step(model, kv, [13, 14], [True, False])  # row 1 fed 14 tentatively: hidden
    assert kv.tokens(1) == [8, 9, 10, 12]
    kv.show(1, tentative, 14)  # ... then chosen: visible without feeding it again
    kv.pop([0])  # row 0's 13 is rejected
    assert kv.tokens(0) == [5, 6, 7, 11] and kv.tokens(1) == [8, 9, 10, 12, 14]
    check(step(model, kv, [15, 16], [True, True]), [0, 1])
    kv.truncate(1, 3)  # row 1 rolls back to its prompt
    assert kv.tokens(1) == [8, 9, 10] and kv.num_tokens(1) == 3
    check(step(model, kv, [17, 18], [True, True]), [0, 1])
    assert kv.length == 7 and not kv.maybe_compact()
    kv.compact_slack = 0
    assert kv.maybe_compact() and kv.compactions == 1 and kv.length == kv.longest() == 6
    assert kv.mask.sum(1).tolist() == [6, 4]
    check(step(model, kv, [19, 20], [True, True]), [0, 1])
    kv.clear()
    assert kv.length == 0 and kv.tokens(0) == [] and kv.cache.get_seq_length() == 0


def test_splice_places_left_padded_prompts_and_grows() -> None:
    model = make_model("gpt2")
    kv = SlotKVCache(model, 3, compact_slack=8)
    prompts = [[4, 5], [6, 7, 8, 9]]
    visible = torch.tensor([[False, False, True, True], [True, True, True, True]])
    ids = torch.tensor([[0, 0, 4, 5], [6, 7, 8, 9]])
    source = kv.new_cache()
    with torch.inference_mode():
        model(input_ids=ids, attention_mask=visible.long(), position_ids=(visible.cumsum(1) - 1).clamp(min=0),
              **cache_kwargs(model, source), use_cache=True)
    kv.splice([2, 0], prompts, source, visible)
    assert kv.length == 4 and kv.tokens(2) == [4, 5] and kv.tokens(0) == [6, 7, 8, 9] and kv.tokens(1) == []
    assert kv.mask.tolist() == [[True] * 4, [False] * 4, [False, False, True, True]]
    logits = step(model, kv, [10, 0, 11], [True, False, True])
    for row in (0, 2):
        assert (logits[row] - fresh(model, kv.tokens(row))).abs().max().item() <= TOL


def test_bad_arguments() -> None:
    model = make_model("gpt2")
    with pytest.raises(ValueError, match="num_rows=0"):
        SlotKVCache(model, 0, compact_slack=1)
    with pytest.raises(ValueError, match="compact_slack=-1"):
        SlotKVCache(model, 1, compact_slack=-1)
    kv = SlotKVCache(model, 1, compact_slack=1)
    step(model, kv, [3], [True])
    step(model, kv, [4], [True])
    with pytest.raises(ValueError, match="not after the row's last visible slot"):
        kv.show(0, 0, 3)
