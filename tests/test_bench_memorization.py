"""The memorization benchmark job, end to end at toy size, including a budget-stopped first call."""

import json

import pytest

from tests.conftest import load_job


def _job():
    return load_job("bench_memorization")


def test_arms_are_like_for_like():
    job = _job()
    size = job.SIZES["cpu"]
    cfgs = {k: job.method_config(size, m, None, [], 7) for k, m in job.METHODS.items()}
    total = {k: c.shards.count * c.train.steps_per_round * c.train.rounds for k, c in cfgs.items()}
    assert len(set(total.values())) == 1, total  # same optimizer steps in every arm
    assert len({c.train.batch_size for c in cfgs.values()}) == 1  # hence the same images seen
    assert {c.seed for c in cfgs.values()} == {7}
    assert cfgs["baseline"].shards.count == 1 and not cfgs["baseline"].agc.enabled
    assert cfgs["iet"].shards.count == size.shards and not cfgs["iet"].agc.enabled
    assert cfgs["iet-agc"].agc.enabled and cfgs["agc"].agc.enabled and cfgs["agc"].shards.count == 1
    plus = cfgs["iet-agc-plus"]
    assert plus.msr.enabled and plus.taa.enabled and plus.agc.decide_before_backward and not cfgs["iet-agc"].msr.enabled
    # the resources of a run are split over its proxies, so every arm asks for the same machine
    for c in cfgs.values():
        assert c.shards.count * c.resources.cpus_per_shard == pytest.approx(size.cpus)
    gpu = job.method_config(job.SIZES["gpu"], job.METHODS["iet"], "/data/c.parquet", [], 0)
    assert gpu.data.path == "/data/c.parquet" and gpu.data.image_size == 32 and gpu.model.preset == "small"
    # a config the user breaks through --set is refused before anything runs
    with pytest.raises(Exception, match=r"train\.batch_size"):
        job.method_config(size, job.METHODS["iet"], None, ["train.batch_size=0"], 0)


def test_unknown_method_is_refused(capsys):
    with pytest.raises(SystemExit) as e:
        _job().main(["--methods", "baseline,nope"])
    assert e.value.code == 2 and "nope" in capsys.readouterr().err


@pytest.mark.ray
def test_benchmark_end_to_end_resumes_after_budget(ray_cluster, tmp_path):
    job = _job()
    out = tmp_path / "bench"
    argv = [
        "--size", "cpu", "--out", str(out), "--methods", "baseline,iet-agc", "--steps", "3", "--num", "8",
        "--eval-steps", "2", "--set", "data.limit=24", "--set", "train.rounds=2", "--set", "train.batch_size=8",
        "--set", "train.warmup_steps=1", "--curve", "baseline",
    ]  # fmt: skip
    # a zero budget stops the first call before any round: exit 3, nothing evaluated, run resumable
    assert job.main([*argv, "--time-budget-s", "0"]) == job.INCOMPLETE_EXIT
    assert (out / "baseline" / "run.json").exists() and not (out / "results.md").exists()
    assert json.loads((out / "baseline" / "run.json").read_text())["rounds_completed"] == 0

    assert job.main(argv) == 0
    rows = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in rows] == ["baseline", "iet-agc"]
    base, iet = (r["analysis"] for r in rows)
    assert base["steps"] == iet["steps"] == 2 * 4 * 3 and base["images_seen"] == iet["images_seen"] == 24 * 8
    assert base["skip_rate"] == 0.0  # no AGC in the baseline, so nothing skipped
    assert rows[1]["metrics"]["num_samples"] == 8
    # --curve baseline: the round-1 checkpoint evaluated as well (12 of the 24 steps)
    assert [(p["round"], p["steps"]) for p in rows[0]["curve"]] == [(1, 12)] and "curve" not in rows[1]
    early = json.loads((out / "baseline" / "eval" / "bench-r1" / "metrics.json").read_text())
    assert early["round"] == 1 and rows[0]["metrics"]["round"] == 2
    text = (out / "results.md").read_text()
    assert "| plain training | 1 | 12 |" in text
    assert "| plain training |" in text and "| IET-AGC |" in text and "target >= 50%" in text
    assert (out / "bench.png").stat().st_size > 10_000

    # a third call finds everything done and evaluates nothing again
    mtime = (out / "iet-agc" / "eval" / "bench" / "metrics.json").stat().st_mtime
    assert job.main(argv) == 0
    assert (out / "iet-agc" / "eval" / "bench" / "metrics.json").stat().st_mtime == mtime
