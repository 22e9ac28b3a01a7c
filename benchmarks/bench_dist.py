"""Context-parallel attention on N GPUs vs 1 GPU: forward + backward time and hidden communication.

    python benchmarks/bench_dist.py --nproc 2 --tokens 262144            # N GPUs, NCCL
    python benchmarks/bench_dist.py --nproc 2 --tokens 96 --cpu           # smoke test: gloo + interpreter

The mask is `magi_video` (MAGI-1's packed block-causal video mask): ``--tokens`` split into videos
of ``--video-chunks`` chunks of ``--chunk-tokens`` tokens. One process per GPU (torch.multiprocessing,
NCCL). Rank 0 first times the single-GPU `attention` forward + backward over the whole mask; then
every rank times `dist_attention` forward + backward on its shard, and also, on the same shapes,
(a) its stages' compute alone (no communication) and (b) its communication alone (the GroupCast
of every stage forward, the GroupReduce backward). The hidden fraction of communication is
``1 - max(0, t_total - t_compute) / t_comm`` (slowest rank). Writes
``dist-<gpu>-<date>.json`` with per-rank times, the speed-up (target >= 1.9x on 2 GPUs) and the
cost model's prediction for the same plan. ``--check`` also compares the distributed output and
gradients with the single-GPU run (relative error, informative: both are bf16).
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


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nproc", type=int, default=2, help="number of GPUs (processes)")
    ap.add_argument("--tokens", type=int, default=262144)
    ap.add_argument("--chunk-tokens", type=int, default=8192, help="tokens per video chunk (latent frame group)")
    ap.add_argument("--video-chunks", type=int, default=32,
                    help="chunks per video (default: 256k tokens = one 32-chunk video, so the ranks must communicate)")
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--stages", type=int, default=None, help="remote stages (default: the planner's)")
    ap.add_argument("--block", type=int, default=128, help="dispatch chunk granularity (tile size)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--check", action="store_true", help="compare with the single-GPU result")
    ap.add_argument("--cpu", action="store_true", help="gloo + Triton interpreter smoke test (tiny sizes)")
    ap.add_argument("--out", default="benchmarks/results")
    return ap.parse_args(argv)


def build_mask(args):
    import maskc

    if args.cpu:
        t = max(args.tokens // (2 * args.video_chunks), 1)
        return maskc.magi_video([args.video_chunks] * max(args.tokens // (args.video_chunks * t), 1), t)
    per_video = args.video_chunks * args.chunk_tokens
    n_videos = max(args.tokens // per_video, 1)
    rest = args.tokens - n_videos * per_video
    counts = [args.video_chunks] * n_videos
    if rest >= args.chunk_tokens:
        counts.append(rest // args.chunk_tokens)
    return maskc.magi_video(counts, args.chunk_tokens)


class Timer:
    """Wall time of a callable, synchronised on CUDA; median over iterations."""

    def __init__(self, device):
        self.device = device

    def sync(self):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __call__(self, fn, warmup, iters, barrier=None):
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(iters):
            if barrier:
                barrier()
            self.sync()
            t0 = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - t0)
        return statistics.median(times), times


def worker(rank, args, init_file, out_file):
    if args.cpu:
        os.environ["TRITON_INTERPRET"] = "1"
    import torch
    import torch.distributed as dist

    from maskc.cost import Hardware, Workload, simulate
    from maskc.plan import compile as compile_plan
    from maskc.runtime import attention
    from maskc.runtime.dist import dispatch, dist_attention, group_cast, group_reduce, rank_layout

    world = args.nproc
    if args.cpu:
        device = torch.device("cpu")
        backend, dtype = "gloo", torch.float32
        torch.set_num_threads(1)
    else:
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
        backend, dtype = "nccl", torch.bfloat16
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world,
                            **({"device_id": device} if device.type == "cuda" else {}))
    barrier = (lambda: dist.barrier(device_ids=[rank])) if device.type == "cuda" else dist.barrier

    mask = build_mask(args)
    s = mask.sq
    t0 = time.perf_counter()
    plan = compile_plan(mask, cp_size=world, stages=args.stages, block=16 if args.cpu else args.block)
    plan_s = time.perf_counter() - t0
    hq, hkv, d = args.heads, args.kv_heads, args.head_dim
    g = torch.Generator(device="cpu").manual_seed(0)
    q = torch.randn(s, hq, d, generator=g).to(device, dtype)
    k = torch.randn(s, hkv, d, generator=g).to(device, dtype)
    v = torch.randn(s, hkv, d, generator=g).to(device, dtype)
    dout = torch.randn(s, hq, d, generator=g).to(device, dtype)
    timer = Timer(device)
    result = {"rank": rank, "plan_s": plan_s}

    # ---- 1 GPU: the whole mask on rank 0 -------------------------------------------------------
    single = {}
    if rank == 0:
        def one():
            qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
            out = attention(qq, kk, vv, mask)
            out.backward(dout)
            single["out"], single["grads"] = out.detach(), (qq.grad, kk.grad, vv.grad)

        result["single_s"], result["single_all"] = timer(one, args.warmup, args.iters)
    barrier()

    # ---- N GPUs: dist_attention on the shard -----------------------------------------------------
    ql, kl, vl, dl = (dispatch(t, plan) for t in (q, k, v, dout))
    holder = {}

    def step():
        qq, kk, vv = (t.detach().requires_grad_() for t in (ql, kl, vl))
        out = dist_attention(qq, kk, vv, plan)
        out.backward(dl)
        holder["out"], holder["grads"] = out.detach(), (qq.grad, kk.grad, vv.grad)

    result["dist_s"], result["dist_all"] = timer(step, args.warmup, args.iters, barrier)

    # ---- the same stages' compute alone, and the communication alone ---------------------------
    lay = rank_layout(plan, rank)
    kv_local = torch.stack([kl, vl], dim=1)
    recv_bufs = [kv_local.new_empty((sum(lay.recv_splits[i]),) + tuple(kv_local.shape[1:])).normal_()
                 for i in range(plan.stages)]

    def compute_only():
        qq = ql.detach().requires_grad_()
        outs = []
        for st, m in enumerate(lay.masks):
            if st == 0:
                kk, vv = kl.detach().requires_grad_(), vl.detach().requires_grad_()
            else:
                if recv_bufs[st - 1].shape[0] == 0:
                    continue
                buf = recv_bufs[st - 1].detach().requires_grad_()
                kk, vv = buf[:, 0], buf[:, 1]
            outs.append(attention(qq, kk, vv, m))
        torch.autograd.backward(outs, [dl] * len(outs))

    rows = [torch.as_tensor(r.copy(), device=device) for r in lay.send_rows]

    def comm_only():
        got = [group_cast(kv_local, rows[i], lay.send_splits[i], lay.recv_splits[i]) for i in range(plan.stages)]
        for i in range(plan.stages):
            group_reduce(got[i], rows[i], lay.send_splits[i], lay.recv_splits[i], lay.n_local)

    result["compute_s"], _ = timer(compute_only, args.warmup, args.iters, barrier)
    result["comm_s"], _ = timer(comm_only, args.warmup, args.iters, barrier)
    result["tokens"] = lay.n_local
    result["recv_tokens"] = plan.recv_tokens[rank]

    if args.check:
        pos = torch.as_tensor(plan.positions(rank).copy(), device=device)
        from maskc.runtime.dist import undispatch

        full = undispatch(holder["out"], plan)
        if rank == 0:
            ref = single["out"].float()
            result["check_out_rel"] = ((full.float() - ref).norm() / ref.norm()).item()
        # gradients: rank 0 scatters the single-GPU grads' rows to compare (broadcast the full ones)
        for name, mine, i in (("dq", holder["grads"][0], 0), ("dk", holder["grads"][1], 1), ("dv", holder["grads"][2], 2)):
            ref = single["grads"][i] if rank == 0 else torch.empty((s,) + tuple(mine.shape[1:]), device=device, dtype=mine.dtype)
            dist.broadcast(ref, 0)
            r = ref.index_select(0, pos).float()
            result[f"check_{name}_rel"] = ((mine.float() - r).norm() / r.norm().clamp_min(1e-30)).item()

    gathered = [None] * world
    dist.all_gather_object(gathered, result)
    if rank == 0:
        est = simulate(plan, Hardware(), Workload(hq=hq, hkv=hkv, head_dim=d))
        t_total = max(r["dist_s"] for r in gathered)
        exposed = max(max(r["dist_s"] - r["compute_s"], 0.0) for r in gathered)
        t_comm = max(r["comm_s"] for r in gathered)
        summary = {
            "benchmark": "dist",
            "date": dt.date.today().isoformat(),
            "host": platform.node(),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "nproc": world,
            "tokens": s,
            "mask": repr(mask).splitlines()[0],
            "heads": [hq, hkv, d],
            "dtype": str(dtype),
            "plan": plan.summary(),
            "single_ms": round(gathered[0]["single_s"] * 1e3, 3),
            "dist_ms": round(t_total * 1e3, 3),
            "speedup": round(gathered[0]["single_s"] / t_total, 3) if t_total else None,
            "compute_ms_max": round(max(r["compute_s"] for r in gathered) * 1e3, 3),
            "comm_ms_max": round(t_comm * 1e3, 3),
            "comm_hidden_fraction": round(min(max(1.0 - exposed / t_comm, 0.0), 1.0), 4) if t_comm > 0 else 1.0,
            "predicted": est.summary(),
            "ranks": gathered,
        }
        Path(out_file).write_text(json.dumps(summary, indent=1, default=float))
        print(f"{world} x {summary['device']}: {s} tokens magi_video, heads {hq}/{hkv} x {d}, {dtype}")
        print(f"  plan: {plan!r}")
        print(f"  1 GPU  fwd+bwd: {summary['single_ms']:10.2f} ms")
        print(f"  {world} GPUs fwd+bwd: {summary['dist_ms']:10.2f} ms  -> speed-up {summary['speedup']:.2f}x")
        print(f"  compute alone (max rank) {summary['compute_ms_max']:.2f} ms, communication alone "
              f"{summary['comm_ms_max']:.2f} ms, hidden {100 * summary['comm_hidden_fraction']:.1f}%")
        if args.check:
            for key in ("check_out_rel", "check_dq_rel", "check_dk_rel", "check_dv_rel"):
                vals = [r[key] for r in gathered if key in r]
                print(f"  {key}: max {max(vals):.3e}")
    dist.destroy_process_group()


def main(argv=None):
    args = parse_args(argv)
    import torch
    import torch.multiprocessing as mp

    if not args.cpu and torch.cuda.device_count() < args.nproc:
        sys.exit(f"--nproc {args.nproc} needs {args.nproc} GPUs, found {torch.cuda.device_count()} (use --cpu for a smoke test)")
    if args.cpu:
        os.environ["TRITON_INTERPRET"] = "1"
        args.head_dim = 64 if args.head_dim not in (64, 128, 256) else args.head_dim
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "cpu" if args.cpu else torch.cuda.get_device_name(0).replace(" ", "_")
    out_file = out / f"dist-{name}-{dt.date.today().isoformat()}-{args.nproc}x-{args.tokens}.json"
    init = tempfile.mktemp(prefix="maskc-bench-dist-")
    try:
        mp.spawn(worker, args=(args, init, str(out_file)), nprocs=args.nproc)
    finally:
        if os.path.exists(init):
            os.remove(init)
    print(f"wrote {out_file}")


if __name__ == "__main__":
    main()
