"""FlexAttention interop: import a ``mask_mod`` exactly, export a `Mask` as a ``mask_mod``.

``from_mask_mod(fn, sq, sk)``
    Evaluates ``fn(b, h, q_idx, kv_idx)`` on every pair, vectorised, one stripe of ``block``
    query rows at a time (several ``block``-wide column blocks per call), and recovers the
    canonical slices. Each ``block x block`` tile is classified empty / full / partial; only
    partial tiles are scanned element by element for the starts and ends of the allowed key
    intervals, full and empty tiles cost one ``any``/``all`` reduction. Rows whose interval
    ends move by a constant step (0 or 1) are found with numpy and handed to
    `maskc.normalize.Canon` as one multi-row band, so a causal or banded mask costs a few Python
    calls per stripe, not one per row. Any shape is recovered exactly (in the worst case as
    one-row FULL slices). The result is then checked against a *second* evaluation of ``fn``
    (a non-deterministic ``fn`` raises `MaskError`).

    Cost: two evaluations of ``fn`` over all ``sq * sk`` pairs, each followed by an ``any`` and
    an ``all`` pass over the bools, plus O(elements of partial tiles + allowed intervals).
    A 32768 x 32768 causal mask takes about 0.8 s on one CPU core (numpy inputs, verified).

``to_mask_mod(mask)``
    A ``mask_mod`` that decides membership arithmetically from the canonical slices, for torch
    tensors (also the 0-d tensors FlexAttention passes under ``vmap``), numpy arrays and ints,
    broadcasting ``q_idx`` against ``kv_idx``.

No torch import happens at module level: torch is imported only when ``fn`` needs torch
inputs, or when the exported ``mask_mod`` is called with tensors.
"""

from __future__ import annotations

import numbers
import sys
import warnings

import numpy as np

from . import normalize as nz
from .errors import MaskError
from .kinds import as_int
from .mask import Mask

# elements of one fn call (one stripe x several column blocks); bounds the temporaries of fn
_CHUNK_ELEMENTS = 1 << 22
# masks with more slices than this use the table-lookup mask_mod
_LOOP_MAX_SLICES = 32
# table path: rows with at most this many intervals are tested linearly, wider ones by bisection
_LINEAR_WIDTH = 4
_BIG = 1 << 62

__all__ = ["from_mask_mod", "to_mask_mod"]


# ------------------------------------------------------------------------------------------
# from_mask_mod
# ------------------------------------------------------------------------------------------


def _nonneg_int(value, what: str) -> int:
    n = as_int(value, f"from_mask_mod: {what}")
    if n < 0:
        raise MaskError(f"from_mask_mod: {what} must be >= 0, got {n}")
    return n


def _is_torch_tensor(x) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def _coerce_result(res, shape):
    """fn's value as a C-contiguous numpy bool array of ``shape``, or (None, why)."""
    if _is_torch_tensor(res):
        if res.dtype != sys.modules["torch"].bool:
            return None, f"returned a tensor of dtype {res.dtype}, not torch.bool"
        res = res.detach().cpu().numpy()
    if isinstance(res, (bool, np.bool_)):
        return np.full(shape, bool(res)), None
    if not isinstance(res, np.ndarray):
        return None, f"returned a {type(res).__name__}, not a bool array"
    if res.dtype != np.bool_:
        return None, f"returned an array of dtype {res.dtype}, not bool"
    if res.shape != shape:
        try:
            res = np.broadcast_to(res, shape)
        except ValueError:
            return None, (
                f"returned shape {tuple(res.shape)}; expected {shape} "
                "(the broadcast of q_idx[:, None] and kv_idx[None, :])"
            )
    return np.ascontiguousarray(res), None


class _Evaluator:
    """Calls fn on index grids, numpy first, torch when numpy inputs do not work."""

    def __init__(self, fn, batch: int, head: int):
        self.fn = fn
        self.batch = batch
        self.head = head
        self.backend = None  # "numpy" | "torch", fixed by the first call
        self.calls = 0

    def _numpy(self, r0, r1, c0, c1):
        q = np.arange(r0, r1, dtype=np.int64)[:, None]
        k = np.arange(c0, c1, dtype=np.int64)[None, :]
        return self.fn(np.int64(self.batch), np.int64(self.head), q, k)

    def _torch(self, r0, r1, c0, c1):
        import torch

        q = torch.arange(r0, r1, dtype=torch.int64)[:, None]
        k = torch.arange(c0, c1, dtype=torch.int64)[None, :]
        b = torch.tensor(self.batch, dtype=torch.int64)
        h = torch.tensor(self.head, dtype=torch.int64)
        return self.fn(b, h, q, k)

    def __call__(self, r0, r1, c0, c1) -> np.ndarray:
        shape = (r1 - r0, c1 - c0)
        self.calls += 1
        where = f"rows [{r0}, {r1}) x columns [{c0}, {c1})"
        if self.backend is None:
            problems = []
            fallback = None
            for backend in ("numpy", "torch"):
                try:
                    if backend == "torch":
                        try:
                            import torch  # noqa: F401
                        except ImportError:
                            problems.append("torch: torch is not installed")
                            break
                    with warnings.catch_warnings(record=True) as caught:
                        warnings.simplefilter("always")
                        res = (self._numpy if backend == "numpy" else self._torch)(r0, r1, c0, c1)
                except Exception as e:  # noqa: BLE001 - any failure means "try the other inputs"
                    problems.append(f"{backend} inputs: raised {type(e).__name__}: {e}")
                    continue
                out, why = _coerce_result(res, shape)
                if out is not None:
                    if backend == "numpy" and caught and fallback is None:
                        # numpy inputs work but warn (often a torch-written fn mixing numpy
                        # and tensors): prefer torch inputs if they work cleanly
                        fallback = (out, caught)
                        continue
                    self.backend = backend
                    return out
                problems.append(f"{backend} inputs: {why}")
            if fallback is not None:
                for w in fallback[1]:
                    warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
                self.backend = "numpy"
                return fallback[0]
            raise MaskError(
                "from_mask_mod: fn must be a vectorisable mask_mod(b, h, q_idx, kv_idx) returning "
                f"a bool array of the broadcast shape (use & | ~, not and/or/not/if); on {where}: "
                + "; ".join(problems)
            )
        try:
            res = (self._numpy if self.backend == "numpy" else self._torch)(r0, r1, c0, c1)
        except Exception as e:  # noqa: BLE001
            raise MaskError(
                f"from_mask_mod: fn raised {type(e).__name__} on {self.backend} inputs, "
                f"{where}: {e}"
            ) from e
        out, why = _coerce_result(res, shape)
        if out is None:
            raise MaskError(f"from_mask_mod: fn {why} on {self.backend} inputs, {where}")
        return out


def _scan_chunk(V, c0, bw, prev_col, sk1, keys, counts):
    """Append the transition keys of chunk ``V`` (R x C bool, C a multiple of ``bw``).

    A transition of row r at column x (V[r, x] != V[r, x-1], with V[r, -1] = False) is stored
    as ``r * sk1 + x``. Tiles that are all-True or all-False have no inner transitions, so only
    tile boundaries and the inside of partial tiles are examined.
    """
    R, C = V.shape
    nb = C // bw
    any_b = V.any(axis=0).reshape(nb, bw).any(axis=1)
    all_b = V.all(axis=0).reshape(nb, bw).all(axis=1)
    partial = any_b & ~all_b
    if counts is not None:
        n_full = int(all_b.sum())
        n_part = int(partial.sum())
        counts[0] += n_full
        counts[1] += nb - n_full - n_part
        counts[2] += n_part
    starts = np.arange(0, C, bw)
    cur = V[:, starts]
    left = np.empty_like(cur)
    left[:, 0] = prev_col
    left[:, 1:] = V[:, starts[1:] - 1]
    r, b = np.nonzero(cur != left)
    if r.size:
        keys.append(r * sk1 + (c0 + starts[b]))
    if bw > 1:
        pidx = np.flatnonzero(partial)
        if pidx.size:
            P = V.reshape(R, nb, bw)[:, pidx, :] if pidx.size < nb else V.reshape(R, nb, bw)
            r, p, t = np.nonzero(P[:, :, 1:] != P[:, :, :-1])
            if r.size:
                keys.append(r * sk1 + (c0 + 1 + pidx[p] * bw + t))
    return V[:, -1]


def _stripe_keys(ev, r0, r1, sk, block, counts):
    """Sorted transition keys ``(row - r0) * (sk + 1) + x`` of rows [r0, r1), all columns."""
    R = r1 - r0
    sk1 = sk + 1
    keys: list[np.ndarray] = []
    prev = np.zeros(R, dtype=bool)
    full_cols = (sk // block) * block
    step = max(1, _CHUNK_ELEMENTS // (R * block)) * block
    c0 = 0
    while c0 < sk:
        c1 = min(c0 + step, full_cols)
        if c1 == full_cols:
            c1 = sk  # the last call also takes the narrower edge tile
        V = ev(r0, r1, c0, c1)
        f = min(c1, full_cols) - c0
        if f:
            prev = _scan_chunk(V[:, :f] if f < c1 - c0 else V, c0, block, prev, sk1, keys, counts)
        if c1 > full_cols:
            prev = _scan_chunk(V[:, f:], c0 + f, c1 - c0 - f, prev, sk1, keys, counts)
        c0 = c1
    last = np.flatnonzero(prev)
    if last.size:
        keys.append(last * sk1 + sk)
    if not keys:
        return np.zeros(0, dtype=np.int64)
    out = np.concatenate(keys).astype(np.int64, copy=False)
    out.sort()
    return out


def _push_stripe(canon: nz.Canon, keys: np.ndarray, r0: int, R: int, sk1: int) -> int:
    """Push rows [r0, r0 + R) given by their sorted transition keys; returns the push count.

    Rows are cut into segments in which every row has the same number of intervals and every
    interval end moves by the same step (0 or 1) from row to row; each segment is one push.
    """
    if keys.size == 0:
        canon.push(r0, r0 + R, ())
        return 1
    rows = keys // sk1
    cols = keys - rows * sk1
    irow = rows[0::2]  # local row of each interval
    E = np.stack([cols[0::2], cols[1::2]], axis=1)  # (m, 2) [start, end)
    m = E.shape[0]
    n = np.bincount(irow, minlength=R)
    # step of interval k from the same interval one row up (rows with equal counts only)
    same = np.zeros(R, dtype=bool)
    same[1:] = n[1:] == n[:-1]
    nk = n[irow]
    valid = same[irow]
    prevk = np.where(valid, np.arange(m) - nk, 0)
    step = np.where(valid[:, None], E - E[prevk], 2)
    bad_a = ((step != 0) & (step != 1)).any(axis=1)
    cond_a = same & (np.bincount(irow[bad_a], minlength=R) == 0)
    # B: the step repeats the previous row's step (so the row continues a straight band)
    ok_prev = cond_a[np.maximum(irow - 1, 0)] & valid
    bad_b = ok_prev & (step != step[prevk]).any(axis=1)
    cond_b = cond_a.copy()
    cond_b[1:] &= cond_a[:-1]
    cond_b &= np.bincount(irow[bad_b], minlength=R) == 0
    cond_b[0] = False
    seg_start = np.flatnonzero(~cond_b)
    seg_end = np.append(seg_start[1:], R)
    seg_len = seg_end - seg_start
    # lines of the first row of each segment
    off = np.zeros(R + 1, dtype=np.int64)
    np.cumsum(n, out=off[1:])
    first_n = n[seg_start]
    kf = np.repeat(off[seg_start], first_n) + (
        np.arange(int(first_n.sum())) - np.repeat(np.cumsum(first_n) - first_n, first_n)
    )
    long = np.repeat(seg_len >= 2, first_n)
    nxt = np.where(long, np.minimum(kf + n[irow[kf]], m - 1), kf)
    slope = np.where(long[:, None], step[nxt], 0)
    c = E[kf] - slope * (r0 + irow[kf])[:, None]
    cl = c.ravel().tolist()
    sl = slope.ravel().tolist()
    pos = 0
    for s, e, cnt in zip(seg_start.tolist(), seg_end.tolist(), (2 * first_n).tolist()):
        canon.push(r0 + s, r0 + e, tuple(zip(cl[pos : pos + cnt], sl[pos : pos + cnt])))
        pos += cnt
    return len(seg_start)


class _BandRows:
    """Transition keys of a canonical mask, stripe by stripe (rows in increasing order)."""

    def __init__(self, mask: Mask):
        b = mask.bands
        self.R0, self.R1, self.AC, self.AS, self.BC, self.BS = (b[:, t] for t in range(6))
        self.sk1 = mask.sk + 1
        self.active = np.zeros(0, dtype=np.int64)
        self.ptr = 0

    def keys(self, r0: int, r1: int) -> np.ndarray:
        end = int(np.searchsorted(self.R0, r1, side="left"))  # canonical order: r0 sorted
        act = self.active
        act = np.concatenate([act[self.R1[act] > r0], np.arange(self.ptr, end, dtype=np.int64)])
        self.active, self.ptr = act, end
        lo = np.maximum(self.R0[act], r0)
        hi = np.minimum(self.R1[act], r1)
        cnt = np.maximum(hi - lo, 0)
        total = int(cnt.sum())
        bidx = np.repeat(act, cnt)
        rows = np.repeat(lo, cnt) + (np.arange(total) - np.repeat(np.cumsum(cnt) - cnt, cnt))
        a = self.AC[bidx] + self.AS[bidx] * rows
        b = self.BC[bidx] + self.BS[bidx] * rows
        base = (rows - r0) * self.sk1
        out = np.concatenate([base + a, base + b])
        out.sort()
        return out


def from_mask_mod(
    fn,
    sq: int,
    sk: int | None = None,
    *,
    block: int = 128,
    batch: int = 0,
    head: int = 0,
    stats: dict | None = None,
    verify: bool = True,
) -> Mask:
    """The exact `Mask` of a FlexAttention-style ``mask_mod(b, h, q_idx, kv_idx) -> bool``.

    ``fn`` is called with ``q_idx`` of shape ``[rows, 1]`` and ``kv_idx`` of shape ``[1, cols]``
    (int64), ``b = batch`` and ``h = head``: first as numpy arrays / numpy scalars; if that raises
    or does not give a bool array of shape ``[rows, cols]`` (or one that broadcasts to it), as
    torch tensors (0-d ``b``, ``h``), imported lazily. So ``fn`` must be vectorisable
    (``&``, ``|``, ``~``, comparisons, tensor lookups such as ``doc[q] == doc[k]``), as
    FlexAttention requires too.

    The scan walks stripes of ``block`` query rows and evaluates several ``block``-wide column
    blocks per call; every ``block x block`` tile is classified empty, full or partial and only
    partial tiles are scanned per element. The recovered mask is checked against a second
    evaluation of ``fn`` unless ``verify=False``; a mismatch (``fn`` not deterministic) raises
    `MaskError`.

    ``stats``: pass a dict to receive ``backend`` ('numpy' or 'torch'), ``blocks_full``,
    ``blocks_empty``, ``blocks_partial`` (tiles of the first scan, edge tiles included),
    ``fn_calls`` (both scans), ``pushes`` (multi-row bands handed to the canonicaliser),
    ``slices`` and ``verified``.
    """
    if not callable(fn):
        raise MaskError(
            "from_mask_mod: fn must be callable as mask_mod(b, h, q_idx, kv_idx) -> bool, "
            f"got {type(fn).__name__}"
        )
    sq = _nonneg_int(sq, "sq")
    sk = sq if sk is None else _nonneg_int(sk, "sk")
    block = as_int(block, "from_mask_mod: block")
    if block < 1:
        raise MaskError(f"from_mask_mod: block must be >= 1, got {block}")
    batch = _nonneg_int(batch, "batch")
    head = _nonneg_int(head, "head")
    if stats is not None and not isinstance(stats, dict):
        raise MaskError(f"from_mask_mod: stats must be a dict or None, got {type(stats).__name__}")

    ev = _Evaluator(fn, batch, head)
    counts = [0, 0, 0]  # full, empty, partial tiles
    pushes = 0
    canon = nz.Canon()
    if sq and sk:
        for r0 in range(0, sq, block):
            r1 = min(r0 + block, sq)
            keys = _stripe_keys(ev, r0, r1, sk, block, counts)
            pushes += _push_stripe(canon, keys, r0, r1 - r0, sk + 1)
    mask = Mask._from_bands(canon.result(), sq, sk)

    verified = False
    if verify and sq and sk:
        expect = _BandRows(mask)
        for r0 in range(0, sq, block):
            r1 = min(r0 + block, sq)
            got = _stripe_keys(ev, r0, r1, sk, block, None)
            want = expect.keys(r0, r1)
            if not np.array_equal(got, want):
                row = _first_bad_row(got, want, sk + 1) + r0
                raise MaskError(
                    f"from_mask_mod: fn is not deterministic: a second evaluation of query row "
                    f"{row} differs from the first (the mask recovered from the first scan)"
                )
        verified = True

    if stats is not None:
        stats.update(
            backend=ev.backend,
            blocks_full=counts[0],
            blocks_empty=counts[1],
            blocks_partial=counts[2],
            fn_calls=ev.calls,
            pushes=pushes,
            slices=len(mask),
            verified=verified,
        )
    return mask


def _first_bad_row(got: np.ndarray, want: np.ndarray, sk1: int) -> int:
    n = min(got.size, want.size)
    diff = np.flatnonzero(got[:n] != want[:n])
    if diff.size:
        return int(min(got[diff[0]], want[diff[0]]) // sk1)
    return int((got[n] if got.size > n else want[n]) // sk1)


# ------------------------------------------------------------------------------------------
# to_mask_mod
# ------------------------------------------------------------------------------------------


class _Tables:
    """Row -> row-group table and per-group interval lines (numpy; torch copies cached).

    Canonical bands that cover a row all share its row range (one group per row range), so a
    row's intervals are its group's lines. Index ``q + 1`` (clamped to ``[0, sq + 1]``) keeps
    out-of-range rows on the last, empty group.

    Groups of at most `_LINEAR_WIDTH` intervals: ``lines[t] = (ac, as, bc, bs)``, each indexed by
    group (padding ``k >= 0 and k < 0``: never allowed), tested one after another. Wider rows:
    the row's ``2 * width`` ends ``c + s*q`` (strictly increasing along a row) are stored flat,
    ``P`` slots per group padded with a huge constant; a branchless binary search counts the
    ends ``<= k`` and the pair is allowed when that count is odd.
    """

    def __init__(self, mask: Mask):
        b = mask.bands
        sq = mask.sq
        r0 = b[:, nz.R0]
        starts, gid, sizes = np.unique(r0, return_inverse=True, return_counts=True)
        g = starts.size
        self.width = width = int(sizes.max()) if g else 0
        row_group = np.full(sq + 2, g, dtype=np.int64)
        first = np.searchsorted(r0, starts)
        lens = b[first, nz.R1] - starts
        rows = np.repeat(starts, lens) + (
            np.arange(int(lens.sum())) - np.repeat(np.cumsum(lens) - lens, lens)
        )
        row_group[rows + 1] = np.repeat(np.arange(g), lens)
        slot = np.arange(b.shape[0]) - first[gid]
        self.row_group = row_group
        self.sq = sq
        self.linear = width <= _LINEAR_WIDTH
        if self.linear:
            tabs = []
            for col in (nz.AC, nz.AS, nz.BC, nz.BS):
                t = np.zeros((width, g + 1), dtype=np.int64)
                t[slot, gid] = b[:, col]
                tabs.append(t)
            self.lines = [tuple(t[s] for t in tabs) for s in range(width)]
        else:
            p = 1 << int(2 * width).bit_length()  # a power of two > 2 * width
            self.p = p
            self.steps = [p >> (u + 1) for u in range(p.bit_length() - 1)]
            c = np.full((g + 1, p), _BIG, dtype=np.int64)
            s = np.zeros((g + 1, p), dtype=np.int64)
            c[gid, 2 * slot] = b[:, nz.AC]
            s[gid, 2 * slot] = b[:, nz.AS]
            c[gid, 2 * slot + 1] = b[:, nz.BC]
            s[gid, 2 * slot + 1] = b[:, nz.BS]
            self.ends = (c.ravel(), s.ravel())
        self._torch = {}

    def for_numpy(self):
        return self.row_group, (self.lines if self.linear else self.ends)

    def for_torch(self, device):
        key = str(device)
        hit = self._torch.get(key)
        if hit is None:
            import torch

            rg = torch.as_tensor(self.row_group, device=device)
            if self.linear:
                data = [tuple(torch.as_tensor(t, device=device) for t in ln) for ln in self.lines]
            else:
                data = tuple(torch.as_tensor(t, device=device) for t in self.ends)
            hit = self._torch[key] = (rg, data)
        return hit

    def evaluate(self, q, k, kind):
        if kind == "torch":
            torch = sys.modules["torch"]
            device = q.device if _is_torch_tensor(q) else k.device
            rg, data = self.for_torch(device)
            if not _is_torch_tensor(q):
                q = torch.as_tensor(q, device=device)
            g = rg[(q + 1).clamp(0, self.sq + 1)]
            where = torch.where
        else:
            rg, data = self.for_numpy()
            q = np.asarray(q, dtype=np.int64)
            g = rg[np.clip(q + 1, 0, self.sq + 1)]
            where = np.where
        if self.linear:
            out = (q < q) & (k < k)  # all False, broadcast shape and type
            for ac, a_s, bc, b_s in data:
                out = out | ((k >= ac[g] + a_s[g] * q) & (k < bc[g] + b_s[g] * q))
            return out
        c, s = data
        base = g * self.p - 1
        pos = (q < q) & (k < k)  # no ends counted yet (False, made an integer 0 below)
        pos = pos * 0 if kind == "torch" else pos.astype(np.int64)
        for step in self.steps:
            cand = pos + step
            idx = base + cand
            pos = where(c[idx] + s[idx] * q <= k, cand, pos)
        return (pos & 1) == 1


def to_mask_mod(mask: Mask):
    """A FlexAttention ``mask_mod(b, h, q_idx, kv_idx)`` deciding membership in ``mask``.

    Works on torch tensors (any device; also the 0-d tensors FlexAttention passes under
    ``vmap``), numpy arrays and ints, broadcasting ``q_idx`` against ``kv_idx``; ``b`` and ``h``
    are ignored. Returns a bool tensor / array (a Python bool for two ints).

    Cost per evaluated pair: with at most 32 slices, a loop over the slices
    (``(q >= qs) & (q < qe) & (k >= a(q)) & (k < b(q))``, about 6 elementwise ops per slice);
    with more, a table lookup independent of the number of slices: one gather of the row's
    group, then, when no row has more than 4 intervals, per interval of the widest row 4
    gathers and 6 elementwise ops; for wider rows a bisection over the row's interval ends,
    ``log2(P)`` rounds of 2 gathers and 4 elementwise ops (``P``: the next power of two above
    twice the widest row's interval count). The tables (O(sq + groups * P) int64) are built
    once, copied to the index tensor's device on first use there and cached.
    The function carries the mask as its ``.mask`` attribute.
    """
    if not isinstance(mask, Mask):
        raise MaskError(f"to_mask_mod: expected a Mask, got {type(mask).__name__}")
    bands = [tuple(int(v) for v in row) for row in mask.bands.tolist()]

    if len(bands) <= _LOOP_MAX_SLICES:

        def mask_mod(b, h, q_idx, kv_idx):
            q, k, kind = _prepare(q_idx, kv_idx)
            out = (q < q) & (k < k)  # all False, broadcast shape and type
            for r0, r1, ac, a_s, bc, b_s in bands:
                lo = (k >= ac + q) if a_s else (k >= ac)
                hi = (k < bc + q) if b_s else (k < bc)
                out = out | ((q >= r0) & (q < r1) & lo & hi)
            return _finish(out, kind)

    else:
        tables = _Tables(mask)

        def mask_mod(b, h, q_idx, kv_idx):
            q, k, kind = _prepare(q_idx, kv_idx)
            return _finish(tables.evaluate(q, k, kind), kind)

    mask_mod.mask = mask
    mask_mod.__doc__ = f"mask_mod of {mask!r}"
    return mask_mod


def _prepare(q, k):
    """Normalise the index arguments: torch if either is a tensor, else numpy / Python ints."""
    tq, tk = _is_torch_tensor(q), _is_torch_tensor(k)
    if tq or tk:
        torch = sys.modules["torch"]
        if not tq and not isinstance(q, numbers.Integral):
            q = torch.as_tensor(np.asarray(q), device=k.device)
        if not tk and not isinstance(k, numbers.Integral):
            k = torch.as_tensor(np.asarray(k), device=q.device)
        return q, k, "torch"
    if isinstance(q, numbers.Integral) and isinstance(k, numbers.Integral):
        return int(q), int(k), "int"
    return np.asarray(q), np.asarray(k), "numpy"


def _finish(out, kind):
    if kind == "int":
        return bool(out)
    return out
