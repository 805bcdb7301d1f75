"""The memorization benchmark job: arm configs, the train-until-matched-quality schedule, end to end at toy size."""

import json
import os

import pyarrow.parquet as pq
import pytest

from tests.conftest import load_job


def _job():
    return load_job("bench_memorization")


def test_arms_share_data_seed_batch_and_the_checkpoint_budget():
    job = _job()
    for name, size in job.SIZES.items():
        cfgs = {k: job.method_config(size, m, "/d.parquet", [], 7) for k, m in job.METHODS.items()}
        per_round = {k: c.shards.count * c.train.steps_per_round for k, c in cfgs.items()}
        equal = {k: size.equal_rounds(m.sharded) for k, m in job.METHODS.items()}
        # every arm reaches the baseline's total steps in a whole number of rounds ...
        assert {per_round[k] * equal[k] for k in cfgs} == {size.base_total}, name
        # ... and may train up to 4x that; the baseline never trains past its own budget
        assert cfgs["baseline"].train.rounds == size.base_rounds >= 8
        for k in ("agc", "iet", "iet-agc", "iet-agc-plus"):
            assert cfgs[k].train.rounds * per_round[k] == 4 * size.base_total
        assert len({c.train.batch_size for c in cfgs.values()}) == 1 and {c.seed for c in cfgs.values()} == {7}
        assert {c.data.path for c in cfgs.values()} == {"/d.parquet"} and all(
            c.data.source is None for c in cfgs.values()
        )
        for c in cfgs.values():  # the resources of a run are split over its proxies: the same machine for every arm
            assert c.shards.count * c.resources.cpus_per_shard == pytest.approx(size.cpus)
        assert cfgs["baseline"].shards.count == 1 and not cfgs["baseline"].agc.enabled
        assert cfgs["agc"].agc.enabled and cfgs["agc"].shards.count == 1
        assert cfgs["iet"].shards.count == size.shards and not cfgs["iet"].agc.enabled
        plus = cfgs["iet-agc-plus"]
        assert plus.msr.enabled and plus.taa.enabled and not cfgs["iet-agc"].msr.enabled
    dup = job.SIZES["dup"].duplicates
    assert dup is not None and dup.groups * dup.copies <= job.SIZES["dup"].distinct
    assert job.SIZES["gpu-dup"].duplicates is not None and job.SIZES["gpu-dup"].source == "cifar"
    with pytest.raises(Exception, match=r"train\.batch_size"):  # a broken --set is refused before anything runs
        job.method_config(job.SIZES["cpu"], job.METHODS["iet"], None, ["train.batch_size=0"], 0)


def test_an_arms_schedule_follows_its_own_round_length():
    job = _job()
    size = job.SIZES["dup"]  # plain training: 2,400 steps; sharded rounds 4 x 300; evaluate every 1,200 past it
    plus = job.METHODS["iet-agc-plus"]
    assert job.schedule(size, job.method_config(size, plus, None, [], 0)) == (2, 1)
    short = job.method_config(size, plus, None, ["train.steps_per_round=60", "train.rounds=40"], 0)
    assert job.schedule(size, short) == (10, 5)  # 4 x 60 = 240 steps a round, the size's own shard_steps=60
    assert job.schedule(size, job.method_config(size, job.METHODS["baseline"], None, [], 0)) == (10, 5)


def test_next_action_trains_to_equal_steps_then_on_until_matched_quality():
    from memshard.evaluation.frontier import next_action as act

    # nothing yet: train to the baseline's steps (4 rounds), then evaluate them all
    assert act({}, 0, 20.0, equal=4, cap=16, every=2) == ("train", [4])
    assert act({}, 4, 20.0, 4, 16, 2) == ("evaluate", [1, 2, 3, 4])
    assert act({1: 90, 2: 50}, 4, 20.0, 4, 16, 2) == ("evaluate", [3, 4])
    # the baseline stops at its own budget
    assert act({1: 90, 2: 50, 3: 30, 4: 25}, 4, None, 4, 16, 2) == ("done", [])
    # reached quality within the baseline's steps: done
    assert act({1: 90, 2: 50, 3: 19, 4: 25}, 4, 20.0, 4, 16, 2) == ("done", [])
    # not reached: two more rounds, evaluate the newest, and so on
    far = {1: 90, 2: 50, 3: 30, 4: 25}
    assert act(far, 4, 20.0, 4, 16, 2) == ("train", [6])
    assert act(far, 6, 20.0, 4, 16, 2) == ("evaluate", [6])
    assert act({**far, 6: 22}, 6, 20.0, 4, 16, 2) == ("train", [8])
    # round 8 reaches it: round 7, skipped, is evaluated to find the first round at quality
    assert act({**far, 6: 22, 8: 19}, 8, 20.0, 4, 16, 2) == ("evaluate", [7])
    assert act({**far, 6: 22, 7: 21, 8: 19}, 8, 20.0, 4, 16, 2) == ("done", [])
    assert act({**far, 6: 22, 7: 19.5, 8: 19}, 8, 20.0, 4, 16, 2) == ("done", [])
    # the cap ends it, reached or not (cap not a multiple of `every`: the last step is shorter)
    assert act({**far, 6: 22, 8: 21}, 8, 20.0, 4, 9, 2) == ("train", [9])
    assert act({**far, 6: 22, 8: 21, 9: 20.5}, 9, 20.0, 4, 9, 2) == ("done", [])


def test_bad_arguments_are_refused(capsys):
    job = _job()
    with pytest.raises(SystemExit) as e:
        job.main(["--methods", "baseline,nope"])
    assert e.value.code == 2 and "nope" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        job.main(["--methods", "iet"])
    assert e.value.code == 2 and "must include baseline" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        job.main(["--size-set", "nonsense=3"])
    assert e.value.code == 2 and "not a size field" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        job.main(["--arm-set", "nope:train.lr=0.1"])
    assert e.value.code == 2 and "ARM:KEY=VALUE" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # a round length that cannot reach the baseline's steps exactly
        job.main(["--methods", "baseline,iet", "--arm-set", "iet:train.steps_per_round=70"])
    assert e.value.code == 2 and "not a whole number of rounds" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # shorter rounds without more of them stop before the baseline's steps
        job.main(["--methods", "baseline,iet", "--arm-set", "iet:train.steps_per_round=60"])
    assert e.value.code == 2 and "set train.rounds too" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        job.main(["--tag", "../up"])
    assert e.value.code == 2 and "--tag" in capsys.readouterr().err


@pytest.mark.ray
def test_benchmark_end_to_end_on_duplicated_data_resumes_after_budget(ray_cluster, tmp_path, monkeypatch):
    monkeypatch.setenv("MEMSHARD_CACHE", str(tmp_path / "cache"))
    job = _job()
    out = tmp_path / "bench"
    argv = [
        "--size", "dup", "--out", str(out), "--methods", "baseline,iet-agc", "--num", "8", "--eval-steps", "2",
        "--max-factor", "2",
        "--size-set", "distinct=24", "--size-set", "duplicates=2:5", "--size-set", "base_rounds=2",
        "--size-set", "base_steps=4", "--size-set", "shards=2", "--size-set", "shard_steps=2",
        "--size-set", "calibration_images=16", "--size-set", "extend_steps=0",
        "--set", "train.batch_size=8", "--set", "train.warmup_steps=1",
    ]  # fmt: skip
    # a zero budget stops the first call before any round: exit 3, nothing evaluated, resumable
    assert job.main([*argv, "--time-budget-s", "0"]) == job.INCOMPLETE_EXIT
    assert not (out / "summary.json").exists()

    assert job.main(argv) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["data"] == {
        "source": "digits", "rows": 32, "distinct": 24, "duplicated_images": 2, "duplicated_rows": 10,
        "duplicates": {"groups": 2, "copies": 5},
    }  # fmt: skip
    assert set(s["matched"]) == {"baseline", "iet-agc"}
    for m in s["matched"].values():
        assert {"reached", "fid", "memorized_fraction", "early_stopping_memorized", "steps", "wall_s"} <= set(m)
    base, agc = s["arms"]["baseline"], s["arms"]["iet-agc"]
    assert base["rounds_trained"] == 2 and base["equal_rounds"] == 2
    # iet-agc: 2 shards x 2 steps a round, so 2 rounds match the baseline's 8 steps; it may train to 4
    assert agc["equal_rounds"] == 2 and agc["cap_rounds"] == 4 and 2 <= agc["rounds_trained"] <= 4
    assert s["matched"]["baseline"]["memorized_fraction"] == s["matched"]["baseline"]["early_stopping_memorized"]
    assert agc["analysis"]["split"] == "duplicated vs singletons" and agc["analysis"]["in"]["rows"] == 10
    assert base["analysis"]["skip_rate"] == 0.0 and s["eval"]["dedupe"] == "exact"
    rows = (out / "frontier" / "frontier.csv").read_text().splitlines()
    assert rows[0].startswith("arm,round,steps,wall_s,memorized_fraction,fid") and "dup_copy_share" in rows[0]
    assert sum(r.startswith("baseline,") for r in rows) == 2
    assert (out / "frontier" / "frontier.png").stat().st_size > 10_000
    assert (out / "frontier-most-copied.png").stat().st_size > 100
    assert json.loads((out / "frontier" / "matched.json").read_text()) == s["matched"]
    text = (out / "results.md").read_text()
    assert "| plain training | reached |" in text and "E(Q)" in text and "](frontier.png)" in text
    # the secondary view: the same checkpoints scored by FID against one copy of each distinct image
    fd, rows_all = s["frontier_distinct"], s["frontier"]["rows"]
    base_distinct = [r["fid_distinct"] for r in rows_all if r["arm"] == "baseline"]
    assert fd["matched_fid"] == pytest.approx(1.05 * min(base_distinct)) and set(fd["matched"]) == set(s["matched"])
    assert min(base_distinct) != s["frontier"]["baseline_best_fid"] and "on the distinct images" in text
    same = job.Checkpoint("baseline", 1, 1, 0.0, 0.1, 30.0, 0.9, 0.0, 0.1, fid_distinct=30.0)
    assert job.frontier_on_distinct({"baseline": [same]}) is None  # no duplicates: nothing to add
    # per-round evaluations map duplicate groups back to all their ids
    per = pq.read_table(out / "iet-agc" / "eval" / "bench" / "round-0001" / "per_sample.parquet").to_pandas()
    assert len(per) == 32 and sorted(per["copies"].unique().tolist()) == [1, 5] and (per["copies"] == 5).sum() == 10
    for _, g in per[per["copies"] == 5].groupby("group_id"):
        assert g["nn_count"].nunique() == 1 and len(g) == 5

    # BENCHMARKS.md's block for this result is rendered from the summary alone
    md = load_job("benchmarks_md")
    results = tmp_path / "results"
    results.mkdir()
    (results / "bench-memorization-dup.json").write_text((out / "summary.json").read_text())
    begin, end = "<!-- BEGIN generated: bench-memorization-dup -->", "<!-- END generated: bench-memorization-dup -->"
    page = f"intro\n{begin}\nstale\n{end}\nend\n"
    new, names = md.regenerate(page, str(results))
    assert names == ["bench-memorization-dup"] and "stale" not in new and new.startswith("intro\n")
    assert "| plain training | reached |" in new and new.endswith(
        "<!-- END generated: bench-memorization-dup -->\nend\n"
    )

    # a further call finds everything done and evaluates nothing again
    metrics = out / "baseline" / "eval" / "bench" / "round-0001" / "metrics.json"
    mtime = os.stat(metrics).st_mtime
    assert job.main(argv) == 0
    assert os.stat(metrics).st_mtime == mtime


def test_benchmarks_md_is_generated_from_the_committed_results():
    """Every published memorization figure comes from docs/results/*.json: the page is up to date with them."""
    assert load_job("benchmarks_md").main(["--check"]) == 0


def test_keep_published_reuses_arms_only_when_the_baseline_reproduces():
    """--keep-published: an arm measured earlier is kept only under the same conditions, never silently."""
    from memshard.evaluation.metrics.frontier import Checkpoint

    bench = _job()
    published = json.load(open(bench.published_path("dup")))
    rows = published["frontier"]["rows"]
    fields = set(Checkpoint.__dataclass_fields__)
    base = [Checkpoint(**{k: v for k, v in r.items() if k in fields}) for r in rows if r["arm"] == "baseline"]
    same = dict.fromkeys(bench.METHODS, True)
    size = published["size_config"]
    kept = bench.kept_arms(published, ["baseline", "iet-agc-plus"], same, base, size)
    assert sorted(kept) == ["agc", "iet", "iet-agc"]
    assert [p.fid for p in kept["agc"]] == [r["fid"] for r in rows if r["arm"] == "agc"]
    # a baseline that differs in one figure: nothing is kept
    moved = [*base[:-1], Checkpoint(**{**base[-1].to_dict(), "memorized_fraction": base[-1].memorized_fraction + 0.01})]
    with pytest.raises(bench.KeepError, match="does not reproduce"):
        bench.kept_arms(published, ["baseline", "iet-agc-plus"], same, moved, size)

    # FIDs a hair apart (thread scheduling in the Inception sums) are the same run; 0.5% apart are not
    def fid_times(f):
        return [Checkpoint(**{**p.to_dict(), "fid": p.fid * f}) for p in base]

    assert bench.kept_arms(published, ["baseline", "iet-agc-plus"], same, fid_times(1.0003), size).keys() == kept.keys()
    with pytest.raises(bench.KeepError, match=r"FID more than 0\.1% apart"):
        bench.kept_arms(published, ["baseline", "iet-agc-plus"], same, fid_times(1.005), size)
    # an override that changes a kept arm's config: refused, naming the arm
    with pytest.raises(bench.KeepError, match="arm agc"):
        bench.kept_arms(published, ["baseline", "iet-agc-plus"], {**same, "agc": False}, base, size)
    # --size-set shard_steps=60 changes every sharded arm's schedule: nothing is kept
    with pytest.raises(bench.KeepError, match="shard_steps"):
        bench.kept_arms(published, ["baseline", "iet-agc-plus"], same, base, {**size, "shard_steps": 60})
    # the size as this call builds it (a dataclass, tuples and all) equals the published one
    import dataclasses

    mine = {k: v for k, v in dataclasses.asdict(bench.SIZES["dup"]).items() if k != "notes"}
    assert bench.kept_arms(published, ["baseline", "iet-agc-plus"], same, base, mine).keys() == kept.keys()


def test_a_tagged_result_is_published_beside_the_main_one(tmp_path, monkeypatch):
    job = _job()
    out = tmp_path / "out"
    out.mkdir()
    for name, data in (("summary.json", b"{}"), ("frontier.png", b"p"), ("frontier-most-copied.png", b"m")):
        (out / name).write_bytes(data)
    monkeypatch.setattr(job, "RESULTS_DIR", str(tmp_path / "results"))
    js, png = job.publish(str(out), "dup", 0, "r60lr")
    assert os.path.basename(js) == "bench-memorization-dup-r60lr.json" and png.endswith("-dup-r60lr.png")
    assert (tmp_path / "results" / "bench-memorization-dup-r60lr-most-copied.png").read_bytes() == b"m"
    assert not (tmp_path / "results" / "bench-memorization-dup.json").exists()  # the main result is untouched
    # BENCHMARKS.md renders a tagged block with the benchmark's own renderer
    assert load_job("benchmarks_md").renderer("bench-memorization-dup-r60lr").__name__ == "render"
