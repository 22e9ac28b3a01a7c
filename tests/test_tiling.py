"""Lowering: the work lists compute every allowed pair exactly once, forward and backward."""

import numpy as np
import pytest
from hypothesis import given, strategies as st

import maskc
from maskc import MaskError
from maskc.tiling import TilePlan, lower

from conftest import mask_pairs, masks

blocks = st.sampled_from([1, 2, 4, 8, 16])


def bwd_coverage(p: TilePlan, dense: np.ndarray) -> np.ndarray:
    """Coverage of the per-key-tile lists, predicates evaluated in column form."""
    sq, sk = dense.shape
    bq, bk = p.block_q, p.block_k
    cov = np.zeros((sq, sk), dtype=np.int64)
    bw = p.bwd
    for kt in range(p.n_k_tiles):
        cols = slice(kt * bk, min((kt + 1) * bk, sk))
        for a, b in bw.full_runs[bw.full_ptr[kt] : bw.full_ptr[kt + 1]]:
            assert dense[a * bq : min(b * bq, sq), cols].all(), "a FULL run holds a masked pair"
            cov[a * bq : min(b * bq, sq), cols] += 1
        for pp in range(bw.part_ptr[kt], bw.part_ptr[kt + 1]):
            qt = int(bw.part_tiles[pp])
            rows = slice(qt * bq, min((qt + 1) * bq, sq))
            i = np.arange(rows.start, rows.stop)[:, None]
            j = np.arange(cols.start, cols.stop)[None, :]
            hit = np.zeros((i.shape[0], j.shape[1]), bool)
            for s in bw.preds[bw.pred_ptr[pp] : bw.pred_ptr[pp + 1]]:
                r0, r1, ac, a_s, bc, b_s = p.bands_t[s].tolist()
                hit |= (j >= r0) & (j < r1) & (i >= ac + a_s * j) & (i < bc + b_s * j)
            assert hit.any(), "an empty partial tile"
            cov[rows, cols] += hit
    return cov


@given(masks(max_side=40, max_slices=6), blocks, blocks)
def test_every_pair_exactly_once(md, bq, bk):
    m, dense = md
    p = lower(m, bq, bk)
    assert np.array_equal(p.coverage(), dense.astype(int))
    assert np.array_equal(bwd_coverage(p, dense), dense.astype(int))
    fw = p.fwd
    for qt in range(p.n_q_tiles):
        rows = slice(qt * bq, min((qt + 1) * bq, m.sq))
        for a, b in fw.full_runs[fw.full_ptr[qt] : fw.full_ptr[qt + 1]]:
            assert dense[rows, a * bk : b * bk].all()
        # partial tiles are not full (else they would sit in a run)
        for kt in fw.part_tiles[fw.part_ptr[qt] : fw.part_ptr[qt + 1]]:
            tile = dense[rows, kt * bk : min((kt + 1) * bk, m.sk)]
            assert tile.any()
            assert not (tile.all() and (kt + 1) * bk <= m.sk)
    # LPT: heaviest query tiles first, a permutation
    assert sorted(fw.order.tolist()) == list(range(p.n_q_tiles))
    cost = fw.cost()
    assert np.all(np.diff(cost[fw.order]) <= 0)


@given(masks(max_side=20), blocks, blocks)
def test_json_round_trip(md, bq, bk):
    m, _ = md
    p = lower(m, bq, bk)
    back = TilePlan.from_json(p.to_json())
    assert back.to_json() == p.to_json() and back.digest() == p.digest()


def test_aligned_block_causal_has_no_partial_tiles():
    p = lower(maskc.magi_video([4, 4], 256), 128, 128)
    assert p.fwd.n_partial_tiles == 0 and p.bwd.n_partial_tiles == 0
    assert p.partial_kinds == frozenset()
    # per query tile: exactly one FULL run, from its video's first key tile to its chunk's end
    assert p.fwd.work(3) == [("full", 0, 4)]
    assert p.fwd.work(8) == [("full", 8, 10)]


def test_causal_lists():
    p = lower(maskc.causal(512), 128, 128)
    assert p.fwd.work(0) == [("partial", 0, (0,))]
    assert p.fwd.work(3) == [("full", 0, 3), ("partial", 3, (0,))]
    assert p.fwd.n_full_tiles == 6 and p.fwd.n_partial_tiles == 4
    assert p.fwd.order.tolist() == [3, 2, 1, 0]
    assert "4x4 tiles: 6 full in 3 runs, 4 partial" in repr(p)
    assert p.ascii().splitlines()[:4] == ["+...", "#+..", "##+.", "###+"]


def test_full_tiles_never_cross_the_key_end():
    # sk not a multiple of block_k: the last key tile is partial even under FULL
    p = lower(maskc.full(8, 10), 4, 4)
    assert p.fwd.work(0) == [("full", 0, 2), ("partial", 2, (0,))]


@pytest.mark.parametrize("bq, msg", [(3, "block_q must be a power of two"), (0, "block_q must be a power of two")])
def test_bad_blocks(bq, msg):
    with pytest.raises(MaskError, match=msg):
        lower(maskc.causal(8), bq, 4)


def test_lower_needs_a_mask():
    with pytest.raises(MaskError, match="expected a Mask, got list"):
        lower([1, 2], 4, 4)


def test_lower_rejects_positions_beyond_int32():
    # the plan's band parameters are int32: a key at 2**31 used to wrap to -2**31 silently
    big = 2**31
    m = maskc.Mask.from_ranges([(0, 4)], [(big, big + 8)], sq=4, sk=big + 8)
    with pytest.raises(MaskError, match=r"4 x 2147483656; the kernels take at most 2147483647"):
        lower(m, 4, 2**20)
    edge = maskc.Mask.from_ranges([(0, 4)], [(big - 16, big - 8)], sq=4, sk=big - 1)
    assert lower(edge, 4, 2**20).bands[0].tolist() == [0, 4, big - 16, 0, big - 8, 0]


@given(masks(max_side=40, max_slices=6), blocks, blocks)
def test_kernel_lists_partition_partial_tiles(md, bq, bk):
    from maskc.tiling import INLINE_PREDS, KERNEL_LISTS, kernel_lists

    m, _ = md
    p = lower(m, bq, bk)
    for which in ("fwd", "bwd"):
        tl = getattr(p, which)
        bands = p.bands if which == "fwd" else p.bands_t
        kl = kernel_lists(p, which)
        assert list(kl) == list(KERNEL_LISTS) and all(a.dtype == np.int32 for a in kl.values())
        few = kl["few"].reshape(-1, 1 + 6 * INLINE_PREDS)
        # per outer tile: the same partial tiles, each with the same set of slices
        for t in range(tl.n_outer):
            want = {}
            for q in range(tl.part_ptr[t], tl.part_ptr[t + 1]):
                ids = tl.preds[tl.pred_ptr[q] : tl.pred_ptr[q + 1]]
                want[int(tl.part_tiles[q])] = sorted(tuple(bands[s].tolist()) for s in ids)
            got = {}
            for row in few[kl["few_ptr"][t] : kl["few_ptr"][t + 1]]:
                params = [tuple(row[1 + 6 * i : 7 + 6 * i].tolist()) for i in range(INLINE_PREDS)]
                got[int(row[0])] = sorted(x for x in params if x != (0,) * 6)
            for q in range(kl["many_ptr"][t], kl["many_ptr"][t + 1]):
                ids = kl["many_preds"][kl["many_pred_ptr"][q] : kl["many_pred_ptr"][q + 1]]
                assert len(ids) > INLINE_PREDS
                got[int(kl["many_tiles"][q])] = sorted(tuple(bands[s].tolist()) for s in ids)
            assert got == want


@given(masks(max_side=70), st.sampled_from([1, 2, 4, 8, 16]), st.sampled_from([1, 2, 4, 8, 16]))
def test_tile_counts_equal_the_lists(md, bq, bk):
    from maskc.tiling import column_bands, tile_counts

    mask = md[0] if isinstance(md, tuple) else md
    plan = lower(mask, bq, bk)
    assert tile_counts(mask, bq, bk, "fwd") == (plan.fwd.n_full_tiles, plan.fwd.n_partial_tiles)
    assert tile_counts(mask, bq, bk, "bwd") == (plan.bwd.n_full_tiles, plan.bwd.n_partial_tiles)
    assert np.array_equal(column_bands(mask), plan.bands_t)  # cached per mask content
    with pytest.raises(MaskError, match="which must be"):
        tile_counts(mask, bq, bk, "sideways")


def test_choose_config_lowers_only_the_winner():
    from maskc.codegen.configs import CANDIDATES, choose_config

    lowered = []

    def lower_fn(m, bq, bk, only=None):
        lowered.append((bq, bk))
        return lower(m, bq, bk, only=only)

    for mask in (maskc.full(4096), maskc.varlen([100, 333, 250] * 4)):
        for direction in ("fwd", "bwd_dkdv", "bwd_dq"):
            lowered.clear()
            cfg, plan = choose_config(mask, direction, 128, "cuda", lower_fn)
            assert lowered == [(cfg.block_q, cfg.block_k)] and plan.block_q == cfg.block_q
            # the same choice as pricing every candidate's real lists
            which = "fwd" if direction != "bwd_dkdv" else "bwd"
            costs = [c.full_cost * getattr(lower(mask, c.config.block_q, c.config.block_k), which).n_full_tiles
                     + c.partial_cost * getattr(lower(mask, c.config.block_q, c.config.block_k), which).n_partial_tiles
                     for c in CANDIDATES[(direction, 128)]]
            assert cfg == CANDIDATES[(direction, 128)][int(np.argmin(costs))].config


@given(masks(max_side=40), blocks, blocks, st.sampled_from(["fwd", "bwd"]))
def test_one_orientation_lowering_completes_lazily(md, bq, bk, only):
    m, _ = md
    part, full = lower(m, bq, bk, only=only), lower(m, bq, bk)
    other = "bwd" if only == "fwd" else "fwd"
    assert other not in vars(part)  # not built yet
    assert part.list_kinds(only) == full.list_kinds(only)
    assert other not in vars(part)  # still not
    assert part.to_json() == full.to_json() and part.partial_kinds == full.partial_kinds  # completed on read
    with pytest.raises(MaskError, match="only must be"):
        lower(m, bq, bk, only="both")


# ---- planning a new mask fast: one classification pass for several tile sizes, a bounded memo ----

sizes = st.lists(st.tuples(blocks, blocks), min_size=1, max_size=4, unique=True)


def lists_equal(a, b) -> bool:
    from maskc.tiling import _LISTS

    return all(getattr(a, k).dtype == getattr(b, k).dtype and np.array_equal(getattr(a, k), getattr(b, k))
               for k in _LISTS)


@given(masks(max_side=40, max_slices=6), sizes, st.sampled_from(["fwd", "bwd"]))
def test_one_pass_for_several_sizes_equals_one_pass_each(md, sz, which):
    """Every size of a batched `_classify` gets the counts and lists of its own pass, and the
    one-piece-per-tile shortcut gives what the sweep gives."""
    from maskc.tiling import _classify, _lists, column_bands

    m, _ = md
    if not len(m):
        return
    bands, outer, inner = (np.asarray(m.bands), m.sq, m.sk) if which == "fwd" else (column_bands(m), m.sk, m.sq)
    together = _classify(bands, outer, inner, sz)
    swept = _classify(bands, outer, inner, sz, sweep_all=True)
    for (b_out, b_in), c, s in zip(sz, together, swept):
        alone = _classify(bands, outer, inner, [(b_out, b_in)])[0]
        n_out = -(-outer // b_out)
        tl = _lists(alone, n_out)
        assert c["counts"] == alone["counts"] == s["counts"] == (tl.n_full_tiles, tl.n_partial_tiles)
        assert lists_equal(_lists(c, n_out), tl) and lists_equal(_lists(s, n_out), tl)


def test_varlen_lists_take_the_sweep_and_aligned_ones_the_shortcut():
    from maskc.tiling import _classify

    packed = maskc.varlen([100, 333, 250] * 4)  # documents share query tiles
    aligned = maskc.varlen([128, 256, 64])
    assert not _classify(np.asarray(packed.bands), packed.sq, packed.sk, [(64, 64)])[0]["single"]
    assert _classify(np.asarray(aligned.bands), aligned.sq, aligned.sk, [(64, 64)])[0]["single"]


@given(mask_pairs(max_side=40), blocks, blocks)
def test_memo_never_serves_another_mask(pair, bq, bk):
    """Counts and lists of a mask are its own whatever was planned before (the memo is keyed by
    content), and the same as with no memo at all."""
    from maskc.tiling import clear_caches, tile_counts

    (a, _), (b, _) = pair
    clear_caches()
    fresh = [lower(b, bq, bk).to_json(), tile_counts(b, bq, bk, "fwd"), tile_counts(b, bq, bk, "bwd")]
    clear_caches()
    lower(a, bq, bk), tile_counts(a, bq, bk, "fwd"), tile_counts(a, bq, bk, "bwd")
    after_a = [lower(b, bq, bk).to_json(), tile_counts(b, bq, bk, "fwd"), tile_counts(b, bq, bk, "bwd")]
    again = [lower(b, bq, bk).to_json(), tile_counts(b, bq, bk, "fwd"), tile_counts(b, bq, bk, "bwd")]
    assert fresh == after_a == again


def test_memo_is_bounded(monkeypatch):
    from maskc import tiling

    tiling.clear_caches()
    for n in range(40):
        tiling.tile_counts_many(maskc.varlen([50 + n, 70, 30]), [(16, 16), (8, 16)], "fwd")
        assert len(tiling._TILED) <= tiling._TILED_MAX_ENTRIES
    # past the byte bound an entry keeps its counts only, and lowering still works from them
    monkeypatch.setattr(tiling, "_TILED_MAX_BYTES", 64)
    mask = maskc.varlen([100, 333, 250] * 4)
    want = lower(mask, 64, 64).to_json()
    tiling.clear_caches()
    assert tiling.tile_counts(mask, 64, 64) == (lower(mask, 64, 64).fwd.n_full_tiles, lower(mask, 64, 64).fwd.n_partial_tiles)
    assert all(t.classified is None and t.lists is None for t in tiling._TILED.values())
    assert tiling._tiled_bytes <= 64 and lower(mask, 64, 64).to_json() == want
    tiling.clear_caches()


def test_choose_config_prices_dq_with_the_forward():
    """The forward's call counts dQ's candidates too (same lists), so dQ's call counts nothing."""
    from maskc import tiling
    from maskc.codegen.configs import choose_config

    mask = maskc.varlen([100, 333, 250] * 4)
    tiling.clear_caches()
    choose_config(mask, "fwd", 128, "cuda", lower)
    calls = []
    real = tiling._classify
    try:
        tiling._classify = lambda *a, **k: calls.append(a[3]) or real(*a, **k)
        choose_config(mask, "bwd_dq", 128, "cuda", lower)
        assert calls == []
        choose_config(mask, "bwd_dkdv", 128, "cuda", lower)
        assert calls == [[(128, 64), (64, 32)]]  # both dK/dV candidates in one pass (key tiles outer)
    finally:
        tiling._classify = real


@given(masks(max_side=40, max_slices=8))
def test_column_bands_shortcuts_match_the_general_sweep(md):
    """Column bands through the disjoint-pieces path or the constant-union segments of `sweep`
    equal the general sweep (a table it does not recognise as a union: an empty second operand)."""
    from maskc import normalize as nz
    from maskc.tiling import clear_caches, column_bands, transpose_bands

    for m in (md[0], maskc.varlen([3, 5, 2, 7, 1, 4, 6, 2, 3], maskc.CAUSAL), maskc.magi_video([3, 2], 4, window=2)):
        clear_caches()
        cols, _ = transpose_bands(np.asarray(m.bands))
        general = nz.sweep([cols, np.zeros((0, 6), np.int64)], [False, True, False, True], m.sk, m.sq)
        assert np.array_equal(column_bands(m), general)


@given(masks(max_side=40, max_slices=8), st.lists(st.integers(1, 30), min_size=1, max_size=6), st.integers(1, 60))
def test_column_pieces_cover_the_transposed_mask_once(md, lengths, w):
    """`transpose_bands` (CAUSAL bands by their own short path): every allowed pair lies in exactly
    one column piece, on the piece's column range, and each piece comes from the band it names."""
    from maskc.tiling import transpose_bands

    for m in (md[0], maskc.varlen(lengths, maskc.CAUSAL), maskc.sliding_window(sum(lengths), w), maskc.causal(sum(lengths))):
        dense = m.to_dense()
        cols, src = transpose_bands(np.asarray(m.bands))
        cover = np.zeros((m.sk, m.sq), np.int64)  # [column, row]
        for (c0, c1, ac, a_s, bc, b_s), t in zip(cols.tolist(), src.tolist()):
            j = np.arange(c0, c1)[:, None]
            i = np.arange(m.sq)[None, :]
            piece = (i >= ac + a_s * j) & (i < bc + b_s * j)
            assert piece.any(axis=1).all()  # a row on every column of the piece
            r0, r1, rac, ras, rbc, rbs = m.bands[t].tolist()
            ii = np.broadcast_to(i, piece.shape)[piece]
            jj = np.broadcast_to(j, piece.shape)[piece]
            assert ((ii >= r0) & (ii < r1) & (jj >= rac + ras * ii) & (jj < rbc + rbs * ii)).all()
            cover[c0:c1] += piece
        assert np.array_equal(cover, dense.T.astype(np.int64))


@given(st.lists(st.integers(0, 70000), max_size=300), st.sampled_from([np.float64, np.int64]), st.booleans())
def test_stable_order_equals_a_stable_argsort(keys, dtype, small):
    """The LPT order's sort (`_stable_order`): 16-bit keys radix-sorted, wider ones merge-sorted,
    the same permutation as numpy's stable argsort, as read-only int32."""
    from maskc.tiling import _stable_order

    a = np.array([k % 65536 if small else k for k in keys], dtype=dtype)
    got = _stable_order(a, 1 << 16 if small else 70001)
    assert got.dtype == np.int32 and not got.flags.writeable
    assert np.array_equal(got, a.argsort(kind="stable"))


@given(masks(max_side=40, max_slices=6), sizes, sizes)
def test_pass_geometry_is_kept_per_shape_not_per_mask(md, fwd, bwd):
    """`_classify`'s per-size constants (`_geometry`) are kept across masks of one shape: a pass
    with them kept equals one with them computed afresh, and they cannot be written to."""
    from maskc import tiling

    m, _ = md
    if not len(m):
        return
    cols = tiling.column_bands(m)
    groups = (np.asarray(m.bands), m.sq, m.sk, fwd), (cols, m.sk, m.sq, bwd)

    def one_pass():
        out = tiling._classify(*groups[0], also=groups[1:] if cols.shape[0] else ())
        return [c["counts"] for c in out], tiling._lists_many(out[0]["batch"])

    tiling._geometry.cache_clear()
    fresh_counts, fresh = one_pass()
    kept_counts, kept = one_pass()
    assert tiling._geometry.cache_info().hits >= 1
    assert kept_counts == fresh_counts and all(lists_equal(a, b) for (a, _), (b, _) in zip(kept, fresh))
    geo = tiling._geometry(tuple((bo, bi, m.sq, m.sk) for bo, bi in fwd))
    assert not geo.consts.flags.writeable and not geo.height.flags.writeable


@given(masks(max_side=40, max_slices=8), st.integers(1, 300), st.integers(1, 300), st.integers(1, 40))
def test_column_pieces_sharing_columns_merge_as_the_general_sweep(md, s, w, chunk):
    """Sloped column pieces that share columns are merged per column segment
    (`canonical_from_disjoint_pieces`); where that path decides it equals the general sweep, and
    sliding windows (two row bands stacked in the same columns) always take it."""
    from maskc import normalize as nz
    from maskc.tiling import _transpose_rows

    window = maskc.sliding_window(s, min(w, s))
    cases = [(md[0], False), (window, True), (window | maskc.block_causal(s, chunk), False)]
    for m, decided in cases:
        rows, _ = _transpose_rows(m.bands.tolist())
        general = nz.sweep([np.array(rows, dtype=np.int64).reshape(-1, 6)], [False, True], m.sk, m.sq)
        got = nz.canonical_from_disjoint_pieces(sorted(rows))
        assert got is not None or not decided
        if got is not None:
            assert got.dtype == general.dtype and np.array_equal(got, general)


@given(masks(max_side=40, max_slices=6), sizes, st.sampled_from(["fwd", "bwd"]), st.sampled_from([(3, 5), (6, 1), (5, 12)]))
def test_shifting_and_dividing_classify_alike(md, sz, which, odd):
    """Power-of-two tiles are found by shifting; a batch with another size divides instead. Both
    give each size the lists of its own pass, and the other size the tiles of the dense mask
    (full: every pair allowed and the tile inside the inner side; partial: some pair, not full)."""
    from maskc.tiling import _classify, _lists, column_bands

    m, dense = md
    if not len(m):
        return
    bands, outer, inner = (np.asarray(m.bands), m.sq, m.sk) if which == "fwd" else (column_bands(m), m.sk, m.sq)
    dense = dense if which == "fwd" else dense.T
    batch = _classify(bands, outer, inner, sz + [odd])
    for (b_out, b_in), c in zip(sz, batch):
        alone = _classify(bands, outer, inner, [(b_out, b_in)])[0]
        n_out = -(-outer // b_out)
        assert c["counts"] == alone["counts"] and lists_equal(_lists(c, n_out), _lists(alone, n_out))
    b_out, b_in = odd
    full = part = 0
    for t in range(0, outer, b_out):
        for u in range(0, inner, b_in):
            tile = dense[t : t + b_out, u : u + b_in]
            is_full = tile.all() and u + b_in <= inner
            full += is_full
            part += tile.any() and not is_full
    assert batch[-1]["counts"] == (full, part)
    tl = _lists(batch[-1], -(-outer // b_out))
    assert (tl.n_full_tiles, tl.n_partial_tiles) == (full, part)


@given(st.data())
def test_canonical_from_sorted_disjoint_equals_the_numpy_path(data):
    """The plain-Python canonical form of sorted, row-disjoint, tight bands (small column band
    sets) equals `canonical_from_disjoint`'s, where bands merge and where they do not."""
    from maskc import normalize as nz

    sk = 64
    rows, r = [], data.draw(st.integers(0, 5))
    for _ in range(data.draw(st.integers(0, 12))):
        r0 = r + data.draw(st.sampled_from([0, 0, 1, 3]))
        r1 = r0 + data.draw(st.integers(1, 4))
        if rows and data.draw(st.booleans()):  # the same lines as the band before: may merge
            _, _, ac, a_s, bc, b_s = rows[-1]
        else:
            a_s, b_s = data.draw(st.integers(0, 1)), data.draw(st.integers(0, 1))
            ac = data.draw(st.integers(0, 20)) - a_s * r0
            bc = ac + a_s * r0 + data.draw(st.integers(1, 20)) - b_s * r0
        if all(ac + a_s * i < bc + b_s * i for i in range(r0, r1)):  # tight: no empty row
            rows.append((r0, r1, ac, a_s, bc, b_s))
            r = r1
    want = nz.canonical_from_disjoint(np.array(rows, np.int64).reshape(-1, 6), r + 8, sk, tight=True)
    got = nz.canonical_from_sorted_disjoint(rows)
    assert got.dtype == np.int64 and got.shape == want.shape and np.array_equal(got, want)


@given(masks(max_side=40, max_slices=8))
def test_small_column_bands_path_equals_the_numpy_path(md):
    """Column bands of up to `_SMALL_COLUMNS` pieces go through plain Python; with that path off
    (numpy's) they are the same, for random masks and packed documents of every kind."""
    from maskc import tiling

    cases = [md[0]] + [maskc.varlen([3, 5, 2, 7, 1, 4, 6, 2, 3, 9, 1] * n, kind) for n in (1, 3) for kind in maskc.Kind]
    cases += [maskc.magi_video([3, 2, 4], 4, window=2), maskc.block_causal(90, 7)]
    small = tiling._SMALL_COLUMNS
    try:
        for m in cases:
            tiling._SMALL_COLUMNS = small
            tiling.clear_caches()
            python = tiling.column_bands(m)
            tiling._SMALL_COLUMNS = 0
            tiling.clear_caches()
            assert np.array_equal(python, tiling.column_bands(m)) and not python.flags.writeable
    finally:
        tiling._SMALL_COLUMNS = small
        tiling.clear_caches()


@given(masks(max_side=70, max_slices=8), blocks, blocks, blocks)
def test_lists_built_together_and_their_kernel_lists_equal_the_general_path(md, bq, bk, bk2):
    """A new mask's forward and dQ sizes, classified in one pass, get their lists in one build
    with their `kernel_lists` arrays beside them (the CUTLASS planning path); both equal a size
    lowered alone and `kernel_lists` built from the plan (bands that are not the memo's)."""
    from dataclasses import replace

    from maskc import tiling

    m, _ = md
    sizes = [(bq, bk), (bq, bk2)] if bk != bk2 else [(bq, bk)]
    alone = {}
    for q, k in sizes + [(bk2, bq)]:
        tiling.clear_caches()
        alone[(q, k)] = lower(m, q, k)
    # the arrays are built with the lists where no partial tile of the sizes built together has
    # more than INLINE_PREDS slices
    inline = {"fwd": all(np.diff(alone[s].fwd.pred_ptr).max(initial=0) <= tiling.INLINE_PREDS for s in sizes),
              "bwd": np.diff(alone[(bk2, bq)].bwd.pred_ptr).max(initial=0) <= tiling.INLINE_PREDS}
    tiling.clear_caches()
    tiling.tile_counts_many(m, sizes, "fwd")
    for (q, k), which in [(s, "fwd") for s in sizes] + [((bk2, bq), "bwd")]:
        plan = lower(m, q, k, only=which)
        assert lists_equal(getattr(plan, which), getattr(alone[(q, k)], which))
        fast = tiling.kernel_lists(plan, which)
        general = tiling.kernel_lists(replace(alone[(q, k)], bands=alone[(q, k)].bands.copy(),
                                              bands_t=alone[(q, k)].bands_t.copy()), which)
        assert list(fast) == list(general)
        assert all(fast[n].dtype == general[n].dtype and np.array_equal(fast[n], general[n]) for n in fast)
        held = tiling._TILED.get((m.digest(), which) + ((q, k) if which == "fwd" else (k, q)))
        if len(m) and inline[which]:
            assert held.kernel is not None and held.kernel[0] is (plan.bands if which == "fwd" else plan.bands_t)
    tiling.clear_caches()


@given(masks(max_side=70, max_slices=8), blocks, blocks, blocks)
def test_both_orientations_in_one_pass_equal_the_general_path(md, bq, bk, bk2):
    """A new mask's three CUTLASS kernels (two row sizes, one column size) classified in one pass
    (`tile_counts_all`): the first lowering builds every size's lists with their `kernel_lists`
    arrays, and each equals its size lowered alone and `kernel_lists` of a plan with copied bands
    (the general path); the counts equal `tile_counts` of each size alone."""
    from dataclasses import replace

    from maskc import tiling

    m, _ = md
    fwd = [(bq, bk), (bq, bk2)] if bk != bk2 else [(bq, bk)]
    bwd = [(bk2, bq)]
    alone, counts = {}, {}
    for (q, k), which in [(s, "fwd") for s in fwd] + [(s, "bwd") for s in bwd]:
        tiling.clear_caches()
        alone[(q, k, which)] = lower(m, q, k)
        tiling.clear_caches()
        counts[(q, k, which)] = tiling.tile_counts(m, q, k, which)
    tiling.clear_caches()
    got_fwd, got_bwd = tiling.tile_counts_all(m, fwd, bwd)
    assert got_fwd == [counts[s + ("fwd",)] for s in fwd] and got_bwd == [counts[s + ("bwd",)] for s in bwd]
    first = True
    for (q, k), which in [(s, "fwd") for s in fwd] + [(s, "bwd") for s in bwd]:
        plan = lower(m, q, k, only=which)
        if first and len(m):  # the first lowering built every size's lists
            first = False
            for s, w in [(s, "fwd") for s in fwd] + [((k_, q_), "bwd") for q_, k_ in bwd]:
                assert tiling._TILED[(m.digest(), w) + s].lists is not None
        want = alone[(q, k, which)]
        assert lists_equal(getattr(plan, which), getattr(want, which))
        fast = tiling.kernel_lists(plan, which)
        general = tiling.kernel_lists(replace(want, bands=want.bands.copy(), bands_t=want.bands_t.copy()), which)
        assert list(fast) == list(general)
        assert all(fast[n].dtype == general[n].dtype and np.array_equal(fast[n], general[n]) for n in fast)
    tiling.clear_caches()


@given(st.integers(1, 60), st.integers(1, 60),
       st.lists(st.tuples(st.integers(0, 59), st.integers(1, 20), st.integers(0, 59), st.integers(1, 20)),
                min_size=1, max_size=40))
def test_column_bands_of_full_slices_equal_the_general_sweep(sq, sk, rects):
    """A mask of FULL slices only: its column pieces (rectangles) are merged by
    `normalize.union_of_rectangles` (coverage grid filled rectangle by rectangle); equal to the
    general sweep, to the difference-array grid and to the per-segment sweep of the same pieces."""
    from maskc import normalize as nz
    from maskc import tiling

    slices = [((min(q, sq - 1), min(q + h, sq)), (min(k, sk - 1), min(k + w, sk)), maskc.FULL) for q, h, k, w in rects]
    cases = [maskc.Mask(slices, sq=sq, sk=sk), maskc.block_causal(sq, 1 + sq // 7),
             maskc.concat(*[maskc.block_causal(x, 3) for x in (5, 7, 1, 4, 9)])]
    for m in cases:
        tiling.clear_caches()
        got = tiling.column_bands(m)
        cols, _ = tiling.transpose_bands(np.asarray(m.bands))
        general = nz.sweep([cols, np.zeros((0, 6), np.int64)], [False, True, False, True], m.sk, m.sq)
        assert got.dtype == general.dtype and np.array_equal(got, general)
        few, many = nz._FEW_RECTANGLES, nz._MANY_RECTANGLES
        try:
            nz._FEW_RECTANGLES, nz._MANY_RECTANGLES = -1, 0  # the difference-array grid
            assert np.array_equal(nz.sweep([cols], [False, True], m.sk, m.sq), general)
            nz._MANY_RECTANGLES = 10**9  # the per-segment sweep
            assert np.array_equal(nz.sweep([cols], [False, True], m.sk, m.sq), general)
        finally:
            nz._FEW_RECTANGLES, nz._MANY_RECTANGLES = few, many
    tiling.clear_caches()
