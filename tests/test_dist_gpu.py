"""Distributed attention on GPUs with NCCL in bf16 (run on a multi-GPU device machine).

    MASKC_GPU_TESTS=1 python -m pytest tests/test_dist_gpu.py

World sizes 2, 3 and 4 (as many as the machine has GPUs for). Random masks of every kind at odd
lengths plus structured ones (one with GroupReduce pairs: query rows moved to the keys; one
head-parallel plan where 8 query heads split over the ranks) go through dispatch -> dist_attention -> undispatch, forward and
backward (with a gradient through lse). The tolerance rule: the distributed result's error
against the float64 reference is at most 2x the error of the single-GPU bf16 `attention` on the
same inputs against the same reference, for out, lse, dq, dk and dv. Each rank also checks that
the bytes the runtime moved equal what the plan says. Skipped without CUDA (CI has none).
"""

import json
import os

import numpy as np
import pytest
import torch

import maskc

from processes import spawn

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
    reason="needs CUDA GPUs and the compiled (not interpreted) kernels",
)

RATIO = 2.0  # distributed error <= RATIO x single-GPU error
HQ, HKV, D = 8, 2, 128
BLOCK = 128


def _random_mask(rng, s):
    slices = []
    for _ in range(int(rng.integers(2, 7))):
        a, b = sorted(rng.integers(0, s + 1, 2).tolist())
        c, d = sorted(rng.integers(0, s + 1, 2).tolist())
        slices.append(((a, max(b, a + 1)), (c, max(d, c + 1)), maskc.Kind(int(rng.integers(0, 4)))))
    base = [maskc.varlen([s // 3, s - s // 3 - 77, 77]), maskc.block_causal(s, 300), maskc.sliding_window(s, 411)]
    return maskc.Mask(slices, sq=s) | base[int(rng.integers(0, 3))]


def _cases(world, seed):
    rng = np.random.default_rng(seed)
    sinks = maskc.varlen([500] * 8) | maskc.Mask([((3990, 4000), (0, 4000), maskc.Kind.FULL)], sq=4000)
    cases = [
        dict(mask=maskc.causal(4000 + world).to_json(), stages=2),
        dict(mask=maskc.magi_video([5, 3], 384).to_json(), stages=1),
        # documents plus 10 query rows that see every key: GroupReduce pairs (queries move)
        dict(mask=sinks.to_json(), stages=2, group_reduce="bytes"),
    ]
    if HQ % world == 0:  # head-parallel (Ulysses' all-to-all of heads): 8 query heads split, 2 K/V heads
        cases.append(dict(mask=maskc.causal(3000 + world).to_json(), stages=1, scheme="heads"))
    for _ in range(3):
        s = int(rng.integers(1500, 4200))
        cases.append(dict(mask=_random_mask(rng, s).to_json(), stages=int(rng.integers(1, 4))))
    return cases


def _rel(x, ref):
    ref = ref.double()
    return ((x.double() - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def _worker(rank, world, init, cases, out_dir):
    import torch.distributed as dist

    from maskc.cost import Workload
    from maskc.plan import compile as compile_plan
    from maskc.runtime import attention, reference_attention
    from maskc.runtime.dist import dispatch, dist_attention, traffic, undispatch

    dev = torch.device("cuda", rank)
    torch.cuda.set_device(dev)
    dist.init_process_group("nccl", init_method=f"file://{init}", rank=rank, world_size=world, device_id=dev)
    report = []
    for i, case in enumerate(cases):
        mask = maskc.Mask.from_json(case["mask"])
        s = mask.sq
        plan = compile_plan(mask, cp_size=world, block=BLOCK, stages=case["stages"],
                            group_reduce=case.get("group_reduce", False), workload=Workload(hq=HQ, hkv=HKV, head_dim=D),
                            scheme=case.get("scheme", "sequence"))
        assert plan.schedule.n_group_reduce > 0 or not case.get("group_reduce"), "the case must move queries"
        g = torch.Generator().manual_seed(7 + i)
        q, k, v = torch.randn(s, HQ, D, generator=g), torch.randn(s, HKV, D, generator=g), torch.randn(s, HKV, D, generator=g)
        go, gl = torch.randn(s, HQ, D, generator=g), torch.randn(HQ, s, generator=g)
        q, k, v, go, gl = (t.to(dev) for t in (q, k, v, go, gl))

        def loss_of(out, lse, rows=None):
            fin = torch.isfinite(lse)
            w_o, w_l = (go, gl) if rows is None else (go[rows], gl[:, rows])
            return (out.float() * w_o).sum() + (torch.where(fin, lse, 0.0) * w_l).sum()

        # float64 reference and single-GPU bf16, on the same bf16-rounded inputs
        qb, kb, vb = (t.bfloat16() for t in (q, k, v))
        qr, kr, vr = (t.double().requires_grad_() for t in (qb, kb, vb))
        ro, rl = reference_attention(qr, kr, vr, mask, return_lse=True)
        loss_of(ro, rl).backward()
        qs, ks, vs = (t.clone().requires_grad_() for t in (qb, kb, vb))
        so, sl = attention(qs, ks, vs, mask, return_lse=True)
        loss_of(so, sl).backward()

        # distributed
        pos = torch.as_tensor(np.array(plan.positions(rank)), device=dev)
        ql, kl, vl = (dispatch(t, plan).clone().requires_grad_() for t in (qb, kb, vb))
        traffic(reset=True)
        out, lse = dist_attention(ql, kl, vl, plan, return_lse=True)
        loss_of(out, lse, pos).backward()
        moved = traffic(reset=True)
        if plan.scheme == "heads":
            assert moved["heads_recv"] > 0 and moved["cast_recv"] == 0
        else:
            kvb = Workload(hq=HQ, hkv=HKV, head_dim=D).kv_token_bytes
            assert moved["cast_recv"] == plan.recv_tokens[rank] * kvb, (moved, plan.recv_tokens)
            assert moved["reduce_send"] == moved["cast_recv"] and moved["reduce_recv"] == moved["cast_send"]

        full = {name: undispatch(t.detach(), plan) for name, t in
                (("out", out), ("dq", ql.grad), ("dk", kl.grad), ("dv", vl.grad))}
        full["lse"] = undispatch(lse.detach().transpose(0, 1).contiguous(), plan).transpose(0, 1)
        fin = torch.isfinite(rl)
        errs = {}
        for name, got, single, ref in (
            ("out", full["out"], so, ro), ("lse", full["lse"][fin], sl[fin], rl[fin]),
            ("dq", full["dq"], qs.grad, qr.grad), ("dk", full["dk"], ks.grad, kr.grad), ("dv", full["dv"], vs.grad, vr.grad),
        ):
            errs[name] = {"dist": _rel(got, ref), "single": _rel(single, ref)}
        assert torch.equal(torch.isfinite(full["lse"]), fin), "lse is -inf exactly on the empty rows"
        report.append({"case": i, "mask": repr(mask).splitlines()[0], "s": s, "errs": errs,
                       "recv_tokens": plan.recv_tokens[rank]})
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)
    dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3, 4])
def test_dist_attention_nccl_bf16(world, tmp_path):
    if torch.cuda.device_count() < world:
        pytest.skip(f"needs {world} GPUs, found {torch.cuda.device_count()}")
    cases = _cases(world, seed=world)
    spawn(_worker, world, cases, str(tmp_path), timeout=600, what="distributed GPU test")
    report = json.load(open(tmp_path / "rank0.json"))
    print(json.dumps(report, indent=1))
    assert len(report) == len(cases)
    for rec in report:
        for name, e in rec["errs"].items():
            assert e["single"] < 2e-2, (rec["mask"], name, e)
            assert e["dist"] <= RATIO * e["single"], f"{rec['mask']}: {name} dist {e['dist']:.3e} > {RATIO} x single {e['single']:.3e}"
