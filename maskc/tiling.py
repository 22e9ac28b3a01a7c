"""Lowering: a `Mask` -> a `TilePlan` of per-tile work lists for the FFA kernels.

The ``[0, sq) x [0, sk)`` plane is cut into ``block_q x block_k`` tiles. Every query tile gets

* **FULL runs**: maximal runs of consecutive key tiles in which every pair of the tile is allowed
  (the kernel runs them with no masking arithmetic at all), and
* **PARTIAL tiles**: key tiles that are touched but not full, each with the ids of the slices that
  touch it; the kernel evaluates those slices' predicates arithmetically (no mask tensor).

The transposed lists (per key tile: FULL runs of query tiles, PARTIAL query tiles) drive the
dK/dV backward. Query tiles and key tiles are ordered heaviest first (LPT) for the grid.

Method (vectorised, O(slices + tiles with work)): each slice is cut into *pieces*, one per tile
row it crosses. A piece touches the key tiles under its bounding interval ``[a(first row),
b(last row))`` and covers in full those inside ``[a(last row), b(first row))``. One sorted sweep
of the pieces' start/end events per query tile then classifies runs of key tiles: *full* where the
rows whose piece covers the tile add up to the tile's height (slices are disjoint, so rows are not
counted twice), *partial* where something touches it. Full runs never need expanding tile by tile,
so a 4M-token video mask lowers in milliseconds.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import numpy as np

from .errors import MaskError
from .kinds import Kind, as_int
from .mask import Mask
from .normalize import sweep

_LISTS = ("full_ptr", "full_runs", "part_ptr", "part_tiles", "pred_ptr", "preds", "order")


def _cdiv(a, b):
    return -(-a // b)


@dataclass(frozen=True)
class TileLists:
    """Work lists of one orientation (outer tiles -> inner tiles), as flat int32 arrays.

    ``full_ptr[t]:full_ptr[t+1]`` indexes ``full_runs`` (``[start, end)`` inner-tile runs) of outer
    tile t; ``part_ptr[t]:part_ptr[t+1]`` indexes ``part_tiles`` (inner tile ids) and, per partial
    tile p, ``pred_ptr[p]:pred_ptr[p+1]`` indexes ``preds`` (slice ids into `TilePlan.bands`).
    ``order`` lists outer tiles heaviest first.
    """

    full_ptr: np.ndarray
    full_runs: np.ndarray
    part_ptr: np.ndarray
    part_tiles: np.ndarray
    pred_ptr: np.ndarray
    preds: np.ndarray
    order: np.ndarray

    @property
    def n_outer(self) -> int:
        return self.full_ptr.shape[0] - 1

    @property
    def n_full_tiles(self) -> int:
        r = self.full_runs
        return int((r[:, 1] - r[:, 0]).sum()) if r.size else 0

    @property
    def n_partial_tiles(self) -> int:
        return int(self.part_tiles.shape[0])

    def work(self, t: int):
        """Readable work list of outer tile t: ``[("full", start, end) | ("partial", tile, (slice ids))]``."""
        out = [("full", int(a), int(b)) for a, b in self.full_runs[self.full_ptr[t] : self.full_ptr[t + 1]]]
        for p in range(self.part_ptr[t], self.part_ptr[t + 1]):
            ids = tuple(int(x) for x in self.preds[self.pred_ptr[p] : self.pred_ptr[p + 1]])
            out.append(("partial", int(self.part_tiles[p]), ids))
        return out

    def cost(self, partial_weight: float = 1.5) -> np.ndarray:
        """Per outer tile: full tiles + partial_weight * partial tiles (the LPT key)."""
        runs = (self.full_runs[:, 1] - self.full_runs[:, 0]).astype(np.int64)
        csum = _ptr(runs)
        full = csum[self.full_ptr[1:]] - csum[self.full_ptr[:-1]]
        part = np.diff(self.part_ptr)
        return full + partial_weight * part

    def to_dict(self) -> dict:
        return {k: getattr(self, k).tolist() for k in _LISTS}

    @classmethod
    def from_dict(cls, d: dict) -> "TileLists":
        arrs = {}
        for k in _LISTS:
            a = np.asarray(d[k], dtype=np.int32)
            if k == "full_runs":
                a = a.reshape(-1, 2)
            a.flags.writeable = False
            arrs[k] = a
        return cls(**arrs)


def _ro(a, shape=None) -> np.ndarray:
    a = np.ascontiguousarray(a, dtype=np.int32)
    if shape is not None:
        a = a.reshape(shape)
    a.flags.writeable = False
    return a


def _ptr(counts) -> np.ndarray:
    """CSR pointer ``[0, c0, c0 + c1, ...]`` of per-item counts (np.r_ is slow on small arrays)."""
    return np.concatenate((np.zeros(1, np.int64), np.cumsum(counts)))


def _classify(bands: np.ndarray, outer_len: int, inner_len: int, b_out: int, b_in: int) -> dict:
    """The pieces of ``bands`` (one per band and outer tile) and the elementary intervals of
    inner tiles per outer tile, each classified full / partial (the first half of `_tile_lists`)."""
    n_in = _cdiv(inner_len, b_in)
    r0, r1, ac, a_s, bc, b_s = (bands[:, c].astype(np.int64) for c in range(6))
    # ---- pieces: one per (band, outer tile) ----
    t_first = r0 // b_out
    cnt = (r1 - 1) // b_out - t_first + 1
    band = np.repeat(np.arange(bands.shape[0]), cnt)
    offs = np.cumsum(cnt) - cnt
    ot = t_first[band] + (np.arange(band.shape[0]) - offs[band])
    t0 = np.maximum(r0[band], ot * b_out)
    t1 = np.minimum(r1[band], (ot + 1) * b_out)
    pac, pas, pbc, pbs = ac[band], a_s[band], bc[band], b_s[band]
    a_first, a_last = pac + pas * t0, pac + pas * (t1 - 1)
    b_first, b_last = pbc + pbs * t0, pbc + pbs * (t1 - 1)
    touch0, touch1 = a_first // b_in, _cdiv(b_last, b_in)
    full0, full1 = _cdiv(a_last, b_in), b_first // b_in
    has_full = full1 > full0
    w = t1 - t0
    # ---- events, swept per outer tile ----
    stride = n_in + 1
    nf = int(has_full.sum())
    pos = np.concatenate([touch0, touch1, full0[has_full], full1[has_full]])
    otile = np.concatenate([ot, ot, ot[has_full], ot[has_full]])
    d_touch = np.concatenate([np.ones_like(ot), -np.ones_like(ot), np.zeros(2 * nf, np.int64)])
    d_full = np.concatenate([np.zeros(2 * ot.shape[0], np.int64), w[has_full], -w[has_full]])
    key = otile * stride + pos
    order = np.argsort(key)  # ties need no order: only the state after the last event counts
    key, otile, pos = key[order], otile[order], pos[order]
    c_touch = np.cumsum(d_touch[order])
    c_full = np.cumsum(d_full[order])
    last = np.ones(key.shape[0], dtype=bool)  # state after the last event at each position
    last[:-1] = key[1:] != key[:-1]
    otile, pos, c_touch, c_full = otile[last], pos[last], c_touch[last], c_full[last]
    nxt = np.zeros_like(pos)
    nxt[:-1] = pos[1:]
    same = np.zeros(pos.shape[0], dtype=bool)
    same[:-1] = otile[1:] == otile[:-1]
    seg = same & (nxt > pos)  # elementary interval [pos, nxt) of outer tile otile
    height = np.minimum((otile + 1) * b_out, outer_len) - otile * b_out
    is_full = seg & (c_full == height)
    is_part = seg & (c_touch > 0) & ~is_full
    return dict(band=band, ot=ot, touch0=touch0, touch1=touch1, stride=stride, otile=otile, pos=pos, nxt=nxt,
                is_full=is_full, is_part=is_part)


def _tile_counts(bands: np.ndarray, outer_len: int, inner_len: int, b_out: int, b_in: int) -> tuple[int, int]:
    """``(full tiles, partial tiles)`` of the lists `_tile_lists` would build, without building them."""
    if bands.shape[0] == 0 or outer_len == 0:
        return 0, 0
    c = _classify(bands, outer_len, inner_len, b_out, b_in)
    span = c["nxt"] - c["pos"]
    return int(span[c["is_full"]].sum()), int(span[c["is_part"]].sum())


def _tile_lists(bands: np.ndarray, outer_len: int, inner_len: int, b_out: int, b_in: int) -> TileLists:
    """Work lists for disjoint bands ``(r0, r1, ac, as, bc, bs)`` over outer x inner tiles."""
    n_out = _cdiv(outer_len, b_out)
    empty_ptr = np.zeros(n_out + 1, dtype=np.int64)
    if bands.shape[0] == 0 or n_out == 0:
        return TileLists(
            _ro(empty_ptr), _ro(np.zeros((0, 2)), (-1, 2)), _ro(empty_ptr), _ro([]), _ro([0]), _ro([]),
            _ro(np.arange(n_out)),
        )
    c = _classify(bands, outer_len, inner_len, b_out, b_in)
    band, ot, touch0, touch1, stride = c["band"], c["ot"], c["touch0"], c["touch1"], c["stride"]
    otile, pos, nxt, is_full, is_part = c["otile"], c["pos"], c["nxt"], c["is_full"], c["is_part"]
    # ---- full runs: merge contiguous full intervals ----
    f_idx = np.nonzero(is_full)[0]
    f_ot, f_lo, f_hi = otile[f_idx], pos[f_idx], nxt[f_idx]
    if f_idx.size:
        join = np.zeros(f_idx.size, dtype=bool)
        join[1:] = (f_ot[1:] == f_ot[:-1]) & (f_lo[1:] == f_hi[:-1])
        starts = np.nonzero(~join)[0]
        ends = np.append(starts[1:], f_idx.size) - 1
        runs = np.stack([f_lo[starts], f_hi[ends]], axis=1)
        run_ot = f_ot[starts]
    else:
        runs = np.zeros((0, 2), np.int64)
        run_ot = np.zeros(0, np.int64)
    full_ptr = _ptr(np.bincount(run_ot, minlength=n_out))
    # ---- partial tiles, expanded ----
    p_idx = np.nonzero(is_part)[0]
    p_len = nxt[p_idx] - pos[p_idx]
    p_rep = np.repeat(np.arange(p_idx.size), p_len)
    p_off = np.cumsum(p_len) - p_len
    p_tile = pos[p_idx][p_rep] + (np.arange(p_rep.size) - p_off[p_rep])
    p_ot = otile[p_idx][p_rep]
    p_key = p_ot * stride + p_tile  # sorted
    part_ptr = _ptr(np.bincount(p_ot, minlength=n_out))
    # ---- predicates: pieces whose touched tiles include the partial tile ----
    lo = np.searchsorted(p_key, ot * stride + touch0)
    hi = np.searchsorted(p_key, ot * stride + touch1)
    n_hit = hi - lo
    piece = np.repeat(np.arange(ot.shape[0]), n_hit)
    h_off = np.cumsum(n_hit) - n_hit
    which = lo[piece] + (np.arange(piece.size) - h_off[piece])
    srt = np.lexsort((band[piece], which))
    which, pred_band = which[srt], band[piece][srt]
    pred_ptr = _ptr(np.bincount(which, minlength=p_key.size))
    tl = TileLists(
        _ro(full_ptr), _ro(runs, (-1, 2)), _ro(part_ptr), _ro(p_tile), _ro(pred_ptr), _ro(pred_band),
        _ro(np.zeros(n_out)),
    )
    lpt = np.argsort(-tl.cost(), kind="stable")
    return TileLists(tl.full_ptr, tl.full_runs, tl.part_ptr, tl.part_tiles, tl.pred_ptr, tl.preds, _ro(lpt))


def _pred_kinds(tl: TileLists, bands: np.ndarray) -> frozenset:
    """Kinds of the slices that touch partial tiles of `tl` (band slopes give the kind)."""
    if not tl.preds.size:
        return frozenset()
    ids = np.unique(tl.preds)
    return frozenset(Kind(int(k)) for k in np.unique(2 * bands[ids, 3] + bands[ids, 5]))


def transpose_bands(bands: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Column bands of row bands: per key column j, rows ``[lo(j), hi(j))`` are lines in j.

    Returns ``(col_bands, source)``: col_bands (m, 6) over columns, ``source[t]`` the row band it
    came from. A slice splits into at most three column pieces where its row limits start to move.
    """
    out, src = [], []
    for t, (r0, r1, ac, a_s, bc, b_s) in enumerate(bands.tolist()):
        ks = ac + a_s * r0
        ke = bc + b_s * (r1 - 1)
        # first row of column j: b(i) > j  ->  i >= j - bc + 1 (slope-1 end), else r0
        # last row + 1 of column j: a(i) <= j  ->  i <= j - ac  (slope-1 start), else r1
        cuts = {ks, ke}
        if b_s:
            cuts.add(min(max(r0 + bc - 1, ks), ke))
        if a_s:
            cuts.add(min(max(r1 + ac - 1, ks), ke))
        cuts = sorted(cuts)
        for c0, c1 in zip(cuts[:-1], cuts[1:]):
            if c1 <= c0:
                continue
            if b_s and c0 - bc + 1 >= r0:
                lo = (1 - bc, 1)
            else:
                lo = (r0, 0)
            if a_s and c0 - ac + 1 < r1:
                hi = (1 - ac, 1)
            else:
                hi = (r1, 0)
            out.append((c0, c1, lo[0], lo[1], hi[0], hi[1]))
            src.append(t)
    if not out:
        return np.zeros((0, 6), np.int64), np.zeros(0, np.int64)
    return np.array(out, dtype=np.int64), np.array(src, dtype=np.int64)


@dataclass(frozen=True)
class TilePlan:
    """Everything the FFA kernels need for one (mask, block_q, block_k), as flat int32 arrays.

    ``bands`` holds the mask's slices in band form ``(r0, r1, ac, as, bc, bs)``: pair (i, j) of
    slice t is allowed when ``r0 <= i < r1`` and ``ac + as*i <= j < bc + bs*i``.
    ``bands_t`` is the same set in column form: pair (i, j) of column band t is allowed when
    ``r0 <= j < r1`` and ``ac + as*j <= i < bc + bs*j``.
    ``fwd`` lists per query tile (forward, dQ) with predicates into ``bands``; ``bwd`` per key
    tile (dK, dV) with predicates into ``bands_t``.
    """

    sq: int
    sk: int
    block_q: int
    block_k: int
    mask_digest: str
    bands: np.ndarray
    bands_t: np.ndarray
    fwd: TileLists
    bwd: TileLists
    partial_kinds: frozenset = field(default_factory=frozenset)

    @property
    def n_q_tiles(self) -> int:
        return _cdiv(self.sq, self.block_q)

    @property
    def n_k_tiles(self) -> int:
        return _cdiv(self.sk, self.block_k)

    @property
    def max_preds(self) -> int:
        """Most slices touching one partial tile (both orientations)."""
        m = 0
        for tl in (self.fwd, self.bwd):
            if tl.pred_ptr.size > 1:
                m = max(m, int(np.diff(tl.pred_ptr).max()))
        return m

    def list_kinds(self, which: str) -> frozenset:
        """Kinds of the slices in the partial tiles of ``which`` ("fwd": row bands, "bwd": column bands)."""
        return _pred_kinds(getattr(self, which), self.bands if which == "fwd" else self.bands_t)

    def __repr__(self) -> str:
        return (
            f"TilePlan(sq={self.sq}, sk={self.sk}, block={self.block_q}x{self.block_k}, "
            f"{self.n_q_tiles}x{self.n_k_tiles} tiles: {self.fwd.n_full_tiles} full in "
            f"{self.fwd.full_runs.shape[0]} runs, {self.fwd.n_partial_tiles} partial "
            f"(kinds {sorted(k.name for k in self.partial_kinds)}), {self.bands.shape[0]} slices)"
        )

    def to_dict(self) -> dict:
        return {
            "format": "maskc.tileplan",
            "version": 1,
            "sq": self.sq,
            "sk": self.sk,
            "block_q": self.block_q,
            "block_k": self.block_k,
            "mask_digest": self.mask_digest,
            "bands": self.bands.tolist(),
            "bands_t": self.bands_t.tolist(),
            "fwd": self.fwd.to_dict(),
            "bwd": self.bwd.to_dict(),
            "partial_kinds": sorted(int(k) for k in self.partial_kinds),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, data) -> "TilePlan":
        if isinstance(data, (str, bytes)):
            data = json.loads(data)
        if data.get("format") != "maskc.tileplan":
            raise MaskError(f"tile plan JSON: format is {data.get('format')!r}, expected 'maskc.tileplan'")
        return cls(
            sq=data["sq"],
            sk=data["sk"],
            block_q=data["block_q"],
            block_k=data["block_k"],
            mask_digest=data["mask_digest"],
            bands=_ro(np.asarray(data["bands"], dtype=np.int64), (-1, 6)),
            bands_t=_ro(np.asarray(data["bands_t"], dtype=np.int64), (-1, 6)),
            fwd=TileLists.from_dict(data["fwd"]),
            bwd=TileLists.from_dict(data["bwd"]),
            partial_kinds=frozenset(Kind(k) for k in data["partial_kinds"]),
        )

    def digest(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()

    def coverage(self) -> np.ndarray:
        """Dense int [sq, sk]: how many times each pair is computed by the forward lists (tests)."""
        cov = np.zeros((self.sq, self.sk), dtype=np.int64)
        bq, bk = self.block_q, self.block_k
        fw = self.fwd
        for t in range(self.n_q_tiles):
            rows = slice(t * bq, min((t + 1) * bq, self.sq))
            for a, b in fw.full_runs[fw.full_ptr[t] : fw.full_ptr[t + 1]]:
                cov[rows, a * bk : min(b * bk, self.sk)] += 1
            for p in range(fw.part_ptr[t], fw.part_ptr[t + 1]):
                kt = int(fw.part_tiles[p])
                cols = slice(kt * bk, min((kt + 1) * bk, self.sk))
                i = np.arange(rows.start, rows.stop)[:, None]
                j = np.arange(cols.start, cols.stop)[None, :]
                hit = np.zeros((i.shape[0], j.shape[1]), dtype=bool)
                for s in fw.preds[fw.pred_ptr[p] : fw.pred_ptr[p + 1]]:
                    r0, r1, ac, a_s, bc, b_s = self.bands[s].tolist()
                    hit |= (i >= r0) & (i < r1) & (j >= ac + a_s * i) & (j < bc + b_s * i)
                cov[rows, cols] += hit
        return cov

    def ascii(self, width: int = 64) -> str:
        """Tile picture: '#' full tile, '+' partial tile, '.' no work (downsampled)."""
        nq, nk = self.n_q_tiles, self.n_k_tiles
        grid = np.zeros((nq, nk), dtype=np.int8)
        fw = self.fwd
        for t in range(nq):
            for a, b in fw.full_runs[fw.full_ptr[t] : fw.full_ptr[t + 1]]:
                grid[t, a:b] = 2
            grid[t, fw.part_tiles[fw.part_ptr[t] : fw.part_ptr[t + 1]]] = 1
        fy = max(1, _cdiv(nq, width // 2))
        fx = max(1, _cdiv(nk, width))
        lines = []
        for y in range(0, nq, fy):
            row = ""
            for x in range(0, nk, fx):
                cell = grid[y : y + fy, x : x + fx]
                row += "#" if (cell == 2).all() else "+" if cell.any() else "."
            lines.append(row)
        return "\n".join(lines) + f"\n{self!r}"


_COLUMN_BANDS: dict = {}


def column_bands(mask: Mask) -> np.ndarray:
    """The canonical column bands of `mask` (the dK/dV orientation), computed once per mask
    content (every block size shares them)."""
    key = mask.digest()
    hit = _COLUMN_BANDS.get(key)
    if hit is None:
        cols, _ = transpose_bands(np.asarray(mask.bands, dtype=np.int64))
        hit = sweep([cols], [False, True], mask.sk, mask.sq)
        hit.flags.writeable = False
        if len(_COLUMN_BANDS) >= 256:
            _COLUMN_BANDS.clear()
        _COLUMN_BANDS[key] = hit
    return hit


def tile_counts(mask: Mask, block_q: int, block_k: int, which: str = "fwd") -> tuple[int, int]:
    """``(full tiles, partial tiles)`` of ``lower(mask, block_q, block_k).<which>`` without building
    the lists (about half the work): what choosing a tile config needs."""
    if which == "fwd":
        return _tile_counts(np.asarray(mask.bands, dtype=np.int64), mask.sq, mask.sk, block_q, block_k)
    if which == "bwd":
        return _tile_counts(column_bands(mask), mask.sk, mask.sq, block_k, block_q)
    raise MaskError(f"tile_counts: which must be 'fwd' or 'bwd', got {which!r}")


class _PartialTilePlan(TilePlan):
    """A `TilePlan` lowered for one orientation (``lower(..., only=...)``): the other one (and
    whatever needs both) is lowered the first time it is read, so the result is indistinguishable
    from a full lowering, only cheaper when one kernel needs one orientation."""

    _LAZY = frozenset(("fwd", "bwd", "bands_t", "partial_kinds"))

    def __getattribute__(self, name):
        if name in _PartialTilePlan._LAZY:
            value = object.__getattribute__(self, name)
            if value is None:
                full = lower(object.__getattribute__(self, "_source"), self.block_q, self.block_k)
                for f in _PartialTilePlan._LAZY:
                    object.__setattr__(self, f, getattr(full, f))
                value = object.__getattribute__(self, name)
            return value
        return object.__getattribute__(self, name)


def lower(mask: Mask, block_q: int = 128, block_k: int = 128, only: str | None = None) -> TilePlan:
    """Lower a mask to per-tile work lists (see module docstring). ``only="fwd"`` or ``"bwd"``
    builds that orientation now and the other one when first read (what a single kernel needs)."""
    if not isinstance(mask, Mask):
        raise MaskError(f"lower(): expected a Mask, got {type(mask).__name__}")
    block_q = as_int(block_q, "block_q")
    block_k = as_int(block_k, "block_k")
    for name, b in (("block_q", block_q), ("block_k", block_k)):
        if b < 1 or b & (b - 1):
            raise MaskError(f"lower(): {name} must be a power of two >= 1, got {b}")
    if only not in (None, "fwd", "bwd"):
        raise MaskError(f"lower(): only must be None, 'fwd' or 'bwd', got {only!r}")
    bands = np.asarray(mask.bands, dtype=np.int64)
    fwd = bwd = bands_t = kinds = None
    if only != "bwd":
        fwd = _tile_lists(bands, mask.sq, mask.sk, block_q, block_k)
    if only != "fwd":
        # the backward walks key tiles: tile the canonical *column* bands of the same set
        bands_t = _ro(column_bands(mask), (-1, 6))
        bwd = _tile_lists(bands_t, mask.sk, mask.sq, block_k, block_q)
    if only is None:
        kinds = frozenset(_pred_kinds(fwd, bands) | _pred_kinds(bwd, bands_t))
    plan = (TilePlan if only is None else _PartialTilePlan)(
        sq=mask.sq,
        sk=mask.sk,
        block_q=block_q,
        block_k=block_k,
        mask_digest=mask.digest(),
        bands=_ro(bands, (-1, 6)),
        bands_t=bands_t,
        fwd=fwd,
        bwd=bwd,
        partial_kinds=kinds,
    )
    if only is not None:
        object.__setattr__(plan, "_source", mask)
    return plan


KERNEL_LISTS = ("bands", "full_ptr", "full_runs", "few_ptr", "few", "many_ptr", "many_tiles", "many_pred_ptr", "many_preds", "order")
INLINE_PREDS = 2  # predicates stored inline with a partial tile (the common case: 1 or 2)


def kernel_lists(plan: TilePlan, which: str = "fwd") -> dict[str, np.ndarray]:
    """The flat int32 arrays one kernel reads, in `KERNEL_LISTS` order.

    Partial tiles touched by at most `INLINE_PREDS` slices (nearly all of them) go to ``few``:
    one row per tile ``[tile, r0, r1, ac, as, bc, bs, r0', r1', ...]`` with the slices' band
    parameters inline (an unused slot holds an empty band), so the kernel's loop over them has no
    inner loop and Triton can software-pipeline it. The rest go to ``many`` with a CSR list of
    slice ids into ``bands``. ``which`` is ``"fwd"`` (row bands; forward and dQ) or ``"bwd"``
    (column bands; dK/dV).
    """
    tl: TileLists = getattr(plan, which)
    bands = np.asarray(plan.bands if which == "fwd" else plan.bands_t, dtype=np.int64)
    n_out = tl.n_outer
    cnt = np.diff(tl.pred_ptr).astype(np.int64)
    owner = np.repeat(np.arange(n_out), np.diff(tl.part_ptr))
    few = cnt <= INLINE_PREDS
    few_idx = np.nonzero(few)[0]
    many_idx = np.nonzero(~few)[0]
    # few: inline parameters, empty band (all zeros: no row satisfies 0 <= r < 0) in unused slots
    ext = np.vstack([bands, np.zeros((1, 6), np.int64)])
    empty = bands.shape[0]
    table = [tl.part_tiles[few_idx].astype(np.int64)[:, None]]
    for slot in range(INLINE_PREDS):
        has = cnt[few_idx] > slot
        ids = np.where(has, tl.preds[np.minimum(tl.pred_ptr[few_idx] + slot, max(tl.preds.size - 1, 0))] if tl.preds.size else empty, empty)
        table.append(ext[ids])
    few_tab = np.hstack(table) if few_idx.size else np.zeros((0, 1 + 6 * INLINE_PREDS), np.int64)
    few_ptr = _ptr(np.bincount(owner[few_idx], minlength=n_out))
    # many: CSR of slice ids
    m_cnt = cnt[many_idx]
    many_ptr = _ptr(np.bincount(owner[many_idx], minlength=n_out))
    many_pred_ptr = _ptr(m_cnt)
    rep = np.repeat(np.arange(many_idx.size), m_cnt)
    within = np.arange(rep.size) - (many_pred_ptr[:-1][rep] if rep.size else 0)
    many_preds = tl.preds[tl.pred_ptr[many_idx][rep] + within] if rep.size else np.zeros(0, np.int64)
    out = {
        "bands": bands.reshape(-1),
        "full_ptr": tl.full_ptr,
        "full_runs": tl.full_runs.reshape(-1),
        "few_ptr": few_ptr,
        "few": few_tab.reshape(-1),
        "many_ptr": many_ptr,
        "many_tiles": tl.part_tiles[many_idx],
        "many_pred_ptr": many_pred_ptr,
        "many_preds": many_preds,
        "order": tl.order,
    }
    for key, a in out.items():
        a = np.asarray(a)
        if a.size and (a.max() > np.iinfo(np.int32).max or a.min() < np.iinfo(np.int32).min):
            raise MaskError(f"kernel lists: {key} exceeds int32 (sequence too long for one kernel launch)")
        out[key] = np.ascontiguousarray(a, dtype=np.int32)
    return out
