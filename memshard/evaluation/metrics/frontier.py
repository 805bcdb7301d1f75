"""Privacy at equal quality: the early-stopping frontier of plain training, and each arm's figure at matched quality.

A defence is worth using only if it copies less than plain training that one simply stops in time. So the
comparison is made at equal quality, never at equal steps (an undertrained model copies nothing and generates
badly). The definitions, used in every report:

* the **early-stopping frontier** of plain training, E(f) = the lowest memorized fraction among the baseline's
  checkpoints with FID <= f (None where no checkpoint is that good);
* **matched quality** Q = ``factor`` (1.05) x the baseline's best FID over its checkpoints;
* an arm's figure **at matched quality** = the lowest memorized fraction among its checkpoints with FID <= Q
  (ties: the fewest steps), beside E(Q) and the steps and wall time that checkpoint took; an arm that never
  reaches Q says so and gives its best FID.

Plain functions over :class:`Checkpoint` records, no Ray, no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

__all__ = [
    "MATCHED_FACTOR",
    "Checkpoint",
    "at_matched_quality",
    "checkpoint_from_metrics",
    "clear_difference",
    "early_stopping",
    "frontier_score",
    "matched_quality",
]

MATCHED_FACTOR = 1.05


@dataclass(frozen=True)
class Checkpoint:
    """One evaluated checkpoint of one arm: a point of its memorization-quality curve."""

    arm: str
    round: int
    steps: int  # optimizer steps so far, summed over shards (the compute spent)
    wall_s: float  # training wall time so far
    memorized_fraction: float
    fid: float
    copy_p95: float
    dup_copy_share: float
    singleton_copy_share: float
    duplicated_copied: int = 0
    duplicated_images: int = 0
    singletons_copied: int = 0
    fid_distinct: float = math.nan
    nn_ratio_03: float = math.nan
    num_samples: int = 0  # generations the memorized fraction was measured on
    copy_calibrated: bool = True  # False: copy_p95 measures nothing (memshard.evaluation.metrics.calibration_problem)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def checkpoint_from_metrics(arm: str, m: dict[str, Any]) -> Checkpoint:
    """A :class:`Checkpoint` from one round's metrics.json (memshard.evaluation.evaluate)."""
    dup = m.get("duplicates") or {}
    return Checkpoint(
        arm=arm,
        round=int(m["round"]),
        steps=int(m.get("train_steps", 0)),
        wall_s=float(m.get("train_wall_s", math.nan)),
        memorized_fraction=float(m["memorized_fraction"]),
        fid=float(m["fid"]),
        copy_p95=float(m["copy_similarity"]["p95"]),
        dup_copy_share=float(dup.get("dup_copy_share", 0.0)),
        singleton_copy_share=float(dup.get("singleton_copy_share", m["memorized_fraction"])),
        duplicated_copied=int(dup.get("duplicated_copied", 0)),
        duplicated_images=int(dup.get("duplicated_images", 0)),
        singletons_copied=int(dup.get("singletons_copied", 0)),
        fid_distinct=float(m.get("fid_distinct", m["fid"])),
        nn_ratio_03=float(m.get("nn_ratio_fraction", {}).get("0.3", math.nan)),
        num_samples=int(m.get("num_samples", 0)),
        copy_calibrated=not m.get("copy_calibration_problem"),
    )


def clear_difference(p1: float, n1: int, p2: float, n2: int, z: float = 1.96) -> bool | None:
    """Is the gap between two memorized fractions larger than sampling noise (two-proportion z test, ~95%)?

    None when a sample count is unknown. With n generations a fraction p is known to about
    sqrt(p (1 - p) / n): at 64 generations, 9% and 8% are one generation apart, not a finding.
    """
    if n1 <= 0 or n2 <= 0:
        return None
    pooled = (p1 * n1 + p2 * n2) / (n1 + n2)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    return abs(p1 - p2) > z * se if se > 0 else p1 != p2


def _best(points: Iterable[Checkpoint], fid_max: float) -> Checkpoint | None:
    """Lowest memorized fraction among points with FID <= fid_max; ties go to the fewest steps."""
    ok = [p for p in points if math.isfinite(p.fid) and p.fid <= fid_max]
    return min(ok, key=lambda p: (p.memorized_fraction, p.steps, p.round)) if ok else None


def early_stopping(baseline: Sequence[Checkpoint], fid: float) -> float | None:
    """E(f): the lowest memorized fraction among the baseline's checkpoints with FID <= f (None: none that good)."""
    p = _best(baseline, fid)
    return None if p is None else p.memorized_fraction


def matched_quality(baseline: Sequence[Checkpoint], factor: float = MATCHED_FACTOR) -> float:
    """Q = factor x the baseline's best FID over its checkpoints."""
    fids = [p.fid for p in baseline if math.isfinite(p.fid)]
    if not fids:
        raise ValueError("the baseline has no evaluated checkpoint with a finite FID")
    return factor * min(fids)


def at_matched_quality(points: Sequence[Checkpoint], baseline: Sequence[Checkpoint], q: float) -> dict[str, Any]:
    """One arm's figure at matched quality Q, beside the early-stopping frontier E(Q).

    ``reached`` says whether any checkpoint has FID <= Q. When it does, ``fid``,
    ``memorized_fraction``, ``steps``, ``wall_s`` (and the duplicate shares) are those of the
    checkpoint with the lowest memorized fraction among them; when it does not, they are the
    arm's best-FID checkpoint's. ``vs_early_stopping`` = memorized_fraction - E(Q) (negative:
    the arm copies less than plain training stopped early at the same quality);
    ``clear_difference`` says whether that gap exceeds sampling noise (:func:`clear_difference`).
    ``early_stopping_at_fid`` and ``clear_difference_at_fid`` are the same at the chosen
    checkpoint's own FID (what an arm that never reaches Q is compared with).
    """
    if not points:
        raise ValueError("an arm needs at least one evaluated checkpoint")
    frontier_point = _best(baseline, q)
    e_q = None if frontier_point is None else frontier_point.memorized_fraction
    chosen = _best(points, q)
    reached = chosen is not None
    best_fid = min(points, key=lambda p: (p.fid if math.isfinite(p.fid) else math.inf, p.steps))
    if chosen is None:
        chosen = best_fid
    # the same comparison at the chosen checkpoint's own FID: for an arm that never reaches Q, the
    # only fair one (E(Q) is at a quality it does not have)
    at_fid_point = _best(baseline, chosen.fid) if math.isfinite(chosen.fid) else None
    out = {
        "reached": reached,
        "matched_fid": q,
        "fid": chosen.fid,
        "memorized_fraction": chosen.memorized_fraction,
        "early_stopping_memorized": e_q,
        "vs_early_stopping": (chosen.memorized_fraction - e_q) if (reached and e_q is not None) else None,
        "clear_difference": (
            clear_difference(chosen.memorized_fraction, chosen.num_samples, e_q, frontier_point.num_samples)
            if (reached and frontier_point is not None)
            else None
        ),
        "early_stopping_at_fid": None if at_fid_point is None else at_fid_point.memorized_fraction,
        "clear_difference_at_fid": (
            None
            if at_fid_point is None
            else clear_difference(
                chosen.memorized_fraction, chosen.num_samples, at_fid_point.memorized_fraction, at_fid_point.num_samples
            )
        ),
        "num_samples": chosen.num_samples,
        "steps": chosen.steps,
        "wall_s": chosen.wall_s,
        "round": chosen.round,
        "copy_p95": chosen.copy_p95,
        "dup_copy_share": chosen.dup_copy_share,
        "singleton_copy_share": chosen.singleton_copy_share,
        "duplicated_copied": chosen.duplicated_copied,
        "duplicated_images": chosen.duplicated_images,
        "singletons_copied": chosen.singletons_copied,
        "best_fid": best_fid.fid,
        "best_fid_steps": best_fid.steps,
        "checkpoints": len(points),
        "max_steps": max(p.steps for p in points),
    }
    return out


def frontier_score(points: Sequence[Checkpoint], baseline: Sequence[Checkpoint], q: float) -> dict[str, Any]:
    """One number a search minimises: how far an arm's copying is from plain training stopped early, at Q.

    ``frontier`` = memorized fraction at matched quality - E(Q) when some checkpoint reaches Q
    (in [-1, 1]; negative: below the frontier); otherwise 1 + (best FID - Q) / Q, above every
    arm that reaches Q and ordered by how far its quality falls short, so a scheduler comparing
    trials round by round (ASHA) keeps those that reach the quality and copy least. Beside it:
    ``reached``, ``matched_memorized`` (None when not reached), ``early_stopping`` (E(Q)),
    ``vs_early_stopping_rel`` (the gap as a fraction of E(Q)), and the chosen checkpoint's
    ``fid``, ``memorized_fraction``, ``round`` and ``duplicated_copied``.
    """
    m = at_matched_quality(points, baseline, q)
    e_q = m["early_stopping_memorized"]
    if m["reached"]:
        score = m["memorized_fraction"] - (e_q if e_q is not None else 0.0)
    else:
        score = 1.0 + (m["fid"] - q) / q if math.isfinite(m["fid"]) else math.inf
    rel = (m["memorized_fraction"] / e_q - 1.0) if (m["reached"] and e_q) else None
    return {
        "frontier": float(score),
        "reached": bool(m["reached"]),
        "matched_memorized": m["memorized_fraction"] if m["reached"] else None,
        "early_stopping": e_q,
        "vs_early_stopping_rel": rel,
        "matched_fid_limit": q,
        "fid": m["fid"],
        "memorized_fraction": m["memorized_fraction"],
        "round_chosen": m["round"],
        "duplicated_copied": m["duplicated_copied"],
    }
