"""The colour tracker and the caption rule: what an object of the synthetic world did, read from frames.

Objects of this world have distinct palette colours, far apart from each other and from any background
(palette colours are >= 170 apart and >= 120 from any background pixel, so a tolerance of
`DEFAULT_TOL` = 75 RGB units survives blur):

- `colour_masks`, `track_by_colour`: per palette colour and frame, the matching pixels, their centroid,
  count and extent;
- `count_blobs` / `blob_counts`: connected blobs of a colour per frame (an object vanished or duplicated);
- `present_colours`: the colours an image shows;
- `motion_from_track`: the caption rule of `data.motion_for_chunk` applied to *measured* motion (wall
  hits detected as velocity reversals near a wall that the object's pixels reach, velocities from a
  quadratic fit of the visible positions of the chunk); `track_motion`: that rule over some frames of
  one colour's track, optionally leaving out the frames where the colour is partly covered (`OCCLUDED`).

The evaluation (`evaluate`: prompt following, persistence) and generation (`objects`: the stream's own
also prompts) both read frames through this module.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from . import data
from .data import PALETTE, WorldConfig

DEFAULT_TOL = 75.0
DEFAULT_MIN_PIXELS = 6
WALL_MARGIN = 14.0  # a velocity reversal counts as a wall hit only with the centroid this close (px) to the wall
# ... and the subject's pixels this close (px) to it: at the simulator's wall hits they reach it within
# 2 px, within 3 after the shipped autoencoder's round trip (581 of 581 hits, seeds 7000-7149); a
# reversal further out is a change of direction near the wall, not a hit (measured in session 23)
EDGE_MARGIN = 3.0
OCCLUDED = 0.85  # a frame where an object covers less than this of its median pixel count is left out


# ----------------------------------------------------------------------------------- tracking


def colour_masks(frames: np.ndarray, colours: Sequence[str], tol: float) -> dict[str, np.ndarray]:
    """Per palette colour: bool [T, H, W], the pixels within ``tol`` (RGB distance) of it."""
    frames = np.asarray(frames)
    if frames.ndim == 3:
        frames = frames[None]
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 [T, H, W, 3], got {list(frames.shape)}")
    f = frames.astype(np.float32)
    out = {}
    for c in colours:
        if c not in PALETTE:
            raise ValueError(f"unknown colour {c!r}; palette: {', '.join(PALETTE)}")
        d2 = ((f - np.asarray(PALETTE[c], np.float32)) ** 2).sum(-1)
        out[c] = d2 <= tol * tol
    return out


def track_by_colour(frames, colours: Sequence[str], tol: float = DEFAULT_TOL,
                    min_pixels: int = DEFAULT_MIN_PIXELS) -> dict[str, dict[str, np.ndarray]]:
    """Per colour: ``x``, ``y`` float [T] (centroid of matching pixel centres, NaN when not visible),
    ``count`` int [T] (matching pixels), ``visible`` bool [T] (count >= min_pixels), and the matching
    pixels' extent ``x0``, ``x1``, ``y0``, ``y1`` float [T] (pixel edges: the first matching column's
    left edge ... the last matching row's bottom edge; NaN when not visible)."""
    masks = colour_masks(frames, colours, tol)
    out = {}
    for c, m in masks.items():
        T, H, W = m.shape
        cnt = m.sum((1, 2))
        xs = (np.arange(W) + 0.5)[None, None, :]
        ys = (np.arange(H) + 0.5)[None, :, None]
        with np.errstate(invalid="ignore", divide="ignore"):
            x = (m * xs).sum((1, 2)) / cnt
            y = (m * ys).sum((1, 2)) / cnt
        vis = cnt >= min_pixels
        cols, rows = m.any(1), m.any(2)  # [T, W], [T, H]
        nan = np.full(T, np.nan)
        out[c] = {"x": np.where(vis, x, np.nan).astype(np.float64), "y": np.where(vis, y, np.nan).astype(np.float64),
                  "count": cnt.astype(np.int64), "visible": vis,
                  "x0": np.where(vis, cols.argmax(1), nan), "x1": np.where(vis, W - cols[:, ::-1].argmax(1), nan),
                  "y0": np.where(vis, rows.argmax(1), nan), "y1": np.where(vis, H - rows[:, ::-1].argmax(1), nan)}
    return out


def _components(mask: np.ndarray, min_pixels: int) -> int:
    """Number of 8-connected components of a 2-D bool mask with at least min_pixels pixels."""
    H, W = mask.shape
    seen = np.zeros_like(mask, dtype=bool)
    n = 0
    for i0, j0 in zip(*np.nonzero(mask)):
        if seen[i0, j0]:
            continue
        stack, size = [(i0, j0)], 0
        seen[i0, j0] = True
        while stack:
            i, j = stack.pop()
            size += 1
            for di in (-1, 0, 1):
                for dj in (-1, 0, 1):
                    a, b = i + di, j + dj
                    if 0 <= a < H and 0 <= b < W and mask[a, b] and not seen[a, b]:
                        seen[a, b] = True
                        stack.append((a, b))
        if size >= min_pixels:
            n += 1
    return n


def count_blobs(frames, colours: Sequence[str], tol: float = DEFAULT_TOL,
                min_pixels: int = DEFAULT_MIN_PIXELS) -> dict[str, np.ndarray]:
    """Per colour: int [T] number of connected blobs of that colour (>= min_pixels pixels) per frame."""
    return blob_counts(colour_masks(frames, colours, tol), min_pixels)


def blob_counts(masks: dict[str, np.ndarray], min_pixels: int) -> dict[str, np.ndarray]:
    """`count_blobs` of colour masks already computed (bool [T, H, W] per colour)."""
    return {c: np.array([_components(f, min_pixels) for f in m], dtype=np.int64) for c, m in masks.items()}


def present_colours(image, tol: float = DEFAULT_TOL, min_pixels: int = DEFAULT_MIN_PIXELS) -> list[str]:
    """Palette colours with at least min_pixels matching pixels in an image [H, W, 3]."""
    tr = track_by_colour(np.asarray(image)[None], list(PALETTE), tol, min_pixels)
    return [c for c in PALETTE if tr[c]["visible"][0]]


# ------------------------------------------------------------------------------ caption rule


def _first_reversal(p: np.ndarray, lo_wall: int, hi_wall: int, config: WorldConfig, k: int = 3,
                    lo_edge: np.ndarray | None = None, hi_edge: np.ndarray | None = None):
    """(step, code) of the first velocity reversal of a 1-D position track near a wall, or None.

    ``lo_wall``/``hi_wall``: the codes of hitting the low / high side of this axis. Near a wall: the
    centroid within `WALL_MARGIN` of it and, when the subject's extent along the axis is given
    (``lo_edge``/``hi_edge``, pixel edges per frame), its pixels within `EDGE_MARGIN` of it."""
    d = np.diff(p)
    jump = 1.2 * config.move_thresh  # below the data's threshold: slow bounces (0.2 px/frame) still count
    size = config.size

    def reaches(edge, sl, low: bool) -> bool:
        if edge is None:
            return True
        e = edge[sl][np.isfinite(edge[sl])]
        return len(e) > 0 and (e.min() <= EDGE_MARGIN if low else e.max() >= size - EDGE_MARGIN)

    for t in range(1, len(d)):
        before = d[max(0, t - k):t]
        after = d[t + 1:t + 1 + k] if t + 1 < len(d) else d[t:]  # the last step: its partial reflection
        before, after = before[np.isfinite(before)], after[np.isfinite(after)]
        if len(before) == 0 or len(after) == 0:
            continue
        vb, va = float(np.median(before)), float(np.median(after))
        if vb * va < 0 and abs(va - vb) > jump and min(abs(va), abs(vb)) > 0.12:
            sl = slice(max(0, t - 1), t + 3)
            seg = p[sl]
            if not np.isfinite(seg).any():
                continue
            pos = np.nanmax(seg) if vb > 0 else np.nanmin(seg)
            if vb < 0 and pos <= WALL_MARGIN and reaches(lo_edge, sl, True):
                return t, lo_wall
            if vb > 0 and pos >= size - WALL_MARGIN and reaches(hi_edge, sl, False):
                return t, hi_wall
    return None


def motion_from_track(x, y, config: WorldConfig = WorldConfig(), extent=None) -> str | None:
    """The caption rule (`data.motion_for_chunk`) applied to one chunk's tracked centroids.

    ``x``, ``y``: float [F] (NaN where not visible); ``extent``: optional ``(x0, x1, y0, y1)``, the
    subject's pixel extent per frame (`track_by_colour`). Wall hits: a reversal of the median step
    velocity near a wall (the first in time wins; with ``extent``, only where the subject's pixels
    reach the wall: `EDGE_MARGIN`); otherwise velocities come from a quadratic least-squares fit of
    the visible positions (robust to pixel quantisation and blur). None when fewer than a third of
    the frames are visible."""
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    n = len(x)
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < max(4, n // 3):
        return None
    x0, x1, y0, y1 = (None,) * 4 if extent is None else (np.asarray(e, np.float64) for e in extent)
    hx = _first_reversal(x, data.LEFT_WALL, data.RIGHT_WALL, config, lo_edge=x0, hi_edge=x1)
    hy = _first_reversal(y, data.CEILING, data.FLOOR, config, lo_edge=y0, hi_edge=y1)
    hits = [h for h in (hx, hy) if h is not None]
    bounce = np.zeros(n, dtype=np.int8)
    if hits:
        t, code = min(hits)
        bounce[t] = code
        return data.motion_for_chunk(np.ones(n), np.zeros(n), bounce, config)
    t = np.arange(n, dtype=np.float64)
    deg = 2 if ok.sum() >= 0.75 * n else 1  # too few frames: an acceleration estimate is noise
    cx = np.polyfit(t[ok], x[ok], deg)
    cy = np.polyfit(t[ok], y[ok], deg)
    if deg == 1:
        cx, cy = np.r_[0.0, cx], np.r_[0.0, cy]
    vx = 2 * cx[0] * t + cx[1]
    vy = 2 * cy[0] * t + cy[1]
    return data.motion_for_chunk(vx, vy, bounce, config)


def track_motion(track: dict, frames: slice, config: WorldConfig = WorldConfig(), occlusion_ref: slice | None = None,
                 use_extent: bool = True) -> str | None:
    """`motion_from_track` over ``frames`` of one colour's ``track`` (`track_by_colour`'s entry).

    ``occlusion_ref``: None keeps every frame where the colour is seen; a slice leaves out the frames
    where the colour covers less than `OCCLUDED` of its median pixel count over the visible frames of
    ``occlusion_ref`` (partly covered by an object drawn on top: the centroid is off).
    ``use_extent=False``: wall hits by the centroid alone."""
    keep = np.ones(len(track["x"][frames]), dtype=bool)
    if occlusion_ref is not None:
        vis = track["visible"][occlusion_ref]
        keep = (track["count"][frames] >= OCCLUDED * np.median(track["count"][occlusion_ref][vis]) if vis.any()
                else np.zeros_like(keep))
    x, y = (np.where(keep, track[c][frames], np.nan) for c in ("x", "y"))
    ext = [np.where(keep, track[e][frames], np.nan) for e in ("x0", "x1", "y0", "y1")] if use_extent else None
    return motion_from_track(x, y, config, extent=ext)
