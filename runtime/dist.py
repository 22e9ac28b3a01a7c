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

Plans with GroupReduce pairs (``compile(..., group_reduce=True)``: query rows move to the keys
when that is cheaper) run too: the rows go out with their stage's GroupCast, their key owner
computes them against its own keys and returns the partial output and lse, merged at the rows;
backward, their output gradients go out and dQ comes back (dK/dV stay with the owner).
"""

from __future__ import annotations

import contextlib
import math
import threading
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from maskc.comm import KV
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
_TRAFFIC = {"cast_send": 0, "cast_recv": 0, "reduce_send": 0, "reduce_recv": 0,
            "qcast_send": 0, "qcast_recv": 0, "qreduce_send": 0, "qreduce_recv": 0,
            "heads_send": 0, "heads_recv": 0}


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
    # GroupReduce (pairs that move queries to the keys), per remote stage; all empty without them
    group_reduce: bool = False  # the plan has such pairs (every rank then runs their collectives)
    q_rows: tuple = ()  # local query rows sent out to be computed elsewhere, grouped by key owner
    q_send_splits: tuple = ()  # query rows per key-owner rank
    q_recv_splits: tuple = ()  # query rows received per query-owner rank (computed here)
    host_masks: tuple = ()  # Mask of the received query rows x this rank's keys


def rank_layout(plan: Plan, rank: int) -> RankLayout:
    """The cached `RankLayout` of `rank` under `plan` (built from the plan alone, no communication)."""
    key = (plan.digest(), rank)
    hit = _LAYOUTS.get(key)
    if hit is not None:
        return hit
    sch, d = plan.schedule, plan.dispatch
    cp = plan.cp_size
    def local_rows(ranges):  # [peer, start, end] global ranges of this rank -> local row indices
        ln = ranges[:, 2] - ranges[:, 1]
        if not ranges.shape[0]:
            return np.zeros(0, np.int64)
        return (np.repeat(d.local_index(rank, ranges[:, 1]), ln) + _ramp(ln)).astype(np.int64)

    def splits(ranges):  # rows per peer rank
        return np.bincount(ranges[:, 0], weights=ranges[:, 2] - ranges[:, 1], minlength=cp).astype(np.int64).tolist()

    send_rows, send_splits, recv_splits = [], [], []
    q_rows, q_send, q_recv, host = [], [], [], []
    group_reduce = sch.n_group_reduce > 0
    for k in range(1, plan.stages + 1):
        s = sch.send(rank, k, KV)  # [dst, start, end]
        send_rows.append(local_rows(s))
        send_splits.append(splits(s))
        recv_splits.append(splits(sch.recv(rank, k, KV)))  # [src, start, end]
        if group_reduce:
            qs = sch.q_send(rank, k)  # my query rows -> the key owner [src, start, end]
            q_rows.append(local_rows(qs))
            q_send.append(splits(qs))
            q_recv.append(splits(sch.q_recv(rank, k)))
            host.append(plan.host_mask(rank, k))
    layout = RankLayout(
        rank=rank,
        n_local=int(d.rank_tokens[rank]),
        masks=tuple(plan.local_masks(rank)),
        send_rows=tuple(send_rows),
        send_splits=tuple(send_splits),
        recv_splits=tuple(recv_splits),
        group_reduce=group_reduce,
        q_rows=tuple(q_rows),
        q_send_splits=tuple(q_send),
        q_recv_splits=tuple(q_recv),
        host_masks=tuple(host),
    )
    with _LOCK:
        if len(_LAYOUTS) >= _MAX_CACHED:
            _LAYOUTS.clear()
        _LAYOUTS[key] = layout
    return layout


_DEVICE_COPIES: dict = {}


def _on_device(layout, name: str, device):
    """``layout.<name>`` (an int64 index array, or a tuple of them: one per stage) as long
    tensors on ``device``, made once per layout and device: a copy from pageable host memory
    would synchronise the host with the GPU at every call."""
    key = (id(layout), name, str(device))
    hit = _DEVICE_COPIES.get(key)
    if hit is None or hit[0] is not layout:
        value = getattr(layout, name)
        if isinstance(value, tuple):
            copy = [torch.as_tensor(np.asarray(r), dtype=torch.long, device=device) for r in value]
        else:
            copy = torch.as_tensor(value, dtype=torch.long, device=device)
        hit = (layout, copy)
        with _LOCK:
            if len(_DEVICE_COPIES) >= 4 * _MAX_CACHED:
                _DEVICE_COPIES.clear()
            _DEVICE_COPIES[key] = hit
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
    """Bytes this process sent and received since the last reset: ``cast_*`` (forward K/V,
    `group_cast`), ``reduce_*`` (backward dK/dV, `group_reduce`), and for GroupReduce pairs
    ``qcast_*`` (forward: query rows out, partial outputs and lse back) and ``qreduce_*``
    (backward: output gradients out, dQ back); head-parallel plans: ``heads_*`` (all their
    all-to-alls, forward and backward). Rows a rank keeps are never packed or counted."""
    out = dict(_TRAFFIC)
    if reset:
        for key in _TRAFFIC:
            _TRAFFIC[key] = 0
    return out


class _Pending:
    """A collective in flight (or already done), the buffer it fills and the one it sends (kept
    alive until the transfer is waited for)."""

    __slots__ = ("buf", "work", "sent")

    def __init__(self, buf, work, sent=None):
        self.buf = buf
        self.work = work
        self.sent = sent

    def wait(self) -> torch.Tensor:
        if self.work is not None:
            self.work.wait()
            self.work = None
        self.sent = None
        return self.buf


def exchange(x: torch.Tensor, send_splits, recv_splits, group=None, *, kind: str = "qcast", async_op: bool = False):
    """All-to-all-v of the rows of ``x`` (``send_splits[r]`` rows to rank r, in rank order);
    returns the received rows (``recv_splits[r]`` from rank r, concatenated in rank order), or a
    handle with ``.wait()`` when ``async_op``. ``kind`` names the `traffic` counter."""
    x = x.contiguous()
    recv = x.new_empty((int(sum(recv_splits)),) + tuple(x.shape[1:]))
    if _skip_comm():
        return _Pending(recv, None) if async_op else recv
    work = dist.all_to_all_single(recv, x, list(recv_splits), list(send_splits), group=group, async_op=async_op)
    _count(kind, x, recv)
    return _Pending(recv, work, x) if async_op else recv


def group_cast(x: torch.Tensor, send_rows: torch.Tensor, send_splits, recv_splits, group=None, *, async_op: bool = False):
    """GroupCast: rank r sends ``x[send_rows]`` (grouped by destination, ``send_splits[dst]`` rows
    each) and receives ``sum(recv_splits)`` rows concatenated by source rank. One
    ``all_to_all_single`` with exact split sizes (zero where a pair has nothing). Returns the
    received tensor, or a handle with ``.wait() -> tensor`` when ``async_op``."""
    return exchange(x.index_select(0, send_rows), send_splits, recv_splits, group, kind="cast", async_op=async_op)


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
    sent = exchange(grad, recv_splits, send_splits, group, kind="reduce", async_op=True)
    rows = send_rows[:0] if _skip_comm() else send_rows  # nothing arrived: add nothing
    pending = _Reduced(sent.buf, sent.work, rows, n_local)
    pending.sent = sent.sent  # read by the transfer until it is waited for
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


class _Side:
    """Where collectives run: a side CUDA stream (NCCL's own stream does the transfer), or inline
    on the CPU. `issue` starts one after the current stream's work; `ready` makes its result
    usable on the current stream."""

    def __init__(self, device):
        self.device = device
        self.stream = _comm_stream(device) if device.type == "cuda" else None

    def issue(self, fn):
        if self.stream is None:
            return fn()
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            return fn()

    def ready(self, pending) -> torch.Tensor:
        buf = pending.wait()
        if self.stream is not None:
            cur = torch.cuda.current_stream(self.device)
            cur.wait_stream(self.stream)
            buf.record_stream(cur)
        return buf

    def join(self):
        if self.stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self.stream)


def _blocks(splits):
    """(start, stop) row offsets of each peer's block in a buffer laid out by `splits`."""
    out, at = [], 0
    for n in splits:
        out.append((at, at + int(n)))
        at += int(n)
    return out


def _merge_grads(dout, dlse, out, lse, o_k, l_k):
    """The merge's chain rule for one partial result ``(o_k [m, h, d], l_k [h, m])`` of rows whose
    merged output is ``out`` / ``lse`` and output gradients ``dout`` / ``dlse`` (None: 0):
    ``(dO_k, dlse_k)`` with ``w = exp(l_k - lse)``, ``dO_k = w dO``,
    ``dlse_k = w (dlse + <dO, o_k - O>)``."""
    w = _stage_weights(l_k.detach(), lse)  # [h, m]
    d_o = (w.transpose(0, 1).unsqueeze(-1) * dout.float()).to(o_k.dtype)
    corr = (dout.float() * (o_k.detach().float() - out)).sum(-1).transpose(0, 1)
    d_l = w * (corr + (dlse.float() if dlse is not None else 0.0))
    return d_o, torch.where(torch.isfinite(d_l), d_l, torch.zeros_like(d_l))


class _DistAttention(torch.autograd.Function):
    """Forward: stage 0 (local keys) while all remote stages are in flight, then stage by stage,
    merged with lse. Each stage's attention keeps its own small autograd graph (detached leaves),
    so the backward only needs the chain rule of the merge:

        dO_k = w_k dO,   dlse_k = w_k (dlse + <dO, o_k - O>),   w_k = exp(lse_k - lse)

    which is exactly the gradient of the merged softmax (P_k w_k = P).

    GroupReduce pairs (queries moved to the keys): in stage k the query rows go out with the
    stage's GroupCast; their key owner (the "host") computes them against its own keys and sends
    the partial output and lse back, to be merged at those rows. Backward: the rows' (dO_k,
    dlse_k) go to the host, which adds its dK/dV locally and returns dQ.

    Every rank issues the same collectives in the same order (zero-sized where it has nothing),
    whether or not it computes in a stage.
    """

    @staticmethod
    def forward(ctx, q, k, v, plan, layout, group, scale, softcap):
        ctx.set_materialize_grads(False)
        nst = plan.stages
        side = _Side(q.device)
        rows = _on_device(layout, "send_rows", q.device)
        q_rows = _on_device(layout, "q_rows", q.device) if layout.group_reduce else []
        # keys and values travel together: [L, 2, hkv, d]
        kv = torch.stack([k.detach(), v.detach()], dim=1) if nst else None

        # GroupCast of every remote stage now (keys/values, and queries of GroupReduce pairs);
        # stage k's compute waits only for stage k
        pending, q_pending = [], []
        for kk in range(nst):
            pending.append(side.issue(lambda kk=kk: group_cast(
                kv, rows[kk], layout.send_splits[kk], layout.recv_splits[kk], group, async_op=True)))
            if layout.group_reduce:
                q_pending.append(side.issue(lambda kk=kk: exchange(
                    q.detach().index_select(0, q_rows[kk]), layout.q_send_splits[kk], layout.q_recv_splits[kk],
                    group, kind="qcast", async_op=True)))

        q_leaf = q.detach().requires_grad_()
        k_leaf, v_leaf = k.detach().requires_grad_(), v.detach().requires_grad_()
        inputs = [None] * (nst + 1)
        outputs = [None] * (nst + 1)
        recv_shapes = [None] * (nst + 1)
        hosted = [None] * (nst + 1)  # GroupReduce: (q rows leaf, o, lse) computed here for others
        returns = [None] * (nst + 1)  # GroupReduce: partial (out, lse) of my rows, in flight back
        out = lse = None
        for st in range(nst + 1):
            if st == 0:
                inputs[0] = (k_leaf, v_leaf)
                keys, values = k_leaf, v_leaf
                run = True
            else:
                buf = side.ready(pending[st - 1])
                recv_shapes[st] = tuple(buf.shape)
                run = buf.shape[0] > 0
                if run:
                    kv_leaf = buf.requires_grad_()
                    inputs[st] = (kv_leaf,)
            if run:
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
            if st and layout.group_reduce:  # host the rows sent to my keys, return their partials
                qb = side.ready(q_pending[st - 1])
                if qb.shape[0]:
                    qh = qb.requires_grad_()
                    with torch.enable_grad():
                        o_h, l_h = attention(qh, k_leaf, v_leaf, layout.host_masks[st - 1], scale=scale,
                                             softcap=softcap, return_lse=True)
                    hosted[st] = (qh, o_h, l_h)
                    o_s, l_s = o_h.detach(), l_h.detach().transpose(0, 1)
                else:
                    o_s = q.new_empty((0,) + tuple(q.shape[1:]))
                    l_s = torch.empty((0, q.shape[1]), dtype=torch.float32, device=q.device)
                back = (layout.q_recv_splits[st - 1], layout.q_send_splits[st - 1])
                returns[st] = (side.issue(lambda o_s=o_s, b=back: exchange(o_s, *b, group, async_op=True)),
                               side.issue(lambda l_s=l_s, b=back: exchange(l_s, *b, group, async_op=True)))

        # merge the partial results of my rows computed by their keys' owners
        q_parts = [None] * (nst + 1)  # per stage: [(rows, o_b, l_b)] per owner block
        if any(r is not None for r in returns):
            out, lse = out.clone(), lse.clone()  # merged in place below; may alias stage 0's (saved) result
        for st in range(1, nst + 1):
            if returns[st] is None:
                continue
            o_r, l_r = side.ready(returns[st][0]), side.ready(returns[st][1])
            parts = []
            for a, b in _blocks(layout.q_send_splits[st - 1]):
                if b == a:
                    continue
                r = q_rows[st - 1][a:b]
                o_b, l_b = o_r[a:b], l_r[a:b].transpose(0, 1)
                mo, ml = merge_partials(out.index_select(0, r), lse.index_select(1, r), o_b, l_b)
                out.index_copy_(0, r, mo)
                lse.index_copy_(1, r, ml)
                parts.append((r, o_b, l_b))
            q_parts[st] = parts
        ctx.layout, ctx.group = layout, group
        ctx.q_leaf, ctx.stage_inputs, ctx.stage_outputs = q_leaf, inputs, outputs
        ctx.kv_leaves, ctx.hosted, ctx.q_parts = (k_leaf, v_leaf), hosted, q_parts
        ctx.rows, ctx.q_rows, ctx.recv_shapes = rows, q_rows, recv_shapes
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
        side = _Side(dout.device)
        nst = len(ctx.stage_outputs) - 1
        q_leaf = ctx.q_leaf
        k_leaf, v_leaf = ctx.kv_leaves
        dev = q_leaf.device

        # GroupReduce, first: the output gradients of my rows computed elsewhere go to their hosts
        q_grads = [None] * (nst + 1)
        if layout.group_reduce:
            hq = q_leaf.shape[1]
            for st in range(1, nst + 1):
                d_os, d_ls = [], []
                for r, o_b, l_b in ctx.q_parts[st] or ():
                    d_o, d_l = _merge_grads(dout.index_select(0, r), None if dlse is None else dlse.index_select(1, r),
                                            out.index_select(0, r), lse.index_select(1, r), o_b, l_b)
                    d_os.append(d_o)
                    d_ls.append(d_l.transpose(0, 1))
                d_o = torch.cat(d_os) if d_os else dout.new_empty((0,) + tuple(dout.shape[1:]))
                d_l = torch.cat(d_ls) if d_ls else torch.empty((0, hq), dtype=torch.float32, device=dev)
                fwd = (layout.q_send_splits[st - 1], layout.q_recv_splits[st - 1])
                q_grads[st] = (side.issue(lambda d_o=d_o, f=fwd: exchange(d_o, *f, group, kind="qreduce", async_op=True)),
                               side.issue(lambda d_l=d_l, f=fwd: exchange(d_l, *f, group, kind="qreduce", async_op=True)))

        def stage_grads(st):
            o_k, l_k = ctx.stage_outputs[st]
            d_o, d_l = _merge_grads(dout, dlse, out, lse, o_k, l_k)
            ins = (q_leaf,) + ctx.stage_inputs[st]
            return torch.autograd.grad((o_k, l_k), ins, (d_o, d_l), allow_unused=True)

        dq = torch.zeros(q_leaf.shape, dtype=torch.float32, device=dev)  # summed in fp32
        reduces = []
        for st in range(1, nst + 1):  # remote stages first, each reduction overlapping the next stage
            kk = st - 1
            if ctx.stage_outputs[st] is None:
                g_kv = torch.zeros(ctx.recv_shapes[st], dtype=q_leaf.dtype, device=dev)
            else:
                g = stage_grads(st)
                if g[0] is not None:
                    dq += g[0]
                g_kv = g[1] if g[1] is not None else torch.zeros_like(ctx.stage_inputs[st][0])
            reduces.append(side.issue(lambda g_kv=g_kv, kk=kk: group_reduce(
                g_kv, ctx.rows[kk], layout.send_splits[kk], layout.recv_splits[kk], layout.n_local, group,
                async_op=True)))
        g = stage_grads(0)
        if g[0] is not None:
            dq += g[0]
        dk = g[1].float() if g[1] is not None else torch.zeros(k_leaf.shape, device=dev)
        dv = g[2].float() if g[2] is not None else torch.zeros(v_leaf.shape, device=dev)

        # GroupReduce: the rows I host: their dK/dV stay here, their dQ goes back
        dq_back = []
        for st in range(1, nst + 1):
            if q_grads[st] is None:
                continue
            d_o, d_l = side.ready(q_grads[st][0]), side.ready(q_grads[st][1])
            if ctx.hosted[st] is not None:
                qh, o_h, l_h = ctx.hosted[st]
                g_q, g_k, g_v = torch.autograd.grad((o_h, l_h), (qh, k_leaf, v_leaf), (d_o, d_l.transpose(0, 1)),
                                                    allow_unused=True)
                if g_k is not None:
                    dk += g_k.float()
                if g_v is not None:
                    dv += g_v.float()
                g_q = g_q if g_q is not None else torch.zeros_like(qh)
            else:
                g_q = q_leaf.new_empty((0,) + tuple(q_leaf.shape[1:]))
            back = (layout.q_recv_splits[st - 1], layout.q_send_splits[st - 1])
            dq_back.append((st, side.issue(lambda g_q=g_q, b=back: exchange(g_q, *b, group, kind="qreduce",
                                                                              async_op=True))))
        for r in reduces:
            side.join()
            r.add_into(dk, dv)
        for st, pending in dq_back:
            got = side.ready(pending)
            if got.shape[0]:
                dq.index_add_(0, ctx.q_rows[st - 1], got.float())
        dq, dk, dv = dq.to(q_leaf.dtype), dk.to(k_leaf.dtype), dv.to(v_leaf.dtype)
        return dq, dk, dv, None, None, None, None, None


# ---- head-parallel plans (scheme "heads": all-to-all of heads, as DeepSpeed-Ulysses) --------------


@dataclass(frozen=True, eq=False)
class HeadsLayout:
    """What one rank sends and receives in a head-parallel plan (cached per plan, rank)."""

    rank: int
    n_local: int
    counts: tuple  # tokens per rank
    rank_major: np.ndarray  # row r of a rank-major buffer (rank 0's tokens, rank 1's, ...) -> global position
    order: np.ndarray  # global position p -> its row in the rank-major buffer
    q_heads: tuple  # per rank: (lo, hi) of its query heads
    kv_heads: tuple  # per rank: (lo, hi) of the key/value heads its query heads use


def heads_layout(plan: Plan, rank: int) -> HeadsLayout:
    key = ("heads", plan.digest(), rank)
    hit = _LAYOUTS.get(key)
    if hit is not None:
        return hit
    cp = plan.cp_size
    hq, hkv = plan.heads
    per, group = hq // cp, hq // hkv
    rank_major = np.concatenate([plan.positions(r) for r in range(cp)]).astype(np.int64)
    layout = HeadsLayout(
        rank=rank,
        n_local=int(plan.dispatch.rank_tokens[rank]),
        counts=tuple(int(n) for n in plan.dispatch.rank_tokens),
        rank_major=rank_major,
        order=np.argsort(rank_major, kind="stable"),
        q_heads=tuple((j * per, (j + 1) * per) for j in range(cp)),
        kv_heads=tuple((j * per // group, ((j + 1) * per - 1) // group + 1) for j in range(cp)),
    )
    with _LOCK:
        if len(_LAYOUTS) >= _MAX_CACHED:
            _LAYOUTS.clear()
        _LAYOUTS[key] = layout
    return layout


class _HeadsComm:
    """One rank's side of the head all-to-alls: `gather` (tokens -> heads) and its adjoint `scatter`."""

    def __init__(self, layout: HeadsLayout, group, device):
        self.layout, self.group = layout, group
        self.rank_major = _on_device(layout, "rank_major", device)
        self.order = _on_device(layout, "order", device)

    def gather(self, x: torch.Tensor, spans) -> torch.Tensor:
        """``x [L, h, d]`` (my tokens, all heads) -> ``[S, w, d]``: every token of the heads
        ``spans[my rank]``, in global order. Rank j gets ``x[:, spans[j]]`` of my tokens."""
        lay = self.layout
        send = torch.cat([x[:, lo:hi] for lo, hi in spans]) if x.shape[0] else x.new_empty(
            (0, spans[0][1] - spans[0][0]) + tuple(x.shape[2:]))
        got = exchange(send, [lay.n_local] * len(spans), lay.counts, self.group, kind="heads")
        return got.index_select(0, self.order)

    def scatter(self, y: torch.Tensor, spans, n_heads: int) -> torch.Tensor:
        """The adjoint of `gather`: ``y [S, w, d]`` (every token, my heads) -> ``[L, n_heads, d]``
        (my tokens), each rank's block added at its heads (summing copies of shared heads)."""
        lay = self.layout
        got = exchange(y.index_select(0, self.rank_major), lay.counts, [lay.n_local] * len(spans), self.group,
                       kind="heads")
        out = y.new_zeros((lay.n_local, n_heads) + tuple(y.shape[2:]))
        for j, (lo, hi) in enumerate(spans):
            out[:, lo:hi] += got[j * lay.n_local:(j + 1) * lay.n_local]
        return out


class _TokensToHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, comm, spans):
        ctx.comm, ctx.spans, ctx.n_heads = comm, spans, x.shape[1]
        return comm.gather(x, spans)

    @staticmethod
    def backward(ctx, g):
        return ctx.comm.scatter(g.contiguous(), ctx.spans, ctx.n_heads), None, None


class _HeadsToTokens(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, comm, spans, n_heads):
        ctx.comm, ctx.spans = comm, spans
        return comm.scatter(y, spans, n_heads)

    @staticmethod
    def backward(ctx, g):
        return ctx.comm.gather(g.contiguous(), ctx.spans), None, None, None


def _heads_attention(q, k, v, plan: Plan, rank: int, group, scale: float, softcap: float):
    """Head-parallel attention: tokens -> heads all-to-all of q, k, v; the whole mask for my
    heads; heads -> tokens all-to-all of out and lse. Autograd runs through the all-to-alls."""
    hq, hkv = plan.heads
    if q.shape[1] != hq or k.shape[1] != hkv:
        raise MaskError(
            f"dist_attention: the plan is head-parallel for hq={hq}, hkv={hkv} heads but q has {q.shape[1]} "
            f"and k {k.shape[1]}; compile with workload=Workload(hq={q.shape[1]}, hkv={k.shape[1]}, ...)"
        )
    layout = heads_layout(plan, rank)
    comm = _HeadsComm(layout, group, q.device)
    qh = _TokensToHeads.apply(q, comm, layout.q_heads)
    kh = _TokensToHeads.apply(k, comm, layout.kv_heads)
    vh = _TokensToHeads.apply(v, comm, layout.kv_heads)
    o, lse = attention(qh, kh, vh, plan.mask, scale=scale, softcap=softcap, return_lse=True)
    out = _HeadsToTokens.apply(o, comm, layout.q_heads, hq)
    lse = _HeadsToTokens.apply(lse.transpose(0, 1).unsqueeze(-1).contiguous(), comm, layout.q_heads, hq)
    return out, lse.squeeze(-1).transpose(0, 1)


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
    if world > 1:
        _verify_once(plan, group, q.device)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if plan.scheme == "heads" and world > 1:
        out, lse = _heads_attention(q, k, v, plan, rank, group, scale, float(softcap))
        return (out, lse) if return_lse else out
    layout = rank_layout(plan, rank)
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
