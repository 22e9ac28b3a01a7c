"""The kernel suite on a GPU in bf16 and fp16 at realistic sizes (run on the device machine).

    MASKC_GPU_TESTS=1 python -m pytest tests/test_attention_gpu.py

Relative error against the float64 reference under 1e-2 for out, lse, dq, dk, dv; no NaN.
Skipped where there is no CUDA device (CI has none).
"""

import os
import zlib

import pytest
import torch

import maskc
from maskc.runtime import attention, reference_attention

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
    reason="needs a CUDA GPU and the compiled (not interpreted) kernels",
)

TOL = 1e-2


def rel(x, ref):
    ref = ref.double()
    return ((x.double() - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def random_mask(s: int, seed: int) -> maskc.Mask:
    """Overlapping slices of all kinds at odd offsets, unioned with a structured mask."""
    rng = torch.Generator().manual_seed(seed)
    slices = []
    for _ in range(6):
        a, b = sorted(torch.randint(0, s + 1, (2,), generator=rng).tolist())
        c, d = sorted(torch.randint(0, s + 1, (2,), generator=rng).tolist())
        slices.append(((a, b), (c, d), int(torch.randint(0, 4, (1,), generator=rng))))
    base = [maskc.sliding_window(s, 333), maskc.varlen([s // 3, s - s // 3 - 77, 77]), maskc.block_causal(s, 200)][seed % 3]
    return maskc.Mask(slices, sq=s, sk=s) | base


CASES = [
    ("causal", lambda: maskc.causal(3000)),
    ("causal-rect", lambda: maskc.causal(1500, 4100)),
    ("varlen", lambda: maskc.varlen([1000, 37, 2963, 900])),
    ("magi", lambda: maskc.magi_video([3, 5], 640, window=3)),
    ("random0", lambda: random_mask(2500, 0)),
    ("random1", lambda: random_mask(3001, 1)),
    ("random2", lambda: random_mask(4096, 2)),
    ("holes", lambda: maskc.Mask([((100, 900), (0, 50), 0), ((1200, 2000), (300, 1900), 1)], sq=2100, sk=2000)),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("name, make", CASES, ids=[c[0] for c in CASES])
def test_gpu_suite(name, make, d, dtype):
    mask = make()
    sq, sk = mask.shape
    hq, hkv = (4, 2) if d != 256 else (2, 1)
    g = torch.Generator(device="cuda").manual_seed(zlib.crc32(f"{name}-{d}".encode()))
    q = torch.randn(sq, hq, d, device="cuda", dtype=dtype, generator=g).requires_grad_()
    k = torch.randn(sk, hkv, d, device="cuda", dtype=dtype, generator=g).requires_grad_()
    v = torch.randn(sk, hkv, d, device="cuda", dtype=dtype, generator=g).requires_grad_()
    out, lse = attention(q, k, v, mask, return_lse=True)
    ref_out, ref_lse = reference_attention(q, k, v, mask, return_lse=True)
    go = torch.randn(out.shape, device="cuda", dtype=dtype, generator=g)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), go)
    rdq, rdk, rdv = torch.autograd.grad(ref_out, (q, k, v), go.double())
    fin = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), fin)
    errs = {
        "out": rel(out, ref_out),
        "lse": rel(lse[fin], ref_lse[fin]),
        "dq": rel(dq, rdq),
        "dk": rel(dk, rdk),
        "dv": rel(dv, rdv),
    }
    for t in (out, lse, dq, dk, dv):
        assert not torch.isnan(t).any()
    print(name, d, dtype, {k_: f"{v_:.1e}" for k_, v_ in errs.items()})
    assert max(errs.values()) < TOL, errs


@pytest.mark.parametrize("d", [64, 128])
def test_error_comparable_to_sdpa(d):
    """Our bf16 errors against float64 stay within 2x of PyTorch SDPA's on the same causal inputs."""
    s, h = 3000, 4
    mask = maskc.causal(s)
    g = torch.Generator(device="cuda").manual_seed(d)
    q, k, v = (torch.randn(s, h, d, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_() for _ in range(3))
    go = torch.randn(s, h, d, device="cuda", dtype=torch.bfloat16, generator=g)
    ref = reference_attention(q, k, v, mask)
    rgrads = torch.autograd.grad(ref, (q, k, v), go.double())
    out = attention(q, k, v, mask)
    grads = torch.autograd.grad(out, (q, k, v), go)
    qt, kt, vt = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))
    sd = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=True)[0].transpose(0, 1)
    sgrads = torch.autograd.grad(sd, (q, k, v), go)
    ours = [rel(out, ref)] + [rel(a, b) for a, b in zip(grads, rgrads)]
    theirs = [rel(sd, ref)] + [rel(a, b) for a, b in zip(sgrads, rgrads)]
    print("maskc", [f"{e:.1e}" for e in ours], "sdpa", [f"{e:.1e}" for e in theirs])
    for a, b in zip(ours, theirs):
        assert a <= 2 * b + 1e-4


@pytest.mark.parametrize("name, make", CASES[:5], ids=[c[0] for c in CASES[:5]])
def test_gpu_non_deterministic_backward(name, make):
    """deterministic=False (dQ by fp32 atomics inside the dK/dV kernel) meets the same tolerance."""
    mask = make()
    sq, sk = mask.shape
    g = torch.Generator(device="cuda").manual_seed(zlib.crc32(name.encode()))
    q = torch.randn(sq, 4, 128, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    k = torch.randn(sk, 2, 128, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    v = torch.randn(sk, 2, 128, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    go = torch.randn(sq, 4, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    grads = torch.autograd.grad(attention(q, k, v, mask, deterministic=False), (q, k, v), go)
    ref = reference_attention(q, k, v, mask)
    rgrads = torch.autograd.grad(ref, (q, k, v), go.double())
    errs = [rel(a, b) for a, b in zip(grads, rgrads)]
    print(name, "non-deterministic", [f"{e:.1e}" for e in errs])
    assert max(errs) < TOL
