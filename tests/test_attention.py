"""FFA kernels (Triton interpreter on the CPU, float32) against the float64 dense reference.

Random masks of all four kinds (overlapping unions normalised, empty rows, sizes that are not
multiples of the 16x16 interpreter tiles), GQA, softcap; forward out and lse, backward dq/dk/dv
including the gradient through lse. Tolerance: ||x - ref|| / ||ref|| < 1e-5.
"""

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import maskc
from maskc import MaskError
from maskc.runtime import attention, plan_for, reference_attention
from maskc.tiling import lower

from conftest import masks

TOL = 1e-5


def rel(x, ref):
    from conftest import rel_err  # relative, with a unit-scale floor for near-zero references

    return rel_err(x, ref)


def check(mask, hq=2, hkv=1, d=64, softcap=0.0, seed=0, plan=None):
    sq, sk = mask.shape
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sq, hq, d, generator=g, requires_grad=True)
    k = torch.randn(sk, hkv, d, generator=g, requires_grad=True)
    v = torch.randn(sk, hkv, d, generator=g, requires_grad=True)
    out, lse = attention(q, k, v, plan if plan is not None else mask, softcap=softcap, return_lse=True)
    ref_out, ref_lse = reference_attention(q, k, v, mask, softcap=softcap, return_lse=True)
    assert out.shape == (sq, hq, d) and lse.shape == (hq, sq) and lse.dtype == torch.float32
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    empty = torch.as_tensor(mask.row_counts() == 0)
    assert torch.equal(torch.isinf(lse), empty[None].expand(hq, sq)), "lse is -inf exactly on empty rows"
    assert (out[empty] == 0).all()
    assert rel(out, ref_out) < TOL
    fin = torch.isfinite(ref_lse)
    if fin.any():
        assert rel(lse[fin], ref_lse[fin]) < TOL
    # backward, with a gradient flowing into lse as well
    go = torch.randn(out.shape, generator=g)
    gl = torch.randn(lse.shape, generator=g)
    loss = (out * go).sum() + (torch.where(fin, lse, 0.0) * gl).sum()
    ref_loss = (ref_out * go.double()).sum() + (torch.where(fin, ref_lse, 0.0) * gl.double()).sum()
    grads = torch.autograd.grad(loss, (q, k, v))
    ref_grads = torch.autograd.grad(ref_loss, (q, k, v))
    for name, a, b in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert not torch.isnan(a).any(), name
        if b.norm() > 0:
            assert rel(a, b) < TOL, f"{name}: {rel(a, b):.2e}"
        else:
            assert a.abs().max() == 0, name


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(masks(max_side=40, max_slices=4), st.sampled_from([(1, 1), (2, 1), (4, 2)]), st.integers(0, 2**16))
def test_random_masks(md, heads, seed):
    m, _ = md
    if m.sq == 0 or m.sk == 0:
        return
    hq, hkv = heads
    check(m, hq=hq, hkv=hkv, seed=seed)


@pytest.mark.parametrize(
    "mask",
    [
        maskc.causal(37),
        maskc.causal(20, 45),  # more keys than queries: bottom-right aligned
        maskc.causal(45, 20),  # the first rows are empty
        maskc.varlen([5, 17, 1, 9], maskc.Kind.FULL),
        maskc.block_causal(48, 16),  # aligned: no partial tiles, no masking code at all
        maskc.sliding_window(50, 7) | maskc.global_tokens(50, 3, 2),
        maskc.Mask([((3, 9), (0, 5), 0)], sq=30, sk=12),  # mostly empty rows
        ~maskc.causal(33),
    ],
    ids=lambda m: f"{m.sq}x{m.sk}-{len(m)}slices",
)
def test_named_masks(mask):
    check(mask, hq=2, hkv=2)


def test_softcap_and_gqa():
    check(maskc.sliding_window(40, 9) | maskc.Mask([((0, 40), (30, 40), 2)], sq=40, sk=40), hq=4, hkv=1, softcap=3.0)


def test_a_tile_plan_can_be_passed_directly():
    m = maskc.varlen([10, 23], maskc.Kind.CAUSAL)
    check(m, plan=lower(m, 16, 16))


def test_aligned_plan_uses_the_kernel_without_masking():
    from maskc.codegen.render import render
    from maskc.runtime import kernels

    m = maskc.block_causal(64, 16)
    check(m)
    fwd = [s for s in kernels.loaded_specs() if s.direction == "fwd" and s.partial == "none"]
    assert fwd, "block-causal aligned to the tiles must use a spec without partial tiles"
    src = render(fwd[0])
    assert "allowed =" not in src and "tl.where(allowed" not in src and "preds + t" not in src


def test_plans_are_cached():
    m = maskc.causal(64)
    p1 = plan_for(m, 16, 16)
    p2 = plan_for(maskc.causal(64), 16, 16)
    assert p1 is p2


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: (torch.randn(8, 2, 64), torch.randn(8, 2, 32), torch.randn(8, 2, 32)), "q head_dim 64 != k head_dim 32"),
        (lambda: (torch.randn(8, 2, 48), torch.randn(8, 2, 48), torch.randn(8, 2, 48)), r"head_dim 48 is not supported; supported: \(64, 128, 256\)"),
        (lambda: (torch.randn(8, 3, 64), torch.randn(8, 2, 64), torch.randn(8, 2, 64)), "q heads 3 must be a multiple of k/v heads 2"),
        (lambda: (torch.randn(8, 64), torch.randn(8, 2, 64), torch.randn(8, 2, 64)), r"q must be 3-D \[seq, heads, head_dim\]"),
        (lambda: (torch.randn(8, 2, 64, dtype=torch.float64),) * 3, "dtype torch.float64 is not supported on the CPU"),
        (lambda: (torch.randn(8, 2, 64), torch.randn(8, 2, 64), torch.randn(9, 2, 64)), "v shape"),
        (lambda: (torch.randn(9, 2, 64), torch.randn(8, 2, 64), torch.randn(8, 2, 64)), "mask is 8 x 8 but q has 9 positions"),
    ],
)
def test_bad_inputs(make, message):
    q, k, v = make()
    with pytest.raises(MaskError, match=message):
        attention(q, k, v, maskc.causal(8))


def test_bad_mask_argument():
    q = torch.randn(8, 2, 64)
    with pytest.raises(MaskError, match="mask_or_plan must be a maskc.Mask or a TilePlan, got str"):
        attention(q, q, q, "causal")
    with pytest.raises(MaskError, match="softcap must be >= 0"):
        attention(q, q, q, maskc.causal(8), softcap=-1.0)


def test_non_contiguous_inputs_are_handled():
    m = maskc.causal(24)
    base = torch.randn(2, 24, 2, 64)
    q = base[0]
    k = torch.randn(24, 64, 2).transpose(1, 2)  # last dim not contiguous: copied
    v = torch.randn(24, 2, 64)
    out = attention(q, k, v, m)
    ref = reference_attention(q, k, v, m)
    assert rel(out, ref) < TOL


def test_a_repeated_call_does_no_planning(monkeypatch):
    import importlib

    rt = importlib.import_module("maskc.runtime.ffa")

    m = maskc.varlen([7, 20])
    q = torch.randn(27, 2, 64)
    first = attention(q, q, q, m)

    def no_lowering(*a, **k):
        raise AssertionError("a repeated call lowered the mask again")

    monkeypatch.setattr(rt, "lower", no_lowering)
    monkeypatch.setattr(rt, "_spec", no_lowering)
    monkeypatch.setattr(rt, "kernel_lists", no_lowering)
    again = attention(q, q, q, maskc.varlen([7, 20]))  # an equal mask, a new object
    assert torch.equal(first, again)


@pytest.mark.parametrize("mask", [maskc.causal(40), maskc.sliding_window(50, 7) | maskc.global_tokens(50, 3, 2)], ids=["causal", "many-slices"])
def test_non_deterministic_backward_fuses_dq(mask):
    """deterministic=False adds dQ with atomics inside the dK/dV kernel: same gradients."""
    sq, sk = mask.shape
    g = torch.Generator().manual_seed(3)
    q = torch.randn(sq, 4, 64, generator=g, requires_grad=True)
    k = torch.randn(sk, 2, 64, generator=g, requires_grad=True)
    v = torch.randn(sk, 2, 64, generator=g, requires_grad=True)
    go = torch.randn(sq, 4, 64, generator=g)
    out = attention(q, k, v, mask, deterministic=False, softcap=4.0)
    grads = torch.autograd.grad(out, (q, k, v), go)
    ref = reference_attention(q, k, v, mask, softcap=4.0)
    ref_grads = torch.autograd.grad(ref, (q, k, v), go.double())
    for a, b in zip(grads, ref_grads):
        assert rel(a, b) < TOL


def _cutlass_planning_on_cpu(monkeypatch):
    """The runtime's CUTLASS planning with the kernel lookup stubbed (CPU), empty memos, and a
    record of every `_classify` pass: ``(its first group's sizes, the other groups' sizes)``."""
    import importlib

    import maskc.tiling as tiling

    rt = importlib.import_module("maskc.runtime.ffa")
    cb = importlib.import_module("maskc.runtime.cutlass")
    monkeypatch.setattr(cb, "unsupported", lambda *a: None)
    monkeypatch.setattr(cb, "built_kernel", lambda spec: ("cubin", {"spec": spec}))
    monkeypatch.setattr(rt, "_CUTLASS", {})
    monkeypatch.setattr(rt, "_PLANS", {})
    tiling.clear_caches()
    calls = []
    real = tiling._classify
    monkeypatch.setattr(tiling, "_classify",
                        lambda *a, **k: calls.append((a[3], [g[3] for g in k.get("also", ())])) or real(*a, **k))
    return rt, cb, calls


def test_cutlass_kernel_prefers_the_builds_ring_depth(monkeypatch):
    """Of the built ring depths the runtime takes the default build's (dK/dV on a diag mask: 3, dQ:
    2), and another one only when that is not built. (CPU: the kernel lookup is stubbed.)"""
    rt, cb, _ = _cutlass_planning_on_cpu(monkeypatch)
    mask = maskc.causal(512)
    q = torch.zeros(512, 2, 64, requires_grad=True)
    for built, want in (({2, 3}, {"bwd_dkdv": 3, "bwd_dq": 2}), ({2}, {"bwd_dkdv": 2, "bwd_dq": 2}),
                        ({3}, {"bwd_dkdv": 3, "bwd_dq": 3})):
        monkeypatch.setattr(cb, "built_kernel", lambda spec: ("cubin", {"spec": spec}) if spec.num_stages in built else None)
        monkeypatch.setattr(rt, "_CUTLASS", {})
        got = {d: rt._cutlass_kernel(d, mask, q, q, q, 0.0, "auto")[0].num_stages for d in ("bwd_dkdv", "bwd_dq")}
        assert got == want, (built, got)
    monkeypatch.setattr(cb, "built_kernel", lambda spec: None)
    monkeypatch.setattr(rt, "_CUTLASS", {})
    assert rt._cutlass_kernel("bwd_dkdv", mask, q, q, q, 0.0, "auto") is None  # nothing built: Triton


def test_cutlass_planning_classifies_the_row_kernels_once(monkeypatch):
    """A new mask's CUTLASS forward plan also classifies dQ's tile size (same row orientation) in
    the same pass, so the backward's dQ lowering classifies nothing. (CPU: the kernel lookup is
    stubbed; only the planning runs.)"""
    rt, cb, calls = _cutlass_planning_on_cpu(monkeypatch)
    mask = maskc.varlen([300, 700, 1048], maskc.CAUSAL)
    q = torch.zeros(2048, 2, 64)
    fwd_spec, _, fwd_plan = rt._cutlass_kernel("fwd", mask, q, q, q, 0.0, "auto")
    assert calls == [([cb.cg.TILES["fwd"], cb.cg.TILES["bwd_dq"]], [])]  # one pass, both sizes, no dK/dV
    dq_spec, _, dq_plan = rt._cutlass_kernel("bwd_dq", mask, q, q, q, 0.0, "auto")
    assert len(calls) == 1  # dQ's lowering reused the classification
    assert (fwd_spec.direction, dq_spec.direction) == ("fwd", "bwd_dq")
    for plan, direction in ((fwd_plan, "fwd"), (dq_plan, "bwd_dq")):
        want = lower(mask, *cb.cg.TILES[direction])
        for name in ("full_ptr", "full_runs", "part_ptr", "part_tiles", "pred_ptr", "preds", "order"):
            assert np.array_equal(getattr(plan.fwd, name), getattr(want.fwd, name)), (direction, name)


def test_cutlass_planning_with_grad_classifies_all_three_kernels_once(monkeypatch):
    """Where an input requires grad, dK/dV's tile size (key tiles) joins the forward's pass, and
    the dQ and dK/dV lowerings after it classify nothing; the plans equal fresh lowerings."""
    rt, cb, calls = _cutlass_planning_on_cpu(monkeypatch)
    mask = maskc.varlen([300, 700, 1048], maskc.CAUSAL)
    q = torch.zeros(2048, 2, 64, requires_grad=True)
    plans = {d: rt._cutlass_kernel(d, mask, q, q, q, 0.0, "auto")[2] for d in ("fwd", "bwd_dq", "bwd_dkdv")}
    bq, bk = cb.cg.TILES["bwd_dkdv"]
    assert calls == [([cb.cg.TILES["fwd"], cb.cg.TILES["bwd_dq"]], [[(bk, bq)]])]  # one pass of all three
    for direction, plan in plans.items():
        which = "bwd" if direction == "bwd_dkdv" else "fwd"
        want = getattr(lower(mask, *cb.cg.TILES[direction]), which)
        for name in ("full_ptr", "full_runs", "part_ptr", "part_tiles", "pred_ptr", "preds", "order"):
            assert np.array_equal(getattr(getattr(plan, which), name), getattr(want, name)), (direction, name)
