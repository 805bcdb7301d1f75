"""IET-AGC+ parts inside one proxy: threshold skipping, TAA modes, proxy extrapolation."""

import numpy as np
import pytest
import torch

from memshard.config import ConfigError, load_config
from memshard.iet.proxy import Proxy
from tests.test_proxy import BASE, _data

# r = 1: skip iff l < m[t], so about half the visits are skipped once the bank has filled
SKIPPY = [*BASE, "agc.ratio=1.0", "model.num_train_timesteps=4"]


def _proxy(extra):
    return Proxy(load_config("demo", [*SKIPPY, *extra]), 0, torch.device("cpu"))


def test_decide_before_backward_gives_the_same_decisions_and_weights():
    masked = _proxy(["agc.decide_before_backward=false"])
    early = _proxy(["agc.decide_before_backward=true"])
    early.load_global(*masked.weights())
    a = masked.train_round(1, _data(), steps=12)
    b = early.train_round(1, _data(), steps=12)
    assert a.skips.sum() > 0 and a.skips.sum() < a.visits.sum()  # the case is not trivial
    assert np.array_equal(a.skips, b.skips) and np.array_equal(a.visits, b.visits)
    assert np.allclose(a.mean_loss, b.mean_loss, rtol=1e-4, atol=1e-6)
    wa, wb = masked.weights()[0], early.weights()[0]
    # to_k biases get ~0 true gradient (softmax shift invariance); Adam turns rounding noise there into
    # ~1e-6 moves, so the weights agree to 1e-5, not bit for bit
    assert all(torch.allclose(wa[k], wb[k], rtol=1e-4, atol=1e-5) for k in wa)
    assert torch.allclose(masked.bank, early.bank, rtol=1e-4, atol=1e-7)


def test_all_skipped_batch_still_steps_in_both_modes():
    for flag in ("false", "true"):
        p = _proxy([f"agc.decide_before_backward={flag}", "agc.bank_init=1000"])  # everything skipped
        before = {k: v.clone() for k, v in p.weights()[0].items()}
        res = p.train_round(1, _data(), steps=2)
        assert res.skips.sum() == res.visits.sum() == 8 and p.step == 2
        assert p.optimizer.state  # Adam took steps (with zero gradients)
        assert all(torch.equal(before[k], v) for k, v in p.weights()[0].items())  # zero grads, zero moments


@pytest.mark.parametrize("mode", ["queue", "inline", "prototype"])
def test_taa_records_strength_and_is_deterministic(mode):
    extra = ["method=null", "taa.enabled=true", f"taa.mode={mode}", "taa.queue_every=4"]
    p1, p2 = _proxy(extra), _proxy(extra)
    r1 = p1.train_round(1, _data(), steps=16)
    r2 = p2.train_round(1, _data(), steps=16)
    assert np.array_equal(r1.augmented, r2.augmented)
    assert all(torch.equal(a, b) for a, b in zip(p1.weights()[0].values(), p2.weights()[0].values(), strict=True))
    kept = r1.visits - r1.skips
    assert np.isfinite(r1.mean_strength[kept > 0]).any()
    s = r1.mean_strength[np.isfinite(r1.mean_strength)]
    assert ((s >= 0) & (s <= 1)).all()
    assert r1.augmented.sum() > 0
    if mode == "queue":
        # extra steps on augmented batches are part of the round's step budget
        assert r1.extra_steps > 0 and p1.step == 16 and r1.visits.sum() == (16 - r1.extra_steps) * 4
        assert r1.augmented.sum() == r1.extra_steps * 4
    elif mode == "prototype":
        # the budget counts regular batches (each only decides); an augmented step of the first 4 queued
        # follows each batch that brings the queue to 4, and the rest is dropped, never carried
        assert p1.step == 16 and r1.visits.sum() == 16 * 4
        assert 0 < r1.extra_steps <= 16 and r1.augmented.sum() == r1.extra_steps * 4
        assert r1.augmented.sum() <= kept.sum()
    else:
        assert r1.extra_steps == 0 and r1.visits.sum() == 16 * 4
        assert p1.taa_strength  # carried to the next round, and through a checkpoint
        tensors, meta = p1.state()
        p3 = _proxy(extra)
        p3.load_state(tensors, meta)
        assert p3.taa_strength == pytest.approx(p1.taa_strength)


def test_taa_changes_training_only_when_on():
    off = _proxy([])
    on = _proxy(["method=null", "taa.enabled=true", "taa.mode=inline"])
    on.load_global(*off.weights())
    a, b = off.train_round(1, _data(), steps=10), on.train_round(1, _data(), steps=10)
    assert a.augmented.sum() == 0 and np.isnan(a.mean_strength).all()
    assert b.augmented.sum() > 0
    assert not all(torch.equal(x, y) for x, y in zip(off.weights()[0].values(), on.weights()[0].values(), strict=True))


def test_extrapolated_start_and_own_weights_checkpoint():
    p = _proxy(["proxy.update=extrapolate", "proxy.extrapolate_factor=2", "proxy.extrapolate_rounds=1"])
    assert p.keeps_own_weights
    p.train_round(1, _data(), steps=2)
    own = {k: v.clone() for k, v in p.weights()[0].items()}
    glob = {k: v + 0.5 if v.is_floating_point() else v for k, v in own.items()}
    p.start_round(2, glob, None)
    for k, v in p.weights()[0].items():
        expect = 2 * glob[k] - own[k] if own[k].is_floating_point() else glob[k]
        assert torch.allclose(v, expect, atol=1e-6)
    p.start_round(3, glob, None)  # past R_e: the plain average
    assert all(torch.equal(v, glob[k]) for k, v in p.weights()[0].items())
    # own weights survive a checkpoint (needed to extrapolate or to skip aggregation after a restart)
    tensors, meta = p.state()
    q = _proxy(["proxy.update=extrapolate"])
    q.load_state(tensors, meta)
    assert all(torch.equal(v, glob[k]) for k, v in q.weights()[0].items())
    p.start_round(4, None, None)  # None: continue from own weights
    assert all(torch.equal(v, glob[k]) for k, v in p.weights()[0].items())


def test_method_key_sets_switches_and_refuses_contradictions():
    plus = load_config("demo", ["method=iet-agc-plus"])
    assert plus.agc.enabled and plus.msr.enabled and plus.taa.enabled and plus.agc.decide_before_backward
    assert (plus.msr.fraction, plus.msr.policy, plus.msr.every, plus.taa.alpha) == (0.25, "ring", 1, 5.0)
    iet = load_config("demo", ["method=iet"])
    assert not iet.agc.enabled and not iet.msr.enabled and iet.shards.count == 4
    base = load_config("demo", ["method=baseline", "shards.count=1"])
    assert base.shards.count == 1 and not base.agc.enabled
    with pytest.raises(ConfigError, match=r"shards.count=4 \(method baseline sets 1\)"):
        load_config("demo", ["method=baseline"])
    with pytest.raises(ConfigError, match=r"agc\.enabled=False"):
        load_config("demo", ["agc.enabled=false"])  # demo is method iet-agc
    with pytest.raises(ConfigError, match="method"):
        load_config("demo", ["method=iet-agc-pluss"])
    with pytest.raises(ConfigError, match="never average"):
        load_config("demo", ["method=iet-agc-plus", "msr.aggregate_on_migration=false"])
    # the resolved config round-trips (what run.json stores is valid again)
    assert load_config(plus.to_dict()) == plus
    assert load_config("iet-agc-plus").msr.enabled


def test_prototype_mode_trains_only_on_augmented_batches():
    """The authors' client: the regular batch takes no step; kept samples train only augmented."""
    # everything skipped: nothing is queued, so nothing trains at all (queue mode would still step)
    p = _proxy(["method=null", "taa.enabled=true", "taa.mode=prototype", "agc.bank_init=1000"])
    before = {k: v.clone() for k, v in p.weights()[0].items()}
    res = p.train_round(1, _data(), steps=4)
    assert res.skips.sum() == res.visits.sum() == 16 and res.extra_steps == 0
    assert not p.optimizer.state and all(torch.equal(before[k], v) for k, v in p.weights()[0].items())
    # nothing skipped (r huge), queue of 8 over batches of 4: a step every second batch, nothing dropped
    q = _proxy(["method=null", "taa.enabled=true", "taa.mode=prototype", "agc.ratio=1000"])
    res = q.train_round(1, _data(), steps=6)
    assert res.skips.sum() == 0 and res.extra_steps == 3 and res.augmented.sum() == 24
    # queue of 3 over batches of 4: every batch steps on its first 3 kept, 1 is dropped
    r = _proxy(["method=null", "taa.enabled=true", "taa.mode=prototype", "agc.ratio=1000", "taa.queue_every=3"])
    res = r.train_round(1, _data(), steps=6)
    assert res.extra_steps == 6 and res.augmented.sum() == 18 and res.visits.sum() == 24


def test_taa_torchvision_scale_trains_and_differs_from_memshard_scale():
    a = _proxy(["method=null", "taa.enabled=true", "taa.mode=inline"])
    b = _proxy(["method=null", "taa.enabled=true", "taa.mode=inline", "taa.scale=torchvision"])
    b.load_global(*a.weights())
    ra, rb = a.train_round(1, _data(), steps=10), b.train_round(1, _data(), steps=10)
    assert rb.augmented.sum() > 0 and np.array_equal(ra.visits, rb.visits)
    assert not all(torch.equal(x, y) for x, y in zip(a.weights()[0].values(), b.weights()[0].values(), strict=True))
