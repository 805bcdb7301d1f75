"""`memshard sweep`: search-space parsing and validation, and a real 2-trial Tune sweep of tiny runs."""

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from memshard.config import ConfigError, load_config, parse_search_space
from memshard.runtime.driver import RunError
from memshard.runtime.tensorboard import read_scalars
from memshard.sweep import (
    PARETO_PNG,
    POINTS_CSV,
    RESULTS_CSV,
    TRIALS_DIR,
    add_pareto,
    baseline_config,
    make_scheduler,
    pareto_mask,
    parse_param,
    run_sweep,
    search_space,
    sweep_config,
    trial_config,
    trial_resources,
)
from tests.conftest import TINY

# --------------------------------------------------------------------------- search spaces (no Ray)


@pytest.mark.parametrize(
    "text,kind,args",
    [
        ("uniform(1.1,3)", "uniform", (1.1, 3)),
        (" loguniform(1e-4, 1e-2) ", "loguniform", (1e-4, 1e-2)),
        ("choice(0.1, 0.25)", "choice", (0.1, 0.25)),
        ("choice(ring, balanced)", "choice", ("ring", "balanced")),
        ("randint(1, 5)", "randint", (1, 5)),
        ("grid(true, false)", "grid", (True, False)),
    ],
)
def test_parse_search_space(text, kind, args):
    spec = parse_search_space(text)
    assert (spec.kind, spec.args) == (kind, args)


@pytest.mark.parametrize(
    "text,match",
    [
        ("uniform(3,1)", "lower bound 3 must be below the upper bound 1"),
        ("uniform(2,2)", "lower bound"),
        ("normal(0,1)", "unknown distribution 'normal'"),
        ("loguniform(0,1)", "must be positive"),
        ("randint(1.5,3)", "must be integers"),
        ("uniform(1)", "exactly two bounds"),
        ("uniform(a,b)", "finite numbers"),
        ("choice()", "at least one value"),
        ("2.5", "not a search space"),
        ("choice([1,2)", "cannot read the arguments"),
    ],
)
def test_parse_search_space_errors(text, match):
    with pytest.raises(ValueError, match=match):
        parse_search_space(text)


def test_search_space_becomes_tune_domains():
    from ray.tune.search.sample import Categorical, Float, Integer

    space = search_space(
        {
            "agc.ratio": "uniform(1.1,3)",
            "train.lr": "loguniform(1e-4,1e-2)",
            "msr.fraction": "choice(0.1,0.25)",
            "train.batch_size": "randint(4,9)",
            "msr.policy": "grid(ring,balanced)",
        }
    )
    assert isinstance(space["agc.ratio"], Float) and (space["agc.ratio"].lower, space["agc.ratio"].upper) == (1.1, 3)
    assert type(space["train.lr"].sampler).__name__ == "_LogUniform"
    assert isinstance(space["msr.fraction"], Categorical) and space["msr.fraction"].categories == [0.1, 0.25]
    assert isinstance(space["train.batch_size"], Integer) and space["train.batch_size"].upper == 9
    assert space["msr.policy"] == {"grid_search": ["ring", "balanced"]}


def _sweep(params: dict[str, str], **more) -> list[str]:
    return [f"sweep.params={json.dumps(params)}", *(f"sweep.{k}={v}" for k, v in more.items())]


@pytest.mark.parametrize(
    "params,more,match",
    [
        ({"agc.ratio": "uniform(3,1)"}, {}, r"sweep\.params.*agc\.ratio.*lower bound"),
        ({"agc.ratio": "gauss(1,2)"}, {}, "unknown distribution"),
        ({"agc.ratoi": "uniform(1,2)"}, {}, r"agc\.ratoi is not a config key"),
        ({"nosection.x": "choice(1,2)"}, {}, r"nosection\.x is not a config key"),
        ({"agc.ratio": "uniform(0,2)"}, {}, r"agc\.ratio=uniform\(0,2\) allows 0.*greater than 0"),
        ({"msr.policy": "choice(ring,clever)"}, {}, "allows 'clever'"),
        ({"train.rounds": "choice(1,2)"}, {}, r"train\.rounds cannot be swept"),
        ({"storage.run_dir": "choice(a,b)"}, {}, "cannot be swept"),
        ({"agc.ratio": "uniform(1,2)"}, {"metric": "fid"}, "needs sweep.evaluate=true"),
        ({"agc.ratio": "uniform(1,2)"}, {"metric": "fid", "evaluate": "true"}, "ASHA compares trials every round"),
        ({"agc.ratio": "uniform(1,2)"}, {"scheduler": "hyperband"}, r"sweep\.scheduler"),
    ],
)
def test_config_sweep_section_is_validated_up_front(params, more, match):
    with pytest.raises(ConfigError, match=match):
        load_config("demo", _sweep(params, **more))


def test_yaml_sweep_section_and_param_flags_merge(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "extends": "demo",
                "sweep": {"params": {"agc.ratio": "uniform(1.1,3)"}, "samples": 3, "scheduler": "fifo"},
            }
        )
    )
    cfg = load_config(str(path))
    assert cfg.sweep.spaces()["agc.ratio"].args == (1.1, 3) and cfg.sweep.samples == 3
    cfg = sweep_config(str(path), ["agc.ratio=uniform(1.5, 2)", "msr.fraction=choice(0.1,0.25)"], ["seed=4"])
    assert cfg.sweep.params == {"agc.ratio": "uniform(1.5, 2)", "msr.fraction": "choice(0.1,0.25)"}
    assert cfg.sweep.samples == 3 and cfg.sweep.scheduler == "fifo" and cfg.seed == 4
    cfg = sweep_config(str(path), [], samples=5, scheduler="asha", grace_period=2)
    assert (cfg.sweep.samples, cfg.sweep.scheduler, cfg.sweep.grace_period) == (5, "asha", 2)


def test_sweep_config_errors():
    with pytest.raises(ConfigError, match="nothing to sweep"):
        sweep_config("demo", [])
    with pytest.raises(ConfigError, match="expected KEY=SPACE"):
        parse_param("agc.ratio")
    with pytest.raises(ConfigError, match=r"grace_period=5 exceeds train\.rounds=4"):
        sweep_config("demo", ["agc.ratio=uniform(1,2)"], grace_period=5)
    with pytest.raises(ConfigError, match=r"sweep\.samples"):
        sweep_config("demo", ["agc.ratio=uniform(1,2)"], samples=0)
    with pytest.raises(ConfigError, match=r"agc\.ratio.*unknown distribution"):
        sweep_config("demo", ["agc.ratio=beta(1,2)"])


def test_trial_config_and_resources():
    cfg = sweep_config("demo", ["agc.ratio=uniform(1,2)"], [*TINY, "resources.gpus_per_shard=0"])
    trial = trial_config(cfg.to_dict(), {"agc.ratio": np.float64(1.75), "msr.policy": "balanced"})
    assert trial.agc.ratio == 1.75 and type(trial.to_dict()["agc"]["ratio"]) is float
    assert trial.msr.policy == "balanced" and trial.sweep.params == {} and trial.logging.progress is False
    pgf = trial_resources(trial)  # gpus_per_shard=0: no cluster needed to size it
    assert pgf.head_bundle_is_empty and pgf.bundles == [{"CPU": 0.5}, {"CPU": 0.5}]
    assert pgf.strategy == "PACK"


def test_schedulers():
    from ray.tune.schedulers import ASHAScheduler

    cfg = sweep_config("demo", ["agc.ratio=uniform(1,2)"], grace_period=2)
    asha = make_scheduler(cfg)
    assert isinstance(asha, ASHAScheduler)
    assert (asha._time_attr, asha._max_t, asha._reduction_factor) == ("round", 4, 4.0)
    assert min(m for m, _ in asha._brackets[0]._rungs) == 2
    assert make_scheduler(sweep_config("demo", ["agc.ratio=uniform(1,2)"], scheduler="fifo")) is None


def test_pareto():
    x = np.array([1.0, 2.0, 3.0, 2.5, np.nan])
    y = np.array([3.0, 1.0, 0.5, 2.0, 0.1])
    assert pareto_mask(x, y).tolist() == [True, True, True, False, False]
    df = pd.DataFrame(
        {
            "status": ["completed", "completed", "stopped"],
            "loss": [0.5, 0.4, 0.1],  # the stopped trial's loss is of an earlier round: never on the front
            "skip_rate": [0.2, 0.1, 0.9],
        }
    )
    assert add_pareto(df, evaluated=False)["pareto"].tolist() == [True, True, False]


# --------------------------------------------------------------------------- on a real local Ray cluster


@pytest.mark.ray
def test_shard_bundles_must_fit(ray_cluster):
    from ray.util.placement_group import placement_group, remove_placement_group

    from memshard.runtime.driver import shard_bundles

    pg = placement_group([{"CPU": 0.01}, {"CPU": 0.1}, {"CPU": 0.1}])
    try:
        ray_cluster.get(pg.ready(), timeout=60)
        assert shard_bundles(pg, {"CPU": 0.1}, 2) == [1, 2]  # the last K: a trial's head bundle comes first
        with pytest.raises(RunError, match="cannot hold a shard actor"):
            shard_bundles(pg, {"CPU": 0.5}, 2)
        with pytest.raises(RunError, match="has 3 bundle"):
            shard_bundles(pg, {"CPU": 0.01}, 4)
    finally:
        remove_placement_group(pg)


SWEEP_SET = [*TINY, "sweep.eval_steps=2", "sweep.eval_reference=16", "sweep.reduction_factor=2"]


@pytest.fixture(scope="module")
def real_sweep(ray_cluster, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("sweep") / "s")
    t0 = time.perf_counter()
    df = run_sweep(
        "demo",
        ["agc.ratio=grid(1.5, 3.0)", "train.lr=loguniform(1e-4, 1e-2)"],
        1,
        out,
        SWEEP_SET,
        scheduler="asha",
        grace_period=1,
        evaluate=True,
        eval_num=8,
        time_budget_s=480,  # bounds tuner.fit: Tune stops every trial after this
        verbose=0,
    )
    return out, df, time.perf_counter() - t0


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_real_sweep_results_and_trial_runs(real_sweep):
    out, df, _ = real_sweep
    on_disk = pd.read_csv(f"{out}/{RESULTS_CSV}")
    assert len(on_disk) == len(df) == 2
    assert sorted(on_disk["agc.ratio"]) == [1.5, 3.0]
    assert on_disk["train.lr"].between(1e-4, 1e-2).all()
    assert set(on_disk["status"]) <= {"completed", "stopped"}
    # ASHA may stop the second trial to reach round 1, never the first: one trial always completes
    done = on_disk[on_disk["status"] == "completed"]
    assert len(done) >= 1 and (done["rounds_completed"] == 2).all()
    assert done["memorized_fraction"].between(0, 1).all() and (done["fid"] >= 0).all()
    assert on_disk["pareto"].sum() >= 1 and not on_disk.loc[on_disk["status"] != "completed", "pareto"].any()
    with Image.open(f"{out}/{PARETO_PNG}") as img:
        assert img.format == "PNG" and img.size[0] > 100
    trials = Path(out) / TRIALS_DIR
    assert sorted(p.name for p in trials.iterdir()) == sorted(on_disk["trial_id"])
    for row in on_disk.to_dict("records"):
        run = trials / row["trial_id"]
        manifest = json.loads((run / "run.json").read_text())
        assert manifest["rounds_completed"] == row["rounds_completed"] >= 1
        assert manifest["config"]["agc"]["ratio"] == row["agc.ratio"]  # the trial's own value
        assert manifest["config"]["sweep"]["params"] == {} and manifest["config"]["logging"]["progress"] is False
        served = json.loads((run / "served" / "memshard.json").read_text())
        assert served["round"] == row["rounds_completed"] and (run / "served" / "model_index.json").exists()
        # each trial's own TensorBoard curves, one point per committed round
        steps = [s for s, _ in read_scalars(str(run))["round/loss"]]
        assert steps == list(range(1, row["rounds_completed"] + 1))
        if row["status"] == "completed":
            metrics = json.loads((run / "eval" / "sweep" / "metrics.json").read_text())
            assert metrics["num_samples"] == 8 and metrics["fid"] == pytest.approx(row["fid"])


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_sweep_releases_resources_and_refuses_reuse(real_sweep, ray_cluster):
    out, _, _ = real_sweep
    deadline = time.monotonic() + 60
    while ray_cluster.available_resources().get("CPU", 0) < 2 - 1e-6 and time.monotonic() < deadline:
        time.sleep(0.5)  # trial groups and actors go away asynchronously
    assert ray_cluster.available_resources().get("CPU", 0) == pytest.approx(2)
    with pytest.raises(RunError, match="already holds a sweep"):
        run_sweep("demo", ["agc.ratio=uniform(1.1,3)"], 1, out, TINY)


# --------------------------------------------------------------------------- the frontier objective


def test_frontier_sweep_config_and_baseline_config():
    cfg = sweep_config(
        "demo", ["agc.ratio=uniform(1.1,3)"], [*TINY, "method=iet-agc-plus"], metric="frontier",
        baseline=["train.rounds=5"],
    )  # fmt: skip
    base = baseline_config(cfg)
    assert base.method == "baseline" and base.shards.count == 1 and base.train.rounds == 5
    assert not (base.agc.enabled or base.msr.enabled or base.taa.enabled) and base.sweep.params == {}
    assert base.train.steps_per_round == cfg.train.steps_per_round and base.data == cfg.data  # same data, same pace
    with pytest.raises(ConfigError, match="nope"):
        sweep_config("demo", ["agc.ratio=uniform(1.1,3)"], TINY, metric="frontier", baseline=["nope=1"])
    with pytest.raises(ConfigError, match="minimised"):
        sweep_config("demo", ["agc.ratio=uniform(1.1,3)"], TINY, metric="frontier", mode="max")


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_frontier_sweep_scores_trials_against_plain_training(ray_cluster, tmp_path):
    """jobs/sweep_frontier.py --size ci: memshard sweep --metric frontier on a real local cluster, end to end."""
    from memshard.evaluation.metrics.frontier import Checkpoint, frontier_score
    from tests.conftest import load_job

    job = load_job("sweep_frontier")
    out = str(tmp_path / "fs")
    # every trial warm-starts from plain training's round 2 (trained by the sweep itself, before any trial)
    assert job.main(["--size", "ci", "--out", out, "--warm-start", "2"]) == 0
    on_disk = pd.read_csv(f"{out}/{RESULTS_CSV}")
    assert len(on_disk) == 2 and sorted(on_disk["taa.scale"]) == ["memshard", "torchvision"]
    assert set(on_disk["train.init_from"]) == {f"{out}/baseline@2"}
    assert set(on_disk["status"]) <= {"completed", "stopped"} and (on_disk["status"] == "completed").any()
    points = pd.read_csv(f"{out}/{POINTS_CSV}")
    base = points[points["arm"] == "baseline"]
    assert sorted(base["round"]) == [1, 2, 3]  # plain training trained and evaluated once, every checkpoint
    assert len(list((Path(out) / "baseline" / "eval" / "sweep").glob("round-*"))) == 3
    fields = set(Checkpoint.__dataclass_fields__)

    def pts(frame):
        return [Checkpoint(**{k: v for k, v in row.items() if k in fields}) for row in frame.to_dict("records")]

    q = 1.05 * base["fid"].min()
    for row in on_disk.to_dict("records"):
        mine = points[points["arm"] == row["trial_id"]]
        assert sorted(mine["round"]) == list(range(1, row["rounds_completed"] + 1))  # every round evaluated
        # the reported score is the frontier score of the stored evaluations, recomputed here
        want = frontier_score(pts(mine), pts(base), q)
        assert row["frontier"] == pytest.approx(want["frontier"]) and row["matched_fid_limit"] == pytest.approx(q)
        assert bool(row["reached"]) == want["reached"]
        assert -1 <= row["frontier"] <= 1 if want["reached"] else row["frontier"] > 1
        # the warm start's steps count: round 1 = plain training's 2 rounds + this trial's first round
        init = json.loads((Path(out) / TRIALS_DIR / row["trial_id"] / "run.json").read_text())["init"]
        plain_steps = int(base[base["round"] == 2]["steps"].iloc[0])
        assert init["round"] == 2 and init["steps"] == plain_steps > 0
        assert int(mine[mine["round"] == 1]["steps"].iloc[0]) == plain_steps + 2 * 3  # 2 shards x 3 steps
    assert on_disk["pareto"].sum() >= 1
    with Image.open(f"{out}/{PARETO_PNG}") as img:
        assert img.format == "PNG" and img.size[0] > 100
    # the job's summary: every trial, the baseline's frontier, the best trial by score, a table that says it
    summary = json.loads((Path(out) / "summary.json").read_text())
    assert len(summary["trials"]) == 2 and len(summary["baseline"]["checkpoints"]) == 3
    assert summary["baseline"]["matched_fid"] == pytest.approx(q)
    assert summary["best"]["frontier"] == pytest.approx(on_disk["frontier"].min())
    text = job.render(summary, "x.png")
    assert "| trial | scale | init_from |" in text and "best trial: `taa.scale=" in text and "Q = " in text
    assert "| baseline@2 |" in text
    with pytest.raises(SystemExit):  # rounds that are not rounds are refused before any work
        job.main(["--size", "ci", "--out", str(tmp_path / "no"), "--warm-start", "two"])
    assert not (tmp_path / "no").exists()
