"""Neighbour metrics over distinct reference images (memshard.evaluation.metrics.dedupe)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from memshard.data.prepare import _Rows, duplicate_rows, parse_duplicate
from memshard.evaluation.metrics import memorization_report
from memshard.evaluation.metrics.dedupe import copies_by_multiplicity, group_reference, pairwise_rms


def _distinct_images(n: int, seed: int = 0, size: int = 16) -> torch.Tensor:
    """n clearly different images in [0, 1]: random blobs, far apart in pixel space."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, size, size, generator=g)


def _with_copies(distinct: torch.Tensor, which: int, copies: int) -> torch.Tensor:
    """The set with image ``which`` stored ``copies`` times (copies spread through the set, not adjacent)."""
    rows = list(distinct)
    for k in range(copies - 1):
        rows.insert((7 * k + 3) % len(rows), distinct[which])
    return torch.stack(rows)


def test_planted_near_copy_of_an_image_stored_20_times_is_memorized():
    distinct = _distinct_images(60)
    train = _with_copies(distinct, which=5, copies=20)
    g = torch.Generator().manual_seed(1)
    near_copy = (distinct[5] + 0.02 * torch.randn(distinct[5].shape, generator=g)).clamp(0, 1)[None]

    # today's behaviour (every row a neighbour): NN2 is the same image again, ratio ~1, never counted
    undeduped = memorization_report(near_copy, train)
    assert not undeduped.memorized[0] and undeduped.l2_ratio[0] > 0.9

    groups = group_reference(train, "exact")
    assert groups.num_images == 79 and groups.num_distinct == 60 and groups.sizes.max() == 20
    rep = memorization_report(near_copy, train[torch.from_numpy(groups.distinct)])
    assert rep.memorized[0] and rep.l2_ratio[0] < 1 / 3
    assert rep.nn_ratio[0] < 0.3  # the authors' d1 / mean(d1..d50), now over distinct images
    # the nearest distinct image maps back to the 20 rows of the duplicated image
    members = np.flatnonzero(groups.group == rep.nn_index[0])
    assert len(members) == 20 and all(torch.equal(train[m], distinct[5]) for m in members)


def test_generation_equidistant_from_two_distinct_images_is_not_memorized():
    a = torch.full((1, 8, 8), 0.25)
    b = torch.full((1, 8, 8), 0.75)
    others = (_distinct_images(10, seed=3, size=8) > 0.5).float()  # 0/1 patterns: 0.5 per pixel from the midpoint
    train = torch.cat([a[None], b[None], a[None], b[None], others])  # a and b each stored twice
    gen = torch.full((1, 1, 8, 8), 0.5)
    groups = group_reference(train, "exact")
    rep = memorization_report(gen, train[torch.from_numpy(groups.distinct)])
    assert rep.l2_ratio[0] == pytest.approx(1.0) and not rep.memorized[0]
    assert {int(groups.distinct[rep.nn_index[0]])} <= {0, 1}  # the nearest is a or b, the second the other


def test_no_duplicates_gives_bit_equal_results():
    train = _distinct_images(40, seed=5)
    gen = (train[:12] + 0.05 * torch.randn(12, 1, 16, 16, generator=torch.Generator().manual_seed(2))).clamp(0, 1)
    groups = group_reference((train * 255).round().to(torch.uint8).numpy(), "exact")
    assert not groups.has_duplicates and np.array_equal(groups.distinct, np.arange(40))
    a = memorization_report(gen, train)
    b = memorization_report(gen, train[torch.from_numpy(groups.distinct)])
    assert a.to_dict() == b.to_dict()
    for field in ("nn_index", "l2_ratio", "nn_ratio", "memorized"):
        assert np.array_equal(getattr(a, field), getattr(b, field))


def test_exact_near_and_none_grouping():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, size=(6, 1, 12, 12), dtype=np.uint8)
    # rows: 0..5 distinct; 6 = exact copy of 2; 7 = copy of 4 with +-2 grey levels (a re-encode); 8 = copy of 2
    jitter = np.clip(base[4].astype(int) + rng.integers(-2, 3, size=base[4].shape), 0, 255).astype(np.uint8)
    images = np.concatenate([base, base[2:3], jitter[None], base[2:3]])

    exact = group_reference(images, "exact")
    assert exact.group.tolist() == [0, 1, 2, 3, 4, 5, 2, 6, 2]
    assert exact.distinct.tolist() == [0, 1, 2, 3, 4, 5, 7] and exact.sizes.tolist() == [1, 1, 3, 1, 1, 1, 1]
    assert exact.to_dict()["duplicated_images"] == 1 and exact.to_dict()["duplicated_rows"] == 3

    assert pairwise_rms(images[7], images[4]) < 2 / 255 < 1 / 32
    near = group_reference(images, "near")  # default threshold 1/32 RMS
    assert near.group.tolist() == [0, 1, 2, 3, 4, 5, 2, 4, 2] and near.num_distinct == 6
    assert group_reference(images, "near", threshold=0.001).num_distinct == 7  # a tighter threshold splits them

    none = group_reference(images, "none")
    assert none.num_distinct == 9 and not none.has_duplicates

    with pytest.raises(ValueError, match="dedupe mode 'fuzzy' unknown"):
        group_reference(images, "fuzzy")


def test_copies_by_multiplicity_splits_memorized_generations():
    images = np.arange(5, dtype=np.uint8).reshape(5, 1, 1, 1).repeat(4, axis=2)
    images = np.concatenate([images, images[[1, 1, 3]]])  # image 1 stored 3 times, image 3 twice
    groups = group_reference(images, "exact")
    nn_group = np.array([1, 1, 3, 0, 2, 4, 1, 0])
    memorized = np.array([True, True, False, True, False, False, False, True])
    out = copies_by_multiplicity(groups, nn_group, memorized)
    assert out["duplicated_images"] == 2 and out["singletons"] == 3
    assert out["duplicated_copied"] == 1  # image 1; image 3 was nearest once but not memorized
    assert out["singletons_copied"] == 1  # image 0 (twice)
    assert out["dup_copy_share"] == pytest.approx(2 / 8) and out["singleton_copy_share"] == pytest.approx(2 / 8)
    assert out["dup_nearest_share"] == pytest.approx(4 / 8)


def test_duplicate_rows_adds_copies_with_new_ids():
    rows = _Rows(
        images=[bytes([i]) for i in range(10)],
        image_size=4,
        channels=1,
        labels=np.arange(10) % 3,
        captions=[f"c{i}" for i in range(10)],
    )
    out, chosen = duplicate_rows(rows, groups=3, copies=5, seed=1)
    assert len(out.images) == 10 + 3 * 4 and len(set(out.ids.tolist())) == len(out.ids)
    assert out.ids[:10].tolist() == list(range(10)) and out.ids[10:].min() == 10
    for i in chosen:
        assert out.images.count(rows.images[i]) == 5
        assert [c for c in out.captions if c == f"c{i}"] == [f"c{i}"] * 5
    assert np.array_equal(out.labels[10:], rows.labels[np.repeat(chosen, 4)])
    assert np.array_equal(duplicate_rows(rows, 3, 5, seed=1)[1], chosen)  # seeded
    with pytest.raises(ValueError, match="cannot duplicate 11 images"):
        duplicate_rows(rows, 11, 2)
    assert parse_duplicate("10:30") == (10, 30) and parse_duplicate("4x5") == (4, 5)
    with pytest.raises(ValueError, match="write D:M"):
        parse_duplicate("ten")


def test_prepare_duplicate_writes_a_duplicated_dataset(tmp_path, capsys):
    import pyarrow.parquet as pq

    from memshard.cli import main as cli
    from memshard.data import load_rows

    out = tmp_path / "dup.parquet"
    assert cli(["prepare", "digits", "--out", str(out), "--limit", "20", "--duplicate", "3:4"]) == 0
    assert "3 images stored 4 times" in capsys.readouterr().out
    ids = pq.read_table(out).column("id").to_numpy()
    assert len(ids) == 20 + 3 * 3 and len(set(ids.tolist())) == len(ids)
    _, images, labels = load_rows(str(out), ids, 16, 1)
    groups = group_reference(images, "exact")
    assert groups.num_distinct == 20 and sorted(groups.sizes.tolist())[-3:] == [4, 4, 4]
    for g in np.flatnonzero(groups.sizes == 4):  # every copy keeps its original's label
        assert len(set(labels[groups.group == g].tolist())) == 1
    assert cli(["prepare", "digits", "--out", str(tmp_path / "x.parquet"), "--duplicate", "three"]) == 2
    assert "write D:M" in capsys.readouterr().err
