"""Distributed runtime on the CPU: gloo processes at world sizes 2, 3 and 4, Triton interpreter, float32.

Random masks (drawn with hypothesis) and structured ones (<= 96 tokens, 16 x 16 tiles, some with
GroupReduce pairs) go through dispatch -> dist_attention
-> undispatch on every rank; forward (out, lse) and backward (dq, dk, dv, with a gradient through
lse as well) must equal the single-process float64 `reference_attention` (rel err < 1e-5).
Also: dispatch/undispatch is a bijection, the schedule moves exactly the keys each rank needs
(brute force from the dense mask), uneven lengths and ranks holding no tokens work, and ranks
holding different plans fail with a clear error instead of hanging.
"""

import json
import os

import numpy as np
import pytest
from hypothesis import Phase, given, settings, strategies as st
import torch

import maskc
from maskc import Kind, MaskError
from maskc.cost import Workload
from maskc.plan import compile

TOL = 1e-5
BLOCK = 16  # the interpreter's tiles; chunks are multiples of it
WORKLOAD = Workload(hq=2, hkv=1, head_dim=64, dtype_bytes=4)  # the tests' shapes (GroupReduce decisions)


from conftest import rel_err as _rel, slice_lists  # noqa: E402  (relative, unit-scale floor for near-zero references)
from processes import init_gloo as _init, spawn as _spawn  # noqa: E402


# ---- cases -------------------------------------------------------------------------------------


@st.composite
def dist_cases(draw):
    """A random mask (1-5 slices of any kind, 17-96 tokens), a chunk of 1-2 tiles, 1-3 remote
    stages, and GroupReduce on or off."""
    s = draw(st.integers(17, 96))
    slices = draw(slice_lists(s, s, min_slices=1, nonempty=True))
    return dict(mask=maskc.Mask(slices, sq=s).to_json(), chunk=BLOCK * draw(st.integers(1, 2)),
                stages=draw(st.integers(1, 3)), group_reduce=draw(st.sampled_from([False, True, "bytes"])))


def _cases(n: int) -> list[dict]:
    """`n` hypothesis examples of `dist_cases`, run together in one set of processes (a spawn per
    example would not fit the time budget), so a failure is not shrunk: the assertion message
    carries the mask instead."""
    drawn = []

    @settings(max_examples=n, deadline=None, database=None, phases=[Phase.generate])
    @given(dist_cases())
    def collect(case):
        drawn.append(case)

    collect()
    return drawn


def _sink_rows(s, rows):
    """Causal documents of 16 tokens plus a few query rows (at the end) that attend every key:
    moving those rows to the keys is cheaper than moving the keys to them (GroupReduce pairs)."""
    docs = [16] * (s // 16) + ([s % 16] if s % 16 else [])
    return maskc.varlen(docs) | maskc.Mask([((s - rows, s), (0, s), Kind.FULL)], sq=s)


GROUP_REDUCE = {
    2: [dict(mask=_sink_rows(96, 2).to_json(), chunk=16, stages=2, group_reduce="bytes"),
        dict(mask=maskc.global_tokens(80, 3, 9).to_json(), chunk=16, stages=1, group_reduce="bytes")],
    3: [dict(mask=_sink_rows(90, 1).to_json(), chunk=16, stages=2, group_reduce="bytes", softcap=4.0)],
    4: [dict(mask=_sink_rows(96, 3).to_json(), chunk=16, stages=3, group_reduce="bytes"),
        dict(mask=(maskc.global_tokens(64, 2, 5) | _sink_rows(64, 1)).to_json(), chunk=16, stages=2,
             group_reduce="bytes")],
}

# head-parallel plans (all-to-all of heads): shared key/value heads (2: 2 q / 1 kv, 4: 4 q / 2 kv)
# and split ones (3: 3 q / 3 kv)
HEADS = {
    2: [dict(mask=maskc.causal(80).to_json(), chunk=16, stages=1, scheme="heads", heads=(2, 1), softcap=3.0)],
    3: [dict(mask=maskc.varlen([30, 41, 25]).to_json(), chunk=16, stages=1, scheme="heads", heads=(3, 3))],
    4: [dict(mask=_sink_rows(70, 2).to_json(), chunk=16, stages=1, scheme="heads", heads=(4, 2))],
}

STRUCTURED = {
    2: [
        dict(mask=maskc.causal(96).to_json(), chunk=16, stages=2),
        dict(mask=maskc.varlen([30, 41, 25]).to_json(), chunk=16, stages=1, softcap=5.0),
    ],
    3: [
        dict(mask=maskc.sliding_window(75, 20).to_json(), chunk=16, stages=2),  # uneven: 75 = 4 x 16 + 11
        dict(mask=maskc.magi_video([3, 2], 16).to_json(), chunk=16, stages=3),
    ],
    4: [
        dict(mask=maskc.causal(20).to_json(), chunk=16, stages=2),  # two ranks hold no tokens
        dict(mask=maskc.block_causal(90, 24).to_json(), chunk=16, stages=2),
    ],
}


def _run_cases(rank, world, init, cases, out_dir):
    dist = _init(rank, world, init)
    from maskc.runtime import reference_attention
    from maskc.runtime.dist import dispatch, dist_attention, traffic, undispatch

    report = []
    for i, case in enumerate(cases):
        mask = maskc.Mask.from_json(case["mask"])
        plan = _plan(case, world)
        softcap = case.get("softcap", 0.0)
        s = mask.sq
        g = torch.Generator().manual_seed(1000 + i)
        hq, hkv = case.get("heads", (2, 1))
        q = torch.randn(s, hq, 64, generator=g)
        k = torch.randn(s, hkv, 64, generator=g)
        v = torch.randn(s, hkv, 64, generator=g)
        go = torch.randn(s, hq, 64, generator=g)
        gl = torch.randn(hq, s, generator=g)
        pos = torch.as_tensor(np.array(plan.positions(rank)))

        # bijection
        assert torch.equal(undispatch(dispatch(q, plan), plan), q)

        ql, kl, vl = (dispatch(t, plan).clone().requires_grad_() for t in (q, k, v))
        traffic(reset=True)
        out, lse = dist_attention(ql, kl, vl, plan, softcap=softcap, return_lse=True)
        fin_l = torch.isfinite(lse)
        loss = (out * go[pos]).sum() + (torch.where(fin_l, lse, 0.0) * gl[:, pos]).sum()
        loss.backward()
        # the runtime moved exactly the planned K/V rows forward and their gradients back
        moved = traffic(reset=True)
        if plan.scheme == "heads":  # q, k, v in and out, lse out; their gradients back
            per, kvw, n = hq // world, max(hkv // world, 1), pos.numel()
            fwd = s * (per + 2 * kvw) * 256 + world * n * per * (256 + 4)  # q, k, v in; out, lse back
            bwd = s * per * (256 + 4) + world * n * (per + 2 * kvw) * 256  # dout, dlse in; dq, dk, dv back
            assert moved["heads_recv"] == fwd + bwd, (moved, fwd, bwd)
            assert moved["cast_recv"] == moved["qcast_recv"] == 0
        else:
            kv_bytes = Workload(hq=2, hkv=1, head_dim=64, dtype_bytes=4).kv_token_bytes
            assert moved["cast_recv"] == plan.recv_tokens[rank] * kv_bytes, (moved, plan.recv_tokens)
            assert moved["cast_send"] == plan.send_tokens[rank] * kv_bytes, (moved, plan.send_tokens)
            assert moved["reduce_send"] == moved["cast_recv"] and moved["reduce_recv"] == moved["cast_send"]

        qr, kr, vr = (t.clone().double().requires_grad_() for t in (q, k, v))
        ro, rl = reference_attention(qr, kr, vr, mask, softcap=softcap, return_lse=True)
        fin = torch.isfinite(rl)
        ((ro * go.double()).sum() + (torch.where(fin, rl, 0.0) * gl.double()).sum()).backward()

        full = undispatch(out.detach(), plan)
        assert not torch.isnan(full).any() and not torch.isnan(lse).any()
        assert torch.equal(fin_l, fin[:, pos]), "lse is -inf exactly on rows with no allowed key"
        errs = {"out": _rel(full, ro)}
        if fin[:, pos].any():
            errs["lse"] = _rel(lse[fin_l], rl[:, pos][fin_l])
        for name, got, ref in (("dq", ql.grad, qr.grad[pos]), ("dk", kl.grad, kr.grad[pos]), ("dv", vl.grad, vr.grad[pos])):
            if ref.numel() and ref.norm() > 0:
                errs[name] = _rel(got, ref)
            else:
                assert not got.any(), f"{name} must be 0 where the reference is"
        report.append({"case": i, "tokens": int(pos.numel()), "errs": errs})
        bad = {k_: e for k_, e in errs.items() if not e < TOL}
        assert not bad, f"rank {rank} case {i} ({mask!r}): errors {bad}"
    # the overlap-measuring mode: the same work without transfers (nothing moves, shapes hold)
    from maskc.runtime.dist import no_communication

    traffic(reset=True)
    with no_communication():
        o = dist_attention(ql.detach().requires_grad_(), kl.detach().requires_grad_(), vl.detach().requires_grad_(), plan)
        o.sum().backward()
    assert o.shape == ql.shape and traffic(reset=True) == dict.fromkeys(moved, 0)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)
    dist.destroy_process_group()


# ---- tests -------------------------------------------------------------------------------------


def _plan(case, world):
    mask = maskc.Mask.from_json(case["mask"])
    hq, hkv = case.get("heads", (2, 1))
    return compile(mask, cp_size=world, block=BLOCK, chunk=case["chunk"], stages=case["stages"],
                   group_reduce=case.get("group_reduce", False), scheme=case.get("scheme", "sequence"),
                   workload=Workload(hq=hq, hkv=hkv, head_dim=64, dtype_bytes=4))


def _schedule_matches_dense(case, world):
    """The schedule lists exactly the keys each rank's queries attend (brute force); without
    GroupReduce pairs they are exactly the keys it receives."""
    mask = maskc.Mask.from_json(case["mask"])
    plan = _plan(case, world)
    dense = mask.to_dense()
    owner = plan.dispatch.owner_of(np.arange(mask.sq))
    perm = np.concatenate([plan.positions(r) for r in range(world)])
    assert np.array_equal(np.sort(perm), np.arange(mask.sq))
    for r in range(world):
        need = dense[plan.positions(r)].any(0) & (owner != r)
        got = np.zeros(mask.sq, dtype=int)
        for src, a, b in plan.schedule.needed(r):
            assert np.all(owner[a:b] == src)
            got[a:b] += 1
        assert got.max(initial=0) <= 1 and np.array_equal(got.astype(bool), need)
        if plan.schedule.n_group_reduce == 0 and plan.scheme == "sequence":
            assert plan.recv_tokens[r] == need.sum()


@pytest.mark.parametrize("world", [2, 3, 4])
def test_dist_attention_matches_reference(world, tmp_path):
    cases = STRUCTURED[world] + GROUP_REDUCE[world] + HEADS[world] + _cases({2: 5, 3: 4, 4: 3}[world])
    for case in cases:
        _schedule_matches_dense(case, world)
    # the GroupReduce cases really move queries, the heads cases are head-parallel
    assert all(_plan(c, world).schedule.n_group_reduce > 0 for c in GROUP_REDUCE[world])
    assert all(_plan(c, world).scheme == "heads" for c in HEADS[world])
    _spawn(_run_cases, world, cases, str(tmp_path))
    reports = [json.load(open(tmp_path / f"rank{r}.json")) for r in range(world)]
    assert all(len(rep) == len(cases) for rep in reports)
    # every token is some rank's
    for i, case in enumerate(cases):
        s = maskc.Mask.from_json(case["mask"]).sq
        assert sum(rep[i]["tokens"] for rep in reports) == s


def _mismatch(rank, world, init, out_dir):
    dist = _init(rank, world, init)
    from maskc.runtime.dist import dispatch, dist_attention

    msgs = {}
    # 1. different plans on different ranks: a clear error on every rank, no hang
    mask = maskc.causal(64) if rank == 0 else maskc.full(64)
    plan = compile(mask, cp_size=world, block=BLOCK, chunk=16)
    x = torch.randn(64, 1, 64)
    try:
        dist_attention(dispatch(x, plan), dispatch(x, plan), dispatch(x, plan), plan)
        msgs["plans"] = "no error"
    except MaskError as e:
        msgs["plans"] = str(e)
    # 2. a plan for another world size
    try:
        dist_attention(x, x, x, compile(maskc.causal(64), cp_size=world + 1, block=BLOCK))
        msgs["world"] = "no error"
    except MaskError as e:
        msgs["world"] = str(e)
    # 3. the process group still works afterwards (nothing is left half-way)
    t = torch.ones(1)
    dist.all_reduce(t)
    msgs["after"] = float(t.item())
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(msgs, f)
    dist.destroy_process_group()


def test_plan_mismatch_raises_instead_of_hanging(tmp_path):
    _spawn(_mismatch, 2, str(tmp_path), timeout=120)
    for r in range(2):
        msgs = json.load(open(tmp_path / f"rank{r}.json"))
        assert "ranks hold different plans" in msgs["plans"] and "rank 0:" in msgs["plans"]
        assert "the process group has 2 ranks but the plan is for cp_size=3" in msgs["world"]
        assert msgs["after"] == 2.0


def test_single_process_plan_without_distributed():
    """cp_size=1 needs no process group: dispatch/undispatch are identities, the result is exact."""
    from maskc.runtime import reference_attention
    from maskc.runtime.dist import dispatch, dist_attention, undispatch

    mask = maskc.varlen([20, 28])
    plan = compile(mask, cp_size=1, block=BLOCK)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(48, 2 if i == 0 else 1, 64, generator=g) for i in range(3))
    out = undispatch(dist_attention(dispatch(q, plan), dispatch(k, plan), dispatch(v, plan), plan), plan)
    assert _rel(out, reference_attention(q, k, v, mask)) < TOL


def test_layout_and_errors_without_group():
    from maskc.runtime.dist import dispatch, dist_attention, rank_layout

    plan = compile(maskc.causal(64), cp_size=2, block=BLOCK, chunk=16)
    lay = rank_layout(plan, 1)
    assert lay.n_local == len(plan.positions(1))
    assert [m.shape for m in lay.masks][0] == (lay.n_local, lay.n_local)
    assert sum(map(sum, lay.recv_splits)) == plan.recv_tokens[1]
    assert sum(map(sum, lay.send_splits)) == plan.send_tokens[1]
    with pytest.raises(MaskError, match="torch.distributed is not initialised"):
        dispatch(torch.zeros(64, 1), plan)
    with pytest.raises(MaskError, match="plan must be a maskc.Plan"):
        dist_attention(torch.zeros(1), torch.zeros(1), torch.zeros(1), "plan")
    one = compile(maskc.causal(64), cp_size=1, block=BLOCK)
    with pytest.raises(MaskError, match="has 10 tokens but rank 0 holds 64"):
        dist_attention(torch.zeros(10, 1, 64), torch.zeros(10, 1, 64), torch.zeros(10, 1, 64), one)
    with pytest.raises(MaskError, match="x has 10 rows but the plan is for 64 tokens"):
        dispatch(torch.zeros(10, 1), one)
