"""maskc: a compiler for attention masks.

Declare a mask as slices, with builders, with the exact algebra or as a sympy predicate; every
mask is normalised to canonical disjoint slices of four kinds (see `maskc.kinds`).
"""

from .builders import (
    block_causal,
    causal,
    full,
    global_tokens,
    magi_video,
    prefix_lm,
    shared_prefix,
    sliding_window,
    varlen,
)
from .errors import MaskError
from .interop import from_mask_mod
from .predicate import from_predicate
from .tiling import TilePlan, lower
from .kinds import Kind, Slice
from .mask import Mask, combine, concat, union
from .plan import Plan, compile  # noqa: A004 - maskc.compile plans context parallelism

FULL, CAUSAL, INV_CAUSAL, BI_CAUSAL = Kind.FULL, Kind.CAUSAL, Kind.INV_CAUSAL, Kind.BI_CAUSAL

__version__ = "0.1.0"

__all__ = [
    "BI_CAUSAL",
    "CAUSAL",
    "FULL",
    "INV_CAUSAL",
    "Kind",
    "Mask",
    "MaskError",
    "Plan",
    "Slice",
    "TilePlan",
    "block_causal",
    "causal",
    "combine",
    "compile",
    "concat",
    "from_mask_mod",
    "from_predicate",
    "full",
    "global_tokens",
    "lower",
    "magi_video",
    "prefix_lm",
    "shared_prefix",
    "sliding_window",
    "union",
    "varlen",
]
