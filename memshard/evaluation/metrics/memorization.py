"""Memorization metrics: nearest-neighbour ratios on pixels and copy similarity on features.

Two pixel-space criteria are reported because the literature uses both: the classic 1/3 rule (Yoon et al.,
Gu et al.: memorized iff ||x - NN1|| / ||x - NN2|| < 1/3, plain L2) is the headline number, and the IET-AGC
authors' ratio r = d1 / mean(d1..dk) on *squared* L2 distances with k = 50 is reported at several thresholds so
results are comparable with their tables.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from memshard.evaluation.metrics.neighbours import topk_neighbours

__all__ = [
    "CopySimilarity",
    "MemorizationReport",
    "calibrate_threshold",
    "calibration_problem",
    "copy_similarity",
    "memorization_report",
    "threshold_at_fpr",
]

_RANGE_TOL = 1e-3


@dataclass
class MemorizationReport:
    """Per-generation nearest-neighbour statistics and their summary fractions."""

    num_samples: int
    memorized_fraction: float  # 1/3 rule
    nn_ratio_fraction: dict[str, float]  # {"0.2": f, "0.3": f, "0.4": f, "0.5": f}
    nn_index: np.ndarray  # (Q,) index of the nearest training image per generation
    l2_ratio: np.ndarray  # (Q,) ||x-NN1|| / ||x-NN2||
    nn_ratio: np.ndarray  # (Q,) authors' d1/mean(d1..dk)
    memorized: np.ndarray  # (Q,) bool

    def to_dict(self) -> dict:
        """JSON-able summary; per-sample arrays are left out (they are large and belong in .npy files)."""
        return {
            "num_samples": int(self.num_samples),
            "memorized_fraction": float(self.memorized_fraction),
            "nn_ratio_fraction": {str(key): float(v) for key, v in self.nn_ratio_fraction.items()},
        }


def _flatten_unit(x: torch.Tensor, name: str) -> torch.Tensor:
    """(N, ...) images in [0, 1] -> (N, D); a [-1, 1] tensor here would silently shrink every ratio."""
    if x.ndim < 2:
        raise ValueError(f"{name} must be (N, C, H, W) or (N, D), got shape {tuple(x.shape)}")
    x = x.reshape(x.shape[0], -1)
    if x.numel():
        lo, hi = float(x.min()), float(x.max())
        if lo < -_RANGE_TOL or hi > 1.0 + _RANGE_TOL:
            raise ValueError(f"{name} must be in [0, 1] (got min {lo:.4g}, max {hi:.4g}); map [-1, 1] via (x + 1) / 2")
    return x


def _exact_sq_dist(a: torch.Tensor, b: torch.Tensor, idx: torch.Tensor, budget: int) -> torch.Tensor:
    """Direct sum((a_i - b_idx_i)^2) in float64, chunked; fixes the expansion's cancellation error near 0."""
    out = torch.empty(a.shape[0], dtype=torch.float64, device=idx.device)
    chunk = max(1, budget // (a.shape[1] * 8 * 2))
    for s in range(0, a.shape[0], chunk):
        ia = a[s : s + chunk].to(device=idx.device, dtype=torch.float64)
        ib = b[idx[s : s + chunk].to(b.device)].to(device=idx.device, dtype=torch.float64)
        out[s : s + chunk] = ((ia - ib) ** 2).sum(dim=1)
    return out


def memorization_report(
    generated: torch.Tensor,
    train: torch.Tensor,
    k: int = 50,
    thresholds: Sequence[float] = (0.2, 0.3, 0.4, 0.5),
    rule: float = 1 / 3,
    memory_budget_bytes: int = 256 * 2**20,
) -> MemorizationReport:
    """Nearest-neighbour memorization statistics of ``generated`` against ``train``.

    Images are (N, C, H, W) or flattened, with values in [0, 1] (ValueError if outside by more than 1e-3).
    k is clipped to the training-set size (k = min(k, N)) silently; N >= 2 is required because the 1/3 rule
    needs a second neighbour. One sqeuclidean ``topk_neighbours`` call finds the k nearest; the two nearest
    distances are then recomputed directly in float64 so that exact copies get exactly 0 (the expansion used by
    the search has cancellation error of order 1e-4 at 3072 dims). If NN1 is at distance 0 both ratios are 0.
    """
    g = _flatten_unit(generated, "generated")
    t = _flatten_unit(train, "train")
    if g.shape[1] != t.shape[1]:
        raise ValueError(f"generated has {g.shape[1]} values per image but train has {t.shape[1]}")
    n = t.shape[0]
    if n < 2:
        raise ValueError(f"need at least 2 training images for the NN1/NN2 ratio, got N={n}")
    if g.shape[0] < 1:
        raise ValueError("need at least one generated image")
    k = min(int(k), n)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")

    dist, idx = topk_neighbours(g, t, max(k, 2), "sqeuclidean", memory_budget_bytes)
    dist = dist.to(torch.float64)
    d1 = _exact_sq_dist(g, t, idx[:, 0], memory_budget_bytes)
    d2 = _exact_sq_dist(g, t, idx[:, 1], memory_budget_bytes)
    swap = d1 > d2  # refinement may reorder a near-tie
    nn1 = torch.where(swap, idx[:, 1], idx[:, 0])
    d1, d2 = torch.where(swap, d2, d1), torch.where(swap, d1, d2)
    dist[:, 0], dist[:, 1] = d1, d2

    zero = d1 <= 0
    l2_ratio = torch.where(zero, torch.zeros_like(d1), d1.clamp_min(0).sqrt() / d2.clamp_min(1e-300).sqrt())
    mean_k = dist[:, :k].mean(dim=1)
    nn_ratio = torch.where(zero, torch.zeros_like(d1), d1 / mean_k.clamp_min(1e-300))
    memorized = l2_ratio < rule

    l2_np = l2_ratio.cpu().numpy()
    nn_np = nn_ratio.cpu().numpy()
    mem_np = memorized.cpu().numpy()
    return MemorizationReport(
        num_samples=int(g.shape[0]),
        memorized_fraction=float(mem_np.mean()),
        nn_ratio_fraction={f"{float(th):g}": float((nn_np < th).mean()) for th in thresholds},
        nn_index=nn1.cpu().numpy().astype(np.int64),
        l2_ratio=l2_np,
        nn_ratio=nn_np,
        memorized=mem_np.astype(bool),
    )


@dataclass
class CopySimilarity:
    """Feature-space copy detection: similarity of each generation to its most similar training image."""

    mean: float
    p95: float
    over_threshold: float
    threshold: float
    extractor: str
    max_similarity: np.ndarray  # (Q,)
    nn_index: np.ndarray  # (Q,)

    def to_dict(self) -> dict:
        """JSON-able summary without the per-sample arrays."""
        return {
            "mean": float(self.mean),
            "p95": float(self.p95),
            "over_threshold": float(self.over_threshold),
            "threshold": float(self.threshold),
            "extractor": str(self.extractor),
        }


def copy_similarity(
    gen_features: torch.Tensor,
    train_features: torch.Tensor,
    threshold: float,
    extractor: str,
    memory_budget_bytes: int = 256 * 2**20,
) -> CopySimilarity:
    """Cosine similarity of each generation's L2-normalised feature to its most similar training feature.

    ``over_threshold`` is the fraction with similarity >= threshold, the same convention as
    ``calibrate_threshold`` (which returns a threshold equal to an observed copy score).
    """
    if gen_features.ndim != 2 or gen_features.shape[0] < 1:
        raise ValueError(f"gen_features must be (Q, D) with Q >= 1, got {tuple(gen_features.shape)}")
    sims, idx = topk_neighbours(gen_features, train_features, 1, "cosine", memory_budget_bytes)
    s = sims[:, 0].double().cpu().numpy()
    return CopySimilarity(
        mean=float(s.mean()),
        p95=float(np.percentile(s, 95)),
        over_threshold=float((s >= threshold).mean()),
        threshold=float(threshold),
        extractor=str(extractor),
        max_similarity=s,
        nn_index=idx[:, 0].cpu().numpy().astype(np.int64),
    )


def calibration_problem(calibration: dict[str, Any], min_balanced_accuracy: float = 0.75) -> str | None:
    """Why a copy-threshold calibration cannot be trusted, or None when it can.

    The threshold only means "copy" if the extractor tells augmented copies from distinct images:
    copies must score higher on average, and the chosen threshold must separate them with a
    balanced accuracy of at least ``min_balanced_accuracy``. When it does not (an extractor that
    does not fit the images, tiny images, too few calibration images), copy similarity is no
    measure of copying, and the console and metrics.json say so next to the figure.
    """
    tpr, fpr = float(calibration["tpr"]), float(calibration["fpr"])
    copy_mean, distinct_mean = float(calibration["copy_mean"]), float(calibration["distinct_mean"])
    if copy_mean <= distinct_mean:
        return (f"augmented copies score lower than distinct images ({copy_mean:.3f} vs {distinct_mean:.3f}): "
                "this extractor does not detect copies of these images")  # fmt: skip
    balanced = (tpr + 1.0 - fpr) / 2.0
    if balanced < min_balanced_accuracy:
        return (f"the threshold finds {100 * tpr:.1f}% of augmented copies at {100 * fpr:.1f}% false positives "
                f"(balanced accuracy {balanced:.2f} < {min_balanced_accuracy})")  # fmt: skip
    return None


def calibrate_threshold(copy_scores: np.ndarray, distinct_scores: np.ndarray) -> dict:
    """Pick the copy-detection threshold that maximises balanced accuracy (TPR + TNR) / 2.

    copy_scores: similarities of augmented copies to their source (positives); distinct_scores: similarities of
    distinct images to their nearest other image (negatives). A score >= threshold is called a copy. Candidates
    are all observed scores; among equally good ones the lowest wins. Balanced accuracy is used rather than a
    midpoint of means because the two sets differ in size and spread.
    """
    pos = np.sort(np.asarray(copy_scores, dtype=np.float64).ravel())
    neg = np.sort(np.asarray(distinct_scores, dtype=np.float64).ravel())
    if pos.size == 0 or neg.size == 0:
        raise ValueError(f"need non-empty score sets, got {pos.size} copy and {neg.size} distinct scores")
    cand = np.unique(np.concatenate([pos, neg]))
    tpr = (pos.size - np.searchsorted(pos, cand, side="left")) / pos.size
    fpr = (neg.size - np.searchsorted(neg, cand, side="left")) / neg.size
    best = int(np.argmax((tpr + 1.0 - fpr) / 2.0))
    return {
        "threshold": float(cand[best]),
        "tpr": float(tpr[best]),
        "fpr": float(fpr[best]),
        "copy_mean": float(pos.mean()),
        "distinct_mean": float(neg.mean()),
        "n_copy": int(pos.size),
        "n_distinct": int(neg.size),
    }


def threshold_at_fpr(distinct_scores: np.ndarray, fpr: float = 0.01, copy_scores: np.ndarray | None = None) -> dict:
    """The copy threshold that distinct images exceed at rate ``fpr`` (same keys as :func:`calibrate_threshold`).

    For measures that augmented copies cannot calibrate (pixel correlation is not invariant to
    the crops and flips of :func:`~memshard.evaluation.copies.augmented_copies`): a generation is
    called a copy when it is closer to a training image than all but ``fpr`` of the training
    images are to their nearest other training image. ``copy_scores``, when given, only fill in
    the TPR and copy mean of the report.
    """
    neg = np.sort(np.asarray(distinct_scores, dtype=np.float64).ravel())
    if neg.size == 0:
        raise ValueError("need distinct scores to calibrate a threshold")
    if not 0.0 < fpr < 1.0:
        raise ValueError(f"fpr must be in (0, 1), got {fpr}")
    # just above the score below the top floor(fpr * n) distinct scores (ties fall below: fewer, never more)
    allowed = int(np.floor(fpr * neg.size))
    threshold = float(np.nextafter(neg[neg.size - allowed - 1], np.inf))
    pos = None if copy_scores is None else np.asarray(copy_scores, dtype=np.float64).ravel()
    return {
        "threshold": threshold,
        "tpr": float((pos >= threshold).mean()) if pos is not None and pos.size else float("nan"),
        "fpr": float((neg >= threshold).mean()),
        "copy_mean": float(pos.mean()) if pos is not None and pos.size else float("nan"),
        "distinct_mean": float(neg.mean()),
        "n_copy": int(pos.size) if pos is not None else 0,
        "n_distinct": int(neg.size),
    }
