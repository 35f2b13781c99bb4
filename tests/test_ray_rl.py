"""Execution-reward RL through real Ray: rollouts on the sampler actors, the update on a Ray Train
learner, the weights to the actors each round; the toy task learnt over three seeds against a
frozen control, an exact resume, and ``ddpt train`` with the RL objectives (and soft_min) leaving
their curves in MLflow. One Ray for the module; slow."""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import ray
import rl_toy
from rl_toy import even_characters, mean_reward, policy_weights, start_checkpoint, toy_config

from helpers import EXAMPLES
from pipeline.distributed.rl import rl_ray_backend
from pipeline.distributed.sampler_pool import start_pool
from pipeline.lm.loader import build_lm
from pipeline.training.job import run_training

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def local_ray():
    from pipeline.distributed.session import use_local_ray_env

    use_local_ray_env()  # as ensure_ray starts a local Ray
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    # the toy reward goes to the actors by value: they cannot import the tests' modules
    ray.cloudpickle.register_pickle_by_value(rl_toy)
    yield
    ray.shutdown()


def _ray_run(config, output, actors, **kwargs):
    return run_training(config, output, rl_ray_backend(even_characters, actors),
                        examples=EXAMPLES[:2], progress=False, **kwargs)


def _log(output) -> list[dict]:
    return [json.loads(line) for line in (output / "checkpoint" / "rounds.jsonl").open()]


def test_actors_and_learner_raise_the_toy_reward_and_resume_exactly(local_ray, tmp_path):
    """Two sampler actors holding the tiny LM and the toy reward serve every run here."""
    config = toy_config("grpo", start_checkpoint(tmp_path / "s" / "checkpoint"), 0,
                        "pool.num_actors=2", "pool.cpus_per_actor=1", "pool.torch_threads=1")
    keep = ray.put({})  # the actors' constructor argument, alive as long as they are
    actors = start_pool(config, keep, reward=even_characters)
    try:
        _learn_and_resume(actors, tmp_path)
    finally:
        for actor in actors:
            ray.kill(actor)


def _learn_and_resume(actors: list, tmp_path) -> None:
    """Three seeds, and seed 0 stopped at round 10, as four RL runs side by side (their own
    learners, the actors shared, as a sweep's trials would share them); then the stopped run
    resumed to round 15 from its Ray storage."""
    def run(seed: int, rounds: int, name: str, **kwargs):
        start = tmp_path / f"start{seed}" / "checkpoint"
        config = toy_config("grpo", start, seed, f"rl.rounds={rounds}", "rl.checkpoint_every=5",
                            f"tracking.uri=sqlite:///{tmp_path}/{name}.db",
                            "distributed.backend=ray")
        return config, _ray_run(config, tmp_path / name, actors, **kwargs)

    for seed in range(3):
        start_checkpoint(tmp_path / f"start{seed}" / "checkpoint", seed)
    jobs = [(seed, 15, f"rl{seed}") for seed in range(3)] + [(0, 10, "parts")]
    with ThreadPoolExecutor(len(jobs)) as pool:
        done = list(pool.map(lambda job: run(*job), jobs))
    gains = []
    for config, outcome in done[:3]:
        lm = build_lm(config)
        gains.append(mean_reward(config, lm, policy_weights(config, outcome.checkpoint),
                                 EXAMPLES[:2])
                     - mean_reward(config, lm, policy_weights(config), EXAMPLES[:2]))
    assert min(gains) > 0.05, gains
    whole = _log(tmp_path / "rl0")
    assert [line["round"] for line in whole] == list(range(1, 16))
    assert len(whole[0]["rewards"]) == 2 * 16  # 2 tasks x G, from both actors' shares

    # Stopped after round 10 (a checkpoint), resumed to 15 from the Ray storage: the same
    # trajectories, programs and rewards as the uninterrupted run.
    _, outcome = run(0, 15, "parts", resume=True)
    assert _log(tmp_path / "parts") == whole
    from mlflow import MlflowClient

    history = MlflowClient(f"sqlite:///{tmp_path}/parts.db").get_metric_history(
        outcome.run_id, "reward_mean")
    assert sorted(m.step for m in history) == list(range(1, 16))  # every round once


def _ddpt(*args: str) -> None:
    from pipeline.cli import main

    assert main(list(args)) == 0


MBPP = ["--preset", "smoke", "--no-progress", "--set", "model.name=tiny-llama",
        "--set", "data.dataset=mbpp", "--set", "data.max_train_examples=4",
        "--set", "train.batch_size=2"]


def test_ddpt_train_runs_each_new_objective_through_ray_with_its_curves(local_ray, tmp_path):
    """``ddpt train`` as a user runs it: a DDPT trained first (in this process), then grpo and
    grpo_gaussian from it on the sandbox's reward (their own actors and learner), and soft_min
    (Ray Train + DeepSpeed); each leaves its curves in MLflow."""
    from mlflow import MlflowClient

    _ddpt("train", "--output", str(tmp_path / "start"), *MBPP,
          "--set", "distributed.backend=local", "--set", "train.objective=unrolled")
    rl = ["--set", f"train.init_checkpoint={tmp_path / 'start'}", "--set", "rl.rounds=2",
          "--set", "rl.tasks_per_round=2", "--set", "rl.group_size=2",
          "--set", "rl.screen=false", "--set", "pool.num_actors=1",
          "--set", "pool.cpus_per_actor=1", "--set", "execution.timeout_s=5"]
    curves = {"grpo": ["reward_mean", "informative_share", "kl", "clip_fraction", "pass_rate",
                       "run_rate", "ratio_max", "generate_seconds", "score_seconds",
                       "update_seconds", "sync_seconds"],
              "grpo_gaussian": ["reward_mean", "informative_share", "kl", "clip_fraction",
                                "policy_std"],
              "soft_min": ["loss", "code_loss", "best_code_loss", "consistency"]}
    for objective, names in curves.items():
        output = tmp_path / objective
        _ddpt("train", "--output", str(output), *MBPP, "--set", f"train.objective={objective}",
              *(rl if objective != "soft_min" else []))
        saved = json.loads((output / "mlflow_run.json").read_text())
        client = MlflowClient(saved["uri"])
        for name in names:
            steps = [m.step for m in client.get_metric_history(saved["run_id"], name)]
            assert steps and steps == sorted(set(steps)), (objective, name, steps)
        assert (output / "checkpoint" / "state.json").is_file()
