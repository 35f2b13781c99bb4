"""How the paired statistics behave on simulated data: the figures docs/statistics.md cites.

    .venv/bin/python benchmarks/stats_calibration.py [--datasets 1000]

Prints (1) the coverage of the 95% percentile and BCa bootstrap intervals of a pass@1
difference, (2) how often each claim rule fires when the methods do not differ (interval
excludes zero; McNemar p <= 0.05), (3) the crossed tasks x seeds bootstrap's coverage, with and
without a seed effect, and (4) the tasks McNemar's exact test needs at 80% power and the
smallest difference the project's test-set sizes detect. Seeded: a rerun prints the same.
"""
from __future__ import annotations

import argparse

import numpy as np
from scipy import stats

from pipeline.scoring.stats import (
    crossed_bootstrap,
    detectable_pass_difference,
    pass_rate_difference,
    tasks_needed,
)


def paired_outcomes(rng, datasets: int, tasks: int, cells: list[float]):
    """(datasets, tasks) 0/1 outcomes of method and reference from the 2x2 cell shares
    (both pass, only the method, only the reference, neither)."""
    drawn = rng.multinomial(1, cells, size=(datasets, tasks)).argmax(-1)
    return np.isin(drawn, (0, 1)).astype(float), np.isin(drawn, (0, 2)).astype(float)


def interval_coverage(datasets: int) -> None:
    print("1. coverage of the 95% interval of a pass@1 difference (independent methods)")
    print("   tasks  p0    p1    percentile  BCa")
    rng = np.random.default_rng(1)
    for tasks, p0, p1 in [(32, .05, .08), (100, .05, .08), (500, .05, .08), (32, .3, .4),
                          (100, .3, .4), (200, .1, .15)]:
        cells = [p0 * p1, p1 * (1 - p0), p0 * (1 - p1), (1 - p0) * (1 - p1)]
        method, reference = paired_outcomes(rng, datasets, tasks, cells)
        differences = method - reference
        varied = differences[np.ptp(differences, axis=1) > 0]  # scipy's BCa needs spread
        shares = []
        for kind in ("percentile", "BCa"):
            boot = stats.bootstrap((varied,), np.mean, axis=-1, n_resamples=2000,
                                   vectorized=True, method=kind, rng=rng)
            low, high = boot.confidence_interval
            shares.append(np.mean((low <= p1 - p0) & (p1 - p0 <= high)))
        print(f"   {tasks:5d}  {p0:.2f}  {p1:.2f}  {shares[0]:10.3f}  {shares[1]:.3f}")


def false_claims(datasets: int) -> None:
    print("2. no true difference: how often each rule claims one (nominal 0.05)")
    print("   tasks  cells (both, only m, only r, neither)  interval  McNemar  both")
    rng = np.random.default_rng(2)
    for tasks, cells in [(32, [.03, .04, .04, .89]), (80, [.05, .08, .08, .79]),
                         (300, [.03, .03, .03, .91]), (500, [.03, .03, .03, .91])]:
        method, reference = paired_outcomes(rng, datasets, tasks, cells)
        results = [pass_rate_difference(m, r, resamples=2000, rng_seed=i)
                   for i, (m, r) in enumerate(zip(method, reference))]
        interval = np.mean([r.excludes_zero() for r in results])
        mcnemar = np.mean([r.p_value <= 0.05 for r in results])
        both = np.mean([r.decided() for r in results])
        print(f"   {tasks:5d}  {str(cells):36s}  {interval:8.3f}  {mcnemar:7.3f}  {both:.3f}")


def crossed_coverage(datasets: int) -> None:
    print("3. crossed bootstrap (tasks x 3 seeds), code_ce-like differences, truth 0.1")
    print("   tasks  task sd  seed sd  noise sd  coverage")
    rng = np.random.default_rng(3)
    for tasks, task_sd, seed_sd, noise_sd in [(100, 1, 0, 1), (100, 1, .05, 1),
                                              (100, 1, .2, 1), (32, 1, 0, 1)]:
        hits = 0
        for _ in range(datasets):
            differences = (0.1 + rng.normal(0, task_sd, (tasks, 1))
                           + rng.normal(0, seed_sd, (1, 3)) + rng.normal(0, noise_sd, (tasks, 3)))
            low, high = np.quantile(crossed_bootstrap(differences, 2000, rng), [.025, .975])
            hits += low <= 0.1 <= high
        print(f"   {tasks:5d}  {task_sd:7.2f}  {seed_sd:7.2f}  {noise_sd:8.2f}  "
              f"{hits / datasets:.3f}")


def power_tables() -> None:
    print("4. tasks McNemar's exact test needs (80% power, two-sided 0.05) for a rise of d")
    print("   base  d     independent  half the discordance  nested (only wins)")
    for base in (0.03, 0.05, 0.08):
        for rise in (0.02, 0.03):
            independent = base * (1 - base - rise) + (base + rise) * (1 - base)
            print(f"   {base:.2f}  {rise:.2f}  {tasks_needed(base, rise):11d}  "
                  f"{tasks_needed(base, rise, discordance=independent / 2):20d}  "
                  f"{tasks_needed(base, rise, discordance=rise):d}")
    print("   smallest detectable rise (independent passes) at the base rate")
    print("   tasks   0.00   0.03   0.05   0.08   0.10")
    for tasks in (32, 64, 164, 500):
        cells = "  ".join(f"{detectable_pass_difference(tasks, b):.3f}"
                          for b in (0, .03, .05, .08, .1))
        print(f"   {tasks:5d}  {cells}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", type=int, default=1000,
                        help="simulated data sets per setting (Monte Carlo sd at 0.95: "
                             "0.007 for 1000)")
    datasets = parser.parse_args().datasets
    interval_coverage(datasets)
    false_claims(datasets)
    crossed_coverage(datasets)
    power_tables()


if __name__ == "__main__":
    main()
