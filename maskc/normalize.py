"""Exact set operations on slices, and the canonical form of a mask.

Geometry
--------
In row ``i`` of a slice the allowed keys form one interval ``[a(i), b(i))`` whose two ends are
*lines* ``c + s*i`` with slope ``s`` in {0, 1}::

    FULL        a = ks                  b = ke
    CAUSAL      a = ks                  b = ke + (i - (qe - 1))
    INV_CAUSAL  a = ks + (i - qs)       b = ke
    BI_CAUSAL   a = ks + (i - qs)       b = ke + (i - (qe - 1))

so ``kind = 2 * slope(a) + slope(b)``. A *band* is ``(r0, r1, ac, as, bc, bs)``: rows ``[r0, r1)``
with ``a(i) = ac + as*i`` and ``b(i) = bc + bs*i``. Any union, intersection, difference or
complement of bands is again a finite list of bands: between rows where two lines cross, the
order of all ends is fixed, so one evaluation per row range decides the whole range (`sweep`).

Canonical form
--------------
Scan rows top to bottom; row ``i``'s allowed set is a sorted list of maximal intervals. A band
grows while the next row has as many intervals and every end moves by the same step (0 or 1) it
took between the band's first two rows. Each interval of a band is one slice, its kind given by
the two steps; a one-row band is FULL. This form depends only on the set of allowed pairs, so two
masks are equal exactly when their canonical slice arrays are (`Canon`).
"""

from __future__ import annotations

import numpy as np

# band array columns
R0, R1, AC, AS, BC, BS = range(6)


def slices_to_bands(arr: np.ndarray) -> np.ndarray:
    """(n, 5) int64 [qs, qe, ks, ke, kind] -> (n, 6) int64 bands (no trimming)."""
    arr = np.asarray(arr, dtype=np.int64).reshape(-1, 5)
    qs, qe, ks, ke, kind = arr.T
    a_s = kind >> 1
    b_s = kind & 1
    bands = np.empty((arr.shape[0], 6), dtype=np.int64)
    bands[:, R0] = qs
    bands[:, R1] = qe
    bands[:, AC] = ks - a_s * qs
    bands[:, AS] = a_s
    bands[:, BC] = ke - b_s * (qe - 1)
    bands[:, BS] = b_s
    return bands


def bands_to_slices(bands: np.ndarray) -> np.ndarray:
    """(n, 6) canonical bands -> (n, 5) int64 [qs, qe, ks, ke, kind]."""
    bands = np.asarray(bands, dtype=np.int64).reshape(-1, 6)
    r0, r1, ac, a_s, bc, b_s = bands.T
    out = np.empty((bands.shape[0], 5), dtype=np.int64)
    out[:, 0] = r0
    out[:, 1] = r1
    out[:, 2] = ac + a_s * r0
    out[:, 3] = bc + b_s * (r1 - 1)
    out[:, 4] = 2 * a_s + b_s
    return out


def trim_bands(bands: np.ndarray, sq: int, sk: int) -> np.ndarray:
    """Clip bands to rows [0, sq) and drop rows where the interval is empty.

    Assumes keys already lie in [0, sk) (validated slices); used by the fast path only.
    """
    r0, r1, ac, a_s, bc, b_s = (bands[:, c].copy() for c in range(6))
    r0 = np.maximum(r0, 0)
    r1 = np.minimum(r1, sq)
    # width w(i) = (bc - ac) + (bs - as) * i must be > 0
    dw = b_s - a_s
    w0 = bc - ac
    # dw == +1: w > 0  <=>  i > -w0      -> first row -w0 + 1
    # dw == -1: w > 0  <=>  i <  w0      -> last row  w0 - 1
    # dw ==  0: w > 0  <=>  w0 > 0
    r0 = np.where(dw == 1, np.maximum(r0, -w0 + 1), r0)
    r1 = np.where(dw == -1, np.minimum(r1, w0), r1)
    keep = (r1 > r0) & ~((dw == 0) & (w0 <= 0))
    out = np.stack([r0, r1, ac, a_s, bc, b_s], axis=1)[keep]
    return out


class Canon:
    """Builds the canonical band list from row-ordered bands of maximal intervals.

    `push(r0, r1, ends)` takes rows [r0, r1) whose row sets are the intervals given by ``ends``
    (a tuple of lines ``(c, s)``, two per interval, sorted, disjoint and non-touching on every
    row of the range). Pushes must come in increasing row order.
    """

    __slots__ = ("rows", "cur")

    def __init__(self):
        self.rows: list[tuple[int, int, int, int, int, int]] = []
        self.cur = None  # (r0, r1, ends)

    def _emit(self, r0, r1, ends):
        rows = self.rows
        if r1 - r0 == 1:
            for t in range(0, len(ends), 2):
                ac, a_s = ends[t]
                bc, b_s = ends[t + 1]
                rows.append((r0, r1, ac + a_s * r0, 0, bc + b_s * r0, 0))
        else:
            for t in range(0, len(ends), 2):
                ac, a_s = ends[t]
                bc, b_s = ends[t + 1]
                rows.append((r0, r1, ac, a_s, bc, b_s))

    def flush(self):
        if self.cur is not None:
            self._emit(*self.cur)
            self.cur = None

    def push(self, r0: int, r1: int, ends: tuple) -> None:
        if r1 <= r0:
            return
        cur = self.cur
        if cur is None or cur[1] != r0 or len(cur[2]) != len(ends) or not ends:
            self.flush()
            if ends:
                self.cur = (r0, r1, ends)
            return
        c0, _, F = cur
        if r0 - c0 == 1:
            # one-row band: its steps are fixed by the incoming first row
            prev = r0 - 1
            G = []
            for (fc, fs), (gc, gs) in zip(F, ends):
                v = fc + fs * prev
                step = gc + gs * r0 - v
                if step != 0 and step != 1:
                    self.flush()
                    self.cur = (r0, r1, ends)
                    return
                G.append((v - step * prev, step))
            F = tuple(G)
        else:
            for (fc, fs), (gc, gs) in zip(F, ends):
                if fc + fs * r0 != gc + gs * r0:
                    self.flush()
                    self.cur = (r0, r1, ends)
                    return
        if r1 - r0 == 1 or F == ends:
            self.cur = (c0, r1, F)
        else:
            # the lines agree on row r0 only: that row ends the current band
            self._emit(c0, r0 + 1, F)
            self.cur = (r0 + 1, r1, ends)

    def result(self) -> np.ndarray:
        self.flush()
        if not self.rows:
            return np.zeros((0, 6), dtype=np.int64)
        return np.array(self.rows, dtype=np.int64)


def push_canonical_bands(canon: Canon, bands: np.ndarray, row_shift: int = 0, col_shift: int = 0):
    """Push the bands of a canonical mask (slices of one band are adjacent) into `canon`."""
    if bands.shape[0] == 0:
        return
    b = bands.tolist()
    n = len(b)
    t = 0
    while t < n:
        r0, r1 = b[t][0], b[t][1]
        ends = []
        u = t
        while u < n and b[u][0] == r0 and b[u][1] == r1:
            _, _, ac, a_s, bc, b_s = b[u]
            ends.append((ac - a_s * row_shift + col_shift, a_s))
            ends.append((bc - b_s * row_shift + col_shift, b_s))
            u += 1
        canon.push(r0 + row_shift, r1 + row_shift, tuple(ends))
        t = u
    return canon


def canonical_from_disjoint(bands: np.ndarray, sq: int, sk: int, tight: bool = False) -> np.ndarray | None:
    """Fast path: bands that never share a row (after trimming) need no sweep.

    Returns None when some row is covered by more than one band. ``tight``: the bands are known to
    lie in rows [0, sq) with a non-empty interval on every row, so trimming is skipped.
    """
    if not tight:
        bands = trim_bands(bands, sq, sk)
    if bands.shape[0] == 0:
        return bands
    order = np.lexsort((bands[:, R1], bands[:, R0]))
    bands = bands[order]
    if np.any(bands[1:, R0] < bands[:-1, R1]):
        return None
    if not _any_mergeable(bands):
        one = bands[:, R1] - bands[:, R0] == 1
        if one.any():  # one-row bands are FULL in canonical form
            bands = bands.copy()
            bands[one, AC] += bands[one, AS] * bands[one, R0]
            bands[one, BC] += bands[one, BS] * bands[one, R0]
            bands[one, AS] = 0
            bands[one, BS] = 0
        return bands
    canon = Canon()
    for r0, r1, ac, a_s, bc, b_s in bands.tolist():
        canon.push(r0, r1, ((ac, a_s), (bc, b_s)))
    return canon.result()


def canonical_from_sorted_disjoint(rows: list) -> np.ndarray:
    """`canonical_from_disjoint` (``tight=True``) of band tuples already sorted by first row and
    sharing no row, in plain Python: below a few dozen bands numpy's per-call cost is most of
    that function's cost, and this is the same decision (merge through `Canon` where some band
    could continue the one before it, else one-row bands made FULL) without it."""
    for prev, nxt in zip(rows, rows[1:]):
        r = nxt[0]
        if r != prev[1]:
            continue
        # steps of the two ends from the previous band's last row to the next band's first
        da = nxt[2] + nxt[3] * r - prev[2] - prev[3] * (r - 1)
        db = nxt[4] + nxt[5] * r - prev[4] - prev[5] * (r - 1)
        if (0 <= da <= 1 and 0 <= db <= 1) if r - prev[0] == 1 else (da == prev[3] and db == prev[5]):
            canon = Canon()
            for r0, r1, ac, a_s, bc, b_s in rows:
                canon.push(r0, r1, ((ac, a_s), (bc, b_s)))
            return canon.result()
    if not rows:
        return np.zeros((0, 6), dtype=np.int64)
    return np.array([(r0, r1, ac + a_s * r0, 0, bc + b_s * r0, 0) if r1 - r0 == 1 else (r0, r1, ac, a_s, bc, b_s)
                     for r0, r1, ac, a_s, bc, b_s in rows], dtype=np.int64)


def canonical_from_disjoint_pieces(pieces: list) -> np.ndarray | None:
    """Canonical bands of the union of ``pieces``: band tuples sorted by first row, pairwise
    disjoint, each with a non-empty interval on every row of its range (the column pieces of
    canonical row bands), that may share rows. Per segment of rows between piece ends, the
    intervals in order, an interval merged into the one before where that one ends on the very
    line it starts on (on every row of the segment), then `Canon`. None where two intervals touch
    on some rows of a segment only: the general `sweep` cuts those rows apart."""
    bounds = sorted({x for p in pieces for x in p[:2]})
    canon = Canon()
    active: list = []
    nxt, n = 0, len(pieces)
    for s, e in zip(bounds[:-1], bounds[1:]):
        active = [p for p in active if p[1] > s]
        while nxt < n and pieces[nxt][0] == s:
            active.append(pieces[nxt])
            nxt += 1
        if len(active) > 1:
            active.sort(key=lambda p: p[2] + p[3] * s)  # disjoint: the same order on every row
        ends: list = []
        last = e - 1
        for _, _, ac, a_s, bc, b_s in active:
            if ends:
                pc, ps = ends[-1]
                if (pc == ac and ps == a_s) or (last == s and pc + ps * s == ac + a_s * s):
                    ends[-1] = (bc, b_s)  # continues the interval before it
                    continue
                if pc + ps * s >= ac + a_s * s or pc + ps * last >= ac + a_s * last:
                    return None
            ends.append((ac, a_s))
            ends.append((bc, b_s))
        canon.push(s, e, tuple(ends))
    return canon.result()


def _any_mergeable(bands: np.ndarray) -> bool:
    """Whether some band's first row could continue the row-adjacent band before it."""
    prev, nxt = bands[:-1], bands[1:]
    r = nxt[:, R0]
    touch = r == prev[:, R1]
    if not touch.any():
        return False
    # values of the previous band's ends on its last row, and of the next band's on its first
    pa = prev[:, AC] + prev[:, AS] * (r - 1)
    pb = prev[:, BC] + prev[:, BS] * (r - 1)
    na = nxt[:, AC] + nxt[:, AS] * r
    nb = nxt[:, BC] + nxt[:, BS] * r
    da, db = na - pa, nb - pb
    one_row = prev[:, R1] - prev[:, R0] == 1
    # one-row previous band: any steps in {0, 1}; longer band: the steps must be its slopes
    ok_one = one_row & (da >= 0) & (da <= 1) & (db >= 0) & (db <= 1)
    ok_long = ~one_row & (da == prev[:, AS]) & (db == prev[:, BS])
    return bool((touch & (ok_one | ok_long)).any())


def sweep(operands: list[np.ndarray], table: list[bool], sq: int, sk: int) -> np.ndarray:
    """Canonical bands of ``{(i, j) in [0,sq) x [0,sk) : table[membership bits of (i, j)]}``.

    ``operands[t]`` is an (n_t, 6) band array (any bands: overlapping, empty rows, out of
    bounds); bit t of the membership is set when (i, j) lies in one of operand t's bands.
    ``table`` has ``2**len(operands)`` entries.
    """
    union = not table[0] and all(table[1:])  # the set is the union of the operands
    if union and sq > 0 and sk > 0 and sum(len(b) for b in operands) >= _MANY_RECTANGLES:
        every = np.concatenate([np.asarray(b, dtype=np.int64).reshape(-1, 6) for b in operands])
        if not every[:, 3].any() and not every[:, 5].any():
            return _sweep_constant_bands(every, sq, sk)
    items = []  # (r0, r1, bit, ac, as, bc, bs)
    for t, bands in enumerate(operands):
        bit = 1 << t
        for r0, r1, ac, a_s, bc, b_s in np.asarray(bands, dtype=np.int64).reshape(-1, 6).tolist():
            r0 = max(r0, 0)
            r1 = min(r1, sq)
            if r1 > r0:
                items.append((r0, r1, bit, ac, a_s, bc, b_s))
    canon = Canon()
    if sq <= 0 or sk <= 0:
        return canon.result()
    items.sort()
    bounds = sorted({0, sq, *(it[0] for it in items), *(it[1] for it in items)})
    empty_row = ((0, 0), (sk, 0)) if table[0] else ()
    n_items = len(items)
    active: list = []
    nxt = 0
    for s, e in zip(bounds[:-1], bounds[1:]):
        if active:
            active = [it for it in active if it[1] > s]
        while nxt < n_items and items[nxt][0] == s:
            active.append(items[nxt])
            nxt += 1
        if not active:
            canon.push(s, e, empty_row)
            continue
        if union and not any(it[4] or it[6] for it in active):
            _union_of_constant(canon, active, s, e, sk)
        else:
            _sweep_segment(canon, active, table, s, e, sk)
    return canon.result()


_MANY_RECTANGLES = 24  # from here on a union of constant bands is merged on a grid, not per segment


def _sweep_constant_bands(bands: np.ndarray, sq: int, sk: int) -> np.ndarray:
    """`sweep` for a union of bands whose ends are all constant (rectangles): clipped to the plane
    (empty ones dropped), then merged on the grid of row segments by column segments (see
    `_bands_from_cover`), filled rectangle by rectangle (`union_of_rectangles`) or, for many,
    from a 2-D difference array (`_cover_by_differences`)."""
    if bands.shape[0] <= _FEW_RECTANGLES:
        rects = []
        for r0, r1, a, _, b, _ in bands.tolist():
            r0, r1, a, b = max(r0, 0), min(r1, sq), max(a, 0), min(b, sk)
            if r0 < r1 and a < b:
                rects.append((r0, r1, a, b))
        return union_of_rectangles(rects, sq)
    cover_of = _cover_by_differences(bands, sq, sk)
    if cover_of is None:
        return np.zeros((0, 6), dtype=np.int64)
    return _bands_from_cover(*cover_of)


def _bands_from_cover(rb: np.ndarray, cb: np.ndarray, cover: np.ndarray) -> np.ndarray:
    """Canonical bands of a union of rectangles from its coverage grid: ``cover[s, 1 + k]`` says
    whether row segment s (rows ``rb[s]:rb[s + 1]``) is covered on column segment k (columns
    ``cb[k]:cb[k + 1]``); columns 0 and -1 are uncovered padding. Each row segment's intervals
    are the runs of covered column segments (so touching or overlapping intervals merge). Where
    every segment spans two rows or more, `Canon` would merge exactly the neighbours with equal
    intervals, so the bands are assembled here; otherwise the segments go through a `Canon`."""
    if (rb[1:] - rb[:-1] >= 2).all():
        start = np.ones(cover.shape[0], dtype=bool)  # a band starts where the intervals change
        np.not_equal(cover[1:], cover[:-1]).any(axis=1, out=start[1:])
        first = start.nonzero()[0]
        last = np.empty_like(first)  # (np.append's wrapper costs more than these)
        last[:-1] = first[1:]
        last[-1] = cover.shape[0]
        c = cover[first]
        seg, col = np.nonzero(c[:, 1:] != c[:, :-1])
        ab = cb[col].reshape(-1, 2)  # each interval's (a, b): run starts and ends alternate
        g = seg[::2]
        out = np.zeros((ab.shape[0], 6), dtype=np.int64)
        out[:, 0] = rb[first[g]]
        out[:, 1] = rb[last[g]]
        out[:, 2] = ab[:, 0]
        out[:, 4] = ab[:, 1]
        return out
    seg, col = np.nonzero(cover[:, 1:] != cover[:, :-1])
    xs = cb[col].tolist()
    bounds = rb.tolist()
    canon = Canon()
    k = 0
    for i, n in enumerate(np.bincount(seg, minlength=rb.shape[0] - 1).tolist()):
        canon.push(bounds[i], bounds[i + 1], tuple((x, 0) for x in xs[k:k + n]))
        k += n
    return canon.result()


_FEW_RECTANGLES = 256  # up to here the coverage grid is filled rectangle by rectangle in Python


def union_of_rectangles(rects: list, sq: int) -> np.ndarray:
    """Canonical bands of the union of rectangles ``(r0, r1, a, b)`` (rows ``[r0, r1)`` x keys
    ``[a, b)``), each inside the ``sq`` rows and the keys and not empty: `sweep`'s union of
    constant bands without its clipping and setup. One slice assignment per rectangle fills the
    coverage grid (for a few dozen rectangles each numpy call of the difference array costs more
    than this whole loop): the column bands of a mask of FULL slices take this path."""
    if not rects:
        return np.zeros((0, 6), dtype=np.int64)
    rb = sorted({0, sq, *(r[0] for r in rects), *(r[1] for r in rects)})
    cb = sorted({*(r[2] for r in rects), *(r[3] for r in rects)})
    row_at = {x: i for i, x in enumerate(rb)}
    col_at = {x: i for i, x in enumerate(cb)}
    cover = np.zeros((len(rb) - 1, len(cb) + 1), dtype=bool)
    for r0, r1, a, b in rects:
        cover[row_at[r0] : row_at[r1], col_at[a] + 1 : col_at[b] + 1] = True
    return _bands_from_cover(np.array(rb, dtype=np.int64), np.array(cb, dtype=np.int64), cover)


def _cover_by_differences(bands: np.ndarray, sq: int, sk: int):
    """``(row bounds, column bounds, cover)`` (see `_bands_from_cover`) of the bands clipped to
    the plane, or None when none is left: for many rectangles, vectorised, from a 2-D difference
    array over the grid of row segments by column segments."""
    rect = bands[:, [0, 1, 2, 4]]  # r0, r1, a, b (ufuncs, not np.clip: its wrapper costs more than the work)
    np.maximum(rect, 0, out=rect)
    np.minimum(rect, [sq, sq, sk, sk], out=rect)
    rect = rect[(rect[:, 0] < rect[:, 1]) & (rect[:, 2] < rect[:, 3])]
    if rect.shape[0] == 0:
        return None
    rb = _sorted_unique(np.concatenate(([0, sq], rect[:, 0], rect[:, 1])))  # row segment bounds
    cb = _sorted_unique(rect[:, 2:].reshape(-1))
    ri = rb.searchsorted(rect[:, :2])
    ci = cb.searchsorted(rect[:, 2:])
    grid = np.zeros((rb.shape[0], cb.shape[0]), np.int32)
    np.add.at(grid, (ri[:, 0], ci[:, 0]), 1)
    np.add.at(grid, (ri[:, 0], ci[:, 1]), -1)
    np.add.at(grid, (ri[:, 1], ci[:, 0]), -1)
    np.add.at(grid, (ri[:, 1], ci[:, 1]), 1)
    # covered column segments, padded with an uncovered one on each side: runs start and end
    # where a segment differs from its left neighbour
    cover = np.zeros((rb.shape[0] - 1, cb.shape[0] + 1), dtype=bool)
    np.greater(grid.cumsum(0).cumsum(1)[:-1, :-1], 0, out=cover[:, 1:-1])
    return rb, cb, cover


def _sorted_unique(x: np.ndarray) -> np.ndarray:
    """``np.unique(x)`` of a 1-D int array, in fewer calls (no return options to dispatch)."""
    x = np.sort(x)
    keep = np.empty(x.shape[0], dtype=bool)
    keep[:1] = True
    np.not_equal(x[1:], x[:-1], out=keep[1:])
    return x[keep]


def _union_of_constant(canon: Canon, active: list, s: int, e: int, sk: int) -> None:
    """`_sweep_segment` for a union of bands whose ends are all constant on rows [s, e): every
    row holds the same intervals, merged where they overlap or touch (the lines are ``(x, 0)``)."""
    ivals = sorted((max(it[3], 0), min(it[5], sk)) for it in active)
    ends = []
    hi = None
    for a, b in ivals:
        if a >= b:
            continue
        if hi is not None and a <= hi:
            hi = max(hi, b)
            continue
        if hi is not None:
            ends.append((hi, 0))
        ends.append((a, 0))
        hi = b
    if hi is not None:
        ends.append((hi, 0))
    canon.push(s, e, tuple(ends))


def _sweep_segment(canon: Canon, active: list, table: list, s: int, e: int, sk: int) -> None:
    consts = {0, sk}
    diags = set()
    for it in active:
        (diags if it[4] else consts).add(it[3])
        (diags if it[6] else consts).add(it[5])
    cuts = [s]
    if diags:
        inner = set()
        for c in consts:
            for d in diags:
                t = c - d
                if s < t < e:
                    inner.add(t)
                if s < t + 1 < e:
                    inner.add(t + 1)
        cuts.extend(sorted(inner))
    cuts.append(e)
    for u, v in zip(cuts[:-1], cuts[1:]):
        r = u
        line_at = {0: (0, 0), sk: (sk, 0)}
        ivals = []
        pts = {0, sk}
        for _, _, bit, ac, a_s, bc, b_s in active:
            a = ac + a_s * r
            b = bc + b_s * r
            line_at.setdefault(a, (ac, a_s))
            line_at.setdefault(b, (bc, b_s))
            if a < 0:
                a = 0
            if b > sk:
                b = sk
            if a < b:
                ivals.append((a, b, bit))
                pts.add(a)
                pts.add(b)
        pts = sorted(pts)
        ends = []
        open_at = None
        for x, y in zip(pts[:-1], pts[1:]):
            if x < 0 or y > sk:
                continue
            bits = 0
            for a, b, bit in ivals:
                if a <= x < b:
                    bits |= bit
            if table[bits]:
                if open_at is None:
                    open_at = x
            elif open_at is not None:
                ends.append(line_at[open_at])
                ends.append(line_at[x])
                open_at = None
        if open_at is not None:
            ends.append(line_at[open_at])
            ends.append(line_at[pts[-1]])
        canon.push(u, v, tuple(ends))


def row_counts(bands: np.ndarray, sq: int) -> np.ndarray:
    """Allowed keys per row, int64 [sq], from canonical (tight, disjoint) bands in O(sq + n)."""
    const = np.zeros(sq + 1, dtype=np.int64)
    slope = np.zeros(sq + 1, dtype=np.int64)
    if bands.shape[0]:
        r0, r1, ac, a_s, bc, b_s = bands.T
        np.add.at(const, r0, bc - ac)
        np.add.at(const, r1, -(bc - ac))
        np.add.at(slope, r0, b_s - a_s)
        np.add.at(slope, r1, -(b_s - a_s))
    return np.cumsum(const)[:sq] + np.cumsum(slope)[:sq] * np.arange(sq, dtype=np.int64)


def prefix_area(bands: np.ndarray, R: np.ndarray, C: np.ndarray) -> np.ndarray:
    """Allowed pairs with i < R and j < C, summed over tight bands; R, C broadcast together.

    Exact integer arithmetic: within a band row i counts max(0, min(b(i), C) - a(i)), a
    piecewise-linear function with at most one kink per end, summed in closed form.
    """
    R = np.asarray(R, dtype=np.int64)
    C = np.asarray(C, dtype=np.int64)
    shape = np.broadcast(R, C).shape
    total = np.zeros(shape, dtype=np.int64)
    if bands.shape[0] == 0:
        return total
    r0, r1, ac, a_s, bc, b_s = (bands[:, c].reshape((-1,) + (1,) * len(shape)) for c in range(6))
    R = R[None]
    C = C[None]
    big = np.int64(1) << 62
    lo = r0
    hi = np.minimum(r1, R)
    # rows i < p have b(i) <= C, so the count is the band width w(i) = (bc - ac) + (bs - as) i
    p = np.where(b_s == 1, C - bc + 1, np.where(bc <= C, big, -big))
    h1 = np.minimum(hi, p)
    total_1 = _linear_sum(lo, h1, bc - ac, b_s - a_s)
    # rows i >= p: count C - a(i) while positive
    q2 = np.where(a_s == 1, C - ac, np.where(C - ac > 0, big, -big))
    l2 = np.maximum(lo, p)
    h2 = np.minimum(hi, q2)
    total_2 = _linear_sum(l2, h2, C - ac, -a_s)
    return (total_1 + total_2).sum(axis=0)


def _linear_sum(n0, n1, alpha, beta):
    """sum_{i=n0}^{n1-1} (alpha + beta*i), 0 where n1 <= n0 (broadcasting)."""
    n0, n1 = np.broadcast_arrays(n0, n1)
    valid = n1 > n0
    n0 = np.where(valid, n0, 0)
    n1 = np.where(valid, n1, 0)
    count = n1 - n0
    s = count * alpha + beta * ((n1 * (n1 - 1) - n0 * (n0 - 1)) // 2)
    return np.where(valid, s, 0)


def contains(bands: np.ndarray, i, j) -> np.ndarray:
    """Vectorised membership test of pairs (i, j) (broadcast) in bands."""
    i = np.asarray(i, dtype=np.int64)
    j = np.asarray(j, dtype=np.int64)
    out = np.zeros(np.broadcast(i, j).shape, dtype=bool)
    for r0, r1, ac, a_s, bc, b_s in bands.tolist():
        out |= (i >= r0) & (i < r1) & (j >= ac + a_s * i) & (j < bc + b_s * i)
    return out


__all__ = [
    "Canon",
    "bands_to_slices",
    "canonical_from_disjoint",
    "canonical_from_sorted_disjoint",
    "contains",
    "prefix_area",
    "push_canonical_bands",
    "row_counts",
    "slices_to_bands",
    "sweep",
    "trim_bands",
    "union_of_rectangles",
]
