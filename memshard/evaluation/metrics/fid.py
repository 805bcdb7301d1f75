"""Fréchet Inception Distance from precomputed (e.g. Inception pool3, 2048-d) features.

Feature extraction lives elsewhere; this module only fits Gaussians and computes
||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) the way the reference implementations do, in float64, so numbers
are comparable with published FIDs.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["feature_stats", "fid_from_features", "frechet_distance"]


def _as_2d_float64(features: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(features, torch.Tensor):
        features = features.detach().to("cpu", torch.float64).numpy()
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"features must be (N, D), got shape {x.shape}")
    if x.shape[0] < 2:
        raise ValueError(f"need at least 2 feature rows to estimate a covariance, got {x.shape[0]}")
    return x


def feature_stats(features: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D) in float64; needs >= 2 rows."""
    x = _as_2d_float64(features)
    return x.mean(axis=0), np.atleast_2d(np.cov(x, rowvar=False))


def _psd_sqrt(a: np.ndarray) -> np.ndarray:
    """Symmetric square root of a PSD matrix (negative eigenvalues from round-off clipped to 0)."""
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def trace_sqrt_product(s1: np.ndarray, s2: np.ndarray) -> float:
    """Tr sqrt(S1 S2) for PSD S1, S2, computed as sum sqrt(eig(S1^1/2 S2 S1^1/2)).

    S1^1/2 S2 S1^1/2 is similar to S1 S2 but symmetric PSD, so its eigenvalues are real and
    non-negative: no complex sqrtm, no eps retries, and it stays exact when the covariances
    are singular (fewer samples than feature dimensions, the usual case for small evaluations).
    """
    r = _psd_sqrt(s1)
    m = r @ s2 @ r
    ev = np.linalg.eigvalsh((m + m.T) / 2)
    return float(np.sqrt(np.clip(ev, 0, None)).sum())


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrt(S1 S2)), clamped at 0."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"shape mismatch: mu {mu1.shape}/{mu2.shape}, sigma {s1.shape}/{s2.shape}")
    diff = mu1 - mu2
    fd = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * trace_sqrt_product(s1, s2))
    return max(fd, 0.0)


def fid_from_features(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    """FID between two feature sets (N, D), e.g. 2048-d Inception pool3 activations."""
    mu1, s1 = feature_stats(a)
    mu2, s2 = feature_stats(b)
    return frechet_distance(mu1, s1, mu2, s2)
