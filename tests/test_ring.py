"""Ring attention baseline (`benchmarks/ring_attention.py`) on the CPU: gloo processes at world
sizes 2, 3 and 4, Triton interpreter, float32.

Random masks (drawn with hypothesis) and structured ones (causal, magi_video, sliding window) go
through ring_shard -> ring_attention -> ring_unshard on every rank, zigzag and plain layouts;
forward (out, lse) and backward (dq, dk, dv, with a gradient through lse as well) must equal the
single-process float64 `reference_attention` (rel err < 1e-5). Every case also checks that a rank's
dK/dV is far from the reference of any *other* rank's block (so a misrouted travelling dK/dV
accumulator cannot pass) and that the bytes moved equal `ring_bytes`. Without processes: the
positions are a permutation, the per-step sub-masks tile the mask exactly, the accumulator's
indexing delivers every contribution to its owner, world size 1 matches the reference, and bad
inputs raise clear errors.
"""

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import Phase, given, settings, strategies as st

import maskc
from maskc import Kind, MaskError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import ring_attention as ra  # noqa: E402

TOL = 1e-5
HEAD_DIM = 64


from conftest import rel_err as _rel, slice_lists  # noqa: E402  (relative, unit-scale floor for near-zero references)
from processes import init_gloo as _init, spawn  # noqa: E402


# ---- cases -------------------------------------------------------------------------------------


@st.composite
def ring_cases(draw, world: int, max_tokens: int = 96):
    """A random mask over ``2 * world * c`` tokens (<= max_tokens), a layout and a head layout."""
    c = draw(st.integers(1, max_tokens // (2 * world)))
    s = 2 * world * c
    slices = draw(slice_lists(s, s, min_slices=1, nonempty=True))
    heads = draw(st.sampled_from([(2, 1), (1, 1), (2, 2)]))
    return dict(mask=maskc.Mask(slices, sq=s).to_json(), zigzag=draw(st.booleans()), heads=heads)


def _draw_cases(world: int, n: int) -> list[dict]:
    """`n` hypothesis examples of `ring_cases(world)` (the first is hypothesis' simplest one: a
    single allowed pair, so nearly every row and ring step is empty). They run in one set of
    processes (a spawn per example would not fit the time budget), so a failure is not shrunk;
    the failing rank's message carries the mask's JSON instead."""
    drawn = []

    @settings(max_examples=n, deadline=None, database=None, phases=[Phase.generate])
    @given(ring_cases(world))
    def collect(case):
        drawn.append(case)

    collect()
    return drawn


# one case in each world whose ranks' K/V blocks all get different, non-zero gradients: a
# travelling dK/dV accumulator delivered to the wrong owner shows up in the shifted check below
_ASYMMETRIC = maskc.Mask(
    [((0, 96), (0, 40), Kind.CAUSAL), ((20, 72), (30, 96), Kind.FULL), ((48, 96), (8, 64), Kind.INV_CAUSAL),
     ((90, 96), (0, 96), Kind.FULL)],
    sq=96,
).to_json()

STRUCTURED = {
    2: [
        dict(mask=maskc.causal(96).to_json(), zigzag=True, heads=(2, 1)),
        dict(mask=maskc.magi_video([2, 1], 32).to_json(), zigzag=False, heads=(2, 1)),
        dict(mask=_ASYMMETRIC, zigzag=True, heads=(2, 1), asymmetric=True),
    ],
    3: [
        dict(mask=maskc.magi_video([3, 3], 16).to_json(), zigzag=True, heads=(2, 1)),
        dict(mask=maskc.sliding_window(90, 20).to_json(), zigzag=False, heads=(1, 1)),
        dict(mask=_ASYMMETRIC, zigzag=False, heads=(2, 1), asymmetric=True),
    ],
    4: [  # one head: the interpreter's time grows with heads, and world 4 runs 4 processes on the CI's 2 cores
        dict(mask=maskc.causal(96).to_json(), zigzag=True, heads=(1, 1)),
        dict(mask=_ASYMMETRIC, zigzag=True, heads=(1, 1), asymmetric=True),
    ],
}
N_RANDOM = {2: 3, 3: 3, 4: 2}  # the first of each is hypothesis' simplest example


def _run_cases(rank, world, init, cases, out_dir):
    dist = _init(rank, world, init)
    from maskc.runtime import reference_attention

    report = []
    for i, case in enumerate(cases):
        mask = maskc.Mask.from_json(case["mask"])
        zz, (hq, hkv) = case["zigzag"], case["heads"]
        s = mask.sq
        g = torch.Generator().manual_seed(1000 + i)
        q = torch.randn(s, hq, HEAD_DIM, generator=g)
        k = torch.randn(s, hkv, HEAD_DIM, generator=g)
        v = torch.randn(s, hkv, HEAD_DIM, generator=g)
        go = torch.randn(s, hq, HEAD_DIM, generator=g)
        gl = torch.randn(hq, s, generator=g)
        pos = torch.as_tensor(ra.ring_positions(s, world, rank, zigzag=zz))
        where = f"rank {rank} case {i} (zigzag={zz}, heads={hq}/{hkv}, mask {case['mask']})"

        # shard / unshard is a bijection
        assert torch.equal(ra.ring_unshard(ra.ring_shard(q, world, rank, zz), world, zigzag=zz), q), where

        ra.ring_traffic(reset=True)
        ql, kl, vl = (ra.ring_shard(t, world, rank, zz).clone().requires_grad_() for t in (q, k, v))
        out, lse = ra.ring_attention(ql, kl, vl, mask, zigzag=zz, return_lse=True)
        fin_l = torch.isfinite(lse)
        loss = (out * go[pos]).sum() + (torch.where(fin_l, lse, 0.0) * gl[:, pos]).sum()
        loss.backward()
        moved = ra.ring_traffic(reset=True)

        qr, kr, vr = (t.clone().double().requires_grad_() for t in (q, k, v))
        ro, rl = reference_attention(qr, kr, vr, mask, return_lse=True)
        fin = torch.isfinite(rl)
        ((ro * go.double()).sum() + (torch.where(fin, rl, 0.0) * gl.double()).sum()).backward()

        full = ra.ring_unshard(out.detach(), world, zigzag=zz)
        full_lse = ra.ring_unshard(lse.detach().t().contiguous(), world, zigzag=zz).t()
        assert not torch.isnan(full).any() and not torch.isnan(lse).any(), where
        assert torch.equal(torch.isfinite(full_lse), fin), f"{where}: lse is -inf exactly on rows with no key"
        errs = {"out": _rel(full, ro)}
        if fin.any():
            errs["lse"] = _rel(full_lse[fin], rl[fin])
        grads = (("dq", ql.grad, qr.grad), ("dk", kl.grad, kr.grad), ("dv", vl.grad, vr.grad))
        for name, got, ref in grads:
            ref = ref[pos]
            if ref.numel() and ref.norm() > 0:
                errs[name] = _rel(got, ref)
            else:
                assert not got.any(), f"{where}: {name} must be 0 where the reference is"
        bad = {k_: e for k_, e in errs.items() if not e < TOL}
        assert not bad, f"{where}: errors {bad}"

        # dK/dV against every other rank's block: how far a misrouted accumulator would be
        shifted = {}
        for other in range(world):
            if other != rank:
                opos = torch.as_tensor(ra.ring_positions(s, world, other, zigzag=zz))
                shifted[other] = min(_rel(kl.grad, kr.grad[opos]), _rel(vl.grad, vr.grad[opos]))

        want = ra.ring_bytes(s, world, hkv, HEAD_DIM, 4)
        assert (moved["fwd_recv"], moved["bwd_recv"]) == tuple(want), f"{where}: moved {moved}, predicted {want}"
        assert (moved["fwd_send"], moved["bwd_send"]) == tuple(want), f"{where}: moved {moved}, predicted {want}"
        report.append({"case": i, "tokens": int(pos.numel()), "errs": errs, "shifted": shifted})

    # bad inputs raise before any communication, on every rank, and leave the group usable
    x = torch.zeros(32, 1, HEAD_DIM)
    msgs = {}
    for name, call in (
        ("shape", lambda: ra.ring_attention(x, x, x, maskc.causal(32))),
        ("mask", lambda: ra.ring_attention(x, x, x, maskc.causal(64).to_dense())),
        ("odd", lambda: ra.ring_attention(x[:31], x[:31], x[:31], maskc.causal(31 * world))),
        ("unshard", lambda: ra.ring_unshard(x, world + 1)),
    ):
        try:
            call()
            msgs[name] = "no error"
        except MaskError as e:
            msgs[name] = str(e)
    t = torch.ones(1)
    dist.all_reduce(t)
    msgs["after"] = float(t.item())
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"report": report, "errors": msgs}, f)
    dist.destroy_process_group()


# ---- distributed tests -------------------------------------------------------------------------


@pytest.mark.parametrize("world", [2, 3, 4])
def test_ring_attention_matches_reference(world, tmp_path):
    cases = STRUCTURED[world] + _draw_cases(world, N_RANDOM[world])
    spawn(_run_cases, world, cases, str(tmp_path), what="ring attention test")
    results = [json.load(open(tmp_path / f"rank{r}.json")) for r in range(world)]
    for i, case in enumerate(cases):
        s = maskc.Mask.from_json(case["mask"]).sq
        assert sum(res["report"][i]["tokens"] for res in results) == s
        if case.get("asymmetric"):
            for r, res in enumerate(results):
                far = min(res["report"][i]["shifted"].values())
                assert far > 0.1, f"rank {r}: its dK/dV is close to another rank's block ({far:.3g})"
    for r, res in enumerate(results):
        e = res["errors"]
        assert f"mask is 32 x 32 but the ring holds world * local tokens = {world} * 32" in e["shape"]
        assert "mask must be a maskc.Mask, got ndarray" in e["mask"]
        assert "q has 31 local tokens" in e["odd"] and "must be even" in e["odd"]
        assert f"world={world + 1} but the process group has {world} rank(s)" in e["unshard"]
        assert e["after"] == float(world)


# ---- single-process tests ----------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 6), st.integers(0, 12), st.booleans())
def test_positions_form_a_permutation(world, c, zigzag):
    s = (2 * world if zigzag else world) * c
    pos = [ra.ring_positions(s, world, r, zigzag) for r in range(world)]
    assert all(p.dtype == np.int64 and p.size == s // world for p in pos)
    assert np.array_equal(np.sort(np.concatenate(pos)), np.arange(s))
    if zigzag and c:
        chunks = [2 * world - 1 - r for r in range(world)]
        for r, p in enumerate(pos):  # chunks r and 2 world - 1 - r, in that order
            assert p[0] == r * c and p[c] == chunks[r] * c
    else:
        for r, p in enumerate(pos):
            assert np.array_equal(p, np.arange(r * c, (r + 1) * c))


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 4), st.data())
def test_step_masks_tile_the_mask(world, data):
    """Rank r's step-j sub-mask is exactly mask[rows of r, cols of (r - j) mod world]."""
    case = data.draw(ring_cases(world, max_tokens=48))
    mask, zz = maskc.Mask.from_json(case["mask"]), case["zigzag"]
    dense = mask.to_dense()
    s = mask.sq
    total = 0
    for r in range(world):
        rows = ra.ring_positions(s, world, r, zz)
        for j in range(world):
            m = ra.step_mask(mask, world, r, j, zz)
            cols = ra.ring_positions(s, world, (r - j) % world, zz)
            assert m.shape == (s // world, s // world)
            assert np.array_equal(m.to_dense(), dense[np.ix_(rows, cols)])
            assert ra.step_mask(mask, world, r, j, zz) is m  # cached
            total += m.area
    assert total == mask.area


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_travelling_accumulator_reaches_every_owner(world):
    """Replays the backward's hop pattern with labelled contributions: after world - 1 hops every
    owner holds exactly the other ranks' contributions for its own block (then adds its own)."""
    contrib = lambda r, b: 1 << (r * world + b)  # noqa: E731 - a distinct bit per (contributor, block)
    held = {}  # rank -> (block, accumulated value) after the exchange
    for j in range(1, world):
        nxt = {}
        for r in range(world):
            b = ra._block_owner(r, j, world)
            if j == 1:
                acc = contrib(r, b)
            else:
                got_b, acc = held[r]
                assert got_b == b, f"step {j}: rank {r} received block {got_b}'s accumulator, holds {b}"
                acc += contrib(r, b)
            nxt[(r + 1) % world] = (b, acc)
        held = nxt
    for owner in range(world):
        b, acc = held.get(owner, (owner, 0))
        assert b == owner
        assert acc + contrib(owner, owner) == sum(contrib(r, owner) for r in range(world))


def test_world_one_without_distributed():
    """No process group: world 1, no communication, exact; GQA; empty rows; ring_unshard's gradient."""
    from maskc.runtime import reference_attention

    mask = maskc.Mask([((0, 40), (0, 20), Kind.CAUSAL), ((30, 48), (10, 48), Kind.FULL)], sq=48)  # rows 20..29: some empty
    g = torch.Generator().manual_seed(0)
    q = torch.randn(48, 2, HEAD_DIM, generator=g, requires_grad=True)
    k, v = (torch.randn(48, 1, HEAD_DIM, generator=g, requires_grad=True) for _ in range(2))
    ra.ring_traffic(reset=True)
    out, lse = ra.ring_attention(q, k, v, mask, return_lse=True)
    ro, rl = reference_attention(q, k, v, mask, return_lse=True)
    assert _rel(out, ro) < TOL and torch.equal(torch.isfinite(lse), torch.isfinite(rl))
    fin = torch.isfinite(rl)
    assert _rel(lse[fin], rl[fin]) < TOL
    go = torch.randn(48, 2, HEAD_DIM, generator=g)
    gq, gk, gv = torch.autograd.grad((out * go).sum(), (q, k, v))
    rq, rk, rv = torch.autograd.grad((ro * go.double()).sum(), (q, k, v))
    assert max(_rel(gq, rq), _rel(gk, rk), _rel(gv, rv)) < TOL
    assert ra.ring_traffic() == {"fwd_send": 0, "fwd_recv": 0, "bwd_send": 0, "bwd_recv": 0}
    # plain layout at world 1 is the identity; ring_unshard passes gradients back to the rows
    x = torch.randn(48, 3, requires_grad=True)
    full = ra.ring_unshard(x, 1, zigzag=False)
    assert torch.equal(full, x)
    (full * torch.arange(48.0)[:, None]).sum().backward()
    assert torch.equal(x.grad, torch.arange(48.0)[:, None].expand(48, 3))
    # an all-empty mask: out 0, lse -inf, zero gradients
    z = ra.ring_attention(q, k, v, maskc.Mask([], sq=48), return_lse=True)
    assert not z[0].any() and torch.isneginf(z[1]).all()
    assert not torch.autograd.grad(z[0].sum(), q)[0].any()


def test_ring_bytes():
    fwd, bwd = ra.ring_bytes(1 << 20, 8, 8, 128, 2)
    block = (1 << 20) // 8 * 2 * 8 * 128
    assert (fwd, bwd) == (7 * block * 2, 7 * block * 4)
    assert ra.ring_bytes(96, 1, 1, 64, 4) == (0, 0)
    with pytest.raises(MaskError, match="seq_len=10 must be divisible by world=4"):
        ra.ring_bytes(10, 4, 1, 64, 2)


def test_bad_inputs_raise():
    x = torch.zeros(16, 1, HEAD_DIM)
    with pytest.raises(ValueError, match=r"seq_len=10 must be divisible by 8 \(the zigzag layout"):
        ra.ring_positions(10, 4, 0)
    with pytest.raises(MaskError, match=r"seq_len=10 must be divisible by 4 \(the plain layout"):
        ra.ring_positions(10, 4, 0, zigzag=False)
    with pytest.raises(MaskError, match=r"rank must lie in \[0, world=2\), got 2"):
        ra.ring_positions(8, 2, 2)
    with pytest.raises(MaskError, match="world must be an integer >= 1, got 0"):
        ra.ring_positions(8, 0, 0)
    with pytest.raises(MaskError, match="ring_shard: seq_len=15 must be divisible by 4"):
        ra.ring_shard(torch.zeros(15, 1), 2, 0)
    with pytest.raises(MaskError, match="mask must be a maskc.Mask, got str"):
        ra.ring_attention(x, x, x, "causal")
    with pytest.raises(MaskError, match=r"q must be a 3-D tensor \[local tokens, heads, head_dim\], got shape \(16, 64\)"):
        ra.ring_attention(x[:, 0], x, x, maskc.causal(16))
    with pytest.raises(MaskError, match="q, k and v must hold the same local tokens, got 16, 8 and 16"):
        ra.ring_attention(x, x[:8], x, maskc.causal(16))
    with pytest.raises(MaskError, match=r"mask is 32 x 32 but the ring holds world \* local tokens = 1 \* 16 = 16"):
        ra.ring_attention(x, x, x, maskc.causal(32))
    with pytest.raises(MaskError, match="must be even"):
        ra.ring_attention(x[:15], x[:15], x[:15], maskc.causal(15))
    with pytest.raises(MaskError, match="ring_attention: head_dim 32 is not supported; supported: "):
        y = torch.zeros(16, 1, 32)
        ra.ring_attention(y, y, y, maskc.causal(16))
    with pytest.raises(MaskError, match="ring_attention: q heads 3 must be a multiple of k/v heads 2"):
        ra.ring_attention(torch.zeros(16, 3, HEAD_DIM), torch.zeros(16, 2, HEAD_DIM), torch.zeros(16, 2, HEAD_DIM),
                          maskc.causal(16))
    with pytest.raises(MaskError, match="ring_attention: q, k, v must share a dtype"):
        ra.ring_attention(x, x, x.double(), maskc.causal(16))
    with pytest.raises(MaskError, match="ring_unshard: world=2 but the process group has 1 rank"):
        ra.ring_unshard(x, 2)
