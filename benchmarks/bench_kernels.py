"""FFA kernel speed on one GPU: maskc vs FlexAttention vs cuDNN / flash SDPA, same run, same inputs.

    python benchmarks/bench_kernels.py [--seqlens 8192 32768] [--heads 16] [--head-dim 128]
                                       [--masks full causal ...] [--rounds 3] [--out DIR]

bf16, packed layout ``[s, h, d]`` for maskc and ``[1, h, s, d]`` for the peers (layout copies are
made once, outside the timed region). TFLOP/s count the exact allowed area: forward
``4 * area * d * h``, forward+backward 3.5x that (the backward does five products to the forward's
two). FlexAttention is compiled once per mask with its block mask built once (its mask_mods are
written the idiomatic way, with document / chunk id lookups); SDPA runs only where the mask is
dense (full, causal). Per mask, every (impl, direction) is timed once per round, the impls taking
turns (``--rounds``, default 3), and the median of the rounds' `triton.testing.do_bench` medians
is recorded (with the rounds): a drift of the GPU's clocks during the run falls on every impl
alike. Each round starts at a different place in the list of impls, so none is always timed right
after the same one. Forward+backward is timed as in a training step: every impl's leaf tensors have their
``.grad`` set to None before each call (PyTorch's ``zero_grad`` default), so no impl adds its
gradients into the previous call's (runs before 2026-11-26's `-fresh-grads` files included that
add, 0.39 ms at 32k, in every impl's time). Also records the host time to plan each mask as new
(median of 5 newly built masks, memo cleared before each, after one warm-up plan of another mask):
rows ``plan_host_ms`` (with the samples) with impl ``maskc`` (the Triton kernels'
tile choice) and ``cutlass`` (`bench_mask.plan_for_cutlass`, what the H100 runs).

Writes ``kernels-<device>-<date>.json``: a header row with versions, then rows
``{"mask", "seqlen", "impl", "direction", "tflops", "ms"}``, and prints a table.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import functools
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

import maskc
from maskc.runtime import attention
from maskc.runtime.ffa import _resolve

sys.path.insert(0, os.path.dirname(__file__))
from bench_mask import SUITE_NAMES, doc_lengths, magi_videos, plan_for_cutlass, plan_for_triton, suite_masks  # noqa: E402  (the suite's packed documents; bench_mask needs no torch)

MASKS = list(SUITE_NAMES)  # the suite, in order


def build(name: str, s: int):
    """(maskc mask, flex mask_mod or None for no mask, sdpa is_causal or None when not dense); the
    maskc masks are `bench_mask.suite_masks`' (the planning rows time the same ones)."""
    if name not in SUITE_NAMES:
        raise SystemExit(f"unknown mask {name!r}; choose from {MASKS}")
    mask = suite_masks(s)[SUITE_NAMES[name]]()
    lengths = doc_lengths(s)
    doc = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)).cuda()
    start = torch.tensor(np.cumsum([0] + lengths[:-1])).cuda()[doc]
    if name == "full":
        return mask, None, False
    if name == "causal":
        return mask, (lambda b, h, q, k: q >= k), True
    if name == "swa1024":
        return mask, (lambda b, h, q, k: (q >= k) & (q - k < 1024)), None
    if name == "varlen_causal":
        return mask, (lambda b, h, q, k: (doc[q] == doc[k]) & (q >= k)), None
    if name == "varlen_full":
        return mask, (lambda b, h, q, k: doc[q] == doc[k]), None
    if name == "block_causal":
        return mask, (lambda b, h, q, k: q // 1024 >= k // 1024), None
    if name == "varlen_block_causal":
        return mask, (lambda b, h, q, k: (doc[q] == doc[k]) & ((q - start[q]) // 1024 >= (k - start[k]) // 1024)), None
    # magi_video: videos of 1536-token chunks, window of 4 chunks, padding past the last chunk
    videos, chunk = magi_videos(s)
    vid = torch.repeat_interleave(torch.arange(3), torch.tensor(videos) * chunk).cuda()
    vid = torch.cat([vid, torch.full((s - vid.numel(),), -1, device="cuda")])
    vstart = torch.tensor(np.cumsum([0] + [v * chunk for v in videos[:-1]]).tolist() + [0]).cuda()
    vs = vstart[vid.clamp_min(0)]
    cq = lambda q: (q - vs[q]) // chunk  # noqa: E731
    return mask, (lambda b, h, q, k: (vid[q] == vid[k]) & (vid[q] >= 0) & (cq(q) >= cq(k)) & (cq(q) - cq(k) < 4)), None


def bench(fn, warmup=25, rep=100):
    from triton.testing import do_bench

    return do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


PLAN_SAMPLES = 5


def plan_samples(plan, new_mask, n: int = PLAN_SAMPLES) -> list[float]:
    """Host milliseconds of ``plan(mask)`` for `n` newly built masks, the tiling memo cleared before
    each (untimed): the cost of a mask never seen before."""
    out = []
    for _ in range(n):
        mask = new_mask()
        maskc.tiling.clear_caches()
        t0 = time.perf_counter()
        plan(mask)
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqlens", type=int, nargs="+", default=[8192, 32768])
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--masks", nargs="+", default=MASKS, choices=MASKS)
    ap.add_argument("--impls", nargs="+", default=["maskc", "cutlass", "flex", "cudnn", "flash"],
                    choices=["maskc", "cutlass", "flex", "cudnn", "flash"],
                    help="maskc: the Triton backend; cutlass: the CUTLASS kernels, forward and backward (built "
                         "into ./build or $MASKC_BUILD, else compiled with nvcc)")
    ap.add_argument("--rounds", type=int, default=3,
                    help="times each (impl, direction) is timed per mask, impls taking turns; the median is recorded")
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    ap.add_argument("--no-early-dq", action="store_true",
                    help="cutlass: launch the dQ kernel after dK/dV in plain stream order, not early "
                         "(maskc.runtime.cutlass.EARLY_DQ; for an A/B of the early launch)")
    args = ap.parse_args(argv)
    if args.rounds < 1:
        raise SystemExit(f"--rounds must be >= 1, got {args.rounds}")
    if not torch.cuda.is_available():
        raise SystemExit("bench_kernels needs a CUDA GPU")
    import triton
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    # one compiled graph per (mask_mod, shape): lift dynamo's recompile limit, or flex falls back
    # to eager math attention (and runs out of memory at 32k)
    for knob in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit", "accumulated_recompile_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, 1024)
    flex = torch.compile(flex_attention, dynamic=False)
    dev = torch.cuda.get_device_name()
    header = {
        "header": True,
        "device": dev,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "date": dt.date.today().isoformat(),
        "heads": args.heads,
        "head_dim": args.head_dim,
        "dtype": "bf16",
        "rounds": args.rounds,
        "fwd_bwd_grads": "fresh (.grad = None before each call)",
        "early_dq": not args.no_early_dq,
        "command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
        # both maskc backends are maskc: "cutlass" is what attention(..., backend="auto") runs on an H100
        "impls": {"maskc": "maskc, Triton kernels (backend='triton')",
                  "cutlass": "maskc, CUTLASS kernels (backend='cutlass'; what 'auto' runs on sm_90)",
                  "flex": "torch.compile(flex_attention)", "cudnn": "SDPA, cuDNN backend",
                  "flash": "SDPA, flash backend"},
    }
    if args.no_early_dq:
        from maskc.runtime import cutlass as cb

        cb.EARLY_DQ = False
    rows = []
    h, d = args.heads, args.head_dim
    for plan in (lambda m: plan_for_triton(m, d), plan_for_cutlass):  # first-call costs (imports, numpy paths)
        plan_samples(plan, lambda: maskc.varlen([300, 700, 1024], maskc.CAUSAL), 1)
    for s in args.seqlens:
        for name in args.masks:
            mask, mask_mod, causal = build(name, s)
            area = mask.area
            fl_fwd = 4.0 * area * d * h
            torch.manual_seed(0)
            q = torch.randn(s, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            k = torch.randn(s, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            v = torch.randn(s, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            do = torch.randn(s, h, d, device="cuda", dtype=torch.bfloat16)

            timed = []  # (impl, direction, fn, context), timed in rounds once every impl is set up
            leaves = [q, k, v]  # and the (1, h, s, d) copies the torch impls take, below

            def record(impl, direction, fn, context=contextlib.nullcontext):
                if direction != "fwd":
                    fn = fresh_grads(fn)
                timed.append((impl, direction, fn, context))

            def fresh_grads(fn):
                """fwd+bwd as in a training step: the leaves' .grad start at None (PyTorch's
                zero_grad default), so no impl pays a gradient accumulation (an add over dq, dk
                and dv: 0.39 ms at 32k) that a real model's q/k/v, activations, never have."""
                def step():
                    for t in leaves:
                        t.grad = None
                    fn()
                return step

            # host-side planning of a new mask: every candidate lowering for the three Triton
            # kernels, and what the CUTLASS kernels need (median of PLAN_SAMPLES newly built masks)
            for impl, plan in (("maskc", lambda m: plan_for_triton(m, d)), ("cutlass", plan_for_cutlass)):
                samples = plan_samples(plan, suite_masks(s)[SUITE_NAMES[name]])
                rows.append({"mask": name, "seqlen": s, "impl": impl, "direction": "plan_host_ms",
                             "ms": round(statistics.median(samples), 3), "samples_ms": [round(x, 3) for x in samples]})
            if "maskc" in args.impls:
                fwd = lambda: attention(q, k, v, mask, backend="triton")
                out = fwd()
                record("maskc", "fwd", fwd)
                def fb():
                    o = attention(q, k, v, mask, backend="triton")
                    o.backward(do)
                record("maskc", "fwd_bwd", fb)
                def fb_nd():
                    o = attention(q, k, v, mask, deterministic=False, backend="triton")
                    o.backward(do)
                record("maskc", "fwd_bwd_nondeterministic", fb_nd)
                t0 = time.perf_counter()
                for _ in range(100):
                    _resolve(mask, "fwd", d, q.device)
                rows.append({"mask": name, "seqlen": s, "impl": "maskc", "direction": "cached_lookup_us",
                             "ms": round((time.perf_counter() - t0) * 1e4, 3)})
            if "cutlass" in args.impls:  # the CUTLASS forward and backward
                cf = lambda: attention(q, k, v, mask, backend="cutlass")
                diff = (cf().float() - attention(q, k, v, mask, backend="triton").float()).abs().max().item()
                rows.append({"mask": name, "seqlen": s, "impl": "cutlass", "direction": "max_abs_diff_vs_triton",
                             "ms": diff})
                record("cutlass", "fwd", cf)
                def cfb():
                    attention(q, k, v, mask, backend="cutlass").backward(do)
                record("cutlass", "fwd_bwd", cfb)
            qt, kt, vt = (x.detach().transpose(0, 1).unsqueeze(0).contiguous().requires_grad_() for x in (q, k, v))
            leaves.extend((qt, kt, vt))
            dot = do.transpose(0, 1).unsqueeze(0).contiguous()
            if "flex" in args.impls:
                try:
                    bm = None if mask_mod is None else create_block_mask(mask_mod, 1, 1, s, s, device="cuda", BLOCK_SIZE=128)
                    ff = lambda: flex(qt, kt, vt, block_mask=bm)
                    ff()
                    record("flex", "fwd", ff)
                    def ffb():
                        flex(qt, kt, vt, block_mask=bm).backward(dot)
                    ffb()
                    record("flex", "fwd_bwd", ffb)
                except (RuntimeError, torch.OutOfMemoryError) as e:
                    print(f"flex failed on {name} {s}: {str(e).splitlines()[0][:120]}", file=sys.stderr)
                    torch.cuda.empty_cache()
            if causal is not None:
                for impl, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
                    if impl not in args.impls:
                        continue
                    sf = lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)

                    def sfb():
                        torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=causal).backward(dot)
                    context = functools.partial(sdpa_kernel, backend)
                    try:
                        with context():
                            sf()
                            sfb()
                    except RuntimeError as e:  # backend not available for these inputs
                        print(f"{impl}: unavailable ({str(e).splitlines()[0]})", file=sys.stderr)
                        continue
                    record(impl, "fwd", sf, context)
                    record(impl, "fwd_bwd", sfb, context)
            times = {(impl, direction): [] for impl, direction, _, _ in timed}
            for r in range(args.rounds):
                # each round starts further along the list, so no impl is always timed right
                # after the same (heavy) one: the GPU's clocks follow its recent power draw
                start = r * len(timed) // args.rounds
                for impl, direction, fn, context in timed[start:] + timed[:start]:
                    with context():
                        times[(impl, direction)].append(bench(fn))
            for impl, direction, _, _ in timed:
                ms = statistics.median(times[(impl, direction)])
                fl = fl_fwd * (1.0 if direction == "fwd" else 3.5)  # fwd_bwd*: 3.5x
                rows.append({"mask": name, "seqlen": s, "impl": impl, "direction": direction,
                             "tflops": round(fl / ms / 1e9, 1), "ms": round(ms, 4),
                             "ms_rounds": [round(t, 4) for t in times[(impl, direction)]]})
            del q, k, v, qt, kt, vt, leaves, timed  # (the closures in `timed` hold them too)
            torch.cuda.empty_cache()
            print(f"done {name} {s}", file=sys.stderr, flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = dev.replace(" ", "_").replace("/", "_")
    path = out / f"kernels-{tag}-{header['date']}.json"
    path.write_text(json.dumps([header] + rows, indent=1))
    print_table(rows)
    print(f"wrote {path}")


def print_table(rows):
    by = {}
    for r in rows:
        if "tflops" in r:
            by[(r["mask"], r["seqlen"], r["impl"], r["direction"])] = r["tflops"]
    plan = {(r["mask"], r["seqlen"], r["impl"]): r["ms"] for r in rows if r["direction"] == "plan_host_ms"}
    print(f"{'mask':<22}{'S':>7} | {'maskc f/fb/fb-nd':>17} | {'cutlass f/fb':>13} | {'flex f/fb':>13} | {'x flex f/fb':>12} | {'cudnn f/fb':>13} | {'flash f/fb':>13} | plan ms triton/cutlass")
    for (m, s) in dict.fromkeys((r["mask"], r["seqlen"]) for r in rows):
        def pair(impl):
            f, b = by.get((m, s, impl, "fwd")), by.get((m, s, impl, "fwd_bwd"))
            return "-" if f is None else f"{f:.0f}/{b:.0f}" if b is not None else f"{f:.0f}/-"
        mf, mb = by.get((m, s, "maskc", "fwd")), by.get((m, s, "maskc", "fwd_bwd"))
        nd = by.get((m, s, "maskc", "fwd_bwd_nondeterministic"))
        mpair = pair("maskc") + ("" if nd is None else f"/{nd:.0f}")
        ff, fb = by.get((m, s, "flex", "fwd")), by.get((m, s, "flex", "fwd_bwd"))
        ratio = f"{mf / ff:.2f}/{mb / fb:.2f}" if mf and ff else "-"
        print(f"{m:<22}{s:>7} | {mpair:>17} | {pair('cutlass'):>13} | {pair('flex'):>13} | {ratio:>12} | {pair('cudnn'):>13} | {pair('flash'):>13} | {plan.get((m, s, 'maskc'), 0):.2f}/{plan.get((m, s, 'cutlass'), 0):.2f}")


if __name__ == "__main__":
    main()
