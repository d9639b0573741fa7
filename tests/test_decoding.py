"""Decoding baselines: greedy / top-k / nucleus / best-of-n decoders and diverse beam search."""

from __future__ import annotations

import pytest
import torch

from agents.base import Decoder
from agents.decoding import (
    BestOfNDecoder,
    GreedyDecoder,
    NucleusDecoder,
    TopKDecoder,
    diverse_beam_search,
    encode_prompts,
    make_decoder,
)
from llm_envs.models import load_causal_lm, load_tokenizer

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def lm(test_world):
    return load_causal_lm(test_world.lm_dir, device="cpu"), load_tokenizer(test_world.lm_dir)


@pytest.fixture(scope="module")
def prompts(test_world) -> list[str]:
    return test_world.test_prompts[::12][:8]


def test_greedy_matches_hf_generate_and_counts_forwards(lm, prompts, test_world) -> None:
    from llm_envs.world.report import generate_answers

    model, tok = lm
    decoder = GreedyDecoder(model, tok, batch_size=3)  # batches mix prompt lengths (left padding)
    assert isinstance(decoder, Decoder) and decoder.name == "greedy"
    gens = decoder.generate(prompts, max_new_tokens=20)
    expected = generate_answers(model, tok, prompts, do_sample=False, max_new_tokens=20)
    assert [" ".join(g.response_text.split()) for g in gens] == expected
    for g, prompt in zip(gens, prompts):
        assert g.prompt == prompt and g.rm_calls == 0
        assert g.lm_forwards == len(g.response_ids)  # prefill + one per further token
        assert tok.eos_token_id not in g.response_ids[:-1]
        assert g.response_ids[-1] == tok.eos_token_id or len(g.response_ids) == 20
        assert tok.pad_token_id not in g.response_ids


def test_sampling_decoders_are_seeded_and_degenerate_to_greedy(lm, prompts) -> None:
    model, tok = lm
    greedy = [g.response_ids for g in GreedyDecoder(model, tok).generate(prompts, max_new_tokens=16)]
    assert [g.response_ids for g in TopKDecoder(model, tok, top_k=1).generate(prompts, max_new_tokens=16, seed=3)] \
        == greedy
    nucleus = NucleusDecoder(model, tok, top_p=0.9)
    a = nucleus.generate(prompts, max_new_tokens=16, seed=7)
    b = nucleus.generate(prompts, max_new_tokens=16, seed=7)
    assert [g.response_ids for g in a] == [g.response_ids for g in b]
    assert TopKDecoder(model, tok, top_k=5).name == "top_k5" and nucleus.name == "nucleus0.9"


def test_best_of_n_keeps_the_best_sample(lm, prompts) -> None:
    model, tok = lm
    length = lambda ps, rs: [float(len(r.split())) for r in rs]  # noqa: E731 - a programmatic reward
    decoder = BestOfNDecoder(model, tok, reward=length, n=4, top_p=1.0)
    gens = decoder.generate(prompts, max_new_tokens=16, seed=0)
    for g in gens:
        rewards = g.extra["candidate_rewards"]
        assert len(rewards) == 4 and g.rm_calls == 4
        assert g.extra["reward"] == max(rewards) == rewards[g.extra["picked"]]
        assert g.extra["reward"] == len(g.response_text.split())
        assert g.lm_forwards >= 4
    assert decoder.reward.pairs_scored == 4 * len(prompts)
    assert make_decoder("best_of_16", model, tokenizer=tok, reward=length).n == 16
    assert make_decoder("best_of_32", model, tokenizer=tok, reward=length).name == "best_of_32"
    with pytest.raises(ValueError, match="Did you mean 'nucleus'"):
        make_decoder("nucleas", model, tokenizer=tok)


def test_best_of_n_candidates_are_nested_and_the_first_is_the_nucleus_sample(lm, prompts) -> None:
    """Candidate j has a seed of its own, so best-of-k draws the first k of best-of-n's candidates
    and candidate 0 is the nucleus sample of the same seed: one draw of the largest n serves every n."""
    model, tok = lm
    length = lambda ps, rs: [float(len(r.split())) for r in rs]  # noqa: E731
    ids = encode_prompts(tok, prompts)
    four = BestOfNDecoder(model, tok, reward=length, n=4, batch_size=3).candidates(ids, 12, seed=5)
    two = BestOfNDecoder(model, tok, reward=length, n=2, batch_size=3).candidates(ids, 12, seed=5)
    assert [rows[:2] for rows in four] == two
    assert len({tuple(r) for rows in four for r in rows}) > len(prompts)  # the candidates differ
    nucleus = NucleusDecoder(model, tok, top_p=1.0, batch_size=3).generate(prompts, max_new_tokens=12, seed=5)
    assert [rows[0] for rows in four] == [g.response_ids for g in nucleus]
    kept = BestOfNDecoder(model, tok, reward=length, n=4, batch_size=3, keep_candidates=True)
    gens = kept.generate(prompts, max_new_tokens=12, seed=5)
    assert [g.extra["candidate_ids"] for g in gens] == four
    assert all(g.response_ids == g.extra["candidate_ids"][g.extra["picked"]] for g in gens)


def test_diverse_beam_search(lm, prompts) -> None:
    model, tok = lm
    ids = encode_prompts(tok, prompts)
    greedy = [g.response_ids for g in GreedyDecoder(model, tok).generate(prompts, max_new_tokens=16)]
    # No diversity penalty and no length normalisation: each 1-beam group is greedy decoding.
    same = diverse_beam_search(model, tok, ids, max_new_tokens=16, num_beams=3, num_beam_groups=3,
                               diversity_penalty=0.0, length_penalty=0.0, batch_size=5)
    assert all(rows == [g] * 3 for rows, g in zip(same, greedy))
    # A large penalty forces every group onto a different first token.
    diverse = diverse_beam_search(model, tok, ids, max_new_tokens=16, num_beams=4, num_beam_groups=4,
                                  diversity_penalty=100.0)
    assert all(len(rows) == 4 and len({r[0] for r in rows}) == 4 for rows in diverse)
    with pytest.raises(ValueError, match="multiple of num_beam_groups"):
        diverse_beam_search(model, tok, ids, max_new_tokens=4, num_beams=4, num_beam_groups=3)


def test_bad_input_is_named(lm) -> None:
    model, tok = lm
    decoder = GreedyDecoder(model, tok)
    with pytest.raises(ValueError, match=r"prompts\[1\]='' is empty"):
        decoder.generate(["Human: hi ? Assistant:", ""])
    with pytest.raises(ValueError, match="> the model's context of 128 tokens"):
        decoder.generate(["Human: hi ? Assistant:"], max_new_tokens=500)
    with pytest.raises(TypeError, match="list of strings"):
        decoder.generate("Human: hi ? Assistant:")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="top_p=1.5"):
        NucleusDecoder(model, tok, top_p=1.5)
