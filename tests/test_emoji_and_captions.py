"""Captioned sources: the emoji set (fetched at set-up time), captioned folders and Parquet inputs.

The fetch and the emoji conversion are tested offline on a tiny tarball built here with
the same layout as the npm package (served through a file:// URL), so they run on any
machine; the real package is checked when the set-up step has fetched it (in CI it must
have: scripts/setup.sh does, and a test that silently downloaded would hide a missing
set-up step).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from memshard.data import DataError, inspect_dataset, load_captions, load_rows, prepare
from memshard.data.fetch import EMOJI_PACKAGE, EMOJI_VERSION, FetchError, emoji_dir, fetch_emoji
from memshard.data.prepare import emoji_caption

# -- helpers -----------------------------------------------------------------------------


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _emoji_rgba(seed: int) -> np.ndarray:
    """64x64 RGBA: transparent background, an opaque coloured disc, a half-transparent black band."""
    rng = np.random.default_rng(seed)
    img = np.zeros((64, 64, 4), np.uint8)
    img[..., :3] = rng.integers(0, 256, 3, dtype=np.uint8)  # colour under alpha 0 must not show through
    yy, xx = np.mgrid[:64, :64]
    disc = (yy - 32) ** 2 + (xx - 32) ** 2 <= 20**2
    img[disc] = (*rng.integers(0, 200, 3).tolist(), 255)
    img[60:, :] = (0, 0, 0, 128)
    return img


def _integrity(data: bytes) -> str:
    return "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()


FAKE_ENTRIES = [
    # out of sort order on purpose; one without a google image; one without a name
    {"name": "THUMBS UP SIGN", "short_name": "+1", "image": "1f44d.png", "category": "People & Body",
     "sort_order": 30, "unified": "1F44D", "has_img_google": True},
    {"name": "GRINNING FACE", "short_name": "grinning", "image": "1f600.png", "category": "Smileys & Emotion",
     "sort_order": 1, "unified": "1F600", "has_img_google": True},
    {"name": None, "short_name": "man_dancing", "image": "1f57a.png", "category": "People & Body",
     "sort_order": 20, "unified": "1F57A", "has_img_google": True},
    {"name": "NO GOOGLE IMAGE", "short_name": "nope", "image": "0000.png", "category": "Symbols",
     "sort_order": 5, "unified": "0000", "has_img_google": False},
]  # fmt: skip


def _fake_tarball(path: Path) -> tuple[str, dict[str, np.ndarray]]:
    """A small .tgz laid out like the npm package; returns (integrity, image name -> RGBA pixels)."""
    pixels = {e["image"]: _emoji_rgba(i) for i, e in enumerate(FAKE_ENTRIES) if e["has_img_google"]}
    members = {"package/emoji.json": json.dumps(FAKE_ENTRIES).encode(), "package/README.md": b"readme"}
    for name, arr in pixels.items():
        members[f"package/img/google/64/{name}"] = _png(arr)
        members[f"package/img/google/32/{name}"] = _png(arr[::2, ::2])  # other sizes are not extracted
    members["package/img/google/64/../../../escape.png"] = b"x"  # must never be written
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return _integrity(path.read_bytes()), pixels


# -- fetch (offline, on a fake package) --------------------------------------------------


def test_fetch_verifies_extracts_only_what_is_needed_and_is_idempotent(tmp_path: Path) -> None:
    tgz = tmp_path / "pkg.tgz"
    integrity, pixels = _fake_tarball(tgz)
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match=r"scripts/setup\.sh"):
        emoji_dir(cache)

    bad = integrity[:-6] + ("AAAA==" if not integrity.endswith("AAAA==") else "BBBB==")
    with pytest.raises(FetchError, match="integrity mismatch"):
        fetch_emoji(cache, url=tgz.as_uri(), integrity=bad)
    assert list(cache.iterdir()) == []  # nothing half-done left behind

    got = fetch_emoji(cache, url=tgz.as_uri(), integrity=integrity)
    assert got == cache / f"{EMOJI_PACKAGE}-{EMOJI_VERSION}" == emoji_dir(cache)
    files = sorted(p.relative_to(got).as_posix() for p in got.rglob("*") if p.is_file())
    assert files == ["emoji.json"] + [f"img/google/64/{n}" for n in sorted(pixels)]
    assert not list(tmp_path.rglob("escape.png"))
    assert [p.name for p in cache.iterdir()] == [got.name]  # the temporary directory is gone
    # idempotent: a second call does not touch the network (this URL does not exist)
    assert fetch_emoji(cache, url=(tmp_path / "absent.tgz").as_uri(), integrity=integrity) == got


def test_fetch_reports_an_unreachable_url(tmp_path: Path) -> None:
    with pytest.raises(FetchError, match=r"absent\.tgz"):
        fetch_emoji(tmp_path / "c", url=(tmp_path / "absent.tgz").as_uri(), integrity=_integrity(b""))
    with pytest.raises(ValueError, match="integrity"):
        fetch_emoji(tmp_path / "c", url=(tmp_path / "absent.tgz").as_uri(), integrity="md5:abc")


def test_emoji_source_on_fake_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tgz = tmp_path / "pkg.tgz"
    integrity, pixels = _fake_tarball(tgz)
    monkeypatch.setenv("MEMSHARD_CACHE", str(tmp_path / "cache"))
    fetch_emoji(url=tgz.as_uri(), integrity=integrity)

    out = tmp_path / "emoji.parquet"
    res = prepare("emoji", str(out))
    assert (res.num_rows, res.image_size, res.channels, res.has_caption, res.empty_captions) == (3, 64, 3, True, 0)
    assert res.num_classes == 2  # categories of the usable entries, sorted: People & Body, Smileys & Emotion
    ids, images, labels = load_rows(str(out), np.arange(3, dtype=np.int64), 64, 3)
    assert ids.tolist() == [0, 1, 2]
    assert load_captions(str(out), ids) == ["grinning face", "man dancing", "thumbs up sign"]  # by sort_order
    assert labels is not None and labels.tolist() == [1, 0, 0]
    for row, name in enumerate(["1f600.png", "1f57a.png", "1f44d.png"]):
        rgba = pixels[name].astype(np.float64)
        alpha = rgba[..., 3:] / 255.0
        expected = rgba[..., :3] * alpha + 255.0 * (1 - alpha)  # composited onto white
        got = images[row].transpose(1, 2, 0).astype(np.float64)
        assert np.abs(got - expected).max() <= 1.0
        assert (got[pixels[name][..., 3] == 0] == 255).all()

    small = prepare("emoji", str(tmp_path / "small.parquet"), image_size=16, channels=1, limit=2)
    assert (small.num_rows, small.image_size, small.channels) == (2, 16, 1)
    _, gray, _ = load_rows(str(tmp_path / "small.parquet"), np.arange(2, dtype=np.int64), 16, 1)
    assert gray.shape == (2, 1, 16, 16) and gray[0, 0, 0, 0] == 255  # transparent corner -> white


def test_emoji_caption_fallbacks() -> None:
    assert emoji_caption({"name": "GRINNING FACE WITH SMILING EYES"}) == "grinning face with smiling eyes"
    assert emoji_caption({"name": "  Spain   Flag "}) == "spain flag"
    assert emoji_caption({"name": None, "short_name": "man_dancing"}) == "man dancing"
    assert emoji_caption({"name": "", "short_name": "flag-es"}) == "flag es"
    assert emoji_caption({}) == ""


# -- the real emoji package ---------------------------------------------------------------


def test_emoji_source_real_package(real_emoji: Path, tmp_path: Path) -> None:
    entries = json.loads((real_emoji / "emoji.json").read_text(encoding="utf-8"))
    usable = sorted((e for e in entries if e.get("has_img_google")), key=lambda e: (e["sort_order"], e["unified"]))
    out = tmp_path / "emoji.parquet"
    res = prepare("emoji", str(out))
    assert res.num_rows == len(usable) > 1800
    assert (res.image_size, res.channels, res.has_caption, res.empty_captions) == (64, 3, True, 0)
    assert res.num_classes == len({e["category"] for e in usable})

    info = inspect_dataset(str(out))
    assert info.num_rows == res.num_rows and info.has_label and info.has_caption
    all_ids = pq.read_table(out, columns=["id"]).column("id").to_numpy()
    assert len(np.unique(all_ids)) == len(all_ids) and all_ids.tolist() == list(range(len(all_ids)))
    captions = load_captions(str(out), all_ids)
    assert all(c and c == c.lower() and c.strip() == c for c in captions)
    assert captions[0] == "grinning face"  # the package's first emoji in sort order

    sample = np.arange(0, len(usable), 97, dtype=np.int64)
    _, images, _ = load_rows(str(out), sample, 64, 3)
    assert images.shape == (len(sample), 3, 64, 64)
    for row, i in enumerate(sample.tolist()):
        alpha = np.asarray(Image.open(real_emoji / "img/google/64" / usable[i]["image"]).convert("RGBA"))[..., 3]
        assert (images[row][:, alpha == 0] == 255).all(), usable[i]["image"]


# -- captioned folders -------------------------------------------------------------------


def _rgb(size: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def test_captioned_folder(tmp_path: Path) -> None:
    src = tmp_path / "pairs"
    src.mkdir()
    Image.fromarray(_rgb(12, 0)).save(src / "b.png")
    (src / "b.txt").write_text("  a red square \n", encoding="utf-8")
    Image.fromarray(_rgb(12, 1)).save(src / "a.png")
    (src / "a.txt").write_text("", encoding="utf-8")  # empty caption: allowed, counted
    Image.fromarray(_rgb(24, 2)).save(src / "c.png")
    (src / "c.txt").write_text("a blue circle", encoding="utf-8")
    (src / "notes.txt").write_text("a text file without an image is ignored", encoding="utf-8")

    out = tmp_path / "pairs.parquet"
    res = prepare(str(src), str(out))
    assert (res.num_rows, res.image_size, res.channels, res.num_classes) == (3, 12, 3, None)
    assert res.has_caption and res.empty_captions == 1
    ids, images, labels = load_rows(str(out), np.arange(3, dtype=np.int64), 12, 3)
    assert labels is None
    assert load_captions(str(out), ids) == ["", "a red square", "a blue circle"]  # sorted by file name
    np.testing.assert_array_equal(images[1], _rgb(12, 0).transpose(2, 0, 1))


def test_captioned_folder_missing_caption_file_is_named(tmp_path: Path) -> None:
    src = tmp_path / "pairs"
    src.mkdir()
    for i in range(3):
        Image.fromarray(_rgb(8, i)).save(src / f"img{i}.png")
    (src / "img0.txt").write_text("a caption", encoding="utf-8")
    (src / "img2.txt").write_text("another", encoding="utf-8")
    with pytest.raises(DataError, match=r"img1\.png") as exc:
        prepare(str(src), str(tmp_path / "o.parquet"))
    assert "1 image(s) have no caption file" in str(exc.value)
    assert not (tmp_path / "o.parquet").exists()


def test_folders_without_caption_files_keep_their_behaviour(tmp_path: Path) -> None:
    src = tmp_path / "classes"
    for cls in ("cat", "dog"):
        (src / cls).mkdir(parents=True)
        Image.fromarray(_rgb(8, len(cls))).save(src / cls / "x.png")
    res = prepare(str(src), str(tmp_path / "c.parquet"))
    assert (res.num_rows, res.num_classes, res.has_caption, res.empty_captions) == (2, 2, False, 0)
    assert not inspect_dataset(str(tmp_path / "c.parquet")).has_caption
    # class folders with some captions: a missing caption is an empty one (the label still conditions)
    (src / "cat" / "x.txt").write_text("a cat", encoding="utf-8")
    res = prepare(str(src), str(tmp_path / "c2.parquet"))
    assert res.has_caption and res.empty_captions == 1
    assert load_captions(str(tmp_path / "c2.parquet"), np.array([0, 1], np.int64)) == ["a cat", ""]


# -- Parquet inputs ----------------------------------------------------------------------


def test_parquet_with_images_and_captions(tmp_path: Path) -> None:
    gray = np.tile(np.arange(0, 240, 15, dtype=np.uint8), (16, 1))
    rgba = np.dstack([_rgb(20, 3), np.full((20, 20), 255, np.uint8)])
    src = tmp_path / "in.parquet"
    table = pa.table(
        {
            "caption": ["a gradient", "noise", " a photo ", ""],
            "image": [_png(gray), _png(_rgb(16, 4)), _jpeg(_rgb(32, 5)), _png(rgba)],
            "extra": [1, 2, 3, 4],  # other columns are ignored
        }
    )
    pq.write_table(table, src)
    out = tmp_path / "out.parquet"
    res = prepare(str(src), str(out))
    assert (res.num_rows, res.image_size, res.channels, res.num_classes) == (4, 16, 3, None)
    assert res.has_caption and res.empty_captions == 1
    ids, images, _ = load_rows(str(out), np.arange(4, dtype=np.int64), 16, 3)  # decodes strictly at 16x16 RGB
    assert ids.tolist() == [0, 1, 2, 3]  # no id column: row order
    assert load_captions(str(out), ids) == ["a gradient", "noise", "a photo", ""]
    np.testing.assert_array_equal(images[1], _rgb(16, 4).transpose(2, 0, 1))  # PNG at the size: exact
    np.testing.assert_array_equal(images[0][0], gray)
    assert set(pq.read_schema(out).names) == {"id", "image", "caption"}

    # ids, labels and limit; grayscale output on request
    pq.write_table(
        pa.table(
            {
                "id": pa.array([40, 7, 9], pa.int32()),
                "image": [_png(_rgb(16, i)) for i in range(3)],
                "label": [2, 0, 1],
                "caption": ["x", "y", "z"],
            }
        ),
        tmp_path / "ids.parquet",
    )
    res = prepare(str(tmp_path / "ids.parquet"), str(tmp_path / "ids_out.parquet"), image_size=8, channels=1, limit=2)
    assert (res.num_rows, res.image_size, res.channels, res.num_classes) == (2, 8, 1, 3)
    ids, images, labels = load_rows(str(tmp_path / "ids_out.parquet"), np.array([7, 40], np.int64), 8, 1)
    assert ids.tolist() == [7, 40] and labels is not None and labels.tolist() == [0, 2]
    assert load_captions(str(tmp_path / "ids_out.parquet"), ids) == ["y", "x"]


def test_parquet_errors_name_the_file_and_row(tmp_path: Path) -> None:
    no_image = tmp_path / "noimg.parquet"
    pq.write_table(pa.table({"pixels": [b"x"], "caption": ["c"]}), no_image)
    with pytest.raises(DataError, match="'image'") as exc:
        prepare(str(no_image), str(tmp_path / "o.parquet"))
    assert "noimg.parquet" in str(exc.value) and "pixels" in str(exc.value)

    corrupt = tmp_path / "corrupt.parquet"
    images = [_png(_rgb(8, 0)), b"not an image"]
    pq.write_table(pa.table({"id": [5, 6], "image": images, "caption": ["a", "b"]}), corrupt)
    with pytest.raises(DataError, match=r"corrupt\.parquet: row 1 \(id 6\): cannot read image"):
        prepare(str(corrupt), str(tmp_path / "o.parquet"))

    null_caption = tmp_path / "nullcap.parquet"
    pq.write_table(pa.table({"image": [_png(_rgb(8, 0))] * 2, "caption": ["a", None]}), null_caption)
    with pytest.raises(DataError, match="row 1: null caption"):
        prepare(str(null_caption), str(tmp_path / "o.parquet"))

    dup = tmp_path / "dup.parquet"
    pq.write_table(pa.table({"id": [1, 1], "image": [_png(_rgb(8, 0))] * 2}), dup)
    with pytest.raises(DataError, match="duplicate"):
        prepare(str(dup), str(tmp_path / "o.parquet"))

    wrong_type = tmp_path / "strimg.parquet"
    pq.write_table(pa.table({"image": ["a string"], "caption": ["c"]}), wrong_type)
    with pytest.raises(DataError, match="column 'image'"):
        prepare(str(wrong_type), str(tmp_path / "o.parquet"))

    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match=r"junk\.parquet: not a readable Parquet file"):
        prepare(str(tmp_path / "junk.parquet"), str(tmp_path / "o.parquet"))
    with pytest.raises(DataError, match="does not exist"):
        prepare(str(tmp_path / "missing.parquet"), str(tmp_path / "o.parquet"))
    assert not (tmp_path / "o.parquet").exists()
