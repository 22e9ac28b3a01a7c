"""Scaling of context-parallel attention over 1-8 GPUs: maskc's `dist_attention` vs ring attention.

    python benchmarks/bench_scaling.py                           # every GPU of the machine, defaults below
    python benchmarks/bench_scaling.py --sizes 1048576 --cps 1 4 --impls maskc
    python benchmarks/bench_scaling.py --cpu --nproc 2           # smoke test: gloo + Triton interpreter, tiny sizes

Masks: `magi_video` (MAGI-1's packed block-causal video mask), ``--sizes`` tokens made of videos of
``--video-chunks`` chunks of ``--chunk-tokens`` tokens (default 32 x 8192 = 256k tokens a video, so
512k / 1M / 2M tokens pack 2 / 4 / 8 videos). For every size and every cp in ``--cps`` the script
times forward + backward (median of ``--iters`` after ``--warmup``) of

* ``maskc``: cp 1 is the single-GPU `attention` on the whole mask; cp > 1 is `dist_attention` on
  the shards of ``maskc.compile(mask, cp_size=cp)`` (the planner's dispatch and GroupCast /
  GroupReduce schedule). It also times, on the same shapes, the same call with the transfers
  skipped (`maskc.runtime.dist.no_communication`: all the runtime's other work, merges included),
  each rank's stages' kernels alone, and its communication alone; the hidden fraction of
  communication is ``1 - max(0, t_total - t_nocomm) / t_comm`` (slowest rank), and the bytes the
  runtime really moved (`maskc.runtime.dist.traffic`) are compared with the planner's prediction;
* ``ring``: ring attention with zigzag balancing (`benchmarks/ring_attention.py`): every rank's
  K/V visits every other rank in cp - 1 hops, the next hop's transfer overlapped with the current
  block; the backward circulates float32 dK/dV accumulators.

Per row: time, TFLOP/s per GPU (forward + backward = 3.5 x the forward's 4 * area * d * heads on
the exact allowed area), scaling efficiency ``t(cp_min) * cp_min / (t(cp) * cp)`` against the
smallest cp measured for that size, peak memory. The cost model (`maskc.cost`) is calibrated on
this run's single-GPU compute and communication-alone timings (`maskc.cost.calibrate`) and its
predicted step times are compared with the measured ones, before and after calibration.

Ranks not in a cp group wait at a barrier; the cp groups are the first cp ranks. Inputs are random
(timings do not depend on values; correctness is the test suite's job). Writes
``scaling-<gpu>-<date>-<nproc>x[-<tag>].json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

DEFAULT_SIZES = (524288, 1048576, 2097152)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nproc", type=int, default=None, help="processes = GPUs (default: every visible GPU)")
    ap.add_argument("--sizes", type=int, nargs="+", default=None,
                    help=f"tokens per mask (default {' '.join(map(str, DEFAULT_SIZES))}; --cpu: 128)")
    ap.add_argument("--cps", type=int, nargs="+", default=None,
                    help="context-parallel sizes (default 1 2 4 8 up to --nproc)")
    ap.add_argument("--impls", nargs="+", default=["maskc", "ring"], choices=["maskc", "ring"])
    ap.add_argument("--chunk-tokens", type=int, default=8192, help="tokens per video chunk")
    ap.add_argument("--video-chunks", type=int, default=32, help="chunks per packed video")
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=16)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--block", type=int, default=128, help="dispatch granularity (tile size)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--iters", type=int, default=2)
    ap.add_argument("--tag", default="", help="suffix of the output file name")
    ap.add_argument("--cpu", action="store_true", help="gloo + Triton interpreter smoke test (tiny sizes)")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--merge", nargs="+", metavar="JSON",
                    help="no run: merge result files of one machine (e.g. sizes run in separate calls) into one "
                         "summary, calibrating the cost model on all their records; writes --out/<first>-merged.json")
    args = ap.parse_args(argv)
    if args.merge:
        return args
    if args.cpu:
        args.sizes = args.sizes or [128]
        args.chunk_tokens, args.video_chunks = 16, 4
        args.heads, args.kv_heads, args.head_dim, args.block = 2, 1, 64, 16
        args.warmup, args.iters = 0, 1
    args.sizes = args.sizes or list(DEFAULT_SIZES)
    for name in ("warmup", "iters", "chunk_tokens", "video_chunks", "heads", "kv_heads", "head_dim", "block"):
        v = getattr(args, name)
        if v < (0 if name == "warmup" else 1):
            ap.error(f"--{name.replace('_', '-')} must be >= {0 if name == 'warmup' else 1}, got {v}")
    if min(args.sizes) < 1:
        ap.error(f"--sizes must be positive, got {args.sizes}")
    return args


def build_mask(tokens: int, video_chunks: int, chunk_tokens: int):
    """Packed videos of ``video_chunks`` chunks; a shorter last video takes the remaining chunks."""
    import maskc

    n_chunks = max(tokens // chunk_tokens, 1)
    counts = [video_chunks] * (n_chunks // video_chunks)
    if n_chunks % video_chunks:
        counts.append(n_chunks % video_chunks)
    return maskc.magi_video(counts, chunk_tokens)


def _median_time(fn, warmup: int, iters: int, sync, barrier) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        barrier()
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


class Job:
    """What every rank of the world needs to run one (size, cp, impl) measurement."""

    def __init__(self, rank, args, device, dtype, groups):
        import torch

        self.rank, self.args, self.device, self.dtype, self.groups = rank, args, device, dtype, groups
        self.cuda = device.type == "cuda"
        self.torch = torch

    def sync(self):
        if self.cuda:
            self.torch.cuda.synchronize(self.device)

    def barrier(self, cp):
        import torch.distributed as dist

        if cp == 1:
            return lambda: None
        g = self.groups[cp]
        return (lambda: dist.barrier(group=g, device_ids=[self.device.index])) if self.cuda else (lambda: dist.barrier(group=g))

    def randn(self, *shape):
        return self.torch.randn(*shape, device=self.device, dtype=self.dtype)

    def start(self):
        if self.cuda:
            self.torch.cuda.empty_cache()
            self.torch.cuda.reset_peak_memory_stats(self.device)

    def peak_gb(self):
        return self.torch.cuda.max_memory_allocated(self.device) / 2**30 if self.cuda else None

    # ---- cp = 1: the single-GPU kernels on the whole mask -------------------------------------

    def single(self, mask):
        from maskc.runtime import attention

        a = self.args
        s = mask.sq
        q, k, v, do = self.randn(s, a.heads, a.head_dim), self.randn(s, a.kv_heads, a.head_dim), \
            self.randn(s, a.kv_heads, a.head_dim), self.randn(s, a.heads, a.head_dim)
        q.requires_grad_(), k.requires_grad_(), v.requires_grad_()

        def step():
            q.grad = k.grad = v.grad = None
            attention(q, k, v, mask).backward(do)

        self.start()
        try:
            t = _median_time(step, a.warmup, a.iters, self.sync, lambda: None)
        except self.torch.cuda.OutOfMemoryError:
            return {"oom": True}
        return {"time_s": t, "compute_s": t, "peak_gb": self.peak_gb()}

    # ---- maskc dist_attention ---------------------------------------------------------------------

    def maskc(self, mask, cp):
        import torch

        from maskc.plan import compile as compile_plan
        from maskc.runtime import attention
        from maskc.runtime.dist import (dist_attention, group_cast, group_reduce, no_communication, rank_layout,
                                        traffic)

        a, g = self.args, self.groups[cp]
        t0 = time.perf_counter()
        plan = compile_plan(mask, cp_size=cp, block=a.block)
        plan_s = time.perf_counter() - t0
        lay = rank_layout(plan, self.rank)
        n = lay.n_local
        q, k, v, do = self.randn(n, a.heads, a.head_dim), self.randn(n, a.kv_heads, a.head_dim), \
            self.randn(n, a.kv_heads, a.head_dim), self.randn(n, a.heads, a.head_dim)
        barrier = self.barrier(cp)

        def step():
            qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
            dist_attention(qq, kk, vv, plan, g).backward(do)

        self.start()
        traffic(reset=True)
        t_total = _median_time(step, a.warmup, a.iters, self.sync, barrier)
        moved = {key: val // (a.warmup + a.iters) for key, val in traffic(reset=True).items()}
        peak = self.peak_gb()

        # the same stages' compute alone (received K/V replaced by random buffers of their size)
        kv = torch.stack([k, v], dim=1)
        bufs = [kv.new_empty((sum(lay.recv_splits[i]),) + tuple(kv.shape[1:])).normal_() for i in range(plan.stages)]

        def compute_only():
            qq = q.detach().requires_grad_()
            outs = []
            for st, m in enumerate(lay.masks):
                if st == 0:
                    kk, vv = k.detach().requires_grad_(), v.detach().requires_grad_()
                elif bufs[st - 1].shape[0] == 0:
                    continue
                else:
                    b = bufs[st - 1].detach().requires_grad_()
                    kk, vv = b[:, 0], b[:, 1]
                outs.append(attention(qq, kk, vv, m))
            torch.autograd.backward(outs, [do] * len(outs))

        rows = [torch.as_tensor(r.copy(), device=self.device) for r in lay.send_rows]

        def comm_only():
            got = [group_cast(kv, rows[i], lay.send_splits[i], lay.recv_splits[i], g) for i in range(plan.stages)]
            for i in range(plan.stages):
                group_reduce(got[i], rows[i], lay.send_splits[i], lay.recv_splits[i], lay.n_local, g)

        with no_communication():  # the whole runtime minus the transfers: the exposed-comm baseline
            t_nocomm = _median_time(step, 0, a.iters, self.sync, barrier)
        t_compute = _median_time(compute_only, 0, a.iters, self.sync, barrier)
        traffic(reset=True)
        t_comm = _median_time(comm_only, 1, a.iters, self.sync, barrier) if plan.stages else 0.0
        traffic(reset=True)
        area = int(plan.schedule.stage_area[self.rank].sum())
        return {
            "time_s": t_total, "nocomm_s": t_nocomm, "compute_s": t_compute, "comm_s": t_comm, "peak_gb": peak, "plan_s": plan_s,
            "tokens": n, "area": area, "moved": moved, "plan": plan,
        }

    # ---- ring attention with zigzag ---------------------------------------------------------------

    def ring(self, mask, cp):
        from ring_attention import ring_attention, ring_positions, ring_traffic

        a, g = self.args, self.groups[cp]
        n = len(ring_positions(mask.sq, cp, self.rank, zigzag=True))
        q, k, v, do = self.randn(n, a.heads, a.head_dim), self.randn(n, a.kv_heads, a.head_dim), \
            self.randn(n, a.kv_heads, a.head_dim), self.randn(n, a.heads, a.head_dim)

        def step():
            qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
            ring_attention(qq, kk, vv, mask, g, zigzag=True).backward(do)

        self.start()
        ring_traffic(reset=True)
        t = _median_time(step, a.warmup, a.iters, self.sync, self.barrier(cp))
        moved = {key: val // (a.warmup + a.iters) for key, val in ring_traffic(reset=True).items()}
        return {"time_s": t, "peak_gb": self.peak_gb(), "tokens": n, "moved": moved}


def worker(rank, world, args, init_file, out_file):
    if args.cpu:
        os.environ["TRITON_INTERPRET"] = "1"
    import torch
    import torch.distributed as dist

    if args.cpu:
        device, backend, dtype = torch.device("cpu"), "gloo", torch.float32
        torch.set_num_threads(1)
    else:
        device, backend, dtype = torch.device("cuda", rank), "nccl", torch.bfloat16
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world,
                            **({"device_id": device} if device.type == "cuda" else {}))
    world_barrier = (lambda: dist.barrier(device_ids=[rank])) if device.type == "cuda" else dist.barrier
    groups = {cp: (dist.new_group(list(range(cp))) if cp > 1 else None) for cp in args.cps}
    job = Job(rank, args, device, dtype, groups)
    torch.manual_seed(rank)

    records = []
    for size in args.sizes:
        mask = build_mask(size, args.video_chunks, args.chunk_tokens)
        for cp in args.cps:
            for impl in args.impls:
                if impl == "ring" and (cp == 1 or mask.sq % (2 * cp)):
                    continue  # ring at cp 1 is the single-GPU row; zigzag needs 2 cp equal parts
                rec = None
                if rank < cp:
                    if cp == 1:
                        rec = job.single(mask)
                    elif impl == "maskc":
                        rec = job.maskc(mask, cp)
                    else:
                        rec = job.ring(mask, cp)
                    rec.update(rank=rank, size=mask.sq, cp=cp, impl=impl, area=rec.get("area", mask.area))
                    plan = rec.pop("plan", None)
                    if plan is not None and rank == 0:
                        rec["plan_summary"] = plan.summary()
                        rec["plan_json"] = plan.to_json()
                world_barrier()
                got = [None] * world
                dist.all_gather_object(got, rec)
                got = [r for r in got if r is not None]
                records.extend(got)
                if rank == 0:
                    t = max(r.get("time_s", float("nan")) for r in got)
                    print(f"  {impl:5s} cp {cp}: {mask.sq:>8d} tokens  {t * 1e3:10.1f} ms", flush=True)
    if rank == 0:
        import triton

        env = {
            "date": dt.date.today().isoformat(),
            "host": platform.node(),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "nproc": world,
            "torch": torch.__version__,
            "triton": triton.__version__,
            "cuda": torch.version.cuda,
            "nccl": ".".join(map(str, torch.cuda.nccl.version())) if device.type == "cuda" else None,
            "dtype": str(dtype),
            "args": {k: v for k, v in vars(args).items() if k not in ("merge",)},
        }
        summary = summarise(records, env)
        Path(out_file).write_text(json.dumps(summary, indent=1, default=float))
        print_table(summary)
    dist.destroy_process_group()


def summarise(records, env):
    """Rows per (size, cp, impl), the cost model calibrated on these records and its errors."""
    import numpy as np

    from maskc.cost import Hardware, Workload, calibrate, simulate
    from maskc.plan import Plan

    args = argparse.Namespace(**env["args"])

    wl = Workload(hq=args.heads, hkv=args.kv_heads, head_dim=args.head_dim, dtype_bytes=2 if not args.cpu else 4)
    per_pair = wl.fwd_flops_per_pair + wl.bwd_flops_per_pair
    kvb = wl.kv_token_bytes

    # calibration samples: single-GPU and compute-alone runs (flops, s); communication alone (bytes, s)
    compute, transfers = [], []
    for r in records:
        if r.get("oom") or r["impl"] != "maskc":
            continue
        compute.append((r["area"] * per_pair, r["compute_s"]))
    by_key = {}
    for r in records:
        by_key.setdefault((r["size"], r["cp"], r["impl"]), []).append(r)
    for (size, cp, impl), rs in by_key.items():
        if impl == "maskc" and cp > 1:
            busiest = max(max(r["moved"]["cast_send"], r["moved"]["cast_recv"]) for r in rs)
            busiest += max(max(r["moved"]["reduce_send"], r["moved"]["reduce_recv"]) for r in rs)
            t_comm = max(r["comm_s"] for r in rs)
            if busiest and t_comm:
                transfers.append((busiest, t_comm))
    hw0 = Hardware()
    hw1 = calibrate(compute, transfers, base=hw0)

    rows = []
    for (size, cp, impl), rs in sorted(by_key.items()):
        if any(r.get("oom") for r in rs):
            rows.append({"mask": "magi_video", "seqlen": size, "cp": cp, "impl": impl, "oom": True})
            continue
        t = max(r["time_s"] for r in rs)
        area = rs[0]["area"] if cp == 1 else sum(r["area"] for r in rs) if impl == "maskc" else None
        row = {"mask": "magi_video", "seqlen": size, "cp": cp, "impl": impl, "ms": round(t * 1e3, 2),
               "peak_gb_max": round(max(r["peak_gb"] or 0 for r in rs), 2) if not args.cpu else None}
        row["_t"] = t
        if impl == "maskc" and cp > 1:
            plan = Plan.from_json(next(r for r in rs if r["rank"] == 0).get("plan_json")) if any(
                "plan_json" in r for r in rs) else None
            t_comp = max(r["compute_s"] for r in rs)
            t_comm = max(r["comm_s"] for r in rs)
            # exposed communication: the real call minus the same call without transfers (runs
            # recorded before that baseline existed fall back to the kernels alone)
            exposed = max(max(r["time_s"] - r.get("nocomm_s", r["compute_s"]), 0.0) for r in rs)
            moved = [r["moved"]["cast_recv"] for r in sorted(rs, key=lambda r: r["rank"])]
            row.update(
                compute_ms=round(t_comp * 1e3, 2), comm_ms=round(t_comm * 1e3, 2),
                nocomm_ms=round(max(r.get("nocomm_s", float("nan")) for r in rs) * 1e3, 2), exposed_comm_ms=round(exposed * 1e3, 2),
                comm_hidden=round(min(max(1.0 - exposed / t_comm, 0.0), 1.0), 4) if t_comm > 0 else None,
                recv_bytes_measured=moved,
                recv_bytes_planned=[int(x) * kvb for x in plan.recv_tokens] if plan else None,
                imbalance=plan.imbalance if plan else None,
                plan_ms=round(max(r["plan_s"] for r in rs) * 1e3, 1),
            )
            if plan is not None:
                p0, p1 = simulate(plan, hw0, wl).step_s, simulate(plan, hw1, wl).step_s
                row.update(pred_ms_default=round(p0 * 1e3, 2), pred_ms_calibrated=round(p1 * 1e3, 2),
                           pred_err_default=round(p0 / t - 1, 4), pred_err_calibrated=round(p1 / t - 1, 4))
        if impl == "ring":
            from ring_attention import ring_bytes

            fwd, bwd = ring_bytes(size, cp, args.kv_heads, args.head_dim, wl.dtype_bytes)
            row.update(recv_bytes_planned=int(fwd), recv_bytes_bwd_planned=int(bwd),
                       recv_bytes_measured=[r["moved"]["fwd_recv"] for r in sorted(rs, key=lambda r: r["rank"])],
                       recv_bytes_bwd_measured=[r["moved"]["bwd_recv"] for r in sorted(rs, key=lambda r: r["rank"])])
        if cp == 1:
            p0, p1 = float(hw0.seconds(area * per_pair)), float(hw1.seconds(area * per_pair))
            row.update(pred_ms_default=round(p0 * 1e3, 2), pred_ms_calibrated=round(p1 * 1e3, 2))
        rows.append(row)
    # TFLOP/s per GPU and scaling efficiency against the smallest cp measured for the size
    areas = {}
    for row in rows:
        if row["cp"] == 1 and not row.get("oom"):
            areas[row["seqlen"]] = next(r["area"] for r in records if r["size"] == row["seqlen"] and r["cp"] == 1)
    for size in {r["seqlen"] for r in rows}:
        area = areas.get(size)
        if area is None:
            area = build_mask(size, args.video_chunks, args.chunk_tokens).area
        ok = [r for r in rows if r["seqlen"] == size and not r.get("oom")]
        base = min((r for r in ok if r["impl"] == "maskc" or r["cp"] == 1), key=lambda r: r["cp"], default=None)
        for r in ok:
            r["tflops_per_gpu"] = round(area * per_pair / (r["_t"] * r["cp"]) / 1e12, 1)
            if base is not None:
                r["efficiency"] = round(base["_t"] * base["cp"] / (r["_t"] * r["cp"]), 4)
                r["efficiency_vs_cp"] = base["cp"]
    for r in rows:
        r.pop("_t", None)
    err0 = [abs(r["pred_err_default"]) for r in rows if "pred_err_default" in r]
    err1 = [abs(r["pred_err_calibrated"]) for r in rows if "pred_err_calibrated" in r]
    header = {
        "benchmark": "scaling",
        **env,
        "heads": [args.heads, args.kv_heads, args.head_dim],
        "video": [args.video_chunks, args.chunk_tokens],
        "warmup": args.warmup,
        "iters": args.iters,
        "hardware_default": vars(hw0) if hasattr(hw0, "__dict__") else str(hw0),
        "hardware_calibrated": {"tflops": hw1.tflops, "link_gbs": hw1.link_gbs, "latency_us": hw1.latency_us},
        "calibration_samples": {"compute": compute, "transfers": transfers},
        "pred_abs_err_default_median": float(np.median(err0)) if err0 else None,
        "pred_abs_err_calibrated_median": float(np.median(err1)) if err1 else None,
    }
    return {"header": header, "rows": rows, "records": records}


def print_table(summary):
    h = summary["header"]
    print(f"\n{h['nproc']} x {h['device']}, torch {h['torch']}, triton {h['triton']}; heads {h['heads']}, {h['dtype']}")
    print(f"cost model calibrated: {h['hardware_calibrated']}")
    cols = ("seqlen", "cp", "impl", "ms", "tflops_per_gpu", "efficiency", "comm_hidden", "pred_ms_default",
            "pred_ms_calibrated", "peak_gb_max")
    print(" | ".join(f"{c:>14s}" for c in cols))
    for r in summary["rows"]:
        print(" | ".join(f"{str(r.get(c, '-')):>14s}" for c in cols))


def merge(paths, out_dir):
    """One summary from several result files of the same machine and settings."""
    files = [json.loads(Path(p).read_text()) for p in paths]
    envs = [f["header"] for f in files]
    keys = ("device", "nproc", "torch", "triton", "dtype", "heads", "video")
    for e in envs[1:]:
        diff = [k for k in keys if e.get(k) != envs[0].get(k)]
        if diff:
            sys.exit(f"--merge: {paths[0]} and the other files differ in {diff}; merge only runs of one machine and setting")
    env = {k: envs[0][k] for k in ("date", "host", "device", "nproc", "torch", "triton", "cuda", "nccl", "dtype", "args")}
    env["args"] = dict(env["args"], sizes=sorted({s for e in envs for s in e["args"]["sizes"]}))
    env["merged_from"] = [str(p) for p in paths]
    records = [r for f in files for r in f["records"]]
    summary = summarise(records, env)
    out = Path(out_dir) / (Path(paths[0]).stem + "-merged.json")
    out.write_text(json.dumps(summary, indent=1, default=float))
    print_table(summary)
    print(f"wrote {out}")


def main(argv=None):
    args = parse_args(argv)
    if args.merge:
        return merge(args.merge, args.out)
    import torch
    import torch.multiprocessing as mp

    if args.cpu:
        os.environ["TRITON_INTERPRET"] = "1"
        args.nproc = args.nproc or 2
    else:
        n_gpu = torch.cuda.device_count()
        args.nproc = args.nproc or n_gpu
        if args.nproc < 1 or n_gpu < args.nproc:
            sys.exit(f"--nproc {args.nproc} needs {args.nproc} GPUs, found {n_gpu} (use --cpu for a smoke test)")
    args.cps = sorted(set(args.cps or [c for c in (1, 2, 4, 8) if c <= args.nproc]))
    if args.cps[0] < 1 or args.cps[-1] > args.nproc:
        sys.exit(f"--cps {args.cps} must lie in [1, --nproc={args.nproc}]")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "cpu" if args.cpu else torch.cuda.get_device_name(0).replace(" ", "_")
    tag = f"-{args.tag}" if args.tag else ""
    out_file = out / f"scaling-{name}-{dt.date.today().isoformat()}-{args.nproc}x{tag}.json"
    init = tempfile.mktemp(prefix="maskc-bench-scaling-")
    try:
        mp.spawn(worker, args=(args.nproc, args, init, str(out_file)), nprocs=args.nproc)
    finally:
        if os.path.exists(init):
            os.remove(init)
    print(f"wrote {out_file}")


if __name__ == "__main__":
    main()
