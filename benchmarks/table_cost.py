"""What an experiment spec and its sweeps cost on this machine, from measured unit times: each
arm's training step, and per task, generating with each kind of method and scoring its code
cross-entropy, and running a program in the sandbox; then the spec's and the sweeps' totals.

Units are measured in this process (``distributed.backend: local``; generation in batches of
``eval.batch_size``, as one sampler actor runs them) on a sample spread over MBPP's test split
and HumanEval (the tasks the spec scores), with an arm's prompt model after ``--steps``
training steps. Wall-clock and CPU seconds are both printed: on a shared machine the wall clock
depends on the load (printed), the CPU time much less.

    python benchmarks/table_cost.py                            # the table's spec and sweeps
    python benchmarks/table_cost.py --spec experiments/ddpt_variants_main.yaml --tasks 8
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

SWEEPS = ("tune/mbpp_prompt_tuning.yaml", "tune/mbpp_ddpt.yaml",
          "tune/mbpp_ddpt_unconditional.yaml", "tune/mbpp_ddpt_unconditional_deterministic.yaml",
          "tune/mbpp_ddpt_deterministic.yaml", "tune/mbpp_ddpt_paper.yaml")


class Clock:
    """Wall-clock and CPU seconds (this process) of a ``with`` block."""

    def __enter__(self) -> Clock:
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--spec", default="experiments/mbpp_humaneval_table.yaml")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per arm (after 1)")
    parser.add_argument("--tasks", type=int, default=16, help="tasks per test set, spread")
    args = parser.parse_args()

    from pipeline.lm.loader import build_lm
    from pipeline.studies.experiment import load_experiment

    experiment = load_experiment(args.spec, ["distributed.backend=local", "pool.backend=local"])
    dataset = next(iter(experiment.datasets))
    first = experiment.config(dataset, experiment.arms[0], experiment.seeds[0])
    lm = build_lm(first)
    folder = Path(tempfile.mkdtemp(prefix="table-cost-"))
    steps, tasks, checkpoints = {}, {}, {}
    for arm in experiment.arms:
        config = experiment.config(dataset, arm, experiment.seeds[0])
        steps[arm.name], checkpoints[arm.name] = step_seconds(config, lm, args.steps,
                                                              folder / arm.name)
        for method in arm.methods:
            if method not in tasks:
                tasks[method] = task_seconds(config, lm, method, checkpoints[arm.name],
                                             args.tasks, folder / method)
    tasks.update({m: task_seconds(first, lm, m, None, args.tasks, folder / m)
                  for m in experiment.baseline_methods})
    report = {"load_average": os.getloadavg(), "step_seconds": steps,
              "per_task_seconds": tasks,
              "spec": spec_total(experiment, steps, tasks),
              "sweeps": sweep_totals(steps, tasks)}
    print(json.dumps(report, indent=1))


def step_seconds(config, lm, count: int, checkpoint: Path) -> tuple[dict, Path]:
    """Median wall and mean CPU seconds of a training step (the first step left out)."""
    from pipeline.data.splits import train_examples
    from pipeline.training.loop import train_local

    run = config.with_overrides([f"train.steps={count + 1}", "train.checkpoint_every=0"])
    with Clock() as clock:
        result = train_local(run, lm, train_examples(run.data), checkpoint_dir=checkpoint,
                             progress=False)
    walls = [h["step_seconds"] for h in result.history[1:]]
    return {"wall": round(statistics.median(walls), 2),
            "cpu": round(clock.cpu / len(result.history), 2)}, checkpoint


def task_seconds(config, lm, method: str, checkpoint: Path | None, count: int,
                 folder: Path) -> dict:
    """Per task: generating and scoring code_ce with ``method`` (wall, CPU), and running the
    generated program in the sandbox (wall), over ``count`` tasks of each test set."""
    from pipeline.data.splits import eval_examples
    from pipeline.generation.sampler import METHODS, BatchSampler
    from pipeline.scoring.execution import score_execution
    from pipeline.scoring.results import ResultStore
    from pipeline.studies.main_job import extra_config

    prompt = METHODS[method].prompt
    sampler = BatchSampler(config, {prompt: checkpoint} if prompt else {}, lm=lm)
    sets = {"mbpp": config.with_overrides([f"data.max_eval_examples={count}"])}
    sets.update({name: extra_config(config, name).with_overrides(
        [f"data.max_eval_examples={count}"]) for name in config.data.extra_sets})
    out = {}
    for name, run in sets.items():
        examples = eval_examples(run.data)
        store = ResultStore(folder / name / "samples.jsonl")
        with Clock() as generating:
            for start in range(0, len(examples), run.eval.batch_size):
                store.append(sampler.run(method, examples[start:start + run.eval.batch_size]))
        with Clock() as executing:
            score_execution(store, method, examples, run.execution, progress=False)
        out[name] = {"wall": round(generating.wall / len(examples), 2),
                     "cpu": round(generating.cpu / len(examples), 2),
                     "execution_wall": round(executing.wall / len(examples), 3)}
    return out


def spec_total(experiment, steps: dict, tasks: dict) -> dict:
    """The spec's training and evaluation hours from the unit times (wall and CPU): every arm
    and seed trains ``train.steps`` steps and scores all its tasks with each of its methods;
    the baseline methods once per data set."""
    from pipeline.data.splits import eval_examples
    from pipeline.studies.main_job import extra_config

    total = {"train_wall": 0.0, "train_cpu": 0.0, "eval_wall": 0.0, "eval_cpu": 0.0}
    for dataset, arm, seed in experiment.runs():
        config = experiment.config(dataset, arm, seed)
        counts = {"mbpp": len(eval_examples(config.data))}
        counts.update({name: len(eval_examples(extra_config(config, name).data))
                       for name in config.data.extra_sets})
        if arm is not None:
            for kind in ("wall", "cpu"):
                total[f"train_{kind}"] += config.train.steps * steps[arm.name][kind]
        for method in experiment.methods(arm):
            for name, count in counts.items():
                unit = tasks[method][name]
                total["eval_wall"] += count * (unit["wall"] + unit["execution_wall"])
                total["eval_cpu"] += count * unit["cpu"]
    return {key: round(value / 3600, 1) for key, value in total.items()} | {"unit": "hours"}


def sweep_totals(steps: dict, tasks: dict) -> dict:
    """Each table sweep's hours: trials x (steps x the arm's step time + its dev evaluations
    x the dev tasks x a task's code_ce time, bounded by the generation-and-code_ce time);
    Ray and DeepSpeed's start-up per trial (tens of seconds) is not in it."""
    from pipeline.studies.sweep import load_sweep

    arm_of = {"mbpp_prompt_tuning": "prompt_tuning", "mbpp_ddpt": "ddpt_conditional",
              "mbpp_ddpt_unconditional": "ddpt_unconditional",
              "mbpp_ddpt_unconditional_deterministic": "ddpt_unconditional_deterministic",
              "mbpp_ddpt_deterministic": "ddpt_deterministic", "mbpp_ddpt_paper": "ddpt_paper"}
    out = {}
    for path in SWEEPS:
        sweep = load_sweep(path)
        arm = arm_of[Path(path).stem]
        if arm not in steps:
            continue
        trials = sweep.num_samples
        for distribution in sweep.space.values():
            trials *= len(distribution.values) if distribution.kind == "grid" else 1
        evaluations = -(-sweep.base.train.steps // sweep.eval_every)
        dev_tasks = sweep.base.data.max_dev_examples or 90  # MBPP's validation split
        method = "prompt_tuning" if arm == "prompt_tuning" else "ddpt_ddim"
        per_task = tasks.get(method, tasks["manual"])["mbpp"]["wall"]
        seconds = trials * (sweep.base.train.steps * steps[arm]["wall"]
                            + evaluations * dev_tasks * per_task)
        out[Path(path).name] = {"trials": trials, "hours_at_most": round(seconds / 3600, 1)}
    return out


if __name__ == "__main__":
    main()
