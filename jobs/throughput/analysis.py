"""The throughput benchmark's arithmetic, Ray-free and tested on hand-made inputs: overheads,
round breakdowns, scaling efficiency, projections to Stable-Diffusion-sized models and many nodes."""

from __future__ import annotations

import os
import statistics
from collections.abc import Sequence
from typing import Any

from jobs.throughput.sizes import PEAK_BF16_FLOPS


def overhead(t_method: Sequence[float], t_plain: Sequence[float]) -> dict[str, float]:
    """Overhead of one arm over another from their repetition timings, by medians.

    Medians, not means: one repetition slowed by another process must not move the result.
    ``median_paired_ratio`` (the median of per-repetition ratios) is reported beside the ratio
    of medians; with interleaved repetitions both should agree, and a gap says the machine was
    noisy.
    """
    if not t_method or not t_plain:
        raise ValueError("overhead needs at least one timing per arm")
    a, b = statistics.median(t_method), statistics.median(t_plain)
    if b <= 0:
        raise ValueError(f"plain step time must be positive, got {b}")
    paired = [x / y for x, y in zip(t_method, t_plain, strict=False) if y > 0]
    return {
        "t_method_s": a,
        "t_plain_s": b,
        "ratio": a / b,
        "overhead_fraction": (a - b) / b,
        "median_paired_ratio": statistics.median(paired) if paired else float("nan"),
    }


def interleaved_order(arms: Sequence[str], rep: int) -> list[str]:
    """A B C on even repetitions, C B A on odd ones: a linear drift in machine speed cancels in pairs."""
    return list(arms) if rep % 2 == 0 else list(reversed(arms))


def orchestration_rounds(manifest: dict[str, Any], marks: dict[int, dict[str, float]] | None = None) -> dict[str, Any]:
    """Per round, the share of round time not spent training: 1 - max_shards(train_s) / round_s.

    The slowest shard is what the round waits for, so max over shards. Round 1 includes actor
    start-up (the proxies are built then), so it is reported but left out of the median.
    ``marks`` (round -> offsets in s from the round's start, from :func:`round_marks`) adds the
    breakdown the summary itself does not carry.
    """
    rows = []
    for s in manifest["rounds"]:
        r = int(s["round"])
        train_max = max(float(sh["train_s"]) for sh in s["shards"])
        round_s = float(s["round_s"])
        row: dict[str, Any] = {
            "round": r,
            "round_s": round_s,
            "train_s_max": train_max,
            "train_s_min": min(float(sh["train_s"]) for sh in s["shards"]),
            "overhead_fraction": 1.0 - train_max / round_s if round_s > 0 else float("nan"),
        }
        m = (marks or {}).get(r)
        if m:
            row.update({k: v for k, v in m.items() if v is not None})
            if m.get("proxies_saved_at_s") is not None and m.get("aggregated_at_s") is not None:
                row["aggregation_tail_s"] = m["aggregated_at_s"] - m["proxies_saved_at_s"]
            if m.get("served_at_s") is not None:
                row["commit_publish_s"] = m["served_at_s"] - round_s
                row["overhead_fraction_wall"] = 1.0 - train_max / m["served_at_s"]
        rows.append(row)
    later = [row for row in rows if row["round"] > 1]

    def med(key: str) -> float | None:
        vals = [row[key] for row in later if key in row]
        return statistics.median(vals) if vals else None

    return {
        "rounds": rows,
        "overhead_fraction_median": med("overhead_fraction"),
        "overhead_fraction_wall_median": med("overhead_fraction_wall"),
        "round_s_median": med("round_s"),
        "train_s_max_median": med("train_s_max"),
        "aggregation_tail_s_median": med("aggregation_tail_s"),
        "commit_publish_s_median": med("commit_publish_s"),
        "rounds_in_median": [row["round"] for row in later],
    }


def round_marks(run_dir: str, served_at: dict[int, float]) -> dict[int, dict[str, float | None]]:
    """When each part of a round finished, in seconds from the round's start, from file times.

    The summary has no aggregation or commit times, and adding them would change the driver,
    so they are read off what the round leaves behind: the last proxy checkpoint written
    (training + state save), the aggregated weights (aggregation), the coordinator's statistics.
    A round starts right after the previous round's ``on_round`` call (``served_at``: wall
    clock), so only rounds >= 2 get marks. Local run directories only (file mtimes).
    """
    out: dict[int, dict[str, float | None]] = {}

    def mtime(*paths: str) -> float | None:
        times = [os.path.getmtime(p) for p in paths if os.path.exists(p)]
        return max(times) if times else None

    for r in sorted(served_at):
        if r - 1 not in served_at:
            continue
        start = served_at[r - 1]
        base = os.path.join(run_dir, "rounds", f"{r:04d}")
        proxies = os.path.join(base, "proxies")
        proxy_files = [os.path.join(proxies, f) for f in os.listdir(proxies)] if os.path.isdir(proxies) else []

        def rel(t: float | None, start: float = start) -> float | None:
            return None if t is None else t - start

        out[r] = {
            "proxies_saved_at_s": rel(mtime(*proxy_files)),
            "aggregated_at_s": rel(
                mtime(os.path.join(base, "global.safetensors"), os.path.join(base, "ema.safetensors"))
            ),
            "stats_written_at_s": rel(mtime(os.path.join(run_dir, "stats", f"round-{r:04d}.parquet"))),
            "served_at_s": served_at[r] - start,
        }
    return out


def aggregation_traffic_bytes(params: int, k: int, elem: int = 4) -> int:
    """Bytes StreamingAverage reads and writes for K fp32 states of ``params`` elements.

    Each add reads the proxy and the accumulator and writes the accumulator (3 passes); the
    result reads the accumulator and writes the average (2 passes).
    """
    return (3 * k + 2) * params * elem


def peak_flops(device_name: str | None) -> float | None:
    """The bf16 dense peak of a known GPU, by name (None: unknown device, no MFU)."""
    for key, peak in PEAK_BF16_FLOPS.items():
        if device_name and key in device_name:
            return peak
    return None


def round_throughput(manifest: dict[str, Any], batch_size: int) -> dict[str, Any]:
    """Images/s of whole rounds (all shards' steps x batch / round_s); median over rounds >= 2."""
    rows = [
        {
            "round": int(s["round"]),
            "images_per_s": sum(int(sh["steps"]) for sh in s["shards"]) * batch_size / s["round_s"],
        }
        for s in manifest["rounds"]
    ]
    later = [r["images_per_s"] for r in rows if r["round"] > 1]
    return {"rounds": rows, "images_per_s_median": statistics.median(later) if later else None}


def scaling_efficiency(images_per_s: dict[int, float]) -> dict[int, float]:
    """Round throughput with K shards over K times the one-shard throughput."""
    if 1 not in images_per_s:
        raise ValueError("scaling needs the one-shard run")
    return {k: v / (k * images_per_s[1]) for k, v in sorted(images_per_s.items())}


def data_path(manifest: dict[str, Any]) -> dict[str, Any]:
    """Per round, the slowest shard's time getting its rows onto the device, as a share of its train_s.

    The step loop indexes a shard that is already decoded and resident on the device
    (augmentation runs there too), so this load is the only time the device waits for data:
    the 'idle fraction' of issue 8, item 5. Round 1 decodes every row; later rounds only the
    rows that migrated in (decoded rows are cached per actor).
    """
    rows = []
    for s in manifest["rounds"]:
        shards = [sh for sh in s["shards"] if sh.get("data_s") is not None]
        if not shards:
            continue
        worst = max(shards, key=lambda sh: float(sh["data_s"]) / max(float(sh["train_s"]), 1e-9))
        rows.append(
            {
                "round": int(s["round"]),
                "data_s_max": max(float(sh["data_s"]) for sh in shards),
                "idle_fraction": float(worst["data_s"]) / max(float(worst["train_s"]), 1e-9),
            }
        )
    later = [r["idle_fraction"] for r in rows if r["round"] > 1]
    first = [r["idle_fraction"] for r in rows if r["round"] == 1]
    return {
        "rounds": rows,
        "idle_fraction_median": statistics.median(later) if later else None,
        "idle_fraction_first_round": first[0] if first else None,
    }


def project_round(
    state_bytes: int, k: int, train_s: float, net_GBps: float, agg_GBps: float, states: int = 2
) -> dict[str, float]:
    """A paper projection of one round on K nodes, one shard per node, the aggregation on one of them.

    Per round each proxy ships ``states`` (raw + EMA) state dicts to the aggregating node (its NIC
    takes K-1 of them: incast), the average is computed at the measured aggregation traffic rate
    ((3K+2) passes per element), and the result is pulled back by the K-1 other nodes from the
    node that holds it (Ray transfers objects point to point, so that node's NIC sends K-1 copies).
    """
    gather = (k - 1) * states * state_bytes / (net_GBps * 1e9)
    aggregate = states * aggregation_traffic_bytes(state_bytes // 4, k) / (agg_GBps * 1e9)
    broadcast = (k - 1) * states * state_bytes / (net_GBps * 1e9)
    overhead = gather + aggregate + broadcast
    return {
        "min_train_s_for_3pct": overhead * 0.97 / 0.03,  # a round this long keeps the fixed cost at 3%
        "k": k,
        "gather_s": gather,
        "aggregate_s": aggregate,
        "broadcast_s": broadcast,
        "overhead_s": overhead,
        "train_s": train_s,
        "overhead_fraction": overhead / (overhead + train_s),
        "efficiency": train_s / (overhead + train_s),
    }


SD_UNET_PARAMS = 859_520_964  # Stable Diffusion 1.x UNet2DConditionModel
NIC_GBPS = {"100GbE": 12.5, "400Gb InfiniBand": 50.0}


def projection(agg_traffic_GBps: float, ks: Sequence[int] = (2, 4, 8, 16, 32)) -> dict[str, Any]:
    """Per-round fixed cost of an SD-sized run on K nodes, at this machine's aggregation rate (paper sizing)."""
    state = SD_UNET_PARAMS * 4
    return {
        "state_bytes": state,
        "agg_traffic_GBps": agg_traffic_GBps,
        "nics": {
            nic: [project_round(state, k, 0.0, gbps, agg_traffic_GBps) for k in ks] for nic, gbps in NIC_GBPS.items()
        },
        "definition": "project_round with train_s = 0: overhead_s per round (raw + EMA fp32 states gathered to one "
        "node, averaged at the measured aggregation traffic rate, pulled back by the other nodes); "
        "min_train_s_for_3pct = the round length at which that is 3%.",
    }
