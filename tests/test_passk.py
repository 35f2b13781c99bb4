"""pass@k: the estimator against brute force over every k-subset, and the aggregation."""
from __future__ import annotations

import itertools
import math

import pytest

from pipeline.scoring.passk import metric_name, pass_at_k, pass_at_k_metrics


def brute_force(n: int, c: int, k: int) -> float:
    """The share of k-subsets of n generations (c passing) that hold a passing one."""
    runs = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(runs[i] for i in subset) for subset in subsets) / len(subsets)


@pytest.mark.parametrize("n", range(1, 9))
def test_estimator_matches_enumeration(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(brute_force(n, c, k), abs=1e-12)


def test_edge_cases():
    assert pass_at_k(10, 0, 5) == 0.0
    assert pass_at_k(10, 10, 1) == 1.0
    assert pass_at_k(10, 6, 5) == 1.0  # n - c < k: every 5-subset holds a pass
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 = c / n
    assert pass_at_k(1, 1, 1) == 1.0 and pass_at_k(1, 0, 1) == 0.0  # greedy
    # large n stays finite and accurate (the product form, no huge binomials)
    assert pass_at_k(2000, 1, 1000) == pytest.approx(0.5)
    for n, c, k in [(3, 4, 1), (3, -1, 1), (3, 1, 0), (3, 1, 4)]:
        with pytest.raises(ValueError):
            pass_at_k(n, c, k)


def test_metrics_average_over_tasks():
    statuses = {"a": ["passed", "failed", "failed", "failed"],
                "b": ["failed", "timeout", "error", "failed"],
                "c": ["passed", "passed", "failed", "passed"]}
    metrics = pass_at_k_metrics(statuses, ks=[2])
    assert list(metrics) == ["pass_at_1", "pass_at_2"]  # pass@1 always, names without '@'
    assert metrics["pass_at_1"] == pytest.approx((1 / 4 + 0 + 3 / 4) / 3)
    assert metrics["pass_at_2"] == pytest.approx((brute_force(4, 1, 2) + 0 + 1) / 3)
    assert metric_name(10) == "pass_at_10"


def test_greedy_and_empty():
    greedy = {"a": ["passed"], "b": ["failed"], "c": ["passed"], "d": ["error"]}
    assert pass_at_k_metrics(greedy) == {"pass_at_1": 0.5}
    assert math.isnan(pass_at_k_metrics({})["pass_at_1"])
    with pytest.raises(ValueError, match="task 'b' has only 1"):
        pass_at_k_metrics({"a": ["passed", "failed"], "b": ["passed"]}, ks=[2])
