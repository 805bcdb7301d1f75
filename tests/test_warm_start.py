"""Warm start (train.init_from): round 0 is a committed round of another run, and its steps count."""

import os

import pytest
import torch

from memshard.config import ConfigError, load_config, split_init_from
from memshard.io.rundir import RunDir, training_through
from memshard.runtime.driver import RunError, train
from tests.conftest import TINY

pytestmark = pytest.mark.ray


def test_init_from_spec_splits_round():
    assert split_init_from("runs/a") == ("runs/a", None)
    assert split_init_from("runs/a@3") == ("runs/a", 3)
    assert split_init_from("s3://b/k@x/run@12") == ("s3://b/k@x/run", 12)
    assert split_init_from("runs/v@beta") == ("runs/v@beta", None)
    with pytest.raises(ConfigError, match="RUN@ROUND"):
        load_config("demo", ["train.init_from=runs/a@"])


@pytest.fixture(scope="module")
def source_run(ray_cluster, tmp_path_factory):
    """Plain training on one shard: 2 rounds of 3 steps."""
    out = str(tmp_path_factory.mktemp("warm") / "src")
    train(load_config("demo", [*TINY, "method=baseline", "shards.count=1"]), out=out)
    return out


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_warm_start_takes_the_rounds_weights_and_counts_their_steps(source_run, tmp_path):
    src = RunDir(source_run)
    assert training_through(src.manifest(), 1)["train_steps"] == 3
    out = str(tmp_path / "warm")
    train(load_config("demo", [*TINY, "train.rounds=1", f"train.init_from={source_run}@1"]), out=out)
    run = RunDir(out)
    raw0, ema0 = run.load_weights(0)
    src_raw, src_ema = src.load_weights(1)
    assert _equal(raw0, src_raw) and _equal(ema0, src_ema)
    assert not _equal(src_raw, src.load_weights(2)[0])  # round 1, not the source's last round, was taken
    manifest = run.manifest()
    assert manifest["init"]["from"] == source_run and manifest["init"]["round"] == 1
    assert manifest["init"]["steps"] == 3
    # 2 shards x 3 steps trained here, on top of the 3 the weights already had
    assert training_through(manifest, 1)["train_steps"] == 3 + 6
    assert not _equal(run.load_weights(1)[0], raw0)

    # without a round: the source's last committed round
    out2 = str(tmp_path / "warm-last")
    train(load_config("demo", [*TINY, "train.rounds=1", f"train.init_from={source_run}"]), out=out2)
    assert _equal(RunDir(out2).load_weights(0)[0], src.load_weights(2)[0])
    assert RunDir(out2).manifest()["init"]["steps"] == 6


@pytest.mark.parametrize(
    ("spec", "extra", "message"),
    [
        ("{tmp}/nowhere", [], "holds no run"),
        ("{src}@7", [], "committed 2 round(s), not round 7"),
        ("{src}@1", ["model.class_conditional=true"], "the config's UNet"),
    ],
)
def test_a_bad_warm_start_is_refused_before_any_work(source_run, tmp_path, spec, extra, message):
    out = tmp_path / "refused"
    cfg = load_config("demo", [*TINY, f"train.init_from={spec.format(tmp=tmp_path, src=source_run)}", *extra])
    with pytest.raises(RunError) as exc:
        train(cfg, out=str(out))
    assert message in str(exc.value) and "train.init_from" in str(exc.value)
    assert not os.path.exists(out)
