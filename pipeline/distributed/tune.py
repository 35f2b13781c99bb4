"""Ray Tune glue: a sweep whose trials are Ray Train runs, early-stopped by ASHA on the dev loss.

The Ray 2.60 (Train V2) pattern: a Tune *function trainable* (:func:`run_trial`) launches one
``TorchTrainer`` per trial through the ordinary training job
(:func:`pipeline.training.job.run_training`), whose ``TuneReportCallback`` forwards each
``ray.train.report`` to Tune. The trainable itself holds no CPU: a trial's Train workers and
tokenizer actor do, so ``max_concurrent_trials`` (from the cluster's resources unless set) keeps
trials from starving each other.

MLflow: one parent run for the sweep, one child run per trial (``mlflow.parentRunId``) with the
trial's configuration as params and its per-step metrics, ``dev_loss`` included (logged exactly
once, by :class:`~pipeline.distributed.checkpoints.MLflowCommit`). Only the driver ends child
runs, as Tune saw each trial end (:class:`TrialRuns`, :func:`end_trial_run`).

The output folder::

    sweep.json          the parent run's pointer ({"uri", "run_id", "experiment"}): ``--resume``
                        re-attaches to it
    space.yaml          the space file as given; base_config.yaml: the base configuration
    tune/               Tune's experiment state (``Tuner.restore`` resumes from it)
    asha_state.pkl      ASHA's rungs (Tune does not save a scheduler's state)
    trials/<trial_id>/  each trial's training output (config.yaml, checkpoint/, ray/,
                        mlflow_run.json; dev_losses.json: its last step's per-task dev losses)
    best_config.yaml    the best trial's configuration, for ``ddpt train --config``
    trials.json         one summary per trial (``vs_best``: its dev loss minus the best
                        trial's, paired over the dev tasks, with a 95% interval and p)
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from mlflow import MlflowClient
from ray import tune
from ray.tune.search.basic_variant import BasicVariantGenerator

from pipeline.config import ConfigError, RunConfig, check_fresh_output
from pipeline.data.loaders import DATASETS
from pipeline.data.splits import dev_examples, train_examples
from pipeline.distributed.asha import SweepASHA
from pipeline.distributed.progress import ProgressRelay, ProgressSink
from pipeline.distributed.session import ensure_ray, how_many_fit, training_resources
from pipeline.distributed.storage import (
    RunStorage,
    prepare_storage,
)
from pipeline.distributed.train import ray_backend
from pipeline.quiet import verbose
from pipeline.studies.sweep import (
    Sweep,
    TrialSummary,
    compare_to_best,
    load_sweep,
    pick_best,
    trial_status,
)
from pipeline.tracking import (
    MAX_ERROR_CHARS,
    ROLE_TAG,
    RunTracker,
    check_tracking_uri,
    open_run,
    read_run_file,
    resolve_tracking_uri,
)
from pipeline.training.dev_losses import read_dev_losses
from pipeline.training.job import RUN_FILE, open_tracker, run_training

log = logging.getLogger(__name__)

SWEEP_FILE = "sweep.json"
SPACE_COPY = "space.yaml"
BASE_COPY = "base_config.yaml"
BEST_FILE = "best_config.yaml"
SUMMARY_FILE = "trials.json"
TRIALS_DIR = "trials"
TUNE_NAME = "tune"
ASHA_STATE = "asha_state.pkl"
# Tune needs some resource per trial: one byte of memory keeps the trainable off the CPUs that
# the trial's Train run reserves, so `concurrency` fits trials exactly.
TRAINABLE_RESOURCES = {"memory": 1}


@dataclass
class TrialSetup:
    """What every trial needs from the driver (pickled into the trainable)."""

    sweep: Sweep
    output: Path
    tracking_uri: str
    experiment: str
    parent_run_id: str
    progress: Any = None  # the driver's Ray queue of training lines (ProgressRelay), or None

    def trial_dir(self, trial_id: str) -> Path:
        return self.output / TRIALS_DIR / trial_id


@dataclass
class SweepOutcome:
    sweep: Sweep
    output: Path
    tracking_uri: str
    parent_run_id: str
    trials: list[TrialSummary]
    best: TrialSummary | None
    best_config: Path | None  # <output>/best_config.yaml
    seconds: float


# ---- one trial, in its Tune actor --------------------------------------------------------------
def run_trial(params: dict[str, Any], setup: TrialSetup,
              dataset: ray.data.Dataset | None = None) -> None:
    """The Tune function trainable: the training job for one sampled configuration, under the
    sweep's parent MLflow run. A bad configuration or a crash fails the trial; a restarted trial
    continues its Train run. ``dataset``: the training data tokenized once for every trial
    (None: the trial tokenizes).

    The trial logs into its child run but never ends it: the driver does (:class:`TrialRuns`),
    because only the driver knows why a trial ended. A trial that ASHA stops dies with whatever
    its teardown raises (``SystemExit`` from ``tune.report``, ``ActorDiedError`` when its Train
    controller goes first), which must not mark the run FAILED."""
    from ray.tune.integration.ray_train import TuneReportCallback

    trial_id = tune.get_context().get_trial_id()
    folder = setup.trial_dir(trial_id)
    folder.mkdir(parents=True, exist_ok=True)
    config, problem = None, None
    try:
        config = setup.sweep.runtime_config(params, setup.tracking_uri, setup.experiment)
    except ConfigError as err:  # e.g. a sampled combination RunConfig rejects
        problem = err
    tracker = _trial_run(setup, folder, trial_id, params, config)
    if problem is not None:
        raise problem
    steps = config.train.steps
    if _trained_steps(folder) >= steps:  # finished before the driver died: report it again
        metrics = tracker.client.get_run(tracker.run_id).data.metrics
        tune.report({**metrics, "step": steps})
        return
    sink = ProgressSink(setup.progress, trial_id, steps) if setup.progress is not None else None
    run_training(config, folder, ray_backend([TuneReportCallback()], dataset, sink),
                 resume=True, progress=False, run_name=trial_id, tracker=tracker)


def _trial_run(setup: TrialSetup, folder: Path, trial_id: str, params: dict[str, Any],
               config: RunConfig | None) -> RunTracker:
    """The trial's child run: started once (its id kept in the trial folder), re-attached when
    Tune restarts the trial. Without a valid config the sampled values are its params."""
    if config is not None:  # re-attaches when the trial folder names a run already
        tracker = open_tracker(config, folder, resume=True, run_name=trial_id,
                               parent_run_id=setup.parent_run_id)
    else:
        tracker = _open_bare_run(setup, trial_id, params)
    tracker.set_tag(ROLE_TAG, "trial")
    tracker.set_tag("ddpt.trial_id", trial_id)
    return tracker


def _open_bare_run(setup: TrialSetup, trial_id: str, params: dict[str, Any]) -> RunTracker:
    """The child run of a trial without a valid configuration: its params are the sampled
    values. Re-attached if the trial folder names one already."""
    folder = setup.trial_dir(trial_id)
    return open_run(folder / RUN_FILE, setup.tracking_uri, setup.experiment, trial_id,
                    resume=True, role="trial", output=folder, params=params,
                    parent_run_id=setup.parent_run_id)


def _trained_steps(folder: Path) -> int:
    state = folder / "checkpoint" / "state.json"
    return json.loads(state.read_text())["step"] if state.is_file() else 0


# ---- on the driver -----------------------------------------------------------------------------
class TrialRuns(tune.Callback):
    """Ends each trial's MLflow child run from the driver, the only place that knows how the
    trial ended: FINISHED (tagged ``ddpt.trial_status``: completed or stopped_early) or FAILED
    with the error. A trial that failed before its run began gets one here."""

    def __init__(self, setup: TrialSetup):
        self._trials = setup  # not `self.setup`: tune.Callback.setup is a hook

    def on_trial_complete(self, iteration: int, trials: list, trial, **info: Any) -> None:
        end_trial_run(self._trials, trial.trial_id, trial.config,
                      (trial.last_result or {}).get("step"), error=None)

    def on_trial_error(self, iteration: int, trials: list, trial, **info: Any) -> None:
        end_trial_run(self._trials, trial.trial_id, trial.config,
                      (trial.last_result or {}).get("step"), error=_error_text(trial))


def end_trial_run(setup: TrialSetup, trial_id: str, params: dict[str, Any], step: int | None,
                  error: str | None) -> None:
    """Tag the trial's child run with its outcome and end it (idempotent: the driver calls it
    when Tune reports the trial and again once the sweep is over)."""
    status = trial_status(setup.sweep, params, step, failed=error is not None)
    try:
        run_file = setup.trial_dir(trial_id) / RUN_FILE
        if run_file.is_file():
            run_id = read_run_file(run_file)["run_id"]
        else:  # failed before its run began
            run_id = _open_bare_run(setup, trial_id, params).run_id
        client = MlflowClient(tracking_uri=setup.tracking_uri)
        run = client.get_run(run_id)
        client.set_tag(run_id, "ddpt.trial_id", trial_id)
        client.set_tag(run_id, "ddpt.trial_status", status)
        if error and "error" not in run.data.tags:
            client.set_tag(run_id, "error", error)
        final = "FAILED" if error else "FINISHED"
        if run.info.status != final:
            client.set_terminated(run_id, final)
    except Exception:
        log.exception("could not close the MLflow run of trial %s", trial_id)


def _error_text(trial) -> str:
    """``Type: message`` of the trial's error (the cause inside Ray's wrapper). Read from the
    driver's own copy of the error files: when Tune calls ``on_trial_error`` it has written them
    there but not yet synced them to the trial's storage, where ``Trial.get_pickled_error``
    looks."""
    pickled, text = trial.pickled_error_file, trial.error_file
    if pickled and os.path.isfile(pickled):
        try:
            with open(pickled, "rb") as f:
                return _describe(ray.cloudpickle.load(f))
        except Exception:
            pass
    if text and os.path.isfile(text):
        return Path(text).read_text()[-MAX_ERROR_CHARS:]
    return "unknown error"


def _describe(err: BaseException) -> str:
    cause = getattr(err, "cause", None) or err
    return f"{type(cause).__name__}: {cause}"[:MAX_ERROR_CHARS]


def concurrency(sweep: Sweep, cluster: dict[str, float]) -> int:
    """How many trials run at once: ``max_concurrent_trials``, else as many as the cluster's
    CPUs (and GPUs) hold, from the base configuration's per-trial resources."""
    need = training_resources(sweep.base)
    fits = how_many_fit(need, cluster)
    if fits < 1:
        raise ConfigError(f"a trial needs {need} (distributed.num_workers x cpus_per_worker + "
                          f"data_cpus), but the Ray cluster has {cluster}")
    return sweep.max_concurrent_trials or fits


def _param_space(sweep: Sweep) -> dict[str, Any]:
    make = {"choice": lambda v: tune.choice(list(v)),
            "grid": lambda v: tune.grid_search(list(v)),
            "uniform": lambda v: tune.uniform(*v),
            "loguniform": lambda v: tune.loguniform(*v),
            "randint": lambda v: tune.randint(v[0], v[1] + 1)}  # the file's high is included
    return {key: make[d.kind](d.values) for key, d in sweep.space.items()}


def _shared_dataset(sweep: Sweep) -> ray.data.Dataset | None:
    """The training data tokenized once for all trials, when no trial changes what tokenizing
    depends on (model, prompt, data); else None and each trial tokenizes its own."""
    from pipeline.distributed.data import tokenized_dataset

    base = sweep.base
    if not base.distributed.cache_tokenized or any(
            key.startswith(("model.", "prompt.", "data.")) for key in sweep.space):
        return None
    return tokenized_dataset(train_examples(base.data), base)


def _trial_dirname(trial) -> str:
    return trial.trial_id


def _absolute_paths(sweep: Sweep) -> Sweep:
    """Trials run in their own working folders: make the base's relative paths absolute."""
    data = sweep.base.data
    if data.data_dir and not Path(data.data_dir).is_absolute():
        data.data_dir = str(Path(data.data_dir).resolve())
    if data.dataset not in DATASETS and Path(data.dataset).exists():  # a user file or folder
        data.dataset = str(Path(data.dataset).resolve())
    dc = sweep.base.distributed
    if dc.deepspeed_config and Path(dc.deepspeed_config).exists():
        dc.deepspeed_config = str(Path(dc.deepspeed_config).resolve())
    return sweep


def run_sweep(sweep: Sweep | None, output_dir: str | Path, *, resume: bool = False,
              progress: bool = True) -> SweepOutcome:
    """Run (or, with ``resume``, continue) a sweep into ``output_dir``; blocks until every trial
    has finished, failed or been stopped. On resume the space and base configuration saved in
    the output folder are used, finished trials are kept and unfinished ones continue."""
    output = Path(output_dir).resolve()
    state_file = output / SWEEP_FILE
    if resume:
        if not state_file.is_file():
            raise ConfigError(f"{output}: no sweep to resume ({SWEEP_FILE} is missing)")
        sweep = load_sweep(output / SPACE_COPY, preset="main",
                           config_file=str(output / BASE_COPY))
    else:
        check_fresh_output(output, (SWEEP_FILE, TUNE_NAME), "sweep", resume=resume)
    if sweep is None:
        raise ValueError("run_sweep needs a sweep unless it resumes one")
    sweep = _absolute_paths(sweep)
    output.mkdir(parents=True, exist_ok=True)
    train_examples(sweep.base.data)  # data problems (a missing dev split) fail before any work
    dev_examples(sweep.base.data)
    began = time.perf_counter()

    if resume:
        saved = read_run_file(state_file)
        uri, experiment = saved["uri"], saved["experiment"]
        parent = RunTracker.resume(uri, saved["run_id"])
    else:
        uri = resolve_tracking_uri(output, sweep.base.tracking.uri)
        check_tracking_uri(uri)
        experiment = sweep.base.tracking.experiment_name(sweep.base)
        shutil.copyfile(sweep.source, output / SPACE_COPY)
        sweep.base.save(output / BASE_COPY)
        parent = open_run(state_file, uri, experiment, f"sweep {output.name}", resume=False,
                          role="sweep", output=output,
                          params={**sweep.settings(), **sweep.base.to_flat()},
                          note={"experiment": experiment})
        parent.log_artifact(output / SPACE_COPY)
    with parent:
        setup = TrialSetup(sweep, output, uri, experiment, parent.run_id)
        trials = _tune(setup, resume=resume, progress=progress)
        best = pick_best(sweep, trials)
        compare_to_best(trials, best, lambda t: read_dev_losses(setup.trial_dir(t.trial_id)))
        best_file = _record(parent, setup, trials, best)
    return SweepOutcome(sweep, output, uri, parent.run_id, trials, best, best_file,
                        time.perf_counter() - began)


def _tune(setup: TrialSetup, *, resume: bool, progress: bool) -> list[TrialSummary]:
    from pipeline.lm.loader import prepare_embedded

    sweep = setup.sweep
    if sweep.base.model.name == "embedded":
        prepare_embedded()  # convert once here, not in every trial at the same time
    # Save Tune's state often: a trial that ends just before the driver dies is then not re-run.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")
    storage = prepare_storage(sweep.base, setup.output, TUNE_NAME, "sweep", resume=resume,
                              default_root=setup.output)
    ensure_ray()
    parallel = concurrency(sweep, ray.cluster_resources())
    log.info("sweep: %d sample(s) of %s, %d trial(s) at a time", sweep.num_samples,
             list(sweep.space), parallel)
    with ProgressRelay(enabled=progress) as relay:  # a live line per trial
        setup = dataclasses.replace(setup, progress=relay.queue)
        grid = _fit(setup, storage, parallel, resume=resume, progress=progress)
    trials = []
    for result in grid:
        trial_id = Path(result.path).name
        metrics = result.metrics or {}
        step, value = metrics.get("step"), metrics.get(sweep.metric)
        error = _describe(result.error) if result.error is not None else None
        # Again, now that every trial is over: a run left open (the driver died between a
        # trial's end and its callback, before a --resume) ends as Tune saw the trial end.
        end_trial_run(setup, trial_id, result.config or {}, step, error)
        run_file = setup.trial_dir(trial_id) / RUN_FILE
        trials.append(TrialSummary(
            trial_id=trial_id, params=dict(result.config or {}),
            status=trial_status(sweep, result.config or {}, step, failed=error is not None),
            step=step, metric=float(value) if value is not None else None, error=error,
            run_id=read_run_file(run_file)["run_id"] if run_file.is_file() else None))
    return sorted(trials, key=lambda t: t.trial_id)


def _fit(setup: TrialSetup, storage: RunStorage, parallel: int, *, resume: bool,
         progress: bool):
    """Build (or restore) the Tuner and run it; returns its ResultGrid."""
    sweep = setup.sweep
    # The trainable holds no CPU: the trial's Train workers and tokenizer actor hold its CPUs.
    # It runs on the driver's node, where the sweep's output folder is (trials write their
    # config, exported checkpoint and run pointer there); its Train run's controller follows
    # it there, and the workers go wherever the cluster has room.
    here = {f"node:{ray.util.get_node_ip_address()}": 0.001}
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, setup=setup, dataset=_shared_dataset(sweep)),
        {**TRAINABLE_RESOURCES, **here})
    if resume and tune.Tuner.can_restore(storage.location):
        tuner = tune.Tuner.restore(storage.location, trainable=trainable, resume_unfinished=True,
                                   resume_errored=False, restart_errored=False)
    else:
        scheduler = SweepASHA(
            final_step=sweep.base.train.steps, state_file=str(setup.output / ASHA_STATE),
            time_attr="step", metric=sweep.metric,
            mode=sweep.mode, max_t=sweep.asha.max_t, grace_period=sweep.asha.grace_period,
            reduction_factor=sweep.asha.reduction_factor)
        tuner = tune.Tuner(
            trainable, param_space=_param_space(sweep),
            tune_config=tune.TuneConfig(
                num_samples=sweep.num_samples, scheduler=scheduler,
                # The concurrency limit goes here: Tune ignores max_concurrent_trials when it is
                # given a generator.
                search_alg=BasicVariantGenerator(random_state=sweep.seed, max_concurrent=parallel),
                trial_dirname_creator=_trial_dirname, reuse_actors=False),
            run_config=tune.RunConfig(
                name=storage.name, storage_path=storage.root,
                verbose=1 if progress and verbose() else 0,  # else: the lines per trial
                failure_config=tune.FailureConfig(max_failures=0),
                callbacks=[TrialRuns(setup)]),
        )
    return tuner.fit()


def _record(parent: RunTracker, setup: TrialSetup, trials: list[TrialSummary],
            best: TrialSummary | None) -> Path | None:
    """Summary, best configuration (file, tag, artifact) and counts on the parent run."""
    sweep, output = setup.sweep, setup.output
    (output / SUMMARY_FILE).write_text(json.dumps([t.record() for t in trials], indent=2) + "\n")
    parent.log_artifact(output / SUMMARY_FILE)
    counts = {status: sum(t.status == status for t in trials)
              for status in ("completed", "stopped_early", "failed", "unfinished")}
    parent.log_metrics({f"trials_{k}": v for k, v in counts.items()})
    if best is None:
        parent.set_tag("ddpt.best_trial", "none")
        return None
    best_file = output / BEST_FILE
    config = sweep.trial_config(best.params)
    config.save(best_file)
    parent.log_artifact(best_file)
    parent.set_tag("ddpt.best_config", best_file.read_text())
    parent.set_tag("ddpt.best_trial", best.trial_id)
    parent.set_tag("ddpt.best_run_id", best.run_id or "")
    parent.set_tag("ddpt.best_params", json.dumps(best.params, sort_keys=True))
    if best.metric is not None and math.isfinite(best.metric):
        parent.log_metrics({f"best_{sweep.metric}": best.metric})
    return best_file
