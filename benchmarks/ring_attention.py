"""Ring attention with zigzag balancing: the ring baseline of the scaling benchmark.

    pos = ring_positions(seq_len, world, rank)                  # the global tokens this rank holds
    q_l, k_l, v_l = (ring_shard(t, world, rank) for t in (q, k, v))
    out_l = ring_attention(q_l, k_l, v_l, mask, group)          # local shard in, local shard out
    out = ring_unshard(out_l, world, group)                     # every rank gets the full [s, ...]

This is ring attention as the field knows it (ring-flash-attn's "zigzag" ring attention), run over
an arbitrary `maskc.Mask` with maskc's FFA kernels for the per-block compute. It ignores the mask's
structure for communication: **every rank receives all K/V of every other rank, in world - 1 hops,
whatever the mask** (only the kernel launch of a block is skipped when the mask allows no pair of
it). That is the baseline `dist_attention`'s planned GroupCast / GroupReduce is compared with.

Layout. The sequence is cut into ``2 * world`` equal chunks; rank r holds chunks r and
``2 * world - 1 - r`` (in that order), which balances causal-like masks. ``zigzag=False`` gives the
plain layout: ``world`` contiguous chunks.

Forward. At step j (0 .. world - 1) rank r holds the K/V block of rank ``(r - j) mod world`` (step 0:
its own). At the start of step j < world - 1 it posts one `torch.distributed.batch_isend_irecv`
(send the block it holds to rank r + 1, receive the next one from rank r - 1; K and V travel
together as one contiguous ``[L, 2, hkv, d]`` tensor), computes its local queries against the
held block with the cached sub-mask, and waits for the transfer only after the compute. Partial
outputs are merged with their log-sum-exp in float32 (`maskc.runtime.dist.merge_partials`). On
CUDA the transfers run on a side stream (the one `dist_attention` uses).

Memory. Every received block (whose sub-mask is not empty) is kept, with its step's small autograd
graph, for the backward: ``world`` K/V blocks per rank, i.e. the whole sequence's K/V. That is fine
for the benchmark (the backward then needs no second K/V rotation) and is the memory cost of this
baseline, not a property of ring attention in general.

Backward. Each step's gradients come from its own graph (detached leaves), through the merge's
chain rule as in `maskc.runtime.dist._DistAttention`. dQ accumulates locally in float32. The dK/dV
of a block go back to its owner in a travelling float32 accumulator (see `_RingAttention.backward`
for the indexing): world - 1 hops per accumulator, one per ring step, each hop overlapped with the
next step's compute, and the owner's own contribution is added when its accumulator arrives.

`ring_bytes` gives the bytes each rank receives (forward K/V, backward dK/dV); `ring_traffic`
counts what this process really sent and received, to compare the two.
"""

from __future__ import annotations

import contextlib
import math
import threading
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist

from maskc.comm import layout_segments, submask
from maskc.errors import MaskError
from maskc.mask import Mask
from maskc.runtime import attention
from maskc.runtime.dist import _comm_stream, _stage_weights, merge_partials
from maskc.runtime.ffa import _check_interpreter
from maskc.runtime.validate import check_inputs

_LOCK = threading.Lock()
_SUBMASKS: dict[tuple, Mask] = {}
_MAX_CACHED = 1024
# bytes this process has moved through the ring since the last reset
_TRAFFIC = {"fwd_send": 0, "fwd_recv": 0, "bwd_send": 0, "bwd_recv": 0}


# ---- layout ------------------------------------------------------------------------------------


def _check_int(value, what: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise MaskError(f"{what} must be an integer >= {low}, got {value!r}")
    if value < low:
        raise MaskError(f"{what} must be an integer >= {low}, got {value}")
    return int(value)


def _chunk_ranges(seq_len: int, world: int, rank: int, zigzag: bool, what: str) -> list[tuple[int, int]]:
    """The global ``[start, end)`` ranges `rank` holds, in local order."""
    seq_len = _check_int(seq_len, f"{what}: seq_len", 0)
    world = _check_int(world, f"{what}: world", 1)
    rank = _check_int(rank, f"{what}: rank", 0)
    if rank >= world:
        raise MaskError(f"{what}: rank must lie in [0, world={world}), got {rank}")
    parts = 2 * world if zigzag else world
    if seq_len % parts:
        layout = "zigzag layout cuts it into 2 * world" if zigzag else "plain layout cuts it into world"
        raise MaskError(
            f"{what}: seq_len={seq_len} must be divisible by {parts} (the {layout} = {parts} equal chunks)"
        )
    c = seq_len // parts
    if not zigzag:
        return [(rank * c, (rank + 1) * c)]
    other = 2 * world - 1 - rank
    return [(rank * c, (rank + 1) * c), (other * c, (other + 1) * c)]


def ring_positions(seq_len: int, world: int, rank: int, zigzag: bool = True) -> np.ndarray:
    """The global token positions `rank` holds, in local order (int64).

    Zigzag: the sequence in ``2 * world`` equal chunks, rank r holds chunks r and
    ``2 * world - 1 - r`` (seq_len must be divisible by ``2 * world``). Plain (``zigzag=False``):
    ``world`` contiguous chunks, rank r holds chunk r (seq_len divisible by ``world``)."""
    return _positions(seq_len, world, rank, zigzag, "ring_positions")


def _positions(seq_len, world, rank, zigzag, what: str) -> np.ndarray:
    ranges = _chunk_ranges(seq_len, world, rank, zigzag, what)
    return np.concatenate([np.arange(a, b, dtype=np.int64) for a, b in ranges])


def ring_shard(x: torch.Tensor, world: int, rank: int, zigzag: bool = True) -> torch.Tensor:
    """Rows ``ring_positions(len(x), world, rank, zigzag)`` of a global ``[s, ...]`` tensor (no
    communication; differentiable)."""
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise MaskError(f"ring_shard: x must be a torch.Tensor [seq, ...], got {type(x).__name__}")
    pos = _positions(x.shape[0], world, rank, zigzag, "ring_shard")
    return x.index_select(0, torch.as_tensor(pos, device=x.device))


def _group_rank_world(group, what: str) -> tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        if group is not None:
            raise MaskError(f"{what}: a group was given but torch.distributed is not initialised")
        return 0, 1
    rank = dist.get_rank(group)
    if rank < 0:
        raise MaskError(f"{what}: this process is not a member of the group it was given")
    return rank, dist.get_world_size(group)


class _Unshard(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, world, rank, group, zigzag):
        n = x.shape[0] * world
        ctx.pos = torch.as_tensor(ring_positions(n, world, rank, zigzag), device=x.device)
        full = x.new_empty((n,) + tuple(x.shape[1:]))
        if world == 1:
            full[ctx.pos] = x
            return full
        bufs = [torch.empty_like(x, memory_format=torch.contiguous_format) for _ in range(world)]
        dist.all_gather(bufs, x.contiguous(), group=group)
        for r in range(world):
            full[torch.as_tensor(ring_positions(n, world, r, zigzag), device=x.device)] = bufs[r]
        return full

    @staticmethod
    def backward(ctx, g):
        return g.index_select(0, ctx.pos), None, None, None, None


def ring_unshard(local: torch.Tensor, world: int, group=None, zigzag: bool = True) -> torch.Tensor:
    """All-gather every rank's shard back into the global ``[world * L, ...]`` tensor, on every rank.

    Differentiable: the gradient of the result, taken as this rank's, is sliced back to its rows."""
    rank, size = _group_rank_world(group, "ring_unshard")
    world = _check_int(world, "ring_unshard: world", 1)
    if size != world:
        raise MaskError(f"ring_unshard: world={world} but the process group has {size} rank(s)")
    if not isinstance(local, torch.Tensor) or local.dim() < 1:
        raise MaskError(f"ring_unshard: local must be a torch.Tensor [L, ...], got {type(local).__name__}")
    if zigzag and local.shape[0] % 2:
        raise MaskError(
            f"ring_unshard: local has {local.shape[0]} rows; the zigzag layout holds two equal chunks "
            f"per rank, so it must be even"
        )
    return _Unshard.apply(local, world, rank, group, bool(zigzag))


# ---- communication accounting --------------------------------------------------------------------


class RingBytes(NamedTuple):
    """Bytes one rank receives (and sends: the ring is symmetric) per forward + backward call."""

    forward: int  # K/V blocks, input dtype
    backward: int  # dK/dV accumulators, float32


def ring_bytes(seq_len: int, world: int, hkv: int, head_dim: int, dtype_bytes: int) -> RingBytes:
    """Predicted bytes each rank receives in one `ring_attention` forward and backward.

    Forward: world - 1 K/V blocks of ``seq_len / world`` tokens, ``2 * hkv * head_dim`` values of
    `dtype_bytes` each. Backward: world - 1 float32 dK/dV accumulators of the same shape. Sent
    bytes are the same (each rank sends one block per hop). Independent of the mask and layout."""
    world = _check_int(world, "ring_bytes: world", 1)
    seq_len = _check_int(seq_len, "ring_bytes: seq_len", 0)
    if seq_len % world:
        raise MaskError(f"ring_bytes: seq_len={seq_len} must be divisible by world={world}")
    block = (seq_len // world) * 2 * int(hkv) * int(head_dim)
    return RingBytes(forward=(world - 1) * block * int(dtype_bytes), backward=(world - 1) * block * 4)


def ring_traffic(reset: bool = False) -> dict[str, int]:
    """Bytes this process sent and received through the ring since the last reset:
    ``{"fwd_send", "fwd_recv", "bwd_send", "bwd_recv"}`` (compare with `ring_bytes`)."""
    out = dict(_TRAFFIC)
    if reset:
        for key in _TRAFFIC:
            _TRAFFIC[key] = 0
    return out


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


# ---- per-step sub-masks ------------------------------------------------------------------------


def _block_owner(rank: int, step: int, world: int) -> int:
    """Whose K/V block `rank` holds at ring step `step` (forward and backward alike)."""
    return (rank - step) % world


def step_mask(mask: Mask, world: int, rank: int, step: int, zigzag: bool = True) -> Mask:
    """The mask of `rank`'s local queries x the block it holds at `step` (cached per mask digest,
    world, rank, step and layout), in local order: ``(L, L)`` with ``L = mask.sq / world``."""
    if not isinstance(mask, Mask):
        raise MaskError(f"step_mask: mask must be a maskc.Mask, got {type(mask).__name__}")
    return _step_mask(mask, mask.digest(), world, rank, step, zigzag)


def _step_mask(mask: Mask, digest: str, world: int, rank: int, step: int, zigzag: bool) -> Mask:
    key = (digest, world, rank, step, bool(zigzag))
    hit = _SUBMASKS.get(key)
    if hit is not None:
        return hit
    n = mask.sq
    rows = layout_segments(_chunk_ranges(n, world, rank, zigzag, "step_mask"))
    cols = layout_segments(_chunk_ranges(n, world, _block_owner(rank, step, world), zigzag, "step_mask"))
    m = submask(mask, rows, cols)
    with _LOCK:
        if len(_SUBMASKS) >= _MAX_CACHED:
            _SUBMASKS.clear()
        _SUBMASKS[key] = m
    return m


def _empty(m: Mask) -> bool:
    return m.area == 0 or len(m.slices) == 0


# ---- the autograd function ---------------------------------------------------------------------


class _Ring:
    """Point-to-point exchanges around the ring: send to rank + 1, receive from rank - 1, both in
    one `batch_isend_irecv`; on CUDA issued on the side stream."""

    def __init__(self, rank, world, group, device):
        self.group = group
        self.next, self.prev = (rank + 1) % world, (rank - 1) % world
        self.cuda = device.type == "cuda"
        self.device = device
        self.side = _comm_stream(device) if self.cuda else None

    def post(self, send: torch.Tensor, what: str) -> "_InFlight":
        """Start sending `send` (contiguous) to rank + 1 and receiving a tensor of its shape and
        dtype from rank - 1."""
        if self.cuda:
            self.side.wait_stream(torch.cuda.current_stream(self.device))  # `send` is ready
        with torch.cuda.stream(self.side) if self.cuda else contextlib.nullcontext():
            recv = torch.empty_like(send, memory_format=torch.contiguous_format)
            ops = [
                dist.P2POp(dist.isend, send, group=self.group, group_peer=self.next),
                dist.P2POp(dist.irecv, recv, group=self.group, group_peer=self.prev),
            ]
            works = dist.batch_isend_irecv(ops)
        _TRAFFIC[what + "_send"] += _nbytes(send)
        _TRAFFIC[what + "_recv"] += _nbytes(recv)
        return _InFlight(self, send, recv, works)


class _InFlight:
    """One exchange in flight; `wait` returns the received tensor, ready on the current stream.
    The sent tensor is referenced until then (it must not be freed or written before)."""

    __slots__ = ("ring", "send", "recv", "works")

    def __init__(self, ring, send, recv, works):
        self.ring, self.send, self.recv, self.works = ring, send, recv, works

    def wait(self) -> torch.Tensor:
        for w in self.works:
            w.wait()
        ring, recv = self.ring, self.recv
        if ring.cuda:
            cur = torch.cuda.current_stream(ring.device)
            cur.wait_stream(ring.side)
            recv.record_stream(cur)  # allocated on the side stream, used on the compute one
        self.send = self.works = None
        return recv


class _RingAttention(torch.autograd.Function):
    """Forward: world ring steps, each the local queries against the block held, merged with lse.
    Each step keeps its own small autograd graph (detached leaves), so the backward needs only the
    merge's chain rule (``w_k = exp(lse_k - lse)``)::

        dO_k = w_k dO,   dlse_k = w_k (dlse + <dO, o_k - O>)
    """

    @staticmethod
    def forward(ctx, q, k, v, masks, rank, world, group, scale, softcap):
        ctx.set_materialize_grads(False)
        ring = _Ring(rank, world, group, q.device) if world > 1 else None
        n = q.shape[0]
        q_leaf = q.detach().requires_grad_()
        held = torch.stack([k.detach(), v.detach()], dim=1)  # [L, 2, hkv, d]: K and V travel together
        leaves, outputs = [None] * world, [None] * world
        out = lse = None
        for j in range(world):
            pending = ring.post(held, "fwd") if j < world - 1 else None  # the block for step j + 1
            m = masks[j]
            if not _empty(m):
                kv_leaf = held.detach().requires_grad_()
                with torch.enable_grad():  # (Function.forward runs under no_grad)
                    o_j, l_j = attention(q_leaf, kv_leaf[:, 0], kv_leaf[:, 1], m, scale=scale, softcap=softcap,
                                         return_lse=True)
                leaves[j], outputs[j] = kv_leaf, (o_j, l_j)
                if out is None:
                    out, lse = o_j.detach().float(), l_j.detach().float()
                else:
                    out, lse = merge_partials(out, lse, o_j.detach(), l_j.detach())
            if pending is not None:
                held = pending.wait()
        if out is None:  # no step allowed any pair: every row is empty
            out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
            lse = torch.full((q.shape[1], n), float("-inf"), dtype=torch.float32, device=q.device)
        ctx.ring, ctx.world = ring, world
        ctx.kv_shape, ctx.k_dtype, ctx.v_dtype = (n, 2) + tuple(k.shape[1:]), k.dtype, v.dtype
        ctx.q_leaf, ctx.leaves, ctx.outputs = q_leaf, leaves, outputs
        ctx.save_for_backward(out, lse)  # the float32 merged output: the lse correction uses it
        return out.to(q.dtype), lse

    @staticmethod
    def backward(ctx, dout, dlse):
        if dout is None and dlse is None:
            return (None,) * 9
        out, lse = ctx.saved_tensors
        q_leaf, world, ring = ctx.q_leaf, ctx.world, ctx.ring
        dev = q_leaf.device
        if dout is None:
            dout = torch.zeros(out.shape, dtype=q_leaf.dtype, device=dev)
        dq = torch.zeros(q_leaf.shape, dtype=torch.float32, device=dev)

        def step_grads(j):
            """dQ (added to dq) and the float32 dK/dV of the block held at step j (None: no pair)."""
            if ctx.outputs[j] is None:
                return None
            o_j, l_j = ctx.outputs[j]
            w = _stage_weights(l_j.detach(), lse)  # [h, L]
            d_o = (w.transpose(0, 1).unsqueeze(-1) * dout.float()).to(o_j.dtype)
            corr = (dout.float() * (o_j.detach().float() - out)).sum(-1).transpose(0, 1)
            d_l = w * (corr + (dlse.float() if dlse is not None else 0.0))
            d_l = torch.where(torch.isfinite(d_l), d_l, torch.zeros_like(d_l))
            g_q, g_kv = torch.autograd.grad((o_j, l_j), (q_leaf, ctx.leaves[j]), (d_o, d_l), allow_unused=True)
            if g_q is not None:
                dq.add_(g_q.float())
            return None if g_kv is None else g_kv.float()

        # The travelling accumulator. At backward step j (as in the forward) rank r holds block
        # b = (r - j) mod world. For j >= 1 it also holds the float32 dK/dV accumulator of b:
        #   j == 1:  it starts the accumulator (rank b + 1 is the first to hold b after its owner);
        #   j >= 2:  the accumulator arrived from rank r - 1, which held b = (r - 1 - (j - 1)) at
        #            step j - 1 (the exchange posted after that step);
        # it adds its step-j contribution and sends it to rank r + 1, which holds b at step j + 1.
        # The exchange after step world - 1 carries block (r + 1)'s accumulator to rank r + 1, its
        # owner, and brings rank r its own block's: (r - 1) - (world - 1) = r (mod world). So every
        # accumulator makes world - 1 hops (b + 1 -> ... -> b - 1 -> b) and has every other rank's
        # contribution; the owner adds its own (step 0, computed while the last hop is in flight).
        acc = None
        for j in range(1, world):
            contrib = step_grads(j)
            if acc is None:  # j == 1
                acc = contrib if contrib is not None else torch.zeros(ctx.kv_shape, dtype=torch.float32, device=dev)
            else:
                acc = acc.wait()
                if contrib is not None:
                    acc = acc + contrib  # a new tensor: the received buffer may not be written in place
            acc = ring.post(acc.contiguous(), "bwd")  # overlaps step j + 1 (or step 0 at the end)
        own = step_grads(0)
        dkv = acc.wait() if acc is not None else None
        if own is not None:
            dkv = own if dkv is None else dkv + own
        if dkv is None:
            dkv = torch.zeros(ctx.kv_shape, dtype=torch.float32, device=dev)
        dk, dv = dkv[:, 0].to(ctx.k_dtype), dkv[:, 1].to(ctx.v_dtype)
        return dq.to(q_leaf.dtype), dk, dv, None, None, None, None, None, None


def ring_attention(q, k, v, mask, group=None, *, zigzag: bool = True, scale: float | None = None,
                   softcap: float = 0.0, return_lse: bool = False):
    """Ring attention over `mask` (local shards in, local shard out).

    q ``[L, hq, d]``, k and v ``[L, hkv, d]`` (``hq % hkv == 0``) hold this rank's tokens,
    ``ring_positions(world * L, world, rank, zigzag)`` of the global ones (see `ring_shard`); `mask`
    is a `maskc.Mask` of the global ``(world * L, world * L)``. Returns ``out [L, hq, d]`` (and
    ``lse [hq, L]``, float32; -inf for a row with no allowed key). Forward and backward (also
    through lse); every rank of `group` (default: the world; none without torch.distributed)
    must call it with the same mask and shapes.
    """
    rank, world = _group_rank_world(group, "ring_attention")
    if not isinstance(mask, Mask):
        raise MaskError(f"ring_attention: mask must be a maskc.Mask, got {type(mask).__name__}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            got = f"shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise MaskError(f"ring_attention: {name} must be a 3-D tensor [local tokens, heads, head_dim], got {got}")
    n = q.shape[0]
    if k.shape[0] != n or v.shape[0] != n:
        raise MaskError(
            f"ring_attention: q, k and v must hold the same local tokens, got {n}, {k.shape[0]} and {v.shape[0]}"
        )
    if tuple(v.shape) != tuple(k.shape):
        raise MaskError(f"ring_attention: v shape {tuple(v.shape)} must equal k shape {tuple(k.shape)}")
    # everything the kernels would refuse is refused here, on every rank alike, before any
    # exchange: a rank failing half-way round the ring would leave its neighbours waiting
    try:
        check_inputs(q, k, v, Mask([], sq=n, sk=n))
        _check_interpreter(q.device)
    except MaskError as e:
        raise MaskError(str(e).replace("attention:", "ring_attention:", 1)) from None
    if softcap < 0:
        raise MaskError(f"ring_attention: softcap must be >= 0 (0 disables it), got {softcap}")
    if mask.shape != (world * n, world * n):
        raise MaskError(
            f"ring_attention: mask is {mask.sq} x {mask.sk} but the ring holds world * local tokens = "
            f"{world} * {n} = {world * n} tokens: the mask must be {world * n} x {world * n}"
        )
    if zigzag and n % 2:
        raise MaskError(
            f"ring_attention: q has {n} local tokens; the zigzag layout holds two equal chunks per rank, "
            f"so it must be even (or pass zigzag=False)"
        )
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if n == 0:  # no rank holds a token (the mask's shape is the same everywhere): nothing to send
        rank, world, group = 0, 1, None
    digest = mask.digest()
    masks = tuple(_step_mask(mask, digest, world, rank, j, zigzag) for j in range(world))
    out, lse = _RingAttention.apply(q, k, v, masks, rank, world, group, scale, float(softcap))
    return (out, lse) if return_lse else out


__all__ = [
    "RingBytes",
    "ring_attention",
    "ring_bytes",
    "ring_positions",
    "ring_shard",
    "ring_traffic",
    "ring_unshard",
    "step_mask",
]
