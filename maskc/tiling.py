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

import functools
import hashlib
import json
import threading
from dataclasses import dataclass, field
from itertools import accumulate
from typing import NamedTuple

import numpy as np

from .errors import MaskError
from .kinds import Kind, as_int
from .mask import Mask
from .normalize import (_FEW_RECTANGLES, canonical_from_disjoint, canonical_from_disjoint_pieces, canonical_from_sorted_disjoint,
                        sweep, union_of_rectangles)

_INT32_MAX = int(np.iinfo(np.int32).max)
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


def _new_lists(*arrays: np.ndarray) -> TileLists:
    """``TileLists(*arrays)`` without the frozen dataclass's ``__init__`` (seven
    ``object.__setattr__`` calls; three lists per new mask)."""
    tl = TileLists.__new__(TileLists)
    tl.__dict__.update(zip(_LISTS, arrays))
    return tl


def _ro(a, shape=None) -> np.ndarray:
    a = np.ascontiguousarray(a, dtype=np.int32)
    if shape is not None:
        a = a.reshape(shape)
    a.flags.writeable = False
    return a


def _ptr(counts) -> np.ndarray:
    """CSR pointer ``[0, c0, c0 + c1, ...]`` of per-item counts (np.r_ is slow on small arrays)."""
    return np.concatenate((np.zeros(1, np.int64), np.cumsum(counts)))


def _classify(bands: np.ndarray, outer_len: int, inner_len: int, blocks: list, sweep_all: bool = False,
              also: tuple = ()) -> list[dict]:
    """The first half of `_tile_lists`, for each ``(b_out, b_in)`` of `blocks` in one pass: the
    pieces of ``bands`` (one per band and outer tile), the inner tiles each touches and covers
    in full, and ``counts`` = (full tiles, partial tiles). ``also``: more ``(bands, outer_len,
    inner_len, blocks)`` groups (the other orientation) classified in the same pass; their sizes
    follow in the result, and their band ids are numbered on after the group before (``band_at``).

    Where every outer tile holds at most one piece (``single``), each piece decides its tile's
    lists alone. Otherwise (or with ``sweep_all``, which tests use to check that shortcut) the
    pieces' events are swept per outer tile into elementary intervals of inner tiles. A 32k mask
    has a few hundred pieces per tile size, so numpy's per-call cost is most of the cost: all tile
    sizes go through the same few calls (outer tiles numbered on from one size to the next), over
    contiguous rows, with no Python loop but the one that hands out each size's share; the
    per-size scalars are Python ints, and power-of-two tiles divide by shifting."""
    groups = [(bands, outer_len, inner_len, blocks), *also]
    n_bands, band_at, group = [], [], []  # per size
    offset = 0
    for g, (g_bands, _, _, g_blocks) in enumerate(groups):
        for _ in g_blocks:
            n_bands.append(g_bands.shape[0])
            band_at.append(offset)
            group.append(g)
        offset += g_bands.shape[0]
    geo = _geometry(tuple((int(bo), int(bi), g_outer, g_inner) for _, g_outer, g_inner, g_blocks in groups for bo, bi in g_blocks))
    blocks, tile_at, shift, consts = geo.blocks, geo.tile_at, geo.shift, geo.consts
    div = np.right_shift if geo.pow2 else np.floor_divide
    # ---- pieces: one per (size, band, outer tile), in that order, the columns of one array ----
    # rows: r0, r1, ac, as, bc, bs, outer tile, band, then `_Geometry.consts`
    per = np.empty((15, sum(len(g[3]) * g[0].shape[0] for g in groups)), np.int64)
    col = s = 0
    for g_bands, _, _, g_blocks in groups:  # each group's columns, viewed as (rows, sizes, bands)
        n_s, n_b = len(g_blocks), g_bands.shape[0]
        view = per[:, col : col + n_s * n_b].reshape(15, n_s, n_b, copy=False)
        view[:6] = g_bands.T[:, None]
        view[7] = np.arange(band_at[s], band_at[s] + n_b)
        view[8:] = consts[:, s : s + n_s, None]
        col += n_s * n_b
        s += n_s
    t_first = div(per[0], per[13])
    t_last = div(per[1] - 1, per[13])
    cnt = t_last - t_first + 1
    ends_at = cnt.cumsum()
    per[6] = t_first - ends_at + cnt  # + piece index = outer tile
    p = per.repeat(cnt, axis=1)
    ot = np.add(p[6], np.arange(p.shape[1]), out=p[6])
    lo = ot * p[8]
    np.maximum(p[0], lo, out=p[0])  # the piece's rows [p[0], p[1]]
    lo += p[8] - 1
    np.minimum(p[1] - 1, lo, out=p[1])
    # the a and b ends at the first and last row, in inner tiles: [[touch0, full0], [full1, touch1]]
    # = [[a(first) // b, ceil(a(last) / b)], [b(first) // b, ceil(b(last) / b)]]
    ends = p[2:6:2, None] + p[3:6:2, None] * p[None, 0:2]
    ends[:, 1] += p[9] - 1
    div(ends, p[14], out=ends)
    touch0, full0, full1, touch1 = ends[0, 0], ends[0, 1], ends[1, 0], ends[1, 1]
    rows = p[1] - p[0]  # + 1: the piece's height
    first = np.empty(len(blocks) + 1, np.int64)  # each size's first piece
    first[0] = 0
    first[1:] = ends_at.take([n - 1 for n in accumulate(n_bands)])
    g_first, g_last = t_first + per[10], t_last + per[10]
    if not sweep_all and not (g_first[1:] <= g_last[:-1]).any():
        # every outer tile holds at most one piece, in order: it touches [touch0, touch1) and is
        # full on [full0, full1) where it spans the tile's rows; empty [touch1, touch1) where not
        height = p[8] if geo.aligned else np.where(ot == p[11], p[12], p[8])
        full = (rows == height - 1) & (full1 > full0)
        np.copyto(full0, touch1, where=~full)
        np.copyto(full1, touch1, where=~full)
        n_full = np.add.reduceat(full1 - full0, first[:-1]).tolist()
        n_touched = np.add.reduceat(touch1 - touch0, first[:-1]).tolist()
        batch = dict(single=True, blocks=blocks, band_at=band_at, group=group, tile_at=tile_at, shift=shift, tile=ot + p[10], band=p[7],
                     touch0=touch0, touch1=touch1, full0=full0, full1=full1)
        return _per_size(batch, first.tolist(), None, [(f, t - f) for f, t in zip(n_full, n_touched)])
    # ---- events, swept per outer tile at key = outer tile (common numbering) << shift + inner tile ----
    # each piece: +M at touch0, -M at touch1 (M above any tile height), +rows at full0 and -rows at
    # full1 (at one key, cancelling, where it covers no tile in full). touch0 < touch1 and full0 <
    # full1, so after the last event at a key the open pieces' full rows sum to at most the tile
    # height (slices are disjoint): the state separates into (touch count, full rows) again
    big = geo.big
    covers = full1 > full0
    np.copyto(full0, touch0, where=~covers)
    np.copyto(full1, touch0, where=~covers)
    tile = ot + p[10]
    key = ends.reshape(4, -1) + (tile << shift)  # touch0, full0, full1, touch1
    key = key.reshape(-1)
    delta = np.empty((4, ot.shape[0]), np.int64)
    delta[0] = big
    np.add(rows, 1, out=delta[1])
    np.negative(delta[1], out=delta[2])
    delta[3] = -big
    order = key.argsort(kind="stable")  # ties need no order: only the state after the last event counts
    key = key[order]
    state = delta.reshape(-1)[order].cumsum()
    last_at = np.empty(key.shape[0], dtype=bool)  # the state after the last event at each key
    last_at[-1] = True
    np.not_equal(key[1:], key[:-1], out=last_at[:-1])
    last_at = last_at.nonzero()[0]  # (indices take faster than a boolean mask, twice; 1-D: no flatnonzero)
    key, state = key[last_at], state[last_at]
    # elementary intervals [key, next key): the state is 0 after an outer tile's last key (every
    # piece closed), so an interval that runs into the next outer tile is neither full nor partial
    span = np.empty_like(key)
    np.subtract(key[1:], key[:-1], out=span[:-1])
    span[-1] = 0
    at = key.searchsorted([t << shift for t in tile_at]).tolist()  # each size's first interval
    is_full = (state & (big - 1)) == geo.height[key >> shift]
    is_part = (state >= big) > is_full
    n_full = np.add.reduceat(span * is_full, at[:-1]).tolist()
    n_part = np.add.reduceat(span * is_part, at[:-1]).tolist()
    batch = dict(single=False, blocks=blocks, band_at=band_at, group=group, tile_at=tile_at, shift=shift, tile=tile, band=p[7], touch0=touch0,
                 touch1=touch1, key=key, span=span, is_full=is_full, is_part=is_part)
    return _per_size(batch, first.tolist(), at, list(zip(n_full, n_part)))


class _Geometry(NamedTuple):
    """What a `_classify` pass needs to know of its tile sizes alone (`_geometry`)."""

    blocks: tuple  # (b_out, b_in) per size
    tile_at: tuple  # each size's first outer tile, numbered on from one size to the next, and the end
    aligned: bool  # every size's last outer tile is a whole one
    shift: int  # key = outer tile << shift + inner tile: 1 << shift is above every inner tile index
    pow2: bool  # every tile a power of two: divide by shifting
    big: int  # a power of two above every tile height (the sweep's touch count unit)
    consts: np.ndarray  # per size (columns): b_out, b_in, first outer tile, last outer tile index, its
    # height, and the divisors of b_out and b_in (their log2 where powers of two); read-only
    height: np.ndarray  # per outer tile (common numbering): its height; read-only


@functools.lru_cache(maxsize=16)  # (a few per shape; ~8 bytes per outer tile each)
def _geometry(sizes: tuple) -> _Geometry:
    """The `_Geometry` of ``(b_out, b_in, outer_len, inner_len)`` per size: a pure function of the
    tile sizes and the lengths tiled, the same for every mask of one shape (kept, not per mask)."""
    blocks = tuple((bo, bi) for bo, bi, _, _ in sizes)
    n_out = [-(-o // bo) for bo, _, o, _ in sizes]
    tile_at = tuple(accumulate(n_out, initial=0))
    tail = [o - (n - 1) * bo for n, (bo, _, o, _) in zip(n_out, sizes)]
    shift = max(-(-i // bi) for _, bi, _, i in sizes).bit_length()
    pow2 = all(b & (b - 1) == 0 for blk in blocks for b in blk)
    consts = np.array([*(bo for bo, _ in blocks), *(bi for _, bi in blocks), *tile_at[:-1], *(n - 1 for n in n_out), *tail,
                       *(bo.bit_length() - 1 if pow2 else bo for bo, _ in blocks),
                       *(bi.bit_length() - 1 if pow2 else bi for _, bi in blocks)], dtype=np.int64).reshape(7, -1)
    consts.flags.writeable = False
    height = np.empty(tile_at[-1], np.int64)
    for (bo, _), t, u, h in zip(blocks, tile_at, tile_at[1:], tail):
        height[t:u] = bo
        height[u - 1] = h
    height.flags.writeable = False
    aligned = all(t == bo for t, (bo, _) in zip(tail, blocks))
    return _Geometry(blocks, tile_at, aligned, shift, pow2, 1 << max(bo for bo, _ in blocks).bit_length(), consts, height)


def _per_size(batch: dict, first: list, at: list | None, counts: list) -> list[dict]:
    """`_classify`'s result per tile size: its counts, and the pass's arrays (``batch``, shared by
    every size of the pass, which `_lists_many` turns into several sizes' lists at once) with the
    size's ``index`` in them and a size estimate (``held``: bytes of the arrays its lists need)."""
    batch.update(counts=counts, first=first, at=at)  # and each size's pieces and intervals
    out = []
    for i, c in enumerate(counts):
        n = first[i + 1] - first[i] if at is None else max(first[i + 1] - first[i], at[i + 1] - at[i])
        out.append(dict(single=batch["single"], counts=c, batch=batch, index=i, held=128 * n))
    return out


def _ptr32(counts: np.ndarray) -> np.ndarray:
    """Read-only int32 CSR pointer ``[0, c0, c0 + c1, ...]`` of per-item counts."""
    out = np.empty(counts.shape[0] + 1, np.int32)
    out[0] = 0
    out[1:] = counts.cumsum()  # (a cumsum straight into int32 takes numpy's slow casting path)
    out.flags.writeable = False
    return out


def _stable_order(keys: np.ndarray, bound: int) -> np.ndarray:
    """Read-only int32 ``keys.argsort(kind="stable")`` of whole-number keys in ``[0, bound)``. A
    stable order is unique, so keys that fit 16 bits are sorted as such: numpy radix-sorts those
    in O(n), where its merge sort of a thousand float keys costs ~3x more inside a plan."""
    if bound <= 1 << 16:
        keys = keys.astype(np.uint16)
    return _ro(keys.argsort(kind="stable"))


def _expand(start: np.ndarray, length: np.ndarray) -> np.ndarray:
    """The concatenated ranges ``[start[i], start[i] + length[i])``."""
    off = length.cumsum()
    total = int(off[-1]) if off.size else 0
    off -= length
    return np.arange(total) + (start - off).repeat(length)


def _lists(c: dict, n_out: int) -> TileLists:
    """The work lists of one tile size's `_classify` result, built alone (tests; the planner
    builds neighbouring sizes of a pass together: `_lists_many`)."""
    i = c["index"]
    tl, _ = _lists_many(c["batch"], sizes=range(i, i + 1))[0]
    assert tl.n_outer == n_out
    return tl


def _lists_many(b: dict, bands: list | None = None, sizes: range | None = None) -> list[tuple[TileLists, dict | None]]:
    """The work lists of the tile sizes ``sizes`` (consecutive ones, default all) of one
    `_classify` pass, built in the same few calls: their pieces and intervals are contiguous
    there, and outer tiles keep the pass's common numbering until each size's share is cut out.
    With ``bands`` (per group of the pass, the read-only int32 bands its predicates index) also
    each size's `kernel_lists` arrays, where every partial tile has at most `INLINE_PREDS` slices
    (else None)."""
    tile_at, first, at = b["tile_at"], b["first"], b["at"]
    sizes = range(len(tile_at) - 1) if sizes is None else sizes
    pieces = slice(first[sizes.start], first[sizes.stop])
    if b["single"]:
        runs, run_tile, p_tile, part_tile, preds, pred_cnt = _single_piece_lists(b, pieces)
    else:
        intervals = slice(at[sizes.start], at[sizes.stop])
        runs, run_tile, p_tile, part_tile, preds, pred_cnt = _swept_lists(b, pieces, intervals)
    # per outer tile of these sizes: tiles from t0 on, counted from t0 (bincount's leading zeros cut off)
    t0, t1 = tile_at[sizes.start], tile_at[sizes.stop]
    n_run = np.bincount(run_tile, minlength=t1)[t0:]
    n_part = np.bincount(part_tile, minlength=t1)[t0:]
    # LPT: heaviest outer tile first by full + 1.5 partial (`TileLists.cost`), doubled (whole
    # numbers, at most 3 << shift apart; each size is lifted above the one before, so one
    # stable sort (ties keep tile order) orders every size's tiles, each after the other
    weight = np.bincount(run_tile, weights=runs[:, 1] - runs[:, 0], minlength=t1)[t0:]
    weight *= -2
    weight -= 3 * n_part
    lift = 4 << b["shift"]
    weight += 3 << b["shift"]  # >= 0: an outer tile has fewer than 1 << shift inner tiles
    for t in tile_at[sizes.start + 1 : sizes.stop]:
        weight[t - t0 :] += lift
    order = _stable_order(weight, len(sizes) * lift)
    full_ptr, part_ptr = _ptr32(n_run), _ptr32(n_part)
    runs.flags.writeable = False
    p_tile, preds = _ro(p_tile), _ro(preds)
    pred_ptr = _ro(np.arange(preds.shape[0] + 1)) if pred_cnt is None else _ptr32(pred_cnt)
    few = None
    if bands is not None and (pred_cnt is None or not pred_cnt.size or pred_cnt.max() <= INLINE_PREDS):
        # the pass's band ids run on from one group to the next: so do the bands here
        few = _few_table(bands[0] if len(bands) == 1 else np.concatenate(bands), p_tile, preds,
                         None if pred_cnt is None else pred_ptr[:-1], pred_cnt)
    local = [t - t0 for t in tile_at[sizes.start : sizes.stop + 1]]  # each size's first outer tile, and the end
    at_run, at_part = full_ptr[local].tolist(), part_ptr[local].tolist()
    at_pred = pred_ptr[at_part].tolist()
    width = _FEW_WIDTH
    none = _zeros32(max(local[k + 1] - local[k] for k in range(len(sizes))) + 1)  # the empty `many` lists
    out = []
    for k, size in enumerate(sizes):
        t, u = local[k], local[k + 1]  # the size's outer tiles
        p, q = at_part[k], at_part[k + 1]  # its partial tiles
        tl = _new_lists(_cut_ptr(full_ptr, t, u), runs[at_run[k] : at_run[k + 1]], _cut_ptr(part_ptr, t, u),
                        p_tile[p:q], _cut_ptr(pred_ptr, p, q), _less(preds[at_pred[k] : at_pred[k + 1]], b["band_at"][size]),
                        _less(order[t:u], t))
        arrays = None
        if few is not None:
            arrays = {"bands": bands[b["group"][size]].reshape(-1), "full_ptr": tl.full_ptr, "full_runs": tl.full_runs.reshape(-1),
                      "few_ptr": tl.part_ptr, "few": few[width * p : width * q], "many_ptr": none[: u - t + 1],
                      "many_tiles": none[:0], "many_pred_ptr": none[:1], "many_preds": none[:0], "order": tl.order}
        out.append((tl, arrays))
    return out


def _single_piece_lists(b: dict, pieces: slice) -> tuple:
    """`_lists_many`'s lists where every outer tile holds at most one piece: per piece a full run
    [full0, full1) where not empty, partial tiles [touch0, full0) and [full1, touch1), each with
    the piece's band alone (``pred_cnt`` None: one slice per partial tile)."""
    tile, band, touch0, touch1, full0, full1 = (b[k][pieces] for k in ("tile", "band", "touch0", "touch1", "full0", "full1"))
    fi = (full1 > full0).nonzero()[0]
    runs = np.empty((fi.shape[0], 2), np.int32)
    runs[:, 0] = full0[fi]
    runs[:, 1] = full1[fi]
    bounds = np.empty((tile.shape[0], 2, 2), np.int64)  # per piece [[touch0, full0], [full1, touch1]]
    bounds[:, 0, 0] = touch0
    bounds[:, 0, 1] = full0
    bounds[:, 1, 0] = full1
    bounds[:, 1, 1] = touch1
    bounds = bounds.reshape(-1, 2).T
    n_part = touch1 - touch0 + full0 - full1
    p_tile = _expand(bounds[0], bounds[1] - bounds[0])
    return runs, tile[fi], p_tile, tile.repeat(n_part), band.repeat(n_part), None


def _swept_lists(b: dict, pieces: slice, intervals: slice) -> tuple:
    """`_lists_many`'s lists from the swept elementary intervals: full runs, partial tiles, and
    per partial tile the slices whose pieces touch it (``pred_cnt`` of them)."""
    key, span, is_full, is_part = (b[k][intervals] for k in ("key", "span", "is_full", "is_part"))
    shift = b["shift"]
    # full runs: maximal chains of full intervals (consecutive intervals of one outer tile
    # touch). Each outer tile's last interval is not full, so the changes of is_full alternate run
    # start, run end (the interval after the run, whose key is the run's end, in the same outer tile)
    change = np.empty(key.shape[0], bool)
    change[0] = is_full[0]
    np.not_equal(is_full[1:], is_full[:-1], out=change[1:])
    edge = key[change.nonzero()[0]].reshape(-1, 2)
    run_tile = edge[:, 0] >> shift
    runs = (edge & ((1 << shift) - 1)).astype(np.int32)  # a run's end key is in its outer tile too
    # partial tiles, expanded (their keys stay ascending)
    part = is_part.nonzero()[0]
    p_key = _expand(key[part], span[part])
    # predicates: the pieces whose touched tiles include the partial tile; pieces are
    # band-major, so a stable sort by partial tile leaves each tile's slice ids ascending
    base = b["tile"][pieces] << shift
    lo = p_key.searchsorted(base + b["touch0"][pieces])
    n_hit = p_key.searchsorted(base + b["touch1"][pieces]) - lo
    which = _expand(lo, n_hit)
    preds = b["band"][pieces].repeat(n_hit)[which.argsort(kind="stable")]
    return runs, run_tile, p_key & ((1 << shift) - 1), p_key >> shift, preds, np.bincount(which, minlength=p_key.shape[0])


def _few_table(bands: np.ndarray, p_tile: np.ndarray, preds: np.ndarray, first, cnt) -> np.ndarray:
    """`kernel_lists`' ``few`` rows of the partial tiles ``p_tile`` (each with at most
    `INLINE_PREDS` slices: ``cnt[i]`` of them from ``preds[first[i]]`` on; with ``cnt`` None,
    exactly one, ``preds[i]``), flat int32: the tile, then its slices' band parameters, zeros (an
    empty band: no row satisfies 0 <= r < 0) after."""
    # each band's row as a partial tile's only slice (the tile left 0), gathered whole per tile:
    # numpy takes rows of a small 2-D table far faster than it copies six ints into each row
    alone = np.zeros((bands.shape[0], _FEW_WIDTH), np.int32)
    alone[:, 1:7] = bands
    if cnt is None:  # one slice per partial tile
        few = alone.take(preds, axis=0, mode="clip")
    else:
        few = alone.take(preds.take(first), axis=0, mode="clip")  # (valid ids: clip skips the bounds check)
        for slot in range(1, INLINE_PREDS):  # the few tiles with more slices
            more = (cnt > slot).nonzero()[0]
            few[more, 1 + 6 * slot : 7 + 6 * slot] = bands.take(preds[first[more] + slot], axis=0)
    few[:, 0] = p_tile
    few = few.reshape(-1)
    few.flags.writeable = False
    return few


_ZEROS32 = [_ro(np.zeros(1))]


def _zeros32(n: int) -> np.ndarray:
    """A read-only int32 array of ``n`` zeros: a view of one shared array, grown as needed (the
    empty `many` lists of `kernel_lists`' arrays)."""
    if _ZEROS32[0].shape[0] < n:
        _ZEROS32[0] = _ro(np.zeros(max(n, 2 * _ZEROS32[0].shape[0])))
    return _ZEROS32[0][:n]


def _cut_ptr(ptr: np.ndarray, t: int, u: int) -> np.ndarray:
    """Items ``t..u`` of a CSR pointer, counted from its item ``t``."""
    return _less(ptr[t : u + 1], int(ptr[t]))


def _less(a: np.ndarray, by: int) -> np.ndarray:
    """Read-only ``a - by`` (``a`` itself where ``by`` is 0)."""
    if not by:
        return a
    a = a - by
    a.flags.writeable = False
    return a


def _empty_lists(n_out: int) -> TileLists:
    ptr = np.zeros(n_out + 1, dtype=np.int64)
    return TileLists(_ro(ptr), _ro(np.zeros((0, 2)), (-1, 2)), _ro(ptr), _ro([]), _ro([0]), _ro([]), _ro(np.arange(n_out)))


def _tile_counts(bands: np.ndarray, outer_len: int, inner_len: int, b_out: int, b_in: int) -> tuple[int, int]:
    """``(full tiles, partial tiles)`` of the lists `_tile_lists` would build, without building them."""
    if bands.shape[0] == 0 or outer_len == 0:
        return 0, 0
    return _classify(bands, outer_len, inner_len, [(b_out, b_in)])[0]["counts"]


def _tile_lists(bands: np.ndarray, outer_len: int, inner_len: int, b_out: int, b_in: int) -> TileLists:
    """Work lists for disjoint bands ``(r0, r1, ac, as, bc, bs)`` over outer x inner tiles."""
    n_out = _cdiv(outer_len, b_out)
    if bands.shape[0] == 0 or n_out == 0:
        return _empty_lists(n_out)
    return _lists(_classify(bands, outer_len, inner_len, [(b_out, b_in)])[0], n_out)


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
    out, src = _transpose_rows(bands.tolist())
    if not out:
        return np.zeros((0, 6), np.int64), np.zeros(0, np.int64)
    return np.array(out, dtype=np.int64), np.array(src, dtype=np.int64)


def _transpose_rows(rows: list) -> tuple[list, list]:
    """`transpose_bands` of band tuples, as lists: (column band tuples, source band of each)."""
    out, src = [], []
    for t, (r0, r1, ac, a_s, bc, b_s) in enumerate(rows):
        ks = ac + a_s * r0
        ke = bc + b_s * (r1 - 1)
        if not (a_s or b_s):  # FULL: one piece, rows [r0, r1) on every column (as the cuts below give)
            if ke != ks:
                out.append((min(ks, ke), max(ks, ke), r0, 0, r1, 0))
                src.append(t)
            continue
        # first row of column j: b(i) > j  ->  i >= j - bc + 1 (slope-1 end), else r0
        # last row + 1 of column j: a(i) <= j  ->  i <= j - ac  (slope-1 start), else r1
        if not a_s:  # CAUSAL (the common case, as the cuts below give): rows r0 up to the cut, then the slope-1 end
            cut = min(max(r0 + bc - 1, ks), ke)
            if cut > ks:
                out.append((ks, cut, r0, 0, r1, 0))
                src.append(t)
            if ke > cut:
                out.append((cut, ke, 1 - bc, 1, r1, 0))
                src.append(t)
            continue
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
    return out, src


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
    return _column_bands(mask, mask.digest())


_SMALL_COLUMNS = 64  # column pieces up to which the disjoint-pieces path runs in plain Python


def _column_bands(mask: Mask, digest: str) -> np.ndarray:
    hit = _COLUMN_BANDS.get(digest)
    if hit is None:
        rows, _ = _transpose_rows(mask.bands.tolist())
        hit = None
        if rows and len(rows) <= _SMALL_COLUMNS:  # as below, without numpy's per-call cost
            pieces = sorted(rows)
            if all(a[1] <= b[0] for a, b in zip(pieces, pieces[1:])):
                hit = canonical_from_sorted_disjoint(pieces)
            elif any(r[3] or r[5] for r in pieces):  # sloped pieces sharing columns (FULL ones: the grid below)
                hit = canonical_from_disjoint_pieces(pieces)
        elif len(rows) >= 8:  # many pieces: when no two share a column, no sweep is needed
            cols = np.array(rows, dtype=np.int64)
            o = cols[:, 0].argsort(kind="stable")
            if not (cols[o[1:], 0] < cols[o[:-1], 1]).any():
                # pieces of canonical row bands are tight: every column of one has rows in it
                hit = canonical_from_disjoint(cols, mask.sk, mask.sq, tight=True)
        if hit is None and len(rows) <= _FEW_RECTANGLES and not any(r[3] or r[5] for r in rows):
            # FULL slices only: their column pieces are rectangles inside the plane, not empty
            hit = union_of_rectangles([(r0, r1, ac, bc) for r0, r1, ac, _, bc, _ in rows], mask.sk)
        if hit is None:
            hit = sweep([np.array(rows, dtype=np.int64).reshape(-1, 6)], [False, True], mask.sk, mask.sq)
        hit.flags.writeable = False
        if len(_COLUMN_BANDS) >= 256:
            _COLUMN_BANDS.clear()
        _COLUMN_BANDS[digest] = hit
    return hit


class _Tiled(NamedTuple):
    """What is known of one (mask, orientation, outer block, inner block): its tile counts, and
    its `_classify` result until the lists are built from it, then the lists, with the
    `kernel_lists` arrays built beside them as ``(bands, arrays)`` where there are (a named tuple:
    a plan makes several, and a frozen dataclass costs a few microseconds each)."""

    counts: tuple[int, int]
    classified: dict | None = None
    lists: TileLists | None = None
    nbytes: int = 0  # of the arrays held
    kernel: tuple[np.ndarray, dict] | None = None


def _held(counts, classified: dict | None = None, lists: TileLists | None = None, kernel=None) -> _Tiled:
    if classified is not None:  # an estimate: the rows over its pieces and the sweep's arrays over their events
        size = classified["held"]
    elif lists is not None:
        size = (lists.full_ptr.nbytes + lists.full_runs.nbytes + lists.part_ptr.nbytes + lists.part_tiles.nbytes
                + lists.pred_ptr.nbytes + lists.preds.nbytes + lists.order.nbytes)
        if kernel is not None:
            size += kernel[1]["few"].nbytes
    else:
        size = 0
    return _Tiled(counts, classified, lists, size, kernel)


# Pricing a kernel's candidate configs counts tiles, and the winner's lowering reuses that
# count's classification; the forward and dQ kernels share the row orientation (and a candidate).
# Keyed by mask digest, so a different mask never hits; bounded in entries and in bytes held.
_TILED: dict = {}
_TILED_MAX_ENTRIES = 32
_TILED_MAX_BYTES = 64 << 20
_TILED_LOCK = threading.Lock()
_tiled_bytes = 0  # held by _TILED


def _orientation(mask: Mask, digest: str, which: str) -> tuple[np.ndarray, int, int]:
    """``(bands, outer_len, inner_len)`` of ``which``: "fwd" tiles the row bands over query tiles,
    "bwd" the canonical column bands over key tiles."""
    if which == "fwd":
        return np.asarray(mask.bands, dtype=np.int64), mask.sq, mask.sk
    return _column_bands(mask, digest), mask.sk, mask.sq


def _classified(mask: Mask, digest: str, keys: list, known: bool = True, together: bool = False) -> list[_Tiled]:
    """The `_Tiled` of each ``(which, b_out, b_in)`` of `keys`: the memoised ones (with ``known``)
    and the others classified together in one `_classify` pass, both orientations in it where
    both are asked for (and memoised). ``together``: the caller lowers every size of the pass, so
    their lists are built now, in one `_lists_many` (else a later lowering builds those of the
    sizes with its orientation and outer tiles)."""
    found = {k: _TILED.get((digest,) + k) if known else None for k in keys}
    groups: dict = {}  # orientation -> its sizes still to classify
    for k, t in found.items():
        if t is None:
            groups.setdefault(k[0], []).append(k[1:])
    passes = []  # (which, (bands, outer_len, inner_len, sizes))
    for which, sizes in groups.items():
        bands, outer_len, inner_len = _orientation(mask, digest, which)
        if bands.shape[0] == 0 or outer_len == 0:
            for b in sizes:
                found[(which,) + b] = _remember((digest, which) + b, _held((0, 0), lists=_empty_lists(_cdiv(outer_len, b[0]))))
        else:
            passes.append((which, (bands, outer_len, inner_len, sizes)))
    if passes:
        classified = _classify(*passes[0][1], also=[g for _, g in passes[1:]])
        batch = classified[0]["batch"]
        batch.update(keys=[(w,) + b for w, g in passes for b in g[3]], groups=[w for w, _ in passes])
        if together:
            held = _build(mask, digest, batch, range(len(classified)))
        else:
            held = [_held(c["counts"], classified=c) for c in classified]
            _remember_many([((digest,) + k, h) for k, h in zip(batch["keys"], held)])
        found.update(zip(batch["keys"], held))
    return [found[k] for k in keys]


def _build(mask: Mask, digest: str, batch: dict, sizes: range) -> list[_Tiled]:
    """The lists of the consecutive ``sizes`` of a classified pass, built in one `_lists_many`
    with their `kernel_lists` arrays over the plan's int32 bands of each orientation
    (`_bands32`), memoised; returns their `_Tiled`."""
    keys, counts, group = batch["keys"], batch["counts"], batch["group"]
    bands = [_bands32(mask, digest, w) for w in batch["groups"]]
    held = [_held(counts[j], lists=lists, kernel=None if arrays is None else (bands[group[j]], arrays))
            for j, (lists, arrays) in zip(sizes, _lists_many(batch, bands, sizes))]
    _remember_many([((digest,) + keys[j], h) for j, h in zip(sizes, held)])
    return held


def _lowered(mask: Mask, digest: str, which: str, b_out: int, b_in: int) -> TileLists:
    """The memoised work lists of ``which`` at ``b_out x b_in`` tiles, built from the memoised
    classification where there is one. The neighbours in the same pass with the same outer tiles
    that still wait for their lists get theirs in the same calls: the forward's and dQ's
    (128 x 128 and 128 x 64), priced together for a new mask, are lowered one after the other."""
    key = (digest, which, b_out, b_in)
    hit = _TILED.get(key)
    if hit is None or (hit.lists is None and hit.classified is None):  # unknown, or held as counts only
        hit = _classified(mask, digest, [(which, b_out, b_in)], known=False)[0]
    if hit.lists is None:
        batch, i = hit.classified["batch"], hit.classified["index"]
        keys = batch["keys"]

        def waits(j):  # a neighbour built with this size: classified in this pass, no lists yet
            other = _TILED.get((digest,) + keys[j])
            return (keys[j][:2] == (which, b_out) and other is not None and other.lists is None
                    and other.classified is not None and other.classified["batch"] is batch)

        lo, hi = i, i + 1
        while lo > 0 and waits(lo - 1):
            lo -= 1
        while hi < len(keys) and waits(hi):
            hi += 1
        hit = _build(mask, digest, batch, range(lo, hi))[i - lo]
    return hit.lists


_BANDS32: dict = {}


def _bands32(mask: Mask, digest: str, which: str) -> np.ndarray:
    """The read-only int32 bands of ``which`` ("fwd": the row bands, "bwd": the column bands) that
    a plan holds, one array per mask content: the `kernel_lists` arrays built with the lists are
    a plan's own when its bands are this very array."""
    hit = _BANDS32.get((digest, which))
    if hit is None:
        hit = _ro(mask.bands if which == "fwd" else _column_bands(mask, digest), (-1, 6))
        if len(_BANDS32) >= 256:
            _BANDS32.clear()
        _BANDS32[(digest, which)] = hit
    return hit


def _remember(key: tuple, tiled: _Tiled) -> _Tiled:
    """Hold `tiled` under `key` (the oldest entries go first past the bounds) and return it."""
    _remember_many([(key, tiled)])
    return tiled


def _remember_many(items: list) -> None:
    """`_remember` of each ``(key, tiled)`` of `items`, under one hold of the lock."""
    global _tiled_bytes
    with _TILED_LOCK:
        for key, tiled in items:
            kept = tiled if tiled.nbytes <= _TILED_MAX_BYTES else _Tiled(tiled.counts)  # too large: the counts only
            old = _TILED.pop(key, None)
            if old is not None:
                _tiled_bytes -= old.nbytes
            while _TILED and (len(_TILED) >= _TILED_MAX_ENTRIES or _tiled_bytes + kept.nbytes > _TILED_MAX_BYTES):
                _tiled_bytes -= _TILED.pop(next(iter(_TILED))).nbytes
            _TILED[key] = kept
            _tiled_bytes += kept.nbytes


def clear_caches() -> None:
    """Forget every per-mask memo of this module (column bands, tile counts, work lists), so the
    next call plans its mask as new: for timing the planning of a new mask, and for tests."""
    global _tiled_bytes
    with _TILED_LOCK:
        _TILED.clear()
        _tiled_bytes = 0
    _COLUMN_BANDS.clear()
    _BANDS32.clear()


def tile_counts(mask: Mask, block_q: int, block_k: int, which: str = "fwd") -> tuple[int, int]:
    """``(full tiles, partial tiles)`` of ``lower(mask, block_q, block_k).<which>`` without building
    the lists (about half the work): what choosing a tile config needs. The classification it
    computes is kept (bounded), so lowering the chosen config does not repeat it."""
    return tile_counts_many(mask, [(block_q, block_k)], which)[0]


def tile_counts_many(mask: Mask, blocks, which: str = "fwd") -> list[tuple[int, int]]:
    """`tile_counts` for each ``(block_q, block_k)`` of `blocks`, in one pass over the mask's pieces
    (numpy's per-call cost, not the data, is most of the cost of one size at 32k tokens)."""
    if which not in ("fwd", "bwd"):
        raise MaskError(f"tile_counts: which must be 'fwd' or 'bwd', got {which!r}")
    keys = [(which, int(q), int(k)) if which == "fwd" else (which, int(k), int(q)) for q, k in blocks]
    return [t.counts for t in _classified(mask, mask.digest(), keys)]


def tile_counts_all(mask: Mask, fwd_blocks, bwd_blocks) -> tuple[list, list]:
    """`tile_counts_many` of ``(block_q, block_k)`` sizes of both orientations (``fwd_blocks``
    over query tiles, ``bwd_blocks`` over key tiles) in one pass, for a caller that will lower
    every one of them (the CUTLASS forward, dQ and dK/dV kernels of a new mask): the lists of all
    of them are built now, in the same calls, and their lowerings are memo hits."""
    keys = ([("fwd", int(q), int(k)) for q, k in fwd_blocks] + [("bwd", int(k), int(q)) for q, k in bwd_blocks])
    counts = [t.counts for t in _classified(mask, mask.digest(), keys, together=True)]
    return counts[: len(fwd_blocks)], counts[len(fwd_blocks) :]


class _PartialTilePlan(TilePlan):
    """A `TilePlan` lowered for one orientation (``lower(..., only=...)``): the other one (and
    whatever needs both) is lowered the first time it is read, so the result is indistinguishable
    from a full lowering, only cheaper when one kernel needs one orientation. The lazy fields are
    left unset until then, so reading any set field costs a plain attribute lookup."""

    _LAZY = frozenset(("fwd", "bwd", "bands_t", "partial_kinds"))

    def __getattr__(self, name):  # only for names not set: a lazy field's first read
        if name not in _PartialTilePlan._LAZY or "_source" not in self.__dict__:
            raise AttributeError(name)
        full = lower(self._source, self.block_q, self.block_k)
        for f in _PartialTilePlan._LAZY:
            object.__setattr__(self, f, getattr(full, f))
        return self.__dict__[name]


def _partial_plan(fields: dict) -> _PartialTilePlan:
    """A `_PartialTilePlan` of ``fields`` (the lazy ones left out), made without the frozen
    dataclass's ``__init__`` (ten ``object.__setattr__`` calls: a plan per kernel per new mask)."""
    plan = _PartialTilePlan.__new__(_PartialTilePlan)
    plan.__dict__.update(fields)
    return plan


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
    sq, sk = mask.sq, mask.sk
    if sq > _INT32_MAX or sk > _INT32_MAX:
        # the kernels index tokens and read the band parameters as int32
        raise MaskError(f"lower(): the mask is {sq} x {sk}; the kernels take at most {_INT32_MAX} "
                        "queries and keys per launch (int32 positions)")
    digest = mask.digest()
    fields = dict(sq=sq, sk=sk, block_q=block_q, block_k=block_k, mask_digest=digest, bands=_bands32(mask, digest, "fwd"))
    if only != "bwd":
        fields["fwd"] = _lowered(mask, digest, "fwd", block_q, block_k)
    if only != "fwd":
        # the backward walks key tiles: tile the canonical *column* bands of the same set
        fields["bands_t"] = _bands32(mask, digest, "bwd")
        fields["bwd"] = _lowered(mask, digest, "bwd", block_k, block_q)
    if only is not None:
        fields["_source"] = mask
        return _partial_plan(fields)
    bands = np.asarray(mask.bands, dtype=np.int64)
    kinds = frozenset(_pred_kinds(fields["fwd"], bands) | _pred_kinds(fields["bwd"], fields["bands_t"]))
    return TilePlan(**fields, partial_kinds=kinds)


KERNEL_LISTS = ("bands", "full_ptr", "full_runs", "few_ptr", "few", "many_ptr", "many_tiles", "many_pred_ptr", "many_preds", "order")
INLINE_PREDS = 2  # predicates stored inline with a partial tile (the common case: 1 or 2)
_FEW_WIDTH = 1 + 6 * INLINE_PREDS  # a `few` row: the tile, then INLINE_PREDS bands' parameters


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
    bands = plan.bands if which == "fwd" else plan.bands_t  # int32, like every list of TileLists
    size = (plan.block_q, plan.block_k) if which == "fwd" else (plan.block_k, plan.block_q)
    hit = _TILED.get((plan.mask_digest, which) + size)
    if hit is not None and hit.kernel is not None and hit.lists is tl and hit.kernel[0] is bands:
        return dict(hit.kernel[1])  # built with these very lists and bands (`_lists_many`)
    n_out = tl.n_outer
    cnt = np.diff(tl.pred_ptr)
    few = cnt <= INLINE_PREDS
    all_few = bool(few.all())
    few_idx = None if all_few else np.nonzero(few)[0]
    # few: the slices' parameters inline (the table `_lists_many` builds with the lists)
    if all_few:
        few_tab = _few_table(bands, tl.part_tiles, tl.preds, tl.pred_ptr[:-1], cnt)
    else:
        few_tab = _few_table(bands, tl.part_tiles[few_idx], tl.preds, tl.pred_ptr[few_idx], cnt[few_idx])
    if all_few:  # the common case: every partial tile is `few`, and `many` is empty
        few_ptr = tl.part_ptr
        many_ptr = np.zeros(n_out + 1, np.int32)
        many_tiles = many_preds = np.zeros(0, np.int32)
        many_pred_ptr = np.zeros(1, np.int32)
    else:
        owner = np.repeat(np.arange(n_out), np.diff(tl.part_ptr))
        many_idx = np.nonzero(~few)[0]
        few_ptr = _ptr32(np.bincount(owner[few_idx], minlength=n_out))
        # many: CSR of slice ids
        m_cnt = cnt[many_idx]
        many_ptr = _ptr32(np.bincount(owner[many_idx], minlength=n_out))
        many_pred_ptr = _ptr32(m_cnt)
        rep = np.repeat(np.arange(many_idx.size), m_cnt)
        within = np.arange(rep.size) - many_pred_ptr[:-1][rep]
        many_preds = tl.preds[tl.pred_ptr[many_idx][rep] + within]
        many_tiles = tl.part_tiles[many_idx]
    out = {
        "bands": bands.reshape(-1),
        "full_ptr": tl.full_ptr,
        "full_runs": tl.full_runs.reshape(-1),
        "few_ptr": few_ptr,
        "few": few_tab.reshape(-1),
        "many_ptr": many_ptr,
        "many_tiles": many_tiles,
        "many_pred_ptr": many_pred_ptr,
        "many_preds": many_preds,
        "order": tl.order,
    }
    return {key: np.ascontiguousarray(a, dtype=np.int32) for key, a in out.items()}
