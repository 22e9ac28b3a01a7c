"""Builders against hand-written dense predicates, and their argument errors."""

import numpy as np
import pytest
from hypothesis import given, strategies as st

import maskc
from maskc import Kind, MaskError

from conftest import dense_slice


def grid(sq, sk):
    return np.meshgrid(np.arange(sq), np.arange(sk), indexing="ij")


@given(st.integers(0, 20), st.integers(0, 20))
def test_full_and_causal(sq, sk):
    i, j = grid(sq, sk)
    assert np.array_equal(maskc.full(sq, sk).to_dense(), np.ones((sq, sk), bool))
    assert np.array_equal(maskc.causal(sq, sk).to_dense(), j <= i + (sk - sq))
    assert maskc.causal(sq) == maskc.causal(sq, sq)


@given(st.integers(0, 24), st.integers(1, 30))
def test_sliding_window(s, w):
    i, j = grid(s, s)
    assert np.array_equal(maskc.sliding_window(s, w).to_dense(), (j <= i) & (i - j < w))
    assert np.array_equal(maskc.sliding_window(s, w, causal=False).to_dense(), np.abs(i - j) < w)


@given(st.lists(st.integers(0, 6), min_size=1, max_size=6), st.sampled_from(list(Kind)))
def test_varlen(lengths, kind):
    s = sum(lengths)
    want = np.zeros((s, s), bool)
    start = 0
    for n in lengths:
        want |= dense_slice(s, s, (start, start + n), (start, start + n), kind)
        start += n
    assert np.array_equal(maskc.varlen(lengths, kind).to_dense(), want)


@given(st.integers(0, 30), st.integers(1, 9))
def test_block_causal(s, chunk):
    i, j = grid(s, s)
    assert np.array_equal(maskc.block_causal(s, chunk).to_dense(), j // chunk <= i // chunk)


@given(st.integers(0, 20), st.data())
def test_prefix_lm(s, data):
    p = data.draw(st.integers(0, s))
    i, j = grid(s, s)
    assert np.array_equal(maskc.prefix_lm(s, p).to_dense(), (j <= i) | ((i < p) & (j < p)))


@given(st.integers(0, 20), st.data(), st.integers(1, 8))
def test_global_tokens(s, data, w):
    g = data.draw(st.integers(0, s))
    i, j = grid(s, s)
    longformer = (np.abs(i - j) < w) | (i < g) | (j < g)
    sinks = (j <= i) & ((i - j < w) | (j < g))
    assert np.array_equal(maskc.global_tokens(s, g, w).to_dense(), longformer)
    assert np.array_equal(maskc.global_tokens(s, g, w, causal=True).to_dense(), sinks)


@given(st.integers(0, 6), st.lists(st.integers(0, 5), min_size=1, max_size=4))
def test_shared_prefix(p, branches):
    s = p + sum(branches)
    owner = np.full(s, -1)
    start = p
    for b, n in enumerate(branches):
        owner[start : start + n] = b
        start += n
    i, j = grid(s, s)
    want = (j <= i) & ((owner[j] == -1) | (owner[j] == owner[i]))
    assert np.array_equal(maskc.shared_prefix(p, branches).to_dense(), want)


@given(st.lists(st.integers(0, 5), min_size=1, max_size=4), st.integers(1, 4), st.one_of(st.none(), st.integers(1, 6)))
def test_magi_video(chunks, t, window):
    s = sum(chunks) * t
    video = np.repeat(np.arange(len(chunks)), np.array(chunks) * t)
    first_chunk = np.repeat(np.cumsum(chunks) - np.array(chunks), np.array(chunks) * t)
    chunk_in_video = np.arange(s) // t - first_chunk
    i, j = grid(s, s)
    ci, cj = chunk_in_video[i], chunk_in_video[j]
    want = (video[i] == video[j]) & (cj <= ci)
    if window is not None:
        want &= ci - cj < window
    m = maskc.magi_video(chunks, t, window)
    assert np.array_equal(m.to_dense(), want)
    if window is None:
        assert m == maskc.concat(*[maskc.block_causal(c * t, t) for c in chunks])


def test_magi_video_is_one_full_slice_per_chunk():
    m = maskc.magi_video([32] * 16, 8192)
    assert m.sq == 4_194_304 and len(m) == 512
    assert m.kinds_present() == {Kind.FULL}


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: maskc.full(-1), "full: sq must be >= 0, got -1"),
        (lambda: maskc.causal(4.0), r"causal: sq must be an integer, got 4.0 \(float\)"),
        (lambda: maskc.sliding_window(8, 0), "sliding_window: window must be >= 1, got 0"),
        (lambda: maskc.varlen([3, -1]), r"varlen: lengths\[1\] must be >= 0, got -1"),
        (lambda: maskc.varlen([]), "varlen: lengths is empty"),
        (lambda: maskc.varlen(5), "varlen: lengths must be a sequence of integers"),
        (lambda: maskc.varlen([2], kind="diagonal"), "varlen: kind: unknown kind 'diagonal'; allowed: FULL"),
        (lambda: maskc.block_causal(8, 0), "block_causal: chunk must be >= 1, got 0"),
        (lambda: maskc.prefix_lm(4, 5), "prefix_lm: prefix 5 is longer than the sequence s=4"),
        (lambda: maskc.global_tokens(4, 5, 2), "global_tokens: n_global 5 exceeds"),
        (lambda: maskc.shared_prefix(2, [1, True]), r"shared_prefix: branches\[1\] must be an integer"),
        (lambda: maskc.magi_video([2, 2], 0), "magi_video: chunk_tokens must be >= 1, got 0"),
        (lambda: maskc.magi_video([2], 4, window=0), "magi_video: window must be >= 1, got 0"),
    ],
)
def test_builder_errors(call, message):
    with pytest.raises(MaskError, match=message):
        call()
