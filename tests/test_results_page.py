"""The results page and the per-task records behind it agree: `ddpt tables` regenerates each
marked table from its records, and a page that drifted from its files is caught."""
from __future__ import annotations

import dataclasses
import gzip
import shutil
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.scoring.task_records import compare_to_reference, read_table, write_table
from pipeline.studies.results_page import ResultsPageError, regenerate, update_page

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = Path(__file__).resolve().parent / "results_fixture"


@pytest.mark.parametrize("page, results", [
    (ROOT / "docs" / "results.md", ROOT / "docs" / "results"),  # the real page
    (FIXTURE / "page.md", FIXTURE),  # synthetic records: the check at work until real ones
], ids=["docs", "fixture"])
def test_the_page_and_its_records_agree(page, results):
    assert update_page(page, results, check=True), \
        f"run `ddpt tables --results {results} --page {page}`"


def test_each_row_is_computed_from_the_records(tmp_path):
    """The fixture's table, read against figures computed here from the same records."""
    rows = read_table(FIXTURE / "example.csv.gz")
    page = (FIXTURE / "page.md").read_text()
    figure = compare_to_reference(rows, "baseline/manual")["ddpt_conditional/ddpt_ddim"]
    passes = sum(r.status == "passed" for r in rows if r.method.startswith("ddpt"))
    row = next(line for line in page.splitlines() if line.startswith("| ddpt_conditional/"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[2:5] == ["40", "3", f"{passes / 120:.3f} ({passes}/120)"]
    pass_at_1 = figure["pass_at_1"]
    assert cells[5] == (f"{pass_at_1.difference:+.3f} [{pass_at_1.low:+.3f}, "
                        f"{pass_at_1.high:+.3f}]")
    assert cells[6] == f"{pass_at_1.p_value:.2g}" and cells[-3:] == ["851,136", "470", "1.12x"]
    assert cells[8] == ("beats baseline/manual" if pass_at_1.decided()
                        else "no detectable difference")
    assert page.startswith("# A results page") and page.endswith("stays as it is.\n")


def test_a_page_that_drifted_from_its_records_is_caught_and_rewritten(tmp_path, capsys):
    results = tmp_path / "results"
    shutil.copytree(FIXTURE, results)
    page = results / "page.md"
    rows = read_table(results / "example.csv.gz")
    flipped = [r if r.task_id != "mbpp-11" or r.method != "baseline/manual"
               else dataclasses.replace(r, status="failed" if r.status == "passed" else "passed")
               for r in rows]
    write_table(results / "example.csv.gz", flipped)
    args = ["tables", "--results", str(results), "--page", str(page)]
    assert not update_page(page, results, check=True)
    with pytest.raises(SystemExit) as stopped:
        main([*args, "--check"])
    assert stopped.value.code == 1 and "differs from the tables" in capsys.readouterr().err
    before = page.read_text()
    assert main(args) == 0
    after = page.read_text()
    assert after != before and update_page(page, results, check=True)
    outside = lambda text: text.split("<!-- table")[0] + text.split("<!-- /table -->")[1]
    assert outside(after) == outside(before)  # only the block changed


def test_a_block_can_name_its_own_reference(tmp_path):
    """One set of records, two tables: the sidecar's reference, and a tuned baseline named in
    the block's marker."""
    text = ("<!-- table: example -->\n<!-- /table -->\n"
            "<!-- table: example reference=prompt_tuning/prompt_tuning -->\n<!-- /table -->\n")
    page = regenerate(text, FIXTURE, tmp_path / "page.md")
    first, second = page.split("<!-- /table -->")[:2]
    rows = read_table(FIXTURE / "example.csv.gz")
    figure = compare_to_reference(rows, "prompt_tuning/prompt_tuning")
    ddpt = figure["ddpt_conditional/ddpt_ddim"]["code_ce"]
    row = next(line for line in second.splitlines() if line.startswith("| ddpt_conditional/"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[10] == f"{ddpt.difference:+.3f} [{ddpt.low:+.3f}, {ddpt.high:+.3f}]"
    assert "minus `prompt_tuning/prompt_tuning`" in second and "| prompt_tuning/prompt_tuning" \
        " | greedy | 40 | 3 | 0.075 (9/120) | (reference)" in second
    assert "minus `baseline/manual`" in first
    with pytest.raises(ResultsPageError, match="the reference 'nosuch' has no rows"):
        regenerate("<!-- table: example reference=nosuch -->\n<!-- /table -->\n", FIXTURE,
                   tmp_path / "page.md")


@pytest.mark.parametrize("text, message", [
    ("<!-- table: nosuch -->\n<!-- /table -->\n", "page.md:1: table 'nosuch' has no records"),
    ("x\n<!-- table: example -->\nno end\n", "page.md:2: table 'example' is not closed"),
    ("<!-- table example -->\n", "page.md:1: '<!-- table example -->' is not"),
])
def test_bad_blocks_name_the_page_and_line(tmp_path, text, message):
    with pytest.raises(ResultsPageError, match=message):
        regenerate(text, FIXTURE, tmp_path / "page.md")


def test_committed_tables_are_small_gzip_csv():
    """docs/results/ holds per-task tables and their sidecars only, each small."""
    for path in (ROOT / "docs" / "results").iterdir():
        assert path.name == "README.md" or path.suffixes[-2:] == [".csv", ".gz"] \
            or path.suffix == ".json", path
        if path.name.endswith(".csv.gz"):
            assert path.stat().st_size < 200_000, path
            assert gzip.decompress(path.read_bytes()).startswith(b"method,seed,task_id,")
