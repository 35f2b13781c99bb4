"""Coupled-GRPO's side of the Ray RL loop (:mod:`pipeline.distributed.rl`; docs/dllm.md,
"Coupled-GRPO through the RL loop"): the ZeRO-3 learner of :mod:`pipeline.distributed.dllm_learner`
as the loop's :class:`~pipeline.training.rl_loop.Learner`, on every Ray Train rank.

Every rank runs the same rounds (:func:`~pipeline.training.rl_loop.run_rounds`): the policy's
weights are gathered one parameter at a time on every rank (a collective) and kept by rank 0,
which alone calls the sampler actors; the round's rollouts go from rank 0 to the others
(:func:`rank_zero_rollout`), so every rank passes the whole round to
:func:`~pipeline.distributed.dllm_learner.learner_update` and trains on its own slices.
Checkpoints: every rank saves its part into its own folder and reports it; Ray Train puts the
parts in one checkpoint folder.
"""
from __future__ import annotations

from pathlib import Path

import torch

from pipeline.config import RunConfig
from pipeline.data.example import Example
from pipeline.distributed.dllm_learner import (
    DREAM_DIR,
    build_learner,
    gathered_tensors,
    learner_update,
    restore_learner,
    save_learner,
)
from pipeline.lm.coupled_grpo import settings_from_config
from pipeline.method.policy_gradient import GroupAdvantages
from pipeline.training.dllm_rl import coupled_rollout, update_stats
from pipeline.training.rl_loop import RolloutFn, Rollouts, Weights


def rows_per_round(config: RunConfig, task_count: int) -> int:
    """A round's completions: ``prompts_per_round`` tasks (fewer when there are fewer) x G."""
    rl = config.dllm_rl
    return min(rl.prompts_per_round, task_count) * rl.group_size


class ZeroDllmLearner:
    """This rank's coupled-GRPO learner behind the loop's Learner protocol: ``build_learner``
    for rounds of :func:`rows_per_round` rows over ``dllm_rl.rounds x iterations`` optimizer
    steps (``dllm_rl.rounds`` resolved)."""

    def __init__(self, config: RunConfig, task_count: int):
        if not config.dllm_rl.rounds:
            raise ValueError("dllm_rl.rounds must be resolved first (resolve_rounds)")
        total = config.dllm_rl.rounds * settings_from_config(config.dllm_rl).iterations
        self.config = config
        self.state = build_learner(config, rows_per_round(config, task_count), total)

    @property
    def rank(self) -> int:
        return self.state.rank

    def weights(self) -> Weights:
        """The policy's whole weights on rank 0 ({} elsewhere); every rank must call it."""
        tensors = gathered_tensors(self.state.policy.module)
        if self.rank:
            for _ in tensors:  # take part in every gather
                pass
            return {}
        return dict(tensors)

    def update(self, rollouts: Rollouts, advantages: GroupAdvantages, tasks: list[Example],
               round_index: int) -> dict[str, float]:
        state = self.state
        data = coupled_rollout(rollouts, advantages, state.end_id, state.settings,
                               seed=self.config.train.seed, round_index=round_index)
        records = learner_update(state, data)
        return {**update_stats(data, records), "lr": float(state.policy.get_lr()[0])}

    def save(self, folder: Path, round_index: int, files: dict[str, str]) -> None:
        """:func:`save_learner` (every rank its part; the policy as a Dream folder in
        ``dream/``) and ``files`` (the rollout log) beside it, from rank 0."""
        if round_index != self.state.rounds:
            raise RuntimeError(f"saving round {round_index}, the learner did "
                               f"{self.state.rounds}")
        save_learner(self.state, folder)
        if self.rank == 0:
            for name, text in files.items():
                (Path(folder) / name).write_text(text)

    def load(self, folder: Path) -> int:
        restore_learner(self.state, folder)
        return self.state.rounds


def rank_zero_rollout(rollout: RolloutFn, rank: int) -> RolloutFn:
    """``rollout`` run by rank 0 (the one holding the weights), its rollouts sent to every
    rank (a collective: every rank calls the result each round)."""

    def on_every_rank(weights: Weights, chunks: list[list[Example]], round_index: int
                      ) -> Rollouts:
        box = [rollout(weights, chunks, round_index) if rank == 0 else None]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    return on_every_rank


def dream_of(checkpoint_folder: Path) -> Path:
    """Where a learner checkpoint keeps the policy's Dream folder."""
    return Path(checkpoint_folder) / DREAM_DIR
