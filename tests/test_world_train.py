"""World-model training (``magi train``): configs, sample packing, checkpoints, resume, CLI (CPU)."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

pytest.importorskip("safetensors")

from maskc.world_model import cli, vocab
from maskc.world_model import train as TR
from maskc.world_model.checkpoint import (
    load_checkpoint, load_optimizer_state, optimizer_path, read_optimizer_state, save_checkpoint,
)
from maskc.world_model.configs import SMALL, TINY
from maskc.world_model.dit import WorldModel, flow_matching_loss
from maskc.world_model.train import TrainConfig, load_train_config, plan_samples, train

LF = TINY.latent_frames


def tiny(**kw) -> TrainConfig:
    return replace(load_train_config("tiny"), **kw)


def losses(result):
    return dict(result.losses["vae"] + result.losses["dit"])


# ------------------------------------------------------------------------------------ configs


def test_bundled_configs_and_roundtrip():
    assert {"tiny", "small"} <= set(TR.config_names())
    t, s = load_train_config("tiny"), load_train_config("small")
    assert t.model_config() == TINY and s.model_config() == SMALL
    assert (t.batch, t.n_chunks, t.steps_vae, t.steps_dit, t.amp) == (2, 2, 20, 30, "auto")
    for c in (t, s):
        assert TrainConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    custom = TrainConfig(model=replace(TINY, depth=1).to_dict())
    assert custom.model_config().depth == 1
    with pytest.raises(ValueError, match="unknown training config keys"):
        TrainConfig.from_dict({"modle": "tiny"})
    with pytest.raises(ValueError, match="unknown model config"):
        TrainConfig(model="huge")
    with pytest.raises(ValueError, match="steps_dit"):
        TrainConfig(steps_dit=-1)
    with pytest.raises(ValueError, match="caption_dropout"):
        TrainConfig(caption_dropout=1.5)
    with pytest.raises(ValueError, match="unknown training config 'huge'"):
        load_train_config("huge")


def test_lr_schedule():
    lrs = [TR.lr_at(s, 100, 1.0, 10, 0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))  # cosine decay is monotone
    assert lrs[-1] == pytest.approx(0.1, abs=1e-3)


# ------------------------------------------------------------------------------------ packing


def test_plan_samples_covers_clips_with_monotone_noise():
    tcfg = tiny(n_chunks=6, window=3, p_cut=0.4, p_continuation=0.5, p_i2v=0.5, caption_dropout=0.3)
    seen = {"cut": 0, "clean": 0, "forced_clean": 0, "i2v": 0, "drop": 0}
    for seed in range(200):
        samples = plan_samples(np.random.default_rng(seed), 3, 6, tcfg)
        for clip in range(3):
            mine = [s for s in samples if s.clip == clip]
            assert [s.offset for s in mine] == list(np.cumsum([0] + [s.length for s in mine[:-1]]))
            assert sum(s.length for s in mine) == 6
            seen["cut"] += len(mine) > 1
        for s in samples:
            t = np.array(s.t)
            assert len(t) == s.length and np.all(np.diff(t) <= 0)  # earlier chunks cleaner
            n_clean = int((t == 1).sum())
            assert np.all(t[:n_clean] == 1) and np.all((0 <= t[n_clean:]) & (t[n_clean:] < 1))
            assert s.length - n_clean <= tcfg.window and n_clean < s.length
            assert not (s.i2v and n_clean)
            seen["clean"] += n_clean > 0
            seen["forced_clean"] += s.length > tcfg.window
            seen["i2v"] += s.i2v
            seen["drop"] += s.drop_caption
    assert all(v > 10 for v in seen.values()), seen


def test_plan_samples_draws_noise_levels_from_t_mean_and_t_std():
    """The noisy chunks' flow times are sigmoid(N(t_mean, t_std)): their logits' mean and spread follow."""
    def logits(**kw):
        tcfg = tiny(n_chunks=4, p_continuation=0.0, p_i2v=0.0, p_cut=0.0, **kw)
        t = np.concatenate([s.t for seed in range(300)
                            for s in plan_samples(np.random.default_rng(seed), 4, 4, tcfg)])
        return np.log(t / (1 - t))

    base, shifted = logits(), logits(t_mean=-0.35, t_std=1.4)
    assert abs(base.mean()) < 0.05 and abs(base.std() - 1.0) < 0.05
    assert abs(shifted.mean() + 0.35) < 0.07 and abs(shifted.std() - 1.4) < 0.07
    for bad in ({"t_mean": float("nan")}, {"t_std": float("inf")}, {"t_std": 0.0}):
        with pytest.raises(ValueError, match="t_mean|t_std"):
            tiny(**bad)


def test_pack_batch_layout():
    cfg = TINY
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 3 * LF, 8, 8, cfg.latent_channels, generator=g)
    tokens = np.stack([vocab.encode_batch(["the red circle moves left", "the red circle falls",
                                           "the red circle rises"])] * 2)
    samples = [TR.SampleSpec(0, 0, 3, (1.0, 0.8, 0.2), False, False),
               TR.SampleSpec(1, 0, 1, (0.5,), True, True),
               TR.SampleSpec(1, 1, 2, (0.7, 0.3), False, False)]
    p = TR.pack_batch(latents, tokens, samples, cfg, torch.Generator().manual_seed(1))
    assert p.video_chunks == (3, 1, 2) and p.chunk_offsets == (0, 0, 1) and p.n_chunks == 6
    assert torch.equal(p.latents[:3 * LF], latents[0]) and torch.equal(p.latents[3 * LF:], latents[1])
    want_t = [1.0] * LF + [0.8] * LF + [0.2] * LF + [1.0] + [0.5] * (LF - 1) + [0.7] * LF + [0.3] * LF
    assert p.t_frames.tolist() == pytest.approx(want_t)
    assert p.tokens.shape == (6, tokens.shape[-1])
    assert vocab.decode(p.tokens[3].tolist()) == "" and p.tokens[3, :2].tolist() == [vocab.BOS_ID, vocab.EOS_ID]
    assert torch.equal(p.tokens[4], torch.from_numpy(tokens[1, 1]))
    assert p.noise.shape == p.latents.shape


def test_pack_batch_caption_runs():
    """Runs count over the whole clip (a piece cut from it keeps them), dropped captions are not told
    (run 0), and a model without caption runs gets none."""
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4 * LF, 8, 8, TINY.latent_channels, generator=g)
    a, b = "the red circle moves left", "the red circle falls"
    tokens = np.stack([vocab.encode_batch([a, a, b, b]), vocab.encode_batch([b, b, b, b])])
    np.testing.assert_array_equal(TR.clip_runs(tokens, 4), [[2, 1, 2, 1], [4, 3, 2, 1]])
    np.testing.assert_array_equal(TR.clip_runs(tokens, 2), [[2, 1, 2, 1], [2, 2, 2, 1]])
    samples = [TR.SampleSpec(0, 0, 1, (0.5,), False, False),
               TR.SampleSpec(0, 1, 3, (0.9, 0.5, 0.2), False, False),
               TR.SampleSpec(1, 0, 2, (0.6, 0.3), False, True),
               TR.SampleSpec(1, 2, 2, (0.6, 0.3), False, False)]
    p = TR.pack_batch(latents, tokens, samples, replace(TINY, caption_runs=3), torch.Generator().manual_seed(1))
    assert p.runs.tolist() == [2, 1, 2, 1, 0, 0, 2, 1]
    assert TR.pack_batch(latents, tokens, samples, TINY, torch.Generator().manual_seed(1)).runs is None


def test_adding_caption_runs_keeps_the_model_and_resumes(tmp_path):
    tcfg = tiny(steps_vae=1, steps_dit=2, ckpt_every=1)
    res = train(tcfg, tmp_path / "a", "cpu", progress=False)
    old = res.model.eval()
    new = TR.add_caption_runs(old, 3).eval()
    assert new.cfg == replace(old.cfg, caption_runs=3) and not new.text.run.weight.any()
    # the same function until trained: the loss of a packed batch with runs equals the old loss
    rng = np.random.default_rng(0)
    frames, tokens, _ = TR._batch_arrays(7, 0, tcfg.n_chunks, tcfg.batch)
    with torch.no_grad():
        lat = TR.encode_batch(old, frames, torch.device("cpu"), tcfg)
        samples = plan_samples(rng, tcfg.batch, tcfg.n_chunks, tcfg)
        p_old = TR.pack_batch(lat, tokens, samples, old.cfg, torch.Generator().manual_seed(2))
        p_new = TR.pack_batch(lat, tokens, samples, new.cfg, torch.Generator().manual_seed(2))
        assert p_new.runs is not None and p_new.runs.max() > 0
        assert torch.equal(TR.dit_loss(old, p_old), TR.dit_loss(new, p_new))
    with pytest.raises(ValueError, match="only 0 -> R >= 1"):
        TR.add_caption_runs(new, 4)
    # resuming with caption runs added trains their vectors (row 0, "not told", stays zero)
    more = replace(tcfg, steps_dit=4, model=replace(TINY, caption_runs=3).to_dict(), run_lr_scale=5.0)
    msgs = []
    res2 = train(more, tmp_path / "a", "cpu", resume=tmp_path / "a", progress=False, log=msgs.append)
    assert res2.step == 5 and res2.model.cfg.caption_runs == 3
    assert any("caption runs added" in m for m in msgs) and not any("warning" in m for m in msgs)
    w = res2.model.text.run.weight
    assert not w[0].any() and w[1:].abs().sum() > 0
    model, cfg, _ = load_checkpoint(tmp_path / "a" / "model.safetensors")
    assert cfg.caption_runs == 3 and torch.equal(model.text.run.weight, w.detach())
    # the checkpoint now has runs: it resumes (bit-exactly) with them, never without them or with others
    train(replace(more, steps_dit=5), tmp_path / "a", "cpu", resume=tmp_path / "a", progress=False)
    for bad in (TINY.to_dict(), replace(TINY, caption_runs=4).to_dict(), replace(TINY, caption_runs=3, depth=3).to_dict()):
        with pytest.raises(ValueError, match="only caption_runs may change, from 0 to R >= 1"):
            train(replace(more, steps_dit=6, model=bad), tmp_path / "b", "cpu", resume=tmp_path / "a", progress=False)


def test_resume_keeps_a_fine_tuned_decoder(tmp_path):
    """`magi train --resume` of a model whose decoder `finetune_decoder` changed (vae_context,
    vae_causal, vae_delay: not training-config fields) trains the transformer on and keeps that decoder, and its
    record (meta ``decoder_finetune``) in every checkpoint it writes; other model changes are still
    refused."""
    tcfg = tiny(steps_vae=1, steps_dit=2, ckpt_every=0)
    train(tcfg, tmp_path / "a", "cpu", progress=False)
    src = tmp_path / "a" / "model.safetensors"
    TR.finetune_decoder(src, tmp_path / "causal.safetensors", causal=True, context=3, clip_chunks=4, steps=1,
                        batch=1, held_out=1, warmup=1, delay=1)
    before, cfg0, meta0 = load_checkpoint(tmp_path / "causal.safetensors")
    res = train(replace(tcfg, steps_dit=4, ckpt_every=1), tmp_path / "b", "cpu",
                resume=tmp_path / "causal.safetensors", progress=False)
    assert res.step == 5 and res.model.cfg == cfg0 and cfg0.vae_causal and cfg0.vae_context == 3 and cfg0.vae_delay == 1
    after, cfg1, meta1 = load_checkpoint(tmp_path / "b" / "model.safetensors")
    assert meta1["decoder_finetune"] == meta0["decoder_finetune"] and meta0["decoder_finetune"]["causal"]
    ckpts = [c for c in sorted((tmp_path / "b").glob("ckpt_*.safetensors")) if ".optim." not in c.name]
    assert ckpts and all(load_checkpoint(c)[2]["decoder_finetune"] == meta0["decoder_finetune"] for c in ckpts)
    a, b = before.state_dict(), after.state_dict()
    assert cfg1 == cfg0 and all(torch.equal(a[k], b[k]) for k in a if k.startswith("vae."))  # the decoder kept
    assert any(not torch.equal(a[k], b[k]) for k in a if k.startswith("dit."))  # the transformer trained
    with pytest.raises(ValueError, match="only caption_runs may change"):
        train(replace(tcfg, steps_dit=5, model=replace(TINY, depth=3).to_dict()), tmp_path / "c", "cpu",
              resume=tmp_path / "causal.safetensors", progress=False)


def test_caption_run_vectors_get_their_own_learning_rate():
    tcfg = tiny(run_lr_scale=10.0)
    plain = TR.make_optimizer(TR._DiTParams(WorldModel(TINY)), tcfg, 1e-3)
    assert len(plain.param_groups) == 2  # a model without runs: the two groups as before
    model = WorldModel(replace(TINY, caption_runs=2))
    opt = TR.make_optimizer(TR._DiTParams(model), tcfg, 1e-3)
    runs = opt.param_groups[2]
    assert len(runs["params"]) == 1 and runs["params"][0] is model.text.run.weight
    assert all(p is not model.text.run.weight for g in opt.param_groups[:2] for p in g["params"])
    TR.set_lr(opt, 2e-4, tcfg)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([2e-4, 2e-4, 2e-3])
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="run_lr_scale"):
            tiny(run_lr_scale=bad)


def test_stop_at_stops_with_a_checkpoint_and_resume_finishes_bit_exactly(tmp_path):
    tcfg = tiny(steps_vae=2, steps_dit=3, ckpt_every=0)
    full = train(tcfg, tmp_path / "full", "cpu", progress=False)
    for at in (1, 3):  # in each phase
        msgs = []
        part = train(tcfg, tmp_path / f"at{at}", "cpu", progress=False, stop_at=at, log=msgs.append)
        assert part.step == at and part.checkpoints[-1].name == f"ckpt_{at:07d}.safetensors"
        assert any(f"stop_at {at} reached: stopped at step {at} of 5" in m for m in msgs), msgs
        done = train(tcfg, tmp_path / f"at{at}", "cpu", resume=tmp_path / f"at{at}", progress=False)
        a, b = full.model.state_dict(), done.model.state_dict()
        assert done.step == 5 and all(torch.equal(a[k], b[k]) for k in a), at
    assert train(tcfg, tmp_path / "past", "cpu", progress=False, stop_at=99).step == 5
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="stop_at must be a step count >= 1"):
            train(tcfg, tmp_path / "bad", "cpu", progress=False, stop_at=bad)


def test_pack_batch_foreground_and_weighted_loss():
    """Foreground cells travel with their latent frames; a weighted loss with equal weights is the
    plain loss, and weighting the foreground moves it towards the foreground cells' error."""
    from maskc.world_model.dit import WorldModel
    from maskc.world_model.text import pack_text

    cfg = TINY
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 2 * LF, 8, 8, cfg.latent_channels, generator=g)
    tokens = np.stack([vocab.encode_batch(["the red circle moves left", "the red circle falls"])] * 2)
    fg = np.zeros((2, 2 * LF, 8, 8), bool)
    fg[1, LF:, 2:4, 5:7] = True
    samples = [TR.SampleSpec(1, 1, 1, (0.4,), False, False), TR.SampleSpec(0, 0, 2, (0.6, 0.2), False, False)]
    p = TR.pack_batch(latents, tokens, samples, cfg, torch.Generator().manual_seed(1), fg)
    assert p.fg.shape == p.latents.shape[:3] and p.fg.dtype == torch.bool
    assert torch.equal(p.fg[:LF], torch.from_numpy(fg[1, LF:])) and not p.fg[LF:].any()
    assert TR.pack_batch(latents, tokens, samples, cfg, torch.Generator().manual_seed(1)).fg is None
    torch.manual_seed(0)
    model = WorldModel(cfg).requires_grad_(False)
    plain = TR.dit_loss(model, p)
    assert TR.dit_loss(model, p, fg_weight=0.0) == plain
    text, lens = pack_text(*model.text(p.tokens))
    args = (model.dit, p.latents, p.t_frames, p.noise, text, lens)
    kw = dict(video_chunks=p.video_chunks, chunk_offsets=p.chunk_offsets)
    ones = flow_matching_loss(*args, **kw, cell_weights=torch.ones(p.fg.shape))
    assert float(ones) == pytest.approx(float(plain), rel=1e-5)
    heavy = TR.dit_loss(model, p, fg_weight=1e6)  # ~ the mean error of the foreground cells of frame group 1
    only = flow_matching_loss(*args, **kw, cell_weights=p.fg.float() + 1e-9 * (~p.fg).float())
    assert float(heavy) != pytest.approx(float(plain), rel=1e-3)
    assert float(heavy) == pytest.approx(float(only), rel=1e-3)


def test_train_with_foreground_weight_and_resume_changing_it(tmp_path):
    tcfg = tiny(steps_vae=1, steps_dit=2, ckpt_every=1, fg_weight=4.0)
    res = train(tcfg, tmp_path, "cpu", progress=False)
    assert all(np.isfinite(loss) for _, loss in res.losses["dit"])
    more = replace(tcfg, steps_dit=3, fg_weight=8.0)  # fine-tuning with another weighting resumes
    res2 = train(more, tmp_path, "cpu", resume=tmp_path / "ckpt_0000003.safetensors", progress=False)
    assert res2.step == 4
    with pytest.raises(ValueError, match="fg_weight"):
        tiny(fg_weight=-1.0)


@pytest.mark.parametrize("name", ["small", "tiny"])
def test_config_files_name_every_field(name):
    """`magi train --help` points at small.json for every TrainConfig field: both shipped configs hold
    them all, at the values they have always run with (the fields added later at their defaults)."""
    import json
    from dataclasses import fields

    raw = json.loads((TR.CONFIG_DIR / f"{name}.json").read_text())
    assert sorted(raw) == sorted(f.name for f in fields(TR.TrainConfig))
    cfg = TR.load_train_config(name)
    assert (cfg.p_scheduled, cfg.p_lookahead, cfg.p_twin, cfg.run_lr_scale) == (0.0, 1.0, 0.0, 1.0)
    assert TR.TrainConfig.from_dict({k: v for k, v in raw.items() if k in ("model", "comment")}).p_twin == 0.0


def test_train_with_scheduled_clips_and_resume_changing_the_mix(tmp_path, monkeypatch):
    asked = []
    make_batch = TR.D.make_batch

    def spy(seed, index, n_chunks, batch, config=TR.D.WorldConfig(), p_scheduled=0.0, p_lookahead=1.0, p_twin=0.0):
        asked.append((p_scheduled, p_lookahead, p_twin))
        return make_batch(seed, index, n_chunks, batch, config, p_scheduled, p_lookahead, p_twin)

    monkeypatch.setattr(TR.D, "make_batch", spy)
    tcfg = tiny(steps_vae=1, steps_dit=2, ckpt_every=1)
    train(tcfg, tmp_path, "cpu", progress=False)
    assert {(p, tw) for p, _, tw in asked} == {(0.0, 0.0)}
    asked.clear()
    # fine-tuning on another data mix (scheduled clips, twin clips) resumes
    more = replace(tcfg, steps_dit=3, p_scheduled=0.5, p_lookahead=0.25, p_twin=0.2)
    res = train(more, tmp_path, "cpu", resume=tmp_path / "ckpt_0000003.safetensors", progress=False)
    assert res.step == 4 and asked and set(asked) == {(0.5, 0.25, 0.2)}  # the transformer's batches
    saved = load_checkpoint(tmp_path / "ckpt_0000004.safetensors")[2]["train_config"]
    assert (saved["p_scheduled"], saved["p_lookahead"], saved["p_twin"]) == (0.5, 0.25, 0.2)
    for name in ("p_scheduled", "p_lookahead", "p_twin"):
        for bad in (-0.5, 1.5):
            with pytest.raises(ValueError, match=name):
                tiny(**{name: bad})


# --------------------------------------------------------------------------------- training


def test_tiny_training_lowers_the_flow_matching_loss(tmp_path):
    """A short autoencoder phase (5 steps: over a random autoencoder the latents are close to
    noise and 30 steps barely move the loss), then 30 transformer steps lower the loss."""
    calls = []
    result = train(tiny(steps_vae=5, steps_dit=30, sample_every=10), tmp_path, "cpu", progress=False,
                   sample_fn=lambda model, step, out: calls.append((step, torch.is_grad_enabled())))
    vae = [loss for _, loss in result.losses["vae"]]
    dit = [loss for _, loss in result.losses["dit"]]
    assert len(vae) == 5 and len(dit) == 30 and result.step == 35
    assert vae[-1] < vae[0]
    first, last = np.mean(dit[:5]), np.mean(dit[-5:])
    assert last < 0.85 * first, dit
    assert calls == [(15, False), (25, False), (35, False)]
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "log.jsonl").is_file()
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert {r["phase"] for r in rows} == {"vae", "dit"}
    assert all(r["tokens"] == 4 * TINY.tokens_per_chunk for r in rows if r["phase"] == "dit")


def test_resume_continues_bit_exactly(tmp_path):
    """Resuming mid-autoencoder, at the phase boundary and mid-transformer gives the same losses
    and final weights as the uninterrupted run."""
    tcfg = tiny(steps_vae=2, steps_dit=3, ckpt_every=1, keep_checkpoints=10)
    full = train(tcfg, tmp_path / "full", "cpu", progress=False)
    assert [p.name for p in full.checkpoints] == [f"ckpt_{s:07d}.safetensors" for s in (1, 2, 3, 4, 5)]
    ref = losses(full)
    for at in (1, 2, 4):
        ckpt = tmp_path / "full" / f"ckpt_{at:07d}.safetensors"
        part = train(tcfg, tmp_path / f"resume{at}", "cpu", resume=ckpt, progress=False)
        got = losses(part)
        assert sorted(got) == list(range(at, 5)) and all(got[s] == ref[s] for s in got), (at, got, ref)
        a, b = full.model.state_dict(), part.model.state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), at


def test_time_limit_stops_with_a_checkpoint_and_resume_finishes_bit_exactly(tmp_path, monkeypatch):
    """``time_limit`` starts no step past the deadline, saves the step reached (in either phase) and
    returns short of the total; resuming from that checkpoint ends with the uninterrupted weights."""
    tcfg = tiny(steps_vae=2, steps_dit=3, ckpt_every=0)
    full = train(tcfg, tmp_path / "full", "cpu", progress=False)
    clock = iter(range(10**6))  # every perf_counter call is one "second" later
    monkeypatch.setattr(TR.time, "perf_counter", lambda: float(next(clock)))
    stops = {}
    for limit in (0.5, 3, 5, 7, 9):
        res = train(tcfg, tmp_path / f"cut{limit}", "cpu", progress=False, time_limit=limit)
        assert res.step < tcfg.total_steps and res.checkpoints and res.checkpoints[-1].name == f"ckpt_{res.step:07d}.safetensors"
        stops[limit] = res.step
    monkeypatch.undo()
    assert stops[0.5] == 0 and any(0 < s < 2 for s in stops.values()) and any(2 < s < 5 for s in stops.values()), stops
    for limit, at in stops.items():
        _, _, meta = load_checkpoint(tmp_path / f"cut{limit}" / "model.safetensors")
        assert meta["phase"] == ("vae" if at < 2 else "dit")
        part = train(tcfg, tmp_path / f"cut{limit}", "cpu", resume=tmp_path / f"cut{limit}", progress=False)
        assert part.step == tcfg.total_steps
        a, b = full.model.state_dict(), part.model.state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), limit
    with pytest.raises(ValueError, match="time_limit"):
        train(tcfg, tmp_path / "bad", "cpu", progress=False, time_limit=0)


def test_compile_for_training_keeps_the_checkpoint_keys(monkeypatch):
    """Compiling in place (blocks and encoder) must not rename the state-dict entries: checkpoints of a
    compiled run load into a plain model. It also keeps attention out of the compiled graphs, once."""
    from maskc.world_model import dit

    monkeypatch.setattr(dit, "attend", dit.attend)  # restored after the test
    assert not getattr(dit.attend, "_torchdynamo_disable", False)
    model = WorldModel(TINY)
    keys = list(model.state_dict())
    TR.compile_for_training(model)
    assert list(model.state_dict()) == keys
    assert model.vae.encoder._compiled_call_impl is not None
    assert all(b._compiled_call_impl is not None for b in model.dit.blocks)
    wrapped = dit.attend
    assert getattr(wrapped, "_torchdynamo_disable", False)
    TR.compile_for_training(WorldModel(TINY))
    assert dit.attend is wrapped  # not wrapped twice


def test_generation_does_not_import_the_compiler():
    """torch.compiler.disable imports torch._dynamo (about 1 s of a fresh process, 5 s without bytecode
    caches): importing the model, the sampler and the CLI, and generating, must not load it."""
    import subprocess
    import sys

    code = ("import sys, torch, maskc.world_model.generate, maskc.world_model.cli\n"
            "from maskc.world_model.dit import WorldModel\n"
            "from maskc.world_model.configs import TINY\n"
            "from maskc.world_model.generate import generate_chunks\n"
            "torch.manual_seed(0)\n"
            "m = WorldModel(TINY).eval()\n"
            "chunks = list(generate_chunks(m, ['the red circle moves right'], n_chunks=2, steps=2, seed=0))\n"
            "assert len(chunks) == 2\n"
            "assert 'torch._dynamo' not in sys.modules, 'torch._dynamo was imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_batch_reuse_encodes_every_other_step_and_resumes_bit_exactly(tmp_path, monkeypatch):
    """With ``reuse`` 2 two consecutive transformer steps share one generated batch (their own
    cuts, t and noise); resuming between the two re-encodes that batch and continues bit-exactly."""
    fetched = []
    real = TR._batch_arrays
    monkeypatch.setattr(TR, "_batch_arrays", lambda seed, index, *a, **kw: fetched.append(index) or real(seed, index, *a, **kw))
    tcfg = tiny(steps_vae=1, steps_dit=5, ckpt_every=1, keep_checkpoints=10, reuse=2)
    full = train(tcfg, tmp_path / "full", "cpu", progress=False)
    assert fetched[-3:] == [0, 1, 2]  # the autoencoder's batch, then transformer batches 0, 1, 2 for 5 steps
    ref = losses(full)
    assert len(set(ref.values())) == len(ref)  # a shared batch still gives each step its own loss
    fetched.clear()
    part = train(tcfg, tmp_path / "resume", "cpu", resume=tmp_path / "full" / "ckpt_0000004.safetensors",
                 progress=False)
    assert fetched == [1, 2]  # step 4 (transformer step 3) is the second step of batch 1: fetched again
    got = losses(part)
    assert sorted(got) == [4, 5] and all(got[s] == ref[s] for s in got)
    a, b = full.model.state_dict(), part.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="reuse"):
        tiny(reuse=0)
    with pytest.raises(ValueError, match="compile"):
        tiny(compile="yes")


def test_resume_trims_the_log_past_the_checkpoint(tmp_path):
    """A run resumed from an earlier checkpoint redoes the later steps: their old log lines go, so
    the log has one line per step, in order, ending at the new run's last step."""
    tcfg = tiny(steps_vae=2, steps_dit=4, ckpt_every=1, keep_checkpoints=10, log_every=1)
    train(tcfg, tmp_path, "cpu", progress=False)
    before = [json.loads(line)["step"] for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert before == list(range(6))
    train(tcfg, tmp_path, "cpu", resume=tmp_path / "ckpt_0000003.safetensors", progress=False)
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(6))
    assert {r["phase"] for r in rows} == {"vae", "dit"}


def test_resume_checks(tmp_path):
    tcfg = tiny(steps_vae=1, steps_dit=1)
    train(tcfg, tmp_path, "cpu", progress=False)
    ckpt = TR.latest_checkpoint(tmp_path)
    assert ckpt.name == "ckpt_0000002.safetensors" and TR.resolve_resume(tmp_path) == ckpt
    with pytest.raises(ValueError, match="seed=0 \\(asked 5\\)"):
        train(replace(tcfg, seed=5), tmp_path / "b", "cpu", resume=ckpt, progress=False)
    with pytest.raises(ValueError, match="steps_vae cannot change"):
        train(replace(tcfg, steps_vae=3), tmp_path / "b", "cpu", resume=ckpt, progress=False)
    with pytest.raises(ValueError, match="past the 1 steps"):
        train(replace(tcfg, steps_dit=0), tmp_path / "b", "cpu", resume=ckpt, progress=False)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        TR.resolve_resume(tmp_path / "nope.safetensors")
    with pytest.raises(FileNotFoundError, match="no ckpt_"):
        TR.resolve_resume(tmp_path / "b")
    # extending the run is allowed (the cosine schedule then follows the new length)
    more = train(replace(tcfg, steps_dit=2), tmp_path / "c", "cpu", resume=ckpt, progress=False)
    assert more.step == 3 and [s for s, _ in more.losses["dit"]] == [2]
    # so is fine-tuning on a new data mix: longer clips in a sliding window, more dropout and i2v
    mix = {"n_chunks": 4, "batch": 1, "attn_window": 2, "caption_dropout": 0.5, "p_i2v": 0.5, "p_cut": 0.0,
           "p_continuation": 0.5}
    tuned = train(replace(tcfg, steps_dit=3, **mix), tmp_path / "d", "cpu", resume=ckpt, progress=False)
    assert tuned.step == 4 and json.loads((tmp_path / "d" / "train_config.json").read_text())["n_chunks"] == 4
    with pytest.raises(ValueError, match="lr_dit=.*only steps_vae"):  # the optimizer's settings stay
        train(replace(tcfg, steps_dit=3, lr_dit=1.0), tmp_path / "e", "cpu", resume=ckpt, progress=False)


# ------------------------------------------------------------------------------- checkpoints


def test_checkpoint_roundtrip_is_bit_exact(tmp_path):
    torch.manual_seed(0)
    model = WorldModel(TINY)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # no zero-initialised tensor left
        model.vae.latent_mean.normal_()
    opt = TR.make_optimizer(TR._DiTParams(model), TrainConfig(), 1e-3)
    text, lens = model.encode_captions(["the red circle moves left"])
    z = torch.randn(LF, 8, 8, TINY.latent_channels)
    model.dit(z, torch.tensor([0.5]), text, lens).square().mean().backward()
    opt.step()
    tcfg = tiny().to_dict()
    path = save_checkpoint(tmp_path / "c.safetensors", model, step=7, train_config=tcfg, optimizer=opt,
                           meta={"phase": "dit", "latent_stats": True})
    loaded, cfg, meta = load_checkpoint(path)
    assert cfg == TINY and meta["step"] == 7 and meta["train_config"] == tcfg
    assert meta["phase"] == "dit" and meta["latent_stats"] is True
    assert meta["optimizer"] == str(optimizer_path(path)) and optimizer_path(path).name == "c.optim.safetensors"
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    with torch.no_grad():
        caps = ["the red circle moves left"]
        assert torch.equal(model.dit(z, torch.tensor([0.3]), *model.encode_captions(caps)),
                           loaded.dit(z, torch.tensor([0.3]), *loaded.encode_captions(caps)))
    # optimizer state round-trips too
    opt2 = TR.make_optimizer(TR._DiTParams(loaded), TrainConfig(), 1e-3)
    load_optimizer_state(meta["optimizer"], opt2)
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["param_groups"] == s2["param_groups"] and s1["state"].keys() == s2["state"].keys()
    for i in s1["state"]:
        for k, v in s1["state"][i].items():
            assert torch.equal(v, s2["state"][i][k])
    assert read_optimizer_state(meta["optimizer"])[1]["step"] == 7
    # without an optimizer the (stale) optimizer file goes away; weights-only loads still work
    save_checkpoint(path, model, step=8)
    assert not optimizer_path(path).exists()
    _, _, meta = load_checkpoint(path)
    assert meta["step"] == 8 and meta["optimizer"] is None and meta["train_config"] is None
    # a bf16 export halves the file and loads back as float32
    small = save_checkpoint(tmp_path / "h.safetensors", model, dtype=torch.bfloat16)
    m16, _, _ = load_checkpoint(small)
    assert small.stat().st_size < 0.6 * path.stat().st_size
    assert torch.allclose(m16.dit.embed.weight, model.dit.embed.weight, rtol=1e-2, atol=1e-3)


def test_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_checkpoint(junk)
    import safetensors.torch as st

    other = tmp_path / "other.safetensors"
    st.save_file({"x": torch.zeros(2)}, str(other))
    with pytest.raises(ValueError, match="not a world-model checkpoint"):
        load_checkpoint(other)
    with pytest.raises(ValueError, match="reserved"):
        save_checkpoint(tmp_path / "r.safetensors", WorldModel(TINY), meta={"step": 3})


# ------------------------------------------------------------------------------------- CLI


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0 and "train" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    for words in ("phase 1", "phase 2", "flow matching", "examples:", "--resume", "--steps-vae", "small", "--t-mean"):
        assert words in out, words
    # an example continued over two lines is printed as written: the backslash and the line break stay
    assert "--caption-runs 4 \\\n      --p-scheduled" in out and "--t-std 1.4 --stop-at 13142" in out
    with pytest.raises(SystemExit):
        cli.main(["generate", "--help"])
    assert "--also auto \\\n      --chunks 16" in capsys.readouterr().out


def test_cli_smoke_and_resume(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--config", "tiny", "--steps-vae", "1", "--steps-dit", "2", "--out", str(out),
            "--device", "cpu", "--no-progress"]
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    assert "step 3 of 3" in printed and "weights:" in printed and "resume with" in printed
    model, cfg, meta = load_checkpoint(out / "model.safetensors")
    assert cfg == TINY and meta["step"] == 3 and meta["train_config"]["steps_dit"] == 2
    assert json.loads((out / "train_config.json").read_text())["steps_vae"] == 1
    # continue the same run for one more transformer step: config comes from the checkpoint
    assert cli.main(["train", "--resume", str(out), "--steps-dit", "3", "--out", str(out), "--no-progress",
                     "--device", "cpu"]) == 0
    assert "step 4 of 4" in capsys.readouterr().out
    assert load_checkpoint(out / "model.safetensors")[2]["step"] == 4
    # tell the captions their runs from here on, and stop at a given step
    assert cli.main(["train", "--resume", str(out), "--caption-runs", "3", "--steps-dit", "6", "--stop-at", "6",
                     "--out", str(tmp_path / "runs"), "--no-progress", "--device", "cpu"]) == 0
    assert "step 6 of 7" in capsys.readouterr().out
    _, cfg, meta = load_checkpoint(tmp_path / "runs" / "model.safetensors")
    assert cfg == replace(TINY, caption_runs=3) and meta["train_config"]["model"]["caption_runs"] == 3
    # fine-tune with the noise levels drawn elsewhere (the shipped model's last fine-tune)
    assert cli.main(["train", "--resume", str(out), "--t-mean", "-0.35", "--t-std", "1.4", "--steps-dit", "4",
                     "--out", str(tmp_path / "noisy"), "--no-progress", "--device", "cpu"]) == 0
    assert "step 5 of 5" in capsys.readouterr().out
    tc = load_checkpoint(tmp_path / "noisy" / "model.safetensors")[2]["train_config"]
    assert (tc["t_mean"], tc["t_std"]) == (-0.35, 1.4)


@pytest.mark.parametrize("argv, message", [
    (["--config", "huge"], "unknown training config 'huge'"),
    (["--config", "tiny", "--steps-vae", "-1"], "--steps-vae: expected an integer >= 0, got -1"),
    (["--config", "tiny", "--steps-dit", "x"], "expected an integer >= 0, got .x."),
    (["--config", "tiny", "--batch", "0"], "--batch: expected a positive integer, got 0"),
    (["--config", "tiny", "--p-scheduled", "1.5"], "p_scheduled=1.5 must be in \\[0, 1\\]"),
    (["--config", "tiny", "--p-lookahead", "2"], "p_lookahead=2.0 must be in \\[0, 1\\]"),
    (["--config", "tiny", "--p-twin", "1.5"], "p_twin=1.5 must be in \\[0, 1\\]"),
    (["--config", "tiny", "--p-twin", "-0.1"], "--p-twin: "),
    (["--config", "tiny", "--time-limit", "0"], "--time-limit: must be a finite number > 0, got 0"),
    (["--config", "tiny", "--time-limit", "soon"], "--time-limit: expected a number, got 'soon'"),
    (["--config", "tiny", "--caption-runs", "0"], "--caption-runs: expected a positive integer, got 0"),
    (["--config", "tiny", "--caption-runs", "99"], "caption_runs 99 must be an integer in \\[0, 64\\]"),
    (["--config", "tiny", "--stop-at", "0"], "--stop-at: expected a positive integer, got 0"),
    (["--config", "tiny", "--run-lr-scale", "0"], "--run-lr-scale: must be a finite number > 0, got 0"),
    (["--config", "tiny", "--t-mean", "nan"], "--t-mean: must be a finite number, got nan"),
    (["--config", "tiny", "--t-mean", "low"], "--t-mean: expected a number, got 'low'"),
    (["--config", "tiny", "--t-std", "0"], "--t-std: must be a finite number > 0, got 0"),
    (["--resume", "MISSING/ckpt_0000001.safetensors"], "does not exist"),
    (["--resume", "MISSING_DIR"], "does not exist"),
    (["--config", "missing.json"], "does not exist"),
    (["--config", "BADKEY"], "unknown training config keys \\['bogus'\\]"),
    (["--config", "BADJSON"], "not valid JSON"),
    ([], "--config is required"),
])
def test_cli_bad_inputs(tmp_path, capsys, argv, message):
    bad_key, bad_json = tmp_path / "badkey.json", tmp_path / "bad.json"
    bad_key.write_text(json.dumps({"model": "tiny", "bogus": 1}))
    bad_json.write_text("{model: tiny")
    argv = [a.replace("MISSING", str(tmp_path / "nowhere")).replace("BADKEY", str(bad_key))
            .replace("BADJSON", str(bad_json)) for a in argv]
    with pytest.raises(SystemExit) as e:
        cli.main(["train", *argv, "--out", str(tmp_path / "out"), "--device", "cpu"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "magi train: error:" in err
    assert __import__("re").search(message, err), err
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cli_cuda_without_gpu(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--config", "tiny", "--out", str(tmp_path), "--device", "cuda"])
    assert e.value.code == 2 and "no CUDA GPU" in capsys.readouterr().err


def test_finetune_decoder_changes_the_decoder_only(tmp_path, capsys):
    torch.manual_seed(0)
    src = save_checkpoint(tmp_path / "w.safetensors", WorldModel(TINY), step=7, meta={"phase": "dit"})
    r = TR.finetune_decoder(src, tmp_path / "ctx.safetensors", steps=3, batch=2, held_out=2, warmup=1)
    assert r["steps_done"] == 3 and r["context"] == 1 and len(r["held_out_mse_by_frame_after"]) == TINY.chunk_frames
    a, cfg_a, meta_a = load_checkpoint(src)
    b, cfg_b, meta_b = load_checkpoint(tmp_path / "ctx.safetensors")
    assert cfg_a.vae_context == 0 and cfg_b == replace(cfg_a, vae_context=1)
    assert meta_b["step"] == 7 and meta_b["phase"] == "dit" and meta_b["decoder_finetune"]["steps"] == 3
    sa, sb = a.state_dict(), b.state_dict()
    changed = {k for k in sa if not torch.equal(sa[k], sb[k])}
    assert changed and all(k.startswith("vae.decoder.") for k in changed)  # a float32 source stays float32
    for bad, msg in (({"context": 0}, "context must be 1..4"), ({"steps": 0}, "steps must be an integer >= 1"),
                     ({"time_limit": 0.0}, "ran out before the first step")):
        with pytest.raises(ValueError, match=msg):
            TR.finetune_decoder(src, tmp_path / "x.safetensors", held_out=1, **bad)
    assert cli.main(["finetune-decoder", "--weights", str(src), "--out", str(tmp_path / "c.safetensors"),
                     "--steps", "2", "--batch", "1", "--held-out", "1", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "fine-tuned the decoder: 2 steps" in out and "held-out reconstruction MSE" in out
    with pytest.raises(SystemExit):
        cli.main(["finetune-decoder", "--weights", str(tmp_path / "missing.safetensors"), "--out", "x"])
    assert "do not exist" in capsys.readouterr().err


def test_finetune_decoder_causal_keeps_the_record_of_the_fine_tune_before(tmp_path):
    torch.manual_seed(0)
    src = save_checkpoint(tmp_path / "w.safetensors", WorldModel(TINY), step=7, meta={"phase": "dit"})
    kw = {"steps": 2, "batch": 1, "held_out": 1, "warmup": 1}
    r = TR.finetune_decoder(src, tmp_path / "causal.safetensors", causal=True, context=3, clip_chunks=4, **kw)
    assert r["causal"] is True and r["clip_chunks"] == 4 and r["context"] == 3 and "previous" not in r
    assert np.isfinite(r["held_out_seams_before"]) and np.isfinite(r["held_out_seams_after"])
    assert r["held_out_latent_steps_before"] > 0 and r["held_out_latent_steps_after"] > 0 and r["diff_weight"] == 0.0
    assert r["held_out_seams_before"] > 0 and r["held_out_seams_after"] > 0
    a, cfg_a, _ = load_checkpoint(src)
    b, cfg_b, meta_b = load_checkpoint(tmp_path / "causal.safetensors")
    assert cfg_a.vae_causal is False and cfg_b == replace(cfg_a, vae_context=3, vae_causal=True)
    assert type(b.vae.decoder.stem).__name__ == "CausalConv3d"
    assert meta_b["step"] == 7 and meta_b["phase"] == "dit" and meta_b["decoder_finetune"] == r
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()  # the same parameters, rewired
    changed = {k for k in sa if not torch.equal(sa[k], sb[k])}
    assert changed and all(k.startswith("vae.decoder.") for k in changed)
    # fine-tuning a causal decoder again keeps it causal (causal=False does not undo it) and nests the record
    r2 = TR.finetune_decoder(tmp_path / "causal.safetensors", tmp_path / "again.safetensors", context=3, **kw)
    _, cfg_c, meta_c = load_checkpoint(tmp_path / "again.safetensors")
    assert cfg_c == cfg_b and r2["causal"] is True and r2["clip_chunks"] == 4  # default: context + 1
    assert r2["previous"] == r and meta_c["decoder_finetune"]["previous"] == meta_b["decoder_finetune"]
    for bad, msg in (({"clip_chunks": 1}, "clip_chunks must be >= 2"), ({"clip_chunks": 0}, "clip_chunks must be"),
                     ({"causal": 1}, "causal must be True or False"),
                     ({"causal": "yes"}, "causal must be True or False"),
                     ({"diff_weight": -1.0}, "diff_weight must be a number >= 0"),
                     ({"diff_weight": float("nan")}, "diff_weight must be a number >= 0")):
        with pytest.raises(ValueError, match=msg):
            TR.finetune_decoder(src, tmp_path / "x.safetensors", held_out=1, **bad)
    assert not (tmp_path / "x.safetensors").exists()


def test_finetune_decoder_delay_warm_starts_a_decoder_that_reads_ahead(tmp_path, capsys):
    """delay=1: the causal decoder learns to read one latent frame ahead, warm-started by `vae.delay_from`
    (its look-ahead tap starts at zero, so after one AdamW step it is at most about lr); the config and
    the record say so, a later fine-tune keeps the delay, and less delay than stored or a delay without a
    causal decoder are refused."""
    torch.manual_seed(0)
    src = save_checkpoint(tmp_path / "w.safetensors", WorldModel(replace(TINY, vae_causal=True, vae_context=3)), step=7)
    kw = {"steps": 1, "batch": 1, "held_out": 1, "warmup": 1, "lr": 1e-3}
    r = TR.finetune_decoder(src, tmp_path / "d.safetensors", delay=1, **kw)
    assert r["delay"] == 1 and r["causal"] is True and r["steps_done"] == 1
    a, cfg_a, _ = load_checkpoint(src)
    b, cfg_b, meta_b = load_checkpoint(tmp_path / "d.safetensors")
    assert cfg_a.vae_delay == 0 and cfg_b == replace(cfg_a, vae_delay=1) and meta_b["decoder_finetune"]["delay"] == 1
    look_ahead = b.vae.decoder.stem.weight[:, :, 2]
    assert look_ahead.abs().max() <= 1.5e-3 < a.vae.decoder.stem.weight[:, :, 2].abs().max()
    r2 = TR.finetune_decoder(tmp_path / "d.safetensors", tmp_path / "d2.safetensors", **kw)  # keeps the delay
    assert r2["delay"] == 1 and load_checkpoint(tmp_path / "d2.safetensors")[1].vae_delay == 1
    plain = save_checkpoint(tmp_path / "p.safetensors", WorldModel(TINY), step=7)
    for weights, bad, msg in ((tmp_path / "d.safetensors", {"delay": 0}, "less than the stored decoder's"),
                              (plain, {"delay": 1}, "needs a causal decoder"),
                              (src, {"delay": -1}, "delay must be an integer >= 0"),
                              (src, {"delay": True}, "delay must be an integer >= 0")):
        with pytest.raises(ValueError, match=msg):
            TR.finetune_decoder(weights, tmp_path / "x.safetensors", **kw, **bad)
    assert not (tmp_path / "x.safetensors").exists()
    assert cli.main(["finetune-decoder", "--weights", str(src), "--out", str(tmp_path / "c.safetensors"), "--delay", "2",
                     "--steps", "1", "--batch", "1", "--held-out", "1", "--device", "cpu"]) == 0
    assert load_checkpoint(tmp_path / "c.safetensors")[1].vae_delay == 2 and "fine-tuned the decoder" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["finetune-decoder", "--weights", str(plain), "--out", str(tmp_path / "x.safetensors"), "--delay", "1"])
    assert "needs a causal decoder" in capsys.readouterr().err


def test_cli_finetune_decoder_causal(tmp_path, capsys):
    torch.manual_seed(0)
    src = save_checkpoint(tmp_path / "w.safetensors", WorldModel(TINY), step=7, meta={"phase": "dit"})
    out = tmp_path / "c.safetensors"
    assert cli.main(["finetune-decoder", "--weights", str(src), "--out", str(out), "--causal", "--clip-chunks", "4",
                     "--steps", "1", "--batch", "1", "--held-out", "1", "--device", "cpu"]) == 0  # context: 3 for causal
    text = capsys.readouterr().out
    assert "fine-tuned the decoder: 1 steps" in text and "held-out round-trip seams" in text
    assert "steps where a latent frame starts" in text
    _, cfg, meta = load_checkpoint(out)
    assert meta["decoder_finetune"]["held_out_clips"] == 1 and meta["decoder_finetune"]["causal"] is True
    assert cfg.vae_causal is True and cfg.vae_context == 3 and meta["decoder_finetune"]["clip_chunks"] == 4
    with pytest.raises(SystemExit):
        cli.main(["finetune-decoder", "--weights", str(src), "--out", str(out), "--clip-chunks", "1"])
    assert "clip_chunks must be >= 2" in capsys.readouterr().err
    # a causal decoder trains on what a stream reads: its whole receptive field (13 latent frames, 3 chunks)
    for args in (["--causal", "--context", "2"], ["--weights", str(out), "--context", "2"]):
        with pytest.raises(SystemExit):
            cli.main(["finetune-decoder", "--weights", str(src), "--out", str(tmp_path / "x.safetensors"), *args])
        assert "a causal decoder needs context >= 3 chunks" in capsys.readouterr().err


def test_batch_source_workers_give_the_same_batches_through_shared_memory():
    # the worker pool writes frames into shared-memory slots; order and contents equal the
    # in-process source, and a returned frame view stays intact until the next get()
    plain = TR.BatchSource(7, 2, 3, start=4, workers=0, cells=(4, 8), p_scheduled=0.5, p_lookahead=0.5, p_twin=0.3)
    pooled = TR.BatchSource(7, 2, 3, start=4, workers=2, cells=(4, 8), p_scheduled=0.5, p_lookahead=0.5, p_twin=0.3)
    try:
        for _ in range(5):
            f0, t0, g0 = plain.get()
            f1, t1, g1 = pooled.get()
            assert f1.shape == f0.shape and f1.dtype == np.uint8
            np.testing.assert_array_equal(f1, f0)
            np.testing.assert_array_equal(t1, t0)
            np.testing.assert_array_equal(g1, g0)
        slots = {s.name for s in pooled.slots}
        assert len(slots) == 2 * 2 + 1
    finally:
        plain.close()
        pooled.close()
    assert pooled.slots == [] and pooled.pool is None


def test_batch_source_that_fails_to_start_leaves_no_shared_memory(monkeypatch):
    from multiprocessing import shared_memory

    made = []
    real = shared_memory.SharedMemory

    def spy(*args, **kwargs):
        seg = real(*args, **kwargs)
        made.append(seg.name)
        return seg

    def no_pool(*args, **kwargs):
        raise OSError("no processes here")

    monkeypatch.setattr(shared_memory, "SharedMemory", spy)
    monkeypatch.setattr(TR, "ProcessPoolExecutor", no_pool)
    with pytest.raises(OSError, match="no processes here"):
        TR.BatchSource(7, 2, 3, start=0, workers=2)
    assert len(made) == 2 * 2 + 1
    for name in made:  # every segment it made was unlinked
        with pytest.raises(FileNotFoundError):
            real(name=name)
