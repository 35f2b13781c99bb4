"""Running an experiment (``ddpt experiment``): every arm of an experiment spec, trained with
every seed on every data set and compared on its evaluation sets; a table of mean and standard
deviation over the seeds.

Each (data set, arm, seed) is one ``ddpt run`` (training on Ray Train + DeepSpeed and sampling
on the Ray actor pool by default) into ``<output>/<data set>/<arm>/seed<k>/``, nested under the
experiment's MLflow run; its results are appended to ``<output>/results.jsonl`` as it finishes,
so ``--resume`` skips what is done and continues a run that was cut short from its checkpoints.
Writes ``<output>/tables.md`` (one Markdown table per evaluation set, and each method against
``eval.reference_method`` on the same tasks: pooled over seeds beside each seed's figure),
``results.json`` (the aggregated rows), ``paired.json`` (the paired figures),
``task_records/<eval set>.csv.gz`` (every run's per-task rows, with ``<eval set>.json``: the
reference and the training facts; :mod:`pipeline.studies.experiment_paired`) and
``charts/<eval set>_metrics.png`` (each quality metric per arm and method, mean ± std over seeds as
error bars), also as MLflow artifacts; ``ddpt report`` makes a page of them.
"""
from __future__ import annotations

import json
import logging
import shutil
import statistics
import time
from dataclasses import asdict
from pathlib import Path

from mlflow import MlflowClient

from pipeline.config import ConfigError, check_fresh_output
from pipeline.scoring.task_records import FILENAME
from pipeline.studies.backends import LOCAL, Backends
from pipeline.studies.chains import comparison_chains
from pipeline.studies.charts import CHARTS
from pipeline.studies.comparison import with_tracking_uri
from pipeline.studies.experiment import (
    BASELINE,
    Experiment,
    Row,
    aggregate,
    experiment_charts,
    markdown_table,
    read_results,
)
from pipeline.studies.experiment_paired import (
    PAIRED,
    RECORDS,
    TRAINING_FACTS,
    PairedRow,
    as_experiment_metrics,
    log_seed_figures,
    markdown_paired,
    write_paired,
)
from pipeline.studies.main_job import run_main
from pipeline.tracking import open_run, read_run_file, resolve_tracking_uri
from pipeline.training.job import CHECKPOINT, RUN_FILE

log = logging.getLogger(__name__)
RESULTS, TABLES, SUMMARY, RUN_POINTER = "results.jsonl", "tables.md", "results.json", \
    "experiment_run.json"
OVERRIDES = "overrides.json"  # the command line's --set, kept so --resume runs the same
TABLE_METRICS = ["pass_at_1", "code_ce", "bleu4", "codebleu", "prompt_spread_per_condition",
                 "prompt_spread_across_conditions", "prompt_model_parameters", "prompt_norm",
                 "train_step_seconds", "step_time_vs_prompt_tuning"]


def run_experiment(experiment: Experiment, output_dir: str | Path, *,
                   backends: Backends = LOCAL, resume: bool = False,
                   progress: bool = True) -> list[Row]:
    """Run (or continue) ``experiment`` into ``output_dir``; returns the aggregated rows."""
    output = Path(output_dir).resolve()
    check_fresh_output(output, (RESULTS, RUN_POINTER), "experiment", resume=resume)
    output.mkdir(parents=True, exist_ok=True)
    if not (output / "experiment.yaml").exists():
        shutil.copyfile(experiment.source, output / "experiment.yaml")
    check_same_overrides(output / OVERRIDES, list(experiment.overrides))
    uri = resolve_tracking_uri(output, None)
    name = f"ddpt-experiment-{Path(experiment.source).stem}"
    results_file = output / RESULTS
    done = {(r["dataset"], r["arm"], r["seed"]) for r in read_results(results_file)}
    with open_run(output / RUN_POINTER, uri, name, output.name, resume=True, role="experiment",
                  output=output, params={"experiment.source": experiment.source,
                                         "experiment.seeds": experiment.seeds}) as parent:
        for dataset, arm, seed in experiment.runs():
            arm_name = arm.name if arm else BASELINE
            if (dataset, arm_name, seed) in done:
                continue
            folder = output / dataset / arm_name / f"seed{seed}"
            config = with_tracking_uri(experiment.config(dataset, arm, seed), folder)
            log.info("experiment: %s / %s / seed %d into %s", dataset, arm_name, seed, folder)
            began = time.perf_counter()
            metrics = run_main(config, folder, backends=backends, resume=True,
                               methods=experiment.methods(arm), progress=progress,
                               parent_run_id=parent.run_id, paired=False)
            extra, chains = _training_facts(folder), comparison_chains(folder)
            with results_file.open("a") as out:
                for key, values in metrics.items():
                    eval_set, _, method = key.rpartition("/")
                    table = folder / eval_set / FILENAME if eval_set else folder / FILENAME
                    out.write(json.dumps({
                        "dataset": dataset, "eval_set": eval_set or config.data.dataset,
                        "arm": arm_name, "seed": seed, "method": method,
                        "chain": chains.get(method, ""), "metrics": {**values, **extra},
                        "task_records": str(table.relative_to(output)),
                        "seconds": time.perf_counter() - began}) + "\n")
        results = with_relative_step_time(with_training_facts(read_results(results_file),
                                                              output))
        rows = aggregate(results)
        found = write_paired(output, results, rows, experiment.reference)
        write_tables(rows, output, found)
        for artifact in (TABLES, SUMMARY, RESULTS, PAIRED):
            parent.log_artifact(output / artifact)
        if (output / RECORDS).is_dir():
            parent.log_artifacts(output / RECORDS, RECORDS)
        parent.log_metrics(as_experiment_metrics(found))
        log_seed_figures(results, output, found)
        for chart in experiment_charts(rows, output / CHARTS):
            parent.log_artifact(chart, CHARTS)
    return rows


def check_same_overrides(path: Path, overrides: list[str]) -> None:
    """Record the command line's ``--set`` in ``path``; a resumed experiment must give the same
    ones (else its seeds would mix two configurations)."""
    if path.is_file():
        recorded = json.loads(path.read_text())
        if recorded != overrides:
            raise ConfigError(f"--set: this experiment ran with {recorded} ({path}), now "
                              f"{overrides}; give the same settings or a new --output")
    else:
        path.write_text(json.dumps(overrides) + "\n")


def _training_facts(folder: Path) -> dict[str, float]:
    """The run's training job: its prompt model's trained parameters, its median step time and
    ``prompt_norm``, the mean norm of the direction added at a context position at the last
    step (``direction_norm``; compare with the LM's mean token-embedding norm), from its MLflow
    run."""
    from pipeline.training.checkpoint import load_prompt_model
    from pipeline.training.prompt_models import parameter_count

    facts = {}
    for run_file in folder.glob(f"*/{RUN_FILE}"):
        if not (run_file.parent / CHECKPOINT).is_dir():
            continue
        model = load_prompt_model(run_file.parent / CHECKPOINT)[0]
        facts["prompt_model_parameters"] = float(parameter_count(model))
        saved = read_run_file(run_file)
        client = MlflowClient(tracking_uri=saved["uri"])
        history = client.get_metric_history(saved["run_id"], "step_seconds")
        if history:
            facts["train_step_seconds"] = statistics.median(m.value for m in history)
        norms = client.get_metric_history(saved["run_id"], "direction_norm")
        if norms:
            facts["prompt_norm"] = max(norms, key=lambda m: m.step).value
    return facts


def with_training_facts(results: list[dict], output: Path) -> list[dict]:
    """Each result with the training facts its run folder gives and its line lacks (a line
    written before a fact was kept gets it at the next tabulation); the folder is read only
    where something is missing, and a folder that is gone changes nothing."""
    found: dict[Path, dict[str, float]] = {}
    for r in results:
        folder = output / r["dataset"] / r["arm"] / f"seed{r['seed']}"
        if r["arm"] == BASELINE or not folder.is_dir() or all(
                name in r["metrics"] for name in TRAINING_FACTS):
            continue
        if folder not in found:
            found[folder] = _training_facts(folder)
        r["metrics"] = {**found[folder], **r["metrics"]}
    return results


def with_relative_step_time(results: list[dict]) -> list[dict]:
    """Each result with ``step_time_vs_prompt_tuning``: its step time over the prompt-tuning
    arm's median step time on the same data set."""
    baseline: dict[str, list[float]] = {}
    for r in results:
        if r["arm"] == "prompt_tuning" and "train_step_seconds" in r["metrics"]:
            baseline.setdefault(r["dataset"], []).append(r["metrics"]["train_step_seconds"])
    for r in results:
        steps, base = r["metrics"].get("train_step_seconds"), baseline.get(r["dataset"])
        if steps is not None and base:
            r["metrics"]["step_time_vs_prompt_tuning"] = steps / statistics.median(base)
    return results


def write_tables(rows: list[Row], output: Path, found: list[PairedRow]) -> None:
    """``tables.md``: per evaluation set, mean ± std over seeds, then the paired figures of
    each method against the reference (pooled over seeds, and each seed's)."""
    eval_sets = list(dict.fromkeys(row.eval_set for row in rows))
    text = []
    for eval_set in eval_sets:
        # test-time selection's metric, beside pass@1, where the runs have it
        selected = ["select_pass_at_1"] if any("select_pass_at_1" in r.mean for r in rows) else []
        metrics = TABLE_METRICS[:1] + selected + TABLE_METRICS[1:]
        text.append(f"## {eval_set}\n\n{markdown_table(rows, metrics, eval_set)}\n")
        paired = markdown_paired(found, eval_set)
        if paired:
            text.append(f"Paired against the reference on the same tasks: difference [95% "
                        f"bootstrap interval] p (tasks x seeds; docs/statistics.md). The pooled "
                        f"interval resamples tasks and seeds; each seed's is its own.\n\n"
                        f"{paired}\n")
    (output / TABLES).write_text("\n".join(text))
    (output / SUMMARY).write_text(json.dumps([asdict(r) for r in rows], indent=1) + "\n")
