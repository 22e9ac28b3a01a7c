"""The objects of a scene as generation sees them: what the picture holds and what each object last did.

Generation keeps the objects a caption does not name when it is told what each of them does
(`generate`'s *also prompts*; docs/benchmarks.md, session 32). Session 33 measured that the motion
told need not be the current one: the motion each object showed three chunks earlier, or in the
first chunk, keeps them as well as the true one, while one made-up motion for every object does
not. So a stream can find its own also prompts (``generate_chunks(..., also="auto")``):

- `find_objects`: the objects of the given image (or of a prefix's last frame), by colour (objects
  of this world have distinct colours) and by shape (`classify_shape`: a triangle, apex up, has far
  fewer pixels in the top half of its bounding box than in the bottom half; a square fills its box);
- `chunk_motions`: the motion of each object over one finished chunk's frames, by the caption rule
  of the tracker the evaluation uses too (`tracking.track_motion`, here over every frame of the chunk);
- `keep_captions`: a chunk's also prompts, one caption per object its prompt does not name, with the
  motion that object last showed (an object that has vanished keeps its last motion: it is the one
  to bring back).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from . import tracking
from . import vocab
from .data import WorldConfig

#: a blob is a triangle when the top half of its bounding box holds less than this fraction of the
#: pixels of the bottom half, else a square when it fills at least SQUARE_FILL of the box, else a circle.
#: Measured on the simulator's masks (300 first frames, and every size it draws at sub-pixel offsets):
#: triangles 0.25-0.50, circles 0.74-1.36, squares 1.0; fill: circles 0.65-0.94, squares 1.0.
TRIANGLE_TOP = 0.6
SQUARE_FILL = 0.97

Object = tuple[str, str]  # (colour, shape)


def classify_shape(mask: np.ndarray) -> str:
    """The shape of one object's pixels (bool [H, W], not empty), from its bounding box (see `TRIANGLE_TOP`)."""
    mask = np.asarray(mask, bool)
    if mask.ndim != 2 or not mask.any():
        raise ValueError(f"classify_shape needs a non-empty 2-D mask, got shape {list(mask.shape)} with "
                         f"{int(mask.sum())} pixels")
    rows, cols = np.nonzero(mask)
    box = mask[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    half = box.shape[0] // 2
    if box[:half].sum() < TRIANGLE_TOP * box[box.shape[0] - half:].sum():
        return "triangle"
    return "square" if box.mean() >= SQUARE_FILL else "circle"


def find_objects(image, tol: float = tracking.DEFAULT_TOL,
                 min_pixels: int = tracking.DEFAULT_MIN_PIXELS) -> tuple[Object, ...]:
    """The objects of an image (uint8 [H, W, 3]): ``(colour, shape)`` of every palette colour it shows."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"image must be uint8 [H, W, 3], got shape {list(image.shape)}")
    colours = tracking.present_colours(image, tol, min_pixels)
    masks = tracking.colour_masks(image[None], colours, tol)
    return tuple((c, classify_shape(masks[c][0])) for c in colours)


def chunk_motions(frames, objects: Sequence[Object], config: WorldConfig = WorldConfig(),
                  tol: float = tracking.DEFAULT_TOL) -> dict[Object, str]:
    """The motion phrase (`vocab.MOTIONS`) of each object over one chunk's frames (uint8 [F, H, W, 3]),
    tracked by its colour; objects visible in too few frames to tell are left out."""
    if not objects:
        return {}
    tracks = tracking.track_by_colour(frames, [c for c, _ in objects], tol)
    out = {}
    for obj in objects:
        motion = tracking.track_motion(tracks[obj[0]], slice(None), config)  # every frame, covered or not
        if motion is not None:
            out[obj] = motion
    return out


def keep_captions(motions: Mapping[Object, str], prompt: str) -> tuple[str, ...]:
    """A chunk's also prompts: the caption of every object in ``motions`` but the one ``prompt`` names
    (by colour: a prompt naming a colour of the scene names that object), with its motion."""
    named = vocab.parse_caption(prompt).colour
    return tuple(vocab.format_caption(c, s, m) for (c, s), m in motions.items() if c != named)
