"""Paired statistics: McNemar against hand-computed binomial values, the bootstrap intervals'
coverage on simulated paired data with a known difference, the detectable difference against
simulated power, and edge cases that must give values, not exceptions."""
from __future__ import annotations

import functools
import math

import numpy as np
import pytest
from scipy import stats

from pipeline.scoring.stats import (
    PairedDifference,
    as_metrics,
    crossed_bootstrap,
    detectable_pass_difference,
    mcnemar_exact,
    mcnemar_power,
    mean_difference,
    metric_names,
    pass_rate_difference,
    sign_flip_p,
    tasks_needed,
)


def paired_table(both: int, only_method: int, only_reference: int, neither: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Per-task 0/1 outcomes (method, reference) with the given 2x2 counts."""
    method = [1] * both + [1] * only_method + [0] * only_reference + [0] * neither
    reference = [1] * both + [0] * only_method + [1] * only_reference + [0] * neither
    return np.array(method), np.array(reference)


def test_mcnemar_on_a_hand_built_table_is_the_exact_binomial_value():
    # 7 vs 1 discordant pairs: two-sided P = 2 (C(8,0) + C(8,1)) / 2^8 = 18 / 256
    method, reference = paired_table(3, 7, 1, 21)
    result = pass_rate_difference(method, reference, resamples=2000)
    assert result.p_value == pytest.approx(18 / 256, rel=1e-12)
    assert result.test == "mcnemar-exact"
    assert result.difference == pytest.approx(6 / 32)
    assert (result.n_tasks, result.n_seeds) == (32, 1)
    assert result.low < result.difference < result.high
    # 4 vs 1: 2 (1 + 5) / 32 = 0.375; the ties (both, neither) play no part
    assert mcnemar_exact(np.array([1, 1, 1, 1, -1, 0, 0])) == pytest.approx(12 / 32)
    assert pass_rate_difference(*paired_table(20, 4, 1, 0)).p_value == pytest.approx(12 / 32)


def test_mcnemar_is_the_sign_flip_test_of_binary_differences():
    """The exact sign-flip permutation test (12 tasks: every flip enumerated) gives McNemar's
    p on 0/1 data, which is why one family of tests serves both kinds of metric."""
    for table in [(2, 5, 1, 4), (0, 6, 0, 6), (3, 3, 3, 3), (1, 8, 2, 1)]:
        method, reference = paired_table(*table)
        differences = method - reference
        assert sign_flip_p(differences) == pytest.approx(mcnemar_exact(differences), rel=1e-9)


def test_bootstrap_interval_covers_a_known_pass_rate_difference():
    """300 simulated paired data sets of 80 tasks, cells (both, only method, only reference,
    neither) = (0.05, 0.12, 0.04, 0.79): the true difference is 0.08."""
    rng = np.random.default_rng(7)
    cells = rng.multinomial(1, [0.05, 0.12, 0.04, 0.79], size=(300, 80)).argmax(-1)
    method, reference = np.isin(cells, (0, 1)), np.isin(cells, (0, 2))
    results = [pass_rate_difference(m, r, resamples=1000, rng_seed=i)
               for i, (m, r) in enumerate(zip(method, reference))]
    covered = [r.low <= 0.08 <= r.high for r in results]
    assert 0.90 <= np.mean(covered) <= 0.99


def test_bootstrap_interval_covers_a_known_mean_difference_over_tasks_and_seeds():
    """300 data sets of 60 tasks x 3 seeds: difference 0.1 + task effect + seed effect +
    noise. The crossed bootstrap (tasks and seeds) covers 0.1 in 90-99% of them."""
    rng = np.random.default_rng(11)
    shape = (300, 60, 3)
    method = (1.0 + 0.1 + rng.normal(0, 0.3, (300, 60, 1)) + rng.normal(0, 0.03, (300, 1, 3))
              + rng.normal(0, 0.2, shape))
    reference = 1.0 + rng.normal(0, 0.2, (300, 60, 1))  # seed-free, like the manual prompt
    results = [mean_difference(m, r[:, 0], resamples=1000, rng_seed=i)
               for i, (m, r) in enumerate(zip(method, reference))]
    assert {r.test for r in results} == {"bootstrap"}
    assert all(r.n_seeds == 3 for r in results)
    covered = [r.low <= 0.1 <= r.high for r in results]
    assert 0.90 <= np.mean(covered) <= 0.99


def test_crossed_bootstrap_with_one_seed_is_the_task_bootstrap():
    values = np.random.default_rng(3).normal(size=(40, 1))
    ours = crossed_bootstrap(values, 20_000, np.random.default_rng(0))
    scipy_boot = stats.bootstrap((values[:, 0],), np.mean, n_resamples=20_000,
                                 vectorized=True, method="percentile",
                                 rng=np.random.default_rng(1))
    assert ours.std(ddof=1) == pytest.approx(scipy_boot.standard_error, rel=0.03)
    assert ours.mean() == pytest.approx(values.mean(), abs=0.01)


def test_crossed_bootstrap_resamples_seeds_once_for_all_tasks():
    """Differences that only a seed moves (every task -1, 0 or +1 by seed): the spread is the
    spread of a mean of 3 drawn seeds, sqrt((2/3) / 3) = 0.471, which resampling seeds within
    each task separately would average away to about 0.471 / sqrt(tasks)."""
    by_seed = np.tile([-1.0, 0.0, 1.0], (50, 1))
    draws = crossed_bootstrap(by_seed, 20_000, np.random.default_rng(4))
    assert draws.std() == pytest.approx(math.sqrt(2 / 9), rel=0.03)


@functools.cache
def mcnemar_rejects(wins: int, losses: int) -> bool:
    return wins + losses > 0 and stats.binomtest(wins, wins + losses, 0.5).pvalue <= 0.05


@pytest.mark.parametrize("n_tasks,base_rate,discordance", [(150, 0.05, None),
                                                           (400, 0.05, 0.06)])
def test_detectable_difference_has_80_percent_power_in_simulation(n_tasks, base_rate,
                                                                  discordance):
    """At the computed difference, McNemar's exact test (scipy's binomtest) on 4000 simulated
    paired data sets rejects in 80% of them (the Monte Carlo sd is 0.006)."""
    difference = detectable_pass_difference(n_tasks, base_rate, discordance=discordance)
    p1 = base_rate + difference
    if discordance is None:  # independent passes
        wins, losses = p1 * (1 - base_rate), base_rate * (1 - p1)
    else:
        wins, losses = (discordance + difference) / 2, (discordance - difference) / 2
    counts = np.random.default_rng(5).multinomial(
        n_tasks, [wins, losses, 1 - wins - losses], size=4000)
    power = np.mean([mcnemar_rejects(int(w), int(lo)) for w, lo, _ in counts])
    assert power == pytest.approx(0.80, abs=0.025)
    # and a smaller difference is detected less often
    assert mcnemar_power(n_tasks, base_rate, 0.7 * difference, discordance=discordance) < 0.7


@pytest.mark.parametrize("n_tasks,base_rate,difference,discordance",
                         [(12, 0.1, 0.3, None), (25, 0.05, 0.12, None), (25, 0.2, 0.1, 0.3)])
def test_mcnemar_power_is_the_enumerated_rejection_probability(n_tasks, base_rate, difference,
                                                               discordance):
    """Every (wins, losses) count of n paired tasks, its multinomial probability, and whether
    scipy's binomtest rejects it at 0.05: their sum is the power."""
    p1 = base_rate + difference
    if discordance is None:
        wins, losses = p1 * (1 - base_rate), base_rate * (1 - p1)
    else:
        wins, losses = (discordance + difference) / 2, (discordance - difference) / 2
    cells = [wins, losses, 1 - wins - losses]
    power = sum(stats.multinomial.pmf([w, lo, n_tasks - w - lo], n_tasks, cells)
                for w in range(n_tasks + 1) for lo in range(n_tasks + 1 - w)
                if mcnemar_rejects(w, lo))
    assert mcnemar_power(n_tasks, base_rate, difference, discordance=discordance) == \
        pytest.approx(power, rel=1e-9)


def test_tasks_needed_meets_the_power_and_grows_for_smaller_differences():
    needed = tasks_needed(0.05, 0.03)
    assert mcnemar_power(needed, 0.05, 0.03) >= 0.8
    assert mcnemar_power(int(needed * 0.9), 0.05, 0.03) < 0.8
    assert tasks_needed(0.05, 0.02) > 1.8 * needed
    # fewer discordant pairs (correlated methods) need fewer tasks
    assert tasks_needed(0.05, 0.03, discordance=0.06) < needed
    # the detectable difference at that count is about the difference asked for
    assert detectable_pass_difference(needed, 0.05) == pytest.approx(0.03, abs=0.002)


def test_edge_cases_give_values_not_exceptions():
    ties = pass_rate_difference(np.zeros(32), np.zeros(32))  # all ties, nobody passes
    assert (ties.difference, ties.low, ties.high, ties.p_value) == (0.0, 0.0, 0.0, 1.0)
    assert 0 < ties.detectable < 1
    same = pass_rate_difference(*paired_table(4, 0, 0, 28))  # no discordant pair
    assert (same.difference, same.p_value) == (0.0, 1.0)
    assert same.verdict().startswith("no detectable difference at 32 tasks")
    one = pass_rate_difference([1], [0])  # one task: no interval, no evidence
    assert one.difference == 1.0 and math.isnan(one.low) and one.p_value == 1.0
    assert one.detectable == math.inf and "[n/a]" in one.format() and "none" in one.format()
    code_ce = mean_difference(np.ones(10), np.ones(10))
    assert (code_ce.difference, code_ce.low, code_ce.high, code_ce.p_value) == (0, 0, 0, 1)
    single = mean_difference([[0.5, 0.7, 0.6]], [0.4])  # one task, three seeds
    assert single.n_seeds == 3 and math.isnan(single.high) and single.detectable == math.inf
    assert detectable_pass_difference(3, 0.05) == math.inf  # 3 tasks cannot reach p < 0.05
    assert detectable_pass_difference(100, 0.0) < detectable_pass_difference(100, 0.05)
    assert detectable_pass_difference(100, 0.9) == pytest.approx(
        detectable_pass_difference(100, 0.1))  # pass and fail swap roles


def test_several_samples_per_task_and_seeds():
    rng = np.random.default_rng(2)
    fractions = rng.integers(0, 5, size=(50, 3)) / 4  # 4 samples per task, 3 seeds
    reference = rng.integers(0, 5, size=50) / 4
    pooled = pass_rate_difference(fractions, reference, resamples=2000)
    assert pooled.test == "bootstrap" and pooled.n_seeds == 3
    assert pooled.difference == pytest.approx(fractions.mean() - reference.mean())
    per_seed = pass_rate_difference(fractions[:, 0], reference, resamples=2000)
    assert per_seed.test == "sign-flip" and per_seed.n_seeds == 1
    # seeded: the same call gives the same figures
    assert pass_rate_difference(fractions, reference, resamples=2000) == pooled
    with pytest.raises(ValueError, match="not paired"):
        pass_rate_difference(fractions, reference[:40])
    with pytest.raises(ValueError, match="not paired"):
        pass_rate_difference(fractions, fractions[:, :2])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        pass_rate_difference(fractions + 0.5, reference)  # method above 1, differences not
    with pytest.raises(ValueError, match="not finite"):
        mean_difference([1.0, math.nan], [1.0, 1.0])


def test_metric_names_sort_beside_the_metric_and_format():
    result = PairedDifference(metric="pass_at_1", difference=0.0625, low=-0.03, high=0.156,
                              p_value=0.45, n_tasks=32, n_seeds=3, detectable=math.inf,
                              test="bootstrap")
    flat = as_metrics(result)
    assert list(flat) == list(metric_names("pass_at_1").values())
    assert all(name.startswith("pass_at_1_diff") for name in flat)
    assert sorted([*flat, "pass_at_1", "pass_at_5", "code_ce"])[1:-1] == [
        "pass_at_1", *sorted(flat)]
    assert flat["pass_at_1_diff"] == 0.0625 and math.isnan(flat["pass_at_1_diff_detectable"])
    assert result.format() == "+0.062 [-0.030, +0.156] p=0.45 (32 tasks x 3 seeds, detects none)"
    assert result.verdict() == "no detectable difference at 32 tasks (smallest detectable: none)"
    better = PairedDifference("code_ce", -0.05, -0.08, -0.02, 0.001, 500, 1, 0.03, "sign-flip")
    assert better.verdict(higher_is_better=False) == "better"
    assert better.verdict() == "worse"
    # the interval excludes zero but McNemar's p does not reach 0.05: no claim
    edge = PairedDifference("pass_at_1", 0.09, 0.01, 0.18, 0.07, 80, 1, 0.2, "mcnemar-exact")
    assert edge.excludes_zero() and not edge.decided()
    assert edge.verdict().startswith("no detectable difference at 80 tasks")
