"""Ray glue of execution-reward RL (docs/training.md, "Execution-reward training"): rollouts on
the sampler actors, the update on a Ray Train learner, the new weights to the actors each round.

The shape of veRL and OpenRLHF: the **rollout workers** are the sampler actors
(:class:`~pipeline.distributed.sampler_pool.SamplerActor`), which already hold the frozen LM;
each round they take the learner's weights (put in the object store once), sample the round's
prompts from them, decode, run the sandbox, and return the rollouts with their trajectories'
latents and conditions. The **learner** is a Ray Train ``TorchTrainer`` whose rank 0 drives the
rounds (:func:`pipeline.training.rl_loop.run_rounds`) through the actors' handles, passed in its
loop config. Ray Train, rather than a plain actor, because it gives the learner what DDPT
training already has: checkpoints in ``distributed.storage_path`` reported with their rounds'
metrics (committed to MLflow only once persisted: :class:`MLflowCommit`), a restart from the
last checkpoint when the learner dies (``distributed.max_failures``) and ``--resume`` after a
full stop; and coupled-GRPO's learner is N ranks under DeepSpeed ZeRO-3, the same shape with
more workers (:mod:`pipeline.distributed.dllm_policy`: every rank runs the rounds, rank 0 calls
the actors and sends the rollouts to the others). DDPT's learner is one worker: its update is a
few denoiser calls.

Ray checkpoints of an RL run::

    prompt_model/       DDPT: the portable checkpoint (pipeline/training/checkpoint.py) with the
                        optimizer and rounds.jsonl, the rollout log of every round so far
    learner/            coupled-GRPO: the ZeRO-3 checkpoint (every rank's part), its Dream
                        folder (dream/), learner_state.json and rounds.jsonl
    history.jsonl       the round records since the previous checkpoint (MLflow's)
"""
from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray
import ray.train
import torch
from ray.exceptions import RayActorError
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from pipeline.config import RunConfig
from pipeline.data.example import Example
from pipeline.distributed.checkpoints import HISTORY_FILE, TIME_KEY, MLflowCommit, report_metrics
from pipeline.distributed.progress import ProgressRelay, ProgressSink
from pipeline.distributed.sampler_pool import pack_checkpoints, start_pool, unpack_checkpoints
from pipeline.distributed.session import check_fits, ensure_ray
from pipeline.distributed.storage import prepare_storage
from pipeline.distributed.train import export
from pipeline.quiet import quiet_worker, verbose
from pipeline.training.job import CHECKPOINT, TrainRequest
from pipeline.training.rl_loop import round_plan

log = logging.getLogger(__name__)
RUN_NAME = "rl"  # the Ray run's name (storage.py adds the output's name to a shared storage)
LEARNER_MEMORY = 256 * 2**20  # bytes of Ray's logical memory the learner reserves
DLLM_LEARNER_DIR = "learner"  # coupled-GRPO's folder in a Ray checkpoint (DDPT's: prompt_model)


# ---- the actor pool as the loop's rollout function ---------------------------------------------
def share_out(chunks: list, count: int) -> list[list]:
    """``chunks`` cut into ``count`` contiguous shares, as even as they go (empty ones last)."""
    size, extra = divmod(len(chunks), count)
    shares, start = [], 0
    for index in range(count):
        end = start + size + (index < extra)
        shares.append(chunks[start:end])
        start = end
    return shares


def on_pool(actors: list, shares: list[list], submit: Callable[[Any, list], Any]) -> list:
    """``submit(actor, share)`` (an actor call's ObjectRef) for each non-empty share, one actor
    each, side by side; the results in share order. An actor gone for good (Ray already
    restarted it and retried as ``pool.max_restarts`` says) hands its share to a live one."""
    results: dict[int, Any] = {}
    live, last = list(actors), None
    todo = [(index, share) for index, share in enumerate(shares) if share]
    while todo:
        if not live:
            raise RuntimeError("every sampler actor died; the RL round cannot finish") from last
        calls = [(index, share, live[turn % len(live)])
                 for turn, (index, share) in enumerate(todo)]
        refs = [submit(actor, share) for _, share, actor in calls]
        todo = []
        for ref, (index, share, actor) in zip(refs, calls):
            try:
                results[index] = ray.get(ref)
            except RayActorError as err:
                log.warning("sampler actor died for good (%s); its share goes to another",
                            str(err).strip().splitlines()[-1][:300])
                last = err
                if actor in live:
                    live.remove(actor)
                todo.append((index, share))
    return [results[index] for index in sorted(results)]


class PoolRollout:
    """The loop's rollout function on the actor pool: each round the weights go into the object
    store once (``ray.put``), every actor gets a contiguous share of the round's chunks and the
    weights' reference, and the shares' rollouts come back in order."""

    def __init__(self, actors: list, config: RunConfig):
        self.actors, self.config = actors, config.to_dict()

    def __call__(self, weights: dict, chunks: list[list[Example]], round_index: int):
        from pipeline.training.rl_loop import Rollouts

        began = time.perf_counter()
        ref = ray.put(weights)
        put = time.perf_counter() - began
        parts = on_pool(self.actors, share_out(chunks, len(self.actors)),
                        lambda actor, share: actor.rl_rollout.remote(self.config, ref, share,
                                                                     round_index))
        rollouts = Rollouts.cat(parts, parallel=True)
        rollouts.seconds["sync_seconds"] = rollouts.seconds.get("sync_seconds", 0.0) + put
        return rollouts

    def screen(self, chunks: list[list[Example]]):
        from pipeline.scoring.rewards import Scored

        parts = on_pool(self.actors, share_out(chunks, len(self.actors)),
                        lambda actor, share: actor.rl_screen.remote(self.config, share))
        return Scored.cat(parts)


# ---- inside the Ray Train learner ---------------------------------------------------------------
def learner_dir(config: RunConfig) -> str:
    """The learner's folder in a Ray checkpoint: DDPT's portable prompt model, or coupled-GRPO's
    ZeRO-3 checkpoint with its Dream folder."""
    return DLLM_LEARNER_DIR if config.train.method == "coupled_grpo" else "prompt_model"


def _build_learner(config: RunConfig, loop_config: dict[str, Any]):
    """This rank's learner: coupled-GRPO's ZeRO-3 one, or the policy's own from a copy of the
    start checkpoint (with the LM when its auxiliary loss needs it)."""
    from pipeline.training.rl_job import rl_policy

    if config.train.method == "coupled_grpo":
        from pipeline.distributed.dllm_policy import ZeroDllmLearner

        return ZeroDllmLearner(config, len(loop_config["tasks"]))
    policy, lm = rl_policy(config), None
    if policy.learner_needs_lm(config):
        from pipeline.lm.loader import build_lm

        lm = build_lm(config)
    with tempfile.TemporaryDirectory(prefix="ddpt-rl-start-") as folder:
        start_copy = unpack_checkpoints({"start": loop_config["start"]}, Path(folder))["start"]
        return policy.learner(config, lm, Path(start_copy))


def learner_loop(loop_config: dict[str, Any]) -> None:
    """The learner's Ray Train loop: build the learner (every rank: one for DDPT, N under ZeRO-3
    for coupled-GRPO), restore Ray Train's latest checkpoint if any, then drive the rounds;
    rank 0 alone calls the actors and sends progress."""
    from pipeline.distributed.dllm_policy import rank_zero_rollout
    from pipeline.training.rl_job import RoundCommitter, is_checkpoint_round, read_log
    from pipeline.training.rl_loop import run_rounds

    quiet_worker()
    config = RunConfig.from_dict(loop_config["config"])
    torch.set_num_threads(config.distributed.torch_threads or 1)
    rank, inner = ray.train.get_context().get_world_rank(), learner_dir(config)
    learner = _build_learner(config, loop_config)
    start, lines = 0, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as saved:
            start = learner.load(Path(saved, inner))
            lines = [line for line in read_log(Path(saved, inner)) if line["round"] <= start]
        log.info("RL learner resumed at round %d", start)
    sink: ProgressSink | None = loop_config.get("progress") if rank == 0 else None
    commit = RoundCommitter(config, lambda r, records, text: save_and_report(
        learner, r, records, text, start, inner=inner, rank=rank), lines)

    def on_round(round_number: int, record: dict, line: dict) -> None:
        record[TIME_KEY] = int(time.time() * 1000)
        if sink is not None:
            sink.send(round_number, record["reward_mean"], record["programs_per_second"])
        commit(round_number, record, line)
        if not is_checkpoint_round(round_number, config):
            ray.train.report({**report_metrics(record), "resumed_from_step": start})

    rollout = PoolRollout(loop_config["actors"], config)
    run_rounds(learner, rank_zero_rollout(rollout, rank) if ray.train.get_context()
               .get_world_size() > 1 else rollout, loop_config["tasks"], config, start=start,
               on_round=on_round)


def save_and_report(learner, round_number: int, records: list[dict], log_text: str,
                    resumed_from: int, *, inner: str = "prompt_model", rank: int = 0) -> None:
    """The learner's checkpoint (with the rollout log; each rank its part) and, from rank 0,
    the rounds' records since the last one, reported to Ray Train (MLflowCommit logs the
    records once Ray has persisted it)."""
    from pipeline.training.rl_loop import ROLLOUT_LOG

    with tempfile.TemporaryDirectory() as folder:
        learner.save(Path(folder, inner), round_number, {ROLLOUT_LOG: log_text})
        if rank == 0:
            Path(folder, HISTORY_FILE).write_text("".join(json.dumps(r) + "\n"
                                                          for r in records))
        ray.train.report({**report_metrics(records[-1]), "resumed_from_step": resumed_from},
                         checkpoint=Checkpoint.from_directory(folder))


# ---- on the driver ------------------------------------------------------------------------------
def learner_workers(config: RunConfig) -> int:
    """Ray Train workers of the learner: ``distributed.num_workers`` ZeRO-3 ranks for
    coupled-GRPO, one for DDPT (its update is a few denoiser calls)."""
    return config.distributed.num_workers if config.train.method == "coupled_grpo" else 1


def rl_resources(config: RunConfig) -> dict[str, float]:
    """What an RL run holds at once: the sampler actors and the learner's workers."""
    pool, workers = config.pool, learner_workers(config)
    return {"CPU": pool.num_actors * pool.cpus_per_actor
            + workers * learner_resources(config)["CPU"],
            "GPU": pool.num_actors * pool.gpus_per_actor
            + workers * learner_resources(config).get("GPU", float(learner_gpu(config)))}


def learner_resources(config: RunConfig) -> dict[str, float]:
    """A learner worker's Ray resources: coupled-GRPO's ``distributed.cpus_per_worker`` (and
    ``dllm_rl.learner_gpu_share`` of a GPU with ``distributed.use_gpu``); DDPT's
    ``rl.learner_cpus`` (0 by default) and some of Ray's logical memory, since Ray refuses a
    bundle of zeros (the learner holds the prompt model twice and AdamW's state: a few MB)."""
    if config.train.method == "coupled_grpo":
        gpu = {"GPU": config.dllm_rl.learner_gpu_share} if config.distributed.use_gpu else {}
        return {"CPU": config.distributed.cpus_per_worker, **gpu}
    return {"CPU": config.rl.learner_cpus, "memory": LEARNER_MEMORY}


def learner_gpu(config: RunConfig) -> bool:
    """Coupled-GRPO's ranks take a GPU each with ``distributed.use_gpu`` (NCCL); DDPT's learner
    only to run the LM's auxiliary cross-entropy on one."""
    if config.train.method == "coupled_grpo":
        return config.distributed.use_gpu
    return config.distributed.use_gpu and config.rl.ce_weight > 0


def rl_ray_backend(reward=None, actors: list | None = None):
    """The RL job's Ray backend. ``reward``: another reward than the sandbox's (tests' toys);
    ``actors``: a running pool to use (its actors must hold the same LM; kept running)."""

    def train(request: TrainRequest) -> Path:
        return rl_on_ray(request, reward=reward, actors=actors)

    return train


def rl_on_ray(request: TrainRequest, *, reward=None, actors: list | None = None) -> Path:
    """Screen the tasks on the actor pool, run the learner's rounds on a TorchTrainer, export
    the final prompt model to ``<output>/checkpoint``; raises if the run failed for good."""
    from pipeline.lm.loader import prepare_embedded
    from pipeline.training.rl_job import loop_config, require_tests, reward_name, screened_tasks

    config, output = request.config, request.output
    if reward is None:
        require_tests(config, request.examples)
    start = _start_checkpoint(config)
    storage = prepare_storage(config, output, RUN_NAME, "RL run", resume=request.resume)
    if config.model.name == "embedded":
        prepare_embedded()  # convert once here, not in every actor at the same time
    ensure_ray()
    owned = actors is None
    if owned:
        check_fits(rl_resources(config), f"pool: {config.pool.num_actors} actors x "
                   f"cpus_per_actor {config.pool.cpus_per_actor} + {learner_workers(config)} "
                   f"learner worker(s) x {learner_resources(config)['CPU']} CPUs")
        keep = ray.put(pack_checkpoints({}))  # alive as long as the actors (see start_pool)
        actors = start_pool(pool_config(config), keep, reward=reward)
    try:
        rollout = PoolRollout(actors, config)
        tasks = screened_tasks(config, request.examples, output, rollout.screen,
                               tracker=request.tracker, reward_name=reward_name(reward))
        config = loop_config(config, tasks)
        packed = pack_checkpoints({"start": Path(start)})["start"] if start else None
        with ProgressRelay(enabled=request.progress) as relay:
            sink = relay.sink(f"rl {output.name}", round_plan(config).rounds, label="reward",
                              unit="programs/s")
            result = _fit(config, request, storage, {"config": config.to_dict(), "start": packed,
                                             "tasks": tasks, "actors": actors,
                                             "progress": sink})
    finally:
        if owned:
            for actor in actors:
                ray.kill(actor)
    if result.error:
        raise RuntimeError(f"Ray Train RL run failed: {result.error}") from result.error
    if result.checkpoint is None:
        raise RuntimeError("Ray Train RL run finished without a checkpoint")
    MLflowCommit(request.tracker).log_history(result.checkpoint)  # again: see MLflowCommit
    if config.train.method == "coupled_grpo":
        return export_dream(result.checkpoint, output / CHECKPOINT)
    return export(result.checkpoint, output / CHECKPOINT)


def pool_config(config: RunConfig) -> RunConfig:
    """The sampler actors' configuration: a masked-diffusion LM's batch sampler wants
    ``decoding.strategy=diffusion``; coupled-GRPO's rollouts decode as ``dllm_rl`` says."""
    if config.train.method != "coupled_grpo":
        return config
    return dataclasses.replace(config, decoding=dataclasses.replace(config.decoding,
                                                                    strategy="diffusion"))


def _start_checkpoint(config: RunConfig) -> str | None:
    """DDPT's RL starts from a trained checkpoint (checked now); coupled-GRPO from the LM."""
    from pipeline.training.prompt_rl import check_start_checkpoint

    return None if config.train.method == "coupled_grpo" else \
        check_start_checkpoint(config)["folder"]


def export_dream(checkpoint: Checkpoint, target: Path) -> Path:
    """A coupled-GRPO run's result at ``target`` (atomically): the policy's Dream folder with the
    rollout log and the learner's counts beside it, as the local backend leaves it."""
    from pipeline.distributed.dllm_learner import DREAM_DIR, STATE_FILE
    from pipeline.training.checkpoint import replace_folder
    from pipeline.training.rl_loop import ROLLOUT_LOG

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-new-"))
    try:
        with checkpoint.as_directory() as folder:
            learner = Path(folder) / DLLM_LEARNER_DIR
            shutil.copytree(learner / DREAM_DIR, tmp, dirs_exist_ok=True)
            for name in (ROLLOUT_LOG, STATE_FILE):
                shutil.copy2(learner / name, tmp / name)
        replace_folder(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _fit(config: RunConfig, request: TrainRequest, storage, loop_config: dict
         ) -> ray.train.Result:
    dc = config.distributed
    trainer = TorchTrainer(
        learner_loop, train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=learner_workers(config),
                                     use_gpu=learner_gpu(config),
                                     resources_per_worker=learner_resources(config)),
        run_config=ray.train.RunConfig(
            name=storage.name, storage_path=storage.root,
            failure_config=FailureConfig(max_failures=dc.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=[MLflowCommit(request.tracker)],
            logging_config=ray.train.LoggingConfig(log_level="INFO" if verbose() else "WARNING"),
        ),
    )
    return trainer.fit()
