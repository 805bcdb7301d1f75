"""Converting sources (built-in data sets, image folders, numpy arrays, Parquet) into the canonical Parquet.

All conversions (mode, resizing, cropping, value scaling) happen here, once, so the
dataset a run reads decodes exactly to what the model expects and ``decode_image`` can
stay strict. The output is written in one atomic ``Storage.write_bytes`` so a reader
never sees a half-written dataset, locally or on S3.
"""

from __future__ import annotations

import gzip
import io
import json
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
from memshard.io.storage import Storage, filesystem, is_remote

BUILTIN_SOURCES = ("digits", "fashion-mnist", "emoji", "shapes")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
ROW_GROUP_SIZE = 1024
_GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")
_ACCEPTED = (
    f"one of {', '.join(BUILTIN_SOURCES)}; a directory of images ({', '.join(IMAGE_SUFFIXES)}; "
    "first-level subfolders are classes, a same-stem .txt file next to an image is its caption); "
    "a .npy file of images; a .npz file with 'images' (and optional 'labels', 'captions', 'ids'); "
    "or a .parquet file with an 'image' column of encoded image bytes (and optional 'caption', 'label', 'id')"
)
_MAX_NAMED = 5


@dataclass
class PrepareResult:
    path: str
    num_rows: int
    image_size: int
    channels: int
    num_classes: int | None
    has_caption: bool
    # Rows whose caption is the empty string: allowed (unconditional examples), but a user
    # who meant every image to be captioned should see how many are not.
    empty_captions: int = 0
    duplicated_images: int = 0  # distinct images stored more than once (``duplicate``)
    duplicate_rows: int = 0  # extra rows those copies added
    # Image folders of mixed sizes: images smaller than image_size were enlarged (blurred), and
    # non-square ones centre-cropped. Said, never silent: a dataset of blurred thumbnails trains a
    # blurry model.
    upscaled: int = 0
    cropped: int = 0


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
    upscaled: int = 0
    cropped: int = 0


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


def _read_caption(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read caption file ({exc})") from exc


def _folder_captions(root: str, paths: list[Path], captioned: bool, labelled: bool) -> list[str | None] | None:
    """Captions from same-stem ``.txt`` files, or None for a folder without any.

    A flat folder with caption files is an image-caption set: an image without its
    ``.txt`` is almost always a mistake (a failed copy, a renamed file), and training on it
    would silently add an unconditional example, so it is refused with the files named.
    In a class-subfolder layout the label still conditions every image, so a missing
    caption there stays an empty caption, as before.
    """
    if not captioned:
        return None
    captions: list[str | None] = []
    missing: list[Path] = []
    for path in paths:
        side = path.with_suffix(".txt")
        if side.is_file():
            captions.append(_read_caption(side))
        else:
            missing.append(path)
            captions.append("")
    if missing and not labelled:
        named = ", ".join(str(p.relative_to(root)) for p in missing[:_MAX_NAMED])
        more = f" and {len(missing) - _MAX_NAMED} more" if len(missing) > _MAX_NAMED else ""
        raise DataError(
            f"{root}: captioned folder, but {len(missing)} image(s) have no caption file "
            f"(same name, .txt): {named}{more}; add them (an empty .txt is allowed)"
        )
    return captions


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
    all_paths, paths = paths, paths[:limit]

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

    captions = _folder_captions(
        root, paths, captioned=any(p.with_suffix(".txt").is_file() for p in all_paths), labelled=labelled
    )

    reshaped = {"upscaled": 0, "cropped": 0}

    def images() -> Iterator[Image.Image]:
        for i, path in enumerate(paths):
            img = first if i == 0 else open_image(path)
            reshaped["upscaled"] += min(img.size) < image_size
            reshaped["cropped"] += img.size[0] != img.size[1]
            yield img

    encoded = _encode_all(images(), channels, image_size)
    return _Rows(
        images=encoded,
        upscaled=reshaped["upscaled"],
        cropped=reshaped["cropped"],
        image_size=image_size,
        channels=channels,
        labels=labels_all[: len(paths)] if labels_all is not None else None,
        num_classes=len(classes) if labelled else None,
        captions=captions,
    )


def _on_white(img: Image.Image) -> Image.Image:
    """Alpha-composite onto white: transparent emoji pixels are white paper, not the black PIL's convert gives."""
    rgba = img.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")


def emoji_caption(entry: dict[str, object]) -> str:
    """A readable lowercase caption: the Unicode name ("grinning face with smiling eyes"), else the short name."""
    name = entry.get("name")
    if isinstance(name, str) and name.strip():
        return " ".join(name.lower().split())
    short = entry.get("short_name")
    if isinstance(short, str) and short.strip():
        return " ".join(short.lower().replace("_", " ").replace("-", " ").split())
    return ""


def _from_emoji(image_size: int | None, channels: int | None, limit: int | None) -> _Rows:
    """The emoji-datasource-google set fetched at set-up time: 64x64 emoji, captioned by name, labelled by category.

    Only the base emoji (one per ``emoji.json`` entry) are used; skin-tone variations would
    add near-duplicate images with near-duplicate captions. Order is the package's
    ``sort_order`` (then the code point), so ids are stable across machines and runs.
    """
    from memshard.data.fetch import EMOJI_IMAGE_DIR, emoji_dir  # lazy: `python -m memshard.data.fetch` imports us

    base = emoji_dir()
    meta = base / "emoji.json"
    try:
        entries = json.loads(meta.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"emoji: {meta} is not readable JSON ({exc}); delete {base} and fetch it again") from exc
    if not isinstance(entries, list):
        raise DataError(f"emoji: {meta} is not a list of entries")
    usable = [e for e in entries if isinstance(e, dict) and e.get("has_img_google") is True and e.get("image")]
    if not usable:
        raise DataError(f"emoji: {meta} lists no google images")
    usable.sort(key=lambda e: (int(e.get("sort_order") or 0), str(e.get("unified") or "")))
    categories = sorted({str(e.get("category") or "") for e in usable})
    class_of = {name: i for i, name in enumerate(categories)}
    chosen = usable[:limit]
    size, ch = image_size or 64, channels or 3

    def images() -> Iterator[Image.Image]:
        for entry in chosen:
            path = base / EMOJI_IMAGE_DIR / str(entry["image"])
            try:
                with Image.open(path) as img:
                    yield _on_white(img)
            except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError... for bad files
                raise DataError(f"emoji: cannot read image {path} ({exc})") from exc

    return _Rows(
        images=_encode_all(images(), ch, size),
        image_size=size,
        channels=ch,
        labels=np.asarray([class_of[str(e.get("category") or "")] for e in chosen], dtype=np.int64),
        num_classes=len(categories),
        captions=[emoji_caption(e) for e in chosen],
    )


def _from_shapes(image_size: int | None, channels: int | None, limit: int | None) -> _Rows:
    """The synthetic compositional set (:mod:`memshard.data.shapes`): captioned, labelled by shape, seeded."""
    from memshard.data.shapes import SHAPES, shapes_rows

    images, captions, labels = shapes_rows(limit)
    size, ch = image_size or 64, channels or 3
    return _Rows(
        images=_encode_all(images, ch, size),
        image_size=size,
        channels=ch,
        labels=labels,
        num_classes=len(SHAPES),
        captions=list(captions),
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


def _from_parquet(path: str, image_size: int | None, channels: int | None, limit: int | None) -> _Rows:
    """A Parquet file of encoded images (``image``) with optional ``caption``, ``label`` and ``id`` columns.

    Images are decoded and re-encoded here like every other source, so an image-caption
    table from elsewhere (any size, mode or format PIL reads) becomes a dataset that
    decodes strictly. Rows without an ``id`` get their row number; a null image, caption
    or label is refused with the row named, while an empty caption is kept and counted.
    """
    fs, fs_path = filesystem(path)
    try:
        with fs.open(fs_path, "rb") as fh:
            pf = pq.ParquetFile(fh)
            schema = pf.schema_arrow
            names = set(schema.names)
            if "image" not in names:
                raise DataError(f"{path}: no 'image' column (columns: {', '.join(schema.names)})")
            wanted = [c for c in ("id", "image", "label", "caption") if c in names]
            kinds = {
                "image": (pa.types.is_binary, pa.types.is_large_binary),
                "caption": (pa.types.is_string, pa.types.is_large_string),
                "label": (pa.types.is_integer,),
                "id": (pa.types.is_integer,),
            }
            for col in wanted:
                t = schema.field(col).type
                if not any(check(t) for check in kinds[col]):
                    raise DataError(f"{path}: column '{col}' has type {t}, which cannot be used as {col}")
            columns: dict[str, list[object]] = {c: [] for c in wanted}
            n = 0
            for batch in pf.iter_batches(batch_size=ROW_GROUP_SIZE, columns=wanted):
                take = batch.num_rows if limit is None else min(batch.num_rows, limit - n)
                for col in wanted:
                    columns[col].extend(batch.column(col).slice(0, take).to_pylist())
                n += take
                if limit is not None and n >= limit:
                    break
    except DataError:
        raise
    except Exception as exc:  # pyarrow and fsspec raise many types for unreadable or absent files
        raise DataError(f"{path}: not a readable Parquet file ({exc})") from exc
    if n == 0:
        raise DataError(f"{path}: no rows")

    ids = None
    if "id" in columns:
        if any(v is None for v in columns["id"]):
            row = columns["id"].index(None)
            raise DataError(f"{path}: row {row}: null id")
        ids = np.asarray(columns["id"], dtype=np.int64)
        if len(np.unique(ids)) != len(ids):
            raise DataError(f"{path}: column 'id' has duplicate values")

    def where(row: int) -> str:
        return f"{path}: row {row}" + (f" (id {ids[row]})" if ids is not None else "")

    for col in ("image", "caption", "label"):
        if col in columns and None in columns[col]:
            raise DataError(f"{where(columns[col].index(None))}: null {col}")
    labels = num_classes = None
    if "label" in columns:
        labels = np.asarray(columns["label"], dtype=np.int64)
        if labels.min() < 0:
            raise DataError(f"{where(int(np.argmin(labels)))}: negative label {labels.min()}")
        num_classes = int(labels.max()) + 1

    def open_row(row: int) -> Image.Image:
        try:
            img = Image.open(io.BytesIO(columns["image"][row]))  # type: ignore[arg-type]
            img.load()
        except Exception as exc:
            raise DataError(f"{where(row)}: cannot read image ({exc})") from exc
        return ImageOps.exif_transpose(img)

    first = open_row(0)
    size = image_size or min(first.size)
    if channels is None:
        gray = True
        for row in range(n):
            try:
                with Image.open(io.BytesIO(columns["image"][row])) as probe:  # type: ignore[arg-type]
                    gray = probe.mode in _GRAY_MODES
            except Exception as exc:
                raise DataError(f"{where(row)}: cannot read image ({exc})") from exc
            if not gray:
                break
        channels = 1 if gray else 3

    def images() -> Iterator[Image.Image]:
        yield first
        for row in range(1, n):
            yield open_row(row)

    captions = [str(c).strip() for c in columns["caption"]] if "caption" in columns else None
    return _Rows(
        images=_encode_all(images(), channels, size),
        image_size=size,
        channels=channels,
        labels=labels,
        num_classes=num_classes,
        captions=captions,  # type: ignore[arg-type]
        ids=ids,
    )


# -- writing -----------------------------------------------------------------------------


def duplicate_rows(rows: _Rows, groups: int, copies: int, seed: int = 0) -> tuple[_Rows, np.ndarray]:
    """Store ``groups`` seeded-chosen images ``copies`` times each (copies - 1 new rows apiece, new ids).

    This is how scraped data looks (LAION stores popular images many times) and where diffusion
    models memorize first; the memorization benchmark's `dup` size is built with it. The extra rows
    go after the originals, with ids above the largest one, and keep the label and caption of
    their original. Returns the new rows and the positions of the duplicated originals.
    """
    n = len(rows.images)
    if groups < 1 or copies < 2:
        raise ValueError(f"duplicate needs at least 1 image and 2 copies, got {groups} images x {copies} copies")
    if groups > n:
        raise ValueError(f"cannot duplicate {groups} images of a set of {n}")
    chosen = np.sort(np.random.default_rng(seed).choice(n, groups, replace=False))
    extra = np.repeat(chosen, copies - 1)
    ids = rows.ids if rows.ids is not None else np.arange(n, dtype=np.int64)
    start = int(ids.max()) + 1 if n else 0
    out = _Rows(
        images=rows.images + [rows.images[i] for i in extra],
        image_size=rows.image_size,
        channels=rows.channels,
        labels=None if rows.labels is None else np.concatenate([rows.labels, rows.labels[extra]]),
        num_classes=rows.num_classes,
        captions=None if rows.captions is None else rows.captions + [rows.captions[i] for i in extra],
        ids=np.concatenate([ids, np.arange(start, start + len(extra), dtype=np.int64)]),
    )
    return out, chosen


def parse_duplicate(text: str) -> tuple[int, int]:
    """``D:M`` (or ``DxM``): D images stored M times each."""
    for sep in (":", "x"):
        if sep in text:
            a, _, b = text.partition(sep)
            if a.strip().isdigit() and b.strip().isdigit():
                return int(a), int(b)
    raise ValueError(f"--duplicate {text!r}: write D:M, e.g. 10:30 (10 images stored 30 times each)")


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
    if not is_remote(out):
        os.makedirs(parent, exist_ok=True)  # a missing folder is made at write time, once the data is good
    Storage(parent).write_bytes(name, buf.getvalue())


def prepare(
    source: str,
    out: str,
    image_size: int | None = None,
    channels: int | None = None,
    limit: int | None = None,
    duplicate: tuple[int, int] | None = None,
    duplicate_seed: int = 0,
) -> PrepareResult:
    """Convert ``source`` into the canonical Parquet at ``out`` (a file path or s3:// URI).

    ``duplicate=(D, M)`` stores D seeded-chosen images of the (limited) source M times each
    (:func:`duplicate_rows`).
    """
    _check_args(image_size, channels, limit)
    if source == "digits":
        rows = _from_digits(image_size, channels, limit)
    elif source == "fashion-mnist":
        rows = _from_fashion_mnist(image_size, channels, limit)
    elif source == "emoji":
        rows = _from_emoji(image_size, channels, limit)
    elif source == "shapes":
        rows = _from_shapes(image_size, channels, limit)
    elif os.path.isdir(source):
        rows = _from_directory(source, image_size, channels, limit)
    elif source.lower().endswith((".npy", ".npz")):
        if not os.path.isfile(source):
            raise DataError(f"{source}: file does not exist")
        rows = _from_arrays(source, image_size, channels, limit)
    elif source.lower().endswith(".parquet"):
        if not is_remote(source) and not os.path.isfile(source.removeprefix("file://")):
            raise DataError(f"{source}: file does not exist")
        rows = _from_parquet(source, image_size, channels, limit)
    else:
        raise DataError(f"cannot prepare a dataset from {source!r}: accepted sources are {_ACCEPTED}")
    distinct = len(rows.images)
    if duplicate is not None:
        rows, _ = duplicate_rows(rows, duplicate[0], duplicate[1], duplicate_seed)
    _write(_table(rows), out)
    return PrepareResult(
        path=out,
        num_rows=len(rows.images),
        image_size=rows.image_size,
        channels=rows.channels,
        num_classes=rows.num_classes,
        has_caption=rows.captions is not None,
        empty_captions=sum(1 for c in rows.captions or [] if not c),
        duplicated_images=0 if duplicate is None else duplicate[0],
        duplicate_rows=len(rows.images) - distinct,
        upscaled=rows.upscaled,
        cropped=rows.cropped,
    )
