"""A tiny captioned image set for text-to-image tests: coloured shapes named by their caption."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 30), "blue": (30, 60, 220), "yellow": (230, 210, 20)}
SHAPES = ("square", "circle", "cross")


def shape_image(colour: str, shape: str, size: int = 16, offset: int = 0) -> Image.Image:
    img = Image.new("RGB", (size, size), (255, 255, 255))
    d = ImageDraw.Draw(img)
    a, b = 3 + offset % 3, size - 4 - (offset // 3) % 3
    if shape == "square":
        d.rectangle([a, a, b, b], fill=COLOURS[colour])
    elif shape == "circle":
        d.ellipse([a, a, b, b], fill=COLOURS[colour])
    else:
        mid = size // 2
        d.rectangle([a, mid - 2, b, mid + 1], fill=COLOURS[colour])
        d.rectangle([mid - 2, a, mid + 1, b], fill=COLOURS[colour])
    return img


def captioned_pairs(n: int, size: int = 16) -> tuple[list[Image.Image], list[str]]:
    images, captions = [], []
    combos = [(c, s) for c in COLOURS for s in SHAPES]
    for i in range(n):
        c, s = combos[i % len(combos)]
        images.append(shape_image(c, s, size, offset=i // len(combos)))
        captions.append(f"a {c} {s} number {i}")
    return images, captions


def write_captioned_parquet(path: str, n: int = 24, size: int = 16) -> str:
    images, captions = captioned_pairs(n, size)
    blobs = []
    for img in images:
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        blobs.append(buf.getvalue())
    table = pa.table(
        {
            "id": pa.array(np.arange(n), type=pa.int64()),
            "image": pa.array(blobs, type=pa.binary()),
            "caption": pa.array(captions, type=pa.string()),
        }
    )
    pq.write_table(table, path)
    return path
