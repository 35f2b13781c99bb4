"""Execution-based evaluation of a data set's programs (``ddpt evaluate``; pass@k).

The ``canonical`` method runs each example's reference solution against its tests: a
self-check of the data and of the sandbox (HumanEval and MBPP should pass every task). The
model methods that need no trained prompt (``manual``, ``spa``) generate with ``model.name``
and ``decoding`` (an autoregressive LM, or a masked-diffusion one with ``decoding.strategy:
diffusion``) on the sampler pool, then run in the same sandbox; they also get the text metrics,
``code_ce`` and, for a masked-diffusion LM, AR-ness (plots under ``arness/``).

Writes into the output folder:
    config.yaml        the resolved configuration
    samples.jsonl      one line per (method, example): id, method, instruction, generation,
                       reference, status, exec_message (docs/execution.md)
    task_records.csv.gz  one row per (method, task): status, test cases passed, code_ce
                       (docs/statistics.md)
    metrics.json       {method: {"pass_at_1": ..., "pass_at_<k>": ..., "passed": n, "total": n,
                       "records_in_data": N}}: ``total`` tasks judged of the N records the
                       data set holds (all of a user's file unless a split is asked for);
                       with two or more methods each one's paired figures against
                       eval.reference_method (``pass_at_1_diff``, ...)
    charts/metrics.png a panel per pass@k: the paired differences to the reference
                       (``ddpt report`` inlines it)
    evaluate_run.json  the MLflow run (re-attached by ``resume``)
    mlflow.db, mlartifacts/   unless MLFLOW_TRACKING_URI / tracking.uri point elsewhere
"""
from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

from pipeline.config import DATA_METHODS, ConfigError, RunConfig, check_fresh_output
from pipeline.data.example import Example
from pipeline.data.records import ALL_RECORDS
from pipeline.data.splits import record_count, tested_eval_examples
from pipeline.generation.sampler import METHODS, task_fields
from pipeline.sandbox import SandboxError, resolve_isolation
from pipeline.scoring.execution import score_execution
from pipeline.scoring.results import ResultStore
from pipeline.scoring.task_records import chain_label, read_table
from pipeline.studies.backends import LOCAL, Backends
from pipeline.studies.charts import CHARTS, METRICS_PNG, metric_chart
from pipeline.studies.comparison import (
    arness_plots,
    check_before_work,
    method_params,
    sample_into,
    score,
)
from pipeline.studies.paired import (
    check_reference,
    comparison_metrics,
    write_comparison_table,
)
from pipeline.tracking import RunTracker, check_tracking_uri, open_run, resolve_tracking_uri

log = logging.getLogger(__name__)
RUN_FILE = "evaluate_run.json"

# A data method maps an example to the program text it is scored with.
EVALUATE_METHODS: dict[str, Callable[[Example], str]] = {
    "canonical": lambda example: example.output,
}
if tuple(EVALUATE_METHODS) != DATA_METHODS:  # eval.reference_method's choices name these
    raise RuntimeError(f"EVALUATE_METHODS {list(EVALUATE_METHODS)} differ from pipeline.config's "
                       f"DATA_METHODS {list(DATA_METHODS)}")
# The sampler's methods that need no trained prompt model: they generate with model.name.
MODEL_METHODS = {name: spec for name, spec in METHODS.items() if spec.prompt is None}


def _open_run(config: RunConfig, output: Path, uri: str, methods: Sequence[str],
              isolation: str, *, resume: bool) -> RunTracker:
    return open_run(output / RUN_FILE, uri, config.tracking.experiment_name(config), "evaluate",
                    resume=resume, role="evaluate", output=output, params=config.to_flat(),
                    tags={"ddpt.methods": ",".join(methods), "ddpt.isolation": isolation})


def judged_line(config: RunConfig, judged: int, records: int) -> str:
    """'judged 4 of the 40 records of my.jsonl (split 'test')': what was scored, of what."""
    data = config.data
    split = "every split" if data.eval_split == ALL_RECORDS else f"split {data.eval_split!r}"
    if data.max_eval_examples and judged == data.max_eval_examples:
        split += f"; {judged} of it, {data.eval_sample}"
        split += f" (seed {data.sample_seed})" if data.eval_sample == "spread" else ""
    return f"judged {judged} of the {records} records of {data.dataset} ({split})"


def run_evaluate(config: RunConfig, output: str | Path, methods: Sequence[str] = ("canonical",),
                 *, backends: Backends = LOCAL, resume: bool = False, progress: bool = False
                 ) -> dict[str, dict[str, float]]:
    """Execute each method's program for every example of ``data.eval_split``; returns
    ``{method: {"pass_at_1": ..., "passed": ..., "total": ...}}``. With ``resume``, ids already
    scored are skipped and the MLflow run is continued."""
    output = Path(output).resolve()
    methods = list(dict.fromkeys(methods))
    known = {**EVALUATE_METHODS, **MODEL_METHODS}
    unknown = [m for m in methods if m not in known]
    if not methods or unknown:
        raise ConfigError(f"--method: unknown {unknown or 'none given'}; known: "
                          f"{', '.join(known)}")
    reference = check_reference(config.eval.reference_method, methods)
    model_methods = [m for m in methods if m in MODEL_METHODS]
    if model_methods:
        check_before_work(config)
    data_methods = [m for m in methods if m in EVALUATE_METHODS]
    if config.execution.num_samples != 1 and data_methods:
        raise ConfigError(f"execution.num_samples: {', '.join(data_methods)} give(s) one program "
                          f"per task; use 1 (got {config.execution.num_samples}) or evaluate "
                          "only the model methods")
    store = ResultStore(output / "samples.jsonl")
    check_fresh_output(output, (store.path.name, RUN_FILE), "evaluation", resume=resume)
    examples = tested_eval_examples(config.data)  # data errors surface before any work
    records = record_count(config.data)
    uri = resolve_tracking_uri(output, config.tracking.uri)
    check_tracking_uri(uri)
    try:
        isolation = resolve_isolation(config.execution.isolation)
    except SandboxError as err:
        raise ConfigError(f"execution.isolation: {err}") from err
    log.info("evaluating %s: %s (sandbox: %s isolation)", ", ".join(methods),
             judged_line(config, len(examples), records), isolation)
    output.mkdir(parents=True, exist_ok=True)
    config.save(output / "config.yaml")
    metrics: dict[str, dict[str, float]] = {}
    with _open_run(config, output, uri, methods, isolation, resume=resume) as tracker:
        tracker.set_tag("ddpt.judged", judged_line(config, len(examples), records))
        if model_methods:  # generate what the store lacks, batch by batch
            sample_into(store, config, model_methods, examples,
                        backends.pool(config, {}, None), progress=progress)
            metrics.update(score(store, config, model_methods, examples))
            for method in model_methods:
                for plot in arness_plots(store.by_method().get(method, []), output / "arness",
                                         method):
                    tracker.log_artifact(plot, "arness")
        for method in (m for m in methods if m in EVALUATE_METHODS):
            done = store.done_ids(method)
            program = EVALUATE_METHODS[method]
            store.append({"id": ex.id, "method": method, "generation": program(ex),
                          "reference": ex.output, **task_fields(ex)}
                         for ex in examples if ex.id not in done)
            metrics[method] = score_execution(store, method, examples, config.execution,
                                              progress=progress)
        for values in metrics.values():
            values["records_in_data"] = float(records)
        table = write_comparison_table(store, output, (e.id for e in examples),
                                       seed=config.train.seed, chains=chains(config, methods))
        for method, values in comparison_metrics(read_table(table), reference,
                                                 methods).items():
            metrics[method].update(values)
        (output / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        chart = output / CHARTS / METRICS_PNG
        metric_chart(metrics, chart, title=f"{config.data.dataset} / {config.data.eval_split}")
        tracker.log_artifact(chart, CHARTS)
        # one method: plain metric names (pass_at_1); several: <method>.pass_at_1
        tracker.log_metrics(metrics[methods[0]] if len(methods) == 1 else metrics)
        tracker.log_artifact(output / "metrics.json")
        tracker.log_artifact(store.path)
        tracker.log_artifact(table)
    return metrics


def chains(config: RunConfig, methods: Sequence[str]) -> dict[str, str]:
    """What each method ran, for the per-task table: the data's program, or the decoding."""
    return {m: m if m in EVALUATE_METHODS else chain_label(method_params(config, m, {}))
            for m in methods}
