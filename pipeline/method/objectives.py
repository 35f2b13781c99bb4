"""DDPT's training objectives (method.md section 1, ``train.objective``).

An objective turns a prompt model and the frozen LM's loss into the step's loss. It sees the LM
only through ``code_loss(direction) -> scalar``: the LM's code cross-entropy given the prompt
``X_ctx + direction`` for the step's batch (direction (B, n, d) or (n, d)), and the batch's
conditions (B, d) when the prompt model is conditional. Nothing is kept between calls: what
``after_step`` needs comes back in the :class:`ObjectiveOutput`.

- ``bootstrap``: noise a global EMA target ``x0_bar``, denoise, LM loss (the default).
- ``bootstrap_teacher``: the target is, per example, an EMA teacher's short DDIM sample from
  fresh noise (given the example's condition), instead of one global ``x0_bar``.
- ``unrolled``: a short DDIM chain from noise, gradients through every step, LM loss on its end
  (the paper's "back-propagated through the diffusion network").
- ``spread``: ``unrolled`` plus a reward for the spread between two chains' ends from different
  noise (capped), so that the prompts keep a distribution.
- ``deterministic``: the ablation, the same network as a plain generator: x0 = D(0, T-1, c).
- ``soft_min``: K prompts per example from K noises through the ``unrolled`` chain; the loss is
  a soft minimum of their cross-entropies, so a *set* of different prompts is optimal.
Conditional models drop the condition with probability ``cfg_dropout`` (classifier-free
guidance's training half).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from pipeline.method.prompt import DiffusionPrompt
from pipeline.method.samplers import ddim_step, ddim_timesteps

# code_loss(direction) -> the token-mean CE (0-d); code_loss(direction, per_example=True) -> (R,)
# per-row means. direction (R, n, d) with R = m * B rows is m prompts per example: row
# i * B + b gives example b the i-th prompt, all R rows in one LM forward.
CodeLoss = Callable[..., torch.Tensor]


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


def squared_distance(x0_hat: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``||x0_hat - target||^2`` as method.md writes it: each example's squared L2 distance
    over its whole (n, k) latent, averaged over the batch. (B, n, k), (B, n, k) or (n, k) -> 0-d.
    A sum over the latent, not a mean: a mean would divide lambda by n * k (288 for the
    embedded model's n = 18, k = 16) and leave the term practically off."""
    return (x0_hat - target).pow(2).sum(dim=(-2, -1)).mean()


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
        ema_rate: the target's moving-average rate. consistency_weight: lambda. cfg_dropout:
        the probability of dropping a conditional model's condition.
    """

    def __init__(self, ema_rate: float = 0.1, consistency_weight: float = 0.01,
                 cfg_dropout: float = 0.1):
        self.rate, self.weight, self.cfg_dropout = ema_rate, consistency_weight, cfg_dropout

    def loss(self, model: DiffusionPrompt, code_loss: CodeLoss, batch_size: int,
             generator: torch.Generator | None = None,
             condition: torch.Tensor | None = None) -> ObjectiveOutput:
        device, shape = model.x0_bar.device, (batch_size, *model.latent_shape)
        t = torch.randint(0, model.schedule.timesteps, (batch_size,), generator=generator)
        t = t.to(device)
        eps = torch.randn(shape, generator=generator).to(device)
        drop = cfg_drop(batch_size, self.cfg_dropout, condition, generator)
        x0_bar = model.x0_bar.expand(shape)
        x_t = model.schedule.add_noise(x0_bar, eps, t)
        x0_hat = model.predict(x_t, t, condition, drop=drop)
        direction = model.direction(x0_hat)
        lm_loss = code_loss(direction)
        consistency = squared_distance(x0_hat, x0_bar)
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


class TeacherBootstrapObjective:
    """``bootstrap`` with a per-example target from an EMA teacher (``bootstrap_teacher``).

    Each step, per example i: target_i = the teacher's DDIM-``teacher_steps`` sample from fresh
    noise given c_i (no gradient); t ~ U{0..T-1}, eps ~ N(0, I); x_t = sqrt(abar_t) target_i +
    sqrt(1 - abar_t) eps; x0_hat = D(x_t, t, c_i); loss = CE(LM | X_ctx + Up(x0_hat)) + lambda
    ||x0_hat - target||^2. After the step the teacher moves toward the denoiser by ``ema_rate``.
    At step 0 teacher and denoiser predict 0: the manual prompt, as ``bootstrap`` starts.
    """

    reads_parameters = True  # after_step reads the denoiser's weights (gathered under ZeRO-3)

    def __init__(self, ema_rate: float = 0.1, consistency_weight: float = 0.01,
                 cfg_dropout: float = 0.1, teacher_steps: int = 4):
        self.rate, self.weight, self.cfg_dropout = ema_rate, consistency_weight, cfg_dropout
        self.teacher_steps = teacher_steps

    def loss(self, model: DiffusionPrompt, code_loss: CodeLoss, batch_size: int,
             generator: torch.Generator | None = None,
             condition: torch.Tensor | None = None) -> ObjectiveOutput:
        if model.teacher is None:
            raise ValueError("bootstrap_teacher needs a prompt model built with teacher=True")
        device, shape = model.x0_bar.device, (batch_size, *model.latent_shape)
        t = torch.randint(0, model.schedule.timesteps, (batch_size,), generator=generator)
        t = t.to(device)
        eps = torch.randn(shape, generator=generator).to(device)
        x_T = torch.randn(shape, generator=generator).to(device)
        drop = cfg_drop(batch_size, self.cfg_dropout, condition, generator)
        with torch.no_grad():
            target = ddim_chain(model, x_T, condition, self.teacher_steps, drop, teacher=True)
        x_t = model.schedule.add_noise(target, eps, t)
        x0_hat = model.predict(x_t, t, condition, drop=drop)
        direction = model.direction(x0_hat)
        lm_loss = code_loss(direction)
        consistency = squared_distance(x0_hat, target)
        loss = lm_loss + self.weight * consistency
        return ObjectiveOutput(loss, direction_stats(loss, lm_loss, consistency, direction))

    def after_step(self, model: DiffusionPrompt, output: ObjectiveOutput) -> None:
        model.update_teacher(self.rate)


class UnrolledObjective:
    """The LM loss on the end of a short DDIM chain from noise, back-propagated through every
    step of it (``unrolled``): x_T ~ N(0, I); x_0 = DDIM-``unroll_steps`` (eta = 0) given c;
    loss = CE(LM | X_ctx + Up(x_0)). Sample with the same steps: the denoiser only ever sees
    those timesteps. ``consistency`` reports ||x_0||^2 (per example, as the bootstrap objectives'
    term; not in the loss)."""

    def __init__(self, cfg_dropout: float = 0.1, unroll_steps: int = 3):
        self.cfg_dropout, self.steps = cfg_dropout, unroll_steps

    def loss(self, model: DiffusionPrompt, code_loss: CodeLoss, batch_size: int,
             generator: torch.Generator | None = None,
             condition: torch.Tensor | None = None) -> ObjectiveOutput:
        device, shape = model.x0_bar.device, (batch_size, *model.latent_shape)
        x_T = torch.randn(shape, generator=generator).to(device)
        drop = cfg_drop(batch_size, self.cfg_dropout, condition, generator)
        x0 = ddim_chain(model, x_T, condition, self.steps, drop)
        direction = model.direction(x0)
        lm_loss = code_loss(direction)
        return ObjectiveOutput(lm_loss, direction_stats(
            lm_loss, lm_loss, squared_distance(x0, torch.zeros_like(x0)), direction))

    def after_step(self, model: DiffusionPrompt, output: ObjectiveOutput) -> None:
        pass


class SpreadObjective:
    """``unrolled`` that keeps a distribution (``spread``): the LM loss on one DDIM chain's end
    per example, minus ``spread_weight`` times the spread of a second chain's end from other
    noise (the denoiser only: no LM cost), capped at ``target_spread``. Without the term any
    objective that only lowers the LM loss drives every noise to the same best prompt.

    spread = ||x0_a - x0_b|| / mean(||x0_a||, ||x0_b||), per example (latents flattened).
    """

    def __init__(self, cfg_dropout: float = 0.1, unroll_steps: int = 3,
                 spread_weight: float = 0.1, target_spread: float = 0.5):
        self.cfg_dropout, self.steps = cfg_dropout, unroll_steps
        self.weight, self.target = spread_weight, target_spread

    def loss(self, model: DiffusionPrompt, code_loss: CodeLoss, batch_size: int,
             generator: torch.Generator | None = None,
             condition: torch.Tensor | None = None) -> ObjectiveOutput:
        device, shape = model.x0_bar.device, (batch_size, *model.latent_shape)
        x_a = torch.randn(shape, generator=generator).to(device)
        x_b = torch.randn(shape, generator=generator).to(device)
        drop = cfg_drop(batch_size, self.cfg_dropout, condition, generator)
        x0_a = ddim_chain(model, x_a, condition, self.steps, drop)
        x0_b = ddim_chain(model, x_b, condition, self.steps, drop)
        direction = model.direction(x0_a)
        lm_loss = code_loss(direction)
        a, b = x0_a.flatten(1), x0_b.flatten(1)
        norm = (a.norm(dim=-1) + b.norm(dim=-1)) / 2 + 1e-6
        spread = ((a - b).norm(dim=-1) / norm).clamp(max=self.target).mean()
        loss = lm_loss - self.weight * spread
        return ObjectiveOutput(loss, direction_stats(loss, lm_loss, spread, direction))

    def after_step(self, model: DiffusionPrompt, output: ObjectiveOutput) -> None:
        pass


class DeterministicObjective:
    """The ablation (``deterministic``): the same network as a plain generator, x0 = D(0, T-1,
    c), one call, no noise; loss = CE(LM | X_ctx + Up(x0)); the same condition dropout."""

    def __init__(self, cfg_dropout: float = 0.1):
        self.cfg_dropout = cfg_dropout

    def loss(self, model: DiffusionPrompt, code_loss: CodeLoss, batch_size: int,
             generator: torch.Generator | None = None,
             condition: torch.Tensor | None = None) -> ObjectiveOutput:
        drop = cfg_drop(batch_size, self.cfg_dropout, condition, generator)
        x0 = model.zero_noise_latents(batch_size, condition, drop=drop)
        direction = model.direction(x0)
        lm_loss = code_loss(direction)
        return ObjectiveOutput(lm_loss, direction_stats(lm_loss, lm_loss, torch.zeros(()),
                                                        direction))

    def after_step(self, model: DiffusionPrompt, output: ObjectiveOutput) -> None:
        pass


@dataclass(frozen=True)
class SoftMinSettings:
    """``soft_min``'s own settings (to move into ``pipeline/config.py``'s train section):
    prompts: K prompts per example (>= 2); temperature: tau > 0 (tau -> 0 is the hard
    minimum, multiple-choice learning; large tau tends to the mean CE plus a constant)."""

    prompts: int = 4
    temperature: float = 0.1

    def __post_init__(self):
        if self.prompts < 2 or self.temperature <= 0:
            raise ValueError(f"soft_min needs prompts >= 2 and temperature > 0, got {self}")


def soft_min(losses: torch.Tensor, temperature: float, dim: int = 0) -> torch.Tensor:
    """``-tau * logsumexp(-losses / tau)`` along ``dim``: below the minimum by at most
    ``tau log K``; its gradient weighs each loss by ``softmax(-losses / tau)``."""
    return -temperature * torch.logsumexp(-losses / temperature, dim=dim)


class SoftMinObjective:
    """A set of prompts per task (``soft_min``; method.md section 1): K noises per example, each
    through the ``unroll_steps`` DDIM chain (eta = 0, gradients through every step) given the
    example's condition; CE_k from one LM forward of the K * B rows; loss = mean over examples
    of ``-tau * logsumexp_k(-CE_k / tau)`` (multiple-choice learning, "pass@k training"). The
    condition dropout draws one decision per example, shared by its K prompts.

    Stats: ``code_loss`` is the mean CE over all K prompts (comparable with the other
    objectives), ``best_code_loss`` the mean over examples of the best prompt's CE, and
    ``consistency`` the mean over examples of the K prompts' latent spread (the mean per-row
    std over the K chains' ends, not in the loss).
    """

    def __init__(self, cfg_dropout: float = 0.1, unroll_steps: int = 3,
                 settings: SoftMinSettings = SoftMinSettings()):
        self.cfg_dropout, self.steps, self.settings = cfg_dropout, unroll_steps, settings

    def loss(self, model: DiffusionPrompt, code_loss: CodeLoss, batch_size: int,
             generator: torch.Generator | None = None,
             condition: torch.Tensor | None = None) -> ObjectiveOutput:
        K, device = self.settings.prompts, model.x0_bar.device
        x_T = torch.randn((K * batch_size, *model.latent_shape), generator=generator).to(device)
        drop = cfg_drop(batch_size, self.cfg_dropout, condition, generator)
        tile = lambda x: None if x is None else x.repeat(K, *([1] * (x.dim() - 1)))
        x0 = ddim_chain(model, x_T, tile(condition), self.steps, tile(drop))
        direction = model.direction(x0)  # (K * B, n, d), row k * B + b: prompt k of example b
        ce = code_loss(direction, per_example=True).view(K, batch_size)
        loss = soft_min(ce, self.settings.temperature).mean()
        spread = x0.view(K, batch_size, -1).std(0).mean()
        stats = direction_stats(loss, ce.mean(), spread, direction)
        stats["best_code_loss"] = ce.detach().min(0).values.mean()
        return ObjectiveOutput(loss, stats)

    def after_step(self, model: DiffusionPrompt, output: ObjectiveOutput) -> None:
        pass


def cfg_drop(batch_size: int, probability: float, condition: torch.Tensor | None,
             generator: torch.Generator | None) -> torch.Tensor | None:
    """(B,) bool: the rows whose condition is dropped; None without a condition or dropout."""
    if condition is None or probability <= 0:
        return None
    return (torch.rand(batch_size, generator=generator) < probability).to(condition.device)


def ddim_chain(model: DiffusionPrompt, x_T: torch.Tensor, condition: torch.Tensor | None,
               steps: int, drop: torch.Tensor | None = None, *, teacher: bool = False
               ) -> torch.Tensor:
    """Deterministic DDIM (eta = 0) from x_T (B, n, k) in ``steps`` steps, T-1 .. 0, with
    gradients through every call unless run under no_grad: x_0 (B, n, k). The chain
    :func:`pipeline.method.samplers.sample` runs with ``sampler='ddim'``."""
    times = ddim_timesteps(model.schedule.timesteps, steps)
    x, batch = x_T, x_T.shape[0]
    for t, t_prev in zip(times, times[1:] + [-1]):
        step = torch.full((batch,), t, dtype=torch.long, device=x.device)
        x0_hat = model.predict(x, step, condition, drop=drop, teacher=teacher)
        x = ddim_step(model.schedule, x0_hat, x, t, t_prev, eta=0.0, noise=None).prev_sample
    return x


OBJECTIVES = {"bootstrap": BootstrapObjective, "bootstrap_teacher": TeacherBootstrapObjective,
              "unrolled": UnrolledObjective, "spread": SpreadObjective,
              "deterministic": DeterministicObjective, "soft_min": SoftMinObjective}
