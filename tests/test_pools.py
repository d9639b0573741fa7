"""Candidate pools (head + histogram nucleus) against the brute-force definition (a full stable sort)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llm_envs.envs import pools as pools_module
from llm_envs.envs.pools import Pool, nucleus_pools, reference_pool, top_k_by_id
from llm_envs.envs.token_accept import skam_allows_reject

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(autouse=True, params=["host_checks", "sync_free"])
def pool_path(request, monkeypatch):
    """Every test here runs on both paths: the CPU one (host checks of the rare cases) and the
    accelerator one (static shapes, no host read), forced on the CPU."""
    monkeypatch.setattr(pools_module, "SYNC_FREE_ON_CPU", request.param == "sync_free")
    return request.param


def _logits(kind: str, rows: int, vocab: int, seed: int) -> torch.Tensor:
    """Batches of next-token logits shaped like what LMs give."""
    g = torch.Generator().manual_seed(seed)
    if kind == "flat":  # a random-initialised LM: near uniform, nucleus of most of the vocabulary
        return 0.3 * torch.randn(rows, vocab, generator=g)
    if kind == "peaked":  # a trained LM: a few likely tokens, a long tail
        return 4.0 * torch.randn(rows, vocab, generator=g)
    if kind == "zipf":  # heavy tail: nucleus of hundreds of tokens, past the first head
        ranks = torch.stack([torch.randperm(vocab, generator=g) for _ in range(rows)]) + 1
        return -1.1 * torch.log(ranks.float())
    if kind == "mixed":  # rows of every kind in one batch, so some need the histogram and some not
        parts = [_logits(k, 1, vocab, seed + i) for i, k in enumerate(["flat", "peaked", "zipf"] * rows)]
        return torch.cat(parts)[:rows]
    raise ValueError(kind)


def _reachable_rank(pool: Pool, p_t: float) -> int:
    """The deepest rank SKAM lets a row propose (reject while allowed)."""
    r = 0
    while skam_allows_reject(pool, r, p_t):
        r += 1
    return r


def _check_row(pool: Pool, ref: Pool, p_t: float | None) -> None:
    assert len(pool) == len(ref)
    width = pool.head_width
    assert width == min(len(ref), width) and width >= 1
    assert pool.ids.tolist() == ref.ids[:width].tolist()
    np.testing.assert_array_equal(pool.probs, ref.probs[:width])
    np.testing.assert_allclose(pool.suffix_mass, ref.suffix_mass[: width + 1], rtol=1e-9, atol=1e-15)
    assert pool.top_logprob == pytest.approx(ref.top_logprob, abs=1e-12)
    if p_t is not None:  # the head holds every candidate SKAM can reach, and the mask agrees
        deepest = _reachable_rank(ref, p_t)
        assert deepest < width
        assert all(skam_allows_reject(pool, r, p_t) == skam_allows_reject(ref, r, p_t) for r in range(deepest + 1))


@pytest.mark.parametrize("kind", ["flat", "peaked", "zipf", "mixed"])
@pytest.mark.parametrize("top_p", [0.5, 0.9, 0.99, 1.0])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_pools_equal_the_full_sort(kind, top_p, temperature, pool_path):
    if pool_path == "sync_free" and temperature != 1.0:
        pytest.skip("the sync-free path is checked at one temperature here (the scaling is shared code)")
    logits = _logits(kind, 6, 3000, seed=int(100 * top_p + 10 * temperature))
    for p_t in (None, 0.01, 1e-4):
        pools = nucleus_pools(logits, top_p=top_p, top_k=None, temperature=temperature, head_min_prob=p_t).rows()
        for row, pool in enumerate(pools):
            ref = reference_pool(logits[row], top_p=top_p, top_k=None, temperature=temperature)
            _check_row(pool, ref, p_t)


@pytest.mark.parametrize("kind", ["flat", "peaked", "zipf"])
@pytest.mark.parametrize("top_k", [1, 5, 40, 2999, 3000, 5000])
def test_top_k_caps_the_pool_and_the_head_is_the_whole_pool(kind, top_k):
    logits = _logits(kind, 4, 3000, seed=top_k)
    for top_p in (0.9, 1.0):
        pools = nucleus_pools(logits, top_p=top_p, top_k=top_k, temperature=1.0).rows()
        for row, pool in enumerate(pools):
            ref = reference_pool(logits[row], top_p=top_p, top_k=top_k, temperature=1.0)
            assert pool.head_width == len(pool) == len(ref) <= top_k
            _check_row(pool, ref, None)


def test_gpt2_sized_flat_rows_use_the_histogram_and_match():
    """A random 124M-shaped LM: 50257 tokens, nucleus of ~45k, far past any head."""
    logits = _logits("flat", 3, 50257, seed=7)
    pools = nucleus_pools(logits, top_p=0.9, top_k=None, temperature=1.0, head_min_prob=0.01).rows()
    for row, pool in enumerate(pools):
        ref = reference_pool(logits[row], top_p=0.9, top_k=None, temperature=1.0)
        assert len(ref) > 40000 and pool.head_width <= 102  # floor(1 / p_t) + 2: the sync-free static head
        _check_row(pool, ref, 0.01)


def test_deep_rejections_walk_far_into_the_pool():
    """p_t = 0 lets a row reject down to the last token: the head must be the whole pool."""
    logits = _logits("zipf", 3, 800, seed=3)
    pools = nucleus_pools(logits, top_p=0.95, top_k=None, temperature=1.0, head_min_prob=0.0).rows()
    for row, pool in enumerate(pools):
        ref = reference_pool(logits[row], top_p=0.95, top_k=None, temperature=1.0)
        assert len(pool) > 100 and pool.head_width == len(pool)
        _check_row(pool, ref, 0.0)
        assert _reachable_rank(pool, 0.0) == len(pool) - 1


def test_small_p_t_widens_the_head_past_the_default():
    logits = _logits("zipf", 4, 5000, seed=11)
    pools = nucleus_pools(logits, top_p=0.99, top_k=None, temperature=1.0, head_min_prob=1e-4).rows()
    assert max(p.head_width for p in pools) > 32
    for row, pool in enumerate(pools):
        _check_row(pool, reference_pool(logits[row], top_p=0.99, top_k=None, temperature=1.0), 1e-4)


def test_ties_go_to_the_lower_id_also_across_the_head_edge():
    logits = torch.zeros(2, 200)
    logits[0, [150, 3, 77]] = 2.0  # three tied leaders, then 197 tied tokens
    logits[1, 190:] = 1.0  # ten tied leaders; the head of 4 must take ids 190..193
    for top_k, head in ((None, 4), (4, 32), (None, 32)):
        pools = nucleus_pools(logits, top_p=0.5, top_k=top_k, temperature=1.0, head=head).rows()
        for row, pool in enumerate(pools):
            ref = reference_pool(logits[row], top_p=0.5, top_k=top_k, temperature=1.0)
            _check_row(pool, ref, None)
    assert pools[0].ids[:3].tolist() == [3, 77, 150]


def test_masked_tokens_and_a_single_token_nucleus():
    logits = torch.full((2, 1000), -float("inf"))
    logits[0, :600] = 0.2 * torch.randn(600, generator=torch.Generator().manual_seed(0))
    logits[1, 5] = 0.0  # one finite token: the pool is that token alone
    pools = nucleus_pools(logits, top_p=0.9, top_k=None, temperature=1.0, head_min_prob=0.01).rows()
    for row, pool in enumerate(pools):
        _check_row(pool, reference_pool(logits[row], top_p=0.9, top_k=None, temperature=1.0), 0.01)
    assert len(pools[1]) == 1 and pools[1].ids.tolist() == [5]
    assert not skam_allows_reject(pools[1], 0, 0.0)


def test_batched_tensors_agree_with_the_row_views():
    logits = _logits("mixed", 5, 2000, seed=5)
    batch = nucleus_pools(logits, top_p=0.9, top_k=None, temperature=1.0, head_min_prob=0.01)
    for row, pool in enumerate(batch.rows()):
        assert int(batch.size[row]) == len(pool)
        assert batch.ids[row, pool.head_width:].eq(-1).all() and batch.probs[row, pool.head_width:].eq(0).all()


def test_both_paths_give_the_same_pools_under_bf16_ties(monkeypatch):
    """bf16-rounded logits tie often, also at the head's edge: the sync-free path's vectorised tie
    settlement, static head and masked sort give the host path's pools exactly."""
    g = torch.Generator().manual_seed(3)
    logits = (2.0 * torch.randn(16, 4000, generator=g)).to(torch.bfloat16).float()
    logits[3, :50] = logits[3, 0]  # a 50-way tie at the top
    logits[5] = 0.0  # a flat row: every token ties
    out = {}
    for path in (False, True):
        monkeypatch.setattr(pools_module, "SYNC_FREE_ON_CPU", path)
        pools = nucleus_pools(logits, top_p=0.9, top_k=None, temperature=1.0, head_min_prob=0.01).rows()
        out[path] = (pools, top_k_by_id(logits, 33))
    for host, free in zip(out[False][0], out[True][0]):
        width = min(host.head_width, free.head_width)
        assert host.size == free.size
        assert host.ids[:width].tolist() == free.ids[:width].tolist()
        np.testing.assert_array_equal(host.probs[:width], free.probs[:width])
        np.testing.assert_allclose(host.suffix_mass[:width + 1], free.suffix_mass[:width + 1], rtol=1e-9, atol=1e-15)
    for a, b in zip(out[False][1], out[True][1]):
        assert torch.equal(a, b)
