"""Running the CUTLASS backend's cubins (built by `maskc build --backend cutlass`) through cuda-bindings.

No C++ extension is built on the user's machine: a cubin is loaded with ``cuModuleLoadData``, its
tensor maps (TMA descriptors of Q, K and V) are encoded on the host with ``cuTensorMapEncodeTiled``
and the kernel is launched with ``cuLaunchKernelEx`` on the current torch stream.

Lookup of a spec's cubin: the build named by ``$MASKC_BUILD`` (or ``./build``), file
``cutlass/manifest.json``; a kernel counts as built only when its recorded source is what the
installed templates render for its spec now (a build from other templates is stale and not used).
With ``backend="cutlass"`` forced and no built kernel, the spec is compiled into
``$MASKC_CACHE/cutlass`` with nvcc when nvcc and the CUTLASS headers are here.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import os
import threading
import warnings
from pathlib import Path

import torch

from maskc.codegen import cutlass as cg
from maskc.codegen.spec import KernelSpec
from maskc.errors import MaskError

from .ffa import LOG2E
from .kernels import cache_root


_LOCK = threading.Lock()
_MANIFESTS: dict[str, dict] = {}
_FUNCTIONS: dict[tuple, object] = {}
_TORCH_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16"}


@functools.cache
def _driver():
    """cuda-bindings' driver module (imported once: every launch asks for it several times)."""
    try:
        from cuda.bindings import driver
    except ImportError:
        raise MaskError("the CUTLASS backend needs cuda-bindings (pip install cuda-bindings) to load its "
                        "cubins; backend='triton' needs nothing more") from None
    return driver


def _check(result, what: str):
    err, *rest = result if isinstance(result, tuple) else (result,)
    driver = _driver()
    if err != driver.CUresult.CUDA_SUCCESS:
        _, name = driver.cuGetErrorName(err)
        raise MaskError(f"CUTLASS backend: {what} failed: {name.decode() if isinstance(name, bytes) else name}")
    return rest[0] if len(rest) == 1 else rest


# ---- finding built kernels ----------------------------------------------------------------------


def _load(folder: Path) -> dict:
    key = str(folder.resolve())
    man = _MANIFESTS.get(key)
    if man is None:
        path = cg.manifest_path(folder)
        man = {}
        if path.exists():
            data = json.loads(path.read_text())
            if data.get("backend") == "cutlass" and data.get("format") == cg.FORMAT:
                man = {e["name"]: (folder / "cutlass" / e["cubin"], e) for e in data.get("kernels", [])}
        _MANIFESTS[key] = man
    return man


@functools.lru_cache(maxsize=256)
def _source_digest(spec: KernelSpec) -> str:
    """sha256 of the source the installed templates render for `spec` (the manifest records the built one's)."""
    return hashlib.sha256(cg.render(spec).encode()).hexdigest()


_STALE_WARNED: set[tuple[str, str]] = set()


def built_kernel(spec: KernelSpec) -> tuple[Path, dict] | None:
    """(cubin path, manifest entry) of a built kernel for `spec` from the current templates, or None.
    A cubin built from other templates is skipped with a warning (once per build folder and kernel)."""
    for folder in (os.environ.get("MASKC_BUILD") or "build", cache_root()):
        hit = _load(Path(folder)).get(spec.name)
        if hit is None or not hit[0].is_file() or hit[1].get("key") != spec.key():
            continue
        if hit[1].get("source_sha256") == _source_digest(spec):
            return hit
        if (str(folder), spec.name) not in _STALE_WARNED:
            _STALE_WARNED.add((str(folder), spec.name))
            warnings.warn(f"{hit[0]}: built from other CUTLASS templates than this maskc's, not used; rebuild it with "
                          f"`maskc build MASK --backend cutlass -o {folder}`", stacklevel=2)
    return None


def compile_into_cache(spec: KernelSpec) -> tuple[Path, dict]:
    """Build `spec` with nvcc into ``$MASKC_CACHE/cutlass`` (used when backend='cutlass' is forced)."""
    try:
        cg.build([spec], cache_root(), progress=False)
    except cg.CutlassBuildError as e:
        raise MaskError(f"backend='cutlass': no built kernel for {spec.name} and it cannot be compiled here "
                        f"({e}); build it ahead of time with `maskc build --backend cutlass`") from None
    _MANIFESTS.pop(str(cache_root().resolve()), None)
    hit = built_kernel(spec)
    if hit is None:
        raise MaskError(f"backend='cutlass': {spec.name} was compiled but is not in {cg.manifest_path(cache_root())}")
    return hit


# ---- which tensors it can run -------------------------------------------------------------------


def _device_facts(device) -> tuple[tuple[int, int], int]:
    """(compute capability, SM count) of a CUDA device, asked of torch once per device."""
    return _facts_of(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _facts_of(index: int) -> tuple[tuple[int, int], int]:
    props = torch.cuda.get_device_properties(index)
    return (props.major, props.minor), props.multi_processor_count


def unsupported(q, k, v, softcap: float) -> str | None:
    """None when the CUTLASS forward can run these tensors, else why not."""
    if q.device.type != "cuda":
        return "tensors are not on a CUDA device"
    if _device_facts(q.device)[0] != (9, 0):
        return "the CUTLASS kernels are built for sm_90a (H100/H200)"
    if q.dtype not in _TORCH_DTYPES:
        return f"dtype {q.dtype}: the CUTLASS backend takes bfloat16 and float16"
    if q.shape[-1] not in cg.HEAD_DIMS:
        return f"head dim {q.shape[-1]}: the CUTLASS backend takes {cg.HEAD_DIMS}"
    if softcap:
        return "softcap is not in the CUTLASS backend"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not _tma_ready(t):
            return f"{name} is not 16-byte aligned with unit stride in the head dim (TMA needs that)"
    return None


def _tma_ready(t) -> bool:
    """A ``[tokens, heads, d]`` tensor TMA can tile: unit stride in d, 16-byte aligned address and strides."""
    s0, s1, s2 = t.stride()
    size = t.element_size()
    return s2 == 1 and not (t.data_ptr() % 16 or (s0 * size) % 16 or (s1 * size) % 16)


def tma_ready(q, k, v) -> bool:
    """What `unsupported` asks of each call's tensors once their kind (device, dtype, head dim) passed."""
    return _tma_ready(q) and _tma_ready(k) and _tma_ready(v)


# ---- launching ----------------------------------------------------------------------------------


def _context(device):
    """Make torch's primary context of `device` current for the driver API."""
    driver = _driver()
    torch.cuda.set_device(device)
    torch.cuda.init()
    ctx = _check(driver.cuCtxGetCurrent(), "cuCtxGetCurrent")
    if int(ctx) == 0:
        dev = _check(driver.cuDeviceGet(device.index or 0), "cuDeviceGet")
        ctx = _check(driver.cuDevicePrimaryCtxRetain(dev), "cuDevicePrimaryCtxRetain")
        _check(driver.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")


def _function(spec: KernelSpec, device, cubin: Path, shared: int):
    key = (spec, device.index)
    fn = _FUNCTIONS.get(key)
    if fn is None:
        with _LOCK:
            fn = _FUNCTIONS.get(key)
            if fn is None:
                driver = _driver()
                _context(device)
                module = _check(driver.cuModuleLoadData(cubin.read_bytes()), f"loading {cubin.name}")
                fn = _check(driver.cuModuleGetFunction(module, spec.name.encode()), f"finding {spec.name}")
                _check(driver.cuFuncSetAttribute(
                    fn, driver.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, shared),
                    f"raising {spec.name}'s shared memory to {shared} bytes")
                _FUNCTIONS[key] = (module, fn)
                fn = _FUNCTIONS[key]
    return fn[1]


_MAPS: dict[tuple, object] = {}
_MAX_MAPS = 256


def _tensor_map(t, rows: int):
    """TMA descriptor of a ``[tokens, heads, d]`` tensor: boxes of 64 (128 bytes, swizzled) x `rows` x 1.

    Cached by everything the descriptor encodes (address, shape, strides, dtype, box rows): torch's
    caching allocator hands a training loop the same addresses step after step, and encoding one
    through cuda-bindings costs ~20 us of host time (11 per forward+backward)."""
    key = (t.data_ptr(), tuple(t.shape), t.stride(0), t.stride(1), t.dtype, rows)
    hit = _MAPS.get(key)
    if hit is None:
        hit = _encode_tensor_map(t, rows)
        with _LOCK:
            if len(_MAPS) >= _MAX_MAPS:
                _MAPS.clear()
            _MAPS[key] = hit
    return hit


def _encode_tensor_map(t, rows: int):
    driver = _driver()
    s, h, d = t.shape
    dtype = (driver.CUtensorMapDataType.CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 if t.dtype == torch.bfloat16
             else driver.CUtensorMapDataType.CU_TENSOR_MAP_DATA_TYPE_FLOAT16)
    size = t.element_size()
    return _check(driver.cuTensorMapEncodeTiled(
        dtype, 3, t.data_ptr(),
        [driver.cuuint64_t(d), driver.cuuint64_t(max(s, 1)), driver.cuuint64_t(h)],
        [driver.cuuint64_t(t.stride(0) * size), driver.cuuint64_t(t.stride(1) * size)],
        [driver.cuuint32_t(64), driver.cuuint32_t(rows), driver.cuuint32_t(1)],
        [driver.cuuint32_t(1)] * 3,
        driver.CUtensorMapInterleave.CU_TENSOR_MAP_INTERLEAVE_NONE,
        driver.CUtensorMapSwizzle.CU_TENSOR_MAP_SWIZZLE_128B,
        driver.CUtensorMapL2promotion.CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
        driver.CUtensorMapFloatOOBfill.CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,  # rows past the end read as 0
    ), "cuTensorMapEncodeTiled")


_CONFIGS: dict[tuple, object] = {}
_MAX_CONFIGS = 64


def _launch_config(grid: int, threads: int, shared: int, stream: int, early: bool = False):
    """A CUlaunchConfig, kept per (grid, block, shared memory, stream, early): a training loop launches
    the same few shapes on the same stream, and filling one costs ~10 us of host time. ``early``:
    programmatic stream serialization, the launch may start as the kernel before it on the stream
    lets it (``griddepcontrol.launch_dependents``) instead of when that kernel has finished; only
    for a kernel that reads nothing the one before it writes."""
    key = (grid, threads, shared, stream, early)
    config = _CONFIGS.get(key)
    if config is None:
        driver = _driver()
        config = driver.CUlaunchConfig()
        config.gridDimX, config.gridDimY, config.gridDimZ = grid, 1, 1
        config.blockDimX, config.blockDimY, config.blockDimZ = threads, 1, 1
        config.sharedMemBytes = shared
        config.hStream = driver.CUstream(stream)
        if early:
            attr = driver.CUlaunchAttribute()
            attr.id = driver.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
            attr.value.programmaticStreamSerializationAllowed = 1
            config.attrs = [attr]
            config.numAttrs = 1
        else:
            config.numAttrs = 0
        with _LOCK:
            if len(_CONFIGS) >= _MAX_CONFIGS:
                _CONFIGS.clear()
            _CONFIGS[key] = config
    return config


def _device_index(device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


_RAW_STREAM = getattr(torch._C, "_cuda_getCurrentRawStream", None)  # absent from CPU-only builds


def _raw_stream(index: int) -> int:
    """Handle of the current torch stream of device `index`: what ``torch.cuda.current_stream(d).cuda_stream``
    gives, without building a Stream object (one C call instead of ~5 us of Python per launch)."""
    if _RAW_STREAM is not None:
        return _RAW_STREAM(index)
    return torch.cuda.current_stream(index).cuda_stream


class _Frame:
    """Everything one launch passes to ``cuLaunchKernelEx`` but the work-slot counter's address:
    the function, its CUlaunchConfig, the parameter array and the ctypes values it points at."""

    __slots__ = ("fn", "config", "params", "values", "counter", "name")

    def __init__(self, spec: KernelSpec, kernel: tuple[Path, dict], index: int, stream: int, maps, args,
                 counter: ctypes.c_void_p, n_slots: int, early: bool = False, out_maps=()):
        cubin, entry = kernel
        shared = int(entry["shared"])
        device = torch.device("cuda", index)
        self.fn = _function(spec, device, cubin, shared)
        self.config = _launch_config(min(n_slots, _device_facts(device)[1]), entry["threads"], shared, stream, early)
        self.values = (maps, args, out_maps)  # the params array points into these
        self.params = (ctypes.c_void_p * (len(maps) + len(args) + len(out_maps)))(
            *(m.getPtr() for m in maps), *(ctypes.addressof(a) for a in args), *(m.getPtr() for m in out_maps))
        self.counter = counter
        self.name = spec.name


_FRAMES: dict[tuple, _Frame] = {}
_MAX_FRAMES = 256
EARLY_DQ = True  # launch dQ with programmatic stream serialization (see backward_dq); False: plain stream order


def _launch(key: tuple, make, counter: int) -> None:
    """cuLaunchKernelEx of a persistent kernel (at most one CTA per SM) on the current torch stream.

    `key` holds every value the launch passes except the counter's address (kernel, device, stream,
    tensor addresses, shapes and strides, scalars, the work lists' addresses), so a training loop,
    whose caching allocator hands out the same addresses step after step, reuses the frame `make()`
    built once: no tensor-map lookups and no ctypes objects per call, only the counter is written."""
    frame = _FRAMES.get(key)
    if frame is None:
        frame = make()
        with _LOCK:
            if len(_FRAMES) >= _MAX_FRAMES:
                _FRAMES.clear()
            _FRAMES[key] = frame
    frame.counter.value = counter
    driver = _driver()
    err = driver.cuLaunchKernelEx(frame.config, frame.fn, ctypes.addressof(frame.params), 0)[0]
    if err != driver.CUresult.CUDA_SUCCESS:
        _check((err,), f"launching {frame.name}")


def _ptr(t) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr())


def _tensor_key(t) -> tuple:
    return t.data_ptr(), t.shape, t.stride()


def _lists_key(lists) -> tuple:
    """The work lists' addresses: a frame passes only these values, so it is right for any lists at
    the same addresses and holds none of them alive."""
    return tuple(t.data_ptr() for t in lists)


_RING_SLOTS = 1024  # int32 work-slot counters per (device, stream) ring
_RINGS: dict[tuple[int, int], list] = {}  # (device, stream) -> [buffer, next free slot]
_CAPTURE_COUNTERS: dict[tuple[int, int], torch.Tensor] = {}


def _new_counters(index: int, n: int) -> torch.Tensor:
    return torch.zeros(n, dtype=torch.int32, device=torch.device("cuda", index))


def _zero(buf: torch.Tensor, n: int, stream: int) -> None:
    """Async memset of the first `n` int32 counters of `buf` on `stream`."""
    driver = _driver()
    _check(driver.cuMemsetD32Async(driver.CUdeviceptr(buf.data_ptr()), 0, n, driver.CUstream(stream)),
           "zeroing the work-slot counters")


def _counters(index: int, stream: int, n: int) -> int:
    if not 1 <= n <= _RING_SLOTS:
        raise ValueError(f"zeroed_counters: n must be in 1..{_RING_SLOTS}, got {n}")
    key = (index, stream)
    if torch.cuda.is_current_stream_capturing():
        # a CUDA graph replays its memsets: one buffer zeroed before each captured launch, of the
        # largest size at once (graphs captured before hold its address: it is never replaced)
        buf = _CAPTURE_COUNTERS.get(key)
        if buf is None:
            buf = _new_counters(index, _RING_SLOTS)
            with _LOCK:
                _CAPTURE_COUNTERS[key] = buf
        _zero(buf, n, stream)
        return buf.data_ptr()
    ring = _RINGS.get(key)
    if ring is None:
        ring = [_new_counters(index, _RING_SLOTS), 0]
        with _LOCK:
            _RINGS[key] = ring
    buf, at = ring
    if at + n > _RING_SLOTS:
        # every launch that used a slot was issued on this stream before this memset, so runs before it
        _zero(buf, _RING_SLOTS, stream)
        at = 0
    ring[1] = at + n
    return buf.data_ptr() + 4 * at


def zeroed_counters(device, n: int) -> int:
    """Device address of `n` int32 counters that read 0 when the next launch on the current stream
    starts: the persistent grids' next free work slots. Each (device, stream) keeps a ring of
    1024 counters, zeroed once and handed out in order; only when the ring wraps is it zeroed
    again, by one async memset that stream order places after every launch that used it. So a
    call does no memset and allocates nothing. Under CUDA graph capture each call zeroes its own
    counters with a captured memset instead (a replay must zero them again)."""
    index = _device_index(device)
    return _counters(index, _raw_stream(index), n)


STORE_ROWS = 64  # the backward kernels store their outputs by TMA, 64 rows (one warpgroup's) per box


def _operand_maps(spec: KernelSpec, q, k, v, dout=None) -> list:
    """The kernel's TMA descriptors, in its parameter order: Q, K, V (and dO for the backward);
    Q and dO in boxes of the spec's query tile, K and V of its key tile."""
    maps = [_tensor_map(q, spec.block_q), _tensor_map(k, spec.block_k), _tensor_map(v, spec.block_k)]
    return maps if dout is None else maps + [_tensor_map(dout, spec.block_q)]


def forward(spec: KernelSpec, kernel: tuple[Path, dict], q, k, v, out, lse, lists, n_q_tiles: int, scale: float):
    """Launch the CUTLASS forward: out and lse as the Triton forward writes them."""
    index = _device_index(q.device)
    stream = _raw_stream(index)
    key = ("fwd", spec, index, stream, _tensor_key(q), _tensor_key(k), _tensor_key(v), out.data_ptr(), out.stride(),
           lse.data_ptr(), _lists_key(lists), n_q_tiles, scale)

    def make():
        sq, hq, _ = q.shape
        counter = ctypes.c_void_p(0)
        args = [_ptr(out), _ptr(lse), *(_ptr(t) for t in lists), ctypes.c_int(n_q_tiles * hq), counter,
                ctypes.c_int(sq), ctypes.c_int(hq), ctypes.c_int(hq // k.shape[1]),
                ctypes.c_longlong(out.stride(0)), ctypes.c_longlong(out.stride(1)), ctypes.c_float(scale * LOG2E)]
        return _Frame(spec, kernel, index, stream, _operand_maps(spec, q, k, v), args, counter, n_q_tiles * hq,
                      out_maps=[_tensor_map(out, STORE_ROWS)])

    _launch(key, make, _counters(index, stream, 1))  # the persistent grid's next free slot


# the backward kernels read lse and delta in whole query tiles (powers of two: the largest is a multiple of all)
ROW_PAD = max(cg.TILES["bwd_dq"][0], cg.TILES["bwd_dkdv"][0])


def padded_rows(sq: int) -> int:
    """Rows per head of the backward kernels' lse2 and delta: whole tiles of `ROW_PAD` (at least one);
    `maskc.runtime.rows.backward_rows` fills them (lse2 +inf and delta 0 past row sq)."""
    return max(-(-sq // ROW_PAD) * ROW_PAD, ROW_PAD)


def backward_dq(spec: KernelSpec, kernel, q, k, v, dout, dq, lse2, delta, sq_pad: int, lists, n_q_tiles: int,
                scale: float, counter=None):
    """Launch the CUTLASS dQ kernel (dq = scale * sum_k dS K), deterministic: no atomics. `counter`:
    the device address of a zeroed int32, the persistent grid's next free slot (taken here when not
    given, see `zeroed_counters`)."""
    index = _device_index(q.device)
    stream = _raw_stream(index)
    key = ("bwd_dq", spec, index, stream, _tensor_key(q), _tensor_key(k), _tensor_key(v), _tensor_key(dout),
           dq.data_ptr(), dq.stride(), lse2.data_ptr(), delta.data_ptr(), sq_pad, _lists_key(lists), n_q_tiles, scale,
           EARLY_DQ)

    def make():
        sq, hq, _ = q.shape
        slot = ctypes.c_void_p(0)
        args = [_ptr(dq), _ptr(lse2), _ptr(delta), *(_ptr(t) for t in lists), ctypes.c_int(n_q_tiles * hq),
                slot, ctypes.c_int(sq), ctypes.c_int(sq_pad), ctypes.c_int(hq), ctypes.c_int(hq // k.shape[1]),
                ctypes.c_longlong(dq.stride(0)), ctypes.c_longlong(dq.stride(1)), ctypes.c_float(scale * LOG2E),
                ctypes.c_float(scale)]
        # early: after the dK/dV kernel, which reads and writes nothing of dQ's, the dQ grid takes
        # each SM as its dK/dV CTA exits (that kernel signals launch_dependents at its start)
        return _Frame(spec, kernel, index, stream, _operand_maps(spec, q, k, v, dout), args, slot, n_q_tiles * hq,
                      early=EARLY_DQ, out_maps=[_tensor_map(dq, STORE_ROWS)])

    _launch(key, make, _counters(index, stream, 1) if counter is None else counter)


def backward_dkdv(spec: KernelSpec, kernel, q, k, v, dout, dk, dv, lse2, delta, sq_pad: int, lists, n_k_tiles: int,
                  scale: float, counter=None):
    """Launch the CUTLASS dK/dV kernel: one work item per (key tile, KV head), the GQA group's query
    heads summed inside it (no atomics). `counter` as for `backward_dq`."""
    index = _device_index(q.device)
    stream = _raw_stream(index)
    key = ("bwd_dkdv", spec, index, stream, _tensor_key(q), _tensor_key(k), _tensor_key(v), _tensor_key(dout),
           dk.data_ptr(), dk.stride(), dv.data_ptr(), dv.stride(), lse2.data_ptr(), delta.data_ptr(), sq_pad,
           _lists_key(lists), n_k_tiles, scale)

    def make():
        sk, hkv, _ = k.shape
        hq = q.shape[1]
        slot = ctypes.c_void_p(0)
        args = [_ptr(dk), _ptr(dv), _ptr(lse2), _ptr(delta), *(_ptr(t) for t in lists), ctypes.c_int(n_k_tiles * hkv),
                slot, ctypes.c_int(sk), ctypes.c_int(sq_pad), ctypes.c_int(hkv), ctypes.c_int(hq // hkv),
                ctypes.c_longlong(dk.stride(0)), ctypes.c_longlong(dk.stride(1)),
                ctypes.c_longlong(dv.stride(0)), ctypes.c_longlong(dv.stride(1)), ctypes.c_float(scale * LOG2E),
                ctypes.c_float(scale)]
        return _Frame(spec, kernel, index, stream, _operand_maps(spec, q, k, v, dout), args, slot, n_k_tiles * hkv,
                      out_maps=[_tensor_map(dk, STORE_ROWS), _tensor_map(dv, STORE_ROWS)])

    _launch(key, make, _counters(index, stream, 1) if counter is None else counter)
