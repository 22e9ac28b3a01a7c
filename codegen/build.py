"""Ahead-of-time build: `KernelSpec` -> Triton source, PTX and an sm_90 cubin, without a GPU.

`specs_for_mask` lists the specs the runtime will ask for on an H100 for a mask (or a `TilePlan`),
and `build` renders each one, compiles it with ``triton.compile`` for a CUDA target given
explicitly (Triton's NVIDIA backend needs no GPU: it ships its own ``ptxas``) and records the
results in ``OUT/manifest.json``::

    OUT/manifest.json         {"format": "maskc.build", "version": 1, "triton", "arch", ...}
    OUT/src/<name>.py         the rendered Triton source
    OUT/<name>.cubin, .ptx    the compiled kernel (sm_90 ELF, and its PTX)
    OUT/triton-cache/         Triton's own cache entries for the same compilations

What is guaranteed: every kernel listed in the manifest compiled for the target (its cubin and
PTX are there, with shared memory, warps and register use), so a template or spec that does not
compile fails at build time rather than at first launch.

What is not guaranteed: that the runtime's JIT *finds* these compilations. The runtime attaches
``triton-cache`` (see `maskc.runtime.manifest`) only when the running Triton version equals the
manifest's, and Triton's cache key also covers its own installation (a hash of its sources and
libtriton), ``ptxas``, cache-invalidating ``TRITON_*`` environment variables, the options and the
*argument specialization* of the launch. The build compiles the specialization of a typical
launch: every pointer 16-byte aligned, every stride a multiple of 16 (true for the packed
``[s, h, d]`` layout with d in 64/128/256), and ``sq``/``sk`` multiples of 16 (or, with
``lengths_divisible_by_16=False``, not). A launch with another specialization (a length of 1 or
a length that is not a multiple of 16 where the build assumed one, a misaligned view) misses the
cache and is JIT-compiled as usual, from the same source: correct, just not ahead of time.
Seen on an H200 with Triton 3.6: attention over a built causal mask compiled no kernel (Triton
only added its small launcher stubs to the cache). The cubins are for ``sm_90a`` (Triton's PTX
target on sm_90): H100/H200 only.

In a process that runs Triton's interpreter (``TRITON_INTERPRET=1``, as the CPU tests do),
``@triton.jit`` cannot give compilable functions, so `build` compiles in a child process.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

from maskc.errors import MaskError
from maskc.mask import Mask
from maskc.tiling import KERNEL_LISTS, TilePlan, lower

from .configs import LISTS, choose_config, default_config
from .render import render
from .spec import DIRECTIONS, DTYPES, HEAD_DIMS, KernelSpec, partial_class

FORMAT = "maskc.build"
VERSION = 1
SM90_MAX_SHARED = 232448  # bytes of shared memory one block may use on sm_90 (227 KiB, opt-in)

_CONSTEXPRS = ("HEAD_DIM", "BLOCK_M", "BLOCK_N", "GROUP")
_TENSORS = {"Q", "K", "V", "O", "DO", "DQ", "DK", "DV"}
_FP32_TENSORS = {"LSE", "DELTA", "DQ_ACC"}
_WORK_LISTS = set(KERNEL_LISTS)  # the tile plan's int32 arrays (maskc.tiling.kernel_lists)
_FLOATS = {"sm_scale", "qk_scale", "softcap"}
_LENGTHS = {"sq", "sk"}


class BuildError(MaskError):
    """A build that cannot be done (bad input, missing Triton, a kernel that does not compile)."""


# ---- which specs a mask needs --------------------------------------------------------------------


def _as_tuple(value, name: str) -> tuple:
    if isinstance(value, (str, int, bool)):
        value = (value,)
    value = tuple(dict.fromkeys(value))
    if not value:
        raise BuildError(f"specs_for_mask: {name} is empty")
    return value


def specs_for_mask(mask, *, head_dims=(128,), dtypes=("bf16",), gqa_groups=(1,), softcap=False,
                   directions=DIRECTIONS) -> list[KernelSpec]:
    """The kernel specs the runtime needs on an H100 (device type "cuda") for `mask`.

    `mask` is a `Mask` (lowered per direction with that direction's default tile sizes, as the
    runtime does), a `TilePlan` or a TilePlan JSON path/text (then the plan's tile sizes serve all
    three directions, with the default warps and stages, as the runtime does with a plan). One
    spec per direction (of `directions`) x head dim x dtype x GQA group; sorted, without duplicates.
    """
    head_dims, dtypes, gqa_groups = (_as_tuple(head_dims, "head_dims"), _as_tuple(dtypes, "dtypes"),
                                     _as_tuple(gqa_groups, "gqa_groups"))
    for d in head_dims:
        if isinstance(d, bool) or not isinstance(d, int) or d not in HEAD_DIMS:
            raise BuildError(f"head dim {d!r} is not supported: choose from {', '.join(map(str, HEAD_DIMS))}")
    for t in dtypes:
        if t not in DTYPES:
            raise BuildError(f"dtype {t!r} is not supported: choose from {', '.join(DTYPES)}")
    for g in gqa_groups:
        if isinstance(g, bool) or not isinstance(g, int) or g < 1:
            raise BuildError(f"GQA group {g!r} must be a positive integer")
    if isinstance(mask, (str, os.PathLike)):
        mask = load_plan(mask)
    if not isinstance(mask, (Mask, TilePlan)):
        raise BuildError(f"specs_for_mask: expected a Mask or a TilePlan, got {type(mask).__name__}")

    for direction in directions:
        if direction not in DIRECTIONS:
            raise BuildError(f"direction {direction!r} is not one of {', '.join(DIRECTIONS)}")
    specs = set()
    for direction in directions:
        for d in head_dims:
            cfg = default_config(direction, d, "cuda")
            if isinstance(mask, TilePlan):
                plan, bq, bk = mask, mask.block_q, mask.block_k
            else:  # the runtime's choice among the tuned candidates
                cfg, plan = choose_config(mask, direction, d, "cuda", lower)
                bq, bk = cfg.block_q, cfg.block_k
            partial = partial_class(plan.list_kinds(LISTS[direction]))
            for dtype in dtypes:
                for g in gqa_groups:
                    specs.add(KernelSpec(
                        direction=direction, head_dim=d, dtype=dtype, block_q=bq, block_k=bk,
                        num_warps=cfg.num_warps, num_stages=cfg.num_stages, partial=partial,
                        gqa_group=g, softcap=bool(softcap),
                    ))
    return sorted(specs)


def load_plan(path_or_text) -> TilePlan:
    """A `TilePlan` from a TilePlan JSON file (or its text)."""
    text = str(path_or_text)
    if not text.lstrip().startswith("{"):
        try:
            text = Path(text).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise BuildError(f"cannot read tile plan {path_or_text}: {getattr(e, 'strerror', None) or e}") from None
    try:
        return TilePlan.from_json(text)
    except (ValueError, KeyError, TypeError) as e:
        raise BuildError(f"{path_or_text}: not a tile plan JSON: {e}") from None


def is_plan_json(path) -> bool:
    """Whether `path` is a JSON file whose "format" is "maskc.tileplan"."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("format") == "maskc.tileplan"


# ---- compiling -----------------------------------------------------------------------------------


@contextmanager
def _env(**values):
    """Set (str) or unset (None) environment variables for the duration of the block."""
    saved = {k: os.environ.get(k) for k in values}
    try:
        for k, v in values.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _arg_type(name: str, dtype: str) -> str:
    if name in _CONSTEXPRS:
        return "constexpr"
    if name in _TENSORS:
        return "*" + dtype
    if name in _FP32_TENSORS:
        return "*fp32"
    if name in _WORK_LISTS:
        return "*i32"
    if name in _FLOATS:
        return "fp32"
    if name in _LENGTHS or name.startswith("stride_"):
        return "i32"
    raise BuildError(f"kernel parameter {name!r} has no known type (did a template change?)")


def _compile_args(fn, spec: KernelSpec, backend, lengths_divisible_by_16: bool):
    """(signature, constexprs, attrs, names specialized as divisible by 16), as Triton's JIT forms them.

    The specialization of a typical launch is written in the JIT's own form, one ``(type,
    attribute)`` pair per parameter (``("*bf16", "D")``, ``("i32", "")``, ``("fp32", None)``,
    ``("constexpr", value)``), and handed to ``JITFunction._pack_args``, so signature, constexprs
    and attrs come out exactly as the JIT of this Triton builds them (their layout differs between
    versions: Triton 3.9 gives constexprs an empty attrs entry, 3.6 does not). Without that
    method, the 3.9 layout is built here.
    """
    values = {"HEAD_DIM": spec.head_dim, "BLOCK_M": spec.block_q, "BLOCK_N": spec.block_k, "GROUP": spec.gqa_group}
    specialization, divisible = [], []
    for name in fn.arg_names:
        ty = _arg_type(name, spec.dtype)
        if ty == "constexpr":
            specialization.append(("constexpr", values[name]))
        elif ty == "fp32":  # floats are never specialized
            specialization.append(("fp32", None))
        else:
            div = ty.startswith("*") or name.startswith("stride_") or lengths_divisible_by_16
            specialization.append((ty, "D" if div else ""))
            if div:
                divisible.append(name)
    missing = set(_CONSTEXPRS) - set(fn.arg_names)
    if missing:
        raise BuildError(f"{spec.name}: kernel lacks constexpr parameter(s) {sorted(missing)}")
    if hasattr(fn, "_pack_args"):
        bound = {name: (sp[1] if sp[0] == "constexpr" else None) for name, sp in zip(fn.arg_names, specialization)}
        kwargs = {**values, "num_warps": spec.num_warps, "num_stages": spec.num_stages}
        try:
            _, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, None)
            return signature, constexprs, attrs, divisible
        except (TypeError, ValueError, KeyError, AttributeError):
            pass  # another private layout: fall back to the explicit one
    signature, constexprs, attrs = {}, {}, {}
    for i, (name, (ty, attr)) in enumerate(zip(fn.arg_names, specialization)):
        signature[name] = ty
        if ty == "constexpr":
            constexprs[(i,)] = attr
            attrs[(i,)] = []
        elif attr is not None:
            attrs[(i,)] = [["tt.divisibility", 16]] if attr == "D" else []
    return signature, constexprs, attrs, divisible


def _import_kernel(path: Path, spec: KernelSpec):
    import triton

    mod_name = f"maskc_build_{spec.name}_{hashlib.sha256(path.read_bytes()).hexdigest()[:16]}"
    module_spec = importlib.util.spec_from_file_location(mod_name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[mod_name] = module
    module_spec.loader.exec_module(module)
    fn = getattr(module, spec.name)
    if not isinstance(fn, triton.runtime.JITFunction):
        raise BuildError(f"{spec.name}: @triton.jit gave {type(fn).__name__}, not a JITFunction")
    return fn


def _resource_usage(cubin_path: Path) -> dict:
    """Registers / stack / local memory from ``cuobjdump --dump-resource-usage`` (bundled with Triton)."""
    try:
        import triton.backends.nvidia as nv

        tool = Path(nv.__file__).parent / "bin" / "cuobjdump"
        tool = str(tool) if tool.is_file() else shutil.which("cuobjdump")
        if not tool:
            return {}
        out = subprocess.run([tool, "--dump-resource-usage", str(cubin_path)], capture_output=True,
                             text=True, timeout=60).stdout
    except Exception:
        return {}
    found = {k: int(v) for k, v in re.findall(r"\b(REG|STACK|LOCAL):(\d+)", out)}
    usage = {}
    if "REG" in found:
        usage["n_regs"] = found["REG"]
    if "LOCAL" in found:
        usage["local_bytes"] = found["LOCAL"]
        usage["n_spills"] = found["LOCAL"] // 4  # as Triton's driver reports it (local size / 4)
    if "STACK" in found:
        usage["stack_bytes"] = found["STACK"]
    return usage


def _write(path: Path, data) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    if isinstance(data, bytes):
        tmp.write_bytes(data)
    else:
        tmp.write_text(data, encoding="utf-8")
    tmp.replace(path)


def progress_bar(total: int, desc: str):
    """A tqdm bar on stderr when stderr is a terminal and tqdm is installed, else None (report by lines)."""
    if not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, unit="kernel", file=sys.stderr)


def compile_spec(spec: KernelSpec, out_dir, *, arch: int = 90, lengths_divisible_by_16: bool = True) -> dict:
    """Render, write and compile one spec into `out_dir`; its manifest entry."""
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler.compiler import make_backend
    except ImportError as e:
        raise BuildError(f"maskc build needs triton (pip install triton): {e}") from None
    out = Path(out_dir)
    (out / "src").mkdir(parents=True, exist_ok=True)
    src = render(spec)
    src_path = out / "src" / f"{spec.name}.py"
    if not src_path.exists() or src_path.read_text(encoding="utf-8") != src:
        _write(src_path, src)
    stem = spec.name if lengths_divisible_by_16 else f"{spec.name}.anylen"
    target = GPUTarget("cuda", arch, 32)
    t0 = time.perf_counter()
    # the JIT decorator must give a JITFunction (not the interpreter's), and Triton's cache
    # managers read TRITON_CACHE_DIR when each is created: both only for this compilation
    with _env(TRITON_CACHE_DIR=str((out / "triton-cache").resolve()), TRITON_INTERPRET=None):
        fn = _import_kernel(src_path, spec)
        backend = make_backend(target)
        signature, constexprs, attrs, divisible = _compile_args(fn, spec, backend, lengths_divisible_by_16)
        source = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
        try:
            compiled = triton.compile(source, target=target,
                                      options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
        except Exception as e:
            raise BuildError(f"{spec.name}: compiling for sm_{arch} failed: {type(e).__name__}: {e}") from e
    seconds = time.perf_counter() - t0
    cubin, ptx = compiled.asm["cubin"], compiled.asm["ptx"]
    _write(out / f"{stem}.cubin", cubin)
    _write(out / f"{stem}.ptx", ptx)
    md = compiled.metadata
    entry = {
        "spec": asdict(spec),
        "name": spec.name,
        "key": spec.key(),
        "source": f"src/{spec.name}.py",
        "source_sha256": hashlib.sha256(src.encode()).hexdigest(),
        "cubin": f"{stem}.cubin",
        "cubin_sha256": hashlib.sha256(cubin).hexdigest(),
        "ptx": f"{stem}.ptx",
        "shared": int(md.shared),
        "fits_shared": int(md.shared) <= SM90_MAX_SHARED if arch == 90 else None,
        "num_warps": int(md.num_warps),
        "num_stages": int(md.num_stages),
        "specialization": {"divisible_by_16": divisible, "lengths_divisible_by_16": bool(lengths_divisible_by_16)},
        "triton_hash": compiled.hash,
        "compile_seconds": round(seconds, 3),
    }
    entry.update(_resource_usage(out / f"{stem}.cubin"))
    return entry


def _interpreter_mode() -> bool:
    """Whether this process's Triton runs kernels through the interpreter (``TRITON_INTERPRET``).

    Then ``@triton.jit`` (including triton.language's own helpers, decorated when triton was
    imported) gives interpreter functions, which cannot be compiled: the build runs in a child
    process without ``TRITON_INTERPRET``.
    """
    if os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes"):
        return True
    import triton
    import triton.language.standard as std

    fn = getattr(std, "cdiv", None)
    return fn is not None and not isinstance(fn, triton.runtime.JITFunction)


def _compile_all(specs, out: Path, arch: int, lengths_divisible_by_16: bool):
    """Manifest entries of `specs`, one at a time (in this process, or in a child process when this
    one runs Triton's interpreter)."""
    if not _interpreter_mode():
        for spec in specs:
            yield compile_spec(spec, out, arch=arch, lengths_divisible_by_16=lengths_divisible_by_16)
        return
    job = json.dumps({"specs": [asdict(s) for s in specs], "out_dir": str(out.resolve()), "arch": arch,
                      "lengths_divisible_by_16": lengths_divisible_by_16})
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.Popen([sys.executable, "-m", "maskc.codegen.build", "--worker"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env)
    try:
        proc.stdin.write(job)
        proc.stdin.close()
        for line in proc.stdout:
            msg = json.loads(line)
            if "error" in msg:
                raise BuildError(msg["error"])
            yield msg["entry"]
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    if proc.returncode:
        raise BuildError(f"the build worker (a child process without TRITON_INTERPRET) exited with status {proc.returncode}")


def _worker() -> int:
    job = json.loads(sys.stdin.read())
    for data in job["specs"]:
        try:
            entry = compile_spec(KernelSpec(**data), job["out_dir"], arch=job["arch"],
                                 lengths_divisible_by_16=job["lengths_divisible_by_16"])
        except MaskError as e:
            print(json.dumps({"error": str(e)}), flush=True)
            return 0
        print(json.dumps({"entry": entry}), flush=True)
    return 0


def _entry_id(entry: dict) -> tuple:
    return entry["name"], entry.get("specialization", {}).get("lengths_divisible_by_16", True)


def _load_existing(path: Path, triton_version: str, arch: str) -> list[dict]:
    if not path.exists():
        return []
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise BuildError(f"{path} exists but is not readable JSON ({e}); remove it or pick another -o") from None
    if not isinstance(old, dict) or old.get("format") != FORMAT:
        raise BuildError(f"{path} exists but is not a maskc build manifest; remove it or pick another -o")
    if old.get("triton") != triton_version or old.get("arch") != arch:
        print(f"maskc build: {path} was built by Triton {old.get('triton')} for {old.get('arch')}; "
              f"replacing its {len(old.get('kernels', []))} kernel(s) (Triton {triton_version}, {arch})",
              file=sys.stderr)
        return []
    return list(old.get("kernels", []))


def build(specs, out_dir, *, arch: int = 90, progress: bool = True, lengths_divisible_by_16: bool = True) -> dict:
    """Compile `specs` ahead of time into `out_dir`; returns the manifest (also written to
    ``out_dir/manifest.json``, merged with the kernels of an earlier build there).

    Reports each spec's compile time: a tqdm bar on stderr when tqdm is installed, else one line
    per spec on stderr (``progress=False``: silent). See the module docstring for what the runtime
    can and cannot reuse.
    """
    try:
        import triton
    except ImportError as e:
        raise BuildError(f"maskc build needs triton (pip install triton): {e}") from None
    specs = sorted(dict.fromkeys(specs))
    for s in specs:
        if not isinstance(s, KernelSpec):
            raise BuildError(f"build: expected KernelSpec objects, got {type(s).__name__}")
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BuildError(f"cannot create build folder {out}: {e.strerror or e}") from None
    arch_name = f"sm_{arch}"
    man_path = out / "manifest.json"
    kernels = {_entry_id(e): e for e in _load_existing(man_path, triton.__version__, arch_name)}

    bar = progress_bar(len(specs), "maskc build") if progress else None
    try:
        for i, entry in enumerate(_compile_all(specs, out, arch, lengths_divisible_by_16)):
            kernels[_entry_id(entry)] = entry
            if bar is not None:
                bar.update(1)
                bar.set_postfix_str(f"{entry['name']} {entry['compile_seconds']:.2f}s")
            elif progress:
                print(f"[{i + 1}/{len(specs)}] {entry['name']}: {entry['compile_seconds']:.2f} s", file=sys.stderr)
    finally:
        if bar is not None:
            bar.close()

    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "triton": triton.__version__,
        "arch": arch_name,
        "triton_cache": "triton-cache",
        "kernels": sorted(kernels.values(), key=lambda e: (e["name"], str(_entry_id(e)))),
        "built": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    _write(man_path, json.dumps(manifest, indent=1) + "\n")
    return manifest


__all__ = ["BuildError", "build", "compile_spec", "is_plan_json", "load_plan", "specs_for_mask"]


if __name__ == "__main__" and sys.argv[1:] == ["--worker"]:
    raise SystemExit(_worker())
