"""DDPM and DDIM reverse processes, checked against exact properties."""
import pytest
import torch

from pipeline.method.samplers import ddim_timesteps, sample
from pipeline.method.schedules import NoiseSchedule


def oracle(x0: torch.Tensor):
    """A denoiser that always predicts the same clean sample."""
    return lambda x_t, t: x0.expand_as(x_t)


@pytest.mark.parametrize("name", ["linear", "cosine", "sigmoid"])
def test_ddim_eta0_stays_on_the_forward_line_of_its_own_noise(name):
    """Exact property of deterministic DDIM: with an oracle x0 and x_T = sqrt(abar_T) x0 +
    sqrt(1 - abar_T) eps, the implied eps_hat equals eps at every step, so every x_t stays at
    sqrt(abar_t) x0 + sqrt(1 - abar_t) eps and the chain ends exactly at x0."""
    T = 200
    schedule = NoiseSchedule(name, T)
    x0, eps = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    visited = []

    def recording_oracle(x_t, t):
        visited.append((int(t[0]), x_t.clone()))
        return x0

    x_T = schedule.add_noise(x0, eps, torch.full((2,), T - 1))
    out = sample(recording_oracle, schedule, x0.shape, "ddim", steps=25, eta=0.0, x_T=x_T)
    torch.testing.assert_close(out, x0, rtol=1e-4, atol=1e-4)
    for t, x_t in visited:
        expected = schedule.add_noise(x0, eps, torch.full((2,), t))
        torch.testing.assert_close(x_t, expected, rtol=1e-4, atol=1e-4)


def test_ddim_eta0_is_deterministic_given_x_T():
    schedule = NoiseSchedule("linear", 100)
    net = lambda x, t: torch.tanh(x) * 0.5
    x_T = torch.randn(4, 2, 3)
    a = sample(net, schedule, x_T.shape, "ddim", steps=10, x_T=x_T,
               generator=torch.Generator().manual_seed(1))
    b = sample(net, schedule, x_T.shape, "ddim", steps=10, x_T=x_T,
               generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)


def test_ddim_eta1_with_all_steps_is_ddpm():
    """DDIM with eta = 1 over all T consecutive steps has sigma_t^2 = the DDPM posterior
    variance (Song et al. eq. 16), so with the same noise draws it reproduces ancestral DDPM."""
    T = 60
    schedule = NoiseSchedule("cosine", T)
    net = lambda x, t: 0.3 * x + 0.01 * t[:, None, None].float() / T
    shape = (3, 2, 5)
    ddpm = sample(net, schedule, shape, "ddpm", generator=torch.Generator().manual_seed(0))
    ddim = sample(net, schedule, shape, "ddim", steps=T, eta=1.0,
                  generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(ddim, ddpm, rtol=1e-4, atol=1e-5)


def test_ddpm_with_oracle_ends_near_x0():
    schedule = NoiseSchedule("linear", 100)
    x0 = torch.randn(1, 4, 4)
    out = sample(oracle(x0), schedule, x0.shape, "ddpm", generator=torch.Generator().manual_seed(0))
    # The last step adds no noise and its posterior mean weights x0 almost fully.
    torch.testing.assert_close(out, x0, atol=0.05, rtol=0)


def test_ddim_timesteps_span_the_chain():
    assert ddim_timesteps(2000, 50)[0] == 1999 and ddim_timesteps(2000, 50)[-1] == 0
    assert len(ddim_timesteps(2000, 50)) == 50
    assert ddim_timesteps(10, 10) == list(range(9, -1, -1))
    with pytest.raises(ValueError, match="DDIM steps"):
        ddim_timesteps(10, 11)


def test_unknown_sampler():
    with pytest.raises(ValueError, match="unknown sampler"):
        sample(oracle(torch.zeros(1, 1, 1)), NoiseSchedule("linear", 10), (1, 1, 1), "euler")


@pytest.mark.parametrize("sampler, eta", [("ddpm", 0.0), ("ddim", 0.5)])
def test_one_generator_per_row_gives_each_row_its_own_chain(sampler, eta):
    """Rows sampled together with a generator each equal the rows sampled alone with the same
    seeds, whatever else is in the batch (per-example prompts, batched)."""
    schedule = NoiseSchedule("cosine", 50)
    weight = torch.randn(5, 5) * 0.3
    net = lambda x, t: torch.tanh(x @ weight) + 0.01 * t[:, None, None].float()

    def run(seeds):
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        return sample(net, schedule, (len(seeds), 2, 5), sampler, steps=10, eta=eta,
                      generator=generators)

    alone = torch.cat([run([seed]) for seed in (3, 7, 11)])
    together, other_batch = run([3, 7, 11]), run([11, 5])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(other_batch[0], alone[2], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(together[0], together[1])
    with pytest.raises(ValueError, match="2 generators for 3 rows"):
        sample(net, schedule, (3, 2, 5), sampler, generator=[torch.Generator()] * 2)
