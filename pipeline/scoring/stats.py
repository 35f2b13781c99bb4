"""Paired comparisons of a method against a reference method on the same tasks.

Every figure is a difference, method minus reference, of a per-task metric averaged over tasks
(and over seeds): pass@1 (a task's 0/1 outcome, or its share of passing samples) or a continuous
metric such as ``code_ce``. Each comes as a :class:`PairedDifference`: the difference, its 95%
percentile-bootstrap interval, a p-value, the task and seed counts, and the smallest difference
that many tasks can detect at 80% power (two-sided alpha 0.05). docs/statistics.md says what
each figure means and why these tests.

- One seed: the interval resamples tasks' paired differences (``scipy.stats.bootstrap``). The
  p-value is a sign-flip test of the mean paired difference: for 0/1 outcomes that test is
  McNemar's exact test (``scipy.stats.binomtest`` on the discordant pairs), otherwise
  ``scipy.stats.permutation_test`` (exact up to 13 tasks).
- Several seeds (tasks x seeds arrays): the interval resamples tasks and, independently, seeds
  (a seed is one trained prompt model, used on every task, so seeds are crossed with tasks, not
  nested in them); scipy has no such bootstrap, so it is written here. The p-value comes from the
  same resamples (twice the smaller share on either side of zero), so it agrees with the interval.
- The smallest detectable pass@1 difference is an exact McNemar power calculation for the
  reference's pass rate, assuming the two methods pass tasks independently of each other given
  that rate (conservative: methods that pass the same easy tasks have fewer discordant pairs and
  more power). For a continuous metric it is (z_0.975 + z_0.8) times the bootstrap standard error.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
from scipy import optimize, stats

CONFIDENCE = 0.95
ALPHA = 0.05  # two-sided, for p-values and the detectable difference
POWER = 0.80
RESAMPLES = 10_000
SEED = 0  # the bootstrap's and the permutation test's generator: a rerun gives the same figures
_CHUNK = 1_000  # crossed-bootstrap resamples per block: bounds memory at (chunk x tasks)


@dataclass(frozen=True)
class PairedDifference:
    """Method minus reference on the same tasks. ``low``/``high``: the bootstrap interval at
    ``confidence`` (NaN with fewer than 2 tasks); ``detectable``: the smallest difference the
    task count detects at 80% power (inf: none, with this few tasks); ``test``: what gave
    ``p_value`` (``mcnemar-exact``, ``sign-flip`` or ``bootstrap``)."""

    metric: str
    difference: float
    low: float
    high: float
    p_value: float
    n_tasks: int
    n_seeds: int
    detectable: float
    test: str
    confidence: float = CONFIDENCE

    def excludes_zero(self) -> bool:
        """True when the interval lies wholly on one side of zero."""
        return bool(self.low > 0 or self.high < 0)

    def decided(self) -> bool:
        """A difference a reviewer accepts: the interval excludes zero and p <= alpha. (They
        can disagree near the edge: the exact McNemar test is the more conservative.)"""
        return self.excludes_zero() and self.p_value <= ALPHA

    def verdict(self, *, higher_is_better: bool = True) -> str:
        """"better" / "worse" where :meth:`decided`, else the null, stated with what it can
        mean: "no detectable difference at 32 tasks (smallest detectable: 0.210)"."""
        if self.decided():
            return "better" if (self.difference > 0) == higher_is_better else "worse"
        return (f"no detectable difference at {self.n_tasks} tasks (smallest detectable: "
                f"{_number(self.detectable)})")

    def format(self, digits: int = 3) -> str:
        """One table cell: ``+0.031 [-0.012, +0.078] p=0.45 (32 tasks x 3 seeds, detects 0.21)``."""
        sign = f"+.{digits}f"
        interval = ("[n/a]" if math.isnan(self.low)
                    else f"[{self.low:{sign}}, {self.high:{sign}}]")
        seeds = f" x {self.n_seeds} seeds" if self.n_seeds > 1 else ""
        return (f"{self.difference:{sign}} {interval} p={self.p_value:.2g} "
                f"({self.n_tasks} tasks{seeds}, detects {_number(self.detectable, digits)})")


def _number(value: float, digits: int = 3) -> str:
    return "none" if math.isinf(value) else f"{value:.{digits}f}"


def metric_names(metric: str) -> dict[str, str]:
    """The MLflow / metrics.json names of a comparison of ``metric``; each starts with the
    metric's own name, so they sort beside it: pass_at_1, pass_at_1_diff, ..._diff_low."""
    return {"difference": f"{metric}_diff", "low": f"{metric}_diff_low",
            "high": f"{metric}_diff_high", "p_value": f"{metric}_diff_p",
            "detectable": f"{metric}_diff_detectable"}


def as_metrics(result: PairedDifference) -> dict[str, float]:
    """``{pass_at_1_diff: ..., pass_at_1_diff_low: ..., ...}``. Non-finite values become NaN
    (MLflow stores NaN as such, but inf as the largest float)."""
    names = metric_names(result.metric)
    values = {names[field]: float(getattr(result, field)) for field in names}
    return {name: (v if math.isfinite(v) else math.nan) for name, v in values.items()}


def _as_matrix(values, name: str) -> np.ndarray:
    """(tasks,) or (tasks, seeds) -> (tasks, seeds) floats, all finite."""
    array = np.asarray(values, dtype=float)
    if array.ndim == 1:
        array = array[:, None]
    if array.ndim != 2 or array.size == 0:
        raise ValueError(f"{name}: expected (tasks,) or (tasks, seeds) values, got shape "
                         f"{np.shape(values)}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name}: {int((~np.isfinite(array)).sum())} value(s) are not finite")
    return array


def _paired(method, reference, metric: str) -> np.ndarray:
    """Per (task, seed) differences; a one-seed reference (a seed-free baseline such as the
    manual prompt) is set against every seed of the method."""
    ours, theirs = _as_matrix(method, f"{metric} (method)"), _as_matrix(reference,
                                                                       f"{metric} (reference)")
    if ours.shape[0] != theirs.shape[0] or theirs.shape[1] not in (1, ours.shape[1]):
        raise ValueError(f"{metric}: method values {ours.shape} and reference values "
                         f"{theirs.shape} are not paired (same tasks; one seed or the same seeds)")
    return ours - theirs


def pass_rate_difference(method, reference, *, metric: str = "pass_at_1",
                         resamples: int = RESAMPLES, rng_seed: int = SEED) -> PairedDifference:
    """Difference in pass@1. ``method``, ``reference``: per-task outcomes, (tasks,) or (tasks,
    seeds): 0/1, or the share of a task's samples that passed; a one-seed reference is paired
    with each seed of the method."""
    differences = _paired(method, reference, metric)
    method, reference = _as_matrix(method, metric), _as_matrix(reference, metric)
    if any(((rates < 0) | (rates > 1)).any() for rates in (method, reference)):
        raise ValueError(f"{metric}: pass rates must lie in [0, 1]")
    binary = bool(np.isin(differences, (-1.0, 0.0, 1.0)).all()
                  and np.isin(reference, (0.0, 1.0)).all())
    result = _difference(differences, resamples, rng_seed, binary=binary)
    result.pop("standard_error")
    detectable = detectable_pass_difference(differences.shape[0], float(reference.mean()))
    return PairedDifference(metric=metric, detectable=detectable, **result)


def mean_difference(method, reference, *, metric: str = "code_ce", resamples: int = RESAMPLES,
                    rng_seed: int = SEED) -> PairedDifference:
    """Difference in a continuous per-task metric (e.g. ``code_ce``), (tasks,) or (tasks,
    seeds) values; ``detectable`` is (z_0.975 + z_0.8) bootstrap standard errors."""
    differences = _paired(method, reference, metric)
    result = _difference(differences, resamples, rng_seed, binary=False)
    standard_error = result.pop("standard_error")
    detectable = math.inf if differences.shape[0] < 2 else float(
        (stats.norm.ppf(1 - ALPHA / 2) + stats.norm.ppf(POWER)) * standard_error)
    return PairedDifference(metric=metric, detectable=detectable, **result)


def _difference(differences: np.ndarray, resamples: int, rng_seed: int, *, binary: bool
                ) -> dict:
    """The mean of (tasks, seeds) differences, its interval, standard error and p-value: for
    one seed a task bootstrap and McNemar's test (``binary``: 0/1 outcomes) or the sign-flip
    test; for several the crossed bootstrap and its own p-value."""
    tasks, seeds = differences.shape
    mean = float(differences.mean())
    result = {"difference": mean, "n_tasks": tasks, "n_seeds": seeds, "standard_error": 0.0,
              "low": math.nan, "high": math.nan, "p_value": 1.0,
              "test": "bootstrap" if seeds > 1 else "mcnemar-exact" if binary else "sign-flip"}
    if tasks < 2:  # one task says nothing about others: no interval, no evidence
        result["standard_error"] = math.inf
        return result
    rng = np.random.default_rng(rng_seed)
    if seeds == 1:
        result["p_value"] = (mcnemar_exact(differences[:, 0]) if binary
                             else sign_flip_p(differences[:, 0], rng=rng, resamples=resamples))
        if np.ptp(differences) == 0:  # all tasks alike: every resample is the mean
            result.update(low=mean, high=mean)
            return result
        boot = stats.bootstrap((differences[:, 0],), np.mean, n_resamples=resamples,
                               vectorized=True, method="percentile",
                               confidence_level=CONFIDENCE, rng=rng)
        result.update(low=float(boot.confidence_interval.low),
                      high=float(boot.confidence_interval.high),
                      standard_error=float(boot.standard_error))
        return result
    draws = crossed_bootstrap(differences, resamples, rng)
    tail = (1 - CONFIDENCE) / 2
    low, high = np.quantile(draws, [tail, 1 - tail])
    below, above = int((draws <= 0).sum()), int((draws >= 0).sum())
    result.update(low=float(low), high=float(high), standard_error=float(draws.std(ddof=1)),
                  p_value=min(1.0, 2 * (min(below, above) + 1) / (resamples + 1)))
    return result


def crossed_bootstrap(differences: np.ndarray, resamples: int, rng: np.random.Generator
                      ) -> np.ndarray:
    """(resamples,) means of ``differences`` (tasks, seeds) under resampling with replacement
    of tasks and, independently, of seeds (the same drawn seeds for every drawn task)."""
    tasks, seeds = differences.shape
    out = np.empty(resamples)
    for start in range(0, resamples, _CHUNK):
        size = min(_CHUNK, resamples - start)
        drawn_tasks = rng.integers(tasks, size=(size, tasks))
        drawn_seeds = rng.integers(seeds, size=(size, seeds))
        seed_counts = (drawn_seeds[:, :, None] == np.arange(seeds)).sum(1)  # (size, S)
        per_task = seed_counts @ differences.T  # (size, T): each task's sum over drawn seeds
        out[start:start + size] = np.take_along_axis(per_task, drawn_tasks, 1).sum(1)
    return out / (tasks * seeds)


def mcnemar_exact(differences) -> float:
    """McNemar's exact p-value (two-sided) from per-task 0/1 differences, method minus
    reference (+1: only the method passed, -1: only the reference did): the binomial test of
    the discordant pairs against a fair coin. No discordant pair: 1."""
    differences = np.asarray(differences)
    wins, losses = int((differences > 0).sum()), int((differences < 0).sum())
    if wins + losses == 0:
        return 1.0
    return float(stats.binomtest(wins, wins + losses, 0.5).pvalue)


def sign_flip_p(differences, *, rng: np.random.Generator | None = None,
                resamples: int = RESAMPLES) -> float:
    """Two-sided p-value of the mean paired difference under random sign flips of each task's
    difference (``scipy.stats.permutation_test``; exact when 2^tasks <= resamples)."""
    differences = np.asarray(differences, dtype=float)
    if not differences.any():
        return 1.0
    test = stats.permutation_test((differences,), np.mean, permutation_type="samples",
                                  vectorized=True, n_resamples=resamples,
                                  rng=rng if rng is not None else np.random.default_rng(SEED))
    return float(min(1.0, test.pvalue))


def mcnemar_power(n_tasks: int, base_rate: float, difference: float, *,
                  discordance: float | None = None, alpha: float = ALPHA) -> float:
    """The chance that McNemar's exact test (two-sided, ``alpha``) on ``n_tasks`` paired tasks
    rejects when the method's pass rate is ``base_rate + difference``.

    The discordant pairs number m ~ Binomial(n, psi) and, given m, the method's wins are
    Binomial(m, (psi + difference) / (2 psi)). ``discordance`` psi: the share of tasks exactly
    one method passes; None assumes independent passes, psi = p0 (1 - p1) + p1 (1 - p0).
    """
    p0 = min(base_rate, 1 - base_rate)  # pass and fail swap roles: the same power
    if discordance is None:
        p1 = p0 + difference
        wins, losses = p1 * (1 - p0), p0 * (1 - p1)
    else:
        wins, losses = (discordance + difference) / 2, (discordance - difference) / 2
    if not (0 <= losses <= wins <= 1 and p0 + difference <= 1 + 1e-12):
        raise ValueError(f"mcnemar_power: base rate {base_rate}, difference {difference}, "
                         f"discordance {discordance} give no valid 2x2 table")
    psi = wins + losses
    if psi == 0:
        return 0.0
    discordant = np.arange(n_tasks + 1)
    critical = _critical_counts(discordant, alpha)  # reject when wins <= c or wins >= m - c
    share = wins / psi
    reject = (stats.binom.cdf(critical, discordant, share)
              + stats.binom.sf(discordant - critical - 1, discordant, share))
    return float(np.sum(stats.binom.pmf(discordant, n_tasks, psi) * reject))


def _critical_counts(discordant: np.ndarray, alpha: float) -> np.ndarray:
    """For each count m of discordant pairs, the largest k whose two-sided exact binomial
    p-value 2 P(X <= k), X ~ Binomial(m, 1/2), is <= alpha (-1 when none is)."""
    k = stats.binom.ppf(alpha / 2, discordant, 0.5)  # smallest k with P(X <= k) >= alpha/2
    within = 2 * stats.binom.cdf(k, discordant, 0.5) <= alpha * (1 + 1e-9)
    return np.where(within, k, k - 1).astype(int)


@functools.lru_cache(maxsize=1024)  # pure, and a table asks for the same (tasks, rate) often
def detectable_pass_difference(n_tasks: int, base_rate: float, *,
                               discordance: float | None = None, power: float = POWER,
                               alpha: float = ALPHA) -> float:
    """The smallest rise in pass rate over ``base_rate`` that McNemar's exact test on
    ``n_tasks`` tasks detects with probability ``power`` (inf when no rise can be). With
    ``discordance`` None, the methods pass independently given their rates (see
    :func:`mcnemar_power`)."""
    p0 = min(base_rate, 1 - base_rate)
    largest = discordance if discordance is not None else 1 - p0

    def shortfall(difference: float) -> float:
        return mcnemar_power(n_tasks, p0, difference, discordance=discordance,
                             alpha=alpha) - power

    if n_tasks < 1 or largest <= 0 or shortfall(largest) < 0:
        return math.inf
    return float(optimize.brentq(shortfall, 1e-9, largest, xtol=1e-6))


def tasks_needed(base_rate: float, difference: float, *, discordance: float | None = None,
                 power: float = POWER, alpha: float = ALPHA, most: int = 100_000) -> int:
    """The fewest tasks at which McNemar's exact test reaches ``power`` for a rise of
    ``difference`` over ``base_rate`` (bisection; exact power saw-tooths by a task or two)."""
    def enough(n: int) -> bool:
        return mcnemar_power(n, base_rate, difference, discordance=discordance,
                             alpha=alpha) >= power

    low, high = 0, 16  # enough(low) is False (no tasks, no power); doubling finds a high
    while not enough(high):
        if high >= most:
            raise ValueError(f"tasks_needed: more than {most} tasks for a difference of "
                             f"{difference} at base rate {base_rate}")
        low, high = high, min(2 * high, most)
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if enough(middle) else (middle, high)
    return high
