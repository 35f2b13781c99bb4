"""Ray glue for batch sampling: a pool of actors, each holding the LM and the prompt models once.

The driver cuts the work into ``(method, batch of examples)`` tasks, keeps one task in flight per
actor, and appends each finished batch to the results store as it arrives (nothing finished is
ever lost). An actor that dies is restarted by Ray (``pool.max_restarts``) and its task retried;
an actor that is gone for good hands its task to the others. A task's records depend only on its
examples (:mod:`pipeline.generation.sampler`), so a retried task returns the same records, and
the driver writes a task's records once, when it first returns: every example appears exactly
once.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
from collections import deque
from collections.abc import Callable
from pathlib import Path

import ray
from ray.exceptions import RayActorError

from pipeline.config import RunConfig
from pipeline.data.example import Example
from pipeline.distributed.session import check_fits, ensure_ray, sampler_actor_resources
from pipeline.generation.progress import MethodProgress
from pipeline.generation.sampler import Task

log = logging.getLogger(__name__)


@ray.remote
class SamplerActor:
    """One :class:`~pipeline.generation.sampler.BatchSampler` per actor, loaded when the actor
    starts. The prompt models come as file contents through Ray's object store
    (:func:`pack_checkpoints`), not as paths: an actor on another node, or one Ray restarts
    there, need not see the driver's disk."""

    def __init__(self, config: dict, checkpoints: dict[str, dict[str, bytes]],
                 torch_threads: int, reward=None):
        import torch

        from pipeline.generation.sampler import BatchSampler

        torch.set_num_threads(torch_threads)
        self.folder = tempfile.TemporaryDirectory(prefix="ddpt-sampler-")  # lives with the actor
        paths = unpack_checkpoints(checkpoints, Path(self.folder.name))
        self.sampler = BatchSampler(RunConfig.from_dict(config), paths)
        self.reward = reward  # RL's reward; None: the sandbox's (pipeline/scoring/rewards.py)
        self.rl_worker, self.rl_key = None, None

    def run(self, method: str, examples: list[Example]) -> list[dict]:
        records = self.sampler.run(method, examples)
        node = ray.get_runtime_context().get_node_id()
        return [{**r, "actor_pid": os.getpid(), "actor_node": node} for r in records]

    # ---- execution-reward RL: this actor is a rollout worker (pipeline/distributed/rl.py) ----
    def rl_rollout(self, config: dict, weights: dict, chunks: list[list[Example]],
                   round_index: int):
        """The learner's weights in, the chunks' rollouts out (time by part, weight loading
        as ``sync_seconds``)."""
        from pipeline.training.rl_job import timed_rollout

        return timed_rollout(self._rl_worker(config), weights, chunks, round_index)

    def rl_screen(self, config: dict, chunks: list[list[Example]]):
        return self._rl_worker(config).screen(chunks)

    def _rl_worker(self, config: dict):
        """The RL run's rollout worker on this actor's LM, built again when another run's
        configuration arrives (a pool may serve several runs, as a sweep's trials)."""
        from pipeline.training.rl_job import rl_policy

        key = json.dumps(config, sort_keys=True, default=str)
        if key != self.rl_key:
            run = RunConfig.from_dict(config)
            if run.model != self.sampler.config.model:
                raise ValueError(f"this actor holds model {self.sampler.config.model}, the RL "
                                 f"run asks for {run.model}")
            self.rl_worker = rl_policy(run).rollout_worker(run, self.sampler.lm, self.reward)
            self.rl_key = key
        return self.rl_worker

    def pid(self) -> int:
        return os.getpid()


def start_pool(config: RunConfig, checkpoints: ray.ObjectRef, *, reward=None) -> list:
    """Start ``pool.num_actors`` actors (Ray queues any that the cluster cannot fit yet).
    ``checkpoints``: :func:`pack_checkpoints`' output put in the object store once, for every
    actor and restart; the caller keeps the reference for as long as the pool lives (Ray
    cannot restart an actor whose constructor arguments went out of scope,
    ray-project/ray#47043). ``reward``: RL's reward for the actors' rollouts (None: the
    sandbox's)."""
    pool = config.pool
    ensure_ray()
    check_fits(sampler_actor_resources(config), f"pool: one actor (cpus_per_actor "
               f"{pool.cpus_per_actor}, gpus_per_actor {pool.gpus_per_actor})")
    cores = os.cpu_count() or 1
    threads = pool.torch_threads or max(1, cores // pool.num_actors)
    options = {"num_cpus": pool.cpus_per_actor, "num_gpus": pool.gpus_per_actor,
               "max_restarts": pool.max_restarts, "max_task_retries": -1,
               "scheduling_strategy": pool.scheduling}
    return [SamplerActor.options(**options).remote(config.to_dict(), checkpoints, threads,
                                                   reward)
            for _ in range(pool.num_actors)]


def pack_checkpoints(checkpoints: dict[str, Path]) -> dict[str, dict[str, bytes]]:
    """``{method: {relative file path: contents}}`` of each prompt model's checkpoint folder
    (a few MB at most: the LM is never in it)."""
    packed = {}
    for name, folder in checkpoints.items():
        folder = Path(folder)
        packed[name] = {str(f.relative_to(folder)): f.read_bytes()
                        for f in sorted(folder.rglob("*")) if f.is_file()}
    return packed


def unpack_checkpoints(packed: dict[str, dict[str, bytes]], target: Path) -> dict[str, str]:
    """Write :func:`pack_checkpoints`' folders under ``target``; returns their paths."""
    paths = {}
    for name, files in packed.items():
        for relative, data in files.items():
            path = target / name / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        paths[name] = str(target / name)
    return paths


def run_pool(actors: list, tasks: list[Task], on_records: Callable[[list[dict]], None], *,
             progress: bool = True) -> None:
    """Run every task on the pool; ``on_records`` gets each task's records once, as it
    finishes. Raises if every actor is gone for good (what finished is already handed over)."""
    queue: deque[Task] = deque(tasks)
    idle = list(actors)
    in_flight: dict = {}  # ObjectRef -> (actor, task)
    lines = MethodProgress(tasks, enabled=progress)
    try:
        while queue or in_flight:
            while queue and idle:
                actor, task = idle.pop(), queue.popleft()
                in_flight[actor.run.remote(*task)] = (actor, task)
            if not in_flight:
                raise RuntimeError(f"every sampler actor died; {len(queue)} batches left")
            [ref], _ = ray.wait(list(in_flight), num_returns=1)
            actor, task = in_flight.pop(ref)
            try:
                records = ray.get(ref)
            except RayActorError as err:
                # Ray already restarted and retried as configured: this actor is gone for good.
                log.warning("sampler actor died for good (%s); its batch goes to another",
                            type(err).__name__)
                queue.appendleft(task)
                continue
            on_records(records)
            lines.done(task[0], len(task[1]))
            idle.append(actor)
    finally:
        lines.close()


class RayPool:
    """The sampler pool on Ray actors (``pool.backend: ray``), for
    :func:`pipeline.studies.comparison.sample_into`."""

    def __init__(self, config: RunConfig, checkpoints: dict[str, Path]):
        ensure_ray()
        self.checkpoints = ray.put(pack_checkpoints(checkpoints))
        self.actors = start_pool(config, self.checkpoints)

    def run(self, tasks: list[Task], on_records: Callable[[list[dict]], None], *,
            progress: bool = True) -> None:
        run_pool(self.actors, tasks, on_records, progress=progress)

    def close(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
