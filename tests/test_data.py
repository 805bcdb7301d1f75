"""Tests for memshard.data: real PNG/JPEG bytes made with PIL and real Parquet files in tmp_path."""

from __future__ import annotations

import io
import os
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from memshard.data import (
    BUILTIN_SOURCES,
    BadImage,
    DataError,
    DatasetInfo,
    decode_image,
    duplicate_ids,
    encode_png,
    inspect_dataset,
    load_captions,
    load_rows,
    prepare,
    row_chunks,
    validate_chunk,
)

FASHION_DIR = "/usr/share/datasets/fashion-mnist"


# -- helpers -----------------------------------------------------------------------------


def _img_bytes(arr: np.ndarray, fmt: str = "PNG", **kw: object) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr)).save(buf, format=fmt, **kw)
    return buf.getvalue()


def _gray(size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size), dtype=np.uint8)


def _rgb(size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def _write(path: Path, columns: dict[str, pa.Array], row_group_size: int | None = None) -> Path:
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
    return path


def _good_table(ids: list[int], size: int = 8, seed: int = 0) -> dict[str, pa.Array]:
    return {
        "id": pa.array(ids, type=pa.int64()),
        "image": pa.array([_img_bytes(_gray(size, seed + i)) for i in ids], type=pa.binary()),
        "label": pa.array([i % 3 for i in ids], type=pa.int32()),
        "caption": pa.array([f"cap {i}" for i in ids], type=pa.string()),
    }


# -- images ------------------------------------------------------------------------------


def test_decode_png_gray_and_rgb() -> None:
    g = _gray(16, 1)
    out = decode_image(_img_bytes(g), 16, 1)
    assert out.shape == (1, 16, 16) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[0], g)

    c = _rgb(16, 2)
    out = decode_image(_img_bytes(c), 16, 3)
    assert out.shape == (3, 16, 16)
    np.testing.assert_array_equal(out, c.transpose(2, 0, 1))


def test_decode_jpeg() -> None:
    flat = np.full((16, 16, 3), (200, 40, 90), dtype=np.uint8)
    out = decode_image(_img_bytes(flat, "JPEG", quality=95), 16, 3)
    assert out.shape == (3, 16, 16)
    assert np.abs(out.astype(int) - flat.transpose(2, 0, 1)).max() <= 6  # lossy but close
    gray = decode_image(_img_bytes(np.full((16, 16), 77, np.uint8), "JPEG"), 16, 1)
    assert gray.shape == (1, 16, 16) and abs(int(gray.mean()) - 77) <= 2


def test_decode_rejects_garbage_and_truncated() -> None:
    with pytest.raises(BadImage, match="undecodable"):
        decode_image(b"definitely not an image", 16, 1)
    png = _img_bytes(_gray(64, 3))  # noise barely compresses: the cut lands inside pixel data
    assert len(png) > 2000
    with pytest.raises(BadImage):
        decode_image(png[: len(png) // 2], 64, 1)


def test_decode_rejects_wrong_size_mode_and_format() -> None:
    with pytest.raises(BadImage, match=r"size 8x8, expected 16x16"):
        decode_image(_img_bytes(_gray(8)), 16, 1)
    with pytest.raises(BadImage, match=r"mode RGB, expected L"):
        decode_image(_img_bytes(_rgb(16)), 16, 1)
    with pytest.raises(BadImage, match=r"mode L, expected RGB"):
        decode_image(_img_bytes(_gray(16)), 16, 3)
    rgba = np.zeros((16, 16, 4), np.uint8)
    with pytest.raises(BadImage, match="mode RGBA"):
        decode_image(_img_bytes(rgba), 16, 3)
    with pytest.raises(BadImage, match="format GIF"):
        decode_image(_img_bytes(_gray(16), "GIF"), 16, 1)


def test_encode_png_layouts_round_trip() -> None:
    c = _rgb(5, 4)
    np.testing.assert_array_equal(decode_image(encode_png(c), 5, 3), c.transpose(2, 0, 1))
    chw = c.transpose(2, 0, 1)
    np.testing.assert_array_equal(decode_image(encode_png(chw), 5, 3), chw)
    g = _gray(5, 5)
    for arr in (g, g[None], g[:, :, None]):
        np.testing.assert_array_equal(decode_image(encode_png(arr), 5, 1)[0], g)
    with pytest.raises(ValueError, match="uint8"):
        encode_png(g.astype(np.float32))


# -- inspect_dataset ---------------------------------------------------------------------


def test_inspect_single_file(tmp_path: Path) -> None:
    f = _write(tmp_path / "d.parquet", _good_table([1, 2, 3]))
    info = inspect_dataset(str(f))
    assert info.files == [str(f)]
    assert (info.num_rows, info.has_label, info.has_caption) == (3, True, True)


def test_inspect_directory_of_two_files(tmp_path: Path) -> None:
    d = tmp_path / "ds"
    d.mkdir()
    cols = _good_table([1, 2, 3])
    del cols["caption"]
    _write(d / "b.parquet", cols)
    cols = _good_table([4, 5])
    del cols["caption"]
    _write(d / "a.parquet", cols)
    (d / "README.txt").write_text("not data")
    (d / "_SUCCESS").write_text("")
    info = inspect_dataset(str(d))
    assert info.files == [str(d / "a.parquet"), str(d / "b.parquet")]
    assert info.num_rows == 5 and info.has_label and not info.has_caption


def test_inspect_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nope.parquet"
    with pytest.raises(DataError, match="does not exist") as exc:
        inspect_dataset(str(missing))
    assert str(missing) in str(exc.value)

    no_image = _write(tmp_path / "noimg.parquet", {"id": pa.array([1], pa.int64())})
    with pytest.raises(DataError, match="'image'") as exc:
        inspect_dataset(str(no_image))
    assert str(no_image) in str(exc.value)

    str_id = _write(tmp_path / "strid.parquet", {"id": pa.array(["a"]), "image": pa.array([b"x"])})
    with pytest.raises(DataError, match=r"'id' must be int64, found string"):
        inspect_dataset(str(str_id))

    float_label = _write(
        tmp_path / "fl.parquet",
        {"id": pa.array([1], pa.int64()), "image": pa.array([b"x"]), "label": pa.array([1.5])},
    )
    with pytest.raises(DataError, match=r"'label' must be an integer type, found double"):
        inspect_dataset(str(float_label))

    not_pq = tmp_path / "fake.parquet"
    not_pq.write_bytes(b"hello, I am text")
    with pytest.raises(DataError, match="not a readable Parquet") as exc:
        inspect_dataset(str(not_pq))
    assert str(not_pq) in str(exc.value)

    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    with pytest.raises(DataError, match=r"no \*\.parquet files"):
        inspect_dataset(str(empty_dir))

    zero = _write(tmp_path / "zero.parquet", {"id": pa.array([], pa.int64()), "image": pa.array([], pa.binary())})
    with pytest.raises(DataError, match="zero rows"):
        inspect_dataset(str(zero))


def test_inspect_rejects_mixed_schemas(tmp_path: Path) -> None:
    d = tmp_path / "mixed"
    d.mkdir()
    _write(d / "a.parquet", _good_table([1]))
    cols = _good_table([2])
    del cols["label"]
    _write(d / "b.parquet", cols)
    with pytest.raises(DataError, match="different schemas") as exc:
        inspect_dataset(str(d))
    assert "label" in str(exc.value)


# -- validate_chunk / row_chunks ---------------------------------------------------------


def _messy_file(tmp_path: Path) -> Path:
    """12 rows in 3 row groups of 4, with known bad rows."""
    ids = list(range(100, 112))
    images: list[bytes | None] = [_img_bytes(_gray(8, i)) for i in ids]
    labels: list[int | None] = [i % 10 for i in ids]
    images[1] = b"\x89PNG garbage"  # id 101
    images[4] = _img_bytes(_gray(9))  # id 104: wrong size
    images[6] = None  # id 106: null image
    labels[8] = 10  # id 108: out of range for 10 classes
    labels[9] = None  # id 109: null label
    images[10] = _img_bytes(_rgb(8))  # id 110: wrong mode
    labels[11] = -1  # id 111: negative
    cols = {
        "id": pa.array(ids, pa.int64()),
        "image": pa.array(images, pa.binary()),
        "label": pa.array(labels, pa.int64()),
        "extra": pa.array([1.0] * 12),
    }
    path = _write(tmp_path / "messy.parquet", cols, row_group_size=4)
    assert pq.ParquetFile(path).metadata.num_row_groups == 3
    return path


def test_validate_chunks_find_exact_bad_rows(tmp_path: Path) -> None:
    path = _messy_file(tmp_path)
    info = inspect_dataset(str(path))
    chunks = row_chunks(info, 5)  # chunk boundaries deliberately cross row groups
    assert chunks == [(str(path), 0, 5), (str(path), 5, 10), (str(path), 10, 12)]
    good: list[int] = []
    labels: list[int] = []
    bad: dict[int, str] = {}
    for file_uri, start, stop in chunks:
        rep = validate_chunk(file_uri, start, stop, 8, 1, 10)
        good += rep.ids.tolist()
        assert rep.labels is not None and rep.ids.dtype == np.int64
        labels += rep.labels.tolist()
        bad.update(rep.bad)
    assert set(bad) == {101, 104, 106, 108, 109, 110, 111}
    assert good == [100, 102, 103, 105, 107]
    assert labels == [i % 10 for i in good]
    assert "undecodable" in bad[101]
    assert "size 9x9" in bad[104]
    assert "null image" in bad[106]
    assert "out of range" in bad[108]
    assert "null label" in bad[109]
    assert "mode RGB" in bad[110]
    assert "negative" in bad[111]


def test_validate_chunk_reads_only_its_range(tmp_path: Path) -> None:
    path = _messy_file(tmp_path)
    rep = validate_chunk(str(path), 3, 7, 8, 1, None)
    assert rep.ids.tolist() == [103, 105]
    assert sorted(i for i, _ in rep.bad) == [104, 106]
    # without num_classes a large label is fine, a negative one never is
    rep = validate_chunk(str(path), 8, 12, 8, 1, None)
    assert rep.ids.tolist() == [108]
    assert sorted(i for i, _ in rep.bad) == [109, 110, 111]


def test_validate_without_label_column(tmp_path: Path) -> None:
    cols = _good_table([1, 2, 3])
    del cols["label"]
    path = _write(tmp_path / "nolabel.parquet", cols)
    rep = validate_chunk(str(path), 0, 3, 8, 1, 10)
    assert rep.labels is None and rep.ids.tolist() == [1, 2, 3] and rep.bad == []


def test_row_chunks_cover_all_rows_once(tmp_path: Path) -> None:
    d = tmp_path / "ds"
    d.mkdir()
    sizes = {"a.parquet": 7, "b.parquet": 10, "c.parquet": 1}
    start_id = 0
    for name, n in sizes.items():
        _write(d / name, _good_table(list(range(start_id, start_id + n))), row_group_size=3)
        start_id += n
    info = inspect_dataset(str(d))
    for per in (1, 3, 4, 100):
        chunks = row_chunks(info, per)
        assert all(0 < stop - start <= per for _, start, stop in chunks)
        covered = {(f, r) for f, start, stop in chunks for r in range(start, stop)}
        assert len(covered) == sum(stop - start for _, start, stop in chunks) == 18
        for name, n in sizes.items():
            assert {r for f, r in covered if f == str(d / name)} == set(range(n))
    # an info without per-file counts (built by hand) re-reads the footers
    bare = DatasetInfo(info.uri, info.files, info.num_rows, info.has_label, info.has_caption)
    assert row_chunks(bare, 4) == row_chunks(info, 4)
    with pytest.raises(ValueError):
        row_chunks(info, 0)


def test_duplicate_ids() -> None:
    assert duplicate_ids(np.array([5, 1, 5, 2, 9, 1, 5], np.int64)).tolist() == [1, 5]
    assert duplicate_ids(np.array([3, 2, 1], np.int64)).size == 0
    assert duplicate_ids(np.array([], np.int64)).size == 0


# -- load_rows / load_captions -----------------------------------------------------------


def _two_file_dataset(tmp_path: Path) -> Path:
    """a.parquet ids 0..9, b.parquet ids 10..19 plus a second (later) copy of id 3."""
    d = tmp_path / "rows"
    d.mkdir()
    _write(d / "a.parquet", _good_table(list(range(10)), seed=0), row_group_size=4)
    cols = _good_table([*range(10, 20), 3], seed=1000)
    _write(d / "b.parquet", cols, row_group_size=4)
    return d


def test_load_rows_order_duplicates_and_directory(tmp_path: Path) -> None:
    d = _two_file_dataset(tmp_path)
    want = np.array([17, 3, 0, 12], np.int64)
    ids, images, labels = load_rows(str(d), want, 8, 1)
    assert ids.tolist() == want.tolist() and ids.dtype == np.int64
    assert images.shape == (4, 1, 8, 8) and images.dtype == np.uint8
    assert labels is not None and labels.tolist() == [i % 3 for i in want.tolist()]
    # id 3 is taken from its first row (a.parquet, seed 0+3), not from the later copy
    np.testing.assert_array_equal(images[1, 0], _gray(8, 3))
    np.testing.assert_array_equal(images[0, 0], _gray(8, 1000 + 17))
    assert load_captions(str(d), np.array([12, 3], np.int64)) == ["cap 12", "cap 3"]


def test_load_rows_missing_ids(tmp_path: Path) -> None:
    d = _two_file_dataset(tmp_path)
    with pytest.raises(DataError, match="not found") as exc:
        load_rows(str(d), np.array([1, 500, 2, 501], np.int64), 8, 1)
    assert "500" in str(exc.value) and "501" in str(exc.value)
    many = np.arange(1000, 1025, dtype=np.int64)
    with pytest.raises(DataError, match="25 requested ids") as exc:
        load_rows(str(d), many, 8, 1)
    assert "and 15 more" in str(exc.value)


def test_load_rows_without_labels_and_captions(tmp_path: Path) -> None:
    cols = _good_table([4, 8])
    del cols["label"], cols["caption"]
    path = _write(tmp_path / "plain.parquet", cols)
    ids, images, labels = load_rows(str(path), np.array([8], np.int64), 8, 1)
    assert ids.tolist() == [8] and labels is None and images.shape == (1, 1, 8, 8)
    with pytest.raises(DataError, match="caption"):
        load_captions(str(path), np.array([8], np.int64))
    ids, images, labels = load_rows(str(path), np.array([], np.int64), 8, 1)
    assert ids.size == 0 and images.shape == (0, 1, 8, 8)


def test_remote_filesystem_round_trip() -> None:
    """The non-local code path (fsspec file objects, what s3:// uses) via fsspec's in-memory filesystem."""
    uri = f"memory://memshard-test-{uuid.uuid4().hex[:8]}/digits.parquet"
    res = prepare("digits", uri, limit=50)
    info = inspect_dataset(uri)
    assert info.num_rows == 50 and info.files[0].startswith("memory://")
    rep = validate_chunk(info.files[0], 0, 50, res.image_size, res.channels, res.num_classes)
    assert rep.bad == [] and len(rep.ids) == 50
    ids, images, labels = load_rows(uri.rsplit("/", 1)[0], np.array([49, 0], np.int64), 16, 1)
    assert ids.tolist() == [49, 0] and images.shape == (2, 1, 16, 16) and labels is not None


# -- prepare -----------------------------------------------------------------------------


def test_prepare_digits_round_trip(tmp_path: Path) -> None:
    out = tmp_path / "digits" / "digits.parquet"
    res = prepare("digits", str(out))
    assert (res.num_rows, res.image_size, res.channels, res.num_classes) == (1797, 16, 1, 10)
    assert res.path == str(out) and not res.has_caption
    pf = pq.ParquetFile(out)
    assert max(pf.metadata.row_group(i).num_rows for i in range(pf.metadata.num_row_groups)) <= 1024
    assert not [p for p in os.listdir(out.parent) if p != "digits.parquet"]  # no temp file left behind
    info = inspect_dataset(str(out))
    assert info.num_rows == 1797 and info.has_label
    labels = []
    for chunk in row_chunks(info, 700):
        rep = validate_chunk(*chunk, 16, 1, 10)
        assert rep.bad == []
        labels += rep.labels.tolist()  # type: ignore[union-attr]
    assert sorted(set(labels)) == list(range(10)) and len(labels) == 1797
    ids, images, _ = load_rows(str(out), np.arange(1797, dtype=np.int64), 16, 1)
    assert ids.tolist() == list(range(1797))
    assert images.max() == 255 and images.min() == 0


def test_prepare_digits_size_and_limit(tmp_path: Path) -> None:
    res = prepare("digits", str(tmp_path / "d.parquet"), image_size=8, channels=3, limit=20)
    assert (res.num_rows, res.image_size, res.channels) == (20, 8, 3)
    from sklearn.datasets import load_digits

    raw = load_digits().images[:20]
    _, images, labels = load_rows(str(tmp_path / "d.parquet"), np.arange(20, dtype=np.int64), 8, 3)
    expected = np.round(raw * 255 / 16).astype(np.uint8)
    for c in range(3):  # no resize at 8x8: pixels are the scaled originals, replicated per channel
        np.testing.assert_array_equal(images[:, c], expected)
    assert labels.tolist() == load_digits().target[:20].tolist()  # type: ignore[union-attr]


def test_prepare_folder_with_classes_and_captions(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "dog").mkdir(parents=True)
    (src / "cat").mkdir()
    Image.fromarray(_rgb(12, 1)).save(src / "cat" / "a.png")
    (src / "cat" / "a.txt").write_text("  a cat  \n", encoding="utf-8")
    # non-square grayscale JPEG: white centre 12x12, black side bands -> the center crop is all white
    wide = np.zeros((12, 24), np.uint8)
    wide[:, 6:18] = 255
    Image.fromarray(wide).save(src / "cat" / "b.JPG", quality=100)
    Image.fromarray(_gray(24, 2)).save(src / "dog" / "c.png")
    (src / "dog" / "c.txt").write_text("a dog", encoding="utf-8")
    (src / "dog" / "notes.md").write_text("ignored")

    out = tmp_path / "folder.parquet"
    res = prepare(str(src), str(out))
    assert (res.num_rows, res.image_size, res.channels, res.num_classes) == (3, 12, 3, 2)
    assert res.has_caption
    info = inspect_dataset(str(out))
    assert info.has_label and info.has_caption
    rep = validate_chunk(info.files[0], 0, 3, 12, 3, 2)
    assert rep.bad == [] and rep.labels.tolist() == [0, 0, 1]  # type: ignore[union-attr]
    ids, images, _ = load_rows(str(out), np.array([0, 1, 2], np.int64), 12, 3)
    np.testing.assert_array_equal(images[0], _rgb(12, 1).transpose(2, 0, 1))  # no resize: exact
    assert images[1].min() >= 240  # center-cropped, not squashed
    assert load_captions(str(out), ids) == ["a cat", "", "a dog"]


def test_prepare_folder_grayscale_without_classes(tmp_path: Path) -> None:
    src = tmp_path / "flat"
    src.mkdir()
    for i in range(5):
        Image.fromarray(_gray(10, i)).save(src / f"img{i}.png")
    res = prepare(str(src), str(tmp_path / "flat.parquet"), image_size=6, limit=3)
    assert (res.num_rows, res.image_size, res.channels, res.num_classes, res.has_caption) == (3, 6, 1, None, False)
    info = inspect_dataset(str(tmp_path / "flat.parquet"))
    assert not info.has_label and not info.has_caption
    assert validate_chunk(info.files[0], 0, 3, 6, 1, None).bad == []


def test_prepare_npy_float(tmp_path: Path) -> None:
    arr = np.random.default_rng(0).random((7, 10, 10)).astype(np.float32)
    np.save(tmp_path / "x.npy", arr)
    res = prepare(str(tmp_path / "x.npy"), str(tmp_path / "x.parquet"))
    assert (res.num_rows, res.image_size, res.channels, res.num_classes) == (7, 10, 1, None)
    _, images, labels = load_rows(str(tmp_path / "x.parquet"), np.arange(7, dtype=np.int64), 10, 1)
    assert labels is None
    np.testing.assert_array_equal(images[:, 0], np.round(arr * 255).astype(np.uint8))

    bad = np.full((2, 4, 4), 1.5, np.float32)
    np.save(tmp_path / "bad.npy", bad)
    with pytest.raises(DataError, match=r"\[0, 1\]"):
        prepare(str(tmp_path / "bad.npy"), str(tmp_path / "bad.parquet"))


def test_prepare_npy_channel_first_rgb(tmp_path: Path) -> None:
    arr = np.random.default_rng(1).integers(0, 256, (4, 3, 6, 6), dtype=np.uint8)
    np.save(tmp_path / "c.npy", arr)
    res = prepare(str(tmp_path / "c.npy"), str(tmp_path / "c.parquet"))
    assert (res.channels, res.image_size) == (3, 6)
    _, images, _ = load_rows(str(tmp_path / "c.parquet"), np.arange(4, dtype=np.int64), 6, 3)
    np.testing.assert_array_equal(images, arr)


def test_prepare_npz_with_labels_and_limit(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (9, 8, 8, 3), dtype=np.uint8)
    labels = np.array([0, 1, 2, 3, 4, 0, 1, 2, 3])
    captions = np.array([f"c{i}" for i in range(9)])
    np.savez(tmp_path / "d.npz", images=images, labels=labels, captions=captions)
    res = prepare(str(tmp_path / "d.npz"), str(tmp_path / "d.parquet"), limit=4)
    assert (res.num_rows, res.channels, res.image_size, res.num_classes, res.has_caption) == (4, 3, 8, 5, True)
    ids, got, got_labels = load_rows(str(tmp_path / "d.parquet"), np.array([3, 0], np.int64), 8, 3)
    np.testing.assert_array_equal(got, images[[3, 0]].transpose(0, 3, 1, 2))
    assert got_labels.tolist() == [3, 0]  # type: ignore[union-attr]
    assert load_captions(str(tmp_path / "d.parquet"), ids) == ["c3", "c0"]
    with pytest.raises(DataError, match="not found"):
        load_rows(str(tmp_path / "d.parquet"), np.array([4], np.int64), 8, 3)

    np.savez(tmp_path / "noimg.npz", pixels=images)
    with pytest.raises(DataError, match="'images'"):
        prepare(str(tmp_path / "noimg.npz"), str(tmp_path / "noimg.parquet"))


def test_prepare_bad_sources(tmp_path: Path) -> None:
    (tmp_path / "table.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="accepted sources") as exc:
        prepare(str(tmp_path / "table.csv"), str(tmp_path / "o.parquet"))
    assert "table.csv" in str(exc.value) and ".npz" in str(exc.value) and BUILTIN_SOURCES[0] in str(exc.value)
    with pytest.raises(DataError, match="accepted sources"):
        prepare("mnist-but-misspelled", str(tmp_path / "o.parquet"))
    with pytest.raises(DataError, match="does not exist"):
        prepare(str(tmp_path / "missing.npy"), str(tmp_path / "o.parquet"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no images"):
        prepare(str(empty), str(tmp_path / "o.parquet"))
    assert not (tmp_path / "o.parquet").exists()


def test_prepare_fashion_mnist(tmp_path: Path) -> None:
    if not os.path.isdir(FASHION_DIR):
        pytest.skip("dataset-fashion-mnist is not installed (apt-get install dataset-fashion-mnist)")
    out = tmp_path / "fm.parquet"
    res = prepare("fashion-mnist", str(out), limit=100)
    assert (res.num_rows, res.image_size, res.channels, res.num_classes) == (100, 28, 1, 10)
    info = inspect_dataset(str(out))
    rep = validate_chunk(info.files[0], 0, 100, 28, 1, 10)
    assert rep.bad == [] and len(rep.ids) == 100
    assert rep.labels is not None and rep.labels.min() >= 0 and rep.labels.max() <= 9
    assert len(set(rep.labels.tolist())) > 5  # the train split is shuffled: many classes in 100 rows
    _, images, _ = load_rows(str(out), np.arange(100, dtype=np.int64), 28, 1)
    assert images.shape == (100, 1, 28, 28) and images.max() > 200


def test_s3_round_trip(s3_bucket: str) -> None:
    uri = f"s3://{s3_bucket}/data/digits.parquet"
    res = prepare("digits", uri, limit=40)
    info = inspect_dataset(f"s3://{s3_bucket}/data")
    assert info.files == [uri] and info.num_rows == 40
    (file_uri, start, stop) = row_chunks(info, 100)[0]
    rep = validate_chunk(file_uri, start, stop, res.image_size, res.channels, res.num_classes)
    assert rep.bad == [] and len(rep.ids) == 40
    ids, images, labels = load_rows(f"s3://{s3_bucket}/data", np.array([39, 2], np.int64), 16, 1)
    assert ids.tolist() == [39, 2] and images.shape == (2, 1, 16, 16) and labels is not None
    with pytest.raises(DataError, match="does not exist"):
        inspect_dataset(f"s3://{s3_bucket}/nothing-here")
