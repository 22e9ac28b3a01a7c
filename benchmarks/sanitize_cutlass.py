"""A small CUTLASS forward to run under compute-sanitizer (partial tiles of both lists, an empty row, odd sizes):

    compute-sanitizer --tool memcheck --report-api-errors no --kernel-name kns=ffa_fwd python benchmarks/sanitize_cutlass.py
    compute-sanitizer --tool racecheck --kernel-name kns=ffa_fwd python benchmarks/sanitize_cutlass.py
"""
import torch
import maskc
from maskc.runtime import attention, reference_attention

mask = maskc.Mask([((0, 200), (0, 150), 1), ((30, 260), (100, 300), 0), ((10, 90), (5, 95), 3), ((40, 60), (40, 260), 2)], sq=300, sk=333)
for d in (64, 128):
    q = torch.randn(300, 4, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(333, 2, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(333, 2, d, device="cuda", dtype=torch.bfloat16)
    out, lse = attention(q, k, v, mask, return_lse=True, backend="cutlass")
    torch.cuda.synchronize()
    ref = reference_attention(q, k, v, mask)
    print(d, "rel err", ((out.double() - ref).norm() / ref.norm()).item())
