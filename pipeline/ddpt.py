"""DDPT: the diffusion prompt model and its training objective (method.md section 1).

:class:`DiffusionPrompt` bundles the noise schedule, the denoiser, the up-projection and the
bootstrap target ``x0_bar``. Latents are (n, k); directions are (n, d); the prompt the LM sees is
``X_ctx + direction``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pipeline.config import DenoiserConfig, DiffusionConfig, SampleConfig, TrainConfig
from pipeline.diffusion.denoiser import PromptDenoiser, UpProjection
from pipeline.diffusion.samplers import sample
from pipeline.diffusion.schedules import NoiseSchedule
from pipeline.frozen_lm import Batch, FrozenCodeLM


class DiffusionPrompt(nn.Module):
    """Noise -> prompt direction.

    Args:
        context_tokens: n. hidden_size: d. token_norm: the LM's mean token-embedding norm (sets
        the fixed up-projection's scale). seed: the fixed up-projection's seed.
    """

    def __init__(self, context_tokens: int, hidden_size: int, token_norm: float,
                 denoiser: DenoiserConfig, diffusion: DiffusionConfig, seed: int = 0):
        super().__init__()
        self.context_tokens, self.hidden_size, self.token_norm = context_tokens, hidden_size, token_norm
        self.bottleneck = denoiser.bottleneck
        self.schedule = NoiseSchedule(diffusion.schedule, diffusion.timesteps)
        self.denoiser = PromptDenoiser(context_tokens, denoiser)
        self.up = UpProjection(denoiser.bottleneck, hidden_size, denoiser.up_projection,
                               denoiser.up_scale * token_norm, seed=seed)
        # The bootstrap target: a stop-gradient moving average of clean predictions. It starts
        # at 0, i.e. at the manual prompt.
        self.register_buffer("x0_bar", torch.zeros(context_tokens, denoiser.bottleneck))

    @property
    def latent_shape(self) -> tuple[int, int]:
        return (self.context_tokens, self.bottleneck)

    def direction(self, latent: torch.Tensor) -> torch.Tensor:
        """(..., n, k) -> (..., n, d)."""
        return self.up(latent)

    @torch.no_grad()
    def sample_latents(self, num: int, config: SampleConfig,
                       generator: torch.Generator | None = None) -> torch.Tensor:
        """``num`` latents from the reverse chain: (num, n, k)."""
        was_training = self.training
        self.eval()
        device = self.x0_bar.device
        latents = sample(self.denoiser, self.schedule, (num, *self.latent_shape),
                         sampler=config.sampler, steps=config.ddim_steps, eta=config.eta,
                         generator=generator, device=device)
        self.train(was_training)
        return latents

    def sample_directions(self, num: int, config: SampleConfig,
                          generator: torch.Generator | None = None) -> torch.Tensor:
        """``num`` prompt directions: (num, n, d)."""
        return self.direction(self.sample_latents(num, config, generator))


@dataclass
class StepStats:
    loss: float  # total objective
    code_loss: float  # the LM's cross-entropy on code tokens
    consistency: float  # ||x0_hat - x0_bar||^2, mean over elements
    direction_norm: float  # mean per-position norm of the predicted direction


class BootstrapObjective:
    """The default objective (method.md section 1, ``objective: bootstrap``).

    Each step: t ~ U{0..T-1}, eps ~ N(0, I); x_t = sqrt(abar_t) x0_bar + sqrt(1 - abar_t) eps;
    x0_hat = D(x_t, t); loss = CE(LM | X_ctx + Up(x0_hat)) + lambda ||x0_hat - x0_bar||^2;
    then x0_bar <- (1 - rate) x0_bar + rate * mean(x0_hat) (no gradient).
    """

    def __init__(self, config: TrainConfig):
        self.rate, self.weight = config.ema_rate, config.consistency_weight

    def loss(self, model: DiffusionPrompt, lm: FrozenCodeLM, batch: Batch,
             generator: torch.Generator | None = None) -> tuple[torch.Tensor, StepStats]:
        bsz = batch.input_ids.shape[0]
        device = model.x0_bar.device
        t = torch.randint(0, model.schedule.timesteps, (bsz,), generator=generator).to(device)
        eps = torch.randn((bsz, *model.latent_shape), generator=generator).to(device)
        x0_bar = model.x0_bar.expand(bsz, *model.latent_shape)
        x_t = model.schedule.add_noise(x0_bar, eps, t)
        x0_hat = model.denoiser(x_t, t)
        direction = model.direction(x0_hat)
        code_loss = lm.code_loss(batch, direction)
        consistency = (x0_hat - x0_bar).pow(2).mean()
        loss = code_loss + self.weight * consistency
        self._last_x0_hat = x0_hat.detach()
        stats = StepStats(loss.item(), code_loss.item(), consistency.item(),
                          direction.detach().norm(dim=-1).mean().item())
        return loss, stats

    @torch.no_grad()
    def after_step(self, model: DiffusionPrompt) -> None:
        mean = self._last_x0_hat.mean(0)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # Every rank must keep the same target: average the ranks' batch means.
            torch.distributed.all_reduce(mean)
            mean /= torch.distributed.get_world_size()
        model.x0_bar.lerp_(mean.to(model.x0_bar.dtype), self.rate)


OBJECTIVES = {"bootstrap": BootstrapObjective}


class DDPTLoss(nn.Module):
    """The prompt model and the frozen LM in one module, returning the objective's loss.

    DeepSpeed wraps exactly one module; with ZeRO-3 its hooks gather the partitioned LM layers
    as they run, so the LM must be a submodule here.
    """

    def __init__(self, prompt_model: DiffusionPrompt, lm: FrozenCodeLM, objective):
        super().__init__()
        self.prompt = prompt_model
        self.lm_model = lm.model  # registered, so DeepSpeed sees (and partitions) it
        self._lm, self.objective = lm, objective

    def forward(self, batch: Batch, generator: torch.Generator | None = None):
        return self.objective.loss(self.prompt, self._lm, batch, generator)


def build_prompt_model(lm: FrozenCodeLM, denoiser: DenoiserConfig, diffusion: DiffusionConfig,
                       seed: int, token_norm: float | None = None) -> DiffusionPrompt:
    """``token_norm`` defaults to the LM's mean token-embedding norm (pass it when the table is
    partitioned and has to be gathered first)."""
    torch.manual_seed(seed)
    norm = lm.mean_token_norm() if token_norm is None else token_norm
    return DiffusionPrompt(lm.context_length, lm.hidden_size, norm, denoiser, diffusion, seed=seed)
