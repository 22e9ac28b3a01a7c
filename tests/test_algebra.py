"""Exact algebra: every law checked against dense boolean arithmetic on random masks."""

import numpy as np
import pytest
from hypothesis import given, strategies as st

import maskc
from maskc import Kind, Mask, MaskError

from conftest import mask_pairs, masks


@given(mask_pairs(2))
def test_binary_ops_match_dense(pair):
    (a, da), (b, db) = pair
    for got, want in [(a | b, da | db), (a & b, da & db), (a - b, da & ~db), (a ^ b, da ^ db)]:
        assert np.array_equal(got.to_dense(), want)
        assert got.area == int(want.sum())


@given(masks())
def test_complement(md):
    a, da = md
    assert np.array_equal((~a).to_dense(), ~da)
    assert ~~a == a
    assert (a | ~a).area == a.sq * a.sk
    assert (a & ~a).is_empty()


@given(mask_pairs(3))
def test_laws(triple):
    (a, _), (b, _), (c, _) = triple
    # commutativity, associativity, distributivity
    assert a | b == b | a and a & b == b & a
    assert (a | b) | c == a | (b | c)
    assert (a & b) & c == a & (b & c)
    assert a & (b | c) == (a & b) | (a & c)
    assert a | (b & c) == (a | b) & (a | c)
    # De Morgan
    assert ~(a | b) == ~a & ~b
    assert ~(a & b) == ~a | ~b
    # idempotence, absorption, difference
    assert a | a == a and a & a == a
    assert a | (a & b) == a
    assert a - b == a & ~b
    assert (a - b).issubset(a) and (a - b) & b == (a & b) - a
    assert a <= a | b and a | b >= b


@given(mask_pairs(3))
def test_combine_and_union_one_sweep(triple):
    (a, da), (b, db), (c, dc) = triple
    got = maskc.combine([a, b, c], lambda x, y, z: (x and not y) or (z and y))
    assert np.array_equal(got.to_dense(), (da & ~db) | (dc & db))
    assert maskc.union(a, b, c) == a | b | c
    assert maskc.union([a, b]) == a | b


@given(masks(), st.integers(-14, 14), st.integers(-14, 14))
def test_shift_matches_dense(md, dq, dk):
    a, da = md
    want = np.zeros_like(da)
    sq, sk = da.shape
    for i, j in zip(*np.nonzero(da)):
        if 0 <= i + dq < sq and 0 <= j + dk < sk:
            want[i + dq, j + dk] = True
    assert np.array_equal(a.shift(dq, dk).to_dense(), want)


@given(st.lists(masks(max_side=6), min_size=1, max_size=4))
def test_concat_and_repeat(items):
    ms = [m for m, _ in items]
    ds = [d for _, d in items]
    sq = sum(d.shape[0] for d in ds)
    sk = sum(d.shape[1] for d in ds)
    want = np.zeros((sq, sk), dtype=bool)
    r = c = 0
    for d in ds:
        want[r : r + d.shape[0], c : c + d.shape[1]] = d
        r += d.shape[0]
        c += d.shape[1]
    got = maskc.concat(*ms)
    assert got.shape == (sq, sk)
    assert np.array_equal(got.to_dense(), want)
    assert got == Mask(got.slices, sq=sq, sk=sk)  # canonical across the seams
    n = len(ms)
    assert ms[0].repeat(n) == maskc.concat(*([ms[0]] * n))


@given(masks(), st.integers(0, 14), st.integers(0, 14))
def test_with_shape(md, sq, sk):
    a, da = md
    want = np.zeros((sq, sk), dtype=bool)
    h, w = min(sq, a.sq), min(sk, a.sk)
    want[:h, :w] = da[:h, :w]
    assert np.array_equal(a.with_shape(sq, sk).to_dense(), want)


def test_normalises_overlapping_causal_and_window_into_four_kinds():
    m = maskc.sliding_window(32, 5) | maskc.Mask([((8, 20), (0, 20), Kind.CAUSAL)], sq=32, sk=32)
    kinds = {s.kind for s in m.slices}
    assert kinds <= set(Kind)
    assert m == maskc.Mask(m.slices, sq=32, sk=32)
    assert np.array_equal(
        m.to_dense(),
        maskc.sliding_window(32, 5).to_dense() | maskc.Mask([((8, 20), (0, 20), 1)], sq=32, sk=32).to_dense(),
    )


def test_errors_name_the_problem():
    a, b = maskc.causal(4), maskc.causal(5)
    with pytest.raises(MaskError, match=r"shape mismatch \(4, 4\) vs \(5, 5\)"):
        a | b
    with pytest.raises(MaskError, match="both operands must be Masks"):
        a & 3
    with pytest.raises(MaskError, match="shift dq must be an integer, got 1.5"):
        a.shift(1.5, 0)
    with pytest.raises(MaskError, match="repeat n must be >= 1, got 0"):
        a.repeat(0)
    with pytest.raises(MaskError, match="concat\\(\\) needs at least one mask"):
        maskc.concat()
    with pytest.raises(MaskError, match="argument 1 is a int, not a Mask"):
        maskc.concat(a, 3)
    with pytest.raises(MaskError, match="at most 16 masks"):
        maskc.combine([a] * 17, lambda *x: any(x))
