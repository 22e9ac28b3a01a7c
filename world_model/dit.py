"""The diffusion transformer of the world model (MAGI-1 style) and its flow-matching loss.

Tokens: each latent frame (or group of ``patch_t`` latent frames) is cut into ``patch_s`` x
``patch_s`` patches; tokens are time-major, so chunk c of a sample is one contiguous range of
``tokens_per_chunk`` tokens. Several samples of different lengths are packed one after another.

A block (MAGI-1's choices)::

    g_sa, g_ca, g_mlp = tanh(Linear(t_emb))              # per-token gates from the chunk's own t
    x = x + g_sa  * post(self_attn(pre(x)))               # block-causal, 3D RoPE, QK-norm, GQA
    x = x + g_ca  * post(cross_attn(pre(x), captions))    # chunk c sees caption c only
    x = x + g_mlp * post(mlp(pre(x)))

``pre``/``post`` are RMSNorms (sandwich norm) with no timestep-dependent shift or scale: the
timestep enters only through the tanh-capped output gates. Attention goes through `attend`
(the maskc FFA kernels on the GPU, float32 attention under the mask's dense form on the CPU) with
maskc masks from `world_model.masks`. With ``cp`` (`world_model.parallel.CPContext`) the forward runs one
context-parallel rank's share of the packed sequence: self-attention through maskc's
`dist_attention`, everything else on the rank's own tokens.

Flow matching: ``x_t = t * x_clean + (1 - t) * noise`` (t = 0 noise, t = 1 clean); the model
predicts the velocity ``x_clean - noise``; every chunk carries its own t.
"""

from __future__ import annotations

import functools
import math
from collections import OrderedDict
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from maskc import Mask
from maskc.runtime import attention

from . import masks
from .configs import ModelConfig
from .text import TextEncoder, pack_text, tokenize
from .vae import VideoVAE

KERNEL_HEAD_DIMS = (64, 128, 256)


# --------------------------------------------------------------------------------- attention


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask) -> torch.Tensor:
    """Masked attention in the packed layout (q [sq, hq, d], k/v [sk, hkv, d]) -> [sq, hq, d], q's dtype.

    The FFA kernels (`maskc.runtime.attention`, bf16/fp16) on a GPU with a supported head dim;
    otherwise `dense_attention` (the CPU, or any head dim): the mask's dense form as a score bias, in
    float32 (float64 for float64 inputs). A row with no allowed key gives 0, as in
    both kernels and `maskc.runtime.reference_attention`, the float64 reference the tests hold them to."""
    if q.device.type == "cuda" and q.shape[-1] in KERNEL_HEAD_DIMS:
        dt = q.dtype if q.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
        return attention(q.to(dt), k.to(dt), v.to(dt), mask).to(q.dtype)
    return dense_attention(q, k, v, mask)


def keep_attention_eager() -> None:
    """Have torch.compile'd blocks call `attend` eagerly (it plans on the host and launches a custom kernel):
    wraps it, once, in `torch.compiler.disable`. `train.compile_for_training` calls this; importing the model
    does not, because the wrapper imports torch._dynamo, which generation never needs (about 1 s of a fresh
    process's start, 5 s where Python cannot cache torch's bytecode)."""
    global attend
    if not getattr(attend, "_torchdynamo_disable", False):
        attend = torch.compiler.disable(attend)


# (mask, device) -> (score bias [sq, sk]: 0 allowed / -inf not, has_key [sq, 1, 1]), the least recently used
# dropped first: a tick's few masks stay (every layer reads them), and the memory they take does not grow
# with the number of masks a video meets (a 384 x 672 bias is 1 MB)
_DENSE: OrderedDict = OrderedDict()
_MAX_DENSE = 8
_MAX_DENSE_ENTRIES = 2 ** 20  # a larger mask's bias (over 4 MB: a training batch's) is made per call, not kept


def _dense_bias(mask: Mask, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The mask as an additive float32 score bias on ``device``, cached (`_DENSE`). A row without keys
    gets bias 0 everywhere (finite values and gradients; its output is then set to 0)."""
    key = (mask, str(device))
    hit = _DENSE.get(key)
    if hit is not None:
        _DENSE.move_to_end(key)
        return hit
    allowed = torch.as_tensor(mask.to_dense(), device=device)
    has_key = allowed.any(-1)
    bias = torch.zeros(allowed.shape, device=device).masked_fill_(~(allowed | ~has_key[:, None]), float("-inf"))
    hit = (bias, has_key[:, None, None])
    if bias.numel() > _MAX_DENSE_ENTRIES:
        return hit
    while len(_DENSE) >= _MAX_DENSE:
        _DENSE.popitem(last=False)
    _DENSE[key] = hit
    return hit


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Mask) -> torch.Tensor:
    """`attend` without the kernels: softmax(q k^T / sqrt(d) + bias) v per head (GQA) under the mask's
    dense score bias, float32 (float64 inputs stay float64), differentiable; q's dtype out. On the CPU
    this is 2.5x the float64 reference's speed in the world model's calls."""
    bias, has_key = _dense_bias(mask, q.device)
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    group = q.shape[1] // k.shape[1]
    qh = q.to(dt).transpose(0, 1) * q.shape[-1] ** -0.5  # [hq, sq, d]
    kh = k.to(dt).transpose(0, 1).repeat_interleave(group, 0)  # [hq, sk, d]
    vh = v.to(dt).transpose(0, 1).repeat_interleave(group, 0)
    p = torch.softmax(torch.baddbmm(bias.to(dt), qh, kh.transpose(1, 2)), -1)
    o = torch.bmm(p, vh).transpose(0, 1)
    return torch.where(has_key, o, torch.zeros((), dtype=dt, device=o.device)).to(q.dtype)


# ----------------------------------------------------------------------------- token layout


def patchify(latents: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """Latent frames [F, h, w, C] -> tokens [F/pt * h/ps * w/ps, pt*ps*ps*C], time-major."""
    f, h, w, c = latents.shape
    pt, ps = cfg.patch_t, cfg.patch_s
    x = latents.reshape(f // pt, pt, h // ps, ps, w // ps, ps, c).permute(0, 2, 4, 1, 3, 5, 6)
    return x.reshape(-1, cfg.patch_dim)


def unpatchify(tokens: torch.Tensor, n_frames: int, cfg: ModelConfig) -> torch.Tensor:
    """Inverse of `patchify`: tokens -> latent frames [n_frames, h, w, C]."""
    pt, ps, c = cfg.patch_t, cfg.patch_s, cfg.latent_channels
    g = cfg.latent_size // ps
    x = tokens.reshape(n_frames // pt, g, g, pt, ps, ps, c).permute(0, 3, 1, 4, 2, 5, 6)
    return x.reshape(n_frames, g * ps, g * ps, c)


def positions(video_chunks: Sequence[int], chunk_offsets: Sequence[int], cfg: ModelConfig) -> torch.Tensor:
    """Position ids [S, 3] = (absolute latent frame, patch row, patch column) of every token.

    Sample i's first chunk is chunk ``chunk_offsets[i]`` of its video, so a chunk keeps its time
    position whether it is processed with the whole clip or streamed alone."""
    g = torch.arange(cfg.latent_size // cfg.patch_s)
    yy, xx = (a.reshape(-1) for a in torch.meshgrid(g, g, indexing="ij"))
    # token-frame groups per sample, then each group's absolute latent frame (vectorised: a
    # packed 1M-token batch has thousands of samples)
    per_chunk = cfg.latent_frames // cfg.patch_t
    n = torch.as_tensor(list(video_chunks), dtype=torch.long) * per_chunk
    off = torch.as_tensor(list(chunk_offsets), dtype=torch.long) * cfg.latent_frames
    start = torch.cumsum(n, 0) - n
    sample = torch.repeat_interleave(torch.arange(n.numel()), n)
    frames = off[sample] + (torch.arange(int(n.sum())) - start[sample]) * cfg.patch_t
    tt = frames.repeat_interleave(len(yy))
    return torch.stack([tt, yy.repeat(frames.numel()), xx.repeat(frames.numel())], 1)


def frame_times(t: torch.Tensor, n_chunks: int, cfg: ModelConfig) -> torch.Tensor:
    """Flow time per latent frame [F] from t per chunk [n_chunks] (or already per frame [F]).

    Per-frame times serve image-to-video (a clean first latent frame); with ``patch_t > 1`` they
    must be constant within each patch."""
    t = torch.as_tensor(t, dtype=torch.float32).reshape(-1)
    n_frames = n_chunks * cfg.latent_frames
    if t.numel() == n_chunks:
        return t.repeat_interleave(cfg.latent_frames)
    if t.numel() != n_frames:
        raise ValueError(f"t must have one value per chunk ({n_chunks}) or per latent frame ({n_frames}), got {t.numel()}")
    groups = t.reshape(-1, cfg.patch_t)
    if not torch.equal(groups, groups[:, :1].expand_as(groups)):
        raise ValueError(f"per-frame t must be constant within each patch of patch_t={cfg.patch_t} frames")
    return t


def token_times(t_frames: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """Flow time per token [S] from flow time per latent frame [F]."""
    return t_frames[:: cfg.patch_t].repeat_interleave(cfg.tokens_per_frame)


# ----------------------------------------------------------------------------------- 3D RoPE


def rope_angles(pos: torch.Tensor, cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [S, head_dim/2] (float32): axis a rotates ``rope_split[a]`` dims of each head."""
    parts = []
    for axis, d in enumerate(cfg.rope_split):
        freqs = cfg.rope_base ** (-torch.arange(0, d, 2, dtype=torch.float32, device=pos.device) / d)
        parts.append(pos[:, axis, None].float() * freqs)
    ang = torch.cat(parts, -1)
    return ang.cos(), ang.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (i, i + d/2) of every head of x [S, H, d] by the token's angles."""
    cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)
    x1, x2 = x.chunk(2, -1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1)


# ------------------------------------------------------------------------------------ layers


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of t * 1000 -> MLP -> SiLU (what the gate projections read)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.freq_dim = cfg.t_dim
        self.mlp = nn.Sequential(nn.Linear(cfg.t_dim, cfg.t_dim), nn.SiLU(), nn.Linear(cfg.t_dim, cfg.t_dim), nn.SiLU())

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        ang = 1000.0 * t.float()[:, None] * freqs
        dtype = self.mlp[0].weight.dtype
        return self.mlp(torch.cat([ang.cos(), ang.sin()], -1).to(dtype))


class SelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.heads, self.kv_heads, self.hd = cfg.heads, cfg.kv_heads, cfg.head_dim
        self.q = nn.Linear(cfg.dim, cfg.heads * cfg.head_dim, bias=False)
        self.kv = nn.Linear(cfg.dim, 2 * cfg.kv_heads * cfg.head_dim, bias=False)
        self.q_norm, self.k_norm = nn.RMSNorm(cfg.head_dim), nn.RMSNorm(cfg.head_dim)
        self.proj = nn.Linear(cfg.heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x, rope, mask, past_kv=None):
        """Returns the output and this call's (k, v) [S, kv_heads, head_dim] (after norm and RoPE).

        mask: a maskc `Mask`, or a context-parallel `CPContext` (x holds the rank's tokens; its
        ``attend`` runs `dist_attention` over the plan's packed mask)."""
        s = x.shape[0]
        q = apply_rope(self.q_norm(self.q(x).view(s, self.heads, self.hd)), *rope)
        k, v = self.kv(x).view(s, 2, self.kv_heads, self.hd).unbind(1)
        k = apply_rope(self.k_norm(k), *rope)
        kv = (k, v)
        if past_kv is not None:
            k, v = torch.cat([past_kv[0], k]), torch.cat([past_kv[1], v])
        o = attend(q, k, v, mask) if isinstance(mask, Mask) else mask.attend(q, k, v)
        return self.proj(o.reshape(s, -1)), kv


class CrossAttention(nn.Module):
    """Video tokens attend to packed caption tokens (no RoPE), QK-norm, GQA."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.heads, self.kv_heads, self.hd = cfg.heads, cfg.kv_heads, cfg.head_dim
        self.q = nn.Linear(cfg.dim, cfg.heads * cfg.head_dim, bias=False)
        self.kv = nn.Linear(cfg.text_dim, 2 * cfg.kv_heads * cfg.head_dim, bias=False)
        self.q_norm, self.k_norm = nn.RMSNorm(cfg.head_dim), nn.RMSNorm(cfg.head_dim)
        self.proj = nn.Linear(cfg.heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x, text, mask):
        s, n = x.shape[0], text.shape[0]
        if n == 0:  # no caption tokens at all: nothing to attend to
            return torch.zeros_like(x)
        q = self.q_norm(self.q(x).view(s, self.heads, self.hd))
        k, v = self.kv(text.to(x.dtype)).view(n, 2, self.kv_heads, self.hd).unbind(1)
        return self.proj(attend(q, self.k_norm(k), v, mask).reshape(s, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = int(cfg.dim * cfg.mlp_ratio)
        self.fc, self.proj = nn.Linear(cfg.dim, hidden, bias=False), nn.Linear(hidden, cfg.dim, bias=False)

    def forward(self, x):
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gates = nn.Linear(cfg.t_dim, 3 * cfg.dim)  # zero-initialised: the block starts as identity
        self.self_attn, self.cross_attn, self.mlp = SelfAttention(cfg), CrossAttention(cfg), MLP(cfg)
        self.pre = nn.ModuleList(nn.RMSNorm(cfg.dim) for _ in range(3))
        self.post = nn.ModuleList(nn.RMSNorm(cfg.dim) for _ in range(3))

    def forward(self, x, t_emb, rope, text, self_mask, cross_mask, past_kv=None):
        g_sa, g_ca, g_mlp = torch.tanh(self.gates(t_emb)).chunk(3, -1)
        h, kv = self.self_attn(self.pre[0](x), rope, self_mask, past_kv)
        x = x + g_sa * self.post[0](h)
        x = x + g_ca * self.post[1](self.cross_attn(self.pre[1](x), text, cross_mask))
        x = x + g_mlp * self.post[2](self.mlp(self.pre[2](x)))
        return x, kv


# ---------------------------------------------------------------------------------- the model


class DiT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Linear(cfg.patch_dim, cfg.dim)
        self.t_embed = TimestepEmbedder(cfg)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm_out = nn.RMSNorm(cfg.dim)
        self.out = nn.Linear(cfg.dim, cfg.patch_dim)
        self.apply(_init_linear)
        for b in self.blocks:
            nn.init.zeros_(b.gates.weight)
            nn.init.zeros_(b.gates.bias)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, latents, t, text, caption_lengths, video_chunks=None, chunk_offsets=None,
                window=None, past_kv=None, return_kv=False, cp=None):
        """Velocity [F, h, w, C] for packed noisy latent frames ``latents`` [F, h, w, C].

        t: flow time per chunk [n_chunks] (or per latent frame [F]); text: packed caption tokens
        [sum(caption_lengths), text_dim], one caption per chunk in chunk order (`pack_text`);
        video_chunks: chunks per packed sample (default: one sample); chunk_offsets: absolute
        index of each sample's first chunk (default 0; required with ``past_kv``); window: the
        sliding chunk window (None = block-causal). past_kv: per-layer (k, v) of the cached
        chunks that precede the new ones (one sample only); return_kv: also return the per-layer
        (k, v) of this call's tokens, to cache.

        cp: a `world_model.parallel.CPContext` (`make_cp_context` of the same ``video_chunks``
        and ``window``): context parallelism. ``latents``, ``t`` and ``text`` are still the whole
        packed batch (the same on every rank), but only the rank's tokens (``cp.plan.positions``)
        go through the network and the result is their velocity *tokens* [n_local, patch_dim], in
        local order (not unpatchified). Every rank of the group must make the same call.
        """
        cfg = self.cfg
        video_chunks, chunk_offsets = self._layout(latents, video_chunks, chunk_offsets, past_kv)
        n_frames, n_chunks = latents.shape[0], sum(video_chunks)
        tpc = cfg.tokens_per_chunk
        if cp is not None:
            if past_kv is not None or return_kv:
                raise ValueError("cp: context parallelism runs whole packed sequences (training); "
                                 "past_kv and return_kv are not supported with it")
            if not cp.matches(video_chunks, tpc, window):
                raise ValueError(
                    f"cp: the context-parallel plan is for another self-attention mask ({cp.plan.mask.sq} tokens) "
                    f"than this batch's ({n_chunks * tpc} tokens, video_chunks={video_chunks}, window={window}); "
                    "build it with make_cp_context(video_chunks, cfg, ..., window=window) of this batch")
            # the rank's rows of the cross mask, built once per batch layout (a 1M-token batch has
            # thousands of captions)
            self_mask, cross_mask = cp, cp.cross_rows(video_chunks, tpc, caption_lengths)
        elif past_kv is None:
            self_mask = masks.self_attention_mask(video_chunks, tpc, window)
            cross_mask = masks.cross_attention_mask(video_chunks, tpc, caption_lengths)
        else:
            self_mask = masks.chunk_window_mask(past_kv[0][0].shape[0] // tpc, n_chunks, tpc, window)
            cross_mask = masks.cross_attention_mask(video_chunks, tpc, caption_lengths)
        if cross_mask.sk != text.shape[0]:
            raise ValueError(f"text has {text.shape[0]} tokens but caption_lengths sum to {cross_mask.sk}")

        x = patchify(latents, cfg)
        t_tok = token_times(frame_times(t, n_chunks, cfg).to(x.device), cfg)
        if cp is not None:
            idx = cp.index(x.device)
            x, t_tok = x.index_select(0, idx), t_tok.index_select(0, idx)
            pos = cp.local_positions(video_chunks, chunk_offsets, cfg, x.device)
        else:
            pos = positions(video_chunks, chunk_offsets, cfg).to(x.device)
        v, new_kv = self._blocks(x, t_tok, pos, text, self_mask, cross_mask, past_kv)
        if cp is not None:
            return v
        v = unpatchify(v, n_frames, cfg)
        return (v, new_kv) if return_kv else v

    def forward_branches(self, latents, t, branches, chunk_offset: int = 0, window=None, past_kv=None, blocks=None):
        """Velocities [F, h, w, C] of several guidance branches of the same noisy chunks, in one call.

        branches: per branch ``(text, caption_lengths, sees_cache)``: its packed captions (one per
        chunk, as in `forward`) and whether it attends to ``past_kv`` (False: as if nothing were
        cached). The branches' tokens are packed one after another and `masks.branch_window_mask`
        keeps each to its own tokens (and the cache where it sees it), so branch b's velocity is
        ``forward(latents, t, text_b, lens_b, chunk_offsets=(chunk_offset,), window=window,
        past_kv=past_kv if sees_cache_b else None)`` up to rounding: one call instead of B, which is
        what a small model on a GPU is bound by. ``blocks``: what runs the network on the packed
        inputs (default `_blocks`; `world_model.graphs.GraphedBlocks` replays CUDA graphs of it)."""
        inputs = self.branch_inputs(latents, t, branches, chunk_offset, window, past_kv)
        v, _ = (self._blocks if blocks is None else blocks)(*inputs, past_kv)
        return [unpatchify(vb, latents.shape[0], self.cfg) for vb in v.chunk(len(branches))]

    def branch_inputs(self, latents, t, branches, chunk_offset: int = 0, window=None, past_kv=None) -> tuple:
        """`forward_branches`' packed inputs to `_blocks`: patch tokens, flow time per token, positions,
        the branches' captions, the self- and the cross-attention mask."""
        cfg = self.cfg
        branches = list(branches)
        if not branches or not all(isinstance(b, (tuple, list)) and len(b) == 3 and isinstance(b[2], bool)
                                   for b in branches):
            raise ValueError("branches must be a non-empty sequence of (text, caption_lengths, sees_cache: bool), "
                             f"got {[type(b).__name__ for b in branches]}")
        video_chunks, offsets = self._layout(latents, None, (chunk_offset,), past_kv)
        n_b, n_chunks, tpc = len(branches), video_chunks[0], cfg.tokens_per_chunk
        lens = tuple(int(n) for b in branches for n in b[1])
        cross_mask = _branch_cross_mask(n_b * n_chunks, tpc, lens)
        text = torch.cat([b[0] for b in branches])
        if cross_mask.sk != text.shape[0]:
            raise ValueError(f"the branches' text has {text.shape[0]} tokens but their caption_lengths sum to {cross_mask.sk}")
        n_cached = 0 if past_kv is None else past_kv[0][0].shape[0] // tpc
        self_mask = masks.branch_window_mask(n_cached, n_chunks, tpc, window, tuple(b[2] for b in branches))
        x = patchify(latents, cfg).repeat(n_b, 1)
        t_tok = token_times(frame_times(t, n_chunks, cfg).to(x.device), cfg).repeat(n_b)
        pos = positions((n_chunks,) * n_b, offsets * n_b, cfg).to(x.device)
        return x, t_tok, pos, text, self_mask, cross_mask

    def _blocks(self, x, t_tok, pos, text, self_mask, cross_mask, past_kv):
        """Patch tokens [S, patch_dim] through the network -> velocity tokens [S, patch_dim] and every
        layer's (k, v) of these tokens."""
        x = self.embed(x)
        t_emb = self.t_embed(t_tok)
        rope = rope_angles(pos, self.cfg)
        new_kv = []
        for i, block in enumerate(self.blocks):
            x, kv = block(x, t_emb, rope, text, self_mask, cross_mask, None if past_kv is None else past_kv[i])
            new_kv.append(kv)
        return self.out(self.norm_out(x)), new_kv

    def _layout(self, latents, video_chunks, chunk_offsets, past_kv):
        cfg = self.cfg
        want = (cfg.latent_size, cfg.latent_size, cfg.latent_channels)
        if latents.dim() != 4 or tuple(latents.shape[1:]) != want or latents.shape[0] % cfg.latent_frames:
            raise ValueError(f"latents must be packed latent frames [k * {cfg.latent_frames}, {want[0]}, "
                             f"{want[1]}, {want[2]}], got {tuple(latents.shape)}")
        n_chunks = latents.shape[0] // cfg.latent_frames
        video_chunks = (n_chunks,) if video_chunks is None else tuple(int(n) for n in video_chunks)
        if sum(video_chunks) != n_chunks or min(video_chunks, default=0) < 1:
            raise ValueError(f"video_chunks {video_chunks} must be positive and sum to the {n_chunks} chunks of latents")
        if past_kv is not None:
            if len(video_chunks) != 1 or chunk_offsets is None:
                raise ValueError("with past_kv give one sample and its absolute chunk_offsets (where the new chunks start)")
            if len(past_kv) != cfg.depth or past_kv[0][0].shape[0] % cfg.tokens_per_chunk:
                raise ValueError("past_kv must hold (k, v) for every layer over whole chunks")
        chunk_offsets = (0,) * len(video_chunks) if chunk_offsets is None else tuple(int(o) for o in chunk_offsets)
        if len(chunk_offsets) != len(video_chunks) or min(chunk_offsets) < 0:
            raise ValueError(f"chunk_offsets {chunk_offsets} must give one offset >= 0 per sample {video_chunks}")
        return video_chunks, chunk_offsets


@functools.lru_cache(maxsize=64)  # a stream packs the same few caption layouts every tick
def _branch_cross_mask(n_chunks: int, chunk_tokens: int, caption_lengths: tuple[int, ...]) -> Mask:
    return masks.cross_attention_mask((n_chunks,), chunk_tokens, caption_lengths)


def _init_linear(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


# ----------------------------------------------------------------------------- flow matching


def noisy_latents(latents_clean, noise, t_frames):
    """x_t = t * clean + (1 - t) * noise with t per latent frame [F]."""
    t = t_frames.to(latents_clean.dtype).view(-1, 1, 1, 1)
    return t * latents_clean + (1 - t) * noise


def flow_matching_loss(dit: DiT, latents_clean, t_per_chunk, noise, text, caption_lengths,
                       video_chunks=None, chunk_offsets=None, window=None, cell_weights=None) -> torch.Tensor:
    """Mean squared velocity error over the latent frames of noisy chunks (t < 1) only.

    Clean chunks (t = 1: a continuation prefix, or the clean first frame of image-to-video when
    t is given per frame) are context and carry no loss. ``cell_weights`` [F, h, w] (optional):
    each frame's error is the weighted mean over its latent cells instead of the plain mean."""
    n_chunks = latents_clean.shape[0] // dit.cfg.latent_frames
    t_frames = frame_times(t_per_chunk, n_chunks, dit.cfg).to(latents_clean.device)
    x_t = noisy_latents(latents_clean, noise, t_frames)
    v = dit(x_t, t_frames, text, caption_lengths, video_chunks, chunk_offsets, window)
    sq = (v.float() - (latents_clean - noise).float()).pow(2)
    if cell_weights is None:
        err = sq.mean((1, 2, 3))  # per frame
    else:
        w = cell_weights.to(sq.device, torch.float32)
        err = (sq.mean(3) * w).sum((1, 2)) / w.sum((1, 2))
    noisy = (t_frames < 1).float()
    return (err * noisy).sum() / noisy.sum().clamp_min(1.0)


# ------------------------------------------------------------------------- the three networks


class WorldModel(nn.Module):
    """The video autoencoder, the caption encoder and the diffusion transformer of one config."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.vae = VideoVAE(cfg)
        self.text = TextEncoder(cfg)
        self.dit = DiT(cfg)

    def encode_captions(self, captions: Sequence[str], runs: Sequence[int] | None = None) -> tuple[torch.Tensor, list[int]]:
        """Packed caption tokens [sum(lengths), text_dim] and lengths, one caption per chunk.

        ``runs``: per caption, for how many chunks the video keeps it (`text.caption_runs`; 0 = not
        told); None: not told. Only models with ``caption_runs`` > 0 use them."""
        dev = self.text.tok.weight.device
        tokens = tokenize(captions).to(dev)
        if runs is not None:
            runs = torch.tensor(list(runs), dtype=torch.int64, device=dev)
        return pack_text(*self.text(tokens, runs))


def param_counts(model: WorldModel) -> dict[str, int]:
    counts = {name: sum(p.numel() for p in getattr(model, name).parameters()) for name in ("vae", "text", "dit")}
    counts["total"] = sum(counts.values())
    return counts
