"""Prompt following against the subject drawn twice: one point per sampler setting, from direction-change sweeps.

Reads the JSON files that ``world_sampler_sweep.py --json FILE`` writes (`sweep_files`: the parts of one
sweep run in parallel processes are merged by setting, a seed seen twice for one setting is an error;
files of several checkpoints are told apart, ``WEIGHTS: SETTING``) and plots, per
setting, the fraction of frames in which the prompt's subject is drawn twice or more
(`evaluate.subject_copies`, x) against the fraction of chunks whose motion follows the prompt (y), each
with one standard error over the videos. Guidance buys prompt following with copies of the subject; a
setting up and to the left of another is better on both. Prints the same figures as a table, paired by
video against the first setting (or ``--base``).

    python benchmarks/world_sampler_sweep.py --device cuda --settings "" "cfg_salient=0" --seeds $(seq 3000 3095) --json s.json
    python benchmarks/world_copies_plot.py s.json --label ":defaults" --label "cfg_salient=0:before" --out copies.png
    python benchmarks/world_copies_plot.py ctl.json twin.json --label "twin: :twin clips"   # two checkpoints, paired
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

import sweep_files  # benchmarks/sweep_files.py, beside this script


def by_setting(paths) -> dict[str, dict[int, dict]]:
    """{setting label: {seed: video record}} of the direction-change videos in the sweep files ``paths``
    (`sweep_files.videos_by_setting`: ``""`` is the defaults; files of several checkpoints or sampler
    defaults are told apart in the labels)."""
    out = sweep_files.videos_by_setting(paths, "direction")
    for label, videos in out.items():
        if any("subject_duplicated" not in v for v in videos.values()):
            raise ValueError(f"setting {label or '(defaults)'!r} has videos without subject_duplicated "
                             "(a sweep from before session 39)")
    if not out:
        raise ValueError("no direction-change videos in " + ", ".join(map(str, paths)))
    return out


def figures(videos: dict[int, dict], base: dict[int, dict] | None = None) -> dict:
    """Means (and standard errors over the videos) of prompt following and the subject drawn twice or more;
    with ``base``, the differences paired by seed over the seeds both have."""
    seeds = sorted(videos)
    pf = np.array([np.mean(videos[s]["matches"]) for s in seeds])
    dup = np.array([np.mean(videos[s]["subject_duplicated"]) for s in seeds])

    def se(x):
        return float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else float("nan")

    out = {"videos": len(seeds), "prompt_following": float(pf.mean()), "prompt_following_se": se(pf),
           "duplicated": float(dup.mean()), "duplicated_se": se(dup)}
    if base is not None:
        common = [s for s in seeds if s in base]
        if common:
            dpf = np.array([np.mean(videos[s]["matches"]) - np.mean(base[s]["matches"]) for s in common])
            ddup = np.array([np.mean(videos[s]["subject_duplicated"]) - np.mean(base[s]["subject_duplicated"])
                             for s in common])
            out |= {"paired_videos": len(common), "paired_prompt_following": float(dpf.mean()),
                    "paired_prompt_following_se": se(dpf), "paired_duplicated": float(ddup.mean()),
                    "paired_duplicated_se": se(ddup)}
    return out


def draw(rows: dict, names: dict, base_label: str, title: str, out: str) -> None:
    """The scatter: one numbered point per setting with its standard errors, named in a legend beside it
    (the base setting red, the named ones green)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 5.5))
    for i, (k, r) in enumerate(rows.items(), 1):  # numbered points, named in the legend (names overlap)
        colour = "C3" if k == base_label else ("C2" if k in names else "C0")
        ax.errorbar(r["duplicated"], r["prompt_following"], xerr=r["duplicated_se"], yerr=r["prompt_following_se"],
                    fmt="o", capsize=3, color=colour, label=f"{i}  {names.get(k, k or '(defaults)')}")
        ax.annotate(str(i), (r["duplicated"], r["prompt_following"]), fontsize=8, xytext=(4, 4),
                    textcoords="offset points", color=colour)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=7, frameon=False, handlelength=1)
    ax.set(xlabel="frames with the subject drawn twice or more (simulator: under 0.001)",
           ylabel="chunks whose motion follows the prompt")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+", help="sweep JSON files (world_sampler_sweep.py --json)")
    ap.add_argument("--base", help="the setting to pair against (its label, e.g. \"\" or cfg_salient=0; default: the first)")
    ap.add_argument("--label", action="append", default=[], metavar="SETTING:NAME",
                    help="a name for a setting in the plot and the table (\":defaults\" names the defaults); repeatable")
    ap.add_argument("--title", default="prompt following against the subject drawn twice or more")
    ap.add_argument("--out", help="write the plot here (PNG); without it, only the table")
    args = ap.parse_args(argv)
    names = {}
    for item in args.label:
        key, sep, name = item.rpartition(":")  # a checkpoint's label holds ": ", the name may not
        if not sep or not name:
            ap.error(f"--label {item!r}: expected SETTING:NAME")
        names[key] = name
    try:
        runs = by_setting(args.files)
    except (OSError, ValueError) as e:
        ap.error(str(e))
    base_label = next(iter(runs)) if args.base is None else args.base
    if base_label not in runs:
        ap.error(f"--base {base_label!r}: no such setting; the files have " + ", ".join(repr(k) for k in runs))
    rows = {k: figures(v, None if k == base_label else runs[base_label]) for k, v in runs.items()}
    width = max(len(names.get(k, k or "(defaults)")) for k in rows)
    print(f"{'setting':<{width}}  videos  prompt following  subject twice+   paired vs {names.get(base_label, base_label or '(defaults)')}")
    for k, r in rows.items():
        paired = (f"{r['paired_prompt_following']:+.3f} +- {r['paired_prompt_following_se']:.3f} / "
                  f"{r['paired_duplicated']:+.3f} +- {r['paired_duplicated_se']:.3f}") if "paired_videos" in r else ""
        print(f"{names.get(k, k or '(defaults)'):<{width}}  {r['videos']:>6}  {r['prompt_following']:.3f} +- "
              f"{r['prompt_following_se']:.3f}   {r['duplicated']:.3f} +- {r['duplicated_se']:.3f}   {paired}")
    if args.out:
        draw(rows, names, base_label, args.title, args.out)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
