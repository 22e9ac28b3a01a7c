"""Context-parallel training step of the world model's transformer: tokens/s and peak GPU memory per rank.

    python benchmarks/bench_world_cp.py --nproc 8 --tokens 1048576 --config small   # 8 GPUs, NCCL
    python benchmarks/bench_world_cp.py --nproc 1 --tokens 1048576 --config small   # 1-GPU baseline
    python benchmarks/bench_world_cp.py --cpu --nproc 2                              # smoke test (gloo)

One process per GPU (torch.multiprocessing spawn, NCCL). Every rank builds the same packed batch
of at least ``--tokens`` video tokens: samples of ``--n-chunks`` chunks (default: the config's
bundled training config, 4 chunks per sample for ``small``), random latents and noise, a random
flow time per chunk and a random real caption per chunk (`world_model.vocab`). The content is
noise on purpose: the step's time and memory depend only on the shapes and the masks.

Rank r then compiles the context-parallel plan of the packed block-causal mask
(`world_model.parallel.make_cp_context`, timed as ``plan_s``) and times full training steps on
its share of the tokens: forward + loss (`cp_dit_loss`, bf16 autocast on CUDA as in training),
backward (self-attention through maskc's `dist_attention`), `allreduce_grads`, gradient clipping
and the AdamW step of the caption encoder + transformer. ``--warmup`` steps first, then the median
of ``--iters`` steps, each started together (barrier). ``--nproc 1`` is the baseline: no process
group, the plain single-process `train.dit_loss` on the whole sequence (an out-of-memory is caught
and recorded as such).

Per rank it records: local tokens, step time, tokens/s (all the batch's tokens / the step time),
``torch.cuda.max_memory_allocated`` over the timed steps, the plan time, the plan's imbalance and
the key/value tokens the rank receives per attention call (``recv_tokens``), and ``host_layout_s``:
the CPU time each forward spends rebuilding the batch layout (RoPE positions, the masks, the
rank's cross-mask rows), part of every step (both modes) and not overlapped with the GPU. Rank 0 writes
``<out>/world-cp-<device>-<date>-<nproc>x-<tokens>.json`` and prints a table.

``--cpu``: gloo processes and the Triton interpreter (float32), for checking the script, not for
timing; by default the ``tiny`` config (its heads widened to head_dim 64, which the kernels need),
``nproc + 1`` samples (so that the ranks must exchange keys/values), 1 warmup step and 2 timed
steps. Every step's loss (summed over the ranks) is printed: with --cpu they match the
``--nproc 1`` run of the same arguments to float32 rounding (the first step's does not depend on
the model: the output layer starts at zero; the later ones follow AdamW steps).

Reading the numbers: with ``small``'s 4-chunk samples (384 tokens, exactly one aligned dispatch
unit) every sample lands whole on one rank, so the plan moves no keys/values (``recv 0``): the
split is as cheap as data parallelism. Longer samples (``--n-chunks 64``: 6144 tokens each) make
the ranks exchange keys/values and measure the communication too.
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
from dataclasses import replace
from pathlib import Path


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nproc", type=int, default=1,
                    help="ranks = GPUs; 1: the single-GPU baseline without context parallelism (default 1)")
    ap.add_argument("--tokens", type=int, default=None,
                    help="video tokens of the packed batch, at least (rounded up to whole samples); "
                         "default 1048576; with --cpu nproc + 1 samples (so that one is split across ranks)")
    ap.add_argument("--config", default=None,
                    help="model config and its bundled training config: tiny | small (default small; tiny with --cpu)")
    ap.add_argument("--n-chunks", type=int, default=None,
                    help="chunks per packed sample (default: the training config's n_chunks; small: 4)")
    ap.add_argument("--block", type=int, default=128,
                    help="tile size the dispatch chunks are multiples of (default 128; 16 with --cpu)")
    ap.add_argument("--chunk", type=int, default=None,
                    help="tokens per dispatch chunk (default: whole video chunks, see world_model.parallel)")
    ap.add_argument("--stages", type=int, default=None, help="remote stages of the plan (default: the planner's)")
    ap.add_argument("--amp", choices=("bf16", "fp32"), default="bf16",
                    help="autocast on CUDA: bf16 (as training) or fp32 (attention still runs in bf16); CPU: fp32")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 2; 1 with --cpu)")
    ap.add_argument("--iters", type=int, default=None, help="timed steps, the median is reported (default 5; 2 with --cpu)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cpu", action="store_true", help="gloo + Triton interpreter smoke test (tiny sizes)")
    ap.add_argument("--out", default="benchmarks/results", help="directory of the JSON result")
    ap.add_argument("--profile", action="store_true",
                    help="after timing, profile one more step with torch.profiler on rank 0 and print the ops that "
                         "take the most CPU and GPU time (where a step's time goes)")
    args = ap.parse_args(argv)
    if args.nproc < 1:
        ap.error("--nproc must be >= 1")
    args.config = args.config or ("tiny" if args.cpu else "small")
    args.warmup = args.warmup if args.warmup is not None else (1 if args.cpu else 2)
    args.iters = args.iters if args.iters is not None else (2 if args.cpu else 5)
    if args.iters < 1 or args.warmup < 0:
        ap.error("--iters must be >= 1 and --warmup >= 0")
    if args.cpu:
        args.block = 16
    return args


def model_config(args):
    """The model config; with --cpu, heads widened to head_dim 64 when the config's is not a kernel head dim."""
    from maskc.world_model.configs import get_config
    from maskc.world_model.dit import KERNEL_HEAD_DIMS

    cfg = get_config(args.config)
    if args.cpu and cfg.head_dim not in KERNEL_HEAD_DIMS and cfg.dim % 64 == 0:
        heads = cfg.dim // 64
        scale = 64 // cfg.head_dim
        cfg = replace(cfg, name=f"{cfg.name}-hd64", heads=heads, kv_heads=min(cfg.kv_heads, heads),
                      rope_split=tuple(p * scale for p in cfg.rope_split))
    return cfg


def batch_shape(args) -> tuple[int, int]:
    """(chunks per sample, requested tokens) after the defaults."""
    from maskc.world_model.train import load_train_config

    n_chunks = args.n_chunks or load_train_config(args.config).n_chunks
    if args.tokens is not None:
        return n_chunks, args.tokens
    if args.cpu:
        return n_chunks, (args.nproc + 1) * n_chunks * model_config(args).tokens_per_chunk
    return n_chunks, 1 << 20


def build_batch(cfg, n_tokens: int, n_chunks: int, seed: int, device):
    """A packed batch of >= n_tokens video tokens: samples of n_chunks chunks, random content, real captions."""
    import numpy as np
    import torch

    from maskc.world_model import vocab
    from maskc.world_model.train import Packed

    per_sample = n_chunks * cfg.tokens_per_chunk
    n_samples = max(1, -(-n_tokens // per_sample))
    total = n_samples * n_chunks
    lf, ls, c = cfg.latent_frames, cfg.latent_size, cfg.latent_channels
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(total * lf, ls, ls, c, generator=g)
    noise = torch.randn(total * lf, ls, ls, c, generator=g)
    t_frames = (torch.rand(total, generator=g) * 0.999).repeat_interleave(lf)
    rng = np.random.default_rng(seed)
    captions = [vocab.format_caption(vocab.COLOURS[rng.integers(len(vocab.COLOURS))],
                                     vocab.SHAPES[rng.integers(len(vocab.SHAPES))],
                                     vocab.MOTIONS[rng.integers(len(vocab.MOTIONS))]) for _ in range(total)]
    tokens = torch.from_numpy(vocab.encode_batch(captions))
    return Packed(latents.to(device), t_frames.to(device), noise.to(device), tokens.to(device),
                  (n_chunks,) * n_samples, (0,) * n_samples, [])


def worker(rank, args, init_file, out_file):
    if args.cpu:
        os.environ["TRITON_INTERPRET"] = "1"
    import torch
    import torch.distributed as dist

    from maskc.world_model import train as TR
    from maskc.world_model.dit import WorldModel
    from maskc.world_model.parallel import allreduce_grads, cp_dit_loss, make_cp_context

    world = args.nproc
    if args.cpu:
        device = torch.device("cpu")
        torch.set_num_threads(1)
    else:
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
    distributed = world > 1
    if distributed:
        dist.init_process_group("gloo" if args.cpu else "nccl", init_method=f"file://{init_file}", rank=rank,
                                world_size=world, **({} if args.cpu else {"device_id": device}))

    def barrier():
        if distributed:
            dist.barrier(**({} if args.cpu else {"device_ids": [rank]}))

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    tcfg = TR.load_train_config(args.config)
    cfg = model_config(args)
    n_chunks, n_tokens = batch_shape(args)
    packed = build_batch(cfg, n_tokens, n_chunks, args.seed, device)
    seq = packed.n_chunks * cfg.tokens_per_chunk
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        model = WorldModel(cfg)
    model = model.to(device)
    model.vae.requires_grad_(False)
    trainable = TR._DiTParams(model)
    trainable.requires_grad_(True).train()
    opt = TR.make_optimizer(trainable, tcfg, tcfg.lr_dit)
    use_bf16 = device.type == "cuda" and args.amp == "bf16"

    result = {"rank": rank}
    cp = None
    if distributed:
        t0 = time.perf_counter()
        cp = make_cp_context(packed.video_chunks, cfg, cp_size=world, rank=rank, block=args.block,
                             chunk=args.chunk, stages=args.stages)
        result["plan_s"] = time.perf_counter() - t0
        result["local_tokens"] = cp.n_local
        result["recv_tokens"] = cp.plan.recv_tokens[rank]
    else:
        result.update(plan_s=0.0, local_tokens=seq, recv_tokens=0)

    # host-side work every forward redoes from the batch layout (positions, masks, this rank's
    # cross-mask rows): CPU time that is part of each step, reported to read the step time against
    from maskc.world_model import masks
    from maskc.world_model.dit import positions

    lens = (packed.tokens != 0).sum(1).tolist()
    t0 = time.perf_counter()
    positions(packed.video_chunks, packed.chunk_offsets, cfg)
    masks.self_attention_mask(packed.video_chunks, cfg.tokens_per_chunk)
    masks.cross_attention_mask(packed.video_chunks, cfg.tokens_per_chunk, lens,
                               None if cp is None else cp.plan.dispatch.rank_runs(rank))
    result["host_layout_s"] = time.perf_counter() - t0

    losses = []

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            loss = cp_dit_loss(model, packed, cp) if cp is not None else TR.dit_loss(model, packed)
        loss.backward()
        allreduce_grads(trainable)
        if tcfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(trainable.parameters(), tcfg.grad_clip)
        opt.step()
        losses.append(loss.detach())

    if device.type == "cuda":
        sync()
        result["static_memory_gib"] = torch.cuda.memory_allocated(device) / 2**30
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    try:
        for i in range(args.warmup + args.iters):
            barrier()
            sync()
            t0 = time.perf_counter()
            step()
            sync()
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
    except torch.cuda.OutOfMemoryError as e:
        if distributed:
            raise  # the other ranks are stuck in a collective: let spawn stop them all
        result["oom"] = str(e).splitlines()[0]
    if args.profile and times:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=acts, with_stack=True) as prof:
            barrier()
            step()
            sync()
        if rank == 0:
            table = prof.key_averages()
            text = [table.table(sort_by="self_cpu_time_total", row_limit=40),
                    prof.key_averages(group_by_stack_n=6).table(sort_by="self_cpu_time_total", row_limit=30)]
            if device.type == "cuda":
                text.append(table.table(sort_by="self_device_time_total", row_limit=25))
            Path(args.out).mkdir(parents=True, exist_ok=True)
            prof_file = Path(args.out) / f"profile-world-cp-{world}x-rank0.txt"
            prof_file.write_text("\n\n".join(text))
            print(text[0], flush=True)
            print(f"profile tables: {prof_file}", flush=True)
    if times:
        result["step_s"] = statistics.median(times)
        result["step_all_s"] = times
        result["tokens_per_s"] = seq / result["step_s"]
    if device.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        result["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
    summed = torch.stack(losses).float() if losses else torch.zeros(0, device=device)
    if distributed:
        dist.all_reduce(summed)  # the ranks' shares add up to the batch's loss
    result["losses"] = summed.tolist()

    gathered = [None] * world
    if distributed:
        dist.all_gather_object(gathered, result)
    else:
        gathered = [result]
    if rank == 0:
        write_summary(args, cfg, packed, seq, n_tokens, cp, gathered, device, out_file)
    if distributed:
        dist.destroy_process_group()


def write_summary(args, cfg, packed, seq, n_tokens, cp, ranks, device, out_file):
    import torch

    done = [r for r in ranks if "step_s" in r]
    step = max(r["step_s"] for r in done) if len(done) == len(ranks) else None
    summary = {
        "benchmark": "world-cp",
        "date": dt.date.today().isoformat(),
        "host": platform.node(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "nproc": args.nproc,
        "config": cfg.name,
        "model": {"dim": cfg.dim, "depth": cfg.depth, "heads": cfg.heads, "kv_heads": cfg.kv_heads,
                  "head_dim": cfg.head_dim, "tokens_per_chunk": cfg.tokens_per_chunk},
        "tokens_requested": n_tokens,
        "tokens": seq,
        "samples": len(packed.video_chunks),
        "chunks_per_sample": packed.video_chunks[0],
        "caption_tokens": int((packed.tokens != 0).sum()),
        "amp": "bf16" if (device.type == "cuda" and args.amp == "bf16") else "fp32",
        "content": "random latents and noise (timing and memory do not depend on content)",
        "step": "forward + loss, backward, allreduce_grads, grad clip, AdamW (caption encoder + transformer)",
        "warmup": args.warmup,
        "iters": args.iters,
        "plan": cp.plan.summary() if cp is not None else None,
        "step_ms": round(step * 1e3, 3) if step else None,
        "tokens_per_s": round(seq / step, 1) if step else None,
        "peak_memory_gib_max": max((r.get("peak_memory_gib", 0.0) for r in ranks), default=0.0),
        "oom": any("oom" in r for r in ranks),
        "ranks": ranks,
    }
    Path(out_file).write_text(json.dumps(summary, indent=1, default=float))
    print(f"{args.nproc} x {summary['device']}: {seq:,} tokens ({summary['samples']} samples of "
          f"{summary['chunks_per_sample']} chunks), model {cfg.name}, {summary['amp']}")
    if cp is not None:
        print(f"  plan: {cp.plan!r}")
    print(f"  {'rank':>4} {'tokens':>9} {'step ms':>10} {'tokens/s':>12} {'peak GiB':>9} {'recv':>9} {'plan s':>7} "
          f"{'host ms':>8}")
    for r in ranks:
        ms = f"{r['step_s'] * 1e3:10.1f}" if "step_s" in r else f"{'OOM' if 'oom' in r else '-':>10}"
        tps = f"{seq / r['step_s']:12,.0f}" if "step_s" in r else f"{'-':>12}"
        mem = f"{r['peak_memory_gib']:9.2f}" if "peak_memory_gib" in r else f"{'-':>9}"
        print(f"  {r['rank']:>4} {r['local_tokens']:>9,} {ms} {tps} {mem} {r['recv_tokens']:>9,} {r['plan_s']:7.2f} "
              f"{r['host_layout_s'] * 1e3:8.1f}")
    if step:
        print(f"  step {step * 1e3:.1f} ms (slowest rank) -> {seq / step:,.0f} tokens/s; "
              f"losses {', '.join(f'{x:.5f}' for x in ranks[0]['losses'])}")
    elif summary["oom"]:
        print("  out of memory: " + next(r["oom"] for r in ranks if "oom" in r))


def main(argv=None):
    args = parse_args(argv)
    if args.cpu:
        os.environ["TRITON_INTERPRET"] = "1"
    import torch
    import torch.multiprocessing as mp

    if not args.cpu and torch.cuda.device_count() < args.nproc:
        sys.exit(f"--nproc {args.nproc} needs {args.nproc} GPUs, found {torch.cuda.device_count()} "
                 "(use --cpu for a smoke test)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "cpu" if args.cpu else torch.cuda.get_device_name(0).replace(" ", "_")
    _, tokens = batch_shape(args)
    out_file = out / f"world-cp-{name}-{dt.date.today().isoformat()}-{args.nproc}x-{tokens}.json"
    init = tempfile.mktemp(prefix="maskc-bench-world-cp-")
    try:
        if args.nproc == 1:
            worker(0, args, init, str(out_file))
        else:
            mp.spawn(worker, args=(args, init, str(out_file)), nprocs=args.nproc)
    finally:
        if os.path.exists(init):
            os.remove(init)
    print(f"wrote {out_file}")


if __name__ == "__main__":
    main()
