"""Noise schedules (plain functions chosen by name) and the tensors derived from them.

The forward process (DDPM, Ho et al. 2020, eq. 4) is
    x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps,   abar_t = prod_{s<=t} (1 - beta_s).
Time indices run 0..T-1 as in diffusers; index t here is the paper's step t+1.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn


def linear_betas(timesteps: int) -> torch.Tensor:
    """DDPM's linear betas (1e-4 to 0.02 at T=1000), rescaled by 1000/T so that any T
    reaches the same final noise level (as in improved DDPM / lucidrains); clipped at 0.999 so
    that very short chains (T < 50) stay valid."""
    scale = 1000.0 / timesteps
    betas = torch.linspace(scale * 1e-4, scale * 0.02, timesteps, dtype=torch.float64)
    return betas.clamp(max=0.999)


def cosine_betas(timesteps: int, s: float = 0.008) -> torch.Tensor:
    """Nichol & Dhariwal (2021) eq. 17: abar(t) = cos^2(((t/T + s) / (1 + s)) * pi/2) / abar(0);
    betas clipped at 0.999 to avoid a singularity at t = T."""
    steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    alphas_cumprod = f / f[0]
    betas = 1 - alphas_cumprod[1:] / alphas_cumprod[:-1]
    return betas.clamp(0, 0.999)


def sigmoid_betas(timesteps: int, start: float = -3, end: float = 3, tau: float = 1
                  ) -> torch.Tensor:
    """Sigmoid schedule (Jabri et al. 2022, arXiv 2212.11972): abar follows a rescaled sigmoid."""
    steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
    v_start = torch.tensor(start / tau).sigmoid()
    v_end = torch.tensor(end / tau).sigmoid()
    f = (-((steps * (end - start) + start) / tau).sigmoid() + v_end) / (v_end - v_start)
    alphas_cumprod = f / f[0]
    betas = 1 - alphas_cumprod[1:] / alphas_cumprod[:-1]
    return betas.clamp(0, 0.999)


SCHEDULES: dict[str, Callable[[int], torch.Tensor]] = {
    "linear": linear_betas,
    "cosine": cosine_betas,
    "sigmoid": sigmoid_betas,
}


class NoiseSchedule(nn.Module):
    """Betas and derived quantities as buffers (they move with ``.to(device)`` and are saved).

    Computed in float64 and stored in float32.
    """

    def __init__(self, name: str = "linear", timesteps: int = 2000):
        super().__init__()
        if name not in SCHEDULES:
            raise ValueError(f"unknown noise schedule {name!r}; known: {list(SCHEDULES)}")
        self.name, self.timesteps = name, timesteps
        betas = SCHEDULES[name](timesteps)
        alphas_cumprod = torch.cumprod(1 - betas, dim=0)
        alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
        # q(x_{t-1} | x_t, x_0) = N(coef_x0 x_0 + coef_xt x_t, posterior_variance)  (DDPM eq. 7)
        posterior_variance = betas * (1 - alphas_cumprod_prev) / (1 - alphas_cumprod)
        tensors = {
            "betas": betas,
            "alphas_cumprod": alphas_cumprod,
            "alphas_cumprod_prev": alphas_cumprod_prev,
            "posterior_variance": posterior_variance,
            "posterior_coef_x0": betas * alphas_cumprod_prev.sqrt() / (1 - alphas_cumprod),
            "posterior_coef_xt": ((1 - alphas_cumprod_prev) * (1 - betas).sqrt()
                                  / (1 - alphas_cumprod)),
        }
        for key, value in tensors.items():
            self.register_buffer(key, value.float(), persistent=False)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """q(x_t | x_0). x0, noise: (B, ...); t: (B,) long."""
        abar = _per_example(self.alphas_cumprod[t], x0)
        return abar.sqrt() * x0 + (1 - abar).sqrt() * noise

    def extra_repr(self) -> str:
        return f"name={self.name!r}, timesteps={self.timesteps}"


def _per_example(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1) to broadcast against ``like``."""
    return values.reshape(-1, *([1] * (like.dim() - 1))).to(like.dtype)
