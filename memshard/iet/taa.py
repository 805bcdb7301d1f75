"""Threshold-aware augmentation (TAA): kept samples near the AGC threshold get augmented harder.

AGC keeps sample j iff ``r * l_j >= m[t_j]``. A kept sample whose scaled loss is only just above
the bank value is the next one the proxy will find "too easy", i.e. the next to be memorized.
The margin ``d_j = |r l_j - m[t_j]| / m[t_j]`` measures how far it is from that edge and the
strength ``s_j = exp(-a d_j)`` (in (0, 1], 1 at the edge) sets how hard it is augmented.

The augmentations are RandAugment-style, written here in plain torch (no torchvision: its wheels
pin torch versions) and batched on the model's device: each sample draws ``num_ops`` distinct
ops from seven (horizontal flip, x/y translation, rotation, brightness, contrast, cutout), each
applied at that sample's own magnitude. Every random choice comes from the caller's generator,
so a round is reproducible bit for bit.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

OPS = ("flip", "translate_x", "translate_y", "rotate", "brightness", "contrast", "cutout")
# Ranges at magnitude 1 (RandAugment magnitude 10): a third of the image, 30 degrees, half of
# the [-1, 1] range in brightness, +-60% contrast, a cutout half the image side.
MAX_TRANSLATE = 1.0 / 3.0
MAX_ROTATE_DEG = 30.0
MAX_BRIGHTNESS = 0.5
MAX_CONTRAST = 0.6
MAX_CUTOUT = 0.5


def strength(per_sample_loss: torch.Tensor, bank: torch.Tensor, t: torch.Tensor, ratio: float, alpha: float):
    """s = exp(-alpha * |ratio * l - m[t]| / m[t]); 0 where the bank is still 0 (nothing measured yet)."""
    m = bank[t]
    margin = (ratio * per_sample_loss - m).abs() / m.clamp_min(torch.finfo(m.dtype).tiny)
    return torch.where(m > 0, torch.exp(-alpha * margin), torch.zeros_like(m))


def magnitudes(strengths: torch.Tensor, max_magnitude: float, per_sample: bool) -> torch.Tensor:
    """Per-sample magnitude in [0, 1] (RandAugment's 0-10 scale divided by 10).

    ``per_sample=False`` is the prototype: one magnitude for the batch, round(mean(s) * max).
    """
    if per_sample:
        return (strengths * max_magnitude / 10.0).clamp(0.0, 1.0)
    level = torch.round(strengths.mean() * max_magnitude) / 10.0
    return torch.full_like(strengths, float(level)).clamp(0.0, 1.0)


def choose_ops(batch: int, num_ops: int, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    """(B, len(OPS)) boolean mask: ``num_ops`` distinct ops per sample, uniformly drawn."""
    keys = torch.rand(batch, len(OPS), generator=gen, device=device)
    picked = keys.argsort(dim=1)[:, :num_ops]
    mask = torch.zeros(batch, len(OPS), dtype=torch.bool, device=device)
    return mask.scatter_(1, picked, True)


def augment(
    x: torch.Tensor,
    magnitude: torch.Tensor,
    gen: torch.Generator,
    num_ops: int = 2,
    ops: torch.Tensor | None = None,
    clamp: bool = True,
) -> torch.Tensor:
    """Augment images ``x`` (B, C, H, W, values in [-1, 1]) at per-sample ``magnitude`` in [0, 1].

    A sample with magnitude 0 comes back unchanged. Output stays in [-1, 1] and keeps the shape.
    ``ops`` may force the (B, 7) op mask (tests); otherwise it is drawn from ``gen``.
    ``clamp=False`` for VAE latents, which are not bounded: the same ops then act on the
    latent grid (geometric ops commute closely with the VAE; brightness/contrast shift and
    scale latent channels; cutout zeroes a latent patch). Decoding to pixels and re-encoding
    per step would cost two VAE passes per augmented sample.
    """
    if x.dim() != 4:
        raise ValueError(f"augment expects (B, C, H, W), got shape {tuple(x.shape)}")
    b, _, h, w = x.shape
    dev = x.device
    mag = magnitude.to(dev, x.dtype).clamp(0.0, 1.0)
    mask = ops if ops is not None else choose_ops(b, num_ops, gen, dev)
    mask = mask & (mag > 0).unsqueeze(1)
    u = torch.rand(b, 8, generator=gen, device=dev, dtype=x.dtype)
    sign = torch.where(u[:, :4] < 0.5, -1.0, 1.0).to(x.dtype)

    # geometric ops as one affine sampling grid per sample (identity where not selected)
    f = mask.to(x.dtype)
    flip = 1.0 - 2.0 * f[:, 0]
    tx = f[:, 1] * sign[:, 0] * mag * MAX_TRANSLATE * 2.0  # grid units: the image spans [-1, 1]
    ty = f[:, 2] * sign[:, 1] * mag * MAX_TRANSLATE * 2.0
    ang = f[:, 3] * sign[:, 2] * mag * math.radians(MAX_ROTATE_DEG)
    cos, sin = torch.cos(ang), torch.sin(ang)
    theta = torch.stack([torch.stack([cos * flip, -sin, tx], dim=1), torch.stack([sin * flip, cos, ty], dim=1)], dim=1)
    out = x
    geometric = mask[:, :4].any(dim=1)
    if bool(geometric.any()):
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        warped = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        out = torch.where(geometric.view(b, 1, 1, 1), warped, x)

    # photometric ops
    bright = f[:, 4] * sign[:, 3] * mag * MAX_BRIGHTNESS
    out = out + bright.view(b, 1, 1, 1)
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    contrast = 1.0 + f[:, 5] * (2.0 * u[:, 4] - 1.0) * mag * MAX_CONTRAST
    adjusted = mean + (out - mean) * contrast.view(b, 1, 1, 1)
    out = torch.where(mask[:, 5].view(b, 1, 1, 1), adjusted, out)  # exact identity where not selected

    # cutout: a square of side mag * MAX_CUTOUT * min(H, W) at a random centre, filled with mid-grey
    side = (f[:, 6] * mag * MAX_CUTOUT * min(h, w)).round()
    cy, cx = u[:, 5] * h, u[:, 6] * w
    ys = torch.arange(h, device=dev, dtype=x.dtype).view(1, h, 1)
    xs = torch.arange(w, device=dev, dtype=x.dtype).view(1, 1, w)
    half = (side / 2).view(b, 1, 1)
    hole = ((ys - cy.view(b, 1, 1)).abs() < half) & ((xs - cx.view(b, 1, 1)).abs() < half)
    out = torch.where(hole.unsqueeze(1), torch.zeros_like(out), out)
    return out.clamp(-1.0, 1.0) if clamp else out
