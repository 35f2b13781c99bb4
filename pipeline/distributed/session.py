"""The Ray session: joining a cluster or starting a local Ray, and checking that what a job
asks for fits the cluster before anything is scheduled (a job that cannot fit would hang)."""
from __future__ import annotations

import logging
import math
import os

import ray
import ray.data

from pipeline.config import ConfigError, RunConfig
from pipeline.quiet import WORKER_SETUP_HOOK, quiet_process, verbose

log = logging.getLogger(__name__)

# Ray Train's defaults suit clusters. On one machine (a laptop, CI) the controller polls its
# workers every 0.2 s instead of 2 s and starts no spot-preemption watcher (one more actor per
# run): measured on 2 cores, a 24-step tiny run took 51 s instead of 68 s.
LOCAL_RAY_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
                 "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


def ensure_ray() -> None:
    """Connect to the cluster in RAY_ADDRESS (as under ``ray job submit``) or start a local one
    (with :data:`LOCAL_RAY_ENV`, unless the environment sets those variables itself)."""
    quiet_ray_data()  # Ray Data's settings live in this process, not in the cluster
    if ray.is_initialized():
        return
    local = os.environ.get("RAY_ADDRESS", "local") == "local"
    if local:
        use_local_ray_env()
    if verbose():
        ray.init(log_to_driver=True)
        return
    quiet_process()
    # Every worker process Ray starts, on every node, runs the same set-up before any task
    # (environment variables, warnings filters, library log levels). Ray merges this with a
    # submitted job's own runtime_env (no env_vars here: Ray refuses one set by both).
    context = ray.init(log_to_driver=True, logging_level=logging.WARNING,
                       runtime_env={"worker_process_setup_hook": WORKER_SETUP_HOOK})
    log.info("Ray: %s (dashboard %s)", "a local instance" if local else "the cluster at "
             f"{os.environ['RAY_ADDRESS']}", context.dashboard_url or "off")


def quiet_ray_data() -> None:
    """No Ray Data progress bars or execution plans on the driver's terminal: the training line
    says what matters (``-v`` keeps them)."""
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = verbose()
    context.print_on_execution_start = verbose()


def use_local_ray_env() -> None:
    """Set :data:`LOCAL_RAY_ENV` where the environment does not; call before a local
    ``ray.init``: the raylet it starts, and so every worker, inherits the variables."""
    for key, value in LOCAL_RAY_ENV.items():
        os.environ.setdefault(key, value)


# ---- resources ---------------------------------------------------------------------------------
def training_resources(config: RunConfig) -> dict[str, float]:
    """What one Ray Train run holds at once: its workers and its tokenizing actor."""
    dc = config.distributed
    return {"CPU": dc.num_workers * dc.cpus_per_worker + dc.data_cpus,
            "GPU": float(dc.num_workers) if dc.use_gpu else 0.0}


def sampler_actor_resources(config: RunConfig) -> dict[str, float]:
    """What one sampler actor holds."""
    return {"CPU": config.pool.cpus_per_actor, "GPU": config.pool.gpus_per_actor}


def how_many_fit(need: dict[str, float], cluster: dict[str, float]) -> int:
    """How many copies of ``need`` the ``cluster``'s resources hold at once."""
    return min((math.floor(cluster.get(name, 0.0) / amount + 1e-9)
                for name, amount in need.items() if amount > 0), default=1 << 30)


def check_fits(need: dict[str, float], what: str,
               cluster: dict[str, float] | None = None) -> None:
    """Fail now, naming the settings, unless one ``need`` fits the (current) Ray cluster."""
    cluster = cluster if cluster is not None else ray.cluster_resources()
    if how_many_fit(need, cluster) < 1:
        have = {name: cluster.get(name, 0.0) for name in need}
        raise ConfigError(f"{what} needs {_round(need)}, but the Ray cluster has {_round(have)}")


def _round(resources: dict[str, float]) -> dict[str, float]:
    return {name: round(amount, 3) for name, amount in resources.items() if amount}
