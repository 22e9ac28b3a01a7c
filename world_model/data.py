"""The synthetic world: procedural 64x64 RGB videos of coloured shapes with per-chunk captions.

A clip is ``n_chunks`` chunks of ``chunk_frames`` (24) frames at ``fps`` (24), so one chunk is one
second. It shows 1-3 objects (circle, square, triangle; every object of a clip has its own colour
from `PALETTE`, so objects can be told apart -- and tracked -- by colour alone) on a dark plain or
textured background (plain, noise, stripes, checker; every background channel is at most
``background_max`` = 80, far from every palette colour). Objects move independently (they pass
through each other; a later object is drawn on top) with constant velocity, bounce elastically off
the four walls, and in a clip with gravity (probability ``gravity_prob``) accelerate downwards by
``gravity`` px/frame^2. Wall hits are solved exactly within each frame step, so the tracks obey the
physics to float precision. At every chunk boundary a scripted *control* may replace an object's
velocity (probability ``direction_change_prob``), so the motion -- and the caption -- changes from
chunk to chunk.

**Captions** (grammar in `maskc.world_model.vocab`) describe one *subject* object per chunk:
``"the <colour> <shape> <motion>"``. The subject of chunk 0 is random, and later chunks keep it
with probability ``1 - subject_switch_prob``; the other objects are distractors. The motion phrase
is `motion_for_chunk` of the subject's ground truth over the chunk's frames, a pure decision list:

1. a wall hit during the chunk -> ``"bounces off the {left wall|right wall|ceiling|floor}"``
   (the first hit in time);
2. mean speed below ``still_thresh`` -> ``"stays still"``;
3. with downward acceleration (mean frame-to-frame change of vy >= ``accel_thresh``, i.e. gravity):
   ``"moves left|right"`` if |mean vx| >= |mean vy| and |mean vx| >= ``move_thresh``, else
   ``"falls"`` if mean vy >= ``move_thresh``, ``"rises"`` if mean vy <= -``move_thresh``, else
   ``"rises and falls"`` (the apex is inside the chunk);
4. without acceleration: the dominant axis of the mean velocity, ``"moves left|right|up|down"``.

Coordinates: x to the right and y downwards in pixels, pixel (row i, column j) has its centre at
(j + 0.5, i + 0.5); a pixel belongs to a shape when its centre is inside. An object's position is
its shape's centroid (for the up-pointing equilateral triangle too), so the mean of its pixel
centres is the position to a fraction of a pixel. Velocities are in px/frame: ``vx[t]``, ``vy[t]``
are the velocities at frame t, after any control, at the start of the step from frame t to t+1,
and ``bounce[t]`` is the wall hit during that step (0 none, 1 left wall, 2 right wall,
3 ceiling, 4 floor). Chunk k owns frames and steps ``[k*chunk_frames, (k+1)*chunk_frames)``.

**Scripted clips**: `generate_from_prompts` plans a clip whose chunk k has a given caption, and
`generate_scheduled` does so for a random chunk-wise prompt schedule (runs of one caption); training
mixes those in (`make_batch(..., p_scheduled)`) so that a caption that repeats finds room to hold.

Everything is a deterministic function of the seed (``numpy.random.Generator(PCG64(seed))``).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field, replace
from typing import Iterator, Sequence

import numpy as np

from . import vocab
from .vocab import COLOURS, GRAVITY_MOTIONS, NO_GRAVITY_MOTIONS, SHAPES, WALLS

#: object colours (RGB); pairwise distances >= 170, and >= 120 from any background pixel
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (225, 40, 40),
    "green": (40, 200, 60),
    "blue": (55, 95, 250),
    "yellow": (240, 220, 40),
    "white": (245, 245, 245),
    "magenta": (220, 60, 220),
}
assert tuple(PALETTE) == COLOURS
BACKGROUNDS = ("plain", "noise", "stripes", "checker")
NO_WALL, LEFT_WALL, RIGHT_WALL, CEILING, FLOOR = 0, 1, 2, 3, 4
TRIANGLE_SCALE = 1.3  # a triangle of size s has circumradius 1.3 s (area close to a circle's)
_SQRT3_2 = math.sqrt(3.0) / 2.0
_PLAN_MIN_SPEED = 0.3  # the prompt planner's slowest scripted motion (px/frame)
_PLAN_MAX_SPEED = 2.6  # and its fastest (a bounce may need to cross the frame in one chunk)


@dataclass(frozen=True)
class WorldConfig:
    """Parameters of the synthetic world (defaults: 64x64, 24 fps, one-second chunks, 1-3 objects)."""

    size: int = 64
    fps: int = 24
    chunk_frames: int = 24
    min_objects: int = 1
    max_objects: int = 3
    gravity_prob: float = 0.3  # per clip
    gravity: float = 0.05  # px/frame^2 when the clip has gravity
    texture_prob: float = 0.6  # per clip: textured (noise/stripes/checker) rather than plain
    direction_change_prob: float = 0.5  # per object per chunk boundary: a control sets a new velocity
    still_prob: float = 0.15  # without gravity: a new velocity is zero with this probability
    speed_range: tuple[float, float] = (0.5, 1.5)  # px/frame of a randomly drawn motion
    jitter: float = 0.25  # the off-axis component of a drawn motion is at most jitter * speed
    kick_range: tuple[float, float] = (0.8, 2.0)  # under gravity: upward speed of a control's kick
    size_range: tuple[float, float] = (4.0, 7.5)  # object size s: radius / half side / triangle 1.3 s circumradius
    subject_switch_prob: float = 0.3  # per chunk boundary: the caption's subject changes
    still_thresh: float = 0.15  # caption: mean speed below this -> "stays still"
    move_thresh: float = 0.25  # caption: mean velocity component for moves/falls/rises under gravity
    accel_thresh: float = 0.02  # caption: mean dvy/dt at or above this -> gravity verbs
    visible_thresh: float = 0.9  # tracks: visible iff at least this fraction of the object's pixels show
    background_max: int = 80  # every background channel value is at most this
    colours: tuple[str, ...] = COLOURS
    shapes: tuple[str, ...] = SHAPES

    def __post_init__(self):
        def bad(msg):
            raise ValueError(f"WorldConfig: {msg}")

        if self.size < 16:
            bad(f"size={self.size} must be >= 16")
        if self.fps < 1 or self.chunk_frames < 2:
            bad(f"fps={self.fps} must be >= 1 and chunk_frames={self.chunk_frames} >= 2")
        if not 1 <= self.min_objects <= self.max_objects <= len(self.colours):
            bad(f"need 1 <= min_objects <= max_objects <= {len(self.colours)} (one colour per object)")
        for name in ("speed_range", "kick_range", "size_range"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi:
                bad(f"{name}={(lo, hi)} must satisfy 0 < lo <= hi")
        if self.size_range[1] * 2 * TRIANGLE_SCALE >= self.size / 2:
            bad(f"size_range={self.size_range} too large for a {self.size}px frame")
        for name in ("gravity_prob", "texture_prob", "direction_change_prob", "still_prob",
                     "subject_switch_prob", "jitter", "visible_thresh"):
            if not 0 <= getattr(self, name) <= 1:
                bad(f"{name}={getattr(self, name)} must be in [0, 1]")
        if self.gravity < 0:
            bad(f"gravity={self.gravity} must be >= 0")
        if not 0 <= self.background_max <= 100:
            bad(f"background_max={self.background_max} must be in [0, 100] (darker than every object colour)")
        for c in self.colours:
            if c not in PALETTE:
                bad(f"unknown colour {c!r}; palette: {', '.join(PALETTE)}")
        for s in self.shapes:
            if s not in SHAPES:
                bad(f"unknown shape {s!r}; shapes: {', '.join(SHAPES)}")
        if not self.still_thresh <= self.move_thresh:
            bad("still_thresh must be <= move_thresh")
        if self.speed_range[0] < self.move_thresh:
            bad(f"speed_range[0]={self.speed_range[0]} must be >= move_thresh={self.move_thresh}")

    @property
    def frame_shape(self) -> tuple[int, int, int]:
        return (self.size, self.size, 3)


@dataclass(frozen=True, eq=False)
class Clip:
    """One generated video with its per-chunk captions and ground-truth tracks.

    ``tracks`` (T frames, N objects, K chunks):
      x, y, vx, vy, size: float32 [T, N] -- centroid (px), velocity (px/frame, see module doc), size s;
      visible: bool [T, N] -- at least ``visible_thresh`` of the object's pixels are not covered;
      visible_frac: float32 [T, N]; bounce: int8 [T, N] -- wall hit during the step t -> t+1;
      colour, shape: str [N]; bounds: float32 [N, 4] -- (xmin, xmax, ymin, ymax) of the centroid;
      subject: int64 [K] -- the captioned object of each chunk; control: bool [K, N] -- velocity set
      by a control at the chunk's first frame (all True for chunk 0).
    Objects are drawn in index order (a later object covers an earlier one).
    """

    frames: np.ndarray
    captions: list[str]
    tracks: dict[str, np.ndarray]
    seed: int
    config: WorldConfig
    gravity: bool
    background: str
    meta: dict = field(default_factory=dict)

    @property
    def n_frames(self) -> int:
        return self.frames.shape[0]

    @property
    def n_chunks(self) -> int:
        return len(self.captions)

    @property
    def n_objects(self) -> int:
        return len(self.tracks["colour"])

    @property
    def object_names(self) -> list[str]:
        return [f"{c} {s}" for c, s in zip(self.tracks["colour"], self.tracks["shape"])]

    def chunk(self, k: int) -> np.ndarray:
        """Frames of chunk k, uint8 [chunk_frames, H, W, 3]."""
        if not 0 <= k < self.n_chunks:
            raise IndexError(f"chunk {k} out of range [0, {self.n_chunks})")
        f = self.config.chunk_frames
        return self.frames[k * f:(k + 1) * f]

    def object_at(self, t: int, i: int) -> dict:
        """Ground truth of object i at frame t as a plain dict."""
        tr = self.tracks
        return {
            "x": float(tr["x"][t, i]), "y": float(tr["y"][t, i]),
            "vx": float(tr["vx"][t, i]), "vy": float(tr["vy"][t, i]),
            "size": float(tr["size"][t, i]), "colour": str(tr["colour"][i]), "shape": str(tr["shape"][i]),
            "visible": bool(tr["visible"][t, i]),
        }


# ----------------------------------------------------------------------------------- captions


def infer_bounces(vx, vy, config: WorldConfig = WorldConfig()) -> np.ndarray:
    """Wall-hit codes per step inferred from velocities alone (for tracks without hit events).

    A hit in step t shows as a sign flip between v[t] and v[t+1] with a jump larger than
    2 * move_thresh (gravity changes vy by far less per frame); a hit in the last step is invisible.
    """
    vx = np.asarray(vx, dtype=np.float64)
    vy = np.asarray(vy, dtype=np.float64)
    code = np.zeros(len(vx), dtype=np.int8)
    jump = 2 * config.move_thresh
    for t in range(len(vx) - 1):
        if vx[t] * vx[t + 1] < 0 and abs(vx[t + 1] - vx[t]) > jump:
            code[t] = LEFT_WALL if vx[t] < 0 else RIGHT_WALL
        elif vy[t] * vy[t + 1] < 0 and abs(vy[t + 1] - vy[t]) > jump:
            code[t] = CEILING if vy[t] < 0 else FLOOR
    return code


def motion_for_chunk(vx, vy, bounce=None, config: WorldConfig = WorldConfig()) -> str:
    """The motion phrase (one of `vocab.MOTIONS`) of one object over one chunk (decision list in the module doc).

    ``vx``, ``vy``: the object's velocities at the chunk's frames; ``bounce``: its wall-hit codes
    per step (`infer_bounces` when None).
    """
    vx = np.asarray(vx, dtype=np.float64)
    vy = np.asarray(vy, dtype=np.float64)
    if vx.ndim != 1 or vx.shape != vy.shape or len(vx) == 0:
        raise ValueError(f"vx and vy must be equal-length non-empty 1-D arrays, got {vx.shape} and {vy.shape}")
    bounce = infer_bounces(vx, vy, config) if bounce is None else np.asarray(bounce)
    if bounce.shape != vx.shape:
        raise ValueError(f"bounce must have shape {vx.shape}, got {bounce.shape}")
    hits = np.flatnonzero(bounce)
    if hits.size:
        code = int(bounce[hits[0]])
        if not 1 <= code <= len(WALLS):
            raise ValueError(f"bounce code {code} not in 0..{len(WALLS)}")
        return f"bounces off the {WALLS[code - 1]}"
    if float(np.mean(np.hypot(vx, vy))) < config.still_thresh:
        return "stays still"
    mx, my = float(vx.mean()), float(vy.mean())
    acc = float(np.mean(np.diff(vy))) if len(vy) > 1 else 0.0
    horizontal = "moves left" if mx < 0 else "moves right"
    if acc >= config.accel_thresh:
        if abs(mx) >= abs(my) and abs(mx) >= config.move_thresh:
            return horizontal
        if my >= config.move_thresh:
            return "falls"
        if my <= -config.move_thresh:
            return "rises"
        return "rises and falls"
    if abs(mx) >= abs(my):
        return horizontal
    return "moves down" if my > 0 else "moves up"


def caption_for_chunk(colour: str, shape: str, vx, vy, bounce=None, config: WorldConfig = WorldConfig()) -> str:
    """The caption of a chunk: ``"the {colour} {shape} {motion_for_chunk(vx, vy, bounce)}"``."""
    return vocab.format_caption(colour, shape, motion_for_chunk(vx, vy, bounce, config))


def _object_caption(tracks: dict, i: int, k: int, config: WorldConfig) -> str:
    """The caption of object ``i`` over chunk ``k`` of a clip's tracks."""
    sl = slice(k * config.chunk_frames, (k + 1) * config.chunk_frames)
    return caption_for_chunk(str(tracks["colour"][i]), str(tracks["shape"][i]), tracks["vx"][sl, i], tracks["vy"][sl, i],
                             tracks["bounce"][sl, i], config)


def captions_from_tracks(tracks: dict, config: WorldConfig = WorldConfig()) -> list[str]:
    """Recompute every chunk's caption from a clip's tracks (equals ``clip.captions``)."""
    return [_object_caption(tracks, int(s), k, config) for k, s in enumerate(np.asarray(tracks["subject"]))]


def object_captions(tracks: dict, config: WorldConfig = WorldConfig()) -> list[tuple[str, ...]]:
    """Per chunk, the caption of every object (what each one does during the chunk, by the rule of the
    subject's caption), in object order."""
    return [tuple(_object_caption(tracks, i, k, config) for i in range(len(tracks["colour"])))
            for k in range(len(tracks["subject"]))]


def other_captions(tracks: dict, config: WorldConfig = WorldConfig(), told: Sequence[str] | None = None,
                   motion: str | None = None, lag: int = 0) -> list[tuple[str, ...]]:
    """Per chunk, the captions of every object but that chunk's subject (`object_captions` less one), in
    object order: what generation's *also prompts* can be told (`generate.also_prompts`). ``told``: the
    prompts a generation is given, one per chunk, when they are not the clip's own captions (e.g. its
    first caption repeated; default: the clip's own): the object each prompt names is the one left out
    (objects of a clip have distinct colours, so a caption names one). ``motion`` (a motion phrase,
    e.g. ``"moves left"``): every object told that motion instead of its own. ``lag`` L: chunk k takes
    the captions of chunk max(0, k - L) (what a generator that reads its own finished chunks could
    know), still leaving out the object chunk k's prompt names."""
    if isinstance(lag, bool) or not isinstance(lag, int) or lag < 0:
        raise ValueError(f"lag must be an integer >= 0 (chunks), got {lag!r}")
    every = object_captions(tracks, config)
    if told is None:
        told = [caps[s] for caps, s in zip(every, np.asarray(tracks["subject"]))]
    if len(told) != len(every):
        raise ValueError(f"told has {len(told)} prompts for a clip of {len(every)} chunks")
    out = [tuple(c for c in every[max(0, k - lag)] if vocab.parse_caption(c).subject != vocab.parse_caption(t).subject)
           for k, t in enumerate(told)]
    if motion is None:
        return out
    return [tuple(vocab.format_caption(*vocab.parse_caption(c).subject, motion) for c in caps) for caps in out]


# ------------------------------------------------------------------------------------- physics


def shape_extents(shape: str, s: float) -> tuple[float, float, float, float]:
    """(left, right, top, bottom) distances from the centroid to the shape's edges."""
    if shape == "triangle":
        r = TRIANGLE_SCALE * s
        return (r * _SQRT3_2, r * _SQRT3_2, r, r / 2)
    return (s, s, s, s)


def foreground_cells(clip: "Clip", time_down: int, space_down: int) -> np.ndarray:
    """bool [n_frames // time_down, size // space_down, size // space_down]: the latent cells (one
    per ``time_down`` frames x ``space_down`` x ``space_down`` pixels) that some object's bounding
    box touches in any of its frames -- the pixels a caption is about."""
    tr, n = clip.tracks, clip.config.size
    g = n // space_down
    cells = np.arange(g)
    touched = np.zeros((clip.n_frames, g, g), bool)
    for i, shape in enumerate(tr["shape"]):
        left, right, top, bottom = shape_extents(str(shape), tr["size"][:, i])
        x, y = tr["x"][:, i], tr["y"][:, i]
        c0, c1 = np.floor((x - left) / space_down), np.floor((x + right) / space_down)
        r0, r1 = np.floor((y - top) / space_down), np.floor((y + bottom) / space_down)
        cols = (cells >= c0[:, None]) & (cells <= c1[:, None])  # [T, g]
        rows = (cells >= r0[:, None]) & (cells <= r1[:, None])
        touched |= rows[:, :, None] & cols[:, None, :]
    t = clip.n_frames // time_down
    return touched[:t * time_down].reshape(t, time_down, g, g).any(axis=1)


def _bounds(shape: str, s: float, size: int) -> tuple[float, float, float, float]:
    l, r, t, b = shape_extents(shape, s)
    return (l, size - r, t, size - b)


def _time_to_y_wall(y, vy, g, ymin, ymax):
    """Time to the floor and to the ceiling (inf when not reached) under y'' = g."""
    d = max(ymax - y, 0.0)
    e = max(y - ymin, 0.0)
    if g > 0:
        sq = math.sqrt(vy * vy + 2 * g * d)
        tf = 2 * d / (vy + sq) if vy > 0 else (sq - vy) / g
    else:
        tf = d / vy if vy > 0 else math.inf
    tc = math.inf
    if vy < 0:
        disc = vy * vy - 2 * g * e
        if disc >= 0:
            tc = 2 * e / (math.sqrt(disc) - vy)
    return tf, tc


def _step(x, y, vx, vy, g, b):
    """One frame of exact motion with elastic wall hits; returns (x, y, vx, vy, first hit code)."""
    xmin, xmax, ymin, ymax = b
    rest_v = 1.5 * g
    code = NO_WALL
    t = 1.0
    for _ in range(8):
        if g > 0 and y >= ymax - 1e-9 and 0 <= vy < rest_v:  # resting on the floor
            y, vy, g = ymax, 0.0, 0.0
        if vx < 0:
            tx = max(x - xmin, 0.0) / -vx
        elif vx > 0:
            tx = max(xmax - x, 0.0) / vx
        else:
            tx = math.inf
        tf, tc = _time_to_y_wall(y, vy, g, ymin, ymax)
        s = min(tx, tf, tc)
        if s >= t:
            x += vx * t
            y += vy * t + 0.5 * g * t * t
            vy += g * t
            break
        x += vx * s
        y += vy * s + 0.5 * g * s * s
        vy += g * s
        t -= s
        if tx == s:
            x = xmin if vx < 0 else xmax
            code = code or (LEFT_WALL if vx < 0 else RIGHT_WALL)
            vx = -vx
        if tf == s:
            y = ymax
            code = code or FLOOR
            vy = -vy
            if g > 0 and -vy < rest_v:
                vy = 0.0
        elif tc == s:
            y = ymin
            code = code or CEILING
            vy = -vy
    x = min(max(x, xmin), xmax)
    y = min(max(y, ymin), ymax)
    return x, y, vx, vy, code


def _run_chunk(state, n, g, b):
    """Simulate one object for n steps from state (x, y, vx, vy) after its control.

    Returns (rec float32 [n, 4] of x, y, vx, vy at each frame, codes int8 [n], end state).
    """
    x, y, vx, vy = state
    xmin, xmax, ymin, ymax = b
    rec = np.empty((n, 4), dtype=np.float64)
    codes = np.zeros(n, dtype=np.int8)
    rest_v = 1.5 * g
    for t in range(n):
        if g > 0 and y >= ymax - 1e-9 and 0 <= vy < rest_v:
            y, vy = ymax, 0.0
        rec[t] = (x, y, vx, vy)
        x, y, vx, vy, codes[t] = _step(x, y, vx, vy, g, b)
    return rec.astype(np.float32), codes, (x, y, vx, vy)


# ----------------------------------------------------------------------------------- rendering


def _background(rng, cfg: WorldConfig) -> tuple[np.ndarray, str]:
    n = cfg.size
    top = cfg.background_max
    base = rng.integers(8, max(9, min(45, top - 25)), size=3).astype(np.float32)
    kind = "plain" if rng.random() >= cfg.texture_prob else BACKGROUNDS[1 + int(rng.integers(3))]
    yy, xx = np.mgrid[0:n, 0:n]
    img = np.broadcast_to(base, (n, n, 3)).astype(np.float32)
    if kind == "noise":
        sigma = rng.uniform(3.0, 8.0)
        img = img + rng.normal(0.0, sigma, size=(n, n, 1)).astype(np.float32) + rng.normal(0.0, 2.0, size=(n, n, 3))
    elif kind in ("stripes", "checker"):
        delta = rng.integers(8, 25, size=3).astype(np.float32)
        if kind == "stripes":
            period = int(rng.integers(4, 13))
            orient = int(rng.integers(4))
            coord = (xx, yy, xx + yy, xx - yy + n)[orient] + int(rng.integers(period))
            on = (coord % period) < period / 2
        else:
            cell = int(rng.integers(4, 17))
            on = ((xx // cell + yy // cell) % 2).astype(bool)
        img = img + on[..., None] * delta
    return np.clip(np.rint(img), 0, top).astype(np.uint8), kind


def _object_masks(x, y, shape: str, s: float, size: int) -> np.ndarray:
    """bool [T, H, W]: pixel centres inside the shape centred at (x[t], y[t])."""
    c = np.arange(size, dtype=np.float32) + 0.5
    dx = c[None, None, :] - np.asarray(x, dtype=np.float32)[:, None, None]
    dy = c[None, :, None] - np.asarray(y, dtype=np.float32)[:, None, None]
    if shape == "circle":
        return dx * dx + dy * dy <= np.float32(s * s)
    if shape == "square":
        return (np.abs(dx) <= s) & (np.abs(dy) <= s)
    r = np.float32(TRIANGLE_SCALE * s)
    up = np.float32(_SQRT3_2) * (dy + r)  # inside the two slanted edges: 1.5 |dx| <= (sqrt3/2)(dy + r)
    return (dy <= r / 2) & (np.float32(1.5) * np.abs(dx) <= up)


def render(background: np.ndarray, tracks: dict) -> tuple[np.ndarray, np.ndarray]:
    """Frames uint8 [T, H, W, 3] and the visible fraction float32 [T, N] of every object."""
    xs, ys = tracks["x"], tracks["y"]
    t_len, n_obj = xs.shape
    size = background.shape[0]
    frames = np.broadcast_to(background, (t_len,) + background.shape).copy()
    masks = []
    for i in range(n_obj):
        m = _object_masks(xs[:, i], ys[:, i], str(tracks["shape"][i]), float(tracks["size"][0, i]), size)
        frames[m] = PALETTE[str(tracks["colour"][i])]
        masks.append(m)
    frac = np.zeros((t_len, n_obj), dtype=np.float32)
    covered = np.zeros((t_len, size, size), dtype=bool)
    for i in reversed(range(n_obj)):
        m = masks[i]
        total = m.sum(axis=(1, 2))
        shown = (m & ~covered).sum(axis=(1, 2))
        frac[:, i] = shown / np.maximum(total, 1)
        covered |= m
    return frames, frac


# ---------------------------------------------------------------------------------- generation


def _check_seed(seed) -> int:
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    return int(seed)


def _check_chunks(n_chunks) -> int:
    if isinstance(n_chunks, bool) or not isinstance(n_chunks, (int, np.integer)) or n_chunks < 1:
        raise ValueError(f"n_chunks must be a positive int, got {n_chunks!r}")
    return int(n_chunks)


def _random_velocity(rng, vy_now: float, gravity: bool, initial: bool, cfg: WorldConfig) -> tuple[float, float]:
    lo, hi = cfg.speed_range
    if gravity:
        vx = 0.0 if rng.random() < 0.3 else float(rng.choice((-1.0, 1.0)) * rng.uniform(lo, hi))
        if initial:
            vy = float(rng.uniform(-0.5, 0.5))
        else:
            vy = vy_now if rng.random() < 0.5 else -float(rng.uniform(*cfg.kick_range))
        return vx, vy
    if rng.random() < cfg.still_prob:
        return 0.0, 0.0
    axis = int(rng.integers(4))  # left, right, up, down
    u = float(rng.uniform(lo, hi))
    w = float(rng.uniform(-cfg.jitter, cfg.jitter)) * u
    main = -u if axis in (0, 2) else u
    return (main, w) if axis < 2 else (w, main)


def _place(rng, b, taken, s, gravity, cfg, tries=100):
    xmin, xmax, ymin, ymax = b
    if gravity:
        ymax = max(ymin, ymax - 10.0)  # start above the floor, so the object has energy to bounce
    for _ in range(tries):
        x, y = float(rng.uniform(xmin, xmax)), float(rng.uniform(ymin, ymax))
        if all(math.hypot(x - ox, y - oy) >= s + os_ + 2 for ox, oy, os_ in taken):
            break
    return x, y


def _assemble(seed, cfg, gravity, bg, bg_kind, colours, shapes, sizes, bounds, recs, codes, controls, subjects, meta):
    """Tracks, frames and captions from per-object, per-chunk simulation records."""
    n_obj = len(colours)
    rec = np.stack([np.concatenate(r, axis=0) for r in recs], axis=1)  # [T, N, 4]
    t_len = rec.shape[0]
    tracks = {
        "x": np.ascontiguousarray(rec[..., 0]), "y": np.ascontiguousarray(rec[..., 1]),
        "vx": np.ascontiguousarray(rec[..., 2]), "vy": np.ascontiguousarray(rec[..., 3]),
        "size": np.broadcast_to(np.asarray(sizes, dtype=np.float32), (t_len, n_obj)).copy(),
        "colour": np.asarray(colours, dtype="<U8"), "shape": np.asarray(shapes, dtype="<U8"),
        "bounce": np.stack([np.concatenate(c) for c in codes], axis=1).astype(np.int8),
        "bounds": np.asarray(bounds, dtype=np.float32).reshape(n_obj, 4),
        "subject": np.asarray(subjects, dtype=np.int64),
        "control": np.asarray(controls, dtype=bool).reshape(len(subjects), n_obj),
    }
    frames, frac = render(bg, tracks)
    tracks["visible_frac"] = frac
    tracks["visible"] = frac >= cfg.visible_thresh
    captions = captions_from_tracks(tracks, cfg)
    return Clip(frames=frames, captions=captions, tracks=tracks, seed=seed, config=cfg,
                gravity=bool(gravity), background=bg_kind, meta=meta)


def generate(seed: int, n_chunks: int, config: WorldConfig = WorldConfig(), twin: bool = False) -> Clip:
    """A random clip of ``n_chunks`` chunks, fully determined by ``seed`` (and ``twin``).

    ``twin=True``: a *twin clip*, the one exception to "every object has its own colour". Its last
    object is a copy of its first (colour, shape, size and every velocity the first is given; only its
    place differs), the way a model draws its subject twice, and its captions are all the null caption
    ``""``: a caption names one object by its colour, and here two share it. Training shows twin clips
    as uncaptioned (`make_batch`'s ``p_twin``), so that the unconditional distribution has copies and the
    captioned one has none, and guidance away from the unconditional branch steers away from copies."""
    seed, n_chunks, cfg = _check_seed(seed), _check_chunks(n_chunks), config
    if twin and cfg.max_objects < 2:
        raise ValueError(f"a twin clip needs max_objects >= 2 (it copies an object), got {cfg.max_objects}")
    rng = np.random.Generator(np.random.PCG64(seed))
    gravity = bool(rng.random() < cfg.gravity_prob)
    g = cfg.gravity if gravity else 0.0
    n_obj = int(rng.integers(max(cfg.min_objects, 2) if twin else cfg.min_objects, cfg.max_objects + 1))
    colours = [cfg.colours[i] for i in rng.choice(len(cfg.colours), size=n_obj, replace=False)]
    shapes = [cfg.shapes[i] for i in rng.integers(len(cfg.shapes), size=n_obj)]
    sizes = [float(s) for s in rng.uniform(*cfg.size_range, size=n_obj)]
    if twin:  # the last object copies the first
        colours[-1], shapes[-1], sizes[-1] = colours[0], shapes[0], sizes[0]
    bg, bg_kind = _background(rng, cfg)
    bounds = [_bounds(sh, s, cfg.size) for sh, s in zip(shapes, sizes)]
    taken, states = [], []
    for i in range(n_obj):
        x, y = _place(rng, bounds[i], taken, sizes[i], gravity, cfg)
        taken.append((x, y, sizes[i]))
        states.append((x, y) + _random_velocity(rng, 0.0, gravity, True, cfg))
    recs, codes = [[] for _ in range(n_obj)], [[] for _ in range(n_obj)]
    controls, subjects = [], []
    subject = int(rng.integers(n_obj))
    for k in range(n_chunks):
        ctrl = [True] * n_obj
        if k > 0:
            for i in range(n_obj):
                ctrl[i] = bool(rng.random() < cfg.direction_change_prob)
                if ctrl[i]:
                    x, y, _, vy = states[i]
                    states[i] = (x, y) + _random_velocity(rng, vy, gravity, False, cfg)
            if n_obj > 1 and rng.random() < cfg.subject_switch_prob:
                subject = int(rng.integers(n_obj))
        if twin:  # the copy is given what the first object is given (chunk 0: its first velocity)
            ctrl[-1] = ctrl[0]
            states[-1] = states[-1][:2] + states[0][2:]
        for i in range(n_obj):
            r, c, states[i] = _run_chunk(states[i], cfg.chunk_frames, g, bounds[i])
            recs[i].append(r)
            codes[i].append(c)
        controls.append(ctrl)
        subjects.append(subject)
    clip = _assemble(seed, cfg, gravity, bg, bg_kind, colours, shapes, sizes, bounds, recs, codes,
                     controls, subjects, {"source": "twin" if twin else "random"})
    return replace(clip, captions=[vocab.NULL_CAPTION] * n_chunks) if twin else clip


# ------------------------------------------------------------------------- scripted generation


def prompt_schedule(spec: Sequence[tuple[str, int]]) -> list[str]:
    """Expand ``[(prompt, n_chunks), ...]`` into one normalised prompt per chunk."""
    out = []
    for item in spec:
        try:
            prompt, count = item
        except (TypeError, ValueError):
            raise ValueError(f"prompt_schedule expects (prompt, n_chunks) pairs, got {item!r}") from None
        if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 1:
            raise ValueError(f"chunk count for {prompt!r} must be a positive int, got {count!r}")
        out.extend([vocab.parse_caption(prompt).text] * int(count))
    return out


def _propose(rng, motion, state, b, g, cfg, run):
    """A velocity for one scripted chunk whose motion should be ``motion`` (None: impossible here)."""
    x, y, _, _ = state
    xmin, xmax, ymin, ymax = b
    n = cfg.chunk_frames
    vmin, vmax = _PLAN_MIN_SPEED, cfg.speed_range[1]
    hover = -g * (n - 1) / 2  # under gravity: the vy whose chunk mean is zero
    u = rng.uniform
    if motion == "stays still":
        return 0.0, 0.0
    if motion.startswith("moves "):
        d = motion.split()[1]
        room = {"left": x - xmin, "right": xmax - x, "up": y - ymin, "down": ymax - y}[d]
        hi = min(vmax, 0.98 * room / (n * run))
        if hi < vmin:
            hi = min(vmax, 0.98 * room / n)  # the whole run cannot fit: at least this chunk
        if hi < vmin:
            return None
        sp = float(u(vmin, hi))
        sign = -1.0 if d in ("left", "up") else 1.0
        if g > 0:
            return sign * sp, hover + float(u(-0.3, 0.3))
        w = float(u(-cfg.jitter, cfg.jitter)) * sp
        return (sign * sp, w) if d in ("left", "right") else (w, sign * sp)
    if motion == "falls":
        lo = hover + cfg.move_thresh + 0.05
        hi = min(1.2, ((ymax - y) / run - 0.5 * g * n * n) / n)  # leave room for the run
        return float(u(-0.4, 0.4)), float(u(lo, max(lo, hi)))
    if motion == "rises":
        hi = hover - cfg.move_thresh - 0.05
        lo = max(-_PLAN_MAX_SPEED, -((y - ymin) / run + 0.5 * g * n * n) / n)  # leave room for the run
        return float(u(-0.4, 0.4)), float(u(min(lo, hi), hi))
    if motion == "rises and falls":
        return float(u(-0.2, 0.2)), hover + float(u(-0.15, 0.15))
    wall = motion[len("bounces off the "):]
    if wall in ("left wall", "right wall"):
        dist = x - xmin if wall == "left wall" else xmax - x
        lo = max(vmin, dist / (n - 1.0))
        if lo > _PLAN_MAX_SPEED:
            return None
        sp = float(u(lo, _PLAN_MAX_SPEED)) * (-1.0 if wall == "left wall" else 1.0)
        return sp, (hover + float(u(-0.3, 0.3)) if g > 0 else float(u(-cfg.jitter, cfg.jitter)) * abs(sp))
    # floor or ceiling
    side = float(u(-0.4, 0.4))
    if wall == "floor":
        dist = ymax - y
        lo = max(vmin if g == 0 else -1.0, (dist - 0.5 * g * (n - 1) ** 2) / (n - 1.0))
        if lo > _PLAN_MAX_SPEED:
            return None
        return side, float(u(lo, _PLAN_MAX_SPEED))
    dist = y - ymin
    lo = max(vmin, (dist + 0.5 * g * (n - 1) ** 2) / (n - 1.0), math.sqrt(2 * g * dist))
    hi = _PLAN_MAX_SPEED + (1.0 if g > 0 else 0.0)
    if lo > hi:
        return None
    return side, -float(u(lo, hi))


def _plan_object(rng, motions, b, s, g, taken, cfg, max_tries, budget, lookahead=True):
    """Per-chunk records of one object whose motion in chunk k is motions[k] (None: free).

    ``lookahead``: a chunk's velocity leaves room for the rest of its run of one motion; without
    it each chunk is drawn for itself (as a chunk-causal generator must), and a later chunk of the
    run slows down to fit what room is left (or the planner backtracks)."""
    n_chunks, n = len(motions), cfg.chunk_frames
    gravity = g > 0
    results, tries, fails, used = [], [0] * n_chunks, [0] * n_chunks, 0
    k = 0
    while k < n_chunks:
        if tries[k] >= max_tries:
            # dead end: back-jump, further each time this chunk fails (a dead end is often caused
            # by where an object was several chunks earlier); chunk 0 restarts with a new placement
            fails[k] += 1
            back = min(k, fails[k])
            for j in range(k - back, k + 1):
                tries[j] = 0
            del results[k - back:]
            k -= back
            continue
        tries[k] += 1
        used += 1
        if used > budget:
            return None
        m = motions[k]
        if k == 0:
            x, y = _place(rng, b, taken, s, gravity, cfg, tries=20)
            if m is not None and m.startswith("moves ") and rng.random() < 0.7:
                # leave room for the motion: start on the side the object moves away from
                xmin, xmax, ymin, ymax = b
                d = m.split()[1]
                if d in ("left", "right"):
                    f = rng.uniform(0.6, 1.0) if d == "left" else rng.uniform(0.0, 0.4)
                    x = xmin + f * (xmax - xmin)
                elif not gravity:
                    f = rng.uniform(0.6, 1.0) if d == "up" else rng.uniform(0.0, 0.4)
                    y = ymin + f * (ymax - ymin)
            start, ctrl = (x, y, 0.0, 0.0), True
        else:
            start, ctrl = results[k - 1][2], m is not None
        if m is None:
            if k == 0 or rng.random() < cfg.direction_change_prob:
                v, ctrl = _random_velocity(rng, start[3], gravity, k == 0, cfg), True
            else:
                v = start[2:]
        else:
            run = 1
            while lookahead and k + run < n_chunks and motions[k + run] == m:
                run += 1
            v = _propose(rng, m, start, b, g, cfg, run)
            if v is None:
                continue
        rec, codes, end = _run_chunk((start[0], start[1], float(v[0]), float(v[1])), n, g, b)
        if m is not None and motion_for_chunk(rec[:, 2], rec[:, 3], codes, cfg) != m:
            continue
        results.append((rec, codes, end, ctrl))
        k += 1
    return results


def generate_from_prompts(
    prompts: Sequence[str],
    seed: int,
    config: WorldConfig = WorldConfig(),
    n_objects: int | None = None,
    gravity: bool | None = None,
    max_tries: int = 64,
    lookahead: bool = True,
) -> Clip:
    """A clip whose chunk k has caption ``prompts[k]`` (normalised), scripted by per-chunk controls.

    Each prompt names its subject (``"the red circle ..."``); distinct subjects must have distinct
    colours. ``n_objects`` (default: the subjects plus a random number of distractors up to
    ``max_objects``) objects are drawn; distractors move freely. Gravity is on when a prompt needs it
    (falls / rises / rises and falls) unless ``gravity`` says otherwise; prompts that need gravity and
    prompts that cannot happen under it (moves up / moves down / stays still) cannot be mixed. Each
    object is planned independently (objects do not interact): per chunk its velocity is drawn to
    suit the prompt and kept only if `motion_for_chunk` of the simulated chunk equals the prompt,
    backtracking into earlier chunks when no draw works. Scripted speeds are 0.3 to 2.6 px/frame, so
    a run of one ``moves`` direction fits about 6 chunks of a 64 px frame. ``lookahead`` (default)
    draws each chunk's speed to leave room for the rest of its run; False draws every chunk for itself,
    so a run's later chunks slow down near a wall (see `_plan_object`). Raises ValueError for unknown words,
    ungrammatical or contradictory prompts, and for schedules the planner cannot realise.
    """
    seed, cfg = _check_seed(seed), config
    if isinstance(prompts, str):
        raise ValueError("prompts must be a list of captions (one per chunk), not a single string")
    if len(prompts) == 0:
        raise ValueError("prompts must name at least one chunk")
    parsed = [vocab.parse_caption(p) for p in prompts]
    subjects: list[tuple[str, str]] = []
    for c in parsed:
        if c.subject not in subjects:
            subjects.append(c.subject)
    by_colour: dict[str, str] = {}
    for colour, shape in subjects:
        if colour not in cfg.colours:
            raise ValueError(f"colour {colour!r} is not in this config's colours {cfg.colours}")
        if shape not in cfg.shapes:
            raise ValueError(f"shape {shape!r} is not in this config's shapes {cfg.shapes}")
        if by_colour.setdefault(colour, shape) != shape:
            raise ValueError(f"prompts name a {colour} {by_colour[colour]} and a {colour} {shape}: "
                             "objects of one clip must have distinct colours")
    if len(subjects) > cfg.max_objects:
        raise ValueError(f"prompts name {len(subjects)} objects, more than max_objects={cfg.max_objects}")
    needs = sorted({c.motion for c in parsed if c.motion in GRAVITY_MOTIONS})
    forbids = sorted({c.motion for c in parsed if c.motion in NO_GRAVITY_MOTIONS})
    if needs and forbids:
        raise ValueError(f"prompts need gravity ({', '.join(needs)}) and also motions impossible under "
                         f"gravity ({', '.join(forbids)}); they cannot share a clip")
    if gravity is None:
        gravity = bool(needs)
    if gravity and forbids:
        raise ValueError(f"gravity=True but prompts ask for {', '.join(forbids)}, impossible under gravity")
    if not gravity and needs:
        raise ValueError(f"gravity=False but prompts ask for {', '.join(needs)}, which needs gravity")
    g = cfg.gravity if gravity else 0.0
    if gravity and g <= 0:
        raise ValueError("gravity is needed but config.gravity is 0")

    rng = np.random.Generator(np.random.PCG64(seed))
    if n_objects is None:
        n_obj = int(rng.integers(len(subjects), cfg.max_objects + 1))
    else:
        n_obj = int(n_objects)
        if not len(subjects) <= n_obj <= min(cfg.max_objects, len(cfg.colours)):
            raise ValueError(f"n_objects={n_objects} must be in [{len(subjects)}, {cfg.max_objects}]")
    free = [c for c in cfg.colours if c not in by_colour]
    extra = [free[i] for i in rng.choice(len(free), size=n_obj - len(subjects), replace=False)]
    objects = subjects + [(c, cfg.shapes[int(rng.integers(len(cfg.shapes)))]) for c in extra]
    order = [int(i) for i in rng.permutation(n_obj)]  # drawing order (later on top)
    objects = [objects[i] for i in order]
    colours = [c for c, _ in objects]
    shapes = [s for _, s in objects]
    sizes = [float(s) for s in rng.uniform(*cfg.size_range, size=n_obj)]
    bounds = [_bounds(sh, s, cfg.size) for sh, s in zip(shapes, sizes)]
    bg, bg_kind = _background(rng, cfg)
    subject_idx = [objects.index(c.subject) for c in parsed]

    recs, codes, controls, taken = [], [], [[False] * n_obj for _ in parsed], []
    for i in range(n_obj):
        motions = [c.motion if subject_idx[k] == i else None for k, c in enumerate(parsed)]
        plan = _plan_object(rng, motions, bounds[i], sizes[i], g, taken, cfg, max_tries, budget=200 * max_tries,
                            lookahead=lookahead)
        if plan is None:
            wanted = [f"chunk {k}: {p.text}" for k, p in enumerate(parsed) if subject_idx[k] == i]
            raise ValueError(f"could not script the {colours[i]} {shapes[i]} through {'; '.join(wanted)} "
                             "(runs of one motion longer than the frame allows?)")
        taken.append((float(plan[0][0][0, 0]), float(plan[0][0][0, 1]), sizes[i]))
        recs.append([p[0] for p in plan])
        codes.append([p[1] for p in plan])
        for k, p in enumerate(plan):
            controls[k][i] = p[3]
    clip = _assemble(seed, cfg, gravity, bg, bg_kind, colours, shapes, sizes, bounds, recs, codes,
                     controls, subject_idx, {"source": "prompts", "prompts": [p.text for p in parsed],
                                             "lookahead": bool(lookahead)})
    want = [p.text for p in parsed]
    if clip.captions != want:  # cannot happen: every chunk was accepted on this very test
        raise RuntimeError(f"internal error: scripted captions {clip.captions} != prompts {want}")
    return clip


# ---------------------------------------------------------------------- scheduled training clips

# Motion weights of `scheduled_prompts`: close to the caption frequencies of `generate`'s clips (3000
# clips of 4 chunks), so mixing scheduled clips into training changes how motions follow each other,
# not how often each one is asked for.
SCHEDULE_MOTIONS = {
    False: {"moves left": 0.11, "moves right": 0.11, "moves up": 0.11, "moves down": 0.11, "stays still": 0.15,
            "bounces off the left wall": 0.1, "bounces off the right wall": 0.1, "bounces off the ceiling": 0.1,
            "bounces off the floor": 0.1},
    True: {"moves left": 0.09, "moves right": 0.1, "falls": 0.12, "rises": 0.11, "rises and falls": 0.04,
           "bounces off the floor": 0.22, "bounces off the left wall": 0.14, "bounces off the right wall": 0.13,
           "bounces off the ceiling": 0.05},
}
SCHEDULE_TRIES = 8  # schedules drawn for one scheduled clip before it falls back to `generate`
SCHEDULE_LOOKAHEAD = 1.0  # the fraction of scheduled clips planned over the whole schedule (the rest chunk by chunk)


def scheduled_prompts(rng: np.random.Generator, n_chunks: int, config: WorldConfig = WorldConfig()) -> tuple[list[str], bool]:
    """A random chunk-wise prompt schedule and whether it needs gravity: ``(prompts, gravity)``.

    Runs of one caption, each 1 to ``n_chunks`` chunks long (uniform), a new motion at every run
    boundary (weights `SCHEDULE_MOTIONS`), and at a run boundary a new subject with probability
    ``subject_switch_prob`` (at most ``max_objects`` subjects, distinct colours)."""
    n_chunks = _check_chunks(n_chunks)
    gravity = bool(rng.random() < config.gravity_prob) and config.gravity > 0
    table = SCHEDULE_MOTIONS[gravity]
    motions = list(table)
    w = np.array([table[m] for m in motions])
    w /= w.sum()

    def new_subject(taken):
        colours = [c for c in config.colours if c not in taken]
        return colours[int(rng.integers(len(colours)))], config.shapes[int(rng.integers(len(config.shapes)))]

    subject = new_subject(())
    subjects = {subject[0]: subject}
    prompts: list[str] = []
    previous = None
    while len(prompts) < n_chunks:
        if prompts and rng.random() < config.subject_switch_prob:
            if len(subjects) < config.max_objects and rng.random() < 0.5:
                subject = new_subject(subjects)
                subjects[subject[0]] = subject
            elif len(subjects) > 1:
                others = [s for s in subjects.values() if s != subject]
                subject = others[int(rng.integers(len(others)))]
        motion = previous
        while motion == previous:
            motion = motions[int(rng.choice(len(motions), p=w))]
        previous = motion
        run = int(rng.integers(1, n_chunks + 1))
        prompts += [vocab.format_caption(*subject, motion)] * run
    return prompts[:n_chunks], gravity


def generate_scheduled(seed: int, n_chunks: int, config: WorldConfig = WorldConfig(),
                       p_lookahead: float = SCHEDULE_LOOKAHEAD) -> Clip:
    """A clip scripted (`generate_from_prompts`) from a random schedule (`scheduled_prompts`).

    Training clips whose captions hold over runs of chunks, of two kinds: with probability
    ``p_lookahead`` the clip is planned over the whole schedule (a run of "moves right" starts with
    room for the whole run), otherwise chunk by chunk (``lookahead=False``: a run's later chunks
    slow down to fit the room left, what a chunk-causal generator has to do when a caption
    repeats). `generate`'s clips (a new random velocity per control) rarely show either. Up to
    ``SCHEDULE_TRIES`` schedules are drawn; if none can be scripted the clip is
    ``generate(seed, n_chunks)``. ``meta["source"]`` is ``"scheduled"`` (or ``"random"``)."""
    seed, n_chunks = _check_seed(seed), _check_chunks(n_chunks)
    if not 0 <= p_lookahead <= 1:
        raise ValueError(f"p_lookahead must be in [0, 1], got {p_lookahead!r}")
    rng = np.random.Generator(np.random.PCG64([seed, 1]))
    lookahead = bool(np.random.Generator(np.random.PCG64([seed, 3])).random() < p_lookahead)  # its own stream
    for attempt in range(SCHEDULE_TRIES):
        prompts, gravity = scheduled_prompts(rng, n_chunks, config)
        try:
            clip = generate_from_prompts(prompts, int(rng.integers(2**63)), config, gravity=gravity, max_tries=16,
                                         lookahead=lookahead)
        except ValueError:
            continue
        return replace(clip, seed=seed, meta={**clip.meta, "source": "scheduled", "attempt": attempt})
    return generate(seed, n_chunks, config)


# -------------------------------------------------------------------------------------- stream


def clip_seed(seed: int, index: int) -> int:
    """The seed of clip ``index`` of a stream started from ``seed`` (independent streams per clip)."""
    ss = np.random.SeedSequence([_check_seed(seed), _check_seed(index)])
    return int(ss.generate_state(1, dtype=np.uint64)[0])


@dataclass(frozen=True, eq=False)
class Batch:
    """A training batch: frames uint8 [B, T, H, W, 3], captions [B][K], tokens int64 [B, K, L]."""

    index: int
    seeds: list[int]
    frames: np.ndarray
    captions: list[list[str]]
    tokens: np.ndarray
    clips: list[Clip]


def make_batch(seed: int, index: int, n_chunks: int, batch: int, config: WorldConfig = WorldConfig(),
               p_scheduled: float = 0.0, p_lookahead: float = SCHEDULE_LOOKAHEAD, p_twin: float = 0.0) -> Batch:
    """Batch number ``index`` of ``stream(seed, ...)``, computed directly (random access).

    ``p_scheduled``: the probability that a clip is `generate_scheduled` (with ``p_lookahead``)
    rather than `generate`; ``p_twin``: that it is an uncaptioned twin clip (`generate`'s ``twin``),
    before either. Both are decided from the clip's seed by draws of their own, so a batch is the same
    whatever else is asked, and with ``p_twin`` 0 it is the batch of before twin clips."""
    if isinstance(batch, bool) or not isinstance(batch, (int, np.integer)) or batch < 1:
        raise ValueError(f"batch must be a positive int, got {batch!r}")
    for name, p in (("p_scheduled", p_scheduled), ("p_twin", p_twin)):
        if not 0 <= p <= 1:
            raise ValueError(f"{name} must be in [0, 1], got {p!r}")
    seeds = [clip_seed(seed, index * batch + i) for i in range(batch)]
    clips = [generate(s, n_chunks, config, twin=True) if p_twin and _drawn(s, 3, p_twin)
             else generate_scheduled(s, n_chunks, config, p_lookahead) if p_scheduled and _drawn(s, 2, p_scheduled)
             else generate(s, n_chunks, config) for s in seeds]
    captions = [c.captions for c in clips]
    tokens = np.stack([vocab.encode_batch(c) for c in captions])
    return Batch(index=index, seeds=seeds, frames=np.stack([c.frames for c in clips]),
                 captions=captions, tokens=tokens, clips=clips)


def _drawn(seed: int, stream_id: int, p: float) -> bool:
    """A draw of probability ``p`` for the clip of ``seed``, independent of the clip's own stream:
    ``stream_id`` 2 whether it is a scheduled clip, 3 whether a twin clip."""
    return bool(np.random.Generator(np.random.PCG64([seed, stream_id])).random() < p)


def stream(seed: int, n_chunks: int, batch: int, config: WorldConfig = WorldConfig(),
           start: int = 0, stop: int | None = None, p_scheduled: float = 0.0,
           p_lookahead: float = SCHEDULE_LOOKAHEAD, p_twin: float = 0.0) -> Iterator[Batch]:
    """Batches ``start, start + 1, ...`` (forever, or up to ``stop`` exclusive); resumable from any index."""
    _check_seed(seed)
    _check_chunks(n_chunks)
    if isinstance(start, bool) or not isinstance(start, (int, np.integer)) or start < 0:
        raise ValueError(f"start must be a non-negative int, got {start!r}")
    for b in itertools.count(start) if stop is None else range(start, stop):
        yield make_batch(seed, b, n_chunks, batch, config, p_scheduled, p_lookahead, p_twin)


# ------------------------------------------------------------------------------------- preview


def save_preview(clip: Clip, path: str, every: int = 4) -> None:
    """PNG contact sheet (one row per chunk, every ``every``-th frame) through matplotlib (optional)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    f = clip.config.chunk_frames
    rows = []
    for k in range(clip.n_chunks):
        fr = clip.chunk(k)[::every]
        rows.append(np.concatenate(list(np.pad(fr, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=128)), axis=1))
    sheet = np.concatenate(rows, axis=0)
    fig, ax = plt.subplots(figsize=(sheet.shape[1] / 80 + 2.5, sheet.shape[0] / 80 + 0.6))
    ax.imshow(sheet, interpolation="nearest")
    ax.set_yticks([(k + 0.5) * (clip.config.size + 2) for k in range(clip.n_chunks)])
    ax.set_yticklabels(clip.captions, fontsize=7)
    ax.set_xticks([])
    ax.set_title(f"seed {clip.seed} ({'gravity' if clip.gravity else 'no gravity'}, {clip.background}); "
                 f"every {every}th of {f} frames per chunk", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
