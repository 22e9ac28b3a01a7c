"""A small CUTLASS forward and backward to run under compute-sanitizer (partial tiles of both list
kinds, an empty query row, key rows nobody attends to, odd sizes, GQA 2):

    compute-sanitizer --tool memcheck --report-api-errors no --kernel-name kns=ffa_ python benchmarks/sanitize_cutlass.py
    compute-sanitizer --tool racecheck --kernel-name kns=ffa_ python benchmarks/sanitize_cutlass.py

(`kns=ffa_` checks the forward, dQ and dK/dV kernels; `kns=ffa_fwd` the forward only.)
"""
import torch

import maskc
from maskc.runtime import attention, reference_attention


def rel(x, ref):
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


mask = maskc.Mask([((0, 200), (0, 150), 1), ((30, 260), (100, 300), 0), ((10, 90), (5, 95), 3), ((40, 60), (40, 260), 2)],
                  sq=300, sk=333)
for d in (64, 128):
    q = torch.randn(300, 4, d, device="cuda", dtype=torch.bfloat16).requires_grad_()
    k = torch.randn(333, 2, d, device="cuda", dtype=torch.bfloat16).requires_grad_()
    v = torch.randn(333, 2, d, device="cuda", dtype=torch.bfloat16).requires_grad_()
    out, lse = attention(q, k, v, mask, return_lse=True, backend="cutlass")
    go = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), go)
    torch.cuda.synchronize()
    ref = reference_attention(q, k, v, mask)
    refs = torch.autograd.grad(ref, (q, k, v), go.double())
    print(d, "rel err out", f"{rel(out, ref):.1e}", "dq, dk, dv", " ".join(f"{rel(g, r):.1e}" for g, r in zip(grads, refs)))
