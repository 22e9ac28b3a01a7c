"""World-model evaluation benchmark: `magi eval`'s metrics at fixed settings, on this machine's CPU.

    python benchmarks/bench_world.py [--out benchmarks/results] [--weights PATH]

Fixed settings: held-out seeds 0 1, 4-chunk videos (prompt following with a mid-video direction
change, image-to-video), 2+2-chunk continuation, memory at 4, 16 and 64 chunks, one torch thread,
the generator's default steps. Writes ``world-<host>-<date>.json`` and prints a table
(the same as ``magi eval --seeds 0 1 --chunks 4 --memory-chunks 4 16 64``; about 3 minutes on a 2-core CPU).
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
    args = ap.parse_args(argv)

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


if __name__ == "__main__":
    sys.exit(main())
