"""Execution-based scoring: build each task's program, run it in the sandbox, pass@k.

Record format in ``samples.jsonl`` (one record per (method, id), see pipeline/results.py):
    generation      the first (greedy) generation; the text metrics score this one
    samples         optional, n >= execution.num_samples strings; with num_samples = n > 1 the
                    first n are executed and `generation` is, by convention, samples[0]
    status          passed | failed | timeout | error, of `generation`
    statuses        with n > 1: the statuses of samples[:n], in order
    exec_message    the sandbox's short message for `status` ("" when passed)
    cases_passed, cases_total   of `generation`: how many of the task's test cases passed
    cases           with n > 1: [passed, total] of each of samples[:n]
    visible_statuses, selected, selected_status   with execution.visible_selection: test-time
                    selection's (pipeline/scoring/selection.py)
Scoring re-appends the updated records (the store keeps the last one per key), chunk by chunk,
so a crash keeps what was scored and a re-run skips it.
"""
from __future__ import annotations

import ast
import dataclasses
import logging
import re
import warnings
from collections.abc import Callable, Iterable, Sequence

from pipeline.config import ExecutionConfig
from pipeline.data.example import Example, missing_tests
from pipeline.data.visible import visible_tests
from pipeline.sandbox import ExecResult, Program, run_programs
from pipeline.scoring import selection
from pipeline.scoring.passk import PASSED, pass_at_k_metrics
from pipeline.scoring.results import ResultStore

log = logging.getLogger(__name__)
CHUNK = 64  # programs per sandbox batch (and per store append)


def build_program(example: Example, code: str) -> str:
    """The program that runs ``code`` against ``example.tests``.

    HumanEval-style examples (``meta`` holds ``prompt`` and ``entry_point``): a completion that
    does not define the entry point is appended to the prompt; a full function is put after
    the prompt, which keeps the prompt's imports and helper functions (HumanEval/38's tests call
    the prompt's ``encode_cyclic``) while the generated definition replaces the stub. Other
    data sets (MBPP, user JSONL): the code, then the tests (MBPP's setup code may use classes
    the code defines, so it runs after the code).
    """
    code = _with_prompt(example, code)
    tests = example.tests or ""
    return code.rstrip("\n") + "\n\n" + tests.rstrip("\n") + "\n" if tests.strip() else code


def _with_prompt(example: Example, code: str) -> str:
    prompt, entry = example.meta.get("prompt"), example.meta.get("entry_point")
    if isinstance(prompt, str) and isinstance(entry, str) and entry:
        defines = re.search(rf"^(async\s+)?def\s+{re.escape(entry)}\s*\(", code, re.MULTILINE)
        code = prompt + ("\n\n" + code if defines else code)
    return code


def _defined_names(code: str) -> set[str]:
    """Top-level names ``code`` binds (defs, classes, assignments, imports); none if it does
    not parse."""
    try:
        with warnings.catch_warnings():  # "\." in a plain string: the code's business
            warnings.simplefilter("ignore")
            body = ast.parse(code).body
    except (SyntaxError, ValueError):
        return set()
    names: set[str] = set()
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names if a.name != "*")
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name))
    return names


def program_for(example: Example, code: str) -> Program:
    """``build_program``'s parts, for the sandbox to judge from outside the program's process:
    the code (after the prompt, as in ``build_program``), the tests, the task's prompt as the
    context the judge runs itself (so the prompt's helpers are the data's, not the program's),
    and the names the tests may take from the program: those the reference solution defines,
    less the prompt's helpers (docs/execution.md, "Test cases")."""
    prompt, entry = example.meta.get("prompt"), example.meta.get("entry_point")
    names = _defined_names(example.output)
    context = ""
    if isinstance(prompt, str) and isinstance(entry, str) and entry:
        context = prompt
        names = (names - _defined_names(prompt)) | {entry}
    return Program(_with_prompt(example, code), example.tests or "", context, tuple(sorted(names)))


def _texts(record: dict, n: int, where: str) -> list[str]:
    """The generations to run: [generation], or samples[:n] (+ generation if it is not the
    first sample, whose status then comes last)."""
    if n == 1:
        return [record["generation"]]
    samples = record.get("samples")
    if not (isinstance(samples, list) and len(samples) >= n
            and all(isinstance(s, str) for s in samples)):
        have = len(samples) if isinstance(samples, list) else 0
        raise ValueError(f"{where}: field 'samples' holds {have} string(s), "
                         f"execution.num_samples={n} needs at least {n}")
    texts = samples[:n]
    return texts if record["generation"] == texts[0] else [*texts, record["generation"]]


def _is_scored(record: dict, n: int) -> bool:
    if "status" not in record:
        return False
    return n == 1 or len(record.get("statuses") or []) == n


Job = tuple[dict, list[Program]]  # (a record, the programs to run for it)


def run_in_chunks(store: ResultStore, jobs: Sequence[Job], config: ExecutionConfig,
                  write_back: Callable[[dict, list[ExecResult]], None], *, desc: str,
                  progress: bool = False) -> None:
    """Run every job's programs in the sandbox, in chunks of about CHUNK programs; after each
    chunk, ``write_back(record, its results in order)`` per job and the chunk's records are
    re-appended to ``store`` (so a crash keeps what was run)."""
    bar = None
    if progress and jobs:
        from tqdm import tqdm

        bar = tqdm(total=sum(len(p) for _, p in jobs), desc=desc, unit="program")
    start = 0
    while start < len(jobs):
        end, size = start, 0
        while end < len(jobs) and (size == 0 or size + len(jobs[end][1]) <= CHUNK):
            size += len(jobs[end][1])
            end += 1
        chunk = jobs[start:end]
        results = iter(run_programs([p for _, programs in chunk for p in programs], config))
        for record, programs in chunk:
            write_back(record, [next(results) for _ in programs])
        store.append(record for record, _ in chunk)
        if bar is not None:
            bar.update(size)
        start = end
    if bar is not None:
        bar.close()


def score_execution(store: ResultStore, method: str, examples: Sequence[Example],
                    config: ExecutionConfig, *, progress: bool = False) -> dict[str, float]:
    """Run every unscored record of ``method`` (for ``examples``) in the sandbox, write the
    statuses back into ``store``, and return pass@k over all of the method's scored records:
    ``{"pass_at_1": ..., "pass_at_<k>": ..., "passed": tasks whose status passed, "total":
    tasks}``. Records of examples not given are left alone."""
    by_id = {ex.id: ex for ex in examples}
    records = {str(r["id"]): r for r in store.load()
               if r["method"] == method and str(r["id"]) in by_id}
    untested = missing_tests([by_id[i] for i in records])
    if untested:
        raise ValueError(f"cannot execute {len(untested)} example(s) without tests, e.g. "
                         f"{untested[:3]}: field 'tests' is empty")
    n = config.num_samples
    todo = [r for r in records.values() if not _is_scored(r, n)]
    jobs = [(r, [program_for(by_id[str(r["id"])], t)
                 for t in _texts(r, n, f"{store.path}: {method}/{r['id']}")]) for r in todo]

    def write_back(record: dict, outcome: list[ExecResult]) -> None:
        if n > 1:
            record["statuses"] = [r.status for r in outcome[:n]]
            record["cases"] = [[r.cases_passed, r.cases_total] for r in outcome[:n]]
        greedy = outcome[n] if len(outcome) > n else outcome[0]  # see _texts
        record["status"], record["exec_message"] = greedy.status, greedy.message
        record["cases_passed"], record["cases_total"] = greedy.cases_passed, greedy.cases_total

    run_in_chunks(store, jobs, config, write_back, desc=f"execute {method}", progress=progress)
    statuses = {i: (r["statuses"] if n > 1 else [r["status"]]) for i, r in records.items()}
    metrics: dict[str, float] = pass_at_k_metrics(statuses, config.ks)
    metrics["passed"] = sum(r["status"] == PASSED for r in records.values())
    metrics["total"] = len(records)
    if config.visible_selection:
        metrics.update(_score_selection(store, records.values(), by_id, config,
                                        progress=progress))
    log.info("%s: %d/%d passed (%s)", method, metrics["passed"], metrics["total"],
             ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()
                       if k.startswith(("pass_at", "select_pass"))))
    return metrics


def _score_selection(store: ResultStore, records: Iterable[dict], by_id: dict[str, Example],
                     config: ExecutionConfig, *, progress: bool) -> dict[str, float]:
    """Test-time selection (:mod:`pipeline.scoring.selection`) over scored ``records``: each
    unselected record's candidates run against the task's visible test in the sandbox (same
    isolation and limits), the selection written back into ``store``; returns
    :func:`~pipeline.scoring.selection.selection_metrics` over all ``records``."""
    n, records = config.num_samples, list(records)
    todo = [r for r in records if not selection.is_selected(r, n)]
    jobs: list[Job] = []
    without = []  # tasks with no visible test: nothing to run, the first candidate
    for record in todo:
        example = by_id[str(record["id"])]
        visible = visible_tests(example)
        if visible is None:
            selection.select(record, None, n)
            without.append(record)
            continue
        shown = dataclasses.replace(example, tests=visible)
        texts, _ = selection.candidates(record, n)
        jobs.append((record, [program_for(shown, text) for text in texts]))
    if without:
        store.append(without)
    run_in_chunks(store, jobs, config,
                  lambda record, outcome: selection.select(record, [r.status for r in outcome],
                                                           n),
                  desc="visible tests", progress=progress)
    return selection.selection_metrics(records, n)
