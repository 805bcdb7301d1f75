"""The PRSS benchmark job, end to end at toy size (every code path; the numbers mean nothing here)."""

import json

import numpy as np
import pytest

from memshard.prss.calibration import DETECT_WINDOW
from tests.conftest import load_job


def _job():
    return load_job("bench_prss")


def test_data_split_is_disjoint_and_duplicated(real_emoji, tmp_path):
    import pyarrow.parquet as pq

    job = _job()
    size = job.SIZES["toy"]
    split = job.build_data(size, str(tmp_path))
    mem, single, held = (set(split[k]) for k in ("memorized", "single", "heldout"))
    assert len(mem) == size.num_memorized and len(single) == size.num_single and len(held) == size.num_heldout
    assert not (mem & single or mem & held or single & held)
    train = pq.read_table(split["train"])
    caps = train.column("caption").to_pylist()
    assert train.num_rows == size.num_memorized * size.duplicates + size.num_single
    assert sorted(train.column("id").to_pylist()) == list(range(train.num_rows))
    counts = {c: caps.count(c) for c in set(caps)}
    assert sorted(counts.values()).count(size.duplicates) == size.num_memorized
    src_caps = pq.read_table(split["source"]).column("caption").to_pylist()
    assert not {src_caps[i] for i in held} & set(caps)  # held-out captions never trained on
    assert job.build_data(size, str(tmp_path)) == split  # resumable: the split is kept
    # every image of the benchmark (memorized, single, held out) is distinct from every other one
    from memshard.evaluation.extractor import PixelExtractor

    imgs, _ = job.rows_of(split["source"], sorted(mem | single | held), size.image_size)
    f = PixelExtractor()(job.as_float(imgs))
    f = f / f.norm(dim=1, keepdim=True)
    sim = f @ f.T
    sim.fill_diagonal_(-1)
    assert float(sim.max()) < job.DISTINCT_NCC


def test_size_set_overrides_typed_fields_and_refuses_unknown_ones():
    import argparse

    job = _job()
    sets = ["caption_dropout=0.3", "preset=tiny", "init_from=runs/x@2", "rounds=8", "prediction_type=v_prediction"]
    sets.append("source=shapes")
    ns = argparse.Namespace(train_steps=None, sample_steps=None, size_set=sets)
    size = job.with_overrides(job.SIZES["cpu"], ns)
    assert size.caption_dropout == 0.3 and size.preset == "tiny" and size.init_from == "runs/x@2"
    assert size.rounds == 8 and size.prediction_type == "v_prediction" and size.source == "shapes"
    assert size.train_steps == job.SIZES["cpu"].train_steps
    for bad in (["max_text_length=3"], ["caption_dropout"], ["train_steps=many"], ["source=cifar"]):
        with pytest.raises(SystemExit):
            job.with_overrides(job.SIZES["cpu"], argparse.Namespace(train_steps=None, sample_steps=None, size_set=bad))


def test_a_calibration_run_cannot_reuse_data_of_another_shape(real_emoji, tmp_path):
    job = _job()
    job.build_data(job.SIZES["toy"], str(tmp_path))
    other = job.Size(**{**job.SIZES["toy"].__dict__, "duplicates": 5})
    with pytest.raises(SystemExit, match="another --out"):
        job.build_data(other, str(tmp_path))


def test_a_shapes_split_holds_out_unseen_combinations_and_is_kept_apart_from_emoji(real_emoji, tmp_path):
    import pyarrow.parquet as pq

    job = _job()
    size = job.Size(**{**job.SIZES["toy"].__dict__, "source": "shapes"})
    split = job.build_data(size, str(tmp_path / "shapes"))
    assert split["shape"]["source"] == "shapes" and split["source"].endswith("shapes.parquet")
    train_caps = set(pq.read_table(split["train"]).column("caption").to_pylist())
    src_caps = pq.read_table(split["source"]).column("caption").to_pylist()
    held = {src_caps[i] for i in split["heldout"]}
    assert held and not held & train_caps
    assert all("background" in c for c in train_caps | held)
    # its prompt bank holds other wordings of a memorized caption's content, never the caption itself
    mem = [src_caps[i] for i in split["memorized"]]
    providers = job.candidate_providers(split, mem)
    bank = providers["bank"]
    assert not set(mem) & set(bank.bank) and len(bank.bank) > len(src_caps)
    from memshard.data.shapes import TEMPLATES, caption, parse

    combo, t = parse(mem[0])
    others = [caption(*combo, template=(t + k) % len(TEMPLATES)) for k in range(1, len(TEMPLATES))]
    assert set(others) <= set(bank.bank)
    # the paraphrase provider offers exactly those other wordings, for memorized captions only
    assert (
        providers[job.PARAPHRASE](mem[0], 25) == others
        and providers[job.PARAPHRASE](src_caps[split["heldout"][0]], 25) == []
    )
    esplit = job.build_data(job.SIZES["toy"], str(tmp_path / "emoji"))
    assert job.PARAPHRASE not in job.candidate_providers(esplit, [])  # emoji captions have no other wordings
    with pytest.raises(SystemExit, match="another --out"):  # an emoji --out never silently becomes shapes
        job.build_data(size, str(tmp_path / "emoji"))


@pytest.mark.ray
def test_bench_prss_toy_end_to_end(real_emoji, ray_cluster, tmp_path, monkeypatch):
    job = _job()
    # the combined system's arm alone (a second process beside --stage model): the baseline is not touched
    assert job.main(["--size", "toy", "--out", str(tmp_path), "--stage", "plus"]) == 0
    assert json.loads((tmp_path / "iet-agc-plus" / "run.json").read_text())["rounds_completed"] == 4
    assert not (tmp_path / "baseline").exists()
    # a call whose budget is spent after the first training round stops with exit 3 and keeps that round
    assert job.main(["--size", "toy", "--out", str(tmp_path), "--time-budget-s", "0.01"]) == job.INCOMPLETE_EXIT
    assert not (tmp_path / "summary.json").exists()
    assert job.main(["--size", "toy", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "summary.json").read_text())
    assert res["guidance_scale"] == job.SIZES["toy"].guidance_scale
    assert res["total_steps"] == job.SIZES["toy"].train_steps  # no warm start: the size's own steps
    names = [r["name"] for r in res["methods"]]
    assert names[0] == "none" and len(names) == len(set(names))
    methods = {r["method"] for r in res["methods"]}
    assert {"random_token", "gaussian_noise", "wen", "pr", "ss", "prss", "prss-perturb", "prss-list"} <= methods
    assert f"prss-k{job.FEW_CANDIDATES}" in methods
    assert [r["level"] for r in res["methods"] if r["method"] == "prss-perstep"] == list(job.DEFEND_LEVELS)
    assert len(res["per_step_levels"][0]["pr_profile"]) == job.SIZES["toy"].sample_steps
    late = res["late_detection"]  # detection at a later step: a step of the first quarter, every level twice
    assert 1 <= late["detect_step"] <= late["window"] == max(1, int(job.SIZES["toy"].sample_steps * DETECT_WINDOW))
    for fam in ("prss-late", "prss-restart"):
        assert [r["level"] for r in res["methods"] if r["method"] == fam] == list(job.DEFEND_LEVELS)
    for r in res["methods"]:  # the contract of summary.json: these keys for every method and level
        for key in ("copy_mean", "copy_p95", "memorized_fraction", "alignment", "time_ratio", "triggered", "level"):
            assert key in r, (r["name"], key)
    prss = [r for r in res["methods"] if r["method"] == "prss"]
    assert [r["level"] for r in prss] == list(job.DEFEND_LEVELS)
    # defending a larger share of memorized prompts = lower thresholds = at least as many triggered
    lss = [lv["lambda_ss"] for lv in res["levels"]]
    assert lss == sorted(lss, reverse=True)
    assert [r["triggered"] for r in prss] == sorted(r["triggered"] for r in prss)
    assert res["methods"][0]["triggered"] == 0.0 and res["methods"][0]["time_ratio"] == 1.0
    assert res["untriggered"]["untriggered_equal"] is True
    assert late["untriggered"]["untriggered_equal"] is True and 0 <= late["untriggered"]["triggered_fraction"] <= 1
    alone = res["triggered_alone"]  # the memorized generations the mid level triggers on, timed by themselves
    assert 0 < alone["images"] <= 64 and alone["time_ratio"] > 0
    assert 0 <= alone["pr_steps"] <= job.SIZES["toy"].sample_steps
    assert res["targets"]["time"]["triggered_alone_time_ratio"] == alone["time_ratio"]
    assert alone["time_ratio_few_candidates"] > 0 and alone["few_candidates"] == job.FEW_CANDIDATES
    for n in ("1", "4"):
        assert 0.0 <= res["detection"][n]["auc"] <= 1.0 and 0.0 <= res["detection"][n]["tpr_at_1pct_fpr"] <= 1.0
        assert 0.0 <= late["detection"][n]["auc"] <= 1.0  # the same detector at the detection step
    assert [r["guidance_scale"] for r in res["regime"]] == list(job.REGIME_SCALES)
    # every lever at every high scale (the toy run keeps raw weights, so all of them run)
    assert [(r["guidance_scale"], r["lever"]) for r in res["regime_levers"]] == [
        (gs, name) for gs in job.LEVER_SCALES for name, _ in job.LEVERS
    ]
    plain_7 = next(r for r in res["regime_levers"] if r["guidance_scale"] == 7.5 and r["lever"] == "plain CFG")
    reg_7 = next(r for r in res["regime"] if r["guidance_scale"] == 7.5)
    # the levers' own loop is the undefended sampler: its plain-CFG row scores what the regime's does
    assert plain_7["memorized_prompts"]["copy_mean"] == pytest.approx(reg_7["memorized_prompts"]["copy_mean"])
    cal = res["copy_calibration"]
    assert res["extractor"].startswith("pixel") and cal["fpr"] <= job.COPY_FPR
    assert all(0.0 <= r["copy_over"] <= 1.0 for r in res["methods"])
    assert len(res["calibration"]["per_step"]["memorized"]["p50"]) == job.SIZES["toy"].sample_steps
    assert len(res["calibration"]["auc_by_step"]) == job.SIZES["toy"].sample_steps
    assert all(0.0 <= a <= 1.0 for a in res["calibration"]["auc_by_step"])
    assert {"plain + none", "IET-AGC+ + none"} <= set(res["combined"])
    assert {f"IET-AGC+ + PRSS-perstep {d}" for d in job.DEFEND_LEVELS} <= set(res["combined"])
    # plain training stopped early: every committed round of the undefended model, the last one the served model
    frontier = res["plain_frontier"]
    assert [p["round"] for p in frontier] == [1, 2, 3, 4] and frontier[-1]["steps"] == res["total_steps"]
    assert frontier[-1]["copy_mean"] == pytest.approx(res["combined"]["plain + none"]["copy_mean"], abs=1e-4)
    assert set(res["targets"]["combined_at_own_alignment"]) == set(res["combined"]) - {"plain + none"}
    assert "time" in res["targets"]
    md = (tmp_path / "results.md").read_text()
    assert "| prss | 0.9 |" in md and "Detection" in md and "Combined system" in md and "Regime" in md
    assert "Plain training stopped early" in md and "Matched alignment" in md
    assert "| prss-restart | 0.9 |" in md and f"Detection at step {late['detect_step']}" in md
    assert "Sampler levers" in md and "copies** when" in md
    for f in ("prss.png", "memorized_prompts.png", "regime.png", "regime-levers.png"):
        assert (tmp_path / f).stat().st_size > 1000
    # a second call reuses every cached stage and writes the same methods table
    assert job.main(["--size", "toy", "--out", str(tmp_path)]) == 0
    again = json.loads((tmp_path / "summary.json").read_text())
    assert [(r["name"], r["copy_mean"]) for r in again["methods"]] == [
        (r["name"], r["copy_mean"]) for r in prss and res["methods"]
    ]
    # a model-stage call (a calibration run) publishes its own summary under its own name; the
    # full benchmark's summary.json is left as it was
    monkeypatch.setattr(job, "RESULTS_DIR", str(tmp_path / "published"))
    argv = ["--size", "toy", "--out", str(tmp_path), "--stage", "model", "--publish", "--publish-name", "cont"]
    assert job.main(argv) == 0
    model = json.loads((tmp_path / "published" / "bench-prss-toy-cont.json").read_text())
    assert model["total_steps"] == job.SIZES["toy"].train_steps and "methods" not in model
    assert model["regime"] == res["regime"] and model["command"].endswith("--publish-name cont")
    assert (tmp_path / "published" / "bench-prss-toy-cont-levers.png").exists()
    assert json.loads((tmp_path / "summary.json").read_text())["methods"] == again["methods"]
    assert "the toy size's undefended model, 32 steps" in job.render(model, "unused.png")
    # without the lever study: no lever table, and no lever plot published (though OUT has an earlier one)
    argv = ["--size", "toy", "--out", str(tmp_path), "--stage", "model", "--skip-levers", "--publish"]
    assert job.main([*argv, "--publish-name", "bare"]) == 0
    bare = json.loads((tmp_path / "published" / "bench-prss-toy-bare.json").read_text())
    assert bare["regime_levers"] is None and bare["regime"] == res["regime"]
    assert not (tmp_path / "published" / "bench-prss-toy-bare-levers.png").exists()
    assert "Sampler levers" not in job.render(bare, "unused.png")


def test_arm_configs_split_the_steps_and_carry_the_warm_start(tmp_path):
    job = _job()
    # a warm-start source: 4,000 steps of its own on top of a 1,000-step init, 4 rounds of 1,000
    src = tmp_path / "prss" / "baseline"
    src.mkdir(parents=True)
    rounds = [{"round": r, "steps": 1000, "round_s": 1.0} for r in range(1, 5)]
    (src / "run.json").write_text(json.dumps({"rounds_completed": 4, "init": {"steps": 1000}, "rounds": rounds}))
    size = job.Size(**{**job.SIZES["cpu"].__dict__, "init_from": f"{src}@3"})
    split = {"train": "runs/prss/data/train.parquet"}
    base, plus = job.arm_config(size, split, "baseline"), job.arm_config(size, split, "iet-agc-plus")
    assert base.shards.count == 1 and plus.shards.count == size.shards
    steps = lambda cfg: cfg.train.rounds * cfg.train.steps_per_round * cfg.shards.count  # noqa: E731
    # the undefended model continues its warm start; the defence never inherits it: it trains from
    # scratch for the same total (the source's steps through round 3 included)
    assert steps(base) == size.train_steps and base.train.init_from == f"{src}@3"
    assert steps(plus) == size.train_steps + 1000 + 3 * 1000 and plus.train.init_from is None
    assert job.total_steps(str(src)) == 5000
    gone = job.Size(**{**size.__dict__, "init_from": str(tmp_path / "nothing")})
    with pytest.raises(SystemExit, match="nothing: no run there"):
        job.arm_config(gone, split, "iet-agc-plus")
    for cfg in (base, plus):
        assert cfg.model.caption_dropout == size.caption_dropout
        assert cfg.model.prediction_type == size.prediction_type == "epsilon"
    # the prediction target reaches both arms' configs; a target the model does not know is refused there
    vpred = job.Size(**{**size.__dict__, "prediction_type": "v_prediction"})
    assert job.arm_config(vpred, split, "iet-agc-plus").model.prediction_type == "v_prediction"
    with pytest.raises(ValueError, match="prediction_type"):
        job.arm_config(job.Size(**{**size.__dict__, "prediction_type": "x0"}), split, "baseline")
    # an IET-AGC+ run to continue: both arms train train_steps more, each from its own source
    cont = job.Size(**{**size.__dict__, "plus_init_from": "runs/prss/iet-agc-plus"})
    plus2 = job.arm_config(cont, split, "iet-agc-plus")
    assert steps(plus2) == size.train_steps and plus2.train.init_from == "runs/prss/iet-agc-plus"
    plain = job.SIZES["cpu"]
    for method in ("baseline", "iet-agc-plus"):
        cfg = job.arm_config(plain, split, method)
        assert cfg.train.init_from is None and steps(cfg) == plain.train_steps and cfg.train.rounds == 4
    # more rounds: a finer early-stopping frontier, the same steps in all
    fine = job.Size(**{**plain.__dict__, "rounds": 8})
    for method in ("baseline", "iet-agc-plus"):
        cfg = job.arm_config(fine, split, method)
        assert cfg.train.rounds == 8 and steps(cfg) == plain.train_steps


def test_the_combined_system_is_compared_with_plain_training_stopped_early():
    job = _job()

    def row(copied: float, mem: float, alignment: float) -> dict:
        return {"copy_mean": 0.9, "copy_p95": 0.95, "copy_over": copied, "memorized_fraction": mem,
                "alignment": alignment}  # fmt: skip

    # plain training's checkpoints: more aligned, and copying more, the longer it trains
    curve = [(0.0, 0.0, 0.05), (0.2, 0.0, 0.30), (0.9, 0.1, 0.40), (1.0, 0.1, 0.44)]
    frontier = [{"round": r, "steps": 1000 * r, **row(*p)} for r, p in enumerate(curve, 1)]
    assert job.early_stopping(frontier, 0.10)["round"] == 2 and job.early_stopping(frontier, 0.5) is None
    combined = {
        "plain + none": row(1.0, 0.1, 0.44),
        "IET-AGC+ + none": row(0.1, 0.0, 0.42),
        "IET-AGC+ + PRSS 0.9": row(0.0, 0.0, 0.10),
    }
    t = job.combined_targets(combined, frontier)
    assert t["combined_matched_alignment_q"] == pytest.approx(0.95 * 0.44)
    m = t["combined_matched_alignment"]  # only the last checkpoint is within 5% of the best alignment
    assert m["name"] == "IET-AGC+ + none" and m["early_stopping"]["round"] == 4
    assert m["copied_reduction"] == pytest.approx(0.9) and m["alignment_change"] == pytest.approx(0.42 / 0.44 - 1)
    # a row below Q is compared with plain training stopped as early as its own alignment allows
    own = t["combined_at_own_alignment"]["IET-AGC+ + PRSS 0.9"]
    assert own["early_stopping"]["steps"] == 2000 and own["copied_reduction"] == pytest.approx(1.0)
    text = "\n".join(job.combined_lines({"targets": t, "plain_frontier": frontier}))
    assert "| 2 | 2,000 |" in text and "copied -90%" in text
    # no row reaches Q: the target is unmeasurable, and the report says so
    lower = job.combined_targets({k: v for k, v in combined.items() if k != "IET-AGC+ + none"}, frontier)
    assert lower["combined_matched_alignment"] is None
    assert "unmeasurable" in "\n".join(job.combined_lines({"targets": lower, "plain_frontier": frontier}))
    # without checkpoints the final model is the only point of the frontier
    alone = job.combined_targets(combined, None)["combined_matched_alignment"]
    assert alone["early_stopping"]["copy_over"] == 1.0 and alone["copied_reduction"] == pytest.approx(0.9)


def test_guidance_intervals_name_the_guided_steps():
    job = _job()
    assert job.guided_steps((0.0, 1.0), 50) == range(50)
    assert job.guided_steps((0.0, 0.6), 50) == range(30)
    assert job.guided_steps((0.2, 1.0), 50) == range(10, 50)
    assert job.guided_steps((0.5, 0.51), 4) == range(2, 3)  # never empty
    for bad in ((0.6, 0.2), (-0.1, 1.0), (0.0, 1.5)):
        with pytest.raises(ValueError, match="guidance interval"):
            job.guided_steps(bad, 50)


def test_a_model_stage_summary_renders_its_regime_tables():
    job = _job()
    row = {"copy_mean": 0.9, "copy_p95": 0.95, "copy_over": 0.5, "memorized_fraction": 0.1, "alignment": 0.3}
    s = {
        "command": "python jobs/bench_prss.py --stage model",
        "what": "a calibration run",
        "regime": [{"guidance_scale": 7.5, "memorized_prompts": {**row, "copies_own": 0.1}, "heldout_prompts": row}],
        "regime_levers": [
            {"guidance_scale": 7.5, "lever": "guidance rescale 0.7", "memorized_prompts": {**row, "copies_own": 0.0},
             "heldout_prompts": row}
        ],
    }  # fmt: skip
    md = job.render(s, "unused.png")
    assert "a calibration run" in md and "| 7.5 | 10.0% | 50.0% |" in md
    assert "| 7.5 | guidance rescale 0.7 | 50.0% |" in md
    assert "Memorized prompts, same seeds" not in md
    assert "own captions" not in md  # summaries published before the reference was measured
    md = job.render({**s, "reference_alignment": {"memorized": 0.512, "heldout": 0.487}}, "unused.png")
    assert "memorized 0.512, held-out 0.487" in md


def test_dominance_names_who_beats_whom_on_the_privacy_alignment_plot():
    job = _job()

    def pt(name, method, copy, align):
        return {"name": name, "method": method, "copy_mean": copy, "alignment": align}

    rows = [
        pt("none", "none", 0.9, 0.30),
        pt("prss 0.5", "prss", 0.70, 0.15),  # beats random_token 1 (more private and better aligned)
        pt("prss 0.9", "prss", 0.65, 0.05),  # beaten by gaussian_noise 1.0
        pt("random_token 1", "random_token", 0.75, 0.10),
        pt("gaussian_noise 1.0", "gaussian_noise", 0.64, 0.06),
        pt("wen 0.9", "wen", 0.88, 0.29),  # no PRSS point on its side of the plot: neither wins
        pt("pr 0.9", "pr", 0.60, 0.01),  # PRSS's parts are not baselines
    ]
    dom = job.dominance(rows)
    assert dom == {"prss_dominated": ["prss 0.9"], "baselines_dominated": ["random_token 1"]}
    # equal on both axes is not a win
    assert job.dominance([pt("p", "prss", 0.7, 0.1), pt("w", "wen", 0.7, 0.1)]) == {
        "prss_dominated": [],
        "baselines_dominated": [],
    }


def test_late_detection_picks_the_best_early_step_and_keeps_reanchoring_thresholds():
    job = _job()
    rng = np.random.default_rng(0)
    steps = 20
    mem, held = rng.normal(1.0, 0.1, (40, steps)), rng.normal(1.0, 0.1, (200, steps))
    mem[:, 3] += 1.0  # step 4 separates memorized from held-out trajectories ...
    mem[:, 15] += 5.0  # ... step 16 better still, but past the window (a restart would cost 15 steps)
    mags = {"mem": mem, "held": held}
    cal = job.calibrate(mags, 20, 2)
    assert cal["auc_by_step"][15] == 1.0 and cal["auc_by_step"][3] > 0.99
    late = job.late_calibration(mags, cal["levels"])
    assert late["window"] == 5 and late["detect_step"] == 4 and late["auc"] == cal["auc_by_step"][3]
    for first, lv in zip(cal["levels"], late["levels"], strict=True):
        assert (lv["lambda_pr"], lv["tau"], lv["defend"]) == (first["lambda_pr"], first["tau"], first["defend"])
        # lambda_ss on step 4's scale: it triggers on the share named, and on no held-out prompt
        assert lv["memorized_triggered"] == pytest.approx(lv["defend"], abs=0.05)
        assert lv["heldout_triggered"] == 0.0 and lv["lambda_ss"] > first["lambda_ss"]
    arms = job.method_arms(cal["levels"], cal["levels"][2], late)
    restart = [kw for name, method, _, kw in arms if method == "prss-restart"]
    assert len(restart) == len(job.DEFEND_LEVELS) and all(kw["restart"] and kw["detect_step"] == 4 for kw in restart)
    assert [a[0] for a in arms[: len(job.method_arms(cal["levels"], cal["levels"][2]))]] == [
        a[0] for a in job.method_arms(cal["levels"], cal["levels"][2])
    ]  # new arms come last: a cached run's arms keep their names and order
    reworded = job.method_arms(cal["levels"], cal["levels"][2], late, reword=True)
    n = len(arms)
    assert [a[0] for a in reworded[:n]] == [a[0] for a in arms] and reworded[n][0] == "reworded"
    assert reworded[n][3] == {"prss": False, "reword": True} and "reworded" not in [a[0] for a in arms]
    # then SS alone and PRSS at every level over exact paraphrases, each level's own thresholds
    para = reworded[n + 1 :]
    assert [(m, lv) for _, m, lv, _ in para] == [("ss-paraphrase", job.MID_LEVEL)] + [
        ("prss-paraphrase", d) for d in job.DEFEND_LEVELS
    ]
    assert para[0][3]["prss_mode"] == "ss" and all(kw["candidates"] == job.PARAPHRASE for *_, kw in para)
    for (*_, kw), lv in zip(para[1:], cal["levels"], strict=True):
        assert kw["lambda_ss"] == lv["lambda_ss"] and kw["lambda_pr"] == lv["lambda_pr"] and "prss_mode" not in kw
    assert "prss-paraphrase" in job.PRSS_CURVES and not any("paraphrase" in a[1] for a in arms)
    # per-step re-anchoring thresholds: PRSS at every level, last, over the paraphrases where there are any
    perstep = job.per_step_levels(mags, cal["levels"])
    for lv, base in zip(perstep, cal["levels"], strict=True):
        assert lv["lambda_ss"] == base["lambda_ss"] and len(lv["pr_profile"]) == steps
    with_ps = job.method_arms(cal["levels"], cal["levels"][2], late, reword=True, perstep=perstep)
    assert [a[0] for a in with_ps[: len(reworded)]] == [a[0] for a in reworded]
    tail = with_ps[len(reworded) :]
    assert [(m, lv) for _, m, lv, _ in tail] == [("prss-perstep", d) for d in job.DEFEND_LEVELS]
    assert all(kw["candidates"] == job.PARAPHRASE and kw["pr_profile"] == lv["pr_profile"]
               for (*_, kw), lv in zip(tail, perstep, strict=True))  # fmt: skip
    assert job.method_arms(cal["levels"], cal["levels"][2], late, perstep=perstep)[-1][3]["candidates"] == "bank"


def test_search_choices_counts_what_semantic_search_picks_from(real_emoji, tmp_path):
    """On a real (untrained, seeded) tiny text-to-image pipeline over a shapes split."""
    import pyarrow.parquet as pq
    import torch

    from memshard.config import load_config
    from memshard.models.unet import build_scheduler, build_unet
    from memshard.prss.pipeline import load_served_t2i, write_served_t2i
    from memshard.prss.sampler import first_step_magnitude

    job = _job()
    size = job.Size(**{**job.SIZES["toy"].__dict__, "source": "shapes"})
    split = job.build_data(size, str(tmp_path / "shapes"))
    cfg = load_config(
        {
            "data": {"path": split["train"], "image_size": 16, "channels": 3},
            "model": {"preset": "tiny", "text_conditional": True, "max_text_length": 16},
        }
    )
    torch.manual_seed(0)
    write_served_t2i(
        str(tmp_path / "served"), build_unet(cfg), dict(build_scheduler(cfg).config), cfg.model.model_dump()
    )
    pipe = load_served_t2i(str(tmp_path / "served"))
    caps = pq.read_table(split["source"], columns=["caption"]).column("caption").to_pylist()
    mem = [caps[i] for i in split["memorized"]][:3]
    providers = job.candidate_providers(split, mem)
    prompts, seeds = [c for c in mem for _ in range(2)], list(range(6))
    m0 = first_step_magnitude(
        pipe.eps, pipe.encode_prompts, dict(pipe.scheduler.config), prompts, pipe.initial_noise(6, seeds=seeds), 4
    )
    x_T = pipe.initial_noise(6, seeds=seeds)
    # a threshold under which generation i has a paraphrase while its own prompt stays over it
    under = []
    for i, p in enumerate(prompts):
        para = providers[job.PARAPHRASE](p, 8)
        mc = first_step_magnitude(
            pipe.eps, pipe.encode_prompts, dict(pipe.scheduler.config), para, x_T[i : i + 1].expand(2, -1, -1, -1), 4
        )
        under += [float(mc.min())] if float(mc.min()) < float(m0[i]) else []
    assert under  # seeded: some generation's paraphrase has the lower magnitude
    levels = [  # nothing triggers; a paraphrase is under; every generation triggers and no candidate is under
        {"defend": 0.1, "lambda_ss": float(m0.max()) + 1.0},
        {"defend": 0.5, "lambda_ss": under[0]},
        {"defend": 0.99, "lambda_ss": -1.0},
    ]
    out = job.search_choices(pipe, providers, prompts, seeds, 4, levels, num_candidates=8)
    assert set(out) == {job.DEFAULT_PROVIDER, job.PARAPHRASE}
    for rows in out.values():
        assert [r["level"] for r in rows] == [0.1, 0.5, 0.99]
        assert rows[0]["triggered"] == 0 and rows[2]["triggered"] == 6 and rows[2]["with_below"] == 0
        assert rows[1]["triggered"] == int((m0 > levels[1]["lambda_ss"]).sum())
        for r in rows:
            assert 0 <= r["same_content"] <= r["with_below"] <= r["triggered"]
    # a paraphrase always names the prompt's own content
    para = out[job.PARAPHRASE][1]
    assert para["same_content"] == para["with_below"] > 0
