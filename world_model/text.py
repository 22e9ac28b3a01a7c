"""A tiny caption encoder trained from scratch: token embedding + learned positions + a few
pre-norm transformer layers over `vocab` token ids (bidirectional within a caption).

``TextEncoder(tokens [B, L], runs [B] | None) -> (features [B, L, D], valid [B, L] bool)``; `pack_text`
turns that into the packed caption tokens the diffusion transformer cross-attends to (one caption
per chunk).

**Caption runs** (``ModelConfig.caption_runs`` = R > 0): a chunk's caption is also told for how many
chunks the video keeps it, this one included (`caption_runs`, capped at R): "the red circle moves
right" for 2 chunks asks the first of them to leave room for the second, which a chunk that sees
only its own caption cannot know. The run is a learned vector added to every token of the caption
before the encoder's layers; run 0 means "not told" (the unconditional caption, a video prefix)
and is the zero vector, as are all runs at initialisation, so a model without runs is the same
model with R = 0.
Unknown words never reach the model: `tokenize` goes through `vocab.encode`, which raises a
ValueError naming the word and its closest known words.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import vocab
from .configs import ModelConfig


def caption_runs(captions: Sequence, cap: int) -> list[int]:
    """Per chunk, how many chunks from it on (itself included) carry the same caption, capped at ``cap``.

    ``captions``: one hashable per chunk in order (strings, or token rows as bytes); ``cap`` >= 1.
    ``["a", "a", "b", "a"]`` -> ``[2, 1, 1, 1]``."""
    if isinstance(cap, bool) or not isinstance(cap, int) or cap < 1:
        raise ValueError(f"cap must be an integer >= 1, got {cap!r}")
    runs = [0] * len(captions)
    for k in range(len(captions) - 1, -1, -1):
        same = k + 1 < len(captions) and captions[k + 1] == captions[k]
        runs[k] = runs[k + 1] + 1 if same else 1
    return [min(r, cap) for r in runs]


def token_runs(rows, cap: int) -> list[int]:
    """`caption_runs` of captions given as token rows ([K, L] ids, one row per chunk, padded alike):
    captions are the same when their token ids are, so spelling variants of one caption are one run.
    What training (`train.clip_runs`) and generation (`generate.ChunkStream`) both count."""
    return caption_runs([row.tobytes() for row in rows], cap)


def tokenize(captions: Sequence[str], length: int | None = None) -> torch.Tensor:
    """int64 [len(captions), length] token ids (BOS + words + EOS, PAD-padded); unknown words raise."""
    if isinstance(captions, str):
        raise TypeError("tokenize takes a list of captions, not one string")
    return torch.from_numpy(vocab.encode_batch(list(captions), length))


class TextBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))

    def forward(self, x, keep):  # x [B, L, D]; keep [B, 1, 1, L] bool: keys a query may see
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
        x = x + self.proj(y.transpose(1, 2).reshape(b, n, d))
        return x + self.mlp(self.norm2(x))


class TextEncoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab_size, cfg.text_dim)
        self.pos = nn.Embedding(cfg.max_caption_tokens, cfg.text_dim)
        self.blocks = nn.ModuleList(TextBlock(cfg.text_dim, cfg.text_heads, cfg.text_mlp_ratio)
                                    for _ in range(cfg.text_layers))
        self.norm = nn.LayerNorm(cfg.text_dim)
        nn.init.normal_(self.tok.weight, std=0.02)
        nn.init.normal_(self.pos.weight, std=0.02)
        # run r's vector; row 0 ("not told") is fixed at zero, the others start there
        self.run = nn.Embedding(cfg.caption_runs + 1, cfg.text_dim, padding_idx=0) if cfg.caption_runs else None
        if self.run is not None:
            nn.init.zeros_(self.run.weight)

    def forward(self, tokens: torch.Tensor, runs: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Features [B, L, text_dim] and the valid-token mask [B, L] (False at PAD).

        ``runs``: integer [B] in [0, caption_runs] (`caption_runs`; 0 = not told), or None (all 0).
        A model with ``caption_runs`` = 0 takes only None or zeros."""
        if tokens.dim() != 2 or tokens.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"tokens must be an integer tensor [B, L], got {tokens.dtype} {tuple(tokens.shape)}")
        if tokens.shape[1] > self.cfg.max_caption_tokens:
            raise ValueError(f"captions of {tokens.shape[1]} tokens exceed max_caption_tokens={self.cfg.max_caption_tokens}")
        if tokens.numel() and (tokens.min() < 0 or tokens.max() >= self.cfg.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.cfg.vocab_size}), got [{int(tokens.min())}, {int(tokens.max())}]")
        valid = tokens != vocab.PAD_ID
        # an all-PAD caption (an empty prompt) lets its rows see every position instead of none (no NaN)
        keep = (valid | ~valid.any(-1, keepdim=True))[:, None, None, :]
        x = self.tok(tokens) + self.pos(torch.arange(tokens.shape[1], device=tokens.device))
        if runs is not None:
            runs = torch.as_tensor(runs, device=tokens.device)
            if runs.shape != tokens.shape[:1] or runs.dtype not in (torch.int64, torch.int32):
                raise ValueError(f"runs must be an integer tensor [{tokens.shape[0]}] (one per caption), "
                                 f"got {runs.dtype} {tuple(runs.shape)}")
            r = self.cfg.caption_runs
            if runs.numel() and (runs.min() < 0 or runs.max() > r):
                raise ValueError(f"runs must lie in [0, {r}] (this model's caption_runs; 0 = not told), "
                                 f"got [{int(runs.min())}, {int(runs.max())}]")
            if self.run is not None:
                x = x + self.run(runs.long())[:, None, :]
        for block in self.blocks:
            x = block(x, keep)
        return self.norm(x), valid


def pack_text(features: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """Packed caption tokens [sum(lengths), D] (caption after caption, PAD dropped) and the lengths."""
    return features[valid], valid.sum(1).tolist()
