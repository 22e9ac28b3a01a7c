"""Dispatch: cut one self-attention sequence into chunks and give each context-parallel rank its share.

The sequence ``[0, S)`` is cut into chunks of ``chunk`` tokens (a multiple of the tile size; the
last chunk may be shorter). A chunk's cost is exact: the number of allowed (query, key) pairs of its
query rows (``prefix_area`` differences, O(slices + chunks)) plus a small per-token overhead
``token_cost * tokens`` (loading Q, writing O and lse, the other layers' per-token work).
Every rank gets ``n // cp`` or ``n // cp + 1`` chunks, so token counts differ by less than two chunks
(one extra chunk, plus the short last one);
q, k and v follow the same assignment.

The solver builds a few candidate assignments (contiguous, zigzag, LPT), repairs each with a
swap local search that lowers the most loaded rank while preferring swaps that keep a rank's chunks
adjacent, and keeps -- among the candidates whose imbalance is within ``balance_tol`` of perfect
(or of the best reached) -- the one whose ranks receive the fewest remote key/value tokens.

Geometry helpers shared with `maskc.comm` live here too: `cut_bands` (bands cut at row
boundaries) and `band_prefix` (a band's exact area left of a column, element-wise).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from functools import cached_property
from typing import Callable

import numpy as np

from . import normalize as nz
from .errors import MaskError
from .kinds import as_int

CHUNKS_PER_RANK = 8  # default: at least this many chunks per rank (balance needs freedom)
MAX_CHUNK_TILES = 64  # default chunk is at most this many tiles (8192 tokens at block 128)
MAX_CHUNKS = 1 << 16  # default chunk grows past MAX_CHUNK_TILES rather than exceed this many chunks
METHODS = ("contiguous", "zigzag", "lpt")

_BIG = np.int64(1) << 62


# ---- geometry ------------------------------------------------------------------------------


def tight_bands(mask) -> np.ndarray:
    """The mask's bands with every row non-empty and inside the domain (canonical bands already are)."""
    return nz.trim_bands(mask.bands, mask.sq, mask.sk)


def cut_bands(bands: np.ndarray, bounds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cut bands at the row boundaries ``bounds`` (sorted, strictly increasing).

    Returns ``(pieces (m, 6), seg (m,))``: piece p is band rows clipped to segment
    ``[bounds[seg[p]], bounds[seg[p] + 1])``; rows outside ``[bounds[0], bounds[-1])`` and empty
    intersections are dropped. O(pieces).
    """
    bands = np.asarray(bands, dtype=np.int64).reshape(-1, 6)
    bounds = np.asarray(bounds, dtype=np.int64)
    if bands.shape[0] == 0 or bounds.size < 2:
        return np.zeros((0, 6), dtype=np.int64), np.zeros(0, dtype=np.int64)
    nseg = bounds.size - 1
    first = np.maximum(np.searchsorted(bounds, bands[:, 0], side="right") - 1, 0)
    last = np.minimum(np.searchsorted(bounds, bands[:, 1] - 1, side="right") - 1, nseg - 1)
    count = np.maximum(last - first + 1, 0)
    idx = np.repeat(np.arange(bands.shape[0]), count)
    seg = np.repeat(first, count) + _ramp(count)
    pieces = bands[idx].copy()
    pieces[:, 0] = np.maximum(pieces[:, 0], bounds[seg])
    pieces[:, 1] = np.minimum(pieces[:, 1], bounds[seg + 1])
    keep = pieces[:, 1] > pieces[:, 0]
    return pieces[keep], seg[keep]


def band_prefix(bands: np.ndarray, C) -> np.ndarray:
    """Element-wise exact area of tight band t left of column ``C[t]``: sum over its rows of
    ``|[a(i), b(i)) & [0, C)|``. ``C`` has shape ``(m,)`` or ``(m, k)`` (band axis first)."""
    C = np.asarray(C, dtype=np.int64)
    shape = (-1,) + (1,) * (C.ndim - 1)
    r0, r1, ac, a_s, bc, b_s = (bands[:, c].reshape(shape) for c in range(6))
    # rows i < p have b(i) <= C: they count their full width
    p = np.where(b_s == 1, C - bc + 1, np.where(bc <= C, _BIG, -_BIG))
    full = nz._linear_sum(r0, np.minimum(r1, p), bc - ac, b_s - a_s)
    # rows i >= p count C - a(i) while that is positive
    q = np.where(a_s == 1, C - ac, np.where(C - ac > 0, _BIG, -_BIG))
    cut = nz._linear_sum(np.maximum(r0, p), np.minimum(r1, q), C - ac, -a_s)
    return full + cut


def key_extent(pieces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Keys attended by the rows of each tight piece: one interval ``[lo, hi)`` (exact: both ends
    of a band row are non-decreasing lines of slope 0 or 1, so consecutive rows' intervals touch)."""
    lo = pieces[:, 2] + pieces[:, 3] * pieces[:, 0]
    hi = pieces[:, 4] + pieces[:, 5] * (pieces[:, 1] - 1)
    return lo, hi


def _ramp(count: np.ndarray) -> np.ndarray:
    """``concat([arange(c) for c in count])``, vectorised."""
    count = np.asarray(count, dtype=np.int64)
    total = int(count.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    starts = np.cumsum(count) - count
    return np.arange(total, dtype=np.int64) - np.repeat(starts, count)


def merge_intervals(group: np.ndarray, lo: np.ndarray, hi: np.ndarray, span: int):
    """Union of intervals ``[lo, hi)`` within each group (group ids >= 0, positions in [0, span]).

    Returns ``(group, start, end)`` of the disjoint, non-touching merged intervals, sorted by
    (group, start). Vectorised: intervals of group g live at ``g * (span + 1) + pos`` so one
    running maximum merges every group at once without ever joining two groups.
    """
    keep = hi > lo
    group, lo, hi = group[keep], lo[keep], hi[keep]
    if lo.size == 0:
        z = np.zeros(0, dtype=np.int64)
        return z, z.copy(), z.copy()
    w = np.int64(span + 1)
    a = group * w + lo
    b = group * w + hi
    order = np.argsort(a, kind="stable")
    a, b = a[order], b[order]
    reach = np.maximum.accumulate(b)
    new = np.ones(a.size, dtype=bool)
    new[1:] = a[1:] > reach[:-1]
    starts = a[new]
    ends = np.maximum.reduceat(b, np.flatnonzero(new))
    g = starts // w
    return g, starts - g * w, ends - g * w


# ---- chunks and costs ----------------------------------------------------------------------


def default_chunk(seq_len: int, cp_size: int, block: int) -> int:
    """At least `CHUNKS_PER_RANK` chunks per rank, at most `MAX_CHUNK_TILES` tiles a chunk (unless
    that would make more than `MAX_CHUNKS` chunks), at least one tile; among sizes down to half of
    that, the largest whose chunk count is a multiple of cp (equal chunk counts per rank, so even
    a uniform mask can balance)."""
    tiles = seq_len // (CHUNKS_PER_RANK * cp_size * block)
    tiles = min(max(tiles, 1), MAX_CHUNK_TILES)
    tiles = max(tiles, -(-seq_len // (MAX_CHUNKS * block)))
    for t in range(tiles, max(tiles // 2, 1) - 1, -1):
        n = -(-seq_len // (t * block))
        if n % cp_size == 0:
            return block * t
    return block * tiles


def finer_chunk(seq_len: int, cp_size: int, block: int, chunk: int) -> int | None:
    """The next default chunk when ``chunk`` cannot balance: about half of it (a multiple of
    ``block``, preferring a chunk count that is a multiple of cp); None at one tile."""
    tiles = chunk // block
    if tiles <= 1:
        return None
    half = tiles // 2
    for t in range(half, max(half // 2, 1) - 1, -1):
        if (-(-seq_len // (t * block))) % cp_size == 0:
            return block * t
    return block * half


def chunk_bounds(seq_len: int, chunk: int) -> np.ndarray:
    """``[0, chunk, 2*chunk, ..., seq_len]``: n + 1 boundaries of n chunks (the last may be short)."""
    b = np.arange(0, seq_len, chunk, dtype=np.int64)
    return np.append(b, np.int64(seq_len)) if seq_len else np.zeros(1, dtype=np.int64)


def chunk_areas(bands: np.ndarray, bounds: np.ndarray, sk: int) -> np.ndarray:
    """Exact allowed pairs of each chunk's query rows (int64, one per chunk), O(pieces)."""
    return chunk_profile(bands, bounds, sk)[0]


def chunk_profile(bands: np.ndarray, bounds: np.ndarray, sk: int):
    """Per chunk: ``(area, key_lo, key_hi)``: exact allowed pairs of its query rows and the span
    ``[key_lo, key_hi)`` of the keys they attend (``[sk, 0)`` for a chunk that attends nothing)."""
    n = max(bounds.size - 1, 0)
    area = np.zeros(n, dtype=np.int64)
    lo_min = np.full(n, sk, dtype=np.int64)
    hi_max = np.zeros(n, dtype=np.int64)
    pieces, seg = cut_bands(bands, bounds)
    if pieces.shape[0]:
        np.add.at(area, seg, band_prefix(pieces, np.full(pieces.shape[0], sk, dtype=np.int64)))
        lo, hi = key_extent(pieces)
        np.minimum.at(lo_min, seg, lo)
        np.maximum.at(hi_max, seg, hi)
    return area, lo_min, hi_max


def components(bounds: np.ndarray, key_lo: np.ndarray, key_hi: np.ndarray) -> np.ndarray:
    """Component id per chunk: the sequence cut before chunk b wherever no query before it attends
    a key from b on and no query from b on attends a key before it (documents, videos)."""
    n = key_lo.size
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    reach = np.maximum.accumulate(key_hi)  # furthest key attended by chunks <= i
    back = np.minimum.accumulate(key_lo[::-1])[::-1]  # earliest key attended by chunks >= i
    cut = np.zeros(n, dtype=bool)
    cut[1:] = (reach[:-1] <= bounds[1:n]) & (back[1:] >= bounds[1:n])
    return np.cumsum(cut)


def rank_counts(n_chunks: int, cp_size: int) -> np.ndarray:
    """Chunks per rank: ``n // cp`` each, one more for the first ``n % cp`` ranks."""
    base, extra = divmod(n_chunks, cp_size)
    return np.full(cp_size, base, dtype=np.int64) + (np.arange(cp_size) < extra)


# ---- candidate assignments ------------------------------------------------------------------


def assign_contiguous(cost: np.ndarray, counts: np.ndarray, comp=None) -> np.ndarray:
    """Rank r takes the next ``counts[r]`` chunks in order: fewest runs, balanced only for uniform masks."""
    return np.repeat(np.arange(counts.size, dtype=np.int64), counts)


def assign_zigzag(cost: np.ndarray, counts: np.ndarray, comp: np.ndarray | None = None) -> np.ndarray:
    """Zigzag within each component (document, video; the whole sequence when there is one):
    the component's chunks are taken alternately from its front and its back, and ranks take
    consecutive runs of that order. A rank inside a long component holds one run near its start
    and one near its end (balanced for causal-like cost growth, two runs per rank); components
    shorter than two ranks' share keep their order."""
    n = int(counts.sum())
    order = np.arange(n, dtype=np.int64)
    if comp is None:
        comp = np.zeros(n, dtype=np.int64)
    starts = np.flatnonzero(np.diff(comp, prepend=-1))
    ends = np.append(starts[1:], n)
    per_rank = n / max(counts.size, 1)
    for a, b in zip(starts.tolist(), ends.tolist()):
        m = b - a
        if m >= 2 * per_rank or starts.size == 1:
            front = np.arange(a, a + (m + 1) // 2)
            back = np.arange(b - 1, a + (m + 1) // 2 - 1, -1)
            alt = np.empty(m, dtype=np.int64)
            alt[0::2] = front
            alt[1::2] = back
            order[a:b] = alt
    owner = np.empty(n, dtype=np.int64)
    owner[order] = np.repeat(np.arange(counts.size, dtype=np.int64), counts)
    return owner


def assign_lpt(cost: np.ndarray, counts: np.ndarray, comp=None) -> np.ndarray:
    """Longest processing time first with capacities: each chunk, heaviest first, goes to the least
    loaded rank that still has room (ties: the rank holding a neighbouring chunk, then lowest rank)."""
    n = cost.size
    owner = np.full(n, -1, dtype=np.int64)
    room = counts.copy()
    heap = [(0, r) for r in range(counts.size) if room[r] > 0]
    heapq.heapify(heap)
    order = np.argsort(-cost, kind="stable")
    for i, c in zip(order.tolist(), cost[order].tolist()):
        load, r = heapq.heappop(heap)
        owner[i] = r
        room[r] -= 1
        if room[r] > 0:
            heapq.heappush(heap, (load + c, r))
    return owner


_BUILDERS = {"contiguous": assign_contiguous, "zigzag": assign_zigzag, "lpt": assign_lpt}


def loads(cost: np.ndarray, owner: np.ndarray, cp_size: int) -> np.ndarray:
    out = np.zeros(cp_size, dtype=np.int64)
    np.add.at(out, owner, cost)
    return out


def imbalance_of(rank_cost: np.ndarray) -> float:
    """max / mean rank cost; 1.0 when there is no work at all."""
    mean = float(rank_cost.mean()) if rank_cost.size else 0.0
    return float(rank_cost.max()) / mean if mean > 0 else 1.0


def improve(cost: np.ndarray, owner: np.ndarray, cp_size: int, *, target: float, max_iter: int | None = None) -> np.ndarray:
    """Swap local search: while the most loaded rank M is above ``target * mean``, swap one chunk of M
    with one chunk of another rank so that the larger of the two new loads is as small as possible.

    Partners are the 16 least loaded ranks. Among swaps within a quarter of the best improvement,
    prefer the one that keeps most chunks next to chunks of their (new) rank (fewer runs, so fewer
    remote key/value bytes). Swaps keep every rank's chunk count. Each step is
    O(chunks per rank x 16 chunks per rank) in numpy.
    """
    owner = owner.copy()
    n = owner.size
    if cp_size < 2 or n < 2:
        return owner
    w = cost.astype(np.float64)
    load = np.zeros(cp_size)
    np.add.at(load, owner, w)
    mean = load.mean()
    if mean <= 0:
        return owner
    idx = np.arange(n)
    max_iter = 4 * n if max_iter is None else max_iter
    partners = min(cp_size, 16) + 1
    for _ in range(max_iter):
        m = int(np.argmax(load))
        if load[m] <= target * mean:
            break
        a = np.flatnonzero(owner == m)
        # partners: the lightest ranks (where a swap helps most); keeps a step O(chunks per rank^2)
        light = np.argsort(load)[:partners]
        light = light[light != m]
        b = np.flatnonzero(np.isin(owner, light))
        if a.size == 0 or b.size == 0:
            break
        wa = w[a][:, None]
        wb = w[b][None, :]
        ob = owner[b][None, :]
        new_m = load[m] - wa + wb
        new_o = load[ob] - wb + wa
        peak = np.maximum(new_m, new_o)
        best = peak.min()
        gain = load[m] - best
        if gain <= 1e-9 * mean:
            break
        ok = peak <= best + 0.25 * gain
        adj = _adjacency_gain(owner, a, b, m, idx)
        score = np.where(ok, adj, -np.inf)
        # most adjacency first, then the lowest peak
        flat = np.lexsort((peak.ravel(), -score.ravel()))[0]
        i, j = divmod(int(flat), b.size)
        ca, cb = int(a[i]), int(b[j])
        o = int(owner[cb])
        load[m] += w[cb] - w[ca]
        load[o] += w[ca] - w[cb]
        owner[ca], owner[cb] = o, m
    return owner


def _adjacency_gain(owner: np.ndarray, a: np.ndarray, b: np.ndarray, m: int, idx: np.ndarray) -> np.ndarray:
    """For swapping chunk a (rank m) with chunk b (its rank o): neighbours matching the new owner
    minus neighbours matching the old one, over both chunks; shape (a, b)."""
    pad = np.concatenate([[-1], owner, [-1]])

    def nb(x, r):  # neighbours of chunks x equal to rank(s) r
        return (pad[x] == r).astype(np.int64) + (pad[x + 2] == r).astype(np.int64)

    o = owner[b]
    a_new = (pad[a][:, None] == o[None, :]).astype(np.int64) + (pad[a + 2][:, None] == o[None, :])
    a_old = nb(a, m)[:, None]
    b_new = nb(b, m)[None, :]
    b_old = (pad[b] == o).astype(np.int64) + (pad[b + 2] == o)
    # a chunk adjacent to its swap partner: each becomes the other's neighbour in the new owner
    touching = np.abs(a[:, None] - b[None, :]) == 1
    return (a_new - a_old) + (b_new - b_old[None, :]) - 2 * touching.astype(np.int64)


# ---- the solver ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    method: str
    owner: np.ndarray
    imbalance: float
    remote_tokens: int | None


def solve(
    cost: np.ndarray,
    cp_size: int,
    *,
    balance_tol: float = 0.01,
    remote_tokens: Callable[[np.ndarray], int] | None = None,
    methods=METHODS,
    comp: np.ndarray | None = None,
) -> tuple[Candidate, list[Candidate]]:
    """Assign chunks to ranks. Returns ``(chosen, all candidates)``.

    Balance first: keep the candidates whose imbalance is at most ``max(best, 1 + balance_tol)``;
    then fewest ``remote_tokens(owner)`` (remote key/value tokens over all ranks), then lowest
    imbalance, then the order of ``methods``.
    """
    cost = np.asarray(cost, dtype=np.int64)
    counts = rank_counts(cost.size, cp_size)
    cands = []
    for name in methods:
        owner = _BUILDERS[name](cost, counts, comp)
        owner = improve(cost, owner, cp_size, target=1.0 + balance_tol / 2)
        imb = imbalance_of(loads(cost, owner, cp_size))
        cands.append(Candidate(name, owner, imb, None))
    best = min(c.imbalance for c in cands)
    limit = max(best * (1 + 1e-12), 1.0 + balance_tol)
    ok = [c for c in cands if c.imbalance <= limit]
    if remote_tokens is not None and len(ok) > 1:
        ok = [Candidate(c.method, c.owner, c.imbalance, int(remote_tokens(c.owner))) for c in ok]
        cands = [next((o for o in ok if o.method == c.method), c) for c in cands]
        chosen = min(ok, key=lambda c: (c.remote_tokens, c.imbalance))
    else:
        chosen = min(ok, key=lambda c: c.imbalance)
    return chosen, cands


# ---- the result ----------------------------------------------------------------------------


def _ro(a, dtype=np.int64) -> np.ndarray:
    a = np.array(a, dtype=dtype)
    a.flags.writeable = False
    return a


@dataclass(frozen=True, eq=False)
class Dispatch:
    """Which rank holds which chunk of the sequence (queries, keys and values alike).

    ``chunk_rank[c]`` owns tokens ``[c * chunk, min((c + 1) * chunk, seq_len))``. A rank's local
    tokens are its chunks in increasing global order (`positions`).
    """

    seq_len: int
    chunk: int
    cp_size: int
    token_cost: int
    chunk_rank: np.ndarray
    chunk_area: np.ndarray
    method: str = "contiguous"

    @property
    def n_chunks(self) -> int:
        return int(self.chunk_rank.size)

    @cached_property
    def bounds(self) -> np.ndarray:
        return _ro(chunk_bounds(self.seq_len, self.chunk))

    @cached_property
    def chunk_tokens(self) -> np.ndarray:
        return _ro(np.diff(self.bounds))

    @cached_property
    def chunk_cost(self) -> np.ndarray:
        return _ro(self.chunk_area + self.token_cost * self.chunk_tokens)

    @cached_property
    def rank_cost(self) -> np.ndarray:
        """Per rank: allowed pairs of its queries + ``token_cost`` x its tokens."""
        return _ro(loads(self.chunk_cost, self.chunk_rank, self.cp_size))

    @cached_property
    def rank_area(self) -> np.ndarray:
        """Per rank: exact allowed pairs of its query rows."""
        return _ro(loads(self.chunk_area, self.chunk_rank, self.cp_size))

    @cached_property
    def rank_tokens(self) -> np.ndarray:
        return _ro(loads(self.chunk_tokens, self.chunk_rank, self.cp_size))

    @property
    def imbalance(self) -> float:
        """max / mean of `rank_cost`."""
        return imbalance_of(self.rank_cost)

    @property
    def area_imbalance(self) -> float:
        """max / mean of `rank_area` (attention pairs only, no per-token term)."""
        return imbalance_of(self.rank_area)

    @cached_property
    def runs(self) -> np.ndarray:
        """(m, 3) ``[start, end, rank]``: maximal runs of consecutive chunks with one owner, in order."""
        n = self.n_chunks
        if n == 0:
            return _ro(np.zeros((0, 3)))
        change = np.ones(n, dtype=bool)
        change[1:] = self.chunk_rank[1:] != self.chunk_rank[:-1]
        first = np.flatnonzero(change)
        last_end = np.append(first[1:], n)
        b = self.bounds
        return _ro(np.stack([b[first], b[last_end], self.chunk_rank[first]], axis=1))

    def rank_runs(self, rank: int) -> np.ndarray:
        """(k, 2) ``[start, end)`` global runs of `rank`'s tokens, in increasing order."""
        rank = self._check_rank(rank)
        r = self.runs
        return r[r[:, 2] == rank][:, :2]

    def positions(self, rank: int) -> np.ndarray:
        """Global positions of `rank`'s local tokens, in local order (int64, increasing)."""
        runs = self.rank_runs(rank)
        lens = runs[:, 1] - runs[:, 0]
        return _ro(np.repeat(runs[:, 0], lens) + _ramp(lens))

    def owner_of(self, pos) -> np.ndarray:
        """Rank holding each global position."""
        pos = np.asarray(pos, dtype=np.int64)
        return self.chunk_rank[pos // self.chunk]

    def local_index(self, rank: int, pos) -> np.ndarray:
        """Local row of global positions `pos` (all held by `rank`)."""
        runs = self.rank_runs(rank)
        pos = np.asarray(pos, dtype=np.int64)
        lens = runs[:, 1] - runs[:, 0]
        offs = np.cumsum(lens) - lens
        k = np.searchsorted(runs[:, 0], pos, side="right") - 1
        return offs[k] + pos - runs[k, 0]

    def _check_rank(self, rank) -> int:
        rank = as_int(rank, "rank")
        if not 0 <= rank < self.cp_size:
            raise MaskError(f"rank must lie in [0, {self.cp_size}), got {rank}")
        return rank

    def to_dict(self) -> dict:
        return {
            "seq_len": self.seq_len,
            "chunk": self.chunk,
            "cp_size": self.cp_size,
            "token_cost": self.token_cost,
            "method": self.method,
            "chunk_rank": self.chunk_rank.tolist(),
            "chunk_area": self.chunk_area.tolist(),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Dispatch":
        return cls(
            seq_len=int(d["seq_len"]),
            chunk=int(d["chunk"]),
            cp_size=int(d["cp_size"]),
            token_cost=int(d["token_cost"]),
            chunk_rank=_ro(d["chunk_rank"]),
            chunk_area=_ro(d["chunk_area"]),
            method=str(d["method"]),
        )

    def __repr__(self) -> str:
        return (
            f"Dispatch({self.seq_len} tokens, {self.n_chunks} chunks of {self.chunk} on {self.cp_size} "
            f"ranks, {self.method}, imbalance={self.imbalance:.4f}, {self.runs.shape[0]} runs)"
        )


def dispatch(
    mask,
    cp_size: int,
    chunk: int,
    *,
    token_cost: int = 0,
    balance_tol: float = 0.01,
    remote_tokens: Callable[[np.ndarray], int] | None = None,
    methods=METHODS,
) -> Dispatch:
    """Solve the dispatch of a (validated, square) mask; see `solve`."""
    s = mask.sq
    bounds = chunk_bounds(s, chunk)
    area, key_lo, key_hi = chunk_profile(tight_bands(mask), bounds, mask.sk)
    comp = components(bounds, key_lo, key_hi)
    tokens = np.diff(bounds)
    cost = area + token_cost * tokens
    if area.size == 0:
        owner, method = np.zeros(0, dtype=np.int64), "contiguous"
    else:
        chosen, _ = solve(
            cost, cp_size, balance_tol=balance_tol, remote_tokens=remote_tokens, methods=methods, comp=comp
        )
        owner, method = chosen.owner, chosen.method
    return Dispatch(s, chunk, cp_size, token_cost, _ro(owner), _ro(area), method)


__all__ = [
    "Candidate",
    "Dispatch",
    "METHODS",
    "band_prefix",
    "chunk_areas",
    "chunk_bounds",
    "chunk_profile",
    "components",
    "cut_bands",
    "default_chunk",
    "finer_chunk",
    "dispatch",
    "improve",
    "key_extent",
    "merge_intervals",
    "rank_counts",
    "solve",
]
