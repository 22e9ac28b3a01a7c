"""How faithful is the prompt-following tracker? Checked against the simulator's own captions.

Three measurements, no transformer involved:

1. **Agreement** of `evaluate.prompt_following`'s measured motions with the simulator's captions,
   on random clips (`data.generate`) and on the direction-change clips of the evaluation
   (`data.generate_from_prompts`, planned with and without lookahead, so that some chunks end near
   a wall and the next one turns), under the tracker's rules (`RULES`): the current one (a reversal
   near a wall is a hit only where the subject's pixels reach it, `evaluate.EDGE_MARGIN`; frames
   where the subject covers less than `evaluate.OCCLUDED` of its median over the chunk are left out),
   the one before it (that median over the whole video) and the centroid-only wall rule before that.
2. **Wall-hit gaps**: at every simulated wall hit of a uniquely coloured subject, how far its
   pixels stay from the wall (frames t-1 .. t+2), on the simulator's frames and after the shipped
   autoencoder's round trip (what generated frames look like at best): the margin the rule needs.
3. With ``--videos FILE.npz`` (arrays named by seed, uint8 [T, 64, 64, 3], the direction-change videos
   a model generated for those seeds, T // 24 chunks each), prompt following under each rule.

    python benchmarks/world_tracker_check.py --clips 400 --hit-clips 150 --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np


# the tracker's rules compared: name -> prompt_following keywords (the first is the current one)
RULES = {"chunk": {"occlusion": "chunk"},  # since session 27: the occlusion filter's median per chunk
         "extent": {"occlusion": "video"},  # sessions 23-26: its median over the whole video
         "centroid": {"occlusion": "video", "use_extent": False}}  # before session 23: wall hits by the centroid


def agreement(clips, rule: dict, cfg) -> dict:
    from maskc.world_model import evaluate as ev
    from maskc.world_model import vocab

    right = total = 0
    for clip in clips:
        measured = ev.prompt_following(clip.frames, clip.captions, cfg, **rule)["measured"]
        truth = [vocab.parse_caption(c).motion for c in clip.captions]
        right += sum(m == t for m, t in zip(measured, truth))
        total += len(truth)
    return {"chunks": total, "agree": right, "fraction": right / max(total, 1)}


def gap_summary(g) -> dict:
    g = np.asarray(g, np.float64)
    return {"hits": int(len(g)), "median": float(np.median(g)), "p99": float(np.percentile(g, 99)),
            "max": float(g.max()), "hist": {str(int(k)): int((g == k).sum()) for k in np.unique(g)}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clips", type=int, default=400, help="clips per agreement set (default 400)")
    ap.add_argument("--first-seed", type=int, default=5000, help="first simulator seed of the agreement sets")
    ap.add_argument("--chunks", type=int, default=4, help="chunks per clip of the agreement sets (default 4)")
    ap.add_argument("--hit-clips", type=int, default=150, help="random clips for the wall-hit gaps (default 150)")
    ap.add_argument("--weights", default=None, help="checkpoint whose autoencoder to use (default: shipped)")
    ap.add_argument("--videos", nargs="*", default=[], metavar="NPZ",
                    help="generated direction-change videos (arrays named by seed) to score under both rules")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)
    if args.clips < 1 or args.hit_clips < 1:
        ap.error("--clips and --hit-clips must be >= 1")
    if args.chunks < 2:
        ap.error("--chunks must be >= 2 (a direction change needs two chunks)")

    from tqdm import tqdm

    from maskc.world_model import data
    from maskc.world_model import evaluate as ev
    from maskc.world_model.generate import load_model

    cfg = data.WorldConfig()
    res = {"edge_margin": ev.EDGE_MARGIN, "wall_margin": ev.WALL_MARGIN, "chunks": args.chunks, "agreement": {}}
    t0 = time.perf_counter()
    seeds = range(args.first_seed, args.first_seed + args.clips)
    sets = {"random": [data.generate(s, args.chunks, cfg) for s in tqdm(seeds, desc="random clips", leave=False)]}
    for lookahead in (True, False):
        clips = []
        for s in tqdm(seeds, desc=f"direction-change clips, lookahead {lookahead}", leave=False):
            try:
                clips.append(data.generate_from_prompts(ev.direction_change_prompts(s, args.chunks, cfg), s, cfg,
                                                        gravity=False, lookahead=lookahead))
            except ValueError:
                pass
        sets[f"direction_change_lookahead_{lookahead}"] = clips
    for name, clips in sets.items():
        res["agreement"][name] = {rule: agreement(clips, kw, cfg) for rule, kw in RULES.items()}
        a = res["agreement"][name]
        print(f"{name:<36} agreement with the simulator's captions: "
              + ", ".join(f"{rule} rule {a[rule]['fraction']:.4f}" for rule in RULES)
              + f" ({a['chunk']['chunks']} chunks)", flush=True)

    model, _ = load_model(args.weights)
    sim, rec = [], []
    for s in tqdm(range(7000, 7000 + args.hit_clips), desc="wall hits", leave=False):
        clip = data.generate(s, 4, cfg)
        frames = model.vae.round_trip(clip.frames).numpy()
        sim += [gap for _, gap in ev.wall_hit_gaps(clip.frames, clip)]
        rec += [gap for _, gap in ev.wall_hit_gaps(frames, clip)]
    res["hit_gaps"] = {"simulator": gap_summary(sim), "autoencoder_round_trip": gap_summary(rec)}
    for name, g in res["hit_gaps"].items():
        print(f"wall hits, {name:<24} {g['hits']} hits: pixels within {g['max']:.0f} px of the wall at most "
              f"(median {g['median']:.0f}, 99th percentile {g['p99']:.0f})", flush=True)

    res["videos"] = {}
    for path in args.videos:
        z = np.load(path)
        out = {}
        for rule, kw in RULES.items():
            m = [ev.prompt_following(z[k], ev.direction_change_prompts(
                int(k), z[k].shape[0] // cfg.chunk_frames, cfg), cfg, **kw)["matches"]
                for k in z.files]
            out[rule] = {"prompt_following": float(np.mean([x for v in m for x in v])), "by_chunk": ev.by_chunk(m),
                         "videos": len(m)}
        res["videos"][path] = out
        print(f"{path}: prompt following " + ", ".join(f"{out[rule]['prompt_following']:.3f} ({rule} rule)"
                                                    for rule in RULES) + f", {len(z.files)} videos", flush=True)
    res["seconds"] = time.perf_counter() - t0
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
