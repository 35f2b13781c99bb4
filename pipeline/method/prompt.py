"""DDPT's prompt model (method.md section 1): noise (and a task's condition) -> a prompt direction.

:class:`DiffusionPrompt` bundles the noise schedule, the denoiser, the up-projection, the
bootstrap target ``x0_bar`` and, for the teacher objective, a frozen EMA copy of the denoiser.
Latents are (n, k); directions are (n, d); conditions are (d,) per example; the prompt the LM
sees is ``X_ctx + direction``. Every prompt model (this one, the baselines) offers
``sample_directions(num, generator, sampler=..., steps=..., eta=..., condition=...,
guidance=...)``, so sampling and evaluation treat them alike.
"""
from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from pipeline.method.denoiser import PromptDenoiser, UpProjection, as_buffers
from pipeline.method.samplers import sample
from pipeline.method.schedules import NoiseSchedule

Generators = torch.Generator | Sequence[torch.Generator] | None


class DiffusionPrompt(nn.Module):
    """Noise (+ condition) -> prompt direction.

    Args:
        context_tokens: n. hidden_size: d. token_norm: the LM's mean token-embedding norm (sets
        the up-projection's scale). bottleneck: k. hidden_dim, num_blocks, time_embed_dim: the
        denoiser's widths. up_projection: 'fixed' or 'learned'. up_scale: a unit-normal latent
        maps to this share of ``token_norm``. schedule, timesteps: the noise schedule. seed: the
        up-projection's seed. cond_dim: the condition's width (0: unconditional, one prompt
        distribution for every task). teacher: keep an EMA copy of the denoiser (the
        ``bootstrap_teacher`` objective). deterministic: the ablation's generator, x0 = D(0, T-1,
        c), one call and no noise, instead of a reverse chain. chain_steps: the model was trained
        through a DDIM chain of this many steps (``unrolled``, ``spread``), the only timesteps
        it knows: it samples on them, deterministically for 'ddim' and with fresh noise (eta 1,
        DDPM's posterior) for 'ddpm'.
    """

    def __init__(self, context_tokens: int, hidden_size: int, token_norm: float, *,
                 bottleneck: int = 16, hidden_dim: int = 256, num_blocks: int = 2,
                 time_embed_dim: int = 64, up_projection: str = "fixed", up_scale: float = 0.5,
                 schedule: str = "linear", timesteps: int = 2000, seed: int = 0,
                 cond_dim: int = 0, teacher: bool = False, deterministic: bool = False,
                 chain_steps: int | None = None):
        super().__init__()
        self.context_tokens, self.hidden_size = context_tokens, hidden_size
        self.token_norm, self.bottleneck = token_norm, bottleneck
        self.cond_dim, self.deterministic, self.chain_steps = cond_dim, deterministic, chain_steps
        self.schedule = NoiseSchedule(schedule, timesteps)
        self.denoiser = PromptDenoiser(context_tokens, bottleneck, hidden_dim, num_blocks,
                                       time_embed_dim, cond_dim)
        self.up = UpProjection(bottleneck, hidden_size, up_projection, up_scale * token_norm,
                               seed=seed)
        # The bootstrap target: a stop-gradient moving average of clean predictions. It starts
        # at 0, i.e. at the manual prompt.
        self.register_buffer("x0_bar", torch.zeros(context_tokens, bottleneck))
        self.teacher = as_buffers(copy.deepcopy(self.denoiser)) if teacher else None

    @property
    def latent_shape(self) -> tuple[int, int]:
        return (self.context_tokens, self.bottleneck)

    @property
    def conditional(self) -> bool:
        return self.cond_dim > 0

    def direction(self, latent: torch.Tensor) -> torch.Tensor:
        """(..., n, k) -> (..., n, d)."""
        return self.up(latent)

    def set_condition_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Standardise conditions with the training conditions' (d,) mean and std."""
        for net in (self.denoiser, self.teacher):
            if net is not None:
                net.set_condition_stats(mean, std)

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, condition: torch.Tensor | None = None,
                guidance: float = 1.0, drop: torch.Tensor | None = None, *,
                teacher: bool = False) -> torch.Tensor:
        """x0_hat (B, n, k). With a condition and classifier-free guidance scale w:
        ``x0_u + w (x0_c - x0_u)``; w = 1 is the conditional prediction, w = 0 the
        unconditional one. ``drop`` (B,): rows whose condition is replaced by the null one."""
        net = self.teacher if teacher else self.denoiser
        if condition is None or not self.conditional or guidance == 1:
            return net(x_t, t, condition, drop)
        unconditional = net(x_t, t, None)
        if guidance == 0:
            return unconditional
        return unconditional + guidance * (net(x_t, t, condition, drop) - unconditional)

    def zero_noise_latents(self, batch: int, condition: torch.Tensor | None = None,
                           guidance: float = 1.0, drop: torch.Tensor | None = None
                           ) -> torch.Tensor:
        """The deterministic generator: D(x = 0, t = T-1, c), (B, n, k), with gradient."""
        device = self.x0_bar.device
        x = torch.zeros(batch, *self.latent_shape, device=device)
        t = torch.full((batch,), self.schedule.timesteps - 1, dtype=torch.long, device=device)
        return self.predict(x, t, condition, guidance, drop)

    @torch.no_grad()
    def update_teacher(self, rate: float) -> None:
        """Move the EMA teacher toward the denoiser: theta' <- theta' + rate (theta - theta')."""
        teacher = dict(self.teacher.named_buffers())
        for name, param in self.denoiser.named_parameters():
            teacher[name].lerp_(param.detach().to(teacher[name].dtype), rate)

    def chain(self, sampler: str = "ddim", steps: int = 50, eta: float = 0.0
              ) -> tuple[str, int, float]:
        """The reverse process that sampling with ``(sampler, steps, eta)`` really runs, as
        ``(sampler, steps, eta)``: the one asked for; the ``chain_steps``-step DDIM chain the model
        was trained through (eta 1 for 'ddpm'); or the deterministic generator's single call."""
        if self.deterministic:
            return "deterministic", 1, 0.0
        if self.chain_steps:
            return "ddim", self.chain_steps, 1.0 if sampler == "ddpm" else eta
        return sampler, self.schedule.timesteps if sampler == "ddpm" else steps, eta

    @torch.no_grad()
    def sample_latents(self, num: int, generator: Generators = None, *, sampler: str = "ddim",
                       steps: int = 50, eta: float = 0.0, condition: torch.Tensor | None = None,
                       guidance: float = 1.0) -> torch.Tensor:
        """``num`` latents: (num, n, k), from the reverse chain (or the deterministic
        generator). ``generator``: one, or one per row (see
        :func:`pipeline.method.samplers.sample`). ``condition``: (num, d), one per row."""
        was_training, threads = self.training, torch.get_num_threads()
        self.eval()
        device = self.x0_bar.device
        if device.type == "cpu":
            # The denoiser's matrices are tiny: one thread skips the per-op fork/join that
            # makes each of the T small steps slow, worst on a busy machine.
            torch.set_num_threads(1)
        try:
            if self.deterministic:
                return self.zero_noise_latents(num, condition, guidance)
            sampler, steps, eta = self.chain(sampler, steps, eta)
            return sample(lambda x, t: self.predict(x, t, condition, guidance), self.schedule,
                          (num, *self.latent_shape), sampler=sampler, steps=steps, eta=eta,
                          generator=generator, device=device)
        finally:
            torch.set_num_threads(threads)
            self.train(was_training)

    def sample_directions(self, num: int, generator: Generators = None, *, sampler: str = "ddim",
                          steps: int = 50, eta: float = 0.0, condition: torch.Tensor | None = None,
                          guidance: float = 1.0) -> torch.Tensor:
        """``num`` prompt directions: (num, n, d)."""
        return self.direction(self.sample_latents(num, generator, sampler=sampler, steps=steps,
                                                  eta=eta, condition=condition,
                                                  guidance=guidance))
