"""Threshold-aware augmentation: the strength mapping and the batched ops."""

import math

import pytest
import torch

from memshard.iet.taa import (
    OPS,
    TV_OPS,
    _warp,
    apply,
    augment,
    choose_ops,
    levels,
    magnitudes,
    rand_augment,
    strength,
    torchvision_bins,
)


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
    # the prototype: int(mean(s) * 5) on the 0-10 scale, one level for the batch
    assert magnitudes(s, 5.0, False).tolist() == pytest.approx([0.2, 0.2, 0.2])


def test_levels_truncate_as_the_prototype():
    # mean strength 0.99 x 5 = 4.95: the prototype's int() gives 4 where rounding gave 5
    s = torch.tensor([0.98, 1.0])
    assert levels(s, 5.0, False).tolist() == [4, 4]
    assert magnitudes(s, 5.0, False).tolist() == pytest.approx([0.4, 0.4])
    assert levels(torch.tensor([0.0, 0.19, 0.2, 0.99, 1.0]), 5.0, True).tolist() == [0, 0, 1, 4, 5]


def test_torchvision_magnitude_table_value_for_value():
    """torchvision.transforms.RandAugment._augmentation_space(31, (H, W)), as torchvision 0.2x defines it."""
    t = torchvision_bins(16, 32)
    assert tuple(t) == TV_OPS and len(TV_OPS) == 14
    for name in TV_OPS:
        assert t[name][0].shape == (31,)
    assert t["shear_x"][0][10].item() == pytest.approx(0.1) and t["shear_x"][1]
    assert t["translate_x"][0][30].item() == pytest.approx(150 / 331 * 32)  # width
    assert t["translate_y"][0][30].item() == pytest.approx(150 / 331 * 16)  # height
    assert t["rotate"][0][5].item() == pytest.approx(5.0)  # the prototype's level 5 at strength 1: 5 degrees
    assert t["contrast"][0][5].item() == pytest.approx(0.15) and t["brightness"][0][30].item() == pytest.approx(0.9)
    assert t["posterize"][0].tolist() == [8.0] * 4 + [7.0] * 8 + [6.0] * 7 + [5.0] * 8 + [4.0] * 4
    assert not t["posterize"][1] and not t["solarize"][1]
    assert t["solarize"][0][0].item() == 255.0 and t["solarize"][0][5].item() == pytest.approx(212.5)
    assert t["solarize"][0][30].item() == 0.0
    assert all(not t[k][0].any() for k in ("identity", "autocontrast", "equalize"))


def _one_op(x, name, level, sign=1.0):
    b = x.shape[0]
    ops = torch.full((b, 1), TV_OPS.index(name))
    return rand_augment(x, torch.full((b,), level), torch.Generator(), ops=ops, signs=torch.full((b, 1), sign))


def test_torchvision_ops_on_hand_made_images():
    # values on the 8-bit grid, in [-1, 1]
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (2, 3, 8, 8), generator=g).float() / 255 * 2 - 1
    assert torch.equal(_one_op(x, "identity", 30), x)
    # translate 150/331 * 8 * 10/30 = 1.21 -> one whole pixel, black fill
    tx = _one_op(x, "translate_x", 10)
    assert torch.allclose(tx[..., 1:], x[..., :-1], atol=1e-6) and (tx[..., 0] == -1).all()
    ty = _one_op(x, "translate_y", 10, sign=-1.0)
    assert torch.allclose(ty[..., :-1, :], x[..., 1:, :], atol=1e-6) and (ty[..., -1, :] == -1).all()
    # the rotation warp itself: 90 degrees is an exact quarter turn of the pixel grid (nearest, no fill)
    r = _warp((x + 1) / 2, "rotate", torch.full((2,), 90.0)) * 2 - 1
    assert any(torch.allclose(r, torch.rot90(x, k, dims=(-2, -1)), atol=1e-6) for k in (1, -1))
    # level 30 is 30 degrees: the corners leave the frame and come back black
    r30 = _one_op(x, "rotate", 30)
    assert (r30[..., 0, 0] == -1).all() and not torch.equal(r30, x)
    # brightness 1 + 0.9: x01 * 1.9, clamped
    x01 = (x + 1) / 2
    assert torch.allclose((_one_op(x, "brightness", 30) + 1) / 2, (x01 * 1.9).clamp(0, 1), atol=1e-6)
    # contrast: blend with the mean of the luma
    gray = 0.2989 * x01[:, 0] + 0.587 * x01[:, 1] + 0.114 * x01[:, 2]
    m = gray.mean(dim=(-2, -1)).view(2, 1, 1, 1)
    want = (0.1 * x01 + 0.9 * m).clamp(0, 1)  # factor 1 - 0.9
    assert torch.allclose((_one_op(x, "contrast", 30, sign=-1.0) + 1) / 2, want, atol=1e-6)
    # solarize at level 15: threshold 127.5 on the 8-bit scale
    sol = (_one_op(x, "solarize", 15) + 1) / 2
    hi = x01 * 255 >= 127.5
    assert torch.allclose(sol[hi], 1 - x01[hi], atol=1e-6) and torch.allclose(sol[~hi], x01[~hi], atol=1e-6)
    # posterize at level 30: 4 bits
    post = torch.round((_one_op(x, "posterize", 30) + 1) / 2 * 255)
    assert torch.equal(post, (torch.round(x01 * 255).long() & 0xF0).float())
    # autocontrast: each channel spans [0, 1] afterwards
    ac = (_one_op(x * 0.5, "autocontrast", 0) + 1) / 2
    assert torch.allclose(ac.amin(dim=(-2, -1)), torch.zeros(2, 3))
    assert torch.allclose(ac.amax(dim=(-2, -1)), torch.ones(2, 3))
    # equalize: a two-valued channel maps its values to torchvision's lookup table
    two = torch.zeros(1, 1, 4, 4)
    two[..., :2, :] = 1.0  # 8 pixels at 255, 8 at 0 (in [0, 1]: 1 and 0)
    eq = (_one_op(two * 2 - 1, "equalize", 0) + 1) / 2
    # hist: 8 at 0, 8 at 255; step = 8 // 255 = 0 -> unchanged
    assert torch.equal(eq, two)
    ramp = torch.arange(16).float().view(1, 1, 4, 4) * 17 / 255  # 0, 17, ..., 255: flat histogram
    eq = torch.round((_one_op(ramp * 2 - 1, "equalize", 0) + 1) / 2 * 255)
    # step = 15 // 255 = 0 -> unchanged too; a 1024-pixel ramp has step 4
    assert torch.equal(eq, torch.round(ramp * 255))
    big = (torch.arange(1024) % 256).float().view(1, 1, 32, 32) / 255
    eqb = torch.round((_one_op(big * 2 - 1, "equalize", 0) + 1) / 2 * 255)
    # step = (1024 - 4) // 255 = 4; lut[v] = (4 * v + 2) // 4 = v (shifted by one bin): v -> v for v >= 1, 0 -> 0
    assert torch.equal(eqb, torch.round(big * 255))


def test_rand_augment_draws_with_replacement_and_is_seeded():
    x = _imgs(b=200, c=1, h=8, w=8)
    lv = torch.full((200,), 5)
    a = rand_augment(x, lv, torch.Generator().manual_seed(1))
    b = rand_augment(x, lv, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == x.shape and a.min() >= -1 and a.max() <= 1
    assert not torch.equal(a, rand_augment(x, lv, torch.Generator().manual_seed(2)))
    # per-sample strength 0 leaves that sample as it is; the prototype's batch level augments all
    s = torch.zeros(200)
    s[1:] = 1.0
    per = apply(x, s, "torchvision", 5.0, True, 2, torch.Generator().manual_seed(0))
    assert torch.equal(per[0], x[0]) and not torch.equal(per[1:], x[1:])
    with pytest.raises(ValueError, match="latents"):
        apply(x, s, "torchvision", 5.0, True, 2, torch.Generator(), latent=True)


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
