"""Noise schedules: pinned golden values plus properties derived independently."""
import math

import pytest
import torch

from pipeline.method.schedules import SCHEDULES, NoiseSchedule

# abar at t = 0, 1, 499, 999 for T = 1000 (computed once, in float64 then float32).
GOLDEN = {
    "linear": [0.99989998, 0.99978012, 0.07858724, 4.036e-05],
    "cosine": [0.99995869, 0.99991256, 0.49384359, 0.0],
    "sigmoid": [0.99969971, 0.99939781, 0.5, 3e-07],
}


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_golden_alphas_cumprod(name):
    schedule = NoiseSchedule(name, 1000)
    got = [schedule.alphas_cumprod[i].item() for i in (0, 1, 499, 999)]
    assert got == pytest.approx(GOLDEN[name], rel=1e-5, abs=1e-7)


def test_linear_matches_ddpm_endpoints_and_is_rescaled_by_T():
    # DDPM: beta from 1e-4 to 0.02 at T = 1000; at T = 2000 each beta is halved.
    assert NoiseSchedule("linear", 1000).betas[[0, -1]].tolist() == pytest.approx([1e-4, 0.02])
    assert NoiseSchedule("linear", 2000).betas[[0, -1]].tolist() == pytest.approx([5e-5, 0.01])


def test_cosine_matches_closed_form():
    T, s = 1000, 0.008
    schedule = NoiseSchedule("cosine", T)
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2
    for t in (0, 100, 500, 900):
        assert schedule.alphas_cumprod[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-5)


def test_sigmoid_is_symmetric_around_the_middle():
    schedule = NoiseSchedule("sigmoid", 1000)
    assert schedule.alphas_cumprod[499].item() == pytest.approx(0.5, abs=1e-6)


@pytest.mark.parametrize("name", sorted(SCHEDULES))
@pytest.mark.parametrize("T", [10, 2000])
def test_schedules_are_valid(name, T):
    schedule = NoiseSchedule(name, T)
    assert schedule.betas.shape == (T,)
    assert bool(((schedule.betas > 0) & (schedule.betas < 1)).all())
    assert bool((schedule.alphas_cumprod[1:] < schedule.alphas_cumprod[:-1]).all())
    assert schedule.alphas_cumprod[-1] < 1e-3  # nearly pure noise at t = T


def test_posterior_coefficients_match_ddpm_eq7():
    schedule = NoiseSchedule("linear", 50)
    t = 20
    beta, abar, abar_prev = (schedule.betas[t], schedule.alphas_cumprod[t],
                             schedule.alphas_cumprod[t - 1])
    assert schedule.posterior_coef_x0[t] == pytest.approx(beta * abar_prev.sqrt() / (1 - abar))
    assert schedule.posterior_coef_xt[t] == pytest.approx(
        (1 - abar_prev) * (1 - beta).sqrt() / (1 - abar))
    assert schedule.posterior_variance[t] == pytest.approx(beta * (1 - abar_prev) / (1 - abar))


def test_add_noise_is_the_forward_process():
    schedule = NoiseSchedule("cosine", 100)
    x0, eps = torch.randn(3, 4, 5), torch.randn(3, 4, 5)
    t = torch.tensor([0, 50, 99])
    x_t = schedule.add_noise(x0, eps, t)
    for i in range(3):
        abar = schedule.alphas_cumprod[t[i]]
        torch.testing.assert_close(x_t[i], abar.sqrt() * x0[i] + (1 - abar).sqrt() * eps[i])


def test_unknown_schedule_names_the_known_ones():
    with pytest.raises(ValueError, match="known: \\['linear', 'cosine', 'sigmoid'\\]"):
        NoiseSchedule("quadratic", 10)
