"""Coupled-GRPO through the shared RL loop (issue 33): in one process with a toy reward (a
stopped run resumed gives the uninterrupted run bit for bit), and ``ddpt train --set
model.name=tiny-dream --set train.method=coupled_grpo`` through Ray (sampler actor, two ZeRO-3
learner workers) and MLflow on SQLite, its rollouts those of the local backend."""
from __future__ import annotations

import json

import pytest
import torch

from helpers import EXAMPLES
from pipeline.config import build_config
from pipeline.lm.dream import load_dream
from pipeline.scoring.rewards import Scored
from pipeline.training.job import run_training
from pipeline.training.rl_job import rl_local_backend

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]
TINY = ["model.name=tiny-dream", "train.method=coupled_grpo", "dllm_rl.rounds=2",
        "dllm_rl.prompts_per_round=2", "dllm_rl.group_size=2",
        "dllm_rl.max_completion_length=8", "dllm_rl.diffusion_steps=4"]


class LetterShare:
    """A toy reward: the share of ASCII letters in the completion's text (it varies between
    samples, so every group has an advantage); ``fail_at``: the call that raises (a crash)."""

    def __init__(self, fail_at: int | None = None):
        self.calls, self.fail_at = 0, fail_at

    def __call__(self, rows, texts) -> Scored:
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("the toy's crash")
        return Scored([sum(c.isascii() and c.isalpha() for c in t) / max(len(t), 1)
                       for t in texts])


def _lines(output) -> list[dict]:
    return [json.loads(line) for line in (output / "checkpoint" / "rounds.jsonl").open()]


def test_coupled_grpo_in_one_process_learns_checkpoints_a_dream_and_resumes_exactly(tmp_path):
    """About 20-40 s on 2 busy cores: three short local runs."""
    config = build_config("smoke", overrides=[*TINY, "distributed.backend=local",
                                              "dllm_rl.lr=1e-2", "rl.checkpoint_every=1"])

    def train(name, reward, **kwargs):
        return run_training(config, tmp_path / name, rl_local_backend(reward=reward),
                            examples=EXAMPLES[:3], progress=False, **kwargs)

    whole = train("whole", LetterShare())
    with pytest.raises(RuntimeError, match="the toy's crash"):
        train("stopped", LetterShare(fail_at=2))  # round 2's rollouts
    assert [line["round"] for line in _lines(tmp_path / "stopped")] == [1]
    train("stopped", LetterShare(), resume=True)
    assert _lines(tmp_path / "stopped") == _lines(tmp_path / "whole")
    # the checkpoints are Dream folders: the resumed policy is the uninterrupted one
    policy, resumed = load_dream(whole.checkpoint), load_dream(tmp_path / "stopped/checkpoint")
    for name, value in policy.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name
    from pipeline.lm.loader import load_model

    fresh = load_model(config.model, seed=config.train.seed)[0].state_dict()
    assert max((fresh[k] - v).abs().max() for k, v in policy.state_dict().items()) > 1e-3


def _ddpt(*args: str) -> None:
    from pipeline.cli import main

    assert main(list(args)) == 0


def test_ddpt_train_runs_coupled_grpo_through_ray_and_mlflow(tmp_path):
    """About 60-120 s on 2 busy cores: a local run, then Ray (one sampler actor, two ZeRO-3
    learner workers under gloo) on the sandbox's reward; the curves in MLflow."""
    from mlflow import MlflowClient

    common = ["--preset", "smoke", "--no-progress", "--set", "data.dataset=mbpp",
              "--set", "data.max_train_examples=4", "--set", "execution.timeout_s=5",
              *[item for s in TINY for item in ("--set", s)]]
    _ddpt("train", "--output", str(tmp_path / "local"), *common,
          "--set", "distributed.backend=local")
    ray_run = tmp_path / "ray"
    _ddpt("train", "--output", str(ray_run), *common, "--set", "distributed.num_workers=2",
          "--set", "dllm_rl.micro_batches=1", "--set", "pool.num_actors=1")
    # the same rollouts on either backend (the update of 2 ranks x 1 slice is the single
    # process's of 2 slices: tests/test_dllm_learner.py)
    local, ours = _lines(tmp_path / "local"), _lines(ray_run)
    assert [(x["round"], x["samples_digest"], x["rewards"]) for x in ours] == \
        [(x["round"], x["samples_digest"], x["rewards"]) for x in local]
    saved = json.loads((ray_run / "mlflow_run.json").read_text())
    client = MlflowClient(saved["uri"])
    for name in ("reward_mean", "format_rate", "pass_fraction_mean", "kl", "clip_fraction",
                 "loss", "ratio_mean", "grad_norm", "lr", "arness_local_at_1",
                 "arness_global_at_1", "informative_share", "generate_seconds",
                 "update_seconds", "sync_seconds"):
        steps = [m.step for m in client.get_metric_history(saved["run_id"], name)]
        assert steps == [1, 2], (name, steps)
    run = client.get_run(saved["run_id"])
    assert run.info.status == "FINISHED" and run.data.metrics["policy_parameters"] > 0
    assert "checkpoint/rounds.jsonl" in {a.path for a in client.list_artifacts(
        saved["run_id"], "checkpoint")}
    state = json.loads((ray_run / "checkpoint" / "learner_state.json").read_text())
    assert state == {"step": 4, "rounds": 2, "world": 2}  # mu = 2 steps a round
    assert load_dream(ray_run / "checkpoint").config.model_type == "Dream"
    # Ray Train's checkpoint holds every rank's part (what a restart of the learner reads)
    parts = {p.name for p in ray_run.glob("ray/*/checkpoint_*/learner/reference/*")}
    assert parts == {"rank0.safetensors", "rank1.safetensors"}, parts
    _ddpt("train", "--output", str(ray_run), *common, "--resume")  # finished: nothing to do
