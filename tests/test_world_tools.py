"""The world model's measuring scripts run and report what they claim (CPU, tiny settings):
`benchmarks/profile_train_step.py` and `benchmarks/world_sampler_sweep.py`."""

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("safetensors")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import profile_train_step  # noqa: E402
import world_sampler_sweep  # noqa: E402


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
    for bad, what in (("bogus=1", "KEY one of"), ("window", "KEY=VALUE"), ("window=x", "not a valid int")):
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
    assert all(r["chunks_scored"] == 2 and 0.0 <= r["prompt_following"] <= 1.0 for r in res["runs"])
    for r in res["runs"]:  # per chunk position, from the per-video matches it records
        (video,) = r["videos"]
        assert video["seed"] == 10 and r["by_chunk"] == [float(m) for m in video["matches"]]
        assert "first_chunk_room" in video and r["first_chunk_room"]["videos"] == (video["first_chunk_room"] is not None)
    from maskc.world_model.evaluate import room_to_continue

    assert res["room_to_continue"] == room_to_continue(60)
