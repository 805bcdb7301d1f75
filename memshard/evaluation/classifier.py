"""Small image classifier used to score the *alignment* of class-conditional generations.

Alignment is measured as the accuracy of a classifier that the project trains itself on the training set: a
generation for class ``c`` counts as aligned when the classifier predicts ``c``. Training our own small CNN (instead
of relying on a pretrained network) keeps the metric available offline, for any resolution and for 1- or 3-channel
data, and makes it reproducible from a seed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SmallCNN", "class_accuracy", "predict", "train_classifier"]


def _block(cin: int, cout: int) -> nn.Sequential:
    """conv-bn-relu: BN makes training from scratch stable with a fixed, untuned learning rate."""
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SmallCNN(nn.Module):
    """Three conv-bn-relu blocks with pooling, global average pooling and a linear head (~100k parameters).

    Global average pooling makes the network independent of the image size (anything >= 8 px works), so the same
    class serves every dataset preset; the size is small enough to train in seconds to minutes on CPU.
    """

    def __init__(self, channels: int, num_classes: int, width: int = 32) -> None:
        super().__init__()
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        self.channels = channels
        self.num_classes = num_classes
        self.features = nn.Sequential(
            _block(channels, width),
            nn.MaxPool2d(2),
            _block(width, 2 * width),
            nn.MaxPool2d(2),
            _block(2 * width, 4 * width),
            nn.AdaptiveAvgPool2d(1),
        )
        self.head = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return class logits (N, num_classes); inputs are images in [0,1], centred here so callers need not."""
        return self.head(self.features(x * 2.0 - 1.0).flatten(1))


def _check_images(images: torch.Tensor) -> None:
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be (N,C,H,W) with C in {{1,3}}, got shape {tuple(images.shape)}")
    if min(images.shape[-2:]) < 8:
        raise ValueError(f"images must be at least 8x8, got {tuple(images.shape[-2:])}")


def _random_shift(x: torch.Tensor, gen: torch.Generator, pad: int = 2) -> torch.Tensor:
    """Shift each image by up to ``pad`` px (pad + random crop): cheap augmentation that curbs overfitting."""
    n, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(h)).to(x.device)
    cols = (dx[:, None] + torch.arange(w)).to(x.device)
    bi = torch.arange(n, device=x.device)[:, None, None, None]
    ci = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[bi, ci, rows[:, None, :, None], cols[:, None, None, :]]


def train_classifier(
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    epochs: int = 5,
    batch_size: int = 128,
    lr: float = 2e-3,
    seed: int = 0,
    holdout: float = 0.1,
    device: str | torch.device = "cpu",
) -> tuple[SmallCNN, dict]:
    """Train a :class:`SmallCNN` on ``images`` (float in [0,1], (N,C,H,W)) and ``labels``.

    A seeded ``holdout`` fraction is kept aside so the report says how trustworthy the classifier is: an alignment
    score is only meaningful when the holdout accuracy is high. All randomness (init, split, shuffling, shifts) is
    derived from ``seed`` so that the metric is reproducible on CPU; the global RNG state is restored afterwards.

    Returns the model in eval mode and ``{"train_accuracy", "holdout_accuracy", "epochs", "num_train",
    "num_holdout"}`` (``holdout_accuracy`` is NaN when there is no holdout).
    """
    _check_images(images)
    labels = torch.as_tensor(labels).reshape(-1)
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integers, got {labels.dtype}")
    labels = labels.long().cpu()
    if labels.numel() != images.shape[0]:
        raise ValueError(f"{labels.numel()} labels for {images.shape[0]} images")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got range [{int(labels.min())}, {int(labels.max())}]")
    if num_classes < 2 or labels.unique().numel() < 2:
        raise ValueError("need at least 2 classes present in the labels to train a classifier")
    if not 0.0 <= holdout < 1.0:
        raise ValueError(f"holdout must be in [0, 1), got {holdout}")
    if epochs < 1 or batch_size < 1:
        raise ValueError("epochs and batch_size must be >= 1")

    device = torch.device(device)
    images = images.detach().float().cpu()
    n = images.shape[0]
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=gen)
    n_hold = min(round(n * holdout), n - 1)
    hold_idx, train_idx = perm[:n_hold], perm[n_hold:]

    fork_devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(seed)
        model = SmallCNN(images.shape[1], num_classes).to(device)
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        x_train, y_train = images[train_idx], labels[train_idx]
        n_train = x_train.shape[0]
        for _ in range(epochs):
            model.train()
            order = torch.randperm(n_train, generator=gen)
            for start in range(0, n_train, batch_size):
                idx = order[start : start + batch_size]
                if idx.numel() < 2 and n_train >= 2:
                    continue  # BatchNorm cannot normalise a batch of one; the sample is seen in other epochs.
                xb = _random_shift(x_train[idx], gen).to(device)
                yb = y_train[idx].to(device)
                loss = F.cross_entropy(model(xb), yb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    model.eval()

    train_acc = class_accuracy(model, x_train, y_train, device=device)
    hold_acc = class_accuracy(model, images[hold_idx], labels[hold_idx], device=device) if n_hold else math.nan
    info = {
        "train_accuracy": train_acc,
        "holdout_accuracy": hold_acc,
        "epochs": epochs,
        "num_train": int(n_train),
        "num_holdout": int(n_hold),
    }
    return model, info


@torch.no_grad()
def predict(
    model: nn.Module, images: torch.Tensor, batch_size: int = 256, device: str | torch.device = "cpu"
) -> torch.Tensor:
    """Predicted class ids (int64, on CPU), batched so large generation sets fit in memory."""
    _check_images(images)
    model = model.to(device).eval()
    out = [
        model(images[s : s + batch_size].float().to(device)).argmax(dim=1).cpu()
        for s in range(0, images.shape[0], batch_size)
    ]
    return torch.cat(out).long() if out else torch.empty(0, dtype=torch.long)


def class_accuracy(
    model: nn.Module, images: torch.Tensor, target_labels: torch.Tensor, device: str | torch.device = "cpu"
) -> float:
    """Fraction of ``images`` classified as their target label: the alignment score for conditional samples."""
    target = torch.as_tensor(target_labels).reshape(-1).long().cpu()
    if target.numel() != images.shape[0]:
        raise ValueError(f"{target.numel()} target labels for {images.shape[0]} images")
    if target.numel() == 0:
        raise ValueError("class_accuracy needs at least one image")
    return float((predict(model, images, device=device) == target).float().mean())
