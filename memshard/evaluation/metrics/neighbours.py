"""Exact, memory-bounded k-nearest-neighbour search over a training set.

Memorization metrics compare every generation with *every* training image (65,536 x 50,000 at 3072 dims for
CIFAR-10 scale), so the full distance matrix (~13 GB) can never be materialised. The search is blocked over the
training set (outer loop, so a CPU-resident train set is moved to the device once) and over the queries (inner
loop), keeping a running, sorted top-k per query that is merged block by block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["peak_block_bytes", "topk_neighbours"]

_F32 = 4
_I64 = 8


@dataclass(frozen=True)
class _Plan:
    """Block sizes and the bytes of every temporary the search allocates per block."""

    bq: int
    bn: int
    kk: int
    allocations: dict[str, int]

    @property
    def peak(self) -> int:
        return max(self.allocations.values())


def _allocations(bq: int, bn: int, d: int, k: int) -> dict[str, int]:
    kk = min(k, bn)
    return {
        "query_block": bq * d * _F32,  # dtype/device conversion or L2 normalisation of a query block
        "train_block": bn * d * _F32,  # train block moved to the device / normalised
        "distance_block": bq * bn * _F32,  # q @ t.T, then turned into distances in place
        "tie_mask": bq * bn,  # bool mask used to detect ties at the top-k boundary
        "tie_sort_indices": bq * bn * _I64,  # worst case; the tie path chunks rows so this stays <= budget
        "block_topk": bq * kk * (_F32 + _I64),
        "merge": bq * (k + kk) * _I64,  # concatenated candidate indices of running top-k + block top-k
    }


def _plan(q: int, n: int, d: int, k: int, memory_budget_bytes: int) -> _Plan:
    """Choose (query block bq, train block bn).

    Rule: bn = min(N, budget // (4 D), max(1, budget // 8 - k)) - as many train rows as fit as one float32 block
    (the last term only binds for tiny budgets, leaving room for the merge buffer);
    bq = min(Q, budget // (4 D), budget // (4 bn), budget // (8 (k + min(k, bn)))) - as many queries as keep the
    float32 (bq, bn) distance block, the query block and the merge buffer under the budget. The tie-fixing path
    sorts rows in chunks of max(1, budget // (8 bn)) rows, so its int64 index tensor also stays under the budget.
    The largest single temporary allocation is therefore <= budget (the (Q, k) result itself is not counted).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got k={k}")
    if k > n:
        raise ValueError(f"k={k} exceeds the number of training rows N={n}")
    if q < 1 or d < 1:
        raise ValueError(f"need at least one query row and one feature dimension, got Q={q}, D={d}")
    b = int(memory_budget_bytes)
    bn = min(n, b // (_F32 * d), max(1, b // _I64 - k))
    if bn < 1:
        raise ValueError(f"memory_budget_bytes={b} cannot hold a single train row of D={d} float32 values")
    bq = min(q, b // (_F32 * d), b // (_F32 * bn), b // (_I64 * (k + min(k, bn))))
    if bq < 1:
        raise ValueError(f"memory_budget_bytes={b} too small for k={k} (needs >= {_I64 * (k + min(k, bn))})")
    allocs = _allocations(bq, bn, d, k)
    # the tie path sorts chunk rows at a time, never a whole block
    allocs["tie_sort_indices"] = min(bq, max(1, b // (_I64 * bn))) * bn * _I64
    return _Plan(bq=bq, bn=bn, kk=min(k, bn), allocations=allocs)


def peak_block_bytes(q: int, n: int, d: int, k: int, memory_budget_bytes: int) -> int:
    """The largest temporary allocation topk_neighbours will make for these sizes (for tests / sizing)."""
    return _plan(q, n, d, k, memory_budget_bytes).peak


def _lexsort_rows(vals: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort each row by (value, index): torch.topk gives no order among equal values."""
    o = idx.argsort(dim=1)
    vals, idx = vals.gather(1, o), idx.gather(1, o)
    vals, o = vals.sort(dim=1, stable=True)
    return vals, idx.gather(1, o)


def _block_select(dist: torch.Tensor, kk: int, budget: int) -> tuple[torch.Tensor, torch.Tensor]:
    """k smallest per row of a distance block, ties at the cut resolved towards lower column index.

    torch.topk is exact on values but picks arbitrarily among values equal to the k-th one. Rows where such a tie
    straddles the cut (rare with real data, routine with duplicated images) are redone with a stable sort.
    """
    vals, idx = torch.topk(dist, kk, dim=1, largest=False, sorted=True)
    kth = vals[:, -1:]
    n_le = (dist <= kth).sum(dim=1)
    amb = (n_le > kk).nonzero().squeeze(1)
    if amb.numel():
        chunk = max(1, budget // (_I64 * dist.shape[1]))
        for s in range(0, amb.numel(), chunk):
            rows = amb[s : s + chunk]
            sv, si = torch.sort(dist[rows], dim=1, stable=True)
            vals[rows] = sv[:, :kk]
            idx[rows] = si[:, :kk]
            del sv, si
    return _lexsort_rows(vals, idx)


def topk_neighbours(
    queries: torch.Tensor,
    train: torch.Tensor,
    k: int,
    metric: str = "sqeuclidean",
    memory_budget_bytes: int = 256 * 2**20,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact k nearest training rows for every query row.

    queries (Q, D), train (N, D), float. metric "sqeuclidean" returns (squared distances (Q, k) ascending,
    indices (Q, k) int64); metric "cosine" L2-normalises both inside and returns (similarities (Q, k) descending,
    indices). Ties are broken by the lower training index. k > N raises ValueError.

    Block-size rule (see ``_plan``): bn = min(N, budget // (4 D), max(1, budget // 8 - k)) train rows per block and
    bq = min(Q, budget // (4 D), budget // (4 bn), budget // (8 (k + min(k, bn)))) queries per block, so the largest
    single temporary - the float32 (bq, bn) distance block, a converted (bq|bn, D) block, or the int64 merge
    buffer - is <= memory_budget_bytes; ``peak_block_bytes`` reports it. Squared distances use
    ||q||^2 + ||t||^2 - 2 q.t in float32, clamped at 0 (cancellation makes them accurate to ~1e-6 relative to the
    norms, not to the distance; callers needing exact zeros for copies should refine the few winners).

    Runs on ``device`` (default: the queries' device); train blocks are moved there one at a time, so a
    CPU-resident train set works with a GPU. Results live on that device.
    """
    if metric not in ("sqeuclidean", "cosine"):
        raise ValueError(f"unknown metric {metric!r}; expected 'sqeuclidean' or 'cosine'")
    if queries.ndim != 2 or train.ndim != 2 or queries.shape[1] != train.shape[1]:
        raise ValueError(f"need queries (Q, D) and train (N, D); got {tuple(queries.shape)} and {tuple(train.shape)}")
    q_count, d = queries.shape
    n = train.shape[0]
    plan = _plan(q_count, n, d, k, memory_budget_bytes)
    dev = torch.device(device) if device is not None else queries.device
    cosine = metric == "cosine"

    def prep(x: torch.Tensor) -> torch.Tensor:
        x = x.to(device=dev, dtype=torch.float32)
        return F.normalize(x, dim=1) if cosine else x

    q_sq = None
    if not cosine:  # (Q,) norms once; tiny compared with any block
        q_sq = torch.empty(q_count, dtype=torch.float32, device=dev)
        for s in range(0, q_count, plan.bq):
            qb = prep(queries[s : s + plan.bq])
            q_sq[s : s + plan.bq] = (qb * qb).sum(dim=1)

    best_v = torch.full((q_count, k), float("inf"), dtype=torch.float32, device=dev)
    best_i = torch.full((q_count, k), -1, dtype=torch.int64, device=dev)
    for t0 in range(0, n, plan.bn):
        tb = prep(train[t0 : t0 + plan.bn])
        t_sq = None if cosine else (tb * tb).sum(dim=1)
        kk = min(k, tb.shape[0])
        for s in range(0, q_count, plan.bq):
            qb = prep(queries[s : s + plan.bq])
            dist = qb @ tb.T
            if cosine:
                dist.neg_()  # ascending "distance" = -similarity
            else:
                dist.mul_(-2.0).add_(q_sq[s : s + plan.bq, None]).add_(t_sq[None, :]).clamp_(min=0.0)
            bv, bi = _block_select(dist, kk, memory_budget_bytes)
            del dist
            # running entries all have lower indices than this block, and both are (value, index)-sorted,
            # so a stable sort by value yields the (value, index) order.
            cv = torch.cat([best_v[s : s + plan.bq], bv], dim=1)
            ci = torch.cat([best_i[s : s + plan.bq], bi + t0], dim=1)
            cv, o = cv.sort(dim=1, stable=True)
            best_v[s : s + plan.bq] = cv[:, :k]
            best_i[s : s + plan.bq] = ci.gather(1, o[:, :k])
        del tb
    if cosine:
        best_v = best_v.neg_().clamp_(-1.0, 1.0)
    return best_v, best_i
