"""Ray Train's checkpoints of a prompt-model run, never the LM:
    deepspeed/               DeepSpeed's per-rank shards of the prompt model + optimizer
                             (``exclude_frozen_parameters``)
    prompt_model/            the gathered prompt model in the portable checkpoint format
    train_state.json         step and data position (epoch, next batch index)
    buffers.safetensors      the prompt model's buffers (DDPT's target x0_bar, X_ctx, ...)
    history.jsonl            per-step records since the previous checkpoint (with their times)
    dev_losses.json          the last step's only: per-task dev losses (training/dev_losses.py)
Metrics reach MLflow (rank 0's, through :class:`MLflowCommit` on the controller) only once the
checkpoint that covers them is persisted, so a restart after a failure never logs a step twice.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import ray
import ray.train
import torch
from ray.train import Checkpoint

from pipeline.tracking import RunTracker

# ``worker`` below is a pipeline.distributed.train.Worker (not imported: train imports this).
Worker = Any

log = logging.getLogger(__name__)

HISTORY_FILE = "history.jsonl"  # in each checkpoint: the per-step records it covers
TIME_KEY = "time_ms"  # in each record: when rank 0 ran the step (the MLflow timestamp)
BUFFERS_FILE = "buffers.safetensors"


def restore(worker: Worker) -> tuple[int, int, int, list[dict]]:
    """Load Ray Train's latest checkpoint, if any; returns (step, epoch, next batch index) to
    continue from and the checkpoint's step records (logged again: :class:`MLflowCommit`)."""
    from safetensors.torch import load_file

    checkpoint = ray.train.get_checkpoint()
    if not checkpoint:
        return 0, 0, 0, []
    with checkpoint.as_directory() as folder:
        history = read_history(folder)
        worker.engine.load_checkpoint(os.path.join(folder, "deepspeed"), tag="ddpt",
                                      load_module_strict=False)
        state = json.loads(Path(folder, "train_state.json").read_text())
        buffers = load_file(str(Path(folder, BUFFERS_FILE)))
    own = dict(worker.prompt_model.named_buffers())
    with torch.no_grad():
        for name, value in buffers.items():
            own[name].copy_(value.to(own[name].device))
    log.info("rank %d resumed at step %d (epoch %d, batch %d)", worker.rank, state["step"],
             state["epoch"], state["next_index"])
    return state["step"], state["epoch"], state["next_index"], history


def save_and_report(worker: Worker, step: int, position: dict, pending: list[dict],
                    resumed_from: int, *, dev_losses: dict | None = None) -> None:
    """Write the checkpoint (every rank its DeepSpeed shard; rank 0 the portable prompt model,
    the data position, the buffers, the step records and, at the last step, ``dev_losses``:
    the per-task dev losses record) and report it to Ray Train."""
    import deepspeed
    from safetensors.torch import save_file

    from pipeline.training.checkpoint import save_checkpoint
    from pipeline.training.dev_losses import write_dev_losses
    from pipeline.training.loop import plain_record

    prompt_model, records = worker.prompt_model, [plain_record(r) for r in pending]
    with tempfile.TemporaryDirectory() as folder:
        worker.engine.save_checkpoint(os.path.join(folder, "deepspeed"), tag="ddpt",
                                      exclude_frozen_parameters=True)
        with deepspeed.zero.GatheredParameters(list(prompt_model.parameters())):
            if worker.rank == 0:
                save_checkpoint(Path(folder, "prompt_model"), prompt_model, worker.config, step)
        if worker.rank == 0:
            Path(folder, "train_state.json").write_text(json.dumps({"step": step, **position}))
            persistent = prompt_model.state_dict()
            save_file({name: buf.detach().cpu().contiguous()
                       for name, buf in prompt_model.named_buffers() if name in persistent},
                      str(Path(folder, BUFFERS_FILE)))
            # The steps since the last checkpoint; MLflowCommit logs them from here.
            Path(folder, HISTORY_FILE).write_text(
                "".join(json.dumps(item) + "\n" for item in records))
            if dev_losses is not None:
                write_dev_losses(folder, dev_losses)
        ray.train.report({**report_metrics(records[-1]), "resumed_from_step": resumed_from},
                         checkpoint=Checkpoint.from_directory(folder))


def read_history(folder: str | Path) -> list[dict]:
    """The per-step records of a checkpoint folder."""
    return [json.loads(line) for line in Path(folder, HISTORY_FILE).read_text().splitlines()]


def report_metrics(record: dict) -> dict:
    return {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != TIME_KEY}


class MLflowCommit(ray.train.UserCallback):
    """Logs the per-step records of rank 0 to MLflow when Ray has persisted the checkpoint
    that covers them (runs on the Train controller, after *all* workers reported). Steps after
    the last committed checkpoint are re-run after a failure, and only then logged: MLflow sees
    every step exactly once. If the controller (the head node) dies after Ray persisted a
    checkpoint, before its records reached MLflow, the restored run logs them again (with the
    next checkpoint, and the driver after the last), with the same times: MLflow keeps one."""

    def __init__(self, tracker: RunTracker):
        self.tracker = tracker

    def after_report(self, run_context, metrics: list[dict], checkpoint) -> None:
        if checkpoint is None or not metrics:
            return
        if metrics[0].get("resumed_from_step"):
            self.tracker.set_tag("ddpt.resumed_from_step", metrics[0]["resumed_from_step"])
        self.log_history(checkpoint)

    def log_history(self, checkpoint: Checkpoint) -> None:
        """Log the records of ``checkpoint``, each with the time its step ran."""
        with checkpoint.as_directory() as folder:
            records = read_history(folder)
        for record in records:
            metrics = {k: v for k, v in record.items() if k not in ("step", TIME_KEY)}
            self.tracker.log_metrics(metrics, step=record["step"],
                                     timestamp_ms=record.get(TIME_KEY))
