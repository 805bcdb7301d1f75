"""IET-AGC+ end to end on a real local Ray cluster: MSR every round, TAA, threshold skipping."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from memshard.cli import main as cli_main
from memshard.config import load_config
from memshard.evaluation.evaluate import per_sample_table, summed_stats
from memshard.evaluation.report import report
from memshard.iet.msr import SkipLedger
from memshard.io.rundir import RunDir
from memshard.runtime.coordinator import migrate
from memshard.runtime.driver import train
from memshard.seeds import round_seed
from tests.conftest import TINY

pytestmark = pytest.mark.ray

# r = 1 (skip iff l < m[t]) and a 4-step schedule, so skips (and hence migrations) happen in 3 steps
PLUS = [*TINY, "method=iet-agc-plus", "agc.ratio=1.0", "model.num_train_timesteps=4", "msr.fraction=0.5",
        "train.rounds=3", "train.steps_per_round=10", "taa.queue_every=16"]  # fmt: skip


@pytest.fixture(scope="module")
def plus_run(ray_cluster, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("plus") / "run")
    cfg = load_config("demo", PLUS)
    return out, cfg, train(cfg, out=out)


def test_moved_ids_are_exactly_the_planned_ones(plus_run):
    out, cfg, outcome = plus_run
    run = RunDir(out)
    assert outcome.rounds_completed == 3
    ids0, _ = run.read_assignment(0)
    ledger = SkipLedger(ids0, cfg.shards.count)
    moved_total = 0
    for r in (1, 2, 3):
        ids_prev, shards_prev = run.read_assignment(r - 1)
        ids_next, shards_next = run.read_assignment(r)
        # every id stays in exactly one shard
        assert np.array_equal(ids_prev, ids0) and np.array_equal(ids_next, ids0)
        stats = {
            k: v.to_numpy() for k, v in zip(run.read_stats(r).column_names, run.read_stats(r).columns, strict=True)
        }
        ledger.add_round(stats["id"], stats["shard"], stats["skips"])
        mig = run.read_migrations(r)
        if r == 3:  # never after the last round
            assert mig is None and np.array_equal(shards_prev, shards_next)
            continue
        # replay the planner from the run's own statistics: the same moves, exactly
        planned_shards, plan = migrate(
            ledger, ids_prev, shards_prev, stats, cfg.msr, cfg.shards.count, round_seed(cfg.seed, r, -1)
        )
        assert np.array_equal(planned_shards, shards_next)
        changed = ids0[shards_prev != shards_next]
        assert sorted(mig.column("id").to_pylist()) == sorted(changed.tolist()) == sorted(plan.ids.tolist())
        pos = np.searchsorted(ids0, mig.column("id").to_numpy())
        assert (shards_prev[pos] == mig.column("from_shard").to_numpy()).all()
        assert (shards_next[pos] == mig.column("to_shard").to_numpy()).all()
        # the ledger the coordinator persisted agrees with the replay (moved counters reset)
        saved = run.read_ledger(r)
        assert np.array_equal(saved["skips_since_move"], ledger.since_move)
        assert (ledger.since_move[pos] == 0).all()
        moved_total += len(mig)
        # actors trained on the new assignment in the next round
        nxt = run.read_stats(r + 1).to_pandas().set_index("id")
        assert (nxt.loc[ids0, "shard"].to_numpy() == shards_next).all()
    assert moved_total > 0
    assert sum(s["migrated"] for s in outcome.manifest["rounds"]) == moved_total


def test_augmentation_is_recorded(plus_run):
    out, _, outcome = plus_run
    stats = RunDir(out).read_stats(2).to_pandas()
    assert stats["augmented"].sum() > 0
    s = stats["mean_strength"].dropna()
    assert len(s) and s.between(0, 1).all()
    assert outcome.manifest["rounds"][1]["augmented"] == stats["augmented"].sum()

    # per training id, over rounds 1-2: the evaluation's per-sample table and the benchmark's analysis
    run = RunDir(out)
    by_id = pd.concat([run.read_stats(r).to_pandas() for r in (1, 2)]).groupby("id")["augmented"].sum()
    ids = np.array(sorted(by_id.index), dtype=np.int64)
    want = by_id.loc[ids].to_numpy()
    assert want.sum() > 0 and len(np.unique(want)) > 1  # counts differ by sample, so the id order matters
    table = per_sample_table(run, run.manifest(), ids, np.zeros(4, np.int64), np.zeros(4, bool), upto_round=2)
    assert np.array_equal(table["augmented"], want)
    assert np.array_equal(summed_stats(run, ids[::-1], 2)["augmented"], want[::-1])  # in the order of the ids given


def test_report_writes_table_and_plots(plus_run, capsys):
    out, _, outcome = plus_run
    assert cli_main(["report", out]) == 0
    printed = capsys.readouterr().out  # piped (not a terminal): the table still gets the width it needs
    assert "…" not in printed and all(f"{s['loss']:.4f}" in printed for s in outcome.manifest["rounds"])
    tab, written = report(out)
    headers = [c.header for c in tab.columns]
    assert {"migrated", "augmented", "strength", "skip"} <= set(headers) and tab.row_count == 3
    migrated = list(tab.columns[headers.index("migrated")].cells)
    assert migrated == [str(s["migrated"]) for s in outcome.manifest["rounds"]]
    assert len(written) == 3
    for name in ("skip_rate.png", "skip_hist.png", "migrations.png"):
        data = open(f"{out}/report/{name}", "rb").read()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_alternating_schedule_serves_the_average_and_resumes_exactly(ray_cluster, tmp_path):
    alt = [*PLUS, "msr.every=2", "msr.aggregate_on_migration=false", "train.rounds=3"]
    straight = str(tmp_path / "straight")
    train(load_config("demo", alt), out=straight)
    run = RunDir(straight)
    # after round 2 (a migration round) proxies continued from their own weights; the served
    # model of every round is still the size-weighted average of the proxies' end weights
    for r in (2, 3):
        glob, _ = run.load_weights(r)
        sizes = np.bincount(run.read_stats(r).column("shard").to_numpy())
        own = [load_file(f"{straight}/rounds/{r:04d}/proxies/shard-{s:03d}.safetensors") for s in range(2)]
        for k, v in glob.items():
            if v.is_floating_point():
                avg = sum(sizes[s] * own[s][f"w.raw.{k}"] for s in range(2)) / sizes.sum()
                assert torch.allclose(v, avg, atol=1e-6)
    # a crash after round 3 wrote its files but before the manifest committed it: resuming
    # redoes round 3 from the proxies' own round-2 weights and gets the same model bit for bit
    crashed = tmp_path / "crashed"
    shutil.copytree(straight, crashed)
    manifest = json.loads((crashed / "run.json").read_text())
    manifest["rounds_completed"] = 2
    manifest["rounds"] = manifest["rounds"][:2]
    (crashed / "run.json").write_text(json.dumps(manifest))
    train(load_config("demo", alt), out=str(crashed), resume=True)
    a, b = run.load_weights(3)[0], RunDir(str(crashed)).load_weights(3)[0]
    assert all(torch.equal(a[k], b[k]) for k in a)
