"""The world model's networks: configs, autoencoder, caption encoder, masks, diffusion transformer."""

import json
import os
from dataclasses import replace

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import maskc
from maskc.runtime import attention, reference_attention
from maskc.world_model import data as D
from maskc.world_model import dit as DIT
from maskc.world_model import masks as M
from maskc.world_model import vae as V
from maskc.world_model.configs import CONFIGS, SMALL, TINY, ModelConfig, get_config
from maskc.world_model.dit import (
    WorldModel, attend, flow_matching_loss, noisy_latents, param_counts, patchify, positions, unpatchify,
)
from maskc.world_model.text import TextEncoder, caption_runs, pack_text, tokenize
from maskc.world_model.vae import (
    CausalConv3d, Decoder, FrameGroupNorm, VideoVAE, causal_from, decoder_loss, receptive_latent_frames, vae_loss,
)

CAPTIONS = [
    "the red circle moves left", "the blue square falls", "the red circle stays still",
    "the green triangle bounces off the left wall", "the yellow square moves up",
]
LF = TINY.latent_frames  # 6
T = TINY.tokens_per_chunk  # 96


from world_helpers import one_thread, randomized, tiny  # noqa: F401 (pytest fixtures)


def inputs(model, n_chunks, seed=0, captions=None):
    g = torch.Generator().manual_seed(seed)
    lat = torch.randn(n_chunks * LF, TINY.latent_size, TINY.latent_size, TINY.latent_channels, generator=g)
    t = torch.rand(n_chunks, generator=g)
    caps = captions or [CAPTIONS[i % len(CAPTIONS)] for i in range(n_chunks)]
    text, lens = model.encode_captions(caps)
    return lat, t, text, lens


def chunk_rows(v, c):
    return v[c * LF:(c + 1) * LF]


# ------------------------------------------------------------------------------- configs


def test_configs_roundtrip_and_geometry():
    for cfg in CONFIGS.values():
        assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
        assert (cfg.latent_frames, cfg.latent_size) == (6, 8)
        assert cfg.kv_heads < cfg.heads  # GQA
    assert get_config("small") is SMALL
    assert SMALL.head_dim == 64 and SMALL.tokens_per_chunk == 96
    with pytest.raises(ValueError, match="unknown keys"):
        ModelConfig.from_dict({**TINY.to_dict(), "bogus": 1})
    with pytest.raises(ValueError, match="unknown model config"):
        get_config("huge")
    with pytest.raises(ValueError, match="GQA"):
        ModelConfig(heads=3, kv_heads=2)


def test_param_counts():
    tiny, small = param_counts(WorldModel(TINY)), param_counts(WorldModel(SMALL))
    assert 100_000 <= tiny["total"] <= 500_000, tiny
    assert small["total"] * 2 <= 16_000_000, small  # the shipped file (bf16 weights) fits 16 MB
    assert small["dit"] > small["vae"] > small["text"]


# ----------------------------------------------------------------------------- autoencoder


def test_vae_shapes_and_range():
    torch.manual_seed(0)
    vae = VideoVAE(TINY).eval()
    frames = torch.from_numpy(D.generate(1, 2).frames)[None].repeat(2, 1, 1, 1, 1)  # uint8 [2, 48, 64, 64, 3]
    with torch.no_grad():
        z = vae.encode(frames)
        assert z.shape == (2, 12, 8, 8, TINY.latent_channels)
        assert torch.allclose(vae.encode(frames.float() / 255), z)
        x = vae.decode(z)
    assert x.shape == (2, 48, 64, 64, 3) and x.dtype == torch.float32
    assert 0 <= x.min() and x.max() <= 1
    with pytest.raises(ValueError, match="multiple of chunk_frames"):
        vae.encode(frames[:, :30])
    with pytest.raises(ValueError, match="latents must be"):
        vae.decode(z[:, :5])


def test_vae_chunks_are_independent():
    torch.manual_seed(0)
    vae = VideoVAE(TINY).eval()
    frames = torch.from_numpy(D.generate(2, 3).frames)[None]
    other = frames.clone()
    other[:, 24:48] = 255 - other[:, 24:48]  # change chunk 1 only
    with torch.no_grad():
        z, z2 = vae.encode(frames), vae.encode(other)
        assert torch.equal(z[:, :6], z2[:, :6]) and torch.equal(z[:, 12:], z2[:, 12:])
        assert not torch.allclose(z[:, 6:12], z2[:, 6:12])
        x, x2 = vae.decode(z), vae.decode(z2)
    assert torch.equal(x[:, :24], x2[:, :24]) and torch.equal(x[:, 48:], x2[:, 48:])


def test_vae_context_decodes_each_chunk_with_the_chunk_before():
    """vae_context = 1: chunk k is decoded from the latents of chunks k-1 and k (chunk 0 alone), so its
    frames depend on its predecessor and on nothing later; streaming (one chunk at a time with the
    previous one as context) gives the whole video's decode exactly."""
    torch.manual_seed(0)
    vae = randomized(VideoVAE(replace(TINY, vae_context=1))).eval()
    z = torch.randn(2, 18, 8, 8, TINY.latent_channels)
    z2 = z.clone()
    z2[:, :6] += 1.0  # change chunk 0 only
    with torch.no_grad():
        x, x2 = vae.decode(z), vae.decode(z2)
        assert x.shape == (2, 72, 64, 64, 3)
        assert not torch.equal(x[:, 24:48], x2[:, 24:48])  # chunk 1 reads chunk 0
        assert torch.equal(x[:, 48:], x2[:, 48:])  # chunk 2 does not
        streamed = torch.cat([vae.decode(z[:, :6])] + [vae.decode(z[:, 6 * k:6 * k + 6], context=z[:, :6 * k])
                                                     for k in (1, 2)], 1)
        assert torch.equal(streamed, x)
        plain = VideoVAE(TINY).eval()
        plain.load_state_dict(vae.state_dict())  # the same weights, each chunk alone: context is ignored
        assert torch.equal(plain.decode(z[:, 6:12], context=z[:, :6]), plain.decode(z[:, 6:12]))
        assert not torch.equal(plain.decode(z)[:, 24:48], x[:, 24:48])
        with pytest.raises(ValueError, match="context has batch 1"):
            vae.decode(z[:, 6:12], context=z[:1, :6])
        with pytest.raises(ValueError, match="latents must be"):
            vae.decode(z[:, 6:12], context=z[:, :5])
    with pytest.raises(ValueError, match="vae_context 5 must be an integer in"):
        replace(TINY, vae_context=5)
    assert ModelConfig.from_dict(replace(TINY, vae_context=1).to_dict()).vae_context == 1


def test_decoder_loss_trains_the_decoder_only():
    torch.manual_seed(0)
    vae = VideoVAE(replace(TINY, vae_context=1))
    frames = torch.from_numpy(D.generate(3, 2).frames)[None]
    loss = decoder_loss(vae, frames, generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss) and loss > 0
    assert all(p.grad is None for p in vae.encoder.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in vae.decoder.parameters())


# ------------------------------------------------------------------------ causal decoder

# the causal-decoder tests decode 16x16 frames (2x2 latents) in float64: the decoder is convolutional, so
# the temporal wiring is the same as at 64x64, and float64 keeps the exactness checks meaningful
CAUSAL = replace(TINY, frame_size=16, vae_causal=True)


def test_frame_group_norm_is_per_frame():
    torch.manual_seed(0)
    norm = FrameGroupNorm(4, 8).double()
    plain = torch.nn.GroupNorm(4, 8).double()
    with torch.no_grad():
        norm.weight.normal_(), norm.bias.normal_()
    plain.load_state_dict(norm.state_dict())
    x = torch.randn(2, 8, 5, 4, 4, dtype=torch.float64)
    x2 = x.clone()
    x2[:, :, 3] = 3 * x2[:, :, 3] + 1  # frame 3 only
    with torch.no_grad():
        y, y2 = norm(x), norm(x2)
        assert y.shape == x.shape
        assert torch.equal(y[:, :, :3], y2[:, :, :3]) and torch.equal(y[:, :, 4:], y2[:, :, 4:])
        assert not torch.allclose(y[:, :, 3], y2[:, :, 3])
        assert not torch.allclose(plain(x)[:, :, :3], plain(x2)[:, :, :3])  # clip statistics: every frame moves
        # one frame: the clip's statistics are the frame's
        assert torch.equal(norm(x[:, :, 1:2]), plain(x[:, :, 1:2]))
        for t in range(5):  # and each frame is normalised on its own
            assert torch.allclose(y[:, :, t:t + 1], plain(x[:, :, t:t + 1]), rtol=0, atol=1e-12)


def _decoders(seed=0):
    """A causal decoder (random weights, float64) and a centred one with the same parameters."""
    torch.manual_seed(seed)
    causal = randomized(Decoder(CAUSAL)).double().eval()
    centred = Decoder(replace(CAUSAL, vae_causal=False)).double().eval()
    centred.load_state_dict(causal.state_dict())
    return causal, centred


def _changed_frames(dec, z, j):
    """Output frames that change when latent frame j is perturbed."""
    z2 = z.clone()
    z2[:, :, j] += 1.0
    with torch.no_grad():
        d = (dec(z) - dec(z2)).abs().amax((0, 1, 3, 4))
    return d.nonzero().flatten().tolist()


def test_causal_decoder_reads_no_later_latent_and_its_receptive_field_is_tight():
    causal, centred = _decoders()
    assert isinstance(causal.stem, CausalConv3d) and isinstance(causal.norm_out, FrameGroupNorm)
    assert not isinstance(centred.stem, CausalConv3d) and not isinstance(centred.norm_out, FrameGroupNorm)
    r, td = receptive_latent_frames(CAUSAL), CAUSAL.time_down
    assert r == receptive_latent_frames(TINY) == 13
    z = torch.randn(1, CAUSAL.latent_channels, 20, 2, 2, dtype=torch.float64)
    for j in (0, 3, 5):
        changed = _changed_frames(causal, z, j)
        assert changed and min(changed) >= j * td  # no earlier frame reads latent j
        assert min(changed) == j * td  # ... and latent j's own first frame does
        if j + r + 1 <= 20:
            assert max(changed) < (j + r + 1) * td  # past the receptive field: untouched
            # the bound is tight: some frame of latent frame j + r still reads latent j
            assert any((j + r) * td <= f < (j + r + 1) * td for f in changed), (j, changed)
    # the same parameters, centred: earlier frames read later latents (the check above can fail)
    changed = _changed_frames(centred, z, 5)
    assert min(changed) < 5 * td


def test_causal_from_moves_the_look_ahead_tap_to_the_present():
    _, centred = _decoders()
    torch.manual_seed(1)
    fresh = Decoder(CAUSAL).double()
    src, before = centred.state_dict(), fresh.state_dict()
    assert {k: v.shape for k, v in src.items()} == {k: v.shape for k, v in before.items()}
    causal_from(centred, fresh)
    got = fresh.state_dict()
    kernels = 0
    for name, w in src.items():
        if w.dim() == 5 and w.shape[2] == 3:  # a temporal 3-tap kernel: (t-1, t, t+1) -> (0, t-1, t + t+1)
            kernels += 1
            assert torch.equal(got[name][:, :, 0], torch.zeros_like(w[:, :, 0])), name
            assert torch.equal(got[name][:, :, 1], w[:, :, 0]), name
            assert torch.equal(got[name][:, :, 2], w[:, :, 1] + w[:, :, 2]), name
        else:  # biases, norms, any 1x1x1 kernel: copied
            assert torch.equal(got[name], w), name
    assert kernels == sum(isinstance(m, CausalConv3d) for m in fresh.modules()) == 13
    assert any(k.endswith("norm_out.weight") for k in src) and any(k.endswith("stem.bias") for k in src)
    # the decoder has no 1x1x1 convolution; a block that changes width has one (its skip): copied as is
    block, causal_block = V.ResBlock3d(8, 16).double(), V.ResBlock3d(8, 16, causal=True).double()
    causal_from(block, causal_block)
    a, b = block.state_dict(), causal_block.state_dict()
    assert a["skip.weight"].shape[2:] == (1, 1, 1) and torch.equal(a["skip.weight"], b["skip.weight"])
    assert torch.equal(a["norm1.weight"], b["norm1.weight"])
    assert torch.equal(b["conv1.weight"][:, :, 1], a["conv1.weight"][:, :, 0])


def test_causal_decoder_streams_exactly_what_it_decodes_whole(monkeypatch):
    """vae_context 3 chunks (18 latent frames) covers the causal decoder's receptive field (13): a stream of
    chunks, each decoded with the 3 chunks before as context, is the whole video decoded at once."""
    torch.manual_seed(0)
    cfg = replace(CAUSAL, vae_context=3)
    assert cfg.vae_context * cfg.latent_frames >= receptive_latent_frames(cfg)
    vae = randomized(VideoVAE(cfg)).double().eval()
    with torch.no_grad():
        vae.latent_mean.normal_(), vae.latent_std.uniform_(0.5, 2.0)
    z = torch.randn(2, 5 * LF, cfg.latent_size, cfg.latent_size, cfg.latent_channels, dtype=torch.float64)
    with torch.no_grad():
        whole = vae.decoder((z * vae.latent_std + vae.latent_mean).permute(0, 4, 1, 2, 3)).permute(0, 2, 3, 4, 1)
        streamed = torch.cat([vae.decode_raw(z[:, :LF])] + [
            vae.decode_raw(z[:, k * LF:(k + 1) * LF], context=z[:, max(0, k - 3) * LF:k * LF]) for k in range(1, 5)], 1)
        assert whole.shape == (2, 5 * cfg.chunk_frames, 16, 16, 3)
        assert torch.equal(streamed, whole)
        assert torch.equal(vae.decode_raw(z), whole)
        # a longer context is cut to vae_context chunks and changes nothing
        assert torch.equal(vae.decode_raw(z[:, 4 * LF:], context=z[:, :4 * LF]), whole[:, 4 * cfg.chunk_frames:])
        # the fast path (decode whole) agrees with the chunk-by-chunk windows it stands for
        monkeypatch.setattr(V, "receptive_latent_frames", lambda cfg: 10 ** 6)
        assert torch.equal(vae.decode_raw(z), whole)
        monkeypatch.undo()
        # one chunk of context (6 latent frames < 13) is not enough: later chunks come out differently
        short = VideoVAE(replace(cfg, vae_context=1)).double().eval()
        short.load_state_dict(vae.state_dict())
        windowed = short.decode_raw(z)
        assert torch.equal(windowed[:, :2 * cfg.chunk_frames], whole[:, :2 * cfg.chunk_frames])  # all the past
        assert not torch.allclose(windowed[:, 2 * cfg.chunk_frames:], whole[:, 2 * cfg.chunk_frames:])


def test_vae_causal_config_and_checkpoint(tmp_path):
    pytest.importorskip("safetensors")
    from maskc.world_model.checkpoint import load_checkpoint, save_checkpoint

    with pytest.raises(ValueError, match="vae_causal 1 must be True or False"):
        replace(TINY, vae_causal=1)
    assert TINY.vae_causal is False and SMALL.vae_causal is False
    cfg = replace(TINY, vae_causal=True, vae_context=2)
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert ModelConfig.from_dict(cfg.to_dict()).vae_causal is True
    assert ModelConfig.from_dict(TINY.to_dict()).vae_causal is False
    torch.manual_seed(0)
    model = randomized(WorldModel(cfg))
    # causal or not, the same parameter names and shapes (a causal decoder loads a centred one's weights)
    centred = WorldModel(TINY).state_dict()
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in centred.items()}
    path = save_checkpoint(tmp_path / "causal.safetensors", model, step=3)
    loaded, got, _ = load_checkpoint(path)
    assert got == cfg and got.vae_causal is True and loaded.cfg.vae_causal is True
    assert isinstance(loaded.vae.decoder.stem, CausalConv3d)
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def test_stream_keeps_latents_and_decoder_context_of_vae_context_chunks(monkeypatch):
    """keep_latents: the stream collects each final chunk's latents; decoding them all at once gives the
    streamed frames, so the stream kept the last vae_context (2) chunks as the decoder's context."""
    from maskc.world_model import generate as G

    torch.manual_seed(0)
    model = randomized(WorldModel(replace(TINY, vae_context=2))).eval()
    kw = {"n_chunks": 3, "steps": 2, "window": 2, "cfg_neg": 0.0, "seed": 0}
    p = "the red circle moves right"
    stream = G.generate_chunks(model, [p], keep_latents=True, **kw)
    chunks = list(stream)
    assert len(chunks) == 3 and len(stream.latents) == 3
    shape = (LF, TINY.latent_size, TINY.latent_size, TINY.latent_channels)
    assert all(z.shape == shape and z.device.type == "cpu" for z in stream.latents)
    with torch.no_grad():
        whole = G.to_uint8(model.vae.decode(torch.cat(stream.latents)[None])[0]).numpy()
        one_back = VideoVAE(replace(model.cfg, vae_context=1)).eval()
        one_back.load_state_dict(model.vae.state_dict())
        other = G.to_uint8(one_back.decode(torch.cat(stream.latents)[None])[0]).numpy()
    assert np.array_equal(np.concatenate(chunks), whole)
    assert not np.array_equal(whole[48:], other[48:])  # the third chunk did need both chunks before
    plain = G.generate_chunks(model, [p], **kw)
    assert np.array_equal(np.concatenate(list(plain)), whole) and plain.latents is None
    # a prefix of 3 chunks: the first new chunk's context is the prefix's last 2; of 1 chunk: that one
    calls = []
    decode = model.vae.decode
    monkeypatch.setattr(model.vae, "decode", lambda z, context=None: calls.append(context) or decode(z, context))
    for n_pre in (3, 1):
        calls.clear()
        prefix = np.ascontiguousarray(np.concatenate(chunks)[:n_pre * TINY.chunk_frames])  # as the stream holds it
        list(G.generate_chunks(model, [p], n_chunks=1, steps=2, window=2, cfg_neg=0.0, seed=0, video=prefix))
        with torch.no_grad():
            want = model.vae.encode(torch.from_numpy(prefix[-min(n_pre, 2) * TINY.chunk_frames:])[None])
        assert len(calls) == 1 and torch.equal(calls[0], want)


def test_causal_decoder_stream_carries_its_state(monkeypatch):
    """A causal decoder streams with `decode_next`: chunk by chunk with the state of two frames per
    temporal convolution it gives the frames of the whole video decoded at once (exactly in float64),
    does one chunk's work per chunk, and its state does not grow. A continuation warms the state
    with the prefix's last chunks that the receptive field reaches."""
    from maskc.world_model import generate as G

    torch.manual_seed(0)
    cfg = replace(CAUSAL, vae_context=3)
    vae = randomized(VideoVAE(cfg)).double().eval()
    z = torch.randn(2, 5 * LF, cfg.latent_size, cfg.latent_size, cfg.latent_channels, dtype=torch.float64)
    past, sizes = {}, []
    with torch.no_grad():
        streamed = []
        for k in range(5):
            streamed.append(vae.decode_next(z[:, k * LF:(k + 1) * LF], past))
            sizes.append(sum(t.numel() for t in past.values()))
        assert torch.equal(torch.cat(streamed, 1), vae.decode(z))
    n_convs = sum(isinstance(m, CausalConv3d) for m in vae.decoder.modules())
    assert len(past) == n_convs and len(set(sizes)) == 1  # two input frames per convolution, every chunk
    assert all(t.shape[2] == 2 for t in past.values())
    with pytest.raises(ValueError, match="needs a causal decoder"):
        VideoVAE(replace(CAUSAL, vae_causal=False)).decode_next(z[:, :LF].float(), {})
    with pytest.raises(ValueError, match="only a causal decoder"):
        VideoVAE(replace(CAUSAL, vae_causal=False)).decoder(z[:, :LF].float().permute(0, 4, 1, 2, 3), {})

    # the generator: one decode_next per chunk (no windows), frames as the whole video decoded at once
    model = randomized(WorldModel(replace(TINY, vae_context=3, vae_causal=True))).eval()
    calls = []
    decode_next = model.vae.decode_next
    monkeypatch.setattr(model.vae, "decode_next", lambda lat, past: calls.append(lat.shape[1]) or decode_next(lat, past))
    p = "the red circle moves right"
    stream = G.generate_chunks(model, [p], n_chunks=3, steps=2, window=2, cfg_neg=0.0, seed=0, keep_latents=True)
    chunks = np.concatenate(list(stream))
    assert calls == [LF] * 3
    with torch.no_grad():
        whole = G.to_uint8(model.vae.decode(torch.cat(stream.latents)[None])[0]).numpy()
    diff = np.abs(chunks.astype(int) - whole.astype(int))
    assert diff.max() <= 1 and (diff == 0).mean() > 0.999  # float32 rounding only
    # a 4-chunk prefix: the receptive field (13 latent frames) reaches 3 chunks back
    calls.clear()
    prefix = np.ascontiguousarray(np.concatenate([chunks, chunks[:24]]))
    list(G.generate_chunks(model, [p], n_chunks=1, steps=2, window=2, cfg_neg=0.0, seed=0, video=prefix))
    assert calls == [3 * LF, LF]


def _delayed(delay, seed=0):
    torch.manual_seed(seed)
    vae = randomized(VideoVAE(replace(CAUSAL, vae_context=3, vae_delay=delay))).double().eval()
    with torch.no_grad():
        vae.latent_mean.normal_(), vae.latent_std.uniform_(0.5, 2.0)
    return vae


@pytest.mark.parametrize("delay", [1, 2, LF])
def test_delayed_decoder_reads_ahead_and_streams_what_it_decodes_whole(delay):
    """vae_delay L: frame i depends on latent frames <= i // 4 + L and on no later one; a stream returns
    nothing for the first chunk, then the chunk before, and `decode_end` the last: together exactly the
    whole video decoded at once (float64), whose end holds its last latent frame; the state stays bounded."""
    vae = _delayed(delay)
    cfg, cf, td = vae.cfg, CAUSAL.chunk_frames, CAUSAL.time_down
    z = torch.randn(2, 4 * LF, cfg.latent_size, cfg.latent_size, cfg.latent_channels, dtype=torch.float64)
    with torch.no_grad():
        whole = vae.decode(z)
        assert whole.shape == (2, 4 * cf, 16, 16, 3)
        m = 2 * LF + 1  # a latent frame inside the third chunk
        moved = z.clone()
        moved[:, m] += 1.0
        changed = (vae.decode(moved) - whole).abs().amax((0, 2, 3, 4)) > 0
        first = (m - delay) * td  # the first frame that reads latent frame m
        assert not changed[:first].any() and changed[first]
        # the end: the last latent frame held for the look-ahead the video lacks
        held = torch.cat([z, z[:, -1:].expand(-1, delay, -1, -1, -1)], 1)
        raw = vae.decoder((held * vae.latent_std + vae.latent_mean).permute(0, 4, 1, 2, 3))
        assert torch.equal(V.to_unit(raw[:, :, delay * td:].permute(0, 2, 3, 4, 1)), whole)
        past, got, sizes = {}, [], []
        for k in range(4):
            got.append(vae.decode_next(z[:, k * LF:(k + 1) * LF], past))
            sizes.append(sum(t.numel() for t in past.values() if torch.is_tensor(t)))
        got.append(vae.decode_end(past))
        assert [g.shape[1] for g in got] == [0, cf, cf, cf, cf]
        assert torch.equal(torch.cat(got, 1), whole)
        assert len(set(sizes[1:])) == 1  # two frames per convolution, the chunk not complete, the last latent frame
        assert vae.decode_end(past).shape == (2, 0, 16, 16, 3)  # nothing left
        # a continuation: the prefix's latents prime the state, the next chunks come out as in the whole video
        past = {}
        vae.prime(z[:, :2 * LF], past)
        cont = [vae.decode_next(z[:, 2 * LF:3 * LF], past), vae.decode_next(z[:, 3 * LF:], past), vae.decode_end(past)]
        assert [c.shape[1] for c in cont] == [0, cf, cf]
        assert torch.equal(torch.cat(cont, 1), whole[:, 2 * cf:])
        # decode_raw with context: the chunks after it, the video ending where the latents end
        assert torch.equal(vae.decode_raw(z[:, 3 * LF:], context=z[:, :3 * LF]), vae.decode_raw(z)[:, 3 * cf:])


def test_decode_end_without_delay_and_delayed_windows(monkeypatch):
    """A decoder without delay holds nothing at the end; the windowed path of decode_raw (context too
    short for the receptive field) reads the same look-ahead as decoding whole."""
    plain = randomized(VideoVAE(replace(CAUSAL, vae_context=3))).double().eval()
    z = torch.randn(1, 2 * LF, CAUSAL.latent_size, CAUSAL.latent_size, CAUSAL.latent_channels, dtype=torch.float64)
    past = {}
    with torch.no_grad():
        assert plain.decode_next(z[:, :LF], past).shape[1] == CAUSAL.chunk_frames
        assert plain.decode_end(past).shape == (1, 0, 16, 16, 3) and plain.decode_end({}).shape[0] == 0
        vae = _delayed(1)
        whole = vae.decode_raw(z)
        monkeypatch.setattr(V, "receptive_latent_frames", lambda cfg: 10 ** 6)  # windows of vae_context chunks
        assert torch.equal(vae.decode_raw(z), whole)
    with pytest.raises(ValueError, match="decode_end needs a causal decoder"):
        VideoVAE(TINY).decode_end({})


@pytest.mark.parametrize("delay", [1, 2])
def test_delay_from_starts_the_decoder_drawing_what_it_drew(delay):
    """`delay_from` moves the stem's taps into the past: with the taps it must fold set to zero, the
    delayed decoder's output is the undelayed one's given `delay` zero latent frames first, exactly."""
    torch.manual_seed(0)
    dec = randomized(Decoder(CAUSAL)).double().eval()
    with torch.no_grad():
        dec.stem.weight[:, :, :delay] = 0.0  # taps reaching before the kernel once moved
    shifted = Decoder(CAUSAL).double().eval()
    shifted.load_state_dict(dec.state_dict())
    V.delay_from(shifted, delay)
    assert torch.equal(shifted.stem.weight[:, :, 3 - delay:], torch.zeros_like(shifted.stem.weight[:, :, 3 - delay:]))
    z = torch.randn(2, CAUSAL.latent_channels, 2 * LF, CAUSAL.latent_size, CAUSAL.latent_size, dtype=torch.float64)
    with torch.no_grad():
        want = dec(torch.cat([torch.zeros_like(z[:, :, :delay]), z], 2))[:, :, :2 * CAUSAL.chunk_frames]
        assert torch.allclose(shifted(z), want, rtol=0, atol=1e-12)
    # folding: the taps' sum (what a constant input sees) is kept
    d2 = randomized(Decoder(CAUSAL)).double()
    before = d2.stem.weight.sum(2).clone()
    V.delay_from(d2, delay)
    assert torch.allclose(d2.stem.weight.sum(2), before)
    for bad, msg in ((-1, "delay must be an integer >= 0"), (True, "delay must be an integer"),
                     (1.0, "delay must be an integer")):
        with pytest.raises(ValueError, match=msg):
            V.delay_from(Decoder(CAUSAL), bad)
    with pytest.raises(ValueError, match="needs a causal decoder"):
        V.delay_from(Decoder(TINY), 1)


def test_generator_with_a_delayed_decoder_yields_each_chunk_when_the_next_is_final():
    """A decoder of vae_delay 1 in the generator: every chunk comes out, one tick (the stride) later than
    without the delay, the last when the video ends; the frames are the kept latents decoded whole; a
    continuation primes the decoder with the prefix and yields only the new chunks."""
    from maskc.world_model import generate as G

    torch.manual_seed(0)
    model = randomized(WorldModel(replace(TINY, vae_context=3, vae_causal=True, vae_delay=1))).eval()
    kw = {"n_chunks": 3, "steps": 2, "window": 2, "cfg_neg": 0.0, "seed": 0}
    p = "the red circle moves right"

    def run(m, **extra):
        stream = G.generate_chunks(m, [p], keep_latents=True, **kw, **extra)
        chunks, ticks = [], []
        for c in stream:
            chunks.append(c)
            ticks.append(stream.ticks)
        return stream, chunks, ticks

    stream, chunks, ticks = run(model)
    undelayed = WorldModel(replace(model.cfg, vae_delay=0)).eval()
    undelayed.load_state_dict(model.state_dict())
    _, plain_chunks, plain_ticks = run(undelayed)
    assert len(chunks) == 3 and all(c.shape == (24, 64, 64, 3) for c in chunks)
    assert ticks == plain_ticks[1:] + [plain_ticks[-1]]  # each chunk once the next is final; the last at the end
    with torch.no_grad():
        whole = G.to_uint8(model.vae.decode(torch.cat(stream.latents)[None])[0]).numpy()
    diff = np.abs(np.concatenate(chunks).astype(int) - whole.astype(int))
    assert diff.max() <= 1 and (diff == 0).mean() > 0.999  # float32 rounding only
    assert not np.array_equal(np.concatenate(chunks), np.concatenate(plain_chunks))  # it does read ahead
    # video_of decodes kept latents as the stream did: the very same frames, not only up to rounding
    assert np.array_equal(model.vae.video_of(torch.cat(stream.latents)).numpy(), np.concatenate(chunks))
    # continuation of a 3-chunk prefix: 2 new chunks, as the prefix's latents + theirs decoded whole
    prefix = np.ascontiguousarray(np.concatenate(chunks))
    cont = G.generate_chunks(model, [p], n_chunks=2, steps=2, window=2, cfg_neg=0.0, seed=1, video=prefix,
                             keep_latents=True)
    new = list(cont)
    assert len(new) == 2
    with torch.no_grad():
        pre = model.vae.encode(torch.from_numpy(prefix)[None])
        both = G.to_uint8(model.vae.decode(torch.cat([pre[0]] + cont.latents)[None])[0]).numpy()[3 * 24:]
    diff = np.abs(np.concatenate(new).astype(int) - both.astype(int))
    assert diff.max() <= 1 and (diff == 0).mean() > 0.999


def test_vae_delay_config():
    assert TINY.vae_delay == 0 and SMALL.vae_delay == 0
    cfg = replace(TINY, vae_causal=True, vae_context=3, vae_delay=2)
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    old = TINY.to_dict()
    del old["vae_delay"]  # a checkpoint from before the field: no delay
    assert ModelConfig.from_dict(old).vae_delay == 0
    for bad, msg in (({"vae_delay": -1}, r"vae_delay -1 must be an integer in \[0, 6\]"),
                     ({"vae_delay": 7}, r"vae_delay 7 must be an integer in \[0, 6\]"),
                     ({"vae_delay": True}, "vae_delay True must be an integer"),
                     ({"vae_delay": 1.0}, "vae_delay 1.0 must be an integer"),
                     ({"vae_delay": 1, "vae_causal": False}, "needs a causal decoder that reads the chunks before"),
                     ({"vae_delay": 1, "vae_context": 0}, "needs a causal decoder that reads the chunks before")):
        with pytest.raises(ValueError, match=msg):
            replace(cfg, **bad)


def test_decoder_loss_frame_difference_term():
    """diff_weight adds the MSE of consecutive frames' differences (decoded against true) to the plain
    loss, drawn from the same posterior sample."""
    torch.manual_seed(0)
    vae = VideoVAE(replace(TINY, vae_context=1))
    frames = torch.from_numpy(D.generate(3, 2).frames)[None]
    plain = decoder_loss(vae, frames, generator=torch.Generator().manual_seed(0))
    both = decoder_loss(vae, frames, generator=torch.Generator().manual_seed(0), diff_weight=2.0)
    with torch.no_grad():
        z = vae.encode(frames, sample=True, generator=torch.Generator().manual_seed(0))
        recon, target = vae.decode_raw(z), frames.double() / 127.5 - 1
        d = ((recon[:, 1:] - recon[:, :-1]).double() - (target[:, 1:] - target[:, :-1])).square().mean()
    assert torch.allclose(both.double(), plain.double() + 2.0 * d, rtol=1e-5) and both > plain


def test_vae_loss_and_latent_stats():
    torch.manual_seed(0)
    vae = VideoVAE(TINY)
    frames = torch.from_numpy(D.generate(3, 1).frames)[None]
    out = vae_loss(vae, frames, generator=torch.Generator().manual_seed(0))
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and out["kl"] >= 0
    vae.set_latent_stats(frames)
    with torch.no_grad():
        z = vae.encode(frames).reshape(-1, TINY.latent_channels)
    assert torch.allclose(z.mean(0), torch.zeros(TINY.latent_channels), atol=1e-4)
    assert torch.allclose(z.std(0), torch.ones(TINY.latent_channels), atol=1e-3)


# ---------------------------------------------------------------------------- text encoder


def test_text_encoder_and_packing():
    enc = TextEncoder(TINY)
    tokens = tokenize(CAPTIONS[:3])
    feats, valid = enc(tokens)
    assert feats.shape == (3, TINY.max_caption_tokens, TINY.text_dim)
    assert valid.sum(1).tolist() == [7, 6, 7]  # BOS + words + EOS
    packed, lens = pack_text(feats, valid)
    assert packed.shape == (20, TINY.text_dim) and lens == [7, 6, 7]
    assert torch.equal(packed[7:13], feats[1, :6])
    assert torch.isfinite(enc(torch.zeros(1, 4, dtype=torch.long))[0]).all()  # an all-PAD caption: no NaN
    with pytest.raises(ValueError, match="unknown word 'purple'.*closest"):
        tokenize(["the purple circle moves left"])
    with pytest.raises(ValueError, match="token ids"):
        enc(torch.full((1, 3), 999))


def test_caption_runs_counts_each_chunks_run_to_the_end():
    assert caption_runs(["a", "a", "b", "a"], 4) == [2, 1, 1, 1]
    assert caption_runs(list("aaaaaa"), 4) == [4, 4, 4, 3, 2, 1]
    assert caption_runs(list("abba"), 1) == [1, 1, 1, 1]
    assert caption_runs([], 3) == []
    for bad in (0, -1, True, 2.0):
        with pytest.raises(ValueError, match="cap must be an integer >= 1"):
            caption_runs(["a"], bad)


def test_caption_runs_config():
    cfg = replace(TINY, caption_runs=3)
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    old = TINY.to_dict()
    del old["caption_runs"]  # a checkpoint written before caption runs existed
    assert ModelConfig.from_dict(old).caption_runs == 0
    for bad in (-1, 65, True, 1.5):
        with pytest.raises(ValueError, match="caption_runs"):
            replace(TINY, caption_runs=bad)


def test_text_encoder_runs_start_at_zero_and_reach_only_their_caption():
    cfg = replace(TINY, caption_runs=3)
    torch.manual_seed(0)
    enc = TextEncoder(cfg)
    tokens = tokenize(CAPTIONS[:3])
    runs = torch.tensor([3, 1, 0])
    base = enc(tokens)[0]
    # at initialisation every run vector is zero: the encoder computes what one without runs computes
    assert torch.equal(enc(tokens, runs)[0], base)
    plain = TextEncoder(TINY)
    plain.load_state_dict({k: v for k, v in enc.state_dict().items() if k != "run.weight"})
    assert torch.equal(plain(tokens)[0], base)
    with torch.no_grad():
        enc.run.weight[1:].normal_()
    told = enc(tokens, runs)[0]
    assert (told[0] - base[0]).abs().max() > 1e-3 and (told[1] - base[1]).abs().max() > 1e-3
    assert torch.equal(told[2], base[2])  # run 0: not told
    assert not torch.allclose(told[0], enc(tokens, torch.tensor([2, 1, 0]))[0][0])
    # run 0 stays the zero vector through training (padding_idx: no gradient)
    enc(tokens, torch.tensor([0, 2, 3]))[0].sum().backward()
    assert enc.run.weight.grad[0].abs().max() == 0 and enc.run.weight.grad[2:].abs().max() > 0
    with pytest.raises(ValueError, match=r"runs must lie in \[0, 3\]"):
        enc(tokens, torch.tensor([4, 1, 1]))
    with pytest.raises(ValueError, match=r"runs must be an integer tensor \[3\]"):
        enc(tokens, torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="runs must be an integer tensor"):
        enc(tokens, torch.tensor([1.0, 1.0, 1.0]))
    # a model without runs takes none (or zeros: not told)
    assert torch.equal(plain(tokens, torch.zeros(3, dtype=torch.long))[0], base)
    with pytest.raises(ValueError, match=r"runs must lie in \[0, 0\]"):
        plain(tokens, torch.tensor([1, 0, 0]))


def test_encode_captions_passes_runs():
    torch.manual_seed(0)
    model = WorldModel(replace(TINY, caption_runs=2))
    with torch.no_grad():
        model.text.run.weight[1:].normal_()
    caps = CAPTIONS[:2]
    a, lens = model.encode_captions(caps)
    b, _ = model.encode_captions(caps, [2, 0])
    assert lens == [7, 6]
    assert (a[:7] - b[:7]).abs().max() > 1e-3 and torch.equal(a[7:], b[7:])


# ------------------------------------------------------------------------------------ masks


def dense_self(video_chunks, t, window=None):
    vid = np.repeat(np.arange(len(video_chunks)), np.array(video_chunks) * t)
    chunk = np.concatenate([np.arange(n).repeat(t) for n in video_chunks])
    i, j = np.meshgrid(np.arange(len(vid)), np.arange(len(vid)), indexing="ij")
    ok = (vid[i] == vid[j]) & (chunk[j] <= chunk[i])
    return ok & (chunk[i] - chunk[j] < window) if window else ok


def test_self_attention_mask_is_packed_block_causal():
    for vc, t, w in [((2, 3), 4, None), ((3, 1, 4), 3, 2), ((5,), 2, 1), ((1,), 5, None)]:
        assert np.array_equal(M.self_attention_mask(vc, t, w).to_dense(), dense_self(vc, t, w))


def test_cross_attention_mask_is_per_chunk():
    vc, t, lens = (2, 3), 4, [3, 0, 5, 2, 4]
    start = np.concatenate([[0], np.cumsum(lens)])
    d = np.zeros((sum(vc) * t, sum(lens)), dtype=bool)
    for i in range(d.shape[0]):
        for j in range(d.shape[1]):
            c = i // t
            d[i, j] = start[c] <= j < start[c + 1]
    assert np.array_equal(M.cross_attention_mask(vc, t, lens).to_dense(), d)
    with pytest.raises(maskc.MaskError, match="one caption per chunk"):
        M.cross_attention_mask(vc, t, lens[:4])


def test_chunk_window_mask():
    for nc, nn_, t, w in [(0, 2, 3, None), (3, 2, 2, None), (3, 1, 4, 2), (2, 3, 2, 2), (5, 4, 1, 3)]:
        m = M.chunk_window_mask(nc, nn_, t, w)
        d = np.zeros((nn_ * t, (nc + nn_) * t), dtype=bool)
        for i in range(d.shape[0]):
            for j in range(d.shape[1]):
                qc, kc = nc + i // t, j // t
                d[i, j] = kc <= qc and (w is None or qc - kc < w)
        assert np.array_equal(m.to_dense(), d)
        assert np.array_equal(d, M.self_attention_mask([nc + nn_], t, w).to_dense()[nc * t:])


def dense_branches(nc, a, t, w, sees_cache):
    """`branch_window_mask` from its definition, entry by entry: query chunk i of branch b sees key chunk j
    iff j is a cached chunk (and b sees the cache) or one of b's own new chunks, at most ``w - 1`` chunks
    before it in the branch's own timeline (cache then its new chunks), and not after it."""
    d = np.zeros((len(sees_cache) * a * t, (nc + len(sees_cache) * a) * t), dtype=bool)
    for r in range(d.shape[0]):
        b, qc = divmod(r // t, a)
        qc += nc  # the query chunk in branch b's timeline
        for j in range(d.shape[1]):
            kc = j // t
            if kc >= nc:  # a new chunk: whose, and where in that branch's timeline
                kb, kc = divmod(kc - nc, a)
                if kb != b:
                    continue
                kc += nc
            elif not sees_cache[b]:
                continue
            d[r, j] = kc <= qc and (w is None or qc - kc < w)
    return d


@given(nc=st.integers(0, 4), a=st.integers(1, 4), t=st.integers(1, 3), w=st.one_of(st.none(), st.integers(1, 6)),
       sees=st.lists(st.booleans(), min_size=1, max_size=4))
def test_branch_window_mask_equals_its_definition(nc, a, t, w, sees):
    m = M.branch_window_mask(nc, a, t, w, tuple(sees))
    assert np.array_equal(m.to_dense(), dense_branches(nc, a, t, w, sees))
    # each branch's rows over its keys are the one-branch masks the stream used before
    d, one = m.to_dense(), (M.chunk_window_mask(nc, a, t, w) if nc else M.self_attention_mask([a], t, w)).to_dense()
    alone = M.self_attention_mask([a], t, w).to_dense()
    for b, s in enumerate(sees):
        rows = d[b * a * t:(b + 1) * a * t]
        own = rows[:, (nc + b * a) * t:(nc + (b + 1) * a) * t]
        assert np.array_equal(own, alone if not s or not nc else one[:, nc * t:])
        assert np.array_equal(rows[:, :nc * t], one[:, :nc * t] if s else np.zeros_like(rows[:, :nc * t]))


def test_branch_window_mask_bad_input():
    for args, what in [((1, 2, 3, None, ()), "sees_cache"), ((1, 2, 3, None, (1, 0)), "sees_cache"),
                       ((1, 2, 3, None, True), "sees_cache"), ((1, 2, 3, None, "ab"), "sees_cache"),
                       ((-1, 2, 3), "n_cached_chunks"), ((1, 0, 3), "n_new_chunks"), ((1, 2, 0), "chunk_tokens"),
                       ((1, 2, 3, 0), "window"), ((1.5, 2, 3), "n_cached_chunks")]:
        with pytest.raises(maskc.MaskError, match=what):
            M.branch_window_mask(*args)
    # a list and numpy bools are taken as the tuple of bools they hold (the same cached mask)
    assert M.branch_window_mask(1, 2, 3, None, [True, np.bool_(False)]) is M.branch_window_mask(1, 2, 3, None, (True, False))


# --------------------------------------------------------------------- diffusion transformer


def test_patchify_roundtrip_and_positions():
    z = torch.randn(12, 8, 8, TINY.latent_channels)
    x = patchify(z, TINY)
    assert x.shape == (2 * T, TINY.patch_dim)
    assert torch.equal(unpatchify(x, 12, TINY), z)
    assert torch.equal(x[T + 5].view(2, 2, -1)[1, 0], z[6, 3, 2])  # chunk 1, frame 0, patch (1, 1), sub-pixel (1, 0)
    pos = positions((2, 1), (0, 7), TINY)
    assert pos.shape == (3 * T, 3)
    assert pos[:2 * T, 0].tolist() == np.arange(12).repeat(16).tolist()
    assert pos[2 * T:, 0].tolist() == (42 + np.arange(6)).repeat(16).tolist()  # absolute: chunk 7
    assert pos[:16, 1:].tolist() == [[y, x] for y in range(4) for x in range(4)]


def test_dit_packed_shapes_and_packing_is_exact(tiny):
    lat, t, text, lens = inputs(tiny, 5)
    with torch.no_grad():
        v = tiny.dit(lat, t, text, lens, video_chunks=(2, 3))
        assert v.shape == lat.shape
        # a packed sample equals the sample run alone
        a = tiny.dit(lat[:12], t[:2], text[:sum(lens[:2])], lens[:2])
        b = tiny.dit(lat[12:], t[2:], text[sum(lens[:2]):], lens[2:])
    assert torch.allclose(v, torch.cat([a, b]), atol=1e-5)
    with pytest.raises(ValueError, match="sum to the 5 chunks"):
        tiny.dit(lat, t, text, lens, video_chunks=(2, 2))
    with pytest.raises(ValueError, match="latents must be"):
        tiny.dit(lat[:10], t, text, lens)


def test_caption_changes_only_its_chunk(tiny):
    """Changing chunk 3's caption (sample 2 = chunks 2..4) changes only chunk 3's cross-attention
    output, and, through the block-causal mask, only chunks 3 and 4 of the final output."""
    lat, t, text, lens = inputs(tiny, 5)
    caps = [CAPTIONS[i] for i in range(5)]
    caps2 = list(caps)
    caps2[3] = "the white circle moves right"
    seen = []
    hook = tiny.dit.blocks[0].cross_attn.register_forward_hook(lambda m, i, o: seen.append(o))
    with torch.no_grad():
        v = tiny.dit(lat, t, *tiny.encode_captions(caps), video_chunks=(2, 3))
        v2 = tiny.dit(lat, t, *tiny.encode_captions(caps2), video_chunks=(2, 3))
    hook.remove()
    ca, ca2 = (s.view(5, T, -1) for s in seen)
    changed = (ca - ca2).abs().amax((1, 2))
    assert changed[3] > 1e-3 and changed[[0, 1, 2, 4]].max() < 1e-6
    changed = (v - v2).abs().view(5, -1).amax(1)
    assert changed[3] > 1e-3 and changed[4] > 1e-3 and changed[:3].max() < 1e-6


def test_timestep_is_per_chunk_and_causal(tiny):
    lat, t, text, lens = inputs(tiny, 5)
    t2 = t.clone()
    t2[3] = 1 - t[3]
    with torch.no_grad():
        d = (tiny.dit(lat, t, text, lens, (2, 3)) - tiny.dit(lat, t2, text, lens, (2, 3))).abs().view(5, -1).amax(1)
    assert d[3] > 1e-3 and d[:3].max() < 1e-6  # chunk 3 changes, earlier chunks and sample 0 do not


def test_rope_is_relative_in_time(tiny):
    """RoPE scores depend on position differences: shifting a whole clip in absolute time keeps its
    outputs (up to rounding), while the t positions themselves are absolute (next test)."""
    lat, t, text, lens = inputs(tiny, 3)
    with torch.no_grad():
        v0 = tiny.dit(lat, t, text, lens, chunk_offsets=(0,))
        v5 = tiny.dit(lat, t, text, lens, chunk_offsets=(5,))
    assert torch.allclose(v0, v5, atol=1e-4)


@pytest.mark.parametrize("window", [None, 2])
def test_streaming_with_kv_cache_equals_full_sequence(tiny, window):
    """Chunks 2..3 run alone over the cached (k, v) of earlier chunks, at their absolute chunk
    offset, equal the full 4-chunk run under the matching mask; a wrong offset does not."""
    lat, t, text, lens = inputs(tiny, 4)
    with torch.no_grad():
        v, kv = tiny.dit(lat, t, text, lens, window=window, return_kv=True)
        first = 0 if window is None else 2 - window + 1  # oldest chunk chunk 2 may see
        past = [(k[first * T:2 * T], vv[first * T:2 * T]) for k, vv in kv]
        new_text, new_lens = text[sum(lens[:2]):], lens[2:]
        args = (lat[12:], t[2:], new_text, new_lens)
        v_new = tiny.dit(*args, chunk_offsets=(2,), window=window, past_kv=past)
        v_bad = tiny.dit(*args, chunk_offsets=(0,), window=window, past_kv=past)
    assert torch.allclose(v_new, v[12:], atol=1e-5)
    assert not torch.allclose(v_bad, v[12:], atol=1e-3)
    with pytest.raises(ValueError, match="chunk_offsets"):
        tiny.dit(*args, past_kv=past)


@pytest.mark.parametrize("window", [None, 2, 3])
def test_forward_branches_equals_one_call_per_branch(tiny, window):
    """Branches packed into one call (a cached branch, a null-text one, one without the cache) give each
    branch's velocity of its own call; without a cache every branch is the plain call; bad input is refused."""
    lat, t, text, lens = inputs(tiny, 5)
    nt, nl = tiny.encode_captions([""] * 3)
    with torch.no_grad():
        _, kv = tiny.dit(lat[:12], t[:2], text[:sum(lens[:2])], lens[:2], window=window, return_kv=True)
        new_text, new_lens = text[sum(lens[:2]):], lens[2:]
        branches = [(new_text, new_lens, True), (nt, nl, True), (new_text, new_lens, False), (nt, nl, False)]
        for past in (kv, None):
            got = tiny.dit.forward_branches(lat[12:], t[2:], branches, 2, window, past)
            assert len(got) == 4
            for (tx, ln, sees), v in zip(branches, got):
                ref = tiny.dit(lat[12:], t[2:], tx, ln, chunk_offsets=(2,), window=window,
                               past_kv=past if sees else None)
                assert v.shape == ref.shape and torch.allclose(v, ref, atol=1e-5)
        # the branches differ where they should: the cache and the captions both matter
        got = tiny.dit.forward_branches(lat[12:], t[2:], branches, 2, window, kv)
        assert not torch.allclose(got[0], got[1], atol=1e-3) and not torch.allclose(got[0], got[2], atol=1e-3)
        # per-frame times (image-to-video's clean first frame) go with every branch
        tf = t[2:].repeat_interleave(LF)
        tf[:2] = 1.0
        got = tiny.dit.forward_branches(lat[12:], tf, branches[:2], 2, window, kv)
        assert torch.allclose(got[1], tiny.dit(lat[12:], tf, nt, nl, chunk_offsets=(2,), window=window, past_kv=kv),
                              atol=1e-5)
    with pytest.raises(ValueError, match="non-empty sequence"):
        tiny.dit.forward_branches(lat[12:], t[2:], [], 2, window, kv)
    with pytest.raises(ValueError, match="non-empty sequence"):
        tiny.dit.forward_branches(lat[12:], t[2:], [(new_text, new_lens, 1)], 2, window, kv)
    with pytest.raises(ValueError, match="caption_lengths sum"):
        tiny.dit.forward_branches(lat[12:], t[2:], [(new_text[:-1], new_lens, True)], 2, window, kv)
    with pytest.raises(ValueError, match="latents must be"):
        tiny.dit.forward_branches(lat[13:], t[2:], branches, 2, window, kv)


@given(sq=st.integers(1, 40), sk=st.integers(1, 40), hkv=st.sampled_from([1, 2]), group=st.sampled_from([1, 3]),
       seed=st.integers(0, 2 ** 16), dtype=st.sampled_from([torch.float32, torch.float64]))
def test_attend_on_the_cpu_equals_the_float64_reference(sq, sk, hkv, group, seed, dtype):
    """The CPU path (`dense_attention`): random masks of every kind, GQA, rows without keys (0 out, 0
    gradient, no NaN); out and the gradients of q, k, v equal the float64 reference to float32 rounding."""
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    slices = []
    for _ in range(int(rng.integers(0, 4))):
        q0, k0 = int(rng.integers(0, sq)), int(rng.integers(0, sk))
        q1, k1 = int(rng.integers(q0 + 1, sq + 1)), int(rng.integers(k0 + 1, sk + 1))
        slices.append(((q0, q1), (k0, k1), [maskc.FULL, maskc.CAUSAL, maskc.INV_CAUSAL, maskc.BI_CAUSAL][int(rng.integers(4))]))
    mask = maskc.Mask(slices, sq=sq, sk=sk)
    q = torch.randn(sq, hkv * group, 16, generator=g, dtype=dtype, requires_grad=True)
    k = torch.randn(sk, hkv, 16, generator=g, dtype=dtype, requires_grad=True)
    v = torch.randn(sk, hkv, 16, generator=g, dtype=dtype, requires_grad=True)
    out = attend(q, k, v, mask)
    ref = reference_attention(q, k, v, mask)
    assert out.dtype == dtype and out.shape == (sq, hkv * group, 16)
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    assert torch.allclose(out.double(), ref, atol=tol)
    keyless = ~torch.as_tensor(mask.to_dense()).any(-1)
    assert not out[keyless].any()
    dout = torch.randn(out.shape, generator=g, dtype=dtype)
    got = torch.autograd.grad(out, (q, k, v), dout)
    want = torch.autograd.grad(ref, (q, k, v), dout.double())
    for a, b in zip(got, want):
        assert torch.isfinite(a).all() and torch.allclose(a.double(), b.double(), atol=10 * tol)
    assert not got[0][keyless].any()


def test_dense_attention_keeps_a_bounded_cache_of_recent_masks(monkeypatch):
    """The CPU path caches the dense score bias of the masks it was last asked for (every layer of a call
    reads the same ones) and drops the least recently used: its memory does not grow with the masks a
    long video meets."""
    monkeypatch.setattr(DIT, "_DENSE", DIT.OrderedDict())
    q = torch.randn(6, 2, 16)
    masks = [maskc.causal(6, 6 + i) for i in range(DIT._MAX_DENSE + 3)]
    for m in masks:
        attend(q, torch.randn(m.sk, 1, 16), torch.randn(m.sk, 1, 16), m)
        attend(q, torch.randn(6, 1, 16), torch.randn(6, 1, 16), masks[0])  # used all along: kept
    assert len(DIT._DENSE) == DIT._MAX_DENSE
    kept = [k[0] for k in DIT._DENSE]
    assert masks[0] in kept and masks[-1] in kept and masks[1] not in kept
    monkeypatch.setattr(DIT, "_MAX_DENSE_ENTRIES", 6 * 6)  # a mask larger than that is not kept
    big, k, v = maskc.causal(6, 7), torch.randn(7, 1, 16), torch.randn(7, 1, 16)
    out = attend(q, k, v, big)
    assert torch.allclose(out.double(), reference_attention(q, k, v, big), atol=1e-5)
    assert big not in [key[0] for key in DIT._DENSE] and len(DIT._DENSE) == DIT._MAX_DENSE


def kernel_sized_model(n_chunks: int, seed: int):
    """A one-block TINY with head dim 64 (the kernels' size), every path carrying signal, and random
    latents [n_chunks * LF, 8, 8, C] and flow times per chunk."""
    cfg = replace(TINY, dim=128, heads=2, kv_heads=1, depth=1, rope_split=(32, 16, 16))
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(seed)
    lat = torch.randn(n_chunks * LF, 8, 8, cfg.latent_channels, generator=g)
    return randomized(WorldModel(cfg)).eval(), lat, torch.rand(n_chunks, generator=g)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs the Triton interpreter")
def test_dit_through_the_ffa_kernels_matches_the_reference(monkeypatch):
    """Head dim 64 (the kernels' size): the model's masks and layouts run through
    `maskc.runtime.attention` (Triton interpreter, fp32) and give the reference path's output."""
    model, lat, t = kernel_sized_model(3, seed=0)
    with torch.no_grad():
        text, lens = model.encode_captions(CAPTIONS[:3])
        ref = model.dit(lat, t, text, lens, video_chunks=(2, 1))
        calls = []
        monkeypatch.setattr(DIT, "attend", lambda q, k, v, mask: calls.append(mask) or attention(q, k, v, mask))
        out = model.dit(lat, t, text, lens, video_chunks=(2, 1))
    assert len(calls) == 2  # self- and cross-attention of the one block
    assert torch.allclose(out, ref, atol=1e-4)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs the Triton interpreter")
def test_forward_branches_through_the_ffa_kernels_matches_the_reference(monkeypatch):
    """The packed branches' masks (cache + own tokens, own tokens only; per-chunk captions) run through
    `maskc.runtime.attention` as the GPU runs them and give the reference path's velocities."""
    model, lat, t = kernel_sized_model(4, seed=1)
    with torch.no_grad():
        text, lens = model.encode_captions(CAPTIONS[:4])
        _, kv = model.dit(lat[:2 * LF], t[:2], text[:sum(lens[:2])], lens[:2], window=3, return_kv=True)
        nt, nl = model.encode_captions([""] * 2)
        br = [(text[sum(lens[:2]):], lens[2:], True), (nt, nl, True), (text[sum(lens[:2]):], lens[2:], False)]
        ref = model.dit.forward_branches(lat[2 * LF:], t[2:], br, 2, 3, kv)
        calls = []
        monkeypatch.setattr(DIT, "attend", lambda q, k, v, mask: calls.append(mask) or attention(q, k, v, mask))
        out = model.dit.forward_branches(lat[2 * LF:], t[2:], br, 2, 3, kv)
    assert len(calls) == 2 and calls[0].sq == 3 * 2 * T and calls[0].sk == (2 + 3 * 2) * T
    for a, b in zip(out, ref):
        assert torch.allclose(a, b, atol=1e-4)


# ---------------------------------------------------------------------------- flow matching


def test_flow_matching_loss_covers_noisy_chunks_only(tiny):
    lat, _, text, lens = inputs(tiny, 3)
    noise = torch.randn_like(lat)
    t = torch.tensor([1.0, 0.4, 0.7])
    with torch.no_grad():
        loss = flow_matching_loss(tiny.dit, lat, t, noise, text, lens)
        tf = t.repeat_interleave(LF)
        v = tiny.dit(noisy_latents(lat, noise, tf), t, text, lens)
        want = (v - (lat - noise))[LF:].pow(2).mean()
    assert torch.allclose(loss, want, atol=1e-6)
    # per-frame t (image-to-video: a clean first latent frame) is excluded from the loss too
    tf = tf.clone()
    tf[LF] = 1.0
    with torch.no_grad():
        v = tiny.dit(noisy_latents(lat, noise, tf), tf, text, lens)
        want = (v - (lat - noise))[LF + 1:].pow(2).mean()
        assert torch.allclose(flow_matching_loss(tiny.dit, lat, tf, noise, text, lens), want, atol=1e-6)


def test_a_few_steps_of_tiny_lower_the_loss():
    torch.manual_seed(0)
    model = WorldModel(TINY)
    batch = D.make_batch(0, 0, n_chunks=2, batch=2)
    with torch.no_grad():
        z = model.vae.encode(torch.from_numpy(batch.frames))
        z = (z - z.mean()) / z.std()
    latents = torch.cat([z[0], z[1, :LF]])  # packed: a 2-chunk and a 1-chunk sample
    tokens = torch.cat([torch.from_numpy(batch.tokens[0]), torch.from_numpy(batch.tokens[1, :1])])
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(latents.shape, generator=g)
    t = torch.tensor([0.3, 0.6, 0.5])
    params = list(model.dit.parameters()) + list(model.text.parameters())
    opt = torch.optim.AdamW(params, lr=3e-3)
    losses = []
    for _ in range(15):
        text, lens = pack_text(*model.text(tokens))
        loss = flow_matching_loss(model.dit, latents, t, noise, text, lens, video_chunks=(2, 1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_cross_attention_mask_rows_equal_submask():
    from maskc.comm import layout_segments, submask

    rng = np.random.default_rng(3)
    for _ in range(30):
        vc = rng.integers(1, 4, size=int(rng.integers(1, 4))).tolist()
        t = int(rng.integers(1, 7))
        lens = rng.integers(0, 4, size=sum(vc)).tolist()
        whole = M.cross_attention_mask(vc, t, lens)
        cuts = np.unique(np.r_[0, rng.integers(0, whole.sq + 1, 4), whole.sq])
        runs = np.stack([cuts[:-1], cuts[1:]], 1)
        runs = runs[rng.permutation(len(runs))][: int(rng.integers(1, len(runs) + 1))]  # some ranges, any order
        got = M.cross_attention_mask(vc, t, lens, row_runs=runs)
        assert got == submask(whole, layout_segments(runs), [[0, whole.sk, 0]])
    with pytest.raises(maskc.MaskError, match="row_runs"):
        M.cross_attention_mask([2], 3, [1, 1], row_runs=[[0, 7]])
    with pytest.raises(maskc.MaskError, match=r"caption_lengths\[1\]"):
        M.cross_attention_mask([2], 3, [1, -1])
