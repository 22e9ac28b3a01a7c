"""Object persistence by chunk position: one curve per sampler setting, from image-to-video sweeps.

Reads the JSON files that ``world_sampler_sweep.py --i2v N --json FILE`` writes (several files, e.g. the
parts of one sweep run in parallel processes, are merged by setting; a seed seen twice for one setting
is an error; files of different ``--weights`` are told apart, each setting then labelled ``WEIGHTS:
SETTING`` with the checkpoint's file stem; files run under different sampler defaults, which the sweep
records since session 35, likewise: ``SETTING [defaults: cfg_local=2.0]``) and plots, per setting, the
mean fraction of frames whose objects are all there exactly once (`evaluate.object_persistence`) at each
chunk position, with a band of one standard error over the videos. Prints the same figures as a table,
with the settings paired by video against the first one.

    python benchmarks/world_sampler_sweep.py --device cuda --no-direction --i2v 16 --settings "eta=0" "" --json p0.json
    python benchmarks/world_persistence_plot.py p0.json --label "eta=0=Euler" --out persistence.png
    python benchmarks/world_sampler_sweep.py --weights ft.safetensors --no-direction --i2v 16 --settings "" --json p1.json
    python benchmarks/world_persistence_plot.py p0.json p1.json --out weights.png   # "shipped small: defaults", "ft: defaults", ...
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

import sweep_files  # benchmarks/sweep_files.py, beside this script


def by_setting(paths) -> dict[str, dict[int, dict]]:
    """{setting label: {seed: video record}} of every image-to-video run in the sweep files ``paths``
    (`sweep_files.videos_by_setting`: "defaults" is the defaults; labels ``WEIGHTS: SETTING`` when the
    files come from more than one checkpoint, and ``SETTING [defaults: ...]`` when they were run under
    different sampler defaults)."""
    return sweep_files.videos_by_setting(paths, "i2v", defaults_label="defaults")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sweeps", nargs="+", metavar="SWEEP.json", help="world_sampler_sweep.py --i2v N --json outputs")
    ap.add_argument("--out", required=True, help="the figure (.png)")
    ap.add_argument("--title", default="object persistence by chunk (image-to-video)", help="the figure's title")
    ap.add_argument("--label", action="append", default=[], metavar="SETTING=TEXT",
                    help='name a setting in the figure and the table (e.g. "eta=0=Euler"; TEXT without "="; repeatable)')
    args = ap.parse_args(argv)
    try:
        runs = by_setting(args.sweeps)
    except (OSError, ValueError, KeyError) as e:
        ap.error(str(e))
    for item in args.label:
        old, sep, new = item.rpartition("=")  # a setting holds "=", the text may not
        if not sep or old not in runs:
            ap.error(f"--label {item!r}: expected SETTING=TEXT with SETTING one of {', '.join(runs)}")
        runs = {new if k == old else k: v for k, v in runs.items()}
    if not runs:
        ap.error("no image-to-video runs in these files (run the sweep with --i2v N)")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = next(iter(runs))
    width = max(len(k) for k in [*runs, "setting"])
    fig, ax = plt.subplots(figsize=(7, 4))
    print(f"{'setting':<{width}} {'videos':>6} {'persistent':>10} {'paired vs the first':>20}  by chunk")
    for label, videos in runs.items():
        curves = np.array([v["by_chunk"] for v in videos.values()])
        mean = curves.mean(0)
        err = curves.std(0, ddof=1) / np.sqrt(len(curves)) if len(curves) > 1 else np.zeros_like(mean)
        x = np.arange(1, len(mean) + 1)
        ax.plot(x, mean, marker="o", ms=3, label=f"{label} ({len(curves)} videos)")
        ax.fill_between(x, mean - err, mean + err, alpha=0.2)
        overall = float(np.mean([v["persistent"] for v in videos.values()]))
        shared = sorted(set(videos) & set(runs[first]))
        d = np.array([videos[s]["persistent"] - runs[first][s]["persistent"] for s in shared])
        paired = f"{d.mean():+.3f} +- {d.std(ddof=1) / np.sqrt(len(d)):.3f}" if len(d) > 1 else "-"
        print(f"{label:<{width}} {len(curves):>6} {overall:>10.3f} {paired:>20}  {' '.join(f'{m:.2f}' for m in mean)}")
    sims = [v["simulator_persistent"] for vs in runs.values() for v in vs.values() if "simulator_persistent" in v]
    if sims:  # records of sweeps before session 28 do not hold it
        ax.axhline(np.mean(sims), color="k", ls="--", lw=1, label=f"simulator ({np.mean(sims):.3f})")
    ax.set(xlabel="chunk (1 s, 24 frames)", ylabel="frames with every object once", ylim=(0, 1.02), title=args.title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
