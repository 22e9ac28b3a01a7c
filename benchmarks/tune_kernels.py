"""Sweep tile sizes / warps / stages for each FFA kernel on the GPU; print the best per direction.

    python benchmarks/tune_kernels.py [--seqlen 16384] [--head-dim 128] [--out DIR]

Each direction is timed alone (forward; dK/dV; dQ) on three masks that exercise the three
predicate classes: ``full`` (no partial tiles), ``causal`` (diagonal partial tiles) and a packed
``varlen`` causal mask (many partial tiles). The score of a config is its summed median time over
the three masks. The winners go into ``codegen/configs.py`` by hand, with the run recorded in
``docs/kernel-notes.md`` (tuned ahead of time, never at a user's first call).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import torch

import maskc
import importlib

rt = importlib.import_module("maskc.runtime.ffa")

CANDIDATES = {
    "fwd": [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2), (128, 128, 8, 3), (64, 64, 4, 3), (128, 64, 4, 4), (128, 32, 4, 4), (64, 128, 4, 3)],
    "bwd_dkdv": [(32, 128, 4, 3), (32, 128, 4, 5), (64, 128, 8, 2), (64, 128, 8, 3), (32, 64, 4, 3), (64, 64, 4, 3), (16, 128, 4, 4), (32, 128, 8, 3)],
    "bwd_dq": [(128, 32, 4, 3), (128, 32, 4, 5), (128, 64, 8, 2), (64, 64, 4, 3), (128, 64, 8, 3), (64, 32, 4, 4), (128, 32, 8, 3)],
}


def masks(s: int):
    from bench_kernels import doc_lengths

    return {"full": maskc.full(s), "causal": maskc.causal(s), "varlen": maskc.varlen(doc_lengths(s), maskc.CAUSAL)}


def time_direction(direction, cfg, mask, q, k, v, out, lse, do):
    from triton.testing import do_bench

    base = rt.default_config

    def patched(d_, hd, dev):
        return rt.KernelConfig(*cfg) if d_ == direction else base(d_, hd, dev)

    rt.default_config = patched
    try:
        sq, hq, d = q.shape
        sk, hkv, _ = k.shape
        scale = 1 / math.sqrt(d)
        if direction == "fwd":
            fn = lambda: rt.ffa_forward(q, k, v, mask, scale, 0.0, backend="triton")  # the tuned Triton kernel
        else:
            delta = (do.float() * out.float()).sum(-1).transpose(0, 1).contiguous()
            common = (sq, sk, q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), do.stride(0), do.stride(1))
            if direction == "bwd_dkdv":
                dk, dv = torch.empty_like(k), torch.empty_like(v)
                _, plan, c = rt._resolve(mask, "bwd_dkdv", d, q.device)
                fn = lambda: rt._launch("bwd_dkdv", plan, "bwd", q, hq // hkv, 0.0, c, (q, k, v, do, lse, delta, dk, dv, delta),
                                        (*common, dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1), hq * d, d,
                                         scale, scale * rt.LOG2E, 0.0), plan.n_k_tiles, hkv)
            else:
                dq = torch.empty_like(q)
                _, plan, c = rt._resolve(mask, "bwd_dq", d, q.device)
                fn = lambda: rt._launch("bwd_dq", plan, "fwd", q, hq // hkv, 0.0, c, (q, k, v, do, lse, delta, dq),
                                        (*common, dq.stride(0), dq.stride(1), scale, scale * rt.LOG2E, 0.0), plan.n_q_tiles, hq)
        fn()
        torch.cuda.synchronize()
        return do_bench(fn, warmup=10, rep=40, return_mode="median")
    finally:
        rt.default_config = base


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqlen", type=int, default=16384)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--directions", nargs="+", default=list(CANDIDATES))
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    args = ap.parse_args(argv)
    s, h, d = args.seqlen, args.heads, args.head_dim
    torch.manual_seed(0)
    q, k, v, do = (torch.randn(s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    results = []
    for name, mask in masks(s).items():
        out, lse = rt.ffa_forward(q, k, v, mask, 1 / math.sqrt(d), 0.0)
        flops = 4.0 * mask.area * d * h
        for direction in args.directions:
            for cfg in CANDIDATES[direction]:
                if d == 256 and cfg[0] * cfg[1] > 64 * 128:
                    continue
                try:
                    ms = time_direction(direction, cfg, mask, q, k, v, out, lse, do)
                except Exception as e:  # out of shared memory / registers for this config
                    print(f"{direction} {cfg} {name}: failed ({type(e).__name__}: {str(e).splitlines()[0][:80]})", file=sys.stderr)
                    continue
                mult = 1.0 if direction == "fwd" else 1.25  # dK/dV: 3 products + recompute; dQ: 2 + recompute
                results.append({"direction": direction, "cfg": cfg, "mask": name, "ms": ms, "tflops": flops * mult / ms / 1e9})
                print(f"{direction:9} {str(cfg):18} {name:7} {ms:8.3f} ms {results[-1]['tflops']:6.0f} TFLOP/s", flush=True)
    best = {}
    for direction in args.directions:
        totals = {}
        for r in results:
            if r["direction"] == direction:
                totals.setdefault(tuple(r["cfg"]), []).append(r["ms"])
        full = {c: sum(t) for c, t in totals.items() if len(t) == 3}
        if full:
            best[direction] = min(full, key=full.get)
            print(f"BEST {direction}: {best[direction]}  total {full[best[direction]]:.3f} ms")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    dev = torch.cuda.get_device_name().replace(" ", "_")
    (Path(args.out) / f"tune-{dev}-d{d}.json").write_text(json.dumps({"results": results, "best": {k_: list(v_) for k_, v_ in best.items()}}, indent=1))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()
