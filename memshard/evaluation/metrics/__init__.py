"""Evaluation metrics: memory-bounded nearest neighbours, memorization ratios, copy similarity and FID."""

from memshard.evaluation.metrics.fid import feature_stats, fid_from_features, frechet_distance
from memshard.evaluation.metrics.memorization import (
    CopySimilarity,
    MemorizationReport,
    calibrate_threshold,
    calibration_problem,
    copy_similarity,
    memorization_report,
)
from memshard.evaluation.metrics.neighbours import peak_block_bytes, topk_neighbours

__all__ = [
    "CopySimilarity",
    "MemorizationReport",
    "calibrate_threshold",
    "calibration_problem",
    "copy_similarity",
    "feature_stats",
    "fid_from_features",
    "frechet_distance",
    "memorization_report",
    "peak_block_bytes",
    "topk_neighbours",
]
