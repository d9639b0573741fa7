"""Candidate pools: the top-p nucleus of `softmax(logits / temperature)`, without sorting it.

Shared by the envs so that TokenAccept and TokenChoice see the same candidates.

Why no full sort: a near-flat distribution (a random model, a high temperature) has a nucleus of
tens of thousands of tokens, and sorting 50k probabilities per row per step cost as much as the
LM forward. The envs never need the whole sorted nucleus, only

- its size |T| and mass (for the SKAM mask and the observation features), and
- its first few tokens in order (the candidates a row can actually reach).

So a pool is a sorted *head* (a `topk`) plus the nucleus size and mass. When the head does not
reach `top_p`, size and mass come from a histogram of the logits: whole bins above the boundary
are counted and summed, and only the boundary bin is sorted (`_nucleus_by_histogram`).

Order: descending probability, ties broken by lower token id first (deterministic; it is also
what a stable full sort gives, the reference in the tests).

Two paths, one result. On the CPU, the rare cases (a head that must widen, a tie at the head's
edge, a nucleus longer than the head) are detected with a host check and handled only for the
rows that need them: reading a CPU tensor costs nothing. On an accelerator, a host check is a
synchronisation that stalls the step, so the *sync-free* path computes them for every row with
static shapes (a head wide enough for every reachable candidate from the start, a vectorised tie
settlement, the histogram for every row, a masked sort of the boundary bin) and never reads the
device. `sync_free(device)` picks the path; tests force the sync-free one on the CPU
(`SYNC_FREE_ON_CPU`) to check both give the same pools.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

HISTOGRAM_BINS = 4096  # bins over each row's logit range; only the boundary bin gets sorted
MAX_SPREAD = 64.0  # logit range (in units of temperature) the bins cover below each row's top
DEFAULT_HEAD = 32  # head width tried first: peaked rows usually reach top_p inside it
SYNC_FREE_ON_CPU = False  # tests set it to run the accelerator path on the CPU


def sync_free(device: torch.device) -> bool:
    """Whether pools on `device` take the path that never reads the device from the host."""
    return device.type != "cpu" or SYNC_FREE_ON_CPU


def static_head_width(head: int, head_min_prob: float | None, limit: int) -> int:
    """The head the sync-free path sorts: wide enough for every candidate SKAM can reach, decided
    without looking at the row. At most 1/p tokens have probability >= p, so floor(1/p) + 2 (the
    margin the widening test uses, plus the one more token) hold every pool token with p >= p_t and
    the next one; p_t = 0 lets a row reject through its whole pool."""
    if head_min_prob is None:
        return min(max(head, 1), limit)
    if head_min_prob <= 0:
        return limit
    return min(limit, max(head, int(np.floor(1.0 / (head_min_prob * (1 - 1e-9)))) + 2))


@dataclass(frozen=True)
class Pool:
    """One position's candidate pool: its sorted head, size and mass (numpy, on the CPU).

    `probs` are full-vocabulary probabilities (not renormalised over the pool), as the SKAM
    mask and the deviation cost use them. `ids[:len(probs)]` is the head: the pool's first
    tokens in descending probability; it may be shorter than the pool (`size`), but it holds
    every candidate the env can reach. `suffix_mass[r]` = mass of the pool without its first
    `r` tokens, for `r <= len(probs)` (`suffix_mass[size] = 0` when the head is the whole pool).
    """

    ids: np.ndarray  # [W] int64, W <= size
    probs: np.ndarray  # [W] float64
    suffix_mass: np.ndarray  # [W + 1] float64
    top_logprob: float  # log p of the most probable token (for the deviation cost)
    size: int  # |T|, the number of tokens in the pool
    entropy: float = float("nan")  # nats, of the full distribution; NaN unless asked for (`with_entropy`)

    def __len__(self) -> int:
        return self.size

    @property
    def top_prob(self) -> float:
        """p of the most probable token of the full distribution (the head's first token)."""
        return float(self.probs[0])

    @property
    def head_width(self) -> int:
        return int(self.ids.shape[0])

    @classmethod
    def from_sorted(cls, ids: list[int], probs: list[float], entropy: float = float("nan")) -> Pool:
        """A fully materialised pool from sorted ids/probs (hand-built pools, tests)."""
        p = np.asarray(probs, dtype=np.float64)
        suffix = np.concatenate([np.cumsum(p[::-1])[::-1], [0.0]])
        return cls(np.asarray(ids, dtype=np.int64), p, suffix, float(np.log(p[0])), len(p), float(entropy))


@dataclass(frozen=True)
class NucleusPools:
    """The pools of a batch of B rows; `row(i)` gives row i as a `Pool`.

    Tensors are on the logits' device. Row i's head is `ids[i, :min(size[i], K)]`; entries past
    a row's head are id -1 and probability 0.
    """

    ids: torch.Tensor  # [B, K] long
    probs: torch.Tensor  # [B, K] float64
    size: torch.Tensor  # [B] long, |T| of each row
    suffix_mass: torch.Tensor  # [B, K + 1] float64, pool mass left after r rejections
    entropy: torch.Tensor | None = None  # [B] float64 nats of the full distribution (with_entropy=True)

    def __len__(self) -> int:
        return int(self.size.shape[0])

    def rows(self) -> list[Pool]:
        """Every row as a `Pool` (one device-to-host copy for the batch)."""
        ids, probs, suffix = self.ids.cpu().numpy(), self.probs.cpu().numpy(), self.suffix_mass.cpu().numpy()
        sizes = self.size.tolist()
        top = np.log(probs[:, 0]).tolist()  # numpy's log, as the env's deviation cost uses it
        entropy = self.entropy.tolist() if self.entropy is not None else [float("nan")] * len(sizes)
        width = ids.shape[1]
        out = []
        for i, size in enumerate(sizes):
            w = min(size, width)
            out.append(Pool(ids[i, :w], probs[i, :w], suffix[i, : w + 1], top[i], size, entropy[i]))
        return out


class PoolWorkspace:
    """Reusable [B, V] scratch buffers for `nucleus_pools` (an env keeps one; not thread-safe).

    Why: at a 50k vocabulary a [64, V] float64 buffer is 25 MB, and a fresh one per call is a
    fresh mapping whose pages fault in on first touch -- as costly as the arithmetic itself.
    """

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def buffer(self, name: str, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised buffer of `like`'s shape [B, V] and device, in `dtype`, reused across calls."""
        rows, cols = like.shape
        buf = self._buffers.get(name)
        if buf is None or buf.dtype != dtype or buf.device != like.device or buf.shape[1] != cols \
                or buf.shape[0] < rows:
            grown = rows if buf is None or buf.shape[1] != cols else max(rows, buf.shape[0])
            buf = torch.empty((grown, cols), dtype=dtype, device=like.device)
            self._buffers[name] = buf
        return buf[:rows]


def nucleus_pools(
    logits: torch.Tensor,
    *,
    top_p: float,
    top_k: int | None,
    temperature: float,
    head: int = DEFAULT_HEAD,
    head_min_prob: float | None = None,
    with_entropy: bool = False,
    workspace: PoolWorkspace | None = None,
) -> NucleusPools:
    """Pools for a batch of next-token logits [B, V].

    The nucleus is the smallest prefix of the sorted distribution whose mass reaches `top_p`
    (at least one token), then capped at `top_k` tokens. The head holds at least the first
    `head` tokens of each pool and, with `head_min_prob`, every pool token with
    `p >= head_min_prob` plus one more (TokenAccept passes its SKAM `p_t`: a candidate past that
    can never be reached, because a reject needs the mean p left to exceed p_t). With `top_k`
    the head is the whole pool. Pass a `workspace` when calling every step (see `PoolWorkspace`).
    `with_entropy=True` adds each row's entropy `-sum_v p(v) ln p(v)` (nats) of the same full-vocabulary
    `p` (TokenAccept's entropy gate), one batched pass over the probabilities already computed.
    """
    vocab = logits.shape[-1]
    ws = workspace if workspace is not None else PoolWorkspace()
    no_sync = sync_free(logits.device)
    probs = _softmax64(logits, temperature, ws)
    limit = vocab if top_k is None else min(top_k, vocab)
    width = limit if top_k is not None else min(max(head, 1), vocab)
    if no_sync and top_k is None:
        width = static_head_width(head, head_min_prob, limit)
    head_p, head_ids = _sorted_head(probs, width)
    if head_min_prob is not None and width < limit and not no_sync:
        # Widen until the head's last token is below head_min_prob (rare: needs many likely tokens).
        # The margin keeps float rounding of the SKAM sum from reaching one token past the head.
        while width < limit and bool((head_p[:, -1] >= head_min_prob * (1 - 1e-9)).any()):
            width = min(limit, 4 * width)
            head_p, head_ids = _sorted_head(probs, width)
    size, mass = _size_and_mass(logits, probs, head_p, head_ids, top_p, limit, temperature, ws)
    keep = torch.arange(width, device=probs.device)[None, :] < size[:, None]
    head_p, head_ids = head_p * keep, head_ids.masked_fill(~keep, -1)
    # suffix_mass[r] = the head's mass from rank r on + the mass of the pool past the head (0 when
    # the head is the whole pool, so that such pools are bit for bit the full sort's).
    tail = torch.where(size > width, (mass - head_p.sum(-1)).clamp_min(0.0), torch.zeros_like(mass))
    suffix = torch.cat([head_p.flip(-1).cumsum(-1).flip(-1), head_p.new_zeros(head_p.shape[0], 1)], -1)
    entropy = _entropy(probs, ws) if with_entropy else None
    return NucleusPools(head_ids, head_p, size, suffix + tail[:, None], entropy)


def _entropy(probs: torch.Tensor, ws: PoolWorkspace) -> torch.Tensor:
    """Each row's entropy in nats; `entr` (-x ln x, 0 at x = 0) keeps tokens of probability 0 (a -inf
    logit, an underflow) at 0 where p * log p would give NaN."""
    return torch.special.entr(probs, out=ws.buffer("entropy", probs, torch.float64)).sum(-1)


def _size_and_mass(
    logits: torch.Tensor, probs: torch.Tensor, head_p: torch.Tensor, head_ids: torch.Tensor, top_p: float,
    limit: int, temperature: float, ws: PoolWorkspace,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's pool size |T| and mass: from the head where the nucleus ends inside it (the same
    cumsum as a full sort's prefix), else from the histogram (or the whole vocabulary at top_p=1)."""
    width = head_p.shape[1]
    mass_before = head_p.cumsum(-1) - head_p
    inside = (mass_before < top_p).sum(-1)
    size = torch.full_like(inside, limit) if top_p >= 1.0 else inside.clamp(1, limit)
    mass = head_p.sum(-1)  # the pool's mass where the head holds the whole pool
    # Rows whose nucleus runs past the head (only without top_k, which puts the pool in the head).
    longer = (size >= width) & (width < limit)
    if top_p >= 1.0:
        return size, torch.where(longer, probs.sum(-1), mass)
    if sync_free(probs.device):  # every row through the histogram, kept where the nucleus is longer
        top_logit = logits.gather(1, head_ids[:, :1]).squeeze(1)
        row_size, row_mass = _nucleus_by_histogram(logits, probs, top_logit, top_p, temperature, ws)
        return torch.where(longer, row_size, size), torch.where(longer, row_mass, mass)
    if bool(longer.any()):
        rows = longer.nonzero().squeeze(1)
        every = rows.numel() == probs.shape[0]  # skip the copy when every row needs it (a flat LM)
        top_logit = logits.gather(1, head_ids[:, :1]).squeeze(1)  # the head's first token has the top logit
        row_size, row_mass = _nucleus_by_histogram(logits if every else logits[rows], probs if every else probs[rows],
                                                   top_logit if every else top_logit[rows], top_p, temperature, ws)
        size, mass = size.index_put((rows,), row_size), mass.index_put((rows,), row_mass)
    return size, mass


def _softmax64(logits: torch.Tensor, temperature: float, ws: PoolWorkspace) -> torch.Tensor:
    """softmax(logits / temperature) in float64 (so sums over large vocabularies do not wobble the
    nucleus edge), bit for bit `torch.softmax(logits.double() / temperature, -1)`, in reused buffers."""
    scaled = ws.buffer("scaled", logits, torch.float64).copy_(logits)
    if temperature != 1.0:
        scaled.div_(temperature)
    return torch.ops.aten._softmax.out(scaled, -1, False, out=ws.buffer("probs", logits, torch.float64))


def top_k_by_id(values: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The `k` largest entries of each row of `values` [B, V] and their ids, by descending value,
    ties by lower id: `torch.sort(values, descending=True, stable=True)[:, :k]` without the full sort.

    Why not `torch.topk`: it orders ties arbitrarily (differently on CPU and CUDA, and between
    CUDA kernels), and bf16 logits tie often (8 significant bits: at a 128k vocabulary ~40% of
    rows tie at rank 32/33), so candidate order -- and with it the actions an agent's slots
    mean -- would change from run to run and device to device. A tie at the k-th place is settled
    by id too (the lowest ids of the tie get in).
    """
    if not 1 <= k <= values.shape[-1]:
        raise ValueError(f"k={k} must lie in 1..{values.shape[-1]} (the row length).")
    return _sorted_head(values, k)


def _sorted_head(probs: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The `width` most probable tokens of each row, by descending p, ties by lower id.

    `topk` orders ties arbitrarily, so the head is re-sorted by (p desc, id asc); a tie that
    straddles the head's edge (its last value also sits outside it) is settled per row.
    """
    vocab = probs.shape[-1]
    p, ids = torch.topk(probs, min(width + 1, vocab), dim=-1)  # sorted: only ties can be out of order
    if sync_free(probs.device) or bool((p[:, 1:] == p[:, :-1]).any()):  # on the CPU, re-sort only ties
        by_id = ids.argsort(-1)
        p, ids = p.gather(1, by_id), ids.gather(1, by_id)
        order = torch.sort(p, dim=-1, descending=True, stable=True).indices
        p, ids = p.gather(1, order), ids.gather(1, order)
    if width < vocab and sync_free(probs.device):
        ids = _settle_edge_ties(probs, p, ids, width)
    elif width < vocab:
        for row in (p[:, width] == p[:, width - 1]).nonzero().squeeze(1).tolist():
            ids[row] = _settle_edge_tie(probs[row], p[row], ids[row], width)
    return p[:, :width], ids[:, :width]


def _settle_edge_ties(probs: torch.Tensor, head_p: torch.Tensor, head_ids: torch.Tensor, width: int) -> torch.Tensor:
    """`_settle_edge_tie` for every row at once, with static shapes (the sync-free path): in rows
    whose head edge ties with tokens outside it, the tied slots take the lowest ids of the tie."""
    edge = head_p[:, width - 1 : width]
    tie = (head_p[:, width : width + 1] == edge).squeeze(1)
    above = (head_p[:, :width] > edge).sum(1, keepdim=True)
    tied = probs == edge  # [B, V]
    rank = tied.cumsum(1, dtype=torch.int32) - 1  # each tied token's place among the row's tied, by id
    take = tied & (rank < width - above)
    slot = torch.where(take, above + rank, width).long()  # slot `width` collects what is not taken
    settled = torch.cat([head_ids[:, :width], head_ids.new_zeros(head_ids.shape[0], 1)], 1)
    vocab_ids = torch.arange(probs.shape[1], device=probs.device).expand_as(tied)
    settled = settled.scatter(1, slot, vocab_ids)  # ids not taken all land in the dropped last column
    return torch.where(tie[:, None], settled[:, :width], head_ids[:, :width])


def _settle_edge_tie(probs: torch.Tensor, head_p: torch.Tensor, head_ids: torch.Tensor, width: int) -> torch.Tensor:
    """Ids of a head whose last value ties with tokens outside it: the lowest ids of the tie win."""
    edge = head_p[width - 1]
    above = int((head_p[:width] > edge).sum())
    tied = (probs == edge).nonzero().squeeze(1)  # ascending ids
    out = head_ids.clone()
    out[above:width] = tied[: width - above]
    return out


def _nucleus_by_histogram(
    logits: torch.Tensor, probs: torch.Tensor, top_logit: torch.Tensor, top_p: float, temperature: float,
    ws: PoolWorkspace, bins: int = HISTOGRAM_BINS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nucleus size and mass of each row [B, V] without sorting the row.

    Bins split each row's logit range [max(lowest, top - MAX_SPREAD * temperature), top] evenly, bin
    0 holding the largest logits; lower logits (p below e^-64 of the top's, -inf included) share the
    last bin.
    The map logit -> bin is monotone, so a bin's tokens are all at least as probable as the next
    bin's: the nucleus is every bin before the boundary bin (the first whose cumulative mass
    reaches top_p) plus a sorted prefix of the boundary bin, the only tokens that get sorted.

    On the CPU the comparisons and the boundary bin's members go through numpy views of the same
    buffers (no copy): its boolean reductions and `flatnonzero` are several times faster than torch's
    single-threaded ones over [B, V], and this is most of the pools' cost on a flat distribution.
    """
    n = probs.shape[0]
    # Each row's bins span its own logit range, capped at MAX_SPREAD: a flat row (a random LM) then
    # spreads its tokens over all bins instead of a few, and its boundary bin stays small.
    low = logits.amin(-1).clamp_min(top_logit - MAX_SPREAD * temperature)
    scale = ((bins - 1) / (top_logit - low).clamp_min(1e-6 * temperature))[:, None]
    # top * scale - logit * scale: monotone in the logit whatever the rounding, so bins keep the order.
    real = torch.addcmul(top_logit[:, None] * scale, logits, -scale,
                         out=ws.buffer("bin_real", logits, logits.dtype)).clamp_(0, bins - 1)
    index = ws.buffer("bin", logits, torch.int32).copy_(real)  # truncates: floor of values >= 0
    index.clamp_(0, bins - 1)  # a NaN logit (raised on later, from the step's finite flags) must not index out
    offsets = bins * torch.arange(n, device=probs.device, dtype=torch.int32)[:, None]
    flat = torch.add(index, offsets, out=ws.buffer("bin_flat", logits, torch.int32))
    on_host = not sync_free(probs.device)
    if on_host:
        bin_mass = torch.bincount(flat.view(-1), weights=probs.reshape(-1), minlength=n * bins)
    else:  # bincount reads its input's max on the host; scatter_add does not
        bin_mass = probs.new_zeros(n * bins).scatter_add_(0, flat.view(-1).long(), probs.reshape(-1))
    bin_mass = bin_mass.view(n, bins)
    mass_through = bin_mass.cumsum(-1)
    edge = (mass_through < top_p).sum(-1).clamp(max=bins - 1)  # the boundary bin of each row
    mass_above = (mass_through.gather(1, edge[:, None]) - bin_mass.gather(1, edge[:, None])).squeeze(1)
    if on_host:
        count_above, edge_p, in_edge = _edge_bin_on_host(probs, index, edge)
    else:
        edge_i32 = edge.to(torch.int32)[:, None]
        mask = ws.buffer("bin_mask", logits, torch.bool)
        count_above = torch.lt(index, edge_i32, out=mask).sum(-1, dtype=torch.int32).long()  # int32: no int64 copy
        members = torch.eq(index, edge_i32, out=mask)
        # A masked sort of the whole row: static shapes, no host read.
        edge_p, in_edge = probs.where(members, 0.0).sort(-1, descending=True).values, members.sum(-1)
    valid = torch.arange(edge_p.shape[1], device=probs.device)[None, :] < in_edge[:, None]
    before = mass_above[:, None] + edge_p.cumsum(-1) - edge_p
    taken = (before < top_p) & valid
    size = (count_above + taken.sum(-1)).clamp_min(1)
    mass = mass_above + (edge_p * taken).sum(-1)
    return size, mass


def _edge_bin_on_host(
    probs: torch.Tensor, index: torch.Tensor, edge: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CPU tensors only: per row, the tokens in bins before `edge` (a count), and the probabilities of
    the tokens in bin `edge`, descending, zero-padded [B, m], with how many each row has."""
    n, vocab = probs.shape
    bins_np, edge_np = index.numpy(), edge.numpy().astype(np.int32)[:, None]
    count_above = torch.from_numpy(np.count_nonzero(bins_np < edge_np, axis=1).astype(np.int64))
    where = np.flatnonzero(bins_np == edge_np)  # row-major: by row, then token
    rows = where // vocab
    count = np.bincount(rows, minlength=n)
    slot = np.arange(where.size) - (np.cumsum(count) - count)[rows]
    packed = np.zeros((n, max(int(count.max()), 1)))
    packed[rows, slot] = probs.numpy().reshape(-1)[where]
    return count_above, torch.from_numpy(packed).sort(-1, descending=True).values, torch.from_numpy(count)


def reference_pool(logits: torch.Tensor, *, top_p: float, top_k: int | None, temperature: float) -> Pool:
    """The brute-force pool of one row [V]: a full stable sort (the definition; for tests)."""
    probs = torch.softmax(logits.to(torch.float64) / temperature, dim=-1)
    sorted_p, sorted_ids = torch.sort(probs, descending=True, stable=True)
    mass_before = sorted_p.cumsum(-1) - sorted_p
    limit = probs.shape[-1] if top_k is None else min(top_k, probs.shape[-1])
    size = limit if top_p >= 1.0 else int((mass_before < top_p).sum().clamp(1, limit))
    return Pool.from_sorted(sorted_ids[:size].tolist(), sorted_p[:size].tolist())
