"""Reading the JSON files of ``world_sampler_sweep.py --json``: video records by setting.

The parts of one sweep (run in parallel processes over different seeds) are merged by setting; a seed
seen twice for one setting is an error. Files of different checkpoints (``--weights``) are told apart,
each label then ``WEIGHTS: SETTING`` with the checkpoint's file stem, and files run under different
sampler defaults (the sweep records its ``defaults`` since session 35) likewise, ``SETTING [defaults:
cfg_local=2.0]``. Used by `world_copies_plot.py` (direction-change videos) and
`world_persistence_plot.py` (image-to-video runs).
"""

from __future__ import annotations

import json
from pathlib import Path

PARTS = ("direction", "i2v")


def setting_label(setting: dict) -> str:
    """``{"cfg_salient": 4.0}`` -> ``"cfg_salient=4"``; ``{}`` -> ``""`` (the defaults)."""
    return ",".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in setting.items())


def weights_name(weights) -> str:
    """How a sweep file names its checkpoint: "shipped small", or a ``--weights`` path's file stem."""
    if not weights:
        return "shipped small"
    return weights if weights.startswith("shipped") else Path(weights).stem


def defaults_names(records) -> list[str]:
    """Per file, how its sampler defaults differ from the other files': "" when all files agree (or
    none records them), else the keys whose values differ (``cfg_local=2.0``) or "unrecorded"."""
    if len({json.dumps(r, sort_keys=True) for r in records}) <= 1:
        return [""] * len(records)
    known = [r for r in records if r is not None]
    keys = sorted({k for r in known for k in r if len({json.dumps(o.get(k)) for o in known}) > 1})
    return ["unrecorded" if r is None else ",".join(f"{k}={r.get(k)}" for k in keys) or "recorded" for r in records]


def _videos(run: dict, part: str) -> list[dict] | None:
    if part == "direction":
        return run.get("videos") or None
    return run["i2v"]["videos"] if "i2v" in run else None


def videos_by_setting(paths, part: str, defaults_label: str = "") -> dict[str, dict[int, dict]]:
    """{label: {seed: video record}} of the ``part`` runs ("direction": direction-change videos, "i2v":
    image-to-video runs) in the sweep files ``paths``; the settings' labels are `setting_label`, with
    ``defaults_label`` for the defaults, told apart by checkpoint and sampler defaults (module doc)."""
    if part not in PARTS:
        raise ValueError(f"part must be one of {', '.join(PARTS)}, got {part!r}")
    files = []
    for path in paths:
        with open(path) as f:
            files.append((path, json.load(f)))
    names = {weights_name(res.get("weights")) for _, res in files}
    defaults = defaults_names([res.get("defaults") for _, res in files])
    out: dict[str, dict[int, dict]] = {}
    for (path, res), under in zip(files, defaults):
        for run in res.get("runs", []):
            videos = _videos(run, part)
            if videos is None:
                continue
            label = setting_label(run["setting"]) or defaults_label
            if len(names) > 1:
                label = f"{weights_name(res.get('weights'))}: {label}"
            if under:
                label = f"{label} [defaults: {under}]"
            seen = out.setdefault(label, {})
            for v in videos:
                if v["seed"] in seen:
                    raise ValueError(f"{path}: seed {v['seed']} of setting {label or '(defaults)'!r} is also in another file")
                seen[v["seed"]] = v
    return out
