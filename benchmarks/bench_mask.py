"""Mask-language speed: build + normalise the issue's large masks on one CPU core.

    python benchmarks/bench_mask.py [--repeat 9] [--out benchmarks/results] [--only TEXT ...]

Writes ``mask-<host>-<date>.json`` (one row per case: median/min ms, slices, area, peak
traced memory of one build) and prints a table. Target: each case under 50 ms. Also times the
host-side planning of a new 32k mask for the three kernels (`plan_cases`, the Triton backend's
tile choice, and `cutlass_plan_cases`, what the H100 runs; target: under 1 ms).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import statistics
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

import maskc
from maskc.codegen.configs import choose_config
from maskc.tiling import clear_caches


def cases():
    rng = np.random.default_rng(0)
    docs = rng.multinomial((1 << 20) - 4096, np.ones(4096) / 4096) + 1  # 4,096 documents, 1M tokens
    return {
        "magi_video 16 videos x 32 chunks x 8192 tokens (4,194,304)": lambda: maskc.magi_video([32] * 16, 8192),
        "magi_video same, window=4 (inference)": lambda: maskc.magi_video([32] * 16, 8192, window=4),
        "varlen causal, 4096 documents (1,048,576)": lambda: maskc.varlen(docs),
        "causal(1M) | sliding_window(1M, 4096)": lambda: maskc.causal(1 << 20) | maskc.sliding_window(1 << 20, 4096),
        "varlen(4096 docs) & sliding_window(1M, 512)": lambda: maskc.varlen(docs) & maskc.sliding_window(1 << 20, 512),
    }


def lowering_cases():
    """Lowering to 128x128 tile work lists, forward and backward (target: 4M video < 200 ms). The
    tiling memo is cleared before each repetition (untimed): a lowering is timed, not a lookup."""
    video = maskc.magi_video([32] * 16, 8192)
    causal = maskc.causal(1 << 15)
    docs = maskc.varlen(np.random.default_rng(0).multinomial((1 << 15) - 16, np.ones(16) / 16) + 1)

    def new(mask):
        return lambda: (clear_caches(), mask)[1]

    def lower(mask):
        return maskc.lower(mask, 128, 128)

    return {
        "lower magi_video 4,194,304 tokens (128x128)": (new(video), lower),
        "lower causal 32k (128x128)": (new(causal), lower),
        "lower varlen 32k, 16 documents (128x128)": (new(docs), lower),
    }


def doc_lengths(s: int, seed: int = 0) -> list[int]:
    """Deterministic packed document lengths, 512..4096 tokens (not tile aligned): the varlen masks
    of this file's plan rows and of `benchmarks/bench_kernels.py`."""
    rng = np.random.default_rng(seed)
    out, left = [], s
    while left > 0:
        n = int(min(left, rng.integers(512, 4097)))
        out.append(n)
        left -= n
    return out


def magi_videos(s: int) -> tuple[list[int], int]:
    """The suite's magi_video geometry at ``s`` tokens: three videos' chunk counts and the chunk
    (6 latent frames x 16 x 16 patches = 1536 tokens); the tokens past the last whole chunk are padding."""
    chunk = 1536
    n = s // chunk
    return [n // 3, n // 3, n - 2 * (n // 3)], chunk


# `bench_kernels.py`'s mask names -> `suite_masks`' keys (the row names of this file's results)
SUITE_NAMES = {"full": "full", "causal": "causal", "swa1024": "sliding window 1024", "varlen_causal": "varlen causal",
               "varlen_full": "varlen full", "block_causal": "block causal 1024",
               "varlen_block_causal": "varlen block causal", "magi_video": "magi_video, window 4"}


def suite_masks(s: int = 1 << 15) -> dict:
    """Builders of the 8 masks of `bench_kernels.py` at ``s`` tokens (maskc only, no torch)."""
    lengths = doc_lengths(s)
    videos, chunk = magi_videos(s)  # window of 4 chunks
    return {
        "full": lambda: maskc.full(s),
        "causal": lambda: maskc.causal(s),
        "sliding window 1024": lambda: maskc.sliding_window(s, 1024),
        "varlen causal": lambda: maskc.varlen(lengths, maskc.CAUSAL),
        "varlen full": lambda: maskc.varlen(lengths, maskc.FULL),
        "block causal 1024": lambda: maskc.block_causal(s, 1024),
        "varlen block causal": lambda: maskc.concat(*[maskc.block_causal(x, 1024) for x in lengths]),
        "magi_video, window 4": lambda: maskc.magi_video(videos, chunk, window=4).with_shape(s, s),
    }


def new_mask(build):
    """A setup for `measure`: a newly built mask, with the tiling memo cleared (untimed)."""
    def make():
        mask = build()
        clear_caches()
        return mask
    return make


def plan_cases(s: int = 1 << 15):
    """Planning a new mask as `bench_kernels.py` times it (its suite masks): each kernel's tile
    config chosen and its work lists built (``choose_config`` for fwd, dK/dV and dQ at head dim
    128). Each repetition plans a newly built mask with the tiling memo cleared, as for a mask
    never seen before. Values are ``(new mask, plan it)``."""
    masks = suite_masks(s)
    labels = {"full": "full", "causal": "causal", "varlen causal, 15 documents": "varlen causal",
              "sliding window 1024": "sliding window 1024", "magi_video, window 4": "magi_video, window 4"}

    return {f"plan new {s // 1024}k {label} (3 kernels)": (new_mask(masks[name]), plan_for_triton) for label, name in labels.items()}


def cutlass_plan_cases(s: int = 1 << 15):
    """Planning a new mask for the CUTLASS kernels, as `maskc.runtime` does on the H100 (what
    ``backend="auto"`` runs there): the three kernels' tile sizes classified in one pass, then
    each kernel's lowering (forward 128x128 and dQ 128x64 over query tiles, dK/dV 64x128 over key
    tiles) and its flat work lists (`kernel_lists`), the arrays copied to the GPU. The 8 masks of
    `bench_kernels.py`; the tiling memo is cleared before each repetition (untimed)."""
    return {f"plan new {s // 1024}k {name} for CUTLASS (3 kernels + lists)": (new_mask(build), plan_for_cutlass)
            for name, build in suite_masks(s).items()}


def plan_for_triton(mask, head_dim: int = 128):
    """What `maskc.runtime` does on the host for a new mask before the Triton kernels run: each
    kernel's tile config chosen over its candidate lowerings and its work lists built. Returns the mask."""
    for direction in ("fwd", "bwd_dkdv", "bwd_dq"):
        choose_config(mask, direction, head_dim, "cuda", maskc.lower)
    return mask


def plan_for_cutlass(mask):
    """What `maskc.runtime` does on the host for a new mask before the CUTLASS kernels run when a
    backward follows (inputs that require grad): the three kernels' tile sizes classified in one
    pass (forward and dQ over query tiles, dK/dV over key tiles), then each kernel's lowering (the
    first builds all three lists) and its flat work lists (the arrays copied to the GPU). Returns
    the mask."""
    from maskc.codegen.cutlass import TILES
    from maskc.tiling import kernel_lists, tile_counts_all

    tile_counts_all(mask, [TILES["fwd"], TILES["bwd_dq"]], [TILES["bwd_dkdv"]])
    for direction, which in (("fwd", "fwd"), ("bwd_dq", "fwd"), ("bwd_dkdv", "bwd")):
        kernel_lists(maskc.lower(mask, *TILES[direction], only=which), which)
    return mask


def measure(fn, repeat: int, setup=None):
    """Times ``fn()``, or ``fn(setup())`` with the setup untimed, `repeat` times after a warm-up."""
    args = (lambda: ()) if setup is None else (lambda: (setup(),))
    fn(*args())  # warm-up
    times = []
    for _ in range(repeat):
        a = args()
        t0 = time.perf_counter()
        m = fn(*a)
        times.append((time.perf_counter() - t0) * 1e3)
    a = args()
    tracemalloc.start()
    fn(*a)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return m, times, peak


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=9, help="timed repetitions per case (median reported)")
    ap.add_argument("--out", default="benchmarks/results", help="folder for the JSON results")
    ap.add_argument("--only", action="append", metavar="TEXT",
                    help="run only the cases whose name contains TEXT (repeatable; e.g. 'for CUTLASS' for the "
                         "CUTLASS plan rows); prints them and writes no JSON")
    args = ap.parse_args(argv)
    rows = []
    for name, fn in {**cases(), **lowering_cases(), **plan_cases(), **cutlass_plan_cases()}.items():
        if args.only and not any(text in name for text in args.only):
            continue
        setup, fn = fn if isinstance(fn, tuple) else (None, fn)
        m, times, peak = measure(fn, args.repeat, setup)
        rows.append(
            {
                "case": name,
                "median_ms": round(statistics.median(times), 3),
                "min_ms": round(min(times), 3),
                "tokens": m.sq,
                "slices": len(m) if isinstance(m, maskc.Mask) else int(m.bands.shape[0]),
                "area": m.area if isinstance(m, maskc.Mask) else None,
                "peak_bytes": peak,
                "bytes_per_slice": round(peak / max(len(m) if isinstance(m, maskc.Mask) else m.bands.shape[0], 1), 1),
            }
        )
        r = rows[-1]
        print(f"{name:<60} {r['median_ms']:>9.3f} ms (min {r['min_ms']:.3f})  {r['slices']:>6} slices  peak {peak / 1e6:7.2f} MB",
              flush=True)
    if args.only:
        return
    header = {
        "benchmark": "mask",
        "date": dt.date.today().isoformat(),
        "host": platform.node(),
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "maskc": maskc.__version__,
        "cpu": platform.processor() or platform.machine(),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"mask-{platform.node() or 'host'}-{header['date']}.json"
    path.write_text(json.dumps([header] + rows, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
