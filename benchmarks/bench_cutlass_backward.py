"""Time the CUTLASS backward's two kernels (dQ; dK and dV) one by one, for build variants side by side.

    python benchmarks/bench_cutlass_backward.py [--seqlen 32768] [--masks full causal varlen_causal]
                                                [--variant build:2:2 ...] [--out DIR]

A variant is ``FOLDER:DQ_STAGES:DKDV_STAGES``: the CUTLASS build in FOLDER (``maskc build ...
--backend cutlass -o FOLDER``) and the ring depth of each kernel to take from it, so template
versions built into different folders are compared in one process on the same inputs. Per (mask,
variant): each kernel's median time (`triton.testing.do_bench`), its matrix-product rate (dQ runs
3 products, dK/dV 4, each 2 * area * d * heads FLOPs), the backward's counted rate (2.5x the
forward's exact-area FLOPs) and the largest difference of the gradients from the first variant's
(0 means bitwise identical). 16 heads, head dim 128, bf16. Needs an sm_90 GPU.
"""

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_kernels import MASKS, build as build_mask  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqlen", type=int, default=32768)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--masks", nargs="+", default=["full", "causal", "varlen_causal"], choices=MASKS)
    ap.add_argument("--variant", dest="variants", nargs="+", default=["build:2:2"], metavar="FOLDER:DQ:DKDV")
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_cutlass_backward needs a CUDA GPU (sm_90)")
    import triton

    from maskc.codegen.configs import LISTS
    from maskc.runtime import cutlass as cb
    from maskc.runtime.ffa import _device_lists, ffa_forward, plan_for

    variants = []
    for text in args.variants:
        parts = text.split(":")
        if len(parts) != 3 or not parts[1].isdigit() or not parts[2].isdigit():
            raise SystemExit(f"--variant {text!r}: expected FOLDER:DQ_STAGES:DKDV_STAGES, e.g. build:2:2")
        manifest = cb.cg.manifest_path(parts[0])
        if not manifest.is_file():
            raise SystemExit(f"--variant {text!r}: no CUTLASS build at {manifest} (maskc build ... --backend cutlass)")
        variants.append((text, Path(parts[0]), int(parts[1]), int(parts[2])))
    s, h, d = args.seqlen, args.heads, 128
    scale = d ** -0.5
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, do = (torch.randn(s, h, d, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(4))
    rows = [{"header": True, "device": torch.cuda.get_device_name(), "torch": torch.__version__,
             "seqlen": s, "heads": h, "head_dim": d, "dtype": "bf16", "command": " ".join(sys.argv)}]
    for name in args.masks:
        mask = build_mask(name, s)[0]
        fwd_flops = 4.0 * mask.area * d * h
        out, lse = ffa_forward(q, k, v, mask, scale, 0.0, "triton")
        delta = (do.float() * out.float()).sum(-1).transpose(0, 1).contiguous()
        lse2, delta_pad, sq_pad = cb.backward_rows(lse, delta)
        first = None
        for text, folder, dq_stages, dkdv_stages in variants:
            cb._FUNCTIONS.clear()  # the same kernel names from another folder
            entries = {e["name"]: e for e in json.loads(cb.cg.manifest_path(folder).read_text())["kernels"]}
            ms, grads = {}, {}
            for direction, stages in (("bwd_dq", dq_stages), ("bwd_dkdv", dkdv_stages)):
                which = LISTS[direction]
                plan = plan_for(mask, *cb.cg.TILES[direction], only=which)
                spec = cb.cg.spec_for_plan(direction, plan, d, "bf16", stages)
                if spec.name not in entries:
                    raise SystemExit(f"{folder}: {spec.name} is not built")
                kernel = (folder / "cutlass" / entries[spec.name]["cubin"], entries[spec.name])
                lists = _device_lists(plan, which, q.device)
                if direction == "bwd_dq":
                    dq = torch.empty_like(q)
                    run = lambda: cb.backward_dq(spec, kernel, q, k, v, do, dq, lse2, delta_pad, sq_pad, lists,  # noqa: E731
                                                 plan.n_q_tiles, scale)
                    run()
                    grads["dq"] = dq.clone()
                else:
                    dk, dv = torch.empty_like(k), torch.empty_like(v)
                    run = lambda: cb.backward_dkdv(spec, kernel, q, k, v, do, dk, dv, lse2, delta_pad, sq_pad,  # noqa: E731
                                                   lists, plan.n_k_tiles, scale)
                    run()
                    grads["dk"], grads["dv"] = dk.clone(), dv.clone()
                ms[direction] = triton.testing.do_bench(run, warmup=10, rep=50)
            first = first or grads
            total = ms["bwd_dq"] + ms["bwd_dkdv"]
            row = {"mask": name, "seqlen": s, "variant": text, "dq_ms": round(ms["bwd_dq"], 3),
                   "dkdv_ms": round(ms["bwd_dkdv"], 3),
                   "dq_product_tflops": round(1.5 * fwd_flops / ms["bwd_dq"] / 1e9, 1),
                   "dkdv_product_tflops": round(2.0 * fwd_flops / ms["bwd_dkdv"] / 1e9, 1),
                   "bwd_tflops": round(2.5 * fwd_flops / total / 1e9, 1),
                   "max_diff_vs_first": max((grads[n].float() - first[n].float()).abs().max().item() for n in grads)}
            rows.append(row)
            print(f"{name:<14} {text:<18} dQ {row['dq_ms']:7.3f} ms ({row['dq_product_tflops']:5.1f})  "
                  f"dK/dV {row['dkdv_ms']:7.3f} ms ({row['dkdv_product_tflops']:5.1f})  "
                  f"backward {row['bwd_tflops']:5.1f} TFLOP/s  diff {row['max_diff_vs_first']:.1e}", flush=True)
    os.makedirs(args.out, exist_ok=True)
    dev = torch.cuda.get_device_name().replace(" ", "_")
    path = Path(args.out) / f"cutlass-bwd-{dev}-{s}.json"
    path.write_text(json.dumps(rows, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
