"""`KernelSpec`: everything that changes the generated kernel code, and nothing else.

The mask itself is data (the `TilePlan` arrays), so two masks with the same spec share a kernel.
What a mask contributes to the spec is only the *predicate class* of its partial tiles:

* ``none``: no partial tiles (e.g. block-causal masks aligned to the tiles): no masking code at all;
* ``rect``: partial tiles touched only by rectangles (FULL slices cut by tile edges);
* ``diag``: some partial tile carries a CAUSAL / INV_CAUSAL / BI_CAUSAL diagonal.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

from maskc.errors import MaskError
from maskc.kinds import Kind

DIRECTIONS = ("fwd", "bwd_dkdv", "bwd_dq")
DTYPES = ("bf16", "fp16", "fp32")
HEAD_DIMS = (64, 128, 256)
PARTIALS = ("none", "rect", "diag")
BACKENDS = ("triton", "cutlass")


def partial_class(kinds) -> str:
    """The predicate class of a set of slice kinds found in partial tiles."""
    kinds = {Kind(k) for k in kinds}
    if not kinds:
        return "none"
    if kinds <= {Kind.FULL}:
        return "rect"
    return "diag"


@dataclass(frozen=True, order=True)
class KernelSpec:
    direction: str
    head_dim: int
    dtype: str
    block_q: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 2
    partial: str = "diag"
    gqa_group: int = 1
    softcap: bool = False
    deterministic: bool = True  # False (Triton): the dK/dV kernel also adds dQ with fp32 atomics, no dQ kernel
    backend: str = "triton"  # "triton" (maskc.codegen templates) or "cutlass" (maskc.codegen.cutlass)

    def __post_init__(self):
        if self.direction not in DIRECTIONS:
            raise MaskError(f"KernelSpec.direction {self.direction!r} is not one of {DIRECTIONS}")
        if self.backend not in BACKENDS:
            raise MaskError(f"KernelSpec.backend {self.backend!r} is not one of {BACKENDS}")
        if self.dtype not in DTYPES:
            raise MaskError(f"KernelSpec.dtype {self.dtype!r} is not one of {DTYPES}")
        if self.head_dim not in HEAD_DIMS:
            raise MaskError(f"KernelSpec.head_dim {self.head_dim} is not one of {HEAD_DIMS}")
        if self.partial not in PARTIALS:
            raise MaskError(f"KernelSpec.partial {self.partial!r} is not one of {PARTIALS}")
        for name in ("block_q", "block_k") + (("num_warps",) if self.backend == "triton" else ()):
            v = getattr(self, name)
            if v < 1 or v & (v - 1):
                raise MaskError(f"KernelSpec.{name} must be a power of two, got {v}")
        if self.backend == "cutlass" and (self.num_warps < 4 or self.num_warps % 4):
            raise MaskError(f"KernelSpec.num_warps of a cutlass kernel is whole warpgroups (a multiple of 4), "
                            f"got {self.num_warps}")
        if self.gqa_group < 1:
            raise MaskError(f"KernelSpec.gqa_group must be >= 1, got {self.gqa_group}")

    @property
    def name(self) -> str:
        """A readable, file-safe name that identifies the spec."""
        return (
            f"ffa_{self.direction}_d{self.head_dim}_{self.dtype}_m{self.block_q}n{self.block_k}"
            f"_w{self.num_warps}s{self.num_stages}_{self.partial}_g{self.gqa_group}"
            f"{'_cap' if self.softcap else ''}{'' if self.deterministic else '_nd'}"
            f"{'' if self.backend == 'triton' else '_' + self.backend}"
        )

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, data) -> "KernelSpec":
        if isinstance(data, (str, bytes)):
            data = json.loads(data)
        return cls(**data)

    def key(self) -> str:
        """Content hash of the spec (the cache key of its kernel)."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]
