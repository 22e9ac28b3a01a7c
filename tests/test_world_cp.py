"""Context-parallel training step of the world model's transformer (CPU: gloo, Triton interpreter, float32).

A packed batch of four samples of different lengths (a clean continuation prefix, an image-to-video
sample with a clean first latent frame, a dropped caption) goes through `cp_dit_loss` on 2 and 3
gloo ranks; the ranks' losses must add up to the single-process `train.dit_loss` (rel 1e-5) and,
after `allreduce_grads`, every rank must hold its gradient (rel 1e-4 per parameter). The
single-process reference runs the dense float64 attention, the ranks the interpreted FFA kernels
in float32: both are exact well below these tolerances.

The kernels take head dims 64/128/256, so the model is TINY with two heads of 64 (GQA 2:1) and a
smaller video geometry: 12 tokens per chunk (3 latent frames of 2 x 2 patches), 96 tokens in all.
On 2 ranks the dispatch chunk is given: 48 tokens, whole video chunks (this small batch would
balance better on 16-token chunks, which the default then picks); on 3 ranks the default is used:
48-token units cannot feed every rank, so the plan uses 16-token chunks that split video chunks
across ranks (exactness must not depend on alignment).
"""

import os
from dataclasses import replace

import numpy as np
import pytest
import torch

from maskc.world_model import train as TR
from maskc.world_model import vocab
from maskc.world_model.configs import TINY
from maskc.world_model.dit import WorldModel, flow_matching_loss
from maskc.world_model.parallel import (
    allreduce_grads, cp_dit_loss, cp_flow_matching_loss, dispatch_chunk, make_cp_context,
)
from maskc.world_model.text import pack_text

from processes import init_gloo, spawn as _spawn

CFG = replace(TINY, name="tiny-cp", frame_size=32, chunk_frames=12, dim=128, heads=2, kv_heads=1,
              rope_split=(32, 16, 16))
BLOCK = 16  # the interpreter's tiles
LOSS_TOL, GRAD_TOL = 1e-5, 1e-4
CAPTIONS = [
    ("red", "circle", "falls"), ("blue", "square", "moves left"),
    ("green", "triangle", "stays still"), ("white", "circle", "bounces off the floor"),
]
# (clip, first chunk, length, t per chunk, i2v, caption dropped): 3 + 1 + 2 + 2 = 8 chunks
SAMPLES = [
    TR.SampleSpec(0, 0, 3, (1.0, 0.6, 0.3), False, False),  # continuation: a clean first chunk
    TR.SampleSpec(1, 1, 1, (0.5,), True, False),  # image-to-video: a clean first latent frame
    TR.SampleSpec(2, 0, 2, (0.8, 0.2), False, True),  # dropped caption (BOS EOS only)
    TR.SampleSpec(1, 2, 2, (0.9, 0.4), False, False),
]


def _rel(x, ref):
    ref = ref.double()
    return ((x.double() - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def build_model():
    """TINY-like model whose zero-initialised parameters (gates, output layer) are re-drawn, so
    every parameter carries gradient."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = WorldModel(CFG)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def build_packed():
    g = torch.Generator().manual_seed(2)
    lf, ls = CFG.latent_frames, CFG.latent_size
    latents = torch.randn(3, 4 * lf, ls, ls, CFG.latent_channels, generator=g)
    caps = vocab.encode_batch([vocab.format_caption(*c) for c in CAPTIONS], vocab.MAX_CAPTION_TOKENS)
    tokens = np.stack([np.roll(caps, i, axis=0) for i in range(3)])  # [clips, chunks, L]
    return TR.pack_batch(latents, tokens, SAMPLES, CFG, torch.Generator().manual_seed(3))


def grads_of(module):
    return {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}


@pytest.fixture(scope="module")
def reference():
    """The single-process loss and gradients of the caption encoder + transformer."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    model = build_model()
    trainable = TR._DiTParams(model)
    loss = TR.dit_loss(model, build_packed())
    loss.backward()
    yield loss.item(), grads_of(trainable)
    torch.set_num_threads(n)


def check_grads(got: dict, ref: dict, where: str):
    assert set(got) == set(ref), f"{where}: parameters with gradients differ"
    bad = {}
    for name, r in ref.items():
        if r.norm() > 0:
            e = _rel(got[name], r)
        else:
            e = got[name].abs().max().item()
        if not e < GRAD_TOL:
            bad[name] = e
    assert not bad, f"{where}: gradient errors {bad}"


# ---- process helpers ---------------------------------------------------------------------------


def _catch(fn) -> str:
    try:
        fn()
    except ValueError as e:
        return str(e)
    return "no error"


def _cp_step(rank, world, init, out_dir, chunk):
    dist = init_gloo(rank, world, init)
    model, packed = build_model(), build_packed()
    trainable = TR._DiTParams(model)
    cp = make_cp_context(packed.video_chunks, CFG, cp_size=world, rank=rank, block=BLOCK, chunk=chunk)
    loss = cp_dit_loss(model, packed, cp)
    loss.backward()
    allreduce_grads(trainable)
    report = {"loss": loss.item(), "positions": cp.positions.tolist(), "chunk": cp.plan.chunk,
              "runs": cp.plan.dispatch.rank_runs(rank).tolist()}
    # bad inputs: clear errors, raised before any collective (so nothing hangs)
    report["cp_size"] = _catch(lambda: make_cp_context(packed.video_chunks, CFG, cp_size=world + 1, rank=rank,
                                                       block=BLOCK))
    report["rank"] = _catch(lambda: make_cp_context(packed.video_chunks, CFG, cp_size=world,
                                                    rank=(rank + 1) % world, block=BLOCK))
    text, lens = pack_text(*model.text(packed.tokens))
    report["latents"] = _catch(lambda: cp_flow_matching_loss(
        model.dit, packed.latents[:, :, :2], packed.t_frames, packed.noise[:, :, :2], text, lens,
        packed.video_chunks, packed.chunk_offsets, cp))
    report["layout"] = _catch(lambda: cp_flow_matching_loss(
        model.dit, packed.latents, packed.t_frames, packed.noise, text, lens,
        (2, 2, 2, 2), (0, 0, 0, 0), cp))
    t = torch.ones(1)
    dist.all_reduce(t)  # the group still works
    report["after"] = float(t)
    torch.save({"report": report, "grads": grads_of(trainable)}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


# ---- tests -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("world, chunk", [(2, 48), (3, None)])
def test_cp_step_matches_single_process(world, chunk, reference, tmp_path):
    ref_loss, ref_grads = reference
    _spawn(_cp_step, world, str(tmp_path), chunk)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    reports = [r["report"] for r in results]
    total = sum(r["loss"] for r in reports)
    assert abs(total - ref_loss) / abs(ref_loss) < LOSS_TOL, (total, ref_loss, [r["loss"] for r in reports])
    assert all(r["loss"] != 0 for r in reports)  # every rank holds some noisy tokens
    for rank, res in enumerate(results):
        check_grads(res["grads"], ref_grads, f"rank {rank}")
    # the ranks' positions cover the sequence exactly once
    seq = sum(SAMPLES[i].length for i in range(len(SAMPLES))) * CFG.tokens_per_chunk
    allpos = np.concatenate([r["positions"] for r in reports])
    assert np.array_equal(np.sort(allpos), np.arange(seq))
    t = CFG.tokens_per_chunk
    aligned = all(a % t == 0 and b % t == 0 for r in reports for a, b in r["runs"])
    assert aligned == (world == 2), "2 ranks: whole video chunks; 3 ranks: 16-token chunks that split them"
    assert all(r["chunk"] == (48 if world == 2 else BLOCK) for r in reports)
    for r in reports:
        assert f"cp_size={world + 1} but the process group has {world} ranks" in r["cp_size"]
        assert "this process is rank" in r["rank"]
        assert "latents must be packed latent frames" in r["latents"]
        assert "plan is for another self-attention mask" in r["layout"]
        assert r["after"] == world


def test_cp_size_one_without_process_group(reference):
    """cp_size=1 needs no process group and gives the single-process loss and gradients."""
    ref_loss, ref_grads = reference
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, packed = build_model(), build_packed()
        trainable = TR._DiTParams(model)
        cp = make_cp_context(packed.video_chunks, CFG, cp_size=1, block=BLOCK)
        loss = cp_dit_loss(model, packed, cp)
        loss.backward()
        allreduce_grads(trainable)  # no group: a no-op
        assert abs(loss.item() - ref_loss) / abs(ref_loss) < LOSS_TOL
        check_grads(grads_of(trainable), ref_grads, "cp_size=1")
        # the forward with cp returns the rank's velocity tokens
        text, lens = pack_text(*model.text(packed.tokens))
        with torch.no_grad():
            v = model.dit(packed.latents, packed.t_frames, text, lens, packed.video_chunks, packed.chunk_offsets,
                          cp=cp)
        assert tuple(v.shape) == (cp.n_local, CFG.patch_dim)
        # a sliding chunk window: the plan of the windowed mask gives the windowed loss
        cpw = make_cp_context(packed.video_chunks, CFG, cp_size=1, block=BLOCK, window=1)
        with torch.no_grad():
            ref_w = flow_matching_loss(model.dit, packed.latents, packed.t_frames, packed.noise, text, lens,
                                       packed.video_chunks, packed.chunk_offsets, window=1)
            got_w = cp_flow_matching_loss(model.dit, packed.latents, packed.t_frames, packed.noise, text, lens,
                                          packed.video_chunks, packed.chunk_offsets, cpw, window=1)
        assert abs(got_w.item() - ref_w.item()) / ref_w.item() < LOSS_TOL and abs(ref_w.item() - ref_loss) > 1e-3
        with pytest.raises(ValueError, match="plan is for another self-attention mask"):
            cp_flow_matching_loss(model.dit, packed.latents, packed.t_frames, packed.noise, text, lens,
                                  packed.video_chunks, packed.chunk_offsets, cpw)  # window forgotten
        # per-cell weights (the foreground-weighted loss): the same weighted loss as one process
        g = torch.Generator().manual_seed(3)
        cells = torch.rand(packed.latents.shape[:3], generator=g) * 4
        with torch.no_grad():
            ref_c = flow_matching_loss(model.dit, packed.latents, packed.t_frames, packed.noise, text, lens,
                                       packed.video_chunks, packed.chunk_offsets, cell_weights=cells)
            got_c = cp_flow_matching_loss(model.dit, packed.latents, packed.t_frames, packed.noise, text, lens,
                                          packed.video_chunks, packed.chunk_offsets, cp, cell_weights=cells)
        assert abs(got_c.item() - ref_c.item()) / ref_c.item() < LOSS_TOL and abs(ref_c.item() - ref_loss) > 1e-3
        fg = replace(packed, fg=(cells > 2))  # cp_dit_loss passes fg_weight on as dit_loss does
        with torch.no_grad():
            ref_fg = TR.dit_loss(model, fg, fg_weight=3.0).item()
            assert abs(cp_dit_loss(model, fg, cp, fg_weight=3.0).item() - ref_fg) / ref_fg < LOSS_TOL
        with pytest.raises(ValueError, match="one weight per latent cell"):
            cp_flow_matching_loss(model.dit, packed.latents, packed.t_frames, packed.noise, text, lens,
                                  packed.video_chunks, packed.chunk_offsets, cp, cell_weights=cells[:, :1])
        with pytest.raises(ValueError, match="past_kv and return_kv are not supported"):
            model.dit(packed.latents, packed.t_frames, text, lens, packed.video_chunks, packed.chunk_offsets,
                      return_kv=True, cp=cp)
    finally:
        torch.set_num_threads(n)


@pytest.mark.parametrize("cp_size", [1, 2, 3, 4, 5, 8])
def test_positions_cover_every_token_once(cp_size):
    video_chunks = (3, 1, 2, 2, 4, 1, 3)
    seq = sum(video_chunks) * CFG.tokens_per_chunk
    ctxs = [make_cp_context(video_chunks, CFG, cp_size=cp_size, rank=r, block=BLOCK) for r in range(cp_size)]
    allpos = np.concatenate([c.positions for c in ctxs])
    assert np.array_equal(np.sort(allpos), np.arange(seq))
    assert sum(c.n_local for c in ctxs) == seq
    for c in ctxs:
        assert np.all(np.diff(c.positions) > 0)  # local order is increasing global order
        assert c.index("cpu").tolist() == c.positions.tolist()
    # the dispatch chunk holds whole video chunks whenever every rank can get one
    unit = np.lcm(BLOCK, CFG.tokens_per_chunk)
    if seq >= unit * cp_size and ctxs[0].plan.chunk % unit == 0:
        for c in ctxs:
            assert np.all(c.plan.dispatch.rank_runs(c.rank) % CFG.tokens_per_chunk == 0)


def test_dispatch_chunk_choice():
    # small: 96 tokens per chunk, 128-token tiles -> multiples of 384; 1M tokens on 8 ranks
    n = 2731 * 4 * 96
    c = dispatch_chunk(n, 8, 128, 96)
    assert c % 384 == 0 and n // c >= 8 * 8 and c <= 64 * 128
    assert dispatch_chunk(96 * 4, 8, 128, 96) is None  # 384 tokens cannot feed 8 ranks whole units


def test_bad_inputs_without_process_group():
    with pytest.raises(ValueError, match="head_dim 16"):
        make_cp_context((2, 1), TINY, cp_size=1)
    with pytest.raises(ValueError, match="cp_size must be an integer >= 1"):
        make_cp_context((2, 1), CFG, cp_size=0, rank=0)
    with pytest.raises(ValueError, match=r"rank 3 must lie in \[0, 2\)"):
        make_cp_context((2, 1), CFG, cp_size=2, rank=3, block=BLOCK)
    with pytest.raises(ValueError, match="needs torch.distributed to be initialised"):
        make_cp_context((2, 1), CFG, cp_size=2, block=BLOCK)
    with pytest.raises(ValueError, match="must be one or more integers >= 1"):
        make_cp_context((2, 0), CFG, cp_size=1, block=BLOCK)
