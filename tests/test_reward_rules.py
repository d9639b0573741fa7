"""The reward wrapper's reading rules (`llm_envs.reward_rules.RewardRules`) against hand-computed values:
ARGS's cut (``human:`` in any case, a leading ``": "`` stripped, the whitespace kept), safe-rlhf's EOS after
the response, and the input lengths a skip rule is checked against."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from llm_envs.config import ConfigError, from_dict
from llm_envs.reward_rules import DEFAULT_TURN_MARKERS, RewardRules, as_reward_rules
from llm_envs.rewards import CandidateScorer, RewardWrapper, cut_at_turn
from llm_envs.task import Task, build_context
from protocol_models import save_score_model, save_sequence_rm, save_sft_lm, word_tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ARGS_RULES = RewardRules(turn_markers=("human:",), case_sensitive=False, strip_prefix=": ", rstrip=False)


def args_reference(response: str) -> str:
    """What deeplearning-wisc/args measure_reward.py means to do to a response (its ': ' strip as intended)."""
    if response.startswith(": "):
        response = response[2:]
    return re.split("human:", response, flags=re.IGNORECASE)[0]


@pytest.mark.parametrize("text, expected", [
    (": Sure.\n\nHUMAN: thanks", "Sure.\n\n"),           # strip, cut in any case, whitespace kept
    ("Sure.\n\nHuman: thanks", "Sure.\n\n"),
    (" fine human: x Human: y", " fine "),                # the first match, whatever its case
    ("a : b", "a : b"),                                   # ': ' only at the start
    (": ", ""),
    ("no marker here", "no marker here"),
    ("Assistant: stays", "Assistant: stays"),             # only the protocol's markers cut
])
def test_args_rules_read_responses_as_the_reference(text, expected):
    assert ARGS_RULES.read(text) == expected == args_reference(text)


def test_default_rules_are_the_hh_convention():
    rules = RewardRules()
    assert rules.turn_markers == DEFAULT_TURN_MARKERS and rules.is_default
    assert rules.read("Sure.\n\nHuman: x") == "Sure." == cut_at_turn("Sure.\n\nHuman: x")
    assert rules.read("ok human: lower case stays") == "ok human: lower case stays"   # case-sensitive
    assert rules.read("ok USER: x Assistant: y") == "ok"
    assert RewardRules(rstrip=False).read("a \n\nHuman: b") == "a \n\n"
    assert RewardRules(turn_markers=()).read("a Human: b") == "a Human: b"
    assert not ARGS_RULES.is_default and ARGS_RULES.changes(": x") and not ARGS_RULES.changes("x")


@pytest.mark.parametrize("value, message", [
    ({"turn_markers": "Human:"}, "expected a list of strings"),
    ({"turn_markers": ["Human:", ""]}, "holds an empty string"),
    ({"strip_prefix": ""}, "non-empty string"),
    ({"append_eos": "yes"}, "append_eos='yes'; expected true or false"),
    ({"apend_eos": True}, "Did you mean 'append_eos'"),
    (["human:"], "expected a mapping"),
])
def test_bad_rules_fail_naming_the_value_and_the_fix(value, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        as_reward_rules(value, where="task.reward_rules")


def test_rules_are_a_task_section_loaded_and_validated_from_yaml():
    task = from_dict(Task, {"reward_rules": {"turn_markers": ["human:"], "case_sensitive": False,
                                             "strip_prefix": ": ", "rstrip": False}})
    assert task.reward_rules == ARGS_RULES
    with pytest.raises(ConfigError, match="unknown key 'apend_eos'.*Did you mean 'append_eos'"):
        from_dict(Task, {"reward_rules": {"apend_eos": True}})
    with pytest.raises(ConfigError, match="reward_tokenizer"):
        from_dict(Task, {"reward_tokenizer": " "})
    assert Task(reward_rules={"append_eos": True}).reward_rules.append_eos


# ---------------------------------------------------------------------- on a reward model
@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("rules_models")
    return {"score": save_score_model(root / "score"), "seq_dir": root / "seq",
            "seq": save_sequence_rm(root / "seq"), "lm": save_sft_lm(root / "lm"), "tok": word_tokenizer()}


PROMPT = "BEGINNING OF CONVERSATION: USER: how do i bake bread ? ASSISTANT:"
RESPONSE = "sure , here is how ."


def test_append_eos_scores_prompt_answer_and_eos_as_safe_rlhf_trained(models):
    """A score model read with ``append_eos`` scores ``<bos> prompt answer <eos>``: its end score by hand."""
    ckpt, tok = models["score"], models["tok"]
    wrapper = RewardWrapper.from_model(str(ckpt.path), lm_tokenizer=tok, device="cpu", rules={"append_eos": True})
    ids = tok(f"{PROMPT} {RESPONSE}")["input_ids"] + [tok.eos_token_id]
    expected = ckpt.end_score(ids)
    assert wrapper.score([PROMPT], [RESPONSE]) == pytest.approx([expected], abs=1e-5)
    ids_path = wrapper.score_ids([tok(PROMPT)["input_ids"]], [tok(RESPONSE, add_special_tokens=False)["input_ids"]])
    assert wrapper.last_path == "ids" and ids_path == pytest.approx([expected], abs=1e-5)
    assert wrapper.input_lengths([PROMPT], [RESPONSE]) == [len(ids)]
    plain = RewardWrapper.from_model(str(ckpt.path), lm_tokenizer=tok, device="cpu")
    assert plain.score([PROMPT], [RESPONSE]) == pytest.approx([ckpt.end_score(ids[:-1])], abs=1e-5)
    assert wrapper.describe()["rules"]["append_eos"] is True and "rules" not in plain.describe()


def test_candidates_under_append_eos_equal_scoring_each_continuation(models):
    """The candidate scorer cannot append an EOS on its prefix cache, so it stands aside and every candidate
    is scored as prompt + response + candidate + EOS."""
    ckpt, tok = models["score"], models["tok"]
    wrapper = RewardWrapper.from_model(str(ckpt.path), lm_tokenizer=tok, device="cpu", rules={"append_eos": True})
    scorer = CandidateScorer(wrapper, 1, tok)
    assert not scorer.uses_prefix_cache and "append_eos" in scorer.cache_off_reason
    prompt_ids = tok(PROMPT)["input_ids"]
    response = tok("sure ,", add_special_tokens=False)["input_ids"]
    cands = tok("here you no", add_special_tokens=False)["input_ids"]
    got, _ = scorer.score([0], [prompt_ids], [response], [cands], scoring="wrapper")
    expected = [ckpt.end_score(prompt_ids + response + [c, tok.eos_token_id]) for c in cands]
    np.testing.assert_allclose(got[0], expected, atol=1e-5)


def test_candidates_under_args_rules_keep_the_prefix_cache_and_equal_scoring_each_continuation(models):
    """Responses the rules strip (': ...') or may strip (too short to tell) are scored as text; the others on
    the reward model's prefix cache; every candidate's score equals scoring prompt + response + candidate."""
    tok = models["tok"]
    wrapper = RewardWrapper.from_model(str(models["seq_dir"]), tokenizer=str(models["lm"]), lm_tokenizer=tok,
                                       device="cpu", rules=ARGS_RULES)
    scorer = CandidateScorer(wrapper, 3, tok)
    assert scorer.uses_prefix_cache
    prompt_ids = [tok(p)["input_ids"] for p in ("\n\nHuman: why ?\n\nAssistant:",) * 3]
    words = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    responses = [words(": sure ,"), [], words("sure , here")]
    cands = [words("here you no human:")] * 3
    for step in range(2):  # the second call reuses the cache of the first
        got, own = scorer.score([0, 1, 2], prompt_ids, responses, cands, scoring="wrapper", prefix=True)
        for row in range(3):
            expected = wrapper.score_ids([prompt_ids[row]] * 4, [responses[row] + [c] for c in cands[row]])
            np.testing.assert_allclose(got[row], expected, atol=1e-5)
            assert own[row] == pytest.approx(wrapper.score_ids([prompt_ids[row]], [responses[row]])[0], abs=1e-5)
        responses = [r + words("sure") for r in responses]


def test_args_rules_on_a_sequence_classifier_scored_with_the_sft_tokenizer(models):
    """ARGS's RM (no tokenizer beside it) read with the SFT model's tokenizer and ARGS's rules: the score of
    ``<bos> prompt response-cut`` by hand, and the input length the 1334-token skip rule checks."""
    tok, seq = models["tok"], models["seq"]
    with pytest.raises(ValueError, match="could not load the reward model's tokenizer"):
        RewardWrapper.from_model(str(models["seq_dir"]), device="cpu")
    wrapper = RewardWrapper.from_model(str(models["seq_dir"]), tokenizer=str(models["lm"]), lm_tokenizer=tok,
                                       device="cpu", rules=ARGS_RULES)
    prompt = "\n\nHuman: how do i bake bread ?\n\nAssistant:"
    response = ": sure , here is how . HUMAN: thanks"
    text = prompt + " " + args_reference(response)
    ids = tok(text)["input_ids"]
    with torch.no_grad():
        expected = float(seq(input_ids=torch.tensor([ids])).logits[0, 0])
    assert wrapper.score([prompt], [response]) == pytest.approx([expected], abs=1e-5)
    assert wrapper.input_lengths([prompt], [response]) == [len(ids)]


def test_rules_reach_the_wrapper_of_a_task_and_its_envs(models):
    ctx = build_context(lm=str(models["lm"]), reward=str(models["score"].path), prompts=[PROMPT], device="cpu",
                        reward_rules={"append_eos": True})
    assert ctx.reward.rules.append_eos
    task = Task(lm=str(models["lm"]), reward=str(models["seq_dir"]), reward_tokenizer=str(models["lm"]),
                reward_rules=ARGS_RULES, eval_prompts=[PROMPT], train_prompts=[PROMPT], device="cpu")
    sources = task.resolve(progress=False)
    assert sources.reward_kwargs() == {"rules": ARGS_RULES, "tokenizer": str(models["lm"])}
    assert sources.context().reward.rules == ARGS_RULES


def test_rule_mistakes_on_the_wrapper_are_clear(models):
    tok = models["tok"]
    with pytest.raises(ValueError, match="function backend .* no EOS to append"):
        RewardWrapper.from_callable(lambda p, r: [0.0] * len(p), rules={"append_eos": True})
    with pytest.raises(ValueError, match="append_eos=True with template='pair'"):
        RewardWrapper.from_model(str(models["score"].path), device="cpu", template="pair", rules={"append_eos": True})
    with pytest.raises(ValueError, match="disagrees with rules.turn_markers"):
        RewardWrapper.from_callable(lambda p, r: [0.0] * len(p), turn_markers=("x",), rules=ARGS_RULES)
    built = RewardWrapper.from_model(str(models["score"].path), lm_tokenizer=tok, device="cpu")
    with pytest.raises(ValueError, match="ready-made wrapper .* were asked for"):
        RewardWrapper.build(built, rules={"append_eos": True})
    assert RewardWrapper.build(built, rules=None) is built
    fn = RewardWrapper.from_callable(lambda p, r: [0.0] * len(p), name="zeros")
    with pytest.raises(ValueError, match="'zeros' is a function, which reads no tokens"):
        fn.input_lengths(["a"], ["b"])


def test_turn_markers_alone_still_configure_the_cut():
    wrapper = RewardWrapper.from_callable(lambda p, r: [float(len(x)) for x in r], turn_markers=("STOP",))
    assert wrapper.rules == RewardRules(turn_markers=("STOP",)) and wrapper.turn_markers == ("STOP",)
    assert wrapper.score(["p"], ["abc STOP def"]) == [3.0]
