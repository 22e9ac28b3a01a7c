"""Mask-language speed: build + normalise the issue's large masks on one CPU core.

    python benchmarks/bench_mask.py [--repeat 9] [--out benchmarks/results]

Writes ``mask-<host>-<date>.json`` (one row per case: median/min ms, slices, area, peak
traced memory of one build) and prints a table. Target: each case under 50 ms.
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
    """Lowering to 128x128 tile work lists, forward and backward (target: 4M video < 200 ms)."""
    video = maskc.magi_video([32] * 16, 8192)
    docs = maskc.varlen(np.random.default_rng(0).multinomial((1 << 15) - 16, np.ones(16) / 16) + 1)
    return {
        "lower magi_video 4,194,304 tokens (128x128)": lambda: maskc.lower(video, 128, 128),
        "lower causal 32k (128x128)": lambda: maskc.lower(maskc.causal(1 << 15), 128, 128),
        "lower varlen 32k, 16 documents (128x128)": lambda: maskc.lower(docs, 128, 128),
    }


def measure(fn, repeat: int):
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        m = fn()
        times.append((time.perf_counter() - t0) * 1e3)
    tracemalloc.start()
    fn()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return m, times, peak


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=9, help="timed repetitions per case (median reported)")
    ap.add_argument("--out", default="benchmarks/results", help="folder for the JSON results")
    args = ap.parse_args(argv)
    rows = []
    for name, fn in {**cases(), **lowering_cases()}.items():
        m, times, peak = measure(fn, args.repeat)
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
        print(f"{name:<60} {r['median_ms']:>9.2f} ms  {r['slices']:>6} slices  peak {peak / 1e6:7.2f} MB", flush=True)
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
