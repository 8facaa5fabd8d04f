"""EDM preconditioning, losses and schedules against values worked out by hand (Karras et al. 2022, Table 1;
DiffMemorize's train.py / training_loop.py)."""

from __future__ import annotations

import math

import pytest
import torch

from diffmem.common.edm.precond import (
    Preconditioning,
    c_in,
    c_noise,
    c_out,
    c_skip,
    denoising_loss,
    loss_weight,
    vp_sigma,
    vp_sigma_inv,
)
from diffmem.common.edm.schedule import resolve_schedule

F64 = dict(dtype=torch.float64)


def t(v):
    return torch.tensor(v, **F64)


def vp_t_of_sigma(s, beta_d=19.9, beta_min=0.1):
    return (math.sqrt(beta_min**2 + 2 * beta_d * math.log(1 + s * s)) - beta_min) / beta_d


@pytest.mark.parametrize("sigma", [0.01, 0.5, 1.0, 2.0, 80.0])
def test_table1_columns_by_hand(sigma):
    s, sd = sigma, 0.5
    expected = {
        "vp": (1.0, -s, 1 / math.sqrt(s * s + 1), 999 * vp_t_of_sigma(s)),
        "ve": (1.0, s, 1.0, math.log(s / 2)),
        "edm": (sd * sd / (s * s + sd * sd), s * sd / math.sqrt(s * s + sd * sd), 1 / math.sqrt(s * s + sd * sd),
                math.log(s) / 4),
    }
    for p, (ks, ko, ki, kn) in expected.items():
        got = [float(f(t(s), p)) for f in (c_skip, c_out, c_in)] + [float(c_noise(t(s), p))]
        assert got == pytest.approx([ks, ko, ki, kn], rel=1e-12, abs=1e-12), p


def test_edm_column_equals_diffusers_edm_scheduler():
    from diffusers import EDMEulerScheduler

    sched = EDMEulerScheduler(sigma_data=0.5)
    sigma = torch.tensor([0.002, 0.3, 1.0, 5.0, 80.0])
    x, out = torch.randn(5, 1, 2, 2), torch.randn(5, 1, 2, 2)
    s4 = sigma.view(-1, 1, 1, 1)
    torch.testing.assert_close(c_in(s4, "edm") * x, sched.precondition_inputs(x, s4))
    torch.testing.assert_close(c_noise(sigma, "edm"), sched.precondition_noise(sigma))
    torch.testing.assert_close(c_skip(s4, "edm") * x + c_out(s4, "edm") * out, sched.precondition_outputs(x, out, s4))


def test_vp_sigma_and_inverse_by_hand():
    assert float(vp_sigma(t(1.0))) == pytest.approx(math.sqrt(math.exp(0.5 * 19.9 + 0.1) - 1), rel=1e-12)
    assert float(vp_sigma(t(0.3))) == pytest.approx(math.sqrt(math.exp(0.5 * 19.9 * 0.09 + 0.03) - 1), rel=1e-12)
    s = t([0.01, 0.7, 3.0, 100.0])
    torch.testing.assert_close(vp_sigma(vp_sigma_inv(s)), s)


def test_loss_weights_and_training_sigma_by_hand():
    assert float(loss_weight(t(1.0), "edm")) == pytest.approx((1 + 0.25) / 0.25)
    assert float(loss_weight(t(2.0), "vp")) == pytest.approx(0.25)
    assert float(loss_weight(t(4.0), "ve")) == pytest.approx(1 / 16)
    vp, ve, edm = Preconditioning("vp"), Preconditioning("ve"), Preconditioning("edm")
    # VP: u = 0 gives t = 1 (σ_max), u = 1 gives t = ε_t (σ_min).
    assert float(vp.training_sigma(t(0.0))) == pytest.approx(vp.sigma_max)
    assert float(vp.training_sigma(t(1.0))) == pytest.approx(math.sqrt(math.exp(0.5 * 19.9 * 1e-10 + 0.1 * 1e-5) - 1))
    assert vp.sigma_min == pytest.approx(float(vp.training_sigma(t(1.0))))
    # VE: log-uniform between 0.02 and 100.
    assert [float(ve.training_sigma(t(u))) for u in (0.0, 0.5, 1.0)] == pytest.approx([0.02, math.sqrt(2.0), 100.0])
    # EDM: ln σ = P_mean + P_std n.
    assert float(edm.training_sigma(t(1.0))) == pytest.approx(math.exp(-1.2 + 1.2))
    assert (edm.sigma_min, edm.sigma_max) == (0.0, math.inf) and (ve.sigma_min, ve.sigma_max) == (0.02, 100.0)


def test_denoising_loss_sums_pixels_with_weight():
    d = torch.tensor([[[[1.0, 2.0]]], [[[0.0, 0.0]]]])
    y = torch.tensor([[[[0.0, 0.0]]], [[[3.0, 0.0]]]])
    sigma = torch.tensor([1.0, 2.0])
    got = denoising_loss(d, y, sigma, Preconditioning("edm"))
    assert got.tolist() == pytest.approx([5.0 * (1 + 4), (4.25 / 1.0) * 9])


def test_unknown_preconditioning_is_refused():
    with pytest.raises(ValueError, match="expected one of vp, ve, edm"):
        Preconditioning("ddpm")


# -------------------------------------------------------------------------------------- schedules


def test_diffmemorize_schedule_at_1k_matches_their_formulas():
    D, batch = 1000, 512
    s = resolve_schedule("diffmemorize", duration_mimg=2000, ema_mimg=0.5, dataset_size=D, batch=batch)
    assert (s.total_kimg, s.ema_halflife_kimg, s.lr_rampup_kimg, s.ema_mode) == (40000, 10, 200, "diffmemorize")
    assert s.data_ratio == 50.0 and s.total_steps == math.ceil(40000e3 / 512)
    for k in (0, 1, 7, 100, 390, 391, 1000, 50000):
        nimg = k * batch
        assert s.lr(k) == pytest.approx(min(nimg / 200000, 1.0), abs=0, rel=1e-15)
        h = min(10 * 1000, nimg * 0.05)
        assert s.ema(k) == pytest.approx(0.5 ** (512 / max(h, 1e-8) / 50), rel=1e-15, abs=0)
    # After the ramp-up β = 0.5^(512/500000) ≈ 0.99929 whatever |D| or batch.
    for D2, b2 in ((2000, 128), (50000, 512)):
        late = resolve_schedule("diffmemorize", duration_mimg=2000, ema_mimg=0.5, dataset_size=D2, batch=b2)
        assert late.ema(10**7) == pytest.approx(0.99929, abs=5e-6)
    assert s.lr(0) == 0.0 and s.ema(0) == 0.0  # the first step: LR 0, EMA = weights


def test_diffmemorize_truncates_small_sets_and_edm_schedule_is_in_mimg():
    tiny = resolve_schedule("diffmemorize", duration_mimg=2000, ema_mimg=0.5, dataset_size=64, batch=64)
    assert tiny.ema_halflife_kimg == 0 and tiny.ema(1000) == pytest.approx(0.0, abs=1e-300)  # |D| < 100: β ≈ 0
    assert tiny.total_kimg == int(2000 * 64 / 50) and tiny.lr_rampup_kimg == int(64 / 5)
    edm = resolve_schedule("edm", duration_mimg=0.5, ema_mimg=0.5, dataset_size=64, batch=100)
    assert (edm.total_kimg, edm.ema_halflife_kimg, edm.lr_rampup_kimg, edm.ema_mode) == (500, 500, 10000, "halflife")
    assert edm.total_steps == 5000
    assert edm.ema(10**6) == pytest.approx(0.5 ** (100 / 500000))
    const = resolve_schedule("edm", duration_mimg=1, ema_mimg=0.5, dataset_size=64, batch=8, ema_mode="constant",
                             ema_beta=0.999)
    assert const.ema(0) == const.ema(123) == 0.999


def test_scheduled_ema_applies_the_per_step_beta():
    from diffmem.common.training.builders import scheduled_ema

    p = torch.nn.Parameter(torch.zeros(3))
    betas = [0.0, 0.5, 0.9]
    ema = scheduled_ema([p], lambda k: betas[k], foreach=False)
    shadow = torch.zeros(3)
    for k, value in enumerate([1.0, 2.0, 4.0]):
        with torch.no_grad():
            p.fill_(value)
        ema.step([p])
        shadow = betas[k] * shadow + (1 - betas[k]) * value
        torch.testing.assert_close(ema.shadow_params[0], shadow.expand(3))
