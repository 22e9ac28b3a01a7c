"""FlexAttention interop: `from_mask_mod` (exact block scan) and `to_mask_mod`, against brute force."""

import itertools
import time
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st

import maskc
from maskc import Kind, Mask, MaskError
from maskc import interop
from maskc.interop import from_mask_mod, to_mask_mod

from conftest import masks


def dense_fn(dense):
    """A mask_mod that looks the answer up in a dense numpy array."""
    return lambda b, h, q, k: dense[q, k]


def grid(sq, sk, lib=np, pad=0):
    i = np.arange(-pad, sq + pad)[:, None]
    j = np.arange(-pad, sk + pad)[None, :]
    if lib is torch:
        return torch.from_numpy(i), torch.from_numpy(j)
    return i, j


def padded_dense(m: Mask, pad: int) -> np.ndarray:
    out = np.zeros((m.sq + 2 * pad, m.sk + 2 * pad), dtype=bool)
    out[pad : pad + m.sq, pad : pad + m.sk] = m.to_dense()
    return out


@st.composite
def random_dense(draw, max_side=40):
    sq = draw(st.integers(0, max_side))
    sk = draw(st.integers(0, max_side))
    p = draw(st.sampled_from([0.1, 0.5, 0.9]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    return rng.random((sq, sk)) < p


# ---- from_mask_mod: exact recovery ------------------------------------------------------------


@given(masks(), st.integers(1, 9))
def test_from_mask_mod_recovers_random_masks(md, block):
    m, dense = md
    stats = {}
    got = from_mask_mod(dense_fn(dense), m.sq, m.sk, block=block, stats=stats)
    assert got == m
    assert np.array_equal(got.to_dense(), dense)
    tiles = -(-m.sq // block) * -(-m.sk // block)
    assert stats["blocks_full"] + stats["blocks_empty"] + stats["blocks_partial"] == tiles
    assert stats["verified"] is (m.sq > 0 and m.sk > 0)


@given(random_dense(), st.integers(1, 17), st.sampled_from([1, 8, 64]))
def test_from_mask_mod_arbitrary_dense_any_block_and_chunk(dense, block, chunk):
    # tiny column chunks exercise the carry of the last column from one fn call to the next
    with mock.patch.object(interop, "_CHUNK_ELEMENTS", chunk):
        got = from_mask_mod(dense_fn(dense), *dense.shape, block=block)
    assert np.array_equal(got.to_dense(), dense)
    assert got == Mask(got.slices, *dense.shape)  # canonical


@pytest.mark.parametrize("block", [1, 7, 64, 100, 128, 1000])
def test_blocks_not_dividing_the_sizes(block):
    sq, sk = 333, 301
    fn = lambda b, h, q, k: (k <= q + 5) & (k + 40 >= q) | (k < 3)  # noqa: E731
    i, j = grid(sq, sk)
    got = from_mask_mod(fn, sq, sk, block=block)
    assert np.array_equal(got.to_dense(), fn(0, 0, i, j))
    assert len(got) == 5


# ---- from_mask_mod: typical FlexAttention mask_mods equal the builders --------------------------


def test_causal_with_torch_ops():
    stats = {}
    got = from_mask_mod(lambda b, h, q, k: torch.ge(q, k), 1000, block=128, stats=stats)
    assert stats["backend"] == "torch"
    assert got == maskc.causal(1000)


def test_causal_numpy_path_is_cheap():
    stats = {}
    got = from_mask_mod(lambda b, h, q, k: q >= k, 4096, stats=stats)
    assert got == maskc.causal(4096)
    assert stats["backend"] == "numpy"
    # 32 x 32 tiles: the diagonal is partial, the rest full or empty; 2 pushes per stripe
    assert (stats["blocks_full"], stats["blocks_empty"], stats["blocks_partial"]) == (496, 496, 32)
    assert stats["pushes"] <= 2 * 32
    assert stats["fn_calls"] == 2 * 32  # one call per stripe, scan and verification


def test_causal_rectangular_bottom_right():
    got = from_mask_mod(lambda b, h, q, k: k <= q + (700 - 500), 500, 700, block=64)
    assert got == maskc.causal(500, 700)


@pytest.mark.parametrize("window", [1, 37, 128, 600])
def test_sliding_window(window):
    s = 555
    causal = lambda b, h, q, k: (q >= k) & (q - k < window)  # noqa: E731
    both = lambda b, h, q, k: torch.abs(q - k) < window  # noqa: E731
    assert from_mask_mod(causal, s, block=64) == maskc.sliding_window(s, window)
    assert from_mask_mod(both, s, block=64) == maskc.sliding_window(s, window, causal=False)


def test_document_mask_with_tensor_lookup():
    lengths = [100, 1, 250, 49, 77]
    doc = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    s = sum(lengths)
    stats = {}
    causal_docs = lambda b, h, q, k: (doc[q] == doc[k]) & (q >= k)  # noqa: E731
    got = from_mask_mod(causal_docs, s, block=64, stats=stats)
    assert got == maskc.varlen(lengths, kind=maskc.Kind.CAUSAL)
    assert stats["backend"] == "torch"
    assert from_mask_mod(lambda b, h, q, k: doc[q] == doc[k], s, block=50) == maskc.varlen(
        lengths, kind=Kind.FULL
    )


@pytest.mark.parametrize("prefix", [0, 1, 200, 512])
def test_prefix_lm(prefix):
    fn = lambda b, h, q, k: torch.lt(k, prefix) | (q >= k)  # noqa: E731
    assert from_mask_mod(fn, 512, block=100) == maskc.prefix_lm(512, prefix)


def test_block_causal_and_global_tokens():
    assert from_mask_mod(lambda b, h, q, k: q // 48 >= k // 48, 400, block=64) == maskc.block_causal(400, 48)
    g, w, s = 4, 32, 300
    longformer = lambda b, h, q, k: (q < g) | (k < g) | ((q - k).abs() < w)  # noqa: E731
    got = from_mask_mod(longformer, s, block=32)
    assert got == maskc.global_tokens(s, g, w)
    assert stats_backend(longformer, s) == "torch"  # np arrays have no .abs()


def stats_backend(fn, s):
    stats = {}
    from_mask_mod(fn, s, block=s, stats=stats)
    return stats["backend"]


def test_batch_and_head_are_passed():
    fn = lambda b, h, q, k: (q >= k) | ((h == 1) & (b == 2))  # noqa: E731
    assert from_mask_mod(fn, 50, head=1, batch=2) == maskc.full(50)
    assert from_mask_mod(fn, 50, head=1) == maskc.causal(50)
    tfn = lambda b, h, q, k: torch.ge(q, k) | (h == 3)  # noqa: E731
    assert from_mask_mod(tfn, 50, head=3) == maskc.full(50)


def test_results_that_broadcast_are_accepted():
    assert from_mask_mod(lambda b, h, q, k: q < 5, 20, 30) == Mask([((0, 5), (0, 30))], 20, 30)
    assert from_mask_mod(lambda b, h, q, k: torch.ge(k, 7), 20, 30, block=8) == Mask(
        [((0, 20), (7, 30))], 20, 30
    )
    assert from_mask_mod(lambda b, h, q, k: True, 9, 4) == maskc.full(9, 4)
    assert from_mask_mod(lambda b, h, q, k: np.False_, 9, 4).is_empty()


def test_empty_domains_do_not_call_fn():
    def boom(b, h, q, k):
        raise AssertionError("called")

    assert from_mask_mod(boom, 0, 5) == Mask([], 0, 5)
    assert from_mask_mod(boom, 5, 0) == Mask([], 5, 0)
    assert from_mask_mod(boom, 0) == Mask([], 0, 0)


@pytest.mark.parametrize("lib", ["numpy", "torch"])
def test_non_compact_shape_round_trips_exactly(lib):
    sq, sk = 97, 61
    if lib == "numpy":
        fn = lambda b, h, q, k: (q * k) % 3 == 0  # noqa: E731
    else:
        fn = lambda b, h, q, k: torch.remainder(q * k, 3) == 0  # noqa: E731
    stats = {}
    got = from_mask_mod(fn, sq, sk, block=16, stats=stats)
    assert stats["backend"] == lib
    i, j = grid(sq, sk)
    want = (i * j) % 3 == 0
    assert np.array_equal(got.to_dense(), want)
    assert got == Mask(got.slices, sq, sk)
    # and back: the exported mask_mod (table path, wide rows) gives the same grid
    mm = to_mask_mod(got)
    assert len(got) > 32
    assert np.array_equal(mm(0, 0, i, j), want)
    ti, tj = grid(sq, sk, torch)
    assert torch.equal(mm(0, 0, ti, tj), torch.from_numpy(want))


# ---- verification ------------------------------------------------------------------------------


def test_non_deterministic_fn_raises():
    rng = np.random.default_rng(0)
    fn = lambda b, h, q, k: rng.random(np.broadcast(q, k).shape) < 0.5  # noqa: E731
    with pytest.raises(MaskError, match=r"fn is not deterministic: a second evaluation of query row \d+"):
        from_mask_mod(fn, 64, block=16)


def test_fn_changing_after_the_first_scan_raises_and_names_the_row():
    calls = itertools.count()

    def fn(b, h, q, k):  # 4 stripes: calls 0-3 scan, 4-7 verify; call 6 (rows 32-47) changes
        if next(calls) == 6:
            return (q >= k) | (k == q + 2)
        return q >= k

    with pytest.raises(MaskError, match=r"query row 32 differs"):
        from_mask_mod(fn, 64, block=16)


def test_verify_false_skips_the_second_scan():
    rng = np.random.default_rng(1)
    fn = lambda b, h, q, k: rng.random(np.broadcast(q, k).shape) < 0.5  # noqa: E731
    stats = {}
    m = from_mask_mod(fn, 30, block=8, stats=stats, verify=False)
    assert m.shape == (30, 30)
    assert stats["verified"] is False
    assert stats["fn_calls"] == 4  # one call per stripe (the edge tile rides along), no second scan


# ---- from_mask_mod: bad input --------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(fn=42, sq=8), r"from_mask_mod: fn must be callable .* got int"),
        (dict(sq=-1), r"from_mask_mod: sq must be >= 0, got -1"),
        (dict(sq=2.5), r"from_mask_mod: sq must be an integer, got 2\.5"),
        (dict(sq=True), r"from_mask_mod: sq must be an integer"),
        (dict(sq=8, sk=-3), r"from_mask_mod: sk must be >= 0, got -3"),
        (dict(sq=8, sk="9"), r"from_mask_mod: sk must be an integer"),
        (dict(sq=8, block=0), r"from_mask_mod: block must be >= 1, got 0"),
        (dict(sq=8, block=1.0), r"from_mask_mod: block must be an integer"),
        (dict(sq=8, batch=-1), r"from_mask_mod: batch must be >= 0, got -1"),
        (dict(sq=8, head=None), r"from_mask_mod: head must be an integer"),
        (dict(sq=8, stats=[]), r"from_mask_mod: stats must be a dict or None, got list"),
    ],
)
def test_bad_arguments(kwargs, message):
    kwargs.setdefault("fn", lambda b, h, q, k: q >= k)
    fn = kwargs.pop("fn")
    sq = kwargs.pop("sq")
    with pytest.raises(MaskError, match=message):
        from_mask_mod(fn, sq, **kwargs)


@pytest.mark.parametrize(
    "fn, message",
    [
        (lambda b, h, q, k: np.zeros(3, dtype=bool), r"returned shape \(3,\); expected \(8, 8\)"),
        (lambda b, h, q, k: q - k, r"returned an array of dtype int64, not bool.*tensor of dtype torch\.int64"),
        (lambda b, h, q, k: "yes", r"numpy inputs: returned a str, not a bool array"),
        (lambda b, h, q, k: 1 / 0, r"numpy inputs: raised ZeroDivisionError.*torch inputs: raised ZeroDivisionError"),
        (lambda b, h, q, k: q >= k and q < 5, r"vectorisable .*use & \| ~.*raised ValueError.*raised RuntimeError"),
    ],
)
def test_bad_fn_values(fn, message):
    with pytest.raises(MaskError, match=r"from_mask_mod: fn must be a vectorisable mask_mod"):
        from_mask_mod(fn, 8)
    with pytest.raises(MaskError, match=message):
        from_mask_mod(fn, 8)


def test_fn_failing_on_a_later_stripe_names_the_stripe():
    def fn(b, h, q, k):
        if (q >= 20).any():
            raise KeyError("boom")
        return q >= k

    with pytest.raises(MaskError, match=r"fn raised KeyError on numpy inputs, rows \[16, 24\) x columns \[0, 32\)"):
        from_mask_mod(fn, 32, block=8)

    def shape_changes(b, h, q, k):
        return (q >= k) if (q < 8).all() else (q >= k)[:3]

    with pytest.raises(MaskError, match=r"returned shape \(3, 32\); expected \(8, 32\) .* rows \[8, 16\)"):
        from_mask_mod(shape_changes, 32, block=8)


# ---- to_mask_mod ----------------------------------------------------------------------------------


@given(masks())
def test_to_mask_mod_loop_path_matches_dense(md):
    m, dense = md
    assert len(m) <= 32
    mm = to_mask_mod(m)
    want = padded_dense(m, 2)
    i, j = grid(m.sq, m.sk, pad=2)
    assert np.array_equal(mm(0, 0, i, j), want)
    ti, tj = grid(m.sq, m.sk, torch, pad=2)
    got = mm(0, 0, ti, tj)
    assert got.dtype == torch.bool and torch.equal(got, torch.from_numpy(want))
    got32 = mm(torch.tensor(0), torch.tensor(0), ti.to(torch.int32), tj.to(torch.int32))
    assert torch.equal(got32, torch.from_numpy(want))


@given(random_dense(max_side=30))
def test_to_mask_mod_table_path_matches_dense(dense):
    m = from_mask_mod(dense_fn(dense), *dense.shape, block=8)
    mm = to_mask_mod(m)
    want = padded_dense(m, 3)
    i, j = grid(m.sq, m.sk, pad=3)
    assert np.array_equal(mm(0, 0, i, j), want)
    ti, tj = grid(m.sq, m.sk, torch, pad=3)
    assert torch.equal(mm(0, 0, ti.to(torch.int32), tj), torch.from_numpy(want))


@pytest.mark.parametrize(
    "mask",
    [
        maskc.varlen([3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2, 3, 8, 4] * 3, kind=Kind.CAUSAL),
        maskc.global_tokens(200, 3, 5, causal=True) | maskc.varlen([5] * 40, kind=Kind.FULL),
        maskc.magi_video([3, 5, 2, 4, 6, 1, 7, 8], 4, window=2),
        from_mask_mod(lambda b, h, q, k: (q * k) % 5 == 1, 60, 45),
    ],
    ids=["varlen-linear", "sinks-linear", "magi-linear", "modular-bisection"],
)
def test_to_mask_mod_table_paths_on_structured_masks(mask):
    assert len(mask) > 32
    tables = interop._Tables(mask)
    mm = to_mask_mod(mask)
    want = padded_dense(mask, 1)
    i, j = grid(mask.sq, mask.sk, pad=1)
    assert np.array_equal(mm(0, 0, i, j), want)
    ti, tj = grid(mask.sq, mask.sk, torch, pad=1)
    assert torch.equal(mm(0, 0, ti, tj), torch.from_numpy(want))
    assert tables.linear == (tables.width <= interop._LINEAR_WIDTH)


@pytest.mark.parametrize(
    "mask",
    [
        maskc.causal(37, 50),
        maskc.sliding_window(40, 6, causal=False),
        maskc.varlen([7] * 10, kind=Kind.BI_CAUSAL),  # 10 slices: loop path
        maskc.varlen([2, 3] * 20, kind=Kind.CAUSAL),  # 40 slices: table path
        Mask([], 5, 6),
    ],
)
def test_to_mask_mod_under_flex_attention_vmap(mask):
    from torch.nn.attention.flex_attention import create_mask

    mm = to_mask_mod(mask)
    got = create_mask(mm, 1, 1, mask.sq, mask.sk, device="cpu")[0, 0]
    assert torch.equal(got, torch.from_numpy(mask.to_dense()))


def test_to_mask_mod_scalars_and_mixed_inputs():
    for m in (maskc.sliding_window(30, 4), maskc.varlen([1] * 40)):
        mm = to_mask_mod(m)
        dense = m.to_dense()
        assert mm.mask is m
        for i, j in [(0, 0), (5, 3), (29, 29), (10, 0), (-1, 0), (0, -1), (30, 29), (3, 30)]:
            inside = 0 <= i < m.sq and 0 <= j < m.sk
            want = bool(dense[i, j]) if inside else False
            got = mm(0, 0, i, j)
            assert type(got) is bool and got == want
            t = mm(torch.tensor(0), torch.tensor(0), torch.tensor(i), torch.tensor(j))
            assert t.shape == () and bool(t) == want
            assert bool(mm(0, 0, np.int64(i), np.int32(j))) == want
        # torch q against a numpy / int k, numpy q against a torch k
        i, j = grid(m.sq, m.sk)
        assert torch.equal(mm(0, 0, torch.from_numpy(i), j), torch.from_numpy(dense))
        assert torch.equal(mm(0, 0, i, torch.from_numpy(j)), torch.from_numpy(dense))
        assert torch.equal(mm(0, 0, torch.from_numpy(i), 3), torch.from_numpy(dense[:, 3:4]))


def test_to_mask_mod_bad_input():
    with pytest.raises(MaskError, match=r"to_mask_mod: expected a Mask, got list"):
        to_mask_mod([((0, 1), (0, 1))])


# ---- round trips ------------------------------------------------------------------------------------


@given(masks(), st.integers(1, 6))
def test_round_trip_through_mask_mod(md, block):
    m, _ = md
    assert from_mask_mod(to_mask_mod(m), m.sq, m.sk, block=block) == m


@given(random_dense(max_side=30))
def test_round_trip_table_path(dense):
    m = from_mask_mod(dense_fn(dense), *dense.shape, block=8)
    mm = to_mask_mod(m)
    assert from_mask_mod(mm, *dense.shape, block=5) == m
    as_torch = lambda b, h, q, k: mm(b, h, torch.as_tensor(q), torch.as_tensor(k))  # noqa: E731
    assert from_mask_mod(as_torch, *dense.shape, block=7) == m


def test_round_trip_builders_through_torch_inputs():
    for m in (maskc.causal(300), maskc.magi_video([4, 3], 16, window=2), maskc.prefix_lm(200, 50)):
        mm = to_mask_mod(m)
        fn = lambda b, h, q, k: mm(b, h, torch.as_tensor(q), torch.as_tensor(k))  # noqa: E731
        assert from_mask_mod(fn, m.sq, m.sk, block=64) == m


# ---- performance ------------------------------------------------------------------------------------


def test_causal_16k_is_fast():
    t0 = time.perf_counter()
    got = from_mask_mod(lambda b, h, q, k: q >= k, 16384)
    elapsed = time.perf_counter() - t0
    assert got == maskc.causal(16384)
    assert elapsed < 5.0, f"16k causal took {elapsed:.2f} s"
