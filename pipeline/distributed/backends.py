"""The backends the configuration names, for the studies (:mod:`pipeline.studies.backends`):
Ray Train + DeepSpeed ZeRO-3 or this process for training (``distributed.backend``), sampler
actors on Ray or one sampler in this process (``pool.backend``). Ray's modules are imported only
when they are used, so a run in this process never starts Ray."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from pipeline.config import RunConfig
from pipeline.generation.sampler import LocalPool, SamplerPool
from pipeline.lm.frozen import FrozenCodeLM
from pipeline.studies.backends import Backends
from pipeline.training.job import TrainBackend
from pipeline.training.rl_job import local_train_backend


def train_backend(config: RunConfig, lm: FrozenCodeLM | None = None) -> TrainBackend:
    """``distributed.backend``: Ray Train + DeepSpeed ZeRO-3, or this process (reusing ``lm``);
    for the RL objectives, the sampler actors and a Ray Train learner
    (:mod:`pipeline.distributed.rl`), or this process."""
    if config.distributed.backend == "ray" and config.runs_rounds:
        from pipeline.distributed.rl import rl_ray_backend

        return rl_ray_backend()
    if config.distributed.backend == "ray":
        from pipeline.distributed.train import ray_backend

        return ray_backend()
    return local_train_backend(config, lm)


def pool_opener(config: RunConfig, checkpoints: dict[str, Path],
                lm: FrozenCodeLM | None = None) -> Callable[[], SamplerPool]:
    """``pool.backend``: sampler actors on Ray, or one sampler in this process."""
    if config.pool.backend == "ray":
        from pipeline.distributed.sampler_pool import RayPool

        return lambda: RayPool(config, checkpoints)
    return lambda: LocalPool(config, checkpoints, lm=lm)


CONFIGURED = Backends(train=train_backend, pool=pool_opener)
