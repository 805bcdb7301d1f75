"""Fréchet Inception Distance from precomputed (e.g. Inception pool3, 2048-d) features.

Feature extraction lives elsewhere; this module only fits Gaussians and computes
||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) the way the reference implementations do, in float64, so numbers
are comparable with published FIDs.
"""

from __future__ import annotations

import warnings

import numpy as np
import scipy.linalg
import torch

__all__ = ["feature_stats", "fid_from_features", "frechet_distance"]

_EPS = 1e-6
_IMAG_TOL = 1e-3


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


def _sqrtm(a: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return scipy.linalg.sqrtm(a)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2).

    sqrtm(S1 S2) is retried with eps*I added to both covariances when it is non-finite or clearly inaccurate
    (singular products, e.g. fewer samples than dimensions); tiny imaginary parts from numerical error are
    dropped, large ones (> 1e-3 relative) raise; the result is clamped at 0.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"shape mismatch: mu {mu1.shape}/{mu2.shape}, sigma {s1.shape}/{s2.shape}")
    diff = mu1 - mu2
    prod = s1 @ s2
    covmean = _sqrtm(prod)
    scale = max(np.linalg.norm(prod), 1e-300)
    bad = not np.isfinite(covmean).all() or np.linalg.norm(covmean @ covmean - prod) / scale > 1e-3
    if bad:
        offset = np.eye(s1.shape[0]) * _EPS
        covmean = _sqrtm((s1 + offset) @ (s2 + offset))
        if not np.isfinite(covmean).all():
            raise ValueError("sqrtm of the covariance product is not finite even after adding eps*I")
    if np.iscomplexobj(covmean):
        imag = np.abs(covmean.imag).max()
        if imag > _IMAG_TOL * max(1.0, np.abs(covmean.real).max()):
            raise ValueError(f"sqrtm has a large imaginary component ({imag:.3g})")
        covmean = covmean.real
    fd = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))
    return max(fd, 0.0)


def fid_from_features(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    """FID between two feature sets (N, D), e.g. 2048-d Inception pool3 activations."""
    mu1, s1 = feature_stats(a)
    mu2, s2 = feature_stats(b)
    return frechet_distance(mu1, s1, mu2, s2)
