"""The backward's per-row inputs in one pass: ``delta_i = sum_d dO_id * O_id - dlse_i`` and lse.

Every FFA backward (FlashAttention's too) needs, per query row and head, the correction term
``delta`` of ``dS = P * (dP - delta)``. Written with torch ops it costs an fp32 copy of dO and of O,
their product and a reduction: about 1.2 ms at 32k tokens x 16 heads x 128 on an H100, a quarter
of a varlen-causal backward. `backward_rows` reads dO and O once (bf16/fp16, 32 MB there) and
writes ``delta`` straight into the layout the backward kernels read:

* Triton backend: ``delta [hq, sq]`` fp32.
* CUTLASS backend: ``delta [hq, rows]`` and ``lse2 [hq, rows]``, padded to ``rows`` (whole tiles):
  lse2 is lse in log2 units, and +inf for a row with no allowed key (lse -inf) and for padding
  rows, so their ``P = exp2(s - lse2)`` is 0; padding rows get delta 0.

A JIT Triton kernel (one per head dim and dtype, compiled at the first backward); on CPU tensors it
runs through the Triton interpreter like the FFA kernels.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rows_kernel(OUT, DOUT, DLSE, LSE, DELTA, LSE2, sq, rows,
                 stride_os, stride_oh, stride_ds, stride_dh, stride_lh, stride_gh,
                 HEAD_DIM: tl.constexpr, D_POW2: tl.constexpr, BLOCK_M: tl.constexpr,
                 HAS_DLSE: tl.constexpr, WRITE_LSE2: tl.constexpr):
    head = tl.program_id(1)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_POW2)
    row_ok = offs_m < sq  # rows in [sq, rows) are padding: delta 0, lse2 +inf
    tile_ok = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(OUT + offs_m[:, None] * stride_os + head * stride_oh + offs_d[None, :], mask=tile_ok, other=0.0)
    do = tl.load(DOUT + offs_m[:, None] * stride_ds + head * stride_dh + offs_d[None, :], mask=tile_ok, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    if HAS_DLSE:
        # the lse gradient folds into the same term; a NaN or infinite dlse (an empty row's) counts as 0
        dlse = tl.load(DLSE + head * stride_gh + offs_m, mask=row_ok, other=0.0)
        delta -= tl.where(tl.abs(dlse) < float("inf"), dlse, 0.0)
    out_ok = offs_m < rows
    tl.store(DELTA + head * rows + offs_m, delta, mask=out_ok)
    if WRITE_LSE2:
        lse = tl.load(LSE + head * stride_lh + offs_m, mask=row_ok, other=float("-inf"))
        lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)  # log2(e)
        tl.store(LSE2 + head * rows + offs_m, lse2, mask=out_ok)


def backward_rows(out, dout, dlse=None, lse=None, rows: int | None = None):
    """``delta [hq, rows]`` fp32 (and ``lse2 [hq, rows]`` when `lse` is given) from ``out`` and
    ``dout`` ``[sq, hq, d]`` and the optional lse gradient ``dlse [hq, sq]``; ``rows`` (>= sq,
    default sq) pads each head's row for kernels that read whole tiles. Returns delta, or
    (delta, lse2) when `lse` is given."""
    sq, hq, d = out.shape
    rows = sq if rows is None else rows
    if rows < sq:
        raise ValueError(f"backward_rows: rows={rows} is fewer than the {sq} query rows")
    if dout.shape != out.shape:
        raise ValueError(f"backward_rows: dout {tuple(dout.shape)} and out {tuple(out.shape)} differ in shape")
    if (out.stride(-1) != 1 or dout.stride(-1) != 1) and d > 1:
        raise ValueError("backward_rows: out and dout need a contiguous last (head) dimension")
    delta = torch.empty((hq, rows), dtype=torch.float32, device=out.device)
    lse2 = torch.empty((hq, rows), dtype=torch.float32, device=out.device) if lse is not None else delta
    if hq == 0 or rows == 0:
        return delta if lse is None else (delta, lse2)
    for name, t in (("dlse", dlse), ("lse", lse)):
        if t is not None and (t.shape != (hq, sq) or (t.stride(-1) != 1 and sq > 1)):  # (a 1-wide row has any stride)
            raise ValueError(f"backward_rows: {name} must be [{hq}, {sq}] with contiguous rows, "
                             f"got {tuple(t.shape)} strides {t.stride()}")
    block_m = 64 if d <= 128 else 32
    _rows_kernel[(triton.cdiv(rows, block_m), hq)](
        out, dout, dlse if dlse is not None else delta, lse if lse is not None else delta, delta, lse2, sq, rows,
        out.stride(0), out.stride(1), dout.stride(0), dout.stride(1),
        lse.stride(0) if lse is not None else 0, dlse.stride(0) if dlse is not None else 0,
        HEAD_DIM=d, D_POW2=triton.next_power_of_2(d), BLOCK_M=block_m,
        HAS_DLSE=dlse is not None, WRITE_LSE2=lse is not None, num_warps=4,
    )
    return delta if lse is None else (delta, lse2)
