"""The Ray-free training core of one proxy."""

import numpy as np
import pytest
import torch

from memshard.config import load_config
from memshard.iet.proxy import Proxy, ShardData, batch_order, steps_for
from memshard.models.unet import build_unet, unet_config
from memshard.seeds import round_seed

BASE = ["train.batch_size=4", "train.warmup_steps=1", "model.num_train_timesteps=50"]


def _data(n=12, size=16, labels=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    imgs = torch.randint(0, 256, (n, 1, size, size), generator=g, dtype=torch.uint8)
    lab = torch.arange(n) % 10 if labels else None
    return ShardData(ids=np.arange(100, 100 + n, dtype=np.int64), images=imgs, labels=lab)


def _weights_equal(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def test_round_statistics_add_up():
    cfg = load_config("demo", BASE)
    proxy = Proxy(cfg, shard_id=0, device=torch.device("cpu"))
    res = proxy.train_round(1, _data(), steps=3)
    assert res.visits.sum() == 3 * 4 and (res.skips <= res.visits).all()
    assert res.ids.tolist() == list(range(100, 112))
    assert np.isnan(res.mean_loss[res.visits == 0]).all()
    assert np.isfinite(res.mean_loss[res.visits > 0]).all()
    assert proxy.step == 3


def test_agc_off_never_skips_but_bank_is_kept():
    cfg = load_config("demo", [*BASE, "method=iet"])
    proxy = Proxy(cfg, 0, torch.device("cpu"))
    res = proxy.train_round(1, _data(), steps=6)
    assert res.skips.sum() == 0
    assert proxy.bank.abs().sum() > 0  # statistics still recorded


def test_agc_skips_with_a_high_bank():
    cfg = load_config("demo", BASE)
    proxy = Proxy(cfg, 0, torch.device("cpu"))
    proxy.bank.fill_(1e6)  # every loss is "abnormally low" against this bank
    res = proxy.train_round(1, _data(), steps=2)
    assert res.skips.sum() == res.visits.sum() == 8


def test_class_conditional_and_v_prediction_train():
    cfg = load_config("demo", [*BASE, "model.class_conditional=true", "model.prediction_type=v_prediction"])
    proxy = Proxy(cfg, 0, torch.device("cpu"))
    assert proxy.unet.config.num_class_embeds == 10
    before = {k: v.clone() for k, v in proxy.unet.state_dict().items()}
    res = proxy.train_round(1, _data(), steps=2)
    assert np.isfinite(res.mean_batch_loss)
    assert not _weights_equal(before, proxy.unet.state_dict())


def test_state_round_trip_reproduces_the_next_round_exactly():
    """A proxy rebuilt from (global weights, saved state) trains round 2 exactly like the original."""
    cfg = load_config("demo", BASE)
    a = Proxy(cfg, 1, torch.device("cpu"))
    a.train_round(1, _data(), steps=3)
    raw, ema = a.weights()
    tensors, meta = a.state()
    assert meta["rng"]["last_round_seed"] == round_seed(cfg.seed, 1, 1)
    b = Proxy(cfg, 1, torch.device("cpu"))
    b.load_state(tensors, meta)
    b.load_global(raw, ema)
    a.load_global(raw, ema)
    a.train_round(2, _data(), steps=3)
    b.train_round(2, _data(), steps=3)
    assert _weights_equal(a.unet.state_dict(), b.unet.state_dict())
    assert torch.equal(a.bank, b.bank) and a.step == b.step == 6


def test_rounds_and_shards_get_different_random_streams():
    assert round_seed(0, 1, 0) != round_seed(0, 2, 0) != round_seed(0, 1, 1)
    order = batch_order(10, 5, 4, np.random.default_rng(0))
    assert order.shape == (5, 4)
    # every sample once per epoch: the first 10 indices are a permutation
    assert sorted(order.reshape(-1)[:10].tolist()) == list(range(10))


def test_steps_from_epochs():
    cfg = load_config("demo", ["train.steps_per_round=null", "train.epochs_per_round=2", "train.batch_size=10"])
    assert steps_for(cfg, 45) == 9


def test_model_from_diffusers_config_and_pretrained_dir(tmp_path):
    cfg = load_config("demo", BASE)
    unet = build_unet(cfg)
    unet.save_pretrained(tmp_path / "unet")
    cfg2 = load_config("demo", [*BASE, f"model.preset={tmp_path / 'unet'}"])
    loaded = build_unet(cfg2)
    assert _weights_equal(unet.state_dict(), loaded.state_dict())
    cfg3 = load_config("demo", [*BASE, f"model.preset={tmp_path / 'unet' / 'config.json'}"])
    assert unet_config(cfg3)["block_out_channels"] == list(unet.config.block_out_channels)
    with pytest.raises(ValueError, match="neither a built-in preset"):
        unet_config(load_config("demo", ["model.preset=nope"]))
