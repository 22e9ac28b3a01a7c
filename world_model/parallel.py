"""Context-parallel (CP) training of the diffusion transformer: one packed sequence over ``cp`` ranks.

The packed sequence of a transformer step (`train.pack_batch`) is cut into dispatch chunks that a
`maskc.Plan` assigns to the ranks of a process group (balanced by the allowed pairs of the packed
block-causal mask). Every rank receives the whole batch (latents, noise, t, captions: small next to
the activations) and runs the network on its own tokens only; the only cross-rank traffic inside
the network is the self-attention's keys/values (`maskc.runtime.dist.dist_attention`, forward and
backward). Per rank::

    cp = make_cp_context(packed.video_chunks, cfg, cp_size=world, rank=rank)   # compile once per layout
    loss = cp_dit_loss(model, packed, cp)        # this rank's share: sum over ranks = dit_loss
    loss.backward()
    allreduce_grads(trainable)                   # sum over ranks: every rank holds dit_loss's gradient
    optimizer.step()                             # identical on every rank (replicated weights)

Exactness: the ranks' losses add up to `train.dit_loss` of the whole batch and, after
`allreduce_grads`, every rank holds its gradient, up to the attention kernels' rounding
(`tests/test_world_cp.py`). What differs is only where tokens are computed:

- per-token inputs (patch tokens, flow time, 3D RoPE positions) are taken at ``plan.positions(rank)``;
- self-attention is `dist_attention` over the plan's packed ``magi_video`` mask;
- cross-attention uses the packed cross mask restricted to the rank's query rows against the whole
  (replicated) caption tokens; the caption encoder runs on every rank (it is tiny) and its gradient
  is summed like the others;
- the loss of each rank is its partial sum divided by the *global* normaliser (the number of noisy
  latent frames of the whole batch times the elements of a frame), so the partial losses add up.

The dispatch chunk (`dispatch_chunk`) is a multiple of both the kernels' tile and the tokens of a
video chunk, so no video chunk is split across ranks and a rank's rows of the cross mask are whole
caption blocks; when that is too coarse to give every rank work, or balances much worse than
maskc's default chunk, the default (tile-sized multiples, video chunks may be split) is used:
splitting is only a little less tidy, never inexact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Sequence

import numpy as np
import torch
import torch.distributed as dist

import maskc
from maskc import Mask
from maskc.comm import layout_segments, submask
from maskc.dispatch import default_chunk
from maskc.plan import Plan
from maskc.runtime.dist import dist_attention

from . import masks
from .configs import ModelConfig
from .dit import KERNEL_HEAD_DIMS, DiT, frame_times, noisy_latents, patchify, positions, token_times
from .text import pack_text

#: a video-chunk-aligned dispatch is kept unless its imbalance is this much worse than maskc's default
BALANCE_SLACK = 0.02


# --------------------------------------------------------------------------------- the context


@dataclass(frozen=True, eq=False)
class CPContext:
    """One rank's view of a context-parallel plan: what `DiT.forward` (``cp=``) needs.

    plan: the `maskc.Plan` of the packed self-attention mask; rank: this process's rank in
    ``group``, the process group of the ``plan.cp_size`` ranks (None: the default group). Build it
    with `make_cp_context`.
    """

    plan: Plan
    rank: int
    group: object = None
    layout_key: tuple = ()  # (video_chunks, tokens per chunk, window) the plan was compiled for

    def matches(self, video_chunks, tokens_per_chunk: int, window) -> bool:
        """Whether this context's plan is for the packed mask of these arguments (without building
        it): known when the context came from `make_cp_context`, else compare the masks."""
        if self.layout_key:
            return self.layout_key == (tuple(int(n) for n in video_chunks), int(tokens_per_chunk), window)
        return self.plan.mask == masks.self_attention_mask(video_chunks, tokens_per_chunk, window)

    @cached_property
    def _memo(self) -> dict:
        return {}

    def local_positions(self, video_chunks, chunk_offsets, cfg: ModelConfig, device) -> torch.Tensor:
        """RoPE position ids [n_local, 3] of this rank's tokens (made once per batch layout and device)."""
        key = ("pos", tuple(chunk_offsets), str(device))
        hit = self._memo.get(key)
        if hit is None:
            hit = self._memo[key] = positions(video_chunks, chunk_offsets, cfg).index_select(
                0, self.index("cpu")).to(device)
        return hit

    def cross_rows(self, video_chunks, tokens_per_chunk: int, caption_lengths) -> Mask:
        """This rank's rows of the cross-attention mask (made once per caption lengths)."""
        key = ("cross", tuple(int(n) for n in caption_lengths))
        hit = self._memo.get(key)
        if hit is None:
            hit = self._memo[key] = masks.cross_attention_mask(
                video_chunks, tokens_per_chunk, caption_lengths, self.plan.dispatch.rank_runs(self.rank))
        return hit

    @cached_property
    def positions(self) -> np.ndarray:
        """Global token positions this rank holds, in local order (int64, increasing)."""
        return np.array(self.plan.positions(self.rank), dtype=np.int64)  # a writable copy (torch wants one)

    @property
    def n_local(self) -> int:
        return int(self.plan.dispatch.rank_tokens[self.rank])

    @property
    def cp_size(self) -> int:
        return self.plan.cp_size

    def index(self, device) -> torch.Tensor:
        """`positions` as an int64 tensor on ``device`` (for ``index_select`` of per-token tensors;
        made once per device)."""
        key = ("index", str(torch.device(device)))
        hit = self._memo.get(key)
        if hit is None:
            hit = self._memo[key] = torch.as_tensor(self.positions, dtype=torch.long, device=device)
        return hit

    def rows(self, mask: Mask) -> Mask:
        """``mask`` [S, sk] restricted to this rank's query rows (local order) x all its keys."""
        if mask.sq != self.plan.seq_len:
            raise ValueError(f"cp: a mask of {mask.sq} query rows for a plan of {self.plan.seq_len} tokens")
        q = layout_segments(self.plan.dispatch.rank_runs(self.rank))
        return submask(mask, q, [[0, mask.sk, 0]])

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Self-attention of the rank's q [n_local, hq, d] over the whole sequence's keys (k, v
        [n_local, hkv, d] are the rank's share; the others arrive through `dist_attention`).

        The kernels take bf16/fp16 on the GPU (float32 is run in bf16, as `dit.attend` does) and
        float32 on the CPU (Triton interpreter); the result has q's dtype."""
        if q.device.type == "cuda":
            dt = q.dtype if q.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
        else:
            dt = torch.float32
        out = dist_attention(q.to(dt), k.to(dt), v.to(dt), self.plan, self.group)
        return out.to(q.dtype)


def dispatch_chunk(n_tokens: int, cp_size: int, block: int, tokens_per_chunk: int) -> int | None:
    """The video-chunk-aligned dispatch chunk: a multiple of ``lcm(block, tokens_per_chunk)`` near
    maskc's default size (`maskc.dispatch.default_chunk`: >= 8 chunks per rank, <= 64 tiles),
    preferring a chunk count divisible by ``cp_size``. None when even one aligned unit per rank
    does not fit (then maskc's default chunk is the only way to give every rank work)."""
    unit = math.lcm(block, tokens_per_chunk)
    if n_tokens < unit * cp_size:
        return None
    most = max(default_chunk(n_tokens, cp_size, block) // unit, 1)
    for m in range(most, max(most // 2, 1) - 1, -1):
        if -(-n_tokens // (m * unit)) % cp_size == 0:
            return m * unit
    return most * unit


def make_cp_context(video_chunks: Sequence[int], cfg: ModelConfig, cp_size: int, rank: int | None = None,
                    group=None, *, block: int = 128, chunk: int | None = None, window: int | None = None,
                    stages: int | None = None) -> CPContext:
    """Compile the packed self-attention mask of ``video_chunks`` for ``cp_size`` ranks.

    rank: this process's rank in ``group`` (None: ask torch.distributed). When torch.distributed
    is initialised the group must have ``cp_size`` ranks and ``rank`` must be this process's;
    without it a context can still be built (to inspect positions), and ``cp_size=1`` runs.
    block: the kernels' tile size the dispatch chunk is a multiple of (128 on GPUs; 16 for the
    CPU interpreter); chunk: tokens per dispatch chunk (default: `dispatch_chunk`, whole video
    chunks, see the module docstring); window: the self-attention's sliding chunk window (None:
    block-causal, as in training) -- give the loss the same window; stages: remote stages of the
    plan (default: maskc's). Every rank must call this with the same arguments (same plan).
    """
    if isinstance(cp_size, bool) or not isinstance(cp_size, (int, np.integer)) or cp_size < 1:
        raise ValueError(f"make_cp_context: cp_size must be an integer >= 1, got {cp_size!r}")
    cp_size = int(cp_size)
    if cfg.head_dim not in KERNEL_HEAD_DIMS:
        raise ValueError(f"make_cp_context: model {cfg.name!r} has head_dim {cfg.head_dim}; the context-parallel "
                         f"attention kernels support head dims {KERNEL_HEAD_DIMS}")
    if dist.is_available() and dist.is_initialized():
        world, me = dist.get_world_size(group), dist.get_rank(group)
        if world != cp_size:
            raise ValueError(f"make_cp_context: cp_size={cp_size} but the process group has {world} ranks "
                             "(one rank per share of the sequence: pass cp_size=world size, or a subgroup)")
        if rank is None:
            rank = me
        elif int(rank) != me:
            raise ValueError(f"make_cp_context: rank={rank} but this process is rank {me} of the group")
    elif rank is None:
        if cp_size > 1:
            raise ValueError("make_cp_context: rank=None needs torch.distributed to be initialised "
                             f"(or pass rank explicitly for cp_size={cp_size})")
        rank = 0
    if isinstance(rank, bool) or not 0 <= int(rank) < cp_size:
        raise ValueError(f"make_cp_context: rank {rank!r} must lie in [0, {cp_size})")
    counts = tuple(video_chunks)
    if not counts or any(isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1 for n in counts):
        raise ValueError(f"make_cp_context: video_chunks {counts} must be one or more integers >= 1 "
                         "(chunks per packed sample)")
    mask = masks.self_attention_mask([int(n) for n in counts], cfg.tokens_per_chunk, window)
    if chunk is None:
        aligned = dispatch_chunk(mask.sq, cp_size, block, cfg.tokens_per_chunk)
        plan = maskc.compile(mask, cp_size=cp_size, block=block, chunk=aligned, stages=stages)
        if aligned is not None and plan.imbalance > 1 + BALANCE_SLACK:
            fallback = maskc.compile(mask, cp_size=cp_size, block=block, stages=stages)
            if fallback.imbalance < plan.imbalance - BALANCE_SLACK:
                plan = fallback
    else:
        plan = maskc.compile(mask, cp_size=cp_size, block=block, chunk=chunk, stages=stages)
    return CPContext(plan, int(rank), group, (tuple(int(n) for n in counts), int(cfg.tokens_per_chunk), window))


# ------------------------------------------------------------------------------------- the loss


def cp_flow_matching_loss(dit: DiT, latents_clean, t_per_chunk, noise, text, caption_lengths, video_chunks,
                          chunk_offsets, cp: CPContext, window: int | None = None,
                          cell_weights: torch.Tensor | None = None) -> torch.Tensor:
    """This rank's share of `dit.flow_matching_loss` (same arguments, all of them the whole batch,
    plus ``cp``); the sum of the ranks' results is the single-process loss.

    flow_matching_loss is the mean over noisy latent frames (t < 1) of each frame's mean squared
    velocity error, i.e. ``sum over noisy frames' elements of err^2 / (noisy frames * h*w*C)``.
    A token covers ``patch_t`` frames of one t (`frame_times` enforces it), so the numerator is a
    sum over noisy tokens: each rank sums its own tokens and divides by the global denominator.
    With ``cell_weights`` [F, h, w] a frame's error is the weighted mean over its cells: element
    (f, y, x, c) weighs ``w[f, y, x] / (sum of frame f's weights * C)`` instead of ``1 / (h*w*C)``,
    still a per-element factor, so the ranks' sums still add up.
    """
    cfg = dit.cfg
    if latents_clean.dim() != 4 or tuple(latents_clean.shape) != tuple(noise.shape):
        raise ValueError(f"latents_clean {tuple(latents_clean.shape)} and noise {tuple(noise.shape)} must be "
                         "the same packed latent frames [F, h, w, C]")
    n_chunks = latents_clean.shape[0] // cfg.latent_frames
    t_frames = frame_times(t_per_chunk, n_chunks, cfg).to(latents_clean.device)
    x_t = noisy_latents(latents_clean, noise, t_frames)
    v = dit(x_t, t_frames, text, caption_lengths, video_chunks, chunk_offsets, window, cp=cp)
    idx = cp.index(latents_clean.device)
    target = patchify(latents_clean - noise, cfg).index_select(0, idx)
    noisy_tok = (token_times(t_frames, cfg).index_select(0, idx) < 1).float()
    sq = (v.float() - target.float()).pow(2)
    noisy_frames = (t_frames < 1).float().sum().clamp_min(1.0)
    if cell_weights is None:
        frame_elems = cfg.latent_size * cfg.latent_size * cfg.latent_channels
        return (sq.sum(1) * noisy_tok).sum() / (noisy_frames * frame_elems)
    w = cell_weights.to(sq.device, torch.float32)
    if tuple(w.shape) != tuple(latents_clean.shape[:3]):
        raise ValueError(f"cell_weights {tuple(w.shape)} must be one weight per latent cell "
                         f"{tuple(latents_clean.shape[:3])} (frames, height, width)")
    per_elem = (w / w.sum((1, 2), keepdim=True) / cfg.latent_channels).unsqueeze(-1)
    per_elem = per_elem.expand(*w.shape, cfg.latent_channels)
    weights = patchify(per_elem, cfg).index_select(0, idx)  # the same element order as the tokens
    return ((sq * weights).sum(1) * noisy_tok).sum() / noisy_frames


def cp_dit_loss(model, packed, cp: CPContext, attn_window: int | None = None, fg_weight: float = 0.0) -> torch.Tensor:
    """`train.dit_loss` of a `train.Packed` batch, this rank's share (caption encoder included);
    ``fg_weight`` > 0 (with ``packed.fg``) weighs each latent cell an object touches 1 + fg_weight."""
    text, lens = pack_text(*model.text(packed.tokens, packed.runs))
    return cp_flow_matching_loss(model.dit, packed.latents, packed.t_frames, packed.noise, text, lens,
                                 packed.video_chunks, packed.chunk_offsets, cp, window=attn_window,
                                 cell_weights=packed.cell_weights(fg_weight))


# -------------------------------------------------------------------------------- the gradients


def allreduce_grads(module: torch.nn.Module, group=None) -> None:
    """Sum every parameter's gradient over the ranks of ``group`` (one flat all_reduce per
    device and dtype). A parameter that requires grad but has none (unused on this rank) counts
    as zeros and gets a gradient, so every rank reduces the same buffers. No-op without a
    process group or with one rank."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    buckets: dict[tuple, list[torch.Tensor]] = {}
    for p in params:
        buckets.setdefault((p.grad.device, p.grad.dtype), []).append(p.grad)
    for key in sorted(buckets, key=str):  # the same order on every rank
        grads = buckets[key]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        offset = 0
        for g in grads:
            n = g.numel()
            g.copy_(flat[offset:offset + n].view_as(g))
            offset += n


__all__ = [
    "CPContext",
    "allreduce_grads",
    "cp_dit_loss",
    "cp_flow_matching_loss",
    "dispatch_chunk",
    "make_cp_context",
]
