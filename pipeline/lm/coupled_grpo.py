"""Coupled-GRPO for a masked-diffusion LM (DiffuCoder's trainer; docs/dllm.md, method.md
section 5), in one process.

The policy is the dLLM itself, with a frozen reference copy. Each round: G completions per
prompt (the caller's ``generate``: the project's masked-diffusion decoder), rewards, leave-one-out
advantages; then ``iterations`` (mu) optimizer steps over the round's ``micro_batches`` slices.
Every completion token gets the coupled score (:func:`pipeline.lm.coupled.coupled_scores`: the
full-mask view and the complementary pair t, 1 - t, weights 1/t and 1/(1 - t), t ~ U(0.2, 0.8)
shared by the micro-batch), computed for the old, the reference and the current policy with the
same masks (one mask seed per iteration). Per token: ``-min(rho A, clip(rho, 1 +- eps) A) +
beta * k3``, summed over the completion tokens up to and including the first end-of-turn
token and divided by their count per micro-batch. The reference moves toward the policy every
``ref_sync_every`` optimizer steps (TR-DPO). :func:`update` runs in this process;
:func:`run_update` is the same round on any :class:`Optimisation` (the DeepSpeed ZeRO-3 learner,
:mod:`pipeline.distributed.dllm_learner`, hands in its engines and its share of the slices).
The settings come from the ``dllm_rl`` section of the configuration (:func:`settings_from_config`).

Fixed here, and flagged where the reference's behaviour is kept behind an option: the mask
seeds come from this run's seed and round, on local generators (the reference reseeds every
global RNG when it scores); mu = 1 with beta > 0 works (the reference fails on an undefined
name); ``reference_mask_schedule=True`` reproduces the reference's seed index, read after its
step counter moves, so that with 2 micro-batches and mu = 2 each slice keeps one mask over both
iterations.
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import Any, Protocol

import torch
from torch import nn

from pipeline.config import DllmRLConfig
from pipeline.lm.coupled import coupled_scores
from pipeline.method.policy_gradient import (
    GroupAdvantages,
    PolicyLoss,
    clipped_policy_loss,
    group_advantages,
    k3_kl,
)


@dataclass(frozen=True)
class CoupledGRPOSettings:
    """Every hyper-parameter of ``train.method=coupled_grpo``, with the reference's value
    (``recipes/config_coupled_code.yaml``, ``coupled_grpo.py``) as its default; the run's values
    come from the ``dllm_rl`` section of the configuration (:func:`settings_from_config`, the
    same names and defaults). The ones this module reads:

    group_size (num_generations 10), iterations (mu, num_iterations 2), micro_batches
    (gradient_accumulation_steps 2: a round's rows in that many slices, one backward each; per
    worker under the ZeRO-3 learner, which splits a round into workers x micro_batches),
    beta 0.01, eps_low = eps_high = 0.5, t_range (0.2, 0.8), random_masking (new mask seeds
    every round; False: 42 for every iteration), reference_mask_schedule (the reference's seed
    index quirk; False: iteration j uses seed j), scale_by_std False, skip_uninformative False
    (the reference keeps all-equal groups: advantage 0, their tokens still count and carry the
    KL), ref_sync_every 64 and ref_sync_alpha 0.6 (optimizer steps; 0: never), max_grad_norm 0.2.

    The rest configure the optimizer (:func:`reference_optimizer`), the rollouts and the reward,
    which the caller applies: lr 1e-6, adam_betas (0.9, 0.99), weight_decay 0.1, cosine decay
    to min_lr_rate 0.1 after warmup_ratio 1e-4; max_prompt_length 200 (left-truncated),
    max_completion_length 256, diffusion_steps 256, alg 'entropy', alg_temp 0, temperature 1.0
    (the paper says 1.2), top_p 0.95; end_of_turn '<|im_end|>'; reward = 2.0 x pass fraction +
    0.5 x format, the pass fraction only scored when the format is right
    (:func:`reference_reward`; through the sandbox: :mod:`pipeline.scoring.code_reward`).
    """

    group_size: int = 10
    iterations: int = 2
    micro_batches: int = 2
    beta: float = 0.01
    eps_low: float = 0.5
    eps_high: float = 0.5
    t_range: tuple[float, float] = (0.2, 0.8)
    random_masking: bool = True
    reference_mask_schedule: bool = False
    scale_by_std: bool = False
    skip_uninformative: bool = False
    ref_sync_every: int = 64
    ref_sync_alpha: float = 0.6
    max_grad_norm: float = 0.2
    lr: float = 1e-6
    adam_betas: tuple[float, float] = (0.9, 0.99)
    adam_eps: float = 1e-8
    weight_decay: float = 0.1
    min_lr_rate: float = 0.1
    warmup_ratio: float = 1e-4
    max_prompt_length: int = 200
    max_completion_length: int = 256
    diffusion_steps: int = 256
    alg: str = "entropy"
    alg_temp: float = 0.0
    temperature: float = 1.0
    top_p: float = 0.95
    end_of_turn: str = "<|im_end|>"
    pass_weight: float = 2.0
    format_weight: float = 0.5

    def __post_init__(self):
        lo, hi = self.t_range
        checks = {"group_size": self.group_size >= 2, "iterations": self.iterations >= 1,
                  "micro_batches": self.micro_batches >= 1, "beta": self.beta >= 0,
                  "eps_low": 0 < self.eps_low < 1, "eps_high": self.eps_high > 0,
                  "t_range": 0 < lo <= hi < 1, "ref_sync_every": self.ref_sync_every >= 0,
                  "ref_sync_alpha": 0 < self.ref_sync_alpha <= 1,
                  "max_grad_norm": self.max_grad_norm >= 0, "lr": self.lr > 0}
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"CoupledGRPOSettings: invalid {bad} in {self}")


def settings_from_config(section: DllmRLConfig) -> CoupledGRPOSettings:
    """The settings of a run's ``dllm_rl`` section: the fields of the same name, ``t_range``
    from ``t_min``/``t_max`` and ``adam_betas`` from ``adam_beta1``/``adam_beta2``."""
    values = {f.name: getattr(section, f.name) for f in fields(CoupledGRPOSettings)
              if hasattr(section, f.name)}
    values["t_range"] = (section.t_min, section.t_max)
    values["adam_betas"] = (section.adam_beta1, section.adam_beta2)
    return CoupledGRPOSettings(**values)


def reference_reward(pass_fraction: torch.Tensor, format_score: torch.Tensor, *,
                     pass_weight: float = 2.0, format_weight: float = 0.5) -> torch.Tensor:
    """``pass_weight * pass_fraction * [format == 1] + format_weight * format`` per completion:
    the reference scores execution only when the format (1, 0.5 or 0) is right. Through the
    sandbox: :func:`pipeline.scoring.code_reward.execution_rewards`."""
    return pass_weight * pass_fraction * (format_score == 1) + format_weight * format_score


def completion_mask(completion_ids: torch.Tensor, end_id: int) -> torch.Tensor:
    """(B, K) float: 1 up to and including each row's first ``end_id``, all ones without one."""
    K = completion_ids.shape[1]
    is_end = completion_ids == end_id
    first = torch.where(is_end.any(1), is_end.int().argmax(1), K)
    return (torch.arange(K, device=completion_ids.device)[None] <= first[:, None]).float()


def round_mask_seeds(seed: int, round_index: int, settings: CoupledGRPOSettings) -> list[int]:
    """One mask seed per iteration: distinct and new each round (``random_masking``), else 42
    for every iteration (the reference's fixed masks)."""
    if not settings.random_masking:
        return [42] * settings.iterations
    g = torch.Generator().manual_seed(seed * 1_000_003 + round_index)
    base = int(torch.randint(0, 2**30, (), generator=g))
    return [base + j for j in range(settings.iterations)]


def mask_seed_index(iteration: int, micro_batch: int, settings: CoupledGRPOSettings) -> int:
    """Which of the round's seeds micro-batch ``micro_batch`` uses in ``iteration``: the
    iteration's own, or with ``reference_mask_schedule`` the reference's ``(step + 1) % mu``
    over its micro-step counter ``step = iteration * micro_batches + micro_batch``."""
    if settings.reference_mask_schedule:
        step = iteration * settings.micro_batches + micro_batch
        return (step + 1) % settings.iterations
    return iteration


def score(model: nn.Module, prompt_ids: torch.Tensor, completion_ids: torch.Tensor,
          mask_id: int, seed: int, settings: CoupledGRPOSettings) -> torch.Tensor:
    """Coupled per-token scores (B, K) fp32 under the masks of ``seed`` (a fresh generator on
    the completions' device: the same seed, the same t and masks for any model)."""
    generator = torch.Generator(completion_ids.device).manual_seed(seed)
    return coupled_scores(model, prompt_ids, completion_ids, mask_id, generator,
                          settings.t_range)


def coupled_grpo_loss(scores: torch.Tensor, old_scores: torch.Tensor,
                      ref_scores: torch.Tensor | None, advantages: torch.Tensor,
                      mask: torch.Tensor, settings: CoupledGRPOSettings) -> PolicyLoss:
    """One micro-batch's loss: ``sum(mask * (-min(rho A, clip(rho) A) + beta k3)) /
    sum(mask)`` with ``rho = exp(scores - old_scores)``; all (B, K) but advantages (B,)."""
    kl = None if ref_scores is None else k3_kl(scores, ref_scores)
    return clipped_policy_loss(scores, old_scores, advantages, mask, eps_low=settings.eps_low,
                               eps_high=settings.eps_high,
                               beta=settings.beta if kl is not None else 0.0, kl=kl)


@torch.no_grad()
def sync_reference(reference: nn.Module, policy: nn.Module, alpha: float) -> None:
    """TR-DPO's soft update: ``ref <- (1 - alpha) ref + alpha policy``, parameter by name."""
    policy_params = dict(policy.named_parameters())
    for name, ref_param in reference.named_parameters():
        ref_param.mul_(1 - alpha).add_(policy_params[name].detach().to(ref_param.dtype),
                                       alpha=alpha)


@dataclass
class CoupledRollout:
    """One round's rows (group-major, N * G): the prompts (B, n), completions (B, K), the
    loss mask (B, K), rewards (B,), advantages and the round's mask seeds."""

    prompt_ids: torch.Tensor
    completion_ids: torch.Tensor
    mask: torch.Tensor
    rewards: torch.Tensor
    advantages: GroupAdvantages
    mask_seeds: list[int]

    def to(self, device: torch.device) -> CoupledRollout:
        """The same round with its tensors on ``device``."""
        advantages = replace(self.advantages, advantages=self.advantages.advantages.to(device))
        return replace(self, prompt_ids=self.prompt_ids.to(device),
                       completion_ids=self.completion_ids.to(device), mask=self.mask.to(device),
                       rewards=self.rewards.to(device), advantages=advantages)


def rollout_round(prompt_ids: torch.Tensor, generate: Callable[[torch.Tensor], torch.Tensor],
                  reward: Callable[[torch.Tensor], torch.Tensor], end_id: int,
                  settings: CoupledGRPOSettings, *, seed: int = 0,
                  round_index: int = 0) -> CoupledRollout:
    """G completions for each of the N prompts (N, n): ``generate(prompts (N * G, n)) ->
    completions (N * G, K)`` (no gradient), ``reward(completions) -> (N * G,)``."""
    group = settings.group_size
    prompts = prompt_ids.repeat_interleave(group, 0)
    with torch.no_grad():
        completions = generate(prompts)
    rewards = reward(completions).float().reshape(-1).to(completions.device)
    advantages = group_advantages(rewards.view(-1, group), baseline="leave_one_out",
                                  scale_by_std=settings.scale_by_std)
    return CoupledRollout(prompts, completions, completion_mask(completions, end_id), rewards,
                          advantages, round_mask_seeds(seed, round_index, settings))


NO_DECAY = re.compile(r"bias|layernorm|rmsnorm|(?:^|\.)norm(?:$|\.)|_norm(?:$|\.)")


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW parameter groups as the reference's trainer (transformers' ``Trainer``) makes them:
    weight decay on every trainable parameter but biases and norm weights (names matching
    :data:`NO_DECAY`), which get none. Empty groups are left out."""
    decay, plain = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (plain if NO_DECAY.search(name) else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": plain, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def reference_scheduler(optimizer: torch.optim.Optimizer, settings: CoupledGRPOSettings,
                        total_steps: int):
    """A linear warm-up over ``ceil(warmup_ratio * total_steps)`` optimizer steps, then cosine
    decay to ``min_lr_rate * lr`` at ``total_steps`` (transformers' ``cosine_with_min_lr``)."""
    from transformers.optimization import get_cosine_with_min_lr_schedule_with_warmup

    warmup = math.ceil(settings.warmup_ratio * total_steps)
    return get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, warmup, total_steps, min_lr_rate=settings.min_lr_rate)


def reference_optimizer(model: nn.Module, settings: CoupledGRPOSettings, total_steps: int):
    """The reference's optimiser on ``model``'s trainable parameters: torch's AdamW (lr, betas,
    eps, weight decay on :func:`decay_groups`) and :func:`reference_scheduler`. Returns
    (optimizer, scheduler)."""
    optimizer = torch.optim.AdamW(decay_groups(model, settings.weight_decay), lr=settings.lr,
                                  betas=settings.adam_betas, eps=settings.adam_eps)
    return optimizer, reference_scheduler(optimizer, settings, total_steps)


def micro_slices(rows: int, parts: int) -> list[slice]:
    """``rows`` in ``parts`` equal, contiguous slices (ValueError if they do not split)."""
    if rows % parts:
        raise ValueError(f"{rows} rows do not split into {parts} micro-batches")
    size = rows // parts
    return [slice(i * size, (i + 1) * size) for i in range(parts)]


def rank_slices(rows: int, settings: CoupledGRPOSettings, rank: int = 0,
                world: int = 1) -> list[slice]:
    """The micro-batches of data-parallel rank ``rank`` of ``world``: a round's rows in
    ``world * micro_batches`` slices, ``micro_batches`` consecutive ones per rank (each rank
    accumulates over its own, as the reference's per-device gradient accumulation)."""
    every = micro_slices(rows, world * settings.micro_batches)
    return every[rank * settings.micro_batches:(rank + 1) * settings.micro_batches]


class Optimisation(Protocol):
    """How a round's gradients become steps: :class:`LocalOptimisation` in this process, or a
    DeepSpeed engine pair (:mod:`pipeline.distributed.dllm_learner`)."""

    def accumulate(self, loss: torch.Tensor, count: int) -> None:
        """Back-propagate one of ``count`` micro-batch losses of an optimizer step."""

    def apply(self) -> torch.Tensor | None:
        """The optimizer (and scheduler) step; returns the gradient norm before clipping."""

    def sync_reference(self, alpha: float) -> None:
        """TR-DPO's ``ref <- (1 - alpha) ref + alpha policy``."""


@dataclass
class LocalOptimisation:
    """One process: gradient accumulation by ``loss / count``, clipping at ``max_grad_norm``
    (0: none), then the optimizer and the scheduler."""

    policy: nn.Module
    reference: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any = None
    max_grad_norm: float = 0.0

    def accumulate(self, loss: torch.Tensor, count: int) -> None:
        (loss / count).backward()

    def apply(self) -> torch.Tensor | None:
        norm = None
        if self.max_grad_norm:
            params = [p for p in self.policy.parameters() if p.requires_grad]
            norm = torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def sync_reference(self, alpha: float) -> None:
        sync_reference(self.reference, self.policy, alpha)


@torch.no_grad()
def _old_and_reference_scores(policy: nn.Module, reference: nn.Module, data: CoupledRollout,
                              mask_id: int, settings: CoupledGRPOSettings,
                              slices: list[slice]) -> tuple[dict, dict]:
    """Scores of theta_old (only when mu > 1: with mu = 1 the current scores, detached, are
    the old ones) and of the reference (when beta > 0), per (iteration, micro-batch) under the
    seed that micro-step will use, all before the round's first optimizer step."""
    old, ref = {}, {}
    for j in range(settings.iterations):
        for s, rows in enumerate(slices):
            seed = data.mask_seeds[mask_seed_index(j, s, settings)]
            args = (data.prompt_ids[rows], data.completion_ids[rows], mask_id, seed, settings)
            if settings.iterations > 1:
                old[j, s] = score(policy, *args)
            if settings.beta:
                ref[j, s] = score(reference, *args)
    return old, ref


def run_update(policy: nn.Module, reference: nn.Module, data: CoupledRollout, mask_id: int,
               settings: CoupledGRPOSettings, *, optimisation: Optimisation,
               slices: list[slice] | None = None, step: int = 0) -> tuple[list[dict], int]:
    """``iterations`` optimizer steps on one round, each accumulating over ``slices`` (default:
    the round's ``micro_batches`` slices). ``policy`` and ``reference`` are what scores
    (modules or DeepSpeed engines); ``step``: the optimizer steps before this round (the
    reference sync counts them). Returns one record per micro-step (iteration, micro_batch,
    mask_seed and the loss's statistics; ``grad_norm`` on each iteration's last) and the new
    step."""
    slices = slices or micro_slices(data.completion_ids.shape[0], settings.micro_batches)
    old, ref = _old_and_reference_scores(policy, reference, data, mask_id, settings, slices)
    mask = data.mask
    if settings.skip_uninformative:
        mask = mask * data.advantages.row_mask(settings.group_size)[:, None].to(mask)
    advantages = data.advantages.advantages
    records = []
    for j in range(settings.iterations):
        for s, rows in enumerate(slices):
            seed = data.mask_seeds[mask_seed_index(j, s, settings)]
            current = score(policy, data.prompt_ids[rows], data.completion_ids[rows], mask_id,
                            seed, settings)
            out = coupled_grpo_loss(current, old.get((j, s), current.detach()), ref.get((j, s)),
                                    advantages[rows], mask[rows], settings)
            optimisation.accumulate(out.loss, len(slices))
            records.append({"iteration": j, "micro_batch": s, "mask_seed": seed,
                            "loss": out.loss.detach(), **out.stats})
        norm = optimisation.apply()
        if norm is not None:
            records[-1]["grad_norm"] = torch.as_tensor(norm, dtype=torch.float32)
        step += 1
        if settings.ref_sync_every and step % settings.ref_sync_every == 0:
            optimisation.sync_reference(settings.ref_sync_alpha)
    return records, step


def update(policy: nn.Module, reference: nn.Module, optimizer: torch.optim.Optimizer,
           data: CoupledRollout, mask_id: int, settings: CoupledGRPOSettings, *,
           scheduler=None, step: int = 0) -> tuple[list[dict], int]:
    """:func:`run_update` in this process: each slice's loss divided by their number, as
    gradient accumulation does, clipped at ``max_grad_norm``, then ``optimizer`` and
    ``scheduler`` step."""
    optimizer.zero_grad(set_to_none=True)
    optimisation = LocalOptimisation(policy, reference, optimizer, scheduler,
                                     settings.max_grad_norm)
    return run_update(policy, reference, data, mask_id, settings, optimisation=optimisation,
                      step=step)


def summarise(data: CoupledRollout, records: list[dict]) -> dict[str, float]:
    """A round's figures as floats: reward_mean, informative_share (groups with unequal
    rewards), completion_tokens (mean counted tokens per row), and the micro-steps' means of
    loss, kl, clip_fraction and ratio_mean."""
    out = {"reward_mean": float(data.rewards.mean()),
           "informative_share": data.advantages.informative_share,
           "completion_tokens": float(data.mask.sum(1).mean())}
    for key in ("loss", "kl", "clip_fraction", "ratio_mean"):
        out[key] = sum(float(r[key]) for r in records) / len(records)
    return out
