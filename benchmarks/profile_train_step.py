"""Where a world-model training step spends its time: data, autoencoder, packing, forward, backward, optimizer.

Runs the transformer phase of `magi train` (randomly initialised networks: the time per step does not
depend on the weights) for ``--steps`` steps and times each part with a device synchronisation
around it, then prints the median per part and the step rate. ``--workers`` data processes feed the
batches as in training; ``--pool`` instead reuses a fixed set of pre-generated batches, which shows
what the step costs when data is free. Optionally a `torch.profiler` table of one step.

    python benchmarks/profile_train_step.py --device cuda --workers 14 --steps 40
    python benchmarks/profile_train_step.py --device cuda --pool 8 --model '{"dim": 256, "depth": 6}'
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time

import numpy as np
import torch

from maskc.world_model import train as T
from maskc.world_model.configs import get_config
from maskc.world_model.dit import WorldModel, param_counts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="small", help="training config name or JSON file (default small)")
    ap.add_argument("--model", default=None, help="JSON object of ModelConfig fields to override")
    ap.add_argument("--batch", type=int, default=None, help="clips per step (default: the config's)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=30, help="timed steps (after 5 warm-up steps)")
    ap.add_argument("--workers", type=int, default=0, help="data worker processes (as in training)")
    ap.add_argument("--pool", type=int, default=0, help="reuse this many pre-generated batches (data free)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the transformer blocks and the encoder (as training does)")
    ap.add_argument("--profile", action="store_true", help="print a torch.profiler table of one step")
    ap.add_argument("--json", default=None, help="write the medians here")
    args = ap.parse_args(argv)

    tcfg = T.load_train_config(args.config)
    mcfg = get_config(tcfg.model) if isinstance(tcfg.model, str) else tcfg.model_config()
    if args.model:
        mcfg = dataclasses.replace(mcfg, name="custom", **json.loads(args.model))
    batch = args.batch or tcfg.batch
    tcfg = dataclasses.replace(tcfg, model=mcfg.to_dict(), batch=batch)
    dev = torch.device(args.device)
    torch.manual_seed(0)
    model = WorldModel(mcfg).to(dev)
    model.vae.requires_grad_(False).eval()
    trainable = T._DiTParams(model)
    opt = T.make_optimizer(trainable, tcfg, tcfg.lr_dit)
    print(f"model: {param_counts(model)}; batch {batch} clips x {tcfg.n_chunks} chunks; device {dev}")
    if args.compile:
        T.compile_for_training(model)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    pool = [T._batch_arrays(11, i, tcfg.n_chunks, batch) for i in range(args.pool)] if args.pool else None
    src = None if pool else T.BatchSource(5, tcfg.n_chunks, batch, 0, args.workers)
    parts = {k: [] for k in ("data", "encode", "pack", "forward", "backward", "optimizer", "step")}
    try:
        for s in range(args.steps + 5):
            t = [time.perf_counter()]
            frames, tokens, fg = pool[s % len(pool)] if pool else src.get()
            t.append(time.perf_counter())
            latents = T.encode_batch(model, frames, dev, tcfg)
            sync(); t.append(time.perf_counter())
            rng = np.random.default_rng([0, s])
            samples = T.plan_samples(rng, batch, tcfg.n_chunks, tcfg)
            packed = T.pack_batch(latents, tokens, samples, mcfg, torch.Generator(device=dev).manual_seed(s), fg)
            sync(); t.append(time.perf_counter())
            prof = None
            if args.profile and s == 4:
                prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]
                                              + ([torch.profiler.ProfilerActivity.CUDA] if dev.type == "cuda" else []))
                prof.__enter__()
            with T._autocast(dev, tcfg):
                loss = T.dit_loss(model, packed, tcfg.attn_window)
            sync(); t.append(time.perf_counter())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            sync(); t.append(time.perf_counter())
            T._clip(trainable.parameters(), tcfg.grad_clip)
            opt.step()
            float(loss.detach())
            sync(); t.append(time.perf_counter())
            if prof is not None:
                prof.__exit__(None, None, None)
                key = "cuda_time_total" if dev.type == "cuda" else "cpu_time_total"
                print(prof.key_averages().table(sort_by=key, row_limit=25))
            if s >= 5:
                for k, a, b in zip(parts, t[:-1], t[1:]):
                    parts[k].append(b - a)
                parts["step"].append(t[-1] - t[0])
    finally:
        if src is not None:
            src.close()
    med = {k: statistics.median(v) * 1e3 for k, v in parts.items()}
    n_tok = batch * tcfg.n_chunks * mcfg.tokens_per_chunk
    print(" | ".join(f"{k} {v:.1f} ms" for k, v in med.items()))
    print(f"{n_tok} tokens per step: {n_tok / med['step'] * 1e3:,.0f} tokens/s, {1e3 / med['step']:.1f} steps/s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": mcfg.to_dict(), "batch": batch, "workers": args.workers, "pool": args.pool,
                       "compile": args.compile, "device": str(dev), "median_ms": med}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
