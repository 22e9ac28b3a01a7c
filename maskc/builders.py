"""Builders for the masks the field uses. Each returns a normalised `Mask` without an S x S step."""

from __future__ import annotations

import numpy as np

from .errors import MaskError
from .kinds import Kind, as_int
from .mask import Mask, concat, union

FULL, CAUSAL, INV_CAUSAL, BI_CAUSAL = Kind.FULL, Kind.CAUSAL, Kind.INV_CAUSAL, Kind.BI_CAUSAL


def _positive(value, what: str) -> int:
    n = as_int(value, what)
    if n < 1:
        raise MaskError(f"{what} must be >= 1, got {n}")
    return n


def _nonneg(value, what: str) -> int:
    n = as_int(value, what)
    if n < 0:
        raise MaskError(f"{what} must be >= 0, got {n}")
    return n


def _lengths(values, what: str, *, allow_zero: bool = True) -> list[int]:
    if hasattr(values, "tolist"):
        values = values.tolist()
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise MaskError(f"{what} must be a sequence of integers, got {values!r}")
    out = []
    for t, v in enumerate(values):
        n = as_int(v, f"{what}[{t}]")
        if n < 0 or (n == 0 and not allow_zero):
            raise MaskError(f"{what}[{t}] must be {'>= 0' if allow_zero else '>= 1'}, got {n}")
        out.append(n)
    if not out:
        raise MaskError(f"{what} is empty; give at least one length")
    return out


def _mask(rows, sq: int, sk: int) -> Mask:
    arr = np.array(rows, dtype=np.int64).reshape(-1, 5)
    return Mask._from_slice_array(arr, sq, sk)


def full(sq: int, sk: int | None = None) -> Mask:
    """Every query sees every key."""
    sq = _nonneg(sq, "full: sq")
    sk = sq if sk is None else _nonneg(sk, "full: sk")
    return _mask([(0, sq, 0, sk, FULL)], sq, sk)


def causal(sq: int, sk: int | None = None) -> Mask:
    """Causal, bottom-right aligned: query i sees keys j <= i + (sk - sq)."""
    sq = _nonneg(sq, "causal: sq")
    sk = sq if sk is None else _nonneg(sk, "causal: sk")
    return _mask([(0, sq, 0, sk, CAUSAL)], sq, sk)


def sliding_window(s: int, window: int, causal: bool = True) -> Mask:
    """Local attention over ``s`` tokens.

    ``causal=True``: query i sees the ``window`` most recent keys, ``i - window < j <= i``.
    ``causal=False``: query i sees keys with ``|i - j| < window``.
    """
    s = _nonneg(s, "sliding_window: s")
    w = _positive(window, "sliding_window: window")
    rows = []
    # rows [0, w): the window is clipped at key 0
    head = min(w, s)
    if causal:
        rows.append((0, head, 0, head, CAUSAL))
        if s > w:  # rows [w, s): j in [i - w + 1, i]
            rows.append((w, s, 1, s, BI_CAUSAL))
        return _mask(rows, s, s)
    # bidirectional: lower part i - w < j, upper part j < i + w, each clipped to [0, s)
    lower = _mask([(0, head, 0, head, CAUSAL)] + ([(w, s, 1, s, BI_CAUSAL)] if s > w else []), s, s)
    # upper: j in [i, i + w) clipped: mirror of the lower part
    upper_rows = []
    tail = max(s - w, 0)
    if tail > 0:
        upper_rows.append((0, tail, 0, s - 1, BI_CAUSAL))
    upper_rows.append((tail, s, tail, s, INV_CAUSAL))
    upper = _mask(upper_rows, s, s)
    return lower | upper


def varlen(lengths, kind=Kind.CAUSAL) -> Mask:
    """Packed documents: document t attends within itself with ``kind`` (block diagonal)."""
    lens = _lengths(lengths, "varlen: lengths")
    kind = Kind.parse(kind, where="varlen: kind")
    ends = np.cumsum(lens)
    starts = ends - np.array(lens)
    s = int(ends[-1])
    rows = np.stack([starts, ends, starts, ends, np.full(len(lens), int(kind))], axis=1)
    return Mask._from_slice_array(rows, s, s)


def block_causal(s: int, chunk: int) -> Mask:
    """Chunks of ``chunk`` tokens; chunk c sees chunks 0..c in full (the last chunk may be short)."""
    s = _nonneg(s, "block_causal: s")
    chunk = _positive(chunk, "block_causal: chunk")
    starts = np.arange(0, s, chunk, dtype=np.int64)
    ends = np.minimum(starts + chunk, s)
    rows = np.stack([starts, ends, np.zeros_like(starts), ends, np.zeros_like(starts)], axis=1)
    return Mask._from_slice_array(rows, s, s)


def prefix_lm(s: int, prefix: int) -> Mask:
    """Prefix-LM: the first ``prefix`` tokens see each other in full; later tokens are causal."""
    s = _nonneg(s, "prefix_lm: s")
    prefix = _nonneg(prefix, "prefix_lm: prefix")
    if prefix > s:
        raise MaskError(f"prefix_lm: prefix {prefix} is longer than the sequence s={s}")
    rows = [(0, prefix, 0, prefix, FULL)] if prefix else []
    if s > prefix:
        rows.append((prefix, s, 0, s, CAUSAL))
    return _mask(rows, s, s)


def global_tokens(s: int, n_global: int, window: int, causal: bool = False) -> Mask:
    """Local window plus ``n_global`` global tokens at the start.

    ``causal=False`` (Longformer): global tokens see everything, every token sees the global
    tokens, other pairs need ``|i - j| < window``.
    ``causal=True`` (attention sinks): every query sees the global tokens up to itself and its
    causal window ``i - window < j <= i``.
    """
    s = _nonneg(s, "global_tokens: s")
    g = _nonneg(n_global, "global_tokens: n_global")
    if g > s:
        raise MaskError(f"global_tokens: n_global {g} exceeds the sequence length s={s}")
    local = sliding_window(s, window, causal=causal)
    if g == 0:
        return local
    if causal:
        sinks = _mask([(0, g, 0, g, CAUSAL), (g, s, 0, g, FULL)] if s > g else [(0, g, 0, g, CAUSAL)], s, s)
        return local | sinks
    glob = _mask([(0, g, 0, s, FULL), (0, s, 0, g, FULL)], s, s)
    return local | glob


def shared_prefix(prefix: int, branches) -> Mask:
    """A causal shared prompt of ``prefix`` tokens, then packed branches.

    Branch b sees the whole prefix and itself causally, never another branch (tree decoding,
    best-of-n sampling, GRPO groups).
    """
    prefix = _nonneg(prefix, "shared_prefix: prefix")
    lens = _lengths(branches, "shared_prefix: branches")
    s = prefix + sum(lens)
    rows = [(0, prefix, 0, prefix, CAUSAL)] if prefix else []
    start = prefix
    for n in lens:
        if n:
            if prefix:
                rows.append((start, start + n, 0, prefix, FULL))
            rows.append((start, start + n, start, start + n, CAUSAL))
        start += n
    return _mask(rows, s, s)


def magi_video(video_chunks, chunk_tokens: int, window: int | None = None) -> Mask:
    """MAGI-1's packed video mask.

    Video v has ``video_chunks[v]`` chunks of ``chunk_tokens`` tokens, packed one after another.
    Chunk c of a video sees its own video's chunks ``max(0, c - window + 1) .. c`` in full;
    ``window=None`` means all earlier chunks (block-causal): the training mask; a finite window is
    the inference mask.
    """
    counts = _lengths(video_chunks, "magi_video: video_chunks")
    t = _positive(chunk_tokens, "magi_video: chunk_tokens")
    w = None if window is None else _positive(window, "magi_video: window")
    counts_arr = np.array(counts, dtype=np.int64)
    video_start = (np.cumsum(counts_arr) - counts_arr) * t
    vid = np.repeat(np.arange(len(counts)), counts_arr)
    first = np.repeat(np.cumsum(counts_arr) - counts_arr, counts_arr)
    c = np.arange(int(counts_arr.sum()), dtype=np.int64) - first  # chunk index within its video
    qs = video_start[vid] + c * t
    qe = qs + t
    lo = c if w is None else np.minimum(c, w - 1)
    ks = qs - lo * t
    s = int(counts_arr.sum()) * t
    rows = np.stack([qs, qe, ks, qe, np.zeros_like(qs)], axis=1)
    return Mask._from_slice_array(rows, s, s)


__all__ = [
    "block_causal",
    "causal",
    "concat",
    "full",
    "global_tokens",
    "magi_video",
    "prefix_lm",
    "shared_prefix",
    "sliding_window",
    "union",
    "varlen",
]
