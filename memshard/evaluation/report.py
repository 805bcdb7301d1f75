"""`memshard report RUN`: what the coordinator saw, round by round, as a table and three plots.

* a table per round: loss, skip rate, samples skipped at least once, migrations, augmented
  visits and their mean strength, round time, throughput, shard sizes;
* RUN/report/skip_rate.png: skip rate of every shard over rounds (is one proxy starving its
  samples?);
* RUN/report/skip_hist.png: how many samples were skipped how often over the run (the tail is
  the memorization-prone set MSR moves);
* RUN/report/migrations.png: migration flows, a from-shard x to-shard matrix summed over the
  run, and moves per round (only when MSR moved samples: an empty plot says nothing).

Everything is read from the run directory (local or s3://); nothing needs Ray.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from rich.table import Table

from memshard.io.rundir import RunDir


def round_rows(run: RunDir) -> list[dict[str, Any]]:
    """Per committed round: the manifest's summary plus per-shard skip rates from the stats file."""
    manifest = run.manifest()
    if manifest is None:
        raise FileNotFoundError(f"{run.uri} holds no run (no run.json)")
    rows = []
    for summary in manifest["rounds"]:
        r = int(summary["round"])
        t = run.read_stats(r)
        shard = t.column("shard").to_numpy()
        visits = t.column("visits").to_numpy()
        skips = t.column("skips").to_numpy()
        k = int(manifest["config"]["shards"]["count"])
        v = np.bincount(shard, weights=visits, minlength=k)
        s = np.bincount(shard, weights=skips, minlength=k)
        rows.append({**summary, "shard_skip_rate": (s / np.maximum(v, 1)).tolist()})
    return rows


def skip_totals(run: RunDir, rounds: int) -> np.ndarray:
    """Total skips per sample over all rounds."""
    totals: dict[int, int] = {}
    for r in range(1, rounds + 1):
        t = run.read_stats(r)
        for i, s in zip(t.column("id").to_numpy().tolist(), t.column("skips").to_numpy().tolist(), strict=True):
            totals[i] = totals.get(i, 0) + int(s)
    return np.array(list(totals.values()), dtype=np.int64)


def migration_matrix(run: RunDir, rounds: int, k: int) -> tuple[np.ndarray, list[int]]:
    """(K x K moves summed over rounds, moves per round)."""
    mat = np.zeros((k, k), dtype=np.int64)
    per_round = []
    for r in range(1, rounds + 1):
        t = run.read_migrations(r)
        if t is None or t.num_rows == 0:
            per_round.append(0)
            continue
        np.add.at(mat, (t.column("from_shard").to_numpy(), t.column("to_shard").to_numpy()), 1)
        per_round.append(t.num_rows)
    return mat, per_round


def table(rows: list[dict[str, Any]]) -> Table:
    tab = Table(title="rounds")
    for col in ("round", "loss", "skip", "skipped once", "migrated", "augmented", "strength", "s", "img/s", "shards"):
        tab.add_column(col, justify="right")
    for r in rows:
        tab.add_row(
            str(r["round"]),
            f"{r['loss']:.4f}",
            f"{100 * r['skip_rate']:.2f}%",
            str(r.get("samples_skipped_once", "")),
            str(r.get("migrated", 0)),
            str(r.get("augmented", 0)),
            f"{r['mean_strength']:.2f}" if "mean_strength" in r else "-",
            f"{r.get('round_s', 0):.1f}",
            f"{r.get('images_per_s', 0):.0f}",
            ",".join(str(x) for x in r.get("shard_sizes", [])),
        )
    return tab


def plots(run: RunDir, rows: list[dict[str, Any]], k: int) -> dict[str, bytes]:
    """The three report PNGs, as bytes keyed by file name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out: dict[str, bytes] = {}
    rounds = [r["round"] for r in rows]

    def save(fig: Any, name: str) -> None:
        buf = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buf, format="png", dpi=110)
        plt.close(fig)
        out[name] = buf.getvalue()

    from matplotlib.ticker import MaxNLocator

    def whole(axis: Any) -> None:  # rounds and counts are integers: no 1.2, 1.4 ticks
        axis.set_major_locator(MaxNLocator(integer=True))

    fig, ax = plt.subplots(figsize=(6.5, 4))
    rates = np.array([r["shard_skip_rate"] for r in rows]) * 100
    for s in range(k):
        ax.plot(rounds, rates[:, s], marker="o", label=f"shard {s}")
    ax.set_xlabel("round")
    ax.set_ylabel("skipped visits (%)")
    ax.set_ylim(bottom=0, top=max(1.0, float(rates.max(initial=0)) * 1.1))  # no negative percentages
    whole(ax.xaxis)
    ax.set_title("AGC skip rate per shard")
    ax.grid(alpha=0.3)
    if k <= 12:
        ax.legend(fontsize=8)
    save(fig, "skip_rate.png")

    fig, ax = plt.subplots(figsize=(6.5, 4))
    totals = skip_totals(run, len(rows))
    ax.hist(totals, bins=min(50, max(1, int(totals.max(initial=0)) + 1)), color="tab:orange")
    ax.set_xlabel("times skipped over the run")
    ax.set_ylabel("samples")
    ax.set_xlim(left=-0.5)
    whole(ax.xaxis)
    ax.set_yscale("log")
    ax.set_title(f"skip counts ({(totals > 0).sum()} of {len(totals)} samples skipped at least once)")
    save(fig, "skip_hist.png")

    mat, per_round = migration_matrix(run, len(rows), k)
    if not mat.any():
        return out
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    im = a1.imshow(mat, cmap="Blues")
    a1.set_xlabel("to shard")
    a1.set_ylabel("from shard")
    a1.set_title(f"migration flows ({int(mat.sum())} moves)")
    fig.colorbar(im, ax=a1)
    a2.bar(rounds, per_round, color="tab:blue")
    a2.set_xlabel("after round")
    a2.set_ylabel("samples moved")
    whole(a2.xaxis)
    whole(a2.yaxis)
    for axis in (a1.xaxis, a1.yaxis):
        whole(axis)
    a2.set_title("migrations per round")
    save(fig, "migrations.png")
    return out


def report(run_uri: str) -> tuple[Table, list[str]]:
    """Build the table and write RUN/report/*.png; returns (table, written paths)."""
    run = RunDir(run_uri)
    rows = round_rows(run)
    if not rows:
        raise FileNotFoundError(f"{run_uri} has no committed round yet (nothing to report)")
    k = int(run.manifest()["config"]["shards"]["count"])
    written = []
    for name, data in plots(run, rows, k).items():
        run.store.write_bytes(f"report/{name}", data)
        written.append(run.store.uri_of(f"report/{name}"))
    return table(rows), written
