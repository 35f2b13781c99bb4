"""What every command shares: the configuration from the command line, the MLflow store, and
the backends the configuration asks for (the Ray glue is imported only when it is used)."""
from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from pathlib import Path

from pipeline.config import RunConfig, build_config, merge_file
from pipeline.evaluation.sampler import LocalPool, SamplerPool
from pipeline.tracking import check_tracking_uri, resolve_tracking_uri
from pipeline.training.job import TrainBackend, local_backend


def overrides(args: argparse.Namespace) -> list[str]:
    """``--set`` overrides, with ``--data-dir`` as one more."""
    items = list(args.overrides)
    if getattr(args, "data_dir", None):
        items.append(f"data.data_dir={args.data_dir}")
    return items


def config_from_args(args: argparse.Namespace, extra: list[str] | None = None) -> RunConfig:
    """Preset, then --config, then --set (and ``extra`` overrides after them)."""
    return build_config(args.preset or "main", args.config,
                        [*overrides(args), *(extra or [])])


def config_on(base: RunConfig, args: argparse.Namespace) -> RunConfig:
    """``base``, then --config, then --set."""
    if args.config:
        base = merge_file(base, args.config)
    return base.with_overrides(overrides(args))


def with_tracking_uri(config: RunConfig, output: Path) -> RunConfig:
    """Pin the resolved MLflow URI, so that every job of the run (training jobs in their own
    folders included) logs into the same store; a bad URI fails here, before any work."""
    uri = resolve_tracking_uri(output, config.tracking.uri)
    check_tracking_uri(uri)
    return dataclasses.replace(config, tracking=dataclasses.replace(config.tracking, uri=uri))


def train_backend(config: RunConfig, lm=None) -> TrainBackend:
    """``distributed.backend``: Ray Train + DeepSpeed ZeRO-3, or this process (reusing ``lm``)."""
    if config.distributed.backend == "ray":
        from pipeline.distributed.train import ray_backend

        return ray_backend()
    return local_backend(lm)


def pool_opener(config: RunConfig, checkpoints: dict[str, Path], lm=None
                ) -> Callable[[], SamplerPool]:
    """``pool.backend``: sampler actors on Ray, or one sampler in this process."""
    if config.pool.backend == "ray":
        from pipeline.distributed.sampler_pool import RayPool

        return lambda: RayPool(config, checkpoints)
    return lambda: LocalPool(config, checkpoints, lm=lm)
