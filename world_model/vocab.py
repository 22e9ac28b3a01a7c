"""The closed caption vocabulary of the synthetic world, its grammar, and a word-level tokenizer.

Every caption names one subject object and what it does during one chunk (one second)::

    caption := "the" COLOUR SHAPE MOTION
    COLOUR  := red | green | blue | yellow | white | magenta
    SHAPE   := circle | square | triangle
    MOTION  := "moves" (left | right | up | down)
             | "falls" | "rises" | "rises and falls" | "stays still"
             | "bounces off the" ("left wall" | "right wall" | "ceiling" | "floor")

Token ids: ``PAD_ID`` = 0, ``BOS_ID`` = 1, ``EOS_ID`` = 2, then the words of `WORDS` in order.
There is no unknown-word id: `encode` raises a ValueError that names the unknown word and the
closest known words (difflib), so a typo in a prompt is reported rather than silently ignored.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

COLOURS = ("red", "green", "blue", "yellow", "white", "magenta")
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = ("left", "right", "up", "down")
WALLS = ("left wall", "right wall", "ceiling", "floor")  # index + 1 is the bounce code in tracks
MOTIONS = (
    tuple(f"moves {d}" for d in DIRECTIONS)
    + ("falls", "rises", "rises and falls", "stays still")
    + tuple(f"bounces off the {w}" for w in WALLS)
)
#: motions that only happen under gravity / never happen under gravity (used by the planner)
GRAVITY_MOTIONS = ("falls", "rises", "rises and falls")
NO_GRAVITY_MOTIONS = ("moves up", "moves down", "stays still")

SPECIALS = ("<pad>", "<bos>", "<eos>")
NULL_CAPTION = ""  # no caption (BOS EOS): dropped-out chunks, twin clips, guidance's unconditional branch
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2


def _words() -> tuple[str, ...]:
    seen: dict[str, None] = {}
    for w in ("the", *COLOURS, *SHAPES):
        seen.setdefault(w, None)
    for m in MOTIONS:
        for w in m.split():
            seen.setdefault(w, None)
    return tuple(seen)


WORDS: tuple[str, ...] = _words()
VOCAB: tuple[str, ...] = SPECIALS + WORDS
VOCAB_SIZE = len(VOCAB)
WORD_TO_ID = {w: i for i, w in enumerate(VOCAB)}
#: longest caption in words ("the red circle bounces off the left wall") and in tokens with BOS/EOS
MAX_CAPTION_WORDS = 3 + max(len(m.split()) for m in MOTIONS)
MAX_CAPTION_TOKENS = MAX_CAPTION_WORDS + 2

GRAMMAR = (
    'caption := "the" COLOUR SHAPE MOTION; '
    f"COLOUR := {' | '.join(COLOURS)}; SHAPE := {' | '.join(SHAPES)}; "
    f"MOTION := {' | '.join(MOTIONS)}"
)

_PUNCT = re.compile(r"[.,;:!?\"']")


def split_words(text: str) -> list[str]:
    """Lower-case, drop punctuation, split on whitespace."""
    if not isinstance(text, str):
        raise TypeError(f"caption must be a str, got {type(text).__name__}")
    return _PUNCT.sub(" ", text).lower().split()


def normalize(text: str) -> str:
    """The canonical form of a caption: lower case, single spaces, no punctuation."""
    return " ".join(split_words(text))


def unknown_word_error(word: str, text: str) -> ValueError:
    close = difflib.get_close_matches(word, WORDS, n=3, cutoff=0.5)
    hint = f"closest known words: {', '.join(close)}" if close else "no close known word"
    return ValueError(
        f"unknown word {word!r} in caption {text!r} ({hint}); the vocabulary is: {', '.join(WORDS)}"
    )


def encode(text: str, bos: bool = True, eos: bool = True) -> list[int]:
    """Token ids of a caption; raises ValueError naming any unknown word and its closest known words."""
    ids = []
    for w in split_words(text):
        i = WORD_TO_ID.get(w)
        if i is None or i < len(SPECIALS):
            raise unknown_word_error(w, text)
        ids.append(i)
    return ([BOS_ID] if bos else []) + ids + ([EOS_ID] if eos else [])


def decode(ids: Iterable[int], skip_special: bool = True) -> str:
    """The text of token ids (PAD/BOS/EOS dropped unless ``skip_special`` is False)."""
    out = []
    for i in ids:
        i = int(i)
        if not 0 <= i < VOCAB_SIZE:
            raise ValueError(f"token id {i} out of range [0, {VOCAB_SIZE})")
        if skip_special and i < len(SPECIALS):
            continue
        out.append(VOCAB[i])
    return " ".join(out)


def encode_batch(texts: Sequence[str], length: int | None = None) -> np.ndarray:
    """int64 [len(texts), length] of BOS + ids + EOS, right-padded with PAD_ID.

    ``length`` defaults to MAX_CAPTION_TOKENS; a caption longer than ``length`` is an error.
    """
    length = MAX_CAPTION_TOKENS if length is None else int(length)
    out = np.full((len(texts), length), PAD_ID, dtype=np.int64)
    for r, t in enumerate(texts):
        ids = encode(t)
        if len(ids) > length:
            raise ValueError(f"caption {t!r} has {len(ids)} tokens, more than length={length}")
        out[r, : len(ids)] = ids
    return out


@dataclass(frozen=True)
class Caption:
    """A parsed caption: the subject (colour, shape) and its motion phrase (one of MOTIONS)."""

    colour: str
    shape: str
    motion: str

    @property
    def text(self) -> str:
        return format_caption(self.colour, self.shape, self.motion)

    @property
    def subject(self) -> tuple[str, str]:
        return self.colour, self.shape


def format_caption(colour: str, shape: str, motion: str) -> str:
    if colour not in COLOURS:
        raise ValueError(f"unknown colour {colour!r}; colours: {', '.join(COLOURS)}")
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; shapes: {', '.join(SHAPES)}")
    if motion not in MOTIONS:
        raise ValueError(f"unknown motion {motion!r}; motions: {', '.join(MOTIONS)}")
    return f"the {colour} {shape} {motion}"


def parse_caption(text: str) -> Caption:
    """Parse a caption of the closed grammar; unknown words or a wrong word order raise ValueError."""
    words = split_words(text)
    for w in words:
        if w not in WORD_TO_ID or WORD_TO_ID[w] < len(SPECIALS):
            raise unknown_word_error(w, text)
    motion = " ".join(words[3:])
    if len(words) < 4 or words[0] != "the" or words[1] not in COLOURS or words[2] not in SHAPES or motion not in MOTIONS:
        raise ValueError(f"caption {text!r} does not follow the grammar: {GRAMMAR}")
    return Caption(words[1], words[2], motion)


#: the wall a subject moving in each direction runs into (DIRECTIONS[i] -> WALLS[i])
WALL_AHEAD = dict(zip(DIRECTIONS, WALLS))
#: motions that start the way "moves X" does and then do something else (the caption rule's near
#: misses): the bounce off the wall ahead, and vertically the gravity motions that start towards X
_GRAVITY_NEAR_MISSES = {"up": ("rises", "rises and falls"), "down": ("falls",)}
NEAR_MISSES = {d: (f"bounces off the {WALL_AHEAD[d]}",) + _GRAVITY_NEAR_MISSES.get(d, ()) for d in DIRECTIONS}


def near_miss_captions(text: str) -> tuple[str, ...]:
    """The captions that start the way ``text`` does and end otherwise: generation's default negative prompts.

    For "moves X": the bounce off the wall ahead (the caption rule calls a chunk whose subject reaches
    that wall a bounce, never "moves X"), and vertically the gravity motions that start towards X
    ("moves up" -> "bounces off the ceiling", "rises", "rises and falls"; "moves down" -> "bounces
    off the floor", "falls"). Empty for the other motions."""
    c = parse_caption(text)
    if not c.motion.startswith("moves "):
        return ()
    return tuple(format_caption(c.colour, c.shape, m) for m in NEAR_MISSES[c.motion.split()[1]])
