"""Test-time selection by a visible test: which of a task's k candidates is kept, and the
protocol's metric (docs/execution.md, "Selection by a visible test").

A task's candidates are its ``samples[:n]`` in sampling order (``execution.num_samples`` = n,
so k = n), or its one ``generation`` when n = 1. Each is run against the task's visible test
(:func:`pipeline.data.visible.visible_tests`); the first that passes it is selected, and its
verdict on the task's full tests is the task's outcome. When none passes, or the task has no
visible test, the first candidate is selected. The sandbox runs live in
:func:`pipeline.scoring.execution.score_execution`; this module holds the rule.

Fields a record gets (``samples.jsonl``):
    visible_statuses   each candidate's status on the visible test, in order; null when the
                       task has no visible test
    selected           the index of the selected candidate
    selected_status    its status on the task's full tests
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

from pipeline.scoring.passk import PASSED

METRIC = "select_pass_at_1"  # MLflow forbids '@': select_pass@1


def candidates(record: dict, n: int) -> tuple[list[str], list[str]]:
    """The candidates' texts and their statuses on the full tests (a scored record)."""
    if n == 1:
        return [record["generation"]], [record["status"]]
    return list(record["samples"][:n]), list(record["statuses"])


def first_passing(visible_statuses: Sequence[str] | None) -> int:
    """The index of the first candidate that passed the visible test; 0 when none did or the
    task has no visible test (None)."""
    for index, status in enumerate(visible_statuses or ()):
        if status == PASSED:
            return index
    return 0


def is_selected(record: dict, n: int) -> bool:
    """Has selection run on this record, with n candidates?"""
    if "selected_status" not in record:
        return False
    visible = record.get("visible_statuses")
    return visible is None or len(visible) == n


def select(record: dict, visible_statuses: list[str] | None, n: int) -> None:
    """Write the selection's fields into ``record`` (scored on its full tests already)."""
    _, full = candidates(record, n)
    chosen = first_passing(visible_statuses)
    record["visible_statuses"] = visible_statuses
    record["selected"] = chosen
    record["selected_status"] = full[chosen]


def selection_metrics(records: Iterable[dict], k: int) -> dict[str, float]:
    """``select_pass_at_1`` (the share of tasks whose selected candidate passed all their
    tests), ``select_k`` (candidates per task), ``select_visible_tasks`` (tasks that have a
    visible test) and ``select_visible_found`` (tasks where a candidate passed it)."""
    records = list(records)
    passed = sum(r["selected_status"] == PASSED for r in records)
    visible = [r["visible_statuses"] for r in records if r["visible_statuses"] is not None]
    return {METRIC: passed / len(records) if records else float("nan"), "select_k": k,
            "select_visible_tasks": len(visible),
            "select_visible_found": sum(PASSED in v for v in visible)}
