"""Memory-sample redistribution (MSR): which samples move to which shard between rounds.

A sample that a proxy keeps skipping is one its proxy finds abnormally easy: it is on its
way to being memorized there. IET-AGC+ moves such samples to another shard, so that a
different proxy, to which the sample is new, learns from it instead of one proxy starving
it (or copying it). This module is the planner: a pure function of the per-sample counters,
no Ray, no I/O, so its guarantees are unit-tested directly:

* conservation: every id stays in exactly one shard; nothing is lost or duplicated;
* sizes: after the plan every shard lies within ``mean * (1 +- size_tolerance)``, or is no
  further outside that band than it was (a split that starts unbalanced is never made worse);
  in particular no shard is ever emptied;
* choice: in each shard the candidates (skipped at least ``min_skips`` times since they last
  moved) are ranked by skip count, ties by lower mean loss ratio, then by id; the top
  ``ceil(fraction * candidates)`` move (``count="skipped"``). ``count="shard"`` is the authors'
  rule: every sample of the shard is ranked the same way and the top ``int(fraction * size)``
  move, even when fewer were skipped;
* determinism: the plan depends only on its inputs and the seed.

Destinations: ``ring`` sends shard k's movers to k+1; ``random_ring`` draws a new ring (a
seeded permutation) every migration; ``balanced`` (beyond the paper) sends each mover to the
shard where it has been skipped least so far, ties to the smaller shard, then the lower index.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass
class MigrationPlan:
    """The moves of one migration, in rank order within each source shard."""

    ids: np.ndarray  # int64
    from_shard: np.ndarray  # int32
    to_shard: np.ndarray  # int32
    skips: np.ndarray  # int64: skip count since the sample last moved (the ranking key)
    mean_ratio: np.ndarray  # float64: mean loss ratio l/m over the sample's visits (tie-break)
    rank: np.ndarray  # int32: 0 = the most-skipped sample of its source shard

    def __len__(self) -> int:
        return len(self.ids)

    def as_columns(self) -> dict[str, np.ndarray]:
        return {
            "id": self.ids,
            "from_shard": self.from_shard,
            "to_shard": self.to_shard,
            "skips": self.skips,
            "mean_ratio": self.mean_ratio,
            "rank": self.rank,
        }


def size_bounds(sizes: np.ndarray, tolerance: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-shard (lower, upper) sizes allowed after a migration: the band, widened to include today."""
    mean = sizes.sum() / len(sizes)
    lo = max(1, math.floor(mean * (1 - tolerance)))
    hi = math.ceil(mean * (1 + tolerance))
    return np.minimum(lo, sizes), np.maximum(hi, sizes)


def _destinations(policy: str, num_shards: int, rng: np.random.Generator) -> np.ndarray:
    """The ring: next[k] is where shard k's movers go (ring and random_ring)."""
    if policy == "ring":
        order = np.arange(num_shards)
    else:
        order = rng.permutation(num_shards)
    nxt = np.empty(num_shards, dtype=np.int64)
    nxt[order] = np.roll(order, -1)
    return nxt


def plan_migrations(
    ids: np.ndarray,
    shards: np.ndarray,
    skip_counts: np.ndarray,
    mean_ratio: np.ndarray,
    num_shards: int,
    *,
    fraction: float,
    policy: str,
    seed: int,
    size_tolerance: float,
    min_skips: int = 1,
    shard_skips: np.ndarray | None = None,
    count: str = "skipped",
) -> tuple[np.ndarray, MigrationPlan]:
    """Plan one migration. Returns (new shard per id, the plan).

    ``ids``/``shards``/``skip_counts``/``mean_ratio`` are aligned per sample; ``shard_skips``
    (N x K, skips each sample has had in each shard over the whole run) is needed by the
    ``balanced`` policy only. NaN ratios (never measured) rank after every real ratio.
    """
    ids = np.asarray(ids, dtype=np.int64)
    shards = np.asarray(shards, dtype=np.int64)
    skip_counts = np.asarray(skip_counts, dtype=np.int64)
    ratio = np.asarray(mean_ratio, dtype=np.float64)
    n = len(ids)
    if not (len(shards) == len(skip_counts) == len(ratio) == n):
        raise ValueError("ids, shards, skip_counts and mean_ratio must have the same length")
    if n and (shards.min() < 0 or shards.max() >= num_shards):
        raise ValueError(f"shard indices must lie in [0, {num_shards})")
    if policy not in ("ring", "random_ring", "balanced"):
        raise ValueError(f"unknown migration policy {policy!r}")
    if count not in ("skipped", "shard"):
        raise ValueError(f"unknown migration count {count!r} (skipped | shard)")
    if policy == "balanced" and (shard_skips is None or np.shape(shard_skips) != (n, num_shards)):
        raise ValueError("the balanced policy needs shard_skips of shape (N, num_shards)")
    rng = np.random.default_rng(seed)
    new = shards.copy()
    empty = MigrationPlan(
        ids=np.zeros(0, np.int64),
        from_shard=np.zeros(0, np.int32),
        to_shard=np.zeros(0, np.int32),
        skips=np.zeros(0, np.int64),
        mean_ratio=np.zeros(0, np.float64),
        rank=np.zeros(0, np.int32),
    )
    if num_shards < 2 or n == 0:
        return new, empty

    # 1. movers: per source shard, the top fraction of candidates by (skips desc, ratio asc, id asc)
    sort_ratio = np.where(np.isnan(ratio), np.inf, ratio)
    order = np.lexsort((ids, sort_ratio, -skip_counts))  # last key is primary
    movers: list[tuple[int, int]] = []  # (position in arrays, rank in its shard)
    for k in range(num_shards):
        if count == "shard":
            in_k = order[shards[order] == k]
            take = int(fraction * len(in_k))
        else:
            in_k = order[(shards[order] == k) & (skip_counts[order] >= min_skips)]
            take = math.ceil(fraction * len(in_k)) if len(in_k) else 0
        movers.extend((int(j), r) for r, j in enumerate(in_k[:take]))
    if not movers:
        return new, empty
    # interleave shards by rank so that, when sizes bind, every shard's best movers go first
    movers.sort(key=lambda m: (m[1], shards[m[0]], ids[m[0]]))

    # 2. destinations, within the size band
    sizes = np.bincount(shards, minlength=num_shards).astype(np.int64)
    lo, hi = size_bounds(sizes, size_tolerance)
    ring = _destinations(policy, num_shards, rng) if policy != "balanced" else None
    cur = sizes.copy()
    chosen: list[tuple[int, int, int]] = []  # (pos, dest, rank)
    for pos, rank in movers:
        src = int(shards[pos])
        if cur[src] - 1 < lo[src]:
            continue  # the source would fall under its band
        if ring is not None:
            dest = int(ring[src])
            if cur[dest] + 1 > hi[dest]:
                continue
        else:
            options = [d for d in range(num_shards) if d != src and cur[d] + 1 <= hi[d]]
            if not options:
                continue
            dest = min(options, key=lambda d: (int(shard_skips[pos, d]), int(cur[d]), d))
        cur[src] -= 1
        cur[dest] += 1
        new[pos] = dest
        chosen.append((pos, dest, rank))
    if not chosen:
        return new, empty
    chosen.sort(key=lambda c: (int(shards[c[0]]), c[2]))
    pos = np.array([c[0] for c in chosen], dtype=np.int64)
    plan = MigrationPlan(
        ids=ids[pos],
        from_shard=shards[pos].astype(np.int32),
        to_shard=np.array([c[1] for c in chosen], dtype=np.int32),
        skips=skip_counts[pos],
        mean_ratio=ratio[pos],
        rank=np.array([c[2] for c in chosen], dtype=np.int32),
    )
    return new, plan


class SkipLedger:
    """The counters MSR ranks by, carried across rounds.

    ``since_move[i]``: skips of sample i since it last migrated (reset when it moves, as the
    spec says); ``by_shard[i, k]``: all skips of sample i while in shard k (never reset: the
    balanced policy's memory of where a sample was hard to learn from).
    """

    def __init__(self, ids: np.ndarray, num_shards: int) -> None:
        self.ids = np.asarray(ids, dtype=np.int64)
        self.since_move = np.zeros(len(self.ids), np.int64)
        self.by_shard = np.zeros((len(self.ids), num_shards), np.int64)

    def add_round(self, ids: np.ndarray, shards: np.ndarray, skips: np.ndarray) -> None:
        pos = np.searchsorted(self.ids, ids)
        if np.any(pos >= len(self.ids)) or np.any(self.ids[np.minimum(pos, len(self.ids) - 1)] != ids):
            raise ValueError("statistics name ids that are not in the run's dataset")
        self.since_move[pos] += skips
        np.add.at(self.by_shard, (pos, np.asarray(shards, np.int64)), skips)

    def reset(self, moved_ids: np.ndarray) -> None:
        self.since_move[np.searchsorted(self.ids, moved_ids)] = 0

    def to_columns(self) -> dict[str, np.ndarray]:
        return {"id": self.ids, "skips_since_move": self.since_move, "shard_skips": self.by_shard}

    @classmethod
    def from_columns(cls, cols: dict[str, np.ndarray], num_shards: int) -> SkipLedger:
        ledger = cls(np.asarray(cols["id"]), num_shards)
        ledger.since_move = np.asarray(cols["skips_since_move"], np.int64).copy()
        ledger.by_shard = np.asarray(cols["shard_skips"], np.int64).reshape(len(ledger.ids), num_shards).copy()
        return ledger
