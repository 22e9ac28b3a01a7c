"""`compile`: one mask + one cluster -> a `Plan` (dispatch + communication schedule) for the runtime.

    plan = maskc.compile(maskc.causal(1 << 20), cp_size=8)
    plan.imbalance, plan.recv_tokens, plan.positions(rank)
    Plan.from_json(plan.to_json()).digest() == plan.digest()

Pure numpy (no torch): a 4M-token plan for 64 ranks is computed in well under a second on one core.
The runtime (`maskc.runtime.dist`) executes a plan; `maskc.cost.simulate` prices it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from functools import cached_property

import numpy as np

from .comm import (
    KV,
    CommSchedule,
    build_schedule,
    check_stages,
    layout_segments,
    remote_tokens_fn,
    submask,
)
from .cost import Workload
from .dispatch import METHODS, Dispatch, chunk_bounds, default_chunk, finer_chunk, dispatch as solve_dispatch
from .errors import MaskError
from .kinds import as_int
from .mask import Mask

_FORMAT = "maskc.plan"
_VERSION = 1


@dataclass(frozen=True, eq=False, repr=False)
class Plan:
    """Everything the distributed runtime needs for one (mask, cp_size): immutable, hashable by
    content (`digest`), JSON round-trippable.

    ``dispatch`` says which rank holds which chunk (queries, keys and values alike), ``schedule``
    which remote key/value ranges each rank receives in which stage.

    ``scheme``: ``"sequence"`` (the default: each rank computes its own queries, receiving the
    remote keys/values of ``schedule``) or ``"heads"`` (head-parallel, as DeepSpeed-Ulysses: an
    all-to-all gives each rank every token of ``hq / cp`` query heads and their key/value heads,
    it runs the whole mask for them, and an all-to-all returns the outputs; ``heads = (hq, hkv)``
    are the head counts it was planned for). The token layout (``dispatch``) is the same in both.
    """

    mask: Mask
    cp_size: int
    block: int
    balance_tol: float
    group_reduce: bool | str  # False, True (balance-aware) or "bytes"
    dispatch: Dispatch
    schedule: CommSchedule
    scheme: str = "sequence"
    heads: tuple = ()

    def __post_init__(self):
        d, s = self.dispatch, self.schedule
        problems = []
        if self.scheme not in SCHEMES:
            problems.append(f"scheme {self.scheme!r} is not one of {SCHEMES}")
        elif self.scheme == "heads":
            why = heads_infeasible(self.heads, self.cp_size)
            if why:
                problems.append(f"scheme 'heads': {why}")
        if d.seq_len != self.mask.sq:
            problems.append(f"dispatch covers {d.seq_len} tokens but the mask has {self.mask.sq}")
        if not (d.cp_size == s.cp_size == self.cp_size):
            problems.append(f"cp_size {self.cp_size}, dispatch {d.cp_size} and schedule {s.cp_size} disagree")
        if d.chunk < 1 or d.chunk_rank.size != d.bounds.size - 1 or d.chunk_area.size != d.chunk_rank.size:
            problems.append(f"{d.chunk_rank.size} chunk owners for {d.bounds.size - 1} chunks of {d.chunk}")
        elif d.chunk_rank.size and not (0 <= d.chunk_rank.min() and d.chunk_rank.max() < self.cp_size):
            problems.append("a chunk owner lies outside [0, cp_size)")
        r = s.ranges
        if r.shape[0] and not (r[:, :2].min() >= 0 and r[:, :2].max() < self.cp_size and r[:, 4].max() <= s.stages):
            problems.append("a schedule range names a rank or stage that does not exist")
        if problems:
            raise MaskError("inconsistent plan: " + "; ".join(problems))

    # ---- summary numbers --------------------------------------------------------------------

    @property
    def seq_len(self) -> int:
        return self.dispatch.seq_len

    @property
    def chunk(self) -> int:
        return self.dispatch.chunk

    @property
    def stages(self) -> int:
        """Remote stages (the local stage 0 comes first and is not counted)."""
        return self.schedule.stages

    @property
    def imbalance(self) -> float:
        """max / mean rank cost (allowed pairs of the rank's queries + token_cost x tokens)."""
        return self.dispatch.imbalance

    @property
    def area_imbalance(self) -> float:
        """max / mean of the ranks' allowed pairs alone."""
        return self.dispatch.area_imbalance

    @property
    def recv_tokens(self) -> list[int]:
        """Remote key/value tokens each rank receives (one entry per rank). Head-parallel plans:
        the remote tokens whose key/value heads of the rank's head group it receives (all of them)."""
        if self.scheme == "heads":
            return [self.seq_len - int(n) for n in self.dispatch.rank_tokens]
        return [int(x) for x in self.schedule.recv_tokens]

    @property
    def send_tokens(self) -> list[int]:
        return [int(x) for x in self.schedule.send_tokens]

    @property
    def rank_tokens(self) -> list[int]:
        """Local tokens per rank (they differ by less than two chunks)."""
        return [int(x) for x in self.dispatch.rank_tokens]

    def positions(self, rank: int) -> np.ndarray:
        """Global positions of `rank`'s local tokens in local order (int64, increasing): for RoPE
        and any per-token conditioning."""
        return self.dispatch.positions(rank)

    # ---- per-rank layout -----------------------------------------------------------------------

    def stage_keys(self, rank: int, stage: int) -> np.ndarray:
        """(k, 2) global key ranges `rank` holds in `stage`, in local order: its own runs for
        stage 0, the received ranges (by source, position) for stages 1..stages."""
        rank = self.dispatch._check_rank(rank)
        if stage == 0:
            return self.dispatch.rank_runs(rank)
        if not 1 <= stage <= self.stages:
            raise MaskError(f"stage must lie in [0, {self.stages}], got {stage}")
        return self.schedule.recv(rank, stage, KV)[:, 1:]

    def host_mask(self, rank: int, stage: int) -> Mask:
        """GroupReduce: the mask of the query rows `rank` receives in `stage` (`q_recv` order) x
        its own keys (local order); empty when it hosts none."""
        rank = self.dispatch._check_rank(rank)
        q = self.schedule.q_recv(rank, stage)[:, 1:]
        return submask(self.mask, layout_segments(q), layout_segments(self.dispatch.rank_runs(rank)))

    def local_masks(self, rank: int) -> list[Mask]:
        """Per stage, the mask of `rank`'s queries x the keys it holds in that stage, in local
        indices (exact, from the global mask's bands)."""
        q = layout_segments(self.dispatch.rank_runs(rank))
        return [submask(self.mask, q, layout_segments(self.stage_keys(rank, k))) for k in range(self.stages + 1)]

    # ---- identity and (de)serialisation ------------------------------------------------------

    def _header(self) -> dict:
        return {
            "format": _FORMAT,
            "version": _VERSION,
            "cp_size": self.cp_size,
            "block": self.block,
            "balance_tol": self.balance_tol,
            "group_reduce": self.group_reduce,
            # only head-parallel plans carry these (sequence plans keep their earlier JSON and digest)
            **({"scheme": self.scheme, "heads": list(self.heads)} if self.scheme != "sequence" else {}),
        }

    def to_dict(self) -> dict:
        return {
            **self._header(),
            "mask": self.mask.to_dict(),
            "dispatch": self.dispatch.to_dict(),
            "schedule": self.schedule.to_dict(),
        }

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, data) -> "Plan":
        """From `to_json` text (or its parsed dict)."""
        if isinstance(data, (str, bytes)):
            try:
                data = json.loads(data)
            except json.JSONDecodeError as e:
                raise MaskError(f"plan JSON: not valid JSON ({e})") from None
        if not isinstance(data, dict):
            raise MaskError(f"plan JSON must be an object, got {type(data).__name__}")
        if data.get("format") != _FORMAT:
            raise MaskError(f"plan JSON: format is {data.get('format')!r}, expected {_FORMAT!r}")
        if data.get("version") != _VERSION:
            raise MaskError(f"plan JSON: version {data.get('version')!r} is not supported (expected {_VERSION})")
        for key in ("cp_size", "block", "balance_tol", "group_reduce", "mask", "dispatch", "schedule"):
            if key not in data:
                raise MaskError(f"plan JSON: missing key {key!r}")
        return cls(
            mask=Mask.from_json(data["mask"]),
            cp_size=int(data["cp_size"]),
            block=int(data["block"]),
            balance_tol=float(data["balance_tol"]),
            group_reduce=data["group_reduce"] if data["group_reduce"] == "bytes" else bool(data["group_reduce"]),
            dispatch=Dispatch.from_dict(data["dispatch"]),
            schedule=CommSchedule.from_dict(data["schedule"]),
            scheme=str(data.get("scheme", "sequence")),
            heads=tuple(int(h) for h in data.get("heads", ())),
        )

    @cached_property
    def _digest(self) -> str:
        h = hashlib.sha256()
        h.update(json.dumps(self._header(), sort_keys=True).encode())
        h.update(self.mask.digest().encode())
        d, s = self.dispatch, self.schedule
        h.update(json.dumps([d.seq_len, d.chunk, d.token_cost, d.method, s.stages]).encode())
        for a in (d.chunk_rank, d.chunk_area, s.ranges, s.pairs, s.q_ranges, s.local_area):
            h.update(str(a.shape).encode())
            h.update(np.ascontiguousarray(a, dtype="<i8").tobytes())
        return h.hexdigest()

    def digest(self) -> str:
        """Stable sha256 of the plan's content: equal plans (also after a JSON round trip) share it."""
        return self._digest

    def __eq__(self, other) -> bool:
        return isinstance(other, Plan) and self.digest() == other.digest()

    def __hash__(self) -> int:
        return hash(self.digest())

    def __repr__(self) -> str:
        if self.scheme == "heads":
            hq, hkv = self.heads
            return (
                f"Plan(cp={self.cp_size}, {self.seq_len} tokens, head-parallel: {hq // self.cp_size} of {hq} query "
                f"heads (and their key/value heads of {hkv}) per rank over the whole mask, "
                f"all-to-all in and out, mask {len(self.mask)} slice{'s' if len(self.mask) != 1 else ''}, "
                f"digest={self.digest()[:12]})"
            )
        rt = self.schedule.recv_tokens
        total = int(rt.sum())
        mx = int(rt.max()) if rt.size else 0
        n = len(self.mask)
        return (
            f"Plan(cp={self.cp_size}, {self.seq_len} tokens in {self.dispatch.n_chunks} chunks of {self.chunk} "
            f"({self.dispatch.method}), imbalance={self.imbalance:.4f}, "
            f"recv {total} KV tokens (max {mx}/rank), {self.stages} remote stage{'s' if self.stages != 1 else ''}, "
            f"{self.schedule.ranges.shape[0]} ranges, mask {n} slice{'s' if n != 1 else ''}, "
            f"digest={self.digest()[:12]})"
        )

    def ascii(self, width: int = 64) -> str:
        """A picture: which rank holds which part of the sequence (one character per
        ``seq_len / width`` tokens: the owner's digit or letter, ``*`` where a cell is shared),
        then per rank its tokens, share of the work and key/value tokens received."""
        marks = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
        s = self.seq_len
        width = max(1, min(int(width), s)) if s else 1
        cells = []
        bounds = (np.arange(width + 1) * s) // width
        d = self.dispatch
        owner = d.chunk_rank
        cb = d.bounds
        for a, b in zip(bounds[:-1], bounds[1:]):
            lo = np.searchsorted(cb, a, side="right") - 1
            hi = np.searchsorted(cb, max(b - 1, a), side="right") - 1
            ranks = np.unique(owner[max(lo, 0):hi + 1]) if owner.size else np.zeros(0, int)
            cells.append("*" if ranks.size != 1 else (marks[int(ranks[0])] if ranks[0] < len(marks) else "#"))
        # a head-parallel plan splits the work by heads: every rank computes 1/cp of it
        area = d.rank_area.astype(np.float64) if self.scheme == "sequence" else np.ones(self.cp_size)
        total = float(area.sum()) or 1.0
        lines = [f"tokens 0 .. {s} ({s // width if width else s} per character; digit/letter = rank, * = shared)",
                 "|" + "".join(cells) + "|",
                 f"{'rank':>5} {'tokens':>12} {'work':>7} {'KV recv':>12}"]
        recv = self.recv_tokens
        for r in range(self.cp_size):
            lines.append(f"{r:>5} {int(d.rank_tokens[r]):>12,} {100 * area[r] / total:>6.1f}% {recv[r]:>12,}")
        return "\n".join(lines)

    def summary(self) -> dict:
        """The plan's headline numbers as a dict (for tables and JSON results)."""
        return {
            "cp_size": self.cp_size,
            "seq_len": self.seq_len,
            "chunk": self.chunk,
            "n_chunks": self.dispatch.n_chunks,
            "method": self.dispatch.method,
            "imbalance": self.imbalance,
            "area_imbalance": self.area_imbalance,
            "stages": self.stages,
            "ranges": int(self.schedule.ranges.shape[0]),
            "recv_tokens_total": int(self.schedule.recv_tokens.sum()),
            "recv_tokens_max": int(self.schedule.recv_tokens.max()) if self.cp_size else 0,
            "group_reduce_pairs": self.schedule.n_group_reduce,
            "scheme": self.scheme,
            "digest": self.digest(),
        }


def compile(  # noqa: A001 - exported as maskc.compile
    mask: Mask,
    *,
    cp_size: int = 1,
    chunk: int | None = None,
    stages: int | None = None,
    block: int = 128,
    token_cost: int | None = None,
    balance_tol: float = 0.01,
    group_reduce: bool | str = False,
    workload: Workload | None = None,
    methods=METHODS,
    scheme: str | None = None,
) -> Plan:
    """Plan self-attention over `mask` on `cp_size` context-parallel ranks.

    ``chunk``: tokens per dispatch chunk, a positive multiple of ``block`` (the tile size);
    default: at least 8 chunks per rank, at most 64 tiles each, halved while the best assignment
    is more than ``balance_tol`` off balance (a few very expensive chunks). ``stages``: remote stages after the
    local one (default ``min(cp_size - 1, 4)``). ``token_cost``: per-token overhead in allowed-pair
    units added to each chunk's cost (default ``block``). ``balance_tol``: assignments within this of
    perfect balance (or of the best found) count as equally balanced and the one moving fewest
    key/value tokens wins. ``group_reduce``: decide per pair whether moving queries is cheaper in
    bytes than moving keys/values (sizes from ``workload``), and move them where the key owner,
    who then computes the pair, stays within the most loaded rank's work (``"bytes"``: wherever
    cheaper, even if that unbalances compute).
    ``scheme``: ``"sequence"``, ``"heads"`` (head-parallel, see `Plan`) or ``"auto"``: the one
    that moves fewer bytes by `maskc.cost` (sequence on a tie). Default: ``"auto"`` when a
    ``workload`` is given (head-parallel needs the real head counts: ``hq % cp_size == 0`` and
    ``hkv`` a multiple or a divisor of ``cp_size``), else ``"sequence"``.
    """
    if not isinstance(mask, Mask):
        raise MaskError(f"compile: mask must be a maskc.Mask, got {type(mask).__name__}")
    if mask.sq != mask.sk:
        raise MaskError(
            f"compile: context parallelism plans self-attention, so mask must be square (sq == sk); "
            f"got {mask.sq} x {mask.sk}"
        )
    cp_size = as_int(cp_size, "compile: cp_size")
    if cp_size < 1:
        raise MaskError(f"compile: cp_size must be >= 1, got {cp_size}")
    block = as_int(block, "compile: block")
    if block < 1:
        raise MaskError(f"compile: block (the tile size) must be >= 1, got {block}")
    auto_chunk = chunk is None
    if auto_chunk:
        chunk = default_chunk(mask.sq, cp_size, block)
    else:
        chunk = as_int(chunk, "compile: chunk")
        if chunk < 1 or chunk % block:
            raise MaskError(f"compile: chunk={chunk} must be a positive multiple of block={block} (the tile size)")
    stages = check_stages(stages, cp_size)
    token_cost = block if token_cost is None else as_int(token_cost, "compile: token_cost")
    if token_cost < 0:
        raise MaskError(f"compile: token_cost must be >= 0, got {token_cost}")
    try:
        balance_tol = float(balance_tol)
    except (TypeError, ValueError):
        raise MaskError(f"compile: balance_tol must be a number, got {balance_tol!r}") from None
    if not 0 <= balance_tol < 1:
        raise MaskError(f"compile: balance_tol must lie in [0, 1), got {balance_tol}")
    methods = tuple(methods)
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise MaskError(f"compile: methods {bad or methods!r} not understood; choose from {METHODS}")
    if workload is not None and not isinstance(workload, Workload):
        raise MaskError(f"compile: workload must be a maskc.cost.Workload, got {type(workload).__name__}")
    wl = workload or Workload()
    if scheme is None:
        scheme = "auto" if workload is not None else "sequence"
    if scheme not in SCHEMES + ("auto",):
        raise MaskError(f"compile: scheme must be one of {SCHEMES + ('auto',)}, got {scheme!r}")
    heads = (wl.hq, wl.hkv)
    why_not_heads = heads_infeasible(heads, cp_size)
    if scheme == "heads" and cp_size > 1 and why_not_heads:
        raise MaskError(f"compile: scheme='heads' with workload hq={wl.hq}, hkv={wl.hkv}: {why_not_heads}")

    d = _solve(mask, cp_size, chunk, block, token_cost, balance_tol, methods, refine=auto_chunk)
    sched = build_schedule(
        mask,
        d,
        stages=stages,
        group_reduce=_group_reduce_mode(group_reduce),
        kv_token_bytes=wl.kv_token_bytes,
        q_row_bytes=wl.q_row_bytes,
    )
    plan = Plan(mask, cp_size, block, balance_tol, _group_reduce_mode(group_reduce), d, sched)
    if cp_size == 1 or scheme == "sequence" or why_not_heads:
        return plan
    if scheme == "auto":
        from .cost import simulate, ulysses  # (cost imports nothing from plan)

        if ulysses(mask, cp_size, wl=wl).total_bytes >= simulate(plan, wl=wl).total_bytes:
            return plan
    return replace(plan, scheme="heads", heads=heads)


SCHEMES = ("sequence", "heads")


def _group_reduce_mode(value):
    if value == "bytes":
        return "bytes"
    if isinstance(value, (bool, np.bool_)) or value in (0, 1):
        return bool(value)
    raise MaskError(f"compile: group_reduce must be True, False or 'bytes', got {value!r}")


def heads_infeasible(heads, cp_size: int) -> str:
    """Why a head-parallel plan cannot split ``heads = (hq, hkv)`` over ``cp_size`` ranks ("" if it can)."""
    if len(heads) != 2:
        return f"heads must be (hq, hkv), got {heads!r}"
    hq, hkv = heads
    if hq < 1 or hkv < 1 or hq % hkv:
        return f"hq={hq} must be a positive multiple of hkv={hkv}"
    if hq % cp_size:
        return f"hq={hq} query heads do not split over cp_size={cp_size} ranks"
    if hkv % cp_size and cp_size % hkv:
        return f"hkv={hkv} key/value heads are neither a multiple nor a divisor of cp_size={cp_size}"
    return ""


def _solve(mask, cp_size, chunk, block, token_cost, balance_tol, methods, *, refine: bool) -> Dispatch:
    """Dispatch with ``chunk``; with a default chunk that cannot reach ``1 + balance_tol`` (a few
    very expensive chunks, e.g. one huge causal document), retry with about half the chunk, down to
    one tile, and keep the best balanced (then the first, coarsest, of equals)."""
    best = None
    while True:
        remote = remote_tokens_fn(mask, chunk_bounds(mask.sq, chunk)) if cp_size > 1 else None
        d = solve_dispatch(
            mask, cp_size, chunk, token_cost=token_cost, balance_tol=balance_tol, remote_tokens=remote, methods=methods
        )
        if best is None or d.imbalance < best.imbalance - 1e-9:
            best = d
        if not refine or d.imbalance <= 1 + balance_tol:
            return best if best.imbalance < d.imbalance else d
        nxt = finer_chunk(mask.sq, cp_size, block, chunk)
        if nxt is None:
            return best
        chunk = nxt


__all__ = ["Plan", "compile"]
