"""Training of the world model (``magi train``): two phases over batches streamed from the synthetic world.

**Phase 1 -- the video autoencoder** (steps ``0 .. steps_vae``). Each step draws ``vae_batch``
clips of ``vae_clip_chunks`` chunks (`data.make_batch`), picks one random chunk of each, and
minimises `vae.vae_loss` (MSE reconstruction in [-1, 1] + a small KL term). Afterwards
`VideoVAE.set_latent_stats` normalises the latents over ``stats_clips`` held-apart clips and the
autoencoder is frozen.

**Phase 2 -- the diffusion transformer and the caption encoder** (steps ``steps_vae .. steps_vae +
steps_dit``), flow matching (t = 0 noise, t = 1 clean) as in MAGI-1. Each step draws ``batch``
clips of ``n_chunks`` chunks, encodes them with the frozen autoencoder, and packs them into one
sequence (`plan_samples`, `pack_batch`):

- each clip is cut at every inner chunk boundary with probability ``p_cut``, so the packed
  samples have different lengths (a piece keeps its absolute chunk offset for the time RoPE) and
  the packed sequence always holds ``batch * n_chunks`` chunks (constant memory per step);
- with probability ``p_continuation`` a sample starts with 1 .. L-1 clean chunks (t = 1, the
  continuation context); chunks further than ``window`` before the sample's end are always clean
  (at generation time they are finished and sit in the KV cache);
- the remaining (<= ``window``) chunks get monotone noise levels: ``t`` drawn logit-normal
  (``t_mean``, ``t_std``) per chunk and sorted so that earlier chunks are cleaner (the shipped
  model's last fine-tune drew them with mean -0.35 and spread 1.4, more at both ends than (0, 1):
  its videos keep their objects better, docs/benchmarks.md session 34);
- with probability ``p_i2v`` a sample without clean chunks gets a clean first latent frame
  (image-to-video; per-frame t);
- with probability ``caption_dropout`` all captions of a sample become the empty caption
  `NULL_CAPTION` (BOS EOS): the unconditional branch of classifier-free guidance;
- with ``reuse`` > 1 a generated and encoded batch serves that many consecutive steps (batch
  ``k // reuse`` at transformer step k), each with its own cuts, noise levels and noise: the
  autoencoder's encode is the largest part of a step on the GPU (`benchmarks/profile_train_step.py`);
- the self-attention mask is MAGI-1's packed block-causal ``magi_video`` mask (sliding chunk
  window ``attn_window`` if set), each chunk cross-attends to its own caption only, and the loss
  (`dit.flow_matching_loss`) covers the noisy latent frames only.

Both phases use AdamW (no weight decay on biases and norms), linear warmup then cosine decay to
``min_lr_ratio`` * lr, gradient clipping, and bf16 autocast on CUDA (float32 on the CPU); with
``compile`` the transformer blocks and the frozen encoder are compiled on CUDA (attention stays eager).

**Determinism and resume.** All randomness of step s comes from generators seeded with
``(seed, phase, s)`` and the data of step s is ``data.make_batch(<phase seed>, s, ...)`` (random
access), so a run is a pure function of its config on the CPU, and ``resume`` from a checkpoint of
step s (weights, optimizer moments, step; `checkpoint`) continues bit-exactly as if never stopped.

Outputs in ``out_dir``: ``ckpt_<step>.safetensors`` (+ ``.optim.safetensors``) every
``ckpt_every`` steps and at each phase end (the last ``keep_checkpoints`` are kept),
``model.safetensors`` (weights + configs, no optimizer: the file to ship), ``log.jsonl`` (one line
per logged step), ``train_config.json``. A ``sample_fn(model, step, out_dir)`` hook runs every
``sample_every`` transformer steps (generation plugs in here later).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from . import data as D
from . import vocab
from .checkpoint import load_checkpoint, load_optimizer_state, optimizer_path, save_checkpoint, stores_bf16
from .configs import CONFIGS, ModelConfig, get_config
from .dit import WorldModel, flow_matching_loss, keep_attention_eager, param_counts
from .text import pack_text, token_runs
from .vae import decoder_loss, to_signed, vae_loss

CONFIG_DIR = Path(__file__).resolve().parent / "train_configs"
NULL_CAPTION = vocab.NULL_CAPTION  # the caption of dropped-out chunks: BOS EOS (what CFG's unconditional branch uses)
PHASE_VAE, PHASE_DIT, PHASE_STATS, PHASE_DECODER = 1, 2, 3, 4

# fields that may change when resuming (they do not change what a step computes, or only extend the run)
RESUMABLE_CHANGES = ("steps_vae", "steps_dit", "ckpt_every", "keep_checkpoints", "log_every",
                     "sample_every", "data_workers", "fg_weight", "compile",
                     # fine-tuning with a new loss weighting / data mix: the clips, how they are cut,
                     # started and captioned, and the attention window (generation's default follows it)
                     "p_scheduled", "p_lookahead", "p_twin", "n_chunks", "batch", "reuse", "p_cut", "p_continuation",
                     "p_i2v", "caption_dropout", "attn_window",
                     "run_lr_scale",
                     # fine-tuning with the noise levels drawn elsewhere (logit-normal mean and spread)
                     "t_mean", "t_std")


# ------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on (besides the device). JSON files hold these fields."""

    model: str | dict = "tiny"  # a ModelConfig preset name, or a ModelConfig dict
    seed: int = 0
    # phase 1: autoencoder
    steps_vae: int = 20
    vae_batch: int = 2  # chunks per step (one random chunk from each of vae_batch clips)
    vae_clip_chunks: int = 2
    lr_vae: float = 2e-3
    warmup_vae: int = 5
    kl_weight: float = 1e-4
    stats_clips: int = 4  # clips of n_chunks for set_latent_stats
    # phase 2: transformer + caption encoder
    steps_dit: int = 30
    batch: int = 2  # clips per step
    n_chunks: int = 2  # chunks per clip (the packed sequence holds batch * n_chunks chunks)
    lr_dit: float = 3e-3
    warmup_dit: int = 5
    window: int = 4  # at most this many noisy chunks per sample (MAGI-1: 4)
    attn_window: int | None = None  # sliding chunk window of self-attention (None: block-causal)
    p_cut: float = 0.3
    p_continuation: float = 0.3
    p_i2v: float = 0.2
    caption_dropout: float = 0.1
    t_mean: float = 0.0  # logit-normal noise levels
    t_std: float = 1.0
    fg_weight: float = 0.0  # extra loss weight on latent cells an object touches (0: plain MSE)
    p_scheduled: float = 0.0  # fraction of the transformer's clips scripted from random prompt schedules (data.generate_scheduled)
    p_lookahead: float = D.SCHEDULE_LOOKAHEAD  # fraction of those planned over the whole schedule (the rest chunk by chunk)
    p_twin: float = 0.0  # fraction of the transformer's clips that are uncaptioned twin clips (data.generate(twin=True))
    reuse: int = 1  # transformer steps per generated and encoded batch (each with its own cuts, t and noise)
    run_lr_scale: float = 1.0  # learning rate of the caption-run vectors / the transformer's (new vectors in a trained model: > 1)
    # optimisation (both phases)
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.99)
    grad_clip: float = 1.0
    amp: str = "auto"  # auto (bf16 on CUDA, float32 on CPU) | bf16 | fp32
    # bookkeeping
    ckpt_every: int = 0  # steps between checkpoints (0: only at phase ends)
    keep_checkpoints: int = 3
    log_every: int = 10
    sample_every: int = 0  # transformer steps between sample_fn calls (0: only at the end)
    data_workers: int = 0  # processes generating batches ahead (0: in the training process)
    compile: bool = False  # torch.compile the transformer blocks and the encoder (CUDA only; attention stays eager)
    comment: str = ""

    def __post_init__(self):
        def bad(msg):
            raise ValueError(f"TrainConfig: {msg}")

        def whole(name, lo):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                bad(f"{name}={v!r} must be an integer >= {lo}")

        if isinstance(self.model, str):
            if self.model not in CONFIGS:
                bad(f"unknown model config {self.model!r}; known: {', '.join(CONFIGS)} (or a ModelConfig dict)")
        elif isinstance(self.model, dict):
            ModelConfig.from_dict(self.model)  # raises on bad keys / geometry
        else:
            bad(f"model must be a preset name or a ModelConfig dict, got {type(self.model).__name__}")
        for name in ("seed", "steps_vae", "steps_dit", "ckpt_every", "warmup_vae", "warmup_dit",
                     "log_every", "sample_every", "data_workers"):
            whole(name, 0)
        for name in ("vae_batch", "vae_clip_chunks", "stats_clips", "batch", "n_chunks", "window", "keep_checkpoints",
                     "reuse"):
            whole(name, 1)
        if self.attn_window is not None:
            whole("attn_window", 1)
        if not isinstance(self.compile, bool):
            bad(f"compile={self.compile!r} must be true or false")
        for name in ("p_cut", "p_continuation", "p_i2v", "caption_dropout", "min_lr_ratio", "p_scheduled", "p_lookahead",
                     "p_twin"):
            if not 0 <= getattr(self, name) <= 1:
                bad(f"{name}={getattr(self, name)} must be in [0, 1]")
        for name in ("lr_vae", "lr_dit", "t_std", "run_lr_scale"):
            if not getattr(self, name) > 0:
                bad(f"{name}={getattr(self, name)} must be > 0")
        if not math.isfinite(self.t_mean) or not math.isfinite(self.t_std):
            bad(f"t_mean={self.t_mean} and t_std={self.t_std} must be finite (noise levels sigmoid(N(t_mean, t_std)))")
        if not self.fg_weight >= 0:
            bad(f"fg_weight={self.fg_weight} must be >= 0 (0: every latent cell weighs the same)")
        if self.weight_decay < 0 or self.kl_weight < 0 or self.grad_clip < 0:
            bad("weight_decay, kl_weight and grad_clip must be >= 0 (grad_clip 0 disables clipping)")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            bad(f"betas={self.betas} must be two numbers in [0, 1)")
        if self.amp not in ("auto", "bf16", "fp32"):
            bad(f"amp={self.amp!r} must be auto, bf16 or fp32")

    @property
    def total_steps(self) -> int:
        return self.steps_vae + self.steps_dit

    def data_mix(self) -> dict[str, float]:
        """The transformer's data-mix keywords of `data.make_batch` (what `BatchSource` passes on)."""
        return {"p_scheduled": self.p_scheduled, "p_lookahead": self.p_lookahead, "p_twin": self.p_twin}

    def model_config(self) -> ModelConfig:
        return get_config(self.model) if isinstance(self.model, str) else ModelConfig.from_dict(self.model)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        if not isinstance(d, dict):
            raise ValueError(f"a training config must be a JSON object, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown training config keys {unknown}; known: {', '.join(sorted(known))}")
        d = dict(d)
        if "betas" in d:
            d["betas"] = tuple(d["betas"])
        return cls(**d)


def config_names() -> list[str]:
    """Names of the bundled training configs (``train_configs/<name>.json``)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def load_train_config(spec: str) -> TrainConfig:
    """A bundled config by name (``tiny``, ``small``) or a ``.json`` file path."""
    path = Path(spec)
    if spec in config_names():
        path = CONFIG_DIR / f"{spec}.json"
    elif not (spec.endswith(".json") or path.is_file()):
        raise ValueError(f"unknown training config {spec!r}; bundled: {', '.join(config_names())}, "
                         "or give a path to a .json file")
    if not path.is_file():
        raise ValueError(f"training config file {spec!r} does not exist")
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"training config {spec!r} is not valid JSON: {e}") from None
    return TrainConfig.from_dict(d)


# -------------------------------------------------------------------------------- randomness


def derive_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed from ``(seed, *keys)`` (independent streams per phase and step)."""
    ss = np.random.SeedSequence([int(seed), *[int(k) for k in keys]])
    return int(ss.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def data_seed(tcfg: TrainConfig, phase: int) -> int:
    """The `data.make_batch` seed of a phase (autoencoder, transformer, latent statistics)."""
    return derive_seed(tcfg.seed, 0, phase)


def lr_at(step: int, steps: int, base: float, warmup: int, min_ratio: float) -> float:
    """Learning rate of step ``step`` of a phase of ``steps``: linear warmup, then cosine to ``min_ratio * base``."""
    if warmup > 0 and step < warmup:
        return base * (step + 1) / warmup
    span = max(1, steps - warmup)
    progress = min(1.0, (step - warmup) / span)
    return base * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


# ---------------------------------------------------------------------------------------- data


def _batch_arrays(seed: int, index: int, n_chunks: int, batch: int, cells: tuple[int, int] | None = None,
                  **mix: float) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Frames, caption tokens and (with ``cells``: the autoencoder's time and space down-sampling)
    the `data.foreground_cells` of each clip of batch ``index`` (else None). ``mix``: `data.make_batch`'s
    data-mix keywords (``p_scheduled``, ``p_lookahead``, ``p_twin``; `TrainConfig.data_mix`)."""
    b = D.make_batch(seed, index, n_chunks, batch, **mix)
    fg = None if cells is None else np.stack([D.foreground_cells(c, *cells) for c in b.clips])
    return b.frames, b.tokens, fg


def _batch_into_slot(slot: str, seed: int, index: int, n_chunks: int, batch: int,
                     cells: tuple[int, int] | None, mix: dict) -> tuple[np.ndarray, np.ndarray | None]:
    """Worker side of `BatchSource`: write the frames into shared-memory block ``slot`` (they are
    by far the largest part: 75 MB for 64 clips of 4 chunks) and return the small arrays."""
    from multiprocessing import shared_memory

    frames, tokens, fg = _batch_arrays(seed, index, n_chunks, batch, cells, **mix)
    shm = shared_memory.SharedMemory(name=slot)
    try:
        np.ndarray(frames.shape, frames.dtype, buffer=shm.buf)[...] = frames
    finally:
        shm.close()
    return tokens, fg


class BatchSource:
    """Batches ``start, start + 1, ...`` of ``make_batch(seed, ., n_chunks, batch, **mix)`` as (frames,
    tokens, foreground cells or None: see `_batch_arrays`); ``mix``: the data-mix keywords
    (`TrainConfig.data_mix`).

    With ``workers > 0`` a process pool generates the next batches while the model trains (the
    order, and so every result, is the same as without workers). The workers write the frames into
    shared-memory slots instead of sending them through a pipe: unpickling 75 MB per batch in the
    training process held its interpreter lock for tens of milliseconds and starved the thread that
    launches the GPU work. The frames returned by `get` are then a view of a slot, valid until the
    next `get` (move them to the device, or copy them, before asking for the next batch)."""

    def __init__(self, seed: int, n_chunks: int, batch: int, start: int, workers: int = 0,
                 cells: tuple[int, int] | None = None, **mix: float):
        self.args = (seed, n_chunks, batch, cells, mix)
        self.next = start
        self.pool = None
        self.ahead: deque = deque()  # (future, slot)
        self.slots: list = []
        self.free: deque = deque()
        if workers > 0:
            import multiprocessing as mp
            from multiprocessing import shared_memory

            self.depth = 2 * workers
            # one slot per batch in flight plus the one the caller holds
            cfg = D.WorldConfig()
            self.shape = (batch, n_chunks * cfg.chunk_frames, *cfg.frame_shape)
            size = int(np.prod(self.shape))
            self.held = None
            try:
                for _ in range(self.depth + 1):
                    self.slots.append(shared_memory.SharedMemory(create=True, size=size))
                self.pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"))
            except BaseException:
                self.close()  # no shared-memory segment outlives a source that failed to start
                raise
            self.free.extend(self.slots)

    def _submit(self):
        seed, n, b, cells, mix = self.args
        slot = self.free.popleft()
        fut = self.pool.submit(_batch_into_slot, slot.name, seed, self.next + len(self.ahead), n, b, cells, mix)
        self.ahead.append((fut, slot))

    def get(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        seed, n, b, cells, mix = self.args
        if self.pool is None:
            out = _batch_arrays(seed, self.next, n, b, cells, **mix)
        else:
            if self.held is not None:  # the caller is done with the previous batch's frames
                self.free.append(self.held)
                self.held = None
            while len(self.ahead) < self.depth:
                self._submit()
            fut, slot = self.ahead.popleft()
            tokens, fg = fut.result()
            self.held = slot
            out = np.ndarray(self.shape, np.uint8, buffer=slot.buf), tokens, fg
        self.next += 1
        return out

    def close(self):
        if self.pool is not None:
            for f, _ in self.ahead:
                f.cancel()
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None
        for slot in self.slots:
            slot.close()
            slot.unlink()
        self.slots = []


# ------------------------------------------------------------------------ packing (phase 2)


@dataclass(frozen=True)
class SampleSpec:
    """One packed sample: chunks ``[offset, offset + length)`` of clip ``clip``."""

    clip: int
    offset: int
    length: int
    t: tuple[float, ...]  # flow time per chunk (1.0 = clean context)
    i2v: bool  # the first latent frame is clean
    drop_caption: bool


def plan_samples(rng: np.random.Generator, n_clips: int, n_chunks: int, tcfg: TrainConfig) -> list[SampleSpec]:
    """Cut clips into samples and draw their noise levels, clean prefixes, i2v and caption dropout."""
    pieces = []
    for c in range(n_clips):
        start = 0
        for k in range(1, n_chunks + 1):
            if k == n_chunks or rng.random() < tcfg.p_cut:
                pieces.append((c, start, k - start))
                start = k
    out = []
    for c, off, length in pieces:
        n_clean = int(rng.integers(1, length)) if length > 1 and rng.random() < tcfg.p_continuation else 0
        n_clean = max(n_clean, length - tcfg.window)
        m = length - n_clean
        t = 1.0 / (1.0 + np.exp(-rng.normal(tcfg.t_mean, tcfg.t_std, size=m)))
        t = np.clip(np.sort(t)[::-1], 0.0, 0.999)  # earlier chunks cleaner
        i2v = bool(n_clean == 0 and rng.random() < tcfg.p_i2v)
        drop = bool(rng.random() < tcfg.caption_dropout)
        out.append(SampleSpec(c, off, length, (1.0,) * n_clean + tuple(float(x) for x in t), i2v, drop))
    return out


@dataclass
class Packed:
    """One packed training sequence (what `flow_matching_loss` takes)."""

    latents: torch.Tensor  # clean latent frames [F, h, w, C]
    t_frames: torch.Tensor  # flow time per latent frame [F]
    noise: torch.Tensor  # [F, h, w, C]
    tokens: torch.Tensor  # caption tokens per chunk [n_chunks, L]
    video_chunks: tuple[int, ...]
    chunk_offsets: tuple[int, ...]
    samples: list[SampleSpec]
    fg: torch.Tensor | None = None  # bool [F, h, w]: latent cells an object touches (None: not weighted)
    runs: torch.Tensor | None = None  # int64 [n_chunks]: each caption's run (`text.caption_runs`); None: not told

    @property
    def n_chunks(self) -> int:
        return sum(self.video_chunks)

    def cell_weights(self, fg_weight: float) -> torch.Tensor | None:
        """The loss's weight per latent cell: 1 + ``fg_weight`` where an object touches it, 1
        elsewhere; None (the plain loss) for ``fg_weight`` 0 or a batch without foreground cells."""
        if not fg_weight or self.fg is None:
            return None
        return 1.0 + fg_weight * self.fg.float()


_NULL_TOKENS = None


def null_tokens() -> np.ndarray:
    global _NULL_TOKENS
    if _NULL_TOKENS is None:
        _NULL_TOKENS = vocab.encode_batch([NULL_CAPTION])[0]
    return _NULL_TOKENS


def clip_runs(tokens: np.ndarray, cap: int) -> np.ndarray:
    """int64 [B, K]: `text.caption_runs` of each clip's captions (token rows [B, K, L]), counted to
    the clip's end (a sample cut from the clip keeps the runs of the whole clip: its captions were
    planned, or happened, over all of it)."""
    return np.array([token_runs(clip, cap) for clip in tokens], dtype=np.int64)


def pack_batch(latents: torch.Tensor, tokens: np.ndarray, samples: list[SampleSpec], cfg: ModelConfig,
               generator: torch.Generator, fg: np.ndarray | None = None) -> Packed:
    """Pack clip latents [B, K * latent_frames, h, w, C], tokens [B, K, L] and (optional) foreground
    cells [B, K * latent_frames, h, w] by ``samples``. With ``cfg.caption_runs`` the captions' runs
    come along (`clip_runs`; 0 where the captions are dropped)."""
    lf = cfg.latent_frames
    all_runs = clip_runs(tokens, cfg.caption_runs) if cfg.caption_runs else None
    lat, tf, toks, runs = [], [], [], []
    for s in samples:
        lat.append(latents[s.clip, s.offset * lf:(s.offset + s.length) * lf])
        t = torch.tensor(s.t, dtype=torch.float32).repeat_interleave(lf)
        if s.i2v:
            t[:cfg.patch_t] = 1.0
        tf.append(t)
        tk = tokens[s.clip, s.offset:s.offset + s.length]
        toks.append(np.broadcast_to(null_tokens(), tk.shape) if s.drop_caption else tk)
        if all_runs is not None:
            runs.append(np.zeros(s.length, np.int64) if s.drop_caption else all_runs[s.clip, s.offset:s.offset + s.length])
    lat = torch.cat(lat)
    # drawn on the generator's device (training passes one on the GPU: a CPU draw of 1.5M numbers
    # per step cost ~10 ms of the training process's time)
    noise = torch.randn(lat.shape, generator=generator, device=generator.device, dtype=torch.float32)
    noise = noise.to(lat.device, lat.dtype)
    cells = None
    if fg is not None:
        cells = torch.from_numpy(np.concatenate([fg[s.clip, s.offset * lf:(s.offset + s.length) * lf] for s in samples]))
        cells = cells.to(lat.device)
    return Packed(lat, torch.cat(tf).to(lat.device), noise, torch.from_numpy(np.concatenate(toks)).to(lat.device),
                  tuple(s.length for s in samples), tuple(s.offset for s in samples), samples, cells,
                  None if all_runs is None else torch.from_numpy(np.concatenate(runs)).to(lat.device))


def dit_loss(model: WorldModel, packed: Packed, attn_window: int | None = None, fg_weight: float = 0.0) -> torch.Tensor:
    """Flow-matching loss of a packed sequence (caption encoder included, so both get gradients).
    ``fg_weight`` > 0 (with ``packed.fg``): each latent cell an object touches weighs 1 + fg_weight."""
    text, lens = pack_text(*model.text(packed.tokens, packed.runs))
    return flow_matching_loss(model.dit, packed.latents, packed.t_frames, packed.noise, text, lens,
                              video_chunks=packed.video_chunks, chunk_offsets=packed.chunk_offsets,
                              window=attn_window, cell_weights=packed.cell_weights(fg_weight))


# ------------------------------------------------------------------------------------ training


def encode_batch(model: WorldModel, frames: np.ndarray, device: torch.device, tcfg: TrainConfig) -> torch.Tensor:
    """Latents (float32) of a batch of frames [B, T, H, W, 3] with the frozen autoencoder, under the
    loss's autocast (bf16 on CUDA)."""
    with torch.no_grad(), _autocast(device, tcfg):
        return model.vae.encode(torch.from_numpy(frames).to(device)).float()


def compile_for_training(model: WorldModel) -> None:
    """torch.compile, in place, what the transformer phase runs: the blocks (dynamic shapes: caption
    token counts change from step to step; attention stays eager) and the frozen encoder (one shape,
    every batch). The state-dict keys do not change. On an H100 the encoder of 128 clips went from
    123 to 82 ms (bf16 autocast), a third of the step before."""
    keep_attention_eager()
    for block in model.dit.blocks:
        block.compile(dynamic=True)
    model.vae.encoder.compile()


def make_optimizer(module: torch.nn.Module, tcfg: TrainConfig, lr: float) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices/embeddings only (not on biases and norm weights).

    The caption-run vectors (``text.run``, if the model has them) form a third group whose learning
    rate is ``run_lr_scale`` times the others' (`set_lr`)."""
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    runs = [p for n, p in named if n.endswith("text.run.weight")]
    decay = [p for n, p in named if p.dim() >= 2 and not n.endswith("text.run.weight")]
    rest = [p for n, p in named if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": tcfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    if runs:
        groups.append({"params": runs, "weight_decay": tcfg.weight_decay, "name": "caption_runs"})
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(tcfg.betas))


def set_lr(optimizer: torch.optim.Optimizer, lr: float, tcfg: TrainConfig) -> None:
    """The schedule's learning rate for this step (times ``run_lr_scale`` for the caption-run vectors)."""
    for g in optimizer.param_groups:
        g["lr"] = lr * (tcfg.run_lr_scale if g.get("name") == "caption_runs" else 1.0)


class _DiTParams(torch.nn.Module):
    """The trainable part of phase 2 (caption encoder + transformer) as one module, in a fixed order."""

    def __init__(self, model: WorldModel):
        super().__init__()
        self.text, self.dit = model.text, model.dit


@dataclass
class TrainResult:
    model: WorldModel
    step: int
    losses: dict[str, list[tuple[int, float]]] = field(default_factory=lambda: {"vae": [], "dit": []})
    checkpoints: list[Path] = field(default_factory=list)
    final: Path | None = None
    seconds: float = 0.0


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' asked for, but torch sees no CUDA GPU (use --device cpu)")
    if dev.type not in ("cuda", "cpu"):
        raise ValueError(f"device {str(device)!r}: only cpu and cuda are supported")
    return dev


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The ``ckpt_<step>.safetensors`` with the highest step in ``directory`` (None if there is none)."""
    found = []
    for p in Path(directory).glob("ckpt_*.safetensors"):
        stem = p.name[len("ckpt_"):-len(".safetensors")]
        if stem.isdigit():
            found.append((int(stem), p))
    return max(found)[1] if found else None


def resolve_resume(path: str | os.PathLike) -> Path:
    """A checkpoint file, or the latest checkpoint in a run directory; clear errors otherwise."""
    p = Path(path)
    if p.is_dir():
        latest = latest_checkpoint(p)
        if latest is None:
            raise FileNotFoundError(f"resume: no ckpt_<step>.safetensors in directory {str(p)!r}")
        return latest
    if not p.is_file():
        raise FileNotFoundError(f"resume: checkpoint {str(p)!r} does not exist")
    return p


def add_caption_runs(model: WorldModel, runs: int) -> WorldModel:
    """The same model, its caption encoder told caption runs of up to ``runs`` chunks (`text.caption_runs`).

    The run vectors start at zero, so the result computes what ``model`` computes until trained."""
    old = model.cfg
    if old.caption_runs or runs < 1:
        raise ValueError(f"add_caption_runs: the model's caption_runs is {old.caption_runs}; only 0 -> R >= 1 "
                         f"is an upgrade (asked {runs})")
    p = next(model.parameters())
    new = WorldModel(replace(old, caption_runs=runs)).to(p.device, p.dtype)
    missing, unexpected = new.load_state_dict(model.state_dict(), strict=False)
    if unexpected or missing != ["text.run.weight"]:
        raise AssertionError(f"add_caption_runs: unexpected state difference {missing} / {unexpected}")
    return new


def _with_decoder_of(asked: ModelConfig, stored: ModelConfig) -> ModelConfig:
    """``asked`` with the decoder form of ``stored`` (``vae_context``, ``vae_causal``, ``vae_delay``): those
    come from `finetune_decoder`, not from a training config, and a resumed run keeps the decoder it finds."""
    return replace(asked, vae_context=stored.vae_context, vae_causal=stored.vae_causal, vae_delay=stored.vae_delay)


def _model_change_ok(saved: ModelConfig, asked: ModelConfig) -> bool:
    """Whether a run may resume with ``asked`` instead of ``saved``: equal, or caption runs added."""
    return asked == saved or (saved.caption_runs == 0 and asked.caption_runs > 0
                              and replace(asked, caption_runs=0) == saved)


def check_resume_config(tcfg: TrainConfig, saved: TrainConfig, meta: dict,
                        stored: ModelConfig | None = None) -> None:
    """Raise ValueError if ``tcfg`` cannot continue a run saved with ``saved`` at ``meta['step']``.

    ``stored``: the checkpoint's own model config (default: ``saved``'s; a preset name may have
    changed since). Besides `RESUMABLE_CHANGES`, the model may gain caption runs (0 -> R)."""
    a, b = tcfg.to_dict(), saved.to_dict()
    stored = saved.model_config() if stored is None else stored
    asked = _with_decoder_of(tcfg.model_config(), stored)
    if not _model_change_ok(stored, asked):
        raise ValueError(f"resume: the checkpoint's model config {stored.to_dict()} differs from the asked one "
                         f"{asked.to_dict()}; only caption_runs may change, from 0 to R >= 1")
    diff = [k for k in a if k not in RESUMABLE_CHANGES and k not in ("comment", "model") and a[k] != b[k]]
    if diff:
        raise ValueError("resume: the checkpoint was trained with different settings: "
                         + ", ".join(f"{k}={b[k]!r} (asked {a[k]!r})" for k in diff)
                         + f"; only {', '.join(RESUMABLE_CHANGES)} may change")
    step = meta["step"]
    if meta.get("latent_stats") and tcfg.steps_vae != saved.steps_vae:
        raise ValueError(f"resume: the autoencoder phase of this checkpoint is finished ({saved.steps_vae} steps); "
                         f"steps_vae cannot change to {tcfg.steps_vae}")
    if not meta.get("latent_stats") and step > tcfg.steps_vae:
        raise ValueError(f"resume: the checkpoint is at autoencoder step {step}, past the {tcfg.steps_vae} "
                         "autoencoder steps asked")
    if step > tcfg.total_steps:
        raise ValueError(f"resume: the checkpoint is at step {step}, past the {tcfg.total_steps} steps asked "
                         f"(steps_vae {tcfg.steps_vae} + steps_dit {tcfg.steps_dit})")


def _autocast(device: torch.device, tcfg: TrainConfig):
    use = tcfg.amp == "bf16" or (tcfg.amp == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use)


def _progress(total, initial, desc, enabled):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True,
                disable=not enabled, leave=True)


def train(tcfg: TrainConfig, out_dir: str | os.PathLike, device: str | torch.device | None = "cpu",
          resume: str | os.PathLike | None = None, progress: bool | None = None,
          sample_fn: Callable[[WorldModel, int, Path], None] | None = None,
          log: Callable[[str], None] | None = None, time_limit: float | None = None,
          stop_at: int | None = None) -> TrainResult:
    """Run (or continue, with ``resume``) both training phases; see the module docstring.

    ``progress``: tqdm bars (None: only on a terminal); ``sample_fn(model, step, out_dir)``: called
    every ``sample_every`` transformer steps and at the end, under ``torch.no_grad``; ``log``: where
    one-line messages go (default: tqdm.write when progress is on, else nowhere). ``time_limit``:
    seconds of wall time after which no new step starts; the run then saves a checkpoint of the
    step it reached (resume continues from it bit-exactly) and returns with ``step`` short of
    ``total_steps``. ``stop_at``: the same at a step count (no step ``>= stop_at`` runs), so a run
    stopped early can be remade exactly; the learning-rate schedule is still that of ``total_steps``.
    """
    t_start = time.perf_counter()
    if time_limit is not None and not time_limit > 0:
        raise ValueError(f"time_limit must be a positive number of seconds or None, got {time_limit!r}")
    if stop_at is not None and (isinstance(stop_at, bool) or not isinstance(stop_at, int) or stop_at < 1):
        raise ValueError(f"stop_at must be a step count >= 1 or None, got {stop_at!r}")
    stop = tcfg.total_steps if stop_at is None else min(stop_at, tcfg.total_steps)
    deadline = math.inf if time_limit is None else t_start + time_limit
    device = resolve_device(device)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if progress is None:
        progress = sys.stderr.isatty()
    if log is None:
        from tqdm.auto import tqdm

        log = tqdm.write if progress else (lambda msg: None)

    step, latent_stats, opt_file = 0, False, None
    carried: dict = {}  # meta records that stay with the weights they describe (a fine-tuned decoder's)
    if resume is not None:
        path = resolve_resume(resume)
        model, cfg, meta = load_checkpoint(path, device)
        if "decoder_finetune" in meta:
            carried["decoder_finetune"] = meta["decoder_finetune"]
        if meta.get("train_config") is None:
            raise ValueError(f"resume: {str(path)!r} holds no training config (a weights-only export?)")
        check_resume_config(tcfg, TrainConfig.from_dict(meta["train_config"]), meta, cfg)
        step, latent_stats, opt_file = meta["step"], bool(meta.get("latent_stats")), meta["optimizer"]
        asked = _with_decoder_of(tcfg.model_config(), cfg)  # a fine-tuned decoder stays as it is
        if cfg != asked:  # check_resume_config allowed it: caption runs added
            model, cfg = add_caption_runs(model, asked.caption_runs), asked
            log(f"caption runs added (up to {cfg.caption_runs} chunks, their vectors start at zero); "
                "AdamW starts from zero moments")
            opt_file = None  # the optimizer's state has no slot for the new parameter
        elif opt_file is None and step not in (tcfg.steps_vae, 0) and step < tcfg.total_steps:
            log(f"warning: {path.name} holds no optimizer state; AdamW restarts from zero moments "
                "(the run continues, but not bit-exactly)")
        log(f"resuming {path} at step {step} ({'transformer' if latent_stats else 'autoencoder'} phase)")
    else:
        cfg = tcfg.model_config()
        with torch.random.fork_rng(devices=[]):  # seeded init on the CPU, the caller's RNG untouched
            torch.manual_seed(tcfg.seed)
            model = WorldModel(cfg)
        model = model.to(device)
    (out / "train_config.json").write_text(json.dumps(tcfg.to_dict(), indent=2) + "\n")
    counts = param_counts(model)
    log(f"model {cfg.name}: " + ", ".join(f"{k} {v:,}" for k, v in counts.items()) + f" parameters; device {device}")

    result = TrainResult(model=model, step=step)
    benchmark = torch.backends.cudnn.benchmark
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed conv shapes in both phases
    if resume:
        _trim_log(out / "log.jsonl", step)
    log_file = open(out / "log.jsonl", "a")
    saved: deque[Path] = deque(sorted(out.glob("ckpt_*.safetensors"))[-tcfg.keep_checkpoints:]) if resume else deque()

    def save(phase: str, optimizer):
        p = out / f"ckpt_{step:07d}.safetensors"
        save_checkpoint(p, model, step=step, train_config=tcfg.to_dict(), optimizer=optimizer,
                        meta={"phase": phase, "latent_stats": latent_stats, **carried})
        result.checkpoints.append(p)
        if p not in saved:
            saved.append(p)
        while len(saved) > tcfg.keep_checkpoints:
            old = saved.popleft()
            for f in (old, optimizer_path(old)):
                if f.exists() and f != p:
                    f.unlink()
        return p

    def record(phase, s, loss, lr, gnorm, dt, extra):
        result.losses[phase].append((s, loss))
        if tcfg.log_every and (s % tcfg.log_every == 0 or s == tcfg.total_steps - 1):
            log_file.write(json.dumps({"phase": phase, "step": s, "loss": loss, "lr": lr, "grad_norm": gnorm,
                                       "step_s": dt, **extra}) + "\n")
            log_file.flush()

    try:
        # ---------------------------------------------------------------- phase 1: autoencoder
        if step < tcfg.steps_vae:
            model.vae.requires_grad_(True).train()
            opt = make_optimizer(model.vae, tcfg, tcfg.lr_vae)
            if opt_file is not None:
                load_optimizer_state(opt_file, opt)
            src = BatchSource(data_seed(tcfg, PHASE_VAE), tcfg.vae_clip_chunks, tcfg.vae_batch, step, tcfg.data_workers)
            bar = _progress(tcfg.steps_vae, step, "autoencoder", progress)
            try:
                while step < tcfg.steps_vae:
                    t0 = time.perf_counter()
                    if t0 >= deadline or step >= stop:
                        break
                    frames, _, _ = src.get()
                    rng = np.random.default_rng([tcfg.seed, PHASE_VAE, step])
                    pick = rng.integers(0, tcfg.vae_clip_chunks, size=tcfg.vae_batch)
                    f = cfg.chunk_frames
                    x = torch.from_numpy(np.stack([frames[i, k * f:(k + 1) * f] for i, k in enumerate(pick)])).to(device)
                    gen = torch.Generator(device=device).manual_seed(derive_seed(tcfg.seed, PHASE_VAE, step))
                    lr = lr_at(step, tcfg.steps_vae, tcfg.lr_vae, tcfg.warmup_vae, tcfg.min_lr_ratio)
                    set_lr(opt, lr, tcfg)
                    with _autocast(device, tcfg):
                        parts = vae_loss(model.vae, x, tcfg.kl_weight, generator=gen)
                    opt.zero_grad(set_to_none=True)
                    parts["loss"].backward()
                    gnorm = _clip(model.vae.parameters(), tcfg.grad_clip)
                    opt.step()
                    loss, recon, kl = (float(parts[k].detach()) for k in ("loss", "recon", "kl"))
                    dt = time.perf_counter() - t0
                    record("vae", step, loss, lr, gnorm, dt, {"recon": recon, "kl": kl})
                    step += 1
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.4f}", recon=f"{recon:.4f}",
                                    chunks_s=f"{tcfg.vae_batch / dt:.1f}", refresh=False)
                    if tcfg.ckpt_every and step % tcfg.ckpt_every == 0 and step < tcfg.steps_vae:
                        save("vae", opt)
            finally:
                bar.close()
                src.close()
            if step < tcfg.steps_vae:  # out of time: the autoencoder phase resumes from here
                save("vae", opt)
            del opt
            opt_file = None

        # ------------------------------------------------------ latent statistics and freezing
        model.vae.requires_grad_(False).eval()
        if not latent_stats and step >= tcfg.steps_vae:
            b = D.make_batch(data_seed(tcfg, PHASE_STATS), 0, tcfg.n_chunks, tcfg.stats_clips)
            model.vae.set_latent_stats(torch.from_numpy(b.frames).to(device))
            latent_stats = True
            log(f"latent stats: mean {model.vae.latent_mean.abs().mean():.3f} (abs), "
                f"std {model.vae.latent_std.mean():.3f} over {tcfg.stats_clips} clips; autoencoder frozen")
            save("dit", None)

        # ------------------------------------------- phase 2: transformer + caption encoder
        if tcfg.steps_vae <= step < tcfg.total_steps:
            trainable = _DiTParams(model)
            trainable.requires_grad_(True).train()
            if tcfg.compile and device.type == "cuda":
                compile_for_training(model)
            opt = make_optimizer(trainable, tcfg, tcfg.lr_dit)
            if opt_file is not None:
                load_optimizer_state(opt_file, opt)
            first = step - tcfg.steps_vae
            cells = (cfg.time_down, cfg.space_down) if tcfg.fg_weight else None  # foreground only where weighted
            src = BatchSource(data_seed(tcfg, PHASE_DIT), tcfg.n_chunks, tcfg.batch, first // tcfg.reuse,
                              tcfg.data_workers, cells, **tcfg.data_mix())
            latents = None
            bar = _progress(tcfg.steps_dit, first, "transformer", progress)
            try:
                while step < tcfg.total_steps:
                    t0 = time.perf_counter()
                    if t0 >= deadline or step >= stop:
                        break
                    k = step - tcfg.steps_vae
                    if latents is None or k % tcfg.reuse == 0:  # batch k // reuse
                        frames, tokens, fg = src.get()
                        latents = encode_batch(model, frames, device, tcfg)
                    rng = np.random.default_rng([tcfg.seed, PHASE_DIT, step])
                    samples = plan_samples(rng, tcfg.batch, tcfg.n_chunks, tcfg)
                    gen = torch.Generator(device=device).manual_seed(derive_seed(tcfg.seed, PHASE_DIT, step))
                    packed = pack_batch(latents, tokens, samples, cfg, gen, fg)
                    lr = lr_at(k, tcfg.steps_dit, tcfg.lr_dit, tcfg.warmup_dit, tcfg.min_lr_ratio)
                    set_lr(opt, lr, tcfg)
                    with _autocast(device, tcfg):
                        loss_t = dit_loss(model, packed, tcfg.attn_window, tcfg.fg_weight)
                    opt.zero_grad(set_to_none=True)
                    loss_t.backward()
                    gnorm = _clip(trainable.parameters(), tcfg.grad_clip)
                    opt.step()
                    loss = float(loss_t.detach())
                    dt = time.perf_counter() - t0
                    n_tok = packed.n_chunks * cfg.tokens_per_chunk
                    record("dit", step, loss, lr, gnorm, dt, {"tokens": n_tok, "samples": len(samples)})
                    step += 1
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{n_tok / dt:,.0f}", refresh=False)
                    if tcfg.ckpt_every and step % tcfg.ckpt_every == 0 and step < tcfg.total_steps:
                        save("dit", opt)
                    if sample_fn is not None and tcfg.sample_every and (k + 1) % tcfg.sample_every == 0 \
                            and step < tcfg.total_steps:
                        _run_sample(sample_fn, model, step, out, trainable)
            finally:
                bar.close()
                src.close()
            save("dit", opt)
        if sample_fn is not None:
            _run_sample(sample_fn, model, step, out, None)
        result.final = save_checkpoint(out / "model.safetensors", model, step=step, train_config=tcfg.to_dict(),
                                       meta={"phase": "done" if step >= tcfg.total_steps
                                             else "dit" if step >= tcfg.steps_vae else "vae",
                                             "latent_stats": latent_stats, **carried})
    finally:
        log_file.close()
        torch.backends.cudnn.benchmark = benchmark
    result.step = step
    result.seconds = time.perf_counter() - t_start
    if step < tcfg.total_steps:
        why = f"stop_at {stop_at}" if step >= stop else f"time limit of {time_limit:g} s"
        log(f"{why} reached: stopped at step {step} of {tcfg.total_steps}")
    log(f"done: step {step}, {result.seconds:.1f} s; weights in {result.final}")
    return result


SEAM_CHUNKS = 4  # chunks of the held-out clips whose round trips `finetune_decoder` scores for seams


def finetune_decoder(weights: str | os.PathLike, out: str | os.PathLike, *, context: int | None = None, steps: int = 1500,
                     batch: int = 16, lr: float = 3e-4, warmup: int = 50, seed: int = 0,
                     device: str | torch.device | None = "cpu", workers: int = 0, held_out: int = 64,
                     causal: bool = False, clip_chunks: int | None = None, diff_weight: float = 0.0,
                     delay: int | None = None, time_limit: float | None = None, progress: bool | None = None) -> dict:
    """Teach the autoencoder's decoder of checkpoint ``weights`` to read ``context`` chunks before each
    chunk (`ModelConfig.vae_context`; default 1, or for a causal decoder the chunks its receptive field
    spans, 3), and write the model to ``out`` (floats stored as in ``weights``: bf16 for the shipped
    file).

    Only the decoder trains (AdamW, linear warmup, cosine to 0.1 ``lr``): the encoder, the latent
    statistics, the caption encoder and the transformer are copied unchanged, so the latents the
    transformer generates mean what they meant. Each step decodes ``batch`` simulator clips of
    ``clip_chunks`` chunks from posterior samples (`vae.decoder_loss`): the first chunk alone, as a
    video's first chunk is, each later one with the chunks before it. A decoder that reads each chunk on
    its own draws the chunk's first and last frames without knowing the neighbouring chunk; that
    is where the seams of its videos come from. ``time_limit`` (seconds): stop early, after the
    step that crosses it (the record says how many steps ran).

    ``causal``: make the decoder causal (`ModelConfig.vae_causal`: past-only temporal convolutions,
    per-frame norms), warm-started from the stored one (`vae.causal_from`); then a chunk's frames
    continue the chunk before's as frames inside a chunk continue each other. A stream reads its whole
    past (`VideoVAE.decode_next`), so its context must cover the receptive field (ValueError
    otherwise): then training decodes what a stream does. ``clip_chunks`` (default ``context + 1``): chunks of each
    training clip, all decoded as a stream is (the first alone, each later one with its context) and
    all in the loss; ``context + 2`` also trains the seam between two chunks that both had context.
    ``diff_weight``: weight of the frame-difference term of `vae.decoder_loss` (0: plain MSE).
    ``delay``: latent frames a causal decoder reads ahead (`ModelConfig.vae_delay`; default: the
    stored decoder's); a larger one than stored is warm-started by `vae.delay_from` (the decoder starts
    out drawing what it drew, read late) and learns to use what it now sees of the next chunk. Each
    training clip then ends as a video does (its last latent frame held).

    Returns the reconstruction MSE of ``held_out`` clips before and after, per frame position in
    the last chunk, and the seams of their round trips (`evaluate.seam_score` of clips of
    `SEAM_CHUNKS` chunks, posterior means, uint8 frames) before and after."""
    from dataclasses import replace

    from .evaluate import seam_score
    from .vae import Decoder, causal_from, delay_from, receptive_latent_frames, to_uint8

    if context is not None and (isinstance(context, bool) or not isinstance(context, int) or not 1 <= context <= 4):
        raise ValueError(f"context must be 1..4 chunks, got {context!r}")
    for name, v in (("steps", steps), ("batch", batch), ("held_out", held_out)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    if clip_chunks is not None and (isinstance(clip_chunks, bool) or not isinstance(clip_chunks, int) or clip_chunks < 2):
        raise ValueError(f"clip_chunks must be >= 2 (a chunk and the chunk before it), got {clip_chunks!r}")
    if not isinstance(causal, bool):
        raise ValueError(f"causal must be True or False, got {causal!r}")
    if isinstance(diff_weight, bool) or not isinstance(diff_weight, (int, float)) or not 0 <= diff_weight < math.inf:
        raise ValueError(f"diff_weight must be a number >= 0 (0: plain MSE), got {diff_weight!r}")
    if delay is not None and (isinstance(delay, bool) or not isinstance(delay, int) or delay < 0):
        raise ValueError(f"delay must be an integer >= 0 (latent frames read ahead), got {delay!r}")
    device = resolve_device(device)
    if progress is None:
        progress = sys.stderr.isatty()
    model, _, meta = load_checkpoint(weights, device=device)
    stored_dtype = torch.bfloat16 if stores_bf16(weights) else None
    model.requires_grad_(False).eval()
    causal = causal or model.cfg.vae_causal
    reach = receptive_latent_frames(model.cfg)
    if context is None:
        context = math.ceil(reach / model.cfg.latent_frames) if causal else 1
    if clip_chunks is None:
        clip_chunks = context + 1
    if delay is None:
        delay = model.cfg.vae_delay
    if delay < model.cfg.vae_delay:
        raise ValueError(f"delay {delay} is less than the stored decoder's ({model.cfg.vae_delay}): a decoder "
                         "is only warm-started towards more look-ahead")
    if delay and not causal:
        raise ValueError(f"delay {delay} needs a causal decoder (causal=True, or a causal checkpoint)")
    cfg = replace(model.cfg, vae_context=context, vae_causal=causal, vae_delay=delay)
    if cfg.vae_causal and context * cfg.latent_frames < reach:
        raise ValueError(f"a causal decoder needs context >= {math.ceil(reach / cfg.latent_frames)} chunks: its receptive "
                         f"field is {reach} latent frames, and a stream reads all of them (`VideoVAE.decode_next`), so "
                         f"training must too; got context {context}")
    check = torch.from_numpy(D.make_batch(derive_seed(seed, PHASE_DECODER, 1), 0, context + 1, held_out).frames).to(device)
    seam_clips = torch.from_numpy(D.make_batch(derive_seed(seed, PHASE_DECODER, 4), 0, SEAM_CHUNKS, held_out).frames)

    @torch.no_grad()
    def held_out_error() -> list[float]:
        gen = torch.Generator(device=device).manual_seed(derive_seed(seed, PHASE_DECODER, 2))
        z = model.vae.encode(check, sample=True, generator=gen)
        x = model.vae.decode_raw(z)[:, -model.cfg.chunk_frames:]
        target = to_signed(check[:, -model.cfg.chunk_frames:], x.dtype)
        return (x - target).square().mean((0, 2, 3, 4)).tolist()

    @torch.no_grad()
    def held_out_seams() -> tuple[float, float]:
        """Mean seam ratio and latent-frame step ratio of the held-out round trips."""
        scores = []
        for i in range(0, held_out, 8):  # a few clips at a time: 4 chunks decoded with context
            x = seam_clips[i:i + 8].to(device)
            frames = to_uint8(model.vae.decode(model.vae.encode(x))).cpu().numpy()
            scores += [seam_score(f, model.cfg.chunk_frames, model.cfg.time_down) for f in frames]
        return float(np.mean([s["ratio"] for s in scores])), float(np.mean([s["latent_ratio"] for s in scores]))

    before, (seams_before, steps_before) = held_out_error(), held_out_seams()  # the decoder as it was
    if cfg.vae_causal and not model.cfg.vae_causal:  # same parameters, new wiring
        new = Decoder(cfg).to(device)
        causal_from(model.vae.decoder, new)
        model.vae.decoder = new
    if delay > model.cfg.vae_delay:  # same network, read later: the stem's taps move into the past
        delay_from(model.vae.decoder, delay - model.cfg.vae_delay)
    for m in (model, model.vae, model.dit, model.text):
        if hasattr(m, "cfg"):
            m.cfg = cfg
    dec = model.vae.decoder
    dec.requires_grad_(True).train()
    opt = torch.optim.AdamW(dec.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.01)
    src = BatchSource(derive_seed(seed, PHASE_DECODER, 0), clip_chunks, batch, 0, workers)
    bar = _progress(steps, 0, "decoder", progress)
    losses = []
    deadline = math.inf if time_limit is None else time.perf_counter() + time_limit
    try:
        for step in range(steps):
            if time.perf_counter() >= deadline:
                break
            frames, _, _ = src.get()
            x = torch.from_numpy(np.array(frames)).to(device)
            for g in opt.param_groups:
                g["lr"] = lr_at(step, steps, lr, warmup, 0.1)
            gen = torch.Generator(device=device).manual_seed(derive_seed(seed, PHASE_DECODER, 3, step))
            loss = decoder_loss(model.vae, x, generator=gen, diff_weight=diff_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            _clip(dec.parameters(), 1.0)
            opt.step()
            losses.append(float(loss.detach()))
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
    finally:
        bar.close()
        src.close()
    dec.eval()
    after, (seams_after, steps_after) = held_out_error(), held_out_seams()
    if not losses:
        raise ValueError(f"time_limit {time_limit!r} s ran out before the first step; nothing was written")
    record = {"source": str(weights), "context": context, "causal": cfg.vae_causal, "clip_chunks": clip_chunks,
              "delay": delay, "steps": steps, "steps_done": len(losses), "batch": batch,
              "lr": lr, "warmup": warmup, "seed": seed, "loss_first_50": float(np.mean(losses[:50])),
              "loss_last_50": float(np.mean(losses[-50:])), "held_out_clips": held_out,
              "held_out_mse_by_frame_before": before, "held_out_mse_by_frame_after": after,
              "held_out_seams_before": seams_before, "held_out_seams_after": seams_after,
              "held_out_latent_steps_before": steps_before, "held_out_latent_steps_after": steps_after,
              "diff_weight": float(diff_weight)}
    keep = {k: v for k, v in meta.items() if k not in ("format", "step", "train_config", "optimizer", "path")}
    if "decoder_finetune" in keep:  # a decoder fine-tuned before: its record stays, nested
        record["previous"] = keep["decoder_finetune"]
    keep["decoder_finetune"] = record
    save_checkpoint(out, model, step=meta["step"], train_config=meta["train_config"], meta=keep,
                    dtype=stored_dtype)
    return record


def _trim_log(path: Path, step: int) -> None:
    """Drop the log lines of steps >= ``step``: on a resume they belong to a run past the
    checkpoint that is now redone, so the log keeps one line per step of the weights' history."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if json.loads(line)["step"] < step]
    if len(kept) != len(lines):
        path.write_text("".join(kept))


def _clip(params, max_norm: float) -> float:
    params = [p for p in params if p.grad is not None]
    if max_norm > 0:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    return float(torch.linalg.vector_norm(torch.stack([p.grad.detach().float().norm() for p in params])))


def _run_sample(sample_fn, model, step, out, trainable):
    model.eval()
    try:
        with torch.no_grad():
            sample_fn(model, step, out)
    finally:
        if trainable is not None:
            trainable.train()
