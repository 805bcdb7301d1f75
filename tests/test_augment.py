"""Threshold-aware augmentation: the strength mapping and the batched ops."""

import math

import pytest
import torch

from memshard.iet.taa import OPS, augment, choose_ops, magnitudes, strength


def test_strength_mapping():
    bank = torch.tensor([0.0, 1.0, 2.0, 4.0])
    t = torch.tensor([0, 1, 2, 3, 1])
    loss = torch.tensor([0.3, 0.5, 1.0, 3.0, 0.75])
    s = strength(loss, bank, t, ratio=2.0, alpha=5.0)
    # bank 0: nothing measured, no augmentation; r*l == m: at the threshold, strength 1
    assert s[0] == 0 and s[1] == pytest.approx(1.0) and s[2] == pytest.approx(1.0)
    assert s[3] == pytest.approx(math.exp(-5 * abs(6 - 4) / 4))  # margin 0.5
    assert s[4] == pytest.approx(math.exp(-5 * 0.5))
    assert ((s >= 0) & (s <= 1)).all()
    # farther from the threshold -> weaker
    far = strength(torch.tensor([0.6, 2.0]), torch.tensor([1.0]), torch.tensor([0, 0]), 2.0, 5.0)
    assert far[0] > far[1]


def test_magnitudes_per_sample_and_batch_mean():
    s = torch.tensor([0.0, 0.5, 1.0])
    assert magnitudes(s, 5.0, True).tolist() == pytest.approx([0.0, 0.25, 0.5])
    # the prototype: round(mean(s) * 5) on the 0-10 scale, one level for the batch
    assert magnitudes(s, 5.0, False).tolist() == pytest.approx([0.2, 0.2, 0.2])


def _imgs(b=6, c=3, h=16, w=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, c, h, w, generator=g) * 2 - 1


def test_ops_shape_range_identity_and_determinism():
    x = _imgs()
    mag = torch.tensor([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    y1 = augment(x, mag, torch.Generator().manual_seed(3), num_ops=2)
    y2 = augment(x, mag, torch.Generator().manual_seed(3), num_ops=2)
    assert y1.shape == x.shape and y1.dtype == x.dtype
    assert y1.min() >= -1 and y1.max() <= 1
    assert torch.equal(y1, y2)  # seeded
    assert torch.equal(y1[0], x[0])  # magnitude 0: untouched, bit for bit
    assert not torch.equal(y1[5], x[5])
    y3 = augment(x, mag, torch.Generator().manual_seed(4), num_ops=2)
    assert not torch.equal(y1[1:], y3[1:])


def test_each_op_does_what_it_says():
    x = _imgs(b=1, c=1, h=8, w=8)
    one = torch.ones(1)

    def only(name):
        mask = torch.zeros(1, len(OPS), dtype=torch.bool)
        mask[0, OPS.index(name)] = True
        return augment(x, one, torch.Generator().manual_seed(0), ops=mask)

    assert torch.allclose(only("flip"), x.flip(-1), atol=1e-5)
    b = only("brightness")
    shift = (b - x).clamp(-0.5, 0.5)
    assert torch.allclose(shift[(b > -1) & (b < 1)].std(), torch.tensor(0.0), atol=1e-5)  # one uniform shift
    cut = only("cutout")
    assert (cut == 0).sum() >= 16 - 4 and ((cut != x) & (cut != 0)).sum() == 0  # a 4x4 grey square, rest intact
    c = only("contrast")
    assert not torch.equal(c, x) and torch.allclose(c.mean(), x.mean(), atol=0.05)
    assert not torch.allclose(only("translate_x"), x) and not torch.allclose(only("rotate"), x)


def test_choose_ops_draws_distinct_ops():
    mask = choose_ops(500, 2, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert (mask.sum(1) == 2).all()
    freq = mask.float().mean(0)
    assert (freq > 0.2).all() and (freq < 0.4).all()  # 2/7 each, roughly uniform


def test_bad_shape_is_named():
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        augment(torch.zeros(3, 8, 8), torch.ones(3), torch.Generator())
