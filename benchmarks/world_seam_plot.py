"""Where the seams are: mean frame difference at every frame transition of generated videos, one
curve per decoder and per sampler setting, chunk boundaries marked.

Generates the held-out direction-change videos of ``--seeds`` with the model of ``--weights`` (sampler
defaults), keeps their latents (`generate_chunks(..., keep_latents=True)`), decodes them again with the
decoder of each checkpoint in ``--decoders`` (its encoder must be the model's: `world_sampler_sweep.
same_encoder_vae`), and plots, per decoder, the mean absolute difference between frame i and i+1
(0-255 scale) averaged over the videos; the simulator's own clips of the same prompts are the
reference. ``--settings S ...`` generates the same videos again under each sampler setting (the keys
of `world_sampler_sweep.py`, e.g. ``cfg_prev=0``), one curve each with the model's own decoder. A seam
is a spike at a chunk boundary (every ``chunk_frames`` transitions).

    python benchmarks/world_seam_plot.py --decoders old.safetensors --seeds 18 19 20 21 --out seams.png
    python benchmarks/world_seam_plot.py --settings cfg_prev=0 --seeds 18 19 20 21 --out seams.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", default=None, help="model that generates (default: the shipped small model)")
    ap.add_argument("--decoders", nargs="*", default=[], metavar="W",
                    help="checkpoints whose decoders also draw the same latents (same encoder as --weights)")
    ap.add_argument("--settings", nargs="*", default=[], metavar="S",
                    help="sampler settings that also generate the videos, each \"KEY=VALUE,...\" (world_sampler_sweep.py's "
                         "keys; its image-to-video and also keys do not apply)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[18, 19, 20, 21], help="held-out seeds (default 18-21)")
    ap.add_argument("--chunks", type=int, default=4, help="chunks per video (default 4)")
    ap.add_argument("--steps", type=int, default=None, help="sampler steps per chunk (default: the generator's)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    ap.add_argument("--out", required=True, help="the figure (.png)")
    ap.add_argument("--json", default=None, help="also write the curves here")
    args = ap.parse_args(argv)
    if args.chunks < 2:
        ap.error(f"--chunks must be >= 2 (a seam needs two chunks), got {args.chunks}")
    from world_sampler_sweep import gen_kwargs, parse_setting

    try:
        settings = [(text, parse_setting(text)) for text in args.settings]
    except ValueError as e:
        ap.error(str(e))
    for text, setting in settings:
        if not setting or {"also", "also_lag", "also_motion"} & set(setting):
            ap.error(f"--settings {text!r}: give KEY=VALUE pairs other than the also keys (the defaults are the "
                     f"model's own curve)")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch
    from tqdm.auto import tqdm

    from maskc.world_model import data
    from maskc.world_model import evaluate as ev
    from maskc.world_model.generate import generate_chunks, load_model
    from world_sampler_sweep import same_encoder_vae

    torch.set_num_threads(args.threads)
    model, meta = load_model(args.weights)
    try:
        vaes = [(w, same_encoder_vae(model, load_model(w)[0], w)) for w in args.decoders]
    except ValueError as e:
        ap.error(str(e))
    cfg = data.WorldConfig()
    kw = {} if args.steps is None else {"steps": args.steps}
    curves: dict[str, list[np.ndarray]] = {"simulator": [], "model": []} | {w: [] for w, _ in vaes} \
        | {f"setting {text}": [] for text, _ in settings}
    for s in tqdm(args.seeds, desc="videos"):
        prompts = ev.direction_change_prompts(s, args.chunks, cfg)
        stream = generate_chunks(model, prompts, seed=s, meta=meta, keep_latents=True, **kw)
        curves["model"].append(ev.frame_differences(np.concatenate(list(stream))))
        z = torch.cat(stream.latents)
        for w, vae in vaes:
            curves[w].append(ev.frame_differences(vae.video_of(z).cpu().numpy()))
        for text, setting in settings:
            again = generate_chunks(model, prompts, seed=s, meta=meta, **(kw | gen_kwargs(setting, prompts)))
            curves[f"setting {text}"].append(ev.frame_differences(np.concatenate(list(again))))
        curves["simulator"].append(ev.frame_differences(data.generate_from_prompts(prompts, s, cfg, gravity=False).frames))

    mean = {k: np.mean(v, 0) for k, v in curves.items()}
    stats = {k: ev.seam_stats(m, model.cfg.chunk_frames, model.cfg.time_down) for k, m in mean.items()}
    boundary = (np.arange(len(mean["model"])) + 1) % model.cfg.chunk_frames == 0  # the grey lines
    fig, ax = plt.subplots(figsize=(10, 3.6))
    label = {"model": f"{Path(args.weights).name if args.weights else 'shipped'} (sampler defaults, its own decoder)",
             "simulator": "simulator"} | {w: f"decoder of {Path(w).name}" for w, _ in vaes}
    for k, m in mean.items():
        ax.plot(np.arange(1, len(m) + 1), m, lw=1.4 if k != "simulator" else 1.0,
                ls="--" if k == "simulator" else "-", label=f"{label.get(k, k)}: seams {stats[k]['ratio']:.2f}")
    for b in np.flatnonzero(boundary) + 1:
        ax.axvline(b, color="0.8", lw=0.8, zorder=0)
    ax.set_xlabel("frame transition i -> i+1 (grey: chunk boundaries)")
    ax.set_ylabel("mean |frame difference| (0-255)")
    ax.set_title(f"frame differences of {len(args.seeds)} generated videos (seams: boundary / inside mean)")
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")
    for k, st in stats.items():
        print(f"{label.get(k, k)}: boundary {st['boundary']:.2f}, inside {st['inside']:.2f}, ratio {st['ratio']:.2f}; "
              f"latent-frame steps {st['latent_boundary']:.2f} against {st['other']:.2f} ({st['latent_ratio']:.2f})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"seeds": args.seeds, "chunks": args.chunks, "weights": str(args.weights or "shipped small"),
                       "settings": args.settings,
                       "curves": {k: m.tolist() for k, m in mean.items()}}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
