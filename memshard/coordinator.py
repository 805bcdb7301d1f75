"""The coordinator: owner of the shard assignment and collector of per-sample statistics.

A Ray actor with ``num_cpus=0`` (bookkeeping must never wait behind shard actors that
hold the CPUs). All its state can be rebuilt from the run directory, so a restarted
coordinator simply re-reads the last committed assignment.

Between rounds it is the place where the assignment may change: ``next_assignment`` is
the hook where memory-sample redistribution plugs in (a pure planning function over the
statistics). Without it the assignment carries over unchanged.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import ray

from .checkpoint import RunDir
from .shard import shard_sizes, split


def merge_stats(parts: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Concatenate the shards' per-sample columns, adding the shard column, sorted by id."""
    cols: dict[str, list[np.ndarray]] = {}
    for part in parts:
        shard = part["summary"]["shard"]
        columns = part["columns"]
        n = len(columns["id"])
        cols.setdefault("shard", []).append(np.full(n, shard, dtype=np.int32))
        for key, value in columns.items():
            cols.setdefault(key, []).append(np.asarray(value))
    merged = {k: np.concatenate(v) for k, v in cols.items()}
    order = np.argsort(merged["id"], kind="stable")
    ordered = {k: v[order] for k, v in merged.items()}
    return {"id": ordered.pop("id"), "shard": ordered.pop("shard"), **ordered}


def round_summary(round_id: int, parts: list[dict[str, Any]], stats: dict[str, np.ndarray]) -> dict[str, Any]:
    summaries = sorted((p["summary"] for p in parts), key=lambda s: s["shard"])
    visits = int(stats["visits"].sum())
    skips = int(stats["skips"].sum())
    steps = sum(s["steps"] for s in summaries)
    return {
        "round": round_id,
        "loss": float(np.mean([s["loss"] for s in summaries])),
        "skip_rate": skips / max(visits, 1),
        "visits": visits,
        "skips": skips,
        "samples_skipped_once": int((stats["skips"] > 0).sum()),
        "steps": steps,
        "shards": summaries,
    }


@ray.remote(num_cpus=0)
class Coordinator:
    def __init__(self, run_uri: str, num_shards: int) -> None:
        self.run = RunDir(run_uri)
        self.num_shards = num_shards
        self._progress: dict[int, tuple[int, int, int]] = {}

    # ----------------------------------------------------------- progress
    def report_progress(self, shard: int, round_id: int, done: int, total: int) -> None:
        self._progress[shard] = (round_id, done, total)

    def progress(self) -> dict[int, tuple[int, int, int]]:
        return dict(self._progress)

    # --------------------------------------------------------- assignment
    def initial_assignment(self, ids: np.ndarray, labels: np.ndarray | None, policy: str, seed: int) -> list[int]:
        """Split the dataset and write RUN/shards/round-0000.parquet; returns shard sizes."""
        shards = split(ids, self.num_shards, policy, seed, labels)
        self.run.write_assignment(0, ids, shards)
        return shard_sizes(shards, self.num_shards)

    def next_assignment(
        self, round_id: int, ids: np.ndarray, shards: np.ndarray, stats: dict[str, np.ndarray]
    ) -> np.ndarray:
        """Assignment in force for round ``round_id + 1``. Migrations plug in here."""
        return shards

    def record_round(self, round_id: int, stat_refs: list[ray.ObjectRef]) -> dict[str, Any]:
        """Write the round's statistics and next assignment; return the round summary."""
        parts = [ray.get(ref) for ref in stat_refs]
        stats = merge_stats(parts)
        ids, shards = self.run.read_assignment(round_id - 1)
        if not np.array_equal(np.sort(stats["id"]), ids):
            raise RuntimeError(f"round {round_id}: statistics do not cover the assignment exactly once")
        self.run.write_stats(round_id, {"round": np.full(len(stats["id"]), round_id, dtype=np.int32), **stats})
        new_shards = self.next_assignment(round_id, ids, shards, stats)
        self.run.write_assignment(round_id, ids, new_shards)
        summary = round_summary(round_id, parts, stats)
        summary["shard_sizes"] = shard_sizes(new_shards, self.num_shards)
        return summary
