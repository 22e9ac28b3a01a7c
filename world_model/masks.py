"""The maskc masks of the world model.

Video tokens are packed time-major: sample after sample, chunk after chunk, ``chunk_tokens``
tokens per chunk. Caption tokens are packed the same way: one caption per chunk, in chunk order.

- `self_attention_mask`: MAGI-1's packed block-causal mask (chunk c of a sample sees its own
  sample's chunks up to c; with ``window`` only the last ``window`` of them).
- `cross_attention_mask`: chunk c's tokens see caption c's tokens only (block diagonal, rectangular).
- `chunk_window_mask`: generation with a KV cache: queries are the new chunks, keys are the cached
  chunks then the new ones; new chunk i sees every cached chunk and new chunks 0..i (within
  ``window`` chunks if given). It equals the new chunks' rows of ``self_attention_mask``.
- `branch_window_mask`: several guidance branches of the same new chunks in one call: queries are
  each branch's new chunks in turn, keys the cached chunks then each branch's new chunks; a branch
  sees the cache or not, and its own new chunks only (`chunk_window_mask` per branch).
"""

from __future__ import annotations

import functools

import numpy as np

import maskc
from maskc import FULL, Mask, MaskError


def _count(value, what: str, minimum: int) -> int:
    if isinstance(value, bool) or not hasattr(value, "__index__") or int(value) < minimum:
        raise MaskError(f"{what} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _counts(values, what: str, minimum: int) -> list[int]:
    """`_count` of every entry, vectorised for the common case of a plain integer sequence."""
    arr = np.asarray(values) if not isinstance(values, np.ndarray) else values
    if arr.ndim == 1 and arr.dtype.kind in "iu":
        bad = np.nonzero(arr < minimum)[0]
        if bad.size:
            i = int(bad[0])
            raise MaskError(f"{what}[{i}] must be an integer >= {minimum}, got {values[i]!r}")
        return arr.tolist()
    return [_count(n, f"{what}[{i}]", minimum) for i, n in enumerate(values)]


def self_attention_mask(video_chunks, chunk_tokens: int, window: int | None = None) -> Mask:
    """Packed block-causal (``window=None``, training) or sliding chunk window (inference) mask."""
    return maskc.magi_video(video_chunks, chunk_tokens, window)


def cross_attention_mask(video_chunks, chunk_tokens: int, caption_lengths, row_runs=None) -> Mask:
    """[sum(video_chunks) * chunk_tokens, sum(caption_lengths)]: chunk c sees caption c only.

    ``row_runs``: (k, 2) global ``[start, end)`` token ranges in local order (a context-parallel
    rank's, `maskc.Plan.dispatch.rank_runs`): the mask of those rows only, ``[sum of lengths,
    sum(caption_lengths)]``, built directly (equal to `maskc.comm.submask` of the whole mask)."""
    counts = _counts(video_chunks, "cross_attention_mask: video_chunks", 1)
    t = _count(chunk_tokens, "cross_attention_mask: chunk_tokens", 1)
    lens = _counts(caption_lengths, "cross_attention_mask: caption_lengths", 0)
    if len(lens) != sum(counts):
        raise MaskError(f"cross_attention_mask: {len(lens)} caption lengths for {sum(counts)} chunks; "
                        "give one caption per chunk")
    # one FULL slice per chunk with a caption, built as an array (a packed 1M-token batch has
    # thousands of chunks)
    n = np.asarray(lens, dtype=np.int64)
    start = np.cumsum(n) - n
    sq, sk = len(lens) * t, int(n.sum())
    if row_runs is None:
        c = np.nonzero(n)[0]
        arr = np.stack([c * t, (c + 1) * t, start[c], start[c] + n[c], np.full(c.size, int(FULL))], axis=1)
        return Mask._from_slice_array(arr, sq, sk)
    runs = np.asarray(row_runs, dtype=np.int64).reshape(-1, 2)
    runs = runs[runs[:, 1] > runs[:, 0]]
    if runs.size and (runs.min() < 0 or runs.max() > sq):
        raise MaskError(f"cross_attention_mask: row_runs must lie in [0, {sq}], got {runs.min()}..{runs.max()}")
    # every (run, chunk) overlap is one FULL slice in local rows
    ln = runs[:, 1] - runs[:, 0]
    local0 = np.cumsum(ln) - ln
    c0, c1 = runs[:, 0] // t, (runs[:, 1] - 1) // t
    cnt = c1 - c0 + 1
    run = np.repeat(np.arange(runs.shape[0]), cnt)
    c = c0[run] + (np.arange(int(cnt.sum())) - np.repeat(np.cumsum(cnt) - cnt, cnt))
    r0 = np.maximum(runs[run, 0], c * t) - runs[run, 0] + local0[run]
    r1 = np.minimum(runs[run, 1], (c + 1) * t) - runs[run, 0] + local0[run]
    keep = n[c] > 0
    arr = np.stack([r0, r1, start[c], start[c] + n[c], np.full(c.size, int(FULL))], axis=1)[keep]
    return Mask._from_slice_array(arr, int(ln.sum()), sk)


def chunk_window_mask(n_cached_chunks: int, n_new_chunks: int, chunk_tokens: int, window: int | None = None) -> Mask:
    """[n_new * T, (n_cached + n_new) * T]: block-causal rows of the new chunks over cache + new."""
    nc = _count(n_cached_chunks, "chunk_window_mask: n_cached_chunks", 0)
    nn_ = _count(n_new_chunks, "chunk_window_mask: n_new_chunks", 1)
    t = _count(chunk_tokens, "chunk_window_mask: chunk_tokens", 1)
    w = None if window is None else _count(window, "chunk_window_mask: window", 1)
    return _branch_window_mask(nc, nn_, t, w, (True,))  # one branch that sees the cache


def branch_window_mask(n_cached_chunks: int, n_new_chunks: int, chunk_tokens: int, window: int | None = None,
                       sees_cache=(True,)) -> Mask:
    """Guidance branches packed into one call over one KV cache:
    ``[B * n_new * T, (n_cached + B * n_new) * T]`` for ``B = len(sees_cache)`` branches.

    Keys are the cached chunks, then branch 0's new chunks, branch 1's, ...; queries are the branches'
    new chunks in the same order. Branch b's rows are `chunk_window_mask` (``sees_cache[b]``) or
    `self_attention_mask` of its new chunks alone (not), with its own new chunks' keys moved to its
    place: a branch never sees another branch's tokens."""
    nc = _count(n_cached_chunks, "branch_window_mask: n_cached_chunks", 0)
    a = _count(n_new_chunks, "branch_window_mask: n_new_chunks", 1)
    t = _count(chunk_tokens, "branch_window_mask: chunk_tokens", 1)
    w = None if window is None else _count(window, "branch_window_mask: window", 1)
    flags = tuple(sees_cache) if isinstance(sees_cache, (tuple, list)) else None
    if not flags or not all(isinstance(f, (bool, np.bool_)) for f in flags):
        raise MaskError(f"branch_window_mask: sees_cache must be a non-empty sequence of bools (one per branch), "
                        f"got {sees_cache!r}")
    return _branch_window_mask(nc, a, t, w, tuple(bool(f) for f in flags))


@functools.lru_cache(maxsize=64)  # a stream asks for the same few layouts every tick
def _branch_window_mask(nc: int, a: int, t: int, w: int | None, flags: tuple[bool, ...]) -> Mask:
    i = np.arange(a, dtype=np.int64)
    back = i + nc if w is None else np.minimum(i + nc, w - 1)  # chunks before each new chunk within the window
    own_lo = np.maximum(i - back, 0)  # the first new chunk each one sees (its own branch's)
    cache_lo = nc + i - back  # the first cached chunk it sees (none when >= nc)
    has = cache_lo < nc
    rows = []
    for b, sees in enumerate(flags):
        q0 = (b * a + i) * t
        base = nc + b * a  # branch b's first new chunk among the keys
        rows.append(np.stack([q0, q0 + t, (base + own_lo) * t, (base + i + 1) * t, np.full(a, int(FULL))], 1))
        if sees and has.any():
            n = int(has.sum())
            rows.append(np.stack([q0[has], q0[has] + t, cache_lo[has] * t, np.full(n, nc * t), np.full(n, int(FULL))], 1))
    return Mask._from_slice_array(np.concatenate(rows), len(flags) * a * t, (nc + len(flags) * a) * t)
