"""World-model generation (``magi generate``): streaming pipeline, ring-buffer KV cache, conditioning, CLI (CPU)."""

import json
import math
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("safetensors")

from maskc.world_model import cli
from maskc.world_model import generate as G
from maskc.world_model import graphs as GR
from maskc.world_model import media
from maskc.world_model import train as TR
from maskc.world_model.configs import TINY

P = "the red circle moves right"


from world_helpers import one_thread, randomized, tiny  # noqa: F401 (pytest fixtures)


@pytest.fixture(scope="module")
def small():
    model, meta = G.load_model()
    return model, meta


class CountingDiT:
    """Wraps model.dit.forward to count calls (restored on exit)."""

    def __init__(self, model):
        self.model, self.calls = model, 0

    def __enter__(self):
        self.orig = self.model.dit.forward

        def fwd(*a, **k):
            self.calls += 1
            return self.orig(*a, **k)

        self.model.dit.forward = fwd
        return self

    def __exit__(self, *exc):
        del self.model.dit.forward


# ---------------------------------------------------------------------------------- pipeline


def test_yields_chunks_one_by_one(tiny):
    with CountingDiT(tiny) as c:
        s = G.generate_chunks(tiny, [P], n_chunks=6, steps=4, window=2, attn_window=3, cfg_text=1.0, seed=0)
        assert c.calls == 0  # nothing runs before the first chunk is asked for
        first = next(s)
        calls_first = c.calls
        assert first.shape == (24, 64, 64, 3) and first.dtype == np.uint8
        rest = list(s)
    assert len(rest) == 5
    assert 0 < calls_first < c.calls / 3  # later chunks were not computed yet
    assert s.model_calls == c.calls
    assert s.in_flight_peak == 2  # staggered pipeline: window chunks in flight


def test_kv_cache_bounded_by_window(tiny):
    sizes = []
    orig = G.RingKVCache.push

    def push(self, kv):
        orig(self, kv)
        sizes.append((len(self), self.nbytes()))

    G.RingKVCache.push = push
    try:
        s = G.generate_chunks(tiny, [P], n_chunks=10, steps=2, window=2, attn_window=3, cfg_text=0.0, seed=0)
        n = sum(1 for _ in s)
    finally:
        G.RingKVCache.push = orig
    assert n == 10 and len(sizes) == 10
    assert max(k for k, _ in sizes) == 2 == s.peak_cache_chunks  # attn_window - 1 clean chunks, never more
    assert len({b for _, b in sizes}) == 1  # storage allocated once: constant memory


def _live_tensors():
    """(count, bytes) of the torch tensors alive in this process (storages counted once), but for the CPU
    attention's cache of masks' dense forms (`dit._DENSE`: process-wide and bounded, like the kernels' plan
    cache; a layout first met as the pipeline drains adds one)."""
    import gc

    from maskc.world_model import dit as DIT

    gc.collect()
    cached = {t.untyped_storage().data_ptr() for pair in DIT._DENSE.values() for t in pair}
    storages = {}
    n = 0
    for o in gc.get_objects():
        if issubclass(type(o), torch.Tensor) and type(o) is not torch.nn.Parameter \
                and o.untyped_storage().data_ptr() not in cached:
            n += 1
            st = o.untyped_storage()
            storages[st.data_ptr()] = st.nbytes()
    return n, sum(storages.values())


@pytest.mark.parametrize("cfg_text,cfg_prev,pack", [(0.0, 0.0, False), (3.0, 0.5, False), (3.0, 0.5, True)])
def test_live_memory_bounded_over_a_long_video(tiny, cfg_text, cfg_prev, pack):
    """Once the pipeline is full, the tensors the generator holds between chunks are the same in number
    and size after every chunk (no lists of frames, per-chunk K/V, or guidance batches pile up)."""
    n, window = 12, 2
    s = G.generate_chunks(tiny, [P], n_chunks=n, steps=2, window=window, attn_window=3, cfg_text=cfg_text,
                          cfg_prev=cfg_prev, seed=0, pack_branches=pack)
    base = _live_tensors()
    live = []
    for chunk in s:
        del chunk
        live.append(_live_tensors())
    assert len(live) == n
    steady = live[3]  # window chunks in flight, attn_window - 1 chunks in the cache
    assert steady[0] > base[0]
    assert all(x == steady for x in live[3:n - window]), live  # until the pipeline drains
    assert max(b for _, b in live) == steady[1]
    assert s.cache.nbytes() > 0


def test_packed_branches_make_the_same_video_in_fewer_calls(tiny, monkeypatch):
    """pack_branches: every guidance branch of a tick (conditional, null text, negatives, also prompts, no
    cache) in one `DiT.forward_branches` call, which gets each branch's own captions and cache; the frames
    equal one call per branch up to rounding, with the same branch passes in fewer transformer calls. Off by
    default on the CPU; a value other than None / True / False is refused."""
    kw = dict(n_chunks=5, steps=4, window=2, attn_window=3, cfg_text=3.0, cfg_prev=2.0, cfg_prev_frames=0,
              cfg_interval=(0.0, 1.0), also="the blue square falls", seed=2)
    prompts = [P, "the red circle moves up"]
    packed_calls = []
    fb = tiny.dit.forward_branches
    monkeypatch.setattr(tiny.dit, "forward_branches", lambda *a, **k: packed_calls.append(a[2]) or fb(*a, **k))
    with CountingDiT(tiny) as c0:
        s0 = G.generate_chunks(tiny, prompts, **kw)
        sep = np.concatenate(list(s0)).astype(int)
    assert s0.pack_branches is False and packed_calls == [] and s0.model_calls == s0.branch_passes == c0.calls
    with CountingDiT(tiny) as c1:
        s1 = G.generate_chunks(tiny, prompts, **kw, pack_branches=True)
        packed = np.concatenate(list(s1)).astype(int)
    assert s1.pack_branches is True and s1.branch_passes == s0.branch_passes
    # one call per tick (the ticks with a cache hold every branch), plus the clean passes, which are not packed
    assert c1.calls + len(packed_calls) == s1.model_calls == s1.ticks + 5 < s0.model_calls
    # conditional, null, also, negatives (near misses of "moves right" / "moves up"), no cache: the cache's
    # branches see it, the last not; each branch's captions are its own
    widest = max(packed_calls, key=len)
    assert len(widest) >= 5 and [b[2] for b in widest] == [True] * (len(widest) - 1) + [False]
    assert torch.equal(widest[0][0], widest[-1][0]) and not torch.equal(widest[0][0], widest[1][0])
    assert np.abs(packed - sep).mean() < 0.05 and np.abs(packed - sep).max() <= 4  # rounding, not another video
    for bad in (1, "yes", 0.0):
        with pytest.raises(ValueError, match="pack_branches"):
            G.generate_chunks(tiny, [P], pack_branches=bad)


def test_cuda_graphs_need_a_gpu_and_packed_branches(tiny):
    """cuda_graphs: off by default on the CPU; asked for there, or without packed branches, or not a bool,
    it is refused before any work; the model keeps its graphs until `drop_graphs`; `GraphedBlocks` refuses
    autograd and CPU inputs."""
    s = G.generate_chunks(tiny, [P], n_chunks=1, steps=1)
    assert s.graphs is None and s.pack_branches is False
    for kw, msg in (({"cuda_graphs": True}, "needs the model on a CUDA device"),
                    ({"cuda_graphs": True, "pack_branches": True}, "needs the model on a CUDA device"),
                    ({"cuda_graphs": 1}, "cuda_graphs must be True, False or None")):
        with pytest.raises(ValueError, match=msg):
            G.generate_chunks(tiny, [P], **kw)
    kept = GR.graphed_blocks(tiny)  # kept on the model for the next stream, until dropped
    assert GR.graphed_blocks(tiny) is kept and kept.dit is tiny.dit
    GR.drop_graphs(tiny)
    assert GR.graphed_blocks(tiny) is not kept
    gb = GR.GraphedBlocks(tiny.dit)
    x = torch.zeros(4, TINY.patch_dim)
    with pytest.raises(ValueError, match="torch.no_grad"):
        gb(x, x[:, 0], x[:, :3].long(), x, None, None)
    with torch.no_grad(), pytest.raises(ValueError, match="on a CUDA device, got cpu"):
        gb(x, x[:, 0], x[:, :3].long(), x, None, None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_replays_equal_the_packed_call_and_the_stream(small):
    """On a GPU: a packed call replayed from its graph gives the eager call's velocities bit for bit, on
    new inputs too; layouts get a graph each and share the buffers, which grow for a larger call; the
    stream with graphs yields the frames of the stream without them."""
    model, meta = G.load_model(device="cuda")
    cfg, dit = model.cfg, model.dit
    g = torch.Generator().manual_seed(0)
    shape = (cfg.latent_frames, cfg.latent_size, cfg.latent_size, cfg.latent_channels)
    gb = GR.GraphedBlocks(dit)
    with torch.no_grad():
        z = torch.randn((2 * shape[0],) + shape[1:], generator=g).cuda()
        t2, l2 = model.encode_captions([P] * 2)
        _, kv = dit(z, torch.ones(2), t2, l2, chunk_offsets=(0,), window=4, return_kv=True)
        nt, nl = model.encode_captions([""] * 2)
        for n_branches in (2, 3):  # a second, larger layout: larger buffers
            br = [(t2, l2, True), (nt, nl, True), (t2, l2, False)][:n_branches]
            for _ in range(2):
                lat = torch.randn((2 * shape[0],) + shape[1:], generator=g).cuda()
                tf = torch.rand(2, generator=g).repeat_interleave(cfg.latent_frames)
                want = dit.forward_branches(lat, tf, br, 2, 4, kv)
                got = dit.forward_branches(lat, tf, br, 2, 4, kv, blocks=gb)
                assert all(torch.equal(a, b) for a, b in zip(got, want))
        assert (gb.captures, gb.replays, len(gb.graphs)) == (2, 2, 2)
        assert len({id(e.buffers) for e in gb.graphs.values()}) == 2  # grown for the 3-branch call
    frames = {}
    for graphs in (False, True):
        s = G.generate_chunks(model, [P, "the red circle moves left"], n_chunks=4, steps=6, seed=1, meta=meta,
                              cuda_graphs=graphs)
        frames[graphs] = np.concatenate(list(s))
        assert (s.graphs is not None) == graphs
    assert np.array_equal(frames[True], frames[False])
    # every tick is one packed call, captured the first time its layout comes up and replayed after
    assert s.graphs.captures + s.graphs.replays == s.ticks and s.graphs.replays > 0 and s.graphs.captures > 0


def test_ring_buffer_order_and_wrap():
    cache = G.RingKVCache(depth=2, capacity=3, tokens_per_chunk=2)
    assert cache.kv() is None
    for i in range(5):
        kv = [(torch.full((2, 1, 4), float(i + 10 * layer)), torch.full((2, 1, 4), -float(i))) for layer in range(2)]
        cache.push(kv)
    k, v = cache.kv()[1]
    assert len(cache) == 3 and k.shape == (6, 1, 4)
    assert k[::2, 0, 0].tolist() == [12.0, 13.0, 14.0]  # oldest first after wrapping
    assert v[::2, 0, 0].tolist() == [-2.0, -3.0, -4.0]


def test_cached_window_matches_full_forward(tiny):
    """New chunks over the ring buffer == the same rows of a full forward over cache + new chunks."""
    cfg, lf, w = TINY, TINY.latent_frames, 3
    g = torch.Generator().manual_seed(1)
    lat = torch.randn(5 * lf, cfg.latent_size, cfg.latent_size, cfg.latent_channels, generator=g)
    caps = [P, "the blue square falls", P, "the green triangle moves up", P]
    text, lens = tiny.encode_captions(caps)
    t = torch.tensor([1.0, 1.0, 1.0, 0.7, 0.3])
    cache = G.RingKVCache(cfg.depth, w - 1, cfg.tokens_per_chunk)
    with torch.no_grad():
        for c in range(3):  # clean chunks one at a time, as the generator does
            tx, tl = tiny.encode_captions([caps[c]])
            _, kv = tiny.dit(lat[c * lf:(c + 1) * lf], torch.ones(lf), tx, tl, chunk_offsets=(c,), window=w,
                             past_kv=cache.kv(), return_kv=True)
            cache.push(kv)
        tx, tl = tiny.encode_captions(caps[3:])
        v_cached = tiny.dit(lat[3 * lf:], t[3:], tx, tl, chunk_offsets=(3,), window=w, past_kv=cache.kv())
        v_full = tiny.dit(lat, t, text, lens, window=w)
    assert len(cache) == 2
    torch.testing.assert_close(v_cached, v_full[3 * lf:], atol=1e-4, rtol=1e-4)


def test_seeded_determinism(tiny):
    run = lambda seed: np.stack(list(G.generate_chunks(tiny, [P], n_chunks=3, steps=3, window=2, seed=seed)))  # noqa: E731
    a, b, c = run(5), run(5), run(6)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_chunkwise_prompts_reach_their_chunks(tiny):
    base = [P] * 6
    other = base[:3] + ["the blue square falls"] * 3
    kw = dict(n_chunks=6, steps=4, window=2, attn_window=3, cfg_text=1.0, cfg_prev=0.5, seed=3)
    a = np.stack(list(G.generate_chunks(tiny, base, **kw)))
    b = np.stack(list(G.generate_chunks(tiny, other, **kw)))
    assert np.array_equal(a[:3], b[:3])  # earlier chunks never see later captions
    assert all(not np.array_equal(a[k], b[k]) for k in range(3, 6))


@pytest.fixture(scope="module")
def tiny_runs(tiny):
    """``tiny`` with caption runs of up to 3 chunks, their vectors drawn at random (not zero)."""
    model = TR.add_caption_runs(tiny, 3).eval()
    with torch.no_grad():
        model.text.run.weight[1:].normal_(generator=torch.Generator().manual_seed(4))
    return model


def test_each_chunk_is_told_its_run_over_the_prompt_list(tiny_runs, monkeypatch):
    told = []
    encode = tiny_runs.encode_captions
    monkeypatch.setattr(tiny_runs, "encode_captions", lambda caps, runs=None: told.append((list(caps), list(runs))) or encode(caps, runs))
    Q = "the blue square falls"
    prompts = [P, "The red circle moves RIGHT.", Q, Q, Q, Q]  # one caption spelled two ways is one run
    stream = G.generate_chunks(tiny_runs, prompts, steps=2, window=2, attn_window=2, cfg_text=1.0, seed=0)
    assert stream.runs == [2, 1, 3, 3, 2, 1]
    list(stream)
    by_caption = {(c, r) for caps, runs in told for c, r in zip(caps, runs)}
    assert (P, 2) in by_caption and (Q, 3) in by_caption and (Q, 1) in by_caption
    assert all(r == 0 for caps, runs in told for c, r in zip(caps, runs) if c == G.NULL_CAPTION)  # CFG's branch


def test_earlier_chunks_see_later_prompts_only_through_their_runs(tiny_runs):
    kw = dict(n_chunks=6, steps=4, window=2, attn_window=3, cfg_text=1.0, seed=3)
    Q, B = "the blue square falls", "the green triangle rises"
    a = np.stack(list(G.generate_chunks(tiny_runs, [P] * 4 + [Q] * 2, **kw)))
    b = np.stack(list(G.generate_chunks(tiny_runs, [P] * 4 + [B] * 2, **kw)))  # same runs
    c = np.stack(list(G.generate_chunks(tiny_runs, [P] * 3 + [Q] * 3, **kw)))  # chunk 1's run 3 -> 2
    assert np.array_equal(a[:4], b[:4]) and not np.array_equal(a[4], b[4])
    assert np.array_equal(a[0], c[0]) and not np.array_equal(a[1], c[1])  # chunk 0's run is 3 in both


def test_runs_can_be_told_explicitly(tiny_runs):
    kw = dict(n_chunks=2, steps=2, window=2, seed=2)
    Q = "the blue square falls"
    counted = np.stack(list(G.generate_chunks(tiny_runs, [P, Q], **kw)))
    assert np.array_equal(counted, np.stack(list(G.generate_chunks(tiny_runs, [P, Q], runs=[1, 1], **kw))))
    other = np.stack(list(G.generate_chunks(tiny_runs, [P, Q], runs=[3, 0], **kw)))
    assert not np.array_equal(counted[0], other[0]) and not np.array_equal(counted[1], other[1])
    for bad in ([1], [1, 4], [1, -1], [1, True], [1, 1.0]):
        with pytest.raises(ValueError, match=r"runs must give one integer in \[0, 3\]"):
            G.generate_chunks(tiny_runs, [P, Q], runs=bad, **kw)


def test_zero_run_vectors_generate_what_the_model_without_runs_generates(tiny):
    kw = dict(n_chunks=3, steps=3, window=2, cfg_text=2.0, seed=1)
    prompts = [P, P, "the blue square falls"]
    with_runs = TR.add_caption_runs(tiny, 4).eval()
    assert np.array_equal(np.stack(list(G.generate_chunks(tiny, prompts, **kw))),
                          np.stack(list(G.generate_chunks(with_runs, prompts, **kw))))


def test_run_guidance(tiny_runs, tiny, monkeypatch):
    """``cfg_run`` adds cfg_run * (v - v_end), v_end told every run cut to 1 ("the caption ends
    here"): nothing and no extra call where no chunk in flight has a run over 1 or no frame is inside
    the guidance interval; otherwise a different video, its extra branch told the cut runs."""
    kw = dict(n_chunks=3, steps=4, window=2, cfg_text=1.0, cfg_interval=(0.0, 1.0), seed=5)
    Q = "the blue square falls"
    run = lambda prompts, **k: np.stack(list(G.generate_chunks(tiny_runs, prompts, **{**kw, **k})))  # noqa: E731
    assert np.array_equal(run([P, P, Q]), run([P, P, Q], cfg_run=0.0))
    with CountingDiT(tiny_runs) as c0:
        plain = run([P, Q, P])  # runs [1, 1, 1]
    with CountingDiT(tiny_runs) as c1:
        assert np.array_equal(plain, run([P, Q, P], cfg_run=4.0))
    assert c1.calls == c0.calls
    assert np.array_equal(run([P, P, Q], cfg_interval=(0.99, 1.0)),
                          run([P, P, Q], cfg_interval=(0.99, 1.0), cfg_run=4.0))
    told = []
    encode = tiny_runs.encode_captions
    monkeypatch.setattr(tiny_runs, "encode_captions",
                        lambda caps, runs=None: told.append((list(caps), list(runs))) or encode(caps, runs))
    guided = run([P, P, Q], cfg_run=4.0)  # runs [2, 1, 1]
    assert not np.array_equal(guided[0], run([P, P, Q])[0])
    assert ([P], [1]) in told and ([P], [2]) in told  # the contrast branch and the conditional one
    for bad in (-1.0, float("nan"), "2"):
        with pytest.raises(ValueError, match="cfg_run must be a number >= 0"):
            G.generate_chunks(tiny_runs, [P], cfg_run=bad)
    with pytest.raises(ValueError, match="cfg_run=2.0 needs a model with caption runs"):
        G.generate_chunks(tiny, [P], cfg_run=2.0)


def test_guidance_interval(tiny):
    """Text guidance only acts on latent frames whose flow time lies in ``cfg_interval``: an interval
    no frame reaches is the unguided sampler (and skips the unconditional calls), and a partial one
    differs from both that and guidance everywhere."""
    kw = dict(n_chunks=3, steps=4, window=2, cfg_text=3.0, cfg_neg=0.0, seed=2)
    run = lambda **k: np.stack(list(G.generate_chunks(tiny, [P], **{**kw, **k})))  # noqa: E731
    assert np.array_equal(run(), run(cfg_interval=G.DEFAULT_CFG_INTERVAL))
    everywhere = run(cfg_interval=(0.0, 1.0))
    with CountingDiT(tiny) as c:
        never = run(cfg_interval=(0.99, 1.0))  # the grid's last time before clean is 0.75
    assert np.array_equal(never, run(cfg_text=0.0))
    with CountingDiT(tiny) as c0:
        run(cfg_text=0.0)
    assert c.calls == c0.calls
    high_noise = run(cfg_interval=(0.0, 0.3))
    assert not np.array_equal(high_noise, everywhere) and not np.array_equal(high_noise, never)
    for bad in ((0.5, 0.5), (-0.1, 1.0), (0.0, 1.5), (0.3,), "ab", None):
        with pytest.raises(ValueError, match="cfg_interval"):
            G.generate_chunks(tiny, [P], cfg_interval=bad)


def test_guidance_on_the_previous_chunks_on_each_chunk_s_first_frames(tiny, monkeypatch):
    """cfg_prev_frames n: the guidance on the previous chunks changes each chunk's first n latent frames
    only (at the first tick it acts, the velocities differ from the unguided ones there and nowhere else);
    n = latent_frames is guidance everywhere (as n = 0); the default is cfg_prev 4 on the first latent
    frame (session 37); bad values are refused."""
    lf = tiny.cfg.latent_frames
    assert (G.DEFAULT_CFG_PREV, G.DEFAULT_CFG_PREV_FRAMES) == (4.0, 1)
    kw = dict(n_chunks=3, steps=4, window=2, cfg_text=0.0, cfg_neg=0.0, seed=4)
    run = lambda **k: np.stack(list(G.generate_chunks(tiny, [P], **{**kw, **k})))  # noqa: E731
    assert np.array_equal(run(cfg_prev=2.0, cfg_prev_frames=lf), run(cfg_prev=2.0, cfg_prev_frames=0))
    first = run(cfg_prev=2.0, cfg_prev_frames=1)
    assert np.array_equal(run(cfg_prev=4.0, cfg_prev_frames=1), run())  # the defaults
    assert not np.array_equal(first, run())
    assert not np.array_equal(first, run(cfg_prev_frames=0)) and not np.array_equal(first, run(cfg_prev=0.0))
    steps = {}
    real = G.ChunkStream._step

    def record(name):
        def step(self, lat, v, t_cur, t_nxt):
            steps[name].append(v.clone())
            return real(self, lat, v, t_cur, t_nxt)
        return step

    for name, extra in (("plain", {"cfg_prev": 0.0}), ("first", {"cfg_prev": 2.0, "cfg_prev_frames": 2})):
        steps[name] = []
        monkeypatch.setattr(G.ChunkStream, "_step", record(name))
        run(**extra)
    tick = next(i for i, (a, b) in enumerate(zip(steps["plain"], steps["first"])) if not torch.equal(a, b))
    changed = (steps["plain"][tick] != steps["first"][tick]).flatten(1).any(1)
    frame_in_chunk = torch.arange(len(changed)) % lf
    assert changed[frame_in_chunk < 2].all() and not changed[frame_in_chunk >= 2].any()
    for bad in (-1, lf + 1, True, 1.5):
        with pytest.raises(ValueError, match=rf"cfg_prev_frames must be an integer in \[0, {lf}\]"):
            G.generate_chunks(tiny, [P], cfg_prev=2.0, cfg_prev_frames=bad)


def test_near_miss_captions():
    from maskc.world_model import vocab

    assert vocab.near_miss_captions("the red circle moves right") == ("the red circle bounces off the right wall",)
    assert vocab.near_miss_captions("The Blue square moves left.") == ("the blue square bounces off the left wall",)
    assert vocab.near_miss_captions("the green triangle moves up") == (
        "the green triangle bounces off the ceiling", "the green triangle rises", "the green triangle rises and falls")
    assert vocab.near_miss_captions("the white circle moves down") == (
        "the white circle bounces off the floor", "the white circle falls")
    for other in ("the red circle falls", "the red circle stays still", "the red circle bounces off the floor"):
        assert vocab.near_miss_captions(other) == ()
    for d in vocab.DIRECTIONS:  # never the caption itself, always the same subject, always grammatical
        text = f"the red circle moves {d}"
        for q in vocab.near_miss_captions(text):
            c = vocab.parse_caption(q)
            assert c.subject == ("red", "circle") and c.motion != f"moves {d}"
    with pytest.raises(ValueError, match="unknown word 'circel'"):
        vocab.near_miss_captions("the red circel moves right")


def test_negative_prompt_lists():
    Q, F, D = "the blue square moves up", "the blue square falls", "the blue square moves down"
    assert G.negative_prompts([P, Q, F, D]) == [
        ("the red circle bounces off the right wall",),
        ("the blue square bounces off the ceiling", "the blue square rises", "the blue square rises and falls"),
        (), ("the blue square bounces off the floor", F)]
    assert G.negative_prompts([P, P, P], F) == [(F,), (F,), (F,)]
    assert G.negative_prompts([P, P, P], [None, (F, Q)]) == [(), (F, Q), (F, Q)]  # the last one repeats
    with pytest.raises(ValueError, match="3 negative prompts for 2 chunks"):
        G.negative_prompts([P, P], [F, F, F])
    with pytest.raises(ValueError, match="give at least one"):
        G.negative_prompts([P], [])
    with pytest.raises(ValueError, match="closest known words: square"):
        G.negative_prompts([P], ["the blue sqare falls"])
    for bad in (3, (F, 3)):
        with pytest.raises(ValueError, match="caption string, None or a tuple of captions"):
            G.negative_prompts([P], [bad])


def test_negative_guidance(tiny, monkeypatch):
    """``cfg_neg`` adds cfg_neg * (v - v_neg), v_neg told each chunk's negative prompts (by default its
    near misses; the mean over several): chunks without a negative are untouched bit for bit, and a
    video with none takes no extra transformer call; otherwise a different video, one more call per
    negative, the extra branches told the negatives."""
    kw = dict(n_chunks=3, steps=4, window=2, cfg_text=1.0, seed=4)
    F = "the blue square falls"
    run = lambda prompts, **k: np.stack(list(G.generate_chunks(tiny, prompts, **{**kw, **k})))  # noqa: E731
    with CountingDiT(tiny) as c0:
        plain = run([F], cfg_neg=0.0)
    with CountingDiT(tiny) as c1:
        assert np.array_equal(plain, run([F], cfg_neg=8.0))  # "falls" has no contrast caption
    assert c1.calls == c0.calls
    assert np.array_equal(run([P], cfg_neg=0.0), run([P], cfg_neg=8.0, negative=[None]))
    with CountingDiT(tiny) as c2:
        guided = run([P], cfg_neg=8.0)
    with CountingDiT(tiny) as c3:
        run([P], cfg_neg=0.0, cfg_text=0.0)
    with CountingDiT(tiny) as c4:
        run([P], cfg_neg=0.0)
    assert c2.calls - c4.calls == c4.calls - c3.calls > 0  # one more call where text guidance makes one
    assert not np.array_equal(guided, run([P], cfg_neg=0.0))
    assert np.array_equal(guided, run([P], cfg_neg=8.0, negative="the red circle bounces off the right wall"))
    # several negatives: one call each, their mean; the same negative twice is that negative
    U, R = "the red circle moves up", "the red circle rises"
    with CountingDiT(tiny) as c5:
        two = run([U], cfg_neg=8.0, negative=[(R, "the red circle falls")])
    assert c5.calls - c4.calls == 2 * (c4.calls - c3.calls)
    assert not np.array_equal(two, run([U], cfg_neg=8.0, negative=R))
    assert np.array_equal(run([U], cfg_neg=8.0, negative=[(R, R)]), run([U], cfg_neg=8.0, negative=R))
    # per chunk: a negative on the second chunk only leaves the first as it was (it does not see later chunks)
    only2 = run([P], cfg_neg=8.0, negative=[None, "the red circle stays still", None])
    base = run([P], cfg_neg=0.0)
    assert np.array_equal(only2[0], base[0]) and not np.array_equal(only2[1], base[1])
    told = []
    encode = tiny.encode_captions
    monkeypatch.setattr(tiny, "encode_captions",
                        lambda caps, runs=None: told.append(list(caps)) or encode(caps, runs))
    run([P, F], cfg_neg=8.0)
    assert ["the red circle bounces off the right wall", F] in told  # F keeps its own caption (scale 0)
    told.clear()
    run(["the red circle moves down"], cfg_neg=8.0)
    assert ["the red circle bounces off the floor"] in told and ["the red circle falls"] in told
    for bad in (-1.0, float("nan"), "2"):
        with pytest.raises(ValueError, match="cfg_neg must be a number >= 0"):
            G.generate_chunks(tiny, [P], cfg_neg=bad)


def test_also_prompt_lists():
    """``also_prompts``: none by default; a caption, a tuple or one entry per chunk (the last repeating, None
    for none); validated against the vocabulary and the grammar; never the chunk's own subject."""
    B, Y = "the blue square falls", "the yellow triangle moves left"
    assert G.also_prompts([P, P]) == [(), ()]
    assert G.also_prompts([P, P], B) == [(B,), (B,)]
    assert G.also_prompts([P, P, P], [None, (B, Y)]) == [(), (B, Y), (B, Y)]
    with pytest.raises(ValueError, match="names that chunk's subject"):
        G.also_prompts([P, "the blue square moves up"], B)  # chunk 1's subject is the blue square
    with pytest.raises(ValueError, match="closest known words: square"):
        G.also_prompts([P], "the blue sqare falls")
    with pytest.raises(ValueError, match="does not follow the grammar"):
        G.also_prompts([P], "the blue square")
    with pytest.raises(ValueError, match="3 also prompts for 2 chunks"):
        G.also_prompts([P, P], [B, B, B])
    with pytest.raises(ValueError, match="also prompts: give at least one"):
        G.also_prompts([P], [])
    with pytest.raises(ValueError, match="each also prompt must be a caption string, None or a tuple"):
        G.also_prompts([P], [3])


def test_also_guidance(tiny, monkeypatch):
    """``also``: each also prompt adds cfg_also (v_also - v_null) on the guided ticks: none (or scale 0) is
    the sampler bit for bit with the same calls; one more call per also prompt on guided ticks, the null
    branch run even without text guidance; the branch told the also prompts (a chunk with fewer keeps its
    own caption at scale 0); a chunk without them untouched; bad scales refused."""
    kw = dict(n_chunks=3, steps=4, window=2, cfg_text=1.0, cfg_neg=0.0, seed=6)
    B, Y = "the blue square falls", "the yellow triangle moves left"

    def run(**k):
        with CountingDiT(tiny) as c:
            frames = np.stack(list(G.generate_chunks(tiny, [P], **(kw | k))))
        return frames, c.calls

    plain, n0 = run()
    none, nn = run(also=None)
    assert np.array_equal(none, plain) and nn == n0
    zero, nz = run(also=B, cfg_also=0.0)
    assert np.array_equal(zero, plain) and nz == n0
    one, n1 = run(also=B)
    two, n2 = run(also=[(B, Y)])
    assert not np.array_equal(one, plain) and not np.array_equal(two, one)
    assert n1 - n0 == n2 - n1 > 0  # one more call per also prompt
    notext, nt = run(also=B, cfg_text=0.0)
    _, nt0 = run(cfg_text=0.0)
    assert nt - nt0 == 2 * (n1 - n0)  # without text guidance the null branch is run for the also prompts
    assert not np.array_equal(notext, run(cfg_text=0.0)[0])
    only2, _ = run(also=[None, B, None])  # the second chunk only: the first is as it was
    assert np.array_equal(only2[0], plain[0]) and not np.array_equal(only2[1], plain[1])
    told = []
    encode = tiny.encode_captions
    monkeypatch.setattr(tiny, "encode_captions", lambda caps, runs=None: told.append((list(caps), list(runs))) or
                        encode(caps, runs))
    run(also=[(B, Y), B])
    assert ([B, B], [0, 0]) in told and ([Y, P], [0, 0]) in told  # chunk 1 has no second: its own caption
    for bad in (-1.0, float("nan"), "6"):
        with pytest.raises(ValueError, match="cfg_also must be a number >= 0"):
            G.generate_chunks(tiny, [P], also=B, cfg_also=bad)


def test_auto_also(tiny, monkeypatch):
    """``also="auto"``: the stream finds the objects of the image (or of the prefix's last frame) and, once a
    chunk is final, tells every later chunk each object's motion in it, leaving out the object each chunk's
    prompt names; an object not seen keeps its last motion. Chunks guided before the first one is final are
    the plain sampler's; the prefix's last chunk is read before the first tick; a video from text is refused."""
    from maskc.world_model import data
    from maskc.world_model import objects as O

    clip = data.generate(1, 2)
    image = clip.frames[0]
    found = O.find_objects(image)
    assert len(found) >= 2
    subject = f"the {found[0][0]} {found[0][1]} moves right"
    kw = dict(n_chunks=3, steps=4, window=2, cfg_text=1.0, cfg_neg=0.0, seed=3, image=image)
    seen = []

    def motions(frames, objects, config=data.WorldConfig(), tol=None):  # every object moves left in the first
        seen.append(len(frames))                                          # chunk, then none is seen
        return {o: "moves left" for o in objects} if len(seen) == 1 else {}

    monkeypatch.setattr(O, "chunk_motions", motions)
    with CountingDiT(tiny) as c0:
        plain = np.stack(list(G.generate_chunks(tiny, [subject], **kw)))
    with CountingDiT(tiny) as c1:
        s = G.generate_chunks(tiny, [subject], also="auto", **kw)
        auto = np.stack(list(s))
    assert s.objects == found and seen == [24] * 3  # each final chunk read
    others = [f"the {c} {sh} moves left" for c, sh in found[1:]]
    assert s.also == [(), tuple(others), tuple(others)]  # the last motion kept; never the subject
    # chunk 1 took its guidance before chunk 0 was final; chunk 2 is told, with one more call per object told
    assert np.array_equal(auto[:2], plain[:2]) and not np.array_equal(auto[2], plain[2]) and c1.calls > c0.calls
    with pytest.raises(ValueError, match="keeps the objects of the image or of the video prefix"):
        G.generate_chunks(tiny, [subject], also="auto")
    seen.clear()  # continuation: the prefix's last chunk is read before the first tick
    s = G.generate_chunks(tiny, [subject], n_chunks=1, steps=3, window=2, cfg_neg=0.0, also="auto", video=clip.frames)
    assert s.also == [()] and s.objects == () and seen == []  # nothing computed before the first chunk is asked for
    list(s)
    assert s.objects == O.find_objects(clip.frames[-1]) and seen == [24, 24]  # the prefix's chunk, the new one


def test_context_noise(tiny, monkeypatch):
    """``ctx_t`` < 1: a finished chunk enters the KV cache noised back to flow time ctx_t (from its own
    generator): the chunk itself is yielded as it was, the chunks after it see a noisier context;
    ctx_t = 1 (the default) is the clean context, bit for bit."""
    kw = dict(n_chunks=3, steps=4, window=2, attn_window=3, cfg_text=1.0, cfg_neg=0.0, seed=4)
    run = lambda **k: np.stack(list(G.generate_chunks(tiny, [P], **kw, **k)))  # noqa: E731
    clean = run()
    assert np.array_equal(clean, run(ctx_t=1.0))
    noisy = run(ctx_t=0.8)
    assert np.array_equal(noisy[0], clean[0]) and not np.array_equal(noisy[1:], clean[1:])
    assert np.array_equal(noisy, run(ctx_t=0.8))  # seeded
    seen = []
    fwd = tiny.dit.forward
    monkeypatch.setattr(tiny.dit, "forward", lambda lat, t, *a, return_kv=False, **k:
                        (return_kv and seen.append(t.unique().tolist())) or fwd(lat, t, *a, return_kv=return_kv, **k))
    run(ctx_t=0.8)
    assert seen == [[pytest.approx(0.8)]] * 3  # every context pass at flow time 0.8
    for bad in (0.0, 1.5, float("nan"), "0.9"):
        with pytest.raises(ValueError, match=r"ctx_t must be a flow time in \(0, 1\]"):
            G.generate_chunks(tiny, [P], ctx_t=bad)


def test_stochastic_step_math(tiny):
    """``_step``: eta 0 is the Euler step; otherwise the step lands on t' x1 + (1 - t') x0' with x1, x0
    the clean latents and noise the velocity points at and eta of x0 drawn afresh (from the stream's
    own generator), exactly x1 at t' = 1, and Euler for frames outside ``eta_interval``."""
    g = torch.Generator().manual_seed(0)
    lat, v = torch.randn(4, 2, 2, 3, generator=g), torch.randn(4, 2, 2, 3, generator=g)
    t_cur = torch.tensor([0.0, 0.2, 0.5, 0.9]).reshape(-1, 1, 1, 1)
    t_nxt = torch.tensor([0.1, 0.3, 0.6, 1.0]).reshape(-1, 1, 1, 1)

    def step(eta, interval=(0.0, 1.0)):
        s = G.generate_chunks(tiny, [P], eta=eta, eta_interval=interval)
        s._eta_gen = torch.Generator().manual_seed(7)
        return s._step(lat, v, t_cur, t_nxt)

    euler = lat + (t_nxt - t_cur) * v
    assert torch.equal(step(0.0), euler)
    x1, x0 = lat + (1 - t_cur) * v, lat - t_cur * v
    eps = torch.randn(lat.shape, generator=torch.Generator().manual_seed(7))
    for eta in (0.3, 1.0):
        want = t_nxt * x1 + (1 - t_nxt) * (math.sqrt(1 - eta ** 2) * x0 + eta * eps)
        got = step(eta)
        assert torch.allclose(got, want, atol=1e-6) and not torch.allclose(got, euler, atol=1e-3)
        assert torch.allclose(got[3], x1[3], atol=1e-6)  # t' = 1: the clean prediction, no noise left
    part = step(0.5, (0.15, 0.55))  # frames at t 0.2 and 0.5 stochastic, 0.0 and 0.9 Euler
    assert torch.equal(part[[0, 3]], euler[[0, 3]]) and not torch.allclose(part[1:3], euler[1:3], atol=1e-3)


def test_stochastic_steps_in_the_stream(tiny, monkeypatch):
    """The default (eta 0.7) is seeded and differs from eta 0, which is the Euler sampler; an image's
    clean first latent frame stays exactly the image's latent; bad eta / eta_interval are refused."""
    kw = dict(n_chunks=3, steps=4, window=2, cfg_text=1.0, cfg_neg=0.0, seed=5)
    run = lambda **k: np.stack(list(G.generate_chunks(tiny, [P], **kw, **k)))  # noqa: E731
    default = run()
    assert G.DEFAULT_ETA == 0.7 and np.array_equal(default, run(eta=0.7)) and np.array_equal(default, run())
    ode = run(eta=0.0)
    assert not np.array_equal(default, ode)
    with monkeypatch.context() as m:
        m.setattr(G.ChunkStream, "_step", lambda self, lat, v, t0, t1: lat + (t1 - t0) * v)
        assert np.array_equal(run(eta=0.0), ode) and np.array_equal(run(), ode)
    img = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    s = G.generate_chunks(tiny, [P], n_chunks=1, steps=4, eta=1.0, image=img, keep_latents=True, cfg_neg=0.0)
    list(s)
    still = torch.from_numpy(img)[None, None].expand(1, tiny.cfg.chunk_frames, 64, 64, 3)
    assert torch.equal(s.latents[0][:tiny.cfg.patch_t], tiny.vae.encode(still)[0, :tiny.cfg.patch_t])
    for bad in (-0.1, 1.5, float("nan"), "0.5", True):
        with pytest.raises(ValueError, match=r"eta must be a number in \[0, 1\]"):
            G.generate_chunks(tiny, [P], eta=bad)
    for bad in ((0.5, 0.5), (0.0, 1.5), "ab"):
        with pytest.raises(ValueError, match="eta_interval"):
            G.generate_chunks(tiny, [P], eta_interval=bad)


def test_sampler_defaults_are_generate_chunks_defaults(monkeypatch):
    """`sampler_defaults` reads `generate_chunks`' own signature: each module constant it names, JSON-able,
    also while a wrapper is patched over the name (as the sweep's tests do)."""
    monkeypatch.setattr(G, "generate_chunks", lambda *a, **k: None)
    d = G.sampler_defaults()
    assert d["cfg_local"] == G.DEFAULT_CFG_LOCAL and d["eta"] == G.DEFAULT_ETA and d["steps"] == G.DEFAULT_STEPS
    assert d["cfg_interval"] == list(G.DEFAULT_CFG_INTERVAL) and d["window"] == G.DEFAULT_WINDOW
    assert d["cfg_neg"] == G.DEFAULT_CFG_NEG and d["cfg_text"] == G.DEFAULT_CFG_TEXT
    assert d["cfg_also"] == G.DEFAULT_CFG_ALSO
    assert d["cfg_prev"] == G.DEFAULT_CFG_PREV and d["cfg_prev_frames"] == G.DEFAULT_CFG_PREV_FRAMES
    assert d["cfg_salient"] == G.DEFAULT_CFG_SALIENT == 2.0
    assert json.loads(json.dumps(d)) == d


def test_guidance_shaping_math(tiny):
    """``_shape_guidance``: cfg_local weights each position by (|g| / its frame's largest) ** G (the
    strongest position untouched); cfg_parallel 0 leaves g orthogonal to the conditional clean
    prediction x1 of its frame and P mixes the two parts; cfg_rescale 1 gives the guided x1 the
    conditional one's std per frame; all off returns g as it is; the default is cfg_local 2."""
    g0 = torch.Generator().manual_seed(1)
    lat, v, g = (torch.randn(3, 4, 4, 5, generator=g0) for _ in range(3))
    t = torch.tensor([0.0, 0.1, 0.3]).reshape(-1, 1, 1, 1)

    def shape(**k):
        return G.generate_chunks(tiny, [P], **k)._shape_guidance(g, v, lat, t)

    assert torch.equal(shape(cfg_local=0.0), g)
    n = g.norm(dim=-1, keepdim=True)
    w = n / n.amax(dim=(1, 2), keepdim=True)
    assert G.DEFAULT_CFG_LOCAL == 2.0 and torch.allclose(shape(), g * w ** 2, atol=1e-6)
    for gamma in (1.0, 2.0):
        got = shape(cfg_local=gamma)
        assert torch.allclose(got, g * w ** gamma, atol=1e-6)
        top = (w == 1).expand_as(g)
        assert torch.equal(got[top], g[top]) and bool((got.norm(dim=-1) <= n[..., 0] + 1e-6).all())
    seen = torch.tensor([False, True, True])  # frame 0's chunk has nothing to keep: plain guidance there
    s = G.generate_chunks(tiny, [P], cfg_local=2.0, cfg_salient=0.0)
    got = s._shape_guidance(g, v, lat, t, seen)
    assert torch.equal(got[0], g[0]) and torch.allclose(got[1:], (g * w ** 2)[1:], atol=1e-6)
    # ... or cfg_salient there: each position weighted by how far the conditional x1 stands out from its
    # frame's mean, (d / max d) ** S; the frames with something to keep take cfg_local as before
    x1 = lat + (1 - t) * v
    d = (x1 - x1.mean(dim=(1, 2), keepdim=True)).norm(dim=-1, keepdim=True)
    ws = d / d.amax(dim=(1, 2), keepdim=True)
    for sal in (1.0, 4.0):
        got = G.generate_chunks(tiny, [P], cfg_local=2.0, cfg_salient=sal)._shape_guidance(g, v, lat, t, seen)
        assert torch.allclose(got[0], (g * ws ** sal)[0], atol=1e-6) and torch.equal(got[1:], s._shape_guidance(g, v, lat, t, seen)[1:])
        top = (ws[0] == 1).expand_as(g[0])
        assert torch.equal(got[0][top], g[0][top])  # the most salient position keeps its guidance
    assert torch.allclose(G.generate_chunks(tiny, [P])._shape_guidance(g, v, lat, t, seen)[0], (g * ws ** 2)[0], atol=1e-6)
    everywhere = torch.ones(3, dtype=torch.bool)  # all seen (or seen not given): cfg_salient acts nowhere
    assert torch.equal(G.generate_chunks(tiny, [P], cfg_local=0.0, cfg_salient=4.0)._shape_guidance(g, v, lat, t, everywhere), g)
    assert torch.equal(shape(cfg_local=0.0, cfg_salient=4.0), g)
    orth = shape(cfg_local=0.0, cfg_parallel=0.0)
    assert torch.allclose((orth * x1).sum(dim=(1, 2, 3)), torch.zeros(3), atol=1e-4)
    half = shape(cfg_local=0.0, cfg_parallel=0.5)
    assert torch.allclose(half, 0.5 * (g + orth), atol=1e-5)  # half of the part along x1 kept
    res = shape(cfg_local=0.0, cfg_rescale=1.0)
    assert torch.allclose((x1 + (1 - t) * res).std(dim=(1, 2, 3)), x1.std(dim=(1, 2, 3)), rtol=1e-4)
    assert not torch.allclose(res, g, atol=1e-3)


def test_guidance_shaping_in_the_stream(tiny, monkeypatch):
    """Shaping off (cfg_local 0, cfg_salient 0, cfg_parallel 1, cfg_rescale 0) leaves the stream bit for
    bit as without it (never called); on (cfg_local 2 and cfg_salient 2 are the defaults), it changes
    the video: cfg_local not the first chunk of a video from nothing, cfg_salient only that chunk (so
    never an image-to-video or a continuation); it acts only on ticks with guidance and only on the
    guidance (the model calls unchanged); bad values are refused."""
    kw = dict(n_chunks=3, steps=4, window=2, cfg_neg=0.0, seed=3)
    run = lambda **k: np.stack(list(G.generate_chunks(tiny, [P], **(kw | {"cfg_text": 2.0} | k))))  # noqa: E731
    plain = run(cfg_local=0.0, cfg_salient=0.0)
    calls = []
    shape = G.ChunkStream._shape_guidance
    monkeypatch.setattr(G.ChunkStream, "_shape_guidance", lambda self, *a: calls.append(1) or shape(self, *a))
    assert np.array_equal(run(cfg_local=0.0, cfg_salient=0.0), plain) and calls == []  # off: never called
    assert np.array_equal(run(cfg_local=0.0, cfg_salient=0.0, cfg_parallel=1.0, cfg_rescale=0.0), plain)
    local = run(cfg_local=2.0, cfg_salient=0.0)
    assert calls and not np.array_equal(local, plain) and np.array_equal(local, run(cfg_local=2.0, cfg_salient=0.0))
    # the first chunk of a video from nothing keeps plain guidance under cfg_local (nothing to keep yet)
    assert np.array_equal(local[0], plain[0]) and not np.array_equal(local[1:], plain[1:])
    salient = run(cfg_local=0.0, cfg_salient=2.0)  # ... and takes cfg_salient, which acts there only
    assert not np.array_equal(salient[0], plain[0])
    both = run()  # the defaults: cfg_salient 2 on the first chunk, cfg_local 2 on the others
    assert np.array_equal(both[0], salient[0]) and not np.array_equal(both, local)
    assert np.array_equal(run(cfg_salient=2.0, cfg_local=2.0), both)
    assert not np.array_equal(run(cfg_salient=4.0)[0], both[0])
    img = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    assert not np.array_equal(run(image=img)[0], run(cfg_local=0.0, image=img)[0])
    # from an image (or a prefix) every chunk has something before it: cfg_salient changes nothing
    assert np.array_equal(run(image=img, cfg_salient=4.0), run(image=img, cfg_salient=0.0))
    prefix = np.random.default_rng(2).integers(0, 256, (24, 64, 64, 3), dtype=np.uint8)
    assert np.array_equal(run(video=prefix, cfg_local=0.0, cfg_salient=4.0), run(video=prefix, cfg_local=0.0, cfg_salient=0.0))
    calls.clear()
    assert np.array_equal(run(cfg_local=2.0, cfg_text=0.0), run(cfg_text=0.0, cfg_local=0.0, cfg_salient=0.0))
    assert calls == []  # no guidance: nothing to shape
    s = G.generate_chunks(tiny, [P], **kw, cfg_text=2.0, cfg_rescale=0.5, cfg_parallel=0.5, cfg_local=0.0)
    list(s)
    ref = G.generate_chunks(tiny, [P], **kw, cfg_text=2.0)
    list(ref)
    assert s.model_calls == ref.model_calls
    for name, bad in (("cfg_local", -1.0), ("cfg_local", float("inf")), ("cfg_local", "2"), ("cfg_local", True),
                      ("cfg_salient", -0.5), ("cfg_salient", float("nan")), ("cfg_salient", "4"), ("cfg_salient", False),
                      ("cfg_parallel", 1.5), ("cfg_parallel", -0.1), ("cfg_rescale", 2.0), ("cfg_rescale", float("nan"))):
        with pytest.raises(ValueError, match=name):
            G.generate_chunks(tiny, [P], **{name: bad})


def test_decoder_context_is_the_chunk_before(tiny, monkeypatch):
    """A model whose decoder reads the chunk before (vae_context 1): each yielded chunk is decoded with
    the previous chunk's final latents (the first with none; a continuation's with the last prefix
    chunk's), and the stream equals decoding the whole video's latents at once."""
    from dataclasses import replace

    cfg = replace(tiny.cfg, vae_context=1)
    monkeypatch.setattr(tiny, "cfg", cfg)
    monkeypatch.setattr(tiny.vae, "cfg", cfg)
    calls = []
    decode = tiny.vae.decode
    monkeypatch.setattr(tiny.vae, "decode", lambda z, context=None: calls.append((z, context)) or decode(z, context))
    chunks = list(G.generate_chunks(tiny, [P], n_chunks=3, steps=3, window=2, cfg_neg=0.0, seed=1))
    assert calls[0][1] is None and all(torch.equal(c, z) for (z, _), (_, c) in zip(calls, calls[1:]))
    with torch.no_grad():
        whole = G.to_uint8(decode(torch.cat([z for z, _ in calls], 1))[0]).numpy()
    assert np.array_equal(np.concatenate(chunks), whole)
    calls.clear()
    prefix = np.concatenate(chunks[:2])
    list(G.generate_chunks(tiny, [P], n_chunks=1, steps=3, window=2, cfg_neg=0.0, seed=1, video=prefix))
    with torch.no_grad():
        last = tiny.vae.encode(torch.from_numpy(prefix[24:])[None])
    assert len(calls) == 1 and torch.equal(calls[0][1], last)


def test_time_grid_shift(tiny):
    g1, g3 = G.time_grid(6), G.time_grid(6, shift=3.0)
    assert g1[0] == g3[0] == 0 and g1[-1] == g3[-1] == 1 and bool((g3[1:] > g3[:-1]).all())
    assert bool((g3[1:-1] < g1[1:-1]).all())  # shift > 1: the steps crowd near the noise end (t = 0)
    for bad in (0, -1.0, float("inf"), "3"):
        with pytest.raises(ValueError, match="shift must be a finite number > 0"):
            G.generate_chunks(tiny, [P], shift=bad)


def test_prompt_expansion_and_file(tmp_path):
    assert G.expand_prompts([P, "the blue square falls"], 4) == [P, "the blue square falls", "the blue square falls",
                                                              "the blue square falls"]
    f = tmp_path / "p.json"
    f.write_text(json.dumps([{"chunks": 2, "prompt": P}, {"chunks": 1, "prompt": "the red circle moves left"}]))
    assert G.load_prompt_file(f) == [P, P, "the red circle moves left"]
    with pytest.raises(ValueError, match="closest known words: circle"):
        G.expand_prompts(["the red circel moves right"], 2)
    with pytest.raises(ValueError, match="number of chunks"):
        G.expand_prompts([P], 0)
    f.write_text('[{"chunks": 0, "prompt": "x"}]')
    with pytest.raises(ValueError, match="chunks must be an integer >= 1"):
        G.load_prompt_file(f)


def test_prompt_file_in_yaml(tmp_path, monkeypatch):
    """A .yaml / .yml prompt file holds the same list as the JSON one (block or flow style, strings for
    one chunk each); bad YAML, a YAML mapping and a missing PyYAML are clear errors."""
    pytest.importorskip("yaml")
    want = [P, P, "the red circle moves left", "the blue square falls"]
    f = tmp_path / "p.yaml"
    f.write_text(f"- {{chunks: 2, prompt: {P}}}\n- chunks: 1\n  prompt: the red circle moves left\n"
                 "- the blue square falls\n")
    assert G.load_prompt_file(f) == want
    g = tmp_path / "p.YML"
    g.write_text(f.read_text())
    assert G.load_prompt_file(g) == want
    j = tmp_path / "p.json"
    j.write_text(json.dumps([{"chunks": 2, "prompt": P}, {"prompt": "the red circle moves left"},
                             "the blue square falls"]))
    assert G.load_prompt_file(j) == want
    f.write_text("- {chunks: 2, prompt: [unclosed\n")
    with pytest.raises(ValueError, match="is not valid YAML"):
        G.load_prompt_file(f)
    f.write_text(f"chunks: 2\nprompt: {P}\n")
    with pytest.raises(ValueError, match="must hold a non-empty YAML list"):
        G.load_prompt_file(f)
    j.write_text("- {chunks: 2}")  # YAML in a .json file is read as JSON
    with pytest.raises(ValueError, match="is not valid JSON"):
        G.load_prompt_file(j)
    monkeypatch.setitem(sys.modules, "yaml", None)  # PyYAML not installed
    with pytest.raises(ValueError, match="needs PyYAML: pip install pyyaml"):
        G.load_prompt_file(g)


def test_api_input_errors(tiny):
    with pytest.raises(ValueError, match=r"image must be uint8 \[64, 64, 3\]"):
        G.generate_chunks(tiny, [P], image=np.zeros((32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="at least one chunk"):
        G.generate_chunks(tiny, [P], video=np.zeros((10, 64, 64, 3), np.uint8))
    with pytest.raises(ValueError, match="cfg_text"):
        G.generate_chunks(tiny, [P], cfg_text=-1)


def test_continuation_uses_prefix(tiny):
    prefix = np.random.default_rng(0).integers(0, 255, (50, 64, 64, 3), dtype=np.uint8)  # 2 whole chunks
    s = G.generate_chunks(tiny, [P], n_chunks=2, steps=2, window=2, attn_window=3, video=prefix, seed=0)
    out = list(s)
    assert len(out) == 2 and s.prefix_frames.shape == (48, 64, 64, 3)
    assert s.cache.pushes == 4  # 2 prefix chunks + 2 generated, each encoded once as clean
    plain = list(G.generate_chunks(tiny, [P], n_chunks=2, steps=2, window=2, attn_window=3, seed=0))
    assert not np.array_equal(out[0], plain[0])


# ------------------------------------------------------------------------ the shipped model


def psnr(a, b):
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10 * np.log10(255.0 ** 2 / max(mse, 1e-10))


def test_image_to_video_keeps_first_frame(small):
    model, meta = small
    from maskc.world_model import data as D

    img = D.generate(7, 1).frames[0]
    s = G.generate_chunks(model, ["the red circle moves right"], n_chunks=1, steps=6, image=img, seed=0, meta=meta)
    chunk = next(s)
    assert psnr(chunk[0], img) > 20


def test_small_model_defaults(small):
    model, meta = small
    s = G.generate_chunks(model, [P], n_chunks=2, steps=4, seed=0, meta=meta)
    assert s.attn_window == 4  # block-causal training over 4-chunk clips -> a window of 4 chunks
    out = list(s)
    assert len(out) == 2 and s.peak_cache_chunks <= 3


# ----------------------------------------------------------------------------------------- CLI


def test_cli_smoke(tmp_path, capsys):
    from PIL import Image

    # an mp4 (imageio-ffmpeg; without it a GIF beside the requested path), streamed chunk by chunk
    out = tmp_path / "out.mp4"
    rc = cli.main(["generate", "--prompt", P, "--prompt", "the red circle moves left", "--chunks", "2",
                   "--steps", "2", "--out", str(out), "--seed", "1", "--no-progress"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "generated 2 chunk(s)" in text and "wrote" in text
    if media._has_imageio_ffmpeg():
        assert "mp4" in text and out.is_file()
        frames = media.read_video(out)
        assert frames.shape == (48, 64, 64, 3) and frames.dtype == np.uint8
        # continuation of the mp4 just written, into a folder of PNG frames
        folder = tmp_path / "from_mp4"
        assert cli.main(["generate", "--prompt", P, "--chunks", "1", "--steps", "2", "--video", str(out),
                         "--out", str(folder), "--no-progress"]) == 0
        assert len(list(folder.glob("*.png"))) == 48 + 24
    else:
        assert "GIF" in text and (tmp_path / "out.gif").is_file()
    # a GIF, asked for by name (always available), and continuation of it into PNG frames
    gif = tmp_path / "clip.gif"
    assert cli.main(["generate", "--prompt", P, "--chunks", "2", "--steps", "2", "--out", str(gif), "--seed", "1",
                     "--no-progress"]) == 0
    with Image.open(gif) as im:
        assert im.n_frames == 48
    frames = tmp_path / "frames"
    assert cli.main(["generate", "--prompt", P, "--chunks", "1", "--steps", "2", "--video", str(gif),
                     "--out", str(frames), "--no-progress"]) == 0
    assert len(list(frames.glob("*.png"))) == 48 + 24  # prefix + one new chunk
    assert "PNG frames" in capsys.readouterr().out


def test_cli_prompts_from_yaml(tmp_path, capsys):
    """magi generate --prompts FILE.yaml: one chunk per prompt entry's count, the same video as --prompt."""
    pytest.importorskip("yaml")
    from PIL import Image

    f = tmp_path / "p.yaml"
    f.write_text(f"- {{chunks: 2, prompt: {P}}}\n- the red circle moves left\n")
    out, ref = tmp_path / "y.gif", tmp_path / "r.gif"
    assert cli.main(["generate", "--prompts", str(f), "--steps", "2", "--out", str(out), "--no-progress"]) == 0
    assert cli.main(["generate", "--prompt", P, "--prompt", P, "--prompt", "the red circle moves left", "--steps", "2",
                     "--out", str(ref), "--no-progress"]) == 0
    assert "generated 3 chunk(s)" in capsys.readouterr().out
    with Image.open(out) as im:
        assert im.n_frames == 3 * 24
    assert np.array_equal(media.read_video(out), media.read_video(ref))


def test_cli_negative_guidance(tmp_path, capsys):
    """--negative-prompt none on every chunk is --cfg-neg 0 (same transformer calls, same frames); the
    default negatives take more calls; an explicit negative is used."""
    import re

    def gen(*extra):
        out = tmp_path / f"v{len(list(tmp_path.iterdir()))}"
        assert cli.main(["generate", "--prompt", P, "--chunks", "2", "--steps", "2", "--out", str(out), "--seed", "3",
                         "--no-progress", *extra]) == 0
        calls = int(re.search(r"(\d+) transformer calls", capsys.readouterr().out).group(1))
        return calls, media.read_video(out)

    off, none, default = gen("--cfg-neg", "0"), gen("--negative-prompt", "none"), gen()
    assert none[0] == off[0] < default[0] and np.array_equal(none[1], off[1])
    other = gen("--negative-prompt", "the red circle stays still")
    assert other[0] == default[0] and not np.array_equal(other[1], default[1])
    # --eta 0: Euler steps (the same calls, other frames)
    euler = gen("--eta", "0")
    assert euler[0] == default[0] and not np.array_equal(euler[1], default[1])
    # --cfg-local 0: plain guidance (the same calls, other frames); 2 is the default
    plain = gen("--cfg-local", "0")
    assert plain[0] == default[0] and not np.array_equal(plain[1], default[1])
    assert np.array_equal(gen("--cfg-local", "2")[1], default[1])
    # --also: one more call per also prompt on the guided steps, other frames; --cfg-also 0 is none
    also = gen("--also", "the blue square falls")
    assert also[0] > default[0] and not np.array_equal(also[1], default[1])
    assert np.array_equal(gen("--also", "the blue square falls", "--cfg-also", "0")[1], default[1])
    # --cfg-prev 4 on each chunk's first latent frame is the default: one more call per tick with a chunk
    # cached than --cfg-prev 0; --cfg-prev-frames 0 (all) and 6 are the same video, another; a bad value is a
    # usage error
    no_prev = gen("--cfg-prev", "0")
    assert no_prev[0] < default[0] and not np.array_equal(no_prev[1], default[1])
    assert np.array_equal(gen("--cfg-prev", "4", "--cfg-prev-frames", "1")[1], default[1])
    every = gen("--cfg-prev-frames", "0")
    assert np.array_equal(gen("--cfg-prev-frames", "6")[1], every[1])
    assert every[0] == default[0] and not np.array_equal(every[1], default[1])
    with pytest.raises(SystemExit):
        gen("--cfg-prev", "2", "--cfg-prev-frames", "7")
    assert "cfg_prev_frames must be an integer in [0, 6]" in capsys.readouterr().err


def test_cli_pack_branches_and_device(tmp_path, capsys):
    """--pack-branches on: the guidance branches in one call per tick (printed), the same video up to
    rounding; --device cpu is the default here; --device cuda without a GPU is a usage error."""
    import re

    def gen(*extra):
        out = tmp_path / f"v{len(list(tmp_path.iterdir()))}.gif"
        assert cli.main(["generate", "--prompt", P, "--chunks", "2", "--steps", "3", "--out", str(out), "--seed", "4",
                         "--no-progress", *extra]) == 0
        return capsys.readouterr().out, media.read_video(out).astype(int)

    (text, default), (cpu, same) = gen(), gen("--device", "cpu", "--pack-branches", "off")
    assert "on the CPU" in text and "on the CPU" in cpu and np.array_equal(default, same)
    passes = int(re.search(r"\((\d+) transformer calls", text).group(1))
    packed_text, packed = gen("--pack-branches", "on")
    found = re.search(r"\((\d+) branch passes packed into (\d+) transformer calls", packed_text)
    assert found and int(found.group(1)) == passes > int(found.group(2))
    assert np.abs(packed - default).mean() < 0.05
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            gen("--device", "cuda")
        assert "torch sees no CUDA GPU" in capsys.readouterr().err


def test_cli_also_auto(tmp_path, capsys):
    """--also auto with --image: the stream's own also prompts (generate_chunks(also="auto")), frame for frame."""
    from PIL import Image

    from maskc.world_model import data
    from maskc.world_model import objects as O

    clip = data.generate(1, 1)
    Image.fromarray(clip.frames[0]).save(tmp_path / "first.png")
    subject = clip.captions[0]
    out = tmp_path / "auto"  # PNG frames: lossless
    assert cli.main(["generate", "--image", str(tmp_path / "first.png"), "--prompt", subject, "--chunks", "2",
                     "--steps", "2", "--window", "2", "--seed", "2", "--also", "auto", "--out", str(out),
                     "--no-progress"]) == 0
    found = [f"the {c} {s} (" for c, s in O.find_objects(clip.frames[0])]
    text = capsys.readouterr().out
    assert "--also auto: objects of the picture" in text and all(f in text for f in found)
    model, meta = G.load_model()
    want = np.concatenate(list(G.generate_chunks(model, [subject], n_chunks=2, steps=2, window=2, seed=2, meta=meta,
                                                 image=clip.frames[0], also="auto")))
    assert np.array_equal(media.read_video(out), want)


@pytest.mark.parametrize("argv, msg", [
    (["--prompt", "the red circel moves right"], "unknown word 'circel'"),
    (["--prompt", P, "--chunks", "0"], "--chunks must be >= 1"),
    (["--prompt", P, "--image", "/nonexistent/img.png"], "does not exist"),
    (["--prompt", P, "--image", "SMALLIMG"], "must be 64x64 RGB"),
    ([], "give at least one --prompt"),
    (["--prompt", P, "--shift", "0"], "--shift: must be a finite number > 0, got 0"),
    (["--prompt", P, "--cfg-interval", "0.5", "0.2"], "cfg_interval must satisfy 0 <= lo < hi <= 1"),
    (["--prompt", P, "--cfg-interval", "0.5"], "--cfg-interval: expected 2 arguments"),
    (["--prompt", P, "--cfg-run", "2"], "cfg_run=2.0 needs a model with caption runs"),
    (["--prompt", P, "--cfg-run", "-1"], "--cfg-run"),
    (["--prompt", P, "--cfg-neg", "-1"], "--cfg-neg: must be a finite number >= 0"),
    (["--prompt", P, "--eta", "1.5"], "--eta: must be a number in [0, 1], got 1.5"),
    (["--prompt", P, "--eta", "-0.2"], "--eta: must be a finite number >= 0"),
    (["--prompt", P, "--cfg-local", "-1"], "--cfg-local: must be a finite number >= 0"),
    (["--prompt", P, "--cfg-local", "inf"], "--cfg-local: must be a finite number >= 0"),
    (["--prompt", P, "--also", "the red circle falls"], "names that chunk's subject"),
    (["--prompt", P, "--also", "the blue sqare falls"], "unknown word 'sqare'"),
    (["--prompt", P, "--also", "the blue square falls", "--cfg-also", "-2"], "--cfg-also: must be a finite number >= 0"),
    (["--prompt", P, "--also", "auto"], "keeps the objects of the image or of the video prefix"),
    (["--prompt", P, "--also", "auto", "--also", "the blue square falls"], "give it alone, not with captions"),
    (["--prompt", P, "--negative-prompt", "the red circle bounces of the wall"], "unknown word 'of'"),
    (["--prompt", P, "--chunks", "1", "--negative-prompt", "none", "--negative-prompt", "none"],
     "2 negative prompts for 1 chunks"),
    (["--prompts", "BADYAML"], "is not valid YAML"),
    (["--prompt", P, "--pack-branches", "yes"], "--pack-branches: invalid choice: 'yes'"),
    (["--prompt", P, "--device", "tpu"], "--device: invalid choice: 'tpu'"),
    (["--prompt", P, "--cuda-graphs", "always"], "--cuda-graphs: invalid choice: 'always'"),
    (["--prompt", P, "--device", "cpu", "--cuda-graphs", "on"], "needs the model on a CUDA device"),
])
def test_cli_errors(tmp_path, capsys, argv, msg):
    from PIL import Image

    argv = [{"SMALLIMG": str(tmp_path / "s.png"), "BADYAML": str(tmp_path / "p.yaml")}.get(a, a) for a in argv]
    Image.fromarray(np.zeros((32, 48, 3), np.uint8)).save(tmp_path / "s.png")
    (tmp_path / "p.yaml").write_text("- {chunks: 2, prompt: [unclosed\n")
    with pytest.raises(SystemExit) as e:
        cli.main(["generate", "--out", str(tmp_path / "o.gif"), *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("magi generate: error:") and msg in err[-1]
