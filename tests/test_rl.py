"""Execution-reward RL in one process: the settings, the start checkpoint's checks, the sandbox's
reward, the task screen, exact resume, and the toy task learnt over three seeds against a frozen
control (the Ray path: tests/test_ray_rl.py)."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from rl_toy import (
    TOY,
    even_characters,
    mean_reward,
    policy_weights,
    start_checkpoint,
    toy_config,
)

from helpers import EXAMPLES
from pipeline.config import ConfigError, ExecutionConfig, RLConfig, build_config
from pipeline.data.example import Example
from pipeline.lm.loader import build_lm
from pipeline.scoring.rewards import ExecutionReward, Scored
from pipeline.training.job import run_training
from pipeline.training.prompt_rl import check_start_checkpoint
from pipeline.training.rl_job import SCREEN_FILE, rl_local_backend, screened_tasks

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    return start_checkpoint(tmp_path_factory.mktemp("start") / "checkpoint")


def test_the_settings_name_their_field_and_refuse_what_cannot_learn(start):
    with pytest.raises(ConfigError, match="^train.init_checkpoint: train.objective=grpo starts"):
        build_config("smoke", overrides=["train.objective=grpo"])
    with pytest.raises(ConfigError, match="^train.init_checkpoint: only the RL objectives"):
        build_config("smoke", overrides=[f"train.init_checkpoint={start}"])
    with pytest.raises(ConfigError, match="^rl.chain_steps: must be >= 8"):
        build_config("smoke", overrides=["rl.chain_steps=3"])
    with pytest.raises(ConfigError, match=r"^rl.eta: must be in \(0, 1\]"):
        build_config("smoke", overrides=["rl.eta=0"])
    with pytest.raises(ConfigError, match="^rl.group_size: must be >= 2"):
        build_config("smoke", overrides=["rl.group_size=1"])
    # prompt tuning ignores DDPT's objective (ddpt run trains it beside an RL-trained DDPT)
    config = build_config("smoke", overrides=["train.objective=grpo", "train.method=prompt_tuning"])
    assert not config.is_rl
    assert toy_config("grpo", start).is_rl


def test_the_start_checkpoint_is_checked_before_any_work(start, tmp_path):
    config = toy_config("grpo", start)
    assert check_start_checkpoint(config)["step"] == 150
    assert check_start_checkpoint(toy_config("grpo", start.parent))["folder"] == str(start)
    with pytest.raises(ConfigError, match="not a trained checkpoint folder"):
        check_start_checkpoint(toy_config("grpo", tmp_path / "missing"))
    with pytest.raises(ConfigError, match="was trained with denoiser.bottleneck=2, this run "
                       "says 3; set denoiser.bottleneck"):
        check_start_checkpoint(toy_config("grpo", start, 0, "denoiser.bottleneck=3"))
    generator = tmp_path / "generator"
    shutil.copytree(start, generator)
    saved = (generator / "config.yaml").read_text()
    (generator / "config.yaml").write_text(saved.replace("objective: unrolled",
                                                         "objective: deterministic"))
    with pytest.raises(ConfigError, match="no reverse chain"):
        check_start_checkpoint(toy_config("grpo", generator))
    check_start_checkpoint(toy_config("grpo_gaussian", generator))  # its mean is the generator
    # the training job checks it before MLflow or a model: nothing is written
    with pytest.raises(ConfigError, match="not a trained checkpoint folder"):
        run_training(toy_config("grpo", tmp_path / "missing"), tmp_path / "run",
                     rl_local_backend(reward=even_characters), examples=EXAMPLES)
    assert not (tmp_path / "run").exists()


def test_the_execution_reward_counts_asserts_and_code_that_parses_and_runs():
    task = Example("t", "add one", "def f(x):\n    return x + 1",
                   tests="assert f(1) == 2\nassert f(2) == 3\nassert f(3) == 5\n")
    codes = ["def f(x):\n    return x + 1",     # 2 of 3 asserts
             "def f(x):\n    return x.y",       # ran to the tests; every case raised
             "def f(x) return x",               # a syntax error
             "",                                # nothing (parses, but earns nothing)
             "import time\ntime.sleep(30)"]     # times out while loading
    scored = ExecutionReward(ExecutionConfig(timeout_s=8), RLConfig())([task] * 5, codes)
    assert scored.rewards == pytest.approx([2 / 3 + 0.1, 0.1, 0.0, 0.0, 0.05])
    assert scored.details["run_rate"] == [1.0, 1.0, 0.0, 0.0, 0.0]
    assert scored.details["parse_rate"] == [1.0, 1.0, 0.0, 0.0, 1.0]
    assert scored.details["case_rate"] == pytest.approx([2 / 3, 0, 0, 0, 0])
    assert scored.details["pass_rate"] == [0.0] * 5


def test_the_screen_keeps_tasks_whose_reward_varies_and_caches_its_verdict(tmp_path):
    config = build_config("smoke", overrides=[*TOY, "rl.screen_samples=3", "rl.screen_tasks=4"])
    calls = []

    def screen(chunks):  # task "b" always earns 1, the others vary
        calls.append(chunks)
        rows = [t for chunk in chunks for t in chunk for _ in range(3)]
        return Scored([1.0 if t.id == "b" else float(i % 2) for i, t in enumerate(rows)],
                      {"pass_rate": [0.0] * len(rows)})

    kept = screened_tasks(config, EXAMPLES, tmp_path, screen)
    assert [t.id for t in kept] == ["a", "c", "d"]  # b never varies; e, f are not screened
    assert [len(chunk) for chunk in calls[0]] == [1, 1, 1, 1]  # 4-row batches, 3 rows a task
    saved = json.loads((tmp_path / SCREEN_FILE).read_text())
    assert saved["kept"] == ["a", "c", "d"] and saved["rewards"]["b"] == [1.0] * 3
    assert screened_tasks(config, EXAMPLES, tmp_path, screen) == kept and len(calls) == 1
    other = build_config("smoke", overrides=[*TOY, "rl.screen_samples=3", "rl.screen_tasks=4",
                                             "rl.screen_temperature=0.5"])
    screened_tasks(other, EXAMPLES, tmp_path, screen)
    assert len(calls) == 2  # another key: screened again
    with pytest.raises(ConfigError, match="rl.screen: no reward varied"):
        screened_tasks(config, EXAMPLES, tmp_path / "none",
                       lambda chunks: Scored([0.0] * 12, {}))


@pytest.mark.parametrize("objective", ["grpo", "grpo_gaussian"])
def test_the_learner_sees_what_the_worker_sampled_ratio_one_kl_zero_at_the_start(start,
                                                                                 objective):
    """The wired sides of one round: the learner's weights, sent to the rollout worker, give
    trajectories whose log-probabilities the learner recomputes (the worker's record); the first
    update runs at theta = theta_old (every ratio exactly 1, no clip) and at the reference (the
    start checkpoint: KL exactly 0); after it, the KL is positive."""
    from pipeline.method.chain_policy import gaussian_log_density
    from pipeline.method.policy_gradient import group_advantages
    from pipeline.training.prompt_rl import PromptLearner, PromptRolloutWorker, load_start_model
    from pipeline.training.rl_loop import rollout_chunks

    config = toy_config(objective, start, 0, "rl.updates_per_round=1")  # G = 16
    learner = PromptLearner(config, load_start_model(config))
    worker = PromptRolloutWorker(config, build_lm(config), even_characters)
    stats = []
    for index in range(2):
        worker.set_weights(learner.weights())
        rollouts = worker.rollout(rollout_chunks(config, EXAMPLES[:2]), index)
        traj = rollouts.samples.trajectory
        with torch.no_grad():
            recomputed = gaussian_log_density(traj.latents[1:], *learner.policy.moments(traj))
        torch.testing.assert_close(recomputed, traj.log_probs(), rtol=1e-5, atol=1e-3)
        advantages = group_advantages(rollouts.rewards.view(2, 16), scale_by_std=True)
        assert advantages.informative_share > 0  # the toy's rewards vary: the update steps
        stats.append(learner.update(rollouts, advantages, EXAMPLES[:2], index))
    first, second = stats
    assert first["ratio_min"] == first["ratio_max"] == 1.0 and first["clip_fraction"] == 0.0
    assert first["kl"] == 0.0 and second["kl"] > 0.0


def _rl_run(config, output, lm, **kwargs):
    return run_training(config, output, rl_local_backend(lm, even_characters),
                        examples=EXAMPLES[:2], progress=False, **kwargs)


def _log(output) -> list[dict]:
    return [json.loads(line) for line in (output / "checkpoint" / "rounds.jsonl").open()]


@pytest.mark.slow
def test_resume_repeats_the_trajectories_and_rewards_of_the_uninterrupted_run(start, tmp_path):
    """The one-step Gaussian, whose learned scale is state beside the weights (the chain's
    resume, on Ray: tests/test_ray_rl.py)."""
    objective = "grpo_gaussian"
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    extra = ["rl.rounds=4", "rl.checkpoint_every=1", "rl.tasks_per_round=1",
             "rl.group_size=4", f"tracking.uri={uri}"]
    config = toy_config(objective, start, 0, *extra)
    lm = build_lm(config)
    _rl_run(config, tmp_path / "whole", lm)
    stopped = toy_config(objective, start, 0, *extra, "rl.rounds=2")
    _rl_run(stopped, tmp_path / "parts", lm)
    outcome = _rl_run(config, tmp_path / "parts", lm, resume=True)
    whole, parts = _log(tmp_path / "whole"), _log(tmp_path / "parts")
    assert [line["round"] for line in parts] == [1, 2, 3, 4]
    assert parts == whole  # the same tasks, trajectories (digests), programs and rewards
    assert len({line["samples_digest"] for line in whole}) == 4
    from mlflow import MlflowClient

    steps = [m.step for m in MlflowClient(uri).get_metric_history(outcome.run_id, "kl")]
    assert sorted(steps) == [1, 2, 3, 4]  # each round once, across the stop
    a = torch.load(tmp_path / "whole" / "checkpoint" / "optimizer.pt", weights_only=False)
    b = torch.load(tmp_path / "parts" / "checkpoint" / "optimizer.pt", weights_only=False)
    assert all(torch.equal(x["exp_avg"], y["exp_avg"])
               for x, y in zip(a["state"].values(), b["state"].values()))


@pytest.mark.slow
def test_rl_raises_the_toy_reward_over_three_seeds_against_a_frozen_control(tmp_path):
    """The reverse chain (grpo); both policies on a toy reward of the latents:
    tests/test_chain_policy.py."""
    objective, gains = "grpo", []
    for seed in range(3):
        start = start_checkpoint(tmp_path / f"start{seed}", seed)
        config = toy_config(objective, start, seed, "rl.rounds=15",
                            f"tracking.uri=sqlite:///{tmp_path}/mlflow.db")
        lm = build_lm(config)
        outcome = _rl_run(config, tmp_path / f"rl{seed}", lm)
        trained = policy_weights(config, outcome.checkpoint)
        frozen = policy_weights(config)
        gains.append(mean_reward(config, lm, trained, EXAMPLES[:2])
                     - mean_reward(config, lm, frozen, EXAMPLES[:2]))
    assert min(gains) > 0.05, gains
