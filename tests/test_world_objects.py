"""The objects a stream finds and watches (`maskc.world_model.objects`) for also="auto"."""

from __future__ import annotations

import numpy as np
import pytest

from maskc.world_model import data
from maskc.world_model import objects as O


@pytest.mark.parametrize("shape", ["circle", "square", "triangle"])
def test_classify_shape_of_drawn_shapes(shape):
    """Every shape the simulator draws, at every size it uses and at sub-pixel offsets, is told apart."""
    lo, hi = data.WorldConfig().size_range
    for s in np.linspace(lo, hi, 8):
        for dx in (0.0, 0.3, 0.5, 0.8):
            mask = data._object_masks(np.array([30.0 + dx]), np.array([29.0 + dx / 2]), shape, float(s), 64)[0]
            assert O.classify_shape(mask) == shape, (shape, s, dx)


def test_classify_shape_bad_masks():
    with pytest.raises(ValueError, match="non-empty 2-D mask"):
        O.classify_shape(np.zeros((8, 8), bool))
    with pytest.raises(ValueError, match="non-empty 2-D mask"):
        O.classify_shape(np.ones((2, 8, 8), bool))


def test_find_objects_on_simulator_frames():
    """The objects of held-out first frames (colour and shape), against the simulator's own: all but
    the rare one that another covers."""
    right = total = 0
    for seed in range(500, 560):
        clip = data.generate(seed, 1)
        truth = {(str(c), str(s)) for c, s in zip(clip.tracks["colour"], clip.tracks["shape"])}
        found = O.find_objects(clip.frames[0])
        assert len({c for c, _ in found}) == len(found)  # one object per colour
        total += len(truth)
        right += len(truth & set(found))
    assert right >= 0.97 * total
    with pytest.raises(ValueError, match=r"image must be uint8 \[H, W, 3\]"):
        O.find_objects(np.zeros((64, 64), np.uint8))


def test_chunk_motions_follow_the_caption_rule():
    """The motion read from each object's frames is the simulator's caption of it for most objects
    (the tracker's agreement with the caption rule), and an object that is not there is left out."""
    agree = n = 0
    for seed in range(600, 640):
        clip = data.generate(seed, 2)
        objects = O.find_objects(clip.frames[0])
        for k, caps in enumerate(data.object_captions(clip.tracks)):
            motions = O.chunk_motions(clip.frames[k * 24:(k + 1) * 24], objects)
            for cap in caps:
                c = data.vocab.parse_caption(cap)
                if (c.colour, c.shape) in motions:
                    n += 1
                    agree += motions[(c.colour, c.shape)] == c.motion
    assert n > 100 and agree >= 0.85 * n
    clip = data.generate(600, 1)
    absent = next(c for c in data.PALETTE if c not in clip.tracks["colour"])
    assert O.chunk_motions(clip.frames, [(absent, "circle")]) == {}
    assert O.chunk_motions(clip.frames, []) == {}


def test_keep_captions_leave_out_the_named_object():
    motions = {("red", "circle"): "moves left", ("blue", "square"): "falls", ("white", "triangle"): "stays still"}
    assert O.keep_captions(motions, "the red circle moves right") == (
        "the blue square falls", "the white triangle stays still")
    # a prompt naming a colour of the scene names that object, whatever shape it says
    assert O.keep_captions(motions, "the blue circle moves up") == (
        "the red circle moves left", "the white triangle stays still")
    assert O.keep_captions({}, "the red circle moves right") == ()
    with pytest.raises(ValueError, match="does not follow the grammar"):
        O.keep_captions(motions, "the red circle")


def test_generation_reads_frames_without_the_evaluation_module():
    """The stream's own also prompts read frames through `tracking`, not `evaluate` (which runs models,
    spawns memory probes and imports the sampler): generation does not load the evaluation."""
    import subprocess
    import sys

    code = ("import sys, maskc.world_model.generate, maskc.world_model.objects, maskc.world_model.tracking; "
            "assert 'maskc.world_model.evaluate' not in sys.modules, 'evaluate was imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
    from maskc.world_model import evaluate, tracking

    assert evaluate.track_by_colour is tracking.track_by_colour  # re-exported: evaluate's API is unchanged
