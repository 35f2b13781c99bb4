"""The training job: validate everything cheap, open the MLflow run, train on the backend the
caller hands in (Ray Train + DeepSpeed, or this process), export the checkpoint and log it.
Used by ``ddpt train``, ``jobs/train.py``, ``ddpt run`` and every sweep trial."""
from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import RunConfig, check_fresh_output
from pipeline.data.example import Example
from pipeline.data.splits import dev_examples, train_examples
from pipeline.tracking import (
    RunTracker,
    check_tracking_uri,
    open_run,
    read_run_file,
    resolve_tracking_uri,
)

log = logging.getLogger(__name__)
RUN_FILE = "mlflow_run.json"  # {"uri", "run_id"}: lets --resume continue the same MLflow run
CHECKPOINT = "checkpoint"  # <output>/checkpoint: the exported prompt model


@dataclass
class TrainOutcome:
    checkpoint: Path  # portable prompt-model checkpoint (pipeline.training.checkpoint format)
    run_id: str  # the MLflow run
    tracking_uri: str
    seconds: float


@dataclass
class TrainRequest:
    """What a training backend gets: train ``config`` on ``examples`` into ``output`` (the
    exported checkpoint goes to ``output/checkpoint``), logging per-step metrics to
    ``tracker``; ``dev`` are the held-out examples of ``train.eval_every`` (may be empty)."""

    config: RunConfig
    examples: list[Example]
    output: Path
    tracker: RunTracker
    resume: bool
    progress: bool
    dev: list[Example]


# A backend trains and returns the exported checkpoint folder.
TrainBackend = Callable[[TrainRequest], Path]


def open_tracker(config: RunConfig, output: Path, run_name: str, *, resume: bool,
                 parent_run_id: str | None = None) -> RunTracker:
    """Start the job's MLflow run (a child of ``parent_run_id`` if given), or re-attach to it on
    resume."""
    uri = resolve_tracking_uri(output, config.tracking.uri)
    return open_run(output / RUN_FILE, uri, config.tracking.experiment_name(config), run_name,
                    resume=resume, role="train", output=output, params=config.to_flat(),
                    tags={"ddpt.backend": config.distributed.backend,
                          "ddpt.train_method": config.train.method},
                    parent_run_id=parent_run_id)


def run_training(config: RunConfig, output_dir: str | Path, backend: TrainBackend, *,
                 resume: bool = False, examples: list[Example] | None = None,
                 progress: bool = True, parent_run_id: str | None = None,
                 run_name: str = "train", tracker: RunTracker | None = None) -> TrainOutcome:
    """Train the prompt model on ``backend``; the checkpoint lands in ``<output>/checkpoint``.

    The MLflow run is a child of ``parent_run_id`` when given (a comparison or a sweep).
    ``tracker``: an open MLflow run that the caller owns and ends (a sweep's trial run); by
    default the job opens its own run and ends it FINISHED, or FAILED on an exception.
    """
    output = Path(output_dir).resolve()
    check_fresh_output(output, (CHECKPOINT, "ray", "storage.json"), resume=resume)
    done = _finished(output, config) if resume else None  # checks the checkpoint it resumes
    if done:
        log.info("%s already holds step %d of %d: nothing to train", done.checkpoint,
                 planned_steps(config), planned_steps(config))
        return done
    examples = examples if examples is not None else train_examples(config.data)
    dev = dev_examples(config.data) if config.train.eval_every else []
    if config.is_rl:  # the start checkpoint, before MLflow or any model
        from pipeline.training.prompt_rl import check_start_checkpoint

        check_start_checkpoint(config)
    check_tracking_uri(resolve_tracking_uri(output, config.tracking.uri))
    output.mkdir(parents=True, exist_ok=True)
    config.save(output / "config.yaml")
    began = time.perf_counter()
    owned = tracker is None
    tracker = tracker or open_tracker(config, output, run_name, resume=resume,
                                      parent_run_id=parent_run_id)
    with tracker if owned else nullcontext(tracker):
        checkpoint = backend(TrainRequest(config, examples, output, tracker, resume, progress,
                                          dev))
        _log_checkpoint(tracker, checkpoint, config, output.name)
        tracker.log_artifact(output / "config.yaml")
    return TrainOutcome(checkpoint, tracker.run_id, tracker.uri, time.perf_counter() - began)


def planned_steps(config: RunConfig) -> int:
    """What a finished run's checkpoint counts: optimizer steps, or RL rounds (coupled-GRPO's
    ``dllm_rl.rounds``, 0 when they are one pass over the tasks)."""
    if config.train.method == "coupled_grpo":
        return config.dllm_rl.rounds
    return config.rl.rounds if config.is_rl else config.train.steps


def _log_checkpoint(tracker: RunTracker, checkpoint: Path, config: RunConfig, name: str
                    ) -> None:
    """The trained parameters' count and the checkpoint as MLflow artifacts. A coupled-GRPO
    checkpoint is a whole LM (15 GB for a 7B in bf16, twice that with its optimizer): its
    weights stay in the output folder, named by the ``ddpt.checkpoint`` tag; the small files
    (config.json, the tokenizer, the rollout log, the learner's state) are logged."""
    from pipeline.training.prompt_models import parameter_count

    if config.train.method == "coupled_grpo":
        from pipeline.lm.dream import weight_files

        count = sum(_safetensors_numel(path) for path in weight_files(checkpoint))
        tracker.log_metrics({"policy_parameters": count})
        tracker.set_tag("ddpt.checkpoint", str(checkpoint))
        for path in sorted(checkpoint.iterdir()):
            if path.is_file() and path.stat().st_size < 2**24 and ".safetensors" not in \
                    path.name and path.suffix != ".pt":
                tracker.log_artifact(path, CHECKPOINT)
    else:
        from pipeline.training.checkpoint import load_prompt_model

        count = parameter_count(load_prompt_model(checkpoint)[0])
        tracker.log_metrics({"prompt_model_parameters": count})
        tracker.log_artifacts(checkpoint, CHECKPOINT)
    log.info("%s: %s, %d trained parameters", name, config.train.method, count)


def _safetensors_numel(path: Path) -> int:
    """Elements in a safetensors file, from its header (no tensor is read)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


def resumable_state(output: Path) -> dict | None:
    """The checked state of the checkpoint ``--resume`` continues from in a training job's
    ``output`` (:func:`~pipeline.training.checkpoint.check_checkpoint`: a damaged file fails
    here, by name, before any model is loaded); None when the job wrote none yet."""
    from pipeline.training.checkpoint import check_checkpoint, resolve

    folder = resolve(output / CHECKPOINT)
    return check_checkpoint(folder) if folder.exists() else None


def _finished(output: Path, config: RunConfig) -> TrainOutcome | None:
    """The outcome of an earlier run in ``output`` that already reached ``train.steps``
    (coupled-GRPO's rounds, when they are set: one pass over the tasks re-enters the loop,
    which finds nothing left to do)."""
    if config.train.method == "coupled_grpo":
        saved = output / CHECKPOINT / "learner_state.json"
        done = saved.is_file() and (output / RUN_FILE).is_file() and planned_steps(config) \
            and json.loads(saved.read_text())["rounds"] >= planned_steps(config)
        return _outcome(output) if done else None
    state, run_file = resumable_state(output), output / RUN_FILE
    if state is None or not run_file.is_file() or state["step"] < planned_steps(config):
        return None
    return _outcome(output)


def _outcome(output: Path) -> TrainOutcome:
    saved = read_run_file(output / RUN_FILE)
    return TrainOutcome(output / CHECKPOINT, saved["run_id"], saved["uri"], 0.0)


def local_backend(lm=None) -> TrainBackend:
    """Train in this process (``distributed.backend: local``); ``lm``: a loaded FrozenCodeLM
    to reuse. Metrics reach MLflow once a checkpoint covers their step, as on the Ray path.
    (The RL objectives' local backend: :func:`pipeline.training.rl_job.rl_local_backend`.)"""

    def train(request: TrainRequest) -> Path:
        from pipeline.lm.loader import build_lm
        from pipeline.training.loop import plain_record, train_local

        config, tracker = request.config, request.tracker
        if request.dev:
            log.warning("train.eval_every: the dev loss is computed on the Ray backend only")
        checkpoint = request.output / CHECKPOINT
        pending: list[dict] = []
        every = config.train.checkpoint_every

        def on_step(step: int, record: dict) -> None:
            pending.append(record)
            if step == config.train.steps or (every and step % every == 0):
                for item in map(plain_record, pending):
                    tracker.log_metrics({k: v for k, v in item.items() if k != "step"},
                                        step=item["step"])
                pending.clear()

        train_local(config, lm or build_lm(config), request.examples, checkpoint_dir=checkpoint,
                    resume=request.resume, on_step=on_step, progress=request.progress,
                    progress_name=f"train {request.output.name}")
        return checkpoint

    return train
