"""Decoding and encoding of single images stored in the canonical dataset.

Decoding is strict on purpose: every image in a run must have exactly the size and
mode the model expects, so a wrong image is reported (``BadImage``) instead of being
silently converted into something the model was never meant to see. Conversions belong
in ``prepare``, which is run once and writes images that then decode as-is.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

_MODE_FOR_CHANNELS = {1: "L", 3: "RGB"}
_ACCEPTED_FORMATS = ("PNG", "JPEG")


class BadImage(ValueError):
    """An image that cannot be used as-is; ``str(exc)`` is a short reason for reports."""


def _expected_mode(channels: int) -> str:
    try:
        return _MODE_FOR_CHANNELS[channels]
    except KeyError:
        raise ValueError(f"channels must be 1 or 3, got {channels}") from None


def decode_image(data: bytes, image_size: int, channels: int) -> np.ndarray:
    """PNG/JPEG bytes -> uint8 array (channels, image_size, image_size).

    Size and mode are checked from the header before pixels are decoded, so a huge or
    wrong image costs nothing; ``load()`` then forces a full decode so that truncated
    or corrupt pixel data fails here rather than later inside a training step.
    """
    mode = _expected_mode(channels)
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise BadImage(f"image is {type(data).__name__}, expected bytes")
    try:
        img = Image.open(io.BytesIO(data))
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError...)
        raise BadImage("undecodable image bytes") from exc
    with img:
        if img.format not in _ACCEPTED_FORMATS:
            raise BadImage(f"format {img.format}, expected PNG or JPEG")
        width, height = img.size
        if (width, height) != (image_size, image_size):
            raise BadImage(f"size {width}x{height}, expected {image_size}x{image_size}")
        if img.mode != mode:
            plural = "channel" if channels == 1 else "channels"
            raise BadImage(f"mode {img.mode}, expected {mode} ({channels} {plural})")
        try:
            img.load()
        except Exception as exc:
            raise BadImage("truncated or corrupt image data") from exc
        arr = np.array(img, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[None, :, :]
    else:
        arr = np.ascontiguousarray(arr.transpose(2, 0, 1))
    return arr


def to_hwc(array: np.ndarray) -> np.ndarray:
    """A single image as (H, W) for grayscale or (H, W, 3) for RGB.

    Accepts (H, W), (H, W, C) or (C, H, W) with C in {1, 3}. When both ends could be
    the channel axis (e.g. 3x3x3), channel-first wins because that is the layout
    ``decode_image`` returns, so ``encode_png(decode_image(b))`` always round-trips.
    """
    arr = np.asarray(array)
    if arr.ndim == 2:
        return arr
    if arr.ndim != 3:
        raise ValueError(f"image array must have 2 or 3 dimensions, got shape {arr.shape}")
    first, last = arr.shape[0] in (1, 3), arr.shape[-1] in (1, 3)
    if first:
        arr = arr.transpose(1, 2, 0)
    elif not last:
        raise ValueError(f"cannot find a channel axis of size 1 or 3 in shape {arr.shape}")
    if arr.shape[-1] == 1:
        arr = arr[:, :, 0]
    return np.ascontiguousarray(arr)


def encode_png(array: np.ndarray) -> bytes:
    """uint8 image array -> PNG bytes (mode L or RGB); lossless, so decode gives it back exactly."""
    arr = np.asarray(array)
    if arr.dtype != np.uint8:
        raise ValueError(f"image array must be uint8, got {arr.dtype}")
    hwc = to_hwc(arr)
    img = Image.fromarray(hwc)  # uint8 (H, W) -> "L", (H, W, 3) -> "RGB"
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
