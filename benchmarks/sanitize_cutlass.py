"""A small CUTLASS forward and backward to run under compute-sanitizer (partial tiles of both list
kinds, an empty query row, key rows nobody attends to, odd sizes, GQA 2):

    compute-sanitizer --tool memcheck --report-api-errors no --kernel-name kns=ffa_ python benchmarks/sanitize_cutlass.py
    compute-sanitizer --tool racecheck --kernel-name kns=ffa_ python benchmarks/sanitize_cutlass.py

(`kns=ffa_` checks the forward, dQ and dK/dV kernels; `kns=ffa_fwd` the forward only.) A second,
longer mask with 24 heads gives every CTA of the persistent grid several work items, so the
work-slot handoff and the transitions between items (empty query tiles among them) run under
the tools too.
"""
import torch

import maskc
from maskc.runtime import attention, reference_attention


def rel(x, ref):
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


small = maskc.Mask([((0, 200), (0, 150), 1), ((30, 260), (100, 300), 0), ((10, 90), (5, 95), 3), ((40, 60), (40, 260), 2)],
                  sq=300, sk=333)
many_items = maskc.Mask([((0, 700), (0, 700), 1), ((900, 1400), (0, 300), 0), ((900, 1400), (900, 1400), 3)],
                     sq=1400, sk=1400)
for mask, d, hq, hkv in ((small, 64, 4, 2), (small, 128, 4, 2), (many_items, 128, 24, 24)):
    sq, sk = mask.shape
    q = torch.randn(sq, hq, d, device="cuda", dtype=torch.bfloat16).requires_grad_()
    k = torch.randn(sk, hkv, d, device="cuda", dtype=torch.bfloat16).requires_grad_()
    v = torch.randn(sk, hkv, d, device="cuda", dtype=torch.bfloat16).requires_grad_()
    out, lse = attention(q, k, v, mask, return_lse=True, backend="cutlass")
    go = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), go)
    torch.cuda.synchronize()
    ref = reference_attention(q, k, v, mask)
    refs = torch.autograd.grad(ref, (q, k, v), go.double())
    print(f"{sq}x{sk} d{d} heads {hq}/{hkv}", "rel err out", f"{rel(out, ref):.1e}", "dq, dk, dv", " ".join(f"{rel(g, r):.1e}" for g, r in zip(grads, refs)))
