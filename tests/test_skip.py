"""AGC core: skip rule, masked loss, bank update (spec section 2)."""

import torch

from memshard.iet import agc as skip


def test_keep_rule_is_loss_times_ratio_against_bank():
    bank = torch.tensor([0.0, 1.0, 1.0, 2.0])
    t = torch.tensor([0, 1, 1, 3, 3])
    loss = torch.tensor([0.01, 0.5, 0.49, 1.0, 0.999])
    keep = skip.keep_mask(loss, bank, t, ratio=2.0)
    # l*r >= m: 0.02>=0 keep; 1.0>=1 keep; 0.98<1 skip; 2.0>=2 keep; 1.998<2 skip
    assert keep.tolist() == [True, True, False, True, False]


def test_zero_bank_skips_nothing():
    bank = torch.zeros(10)
    loss = torch.rand(64) * 1e-6
    t = torch.randint(0, 10, (64,))
    assert skip.keep_mask(loss, bank, t, 2.0).all()


def test_masked_loss_averages_kept_and_zero_grad_for_skipped():
    pred = torch.randn(4, 1, 2, 2, requires_grad=True)
    target = torch.zeros(4, 1, 2, 2)
    per = skip.per_sample_loss(pred, target)
    keep = torch.tensor([True, False, True, False])
    loss = skip.masked_loss(per, keep)
    assert torch.allclose(loss, (per[0] + per[2]) / 2)
    loss.backward()
    assert torch.all(pred.grad[1] == 0) and torch.all(pred.grad[3] == 0)
    assert pred.grad[0].abs().sum() > 0 and pred.grad[2].abs().sum() > 0


def test_all_skipped_batch_gives_zero_loss_with_graph():
    pred = torch.randn(3, 1, 2, 2, requires_grad=True)
    per = skip.per_sample_loss(pred, torch.zeros_like(pred))
    loss = skip.masked_loss(per, torch.zeros(3, dtype=torch.bool))
    assert loss.item() == 0.0
    loss.backward()  # still a valid graph, so the optimizer step can happen
    assert torch.all(pred.grad == 0)


def test_all_skipped_batch_still_steps_optimizer():
    w = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.Adam([w], lr=0.1)
    w.grad = torch.tensor([1.0, 1.0])
    opt.step()  # prime moments
    before = w.detach().clone()
    per = (w * 0 + 1.0).sum().unsqueeze(0).repeat(2)
    loss = skip.masked_loss(per, torch.zeros(2, dtype=torch.bool))
    opt.zero_grad()
    loss.backward()
    opt.step()
    # zero gradient, but Adam's momentum still moves the weights: the step happened
    assert not torch.equal(before, w.detach())


def test_per_sample_loss_is_mean_over_chw_in_fp32():
    pred = torch.ones(2, 3, 4, 4, dtype=torch.bfloat16)
    target = torch.zeros(2, 3, 4, 4)
    target[1] = 3.0
    out = skip.per_sample_loss(pred, target)
    assert out.dtype == torch.float32
    assert out.tolist() == [1.0, 4.0]


def test_bank_update_equals_sequential_with_repeated_timesteps():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        bank = torch.rand(7, generator=g)
        t = torch.randint(0, 7, (32,), generator=g)  # many duplicates
        loss = torch.rand(32, generator=g)
        fast = skip.update_bank(bank, loss, t, 0.8)
        ref = skip.update_bank_sequential(bank, loss, t, 0.8)
        assert torch.allclose(fast, ref, rtol=1e-6, atol=1e-7)


def test_bank_update_order_matters_and_is_batch_order():
    bank = torch.zeros(2)
    t = torch.tensor([1, 1])
    a = skip.update_bank(bank, torch.tensor([1.0, 0.0]), t, 0.5)
    b = skip.update_bank(bank, torch.tensor([0.0, 1.0]), t, 0.5)
    # sequential: first 1 then 0 -> 0.5*0.5*1 = 0.25 ; first 0 then 1 -> 0.5
    assert torch.allclose(a, torch.tensor([0.0, 0.25]))
    assert torch.allclose(b, torch.tensor([0.0, 0.5]))


def test_bank_update_leaves_unvisited_timesteps_and_input_untouched():
    bank = torch.tensor([1.0, 2.0, 3.0])
    out = skip.update_bank(bank, torch.tensor([10.0]), torch.tensor([1]), 0.8)
    assert out[0] == 1.0 and out[2] == 3.0
    assert torch.isclose(out[1], torch.tensor(0.8 * 2.0 + 0.2 * 10.0))
    assert bank.tolist() == [1.0, 2.0, 3.0]


def test_loss_ratio_inf_where_bank_empty():
    r = skip.loss_ratio(torch.tensor([1.0, 1.0]), torch.tensor([0.0, 2.0]), torch.tensor([0, 1]))
    assert torch.isinf(r[0]) and r[1] == 0.5
