"""What a newcomer meets first (issue 17, "the doors"): help, bad counts, bad paths, PRSS option errors,
datasets refused before the cluster starts, and Ctrl-C during training.

Ray-free except the Ctrl-C test, which runs ``memshard train`` as a user would, in its own process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from memshard.cli import build_parser, main
from memshard.config import preset_names
from tests.conftest import TINY

ROOT = Path(__file__).resolve().parents[1]


def _fake_run(root: Path, class_name: str) -> str:
    """A run directory with only what the CLI reads before loading a model: the served model's index."""
    served = root / "run" / "served"
    served.mkdir(parents=True)
    (served / "model_index.json").write_text(json.dumps({"_class_name": class_name}))
    return str(root / "run")


def _subparsers(parser):
    action = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return action.choices


def test_every_option_has_help_and_help_shows_defaults(capsys):
    parser = build_parser()
    missing = []
    for name, sub in _subparsers(parser).items():
        subs = [(name, sub)]
        if name == "config":
            subs = [(f"config {n}", s) for n, s in _subparsers(sub).items()]
        for full, sp in subs:
            missing += [f"{full} {a.option_strings[0]}" for a in sp._actions if a.option_strings and not a.help]
    assert not missing, f"options without help: {missing}"
    with pytest.raises(SystemExit):
        main(["sample", "--help"])
    out = capsys.readouterr().out
    assert "(default: 64)" in out and "(default: ema)" in out and "--prss-mode" in out
    with pytest.raises(SystemExit):
        main(["prepare", "--help"])
    out = capsys.readouterr().out
    assert "emoji" in out and ".parquet" in out
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.startswith("memshard ")
    assert main(["config", "presets"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == preset_names()
    assert all(len(line.split()) > 3 for line in lines)  # a line that says what each preset is


@pytest.mark.parametrize(
    "argv",
    [
        ["sample", "RUN", "--num", "0"],
        ["sample", "RUN", "--num", "-1"],
        ["sample", "RUN", "--steps", "0"],
        ["evaluate", "RUN", "--num", "0"],
        ["evaluate", "RUN", "--steps", "0"],
        ["prepare", "digits", "--out", "x.parquet", "--limit", "0"],
        ["prepare", "digits", "--out", "x.parquet", "--size", "0"],
        ["serve", "RUN", "--max-images", "0"],
    ],
)
def test_counts_below_one_are_refused_before_any_work(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {argv[-2]}: must be >= 1 (got {argv[-1]})" in err and "Traceback" not in err


def test_prss_option_errors_are_one_line_and_never_ignored(tmp_path, capsys):
    t2i = _fake_run(tmp_path / "t2i", "MemshardTextToImagePipeline")
    assert main(["sample", t2i, "--prompt", "a cat", "--lambda-ss", "1e9", "--lambda-pr", "1e9"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--tau must exceed --lambda-pr" in err
    assert "pydantic" not in err and "http" not in err
    assert main(["sample", t2i, "--prompt", "a cat", "--num-candidates", "1", "--candidates", "bank"]) == 2
    assert "--bank" in capsys.readouterr().err  # a bank without its file, named by its option
    ddpm = _fake_run(tmp_path / "ddpm", "DDPMPipeline")
    assert main(["sample", ddpm, "--lambda-ss", "2", "--no-prss"]) == 2
    err = capsys.readouterr().err
    assert "--prss/--no-prss, --lambda-ss apply to text-to-image runs only" in err


def test_output_paths_that_cannot_be_written_are_refused_before_any_work(tmp_path, capsys):
    (tmp_path / "a_file").write_text("not a folder")
    ddpm = _fake_run(tmp_path, "DDPMPipeline")  # no weights: refusing the path must come first
    assert main(["sample", ddpm, "--out", str(tmp_path / "a_file" / "x.png")]) == 2
    err = capsys.readouterr().err
    assert f"cannot write {tmp_path / 'a_file' / 'x.png'}" in err and "choose another --out" in err
    assert main(["prepare", "digits", "--out", str(tmp_path / "a_file" / "d.parquet")]) == 2
    assert "choose another --out" in capsys.readouterr().err
    t2i = _fake_run(tmp_path / "t2i", "MemshardTextToImagePipeline")
    assert main(["sample", t2i, "--prompt", "a cat", "--out", str(tmp_path / "a_file")]) == 2
    assert "it is a file, not a directory" in capsys.readouterr().err
    out = tmp_path / "new" / "deeper" / "d.parquet"  # a missing folder is created
    assert main(["prepare", "digits", "--out", str(out), "--limit", "8"]) == 0 and out.is_file()


@pytest.mark.parametrize("case", ["empty-file", "no-image-column"])
def test_dataset_errors_are_reported_before_the_cluster_starts(case, tmp_path, capsys, monkeypatch):
    from memshard.runtime import driver

    def no_cluster_yet(cfg):  # a spy, not a stand-in: reaching it is the failure
        raise AssertionError("the cluster was joined before the dataset was checked")

    monkeypatch.setattr(driver, "connect", no_cluster_yet)
    data = tmp_path / "data.parquet"
    if case == "empty-file":
        data.write_bytes(b"")
    else:
        pq.write_table(pa.table({"id": [0, 1], "picture": [b"x", b"y"]}), data)
    over = [o for o in TINY if not o.startswith("data.limit")]
    argv = ["train", "demo", "--out", str(tmp_path / "run")]
    for kv in [*over, "data.source=null", f"data.path={data}"]:
        argv += ["--set", kv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert str(data) in err and ("image" in err if case == "no-image-column" else "Parquet" in err), err
    assert not (tmp_path / "run").exists()


@pytest.mark.ray
def test_ctrl_c_during_training_says_what_was_kept_and_how_to_resume(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(ROOT)}
    sets = [*TINY, "train.rounds=20", "train.steps_per_round=4"]
    argv = [sys.executable, "-m", "memshard", "train", "demo", "--out", str(out)]
    for kv in sets:
        argv += ["--set", kv]
    # a shell's background job (CI runners, `cmd &`) starts with SIGINT ignored, and children inherit
    # that: give memshard the disposition a terminal's foreground process has
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            manifest = out / "run.json"
            if manifest.exists() and json.loads(manifest.read_text()).get("rounds_completed", 0) >= 1:
                break
            time.sleep(0.5)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    kept = json.loads((out / "run.json").read_text())["rounds_completed"]
    assert f"interrupted after round {kept}; rounds 1..{kept} kept in {out}" in err
    assert f"--out {out} --resume" in err and "KeyboardInterrupt" not in err and "Traceback" not in err
    assert "will be retried" not in err and err.rstrip().endswith("--resume")  # the last thing said is how to go on


def test_a_failed_copy_calibration_is_said_next_to_the_figure():
    from memshard.evaluation.evaluate import summary_lines
    from memshard.evaluation.frontier import points_table
    from memshard.evaluation.metrics import calibration_problem
    from memshard.evaluation.metrics.frontier import checkpoint_from_metrics

    good = {"tpr": 0.96, "fpr": 0.03, "copy_mean": 0.93, "distinct_mean": 0.71}
    assert calibration_problem(good) is None
    inverted = {"tpr": 0.004, "fpr": 0.0, "copy_mean": 0.62, "distinct_mean": 0.80}  # the metrics.json
    assert "copies score lower than distinct images" in calibration_problem(inverted)
    weak = {"tpr": 0.30, "fpr": 0.20, "copy_mean": 0.85, "distinct_mean": 0.80}
    assert "balanced accuracy 0.55" in calibration_problem(weak)
    m = {
        "memorized_fraction": 0.1, "num_samples": 16, "nn_ratio_fraction": {"0.3": 0.1},
        "copy_similarity": {"extractor": "inception", "mean": 0.5, "p95": 0.7, "threshold": 0.9, "over_threshold": 0.0},
        "fid": 40.0, "fid_num_samples": 16, "fid_num_reference": 64, "round": 1,
        "copy_calibration_problem": calibration_problem(inverted),
    }  # fmt: skip
    lines = summary_lines(m)
    assert "NOT CALIBRATED" in lines[2] and "copies score lower" in lines[2] and "over 0.900" not in lines[2]
    assert "NOT CALIBRATED" not in summary_lines({**m, "copy_calibration_problem": None})[2]
    row = {**checkpoint_from_metrics("plain", m).to_dict(), "early_stopping_memorized": 0.1}
    assert "0.700*" in points_table({"rows": [row]}) and "not calibrated" in points_table({"rows": [row]})


def test_long_stages_draw_a_bar_on_a_terminal_and_nothing_in_a_log():
    import io

    from rich.console import Console

    from memshard.runtime.progress import Stage

    term = Console(file=io.StringIO(), force_terminal=True, width=100)
    with Stage("features of training images", 10, term) as bar:
        assert bar.drawn
        for _ in range(10):
            bar.advance()
    term_text = term.file.getvalue()
    assert "features of training images" in term_text and "10/10" in term_text
    log = Console(file=io.StringIO(), force_terminal=False)
    with Stage("generation", 10, log) as bar:
        bar.advance(10)
    assert not bar.drawn and log.file.getvalue() == ""


def test_prepare_says_how_many_images_it_enlarged_or_cropped(tmp_path, capsys):
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, size in enumerate([(32, 32), (32, 32), (8, 8), (40, 20)]):  # one small, one not square
        Image.new("RGB", size, (40 * i, 0, 0)).save(folder / f"{i}.png")
    assert main(["prepare", str(folder), "--out", str(tmp_path / "d.parquet"), "--size", "16"]) == 0
    out = capsys.readouterr().out
    assert "1 image(s) were smaller than 16x16 and were enlarged" in out and "1 image(s) were not square" in out
    assert main(["prepare", str(folder), "--out", str(tmp_path / "e.parquet"), "--size", "8"]) == 0
    assert "enlarged" not in capsys.readouterr().out


def test_config_show_describe_comments_every_documented_key(capsys):
    import yaml

    from memshard.config import load_config

    assert main(["config", "show", "iet-agc-plus", "--describe"]) == 0
    text = capsys.readouterr().out
    assert yaml.safe_load(text) == load_config("iet-agc-plus").to_dict()  # the comments change no value
    ratio = next(line for line in text.splitlines() if line.strip().startswith("ratio:"))
    assert "  # r: keep sample j iff" in ratio
    # each algorithm constant says where its default comes from
    assert "[default 2.0: paper (r = 2" in ratio
    line = {ln.strip().split(":")[0]: ln for ln in text.splitlines() if ln.startswith("  ")}
    assert "[default memshard: memshard (the prototype: torchvision)]" in line["scale"]
    assert "[default 5.0: prototype" in line["max_magnitude"]
    lr = next(ln for ln in text.splitlines() if ln.strip().startswith("lr:"))
    assert "[default 0.0002: authors' code" in lr  # the preset sets 0.001; the comment still names the default


def test_an_evaluation_says_its_cost_before_it_starts():
    from memshard.evaluation.evaluate import EvalOptions, plan_line

    line = plan_line(EvalOptions(num=16, steps=5, fid_num=8), rounds=3, stored=2)
    assert "3 checkpoint(s) x 16 samples x 5 DDIM steps = 240 UNet evaluations" in line
    assert "features of 24 generations" in line and "2 round(s) already evaluated" in line and "cached" in line
