"""MSR planning: a pure function, so its guarantees are checked directly over many random cases."""

import math

import numpy as np
import pytest

from memshard.iet.msr import SkipLedger, plan_migrations, size_bounds
from memshard.iet.schedule import migrates_after


def _case(seed, n=60, k=4):
    rng = np.random.default_rng(seed)
    ids = np.sort(rng.choice(10_000, n, replace=False)).astype(np.int64)
    shards = rng.integers(0, k, n)
    shards[:k] = np.arange(k)  # no shard starts empty
    skips = rng.integers(0, 6, n) * (rng.random(n) < 0.6)
    ratio = rng.random(n)
    ratio[rng.random(n) < 0.1] = np.nan
    history = rng.integers(0, 5, (n, k))
    return ids, shards, skips, ratio, history


@pytest.mark.parametrize("policy", ["ring", "random_ring", "balanced"])
def test_plan_properties_over_random_cases(policy):
    for seed in range(60):
        ids, shards, skips, ratio, hist = _case(seed, n=40 + seed, k=2 + seed % 5)
        k = 2 + seed % 5
        tol = [0.0, 0.1, 0.5][seed % 3]
        new, plan = plan_migrations(
            ids, shards, skips, ratio, k, fraction=0.25, policy=policy, seed=seed, size_tolerance=tol,
            shard_skips=hist,
        )  # fmt: skip
        # conservation: same ids, each in exactly one valid shard, movers are exactly the changed rows
        assert new.shape == shards.shape and new.min() >= 0 and new.max() < k
        changed = ids[new != shards]
        assert sorted(changed.tolist()) == sorted(plan.ids.tolist())
        assert len(set(plan.ids.tolist())) == len(plan)
        assert (plan.from_shard != plan.to_shard).all()
        pos = np.searchsorted(ids, plan.ids)
        assert (shards[pos] == plan.from_shard).all() and (new[pos] == plan.to_shard).all()
        # sizes: within the band, or no worse than before; nobody emptied
        before = np.bincount(shards, minlength=k)
        after = np.bincount(new, minlength=k)
        lo, hi = size_bounds(before, tol)
        assert (after >= lo).all() and (after <= hi).all() and (after >= 1).all()
        # only skipped samples move, never more than ceil(fraction * candidates) per shard
        assert (skips[pos] >= 1).all()
        for s in range(k):
            cand = int(((shards == s) & (skips >= 1)).sum())
            assert (plan.from_shard == s).sum() <= math.ceil(0.25 * cand)
        # determinism
        again, plan2 = plan_migrations(
            ids, shards, skips, ratio, k, fraction=0.25, policy=policy, seed=seed, size_tolerance=tol,
            shard_skips=hist,
        )  # fmt: skip
        assert np.array_equal(again, new) and np.array_equal(plan2.ids, plan.ids)


def test_top_skipped_are_chosen_with_ratio_then_id_tiebreaks():
    ids = np.arange(10, dtype=np.int64)
    shards = np.array([0] * 8 + [1] * 2)
    skips = np.array([5, 9, 9, 1, 0, 3, 9, 2, 0, 0])
    ratio = np.array([0.1, 0.5, 0.2, 0.1, 0.1, 0.1, 0.2, 0.1, 0.1, 0.1])
    # shard 0 candidates: 1,2,6 (9 skips), 0 (5), 5 (3), 7 (2), 3 (1) -> 7; ceil(0.5*7)=4 move:
    # 9 skips sorted by ratio: 2 (0.2) and 6 (0.2, id tie -> 2 first), then 1 (0.5); then 0 (5 skips)
    new, plan = plan_migrations(ids, shards, skips, ratio, 2, fraction=0.5, policy="ring", seed=0, size_tolerance=10.0)
    assert plan.ids.tolist() == [2, 6, 1, 0] and plan.rank.tolist() == [0, 1, 2, 3]
    assert (plan.to_shard == 1).all() and new[[2, 6, 1, 0]].tolist() == [1, 1, 1, 1]


def test_ring_and_random_ring_destinations():
    n, k = 40, 4
    ids = np.arange(n, dtype=np.int64)
    shards = np.arange(n) % k
    skips = np.ones(n, dtype=np.int64)
    ratio = np.zeros(n)
    _, ring = plan_migrations(ids, shards, skips, ratio, k, fraction=0.3, policy="ring", seed=0, size_tolerance=1)
    assert ((ring.from_shard + 1) % k == ring.to_shard).all()
    dests = set()
    for seed in range(8):
        _, p = plan_migrations(ids, shards, skips, ratio, k, fraction=0.3, policy="random_ring", seed=seed,
                               size_tolerance=1)  # fmt: skip
        mapping = dict(zip(p.from_shard.tolist(), p.to_shard.tolist(), strict=False))
        assert sorted(mapping.values()) == list(range(k))  # a permutation: every shard receives
        assert all(a != b for a, b in mapping.items())
        dests.add(tuple(sorted(mapping.items())))
    assert len(dests) > 1  # the ring is reshuffled with the seed


def test_balanced_sends_to_least_skipped_shard():
    ids = np.arange(12, dtype=np.int64)
    shards = np.repeat([0, 1, 2], 4)
    skips = np.array([3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])
    history = np.zeros((12, 3), dtype=np.int64)
    history[0] = [3, 5, 1]  # id 0 was skipped least in shard 2
    new, plan = plan_migrations(ids, shards, skips, np.zeros(12), 3, fraction=1.0, policy="balanced", seed=0,
                                size_tolerance=0.5, shard_skips=history)  # fmt: skip
    assert plan.ids.tolist() == [0] and plan.to_shard.tolist() == [2] and new[0] == 2


def test_tight_tolerance_blocks_moves_that_unbalance():
    ids = np.arange(8, dtype=np.int64)
    shards = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    skips = np.array([4, 4, 4, 4, 0, 0, 0, 0])
    new, plan = plan_migrations(ids, shards, skips, np.zeros(8), 2, fraction=1.0, policy="ring", seed=0,
                                size_tolerance=0.0)  # fmt: skip
    assert len(plan) == 0 and np.array_equal(new, shards)
    new, plan = plan_migrations(ids, shards, skips, np.zeros(8), 2, fraction=1.0, policy="ring", seed=0,
                                size_tolerance=0.5)  # fmt: skip
    assert len(plan) == 2 and np.bincount(new).tolist() == [2, 6]


def test_bad_inputs_are_named():
    ids = np.arange(4, dtype=np.int64)
    with pytest.raises(ValueError, match="same length"):
        plan_migrations(ids, np.zeros(3), np.zeros(4), np.zeros(4), 2, fraction=0.5, policy="ring", seed=0,
                        size_tolerance=0.1)  # fmt: skip
    with pytest.raises(ValueError, match="shard_skips"):
        plan_migrations(ids, np.zeros(4, int), np.zeros(4), np.zeros(4), 2, fraction=0.5, policy="balanced",
                        seed=0, size_tolerance=0.1)  # fmt: skip
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        plan_migrations(ids, np.full(4, 3), np.zeros(4), np.zeros(4), 2, fraction=0.5, policy="ring", seed=0,
                        size_tolerance=0.1)  # fmt: skip


def test_schedule_and_ledger():
    assert [r for r in range(1, 9) if migrates_after(r, 8, 2)] == [2, 4, 6]
    assert [r for r in range(1, 5) if migrates_after(r, 4, 1)] == [1, 2, 3]
    ledger = SkipLedger(np.array([3, 5, 9]), 2)
    ledger.add_round(np.array([3, 5, 9]), np.array([0, 1, 0]), np.array([2, 1, 0]))
    ledger.add_round(np.array([3, 5, 9]), np.array([1, 1, 0]), np.array([1, 0, 4]))
    assert ledger.since_move.tolist() == [3, 1, 4] and ledger.by_shard.tolist() == [[2, 1], [0, 1], [4, 0]]
    ledger.reset(np.array([9]))
    assert ledger.since_move.tolist() == [3, 1, 0] and ledger.by_shard[2].tolist() == [4, 0]
    back = SkipLedger.from_columns(ledger.to_columns(), 2)
    assert np.array_equal(back.by_shard, ledger.by_shard) and np.array_equal(back.since_move, ledger.since_move)
    with pytest.raises(ValueError, match="not in the run"):
        ledger.add_round(np.array([4]), np.array([0]), np.array([1]))


def test_count_shard_is_the_authors_rule_and_moves_even_unskipped_samples():
    # two shards of 8; in shard 0 only id 3 was skipped (twice), in shard 1 ids 9 and 12
    ids = np.arange(16, dtype=np.int64)
    shards = np.repeat([0, 1], 8)
    skips = np.zeros(16, np.int64)
    skips[3], skips[9], skips[12] = 2, 1, 3
    ratio = np.linspace(0.9, 0.1, 16)  # lower ratio ranks first among equal skip counts
    common = dict(fraction=0.25, policy="ring", seed=0, size_tolerance=1.0)
    _, ours = plan_migrations(ids, shards, skips, ratio, 2, **common)
    # skipped: ceil(0.25 x candidates) = ceil(0.25) = 1 from shard 0 (id 3), ceil(0.5) = 1 from shard 1 (id 12)
    assert ours.ids.tolist() == [3, 12]
    _, theirs = plan_migrations(ids, shards, skips, ratio, 2, count="shard", **common)
    # shard: int(0.25 x 8) = 2 per shard, by skips then ratio: shard 0 -> 3, then 7 (lowest ratio, 0 skips);
    # shard 1 -> 12, 9
    assert theirs.ids.tolist() == [3, 7, 12, 9] and theirs.skips.tolist() == [2, 0, 3, 1]
    with pytest.raises(ValueError, match="unknown migration count"):
        plan_migrations(ids, shards, skips, ratio, 2, count="all", **common)


def test_reset_all_zeroes_every_counter_movers_only_the_movers():
    from memshard.config import load_config
    from memshard.runtime.coordinator import migrate

    ids = np.arange(8, dtype=np.int64)
    shards = np.repeat([0, 1], 4)
    stats = {"id": ids, "mean_ratio": np.linspace(0.2, 0.9, 8)}
    for reset, kept in (("movers", True), ("all", False)):
        msr = load_config("iet-agc-plus", [f"msr.reset={reset}", "msr.size_tolerance=1.0"]).msr
        ledger = SkipLedger(ids, 2)
        ledger.add_round(ids, shards, np.array([3, 0, 1, 0, 2, 0, 0, 1]))
        _, plan = migrate(ledger, ids, shards, stats, msr, 2, seed=0)
        assert len(plan) and (ledger.since_move[np.searchsorted(ids, plan.ids)] == 0).all()
        others = np.setdiff1d(ids, plan.ids)
        assert bool(ledger.since_move[others].any()) is kept  # id 2 or 7 (skipped, not moved) keeps its count
        assert ledger.by_shard.sum() == 7  # the per-shard history is never reset
