"""Cost model and simulator: predicted compute, bytes, exposed communication and step time.

One model prices a compiled `Plan` and the classic baselines alike, so they compare fairly:

* compute: ``pairs x flops per pair / kernel throughput``; forward 4 * hq * d flops per allowed
  pair (QK^T and PV), backward 10 * hq * d (five matmuls);
* communication: each rank has one full-duplex link of ``link_gbs`` GB/s; a collective step lasts
  as long as its busiest rank needs to send or receive its bytes, plus ``latency_us``;
* overlap: stages as the runtime runs them (see `simulate`); ring attention overlaps the next
  block's transfer with the current block's compute; Ulysses and the all-gather baseline expose
  their communication.

Bytes counted in ``recv_bytes`` are the forward pass's (what a rank receives); the backward of
every scheme moves about as much again (gradients of what moved forward), reported apart.
Everything is numpy over per-rank arrays, so 1,024 simulated ranks and 16M tokens take seconds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .comm import Q_DST, Q_SRC
from .dispatch import _ramp, band_prefix, cut_bands, key_extent, tight_bands
from .errors import MaskError


@dataclass(frozen=True)
class Workload:
    """Attention shape per token: query heads, key/value heads (GQA), head dim, bytes per element."""

    hq: int = 32
    hkv: int = 8
    head_dim: int = 128
    dtype_bytes: int = 2

    def __post_init__(self):
        for name in ("hq", "hkv", "head_dim", "dtype_bytes"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise MaskError(f"Workload: {name} must be a positive integer, got {v!r}")
        if self.hq % self.hkv:
            raise MaskError(f"Workload: hq={self.hq} must be a multiple of hkv={self.hkv}")

    @property
    def kv_token_bytes(self) -> int:
        """One key and one value token, all key/value heads."""
        return 2 * self.hkv * self.head_dim * self.dtype_bytes

    @property
    def q_token_bytes(self) -> int:
        return self.hq * self.head_dim * self.dtype_bytes

    @property
    def out_row_bytes(self) -> int:
        """A partial output row and its float32 lse, all query heads."""
        return self.hq * self.head_dim * self.dtype_bytes + 4 * self.hq

    @property
    def q_row_bytes(self) -> int:
        """Moving one query row to the keys and its partial result back (GroupReduce)."""
        return self.q_token_bytes + self.out_row_bytes

    @property
    def fwd_flops_per_pair(self) -> int:
        return 4 * self.hq * self.head_dim

    @property
    def bwd_flops_per_pair(self) -> int:
        return 10 * self.hq * self.head_dim


@dataclass(frozen=True)
class Hardware:
    """Effective attention-kernel throughput and one full-duplex link per rank."""

    tflops: float = 400.0
    link_gbs: float = 100.0
    latency_us: float = 10.0

    def __post_init__(self):
        for name in ("tflops", "link_gbs"):
            if not getattr(self, name) > 0:
                raise MaskError(f"Hardware: {name} must be > 0, got {getattr(self, name)!r}")
        if self.latency_us < 0:
            raise MaskError(f"Hardware: latency_us must be >= 0, got {self.latency_us!r}")

    def seconds(self, flops) -> np.ndarray:
        return np.asarray(flops, dtype=np.float64) / (self.tflops * 1e12)

    def transfer(self, nbytes) -> np.ndarray:
        return np.asarray(nbytes, dtype=np.float64) / (self.link_gbs * 1e9)

    @property
    def latency(self) -> float:
        return self.latency_us * 1e-6


@dataclass(frozen=True, eq=False)
class Estimate:
    """Predicted cost of one attention layer (forward + backward) under one scheme.

    Per rank: ``compute_s`` (forward + backward kernel time), ``recv_bytes`` / ``send_bytes``
    (forward), ``bwd_recv_bytes`` (backward), ``exposed_s`` (time not hidden behind compute).
    ``fwd_s`` / ``step_s``: predicted forward and forward + backward times (slowest rank).
    """

    name: str
    cp_size: int
    compute_s: np.ndarray
    recv_bytes: np.ndarray
    send_bytes: np.ndarray
    bwd_recv_bytes: np.ndarray
    exposed_s: np.ndarray
    fwd_s: float
    step_s: float
    feasible: bool = True
    note: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return int(self.recv_bytes.sum())

    @property
    def max_rank_bytes(self) -> int:
        return int(self.recv_bytes.max()) if self.recv_bytes.size else 0

    @property
    def imbalance(self) -> float:
        c = self.compute_s
        m = float(c.mean()) if c.size else 0.0
        return float(c.max()) / m if m > 0 else 1.0

    @property
    def exposed_fraction(self) -> float:
        """Exposed communication of the slowest rank / its step time."""
        return float(self.exposed_s.max()) / self.step_s if self.step_s > 0 else 0.0

    def summary(self) -> dict:
        return {
            "scheme": self.name,
            "feasible": self.feasible,
            "note": self.note,
            "total_bytes": self.total_bytes if self.feasible else None,
            "max_rank_bytes": self.max_rank_bytes if self.feasible else None,
            "compute_imbalance": round(self.imbalance, 5) if self.feasible else None,
            "fwd_ms": round(self.fwd_s * 1e3, 4) if self.feasible else None,
            "step_ms": round(self.step_s * 1e3, 4) if self.feasible else None,
            "exposed_fraction": round(self.exposed_fraction, 4) if self.feasible else None,
            **self.extra,
        }

    def __repr__(self) -> str:
        if not self.feasible:
            return f"Estimate({self.name}, cp={self.cp_size}: infeasible, {self.note})"
        return (
            f"Estimate({self.name}, cp={self.cp_size}: step {self.step_s * 1e3:.3f} ms "
            f"(fwd {self.fwd_s * 1e3:.3f}), compute imbalance {self.imbalance:.4f}, "
            f"recv {self.total_bytes / 1e9:.3f} GB total / {self.max_rank_bytes / 1e9:.3f} GB max rank, "
            f"exposed {100 * self.exposed_fraction:.1f}%)"
        )


# measured machines (`calibrate` on benchmarks/bench_scaling.py runs; see docs/benchmarks.md)
PRESETS: dict[str, Hardware] = {
    # 4 x H200, NVLink, 16 x 128 bf16 forward + backward: 2026-11-26 scaling run
    "h200-nvlink": Hardware(tflops=427.0, link_gbs=172.0, latency_us=0.0),
}


# ---- calibration -------------------------------------------------------------------------------


def calibrate(compute, transfers, *, base: Hardware = Hardware()) -> Hardware:
    """`Hardware` fitted to measurements.

    ``compute``: ``(flops, seconds)`` pairs of attention-kernel runs (forward + backward, flops
    counted on the exact allowed area): ``tflops`` is the least-squares rate of ``t = flops / R``.
    ``transfers``: ``(bytes, seconds)`` pairs of collective steps (the busiest rank's bytes):
    ``link_gbs`` and ``latency_us`` are the least-squares line ``t = bytes / B + latency`` (latency
    clamped at 0; a single point, or points of one size, fit through the origin). An empty list
    keeps ``base``'s value."""
    tflops, link, lat = base.tflops, base.link_gbs, base.latency_us
    c = np.asarray(list(compute), dtype=np.float64).reshape(-1, 2)
    c = c[(c[:, 0] > 0) & (c[:, 1] > 0)]
    if c.size:
        f, t = c[:, 0], c[:, 1]
        tflops = float((f * f).sum() / (f * t).sum()) / 1e12  # 1/R = sum(f t) / sum(f^2)
    x = np.asarray(list(transfers), dtype=np.float64).reshape(-1, 2)
    x = x[(x[:, 0] > 0) & (x[:, 1] > 0)]
    if x.size:
        b, t = x[:, 0], x[:, 1]
        slope, icept = 0.0, -1.0
        if np.unique(b).size > 1:
            slope, icept = np.polyfit(b, t, 1)
        if icept < 0 or slope <= 0:  # through the origin
            slope, icept = float((b * t).sum() / (b * b).sum()), 0.0
        link, lat = float(1.0 / slope / 1e9), float(icept * 1e6)
    return Hardware(tflops=tflops, link_gbs=link, latency_us=lat)


# ---- a compiled plan ---------------------------------------------------------------------------


def simulate(plan, hw: Hardware = Hardware(), wl: Workload = Workload()) -> Estimate:
    """Predict a plan's forward + backward as the runtime runs it.

    Forward: all stages' transfers are issued at once and complete one after another (stage k's
    all-to-all lasts as long as its busiest rank); stage k's compute starts when stage k-1's
    compute and stage k's transfer are done (stage 0, local, needs no transfer). Backward: remote
    stages first, each stage's gradient reduction (dK, dV back to the owners; for GroupReduce
    pairs dO out and dQ back) starts when its compute and the previous reduction are done; the
    local stage runs last, hiding the final reduction.
    """
    if getattr(plan, "scheme", "sequence") == "heads":  # head-parallel: priced as its all-to-alls
        est = ulysses(plan.mask, plan.cp_size, hw, wl)
        return Estimate("maskc-heads", est.cp_size, est.compute_s, est.recv_bytes, est.send_bytes, est.bwd_recv_bytes,
                        est.exposed_s, est.fwd_s, est.step_s, est.feasible, est.note)
    sch = plan.schedule
    cp, ns = plan.cp_size, sch.stages + 1
    area = sch.stage_area.astype(np.float64)  # (cp, ns)
    kvb, qb, ob = wl.kv_token_bytes, wl.q_token_bytes, wl.out_row_bytes
    q_out = sch.stage_q_rows(Q_DST)  # GroupReduce rows a rank sends out (its queries, computed elsewhere)
    q_in = sch.stage_q_rows(Q_SRC)  # GroupReduce rows a rank computes for others
    recv = sch.stage_recv_tokens * kvb + q_in * qb + q_out * ob
    send = sch.stage_send_tokens * kvb + q_out * qb + q_in * ob
    bwd_recv = sch.stage_send_tokens * kvb + q_in * qb + q_out * qb  # dKV home; dO out, dQ back
    bwd_send = sch.stage_recv_tokens * kvb + q_out * qb + q_in * qb
    fwd_c = hw.seconds(area * wl.fwd_flops_per_pair)
    bwd_c = hw.seconds(area * wl.bwd_flops_per_pair)

    # forward
    t_comm = np.zeros(ns)
    if ns > 1:
        busy = np.maximum(recv[:, 1:], send[:, 1:]).max(axis=0)
        t_comm[1:] = hw.transfer(busy) + np.where(busy > 0, hw.latency, 0.0)
    comm_end = np.cumsum(t_comm)
    end = fwd_c[:, 0].copy()
    for k in range(1, ns):
        end = np.maximum(end, comm_end[k]) + fwd_c[:, k]
    fwd_r = end
    fwd = float(fwd_r.max()) if cp else 0.0

    # backward: remote stages, then local
    t_red = np.zeros(ns)
    if ns > 1:
        busy = np.maximum(bwd_recv[:, 1:], bwd_send[:, 1:]).max(axis=0)
        t_red[1:] = hw.transfer(busy) + np.where(busy > 0, hw.latency, 0.0)
    comp = np.zeros(cp)
    red_end = 0.0
    for k in range(1, ns):
        comp = comp + bwd_c[:, k]
        red_end = max(red_end, float(comp.max())) + t_red[k]
    comp = comp + bwd_c[:, 0]
    bwd_r = np.maximum(comp, red_end)
    bwd = float(bwd_r.max()) if cp else 0.0

    compute = fwd_c.sum(axis=1) + bwd_c.sum(axis=1)
    exposed = np.maximum(fwd_r + bwd_r - compute, 0.0)
    return Estimate(
        "maskc",
        cp,
        compute,
        recv.sum(axis=1).astype(np.int64),
        send.sum(axis=1).astype(np.int64),
        bwd_recv.sum(axis=1).astype(np.int64),
        exposed,
        fwd,
        fwd + bwd,
        extra={"stages": sch.stages, "group_reduce_pairs": sch.n_group_reduce},
    )


# ---- baselines ---------------------------------------------------------------------------------


def block_areas(mask, row_bounds, col_bounds) -> np.ndarray:
    """Dense (nr, nc) int64 matrix of exact allowed pairs per (row block, column block).

    O(pieces x column blocks each piece reaches): never a dense S x S."""
    rb = np.asarray(row_bounds, dtype=np.int64)
    cb = np.asarray(col_bounds, dtype=np.int64)
    out = np.zeros((rb.size - 1, cb.size - 1), dtype=np.int64)
    pieces, seg = cut_bands(tight_bands(mask), rb)
    if not pieces.shape[0]:
        return out
    lo, hi = key_extent(pieces)
    c0 = np.searchsorted(cb, lo, side="right") - 1
    c1 = np.searchsorted(cb, hi - 1, side="right") - 1
    cnt = c1 - c0 + 1
    p = np.repeat(np.arange(pieces.shape[0]), cnt)
    c = np.repeat(c0, cnt) + _ramp(cnt)
    pc = pieces[p]
    x = np.maximum(cb[c], lo[p])
    y = np.minimum(cb[c + 1], hi[p])
    np.add.at(out, (seg[p], c), band_prefix(pc, y) - band_prefix(pc, x))
    return out


def _even_bounds(s: int, parts: int) -> np.ndarray:
    return (np.arange(parts + 1, dtype=np.int64) * s) // parts


def ring(mask, cp: int, hw: Hardware = Hardware(), wl: Workload = Workload(), *, zigzag: bool = False) -> Estimate:
    """Ring attention: every rank's key/value block visits every rank in cp - 1 steps, each step's
    transfer overlapped with the current block's compute. ``zigzag``: rank r holds chunks r and
    2cp-1-r of 2cp (balanced for causal masks); plain: one contiguous block per rank."""
    s = mask.sq
    if zigzag:
        a = block_areas(mask, _even_bounds(s, 2 * cp), _even_bounds(s, 2 * cp))
        own = np.arange(2 * cp)
        rank_of = np.where(own < cp, own, 2 * cp - 1 - own)
        blocks = np.zeros((cp, cp), dtype=np.int64)
        np.add.at(blocks, (rank_of[:, None], rank_of[None, :]), a)
        tokens = np.bincount(rank_of, weights=np.diff(_even_bounds(s, 2 * cp)), minlength=cp)
    else:
        blocks = block_areas(mask, _even_bounds(s, cp), _even_bounds(s, cp))
        tokens = np.diff(_even_bounds(s, cp)).astype(np.float64)
    kvb = wl.kv_token_bytes
    r = np.arange(cp)
    steps_f = np.zeros(cp)
    steps_b = np.zeros(cp)
    comp_f = np.zeros(cp)
    comp_b = np.zeros(cp)
    for k in range(cp):
        src = (r - k) % cp
        f = hw.seconds(blocks[r, src] * wl.fwd_flops_per_pair)
        b = hw.seconds(blocks[r, src] * wl.bwd_flops_per_pair)
        comp_f += f
        comp_b += b
        if k < cp - 1:
            # this step sends the block that is used next: src - 1's block arrives at r
            nbytes = float(tokens.max()) * kvb
            t = float(hw.transfer(nbytes)) + hw.latency
            steps_f[k] = max(float(f.max()), t)
            steps_b[k] = max(float(b.max()), float(hw.transfer(2 * nbytes)) + hw.latency)  # KV and dKV circulate
        else:
            steps_f[k] = float(f.max())
            steps_b[k] = float(b.max())
    recv = ((tokens.sum() - tokens) * kvb).astype(np.int64)
    fwd, bwd = float(steps_f.sum()), float(steps_b.sum())
    compute = comp_f + comp_b
    return Estimate(
        "ring-zigzag" if zigzag else "ring",
        cp,
        compute,
        recv,
        recv.copy(),
        recv.copy(),
        np.maximum(fwd + bwd - compute, 0.0),
        fwd,
        fwd + bwd,
    )


def ulysses(mask, cp: int, hw: Hardware = Hardware(), wl: Workload = Workload()) -> Estimate:
    """DeepSpeed-Ulysses: all-to-all from sequence to head sharding (q, k, v in; output back), each
    rank runs the whole mask for hq / cp heads (perfectly balanced), communication exposed. Needs
    ``hq % cp == 0``; with cp > hkv each key/value head is replicated to the ranks that use it."""
    s = mask.sq
    if wl.hq % cp:
        z = np.zeros(cp)
        return Estimate("ulysses", cp, z, z.astype(np.int64), z.astype(np.int64), z.astype(np.int64), z, 0.0, 0.0,
                        feasible=False, note=f"hq={wl.hq} is not a multiple of cp={cp}")
    d, b = wl.head_dim, wl.dtype_bytes
    hq_r = wl.hq // cp
    hk_r = max(wl.hkv // cp, 1)
    tokens = np.diff(_even_bounds(s, cp)).astype(np.float64)
    others = tokens.sum() - tokens  # tokens held by the other ranks
    # in: q and kv of my heads from the others' tokens; out: my tokens' other heads of the output
    recv = (others * (hq_r + 2 * hk_r) * d * b + tokens * (cp - 1) * hq_r * d * b).astype(np.int64)
    send = recv.copy()
    area = float(mask.area)
    f = float(hw.seconds(area * wl.fwd_flops_per_pair / cp))
    bw = float(hw.seconds(area * wl.bwd_flops_per_pair / cp))
    t = float(hw.transfer(recv.max())) + 2 * hw.latency
    compute = np.full(cp, f + bw)
    fwd = f + t
    step = fwd + bw + t  # backward: dO in, dq/dk/dv out: about the same bytes
    return Estimate("ulysses", cp, compute, recv, send, recv.copy(), np.full(cp, 2 * t), fwd, step)


def allgather(mask, cp: int, hw: Hardware = Hardware(), wl: Workload = Workload()) -> Estimate:
    """Naive context parallelism: contiguous split, every rank all-gathers every key/value token
    (exposed), computes its rows; backward reduce-scatters dK, dV."""
    s = mask.sq
    bounds = _even_bounds(s, cp)
    tokens = np.diff(bounds).astype(np.float64)
    area = block_areas(mask, bounds, np.array([0, mask.sk])).ravel().astype(np.float64)
    kvb = wl.kv_token_bytes
    recv = ((tokens.sum() - tokens) * kvb).astype(np.int64)
    t = float(hw.transfer(recv.max())) + hw.latency
    f = hw.seconds(area * wl.fwd_flops_per_pair)
    bw = hw.seconds(area * wl.bwd_flops_per_pair)
    fwd = float(f.max()) + t
    step = fwd + float(bw.max()) + t
    return Estimate("allgather", cp, f + bw, recv, recv.copy(), recv.copy(), np.full(cp, 2 * t), fwd, step)


def baselines(mask, cp: int, hw: Hardware = Hardware(), wl: Workload = Workload()) -> dict[str, Estimate]:
    """Ring (plain, zigzag), Ulysses and the naive all-gather, priced by the same model."""
    return {
        "ring": ring(mask, cp, hw, wl),
        "ring-zigzag": ring(mask, cp, hw, wl, zigzag=True),
        "ulysses": ulysses(mask, cp, hw, wl),
        "allgather": allgather(mask, cp, hw, wl),
    }


__all__ = [
    "Estimate",
    "Hardware",
    "PRESETS",
    "Workload",
    "allgather",
    "baselines",
    "block_areas",
    "calibrate",
    "ring",
    "simulate",
    "ulysses",
]
