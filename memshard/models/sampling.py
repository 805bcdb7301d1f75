"""Sampling from a served model with DDIM (eta 0), and sample grids.

The served directory is a diffusers DDPMPipeline; we run our own DDIM loop over its UNet
so class labels, seeds per image and the raw/EMA choice are all explicit.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from diffusers import DDIMScheduler, UNet2DModel
from PIL import Image

from memshard.io.storage import Storage
from memshard.seeds import image_seeds


def load_served_unet(
    run_uri: str, weights: str = "ema", round_id: int | None = None
) -> tuple[UNet2DModel, dict[str, Any], dict[str, Any]]:
    """(unet, scheduler config, memshard info) of RUN/served; ``weights`` = ema | raw.

    ``round_id`` loads the global weights committed after that round instead (same
    architecture as the served model), e.g. to trace memorization over training.
    """
    from memshard.io.rundir import RunDir, round_name
    from memshard.io.weights import shapes_of

    store = Storage(run_uri)
    RunDir(run_uri).check_served()  # safetensors only, and shapes that fit the config: before anything is loaded
    with store.local_copy("served") as local:
        info = json.loads(open(os.path.join(local, "memshard.json")).read())
        sub = "unet_raw" if weights == "raw" and os.path.isdir(os.path.join(local, "unet_raw")) else "unet"
        if weights == "raw" and sub == "unet" and info.get("weights") == "ema":
            raise FileNotFoundError(f"{run_uri}: raw weights not found in RUN/served/unet_raw")
        unet = UNet2DModel.from_pretrained(os.path.join(local, sub), low_cpu_mem_usage=False, use_safetensors=True)
        sched = json.loads(open(os.path.join(local, "scheduler", "scheduler_config.json")).read())
    if round_id is not None:
        run = RunDir(run_uri)
        if not run.store.exists(f"rounds/{round_name(round_id)}/global.safetensors"):
            raise FileNotFoundError(f"{run_uri}: no committed weights for round {round_id}")
        raw, ema = run.load_weights(round_id, expected=shapes_of(unet.state_dict()))
        unet.load_state_dict(ema if weights == "ema" and ema is not None else raw)
        info = {**info, "round": round_id}
    return unet, sched, info


@torch.no_grad()
def ddim_sample(
    unet: UNet2DModel,
    scheduler_config: dict[str, Any],
    num: int,
    steps: int = 50,
    seed: int = 0,
    batch_size: int = 64,
    class_labels: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
    index_offset: int = 0,
    seeds: Sequence[int] | None = None,
) -> torch.Tensor:
    """``num`` images in [0, 1], shape (num, C, H, W).

    Image i depends only on (seed, index_offset + i), so generation can be split over
    workers in any way and still give the same set of images. ``seeds`` instead gives image
    i the noise seed ``seeds[i]`` (``memshard.seeds.image_seeds(seed, num, index_offset)`` is the
    default), so a server can batch requests with different seeds into one call.
    """
    noise_seeds = [int(s) for s in seeds] if seeds is not None else image_seeds(seed, num, index_offset)
    if len(noise_seeds) != num:
        raise ValueError(f"{len(noise_seeds)} seeds for {num} images")
    unet = unet.to(device).eval()
    sched = DDIMScheduler.from_config(scheduler_config)
    sched.set_timesteps(steps)
    c, size = unet.config.in_channels, unet.config.sample_size
    outs = []
    for start in range(0, num, batch_size):
        n = min(batch_size, num - start)
        gens = [torch.Generator().manual_seed(s) for s in noise_seeds[start : start + n]]
        x = torch.stack([torch.randn((c, size, size), generator=g) for g in gens]).to(device)
        labels = class_labels[start : start + n].to(device) if class_labels is not None else None
        for t in sched.timesteps:
            tt = torch.full((n,), int(t), device=device, dtype=torch.long)
            pred = unet(x, tt, class_labels=labels).sample
            x = sched.step(pred, t, x, eta=0.0).prev_sample
        outs.append(((x.clamp(-1, 1) + 1) / 2).cpu())
    return torch.cat(outs)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [0,1] -> uint8 (N, H, W, C)."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def grid(images: np.ndarray, cols: int | None = None, pad: int = 2, scale: int = 1) -> Image.Image:
    """Tile uint8 (N, H, W, C) images into one picture (white padding)."""
    n, h, w, c = images.shape
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    canvas = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i in range(n):
        r, q = divmod(i, cols)
        canvas[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + q * (w + pad) : pad + q * (w + pad) + w] = images[i]
    img = Image.fromarray(canvas[..., 0] if c == 1 else canvas)
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST) if scale > 1 else img
