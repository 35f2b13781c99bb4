"""The tables of docs/results.md, regenerated from the per-task records committed under
docs/results/ (``ddpt tables``; the format: docs/results/README.md).

A results folder holds, per table, ``<name>.csv.gz`` (a per-task table,
:mod:`pipeline.scoring.task_records`, of one evaluation set) and optionally ``<name>.json``
(``{"reference": "baseline/manual", "facts": {method: {"prompt_model_parameters": ...,
"prompt_norm": ..., "step_time_vs_prompt_tuning": ...}}}``): what ``ddpt experiment`` writes as
``task_records/<eval set>.csv.gz`` and ``.json``. In the page, each block::

    <!-- table: <name> -->
    (anything: replaced)
    <!-- /table -->

is rewritten with the table of ``<name>``; nothing outside the blocks changes. A block opened
``<!-- table: <name> reference=<method> -->`` compares with that method instead of the
sidecar's reference (one set of records, two tables: against the manual prompt and against
a tuned baseline). Every figure is
computed from the records (paired against the reference on the same tasks, pooled over seeds
where there are several; docs/statistics.md), so the page cannot drift from its files.
"""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

from pipeline.scoring.stats import PairedDifference
from pipeline.scoring.task_records import TaskRecord, read_table
from pipeline.studies.paired import paired_figures

OPEN = re.compile(r"^<!-- table: (?P<name>[\w.\-]+)"
                  r"(?: reference=(?P<reference>[\w./\-]+))? -->$")
CLOSE = "<!-- /table -->"
HEADER = ("method", "chain", "tasks", "seeds", "pass@1", "pass@1 − reference [95% interval]",
          "p", "detectable", "verdict (pass@1)", "code_ce", "code_ce − reference [95% interval]",
          "p (code_ce)", "parameters", "prompt norm", "step time vs prompt tuning")


class ResultsPageError(ValueError):
    """A page or results folder that does not fit together; the message names the file."""


def read_results(folder: Path, name: str, where: str) -> tuple[list[TaskRecord], dict]:
    """The rows and the sidecar (``{}`` without one) of table ``name`` in ``folder``."""
    table, sidecar = Path(folder) / f"{name}.csv.gz", Path(folder) / f"{name}.json"
    if not table.is_file():
        raise ResultsPageError(f"{where}: table {name!r} has no records: {table} is missing")
    try:
        extra = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
    except json.JSONDecodeError as err:
        raise ResultsPageError(f"{sidecar}: not valid JSON ({err})") from None
    unknown = set(extra) - {"reference", "facts"}
    if unknown:
        raise ResultsPageError(f"{sidecar}: unknown key(s) {sorted(unknown)}; known: "
                               "reference, facts")
    return read_table(table), extra


def _mean(values: list[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return sum(values) / len(values) if values else math.nan


def _interval(figure: PairedDifference | None) -> tuple[str, str]:
    """("+0.031 [-0.012, +0.078]", "0.45") of a figure, ("–", "–") without one."""
    if figure is None:
        return "–", "–"
    interval = ("[n/a]" if math.isnan(figure.low)
                else f"[{figure.low:+.3f}, {figure.high:+.3f}]")
    return f"{figure.difference:+.3f} {interval}", f"{figure.p_value:.2g}"


def _pass_cell(rows: list[TaskRecord]) -> str:
    fractions = [row.pass_fraction for row in rows]
    if all(math.isnan(f) for f in fractions):
        return "–"
    cell = f"{_mean(fractions):.3f}"
    if all(f in (0.0, 1.0) for f in fractions):
        cell += f" ({int(sum(fractions))}/{len(fractions)})"
    return cell


def _facts(values: dict) -> list[str]:
    """The training facts' cells: parameters, the prompt's norm per context position at the
    last step (the direction added to the manual context), step time over prompt tuning's."""
    parameters, norm = values.get("prompt_model_parameters"), values.get("prompt_norm")
    ratio = values.get("step_time_vs_prompt_tuning")
    return [f"{round(parameters):,}" if parameters is not None else "–",
            f"{norm:.3g}" if norm is not None else "–",
            f"{ratio:.2f}x" if ratio is not None else "–"]


def _verdict(figure: PairedDifference | None, reference: str) -> str:
    if figure is None:
        return "–"
    if figure.decided():
        return f"{'beats' if figure.difference > 0 else 'below'} {reference}"
    return "no detectable difference"


def results_table(rows: list[TaskRecord], sidecar: dict, source: str,
                  reference: str | None = None) -> str:
    """The Markdown table of one results file: a row per method (the reference first), each
    against the reference (``reference``, else the sidecar's, else ``manual``) on the same
    tasks, and a line saying how to read it."""
    reference = reference or sidecar.get("reference", "manual")
    methods = sorted({row.method for row in rows})
    if reference not in methods:
        raise ResultsPageError(f"{source}: the reference {reference!r} has no rows; methods: "
                               f"{methods}")
    figures = paired_figures(rows, reference)
    facts = sidecar.get("facts", {})
    lines = ["| " + " | ".join(HEADER) + " |", "| " + " | ".join(["---"] * len(HEADER)) + " |"]
    for method in [reference, *(m for m in methods if m != reference)]:
        own = [row for row in rows if row.method == method]
        pass_figure = figures.get(method, {}).get("pass_at_1")
        ce_figure = figures.get(method, {}).get("code_ce")
        ce = _mean([row.code_ce for row in own if row.code_ce is not None])
        pass_diff, pass_p = _interval(pass_figure)
        ce_diff, ce_p = _interval(ce_figure)
        detectable = ("–" if pass_figure is None else "none" if math.isinf(
            pass_figure.detectable) else f"{pass_figure.detectable:.3f}")
        cells = [method, "; ".join(sorted({row.chain for row in own})),
                 str(len({row.task_id for row in own})), str(len({row.seed for row in own})),
                 _pass_cell(own), pass_diff, pass_p, detectable,
                 _verdict(pass_figure, reference), "–" if math.isnan(ce) else f"{ce:.3f}",
                 ce_diff, ce_p, *_facts(facts.get(method, {}))]
        if method == reference:
            cells[5:9] = ["(reference)", "", "", ""]
            cells[10:12] = ["(reference)", ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + (
        f"\n\nEach method minus `{reference}` on the same tasks, pooled over its seeds: 95% "
        "paired bootstrap interval (tasks x seeds with several seeds); p: McNemar's exact test "
        "(pass@1, one seed), the sign-flip test (code_ce, one seed) or the bootstrap's (several "
        "seeds); detectable: the smallest pass@1 rise these tasks detect 4 times in 5 at the "
        "reference's pass rate; a verdict needs the interval to exclude 0 and p <= 0.05 "
        f"(docs/statistics.md). Records: [{source}]({source}).")


def regenerate(page_text: str, results: Path, page: Path) -> str:
    """``page_text`` (of ``page``) with every marked block rewritten from ``results``; each
    table names its records by their path from the page's folder."""
    page_name = str(page)
    lines = page_text.split("\n")
    out: list[str] = []
    index = 0
    while index < len(lines):
        line = lines[index]
        opened = OPEN.match(line)
        out.append(line)
        index += 1
        if not opened:
            if line.startswith("<!-- table") or line == CLOSE:
                raise ResultsPageError(f"{page_name}:{index}: {line!r} is not "
                                       "'<!-- table: <name> -->' opening a block")
            continue
        name = opened.group("name")
        end = next((i for i in range(index, len(lines)) if lines[i] == CLOSE), None)
        if end is None or any(OPEN.match(lines[i]) for i in range(index, end)):
            raise ResultsPageError(f"{page_name}:{index}: table {name!r} is not closed by "
                                   f"{CLOSE!r} before the next block")
        rows, sidecar = read_results(results, name, f"{page_name}:{index}")
        source = Path(os.path.relpath(Path(results) / f"{name}.csv.gz",
                                      Path(page).parent)).as_posix()
        out += ["", results_table(rows, sidecar, source, opened.group("reference")), "", CLOSE]
        index = end + 1
    return "\n".join(out)


def update_page(page: Path, results: Path, *, check: bool = False) -> bool:
    """Rewrite ``page``'s blocks from ``results`` (``check``: only compare). Returns whether
    the page was already up to date."""
    text = page.read_text()
    fresh = regenerate(text, results, page)
    if fresh != text and not check:
        page.write_text(fresh)
    return fresh == text
