"""Reverse processes for an x0-predicting denoiser: DDPM ancestral (T steps) and DDIM (S steps).

``model(x_t, t)`` returns x0_hat with the same shape as x_t; t is a (B,) long tensor.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from pipeline.method.schedules import NoiseSchedule

Denoise = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class StepOutput:
    prev_sample: torch.Tensor  # x_{t_prev}
    pred_original_sample: torch.Tensor  # x0_hat


def ddpm_step(
    schedule: NoiseSchedule, x0_hat: torch.Tensor, x_t: torch.Tensor, t: int,
    noise: torch.Tensor | None,
) -> StepOutput:
    """One ancestral step: sample q(x_{t-1} | x_t, x0_hat) (DDPM eq. 6-7); no noise at t = 0."""
    mean = schedule.posterior_coef_x0[t] * x0_hat + schedule.posterior_coef_xt[t] * x_t
    if t > 0:
        mean = mean + schedule.posterior_variance[t].sqrt() * noise
    return StepOutput(mean, x0_hat)


def ddim_moments(
    schedule: NoiseSchedule, x0_hat: torch.Tensor, x_t: torch.Tensor, t: int, t_prev: int,
    eta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Gaussian of one DDIM step t -> t_prev: (mean, like x_t; sigma, 0-d). x_{t_prev} =
    mean + sigma * noise; sigma is 0 for eta = 0 and for the last step (t_prev = -1, x_0)."""
    abar_t = schedule.alphas_cumprod[t]
    abar_prev = schedule.alphas_cumprod[t_prev] if t_prev >= 0 else torch.ones_like(abar_t)
    eps_hat = (x_t - abar_t.sqrt() * x0_hat) / (1 - abar_t).sqrt()
    sigma = eta * ((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)).sqrt()
    mean = abar_prev.sqrt() * x0_hat + (1 - abar_prev - sigma**2).clamp(min=0).sqrt() * eps_hat
    return mean, sigma


def ddim_step(
    schedule: NoiseSchedule, x0_hat: torch.Tensor, x_t: torch.Tensor, t: int, t_prev: int, *,
    eta: float, noise: torch.Tensor | None,
) -> StepOutput:
    """One DDIM step (Song et al. 2021, eq. 12), t -> t_prev (t_prev = -1 means x_0).

    sigma = eta * sqrt((1 - abar_prev) / (1 - abar_t)) * sqrt(1 - abar_t / abar_prev) (eq. 16);
    eta = 0 is deterministic, eta = 1 with consecutive steps is DDPM's posterior.
    """
    prev, sigma = ddim_moments(schedule, x0_hat, x_t, t, t_prev, eta)
    if eta > 0 and t_prev >= 0:
        prev = prev + sigma * noise
    return StepOutput(prev, x0_hat)


def ddim_timesteps(timesteps: int, steps: int) -> list[int]:
    """S evenly spaced indices from T-1 down to 0 ("trailing" spacing, always ends at t = 0)."""
    if not 1 <= steps <= timesteps:
        raise ValueError(f"DDIM steps must be in [1, {timesteps}], got {steps}")
    times = {round(i * (timesteps - 1) / max(steps - 1, 1)) for i in range(steps)}
    return sorted(times, reverse=True)


@torch.no_grad()
def sample(
    model: Denoise, schedule: NoiseSchedule, shape: tuple[int, ...], sampler: str = "ddim", *,
    steps: int = 50, eta: float = 0.0,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    x_T: torch.Tensor | None = None, device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Run the reverse chain from x_T ~ N(0, I) (or the given ``x_T``) and return x_0.

    sampler 'ddpm' runs all T ancestral steps; 'ddim' runs ``steps`` DDIM steps.
    ``generator`` may be one generator per row (``shape[0]`` of them): row i then draws all its
    noise from generator i, so each row follows the chain it would follow alone (up to the float
    rounding of a batched denoiser), with one denoiser call per step for all rows.
    """
    per_row = isinstance(generator, (list, tuple))
    if per_row and len(generator) != shape[0]:
        raise ValueError(f"{len(generator)} generators for {shape[0]} rows")

    def randn() -> torch.Tensor:
        if per_row:
            return torch.cat([torch.randn((1, *shape[1:]), generator=g) for g in generator]
                             ).to(device)
        return torch.randn(shape, generator=generator, device="cpu").to(device)

    x = randn() if x_T is None else x_T.to(device)
    batch = shape[0]
    if sampler == "ddpm":
        for t in range(schedule.timesteps - 1, -1, -1):
            x0_hat = model(x, torch.full((batch,), t, dtype=torch.long, device=device))
            x = ddpm_step(schedule, x0_hat, x, t, randn() if t > 0 else None).prev_sample
        return x
    if sampler == "ddim":
        times = ddim_timesteps(schedule.timesteps, steps)
        for t, t_prev in zip(times, times[1:] + [-1]):
            x0_hat = model(x, torch.full((batch,), t, dtype=torch.long, device=device))
            noise = randn() if eta > 0 and t_prev >= 0 else None
            x = ddim_step(schedule, x0_hat, x, t, t_prev, eta=eta, noise=noise).prev_sample
        return x
    raise ValueError(f"unknown sampler {sampler!r}; known: ['ddpm', 'ddim']")
