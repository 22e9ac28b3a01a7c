"""Time the CUTLASS kernels (forward; dQ; dK and dV) one by one, for build variants side by side.

    python benchmarks/bench_cutlass_kernels.py [--seqlen 32768] [--masks full causal varlen_causal]
                                               [--directions fwd bwd_dq bwd_dkdv]
                                               [--variant build:2:2:2 ...] [--rounds 3] [--out DIR]

A variant is ``FOLDER[:FWD_STAGES:DQ_STAGES:DKDV_STAGES]`` (stages default to 2): the CUTLASS build
in FOLDER (``maskc build ... --backend cutlass -o FOLDER``) and the ring depth of each kernel to take
from it, so template versions built into different folders are compared in one process on the same
inputs. The variants take turns, ``--rounds`` times, round r starting with variant r (so a drift of the
GPU's clocks over the run, and what the kernel before leaves behind, fall on all of them alike); per (mask, variant) each kernel's time is the median over the rounds of
`triton.testing.do_bench`'s medians, with its rate and the largest difference of its outputs from
the first variant's (0: bitwise identical). The Triton
backend's forward is timed in the same process as the reference (the CUTLASS issue's targets are
ratios to it). Rates: the forward counts ``4 * area * d * heads`` FLOPs (exact allowed area); dQ
runs 3 products and dK/dV 4, each ``2 * area * d * heads`` (its matrix-product rate); the backward
row counts 2.5x the forward. 16 heads, head dim 128, bf16. Needs an sm_90 GPU.
"""

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_kernels import MASKS, build as build_mask  # noqa: E402

DIRECTIONS = ("fwd", "bwd_dq", "bwd_dkdv")
PRODUCTS = {"fwd": 1.0, "bwd_dq": 1.5, "bwd_dkdv": 2.0}  # matrix-product FLOPs per kernel, in forwards


def parse_variant(text: str) -> tuple[str, Path, dict]:
    parts = text.split(":")
    stages = parts[1:] or ["2", "2", "2"]
    if len(stages) != 3 or not all(p.isdigit() and int(p) >= 1 for p in stages):
        raise SystemExit(f"--variant {text!r}: expected FOLDER or FOLDER:FWD:DQ:DKDV stages, e.g. build:2:2:2")
    return text, Path(parts[0]), dict(zip(DIRECTIONS, map(int, stages)))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqlen", type=int, default=32768)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--masks", nargs="+", default=["full", "causal", "varlen_causal"], choices=MASKS)
    ap.add_argument("--directions", nargs="+", default=list(DIRECTIONS), choices=DIRECTIONS)
    ap.add_argument("--variant", dest="variants", nargs="+", default=["build"], metavar="FOLDER[:FWD:DQ:DKDV]")
    ap.add_argument("--rounds", type=int, default=3, help="times each variant is timed, taking turns (median)")
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    args = ap.parse_args(argv)
    if args.rounds < 1:
        raise SystemExit(f"--rounds must be >= 1, got {args.rounds}")
    variants = [parse_variant(t) for t in args.variants]
    for text, folder, _ in variants:
        if not (folder / "cutlass" / "manifest.json").is_file():
            raise SystemExit(f"--variant {text!r}: no CUTLASS build in {folder} (maskc build ... --backend cutlass -o {folder})")
    if not torch.cuda.is_available():
        raise SystemExit("bench_cutlass_kernels needs a CUDA GPU (sm_90)")
    import triton

    from maskc.codegen.configs import LISTS
    from maskc.runtime import cutlass as cb
    from maskc.runtime.ffa import _device_lists, ffa_forward, plan_for
    from maskc.runtime.rows import backward_rows

    s, h, d = args.seqlen, args.heads, 128
    scale = d ** -0.5
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, do = (torch.randn(s, h, d, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(4))
    rows = [{"header": True, "device": torch.cuda.get_device_name(), "torch": torch.__version__,
             "triton": triton.__version__, "seqlen": s, "heads": h, "head_dim": d, "dtype": "bf16",
             "command": " ".join(sys.argv)}]
    bench = lambda fn: triton.testing.do_bench(fn, warmup=10, rep=50)  # noqa: E731
    for name in args.masks:
        mask = build_mask(name, s)[0]
        fwd_flops = 4.0 * mask.area * d * h
        out, lse = ffa_forward(q, k, v, mask, scale, 0.0, "triton")
        sq_pad = cb.padded_rows(s)
        delta_pad, lse2 = backward_rows(out, do, None, lse, sq_pad)

        def kernel_run(direction, folder, entries, n_stages):
            """(launch, outputs) of one CUTLASS kernel of `folder` on this mask's inputs."""
            which = LISTS[direction]
            plan = plan_for(mask, *cb.cg.TILES[direction], only=which)
            spec = cb.cg.spec_for_plan(direction, plan, d, "bf16", n_stages)
            if spec.name not in entries:
                raise SystemExit(f"{folder}: {spec.name} is not built")
            kernel = (folder / "cutlass" / entries[spec.name]["cubin"], entries[spec.name])
            lists = _device_lists(plan, which, q.device)
            if direction == "fwd":
                o, l = torch.empty_like(q), torch.empty(h, s, device="cuda", dtype=torch.float32)
                return (lambda: cb.forward(spec, kernel, q, k, v, o, l, lists, plan.n_q_tiles, scale),
                        lambda: {"out": o.clone(), "lse": l.clone()})
            if direction == "bwd_dq":
                dq = torch.empty_like(q)
                return (lambda: cb.backward_dq(spec, kernel, q, k, v, do, dq, lse2, delta_pad, sq_pad, lists,
                                               plan.n_q_tiles, scale),
                        lambda: {"dq": dq.clone()})
            dk, dv = torch.empty_like(k), torch.empty_like(v)
            return (lambda: cb.backward_dkdv(spec, kernel, q, k, v, do, dk, dv, lse2, delta_pad, sq_pad, lists,
                                             plan.n_k_tiles, scale),
                    lambda: {"dk": dk.clone(), "dv": dv.clone()})
        times = {text: {dn: [] for dn in args.directions} for text, _, _ in variants}
        outs = {text: {} for text, _, _ in variants}
        triton_times = []
        for round_ in range(args.rounds):
            triton_times.append(bench(lambda: ffa_forward(q, k, v, mask, scale, 0.0, "triton")))
            # rotated: round r starts with variant r, so no variant always runs right after the same one
            for text, folder, stages in variants[round_ % len(variants):] + variants[:round_ % len(variants)]:
                cb._FUNCTIONS.clear()  # the same kernel names from another folder
                cb._FRAMES.clear()  # (launch frames hold the loaded function)
                entries = {e["name"]: e for e in json.loads(cb.cg.manifest_path(folder).read_text())["kernels"]}
                for direction in args.directions:
                    run, result = kernel_run(direction, folder, entries, stages[direction])
                    run()
                    outs[text].update(result())
                    times[text][direction].append(bench(run))
        first = outs[variants[0][0]]
        triton_fwd = statistics.median(triton_times)
        rows.append({"mask": name, "seqlen": s, "variant": "triton", "fwd_ms": round(triton_fwd, 3),
                     "fwd_tflops": round(fwd_flops / triton_fwd / 1e9, 1), "fwd_ms_rounds": [round(x, 3) for x in triton_times]})
        print(f"{name:<14} {'triton':<22} fwd {triton_fwd:7.3f} ms ({rows[-1]['fwd_tflops']:5.1f})", flush=True)
        for text, _, _ in variants:
            ms = {dn: statistics.median(t) for dn, t in times[text].items()}

            def diff(n):
                a, b = outs[text][n].float(), first[n].float()
                both_inf = torch.isinf(a) & torch.isinf(b) & (a == b)
                return (a - b).abs().masked_fill(both_inf, 0).max().item()

            row = {"mask": name, "seqlen": s, "variant": text, "rounds": args.rounds,
                   "max_diff_vs_first": max(diff(n) for n in outs[text])}
            for direction, t in ms.items():
                row[f"{direction}_ms"] = round(t, 3)
                row[f"{direction}_tflops"] = round(PRODUCTS[direction] * fwd_flops / t / 1e9, 1)
                row[f"{direction}_ms_rounds"] = [round(x, 3) for x in times[text][direction]]
            if "fwd" in ms:
                row["fwd_vs_triton"] = round(triton_fwd / ms["fwd"], 3)
            if "bwd_dq" in ms and "bwd_dkdv" in ms:
                row["bwd_tflops"] = round(2.5 * fwd_flops / (ms["bwd_dq"] + ms["bwd_dkdv"]) / 1e9, 1)
            rows.append(row)
            text_ms = "  ".join(f"{dn} {row[f'{dn}_ms']:7.3f} ms ({row[f'{dn}_tflops']:5.1f})" for dn in ms)
            extra = f"  x{row['fwd_vs_triton']:.3f} Triton" if "fwd" in ms else ""
            extra += f"  backward {row['bwd_tflops']:5.1f}" if "bwd_tflops" in row else ""
            print(f"{name:<14} {text:<22} {text_ms}{extra}  diff {row['max_diff_vs_first']:.1e}", flush=True)
    os.makedirs(args.out, exist_ok=True)
    dev = torch.cuda.get_device_name().replace(" ", "_")
    path = Path(args.out) / f"cutlass-kernels-{dev}-{s}.json"
    path.write_text(json.dumps(rows, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
