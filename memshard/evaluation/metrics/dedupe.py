"""Group a reference set into distinct images, so neighbour metrics never compare an image with its own copy.

Why: the 1/3 rule and the nearest-neighbour ratio divide a generation's distance to its nearest training image by
the distance to the next one(s). When a training image is stored 20 times (as scraped data stores popular images),
the "next" image is the same picture again: a near-copy of it gets ratio 1 and is never counted, and an exact copy
gets 0/0. Every neighbour metric therefore runs over one representative per group of identical images, and the
results are mapped back to every id of the group (how many copies an image had, how often generations copy it).

Three modes:

* ``exact`` (default): images with the same decoded pixels (byte-identical uint8 arrays) form a group;
* ``near``: images within a root-mean-square pixel distance ``threshold`` (values in [0, 1]) of each other are
  joined, transitively, e.g. for data re-encoded many times (JPEG at different qualities, resized copies). The
  default threshold, 1/32 (8 grey levels RMS), is above what a JPEG re-encode at quality 75 changes in a 32x32
  image (about 0.01-0.02) and far below the distance between distinct digits or CIFAR images (0.15 and more);
  check it on your data with :func:`pairwise_rms` before relying on it;
* ``none``: every row is its own group (the behaviour before deduplication, for comparison).

The representative of a group is its first row, so with no duplicates the distinct set *is* the reference set, in
the same order, and every metric is bit-identical to the undeduplicated computation.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from memshard.evaluation.metrics.neighbours import topk_neighbours

__all__ = [
    "DEDUPE_MODES",
    "NEAR_THRESHOLD",
    "ReferenceGroups",
    "copies_by_multiplicity",
    "group_reference",
    "pairwise_rms",
]

DedupeMode = Literal["exact", "near", "none"]
DEDUPE_MODES: tuple[str, ...] = ("exact", "near", "none")
NEAR_THRESHOLD = 1 / 32
# neighbours examined per image in `near` mode; groups larger than this still join through shared members
_NEAR_K = 32


@dataclass(frozen=True)
class ReferenceGroups:
    """Rows of a reference set grouped into distinct images.

    ``group[i]`` is the group of row i (0..G-1, numbered by first occurrence); ``distinct[g]`` the row that
    represents group g (its first row); ``sizes[g]`` how many rows the group has.
    """

    group: np.ndarray  # (N,) int64
    distinct: np.ndarray  # (G,) int64, increasing
    sizes: np.ndarray  # (G,) int64
    mode: str
    threshold: float | None = None

    @classmethod
    def identity(cls, n: int) -> ReferenceGroups:
        """Every row its own group (``dedupe: none``)."""
        idx = np.arange(n, dtype=np.int64)
        return cls(group=idx, distinct=idx.copy(), sizes=np.ones(n, np.int64), mode="none")

    @property
    def num_images(self) -> int:
        return int(self.group.shape[0])

    @property
    def num_distinct(self) -> int:
        return int(self.distinct.shape[0])

    @property
    def has_duplicates(self) -> bool:
        return self.num_distinct < self.num_images

    def to_dict(self) -> dict[str, object]:
        """The ``reference`` entry of metrics.json."""
        dup = self.sizes > 1
        return {
            "images": self.num_images,
            "distinct": self.num_distinct,
            "dedupe": self.mode,
            "dedupe_threshold": self.threshold,
            "duplicated_images": int(dup.sum()),
            "duplicated_rows": int(self.sizes[dup].sum()),
            "max_copies": int(self.sizes.max(initial=0)),
        }


def _from_labels(labels: np.ndarray, mode: str, threshold: float | None) -> ReferenceGroups:
    """Renumber arbitrary per-row labels by first occurrence."""
    _, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")  # unique label index -> group number by first occurrence
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    group = rank[inverse.reshape(-1)].astype(np.int64)
    distinct = np.sort(first).astype(np.int64)
    sizes = np.bincount(group, minlength=distinct.size).astype(np.int64)
    return ReferenceGroups(group=group, distinct=distinct, sizes=sizes, mode=mode, threshold=threshold)


def _exact_labels(images: np.ndarray) -> np.ndarray:
    flat = np.ascontiguousarray(images.reshape(images.shape[0], -1))
    seen: dict[bytes, int] = {}
    out = np.empty(flat.shape[0], np.int64)
    for i, row in enumerate(flat):
        out[i] = seen.setdefault(hashlib.sha256(row.tobytes()).digest(), i)
    return out


def _find(parent: np.ndarray, i: int) -> int:
    while parent[i] != i:
        parent[i] = parent[parent[i]]
        i = int(parent[i])
    return i


def _near_labels(unit: torch.Tensor, threshold: float, memory_budget_bytes: int) -> np.ndarray:
    """Connected components of 'RMS distance <= threshold' among each row's nearest rows (union-find)."""
    n, d = unit.shape
    k = min(_NEAR_K, n)
    dist, idx = topk_neighbours(unit, unit, k, "sqeuclidean", memory_budget_bytes)
    close = (dist / d) <= threshold**2  # squared RMS
    parent = np.arange(n, dtype=np.int64)
    rows, cols = np.nonzero(close.cpu().numpy())
    nbr = idx.cpu().numpy()[rows, cols]
    for a, b in zip(rows.tolist(), nbr.tolist(), strict=True):
        ra, rb = _find(parent, a), _find(parent, b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return np.array([_find(parent, i) for i in range(n)], dtype=np.int64)


def group_reference(
    images: np.ndarray | torch.Tensor,
    mode: str = "exact",
    threshold: float | None = None,
    memory_budget_bytes: int = 256 * 2**20,
) -> ReferenceGroups:
    """Group (N, ...) reference images (uint8, or floats in [0, 1]) into distinct images.

    ``exact`` compares the raw values (decoded uint8 pixels are what the training set stores); ``near`` joins
    images within RMS distance ``threshold`` (default :data:`NEAR_THRESHOLD`) on the [0, 1] scale; ``none``
    makes every row its own group.
    """
    if mode not in DEDUPE_MODES:
        raise ValueError(f"dedupe mode {mode!r} unknown; choose one of {', '.join(DEDUPE_MODES)}")
    arr = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if arr.ndim < 2 or arr.shape[0] < 1:
        raise ValueError(f"reference images must be (N, ...) with N >= 1, got shape {arr.shape}")
    n = arr.shape[0]
    if mode == "none":
        return ReferenceGroups.identity(n)
    if mode == "exact":
        return _from_labels(_exact_labels(arr), mode, None)
    th = NEAR_THRESHOLD if threshold is None else float(threshold)
    if not th >= 0:
        raise ValueError(f"near-duplicate threshold must be >= 0, got {threshold}")
    unit = torch.from_numpy(arr.reshape(n, -1)).float()
    if arr.dtype == np.uint8:
        unit = unit / 255.0
    return _from_labels(_near_labels(unit, th, memory_budget_bytes), mode, th)


def pairwise_rms(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    """RMS pixel distance between two images on the [0, 1] scale (uint8 inputs are divided by 255)."""
    x, y = (torch.as_tensor(np.asarray(v)).double() for v in (a, b))
    if np.asarray(a).dtype == np.uint8:
        x, y = x / 255.0, y / 255.0
    return float(((x - y) ** 2).mean().sqrt())


def copies_by_multiplicity(groups: ReferenceGroups, nn_group: np.ndarray, memorized: np.ndarray) -> dict[str, float]:
    """How memorized generations split between images stored several times and images stored once.

    ``nn_group`` is each generation's nearest distinct image (a group number), ``memorized`` whether it passed the
    1/3 rule. Shares are of all generations, so ``dup_copy_share + singleton_copy_share`` is the memorized fraction.
    """
    nn_group = np.asarray(nn_group, dtype=np.int64)
    memorized = np.asarray(memorized, dtype=bool)
    q = max(int(nn_group.size), 1)
    dup_group = groups.sizes > 1
    copied = np.zeros(groups.num_distinct, bool)
    copied[nn_group[memorized]] = True
    on_dup = dup_group[nn_group]
    return {
        "duplicated_images": int(dup_group.sum()),
        "duplicated_copied": int((copied & dup_group).sum()),
        "singletons": int((~dup_group).sum()),
        "singletons_copied": int((copied & ~dup_group).sum()),
        "dup_copy_share": float((memorized & on_dup).sum() / q),
        "singleton_copy_share": float((memorized & ~on_dup).sum() / q),
        "dup_nearest_share": float(on_dup.sum() / q),
    }
