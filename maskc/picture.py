"""Pictures of masks: a compact text picture and an exact matplotlib drawing.

Both work on the slices, never on an ``sq x sk`` matrix. The text picture cuts the domain into
at most ``height x width`` rectangular cells and labels each cell from its *exact* allowed area
per kind (`cell_areas`, by inclusion-exclusion of `maskc.normalize.prefix_area` at the cell
corners), so a 4M-token mask draws in milliseconds. matplotlib is imported inside `plot` only.

Text picture characters::

    .        no allowed pair in the cell
    F C I B  the kind with the most allowed area in the cell (FULL, CAUSAL, INV_CAUSAL, BI_CAUSAL):
             upper case when every pair of the cell is allowed, lower case when only some are
"""

from __future__ import annotations

import numbers

import numpy as np

from . import normalize as nz
from .errors import MaskError
from .kinds import Kind

LETTERS = "FCIB"  # indexed by Kind id
KIND_COLORS = ("#4C72B0", "#DD8452", "#55A868", "#C44E52")  # FULL, CAUSAL, INV_CAUSAL, BI_CAUSAL

_CHUNK_ELEMENTS = 1 << 20  # bands x grid points per vectorised prefix_area call


def _positive_int(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise MaskError(f"{what} must be a positive integer, got {value!r}")
    return int(value)


# ---- exact per-cell areas ------------------------------------------------------------------


def grid_shape(sq: int, sk: int, width: int = 64, height: int = 32) -> tuple[int, int]:
    """``(rows, cols)`` of the text picture of an ``sq x sk`` mask inside a ``height x width`` box.

    A mask that fits is drawn at full resolution (one character per position). Otherwise the
    cells keep the mask's aspect ratio, counting a character as twice as tall as it is wide, but
    neither side drops below 8 characters (or the positions it has) so thin masks stay legible.
    Never more cells than positions along either axis.
    """
    if sq <= 0 or sk <= 0:
        return 0, 0
    H = min(height, sq)
    W = min(width, sk)
    if sq <= height and sk <= width:
        return H, W
    if W * sq > 2 * H * sk:  # box wider than the mask: narrow the picture
        W = max(min(W, 8), -(-2 * H * sk // sq))
    else:  # box taller than the mask: flatten the picture
        H = max(min(H, 8), -(-W * sq // (2 * sk)))
    return min(H, sq), min(W, sk)


def edges(n: int, cells: int) -> np.ndarray:
    """``cells + 1`` integer cell edges splitting ``[0, n)`` as evenly as possible."""
    return (np.arange(cells + 1, dtype=np.int64) * n) // cells


def _prefix_sum(bands: np.ndarray, r: int, C: np.ndarray) -> np.ndarray:
    """``prefix_area(bands, r, C)`` for a vector C, in chunks of bounded memory."""
    total = np.zeros(C.size, dtype=np.int64)
    step = max(1, _CHUNK_ELEMENTS // max(C.size, 1))
    for t in range(0, bands.shape[0], step):
        total += nz.prefix_area(bands[t : t + step], np.int64(r), C)
    return total


def prefix_grid(bands: np.ndarray, R: np.ndarray, C: np.ndarray) -> np.ndarray:
    """``prefix_area(bands, R[:, None], C[None, :])`` for sorted edges R, without the n x H x W cube.

    A band whose rows end at or above an edge contributes the same column profile to that edge
    and every later one, so each band is evaluated once when its last row is passed (one
    `prefix_area` over the bands finishing in each gap between edges) plus once per edge it
    straddles. Cost O((slices + straddles) x W) arithmetic and O(H) calls.
    """
    P = np.zeros((R.size, C.size), dtype=np.int64)
    if bands.shape[0] == 0:
        return P
    r0 = bands[:, nz.R0]
    r1 = bands[:, nz.R1]
    order = np.argsort(r1, kind="stable")
    ends = r1[order]
    done = np.zeros(C.size, dtype=np.int64)  # bands with r1 <= current edge, in full
    taken = 0
    for e, r in enumerate(R.tolist()):
        upto = int(np.searchsorted(ends, r, side="right"))
        if upto > taken:
            done += _prefix_sum(bands[order[taken:upto]], r, C)
            taken = upto
        P[e] = done
        across = (r0 < r) & (r1 > r)
        if across.any():
            P[e] += _prefix_sum(bands[across], r, C)
    return P


def cell_areas(mask, rows_edges, cols_edges) -> np.ndarray:
    """Exact allowed pairs per kind and cell: int64 ``[4, H, W]``.

    Cell ``(r, c)`` is ``[rows_edges[r], rows_edges[r+1]) x [cols_edges[c], cols_edges[c+1])``;
    entry ``[kind, r, c]`` counts the pairs of that cell allowed by slices of that kind (the
    slices of a normalised mask are disjoint, so the kinds add up to the cell's allowed area).
    Edges must be non-decreasing; they need not start at 0 or end at sq / sk.
    Cost O((slices + H) x W) integer arithmetic (`prefix_grid`), no dense matrix.
    """
    R = np.asarray(rows_edges, dtype=np.int64).reshape(-1)
    C = np.asarray(cols_edges, dtype=np.int64).reshape(-1)
    if R.size < 1 or C.size < 1:
        raise MaskError("cell_areas: need at least one row edge and one column edge")
    if np.any(np.diff(R) < 0) or np.any(np.diff(C) < 0):
        raise MaskError("cell_areas: cell edges must be non-decreasing")
    H, W = R.size - 1, C.size - 1
    out = np.zeros((len(Kind), max(H, 0), max(W, 0)), dtype=np.int64)
    bands = mask.bands
    if bands.shape[0] == 0 or H == 0 or W == 0:
        return out
    kinds = 2 * bands[:, nz.AS] + bands[:, nz.BS]
    for kind in Kind:
        sel = bands[kinds == int(kind)]
        if sel.shape[0] == 0:
            continue
        P = prefix_grid(sel, R, C)
        out[int(kind)] = P[1:, 1:] - P[:-1, 1:] - P[1:, :-1] + P[:-1, :-1]
    return out


def cell_chars(areas: np.ndarray, rows_edges, cols_edges) -> list[str]:
    """One string per picture row from `cell_areas` output (see the module docstring)."""
    R = np.asarray(rows_edges, dtype=np.int64)
    C = np.asarray(cols_edges, dtype=np.int64)
    size = np.diff(R)[:, None] * np.diff(C)[None, :]
    total = areas.sum(axis=0)
    dom = areas.argmax(axis=0)
    upper = np.array(list(LETTERS))
    lower = np.array(list(LETTERS.lower()))
    chars = np.where(total == size, upper[dom], lower[dom])
    chars = np.where(total == 0, ".", chars)
    return ["".join(row) for row in chars.tolist()]


# ---- text --------------------------------------------------------------------------------------


def kind_counts(mask) -> dict[Kind, int]:
    """Number of canonical slices of each kind present, in kind order."""
    ids, counts = np.unique(mask.array[:, 4], return_counts=True)
    return {Kind(int(i)): int(c) for i, c in zip(ids, counts)}


def summary(mask) -> str:
    """``sq x sk, N slices (KIND count, ...), area A, density D``."""
    n = len(mask)
    counts = kind_counts(mask)
    kinds = ", ".join(f"{k.name} {c}" for k, c in counts.items())
    head = f"{mask.sq} x {mask.sk}, {n} slice{'' if n == 1 else 's'}"
    if kinds:
        head += f" ({kinds})"
    return f"{head}, area {mask.area:,}, density {mask.density:.4g}"


def _count(sizes: np.ndarray, one: str, many: str) -> str:
    lo, hi = int(sizes.min()), int(sizes.max())
    return f"1 {one}" if lo == hi == 1 else f"{lo if lo == hi else f'{lo}-{hi}'} {many}"


def legend_line(rows_edges, cols_edges) -> str:
    """What the letters mean and how many positions one cell covers."""
    R = np.asarray(rows_edges, dtype=np.int64)
    C = np.asarray(cols_edges, dtype=np.int64)
    kinds = "  ".join(f"{LETTERS[k]} {k.name}" for k in Kind)
    cell = f"cell = {_count(np.diff(R), 'query', 'queries')} x {_count(np.diff(C), 'key', 'keys')}"
    return f"{kinds}  (UPPER: whole cell, lower: part, .: none); {cell}"


def _frame(rows: list[str], R: np.ndarray, C: np.ndarray, sq: int, sk: int) -> list[str]:
    H, W = len(rows), len(rows[0])
    labels = [""] * H
    labels[0] = "0" if H > 1 or sq == 1 else f"0..{sq - 1}"
    if H > 1:
        labels[-1] = str(sq - 1)
    if H >= 4:
        labels[1], labels[2] = "query", "v"
    elif H == 3:
        labels[1] = "query"
    top_label = "" if H >= 3 else "query v"
    key_label = "key ->"
    g = max(len(key_label), len(top_label), *(len(s) for s in labels))
    first, last = "0", str(sk - 1)
    if sk == 1:
        nums = first
    elif len(first) + 1 + len(last) <= W:
        nums = first + " " * (W - len(first) - len(last)) + last
    else:
        nums = f"{first}..{last}"
    border = " " * (g + 1) + "+" + "-" * W + "+"
    out = [f"{key_label:>{g}}  {nums}", f"{top_label:>{g}} +" + "-" * W + "+"]
    out += [f"{lab:>{g}} |{row}|" for lab, row in zip(labels, rows)]
    out.append(border)
    return out


def ascii_picture(mask, width: int = 64, height: int = 32, legend: bool = True) -> str:
    """A compact text picture of `mask`: at most ``height`` rows by ``width`` columns of cells.

    Query positions run down, key positions across; each character is one rectangular cell of
    the ``[0, sq) x [0, sk)`` grid, chosen from the cell's exact allowed area per kind:
    ``.`` empty, ``F``/``C``/``I``/``B`` the dominant kind (upper case: the whole cell is
    allowed; lower case: part of it). With ``legend``, a legend line and a summary line
    (``sq x sk, N slices (kinds), area A, density D``) follow the frame.
    """
    width = _positive_int(width, "ascii picture width")
    height = _positive_int(height, "ascii picture height")
    sq, sk = mask.shape
    lines = []
    if sq == 0 or sk == 0:
        lines.append(f"(empty domain {sq} x {sk}: nothing to draw)")
    else:
        H, W = grid_shape(sq, sk, width, height)
        R, C = edges(sq, H), edges(sk, W)
        rows = cell_chars(cell_areas(mask, R, C), R, C)
        lines += _frame(rows, R, C, sq, sk)
        if legend:
            lines.append(legend_line(R, C))
    if legend:
        lines.append(summary(mask))
    return "\n".join(lines)


# ---- matplotlib ----------------------------------------------------------------------------


def slice_polygons(mask) -> tuple[np.ndarray, np.ndarray]:
    """Exact continuous outlines of the slices: ``(verts float [n, 8, 2] as (x=key, y=query), kinds [n])``.

    Cell-edge coordinates: row ``i`` spans ``y in [i, i+1]`` and key ``j`` spans ``x in [j, j+1]``,
    so a one-row slice has height 1. A sloped end of the row interval is the line through the
    middle of each row's boundary (``x = a(i)`` or ``b(i)`` at ``y = i + 1/2``), clipped to the
    slice's key range: FULL gives a rectangle, CAUSAL / INV_CAUSAL a (clipped) trapezoid or
    triangle, BI_CAUSAL a parallelogram band; each polygon's area is the slice's exact area up to
    the half cells its clipped corners cut.
    """
    b = mask.bands.astype(np.float64)
    n = b.shape[0]
    if n == 0:
        return np.zeros((0, 8, 2)), np.zeros(0, dtype=np.int64)
    r0, r1, ac, a_s, bc, b_s = (b[:, c : c + 1] for c in range(6))
    ks = ac + a_s * r0
    ke = bc + b_s * (r1 - 1)
    ys = np.concatenate([r0, r0 + 0.5, r1 - 0.5, r1], axis=1)  # kinks of the clipped ends
    left = np.maximum(ks, ac + a_s * (ys - 0.5))
    right = np.minimum(ke, bc + b_s * (ys - 0.5))
    x = np.concatenate([left, right[:, ::-1]], axis=1)
    y = np.concatenate([ys, ys[:, ::-1]], axis=1)
    kinds = (2 * mask.bands[:, nz.AS] + mask.bands[:, nz.BS]).astype(np.int64)
    return np.stack([x, y], axis=2), kinds


def plot(mask, path=None, *, ax=None, title=None, max_outline: int = 2000):
    """Draw `mask` with matplotlib and return the figure; save it to ``path`` (PNG) if given.

    Every slice is a filled polygon (`slice_polygons`) coloured by kind and outlined (outlines
    are skipped beyond ``max_outline`` slices); query positions run down (row 0 at the top, like
    a matrix), keys across. ``ax`` draws into an existing axes; ``title`` is put above the
    summary line. Uses pyplot for a new figure: pick a backend first (``matplotlib.use("Agg")``)
    where no display is wanted.
    """
    from matplotlib.collections import PolyCollection
    from matplotlib.colors import to_rgba
    from matplotlib.patches import Patch, Rectangle
    from matplotlib.ticker import MaxNLocator

    sq, sk = mask.shape
    if ax is None:
        import matplotlib.pyplot as plt

        aspect = sq / sk if sq and sk else 1.0
        w = 8.0
        h = float(np.clip(w * aspect, 2.5, 10.0)) + 1.0
        fig, ax = plt.subplots(figsize=(w, h), layout="constrained")
    else:
        fig = ax.figure
    verts, kinds = slice_polygons(mask)
    outline = verts.shape[0] <= max_outline
    handles = []
    counts = kind_counts(mask)
    for kind in Kind:
        sel = kinds == int(kind)
        if not sel.any():
            continue
        face = to_rgba(KIND_COLORS[kind], 0.6)
        edge = to_rgba(KIND_COLORS[kind], 1.0)
        coll = PolyCollection(
            list(verts[sel]),
            closed=True,
            facecolors=[face],
            edgecolors=[edge] if outline else "none",
            linewidths=0.6 if outline else 0.0,
            antialiased=True,
        )
        ax.add_collection(coll)
        n = counts.get(kind, 0)
        handles.append(Patch(facecolor=face, edgecolor=edge, label=f"{kind.name} ({n} slice{'' if n == 1 else 's'})"))
    ax.add_patch(Rectangle((0, 0), sk, sq, fill=False, edgecolor="0.3", linewidth=0.8))
    ax.set_xlim(0, max(sk, 1))
    ax.set_ylim(max(sq, 1), 0)  # query axis downward
    if sq and sk and 1 / 25 <= sq / sk <= 25:
        ax.set_aspect("equal")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("key position")
    ax.set_ylabel("query position")
    if handles:
        ax.legend(handles=handles, loc="upper right", fontsize="small", framealpha=0.85)
    else:
        ax.text(0.5, 0.5, "empty mask", transform=ax.transAxes, ha="center", va="center")
    head = summary(mask)
    if not outline:
        head += f" (outlines skipped: > {max_outline} slices)"
    ax.set_title(head if title is None else f"{title}\n{head}", fontsize="medium")
    if path is not None:
        fig.savefig(path, dpi=150)
    return fig


__all__ = [
    "LETTERS",
    "ascii_picture",
    "cell_areas",
    "cell_chars",
    "edges",
    "grid_shape",
    "kind_counts",
    "legend_line",
    "plot",
    "slice_polygons",
    "summary",
]
