"""Where a fresh process's first video goes (issue: world model): the same video generated twice in one
process, with the runtime's first-use work timed apart.

On an H200 the README's 8-chunk video took 9.4 s in a fresh process against about 0.7 s in a warmed one
(session 38), with CUDA graphs on or off. This script splits that time: importing, loading the model,
then each video chunk by chunk, and, inside them, the host time spent in the runtime's steps that run
once per new mask or kernel spec:

    choose_config   picking each mask's tile sizes (`maskc.codegen.configs.choose_config`)
    plan_for        lowering a mask to tiles (`maskc.runtime.ffa.plan_for`; part of choose_config's time)
    get_kernel      rendering and importing a Triton kernel's source (`maskc.runtime.kernels.get_kernel`)
    launch          every Triton launch (`maskc.runtime.ffa._launch`; a spec's first one compiles it)
    cutlass_kernel  finding a built CUTLASS kernel for a call (`maskc.runtime.ffa._cutlass_kernel`)
    capture         capturing CUDA graphs (`world_model.graphs.GraphedBlocks._capture`)

Each is counted (calls) and timed inclusively (a nested step's time is also in its caller's). The
second video repeats the first exactly: what it saves is the first-use work.

    python benchmarks/world_first_use.py --device cuda            # the README's video, on the GPU
    python benchmarks/world_first_use.py --device cpu --chunks 2  # the same split on the CPU
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

_T0 = time.perf_counter()

PROMPT = "the red circle moves right"
STEPS = ("choose_config", "plan_for", "get_kernel", "launch", "cutlass_kernel", "capture")


def _timed(totals: dict, name: str, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            entry = totals.setdefault(name, {"calls": 0, "seconds": 0.0})
            entry["calls"] += 1
            entry["seconds"] += time.perf_counter() - t0
    return wrapper


def instrument(totals: dict) -> None:
    """Wrap the runtime's first-use steps (module attributes, as the callers look them up) with timers."""
    from maskc.runtime import ffa
    from maskc.world_model import graphs

    ffa.choose_config = _timed(totals, "choose_config", ffa.choose_config)
    ffa.plan_for = _timed(totals, "plan_for", ffa.plan_for)
    ffa.get_kernel = _timed(totals, "get_kernel", ffa.get_kernel)
    ffa._launch = _timed(totals, "launch", ffa._launch)
    ffa._cutlass_kernel = _timed(totals, "cutlass_kernel", ffa._cutlass_kernel)
    graphs.GraphedBlocks._capture = _timed(totals, "capture", graphs.GraphedBlocks._capture)


def video(model, meta, chunks: int, steps: int, seed: int, totals: dict) -> dict:
    """One video chunk by chunk: seconds per chunk (the device synchronised) and the first-use steps' share."""
    import torch

    from maskc.world_model.generate import generate_chunks

    before = {k: dict(v) for k, v in totals.items()}
    cuda = next(model.parameters()).device.type == "cuda"
    stream = generate_chunks(model, [PROMPT], n_chunks=chunks, steps=steps, seed=seed, meta=meta)
    per_chunk = []
    t0 = time.perf_counter()
    for _ in stream:
        if cuda:
            torch.cuda.synchronize()
        per_chunk.append(time.perf_counter() - t0 - sum(per_chunk))
    steps_used = {k: {"calls": v["calls"] - before.get(k, {}).get("calls", 0),
                      "seconds": v["seconds"] - before.get(k, {}).get("seconds", 0.0)} for k, v in totals.items()}
    return {"seconds": sum(per_chunk), "per_chunk_seconds": per_chunk, "model_calls": stream.model_calls,
            "graph_captures": None if stream.graphs is None else stream.graphs.captures, "runtime_steps": steps_used}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"), help="where the model runs")
    ap.add_argument("--chunks", type=int, default=8, help="chunks per video (default 8, the README's)")
    ap.add_argument("--steps", type=int, default=None, help="sampler steps (default: generate's)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args(argv)
    if args.chunks < 1 or (args.steps is not None and args.steps < 1):
        ap.error("--chunks and --steps must be >= 1")

    t_import = time.perf_counter()
    import torch

    from maskc.world_model.generate import DEFAULT_STEPS, load_model
    from maskc.world_model.train import resolve_device

    imported = time.perf_counter()
    try:
        device = resolve_device(args.device)
    except ValueError as e:
        ap.error(str(e))
    totals: dict = {}
    instrument(totals)
    t0 = time.perf_counter()
    model, meta = load_model(device=str(device))
    if device.type == "cuda":
        torch.cuda.synchronize()
    loaded = time.perf_counter()
    steps = DEFAULT_STEPS if args.steps is None else args.steps
    first = video(model, meta, args.chunks, steps, args.seed, totals)
    second = video(model, meta, args.chunks, steps, args.seed, totals)
    res = {"benchmark": "world-first-use", "device": torch.cuda.get_device_name(device) if device.type == "cuda"
           else "cpu", "torch": torch.__version__, "chunks": args.chunks, "steps": steps,
           "seconds_to_main": t_import - _T0, "import_seconds": imported - t_import, "load_seconds": loaded - t0,
           "first_video": first, "second_video": second,
           "command": "python benchmarks/world_first_use.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    print(f"import {res['import_seconds']:.2f} s, load {res['load_seconds']:.2f} s")
    for name in ("first_video", "second_video"):
        v = res[name]
        parts = ", ".join(f"{k} {v['runtime_steps'][k]['seconds']:.2f} s / {v['runtime_steps'][k]['calls']}"
                          for k in STEPS if k in v["runtime_steps"])
        print(f"{name.replace('_', ' ')}: {v['seconds']:.2f} s (first chunk {v['per_chunk_seconds'][0]:.2f} s); "
              f"{parts or 'no runtime steps (no kernels on this device)'}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
