"""Execution-reward RL as a training job (``ddpt train --set train.objective=grpo``, or
``--set train.method=coupled_grpo`` for a masked-diffusion LM): the policies (DDPT's by
objective, coupled-GRPO's: :mod:`pipeline.training.dllm_rl`), the checks before any work, the
task screen (cached in the output folder), the checkpoints with their rollout log, and the local
backend (one process, ``distributed.backend: local``). The Ray backend is
:mod:`pipeline.distributed.rl`; both run :func:`pipeline.training.rl_loop.run_rounds`.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import ConfigError, RunConfig
from pipeline.data.example import Example, missing_tests
from pipeline.lm.frozen import FrozenCodeLM
from pipeline.scoring.rewards import Reward, Scored
from pipeline.tracking import RunTracker
from pipeline.training.dllm_rl import (
    LEARNER_FILE,
    DllmRolloutWorker,
    LocalDllmLearner,
    resolve_rounds,
)
from pipeline.training.job import CHECKPOINT, TrainBackend, TrainRequest, local_backend
from pipeline.training.progress import StepProgress
from pipeline.training.prompt_rl import PromptLearner, PromptRolloutWorker, load_start_model
from pipeline.training.rl_loop import (
    ROLLOUT_LOG,
    Learner,
    Rollouts,
    RolloutWorker,
    Weights,
    round_plan,
    run_rounds,
    task_chunks,
)

log = logging.getLogger(__name__)
SCREEN_FILE = "screen.json"  # <output>/screen.json: the screen's settings, rewards and verdict


@dataclass(frozen=True)
class RLPolicy:
    """How a policy plugs into the loop: its rollout side (config, LM, reward or None for the
    execution reward) and its learner (config, the LM when :attr:`learner_needs_lm` says so)."""

    rollout_worker: Callable[[RunConfig, FrozenCodeLM, Reward | None], RolloutWorker]
    # (config, LM or None, a local copy of the start checkpoint or None) -> the learner
    learner: Callable[[RunConfig, FrozenCodeLM | None, Path | None], Learner]
    learner_needs_lm: Callable[[RunConfig], bool]
    saved_file: str = "state.json"  # in a checkpoint folder the learner saved: it is whole


def _prompt_learner(config: RunConfig, lm: FrozenCodeLM | None,
                    start: Path | None = None) -> PromptLearner:
    return PromptLearner(config, load_start_model(config, start), lm)


_PROMPT_POLICY = RLPolicy(PromptRolloutWorker, _prompt_learner,
                          lambda config: config.rl.ce_weight > 0)
# DDPT's train.objective, or train.method=coupled_grpo -> its policy (on Ray, coupled-GRPO's
# learner is the ZeRO-3 one of pipeline.distributed.dllm_policy instead of LocalDllmLearner)
RL_POLICIES: dict[str, RLPolicy] = {
    "grpo": _PROMPT_POLICY, "grpo_gaussian": _PROMPT_POLICY,
    "coupled_grpo": RLPolicy(DllmRolloutWorker, LocalDllmLearner, lambda config: False,
                             saved_file=LEARNER_FILE)}


def rl_policy(config: RunConfig) -> RLPolicy:
    method = config.train.method
    return RL_POLICIES[method if method == "coupled_grpo" else config.train.objective]


def loop_config(config: RunConfig, tasks: list[Example]) -> RunConfig:
    """``config`` as the loop runs it on ``tasks`` (coupled-GRPO's rounds made explicit)."""
    return resolve_rounds(config, len(tasks)) if config.train.method == "coupled_grpo" \
        else config


def require_tests(config: RunConfig, examples: list[Example]) -> None:
    """The execution reward runs each task's tests: every training task needs them."""
    untested = missing_tests(examples)
    if untested:
        raise ConfigError(f"data.dataset: {len(untested)} of {len(examples)} training tasks of "
                          f"{config.data.dataset}/{config.data.train_split} have no tests (ids "
                          f"{untested[:3]}); the execution reward runs them")


def is_checkpoint_round(round_number: int, config: RunConfig) -> bool:
    every = config.rl.checkpoint_every
    return round_number == round_plan(config).rounds or bool(every and round_number % every == 0)


def dump_log(lines: list[dict]) -> str:
    return "".join(json.dumps(line) + "\n" for line in lines)


def read_log(folder: Path) -> list[dict]:
    """A checkpoint's rollout log (every round up to it)."""
    path = Path(folder) / ROLLOUT_LOG
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


# ---- the task screen ----------------------------------------------------------------------------
def screen_key(config: RunConfig, tasks: list[Example], reward_name: str) -> dict:
    """What a screen's verdict depends on: a cached screen with another key is redone."""
    rl, ids = config.rl, ",".join(task.id for task in tasks)
    return {"model": config.model.name, "dataset": config.data.dataset,
            "split": config.data.train_split, "tasks": len(tasks),
            "ids_sha1": hashlib.sha1(ids.encode()).hexdigest()[:16],
            "samples": rl.screen_samples, "temperature": rl.screen_temperature,
            "top_p": config.decoding.top_p, "max_new_tokens": config.eval.max_new_tokens,
            "seed": config.train.seed, "context": config.prompt.context,
            "template": config.prompt.template, "reward": reward_name,
            "parse_bonus": rl.parse_bonus, "run_bonus": rl.run_bonus,
            "timeout_s": config.execution.timeout_s}


def screened_tasks(config: RunConfig, examples: list[Example], output: Path,
                   screen: Callable[[list[list[Example]]], Scored], *,
                   tracker: RunTracker | None = None, reward_name: str = "execution"
                   ) -> list[Example]:
    """The training tasks RL uses: with ``rl.screen``, those of the first ``rl.screen_tasks``
    whose reward varies over ``rl.screen_samples`` temperature samples of the starting point
    (the model sometimes solves them, or partly); all of them otherwise. The verdict is cached
    in ``<output>/screen.json`` and reused while its key holds."""
    rl = config.rl
    if not rl.screen or config.train.method == "coupled_grpo":  # the reference screens none
        return list(examples)
    candidates = examples[:rl.screen_tasks or None]
    key, path = screen_key(config, candidates, reward_name), Path(output) / SCREEN_FILE
    cached = json.loads(path.read_text()) if path.is_file() else None
    if cached and cached.get("key") == key:
        rewards, passed = cached["rewards"], cached["passed"]
        log.info("task screen: reusing %s", path)
    else:
        began, n = time.perf_counter(), rl.screen_samples
        scored = screen(task_chunks(candidates, n, config.eval.batch_size))
        flags = scored.details.get("pass_rate", [0.0] * len(scored.rewards))
        rewards = {t.id: scored.rewards[i * n:(i + 1) * n] for i, t in enumerate(candidates)}
        passed = {t.id: flags[i * n:(i + 1) * n] for i, t in enumerate(candidates)}
        kept_ids = [t.id for t in candidates if statistics.pvariance(rewards[t.id]) > 0]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"key": key, "kept": kept_ids, "rewards": rewards,
                                    "passed": passed,
                                    "seconds": time.perf_counter() - began}, indent=1) + "\n")
    kept = [t for t in candidates if statistics.pvariance(rewards[t.id]) > 0]
    solved = sum(any(passed[t.id]) for t in candidates)
    log.info("task screen: %d of %d tasks kept (reward varies), %d solved at least once",
             len(kept), len(candidates), solved)
    if tracker is not None:
        tracker.log_metrics({"screen_tasks": len(candidates), "screen_kept": len(kept),
                             "screen_solved": solved})
    if not kept:
        raise ConfigError(f"rl.screen: no reward varied over {rl.screen_samples} samples of any "
                          f"of {len(candidates)} tasks (see {path}); screen more tasks "
                          "(rl.screen_tasks), raise rl.screen_temperature, or set rl.screen=false")
    return kept


# ---- the local backend --------------------------------------------------------------------------
def timed_rollout(worker: RolloutWorker, weights: Weights, chunks: list[list[Example]],
                  round_index: int) -> Rollouts:
    """The learner's weights in, the chunks' rollouts out; loading the weights is timed as
    ``sync_seconds`` (here and on a sampler actor)."""
    began = time.perf_counter()
    worker.set_weights(weights)
    synced = time.perf_counter() - began
    rollouts = worker.rollout(chunks, round_index)
    rollouts.seconds["sync_seconds"] = synced
    return rollouts


def local_rollout(worker: RolloutWorker):
    """The rollout function of one worker in this process (weights in, rollouts out)."""
    return functools.partial(timed_rollout, worker)


class RoundCommitter:
    """After each round: the record and log line kept; at a checkpoint round, the learner's
    checkpoint (with the rollout log up to it) saved by ``save``, then the records since the
    last checkpoint handed to ``commit`` (MLflow), so a resumed run never logs a round twice."""

    def __init__(self, config: RunConfig, save: Callable[[int, list[dict], str], None],
                 log_lines: list[dict], progress: StepProgress | None = None):
        self.config, self.save, self.lines, self.progress = config, save, log_lines, progress
        self.pending: list[dict] = []

    def __call__(self, round_number: int, record: dict, line: dict) -> None:
        self.pending.append(record)
        self.lines.append(line)
        if self.progress is not None:
            self.progress.update(round_number, record["reward_mean"],
                                 record["programs_per_second"])
        if is_checkpoint_round(round_number, self.config):
            self.save(round_number, self.pending, dump_log(self.lines))
            self.pending = []


def rl_local_backend(lm: FrozenCodeLM | None = None, reward: Reward | None = None
                     ) -> TrainBackend:
    """RL in this process: the rollout worker and the learner side by side. ``reward``: another
    reward than the sandbox's (tests' toy rewards); ``lm``: a loaded LM to reuse."""

    def train(request: TrainRequest) -> Path:
        from pipeline.lm.loader import build_lm

        config, output, tracker = request.config, request.output, request.tracker
        if reward is None:
            require_tests(config, request.examples)
        policy = rl_policy(config)
        model = lm or build_lm(config)
        worker = policy.rollout_worker(config, model, reward)
        tasks = screened_tasks(config, request.examples, output,
                               lambda chunks: worker.screen(chunks), tracker=tracker,
                               reward_name=reward_name(reward))
        config = loop_config(config, tasks)
        learner = policy.learner(config, model if policy.learner_needs_lm(config) else None,
                                 None)
        folder = output / CHECKPOINT
        start, lines = 0, []
        if request.resume and (folder / policy.saved_file).is_file():
            start, lines = learner.load(folder), read_log(folder)
            lines = [line for line in lines if line["round"] <= start]
            log.info("resumed RL from %s at round %d", folder, start)

        def save(round_number: int, records: list[dict], text: str) -> None:
            learner.save(folder, round_number, {ROLLOUT_LOG: text})
            for record in records:
                tracker.log_metrics({k: v for k, v in record.items() if k != "step"},
                                    step=record["step"])

        progress = StepProgress(f"rl {output.name}", round_plan(config).rounds,
                                enabled=request.progress,
                                label="reward", unit="programs/s")
        try:
            run_rounds(learner, local_rollout(worker), tasks, config, start=start,
                       on_round=RoundCommitter(config, save, lines, progress))
        finally:
            progress.close()
        return folder

    return train


def local_train_backend(config: RunConfig, lm: FrozenCodeLM | None = None) -> TrainBackend:
    """The training job's backend in this process for ``config``: RL's rounds for the RL
    objectives, DDPT's (or prompt tuning's) steps otherwise."""
    return rl_local_backend(lm) if config.runs_rounds else local_backend(lm)


def reward_name(reward: Reward | None) -> str:
    """How the screen's cache key names a reward: 'execution', or the callable's name."""
    if reward is None:
        return "execution"
    return getattr(reward, "__qualname__", type(reward).__qualname__)
