"""Execution-reward RL, one loop for any policy (docs/training.md, "Execution-reward training").

A policy plugs in with two sides, built from the run's configuration (the registry:
:data:`pipeline.training.rl_job.RL_POLICIES`):

- a :class:`RolloutWorker`, where the LM is (a sampler actor on Ray; this process locally): it
  takes the learner's weights, samples G completions per task, scores them (the reward), and
  returns :class:`Rollouts`; before RL it screens tasks (:meth:`RolloutWorker.screen`);
- a :class:`Learner` (Ray Train's worker; this process locally): it exports its weights, updates
  on a round's rollouts given the group advantages, and saves and restores its state.

:func:`run_rounds` is the loop: the round's tasks (a seeded schedule), the weights out, the
rollouts back, advantages relative to each task's group (:func:`group_advantages`), the update,
and one record per round. Everything a round does is a function of (configuration, the state
after the previous round, round index), so a run resumed from round r repeats what the
uninterrupted run did. The rollouts arrive in *chunks* of whole tasks (one decode batch each),
cut the same way on every backend, so the batches, and so the completions, do not depend on how
many actors share the work.
"""
from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from pipeline.config import RunConfig
from pipeline.data.example import Example
from pipeline.method.policy_gradient import GroupAdvantages, group_advantages
from pipeline.scoring.rewards import Scored
from pipeline.training.loop import batch_indices

ROLLOUT_LOG = "rounds.jsonl"  # in each RL checkpoint: one line per round (tasks, rewards, codes)
Weights = dict[str, torch.Tensor]


@dataclass
class Rollouts:
    """G completions for each of N tasks, group-major (row ``i * G + j``: sample j of task i).

    ``scored``: their rewards and indicators; ``codes``: the programs; ``samples``: the policy's
    own record of how it sampled (what its learner needs: DDPT's trajectories and conditions),
    an object with ``cat(parts)`` and ``digest()``; ``seconds``: time by part."""

    task_ids: list[str]
    group_size: int
    scored: Scored
    codes: list[str]
    samples: Any
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def rewards(self) -> torch.Tensor:
        """(N * G,) float32."""
        return torch.tensor(self.scored.rewards, dtype=torch.float32)

    @classmethod
    def cat(cls, parts: list[Rollouts], *, parallel: bool) -> Rollouts:
        """The tasks of several batches, in order. Their seconds add up when one worker ran
        them one after the other, and the slowest counts when they ran side by side."""
        names = {name for part in parts for name in part.seconds}
        combine = max if parallel else sum
        seconds = {name: combine(p.seconds.get(name, 0.0) for p in parts) for name in names}
        return cls([t for p in parts for t in p.task_ids], parts[0].group_size,
                   Scored.cat([p.scored for p in parts]), [c for p in parts for c in p.codes],
                   type(parts[0].samples).cat([p.samples for p in parts]), seconds)


class RolloutWorker(Protocol):
    """The rollout side of a policy (where the LM is)."""

    def set_weights(self, weights: Weights) -> None:
        """Take the learner's current weights (the round's theta_old)."""

    def rollout(self, chunks: list[list[Example]], round_index: int) -> Rollouts:
        """G samples per task of every chunk (a chunk: one decode batch), scored; seeded by
        (train.seed, round, task, sample) only."""

    def screen(self, chunks: list[list[Example]]) -> Scored:
        """``rl.screen_samples`` temperature samples per task of the policy's starting point
        (DDPT: the manual prompt), scored: which tasks the model sometimes solves."""


class Learner(Protocol):
    """The learning side of a policy (it needs no LM unless an auxiliary loss does)."""

    def weights(self) -> Weights:
        """What the rollout workers need to sample as the learner's policy does now."""

    def update(self, rollouts: Rollouts, advantages: GroupAdvantages, tasks: list[Example],
               round_index: int) -> dict[str, float]:
        """``rl.updates_per_round`` steps on one round; the last step's statistics."""

    def save(self, folder: Any, round_index: int, files: dict[str, str]) -> None:
        """A checkpoint at ``folder``: the portable prompt model, the optimizer, the round, and
        ``files`` (name -> text: the rollout log) beside them."""

    def load(self, folder: Any) -> int:
        """Restore what :meth:`save` wrote; returns its round."""


# (weights, the round's task chunks, round index) -> the round's rollouts
RolloutFn = Callable[[Weights, list[list[Example]], int], Rollouts]
# (round, its record of floats, its rollout-log line) after each round
OnRound = Callable[[int, dict, dict], None]


def round_tasks(tasks: list[Example], per_round: int, round_index: int, seed: int
                ) -> list[Example]:
    """The round's tasks: a window over seeded permutations of the (screened) tasks, as
    training batches are chosen (:func:`pipeline.training.loop.batch_indices`)."""
    count = min(per_round, len(tasks))
    return [tasks[i] for i in batch_indices(len(tasks), count, round_index, seed)]


def task_chunks(tasks: list[Example], rows_per_task: int, batch_rows: int
                ) -> list[list[Example]]:
    """Whole tasks per decode batch of at most ``batch_rows`` rows (at least one task)."""
    size = max(1, batch_rows // rows_per_task)
    return [tasks[i:i + size] for i in range(0, len(tasks), size)]


@dataclass(frozen=True)
class RoundPlan:
    """The loop's shape, from the policy's own section: ``rl`` for DDPT's RL objectives,
    ``dllm_rl`` for coupled-GRPO (leave-one-out advantages, as the reference)."""

    rounds: int
    tasks_per_round: int
    group_size: int
    baseline: str
    scale_by_std: bool


def round_plan(config: RunConfig) -> RoundPlan:
    """The run's :class:`RoundPlan` (``dllm_rl.rounds`` = 0 must be resolved first)."""
    if config.train.method == "coupled_grpo":
        d = config.dllm_rl
        return RoundPlan(d.rounds, d.prompts_per_round, d.group_size, "leave_one_out",
                         d.scale_by_std)
    rl = config.rl
    return RoundPlan(rl.rounds, rl.tasks_per_round, rl.group_size, rl.baseline, rl.scale_by_std)


def rollout_chunks(config: RunConfig, tasks: list[Example]) -> list[list[Example]]:
    """The decode batches of a round: ``eval.batch_size`` rows, G rows per task."""
    return task_chunks(tasks, round_plan(config).group_size, config.eval.batch_size)


def run_rounds(learner: Learner, rollout: RolloutFn, tasks: list[Example], config: RunConfig,
               *, start: int = 0, on_round: OnRound | None = None) -> None:
    """Rounds ``start + 1 .. rl.rounds``: rollouts with the learner's weights, group
    advantages, the update; ``on_round(round, record, log_line)`` after each (checkpoints,
    MLflow). Time by part: ``sync`` (weights out and in), ``sample``, ``generate``, ``score``
    (the rollout worker's; the slowest worker's on Ray), ``update``, and the whole round."""
    rl = round_plan(config)
    if not tasks:
        raise ValueError("no training tasks for RL")
    if not rl.rounds:
        raise ValueError("the run's rounds are 0: resolve them before the loop")
    for index in range(start, rl.rounds):
        began = time.perf_counter()
        chosen = round_tasks(tasks, rl.tasks_per_round, index, config.train.seed)
        weights = learner.weights()
        exported = time.perf_counter()
        rollouts = rollout(weights, rollout_chunks(config, chosen), index)
        rolled = time.perf_counter()
        advantages = group_advantages(rollouts.rewards.view(len(chosen), rl.group_size),
                                      baseline=rl.baseline, scale_by_std=rl.scale_by_std)
        stats = learner.update(rollouts, advantages, chosen, index)
        done = time.perf_counter()
        seconds = {**rollouts.seconds, "rollout_seconds": rolled - exported,
                   "update_seconds": done - rolled, "round_seconds": done - began}
        seconds["sync_seconds"] = seconds.get("sync_seconds", 0.0) + exported - began
        record = round_record(index + 1, rollouts, advantages, stats, seconds)
        if on_round:
            on_round(index + 1, record, log_line(index + 1, rollouts))


def round_record(round_number: int, rollouts: Rollouts, advantages: GroupAdvantages,
                 stats: dict[str, float], seconds: dict[str, float]) -> dict:
    """A round's figures, floats under MLflow's names (``step`` is the round)."""
    rewards = rollouts.rewards
    record = {"step": round_number, "reward_mean": float(rewards.mean()),
              "reward_std": float(rewards.std()) if rewards.numel() > 1 else 0.0,
              "reward_max": float(rewards.max()),
              "informative_share": advantages.informative_share,
              "tasks": len(rollouts.task_ids), "programs": rewards.numel()}
    for name, values in rollouts.scored.details.items():
        record[name] = sum(values) / len(values)
    record.update(stats)
    record.update(seconds)
    record["programs_per_second"] = rewards.numel() / max(seconds["round_seconds"], 1e-9)
    return record


def log_line(round_number: int, rollouts: Rollouts) -> dict:
    """The rollout log's line of a round: its tasks, rewards, programs, and a digest of how the
    policy sampled (equal digests: the same trajectories)."""
    return {"round": round_number, "tasks": rollouts.task_ids, "rewards": rollouts.scored.rewards,
            "samples_digest": rollouts.samples.digest(), "codes": rollouts.codes}


def tensor_digest(*tensors: torch.Tensor | None) -> str:
    """A short hash of tensors' exact values (None skipped)."""
    digest = hashlib.sha1()
    for tensor in tensors:
        if tensor is not None:
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]
