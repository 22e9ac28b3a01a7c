"""`Mask`: an immutable, normalised set of allowed (query, key) pairs, and its exact algebra."""

from __future__ import annotations

import hashlib
import json
import numbers
from typing import Iterable

import numpy as np

from . import normalize as nz
from .errors import MaskError
from .kinds import Kind, Slice, as_int

_MAX_DENSE = 1 << 32  # elements; larger dense pictures are refused with a clear error
_JSON_FORMAT = "maskc.mask"


def _size(value, what: str) -> int:
    n = as_int(value, what)
    if n < 0:
        raise MaskError(f"{what} must be >= 0, got {n}")
    return n


def _table(fn, n: int) -> list[bool]:
    """Truth table over membership bitmasks of n operands."""
    return [bool(fn(*((bits >> t) & 1 for t in range(n)))) for bits in range(1 << n)]


_UNION = _table(lambda a, b: a or b, 2)
_INTER = _table(lambda a, b: a and b, 2)
_DIFF = _table(lambda a, b: a and not b, 2)
_XOR = _table(lambda a, b: a != b, 2)
_NOT = _table(lambda a: not a, 1)
_SELF = _table(lambda a: a, 1)


class Mask:
    """A set of allowed (query, key) pairs over ``[0, sq) x [0, sk)``, held as canonical slices.

    ``Mask(slices, sq, sk)`` takes any slices (overlapping, empty, in any order; `Slice` values or
    ``(q, k, kind)`` tuples) and normalises their union: the result's slices are pairwise
    disjoint, non-empty and in canonical order, and depend only on the set of allowed pairs.
    """

    __slots__ = ("_sq", "_sk", "_arr", "_bands", "_slices", "_hash", "_digest")

    def __init__(self, slices: Iterable = (), sq: int | None = None, sk: int | None = None):
        if sq is None:
            raise MaskError("Mask(slices, sq, sk): sq (the number of query positions) is required")
        sq = _size(sq, "sq")
        sk = sq if sk is None else _size(sk, "sk")
        rows = []
        for t, s in enumerate(slices):
            s = Slice.coerce(s, t)
            if s.q[1] > sq or s.k[1] > sk:
                raise MaskError(
                    f"slice {t} {s!r} is out of bounds: q must lie in [0, {sq}) and k in [0, {sk})"
                )
            rows.append((s.q[0], s.q[1], s.k[0], s.k[1], int(s.kind)))
        arr = np.array(rows, dtype=np.int64).reshape(-1, 5)
        other = Mask._from_slice_array(arr, sq, sk)
        self._init(sq, sk, other._bands)

    # ---- construction -------------------------------------------------------------------

    def _init(self, sq: int, sk: int, bands: np.ndarray) -> None:
        bands = np.ascontiguousarray(bands, dtype=np.int64).reshape(-1, 6)
        bands.flags.writeable = False
        arr = nz.bands_to_slices(bands)
        arr.flags.writeable = False
        self._sq = sq
        self._sk = sk
        self._bands = bands
        self._arr = arr
        self._slices = None
        self._hash = None
        self._digest = None

    @classmethod
    def _from_bands(cls, bands: np.ndarray, sq: int, sk: int) -> "Mask":
        """Wrap canonical bands (trusted)."""
        m = cls.__new__(cls)
        m._init(sq, sk, bands)
        return m

    @classmethod
    def _from_slice_array(cls, arr: np.ndarray, sq: int, sk: int) -> "Mask":
        """Normalise an (n, 5) array of validated, in-bounds slices."""
        bands = nz.slices_to_bands(arr)
        canon = nz.canonical_from_disjoint(bands, sq, sk)
        if canon is None:
            canon = nz.sweep([bands], _SELF, sq, sk)
        return cls._from_bands(canon, sq, sk)

    @classmethod
    def from_ranges(cls, q_ranges, k_ranges, kinds=None, *, sq: int, sk: int | None = None) -> "Mask":
        """From MagiAttention-style ``q_ranges [n,2]``, ``k_ranges [n,2]``, ``attn_type_map [n]``.

        Accepts lists, numpy arrays or tensors (anything with ``.tolist()``). ``kinds=None``
        means all FULL. Overlapping slices are allowed; the mask is their union.
        """
        q = _as_list(q_ranges, "q_ranges")
        k = _as_list(k_ranges, "k_ranges")
        if len(q) != len(k):
            raise MaskError(
                f"q_ranges has {len(q)} entries but k_ranges has {len(k)}; they must pair up"
            )
        kk = [Kind.FULL] * len(q) if kinds is None else _as_list(kinds, "kinds")
        if len(kk) != len(q):
            raise MaskError(f"kinds has {len(kk)} entries but q_ranges has {len(q)}")
        return cls(zip(q, k, kk), sq=sq, sk=sk)

    # ---- basic properties ---------------------------------------------------------------

    @property
    def sq(self) -> int:
        return self._sq

    @property
    def sk(self) -> int:
        return self._sk

    @property
    def shape(self) -> tuple[int, int]:
        return (self._sq, self._sk)

    @property
    def slices(self) -> tuple[Slice, ...]:
        if self._slices is None:
            self._slices = tuple(
                Slice((qs, qe), (ks, ke), Kind(kind)) for qs, qe, ks, ke, kind in self._arr.tolist()
            )
        return self._slices

    @property
    def array(self) -> np.ndarray:
        """Read-only (n, 5) int64 array ``[qs, qe, ks, ke, kind]`` of the canonical slices."""
        return self._arr

    @property
    def bands(self) -> np.ndarray:
        """Read-only (n, 6) int64 band form ``[r0, r1, ac, as, bc, bs]`` (see `maskc.normalize`)."""
        return self._bands

    def __len__(self) -> int:
        return self._arr.shape[0]

    def __iter__(self):
        return iter(self.slices)

    @property
    def area(self) -> int:
        """Exact number of allowed pairs (O(1) per slice)."""
        a = self._arr
        if a.shape[0] == 0:
            return 0
        lq = a[:, 1] - a[:, 0]
        lk = a[:, 3] - a[:, 2]
        kind = a[:, 4]
        tri = np.where(lk >= lq, lq * lk - lq * (lq - 1) // 2, lk * (lk + 1) // 2)
        per = np.select(
            [kind == Kind.FULL, kind == Kind.BI_CAUSAL],
            [lq * lk, lq * np.maximum(0, lk - lq + 1)],
            tri,
        )
        return int(per.sum())

    @property
    def density(self) -> float:
        """area / (sq * sk); 0 for an empty domain."""
        total = self._sq * self._sk
        return self.area / total if total else 0.0

    def is_empty(self) -> bool:
        return self._arr.shape[0] == 0

    def kinds_present(self) -> frozenset[Kind]:
        return frozenset(Kind(int(k)) for k in np.unique(self._arr[:, 4]))

    # ---- views ----------------------------------------------------------------------------

    def row_counts(self) -> np.ndarray:
        """Allowed keys per query row: int64 ``[sq]``, in O(sq + slices)."""
        return nz.row_counts(self._bands, self._sq)

    def col_counts(self) -> np.ndarray:
        """Allowed queries per key column: int64 ``[sk]`` (via the transposed prefix areas)."""
        cols = np.arange(self._sk + 1, dtype=np.int64)
        pref = nz.prefix_area(self._bands, np.int64(self._sq), cols)
        return np.diff(pref)

    def to_dense(self) -> np.ndarray:
        """Numpy bool ``[sq, sk]``: True where the pair is allowed."""
        if self._sq * self._sk > _MAX_DENSE:
            raise MaskError(
                f"to_dense(): a {self._sq} x {self._sk} mask has more than {_MAX_DENSE} elements; "
                "use row_counts(), area or a picture instead"
            )
        dense = np.zeros((self._sq, self._sk), dtype=bool)
        for r0, r1, ac, a_s, bc, b_s in self._bands.tolist():
            i = np.arange(r0, r1, dtype=np.int64)[:, None]
            lo = ac + a_s * r0
            hi = bc + b_s * (r1 - 1)
            j = np.arange(lo, hi, dtype=np.int64)[None, :]
            dense[r0:r1, lo:hi] |= (j >= ac + a_s * i) & (j < bc + b_s * i)
        return dense

    def area_in(self, q_range, k_range) -> int:
        """Exact number of allowed pairs inside the rectangle ``q_range x k_range``."""
        (r0, r1), (c0, c1) = q_range, k_range
        R = np.array([[r1, r1], [r0, r0]], dtype=np.int64)
        C = np.array([[c1, c0], [c1, c0]], dtype=np.int64)
        p = nz.prefix_area(self._bands, R, C)
        return int(p[0, 0] - p[0, 1] - p[1, 0] + p[1, 1])

    def __getitem__(self, ij) -> bool | np.ndarray:
        """``mask[i, j]``: whether the pair is allowed (i, j may be integer arrays)."""
        try:
            i, j = ij
        except (TypeError, ValueError):
            raise MaskError(f"mask[i, j] takes two positions, got {ij!r}") from None
        out = nz.contains(self._bands, i, j)
        return bool(out) if out.ndim == 0 else out

    # ---- interchange -----------------------------------------------------------------------

    def to_ranges(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """MagiAttention-compatible ``(q_ranges int32 [n,2], k_ranges int32 [n,2], kinds int32 [n])``."""
        a = self._arr
        if a.size and a[:, :4].max() > np.iinfo(np.int32).max:
            raise MaskError("to_ranges(): positions exceed int32; MagiAttention ranges are int32")
        return (
            np.ascontiguousarray(a[:, 0:2], dtype=np.int32),
            np.ascontiguousarray(a[:, 2:4], dtype=np.int32),
            np.ascontiguousarray(a[:, 4], dtype=np.int32),
        )

    def to_dict(self) -> dict:
        return {
            "format": _JSON_FORMAT,
            "version": 1,
            "sq": self._sq,
            "sk": self._sk,
            "slices": self._arr.tolist(),
        }

    def to_json(self, indent: int | None = None) -> str:
        """JSON text: ``{"format": "maskc.mask", "sq", "sk", "slices": [[qs, qe, ks, ke, kind], ...]}``."""
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, data) -> "Mask":
        """From `to_json` text (or its parsed dict). Validated and normalised."""
        if isinstance(data, (str, bytes)):
            try:
                data = json.loads(data)
            except json.JSONDecodeError as e:
                raise MaskError(f"mask JSON: not valid JSON ({e})") from None
        if not isinstance(data, dict):
            raise MaskError(f"mask JSON must be an object, got {type(data).__name__}")
        if data.get("format", _JSON_FORMAT) != _JSON_FORMAT:
            raise MaskError(f"mask JSON: format is {data.get('format')!r}, expected {_JSON_FORMAT!r}")
        for key in ("sq", "sk", "slices"):
            if key not in data:
                raise MaskError(f"mask JSON: missing key {key!r}")
        slices = []
        for t, row in enumerate(data["slices"]):
            if not isinstance(row, (list, tuple)) or len(row) != 5:
                raise MaskError(f"mask JSON: slice {t} must be [qs, qe, ks, ke, kind], got {row!r}")
            slices.append(((row[0], row[1]), (row[2], row[3]), row[4]))
        return cls(slices, sq=data["sq"], sk=data["sk"])

    # ---- identity --------------------------------------------------------------------------

    def __eq__(self, other) -> bool:
        if not isinstance(other, Mask):
            return NotImplemented
        return (
            self._sq == other._sq
            and self._sk == other._sk
            and np.array_equal(self._arr, other._arr)
        )

    def __hash__(self) -> int:
        if self._hash is None:
            self._hash = hash((self._sq, self._sk, self._arr.tobytes()))
        return self._hash

    def digest(self) -> str:
        """Stable content hash (sha256 hex) of the allowed set; equal masks share it."""
        if self._digest is None:
            h = hashlib.sha256()
            h.update(f"{_JSON_FORMAT}:{self._sq}:{self._sk}:".encode())
            h.update(np.ascontiguousarray(self._arr, dtype="<i8").tobytes())
            self._digest = h.hexdigest()
        return self._digest

    def __repr__(self) -> str:
        n = len(self)
        head = (
            f"Mask(sq={self._sq}, sk={self._sk}, {n} slice{'s' if n != 1 else ''}, "
            f"area={self.area}, density={self.density:.4g}"
        )
        if n == 0:
            return head + ")"
        show = self.slices[:6] if n > 8 else self.slices
        body = "".join(f"\n  {s!r}," for s in show)
        if n > 8:
            body += f"\n  ... {n - 8} more ...," + "".join(f"\n  {s!r}," for s in self.slices[-2:])
        return head + ":" + body + "\n)"

    # ---- algebra ---------------------------------------------------------------------------

    def _check_same_shape(self, other, op: str) -> "Mask":
        if not isinstance(other, Mask):
            raise MaskError(f"mask {op} {type(other).__name__}: both operands must be Masks")
        if other.shape != self.shape:
            raise MaskError(
                f"mask {op} mask: shape mismatch {self.shape} vs {other.shape}; "
                "set operations need masks over the same (sq, sk)"
            )
        return other

    def _binary(self, other, table, op: str) -> "Mask":
        other = self._check_same_shape(other, op)
        bands = nz.sweep([self._bands, other._bands], table, self._sq, self._sk)
        return Mask._from_bands(bands, self._sq, self._sk)

    def __or__(self, other):
        return self._binary(other, _UNION, "|")

    def __and__(self, other):
        return self._binary(other, _INTER, "&")

    def __sub__(self, other):
        return self._binary(other, _DIFF, "-")

    def __xor__(self, other):
        return self._binary(other, _XOR, "^")

    def __invert__(self):
        bands = nz.sweep([self._bands], _NOT, self._sq, self._sk)
        return Mask._from_bands(bands, self._sq, self._sk)

    def issubset(self, other: "Mask") -> bool:
        return (self - other).is_empty()

    def __le__(self, other):
        return self.issubset(self._check_same_shape(other, "<="))

    def __ge__(self, other):
        return self._check_same_shape(other, ">=").issubset(self)

    def shift(self, dq: int, dk: int) -> "Mask":
        """Move every allowed pair by (dq, dk) inside the same [0, sq) x [0, sk); what leaves it is dropped."""
        dq = as_int(dq, "shift dq")
        dk = as_int(dk, "shift dk")
        b = self._bands.copy()
        b[:, nz.R0] += dq
        b[:, nz.R1] += dq
        b[:, nz.AC] += dk - b[:, nz.AS] * dq
        b[:, nz.BC] += dk - b[:, nz.BS] * dq
        bands = nz.sweep([b], _SELF, self._sq, self._sk)
        return Mask._from_bands(bands, self._sq, self._sk)

    def repeat(self, n: int) -> "Mask":
        """``n`` copies packed block-diagonally: ``concat(self, self, ...)``."""
        n = as_int(n, "repeat n")
        if n < 1:
            raise MaskError(f"repeat n must be >= 1, got {n}")
        return concat(*([self] * n))

    def with_shape(self, sq: int, sk: int) -> "Mask":
        """The same pairs over a larger or smaller domain (pairs outside it are dropped)."""
        sq = _size(sq, "sq")
        sk = _size(sk, "sk")
        bands = nz.sweep([self._bands], _SELF, sq, sk)
        return Mask._from_bands(bands, sq, sk)

    def to_mask_mod(self):
        """A FlexAttention-style ``mask_mod(b, h, q_idx, kv_idx)`` computing membership arithmetically."""
        from .interop import to_mask_mod

        return to_mask_mod(self)

    # ---- pictures ----------------------------------------------------------------------------

    def ascii(self, width: int = 64, height: int = 32, legend: bool = True) -> str:
        """A compact text picture (downsampled); see `maskc.picture.ascii_picture`."""
        from .picture import ascii_picture

        return ascii_picture(self, width=width, height=height, legend=legend)

    def plot(self, path=None, **kw):
        """Draw with matplotlib (slices outlined, coloured by kind); see `maskc.picture.plot`."""
        from .picture import plot

        return plot(self, path, **kw)


def _as_list(x, what: str) -> list:
    if hasattr(x, "tolist"):
        x = x.tolist()
    try:
        return list(x)
    except TypeError:
        raise MaskError(f"{what} must be a sequence, got {type(x).__name__}") from None


def concat(*masks: Mask) -> Mask:
    """Block-diagonal packing: mask t occupies rows and columns after masks 0..t-1."""
    if len(masks) == 1 and not isinstance(masks[0], Mask):
        masks = tuple(masks[0])
    if not masks:
        raise MaskError("concat() needs at least one mask")
    for t, m in enumerate(masks):
        if not isinstance(m, Mask):
            raise MaskError(f"concat(): argument {t} is a {type(m).__name__}, not a Mask")
    canon = nz.Canon()
    rq = rk = 0
    for m in masks:
        nz.push_canonical_bands(canon, m._bands, rq, rk)
        rq += m.sq
        rk += m.sk
    return Mask._from_bands(canon.result(), rq, rk)


def combine(masks: list[Mask], fn) -> Mask:
    """Any boolean function of several same-shape masks in one sweep: ``fn(*bools) -> bool``."""
    if not masks:
        raise MaskError("combine() needs at least one mask")
    if len(masks) > 16:
        raise MaskError(f"combine() takes at most 16 masks in one sweep, got {len(masks)}")
    first = masks[0]
    for m in masks[1:]:
        first._check_same_shape(m, "combine")
    bands = nz.sweep([m._bands for m in masks], _table(fn, len(masks)), first.sq, first.sk)
    return Mask._from_bands(bands, first.sq, first.sk)


def union(*masks: Mask) -> Mask:
    """Union of several same-shape masks in one sweep."""
    if len(masks) == 1 and not isinstance(masks[0], Mask):
        masks = tuple(masks[0])
    if not masks:
        raise MaskError("union() needs at least one mask")
    first = masks[0]
    for m in masks[1:]:
        first._check_same_shape(m, "union")
    bands = np.concatenate([m._bands for m in masks]) if len(masks) > 1 else first._bands
    return Mask._from_bands(nz.sweep([bands], _SELF, first.sq, first.sk), first.sq, first.sk)


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)
