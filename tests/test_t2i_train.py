"""Text-conditional IET-AGC(+) training on a real local Ray cluster: caches, served pipelines."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from memshard.config import ConfigError, load_config
from memshard.data import DataError
from memshard.iet.proxy import Proxy, ShardData
from memshard.models.text import TextCond
from tests.conftest import TINY
from tests.t2i_data import write_captioned_parquet

pytestmark = pytest.mark.ray


def t2i_config(data: str, extra: dict | None = None) -> dict:
    raw = {
        "data": {"path": data, "image_size": 16, "channels": 3},
        "model": {"preset": "tiny", "text_conditional": True, "max_text_length": 12},
        "method": "iet-agc-plus",
        "shards": {"count": 2},
    }
    for key, value in (extra or {}).items():
        raw.setdefault(key, {}).update(value) if isinstance(value, dict) else raw.__setitem__(key, value)
    return raw


@pytest.fixture(scope="module")
def t2i_run(ray_cluster, tmp_path_factory):
    from memshard.runtime.driver import train

    root = tmp_path_factory.mktemp("t2i")
    data = write_captioned_parquet(str(root / "shapes.parquet"), 24)
    cfg = load_config(t2i_config(data), [o for o in TINY if not o.startswith("data.limit")])
    out = train(cfg, out=str(root / "run"))
    assert out.complete
    return root, data, out


def test_caption_cache_built_once_and_reused(t2i_run, ray_cluster):
    from memshard.data.conditioning import build_caches, load_text
    from memshard.models.text import load_text_encoder

    _root, data, out = t2i_run
    caches = out.manifest["caches"]
    assert caches["text"] is not None and caches["latent"] is None
    assert caches["text"].startswith(data + ".memshard-cache")
    meta_path = os.path.join(caches["text"], "cache.json")
    before = os.stat(meta_path).st_mtime_ns
    cfg = load_config(t2i_config(data), [o for o in TINY if not o.startswith("data.limit")])
    again = build_caches(cfg, data, np.arange(24), in_process=False)
    assert again.text == caches["text"]
    assert os.stat(meta_path).st_mtime_ns == before  # reused, not recomputed
    # the cached states are the encoder's output for those captions (float16-rounded)
    got = load_text(caches["text"], np.array([5, 0]))
    enc = load_text_encoder("minilm", 12)
    from memshard.data import load_captions

    want = enc.encode(load_captions(data, np.array([5, 0])))
    assert load_captions(data, np.array([5]))[0].endswith("number 5")
    assert torch.equal(got.mask, want.mask)
    assert torch.allclose(got.states.float(), want.states, atol=2e-3)


def test_served_t2i_pipeline_loads_and_samples(t2i_run):
    from memshard.prss.pipeline import MemshardTextToImagePipeline

    _, _, out = t2i_run
    served = os.path.join(out.run_uri, "served")
    index = json.loads(open(os.path.join(served, "model_index.json")).read())
    assert index["_class_name"] == "MemshardTextToImagePipeline"
    pipe = MemshardTextToImagePipeline.from_pretrained(served)
    cond = pipe.encode_prompts(["a red square", ""])
    assert cond.states.shape == (2, 12, 384)
    x = torch.randn(2, 3, 16, 16)
    eps = pipe.eps(x, torch.tensor([10, 10]), cond)
    assert eps.shape == x.shape and torch.isfinite(eps).all()


def test_caption_dropout_uses_the_empty_prompt():
    cfg = load_config(
        {
            "data": {"source": "digits", "image_size": 8, "channels": 3},
            "model": {"preset": "tiny", "text_conditional": True, "caption_dropout": 0.5},
        }
    )
    proxy = Proxy(cfg, 0, torch.device("cpu"))
    n, length, dim = 64, 4, 384
    text = TextCond(torch.ones(n, length, dim), torch.ones(n, length, dtype=torch.bool))
    empty = TextCond(torch.zeros(1, length, dim), torch.tensor([[True, False, False, False]]))
    data = ShardData(
        ids=np.arange(n), images=torch.zeros(n, 3, 8, 8, dtype=torch.uint8), labels=None, text=text, empty_text=empty
    )
    cond = proxy._cond(data, torch.arange(n), torch.Generator().manual_seed(0))
    dropped = cond.states.abs().sum((1, 2)) == 0
    assert 10 < int(dropped.sum()) < 54  # about half, drawn per sample
    assert (cond.mask[dropped].sum(1) == 1).all() and (cond.mask[~dropped].sum(1) == length).all()
    cond2 = proxy._cond(data, torch.arange(n), torch.Generator().manual_seed(0))
    assert torch.equal(cond.states, cond2.states)  # seeded
    # a round reports the rate the model actually saw (what the shard summary and the benchmark record)
    res = proxy.train_round(0, data, steps=20)
    assert res.captions_dropped is not None and 0.35 < res.captions_dropped < 0.65
    data.empty_text = None  # no empty prompt: nothing can be dropped, and the report says so
    assert proxy.train_round(1, data, steps=2).captions_dropped == 0.0


def test_text_model_needs_a_caption_column(ray_cluster, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from memshard.runtime.driver import train

    path = write_captioned_parquet(str(tmp_path / "c.parquet"), 8)
    table = pq.read_table(path).drop(["caption"])
    pq.write_table(table, str(tmp_path / "nocap.parquet"))
    cfg = load_config(t2i_config(str(tmp_path / "nocap.parquet")), [o for o in TINY if not o.startswith("data.limit")])
    with pytest.raises(DataError, match="caption"):
        train(cfg, out=str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()
    del pa


def test_text_config_cross_checks():
    with pytest.raises(ConfigError, match="exclusive"):
        load_config(t2i_config("x.parquet", {"model": {"class_conditional": True}, "data": {"num_classes": 3}}))
    with pytest.raises(ConfigError, match=r"model\.pipeline"):
        load_config(t2i_config("x.parquet", {"model": {"text_encoder": "pipeline"}}))


def test_sd_pipeline_fine_tune_serves_a_stable_diffusion_pipeline(ray_cluster, tmp_path):
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    from memshard.runtime.driver import train
    from memshard.testing.tiny_pipeline import write_tiny_sd_pipeline

    sd = write_tiny_sd_pipeline(str(tmp_path / "tinysd"), image_size=32)
    data = write_captioned_parquet(str(tmp_path / "shapes32.parquet"), 12, size=32)
    cfg = load_config(
        "sd-finetune",
        [
            f"model.pipeline={sd}",
            f"data.path={data}",
            "data.image_size=32",
            "model.max_text_length=32",
            "shards.count=2",
            "train.rounds=1",
            "train.steps_per_round=2",
            "train.batch_size=4",
            "train.lr=1e-3",
            "resources.cpus_per_shard=0.5",
            "logging.progress=false",
        ],
    )
    out = train(cfg, out=str(tmp_path / "run"))
    assert out.complete and out.manifest["caches"]["latent"] is not None
    served = os.path.join(out.run_uri, "served")
    pipe = StableDiffusionPipeline.from_pretrained(served, safety_checker=None)
    img = pipe("a red square", num_inference_steps=2, output_type="np", height=32, width=32).images
    assert img.shape == (1, 32, 32, 3)
    # only the UNet was trained: VAE and text encoder are the source pipeline's, bit for bit
    for part, name in (("vae", "diffusion_pytorch_model.safetensors"), ("text_encoder", "model.safetensors")):
        a = load_file(os.path.join(sd, part, name))
        b = load_file(os.path.join(served, part, name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ua = load_file(os.path.join(sd, "unet", "diffusion_pytorch_model.safetensors"))
    ub = load_file(os.path.join(served, "unet", "diffusion_pytorch_model.safetensors"))
    assert any(not torch.equal(ua[k], ub[k]) for k in ua)


def _report(path) -> list[dict]:
    return [json.loads(line) for line in open(path)]


def test_sample_cli_prss_report_and_untriggered_equality(t2i_run, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from memshard.cli import main

    _, _, out = t2i_run
    run = out.run_uri
    prompts = ["a red square number 0", "a blue circle number 7"]
    args = [a for p in prompts for a in ("--prompt", p)]
    assert main(["sample", run, *args, "--steps", "4", "--no-prss", "--out", str(tmp_path / "plain")]) == 0
    # a threshold nothing reaches: PRSS must not change a single pixel
    assert main(["sample", run, *args, "--steps", "4", "--lambda-ss", "1e9", "--out", str(tmp_path / "high")]) == 0
    # a threshold everything reaches: triggered, re-anchored, and a different image
    low = ["--lambda-ss", "1e-6", "--lambda-pr", "1e-6", "--tau", "1e-3"]
    assert main(["sample", run, *args, "--steps", "4", *low, "--out", str(tmp_path / "low")]) == 0
    for i in range(2):
        a = np.asarray(Image.open(tmp_path / "plain" / "images" / f"{i:05d}.png"))
        b = np.asarray(Image.open(tmp_path / "high" / "images" / f"{i:05d}.png"))
        c = np.asarray(Image.open(tmp_path / "low" / "images" / f"{i:05d}.png"))
        assert np.array_equal(a, b) and not np.array_equal(a, c)
    plain, high, lowr = (_report(tmp_path / d / "report.jsonl") for d in ("plain", "high", "low"))
    for rep in (plain, high, lowr):
        assert [r["prompt"] for r in rep] == prompts
        assert all({"prompt", "magnitude", "triggered", "chosen_prompt", "pr_steps"} <= r.keys() for r in rep)
    assert not any(r["triggered"] for r in high) and all(r["chosen_prompt"] == r["prompt"] for r in high)
    assert all(r["triggered"] and r["pr_steps"] == 4 and r["chosen_prompt"] != r["prompt"] for r in lowr)
    assert [r["magnitude"] for r in plain] == [r["magnitude"] for r in high]  # same first-step call
    assert (tmp_path / "low" / "grid.png").is_file()

    # explicit candidate lists from a Parquet prompts file: the choice comes from the list
    table = pa.table({"prompt": prompts, "candidates": [["a red box", "red square"], ["a navy ring"]]})
    pq.write_table(table, tmp_path / "prompts.parquet")
    assert main(["sample", run, "--prompts-file", str(tmp_path / "prompts.parquet"), "--steps", "3", *low,
                 "--out", str(tmp_path / "lists")]) == 0  # fmt: skip
    reps = _report(tmp_path / "lists" / "report.jsonl")
    assert [r["candidates_scored"] for r in reps] == [2, 1]  # exactly the given lists were searched
    # nothing reaches 1e-6, so the lowest magnitude wins, the original included (spec)
    assert reps[0]["chosen_prompt"] in ("a red box", "red square", prompts[0])
    assert reps[1]["chosen_prompt"] in ("a navy ring", prompts[1])


def test_sample_cli_refuses_bad_prompts(t2i_run, tmp_path, capsys):
    from memshard.cli import main

    _, _, out = t2i_run
    assert main(["sample", out.run_uri, "--prompt", "  ", "--out", str(tmp_path / "x")]) == 2
    assert "prompt 0 is empty" in capsys.readouterr().err
    long = " ".join(["word"] * 40)  # more tokens than max_text_length=12
    assert main(["sample", out.run_uri, "--prompt", long, "--out", str(tmp_path / "y")]) == 2
    assert "tokens" in capsys.readouterr().err
    assert main(["sample", out.run_uri, "--out", str(tmp_path / "z")]) == 2
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_baseline_mitigations_run_through_the_pipeline(t2i_run):
    from memshard.prss.pipeline import load_served_t2i

    _, _, out = t2i_run
    pipe = load_served_t2i(os.path.join(out.run_uri, "served"))
    base = pipe(["a red square number 0"], num_inference_steps=3, prss=False, seeds=[3], output_type="pt").images
    for name, params in (("random_token", {}), ("gaussian_noise", {"sigma": 0.5}), ("wen", {"target": 0.0})):
        res = pipe(["a red square number 0"], num_inference_steps=3, seeds=[3], output_type="pt", mitigation=name,
                   mitigation_params=params)  # fmt: skip
        assert res.report[0]["mitigation"] == name and res.report[0]["original_prompt"] == "a red square number 0"
        assert not torch.equal(res.images, base), name


def test_calibrate_prss_sets_the_thresholds_sample_uses(t2i_run, tmp_path):
    from memshard.cli import main
    from memshard.prss.calibration import level, load_calibration

    _, _, out = t2i_run
    run = out.run_uri
    assert main(["calibrate-prss", run, "--quantile", "0.5", "--num-prompts", "6", "--steps", "3"]) == 0
    cal = load_calibration(run)
    assert cal["q"] == 0.5 and cal["tau"] == pytest.approx(cal["lambda_pr"] * 5 / 3)
    prompts = ["a red square number 0", "a green circle number 4", "a blue cross number 8", "a yellow square"]
    args = [a for p in prompts for a in ("--prompt", p)]
    assert main(["sample", run, *args, "--steps", "3", "--out", str(tmp_path / "cal")]) == 0
    for rep in _report(tmp_path / "cal" / "report.jsonl"):
        assert rep["triggered"] == (rep["magnitude"] > cal["lambda_ss"])
    # a threshold on the command line wins over the calibration
    assert main(["sample", run, *args, "--steps", "3", "--lambda-ss", "1e9", "--out", str(tmp_path / "cli")]) == 0
    assert not any(r["triggered"] for r in _report(tmp_path / "cli" / "report.jsonl"))
    # a later detection step: lambda_ss on that step's scale, and sample detects there (scaled to its steps)
    cal_args = ["calibrate-prss", run, "--quantile", "0.5", "--num-prompts", "6", "--steps", "3"]
    assert main([*cal_args, "--detect-step", "2"]) == 0
    late = load_calibration(run)
    assert late["detect_step"] == 2 and late["lambda_ss"] != cal["lambda_ss"]
    for steps, step in (("3", 2), ("5", 3)):
        assert main(["sample", run, *args, "--steps", steps, "--out", str(tmp_path / f"late{steps}")]) == 0
        for rep in _report(tmp_path / f"late{steps}" / "report.jsonl"):
            assert rep["detect_step"] == step
            assert rep["triggered"] == (rep["detect_magnitude"] > late["lambda_ss"])
    assert main([*cal_args, "--detect-step", "4"]) == 2  # past the last step: refused
    assert main(["sample", run, *args, "--steps", "3", "--detect-step", "4", "--out", str(tmp_path / "x")]) == 2
    assert main(cal_args) == 0  # the module's run keeps the first-step calibration
    assert load_calibration(run)["detect_step"] == 1
    assert level([1.0, 2.0, 3.0], [4.0, 6.0], 0.5) == {"q": 0.5, "lambda_ss": 2.0, "lambda_pr": 5.0, "tau": 5.0 * 5 / 3}
    with pytest.raises(ValueError, match="quantile"):
        level([1.0], [1.0], 1.0)


def test_sample_scales_a_run_configs_detection_step_to_its_step_count(t2i_run, tmp_path):
    """prss.detect_reference_steps in the run's config is honoured by `memshard sample` as by the server."""
    import shutil

    from memshard.cli import main

    _, _, out = t2i_run
    run = str(tmp_path / "run")
    shutil.copytree(out.run_uri, run)
    shutil.rmtree(os.path.join(run, "prss"), ignore_errors=True)  # no calibration: the config's values
    manifest = json.load(open(os.path.join(run, "run.json")))
    manifest["config"].setdefault("prss", {}).update(detect_step=2, detect_reference_steps=3)
    json.dump(manifest, open(os.path.join(run, "run.json"), "w"))
    args = ["--prompt", "a red square number 0", "--lambda-ss", "1e9"]
    for steps, extra, step in (("3", [], 2), ("5", [], 3), ("9", [], 4), ("5", ["--detect-step", "2"], 2)):
        dest = tmp_path / f"s{steps}{len(extra)}"
        assert main(["sample", run, *args, "--steps", steps, *extra, "--out", str(dest)]) == 0
        assert [r["detect_step"] for r in _report(dest / "report.jsonl")] == [step], (steps, extra)
    # a calibration written before it recorded its step count: its step, unscaled
    os.makedirs(os.path.join(run, "prss"))
    old = {"lambda_ss": 1e9, "lambda_pr": 1.0, "tau": 2.0, "detect_step": 2}
    json.dump(old, open(os.path.join(run, "prss", "calibration.json"), "w"))
    assert main(["sample", run, "--prompt", "a red square", "--steps", "9", "--out", str(tmp_path / "old")]) == 0
    assert [r["detect_step"] for r in _report(tmp_path / "old" / "report.jsonl")] == [2]


def test_calibrate_prss_defends_the_duplicated_captions_by_default(ray_cluster, tmp_path, capsys):
    """On a set with duplicated captions the default level is stated against them, its cost against the rest."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from memshard.cli import main
    from memshard.prss.calibration import DEFAULT_DEFEND, duplicated_captions, load_calibration
    from memshard.runtime.driver import train

    data = write_captioned_parquet(str(tmp_path / "d.parquet"), 16)
    table = pq.read_table(data)
    caps = table.column("caption").to_pylist()
    caps[:8] = ["a red square"] * 5 + ["a green circle"] * 3  # two duplicated captions, eight once-seen
    pq.write_table(table.set_column(2, "caption", pa.array(caps)), data)
    assert duplicated_captions(caps) == (["a red square", "a green circle"], sorted(caps[8:]))
    cfg = load_config(t2i_config(data, {"shards": {"count": 1}}), [o for o in TINY if not o.startswith("data.limit")])
    run = train(cfg, out=str(tmp_path / "run")).run_uri
    for bad in (["--defend", "1.5"], ["--defend", "0.9", "--quantile", "0.5"]):
        assert main(["calibrate-prss", run, *bad]) == 2
        assert "--" in capsys.readouterr().err
    assert load_calibration(run) is None  # refused before any work
    assert main(["calibrate-prss", run, "--num-prompts", "4", "--steps", "3"]) == 0
    cal = load_calibration(run)
    assert cal["defend"] == DEFAULT_DEFEND and "duplicated" in cal["reference"]
    assert cal["lambda_ss"] < cal["first_step_quantiles"]["0.99"]  # the 0.1-quantile of the duplicated ones
    assert 0.5 <= cal["memorized_triggered"] <= 1.0 and 0.0 <= cal["heldout_triggered"] <= 1.0
    assert "defend 90% of the duplicated captions" in capsys.readouterr().out
    # re-anchoring thresholds per step by default: one positive multiplier per step, median 1
    prof = cal["pr_profile"]
    assert len(prof) == 3 and all(v > 0 for v in prof) and sorted(prof)[1] == pytest.approx(1.0, rel=1e-4)
    # which memshard sample and the server apply with the calibration's lambda_pr, and drop with an operator's
    from memshard.serving.requests import server_prss

    assert (
        server_prss(run)[0].pr_profile == prof
        and server_prss(run, {"lambda_pr": 50.0, "tau": 80.0})[0].pr_profile is None
    )
    # memshard sample applies the profile: with thresholds every image passes at every step, a profile that
    # lifts lambda_pr out of reach leaves no step re-anchored, and a flat one re-anchors every step
    store = tmp_path / "run" / "prss" / "calibration.json"
    for scale, want in ((1e12, 0), (1.0, 3)):
        store.write_text(json.dumps({**cal, "lambda_ss": 1e-6, "lambda_pr": 1e-6, "tau": 2e-6,
                                     "pr_profile": [scale] * 3, "detect_step": 1}))  # fmt: skip
        out = tmp_path / f"samples-{scale:g}"
        assert main(["sample", run, "--prompt", "a red square", "--steps", "3", "--out", str(out)]) == 0
        rep = _report(out / "report.jsonl")
        assert rep[0]["triggered"] and rep[0]["pr_steps"] == want, scale
    # --flat-pr: the spec's one threshold
    assert main(["calibrate-prss", run, "--num-prompts", "4", "--steps", "3", "--flat-pr"]) == 0
    flat = load_calibration(run)
    assert "pr_profile" not in flat and flat["lambda_ss"] == cal["lambda_ss"] and server_prss(run)[0].pr_profile is None


def test_bad_pipeline_or_encoder_is_refused_before_the_run_dir(ray_cluster, tmp_path):
    from memshard.runtime.driver import RunError, train

    data = write_captioned_parquet(str(tmp_path / "c.parquet"), 8)
    over = [o for o in TINY if not o.startswith("data.limit")]
    bad = {"model": {"pipeline": str(tmp_path / "nope"), "text_encoder": "pipeline"}}
    cfg = load_config(t2i_config(data, bad), over)
    with pytest.raises(RunError, match="nope"):
        train(cfg, out=str(tmp_path / "run1"))
    cfg = load_config(t2i_config(data, {"model": {"text_encoder": str(tmp_path / "no-encoder")}}), over)
    with pytest.raises(RunError, match="no-encoder"):
        train(cfg, out=str(tmp_path / "run2"))
    assert not (tmp_path / "run1").exists() and not (tmp_path / "run2").exists()
