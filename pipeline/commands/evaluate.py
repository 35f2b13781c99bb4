"""``ddpt evaluate``: execution-based evaluation of a data set's programs, without a model.

The ``canonical`` method runs each example's reference solution against its tests: a
self-check of the data and of the sandbox (HumanEval and MBPP should pass every task).

Writes into the output folder:
    config.yaml        the resolved configuration
    samples.jsonl      one line per (method, example): id, method, generation, reference,
                       status, exec_message (docs/execution.md)
    metrics.json       {method: {"pass_at_1": ..., "pass_at_<k>": ..., "passed": n, "total": n}}
    evaluate_run.json  the MLflow run (re-attached by ``resume``)
    mlflow.db, mlartifacts/   unless MLFLOW_TRACKING_URI / tracking.uri point elsewhere
"""
from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

from pipeline.config import ConfigError, RunConfig
from pipeline.data.example import Example
from pipeline.data.loaders import DataError, load_examples
from pipeline.evaluation.execution import missing_tests, score_execution
from pipeline.evaluation.results import ResultStore
from pipeline.sandbox import SandboxError, resolve_isolation
from pipeline.tracking import RunTracker, check_tracking_uri, resolve_tracking_uri

log = logging.getLogger(__name__)
RUN_FILE = "evaluate_run.json"

# A method maps an example to the program text it is scored with.
EVALUATE_METHODS: dict[str, Callable[[Example], str]] = {
    "canonical": lambda example: example.output,
}


def load_tested_examples(config: RunConfig) -> list[Example]:
    """The eval split's examples; a DataError (naming file and field) unless all have tests."""
    data = config.data
    examples = load_examples(data.dataset, data.eval_split, data.data_dir,
                             data.max_eval_examples or None)
    if not examples:
        raise DataError(f"split {data.eval_split!r} of data set {data.dataset!r} has no examples",
                        hint="Check data.eval_split (for a user file: each record's 'split')")
    untested = missing_tests(examples)
    if untested:
        source = examples[0].meta.get("source", data.dataset)
        lines = {ex.id: ex.meta.get("line") for ex in examples}
        raise DataError(
            f"{len(untested)} of {len(examples)} examples of split {data.eval_split!r} have no "
            f"tests (ids {', '.join(map(repr, untested[:5]))}"
            f"{', ...' if len(untested) > 5 else ''}); execution needs Python that raises when "
            "the code is wrong", source, lines.get(untested[0]), "tests")
    return examples


def _open_run(config: RunConfig, output: Path, uri: str, methods: Sequence[str],
              isolation: str, resume: bool) -> RunTracker:
    run_file = output / RUN_FILE
    if resume and run_file.is_file():
        saved = json.loads(run_file.read_text())
        return RunTracker.resume(saved["uri"], saved["run_id"])
    tracker = RunTracker.start(
        uri, config.tracking.experiment_name(config), "evaluate", params=config.to_flat(),
        tags={"ddpt.job": "evaluate", "ddpt.methods": ",".join(methods),
              "ddpt.output": str(output), "ddpt.isolation": isolation})
    run_file.write_text(json.dumps({"uri": uri, "run_id": tracker.run_id}) + "\n")
    return tracker


def run_evaluate(config: RunConfig, output: str | Path, methods: Sequence[str] = ("canonical",),
                 resume: bool = False, progress: bool = False) -> dict[str, dict[str, float]]:
    """Execute each method's program for every example of ``data.eval_split``; returns
    ``{method: {"pass_at_1": ..., "passed": ..., "total": ...}}``. With ``resume``, ids already
    scored are skipped and the MLflow run is continued."""
    output = Path(output).resolve()
    methods = list(dict.fromkeys(methods))
    unknown = [m for m in methods if m not in EVALUATE_METHODS]
    if not methods or unknown:
        raise ConfigError(f"--method: unknown {unknown or 'none given'}; known: "
                          f"{', '.join(EVALUATE_METHODS)}")
    if config.execution.num_samples != 1:
        raise ConfigError("execution.num_samples: evaluate's methods give one program per task; "
                          f"use 1 (got {config.execution.num_samples})")
    store = ResultStore(output / "samples.jsonl")
    if not resume and (store.path.exists() or (output / RUN_FILE).exists()):
        raise ConfigError(f"{output} holds an earlier evaluation: pass --resume to continue it, "
                          "or choose another --output")
    examples = load_tested_examples(config)  # data errors surface before any work
    uri = resolve_tracking_uri(output, config.tracking.uri)
    check_tracking_uri(uri)
    try:
        isolation = resolve_isolation(config.execution.isolation)
    except SandboxError as err:
        raise ConfigError(f"execution.isolation: {err}") from err
    log.info("evaluating %s on %d examples of %s/%s (sandbox: %s isolation)",
             ", ".join(methods), len(examples), config.data.dataset, config.data.eval_split,
             isolation)
    output.mkdir(parents=True, exist_ok=True)
    config.save(output / "config.yaml")
    metrics: dict[str, dict[str, float]] = {}
    with _open_run(config, output, uri, methods, isolation, resume) as tracker:
        for method in methods:
            done = store.done_ids(method)
            program = EVALUATE_METHODS[method]
            store.append({"id": ex.id, "method": method, "generation": program(ex),
                          "reference": ex.output} for ex in examples if ex.id not in done)
            metrics[method] = score_execution(store, method, examples, config.execution,
                                              progress=progress)
        (output / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        # one method: plain metric names (pass_at_1); several: <method>.pass_at_1
        tracker.log_metrics(metrics[methods[0]] if len(methods) == 1 else metrics)
        tracker.log_artifact(output / "metrics.json")
        tracker.log_artifact(store.path)
    return metrics
