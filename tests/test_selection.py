"""Test-time selection by a visible test: the visible tests the data's prompts show, the rule
(the first candidate that passes the visible test, scored on all the tests; else the first) in
the real sandbox, and the metric in the records and the paired statistics (metrics.json and
MLflow: tests/test_execution.py, the user file's evaluation)."""
from __future__ import annotations

import pytest

from pipeline.config import ExecutionConfig
from pipeline.data.example import Example
from pipeline.data.loaders import load_examples
from pipeline.data.visible import visible_tests
from pipeline.scoring.execution import score_execution
from pipeline.scoring.results import ResultStore
from pipeline.scoring.selection import first_passing
from pipeline.scoring.task_records import compare_to_reference, task_records
from pipeline.studies.paired import comparison_metrics

FAST = ExecutionConfig(timeout_s=20.0, cpu_s=1, workers=2, num_samples=3, ks=[1, 3],
                       visible_selection=True)


def test_visible_tests_of_mbpp_and_humaneval():
    mbpp = load_examples("mbpp", "test", limit=1)[0]  # task 11: the first assert, as shown
    shown = mbpp.input.removeprefix("Your code should pass this test:\n")
    assert visible_tests(mbpp) == shown + "\n" and shown.startswith("assert ")
    assert shown in mbpp.tests and mbpp.tests.count("assert") == 3
    tasks = {e.id: e for e in load_examples("humaneval", "test")}
    # doctests: `>>> expr` and a literal output
    assert visible_tests(tasks["HumanEval/0"]) == (
        "assert (has_close_elements([1.0, 2.0, 3.0], 0.5)) == (False)\n"
        "assert (has_close_elements([1.0, 2.8, 3.0, 4.0, 5.0, 2.0], 0.3)) == (True)\n")
    # no output after an expression: None; a comment in the example does not leak in
    assert visible_tests(tasks["HumanEval/12"]).startswith("assert (longest([])) is None\n")
    assert "#" not in visible_tests(tasks["HumanEval/32"])
    # example lines `entry(args) ==> value`, literal arguments and values only
    assert visible_tests(tasks["HumanEval/66"]).splitlines()[:2] == [
        "assert digitSum('') == 0", "assert digitSum('abAB') == 131"]
    assert visible_tests(tasks["HumanEval/97"]).splitlines()[0] == \
        "assert multiply(148, 412) == 16"  # "should return 16." less its full stop
    # no examples at all (38), only prose ones (41), `true` is no Python literal (76)
    for task in ("HumanEval/38", "HumanEval/41", "HumanEval/76"):
        assert visible_tests(tasks[task]) is None, task
    none = sorted(i for i, e in tasks.items() if visible_tests(e) is None)
    assert len(none) == 33  # docs/execution.md lists them
    # a user's record may carry its own; a task without a prompt or one has none
    assert visible_tests(Example("u", "x", "y", meta={"visible_tests": "assert 1\n"})) == \
        "assert 1\n"
    assert visible_tests(Example("u", "x", "y")) is None


def test_first_passing_falls_back_to_the_first():
    assert first_passing(["failed", "passed", "passed"]) == 1
    assert first_passing(["failed", "timeout"]) == 0
    assert first_passing(None) == 0


PROMPT = 'def double(x):\n    """Twice x.\n    >>> double(1)\n    2\n    """\n'
DOUBLE = Example("he/d", "Complete", PROMPT + "    return 2 * x\n",
                 tests="def check(candidate):\n    assert candidate(1) == 2\n"
                       "    assert candidate(3) == 6\n\ncheck(double)\n",
                 meta={"prompt": PROMPT, "entry_point": "double"})
UNSHOWN = Example("he/u", "Complete", 'def one():\n    """One."""\n    return 1\n',
                  tests="def check(candidate):\n    assert candidate() == 1\n\ncheck(one)\n",
                  meta={"prompt": 'def one():\n    """One."""\n', "entry_point": "one"})
SQUARE = Example("m/s", "square", "def sq(x):\n    return x * x\n",
                 tests="assert sq(2) == 4\nassert sq(3) == 9\n",
                 meta={"visible_tests": "assert sq(2) == 4\n"})
CANDIDATES = {
    # the first passes the visible test only, the second all the tests: the first is kept
    "he/d": ["    return x + 1\n", "    return 2 * x\n", "    return 2 * x\n"],
    # no visible test: the first, though the second would pass
    "he/u": ["    return 0\n", "    return 1\n", "    return 1\n"],
    # the visible test rejects the first, passes the third (the second never ends)
    "m/s": ["def sq(x):\n    return 2 * x + 1\n", "def sq(x):\n    while True: pass\n",
            "def sq(x):\n    return x ** 2\n"],
}


def _store(path, method, candidates) -> ResultStore:
    store = ResultStore(path)
    store.append({"id": i, "method": method, "generation": texts[0], "reference": "",
                  "code_ce": 1.0, "samples": texts} for i, texts in candidates.items())
    return store


def test_selection_keeps_the_first_candidate_that_passes_the_visible_test(tmp_path):
    examples = [DOUBLE, UNSHOWN, SQUARE]
    store = _store(tmp_path / "samples.jsonl", "m", CANDIDATES)
    metrics = score_execution(store, "m", examples, FAST)
    records = {r["id"]: r for r in store.load()}
    assert records["he/d"]["visible_statuses"] == ["passed", "passed", "passed"]
    assert (records["he/d"]["selected"], records["he/d"]["selected_status"]) == (0, "failed")
    assert records["he/u"]["visible_statuses"] is None
    assert (records["he/u"]["selected"], records["he/u"]["selected_status"]) == (0, "failed")
    assert records["m/s"]["visible_statuses"] == ["failed", "timeout", "passed"]
    assert (records["m/s"]["selected"], records["m/s"]["selected_status"]) == (2, "passed")
    assert metrics["select_pass_at_1"] == pytest.approx(1 / 3)
    assert (metrics["select_k"], metrics["select_visible_tasks"],
            metrics["select_visible_found"]) == (3, 2, 2)
    assert metrics["pass_at_1"] == pytest.approx((2 / 3 + 2 / 3 + 1 / 3) / 3)
    size = store.path.stat().st_size  # selected records are not run again
    assert score_execution(store, "m", examples, FAST) == metrics
    assert store.path.stat().st_size == size

    # the per-task records carry it, and the paired statistics compare it across methods
    better = {**CANDIDATES, "he/d": CANDIDATES["he/d"][1:] + CANDIDATES["he/d"][:1]}
    store = _store(tmp_path / "samples.jsonl", "other", better)
    assert score_execution(store, "other", examples, FAST)["select_pass_at_1"] == \
        pytest.approx(2 / 3)
    rows = task_records(store.load(), seed=0, chains={"m": "sample", "other": "sample"})
    row = next(r for r in rows if (r.method, r.task_id) == ("m", "m/s"))
    assert (row.selected_status, row.selected_sample, row.visible_passed) == ("passed", 2, 1)
    assert next(r for r in rows if r.task_id == "he/u").visible_passed is None
    figure = compare_to_reference(rows, "m")["other"]["select_pass_at_1"]
    assert figure.difference == pytest.approx(1 / 3) and figure.n_tasks == 3
    paired = comparison_metrics(rows, "m")  # what metrics.json and MLflow get
    assert paired["other"]["select_pass_at_1_diff"] == pytest.approx(1 / 3)
    assert paired["m"]["select_pass_at_1_diff"] == 0.0  # the reference, against itself
