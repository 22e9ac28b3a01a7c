"""Dense float64 reference attention: what every kernel is checked against."""

from __future__ import annotations

import math

import torch

from maskc.mask import Mask

from .validate import check_inputs


def reference_attention(q, k, v, mask, *, scale=None, softcap: float = 0.0, return_lse: bool = False):
    """Same contract as `maskc.runtime.attention`, computed densely in float64 (differentiable).

    Returns float64 ``out [sq, hq, d]`` (and ``lse [hq, sq]``); rows with no allowed key give
    out 0 and lse -inf, and their gradients are 0 (never NaN).
    """
    mask = mask if isinstance(mask, Mask) else getattr(mask, "mask", mask)
    sq, hq, d, sk, hkv = check_inputs(q, k, v, mask, allow_any_dtype=True)
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    q64, k64, v64 = q.double(), k.double(), v.double()
    group = hq // hkv
    k64 = k64.repeat_interleave(group, dim=1)
    v64 = v64.repeat_interleave(group, dim=1)
    s = torch.einsum("qhd,khd->hqk", q64, k64) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    allowed = torch.as_tensor(mask.to_dense(), device=q.device)[None]
    has_key = allowed.any(-1)  # [1, sq]
    s = s.masked_fill(~allowed, float("-inf"))
    m = torch.where(has_key, s.amax(-1), torch.zeros((), dtype=s.dtype, device=s.device))
    e = torch.exp(s - m[..., None])
    l = e.sum(-1)
    l_safe = torch.where(has_key, l, torch.ones((), dtype=l.dtype, device=l.device))
    p = e / l_safe[..., None]
    out = torch.einsum("hqk,khd->qhd", p, v64)
    if not return_lse:
        return out
    lse = torch.where(has_key, m + torch.log(l_safe), torch.full((), float("-inf"), dtype=m.dtype, device=m.device))
    return out, lse
