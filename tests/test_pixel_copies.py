"""Pixel copy similarity for tiny images: the extractor, distinct subsets and the FPR-calibrated threshold."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from memshard.evaluation.copies import distinct_subset
from memshard.evaluation.extractor import PixelExtractor
from memshard.evaluation.metrics.memorization import threshold_at_fpr


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a, b, dim=1)


def test_pixel_similarity_ignores_brightness_and_contrast_but_not_content():
    g = torch.Generator().manual_seed(0)
    img = torch.rand(3, 3, 16, 16, generator=g) * 0.5 + 0.2
    ext = PixelExtractor()
    f = ext(img)
    assert f.shape == (3, 3 * 16 * 16)
    # the same picture brighter and with more contrast: a copy (cosine 1)
    assert torch.allclose(_cos(ext(img * 1.4 - 0.05), f), torch.ones(3), atol=1e-5)
    # a different picture is not
    assert float(_cos(f[:1], f[1:2])) < 0.5
    # a shifted copy is less similar than the copy itself: pixel alignment is what it measures
    shifted = torch.roll(img, shifts=3, dims=-1)
    assert float(_cos(ext(shifted)[:1], f[:1])) < 0.9


def test_pixel_extractor_rejects_bad_shapes():
    with pytest.raises(ValueError, match="expected images"):
        PixelExtractor()(torch.rand(2, 4, 8, 8))


def test_distinct_subset_drops_near_duplicates_keeps_order_and_everything_else():
    g = torch.Generator().manual_seed(1)
    base = torch.rand(10, 3, 8, 8, generator=g)
    variants = (base[[2, 7]] * 0.9 + 0.05 + 0.01 * torch.rand(2, 3, 8, 8, generator=g)).clamp(0, 1)
    images = torch.cat([base, variants])  # rows 10, 11: near copies of rows 2 and 7
    f = PixelExtractor()(images)
    keep = distinct_subset(f, 0.9)
    assert keep.tolist() == list(range(10))
    unit = f[keep] / f[keep].norm(dim=1, keepdim=True)
    sim = unit @ unit.T
    sim.fill_diagonal_(-1)
    assert float(sim.max()) < 0.9
    # the variant first: it stays and the original goes (greedy in row order)
    keep2 = distinct_subset(torch.cat([f[10:11], f[:10]]), 0.9)
    assert 0 in keep2.tolist() and 3 not in keep2.tolist()
    with pytest.raises(ValueError, match="cosine"):
        distinct_subset(f, 1.5)


def test_threshold_at_fpr_lets_at_most_that_share_of_distinct_pairs_through():
    rng = np.random.default_rng(0)
    distinct = rng.uniform(0.5, 0.95, size=1000)
    copies = rng.uniform(0.9, 1.0, size=200)
    cal = threshold_at_fpr(distinct, 0.01, copies)
    assert cal["fpr"] <= 0.01
    assert (distinct >= cal["threshold"]).mean() == pytest.approx(cal["fpr"])
    # tight: the largest distinct score under the threshold would let one more through
    below = distinct[distinct < cal["threshold"]].max()
    assert (distinct >= below).mean() > 0.01
    assert cal["tpr"] == pytest.approx((copies >= cal["threshold"]).mean())
    # ties never push the rate above fpr
    tied = np.array([0.2] * 50 + [0.9] * 50)
    assert threshold_at_fpr(tied, 0.1)["fpr"] <= 0.1
    assert np.isnan(threshold_at_fpr(distinct, 0.05)["tpr"])
    with pytest.raises(ValueError, match="fpr"):
        threshold_at_fpr(distinct, 0.0)
