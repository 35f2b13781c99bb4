"""``ddpt run``, the main job: train DDPT and the prompt-tuning baseline, then compare every method.

Writes into the output folder:
    config.yaml        the resolved configuration
    ddpt/, prompt_tuning/   one training job each (``ddpt train``'s layout: checkpoint/, ray/)
    samples.jsonl      one line per (method, example): id, method, instruction, generation,
                       reference, code_ce, status (where execution ran), ...
    metrics.json       {method: {metric: value}}: text metrics, ``code_ce`` (held-out code
                       cross-entropy), prompt/generation seconds
    charts/            metrics.png (a bar panel per metric, a bar per method), training.png
                       (loss per step of each training job, from its MLflow run)
    interpret/         nearest tokens per trained prompt model (<model>/nearest_tokens.json);
                       tsne.png, one map of the manual context, prompt tuning's prompt and
                       DDPT's samples among 3000 vocabulary tokens (about 15 s of one core)
    <data set>/        the same comparison on each entry of data.extra_eval
    mlflow.db, mlartifacts/, mlflow_comparison.json   the MLflow comparison (unless
                       MLFLOW_TRACKING_URI or tracking.uri says otherwise): a parent run with a
                       child per training job and per method
Re-running with ``resume=True`` continues training from the last checkpoints and skips
generations already in samples.jsonl. ``ddpt report --output DIR`` then writes
``DIR/report.html``, one self-contained page of the table, the pictures and a few examples.
"""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch

from pipeline.commands.common import config_from_args, pool_opener, train_backend, with_tracking_uri
from pipeline.config import RunConfig, check_fresh_output
from pipeline.data.example import Example
from pipeline.data.splits import eval_examples, train_examples
from pipeline.evaluation.comparison import (
    COMPARISON_FILE,
    check_before_work,
    format_table,
    open_comparison,
    run_comparison,
)
from pipeline.evaluation.sampler import check_methods, prompt_models_needed
from pipeline.lm.loader import build_lm
from pipeline.training.job import run_training

log = logging.getLogger(__name__)

def run_main(config: RunConfig, output_dir: str | Path, resume: bool = False,
             methods: tuple[str, ...] | None = None, progress: bool = True,
             parent_run_id: str | None = None) -> dict:
    """Train the prompt models the methods need (on ``distributed.backend``: Ray + DeepSpeed by
    default), then compare the methods (on ``data.extra_eval`` too). Returns ``{method: {metric:
    value}}``, with ``<data set>/<method>`` keys for the extra data sets. ``methods``: default
    ``eval.methods``. ``parent_run_id``: an experiment's MLflow run the comparisons nest under."""
    output = Path(output_dir).resolve()
    methods = tuple(config.eval.methods if methods is None else methods)
    check_methods(methods, "eval.methods")
    check_fresh_output(output, resume, (COMPARISON_FILE,))
    training, evaluation = train_examples(config.data), eval_examples(config.data)
    extra = extra_examples(config)
    check_before_work(config)  # data, metric and WordNet problems surface before any work
    config = with_tracking_uri(config, output)
    output.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.train.seed)
    config.save(output / "config.yaml")

    with open_comparison(config, output, resume, list(methods), parent_run_id) as parent:
        began = time.perf_counter()
        lm = build_lm(config)
        log.info("model %s (%s template, context n=%d, d=%d) loaded in %.1fs",
                 config.model.name, lm.template.kind, lm.context_length, lm.hidden_size,
                 time.perf_counter() - began)
        checkpoints = {}
        for name in prompt_models_needed(methods):
            job = config.with_overrides([f"train.method={name}"])
            trained = run_training(job, output / name, train_backend(job, lm), resume, training,
                                   progress, parent_run_id=parent.run_id,
                                   run_name=f"train-{name}")
            checkpoints[name] = trained.checkpoint
        metrics = run_comparison(config, output, list(methods), checkpoints, evaluation, parent,
                                 pool_opener(config, checkpoints, lm), resume, progress, lm)
    metrics.update(compare_on_extra(config, output, methods, checkpoints, extra, resume, progress,
                                    lm, parent_run_id))
    return metrics


def extra_config(config: RunConfig, dataset: str) -> RunConfig:
    """The configuration of comparing on ``dataset`` (an entry of ``data.extra_eval``): its test
    split, ``data.max_extra_eval_examples`` of it, in its own MLflow experiment."""
    return config.with_overrides([
        f"data.dataset={dataset}", "data.eval_split=test", "data.extra_eval=[]",
        "data.columns={}",
        f"data.max_eval_examples={config.data.max_extra_eval_examples}",
        "tracking.experiment=null"])


def extra_examples(config: RunConfig) -> dict[str, list[Example]]:
    """The examples of every extra data set (``data.extra_sets``), read (and checked) before
    any work."""
    return {name: eval_examples(extra_config(config, name).data)
            for name in config.data.extra_sets}


def compare_on_extra(config: RunConfig, output: Path, methods: tuple[str, ...],
                     checkpoints: dict[str, Path], extra: dict[str, list[Example]], resume: bool,
                     progress: bool, lm=None, parent_run_id: str | None = None) -> dict:
    """The same prompts compared on each extra data set (``extra``: name -> examples), each its
    own comparison in ``output/<name>/``. Returns ``{"<name>/<method>": metrics}``."""
    metrics = {}
    for name, examples in extra.items():
        other, folder = extra_config(config, name), output / name
        with open_comparison(other, folder, resume, list(methods), parent_run_id) as parent:
            parent.set_tag("ddpt.trained_on", config.data.dataset)
            other.save(folder / "config.yaml")
            found = run_comparison(other, folder, list(methods), checkpoints, examples, parent,
                                   pool_opener(other, checkpoints, lm), resume, progress, lm)
        metrics.update({f"{name}/{method}": values for method, values in found.items()})
    return metrics


def print_tables(config: RunConfig, metrics: dict, output: str | Path) -> None:
    """One table per compared data set: the evaluation split, then each extra one (the
    ``<data set>/<method>`` keys of ``metrics``)."""
    extra = list(dict.fromkeys(m.split("/", 1)[0] for m in metrics if "/" in m))
    tables = {(config.data.dataset, config.data.eval_split): {
        m: v for m, v in metrics.items() if "/" not in m}}
    for name in extra:
        tables[(name, "test")] = {m.split("/", 1)[1]: v for m, v in metrics.items()
                                  if m.startswith(f"{name}/")}
    for (dataset, split), table in tables.items():
        print(f"\n{dataset} / {split} ({config.model.name}):")
        print(format_table(table))
    print(f"\nwrote {output}/metrics.json and {output}/samples.jsonl"
          + "".join(f", {output}/{name}/" for name in extra))


def main(args: argparse.Namespace) -> None:
    config = config_from_args(args)  # before the heavy work: a bad option fails in a second
    metrics = run_main(config, args.output, resume=args.resume, progress=not args.no_progress)
    print_tables(config, metrics, args.output)
