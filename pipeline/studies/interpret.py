"""What the learned prompts changed: their directions, per task and per context position.

A prompt is the n vectors ``P = X_ctx + delta`` (n, d) the LM sees in place of the manual
context; the manual prompt is ``delta = 0``. :func:`interpret` gathers each trained prompt
model's directions (the ones its method used on the first tasks, plus a few more noise draws
per task) and writes, into a comparison's ``interpret/`` folder:

- ``<model>/nearest_tokens.json``: per context position, the vocabulary tokens nearest (cosine)
  to the prompt of the first task (:func:`nearest_tokens`);
- ``directions.png``: where the directions lie (:func:`pipeline.studies.prompt_pictures.
  direction_map`): one point per (task, method), the manual prompt at the origin, and per
  sampled model the spread within a task against the spread across tasks;
- ``positions.png``: per context position and method, how far the prompt moved and the token
  it now sits nearest to (:func:`pipeline.studies.prompt_pictures.position_map`).

Everything is seeded: a rerun draws the same pictures.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from pipeline.config import RunConfig
from pipeline.data.example import Example
from pipeline.lm.frozen import FrozenCodeLM
from pipeline.studies.prompt_pictures import PromptSet, direction_map, nearest_ids, position_map

log = logging.getLogger(__name__)

DIRECTIONS_PNG, POSITIONS_PNG = "directions.png", "positions.png"
NEAREST_JSON = "nearest_tokens.json"


def _token(lm: FrozenCodeLM, token_id: int) -> str:
    return lm.tokenizer.decode([token_id])


@torch.no_grad()
def nearest_tokens(lm: FrozenCodeLM, prompt: torch.Tensor, k: int = 5) -> dict:
    """``prompt``: (n, d). Per position: the context's own token, its k nearest vocabulary
    tokens (cosine) and how far the prompt moved from the manual context there.

    Returns ``{"positions": [...], "summary": {...}}``; ``summary.still_nearest`` is the share
    of positions whose nearest token is still the manual context's token there.
    """
    context = lm.context_embedding().float().cpu()  # (n, d)
    prompt = prompt.float().cpu()
    ids, sims = nearest_ids(lm, prompt, k)
    to_context = F.cosine_similarity(prompt, context, dim=-1)  # (n,)
    positions = []
    for i, token_id in enumerate(lm.template.context_ids):
        positions.append({
            "position": i,
            "context_token": _token(lm, token_id),
            "cosine_to_context": round(to_context[i].item(), 4),
            "nearest": [[_token(lm, j), round(s, 4)]
                        for j, s in zip(ids[i].tolist(), sims[i].tolist())],
        })
    kept = sum(int(ids[i, 0].item() == t) for i, t in enumerate(lm.template.context_ids))
    summary = {"still_nearest": kept / len(positions),
               "mean_cosine_to_context": to_context.mean().item(),
               "mean_direction_norm": (prompt - context).norm(dim=-1).mean().item(),
               "mean_token_norm": lm.mean_token_norm()}
    return {"positions": positions, "summary": summary}


@dataclass
class Interpretation:
    """What :func:`interpret` wrote: each prompt model's folder (its nearest tokens), the
    pictures, the directions they show and the seconds it took."""

    folders: dict[str, Path] = field(default_factory=dict)
    pictures: list[Path] = field(default_factory=list)
    prompts: dict[str, PromptSet] = field(default_factory=dict)
    seconds: float = 0.0


def _extra_draws(lm: FrozenCodeLM, model: torch.nn.Module, args: dict, tasks: list[Example],
                 extra: int, seed: int) -> torch.Tensor:
    """``extra`` more noise draws per task (one group when ``tasks`` is empty: a prompt for
    all tasks), each seeded by the task id and the draw's index: (T or 1, extra, n, d)."""
    from pipeline.generation.sampler import example_seed
    from pipeline.training.prompt_models import is_conditional

    keys = [str(e.id) for e in tasks] or ["shared"]
    generators = [torch.Generator().manual_seed(example_seed(seed, f"{key}#{j}"))
                  for key in keys for j in range(1, extra + 1)]
    if is_conditional(model):
        condition = lm.condition(lm.collate(lm.encode(tasks)).to(lm.device))
        args = {**args, "condition": condition.repeat_interleave(extra, dim=0)}
    drawn = model.sample_directions(len(generators), generators, **args).float().cpu()
    return drawn.reshape(len(keys), extra, *drawn.shape[1:])


@torch.no_grad()
def gather_prompts(config: RunConfig, checkpoints: dict[str, Path], lm: FrozenCodeLM,
                   examples: list[Example], methods: list[str], *, num_tasks: int = 8,
                   draws: int = 4) -> dict[str, PromptSet]:
    """Each trained prompt model's directions, as the first of ``methods`` that uses it samples
    them: per task (a conditional model, or ``sample.prompts: per_example``) on the first
    ``num_tasks`` examples, else its one prompt; ``draws`` noise draws each (the method's own
    first), one for prompt tuning. Models no method uses are left out."""
    from pipeline.baselines.soft_prompt import SoftPrompt
    from pipeline.generation.sampler import METHODS, BatchSampler, method_sample_config
    from pipeline.training.prompt_models import is_conditional, sampling_args

    sampler = BatchSampler(config, checkpoints, lm)
    chunk, found = examples[:num_tasks], {}
    for name, model in sampler.prompt_models.items():
        method = next((m for m in methods if METHODS[m].prompt == name), None)
        if method is None or not chunk:
            continue
        sample = method_sample_config(METHODS[method], config.sample)
        fixed = isinstance(model, SoftPrompt)  # prompt tuning: one prompt, nothing random
        per_task = not fixed and (is_conditional(model) or sample.prompts == "per_example")
        used = sampler.directions(method, chunk).float().cpu()  # (T, n, d)
        tasks = chunk if per_task else []
        if not per_task:  # one prompt, repeated for every task
            used = used[:1]
        directions = used[:, None]
        if draws > 1 and not fixed:
            more = _extra_draws(lm, model, sampling_args(sample, model), tasks, draws - 1,
                                sample.seed)
            directions = torch.cat([directions, more], dim=1)
        found[name] = PromptSet(directions, [str(e.id) for e in tasks] or None, method)
    return found


@torch.no_grad()
def interpret(config: RunConfig, checkpoints: dict[str, Path], lm: FrozenCodeLM,
              folder: Path, examples: list[Example], methods: list[str], *,
              num_tasks: int = 8, draws: int = 4) -> Interpretation:
    """Nearest tokens per trained prompt model (``folder/<model>/nearest_tokens.json``, of the
    first task's prompt) and the pictures ``folder/directions.png`` and
    ``folder/positions.png`` of every model's directions (:func:`gather_prompts`). Nothing is
    written without prompt models."""
    began = time.perf_counter()
    prompts = gather_prompts(config, checkpoints, lm, examples, methods, num_tasks=num_tasks,
                             draws=draws) if checkpoints else {}
    done = Interpretation(prompts=prompts)
    if not prompts:
        return done
    context = lm.context_embedding().float().cpu()
    for name, prompt_set in prompts.items():
        done.folders[name] = folder / name
        done.folders[name].mkdir(parents=True, exist_ok=True)
        nearest = nearest_tokens(lm, context + prompt_set.directions[0, 0])
        (done.folders[name] / NEAREST_JSON).write_text(
            json.dumps(nearest, indent=1, ensure_ascii=False) + "\n")
    by_label = {s.label or name: s for name, s in prompts.items()}
    token_norm = lm.mean_token_norm()
    colours = {m: f"C{i % 10}" for i, m in enumerate(methods)}  # the metrics chart's colours
    done.pictures = [direction_map(by_label, folder / DIRECTIONS_PNG, token_norm=token_norm,
                                   colours=colours).path,
                     position_map(lm, by_label, folder / POSITIONS_PNG).path]
    done.seconds = time.perf_counter() - began
    log.info("interpreted %s in %.1fs: %s", ", ".join(by_label), done.seconds,
             ", ".join(str(p) for p in done.pictures))
    return done
