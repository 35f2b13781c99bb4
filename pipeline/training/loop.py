"""Training a prompt model: one step loop shared by the single-process path and the Ray/DeepSpeed
path.

A path supplies a *step function* (forward, backward, optimizer step, target update) and a batch
source; :func:`run_steps` does the rest. Single-process training (:func:`train_local`) is
deterministic given the config: step s always sees the same batch (:func:`batch_indices`) and the
same noise (:func:`step_generator`), so a run resumed at step s continues exactly.
"""
from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipeline.config import RunConfig, TrainConfig
from pipeline.data.example import Example
from pipeline.lm.frozen import Batch, FrozenCodeLM
from pipeline.training.checkpoint import load_optimizer_state, load_prompt_model, save_checkpoint
from pipeline.training.progress import StepProgress
from pipeline.training.prompt_models import (
    PromptLoss,
    build_trainable,
    condition_stats,
    is_conditional,
    set_condition_stats,
)

log = logging.getLogger(__name__)

# One optimizer step on a batch with the step's noise generator; returns the step's statistics
# (0-d tensors: they become floats only when logged).
StepFn = Callable[[Batch, torch.Generator], dict[str, torch.Tensor]]


def batch_indices(num_examples: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Example indices of optimizer step ``step``: a window over an endless stream of seeded
    permutations (epoch e uses ``Random(seed * 100003 + e)``)."""
    out = []
    position = step * batch_size
    while len(out) < batch_size:
        epoch, offset = divmod(position, num_examples)
        order = list(range(num_examples))
        random.Random(seed * 100003 + epoch).shuffle(order)
        take = order[offset : offset + batch_size - len(out)]
        out.extend(take)
        position += len(take)
    return out


def step_generator(seed: int, step: int, rank: int = 0) -> torch.Generator:
    """The noise (t, eps) of a step: a function of (seed, step, rank) only, so resumes repeat it
    and data-parallel ranks draw different noise."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step * 1009 + rank)


def run_steps(step_fn: StepFn, batches: Iterator[Batch], start: int, steps: int, seed: int, *,
              rank: int = 0, on_step: Callable[[int, dict], None] | None = None,
              progress: bool = True, device: torch.device | None = None,
              log_every: int = 10, progress_name: str = "train") -> list[dict]:
    """Run optimizer steps ``start+1 .. steps``; returns one record per step. ``on_step(step,
    record)`` runs after each (logging, checkpoints, Ray reports). Records carry the step's
    statistics (tensors), ``step_seconds`` and ``data_seconds`` (the wait for the batch)."""
    history = []
    line = StepProgress(progress_name, steps, enabled=progress)
    for step in range(start, steps):
        waited = time.perf_counter()
        batch = next(batches)
        if device is not None:
            batch = batch.to(device)
        began = time.perf_counter()
        stats = step_fn(batch, step_generator(seed, step, rank))
        done = time.perf_counter()
        record = {"step": step + 1, **stats, "step_seconds": done - began,
                  "data_seconds": began - waited}
        history.append(record)
        if progress:  # the loss is a sync: now and then
            show = (step + 1) % log_every == 0 or step + 1 in (start + 1, steps)
            line.update(step + 1, float(stats["code_loss"]) if show else None,
                        batch.input_ids.shape[0] / record["step_seconds"])
        if on_step:
            on_step(step + 1, record)
    line.close()
    return history


def plain_record(record: dict) -> dict:
    """A step record with its tensors as Python floats (for JSON and reports)."""
    return {k: v.item() if isinstance(v, torch.Tensor) else v for k, v in record.items()}


def local_step_fn(module: PromptLoss, config: TrainConfig
                  ) -> tuple[StepFn, torch.optim.Optimizer]:
    """Plain AdamW on the prompt model's trainable parameters, in this process."""
    params = [p for p in module.prompt.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.method_lr, weight_decay=config.weight_decay)

    def step(batch: Batch, generator: torch.Generator) -> dict[str, torch.Tensor]:
        loss, output = module(batch, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        optimizer.step()
        module.after_step(output)
        return output.stats

    return step, optimizer


@dataclass
class TrainResult:
    model: torch.nn.Module  # the trained prompt model
    history: list[dict] = field(default_factory=list)  # one record (floats) per step run now
    seconds: float = 0.0
    checkpoint: Path | None = None


def train_local(
    config: RunConfig, lm: FrozenCodeLM, examples: list[Example], *,
    checkpoint_dir: str | Path | None = None, resume: bool = False,
    on_step: Callable[[int, dict], None] | None = None, progress: bool = True,
    progress_name: str = "train",
) -> TrainResult:
    """Train the prompt model (``train.method``) in this process for ``config.train.steps`` steps.

    Saves a checkpoint to ``checkpoint_dir`` every ``train.checkpoint_every`` steps and at the
    end; with ``resume`` it continues from the checkpoint there.
    """
    tc = config.train
    if not examples:
        raise ValueError("no training examples")
    encoded = lm.encode(examples)
    model, objective = build_trainable(lm, config)
    model = model.to(lm.device)
    if is_conditional(model):  # standardise conditions with the training data's statistics
        chunks = (lm.collate(encoded[i:i + tc.batch_size])
                  for i in range(0, len(encoded), tc.batch_size))
        set_condition_stats(model, *condition_stats(lm, chunks))
    module = PromptLoss(model, lm, objective, tc.lm_autocast)
    step_fn, optimizer = local_step_fn(module, tc)
    start = 0
    checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
    if resume and checkpoint_dir and (checkpoint_dir / "state.json").is_file():
        saved, _, state = load_prompt_model(checkpoint_dir, map_location=lm.device)
        model.load_state_dict(saved.state_dict())
        optimizer.load_state_dict(load_optimizer_state(checkpoint_dir))
        start = state["step"]
        log.info("resumed from %s at step %d", checkpoint_dir, start)

    def batches() -> Iterator[Batch]:
        for step in range(start, tc.steps):
            yield lm.collate([encoded[i] for i in batch_indices(len(encoded), tc.batch_size,
                                                                 step, tc.seed)])

    result = TrainResult(model)

    def after(step: int, record: dict) -> None:
        every = tc.checkpoint_every
        if checkpoint_dir and (step == tc.steps or (every and step % every == 0)):
            result.checkpoint = save_checkpoint(checkpoint_dir, model, config, step, optimizer)
        if on_step:  # after the checkpoint: what it reports is already safe
            on_step(step, record)

    began = time.perf_counter()
    model.train()
    history = run_steps(step_fn, batches(), start, tc.steps, tc.seed, on_step=after,
                        progress=progress, device=lm.device, log_every=tc.log_every,
                        progress_name=progress_name)
    result.history = [plain_record(record) for record in history]
    result.seconds = time.perf_counter() - began
    model.eval()
    return result
