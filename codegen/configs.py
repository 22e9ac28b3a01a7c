"""Kernel configurations (tile sizes, warps, stages) and the per-mask choice between them.

Pure Python (no torch): shared by the runtime (`maskc.runtime.ffa`) and the ahead-of-time
build (`maskc.codegen.build`), so a build forms exactly the specs the runtime will ask for.

Each (direction, head dim) has one or more candidate configs, each with the cost of one FULL
and one PARTIAL tile per head, fitted from `benchmarks/tune_kernels.py` on an H200 (16k tokens,
bf16; `docs/kernel-notes.md`). For a mask the planner lowers it with every candidate and keeps
the one with the smallest predicted time ``full_cost * full_tiles + partial_cost * partial_tiles``:
large tiles for dense masks, small tiles where a mask is cut into many pieces (packed documents),
where large partial tiles waste most of their work. Tuned ahead of time, never at a user's call.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass


@dataclass(frozen=True)
class KernelConfig:
    block_q: int
    block_k: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class Candidate:
    config: KernelConfig
    full_cost: float  # microseconds per FULL tile and head (fitted)
    partial_cost: float  # microseconds per PARTIAL tile and head (fitted)


_INTERPRETER = KernelConfig(16, 16, 4, 1)

# fitted on an H200 (benchmarks/results/tune-*.json, 2026-11-25); head dims 64 and 256 not swept yet
CANDIDATES: dict[tuple[str, int], list[Candidate]] = {
    ("fwd", 128): [Candidate(KernelConfig(128, 128, 8, 3), 0.269, 0.97), Candidate(KernelConfig(64, 64, 4, 3), 0.070, 0.27)],
    ("bwd_dkdv", 128): [Candidate(KernelConfig(64, 128, 8, 3), 0.238, 0.83), Candidate(KernelConfig(32, 64, 4, 3), 0.061, 0.41)],
    ("bwd_dq", 128): [Candidate(KernelConfig(128, 64, 8, 3), 0.148, 0.75), Candidate(KernelConfig(64, 64, 4, 3), 0.097, 0.39)],
    ("fwd", 64): [Candidate(KernelConfig(128, 64, 4, 3), 1.0, 4.0)],
    ("bwd_dkdv", 64): [Candidate(KernelConfig(64, 128, 8, 3), 1.0, 4.0)],
    ("bwd_dq", 64): [Candidate(KernelConfig(128, 64, 8, 3), 1.0, 4.0)],
    ("fwd", 256): [Candidate(KernelConfig(64, 64, 8, 2), 1.0, 4.0)],
    ("bwd_dkdv", 256): [Candidate(KernelConfig(32, 64, 8, 1), 1.0, 4.0)],
    ("bwd_dq", 256): [Candidate(KernelConfig(64, 32, 8, 1), 1.0, 4.0)],
}

# which work lists a direction walks: per query tile ("fwd") or per key tile ("bwd")
LISTS = {"fwd": "fwd", "bwd_dq": "fwd", "bwd_dkdv": "bwd"}


def candidates(direction: str, head_dim: int, device_type: str) -> list[Candidate]:
    if device_type != "cuda":
        return [Candidate(_INTERPRETER, 1.0, 1.0)]
    return CANDIDATES[(direction, head_dim)]


def default_config(direction: str, head_dim: int, device_type: str) -> KernelConfig:
    """The first candidate: the config for dense masks (the interpreter uses small tiles)."""
    return candidates(direction, head_dim, device_type)[0].config


@functools.lru_cache(maxsize=None)
def _priced_together(which: str, head_dim: int, device_type: str) -> tuple:
    """``(block_q, block_k)`` of every candidate of the directions that walk ``which`` lists and
    have a choice to make."""
    return tuple(dict.fromkeys(
        (c.config.block_q, c.config.block_k)
        for d in LISTS if LISTS[d] == which and len(candidates(d, head_dim, device_type)) > 1
        for c in candidates(d, head_dim, device_type)))


_tile_counts_many = None  # maskc.tiling.tile_counts_many


def choose_config(mask, direction: str, head_dim: int, device_type: str, lower_fn, counts_fn=None):
    """``(config, plan)`` with the smallest predicted time for `mask`: candidates are priced by
    their tile counts (``counts_fn(mask, bq, bk, which) -> (full, partial)``; by default
    `maskc.tiling.tile_counts_many`, which builds no lists and counts every candidate of the
    directions walking the same lists in one pass, so the forward's call prices dQ's candidates
    too) and only the winner is lowered, in the orientation this direction walks (``lower_fn(mask,
    bq, bk, only=...)``, as `maskc.lower`)."""
    global _tile_counts_many
    if _tile_counts_many is None:  # imported on first use (an import statement per call costs ~1 us)
        from maskc.tiling import tile_counts_many as _tile_counts_many

    cands = candidates(direction, head_dim, device_type)
    which = LISTS[direction]
    best = None
    if len(cands) > 1:
        if counts_fn is None:
            blocks = _priced_together(which, head_dim, device_type)
            counted = dict(zip(blocks, _tile_counts_many(mask, blocks, which)))
            counts_fn = lambda m, bq, bk, w: counted[(bq, bk)]  # noqa: E731
        for cand in cands:
            full, partial = counts_fn(mask, cand.config.block_q, cand.config.block_k, which)
            est = cand.full_cost * full + cand.partial_cost * partial
            if best is None or est < best[0]:
                best = (est, cand.config)
    cfg = cands[0].config if best is None else best[1]
    return cfg, lower_fn(mask, cfg.block_q, cfg.block_k, only=which)  # the orientation it walks
