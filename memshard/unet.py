"""The diffusion model each proxy trains: a diffusers UNet2DModel and its DDPM schedule.

Architectures come from named presets (``tiny`` for laptops and tests, ``small`` for
quick GPU benchmarks, ``ddpm-cifar10`` = the 35.7M-parameter DDPM CIFAR-10 network the
IET-AGC authors train) or from a diffusers config / pretrained directory. Sample size and
channels always follow ``data`` so a preset works for any resolution.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel

from .config import MemshardConfig

UNET_PRESETS: dict[str, dict[str, Any]] = {
    # ~0.28M parameters at 1 channel: trains at ~13 steps/s (batch 32, 16x16) on one CPU core.
    "tiny": {
        "layers_per_block": 1,
        "block_out_channels": (16, 32, 32),
        "down_block_types": ("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        "up_block_types": ("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        "norm_num_groups": 8,
        "attention_head_dim": 16,
    },
    # ~9M parameters: the calibration model of the GPU memorization benchmark.
    "small": {
        "layers_per_block": 2,
        "block_out_channels": (64, 128, 128),
        "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        "norm_num_groups": 32,
    },
    # Ho et al. DDPM CIFAR-10 (35.7M at 3 channels): attention at 16x16, dropout 0.1.
    "ddpm-cifar10": {
        "layers_per_block": 2,
        "block_out_channels": (128, 256, 256, 256),
        "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        "dropout": 0.1,
    },
}


def unet_config(cfg: MemshardConfig) -> dict[str, Any]:
    """The UNet2DModel config dict for this run (preset or file, then overrides, then data shape)."""
    preset = cfg.model.preset
    if preset in UNET_PRESETS:
        base = dict(UNET_PRESETS[preset])
    else:
        path = Path(preset)
        cfg_file = path / "config.json" if path.is_dir() else path
        if not cfg_file.is_file():
            raise ValueError(
                f"model.preset {preset!r} is neither a built-in preset ({', '.join(UNET_PRESETS)}) "
                "nor a diffusers UNet config.json / model directory"
            )
        base = {k: v for k, v in json.loads(cfg_file.read_text()).items() if not k.startswith("_")}
    base.update(cfg.model.overrides)
    base.update(
        sample_size=cfg.data.image_size,
        in_channels=cfg.data.channels,
        out_channels=cfg.data.channels,
    )
    if cfg.model.class_conditional:
        base["num_class_embeds"] = cfg.data.num_classes
    return base


def build_unet(cfg: MemshardConfig) -> UNet2DModel:
    """A fresh UNet (seeded by the caller); loads pretrained weights if preset is a model dir."""
    config = unet_config(cfg)
    path = Path(cfg.model.preset)
    if path.is_dir() and any(path.glob("*.safetensors")):
        unet = UNet2DModel.from_pretrained(str(path), low_cpu_mem_usage=False)
        for key in ("in_channels", "out_channels", "num_class_embeds"):
            if unet.config.get(key) != config.get(key):
                raise ValueError(
                    f"pretrained UNet {path} has {key}={unet.config.get(key)} but the config needs {config.get(key)} "
                    "(data.channels / model.class_conditional)"
                )
        unet.register_to_config(sample_size=config["sample_size"])
        return unet
    try:
        return UNet2DModel(**config)
    except TypeError as exc:
        raise ValueError(f"model config not accepted by UNet2DModel: {exc}") from None


def build_scheduler(cfg: MemshardConfig) -> DDPMScheduler:
    return DDPMScheduler(
        num_train_timesteps=cfg.model.num_train_timesteps,
        beta_schedule=cfg.model.beta_schedule,
        beta_start=cfg.model.beta_start,
        beta_end=cfg.model.beta_end,
        prediction_type=cfg.model.prediction_type,
        clip_sample=True,
    )


def ddim_from(scheduler_config: dict[str, Any]) -> DDIMScheduler:
    return DDIMScheduler.from_config(scheduler_config)


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
