"""Numerics that hold in half precision (issue 16, item 3), checked on CPU only.

`dtype="auto"` = bfloat16 on CUDA and float32 on CPU; TF32 only on CUDA; the engine's logits and
the reward model's score in float32 for a bf16 model; NaN/inf logits raise naming the row; candidate
order by token id under exact ties.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from protocol_models import llama_config, save_score_model
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

from llm_envs.engine import DecodeEngine, NonFiniteLogitsError, _check_finite_logits
from llm_envs.envs.pools import nucleus_pools, reference_pool, top_k_by_id
from llm_envs.models import enable_tf32, load_reward_model, resolve_dtype

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VOCAB = 97


def tiny_lm(dtype: torch.dtype) -> LlamaForCausalLM:
    """A seeded random tiny Llama in `dtype` (initializer_range 0.2: logits far from uniform)."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         initializer_range=0.2, bos_token_id=1, eos_token_id=None)
    return LlamaForCausalLM(config).to(dtype).eval()


@pytest.fixture
def matmul_precision() -> Iterator[None]:
    """Restore torch's process-wide float32 matmul precision after a test that may change it."""
    before = torch.get_float32_matmul_precision()
    yield
    torch.set_float32_matmul_precision(before)


# ---------------------------------------------------------------------------- dtype="auto", TF32
@pytest.mark.parametrize("auto", ["auto", None])
def test_auto_dtype_is_bfloat16_on_cuda_and_float32_on_cpu(auto: str | None) -> None:
    assert resolve_dtype(auto, torch.device("cpu")) == torch.float32
    assert resolve_dtype(auto, "cpu") == torch.float32
    assert resolve_dtype(auto, torch.device("cuda")) == torch.bfloat16  # a device object; no GPU needed
    assert resolve_dtype(auto, "cuda:1") == torch.bfloat16


def test_explicit_dtypes_are_kept_on_every_device() -> None:
    for device in ("cpu", "cuda"):
        assert resolve_dtype("float32", device) == torch.float32
        assert resolve_dtype("bf16", device) == torch.bfloat16
        assert resolve_dtype(torch.float32, device) == torch.float32
    assert resolve_dtype("float16", "cuda") == torch.float16
    with pytest.raises(ValueError, match="float16.*not supported on cpu"):
        resolve_dtype("float16", "cpu")


@pytest.mark.usefixtures("matmul_precision")
def test_tf32_is_enabled_for_cuda_devices_only() -> None:
    torch.set_float32_matmul_precision("highest")
    enable_tf32("cpu")
    DecodeEngine(tiny_lm(torch.float32), 1)  # an engine on the CPU leaves exact float32 matmuls alone
    assert torch.get_float32_matmul_precision() == "highest"
    enable_tf32(torch.device("cuda"))  # only flips torch's flags: no GPU needed
    assert torch.get_float32_matmul_precision() == "high"
    torch.set_float32_matmul_precision("medium")  # a user's explicit choice is kept
    enable_tf32("cuda")
    assert torch.get_float32_matmul_precision() == "medium"


# ---------------------------------------------------------------------------- ties by token id
def tied_logits() -> torch.Tensor:
    """Rows with exact ties, the tied ids scattered (not in id order), one tie across the k=4 edge."""
    logits = torch.full((3, 12), -5.0)
    logits[0, [9, 2, 7, 4]] = 1.5  # four-way tie at the top
    logits[1, [11, 3]] = 2.0
    logits[1, [8, 0, 6, 5]] = 0.25  # four-way tie straddling the edge of a k=4 head
    logits[2] = 0.0  # a flat row: everything ties
    return logits


def test_top_k_orders_ties_by_token_id_every_time() -> None:
    logits = tied_logits()
    runs = [top_k_by_id(logits, 4) for _ in range(5)]
    values, ids = runs[0]
    assert ids.tolist() == [[2, 4, 7, 9], [3, 11, 0, 5], [0, 1, 2, 3]]
    assert values[1].tolist() == [2.0, 2.0, 0.25, 0.25]
    for v, i in runs[1:]:
        assert torch.equal(i, ids) and torch.equal(v, values)
    stable = torch.sort(logits, dim=-1, descending=True, stable=True)  # the definition
    assert torch.equal(ids, stable.indices[:, :4]) and torch.equal(values, stable.values[:, :4])


def test_top_k_equals_a_stable_sort_on_bf16_rounded_logits() -> None:
    """bf16 rounding makes ties common; every row's top-k is the stable sort's prefix."""
    generator = torch.Generator().manual_seed(3)
    logits = (torch.randn(16, 500, generator=generator) * 2).to(torch.bfloat16).float()
    assert (logits.sort(-1).values.diff(dim=-1) == 0).any()  # the test needs ties to mean something
    for k in (1, 7, 32, 500):
        values, ids = top_k_by_id(logits, k)
        stable = torch.sort(logits, dim=-1, descending=True, stable=True)
        assert torch.equal(ids, stable.indices[:, :k]) and torch.equal(values, stable.values[:, :k])
    with pytest.raises(ValueError, match="k=501"):
        top_k_by_id(logits, 501)


def test_pools_order_ties_by_token_id() -> None:
    logits = tied_logits()
    for _ in range(3):
        pools = nucleus_pools(logits, top_p=0.9, top_k=None, temperature=1.0, head=4).rows()
        for row, pool in enumerate(pools):
            expected = reference_pool(logits[row], top_p=0.9, top_k=None, temperature=1.0)
            head = pool.head_width
            assert pool.ids.tolist() == expected.ids[:head].tolist() and pool.size == expected.size
    assert pools[0].ids.tolist()[:4] == [2, 4, 7, 9]


# ---------------------------------------------------------------------------- a bf16 LM
def test_a_bf16_lm_gives_float32_logits_and_the_pools_of_their_upcast() -> None:
    model = tiny_lm(torch.bfloat16)
    raw: list[torch.Tensor] = []  # the LM head's bf16 output of each forward
    model.register_forward_hook(lambda _m, _a, out: raw.append(out.logits[:, -1].clone()))
    engine = DecodeEngine(model, 3)
    prompts = [[1, 5, 9, 13], [1, 7, 2, 2], [1, 2, 3, 4]]  # one length: one prefill forward
    outputs = [engine.reset_rows([0, 1, 2], prompts), engine.append([4, 8, 12]), engine.append([6, 6, 6])]
    assert len(raw) == len(outputs)
    for out, bf16 in zip(outputs, raw):
        assert bf16.dtype == torch.bfloat16
        assert out.logits.dtype == torch.float32 and out.hidden.dtype == torch.float32
        upcast = bf16.float()
        assert torch.equal(out.logits, upcast)
        pools = nucleus_pools(out.logits, top_p=0.95, top_k=None, temperature=1.0).rows()
        expected = nucleus_pools(upcast, top_p=0.95, top_k=None, temperature=1.0).rows()
        for got, want, logits in zip(pools, expected, upcast):
            assert got.ids.tolist() == want.ids.tolist() and got.size == want.size
            assert got.probs.tolist() == want.probs.tolist()
            ref = reference_pool(logits, top_p=0.95, top_k=None, temperature=1.0)  # stable sort: ties by id
            assert got.ids.tolist() == ref.ids[: got.head_width].tolist()
    ties = [(row.sort().values.diff() == 0).any() for out in outputs for row in out.logits]
    assert any(ties)  # bf16 logits do tie: the order above is the tie rule at work


# ---------------------------------------------------------------------------- NaN / inf logits
def poison(model: torch.nn.Module, row: int, value: float, where: list[int]) -> Any:
    """A forward hook writing `value` into row `row`'s last-position logits at token ids `where`."""
    def hook(_m: torch.nn.Module, _a: Any, out: Any) -> None:
        out.logits[row, -1, where] = value
    return model.register_forward_hook(hook)


def test_nan_and_inf_logits_raise_naming_the_rows_and_leave_the_engine_as_it_was() -> None:
    model = tiny_lm(torch.float32)
    engine = DecodeEngine(model, 3)
    engine.reset_rows([0, 1, 2], [[1, 5], [1, 6, 7], [1, 8]])
    before = [engine.tokens(r) for r in range(3)]
    hooks = [poison(model, 2, float("nan"), [4]), poison(model, 0, float("inf"), [9])]
    with pytest.raises(NonFiniteLogitsError, match=r"row 0: \+inf, row 2: NaN.*dtype='float32'") as caught:
        engine.append([10, 11, 12])
    assert caught.value.rows == [0, 2]
    assert [engine.tokens(r) for r in range(3)] == before  # no row kept its token
    for hook in hooks:
        hook.remove()
    clean = engine.append([10, 11, 12])  # the engine works on, as if the failed step never ran
    fresh = DecodeEngine(model, 3)
    fresh.reset_rows([0, 1, 2], [[1, 5], [1, 6, 7], [1, 8]])
    assert torch.allclose(clean.logits, fresh.append([10, 11, 12]).logits, atol=1e-5)


def test_non_finite_prefill_raises_before_any_row_is_replaced() -> None:
    model = tiny_lm(torch.float32)
    engine = DecodeEngine(model, 2)
    engine.reset_rows([0, 1], [[1, 5], [1, 6, 7]])
    hook = poison(model, 0, float("nan"), list(range(VOCAB)))
    with pytest.raises(NonFiniteLogitsError, match="row 1: NaN") as caught:
        engine.reset_rows([1], [[1, 2, 3]])  # batch index 0 is engine row 1
    hook.remove()
    assert caught.value.rows == [1]
    assert engine.tokens(1) == [1, 6, 7] and engine.prompt_length(1) == 3


def test_banned_tokens_at_minus_inf_are_fine_but_a_row_of_only_minus_inf_is_not() -> None:
    model = tiny_lm(torch.float32)
    engine = DecodeEngine(model, 2)
    hook = poison(model, 1, float("-inf"), [0, 3, 50])
    out = engine.reset_rows([0, 1], [[1, 5], [1, 6]])
    assert torch.isneginf(out.logits[1, [0, 3, 50]]).all()
    hook.remove()
    with pytest.raises(NonFiniteLogitsError, match=r"row 4: no finite value \(all -inf\)"):
        _check_finite_logits(torch.full((1, 5), float("-inf")), [4], model)


def test_the_fp16_overflow_hint() -> None:
    fp16 = SimpleNamespace(dtype=torch.float16)  # only the dtype is read: no fp16 model on the CPU
    logits = torch.zeros(3, 5)
    logits[1, 2] = float("inf")
    with pytest.raises(NonFiniteLogitsError, match=r"row 7: \+inf.*float16 overflows.*dtype='bfloat16'"):
        _check_finite_logits(logits, [6, 7, 8], fp16)


# ---------------------------------------------------------------------------- the reward model's score
def test_a_bf16_sequence_classifier_scores_in_float32() -> None:
    torch.manual_seed(2)
    model = LlamaForSequenceClassification(llama_config(num_labels=1)).eval()
    rm = load_reward_model(model, device="cpu", dtype="bfloat16")
    assert rm.model.embed_tokens.weight.dtype == torch.bfloat16  # the backbone runs in bf16
    assert rm.score.weight.dtype == torch.float32
    ids = torch.tensor([[3, 10, 11, 12, 2]])
    with torch.no_grad():
        logits = rm(input_ids=ids).logits
        hidden = rm.model(input_ids=ids).last_hidden_state[0, -1]
    assert logits.dtype == torch.float32
    assert torch.equal(logits[0, 0], hidden.float() @ rm.score.weight[0])  # the head in float32, on bf16 h
    assert load_reward_model(rm, device="cpu", dtype="auto") is rm  # idempotent: one hook
    assert len(rm.score._forward_pre_hooks) == 1


def test_a_bf16_score_model_scores_in_float32(tmp_path: Path) -> None:
    save_score_model(tmp_path / "score")
    rm = load_reward_model(tmp_path / "score", device="cpu", dtype="bfloat16")
    assert rm.dtype == torch.bfloat16 and rm.score.linear.weight.dtype == torch.float32
    with torch.no_grad():
        out = rm(input_ids=torch.tensor([[3, 10, 11, 2]]))
    assert out.logits.dtype == torch.float32 and out.scores.dtype == torch.float32
