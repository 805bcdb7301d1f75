"""The coordinator: owner of the shard assignment and collector of per-sample statistics.

A Ray actor with ``num_cpus=0`` (bookkeeping must never wait behind shard actors that
hold the CPUs). All its state can be rebuilt from the run directory, so a restarted
coordinator simply re-reads the last committed assignment.

Between rounds it is the place where the assignment changes: with ``msr.enabled`` it keeps
the skip counters MSR ranks by (:class:`~memshard.iet.msr.SkipLedger`, persisted per round
in RUN/msr/) and, on migration rounds, runs the pure planner
(:func:`~memshard.iet.msr.plan_migrations`), writes RUN/migrations/round-XXXX.parquet and
the next assignment. Shard actors read their own ids from that assignment at the start of the
next round; nothing is re-read on the driver and no actor restarts.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import ray

from memshard.config import config_from_json
from memshard.iet.msr import MigrationPlan, SkipLedger, plan_migrations
from memshard.iet.schedule import is_migration_round
from memshard.iet.split import shard_sizes, split
from memshard.io.rundir import RunDir
from memshard.io.storage import S3Access, install_access
from memshard.seeds import round_seed


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
    out: dict[str, Any] = {}
    if "augmented" in stats and stats["augmented"].sum() > 0:
        aug = stats["augmented"]
        out["augmented"] = int(aug.sum())
        out["mean_strength"] = float(np.nansum(stats["mean_strength"] * aug) / aug.sum())
    return {
        **out,
        "round": round_id,
        "loss": float(np.mean([s["loss"] for s in summaries])),
        "skip_rate": skips / max(visits, 1),
        "visits": visits,
        "skips": skips,
        "samples_skipped_once": int((stats["skips"] > 0).sum()),
        "steps": steps,
        "nonfinite_steps": sum(s.get("nonfinite_steps", 0) for s in summaries),
        "shards": summaries,
    }


def migrate(
    ledger: SkipLedger,
    ids: np.ndarray,
    shards: np.ndarray,
    stats: dict[str, np.ndarray],
    msr: Any,
    num_shards: int,
    seed: int,
) -> tuple[np.ndarray, MigrationPlan]:
    """One MSR step over a round's statistics: plan, then reset the counters ``msr.reset`` names (Ray-free)."""
    pos = np.searchsorted(stats["id"], ids)
    ratio = np.asarray(stats["mean_ratio"], dtype=np.float64)[pos]
    since = ledger.since_move[np.searchsorted(ledger.ids, ids)]
    by_shard = ledger.by_shard[np.searchsorted(ledger.ids, ids)]
    new, plan = plan_migrations(
        ids,
        shards,
        since,
        ratio,
        num_shards,
        fraction=msr.fraction,
        policy=msr.policy,
        seed=seed,
        size_tolerance=msr.size_tolerance,
        min_skips=msr.min_skips,
        shard_skips=by_shard,
        count=msr.count,
    )
    ledger.reset(ledger.ids if msr.reset == "all" else plan.ids)
    return new, plan


@ray.remote(num_cpus=0)
class Coordinator:
    def __init__(self, run_uri: str, config_json: str, access: S3Access | None = None) -> None:
        install_access(access)
        self.run = RunDir(run_uri)
        self.cfg = config_from_json(config_json)
        self.num_shards = self.cfg.shards.count
        self._progress: dict[int, tuple[int, int, int]] = {}
        self._ledger: tuple[int, SkipLedger] | None = None  # (round it is current after, ledger)

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

    def _ledger_after(self, r: int, ids: np.ndarray) -> SkipLedger:
        """MSR's counters as committed after round ``r`` (memory if current, else RUN/msr/, else zeros)."""
        if self._ledger is not None and self._ledger[0] == r:
            return self._ledger[1]
        cols = self.run.read_ledger(r) if r > 0 else None
        if cols is None:
            if r > 0:
                raise RuntimeError(f"MSR ledger of round {r} is missing from {self.run.uri}/msr/")
            return SkipLedger(ids, self.num_shards)
        return SkipLedger.from_columns(cols, self.num_shards)

    def next_assignment(
        self, round_id: int, ids: np.ndarray, shards: np.ndarray, stats: dict[str, np.ndarray]
    ) -> tuple[np.ndarray, int]:
        """Assignment in force for round ``round_id + 1``, and how many samples migrated."""
        msr = self.cfg.msr
        if not msr.enabled or self.num_shards < 2:
            return shards, 0
        ledger = self._ledger_after(round_id - 1, ids)
        ledger = SkipLedger.from_columns(ledger.to_columns(), self.num_shards)  # never mutate round r-1's
        ledger.add_round(stats["id"], stats["shard"], stats["skips"])
        moved = 0
        if is_migration_round(self.cfg, round_id):
            seed = round_seed(self.cfg.seed, round_id, -1)  # -1: the coordinator's stream
            shards, plan = migrate(ledger, ids, shards, stats, msr, self.num_shards, seed)
            self.run.write_migrations(round_id, plan.as_columns())
            moved = len(plan)
        self.run.write_ledger(round_id, ledger.ids, ledger.since_move, ledger.by_shard)
        self._ledger = (round_id, ledger)
        return shards, moved

    def record_round(self, round_id: int, stat_refs: list[ray.ObjectRef]) -> dict[str, Any]:
        """Write the round's statistics and next assignment; return the round summary."""
        parts = [ray.get(ref) for ref in stat_refs]
        stats = merge_stats(parts)
        ids, shards = self.run.read_assignment(round_id - 1)
        if not np.array_equal(np.sort(stats["id"]), ids):
            raise RuntimeError(f"round {round_id}: statistics do not cover the assignment exactly once")
        self.run.write_stats(round_id, {"round": np.full(len(stats["id"]), round_id, dtype=np.int32), **stats})
        new_shards, moved = self.next_assignment(round_id, ids, shards, stats)
        self.run.write_assignment(round_id, ids, new_shards)
        summary = round_summary(round_id, parts, stats)
        summary["shard_sizes"] = shard_sizes(new_shards, self.num_shards)
        summary["migrated"] = moved
        summary["migration_round"] = bool(is_migration_round(self.cfg, round_id))
        return summary
