"""The canonical Parquet dataset: inspection, row validation and reading rows by id.

A dataset is one Parquet file or a directory of ``*.parquet`` files (local or s3://)
with columns ``id`` (int64, unique), ``image`` (PNG/JPEG bytes), optional ``label``
(integer) and optional ``caption`` (string); other columns are ignored.

Everything here is built so that no step needs the whole dataset in memory:
``inspect_dataset`` reads only footers, ``validate_chunk`` reads a row range through
row groups, and ``load_rows`` pushes an ``id IN (...)`` filter down to Parquet so a
worker reads only the rows of its shard.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from memshard.data.images import BadImage, decode_image
from memshard.io.storage import filesystem, is_remote

_MAX_NAMED = 10


class DataError(ValueError):
    """A dataset that cannot be used; the message names the dataset path and the problem."""


@dataclass
class DatasetInfo:
    uri: str
    files: list[str]  # URIs of the parquet files, sorted (s3 files as s3://bucket/key)
    num_rows: int
    has_label: bool
    has_caption: bool
    # Rows per file, parallel to ``files``; lets ``row_chunks`` plan without re-reading footers.
    file_rows: list[int] = field(default_factory=list, repr=False)


@dataclass
class ChunkReport:
    ids: np.ndarray  # int64 ids of rows whose image decoded fine and label is valid (file order)
    labels: np.ndarray | None  # int64 labels of those rows (None if no label column)
    bad: list[tuple[int, str]]  # (id, reason) for rejected rows


# -- paths -----------------------------------------------------------------------------


def _uri_of(uri: str, fs_path: str) -> str:
    """The URI of a path found by listing ``uri``'s filesystem (keeps the scheme for remote)."""
    if is_remote(uri):
        scheme = uri.split("://", 1)[0]
        return f"{scheme}://{fs_path.lstrip('/')}" if scheme == "s3" else f"{scheme}://{fs_path}"
    return fs_path


def _list_files(uri: str) -> tuple[fsspec.AbstractFileSystem, list[str]]:
    """(filesystem, sorted fs paths of the parquet files) of a dataset URI."""
    fs, path = filesystem(uri)
    path = path.rstrip("/") or path
    try:
        exists = fs.exists(path)
    except Exception as exc:
        raise DataError(f"dataset {uri}: cannot access it ({exc})") from exc
    if not exists:
        raise DataError(f"dataset {uri}: path does not exist")
    if fs.isdir(path):
        found = fs.find(path)
        files = sorted(p for p in found if p.endswith(".parquet") and not posixpath.basename(p).startswith(("_", ".")))
        if not files:
            raise DataError(f"dataset {uri}: no *.parquet files in the directory")
        return fs, files
    return fs, [path]


@contextmanager
def _open_parquet(fs: fsspec.AbstractFileSystem, path: str, uri: str) -> Iterator[pq.ParquetFile]:
    """A ParquetFile; anything that is not readable Parquet becomes a DataError naming the file."""
    local = isinstance(fs, LocalFileSystem)  # pyarrow's native reader is faster than a Python file object
    handle = None
    try:
        try:
            if local:
                pf = pq.ParquetFile(path)
            else:
                handle = fs.open(path, "rb")
                pf = pq.ParquetFile(handle)
        except Exception as exc:
            raise DataError(f"dataset {uri}: {_uri_of(uri, path)} is not a readable Parquet file ({exc})") from exc
        yield pf
    finally:
        if handle is not None:
            handle.close()


# -- inspection ------------------------------------------------------------------------


def _is_string(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or getattr(pa.types, "is_string_view", _no)(t)


def _is_binary(t: pa.DataType) -> bool:
    return pa.types.is_binary(t) or pa.types.is_large_binary(t) or getattr(pa.types, "is_binary_view", _no)(t)


def _no(_t: pa.DataType) -> bool:
    return False


def _check_schema(schema: pa.Schema, where: str) -> None:
    """Raise DataError if the required columns are missing or have the wrong type."""
    names = set(schema.names)
    for col in ("id", "image"):
        if col not in names:
            raise DataError(f"{where}: missing required column '{col}' (columns: {', '.join(schema.names)})")
    id_type = schema.field("id").type
    if not pa.types.is_int64(id_type):
        raise DataError(f"{where}: column 'id' must be int64, found {id_type}")
    image_type = schema.field("image").type
    if not _is_binary(image_type):
        raise DataError(f"{where}: column 'image' must be binary (encoded PNG/JPEG), found {image_type}")
    if "label" in names and not pa.types.is_integer(schema.field("label").type):
        raise DataError(f"{where}: column 'label' must be an integer type, found {schema.field('label').type}")
    if "caption" in names and not _is_string(schema.field("caption").type):
        raise DataError(f"{where}: column 'caption' must be a string type, found {schema.field('caption').type}")


def _signature(schema: pa.Schema) -> list[tuple[str, str]]:
    """Names and types only: nullability and metadata differences do not matter to readers."""
    return [(f.name, str(f.type)) for f in schema]


def inspect_dataset(uri: str) -> DatasetInfo:
    """Check the schema and count rows from Parquet footers only (no image bytes are read)."""
    fs, paths = _list_files(uri)
    first_sig: list[tuple[str, str]] | None = None
    first_file = ""
    file_rows: list[int] = []
    schema: pa.Schema | None = None
    for path in paths:
        file_uri = _uri_of(uri, path)
        with _open_parquet(fs, path, uri) as pf:
            file_schema = pf.schema_arrow
            rows = pf.metadata.num_rows
        where = f"dataset {uri}" if len(paths) == 1 else f"dataset {uri} (file {file_uri})"
        _check_schema(file_schema, where)
        sig = _signature(file_schema)
        if first_sig is None:
            first_sig, first_file, schema = sig, file_uri, file_schema
        elif sig != first_sig:
            diff = sorted(set(sig).symmetric_difference(first_sig))
            shown = ", ".join(f"{n}: {t}" for n, t in diff[:6])
            raise DataError(
                f"dataset {uri}: files have different schemas: {file_uri} vs {first_file} (differ in {shown})"
            )
        file_rows.append(rows)
    assert schema is not None
    total = sum(file_rows)
    if total == 0:
        raise DataError(f"dataset {uri}: has zero rows")
    return DatasetInfo(
        uri=uri,
        files=[_uri_of(uri, p) for p in paths],
        num_rows=total,
        has_label="label" in schema.names,
        has_caption="caption" in schema.names,
        file_rows=file_rows,
    )


def row_chunks(info: DatasetInfo, rows_per_chunk: int) -> list[tuple[str, int, int]]:
    """(file_uri, start, stop) ranges covering every row once, for spreading validation over workers."""
    if rows_per_chunk < 1:
        raise ValueError(f"rows_per_chunk must be >= 1, got {rows_per_chunk}")
    counts = info.file_rows
    if len(counts) != len(info.files):  # an info built by hand: read the footers again
        counts = []
        for file_uri in info.files:
            fs, path = filesystem(file_uri)
            with _open_parquet(fs, path, info.uri) as pf:
                counts.append(pf.metadata.num_rows)
    chunks: list[tuple[str, int, int]] = []
    for file_uri, rows in zip(info.files, counts, strict=True):
        for start in range(0, rows, rows_per_chunk):
            chunks.append((file_uri, start, min(start + rows_per_chunk, rows)))
    return chunks


# -- validation ------------------------------------------------------------------------


def _iter_range(pf: pq.ParquetFile, start: int, stop: int, columns: list[str]) -> Iterator[pa.RecordBatch]:
    """Batches holding exactly rows [start, stop), reading only the row groups that overlap them."""
    meta = pf.metadata
    groups: list[int] = []
    first_offset = None
    offset = 0
    for i in range(meta.num_row_groups):
        n = meta.row_group(i).num_rows
        if offset < stop and offset + n > start:
            groups.append(i)
            if first_offset is None:
                first_offset = offset
        offset += n
    if not groups or first_offset is None:
        return
    pos = first_offset
    for batch in pf.iter_batches(batch_size=1024, row_groups=groups, columns=columns, use_threads=False):
        lo, hi = max(start - pos, 0), min(stop - pos, batch.num_rows)
        pos += batch.num_rows
        if hi > lo:
            yield batch.slice(lo, hi - lo)
        if pos >= stop:
            break


def _label_problem(label: int | None, num_classes: int | None) -> str | None:
    if label is None:
        return "null label"
    if label < 0:
        return f"label {label} is negative"
    if num_classes is not None and label >= num_classes:
        return f"label {label} out of range [0, {num_classes})"
    return None


def validate_chunk(
    file_uri: str, start: int, stop: int, image_size: int, channels: int, num_classes: int | None
) -> ChunkReport:
    """Decode every image of rows [start, stop) and check labels, so bad rows are found before training."""
    if start < 0 or stop < start:
        raise ValueError(f"bad row range [{start}, {stop})")
    fs, path = filesystem(file_uri)
    good_ids: list[int] = []
    good_labels: list[int] = []
    bad: list[tuple[int, str]] = []
    with _open_parquet(fs, path, file_uri) as pf:
        names = pf.schema_arrow.names
        _check_schema(pf.schema_arrow, f"dataset {file_uri}")
        has_label = "label" in names
        columns = ["id", "image"] + (["label"] if has_label else [])
        row = start
        for batch in _iter_range(pf, start, stop, columns):
            ids = batch.column(0).to_pylist()
            images = batch.column(1)
            labels = batch.column(2).to_pylist() if has_label else None
            for i, rid in enumerate(ids):
                if rid is None:
                    raise DataError(f"dataset {file_uri}: row {row + i} has a null id")
                reasons: list[str] = []
                data = images[i].as_py()
                if data is None:
                    reasons.append("null image")
                else:
                    try:
                        decode_image(data, image_size, channels)
                    except BadImage as exc:
                        reasons.append(str(exc))
                if labels is not None:
                    problem = _label_problem(labels[i], num_classes)
                    if problem:
                        reasons.append(problem)
                if reasons:
                    bad.append((rid, "; ".join(reasons)))
                else:
                    good_ids.append(rid)
                    if labels is not None:
                        good_labels.append(labels[i])
            row += len(ids)
    return ChunkReport(
        ids=np.asarray(good_ids, dtype=np.int64),
        labels=np.asarray(good_labels, dtype=np.int64) if has_label else None,
        bad=bad,
    )


def duplicate_ids(ids: np.ndarray) -> np.ndarray:
    """Sorted unique ids occurring more than once: ids must be unique for shard assignment to mean anything."""
    uniq, counts = np.unique(np.asarray(ids, dtype=np.int64), return_counts=True)
    return uniq[counts > 1]


# -- reading rows by id ----------------------------------------------------------------


def _open_dataset(uri: str) -> ds.Dataset:
    """A pyarrow dataset over exactly the files ``inspect_dataset`` would see, on the URI's fsspec filesystem."""
    fs, paths = _list_files(uri)
    try:
        dataset = ds.dataset(paths, filesystem=fs, format="parquet")
    except Exception as exc:
        raise DataError(f"dataset {uri}: cannot open as Parquet ({exc})") from exc
    schema = dataset.schema
    if "id" not in schema.names:
        raise DataError(f"dataset {uri}: missing required column 'id'")
    if not pa.types.is_int64(schema.field("id").type):
        raise DataError(f"dataset {uri}: column 'id' must be int64, found {schema.field('id').type}")
    return dataset


def _fetch(uri: str, dataset: ds.Dataset, ids: np.ndarray, columns: list[str]) -> pa.Table:
    """Rows whose id is in ``ids`` (filter pushed down to Parquet), one per requested id, in ``ids`` order."""
    want = np.asarray(ids, dtype=np.int64).ravel()
    schema = dataset.schema
    for col in columns:
        if col not in schema.names:
            raise DataError(f"dataset {uri}: missing column '{col}'")
    expr = pc.field("id").isin(pa.array(np.unique(want), type=pa.int64()))
    # Fragments one by one, in sorted file order, so "first row of a duplicated id" is well defined.
    parts = []
    try:
        for fragment in dataset.get_fragments():
            parts.append(fragment.to_table(schema=schema, columns=columns, filter=expr, use_threads=False))
    except Exception as exc:
        raise DataError(f"dataset {uri}: failed to read rows ({exc})") from exc
    table = pa.concat_tables(parts) if parts else schema.empty_table().select(columns)
    got = np.asarray(table.column("id").to_numpy(), dtype=np.int64)
    uniq, first = np.unique(got, return_index=True)
    if len(uniq):
        pos = np.minimum(np.searchsorted(uniq, want), len(uniq) - 1)
        found = uniq[pos] == want
    else:
        pos = np.zeros(len(want), dtype=np.int64)
        found = np.zeros(len(want), dtype=bool)
    if not found.all():
        missing = np.unique(want[~found])
        shown = ", ".join(str(int(i)) for i in missing[:_MAX_NAMED])
        more = f" and {len(missing) - _MAX_NAMED} more" if len(missing) > _MAX_NAMED else ""
        raise DataError(f"dataset {uri}: {len(missing)} requested ids not found: {shown}{more}")
    return table.take(pa.array(first[pos], type=pa.int64())).combine_chunks()


def load_rows(
    uri: str, ids: np.ndarray, image_size: int, channels: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(ids, images (N,C,H,W) uint8, labels or None) for exactly the requested ids, in their order.

    A worker calls this with the ids of its shard, so only those rows are read and decoded.
    """
    dataset = _open_dataset(uri)
    has_label = "label" in dataset.schema.names
    columns = ["id", "image"] + (["label"] if has_label else [])
    table = _fetch(uri, dataset, ids, columns)
    n = table.num_rows
    out_ids = np.asarray(table.column("id").to_numpy(), dtype=np.int64)
    images = np.empty((n, channels, image_size, image_size), dtype=np.uint8)
    for i, data in enumerate(table.column("image").to_pylist()):
        if data is None:
            raise DataError(f"dataset {uri}: id {out_ids[i]} has a null image")
        try:
            images[i] = decode_image(data, image_size, channels)
        except BadImage as exc:
            raise DataError(f"dataset {uri}: id {out_ids[i]}: {exc}") from exc
    labels: np.ndarray | None = None
    if has_label:
        label_col = table.column("label")
        if label_col.null_count:
            null_at = int(np.flatnonzero(label_col.is_null().to_numpy())[0])
            raise DataError(f"dataset {uri}: id {out_ids[null_at]} has a null label")
        labels = np.asarray(label_col.to_numpy(), dtype=np.int64)
    return out_ids, images, labels


def load_captions(uri: str, ids: np.ndarray) -> list[str]:
    """Captions of the requested ids, in their order (a null caption reads as "")."""
    dataset = _open_dataset(uri)
    if "caption" not in dataset.schema.names:
        raise DataError(f"dataset {uri}: no 'caption' column")
    table = _fetch(uri, dataset, ids, ["id", "caption"])
    return [c if c is not None else "" for c in table.column("caption").to_pylist()]


def load_columns(uri: str, ids: np.ndarray, columns: list[str]) -> pa.Table:
    """Rows of exactly ``ids`` (in that order) with ``columns`` (``id`` first): one filtered pass over the files."""
    cols = ["id"] + [c for c in columns if c != "id"]
    return _fetch(uri, _open_dataset(uri), ids, cols)
