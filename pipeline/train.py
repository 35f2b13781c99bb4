"""Single-process DDPT training: the core loop that the Ray Train glue wraps.

Deterministic given the config: step s always sees the same batch (a seeded stream of
permutations, see :func:`batch_indices`) and the same noise (a generator seeded by (seed, s)), so
a run resumed from a checkpoint at step s continues exactly where it stopped.
"""
from __future__ import annotations

import logging
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from pipeline.checkpoint import load_optimizer_state, load_prompt_model, save_checkpoint
from pipeline.config import RunConfig
from pipeline.data.example import Example
from pipeline.ddpt import OBJECTIVES, DiffusionPrompt, build_prompt_model
from pipeline.frozen_lm import FrozenCodeLM
from pipeline.template import EncodedExample

log = logging.getLogger(__name__)


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


@dataclass
class TrainResult:
    model: DiffusionPrompt
    history: list[dict] = field(default_factory=list)  # one dict of StepStats per step
    seconds: float = 0.0
    checkpoint: Path | None = None


def train_ddpt(
    config: RunConfig, lm: FrozenCodeLM, examples: list[Example],
    checkpoint_dir: str | Path | None = None, resume: bool = False,
    on_step: Callable[[int, dict], None] | None = None, progress: bool = True,
) -> TrainResult:
    """Train the diffusion prompt model on ``examples`` for ``config.train.steps`` steps.

    Saves a checkpoint to ``checkpoint_dir`` every ``train.checkpoint_every`` steps and at the
    end; with ``resume`` it continues from the checkpoint there. ``on_step(step, stats)`` is
    called after each step (MLflow logging, Ray reports).
    """
    tc = config.train
    if not examples:
        raise ValueError("no training examples")
    encoded: list[EncodedExample] = lm.encode(examples)
    model = build_prompt_model(lm, config.denoiser, config.diffusion, tc.seed).to(lm.device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
    objective = OBJECTIVES[tc.objective](tc)
    start = 0
    checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
    if resume and checkpoint_dir and (checkpoint_dir / "state.json").is_file():
        saved, _, state = load_prompt_model(checkpoint_dir, map_location=lm.device)
        model.load_state_dict(saved.state_dict())
        optimizer.load_state_dict(load_optimizer_state(checkpoint_dir))
        start = state["step"]
        log.info("resumed from %s at step %d", checkpoint_dir, start)

    result = TrainResult(model)
    began = time.perf_counter()
    model.train()
    bar = tqdm(range(start, tc.steps), desc="train ddpt", disable=not progress,
               initial=start, total=tc.steps)
    for step in bar:
        indices = batch_indices(len(encoded), tc.batch_size, step, tc.seed)
        batch = lm.collate([encoded[i] for i in indices]).to(lm.device)
        generator = torch.Generator().manual_seed(tc.seed * 1_000_003 + step)
        loss, stats = objective.loss(model, lm, batch, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if tc.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
        optimizer.step()
        objective.after_step(model)
        record = {"step": step + 1, **asdict(stats)}
        result.history.append(record)
        bar.set_postfix(loss=f"{stats.code_loss:.3f}")
        if on_step:
            on_step(step + 1, record)
        done = step + 1 == tc.steps
        if checkpoint_dir and (done or (tc.checkpoint_every and (step + 1) % tc.checkpoint_every == 0)):
            result.checkpoint = save_checkpoint(checkpoint_dir, model, config, step + 1, optimizer)
    result.seconds = time.perf_counter() - began
    model.eval()
    return result
