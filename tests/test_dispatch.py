"""Planner (no torch): dispatch, communication schedule, plan JSON and the cost model.

Everything exact is checked against brute force from the dense mask: chunk areas, which key
ranges each rank receives (exactly the keys its queries attend, each once, from its owner), the
per-pair query rows and areas, the per-stage local masks. Balance and plan time are checked on
the benchmark masks at moderate sizes.
"""

import json
import time

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import maskc
from maskc import MaskError
from maskc.comm import DST, END, P_MODE, SRC, STAGE, START, layout_segments, submask
from maskc.cost import Hardware, Workload, baselines, block_areas, calibrate, ring, simulate, ulysses
from maskc.dispatch import band_prefix, chunk_areas, chunk_bounds, cut_bands, tight_bands
from maskc.plan import Plan, compile

from conftest import masks


@st.composite
def square_masks(draw, max_side=40, max_slices=6):
    s = draw(st.integers(0, max_side))
    return draw(masks(s, s, max_slices=max_slices))


@st.composite
def plan_args(draw):
    mask, dense = draw(square_masks())
    block = draw(st.sampled_from([1, 2, 4]))
    return (
        mask,
        dense,
        dict(
            cp_size=draw(st.integers(1, 5)),
            block=block,
            chunk=block * draw(st.integers(1, 4)),
            stages=draw(st.integers(1, 3)),
            group_reduce=draw(st.booleans()),
        ),
    )


def brute_check(plan: Plan, dense: np.ndarray) -> None:
    s, cp = plan.seq_len, plan.cp_size
    owner = plan.dispatch.owner_of(np.arange(s))
    sch = plan.schedule
    # positions: a partition of [0, s), increasing; token counts differ by less than two chunks
    allpos = np.concatenate([plan.positions(r) for r in range(cp)]) if s else np.zeros(0, int)
    assert np.array_equal(np.sort(allpos), np.arange(s))
    for r in range(cp):
        p = plan.positions(r)
        assert np.all(np.diff(p) > 0) and np.all(owner[p] == r)
    assert max(plan.rank_tokens) - min(plan.rank_tokens) < 2 * plan.chunk
    counts = np.bincount(plan.dispatch.chunk_rank, minlength=cp)
    assert counts.max() - counts.min() <= 1
    # ranges: owned by src, never own keys, disjoint per receiver, stage in 1..stages
    r = sch.ranges
    if r.shape[0]:
        assert np.all(r[:, SRC] != r[:, DST])
        assert np.all((r[:, STAGE] >= 1) & (r[:, STAGE] <= plan.stages))
        assert np.all(r[:, END] > r[:, START])
    for rank in range(cp):
        p = plan.positions(rank)
        need = dense[p].any(0) & (owner != rank)
        got = np.zeros(s, dtype=int)
        for src, a, b in sch.needed(rank):
            assert np.all(owner[a:b] == src)
            got[a:b] += 1
        assert got.max(initial=0) <= 1, "a range is sent twice to one receiver"
        assert np.array_equal(got.astype(bool), need), "the schedule must move exactly the keys needed"
        if plan.schedule.n_group_reduce == 0:
            assert plan.recv_tokens[rank] == need.sum()
        for dst, src, kv, rows, area, mode in sch.pairs[sch.pairs[:, 0] == rank].tolist():
            blk = dense[np.ix_(p, np.flatnonzero(owner == src))]
            assert (kv, rows, area) == (blk.any(0).sum(), blk.any(1).sum(), blk.sum())
        # per-stage local masks: the dense mask restricted and remapped
        for stage, m in enumerate(plan.local_masks(rank)):
            keys = plan.stage_keys(rank, stage)
            k = np.concatenate([np.arange(a, b) for a, b in keys]) if len(keys) else np.zeros(0, int)
            assert np.array_equal(m.to_dense(), dense[np.ix_(p, k)])
            if plan.schedule.n_group_reduce == 0:
                assert m.area == sch.stage_area[rank, stage]
    assert sch.stage_area.sum() == dense.sum()
    assert plan.dispatch.rank_area.sum() == dense.sum()


@settings(max_examples=150, deadline=None)
@given(plan_args())
def test_schedule_is_exact_vs_brute_force(args):
    mask, dense, kw = args
    plan = compile(mask, **kw)
    brute_check(plan, dense)


@settings(max_examples=40, deadline=None)
@given(plan_args())
def test_json_round_trip_and_digest(args):
    mask, _, kw = args
    plan = compile(mask, **kw)
    again = Plan.from_json(plan.to_json())
    assert again.digest() == plan.digest() and again == plan
    assert again.mask == plan.mask
    assert np.array_equal(again.schedule.ranges, plan.schedule.ranges)
    assert again.recv_tokens == plan.recv_tokens
    for r in range(plan.cp_size):
        assert np.array_equal(again.positions(r), plan.positions(r))
    assert Plan.from_json(json.loads(plan.to_json())).digest() == plan.digest()


def test_digest_changes_with_content():
    m = maskc.causal(256)
    a = compile(m, cp_size=2, block=16)
    assert a.digest() == compile(m, cp_size=2, block=16).digest()
    assert a.digest() != compile(m, cp_size=4, block=16).digest()
    assert a.digest() != compile(maskc.full(256), cp_size=2, block=16).digest()
    assert a.digest() != compile(m, cp_size=2, block=16, stages=2).digest()


@settings(max_examples=100, deadline=None)
@given(square_masks(), st.integers(1, 9))
def test_chunk_areas_and_band_prefix(md, chunk):
    mask, dense = md
    s = mask.sq
    b = chunk_bounds(s, chunk)
    areas = chunk_areas(tight_bands(mask), b, s)
    assert areas.tolist() == [int(dense[b[i] : b[i + 1]].sum()) for i in range(b.size - 1)]
    pieces, seg = cut_bands(tight_bands(mask), b)
    for c in range(s + 1):
        got = np.zeros(b.size - 1, dtype=np.int64)
        np.add.at(got, seg, band_prefix(pieces, np.full(pieces.shape[0], c)))
        assert got.tolist() == [int(dense[b[i] : b[i + 1], :c].sum()) for i in range(b.size - 1)]


@settings(max_examples=100, deadline=None)
@given(square_masks(max_side=30), st.data())
def test_submask_vs_dense(md, data):
    mask, dense = md
    s = mask.sq

    def segments():
        cuts = sorted(set(data.draw(st.lists(st.integers(0, s), max_size=6)) + [0, s]))
        segs = [(a, b) for a, b in zip(cuts[:-1], cuts[1:]) if data.draw(st.booleans())]
        order = data.draw(st.permutations(segs))
        return np.array(order, dtype=np.int64).reshape(-1, 2)

    q, k = segments(), segments()
    sub = submask(mask, layout_segments(q), layout_segments(k))
    qi = np.concatenate([np.arange(a, b) for a, b in q]) if len(q) else np.zeros(0, int)
    ki = np.concatenate([np.arange(a, b) for a, b in k]) if len(k) else np.zeros(0, int)
    assert sub.shape == (qi.size, ki.size)
    assert np.array_equal(sub.to_dense(), dense[np.ix_(qi, ki)])


def _docs(s, seed=0, median=2048):
    rng = np.random.default_rng(seed)
    out = []
    while sum(out) < s:
        out.append(int(np.clip(rng.lognormal(np.log(median), 1.2), 64, s // 8)))
    out[-1] -= sum(out) - s
    return [x for x in out if x > 0]


def bench_masks(s):
    docs = _docs(s)
    return {
        "causal": maskc.causal(s),
        "varlen-causal": maskc.varlen(docs),
        "varlen-full": maskc.varlen(docs, "full"),
        "block-causal": maskc.block_causal(s, 2048),
        "magi_video": maskc.magi_video([16] * (s // (16 * 2048)), 2048),
        "sliding": maskc.sliding_window(s, 2048),
    }


@pytest.mark.parametrize("name", list(bench_masks(1 << 16)))
def test_imbalance_and_bytes_on_benchmark_masks(name):
    s = 1 << 18
    mask = bench_masks(s)[name]
    for cp in (2, 3, 4, 8, 16):
        plan = compile(mask, cp_size=cp, block=64)
        assert plan.imbalance <= 1.02, (name, cp, plan.imbalance)
        b = baselines(mask, cp)
        ours = simulate(plan)
        assert ours.total_bytes <= min(b["ring"].total_bytes, b["allgather"].total_bytes)
        assert ours.imbalance <= 1.02


def test_default_chunk_and_uneven_lengths():
    plan = compile(maskc.causal(1000), cp_size=3, block=16)
    assert plan.chunk % 16 == 0
    assert sum(plan.rank_tokens) == 1000
    assert max(plan.rank_tokens) - min(plan.rank_tokens) < 2 * plan.chunk
    assert plan.dispatch.n_chunks >= 3
    big = compile(maskc.causal(1 << 20), cp_size=4)
    assert big.chunk % 128 == 0 and big.dispatch.n_chunks >= 8 * 4
    # fewer chunks than ranks: some ranks hold nothing, the plan is still exact
    small = compile(maskc.causal(20), cp_size=4, block=16)
    assert sorted(small.rank_tokens) == [0, 0, 4, 16]
    brute_check(small, maskc.causal(20).to_dense())
    empty = compile(maskc.Mask([], sq=0), cp_size=2)
    assert empty.rank_tokens == [0, 0] and empty.recv_tokens == [0, 0]


def test_causal_prefers_zigzag_and_local_masks_need_nothing():
    plan = compile(maskc.causal(1 << 16), cp_size=4, block=64)
    assert plan.dispatch.method == "zigzag" and plan.imbalance < 1.001
    sw = compile(maskc.sliding_window(1 << 16, 512), cp_size=4, block=64)
    assert sw.dispatch.method == "contiguous"
    assert sum(sw.recv_tokens) <= 3 * 512  # only the window across each boundary
    docs = compile(maskc.varlen([1 << 14] * 4, "full"), cp_size=4, block=64)
    assert docs.recv_tokens == [0, 0, 0, 0]


def test_group_reduce_decision():
    # one long query row needing many keys: moving the row is cheaper than moving the keys
    s = 4096
    m = maskc.Mask([((s - 1, s), (0, s), "full"), ((0, s), (0, s), "causal")], sq=s)
    wl = Workload(hq=8, hkv=8, head_dim=128)
    kv_only = compile(m, cp_size=4, block=64, workload=wl)
    gr = compile(m, cp_size=4, block=64, group_reduce="bytes", workload=wl)
    assert kv_only.schedule.n_group_reduce == 0
    p = gr.schedule.pairs
    for dst, src, kv, rows, area, mode in p.tolist():
        assert mode == int(rows * wl.q_row_bytes < kv * wl.kv_token_bytes)
    # balance-aware (True): only cheaper pairs, and never a more loaded rank than without
    bal = compile(m, cp_size=4, block=64, group_reduce=True, workload=wl)
    for dst, src, kv, rows, area, mode in bal.schedule.pairs.tolist():
        assert not mode or rows * wl.q_row_bytes < kv * wl.kv_token_bytes
    assert bal.schedule.stage_area.sum(1).max() <= kv_only.schedule.stage_area.sum(1).max()
    assert simulate(bal, wl=wl).total_bytes <= simulate(kv_only, wl=wl).total_bytes
    assert Plan.from_json(gr.to_json()).group_reduce == "bytes" and Plan.from_json(bal.to_json()).group_reduce is True
    with pytest.raises(MaskError, match="group_reduce must be"):
        compile(m, cp_size=4, block=64, group_reduce="sometimes")
    # the plan stays exact: all work is somewhere, the q ranges cover the pairs' rows
    assert gr.schedule.stage_area.sum() == m.area
    q = gr.schedule.q_ranges
    for dst, src, kv, rows, area, mode in p[p[:, P_MODE] == 1].tolist():
        sel = q[(q[:, 0] == dst) & (q[:, 1] == src)]
        assert (sel[:, 3] - sel[:, 2]).sum() == rows
    assert simulate(gr).step_s > 0


def test_cost_model_sanity():
    m = maskc.causal(1 << 16)
    plan = compile(m, cp_size=8, block=64)
    wl = Workload()
    fast = simulate(plan, Hardware(link_gbs=1e9, latency_us=0))
    assert fast.exposed_s.max() < 1e-9 * max(fast.step_s, 1)
    assert np.isclose(fast.compute_s.sum(), m.area * (wl.fwd_flops_per_pair + wl.bwd_flops_per_pair) / 400e12)
    slow = simulate(plan, Hardware(link_gbs=0.001))
    assert slow.step_s > fast.step_s and slow.exposed_fraction > 0.5
    assert fast.total_bytes == sum(plan.recv_tokens) * wl.kv_token_bytes
    r = ring(m, 8)
    assert r.recv_bytes.tolist() == [(1 << 16) * 7 // 8 * wl.kv_token_bytes] * 8
    assert ring(m, 8, zigzag=True).imbalance < 1.01 < r.imbalance
    u = ulysses(m, 64, wl=Workload(hq=32))
    assert not u.feasible and "multiple" in u.note
    assert ulysses(m, 8).imbalance == 1.0
    assert "infeasible" in repr(u) and "step" in repr(fast)


def test_calibrate_recovers_rates():
    truth = Hardware(tflops=310.0, link_gbs=180.0, latency_us=25.0)
    rng = np.random.default_rng(0)
    flops = rng.uniform(1e13, 1e15, 8)
    nbytes = rng.uniform(1e7, 1e9, 8)
    fit = calibrate(zip(flops, truth.seconds(flops)), zip(nbytes, truth.transfer(nbytes) + truth.latency))
    assert fit.tflops == pytest.approx(310.0, rel=1e-9)
    assert fit.link_gbs == pytest.approx(180.0, rel=1e-6) and fit.latency_us == pytest.approx(25.0, rel=1e-4)
    # a calibrated model predicts the plan's compute from the fitted rate
    plan = compile(maskc.causal(4096), cp_size=2, block=128)
    wl = Workload()
    assert simulate(plan, fit, wl).compute_s.sum() == pytest.approx(
        simulate(plan, Hardware(tflops=310.0), wl).compute_s.sum())


def test_calibrate_degenerate_inputs():
    base = Hardware(tflops=123.0, link_gbs=45.0, latency_us=6.0)
    assert calibrate([], [], base=base) == base  # nothing measured: the base stays
    one = calibrate([(2e14, 1.0)], [(1e9, 0.01)], base=base)  # one transfer: a line through the origin
    assert one.tflops == pytest.approx(200.0) and one.link_gbs == pytest.approx(100.0) and one.latency_us == 0.0
    # zero or negative samples are ignored, a negative fitted latency falls back to the origin
    fit = calibrate([(0, 1.0), (1e14, 0.5)], [(1e9, 0.001), (2e9, 0.0015), (0, 3.0)], base=base)
    assert fit.tflops == pytest.approx(200.0) and fit.latency_us >= 0.0


@settings(max_examples=50, deadline=None)
@given(square_masks(), st.integers(1, 5), st.integers(1, 5))
def test_block_areas_vs_dense(md, nr, nc):
    mask, dense = md
    s = mask.sq
    rb = np.unique(np.linspace(0, s, nr + 1).astype(int))
    cb = np.unique(np.linspace(0, s, nc + 1).astype(int))
    got = block_areas(mask, rb, cb)
    want = [[dense[rb[i] : rb[i + 1], cb[j] : cb[j + 1]].sum() for j in range(cb.size - 1)] for i in range(rb.size - 1)]
    assert got.tolist() == want


def test_plan_time_4m_tokens_cp64():
    m = maskc.magi_video([32] * 16, 8192)
    compile(m, cp_size=64)  # warm-up
    t0 = time.perf_counter()
    plan = compile(m, cp_size=64)
    dt = time.perf_counter() - t0
    assert plan.imbalance <= 1.02
    assert dt < 2.0, f"plan time {dt:.2f}s"  # target < 1 s on one core; loose here for shared CI


def test_repr_and_summary():
    plan = compile(maskc.causal(4096), cp_size=4, block=64)
    text = repr(plan)
    assert text.startswith("Plan(cp=4") and "imbalance=" in text and plan.digest()[:12] in text
    assert "CommSchedule(" in repr(plan.schedule) and "Dispatch(" in repr(plan.dispatch)
    summ = plan.summary()
    assert summ["cp_size"] == 4 and summ["recv_tokens_total"] == sum(plan.recv_tokens)
    g = plan.schedule.graph()
    assert set(g.nodes) == set(range(4))
    assert sum(d["tokens"] for _, _, d in g.edges(data=True)) == sum(plan.recv_tokens)
    for stage in range(1, plan.stages + 1):
        for rnd in plan.schedule.rounds(stage):
            srcs = [s for s, _ in rnd]
            dsts = [d for _, d in rnd]
            assert len(set(srcs)) == len(srcs) and len(set(dsts)) == len(dsts)


@pytest.mark.parametrize(
    "kw, words",
    [
        (dict(cp_size=0), "cp_size must be >= 1"),
        (dict(cp_size=2.5), "cp_size must be an integer"),
        (dict(cp_size=2, chunk=100, block=64), "chunk=100 must be a positive multiple of block=64"),
        (dict(cp_size=2, chunk=0), "chunk=0 must be a positive multiple"),
        (dict(cp_size=2, block=0), "block (the tile size) must be >= 1"),
        (dict(cp_size=2, stages=0), "stages"),
        (dict(cp_size=2, token_cost=-1), "token_cost must be >= 0"),
        (dict(cp_size=2, balance_tol=1.5), "balance_tol must lie in [0, 1)"),
        (dict(cp_size=2, methods=("magic",)), "methods"),
        (dict(cp_size=2, workload="big"), "workload must be a maskc.cost.Workload"),
    ],
)
def test_bad_arguments(kw, words):
    with pytest.raises(MaskError) as e:
        compile(maskc.causal(256), **kw)
    assert words in str(e.value)


def test_bad_masks_and_json():
    with pytest.raises(MaskError, match="mask must be a maskc.Mask"):
        compile("causal", cp_size=2)
    with pytest.raises(MaskError, match=r"square \(sq == sk\); got 4 x 8"):
        compile(maskc.full(4, 8), cp_size=2)
    with pytest.raises(MaskError, match="format"):
        Plan.from_json('{"format": "other"}')
    with pytest.raises(MaskError, match="not valid JSON"):
        Plan.from_json("{")
    good = json.loads(compile(maskc.causal(64), cp_size=2, block=16).to_json())
    good["dispatch"]["chunk_rank"][0] = 5
    with pytest.raises(MaskError, match="inconsistent plan: a chunk owner lies outside"):
        Plan.from_json(good)
    plan = compile(maskc.causal(64), cp_size=2, block=16)
    with pytest.raises(MaskError, match=r"rank must lie in \[0, 2\)"):
        plan.positions(2)
    with pytest.raises(MaskError, match="Workload: hq=6 must be a multiple of hkv=4"):
        Workload(hq=6, hkv=4)
    with pytest.raises(MaskError, match="link_gbs must be > 0"):
        Hardware(link_gbs=0)


@pytest.mark.parametrize("q_seg, words", [
    ([[0, 4, 0], [2, 6, 4]], "overlap"),
    ([[0, 4, 10]], "tile"),
    ([[0, 4, 0], [4, 8, 0]], "tile"),
    ([[6, 4, 0]], "start <= end"),
    ([[0, 9, 0]], "end <= 8"),
])
def test_submask_rejects_bad_segments(q_seg, words):
    with pytest.raises(MaskError, match=words):
        submask(maskc.full(8), q_seg, [[0, 8, 0]])
    with pytest.raises(MaskError, match=words):
        submask(maskc.full(8), [[0, 8, 0]], q_seg)


def test_scheme_auto_picks_fewer_bytes():
    wl = Workload()  # 32 query / 8 key-value heads
    m = maskc.causal(1 << 16)
    for cp, want in ((2, "sequence"), (4, "sequence"), (8, "heads"), (16, "heads")):
        p = compile(m, cp_size=cp, workload=wl)
        seq = compile(m, cp_size=cp, workload=wl, scheme="sequence")
        assert p.scheme == want
        chosen, other = simulate(p, wl=wl).total_bytes, simulate(seq, wl=wl).total_bytes
        assert chosen <= other and (want == "sequence" or chosen == ulysses(m, cp, wl=wl).total_bytes)
    # packed documents: the sequence split moves (almost) nothing, so it stays
    assert compile(maskc.varlen([4096] * 16), cp_size=8, workload=wl).scheme == "sequence"
    # no workload: the real head counts are unknown, so no head-parallel plan
    assert compile(m, cp_size=8).scheme == "sequence"


def test_heads_plan_round_trip_and_errors():
    wl = Workload(hq=8, hkv=2)
    p = compile(maskc.causal(4096), cp_size=4, workload=wl, scheme="heads")
    assert p.scheme == "heads" and p.heads == (8, 2)
    q = Plan.from_json(p.to_json())
    assert q == p and q.scheme == "heads" and q.heads == (8, 2)
    assert "head-parallel: 2 of 8 query heads" in repr(p) and p.summary()["scheme"] == "heads"
    assert p.recv_tokens == [4096 - n for n in p.rank_tokens]
    seq = compile(maskc.causal(4096), cp_size=4, workload=wl, scheme="sequence")
    assert seq.digest() != p.digest() and "scheme" not in json.loads(seq.to_json())  # sequence JSON unchanged
    with pytest.raises(MaskError, match="do not split over cp_size=3"):
        compile(maskc.causal(64), cp_size=3, workload=wl, scheme="heads", block=16)
    with pytest.raises(MaskError, match="neither a multiple nor a divisor"):
        compile(maskc.causal(64), cp_size=4, workload=Workload(hq=12, hkv=3), scheme="heads", block=16)
    with pytest.raises(MaskError, match="scheme must be one of"):
        compile(maskc.causal(64), cp_size=2, scheme="ring", block=16)
    # infeasible heads never chosen by "auto"
    assert compile(maskc.causal(4096), cp_size=3, workload=wl).scheme == "sequence"
