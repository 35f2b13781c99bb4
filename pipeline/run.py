"""The main job, in one process: train DDPT, sample a prompt, compare it with the manual prompt.

Writes into the output folder:
    config.yaml        the resolved configuration
    checkpoint/        the trained diffusion prompt model (never the LM)
    ray/               Ray Train's own checkpoints (DeepSpeed shards), for resuming
    mlflow.db, mlartifacts/, mlflow_run.json   the MLflow run (unless MLFLOW_TRACKING_URI is set)
    samples.jsonl      one line per (method, example): id, method, generation, reference
    metrics.json       {method: {metric: value}}, plus ``code_ce`` (held-out code cross-entropy)
Re-running with ``resume=True`` continues training from the last checkpoint and skips
generations already in samples.jsonl.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from pipeline.config import ConfigError, RunConfig
from pipeline.data.example import Example
from pipeline.data.loaders import load_examples
from pipeline.checkpoint import load_prompt_model
from pipeline.ddpt import DiffusionPrompt
from pipeline.evaluate import generate_into, heldout_code_loss, score_method
from pipeline.frozen_lm import FrozenCodeLM
from pipeline.metrics import METRICS
from pipeline.models import load_model, resolve_device
from pipeline.results import ResultStore
from pipeline.template import PromptTemplate
from pipeline.tracking import RunTracker
from pipeline.training_job import check_output, load_train_examples, run_training

log = logging.getLogger(__name__)


@dataclass
class RunContext:
    config: RunConfig
    lm: FrozenCodeLM
    prompt_model: DiffusionPrompt | None = None


def _manual(ctx: RunContext) -> None:
    return None


def _ddpt(ctx: RunContext) -> torch.Tensor:
    """One prompt sampled from the reverse chain (seeded), shared by every example: (n, d)."""
    generator = torch.Generator().manual_seed(ctx.config.sample.seed)
    return ctx.prompt_model.sample_directions(1, ctx.config.sample, generator)[0]


# A method maps the trained context to the direction `delta` it decodes with (None = manual).
METHODS: dict[str, Callable[[RunContext], torch.Tensor | None]] = {
    "manual": _manual,
    "ddpt": _ddpt,
}


def load_data(config: RunConfig) -> tuple[list[Example], list[Example]]:
    dc = config.data
    evaluation = load_examples(dc.dataset, dc.eval_split, dc.data_dir,
                               dc.max_eval_examples or None)
    return load_train_examples(config), evaluation


def check_before_work(config: RunConfig) -> None:
    """Cheap checks that would otherwise fail after training."""
    unknown = [m for m in config.eval.metrics if m not in METRICS]
    if unknown:
        raise ConfigError(f"eval.metrics: unknown {unknown}; known: {sorted(METRICS)}")
    if "meteor" in config.eval.metrics:
        from pipeline.wordnet import ensure_wordnet

        ensure_wordnet()


def build_lm(config: RunConfig) -> FrozenCodeLM:
    model, tokenizer = load_model(config.model)
    model.to(resolve_device(config.model.device))
    template = PromptTemplate(tokenizer, config.prompt, model.config.is_encoder_decoder)
    return FrozenCodeLM(model, tokenizer, template)


def save_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def format_table(metrics: dict[str, dict[str, float]]) -> str:
    names = list(dict.fromkeys(name for values in metrics.values() for name in values))
    widths = [max(10, len(n) + 2) for n in names]
    header = f"{'method':<12}" + "".join(f"{n:>{w}}" for n, w in zip(names, widths))
    rows = [f"{m:<12}" + "".join(f"{v.get(n, float('nan')):>{w}.4f}" for n, w in zip(names, widths))
            for m, v in metrics.items()]
    return "\n".join([header, "-" * len(header), *rows])


def run_main(config: RunConfig, output_dir: str | Path, resume: bool = False,
             methods: tuple[str, ...] = ("manual", "ddpt"), progress: bool = True) -> dict:
    """Train (through :func:`run_training`: Ray + DeepSpeed by default), sample, generate,
    score. Returns ``{method: {metric: value}}``; also logged to the training's MLflow run."""
    output = Path(output_dir).resolve()
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ConfigError(f"unknown method(s) {unknown}; known: {list(METHODS)}")
    check_output(output, resume)
    train_examples, eval_examples = load_data(config)  # data errors surface before any work
    check_before_work(config)
    torch.manual_seed(config.train.seed)

    began = time.perf_counter()
    lm = build_lm(config)
    log.info("model %s (%s template, context n=%d, d=%d) loaded in %.1fs", config.model.name,
             lm.template.kind, lm.context_length, lm.hidden_size, time.perf_counter() - began)
    trained = run_training(config, output, resume, train_examples, progress, lm=lm)
    prompt_model, _, _ = load_prompt_model(trained.checkpoint, map_location=lm.device)
    ctx = RunContext(config, lm, prompt_model)

    store = ResultStore(output / "samples.jsonl")
    if not resume and store.path.exists():
        store.path.unlink()
    metrics: dict[str, dict[str, float]] = {}
    for method in methods:
        started = time.perf_counter()
        delta = METHODS[method](ctx)
        prompt_seconds = time.perf_counter() - started
        code_ce = heldout_code_loss(lm, eval_examples, delta, config.eval.batch_size)
        generate_into(store, method, lm, eval_examples, delta, config.eval.batch_size,
                      config.eval.max_new_tokens, progress)
        metrics[method] = {**score_method(store, method, eval_examples, config.eval.metrics),
                           "code_ce": code_ce, "prompt_seconds": prompt_seconds}
        save_json(output / "metrics.json", metrics)  # partial results survive a later crash
    tracker = RunTracker.resume(trained.tracking_uri, trained.run_id)
    with tracker:
        tracker.log_metrics({f"{m}.{k}": v for m, values in metrics.items()
                             for k, v in values.items()})
        tracker.log_artifact(output / "metrics.json")
        tracker.log_artifact(store.path)
    return metrics
