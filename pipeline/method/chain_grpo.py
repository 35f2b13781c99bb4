"""GRPO for DDPT's prompt policies, in one process (method.md section 5: ``grpo`` on the chain,
and its one-step ablation ``grpo_gaussian``).

A round: G samples per task from the policy (:meth:`ChainPolicy.sample` or
:meth:`GaussianPromptPolicy.sample`), a reward per sample, advantages relative to the task's
group, then ``updates_per_round`` optimizer steps on the clipped per-step surrogate plus
``beta`` times the analytic per-step KL to a frozen reference policy. The LLM only enters
through ``reward_fn`` (greedy decoding and the sandbox, later): nothing back-propagates through
it. The Ray glue splits the sampling (the sampler actors) from :func:`update` (the learner):
``pipeline/training/prompt_rl.py`` and ``pipeline/distributed/rl.py``.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from pipeline.method.chain_policy import Trajectory, gaussian_log_density, step_kl
from pipeline.method.policy_gradient import GroupAdvantages, clipped_policy_loss, group_advantages
from pipeline.method.prompt import Generators

# final latents (B, n, k) -> rewards (B,): what the prompts earn (the glue decodes and runs code)
RewardFn = Callable[[torch.Tensor], torch.Tensor]


class GRPOSettings(Protocol):
    """What a round reads (``pipeline.config.RLConfig``, the ``rl`` section, has these fields;
    method.md section 5).

    group_size: G samples per task. baseline: 'mean' or 'leave_one_out'. scale_by_std: divide
    advantages by the group's std (GRPO, DDPO's per-prompt normalisation). skip_uninformative:
    drop groups whose rewards are all equal from the loss (their advantages are 0; this also
    drops their KL term). eps_low, eps_high: the ratio's clip range. beta: the KL weight.
    updates_per_round: optimizer steps on one round's samples (mu). ce_weight: the weight of the
    optional auxiliary cross-entropy the caller passes as ``aux_loss`` (0: off).
    """

    group_size: int
    baseline: str
    scale_by_std: bool
    skip_uninformative: bool
    eps_low: float
    eps_high: float
    beta: float
    updates_per_round: int
    ce_weight: float


@dataclass
class Rollout:
    """One round's samples: the trajectories (N * G rows, group-major), their rewards (N * G,),
    the advantages, and the per-row conditions (N * G, d) or None."""

    trajectory: Trajectory
    rewards: torch.Tensor
    advantages: GroupAdvantages
    condition: torch.Tensor | None = None


@torch.no_grad()
def rollout(policy: nn.Module, num_tasks: int, reward_fn: RewardFn, settings: GRPOSettings,
            generator: Generators = None, condition: torch.Tensor | None = None) -> Rollout:
    """G samples for each of ``num_tasks`` tasks (``condition`` (N, d): one row per task) and
    their rewards and group advantages. ``generator``: one, or one per row (N * G)."""
    group = settings.group_size
    rows = None if condition is None else condition.repeat_interleave(group, 0)
    trajectory = policy.sample(num_tasks * group, generator, rows)
    rewards = reward_fn(trajectory.final).float().reshape(-1)
    if rewards.shape[0] != num_tasks * group:
        raise ValueError(f"reward_fn returned {rewards.shape[0]} rewards for "
                         f"{num_tasks * group} samples")
    advantages = group_advantages(rewards.view(num_tasks, group), baseline=settings.baseline,
                                  scale_by_std=settings.scale_by_std)
    return Rollout(trajectory, rewards, advantages, rows)


def update(policy: nn.Module, reference: nn.Module, optimizer: torch.optim.Optimizer,
           samples: Rollout, settings: GRPOSettings,
           aux_loss: Callable[[], torch.Tensor] | None = None, *,
           grad_clip: float = 1.0) -> dict[str, torch.Tensor]:
    """``updates_per_round`` optimizer steps on one round's samples; returns the last step's
    statistics (detached 0-d tensors). theta_old is the policy before the first step; its
    log-probabilities are recomputed here by the same code as the current ones, so the first
    step's ratio is exactly 1. ``grad_clip``: the largest gradient norm (0: off)."""
    traj, cond = samples.trajectory, samples.condition
    with torch.no_grad():
        old_means, old_stds = policy.moments(traj, cond)
        old_logp = gaussian_log_density(traj.latents[1:], old_means, old_stds)
        ref_means, ref_stds = reference.moments(traj, cond)
    rows = (samples.advantages.row_mask(settings.group_size) if settings.skip_uninformative
            else torch.ones_like(samples.rewards))
    mask = rows.to(old_logp)[:, None] * traj.stochastic.to(old_logp)[None, :]
    params = [p for p in policy.parameters() if p.requires_grad]
    stats: dict[str, torch.Tensor] = {}
    for _ in range(settings.updates_per_round):
        means, stds = policy.moments(traj, cond)
        logp = gaussian_log_density(traj.latents[1:], means, stds)
        kl = step_kl(means, stds, ref_means, ref_stds)
        out = clipped_policy_loss(logp, old_logp, samples.advantages.advantages, mask,
                                  eps_low=settings.eps_low, eps_high=settings.eps_high,
                                  beta=settings.beta, kl=kl)
        loss = out.loss
        if settings.ce_weight and aux_loss is not None:
            aux = aux_loss()
            loss = loss + settings.ce_weight * aux
            out.stats["aux_loss"] = aux.detach()
        stats = {**out.stats, "loss": loss.detach()}
        if not mask.any() and not (settings.ce_weight and aux_loss is not None):
            break  # nothing to learn from this round: no step (weight decay would still move)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            stats["grad_norm"] = torch.nn.utils.clip_grad_norm_(params, grad_clip)
        optimizer.step()
    return stats


def grpo_round(policy: nn.Module, reference: nn.Module, optimizer: torch.optim.Optimizer,
               num_tasks: int, reward_fn: RewardFn, settings: GRPOSettings, *,
               generator: Generators = None, condition: torch.Tensor | None = None,
               grad_clip: float = 1.0) -> dict[str, float]:
    """:func:`rollout` then :func:`update`; returns the round's figures as floats: reward_mean,
    informative_share and the update's statistics (kl, clip_fraction, surrogate, ...)."""
    samples = rollout(policy, num_tasks, reward_fn, settings, generator, condition)
    stats = update(policy, reference, optimizer, samples, settings, grad_clip=grad_clip)
    return {"reward_mean": float(samples.rewards.mean()),
            "informative_share": samples.advantages.informative_share,
            **{k: float(v) for k, v in stats.items()}}
