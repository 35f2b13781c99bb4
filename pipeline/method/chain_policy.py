"""DDPT's prompt model as a stochastic policy for execution-reward RL (method.md section 5).

Two policies with one interface, so that ``grpo`` and its ablation ``grpo_gaussian`` share the
rollouts, the rewards and the update (:mod:`pipeline.method.chain_grpo`):

- :class:`ChainPolicy`: the reverse DDIM chain with eta > 0 over S steps (DDPO, Black et al.
  2023). Step s goes from x_{t_s} to x_{t_{s+1}} ~ N(mu_theta(x_{t_s}, t_s, c), sigma_s^2 I):
  mu_theta is the DDIM mean from the denoiser's x0_hat, sigma_s is fixed by the schedule and eta.
- :class:`GaussianPromptPolicy`: the same network used deterministically, z ~ N(D(0, T-1, c),
  s^2 I): one step around the deterministic generator's output, with a learned or fixed s.

A policy offers ``sample(num, generator, condition) -> Trajectory`` (no gradient) and
``moments(trajectory, condition) -> (means (S, B, n, k), stds (S,))`` with gradients. From these
come exact log-probabilities (:func:`gaussian_log_density`) and the analytic KL to a reference
policy (:func:`step_kl`), both per step: (B, S).

Conventions: x_T ~ N(0, I) does not depend on theta and carries no term. A step with sigma = 0
is deterministic and carries no term either: the chain's last step (t = 0 -> x_0, where
abar_prev = 1) always, so the log-probability of a trajectory is the sum over its S - 1
stochastic steps. The step into t = 0 has a small sigma (about eta * sqrt(beta_0)); its
log-density is exact but steep, which the per-step clip bounds.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from pipeline.method.prompt import DiffusionPrompt, Generators
from pipeline.method.samplers import ddim_moments, ddim_timesteps
from pipeline.method.schedules import NoiseSchedule

Predict = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Trajectory:
    """One batch of B sampled chains.

    latents: (S + 1, B, n, k), x_T first, the output last (row s is where step s starts).
    times / prev_times: the S steps' t and t_prev (-1: the clean x_0). means: (S, B, n, k) and
    stds: (S,), the behaviour policy's Gaussians (stds may carry a gradient for a learned
    scale; the sampler detaches them)."""

    latents: torch.Tensor
    times: list[int]
    prev_times: list[int]
    means: torch.Tensor
    stds: torch.Tensor

    @property
    def final(self) -> torch.Tensor:
        """(B, n, k): the chain's output, what the prompt is made of."""
        return self.latents[-1]

    @property
    def stochastic(self) -> torch.Tensor:
        """(S,) bool: the steps with sigma > 0, the ones that carry log-probability."""
        return self.stds > 0

    def to(self, device: torch.device | str) -> Trajectory:
        return Trajectory(self.latents.to(device), self.times, self.prev_times,
                          self.means.to(device), self.stds.to(device))

    @classmethod
    def cat(cls, parts: list[Trajectory]) -> Trajectory:
        """The rows of several batches of the same chain (same steps and stds), in order."""
        first = parts[0]
        if any(p.times != first.times or not torch.equal(p.stds, first.stds) for p in parts):
            raise ValueError("only trajectories of the same chain (steps, stds) concatenate")
        return cls(torch.cat([p.latents for p in parts], 1), first.times, first.prev_times,
                   torch.cat([p.means for p in parts], 1), first.stds)

    def log_probs(self) -> torch.Tensor:
        """(B, S) float64: the behaviour policy's log-densities of its own steps."""
        return gaussian_log_density(self.latents[1:], self.means, self.stds)


def gaussian_log_density(x: torch.Tensor, means: torch.Tensor, stds: torch.Tensor
                         ) -> torch.Tensor:
    """log N(x_s; means_s, stds_s^2 I) per row and step, summed over the latent's dimensions.

    x, means: (S, B, ...); stds: (S,) -> (B, S) float64 (a latent's D dimensions make the
    constant ``-D log sigma`` large; float64 keeps ratios exact). Steps with std 0 give 0."""
    stochastic = stds > 0
    safe = torch.where(stochastic, stds, torch.ones_like(stds)).double()
    diff = (x - means).double().flatten(2)  # (S, B, D)
    dims = diff.shape[-1]
    log_p = (-diff.pow(2).sum(-1) / (2 * safe[:, None] ** 2) - dims * safe.log()[:, None]
             - 0.5 * dims * math.log(2 * math.pi))
    return (log_p * stochastic[:, None]).T


def step_kl(means: torch.Tensor, stds: torch.Tensor, ref_means: torch.Tensor,
            ref_stds: torch.Tensor) -> torch.Tensor:
    """KL(N(means, stds^2 I) || N(ref_means, ref_stds^2 I)) per row and step: (B, S) float64.

    Per dimension ``log(s_ref / s) + (s^2 + (mu - mu_ref)^2) / (2 s_ref^2) - 1/2``; with equal
    stds (a chain and its reference share the schedule) ``||mu - mu_ref||^2 / (2 sigma^2)``.
    Steps where either std is 0 give 0."""
    stochastic = (stds > 0) & (ref_stds > 0)
    s = torch.where(stochastic, stds, torch.ones_like(stds)).double()[:, None]
    r = torch.where(stochastic, ref_stds, torch.ones_like(ref_stds)).double()[:, None]
    gap = (means - ref_means).double().flatten(2).pow(2).sum(-1)  # (S, B)
    dims = means[0, 0].numel()
    kl = dims * (r.log() - s.log()) + (dims * s**2 + gap) / (2 * r**2) - dims / 2
    return (kl * stochastic[:, None]).T


def prompt_predictor(model: DiffusionPrompt, condition: torch.Tensor | None = None,
                     guidance: float = 1.0) -> Predict:
    """``predict(x (R, n, k), t (R,)) -> x0_hat``: the model's (guided) prediction, with the
    (B, d) conditions tiled to R = m * B rows (row ``i * B + b`` gets condition b)."""

    def predict(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        c = None if condition is None else condition.repeat(x.shape[0] // condition.shape[0], 1)
        return model.predict(x, t, c, guidance)

    return predict


def standard_normal(shape: tuple[int, ...], generator: Generators = None) -> torch.Tensor:
    """N(0, I) of ``shape`` on the CPU, from one generator, or row i from generator i (a list
    of ``shape[0]``): then a row's draws do not depend on the rows beside it in the batch."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"{len(generator)} generators for {shape[0]} rows")
        return torch.cat([torch.randn((1, *shape[1:]), generator=g) for g in generator])
    return torch.randn(shape, generator=generator)


@torch.no_grad()
def sample_trajectory(predict: Predict, schedule: NoiseSchedule, x_T: torch.Tensor, steps: int,
                      eta: float, generator: Generators = None) -> Trajectory:
    """Run the S-step DDIM chain from ``x_T`` (B, n, k) and record every state, mean and std.
    Draws its noise exactly as :func:`pipeline.method.samplers.sample` does (one (B, n, k)
    normal per stochastic step from ``generator`` on the CPU, or one row from each of B
    generators), so both give the same x_0."""
    times = ddim_timesteps(schedule.timesteps, steps)
    prev_times = times[1:] + [-1]
    batch, device = x_T.shape[0], x_T.device
    x, states, means, stds = x_T, [x_T], [], []
    for t, t_prev in zip(times, prev_times):
        x0_hat = predict(x, torch.full((batch,), t, dtype=torch.long, device=device))
        mean, sigma = ddim_moments(schedule, x0_hat, x, t, t_prev, eta)
        x = mean
        if eta > 0 and t_prev >= 0:
            x = mean + sigma * standard_normal(tuple(x_T.shape), generator).to(device)
        states.append(x)
        means.append(mean)
        stds.append(sigma.reshape(()) if t_prev >= 0 else torch.zeros((), device=device))
    return Trajectory(torch.stack(states), times, prev_times, torch.stack(means),
                      torch.stack(stds).float())


def chain_means(predict: Predict, schedule: NoiseSchedule, trajectory: Trajectory, eta: float
                ) -> torch.Tensor:
    """The means (S, B, n, k) that ``predict`` gives at the trajectory's states, with
    gradients: one denoiser call for all S * B rows."""
    steps, batch = len(trajectory.times), trajectory.latents.shape[1]
    states = trajectory.latents[:-1]
    t = torch.tensor(trajectory.times, device=states.device).repeat_interleave(batch)
    x0_hat = predict(states.reshape(steps * batch, *states.shape[2:]), t).view_as(states)
    return torch.stack([
        ddim_moments(schedule, x0_hat[s], states[s], t_s, t_prev, eta)[0]
        for s, (t_s, t_prev) in enumerate(zip(trajectory.times, trajectory.prev_times))])


def frozen_copy(module: nn.Module) -> nn.Module:
    """A reference policy: a deep copy with no parameter requiring gradients."""
    return copy.deepcopy(module).requires_grad_(False)


class ChainPolicy(nn.Module):
    """DDPT's S-step DDIM chain with ``eta`` > 0 as a Gaussian policy (``grpo``).

    Args:
        model: the prompt model (its denoiser is what trains). steps: S (>= 2; 8 or more is the
        intended use: the 3-step chain has one step with real noise). eta: the DDIM noise
        (1: DDPM-like variances). guidance: the classifier-free guidance scale.
    """

    def __init__(self, model: DiffusionPrompt, steps: int = 8, eta: float = 1.0,
                 guidance: float = 1.0):
        super().__init__()
        if model.deterministic:
            raise ValueError("a deterministic prompt model has no chain; use GaussianPromptPolicy")
        if steps < 2 or eta <= 0:
            raise ValueError(f"a chain policy needs steps >= 2 and eta > 0, got {steps}, {eta}")
        self.model, self.steps, self.eta, self.guidance = model, steps, eta, guidance

    def sample(self, num: int, generator: Generators = None,
               condition: torch.Tensor | None = None) -> Trajectory:
        """``num`` chains from x_T ~ N(0, I) drawn from ``generator`` (one, or one per row);
        condition (num, d)."""
        device = self.model.x0_bar.device
        x_T = standard_normal((num, *self.model.latent_shape), generator).to(device)
        return sample_trajectory(prompt_predictor(self.model, condition, self.guidance),
                                 self.model.schedule, x_T, self.steps, self.eta, generator)

    def moments(self, trajectory: Trajectory, condition: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(means (S, B, n, k) with gradients, stds (S,)) at the trajectory's states."""
        predict = prompt_predictor(self.model, condition, self.guidance)
        return chain_means(predict, self.model.schedule, trajectory, self.eta), trajectory.stds

    def direction(self, latent: torch.Tensor) -> torch.Tensor:
        return self.model.direction(latent)


class GaussianPromptPolicy(nn.Module):
    """The ablation (``grpo_gaussian``): z ~ N(D(0, T-1, c), s^2 I), one step around the
    deterministic generator's output; the same network, rewards and budget as the chain.

    Args:
        model: a prompt model (the deterministic generator's call is used whatever its
        objective). init_std: s at the start (set it to the trained chain's measured spread
        around its mean to start both policies with the same exploration). learn_std: s is a
        trained parameter (a scalar, as log s); otherwise a fixed buffer.
    """

    def __init__(self, model: DiffusionPrompt, init_std: float = 0.1, *, learn_std: bool = True,
                 guidance: float = 1.0):
        super().__init__()
        if init_std <= 0:
            raise ValueError(f"init_std must be > 0, got {init_std}")
        self.model, self.guidance = model, guidance
        log_std = torch.tensor(math.log(init_std))
        if learn_std:
            self.log_std = nn.Parameter(log_std)
        else:
            self.register_buffer("log_std", log_std)

    @property
    def std(self) -> torch.Tensor:
        return self.log_std.exp()

    def mean(self, num: int, condition: torch.Tensor | None = None) -> torch.Tensor:
        """(num, n, k), with gradients: D(0, T-1, c)."""
        return self.model.zero_noise_latents(num, condition, self.guidance)

    @torch.no_grad()
    def sample(self, num: int, generator: Generators = None,
               condition: torch.Tensor | None = None) -> Trajectory:
        """``num`` draws (one generator, or one per row); condition (num, d)."""
        mean = self.mean(num, condition)
        noise = standard_normal(tuple(mean.shape), generator).to(mean.device)
        z = mean + self.std * noise
        return Trajectory(torch.stack([torch.zeros_like(z), z]),
                          [self.model.schedule.timesteps - 1], [-1], mean[None],
                          self.std.detach().reshape(1))

    def moments(self, trajectory: Trajectory, condition: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(means (1, B, n, k), stds (1,)), both with gradients."""
        return self.mean(trajectory.latents.shape[1], condition)[None], self.std.reshape(1)

    def direction(self, latent: torch.Tensor) -> torch.Tensor:
        return self.model.direction(latent)

    @torch.no_grad()
    def sample_directions(self, num: int, generator: Generators = None, *,
                          condition: torch.Tensor | None = None, **_) -> torch.Tensor:
        """``num`` prompt directions (num, n, d), as every prompt model offers (the sampler
        settings do not apply: there is no chain). One generator or one per row."""
        return self.direction(self.sample(num, generator, condition).final)
