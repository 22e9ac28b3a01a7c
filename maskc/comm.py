"""Communication schedule: which key/value ranges each rank needs from each other rank, in stages.

Exactness. A rank's query rows are runs of the sequence; cut the mask's bands at those runs and
every piece's rows attend one key interval ``[a(first row), b(last row))`` (both ends of a band row
move by 0 or 1 per row). The union of a rank's intervals, minus the keys it holds, split at the
owners' runs, is exactly the set of remote keys its queries attend: a key is listed iff some query
of the rank attends it, and a range is listed once per receiver (**GroupCast** in all-to-all-v
form: a sender packs each range once for every receiver that needs it, and nothing a receiver does
not need). Per (range, piece) overlap the exact area is summed, so every stage knows its work.

Stages. Stage 0 is the local one (own queries x own keys). The remote ranges of a receiver,
ordered by ring distance ``(dst - src) mod cp`` and then position, are split into ``stages``
groups of about equal tokens; stage i+1's transfer overlaps stage i's compute.

GroupReduce. With ``group_reduce`` on, a pair (dst, src) whose query rows are cheaper to move than
its key/value ranges (``q_rows * q_row_bytes < kv_tokens * kv_token_bytes``) is marked ``mode=1``
(taken by bytes saved while src, who then computes the pair, stays within the most loaded rank's
work; ``group_reduce="bytes"`` takes every such pair):
dst's rows go to src, src computes them against its own keys and sends the partial output and lse
back to be merged (and, backward, the output gradients go to src and dQ comes back). The planner,
the cost model and the runtime (`maskc.runtime.dist`) handle both modes.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from . import normalize as nz
from .dispatch import (
    Dispatch,
    _ramp,
    _ro,
    band_prefix,
    cut_bands,
    key_extent,
    merge_intervals,
    tight_bands,
)
from .errors import MaskError
from .kinds import as_int
from .mask import Mask

# columns of CommSchedule.ranges
DST, SRC, START, END, STAGE, AREA = range(6)
# columns of CommSchedule.pairs
P_DST, P_SRC, P_KV, P_ROWS, P_AREA, P_MODE = range(6)
# columns of CommSchedule.q_ranges
Q_DST, Q_SRC, Q_START, Q_END, Q_STAGE = range(5)

KV, Q = 0, 1  # pair modes: move keys/values to the queries, or queries to the keys (GroupReduce)


# ---- interval arithmetic -----------------------------------------------------------------------


def _overlap(a_grp, a_s, a_e, b_grp, b_s, b_e, span: int) -> np.ndarray:
    """Per interval of B: its overlap with the union of A's intervals of the same group.

    A is disjoint and sorted by (group, start) (as `merge_intervals` returns it)."""
    w = np.int64(span + 1)
    As, Ae = a_grp * w + a_s, a_grp * w + a_e
    ln = Ae - As
    cum = np.concatenate([[0], np.cumsum(ln)])

    def cover(x):  # measure of A left of composite position x
        k = np.searchsorted(As, x, side="right") - 1
        kk = np.maximum(k, 0)
        part = np.minimum(np.maximum(x - As[kk], 0), ln[kk]) if ln.size else np.zeros_like(x)
        return np.where(k >= 0, cum[kk] + part, 0)

    if As.size == 0:
        return np.zeros(b_s.size, dtype=np.int64)
    return cover(b_grp * w + b_e) - cover(b_grp * w + b_s)


def _runs_of(owner: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """(m, 3) [start, end, rank] maximal runs of one owner (as `Dispatch.runs`)."""
    n = owner.size
    change = np.ones(n, dtype=bool)
    change[1:] = owner[1:] != owner[:-1]
    first = np.flatnonzero(change)
    return np.stack([bounds[first], bounds[np.append(first[1:], n)], owner[first]], axis=1)


def remote_tokens_fn(mask: Mask, bounds: np.ndarray):
    """A function ``owner -> total remote key/value tokens`` for chunk assignments ``owner``.

    Exact (the same count the schedule moves with every pair in KV mode); the pieces of the
    mask's bands per chunk are computed once, each evaluation is a few sorts over them.
    """
    span = mask.sk
    pieces, seg = cut_bands(tight_bands(mask), bounds)
    lo, hi = key_extent(pieces)

    def remote_tokens(owner: np.ndarray) -> int:
        g, s, e = merge_intervals(owner[seg], lo, hi, span)
        runs = _runs_of(owner, bounds)
        own = _overlap(g, s, e, runs[:, 2], runs[:, 0], runs[:, 1], span)
        return int((e - s).sum() - own.sum())

    return remote_tokens


# ---- the schedule ------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class CommSchedule:
    """Remote key/value ranges per receiver and stage, with their exact work.

    ``ranges`` (m, 6) int64 ``[dst, src, start, end, stage, area]``: global key positions
    ``[start, end)`` held by ``src`` that ``dst``'s queries attend (``area`` pairs), moved in remote
    ``stage`` (1..stages), sorted by (dst, stage, src, start). ``pairs`` (p, 6) ``[dst, src,
    kv_tokens, q_rows, area, mode]`` sums them per (dst, src); ``q_rows`` counts dst's query rows
    that attend src's keys; ``mode`` is 0 (move keys/values) or 1 (move queries: GroupReduce).
    ``q_ranges`` (r, 5) ``[dst, src, start, end, stage]``: the query rows moved for mode-1 pairs.
    ``local_area`` (cp,): each rank's own queries x own keys.
    """

    cp_size: int
    stages: int
    seq_len: int
    ranges: np.ndarray
    pairs: np.ndarray
    q_ranges: np.ndarray
    local_area: np.ndarray

    # ---- per rank totals ------------------------------------------------------------------------

    def _kv_rows(self) -> np.ndarray:
        r = self.ranges
        if not r.shape[0]:
            return r
        mode = self._range_mode
        return r[mode == KV]

    @cached_property
    def _range_mode(self) -> np.ndarray:
        r, p = self.ranges, self.pairs
        if not r.shape[0]:
            return np.zeros(0, dtype=np.int64)
        key_p = p[:, P_DST] * self.cp_size + p[:, P_SRC]
        key_r = r[:, DST] * self.cp_size + r[:, SRC]
        order = np.argsort(key_p)
        return p[order[np.searchsorted(key_p[order], key_r)], P_MODE]

    @cached_property
    def recv_tokens(self) -> np.ndarray:
        """Remote key/value tokens each rank receives (mode-0 pairs)."""
        return _ro(self._stage_tokens(DST).sum(axis=1))

    @cached_property
    def send_tokens(self) -> np.ndarray:
        """Key/value tokens each rank sends (one copy per receiver that needs them)."""
        return _ro(self._stage_tokens(SRC).sum(axis=1))

    @cached_property
    def stage_area(self) -> np.ndarray:
        """(cp, stages + 1): pairs each rank computes in each stage (mode-1 work counted at the
        rank that holds the keys, in the pair's stage)."""
        out = np.zeros((self.cp_size, self.stages + 1), dtype=np.int64)
        out[:, 0] = self.local_area
        r = self.ranges
        if r.shape[0]:
            at = np.where(self._range_mode == KV, r[:, DST], r[:, SRC])
            np.add.at(out, (at, r[:, STAGE]), r[:, AREA])
        return _ro(out)

    @cached_property
    def stage_recv_tokens(self) -> np.ndarray:
        """(cp, stages + 1): key/value tokens received per rank and stage (column 0 is 0)."""
        return _ro(self._stage_tokens(DST))

    @cached_property
    def stage_send_tokens(self) -> np.ndarray:
        return _ro(self._stage_tokens(SRC))

    def _stage_tokens(self, col) -> np.ndarray:
        out = np.zeros((self.cp_size, self.stages + 1), dtype=np.int64)
        r = self._kv_rows()
        if r.shape[0]:
            np.add.at(out, (r[:, col], r[:, STAGE]), r[:, END] - r[:, START])
        return out

    def stage_q_rows(self, col: int) -> np.ndarray:
        """(cp, stages + 1): query rows moved per rank and stage for mode-1 pairs, by
        ``col`` = `Q_DST` (rows a rank sends out) or `Q_SRC` (rows a rank receives)."""
        out = np.zeros((self.cp_size, self.stages + 1), dtype=np.int64)
        q = self.q_ranges
        if q.shape[0]:
            np.add.at(out, (q[:, col], q[:, Q_STAGE]), q[:, Q_END] - q[:, Q_START])
        return out

    @property
    def n_group_reduce(self) -> int:
        """Pairs that move queries instead of keys/values."""
        return int((self.pairs[:, P_MODE] == Q).sum()) if self.pairs.shape[0] else 0

    # ---- per rank layouts (what the runtime packs and unpacks) -----------------------------------

    @cached_property
    def _recv_index(self) -> np.ndarray:
        r = self.ranges
        return r[:, DST] * (self.stages + 1) + r[:, STAGE]

    @cached_property
    def _by_sender(self) -> tuple[np.ndarray, np.ndarray]:
        """The ranges sorted by (src, stage, dst, start), and their (src, stage) keys."""
        r = self.ranges
        r = r[np.lexsort((r[:, START], r[:, DST], r[:, STAGE], r[:, SRC]))]
        return r, r[:, SRC] * (self.stages + 1) + r[:, STAGE]

    def recv(self, dst: int, stage: int, mode: int | None = None) -> np.ndarray:
        """(k, 3) ``[src, start, end]`` key ranges of `dst`'s queries in `stage`, in arrival order
        (by src, start); ``mode=KV`` only those that move (``None``: every pair's)."""
        key = dst * (self.stages + 1) + stage
        a, b = np.searchsorted(self._recv_index, [key, key + 1])
        out = self.ranges[a:b]
        if mode is not None and out.shape[0]:
            out = out[self._range_mode[a:b] == mode]
        return out[:, [SRC, START, END]]

    def send(self, src: int, stage: int, mode: int | None = None) -> np.ndarray:
        """(k, 3) ``[dst, start, end]`` key ranges `src` holds for others in `stage`, in packing
        order (by dst, start); ``mode=KV`` only those that move."""
        r, key = self._by_sender
        want = src * (self.stages + 1) + stage
        a, b = np.searchsorted(key, [want, want + 1])
        out = r[a:b]
        if mode is not None and out.shape[0]:
            out = out[self._sender_mode[a:b] == mode]
        return out[:, [DST, START, END]]

    @cached_property
    def _sender_mode(self) -> np.ndarray:
        r, _ = self._by_sender
        if not r.shape[0]:
            return np.zeros(0, dtype=np.int64)
        modes = {(int(d), int(s)): int(m) for d, s, m in self.pairs[:, [P_DST, P_SRC, P_MODE]].tolist()}
        return np.array([modes[(int(d), int(s_))] for d, s_ in r[:, [DST, SRC]].tolist()], dtype=np.int64)

    def q_send(self, dst: int, stage: int) -> np.ndarray:
        """(k, 3) ``[src, start, end]``: `dst`'s query rows that go to `src` in `stage`
        (GroupReduce pairs), in packing order (by src, start)."""
        q = self.q_ranges
        q = q[(q[:, Q_DST] == dst) & (q[:, Q_STAGE] == stage)]
        q = q[np.lexsort((q[:, Q_START], q[:, Q_SRC]))]
        return q[:, [Q_SRC, Q_START, Q_END]]

    def q_recv(self, src: int, stage: int) -> np.ndarray:
        """(k, 3) ``[dst, start, end]``: the query rows `src` receives in `stage` to compute
        against its own keys, in arrival order (by dst, start)."""
        q = self.q_ranges
        q = q[(q[:, Q_SRC] == src) & (q[:, Q_STAGE] == stage)]
        q = q[np.lexsort((q[:, Q_START], q[:, Q_DST]))]
        return q[:, [Q_DST, Q_START, Q_END]]

    def needed(self, dst: int) -> np.ndarray:
        """(k, 3) ``[src, start, end]``: every remote key range `dst` attends, sorted by position."""
        r = self.ranges[self.ranges[:, DST] == dst]
        r = r[np.argsort(r[:, START], kind="stable")]
        return r[:, [SRC, START, END]]

    # ---- graphs --------------------------------------------------------------------------------

    def graph(self, stage: int | None = None):
        """A networkx DiGraph: node per rank (recv/send tokens), edge src -> dst per pair with
        ``tokens``, ``ranges``, ``area``, ``stages`` and ``mode`` (optionally one stage only)."""
        import networkx as nx

        g = nx.DiGraph()
        for rk in range(self.cp_size):
            g.add_node(rk, recv_tokens=int(self.recv_tokens[rk]), send_tokens=int(self.send_tokens[rk]))
        r = self.ranges
        if stage is not None:
            r = r[r[:, STAGE] == stage]
        modes = {(int(d), int(s)): int(m) for d, s, m in self.pairs[:, [P_DST, P_SRC, P_MODE]].tolist()}
        for d, s, a, b, st, area in r.tolist():
            if g.has_edge(s, d):
                e = g.edges[s, d]
                e["tokens"] += b - a
                e["ranges"] += 1
                e["area"] += area
                e["stages"].add(st)
            else:
                g.add_edge(s, d, tokens=b - a, ranges=1, area=area, stages={st}, mode=modes[(d, s)])
        return g

    def rounds(self, stage: int) -> list[list[tuple[int, int]]]:
        """Contention-free rounds of one stage: lists of (src, dst) transfers in which every rank
        sends at most one message and receives at most one (a greedy edge colouring of the
        bipartite send/receive graph with networkx, largest transfers first)."""
        import networkx as nx

        g = self.graph(stage)
        b = nx.Graph()
        for s, d, data in g.edges(data=True):
            b.add_edge(("send", s), ("recv", d), tokens=data["tokens"])
        if b.number_of_edges() == 0:
            return []
        lg = nx.line_graph(b)
        weight = {e: b.edges[e]["tokens"] for e in b.edges}
        order = sorted(lg.nodes, key=lambda e: -weight.get(e, weight.get((e[1], e[0]), 0)))
        colour = nx.coloring.greedy_color(lg, strategy=lambda G, c: iter(order))
        out: dict[int, list] = {}
        for e, c in colour.items():
            (k1, v1), (k2, v2) = e
            s, d = (v1, v2) if k1 == "send" else (v2, v1)
            out.setdefault(c, []).append((s, d))
        return [sorted(out[c]) for c in sorted(out)]

    # ---- (de)serialisation -------------------------------------------------------------------

    def to_dict(self) -> dict:
        return {
            "cp_size": self.cp_size,
            "stages": self.stages,
            "seq_len": self.seq_len,
            "ranges": self.ranges.tolist(),
            "pairs": self.pairs.tolist(),
            "q_ranges": self.q_ranges.tolist(),
            "local_area": self.local_area.tolist(),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "CommSchedule":
        return cls(
            cp_size=int(d["cp_size"]),
            stages=int(d["stages"]),
            seq_len=int(d["seq_len"]),
            ranges=_ro(np.array(d["ranges"], dtype=np.int64).reshape(-1, 6)),
            pairs=_ro(np.array(d["pairs"], dtype=np.int64).reshape(-1, 6)),
            q_ranges=_ro(np.array(d["q_ranges"], dtype=np.int64).reshape(-1, 5)),
            local_area=_ro(d["local_area"]),
        )

    def __repr__(self) -> str:
        return (
            f"CommSchedule(cp={self.cp_size}, {self.stages} remote stage{'s' if self.stages != 1 else ''}, "
            f"{self.ranges.shape[0]} ranges in {self.pairs.shape[0]} pairs, "
            f"{int(self.recv_tokens.sum())} key/value tokens moved, "
            f"{self.n_group_reduce} GroupReduce pairs)"
        )


def build_schedule(
    mask: Mask,
    dispatch: Dispatch,
    *,
    stages: int,
    group_reduce: bool = False,
    kv_token_bytes: float = 1.0,
    q_row_bytes: float = 4.0,
) -> CommSchedule:
    """The exact schedule of `dispatch` (see the module docstring). O(pieces + ranges + overlaps)."""
    cp = dispatch.cp_size
    span = mask.sk
    stages = stages if cp > 1 else 0
    runs = dispatch.runs
    e6 = np.zeros((0, 6), dtype=np.int64)
    if cp == 1 or runs.shape[0] == 0:
        return CommSchedule(cp, stages, dispatch.seq_len, _ro(e6), _ro(e6), _ro(np.zeros((0, 5))), _ro(dispatch.rank_area))
    run_s, run_e, run_r = runs[:, 0], runs[:, 1], runs[:, 2]
    pieces, seg = cut_bands(tight_bands(mask), np.append(run_s, run_e[-1]))
    prank = run_r[seg]
    lo, hi = key_extent(pieces)

    # needed keys per rank, split at the owners' runs, own keys dropped
    g, s, e = merge_intervals(prank, lo, hi, span)
    first = np.searchsorted(run_e, s, side="right")
    last = np.searchsorted(run_s, e, side="left") - 1
    cnt = np.maximum(last - first + 1, 0)
    k = np.repeat(first, cnt) + _ramp(cnt)
    dst = np.repeat(g, cnt)
    start = np.maximum(np.repeat(s, cnt), run_s[k])
    end = np.minimum(np.repeat(e, cnt), run_e[k])
    src = run_r[k]
    keep = src != dst
    dst, src, start, end = dst[keep], src[keep], start[keep], end[keep]  # sorted by (dst, start)

    # (piece, range) overlaps of one receiver: exact areas and the query rows involved
    w = np.int64(span + 1)
    rs_c, re_c = dst * w + start, dst * w + end
    f = np.searchsorted(re_c, prank * w + lo, side="right")
    l = np.searchsorted(rs_c, prank * w + hi, side="left") - 1
    cnt = np.maximum(l - f + 1, 0)
    it_p = np.repeat(np.arange(pieces.shape[0]), cnt)
    it_r = np.repeat(f, cnt) + _ramp(cnt)
    pc = pieces[it_p]
    x = np.maximum(start[it_r], lo[it_p])
    y = np.minimum(end[it_r], hi[it_p])
    area_it = band_prefix(pc, y) - band_prefix(pc, x)
    row_lo, row_hi = _rows_touching(pc, x, y)
    area = np.zeros(dst.size, dtype=np.int64)
    np.add.at(area, it_r, area_it)

    # pairs
    pkey = dst * cp + src
    ukey, pinv = np.unique(pkey, return_inverse=True)
    p_dst, p_src = ukey // cp, ukey % cp
    p_kv = np.bincount(pinv, weights=end - start, minlength=ukey.size).astype(np.int64)
    p_area = np.zeros(ukey.size, dtype=np.int64)
    np.add.at(p_area, pinv, area)
    qg, qs, qe = merge_intervals(pinv[it_r], row_lo, row_hi, dispatch.seq_len)
    p_rows = np.bincount(qg, weights=qe - qs, minlength=ukey.size).astype(np.int64)
    p_mode = np.zeros(ukey.size, dtype=np.int64)
    if group_reduce == "bytes":  # every pair whose rows are cheaper to move, whatever the balance
        p_mode = np.where(p_rows * q_row_bytes < p_kv * kv_token_bytes, Q, KV).astype(np.int64)
    elif group_reduce:
        p_mode = _balanced_group_reduce(p_dst, p_src, p_kv, p_rows, p_area, dispatch.rank_area,
                                        kv_token_bytes, q_row_bytes)

    # stages: per receiver, by ring distance then position, about equal tokens per stage
    stage = _stage_split(dst, src, start, end, cp, stages)
    mode_r = p_mode[pinv]
    if (mode_r == Q).any():  # a GroupReduce pair moves in one stage: its earliest
        first_stage = np.full(ukey.size, stages + 1, dtype=np.int64)
        np.minimum.at(first_stage, pinv, stage)
        stage = np.where(mode_r == Q, first_stage[pinv], stage)
    order = np.lexsort((start, src, stage, dst))
    ranges = np.stack([dst, src, start, end, stage, area], axis=1)[order]
    pairs = np.stack([p_dst, p_src, p_kv, p_rows, p_area, p_mode], axis=1)

    q_ranges = np.zeros((0, 5), dtype=np.int64)
    if (p_mode == Q).any():
        sel = p_mode[qg] == Q
        pid = qg[sel]
        st_p = np.full(ukey.size, stages + 1, dtype=np.int64)
        np.minimum.at(st_p, pinv, stage)
        q_ranges = np.stack([p_dst[pid], p_src[pid], qs[sel], qe[sel], st_p[pid]], axis=1)

    remote = np.bincount(dst, weights=area, minlength=cp).astype(np.int64) if dst.size else np.zeros(cp, dtype=np.int64)
    local = dispatch.rank_area - remote
    return CommSchedule(cp, stages, dispatch.seq_len, _ro(ranges), _ro(pairs), _ro(q_ranges), _ro(local))


def _balanced_group_reduce(p_dst, p_src, p_kv, p_rows, p_area, rank_area, kv_token_bytes, q_row_bytes):
    """Pair modes: GroupReduce (`Q`) for pairs whose query rows are cheaper to move than their
    keys/values, taken greedily by bytes saved while the key owner, who then computes the pair,
    stays at or under the most loaded rank's work (so the plan's compute balance never gets worse;
    a pair that would overload its owner keeps moving keys/values)."""
    saved = p_kv * float(kv_token_bytes) - p_rows * float(q_row_bytes)
    mode = np.full(p_dst.size, KV, dtype=np.int64)
    load = np.asarray(rank_area, dtype=np.float64).copy()
    cap = float(load.max()) if load.size else 0.0
    for i in np.argsort(-saved, kind="stable"):
        if saved[i] <= 0:
            break
        s, d, a = int(p_src[i]), int(p_dst[i]), float(p_area[i])
        if load[s] + a <= cap:
            load[s] += a
            load[d] -= a
            mode[i] = Q
    return mode


def _rows_touching(pc: np.ndarray, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows of each tight piece whose key interval meets ``[x, y)``: one row range (ends are monotone)."""
    r0, r1, ac, a_s, bc, b_s = pc.T
    big = np.int64(1) << 62
    # b(i) > x
    lo = np.where(b_s == 1, x - bc + 1, np.where(bc > x, -big, big))
    # a(i) < y
    hi = np.where(a_s == 1, y - ac, np.where(ac < y, big, -big))
    lo = np.maximum(lo, r0)
    hi = np.minimum(hi, r1)
    return lo, np.maximum(hi, lo)


def _stage_split(dst, src, start, end, cp: int, stages: int) -> np.ndarray:
    """Remote stage (1..stages) of each range: per receiver, ranges ordered by ring distance
    ``(dst - src) mod cp`` and position, cut into `stages` groups of about equal tokens."""
    if dst.size == 0:
        return np.zeros(0, dtype=np.int64)
    dist = (dst - src) % cp
    order = np.lexsort((start, dist, dst))
    ln = (end - start)[order].astype(np.float64)
    d = dst[order]
    cum = np.cumsum(ln)
    total = np.bincount(d, weights=ln, minlength=cp)
    base = np.concatenate([[0.0], np.cumsum(total)])[d]
    mid = (cum - ln / 2 - base) / np.maximum(total[d], 1.0)
    st = 1 + np.minimum((mid * stages).astype(np.int64), stages - 1)
    out = np.empty(dst.size, dtype=np.int64)
    out[order] = st
    return out


# ---- per-rank sub-masks ------------------------------------------------------------------------

_AND = [False, False, False, True]
_SELF = [False, True]


def _check_segments(segments, size: int, what: str) -> np.ndarray:
    """(m, 3) ``[start, end, local_start]``: inside ``[0, size)``, globally disjoint, and the local
    ranges tiling ``[0, sum of lengths)`` without gaps or overlaps."""
    seg = np.asarray(segments, dtype=np.int64).reshape(-1, 3)
    ln = seg[:, 1] - seg[:, 0]
    if seg.size and (ln.min() < 0 or seg[:, 0].min() < 0 or seg[:, 1].max() > size):
        raise MaskError(f"submask: {what} must be [start, end, local_start] rows with 0 <= start <= end <= {size}")
    nz_ = seg[ln > 0]
    g = nz_[np.argsort(nz_[:, 0], kind="stable")]
    if g.shape[0] > 1 and (g[1:, 0] < g[:-1, 1]).any():
        raise MaskError(f"submask: {what} overlap in global positions; segments must be disjoint")
    loc = nz_[np.argsort(nz_[:, 2], kind="stable")]
    want = np.cumsum(loc[:, 1] - loc[:, 0]) - (loc[:, 1] - loc[:, 0])
    if not np.array_equal(loc[:, 2], want):
        raise MaskError(f"submask: {what} local starts must tile [0, total length) in order without gaps "
                        f"or overlaps, got {loc[:, 2].tolist()} for lengths {(loc[:, 1] - loc[:, 0]).tolist()}")
    return seg


def submask(mask: Mask, q_segments, k_segments) -> Mask:
    """The mask restricted to some query rows and key columns, remapped to local indices.

    ``q_segments`` (m, 3) ``[start, end, local_start]`` map global rows ``[start, end)`` to local
    rows from ``local_start``; ``k_segments`` the same for keys. Segments must be disjoint; the
    local shape is ``(sum of q lengths, sum of k lengths)``. Exact, on bands (no dense matrix).
    """
    qs = _check_segments(q_segments, mask.sq, "q_segments")
    ks = _check_segments(k_segments, mask.sk, "k_segments")
    lq = int((qs[:, 1] - qs[:, 0]).sum())
    lk = int((ks[:, 1] - ks[:, 0]).sum())
    qs = qs[qs[:, 1] > qs[:, 0]]
    ks = ks[ks[:, 1] > ks[:, 0]]
    if lq == 0 or lk == 0 or not qs.size or not ks.size:
        return Mask([], sq=lq, sk=lk)
    # rows: cut the bands at the segment bounds, keep pieces inside a segment, shift them
    qs = qs[np.argsort(qs[:, 0])]
    bounds = np.unique(np.concatenate([qs[:, 0], qs[:, 1]]))
    pieces, seg = cut_bands(tight_bands(mask), bounds)
    which = np.searchsorted(qs[:, 0], bounds[seg], side="right") - 1
    inside = (which >= 0) & (bounds[seg] < qs[np.maximum(which, 0), 1])
    pieces, which = pieces[inside], which[inside]
    d = (qs[which, 2] - qs[which, 0])
    pieces = pieces.copy()
    pieces[:, 0] += d
    pieces[:, 1] += d
    pieces[:, 2] -= pieces[:, 3] * d
    pieces[:, 4] -= pieces[:, 5] * d
    lo, hi = key_extent(pieces)
    # columns: per key segment, intersect with its column strip and shift
    parts = []
    for x, y, lx in ks.tolist():
        sel = pieces[(lo < y) & (hi > x)]
        if not sel.shape[0]:
            continue
        strip = np.array([[0, lq, x, 0, y, 0]], dtype=np.int64)
        b = nz.sweep([sel, strip], _AND, lq, mask.sk)
        if b.shape[0]:
            b = b.copy()
            b[:, 2] += lx - x
            b[:, 4] += lx - x
            parts.append(b)
    if not parts:
        return Mask([], sq=lq, sk=lk)
    bands = nz.sweep([np.concatenate(parts)], _SELF, lq, lk)
    return Mask._from_bands(bands, lq, lk)


def layout_segments(rows: np.ndarray) -> np.ndarray:
    """(k, 2) ``[start, end)`` global ranges in local order -> (k, 3) ``[start, end, local_start]``."""
    rows = np.asarray(rows, dtype=np.int64).reshape(-1, 2)
    ln = rows[:, 1] - rows[:, 0]
    return np.stack([rows[:, 0], rows[:, 1], np.cumsum(ln) - ln], axis=1)


def check_stages(stages, cp_size: int) -> int:
    """Remote stages for `compile`: default ``min(cp_size - 1, 4)``; otherwise an integer >= 1."""
    if stages is None:
        return min(max(cp_size - 1, 0), 4)
    stages = as_int(stages, "compile: stages")
    if stages < 1:
        raise MaskError(f"compile: stages (remote stages after the local one) must be >= 1, got {stages}")
    return stages


__all__ = [
    "CommSchedule",
    "KV",
    "Q",
    "build_schedule",
    "layout_segments",
    "remote_tokens_fn",
    "submask",
]
