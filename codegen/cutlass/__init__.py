"""CUTLASS/CuTe backend: Hopper FFA kernels rendered from jinja2 templates, built ahead of time with nvcc.

A spec with ``backend="cutlass"`` renders ``templates/ffa_<direction>.cu.j2`` (forward, dQ, dK/dV;
shared pieces in ``ffa_common.cuh.j2``) to CUDA C++ on CuTe (TMA loads completing on mbarriers,
wgmma for every product, a producer warpgroup and two consumer warpgroups, a persistent grid) with
one ``extern "C"`` entry named ``spec.name``. `build` compiles each spec with::

    nvcc -cubin -gencode=arch=compute_90a,code=sm_90a -O3 -std=c++17 -I <CUTLASS include> ...

on any machine with nvcc (no GPU needed) and writes ``OUT/cutlass/manifest.json`` in the format of
the Triton backend's manifest (``"format": "maskc.build"``), with ``"backend": "cutlass"`` and the
nvcc and CUTLASS versions. The runtime (`maskc.runtime.cutlass`) loads the cubins through
cuda-bindings; no C++ extension is built on the user's machine.

What it covers: the forward (out and lse, the Triton backend's contract) and the backward (dQ;
dK and dV without atomics) for head dims 64 and 128, bf16 and fp16, any partial class, any GQA
group (a run-time argument: the spec's ``gqa_group`` is 1), no softcap. Tiles are fixed per
direction (`TILES`). Everything else is Triton's (`supports` says why a spec is not covered).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, replace
from datetime import datetime, timezone
from pathlib import Path

import jinja2

from ..build import _write, progress_bar
from ..configs import LISTS
from ..spec import KernelSpec, partial_class

FORMAT = "maskc.build"
VERSION = 1
ARCH = "sm_90a"
TEMPLATES = Path(__file__).parent / "templates"
BLOCK_Q = 128  # the forward's tiles
BLOCK_K = 128
# (block_q, block_k) per direction: dQ walks 64-key tiles under a 128-row query tile, dK/dV 64-row
# query tiles under a 128-row key tile (two consumer warpgroups of 64 rows; the accumulators fit)
TILES = {"fwd": (BLOCK_Q, BLOCK_K), "bwd_dq": (128, 64), "bwd_dkdv": (64, 128)}
NUM_WARPS = 12  # one producer and two consumer warpgroups
NUM_STAGES = 2  # K/V shared-memory ring depth of the default build
STAGE_CHOICES = (3, 2)  # ring depths the runtime looks for, after the build's own (`stage_preference`)
# Ring depth of the default build per (direction, partial class); NUM_STAGES elsewhere. dK/dV on
# the rect and diag masks walks a 3-deep Q/dO ring: measured 1-9% faster than 2 stages with two
# item buffers (below) on those masks of the suite, neutral on none (docs/kernel-notes.md, "A
# 3-stage ring for dK/dV"); dQ with 3 stages was 0-8% slower.
RING_STAGES = {("bwd_dkdv", "rect"): 3, ("bwd_dkdv", "diag"): 3}
# Buffers of a work item's stationary tiles (forward: Q; dQ: Q and dO; dK/dV: K and V) per
# (direction, partial class); 1 elsewhere. With two, the producer loads item n + 1's tiles while
# item n runs instead of after it, so short work lists do not wait for that load at each item
# boundary; it costs shared memory (194-196 KB instead of 130 KB, less L1). Measured on the H100
# (docs/kernel-notes.md, "Two item buffers in the backward"): dQ 2-6% faster on diag; none-class
# kernels (full, block causal, magi_video) and dQ on rect were 1-6% slower, so they keep one.
# (dK/dV gained 1-7% on rect and diag with two, but its 3-stage ring above gains more and leaves
# no room for a second K/V buffer.)
ITEM_BUFFERS = {("bwd_dq", "diag"): 2}
HEAD_DIMS = (64, 128)
# setmaxnreg per warpgroup (producer, each consumer): 128 * p + 256 * c <= 65536 registers per SM.
# The consumers take 240 where they need it (forward; dK/dV at head dim 128, whose two fp32
# accumulators fill most of them); elsewhere the producer keeps 40, below which its loops spill.
REGISTERS = {"fwd": (24, 240), "bwd_dq": (40, 232), "bwd_dkdv": (40, 232), ("bwd_dkdv", 128): (24, 240)}
DTYPES = {"bf16": "cutlass::bfloat16_t", "fp16": "cutlass::half_t"}
MAX_SHARED = 227 * 1024  # shared memory one CTA may opt into on sm_90
STATIC_SHARED = 1024  # the kernels' static shared memory (cuobjdump -res-usage: SHARED:1024)
_PARTIAL_ENUM = {"none": "kNone", "rect": "kRect", "diag": "kDiag"}
_ELEMENT_BYTES = 2


def ring_stages(direction: str, partial: str) -> int:
    """Ring depth the default build gives a kernel of `direction` and partial class `partial`."""
    return RING_STAGES.get((direction, partial), NUM_STAGES)


def stage_preference(direction: str, partial: str) -> tuple[int, ...]:
    """Ring depths in the order the runtime takes a built kernel: the default build's (measured
    fastest), then the others of STAGE_CHOICES (a build made with other depths still runs)."""
    first = ring_stages(direction, partial)
    return (first, *(s for s in STAGE_CHOICES if s != first))


def item_buffers(spec: KernelSpec) -> int:
    """Buffers of `spec`'s work-item tiles: ITEM_BUFFERS' choice where it fits in an sm_90 CTA's
    shared memory with the spec's ring depth, else 1."""
    wanted = ITEM_BUFFERS.get((spec.direction, spec.partial), 1)
    if wanted > 1 and _shared_bytes(spec, wanted, False) + STATIC_SHARED > MAX_SHARED:
        return 1
    return wanted


def store_by_tma(spec: KernelSpec) -> bool:
    """Whether `spec`'s kernel stores its output tile (O; dQ; dK, then dV) through a staging tile in
    shared memory and TMA: wherever that tile fits beside the item buffers and the ring, else (a
    3-deep forward ring at head dim 128) with plain stores from the accumulator. Measured on the H100
    (docs/kernel-notes.md, "The epilogue by TMA"): short work lists gain most (sliding window 8k:
    forward -5%, dQ -8%, dK/dV -2.5%), long ones move within the run's spread."""
    return _shared_bytes(spec, item_buffers(spec), True) + STATIC_SHARED <= MAX_SHARED


def registers(spec: KernelSpec) -> tuple[int, int]:
    """(producer, consumer) setmaxnreg of `spec`'s kernel."""
    return REGISTERS.get((spec.direction, spec.head_dim), REGISTERS[spec.direction])


class CutlassBuildError(RuntimeError):
    """nvcc or the CUTLASS headers are missing, or a kernel does not compile."""


def supports(spec: KernelSpec) -> str | None:
    """None when the CUTLASS backend has a kernel for `spec`'s shape, else the reason it has not."""
    if spec.dtype not in DTYPES:
        return f"dtype {spec.dtype!r}: the CUTLASS backend takes {', '.join(DTYPES)}"
    if spec.head_dim not in HEAD_DIMS:
        return f"head dim {spec.head_dim}: the CUTLASS backend takes {', '.join(map(str, HEAD_DIMS))}"
    if spec.softcap:
        return "softcap: not in the CUTLASS backend"
    if spec.gqa_group != 1:
        return "gqa_group: a CUTLASS kernel takes the GQA group at run time, its spec has gqa_group=1"
    bq, bk = TILES[spec.direction]
    if (spec.block_q, spec.block_k) != (bq, bk):
        return f"tiles {spec.block_q}x{spec.block_k}: the CUTLASS {spec.direction} kernel runs {bq}x{bk}"
    if shared_bytes(spec) + STATIC_SHARED > MAX_SHARED:
        return (f"{spec.num_stages} stages: {shared_bytes(spec) + STATIC_SHARED} bytes of shared memory per CTA, "
                f"over the {MAX_SHARED} an sm_90 CTA may have (take fewer stages)")
    return None


def cutlass_spec(spec: KernelSpec) -> KernelSpec:
    """The CUTLASS spec for the same work as `spec` (its tiles, warps and stages are the backend's)."""
    bq, bk = TILES[spec.direction]
    return replace(spec, block_q=bq, block_k=bk, num_warps=NUM_WARPS,
                   num_stages=ring_stages(spec.direction, spec.partial), deterministic=True, gqa_group=1,
                   backend="cutlass")


def spec_for_plan(direction: str, plan, head_dim: int, dtype: str, num_stages: int | None = None) -> KernelSpec:
    """The CUTLASS spec of `direction` for a tile plan lowered to that direction's `TILES`: the plan
    decides only the partial class of the lists the kernel walks (the GQA group is a run-time
    argument, so the spec's is 1). `num_stages`: the ring depth (default: the build's,
    `ring_stages`)."""
    bq, bk = TILES[direction]
    partial = partial_class(plan.list_kinds(LISTS[direction]))
    return KernelSpec(direction=direction, head_dim=head_dim, dtype=dtype, block_q=bq, block_k=bk,
                      num_warps=NUM_WARPS, num_stages=ring_stages(direction, partial) if num_stages is None else num_stages,
                      partial=partial, backend="cutlass")


def specs_for_mask(mask, *, head_dims=(128,), dtypes=("bf16",), directions=("fwd",)) -> list[KernelSpec]:
    """The CUTLASS specs attention over `mask` (a Mask, or for the forward a 128 x 128 TilePlan) asks
    for in `directions` (``fwd``, ``bwd_dq``, ``bwd_dkdv``)."""
    from maskc.mask import Mask
    from maskc.tiling import TilePlan, lower

    for d in head_dims:
        if d not in HEAD_DIMS:
            raise CutlassBuildError(f"head dim {d}: the CUTLASS backend builds {', '.join(map(str, HEAD_DIMS))}")
    for t in dtypes:
        if t not in DTYPES:
            raise CutlassBuildError(f"dtype {t!r}: the CUTLASS backend builds {', '.join(DTYPES)}")
    for direction in directions:
        if direction not in TILES:
            raise CutlassBuildError(f"direction {direction!r}: the CUTLASS backend builds {', '.join(TILES)}")
    specs = set()
    for direction in directions:
        bq, bk = TILES[direction]
        if isinstance(mask, TilePlan):
            if (mask.block_q, mask.block_k) != (bq, bk):
                raise CutlassBuildError(f"the tile plan has {mask.block_q}x{mask.block_k} tiles; the CUTLASS "
                                        f"{direction} kernel runs {bq}x{bk} (pass the mask to build every direction)")
            plan = mask
        elif isinstance(mask, Mask):
            plan = lower(mask, bq, bk, only=LISTS[direction])
        else:
            raise CutlassBuildError(f"specs_for_mask: expected a Mask or a TilePlan, got {type(mask).__name__}")
        specs |= {spec_for_plan(direction, plan, d, t) for d in head_dims for t in dtypes}
    return sorted(specs)


def shared_bytes(spec: KernelSpec) -> int:
    """Dynamic shared memory one CTA asks for: the stationary tiles (Q; Q and dO; K and V) per item
    buffer, the ring of the two walked operands, the output's staging tile (`store_by_tma`),
    barriers, and 1 KiB to align to 1024 (each template checks it)."""
    return _shared_bytes(spec, item_buffers(spec), store_by_tma(spec))


def _shared_bytes(spec: KernelSpec, buffers: int, staging: bool) -> int:
    outer_rows, inner_rows = ((spec.block_k, spec.block_q) if spec.direction == "bwd_dkdv"
                              else (spec.block_q, spec.block_k))
    n_outer = (1 if spec.direction == "fwd" else 2) * buffers  # Q; Q and dO; K and V: per item buffer
    tile_outer = outer_rows * spec.head_dim * _ELEMENT_BYTES
    tile_inner = inner_rows * spec.head_dim * _ELEMENT_BYTES
    barriers = 8 * (2 * buffers + 4 * spec.num_stages) + 8  # + the two published work slots
    storage = n_outer * tile_outer + 2 * spec.num_stages * tile_inner + barriers
    if spec.direction == "bwd_dkdv":  # lse and delta of the query tile's rows, per consumer warpgroup, x2
        storage += 2 * 2 * 2 * inner_rows * 4
    if staging:  # the output tile staged for its TMA store
        storage += tile_outer
    storage = (storage + 1023) // 1024 * 1024  # the struct is 1024-aligned, so its size is too
    return storage + 1024


@functools.lru_cache(maxsize=1)
def _env() -> jinja2.Environment:
    return jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)), undefined=jinja2.StrictUndefined,
                              keep_trailing_newline=True)


@functools.lru_cache(maxsize=64)
def render(spec: KernelSpec) -> str:
    """CUDA C++ source of `spec`'s kernel; its ``extern "C"`` entry is named ``spec.name``."""
    reason = supports(spec) if spec.backend == "cutlass" else "its backend is not 'cutlass'"
    if reason:
        raise CutlassBuildError(f"{spec.name}: no CUTLASS kernel: {reason}")
    template = {"fwd": "ffa_fwd.cu.j2", "bwd_dq": "ffa_bwd_dq.cu.j2", "bwd_dkdv": "ffa_bwd_dkdv.cu.j2"}[spec.direction]
    producer_regs, consumer_regs = registers(spec)
    return _env().get_template(template).render(
        spec=spec, ELEMENT=DTYPES[spec.dtype], STAGES=spec.num_stages, PARTIAL=_PARTIAL_ENUM[spec.partial],
        SHARED=shared_bytes(spec), PRODUCER_REGS=producer_regs, CONSUMER_REGS=consumer_regs,
        ITEM_BUFFERS=item_buffers(spec), STORE_TMA=store_by_tma(spec))


# ---- toolchain ---------------------------------------------------------------------------------


def cutlass_include() -> Path:
    """The CUTLASS/CuTe headers: ``$CUTLASS_INCLUDE``, else those of the ``nvidia-cutlass`` package."""
    env = os.environ.get("CUTLASS_INCLUDE")
    if env:
        path = Path(env)
        if not (path / "cute" / "tensor.hpp").is_file():
            raise CutlassBuildError(f"CUTLASS_INCLUDE={env} has no cute/tensor.hpp")
        return path
    try:
        import cutlass_library
    except ImportError:
        raise CutlassBuildError(
            "the CUTLASS headers were not found: pip install nvidia-cutlass (or set CUTLASS_INCLUDE to a "
            "CUTLASS checkout's include folder)") from None
    path = Path(cutlass_library.__file__).parent / "source" / "include"
    if not (path / "cute" / "tensor.hpp").is_file():
        raise CutlassBuildError(f"nvidia-cutlass is installed but {path} has no cute/tensor.hpp")
    return path


def cutlass_version(include: Path | None = None) -> str:
    text = ((include or cutlass_include()) / "cutlass" / "version.h").read_text()
    parts = [re.search(rf"#define CUTLASS_{p}\s+(\d+)", text) for p in ("MAJOR", "MINOR", "PATCH")]
    return ".".join(m.group(1) if m else "?" for m in parts)


def nvcc_path() -> str:
    """nvcc: ``$NVCC``, else on PATH, else under ``$CUDA_HOME``/``/usr/local/cuda``."""
    for cand in (os.environ.get("NVCC"), shutil.which("nvcc"),
                 os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")):
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    raise CutlassBuildError("nvcc was not found (set NVCC or CUDA_HOME, or put nvcc on PATH): the CUTLASS "
                            "backend is compiled ahead of time with nvcc")


@functools.lru_cache(maxsize=4)
def nvcc_version(nvcc: str | None = None) -> str:
    out = subprocess.run([nvcc or nvcc_path(), "--version"], capture_output=True, text=True).stdout
    m = re.search(r"release ([\d.]+), V([\d.]+)", out)
    return m.group(2) if m else out.strip().splitlines()[-1] if out.strip() else "unknown"


def nvcc_command(src: Path, cubin: Path, include: Path, nvcc: str) -> list[str]:
    return [nvcc, "-cubin", "-gencode=arch=compute_90a,code=sm_90a", "-O3", "-std=c++17", "--use_fast_math",
            "--expt-relaxed-constexpr", "-DNDEBUG", "-Xptxas=-v", f"-I{include}", "-o", str(cubin), str(src)]


def _resources(ptxas_log: str, name: str) -> dict:
    """Registers, shared memory and spills of `name` from ``ptxas -v``'s report."""
    usage = {}
    block = ptxas_log.split(f"Compiling entry function '{name}'", 1)[-1]
    if m := re.search(r"Used (\d+) registers", block):
        usage["n_regs"] = int(m.group(1))
    if m := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", block):
        usage["stack_bytes"], usage["spill_store_bytes"], usage["spill_load_bytes"] = map(int, m.groups())
    return usage


def compile_spec(spec: KernelSpec, out_dir) -> dict:
    """Render and compile one CUTLASS spec into ``out_dir``; its manifest entry."""
    include, nvcc = cutlass_include(), nvcc_path()
    out = Path(out_dir)
    (out / "src").mkdir(parents=True, exist_ok=True)
    src = render(spec)
    src_path = out / "src" / f"{spec.name}.cu"
    if not src_path.exists() or src_path.read_text() != src:
        _write(src_path, src)
    cubin_path = out / f"{spec.name}.cubin"
    cmd = nvcc_command(src_path, cubin_path, include, nvcc)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode:
        errors = [line for line in proc.stderr.splitlines() if "error" in line][:10]
        raise CutlassBuildError(f"{spec.name}: nvcc failed (exit {proc.returncode}):\n" + "\n".join(errors or
                                [proc.stderr[-3000:]]))
    cubin = cubin_path.read_bytes()
    entry = {
        "spec": asdict(spec),
        "name": spec.name,
        "key": spec.key(),
        "source": f"src/{spec.name}.cu",
        "source_sha256": hashlib.sha256(src.encode()).hexdigest(),
        "cubin": cubin_path.name,
        "cubin_sha256": hashlib.sha256(cubin).hexdigest(),
        "shared": shared_bytes(spec),
        "threads": 32 * spec.num_warps,
        "num_warps": spec.num_warps,
        "num_stages": spec.num_stages,
        "compile_seconds": round(seconds, 3),
        "nvcc_command": " ".join(Path(c).name if i == 0 else c for i, c in enumerate(cmd)),
    }
    entry.update(_resources(proc.stderr + proc.stdout, spec.name))
    return entry


def manifest_path(out_dir) -> Path:
    return Path(out_dir) / "cutlass" / "manifest.json"


def build(specs, out_dir, *, progress: bool = True, jobs: int | None = None) -> dict:
    """Compile CUTLASS `specs` into ``out_dir/cutlass`` with `jobs` nvcc processes at a time (default:
    one per CPU); the manifest (merged with an earlier one there)."""
    specs = sorted(dict.fromkeys(cutlass_spec(s) if s.backend != "cutlass" else s for s in specs))
    for s in specs:
        reason = supports(s)
        if reason:
            raise CutlassBuildError(f"{s.name}: {reason}")
    include, nvcc = cutlass_include(), nvcc_path()
    versions = {"nvcc": nvcc_version(nvcc), "cutlass": cutlass_version(include), "arch": ARCH}
    out = Path(out_dir) / "cutlass"
    out.mkdir(parents=True, exist_ok=True)
    path = manifest_path(out_dir)
    kernels = {}
    if path.exists():
        old = json.loads(path.read_text())
        if all(old.get(k) == v for k, v in versions.items()):
            kernels = {e["name"]: e for e in old.get("kernels", [])}
    bar = progress_bar(len(specs), "maskc build (cutlass)") if progress else None
    from concurrent.futures import ThreadPoolExecutor

    jobs = max(1, min(jobs or os.cpu_count() or 1, len(specs) or 1))
    try:
        with ThreadPoolExecutor(jobs) as pool:  # nvcc runs in child processes: threads suffice
            done = pool.map(lambda s: compile_spec(s, out), specs)
            for i, entry in enumerate(done):
                kernels[entry["name"]] = entry
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix_str(f"{entry['name']} {entry['compile_seconds']:.0f}s")
                elif progress:
                    print(f"[{i + 1}/{len(specs)}] {entry['name']}: {entry['compile_seconds']:.1f} s, "
                          f"{entry.get('n_regs', '?')} registers, {entry.get('spill_store_bytes', '?')} spill bytes",
                          file=sys.stderr)
    finally:
        if bar is not None:
            bar.close()
    manifest = {"format": FORMAT, "version": VERSION, "backend": "cutlass", **versions,
                "kernels": sorted(kernels.values(), key=lambda e: e["name"]),
                "built": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    _write(path, json.dumps(manifest, indent=1) + "\n")
    return manifest


__all__ = ["CutlassBuildError", "build", "compile_spec", "cutlass_spec", "render", "spec_for_plan", "specs_for_mask",
           "supports"]
