"""Method vs plain training, like for like."""

import pytest

from memshard.compare import Row, baseline_of, compare, table
from memshard.config import load_config
from memshard.evaluate import EvalOptions
from tests.conftest import TINY


def test_baseline_has_same_total_steps_and_images():
    cfg = load_config("demo", ["train.steps_per_round=10", "shards.count=4", "resources.cpus_per_shard=0.25"])
    base = baseline_of(cfg, [450, 449, 449, 449])
    assert base.shards.count == 1 and base.agc.enabled is False
    assert base.train.steps_per_round == 40 and base.train.batch_size == cfg.train.batch_size
    assert base.train.rounds == cfg.train.rounds and base.seed == cfg.seed
    # epochs-based configs: the sum over the K shards' step counts
    cfg2 = load_config(
        "demo", ["train.steps_per_round=null", "train.epochs_per_round=1", "train.batch_size=100", "shards.count=4"]
    )
    assert baseline_of(cfg2, [450, 449, 449, 449]).train.steps_per_round == 5 * 3 + 5  # shards of 450,449,449,449


@pytest.mark.ray
def test_compare_end_to_end(ray_cluster, tmp_path):
    cfg = load_config("demo", [*TINY, "train.rounds=1"])
    rows = compare(cfg, str(tmp_path), EvalOptions(num=4, steps=2, fid_reference=16, calibration_images=8))
    assert [r.label for r in rows] == ["IET-AGC (K=2, r=2)", "plain training (baseline)"]
    text = (tmp_path / "comparison.md").read_text()
    assert text.count("\n|") >= 3 and "plain training" in text
    assert rows[1].metrics["num_samples"] == 4


def test_table_formats_figures():
    m = {
        "memorized_fraction": 0.25,
        "nn_ratio_fraction": {"0.3": 0.5},
        "copy_similarity": {"mean": 0.9, "p95": 0.95},
        "fid": 12.345,
        "num_samples": 8,
        "ddim_steps": 50,
        "fid_num_reference": 100,
        "fid_extractor": "x",
    }
    out = table([Row("a", "r", m, 3.0)])
    assert "| a | 25.0% | 50.0% | 0.900 | 0.950 | 12.35 | 3 |" in out
