"""Config: presets, YAML, dotted overrides, validation naming the key, `config show`."""

import subprocess
import sys

import pytest
import yaml

from memshard.config import ConfigError, MemshardConfig, load_config, preset_names


def test_spec_defaults_are_fields():
    cfg = MemshardConfig.model_validate({"data": {"path": "x.parquet"}})
    assert cfg.shards.count == 10
    assert cfg.train.lr == 2e-4 and cfg.train.optimizer == "adam" and cfg.train.weight_decay == 0
    assert cfg.train.grad_clip == 1.0 and cfg.train.ema_decay == 0.9999
    assert cfg.train.warmup_epochs == 15 and cfg.train.rounds == 10 and cfg.train.epochs_per_round == 100
    assert cfg.agc.ratio == 2.0 and cfg.agc.bank_decay == 0.8 and cfg.agc.bank_init == 0.0


def test_demo_preset_and_overrides():
    assert "demo" in preset_names()
    cfg = load_config("demo", ["train.rounds=3", "agc.ratio=1.25", "shards.policy=random", "seed=7"])
    assert cfg.train.rounds == 3 and cfg.agc.ratio == 1.25 and cfg.shards.policy == "random" and cfg.seed == 7
    assert cfg.data.source == "digits" and cfg.shards.count == 4


def test_contract_keys_exist():
    cfg = load_config(
        "demo",
        [
            "seed=1",
            "shards.count=2",
            "shards.policy=random",
            "train.rounds=2",
            "train.steps_per_round=5",
            "train.batch_size=8",
            "method=iet",
            "agc.ratio=3",
            "agc.bank_decay=0.5",
        ],
    )
    assert (cfg.seed, cfg.shards.count, cfg.train.batch_size, cfg.agc.enabled, cfg.agc.bank_decay) == (
        1,
        2,
        8,
        False,
        0.5,
    )


@pytest.mark.parametrize(
    "override,key",
    [
        ("train.roundz=3", "train.roundz"),
        ("agc.ratio=-1", "agc.ratio"),
        ("shards.policy=clever", "shards.policy"),
        ("train.batch_size=many", "train.batch_size"),
        ("nosuchsection.x=1", "nosuchsection"),
    ],
)
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError) as exc:
        load_config("demo", [override])
    assert key in str(exc.value)


def test_malformed_override():
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config("demo", ["train.rounds"])
    with pytest.raises(ConfigError, match="not a section"):
        load_config("demo", ["seed.x=1"])


def test_yaml_file_with_extends(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("extends: demo\ntrain:\n  rounds: 9\n")
    cfg = load_config(str(f))
    assert cfg.train.rounds == 9 and cfg.data.source == "digits"


def test_missing_config_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="neither a file nor a built-in preset"):
        load_config("no-such-config")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))


def test_cross_field_checks():
    with pytest.raises(ConfigError, match="num_classes"):
        load_config("demo", ["model.class_conditional=true", "data.num_classes=null"])
    with pytest.raises(ConfigError, match=r"data\.path"):
        load_config("demo", ["data.source=null"])


def test_config_show_cli_prints_resolved_yaml():
    out = subprocess.run(
        [sys.executable, "-m", "memshard", "config", "show", "demo", "--set", "train.rounds=5"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    data = yaml.safe_load(out)
    assert data["train"]["rounds"] == 5 and data["agc"]["bank_decay"] == 0.8


def test_cli_bad_key_exits_2_with_message():
    res = subprocess.run(
        [sys.executable, "-m", "memshard", "config", "show", "demo", "--set", "agc.ratoi=2"],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 2 and "agc.ratoi" in res.stderr
