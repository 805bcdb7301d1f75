"""Tests for memshard.evaluation.metrics: blocked exact k-NN, memorization ratios, copy similarity, FID."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from memshard.evaluation.metrics import (
    calibrate_threshold,
    copy_similarity,
    feature_stats,
    fid_from_features,
    frechet_distance,
    memorization_report,
    peak_block_bytes,
    topk_neighbours,
)
from memshard.evaluation.metrics.neighbours import _plan

CASES = [  # (Q, N, D, k, budget bytes) - budgets small enough to force many blocks in both dimensions
    (37, 53, 5, 7, 400),
    (37, 53, 5, 7, 160),  # train blocks smaller than k: running top-k starts with placeholders
    (20, 64, 3, 64, 700),  # k == N
    (50, 41, 16, 1, 256),
]


def _brute(queries: torch.Tensor, train: torch.Tensor, k: int, metric: str) -> tuple[torch.Tensor, torch.Tensor]:
    if metric == "sqeuclidean":
        full = torch.cdist(queries.double(), train.double()) ** 2
        order = torch.argsort(full, dim=1, stable=True)[:, :k]
    else:
        qn = torch.nn.functional.normalize(queries.double(), dim=1)
        tn = torch.nn.functional.normalize(train.double(), dim=1)
        full = qn @ tn.T
        order = torch.argsort(-full, dim=1, stable=True)[:, :k]
    return full.gather(1, order), order


@pytest.mark.parametrize("metric", ["sqeuclidean", "cosine"])
@pytest.mark.parametrize(("q", "n", "d", "k", "budget"), CASES)
def test_topk_matches_brute_force(q: int, n: int, d: int, k: int, budget: int, metric: str) -> None:
    g = torch.Generator().manual_seed(q * 1000 + n + d + k)
    queries = torch.rand(q, d, generator=g)
    train = torch.rand(n, d, generator=g)
    plan = _plan(q, n, d, k, budget)
    assert plan.bq < q and plan.bn < n, "budget must force blocking over queries and train"
    assert peak_block_bytes(q, n, d, k, budget) <= budget

    vals, idx = topk_neighbours(queries, train, k, metric=metric, memory_budget_bytes=budget)
    ref_vals, ref_idx = _brute(queries, train, k, metric)
    assert vals.shape == (q, k) and idx.shape == (q, k) and idx.dtype == torch.int64
    torch.testing.assert_close(vals.double(), ref_vals, atol=1e-5, rtol=1e-5)
    # the returned indices really are at those distances (robust to float near-ties) ...
    if metric == "sqeuclidean":
        at_idx = ((queries[:, None, :].double() - train[idx].double()) ** 2).sum(-1)
        assert torch.all(vals[:, 1:] >= vals[:, :-1])
    else:
        qn = torch.nn.functional.normalize(queries.double(), dim=1)
        tn = torch.nn.functional.normalize(train.double(), dim=1)
        at_idx = (qn[:, None, :] * tn[idx]).sum(-1)
        assert torch.all(vals[:, 1:] <= vals[:, :-1])
    torch.testing.assert_close(at_idx, ref_vals, atol=1e-5, rtol=1e-5)
    # ... and, for these seeds (no near-ties), exactly the brute-force ones
    assert torch.equal(idx, ref_idx)
    assert len(set(idx[0].tolist())) == k


@pytest.mark.parametrize("budget", [120, 480, 4000])  # train blocks of 2, 10 and all 25 rows
@pytest.mark.parametrize("metric", ["sqeuclidean", "cosine"])
def test_topk_ties_resolved_by_lower_index(metric: str, budget: int) -> None:
    g = torch.Generator().manual_seed(0)

    def rows(m: int) -> torch.Tensor:
        if metric == "sqeuclidean":  # small integers: squared distances are exact in float32
            return torch.randint(0, 8, (m, 12), generator=g).float() + 1.0
        # exactly four equal non-zero entries: normalised rows are exactly 0.5, similarities multiples of 1/4
        keep = torch.rand(m, 12, generator=g).argsort(dim=1)[:, :4]
        scale = torch.randint(1, 5, (m, 1), generator=g).float()
        return torch.zeros(m, 12).scatter_(1, keep, 1.0) * scale

    base = rows(10)
    train = torch.cat([base, base, base[:3]])  # row j, j+10 (and j+20 for j<3) are duplicates
    queries = torch.cat([base[:6], rows(9)])
    assert peak_block_bytes(len(queries), len(train), 12, 3, budget) <= budget
    vals, idx = topk_neighbours(queries, train, 3, metric=metric, memory_budget_bytes=budget)
    _, ref_idx = _brute(queries, train, 3, metric)
    assert torch.equal(idx, ref_idx)
    if metric == "sqeuclidean":
        assert idx[0, 0] == 0 and idx[0, 1] == 10 and idx[0, 2] == 20
        assert torch.all(vals[:3, :3] == 0)


def test_topk_rejects_k_above_n() -> None:
    with pytest.raises(ValueError, match=r"k=5.*N=4"):
        topk_neighbours(torch.rand(3, 2), torch.rand(4, 2), 5)


def test_sizing_cifar_scale_under_budget() -> None:
    for budget in (2**30, 256 * 2**20):
        peak = peak_block_bytes(65_536, 50_000, 3072, 50, budget)
        assert 0 < peak <= budget
    plan = _plan(65_536, 50_000, 3072, 50, 2**30)
    assert plan.bq * plan.bn * 4 <= 2**30 and plan.bq >= 1000  # blocks are still big enough to be efficient


def _structured_train(n: int = 20) -> torch.Tensor:
    levels = torch.linspace(0.0, 1.0, n)
    return levels[:, None, None, None].expand(n, 3, 8, 8).clone()  # constant-colour images


def test_memorization_exact_copies_and_noise() -> None:
    train = _structured_train()
    g = torch.Generator().manual_seed(1)
    noise = torch.rand(6, 3, 8, 8, generator=g)
    generated = torch.cat([train[[3, 7, 11]], noise])
    rep = memorization_report(generated, train, memory_budget_bytes=4096)
    assert rep.num_samples == 9
    assert rep.memorized.tolist() == [True] * 3 + [False] * 6
    assert np.all(rep.l2_ratio[:3] == 0) and np.all(rep.nn_ratio[:3] == 0)
    assert rep.nn_index[:3].tolist() == [3, 7, 11]
    assert np.all(rep.l2_ratio[3:] > 0.9)  # noise is roughly equidistant from the nearest constant images
    assert rep.memorized_fraction == pytest.approx(3 / 9)
    assert rep.nn_ratio_fraction["0.2"] == pytest.approx(3 / 9)
    summary = rep.to_dict()
    json.dumps(summary)
    assert set(summary) == {"num_samples", "memorized_fraction", "nn_ratio_fraction"}


def test_memorization_hand_built_line() -> None:
    train_pts = np.array([0.0, 0.1, 0.5, 1.0])
    gen_pts = np.array([0.02, 0.3, 0.75, 0.45, 0.2])
    rep = memorization_report(torch.tensor(gen_pts)[:, None], torch.tensor(train_pts)[:, None], k=50)

    dist = np.sort(np.abs(gen_pts[:, None] - train_pts[None, :]), axis=1)  # L2 on a line, k clipped to N = 4
    l2_ratio = dist[:, 0] / dist[:, 1]
    nn_ratio = dist[:, 0] ** 2 / np.mean(dist**2, axis=1)
    np.testing.assert_allclose(rep.l2_ratio, l2_ratio, rtol=1e-5)
    np.testing.assert_allclose(rep.nn_ratio, nn_ratio, rtol=1e-5)
    assert rep.l2_ratio[0] == pytest.approx(0.25, rel=1e-5)  # 0.02 / 0.08
    assert rep.l2_ratio[1] == pytest.approx(1.0, rel=1e-5)  # midway between 0.1 and 0.5
    assert rep.memorized.tolist() == [True, False, False, True, False]  # 0.45: 0.05 / 0.35 < 1/3
    assert rep.memorized_fraction == pytest.approx(0.4)
    assert rep.nn_index.tolist() == [0, 1, 2, 2, 1]
    for th in (0.2, 0.3, 0.4, 0.5):
        assert rep.nn_ratio_fraction[str(th)] == pytest.approx(float(np.mean(nn_ratio < th)))
    assert len(set(rep.nn_ratio_fraction.values())) > 1  # the example discriminates between thresholds


def test_memorization_input_validation() -> None:
    train = _structured_train(4)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        memorization_report(train * 2 - 1, train)
    with pytest.raises(ValueError, match="at least 2"):
        memorization_report(train[:1], train[:1])


def test_copy_similarity_identical_and_orthogonal() -> None:
    gen = torch.tensor([[0.0, 5.0, 0.0, 0.0], [1.0, -1.0, 0.0, 0.0]])  # second is orthogonal to everything
    # features are L2-normalised inside, so gen row 0 equals train row 1 up to scale
    train_ext = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 3.0, 0.0, 0.0], [0.0, 0.0, 2.0, -2.0]])
    cs = copy_similarity(gen, train_ext, threshold=0.95, extractor="test")
    assert cs.max_similarity[0] == pytest.approx(1.0, abs=1e-6)
    assert cs.max_similarity[1] == pytest.approx(0.0, abs=1e-6)
    assert cs.nn_index[0] == 1
    assert cs.over_threshold == pytest.approx(0.5)
    assert cs.mean == pytest.approx(0.5, abs=1e-6)
    assert cs.to_dict()["extractor"] == "test"
    json.dumps(cs.to_dict())


def test_calibrate_threshold_separates() -> None:
    rng = np.random.default_rng(0)
    copies = rng.uniform(0.9, 1.0, 200)
    distinct = rng.uniform(0.2, 0.6, 500)
    cal = calibrate_threshold(copies, distinct)
    assert distinct.max() < cal["threshold"] <= copies.min()
    assert cal["tpr"] == 1.0 and cal["fpr"] == 0.0
    assert cal["n_copy"] == 200 and cal["n_distinct"] == 500
    assert cal["copy_mean"] > cal["distinct_mean"]
    overlap = calibrate_threshold(np.array([0.5, 0.7, 0.9]), np.array([0.1, 0.6, 0.8]))
    assert 0.0 < overlap["fpr"] < 1.0 or overlap["tpr"] < 1.0


def test_fid_self_shift_and_symmetry() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(2000, 8)) @ rng.normal(size=(8, 8))
    assert fid_from_features(a, a) < 1e-3
    assert fid_from_features(torch.tensor(a), a) < 1e-3

    shift = np.array([1.0, -2.0, 0.5, 0.0])
    x = rng.normal(size=(50_000, 4))
    y = rng.normal(size=(50_000, 4)) + shift
    fid = fid_from_features(x, y)
    assert fid == pytest.approx(float(shift @ shift), abs=0.05)
    assert fid_from_features(y, x) == pytest.approx(fid, rel=1e-9)

    mu, cov = feature_stats(x)
    assert mu.shape == (4,) and cov.shape == (4, 4) and cov.dtype == np.float64
    # analytic check with identity covariances: exactly the squared mean shift
    assert frechet_distance(np.zeros(4), np.eye(4), shift, np.eye(4)) == pytest.approx(float(shift @ shift))


def test_fid_singular_covariance_is_finite() -> None:
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(10, 32)), rng.normal(size=(10, 32))  # fewer samples than dims -> singular
    fid = fid_from_features(a, b)
    assert np.isfinite(fid) and fid >= 0
    with pytest.raises(ValueError, match="at least 2"):
        feature_stats(a[:1])


def test_fid_trace_matches_scipy_sqrtm_and_handles_fewer_samples_than_dims():
    import scipy.linalg

    from memshard.evaluation.metrics.fid import trace_sqrt_product

    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(200, 6)), rng.normal(size=(200, 6)) @ rng.normal(size=(6, 6))
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    assert abs(trace_sqrt_product(s1, s2) - np.trace(scipy.linalg.sqrtm(s1 @ s2)).real) < 1e-8
    few = fid_from_features(rng.normal(size=(8, 512)), rng.normal(size=(32, 512)) + 1.0)
    assert np.isfinite(few) and few > 0
