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
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DConditionModel, UNet2DModel

from memshard.config import MemshardConfig

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


# Text-conditional (UNet2DConditionModel) counterparts: cross-attention in the attention
# blocks; cross_attention_dim always follows the text encoder.
COND_UNET_PRESETS: dict[str, dict[str, Any]] = {
    # ~0.45M parameters with a 384-dim (MiniLM) context, cross-attention at the lowest
    # resolution only: ~7 steps/s at batch 32, 16x16 on one CPU core (the demo-t2i model).
    "tiny": {
        "layers_per_block": 1,
        "block_out_channels": (16, 32, 32),
        "down_block_types": ("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        "norm_num_groups": 8,
        "attention_head_dim": 8,
    },
    # ~2M: cross-attention at the two lower resolutions; ~4 steps/s at batch 32, 16x16 on 2
    # CPU cores: the PRSS benchmark's cpu model (after 8,000 steps it copies at CFG 1.5 but
    # does not hold 7.5: BENCHMARKS.md).
    "small": {
        "layers_per_block": 1,
        "block_out_channels": (32, 64, 64),
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        "norm_num_groups": 16,
        "attention_head_dim": 8,
    },
    # a GPU-sized model for 32-64 px (the PRSS benchmark's gpu size): two layers a block,
    # cross-attention at the two lower resolutions.
    "base": {
        "layers_per_block": 2,
        "block_out_channels": (64, 128, 256),
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        "norm_num_groups": 32,
        "attention_head_dim": 8,
    },
}


def _json(path: Path) -> dict[str, Any]:
    return {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}


_PICKLE_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def has_safetensors(directory: Path, what: str) -> bool:
    """Whether ``directory`` holds safetensors weights; pickle-only weights are refused (never unpickled)."""
    if not directory.is_dir():
        return False
    if any(directory.glob("*.safetensors")):
        return True
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in _PICKLE_WEIGHTS)
    if pickles:
        raise ValueError(
            f"{what} {directory} holds only pickle weights ({', '.join(pickles)}); memshard loads safetensors only "
            "(pickle files can run code): convert them, e.g. save_pretrained(..., safe_serialization=True)"
        )
    return False


def _pretrained_mismatch(what: str, source: str, base: dict[str, Any], need: dict[str, Any]) -> None:
    """Refuse a pretrained model whose stored architecture contradicts what the config and data need."""
    for key, want in need.items():
        have = base.get(key)
        if have != want:
            raise ValueError(f"{what} {source} has {key}={have} but the config and data need {key}={want}")


def downsampling_factor(config: dict[str, Any]) -> int:
    """How many times the UNet halves its input: sample sizes must be a multiple of this (UNet2DModel)."""
    return 2 ** max(len(config.get("down_block_types") or ()) - 1, 0)


def text_dim(cfg: MemshardConfig) -> int:
    """Hidden size of the configured text encoder, read from its config (no weights loaded)."""
    name = cfg.model.pipeline if cfg.model.text_encoder == "pipeline" else cfg.model.text_encoder
    if name == "minilm":
        from memshard.models.text import minilm_dir

        path = minilm_dir() / "config.json"
    else:
        base = Path(name)
        path = base / "text_encoder" / "config.json" if (base / "text_encoder").is_dir() else base / "config.json"
        has_safetensors(path.parent, "model.text_encoder")
    if not path.is_file():
        raise ValueError(f"model.text_encoder {name!r}: no config.json at {path}")
    conf = _json(path)
    return int(conf.get("hidden_size") or conf["text_config"]["hidden_size"])


def latent_shape(cfg: MemshardConfig) -> tuple[int, int, int] | None:
    """(channels, h, w) of the VAE latents of a latent pipeline, else None (pixel space)."""
    if cfg.model.pipeline is None:
        return None
    vae_cfg = Path(cfg.model.pipeline) / "vae" / "config.json"
    if not vae_cfg.is_file():
        return None
    conf = _json(vae_cfg)
    factor = 2 ** (len(conf.get("block_out_channels", [0])) - 1)
    if cfg.data.image_size % factor:
        raise ValueError(f"data.image_size {cfg.data.image_size} is not a multiple of the VAE's factor {factor}")
    side = cfg.data.image_size // factor
    return int(conf.get("latent_channels", 4)), side, side


def unet_class(cfg: MemshardConfig) -> type:
    return UNet2DConditionModel if cfg.model.text_conditional else UNet2DModel


def unet_config(cfg: MemshardConfig) -> dict[str, Any]:
    """The UNet config dict for this run (preset, file or pipeline, then overrides, then data shape)."""
    if cfg.model.text_conditional:
        return _cond_unet_config(cfg)
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
        if has_safetensors(path, "model.preset"):  # pretrained weights: their shapes are fixed
            need = {"in_channels": cfg.data.channels, "out_channels": cfg.data.channels}
            need["num_class_embeds"] = cfg.data.num_classes if cfg.model.class_conditional else None
            _pretrained_mismatch("pretrained UNet", str(path), base, need)
    base.update(cfg.model.overrides)
    base.update(
        sample_size=cfg.data.image_size,
        in_channels=cfg.data.channels,
        out_channels=cfg.data.channels,
    )
    if cfg.model.class_conditional:
        base["num_class_embeds"] = cfg.data.num_classes
    factor = downsampling_factor(base)
    if cfg.data.image_size % factor:
        raise ValueError(
            f"data.image_size={cfg.data.image_size} is not a multiple of {factor}, the UNet's downsampling factor "
            f"({len(base['down_block_types'])} blocks, model.preset {preset!r}): its skip connections would not line up"
        )
    return base


def unet_shapes(cfg: MemshardConfig) -> dict[str, tuple[int, ...]]:
    """name -> shape of every tensor of the config's UNet (built on the meta device: nothing allocated)."""
    from memshard.io.weights import model_shapes

    return model_shapes(unet_class(cfg), unet_config(cfg))


def _cond_unet_config(cfg: MemshardConfig) -> dict[str, Any]:
    pretrained = False
    if cfg.model.pipeline is not None:
        path = Path(cfg.model.pipeline) / "unet" / "config.json"
        if not path.is_file():
            raise ValueError(f"model.pipeline {cfg.model.pipeline}: no unet/config.json (not a diffusers pipeline?)")
        base = _json(path)
        pretrained = has_safetensors(path.parent, "model.pipeline UNet")
        for part in ("vae", "text_encoder"):
            has_safetensors(Path(cfg.model.pipeline) / part, f"model.pipeline {part}")
    elif cfg.model.preset in COND_UNET_PRESETS:
        base = dict(COND_UNET_PRESETS[cfg.model.preset])
    else:
        path = Path(cfg.model.preset)
        cfg_file = path / "config.json" if path.is_dir() else path
        if not cfg_file.is_file():
            raise ValueError(
                f"model.preset {cfg.model.preset!r} is neither a built-in text-conditional preset "
                f"({', '.join(COND_UNET_PRESETS)}) nor a UNet2DConditionModel config.json / model directory"
            )
        base = _json(cfg_file)
        pretrained = has_safetensors(path, "model.preset")
    base.update(cfg.model.overrides)
    shape = latent_shape(cfg)
    channels, side = (shape[0], shape[1]) if shape is not None else (cfg.data.channels, cfg.data.image_size)
    if pretrained:
        space = "the VAE's latent channels" if shape is not None else "data.channels"
        for key in ("in_channels", "out_channels"):
            if base.get(key) != channels:
                raise ValueError(
                    f"pretrained UNet of {cfg.model.pipeline or cfg.model.preset} has {key}={base.get(key)} "
                    f"but {space} give {channels}"
                )
    dim = text_dim(cfg)
    if cfg.model.pipeline is not None and base.get("cross_attention_dim") not in (None, dim):
        raise ValueError(
            f"model.pipeline UNet has cross_attention_dim={base.get('cross_attention_dim')} but the text encoder "
            f"gives {dim}-dim states (model.text_encoder)"
        )
    base.update(sample_size=side, in_channels=channels, out_channels=channels, cross_attention_dim=dim)
    return base


def build_unet(cfg: MemshardConfig) -> UNet2DModel | UNet2DConditionModel:
    """A fresh UNet (seeded by the caller); loads pretrained weights if preset is a model dir."""
    if cfg.model.text_conditional:
        config = unet_config(cfg)
        source = Path(cfg.model.pipeline) / "unet" if cfg.model.pipeline is not None else Path(cfg.model.preset)
        if source.is_dir() and any(source.glob("*.safetensors")):
            unet = UNet2DConditionModel.from_pretrained(str(source), low_cpu_mem_usage=False, use_safetensors=True)
            for key in ("in_channels", "out_channels", "cross_attention_dim"):
                if unet.config.get(key) != config.get(key):
                    raise ValueError(
                        f"pretrained UNet {source} has {key}={unet.config.get(key)} but the config needs "
                        f"{config.get(key)} (data / VAE / text encoder)"
                    )
            return unet
        try:
            return UNet2DConditionModel(**config)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"model config not accepted by UNet2DConditionModel: {exc}") from None
    config = unet_config(cfg)
    path = Path(cfg.model.preset)
    if path.is_dir() and any(path.glob("*.safetensors")):
        unet = UNet2DModel.from_pretrained(str(path), low_cpu_mem_usage=False, use_safetensors=True)
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
    """The training noise schedule: the fine-tuned pipeline's own when there is one, else from ``model``."""
    if cfg.model.pipeline is not None:
        path = Path(cfg.model.pipeline) / "scheduler" / "scheduler_config.json"
        if path.is_file():
            conf = _json(path)
            for key in ("num_train_timesteps", "prediction_type"):
                if key in conf and conf[key] != getattr(cfg.model, key):
                    raise ValueError(
                        f"model.{key}={getattr(cfg.model, key)!r} but the pipeline's scheduler has {conf[key]!r}"
                    )
            return DDPMScheduler.from_config(conf)
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
