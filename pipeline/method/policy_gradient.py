"""GRPO's pieces, shared by DDPT's chain policy and the masked-diffusion LM (method.md section 5).

A *round* draws G samples per task (a *group*), scores them with a reward, and turns the rewards
into advantages relative to the group. The update then maximises the clipped surrogate
``min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A)`` per element (a token of a completion, or a
step of a reverse chain), with ``rho = exp(logp - logp_old)``, minus ``beta`` times a KL term to
a reference policy. Tensors: rewards (N, G) for N tasks; per-element tensors (B, L) with
B = N * G rows in group-major order (row ``i * G + j`` is sample j of task i) and a (B, L) 0/1
``mask`` of the elements that count.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

BASELINES = ("mean", "leave_one_out")


@dataclass
class GroupAdvantages:
    """``advantages`` (N * G,) in group-major order; ``informative`` (N,) bool: groups whose
    rewards are not all equal (the others carry no signal); ``informative_share`` their share."""

    advantages: torch.Tensor
    informative: torch.Tensor
    informative_share: float

    def row_mask(self, group_size: int) -> torch.Tensor:
        """(N * G,) float: 1 for rows of informative groups, 0 for the rest."""
        return self.informative.repeat_interleave(group_size).to(self.advantages.dtype)


def group_advantages(rewards: torch.Tensor, *, baseline: str = "mean",
                     scale_by_std: bool = False, std_eps: float = 1e-4,
                     equal_tol: float = 1e-6) -> GroupAdvantages:
    """Advantages relative to each task's group. rewards: (N, G) with G >= 2.

    ``mean``: ``A = r - mean(r)``. ``leave_one_out``: ``A_i = r_i - mean_{j != i} r_j =
    G / (G - 1) (r_i - mean(r))`` (DiffuCoder's trainer). Both are zero-mean within a group.
    ``scale_by_std`` divides by the group's sample standard deviation (+ ``std_eps``), as
    GRPO (DeepSeekMath) does; DiffuCoder's recipe does not (``scale_rewards: false``). A group
    whose rewards differ by at most ``equal_tol`` gets advantage 0 and is marked uninformative.
    """
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be (N tasks, G >= 2 samples), got {tuple(rewards.shape)}")
    if baseline not in BASELINES:
        raise ValueError(f"unknown baseline {baseline!r}; known: {list(BASELINES)}")
    rewards = rewards.float()
    group = rewards.shape[1]
    centred = rewards - rewards.mean(1, keepdim=True)
    if baseline == "leave_one_out":
        centred = centred * (group / (group - 1))
    if scale_by_std:
        centred = centred / (rewards.std(1, keepdim=True) + std_eps)
    informative = (rewards.max(1).values - rewards.min(1).values) > equal_tol
    centred = centred * informative[:, None]
    share = float(informative.float().mean())
    return GroupAdvantages(centred.reshape(-1), informative, share)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(policy || reference) per element: ``exp(ref - logp) -
    (ref - logp) - 1`` (>= 0, zero with zero gradient where logp == ref)."""
    delta = ref_logp - logp
    return torch.exp(delta) - delta - 1


@dataclass
class PolicyLoss:
    """The scalar ``loss`` to back-propagate and its parts, as detached 0-d tensors in
    ``stats``: ``surrogate`` (the clipped objective's mean, to maximise), ``kl`` (the KL term's
    mean), ``clip_fraction`` (elements where the clip is active: ratio below ``1 - eps_low``
    with A < 0 or above ``1 + eps_high`` with A > 0, as trl's ``clip_ratio/region_mean``),
    ``clip_low``, ``clip_high``, ``ratio_mean``, ``ratio_min``, ``ratio_max`` (over the counted
    elements; 1 when none count), ``elements`` (the count divided by)."""

    loss: torch.Tensor
    stats: dict[str, torch.Tensor] = field(default_factory=dict)


def clipped_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                        mask: torch.Tensor, *, eps_low: float = 0.2, eps_high: float = 0.2,
                        beta: float = 0.0, kl: torch.Tensor | None = None) -> PolicyLoss:
    """``sum(mask * (-min(rho A, clip(rho) A) + beta kl)) / sum(mask)``.

    logp, old_logp, mask, kl: (B, L); advantages: (B,). ``old_logp`` is detached here. The sum
    over every counted element of the (micro-)batch divided by their count is the "token-level"
    normalisation (DAPO; DiffuCoder's trainer); with L equal for every row it is also the
    per-step mean of a chain. An empty mask gives a zero loss that still has a graph.
    """
    if logp.shape != old_logp.shape or logp.shape != mask.shape:
        raise ValueError(f"logp {tuple(logp.shape)}, old_logp {tuple(old_logp.shape)} and mask "
                         f"{tuple(mask.shape)} must have one shape")
    if advantages.shape != logp.shape[:1]:
        raise ValueError(f"advantages {tuple(advantages.shape)} must be ({logp.shape[0]},)")
    if beta and kl is None:
        raise ValueError("beta > 0 needs the per-element kl")
    mask = mask.to(logp.dtype)
    adv = advantages.to(logp.dtype)[:, None]
    ratio = torch.exp(logp - old_logp.detach())
    clipped = ratio.clamp(1 - eps_low, 1 + eps_high)
    per_element = -torch.min(ratio * adv, clipped * adv)
    if beta:
        per_element = per_element + beta * kl
    count = mask.sum().clamp(min=1)
    loss = (per_element * mask).sum() / count
    with torch.no_grad():
        low = (ratio < 1 - eps_low) & (adv < 0)
        high = (ratio > 1 + eps_high) & (adv > 0)
        stats = {
            "surrogate": (-(per_element - (beta * kl if beta else 0)) * mask).sum() / count,
            "kl": ((kl * mask).sum() / count) if kl is not None else torch.zeros(()),
            "clip_fraction": ((low | high) * mask).sum() / count,
            "clip_low": (low * mask).sum() / count,
            "clip_high": (high * mask).sum() / count,
            # nothing counted (every group skipped): the ratio of no update is 1, not 0
            "ratio_mean": (ratio * mask).sum() / count if mask.any() else torch.ones(()),
            "ratio_min": ratio[mask > 0].min() if mask.any() else torch.ones(()),
            "ratio_max": ratio[mask > 0].max() if mask.any() else torch.ones(()),
            "elements": mask.sum(),
        }
    return PolicyLoss(loss, {k: v.detach() for k, v in stats.items()})
