"""World-model evaluation benchmark: `magi eval`'s metrics at fixed settings, on this machine's CPU.

    python benchmarks/bench_world.py [--out benchmarks/results] [--weights PATH]

Fixed settings: held-out seeds 0 1, 4-chunk videos (prompt following with a mid-video direction
change), 16-chunk image-to-video (object persistence), 2+2-chunk continuation, memory at 4, 16 and
64 chunks, one torch thread,
the generator's default steps. Writes ``world-<host>-<date>.json`` and prints a table
(the same as ``magi eval --seeds 0 1 --chunks 4 --memory-chunks 4 16 64``; about 5 minutes on a 2-core CPU).
Each memory length runs in a fresh process with glibc's mmap threshold held fixed
(`evaluate.measure_memory_isolated`: the peak RSS then follows what the generation holds, not the
allocator's history); those runs are slower and are not counted in the throughput.

    python benchmarks/bench_world.py --gpu       # on a GPU machine: peak GPU memory and frames/s only

``--gpu`` generates 4, 16 and 64 chunks with the model on the GPU (FFA kernels, bf16) and records
the allocator's peak for each (the constant-memory target: 64 chunks / 4 chunks <= 1.02) and the
frames per second; then the frame rate of 16 chunks with each tick's guidance branches packed into
one transformer call replayed from a CUDA graph (the default on a GPU), packed and run eagerly, and
run one call each, in turn, ``--reps`` timed runs of each after a warm-up (medians); writes
``world-gpu-<device>-<date>.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import re
import sys
import time
from pathlib import Path

SEEDS = (0, 1)
CHUNKS = 4
MEMORY_CHUNKS = (4, 16, 64)
THREADS = 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"), help="results folder")
    ap.add_argument("--weights", help="checkpoint (default: the shipped small model)")
    ap.add_argument("--gpu", action="store_true", help="GPU memory and throughput of generation only")
    ap.add_argument("--reps", type=int, default=3, help="--gpu: timed runs of each branch layout (default 3)")
    args = ap.parse_args(argv)
    if args.reps < 1:
        ap.error(f"--reps must be >= 1, got {args.reps}")
    if args.gpu:
        return gpu_memory(args)

    import torch

    from maskc.world_model import evaluate as EV

    torch.set_num_threads(THREADS)
    t0 = time.perf_counter()
    res = EV.evaluate(args.weights, seeds=SEEDS, chunks=CHUNKS, memory_chunks=MEMORY_CHUNKS,
                      log=lambda m: print(m, file=sys.stderr))
    host = re.sub(r"[^A-Za-z0-9_.-]+", "_", platform.node() or "host")
    date = dt.date.today().isoformat()
    res["host"] = {"node": platform.node(), "machine": platform.machine(), "processor": platform.processor(),
                   "python": platform.python_version(), "torch": torch.__version__, "date": date}
    res["command"] = "python benchmarks/bench_world.py"
    res["wall_seconds"] = time.perf_counter() - t0
    print(EV.format_table(res))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"world-{host}-{date}.json"
    path.write_text(json.dumps(res, indent=1, default=str))
    print(f"wrote {path} ({res['wall_seconds']:.0f} s)")
    return 0


def gpu_memory(args) -> int:
    import torch

    from maskc.world_model import evaluate as EV
    from maskc.world_model.generate import DEFAULT_STEPS, load_model
    from maskc.world_model.graphs import drop_graphs

    if not torch.cuda.is_available():
        sys.exit("--gpu needs a CUDA device")
    model, meta = load_model(args.weights, device="cuda")
    EV.measure_memory(model, meta, 2, steps=DEFAULT_STEPS)  # compile the kernels first
    rows = []
    for n in MEMORY_CHUNKS:
        drop_graphs(model)  # each length captures its own CUDA graphs, as a fresh process would
        r = EV.measure_memory(model, meta, n, steps=DEFAULT_STEPS)
        rows.append(r)
        print(f"{n:3d} chunks: peak GPU {r['peak_gpu_mb']:.1f} MB ({r['peak_gpu_reserved_mb']:.0f} MB reserved), "
              f"{r['fps']:.1f} frames/s, "
              f"KV cache {r['kv_cache_bytes'] / 2**20:.2f} MB", flush=True)
    date = dt.date.today().isoformat()
    dev = torch.cuda.get_device_name(0)
    res = {"benchmark": "world-gpu", "device": dev, "torch": torch.__version__, "date": date,
           "steps": DEFAULT_STEPS, "memory": rows,
           "peak_ratio_64_4": rows[-1]["peak_gpu_mb"] / rows[0]["peak_gpu_mb"],
           "command": "python benchmarks/bench_world.py --gpu"}
    print(f"peak GPU memory ratio {MEMORY_CHUNKS[-1]}/{MEMORY_CHUNKS[0]} chunks: {res['peak_ratio_64_4']:.4f}")
    res["branches"] = branch_layouts(model, meta, MEMORY_CHUNKS[1], args.reps)
    res["command"] += f" --reps {args.reps}" if args.reps != 3 else ""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"world-gpu-{dev.replace(' ', '_')}-{date}.json"
    path.write_text(json.dumps(res, indent=1, default=str))
    print(f"wrote {path}")
    return 0


def branch_layouts(model, meta, n_chunks: int, reps: int) -> dict:
    """Frames/s of ``n_chunks`` chunks with the guidance branches packed into CUDA graphs, packed, and separate,
    in turn (a warm-up of each first: the graphs are captured there); per layout every run's frames/s, the
    median, transformer calls and branch passes."""
    import numpy as np
    import torch

    from maskc.world_model.evaluate import measure_memory
    from maskc.world_model.generate import DEFAULT_STEPS

    out = {}
    for rep in range(reps + 1):
        for name, pack, graphs in (("graphs", True, True), ("packed", True, False), ("separate", False, False)):
            r = measure_memory(model, meta, n_chunks, steps=DEFAULT_STEPS, seed=rep, pack_branches=pack,
                               cuda_graphs=graphs)
            o = out.setdefault(name, {"fps": [], "peak_gpu_mb": [], "model_calls": r["model_calls"],
                                      "branch_passes": r["branch_passes"]})
            if rep:
                o["fps"].append(r["fps"])
                o["peak_gpu_mb"].append(r["peak_gpu_mb"])
    for name, o in out.items():
        o["median_fps"] = float(np.median(o["fps"]))
        print(f"{n_chunks} chunks, branches {name}: median {o['median_fps']:.1f} frames/s over {reps} runs, "
              f"{o['model_calls']} transformer calls for {o['branch_passes']} branch passes, "
              f"peak GPU {max(o['peak_gpu_mb']):.1f} MB", flush=True)
    torch.cuda.synchronize()
    return {"chunks": n_chunks, "reps": reps, **out,
            "speedup_packed": out["packed"]["median_fps"] / out["separate"]["median_fps"],
            "speedup_graphs": out["graphs"]["median_fps"] / out["separate"]["median_fps"]}


if __name__ == "__main__":
    sys.exit(main())
