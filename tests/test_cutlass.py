"""The CUTLASS backend on a machine without a GPU: specs, rendering, an nvcc build, errors.

The three kernels of two small masks (forward, dQ, dK/dV; head dim 64, bf16; one mask without
partial tiles, one with diagonal ones) are compiled with nvcc for sm_90a (about 45 s on two cores)
to prove the templates compile and to check their SASS; they are not run here
(tests/test_cutlass_gpu.py runs the kernels on an H100/H200). The build tests need nvcc and the
nvidia-cutlass headers, which `.ci/run` installs and checks.
"""

import ctypes
import json
import re
from dataclasses import replace
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import maskc
from maskc.cli import main
from maskc.codegen import cutlass as cg
from maskc.codegen.spec import KernelSpec
from maskc.errors import MaskError
from maskc.runtime import attention


def spec(**kw):
    base = dict(direction="fwd", head_dim=128, dtype="bf16", block_q=128, block_k=128, num_warps=12,
                num_stages=2, partial="diag", backend="cutlass")
    return KernelSpec(**{**base, **kw})


def test_spec_backend_field_and_name():
    s = spec()
    assert s.name == "ffa_fwd_d128_bf16_m128n128_w12s2_diag_g1_cutlass"
    assert KernelSpec.from_json(s.to_json()) == s
    tri = KernelSpec("fwd", 128, "bf16", 128, 64)
    assert tri.backend == "triton" and not tri.name.endswith("cutlass")
    # the non-deterministic dK/dV kernel (it adds dQ with atomics) has its own name, so both build side by side
    nd = KernelSpec("bwd_dkdv", 128, "bf16", 64, 64, deterministic=False)
    assert nd.name == KernelSpec("bwd_dkdv", 128, "bf16", 64, 64).name + "_nd"
    assert KernelSpec.from_json({k: v for k, v in json.loads(tri.to_json()).items() if k != "backend"}) == tri
    with pytest.raises(MaskError, match="backend 'cuda' is not one of"):
        spec(backend="cuda")
    with pytest.raises(MaskError, match="whole warpgroups"):
        spec(num_warps=6)
    with pytest.raises(MaskError, match="power of two"):
        KernelSpec("fwd", 128, "bf16", 128, 64, num_warps=12)  # Triton: warps are a power of two


@pytest.mark.parametrize("kw, why", [
    (dict(direction="bwd_dq"), "bwd_dq kernel runs 128x64"),
    (dict(direction="bwd_dkdv", block_q=128), "bwd_dkdv kernel runs 64x128"),
    (dict(dtype="fp32"), "dtype 'fp32'"),
    (dict(head_dim=256), "head dim 256"),
    (dict(softcap=True), "softcap"),
    (dict(block_k=64), "tiles 128x64"),
    (dict(gqa_group=4), "run time"),
])
def test_supports_names_the_reason(kw, why):
    s = spec(**kw)
    assert why in cg.supports(s)
    with pytest.raises(cg.CutlassBuildError, match="no CUTLASS kernel"):
        cg.render(s)


def test_render_removes_unused_branches():
    src = cg.render(spec(partial="none", head_dim=64, dtype="fp16"))
    assert 'extern "C" __global__ void __launch_bounds__(384, 1) ffa_fwd_d64_fp16_m128n128_w12s2_none_g1_cutlass(' in src
    assert "ffa_fwd<cutlass::half_t, 64, 128, 128, 2," in src and "maskc_ffa::kNone>" in src
    assert "{{" not in src and "{%" not in src
    assert "cutlass::bfloat16_t, 128" in cg.render(spec())
    dq = cg.render(spec(direction="bwd_dq", block_q=128, block_k=64))
    assert "ffa_bwd_dq<cutlass::bfloat16_t, 128, 128, 64, 2," in dq and "{{" not in dq
    dkdv = cg.render(spec(direction="bwd_dkdv", block_q=64, block_k=128, partial="rect"))
    assert "ffa_bwd_dkdv<cutlass::bfloat16_t, 128, 128, 64, 2," in dkdv and "maskc_ffa::kRect>" in dkdv
    for src in (dq, dkdv):  # the shared memory the runtime asks for is checked by the compiler
        assert re.search(r"static_assert\(sizeof\(Storage\) \+ 1024 <= \d+", src)


def test_specs_for_mask_partial_classes():
    assert {s.partial for s in cg.specs_for_mask(maskc.causal(4096))} == {"diag"}
    assert {s.partial for s in cg.specs_for_mask(maskc.block_causal(4096, 256))} == {"none"}
    assert {s.partial for s in cg.specs_for_mask(maskc.varlen([1000, 3096], maskc.FULL))} == {"rect"}
    specs = cg.specs_for_mask(maskc.causal(512), head_dims=(64, 128), dtypes=("bf16", "fp16"))
    assert len(specs) == 4 and all(cg.supports(s) is None for s in specs)
    with pytest.raises(cg.CutlassBuildError, match="head dim 256"):
        cg.specs_for_mask(maskc.causal(512), head_dims=(256,))
    with pytest.raises(cg.CutlassBuildError, match="dtype 'fp32'"):
        cg.specs_for_mask(maskc.causal(512), dtypes=("fp32",))
    with pytest.raises(cg.CutlassBuildError, match="128x64 tiles"):
        cg.specs_for_mask(maskc.tiling.lower(maskc.causal(512), 128, 64))
    with pytest.raises(cg.CutlassBuildError, match="direction 'bwd'"):
        cg.specs_for_mask(maskc.causal(512), directions=("bwd",))


def test_specs_for_mask_backward_directions():
    # each direction lowers the mask to its own tiles: 128-token chunks cut none of them, 64-token
    # chunks cut every one (rectangles)
    mask = maskc.block_causal(4096, 128)
    specs = cg.specs_for_mask(mask, directions=("fwd", "bwd_dq", "bwd_dkdv"))
    assert [(s.direction, s.block_q, s.block_k) for s in specs] == [
        ("bwd_dkdv", 64, 128), ("bwd_dq", 128, 64), ("fwd", 128, 128)]
    assert all(s.partial == "none" and cg.supports(s) is None for s in specs)
    assert {s.partial for s in cg.specs_for_mask(maskc.block_causal(4096, 64), directions=tuple(cg.TILES))} == {
        "rect"}
    plan = maskc.tiling.lower(mask, 128, 64)
    assert [s.direction for s in cg.specs_for_mask(plan, directions=("bwd_dq",))] == ["bwd_dq"]
    with pytest.raises(cg.CutlassBuildError, match="bwd_dkdv kernel runs 64x128"):
        cg.specs_for_mask(plan, directions=("bwd_dkdv",))


def test_shared_memory_fits_sm90():
    for d in cg.HEAD_DIMS:
        for direction, (bq, bk) in cg.TILES.items():
            for stages in cg.STAGE_CHOICES:
                s = spec(head_dim=d, direction=direction, block_q=bq, block_k=bk, num_stages=stages)
                assert cg.shared_bytes(s) + 1024 <= 232448  # + the kernel's static 1 KiB
                assert cg.supports(s) is None
    big = spec(head_dim=128, direction="fwd", num_stages=4)  # a ring deeper than the build offers
    assert "over the 232448 an sm_90 CTA may have" in cg.supports(big)
    with pytest.raises(cg.CutlassBuildError, match="take fewer stages"):
        cg.render(big)


def test_register_split_fits_one_cta_per_sm():
    for producer, consumer in cg.REGISTERS.values():
        assert 128 * producer + 256 * consumer <= 65536 and producer % 8 == 0 and consumer % 8 == 0
    dkdv = dict(direction="bwd_dkdv", block_q=64, block_k=128)
    assert cg.registers(spec(head_dim=128, **dkdv)) == (24, 240)  # two 64 x 128 fp32 accumulators per thread
    assert cg.registers(spec(head_dim=64, **dkdv)) == cg.REGISTERS["bwd_dkdv"]
    assert "warpgroup_reg_alloc<240>" in cg.render(spec(head_dim=128, **dkdv))
    assert "warpgroup_reg_alloc<232>" in cg.render(spec(head_dim=64, **dkdv))


def test_backend_argument_errors_on_cpu():
    mask = maskc.causal(64)
    q = torch.randn(64, 2, 64)
    with pytest.raises(MaskError, match="backend must be one of"):
        attention(q, q, q, mask, backend="cuda")
    with pytest.raises(MaskError, match="backend='cutlass'.*not on a CUDA device"):
        attention(q, q, q, mask, backend="cutlass")


def test_cli_rejects_cutlass_options(capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["build", "causal(256)", "--backend", "cutlass", "--softcap"])
    assert e.value.code == 2
    assert "softcap is not in the CUTLASS backend" in capsys.readouterr().err
    plan = tmp_path / "plan.json"
    plan.write_text(maskc.tiling.lower(maskc.causal(256), 64, 64).to_json())
    with pytest.raises(SystemExit) as e:
        main(["build", str(plan), "--backend", "cutlass", "-o", str(tmp_path)])
    assert e.value.code == 2
    assert "64x64 tiles; the CUTLASS kernels run fwd 128x128" in capsys.readouterr().err


def _nvcc_or_skip():
    try:
        cg.nvcc_path()
        cg.cutlass_include()
    except cg.CutlassBuildError as e:
        pytest.skip(str(e))


def test_build_one_spec_with_nvcc(tmp_path, capsys):
    _nvcc_or_skip()
    assert main(["build", "block_causal(1024, 128)", "--backend", "cutlass", "--head-dim", "64",
                 "-o", str(tmp_path), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    names = ["ffa_bwd_dkdv_d64_bf16_m64n128_w12s2_none_g1_cutlass", "ffa_bwd_dq_d64_bf16_m128n64_w12s2_none_g1_cutlass",
             "ffa_fwd_d64_bf16_m128n128_w12s2_none_g1_cutlass"]
    assert all(n in printed for n in names)
    man = json.loads((tmp_path / "cutlass" / "manifest.json").read_text())
    assert man["format"] == "maskc.build" and man["backend"] == "cutlass" and man["arch"] == "sm_90a"
    assert re.fullmatch(r"\d+\.\d+\.\d+", man["nvcc"]) and re.fullmatch(r"\d+\.\d+\.\d+", man["cutlass"])
    assert [e["name"] for e in man["kernels"]] == names
    for entry in man["kernels"]:
        _check_entry(tmp_path, entry)


def test_build_partial_tile_kernels_with_nvcc(tmp_path):
    """The kernels of a mask with diagonal partial tiles (the predicate paths: `tile_allowed`
    before the products in the forward and dQ, after them in dK/dV) compile, use HGMMA and TMA,
    and address shared memory as such. dK/dV at head dim 64 spills a few bytes in its producer
    warpgroup (24 registers), so only the forward and dQ are held to no local memory."""
    _nvcc_or_skip()
    specs = cg.specs_for_mask(maskc.causal(1024), head_dims=(64,), directions=("fwd", "bwd_dq", "bwd_dkdv"))
    assert {s.partial for s in specs} == {"diag"} and len(specs) == 3
    man = cg.build(specs, tmp_path, progress=False, jobs=2)
    for entry in man["kernels"]:
        _check_entry(tmp_path, entry, no_local_memory=entry["spec"]["direction"] != "bwd_dkdv")


def test_build_kernels_without_room_for_the_staging_tile_with_nvcc(tmp_path):
    """Where the output's staging tile does not fit (a 3-deep ring: the forward at head dim 128; dQ
    on diag masks with its two item buffers) the kernel stores from the accumulator and still
    compiles to HGMMA and TMA loads, with no TMA store."""
    _nvcc_or_skip()
    fwd = spec(head_dim=128, direction="fwd", num_stages=3)
    dq = spec(head_dim=128, direction="bwd_dq", block_q=128, block_k=64, num_stages=3)
    assert not cg.store_by_tma(fwd) and not cg.store_by_tma(dq) and cg.item_buffers(dq) == 2
    man = cg.build([fwd, dq], tmp_path, progress=False, jobs=2)
    for entry in man["kernels"]:
        _check_entry(tmp_path, entry)


def _check_entry(tmp_path, entry, no_local_memory=True):
    cubin = tmp_path / "cutlass" / entry["cubin"]
    assert cubin.read_bytes()[:4] == b"\x7fELF"
    assert entry["n_regs"] > 0 and entry["compile_seconds"] > 0
    assert entry["spill_store_bytes"] == 0 or not no_local_memory
    assert KernelSpec(**entry["spec"]).name == entry["name"]
    # the matrix products are Hopper's warpgroup MMA (HGMMA), when a disassembler is at hand
    tool = shutil.which("cuobjdump")
    try:
        import triton.backends.nvidia as nv

        bundled = Path(nv.__file__).parent / "bin" / "cuobjdump"
        tool = str(bundled) if bundled.is_file() else tool
    except ImportError:
        pass
    if tool:
        sass = subprocess.run([tool, "--dump-sass", str(cubin)], capture_output=True, text=True).stdout
        assert "HGMMA.64x128x16.F32.BF16" in sass or "HGMMA.64x64x16.F32.BF16" in sass
        assert "UTMALDG" in sass  # TMA loads
        # the output staged by stmatrix and stored by TMA, or plain stores where the tile did not fit
        assert ("STSM" in sass and "UTMASTG" in sass) == cg.store_by_tma(KernelSpec(**entry["spec"]))
        assert not no_local_memory or not re.search(r"\b(LDL|STL)\b", sass)  # no local-memory traffic
        # shared storage is addressed as shared memory (LDS/STS), never through generic LD/ST
        assert not re.search(r"\b(LD|ST)\.E\b", sass)


def test_tensor_map_cache_keys_on_everything_the_descriptor_encodes(monkeypatch):
    from maskc.runtime import cutlass as cb

    encoded = []
    monkeypatch.setattr(cb, "_encode_tensor_map", lambda t, rows: encoded.append((t.data_ptr(), rows)) or len(encoded))
    monkeypatch.setattr(cb, "_MAPS", {})
    base = torch.zeros(64, 4, 64, dtype=torch.bfloat16)
    first = cb._tensor_map(base, 128)
    assert cb._tensor_map(base, 128) == first and len(encoded) == 1  # same tensor, same box: cached
    assert cb._tensor_map(base.view(64, 4, 64), 128) == first  # another view of the same memory and layout
    others = [
        cb._tensor_map(base, 64),                         # box rows
        cb._tensor_map(base[:32], 128),                   # shape
        cb._tensor_map(base[:, :2], 128),                 # heads (same address and strides)
        cb._tensor_map(base.view(torch.float16), 128),    # dtype
        cb._tensor_map(base.view(64, 2, 128)[:, :, :64], 128),  # strides
        cb._tensor_map(base[1:], 128),                    # address
    ]
    assert len(set(others)) == len(others) and first not in others and len(encoded) == 7
    monkeypatch.setattr(cb, "_MAX_MAPS", 3)
    for rows in (1, 2, 3, 4):  # a full cache starts over rather than growing
        cb._tensor_map(base, rows)
    assert len(cb._MAPS) <= 3


def test_built_kernel_is_only_a_cubin_of_the_current_templates(monkeypatch, tmp_path):
    """A manifest entry counts only when its recorded source is what the templates render now: a
    build made from other templates (an edited template, an older maskc) is stale, not used."""
    import hashlib

    from maskc.runtime import cutlass as cb

    spec = cg.specs_for_mask(maskc.causal(256), head_dims=(64,), dtypes=("bf16",), directions=("fwd",))[0]
    (tmp_path / "cutlass").mkdir()
    (tmp_path / "cutlass" / "k.cubin").write_bytes(b"\0")

    def lookup(source_sha256, key=spec.key()):
        entry = {"name": spec.name, "cubin": "k.cubin", "key": key, "source_sha256": source_sha256}
        cg.manifest_path(tmp_path).write_text(json.dumps({"format": cg.FORMAT, "backend": "cutlass", "kernels": [entry]}))
        monkeypatch.setattr(cb, "_MANIFESTS", {})
        return cb.built_kernel(spec)

    monkeypatch.setenv("MASKC_BUILD", str(tmp_path))
    monkeypatch.setattr(cb, "cache_root", lambda: tmp_path / "no-cache")
    monkeypatch.setattr(cb, "_STALE_WARNED", set())
    current = hashlib.sha256(cg.render(spec).encode()).hexdigest()
    hit = lookup(current)
    assert hit is not None and hit[0] == tmp_path / "cutlass" / "k.cubin"
    with pytest.warns(UserWarning, match="built from other CUTLASS templates"):
        assert lookup(hashlib.sha256(b"an older template").hexdigest()) is None  # stale source
    assert lookup(None) is None  # no record of its source (warned once per folder and kernel)
    assert lookup(current, key="another spec") is None


def test_item_buffers_and_ring_stages_per_direction_and_partial_class(monkeypatch):
    """The default build's ring depth and item buffers where measured faster (dK/dV on rect and
    diag masks: a 3-deep Q/dO ring; dQ on diag: two Q/dO buffers), the defaults elsewhere, and one
    item buffer wherever two would not fit in an sm_90 CTA's shared memory."""
    stages3, two = {("bwd_dkdv", "rect"), ("bwd_dkdv", "diag")}, {("bwd_dq", "diag")}
    mask = {"none": maskc.full(512), "rect": maskc.varlen([200, 312], maskc.FULL), "diag": maskc.causal(512)}
    for direction, (bq, bk) in cg.TILES.items():
        for partial in ("none", "rect", "diag"):
            [s] = cg.specs_for_mask(mask[partial], directions=(direction,))  # what `maskc build` builds
            assert s.partial == partial
            assert s.num_stages == (3 if (direction, partial) in stages3 else cg.NUM_STAGES), (direction, partial)
            want = 2 if (direction, partial) in two else 1
            assert cg.item_buffers(s) == want, (direction, partial)
            assert f"kItemBuffers = {want};" in cg.render(s) or direction == "fwd"
            assert cg.shared_bytes(s) + cg.STATIC_SHARED <= cg.MAX_SHARED
    one, both = (spec(head_dim=128, direction="bwd_dq", block_q=128, block_k=64, partial=p) for p in ("none", "diag"))
    assert cg.shared_bytes(both) - cg.shared_bytes(one) == 2 * 128 * 128 * 2  # Q and dO once more
    monkeypatch.setitem(cg.ITEM_BUFFERS, ("bwd_dkdv", "diag"), 2)
    deep = spec(head_dim=128, direction="bwd_dkdv", block_q=64, block_k=128, partial="diag", num_stages=3)
    assert cg.item_buffers(deep) == 1  # two K/V buffers and a 3-stage ring exceed 227 KiB
    assert cg.item_buffers(replace(deep, num_stages=2)) == 2


def test_outputs_are_stored_by_tma_where_the_staging_tile_fits():
    """Every kernel of the default build stores its output tile (O; dQ; dK, then dV) through a
    staging tile in shared memory and TMA; a 3-deep forward ring at head dim 128 leaves no room for
    it and keeps plain stores from the accumulator. The staging tile is one output tile."""
    mask = {"none": maskc.full(512), "rect": maskc.varlen([200, 312], maskc.FULL), "diag": maskc.causal(512)}
    for partial, m in mask.items():
        for s in cg.specs_for_mask(m, head_dims=cg.HEAD_DIMS, directions=tuple(cg.TILES)):
            src = cg.render(s)
            assert cg.store_by_tma(s), s.name
            assert "stage_tile<Element>(" in src and "tma_store_wait<0>()" in src
            assert "alignas(1024) Element out[kBlockM * kHeadDim];" in src
            outer = s.block_k if s.direction == "bwd_dkdv" else s.block_q
            staged = cg._shared_bytes(s, cg.item_buffers(s), True) - cg._shared_bytes(s, cg.item_buffers(s), False)
            assert staged == outer * s.head_dim * 2 or staged == outer * s.head_dim * 2 + 1024  # + alignment
    deep = spec(head_dim=128, direction="fwd", num_stages=3)
    assert not cg.store_by_tma(deep) and cg.supports(deep) is None
    src = cg.render(deep)
    assert "store_rows(tOrO, tOcO, inv" in src and "stage_tile<Element>(" not in src.split("namespace maskc_ffa {")[-1]
    assert "Element out[" not in src
    # the output's tensor maps are the entry's last parameters, whichever path stores
    for s in (deep, spec(head_dim=128, direction="fwd")):
        assert "float qk_scale, const __grid_constant__ CUtensorMap tma_out) {" in cg.render(s)
    dq = spec(head_dim=128, direction="bwd_dq", block_q=128, block_k=64)
    dkdv = spec(head_dim=128, direction="bwd_dkdv", block_q=64, block_k=128)
    assert "float scale, const __grid_constant__ CUtensorMap tma_dq) {" in cg.render(dq)
    assert "const __grid_constant__ CUtensorMap tma_dk, const __grid_constant__ CUtensorMap tma_dv) {" in cg.render(dkdv)


def test_dq_walks_full_tiles_with_a_body_without_mask_code():
    """dQ runs its FULL tiles through a copy of the loop body without the mask code and its PARTIAL
    tiles through one with it; a kernel without partial tiles has only the first loop."""
    for partial, m in (("diag", maskc.causal(512)), ("none", maskc.full(512))):
        [s] = cg.specs_for_mask(m, directions=("bwd_dq",))
        src = cg.render(s)
        assert "for (; tiles.next_full(tile); ++i) step(cute::false_type{}, tile, 0, 0);" in src
        assert "if constexpr (kMasked) mask_tile(tSrS, allowed);" in src
        assert "kind != 0" not in src.split("ffa_bwd_dq(")[1]


def test_backward_kernels_release_an_items_tiles_after_their_last_reads():
    """dK/dV frees its item's K/V buffer once the last query tile's S^T and dP^T products are done
    (before that tile's dV and dK products and the epilogue), so the next item's K and V load under
    them; an item without tiles frees it after the loop. dQ does the same with Q and dO on masks
    with partial tiles (measured slower on full masks: there it frees them after the loop)."""
    for m in (maskc.causal(512), maskc.full(512)):
        [s] = cg.specs_for_mask(m, directions=("bwd_dkdv",))
        body = cg.render(s).split("ffa_bwd_dkdv(")[1]
        early = body.index("if (g == group - 1 && tiles.done()) {")
        assert body.index("warpgroup_wait<0>();  // S^T and dP^T are ready") < early
        assert early < body.index("release(&smem.kv_empty[b]);") < body.index("wgmma_chain<false>(mma_kv, tKrP")
        assert "if (!kv_released) release(&smem.kv_empty[b]);" in body
    for m, partial in ((maskc.causal(512), "kDiag"), (maskc.full(512), "kNone")):
        [s] = cg.specs_for_mask(m, directions=("bwd_dq",))
        body = cg.render(s).split("ffa_bwd_dq(")[1]
        guard = body.index("if constexpr (kPartial != kNone) {\n        if (tiles.done()) {")
        assert body.index("release(&smem.v_empty[stage]);") < guard < body.index("release(&smem.q_empty[b]);")
        assert body.index("release(&smem.q_empty[b]);") < body.index("wgmma_chain<false>(mma_dq")
        assert "if (!q_released) release(&smem.q_empty[b]);" in body
        assert f"maskc_ffa::{partial}>(" in body  # the instantiation the guard keeps or drops


class _FakeDriver:
    """The few cuda-bindings calls the launch path makes, recorded instead of run."""

    class CUresult:
        CUDA_SUCCESS = 0

    def __init__(self):
        self.memsets, self.launches = [], []

    def CUdeviceptr(self, p):
        return p

    def CUstream(self, s):
        return s

    class CUlaunchConfig:
        pass

    class CUlaunchAttributeID:
        CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION = 6

    class CUlaunchAttribute:
        def __init__(self):
            self.value = type("Value", (), {})()

    def cuMemsetD32Async(self, ptr, value, n, stream):
        self.memsets.append((ptr, value, n, stream))
        return (0,)

    def cuLaunchKernelEx(self, config, fn, params, extra):
        self.launches.append((config, fn, params))
        return (0,)


@pytest.fixture
def fake_launch(monkeypatch):
    """The CUTLASS runtime's launch path on the CPU: a fake driver, device 0, stream 5, empty caches."""
    from maskc.runtime import cutlass as cb

    fake = _FakeDriver()
    monkeypatch.setattr(cb, "_driver", lambda: fake)
    monkeypatch.setattr(cb, "_device_index", lambda device: 0)
    monkeypatch.setattr(cb, "_raw_stream", lambda index: 5)
    monkeypatch.setattr(cb, "_device_facts", lambda device: ((9, 0), 132))
    monkeypatch.setattr(cb, "_function", lambda spec, device, cubin, shared: ("fn", spec.name))
    monkeypatch.setattr(cb, "_new_counters", lambda index, n: torch.zeros(n, dtype=torch.int32))
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)

    class Map:
        def __init__(self, key):
            self.key = key

        def getPtr(self):
            return 4096 + 128 * (hash(self.key) % 1000)

    monkeypatch.setattr(cb, "_tensor_map", lambda t, rows: Map((t.data_ptr(), rows)))
    for name in ("_RINGS", "_CAPTURE_COUNTERS", "_FRAMES", "_CONFIGS"):
        monkeypatch.setattr(cb, name, {})
    return cb, fake


def test_counter_ring_hands_out_fresh_slots_and_zeroes_once_per_wrap(fake_launch, monkeypatch):
    cb, fake = fake_launch
    monkeypatch.setattr(cb, "_RING_SLOTS", 8)
    a = cb._counters(0, 5, 1)
    b = cb._counters(0, 5, 2)
    c = cb._counters(0, 5, 3)
    assert (b - a, c - b) == (4, 8) and not fake.memsets  # consecutive, disjoint int32 slots, no memset
    assert cb._counters(0, 9, 4) not in (a, b, c)  # another stream has a ring of its own
    assert cb._counters(0, 5, 3) == a  # 6 + 3 > 8: the ring wraps ...
    assert fake.memsets == [(a, 0, 8, 5)]  # ... after one memset of all of it, on its stream
    assert cb._counters(0, 5, 5) == a + 12 and len(fake.memsets) == 1
    for bad in (0, 9):
        with pytest.raises(ValueError, match=r"n must be in 1\.\.8"):
            cb._counters(0, 5, bad)


def test_counters_under_graph_capture_are_zeroed_by_each_call(fake_launch, monkeypatch):
    cb, fake = fake_launch
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    first = cb._counters(0, 5, 2)
    buf = cb._CAPTURE_COUNTERS[(0, 5)]
    assert cb._counters(0, 5, 1) == first  # a replay zeroes them again before each launch
    # a later capture that needs more keeps the same buffer: graphs captured before replay its address
    assert cb._counters(0, 5, 7) == first and cb._CAPTURE_COUNTERS[(0, 5)] is buf and buf.numel() == cb._RING_SLOTS
    assert [m[1:] for m in fake.memsets] == [(0, 2, 5), (0, 1, 5), (0, 7, 5)] and not cb._RINGS


def test_work_lists_of_captured_launches_are_held_for_good(monkeypatch):
    """A launch captured into a CUDA graph keeps its work lists alive (the graph replays their addresses;
    the plan caches may drop them); a launch outside a capture holds nothing."""
    from maskc.runtime import ffa

    class Lists:
        is_cuda = True

    monkeypatch.setattr(ffa, "_HELD_BY_GRAPHS", {})
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    ffa._hold_if_captured((Lists(),))
    assert ffa._HELD_BY_GRAPHS == {}
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    lists = (Lists(),)
    assert ffa._hold_if_captured(lists) is lists and list(ffa._HELD_BY_GRAPHS.values()) == [lists]
    assert ffa._hold_if_captured(lists) is lists and len(ffa._HELD_BY_GRAPHS) == 1  # captured again: held once
    assert ffa._hold_if_captured((torch.zeros(1),)) and len(ffa._HELD_BY_GRAPHS) == 1  # CPU tensors: no graph


def _forward_call(cb, out, scale=0.125):
    q = torch.zeros(256, 2, 64, dtype=torch.bfloat16)
    lists = tuple(torch.zeros(4, dtype=torch.int32) for _ in range(10))
    kernel = (Path("k.cubin"), {"shared": 200_000, "threads": 384})
    lse = torch.zeros(2, 256)
    return lambda: cb.forward(spec(head_dim=64), kernel, q, q, q, out, lse, lists, 2, scale)


def test_a_repeated_launch_reuses_its_frame_and_writes_only_the_counter(fake_launch):
    cb, fake = fake_launch
    out = torch.zeros(256, 2, 64, dtype=torch.bfloat16)
    call = _forward_call(cb, out)
    call()
    (frame,) = cb._FRAMES.values()
    values = lambda: [a.value for a in frame.values[1]]  # noqa: E731
    at = next(i for i, a in enumerate(frame.values[1]) if a is frame.counter)
    before = values()
    call()
    after = values()
    assert list(cb._FRAMES.values()) == [frame] and len(fake.launches) == 2
    assert fake.launches[-1] == (frame.config, frame.fn, ctypes.addressof(frame.params))
    assert after[at] - before[at] == 4  # the next slot of the ring
    assert after[:at] + after[at + 1:] == before[:at] + before[at + 1:]  # every other value as built
    assert before[0] == out.data_ptr()
    # a cold build of the same launch passes the same values
    cb._FRAMES.clear()
    call()
    (cold,) = cb._FRAMES.values()
    fresh = [a.value for a in cold.values[1]]
    assert fresh[:at] + fresh[at + 1:] == before[:at] + before[at + 1:]
    assert [m.getPtr() for m in cold.values[0]] == [m.getPtr() for m in frame.values[0]]


def test_a_launch_with_other_values_gets_its_own_frame(fake_launch, monkeypatch):
    cb, fake = fake_launch
    out = torch.zeros(256, 2, 64, dtype=torch.bfloat16)
    _forward_call(cb, out)()
    _forward_call(cb, torch.zeros_like(out))()  # another output address
    _forward_call(cb, out, scale=0.5)()  # another scale
    assert len(cb._FRAMES) == 3
    assert len({f.values[1][0].value for f in cb._FRAMES.values()}) == 2
    monkeypatch.setattr(cb, "_MAX_FRAMES", 2)  # a full cache starts over rather than growing
    _forward_call(cb, torch.zeros_like(out))()
    assert len(cb._FRAMES) <= 2


def test_each_launch_passes_its_outputs_tensor_maps_last(fake_launch):
    """The kernels take their outputs' TMA descriptors (64-row boxes, one warpgroup's rows) as their
    last parameters: forward O; dQ; dK then dV."""
    cb, fake = fake_launch
    q = torch.zeros(256, 2, 64, dtype=torch.bfloat16)
    lists = tuple(torch.zeros(4, dtype=torch.int32) for _ in range(10))
    kernel = (Path("k.cubin"), {"shared": 200_000, "threads": 384})
    out, dq, dk, dv = (torch.zeros_like(q) for _ in range(4))
    lse, rows = torch.zeros(2, 256), torch.zeros(2, 256)
    cb.forward(spec(head_dim=64), kernel, q, q, q, out, lse, lists, 2, 0.125)
    cb.backward_dq(spec(head_dim=64, direction="bwd_dq", block_q=128, block_k=64), kernel, q, q, q, q, dq, rows,
                   rows, 256, lists, 2, 0.125)
    cb.backward_dkdv(spec(head_dim=64, direction="bwd_dkdv", block_q=64, block_k=128), kernel, q, q, q, q, dk, dv,
                     rows, rows, 256, lists, 2, 0.125)
    want = {"fwd": [out], "bwd_dq": [dq], "bwd_dkdv": [dk, dv]}
    assert len(cb._FRAMES) == 3
    for frame in cb._FRAMES.values():
        direction = next(d for d in want if f"ffa_{d}_" in frame.name)
        maps, args, out_maps = frame.values
        assert [m.key for m in out_maps] == [(t.data_ptr(), cb.STORE_ROWS) for t in want[direction]]
        assert len(frame.params) == len(maps) + len(args) + len(out_maps)
        assert list(frame.params)[-len(out_maps):] == [m.getPtr() for m in out_maps]


def test_cutlass_kernel_lookup_rechecks_alignment_on_a_cache_hit(monkeypatch):
    """A repeated call skips `unsupported` (device, dtype and head dim are in the cache key) but
    still checks that its own tensors are TMA-aligned."""
    from maskc.runtime import cutlass as cb
    from maskc.runtime import ffa

    mask = maskc.causal(64)
    q = torch.zeros(64, 2, 64, dtype=torch.bfloat16)
    key = ("fwd", mask, q.dtype, 64, 1, q.device, "auto", False)
    chosen = ("spec", "kernel", "plan")
    monkeypatch.setattr(ffa, "_CUTLASS", {key: chosen})
    asked = []
    monkeypatch.setattr(cb, "unsupported", lambda *a: asked.append(a) or "not here")
    assert ffa._cutlass_kernel("fwd", mask, q, q, q, 0.0, "auto") is chosen and not asked
    odd = torch.zeros(64 * 2 * 64 + 1, dtype=torch.bfloat16)[1:].view(64, 2, 64)  # 2-byte aligned
    assert not cb.tma_ready(odd, q, q) and cb.tma_ready(q, q, q)
    assert ffa._cutlass_kernel("fwd", mask, odd, q, q, 0.0, "auto") is None and len(asked) == 1
    with pytest.raises(MaskError, match="not here"):
        ffa._cutlass_kernel("fwd", mask, odd, q, q, 0.0, "cutlass")
    assert ffa._cutlass_kernel("fwd", mask, q, q, q, 1.0, "auto") is None  # softcap: another key


def test_only_the_dq_launch_may_start_before_the_kernel_before_it(fake_launch, monkeypatch):
    """dQ (after dK/dV, reading nothing it writes) is launched with programmatic stream
    serialization; the forward and dK/dV, which read what the kernel before them wrote, are not."""
    cb, fake = fake_launch
    q = torch.zeros(256, 2, 64, dtype=torch.bfloat16)
    lists = tuple(torch.zeros(4, dtype=torch.int32) for _ in range(10))
    kernel = (Path("k.cubin"), {"shared": 200_000, "threads": 384})
    rows = torch.zeros(2, 256)
    cb.forward(spec(head_dim=64), kernel, q, q, q, q, rows, lists, 2, 0.125)
    cb.backward_dkdv(spec(direction="bwd_dkdv", head_dim=64, block_q=64), kernel, q, q, q, q, q, q, rows, rows, 256,
                     lists, 2, 0.125)
    cb.backward_dq(spec(direction="bwd_dq", head_dim=64, block_k=64), kernel, q, q, q, q, q, rows, rows, 256,
                   lists, 2, 0.125)
    configs = {key[0]: frame.config for key, frame in cb._FRAMES.items()}
    assert configs["fwd"].numAttrs == 0 and configs["bwd_dkdv"].numAttrs == 0
    (attr,) = configs["bwd_dq"].attrs
    assert configs["bwd_dq"].numAttrs == 1 and attr.value.programmaticStreamSerializationAllowed == 1
    assert attr.id == _FakeDriver.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
    monkeypatch.setattr(cb, "EARLY_DQ", False)  # switched off: a plain launch, in a frame of its own
    cb.backward_dq(spec(direction="bwd_dq", head_dim=64, block_k=64), kernel, q, q, q, q, q, rows, rows, 256,
                   lists, 2, 0.125)
    plain = [f.config for key, f in cb._FRAMES.items() if key[0] == "bwd_dq" and f.config is not configs["bwd_dq"]]
    assert len(plain) == 1 and plain[0].numAttrs == 0


def test_dkdv_kernel_lets_its_dependent_launch_start():
    """The dK/dV template signals launch_dependents (what lets the dQ grid start early); dQ and the
    forward, whose launches follow kernels they depend on, do not."""
    tiles = {"fwd": {}, "bwd_dq": {"block_k": 64}, "bwd_dkdv": {"block_q": 64}}
    text = {d: cg.render(spec(direction=d, **tiles[d])) for d in tiles}
    assert "griddepcontrol.launch_dependents" in text["bwd_dkdv"]
    assert "griddepcontrol" not in text["fwd"] and "launch_dependents" not in text["bwd_dq"]
    # ... and dQ, whose completion is all that later work on the stream waits for, waits for dK/dV's
    # completion before its CTAs exit (after its own work: the wait is the kernel's last statement)
    body = text["bwd_dq"][text["bwd_dq"].index("maskc_ffa::ffa_bwd_dq<"):]
    assert "griddepcontrol.wait" in body and body.rstrip().endswith('asm volatile("griddepcontrol.wait;" ::: "memory");\n}')
