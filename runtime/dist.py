"""Context-parallel attention: execute a `maskc.Plan` on `torch.distributed` (NCCL on GPUs, gloo on CPU).

    plan = maskc.compile(mask, cp_size=world_size, block=...)
    q_l, k_l, v_l = (dispatch(t, plan) for t in (q, k, v))       # global [s, ...] -> local shard
    out_l = dist_attention(q_l, k_l, v_l, plan)                    # local shard in, local shard out
    out = undispatch(out_l, plan)                                  # every rank gets the full [s, ...]

Local tokens are the rank's chunks in increasing global order (`plan.positions(rank)`, e.g. for
RoPE). `dist_attention` runs stage 0 (local queries x local keys) while every remote stage's
key/value ranges are already in flight (**GroupCast**: one `all_to_all_single` per stage with exact
split sizes; a range goes once to each rank that needs it); stage k's compute waits only for stage
k's transfer. Partial outputs are merged with their log-sum-exp in float32, NaN-free for empty
rows, and cast to the input dtype once at the end. The
backward computes each stage's gradients, sends the received keys' dK/dV back to their owners as
soon as a stage is done (**GroupReduce**: the reverse all-to-all, summed with `index_add_`) and
finishes with the local stage. On GPUs the packing and the collectives run on a side CUDA stream
(NCCL's own stream does the transfer); the compute stream waits on each stage's work handle only
when it needs that stage. Every rank checks at its first call with a plan that all ranks hold the
same plan (an all-gather of the digest) and raises instead of hanging when they do not.

Only plans whose pairs all move keys/values are executed (``plan.executable``); GroupReduce pairs
that move queries (``compile(..., group_reduce=True)``) are planned and priced, not run.
"""

from __future__ import annotations

import contextlib
import math
import threading
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from maskc.dispatch import _ramp
from maskc.errors import MaskError
from maskc.mask import Mask
from maskc.plan import Plan

from .ffa import attention

_LOCK = threading.Lock()
_LAYOUTS: dict[tuple, "RankLayout"] = {}
_VERIFIED: set[tuple] = set()
_COMM_STREAMS: dict = {}
_MAX_CACHED = 64
# bytes this process has moved through group_cast / group_reduce since the last reset (what the
# runtime really sent and received, to check against the planner's prediction)
_TRAFFIC = {"cast_send": 0, "cast_recv": 0, "reduce_send": 0, "reduce_recv": 0}


# ---- group helpers -----------------------------------------------------------------------------


def _group_info(plan: Plan, group, what: str) -> tuple[int, int]:
    if not isinstance(plan, Plan):
        raise MaskError(f"{what}: plan must be a maskc.Plan (from maskc.compile), got {type(plan).__name__}")
    if not dist.is_available() or not dist.is_initialized():
        if plan.cp_size == 1:
            return 0, 1
        raise MaskError(f"{what}: torch.distributed is not initialised but the plan is for cp_size={plan.cp_size}")
    rank = dist.get_rank(group)
    world = dist.get_world_size(group)
    if world != plan.cp_size:
        raise MaskError(f"{what}: the process group has {world} ranks but the plan is for cp_size={plan.cp_size}")
    return rank, world


def check_same_plan(plan: Plan, group=None, *, device=None) -> None:
    """All-gather the plan digest and raise a `MaskError` on every rank when ranks disagree.

    One small collective that every rank enters with the same shape, so it cannot hang on a
    mismatch the way a later all-to-all with different split sizes would."""
    rank, world = _group_info(plan, group, "check_same_plan")
    if world == 1:
        return
    raw = bytes.fromhex(plan.digest())
    mine = torch.tensor(list(raw), dtype=torch.uint8, device=device or "cpu")
    bufs = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(bufs, mine, group=group)
    digests = [bytes(b.cpu().tolist()).hex() for b in bufs]
    if len(set(digests)) > 1:
        listing = ", ".join(f"rank {r}: {d[:12]}" for r, d in enumerate(digests))
        raise MaskError(
            f"dist_attention: ranks hold different plans ({listing}); every rank must compile the same "
            f"mask with the same arguments (or load the same plan JSON)"
        )


def _verify_once(plan: Plan, group, device) -> None:
    key = (id(group) if group is not None else None, plan.digest())
    if key in _VERIFIED:
        return
    check_same_plan(plan, group, device=device)
    with _LOCK:
        if len(_VERIFIED) >= _MAX_CACHED:
            _VERIFIED.clear()  # checking again is one small all-gather
        _VERIFIED.add(key)


# ---- per-rank layout ---------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class RankLayout:
    """What one rank packs, receives and computes in each stage of a plan (cached per plan, rank)."""

    rank: int
    n_local: int
    masks: tuple  # per stage: Mask of local queries x the stage's keys (stage 0: local keys)
    send_rows: tuple  # per remote stage: int64 local rows to pack, grouped by destination
    send_splits: tuple  # per remote stage: rows per destination rank
    recv_splits: tuple  # per remote stage: rows per source rank


def rank_layout(plan: Plan, rank: int) -> RankLayout:
    """The cached `RankLayout` of `rank` under `plan` (built from the plan alone, no communication)."""
    key = (plan.digest(), rank)
    hit = _LAYOUTS.get(key)
    if hit is not None:
        return hit
    sch, d = plan.schedule, plan.dispatch
    cp = plan.cp_size
    send_rows, send_splits, recv_splits = [], [], []
    for k in range(1, plan.stages + 1):
        s = sch.send(rank, k)  # [dst, start, end]
        ln = s[:, 2] - s[:, 1]
        rows = np.repeat(d.local_index(rank, s[:, 1]), ln) + _ramp(ln) if s.shape[0] else np.zeros(0, np.int64)
        send_rows.append(rows.astype(np.int64))
        send_splits.append(np.bincount(s[:, 0], weights=ln, minlength=cp).astype(np.int64).tolist())
        r = sch.recv(rank, k)  # [src, start, end]
        recv_splits.append(np.bincount(r[:, 0], weights=r[:, 2] - r[:, 1], minlength=cp).astype(np.int64).tolist())
    layout = RankLayout(
        rank=rank,
        n_local=int(d.rank_tokens[rank]),
        masks=tuple(plan.local_masks(rank)),
        send_rows=tuple(send_rows),
        send_splits=tuple(send_splits),
        recv_splits=tuple(recv_splits),
    )
    with _LOCK:
        if len(_LAYOUTS) >= _MAX_CACHED:
            _LAYOUTS.clear()
        _LAYOUTS[key] = layout
    return layout


_DEVICE_ROWS: dict = {}


def _device_rows(layout: RankLayout, device) -> list:
    """The layout's per-stage send rows as int64 tensors on ``device``, made once: a copy from
    pageable host memory would synchronise the host with the GPU at every call."""
    key = (id(layout), str(device))
    hit = _DEVICE_ROWS.get(key)
    if hit is None or hit[0] is not layout:
        hit = (layout, [torch.as_tensor(np.array(r), device=device) for r in layout.send_rows])
        with _LOCK:
            if len(_DEVICE_ROWS) >= _MAX_CACHED:
                _DEVICE_ROWS.clear()
            _DEVICE_ROWS[key] = hit
    return hit[1]


# ---- GroupCast / GroupReduce -------------------------------------------------------------------


_NO_COMM = threading.local()


@contextlib.contextmanager
def no_communication():
    """For measuring overlap only: inside, `group_cast` and `group_reduce` skip their transfers
    (received buffers are left uninitialised, returned gradients are dropped), so every result
    is wrong, but the call does all its other work. The time of `dist_attention` inside, against
    the real call, is the communication that was not hidden (see benchmarks/bench_scaling.py)."""
    before = getattr(_NO_COMM, "on", False)
    _NO_COMM.on = True
    try:
        yield
    finally:
        _NO_COMM.on = before


def _skip_comm() -> bool:
    return getattr(_NO_COMM, "on", False)


def _count(kind: str, sent: torch.Tensor, received: torch.Tensor) -> None:
    _TRAFFIC[kind + "_send"] += sent.numel() * sent.element_size()
    _TRAFFIC[kind + "_recv"] += received.numel() * received.element_size()


def traffic(reset: bool = False) -> dict[str, int]:
    """Bytes this process sent and received through `group_cast` (forward K/V) and `group_reduce`
    (backward dK/dV) since the last reset: ``{"cast_send", "cast_recv", "reduce_send", "reduce_recv"}``
    (rows a rank sends to itself are never packed, so they are not counted)."""
    out = dict(_TRAFFIC)
    if reset:
        for key in _TRAFFIC:
            _TRAFFIC[key] = 0
    return out


class _Pending:
    """A collective in flight (or already done) and the buffer it fills."""

    __slots__ = ("buf", "work")

    def __init__(self, buf, work):
        self.buf = buf
        self.work = work

    def wait(self) -> torch.Tensor:
        if self.work is not None:
            self.work.wait()
            self.work = None
        return self.buf


def group_cast(x: torch.Tensor, send_rows: torch.Tensor, send_splits, recv_splits, group=None, *, async_op: bool = False):
    """GroupCast: rank r sends ``x[send_rows]`` (grouped by destination, ``send_splits[dst]`` rows
    each) and receives ``sum(recv_splits)`` rows concatenated by source rank. One
    ``all_to_all_single`` with exact split sizes (zero where a pair has nothing). Returns the
    received tensor, or a handle with ``.wait() -> tensor`` when ``async_op``."""
    send = x.index_select(0, send_rows).contiguous()
    recv = x.new_empty((int(sum(recv_splits)),) + tuple(x.shape[1:]))
    if _skip_comm():
        return _Pending(recv, None) if async_op else recv
    work = dist.all_to_all_single(recv, send, list(recv_splits), list(send_splits), group=group, async_op=async_op)
    _count("cast", send, recv)
    pending = _Pending(recv, work if async_op else None)
    return pending if async_op else pending.buf


class _Reduced(_Pending):
    """A GroupReduce in flight: ``wait()`` sums the returned rows into ``[n_local, ...]``."""

    __slots__ = ("rows", "n_local")

    def __init__(self, buf, work, rows, n_local):
        super().__init__(buf, work)
        self.rows = rows
        self.n_local = n_local

    def _received(self) -> torch.Tensor:
        buf = _Pending.wait(self)
        if buf.is_cuda:  # allocated on the side stream, summed on the current one
            buf.record_stream(torch.cuda.current_stream(buf.device))
        return buf

    def wait(self) -> torch.Tensor:
        buf = self._received()
        out = buf.new_zeros((self.n_local,) + tuple(buf.shape[1:]))
        return out.index_add_(0, self.rows, buf) if self.rows.numel() else out

    def add_into(self, *targets: torch.Tensor) -> None:
        """Wait, then add part ``i`` of the returned rows (``buf[:, i]``) into ``targets[i]``
        ``[n_local, ...]`` (any dtype): no zero-filled staging buffer, one ``index_add_`` per target
        (each under 2^31 elements where the packed ``[n, parts, ...]`` tensor might not be)."""
        buf = self._received()
        if not self.rows.numel():
            return
        for i, target in enumerate(targets):
            target.index_add_(0, self.rows, buf[:, i].to(target.dtype))


def group_reduce(grad: torch.Tensor, send_rows: torch.Tensor, send_splits, recv_splits, n_local: int, group=None,
                 *, async_op: bool = False):
    """GroupReduce, the reverse of `group_cast`: gradient rows of received data go back to their
    owners, where copies sent to several ranks are summed into ``[n_local, ...]`` at ``send_rows``.
    With ``async_op`` returns a handle whose ``.wait()`` gives the summed tensor."""
    grad = grad.contiguous()
    back = grad.new_empty((int(sum(send_splits)),) + tuple(grad.shape[1:]))
    if _skip_comm():
        send_rows = send_rows[:0]  # nothing arrives: nothing to add
        work = None
    else:
        work = dist.all_to_all_single(back, grad, list(send_splits), list(recv_splits), group=group, async_op=async_op)
        _count("reduce", grad, back)
    pending = _Reduced(back, work if async_op else None, send_rows, n_local)
    return pending if async_op else pending.wait()


def merge_partials(out_a, lse_a, out_b, lse_b):
    """Merge two partial attention results over disjoint key sets: ``out [s, h, d]``, ``lse [h, s]``.

    ``lse = logaddexp(lse_a, lse_b)``; ``out = exp(lse_a - lse) out_a + exp(lse_b - lse) out_b``,
    in float32 (the result is float32: keep merging in it, cast once at the end), with the -inf of
    empty rows mapped so that no NaN appears (an empty row stays out 0, lse -inf)."""
    la, lb = lse_a.float(), lse_b.float()
    lse = torch.logaddexp(la, lb)
    wa = _stage_weights(la, lse).transpose(0, 1).unsqueeze(-1)
    wb = _stage_weights(lb, lse).transpose(0, 1).unsqueeze(-1)
    return wa * out_a.float() + wb * out_b.float(), lse


def _stage_weights(lse_k: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """exp(lse_k - lse) with 0 where the merged row is empty: [h, s], float32."""
    safe = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)
    return torch.exp(lse_k.float() - safe)


# ---- the autograd function ---------------------------------------------------------------------


def _comm_stream(device):
    s = _COMM_STREAMS.get(device)
    if s is None:
        s = torch.cuda.Stream(device=device)
        _COMM_STREAMS[device] = s
    return s


class _DistAttention(torch.autograd.Function):
    """Forward: stage 0 (local keys) while all remote stages are in flight, then stage by stage,
    merged with lse. Each stage's attention keeps its own small autograd graph (detached leaves),
    so the backward only needs the chain rule of the merge:

        dO_k = w_k dO,   dlse_k = w_k (dlse + <dO, o_k - O>),   w_k = exp(lse_k - lse)

    which is exactly the gradient of the merged softmax (P_k w_k = P). Every rank issues the
    backward's reductions in stage order (1..stages), whether or not it computed in that stage.
    """

    @staticmethod
    def forward(ctx, q, k, v, plan, layout, group, scale, softcap):
        ctx.set_materialize_grads(False)
        nst = plan.stages
        cuda = q.is_cuda
        rows = _device_rows(layout, q.device)
        # keys and values travel together: [L, 2, hkv, d]
        kv = torch.stack([k.detach(), v.detach()], dim=1) if nst else None

        # GroupCast of every remote stage now; stage k's compute waits only for stage k
        side = _comm_stream(q.device) if cuda else None
        pending = []
        if nst:
            if cuda:
                side.wait_stream(torch.cuda.current_stream(q.device))
            with torch.cuda.stream(side) if cuda else contextlib.nullcontext():
                for kk in range(nst):
                    pending.append(group_cast(kv, rows[kk], layout.send_splits[kk], layout.recv_splits[kk], group,
                                              async_op=True))

        q_leaf = q.detach().requires_grad_()
        inputs = [None] * (nst + 1)
        outputs = [None] * (nst + 1)
        recv_shapes = [None] * (nst + 1)
        out = lse = None
        for st in range(nst + 1):
            if st == 0:
                k_leaf, v_leaf = k.detach().requires_grad_(), v.detach().requires_grad_()
                inputs[0] = (k_leaf, v_leaf)
                keys, values = k_leaf, v_leaf
            else:
                buf = pending[st - 1].wait()
                if cuda:
                    torch.cuda.current_stream(q.device).wait_stream(side)
                    buf.record_stream(torch.cuda.current_stream(q.device))
                recv_shapes[st] = tuple(buf.shape)
                if buf.shape[0] == 0:
                    continue
                kv_leaf = buf.requires_grad_()
                inputs[st] = (kv_leaf,)
            with torch.enable_grad():  # (Function.forward runs under no_grad: slice inside)
                if st:
                    keys, values = kv_leaf[:, 0], kv_leaf[:, 1]
                o_k, l_k = attention(q_leaf, keys, values, layout.masks[st], scale=scale, softcap=softcap,
                                     return_lse=True)
            outputs[st] = (o_k, l_k)
            if out is None:
                out, lse = o_k.detach().float(), l_k.detach().float()
            else:
                out, lse = merge_partials(out, lse, o_k.detach(), l_k.detach())
        ctx.layout, ctx.group = layout, group
        ctx.q_leaf, ctx.stage_inputs, ctx.stage_outputs = q_leaf, inputs, outputs
        ctx.rows, ctx.recv_shapes = rows, recv_shapes
        ctx.save_for_backward(out, lse)  # float32 merged output: the backward's correction uses it
        return out.to(q.dtype), lse

    @staticmethod
    def backward(ctx, dout, dlse):
        none = (None,) * 8
        if dout is None and dlse is None:
            return none
        out, lse = ctx.saved_tensors
        layout, group = ctx.layout, ctx.group
        if dout is None:
            dout = torch.zeros(out.shape, dtype=ctx.q_leaf.dtype, device=out.device)
        cuda = dout.is_cuda
        side = _comm_stream(dout.device) if cuda else None
        nst = len(ctx.stage_outputs) - 1

        def stage_grads(st):
            o_k, l_k = ctx.stage_outputs[st]
            w = _stage_weights(l_k.detach(), lse)  # [h, s]
            d_o = (w.transpose(0, 1).unsqueeze(-1) * dout.float()).to(o_k.dtype)
            corr = (dout.float() * (o_k.detach().float() - out)).sum(-1).transpose(0, 1)
            d_l = w * (corr + (dlse.float() if dlse is not None else 0.0))
            d_l = torch.where(torch.isfinite(d_l), d_l, torch.zeros_like(d_l))
            ins = (ctx.q_leaf,) + ctx.stage_inputs[st]
            return torch.autograd.grad((o_k, l_k), ins, (d_o, d_l), allow_unused=True)

        q_leaf = ctx.q_leaf
        dq = torch.zeros(q_leaf.shape, dtype=torch.float32, device=q_leaf.device)  # summed in fp32
        reduces = []
        for st in range(1, nst + 1):  # remote stages first, each reduction overlapping the next stage
            kk = st - 1
            if ctx.stage_outputs[st] is None:
                g_kv = torch.zeros(ctx.recv_shapes[st], dtype=q_leaf.dtype, device=q_leaf.device)
            else:
                g = stage_grads(st)
                if g[0] is not None:
                    dq += g[0]
                g_kv = g[1] if g[1] is not None else torch.zeros_like(ctx.stage_inputs[st][0])
            if cuda:
                side.wait_stream(torch.cuda.current_stream(dout.device))
            with torch.cuda.stream(side) if cuda else contextlib.nullcontext():
                reduces.append(group_reduce(g_kv, ctx.rows[kk], layout.send_splits[kk], layout.recv_splits[kk],
                                            layout.n_local, group, async_op=True))
        g = stage_grads(0)
        k_leaf, v_leaf = ctx.stage_inputs[0]
        if g[0] is not None:
            dq += g[0]
        dk = g[1].float() if g[1] is not None else torch.zeros(k_leaf.shape, device=k_leaf.device)
        dv = g[2].float() if g[2] is not None else torch.zeros(v_leaf.shape, device=v_leaf.device)
        for r in reduces:
            if cuda:
                torch.cuda.current_stream(dout.device).wait_stream(side)
            r.add_into(dk, dv)
        dq, dk, dv = dq.to(q_leaf.dtype), dk.to(k_leaf.dtype), dv.to(v_leaf.dtype)
        return dq, dk, dv, None, None, None, None, None


def dist_attention(q, k, v, plan: Plan, group=None, *, scale: float | None = None, softcap: float = 0.0,
                   return_lse: bool = False):
    """Context-parallel attention over ``plan.mask`` (local shards in, local shard out).

    q ``[L, hq, d]``, k and v ``[L, hkv, d]`` hold this rank's tokens in ``plan.positions(rank)``
    order (see `dispatch`). Returns ``out [L, hq, d]`` (and ``lse [hq, L]``, float32). Forward and
    backward; every rank of ``group`` (default: the world) must call it with the same plan.
    """
    rank, world = _group_info(plan, group, "dist_attention")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            raise MaskError(f"dist_attention: {name} must be a 3-D tensor [local tokens, heads, head_dim]")
    n = int(plan.dispatch.rank_tokens[rank])
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.shape[0] != n:
            raise MaskError(
                f"dist_attention: {name} has {t.shape[0]} tokens but rank {rank} holds {n} under the plan "
                f"(pass the dispatched shard: dispatch(x, plan, group))"
            )
    if not plan.executable:
        raise MaskError(
            "dist_attention: the plan has GroupReduce pairs (queries moved to the keys); the runtime "
            "executes only key/value-moving plans: compile with group_reduce=False"
        )
    if world > 1:
        _verify_once(plan, group, q.device)
    layout = rank_layout(plan, rank)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    out, lse = _DistAttention.apply(q, k, v, plan, layout, group, scale, float(softcap))
    return (out, lse) if return_lse else out


# ---- dispatch / undispatch ---------------------------------------------------------------------


def _positions(plan: Plan, rank: int, device) -> torch.Tensor:
    return torch.as_tensor(np.array(plan.positions(rank)), dtype=torch.long, device=device)


def dispatch(x: torch.Tensor, plan: Plan, group=None) -> torch.Tensor:
    """This rank's shard of a global ``[s, ...]`` tensor (same on every rank): rows
    ``plan.positions(rank)``. No communication; differentiable (the gradient lands on those rows)."""
    rank, _ = _group_info(plan, group, "dispatch")
    if x.shape[0] != plan.seq_len:
        raise MaskError(f"dispatch: x has {x.shape[0]} rows but the plan is for {plan.seq_len} tokens")
    return x.index_select(0, _positions(plan, rank, x.device))


class _Undispatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, plan, rank, world, group):
        ctx.pos = _positions(plan, rank, x.device)
        if world == 1:
            return x.index_select(0, torch.argsort(ctx.pos))
        counts = plan.rank_tokens
        width = max(counts) if counts else 0
        pad = x.new_zeros((width,) + tuple(x.shape[1:]))
        pad[: x.shape[0]] = x
        bufs = [torch.empty_like(pad) for _ in range(world)]
        dist.all_gather(bufs, pad.contiguous(), group=group)
        full = x.new_empty((plan.seq_len,) + tuple(x.shape[1:]))
        for r in range(world):
            full[_positions(plan, r, x.device)] = bufs[r][: counts[r]]
        return full

    @staticmethod
    def backward(ctx, g):
        return g.index_select(0, ctx.pos), None, None, None, None


def undispatch(x: torch.Tensor, plan: Plan, group=None) -> torch.Tensor:
    """Gather every rank's local shard back into the global ``[s, ...]`` tensor, on every rank (an
    all-gather padded to the largest shard). The gradient of the result, taken as this rank's, is
    sliced back to its rows."""
    rank, world = _group_info(plan, group, "undispatch")
    n = int(plan.dispatch.rank_tokens[rank])
    if x.shape[0] != n:
        raise MaskError(f"undispatch: x has {x.shape[0]} rows but rank {rank} holds {n} under the plan")
    return _Undispatch.apply(x, plan, rank, world, group)


def local_masks(plan: Plan, rank: int) -> tuple[Mask, ...]:
    """The per-stage masks `dist_attention` runs on `rank` (stage 0: local keys)."""
    return rank_layout(plan, rank).masks


__all__ = [
    "RankLayout",
    "check_same_plan",
    "dispatch",
    "dist_attention",
    "group_cast",
    "group_reduce",
    "local_masks",
    "merge_partials",
    "no_communication",
    "rank_layout",
    "traffic",
    "undispatch",
]
