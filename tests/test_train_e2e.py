"""End to end on a real local Ray cluster: K=2 shards, 2 rounds, tiny UNet, digits."""

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from memshard.config import load_config
from memshard.io.rundir import RunDir
from memshard.runtime.driver import RunError, train
from tests.conftest import TINY

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def straight_run(ray_cluster, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("runs") / "straight")
    outcome = train(load_config("demo", TINY), out=out)
    return out, outcome


def test_run_layout_and_manifest(straight_run):
    out, outcome = straight_run
    assert outcome.rounds_completed == 2
    manifest = json.loads(open(f"{out}/run.json").read())
    assert manifest["rounds_completed"] == 2 and len(manifest["rounds"]) == 2
    assert manifest["config"]["shards"]["count"] == 2
    for r in (0, 1, 2):
        assert (pq.read_table(f"{out}/shards/round-{r:04d}.parquet").column_names) == ["id", "shard"]
    for r in (1, 2):
        assert load_file(f"{out}/rounds/{r:04d}/global.safetensors")
        assert load_file(f"{out}/rounds/{r:04d}/ema.safetensors")
        for s in (0, 1):
            st = load_file(f"{out}/rounds/{r:04d}/proxies/shard-{s:03d}.safetensors")
            assert "bank" in st and any(k.startswith("opt.") for k in st)


def test_stats_and_shards_are_consistent(straight_run):
    out, _ = straight_run
    run = RunDir(out)
    ids0, shards0 = run.read_assignment(0)
    assert len(ids0) == 48 and len(np.unique(ids0)) == 48  # every id in exactly one shard
    assert sorted(np.bincount(shards0).tolist()) == [24, 24]
    for r in (1, 2):
        stats = run.read_stats(r).to_pandas()
        assert {"id", "shard", "visits", "skips", "mean_loss", "mean_ratio"} <= set(stats.columns)
        assert sorted(stats["id"].tolist()) == sorted(ids0.tolist())
        # each shard took 3 steps of batch 8: its samples' visits add up to 24
        assert stats.groupby("shard")["visits"].sum().tolist() == [24, 24]
        assert (stats["skips"] <= stats["visits"]).all()
        # the stats' shard column is the assignment that was in force during round r
        ids, shards = run.read_assignment(r - 1)
        lookup = dict(zip(ids.tolist(), shards.tolist(), strict=True))
        assert all(lookup[i] == s for i, s in zip(stats["id"], stats["shard"], strict=True))


def test_aggregate_is_size_weighted_average_of_proxies(straight_run):
    """The committed global weights change each round and the served UNet holds the EMA weights."""
    out, _ = straight_run
    g1 = load_file(f"{out}/rounds/0001/global.safetensors")
    g2 = load_file(f"{out}/rounds/0002/global.safetensors")
    assert any(not torch.equal(g1[k], g2[k]) for k in g1)
    served = load_file(f"{out}/served/unet/diffusion_pytorch_model.safetensors")
    ema2 = load_file(f"{out}/rounds/0002/ema.safetensors")
    assert all(torch.equal(served[k], ema2[k]) for k in ema2)
    raw = load_file(f"{out}/served/unet_raw/diffusion_pytorch_model.safetensors")
    assert all(torch.equal(raw[k], g2[k]) for k in g2)


def test_served_pipeline_loads_and_samples(straight_run):
    from diffusers import DDPMPipeline

    out, _ = straight_run
    pipe = DDPMPipeline.from_pretrained(f"{out}/served")
    images = pipe(batch_size=2, num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np")
    arr = images.images
    assert arr.shape == (2, 16, 16, 1) and np.isfinite(arr).all()


def test_sample_cli_writes_grid(straight_run, tmp_path):
    from PIL import Image

    from memshard.cli import main

    out, _ = straight_run
    png = tmp_path / "grid.png"
    assert main(["sample", out, "--num", "4", "--steps", "3", "--scale", "1", "--out", str(png)]) == 0
    img = Image.open(png)
    assert img.size == (2 + 2 * 18, 2 + 2 * 18)


def test_resume_equals_uninterrupted(straight_run, tmp_path):
    out, _ = straight_run
    resumed = str(tmp_path / "resumed")
    train(load_config("demo", [*TINY, "train.rounds=1"]), out=resumed)
    # simulate a crash in round 2 after some files were written but before the manifest
    RunDir(resumed).store.write_bytes("rounds/0002/global.safetensors", b"half-written garbage")
    train(load_config("demo", TINY), out=resumed, resume=True)
    for name in ("global", "ema"):
        a = load_file(f"{out}/rounds/0002/{name}.safetensors")
        b = load_file(f"{resumed}/rounds/0002/{name}.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    sa = load_file(f"{out}/served/unet/diffusion_pytorch_model.safetensors")
    sb = load_file(f"{resumed}/served/unet/diffusion_pytorch_model.safetensors")
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    for s in (0, 1):
        pa_ = load_file(f"{out}/rounds/0002/proxies/shard-{s:03d}.safetensors")
        pb_ = load_file(f"{resumed}/rounds/0002/proxies/shard-{s:03d}.safetensors")
        assert all(torch.equal(pa_[k], pb_[k]) for k in pa_)


def test_existing_run_dir_is_refused_and_resume_checks_config(straight_run):
    out, _ = straight_run
    with pytest.raises(RunError, match="already exists"):
        train(load_config("demo", TINY), out=out)
    with pytest.raises(RunError, match=r"agc\.ratio"):
        train(load_config("demo", [*TINY, "agc.ratio=3"]), out=out, resume=True)
    with pytest.raises(RunError, match="no run"):
        train(load_config("demo", TINY), out=out + "-missing", resume=True)


def test_report_of_a_run_without_migrations_draws_no_migration_plot(straight_run):
    from memshard.evaluation.report import report

    out, _ = straight_run
    _, written = report(out)
    assert sorted(os.path.basename(w) for w in written) == ["skip_hist.png", "skip_rate.png"]
