"""A small video autoencoder: one chunk of 24 x 64x64 RGB frames <-> 6 x 8x8 x C latent frames.

Conv3d ResNet, 4x down in time and 8x down in space. Every chunk is encoded on its own (chunks are
folded into the batch, GroupNorm statistics are per chunk), so a chunk's latent depends only on that
chunk's frames. Decoding is per chunk too, unless the config's ``vae_context`` is n > 0: then a
chunk's frames are decoded from its latent and the n chunks' before it (session 27: 1), never from
later ones -- streaming generation still decodes a chunk as soon as it is final, keeping the last n
chunks' latents. With ``vae_causal`` the decoder reads only the past inside a clip too (`Decoder`),
so with enough context (n latent frames >= `receptive_latent_frames`) a window's frames are
those of the whole video decoded at once (the same arithmetic, up to float rounding), and a stream
carries the decoder's state from chunk to chunk instead (`VideoVAE.decode_next`): one chunk's work
per chunk, the whole past read. With ``vae_delay`` L > 0 the causal decoder draws frame i from latent
frames <= i // time_down + L: the same network, its output read L latent frames late, so a chunk's
last frames see the first latents of the next chunk and the decoder can ease across the jump the
per-chunk encoder leaves at every chunk boundary. The end of a video holds its last latent frame
for the L it lacks, and a stream emits a chunk once the next one is final (`decode_next`,
`decode_end`).

Regulariser: a KL autoencoder (diagonal Gaussian posterior, small KL weight), chosen over a plain
autoencoder because the KL term keeps the latent scale fixed and its posterior noise makes the
decoder tolerate the small errors a diffusion model leaves in its latents. ``encode`` returns the
posterior mean normalised by the buffers ``latent_mean`` / ``latent_std`` (set them with
`set_latent_stats` after training, so the diffusion model sees roughly unit-variance latents);
``decode`` undoes that normalisation.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .configs import ModelConfig


class FrameGroupNorm(nn.GroupNorm):
    """GroupNorm with statistics per frame (over a group's channels and H, W) instead of over the
    whole clip: a frame's features then do not depend on later frames (the causal decoder)."""

    def forward(self, x):  # [N, C, T, H, W]
        n, c, t, h, w = x.shape
        y = F.group_norm(x.transpose(1, 2).reshape(n * t, c, h, w), self.num_groups, self.weight, self.bias, self.eps)
        return y.reshape(n, t, c, h, w).transpose(1, 2)


class CausalConv3d(nn.Conv3d):
    """3x3x3 convolution that pads time on the past side only: output frame i reads frames i-2..i.

    ``past``: a stream's state (`VideoVAE.decode_next`), a dict: this convolution reads the last two
    input frames of its previous call from it instead of zeros, and leaves its own there."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__(c_in, c_out, 3, padding=(0, 1, 1))

    def forward(self, x, past: dict | None = None):
        before = None if past is None else past.get(self)
        x = F.pad(x, (0, 0, 0, 0, 2, 0)) if before is None else torch.cat([before, x], 2)
        if past is not None:  # a copy: a view would keep this call's whole input alive
            past[self] = x[:, :, -2:].clone()
        return super().forward(x)


def _apply(conv: nn.Module, x: torch.Tensor, past: dict | None) -> torch.Tensor:
    return conv(x) if past is None else conv(x, past)


def _norm(c: int, causal: bool = False) -> nn.GroupNorm:
    return (FrameGroupNorm if causal else nn.GroupNorm)(min(8, c // 2) or 1, c)


def _conv(c_in: int, c_out: int, causal: bool = False) -> nn.Conv3d:
    return CausalConv3d(c_in, c_out) if causal else nn.Conv3d(c_in, c_out, 3, padding=1)


class ResBlock3d(nn.Module):
    def __init__(self, c_in: int, c_out: int, causal: bool = False):
        super().__init__()
        self.norm1, self.conv1 = _norm(c_in, causal), _conv(c_in, c_out, causal)
        self.norm2, self.conv2 = _norm(c_out, causal), _conv(c_out, c_out, causal)
        self.skip = nn.Conv3d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x, past: dict | None = None):
        h = _apply(self.conv1, F.silu(self.norm1(x)), past)
        h = _apply(self.conv2, F.silu(self.norm2(h)), past)
        return self.skip(x) + h


def _time_strides(cfg: ModelConfig) -> list[int]:
    """Time stride of each downsampling stage: the 2x steps go to the deepest stages."""
    n = len(cfg.vae_channels) - 1
    k = {1: 0, 2: 1, 4: 2}[cfg.time_down]
    return [1] * (n - k) + [2] * k


class Encoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        ch = cfg.vae_channels
        self.stem = nn.Conv3d(3, ch[0], 3, padding=1)
        self.blocks = nn.ModuleList()
        for c_in, c_out, st in zip(ch[:-1], ch[1:], _time_strides(cfg)):
            self.blocks.append(ResBlock3d(c_in, c_in))
            self.blocks.append(nn.Conv3d(c_in, c_out, 3, stride=(st, 2, 2), padding=1))
        self.mid = ResBlock3d(ch[-1], ch[-1])
        self.norm_out = _norm(ch[-1])
        self.head = nn.Conv3d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)  # mean, log-variance

    def forward(self, x):  # [N, 3, T, H, W] in [-1, 1] -> [N, 2C, T/4, H/8, W/8]
        x = self.stem(x)
        for b in self.blocks:
            x = b(x)
        return self.head(F.silu(self.norm_out(self.mid(x))))


class Decoder(nn.Module):
    """Latents -> frames. With ``cfg.vae_causal`` every temporal convolution reads only the past and
    every norm takes per-frame statistics, so frame i depends on latent frames <= i // time_down only
    and decoding a long video in windows (`VideoVAE.decode_raw`) agrees with decoding it whole once
    the window covers the receptive field (`receptive_latent_frames`): its chunks join like the
    frames inside a chunk. The parameters have the same names and shapes either way."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.causal = causal = cfg.vae_causal
        ch = cfg.vae_channels[::-1]
        self.stem = _conv(cfg.latent_channels, ch[0], causal)
        self.mid = ResBlock3d(ch[0], ch[0], causal)
        self.ups = nn.ModuleList()
        self.blocks = nn.ModuleList()
        self.strides = _time_strides(cfg)[::-1]
        for c_in, c_out in zip(ch[:-1], ch[1:]):
            self.ups.append(_conv(c_in, c_out, causal))
            self.blocks.append(ResBlock3d(c_out, c_out, causal))
        self.norm_out = _norm(ch[-1], causal)
        self.head = _conv(ch[-1], 3, causal)

    def forward(self, z, past: dict | None = None):  # [N, C, t, h, w] -> [N, 3, T, H, W] in about [-1, 1]
        """``past`` (causal decoders): carry a stream's state from the call before (`VideoVAE.decode_next`)."""
        if past is not None and not self.causal:
            raise ValueError("only a causal decoder (vae_causal) carries a stream's past; this one reads whole windows")
        x = self.mid(_apply(self.stem, z, past), past)
        for up, block, st in zip(self.ups, self.blocks, self.strides):
            x = F.interpolate(x, scale_factor=(st, 2, 2), mode="nearest")
            x = block(_apply(up, x, past), past)
        return _apply(self.head, F.silu(self.norm_out(x)), past)


def receptive_latent_frames(cfg: ModelConfig) -> int:
    """Latent frames before its own that a frame of the causal decoder can read (rounded up): each
    3-tap temporal convolution reaches 2 steps back at its stage's frame rate."""
    convs_at_rate, rate = 3, 1  # stem + mid block at the latent rate
    back = 2 * convs_at_rate / rate
    for st in _time_strides(cfg)[::-1]:
        rate *= st
        back += 2 * 3 / rate  # up conv + a block's two convs at this stage's rate
    back += 2 / rate  # the head
    return math.ceil(back)


def causal_from(decoder: Decoder, causal: Decoder) -> None:
    """Warm-start ``causal`` (a `Decoder` of ``vae_causal``) from a centred ``decoder``: each temporal
    kernel's taps (t-1, t, t+1) move to (t-2 -> 0, t-1, t), the look-ahead tap folded into the
    present one; norms and 1x1 convolutions are copied."""
    src = decoder.state_dict()
    with torch.no_grad():
        for name, p in causal.state_dict().items():
            w = src[name]
            if w.dim() == 5 and w.shape[2] == 3:
                shifted = torch.zeros_like(w)
                shifted[:, :, 1] = w[:, :, 0]
                shifted[:, :, 2] = w[:, :, 1] + w[:, :, 2]
                w = shifted
            p.copy_(w)


def delay_from(decoder: Decoder, delay: int) -> None:
    """Warm-start a causal ``decoder`` for ``vae_delay`` = ``delay`` from its own weights, in place: the
    stem's temporal taps move ``delay`` latent frames into the past (taps reaching before the kernel
    fold into its oldest), so the delayed decoder starts out drawing what the undelayed one drew, and
    its newest tap (the look-ahead) starts at zero."""
    if not decoder.causal:
        raise ValueError("delay_from needs a causal decoder (vae_causal): a centred one already reads ahead")
    if isinstance(delay, bool) or not isinstance(delay, int) or delay < 0:
        raise ValueError(f"delay must be an integer >= 0 (latent frames), got {delay!r}")
    w = decoder.stem.weight
    with torch.no_grad():
        shifted = torch.zeros_like(w)
        for k in range(w.shape[2]):  # tap k reads latent frame t - 2 + k
            shifted[:, :, max(k - delay, 0)] += w[:, :, k]
        w.copy_(shifted)


def _as_unit_float(frames: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] or float [0, 1] frames -> float [0, 1]."""
    if frames.dtype == torch.uint8:
        return frames.float() / 255.0
    if not frames.is_floating_point():
        raise TypeError(f"frames must be uint8 or float in [0, 1], got {frames.dtype}")
    return frames


def to_signed(frames: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """uint8 [0, 255] or float [0, 1] frames -> ``dtype`` in [-1, 1]: what the encoder reads and what
    the reconstruction losses compare the decoder's output with."""
    return _as_unit_float(frames).to(dtype) * 2 - 1


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """The decoder's [-1, 1] output -> frames in [0, 1], clamped (the inverse of `to_signed`)."""
    return ((x + 1) / 2).clamp(0, 1)


def to_uint8(frames: torch.Tensor) -> torch.Tensor:
    """float [0, 1] frames (what `VideoVAE.decode` returns) -> uint8 [0, 255], rounded."""
    return (frames * 255).round().clamp(0, 255).to(torch.uint8)


class VideoVAE(nn.Module):
    """``encode(frames [B, T, H, W, 3]) -> latents [B, T/4, H/8, W/8, C]``; ``decode`` back to [0, 1]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.register_buffer("latent_mean", torch.zeros(cfg.latent_channels))
        self.register_buffer("latent_std", torch.ones(cfg.latent_channels))

    # ---- chunk folding: [B, T, H, W, 3] <-> [B * n_chunks, 3, chunk_frames, H, W]
    def _chunks(self, frames: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        if frames.dim() != 5 or frames.shape[-1] != 3 or frames.shape[2:4] != (cfg.frame_size, cfg.frame_size):
            raise ValueError(f"frames must be [B, T, {cfg.frame_size}, {cfg.frame_size}, 3], got {tuple(frames.shape)}")
        b, t = frames.shape[:2]
        if t == 0 or t % cfg.chunk_frames:
            raise ValueError(f"the number of frames {t} must be a positive multiple of chunk_frames={cfg.chunk_frames}")
        x = frames.reshape(b * (t // cfg.chunk_frames), cfg.chunk_frames, *frames.shape[2:])
        return x.permute(0, 4, 1, 2, 3)

    def _check_latents(self, z: torch.Tensor) -> None:
        cfg = self.cfg
        want = (cfg.latent_size, cfg.latent_size, cfg.latent_channels)
        if z.dim() != 5 or tuple(z.shape[2:]) != want or z.shape[1] == 0 or z.shape[1] % cfg.latent_frames:
            raise ValueError(f"latents must be [B, k * {cfg.latent_frames}, {want[0]}, {want[1]}, {want[2]}] "
                             f"with k >= 1, got {tuple(z.shape)}")

    def encode_moments(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and log-variance, unnormalised, [B, T/4, h, w, C] each."""
        b = frames.shape[0]
        x = self._chunks(to_signed(frames, self.latent_mean.dtype))
        h = self.encoder(x).permute(0, 2, 3, 4, 1)  # [B*K, t, h, w, 2C]
        h = h.reshape(b, -1, *h.shape[2:])
        mean, logvar = h.chunk(2, dim=-1)
        return mean, logvar.clamp(-30.0, 20.0)

    def encode(self, frames: torch.Tensor, sample: bool = False, generator=None) -> torch.Tensor:
        """Normalised latents [B, T/4, h, w, C] (posterior mean, or a sample with ``sample=True``)."""
        mean, logvar = self.encode_moments(frames)
        z = mean
        if sample:
            noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
            z = mean + noise * torch.exp(0.5 * logvar)
        return (z - self.latent_mean) / self.latent_std

    def decode_raw(self, latents: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """Unclamped reconstruction in [-1, 1] space, [B, T, H, W, 3] (what the training loss sees).

        With ``cfg.vae_context`` = n > 0 the decoder reads each chunk together with the n chunks before
        it (fewer at the start) and keeps the frames of the last: a chunk's first frames are decoded
        knowing the chunk before (its last frames see the next only with ``vae_delay``).
        ``context``: latents [B, j * latent_frames, ...] of the chunks just before ``latents``' first
        (streaming: the chunk decoded last); None: the first chunk has none. With ``vae_delay`` L the
        video ends where ``latents`` end: its last L latent frames' look-ahead is the last one held."""
        self._check_latents(latents)
        cfg = self.cfg
        b, lf = latents.shape[0], cfg.latent_frames
        n, delay = cfg.vae_context, cfg.vae_delay
        first = 0
        if n and context is not None:
            self._check_latents(context)
            if context.shape[0] != b:
                raise ValueError(f"context has batch {context.shape[0]}, the latents {b}")
            context = context[:, -n * lf:]
            first = context.shape[1] // lf
            latents = torch.cat([context.to(latents), latents], 1)
        z = latents * self.latent_std + self.latent_mean
        if n == 0:  # chunks folded into the batch
            z = z.reshape(-1, lf, *z.shape[2:]).permute(0, 4, 1, 2, 3)
            x = self.decoder(z).permute(0, 2, 3, 4, 1)  # [B*K, T, H, W, 3]
            return x.reshape(b, -1, *x.shape[2:])
        z = z.permute(0, 4, 1, 2, 3)  # [B, C, k * lf, h, w]
        k_chunks = z.shape[2] // lf
        if delay:  # the end holds the last latent frame; the output is read delay latent frames late
            z = torch.cat([z, z[:, :, -1:].expand(-1, -1, delay, -1, -1)], 2)
        if cfg.vae_causal and n * lf >= receptive_latent_frames(cfg):
            # the windows below all reach back past the receptive field: decoding whole is the same
            x = self.decoder(z)[:, :, first * cfg.chunk_frames + delay * cfg.time_down:]
            return x.permute(0, 2, 3, 4, 1)
        # chunk k's frames: the last of a window that ends delay latent frames into the next chunk
        out = [self.decoder(z[:, :, max(0, k - n) * lf:(k + 1) * lf + delay])[:, :, -cfg.chunk_frames:]
               for k in range(first, k_chunks)]
        return torch.cat(out, 2).permute(0, 2, 3, 4, 1)

    def decode_next(self, latents: torch.Tensor, past: dict) -> torch.Tensor:
        """A causal decoder's stream: frames [B, T, H, W, 3] in [0, 1] of the next chunks ``latents``
        given ``past``, the state the calls before left (start with ``{}``; it is updated in place and
        holds two frames per temporal convolution, whatever the video's length). A video decoded chunk
        by chunk this way gives the frames of the whole video decoded at once, with one chunk's work
        per chunk (windows of ``vae_context`` chunks redo the context's).

        With ``vae_delay`` the frames lag: a call returns the chunks whose frames are complete (none
        for the first chunk, then the chunk before), ``past`` also holds the frames of the chunk not
        complete yet, and `decode_end` returns the last chunk."""
        if not self.cfg.vae_causal:
            raise ValueError("decode_next needs a causal decoder (vae_causal); use decode(latents, context)")
        self._check_latents(latents)
        z = (latents * self.latent_std + self.latent_mean).permute(0, 4, 1, 2, 3)
        if self.cfg.vae_delay:
            past["last"] = z[:, :, -1:].clone()  # held at the video's end (`decode_end`)
        return self._release(to_unit(self.decoder(z, past).permute(0, 2, 3, 4, 1)), past)

    def decode_end(self, past: dict) -> torch.Tensor:
        """The frames a stream of ``vae_delay`` L still holds when its video ends (the last chunk): the
        decoder reads the last latent frame held L more times, as `decode_raw` ends a video. Empty
        [B, 0, H, W, 3] for a decoder without delay, or a stream that decoded nothing."""
        if not self.cfg.vae_causal:
            raise ValueError("decode_end needs a causal decoder (vae_causal)")
        delay = self.cfg.vae_delay
        if not delay or "last" not in past:
            batch = next((v.shape[0] for v in past.values() if torch.is_tensor(v)), 0)
            return self.latent_mean.new_zeros(batch, 0, self.cfg.frame_size, self.cfg.frame_size, 3)
        z = past.pop("last").expand(-1, -1, delay, -1, -1)
        out = self._release(to_unit(self.decoder(z, past).permute(0, 2, 3, 4, 1)), past)
        past.pop("held", None)
        return out

    def prime(self, latents: torch.Tensor, past: dict) -> None:
        """Feed a stream ``latents`` whose frames it will not draw (a continued prefix's last chunks): the
        decoder's state then reads them as its past, and the next `decode_next` continues after them."""
        self.decode_next(latents, past)
        if self.cfg.vae_delay:  # the frames held are the prefix's, and so are the next call's first
            past.pop("held", None)
            past["drop"] = self.cfg.vae_delay * self.cfg.time_down

    def _release(self, frames: torch.Tensor, past: dict) -> torch.Tensor:
        """The whole chunks of a delayed stream's output so far; the rest waits in ``past``."""
        delay_frames = self.cfg.vae_delay * self.cfg.time_down
        if not delay_frames:
            return frames
        drop = past.get("drop", delay_frames)  # a stream's first outputs are of latent frames before the video
        past["drop"] = max(0, drop - frames.shape[1])
        frames = frames[:, drop:]
        if "held" in past:
            frames = torch.cat([past["held"], frames], 1)
        whole = frames.shape[1] // self.cfg.chunk_frames * self.cfg.chunk_frames
        past["held"] = frames[:, whole:].clone()
        return frames[:, :whole]

    def decode(self, latents: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """Frames float [B, T, H, W, 3] in [0, 1] (``context``: see `decode_raw`)."""
        return to_unit(self.decode_raw(latents, context))

    @torch.no_grad()
    def round_trip(self, frames) -> torch.Tensor:
        """uint8 frames [T, H, W, 3] (tensor or array) encoded (posterior mean) and decoded: uint8 [T, H, W, 3]
        on this model's device, what generated frames look like at best with this autoencoder."""
        x = torch.as_tensor(frames, device=self.latent_mean.device)[None]
        return self.video_of(self.encode(x)[0])

    @torch.no_grad()
    def video_of(self, latents) -> torch.Tensor:
        """uint8 frames [T, H, W, 3] of one video's latents [T / time_down, h, w, C] (any device and float
        type; e.g. `ChunkStream.latents` concatenated), decoded as a stream decodes them, on this model's
        device."""
        z = torch.as_tensor(latents).to(self.latent_mean.device, self.latent_mean.dtype)[None]
        if not self.cfg.vae_causal:
            return to_uint8(self.decode(z)[0])
        # chunk by chunk with a stream's state: the stream's very arithmetic (decoding whole agrees up to
        # float rounding only, since convolutions over other lengths may sum in another order)
        past, lf = {}, self.cfg.latent_frames
        frames = [self.decode_next(z[:, k:k + lf], past) for k in range(0, z.shape[1], lf)]
        return to_uint8(torch.cat(frames + [self.decode_end(past)], 1)[0])

    @torch.no_grad()
    def set_latent_stats(self, frames: torch.Tensor) -> None:
        """Per-channel mean / std of the posterior means of ``frames`` (a few clips suffice)."""
        mean, _ = self.encode_moments(frames)
        flat = mean.reshape(-1, mean.shape[-1])
        self.latent_mean.copy_(flat.mean(0))
        self.latent_std.copy_(flat.std(0).clamp_min(1e-4))


def decoder_loss(vae: VideoVAE, frames: torch.Tensor, generator=None, diff_weight: float = 0.0) -> torch.Tensor:
    """Reconstruction (MSE in [-1, 1] space) of clips of several chunks from posterior samples of a
    frozen encoder: what fine-tuning the decoder alone (`train.finetune_decoder`) minimises. With
    ``vae_context`` > 0 the first chunk of each clip is decoded alone and the others with context.
    ``diff_weight`` > 0 adds that weight times the MSE of the differences between consecutive frames
    (decoded against true): errors that change from one frame to the next (a seam, a step where a
    latent frame starts) cost more than errors that persist."""
    with torch.no_grad():
        z = vae.encode(frames, sample=True, generator=generator)
    recon = vae.decode_raw(z)
    target = to_signed(frames, recon.dtype)
    loss = F.mse_loss(recon, target)
    if diff_weight:
        loss = loss + diff_weight * F.mse_loss(recon.diff(dim=1), target.diff(dim=1))
    return loss


def vae_loss(vae: VideoVAE, frames: torch.Tensor, kl_weight: float = 1e-4, generator=None) -> dict:
    """Reconstruction (MSE in [-1, 1] space) + ``kl_weight`` * KL(posterior || N(0, I)) per latent element."""
    mean, logvar = vae.encode_moments(frames)
    noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    z = mean + noise * torch.exp(0.5 * logvar)
    # decode the raw sample: bypass the normalisation buffers
    z = (z - vae.latent_mean) / vae.latent_std
    recon = vae.decode_raw(z)
    rec = F.mse_loss(recon, to_signed(frames, recon.dtype))
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).mean()
    return {"loss": rec + kl_weight * kl, "recon": rec, "kl": kl}
