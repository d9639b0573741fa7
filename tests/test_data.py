"""Prompt sources: lists, JSONL, local HF datasets, the HH convention, filtering, sampling, errors."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import pytest
from datasets import Dataset, DatasetDict
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from llm_envs.data import PromptSet, hh_prompt, load_prompts

HH_ROWS = [
    {
        "chosen": "\n\nHuman: hi there\n\nAssistant: hello!\n\nHuman: how are you?\n\nAssistant: fine, thanks.",
        "rejected": "\n\nHuman: hi there\n\nAssistant: hello!\n\nHuman: how are you?\n\nAssistant: go away.",
    },
    {"chosen": "\n\nHuman: help me\n\nAssistant: sure.", "rejected": "\n\nHuman: help me\n\nAssistant: no."},
]
HH_PROMPTS = [
    "\n\nHuman: hi there\n\nAssistant: hello!\n\nHuman: how are you?\n\nAssistant:",
    "\n\nHuman: help me\n\nAssistant:",
]


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep load_dataset's arrow cache out of the user's ~/.cache."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.getbasetemp() / "hf_datasets")


def write_jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def word_tokenizer() -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.WordLevel({"<unk>": 0, "<eos>": 1}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()  # one token per word
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", unk_token="<unk>")


def test_list_source_and_promptset() -> None:
    ps = load_prompts(["a b", "c"])
    assert isinstance(ps, PromptSet)
    assert ps.prompts == ["a b", "c"] and len(ps) == 2 and list(ps) == ["a b", "c"]
    assert ps[1] == "c" and ps[:1] == ["a b"] and ps.dropped_too_long == 0
    assert "list of 2" in ps.source
    with pytest.raises(dataclasses.FrozenInstanceError):
        ps.prompts = []  # type: ignore[misc]
    assert load_prompts(("x",)).prompts == ["x"]
    assert load_prompts(ps, num_prompts=1, seed=0).prompts[0] in ps.prompts
    with pytest.raises(ValueError, match="not to a list"):
        load_prompts(["a"], column="prompt")


def test_jsonl(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "one", "id": 1}, {"prompt": "two", "id": 2}])
    with path.open("a") as fh:
        fh.write("\n")  # blank lines are skipped
    ps = load_prompts(path)
    assert ps.prompts == ["one", "two"] and "p.jsonl" in ps.source
    other = write_jsonl(tmp_path / "q.jsonl", [{"question": "why?"}, {"question": "how?"}])
    assert load_prompts(str(other), column="question").prompts == ["why?", "how?"]


def test_jsonl_errors(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "q.jsonl", [{"question": "why?"}])
    with pytest.raises(ValueError, match=r"no 'prompt' column.*\['question'\].*column="):
        load_prompts(path)
    with pytest.raises(ValueError, match=r"column 'questions' is not in.*\['question'\].*Did you mean 'question'"):
        load_prompts(path, column="questions")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"prompt": oops}\n')
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        load_prompts(bad)
    arr = write_jsonl(tmp_path / "arr.jsonl", [["a"]])
    with pytest.raises(ValueError, match="line 1 is a JSON list"):
        load_prompts(arr)
    partial = write_jsonl(tmp_path / "partial.jsonl", [{"prompt": "a"}, {"text": "b"}])
    with pytest.raises(ValueError, match="row 1 .* has no 'prompt' key"):
        load_prompts(partial)
    with pytest.raises(ValueError, match="split='test' does not apply"):
        load_prompts(write_jsonl(tmp_path / "ok.jsonl", [{"prompt": "a"}]), split="test")


def test_save_to_disk_dataset_and_dict(tmp_path: Path) -> None:
    single = Dataset.from_dict({"prompt": ["p0", "p1", "p2"], "label": [0, 1, 0]})
    single.save_to_disk(str(tmp_path / "single"))
    assert load_prompts(tmp_path / "single").prompts == ["p0", "p1", "p2"]
    dd = DatasetDict({"train": single, "test": Dataset.from_dict({"text": ["t0", "t1"]})})
    dd.save_to_disk(str(tmp_path / "dd"))
    assert load_prompts(tmp_path / "dd", split="test", column="text").prompts == ["t0", "t1"]
    with pytest.raises(ValueError, match=r"has splits \['train', 'test'\]; pass split="):
        load_prompts(tmp_path / "dd")
    with pytest.raises(ValueError, match=r"split='valid' is not in .*available splits: \['train', 'test'\]"):
        load_prompts(tmp_path / "dd", split="valid")
    with pytest.raises(ValueError, match=r"column 'prompt' is not in .*\['text'\]"):
        load_prompts(tmp_path / "dd", split="test", column="prompt")
    spec = {"dataset": str(tmp_path / "dd"), "split": "test", "column": "text"}
    assert load_prompts(spec).prompts == ["t0", "t1"]


def test_load_dataset_data_files(tmp_path: Path) -> None:
    folder = tmp_path / "folder"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [{"prompt": "tr0"}, {"prompt": "tr1"}])
    write_jsonl(folder / "test.jsonl", [{"prompt": "te0"}])
    assert load_prompts(folder, split="test").prompts == ["te0"]  # load_dataset(directory)
    assert load_prompts({"dataset": str(folder), "split": "train"}).prompts == ["tr0", "tr1"]
    (tmp_path / "rows.json").write_text(json.dumps([{"prompt": "j0"}, {"prompt": "j1"}]))
    assert load_prompts(tmp_path / "rows.json").prompts == ["j0", "j1"]  # load_dataset("json", data_files=...)


def test_dict_source_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown key 'colum'.*Did you mean 'column'"):
        load_prompts({"dataset": "x", "colum": "prompt"})
    with pytest.raises(ValueError, match="no 'dataset' key"):
        load_prompts({"split": "train"})
    with pytest.raises(ValueError, match="conflicts"):
        load_prompts({"dataset": "x", "split": "train"}, split="test")


def test_hh_chosen_convention(tmp_path: Path) -> None:
    assert hh_prompt(HH_ROWS[1]["chosen"]) == HH_PROMPTS[1]
    path = write_jsonl(tmp_path / "hh.jsonl", HH_ROWS)
    assert load_prompts(path).prompts == HH_PROMPTS  # no prompt column -> chosen, cut
    assert load_prompts(path, column="chosen").prompts == HH_PROMPTS
    Dataset.from_list(HH_ROWS).save_to_disk(str(tmp_path / "hh"))
    assert load_prompts(tmp_path / "hh").prompts == HH_PROMPTS
    raw = load_prompts(path, column="rejected").prompts  # other columns are taken verbatim
    assert raw[1] == HH_ROWS[1]["rejected"]
    with_prompt = write_jsonl(tmp_path / "both.jsonl", [{"prompt": "P", "chosen": "Human: x Assistant: y"}])
    assert load_prompts(with_prompt).prompts == ["P"]  # a prompt column wins
    bad = write_jsonl(tmp_path / "bad_hh.jsonl", [HH_ROWS[0], {"chosen": "no turns here"}])
    with pytest.raises(ValueError, match="row 1 .*'Assistant:'.*not HH-RLHF format"):
        load_prompts(bad)


def test_empty_prompts_are_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="prompt 1 of .* is empty or whitespace-only"):
        load_prompts(["ok", "  \n"])
    with pytest.raises(ValueError, match="prompt 0 .* empty"):
        load_prompts(write_jsonl(tmp_path / "e.jsonl", [{"prompt": ""}]))
    with pytest.raises(TypeError, match="prompt 1 .* is int"):
        load_prompts(["ok", 3])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="holds no prompts"):
        load_prompts([])


def test_filter_long_prompts() -> None:
    tok = word_tokenizer()
    prompts = ["a", "a b c", "a b c d e", "a b", "a b c d"]
    ps = load_prompts(prompts, tokenizer=tok, max_prompt_tokens=3)
    assert ps.prompts == ["a", "a b c", "a b"] and ps.dropped_too_long == 2
    assert load_prompts(prompts, tokenizer=tok).dropped_too_long == 0  # no limit, no filtering
    with pytest.raises(ValueError, match=r"all 5 prompts .* longer than max_prompt_tokens=0|positive int"):
        load_prompts(prompts, tokenizer=tok, max_prompt_tokens=0)
    too_long = r"all 2 prompts .*max_prompt_tokens=1 \(shortest: 2.*raise max_prompt_tokens"
    with pytest.raises(ValueError, match=too_long):
        load_prompts(["a b", "a b c"], tokenizer=tok, max_prompt_tokens=1)
    with pytest.raises(ValueError, match="needs tokenizer="):
        load_prompts(prompts, max_prompt_tokens=3)


def test_seeded_sampling() -> None:
    prompts = [f"prompt {i}" for i in range(50)]
    a = load_prompts(prompts, num_prompts=10, seed=3)
    b = load_prompts(prompts, num_prompts=10, seed=3)
    c = load_prompts(prompts, num_prompts=10, seed=4)
    assert a.prompts == b.prompts and a.prompts != c.prompts and len(a) == 10
    order = [prompts.index(p) for p in a]
    assert order == sorted(order)  # order-stable
    assert load_prompts(prompts, num_prompts=50).prompts == prompts
    with pytest.raises(ValueError, match="num_prompts=51 but .* only 50"):
        load_prompts(prompts, num_prompts=51)
    with pytest.raises(ValueError, match="num_prompts=0"):
        load_prompts(prompts, num_prompts=0)
    tok = word_tokenizer()
    with pytest.raises(ValueError, match="only 1 prompts after dropping 1 longer than max_prompt_tokens=2"):
        load_prompts(["a", "a b c"], tokenizer=tok, max_prompt_tokens=2, num_prompts=2)


def test_missing_paths_and_bad_sources(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such file or directory.*world:train"):
        load_prompts(str(tmp_path / "missing.jsonl"))
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_prompts("./nope/prompts.jsonl")
    with pytest.raises(ValueError, match="not a world split"):
        load_prompts("world:valid")
    with pytest.raises(TypeError, match="not supported"):
        load_prompts(42)  # type: ignore[arg-type]
    (tmp_path / "p.xml").write_text("<a/>")
    with pytest.raises(ValueError, match="unknown extension"):
        load_prompts(tmp_path / "p.xml")


@pytest.mark.usefixtures("hub_unreachable")
def test_unknown_hub_dataset_fails_fast() -> None:
    start = time.perf_counter()
    with pytest.raises(ConnectionError, match="neither a local path nor reachable") as err:
        load_prompts("llm-envs-test/no-such-dataset", split="test")
    assert time.perf_counter() - start < 10
    assert "'llm-envs-test/no-such-dataset'" in str(err.value) and "world:train" in str(err.value)
