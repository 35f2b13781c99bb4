"""DDPT's prompt model (method.md section 1): noise -> a prompt direction.

:class:`DiffusionPrompt` bundles the noise schedule, the denoiser, the up-projection and the
bootstrap target ``x0_bar``. Latents are (n, k); directions are (n, d); the prompt the LM sees is
``X_ctx + direction``. Every prompt model (this one, the baselines) offers
``sample_directions(num, generator, sampler=..., steps=..., eta=...)``, so sampling and
evaluation treat them alike.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from pipeline.method.denoiser import PromptDenoiser, UpProjection
from pipeline.method.samplers import sample
from pipeline.method.schedules import NoiseSchedule

Generators = torch.Generator | Sequence[torch.Generator] | None


class DiffusionPrompt(nn.Module):
    """Noise -> prompt direction.

    Args:
        context_tokens: n. hidden_size: d. token_norm: the LM's mean token-embedding norm (sets
        the fixed up-projection's scale). bottleneck: k. hidden_dim, num_blocks, time_embed_dim:
        the denoiser's widths. up_projection: 'fixed' or 'learned'. up_scale: a unit-normal
        latent maps to this share of ``token_norm``. schedule, timesteps: the noise schedule.
        seed: the fixed up-projection's seed.
    """

    def __init__(self, context_tokens: int, hidden_size: int, token_norm: float, *,
                 bottleneck: int = 16, hidden_dim: int = 256, num_blocks: int = 2,
                 time_embed_dim: int = 64, up_projection: str = "fixed", up_scale: float = 0.5,
                 schedule: str = "linear", timesteps: int = 2000, seed: int = 0):
        super().__init__()
        self.context_tokens, self.hidden_size = context_tokens, hidden_size
        self.token_norm = token_norm
        self.bottleneck = bottleneck
        self.schedule = NoiseSchedule(schedule, timesteps)
        self.denoiser = PromptDenoiser(context_tokens, bottleneck, hidden_dim, num_blocks,
                                       time_embed_dim)
        self.up = UpProjection(bottleneck, hidden_size, up_projection, up_scale * token_norm,
                               seed=seed)
        # The bootstrap target: a stop-gradient moving average of clean predictions. It starts
        # at 0, i.e. at the manual prompt.
        self.register_buffer("x0_bar", torch.zeros(context_tokens, bottleneck))

    @property
    def latent_shape(self) -> tuple[int, int]:
        return (self.context_tokens, self.bottleneck)

    def direction(self, latent: torch.Tensor) -> torch.Tensor:
        """(..., n, k) -> (..., n, d)."""
        return self.up(latent)

    @torch.no_grad()
    def sample_latents(self, num: int, generator: Generators = None, *, sampler: str = "ddim",
                       steps: int = 50, eta: float = 0.0) -> torch.Tensor:
        """``num`` latents from the reverse chain: (num, n, k). ``generator``: one, or one per
        row (see :func:`pipeline.method.samplers.sample`)."""
        was_training, threads = self.training, torch.get_num_threads()
        self.eval()
        device = self.x0_bar.device
        if device.type == "cpu":
            # The denoiser's matrices are tiny: one thread skips the per-op fork/join that
            # makes each of the T small steps slow, worst on a busy machine.
            torch.set_num_threads(1)
        try:
            return sample(self.denoiser, self.schedule, (num, *self.latent_shape),
                          sampler=sampler, steps=steps, eta=eta, generator=generator,
                          device=device)
        finally:
            torch.set_num_threads(threads)
            self.train(was_training)

    def sample_directions(self, num: int, generator: Generators = None, *, sampler: str = "ddim",
                          steps: int = 50, eta: float = 0.0) -> torch.Tensor:
        """``num`` prompt directions: (num, n, d)."""
        return self.direction(self.sample_latents(num, generator, sampler=sampler, steps=steps,
                                                  eta=eta))
