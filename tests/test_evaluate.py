"""`memshard evaluate` end to end on a tiny run on local Ray."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from memshard.config import load_config
from memshard.evaluation.evaluate import EvalOptions, evaluate, summary_lines
from memshard.io.rundir import RunDir
from memshard.runtime.driver import train
from tests.conftest import TINY

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def tiny_run(ray_cluster, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("eval") / "run")
    train(load_config("demo", [*TINY, "train.rounds=2", "model.class_conditional=true"]), out=out)
    return out


def test_evaluate_writes_metrics_grids_and_per_sample(tiny_run):
    opts = EvalOptions(num=8, steps=3, fid_reference=32, calibration_images=16, classifier_epochs=1, batch_size=4)
    m = evaluate(tiny_run, opts)
    base = f"{tiny_run}/eval/default"
    on_disk = json.loads(open(f"{base}/metrics.json").read())
    assert on_disk["num_samples"] == 8 and on_disk["fid_num_samples"] == 8
    for key in ("memorized_fraction", "nn_ratio_fraction", "copy_similarity", "fid"):
        assert key in on_disk
    assert set(on_disk["nn_ratio_fraction"]) == {"0.2", "0.3", "0.4", "0.5"}
    cs = on_disk["copy_similarity"]
    assert {"mean", "p95", "over_threshold", "threshold", "extractor"} <= set(cs)
    assert "inception" in cs["extractor"] and -1 <= cs["mean"] <= 1
    assert on_disk["copy_calibration"]["n_copy"] == 16
    assert np.isfinite(on_disk["fid"]) and on_disk["fid"] >= 0
    assert 0 <= on_disk["class_alignment"]["accuracy"] <= 1
    assert Image.open(f"{base}/samples.png").size[0] > 0
    labelled = Image.open(f"{base}/most_copied.png")
    assert labelled.size[0] > 0 and labelled.mode == "RGB"  # a labelled figure (pairs with titles), not a bare grid
    table = pq.read_table(f"{base}/per_sample.parquet").to_pandas()
    assert len(table) == 48 and table["nn_count"].sum() == 8
    assert table["memorized_nn_count"].sum() == round(m["memorized_fraction"] * 8)
    stats_visits = sum(RunDir(tiny_run).read_stats(r).to_pandas()["visits"].sum() for r in (1, 2))
    assert table["visits"].sum() == stats_visits and (table["migrations"] == 0).all()
    assert any("memorized fraction" in line for line in summary_lines(m))


def test_generation_is_independent_of_the_split(tiny_run):
    from memshard.evaluation.evaluate import generate

    labels = np.arange(6) % 10
    a = generate(tiny_run, 6, 2, "ema", 3, labels, batch_size=6)
    b = generate(tiny_run, 6, 2, "ema", 3, labels, batch_size=2)
    assert a.shape == (6, 16, 16, 1) and np.array_equal(a, b)


def _figures(m: dict) -> dict:
    """Every figure of today's metrics.json (before the reference/duplicates/settings keys existed)."""
    keep = ("num_samples", "memorized_fraction", "nn_ratio_fraction", "copy_similarity", "copy_calibration", "fid")
    return {k: m[k] for k in keep} | {"class_alignment": m["class_alignment"]["accuracy"]}


def test_no_duplicates_gives_bit_equal_figures_with_and_without_dedupe(tiny_run, tmp_path, monkeypatch):
    monkeypatch.setenv("MEMSHARD_CACHE", str(tmp_path / "cache"))
    base = dict(num=8, steps=3, fid_reference=32, calibration_images=16, classifier_epochs=1, batch_size=4)
    none = evaluate(tiny_run, EvalOptions(**base, name="none", dedupe="none"))
    exact = evaluate(tiny_run, EvalOptions(**base, name="exact", dedupe="exact"))
    assert exact["reference"]["distinct"] == exact["reference"]["images"] == 48
    assert json.dumps(_figures(none)) == json.dumps(_figures(exact))  # bit-equal floats
    assert exact["fid_distinct"] == exact["fid"] and exact["duplicates"]["duplicated_images"] == 0
    # the reference features were computed once and reused from the content cache the second time
    assert len(list((tmp_path / "cache" / "features").glob("features-*.safetensors"))) == 1


def test_rounds_are_evaluated_with_the_same_generations_and_reused(tiny_run, tmp_path, monkeypatch):
    from memshard.cli import main as cli
    from memshard.evaluation.evaluate import evaluate_rounds

    monkeypatch.setenv("MEMSHARD_CACHE", str(tmp_path / "cache"))
    opts = EvalOptions(num=6, steps=2, fid_reference=16, calibration_images=8, classifier_epochs=1, name="per-round")
    got = evaluate_rounds(tiny_run, opts, "all")
    assert sorted(got) == [1, 2]
    for r in got:
        on_disk = json.loads(open(f"{tiny_run}/eval/per-round/round-000{r}/metrics.json").read())
        assert on_disk["round"] == r and on_disk["eval"] == opts.settings()
        assert {"images", "distinct", "dedupe", "fingerprint"} <= set(on_disk["reference"])
    assert got[1]["train_steps"] == 6 and got[2]["train_steps"] == 12 and got[2]["train_wall_s"] > 0
    # the same settings again: nothing is re-evaluated; other settings: the round is redone
    path = f"{tiny_run}/eval/per-round/round-0001/metrics.json"
    before = open(path).read()
    assert evaluate_rounds(tiny_run, opts, [1])[1] == got[1] and open(path).read() == before
    redone = evaluate_rounds(tiny_run, EvalOptions(**{**opts.__dict__, "num": 4}), "1")
    assert redone[1]["num_samples"] == 4
    with pytest.raises(FileNotFoundError, match="round 3 is not committed"):
        evaluate_rounds(tiny_run, opts, "1,3")
    # the CLI refuses --round together with --rounds before any work
    assert cli(["evaluate", tiny_run, "--round", "1", "--rounds", "all"]) == 2
