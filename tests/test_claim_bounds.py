"""tools/claim_bounds.py: the best-case McNemar p-value over every task arrangement consistent
with two pass counts, checked against hand-computed exact binomial values."""
from __future__ import annotations

import importlib.util
import sys

import pytest

from helpers import REPO

spec = importlib.util.spec_from_file_location("claim_bounds", REPO / "tools" / "claim_bounds.py")
claim_bounds = importlib.util.module_from_spec(spec)
sys.modules["claim_bounds"] = claim_bounds  # its dataclass looks itself up there
spec.loader.exec_module(claim_bounds)


def test_best_case_p_equals_the_hand_value():
    # 4/32 against 1/32: at best the reference's one task is also the method's (3 wins, 0
    # losses), p = 2 * 0.5**3 = 0.25; any other arrangement (4 wins, 1 loss: 0.375) is worse.
    assert claim_bounds.best_case_mcnemar(4, 1, 32) == (0.25, 3, 0)
    # 0/32 against 3/32: 3 losses, p = 0.25 as well; 10/96 against 5/96: 5 wins, p = 2 / 32.
    assert claim_bounds.best_case_mcnemar(0, 3, 32) == (0.25, 0, 3)
    assert claim_bounds.best_case_mcnemar(10, 5, 96)[0] == pytest.approx(0.0625)
    assert claim_bounds.best_case_mcnemar(2, 2, 32)[0] == 1.0
    # Every task passed by one, none by the other: 32 wins, p = 2 * 0.5**32.
    assert claim_bounds.best_case_mcnemar(32, 0, 32)[0] == pytest.approx(2 * 0.5 ** 32)


def test_worst_case_p_equals_the_hand_value():
    # 4/32 against 1/32 at worst: 4 wins, 1 loss, p = 2 * (1 + 5) / 32 = 0.375.
    assert claim_bounds.worst_case_mcnemar(4, 1, 32) == pytest.approx(0.375)
    # 0 against 12: only one arrangement (12 losses), p = 2 * 0.5**12 whatever the pairing.
    assert claim_bounds.worst_case_mcnemar(0, 12, 32) == pytest.approx(2 * 0.5 ** 12)


def test_the_table_and_bad_arguments(capsys):
    assert claim_bounds.main(["MBPP x=4,2,4/1/32"]) == 0
    row = capsys.readouterr().out.splitlines()[-1]
    assert row.startswith("| MBPP x | 4, 2, 4 | 1, 1, 1 | 32 x 3 | 0.25, 1, 0.25 | 0.016 | 1 |")
    assert row.endswith("| 0.031 | 0.28 |")
    with pytest.raises(SystemExit, match="'x=4,2/1,1,1/32': expected"):
        claim_bounds.parse("x=4,2/1,1,1/32")
    with pytest.raises(ValueError, match="method passes 40 is not within 0..32"):
        claim_bounds.best_case_mcnemar(40, 1, 32)


def test_the_results_page_shows_the_bounds_of_its_comparisons():
    """docs/results.md's bounds table is the script's output for tools/results_claims.txt."""
    lines = (REPO / "tools" / "results_claims.txt").read_text().splitlines()
    comparisons = [line for line in lines if line.strip() and not line.startswith("#")]
    expected = claim_bounds.table(comparisons)
    assert expected in (REPO / "docs" / "results.md").read_text(), (
        "run `.venv/bin/python tools/claim_bounds.py --from tools/results_claims.txt` and "
        "paste its table into docs/results.md")
