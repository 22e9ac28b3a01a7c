"""Evaluation of the world model (``magi eval``, ``benchmarks/bench_world.py``) on held-out seeds.

Metric functions are pure (numpy in, numbers out) and are tested on simulator clips whose ground
truth is known; `evaluate` runs the model and applies them:

- `prompt_following`: the caption rule applied to each chunk's *measured* motion (`tracking`: the
  colour tracker `track_by_colour` and `motion_from_track`, re-exported here), compared with each
  chunk's prompt; `wall_hit_gaps` checks what the tracker's wall rule assumes.
- `psnr`, `count_blobs` / `object_persistence`: image-to-video fidelity (`evaluate` counts persistence
  over `DEFAULT_IMAGE_CHUNKS` = 16 chunks, beside the simulator's own clip and its autoencoder round trip).
- `subject_copies`: per chunk, how often the prompt's subject is drawn more than once (its colour in
  two or more blobs: every object of the simulator's world has a colour of its own) or not at all, in
  the text-to-video videos whose prompt following is measured (the tracker follows the centroid of
  the colour, so two copies moving as told still count as following).
- `position_error`: continuation physics against the simulator, with a copy-last-frame baseline.
- `seam_score`: mean frame difference at chunk boundaries vs inside chunks.
- `caption_loss_gap` / `context_loss_gap`: how much the transformer's loss falls with the captions /
  with the clean chunk before (what it reads).
- `measure_memory` / `measure_memory_isolated`: peak host memory (the kernel's RSS high-water mark
  over the generation), tracemalloc peak and KV-cache bytes; `evaluate` runs each video length in
  a fresh process with a fixed malloc mmap threshold (see `measure_memory_isolated` for why).

Held-out seeds are small integers; training draws its clips from large derived seeds
(`data.clip_seed`), so they do not overlap.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
import tracemalloc
from typing import Sequence

import numpy as np

from . import data, vocab
from .data import PALETTE, WorldConfig
from .tracking import (DEFAULT_MIN_PIXELS, DEFAULT_TOL, EDGE_MARGIN, OCCLUDED, WALL_MARGIN, blob_counts,  # noqa: F401
                       colour_masks, count_blobs, motion_from_track, present_colours, track_by_colour, track_motion)

DEFAULT_IMAGE_CHUNKS = 16  # image-to-video length for object persistence (the world-model issue's 16 chunks)
DIRECTION_PAIRS = (("right", "left"), ("left", "right"), ("up", "down"), ("down", "up"))


# ------------------------------------------------------------------------------ caption rule


def wall_hit_gaps(frames, clip: data.Clip, tol: float = DEFAULT_TOL) -> list[tuple[int, float]]:
    """At each wall hit of ``clip`` (its ground truth): ``(wall code, gap)``, the gap being how far
    (px) the subject's tracked pixels in ``frames`` stay from that wall over the frames t-1 .. t+2:
    what `EDGE_MARGIN` must allow. ``frames``: the clip's frames, or a version of them (e.g. an
    autoencoder round trip). Objects sharing a colour with another are skipped (their pixels cannot
    be told apart)."""
    colours = [str(c) for c in clip.tracks["colour"]]
    tr = track_by_colour(frames, colours, tol)
    size = clip.config.size
    hits = []
    for i, c in enumerate(colours):
        if colours.count(c) > 1:
            continue
        for t in np.flatnonzero(clip.tracks["bounce"][:, i]):
            if not clip.tracks["visible"][t, i]:
                continue
            sl = slice(max(0, t - 1), t + 3)
            code = int(clip.tracks["bounce"][t, i])
            gap = {data.LEFT_WALL: np.nanmin(tr[c]["x0"][sl]), data.RIGHT_WALL: size - np.nanmax(tr[c]["x1"][sl]),
                   data.CEILING: np.nanmin(tr[c]["y0"][sl]), data.FLOOR: size - np.nanmax(tr[c]["y1"][sl])}[code]
            hits.append((code, float(gap)))
    return hits


OCCLUSION_RULES = ("chunk", "video")


def prompt_following(frames, prompts: Sequence[str], config: WorldConfig = WorldConfig(),
                     tol: float = DEFAULT_TOL, use_extent: bool = True, occlusion: str = "chunk") -> dict:
    """Per chunk: track the prompt's subject colour, measure its motion, compare with the prompt.

    Frames where the subject's colour covers less than `OCCLUDED` of its median pixel count are left
    out (partly covered by a distractor drawn on top: the centroid is off). ``occlusion`` says over
    which frames that median is taken: ``"chunk"`` (default) the chunk's own, so a chunk is judged on
    its frames alone; ``"video"`` the whole video's (the rule before session 27, kept to compare
    figures with earlier ones: a subject drawn larger, or twice, in later chunks made it drop the
    earlier chunks' frames). ``use_extent=False``: wall hits by the centroid alone (the rule before
    session 23).

    Returns ``{"fraction", "matches": [bool], "measured": [str|None], "prompts": [str]}``."""
    frames = np.asarray(frames)
    f = config.chunk_frames
    k_chunks = frames.shape[0] // f
    if k_chunks < len(prompts):
        raise ValueError(f"{len(prompts)} prompts but only {k_chunks} whole chunks of frames")
    if occlusion not in OCCLUSION_RULES:
        raise ValueError(f"occlusion={occlusion!r}: expected one of {', '.join(OCCLUSION_RULES)}")
    parsed = [vocab.parse_caption(p) for p in prompts]
    tracks = track_by_colour(frames, sorted({p.colour for p in parsed}), tol)
    measured, matches = [], []
    for k, p in enumerate(parsed):
        sl = slice(k * f, min((k + 1) * f + 1, frames.shape[0]))  # + the next chunk's first frame: a hit in the last step
        ref = sl if occlusion == "chunk" else slice(None)  # the frames whose median pixel count is the reference
        m = track_motion(tracks[p.colour], sl, config, occlusion_ref=ref, use_extent=use_extent)
        measured.append(m)
        matches.append(m == p.motion)
    return {"fraction": float(np.mean(matches)) if matches else float("nan"), "matches": matches,
            "measured": measured, "prompts": [p.text for p in parsed]}


def subject_copies(frames, prompts: Sequence[str], config: WorldConfig = WorldConfig(), tol: float = DEFAULT_TOL,
                   min_pixels: int = DEFAULT_MIN_PIXELS, counts: dict | None = None) -> dict:
    """Per chunk: the fraction of its frames where the chunk's subject colour shows more than one blob
    (``"duplicated"``: drawn twice or more) and no blob at all (``"missing"``), by `count_blobs`
    (``counts``: its result for these frames and the subjects' colours, when the caller has it already).
    The simulator's clips of held-out direction-change prompts read under 0.001 duplicated."""
    frames = np.asarray(frames)
    f = config.chunk_frames
    if frames.shape[0] < f * len(prompts):
        raise ValueError(f"{len(prompts)} prompts but only {frames.shape[0] // f} whole chunks of frames")
    colours = [vocab.parse_caption(p).colour for p in prompts]
    if counts is None:
        counts = count_blobs(frames, sorted(set(colours)), tol, min_pixels)
    chunks = [counts[c][k * f:(k + 1) * f] for k, c in enumerate(colours)]
    return {"duplicated": [float(np.mean(n > 1)) for n in chunks], "missing": [float(np.mean(n == 0)) for n in chunks]}


def by_chunk(matches: Sequence[Sequence[bool]]) -> list[float]:
    """Prompt following per chunk position: entry k is the fraction of videos whose chunk k matched
    (videos shorter than k + 1 chunks do not count for k)."""
    longest = max((len(m) for m in matches), default=0)
    return [float(np.mean([m[k] for m in matches if len(m) > k])) for k in range(longest)]


def _room_ahead(direction: str, x: float, y: float, bounds) -> float:
    """How far a centroid at (x, y) can move towards ``direction`` (left/right/up/down) inside
    ``bounds`` = (xmin, xmax, ymin, ymax)."""
    xmin, xmax, ymin, ymax = bounds
    return {"left": x - xmin, "right": xmax - x, "up": y - ymin, "down": ymax - y}[direction]


def _slowest_room(config: WorldConfig) -> float:
    """The room one more chunk (its frames and the one after it) needs at the slowest speed still
    captioned as moving (1.5 x ``still_thresh``)."""
    return 1.5 * config.still_thresh * (config.chunk_frames + 1)


def room_to_continue(n_clips: int = 4000, first_seed: int = 100_000, config: WorldConfig = WorldConfig()) -> dict:
    """How often a first chunk captioned "moves X", drawn as the simulator draws it (no gravity), leaves
    its subject room to keep moving X through the next chunk (its frames and the one after it).

    ``same_velocity``: at the chunk's last velocity; ``slowest``: straight along X at the slowest
    speed still captioned as moving (1.5 x ``still_thresh``). A generator that sees one chunk's
    caption at a time cannot know that the next chunk asks for the same direction again, so the
    direction-change videos' second chunk (same prompt as the first) is bounded by these."""
    f = config.chunk_frames
    steps = np.arange(1, f + 2)
    n = same = slowest = 0
    for seed in range(first_seed, first_seed + n_clips):
        clip = data.generate(seed, 2, config)
        motion = vocab.parse_caption(clip.captions[0]).motion
        if clip.gravity or not motion.startswith("moves "):
            continue
        tr = clip.tracks
        s = int(tr["subject"][0])
        x, y, vx, vy = (float(tr[k][f - 1, s]) for k in ("x", "y", "vx", "vy"))
        b = [float(v) for v in tr["bounds"][s]]  # xmin, xmax, ymin, ymax of the centroid
        xs, ys = x + vx * steps, y + vy * steps
        n += 1
        same += bool((xs >= b[0]).all() and (xs <= b[1]).all() and (ys >= b[2]).all() and (ys <= b[3]).all())
        slowest += bool(_room_ahead(motion.split()[1], x, y, b) >= _slowest_room(config))
    return {"clips": n, "same_velocity": same / max(n, 1), "slowest": slowest / max(n, 1)}


def first_chunk_room(frames, prompt: str, config: WorldConfig = WorldConfig(), tol: float = DEFAULT_TOL) -> dict | None:
    """Whether a generated chunk captioned "moves X" ends with room for its subject to keep moving X
    through one more chunk (the model's side of `room_to_continue`).

    ``frames``: that chunk's frames. The subject is tracked by colour; its half-extent is taken as a
    disc of the tracked pixel count, its speed along X from a line fit of its last 8 visible
    positions. Returns ``{"room_px", "speed", "same_velocity", "slowest"}`` (the last two as in
    `room_to_continue`), or None when the caption is not "moves X" or the subject shows in fewer
    than 8 frames."""
    p = vocab.parse_caption(prompt)
    if not p.motion.startswith("moves "):
        return None
    tr = track_by_colour(np.asarray(frames), [p.colour], tol)[p.colour]
    ok = np.flatnonzero(tr["visible"])
    if len(ok) < 8:
        return None
    last, fit = ok[-1], ok[-8:]
    x, y = float(tr["x"][last]), float(tr["y"][last])
    r = math.sqrt(tr["count"][last] / math.pi)
    vx, vy = np.polyfit(fit, tr["x"][fit], 1)[0], np.polyfit(fit, tr["y"][fit], 1)[0]
    d = p.motion.split()[1]
    room = _room_ahead(d, x, y, (r, config.size - r, r, config.size - r))
    speed = float({"left": -vx, "right": vx, "up": -vy, "down": vy}[d])
    steps = config.chunk_frames + 1  # the next chunk's frames and the one after it
    return {"room_px": float(room), "speed": speed, "same_velocity": bool(room >= max(speed, 0.0) * steps),
            "slowest": bool(room >= _slowest_room(config))}


def direction_change_prompts(seed: int, n_chunks: int, config: WorldConfig = WorldConfig()) -> list[str]:
    """A held-out chunk-wise prompt list that changes direction mid-video, realisable by the simulator.

    The subject and the direction pair come from ``seed``; the first half of the chunks goes one
    way, the rest the other way (checked with `data.generate_from_prompts`)."""
    rng = np.random.default_rng(seed)
    for _ in range(32):
        colour = config.colours[int(rng.integers(len(config.colours)))]
        shape = config.shapes[int(rng.integers(len(config.shapes)))]
        a, b = DIRECTION_PAIRS[int(rng.integers(len(DIRECTION_PAIRS)))]
        h = max(1, n_chunks // 2)
        prompts = [f"the {colour} {shape} moves {a}"] * h + [f"the {colour} {shape} moves {b}"] * (n_chunks - h)
        try:
            data.generate_from_prompts(prompts, seed, config, gravity=False)
        except ValueError:
            continue
        return prompts
    raise RuntimeError(f"no realisable direction-change schedule for seed {seed}")


# --------------------------------------------------------------------------- other metrics


def psnr(a, b) -> float:
    """PSNR (dB) of two uint8 images / videos of the same shape (inf when equal)."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    mse = float(np.mean((a - b) ** 2))
    return float("inf") if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def object_persistence(frames, image, tol: float = DEFAULT_TOL, min_pixels: int = DEFAULT_MIN_PIXELS,
                       chunk_frames: int | None = None) -> dict:
    """Objects neither vanish nor duplicate: per frame, blob counts per colour of the image vs the image's.

    Returns fractions of frames where every colour's count equals the image's (``persistent``),
    where some colour has fewer (``vanished``) or more (``duplicated``) blobs; ``by_colour``: those
    two per colour of the image; ``appeared``: frames with a blob of a palette colour the image does
    not show (an object that changed colour, or a new one; not counted against ``persistent``); with
    ``chunk_frames`` also ``by_chunk``, the persistent fraction of each chunk's frames (the last
    chunk may be short), and ``size_by_chunk``: per colour of the image, its pixels in each chunk's
    frames (mean) over its pixels in the image (objects that grow or shrink from chunk to chunk)."""
    frames = np.asarray(frames)
    colours = present_colours(image, tol, min_pixels)
    image_masks = colour_masks(np.asarray(image)[None], colours, tol)
    masks = colour_masks(frames, list(PALETTE), tol)  # blob counts and sizes both read these
    ref = blob_counts(image_masks, min_pixels)
    got = blob_counts(masks, min_pixels)
    T = frames.shape[0]
    fewer = np.zeros(T, bool)
    more = np.zeros(T, bool)
    by_colour = {}
    for c in colours:
        fewer |= got[c] < ref[c][0]
        more |= got[c] > ref[c][0]
        by_colour[c] = {"vanished": float(np.mean(got[c] < ref[c][0])), "duplicated": float(np.mean(got[c] > ref[c][0]))}
    new = np.zeros(T, bool)
    for c in set(PALETTE) - set(colours):
        new |= got[c] > 0
    ok = ~fewer & ~more
    out = {"colours": colours, "persistent": float(np.mean(ok)), "vanished": float(np.mean(fewer)),
           "duplicated": float(np.mean(more)), "appeared": float(np.mean(new)), "by_colour": by_colour,
           "frames": int(T)}
    if chunk_frames is not None:
        if chunk_frames < 1:
            raise ValueError(f"chunk_frames must be >= 1, got {chunk_frames}")
        out["by_chunk"] = [float(np.mean(ok[i:i + chunk_frames])) for i in range(0, T, chunk_frames)]
        out["size_by_chunk"] = {c: [float(masks[c][i:i + chunk_frames].sum((1, 2)).mean() / image_masks[c].sum())
                                    for i in range(0, T, chunk_frames)] for c in colours}
    return out


def position_error(frames, clip: data.Clip, start_frame: int, tol: float = DEFAULT_TOL) -> dict:
    """Mean centroid error (px) of each clip object tracked in ``frames`` (which show the clip's frames
    ``start_frame ...``) against the simulator's tracks, over frames where the object is visible in
    the ground truth; frames where it is not found in ``frames`` count as ``missing``."""
    frames = np.asarray(frames)
    T = frames.shape[0]
    colours = [str(c) for c in clip.tracks["colour"]]
    tr = track_by_colour(frames, colours, tol)
    errs, missing, total = [], 0, 0
    for i, c in enumerate(colours):
        gx = clip.tracks["x"][start_frame:start_frame + T, i]
        gy = clip.tracks["y"][start_frame:start_frame + T, i]
        gv = clip.tracks["visible"][start_frame:start_frame + T, i]
        for t in range(min(T, len(gx))):
            if not gv[t]:
                continue
            total += 1
            if not tr[c]["visible"][t]:
                missing += 1
                continue
            errs.append(math.hypot(tr[c]["x"][t] - gx[t], tr[c]["y"][t] - gy[t]))
    return {"mean_px": float(np.mean(errs)) if errs else float("nan"),
            "missing": missing / total if total else 0.0, "n": total}


SEAM_KEYS = ("boundary", "inside", "ratio", "latent_boundary", "other", "latent_ratio")  # what `seam_score` gives


def frame_differences(frames) -> np.ndarray:
    """Mean absolute difference of consecutive frames, [T - 1]: entry t is frame t -> t + 1."""
    f = np.asarray(frames, np.float32)
    return np.abs(np.diff(f, axis=0)).mean(axis=(1, 2, 3))


def seam_stats(d: np.ndarray, chunk_frames: int = 24, time_down: int = 4) -> dict:
    """`seam_score` of frame differences ``d`` (`frame_differences`, or a mean of several videos')."""
    idx = np.arange(len(d))
    boundary = (idx + 1) % chunk_frames == 0
    latent = ((idx + 1) % time_down == 0) & ~boundary
    other = ~boundary & ~latent

    def mean(sel):
        return float(d[sel].mean()) if sel.any() else float("nan")

    b, i, lb, o = mean(boundary), mean(~boundary), mean(latent), mean(other)
    return {"boundary": b, "inside": i, "ratio": b / i if i > 0 else float("inf"),
            "latent_boundary": lb, "other": o, "latent_ratio": lb / o if o > 0 else float("inf")}


def seam_score(frames, chunk_frames: int = 24, time_down: int = 4) -> dict:
    """Mean absolute frame difference at chunk boundaries vs inside chunks (and their ratio), and the
    same at latent-frame boundaries inside chunks (every ``time_down`` frames: a decoder that draws
    each latent frame's frames alike steps there) vs the other transitions (``latent_ratio``)."""
    return seam_stats(frame_differences(frames), chunk_frames, time_down)


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: peak RSS so far
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (VmHWM) to the current RSS; False where Linux does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return _peak_rss_bytes() is not None
    except OSError:
        return False


def _peak_rss_bytes() -> int | None:
    """The kernel's RSS high-water mark of this process (VmHWM, bytes), or None where not available."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


# -------------------------------------------------------------------------------- the runner


def _gen(model, meta, prompts, *, seed, sampler: dict, image=None, video=None):
    """Generate one video with the sampler settings ``sampler`` (`generate_chunks` keywords)."""
    from .generate import generate_chunks

    stream = generate_chunks(model, prompts, n_chunks=len(prompts), seed=seed, image=image, video=video, meta=meta,
                             **sampler)
    t0 = time.perf_counter()
    chunks = list(stream)
    return np.concatenate(chunks), time.perf_counter() - t0, stream


I2V_PROMPTS = ("first", "clip")  # what an image-to-video run is told (see `image_to_video_run`)


def image_to_video_run(model, meta, seed: int, n_chunks: int, *, sampler, prompts: str = "first",
                       config: WorldConfig = WorldConfig(), round_trip: bool = False, also: bool | str = False,
                       also_lag: int = 0, also_motion: str | None = None):
    """Image-to-video from the first frame of ``seed``'s simulator clip of ``n_chunks`` chunks, told the
    clip's first caption repeated (``"first"``, what `evaluate` tells) or its own captions (``"clip"``:
    a schedule the simulator realised from that frame). ``sampler``: `generate_chunks` keywords, or a
    function of the prompts told that returns them (e.g. prompt-dependent negative prompts).

    Returns ``(record, frames, seconds)``: the record holds the seed, the prompts told, the first
    frame's PSNR, `object_persistence` against the image (by chunk) and the simulator clip's own
    persistence (``simulator_persistent``); with ``round_trip`` also that of its autoencoder round
    trip (``autoencoder_persistent``: what the transformer could reach at best). ``also``: each chunk is
    also told the clip's captions of every object its prompt does not name (`data.other_captions`;
    generation's also prompts); ``"auto"``: the stream finds its own (`generate_chunks(also="auto")`).
    ``also_lag`` L: chunk k is told the other objects' captions of chunk
    max(0, k - L) instead (what a generator reading its own finished chunks could know);
    ``also_motion``: every other object told this motion instead of its own."""
    if prompts not in I2V_PROMPTS:
        raise ValueError(f"prompts={prompts!r}: expected one of {', '.join(I2V_PROMPTS)}")
    clip = data.generate(seed, n_chunks, config)
    image = clip.frames[0]
    told = list(clip.captions) if prompts == "clip" else [clip.captions[0]] * n_chunks
    kw = dict(sampler(told) if callable(sampler) else sampler)
    if also not in (False, True, "auto"):
        raise ValueError(f"also={also!r}: expected False, True (the clip's captions) or 'auto' (the stream's own)")
    if (also_lag or also_motion is not None) and also is not True:
        raise ValueError(f"also_lag / also_motion change the clip's captions told: they need also=True, got {also!r}")
    if also == "auto":
        kw["also"] = "auto"
    elif also:  # every object but the one each prompt names
        kw["also"] = data.other_captions(clip.tracks, config, told, motion=also_motion, lag=also_lag)
    frames, seconds, _ = _gen(model, meta, told, seed=seed, sampler=kw, image=image)
    record = {"seed": seed, "prompts": told, "psnr_first_frame": psnr(frames[0], image),
              **object_persistence(frames, image, chunk_frames=config.chunk_frames),
              "simulator_persistent": object_persistence(clip.frames, image)["persistent"]}
    if round_trip:
        rec = model.vae.round_trip(clip.frames).cpu().numpy()
        record["autoencoder_persistent"] = object_persistence(rec, image)["persistent"]
    return record, frames, seconds


MEMORY_MMAP_THRESHOLD = 128 * 1024  # glibc's initial M_MMAP_THRESHOLD, held fixed in the memory runs


def measure_memory(model, meta, n_chunks: int, *, steps: int, seed: int = 0, cfg_text: float | None = None,
                   cfg_neg: float | None = None, eta: float | None = None, cfg_local: float | None = None,
                   cfg_prev: float | None = None, cfg_prev_frames: int | None = None,
                   pack_branches: bool | None = None, cuda_graphs: bool | None = None,
                   cfg_salient: float | None = None) -> dict:
    """Peak host memory of one ``n_chunks`` generation in this process, tracemalloc peak, KV-cache bytes.

    ``peak_rss_mb``: the kernel's RSS high-water mark over the generation (VmHWM, reset to the
    current RSS at the start through ``/proc/self/clear_refs``; ``peak_rss_source`` "VmHWM"), so
    the transient peak inside a chunk counts; where Linux does not allow the reset, the largest RSS
    sampled after each chunk ("sampled"). ``rss_per_chunk_mb``: RSS after each chunk;
    ``sampled_peak_rss_mb`` their maximum (with the RSS at the start); ``rss_growth_mb``: peak
    minus the RSS at the start. ``cfg_text`` / ``cfg_neg`` / ``eta`` / ``cfg_local`` / ``cfg_salient`` /
    ``cfg_prev`` / ``cfg_prev_frames`` / ``pack_branches`` / ``cuda_graphs``: as for generation (default: generate's); each guidance runs one
    more model pass (``branch_passes``; packed into ``model_calls`` transformer calls on a GPU).

    In a process that already ran other work, or with glibc's default allocator, RSS says as much
    about the allocator's history as about the generation: see `measure_memory_isolated`, which
    `evaluate` uses."""
    from .generate import generate_chunks

    prompt = "the red circle moves right"
    given = {"cfg_text": cfg_text, "cfg_neg": cfg_neg, "eta": eta, "cfg_local": cfg_local, "cfg_prev": cfg_prev,
             "cfg_prev_frames": cfg_prev_frames, "pack_branches": pack_branches, "cuda_graphs": cuda_graphs,
             "cfg_salient": cfg_salient}
    stream = generate_chunks(model, [prompt], n_chunks=n_chunks, steps=steps, seed=seed, meta=meta,
                             **{k: v for k, v in given.items() if v is not None})  # None: generate's default
    import torch

    dev = next(model.parameters()).device
    cuda = dev.type == "cuda"
    if cuda:  # GPU: the allocator's peak over the whole generation, not sampled
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
        gpu0 = torch.cuda.memory_allocated(dev)
    tracemalloc.start()
    hwm = _reset_peak_rss()
    rss0 = sampled = _rss_bytes()
    per_chunk = []
    t0 = time.perf_counter()
    for chunk in stream:
        del chunk
        per_chunk.append(_rss_bytes())
        sampled = max(sampled, per_chunk[-1])
    if cuda:
        torch.cuda.synchronize(dev)
    dt = time.perf_counter() - t0
    peak = max(sampled, _peak_rss_bytes()) if hwm else sampled
    _, tm_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    out = {"chunks": n_chunks, "steps": steps, "cfg_text": stream.cfg_text, "cfg_neg": stream.cfg_neg, "eta": stream.eta,
           "cfg_local": stream.cfg_local, "cfg_salient": stream.cfg_salient, "cfg_prev": stream.cfg_prev,
           "cfg_prev_frames": stream.cfg_prev_frames,
           "peak_rss_mb": peak / 2 ** 20,
           "peak_rss_source": "VmHWM" if hwm else "sampled", "sampled_peak_rss_mb": sampled / 2 ** 20,
           "rss_start_mb": rss0 / 2 ** 20, "rss_growth_mb": (peak - rss0) / 2 ** 20,
           "rss_per_chunk_mb": [round(r / 2 ** 20, 2) for r in per_chunk],
           "tracemalloc_peak_mb": tm_peak / 2 ** 20, "kv_cache_bytes": stream.cache.nbytes(),
           "peak_cache_chunks": stream.peak_cache_chunks, "seconds": dt, "pack_branches": stream.pack_branches,
           "cuda_graphs": stream.graphs is not None, "model_calls": stream.model_calls,
           "branch_passes": stream.branch_passes,
           "fps": n_chunks * model.cfg.chunk_frames / dt}
    if cuda:
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated(dev) / 2 ** 20
        out["peak_gpu_reserved_mb"] = torch.cuda.max_memory_reserved(dev) / 2 ** 20  # + the allocator's cache, graph pools
        out["gpu_growth_mb"] = (torch.cuda.max_memory_allocated(dev) - gpu0) / 2 ** 20
        out["device"] = torch.cuda.get_device_name(dev)
    return out


_CHILD_MARK = "MEASURE_MEMORY_RESULT "


def measure_memory_isolated(weights, n_chunks: int, *, steps: int, seed: int = 0, cfg_text: float | None = None,
                            cfg_neg: float | None = None, eta: float | None = None, cfg_local: float | None = None,
                            cfg_prev: float | None = None, cfg_prev_frames: int | None = None,
                            cfg_salient: float | None = None, threads: int | None = None,
                            mmap_threshold: int | None = MEMORY_MMAP_THRESHOLD,
                            timeout: float | None = None) -> dict:
    """`measure_memory` (CPU) in a fresh Python process that loads ``weights`` (None: the shipped model).

    Why: generation holds a bounded working set (KV ring buffer, the chunks in flight, one decoded
    chunk), but its transient tensors (autoencoder activations, attention scores) are tens of MB.
    With glibc's default allocator, the first free of such a buffer raises the mmap threshold, so
    later ones come from the heap, which keeps freed memory or gives it back depending on
    fragmentation: within one 64-chunk generation the RSS after a chunk swings by +-30 MB and
    its high-water mark creeps up, and in a process that ran other work first (evaluate's other
    metrics, shorter memory runs) the RSS starts from that work's leftovers. Measuring each length
    in a fresh process with the mmap threshold held fixed (``MALLOC_MMAP_THRESHOLD_``; None: the
    allocator's default), so that large buffers are mapped on allocation and unmapped on free,
    makes the peak RSS follow what the generation holds. It costs time (page faults on every large
    buffer), so the ``seconds`` / ``fps`` of these runs are not the generator's throughput.

    ``threads``: torch threads in the child (default: this process's). Returns `measure_memory`'s
    dict plus ``pid`` (the child's) and ``malloc_mmap_threshold``."""
    import torch

    spec = {"weights": None if weights is None else str(weights), "n_chunks": int(n_chunks), "steps": int(steps),
            "seed": int(seed), "cfg_text": cfg_text, "cfg_neg": cfg_neg, "eta": eta,
            "cfg_local": None if cfg_local is None else float(cfg_local),
            "cfg_salient": None if cfg_salient is None else float(cfg_salient),
            "cfg_prev": None if cfg_prev is None else float(cfg_prev),
            "cfg_prev_frames": None if cfg_prev_frames is None else int(cfg_prev_frames),
            "threads": int(threads) if threads is not None else torch.get_num_threads()}
    env = dict(os.environ)
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    if mmap_threshold is not None:
        env["MALLOC_MMAP_THRESHOLD_"] = str(int(mmap_threshold))
    code = "import sys; from maskc.world_model.evaluate import _memory_child; sys.exit(_memory_child(sys.argv[1]))"
    p = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], env=env, capture_output=True, text=True,
                       timeout=timeout)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith(_CHILD_MARK)]
    if p.returncode != 0 or not lines:
        raise RuntimeError(f"memory measurement of {n_chunks} chunks in a fresh process failed "
                           f"(exit {p.returncode}): {(p.stderr or p.stdout)[-2000:]}")
    return json.loads(lines[-1][len(_CHILD_MARK):])


def _memory_child(spec_json: str) -> int:
    """Entry point of `measure_memory_isolated`'s child process: prints the result as one JSON line."""
    import torch

    from .generate import load_model

    spec = json.loads(spec_json)
    torch.set_num_threads(spec["threads"])
    model, meta = load_model(spec["weights"])
    out = measure_memory(model, meta, spec["n_chunks"], steps=spec["steps"], seed=spec["seed"],
                         cfg_text=spec["cfg_text"], cfg_neg=spec.get("cfg_neg"), eta=spec.get("eta"),
                         cfg_local=spec.get("cfg_local"), cfg_prev=spec.get("cfg_prev"),
                         cfg_prev_frames=spec.get("cfg_prev_frames"), cfg_salient=spec.get("cfg_salient"))
    out["pid"] = os.getpid()
    out["malloc_mmap_threshold"] = (int(os.environ["MALLOC_MMAP_THRESHOLD_"])
                                    if os.environ.get("MALLOC_MMAP_THRESHOLD_") else None)
    out["torch_threads"] = torch.get_num_threads()
    print(_CHILD_MARK + json.dumps(out), flush=True)
    return 0


def evaluate(weights=None, seeds: Sequence[int] = (0, 1), chunks: int = 4, steps: int | None = None,
             memory_chunks: Sequence[int] = (4, 16), image_chunks: int | None = None, log=None,
             cfg_text: float | None = None, shift: float | None = None,
             cfg_interval: tuple[float, float] | None = None, cfg_neg: float | None = None,
             eta: float | None = None, cfg_local: float | None = None, also: bool | str = False,
             cfg_prev: float | None = None, cfg_prev_frames: int | None = None,
             cfg_salient: float | None = None) -> dict:
    """Run every metric on held-out ``seeds``; returns a JSON-able dict (see module doc). The sampler
    settings left None take `generate`'s defaults; ``cfg_local``: guidance kept where it is strong
    (`generate_chunks`; None: its default, 2; 0: plain guidance); ``cfg_salient``: guidance on what the
    conditional prediction draws, in the first chunk of a video from nothing (None: its default, 2; 0:
    off, the default before session 39); ``cfg_prev`` / ``cfg_prev_frames``:
    guidance on the previous chunks and the latent frames of each chunk it acts on (None: 4 on the
    first, the default since session 37; ``cfg_prev=0``: none, the default before); ``also``: the image-to-video runs are
    also told every other object's caption (True: the simulator's, `data.other_captions`; ``"auto"``:
    what the stream reads from its own chunks, `generate_chunks(also="auto")`; generation's also
    prompts)."""
    import torch

    from .generate import (
        DEFAULT_CFG_INTERVAL, DEFAULT_CFG_LOCAL, DEFAULT_CFG_NEG, DEFAULT_CFG_PREV, DEFAULT_CFG_PREV_FRAMES,
        DEFAULT_CFG_SALIENT, DEFAULT_CFG_TEXT, DEFAULT_ETA, DEFAULT_SHIFT, DEFAULT_STEPS, load_model,
    )

    say = log or (lambda msg: None)
    steps = DEFAULT_STEPS if steps is None else int(steps)
    shift = DEFAULT_SHIFT if shift is None else float(shift)
    cfg_interval = DEFAULT_CFG_INTERVAL if cfg_interval is None else tuple(cfg_interval)
    cfg_text = DEFAULT_CFG_TEXT if cfg_text is None else float(cfg_text)
    if not cfg_text >= 0:
        raise ValueError(f"cfg_text must be >= 0 (0: no text guidance), got {cfg_text}")
    cfg_neg = DEFAULT_CFG_NEG if cfg_neg is None else float(cfg_neg)
    if not cfg_neg >= 0:
        raise ValueError(f"cfg_neg must be >= 0 (0: no negative guidance), got {cfg_neg}")
    eta = DEFAULT_ETA if eta is None else float(eta)
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be in [0, 1] (the fraction of fresh noise per step; 0: Euler), got {eta}")
    scales = []  # checked here, before any video: the run takes minutes
    for name, value, default, zero in (("cfg_local", cfg_local, DEFAULT_CFG_LOCAL, "guidance everywhere as it is"),
                                       ("cfg_salient", cfg_salient, DEFAULT_CFG_SALIENT, "guidance everywhere as it is"),
                                       ("cfg_prev", cfg_prev, DEFAULT_CFG_PREV, "no guidance on the previous chunks")):
        value = default if value is None else float(value)
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite number >= 0 (0: {zero}), got {value}")
        scales.append(value)
    cfg_local, cfg_salient, cfg_prev = scales
    cfg_prev_frames = DEFAULT_CFG_PREV_FRAMES if cfg_prev_frames is None else cfg_prev_frames  # generate checks it
    if chunks < 2:
        raise ValueError(f"chunks must be >= 2 (a direction change needs two chunks), got {chunks}")
    model, meta = load_model(weights)
    cfg = WorldConfig()
    image_chunks = DEFAULT_IMAGE_CHUNKS if image_chunks is None else int(image_chunks)
    if image_chunks < 1:
        raise ValueError(f"image_chunks must be >= 1, got {image_chunks}")
    sampler = {"steps": steps, "cfg_text": cfg_text, "shift": shift, "cfg_interval": cfg_interval, "cfg_neg": cfg_neg,
               "eta": eta, "cfg_local": cfg_local, "cfg_prev": cfg_prev, "cfg_prev_frames": cfg_prev_frames,
               "cfg_salient": cfg_salient}
    res: dict = {"settings": {"weights": str(weights or "shipped small"), "seeds": list(seeds), "chunks": chunks,
                              **sampler, "cfg_interval": list(cfg_interval), "memory_chunks": list(memory_chunks),
                              "image_chunks": image_chunks, "also": also,
                              "torch_threads": torch.get_num_threads()}}
    gen_frames, gen_seconds = 0, 0.0

    # prompt following + seams (text-to-video with chunk-wise prompts)
    pf, seams, sim_seams = [], [], []
    for s in seeds:
        prompts = direction_change_prompts(s, chunks, cfg)
        ref = data.generate_from_prompts(prompts, s, cfg, gravity=False)
        frames, dt, _ = _gen(model, meta, prompts, seed=s, sampler=sampler)
        gen_frames, gen_seconds = gen_frames + len(frames), gen_seconds + dt
        r = prompt_following(frames, prompts, cfg)
        r["seed"], r["simulator_fraction"] = s, prompt_following(ref.frames, prompts, cfg)["fraction"]
        r["matches_video_rule"] = prompt_following(frames, prompts, cfg, occlusion="video")["matches"]
        r["subject"] = subject_copies(frames, prompts, cfg)
        r["simulator_subject"] = subject_copies(ref.frames, prompts, cfg)
        pf.append(r)
        seams.append(seam_score(frames, cfg.chunk_frames))
        sim_seams.append(seam_score(ref.frames, cfg.chunk_frames))  # the simulator realising the same prompts
        say(f"prompt following seed {s}: {r['fraction']:.2f} ({r['measured']})")
    res["prompt_following"] = {"fraction": float(np.mean([m for r in pf for m in r["matches"]])),
                               "by_chunk": by_chunk([r["matches"] for r in pf]),
                               # the tracker's occlusion rule before session 27, to compare with earlier figures
                               "fraction_video_rule": float(np.mean([m for r in pf for m in r["matches_video_rule"]])),
                               "runs": pf}
    # the subject drawn twice or more / not at all, in the same videos (mean over their chunks)
    res["subject_copies"] = {f"{who}{key}": float(np.mean([x for r in pf for x in r[src][key]]))
                             for who, src in (("", "subject"), ("simulator_", "simulator_subject"))
                             for key in ("duplicated", "missing")}
    res["subject_copies"]["duplicated_by_chunk"] = by_chunk([r["subject"]["duplicated"] for r in pf])
    res["seams"] = {k: float(np.mean([s[k] for s in seams])) for k in SEAM_KEYS}
    res["seams"] |= {"simulator_ratio": float(np.mean([s["ratio"] for s in sim_seams])),
                     "simulator_latent_ratio": float(np.mean([s["latent_ratio"] for s in sim_seams]))}

    # image-to-video: the seed's first simulator frame, told its first caption for image_chunks chunks;
    # persistence also on the simulator's own clip and on its autoencoder round trip
    i2v = []
    for s in seeds:
        r, frames, dt = image_to_video_run(model, meta, s, image_chunks, sampler=sampler, config=cfg, round_trip=True,
                                           also=also)
        gen_frames, gen_seconds = gen_frames + len(frames), gen_seconds + dt
        i2v.append(r)
        say(f"image-to-video seed {s}: PSNR {r['psnr_first_frame']:.1f} dB, persistent {r['persistent']:.2f}")
    res["image_to_video"] = {key: float(np.mean([r[key] for r in i2v]))
                             for key in ("psnr_first_frame", "persistent", "vanished", "duplicated", "appeared",
                                         "simulator_persistent", "autoencoder_persistent")}
    res["image_to_video"]["by_chunk"] = by_chunk([r["by_chunk"] for r in i2v])
    res["image_to_video"]["runs"] = i2v

    # continuation physics: 2 simulator chunks in, 2 generated chunks out
    f = cfg.chunk_frames
    phys = []
    for s in seeds:
        clip = data.generate(s, 4, cfg)
        prefix = clip.frames[:2 * f]
        frames, dt, _ = _gen(model, meta, clip.captions[2:4], seed=s, sampler=sampler, video=prefix)
        gen_frames, gen_seconds = gen_frames + len(frames), gen_seconds + dt
        e = position_error(frames, clip, 2 * f)
        b = position_error(np.repeat(prefix[-1:], 2 * f, axis=0), clip, 2 * f)
        phys.append({"seed": s, "model_px": e["mean_px"], "model_missing": e["missing"],
                     "copy_last_px": b["mean_px"], "copy_last_missing": b["missing"]})
        say(f"continuation seed {s}: model {e['mean_px']:.2f} px vs copy-last {b['mean_px']:.2f} px")
    res["continuation"] = {"model_px": float(np.nanmean([r["model_px"] for r in phys])),
                           "copy_last_px": float(np.nanmean([r["copy_last_px"] for r in phys])),
                           "model_missing": float(np.mean([r["model_missing"] for r in phys])), "runs": phys}

    # memory: each length in a fresh process (see measure_memory_isolated); not counted in throughput
    mem = [measure_memory_isolated(weights, n, steps=steps, cfg_text=cfg_text, cfg_neg=cfg_neg, eta=eta,
                                   cfg_local=cfg_local, cfg_prev=cfg_prev, cfg_prev_frames=cfg_prev_frames,
                                   cfg_salient=cfg_salient)
           for n in memory_chunks]
    for m in mem:
        say(f"memory {m['chunks']} chunks: peak RSS {m['peak_rss_mb']:.1f} MB, KV {m['kv_cache_bytes']} B")
    res["memory"] = {"runs": mem, "isolated": True, "malloc_mmap_threshold": MEMORY_MMAP_THRESHOLD}
    if len(mem) >= 2:
        res["memory"]["peak_rss_ratio"] = mem[-1]["peak_rss_mb"] / mem[0]["peak_rss_mb"]
        res["memory"]["kv_ratio"] = (mem[-1]["kv_cache_bytes"] / mem[0]["kv_cache_bytes"]
                                     if mem[0]["kv_cache_bytes"] else float("nan"))
    res["throughput"] = {"frames": gen_frames, "seconds": gen_seconds, "fps": gen_frames / gen_seconds,
                         "runs": "prompt following, image-to-video, continuation (not the memory runs)"}
    return res


def caption_loss_gap(model, *, batches: int = 6, clips: int = 8, n_chunks: int = 4, seed: int = 987654) -> dict:
    """How much the captions tell the model: its flow-matching loss on held-out packed batches with
    each clip's own captions (``real``), with the captions of the next clip in the batch
    (``shuffled``) and with the null caption (``null``), the same noise and noise levels for all
    three. A model that ignores the text scores the three alike.

    Samples are planned as in training (`train.plan_samples` of the small config) with no caption
    dropped; ``seed`` picks data no training run draws (training seeds are large derived ones)."""
    import torch

    from . import train as T

    tcfg = T.load_train_config("small")
    losses = {"real": [], "shuffled": [], "null": []}
    model.eval()
    for index in range(batches):
        batch = data.make_batch(seed, index, n_chunks, clips)
        with torch.no_grad():
            latents = model.vae.encode(torch.from_numpy(batch.frames))
        rng = np.random.default_rng([seed, index])
        samples = [T.SampleSpec(s.clip, s.offset, s.length, s.t, s.i2v, False)
                   for s in T.plan_samples(rng, clips, n_chunks, tcfg)]
        variants = {"real": batch.tokens, "shuffled": np.roll(batch.tokens, 1, axis=0),
                    "null": np.broadcast_to(T.null_tokens(), batch.tokens.shape).copy()}
        for name, tokens in variants.items():
            packed = T.pack_batch(latents, tokens, samples, model.cfg, torch.Generator().manual_seed(index))
            with torch.no_grad():
                losses[name].append(float(T.dit_loss(model, packed)))
    out = {name: float(np.mean(v)) for name, v in losses.items()}
    out["gap_vs_null"] = 1.0 - out["real"] / out["null"]
    return out


CONTEXT_GAP_TIMES = (0.02, 0.05, 0.1, 0.2, 0.35, 0.5, 0.7, 0.9)


def context_loss_gap(model, *, ts: Sequence[float] = CONTEXT_GAP_TIMES, batches: int = 3, clips: int = 16,
                     seed: int = 424242, attn_window: int | None = None) -> dict:
    """How much the model uses a clean chunk before the one it denoises, by that chunk's flow time:
    its loss on the second chunk of held-out 2-chunk clips with the first chunk clean before it
    (``with_context``) and alone (``alone``: the same chunk, the same time position, caption and
    noise), for each t in ``ts``. ``ratio`` = with_context / alone: 1 for a model that ignores its
    context (or with ``attn_window`` = 1, where a chunk sees only itself); the less, the more the
    chunk before tells it. ``seed`` picks data no training run draws."""
    import torch

    from . import train as T

    lf = model.cfg.latent_frames
    model.eval()
    with_context = {t: [] for t in ts}
    alone = {t: [] for t in ts}
    for index in range(batches):
        batch = data.make_batch(seed, index, 2, clips)
        with torch.no_grad():
            latents = model.vae.encode(torch.from_numpy(batch.frames))
        for t in ts:
            pair = T.pack_batch(latents, batch.tokens, [T.SampleSpec(c, 0, 2, (1.0, float(t)), False, False)
                                                        for c in range(clips)], model.cfg,
                                torch.Generator().manual_seed(index))
            single = T.pack_batch(latents, batch.tokens, [T.SampleSpec(c, 1, 1, (float(t),), False, False)
                                                          for c in range(clips)], model.cfg,
                                  torch.Generator().manual_seed(index))
            single.noise = pair.noise.reshape(clips, 2 * lf, *pair.noise.shape[1:])[:, lf:].reshape(single.noise.shape)
            with torch.no_grad():
                with_context[t].append(float(T.dit_loss(model, pair, attn_window=attn_window)))
                alone[t].append(float(T.dit_loss(model, single, attn_window=attn_window)))
    wc = [float(np.mean(with_context[t])) for t in ts]
    al = [float(np.mean(alone[t])) for t in ts]
    return {"t": [float(t) for t in ts], "with_context": wc, "alone": al, "ratio": [a / b for a, b in zip(wc, al)]}


COPY_PREFERENCE_TIMES = (0.1, 0.2, 0.3)  # the default guidance interval's noisy end, where a layout is decided
COPY_BASELINES = ("null", "near_miss")


def _copy_probe_clips(seed: int, clips: int, baseline: str) -> dict[str, tuple[list, list[str]]]:
    """{"normal" | "twin": (first-chunk clips, the caption each is told)}, paired by seed: seeds from
    ``seed`` on, keeping a seed when both its clips' captions have near misses (``baseline``
    "near_miss"; every seed for "null"). A twin clip is told the caption of the object it copies."""
    kept: dict[str, tuple[list, list[str]]] = {"normal": ([], []), "twin": ([], [])}
    s = seed
    while len(kept["normal"][0]) < clips:
        normal, twin = data.generate(s, 1), data.generate(s, 1, twin=True)
        told = {"normal": normal.captions[0], "twin": data.object_captions(twin.tracks, twin.config)[0][0]}
        if baseline == "null" or all(vocab.near_miss_captions(c) for c in told.values()):
            for kind, clip in (("normal", normal), ("twin", twin)):
                kept[kind][0].append(clip)
                kept[kind][1].append(told[kind])
        s += 1
        if s - seed > 1000 * clips:  # cannot happen with the simulator's caption mix
            raise RuntimeError(f"found only {len(kept['normal'][0])} of {clips} clips told a caption with near misses")
    return kept


def _caption_gains(model, made: list, told: list[str], baseline: str, ts, draws: int, seed: int) -> np.ndarray:
    """[len(ts), clips]: err(baseline) - err(told caption) per clip, the mean over ``draws`` noise draws
    (the same noise for every caption); the near-miss baseline is the mean over each clip's own."""
    import torch

    from . import train as T
    from .dit import frame_times, noisy_latents

    cfg, lf, n = model.cfg, model.cfg.latent_frames, len(made)
    if baseline == "null":
        others = [[T.NULL_CAPTION] * n]
        weight = np.ones((1, n))
    else:  # row j: each clip's j-th near miss (its last again where it has fewer), counted where it has one
        misses = [vocab.near_miss_captions(c) for c in told]
        width = max(map(len, misses))
        others = [[m[min(j, len(m) - 1)] for m in misses] for j in range(width)]
        weight = np.array([[j < len(m) for m in misses] for j in range(width)], dtype=float)
        weight /= weight.sum(0)
    with torch.no_grad():
        x1 = model.vae.encode(torch.from_numpy(np.stack([c.frames for c in made])))
        x1 = x1.reshape(n * lf, *x1.shape[2:])
        texts = [model.encode_captions(told)] + [model.encode_captions(o) for o in others]
    g = torch.Generator().manual_seed(seed)
    out = np.zeros((len(ts), n))
    for i, t in enumerate(ts):
        t_frames = frame_times(torch.full((n,), float(t)), n, cfg)
        for _ in range(draws):
            noise = torch.randn(x1.shape, generator=g)
            x_t = noisy_latents(x1, noise, t_frames)
            errs = []
            for text, lens in texts:
                with torch.no_grad():
                    v = model.dit(x_t, t_frames, text, lens, (1,) * n, (0,) * n)
                errs.append((v.float() - (x1 - noise)).pow(2).mean((1, 2, 3)).reshape(n, lf).mean(1).numpy())
            out[i] += ((weight * np.array(errs[1:])).sum(0) - errs[0]) / draws
    return out


def copy_preference(model, *, ts: Sequence[float] = COPY_PREFERENCE_TIMES, clips: int = 48, draws: int = 3,
                    seed: int = 9000, baseline: str = "null") -> dict:
    """Whether guidance favours drawing the subject twice: how much a caption lowers the model's
    flow-matching error on the first chunk of twin clips (`data.generate(twin=True)`: one object drawn
    twice, told by the caption of that object) against normal clips (told their own caption).

    For each clip and flow time t in ``ts`` (``draws`` noise draws each, the same for every caption),
    the *caption gain* is err(baseline) - err(caption): the log-ratio that guidance away from the
    baseline follows, up to scale (the model's implicit p(caption | x_t)). ``baseline`` "null": the
    null caption (text guidance, ``cfg_text``); "near_miss": the caption's `vocab.near_miss_captions`,
    the mean of their errors (negative guidance, ``cfg_neg``; only clips told a "moves X" caption have
    them). ``preference`` = gain on twins - gain on normal clips, the mean over the clips with its
    standard error: > 0 means guidance away from that baseline pulls a chunk toward two copies of what
    it names. The normal and the twin clip of a seed are paired; seeds run from ``seed`` (no training
    run draws those)."""
    if isinstance(clips, bool) or not isinstance(clips, int) or clips < 2:
        raise ValueError(f"clips must be an int >= 2 (a standard error needs two), got {clips!r}")
    if isinstance(draws, bool) or not isinstance(draws, int) or draws < 1:
        raise ValueError(f"draws must be a positive int, got {draws!r}")
    if not ts or not all(0.0 <= float(t) < 1.0 for t in ts):
        raise ValueError(f"ts must be flow times in [0, 1) (noisy), got {ts!r}")
    if baseline not in COPY_BASELINES:
        raise ValueError(f"baseline must be one of {', '.join(COPY_BASELINES)}, got {baseline!r}")
    model.eval()
    gains = {kind: _caption_gains(model, made, told, baseline, ts, draws, seed)
             for kind, (made, told) in _copy_probe_clips(seed, clips, baseline).items()}
    diff = (gains["twin"] - gains["normal"]).mean(0)
    return {"t": [float(t) for t in ts], "clips": clips, "draws": draws, "baseline": baseline,
            "gain_normal": [float(x) for x in gains["normal"].mean(1)],
            "gain_twin": [float(x) for x in gains["twin"].mean(1)],
            "preference": float(diff.mean()), "preference_se": float(diff.std(ddof=1) / np.sqrt(clips)),
            "preference_by_t": [float(x) for x in (gains["twin"] - gains["normal"]).mean(1)]}


def format_table(res: dict) -> str:
    """A plain-text table of the headline figures."""
    p = res["prompt_following"]
    rows = [("prompt following (fraction of chunks)", f"{p['fraction']:.3f}",
             "target >= 0.90" + (", by chunk " + " ".join(f"{x:.2f}" for x in p["by_chunk"]) if "by_chunk" in p else "")
             + (f"; whole-video occlusion rule {p['fraction_video_rule']:.3f}" if "fraction_video_rule" in p else ""))]
    if "subject_copies" in res:  # session 39 on
        d = res["subject_copies"]
        rows += [("subject drawn twice or more (frames)", f"{d['duplicated']:.3f}",
                  f"the same videos; missing {d['missing']:.3f}; simulator {d['simulator_duplicated']:.3f}; by chunk "
                  + " ".join(f"{x:.2f}" for x in d["duplicated_by_chunk"]))]
    i = res["image_to_video"]
    rows += [("i2v PSNR first frame (dB)", f"{i['psnr_first_frame']:.2f}", ""),
             ("i2v object persistence (frames)", f"{i['persistent']:.3f}",
              f"vanished {i['vanished']:.3f}, duplicated {i['duplicated']:.3f}"
              + (f", new colour {i['appeared']:.3f}" if "appeared" in i else "")
              + (f"; simulator {i['simulator_persistent']:.3f}, autoencoder {i['autoencoder_persistent']:.3f}"
                 if "simulator_persistent" in i else "")
              + (f"; by chunk {' '.join(f'{x:.2f}' for x in i['by_chunk'])}" if "by_chunk" in i else ""))]
    c = res["continuation"]
    rows += [("continuation position error (px)", f"{c['model_px']:.2f}", f"copy-last baseline {c['copy_last_px']:.2f}")]
    s = res["seams"]
    rows += [("seam ratio (boundary / inside diff)", f"{s['ratio']:.2f}",
              f"boundary {s['boundary']:.2f}, inside {s['inside']:.2f}, simulator {s['simulator_ratio']:.2f}")]
    if "latent_ratio" in s:  # results of session 29 on
        rows += [("latent-frame steps (their / other diff)", f"{s['latent_ratio']:.2f}",
                  f"every 4th frame inside chunks, simulator {s['simulator_latent_ratio']:.2f}")]
    for m in res["memory"]["runs"]:
        where = ", fresh process" if "pid" in m else ""
        rows.append((f"memory {m['chunks']} chunks: peak RSS (MB)", f"{m['peak_rss_mb']:.1f}",
                     f"KV cache {m['kv_cache_bytes'] / 2 ** 20:.2f} MB, tracemalloc {m['tracemalloc_peak_mb']:.1f} MB"
                     f"{where}"))
    if "peak_rss_ratio" in res["memory"]:
        rows.append(("memory ratio last/first (RSS, KV)", f"{res['memory']['peak_rss_ratio']:.3f}",
                     f"KV {res['memory']['kv_ratio']:.3f}"))
    t = res["throughput"]
    rows.append(("throughput (frames/s, CPU)", f"{t['fps']:.1f}", f"{t['frames']} frames in {t['seconds']:.1f} s"))
    w = max(len(r[0]) for r in rows)
    return "\n".join(f"{a:<{w}}  {b:>9}  {c}" for a, b, c in rows)
