"""A tiny random Stable-Diffusion-style pipeline directory, built from configs.

Real SD weights cannot be had offline; the fine-tuning path (frozen CLIP text encoder, frozen
VAE, UNet2DConditionModel in latent space, served as a StableDiffusionPipeline) is exercised
with this stand-in: same classes and directory layout, a character-level CLIP tokenizer and
a few hundred thousand random parameters. ``memshard tiny-pipeline DIR`` writes one.
"""

from __future__ import annotations

import json
import os
import string

import torch


def _clip_tokenizer_files(out: str) -> None:
    """vocab.json + merges.txt of a character-level CLIP BPE (no merges): every word splits into letters."""
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    vocab: dict[str, int] = {}
    for c in chars:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "vocab.json"), "w") as fh:
        json.dump(vocab, fh)
    with open(os.path.join(out, "merges.txt"), "w") as fh:
        fh.write("#version: 0.2\n")


def write_tiny_sd_pipeline(out: str, seed: int = 0, image_size: int = 32, max_length: int = 32) -> str:
    """Write a StableDiffusionPipeline directory with tiny random components to ``out``."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    tok_dir = os.path.join(out, "tokenizer")
    _clip_tokenizer_files(tok_dir)
    tokenizer = CLIPTokenizer(
        os.path.join(tok_dir, "vocab.json"), os.path.join(tok_dir, "merges.txt"), model_max_length=max_length
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer.get_vocab()),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=image_size,
    )
    unet = UNet2DConditionModel(
        sample_size=image_size // 2,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    return out
