"""Normalisation, canonical form, views and interchange of `Mask`, against dense definitions."""

import json

import numpy as np
import pytest
from hypothesis import given, strategies as st

import maskc
from maskc import Kind, Mask, Slice
from maskc.kinds import slice_area

from conftest import dense_slice, mask_pairs, masks, shapes


def assert_canonical(m: Mask):
    """Slices are non-empty, pairwise disjoint, tight and sorted; a repeat normalises to itself."""
    d = np.zeros(m.shape, dtype=int)
    for s in m.slices:
        part = dense_slice(m.sq, m.sk, s.q, s.k, s.kind)
        assert part.any(), f"empty slice {s}"
        # tight: every row of the q range and every column of the k range is used
        assert part[s.q[0] : s.q[1]].any(axis=1).all(), f"slice {s} has empty rows"
        assert part[:, s.k[0] : s.k[1]].any(axis=0).all(), f"slice {s} has empty columns"
        d += part
    assert d.max(initial=0) <= 1, "slices overlap"
    keys = [(s.q[0], s.k[0]) for s in m.slices]
    assert keys == sorted(keys)
    assert Mask(m.slices, sq=m.sq, sk=m.sk).array.tolist() == m.array.tolist()


@given(masks())
def test_normalisation_is_exact(md):
    m, dense = md
    assert np.array_equal(m.to_dense(), dense)
    assert_canonical(m)


@given(masks())
def test_area_row_counts_col_counts(md):
    m, dense = md
    assert m.area == int(dense.sum())
    assert np.array_equal(m.row_counts(), dense.sum(axis=1))
    assert np.array_equal(m.col_counts(), dense.sum(axis=0))
    assert m.density == (dense.mean() if dense.size else 0.0)


@given(masks(), st.data())
def test_area_in_rectangles_and_getitem(md, data):
    m, dense = md
    sq, sk = m.shape
    r0 = data.draw(st.integers(0, sq))
    r1 = data.draw(st.integers(r0, sq))
    c0 = data.draw(st.integers(0, sk))
    c1 = data.draw(st.integers(c0, sk))
    assert m.area_in((r0, r1), (c0, c1)) == int(dense[r0:r1, c0:c1].sum())
    if sq and sk:
        i = data.draw(st.integers(0, sq - 1))
        j = data.draw(st.integers(0, sk - 1))
        assert m[i, j] == bool(dense[i, j])
        ii, jj = np.meshgrid(np.arange(sq), np.arange(sk), indexing="ij")
        assert np.array_equal(m[ii, jj], dense)


@given(st.integers(0, 9), st.integers(0, 9), st.sampled_from(list(Kind)))
def test_slice_area_closed_form(lq, lk, kind):
    d = dense_slice(lq, lk, (0, lq), (0, lk), kind)
    assert slice_area(lq, lk, kind) == int(d.sum())
    assert Slice((0, lq), (0, lk), kind).area == int(d.sum())


@given(mask_pairs())
def test_equality_means_same_pairs(pair):
    (a, da), (b, db) = pair
    assert (a == b) == np.array_equal(da, db)
    if a == b:
        assert hash(a) == hash(b) and a.digest() == b.digest()


@given(masks())
def test_json_round_trip(md):
    m, _ = md
    text = m.to_json()
    back = Mask.from_json(text)
    assert back == m
    assert Mask.from_json(json.loads(text)) == m


@given(masks())
def test_ranges_round_trip(md):
    m, dense = md
    q, k, kinds = m.to_ranges()
    assert q.dtype == np.int32 and k.dtype == np.int32 and kinds.dtype == np.int32
    assert q.shape == (len(m), 2) and k.shape == (len(m), 2) and kinds.shape == (len(m),)
    back = Mask.from_ranges(q, k, kinds, sq=m.sq, sk=m.sk)
    assert back == m
    assert np.array_equal(back.to_dense(), dense)


def test_from_ranges_accepts_lists_and_tensors():
    m = Mask.from_ranges([[0, 4], [4, 8]], [[0, 4], [0, 8]], [1, 0], sq=8, sk=8)
    assert m.area == 10 + 32
    torch = pytest.importorskip("torch")
    t = Mask.from_ranges(
        torch.tensor([[0, 4], [4, 8]]), torch.tensor([[0, 4], [0, 8]]), torch.tensor([1, 0]), sq=8, sk=8
    )
    assert t == m


def test_canonical_examples():
    # a union of a causal mask and a window inside it is just the causal mask
    assert maskc.causal(64) | maskc.sliding_window(64, 7) == maskc.causal(64)
    # two 1x1 blocks on the diagonal are one BI_CAUSAL band of width 1
    m = maskc.concat(maskc.full(1), maskc.full(1))
    assert m.slices == (Slice((0, 2), (0, 2), Kind.BI_CAUSAL),)
    # a causal square minus a diagonal band leaves a strictly lower triangle
    lower = maskc.causal(6) - maskc.varlen([1] * 6, Kind.FULL)
    assert lower.slices == (Slice((1, 6), (0, 5), Kind.CAUSAL),)
    # complement of causal is a strict upper triangle (INV_CAUSAL, top-left aligned)
    assert (~maskc.causal(5)).slices == (Slice((0, 4), (1, 5), Kind.INV_CAUSAL),)


def test_repr_is_readable():
    r = repr(maskc.causal(4) | maskc.full(4) - maskc.full(4))
    assert r.startswith("Mask(sq=4, sk=4, 1 slice, area=10")
    assert "Slice(q=(0, 4), k=(0, 4), CAUSAL)" in r
    big = maskc.varlen([3] * 20, Kind.FULL)
    assert "... 12 more ..." in repr(big)


def test_immutable():
    m = maskc.causal(8)
    with pytest.raises(ValueError):
        m.array[0, 0] = 3
    with pytest.raises(AttributeError):
        m.sq = 3


@given(shapes(), st.data())
def test_empty_and_degenerate(shape, data):
    sq, sk = shape
    m = Mask([], sq=sq, sk=sk)
    assert m.is_empty() and m.area == 0 and len(m) == 0
    assert (~m).area == sq * sk
    assert ~~m == m


@given(st.lists(st.tuples(st.integers(1, 4), st.integers(0, 10), st.integers(0, 10), st.sampled_from(list(Kind))), min_size=1, max_size=8))
def test_fast_path_equals_sweep(rows):
    """Row-disjoint inputs skip the sweep; both paths must give the same canonical bands."""
    from maskc import normalize as nz
    from maskc.mask import _SELF

    sk = 12
    slices, r = [], 0
    for lq, ks, ke, kind in rows:
        ks, ke = min(ks, ke), max(ks, ke)
        slices.append((r, r + lq, ks, ke, int(kind)))
        r += lq
    bands = nz.slices_to_bands(np.array(slices))
    fast = nz.canonical_from_disjoint(bands, r, sk)
    assert fast is not None
    assert np.array_equal(fast, nz.sweep([bands], _SELF, r, sk))


def _raster(bands, sq, sk):
    out = np.zeros((sq, sk), dtype=bool)
    for r0, r1, ac, a_s, bc, b_s in np.asarray(bands).tolist():
        for i in range(max(r0, 0), min(r1, sq)):
            out[i, max(ac + a_s * i, 0):max(min(bc + b_s * i, sk), 0)] = True
    return out


@given(st.integers(1, 40), st.integers(1, 40), st.booleans(),
       st.lists(st.tuples(st.integers(-3, 42), st.integers(0, 15), st.integers(-3, 42), st.integers(-2, 20)),
                min_size=24, max_size=48))
def test_union_of_many_rectangles(sq, sk, long_rows, rects):
    """A union of >= 24 constant bands is merged on a grid (`_sweep_constant_bands`), assembled
    directly where every row segment spans 2+ rows: same bands as the per-segment sweep, and the
    union's cells."""
    from maskc import normalize as nz

    step = 2 if long_rows else 1  # even row ends: every segment spans 2+ rows (the direct assembly)
    bands = np.array([(step * r0, step * (r0 + h), c0, 0, c0 + w, 0) for r0, h, c0, w in rects], dtype=np.int64)
    sq *= step
    got = nz.sweep([bands], [False, True], sq, sk)
    saved = nz._MANY_RECTANGLES
    nz._MANY_RECTANGLES = 10**9  # the per-segment path
    try:
        want = nz.sweep([bands], [False, True], sq, sk)
    finally:
        nz._MANY_RECTANGLES = saved
    assert got.dtype == want.dtype and np.array_equal(got, want)
    assert np.array_equal(_raster(got, sq, sk), _raster(bands, sq, sk))
