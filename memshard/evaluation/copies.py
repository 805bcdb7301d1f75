"""Augmented near-copies of training images, for calibrating the copy-similarity threshold.

A generation is flagged as a copy when its feature similarity to its nearest training image exceeds a threshold.
That threshold is calibrated empirically: near-copies of training images (crop, flip, colour jitter, JPEG) show what
similarity a *copy* reaches, while nearest *distinct* training images show what similarity unrelated-but-similar
images reach. Implemented with torch + PIL only (no torchvision) so it works in every image of the project.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

__all__ = ["augmented_copies", "calibration_pairs", "distinct_subset"]

_LUMA = (0.299, 0.587, 0.114)


def _gray(x: torch.Tensor) -> torch.Tensor:
    """Per-pixel luminance (1,H,W) of a (C,H,W) image."""
    if x.shape[0] == 1:
        return x
    w = torch.tensor(_LUMA, dtype=x.dtype, device=x.device).view(3, 1, 1)
    return (x * w).sum(0, keepdim=True)


def _jpeg(x: torch.Tensor, quality: int) -> torch.Tensor:
    """Round-trip one (C,H,W) image through JPEG, the most common lossy re-encoding a scraped copy undergoes."""
    arr = (x.clamp(0, 1) * 255.0).round().to(torch.uint8)
    arr_np = arr[0].numpy() if arr.shape[0] == 1 else arr.permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr_np)).save(buf, format="JPEG", quality=quality)  # uint8 -> L / RGB
    buf.seek(0)
    out = np.asarray(Image.open(buf).convert("L" if arr.shape[0] == 1 else "RGB"), dtype=np.float32) / 255.0
    t = torch.from_numpy(out.copy())
    return t[None] if t.ndim == 2 else t.permute(2, 0, 1)


def _near_copy(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Apply one random near-copy chain to a (C,H,W) float image in [0,1] on CPU."""
    c, h, w = x.shape
    # Random resized crop keeping 70-100% of the side (same aspect), resized back with bilinear interpolation.
    frac = rng.uniform(0.7, 1.0)
    ch, cw = max(1, round(frac * h)), max(1, round(frac * w))
    top = int(rng.integers(0, h - ch + 1))
    left = int(rng.integers(0, w - cw + 1))
    crop = x[:, top : top + ch, left : left + cw]
    x = F.interpolate(crop[None], size=(h, w), mode="bilinear", align_corners=False)[0]
    if rng.random() < 0.5:
        x = x.flip(-1)
    # Colour jitter: brightness, contrast (around the mean luminance) and, for RGB, saturation, each +-20%.
    x = (x * rng.uniform(0.8, 1.2)).clamp(0, 1)
    mean = _gray(x).mean()
    x = (mean + (x - mean) * rng.uniform(0.8, 1.2)).clamp(0, 1)
    if c == 3:
        g = _gray(x)
        x = (g + (x - g) * rng.uniform(0.8, 1.2)).clamp(0, 1)
    return _jpeg(x, int(rng.integers(60, 96)))


def augmented_copies(images: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Return one random near-copy of every image (same shape, dtype and device, values in [0,1]).

    Each image gets its own crop/flip/jitter/JPEG chain drawn from a generator seeded with ``seed``, so the
    calibration (and therefore the threshold) is reproducible.
    """
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be (N,C,H,W) with C in {{1,3}}, got shape {tuple(images.shape)}")
    rng = np.random.default_rng(seed)
    src = images.detach().float().cpu().clamp(0, 1)
    out = torch.stack([_near_copy(img, rng) for img in src]) if src.shape[0] else src.clone()
    return out.clamp(0, 1).to(device=images.device, dtype=images.dtype)


def _unit_rows(feats: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(feats, torch.Tensor):
        feats = feats.detach().cpu().double().numpy()
    arr = np.asarray(feats, dtype=np.float64)
    arr = arr.reshape(arr.shape[0], -1)
    return arr / np.maximum(np.linalg.norm(arr, axis=1, keepdims=True), 1e-12)


def calibration_pairs(
    features_fn: Callable[[torch.Tensor], torch.Tensor | np.ndarray],
    images: torch.Tensor,
    seed: int = 0,
    max_images: int = 512,
) -> tuple[np.ndarray, np.ndarray]:
    """Score copies versus distinct images with ``features_fn`` to calibrate the copy threshold.

    Takes a seeded subset of at most ``max_images`` images (bounding the O(n^2) similarity matrix) and returns
    ``(copy_scores, distinct_scores)`` as float64 arrays of the subset size: ``copy_scores[i]`` is the cosine
    similarity between image ``i`` and its augmented copy, ``distinct_scores[i]`` the highest cosine similarity
    between image ``i`` and any *other* image of the subset. A good threshold separates the two distributions.
    """
    n = images.shape[0]
    if n < 2:
        raise ValueError(f"calibration_pairs needs at least 2 images, got {n}")
    if max_images < 2:
        raise ValueError(f"max_images must be >= 2, got {max_images}")
    rng = np.random.default_rng(seed)
    if n > max_images:
        idx = np.sort(rng.choice(n, size=max_images, replace=False))
        images = images[torch.from_numpy(idx)]
    copies = augmented_copies(images, seed=seed)
    with torch.no_grad():
        f = _unit_rows(features_fn(images))
        fc = _unit_rows(features_fn(copies))
    if f.shape != fc.shape or f.shape[0] != images.shape[0]:
        raise ValueError(f"features_fn returned shapes {f.shape} and {fc.shape} for {images.shape[0]} images")
    copy_scores = np.sum(f * fc, axis=1)
    sim = f @ f.T
    np.fill_diagonal(sim, -np.inf)
    distinct_scores = sim.max(axis=1)
    return copy_scores.astype(np.float64), distinct_scores.astype(np.float64)


def distinct_subset(features: torch.Tensor | np.ndarray, max_similarity: float) -> np.ndarray:
    """Indices (increasing) of a subset in which no two rows have cosine similarity >= ``max_similarity``.

    Greedy in row order: a row is kept unless it is that similar to a row kept before it. Why:
    a benchmark of copying needs training images that are distinct from each other; emoji come
    in near-identical variants (skin tones, flags that differ in one stripe), and with a variant
    in the set a copy has a second neighbour as close as its first, so the 1/3 rule never fires
    and a held-out prompt for one variant "copies" its sibling by construction.
    """
    f = _unit_rows(features)
    if f.shape[0] == 0:
        return np.zeros(0, dtype=np.int64)
    if not -1.0 <= max_similarity <= 1.0:
        raise ValueError(f"max_similarity must be a cosine in [-1, 1], got {max_similarity}")
    kept: list[int] = []
    blocked = np.zeros(f.shape[0], dtype=bool)
    for i in range(f.shape[0]):
        if blocked[i]:
            continue
        kept.append(i)
        blocked[i:] |= f[i:] @ f[i] >= max_similarity
    return np.asarray(kept, dtype=np.int64)
