"""maskc.runtime: executing mask plans with torch.

`attention` runs the generated FFA kernels (forward and backward); `reference_attention` is the
dense float64 definition they are checked against.
"""

from .ffa import attention, plan_for
from .dist import dist_attention
from .reference import reference_attention

__all__ = ["attention", "dist_attention", "plan_for", "reference_attention"]
