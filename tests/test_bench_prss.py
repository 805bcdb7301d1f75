"""The PRSS benchmark job, end to end at toy size (every code path; the numbers mean nothing here)."""

import json

import pytest

from tests.conftest import load_job


def _job():
    return load_job("bench_prss")


def test_data_split_is_disjoint_and_duplicated(real_emoji, tmp_path):
    import pyarrow.parquet as pq

    job = _job()
    size = job.SIZES["toy"]
    split = job.build_data(size, str(tmp_path))
    mem, single, held = (set(split[k]) for k in ("memorized", "single", "heldout"))
    assert len(mem) == size.num_memorized and len(single) == size.num_single and len(held) == size.num_heldout
    assert not (mem & single or mem & held or single & held)
    train = pq.read_table(split["train"])
    caps = train.column("caption").to_pylist()
    assert train.num_rows == size.num_memorized * size.duplicates + size.num_single
    assert sorted(train.column("id").to_pylist()) == list(range(train.num_rows))
    counts = {c: caps.count(c) for c in set(caps)}
    assert sorted(counts.values()).count(size.duplicates) == size.num_memorized
    src_caps = pq.read_table(split["source"]).column("caption").to_pylist()
    assert not {src_caps[i] for i in held} & set(caps)  # held-out captions never trained on
    assert job.build_data(size, str(tmp_path)) == split  # resumable: the split is kept


def test_size_set_overrides_typed_fields_and_refuses_unknown_ones():
    import argparse

    job = _job()
    ns = argparse.Namespace(train_steps=None, sample_steps=None, size_set=["caption_dropout=0.3", "preset=tiny"])
    size = job.with_overrides(job.SIZES["cpu"], ns)
    assert size.caption_dropout == 0.3 and size.preset == "tiny"
    assert size.train_steps == job.SIZES["cpu"].train_steps
    for bad in (["max_text_length=3"], ["caption_dropout"], ["train_steps=many"]):
        with pytest.raises(SystemExit):
            job.with_overrides(job.SIZES["cpu"], argparse.Namespace(train_steps=None, sample_steps=None, size_set=bad))


def test_a_calibration_run_cannot_reuse_data_of_another_shape(real_emoji, tmp_path):
    job = _job()
    job.build_data(job.SIZES["toy"], str(tmp_path))
    other = job.Size(**{**job.SIZES["toy"].__dict__, "duplicates": 5})
    with pytest.raises(SystemExit, match="another --out"):
        job.build_data(other, str(tmp_path))


@pytest.mark.ray
def test_bench_prss_toy_end_to_end(real_emoji, ray_cluster, tmp_path):
    job = _job()
    # a call whose budget is spent after the first training round stops with exit 3 and keeps that round
    assert job.main(["--size", "toy", "--out", str(tmp_path), "--time-budget-s", "0.01"]) == job.INCOMPLETE_EXIT
    assert not (tmp_path / "summary.json").exists()
    assert job.main(["--size", "toy", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "summary.json").read_text())
    assert res["guidance_scale"] == job.SIZES["toy"].guidance_scale
    names = [r["name"] for r in res["methods"]]
    assert names[0] == "none" and len(names) == len(set(names))
    methods = {r["method"] for r in res["methods"]}
    assert {"random_token", "gaussian_noise", "wen", "pr", "ss", "prss", "prss-perturb", "prss-list"} <= methods
    for r in res["methods"]:  # the contract of summary.json: these keys for every method and level
        for key in ("copy_mean", "copy_p95", "memorized_fraction", "alignment", "time_ratio", "triggered", "level"):
            assert key in r, (r["name"], key)
    prss = [r for r in res["methods"] if r["method"] == "prss"]
    assert [r["level"] for r in prss] == list(job.DEFEND_LEVELS)
    # defending a larger share of memorized prompts = lower thresholds = at least as many triggered
    lss = [lv["lambda_ss"] for lv in res["levels"]]
    assert lss == sorted(lss, reverse=True)
    assert [r["triggered"] for r in prss] == sorted(r["triggered"] for r in prss)
    assert res["methods"][0]["triggered"] == 0.0 and res["methods"][0]["time_ratio"] == 1.0
    assert res["untriggered"]["untriggered_equal"] is True
    for n in ("1", "4"):
        assert 0.0 <= res["detection"][n]["auc"] <= 1.0 and 0.0 <= res["detection"][n]["tpr_at_1pct_fpr"] <= 1.0
    assert [r["guidance_scale"] for r in res["regime"]] == list(job.REGIME_SCALES)
    assert len(res["calibration"]["per_step"]["memorized"]["p50"]) == job.SIZES["toy"].sample_steps
    assert {"plain + none", "IET-AGC+ + none"} <= set(res["combined"])
    assert "time" in res["targets"]
    md = (tmp_path / "results.md").read_text()
    assert "| prss | 0.9 |" in md and "Detection" in md and "Combined system" in md and "Regime" in md
    for f in ("prss.png", "memorized_prompts.png", "regime.png"):
        assert (tmp_path / f).stat().st_size > 1000
    # a second call reuses every cached stage and writes the same methods table
    assert job.main(["--size", "toy", "--out", str(tmp_path)]) == 0
    again = json.loads((tmp_path / "summary.json").read_text())
    assert [(r["name"], r["copy_mean"]) for r in again["methods"]] == [
        (r["name"], r["copy_mean"]) for r in prss and res["methods"]
    ]
