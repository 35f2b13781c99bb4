"""What every loader shares: the located `DataError`, the seeded carve, and the checks of a
user's record (a JSONL line or a table row read through `datasets`), of its tests (the
sandbox's own rule, :mod:`pipeline.sandbox.cases`) and of its split."""
from __future__ import annotations

import os
import random
import warnings
from collections.abc import Callable
from typing import Any

from pipeline.sandbox import cases

SEED = 0


class DataError(ValueError):
    """A data problem, located as precisely as possible: the file, the 1-based line (text
    files) or row (tables read through `datasets`), the record field and the file's column."""

    def __init__(self, problem: str, path: str | os.PathLike | None = None,
                 line: int | None = None, field: str | None = None, *, hint: str = "",
                 row: int | None = None, column: str | None = None) -> None:
        self.path = str(path) if path is not None else None
        self.line, self.row, self.field, self.column = line, row, field, column
        where = ("" if path is None else f"{path}:{line}: " if line is not None
                 else f"{path}: row {row}: " if row is not None else f"{path}: ")
        what = f"field {field!r}" if field else ""
        if field and column and column != field:
            what += f" (column {column!r})"
        super().__init__(f"{where}{what + ': ' if what else ''}{problem}"
                         + (f". {hint}" if hint else ""))


def carve(n: int, sizes: dict[str, int]) -> list[str]:
    """Split name for each of n items: a seeded permutation fills `sizes` in order, rest train."""
    order = list(range(n))
    random.Random(SEED).shuffle(order)
    names = ["train"] * n
    start = 0
    for name, size in sizes.items():
        for i in order[start:start + size]:
            names[i] = name
        start += size
    return names


SPLITS = ("train", "validation", "test")
# Not a split: every record of a data set, whatever its split (`ddpt evaluate` on your own file).
ALL_RECORDS = "all"
USER_FIELDS = ("id", "instruction", "input", "output", "tests", "split")  # of a user's record
Locate = Callable[[str, str], DataError]  # (problem, field) -> the error, at its file and record


def _user_text(obj: dict, name: str, fail: Locate, *, required: bool,
               nonempty: bool) -> str | None:
    """obj[name] as a string (None when missing/null and not `required`)."""
    value, need = obj.get(name), "a non-empty string" if nonempty else "a string"
    if value is None:
        if required:
            raise fail(f"missing (expected {need})", name)
        return None
    if not isinstance(value, str):
        raise fail(f"got {type(value).__name__} {value!r:.40}, expected {need}", name)
    if nonempty and not value.strip():
        raise fail(f"empty (expected {need})", name)
    return value


def user_record(obj: dict, fail: Locate) -> dict[str, Any]:
    """A user's record (keyed by the record's field names), validated: id, instruction, input,
    output, tests, split (None when absent)."""
    raw_id = obj.get("id")
    if isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)) or not str(raw_id).strip():
        raise fail(f"got {raw_id!r:.40}, expected a non-empty string or an integer", "id")
    split = _user_text(obj, "split", fail, required=False, nonempty=True)
    if split is not None and split not in SPLITS:
        raise fail(f"got {split!r}, expected one of {', '.join(SPLITS)}", "split")
    record = {"id": str(raw_id), "instruction": _user_text(obj, "instruction", fail,
                                                           required=True, nonempty=True),
              "input": _user_text(obj, "input", fail, required=False, nonempty=False) or "",
              "output": _user_text(obj, "output", fail, required=True, nonempty=True),
              "tests": _user_text(obj, "tests", fail, required=False, nonempty=False),
              "split": split}
    check_tests(record["tests"], lambda problem: fail(f"record {record['id']!r}: {problem}",
                                                      "tests"))
    return record


def check_tests(tests: str | None, fail: Callable[[str], DataError]) -> None:
    """Tests that can judge a program, by the sandbox's rule (:func:`cases.split`): they parse and
    hold a statement that can fail (tests of only comments or ``pass`` would let every program
    pass); else ``fail(problem)``. Blank tests are no tests: the record is not executed."""
    if tests is None or not tests.strip():
        return
    try:
        with warnings.catch_warnings():  # "\\d" in a plain string: the test author's business
            warnings.simplefilter("ignore")
            cases.split(tests)
    except ValueError as err:
        raise fail(str(err)) from None


def check_unique(ex_id: str, seen: dict[str, int], at: int, unit: str, fail: Locate) -> None:
    """Record `ex_id` as seen at line/row `at`; a DataError if an earlier record had it."""
    if ex_id in seen:
        raise fail(f"duplicate id {ex_id!r} ({unit}s {seen[ex_id]} and {at})", "id")
    seen[ex_id] = at


def user_splits(given: list[str | None], missing: Callable[[int], DataError]) -> list[str]:
    """Each record's split: as given when every record has one; the seeded carve when none has
    (max(1, n // 10) test, as many validation, the rest train; all train below 3 records);
    ``missing(i)`` (the error at record i) when only some have one."""
    absent = [i for i, name in enumerate(given) if name is None]
    if not absent:
        return [str(name) for name in given]
    if len(absent) < len(given):
        raise missing(absent[0])
    n = len(given)
    held = max(1, n // 10) if n >= 3 else 0
    return carve(n, {"test": held, "validation": held})


MISSING_SPLIT = "missing, but other records have one (give every record a split, or none)"
