"""Prompt following of the world model under different sampler settings, and the autoencoder's ceiling.

For each setting (keyword arguments of `generate_chunks`: ``window``, ``cfg_text``, ``cfg_prev``,
``cfg_prev_frames``, ``cfg_neg``, ``steps``, ``shift``, ``ctx_t``, ``eta``, ``cfg_local``, ``cfg_parallel``, ``cfg_rescale``,
``cfg_also``, ``cfg_salient``; ``""`` is `generate_chunks`' defaults, since session 35 with ``cfg_local`` 2, so the settings
recorded as ``cfg_local=2`` before then are today's defaults and ``cfg_local=0`` is the plain guidance of
the defaults before, and since session 37 with ``cfg_prev`` 4 on each chunk's first latent frame
(``cfg_prev=0``: the defaults before; the sweep records its ``defaults``), and since session 39 with ``cfg_salient`` 2 on the first
chunk of a video from nothing (``cfg_salient=0``: the defaults before); ``also=1``: every video is also told every other object's caption,
`data.other_captions` of the simulator's clip (image-to-video: the image's; direction changes: the clip realising the prompts), with
``also_lag=L`` image-to-video chunk k is told chunk max(0, k - L)'s and with ``also_motion=MOTION`` every
object is told that motion; ``also=3``: image-to-video finds its own (``generate_chunks(also="auto")``);
``cfg_lo`` / ``cfg_hi`` are the ends of its ``cfg_interval``, ``eta_lo`` / ``eta_hi`` of its
``eta_interval``; ``pack_branches=0`` / ``1``: the guidance branches one transformer call each / packed
into one, the GPU's default since session 38, ``cuda_graphs=0`` / ``1``: the packed calls run eagerly /
replayed from CUDA graphs, the same) it generates the same held-out
direction-change videos as ``magi eval`` and scores them with the same tracker (and with the
occlusion rule before session 27, ``occlusion="video"``): overall, per chunk position, and per video (the measured motions, whether
the generated first chunk leaves its subject room to keep moving one more chunk,
`evaluate.first_chunk_room`; the seams, `evaluate.seam_score`; the subject's size and blob count per
chunk, `subject_stats`). ``--ceiling`` also scores the simulator's clips after an
autoencoder round trip: what the transformer could reach at best with this autoencoder.
``--run-probe R ...`` (models with caption runs): each video's first chunk alone, told each run R
in turn with the same noise, and where it leaves its subject (`evaluate.first_chunk_room`): whether
the model plans for what a caption's run asks (a longer run should leave more room); ``--probe-setting``
gives it sampler keywords (e.g. run guidance, ``cfg_run=4``). Each direction-change video also
records its object persistence against its own first frame. ``--i2v N`` adds, per setting,
image-to-video runs of N chunks from each seed's first simulator frame (`i2v_videos`: persistence by
chunk against the image, prompt following of what they were told); ``--no-direction`` runs only those.
``--decoders W ...`` decodes each direction-change video's latents again with the autoencoder decoder
of each checkpoint W (its encoder must be the same) and scores those frames too: decoders compared
on the very same generated latents, paired by video (`decoder_runs`).

    python benchmarks/world_sampler_sweep.py --settings "" "cfg_text=4" "window=1" "window=1,cfg_text=4"
    python benchmarks/world_sampler_sweep.py --no-direction --i2v 16 --settings "" "cfg_prev=0" "cfg_prev_frames=0"
    python benchmarks/world_sampler_sweep.py --i2v 16 --settings "eta=0" "" "eta=0.7,eta_lo=0.3"
    python benchmarks/world_sampler_sweep.py --no-direction --i2v 16 --settings "" "cfg_local=0" "cfg_rescale=0.7"
    python benchmarks/world_sampler_sweep.py --no-direction --i2v 16 --settings "" "also=1"
    python benchmarks/world_sampler_sweep.py --no-direction --i2v 16 --settings "also=1,also_lag=3" "also=3"
    python benchmarks/world_sampler_sweep.py --weights W --ceiling --seeds 10 11 12 13 14 15 16 17
    python benchmarks/world_sampler_sweep.py --decoders causal.safetensors --seeds 18 19 20 21
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from maskc.world_model.evaluate import I2V_PROMPTS

def flag(value: str) -> bool:
    """"1" / "0" -> True / False (a setting's on / off value)."""
    if value not in ("0", "1"):
        raise ValueError(value)
    return value == "1"


KEYS = {"window": int, "cfg_text": float, "cfg_prev": float, "steps": int, "shift": float,
        "cfg_lo": float, "cfg_hi": float, "cfg_run": float, "cfg_neg": float, "neg": str, "ctx_t": float, "eta": float,
        "eta_lo": float, "eta_hi": float, "cfg_rescale": float, "cfg_parallel": float, "cfg_local": float,
        "cfg_also": float, "also": int, "also_lag": int, "also_motion": str, "cfg_prev_frames": int,
        "pack_branches": flag, "cuda_graphs": flag, "cfg_salient": float}
# the "also" key: none, every other object's caption (the simulator's), the stream's own (`objects`);
# 2, each object named without a motion, was measured at commit 8bfdc87 and removed
ALSO = {0: False, 1: True, 3: "auto"}
INTERVALS = {"cfg": "cfg_interval", "eta": "eta_interval"}  # P_lo / P_hi: the ends of generate's P_interval


def parse_setting(text: str) -> dict:
    """``"window=1,cfg_text=4"`` -> ``{"window": 1, "cfg_text": 4.0}``; ``""`` -> the defaults."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep or key not in KEYS:
            raise ValueError(f"setting {part!r}: expected KEY=VALUE with KEY one of {', '.join(KEYS)}")
        try:
            out[key] = KEYS[key](value)
        except ValueError:
            raise ValueError(f"setting {part!r}: {value!r} is not a valid {KEYS[key].__name__}") from None
    if out.get("also", 0) not in ALSO:
        raise ValueError(f"setting {text!r}: also must be one of {', '.join(map(str, ALSO))} (none, the simulator's "
                         f"captions, the stream's own)")
    return out


NEGATIVES = ("near", "bounce")  # the "neg" key: generate's default (vocab.near_miss_captions), or the bounce alone


def gen_kwargs(setting: dict, prompts=None) -> dict:
    """A parsed setting as `generate_chunks` keywords (cfg_lo / cfg_hi become ``cfg_interval``; ``neg``
    the negative prompts of ``prompts``)."""
    from maskc.world_model import vocab

    ends = {f"{p}_{end}" for p in INTERVALS for end in ("lo", "hi")}
    kw = {k: v for k, v in setting.items() if k not in ends and k not in ("neg", "also", "also_lag", "also_motion")}
    if setting.get("neg", "near") not in NEGATIVES:
        raise ValueError(f"neg={setting['neg']!r}: expected one of {', '.join(NEGATIVES)}")
    if setting.get("neg") == "bounce" and prompts is not None:
        kw["negative"] = [vocab.near_miss_captions(p)[:1] for p in prompts]
    for p, name in INTERVALS.items():
        if f"{p}_lo" in setting or f"{p}_hi" in setting:
            kw[name] = (setting.get(f"{p}_lo", 0.0), setting.get(f"{p}_hi", 1.0))
    return kw


def direction_also(prompts, seed: int, cfg) -> list[tuple[str, ...]]:
    """The also prompts of a direction-change video (``also=1``): the captions of the other objects of the
    simulator clip that realises its prompts (`data.generate_from_prompts`, as `direction_change_prompts`
    checks it), so the generated scene is told a scene the simulator can play."""
    from maskc.world_model import data

    return data.other_captions(data.generate_from_prompts(prompts, seed, cfg, gravity=False).tracks, cfg)


def subject_stats(frames, prompts, cfg) -> dict:
    """Per chunk, its subject colour's median pixel count over the frames where it is visible (0 when
    never), its median number of blobs (`evaluate.count_blobs`), and the fractions of its frames where
    it is drawn more than once or not at all (`evaluate.subject_copies`): a subject that grows,
    shrinks, is drawn twice or is lost shows here."""
    from maskc.world_model import evaluate as ev
    from maskc.world_model import vocab

    colours = [vocab.parse_caption(p).colour for p in prompts]
    tracks, counts = ev.track_by_colour(frames, sorted(set(colours))), ev.count_blobs(frames, sorted(set(colours)))
    px, blobs = [], []
    for k, colour in enumerate(colours):
        sl = slice(k * cfg.chunk_frames, (k + 1) * cfg.chunk_frames)
        n, vis = tracks[colour]["count"][sl], tracks[colour]["visible"][sl]
        px.append(float(np.median(n[vis])) if vis.any() else 0.0)
        blobs.append(float(np.median(counts[colour][sl])))
    copies = ev.subject_copies(frames, prompts, cfg, counts=counts)  # the blobs counted once
    return {"subject_px": px, "subject_blobs": blobs, "subject_duplicated": copies["duplicated"],
            "subject_missing": copies["missing"]}


def i2v_videos(model, meta, seeds, n_chunks: int, prompts_from: str, setting: dict, cfg) -> dict:
    """Image-to-video from each seed's first simulator frame for ``n_chunks`` chunks
    (`evaluate.image_to_video_run`), told the clip's own captions (``"clip"``: a schedule the simulator
    realised from that frame) or its first caption repeated (``"first"``, what `magi eval` tells: a
    motion that often cannot go on that long). Per video also: the subject's colour and prompt
    following of the captions told; over the videos, vanished / duplicated of the subject's colour
    and of each distractor's apart, and their sizes by chunk (pixels over the image's, mean)."""
    from maskc.world_model import evaluate as ev
    from maskc.world_model import vocab

    per_video = []
    for s in seeds:
        r, frames, _ = ev.image_to_video_run(model, meta, s, n_chunks, prompts=prompts_from, config=cfg,
                                             also=ALSO[setting.get("also", 0)], also_lag=setting.get("also_lag", 0),
                                             also_motion=setting.get("also_motion"),
                                             sampler=lambda told: gen_kwargs(setting, told))
        r["subject"] = vocab.parse_caption(r["prompts"][0]).colour
        r["matches"] = ev.prompt_following(frames, r["prompts"], cfg)["matches"]
        per_video.append(r)

    def colour_share(key: str, subject: bool) -> float:  # the subject's colour, or the distractors'
        return float(np.mean([f[key] for v in per_video for c, f in v["by_colour"].items() if (c == v["subject"]) == subject]
                             or [np.nan]))

    def size_by_chunk(subject: bool) -> list[float]:  # the subject's, or each distractor's, mean over videos
        sizes = [sz for v in per_video for c, sz in v["size_by_chunk"].items() if (c == v["subject"]) == subject]
        return [float(x) for x in np.mean(sizes, axis=0)] if sizes else []

    return {"prompts": prompts_from, "chunks": n_chunks, "videos": per_video,
            **{k: float(np.mean([v[k] for v in per_video]))
               for k in ("persistent", "vanished", "duplicated", "appeared", "psnr_first_frame", "simulator_persistent")},
            "subject": {k: colour_share(k, True) for k in ("vanished", "duplicated")} | {"size_by_chunk": size_by_chunk(True)},
            "distractors": {k: colour_share(k, False) for k in ("vanished", "duplicated")}
            | {"size_by_chunk": size_by_chunk(False)},
            "by_chunk": ev.by_chunk([v["by_chunk"] for v in per_video]),
            "prompt_following": float(np.mean([m for v in per_video for m in v["matches"]]))}


def run_probe(model, meta, videos, runs, cfg, setting: dict | None = None) -> dict:
    """Per video, its first chunk generated alone and told each run in ``runs``: `first_chunk_room` of each
    (``setting``: sampler keywords, as for a sweep setting, e.g. ``{"cfg_run": 4.0}``)."""
    from maskc.world_model import evaluate as ev
    from maskc.world_model.generate import generate_chunks

    if not model.cfg.caption_runs or max(runs) > model.cfg.caption_runs or min(runs) < 0:
        raise SystemExit(f"--run-probe: runs must lie in [0, {model.cfg.caption_runs}] (this model's caption_runs)")
    per_video = []
    for s, prompts in videos:
        room = {}
        for r in runs:
            chunk = next(iter(generate_chunks(model, prompts[:1], seed=s, meta=meta, runs=[r],
                                              **gen_kwargs(setting or {}, prompts[:1]))))
            room[r] = ev.first_chunk_room(chunk, prompts[0], cfg)
        per_video.append({"seed": s, "prompt": prompts[0], "room": room})
    ok = [v["room"] for v in per_video if all(v["room"][r] is not None for r in runs)]
    summary = {r: {k: float(np.mean([v[r][k] for v in ok])) for k in ("speed", "room_px", "same_velocity", "slowest")}
               for r in runs}
    diff = np.array([v[runs[-1]]["speed"] - v[runs[0]]["speed"] for v in ok])
    out = {"videos": per_video, "scored": len(ok), "summary": summary,
           "speed_difference_last_minus_first": float(diff.mean()) if len(ok) else None,
           "speed_difference_stderr": float(diff.std() / np.sqrt(len(ok))) if len(ok) > 1 else None}
    for r in runs:
        m = summary[r]
        print(f"run probe, told run {r}: speed {m['speed']:.3f} px/frame, room {m['room_px']:.1f} px, leaving room "
              f"at its velocity {m['same_velocity']:.2f} ({len(ok)} first chunks)", flush=True)
    if len(ok) > 1:
        print(f"run probe: speed(run {runs[-1]}) - speed(run {runs[0]}) = {out['speed_difference_last_minus_first']:+.3f} "
              f"+- {out['speed_difference_stderr']:.3f} px/frame (paired by seed)", flush=True)
    return out


def same_encoder_vae(model, other, name):
    """``other``'s autoencoder, checked to encode as ``model``'s does (its decoder then reads the
    latents ``model`` generates); ValueError naming ``name`` otherwise."""
    import torch

    a, b = model.vae.state_dict(), other.vae.state_dict()
    for k, v in a.items():
        if not k.startswith("decoder.") and not torch.equal(v, b[k]):
            raise ValueError(f"--decoders {name}: its autoencoder encodes differently ({k} differs), so its decoder "
                             f"does not read this model's latents")
    return other.vae


def decoder_scores(vae, latents, prompts, cfg) -> dict:
    """Prompt following and seams of a video's latents (`ChunkStream.latents`) decoded by ``vae``
    chunk by chunk with its own context, as a stream decodes them."""
    import torch

    from maskc.world_model import evaluate as ev

    frames = vae.video_of(torch.cat(latents)).cpu().numpy()
    r = ev.prompt_following(frames, prompts, cfg)
    return {"matches": r["matches"], "seams": ev.seam_score(frames, cfg.chunk_frames)}


def _paired(diffs) -> dict:
    d = np.asarray(diffs, float)
    return {"mean": float(d.mean()), "se": float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("nan"),
            "videos": len(d)}


def decoder_runs(weights, per_video) -> list[dict]:
    """Per decoder: prompt following and seams of its frames, and paired by video against the model's
    own decoder (its frames minus the model's)."""
    from maskc.world_model import evaluate as ev

    out = []
    for i, w in enumerate(weights):
        dv = [v["decoders"][i] for v in per_video]
        out.append({"weights": w, "prompt_following": float(np.mean([m for d in dv for m in d["matches"]])),
                    "by_chunk": ev.by_chunk([d["matches"] for d in dv]),
                    "seams": {k: float(np.mean([d["seams"][k] for d in dv])) for k in ev.SEAM_KEYS},
                    "paired_prompt_following": _paired([np.mean(d["matches"]) - np.mean(v["matches"])
                                                        for d, v in zip(dv, per_video)]),
                    "paired_seams": _paired([d["seams"]["ratio"] - v["seams"]["ratio"] for d, v in zip(dv, per_video)])})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", default=None, help="checkpoint (default: the shipped small model)")
    ap.add_argument("--seeds", type=int, nargs="+", default=list(range(10, 18)), help="held-out seeds (default 10-17)")
    ap.add_argument("--chunks", type=int, default=4, help="chunks per video (default 4)")
    ap.add_argument("--settings", nargs="*", default=[""],
                    help='sampler settings, each "KEY=VALUE,..." ("" = the defaults; the option with none: only '
                         '--ceiling, --room, --run-probe); keys: ' + ", ".join(KEYS))
    ap.add_argument("--ceiling", action="store_true", help="also score the autoencoder round trip of the simulator's clips")
    ap.add_argument("--room", type=int, default=0, metavar="N",
                    help="also count, over N simulator clips, how often a first chunk 'moves X' leaves room to keep "
                         "moving X through the next chunk (what bounds the videos' second chunk; no model needed)")
    ap.add_argument("--run-probe", type=int, nargs="+", default=None, metavar="R",
                    help="models with caption runs: generate each video's first chunk alone told each run R "
                         "(same noise) and record its speed and room (paired by seed)")
    ap.add_argument("--probe-setting", default="", metavar="SETTING",
                    help='sampler setting of the run probe, "KEY=VALUE,..." as for --settings (e.g. "cfg_run=4")')
    ap.add_argument("--i2v", type=int, default=0, metavar="N",
                    help="per setting, also image-to-video of N chunks from each seed's first simulator frame: "
                         "object persistence by chunk and prompt following (instead of the direction-change "
                         "videos with --no-direction)")
    ap.add_argument("--i2v-prompts", choices=I2V_PROMPTS, default="clip",
                    help="what the image-to-video runs are told: the clip's own captions (default) or its first "
                         "caption repeated")
    ap.add_argument("--no-direction", action="store_true",
                    help="skip the direction-change videos (with --i2v: the image-to-video runs only)")
    ap.add_argument("--decoders", nargs="+", default=[], metavar="W",
                    help="also decode every direction-change video's latents with the decoder of each checkpoint W "
                         "(same encoder) and score those frames, paired by video")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                    help="where the model runs (default cpu; the figures in docs/benchmarks.md are CPU runs unless "
                         "said: GPU arithmetic differs, so compare settings within one device)")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)
    try:
        settings = [(s, parse_setting(s)) for s in args.settings]
        probe_setting = parse_setting(args.probe_setting)
    except ValueError as e:
        ap.error(str(e))
    if args.i2v < 0:
        ap.error(f"--i2v must be >= 0 (0: none), got {args.i2v}")
    if args.no_direction and not args.i2v:
        ap.error("--no-direction leaves nothing to run without --i2v N")
    if not args.no_direction and any(ALSO[kw.get("also", 0)] == "auto" for _, kw in settings):
        ap.error("also=3 (the stream's own also prompts) needs an image: it is for the --i2v runs; add --no-direction "
                 "(the direction-change videos start from text)")

    import torch

    from maskc.world_model import data
    from maskc.world_model import evaluate as ev
    from maskc.world_model.generate import generate_chunks, load_model, sampler_defaults

    torch.set_num_threads(args.threads)
    model, meta = load_model(args.weights, device=args.device)
    try:
        decoders = [(w, same_encoder_vae(model, load_model(w, device=args.device)[0], w)) for w in args.decoders]
    except ValueError as e:
        ap.error(str(e))
    cfg = data.WorldConfig()
    videos = [(s, ev.direction_change_prompts(s, args.chunks, cfg)) for s in args.seeds]

    def write(res):
        if args.json:
            with open(args.json, "w") as f:
                json.dump(res, f, indent=1)

    res = {"weights": str(args.weights or "shipped small"), "seeds": args.seeds, "chunks": args.chunks,
           "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
           "defaults": sampler_defaults(), "runs": []}  # what a setting leaves out ("" = all of them)
    if args.ceiling:
        matches = []
        for s, prompts in videos:
            clip = data.generate_from_prompts(prompts, s, cfg, gravity=False)
            rec = model.vae.round_trip(clip.frames).cpu().numpy()
            matches += ev.prompt_following(rec, prompts, cfg)["matches"]
        res["autoencoder_ceiling"] = float(np.mean(matches))
        print(f"autoencoder round trip of the simulator's clips: prompt following {res['autoencoder_ceiling']:.3f}")
    if args.room:
        res["room_to_continue"] = ev.room_to_continue(args.room, config=cfg)
        r = res["room_to_continue"]
        print(f"room to keep moving one more chunk ({r['clips']} simulator clips): at the same velocity "
              f"{r['same_velocity']:.2f}, at the slowest moving speed {r['slowest']:.2f}", flush=True)
    if args.run_probe:
        res["run_probe"] = run_probe(model, meta, videos, args.run_probe, cfg, probe_setting)
    for text, kw in settings:
        t0 = time.perf_counter()
        run = {"setting": kw}
        if args.i2v:
            run["i2v"] = i2v_videos(model, meta, args.seeds, args.i2v, args.i2v_prompts, kw, cfg)
            iv = run["i2v"]
            print(f"{text or '(defaults)':<28} image-to-video ({args.i2v} chunks, {args.i2v_prompts} prompts): "
                  f"persistence {iv['persistent']:.3f} (simulator {iv['simulator_persistent']:.3f}; vanished "
                  f"{iv['vanished']:.3f}, duplicated {iv['duplicated']:.3f}, new colour {iv['appeared']:.3f}; subject "
                  f"vanished / duplicated {iv['subject']['vanished']:.3f} / {iv['subject']['duplicated']:.3f}, each "
                  f"distractor {iv['distractors']['vanished']:.3f} / {iv['distractors']['duplicated']:.3f}), prompt following "
                  f"{iv['prompt_following']:.3f}, first-frame PSNR {iv['psnr_first_frame']:.1f} dB", flush=True)
            print(f"{'':<28} size by chunk (pixels / the image's): subject "
                  + " ".join(f"{x:.2f}" for x in iv["subject"]["size_by_chunk"]) + "; each distractor "
                  + " ".join(f"{x:.2f}" for x in iv["distractors"]["size_by_chunk"]), flush=True)
        if args.no_direction:
            run["seconds"] = time.perf_counter() - t0
            res["runs"].append(run)
            write(res)
            continue
        per_video = []
        for s, prompts in videos:
            also = direction_also(prompts, s, cfg) if kw.get("also") else None
            stream = generate_chunks(model, prompts, seed=s, meta=meta, keep_latents=bool(decoders), also=also,
                                     **gen_kwargs(kw, prompts))
            frames = np.concatenate(list(stream))
            decoded = [decoder_scores(vae, stream.latents, prompts, cfg) for _, vae in decoders]
            r = ev.prompt_following(frames, prompts, cfg)
            r_video = ev.prompt_following(frames, prompts, cfg, occlusion="video")  # the rule before session 27
            room = ev.first_chunk_room(frames[:cfg.chunk_frames], prompts[0], cfg)
            per_video.append({"seed": s, "matches": r["matches"], "measured": r["measured"],
                              "matches_video_rule": r_video["matches"], "measured_video_rule": r_video["measured"],
                              "first_chunk_room": room, "seams": ev.seam_score(frames, cfg.chunk_frames),
                              # objects against the video's own first frame
                              "persistent": ev.object_persistence(frames, frames[0])["persistent"],
                              **subject_stats(frames, prompts, cfg)} | ({"decoders": decoded} if decoded else {}))
        matches = [m for v in per_video for m in v["matches"]]
        rooms = [v["first_chunk_room"] for v in per_video if v["first_chunk_room"] is not None]
        run |= {"prompt_following": float(np.mean(matches)), "chunks_scored": len(matches),
               "prompt_following_video_rule": float(np.mean([m for v in per_video for m in v["matches_video_rule"]])),
               "by_chunk": ev.by_chunk([v["matches"] for v in per_video]), "videos": per_video,
               "first_chunk_room": {k: float(np.mean([r[k] for r in rooms])) if rooms else None
                                    for k in ("same_velocity", "slowest")} | {"videos": len(rooms)},
               "seams": {k: float(np.mean([v["seams"][k] for v in per_video])) for k in ev.SEAM_KEYS},
               "persistent": float(np.mean([v["persistent"] for v in per_video])),
               "subject_duplicated_by_chunk": np.mean([v["subject_duplicated"] for v in per_video], 0).tolist(),
               "subject_missing_by_chunk": np.mean([v["subject_missing"] for v in per_video], 0).tolist(),
               "seconds": time.perf_counter() - t0}
        if decoders:
            run["decoder_runs"] = decoder_runs([w for w, _ in decoders], per_video)
        res["runs"].append(run)
        write(res)  # after every setting: a run cut short keeps the settings it finished
        print(f"{text or '(defaults)':<28} prompt following {run['prompt_following']:.3f} "
              f"({len(matches)} chunks, {run['seconds']:.0f} s); by chunk "
              + " ".join(f"{x:.2f}" for x in run["by_chunk"])
              + f"; the whole-video occlusion rule {run['prompt_following_video_rule']:.3f}", flush=True)
        sm = run["seams"]
        print(f"{'':<28} seams: boundary / inside frame difference {sm['ratio']:.2f} ({sm['boundary']:.2f} / "
              f"{sm['inside']:.2f}; per-video mean); latent-frame steps {sm['latent_ratio']:.2f}; object persistence "
              f"against the first frame "
              f"{run['persistent']:.3f}", flush=True)
        print(f"{'':<28} subject drawn more than once in "
              + " ".join(f"{x:.2f}" for x in run["subject_duplicated_by_chunk"]) + " of the frames by chunk (missing "
              + " ".join(f"{x:.2f}" for x in run["subject_missing_by_chunk"]) + ")", flush=True)
        for d in run.get("decoder_runs", []):
            print(f"{'':<28} decoder of {d['weights']}: prompt following {d['prompt_following']:.3f} (paired "
                  f"{d['paired_prompt_following']['mean']:+.4f} +- {d['paired_prompt_following']['se']:.4f}), seams "
                  f"{d['seams']['ratio']:.2f} (paired {d['paired_seams']['mean']:+.3f} +- {d['paired_seams']['se']:.3f}), "
                  f"latent-frame steps {d['seams']['latent_ratio']:.2f}",
                  flush=True)
        fr = run["first_chunk_room"]
        if fr["videos"]:
            print(f"{'':<28} first chunks leaving room ({fr['videos']} videos): at their velocity "
                  f"{fr['same_velocity']:.2f}, at the slowest moving speed {fr['slowest']:.2f}", flush=True)
    write(res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
