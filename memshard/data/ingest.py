"""Checking a dataset before any training starts.

Every row is decoded once, in parallel Ray tasks over row ranges (never on the driver for
user datasets), and the driver receives only ids, labels and the list of bad rows. With
``data.bad_rows=fail`` a single bad row stops the run before its directory is created;
with ``drop`` the bad ids are reported, written to ``RUN/bad_rows.parquet`` and left out.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import ray

from memshard.config import MemshardConfig
from memshard.data import DataError, DatasetInfo, duplicate_ids, inspect_dataset, row_chunks, validate_chunk
from memshard.runtime.tasks import remote_call


@dataclass
class Ingested:
    """The usable rows of a dataset: sorted ids, their labels, and what was rejected."""

    uri: str
    info: DatasetInfo
    ids: np.ndarray
    labels: np.ndarray | None
    bad: list[tuple[int, str]] = field(default_factory=list)


def format_bad(bad: list[tuple[int, str]], limit: int = 20) -> str:
    lines = [f"  id {i}: {reason}" for i, reason in bad[:limit]]
    if len(bad) > limit:
        lines.append(f"  ... and {len(bad) - limit} more")
    return "\n".join(lines)


def check_dataset(cfg: MemshardConfig, uri: str) -> DatasetInfo:
    """The dataset's schema and row counts against what the config needs: files' footers only, no rows.

    Cheap (no decoding, no Ray), so the driver calls it before it starts or joins a cluster: a
    0-byte file or a missing column is reported in a second, not after the cluster's start-up.
    """
    info = inspect_dataset(uri)
    if cfg.model.class_conditional and not info.has_label:
        raise DataError(f"dataset {uri}: model.class_conditional needs a 'label' column")
    if cfg.model.text_conditional and not info.has_caption:
        raise DataError(f"dataset {uri}: model.text_conditional needs a 'caption' column")
    if cfg.shards.policy == "stratified" and not info.has_label:
        raise DataError(f"dataset {uri}: shards.policy=stratified needs a 'label' column")
    return info


def ingest(cfg: MemshardConfig, uri: str, in_process: bool = False) -> Ingested:
    """Inspect and validate the dataset at ``uri`` against ``cfg.data``; raise DataError on bad input."""
    info = check_dataset(cfg, uri)
    d = cfg.data
    chunks = row_chunks(info, d.validate_rows_per_task)
    args = [(f, a, b, d.image_size, d.channels, d.num_classes) for f, a, b in chunks]
    if not in_process:
        reports = ray.get([remote_call(validate_chunk, *a) for a in args])
    else:
        reports = [validate_chunk(*a) for a in args]
    ids = np.concatenate([r.ids for r in reports]) if reports else np.zeros(0, np.int64)
    labels = np.concatenate([r.labels for r in reports]) if info.has_label else None
    bad = [b for r in reports for b in r.bad]
    dups = duplicate_ids(np.concatenate([ids, np.array([i for i, _ in bad], dtype=np.int64)]))
    if len(dups):
        # Every row of a duplicated id is rejected: which one is "right" is unknowable.
        bad += [(int(i), "duplicate id") for i in dups]
        keep = ~np.isin(ids, dups)
        ids = ids[keep]
        labels = labels[keep] if labels is not None else None
    bad.sort(key=lambda b: b[0])
    if bad and d.bad_rows == "fail":
        raise DataError(
            f"dataset {uri}: {len(bad)} bad row(s) (set data.bad_rows=drop to leave them out):\n{format_bad(bad)}"
        )
    order = np.argsort(ids, kind="stable")
    ids = ids[order]
    labels = labels[order] if labels is not None else None
    if d.limit is not None and d.duplicate is None:  # with `duplicate` the limit picked the distinct images
        ids, labels = ids[: d.limit], (labels[: d.limit] if labels is not None else None)
    if len(ids) == 0:
        raise DataError(f"dataset {uri}: no usable rows")
    if len(ids) < cfg.shards.count:
        raise DataError(
            f"dataset {uri}: {len(ids)} usable rows for shards.count={cfg.shards.count}: some shards would be empty"
        )
    return Ingested(uri=uri, info=info, ids=ids, labels=labels, bad=bad)
