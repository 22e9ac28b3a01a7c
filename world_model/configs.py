"""Model configurations of the world model: `tiny` (CPU smoke tests) and `small` (the shipped model).

One frozen `ModelConfig` describes all three networks (video autoencoder, text encoder, diffusion
transformer); checkpoints store it as ``to_dict()`` and rebuild it with ``from_dict``.

Geometry (defaults): a chunk is 24 frames of 64x64 RGB; the autoencoder compresses 4x in time and
8x in space, so a chunk is 6 latent frames of 8x8 x ``latent_channels``; the transformer cuts each
latent frame into ``patch_s`` x ``patch_s`` patches (and ``patch_t`` latent frames per patch), so a
chunk is ``tokens_per_chunk`` tokens (96 with patch 1x2x2).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from . import vocab


@dataclass(frozen=True)
class ModelConfig:
    name: str = "custom"
    # video and autoencoder
    frame_size: int = 64
    chunk_frames: int = 24
    time_down: int = 4  # frames per latent frame
    space_down: int = 8  # pixels per latent pixel (per side)
    latent_channels: int = 16
    vae_channels: tuple[int, ...] = (16, 32, 48, 48)  # stem, then one entry per 2x spatial downsampling
    # chunks before a chunk whose latents the decoder also reads when it decodes that chunk (0: each
    # chunk alone, as encoded; 1: the shipped model since session 27, `train.finetune_decoder`)
    vae_context: int = 0
    vae_causal: bool = False  # decoder: past-only temporal convolutions, per-frame norms
    # latent frames a causal decoder reads ahead: frame i is drawn from latent frames <= i // time_down +
    # vae_delay, so a chunk's last frames see the next chunk's first latents (a stream emits each chunk
    # once the next is final; the video's end holds its last latent frame). 0: none (before session 36)
    vae_delay: int = 0
    # text encoder
    vocab_size: int = vocab.VOCAB_SIZE
    max_caption_tokens: int = vocab.MAX_CAPTION_TOKENS
    text_dim: int = 96
    text_layers: int = 2
    text_heads: int = 2
    text_mlp_ratio: float = 2.0
    # caption runs: each chunk's caption is told for how many chunks (this one included, capped at
    # caption_runs) the video keeps it; 0 = not told (the models shipped before session 22)
    caption_runs: int = 0
    # diffusion transformer
    dim: int = 192
    depth: int = 5
    heads: int = 3
    kv_heads: int = 1  # GQA: heads % kv_heads == 0
    mlp_ratio: float = 4.0
    patch_t: int = 1
    patch_s: int = 2
    t_dim: int = 128  # width of the timestep embedding that drives the gates
    rope_split: tuple[int, int, int] = (32, 16, 16)  # head-dim parts rotated by (t, y, x); sum = head_dim
    rope_base: float = 10000.0

    def __post_init__(self):
        def need(ok, what):
            if not ok:
                raise ValueError(f"ModelConfig {self.name!r}: {what}")

        need(self.chunk_frames % self.time_down == 0, f"chunk_frames {self.chunk_frames} % time_down {self.time_down} != 0")
        need(self.frame_size % self.space_down == 0, f"frame_size {self.frame_size} % space_down {self.space_down} != 0")
        need(self.time_down in (1, 2, 4) and self.space_down == 2 ** (len(self.vae_channels) - 1),
             f"the autoencoder downsamples 2x in space per vae_channels entry after the first "
             f"(space_down must be {2 ** (len(self.vae_channels) - 1)}) and time_down must be 1, 2 or 4")
        need(self.latent_frames % self.patch_t == 0, f"latent frames per chunk {self.latent_frames} % patch_t {self.patch_t} != 0")
        need(self.latent_size % self.patch_s == 0, f"latent size {self.latent_size} % patch_s {self.patch_s} != 0")
        need(self.t_dim % 2 == 0, f"t_dim {self.t_dim} must be even")
        need(self.dim % self.heads == 0, f"dim {self.dim} % heads {self.heads} != 0")
        need(self.heads % self.kv_heads == 0, f"heads {self.heads} % kv_heads {self.kv_heads} != 0 (GQA)")
        need(isinstance(self.caption_runs, int) and not isinstance(self.caption_runs, bool)
             and 0 <= self.caption_runs <= 64, f"caption_runs {self.caption_runs!r} must be an integer in [0, 64]")
        need(isinstance(self.vae_context, int) and not isinstance(self.vae_context, bool)
             and 0 <= self.vae_context <= 4, f"vae_context {self.vae_context!r} must be an integer in [0, 4]")
        need(isinstance(self.vae_causal, bool), f"vae_causal {self.vae_causal!r} must be True or False")
        need(isinstance(self.vae_delay, int) and not isinstance(self.vae_delay, bool)
             and 0 <= self.vae_delay <= self.latent_frames,
             f"vae_delay {self.vae_delay!r} must be an integer in [0, {self.latent_frames}] (latent frames per chunk)")
        need(self.vae_delay == 0 or (self.vae_causal and self.vae_context >= 1),
             f"vae_delay {self.vae_delay} needs a causal decoder that reads the chunks before (vae_causal and "
             f"vae_context >= 1); got vae_causal {self.vae_causal}, vae_context {self.vae_context}")
        need(self.text_dim % self.text_heads == 0, f"text_dim {self.text_dim} % text_heads {self.text_heads} != 0")
        need(sum(self.rope_split) == self.head_dim and all(p % 2 == 0 for p in self.rope_split),
             f"rope_split {self.rope_split} must be even parts summing to head_dim {self.head_dim}")

    # ---- derived sizes
    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    @property
    def latent_frames(self) -> int:
        """Latent frames per chunk."""
        return self.chunk_frames // self.time_down

    @property
    def latent_size(self) -> int:
        return self.frame_size // self.space_down

    @property
    def patch_dim(self) -> int:
        return self.latent_channels * self.patch_t * self.patch_s ** 2

    @property
    def tokens_per_frame(self) -> int:
        """Tokens per group of ``patch_t`` latent frames."""
        return (self.latent_size // self.patch_s) ** 2

    @property
    def tokens_per_chunk(self) -> int:
        return self.latent_frames // self.patch_t * self.tokens_per_frame

    # ---- (de)serialisation
    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"ModelConfig.from_dict: unknown keys {unknown}; known: {sorted(known)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


TINY = ModelConfig(
    name="tiny", latent_channels=4, vae_channels=(8, 16, 16, 16),
    text_dim=32, text_heads=2, text_mlp_ratio=2.0,
    dim=64, depth=2, heads=4, kv_heads=2, mlp_ratio=2.0, t_dim=32, rope_split=(8, 4, 4),
)
# the shipped model: 7.7M parameters (bf16 file 15.4 MB); 6.6M of them in the transformer
SMALL = ModelConfig(name="small", dim=256, depth=7, heads=4, kv_heads=1)
CONFIGS = {"tiny": TINY, "small": SMALL}


def get_config(name: str) -> ModelConfig:
    try:
        return CONFIGS[name]
    except KeyError:
        raise ValueError(f"unknown model config {name!r}; known: {', '.join(CONFIGS)}") from None
