"""`maskc.runtime.rows.backward_rows` (Triton interpreter on the CPU) against the torch formula it
replaces: delta = rowsum(dO * O) - dlse per (head, row), lse2 = lse * log2(e) with +inf for empty
rows, and the padding rows of the CUTLASS layout (delta 0, lse2 +inf)."""

import math
import os

import pytest
import torch
from hypothesis import given, settings, strategies as st

from maskc.runtime.rows import backward_rows

# the Triton interpreter on the CPU; the GPU when the suite runs there (MASKC_GPU_TESTS=1)
DEVICE = "cuda" if os.environ.get("MASKC_GPU_TESTS") == "1" else "cpu"


def expected(out, dout, dlse, lse, rows):
    sq, hq, _ = out.shape
    delta = (dout.double() * out.double()).sum(-1).transpose(0, 1)
    if dlse is not None:
        delta = delta - torch.nan_to_num(dlse.double(), nan=0.0, posinf=0.0, neginf=0.0)
    delta_pad = torch.zeros(hq, rows, dtype=torch.float64)
    delta_pad[:, :sq] = delta
    lse2 = torch.full((hq, rows), math.inf, dtype=torch.float64)
    if lse is not None:
        lse2[:, :sq] = torch.where(lse == -math.inf, math.inf, lse.double() / math.log(2.0))
    return delta_pad, lse2


@settings(max_examples=25, deadline=None)
@given(sq=st.integers(1, 150), hq=st.integers(1, 3), d=st.sampled_from([16, 64, 80, 128]), pad=st.integers(0, 70),
       with_dlse=st.booleans(), seed=st.integers(0, 2**16))
def test_rows_match_the_torch_formula(sq, hq, d, pad, with_dlse, seed):
    g = torch.Generator().manual_seed(seed)
    out = torch.randn(sq, hq, d, generator=g)
    dout = torch.randn(sq, hq, d, generator=g)
    lse = torch.randn(hq, sq, generator=g) * 4
    lse[:, ::7] = -math.inf  # rows with no allowed key
    dlse = None
    if with_dlse:
        dlse = torch.randn(hq, sq, generator=g)
        dlse[:, ::5] = math.nan  # an empty row's lse gradient
        dlse[:, 1::9] = math.inf
    rows = sq + pad
    on = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    delta, lse2 = (x.cpu() for x in backward_rows(on(out), on(dout), on(dlse), on(lse), rows))
    ref_delta, ref_lse2 = expected(out, dout, dlse, lse, rows)
    assert delta.shape == lse2.shape == (hq, rows) and delta.dtype == lse2.dtype == torch.float32
    torch.testing.assert_close(delta.double(), ref_delta, rtol=1e-5, atol=1e-4)
    assert torch.equal(torch.isinf(lse2), torch.isinf(ref_lse2))
    finite = torch.isfinite(ref_lse2)
    torch.testing.assert_close(lse2.double()[finite], ref_lse2[finite], rtol=1e-6, atol=1e-6)
    # delta alone, unpadded (the Triton backend's layout)
    alone = backward_rows(on(out), on(dout), on(dlse)).cpu()
    torch.testing.assert_close(alone, delta[:, :sq], rtol=0, atol=0)


def test_rows_reads_strided_heads_and_half_precision():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(40, 6, 64, generator=g).to(torch.bfloat16).to(DEVICE)
    out = base[:, ::2]  # heads 0, 2, 4: strided, last dimension contiguous
    dout = torch.randn(40, 3, 64, generator=g).to(torch.bfloat16).to(DEVICE)
    assert out.stride(1) == 128
    delta = backward_rows(out, dout).cpu()
    out, dout = out.cpu(), dout.cpu()
    ref = (dout.double() * out.double()).sum(-1).transpose(0, 1)
    torch.testing.assert_close(delta.double(), ref, rtol=1e-5, atol=1e-4)


def test_rows_bad_inputs():
    out = torch.randn(10, 2, 64, device=DEVICE)
    with pytest.raises(ValueError, match="rows=5 is fewer than the 10"):
        backward_rows(out, out, rows=5)
    with pytest.raises(ValueError, match="differ in shape"):
        backward_rows(out, out[:9])
    with pytest.raises(ValueError, match="contiguous last"):
        backward_rows(out.transpose(1, 2).contiguous().transpose(1, 2), out)
    with pytest.raises(ValueError, match=r"lse must be \[2, 10\]"):
        backward_rows(out, out, lse=torch.zeros(10, 2, device=DEVICE))
    delta = backward_rows(out[:0], out[:0], rows=0)
    assert delta.shape == (2, 0)


def test_rows_one_query_row_with_a_transposed_lse_gradient():
    # [hq, 1] made by transposing [1, hq]: torch calls it contiguous, its row stride is not 1
    g = torch.Generator().manual_seed(2)
    out, dout = (torch.randn(1, 3, 64, generator=g) for _ in range(2))
    dlse = torch.randn(1, 3, generator=g).t()
    lse = torch.randn(1, 3, generator=g).t()
    assert dlse.is_contiguous() and dlse.stride() == (1, 3)
    on = lambda t: t.to(DEVICE)  # noqa: E731
    delta, lse2 = (x.cpu() for x in backward_rows(on(out), on(dout), on(dlse), on(lse), 4))
    ref_delta, ref_lse2 = expected(out, dout, dlse, lse, 4)
    torch.testing.assert_close(delta.double(), ref_delta, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse2.double()[:, :1], ref_lse2[:, :1], rtol=1e-6, atol=1e-6)
    assert torch.isinf(lse2[:, 1:]).all()
