"""PRSS sampling core: guidance algebra, trigger and search, bitwise untriggered outputs, providers.

A tiny random UNet2DConditionModel and a hash-seeded toy ``encode`` stand in for a real
model (no text model loads). Memorization is *planted*: :class:`Planted` adds a fixed
offset of known norm to the conditional prediction of chosen prompts, so m(prompt) is known
in advance (offset + the tiny model's natural m of about 1) and so is which prompts trigger
and which candidate the search must choose.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from diffusers import DDIMScheduler, UNet2DConditionModel

from memshard.models.text import TextCond
from memshard.prss.candidates import BankProvider, ListProvider, PerturbProvider, load_bank, make_provider
from memshard.prss.reanchor import cfg_eps, magnitude, reanchor_scale, reanchored_eps
from memshard.prss.sampler import PRSSOptions, first_step_magnitude, sample

L, D = 6, 16
STEPS = 4
SCHED = dict(DDIMScheduler(num_train_timesteps=1000).config)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: the tiny model gains nothing from more, and on shared cores
    oversubscribed threads make each call many times slower. Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@functools.lru_cache(maxsize=1)
def tiny_unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=D,
        attention_head_dim=8,
        norm_num_groups=8,
    ).eval()


def toy_encode(prompts: list[str]) -> TextCond:
    """Deterministic states per prompt (seeded by its hash); real tokens = start + words, rest zero."""
    states, masks = [], []
    for p in prompts:
        seed = int.from_bytes(hashlib.sha256(p.encode()).digest()[:8], "little")
        s = torch.randn(L, D, generator=torch.Generator().manual_seed(seed))
        n = min(1 + len(p.split()), L)
        s[n:] = 0
        m = torch.zeros(L, dtype=torch.bool)
        m[:n] = True
        states.append(s)
        masks.append(m)
    return TextCond(torch.stack(states), torch.stack(masks))


def unet_eps(x: torch.Tensor, t: torch.Tensor, cond: TextCond) -> torch.Tensor:
    """The eps_fn a caller builds: a closure over the UNet (no forced no_grad inside)."""
    return tiny_unet()(x, t, encoder_hidden_states=cond.states, encoder_attention_mask=cond.mask).sample


def direction() -> torch.Tensor:
    d = torch.randn(3, 8, 8, generator=torch.Generator().manual_seed(123))
    return d / d.norm()


class Planted:
    """eps_fn wrapper: rows conditioned on a planted prompt get ``offset * direction`` added.

    Counts UNet calls and their batch sizes, so tests can check the call structure.
    """

    def __init__(self, offsets: dict[str, float], base: Callable = unet_eps) -> None:
        self.base = base
        self.offsets = offsets
        self.keys = {p: toy_encode([p]).states[0] for p in offsets}
        self.dir = direction()
        self.calls: list[int] = []

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: TextCond) -> torch.Tensor:
        self.calls.append(int(x.shape[0]))
        out = self.base(x, t, cond)
        k = torch.zeros(x.shape[0])
        for p, v in self.offsets.items():
            k[(cond.states == self.keys[p]).all(dim=(1, 2))] = v
        return out + k.view(-1, 1, 1, 1) * self.dir


OFFSETS = {"mem A": 100.0, "mem C": 100.0, "a1": 60.0, "a2": 5.0, "c1": 80.0, "c2": 30.0, "c3": 50.0, "worse": 150.0}
CANDS = {"mem A": ["a1", "a2", "a3 natural"], "safe B": ["b1", "b2"], "mem C": ["c1", "c2", "c3"]}
OPTS = PRSSOptions(lambda_ss=10.0, lambda_pr=20.0, tau=40.0)


def noise(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def run(prompts, x_T, opts=OPTS, **kw):
    eps = Planted(OFFSETS)
    cands = kw.pop("candidates", [CANDS.get(p, []) for p in prompts])
    x, rep = sample(eps, toy_encode, SCHED, prompts, x_T, STEPS, opts, candidates=cands, **kw)
    return x, rep, eps.calls


# -- guidance algebra -------------------------------------------------------------------


def test_guidance_algebra() -> None:
    g = torch.Generator().manual_seed(1)
    e0, ep, ess = (torch.randn(3, 3, 8, 8, generator=g) for _ in range(3))
    s = 7.5
    torch.testing.assert_close(cfg_eps(e0, ess, s), e0 + s * (ess - e0))
    # s_pr = 1: plain CFG with ess; s_pr = s: pure re-anchoring eps_p + s (eps_ss - eps_p)
    torch.testing.assert_close(reanchored_eps(ep, ess, e0, s, 1.0), cfg_eps(e0, ess, s))
    torch.testing.assert_close(reanchored_eps(ep, ess, e0, s, s), ep + s * (ess - ep))
    # per image: row 0 plain, row 1 pure, row 2 in between
    s_pr = torch.tensor([1.0, s, 3.0])
    out = reanchored_eps(ep, ess, e0, s, s_pr)
    torch.testing.assert_close(out[0], cfg_eps(e0, ess, s)[0])
    torch.testing.assert_close(out[1], (ep + s * (ess - ep))[1])
    torch.testing.assert_close(out[2], (ep + 3 * (ess - ep) + (s - 3) * (ess - e0))[2])
    # magnitude: per image, over all non-batch dims, no batch mean
    m = magnitude(ep, e0)
    assert m.shape == (3,)
    torch.testing.assert_close(m[1], (ep[1] - e0[1]).norm())


def test_reanchor_scale() -> None:
    s, lam, tau = 7.5, 3.0, 5.0
    m = torch.tensor([0.5, lam, 4.0, tau, 50.0])
    sp = reanchor_scale(m, s, lam, tau)
    assert sp[0] == 1.0  # below lambda_pr: plain CFG with ess
    assert sp[1].item() == pytest.approx(1.0)  # continuous at lambda_pr
    assert 1.0 < sp[2].item() < s
    assert sp[3].item() == pytest.approx(s)
    assert sp[4].item() == s  # clamped
    a = (s * lam - tau) / (s - 1)
    assert sp[2].item() == pytest.approx(s * (4.0 - a) / (tau - a))
    with pytest.raises(ValueError, match="tau"):
        reanchor_scale(m, s, 5.0, 5.0)
    with pytest.raises(ValueError, match="tau"):
        PRSSOptions(lambda_pr=5.0, tau=4.0)


# -- trigger, search, call structure ------------------------------------------------------


def test_trigger_and_search_with_planted_magnitudes() -> None:
    prompts = ["mem A", "safe B", "mem C"]
    x, rep, calls = run(prompts, noise(3))
    assert x.shape == (3, 3, 8, 8) and torch.isfinite(x).all()
    assert [r["triggered"] for r in rep] == [True, False, True]
    assert rep[0]["magnitude"] == pytest.approx(100, abs=5) and rep[1]["magnitude"] < 5
    # A: a1 (60) is above lambda_ss, a2 (~5) is the first below -> a2 (not "a3 natural", also below)
    assert rep[0]["chosen_prompt"] == "a2" and rep[0]["candidates_scored"] == 3
    assert rep[0]["candidate_magnitudes"][0] == pytest.approx(60, abs=5)
    assert rep[0]["chosen_magnitude"] == rep[0]["candidate_magnitudes"][1] == pytest.approx(5, abs=3)
    # C: none below -> the lowest (c2, 30 < the original's 100)
    assert rep[2]["chosen_prompt"] == "c2" and rep[2]["chosen_magnitude"] == pytest.approx(30, abs=5)
    # B untriggered: nothing scored, its own prompt
    assert rep[1]["chosen_prompt"] == "safe B" and rep[1]["candidates_scored"] == 0 and rep[1]["pr_steps"] == 0
    # step 1: the undefended [e0, ep] call (detection reuses it) + ONE search call with all 6 candidates
    # (whose rows also serve as eps(x_T, ess)); later steps: the [e0, ep] call + the ess branch of A and C.
    assert calls == [6, 6] + [6, 2] * (STEPS - 1)


def test_search_keeps_original_when_it_is_lowest_and_empty_candidates() -> None:
    prompts = ["mem A", "mem C"]
    _, rep, calls = run(prompts, noise(2), candidates=[["mem A", "a1"], []])
    assert rep[0]["triggered"] and rep[0]["chosen_prompt"] == "a1"  # 60 < 100
    assert rep[0]["candidates_scored"] == 1  # the prompt itself is not a candidate
    assert rep[1]["triggered"] and rep[1]["chosen_prompt"] == "mem C" and rep[1]["candidates_scored"] == 0
    # only A has an ess branch of its own (a1, m ~60 > lambda_pr: A's ep every step too), C guides with ep
    assert calls == [4, 1] + [4, 1] * (STEPS - 1)
    _, rep, calls = run(["mem C"], noise(1), candidates=[["worse"]])
    assert rep[0]["triggered"] and rep[0]["chosen_prompt"] == "mem C"  # the original is the lowest
    assert rep[0]["candidate_magnitudes"][0] == pytest.approx(150, abs=5)
    assert calls == [2, 1] + [2] * (STEPS - 1)  # ess = ep: no extra branch


def test_untriggered_images_are_bitwise_the_undefended_output() -> None:
    prompts = ["mem A", "safe B", "mem C", "another safe prompt"]
    x_T = noise(4, seed=3)
    x_off, rep_off, _ = run(prompts, x_T, PRSSOptions(enabled=False))
    assert not any(r["triggered"] for r in rep_off)
    for mode in ("prss", "ss", "pr"):
        x_on, rep, _ = run(prompts, x_T, PRSSOptions(mode=mode, lambda_ss=10.0, lambda_pr=20.0, tau=40.0))
        assert [r["triggered"] for r in rep] == [True, False, True, False]
        assert torch.equal(x_on[1], x_off[1]) and torch.equal(x_on[3], x_off[3]), mode
        assert not torch.allclose(x_on[0], x_off[0])
        assert [r["magnitude"] for r in rep] == [r["magnitude"] for r in rep_off]  # same detection call
    # nothing triggered: the whole batch is bitwise the undefended output
    x_on, _, _ = run(prompts[1::2], x_T[1::2])
    assert torch.equal(x_on, x_off[1::2])


def test_all_triggered_batches_compute_ep_only_where_it_reanchors() -> None:
    prompts = ["mem A", "mem C"]
    x_T = noise(2)
    x, rep, calls = run(prompts, x_T)
    assert all(r["triggered"] for r in rep) and [r["pr_steps"] for r in rep] == [0, STEPS]
    # e0 and ess in one call per step; ep only for C, whose ess (c2, m ~30) is above lambda_pr 20
    assert calls == [4, 6] + [4, 1] * (STEPS - 1)
    # the same images as each one sampled beside an untriggered image (the path that computes every branch)
    x_mixed, _, _ = run([*prompts, "safe B"], torch.cat([x_T, noise(1, seed=9)]))
    torch.testing.assert_close(x, x_mixed[:2], atol=1e-4, rtol=1e-4)
    # nothing re-anchors (lambda_pr above every m_t): no ep call at all after step 1
    _, _, calls = run(prompts, x_T, PRSSOptions(lambda_ss=10.0, lambda_pr=1e6, tau=2e6))
    assert calls == [4, 6] + [4] * (STEPS - 1)
    _, _, calls = run(prompts, noise(2), PRSSOptions(mode="ss", lambda_ss=10.0, lambda_pr=20.0, tau=40.0))
    assert calls == [4, 6] + [4] * (STEPS - 1)  # ss: e0 and the chosen prompt only


def test_per_image_independence() -> None:
    prompts = ["mem A", "safe B", "mem C"]
    x_T = noise(3, seed=5)
    x, rep, _ = run(prompts, x_T)
    for i, p in enumerate(prompts):
        xi, ri, _ = run([p], x_T[i : i + 1], candidates=[CANDS[p]])
        for key in ("triggered", "chosen_prompt", "candidates_scored", "pr_steps"):
            assert ri[0][key] == rep[i][key], (p, key)
        assert ri[0]["magnitude"] == pytest.approx(rep[i]["magnitude"], rel=1e-4)
        assert ri[0]["chosen_magnitude"] == pytest.approx(rep[i]["chosen_magnitude"], rel=1e-4)
        torch.testing.assert_close(xi[0], x[i], atol=1e-4, rtol=1e-4)


def test_pr_steps_counts_steps_above_lambda_pr() -> None:
    prompts = ["mem A", "safe B", "mem C"]
    x_T = noise(3)
    # lambda_pr 20: A's ess (a2, m ~5) never re-anchors, C's (c2, m ~30) at every step
    _, rep, _ = run(prompts, x_T)
    assert [r["pr_steps"] for r in rep] == [0, 0, STEPS]
    # lambda_pr 3: both re-anchor at every step
    _, rep, _ = run(prompts, x_T, PRSSOptions(lambda_ss=10.0, lambda_pr=3.0, tau=5.0))
    assert [r["pr_steps"] for r in rep] == [STEPS, 0, STEPS]
    # m_t never above lambda_pr: prss is exactly ss (plain CFG with ess, same calls, same arithmetic)
    hi = PRSSOptions(lambda_ss=10.0, lambda_pr=1e6, tau=2e6)
    x_prss, rep, _ = run(prompts, x_T, hi, record_steps=True)
    x_ss, rep_ss, _ = run(prompts, x_T, PRSSOptions(mode="ss", lambda_ss=10.0))
    assert all(r["pr_steps"] == 0 for r in rep) and all(r["pr_steps"] == 0 for r in rep_ss)
    assert torch.equal(x_prss, x_ss)
    assert len(rep[0]["m_steps"]) == STEPS and rep[0]["m_steps"][0] == pytest.approx(rep[0]["chosen_magnitude"])


def test_ss_equals_plain_cfg_with_the_chosen_prompt() -> None:
    x_T = noise(2, seed=7)
    x_ss, rep, _ = run(["mem A", "mem C"], x_T, PRSSOptions(mode="ss", lambda_ss=10.0))
    x_ref, _, _ = run(["a2", "c2"], x_T, PRSSOptions(enabled=False))
    assert [r["chosen_prompt"] for r in rep] == ["a2", "c2"]
    torch.testing.assert_close(x_ss, x_ref, atol=1e-4, rtol=1e-4)


def test_pr_mode_reanchors_on_the_first_candidate_without_search() -> None:
    prompts = ["mem A", "safe B", "mem C"]
    _, rep, calls = run(prompts, noise(3), PRSSOptions(mode="pr", lambda_ss=10.0, lambda_pr=20.0, tau=40.0))
    assert [r["chosen_prompt"] for r in rep] == ["a1", "safe B", "c1"]
    assert all(r["candidates_scored"] == 0 for r in rep)
    assert rep[0]["chosen_magnitude"] == pytest.approx(60, abs=5)  # m_t of ess at x_T
    assert [r["pr_steps"] for r in rep] == [STEPS, 0, STEPS]
    assert calls == [6, 2] * STEPS  # no search call: the ess branch from step 1


def test_detection_at_a_later_step_switches_guidance_from_there() -> None:
    prompts = ["mem A", "safe B", "mem C"]
    x_T = noise(3, seed=4)
    x_off, rep_off, _ = run(prompts, x_T, PRSSOptions(enabled=False), record_steps=True)
    late = PRSSOptions(lambda_ss=10.0, lambda_pr=20.0, tau=40.0, detect_step=3)
    x, rep, calls = run(prompts, x_T, late)
    assert [r["triggered"] for r in rep] == [True, False, True]
    # the trigger statistic is m(ep) at step 3 of the undefended trajectory; magnitude stays the first step's
    for r, r_off in zip(rep, rep_off, strict=True):
        assert r["detect_magnitude"] == pytest.approx(r_off["m_steps"][2], rel=1e-5)
        assert r["magnitude"] == r_off["magnitude"]
    assert [r["chosen_prompt"] for r in rep] == ["a2", "safe B", "c2"]
    assert [r["pr_steps"] for r in rep] == [0, 0, STEPS - 2]  # C re-anchors on steps 3 and 4 only
    # steps 1-2 undefended, step 3 the same call + ONE search call, step 4 the call + the ess branch of A, C
    assert calls == [6, 6, 6, 6, 6, 2]
    assert torch.equal(x[1], x_off[1]) and not torch.allclose(x[0], x_off[0])
    with pytest.raises(ValueError, match="detect_step"):
        run(prompts, x_T, PRSSOptions(detect_step=STEPS + 1))
    x_off_late, _, _ = run(prompts, x_T, PRSSOptions(enabled=False, detect_step=STEPS + 1))  # off: nothing to place
    assert torch.equal(x_off_late, x_off)
    with pytest.raises(ValueError, match="detect_step"):
        PRSSOptions(detect_step=0)


@pytest.mark.parametrize("mode", ["prss", "ss"])
def test_restart_samples_a_late_trigger_again_from_x_T(mode: str) -> None:
    prompts = ["mem A", "safe B", "mem C"]
    x_T = noise(3, seed=6)
    x_off, _, _ = run(prompts, x_T, PRSSOptions(enabled=False))
    opts = PRSSOptions(mode=mode, lambda_ss=10.0, lambda_pr=20.0, tau=40.0, detect_step=3, restart=True)
    x, rep, calls = run(prompts, x_T, opts)
    chosen = [r["chosen_prompt"] for r in rep]
    assert chosen == ["a2", "safe B", "c2"] and [r["triggered"] for r in rep] == [True, False, True]
    assert torch.equal(x[1], x_off[1])  # untriggered: still bitwise the undefended output
    # the first pass stops at detection (3 steps + the search); the second is a whole guided trajectory
    assert calls[:4] == [6, 6, 6, 6] and calls[4:] == [6, 2] * STEPS
    # the triggered images are what guidance by the chosen prompt gives from x_T: re-anchoring on it
    # from step 1 (pr with that single candidate), or for ss plain CFG with it
    if mode == "prss":
        ref, _, _ = run(prompts, x_T, PRSSOptions(mode="pr", lambda_ss=10.0, lambda_pr=20.0, tau=40.0),
                        candidates=[[c] if c != p else [] for c, p in zip(chosen, prompts, strict=True)])  # fmt: skip
    else:
        ref, _, _ = run(chosen, x_T, PRSSOptions(enabled=False))
    torch.testing.assert_close(x[[0, 2]], ref[[0, 2]], atol=1e-4, rtol=1e-4)
    # nothing triggered: one undefended pass, no restart
    x_safe, _, calls = run(["safe B"], x_T[1:2], opts)
    x_safe_off, _, _ = run(["safe B"], x_T[1:2], PRSSOptions(enabled=False))
    assert torch.equal(x_safe, x_safe_off) and calls == [2] * STEPS


def test_detection_step_is_the_best_separating_early_step_and_scales_with_the_step_count() -> None:
    from memshard.prss.calibration import calibration_detection, detection_step, scale_detect_step

    rng = np.random.default_rng(1)
    mem, benign = rng.normal(1, 0.1, (30, 40)), rng.normal(1, 0.1, (60, 40))
    mem[:, 0] -= 0.5  # step 1 separates them the wrong way round (the 20,000-step model's case)
    mem[:, 6] += 0.3
    mem[:, 30] += 1.0  # best of all, but a defence there comes too late: outside the first quarter
    k, by_step = detection_step(mem, benign)
    assert k == 7 and by_step[0] == 0.0 and by_step[30] == 1.0 and len(by_step) == 40
    assert detection_step(mem, benign, window=1.0)[0] == 31
    assert detection_step(benign[:30], benign[30:], window=0.01)[0] == 1  # a window of one step: step 1
    assert [scale_detect_step(11, 50, n) for n in (50, 25, 100, 4, 1)] == [11, 6, 21, 2, 1]
    assert scale_detect_step(1, 50, 10) == 1 and scale_detect_step(3, 3, 2) == 2
    assert calibration_detection({"detect_step": 11, "steps": 50}) == {"detect_step": 11, "detect_reference_steps": 50}
    # a calibration from before detection steps: step 1, of no fixed count
    assert calibration_detection({"lambda_ss": 1.0}) == {"detect_step": 1, "detect_reference_steps": None}


def test_provider_is_asked_only_for_triggered_prompts_and_capped() -> None:
    asked: list[tuple[str, int]] = []

    def provider(prompt: str, n: int) -> list[str]:
        asked.append((prompt, n))
        return CANDS[prompt] + ["extra 1", "extra 2"]

    opts = PRSSOptions(lambda_ss=10.0, lambda_pr=20.0, tau=40.0, num_candidates=2)
    _, rep, calls = run(["mem A", "safe B"], noise(2), opts, candidates=provider)
    assert asked == [("mem A", 2)]
    assert rep[0]["candidates_scored"] == 2 and rep[0]["chosen_prompt"] == "a2"
    assert calls[1] == 2
    # a real provider end to end (perturbations of an unplanted prompt are all natural -> first one below)
    _, rep, _ = run(["mem A"], noise(1), candidates=PerturbProvider(seed=1))
    assert rep[0]["candidates_scored"] == 25 and rep[0]["chosen_prompt"] == PerturbProvider(seed=1)("mem A", 1)[0]


def test_first_step_magnitude_is_the_reported_magnitude() -> None:
    prompts = ["mem A", "safe B", "mem C"]
    x_T = noise(3)
    _, rep, _ = run(prompts, x_T)
    m = first_step_magnitude(Planted(OFFSETS), toy_encode, SCHED, prompts, x_T, STEPS)
    assert m.tolist() == [r["magnitude"] for r in rep]


def test_options_mirror_the_config() -> None:
    from memshard.config import PRSSConfig

    opts = PRSSOptions.from_config(PRSSConfig(), enabled=False)
    assert opts == PRSSOptions(enabled=False)
    with pytest.raises(ValueError, match="mode"):
        PRSSOptions(mode="bogus")


# -- candidate providers -------------------------------------------------------------------


def test_list_provider() -> None:
    prov = ListProvider({"a cat": ["a kitten", "A  Cat", "a feline", "a kitten", "a tabby"]})
    assert prov("a cat", 10) == ["a kitten", "a feline", "a tabby"]  # order kept, no self, no duplicates
    assert prov("A cat", 2) == ["a kitten", "a feline"]
    assert prov("unknown", 5) == []


def test_perturb_provider() -> None:
    prompt = "a photo of a big dog sitting on the street"
    a = PerturbProvider(seed=0)(prompt, 25)
    assert a == PerturbProvider(seed=0)(prompt, 25)  # deterministic
    assert len(a) == 25 and len({c.lower() for c in a}) == 25 and prompt not in a
    assert a != PerturbProvider(seed=1)(prompt, 25)
    assert PerturbProvider(seed=0)(prompt, 5) == a[:5]  # a prefix: n does not reshuffle
    short = PerturbProvider()("x", 10)
    assert len(short) == 10 and "x" not in short


def toy_embed(table: dict[str, list[float]]) -> Callable[[list[str]], torch.Tensor]:
    return lambda prompts: torch.tensor([table[p] for p in prompts])


def test_bank_provider_top_n_by_cosine() -> None:
    table = {
        "query": [1.0, 0.0],
        "far": [0.0, 1.0],
        "near": [2.0, 0.2],  # unnormalised: cosine, not dot product
        "mid": [1.0, 1.0],
        "nearest": [1.0, 0.01],
    }
    bank = ["far", "mid", "query", "near", "nearest", "mid"]
    prov = BankProvider(bank, toy_embed(table))
    assert prov("query", 3) == ["nearest", "near", "mid"]  # excludes the prompt itself
    assert prov("query", 10) == ["nearest", "near", "mid", "far"]
    assert prov("far", 1) == ["mid"]
    with pytest.raises(ValueError, match="empty"):
        BankProvider([], toy_embed(table))


def test_load_bank(tmp_path) -> None:
    txt = tmp_path / "bank.txt"
    txt.write_text("a cat\n\n  a dog  \na cat\n")
    assert load_bank(txt) == ["a cat", "a dog"]
    pq.write_table(pa.table({"prompt": ["x", None, "y"], "n": [1, 2, 3]}), tmp_path / "p.parquet")
    assert load_bank(tmp_path / "p.parquet") == ["x", "y"]
    pq.write_table(pa.table({"caption": ["c1", "c2"]}), tmp_path / "c.parquet")
    assert load_bank(str(tmp_path / "c.parquet")) == ["c1", "c2"]
    pq.write_table(pa.table({"text": ["t"]}), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match=r"bad\.parquet.*'prompt' or 'caption'.*text"):
        load_bank(tmp_path / "bad.parquet")
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(ValueError, match=r"junk\.parquet.*Parquet"):
        load_bank(tmp_path / "junk.parquet")
    with pytest.raises(FileNotFoundError, match=r"missing\.txt"):
        load_bank(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(ValueError, match=r"empty\.txt.*no prompts"):
        load_bank(tmp_path / "empty.txt")
    prov = make_provider("bank", bank=str(txt), embed=toy_embed({"a cat": [1.0, 0.0], "a dog": [0.0, 1.0]}))
    assert prov("a cat", 5) == ["a dog"]
    assert isinstance(make_provider("perturb"), PerturbProvider)
    with pytest.raises(ValueError, match="bank"):
        make_provider("bank")


def test_defended_level_triggers_the_share_of_memorized_prompts_it_names():
    """A level of 0.75 triggers on 3 in 4 memorized prompts and re-anchors on 3 in 4 of their steps."""
    import numpy as np

    from memshard.prss.calibration import TAU_RATIO, defended_level

    mem_first = np.arange(1.0, 101.0)  # 100 memorized prompts, m = 1 .. 100
    mem_steps = np.arange(10.0, 1010.0, 10.0)
    held = np.array([0.5, 10.0, 30.0, 90.0])
    lv = defended_level(mem_first, mem_steps, 0.75, held)
    assert lv["memorized_triggered"] == pytest.approx(0.75, abs=0.01)
    assert np.mean(mem_first > lv["lambda_ss"]) == lv["memorized_triggered"]
    assert np.mean(mem_steps > lv["lambda_pr"]) == pytest.approx(0.75, abs=0.01)
    assert lv["tau"] == pytest.approx(lv["lambda_pr"] * TAU_RATIO)
    assert lv["heldout_triggered"] == 0.5  # 30 and 90 are above lambda_ss (about 25.75)
    # defending more lowers both thresholds (never raises them)
    hi = defended_level(mem_first, mem_steps, 0.95)
    assert hi["lambda_ss"] < lv["lambda_ss"] and hi["lambda_pr"] < lv["lambda_pr"] and "heldout_triggered" not in hi
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match="share of memorized prompts"):
            defended_level(mem_first, mem_steps, bad)
    with pytest.raises(ValueError, match="at least one memorized prompt"):
        defended_level([], mem_steps, 0.5)


def test_pr_profile_scales_the_reanchoring_thresholds_step_by_step() -> None:
    from memshard.config import PRSSConfig

    prompts = ["mem A", "safe B", "mem C"]
    x_T = noise(3)
    x_flat, rep_flat, _ = run(prompts, x_T)
    # a profile of ones is the spec's rule, bit for bit
    x_ones, rep_ones, _ = run(prompts, x_T, PRSSOptions(lambda_ss=10.0, lambda_pr=20.0, tau=40.0, pr_profile=(1.0,)))
    assert torch.equal(x_ones, x_flat) and [r["pr_steps"] for r in rep_ones] == [r["pr_steps"] for r in rep_flat]
    # C's ess (c2, m ~30) re-anchors where lambda_pr x profile is below 30: the first half of the steps here
    prof = tuple([1.0] * (STEPS // 2) + [100.0] * (STEPS - STEPS // 2))
    opt = PRSSOptions(lambda_ss=10.0, lambda_pr=20.0, tau=40.0, pr_profile=prof)
    assert opt.pr_thresholds(0, STEPS) == (20.0, 40.0) and opt.pr_thresholds(STEPS - 1, STEPS) == (2000.0, 4000.0)
    _, rep, _ = run(prompts, x_T, opt)
    assert [r["pr_steps"] for r in rep] == [0, 0, STEPS // 2]
    # a profile of another length reads the entry at the same share of the trajectory
    two = PRSSOptions(lambda_ss=10.0, lambda_pr=20.0, tau=40.0, pr_profile=(1.0, 3.0))
    assert two.pr_thresholds(0, 50) == (20.0, 40.0) and two.pr_thresholds(49, 50) == (60.0, 120.0)
    for bad in ((), (1.0, 0.0), (1.0, float("nan"))):
        with pytest.raises(ValueError, match="pr_profile"):
            PRSSOptions(pr_profile=bad)
        with pytest.raises(ValueError, match=r"prss\.pr_profile"):  # the config asks the same rule
            PRSSConfig(pr_profile=list(bad))
    assert PRSSOptions.from_config(PRSSConfig(pr_profile=[1.0, 2.0])).pr_profile == (1.0, 2.0)


def test_per_step_level_spreads_reanchoring_over_a_trajectory_whose_magnitude_grows():
    """m_t 30x larger late than early: one pooled lambda_pr re-anchors late steps only, the per-step one every part."""
    import numpy as np

    from memshard.prss.calibration import TAU_RATIO, defended_level, per_step_level

    rng = np.random.default_rng(0)
    scale = np.geomspace(1.0, 30.0, 50)  # the per-step scale of m_t
    mem = scale * rng.lognormal(0.0, 0.3, (200, 50))
    pooled = defended_level(mem[:, 0], mem.ravel(), 0.5)
    early, late = slice(0, 10), slice(40, 50)
    assert np.mean(mem[:, early] > pooled["lambda_pr"]) == 0.0 and np.mean(mem[:, late] > pooled["lambda_pr"]) == 1.0
    lv = per_step_level(mem, 0.5, rng.lognormal(0.0, 0.3, 100))
    thr = lv["lambda_pr"] * np.asarray(lv["pr_profile"])
    for part in (early, late):
        assert np.mean(mem[:, part] > thr[part]) == pytest.approx(0.5, abs=0.1)
    assert lv["lambda_ss"] == pooled["lambda_ss"] and lv["tau"] == pytest.approx(lv["lambda_pr"] * TAU_RATIO)
    assert np.median(lv["pr_profile"]) == pytest.approx(1.0) and lv["pr_profile"][-1] > 20 * lv["pr_profile"][0]
    assert 0.0 <= lv["heldout_triggered"] <= 1.0
    with pytest.raises(ValueError, match="prompts, steps"):
        per_step_level(mem.ravel(), 0.5)
