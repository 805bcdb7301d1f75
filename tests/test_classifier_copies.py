"""Tests for the alignment classifier and the copy-threshold calibration helpers (Ray-free, CPU, fast)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from memshard.evaluation.classifier import SmallCNN, class_accuracy, predict, train_classifier
from memshard.evaluation.copies import augmented_copies, calibration_pairs


def _quadrant_set(n: int = 400, size: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Class = which quadrant is bright; trivially separable, so a working trainer must nail it."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (n,), generator=g)
    x = 0.15 * torch.rand(n, 1, size, size, generator=g)
    half = size // 2
    for i, c in enumerate(labels.tolist()):
        r, col = divmod(c, 2)
        x[i, :, r * half : (r + 1) * half, col * half : (col + 1) * half] += 0.7
    return x.clamp(0, 1), labels


def _blobs(n: int, channels: int = 3, size: int = 24, seed: int = 0) -> torch.Tensor:
    """Random smooth colour blobs, mirrored left-right so that a horizontal flip keeps an image's pixels.

    Raw pixels are not flip-invariant features; mirroring keeps the test about the calibration logic rather than
    about how weak flattened pixels are as a copy detector.
    """
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    out = torch.zeros(n, channels, size, size)
    for i in range(n):
        for _ in range(3):
            cy, cx = (torch.rand(2, generator=g) * size).tolist()
            sigma = 2.0 + 3.0 * float(torch.rand(1, generator=g))
            colour = torch.rand(channels, 1, 1, generator=g)
            for x0 in (cx, size - 1 - cx):
                out[i] += colour * torch.exp(-((yy - cy) ** 2 + (xx - x0) ** 2) / (2 * sigma**2))
    return out.clamp(0, 1)


def test_small_cnn_shapes_and_size() -> None:
    for ch, hw in ((1, 8), (3, 32)):
        m = SmallCNN(ch, 10)
        assert m(torch.rand(2, ch, hw, hw)).shape == (2, 10)
    params = sum(p.numel() for p in SmallCNN(3, 10).parameters())
    assert 50_000 <= params <= 200_000


def test_classifier_learns_and_is_deterministic() -> None:
    x, y = _quadrant_set()
    model, info = train_classifier(x, y, num_classes=4, epochs=3, seed=0)
    assert not model.training
    assert info["holdout_accuracy"] >= 0.9
    assert info["num_train"] + info["num_holdout"] == 400 and info["num_holdout"] == 40
    assert info["epochs"] == 3 and 0.0 <= info["train_accuracy"] <= 1.0
    preds = predict(model, x)
    assert preds.dtype == torch.int64 and preds.shape == (400,)
    assert class_accuracy(model, x, y) >= 0.9

    rng_before = torch.get_rng_state()
    model2, info2 = train_classifier(x, y, num_classes=4, epochs=3, seed=0)
    assert torch.equal(torch.get_rng_state(), rng_before)  # global RNG untouched
    assert torch.equal(predict(model2, x), preds)
    assert info2 == info


def test_classifier_no_holdout_gives_nan() -> None:
    x, y = _quadrant_set(n=40)
    _, info = train_classifier(x, y, num_classes=4, epochs=1, holdout=0.0)
    assert info["num_holdout"] == 0 and math.isnan(info["holdout_accuracy"])


def test_classifier_rejects_bad_labels() -> None:
    x, y = _quadrant_set(n=20)
    with pytest.raises(ValueError):
        train_classifier(x, y, num_classes=3)  # label 3 out of range
    with pytest.raises(ValueError):
        train_classifier(x, torch.full_like(y, -1), num_classes=4)
    with pytest.raises(ValueError):
        train_classifier(x, torch.zeros_like(y), num_classes=4)  # one class present
    with pytest.raises(ValueError):
        train_classifier(x, y[:10], num_classes=4)


@pytest.mark.parametrize("channels", [1, 3])
def test_augmented_copies(channels: int) -> None:
    x = _blobs(8, channels=channels, size=20)
    a = augmented_copies(x, seed=0)
    assert a.shape == x.shape and a.dtype == x.dtype
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    assert torch.equal(a, augmented_copies(x, seed=0))
    assert not torch.allclose(a, x, atol=1e-3)
    assert not torch.equal(a, augmented_copies(x, seed=1))
    assert torch.equal(x, _blobs(8, channels=channels, size=20))  # input not modified


def test_augmented_copies_rejects_bad_shape() -> None:
    with pytest.raises(ValueError):
        augmented_copies(torch.rand(2, 2, 16, 16))


def test_calibration_pairs_separates_copies() -> None:
    x = _blobs(40, channels=3, size=24, seed=3)

    def flat(imgs: torch.Tensor) -> torch.Tensor:
        return imgs.flatten(1)

    copy, distinct = calibration_pairs(flat, x, seed=0)
    assert copy.shape == (40,) and distinct.shape == (40,)
    assert copy.dtype == np.float64 and distinct.dtype == np.float64
    assert np.all(np.isfinite(distinct)) and np.all(copy <= 1.0 + 1e-9)
    assert copy.mean() > distinct.mean()

    c2, d2 = calibration_pairs(flat, x, seed=0, max_images=10)
    assert c2.shape == (10,) and d2.shape == (10,)
    np.testing.assert_array_equal(c2, calibration_pairs(flat, x, seed=0, max_images=10)[0])

    with pytest.raises(ValueError):
        calibration_pairs(flat, x[:1])
