"""Ahead-of-time builds (`maskc.codegen.build`, `maskc build`): sm_90 cubins on a CPU-only machine.

Compiling one kernel takes one to two seconds: the module builds one spec set (causal(256), head
dim 64, bf16: three kernels) once and the other tests copy it, so most later compiles are hits
in the copied Triton cache.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from datetime import datetime

import pytest

import maskc
from maskc.cli import main
from maskc.codegen.render import render
from maskc.codegen.spec import KernelSpec
from maskc.tiling import lower

triton = pytest.importorskip("triton")
build_mod = pytest.importorskip("maskc.codegen.build")
BuildError, build, specs_for_mask = build_mod.BuildError, build_mod.build, build_mod.specs_for_mask

ELF_MAGIC = b"\x7fELF"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("aot") / "build"
    specs = specs_for_mask(maskc.causal(256), head_dims=(64,), dtypes=("bf16",))
    manifest = build(specs, out, progress=False)
    return out, specs, manifest


@pytest.fixture
def build_copy(built, tmp_path):
    out, specs, _ = built
    dst = tmp_path / "build"
    shutil.copytree(out, dst)
    return dst, specs


def test_specs_for_causal_mask(built):
    _, specs, _ = built
    assert [s.direction for s in specs] == ["bwd_dkdv", "bwd_dq", "fwd"]
    assert {s.partial for s in specs} == {"diag"}
    fwd = specs[-1]
    assert (fwd.head_dim, fwd.dtype, fwd.block_q, fwd.block_k, fwd.num_warps, fwd.num_stages) == (64, "bf16", 128, 64, 4, 3)


def test_aligned_block_causal_needs_no_masking_code():
    specs = specs_for_mask(maskc.block_causal(1024, 256), head_dims=(64, 128, 256))
    assert len(specs) == 9
    assert {s.partial for s in specs} == {"none"}
    assert {s.partial for s in specs_for_mask(maskc.full(100))} == {"rect"}


def test_specs_cross_product_and_tile_plan(tmp_path):
    specs = specs_for_mask(maskc.causal(512), head_dims=(64, 128), dtypes=("bf16", "fp16"), gqa_groups=(1, 4),
                           softcap=True)
    assert len(specs) == 3 * 2 * 2 * 2 and all(s.softcap for s in specs)
    plan = lower(maskc.causal(512), 64, 64)
    path = tmp_path / "plan.json"
    path.write_text(plan.to_json())
    for source in (plan, str(path)):
        got = specs_for_mask(source, head_dims=(128,))
        assert [(s.direction, s.block_q, s.block_k) for s in got] == [
            ("bwd_dkdv", 64, 64), ("bwd_dq", 64, 64), ("fwd", 64, 64)]


@pytest.mark.parametrize("kwargs, message", [
    ({"head_dims": (96,)}, "head dim 96"),
    ({"dtypes": ("fp8",)}, "dtype 'fp8'"),
    ({"gqa_groups": (0,)}, "GQA group 0"),
])
def test_specs_for_mask_rejects_bad_input(kwargs, message):
    with pytest.raises(BuildError, match=message):
        specs_for_mask(maskc.causal(64), **kwargs)


def test_manifest(built):
    out, specs, manifest = built
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk == manifest
    assert manifest["format"] == "maskc.build" and manifest["version"] == 1
    assert manifest["triton"] == triton.__version__
    assert manifest["arch"] == "sm_90" and manifest["triton_cache"] == "triton-cache"
    assert (out / "triton-cache").is_dir()
    datetime.fromisoformat(manifest["built"])
    assert [e["name"] for e in manifest["kernels"]] == [s.name for s in specs]
    for spec, e in zip(specs, manifest["kernels"]):
        assert KernelSpec(**e["spec"]) == spec
        assert (out / e["source"]).read_text() == render(spec)
        assert e["source_sha256"] == __import__("hashlib").sha256(render(spec).encode()).hexdigest()
        assert e["num_warps"] == spec.num_warps
        assert 0 < e["shared"] <= build_mod.SM90_MAX_SHARED and e["fits_shared"] is True
        assert e["compile_seconds"] >= 0
        assert e["specialization"]["lengths_divisible_by_16"] is True


def test_cubin_and_ptx(built):
    out, _, manifest = built
    for e in manifest["kernels"]:
        cubin = (out / e["cubin"]).read_bytes()
        assert cubin[:4] == ELF_MAGIC
        ptx = (out / e["ptx"]).read_text()
        assert f".entry {e['name']}(" in ptx
        assert ".target sm_90" in ptx


def test_second_build_merges(build_copy):
    out, specs = build_copy
    extra = [s for s in specs_for_mask(maskc.block_causal(256, 128), head_dims=(64,)) if s.direction == "fwd"]
    assert extra[0].partial == "none"
    manifest = build(extra, out, progress=False)
    names = [e["name"] for e in manifest["kernels"]]
    assert sorted(names) == sorted([s.name for s in specs] + [extra[0].name])
    # the same spec for lengths that are not multiples of 16 is a second entry, not a replacement
    manifest = build([specs[-1]], out, progress=False, lengths_divisible_by_16=False)
    same = [e for e in manifest["kernels"] if e["name"] == specs[-1].name]
    assert sorted(e["specialization"]["lengths_divisible_by_16"] for e in same) == [False, True]
    anylen = next(e for e in same if not e["specialization"]["lengths_divisible_by_16"])
    assert (out / anylen["cubin"]).read_bytes()[:4] == ELF_MAGIC
    assert "sq" not in anylen["specialization"]["divisible_by_16"]
    assert len(json.loads((out / "manifest.json").read_text())["kernels"]) == 5


def test_cli_build(build_copy, capsys):
    out, specs = build_copy
    assert main(["build", "causal(256)", "-o", str(out), "--head-dim", "64", "--no-progress"]) == 0
    text = capsys.readouterr().out
    for s in specs:
        assert s.name in text
    assert " s  shared " in text
    assert f"manifest: {out / 'manifest.json'}" in text


def test_cli_build_tile_plan(build_copy, tmp_path, capsys):
    out, _ = build_copy
    path = tmp_path / "plan.json"
    path.write_text(lower(maskc.causal(256), 128, 64).to_json())
    assert main(["build", str(path), "-o", str(out), "--head-dim", "64", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "tile plan, 128x64" in text
    assert "ffa_bwd_dq_d64_bf16_m128n64_w8s3_diag_g1" in text
    names = {e["name"] for e in json.loads((out / "manifest.json").read_text())["kernels"]}
    assert "ffa_bwd_dkdv_d64_bf16_m128n64_w8s3_diag_g1" in names


@pytest.mark.parametrize("argv, message", [
    (["--dtype", "fp8"], "invalid choice: 'fp8'"),
    (["--head-dim", "96"], "invalid choice: 96"),
    (["--head-dim", "x"], "invalid int value: 'x'"),
    (["--gqa-group", "0"], "expected a positive integer"),
])
def test_cli_rejects_bad_options(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["build", "causal(256)", "-o", str(tmp_path / "b"), *argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_cli_rejects_bad_mask_and_bad_manifest(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["build", "causal(", "-o", str(tmp_path / "b")])
    assert exc.value.code == 2
    assert "maskc: error: MASK 'causal('" in capsys.readouterr().err
    out = tmp_path / "b2"
    out.mkdir()
    (out / "manifest.json").write_text("{not json")
    with pytest.raises(SystemExit) as exc:
        main(["build", "causal(256)", "-o", str(out), "--head-dim", "64", "--no-progress"])
    assert exc.value.code == 2
    assert "not readable JSON" in capsys.readouterr().err


JIT_KEY_CHECK = textwrap.dedent(
    """
    # Recompute the cache hash Triton's JIT would use for a typical launch (CPU tensors stand in
    # for CUDA ones: only dtype and alignment matter) and compare it with the build's.
    import hashlib, importlib.util, json, sys
    out = sys.argv[1]
    try:
        import torch, triton
        from triton import knobs
        from triton._C.libtriton import get_cache_invalidating_env_vars
        from triton.backends.compiler import GPUTarget
        from triton.compiler.compiler import ASTSource, get_cache_key, make_backend
        from triton.runtime.jit import create_function_from_signature
    except Exception as e:
        print("SKIP", e); sys.exit(0)
    from maskc.codegen.spec import KernelSpec
    man = json.load(open(out + "/manifest.json"))
    backend = make_backend(GPUTarget("cuda", 90, 32))
    for e in man["kernels"]:
        spec = KernelSpec(**e["spec"])
        s = importlib.util.spec_from_file_location("k_" + spec.name, out + "/" + e["source"])
        m = importlib.util.module_from_spec(s); s.loader.exec_module(m)
        fn = getattr(m, spec.name)
        dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[spec.dtype]
        h, d, args = 8, spec.head_dim, []
        for n in fn.arg_names:
            if n in ("HEAD_DIM", "BLOCK_M", "BLOCK_N", "GROUP"): break
            if n in ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV"): args.append(torch.empty(64, dtype=dt))
            elif n in ("LSE", "DELTA", "DQ_ACC"): args.append(torch.empty(64, dtype=torch.float32))
            elif n in ("sq", "sk"): args.append(4096)
            elif n.startswith("stride_"): args.append(h * d if n.endswith("s") else d)
            elif n in ("sm_scale", "qk_scale", "softcap"): args.append(0.0 if n == "softcap" else 0.125)
            else: args.append(torch.empty(64, dtype=torch.int32))
        kw = dict(HEAD_DIM=d, BLOCK_M=spec.block_q, BLOCK_N=spec.block_k, GROUP=spec.gqa_group,
                  num_warps=spec.num_warps, num_stages=spec.num_stages)
        try:  # mirrors JITFunction.run (Triton 3.6 to 3.9); other versions: skip
            kw["debug"] = fn.debug or knobs.runtime.debug
            kw["instrumentation_mode"] = knobs.compilation.instrumentation_mode
            if hasattr(knobs.compilation, "fpsan_homomorphic_casts"):  # Triton 3.9
                kw["fpsan_homomorphic_casts"] = knobs.compilation.fpsan_homomorphic_casts
            binder = create_function_from_signature(fn.signature, fn.params, backend)
            bound, specialization, options = binder(*args, **kw)
            options, signature, constexprs, attrs = fn._pack_args(backend, kw, bound, specialization, options)
            key = get_cache_key(ASTSource(fn, signature, constexprs, attrs), backend, options,
                                env_vars=get_cache_invalidating_env_vars())
        except Exception as exc:
            print("SKIP", type(exc).__name__, exc); sys.exit(0)
        print(spec.name, hashlib.sha256(key.encode()).hexdigest() == e["triton_hash"])
    """
)


def test_jit_would_find_the_build(built):
    """The JIT's cache key for a typical launch (aligned, lengths % 16 == 0) is the build's."""
    out, specs, _ = built
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", JIT_KEY_CHECK, str(out)], capture_output=True, text=True,
                         env=env, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    if res.stdout.startswith("SKIP"):
        pytest.skip(f"Triton internals differ: {res.stdout.strip()}")
    assert res.stdout.split() == [w for s in specs for w in (s.name, "True")]


GPU_RUN = textwrap.dedent(
    """
    import sys, torch, maskc
    from maskc.runtime import attention, manifest
    q, k, v = (torch.randn(512, 2, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    out = attention(q, k, v, maskc.causal(512))
    out.float().sum().backward()
    torch.cuda.synchronize()
    assert torch.isfinite(out.float()).all() and torch.isfinite(q.grad.float()).all()
    print("attached", manifest.attach_build())
    """
)


@pytest.mark.skipif(os.environ.get("MASKC_GPU_TESTS") != "1", reason="needs MASKC_GPU_TESTS=1 and an sm_90 GPU")
def test_runtime_finds_the_build_on_gpu(tmp_path):
    """On an H100 with the build's Triton: attention over a built mask compiles nothing new."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("needs an sm_90 GPU")
    out = tmp_path / "build"
    build(specs_for_mask(maskc.causal(512), head_dims=(64,)), out, progress=False)
    cache = out / "triton-cache"
    before = {p.name for p in cache.iterdir()}
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_CACHE_DIR", "TRITON_INTERPRET")}
    env.update(MASKC_BUILD=str(out), MASKC_CACHE=str(tmp_path / "maskc-cache"))
    res = subprocess.run([sys.executable, "-c", GPU_RUN], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"attached {cache}" in res.stdout
    # launch stubs (__triton_launcher*.so, cuda_utils*.so) may be added; kernels must not be
    new = [sorted(f.name for f in (cache / n).iterdir()) for n in sorted({p.name for p in cache.iterdir()} - before)]
    recompiled = [files for files in new if any(f.endswith(".cubin") for f in files)]
    assert not recompiled, f"the JIT compiled again: {recompiled}"
