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


@pytest.mark.ray
def test_bench_prss_toy_end_to_end(real_emoji, ray_cluster, tmp_path):
    job = _job()
    assert job.main(["--size", "toy", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    names = [r["method"] for r in res["methods"]]
    assert names[:6] == ["none", "random_token", "gaussian_noise", "wen", "pr", "ss"]
    assert [r["method"] for r in res["methods"][6:]] == [f"prss q={q}" for q in job.LEVELS]
    # lower quantile = lower thresholds = at least as many prompts triggered
    lss = [lv["lambda_ss"] for lv in res["levels"]]
    assert lss == sorted(lss, reverse=True)
    trig = [r["triggered"] for r in res["methods"][6:]]
    assert trig == sorted(trig)
    assert res["methods"][0]["triggered"] == 0.0  # undefended never triggers
    assert res["untriggered"]["untriggered_equal"] is True
    for d in res["detection"].values():
        assert 0.0 <= d["auc_vs_heldout"] <= 1.0
    assert set(res["combined"] or {}) == {"plain + none", "IET-AGC+ + none", "IET-AGC+ + PRSS"}
    md = (tmp_path / "results.md").read_text()
    assert "| prss q=0.9 |" in md and "Detection" in md and "Combined system" in md
    for f in ("prss.png", "memorized_prompts.png"):
        assert (tmp_path / f).stat().st_size > 1000
