"""An experiment's paired statistics: per evaluation set, one combined per-task table of every run
(``<output>/task_records/<eval set>.csv.gz``, each method named ``<arm>/<method>``, e.g.
``baseline/manual``, ``ddpt_conditional/ddpt_ddim``), and each arm's method against the
reference (``eval.reference_method``: the baseline's run of it) on the same tasks, pooled over
seeds (a bootstrap over tasks x seeds) beside each seed's own figure (docs/statistics.md).

A run's table is ``task_records.csv.gz`` in its comparison folder (``ddpt run``'s, written as it
finishes); the combined tables are rebuilt from them whenever the experiment tabulates. Beside
each combined table, ``<eval set>.json`` holds its reference and each method's training facts
(trained parameters, the prompt's norm at the last step, step time relative to prompt
tuning): the two files are what
``docs/results/`` commits behind a table of docs/results.md (``ddpt tables``).
"""
from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.scoring.stats import PairedDifference, as_metrics
from pipeline.scoring.task_records import (
    FILENAME,
    TaskRecord,
    compare_to_reference,
    read_table,
    write_table,
)
from pipeline.studies.experiment import BASELINE, Row

log = logging.getLogger(__name__)
RECORDS = "task_records"  # <output>/task_records/<eval set>.csv.gz and .json
PAIRED = "paired.json"
# what a run's training job gives (experiment_job._training_facts), then what is derived from
# several runs
TRAINING_FACTS = ("prompt_model_parameters", "prompt_norm", "train_step_seconds")
FACTS = (*TRAINING_FACTS, "step_time_vs_prompt_tuning")


@dataclass
class PairedRow:
    """One method of an evaluation set against ``reference``: pooled over its seeds and each
    seed's own; ``error``: why there are no figures (the runs did not share their tasks)."""

    eval_set: str
    method: str
    reference: str
    pooled: dict[str, PairedDifference] = field(default_factory=dict)
    seeds: dict[int, dict[str, PairedDifference]] = field(default_factory=dict)
    error: str = ""


def table_path(result: dict, output: Path) -> Path:
    """The per-task table of one results line (``task_records``: its path under ``output``;
    older lines without it: the run folder's, or its extra evaluation set's subfolder)."""
    if "task_records" in result:
        return output / result["task_records"]
    folder = output / result["dataset"] / result["arm"] / f"seed{result['seed']}"
    extra = folder / result["eval_set"] / FILENAME
    return extra if extra.is_file() else folder / FILENAME


def label_prefix(result: dict, results: list[dict]) -> str:
    """``<arm>/``, or ``<data set>/<arm>/`` when several data sets feed the experiment."""
    several = len({r["dataset"] for r in results}) > 1
    return f"{result['dataset']}/{result['arm']}/" if several else f"{result['arm']}/"


def combined_tables(results: list[dict], output: Path) -> dict[str, list[TaskRecord]]:
    """{eval set: every run's rows, methods named ``<arm>/<method>`` (``<data set>/<arm>/
    <method>`` when several data sets feed the experiment)}; runs without a table are left out
    (with a warning)."""
    tables: dict[str, list[TaskRecord]] = {}
    seen = set()
    for result in results:
        path = table_path(result, output)
        if path in seen:
            continue
        seen.add(path)
        if not path.is_file():
            log.warning("experiment: %s is missing: run %s/%s seed %d has no per-task table",
                        path, result["dataset"], result["arm"], result["seed"])
            continue
        prefix = label_prefix(result, results)
        tables.setdefault(result["eval_set"], []).extend(
            dataclasses.replace(row, method=prefix + row.method) for row in read_table(path))
    return tables


def reference_label(labels: list[str], reference: str) -> str | None:
    """The main run of the reference among ``labels`` of one data set: the baseline's run of
    it, else the first arm's."""
    candidates = [label for label in labels if label.rsplit("/", 1)[-1] == reference]
    baseline = [label for label in candidates if label.rsplit("/", 2)[-2] == BASELINE]
    return (baseline or candidates or [None])[0]


def partner(label: str, labels: list[str], reference: str) -> str | None:
    """The run of the reference that ``label`` is paired with: its own arm's (the same model and
    seeds), else the baseline's, else the first arm's. A run of the reference itself is paired
    with the baseline's only (None without one)."""
    own = f"{label.rsplit('/', 1)[0]}/{reference}"
    if label.rsplit("/", 1)[-1] != reference and own in labels:
        return own
    if label.rsplit("/", 1)[-1] == reference:
        chosen = reference_label(labels, reference)
        return chosen if chosen != label and chosen.rsplit("/", 2)[-2] == BASELINE else None
    return reference_label(labels, reference)


def paired_rows(eval_set: str, rows: list[TaskRecord], reference: str) -> list[PairedRow]:
    """Each method of one evaluation set's combined table against its run of the reference
    (:func:`partner`, within its data set), pooled and per seed."""
    labels = list(dict.fromkeys(row.method for row in rows))
    groups: dict[str, list[str]] = {}
    for label in labels:
        groups.setdefault(label.rsplit("/", 2)[0] if label.count("/") > 1 else "", []).append(
            label)
    out = []
    for group in groups.values():
        if reference_label(group, reference) is None:
            log.warning("experiment: %s has no run of the reference %r", eval_set, reference)
            continue
        for label in group:
            chosen = partner(label, group, reference)
            if chosen is None:
                continue
            pair = [row for row in rows if row.method in (label, chosen)]
            found = PairedRow(eval_set, label, chosen)
            try:
                found.pooled = compare_to_reference(pair, chosen).get(label, {})
                for seed in sorted({row.seed for row in pair if row.method == label}):
                    found.seeds[seed] = compare_to_reference(pair, chosen, seed=seed).get(
                        label, {})
            except ValueError as err:  # an hours-long experiment keeps its tables
                log.warning("experiment: %s %s against %s: %s", eval_set, label, chosen, err)
                found.error = str(err)
            out.append(found)
    return out


def training_facts(rows: list[Row], eval_set: str) -> dict[str, dict[str, float]]:
    """{``<arm>/<method>``: its mean over seeds of each :data:`FACTS` it has}."""
    return {f"{row.arm}/{row.method}": {name: row.mean[name] for name in FACTS
                                        if name in row.mean}
            for row in rows if row.eval_set == eval_set}


def write_paired(output: Path, results: list[dict], rows: list[Row], reference: str
                 ) -> list[PairedRow]:
    """The combined tables (with their facts), the paired figures of every evaluation set
    (``paired.json``); returns them."""
    found = []
    for eval_set, table in combined_tables(results, output).items():
        write_table(output / RECORDS / f"{eval_set}.csv.gz", table)
        figures = paired_rows(eval_set, table, reference)
        labels = list(dict.fromkeys(row.method for row in table))
        sidecar = {"reference": reference_label(labels, reference) or reference,
                   "facts": training_facts(rows, eval_set)}
        (output / RECORDS / f"{eval_set}.json").write_text(
            json.dumps(sidecar, indent=1, sort_keys=True) + "\n")
        found += figures
    (output / PAIRED).write_text(json.dumps([_as_dict(row) for row in found], indent=1) + "\n")
    return found


def _as_dict(row: PairedRow) -> dict:
    return {"eval_set": row.eval_set, "method": row.method, "reference": row.reference,
            "pooled": {m: dataclasses.asdict(f) for m, f in row.pooled.items()},
            "seeds": {str(s): {m: dataclasses.asdict(f) for m, f in by_metric.items()}
                      for s, by_metric in row.seeds.items()},
            "error": row.error}


def read_paired(path: Path) -> list[PairedRow]:
    """``paired.json`` back as :class:`PairedRow` s."""
    out = []
    for item in json.loads(Path(path).read_text()):
        out.append(PairedRow(
            item["eval_set"], item["method"], item["reference"],
            {m: PairedDifference(**f) for m, f in item["pooled"].items()},
            {int(s): {m: PairedDifference(**f) for m, f in by_metric.items()}
             for s, by_metric in item["seeds"].items()}, item.get("error", "")))
    return out


def markdown_paired(found: list[PairedRow], eval_set: str) -> str:
    """One evaluation set's paired figures as a Markdown table: a row per (method, metric),
    the pooled figure, then each seed's."""
    chosen = [row for row in found if row.eval_set == eval_set]
    if not chosen:
        return ""
    seeds = sorted({s for row in chosen for s in row.seeds})
    head = "| method | against | metric | pooled over seeds | " + " | ".join(
        f"seed {s}" for s in seeds) + " |"
    lines = [head, "| " + " | ".join(["---"] * (4 + len(seeds))) + " |"]
    for row in chosen:
        if row.error:
            lines.append(f"| {row.method} | {row.reference} | - | {row.error} |"
                         + " |" * len(seeds))
            continue
        for metric, pooled in row.pooled.items():
            cells = [row.seeds[s][metric].format() if metric in row.seeds.get(s, {}) else ""
                     for s in seeds]
            lines.append(f"| {row.method} | {row.reference} | {metric} | {pooled.format()} | "
                         + " | ".join(cells) + " |")
    return "\n".join(lines)


def as_experiment_metrics(found: list[PairedRow]) -> dict[str, float]:
    """The pooled figures as the experiment run's MLflow metrics:
    ``<eval set>.<arm>/<method>.pass_at_1_diff``, ..."""
    return {f"{row.eval_set}.{row.method}.{name}": value for row in found
            for figure in row.pooled.values() for name, value in as_metrics(figure).items()}


def log_seed_figures(results: list[dict], output: Path, found: list[PairedRow]) -> None:
    """Each seed's figures on the MLflow run of that method in that seed's comparison, beside
    its metrics (``pass_at_1_diff``, ...: against the experiment's reference)."""
    from pipeline.studies.comparison import COMPARISON_FILE
    from pipeline.tracking import ROLE_TAG, RunTracker, child_runs, read_run_file

    by_label = {(row.eval_set, row.method): row for row in found}
    children: dict[Path, dict[str, tuple]] = {}
    for result in results:
        row = by_label.get((result["eval_set"], label_prefix(result, results) + result["method"]))
        figures = row.seeds.get(result["seed"]) if row else None
        run_file = table_path(result, output).parent / COMPARISON_FILE
        if not figures or not run_file.is_file():
            continue
        if run_file not in children:
            saved = read_run_file(run_file)
            children[run_file] = {
                run.data.tags.get("ddpt.method"): (saved["uri"], run.info.run_id,
                                                   run.info.experiment_id)
                for run in child_runs(saved["uri"], saved["run_id"])
                if run.data.tags.get(ROLE_TAG) == "method"}
        if result["method"] in children[run_file]:
            metrics = {name: value for figure in figures.values()
                       for name, value in as_metrics(figure).items()}
            RunTracker(*children[run_file][result["method"]]).log_metrics(metrics)
