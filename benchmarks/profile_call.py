"""Where one ``attention`` call's time goes: GPU kernels against the host's Python.

    python benchmarks/profile_call.py [--seqlen 8192] [--masks swa1024 varlen_causal]
                                      [--backend cutlass] [--direction fwd_bwd] [--top 20]

Per mask (16 heads, head dim 128, bf16, inputs requiring grad as in training): the wall time of a
call (`triton.testing.do_bench`, median), the host time of a call (50 calls without a
synchronisation, averaged), the GPU time of a call (the profiler's kernel times, summed) with its
largest kernels, and a cProfile of 200 calls sorted by own time. When the host time reaches the GPU
time, the GPU waits for Python and the call's speed is the host's. Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_kernels import MASKS, build  # noqa: E402  (the suite's masks, as the kernel benchmark builds them)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqlen", type=int, default=8192)
    ap.add_argument("--masks", nargs="+", default=["swa1024"], choices=MASKS)
    ap.add_argument("--backend", default="cutlass", choices=["auto", "triton", "cutlass"])
    ap.add_argument("--direction", default="fwd_bwd", choices=["fwd", "fwd_bwd"])
    ap.add_argument("--top", type=int, default=20, help="cProfile rows to print")
    ap.add_argument("--no-early-dq", action="store_true",
                    help="launch the CUTLASS dQ kernel after dK/dV in plain stream order, not early "
                         "(maskc.runtime.cutlass.EARLY_DQ)")
    args = ap.parse_args(argv)
    if args.seqlen < 1:
        raise SystemExit(f"--seqlen must be >= 1, got {args.seqlen}")

    import torch
    import triton
    from torch.profiler import ProfilerActivity, profile

    from maskc.runtime import attention
    from maskc.runtime import cutlass as cb

    cb.EARLY_DQ = not args.no_early_dq

    if not torch.cuda.is_available():
        raise SystemExit("profile_call needs a CUDA GPU")
    s, h, d = args.seqlen, 16, 128
    torch.manual_seed(0)
    q, k, v = (torch.randn(s, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    do = torch.randn(s, h, d, device="cuda", dtype=torch.bfloat16)
    for name in args.masks:
        mask = build(name, s)[0]

        def call():
            for t in (q, k, v):
                t.grad = None
            out = attention(q, k, v, mask, backend=args.backend)
            if args.direction == "fwd_bwd":
                out.backward(do)

        call()
        torch.cuda.synchronize()
        wall = triton.testing.do_bench(call, warmup=25, rep=200, return_mode="median")
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(50):
            call()
        host = (time.perf_counter() - t0) / 50 * 1e3
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                call()
            torch.cuda.synchronize()
        kernels = collections.Counter()
        for e in prof.events():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                kernels[e.name[:60]] += e.device_time_total / 10 / 1e3
        print(f"{name} {s} {args.backend} {args.direction}: wall {wall:.3f} ms, host {host:.3f} ms, "
              f"GPU {sum(kernels.values()):.3f} ms per call", flush=True)
        for kname, ms in kernels.most_common(8):
            print(f"    {ms:8.3f} ms  {kname}")
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(200):
            call()
        pr.disable()
        torch.cuda.synchronize()
        text = io.StringIO()
        pstats.Stats(pr, stream=text).sort_stats("tottime").print_stats(args.top)
        print(text.getvalue())


if __name__ == "__main__":
    main()
