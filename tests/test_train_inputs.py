"""Dataset problems are caught before training; baseline mode is the same code path."""

import io
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from memshard.config import load_config
from memshard.data import DataError
from memshard.io.rundir import RunDir
from memshard.runtime.driver import train
from tests.conftest import TINY

pytestmark = pytest.mark.ray


def _png(arr):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def messy_parquet(tmp_path):
    rng = np.random.default_rng(0)
    ids, images, labels = [], [], []
    for i in range(30):
        ids.append(i)
        images.append(_png(rng.integers(0, 256, (16, 16), dtype=np.uint8)))
        labels.append(i % 10)
    ids += [100, 101, 5]
    images += [b"not an image", _png(np.zeros((8, 8), np.uint8)), _png(np.zeros((16, 16), np.uint8))]
    labels += [0, 1, 2]
    path = tmp_path / "messy.parquet"
    pq.write_table(pa.table({"id": pa.array(ids, pa.int64()), "image": images, "label": labels}), path)
    return str(path)


def _cfg(path, *extra):
    return load_config("demo", [*TINY, "data.source=null", f"data.path={path}", "train.rounds=1", *extra])


def test_bad_rows_fail_before_the_run_directory_exists(ray_cluster, messy_parquet, tmp_path):
    out = tmp_path / "run-fail"
    with pytest.raises(DataError) as exc:
        train(_cfg(messy_parquet), out=str(out))
    msg = str(exc.value)
    assert "id 100" in msg and "id 101" in msg and "id 5: duplicate id" in msg
    assert not os.path.exists(out)


def test_bad_rows_dropped_and_reported(ray_cluster, messy_parquet, tmp_path):
    out = str(tmp_path / "run-drop")
    train(_cfg(messy_parquet, "data.bad_rows=drop", "data.limit=null"), out=out)
    bad = pq.read_table(f"{out}/bad_rows.parquet").to_pydict()
    assert sorted(bad["id"]) == [5, 100, 101]
    ids, _ = RunDir(out).read_assignment(0)
    assert len(ids) == 29 and not set(ids.tolist()) & {5, 100, 101}


def test_more_shards_than_samples_is_refused(ray_cluster, messy_parquet, tmp_path):
    with pytest.raises(DataError, match="some shards would be empty"):
        train(
            _cfg(
                messy_parquet, "data.bad_rows=drop", "data.limit=3", "shards.count=4", "resources.cpus_per_shard=0.25"
            ),
            out=str(tmp_path / "r"),
        )


def test_baseline_mode_is_one_shard_without_skipping(ray_cluster, tmp_path):
    out = str(tmp_path / "baseline")
    outcome = train(load_config("demo", [*TINY, "method=baseline", "shards.count=1", "train.rounds=1"]), out=out)
    assert outcome.rounds_completed == 1
    stats = RunDir(out).read_stats(1).to_pandas()
    assert set(stats["shard"]) == {0} and stats["skips"].sum() == 0 and stats["visits"].sum() == 24
