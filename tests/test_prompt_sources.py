"""Prompt sources of the protocol suites: HH's first human turn alone, a ``{input}`` template, and a dataset
read from several parts (Anthropic/hh-rlhf's helpful-base + harmless-base), through `datasets.load_dataset`
on local copies in each dataset's layout."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from llm_envs.data import check_template, hh_first_turn, load_prompts, render_template
from protocol_models import write_full_hh_rlhf, write_hh_rlhf

SAFE_RLHF = "BEGINNING OF CONVERSATION: USER: {input} ASSISTANT:"


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep load_dataset's arrow cache out of the user's ~/.cache."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.getbasetemp() / "hf_datasets")


@pytest.fixture(scope="module")
def hh(tmp_path_factory) -> Path:
    return write_hh_rlhf(tmp_path_factory.mktemp("hh") / "hh-rlhf")


def test_the_first_human_turn_of_a_dialogue():
    assert hh_first_turn("\n\nHuman: how do i bake bread?\n\nAssistant: Sure.\n\nHuman: more?\n\nAssistant: ok") \
        == "how do i bake bread?"
    assert hh_first_turn("\n\nHuman:   spaced  \n\nAssistant:") == "spaced"
    assert hh_first_turn("no turns here") is None
    assert hh_first_turn("\n\nHuman: never answered") is None
    assert hh_first_turn("\n\nHuman: \n\nAssistant: x") is None


def test_a_template_renders_its_input_and_nothing_else():
    assert render_template(SAFE_RLHF, "why {braces}?") == "BEGINNING OF CONVERSATION: USER: why {braces}? ASSISTANT:"
    assert check_template(None) is None and check_template(SAFE_RLHF) == SAFE_RLHF
    for bad in ("USER: {prompt} ASSISTANT:", "{input} and {input}", 3):
        with pytest.raises(ValueError, match=re.escape("expected a string holding {input} exactly once")):
            check_template(bad, where="eval_prompts.template")


def test_hh_single_turn_prompts_of_two_parts_rendered_through_the_template(hh):
    """The proxy_rlhf suite's source: helpful-base + harmless-base test dialogues, first human turn, rendered."""
    source = {"dataset": str(hh), "data_dir": ["helpful-base", "harmless-base"], "split": "test",
              "hh_prompt": "first_turn", "template": SAFE_RLHF}
    got = load_prompts(source)
    assert got.prompts == [
        "BEGINNING OF CONVERSATION: USER: what is a good name for a cat ? ASSISTANT:",
        "BEGINNING OF CONVERSATION: USER: can you help me plan a trip ? ASSISTANT:",   # its dialogue has 2 turns
        "BEGINNING OF CONVERSATION: USER: why is the sky blue ? ASSISTANT:",
        "BEGINNING OF CONVERSATION: USER: what should i cook tonight ? ASSISTANT:",
        "BEGINNING OF CONVERSATION: USER: how can i sleep better ? ASSISTANT:",   # its dialogue has 2 turns
        "BEGINNING OF CONVERSATION: USER: is it safe to swim after eating ? ASSISTANT:",
    ]
    assert "helpful-base" in got.source and "harmless-base" in got.source and "template" in got.source
    assert got.messages is None
    context = load_prompts({"dataset": str(hh), "data_dir": "helpful-base", "split": "test"})  # the HH default
    assert context.prompts[1].endswith("\n\nHuman: thanks , more please\n\nAssistant:")
    same = load_prompts({"dataset": str(hh), "data_dir": ["helpful-base", "harmless-base"], "split": "test"},
                        hh_prompt="first_turn", template=SAFE_RLHF)
    assert same.prompts == got.prompts  # keywords and the dict's keys are one setting


def test_full_hh_rlhf_prompts_come_from_its_prompt_column(tmp_path):
    root = write_full_hh_rlhf(tmp_path / "full-hh-rlhf")
    got = load_prompts({"dataset": str(root), "split": "test"})
    assert len(got) == 6 and all(p.startswith("\n\nHuman: ") and p.endswith("Assistant:") for p in got)
    assert got.prompts[2].count("Human:") == 2  # multi-turn prompts stay whole


@pytest.mark.parametrize("source, kwargs, message", [
    ({"hh_prompt": "first"}, {}, "hh_prompt='first'; expected 'context'"),
    ({"data_dir": []}, {}, "data_dir=[]; expected a folder name or a non-empty list"),
    ({"template": "no field"}, {}, "expected a string holding {input} exactly once"),
    ({"template": SAFE_RLHF}, {"template": "other {input}"}, "conflicts with the source dict's template"),
    ({"column": "rejected", "hh_prompt": "first_turn"}, {}, "is read from its column 'rejected'"),
])
def test_source_mistakes_fail_naming_the_value(hh, source, kwargs, message):
    spec = {"dataset": str(hh), "data_dir": "helpful-base", "split": "test", **source}
    with pytest.raises(ValueError, match=re.escape(message)):
        load_prompts(spec, **kwargs)


def test_a_list_takes_a_template_but_not_an_hh_cut():
    assert load_prompts(["hi"], template="Q: {input} A:").prompts == ["Q: hi A:"]
    with pytest.raises(ValueError, match="applies to HH dialogues read from a dataset or file"):
        load_prompts(["hi"], hh_prompt="first_turn")
