"""Aggregation (size-weighted average) and split policies."""

import numpy as np
import pytest
import torch

from memshard.iet.aggregate import StreamingAverage, shard_weights, weighted_average
from memshard.iet.split import shard_sizes, split, split_random, split_stratified


def test_weighted_average_matches_hand_computation():
    a = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor(3.0)}
    b = {"w": torch.tensor([4.0, 8.0]), "b": torch.tensor(0.0)}
    out = weighted_average([a, b], shard_weights([1, 3]))
    # 0.25*a + 0.75*b
    assert torch.allclose(out["w"], torch.tensor([3.25, 6.5]))
    assert torch.allclose(out["b"], torch.tensor(0.75))


def test_unnormalised_weights_are_normalised():
    a, b = {"x": torch.tensor([0.0])}, {"x": torch.tensor([10.0])}
    assert weighted_average([a, b], [2.0, 2.0])["x"].item() == 5.0


def test_half_precision_accumulates_in_fp32_and_keeps_dtype():
    # 1000 small bf16 proxies: summing in bf16 would drift; fp32 accumulation must not.
    states = [{"x": torch.full((4,), 1.0 + 1e-2 * (i % 2), dtype=torch.bfloat16)} for i in range(1000)]
    out = weighted_average(states, [1.0] * 1000)
    assert out["x"].dtype == torch.bfloat16
    expected = torch.tensor(1.0 + 0.5 * float(torch.tensor(1.01, dtype=torch.bfloat16) - 1.0))
    assert torch.allclose(out["x"].float(), expected.expand(4), atol=4e-3)


def test_integer_buffers_are_kept_not_averaged():
    a = {"n": torch.tensor(5), "w": torch.tensor(1.0)}
    b = {"n": torch.tensor(5), "w": torch.tensor(3.0)}
    out = weighted_average([a, b], [1, 1])
    assert out["n"].dtype == torch.int64 and out["n"].item() == 5


def test_mismatched_states_are_rejected():
    avg = StreamingAverage()
    avg.add({"w": torch.zeros(2)}, 1.0)
    with pytest.raises(ValueError, match="keys"):
        avg.add({"v": torch.zeros(2)}, 1.0)
    with pytest.raises(ValueError, match="shape"):
        avg.add({"w": torch.zeros(3)}, 1.0)


def test_all_empty_shards_error():
    with pytest.raises(ValueError, match="empty"):
        shard_weights([0, 0])


def test_random_split_is_seeded_near_equal_and_complete():
    ids = np.arange(103, dtype=np.int64)
    a = split_random(ids, 4, seed=1)
    assert np.array_equal(a, split_random(ids, 4, seed=1))
    assert not np.array_equal(a, split_random(ids, 4, seed=2))
    sizes = shard_sizes(a, 4)
    assert sum(sizes) == 103 and max(sizes) - min(sizes) <= 1


def test_stratified_split_balances_classes():
    ids = np.arange(200)
    labels = np.repeat(np.arange(4), [80, 60, 40, 20])
    a = split_stratified(ids, labels, 5, seed=0)
    sizes = shard_sizes(a, 5)
    assert max(sizes) - min(sizes) <= 1
    for c in range(4):
        per = np.bincount(a[labels == c], minlength=5)
        assert per.max() - per.min() <= 1


def test_split_errors_are_clear():
    with pytest.raises(ValueError, match="more than"):
        split(np.arange(3), 4, "random", 0)
    with pytest.raises(ValueError, match="label"):
        split(np.arange(10), 2, "stratified", 0, labels=None)
