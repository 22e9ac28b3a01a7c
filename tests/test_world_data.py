"""The synthetic world of the world model: determinism, physics, captions, tracking, prompts, vocabulary."""

import time

import numpy as np
import pytest

from maskc.world_model import data as D
from maskc.world_model import vocab as V

CFG = D.WorldConfig()
F = CFG.chunk_frames
SEEDS = range(24)


@pytest.fixture(scope="module")
def clips():
    return [D.generate(s, 5) for s in SEEDS]


def _same_clip(a, b):
    assert np.array_equal(a.frames, b.frames)
    assert a.captions == b.captions
    assert a.tracks.keys() == b.tracks.keys()
    for k in a.tracks:
        assert np.array_equal(a.tracks[k], b.tracks[k]), k
    assert (a.gravity, a.background) == (b.gravity, b.background)


# ------------------------------------------------------------------------------ determinism


def test_same_seed_same_clip_different_seeds_differ():
    _same_clip(D.generate(123, 3), D.generate(123, 3))
    a, b = D.generate(1, 3), D.generate(2, 3)
    assert not np.array_equal(a.frames, b.frames)
    assert not np.array_equal(a.tracks["x"][:, 0], b.tracks["x"][:, 0])


def test_shapes_and_dtypes(clips):
    for c in clips:
        t, n = 5 * F, c.n_objects
        assert c.frames.shape == (t, 64, 64, 3) and c.frames.dtype == np.uint8
        assert c.n_chunks == 5 and len(c.captions) == 5 and all(isinstance(s, str) for s in c.captions)
        assert CFG.min_objects <= n <= CFG.max_objects
        for k in ("x", "y", "vx", "vy", "size", "visible_frac"):
            assert c.tracks[k].shape == (t, n) and c.tracks[k].dtype == np.float32, k
        assert c.tracks["visible"].shape == (t, n) and c.tracks["visible"].dtype == bool
        assert c.tracks["bounce"].shape == (t, n) and c.tracks["bounce"].dtype == np.int8
        assert c.tracks["colour"].shape == (n,) and c.tracks["shape"].shape == (n,)
        assert len(set(c.tracks["colour"])) == n  # one colour per object
        assert c.tracks["subject"].shape == (5,) and c.tracks["control"].shape == (5, n)
        assert c.chunk(4).shape == (F, 64, 64, 3)
        assert c.background in D.BACKGROUNDS
    # both worlds and all backgrounds occur in a few seeds
    assert {c.gravity for c in clips} == {True, False}
    assert len({c.background for c in clips}) >= 3


def test_bad_inputs():
    for bad in (-1, 1.5, "3", True):
        with pytest.raises(ValueError, match="seed"):
            D.generate(bad, 2)
    for bad in (0, -2, 2.0):
        with pytest.raises(ValueError, match="n_chunks"):
            D.generate(0, bad)
    with pytest.raises(ValueError, match="max_objects"):
        D.WorldConfig(max_objects=9)
    with pytest.raises(ValueError, match="colour"):
        D.WorldConfig(colours=("red", "purple"))


def test_generation_speed():
    D.generate(0, 1)
    best = min(_timed(lambda s=s: D.generate(s, 16)) for s in range(3))
    assert best < 0.5, f"a 16-chunk clip took {best:.3f} s"


def _timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


# ---------------------------------------------------------------------------------- physics


def test_tracks_obey_the_physics(clips):
    """Velocities are the position differences; gravity changes vy by g per frame; hits are at walls."""
    for c in clips:
        tr, g = c.tracks, (CFG.gravity if c.gravity else 0.0)
        x, y, vx, vy, hit = (tr[k].astype(np.float64) for k in ("x", "y", "vx", "vy", "bounce"))
        for i in range(c.n_objects):
            xmin, xmax, ymin, ymax = tr["bounds"][i]
            assert np.all((x[:, i] >= xmin - 1e-3) & (x[:, i] <= xmax + 1e-3))
            assert np.all((y[:, i] >= ymin - 1e-3) & (y[:, i] <= ymax + 1e-3))
            for t in range(c.n_frames - 1):
                resting = g > 0 and vy[t, i] == 0 and abs(y[t, i] - ymax) < 1e-3
                same_chunk = (t + 1) % F != 0
                if hit[t, i] == 0:
                    assert abs(x[t + 1, i] - x[t, i] - vx[t, i]) < 1e-3
                    dy = vy[t, i] + (0 if resting else g / 2)
                    assert abs(y[t + 1, i] - y[t, i] - dy) < 1e-3
                    if same_chunk:
                        assert abs(vx[t + 1, i] - vx[t, i]) < 1e-5
                        assert abs(vy[t + 1, i] - vy[t, i] - (0 if resting else g)) < 1e-4
                    continue
                code = hit[t, i]
                reach = np.hypot(vx[t, i], vy[t, i]) + g + 1e-3
                if code in (D.LEFT_WALL, D.RIGHT_WALL):
                    wall, pos = (xmin, x) if code == D.LEFT_WALL else (xmax, x)
                    assert (vx[t, i] < 0) == (code == D.LEFT_WALL)
                    if same_chunk:
                        assert vx[t + 1, i] == -vx[t, i]
                else:
                    wall, pos = (ymin, y) if code == D.CEILING else (ymax, y)
                    assert (vy[t, i] < 0) == (code == D.CEILING)
                assert min(abs(pos[t, i] - wall), abs(pos[t + 1, i] - wall)) <= reach


def test_captions_match_the_tracks(clips):
    """Recompute each chunk's motion from the tracks (positions and hit events) and check its caption."""
    seen = set()
    for c in clips:
        assert D.captions_from_tracks(c.tracks, c.config) == c.captions
        tr = c.tracks
        for k, cap in enumerate(c.captions):
            s = int(tr["subject"][k])
            parsed = V.parse_caption(cap)
            assert parsed.text == cap
            assert (parsed.colour, parsed.shape) == (tr["colour"][s], tr["shape"][s])
            sl = slice(k * F, (k + 1) * F)
            x, y = tr["x"][sl, s].astype(np.float64), tr["y"][sl, s].astype(np.float64)
            vx, vy = tr["vx"][sl, s].astype(np.float64), tr["vy"][sl, s].astype(np.float64)
            hits = tr["bounce"][sl, s]
            m = parsed.motion
            seen.add(m)
            if m.startswith("bounces off the "):
                first = int(hits[np.flatnonzero(hits)[0]])
                assert V.WALLS[first - 1] == m[len("bounces off the "):]
                continue
            assert not hits.any(), cap
            dx, dy = x[-1] - x[0], y[-1] - y[0]
            if m == "stays still":
                assert np.hypot(vx, vy).mean() < CFG.still_thresh and np.hypot(dx, dy) < 0.2 * F
            elif m in ("moves left", "moves right"):
                assert (dx < 0) == (m == "moves left") and abs(dx) > 0.2 * F
                assert abs(vx.mean()) >= abs(vy.mean())
            elif m in ("moves up", "moves down"):
                assert (dy < 0) == (m == "moves up") and abs(dy) > 0.1 * F
                assert abs(vy.mean()) > abs(vx.mean())
                assert not c.gravity or np.all(vy == 0)  # no vertical free motion under gravity
            elif m == "falls":
                assert c.gravity and dy > 0.2 * F and np.all(np.diff(vy) > 0)
            elif m == "rises":
                assert c.gravity and dy < -0.2 * F and np.all(np.diff(vy) > 0)
            elif m == "rises and falls":
                assert c.gravity and 0 < int(np.argmin(y)) < F - 1  # the apex is inside the chunk
            else:
                raise AssertionError(f"unexpected motion {m!r}")
    assert len(seen) >= 8, seen


def test_caption_for_chunk_decision_list():
    c = CFG
    n = F
    z = np.zeros(n)
    cap = lambda vx, vy, hit=None: D.motion_for_chunk(vx, vy, z.astype(np.int8) if hit is None else hit, c)
    assert cap(z - 1, z + 0.3) == "moves left"
    assert cap(z + 1, z - 0.3) == "moves right"
    assert cap(z + 0.2, z - 0.9) == "moves up"
    assert cap(z, z + 0.6) == "moves down"
    assert cap(z + 0.05, z) == "stays still"
    grav = np.arange(n) * c.gravity
    assert cap(z, 0.2 + grav) == "falls"
    assert cap(z, -1.5 + grav) == "rises"
    assert cap(z, -grav.mean() + grav) == "rises and falls"
    assert cap(z + 1.0, -grav.mean() + grav) == "moves right"
    hit = np.zeros(n, np.int8)
    hit[[5, 9]] = [D.FLOOR, D.LEFT_WALL]
    assert cap(z - 1, z, hit) == "bounces off the floor"
    assert D.caption_for_chunk("red", "circle", z - 1, z, None, c) == "the red circle moves left"
    with pytest.raises(ValueError, match="colour"):
        D.caption_for_chunk("purple", "circle", z, z)


def test_inferred_bounces_mostly_agree(clips):
    """Without hit events (e.g. tracks measured from video) the caption mostly agrees with the truth."""
    agree = total = 0
    for c in clips:
        tr = c.tracks
        for k, cap in enumerate(c.captions):
            s, sl = int(tr["subject"][k]), slice(k * F, (k + 1) * F)
            m = D.motion_for_chunk(tr["vx"][sl, s], tr["vy"][sl, s], None, c.config)
            agree += cap.endswith(m)
            total += 1
    assert agree >= 0.85 * total, (agree, total)


# --------------------------------------------------------------------------------- rendering


def _track_by_colour(frames, colour, tol=30):
    m = np.all(np.abs(frames.astype(np.int16) - np.array(D.PALETTE[colour], np.int16)) <= tol, axis=-1)
    cols = m.sum(axis=1, dtype=np.float64)  # [T, W]
    rows = m.sum(axis=2, dtype=np.float64)  # [T, H]
    cnt = cols.sum(axis=1)
    cx = cols @ (np.arange(frames.shape[2]) + 0.5) / np.maximum(cnt, 1)
    cy = rows @ (np.arange(frames.shape[1]) + 0.5) / np.maximum(cnt, 1)
    return cx, cy, cnt


def test_objects_tracked_by_colour_are_at_the_ground_truth(clips):
    worst = 0.0
    for c in clips:
        tr = c.tracks
        for i in range(c.n_objects):
            cx, cy, cnt = _track_by_colour(c.frames, str(tr["colour"][i]))
            vis = tr["visible"][:, i]
            assert np.all(cnt[vis] > 0)
            err = np.hypot(cx - tr["x"][:, i], cy - tr["y"][:, i])[vis]
            worst = max(worst, float(err.max(initial=0)))
        # the background never looks like an object: every pixel is an object colour or far from all
        dark = c.frames.max(axis=-1) <= CFG.background_max
        objects = np.zeros(dark.shape, bool)
        for col in set(tr["colour"]):
            objects |= np.all(c.frames == np.array(D.PALETTE[col], np.uint8), axis=-1)
        assert np.all(dark | objects)
    assert worst <= 1.5, worst


def test_palette_is_well_separated():
    cols = np.array(list(D.PALETTE.values()), float)
    d = np.linalg.norm(cols[:, None] - cols[None], axis=-1)
    assert d[~np.eye(len(cols), dtype=bool)].min() > 150
    # the farthest a background pixel (all channels <= background_max) can get to a colour's region
    assert min(np.linalg.norm(np.maximum(c - CFG.background_max, 0)) for c in cols) >= 120


# ----------------------------------------------------------------------------------- prompts

PROMPT_CASES = [
    ["the red circle moves left", "the red circle bounces off the left wall", "the red circle moves right",
     "the red circle stays still", "the red circle moves down", "the red circle moves up"],
    ["the blue square falls", "the blue square bounces off the floor", "the blue square rises",
     "the blue square rises and falls", "the blue square moves right"],
    ["the green triangle moves up", "the white square moves right", "the green triangle bounces off the ceiling",
     "the white square bounces off the right wall", "the magenta circle stays still"],
    ["the yellow triangle moves right"] * 4 + ["the yellow triangle bounces off the right wall"],
]


@pytest.mark.parametrize("case", range(len(PROMPT_CASES)))
def test_generate_from_prompts_follows_the_prompts(case):
    prompts = PROMPT_CASES[case]
    clip = D.generate_from_prompts(prompts, seed=case)
    assert clip.captions == prompts
    assert clip.n_frames == len(prompts) * F
    assert D.captions_from_tracks(clip.tracks, clip.config) == prompts
    subjects = {p.split()[1] + " " + p.split()[2] for p in prompts}
    assert subjects <= set(clip.object_names)
    assert clip.gravity == any(V.parse_caption(p).motion in V.GRAVITY_MOTIONS for p in prompts)
    again = D.generate_from_prompts(prompts, seed=case)
    _same_clip(clip, again)


def test_generate_from_prompts_normalises_and_schedules():
    sched = D.prompt_schedule([("The red circle moves left.", 2), ("the red circle  stays still", 1)])
    assert sched == ["the red circle moves left"] * 2 + ["the red circle stays still"]
    clip = D.generate_from_prompts(["The Red Circle moves LEFT."], seed=3, n_objects=1)
    assert clip.captions == ["the red circle moves left"] and clip.n_objects == 1


@pytest.mark.parametrize(
    "prompts, match",
    [
        (["the red circel moves left"], r"unknown word 'circel'.*closest known words: circle.*vocabulary"),
        (["the red circle jumps"], r"unknown word 'jumps'"),
        (["the red circle moves"], "grammar"),
        (["red the circle moves left"], "grammar"),
        (["the red circle falls", "the red circle moves up"], "gravity"),
        (["the red circle moves left", "the red square moves left"], "distinct colours"),
        ([f"the {c} circle stays still" for c in V.COLOURS[:4]], "max_objects"),
        (["the red circle moves left"] * 12, "could not script"),
        ([], "at least one"),
        ("the red circle moves left", "list"),
    ],
)
def test_generate_from_prompts_errors(prompts, match):
    with pytest.raises(ValueError, match=match):
        D.generate_from_prompts(prompts, seed=0)


# ------------------------------------------------------------------------- scheduled training clips


def _runs(prompts):
    """[(prompt, length)] of consecutive equal prompts."""
    out = []
    for p in prompts:
        if out and out[-1][0] == p:
            out[-1] = (p, out[-1][1] + 1)
        else:
            out.append((p, 1))
    return out


def test_scheduled_prompts_are_runs_of_valid_captions():
    rng = np.random.default_rng(0)
    lengths, gravities, subjects, motions = [], [], [], set()
    for _ in range(400):
        prompts, gravity = D.scheduled_prompts(rng, 4, CFG)
        assert len(prompts) == 4
        parsed = [V.parse_caption(p) for p in prompts]
        assert all(p == q.text for p, q in zip(prompts, parsed))  # normalised captions
        for q in parsed:
            assert q.motion in D.SCHEDULE_MOTIONS[gravity]
            assert q.motion not in (V.NO_GRAVITY_MOTIONS if gravity else V.GRAVITY_MOTIONS)
        runs = _runs(prompts)
        # a run boundary changes the motion (or the subject, which may keep the motion)
        for (a, _), (b, _) in zip(runs, runs[1:]):
            assert a != b
        colours = {q.colour: q.shape for q in parsed}
        assert len(colours) <= CFG.max_objects
        assert all(colours[q.colour] == q.shape for q in parsed)  # one shape per colour
        lengths += [n for _, n in runs[:-1]]  # the last run is cut at n_chunks
        gravities.append(gravity)
        subjects.append(len(colours))
        motions |= {q.motion for q in parsed}
    assert set(lengths) == {1, 2, 3}
    assert 0.2 < np.mean(gravities) < 0.4  # gravity_prob 0.3
    assert max(subjects) > 1 and np.mean(np.array(subjects) == 1) > 0.5
    assert motions == set(V.MOTIONS)
    with pytest.raises(ValueError, match="n_chunks"):
        D.scheduled_prompts(rng, 0, CFG)


def test_scheduled_clips_follow_their_schedule_and_leave_room():
    room = {"moves left": lambda x, b: x[0] - b[0], "moves right": lambda x, b: b[1] - x[0],
            "moves up": lambda x, b: x[1] - b[2], "moves down": lambda x, b: b[3] - x[1]}
    repeats = 0
    for seed in range(40):
        clip = D.generate_scheduled(seed, 4, CFG)
        assert clip.meta["source"] == "scheduled" and clip.seed == seed
        assert clip.captions == clip.meta["prompts"] == D.captions_from_tracks(clip.tracks, CFG)
        assert clip.frames.shape == (4 * F, 64, 64, 3)
        _same_clip(clip, D.generate_scheduled(seed, 4, CFG))
        tr = clip.tracks
        for k in range(3):
            a, b = clip.captions[k], clip.captions[k + 1]
            motion = V.parse_caption(a).motion
            if a == b and motion in room:  # the run continues: the chunk ends with room to go on
                s = int(tr["subject"][k])
                end = (float(tr["x"][(k + 1) * F - 1, s]), float(tr["y"][(k + 1) * F - 1, s]))
                assert room[motion](end, [float(v) for v in tr["bounds"][s]]) > 0
                repeats += 1
    assert repeats >= 5
    assert not np.array_equal(D.generate_scheduled(1, 4, CFG).frames, D.generate_scheduled(2, 4, CFG).frames)


def test_planning_without_lookahead_slows_down_within_a_run():
    # chunk by chunk: the first chunk of a run is drawn for itself, later ones fit the room left
    prompts = ["the red circle moves right"] * 3
    speeds = {True: [], False: []}
    for seed in range(30):
        for lookahead in (True, False):
            clip = D.generate_from_prompts(prompts, seed, CFG, gravity=False, lookahead=lookahead)
            assert clip.captions == prompts and clip.meta["lookahead"] is lookahead
            s = int(clip.tracks["subject"][0])
            vx = clip.tracks["vx"][:, s]
            speeds[lookahead].append([float(vx[k * F:(k + 1) * F].mean()) for k in range(3)])
    ahead, myopic = np.array(speeds[True]), np.array(speeds[False])
    assert myopic[:, 0].mean() > 1.3 * ahead[:, 0].mean()  # no room kept for the run: faster at first
    assert (myopic[:, 1] < 0.7 * myopic[:, 0]).mean() > 0.3  # ... then slower
    with pytest.raises(ValueError, match="p_lookahead"):
        D.generate_scheduled(0, 2, CFG, p_lookahead=2.0)
    kinds = {D.generate_scheduled(s, 2, CFG, p_lookahead=0.5).meta["lookahead"] for s in range(12)}
    assert kinds == {True, False}
    assert all(D.generate_scheduled(s, 2, CFG).meta["lookahead"] for s in range(6))  # default 1.0
    # the choice has its own stream: a clip planned with lookahead is the same clip at any p_lookahead
    for s in range(12):
        clip = D.generate_scheduled(s, 2, CFG, p_lookahead=0.5)
        if clip.meta["lookahead"]:
            _same_clip(clip, D.generate_scheduled(s, 2, CFG))


def test_scheduled_clip_falls_back_to_a_random_clip(monkeypatch):
    def impossible(*a, **k):
        raise ValueError("could not script")

    monkeypatch.setattr(D, "generate_from_prompts", impossible)
    clip = D.generate_scheduled(5, 3, CFG)
    _same_clip(clip, D.generate(5, 3, CFG))
    assert clip.meta["source"] == "random"


def test_make_batch_mixes_scheduled_clips():
    plain = D.make_batch(4, 1, 2, 12)
    assert all(c.meta["source"] == "random" for c in plain.clips)
    mixed = D.make_batch(4, 1, 2, 12, p_scheduled=0.5)
    kinds = [c.meta["source"] for c in mixed.clips]
    assert 0 < kinds.count("scheduled") < 12
    assert mixed.seeds == plain.seeds
    for c, p, seed in zip(mixed.clips, plain.clips, mixed.seeds):  # the random ones are the same clips
        if c.meta["source"] == "random":
            _same_clip(c, p)
        else:
            _same_clip(c, D.generate_scheduled(seed, 2, CFG))
    every = D.make_batch(4, 1, 2, 12, p_scheduled=1.0)
    assert all(c.meta["source"] == "scheduled" for c in every.clips)
    again = next(D.stream(4, 2, 12, start=1, p_scheduled=0.5))
    assert np.array_equal(again.frames, mixed.frames) and again.captions == mixed.captions
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="p_scheduled"):
            D.make_batch(4, 1, 2, 12, p_scheduled=bad)


def test_twin_clips_draw_one_object_twice_and_are_uncaptioned():
    for seed in range(12):
        c = D.generate(seed, 3, CFG, twin=True)
        tr = c.tracks
        assert c.n_objects >= 2 and c.meta["source"] == "twin"
        assert c.captions == [V.NULL_CAPTION] * 3
        assert (tr["colour"][-1], tr["shape"][-1]) == (tr["colour"][0], tr["shape"][0])
        assert np.array_equal(tr["size"][:, -1], tr["size"][:, 0])
        assert len(set(tr["colour"][:-1])) == c.n_objects - 1  # only the copy repeats a colour
        assert np.array_equal(tr["control"][:, -1], tr["control"][:, 0])
        for k in range(3):  # given the same velocity at every chunk start, placed elsewhere
            t = k * F
            assert (tr["vx"][t, -1], tr["vy"][t, -1]) == (tr["vx"][t, 0], tr["vy"][t, 0])
        assert (tr["x"][0, -1], tr["y"][0, -1]) != (tr["x"][0, 0], tr["y"][0, 0])
        # the copy is drawn: where both show whole, their colour covers twice one object's pixels
        if tr["visible_frac"][0, 0] == 1.0:  # the first object uncovered (the copy is drawn last)
            both = sum(D._object_masks(tr["x"][:1, i], tr["y"][:1, i], tr["shape"][i], tr["size"][0, i], CFG.size).sum()
                       for i in (0, -1))
            assert (c.frames[0] == D.PALETTE[str(tr["colour"][0])]).all(-1).sum() == both
        _same_clip(c, D.generate(seed, 3, CFG, twin=True))
    with pytest.raises(ValueError, match="max_objects >= 2"):
        D.generate(0, 1, D.WorldConfig(max_objects=1), twin=True)


def test_make_batch_mixes_twin_clips_with_null_captions():
    plain = D.make_batch(4, 1, 2, 16)
    mixed = D.make_batch(4, 1, 2, 16, p_twin=0.4, p_scheduled=0.5)
    kinds = [c.meta["source"] for c in mixed.clips]
    assert 0 < kinds.count("twin") < 16 and "scheduled" in kinds
    null = V.encode_batch([V.NULL_CAPTION], length=mixed.tokens.shape[-1])[0]
    for c, p, seed, tok in zip(mixed.clips, plain.clips, mixed.seeds, mixed.tokens):
        if c.meta["source"] == "twin":
            _same_clip(c, D.generate(seed, 2, CFG, twin=True))
            assert (tok == null).all()
        elif c.meta["source"] == "random":  # p_twin draws its own numbers: the other clips are unchanged
            _same_clip(c, p)
    assert np.array_equal(D.make_batch(4, 1, 2, 16, p_twin=0.0).frames, plain.frames)
    assert all(c.meta["source"] == "twin" for c in D.make_batch(4, 1, 2, 5, p_twin=1.0).clips)
    again = next(D.stream(4, 2, 16, start=1, p_twin=0.4, p_scheduled=0.5))
    assert np.array_equal(again.frames, mixed.frames) and again.captions == mixed.captions
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="p_twin"):
            D.make_batch(4, 1, 2, 12, p_twin=bad)


# ---------------------------------------------------------------------------------- vocabulary


def test_vocabulary_round_trip():
    assert (V.PAD_ID, V.BOS_ID, V.EOS_ID) == (0, 1, 2)
    assert V.VOCAB[:3] == V.SPECIALS and len(set(V.VOCAB)) == V.VOCAB_SIZE
    for colour in V.COLOURS:
        for shape in V.SHAPES:
            for motion in V.MOTIONS:
                text = V.format_caption(colour, shape, motion)
                ids = V.encode(text)
                assert ids[0] == V.BOS_ID and ids[-1] == V.EOS_ID and len(ids) <= V.MAX_CAPTION_TOKENS
                assert V.decode(ids) == text
                assert V.parse_caption(text) == V.Caption(colour, shape, motion)
    assert V.encode("the red circle falls", bos=False, eos=False) == [V.WORD_TO_ID[w] for w in
                                                                       ("the", "red", "circle", "falls")]
    batch = V.encode_batch(["the red circle falls", "the blue square bounces off the left wall"])
    assert batch.shape == (2, V.MAX_CAPTION_TOKENS) and batch.dtype == np.int64
    assert batch[0, 6:].tolist() == [V.PAD_ID] * (V.MAX_CAPTION_TOKENS - 6)
    assert V.decode(batch[1]) == "the blue square bounces off the left wall"


def test_unknown_words_are_reported():
    with pytest.raises(ValueError, match=r"unknown word 'sqaure'.*closest known words: square"):
        V.encode("the red sqaure falls")
    with pytest.raises(ValueError, match=r"unknown word 'purple'"):
        V.encode("the purple circle falls")
    with pytest.raises(ValueError, match=r"unknown word '<pad>'|unknown word 'pad'"):
        V.encode("<pad>")
    with pytest.raises(ValueError, match="out of range"):
        V.decode([V.VOCAB_SIZE])
    with pytest.raises(ValueError, match="length"):
        V.encode_batch(["the red circle bounces off the left wall"], length=4)


# --------------------------------------------------------------------------------------- stream


def test_stream_is_reproducible_and_resumable():
    it = D.stream(seed=7, n_chunks=2, batch=3)
    b0, b1 = next(it), next(it)
    assert b0.frames.shape == (3, 2 * F, 64, 64, 3) and b0.frames.dtype == np.uint8
    assert b0.tokens.shape == (3, 2, V.MAX_CAPTION_TOKENS) and len(b0.captions) == 3
    assert (b0.index, b1.index) == (0, 1)
    assert not np.array_equal(b0.frames, b1.frames)
    assert len(set(b0.seeds) | set(b1.seeds)) == 6
    again = next(D.stream(seed=7, n_chunks=2, batch=3))
    resumed = next(D.stream(seed=7, n_chunks=2, batch=3, start=1))
    for x, y in ((b0, again), (b1, resumed)):
        assert np.array_equal(x.frames, y.frames) and x.captions == y.captions and x.seeds == y.seeds
        assert np.array_equal(x.tokens, y.tokens)
    other = next(D.stream(seed=8, n_chunks=2, batch=3))
    assert not np.array_equal(other.frames, b0.frames)
    assert [b.index for b in D.stream(0, 1, 1, start=2, stop=4)] == [2, 3]
    clip = D.generate(b1.seeds[2], 2)
    assert np.array_equal(clip.frames, b1.frames[2])


@pytest.mark.parametrize("seed", [0, 3, 11, 42])
def test_foreground_cells_cover_every_object_pixel_and_little_else(seed):
    """Every pixel of every object (its exact shape, visible or covered) lies in a touched latent
    cell of its frame group, and most cells stay untouched (the weighting has something to single out)."""
    clip = D.generate(seed=seed, n_chunks=2)
    fg = D.foreground_cells(clip, 4, 8)
    n = clip.config.size
    assert fg.shape == (clip.n_frames // 4, n // 8, n // 8) and fg.dtype == bool
    tr = clip.tracks
    for i, shape in enumerate(tr["shape"]):
        pixels = D._object_masks(tr["x"][:, i], tr["y"][:, i], str(shape), float(tr["size"][0, i]), n)
        cells = pixels.reshape(clip.n_frames // 4, 4, n // 8, 8, n // 8, 8).any(axis=(1, 3, 5))
        assert not (cells & ~fg).any(), (seed, i, shape)
    assert 0 < fg.mean() < 0.5


def test_other_captions_name_every_object_but_the_subject():
    """``other_captions``: per chunk, every non-subject object's caption by the subject's own rule (the same
    function gives the subject's caption), in object order; a one-object clip has none."""
    f = D.WorldConfig().chunk_frames
    seen_multi = False
    for seed in range(12):
        clip = D.generate(seed, 3)
        tr = clip.tracks
        others = D.other_captions(tr)
        assert len(others) == 3
        for k, (subject, caps) in enumerate(zip(tr["subject"], others)):
            want = [i for i in range(len(tr["colour"])) if i != subject]
            assert [V.parse_caption(c).subject for c in caps] == [(str(tr["colour"][i]), str(tr["shape"][i])) for i in want]
            for i, c in zip(want, caps):
                sl = slice(k * f, (k + 1) * f)
                assert c == D.caption_for_chunk(str(tr["colour"][i]), str(tr["shape"][i]), tr["vx"][sl, i], tr["vy"][sl, i],
                                                   tr["bounce"][sl, i])
            seen_multi |= len(caps) > 0
        if len(tr["colour"]) == 1:
            assert others == [()] * 3
    assert seen_multi


def test_other_captions_leave_out_the_object_each_told_prompt_names():
    """``other_captions(told=)``: with prompts other than the clip's own (its first caption repeated), each
    chunk leaves out the object its prompt names, so a clip whose subject switches tells the new subject
    as an also prompt; with the clip's own captions it is the default; wrong lengths are refused."""
    for seed in range(40):
        clip = D.generate(seed, 4)
        if len(set(clip.tracks["subject"])) > 1:
            break
    else:
        raise AssertionError("no clip of 40 switches subject")
    tr = clip.tracks
    every = D.object_captions(tr)
    first = [clip.captions[0]] * 4
    told = D.other_captions(tr, told=first)
    named = V.parse_caption(clip.captions[0]).subject
    for caps, mine in zip(told, every):
        assert list(caps) == [c for c in mine if V.parse_caption(c).subject != named]
    switched = [k for k, s in enumerate(tr["subject"]) if s != tr["subject"][0]]
    assert any(clip.captions[k] in told[k] for k in switched)  # the clip's own subject there is told as an also
    assert D.other_captions(tr, told=list(clip.captions)) == D.other_captions(tr)
    assert all(clip.captions[k] in every[k] for k in range(4))
    with pytest.raises(ValueError, match="told has 3 prompts for a clip of 4 chunks"):
        D.other_captions(tr, told=first[:3])


def test_other_captions_lagged_or_with_one_motion():
    """``other_captions(lag=L)``: chunk k takes chunk max(0, k - L)'s captions, still leaving out the object
    chunk k's prompt names; ``motion``: every object told that motion; bad lags refused."""
    for seed in range(40):
        clip = D.generate(seed, 5)
        if len(set(clip.tracks["subject"])) > 1:
            break
    tr = clip.tracks
    every = D.object_captions(tr)
    for lag in (0, 1, 3, 16):
        got = D.other_captions(tr, lag=lag)
        for k, (caps, prompt) in enumerate(zip(got, clip.captions)):
            named = V.parse_caption(prompt).subject
            assert list(caps) == [c for c in every[max(0, k - lag)] if V.parse_caption(c).subject != named]
    assert D.other_captions(tr, lag=0) == D.other_captions(tr)
    left = D.other_captions(tr, motion="moves left")
    assert [[V.parse_caption(c).subject for c in caps] for caps in left] == \
        [[V.parse_caption(c).subject for c in caps] for caps in D.other_captions(tr)]
    assert all(V.parse_caption(c).motion == "moves left" for caps in left for c in caps)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="lag must be an integer >= 0"):
            D.other_captions(tr, lag=bad)
    with pytest.raises(ValueError, match="unknown motion"):
        D.other_captions(tr, motion="moves sideways")
