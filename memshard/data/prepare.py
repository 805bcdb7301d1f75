"""Converting sources (built-in data sets, image folders, numpy arrays) into the canonical Parquet.

All conversions (mode, resizing, cropping, value scaling) happen here, once, so the
dataset a run reads decodes exactly to what the model expects and ``decode_image`` can
stay strict. The output is written in one atomic ``Storage.write_bytes`` so a reader
never sees a half-written dataset, locally or on S3.
"""

from __future__ import annotations

import gzip
import io
import os
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageOps

from memshard.data.dataset import DataError
from memshard.data.images import encode_png
from memshard.storage import Storage, is_remote

BUILTIN_SOURCES = ("digits", "fashion-mnist")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
ROW_GROUP_SIZE = 1024
_GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")
_ACCEPTED = (
    f"one of {', '.join(BUILTIN_SOURCES)}; a directory of images ({', '.join(IMAGE_SUFFIXES)}); "
    "a .npy file of images; or a .npz file with 'images' (and optional 'labels', 'captions', 'ids')"
)


@dataclass
class PrepareResult:
    path: str
    num_rows: int
    image_size: int
    channels: int
    num_classes: int | None
    has_caption: bool


@dataclass
class _Rows:
    """A source converted to canonical rows, before serialisation."""

    images: list[bytes]
    image_size: int
    channels: int
    labels: np.ndarray | None = None
    num_classes: int | None = None
    captions: list[str | None] | None = None
    ids: np.ndarray | None = None


# -- image helpers -----------------------------------------------------------------------


def _fit(img: Image.Image, channels: int, size: int) -> np.ndarray:
    """Convert to the target mode, center-crop to a square and resize (bilinear) -> uint8 (H, W[, 3])."""
    if img.mode.startswith("I;16") or img.mode == "I":
        # PIL's I -> L conversion clips at 255; scale 16-bit values instead so the image keeps its contrast.
        arr = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(np.round(arr / 257.0), 0, 255).astype(np.uint8))
    target = "L" if channels == 1 else "RGB"
    if img.mode != target:
        if img.mode == "P" and "transparency" in img.info:
            img = img.convert("RGBA")
        img = img.convert(target)
    w, h = img.size
    if w != h:
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        img = img.crop((left, top, left + side, top + side))
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(img, dtype=np.uint8)


def _array_image(hwc: np.ndarray) -> Image.Image:
    return Image.fromarray(np.ascontiguousarray(hwc))


def _encode_all(images: Iterator[Image.Image], channels: int, size: int) -> list[bytes]:
    return [encode_png(_fit(img, channels, size)) for img in images]


def _check_args(image_size: int | None, channels: int | None, limit: int | None) -> None:
    if image_size is not None and image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    if channels is not None and channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")


# -- sources -----------------------------------------------------------------------------


def _from_digits(image_size: int | None, channels: int | None, limit: int | None) -> _Rows:
    """sklearn's bundled 8x8 digits (no download), scaled 0..16 -> 0..255."""
    from sklearn.datasets import (
        load_digits,  # imported here: sklearn is slow to import and only needed here
    )

    bunch = load_digits()
    images = np.asarray(bunch.images)[:limit]
    labels = np.asarray(bunch.target, dtype=np.int64)[:limit]
    pixels = np.clip(np.round(images * 255.0 / 16.0), 0, 255).astype(np.uint8)
    size, ch = image_size or 16, channels or 1
    return _Rows(
        images=_encode_all((_array_image(p) for p in pixels), ch, size),
        image_size=size,
        channels=ch,
        labels=labels,
        num_classes=10,
    )


def _read_idx(path: str, limit: int | None) -> np.ndarray:
    """An idx-ubyte file (gzip'd or not) as uint8 array; with ``limit`` only the first items are decompressed."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as fh:
        header = fh.read(4)
        if len(header) != 4 or header[0] != 0 or header[1] != 0 or header[2] != 0x08:
            raise DataError(f"{path}: not an unsigned-byte idx file")
        ndim = header[3]
        dims = [int.from_bytes(fh.read(4), "big") for _ in range(ndim)]
        count = dims[0] if limit is None else min(dims[0], limit)
        item = int(np.prod(dims[1:], dtype=np.int64)) if ndim > 1 else 1
        raw = fh.read(count * item)
    if len(raw) != count * item:
        raise DataError(f"{path}: truncated idx file")
    return np.frombuffer(raw, dtype=np.uint8).reshape([count, *dims[1:]])


def _from_fashion_mnist(image_size: int | None, channels: int | None, limit: int | None) -> _Rows:
    """Fashion-MNIST train split from the Debian package (idx files parsed here; no network)."""
    base = os.environ.get("MEMSHARD_FASHION_MNIST_DIR", FASHION_MNIST_DIR)
    img_path = os.path.join(base, "train-images-idx3-ubyte.gz")
    lbl_path = os.path.join(base, "train-labels-idx1-ubyte.gz")
    if not (os.path.isfile(img_path) and os.path.isfile(lbl_path)):
        raise DataError(
            f"fashion-mnist: {img_path} / {lbl_path} not found; install them with "
            "`apt-get install dataset-fashion-mnist`"
        )
    pixels = _read_idx(img_path, limit)
    labels = _read_idx(lbl_path, limit).astype(np.int64)
    if pixels.ndim != 3 or len(pixels) != len(labels):
        raise DataError(f"fashion-mnist: unexpected shapes {pixels.shape} images, {labels.shape} labels")
    size, ch = image_size or pixels.shape[1], channels or 1
    return _Rows(
        images=_encode_all((_array_image(p) for p in pixels), ch, size),
        image_size=size,
        channels=ch,
        labels=labels,
        num_classes=10,
    )


def _from_directory(root: str, image_size: int | None, channels: int | None, limit: int | None) -> _Rows:
    """Images under ``root``; first-level subdirectories are classes, ``x.txt`` next to ``x.png`` a caption."""
    base = Path(root)
    paths = sorted(
        (p for p in base.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES),
        key=lambda p: p.relative_to(base).as_posix(),
    )
    if not paths:
        raise DataError(f"{root}: no images ({', '.join(IMAGE_SUFFIXES)}) in the directory")
    rels = [p.relative_to(base).parts for p in paths]
    labelled = all(len(parts) >= 2 for parts in rels)
    classes = sorted({parts[0] for parts in rels}) if labelled else []
    class_of = {name: i for i, name in enumerate(classes)}
    labels_all = np.asarray([class_of[parts[0]] for parts in rels], dtype=np.int64) if labelled else None
    paths = paths[:limit]

    def open_image(path: Path) -> Image.Image:
        try:
            img = Image.open(path)
            img.load()
        except Exception as exc:
            raise DataError(f"{root}: cannot read image {path} ({exc})") from exc
        return ImageOps.exif_transpose(img)  # photos: store them the way they are meant to be seen

    first = open_image(paths[0])
    if image_size is None:
        image_size = min(first.size)
    if channels is None:
        all_gray = True
        for path in paths:
            try:
                with Image.open(path) as probe:  # header only: mode is known without decoding pixels
                    mode = probe.mode
            except Exception as exc:
                raise DataError(f"{root}: cannot read image {path} ({exc})") from exc
            if mode not in _GRAY_MODES:
                all_gray = False
                break
        channels = 1 if all_gray else 3

    captions: list[str | None] = []
    for path in paths:
        side = path.with_suffix(".txt")
        captions.append(side.read_text(encoding="utf-8").strip() if side.is_file() else None)
    has_caption = any(c is not None for c in captions)

    def images() -> Iterator[Image.Image]:
        yield first
        for path in paths[1:]:
            yield open_image(path)

    return _Rows(
        images=_encode_all(images(), channels, image_size),
        image_size=image_size,
        channels=channels,
        labels=labels_all[: len(paths)] if labels_all is not None else None,
        num_classes=len(classes) if labelled else None,
        captions=captions if has_caption else None,
    )


def _as_nhwc_uint8(arr: np.ndarray, where: str) -> np.ndarray:
    """(N,H,W), (N,H,W,C) or (N,C,H,W) with C in {1,3}, uint8 or float in [0,1] -> uint8 (N,H,W[,3])."""
    if arr.ndim == 3:
        out = arr
    elif arr.ndim == 4:
        first, last = arr.shape[1] in (1, 3), arr.shape[-1] in (1, 3)
        if not (first or last):
            raise DataError(f"{where}: no channel axis of size 1 or 3 in image array of shape {arr.shape}")
        if first and (not last or arr.shape[2] == arr.shape[3]):
            # channel-first unless the last axis is at least as plausible (square H==W favours (N,C,H,W))
            out = arr.transpose(0, 2, 3, 1)
        else:
            out = arr
        if out.shape[-1] == 1:
            out = out[..., 0]
    else:
        raise DataError(f"{where}: image array must be (N,H,W), (N,H,W,C) or (N,C,H,W), got shape {arr.shape}")
    if len(out) == 0:
        raise DataError(f"{where}: image array is empty")
    if out.dtype == np.uint8:
        return out
    if np.issubdtype(out.dtype, np.floating):
        if not np.isfinite(out).all() or out.min() < 0.0 or out.max() > 1.0:
            raise DataError(f"{where}: float images must be finite and in [0, 1]")
        return np.round(out * 255.0).astype(np.uint8)
    if np.issubdtype(out.dtype, np.integer) and out.min() >= 0 and out.max() <= 255:
        return out.astype(np.uint8)
    raise DataError(f"{where}: images must be uint8 or float in [0, 1], got {out.dtype}")


def _from_arrays(path: str, image_size: int | None, channels: int | None, limit: int | None) -> _Rows:
    """A .npy (images only) or .npz (images, optional labels/captions/ids)."""
    labels = captions = ids = None
    try:
        if path.lower().endswith(".npy"):
            images = np.load(path, allow_pickle=False)
        else:
            with np.load(path, allow_pickle=False) as npz:
                if "images" not in npz.files:
                    raise DataError(f"{path}: no 'images' array (arrays: {', '.join(npz.files)})")
                images = npz["images"]
                labels = npz["labels"] if "labels" in npz.files else None
                captions = npz["captions"] if "captions" in npz.files else None
                ids = npz["ids"] if "ids" in npz.files else None
    except DataError:
        raise
    except ValueError as exc:  # object arrays need pickle, which is refused for safety
        raise DataError(f"{path}: cannot load without pickle ({exc}); store captions as a unicode array") from exc
    except Exception as exc:
        raise DataError(f"{path}: not a readable numpy file ({exc})") from exc
    pixels = _as_nhwc_uint8(images, path)[:limit]
    n_all = len(images)
    for name, extra in (("labels", labels), ("captions", captions), ("ids", ids)):
        if extra is not None and (extra.ndim != 1 or len(extra) != n_all):
            raise DataError(f"{path}: '{name}' must be 1-D with {n_all} entries, got shape {extra.shape}")
    num_classes = None
    if labels is not None:
        if not np.issubdtype(labels.dtype, np.integer) or (len(labels) and labels.min() < 0):
            raise DataError(f"{path}: 'labels' must be non-negative integers, got {labels.dtype}")
        labels = labels.astype(np.int64)
        num_classes = int(labels.max()) + 1
        labels = labels[:limit]
    if ids is not None:
        if not np.issubdtype(ids.dtype, np.integer) or len(np.unique(ids)) != len(ids):
            raise DataError(f"{path}: 'ids' must be unique integers")
        ids = ids.astype(np.int64)[:limit]
    caption_list: list[str | None] | None = None
    if captions is not None:
        caption_list = [str(c) for c in captions[:limit]]
    native_ch = 3 if pixels.ndim == 4 else 1
    size = image_size or min(pixels.shape[1], pixels.shape[2])
    ch = channels or native_ch
    return _Rows(
        images=_encode_all((_array_image(p) for p in pixels), ch, size),
        image_size=size,
        channels=ch,
        labels=labels,
        num_classes=num_classes,
        captions=caption_list,
        ids=ids,
    )


# -- writing -----------------------------------------------------------------------------


def _table(rows: _Rows) -> pa.Table:
    n = len(rows.images)
    ids = rows.ids if rows.ids is not None else np.arange(n, dtype=np.int64)
    columns: dict[str, pa.Array] = {
        "id": pa.array(ids, type=pa.int64()),
        "image": pa.array(rows.images, type=pa.binary()),
    }
    if rows.labels is not None:
        columns["label"] = pa.array(rows.labels, type=pa.int64())
    if rows.captions is not None:
        columns["caption"] = pa.array(rows.captions, type=pa.string())
    return pa.table(columns)


def _write(table: pa.Table, out: str) -> None:
    """Serialise in memory, then one atomic write: readers see no file or the whole file."""
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=ROW_GROUP_SIZE)
    if is_remote(out):
        parent, name = posixpath.split(out.rstrip("/"))
    else:
        local = out.removeprefix("file://")
        parent, name = os.path.split(os.path.abspath(os.path.expanduser(local)))
    if not name:
        raise ValueError(f"output {out!r} has no file name")
    Storage(parent).write_bytes(name, buf.getvalue())


def prepare(
    source: str, out: str, image_size: int | None = None, channels: int | None = None, limit: int | None = None
) -> PrepareResult:
    """Convert ``source`` into the canonical Parquet at ``out`` (a file path or s3:// URI)."""
    _check_args(image_size, channels, limit)
    if source == "digits":
        rows = _from_digits(image_size, channels, limit)
    elif source == "fashion-mnist":
        rows = _from_fashion_mnist(image_size, channels, limit)
    elif os.path.isdir(source):
        rows = _from_directory(source, image_size, channels, limit)
    elif source.lower().endswith((".npy", ".npz")):
        if not os.path.isfile(source):
            raise DataError(f"{source}: file does not exist")
        rows = _from_arrays(source, image_size, channels, limit)
    else:
        raise DataError(f"cannot prepare a dataset from {source!r}: accepted sources are {_ACCEPTED}")
    _write(_table(rows), out)
    return PrepareResult(
        path=out,
        num_rows=len(rows.images),
        image_size=rows.image_size,
        channels=rows.channels,
        num_classes=rows.num_classes,
        has_caption=rows.captions is not None,
    )
