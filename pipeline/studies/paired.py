"""Paired statistics in a comparison: every method against the reference method
(``eval.reference_method``) on the same tasks, from the comparison's per-task table.

The table (``task_records.csv.gz`` beside ``metrics.json``; :mod:`pipeline.scoring.task_records`)
is the source of truth: metrics.json, the methods' MLflow runs, the printed tables, ``ddpt
compare`` and report.html all compute their figures from it with
:func:`~pipeline.scoring.task_records.compare_to_reference` (a fixed bootstrap seed: the same
table gives the same figures everywhere). What each figure means: docs/statistics.md.
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from pipeline.config import ConfigError, load_yaml
from pipeline.scoring.results import ResultStore
from pipeline.scoring.stats import (
    PairedDifference,
    as_metrics,
    mean_difference,
    metric_names,
    pass_rate_difference,
)
from pipeline.scoring.task_records import (
    FILENAME,
    SELECT_METRIC,
    TaskRecord,
    chain_label,
    compare_to_reference,
    paired_values,
    read_table,
    task_records,
    write_table,
)

REFERENCE_FIELD = "eval.reference_method"
HIGHER_IS_BETTER = {"pass_at_1": True, SELECT_METRIC: True, "code_ce": False}
PAIRED_SUFFIXES = tuple(name.removeprefix("m") for name in metric_names("m").values())
Figures = dict[str, dict[str, PairedDifference]]  # {method: {metric: figure}}


def check_reference(reference: str, methods: Sequence[str], field: str = REFERENCE_FIELD, *,
                    where: str = "") -> str | None:
    """The reference of a comparison of ``methods``: ``reference`` where two or more methods
    are compared (a ConfigError naming ``where`` and ``field`` if it is not one of them), None
    for one method (nothing to pair)."""
    methods = list(dict.fromkeys(methods))
    if len(methods) < 2:
        return None
    if reference not in methods:
        raise ConfigError(f"{where}{field}: {reference!r} is not one of the compared methods "
                          f"{methods}; compare it too, or set {field} to one of them")
    return reference


def is_paired_metric(name: str) -> bool:
    """True for a paired figure's name (``pass_at_1_diff``, ``code_ce_diff_low``, ...)."""
    return name.endswith(PAIRED_SUFFIXES)


def without_paired(metrics: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """``{method: {metric: value}}`` less the paired figures (they get their own table)."""
    return {method: {k: v for k, v in values.items() if not is_paired_metric(k)}
            for method, values in metrics.items()}


def method_chains(params: Mapping[str, Mapping]) -> dict[str, str]:
    """method -> what ran (``chain_label`` of its MLflow params)."""
    return {method: chain_label(values) for method, values in params.items()}


def write_comparison_table(store: ResultStore, folder: Path, ids: Iterable[str], *, seed: int,
                           chains: Mapping[str, str]) -> Path:
    """``folder/task_records.csv.gz``: the store's records of the methods in ``chains`` on the
    examples ``ids`` (the comparison's), one row per (method, task)."""
    wanted = {str(i) for i in ids}
    records = [r for r in store.load() if r["method"] in chains and str(r["id"]) in wanted]
    return write_table(Path(folder) / FILENAME, task_records(records, seed=seed, chains=chains))


def paired_figures(rows: Iterable[TaskRecord], reference: str | None, *,
                   seed: int | None = None, order: Sequence[str] = ()) -> Figures:
    """Every method of ``rows`` against ``reference`` ({} without one, or when the table has
    no rows of it), in ``order`` (then by name)."""
    rows = list(rows)
    if reference is None or reference not in {row.method for row in rows}:
        return {}
    figures = compare_to_reference(rows, reference, seed=seed)
    rank = {method: i for i, method in enumerate(order)}
    return dict(sorted(figures.items(), key=lambda item: (rank.get(item[0], len(rank)),
                                                          item[0])))


def reference_figures(rows: Iterable[TaskRecord], reference: str, figures: Figures
                      ) -> dict[str, PairedDifference]:
    """The reference against itself in each metric the others were compared in: difference 0,
    interval [0, 0], p 1, and the smallest difference its tasks detect (the comparison's
    planning figure), so that every method's run has the same metric names."""
    rows = list(rows)
    metrics = {metric for by_metric in figures.values() for metric in by_metric}
    out = {}
    for metric, column in (("pass_at_1", "pass_fraction"), (SELECT_METRIC, "select_pass"),
                           ("code_ce", "code_ce")):
        if metric in metrics:
            _, values, _ = paired_values(rows, reference, reference, column)
            compare = mean_difference if metric == "code_ce" else pass_rate_difference
            out[metric] = compare(values, values, metric=metric)
    return out


def comparison_metrics(rows: Iterable[TaskRecord], reference: str | None,
                       order: Sequence[str] = ()) -> dict[str, dict[str, float]]:
    """Every method's paired figures as metrics (the reference's against itself): what a
    comparison adds to metrics.json and its methods' MLflow runs."""
    rows = list(rows)
    figures = paired_figures(rows, reference, order=order)
    if figures:
        figures = {reference: reference_figures(rows, reference, figures), **figures}
    return figures_as_metrics(figures)


def figures_as_metrics(figures: Figures) -> dict[str, dict[str, float]]:
    """{method: {pass_at_1_diff: ..., pass_at_1_diff_low: ..., code_ce_diff: ...}}."""
    out: dict[str, dict[str, float]] = {}
    for method, by_metric in figures.items():
        for figure in by_metric.values():
            out.setdefault(method, {}).update(as_metrics(figure))
    return out


def verdict(figure: PairedDifference) -> str:
    """"better" / "worse" (decided: the interval excludes zero and p <= 0.05), else "no
    detectable difference at n tasks (smallest detectable: x)"."""
    return figure.verdict(higher_is_better=HIGHER_IS_BETTER.get(figure.metric, True))


def format_paired(figures: Figures, reference: str) -> str:
    """A fixed-width text table: a line per (method, metric), the figure and its verdict."""
    if not figures:
        return ""
    width = max(14, *(len(m) + 2 for m in figures))
    lines = [f"paired against {reference}, on the same tasks: difference [95% bootstrap "
             "interval] p (pass_at_1: McNemar exact; code_ce: sign-flip; seeds pooled: tasks x "
             "seeds bootstrap); detects: smallest difference found 4 times in 5",
             f"{'method':<{width}}{'metric':<11}figure"]
    lines.append("-" * (len(lines[-1]) + 60))
    for method, by_metric in figures.items():
        for metric, figure in by_metric.items():
            lines.append(f"{method:<{width}}{metric:<11}{figure.format()}  {verdict(figure)}")
    return "\n".join(lines)


def folder_reference(folder: Path, default: str = "manual") -> str:
    """The reference a finished comparison used: its config.yaml's ``eval.reference_method``."""
    path = Path(folder) / "config.yaml"
    data = (load_yaml(path.read_text()) or {}) if path.is_file() else {}
    return (data.get("eval") or {}).get("reference_method", default)


def folder_figures(folder: Path, reference: str | None = None) -> tuple[str, Figures] | None:
    """(reference, figures) from ``folder``'s per-task table; None without a table.
    ``reference``: default the folder's own."""
    path = Path(folder) / FILENAME
    if not path.is_file():
        return None
    reference = reference or folder_reference(folder)
    metrics = Path(folder) / "metrics.json"
    order = list(json.loads(metrics.read_text())) if metrics.is_file() else []
    return reference, paired_figures(read_table(path), reference, order=order)


def folder_paired_text(folder: Path, reference: str | None = None) -> str:
    """The printed paired table of a finished comparison folder ("" without a table or a
    reference among its methods)."""
    found = folder_figures(folder, reference)
    return format_paired(found[1], found[0]) if found else ""
