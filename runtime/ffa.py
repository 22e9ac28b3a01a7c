"""`attention` (module maskc.runtime.ffa): FFA forward and backward over a mask's tile plan, as a torch.autograd.Function."""

from __future__ import annotations

import math
import os
import threading
from dataclasses import replace

import torch

from maskc.codegen.configs import LISTS, KernelConfig, choose_config, default_config
from maskc.codegen.spec import KernelSpec, partial_class
from maskc.errors import MaskError
from maskc.mask import Mask
from maskc.tiling import KERNEL_LISTS, TilePlan, kernel_lists, lower, tile_counts_all, tile_counts_many

from .kernels import get_kernel
from .validate import check_inputs

_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
LOG2E = 1.4426950408889634  # exp(x) = exp2(x * LOG2E): the kernels score in the log2 domain


# ---- plan cache: (mask, block_q, block_k) -> TilePlan; (plan, device) -> device arrays ----------

_LOCK = threading.Lock()
_PLANS: dict[tuple, TilePlan] = {}
_DEVICE_LISTS: dict[tuple, tuple] = {}
_MAX_CACHED = 256


def plan_for(mask: Mask, block_q: int, block_k: int, only: str | None = None) -> TilePlan:
    """The cached tile plan of `mask` (a repeated call is one dictionary lookup). ``only``: the
    orientation needed now; the other is lowered when first read."""
    key = (mask, block_q, block_k)
    plan = _PLANS.get(key)
    if plan is None:
        plan = lower(mask, block_q, block_k, only=only)
        with _LOCK:
            if len(_PLANS) >= _MAX_CACHED:
                _PLANS.clear()
                _DEVICE_LISTS.clear()
            _PLANS[key] = plan
    return plan


# work lists read by launches captured into CUDA graphs, by identity: a graph replays their addresses, so
# they live as long as the process (the caches above may drop them); a few hundred bytes per set of lists
_HELD_BY_GRAPHS: dict[int, tuple] = {}


def _hold_if_captured(lists: tuple) -> tuple:
    if lists[0].is_cuda and torch.cuda.is_current_stream_capturing():
        with _LOCK:
            _HELD_BY_GRAPHS[id(lists)] = lists  # a held tuple is never freed, so its id is never reused
    return lists


def _device_lists(plan: TilePlan, which: str, device) -> tuple:
    key = (id(plan), which, device)
    hit = _DEVICE_LISTS.get(key)
    if hit is not None and hit[0] is plan:
        return _hold_if_captured(hit[1])
    arrays = kernel_lists(plan, which)
    tensors = tuple(torch.tensor(arrays[name], dtype=torch.int32, device=device) for name in KERNEL_LISTS)
    with _LOCK:
        _DEVICE_LISTS[key] = (plan, tensors)
    return _hold_if_captured(tensors)


def _spec(direction: str, plan: TilePlan, which: str, q, group: int, softcap: float, cfg: KernelConfig,
          deterministic: bool = True) -> KernelSpec:
    return KernelSpec(
        direction=direction,
        head_dim=q.shape[-1],
        dtype=_DTYPE_NAMES[q.dtype],
        block_q=cfg.block_q,
        block_k=cfg.block_k,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
        partial=partial_class(plan.list_kinds(which)),
        gqa_group=group,
        softcap=bool(softcap),
        deterministic=deterministic,
    )


def _check_interpreter(device) -> None:
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise MaskError(
            "attention on CPU tensors runs the Triton kernels through the interpreter: set "
            "TRITON_INTERPRET=1 before importing triton, or use maskc.runtime.reference_attention"
        )


_LAUNCH: dict[tuple, tuple] = {}


def _launch(direction, plan, which, q, group, softcap, cfg, tensors, scalars, grid0, grid1, deterministic=True):
    key = (id(plan), direction, q.dtype, q.shape[-1], group, bool(softcap), cfg, str(q.device), deterministic)
    hit = _LAUNCH.get(key)
    if hit is None or hit[0] is not plan:
        spec = _spec(direction, plan, which, q, group, softcap, cfg, deterministic)
        hit = (plan, spec, get_kernel(spec), _device_lists(plan, which, q.device))  # held there if captured
        with _LOCK:
            if len(_LAUNCH) >= 4 * _MAX_CACHED:
                _LAUNCH.clear()
            _LAUNCH[key] = hit
    else:
        _hold_if_captured(hit[3])
    _, spec, kernel, lists = hit
    kernel[(grid0, grid1)](
        *tensors, *lists, *scalars,
        HEAD_DIM=spec.head_dim, BLOCK_M=spec.block_q, BLOCK_N=spec.block_k, GROUP=group,
        num_warps=spec.num_warps, num_stages=spec.num_stages,
    )
    return spec


_CHOICES: dict[tuple, tuple] = {}


def _resolve(mask_or_plan, direction: str, d: int, device) -> tuple[Mask | None, TilePlan, KernelConfig]:
    """The plan and config one kernel runs with: a given TilePlan's tiles, or the cheapest candidate."""
    if isinstance(mask_or_plan, TilePlan):
        cfg = default_config(direction, d, device.type)
        p = mask_or_plan
        return None, p, KernelConfig(p.block_q, p.block_k, cfg.num_warps, cfg.num_stages)
    key = (mask_or_plan, direction, d, device.type)
    hit = _CHOICES.get(key)
    if hit is None:
        hit = choose_config(mask_or_plan, direction, d, device.type, plan_for)
        with _LOCK:
            if len(_CHOICES) >= 4 * _MAX_CACHED:
                _CHOICES.clear()
            _CHOICES[key] = hit
    cfg, plan = hit
    return mask_or_plan, plan, cfg


BACKENDS = ("auto", "triton", "cutlass")
_CUTLASS: dict[tuple, tuple] = {}


_ROW_KERNELS = ("fwd", "bwd_dq")  # the CUTLASS kernels that walk query tiles (row orientation)


def _cutlass_kernel(direction: str, mask_or_plan, q, k, v, softcap: float, backend: str):
    """(spec, kernel, plan) of the CUTLASS kernel for `direction` of this call, or None for Triton.

    ``auto`` takes CUTLASS on sm_90 when a built kernel exists for the spec; ``cutlass`` insists
    (compiling with nvcc into the cache when nothing is built, else a MaskError saying why not).
    """
    if backend == "triton":
        return None
    from . import cutlass as cb

    is_mask = isinstance(mask_or_plan, Mask)
    key = (direction, mask_or_plan if is_mask else id(mask_or_plan), q.dtype, q.shape[-1],
           q.shape[1] // k.shape[1], q.device, backend, bool(softcap))
    hit = _CUTLASS.get(key)
    if hit is not None and (is_mask or hit[2] is None or hit[2] is mask_or_plan) and cb.tma_ready(q, k, v):
        # seen before: the device, dtype, head dim and softcap passed `unsupported` then (the key
        # holds them); what can differ per call is the tensors' alignment, checked just now
        return None if hit[0] is None else hit
    bq, bk = cb.cg.TILES[direction]
    why = cb.unsupported(q, k, v, softcap)
    if isinstance(mask_or_plan, TilePlan) and (mask_or_plan.block_q, mask_or_plan.block_k) != (bq, bk):
        why = why or (f"the plan's tiles are {mask_or_plan.block_q}x{mask_or_plan.block_k}; the CUTLASS {direction} "
                      f"kernel runs {bq}x{bk} (pass the Mask: each kernel lowers it to its own tiles)")
    if why:
        if backend == "cutlass":
            raise MaskError(f"attention(backend='cutlass'): {why}")
        return None
    if hit is None or (hit[2] is not None and not is_mask and hit[2] is not mask_or_plan):
        if isinstance(mask_or_plan, Mask) and direction in _ROW_KERNELS and (mask_or_plan, bq, bk) not in _PLANS:
            # a new mask: the row kernels' tile sizes (forward and dQ over query tiles) are
            # classified in one pass, and this lowering builds both lists (memoised: dQ's lowering
            # is a lookup). Where a backward may follow (an input requires grad), dK/dV's size
            # (key tiles) joins the same pass and its lists are built in the same calls
            if any(t.requires_grad for t in (q, k, v)):
                tile_counts_all(mask_or_plan, [cb.cg.TILES[d] for d in _ROW_KERNELS], [cb.cg.TILES["bwd_dkdv"]])
            else:
                tile_counts_many(mask_or_plan, [cb.cg.TILES[d] for d in _ROW_KERNELS], "fwd")
        plan = (mask_or_plan if isinstance(mask_or_plan, TilePlan)
                else plan_for(mask_or_plan, bq, bk, only=LISTS[direction]))
        spec = cb.cg.spec_for_plan(direction, plan, q.shape[-1], _DTYPE_NAMES[q.dtype])  # the build's depth
        kernel = None
        for stages in cb.cg.stage_preference(direction, spec.partial):  # the first one built
            candidate = replace(spec, num_stages=stages)
            kernel = cb.built_kernel(candidate)
            if kernel is not None:
                spec = candidate
                break
        if kernel is None and backend == "cutlass":
            kernel = cb.compile_into_cache(spec)
        hit = (spec, kernel, plan) if kernel is not None else (None, None, None)
        with _LOCK:
            if len(_CUTLASS) >= 4 * _MAX_CACHED:
                _CUTLASS.clear()
            _CUTLASS[key] = hit
    return None if hit[0] is None else hit


def ffa_forward(q, k, v, mask_or_plan, scale: float, softcap: float, backend: str = "auto"):
    sq, hq, d = q.shape
    sk, hkv, _ = k.shape
    out = torch.empty_like(q)
    lse = torch.empty((hq, sq), dtype=torch.float32, device=q.device)
    chosen = _cutlass_kernel("fwd", mask_or_plan, q, k, v, softcap, backend)
    if chosen is not None:
        if sq == 0 or hq == 0:
            return out, lse
        from . import cutlass as cb

        spec, kernel, plan = chosen
        cb.forward(spec, kernel, q, k, v, out, lse, _device_lists(plan, "fwd", q.device), plan.n_q_tiles, scale)
        return out, lse
    _, plan, cfg = _resolve(mask_or_plan, "fwd", d, q.device)
    if sq == 0 or hq == 0:
        return out, lse
    _launch(
        "fwd", plan, "fwd", q, hq // hkv, softcap, cfg,
        (q, k, v, out, lse),
        (sq, sk, q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
         out.stride(0), out.stride(1), scale, scale * LOG2E, softcap),
        plan.n_q_tiles, hq,
    )
    return out, lse


def _cutlass_backward(q, k, v, out, lse, dout, dlse, mask_or_plan, scale: float, softcap: float, backend: str):
    """dq, dk, dv from the CUTLASS dQ and dK/dV kernels, or None when the call is Triton's."""
    dq_kernel = _cutlass_kernel("bwd_dq", mask_or_plan, q, k, v, softcap, backend)
    dkdv_kernel = _cutlass_kernel("bwd_dkdv", mask_or_plan, q, k, v, softcap, backend)
    if dq_kernel is None or dkdv_kernel is None:
        return None
    from . import cutlass as cb
    from .rows import backward_rows

    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    sq_pad = cb.padded_rows(q.shape[0])
    delta_pad, lse2 = backward_rows(out, dout, dlse, lse, sq_pad)
    counters = cb.zeroed_counters(q.device, 2)  # the two persistent grids' next free slots (int32 each)
    spec, kernel, plan = dkdv_kernel
    cb.backward_dkdv(spec, kernel, q, k, v, dout, dk, dv, lse2, delta_pad, sq_pad,
                     _device_lists(plan, "bwd", q.device), plan.n_k_tiles, scale, counters)
    spec, kernel, plan = dq_kernel
    cb.backward_dq(spec, kernel, q, k, v, dout, dq, lse2, delta_pad, sq_pad,
                   _device_lists(plan, "fwd", q.device), plan.n_q_tiles, scale, counters + 4)
    return dq, dk, dv


def ffa_backward(q, k, v, out, lse, dout, dlse, mask_or_plan, scale: float, softcap: float,
                 deterministic: bool = True, backend: str = "auto"):
    sq, hq, d = q.shape
    sk, hkv, _ = k.shape
    group = hq // hkv
    if sq == 0 or sk == 0 or hq == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    from .rows import backward_rows

    dout = dout.contiguous()
    dlse = None if dlse is None else dlse.float().contiguous()
    # CUTLASS when the call allows it (its backward has no atomics, so it serves deterministic=False too)
    grads = _cutlass_backward(q, k, v, out, lse, dout, dlse, mask_or_plan, scale, softcap, backend)
    if grads is not None:
        return grads
    # delta_i = sum_d dO * O - dlse_i : the lse gradient folds into the same correction term
    delta = backward_rows(out, dout, dlse)
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    common = (sq, sk, q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
              dout.stride(0), dout.stride(1))
    _, plan_kv, cfg_kv = _resolve(mask_or_plan, "bwd_dkdv", d, q.device)
    # non-deterministic: the dK/dV kernel also adds dQ with fp32 atomics and no dQ kernel runs
    # (deterministic: an unused fp32 placeholder, so the pointer type matches the AOT build's)
    dq_acc = delta if deterministic else torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    _launch(
        "bwd_dkdv", plan_kv, "bwd", q, group, softcap, cfg_kv,
        (q, k, v, dout, lse, delta, dk, dv, dq_acc),
        (*common, dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1), hq * d, d,  # DQ_ACC is a contiguous fp32 [sq, hq, d]
         scale, scale * LOG2E, softcap),
        plan_kv.n_k_tiles, hkv, deterministic,
    )
    if not deterministic:
        return (dq_acc * scale).to(q.dtype), dk, dv
    _, plan_q, cfg_q = _resolve(mask_or_plan, "bwd_dq", d, q.device)
    _launch(
        "bwd_dq", plan_q, "fwd", q, group, softcap, cfg_q,
        (q, k, v, dout, lse, delta, dq),
        (*common, dq.stride(0), dq.stride(1), scale, scale * LOG2E, softcap),
        plan_q.n_q_tiles, hq,
    )
    return dq, dk, dv


class FFAFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask_or_plan, scale, softcap, deterministic, backend="auto"):
        ctx.set_materialize_grads(False)  # an unused lse output gets no zero-filled gradient
        out, lse = ffa_forward(q, k, v, mask_or_plan, scale, softcap, backend)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.mask_or_plan = mask_or_plan
        ctx.scale = scale
        ctx.softcap = softcap
        ctx.deterministic = deterministic
        ctx.backend = backend
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dk, dv = ffa_backward(q, k, v, out, lse, dout, dlse, ctx.mask_or_plan, ctx.scale, ctx.softcap,
                                  ctx.deterministic, ctx.backend)
        return dq, dk, dv, None, None, None, None, None


def _contiguous_last(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def attention(q, k, v, mask_or_plan, *, scale: float | None = None, softcap: float = 0.0, return_lse: bool = False,
              deterministic: bool = True, backend: str = "auto"):
    """Flexible flash attention over a `Mask` (or a `TilePlan`) in the packed varlen layout.

    q ``[sq, hq, d]``, k and v ``[sk, hkv, d]`` with ``hq % hkv == 0`` (GQA/MQA); head dims 64,
    128, 256; bfloat16 / float16 on the GPU, float32 on the CPU through the Triton interpreter
    (``TRITON_INTERPRET=1``). Returns ``out [sq, hq, d]`` (and ``lse [hq, sq]``, float32, natural
    log). A row with no allowed key gives out 0 and lse -inf. Differentiable in q, k, v (and
    through lse). ``deterministic=False`` fuses dQ into the dK/dV kernel with fp32 atomics
    (less recomputation, run-to-run rounding differences in dQ); the default backward has no
    atomics and is bitwise reproducible.

    ``backend`` picks the kernels, per direction: ``"auto"`` (default) runs a CUTLASS kernel on an
    H100/H200 when one is built for its spec (``maskc build --backend cutlass``) and Triton
    otherwise (the backward takes CUTLASS only when both its dQ and dK/dV kernels are built);
    ``"triton"`` and ``"cutlass"`` force one (``"cutlass"`` compiles with nvcc when nothing is
    built, and raises a MaskError saying why when it cannot run the call; its backward needs a
    Mask, since each kernel lowers the mask to its own tiles). Both backends keep one contract
    for out, lse and the gradients; the CUTLASS backward has no atomics (deterministic always).
    """
    if backend not in BACKENDS:
        raise MaskError(f"attention: backend must be one of {BACKENDS}, got {backend!r}")
    if isinstance(mask_or_plan, TilePlan):
        shape_src = Mask([], sq=mask_or_plan.sq, sk=mask_or_plan.sk)
    elif isinstance(mask_or_plan, Mask):
        shape_src = mask_or_plan
    else:
        raise MaskError(
            f"attention: mask_or_plan must be a maskc.Mask or a TilePlan, got {type(mask_or_plan).__name__}"
        )
    sq, hq, d, sk, hkv = check_inputs(q, k, v, shape_src)
    _check_interpreter(q.device)
    if softcap < 0:
        raise MaskError(f"attention: softcap must be >= 0 (0 disables it), got {softcap}")
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    q, k, v = _contiguous_last(q), _contiguous_last(k), _contiguous_last(v)
    out, lse = FFAFunction.apply(q, k, v, mask_or_plan, scale, float(softcap), bool(deterministic), backend)
    return (out, lse) if return_lse else out
