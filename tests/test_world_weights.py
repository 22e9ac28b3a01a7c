"""The shipped `small` checkpoint loads, matches its config, and its autoencoder reconstructs."""

from dataclasses import replace
from pathlib import Path

import torch

from maskc.world_model import configs, data
from maskc.world_model.checkpoint import load_checkpoint
from maskc.world_model.vae import receptive_latent_frames

WEIGHTS = Path(configs.__file__).resolve().parent / "weights" / "small.safetensors"


def test_shipped_small_weights_load_and_reconstruct():
    assert WEIGHTS.exists() and WEIGHTS.stat().st_size <= 16 * 2**20
    model, cfg, meta = load_checkpoint(WEIGHTS)
    # `magi train --config small`, then `magi finetune-decoder` (session 27: the decoder reads the chunk
    # before; session 29: a causal decoder reading the 3 chunks before, twice fine-tuned; session 36: it
    # reads one latent frame ahead, twice fine-tuned, the second time with the frame-difference term)
    assert cfg == replace(configs.get_config("small"), vae_context=3, vae_causal=True, vae_delay=1)
    ft = meta["decoder_finetune"]
    assert meta["step"] > 0 and ft["context"] == 3 and ft["causal"] and ft["delay"] == 1 and ft["diff_weight"] == 4
    assert ft["previous"]["delay"] == 1 and "delay" not in ft["previous"]["previous"]  # before delays were recorded
    assert ft["previous"]["previous"]["previous"]["causal"]
    assert ft["previous"]["previous"]["previous"]["previous"]["context"] == 1
    # the causal decoder's windows cover its receptive field: streaming decodes what decoding whole does
    assert cfg.vae_context * cfg.latent_frames >= receptive_latent_frames(cfg)
    for name, t in model.state_dict().items():
        assert torch.isfinite(t).all(), name
    clip = data.generate(seed=7, n_chunks=2)  # a small seed: held out from training; the 2nd chunk decodes with context
    frames = torch.as_tensor(clip.frames)[None]
    with torch.no_grad():
        recon = model.vae.decode(model.vae.encode(frames))
    target = frames.float() / 255.0
    mse = float(((recon - target) ** 2).mean())
    blank = float(((target - target.mean()) ** 2).mean())  # predicting the mean colour
    assert recon.shape == target.shape
    assert mse < 0.25 * blank, (mse, blank)


def test_stores_bf16_reads_the_header(tmp_path):
    """`finetune_decoder` writes its output in the source's float width: the shipped file is bf16."""
    from maskc.world_model.checkpoint import save_checkpoint, stores_bf16
    from maskc.world_model.dit import WorldModel

    assert stores_bf16(WEIGHTS)
    tiny = WorldModel(configs.get_config("tiny"))
    assert not stores_bf16(save_checkpoint(tmp_path / "f32.safetensors", tiny, step=0))
    assert stores_bf16(save_checkpoint(tmp_path / "bf16.safetensors", tiny, step=0, dtype=torch.bfloat16))
