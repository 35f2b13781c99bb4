"""The training job: validate everything cheap, open the MLflow run, train (on Ray by default),
export the checkpoint and log it. Used by ``ddpt train``, ``jobs/train.py`` and ``ddpt run``."""
from __future__ import annotations

import json
import logging
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import ConfigError, RunConfig
from pipeline.data.example import Example
from pipeline.data.loaders import DataError, load_examples
from pipeline.tracking import RunTracker, check_tracking_uri, resolve_tracking_uri

log = logging.getLogger(__name__)
RUN_FILE = "mlflow_run.json"  # {"uri", "run_id"}: lets --resume continue the same MLflow run


@dataclass
class TrainOutcome:
    checkpoint: Path  # portable prompt-model checkpoint (pipeline.training.checkpoint format)
    run_id: str  # the MLflow run
    tracking_uri: str
    seconds: float


def load_train_examples(config: RunConfig) -> list[Example]:
    dc = config.data
    return load_examples(dc.dataset, dc.train_split, dc.data_dir, dc.max_train_examples or None)


def load_dev_examples(config: RunConfig) -> list[Example]:
    """The first ``data.max_dev_examples`` of ``data.dev_split``: the held-out set of the dev
    loss (``train.eval_every``, sweeps). A missing split fails here, before any training."""
    dc = config.data
    try:
        examples = load_examples(dc.dataset, dc.dev_split, dc.data_dir,
                                 dc.max_dev_examples or None)
    except DataError as err:
        raise DataError(f"data.dev_split={dc.dev_split!r}: {err}; set data.dev_split to "
                        "another split") from err
    if not examples:
        raise DataError(f"data.dev_split={dc.dev_split!r}: the split of {dc.dataset} is empty")
    return examples


def open_tracker(config: RunConfig, output: Path, resume: bool, run_name: str,
                 parent_run_id: str | None = None) -> RunTracker:
    """Start the job's MLflow run (a child of ``parent_run_id`` if given), or re-attach to it on
    resume."""
    run_file = output / RUN_FILE
    if resume and run_file.is_file():
        saved = json.loads(run_file.read_text())
        return RunTracker.resume(saved["uri"], saved["run_id"])
    uri = resolve_tracking_uri(output, config.tracking.uri)
    tracker = RunTracker.start(uri, config.tracking.experiment_name(config), run_name,
                               params=config.to_flat(),
                               tags={"ddpt.backend": config.distributed.backend,
                                     "ddpt.output": str(output), "ddpt.role": "train",
                                     "ddpt.train_method": config.train.method},
                               parent_run_id=parent_run_id)
    run_file.write_text(json.dumps({"uri": uri, "run_id": tracker.run_id}) + "\n")
    return tracker


def check_output(output: Path, resume: bool) -> None:
    if resume or not output.exists():
        return
    if (output / "checkpoint").exists() or (output / "ray").exists():
        raise ConfigError(f"{output} holds an earlier run: pass --resume to continue it, or "
                          "choose another --output")


def run_training(config: RunConfig, output_dir: str | Path, resume: bool = False,
                 examples: list[Example] | None = None, progress: bool = True,
                 lm=None, parent_run_id: str | None = None, run_name: str = "train",
                 callbacks: list | None = None, dataset=None,
                 tracker: RunTracker | None = None) -> TrainOutcome:
    """Train the prompt model; the checkpoint lands in ``<output>/checkpoint``.

    ``distributed.backend='ray'`` trains on a Ray TorchTrainer with DeepSpeed ZeRO-3;
    ``'local'`` trains in this process (``lm`` may be passed to reuse a loaded model). The
    MLflow run is a child of ``parent_run_id`` when given (a comparison or a sweep).
    ``callbacks`` are extra Ray Train ``UserCallback`` s (a sweep's report to Tune); ``dataset``
    is ``examples`` already tokenized as a Ray Dataset (a sweep tokenizes once for its trials).
    ``tracker``: an open MLflow run that the caller owns and ends (a sweep's trial run); by
    default the job opens its own run and ends it FINISHED, or FAILED on an exception.
    """
    output = Path(output_dir).resolve()
    check_output(output, resume)
    done = _finished(output, config) if resume else None
    if done:
        log.info("%s already holds step %d of %d: nothing to train", done.checkpoint,
                 config.train.steps, config.train.steps)
        return done
    examples = examples if examples is not None else load_train_examples(config)
    dev = load_dev_examples(config) if config.train.eval_every else []
    if dev and config.distributed.backend != "ray":
        log.warning("train.eval_every: the dev loss is computed on the Ray backend only")
    check_tracking_uri(resolve_tracking_uri(output, config.tracking.uri))
    output.mkdir(parents=True, exist_ok=True)
    config.save(output / "config.yaml")
    began = time.perf_counter()
    owned = tracker is None
    tracker = tracker or open_tracker(config, output, resume, run_name, parent_run_id)
    with tracker if owned else nullcontext(tracker):
        if config.distributed.backend == "ray":
            from pipeline.distributed.train import train_on_ray  # Ray only where it is used

            checkpoint = train_on_ray(config, examples, output, tracker, resume, progress,
                                      dev_examples=dev, callbacks=callbacks, dataset=dataset)
        else:
            checkpoint = _train_local(config, examples, output, tracker, resume, progress, lm)
        tracker.log_artifacts(checkpoint, "checkpoint")
        tracker.log_artifact(output / "config.yaml")
    return TrainOutcome(checkpoint, tracker.run_id, tracker.uri, time.perf_counter() - began)


def _finished(output: Path, config: RunConfig) -> TrainOutcome | None:
    """The outcome of an earlier run in ``output`` that already reached ``train.steps``."""
    state, run_file = output / "checkpoint" / "state.json", output / RUN_FILE
    if not (state.is_file() and run_file.is_file()):
        return None
    if json.loads(state.read_text())["step"] < config.train.steps:
        return None
    saved = json.loads(run_file.read_text())
    return TrainOutcome(output / "checkpoint", saved["run_id"], saved["uri"], 0.0)


def _train_local(config, examples, output, tracker, resume, progress, lm) -> Path:
    from pipeline.lm.loader import build_lm
    from pipeline.training.loop import train_ddpt

    lm = lm or build_lm(config)
    checkpoint = output / "checkpoint"
    pending: list[dict] = []
    every = config.train.checkpoint_every

    def on_step(step: int, record: dict) -> None:
        # Like the Ray path: metrics reach MLflow once a checkpoint covers their step.
        pending.append(record)
        if step == config.train.steps or (every and step % every == 0):
            for item in pending:
                tracker.log_metrics({k: v for k, v in item.items() if k != "step"},
                                    step=item["step"])
            pending.clear()

    train_ddpt(config, lm, examples, checkpoint_dir=checkpoint, resume=resume, on_step=on_step,
               progress=progress)
    return checkpoint
