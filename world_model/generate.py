"""Streaming generation of the world model (``magi generate``), MAGI-1 style, CPU-first.

**Pipeline.** Chunks are denoised ``window`` at a time with staggered noise levels: every chunk
takes ``steps`` flow-matching steps (t = 0 noise -> t = 1 clean, the model predicts the velocity
``clean - noise``; stochastic steps by default, Euler steps on the ODE with ``eta`` 0), and chunk k
enters the pipeline ``stride = ceil(steps / window)`` ticks after chunk k-1. One *tick* is one
transformer call (per guidance branch) over all chunks in flight, each at its own t (earlier chunks
cleaner, as in training). When the oldest chunk reaches t = 1 it is final: it is run once more as
clean context (t = 1) to get its self-attention K/V, which go into a bounded ring buffer
(`RingKVCache`, at most ``attn_window - 1`` clean chunks, never more than the attention window),
and it is decoded by the autoencoder and yielded (a decoder with ``vae_context`` n also reads the
n chunks decoded before it, whose latents are kept; a causal one carries two frames per convolution
from chunk to chunk, `VideoVAE.decode_next`; one with ``vae_delay`` reads the next chunk's first
latent frames too, so it yields each chunk when the next is final and the last when the video
ends). Memory therefore does not grow with video length.
``ctx_t`` < 1 puts finished chunks into the cache noised back to that flow time instead of clean
(measured: no gain; docs/benchmarks.md).

**Stochastic steps.** ``eta`` > 0 replaces the Euler step by its stochastic form: from x_t and the
(guided) velocity v, the step predicts the clean latents x1 = x_t + (1 - t) v and the noise
x0 = x_t - t v, swaps a fraction of x0 for fresh noise, x0' = sqrt(1 - eta^2) x0 + eta eps, and
lands on x_t' = t' x1 + (1 - t') x0'. ``eta`` 0 is exactly the Euler step; 1 draws the whole noise
afresh at every step; the default 0.7 lets each step revise the layout that the noise so far
committed to (an object drawn at two candidate places is where duplicated objects came from;
measured: fewer duplicates and colour changes, smaller seams, prompt following unchanged, objects
vanish as often; docs/benchmarks.md). ``eta_interval`` (lo, hi): the flow times of a latent frame
at which its steps are stochastic (elsewhere Euler).

**Attention.** A sliding chunk window (``attn_window`` chunks, `masks.chunk_window_mask`): chunk c
sees chunks c - attn_window + 1 .. c (clean ones from the cache, noisier ones in flight). Default:
the training config's ``attn_window``, or -- for a model trained block-causally -- the longest
context it saw in training (``n_chunks`` of its train config).

**Guidance** (classifier-free, scales >= 0, 0 disables and skips that branch)::

    v = v_c + cfg_text * (v_c - v_null_text) + cfg_neg * (v_c - v_neg) + cfg_prev * (v_c - v_no_prev)
          + cfg_also * sum over the also prompts a of (v_a - v_null_text)

``v_null_text``: every chunk's caption replaced by `train.NULL_CAPTION`; ``v_neg``: every chunk's
caption replaced by its *negative prompts* (the mean over them), by default
`vocab.near_miss_captions`, what a chunk told to move must not become ("the red circle moves right"
-> "the red circle bounces off the right wall"; "moves down" -> "bounces off the floor", "falls");
chunks whose caption has none take no negative guidance; ``v_no_prev``: the clean
chunks in the KV cache dropped (the chunks in flight still see each other). Text and negative
guidance act inside ``cfg_interval`` only. A model with caption
runs may also take *run guidance*, ``+ cfg_run * (v_c - v_end)`` inside the text-guidance interval,
``v_end`` telling every caption that it ends at its chunk (runs cut to 1): it amplifies what a longer
run asks of a chunk (measured: slower first chunks, no better prompt following; docs/benchmarks.md).

**Also prompts** (none by default). A chunk's caption names one object; ``also`` can name the others,
one caption each ("the blue square falls"), and each adds ``cfg_also * (v_also - v_null_text)`` inside
``cfg_interval`` (composed guidance: the sum over the objects named, the null branch shared with text
guidance). Measured (docs/benchmarks.md, session 32): without them the objects a caption does not name
shrink chunk by chunk under text guidance, even guidance kept off their own pixels; told, they keep
their size, and with ``cfg_local`` 2 on the whole sum 16-chunk image-to-video persistence is 0.50
against 0.43 for ``cfg_local`` 2 alone and 0.36 for plain guidance (80 held-out videos), at 2 points of
prompt following of what was told against ``cfg_local`` 2 alone; without ``cfg_local`` they add copies.
From text (a video from nothing) they cost prompt following (0.854 against 0.935 on 96 direction-change
videos) and keep fewer objects: they are for image-to-video and continuation. ``also="auto"`` (with
an image or a prefix) finds them itself (`objects`): the objects of the picture by colour and shape,
and, each time a chunk is final, the motion each showed in it, told to the chunks after it (session 33
measured that a motion three chunks old keeps an object as well as the true one, where one made-up
motion for all or an object named without a motion does not). The chunks that take their guidance
before the first chunk is final are told nothing.

**Guidance shaping** (``cfg_local`` 2 by default since session 35, the others off). The sum g of the
text, run and negative terms above can be reshaped per latent frame before it is added to v_c:
``cfg_local`` G weights each latent position by (|g| / the frame's largest |g|) ** G, so guidance stays
where it is strong (on the object it moves) and fades elsewhere (except in the first chunk of a video
from nothing, which has no objects to keep yet); ``cfg_parallel`` P keeps only the fraction P of g's
part along the conditional clean prediction x1 = x_t + (1 - t) v_c (1: all of it; 0: only the orthogonal
part, after adaptive projected guidance); ``cfg_rescale`` R brings the guided clean prediction's
standard deviation back toward the conditional one's (the fraction R of the way). Measured
(docs/benchmarks.md, session 31): ``cfg_local`` 2 keeps objects over 16 image-to-video chunks better
(0.36 -> 0.43, fewer duplicated objects) and shrinks the seams, at a cost of 0.01-0.02 in prompt
following of direction changes on the weights of then; the other two gave no persistence. On session
34's weights (session 35) it costs no prompt following by the per-chunk rule (0.938 against 0.942 on 288
videos; 0.893 against 0.907 by the whole-video rule) and keeps more objects (0.449 -> 0.528), so it
became the default; ``cfg_local=0`` is the plain guidance of before.

**Guidance on what is drawn** (``cfg_salient`` S, 2 by default since session 39). In the first chunk of
a video from nothing, guidance has no object to act on: at the noisy end the conditional prediction is
a faint haze over every place the subject could be, and guidance amplified all of them into copies (the
subject drawn twice or more in 0.69 of the frames, `evaluate.subject_copies`; 0-0.33 in CPU probes with
no guidance, which then followed prompts far less). There, g is weighted per latent position by (d / the frame's
largest d) ** S, where d is how far the conditional clean prediction x1 stands out from its frame's mean
at that position: guidance acts where the model itself is drawing an object and fades where it draws
background, so it sharpens one subject instead of growing new ones. Measured (docs/benchmarks.md,
session 39): copies 0.69 -> 0.48 of the frames at the same prompt following (0.34 at S 4, which cost
prompt following). The chunks with something before them take ``cfg_local`` instead; image-to-video
and continuation have no such chunk.

**Conditioning.** One prompt per chunk (the last repeats); ``image`` (uint8 [64, 64, 3]) becomes
the clean first latent frame of chunk 0 (image-to-video, per-frame t as in training); ``video``
(uint8 [T, 64, 64, 3]) is a prefix to continue: its last whole chunks are encoded and put into the
cache, and generation continues after them. A model with caption runs (``caption_runs`` > 0) is
also told, per chunk, for how many chunks from it on the prompt list keeps that prompt
(`text.caption_runs`), so a chunk can leave room for what its prompt still asks of the next ones;
the prefix chunks and the unconditional branch are not told (run 0).

`generate_chunks` returns a `ChunkStream`: an iterator of decoded chunks (uint8 [24, 64, 64, 3]),
each computed only when asked for, with counters (``model_calls``, ``branch_passes``,
``peak_cache_chunks``) for tests and benchmarks.

**Packed branches.** A tick's guidance terms need the velocity of the same chunks under several
conditions (up to one branch per term). On a GPU they run as one transformer call over the branches'
tokens packed one after another (`DiT.forward_branches`): one maskc mask
(`masks.branch_window_mask`) keeps each branch to its own tokens and, but for the no-cache branch,
the KV cache, and one cross-attention mask gives each branch's chunks their own captions. A model this
small is bound by kernel launches there, so one call costs little more than one branch; and each call
is replayed from a CUDA graph of its layout (`graphs.GraphedBlocks`, ``cuda_graphs``), which leaves the
host one launch per call. 16 chunks on an H200: 31 frames/s one call per branch, 102 packed, 299 packed
and replayed (the same frames as packed, to the bit; docs/benchmarks.md, session 38).
"""

from __future__ import annotations

import inspect
import json
import math
import os
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from . import objects as O
from . import vocab
from .graphs import graphed_blocks
from .text import token_runs
from .train import NULL_CAPTION
from .vae import receptive_latent_frames, to_uint8

DEFAULT_STEPS = 30
DEFAULT_WINDOW = 4
# Sampler defaults, chosen on 48 held-out direction-change videos of 4 chunks (seeds 10-17, 20-27,
# 30-61; benchmarks/world_sampler_sweep.py, docs/benchmarks.md): strong text guidance at the high noise
# levels only, where the layout and the motion are decided, and 30 Euler steps. The shipped model
# follows the prompts in 0.755 of the 192 chunks with them, against 0.635 with the earlier defaults
# (20 steps, scale 2 at every noise level); leaving guidance off at high noise instead (interval
# (0.15, 1), seeds 10-17) drops it to 0.34. The unguided call is skipped on ticks where no chunk in
# flight is that noisy.
DEFAULT_CFG_TEXT = 6.0
DEFAULT_CFG_INTERVAL = (0.0, 0.3)  # flow times (0 noise, 1 clean) at which text and negative guidance act
# Guidance on the previous chunks (+ cfg_prev (v - v_without_the_cache)), on each chunk's first latent frame
# only, where it meets the chunk before: the chunk continues what the cache shows instead of redrawing it.
# 384 held-out direction-change videos on an H200 (seeds 2426-2809, session 37), paired: seams 1.210 with
# none, 1.119 at scale 2, 1.077 at scale 4 (-0.042 +- 0.002 against 2), prompt following 0.939 / 0.936 /
# 0.938; 102 16-chunk image-to-video videos: persistence 0.482 / 0.492 / 0.494, prompt following of what
# they were told 0.778 / 0.771 / 0.772. On every frame it costs image-to-video 10 points of that (session
# 36). One more transformer call per tick once a chunk is cached.
DEFAULT_CFG_PREV = 4.0
DEFAULT_CFG_PREV_FRAMES = 1
# Negative guidance away from each chunk's near-miss captions (a chunk told "moves right" is pushed
# away from "bounces off the right wall"), at the flow times of text guidance. Prompt following of the
# direction-change videos, 528 held-out videos (seeds 18-545) on an H100: 0.817 without it, 0.875 with
# it (+0.060 on the 264 of them run only after every choice; the bounce alone as the negative: 0.860 on
# the other 264, against 0.874); docs/benchmarks.md. It costs one more transformer call per negative
# (1-3) on the ticks where text guidance acts.
DEFAULT_CFG_NEG = 8.0
DEFAULT_SHIFT = 1.0  # time_grid's shift
# Also prompts (captions of the other objects, `also_prompts`): their guidance scale when given. Measured
# with --cfg-local 2 (docs/benchmarks.md, session 32).
DEFAULT_CFG_ALSO = 6.0
AUTO_ALSO = "auto"  # also="auto": the stream tells each object of the image / prefix what it last did (`objects`)
DEFAULT_CTX_T = 1.0  # flow time at which finished chunks enter the KV cache (1: clean)
CTX_NOISE_SEED = 7_919  # offset of the context-noise generator's seed from the video's
# Stochastic steps (``eta``, fraction of fresh noise per step; 0 is the Euler ODE step): chosen on 160
# direction-change videos (seeds 1530-1689) and 40 image-to-video runs of 16 chunks (seeds 58-97) on
# an H200 among 0.4-1.0 and stochastic only at low / high flow times, then checked on fresh seeds
# (1690-1945; 98-161): prompt following 0.918 -> 0.932 (paired +0.014 +- 0.012), seams 1.54 -> 1.39,
# 16-chunk object persistence 0.271 -> 0.349 (+0.078 +- 0.024); docs/benchmarks.md, session 30.
DEFAULT_ETA = 0.7
# Guidance kept where it is strong (``cfg_local``, the module's docstring): off by default until session 35,
# when on the shipped weights (session 34's) it kept prompt following of direction changes (288 fresh
# videos, seeds 1946-2233, H200: 0.938 against 0.942, paired -0.003 +- 0.007, within session 27's rule of
# -0.005 for a default) while 16-chunk image-to-video persistence rose 0.449 -> 0.528 (110 videos, paired
# +0.078 +- 0.022) and seams fell 1.39 -> 1.35; docs/benchmarks.md, session 35.
DEFAULT_CFG_LOCAL = 2.0
# Guidance on what the conditional prediction draws, in the first chunk of a video from nothing (``cfg_salient``,
# the module's docstring): 0 until session 39, when `evaluate.subject_copies` showed the subject drawn twice or
# more in 0.69 of the frames of 192 fresh direction-change videos (H200, seeds 3000-3191; the simulator: under
# 0.001). At 2: 0.48 (paired -0.215 +- 0.037) at the same prompt following (0.924 -> 0.922, -0.003 +- 0.017;
# whole-video rule 0.880 -> 0.896), seams 1.10 -> 1.08; on the CPU (32 videos, seeds 10-41) 0.66 -> 0.38, prompt
# following -0.023 +- 0.023. 4 removes more copies (0.34 on the H200) but cost prompt following on the CPU
# (-0.078 +- 0.044, the subject lost in 2 of 32 videos); image-to-video and continuation are unchanged (no such
# chunk); docs/benchmarks.md, session 39.
DEFAULT_CFG_SALIENT = 2.0
DEFAULT_ETA_INTERVAL = (0.0, 1.0)  # flow times at which the steps are stochastic
ETA_NOISE_SEED = 104_729  # offset of the stochastic steps' generator's seed from the video's
DEFAULT_WEIGHTS = Path(__file__).resolve().parent / "weights" / "small.safetensors"


# ----------------------------------------------------------------------------------- KV cache


class RingKVCache:
    """Per-layer self-attention K/V of the last ``capacity`` clean chunks, in preallocated storage.

    ``push`` overwrites the oldest chunk once full; ``kv()`` returns the chunks oldest first (what
    `masks.chunk_window_mask` expects). Storage is allocated once: its size never depends on the
    video length."""

    def __init__(self, depth: int, capacity: int, tokens_per_chunk: int):
        self.depth, self.capacity, self.tpc = depth, int(capacity), tokens_per_chunk
        self._k: list[torch.Tensor] | None = None
        self._v: list[torch.Tensor] | None = None
        self.size = 0  # chunks held
        self._next = 0  # slot the next push writes
        self.peak = 0
        self.pushes = 0

    def __len__(self) -> int:
        return self.size

    def push(self, kv: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.pushes += 1
        if self.capacity == 0:
            return
        if len(kv) != self.depth:
            raise ValueError(f"expected K/V of {self.depth} layers, got {len(kv)}")
        if self._k is None:
            k0 = kv[0][0]
            shape = (self.capacity, self.tpc, *k0.shape[1:])
            self._k = [torch.empty(shape, dtype=k0.dtype, device=k0.device) for _ in range(self.depth)]
            self._v = [torch.empty(shape, dtype=k0.dtype, device=k0.device) for _ in range(self.depth)]
        for layer, (k, v) in enumerate(kv):
            if k.shape[0] != self.tpc:
                raise ValueError(f"push one chunk ({self.tpc} tokens) at a time, got {k.shape[0]}")
            self._k[layer][self._next] = k.detach()
            self._v[layer][self._next] = v.detach()
        self._next = (self._next + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)
        self.peak = max(self.peak, self.size)

    def _order(self) -> list[int]:
        start = (self._next - self.size) % self.capacity
        return [(start + i) % self.capacity for i in range(self.size)]

    def kv(self) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """Per-layer (k, v) [size * tokens_per_chunk, kv_heads, head_dim], oldest chunk first; None if empty."""
        if self.size == 0:
            return None
        idx = torch.tensor(self._order(), device=self._k[0].device)
        return [(k.index_select(0, idx).flatten(0, 1), v.index_select(0, idx).flatten(0, 1))
                for k, v in zip(self._k, self._v)]

    def nbytes(self) -> int:
        if self._k is None:
            return 0
        return sum(t.numel() * t.element_size() for t in self._k + self._v)


# ------------------------------------------------------------------------------- conditioning


def _per_chunk(entries: list, n_chunks: int, what: str) -> list:
    """``entries`` as one per chunk: the last repeats up to ``n_chunks``; at least one, at most one per chunk."""
    if not entries:
        raise ValueError(f"give at least one {what}")
    if len(entries) > n_chunks:
        raise ValueError(f"{len(entries)} {what}s for {n_chunks} chunks; give at most one {what} per chunk")
    return entries + [entries[-1]] * (n_chunks - len(entries))


def expand_prompts(prompts: Sequence[str] | str, n_chunks: int) -> list[str]:
    """One prompt per chunk: the list as given, the last one repeated up to ``n_chunks``.

    Validates every prompt against the vocabulary (unknown words raise ValueError with suggestions)."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    n_chunks = _count(n_chunks, "the number of chunks")
    for p in prompts:
        vocab.encode(p)  # raises on unknown words
    return _per_chunk(prompts, n_chunks, "prompt")


def negative_prompts(prompts: Sequence[str], negative=None) -> list[tuple[str, ...]]:
    """The negative prompts of each chunk of ``prompts``, as a tuple per chunk (empty: no negative guidance).

    ``negative`` None: each prompt's `vocab.near_miss_captions` ("moves right" -> "bounces off the
    right wall"; "moves down" -> "bounces off the floor" and "falls"; none for the other motions).
    A string or a list: as for prompts, one entry per chunk, the last one repeating; an entry is a
    caption, None (no negative for that chunk) or a tuple of captions (their velocities are
    averaged). Validated against the vocabulary."""
    if negative is None:
        return [vocab.near_miss_captions(p) for p in prompts]
    return _caption_tuples(negative, len(prompts), "negative prompt", "or None for the automatic ones")


def _caption_tuples(entries, n_chunks: int, what: str, hint: str) -> list[tuple[str, ...]]:
    """``entries`` (a caption, or a list with one entry per chunk, the last repeating; an entry is a caption,
    None or a tuple of captions) as a tuple of captions per chunk, validated against the vocabulary."""
    entries = [entries] if isinstance(entries, str) else list(entries)
    if not entries:
        raise ValueError(f"{what}s: give at least one ({hint})")
    out = []
    for q in entries:
        qs = () if q is None else (q,) if isinstance(q, str) else tuple(q) if isinstance(q, (tuple, list)) else None
        if qs is None or not all(isinstance(x, str) for x in qs):
            raise ValueError(f"each {what} must be a caption string, None or a tuple of captions, got {q!r}")
        for x in qs:
            vocab.encode(x)  # raises on unknown words
        out.append(qs)
    return _per_chunk(out, n_chunks, what)


def also_prompts(prompts: Sequence[str], also=None) -> list[tuple[str, ...]]:
    """The *also prompts* of each chunk: captions of the other objects in the scene (what each does
    during that chunk), as a tuple per chunk (empty: none). ``also`` None: none anywhere; otherwise as
    for negative prompts (a caption, or one entry per chunk, the last repeating; an entry is a caption,
    None or a tuple). Each must follow the caption grammar and name an object other than its chunk's
    prompt's subject (the subject's own motion is the prompt's)."""
    if also is None:
        return [()] * len(prompts)
    out = _caption_tuples(also, len(prompts), "also prompt", "or None for none")
    for k, (p, qs) in enumerate(zip(prompts, out)):
        subject = vocab.parse_caption(p).subject
        for q in qs:
            if vocab.parse_caption(q).subject == subject:
                raise ValueError(f"also prompt {q!r} of chunk {k} names that chunk's subject ({' '.join(subject)}, "
                                 f"prompt {p!r}); also prompts describe the other objects")
    return out


YAML_SUFFIXES = (".yaml", ".yml")


def load_prompt_file(path: str | os.PathLike) -> list[str]:
    """Per-chunk prompts from a JSON or YAML file (by its suffix: ``.yaml`` / ``.yml`` is YAML, anything
    else JSON): a list of ``{"chunks": n, "prompt": "..."}`` entries (or of strings, one chunk each).
    In YAML::

        - {chunks: 2, prompt: the red circle moves right}
        - chunks: 2
          prompt: the red circle moves left
    """
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"prompt file {str(p)!r} does not exist")
    kind = "YAML" if p.suffix.lower() in YAML_SUFFIXES else "JSON"
    if kind == "YAML":
        try:
            import yaml
        except ImportError:
            raise ValueError(f"prompt file {str(p)!r} is YAML, which needs PyYAML: pip install pyyaml "
                             "(the world extra installs it), or write the file as JSON") from None
        try:
            spec = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise ValueError(f"prompt file {str(p)!r} is not valid YAML: {e}") from None
    else:
        try:
            spec = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"prompt file {str(p)!r} is not valid JSON: {e}") from None
    if not isinstance(spec, list) or not spec:
        raise ValueError(f"prompt file {str(p)!r} must hold a non-empty {kind} list of "
                         '{"chunks": n, "prompt": "..."} entries')
    out = []
    for i, e in enumerate(spec):
        if isinstance(e, str):
            e = {"chunks": 1, "prompt": e}
        if not isinstance(e, dict) or set(e) - {"chunks", "prompt"} or "prompt" not in e:
            raise ValueError(f"prompt file {str(p)!r}: entry {i} must be {{\"chunks\": n, \"prompt\": \"...\"}}, got {e!r}")
        n = e.get("chunks", 1)
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"prompt file {str(p)!r}: entry {i}: chunks must be an integer >= 1, got {n!r}")
        if not isinstance(e["prompt"], str):
            raise ValueError(f"prompt file {str(p)!r}: entry {i}: prompt must be a string")
        out += [e["prompt"]] * n
    return out


def _count(v, what: str, minimum: int = 1) -> int:
    if isinstance(v, bool) or not hasattr(v, "__index__") or int(v) < minimum:
        raise ValueError(f"{what} must be an integer >= {minimum}, got {v!r}")
    return int(v)


def _check_frames(a, what: str, cfg, video: bool) -> torch.Tensor:
    a = np.asarray(a)
    want = "[T, {0}, {0}, 3]" if video else "[{0}, {0}, 3]"
    want = want.format(cfg.frame_size)
    nd = 4 if video else 3
    if a.dtype != np.uint8 or a.ndim != nd or a.shape[-3:] != (cfg.frame_size, cfg.frame_size, 3):
        raise ValueError(f"{what} must be uint8 {want} (RGB, {cfg.frame_size}x{cfg.frame_size}), "
                         f"got {a.dtype} {list(a.shape)}")
    return torch.from_numpy(np.require(a, requirements=["C", "W"]))  # a copy only if read-only or strided


def default_attn_window(meta: dict | None, window: int) -> int:
    tc = (meta or {}).get("train_config") or {}
    if tc.get("attn_window"):
        return int(tc["attn_window"])
    return int(tc.get("n_chunks") or window)


# --------------------------------------------------------------------------------- the stream


def _interval(pair, what: str) -> tuple[float, float]:
    """A pair (lo, hi) of flow times with 0 <= lo < hi <= 1 (ValueError naming ``what`` otherwise)."""
    try:
        lo, hi = (float(v) for v in pair)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a pair (lo, hi) of flow times, got {pair!r}") from None
    if not 0.0 <= lo < hi <= 1.0:
        raise ValueError(f"{what} must satisfy 0 <= lo < hi <= 1 (flow time: 0 noise, 1 clean), got {pair!r}")
    return lo, hi


def time_grid(steps: int, shift: float = 1.0) -> torch.Tensor:
    """Flow times t_0 = 0 < ... < t_steps = 1; ``shift > 1`` spends more steps near the noise end."""
    u = torch.linspace(0, 1, steps + 1, dtype=torch.float64)
    return (u / (u + shift * (1 - u))).float()


class ChunkStream:
    """Iterator of decoded chunks (uint8 numpy [chunk_frames, H, W, 3]); see `generate_chunks`."""

    def __init__(self, model, prompts, *, steps, window, attn_window, cfg_text, cfg_prev, image, video, seed,
                 shift, meta, cfg_interval=DEFAULT_CFG_INTERVAL, runs=None, cfg_run=0.0, negative=None,
                 cfg_neg=DEFAULT_CFG_NEG, ctx_t=DEFAULT_CTX_T, keep_latents=False, eta=DEFAULT_ETA,
                 eta_interval=DEFAULT_ETA_INTERVAL, cfg_rescale=0.0, cfg_parallel=1.0, cfg_local=DEFAULT_CFG_LOCAL,
                 also=None, cfg_also=DEFAULT_CFG_ALSO, cfg_prev_frames=DEFAULT_CFG_PREV_FRAMES, pack_branches=None,
                 cuda_graphs=None, cfg_salient=DEFAULT_CFG_SALIENT):
        cfg = model.cfg
        self.model, self.cfg = model, cfg
        self.n_chunks = len(prompts)
        self.prompts = prompts
        if runs is None:  # each chunk's caption run over the whole prompt list (0 for a model without runs)
            runs = token_runs(vocab.encode_batch(list(prompts)), cfg.caption_runs) if cfg.caption_runs \
                else [0] * len(prompts)
        runs = list(runs)
        if len(runs) != len(prompts) or not all(isinstance(r, int) and not isinstance(r, bool)
                                                and 0 <= r <= cfg.caption_runs for r in runs):
            raise ValueError(f"runs must give one integer in [0, {cfg.caption_runs}] (this model's caption_runs; "
                             f"0 = not told) per chunk ({len(prompts)}), got {runs!r}")
        self.runs = runs
        self.steps = _count(steps, "steps")
        self.window = _count(window, "window (chunks in flight)")
        if attn_window is None:
            attn_window = default_attn_window(meta, self.window)
        self.attn_window = _count(attn_window, "attn_window")
        for name, s in (("cfg_text", cfg_text), ("cfg_prev", cfg_prev), ("cfg_run", cfg_run), ("cfg_neg", cfg_neg),
                        ("cfg_also", cfg_also)):
            if not (isinstance(s, (int, float)) and math.isfinite(s) and s >= 0):
                raise ValueError(f"{name} must be a number >= 0 (0 disables it), got {s!r}")
        self.cfg_text, self.cfg_prev, self.cfg_run = float(cfg_text), float(cfg_prev), float(cfg_run)
        if isinstance(cfg_prev_frames, bool) or not isinstance(cfg_prev_frames, int) \
                or not 0 <= cfg_prev_frames <= cfg.latent_frames:
            raise ValueError(f"cfg_prev_frames must be an integer in [0, {cfg.latent_frames}] (each chunk's first latent "
                             f"frames that take guidance on the previous chunks; 0: all), got {cfg_prev_frames!r}")
        self.cfg_prev_frames = cfg_prev_frames
        if pack_branches is not None and not isinstance(pack_branches, bool):
            raise ValueError(f"pack_branches must be True, False or None (None: packed on a GPU), got {pack_branches!r}")
        cuda = self._device().type == "cuda"
        self.pack_branches = cuda if pack_branches is None else pack_branches
        if cuda_graphs is not None and not isinstance(cuda_graphs, bool):
            raise ValueError(f"cuda_graphs must be True, False or None (None: with packed branches on a GPU), "
                             f"got {cuda_graphs!r}")
        if cuda_graphs and not (cuda and self.pack_branches):
            raise ValueError("cuda_graphs replays the packed transformer call from CUDA graphs: it needs the model on "
                             f"a CUDA device (it is on {self._device()}) and pack_branches")
        use_graphs = cuda and self.pack_branches if cuda_graphs is None else cuda_graphs
        self.graphs = graphed_blocks(model) if use_graphs else None
        self.cfg_neg, self.cfg_also = float(cfg_neg), float(cfg_also)
        if not (isinstance(ctx_t, (int, float)) and 0.0 < ctx_t <= 1.0):
            raise ValueError(f"ctx_t must be a flow time in (0, 1] (1: finished chunks are clean context), got {ctx_t!r}")
        self.ctx_t = float(ctx_t)
        if isinstance(eta, bool) or not (isinstance(eta, (int, float)) and 0.0 <= eta <= 1.0):
            raise ValueError(f"eta must be a number in [0, 1] (the fraction of fresh noise per step; 0: Euler), got {eta!r}")
        self.eta = float(eta)
        self.eta_interval = _interval(eta_interval, "eta_interval")
        for name, s in (("cfg_rescale", cfg_rescale), ("cfg_parallel", cfg_parallel)):
            if isinstance(s, bool) or not (isinstance(s, (int, float)) and 0.0 <= s <= 1.0):
                raise ValueError(f"{name} must be a number in [0, 1], got {s!r}")
        for name, s in (("cfg_local", cfg_local), ("cfg_salient", cfg_salient)):  # weight exponents
            if isinstance(s, bool) or not (isinstance(s, (int, float)) and math.isfinite(s) and s >= 0):
                raise ValueError(f"{name} must be a finite number >= 0 (0: guidance everywhere as it is), got {s!r}")
        self.cfg_rescale, self.cfg_parallel = float(cfg_rescale), float(cfg_parallel)
        self.cfg_local, self.cfg_salient = float(cfg_local), float(cfg_salient)
        self.negative = negative_prompts(prompts, negative)
        self.auto_also = isinstance(also, str) and also == AUTO_ALSO
        if self.auto_also and image is None and video is None:
            raise ValueError(f"also={AUTO_ALSO!r} keeps the objects of the image or of the video prefix; a video from "
                             "text has none given (name them with also prompts instead)")
        # auto: none until the stream has seen the objects move (`_watch`)
        self.also = [()] * len(prompts) if self.auto_also else also_prompts(prompts, also)
        self.objects: tuple = ()  # with also="auto": the (colour, shape) of every object of the image or prefix
        self.motions: dict = {}  # ... and the motion each one last showed in a finished chunk
        if self.cfg_run > 0 and not cfg.caption_runs:
            raise ValueError(f"cfg_run={cfg_run!r} needs a model with caption runs (this one has caption_runs 0)")
        self.cfg_interval = _interval(cfg_interval, "cfg_interval")
        if image is not None and video is not None:
            raise ValueError("give either an image (image-to-video) or a video prefix (continuation), not both")
        self.image = None if image is None else _check_frames(image, "image", cfg, video=False)
        self.video = None if video is None else _check_frames(video, "video", cfg, video=True)
        if self.video is not None and self.video.shape[0] < cfg.chunk_frames:
            raise ValueError(f"the video prefix has {self.video.shape[0]} frames; continuation needs at least "
                             f"one chunk of {cfg.chunk_frames}")
        self.seed = int(seed)
        if not (isinstance(shift, (int, float)) and math.isfinite(shift) and shift > 0):
            raise ValueError(f"shift must be a finite number > 0 (1: uniform steps, > 1: more near the noise), got {shift!r}")
        self.shift = float(shift)
        self.stride = max(1, math.ceil(self.steps / self.window))
        self.cache = RingKVCache(cfg.depth, self.attn_window - 1, cfg.tokens_per_chunk)
        if self.graphs is not None:  # the graphs' buffers, once, for this stream's largest call
            most = (1 + 1 + max(map(len, self.also), default=0) + (self.cfg_run > 0)
                    + max(map(len, self.negative), default=0) + (self.cfg_prev > 0))  # cond, null, ..., no cache
            if self.auto_also:  # the objects it finds, one colour each at most
                most += len(vocab.COLOURS)
            rows = most * self.window * cfg.tokens_per_chunk
            self.graphs.reserve(rows, most * self.window * cfg.max_caption_tokens,
                                self.cache.capacity * cfg.tokens_per_chunk, self._device())
        self.model_calls = 0  # transformer calls (a packed call of several branches counts once)
        self.branch_passes = 0  # passes of the chunks in flight through the transformer (every branch, clean passes)
        self.ticks = 0
        self.prefix_frames: np.ndarray | None = None  # the prefix frames continued (whole chunks)
        self.in_flight_peak = 0
        # every final chunk's latents, if asked for (the video's latents grow with its length)
        self.latents: list[torch.Tensor] | None = [] if keep_latents else None
        self._it = self._run()

    def __iter__(self) -> Iterator[np.ndarray]:
        return self

    def __next__(self) -> np.ndarray:
        return next(self._it)

    @property
    def peak_cache_chunks(self) -> int:
        return self.cache.peak

    # ---- helpers
    def _device(self):
        return next(self.model.dit.parameters()).device

    def _dtype(self):
        return next(self.model.dit.parameters()).dtype

    def _dit(self, latents, t_frames, text, lens, offset, past_kv, return_kv=False):
        self.model_calls += 1
        self.branch_passes += 1
        return self.model.dit(latents, t_frames, text, lens, chunk_offsets=(offset,), window=self.attn_window,
                              past_kv=past_kv, return_kv=return_kv)

    def _velocities(self, lat, tf, calls, offset, past) -> list[torch.Tensor]:
        """The velocity of every branch ``(text, lens, sees_cache)`` of the chunks in flight: one packed
        transformer call (`DiT.forward_branches`) with ``pack_branches`` (replayed from a CUDA graph with
        ``cuda_graphs``, a single branch too), else one call each."""
        if self.pack_branches and (len(calls) > 1 or self.graphs is not None):
            self.model_calls += 1
            self.branch_passes += len(calls)
            return self.model.dit.forward_branches(lat, tf, calls, offset, self.attn_window, past, blocks=self.graphs)
        return [self._dit(lat, tf, t, n, offset, past if sees else None) for t, n, sees in calls]

    def _text(self, prompts, runs):
        key = (tuple(prompts), tuple(runs))
        if key not in self._text_cache:
            if len(self._text_cache) > 64:
                self._text_cache.clear()
            self._text_cache[key] = self.model.encode_captions(list(prompts), list(runs))
        return self._text_cache[key]

    def _add_clean(self, latents_chunk, index, prompt, run, ctx_t=1.0):
        """Run one final chunk as context (clean, or noised back to flow time ``ctx_t`` < 1) and push its
        K/V into the ring buffer."""
        if self.cache.capacity == 0:
            self.cache.push([])
            return
        text, lens = self._text([prompt], [run])
        t = torch.full((self.cfg.latent_frames,), ctx_t)
        if ctx_t < 1.0:  # x_t = t x_1 + (1 - t) x_0, own generator: the chunks' noise is unchanged
            noise = torch.randn(latents_chunk.shape, generator=self._ctx_gen).to(latents_chunk)
            latents_chunk = ctx_t * latents_chunk + (1.0 - ctx_t) * noise
        _, kv = self._dit(latents_chunk, t, text, lens, index, self.cache.kv(), return_kv=True)
        self.cache.push(kv)

    def _decode(self, latents_chunk) -> list[np.ndarray]:
        """The chunks of frames a final chunk completes: its own, or with a decoder of ``vae_delay`` the
        chunk before (none for the first; `_decode_end` gives the last). A decoder with ``vae_context``
        n also reads the n chunks decoded before it, a causal one carries its state from the chunk
        before (`VideoVAE.decode_next`)."""
        if self.latents is not None:
            self.latents.append(latents_chunk.cpu())
        if self.cfg.vae_causal:
            if self._decoder_past is None:  # the first chunk, or the first after a prefix: its past
                self._decoder_past = {}
                if self._last_latents is not None:
                    self.model.vae.prime(self._last_latents, self._decoder_past)
            return self._split(self.model.vae.decode_next(latents_chunk[None], self._decoder_past)[0])
        frames = self.model.vae.decode(latents_chunk[None], context=self._last_latents)[0]
        n = self.cfg.vae_context * self.cfg.latent_frames  # latents kept for the next chunk: memory stays constant
        kept = latents_chunk[None] if self._last_latents is None else torch.cat([self._last_latents, latents_chunk[None]], 1)
        self._last_latents = kept[:, -n:] if n else None
        return [to_uint8(frames).cpu().numpy()]

    def _decode_end(self) -> list[np.ndarray]:
        """The chunk a decoder of ``vae_delay`` still holds when the video ends (none otherwise)."""
        if self._decoder_past is None:  # not a causal decoder's stream, or nothing decoded
            return []
        return self._split(self.model.vae.decode_end(self._decoder_past)[0])

    def _split(self, frames) -> list[np.ndarray]:
        """float [k * chunk_frames, H, W, 3] frames in [0, 1] -> k uint8 numpy chunks."""
        frames = to_uint8(frames).cpu().numpy()
        cf = self.cfg.chunk_frames
        return [frames[i:i + cf] for i in range(0, frames.shape[0], cf)]

    def _watch(self, frames: np.ndarray, first: int) -> None:
        """``also="auto"``: read each object's motion from a final chunk's frames (an object not seen keeps
        its last motion) and tell the chunks from ``first`` on the captions of those their prompt does not
        name (`objects.keep_captions`)."""
        self.motions.update(O.chunk_motions(frames, self.objects))
        for k in range(first, self.n_chunks):
            self.also[k] = O.keep_captions(self.motions, self.prompts[k])

    def _shape_guidance(self, g, v, lat, t, seen=None):
        """The text / run / negative guidance ``g`` (added to the conditional velocity ``v``) reshaped per
        latent frame by ``cfg_salient``, ``cfg_local``, ``cfg_parallel`` and ``cfg_rescale`` (all off: ``g``
        as it is). ``seen`` (bool per latent frame, default all): the frames whose chunk has something
        before it to keep (an image, a prefix, earlier chunks), best on the host (seeing whether any is
        not costs no device sync there); ``cfg_local`` acts on those only, ``cfg_salient`` on the others
        (the first chunk of a video from nothing)."""
        on_seen = None if seen is None else seen.to(g.device).reshape(-1, 1, 1, 1)
        salient = self.cfg_salient > 0 and seen is not None and not bool(seen.all())
        if salient or self.cfg_parallel != 1.0 or self.cfg_rescale > 0:
            x1 = lat + (1.0 - t) * v  # the clean latents the conditional velocity points at [F, h, w, C]
        if salient:  # on what the conditional draws
            d = (x1 - x1.mean(dim=(1, 2), keepdim=True)).norm(dim=-1, keepdim=True)  # how far each stands out
            w = (d / d.amax(dim=(1, 2), keepdim=True).clamp_min(1e-12)) ** self.cfg_salient
            g = g * torch.where(on_seen, torch.ones_like(w), w)
        if self.cfg_local > 0:  # keep it where it is strong: weight (|g| / max |g|) ** cfg_local per position
            n = g.norm(dim=-1, keepdim=True)
            w = (n / n.amax(dim=(1, 2), keepdim=True).clamp_min(1e-12)) ** self.cfg_local
            g = g * (w if seen is None else torch.where(on_seen, w, torch.ones_like(w)))
        if self.cfg_parallel != 1.0:  # the part of g along x1 (it scales the frame up or down) weighted
            par = (g * x1).sum(dim=(1, 2, 3), keepdim=True) / (x1 * x1).sum(dim=(1, 2, 3), keepdim=True).clamp_min(1e-12)
            g = g - (1.0 - self.cfg_parallel) * par * x1
        if self.cfg_rescale > 0:  # the guided clean prediction brought back toward the conditional's std
            span = (1.0 - t).clamp_min(1e-3)  # x1 moves by (1 - t) g
            x1g = x1 + span * g
            ratio = x1.std(dim=(1, 2, 3), keepdim=True) / x1g.std(dim=(1, 2, 3), keepdim=True).clamp_min(1e-12)
            x1s = self.cfg_rescale * ratio * x1g + (1.0 - self.cfg_rescale) * x1g
            g = (x1s - x1) / span
        return g

    def _step(self, lat, v, t_cur, t_nxt):
        """One step of every latent frame from flow time ``t_cur`` to ``t_nxt`` along velocity ``v``."""
        if self.eta == 0.0:
            return lat + (t_nxt - t_cur) * v  # Euler
        x1 = lat + (1.0 - t_cur) * v  # the clean latents this velocity points at
        x0 = lat - t_cur * v  # ... and the noise it came from
        eps = torch.randn(lat.shape, generator=self._eta_gen).to(lat)
        lo, hi = self.eta_interval
        eta = self.eta * ((t_cur >= lo) & (t_cur <= hi)).to(lat)  # per latent frame
        x0 = torch.sqrt(1.0 - eta ** 2) * x0 + eta * eps
        return t_nxt * x1 + (1.0 - t_nxt) * x0

    # ---- the pipeline
    @torch.no_grad()
    def _run(self) -> Iterator[np.ndarray]:
        cfg, model = self.cfg, self.model
        dev, dt = self._device(), self._dtype()
        lf, pt = cfg.latent_frames, cfg.patch_t
        shape = (lf, cfg.latent_size, cfg.latent_size, cfg.latent_channels)
        self._text_cache = {}
        self._last_latents = None
        self._decoder_past: dict | None = None
        gen = torch.Generator().manual_seed(self.seed)
        self._ctx_gen = torch.Generator().manual_seed(self.seed + CTX_NOISE_SEED)
        self._eta_gen = torch.Generator().manual_seed(self.seed + ETA_NOISE_SEED)
        grid = time_grid(self.steps, self.shift)
        # guidance on the previous chunks per latent frame of a chunk: cfg_prev on the first cfg_prev_frames,
        # 0 on the others (made once, on the device); None: cfg_prev on all
        prev_scale = (self.cfg_prev * (torch.arange(lf) < self.cfg_prev_frames)).to(dev, dt) \
            if self.cfg_prev_frames else None

        base = 0  # absolute index of the first generated chunk
        if self.video is not None:
            n_pre = self.video.shape[0] // cfg.chunk_frames
            frames = self.video[self.video.shape[0] - n_pre * cfg.chunk_frames:]
            self.prefix_frames = frames.numpy()
            keep = min(n_pre, self.cache.capacity)
            for i in range(n_pre - keep, n_pre):
                clip = frames[i * cfg.chunk_frames:(i + 1) * cfg.chunk_frames].to(dev)
                z = model.vae.encode(clip[None])[0].to(dt)  # uint8 in: the autoencoder scales it to [0, 1]
                self._add_clean(z, i, self.prompts[0], 0)  # a prefix chunk: its run is not known
            if cfg.vae_context or cfg.vae_causal:  # the decoder's context: the prefix's last chunks
                reach = math.ceil(receptive_latent_frames(cfg) / lf) if cfg.vae_causal else cfg.vae_context
                ctx = min(n_pre, reach) * cfg.chunk_frames
                self._last_latents = model.vae.encode(frames[frames.shape[0] - ctx:][None].to(dev)).to(dt)
            base = n_pre
            if self.auto_also:
                self.objects = O.find_objects(self.prefix_frames[-1])
                self._watch(self.prefix_frames[-cfg.chunk_frames:], 0)

        image_latent = None
        if self.image is not None:
            if self.auto_also:
                self.objects = O.find_objects(self.image.numpy())
            still = self.image[None, None].expand(1, cfg.chunk_frames, *self.image.shape).to(dev)
            image_latent = model.vae.encode(still)[0, :pt].to(dt)

        n = self.n_chunks
        x: dict[int, torch.Tensor] = {}  # latents of the chunks in flight
        null_prompt = NULL_CAPTION
        next_out = 0
        tick = 0
        while next_out < n:
            first = next_out
            last = min(n, tick // self.stride + 1)  # chunks [first, last) have started
            for k in range(first, last):
                if k not in x:
                    z = torch.randn(shape, generator=gen).to(dev, dt)
                    if k == 0 and image_latent is not None:
                        z[:pt] = image_latent
                    x[k] = z
            active = list(range(first, last))
            self.in_flight_peak = max(self.in_flight_peak, len(active))
            local = [tick - k * self.stride for k in active]
            t_cur = torch.stack([grid[s].repeat(lf) for s in local])  # [A, lf]
            t_nxt = torch.stack([grid[s + 1].repeat(lf) for s in local])
            if image_latent is not None and active[0] == 0:
                t_cur[0, :pt] = 1.0
                t_nxt[0, :pt] = 1.0
            lat = torch.cat([x[k] for k in active])
            tf = t_cur.reshape(-1)
            prompts = self.prompts[first:last]
            text, lens = self._text(prompts, self.runs[first:last])
            past = self.cache.kv()
            off = base + first
            # the branches this tick needs, (text, lens, sees the cache) each, decided on the host: 0 is the
            # conditional; then the guidance terms' (the null text, also prompts, run ends, negatives, no cache)
            calls = [(text, lens, True)]

            def branch(t, l, sees_cache=True) -> int:
                calls.append((t, l, sees_cache))
                return len(calls) - 1

            lo, hi = self.cfg_interval
            on = (tf >= lo) & (tf <= hi)  # text guidance only inside its noise interval (host: no device sync)
            guiding = bool(on.any())  # some latent frame in flight takes text / also / run / negative guidance
            text_on = self.cfg_text > 0 and guiding
            also = self.also[first:last]
            also_branches = max(len(q) for q in also) if self.cfg_also > 0 and guiding else 0
            i_null = None
            if text_on or also_branches:  # the null branch, shared by text and also guidance
                i_null = branch(*self._text([null_prompt] * len(active), [0] * len(active)))
            # also branch b tells each chunk its b-th also prompt (not its run); a chunk with fewer keeps its prompt
            i_also = [branch(*self._text([q[b] if b < len(q) else p for q, p in zip(also, prompts)], [0] * len(active)))
                      for b in range(also_branches)]
            i_end = None
            if self.cfg_run > 0 and guiding:
                runs = self.runs[first:last]
                run_ends = [min(r, 1) for r in runs]  # each caption told it ends at its chunk
                if run_ends != runs:
                    i_end = branch(*self._text(prompts, run_ends))
            neg = self.negative[first:last]
            n_neg = max(len(q) for q in neg) if self.cfg_neg > 0 and guiding else 0
            # negative branch b tells each chunk its b-th negative (its last one when it has fewer; a chunk
            # without any keeps its own prompt)
            i_neg = [branch(*self._text([q[min(b, len(q) - 1)] if q else p for q, p in zip(neg, prompts)],
                                        self.runs[first:last])) for b in range(n_neg)]
            i_np = branch(text, lens, False) if self.cfg_prev > 0 and past is not None else None
            vs = self._velocities(lat, tf, calls, off, past)

            v = vs[0]
            guided = v
            if text_on:
                scale = (self.cfg_text * on).to(dev, dt).reshape(-1, 1, 1, 1)  # per latent frame
                guided = guided + scale * (v - vs[i_null])
            for b, i in enumerate(i_also):  # + cfg_also (v_b - v_null) for every object named, composed as the sum
                has = torch.tensor([b < len(q) for q in also]).repeat_interleave(lf)
                scale = (self.cfg_also * on * has).to(dev, dt).reshape(-1, 1, 1, 1)
                guided = guided + scale * (vs[i] - vs[i_null])
            if i_end is not None:
                scale = (self.cfg_run * on).to(dev, dt).reshape(-1, 1, 1, 1)
                guided = guided + scale * (v - vs[i_end])
            if i_neg:  # v_neg: the mean over the negative branches; a chunk without negatives gets scale 0
                v_neg = 0
                for i in i_neg:
                    v_neg = v_neg + vs[i] / len(i_neg)
                has = torch.tensor([bool(q) for q in neg]).repeat_interleave(lf)
                scale = (self.cfg_neg * on * has).to(dev, dt).reshape(-1, 1, 1, 1)
                guided = guided + scale * (v - v_neg)
            # the first chunk of a video from nothing (no image, no prefix) has no objects to keep yet
            seen = [base + k > 0 or image_latent is not None for k in active]
            if guided is not v and (self.cfg_local > 0 or self.cfg_parallel != 1.0 or self.cfg_rescale > 0
                                    or (self.cfg_salient > 0 and not all(seen))):
                guided = v + self._shape_guidance(guided - v, v, lat, t_cur.reshape(-1, 1, 1, 1).to(dev, dt),
                                                  torch.tensor(seen).repeat_interleave(lf))
            if i_np is not None:
                scale = self.cfg_prev
                if prev_scale is not None:  # each chunk's first latent frames only, where it meets the chunk before
                    scale = prev_scale.repeat(len(active)).reshape(-1, 1, 1, 1)
                guided = guided + scale * (v - vs[i_np])
            lat = self._step(lat, guided, t_cur.reshape(-1, 1, 1, 1).to(dev, dt), t_nxt.reshape(-1, 1, 1, 1).to(dev, dt))
            for j, k in enumerate(active):
                x[k] = lat[j * lf:(j + 1) * lf]
            tick += 1
            self.ticks = tick
            if local[0] + 1 == self.steps:  # the oldest chunk is final
                done = x.pop(first)
                self._add_clean(done, base + first, self.prompts[first], self.runs[first], self.ctx_t)
                next_out += 1
                for frames in self._decode(done):  # with a decoder's delay: the chunk before
                    if self.auto_also:
                        self._watch(frames, next_out)
                    yield frames
        for frames in self._decode_end():
            yield frames


def generate_chunks(model, prompts_per_chunk: Sequence[str] | str, *, n_chunks: int | None = None,
                    steps: int = DEFAULT_STEPS, window: int = DEFAULT_WINDOW, attn_window: int | None = None,
                    cfg_text: float = DEFAULT_CFG_TEXT, cfg_prev: float = DEFAULT_CFG_PREV, image=None, video=None,
                    seed: int = 0, shift: float = DEFAULT_SHIFT, meta: dict | None = None,
                    cfg_interval: tuple[float, float] = DEFAULT_CFG_INTERVAL,
                    runs: Sequence[int] | None = None, cfg_run: float = 0.0,
                    negative=None, cfg_neg: float = DEFAULT_CFG_NEG, ctx_t: float = DEFAULT_CTX_T,
                    keep_latents: bool = False, eta: float = DEFAULT_ETA,
                    eta_interval: tuple[float, float] = DEFAULT_ETA_INTERVAL, cfg_rescale: float = 0.0,
                    cfg_parallel: float = 1.0, cfg_local: float = DEFAULT_CFG_LOCAL, also=None,
                    cfg_also: float = DEFAULT_CFG_ALSO, cfg_prev_frames: int = DEFAULT_CFG_PREV_FRAMES,
                    pack_branches: bool | None = None, cuda_graphs: bool | None = None,
                    cfg_salient: float = DEFAULT_CFG_SALIENT) -> ChunkStream:
    """Stream a video chunk by chunk: an iterator of uint8 [chunk_frames, H, W, 3] chunks, each as soon
    as its frames are final (with a decoder that reads ahead, ``vae_delay`` > 0 as the shipped one,
    a chunk once the next chunk's latents are final, and the last when the video ends).

    ``model``: a `WorldModel` (e.g. from `checkpoint.load_checkpoint`, whose ``meta`` gives the
    default ``attn_window``); ``prompts_per_chunk``: one prompt per chunk (a string, or a list whose
    last entry repeats up to ``n_chunks``; default ``n_chunks`` = the list's length). ``steps``: sampler
    steps per chunk; ``window``: chunks in flight; ``attn_window``: sliding chunk window of
    attention (default: from ``meta``'s train config); ``cfg_text`` / ``cfg_prev``: guidance scales
    (0 disables); ``cfg_interval``: the flow times (lo, hi) at which text guidance is applied (a latent
    frame outside it takes the plain conditional velocity); ``image`` uint8 [64, 64, 3]: image-to-video; ``video`` uint8 [T, 64, 64, 3]: a
    prefix to continue; ``seed``: the noise; ``runs``: for a model with caption runs, each chunk's
    run to tell it instead of the one counted from the prompts (e.g. when later prompts are not known
    yet: 0 = not told); ``cfg_run``: run guidance for such a model (0 = off; see the module's
    docstring); ``negative``: negative prompts, one entry per chunk as for the prompts (a caption, a
    tuple of captions, or None: none for that chunk; default: each prompt's
    `vocab.near_miss_captions`); ``cfg_neg``: their guidance scale (0 disables); ``ctx_t``: the flow
    time at which finished chunks enter the KV cache (1: clean, the default; less: noised back to it
    from a generator of its own). ``keep_latents``: the stream's ``latents`` collects every final
    chunk's latents (on the CPU; memory then grows with the video), e.g. to decode the same video
    with another decoder. ``eta``: the fraction of fresh noise per step (0: Euler steps; default
    0.7; see the module's docstring) at the flow times ``eta_interval``. ``cfg_local`` (>= 0; default
    2, 0 turns it off), ``cfg_salient`` (>= 0; default 2, 0 turns it off; the first chunk of a video
    from nothing), ``cfg_parallel`` and ``cfg_rescale`` (in [0, 1]; off at 1 and 0): guidance
    shaping (the module's docstring). ``also``: *also prompts*, captions of the other objects in the
    scene per chunk (as ``negative``: a caption, or one entry per chunk, each a caption, None or a tuple; `also_prompts`), each
    adding ``cfg_also`` (v_also - v_null) inside ``cfg_interval`` (composed guidance: every object named
    is kept in the picture; one more transformer call per also prompt on the guided ticks); ``"auto"``
    (with ``image`` or ``video``): the stream tells every object of the picture but the one each prompt
    names the motion it showed in the latest final chunk (`objects`; the stream's ``objects`` and
    ``motions`` say what it found). ``cfg_prev_frames`` n > 0: guidance on the previous chunks acts on
    each chunk's first n latent frames only, where it meets the chunk before (0: on all; default 1).
    ``pack_branches``: run a tick's guidance branches (conditional, null text, negatives, no cache, ...) as
    one packed transformer call (`DiT.forward_branches`, one maskc mask keeping each branch to its own
    tokens) instead of one call each: the same velocities up to rounding, fewer launches (a GPU's win; on
    the CPU the dense attention pays for the packed mask's empty blocks); default None: packed on a GPU.
    ``cuda_graphs``: replay each packed call from a CUDA graph of its layout (`graphs.GraphedBlocks`, kept
    on the model); default None: on a GPU with packed branches. Nothing is computed until the first
    chunk is asked for.
    """
    if isinstance(prompts_per_chunk, str):
        prompts_per_chunk = [prompts_per_chunk]
    if n_chunks is None:
        n_chunks = len(prompts_per_chunk)
    prompts = expand_prompts(prompts_per_chunk, n_chunks)
    if meta is None:
        meta = getattr(model, "meta", None)
    return ChunkStream(model, prompts, steps=steps, window=window, attn_window=attn_window, cfg_text=cfg_text,
                       cfg_prev=cfg_prev, image=image, video=video, seed=seed, shift=shift, meta=meta,
                       cfg_interval=cfg_interval, runs=runs, cfg_run=cfg_run, negative=negative, cfg_neg=cfg_neg,
                       ctx_t=ctx_t, keep_latents=keep_latents, eta=eta, eta_interval=eta_interval,
                       cfg_rescale=cfg_rescale, cfg_parallel=cfg_parallel, cfg_local=cfg_local, also=also,
                       cfg_also=cfg_also, cfg_prev_frames=cfg_prev_frames, pack_branches=pack_branches,
                       cuda_graphs=cuda_graphs, cfg_salient=cfg_salient)


# generate_chunks' keyword defaults, read once at import (a wrapper patched over the name later, as tests do,
# does not change what they were)
_GENERATE_DEFAULTS = {k: p.default for k, p in inspect.signature(generate_chunks).parameters.items()}


def sampler_defaults() -> dict:
    """`generate_chunks`' default sampler settings by keyword (JSON-able), for records that say "the
    defaults": what those were when the record was made (they have changed: eta in session 30,
    cfg_local in session 35, cfg_prev and cfg_prev_frames in session 37, cfg_salient in session 39)."""
    keep = ("steps", "window", "cfg_text", "cfg_prev", "cfg_prev_frames", "cfg_interval", "shift", "cfg_run", "cfg_neg", "ctx_t", "eta",
            "eta_interval", "cfg_rescale", "cfg_parallel", "cfg_local", "cfg_also", "cfg_salient")
    return {k: list(v) if isinstance(v := _GENERATE_DEFAULTS[k], tuple) else v for k in keep}


def load_model(weights: str | os.PathLike | None = None, device: str = "cpu"):
    """``(model, meta)`` from a checkpoint (default: the shipped small model), in eval mode."""
    from .checkpoint import load_checkpoint

    path = DEFAULT_WEIGHTS if weights is None else Path(weights)
    model, _, meta = load_checkpoint(path, device=device)
    model.eval()
    model.meta = meta
    return model, meta

