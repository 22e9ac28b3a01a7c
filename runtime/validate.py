"""Input checks shared by the kernels and the reference: clear errors that list what is supported."""

from __future__ import annotations

import torch

from maskc.errors import MaskError

HEAD_DIMS = (64, 128, 256)
GPU_DTYPES = (torch.bfloat16, torch.float16)
CPU_DTYPES = (torch.float32,)


def check_inputs(q, k, v, mask, *, allow_any_dtype: bool = False):
    """Shapes, devices and dtypes of ``q [sq, hq, d]``, ``k, v [sk, hkv, d]`` against ``mask``."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise MaskError(f"attention: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 3:
            raise MaskError(
                f"attention: {name} must be 3-D [seq, heads, head_dim] (packed varlen layout), "
                f"got shape {tuple(t.shape)}"
            )
    sq, hq, d = q.shape
    sk, hkv, dk = k.shape
    if tuple(v.shape) != (sk, hkv, dk):
        raise MaskError(f"attention: v shape {tuple(v.shape)} must equal k shape {tuple(k.shape)}")
    if dk != d:
        raise MaskError(f"attention: q head_dim {d} != k head_dim {dk}")
    if hkv == 0 or hq % hkv:
        raise MaskError(f"attention: q heads {hq} must be a multiple of k/v heads {hkv} (GQA/MQA)")
    if not (q.device == k.device == v.device):
        raise MaskError(f"attention: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if not (q.dtype == k.dtype == v.dtype):
        raise MaskError(f"attention: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if (mask.sq, mask.sk) != (sq, sk):
        raise MaskError(
            f"attention: mask is {mask.sq} x {mask.sk} but q has {sq} positions and k has {sk}"
        )
    if not allow_any_dtype:
        if d not in HEAD_DIMS:
            raise MaskError(f"attention: head_dim {d} is not supported; supported: {HEAD_DIMS}")
        if q.device.type == "cuda":
            if q.dtype not in GPU_DTYPES:
                raise MaskError(
                    f"attention: dtype {q.dtype} is not supported on the GPU; supported: bfloat16, float16"
                )
        elif q.device.type == "cpu":
            if q.dtype not in CPU_DTYPES:
                raise MaskError(
                    f"attention: dtype {q.dtype} is not supported on the CPU; the CPU path (Triton "
                    "interpreter) takes float32"
                )
        else:
            raise MaskError(f"attention: device {q.device} is not supported; supported: cuda, cpu")
    return sq, hq, d, sk, hkv
