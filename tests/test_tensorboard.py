"""TensorBoard curves under RUN/tb/: tags, steps = round ids, resume continuity, s3:// upload."""

import json
from pathlib import Path

import pytest

from memshard.config import load_config
from memshard.io.storage import Storage
from memshard.runtime.driver import train
from memshard.runtime.tensorboard import RoundLogger, read_scalars, round_scalars
from tests.conftest import TINY


def _summary(r: int, loss: float) -> dict:
    return {
        "round": r,
        "loss": loss,
        "skip_rate": 0.25,
        "images_per_s": 100.0,
        "round_s": 2.0,
        "migrated": 3,
        "migration_round": True,  # a bool is not a curve
        "mean_strength": 0.5,
        "shards": [{"shard": 0, "skip_rate": 0.5, "loss": 1.0}, {"shard": 1, "skip_rate": 0.0, "loss": 2.0}],
    }


def test_round_scalars_tags():
    tags = round_scalars(_summary(1, 0.3))
    assert tags == {
        "round/loss": 0.3,
        "round/skip_rate": 0.25,
        "round/images_per_s": 100.0,
        "round/round_s": 2.0,
        "round/migrated": 3.0,
        "round/aug_strength": 0.5,
        "shard_skip_rate/shard-000": 0.5,
        "shard_skip_rate/shard-001": 0.0,
        "shard_loss/shard-000": 1.0,
        "shard_loss/shard-001": 2.0,
    }


def test_resumed_session_purges_and_continues(tmp_path):
    run = str(tmp_path / "run")
    first = RoundLogger(run)
    for r in (1, 2, 3):
        first.log_round(_summary(r, 1.0 / r))
    first.close()
    # a driver that died after committing round 2 but logged round 3 of an uncommitted attempt
    second = RoundLogger(run, purge_step=2)
    second.log_round(_summary(2, 0.5))
    second.log_round(_summary(3, 0.125))
    second.close()
    assert len(list((tmp_path / "run" / "tb").iterdir())) == 2
    loss = read_scalars(run)["round/loss"]
    assert loss == [(1, 1.0), (2, 0.5), (3, 0.125)]


def test_corrupt_event_file_is_reported(tmp_path):
    run = str(tmp_path / "run")
    log = RoundLogger(run)
    log.log_round(_summary(1, 0.5))
    log.close()
    path = next((tmp_path / "run" / "tb").iterdir())
    data = bytearray(path.read_bytes())
    data[-6] ^= 0xFF  # inside the last record's payload
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupt event record"):
        read_scalars(run)


def test_s3_run_uploads_event_file_every_round(s3_bucket):
    run = f"s3://{s3_bucket}/runs/a"
    log = RoundLogger(run)
    log.log_round(_summary(1, 0.5))
    # uploaded at once, not only at close: a viewer of a long remote run sees every committed round
    assert read_scalars(run)["round/loss"] == [(1, 0.5)]
    log.log_round(_summary(2, 0.25))
    log.close()
    assert len(Storage(run).listdir("tb")) == 1
    assert read_scalars(run)["round/loss"] == [(1, 0.5), (2, 0.25)]
    assert not Path(log.logdir).exists()  # the local staging directory is gone


@pytest.mark.ray
def test_training_run_curves_continue_across_resume(ray_cluster, tmp_path):
    out = str(tmp_path / "run")
    train(load_config("demo", [*TINY, "train.rounds=1"]), out=out)
    assert sorted(s for s, _ in read_scalars(out)["round/loss"]) == [1]
    train(load_config("demo", TINY), out=out, resume=True)
    scalars = read_scalars(out)
    manifest = json.loads((tmp_path / "run" / "run.json").read_text())
    expected = ["round/loss", "round/skip_rate", "round/images_per_s", "round/round_s", "round/migrated"]
    expected += [f"shard_skip_rate/shard-{s:03d}" for s in (0, 1)]
    for tag in expected:
        assert [s for s, _ in scalars[tag]] == [1, 2], tag  # global step = round id, no duplicates
    for summary in manifest["rounds"]:
        step = summary["round"]
        assert dict(scalars["round/loss"])[step] == pytest.approx(summary["loss"], rel=1e-6)
        assert dict(scalars["round/skip_rate"])[step] == pytest.approx(summary["skip_rate"], abs=1e-7)
        for shard in summary["shards"]:
            tag = f"shard_skip_rate/shard-{shard['shard']:03d}"
            assert dict(scalars[tag])[step] == pytest.approx(shard["skip_rate"], abs=1e-7)
    assert len(list((tmp_path / "run" / "tb").iterdir())) == 2  # one event file per driver session
