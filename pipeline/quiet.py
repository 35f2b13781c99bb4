"""Routine noise off by default: library log chatter, progress bars that are not the project's,
and deprecation warnings raised inside libraries. ``ddpt -v`` (or ``DDPT_VERBOSE=1``) keeps
them all.

What stays: warnings and errors of every library (a failed worker, a bad value) and the
project's own INFO lines. What goes (each seen on ``ddpt run``'s terminal before this): MLflow's
database set-up lines, Ray Data's execution plans and split bars, Ray Train's controller and
worker INFO lines, transformers' weight-loading bars, DeepSpeed's accelerator notice, and the
``torch.distributed.* is deprecated`` FutureWarnings DeepSpeed triggers on every step.
"""
from __future__ import annotations

import logging
import os
import sys
import warnings

VERBOSE_ENV = "DDPT_VERBOSE"
# Read by the libraries when they are imported, in this process and in the processes Ray starts
# from it (they inherit the environment).
QUIET_ENV = {
    "MLFLOW_LOGGING_LEVEL": "WARNING",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # transformers' "Loading weights" bars too
    "TRANSFORMERS_VERBOSITY": "warning",
    "RAY_DATA_LOG_LEVEL": "WARNING",  # Ray Data configures its logger from it on import
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",  # `datasets`' "Generating train split" bars
}
QUIET_LOGGERS = ("mlflow", "alembic", "ray.data", "ray.train", "ray.tune", "DeepSpeed",
                 "transformers", "datasets", "torch.distributed", "filelock", "urllib3")
# (category, message regex) of warnings that say nothing to a user of this project: they come
# from inside DeepSpeed and Ray and would repeat on every step or every run.
ROUTINE_WARNINGS = (
    (FutureWarning, r"`torch\.distributed\.\w+` is deprecated"),
    (DeprecationWarning, r".*exclude_resources` is deprecated"),
    (UserWarning, r".*TypedStorage is deprecated"),
)
# Ray calls this in every worker process it starts (runtime_env worker_process_setup_hook).
WORKER_SETUP_HOOK = "pipeline.quiet.quiet_worker"


def verbose() -> bool:
    """Whether routine noise is wanted (``-v`` sets :data:`VERBOSE_ENV`)."""
    return os.environ.get(VERBOSE_ENV, "").lower() in ("1", "true", "yes")


def quiet_process() -> None:
    """Turn routine noise off in this process (and, through the environment, in the processes
    it starts), unless :func:`verbose`."""
    if verbose():
        return
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    # "Progress bars disabled. To enable, set ...": the project turned them off on purpose
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    for category, message in ROUTINE_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    # Ray's own deprecation category is a FutureWarning subclass defined inside Ray.
    warnings.filterwarnings("ignore", message=r".*is deprecated and will be removed",
                            module=r"ray\.")
    # Imported already (the environment variables above come too late for them)
    if "huggingface_hub" in sys.modules:
        sys.modules["huggingface_hub"].utils.disable_progress_bars()
    if "transformers" in sys.modules:
        sys.modules["transformers"].utils.logging.disable_progress_bar()
    if "datasets" in sys.modules:
        sys.modules["datasets"].utils.logging.disable_progress_bar()


def quiet_worker() -> None:
    """:func:`quiet_process` for a Ray worker process, where Ray Train logs through loggers
    outside ``ray.train`` (named by file path) into the root logger: the root logger goes to
    WARNING, the project's own loggers stay at INFO. Ray Train sets the root logger again when
    a worker joins a run, so the Train worker loop calls this once more."""
    if verbose():
        return
    quiet_process()
    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger("pipeline").setLevel(logging.INFO)
