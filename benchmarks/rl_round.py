"""One execution-reward RL round (``train.objective=grpo``), timed by part, on the embedded model.

    python benchmarks/rl_round.py --init-checkpoint runs/train        # 4 tasks x G 8, 3 rounds
    python benchmarks/rl_round.py --init-checkpoint runs/train --tasks 2 --rounds 2 \\
        --set eval.max_new_tokens=96

The parts are those of a round on Ray (docs/training.md, "Execution-reward training"), run here
in one process with the code the actors and the learner run: **sync** (the learner's weights
through Ray's object store, ``ray.put`` then ``ray.get`` on this node, into the rollout worker's
policy), **sample** (G prompts per task from the policy chain), **generate** (greedy decoding of
every prompt, in ``eval.batch_size`` batches), **sandbox** (every program against its task's
tests) and **update** (``rl.updates_per_round`` clipped-surrogate steps on the learner). The
round should be bound by generation: sandbox plus update under 20% of it. Printed per part: the
median seconds over the timed rounds (one untimed round first), its share of the round, the
programs per second, and (sandbox + update) / generate. ``--init-checkpoint``: a trained DDPT
(the training output folder or its ``checkpoint``), e.g. from ``ddpt train --set
distributed.backend=local``; the tasks are MBPP's first training tasks.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PARTS = ("sync", "sample", "generate", "sandbox", "update")


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--init-checkpoint", required=True, help="a trained DDPT checkpoint")
    parser.add_argument("--objective", default="grpo", choices=("grpo", "grpo_gaussian"))
    parser.add_argument("--tasks", type=int, default=4, help="tasks per round (N)")
    parser.add_argument("--group", type=int, default=8, help="prompts per task (G)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (after one more)")
    parser.add_argument("--no-ray", action="store_true", help="sync without Ray's object store")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="SECTION.FIELD=VALUE", help="more configuration")
    return parser.parse_args()


def one_round(worker, learner, tasks, config, index: int, *, use_ray: bool) -> dict:
    """The seconds of each part of round ``index`` (and the programs it ran)."""
    from pipeline.method.policy_gradient import group_advantages
    from pipeline.training.rl_loop import rollout_chunks

    began = time.perf_counter()
    weights = learner.weights()
    if use_ray:
        import ray

        weights = ray.get(ray.put(weights))
    worker.set_weights(weights)
    synced = time.perf_counter()
    rollouts = worker.rollout(rollout_chunks(config, tasks), index)
    rolled = time.perf_counter()
    advantages = group_advantages(rollouts.rewards.view(len(tasks), config.rl.group_size),
                                  baseline=config.rl.baseline,
                                  scale_by_std=config.rl.scale_by_std)
    learner.update(rollouts, advantages, tasks, index)
    done = time.perf_counter()
    seconds = rollouts.seconds
    return {"sync": synced - began, "sample": seconds["sample_seconds"],
            "generate": seconds["generate_seconds"], "sandbox": seconds["score_seconds"],
            "update": done - rolled, "round": done - began, "programs": len(rollouts.codes),
            "reward": float(rollouts.rewards.mean()),
            "informative": advantages.informative_share}


def main() -> None:
    args = parse()
    import torch

    from pipeline.config import build_config
    from pipeline.data.loaders import load_examples
    from pipeline.lm.loader import build_lm
    from pipeline.training.prompt_rl import PromptLearner, PromptRolloutWorker, load_start_model

    config = build_config("main", overrides=[
        f"train.objective={args.objective}", f"train.init_checkpoint={args.init_checkpoint}",
        f"rl.tasks_per_round={args.tasks}", f"rl.group_size={args.group}", *args.overrides])
    if not args.no_ray:
        import ray

        from pipeline.distributed.session import use_local_ray_env

        use_local_ray_env()  # the variables a local Ray of the pipeline starts with
        ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    torch.set_num_threads(os.cpu_count() or 1)
    lm = build_lm(config)
    worker = PromptRolloutWorker(config, lm)
    learner = PromptLearner(config, load_start_model(config))
    tasks = load_examples("mbpp", "train", config.data.data_dir, args.tasks)
    print(f"{config.model.name}, {args.objective}: {args.tasks} MBPP train tasks x G "
          f"{args.group} = {args.tasks * args.group} programs a round, "
          f"{config.eval.max_new_tokens} new tokens at most, batches of "
          f"{config.eval.batch_size} rows, {torch.get_num_threads()} threads, load average "
          f"{os.getloadavg()[0]:.1f}")
    rounds = [one_round(worker, learner, tasks, config, index, use_ray=not args.no_ray)
              for index in range(args.rounds + 1)][1:]
    report(rounds)


def report(rounds: list[dict]) -> None:
    median = {name: statistics.median(r[name] for r in rounds) for name in (*PARTS, "round")}
    print(f"\n{'part':10s} {'seconds':>9s} {'share':>7s}")
    for name in PARTS:
        print(f"{name:10s} {median[name]:9.3f} {median[name] / median['round']:7.1%}")
    print(f"{'round':10s} {median['round']:9.3f}")
    programs = rounds[0]["programs"]
    ratio = (median["sandbox"] + median["update"]) / median["generate"]
    print(f"\nprograms per second: {programs / median['round']:.2f} (generation alone "
          f"{programs / median['generate']:.2f}, the sandbox alone "
          f"{programs / median['sandbox']:.2f})")
    print(f"(sandbox + update) / generate: {ratio:.1%} (target: under 20%)")
    print("rounds' mean reward: " + ", ".join(f"{r['reward']:.3f}" for r in rounds)
          + "; informative share: " + ", ".join(f"{r['informative']:.2f}" for r in rounds))


if __name__ == "__main__":
    main()
