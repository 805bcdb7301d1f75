"""The early-stopping frontier and privacy at matched quality: definitions on hand-made checkpoints, outputs."""

from __future__ import annotations

import csv
import json
import math

import pytest
from PIL import Image

from memshard.evaluation.frontier import CSV_COLUMNS, FrontierError, build, matched_table, verdict, write_outputs
from memshard.evaluation.metrics.frontier import (
    Checkpoint,
    at_matched_quality,
    checkpoint_from_metrics,
    clear_difference,
    early_stopping,
    frontier_score,
    matched_quality,
)


def cp(arm: str, steps: int, mem: float, fid: float, n: int = 0, **kw) -> Checkpoint:
    return Checkpoint(
        arm=arm,
        round=steps // 100,
        steps=steps,
        wall_s=steps / 10,
        memorized_fraction=mem,
        fid=fid,
        copy_p95=0.9,
        dup_copy_share=kw.get("dup", mem),
        singleton_copy_share=kw.get("single", 0.0),
        duplicated_copied=kw.get("dup_copied", 0),
        duplicated_images=10,
        num_samples=n,
    )


# plain training: quality improves and copying grows with steps
BASE = [cp("baseline", 100, 0.00, 90.0), cp("baseline", 200, 0.02, 40.0), cp("baseline", 300, 0.10, 24.0),
        cp("baseline", 400, 0.25, 20.0), cp("baseline", 500, 0.30, 21.0)]  # fmt: skip


def test_early_stopping_frontier_is_the_lowest_memorization_at_that_quality_or_better():
    assert early_stopping(BASE, 100.0) == 0.0
    assert early_stopping(BASE, 40.0) == 0.02  # 200 steps is the earliest as good as FID 40
    assert early_stopping(BASE, 39.9) == 0.10
    assert early_stopping(BASE, 21.0) == 0.25  # 400 steps (0.25) beats 500 steps (0.30) at FID <= 21
    assert early_stopping(BASE, 19.0) is None  # no checkpoint is that good


def test_matched_quality_and_an_arm_below_the_frontier():
    q = matched_quality(BASE)
    assert q == pytest.approx(1.05 * 20.0)
    arm = [cp("iet", 400, 0.0, 60.0), cp("iet", 800, 0.05, 22.0), cp("iet", 1200, 0.08, 20.5)]
    m = at_matched_quality(arm, BASE, q)
    assert m["reached"] and m["fid"] == 20.5 and m["memorized_fraction"] == 0.08 and m["steps"] == 1200
    assert m["wall_s"] == 120.0 and m["early_stopping_memorized"] == 0.25
    assert m["vs_early_stopping"] == pytest.approx(0.08 - 0.25)
    assert m["best_fid"] == 20.5 and m["checkpoints"] == 3 and m["max_steps"] == 1200


def test_ties_at_matched_quality_go_to_the_fewest_steps():
    arm = [cp("a", 300, 0.1, 20.9), cp("a", 600, 0.1, 20.0), cp("a", 900, 0.2, 19.0)]
    m = at_matched_quality(arm, BASE, 21.0)
    assert m["steps"] == 300 and m["memorized_fraction"] == 0.1


def test_an_arm_that_never_reaches_matched_quality_says_so_with_its_best_fid():
    arm = [cp("x", 500, 0.0, 95.0), cp("x", 1000, 0.0, 60.0), cp("x", 2000, 0.01, 61.0)]
    m = at_matched_quality(arm, BASE, matched_quality(BASE))
    assert not m["reached"] and m["fid"] == 60.0 and m["steps"] == 1000 and m["best_fid"] == 60.0
    assert m["vs_early_stopping"] is None and m["early_stopping_memorized"] == 0.25


def test_checkpoint_from_metrics_reads_evaluate_output():
    m = {
        "round": 3,
        "train_steps": 1200,
        "train_wall_s": 33.5,
        "memorized_fraction": 0.125,
        "fid": 30.0,
        "fid_distinct": 31.0,
        "copy_similarity": {"p95": 0.97},
        "nn_ratio_fraction": {"0.3": 0.5},
        "duplicates": {
            "dup_copy_share": 0.1,
            "singleton_copy_share": 0.025,
            "duplicated_copied": 4,
            "duplicated_images": 10,
            "singletons_copied": 2,
        },
    }
    c = checkpoint_from_metrics("iet", m)
    assert (c.round, c.steps, c.wall_s, c.copy_p95, c.dup_copy_share, c.duplicated_copied) == (
        3, 1200, 33.5, 0.97, 0.1, 4,
    )  # fmt: skip
    assert c.fid_distinct == 31.0 and c.nn_ratio_03 == 0.5


def test_build_writes_csv_matched_json_and_plot(tmp_path):
    points = {
        "baseline": BASE,
        "iet-agc": [cp("iet-agc", 400, 0.0, 80.0), cp("iet-agc", 800, 0.04, 21.0)],
        "iet": [cp("iet", 400, 0.0, 85.0), cp("iet", 800, 0.0, 50.0)],
    }
    result = build(points, "baseline")
    assert result["matched_fid"] == pytest.approx(21.0)
    assert result["baseline_checkpoints"] == 5 and result["coarse"]  # fewer than 8 baseline checkpoints
    write_outputs(result, str(tmp_path))
    with open(tmp_path / "frontier.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert tuple(rows[0]) == CSV_COLUMNS and len(rows) == 9
    agc = [r for r in rows if r["arm"] == "iet-agc"]
    assert [int(r["steps"]) for r in agc] == [400, 800]
    assert float(agc[1]["early_stopping_memorized"]) == 0.25  # E(21.0) on the baseline
    assert agc[0]["early_stopping_memorized"] == "0.02"  # E(80): 200 steps (FID 40) is the earliest that good
    matched = json.loads((tmp_path / "matched.json").read_text())
    assert set(matched) == {"baseline", "iet-agc", "iet"}
    for a in matched.values():
        assert {"reached", "fid", "memorized_fraction", "early_stopping_memorized", "steps", "wall_s"} <= set(a)
    assert matched["iet-agc"]["reached"] and matched["iet-agc"]["memorized_fraction"] == 0.04
    assert not matched["iet"]["reached"] and matched["iet"]["fid"] == 50.0
    assert matched["baseline"]["memorized_fraction"] == matched["baseline"]["early_stopping_memorized"] == 0.25
    img = Image.open(tmp_path / "frontier.png")
    assert img.size[0] >= 800 and img.size[1] >= 500
    text = matched_table(result)
    assert "| iet | not reached |" in text and "| iet-agc | reached | 4.0% | 25.0% | -21.0 pts |" in text
    assert math.isclose(result["baseline_best_fid"], 20.0)


def test_build_needs_the_baseline():
    with pytest.raises(FrontierError, match="baseline arm 'baseline' has no evaluated checkpoint"):
        build({"iet": [cp("iet", 100, 0.0, 50.0)]}, "baseline")


@pytest.mark.ray
def test_frontier_command_on_real_runs(ray_cluster, tmp_path, monkeypatch, capsys):
    from memshard.cli import main as cli
    from memshard.config import load_config
    from memshard.runtime.driver import train
    from tests.conftest import TINY

    monkeypatch.setenv("MEMSHARD_CACHE", str(tmp_path / "cache"))
    runs = {}
    for name, extra in (
        ("plain", ["method=baseline", "shards.count=1", "train.steps_per_round=6", "resources.cpus_per_shard=1"]),
        ("agc", []),
        ("other-data", ["data.limit=40"]),
    ):
        runs[name] = str(tmp_path / name)
        train(load_config("demo", [*TINY, "train.rounds=2", *extra]), out=runs[name])
    ev = ["--num", "4", "--steps", "2", "--fid-reference", "16", "--calibration-images", "8", "--name", "fr"]
    out = tmp_path / "fr"
    assert cli(["frontier", runs["plain"], runs["agc"], "--out", str(out), *ev]) == 0
    printed = capsys.readouterr().out
    assert "| baseline | reached |" in printed and "| iet-agc |" in printed
    with open(out / "frontier.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["arm"], r["round"], r["steps"]) for r in rows] == [
        ("baseline", "1", "6"), ("baseline", "2", "12"), ("iet-agc", "1", "6"), ("iet-agc", "2", "12"),
    ]  # fmt: skip
    matched = json.loads((out / "matched.json").read_text())
    assert set(matched) == {"baseline", "iet-agc"} and matched["baseline"]["reached"]
    assert (out / "frontier.png").exists() and (
        tmp_path / "agc" / "eval" / "fr" / "round-0002" / "metrics.json"
    ).exists()
    # a second call reuses every evaluation
    stamp = (tmp_path / "agc" / "eval" / "fr" / "round-0002" / "metrics.json").stat().st_mtime
    assert cli(["frontier", runs["plain"], runs["agc"], "--out", str(out), "--names", "plain,agc", *ev]) == 0
    assert (tmp_path / "agc" / "eval" / "fr" / "round-0002" / "metrics.json").stat().st_mtime == stamp
    assert set(json.loads((out / "matched.json").read_text())) == {"plain", "agc"}
    capsys.readouterr()
    # runs on different images, or two arms of one name, are refused with a message that says so
    assert cli(["frontier", runs["plain"], runs["other-data"], "--out", str(tmp_path / "x"), *ev]) == 2
    assert "trained on different images" in capsys.readouterr().err
    assert cli(["frontier", runs["plain"], runs["agc"], runs["agc"], "--out", str(tmp_path / "y"), *ev]) == 2
    assert "--names" in capsys.readouterr().err


def test_a_gap_within_sampling_noise_is_not_called_a_win():
    # 5 vs 6 copies in 64 generations is noise; 20 vs 58 in 256 is not
    assert clear_difference(5 / 64, 64, 6 / 64, 64) is False
    assert clear_difference(20 / 256, 256, 58 / 256, 256) is True
    assert clear_difference(0.1, 0, 0.2, 100) is None and clear_difference(0.0, 100, 0.0, 100) is False
    base = [cp("baseline", 100, 0.0, 60.0, n=64), cp("baseline", 200, 6 / 64, 35.0, n=64)]
    close = {"baseline": base, "agc": [cp("agc", 300, 5 / 64, 36.0, n=64)]}
    r = build(close, "baseline")
    assert r["matched"]["agc"]["clear_difference"] is False
    assert "not measurably different" in verdict(r, "agc") and "(noise)" in matched_table(r)
    far = {"baseline": [cp("baseline", 200, 58 / 256, 35.0, n=256)], "agc": [cp("agc", 300, 20 / 256, 36.0, n=256)]}
    r = build(far, "baseline")
    assert r["matched"]["agc"]["clear_difference"] is True
    assert verdict(r, "agc").startswith("**agc copies less than plain training stopped early at matched quality**")
    worse = {"baseline": [cp("baseline", 200, 20 / 256, 35.0, n=256)], "iet": [cp("iet", 300, 58 / 256, 36.0, n=256)]}
    assert "is no better than plain training stopped early" in verdict(build(worse, "baseline"), "iet")
    never = {"baseline": base, "x": [cp("x", 400, 0.0, 80.0, n=64)]}
    text = verdict(build(never, "baseline"), "x")
    assert "does not reach plain training's quality" in text and "best FID 80.0" in text
    # below plain training at its (worse) FID, but by one generation in 128: noise, said so, not a win
    short = {
        "baseline": [cp("baseline", 100, 8 / 128, 42.0, n=128), cp("baseline", 200, 13 / 128, 37.0, n=128)],
        "agc": [cp("agc", 250, 7 / 128, 41.8, n=128)],
    }
    r = build(short, "baseline")
    # compared at its own FID (41.8: plain training's 42.0 checkpoint is not that good, its 37.0 one is)
    assert r["matched"]["agc"]["early_stopping_at_fid"] == 13 / 128
    assert r["matched"]["agc"]["clear_difference_at_fid"] is False
    text = verdict(r, "agc")
    assert "within the sampling noise of 128 generations" in text and "copies less" not in text
    clear = {
        "baseline": [cp("baseline", 100, 40 / 256, 42.0, n=256), cp("baseline", 200, 60 / 256, 37.0, n=256)],
        "agc": [cp("agc", 250, 5 / 256, 41.8, n=256)],
    }
    assert "copies less than plain training at equal FID" in verdict(build(clear, "baseline"), "agc")


def test_frontier_score_orders_what_a_sweep_should_prefer():
    """Reaching Q and copying less beats reaching Q and copying more beats never reaching Q."""
    base = [cp("b", 100, 0.0, 40.0), cp("b", 200, 0.10, 22.0), cp("b", 300, 0.30, 20.0)]
    q = matched_quality(base)  # 21.0: only the last baseline checkpoint is that good, E(Q) = 0.30
    good = frontier_score([cp("t", 100, 0.0, 50.0), cp("t", 200, 0.06, 20.5), cp("t", 300, 0.12, 19.0)], base, q)
    assert good["reached"] and good["matched_memorized"] == 0.06 and good["early_stopping"] == 0.30
    assert good["frontier"] == pytest.approx(0.06 - 0.30) and good["vs_early_stopping_rel"] == pytest.approx(-0.8)
    assert good["round_chosen"] == 2 and good["fid"] == 20.5
    worse = frontier_score([cp("t", 300, 0.40, 20.0)], base, q)
    assert worse["frontier"] == pytest.approx(0.10) and worse["reached"]
    short = frontier_score([cp("t", 300, 0.0, 25.2)], base, q)  # copies nothing, but 20% short of Q
    far = frontier_score([cp("t", 300, 0.0, 42.0)], base, q)
    assert not short["reached"] and short["matched_memorized"] is None and short["vs_early_stopping_rel"] is None
    assert short["frontier"] == pytest.approx(1.2) and far["frontier"] == pytest.approx(2.0)
    assert good["frontier"] < worse["frontier"] < short["frontier"] < far["frontier"]
    assert frontier_score([cp("t", 300, 0.0, math.nan)], base, q)["frontier"] == math.inf
