"""Where a study's work runs: its training jobs (``distributed.backend``) and its sampler pool
(``pool.backend``). Every study takes a :class:`Backends`. :data:`LOCAL` runs both in this
process and refuses a configuration that asks for Ray; the Ray glue's
:data:`pipeline.distributed.backends.CONFIGURED` follows the configuration (the command line's
choice). Studies sit below the Ray glue, so they never import it: it is handed in."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import ConfigError, RunConfig
from pipeline.generation.sampler import LocalPool, SamplerPool
from pipeline.lm.frozen import FrozenCodeLM
from pipeline.training.job import TrainBackend
from pipeline.training.rl_job import local_train_backend

# (a training job's configuration, an LM already loaded to reuse or None) -> its backend
TrainOpener = Callable[[RunConfig, FrozenCodeLM | None], TrainBackend]
# (configuration, prompt model name -> checkpoint folder, LM to reuse or None) -> pool starter
PoolOpener = Callable[[RunConfig, dict[str, Path], FrozenCodeLM | None],
                      Callable[[], SamplerPool]]


@dataclass(frozen=True)
class Backends:
    """``train`` opens a training job's backend, ``pool`` a sampler pool (started lazily: only
    when there is something to generate)."""

    train: TrainOpener
    pool: PoolOpener


def _refuse_ray(config: RunConfig, field: str) -> None:
    section, name = field.split(".")
    if getattr(getattr(config, section), name) == "ray":
        raise ConfigError(f"{field}: 'ray' needs the Ray backends (pipeline.distributed."
                          "backends.CONFIGURED, as ddpt passes); these run in this process: "
                          f"set {field}=local")


def local_train(config: RunConfig, lm: FrozenCodeLM | None = None) -> TrainBackend:
    _refuse_ray(config, "distributed.backend")
    return local_train_backend(config, lm)


def local_pool(config: RunConfig, checkpoints: dict[str, Path], lm: FrozenCodeLM | None = None
               ) -> Callable[[], SamplerPool]:
    _refuse_ray(config, "pool.backend")
    return lambda: LocalPool(config, checkpoints, lm=lm)


LOCAL = Backends(train=local_train, pool=local_pool)
