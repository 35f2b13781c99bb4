"""The main job (``ddpt run``): train DDPT and the prompt-tuning baseline, then compare every
method.

Writes into the output folder:
    config.yaml        the resolved configuration
    ddpt/, prompt_tuning/   one training job each (``ddpt train``'s layout: checkpoint/, ray/)
    samples.jsonl      one line per (method, example): id, method, instruction, generation,
                       reference, code_ce, status (where execution ran), ...
    task_records.csv.gz  one row per (method, task): status, test cases passed, code_ce, the
                       chain that ran (docs/statistics.md); the paired figures come from it
    metrics.json       {method: {metric: value}}: text metrics, ``code_ce`` (held-out code
                       cross-entropy), prompt/generation seconds, and each method's paired
                       figures against eval.reference_method (``pass_at_1_diff``, ...)
    charts/            metrics.png (a panel per quality metric: a bar per method, or each
                       method's paired difference to the reference with its interval where
                       metrics.json holds one), training.png (loss per step of each training
                       job, from its MLflow run)
    interpret/         nearest tokens per trained prompt model (<model>/nearest_tokens.json);
                       directions.png (the prompt directions per task and method, the manual
                       prompt at the origin; the spread within and across tasks) and
                       positions.png (per context position: how far each method moved it and
                       the token it now sits nearest to)
    <data set>/        the same comparison on each entry of data.extra_eval
    mlflow.db, mlartifacts/, mlflow_comparison.json   the MLflow comparison (unless
                       MLFLOW_TRACKING_URI or tracking.uri says otherwise): a parent run with a
                       child per training job and per method
Re-running with ``resume=True`` continues training from the last checkpoints and skips
generations already in samples.jsonl. ``ddpt report --output DIR`` then writes
``DIR/report.html``, one self-contained page of the table, the pictures and a few examples.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from pipeline.config import RunConfig, check_fresh_output
from pipeline.data.example import Example
from pipeline.data.splits import eval_examples, train_examples
from pipeline.generation.sampler import check_methods, prompt_models_needed
from pipeline.lm.frozen import FrozenCodeLM
from pipeline.lm.loader import build_lm
from pipeline.studies.backends import LOCAL, Backends
from pipeline.studies.comparison import (
    COMPARISON_FILE,
    check_before_work,
    open_comparison,
    run_comparison,
    with_tracking_uri,
)
from pipeline.studies.paired import check_reference
from pipeline.training.job import resumable_state, run_training

log = logging.getLogger(__name__)


def run_main(config: RunConfig, output_dir: str | Path, *, backends: Backends = LOCAL,
             resume: bool = False, methods: tuple[str, ...] | None = None,
             progress: bool = True, parent_run_id: str | None = None,
             paired: bool = True) -> dict:
    """Train the prompt models the methods need (on ``backends.train``: Ray + DeepSpeed for
    ``ddpt run``), then compare the methods (on ``data.extra_eval`` too). Returns ``{method:
    {metric: value}}``, with ``<data set>/<method>`` keys for the extra data sets. ``methods``:
    default ``eval.methods``. ``parent_run_id``: an experiment's MLflow run the comparisons nest
    under. ``paired``: pair the methods with ``eval.reference_method`` (an experiment pairs
    over its runs instead)."""
    output = Path(output_dir).resolve()
    methods = tuple(config.eval.methods if methods is None else methods)
    check_methods(methods, "eval.methods")
    reference = check_reference(config.eval.reference_method, methods) if paired else None
    check_fresh_output(output, (COMPARISON_FILE,), resume=resume)
    for name in prompt_models_needed(methods) if resume else ():
        resumable_state(output / name)  # a damaged checkpoint fails before the model loads
    training, evaluation = train_examples(config.data), eval_examples(config.data)
    extra = extra_examples(config)
    check_before_work(config)  # data, metric and WordNet problems surface before any work
    config = with_tracking_uri(config, output)
    output.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.train.seed)
    config.save(output / "config.yaml")

    with open_comparison(config, output, list(methods), resume=resume,
                         parent_run_id=parent_run_id) as parent:
        began = time.perf_counter()
        lm = build_lm(config)
        log.info("model %s (%s template, context n=%d, d=%d) loaded in %.1fs",
                 config.model.name, lm.template.kind, lm.context_length, lm.hidden_size,
                 time.perf_counter() - began)
        checkpoints = {}
        for name in prompt_models_needed(methods):
            job = config.with_overrides([f"train.method={name}"])
            trained = run_training(job, output / name, backends.train(job, lm), resume=resume,
                                   examples=training, progress=progress,
                                   parent_run_id=parent.run_id, run_name=f"train-{name}")
            checkpoints[name] = trained.checkpoint
        metrics = run_comparison(config, output, list(methods), checkpoints, evaluation,
                                 parent=parent, open_pool=backends.pool(config, checkpoints, lm),
                                 resume=resume, progress=progress, lm=lm, reference=reference)
    metrics.update(compare_on_extra(config, output, methods, checkpoints, extra,
                                    backends=backends, resume=resume, progress=progress, lm=lm,
                                    parent_run_id=parent_run_id, reference=reference))
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
                     checkpoints: dict[str, Path], extra: dict[str, list[Example]], *,
                     backends: Backends, resume: bool, progress: bool,
                     lm: FrozenCodeLM | None = None, parent_run_id: str | None = None,
                     reference: str | None = None) -> dict:
    """The same prompts compared on each extra data set (``extra``: name -> examples), each its
    own comparison in ``output/<name>/``. Returns ``{"<name>/<method>": metrics}``."""
    metrics = {}
    for name, examples in extra.items():
        other, folder = extra_config(config, name), output / name
        with open_comparison(other, folder, list(methods), resume=resume,
                             parent_run_id=parent_run_id) as parent:
            parent.set_tag("ddpt.trained_on", config.data.dataset)
            other.save(folder / "config.yaml")
            found = run_comparison(other, folder, list(methods), checkpoints, examples,
                                   parent=parent, open_pool=backends.pool(other, checkpoints, lm),
                                   resume=resume, progress=progress, lm=lm, reference=reference)
        metrics.update({f"{name}/{method}": values for method, values in found.items()})
    return metrics
