"""DDPT's training objectives (method.md section 1, ``train.objective``).

An objective turns a prompt model and the frozen LM's loss into the step's loss. It sees the LM
only through ``code_loss(direction) -> scalar``: the LM's code cross-entropy given the prompt
``X_ctx + direction`` for the step's batch (direction (B, n, d) or (n, d)). Nothing is kept
between calls: what ``after_step`` needs comes back in the :class:`ObjectiveOutput`.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from pipeline.method.prompt import DiffusionPrompt

CodeLoss = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class ObjectiveOutput:
    """One step's loss and what it measured.

    ``stats`` are detached 0-d tensors (loss, code_loss, consistency, direction_norm): they
    become floats only when logged, so a GPU step does not wait on them. ``x0_hat`` (B, n, k)
    is what the bootstrap target's update needs.
    """

    loss: torch.Tensor
    stats: dict[str, torch.Tensor] = field(default_factory=dict)
    x0_hat: torch.Tensor | None = None


def direction_stats(loss: torch.Tensor, code_loss: torch.Tensor, consistency: torch.Tensor,
                    direction: torch.Tensor) -> dict[str, torch.Tensor]:
    """The step statistics every objective reports, detached (0-d tensors)."""
    return {"loss": loss.detach(), "code_loss": code_loss.detach(),
            "consistency": consistency.detach(),
            "direction_norm": direction.detach().norm(dim=-1).mean()}


class BootstrapObjective:
    """The default objective (``objective: bootstrap``).

    Each step: t ~ U{0..T-1}, eps ~ N(0, I); x_t = sqrt(abar_t) x0_bar + sqrt(1 - abar_t) eps;
    x0_hat = D(x_t, t); loss = CE(LM | X_ctx + Up(x0_hat)) + lambda ||x0_hat - x0_bar||^2;
    then x0_bar <- (1 - rate) x0_bar + rate * mean(x0_hat) (no gradient).

    Args:
        ema_rate: the target's moving-average rate. consistency_weight: lambda.
    """

    def __init__(self, ema_rate: float = 0.1, consistency_weight: float = 0.01):
        self.rate, self.weight = ema_rate, consistency_weight

    def loss(self, model: DiffusionPrompt, code_loss: CodeLoss, batch_size: int,
             generator: torch.Generator | None = None) -> ObjectiveOutput:
        device, shape = model.x0_bar.device, (batch_size, *model.latent_shape)
        t = torch.randint(0, model.schedule.timesteps, (batch_size,), generator=generator)
        t = t.to(device)
        eps = torch.randn(shape, generator=generator).to(device)
        x0_bar = model.x0_bar.expand(shape)
        x_t = model.schedule.add_noise(x0_bar, eps, t)
        x0_hat = model.denoiser(x_t, t)
        direction = model.direction(x0_hat)
        lm_loss = code_loss(direction)
        consistency = (x0_hat - x0_bar).pow(2).mean()
        loss = lm_loss + self.weight * consistency
        return ObjectiveOutput(loss, direction_stats(loss, lm_loss, consistency, direction),
                               x0_hat.detach())

    @torch.no_grad()
    def after_step(self, model: DiffusionPrompt, output: ObjectiveOutput) -> None:
        mean = output.x0_hat.mean(0)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # Every rank must keep the same target: average the ranks' batch means.
            torch.distributed.all_reduce(mean)
            mean /= torch.distributed.get_world_size()
        model.x0_bar.lerp_(mean.to(model.x0_bar.dtype), self.rate)


OBJECTIVES = {"bootstrap": BootstrapObjective}
