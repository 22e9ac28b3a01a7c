"""Default kernel configurations (tile sizes, warps, stages) per direction and head dim.

Pure Python (no torch): shared by the runtime (`maskc.runtime.attention`) and the ahead-of-time
build (`maskc.codegen.build`), so a build forms exactly the specs the runtime will ask for.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class KernelConfig:
    block_q: int
    block_k: int
    num_warps: int
    num_stages: int


def default_config(direction: str, head_dim: int, device_type: str) -> KernelConfig:
    """Tile sizes per direction and head dim (the interpreter uses small tiles: it is for tests)."""
    if device_type != "cuda":
        return KernelConfig(16, 16, 4, 1)
    if direction == "fwd":
        return {64: KernelConfig(128, 64, 4, 3), 128: KernelConfig(128, 64, 8, 3), 256: KernelConfig(64, 64, 8, 2)}[head_dim]
    if direction == "bwd_dkdv":
        return {64: KernelConfig(32, 128, 4, 3), 128: KernelConfig(32, 128, 8, 2), 256: KernelConfig(32, 64, 8, 1)}[head_dim]
    return {64: KernelConfig(128, 32, 4, 3), 128: KernelConfig(128, 32, 8, 2), 256: KernelConfig(64, 32, 8, 1)}[head_dim]
