"""Shared hypothesis strategies and the dense definitions every test compares against."""

import os

# Kernels run through Triton's interpreter on the CPU unless a GPU run is asked for explicitly
# (MASKC_GPU_TESTS=1, on the device machine); the variable must be set before triton is imported.
if os.environ.get("MASKC_GPU_TESTS") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np
from hypothesis import settings, strategies as st

import maskc
from maskc import Kind

def rel_err(x, ref) -> float:
    """``||x - ref|| / max(||ref||, 0.1 sqrt(n))``: the relative error, measured against unit-scale
    entries where the reference itself is small. A gradient that cancels to nearly zero (dQ of a
    row with one key: dP - delta is O(1) - O(1)) keeps the float32 rounding of its O(1) terms, so
    a 1e-5 bound then means about 1e-6 per entry instead of failing on rounding."""
    import math

    ref = ref.double()
    scale = max(ref.norm().item(), 0.1 * math.sqrt(max(ref.numel(), 1)))
    return (x.double() - ref).norm().item() / scale


settings.register_profile("ci", max_examples=60, deadline=None)
settings.register_profile("thorough", max_examples=500, deadline=None)
settings.load_profile("ci")


def dense_slice(sq, sk, q, k, kind):
    """The DESIGN.md table, written out pair by pair (no shared code with the library)."""
    d = np.zeros((sq, sk), dtype=bool)
    qs, qe = q
    ks, ke = k
    lq, lk = qe - qs, ke - ks
    for i in range(qs, qe):
        for j in range(ks, ke):
            c = j - ks <= (i - qs) + (lk - lq)
            ic = j - ks >= i - qs
            d[i, j] = {Kind.FULL: True, Kind.CAUSAL: c, Kind.INV_CAUSAL: ic, Kind.BI_CAUSAL: c and ic}[
                Kind(kind)
            ]
    return d


def dense_of(slices, sq, sk):
    d = np.zeros((sq, sk), dtype=bool)
    for q, k, kind in slices:
        d |= dense_slice(sq, sk, q, k, kind)
    return d


@st.composite
def shapes(draw, max_side=12):
    sq = draw(st.integers(0, max_side))
    sk = draw(st.integers(0, max_side))
    return sq, sk


@st.composite
def slice_lists(draw, sq, sk, max_slices=5, min_slices=0, nonempty=False):
    """Random overlapping slices of all four kinds; ``nonempty``: every range has a token (needs
    sq, sk >= 1)."""
    out = []
    for _ in range(draw(st.integers(min_slices, max_slices))):
        qs = draw(st.integers(0, sq - nonempty))
        qe = draw(st.integers(qs + nonempty, sq))
        ks = draw(st.integers(0, sk - nonempty))
        ke = draw(st.integers(ks + nonempty, sk))
        kind = draw(st.sampled_from(list(Kind)))
        out.append(((qs, qe), (ks, ke), kind))
    return out


@st.composite
def masks(draw, sq=None, sk=None, max_side=12, max_slices=5):
    """(Mask, its dense definition) for random overlapping slices of all four kinds."""
    if sq is None:
        sq, sk = draw(shapes(max_side))
    slices = draw(slice_lists(sq, sk, max_slices))
    return maskc.Mask(slices, sq=sq, sk=sk), dense_of(slices, sq, sk)


@st.composite
def mask_pairs(draw, n=2, max_side=12):
    sq, sk = draw(shapes(max_side))
    return [draw(masks(sq, sk)) for _ in range(n)]
