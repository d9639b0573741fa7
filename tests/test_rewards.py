"""The reward wrapper: ids fast path == text path, turn cutting, counters, errors, dispatch."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GPT2Config, GPT2ForSequenceClassification, PreTrainedTokenizerFast

from llm_envs.rewards import (
    DEFAULT_TURN_MARKERS,
    RewardWrapper,
    as_id_rows,
    clean_response_text,
    cut_at_turn,
    join_prompt_response,
    response_content_ids,
    response_special_ids,
    special_template,
    strip_template,
    tokenizers_match,
)

WORDS = (
    "<unk> <pad> <eos> <bos> Human: Assistant: USER: hello world how are you fine thanks sure good bad "
    "! ? please help me with this no"
).split()


def make_tokenizer(words: list[str] = WORDS) -> PreTrainedTokenizerFast:
    """Word-level tokenizer that prepends <bos> (so the special-token template is exercised)."""
    vocab = {w: i for i, w in enumerate(words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(
        single="<bos> $A",
        pair="<bos> $A <eos> $B:1",
        special_tokens=[("<bos>", vocab["<bos>"]), ("<eos>", vocab["<eos>"])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return make_tokenizer()


@pytest.fixture(scope="module")
def rm() -> GPT2ForSequenceClassification:
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(WORDS), n_positions=64, n_embd=16, n_layer=2, n_head=2, num_labels=1,
        pad_token_id=1, bos_token_id=3, eos_token_id=2,
    )
    return GPT2ForSequenceClassification(config).eval()


@pytest.fixture()
def wrapper(rm: GPT2ForSequenceClassification, tok: PreTrainedTokenizerFast) -> RewardWrapper:
    return RewardWrapper.from_model(rm, tokenizer=tok, lm_tokenizer=tok, device="cpu", batch_size=32)


PROMPTS = [
    "Human: hello how are you Assistant:",
    "Human: please help me with this Assistant:",
    "Human: hello Assistant:",
    "Human: help me ! Assistant:",
]
RESPONSES = ["fine thanks", "sure ! Human: no bad", "good", "no"]


def reference_scores(
    rm: GPT2ForSequenceClassification, tok: PreTrainedTokenizerFast, texts: list[str]
) -> list[float]:
    """One unpadded forward per text: the ground truth that batching must reproduce."""
    with torch.no_grad():
        return [float(rm(torch.tensor([tok(t)["input_ids"]])).logits[0, 0]) for t in texts]


def test_cut_at_turn() -> None:
    assert cut_at_turn("fine thanks") == "fine thanks"
    assert cut_at_turn(" Sure!\n\nHuman: and now?") == " Sure!"
    assert cut_at_turn("ok USER: x Assistant: y") == "ok"
    assert cut_at_turn("Assistant: hi") == ""
    assert cut_at_turn("a Human: b", markers=("USER:",)) == "a Human: b"
    assert cut_at_turn("a Human: b", markers=()) == "a Human: b"
    assert DEFAULT_TURN_MARKERS == ("Human:", "Assistant:", "USER:")


def test_text_path_matches_unbatched_reference(wrapper: RewardWrapper, rm, tok) -> None:
    scores = wrapper.score(PROMPTS, RESPONSES)
    cut = [cut_at_turn(r) for r in RESPONSES]
    expected = reference_scores(rm, tok, [f"{p} {r}" for p, r in zip(PROMPTS, cut)])
    np.testing.assert_allclose(scores, expected, atol=1e-5)
    assert all(isinstance(s, float) and math.isfinite(s) for s in scores)


def test_ids_fast_path_equals_text_path(wrapper: RewardWrapper, tok) -> None:
    prompt_ids = [tok(p)["input_ids"] for p in PROMPTS]  # with <bos>, as the engine would feed the LM
    eos, pad = tok.eos_token_id, tok.pad_token_id
    response_ids = [tok(r, add_special_tokens=False)["input_ids"] + [eos, pad, pad] for r in RESPONSES]
    fast = wrapper.score_ids(prompt_ids, response_ids)
    assert wrapper.last_path == "ids"
    slow = wrapper.score_ids(prompt_ids, response_ids, tok, fast=False)
    assert wrapper.last_path == "text"
    text = wrapper.score(PROMPTS, RESPONSES)
    np.testing.assert_allclose(fast, slow, atol=1e-5)
    np.testing.assert_allclose(fast, text, atol=1e-5)
    # tensors are accepted as rows; tokens after EOS are ignored
    junk = [torch.tensor(r[:-2] + [tok.convert_tokens_to_ids("bad")]) for r in response_ids]
    np.testing.assert_allclose(wrapper.score_ids(prompt_ids, junk), fast, atol=1e-5)


def test_byte_level_bpe_fast_path_equals_text_path() -> None:
    """GPT-2-style tokens carry their leading space: no separator is added, both paths agree."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    corpus = ["Human: how are you?\n\nAssistant: I am fine, thanks!", "Human: help me\n\nAssistant: Sure, here."]
    backend.train_from_iterator(corpus * 10, trainer)
    bpe = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>")  # no pad token
    vocab = max(bpe.get_vocab().values()) + 1
    config = GPT2Config(
        vocab_size=vocab, n_positions=64, n_embd=16, n_layer=1, n_head=2, num_labels=1, bos_token_id=0, eos_token_id=0
    )
    torch.manual_seed(0)
    model = GPT2ForSequenceClassification(config).eval()  # pad_token_id None: the wrapper sets it
    wrapper = RewardWrapper.from_model(model, tokenizer=bpe, lm_tokenizer=bpe, device="cpu")
    prompts = ["Human: how are you?\n\nAssistant:", "Human: help me\n\nAssistant:"]
    responses = [" I am fine, thanks!\n\nHuman: and you?", " Sure, here."]
    prompt_ids = [bpe(p)["input_ids"] for p in prompts]
    response_ids = [bpe(r, add_special_tokens=False)["input_ids"] + [bpe.eos_token_id] * 2 for r in responses]
    fast = wrapper.score_ids(prompt_ids, response_ids)
    assert wrapper.last_path == "ids"
    np.testing.assert_allclose(fast, wrapper.score_ids(prompt_ids, response_ids, fast=False), atol=1e-5)
    np.testing.assert_allclose(fast, wrapper.score(prompts, responses), atol=1e-5)
    expected = [_one(model, bpe(p + cut_at_turn(r))["input_ids"]) for p, r in zip(prompts, responses)]
    np.testing.assert_allclose(fast, expected, atol=1e-5)


def test_different_tokenizer_takes_text_path(rm, tok) -> None:
    other = make_tokenizer(WORDS[:4] + list(reversed(WORDS[4:])))  # same words, different ids
    wrapper = RewardWrapper.from_model(rm, tokenizer=tok, device="cpu")
    prompt_ids = [other(p)["input_ids"] for p in PROMPTS]
    response_ids = [other(r, add_special_tokens=False)["input_ids"] + [other.eos_token_id] for r in RESPONSES]
    scores = wrapper.score_ids(prompt_ids, response_ids, other)
    assert wrapper.last_path == "text"
    np.testing.assert_allclose(scores, wrapper.score(PROMPTS, RESPONSES), atol=1e-5)
    with pytest.raises(ValueError, match="differs from the LM tokenizer"):
        wrapper.score_ids(prompt_ids, response_ids, other, fast=True)
    with pytest.raises(ValueError, match="lm_tokenizer"):
        wrapper.score_ids(prompt_ids, response_ids)  # no LM tokenizer anywhere


def test_turn_marker_cutting(wrapper: RewardWrapper, tok) -> None:
    p = [PROMPTS[0]]
    base = wrapper.score(p, ["fine thanks"])
    assert wrapper.score(p, ["fine thanks Human: bad bad"]) == pytest.approx(base, abs=1e-6)
    assert wrapper.score(p, ["fine thanks USER: no"]) == pytest.approx(base, abs=1e-6)
    ids = [tok(p[0])["input_ids"]]
    cut_ids = wrapper.score_ids(ids, [tok("fine thanks Assistant: no", add_special_tokens=False)["input_ids"]])
    assert wrapper.last_path == "ids" and cut_ids == pytest.approx(base, abs=1e-5)
    uncut = RewardWrapper.from_model(wrapper.model, tokenizer=tok, device="cpu", turn_markers=())
    assert uncut.score(p, ["fine thanks Human: bad bad"]) != pytest.approx(base, abs=1e-6)
    # EOS / pad strings in a text response are not content
    assert wrapper.score(p, ["fine thanks <eos> bad <pad>"]) == pytest.approx(base, abs=1e-6)


def test_counters_and_batch_size_invariance(rm, tok) -> None:
    big = RewardWrapper.from_model(rm, tokenizer=tok, device="cpu", batch_size=32)
    small = RewardWrapper.from_model(rm, tokenizer=tok, device="cpu", batch_size=3)
    prompts, responses = PROMPTS * 2, RESPONSES * 2
    np.testing.assert_allclose(small.score(prompts, responses), big.score(prompts, responses), atol=1e-5)
    assert (big.calls, big.pairs_scored) == (1, 8)
    assert (small.calls, small.pairs_scored) == (3, 8)
    small.reset_counters()
    assert (small.calls, small.pairs_scored) == (0, 0)
    desc = small.describe()
    assert desc["kind"] == "model" and desc["batch_size"] == 3 and desc["template"] == "concat"


def test_pair_template_runs(rm, tok) -> None:
    pair = RewardWrapper.from_model(rm, tokenizer=tok, device="cpu", template="pair")
    scores = pair.score(PROMPTS, RESPONSES)
    assert len(scores) == 4 and all(math.isfinite(s) for s in scores)
    enc = tok(PROMPTS[0], RESPONSES[0])["input_ids"]  # <bos> prompt <eos> response
    assert scores[0] == pytest.approx(_one(rm, enc), abs=1e-5)
    response_ids = [tok(RESPONSES[0], add_special_tokens=False)["input_ids"]]
    assert pair.score_ids([tok(PROMPTS[0])["input_ids"]], response_ids, tok) == pytest.approx([scores[0]], abs=1e-5)
    assert pair.last_path == "text"
    short = RewardWrapper.from_model(rm, tokenizer=tok, device="cpu", template="pair", max_length=5)
    assert len(short.score(PROMPTS[:2], RESPONSES[:2])) == 2 and short.truncated == 2
    with pytest.raises(ValueError, match="template"):
        RewardWrapper.from_model(rm, tokenizer=tok, device="cpu", template="chat")  # type: ignore[arg-type]


def _one(rm: GPT2ForSequenceClassification, ids: list[int]) -> float:
    with torch.no_grad():
        return float(rm(torch.tensor([ids])).logits[0, 0])


def test_truncation_keeps_the_response_end(rm, tok) -> None:
    short = RewardWrapper.from_model(rm, tokenizer=tok, device="cpu", max_length=4)
    score = short.score([PROMPTS[1]], ["fine thanks"])
    assert short.truncated == 1
    # kept: <bos> + last 3 content tokens
    body = tok("this Assistant: fine thanks", add_special_tokens=False)["input_ids"]
    expected = _one(rm, [tok.bos_token_id] + body[-3:])
    assert score == pytest.approx([expected], abs=1e-5)
    assert RewardWrapper.from_model(rm, tokenizer=tok, device="cpu").max_length == 64  # n_positions


def test_from_model_directory_loads_tokenizer(tmp_path: Path, rm, tok) -> None:
    rm.save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    loaded = RewardWrapper.from_model(tmp_path / "rm", device="cpu")
    expected = RewardWrapper.from_model(rm, tokenizer=tok, device="cpu").score(PROMPTS, RESPONSES)
    np.testing.assert_allclose(loaded.score(PROMPTS, RESPONSES), expected, atol=1e-5)
    assert loaded.name == str(tmp_path / "rm")
    assert loaded.score_ids([tok(PROMPTS[0])["input_ids"]], [[5]], tok) and loaded.last_path == "ids"


def test_model_nan_raises_naming_pair(tok) -> None:
    config = GPT2Config(
        vocab_size=len(WORDS), n_positions=16, n_embd=8, n_layer=1, n_head=2, num_labels=1,
        pad_token_id=1, bos_token_id=3, eos_token_id=2,
    )
    broken = GPT2ForSequenceClassification(config)
    with torch.no_grad():
        broken.score.weight.fill_(float("nan"))
    wrapper = RewardWrapper.from_model(broken, tokenizer=tok, device="cpu")
    with pytest.raises(ValueError, match=r"non-finite score \(nan\) for pair 0.*hello"):
        wrapper.score(["Human: hello Assistant:"], ["fine"])


def test_callable_backend() -> None:
    seen: list[list[str]] = []

    def length_reward(prompts: list[str], responses: list[str]) -> list[float]:
        seen.append(responses)
        return [float(len(r)) for r in responses]

    wrapper = RewardWrapper.from_callable(length_reward, batch_size=2)
    assert wrapper.name.endswith("length_reward") and wrapper.kind == "callable"
    scores = wrapper.score(["a", "b", "c"], ["xx", "yyy Human: more", "z"])
    assert scores == [2.0, 3.0, 1.0]
    assert seen[0] == ["xx", "yyy"]  # cut at the turn marker before the function sees it
    assert (wrapper.calls, wrapper.pairs_scored) == (2, 3)
    arr = RewardWrapper.from_callable(lambda p, r: np.arange(len(p), dtype=np.float32), name="arange")
    assert arr.score(["a", "b"], ["c", "d"]) == [0.0, 1.0] and arr.name == "arange"


def test_callable_score_ids_decodes(tok) -> None:
    wrapper = RewardWrapper.from_callable(lambda p, r: [float(len(x.split())) for x in r], lm_tokenizer=tok)
    ids = [tok(PROMPTS[0])["input_ids"]]
    resp = [tok("fine thanks Human: no", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]
    assert wrapper.score_ids(ids, resp) == [2.0]
    assert wrapper.last_path == "text"


def test_callable_nan_names_the_pair() -> None:
    wrapper = RewardWrapper.from_callable(lambda p, r: [1.0, float("nan")], name="judge")
    with pytest.raises(ValueError, match=r"'judge'.*pair 1.*'second prompt'.*'bad answer'"):
        wrapper.score(["first", "second prompt"], ["ok", "bad answer"])
    inf = RewardWrapper.from_callable(lambda p, r: [float("inf")])
    with pytest.raises(ValueError, match="non-finite"):
        inf.score(["p"], ["r"])


def test_callable_wrong_count_or_type() -> None:
    with pytest.raises(ValueError, match="returned 1 scores for a batch of 2"):
        RewardWrapper.from_callable(lambda p, r: [1.0]).score(["a", "b"], ["c", "d"])
    with pytest.raises(TypeError, match="expected a list of 2 floats"):
        RewardWrapper.from_callable(lambda p, r: 1.0).score(["a", "b"], ["c", "d"])
    with pytest.raises(TypeError, match="for pair 1; expected a real number"):
        RewardWrapper.from_callable(lambda p, r: [1.0, "2"]).score(["a", "b"], ["c", "d"])
    with pytest.raises(TypeError, match="shape"):
        RewardWrapper.from_callable(lambda p, r: np.zeros((2, 1))).score(["a", "b"], ["c", "d"])


def test_input_validation(wrapper: RewardWrapper) -> None:
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        wrapper.score(["a", "b"], ["c"])
    with pytest.raises(TypeError, match="prompts must be a list"):
        wrapper.score("a", ["c"])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"responses\[1\] is int"):
        wrapper.score(["a", "b"], ["c", 3])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="batch_size"):
        RewardWrapper.from_callable(lambda p, r: [], batch_size=0)
    with pytest.raises(TypeError, match="expects a function"):
        RewardWrapper.from_callable(3)  # type: ignore[arg-type]
    assert wrapper.score([], []) == [] and wrapper.score_ids([], [], wrapper.tokenizer) == []


def test_build_dispatch(tmp_path: Path, rm, tok, wrapper: RewardWrapper) -> None:
    assert RewardWrapper.build(wrapper) is wrapper
    fn = RewardWrapper.build(lambda p, r: [0.0] * len(p), device="cpu", tokenizer=tok, name="zero")
    assert fn.kind == "callable" and fn.name == "zero" and fn.score(["a"], ["b"]) == [0.0]
    from_obj = RewardWrapper.build(rm, tokenizer=tok, device="cpu", name="ignored-for-models")
    assert from_obj.kind == "model"
    rm.save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    for spec in (str(tmp_path / "rm"), tmp_path / "rm"):
        assert RewardWrapper.build(spec, device="cpu").kind == "model"
    with pytest.raises(TypeError, match="Did you mean 'batch_size'"):
        RewardWrapper.build(wrapper, batchsize=4)
    with pytest.raises(TypeError, match="reward=None"):
        RewardWrapper.build(None)


# ----------------------------------------------------------------------------- text conventions, public seams


def test_text_conventions_as_functions(tok) -> None:
    assert join_prompt_response("Human: hi Assistant:", "fine") == "Human: hi Assistant: fine"
    assert join_prompt_response("Assistant: ", "fine") == "Assistant: fine"
    assert join_prompt_response("Assistant:", " Sure") == "Assistant: Sure"
    assert join_prompt_response("", "fine") == "fine" and join_prompt_response("a", "") == "a"
    bos, eos, pad = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    assert special_template(tok) == ([bos], [])
    assert strip_template([bos, 7, 8], ([bos], [])) == [7, 8] and strip_template([7, 8], None) == [7, 8]
    assert strip_template([bos, 7, eos], ([bos], [eos])) == [7]
    assert response_special_ids(tok) == {bos, eos, pad}
    assert response_content_ids([7, pad, 8, eos, 9], eos, {bos, eos, pad}) == [7, 8]
    assert response_content_ids([bos, 7], None, {bos}) == [7]
    assert clean_response_text("fine <pad>thanks<eos> Human: x", tok) == "fine thanks"
    assert tokenizers_match(tok, tok) and tokenizers_match(tok, make_tokenizer())
    assert not tokenizers_match(tok, make_tokenizer(WORDS[:-1]))
    assert as_id_rows(torch.tensor([[1, 2], [3, 4]])) == [[1, 2], [3, 4]]
    assert as_id_rows([np.array([1]), [2]]) == [[1], [2]] and as_id_rows("x") == "x"


def test_public_seams_for_candidate_scoring(wrapper: RewardWrapper, rm, tok) -> None:
    assert wrapper.template_ids == ([tok.bos_token_id], [])
    assert wrapper.fast_path(tok) == (True, "")
    ok, why = wrapper.fast_path(make_tokenizer(WORDS[:-1]))
    assert not ok and "differs" in why
    seqs = [tok("Human: hello Assistant: fine")["input_ids"], tok("hello")["input_ids"]]
    before = (wrapper.calls, wrapper.pairs_scored)
    np.testing.assert_allclose(wrapper.score_model_inputs(seqs),
                               reference_scores(rm, tok, ["Human: hello Assistant: fine", "hello"]), atol=1e-5)
    assert (wrapper.calls, wrapper.pairs_scored) == (before[0] + 1, before[1] + 2)
    wrapper.count_call(5)
    assert (wrapper.calls, wrapper.pairs_scored) == (before[0] + 2, before[1] + 7)
    assert wrapper.fit_to_max_length(list(range(10))) == list(range(10)) and wrapper.truncated == 0
    assert wrapper.fit_to_max_length(list(range(70))) == list(range(6, 70)) and wrapper.truncated == 1  # 64
    gold = RewardWrapper.from_callable(lambda p, r: [0.0] * len(p), name="zeros")
    assert gold.template_ids is None and gold.fast_path(tok) == (False, "the backend of 'zeros' is a function, "
                                                                       "which scores text")
    with pytest.raises(ValueError, match="reward-model backend"):
        gold.score_model_inputs([[1]])


def test_the_package_layers_flow_one_way() -> None:
    """text <- inputs | backends | combination <- wrapper <- candidates, none of them lazily backwards;
    length_cache/models stay below."""
    import ast

    import llm_envs

    root = Path(llm_envs.__file__).parent

    def imports(relative: str) -> set[str]:
        tree = ast.parse((root / relative).read_text())
        found = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        found |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
        return {name for name in found if name.startswith("llm_envs")}

    # the text conventions read only the reading rules (plain data over the config layer)
    assert imports("rewards/text.py") == {"llm_envs.reward_rules"} and imports("rewards/combination.py") == set()
    assert imports("rewards/backends.py") == set()  # runs a model or a function on ready inputs
    assert imports("rewards/inputs.py") == {"llm_envs.chat", "llm_envs.models", "llm_envs.reward_rules",
                                            "llm_envs.rewards.text"}
    assert imports("reward_rules.py") == {"llm_envs.config"}
    assert imports("rewards/wrapper.py") == {"llm_envs.chat", "llm_envs.models", "llm_envs.reward_rules",
                                             "llm_envs.reward_spec", "llm_envs.rewards.backends",
                                             "llm_envs.rewards.combination", "llm_envs.rewards.inputs",
                                             "llm_envs.rewards.text", "llm_envs.score_model"}
    assert imports("chat.py") == set()  # the chat format is data: it reads no other llm_envs module
    assert imports("rewards/candidates.py") == {
        "llm_envs.length_cache", "llm_envs.models", "llm_envs.rewards.text", "llm_envs.rewards.wrapper",
        "llm_envs.score_model",
    }
    # models reads only io (the cache root and atomic directory swaps for GGUF conversions) and the
    # score-model loader below it, which reads none; a reward spec is plain data over the config layer
    assert imports("models.py") == {"llm_envs.io", "llm_envs.score_model"}
    assert imports("length_cache.py") == set()
    assert imports("score_model.py") == set() and imports("reward_spec.py") == {"llm_envs.config"}
    assert imports("engine.py") == {"llm_envs.length_cache", "llm_envs.models", "llm_envs.prefill"}
    assert imports("prefill.py") == {"llm_envs.length_cache"}


def _per_row_inputs(kv: Any, rows: list[int], pending: list[list[int]], candidates: list[list[int]],
                    width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The prefix cache's forward inputs built row by row from their definition: row r's column q writes
    slot start[r] + q (a listed row starts at its length; a row left out past its tentative slots); a
    listed row's pending tokens (columns 0 .. m-1, positions len .. len+m-1) see its prefix and the
    pending tokens up to themselves, its candidates (columns m .. m+k-1, all at position len + m) see
    the prefix, every pending token and themselves; any other column sees only its own slot."""
    n, run = kv.num_rows, max(len(p) + len(c) for p, c in zip(pending, candidates))
    ids = torch.full((n, run), kv.pad, dtype=torch.long)
    pos = torch.zeros((n, run), dtype=torch.long)
    allowed = torch.zeros((n, run, width), dtype=torch.bool)
    span = torch.arange(run)
    for row in range(n):
        allowed[row, span, len(kv.tokens[row]) + kv.held[row] + span] = True
    for row, pend, cands in zip(rows, pending, candidates):
        m, k, length = len(pend), len(cands), len(kv.tokens[row])
        assert kv.held[row] == 0  # a listed row's tentative slots were kept or dropped before the forward
        ids[row, : m + k] = torch.tensor(pend + cands, dtype=torch.long)
        pos[row, :m] = torch.arange(length, length + m)
        pos[row, m : m + k] = length + m
        allowed[row, : m + k, :length] = True
        allowed[row, :m, length : length + m] = torch.ones(m, m, dtype=torch.bool).tril()
        allowed[row, m : m + k, length : length + m] = True
    additive = torch.zeros(allowed.shape, dtype=kv.dtype).masked_fill_(~allowed, torch.finfo(kv.dtype).min)
    return ids, pos, additive


def test_prefix_cache_scores_equal_full_forwards_and_its_inputs_follow_their_definition(
    wrapper: RewardWrapper, rm, tok
) -> None:
    """Calls with rows of cached prefixes, pending tokens besides a kept candidate, a kept candidate other
    than the first, a row that sits out a call and then keeps one of its tentative candidates, a pad
    candidate and a new episode: every score equals a full no-cache forward, each kept candidate is moved
    (not fed again), and each forward's ids, positions and 4-D mask equal a row-by-row build."""
    from llm_envs.rewards import CandidateScorer

    scorer = CandidateScorer(wrapper, 4, tok)
    kv = scorer._kv
    assert kv is not None
    built = kv._inputs
    checked: list[int] = []

    def checking(rows: list[int], pending: list[list[int]], candidates: list[list[int]]) -> Any:
        got = built(rows, pending, candidates)
        width = got[2].shape[-1]
        assert width >= max(len(t) + h for t, h in zip(kv.tokens, kv.held)) + got[0].shape[1]
        for a, b in zip(got, _per_row_inputs(kv, rows, pending, candidates, width)):
            assert a.dtype == b.dtype and torch.equal(a, b)
        checked.append(len(rows))
        return got

    kv._inputs = checking
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    calls = [  # (rows, their prompts (PROMPTS indices), responses, candidates, candidates kept by a move)
        ([0, 1, 2, 3], [0, 1, 2, 3], [[], [], [], []], [[9, 10, 11]] * 4, 0),
        ([0, 2, 3], [0, 2, 3], [[10], [9], [11, 12]], [[12, 13, 14]] * 3, 3),  # row 1 sits out; 3 keeps 11, feeds 12
        ([1, 3, 0], [1, 3, 0], [[11], [11, 12, 14], [10, 5, 6]], [[9, 1], [13, 12], [14, 9]], 2),  # 1's survived
        ([0, 1, 2, 3], [0, 1, 2, 3], [[10, 5, 6, 14], [11, 1], [9, 12], [11, 12, 14, 12]], [[7, 8, 9, 10]] * 4, 4),
        ([2, 0], [1, 0], [[], [10, 5, 6, 14, 8]], [[15, 16]] * 2, 1),  # row 2 starts a new episode (PROMPTS[1])
    ]
    kept = 0
    for rows, which, responses, cands, moved in calls:
        row_prompts = [prompts[w] for w in which]
        got, own = scorer.score(rows, row_prompts, responses, cands, scoring="raw", prefix=True)
        for i, (prompt, response) in enumerate(zip(row_prompts, responses)):
            assert own[i] == pytest.approx(_one(rm, prompt + response), abs=1e-5)
            for j, c in enumerate(cands[i]):
                assert got[i, j] == pytest.approx(_one(rm, prompt + response + [c]), abs=1e-5), (rows[i], c)
        kept += moved
        assert kv.kept == kept
    assert checked == [len(rows) for rows, *_ in calls] and kv.forwards == len(calls)
    assert scorer.uses_prefix_cache
