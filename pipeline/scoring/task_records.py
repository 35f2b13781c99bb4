"""Per-task records: the small table a comparison's figures rest on, kept so they can be
re-checked (and, for the tables in docs/results.md, committed under docs/results/).

One row per (method, seed, task): what the task's code did (``status``), the reference code's
cross-entropy under the method's prompt (``code_ce``), the prompt chain and decoding that ran
(``chain``), how many of the task's test cases that code passed (``cases_passed`` of
``cases_total``, as the sandbox counts them), with several samples per task how many of them
passed, and with test-time selection (``execution.visible_selection``) which candidate the
visible test selected and its verdict. Stored as gzip'd CSV in a
fixed column order, rows sorted, floats in Python's shortest round-trip form and the gzip header's
time set to 0, so the same records give the same bytes and committed files do not churn.
"""
from __future__ import annotations

import csv
import gzip
import io
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from pipeline.scoring.stats import (
    RESAMPLES,
    PairedDifference,
    mean_difference,
    pass_rate_difference,
)

FILENAME = "task_records.csv.gz"  # next to metrics.json
PASSED = "passed"  # the sandbox's status of a passing program (pipeline/scoring/passk.py)
SELECT_METRIC = "select_pass_at_1"  # test-time selection's (pipeline/scoring/selection.py)


@dataclass(frozen=True)
class TaskRecord:
    """One method's result on one task in one seed's comparison. ``status``: passed, failed,
    timeout or error ("" when the task was not executed); ``code_ce``: None when not scored;
    ``cases_passed`` / ``cases_total``: the test cases the (greedy) program passed, of the
    task's, None when not executed or not counted (a program that did not run to its tests);
    ``samples_passed`` / ``samples_run``: None with one (greedy) generation per task;
    ``selected_status``: the full-test status of the candidate test-time selection kept (""
    without selection), ``selected_sample`` its index, ``visible_passed`` how many candidates
    passed the visible test (None without selection or without a visible test)."""

    method: str
    seed: int
    task_id: str
    status: str
    code_ce: float | None
    chain: str
    cases_passed: int | None = None
    cases_total: int | None = None
    samples_passed: int | None = None
    samples_run: int | None = None
    selected_status: str = ""
    selected_sample: int | None = None
    visible_passed: int | None = None

    @property
    def pass_fraction(self) -> float:
        """The task's pass@1: the share of its samples that passed, else 1/0 by its status (NaN
        when it was not executed)."""
        if self.samples_run:
            return self.samples_passed / self.samples_run
        return float(self.status == PASSED) if self.status else math.nan

    @property
    def select_pass(self) -> float:
        """1/0: did the selected candidate pass all the task's tests (NaN without selection)."""
        return float(self.selected_status == PASSED) if self.selected_status else math.nan


COLUMNS = tuple(f.name for f in fields(TaskRecord))
OLDEST = COLUMNS.index("samples_run") + 1  # the columns of the first committed tables


def chain_label(params: Mapping) -> str:
    """What ran, from a method's MLflow params (``comparison.method_params``): the prompt's
    chain when the prompt model has one, then the decoding: ``ddim-3 eta=0 + greedy``,
    ``deterministic + greedy``, ``greedy``, ``diffusion+spa-128``."""
    decoding = str(params["decoding"])
    if "diffusion_steps" in params:
        decoding += f"-{params['diffusion_steps']}"
    if "chain" not in params:
        return decoding
    chain = str(params["chain"])
    if chain != "deterministic":
        chain += f"-{params['steps']} eta={float(params['eta']):g}"
    return f"{chain} + {decoding}"


def task_records(records: Iterable[dict], *, seed: int, chains: Mapping[str, str]
                 ) -> list[TaskRecord]:
    """The table of a comparison from its results store's records (``ResultStore.load()``:
    ``id``, ``method``, ``code_ce``, ``status``, ``cases_passed``/``cases_total``, ``statuses``
    when several samples ran).
    ``chains``: method -> :func:`chain_label` of what ran; ``seed``: the run's training seed."""
    rows = []
    for record in records:
        method, task = record["method"], str(record["id"])
        if method not in chains:
            raise ValueError(f"task records: no chain given for method {method!r} (task "
                             f"{task!r}); chains name {sorted(chains)}")
        statuses = record.get("statuses")
        rows.append(TaskRecord(
            method=method, seed=seed, task_id=task, status=record.get("status", ""),
            code_ce=None if record.get("code_ce") is None else float(record["code_ce"]),
            chain=chains[method], cases_passed=_count(record, "cases_passed"),
            cases_total=_count(record, "cases_total"),
            samples_passed=None if statuses is None else sum(s == PASSED for s in statuses),
            samples_run=None if statuses is None else len(statuses),
            selected_status=record.get("selected_status", ""),
            selected_sample=_count(record, "selected"),
            visible_passed=None if record.get("visible_statuses") is None
            else sum(s == PASSED for s in record["visible_statuses"])))
    return sorted(rows, key=_order)


def _count(record: dict, name: str) -> int | None:
    value = record.get(name)
    return None if value is None else int(value)


def _order(row: TaskRecord) -> tuple:
    return row.method, row.seed, row.task_id


def _cell(value) -> str:
    if value is None:
        return ""
    return repr(value) if isinstance(value, float) else str(value)


def table_bytes(rows: Iterable[TaskRecord]) -> bytes:
    """The gzip'd CSV of ``rows``: the same rows, in any order, give the same bytes."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(COLUMNS)
    for row in sorted(rows, key=_order):
        writer.writerow([_cell(getattr(row, name)) for name in COLUMNS])
    buffer = io.BytesIO()
    # mtime 0 and no file name in the header: the bytes depend on the rows only
    with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, compresslevel=9,
                       mtime=0) as packed:
        packed.write(text.getvalue().encode("utf-8"))
    return buffer.getvalue()


def write_table(path: str | Path, rows: Iterable[TaskRecord]) -> Path:
    """Write ``rows`` to ``path`` (``*.csv.gz``), whole or not at all."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(table_bytes(rows))
    os.replace(partial, path)
    return path


def read_table(path: str | Path) -> list[TaskRecord]:
    """The rows of a table written by :func:`write_table`; a wrong header or cell raises a
    ValueError naming the file, line and column."""
    path = Path(path)
    try:
        text = gzip.decompress(path.read_bytes()).decode("utf-8")
    except (OSError, EOFError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not a gzip'd UTF-8 task table ({err})") from err
    lines = csv.reader(io.StringIO(text))
    header = next(lines, None)
    # a table written before the later columns existed has the first of them, in order
    if header is None or tuple(header) != COLUMNS[:len(header)] or len(header) < OLDEST:
        raise ValueError(f"{path}:1: header {header} is not {list(COLUMNS)}")
    return [_parse(cells, f"{path}:{number}", tuple(header))
            for number, cells in enumerate(lines, start=2)]


def _parse(cells: list[str], where: str, header: tuple[str, ...] = COLUMNS) -> TaskRecord:
    if len(cells) != len(header):
        raise ValueError(f"{where}: {len(cells)} cells, expected {len(header)}")
    values = dict(zip(header, cells))
    parsed: dict = {"method": values["method"], "task_id": values["task_id"],
                    "status": values["status"], "chain": values["chain"],
                    "selected_status": values.get("selected_status", "")}
    for name, kind in (("seed", int), ("code_ce", float), ("cases_passed", int),
                       ("cases_total", int), ("samples_passed", int), ("samples_run", int),
                       ("selected_sample", int), ("visible_passed", int)):
        if name not in values:
            continue
        cell = values[name]
        if cell == "" and name != "seed":
            parsed[name] = None
            continue
        try:
            parsed[name] = kind(cell)
        except ValueError:
            raise ValueError(f"{where}: column {name!r}: {cell!r} is not a"
                             f"{'n integer' if kind is int else ' number'}") from None
    return TaskRecord(**parsed)


def paired_values(rows: Iterable[TaskRecord], method: str, reference: str, column: str, *,
                  seed: int | None = None) -> tuple[list[str], np.ndarray, np.ndarray]:
    """The task ids and the (tasks, seeds) values of ``method`` and ``reference``, row for row
    on the same tasks. ``column``: ``pass_fraction``,
    ``select_pass`` or ``code_ce``. ``seed``: that seed only,
    else every seed of the method. A reference run once (a seed-free baseline) gives one
    column, set against every seed; otherwise it must have the method's seeds. The other way
    round too: pooled (no ``seed``), a method run once is set against every seed of a reference
    run several times, so that the manual prompt against a trained baseline is the negative of
    the trained baseline against it, not a comparison with its first seed only."""
    grids = {name: _grid(rows, name, column) for name in (method, reference)}
    seeds = sorted(grids[method]) if seed is None else [seed]
    if not set(seeds) <= set(grids[method]):
        raise ValueError(f"task records: {method!r} has no rows for seed {seed}; it has "
                         f"{sorted(grids[method])}")
    if seed is None and len(seeds) == 1 and len(grids[reference]) > 1:
        reference_seeds = sorted(grids[reference])
        seeds = seeds * len(reference_seeds)  # its one column beside each of the reference's
    elif set(seeds) <= set(grids[reference]):
        reference_seeds = seeds
    elif len(grids[reference]) == 1:
        reference_seeds = list(grids[reference])
    else:
        raise ValueError(f"task records: reference {reference!r} ran with seeds "
                         f"{sorted(grids[reference])}, not once and not with {method!r}'s {seeds}")
    tasks = sorted(grids[method][seeds[0]])
    for name, chosen in ((method, seeds), (reference, reference_seeds)):
        for s in chosen:
            if set(grids[name][s]) != set(tasks):
                differ = sorted(set(grids[name][s]) ^ set(tasks))
                raise ValueError(f"task records: {name!r} (seed {s}) and {method!r} (seed "
                                 f"{seeds[0]}) differ in {len(differ)} task(s), e.g. "
                                 f"{differ[:5]}: paired statistics need the same tasks")
    values = [np.array([[grids[name][s][t] for s in chosen] for t in tasks])
              for name, chosen in ((method, seeds), (reference, reference_seeds))]
    return tasks, values[0], values[1]


def _grid(rows: Iterable[TaskRecord], method: str, column: str) -> dict[int, dict[str, float]]:
    """{seed: {task id: value}} of ``method``; a missing value (not executed, not scored)
    raises, naming the method, seed and task."""
    grid: dict[int, dict[str, float]] = {}
    for row in rows:
        if row.method != method:
            continue
        value = getattr(row, column)
        if value is None or math.isnan(value):
            raise ValueError(f"task records: {method!r} seed {row.seed} task {row.task_id!r} "
                             f"has no {column}")
        grid.setdefault(row.seed, {})[row.task_id] = float(value)
    if not grid:
        raise ValueError(f"task records: no rows for method {method!r}")
    return grid


def compare_to_reference(rows: Iterable[TaskRecord], reference: str, *,
                         seed: int | None = None, resamples: int = RESAMPLES
                         ) -> dict[str, dict[str, PairedDifference]]:
    """{method: {"pass_at_1": ..., "select_pass_at_1": ..., "code_ce": ...}} for every method
    but ``reference``, each against it on the same tasks: one seed's (``seed``) or pooled over
    all seeds. pass@1 only where both methods' tasks were executed, select_pass_at_1 only where
    test-time selection ran for both, ``code_ce`` only where both were scored (the data's
    own solutions, ``canonical``, have no prompt to score); a method with neither is left out.
    One row of a kind is enough to take that kind: a missing value among them raises."""
    rows = list(rows)
    executed = {row.method for row in rows if not math.isnan(row.pass_fraction)}
    selected = {row.method for row in rows if row.selected_status}
    scored = {row.method for row in rows if row.code_ce is not None}
    out: dict[str, dict[str, PairedDifference]] = {}
    for method in sorted({row.method for row in rows} - {reference}):
        results = {}
        for metric, column, done in (("pass_at_1", "pass_fraction", executed),
                                     (SELECT_METRIC, "select_pass", selected)):
            if {method, reference} <= done:
                _, ours, theirs = paired_values(rows, method, reference, column, seed=seed)
                results[metric] = pass_rate_difference(ours, theirs, metric=metric,
                                                       resamples=resamples)
        if {method, reference} <= scored:
            _, ours, theirs = paired_values(rows, method, reference, "code_ce", seed=seed)
            results["code_ce"] = mean_difference(ours, theirs, resamples=resamples)
        if results:
            out[method] = results
    return out
