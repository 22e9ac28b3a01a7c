"""The world model's measuring scripts run and report what they claim (CPU, tiny settings):
`benchmarks/profile_train_step.py`, `benchmarks/world_sampler_sweep.py`,
`benchmarks/world_tracker_check.py`, `benchmarks/world_caption_gap.py`, `benchmarks/world_first_use.py` and the
plots of sweeps (`world_persistence_plot.py`, `world_seam_plot.py`, `world_copies_plot.py`)."""

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("safetensors")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import profile_train_step  # noqa: E402
import world_caption_gap  # noqa: E402
import sweep_files  # noqa: E402
import world_copies_plot  # noqa: E402
import world_first_use  # noqa: E402
import world_persistence_plot  # noqa: E402
import world_sampler_sweep  # noqa: E402
import world_seam_plot  # noqa: E402
import world_tracker_check  # noqa: E402


def test_profile_train_step_times_every_part(tmp_path, capsys):
    out = tmp_path / "prof.json"
    assert profile_train_step.main(["--config", "tiny", "--device", "cpu", "--steps", "2", "--pool", "1",
                                    "--model", '{"depth": 1}', "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    parts = res["median_ms"]
    assert set(parts) == {"data", "encode", "pack", "forward", "backward", "optimizer", "step"}
    assert all(v >= 0 for v in parts.values())
    # the step is at least the sum of its timed parts minus rounding (they are consecutive intervals)
    assert parts["step"] >= 0.9 * (parts["encode"] + parts["forward"] + parts["backward"])
    assert res["model"]["depth"] == 1 and res["batch"] == 2
    assert "tokens/s" in capsys.readouterr().out


def test_sampler_sweep_settings_parse_and_reject_bad_input():
    assert world_sampler_sweep.parse_setting("") == {}
    assert world_sampler_sweep.parse_setting("window=1, cfg_text=4") == {"window": 1, "cfg_text": 4.0}
    assert world_sampler_sweep.gen_kwargs(world_sampler_sweep.parse_setting("cfg_hi=0.3,shift=3")) == \
        {"shift": 3.0, "cfg_interval": (0.0, 0.3)}
    assert world_sampler_sweep.gen_kwargs({"cfg_lo": 0.2}) == {"cfg_interval": (0.2, 1.0)}
    assert world_sampler_sweep.gen_kwargs(world_sampler_sweep.parse_setting("eta=0.5,eta_lo=0.3")) == \
        {"eta": 0.5, "eta_interval": (0.3, 1.0)}
    assert world_sampler_sweep.gen_kwargs({"eta": 0.0, "eta_hi": 0.3}) == {"eta": 0.0, "eta_interval": (0.0, 0.3)}
    assert world_sampler_sweep.gen_kwargs(world_sampler_sweep.parse_setting("cfg_local=2,cfg_parallel=0,cfg_rescale=0.7")) \
        == {"cfg_local": 2.0, "cfg_parallel": 0.0, "cfg_rescale": 0.7}
    assert world_sampler_sweep.gen_kwargs(world_sampler_sweep.parse_setting("cfg_prev=2,cfg_prev_frames=1")) == \
        {"cfg_prev": 2.0, "cfg_prev_frames": 1}
    assert world_sampler_sweep.gen_kwargs(world_sampler_sweep.parse_setting("pack_branches=0")) == {"pack_branches": False}
    assert world_sampler_sweep.parse_setting("pack_branches=1,cuda_graphs=0") == {"pack_branches": True,
                                                                                  "cuda_graphs": False}
    up = "the red circle moves up"
    assert world_sampler_sweep.gen_kwargs(world_sampler_sweep.parse_setting("cfg_neg=5,neg=bounce"), [up]) == \
        {"cfg_neg": 5.0, "negative": [("the red circle bounces off the ceiling",)]}
    assert world_sampler_sweep.gen_kwargs({"neg": "near"}, [up]) == {}  # generate's default negatives
    # also=1 tells the image-to-video runs every other object's caption (evaluate's job, not a generate keyword)
    assert world_sampler_sweep.gen_kwargs(world_sampler_sweep.parse_setting("also=1,cfg_also=3,cfg_local=2")) == \
        {"cfg_also": 3.0, "cfg_local": 2.0}
    lagged = world_sampler_sweep.parse_setting("also=1,also_lag=3,also_motion=moves left")
    assert lagged == {"also": 1, "also_lag": 3, "also_motion": "moves left"} and world_sampler_sweep.gen_kwargs(lagged) == {}
    assert world_sampler_sweep.ALSO[world_sampler_sweep.parse_setting("also=3")["also"]] == "auto"
    with pytest.raises(ValueError, match="also must be one of 0, 1, 3"):
        world_sampler_sweep.parse_setting("also=2")
    with pytest.raises(ValueError, match="neg='all': expected one of near, bounce"):
        world_sampler_sweep.gen_kwargs({"neg": "all"}, [up])
    for bad, what in (("bogus=1", "KEY one of"), ("window", "KEY=VALUE"), ("window=x", "not a valid int"),
                      ("pack_branches=yes", "not a valid flag")):
        with pytest.raises(ValueError, match=what):
            world_sampler_sweep.parse_setting(bad)


def test_sampler_sweep_scores_the_shipped_model(tmp_path):
    out = tmp_path / "sweep.json"
    assert world_sampler_sweep.main(["--seeds", "10", "--chunks", "2", "--ceiling", "--threads", "1",
                                     "--settings", "steps=2", "window=1,steps=2", "--room", "60",
                                     "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["autoencoder_ceiling"] >= 0.5  # the shipped autoencoder keeps the motion (it scores 1.0; a broken one ~0)
    assert [r["setting"] for r in res["runs"]] == [{"steps": 2}, {"window": 1, "steps": 2}]
    from maskc.world_model import generate as G

    # what the settings left out were: generate's defaults at the time, recorded
    assert res["defaults"] == G.sampler_defaults() and res["defaults"]["cfg_local"] == G.DEFAULT_CFG_LOCAL
    assert all(r["chunks_scored"] == 2 and 0.0 <= r["prompt_following"] <= 1.0 for r in res["runs"])
    for r in res["runs"]:  # per chunk position, from the per-video matches it records
        (video,) = r["videos"]
        assert video["seed"] == 10 and r["by_chunk"] == [float(m) for m in video["matches"]]
        assert "first_chunk_room" in video and r["first_chunk_room"]["videos"] == (video["first_chunk_room"] is not None)
        assert r["seams"] == video["seams"] and video["seams"]["boundary"] > 0 and video["seams"]["inside"] > 0
        assert r["persistent"] == video["persistent"] and 0.0 <= video["persistent"] <= 1.0
    from maskc.world_model.evaluate import room_to_continue

    assert res["room_to_continue"] == room_to_continue(60)


def test_sampler_sweep_direction_videos_told_the_other_objects(tmp_path, monkeypatch):
    """``also=1`` on direction-change videos: each is told the other objects' captions of the simulator clip
    that realises its prompts; without it, none."""
    from maskc.world_model import data
    from maskc.world_model import evaluate as ev
    from maskc.world_model import generate as G

    told = []
    real = G.generate_chunks
    monkeypatch.setattr(G, "generate_chunks", lambda *a, **k: told.append(k.get("also")) or real(*a, **k))
    assert world_sampler_sweep.main(["--seeds", "12", "--chunks", "2", "--threads", "1", "--settings", "steps=2",
                                     "also=1,steps=2", "--json", str(tmp_path / "s.json")]) == 0
    prompts = ev.direction_change_prompts(12, 2)
    want = data.other_captions(data.generate_from_prompts(prompts, 12, gravity=False).tracks)
    assert told == [None, want] and any(want)
    assert world_sampler_sweep.direction_also(prompts, 12, data.WorldConfig()) == want


@pytest.mark.parametrize("prompts", ["clip", "first"])
def test_sampler_sweep_image_to_video_runs(tmp_path, capsys, prompts):
    from maskc.world_model import data

    out = tmp_path / "i2v.json"
    assert world_sampler_sweep.main(["--seeds", "11", "--no-direction", "--i2v", "2", "--i2v-prompts", prompts,
                                     "--threads", "1", "--settings", "steps=2", "--json", str(out)]) == 0
    (run,) = json.loads(out.read_text())["runs"]
    assert "prompt_following" not in run  # --no-direction: the image-to-video runs only
    iv = run["i2v"]
    (video,) = iv["videos"]
    assert iv["prompts"] == prompts and iv["chunks"] == 2 and len(video["by_chunk"]) == 2 == len(video["matches"])
    assert iv["persistent"] == pytest.approx(sum(video["by_chunk"]) / 2)
    clip = data.generate(11, 2)
    assert video["prompts"] == (list(clip.captions) if prompts == "clip" else [clip.captions[0]] * 2)
    assert video["colours"] == sorted(set(clip.tracks["colour"]), key=list(data.PALETTE).index)
    from maskc.world_model.evaluate import object_persistence

    # the simulator's own clip (seed 11's objects overlap for a while) and the image as the first frame
    assert iv["simulator_persistent"] == object_persistence(clip.frames, clip.frames[0])["persistent"] > 0.8
    assert video["psnr_first_frame"] > 15
    assert video["subject"] == clip.tracks["colour"][clip.tracks["subject"][0]] and set(video["by_colour"]) == set(video["colours"])
    assert {k: iv["subject"][k] for k in ("vanished", "duplicated")} == video["by_colour"][video["subject"]]
    assert 0.0 <= iv["appeared"] <= 1.0
    assert iv["subject"]["size_by_chunk"] == video["size_by_chunk"][video["subject"]] and len(video["size_by_chunk"]) == \
        len(video["colours"]) and all(len(sz) == 2 for sz in video["size_by_chunk"].values())
    others = [f for c, f in video["by_colour"].items() if c != video["subject"]]
    assert iv["distractors"]["duplicated"] == pytest.approx(sum(f["duplicated"] for f in others) / len(others))
    assert "image-to-video (2 chunks, " + prompts in capsys.readouterr().out


def _i2v_sweep(path, runs, weights="shipped small", defaults=None):
    """A sweep file as world_sampler_sweep.py --i2v writes it: runs of (setting, [(seed, by_chunk), ...])
    (``defaults``: the sampler defaults it records; None: a file from before they were recorded)."""
    out = {"weights": weights, "runs": [{"setting": setting, "i2v": {"videos": [
        {"seed": seed, "by_chunk": chunks, "persistent": sum(chunks) / len(chunks), "simulator_persistent": 1.0}
        for seed, chunks in videos]}} for setting, videos in runs]}
    if defaults is not None:
        out["defaults"] = defaults
    path.write_text(json.dumps(out))
    return str(path)


def _direction_sweep(path, runs, weights=None):
    """A direction-change sweep file: runs = [(setting, [(seed, matches, subject_duplicated), ...]), ...]."""
    out = {"runs": [{"setting": setting, "videos": [
        {"seed": seed, "matches": m, "subject_duplicated": d, "subject_missing": [0.0] * len(d)}
        for seed, m, d in videos]} for setting, videos in runs]}
    if weights is not None:
        out["weights"] = weights
    path.write_text(json.dumps(out))
    return str(path)


def test_copies_plot_merges_parts_pairs_by_video_and_draws(tmp_path, capsys):
    a = _direction_sweep(tmp_path / "a.json", [({}, [(1, [True, True], [1.0, 1.0]), (2, [True, False], [0.5, 0.5])]),
                                               ({"cfg_salient": 4.0}, [(1, [True, False], [0.0, 0.5]),
                                                                       (2, [False, False], [0.0, 0.0])])])
    b = _direction_sweep(tmp_path / "b.json", [({}, [(3, [True, True], [1.0, 0.0])]),
                                               ({"cfg_salient": 4.0}, [(3, [True, False], [0.5, 0.0])])])
    runs = world_copies_plot.by_setting([a, b])
    assert list(runs) == ["", "cfg_salient=4"] and sorted(runs["cfg_salient=4"]) == [1, 2, 3]
    f = world_copies_plot.figures(runs["cfg_salient=4"], runs[""])
    # prompt following per video 0.5, 0, 0.5 against 1, 0.5, 1: -0.5 each; copies 0.25, 0, 0.25 against 1, 0.5, 0.5: -0.75, -0.5, -0.25
    assert f["prompt_following"] == pytest.approx(1 / 3) and f["paired_prompt_following"] == pytest.approx(-0.5)
    assert f["paired_prompt_following_se"] == pytest.approx(0.0)
    assert f["duplicated"] == pytest.approx(0.5 / 3) and f["paired_duplicated"] == pytest.approx(-0.5)
    out = tmp_path / "c.png"
    assert world_copies_plot.main([a, b, "--label", ":before", "--label", "cfg_salient=4:salient", "--out", str(out)]) == 0
    assert out.stat().st_size > 1000
    text = capsys.readouterr().out
    assert "before" in text and "salient" in text and "-0.500 +- 0.000 / -0.500 +- 0.144" in text
    assert world_copies_plot.main([a, b, "--base", "cfg_salient=4"]) == 0  # paired against another setting
    assert "+0.500 +- 0.000" in capsys.readouterr().out
    with pytest.raises(ValueError, match="seed 3 of setting '\\(defaults\\)' is also in another file"):
        world_copies_plot.by_setting([b, b])
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"runs": [{"setting": {}, "videos": [{"seed": 1, "matches": [True]}]}]}))
    with pytest.raises(ValueError, match="before session 39"):
        world_copies_plot.by_setting([str(old)])
    for argv, msg in (([b, "--label", "nope"], "expected SETTING:NAME"), ([b, "--base", "eta=1"], "no such setting"),
                      ([_direction_sweep(tmp_path / "e.json", [])], "no direction-change videos")):
        with pytest.raises(SystemExit):
            world_copies_plot.main(argv)
        assert msg in capsys.readouterr().err


def test_copies_plot_tells_checkpoints_apart(tmp_path, capsys):
    """Two checkpoints' sweeps of the same seeds and setting (a fine-tune against its control) are two
    points paired by video, not a clash; a name for one goes after the last ':'."""
    ctl = _direction_sweep(tmp_path / "ctl.json", [({}, [(1, [True], [1.0]), (2, [True], [0.5])])], "/r/ctl.safetensors")
    twin = _direction_sweep(tmp_path / "twin.json", [({}, [(1, [True], [0.0]), (2, [False], [0.5])])], "/r/twin.safetensors")
    runs = world_copies_plot.by_setting([ctl, twin])
    assert list(runs) == ["ctl: ", "twin: "] and sorted(runs["twin: "]) == [1, 2]
    assert world_copies_plot.main([ctl, twin, "--label", "twin: :twin clips"]) == 0
    text = capsys.readouterr().out
    assert "twin clips" in text and "-0.500 +- 0.500 / -0.500 +- 0.500" in text
    assert list(world_copies_plot.by_setting([twin])) == [""]  # one checkpoint: labels as before
    with pytest.raises(ValueError, match="part must be one of direction, i2v"):
        sweep_files.videos_by_setting([twin], "seams")


def test_persistence_plot_merges_parts_pairs_by_video_and_draws(tmp_path, capsys):
    a = _i2v_sweep(tmp_path / "a.json", [({}, [(1, [1.0, 0.5]), (2, [1.0, 0.0])]),
                                         ({"eta": 0.7}, [(1, [1.0, 1.0]), (2, [1.0, 0.5])])])
    b = _i2v_sweep(tmp_path / "b.json", [({}, [(3, [0.5, 0.5])]), ({"eta": 0.7}, [(3, [1.0, 0.5])])])
    runs = world_persistence_plot.by_setting([a, b])
    assert list(runs) == ["defaults", "eta=0.7"] and sorted(runs["eta=0.7"]) == [1, 2, 3]
    out = tmp_path / "p.png"
    assert world_persistence_plot.main([a, b, "--label", "defaults=Euler", "--out", str(out)]) == 0
    assert out.stat().st_size > 1000
    text = capsys.readouterr().out
    # per-video differences 0.25, 0.25, 0.25: mean +0.250, standard error 0
    assert "Euler" in text and "+0.250 +- 0.000" in text and "0.83 0.33" in text and "1.00 0.67" in text
    with pytest.raises(ValueError, match="seed 3 of setting 'defaults' is also in another file"):
        world_persistence_plot.by_setting([b, b])
    for argv, msg in (([b, "--label", "nope=x"], "--label 'nope=x': expected SETTING=TEXT"),
                      ([_i2v_sweep(tmp_path / "e.json", [])], "no image-to-video runs")):
        with pytest.raises(SystemExit):
            world_persistence_plot.main([*argv, "--out", str(out)])
        assert msg in capsys.readouterr().err


def test_persistence_plot_tells_weights_apart(tmp_path, capsys):
    a = _i2v_sweep(tmp_path / "a.json", [({}, [(1, [1.0, 0.5]), (2, [1.0, 0.0])])])
    b = _i2v_sweep(tmp_path / "b.json", [({}, [(1, [1.0, 1.0]), (2, [1.0, 0.5])])], weights="/runs/ft_tw.safetensors")
    runs = world_persistence_plot.by_setting([a, b])  # the same seeds and setting: two curves, not a clash
    assert list(runs) == ["shipped small: defaults", "ft_tw: defaults"] and sorted(runs["ft_tw: defaults"]) == [1, 2]
    out = tmp_path / "w.png"
    assert world_persistence_plot.main([a, b, "--label", "ft_tw: defaults=fine-tuned", "--out", str(out)]) == 0
    assert "fine-tuned" in capsys.readouterr().out and out.stat().st_size > 1000
    assert list(world_persistence_plot.by_setting([b])) == ["defaults"]  # one checkpoint: labels as before


def test_persistence_plot_tells_sampler_defaults_apart(tmp_path):
    """Files run under different sampler defaults (cfg_local 0 until session 35, 2 since) are two curves
    of "defaults", labelled by what differs; files that agree keep the plain labels."""
    old = _i2v_sweep(tmp_path / "old.json", [({}, [(1, [1.0, 0.5])])])  # before the sweep recorded its defaults
    new = _i2v_sweep(tmp_path / "new.json", [({}, [(1, [1.0, 1.0])])], defaults={"cfg_local": 2.0, "eta": 0.7})
    plain = _i2v_sweep(tmp_path / "plain.json", [({}, [(1, [0.5, 0.5])])], defaults={"cfg_local": 0.0, "eta": 0.7})
    assert list(world_persistence_plot.by_setting([old, new])) == ["defaults [defaults: unrecorded]",
                                                                   "defaults [defaults: recorded]"]
    assert list(world_persistence_plot.by_setting([plain, new, old])) == [
        "defaults [defaults: cfg_local=0.0]", "defaults [defaults: cfg_local=2.0]", "defaults [defaults: unrecorded]"]
    again = _i2v_sweep(tmp_path / "again.json", [({}, [(2, [1.0, 1.0])])], defaults={"cfg_local": 2.0, "eta": 0.7})
    runs = world_persistence_plot.by_setting([new, again])  # the same defaults: parts of one sweep, merged
    assert list(runs) == ["defaults"] and sorted(runs["defaults"]) == [1, 2]


def test_sampler_sweep_rejects_an_empty_plan(capsys):
    with pytest.raises(SystemExit):
        world_sampler_sweep.main(["--no-direction"])
    assert "--no-direction leaves nothing to run" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        world_sampler_sweep.main(["--i2v", "-1"])
    assert "--i2v must be >= 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # the direction-change videos start from text: nothing for also=3 to find
        world_sampler_sweep.main(["--i2v", "2", "--settings", "also=3"])
    assert "also=3 (the stream's own also prompts) needs an image" in capsys.readouterr().err


def test_run_probe_tells_each_first_chunk_its_run(tmp_path, capsys):
    import torch

    from maskc.world_model.checkpoint import save_checkpoint
    from maskc.world_model.configs import TINY
    from maskc.world_model.dit import WorldModel
    from maskc.world_model.train import add_caption_runs

    from world_helpers import randomized

    torch.manual_seed(0)
    model = add_caption_runs(randomized(WorldModel(TINY)), 3)  # signal on every path but the runs
    zero = tmp_path / "zero.safetensors"
    save_checkpoint(zero, model)
    with torch.no_grad():
        model.text.run.weight[1:].normal_(std=3.0, generator=torch.Generator().manual_seed(1))
    told = tmp_path / "told.safetensors"
    save_checkpoint(told, model)
    args = ["--seeds", "3", "4", "--chunks", "1", "--settings", "--run-probe", "1", "3", "--threads", "1"]
    # run vectors at zero: the run changes nothing
    assert world_sampler_sweep.main(["--weights", str(zero), *args, "--json", str(tmp_path / "z.json")]) == 0
    res = json.loads((tmp_path / "z.json").read_text())
    assert res["runs"] == [] and len(res["run_probe"]["videos"]) == 2
    for v in res["run_probe"]["videos"]:
        assert v["room"]["1"] == v["room"]["3"]
    # random run vectors: what it records is the first chunk `generate_chunks` makes told that run
    assert world_sampler_sweep.main(["--weights", str(told), *args, "--json", str(tmp_path / "t.json")]) == 0
    assert "run probe, told run 3" in capsys.readouterr().out
    probe = json.loads((tmp_path / "t.json").read_text())["run_probe"]
    from maskc.world_model import evaluate as ev
    from maskc.world_model.generate import generate_chunks, load_model

    m, meta = load_model(told)
    v = probe["videos"][0]
    chunk = next(iter(generate_chunks(m, [v["prompt"]], seed=3, meta=meta, runs=[3])))
    assert v["room"]["3"] == ev.first_chunk_room(chunk, v["prompt"])
    other = next(iter(generate_chunks(m, [v["prompt"]], seed=3, meta=meta, runs=[1])))
    assert not (chunk == other).all()
    # --probe-setting reaches the probe's sampler (run guidance here)
    assert world_sampler_sweep.main(["--weights", str(told), *args, "--probe-setting", "cfg_run=5",
                                     "--json", str(tmp_path / "g.json")]) == 0
    g = json.loads((tmp_path / "g.json").read_text())["run_probe"]["videos"][0]
    guided = next(iter(generate_chunks(m, [v["prompt"]], seed=3, meta=meta, runs=[3], cfg_run=5.0)))
    assert g["room"]["3"] == ev.first_chunk_room(guided, v["prompt"]) and not (guided == chunk).all()
    # ... and its negative prompts: seed 4's "moves down" has two near misses, neg=bounce keeps the first
    assert world_sampler_sweep.main(["--weights", str(told), *args, "--probe-setting", "cfg_neg=8,neg=bounce",
                                     "--json", str(tmp_path / "n.json")]) == 0
    n = json.loads((tmp_path / "n.json").read_text())["run_probe"]["videos"][1]
    assert n["seed"] == 4 and n["prompt"].endswith("moves down")
    from maskc.world_model import vocab

    bounce = next(iter(generate_chunks(m, [n["prompt"]], seed=4, meta=meta, runs=[3], cfg_neg=8.0,
                                       negative=[vocab.near_miss_captions(n["prompt"])[:1]])))
    near = next(iter(generate_chunks(m, [n["prompt"]], seed=4, meta=meta, runs=[3], cfg_neg=8.0)))
    assert not (bounce == near).all() and n["room"]["3"] == ev.first_chunk_room(bounce, n["prompt"])
    with pytest.raises(SystemExit, match="run-probe"):
        world_sampler_sweep.main(["--weights", str(told), *args[:-2], "4", "--threads", "1"])


def test_world_tracker_check_reports_every_rule(tmp_path, capsys):
    import numpy as np

    from maskc.world_model import data
    from maskc.world_model import evaluate as ev

    # "videos": the simulator's own direction-change clips, which every rule scores perfectly
    videos = {str(s): data.generate_from_prompts(ev.direction_change_prompts(s, 4), s, gravity=False).frames
              for s in (18, 19)}
    np.savez(tmp_path / "v.npz", **videos)
    out = tmp_path / "t.json"
    assert world_tracker_check.main(["--clips", "3", "--hit-clips", "2", "--videos", str(tmp_path / "v.npz"),
                                     "--json", str(out), "--chunks", "3"]) == 0
    res = json.loads(out.read_text())
    assert res["edge_margin"] == ev.EDGE_MARGIN and res["chunks"] == 3
    assert set(res["agreement"]) == {"random", "direction_change_lookahead_True", "direction_change_lookahead_False"}
    for rules in res["agreement"].values():
        assert set(rules) == set(world_tracker_check.RULES)
        assert rules["chunk"]["chunks"] == rules["extent"]["chunks"] == rules["centroid"]["chunks"] == 9
        assert all(0.0 <= r["fraction"] <= 1.0 for r in rules.values())
    sim = res["hit_gaps"]["simulator"]
    assert sim["hits"] > 0 and sim["max"] <= ev.EDGE_MARGIN - 1
    assert sum(sim["hist"].values()) == sim["hits"]
    scored = res["videos"][str(tmp_path / "v.npz")]
    assert {r["prompt_following"] for r in scored.values()} == {1.0} and set(scored) == set(world_tracker_check.RULES)
    assert "prompt following 1.000 (chunk rule), 1.000 (extent rule)" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        world_tracker_check.main(["--clips", "0"])
    with pytest.raises(SystemExit):
        world_tracker_check.main(["--chunks", "1"])


def _caption_gap_line(argv, capsys) -> dict:
    """The one JSON line `world_caption_gap.py ARGV` prints (torch's thread count put back after)."""
    import torch

    n = torch.get_num_threads()
    try:
        world_caption_gap.main(argv)
    finally:
        torch.set_num_threads(n)
    (line,) = capsys.readouterr().out.strip().splitlines()
    return json.loads(line)


def test_caption_gap_script_context_mode(capsys):
    res = _caption_gap_line(["--context", "--batches", "1", "--clips", "2"], capsys)
    assert res["batches"] == 1 and res["clips"] == 2 and len(res["t"]) == len(res["ratio"]) == 8
    assert all(r == pytest.approx(w / a, rel=5e-3) for r, w, a in zip(res["ratio"], res["with_context"], res["alone"]))  # printed to 4 places
    with pytest.raises(SystemExit, match="must be >= 1"):
        world_caption_gap.main(["--context", "--clips", "0"])


def test_caption_gap_script_twins_mode(capsys):
    res = _caption_gap_line(["--twins", "--clips", "2", "--draws", "1"], capsys)
    assert res["clips"] == 2 and res["draws"] == 1 and res["t"] == [0.1, 0.2, 0.3]
    diff = [a - b for a, b in zip(res["gain_twin"], res["gain_normal"])]
    assert res["preference_by_t"] == pytest.approx(diff, abs=2e-5)  # printed to 5 places
    with pytest.raises(SystemExit):
        world_caption_gap.main(["--twins", "--clips", "1"])
    assert "clips must be an int >= 2" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        world_caption_gap.main(["--twins", "--context"])
    assert "--twins and --context" in capsys.readouterr().err


def test_sampler_sweep_decoders_score_the_same_latents(tmp_path, capsys):
    """--decoders W: each video's latents decoded again by W's decoder, scored and paired by video. The
    model's own decoder reproduces its frames (paired 0); another decoder draws other frames; a
    checkpoint whose encoder differs is refused (its decoder reads other latents)."""
    import torch

    from maskc.world_model.checkpoint import save_checkpoint
    from maskc.world_model.generate import DEFAULT_WEIGHTS, load_model

    model, meta = load_model()
    same = DEFAULT_WEIGHTS
    with torch.no_grad():
        model.vae.decoder.head.bias.add_(0.3)  # a brighter decoder, the same encoder
    other = save_checkpoint(tmp_path / "bright.safetensors", model, step=meta["step"])
    with torch.no_grad():
        model.vae.encoder.head.bias.add_(0.3)
    foreign = save_checkpoint(tmp_path / "foreign.safetensors", model, step=meta["step"])
    out = tmp_path / "sweep.json"
    assert world_sampler_sweep.main(["--seeds", "10", "--chunks", "2", "--threads", "1", "--settings", "steps=2",
                                     "--decoders", str(same), str(other), "--json", str(out)]) == 0
    assert "decoder of" in capsys.readouterr().out
    (run,) = json.loads(out.read_text())["runs"]
    (video,) = run["videos"]
    own, bright = run["decoder_runs"]
    assert own["weights"] == str(same) and bright["weights"] == str(other)
    assert video["decoders"][0]["matches"] == video["matches"] and video["decoders"][0]["seams"] == video["seams"]
    assert own["paired_prompt_following"]["mean"] == 0.0 and own["paired_seams"]["mean"] == 0.0
    assert video["decoders"][1]["seams"] != video["seams"] and bright["paired_seams"]["videos"] == 1
    with pytest.raises(SystemExit):
        world_sampler_sweep.main(["--seeds", "10", "--chunks", "2", "--settings", "steps=2", "--decoders", str(foreign)])
    assert "encodes differently" in capsys.readouterr().err


def test_seam_plot_draws_each_decoder_on_the_same_latents(tmp_path, capsys):
    import numpy as np

    from maskc.world_model.generate import DEFAULT_WEIGHTS

    out, js = tmp_path / "seams.png", tmp_path / "seams.json"
    assert world_seam_plot.main(["--seeds", "10", "--chunks", "2", "--steps", "2", "--threads", "1",
                                 "--decoders", str(DEFAULT_WEIGHTS), "--out", str(out), "--json", str(js)]) == 0
    assert out.stat().st_size > 10_000 and out.read_bytes()[:4] == b"\x89PNG"
    curves = json.loads(js.read_text())["curves"]
    assert set(curves) == {"simulator", "model", str(DEFAULT_WEIGHTS)} and len(curves["model"]) == 47
    assert np.array_equal(curves["model"], curves[str(DEFAULT_WEIGHTS)])  # its own decoder: the same frames
    assert "latent-frame steps" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        world_seam_plot.main(["--chunks", "1", "--out", str(out)])
    from maskc.world_model.evaluate import frame_differences

    assert np.array_equal(frame_differences(np.zeros((3, 2, 2, 3), np.uint8)), [0.0, 0.0])


def test_seam_plot_draws_each_sampler_setting(tmp_path, capsys):
    """--settings: the same videos generated again under each setting, one curve each; a setting that
    restates the defaults is the model's curve; bad settings are usage errors."""
    import numpy as np

    out, js = tmp_path / "seams.png", tmp_path / "seams.json"
    base = ["--seeds", "10", "--chunks", "2", "--steps", "2", "--threads", "1", "--out", str(out), "--json", str(js)]
    assert world_seam_plot.main([*base, "--settings", "cfg_prev=0", "cfg_prev=4,cfg_prev_frames=1"]) == 0
    curves = json.loads(js.read_text())["curves"]
    assert set(curves) == {"simulator", "model", "setting cfg_prev=0", "setting cfg_prev=4,cfg_prev_frames=1"}
    assert np.array_equal(curves["model"], curves["setting cfg_prev=4,cfg_prev_frames=1"])  # today's defaults
    assert not np.array_equal(curves["model"], curves["setting cfg_prev=0"])
    assert "setting cfg_prev=0: boundary" in capsys.readouterr().out
    for bad, why in (("", "give KEY=VALUE pairs"), ("also=1", "give KEY=VALUE pairs"), ("cfg_prev", "expected KEY=VALUE")):
        with pytest.raises(SystemExit):
            world_seam_plot.main([*base, "--settings", bad])
        assert why in capsys.readouterr().err


def test_world_first_use_times_the_runtime_steps_and_both_videos(tmp_path, monkeypatch, capsys):
    """The timers count the runtime's first-use steps (an FFA call of a new mask through the Triton
    interpreter: its tile sizes chosen, planned, launched), and the script times two identical videos
    chunk by chunk (on the CPU no step runs: no kernels there)."""
    import torch

    import maskc
    from maskc.runtime import attention, ffa
    from maskc.world_model import graphs

    for name in ("choose_config", "plan_for", "get_kernel", "_launch", "_cutlass_kernel"):
        monkeypatch.setattr(ffa, name, getattr(ffa, name))  # restored after the test
    monkeypatch.setattr(graphs.GraphedBlocks, "_capture", graphs.GraphedBlocks._capture)
    totals = {}
    world_first_use.instrument(totals)
    mask = maskc.Mask([((0, 70), (3, 47), maskc.CAUSAL)], sq=70, sk=50)  # a mask no other test plans
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(70, 2, 64, generator=g), torch.randn(50, 1, 64, generator=g)
    attention(q, k, k, mask)
    for step in ("choose_config", "plan_for", "launch"):
        assert totals[step]["calls"] >= 1 and totals[step]["seconds"] > 0, step
    out = tmp_path / "fu.json"
    assert world_first_use.main(["--device", "cpu", "--chunks", "2", "--steps", "1", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    for v in (res["first_video"], res["second_video"]):
        assert len(v["per_chunk_seconds"]) == 2 and v["seconds"] == pytest.approx(sum(v["per_chunk_seconds"]))
        assert v["model_calls"] > 0 and v["graph_captures"] is None and v["runtime_steps"] == {
            k: {"calls": 0, "seconds": 0.0} for k in v["runtime_steps"]}
    assert res["load_seconds"] > 0 and "first video" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        world_first_use.main(["--chunks", "0"])
