"""Running a test's function in several processes, one per rank, without ever hanging the suite."""

import os
import tempfile
import time

import pytest
import torch
import torch.multiprocessing as mp

SPAWN_TIMEOUT = 240.0


def spawn(fn, world: int, *args, timeout: float = SPAWN_TIMEOUT, what: str = "distributed test"):
    """Run ``fn(rank, world, init_file, *args)`` in `world` spawned processes (``init_file`` is a
    fresh path for ``init_method="file://..."``); fail the test instead of hanging on timeout."""
    init = tempfile.mktemp(prefix="maskc-test-")
    ctx = mp.start_processes(fn, args=(world, init, *args), nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    if p.is_alive():
                        p.terminate()
                pytest.fail(f"{what} did not finish in {timeout:.0f} s (hang?)")
    finally:
        if os.path.exists(init):
            os.remove(init)


def init_gloo(rank: int, world: int, init: str):
    """One CPU thread and a gloo process group through ``init``; returns ``torch.distributed``."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    return dist
