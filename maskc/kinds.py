"""Slice kinds and the `Slice` value: the atoms every mask is made of.

A slice is ``(q, k, kind)`` with half-open ranges ``q = [qs, qe)``, ``k = [ks, ke)``,
``Lq = qe - qs``, ``Lk = ke - ks``. A pair ``(i, j)`` with ``i in q`` and ``j in k`` is allowed when

=============  ==  ===========================================  ==========================
kind           id  allowed when                                 alignment
=============  ==  ===========================================  ==========================
FULL            0  always
CAUSAL          1  ``j - ks <= (i - qs) + (Lk - Lq)``            bottom-right: last row sees all keys
INV_CAUSAL      2  ``j - ks >= i - qs``                          top-left: first row sees all keys
BI_CAUSAL       3  both                                         a band of width ``Lk - Lq + 1``
=============  ==  ===========================================  ==========================

The ids and alignments are MagiAttention's ``attn_type_map``, so range lists move between the
two unchanged.
"""

from __future__ import annotations

import enum
import numbers
from dataclasses import dataclass

from .errors import MaskError


class Kind(enum.IntEnum):
    FULL = 0
    CAUSAL = 1
    INV_CAUSAL = 2
    BI_CAUSAL = 3

    @classmethod
    def parse(cls, value, *, where: str = "kind") -> "Kind":
        """A `Kind` from a Kind, an int id 0..3 or a name ('causal', 'BI_CAUSAL', ...)."""
        if isinstance(value, Kind):
            return value
        if isinstance(value, str):
            name = value.strip().upper().replace("-", "_")
            if name in cls.__members__:
                return cls[name]
            raise MaskError(
                f"{where}: unknown kind {value!r}; allowed: "
                + ", ".join(f"{k.name} ({k.value})" for k in cls)
            )
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            try:
                return cls(int(value))
            except ValueError:
                pass
        raise MaskError(
            f"{where}: unknown kind {value!r}; allowed: "
            + ", ".join(f"{k.name} ({k.value})" for k in cls)
        )

    # ends of the allowed key interval in row i, as lines c + s*i: s for start, s for end
    @property
    def start_slope(self) -> int:
        return int(self) >> 1

    @property
    def end_slope(self) -> int:
        return int(self) & 1


def as_int(value, what: str) -> int:
    """`value` as a Python int, or a MaskError naming `what`."""
    if type(value) is int:  # the common case, without the ABC check below
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise MaskError(f"{what} must be an integer, got {value!r} ({type(value).__name__})")
    return int(value)


def as_range(value, what: str) -> tuple[int, int]:
    """A half-open ``(start, end)`` pair of non-negative ints with start <= end."""
    try:
        start, end = value
    except (TypeError, ValueError):
        raise MaskError(
            f"{what} must be a half-open (start, end) pair of integers, got {value!r}"
        ) from None
    start = as_int(start, f"{what} start")
    end = as_int(end, f"{what} end")
    if start < 0:
        raise MaskError(f"{what} = ({start}, {end}) starts below 0; positions are >= 0")
    if end < start:
        raise MaskError(
            f"{what} = ({start}, {end}) has negative length (end {end} < start {start}); "
            "ranges are half-open (start, end) with start <= end"
        )
    return start, end


@dataclass(frozen=True, slots=True)
class Slice:
    """One ``(q_range, k_range, kind)`` slice of a mask."""

    q: tuple[int, int]
    k: tuple[int, int]
    kind: Kind = Kind.FULL

    def __post_init__(self):
        object.__setattr__(self, "q", as_range(self.q, "q range"))
        object.__setattr__(self, "k", as_range(self.k, "k range"))
        object.__setattr__(self, "kind", Kind.parse(self.kind))

    @classmethod
    def coerce(cls, value, index: int | None = None) -> "Slice":
        """A Slice from a Slice or a ``(q, k[, kind])`` tuple; errors name the index."""
        where = "slice" if index is None else f"slice {index}"
        if isinstance(value, Slice):
            return value
        try:
            if isinstance(value, dict):
                return cls(value["q"], value["k"], value.get("kind", Kind.FULL))
            parts = tuple(value)
        except MaskError as e:
            raise MaskError(f"{where} {value!r}: {e}") from None
        except (TypeError, KeyError):
            raise MaskError(
                f"{where} must be a Slice or a (q_range, k_range, kind) tuple, got {value!r}"
            ) from None
        if len(parts) not in (2, 3):
            raise MaskError(
                f"{where} must be a Slice or a (q_range, k_range, kind) tuple, got {value!r}"
            )
        try:
            return cls(*parts)
        except MaskError as e:
            raise MaskError(f"{where} {value!r}: {e}") from None

    @property
    def area(self) -> int:
        """Exact number of allowed pairs, in O(1)."""
        return slice_area(self.q[1] - self.q[0], self.k[1] - self.k[0], self.kind)

    def __repr__(self) -> str:
        return f"Slice(q={self.q}, k={self.k}, {self.kind.name})"


def slice_area(lq: int, lk: int, kind: int) -> int:
    """Allowed pairs of a slice with lengths lq, lk: closed forms of the row sums."""
    if lq <= 0 or lk <= 0:
        return 0
    if kind == Kind.FULL:
        return lq * lk
    if kind == Kind.BI_CAUSAL:
        return lq * max(0, lk - lq + 1)
    # CAUSAL and INV_CAUSAL are mirror images: row t (0-based) sees min(lk, t + lk - lq + 1)
    # keys (CAUSAL) or max(0, lk - t) keys (INV_CAUSAL); both sum to the same value.
    if lk >= lq:
        return lq * lk - lq * (lq - 1) // 2
    return lk * (lk + 1) // 2
