"""Splitting the dataset into shards (spec section 1).

The assignment ``sample id -> shard`` is data: it is written with the run
(``RUN/shards/round-XXXX.parquet``) and changes only through migrations. These are pure
numpy functions so the coordinator (a Ray actor) stays a thin shell over them.
"""

from __future__ import annotations

import numpy as np


def split_random(ids: np.ndarray, count: int, seed: int) -> np.ndarray:
    """Seeded permutation cut into near-equal parts; returns the shard of each id (same order)."""
    ids = np.asarray(ids)
    _check(len(ids), count)
    perm = np.random.default_rng(seed).permutation(len(ids))
    shard = np.empty(len(ids), dtype=np.int32)
    shard[perm] = np.arange(len(ids)) % count
    return shard


def split_stratified(ids: np.ndarray, labels: np.ndarray, count: int, seed: int) -> np.ndarray:
    """Class-balanced split: each class is dealt round-robin over shards after a seeded shuffle.

    The dealing continues across classes (class c starts where class c-1 stopped), so shard
    sizes differ by at most one as well as each class count per shard.
    """
    ids = np.asarray(ids)
    labels = np.asarray(labels)
    if len(labels) != len(ids):
        raise ValueError("stratified split needs one label per id")
    _check(len(ids), count)
    rng = np.random.default_rng(seed)
    shard = np.empty(len(ids), dtype=np.int32)
    offset = 0
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        members = members[rng.permutation(len(members))]
        shard[members] = (offset + np.arange(len(members))) % count
        offset += len(members)
    return shard


def split(ids: np.ndarray, count: int, policy: str, seed: int, labels: np.ndarray | None = None) -> np.ndarray:
    if policy == "random":
        return split_random(ids, count, seed)
    if policy == "stratified":
        if labels is None:
            raise ValueError("shards.policy=stratified needs a label column in the dataset")
        return split_stratified(ids, labels, count, seed)
    raise ValueError(f"unknown shards.policy {policy!r}")


def shard_sizes(assignment: np.ndarray, count: int) -> list[int]:
    return np.bincount(np.asarray(assignment), minlength=count).astype(int).tolist()


def _check(n: int, count: int) -> None:
    if count < 1:
        raise ValueError("shards.count must be at least 1")
    if n < count:
        raise ValueError(f"shards.count={count} is more than the {n} usable samples: some shards would be empty")
