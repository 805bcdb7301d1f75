"""NaN/inf losses inside one proxy: the step is skipped, counted, and past a limit training stops.

The bad sample is real data corruption (a NaN in one latent), not a patched loss. Both ways the
proxy skips are covered: the for-loop optimizer (CPU; the flag is read on the host) and a fused
optimizer (what CUDA uses; the skip is decided on the device via ``found_inf``), which also runs
on CPU. A hand-written loop pins the math: clean data must train bit for bit as the loop does,
and bad data as the loop does when it drops every batch holding the bad sample.
"""

import numpy as np
import pytest
import torch

from memshard.config import load_config
from memshard.iet import agc as skip
from memshard.iet.proxy import NonFiniteLossError, Proxy, ShardData, batch_order, warmup_for
from memshard.runtime.coordinator import round_summary
from memshard.runtime.progress import summary_line
from memshard.seeds import round_seed
from tests.test_proxy import BASE

N, BATCH, BAD = 12, 4, 5  # BAD: row of the corrupt sample; its id is 100 + BAD
PATHS = ["host", "device"]


def _latents(bad: int | None = BAD, value: float = float("nan")) -> ShardData:
    """Float rows (the latent path, so a NaN can live in the data); ``bad`` gets ``value`` in one pixel."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (N, 1, 16, 16), generator=g, dtype=torch.uint8).float().div(127.5).sub(1.0)
    if bad is not None:
        x[bad, 0, 3, 7] = value
    return ShardData(ids=np.arange(100, 100 + N, dtype=np.int64), images=x, labels=None)


def _proxy(path: str, extra=(), shard: int = 0) -> Proxy:
    cfg = load_config("demo", [*BASE, *extra])
    p = Proxy(cfg, shard, torch.device("cpu"))
    if path == "device":  # the CUDA setting: a fused optimizer skips on the device
        t = cfg.train
        params = [q for q in p.unet.parameters() if q.requires_grad]
        p.optimizer = torch.optim.Adam(
            params, lr=t.lr, betas=t.betas, eps=t.eps, weight_decay=t.weight_decay, fused=True
        )
    return p


def _order(p: Proxy, round_id: int, steps: int) -> np.ndarray:
    seed = round_seed(p.cfg.seed, round_id, p.shard_id)
    return batch_order(N, steps, p.cfg.train.batch_size, np.random.default_rng(seed))


def _bad_batches(p: Proxy, round_id: int, steps: int, bad: int = BAD) -> int:
    return int((_order(p, round_id, steps) == bad).any(axis=1).sum())


def _reference_round(p: Proxy, data: ShardData, round_id: int, steps: int) -> None:
    """The IET-AGC step written out by hand (masked loss, clip, Adam, EMA, bank), for the demo setting.

    A batch whose loss is not finite is dropped whole after its random draws, which is the
    contract of the proxy; on clean data this is the loop as it was before the check existed.
    """
    cfg = p.cfg
    assert cfg.model.prediction_type == "epsilon" and not cfg.model.class_conditional and cfg.agc.enabled
    seed = round_seed(cfg.seed, round_id, p.shard_id)
    torch.manual_seed(seed)
    order = torch.from_numpy(_order(p, round_id, steps))
    gen = torch.Generator().manual_seed(seed)
    warmup = warmup_for(cfg, len(data))
    for i in range(steps):
        idx = order[i]
        x0 = data.x0(idx)
        t = torch.randint(0, cfg.model.num_train_timesteps, (idx.numel(),), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        ac = p.alphas_cumprod[t].view(-1, 1, 1, 1)
        xt = ac.sqrt() * x0 + (1 - ac).sqrt() * noise
        p.optimizer.zero_grad(set_to_none=True)
        per = skip.per_sample_loss(p.unet(xt, t, class_labels=None).sample, noise)
        if not torch.isfinite(per).all():
            continue
        skip.masked_loss(per, skip.keep_mask(per, p.bank, t, cfg.agc.ratio)).backward()
        for group in p.optimizer.param_groups:
            group["lr"] = p.lr_at(i, warmup)
        torch.nn.utils.clip_grad_norm_(p.unet.parameters(), cfg.train.grad_clip)
        p.optimizer.step()
        for k, v in p.unet.state_dict().items():
            p.ema[k].lerp_(v, 1 - cfg.train.ema_decay)
        p.bank = skip.update_bank(p.bank, per.detach(), t, cfg.agc.bank_decay)


def _same_training(a: Proxy, b: Proxy) -> bool:
    sa, sb = a.unet.state_dict(), b.unet.state_dict()
    opt_a, opt_b = a.optimizer.state_dict()["state"], b.optimizer.state_dict()["state"]
    return (
        all(torch.equal(sa[k], sb[k]) for k in sa)
        and all(torch.equal(a.ema[k], b.ema[k]) for k in a.ema)
        and torch.equal(a.bank, b.bank)
        and opt_a.keys() == opt_b.keys()
        and all(torch.equal(opt_a[i][n], opt_b[i][n]) for i in opt_a for n in opt_a[i])
    )


def _all_finite(p: Proxy) -> bool:
    tensors = [*p.unet.state_dict().values(), *p.ema.values(), p.bank]
    tensors += [v for s in p.optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    return all(torch.isfinite(v.float()).all() for v in tensors)


@pytest.mark.parametrize("path", PATHS)
def test_clean_data_trains_exactly_as_before(path):
    """No bad data: nothing counted, and the weights are bit-identical to the unchecked loop and to no limit."""
    steps = 7
    p, unlimited, ref = _proxy(path), _proxy(path, ["train.max_nonfinite_steps=1000000000"]), _proxy(path)
    res = p.train_round(1, _latents(bad=None), steps=steps)
    unlimited.train_round(1, _latents(bad=None), steps=steps)
    _reference_round(ref, _latents(bad=None), 1, steps)
    assert res.nonfinite_steps == 0 and p.nonfinite_steps == 0 and len(res.nonfinite_ids) == 0
    assert res.visits.sum() == steps * BATCH
    assert _same_training(p, ref) and _same_training(p, unlimited)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("path", PATHS)
def test_a_corrupt_sample_skips_exactly_its_batches(path, value):
    steps = 9  # three epochs: the bad sample is in three batches
    p, ref = _proxy(path), _proxy(path)
    expected = _bad_batches(p, 1, steps)
    assert expected == 3
    res = p.train_round(1, _latents(value=value), steps=steps)
    _reference_round(ref, _latents(value=value), 1, steps)

    assert res.nonfinite_steps == p.nonfinite_steps == expected
    assert res.nonfinite_ids.tolist() == [100 + BAD] and p.nonfinite_ids == [100 + BAD]
    assert _all_finite(p)
    assert _same_training(p, ref)  # the other batches trained exactly as if the bad ones never came
    # Adam's own step count did not advance on skipped steps; the proxy's budget did
    assert all(int(s["step"]) == steps - expected for s in p.optimizer.state.values()) and p.step == steps
    # the skipped batches leave no statistics: the bad sample was never visited, the rest finite
    assert res.visits[BAD] == 0 and res.visits.sum() == (steps - expected) * BATCH
    assert np.isfinite(res.mean_batch_loss) and np.isfinite(res.mean_loss[res.visits > 0]).all()
    _, meta = p.state()
    assert meta["nonfinite_steps"] == expected and meta["nonfinite_ids"] == [100 + BAD]


@pytest.mark.parametrize("path", PATHS)
def test_threshold_skipping_and_taa_skip_the_bad_batches_too(path):
    steps = 12
    for extra in (
        ["agc.decide_before_backward=true"],
        ["method=null", "taa.enabled=true", "taa.mode=queue", "taa.queue_every=4", "agc.ratio=1.0"],
        ["method=null", "taa.enabled=true", "taa.mode=inline", "agc.ratio=1.0"],
    ):
        p = _proxy(path, extra)
        res = p.train_round(1, _latents(), steps=steps)
        regular = steps - res.extra_steps  # queue mode spends part of the budget on augmented batches
        rows = _order(p, 1, steps)[:regular]
        assert res.nonfinite_steps == int((rows == BAD).any(axis=1).sum()) > 0, extra
        assert res.nonfinite_ids.tolist() == [100 + BAD], extra
        assert _all_finite(p), extra
        assert res.visits[BAD] == 0 and res.augmented[BAD] == 0, extra
        if p.cfg.taa.enabled:
            assert np.isnan(res.mean_strength[BAD]) and 100 + BAD not in p.taa_strength, extra
    # one epoch inline: the bad sample's batch mates are seen only in the skipped batch, so no strength either
    p = _proxy(path, ["method=null", "taa.enabled=true", "taa.mode=inline"])
    res = p.train_round(1, _latents(), steps=3)
    mates = np.flatnonzero(res.visits == 0)
    assert res.nonfinite_steps == 1 and len(mates) == BATCH
    assert np.isnan(res.mean_strength[mates]).all() and not set(p.taa_strength) & set(100 + mates)


@pytest.mark.parametrize("path", PATHS)
def test_a_non_finite_augmented_step_is_skipped(path):
    data, strengths = _latents(), torch.tensor([0.5, 0.5])
    proxies = [_proxy(path, ["method=null", "taa.enabled=true"]) for _ in range(2)]
    gens = [(torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)) for _ in proxies]
    for q, (gen, aug_gen) in zip(proxies, gens, strict=True):  # one clean step each: real Adam moments
        assert q._augmented_step(data, torch.tensor([1, 0]), strengths, q.cfg.taa, gen, aug_gen, 1).all()
    p, other = proxies
    assert _same_training(p, other)
    finite = p._augmented_step(data, torch.tensor([BAD, 0]), strengths, p.cfg.taa, *gens[0], 1)
    assert finite.tolist() == [False, True]
    assert _same_training(p, other)  # nothing moved: weights, EMA, moments, Adam's step
    assert p._augmented_step(data, torch.tensor([2, 3]), strengths, p.cfg.taa, *gens[0], 1).all()
    assert not _same_training(p, other)  # while a clean augmented step does train


def test_zero_tolerance_raises_at_the_first_bad_step_naming_the_sample():
    p = _proxy("host", ["train.max_nonfinite_steps=0", "train.progress_every=1"], shard=2)
    first_bad = int(np.flatnonzero((_order(p, 1, 9) == BAD).any(axis=1))[0])
    with pytest.raises(NonFiniteLossError, match=r"shard 2, round 1: 1 optimizer steps") as err:
        p.train_round(1, _latents(), steps=9)
    assert f"[{100 + BAD}]" in str(err.value) and "train.max_nonfinite_steps=0" in str(err.value)
    assert p.step == first_bad + 1  # stopped at the check after that step, not at the end of the round


def test_the_limit_counts_over_rounds_and_survives_the_proxy_state():
    steps = 6  # two epochs: two bad batches per round
    p = _proxy("host", ["train.max_nonfinite_steps=3"])
    assert p.train_round(1, _latents(), steps=steps).nonfinite_steps == 2  # 2 <= 3: trains on
    tensors, meta = p.state()
    raw, ema = p.weights()
    q = _proxy("host", ["train.max_nonfinite_steps=3"])
    q.load_state(tensors, meta)
    q.load_global(raw, ema)
    assert q.nonfinite_steps == 2 and q.nonfinite_ids == [100 + BAD]
    for proxy in (p, q):
        with pytest.raises(NonFiniteLossError, match=rf"round 2: 4 optimizer steps.*\[{100 + BAD}\]"):
            proxy.train_round(2, _latents(), steps=steps)


def test_many_offending_ids_are_listed_up_to_twenty():
    data = _latents(bad=None)
    data.images[:] = float("nan")  # every sample corrupt
    images = data.images.repeat(3, 1, 1, 1)[:30]
    big = ShardData(ids=np.arange(1000, 1030, dtype=np.int64), images=images, labels=None)
    p = _proxy("host", ["train.max_nonfinite_steps=0"])
    with pytest.raises(NonFiniteLossError, match="8 optimizer steps") as err:
        p.train_round(1, big, steps=8)  # 32 visits: every one of the 30 ids has a NaN loss
    assert f"{list(range(1000, 1020))} and 10 more." in str(err.value)


def test_round_summary_and_line_carry_the_count():
    stats = {"visits": np.array([2, 2]), "skips": np.array([0, 1])}
    parts = [
        {"summary": {"shard": 0, "steps": 5, "loss": 0.5, "nonfinite_steps": 2}},
        {"summary": {"shard": 1, "steps": 5, "loss": 0.5, "nonfinite_steps": 1}},
    ]
    s = round_summary(3, parts, stats)
    assert s["nonfinite_steps"] == 3
    assert "non-finite loss: 3 steps skipped" in summary_line(s)
    assert "non-finite" not in summary_line({**s, "nonfinite_steps": 0})
