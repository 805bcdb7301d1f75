"""`memshard frontier`: memorization against quality over training, for plain training and every defended arm.

``memshard frontier BASELINE_RUN RUN [RUN ...] --out DIR`` evaluates every committed round of
every run (what was already evaluated with the same settings is reused), then writes:

* ``DIR/frontier.csv``: one row per checkpoint (arm, round, steps, wall_s, memorized_fraction,
  fid, copy_p95, dup_copy_share, singleton_copy_share, ...);
* ``DIR/matched.json``: per arm, its figure at matched quality (reached, fid,
  memorized_fraction, early_stopping_memorized, steps, wall_s, ...);
* ``DIR/frontier.png``: memorized fraction against FID, one curve per arm, points labelled with
  steps, the baseline drawn as "plain training, stopped early".

The definitions (early-stopping frontier E(f), matched quality Q = 1.05 x the baseline's best
FID) are in memshard/metrics/frontier.py. All runs must be trained on the same images (their
reference fingerprints are compared), and all are evaluated with the same generations (seeds),
sample count and reference.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Sequence
from typing import Any

from memshard.evaluation.evaluate import EvalOptions, evaluate_rounds, training_fingerprint
from memshard.evaluation.metrics.frontier import (
    MATCHED_FACTOR,
    Checkpoint,
    at_matched_quality,
    checkpoint_from_metrics,
    early_stopping,
    matched_quality,
)
from memshard.io.rundir import RunDir
from memshard.runtime.progress import console

CSV_COLUMNS = (
    "arm",
    "round",
    "steps",
    "wall_s",
    "memorized_fraction",
    "fid",
    "fid_distinct",
    "copy_p95",
    "nn_ratio_03",
    "dup_copy_share",
    "singleton_copy_share",
    "duplicated_copied",
    "duplicated_images",
    "singletons_copied",
    "early_stopping_memorized",
)
MIN_BASELINE_CHECKPOINTS = 8


class FrontierError(ValueError):
    """Runs that cannot be put on one frontier (different data, clashing names, nothing evaluated)."""


def next_action(
    fids: dict[int, float], committed: int, q: float | None, equal: int, cap: int, every: int
) -> tuple[str, list[int]]:
    """What an arm does next, from its evaluated rounds' FIDs and its committed rounds.

    ("train", [r]): train until round r; ("evaluate", rounds); ("done", []). The schedule: train
    to the baseline's steps (``equal`` rounds) and evaluate every round; the baseline (``q`` is
    None) stops there. Others, while no evaluated round has FID <= q, train on ``every`` rounds at
    a time up to ``cap`` and evaluate the newest; once one reaches q, the rounds skipped just
    before it are evaluated, so the first checkpoint at quality q is found.
    """
    if committed < equal:
        return "train", [equal]
    missing = [r for r in range(1, equal + 1) if r not in fids]
    if missing:
        return "evaluate", missing
    if q is None:
        return "done", []
    evaluated = sorted(fids)
    reached = [r for r in evaluated if fids[r] <= q]
    if reached:
        first = reached[0]
        before = max((r for r in evaluated if r < first), default=0)
        gap = list(range(before + 1, first))
        return ("evaluate", gap) if gap else ("done", [])
    last = evaluated[-1]
    if last >= cap:
        return "done", []
    nxt = min(last + every, cap)
    return ("train", [nxt]) if committed < nxt else ("evaluate", [nxt])


def arm_names(runs: Sequence[str], names: Sequence[str] | None) -> list[str]:
    """The arm of each run: ``names`` when given, else the run's ``method``; names must be unique."""
    if names:
        if len(names) != len(runs):
            raise FrontierError(f"--names gives {len(names)} names for {len(runs)} runs")
        out = [str(n) for n in names]
    else:
        out = []
        for run in runs:
            manifest = RunDir(run).manifest()
            if manifest is None:
                raise FileNotFoundError(f"{run}: no run (run.json missing)")
            out.append(str(manifest["config"].get("method") or "custom"))
    dupes = sorted({n for n in out if out.count(n) > 1})
    if dupes:
        raise FrontierError(f"two runs would both be called {', '.join(dupes)}: name the arms with --names A,B,...")
    return out


def build(points: dict[str, list[Checkpoint]], baseline: str, factor: float = MATCHED_FACTOR) -> dict[str, Any]:
    """Matched quality, the frontier at each point and each arm's figure at Q, from evaluated checkpoints."""
    if baseline not in points or not points[baseline]:
        raise FrontierError(f"the baseline arm {baseline!r} has no evaluated checkpoint")
    base = sorted(points[baseline], key=lambda p: p.steps)
    q = matched_quality(base, factor)
    matched = {arm: at_matched_quality(pts, base, q) for arm, pts in points.items()}
    rows = []
    for pts in points.values():
        for p in sorted(pts, key=lambda p: p.steps):
            rows.append({**p.to_dict(), "early_stopping_memorized": early_stopping(base, p.fid)})
    return {
        "baseline": baseline,
        "factor": factor,
        "matched_fid": q,
        "baseline_best_fid": min(p.fid for p in base),
        "baseline_checkpoints": len(base),
        "coarse": len(base) < MIN_BASELINE_CHECKPOINTS,
        "matched": matched,
        "rows": rows,
    }


def _fmt(x: Any) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return ""
    if isinstance(x, float):
        return f"{x:.6g}"
    return str(x)


def write_csv(result: dict[str, Any], path: str) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(CSV_COLUMNS)
        for row in result["rows"]:
            w.writerow([_fmt(row.get(c)) for c in CSV_COLUMNS])


def _pct(x: float | None) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def matched_table(result: dict[str, Any], labels: dict[str, str] | None = None) -> str:
    """Markdown: each arm at matched quality beside plain training stopped early."""
    labels = labels or {}
    m = result["matched"]
    base_steps = m[result["baseline"]]["steps"] or 1
    lines = [
        "| arm | at FID <= Q | memorized | plain training stopped early, E(Q) | difference | FID | steps | "
        "steps vs plain | train s | duplicated images copied | dup. copy share | singleton copy share |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for arm, a in m.items():
        diff = a["vs_early_stopping"]
        diff_text = "n/a" if diff is None else f"{100 * diff:+.1f} pts"
        if a.get("clear_difference") is False and diff:
            diff_text += " (noise)"
        lines.append(
            f"| {labels.get(arm, arm)} | {'reached' if a['reached'] else 'not reached'} | "
            f"{_pct(a['memorized_fraction'])} | {_pct(a['early_stopping_memorized'])} | "
            f"{diff_text} | {a['fid']:.2f} | {a['steps']} | "
            f"x{a['steps'] / base_steps:.2f} | {a['wall_s']:.0f} | "
            f"{a['duplicated_copied']}/{a['duplicated_images']} | {_pct(a['dup_copy_share'])} | "
            f"{_pct(a['singleton_copy_share'])} |"
        )
    lines.append(
        f"\nQ = {result['factor']:g} x plain training's best FID ({result['baseline_best_fid']:.2f}) = "
        f"{result['matched_fid']:.2f}. Each arm's row is its checkpoint with the lowest memorized fraction among "
        "those with FID <= Q (not reached: its best-FID checkpoint); E(Q) is the same for plain training, i.e. "
        "what stopping plain training early gets at that quality; (noise) marks a difference within sampling noise "
        "(two-proportion test, 95%). Steps are optimizer steps summed over shards."
    )
    return "\n".join(lines)


def points_table(result: dict[str, Any], labels: dict[str, str] | None = None) -> str:
    """Markdown: every checkpoint of every arm (the data of the plot)."""
    labels = labels or {}
    lines = [
        "| arm | round | steps | train s | memorized | E(FID) | FID | copy p95 | dup. copy share | "
        "singleton copy share |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {labels.get(r['arm'], r['arm'])} | {r['round']} | {r['steps']} | {r['wall_s']:.0f} | "
            f"{_pct(r['memorized_fraction'])} | {_pct(r['early_stopping_memorized'])} | {r['fid']:.2f} | "
            f"{r['copy_p95']:.3f}{'' if r.get('copy_calibrated', True) else '*'} | {_pct(r['dup_copy_share'])} | "
            f"{_pct(r['singleton_copy_share'])} |"
        )
    if not all(r.get("copy_calibrated", True) for r in result["rows"]):
        lines.append("\n\\* copy similarity not calibrated for these images (metrics.json: copy_calibration_problem)")
    return "\n".join(lines)


def _k(steps: int) -> str:
    return f"{steps / 1000:.1f}k" if steps >= 1000 else str(steps)


def plot(result: dict[str, Any], path: str, title: str | None = None, labels: dict[str, str] | None = None) -> None:
    """frontier.png: memorized fraction against FID per arm over training; lower-left is better."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = labels or {}
    baseline = result["baseline"]
    by_arm: dict[str, list[dict[str, Any]]] = {}
    for r in result["rows"]:
        by_arm.setdefault(r["arm"], []).append(r)
    fig, ax = plt.subplots(figsize=(8.5, 5.5))
    colours = plt.get_cmap("tab10")
    i = 0
    for arm, rows in by_arm.items():
        xs = [r["fid"] for r in rows]
        ys = [100 * r["memorized_fraction"] for r in rows]
        if arm == baseline:
            ax.plot(xs, ys, "-o", color="black", lw=2.2, ms=5, zorder=5, label="plain training, stopped early")
            colour = "black"
        else:
            colour = colours(i % 10)
            i += 1
            ax.plot(xs, ys, "-o", color=colour, lw=1.4, ms=4, alpha=0.9, label=labels.get(arm, arm))
        for r in rows:
            ax.annotate(
                _k(r["steps"]), (r["fid"], 100 * r["memorized_fraction"]), fontsize=6.5, color=colour,
                textcoords="offset points", xytext=(3, 3),
            )  # fmt: skip
    q = result["matched_fid"]
    ax.axvline(q, color="grey", ls=":", lw=1.2, label=f"matched quality Q = {q:.1f}")
    e_q = result["matched"][baseline]["early_stopping_memorized"]
    if e_q is not None:
        ax.axhline(100 * e_q, color="grey", ls="--", lw=0.8, label=f"E(Q) = {100 * e_q:.1f}% (plain, stopped early)")
    fids = [r["fid"] for r in result["rows"] if math.isfinite(r["fid"]) and r["fid"] > 0]
    if fids and max(fids) / min(fids) > 4:
        from matplotlib.ticker import FuncFormatter, LogLocator

        ax.set_xscale("log")
        plain = FuncFormatter(lambda v, _: f"{v:g}")
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 3.0, 5.0)))
        ax.xaxis.set_major_formatter(plain)
        ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
    ax.set_xlabel("FID (lower is better)")
    ax.set_ylabel("memorized fraction, 1/3 rule over distinct images (%)")
    ax.set_title(title or "Memorization vs quality over training (lower-left is better)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def write_outputs(
    result: dict[str, Any], out: str, title: str | None = None, labels: dict[str, str] | None = None
) -> None:
    os.makedirs(out, exist_ok=True)
    write_csv(result, os.path.join(out, "frontier.csv"))
    tmp = os.path.join(out, "matched.json.tmp")
    with open(tmp, "w") as fh:
        json.dump(result["matched"], fh, indent=2)
    os.replace(tmp, os.path.join(out, "matched.json"))
    plot(result, os.path.join(out, "frontier.png"), title, labels)


def collect(
    runs: Sequence[str], arms: Sequence[str], opts: EvalOptions, reuse: bool = True
) -> dict[str, list[Checkpoint]]:
    """Evaluate (or reuse) every committed round of every run; all must share one training set (checked first)."""
    prints = {run: training_fingerprint(run) for run in runs}
    if len(set(prints.values())) > 1:
        raise FrontierError(
            "the runs were trained on different images (training-set fingerprints: "
            + ", ".join(f"{run}: {fp}" for run, fp in prints.items())
            + "); a frontier compares arms on one dataset"
        )
    points: dict[str, list[Checkpoint]] = {}
    for run, arm in zip(runs, arms, strict=True):
        console.rule(f"[bold]{arm}[/bold]: {run}")
        metrics = evaluate_rounds(run, opts, "all", reuse=reuse)
        points[arm] = [checkpoint_from_metrics(arm, m) for m in metrics.values()]
    return points


def frontier(
    baseline_run: str,
    runs: Sequence[str],
    out: str,
    opts: EvalOptions,
    names: Sequence[str] | None = None,
    factor: float = MATCHED_FACTOR,
    labels: dict[str, str] | None = None,
    title: str | None = None,
) -> dict[str, Any]:
    """Evaluate what is missing, then write frontier.csv, matched.json and frontier.png under ``out``."""
    all_runs = [baseline_run, *runs]
    arms = arm_names(all_runs, names)
    points = collect(all_runs, arms, opts)
    result = build(points, arms[0], factor)
    if result["coarse"]:
        console.print(
            f"[yellow]the baseline has {result['baseline_checkpoints']} checkpoints (< {MIN_BASELINE_CHECKPOINTS}): "
            "E(f) is a coarse step; train it with more rounds for a finer frontier[/yellow]"
        )
    write_outputs(result, out, title, labels)
    return result


def verdict(result: dict[str, Any], arm: str, labels: dict[str, str] | None = None) -> str:
    """One plain sentence: does ``arm`` copy less than plain training stopped early at matched quality?"""
    labels = labels or {}
    name = labels.get(arm, arm)
    a = result["matched"][arm]
    base = result["matched"][result["baseline"]]
    q = result["matched_fid"]
    e_q = a["early_stopping_memorized"]
    if not a["reached"]:
        e_at = a["early_stopping_at_fid"]
        text = (
            f"**{name} does not reach plain training's quality** within {a['max_steps']} steps (best FID "
            f"{a['fid']:.1f} at {a['steps']} steps; matched quality Q = {q:.1f}). At its best FID it copies "
            f"{_pct(a['memorized_fraction'])} of generations; plain training stopped early at that FID copies "
            f"{_pct(e_at)}."
        )
        if e_at is not None and a["memorized_fraction"] >= e_at:
            text += " The defence buys nothing here that stopping plain training early does not."
        elif a["clear_difference_at_fid"] is False:
            text += (
                f" The gap is within the sampling noise of {a['num_samples']} generations: at its quality it "
                "is no better than plain training stopped early."
            )
        elif e_at is not None:
            text += " It copies less than plain training at equal FID, but only at a quality plain training beats."
        return text
    steps = f"{a['steps']} steps, x{a['steps'] / max(base['steps'], 1):.2f} plain training's"
    gap = f"{_pct(a['memorized_fraction'])} of generations against {_pct(e_q)} at FID <= {q:.1f} ({steps})"
    if a["clear_difference"] is False:
        return (
            f"**{name} and plain training stopped early are not measurably different at matched quality**: "
            f"{gap}, a gap within the sampling noise of {a['num_samples']} generations (evaluate with more "
            "generations, --num, to tell them apart)."
        )
    if e_q is not None and a["memorized_fraction"] < e_q:
        return f"**{name} copies less than plain training stopped early at matched quality**: {gap}."
    return f"**{name} is no better than plain training stopped early**: at matched quality it copies {gap}."
