"""Method vs plain training, like for like, compared at matched quality."""

import json

import pytest

from memshard.config import load_config
from memshard.evaluation.compare import baseline_of, compare
from memshard.evaluation.evaluate import EvalOptions
from tests.conftest import TINY


def test_baseline_has_same_total_steps_and_images():
    cfg = load_config("demo", ["train.steps_per_round=10", "shards.count=4", "resources.cpus_per_shard=0.25"])
    base = baseline_of(cfg, [450, 449, 449, 449])
    assert base.shards.count == 1 and base.agc.enabled is False
    assert base.train.steps_per_round == 40 and base.train.batch_size == cfg.train.batch_size
    assert base.train.rounds == cfg.train.rounds and base.seed == cfg.seed  # as many checkpoints as the method
    # epochs-based configs: the sum over the K shards' step counts
    cfg2 = load_config(
        "demo", ["train.steps_per_round=null", "train.epochs_per_round=1", "train.batch_size=100", "shards.count=4"]
    )
    assert baseline_of(cfg2, [450, 449, 449, 449]).train.steps_per_round == 5 * 3 + 5  # shards of 450,449,449,449


@pytest.mark.ray
def test_compare_evaluates_every_checkpoint_and_says_how_it_stands(ray_cluster, tmp_path, monkeypatch):
    monkeypatch.setenv("MEMSHARD_CACHE", str(tmp_path / "cache"))
    # the demo's preset on duplicated digits: data.limit distinct images, 3 of them stored 4 times
    cfg = load_config("demo-dup", [*TINY, "train.rounds=2", "train.steps_per_round=3", "data.duplicate=3x4"])
    opts = EvalOptions(num=4, steps=2, fid_reference=16, calibration_images=8)
    result = compare(cfg, str(tmp_path), opts, max_factor=2.0)
    assert set(result["matched"]) == {"baseline", "iet-agc"} and result["baseline_checkpoints"] == 2
    base_steps = [r["steps"] for r in result["rows"] if r["arm"] == "baseline"]
    agc = [r for r in result["rows"] if r["arm"] == "iet-agc"]
    assert base_steps == [6, 12] and [r["steps"] for r in agc][:2] == [6, 12]  # 2 shards x 3 steps a round in both
    # not at matched quality after the baseline's steps: trained on a round at a time, at most to 2x them,
    # and stopped at the first checkpoint that reached it
    q = result["matched_fid"]
    assert [r["round"] for r in agc] == list(range(1, len(agc) + 1)) and 2 <= len(agc) <= 4
    assert all(r["fid"] > q for r in agc[1:-1])
    assert len(agc) == 2 or agc[-1]["fid"] <= q or len(agc) == 4
    ref = json.loads((tmp_path / "method" / "eval" / "default" / "round-0001" / "metrics.json").read_text())[
        "reference"
    ]
    assert (ref["images"], ref["distinct"], ref["duplicated_images"], ref["duplicated_rows"]) == (57, 48, 3, 12)
    text = (tmp_path / "comparison.md").read_text()
    assert "| IET-AGC (K=2, r=2) |" in text and "plain training stopped early" in text and "**IET-AGC" in text
    assert json.loads((tmp_path / "frontier" / "matched.json").read_text()) == json.loads(json.dumps(result["matched"]))
    assert (tmp_path / "frontier" / "frontier.png").stat().st_size > 10_000
