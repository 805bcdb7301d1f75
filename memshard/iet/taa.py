"""Threshold-aware augmentation (TAA): kept samples near the AGC threshold get augmented harder.

AGC keeps sample j iff ``r * l_j >= m[t_j]``. A kept sample whose scaled loss is only just above
the bank value is the next one the proxy will find "too easy", i.e. the next to be memorized.
The margin ``d_j = |r l_j - m[t_j]| / m[t_j]`` measures how far it is from that edge and the
strength ``s_j = exp(-a d_j)`` (in (0, 1], 1 at the edge) sets how hard it is augmented.

Two amplitude scales (``taa.scale``), both written here in plain torch (no torchvision: its
wheels pin torch versions, and none matches the pinned torch) and batched on the model's device:

* ``memshard``: each sample draws ``num_ops`` distinct ops from seven (horizontal flip, x/y
  translation, rotation, brightness, contrast, cutout), each at that sample's own magnitude on
  memshard's own ranges (:data:`MAX_ROTATE_DEG` ... at magnitude 10).
* ``torchvision``: the authors' prototype, ``torchvision.transforms.RandAugment(num_ops=2,
  magnitude=int(mean(s) * 5))``: torchvision's 14 ops drawn with replacement, its 31 magnitude
  bins (:func:`torchvision_bins`, reproduced value for value and tested against them),
  nearest-neighbour warps filled with black, colour ops on the 0-255 scale. Each sample draws
  its own ops and signs (the prototype augments in the dataset, one image at a time).

Every random choice comes from the caller's generator, so a round is reproducible bit for bit.
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


def levels(strengths: torch.Tensor, max_magnitude: float, per_sample: bool) -> torch.Tensor:
    """Per-sample integer magnitude level: ``int(s * max)`` each, or one ``int(mean(s) * max)``.

    ``per_sample=False`` is the prototype: one magnitude for the batch, truncated by ``int()``
    as the prototype does (not rounded: mean strength 0.99 at max 5 is level 4, not 5).
    """
    if per_sample:
        return torch.floor(strengths.clamp_min(0.0) * max_magnitude).to(torch.int64)
    level = math.floor(float(strengths.mean()) * max_magnitude) if strengths.numel() else 0
    return torch.full(strengths.shape, max(level, 0), dtype=torch.int64, device=strengths.device)


def magnitudes(strengths: torch.Tensor, max_magnitude: float, per_sample: bool) -> torch.Tensor:
    """Per-sample magnitude in [0, 1] on memshard's scale (RandAugment's 0-10 divided by 10).

    ``per_sample=True``: continuous, ``s * max / 10``. ``per_sample=False``: the prototype's
    one batch level, ``int(mean(s) * max) / 10`` (:func:`levels`).
    """
    if per_sample:
        return (strengths * max_magnitude / 10.0).clamp(0.0, 1.0)
    return (levels(strengths, max_magnitude, False).to(strengths.dtype) / 10.0).clamp(0.0, 1.0)


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


# --------------------------------------------------------------------------- torchvision's RandAugment

TV_OPS = (
    "identity", "shear_x", "shear_y", "translate_x", "translate_y", "rotate", "brightness",
    "color", "contrast", "sharpness", "posterize", "solarize", "autocontrast", "equalize",
)  # fmt: skip
TV_BINS = 31  # torchvision's num_magnitude_bins default
_GEOMETRIC = ("shear_x", "shear_y", "translate_x", "translate_y", "rotate")


def torchvision_bins(height: int, width: int, num_bins: int = TV_BINS) -> dict[str, tuple[torch.Tensor, bool]]:
    """torchvision RandAugment's magnitude table: op -> (value per bin, signed).

    Bin ``b`` of ``num_bins`` (the ``magnitude`` argument): shear 0.3 b/30, translate
    150/331 of the side x b/30 pixels, rotate 30 b/30 degrees, the four enhance factors
    0.9 b/30 (applied as 1 +- value), posterize 8 - round(b / 7.5) bits, solarize threshold
    255 (1 - b/30); identity, autocontrast and equalize have no magnitude.
    """
    lin = torch.linspace(0.0, 1.0, num_bins)
    return {
        "identity": (torch.zeros(num_bins), False),
        "shear_x": (0.3 * lin, True),
        "shear_y": (0.3 * lin, True),
        "translate_x": (150.0 / 331.0 * width * lin, True),
        "translate_y": (150.0 / 331.0 * height * lin, True),
        "rotate": (30.0 * lin, True),
        "brightness": (0.9 * lin, True),
        "color": (0.9 * lin, True),
        "contrast": (0.9 * lin, True),
        "sharpness": (0.9 * lin, True),
        "posterize": ((8 - (torch.arange(num_bins) / ((num_bins - 1) / 4)).round().int()).float(), False),
        "solarize": (torch.linspace(255.0, 0.0, num_bins), False),
        "autocontrast": (torch.zeros(num_bins), False),
        "equalize": (torch.zeros(num_bins), False),
    }


def _blend(a: torch.Tensor, b: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """torchvision's enhance blend on [0, 1] images: ratio * a + (1 - ratio) * b, clamped."""
    r = ratio.view(-1, 1, 1, 1)
    return (r * a + (1.0 - r) * b).clamp(0.0, 1.0)


def _gray(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601-2 luma (torchvision's rgb_to_grayscale), one channel; a 1-channel image is itself."""
    if x.shape[1] != 3:
        return x[:, :1]
    return (0.2989 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]).to(x.dtype)


def _warp(x: torch.Tensor, op: str, v: torch.Tensor) -> torch.Tensor:
    """A geometric op at per-sample value ``v``: nearest-neighbour, filled with black (0), as torchvision.

    Coordinates are pixels about the image centre (the image spans [-W/2, W/2]); the map
    sends an output point to the input point it reads. Shears are about the top-left corner
    (torchvision's ``center=[0, 0]``), rotation about the centre, translations are whole
    pixels (``int(value)``). The direction convention does not matter: every signed op draws
    its sign 50/50.
    """
    b, _, h, w = x.shape
    one, zero = torch.ones_like(v), torch.zeros_like(v)
    if op == "translate_x":
        m, t = (one, zero, zero, one), (-torch.trunc(v), zero)
    elif op == "translate_y":
        m, t = (one, zero, zero, one), (zero, -torch.trunc(v))
    elif op == "shear_x":
        m, t = (one, -v, zero, one), (-v * h / 2.0, zero)
    elif op == "shear_y":
        m, t = (one, zero, -v, one), (zero, -v * w / 2.0)
    else:  # rotate, degrees
        a = torch.deg2rad(v)
        m, t = (torch.cos(a), -torch.sin(a), torch.sin(a), torch.cos(a)), (zero, zero)
    hw = (w / 2.0, h / 2.0)
    # to normalised grid coordinates: entry (i, j) scales by half_j / half_i, the shift by 1 / half_i
    theta = torch.stack(
        [
            torch.stack([m[0], m[1] * hw[1] / hw[0], t[0] / hw[0]], dim=1),
            torch.stack([m[2] * hw[0] / hw[1], m[3], t[1] / hw[1]], dim=1),
        ],
        dim=1,
    ).to(x.dtype)
    grid = F.affine_grid(theta, [b, x.shape[1], h, w], align_corners=False)
    return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)


def _sharpness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """torchvision's adjust_sharpness: blend with the 3x3 smoothed image (border pixels kept)."""
    c = x.shape[1]
    k = torch.ones(3, 3, dtype=x.dtype, device=x.device)
    k[1, 1] = 5.0
    k = (k / k.sum()).expand(c, 1, 3, 3)
    smooth = x.clone()
    if x.shape[-1] > 2 and x.shape[-2] > 2:
        smooth[..., 1:-1, 1:-1] = F.conv2d(x, k, groups=c)
    return _blend(x, smooth, factor)


def _autocontrast(x: torch.Tensor) -> torch.Tensor:
    """Per image and channel: stretch [min, max] to [0, 1]; a flat channel is left as it is."""
    lo = x.amin(dim=(-2, -1), keepdim=True)
    hi = x.amax(dim=(-2, -1), keepdim=True)
    flat = hi == lo
    lo = torch.where(flat, torch.zeros_like(lo), lo)
    hi = torch.where(flat, torch.ones_like(hi), hi)
    return ((x - lo) / (hi - lo)).clamp(0.0, 1.0)


def _equalize(x: torch.Tensor) -> torch.Tensor:
    """torchvision's equalize on the 8-bit values, per image and channel (a 256-entry lookup table)."""
    q = (x * 255.0).round().clamp(0, 255).to(torch.int64)
    out = torch.empty_like(x)
    for i in range(x.shape[0]):
        for c in range(x.shape[1]):
            vals = q[i, c].flatten()
            hist = torch.bincount(vals, minlength=256).to(torch.float64)
            nonzero = hist[hist != 0]
            step = torch.div(nonzero[:-1].sum(), 255, rounding_mode="floor") if nonzero.numel() else hist.new_zeros(())
            if step == 0:
                out[i, c] = x[i, c]
                continue
            half = torch.div(step, 2, rounding_mode="floor")
            lut = torch.div(torch.cumsum(hist, 0) + half, step, rounding_mode="floor")
            lut = torch.cat([lut.new_zeros(1), lut[:-1]]).clamp(0, 255)
            out[i, c] = (lut[vals].view(x.shape[-2:]) / 255.0).to(x.dtype)
    return out


def _tv_op(x: torch.Tensor, op: str, v: torch.Tensor) -> torch.Tensor:
    """One torchvision op on [0, 1] images ``x`` at per-sample value ``v`` (already signed)."""
    if op == "identity":
        return x
    if op in _GEOMETRIC:
        return _warp(x, op, v)
    if op == "brightness":
        return _blend(x, torch.zeros_like(x), 1.0 + v)
    if op == "color":
        return _blend(x, _gray(x).expand_as(x), 1.0 + v)
    if op == "contrast":
        return _blend(x, _gray(x).mean(dim=(-3, -2, -1), keepdim=True).expand_as(x), 1.0 + v)
    if op == "sharpness":
        return _sharpness(x, 1.0 + v)
    q = (x * 255.0).round().clamp(0, 255)
    if op == "posterize":
        keep = (256 - 2 ** (8 - v.to(torch.int64))).view(-1, 1, 1, 1)  # the top `bits` bits
        return (q.to(torch.int64) & keep).to(x.dtype) / 255.0
    if op == "solarize":
        return torch.where(q >= v.view(-1, 1, 1, 1), 1.0 - x, x)
    if op == "autocontrast":
        return _autocontrast(x)
    if op == "equalize":
        return _equalize(x)
    raise ValueError(f"unknown torchvision op {op!r}; expected one of {', '.join(TV_OPS)}")


def rand_augment(
    x: torch.Tensor,
    level: torch.Tensor,
    gen: torch.Generator,
    num_ops: int = 2,
    ops: torch.Tensor | None = None,
    signs: torch.Tensor | None = None,
) -> torch.Tensor:
    """torchvision's RandAugment on images ``x`` (B, C, H, W) in [-1, 1] at per-sample bin ``level``.

    Each sample applies ``num_ops`` ops drawn with replacement from :data:`TV_OPS` (``ops``,
    (B, num_ops) indices, may be forced; so may ``signs``, +-1), each at its bin's value from
    :func:`torchvision_bins`, a signed value negated with probability 1/2. A sample at level
    0 still gets its ops, at their bin-0 values (torchvision's magnitude 0: only posterize
    to 8 bits, solarize at 255, autocontrast and equalize change anything).
    """
    if x.dim() != 4:
        raise ValueError(f"rand_augment expects (B, C, H, W), got shape {tuple(x.shape)}")
    b, _, h, w = x.shape
    dev = x.device
    table = torchvision_bins(h, w)
    lv = level.to(dev, torch.int64).clamp(0, TV_BINS - 1)
    if ops is None:
        ops = torch.randint(len(TV_OPS), (b, num_ops), generator=gen, device=dev)
    if signs is None:
        signs = torch.where(torch.rand(b, ops.shape[1], generator=gen, device=dev) < 0.5, -1.0, 1.0)
    out = (x + 1.0) / 2.0
    for k in range(ops.shape[1]):
        nxt = out.clone()
        for j, name in enumerate(TV_OPS):
            sel = (ops[:, k] == j).nonzero().squeeze(1)
            if sel.numel() == 0:
                continue
            values, signed = table[name]
            v = values.to(dev, x.dtype)[lv[sel]]
            if signed:
                v = v * signs[sel, k].to(x.dtype)
            nxt[sel] = _tv_op(out[sel], name, v)
        out = nxt
    return out * 2.0 - 1.0


def apply(
    x: torch.Tensor, strengths: torch.Tensor, scale: str, max_magnitude: float, per_sample: bool,
    num_ops: int, gen: torch.Generator, latent: bool = False,
) -> torch.Tensor:  # fmt: skip
    """Augment ``x`` by TAA strengths on the chosen ``scale`` (the one entry point the proxy calls).

    ``memshard``: :func:`augment` at :func:`magnitudes`. ``torchvision``: :func:`rand_augment`
    at :func:`levels`. With ``per_sample`` a sample of strength 0 (nothing measured yet) is
    left as it is; the prototype's batch level augments every queued sample, as it does.
    ``latent`` data (VAE latents) only take the memshard scale: torchvision's colour ops are
    defined on 8-bit pixels.
    """
    if scale == "memshard":
        return augment(x, magnitudes(strengths, max_magnitude, per_sample), gen, num_ops, clamp=not latent)
    if scale != "torchvision":
        raise ValueError(f"unknown TAA scale {scale!r}; expected memshard or torchvision")
    if latent:
        raise ValueError("taa.scale=torchvision needs pixel-space images; VAE latents take taa.scale=memshard")
    out = rand_augment(x, levels(strengths, max_magnitude, per_sample), gen, num_ops)
    if not per_sample:
        return out
    return torch.where((strengths > 0).to(x.device).view(-1, 1, 1, 1), out, x)
